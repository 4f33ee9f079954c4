"""Infer: Graph -> shapes of every blob and param. Calls each layer's shape rule in order, attaches
positions and producer notes to every ShapeError, then checks what spans layers: --shape hints,
shared params, pinned weights, RPN anchor counts, unused tops and layers that reach no loss."""
from __future__ import annotations

from .errors import Collector
from .graph import Graph, Node
from .registry import Shape, ShapeError, fmt
from .schema import _span, suggest


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
            if e.code == "E0602" and layer.spec.tops and all(t in hints for t in layer.spec.tops):
                tops = [None] * len(node.tops)          # an unknown Python layer: --shape gives every top
            else:
                _report(g, node, e, c)
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
                        "data", _top_pos(layer, i),
                        notes=[_why_unknown(layer)],
                        help=f"pass its shape: {_hint_example(layer, i)}")
                continue
            shapes[top] = tuple(shape)
        if all(t in shapes for t in node.tops):
            layer.top_shapes = [shapes[t] for t in node.tops]
        if layer.type == "Python" and hasattr(layer, "qualname"):
            _python_note(layer, c)
    for name in sorted(set(hints) - used_hints):
        _unused_hint(g, name, hints[name], c)
    return shapes


def _report(g: Graph, node: Node, e: ShapeError, c: Collector) -> None:
    layer = node.layer
    notes = list(e.notes) + [producer_note(g, node.bottoms[i], layer.bottom_shapes[i]) for i in e.involves
                             if i < len(node.bottoms)]
    message = e.message if f"'{layer.name}'" in e.message else f"{layer.type} '{layer.name}': {e.message}"
    c.error(e.code, message, _error_pos(layer, e), notes=notes, help=e.help)
    g.failed[node] = c.diagnostics[-1]


def _unused_hint(g: Graph, name: str, dims, c: Collector) -> None:
    """--shape for a blob no data layer produces: point at the closest data top, else the first
    data layer, else the first layer."""
    from .graph import _field_pos
    tops = {g.display(t): (n, i) for n in g.nodes for i, t in enumerate(n.tops)}
    data = {u: v for u, v in tops.items() if v[0].layer.is_data or v[0].layer.type == "Python"}
    computed = name in tops and name not in data
    tip = suggest(name, data) if not computed else ""
    target = tops[name] if computed else data.get(tip.split("`")[1]) if tip else next(iter(data.values()), None)
    if target is not None:
        node, i = target
        pos = _field_pos(node.layer.spec.record, "top", i) or node.layer.spec.pos
    else:
        from .errors import Pos
        pos = g.nodes[0].layer.spec.pos if g.nodes else Pos(g.file, 1, 1)
    if computed:
        node = tops[name][0]
        c.error("E0503", f"--shape {name}: '{name}' is computed by {node.layer.type} '{node.name}', not read from "
                "data", pos, notes=["--shape gives the shape of a data layer's top; other shapes follow from it"],
                help=f"remove --shape {name}=..." + (f"; data blobs here: {', '.join(sorted(data))}" if data else ""))
        return
    c.error("E0503", f"--shape {name}: no data blob '{name}' in the {g.phase} net", pos,
            notes=[f"data blobs here: {', '.join(sorted(data)) or 'none'}"],
            help=(f"did you mean `--shape {tip.split('`')[1]}={','.join('?' if d is None else str(d) for d in dims)}`?"
                  if tip else
                  "--shape sets the shape of a data layer's top; remove it"))


def _error_pos(layer, e: ShapeError):
    """A shape error points at the param it names, else at the bottom whose shape is wrong."""
    from .graph import _field_pos
    if e.field is None and e.involves:
        return _field_pos(layer.spec.record, "bottom", e.involves[-1]) or layer.spec.pos
    if e.field and "." not in e.field and e.index is not None:
        for r in getattr(layer.p, "_records", []):
            if r.has(e.field) and r._ast is not None:
                fields = r._ast.get(e.field)
                if fields:
                    return _span(fields[min(e.index, len(fields) - 1)])
    if e.field and "." in e.field:
        first, *rest = e.field.split(".")
        rec = getattr(layer.p, first, None) if layer.p.has(first) else None
        for name in rest[:-1]:
            rec = getattr(rec, name, None) if rec is not None and rec.has(name) else None
        if rec is not None and rec._ast is not None:
            fields = rec._ast.get(rest[-1])
            if fields:
                f = fields[min(e.index or 0, len(fields) - 1)]
                return _span(f)
        return layer.pos(first)
    return layer.pos(e.field)


def _top_pos(layer, i: int):
    from .graph import _field_pos
    return _field_pos(layer.spec.record, "top", i) or layer.spec.pos


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
            at = layer.spec.record.pos("name") or layer.spec.pos          # weights are matched by layer name
            if layer.type == "Convolution" and i == 0 and len(have) == 4 and have[1] != shape[1]:
                notes.append(producer_note(g, node.bottoms[0], layer.bottom_shapes[0]))
                c.error("E0301", f"Convolution '{layer.name}': the loaded filters have depth {have[1]} but the input "
                        f"depth is {shape[1] * layer.p.group}" + (f" / group {layer.p.group}" if layer.p.group > 1
                                                                  else ""), at, notes=notes,
                        help=f"the weights were trained on a {have[1] * layer.p.group}-deep input: restore that "
                             "input, or rename the layer to learn it from scratch")
            elif layer.type == "InnerProduct" and i == 0 and have[0] == shape[0]:
                c.error("E0311", f"InnerProduct '{layer.name}': the loaded weights expect {have[-1 if not layer.p.transpose else 0]} "
                        f"inputs per sample but the net gives {shape[1]}", at,
                        notes=notes + [producer_note(g, node.bottoms[0], layer.bottom_shapes[0])],
                        help="the input resolution or an upstream num_output changed since training: restore it, "
                             "or rename the layer to learn it from scratch")
            else:
                only_m = have[1:] == tuple(shape[1:]) and layer.p.has("num_output")
                c.error("E0305", f"cannot load param {i} of {layer.type} '{layer.name}': shape mismatch",
                        layer.pos("num_output") if only_m else at, notes=notes,
                        help="to learn this layer from scratch rather than load it, rename the layer"
                             + (f" (or set num_output: {have[0]})" if have[1:] == tuple(shape[1:]) else ""))


def check_usage(g: Graph, c: Collector) -> None:
    """Warnings: tops nobody reads (but that are not net outputs by design); layers with params
    whose outputs reach no loss in TRAIN."""
    from .graph import _field_pos
    last = g.nodes[-1] if g.nodes else None
    for node in g.nodes:
        layer = node.layer
        if layer.is_loss or layer.type in ("Accuracy", "Silence") or node is last:
            continue
        for i, (user, top) in enumerate(zip(layer.spec.tops, node.tops)):
            if g.consumers.get(top):
                continue
            if layer.is_data or any(g.consumers.get(t) for t in node.tops):
                c.warning("W0701", f"top '{user}' of {layer.type} '{layer.name}' is never used",
                          _field_pos(layer.spec.record, "top", i) or layer.spec.pos,
                          notes=[f"the other tops of '{layer.name}' are read, so this one looks forgotten"]
                          if len(node.tops) > 1 else [],
                          help=f"feed it to a layer, or pass it to a Silence layer to make that explicit "
                               f'(`layer {{ type: "Silence" bottom: "{user}" }}`)')
    if g.phase != "TRAIN":
        return
    reaches = _reaches_loss(g)
    for node in g.nodes:
        learned = [i for i, _ in enumerate(node.layer.param_shapes)
                   if not (i < len(node.param_specs) and node.param_specs[i].lr_mult == 0)]
        if learned and not node.layer.frozen_params and node not in reaches:
            c.warning("W0702", f"{node.layer.type} '{node.name}' reaches no loss: its params get no gradient",
                      node.layer.spec.record.pos("type") or node.layer.spec.pos,
                      notes=[(f"nothing that reads its output{'s' if len(node.tops) > 1 else ''} "
                              f"({', '.join(repr(t) for t in node.layer.spec.tops)}) leads to a loss layer")],
                      help="connect its output to a loss, or freeze it with `param { lr_mult: 0 }` (one per param)")


def _reaches_loss(g: Graph) -> set:
    reach = set()
    for node in reversed(g.nodes):
        if any(node.loss_weights) or any(c in reach for t in node.tops for c in g.consumers.get(t, [])):
            reach.add(node)
    return reach


# ------------------------------------------------------------------------------ RPN anchors
# py-faster-rcnn hard-codes the anchor count A = len(scales) x len(ratios) in three places of a
# prototxt besides the anchor layers' own params: num_output 2A of the score head, 4A of the box
# head, and the Reshape that turns the 2-class softmax view (1 x 2 x A*H x W) back into
# 1 x 2A x H x W (`dim: 0 dim: 18 dim: -1 dim: 0`). Changing the scales breaks all three; each
# layer's own shape rule sees only the first symptom, so this pass walks from every AnchorTarget
# and Proposal input back to the heads and reports every place to edit, with its right number.

_KEEPS_LAYOUT = {"ReLU", "Sigmoid", "TanH", "Softmax", "Dropout", "BatchNorm", "Scale", "Power", "Split"}


def _anchor_layer(layer):
    """(A, "n scales x m ratios", where they are set, kind) for AnchorTarget / Proposal layers,
    built in or py-faster-rcnn's Python layers."""
    from .layers.rpn import DEFAULT_RATIOS, KNOWN_PYTHON
    if layer.type in ("AnchorTarget", "Proposal"):
        how = f"{len(layer.scales())} scales x {len(layer.ratios())} ratios"
        pos = layer.p.pos("scales") or layer.p.pos("ratios") or layer.spec.pos
        return layer.num_anchors(), how, pos, layer.type
    if layer.type == "Python" and KNOWN_PYTHON.get(layer.qualname()) in ("AnchorTarget", "Proposal"):
        how = f"{len(layer.anchor_scales())} scales x {len(DEFAULT_RATIOS)} ratios"
        return layer.num_anchors(), how, layer.p.pos("param_str") or layer.spec.pos, KNOWN_PYTHON[layer.qualname()]
    return None


def _who(node, kind: str) -> str:
    if node.layer.type == "Python":
        return f"Python layer '{node.name}' (py-faster-rcnn's {kind}Layer)"
    return f"{kind} '{node.name}'"


def _anchor_note(reached) -> str:
    """'A = 4 scales x 3 ratios = 12 anchors per cell, set by AnchorTarget 'x' at f:1:2 and ...'"""
    seen = {}
    for r in reached:
        seen.setdefault(r[0].name, r)
    a, how = reached[0][1], reached[0][2]
    who = " and ".join(f"{_who(r[0], r[4])} at {r[3]}" for name, r in seen.items())
    return f"A = {how} = {a} anchors per cell, set by {who}"


def _trace_head(g: Graph, blob: str):
    """Walk back from a blob through Reshapes and layout-keeping layers to the convolution that
    made it: (conv node or None, the nodes passed, nearest first)."""
    chain = []
    node = g.producer.get(blob)
    while node is not None and len(chain) < 32:
        t = node.layer.type
        if t == "Convolution":
            return node, chain
        if t != "Reshape" and t not in _KEEPS_LAYOUT or not node.bottoms:
            return None, chain
        chain.append(node)
        node = g.producer.get(node.bottoms[0])
    return None, chain


def _channel_dim(node):
    """(index into reshape_param.shape.dim, value) of the dim that sets a Reshape's axis 1."""
    p = node.layer.p
    dims = list(p.shape.dim)
    k = 1 - p.axis if p.axis >= 0 else None
    if k is None or not 0 <= k < len(dims):
        return None
    return k, dims[k]


def _anchor_disagreement(g: Graph, anchors, c: Collector) -> None:
    """Anchor layers with different A: blame the ones the score head disagrees with."""
    implied = set()
    for node, *_ in anchors:
        conv, _ = _trace_head(g, node.bottoms[0]) if node.bottoms else (None, [])
        if conv is not None and conv.layer.p.num_output and conv.layer.p.num_output % 2 == 0:
            implied.add(conv.layer.p.num_output // 2)
    heads = implied.pop() if len(implied) == 1 else None
    agree = [x for x in anchors if x[1] == heads]
    odd = [x for x in anchors if x[1] != heads] if agree else anchors[1:]
    ref = agree[0] if agree else anchors[0]
    for x in odd:
        if x[1] == ref[1]:
            continue
        others = _who(ref[0], ref[4]) + (" and the RPN heads" if agree else "")
        c.error("E0375", f"{_who(x[0], x[4])} uses {x[1]} anchors per cell, but {others} use {ref[1]}", x[3],
                notes=[f"{_who(y[0], y[4])}: A = {y[2]} = {y[1]} (at {y[3]})" for y in (ref, x)],
                help=f"give {_who(x[0], x[4])} the same scales and ratios as {_who(ref[0], ref[4])} "
                     f"({ref[2]}), or change every anchor layer and the heads together")
        if x[0] in g.failed and g.failed[x[0]].code == "E0371":      # the same mismatch, said better
            c.diagnostics[:] = [d for d in c.diagnostics if d is not g.failed[x[0]]]


def _anchor_places(g: Graph):
    """The anchor layers of a graph, and every place that hard-codes their count A."""
    anchors = []                                   # (node, A, how, pos, kind)
    for node in g.nodes:
        info = _anchor_layer(node.layer)
        if info is not None:
            anchors.append((node, *info))
    # place -> {"kind", "node", "per", "role", "reached": [(anchor node, A, how, pos, kind, target, via)]}
    places: dict = {}

    def add(key, reach, **kw):
        places.setdefault(key, {**kw, "reached": []})["reached"].append(reach)

    for node, a, how, apos, kind in anchors:
        who = _who(node, kind)
        heads = [(node.bottoms[0], 2, "score head", f"{who} (bottom 0)")] if node.bottoms else []
        if kind == "Proposal" and len(node.bottoms) > 1:
            heads.append((node.bottoms[1], 4, "box head", f"{who} (bottom 1)"))
        if kind == "AnchorTarget":
            for top in node.tops[1:2]:                  # the box targets meet the box head in the box loss
                for user in g.consumers.get(top, []):
                    if user.bottoms and user.bottoms[0] != top:
                        heads.append((user.bottoms[0], 4, "box head",
                                      f"{user.layer.type} '{user.name}', next to the box targets of {who}"))
        for blob, per, role, target in heads:
            conv, chain = _trace_head(g, blob)
            if conv is not None:
                add(("conv", conv), (node, a, how, apos, kind, target, chain), kind="conv", node=conv, per=per,
                    role=role)
            if per == 2:
                reshapes = [n for n in chain if n.layer.type == "Reshape"]
                for r in reshapes[0::2]:                # these give the 1 x 2A x H x W layout
                    if _channel_dim(r) is not None:
                        add(("reshape", r), (node, a, how, apos, kind, target, chain[:chain.index(r)]),
                            kind="reshape", node=r, per=2, role=role)
    return anchors, places


def check_anchors(g: Graph, c: Collector, others: tuple[Graph, ...] = ()) -> None:
    """The RPN pass. `others` are the same file's graphs in its other phases: a place to edit that
    only they contain (the Reshape before a TEST-only Proposal) is reported too, so one check
    lists every edit."""
    anchors, places = _anchor_places(g)
    if not anchors:
        return
    if len({x[1] for x in anchors}) > 1:
        _anchor_disagreement(g, anchors, c)
    here = {pl["node"].layer.spec.pos for pl in places.values()}
    reported = _report_places(g, places, c)
    # the errors the shape rules raised for the same mismatch are now explained better: drop them
    stale = [g.failed[n] for n in reported if n in g.failed and g.failed[n].code in ("E0371", "E0341", "E0340",
                                                                                   "E0374", "E0360")]
    if stale:
        c.diagnostics[:] = [d for d in c.diagnostics if not any(d is s for s in stale)]
    for other in others:
        more = {k: pl for k, pl in _anchor_places(other)[1].items() if pl["node"].layer.spec.pos not in here}
        here |= {pl["node"].layer.spec.pos for pl in more.values()}
        _report_places(other, more, c, note=f"layer '{{}}' is only in the {other.phase} net (checked here too, so "
                                            "that every place to edit is listed)")


def _report_places(g: Graph, places: dict, c: Collector, note: str | None = None) -> set:
    reported = set()
    for pl in places.values():
        wanted = {pl["per"] * r[1] for r in pl["reached"]}
        if len(wanted) != 1:
            continue                                    # the anchor layers disagree: E0375 says so
        want = wanted.pop()
        a = want // pl["per"]
        node = pl["node"]
        notes = [_anchor_note(pl["reached"])] + ([note.format(node.name)] if note else [])
        for *_, target, via in pl["reached"][:2]:
            notes.append(f"its output reaches {target}"
                         + (f" through {', '.join(repr(n.name) for n in reversed(via))}" if via else ""))
        if pl["kind"] == "conv":
            have = node.layer.p.num_output
            if have == want:
                continue
            what = ("background and foreground scores" if pl["per"] == 2 else "box deltas dx, dy, dw, dh")
            c.error("E0371", f"Convolution '{node.name}' (the RPN {pl['role']}) has num_output {have}, but "
                    f"{pl['per']} x {a} anchors = {want} are needed", node.layer.pos("num_output"), notes=notes,
                    help=f"set `num_output: {want}` ({pl['per']} {what} per anchor)")
        else:
            k, have = _channel_dim(node)
            if have <= 0 or have == want:
                continue
            dims = node.layer.p.shape
            fields = dims._ast.get("dim") if dims._ast is not None else []
            pos = _span(fields[k]) if k < len(fields) else node.layer.pos("shape")
            c.error("E0371", f"Reshape '{node.name}' gives the RPN scores {have} channels, but 2 x {a} anchors = "
                    f"{want} are needed", pos,
                    notes=[*notes, "it turns the 2-class softmax view (1 x 2 x A*H x W) back into 1 x 2A x H x W"],
                    help=f"set `dim: {want}` (2 x {a} anchors)")
        reported.add(node)
        for r in pl["reached"]:
            reported.add(r[0])
            reported.update(r[6])
        reported.update(n for r in places.get(("conv", node), {"reached": []})["reached"] for n in r[6])
    return reported
    # the errors the shape rules raised for the same mismatch are now explained better: drop them
    stale = [g.failed[n] for n in reported if n in g.failed and g.failed[n].code in ("E0371", "E0341", "E0340",
                                                                                   "E0374", "E0360")]
    if stale:
        c.diagnostics[:] = [d for d in c.diagnostics if not any(d is s for s in stale)]
