"""Infer: Graph -> shapes of every blob and param. Calls each layer's shape rule in order, attaches
positions and producer notes to every ShapeError, then checks what spans layers: --shape hints,
shared params, pinned weights, RPN anchor counts, unused tops and layers that reach no loss."""
from __future__ import annotations

from .errors import Collector
from .graph import Graph, Node
from .registry import ShapeError, Shape, fmt
from .schema import suggest


def producer_note(g: Graph, blob: str, shape: Shape) -> str:
    node = g.producer.get(blob)
    who = f" (produced by {node.layer.type} '{node.name}' at {node.layer.spec.pos})" if node else ""
    return f"input '{g.display(blob)}' is {fmt(shape)}{who}"


def infer(g: Graph, hints: dict[str, Shape], c: Collector) -> dict[str, Shape]:
    """Shapes of every blob version; a blob whose producer failed is left out (no cascades)."""
    shapes: dict[str, Shape] = {}
    used_hints = set()
    for node in g.nodes:
        layer = node.layer
        if any(b not in shapes for b in node.bottoms):
            continue
        layer.bottom_shapes = [shapes[b] for b in node.bottoms]
        layer.producers = [g.producer[b].layer if b in g.producer else None for b in node.bottoms]
        try:
            tops = layer.shape(list(layer.bottom_shapes))
        except ShapeError as e:
            notes = list(e.notes) + [producer_note(g, node.bottoms[i], layer.bottom_shapes[i]) for i in e.involves]
            c.error(e.code, e.message, layer.pos(e.field), notes=notes, help=e.help)
            continue
        hinted = layer.is_data or layer.type == "Python"
        if hinted:
            tops = list(tops) + [None] * (len(node.tops) - len(tops))
            for i, user in enumerate(layer.spec.tops):
                if user in hints:
                    tops[i] = hints[user]
                    used_hints.add(user)
            tops = layer.complete(tops)
        reported = False
        for i, (user, top) in enumerate(zip(layer.spec.tops, node.tops)):
            shape = tops[i] if i < len(tops) else None
            if shape is None and reported:
                continue
            if shape is None:
                reported = True
                c.error("E0502", f"the shape of '{user}' ({layer.type} '{layer.name}') cannot be known without its "
                        "data", layer.spec.pos,
                        notes=[_why_unknown(layer)],
                        help=f"pass its shape: {_hint_example(layer, i)}")
                continue
            shapes[top] = tuple(shape)
        if all(t in shapes for t in node.tops):
            layer.top_shapes = [shapes[t] for t in node.tops]
        if layer.type == "Python" and hasattr(layer, "qualname"):
            _python_note(layer, c)
    for name in set(hints) - used_hints:
        blobs = {g.display(t) for n in g.nodes for t in n.tops}
        tip = suggest(name, blobs)
        computed = name in blobs
        c.error("E0503", f"--shape {name}: " + ("that blob is computed by a layer, not read from data" if computed
                                                else f"no data blob '{name}' in this net"),
                help=tip or ("--shape sets the shape of a data layer's top; remove it" if computed else
                             f"data blobs here: {', '.join(sorted(_data_tops(g))) or 'none'}"))
    return shapes


def _why_unknown(layer) -> str:
    if layer.type == "Data":
        src = layer.p.source or "its database"
        return f"Caffe's Data layer reads {layer.p.backend} '{src}', which netdsl does not open"
    if layer.type == "Input":
        return "this Input layer gives no input_param { shape { dim: ... } }"
    return f"{layer.type} layers produce shapes known only at run time"


def _hint_example(layer, i: int) -> str:
    top = layer.spec.tops[i]
    n = getattr(layer.p, "batch_size", 0) if layer.type == "Data" else 0
    n = n or "N"
    crop = layer.p.crop_size if layer.type == "Data" and layer.p.crop_size else None
    if layer.type == "Data" and i == 1:
        return f"--shape {top}={n}"
    side = f"{crop},{crop}" if crop else "H,W"
    return f"--shape {top}={n},C,{side} (e.g. {n},3,{crop or 224},{crop or 224})"


def _data_tops(g: Graph):
    return {t for n in g.nodes if n.layer.is_data or n.layer.type == "Python" for t in n.layer.spec.tops}


def _python_note(layer, c: Collector) -> None:
    from .layers.rpn import KNOWN_PYTHON
    kind = KNOWN_PYTHON.get(layer.qualname())
    if kind:
        c.warning("W0601", f"Python layer '{layer.name}' ({layer.qualname()}) is checked as netdsl's built-in "
                  f"{kind}; netdsl never imports Python modules from a net file", layer.pos("module"),
                  help=(f'to run it, use `type: "{kind}"` with {kind.lower()}_param {{ ... }} instead'
                        if kind in ("AnchorTarget", "Proposal") else "it can be checked but not run"))


def check_shared_params(g: Graph, c: Collector) -> None:
    """Layers sharing a param by name must agree on its shape (STRICT) or count (PERMISSIVE)."""
    owners: dict[str, tuple[Node, int]] = {}
    for node in g.nodes:
        for i, spec in enumerate(node.param_specs):
            if not spec.name or i >= len(node.layer.param_shapes) or not node.layer.top_shapes:
                continue
            if spec.name not in owners:
                owners[spec.name] = (node, i)
                continue
            first, j = owners[spec.name]
            a, b = first.layer.param_shapes[j], node.layer.param_shapes[i]
            same = a == b if spec.share_mode == "STRICT" else _count(a) == _count(b)
            if same:
                continue
            notes = [f"{first.layer.type} '{first.name}' at {first.layer.spec.pos} has it as {fmt(a)}",
                     f"{node.layer.type} '{node.name}' needs {fmt(b)}"]
            if len(a) == 4 and len(b) == 4 and a[1] != b[1] and node.layer.type in ("Convolution", "Deconvolution"):
                notes += [producer_note(g, first.bottoms[0], first.layer.bottom_shapes[0]),
                          producer_note(g, node.bottoms[0], node.layer.bottom_shapes[0])]
                c.error("E0304", f"shared filter '{spec.name}' has depth {a[1]} in '{first.name}' but '{node.name}' "
                        f"needs depth {b[1]}: their inputs differ in depth", spec.pos("name"), notes=notes,
                        help="a filter spans its input's full depth; share filters only between layers whose "
                             "inputs have the same depth, or give this param its own name")
            else:
                c.error("E0304", f"shared param '{spec.name}' is {fmt(a)} in '{first.name}' but {fmt(b)} in "
                        f"'{node.name}'", spec.pos("name"), notes=notes,
                        help="make both layers' num_output and inputs agree, or give this param its own name")


def _count(s: Shape):
    n = 1
    for d in s:
        if d is None:
            return None
        n *= d
    return n


def check_param_specs(g: Graph, c: Collector) -> None:
    for node in g.nodes:
        n_params = len(node.layer.param_shapes)
        if len(node.param_specs) > n_params and node.layer.top_shapes:
            c.error("E0306", f"layer '{node.name}' has {len(node.param_specs)} `param {{ }}` blocks but "
                    f"{node.layer.type} has {n_params} learnable blobs",
                    node.param_specs[n_params].pos() or node.layer.spec.pos,
                    help=f"remove the extra `param {{ }}` blocks (keep {n_params})"
                         + (" or set bias_term: true" if n_params == 1 else ""))


def check_weights(g: Graph, weights: dict, path: str, c: Collector) -> None:
    """Loaded weights (`<layer>/<i>` arrays) must match the net's param shapes, filter depth first."""
    for node in g.nodes:
        layer = node.layer
        for i, shape in enumerate(layer.param_shapes):
            key = f"{layer.name}/{i}"
            if key not in weights or None in shape:
                continue
            have = tuple(weights[key].shape)
            if have == tuple(shape):
                continue
            notes = [f"{path} has {key} as {fmt(have)}; the net needs {fmt(shape)}"]
            if layer.type == "Convolution" and i == 0 and len(have) == 4 and have[1] != shape[1]:
                notes.append(producer_note(g, node.bottoms[0], layer.bottom_shapes[0]))
                c.error("E0301", f"Convolution '{layer.name}': the loaded filters have depth {have[1]} but the input "
                        f"depth is {shape[1] * layer.p.group}" + (f" / group {layer.p.group}" if layer.p.group > 1
                                                                  else ""), layer.spec.pos, notes=notes,
                        help=f"the weights were trained on a {have[1] * layer.p.group}-deep input: restore that "
                             "input, or rename the layer to learn it from scratch")
            elif layer.type == "InnerProduct" and i == 0 and have[0] == shape[0]:
                c.error("E0311", f"InnerProduct '{layer.name}': the loaded weights expect {have[-1 if not layer.p.transpose else 0]} "
                        f"inputs per sample but the net gives {shape[1]}", layer.spec.pos,
                        notes=notes + [producer_note(g, node.bottoms[0], layer.bottom_shapes[0])],
                        help="the input resolution or an upstream num_output changed since training: restore it, "
                             "or rename the layer to learn it from scratch")
            else:
                c.error("E0305", f"cannot load param {i} of {layer.type} '{layer.name}': shape mismatch",
                        layer.spec.pos, notes=notes,
                        help="to learn this layer from scratch rather than load it, rename the layer"
                             + (f" (or set num_output: {have[0]})" if have[1:] == tuple(shape[1:]) else ""))


def check_usage(g: Graph, c: Collector) -> None:
    """Warnings: tops nobody reads (but that are not net outputs by design); layers with params
    whose outputs reach no loss in TRAIN."""
    last = g.nodes[-1] if g.nodes else None
    for node in g.nodes:
        layer = node.layer
        if layer.is_loss or layer.type in ("Accuracy", "Silence") or node is last:
            continue
        for user, top in zip(layer.spec.tops, node.tops):
            if g.consumers.get(top):
                continue
            if layer.is_data or any(g.consumers.get(t) for t in node.tops):
                c.warning("W0701", f"top '{user}' of {layer.type} '{layer.name}' is never used", layer.spec.pos,
                          help=f"feed it to a layer, or pass it to a Silence layer to make that explicit")
    if g.phase != "TRAIN":
        return
    reaches = _reaches_loss(g)
    for node in g.nodes:
        if node.layer.param_shapes and not node.layer.frozen_params and node not in reaches:
            c.warning("W0702", f"{node.layer.type} '{node.name}' reaches no loss: its params get no gradient",
                      node.layer.spec.pos, help="connect its output to a loss, or freeze it with param { lr_mult: 0 }")


def _reaches_loss(g: Graph) -> set:
    reach = set()
    for node in reversed(g.nodes):
        if any(node.loss_weights) or any(c in reach for t in node.tops for c in g.consumers.get(t, [])):
            reach.add(node)
    return reach
