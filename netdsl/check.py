"""The checker: file -> parsed, built and shape-inferred graph (a ShapedGraph) with every
diagnostic, and the checks that span layers: param specs, shared params, loaded weights, unused
tops and layers reaching no loss. Checks that concern one layer type are its `check_net`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import graph as graph_mod
from . import shapes as shapes_mod
from .errors import Collector, NetdslError
from .graph import Graph
from .registry import fmt, layer_type_with
from .shapes import Inference, ShapedGraph, producer_note
from .syntax import Message, parse_file, paused_gc
from .weights import Weights, read_weights


@dataclass
class Checking:
    """What net-level checks read (a layer type's `check_net` included): the graph, inference so
    far, the collector, and the same file's graph in the other phase, built when first asked."""
    graph: Graph
    inference: Inference
    c: Collector
    _other: Callable[[], Graph]
    _done: set = field(default_factory=set)

    def once(self, key: str) -> bool:
        """True the first time a check named `key` asks (a pass shared by several layer types)."""
        first = key not in self._done
        self._done.add(key)
        return first

    def other_phase(self) -> Graph:
        if not isinstance(self._other, Graph):
            self._other = self._other()
        return self._other


@paused_gc()
def check(ast: Message, phase: str = "TRAIN", stages=(), level: int = 0, hints: dict | None = None,
          weights: str | None = None) -> ShapedGraph:
    """Build and shape-check one phase; raises Errors with every diagnostic when any is an error."""
    c = Collector()
    phase, stages = phase.upper(), tuple(stages)
    if phase not in ("TRAIN", "TEST"):
        raise NetdslError("E0000", f"unknown phase {phase!r}", help='use "train" or "test"')
    for blob, dims in (hints or {}).items():
        if not isinstance(dims, (tuple, list)) or shapes_mod.bad_dim(dims) is not None:
            raise NetdslError("E0504", f"the shape given for '{blob}' is {dims!r}: a shape is a tuple of positive "
                              "integers (None for a dimension known only at run time)",
                              help=f"e.g. shapes={{{blob!r}: (64, 3, 227, 227)}}")
    g = graph_mod.build(ast, phase, stages, level, c)
    inf = shapes_mod.infer(g, dict(hints or {}), c)
    check_param_specs(inf, c)
    check_shared_params(inf, c)
    check_duplicate_names(inf, c)
    other = "TEST" if phase == "TRAIN" else "TRAIN"
    checking = Checking(g, inf, c, lambda: graph_mod.build(ast, other, stages, level, Collector()))
    for cls in dict.fromkeys(type(n.layer) for n in g.nodes):
        cls.check_net(checking)
    if weights:
        expect = {n.layer.name: list(sh.params) for n, sh in inf.nodes.items() if sh.params}
        check_weights(inf, read_weights(weights, expect), c)
    if not c.errors:
        check_usage(inf, c)
    c.raise_if_errors()
    return inf.freeze(sorted(c.diagnostics, key=lambda d: (d.pos.line, d.pos.column) if d.pos else (0, 0)))


def check_file(path: str, **kw) -> ShapedGraph:
    return check(parse_file(path), **kw)


def is_solver(ast: Message) -> bool:
    """A solver file sets solver fields (base_lr, net, ...) and has no layers."""
    return bool({f.name for f in ast.fields} & graph_mod.SOLVER_FIELDS) and not ast.get("layer") \
        and not ast.get("layers")


def check_path(path: str, phase: str | None = None, **kw) -> tuple[ShapedGraph, str, str]:
    """`netdsl check PATH`: a net, or a solver whose net is then checked. Returns the result, the
    net file checked and its phase. A net's phase defaults to TEST (Caffe's NetState default);
    a solver's to TRAIN (the phase its train net runs in; TEST checks its first test net)."""
    ast = parse_file(path)
    if not is_solver(ast):
        phase = (phase or "TEST").upper()
        return check(ast, phase=phase, **kw), path, phase
    from .solverfile import load_solver
    try:
        sf = load_solver(path)                  # validates the solver; locates every problem
    except NetdslError as e:
        raise _relative_paths(e) from None
    phase = (phase or "TRAIN").upper()
    if phase == "TRAIN" or not sf.test_nets:
        (net_path, inline), state = sf.train_net, sf.cfg.train_state
    else:
        (net_path, inline), state = sf.test_nets[0], (sf.cfg.test_state[0] if sf.cfg.test_state else None)
    net_path = _shown(net_path)
    key = next((k for k in ("net", "train_net", "net_param", "train_net_param") if sf.record.has(k)), "net")
    where = (f"checked as the {'train' if phase == 'TRAIN' else 'test'} net of solver {path} "
             f"(`{key}` at {sf.record.pos(key)})")
    if state is not None and not kw.get("stages") and not kw.get("level"):
        kw = {**kw, "stages": tuple(state.stage), "level": state.level}
    try:
        net_ast = inline if inline is not None else parse_file(net_path)
        return check(net_ast, phase=phase, **kw), net_path, phase
    except NetdslError as e:
        for d in e.diagnostics:
            if d.severity == "error":
                d.notes.append(where)
        raise


def _shown(path: str) -> str:
    """A path as diagnostics show it: relative to the working directory when it lies below it."""
    import os
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _relative_paths(e: NetdslError) -> NetdslError:
    """Polish load_solver's diagnostics: its "net not found" note lists absolute directories (show
    them relative to the working directory, as file names are), and a did-you-mean is said once."""
    import os
    for d in e.diagnostics:
        if d.code == "E0702" and "; did you mean" in d.message and d.help and "did you mean" in d.help:
            d.message = d.message.split("; did you mean")[0]
        if d.code == "E0704":
            dirs = [os.path.dirname(os.path.abspath(d.pos.file)) if d.pos else None, os.getcwd()]
            shown = list(dict.fromkeys(os.path.relpath(x) for x in dirs if x))
            d.notes = [f"looked in {' and '.join(shown)}" + (" (the solver's directory and the working directory)"
                                                            if len(shown) > 1 else
                                                            " (the solver's directory, the working directory)")]
    return e


# ------------------------------------------------------------------------- net-level checks

def check_param_specs(inf: Inference, c: Collector) -> None:
    for node, shapes in inf.nodes.items():
        n_params = len(shapes.params)
        if len(node.param_specs) > n_params:
            c.error("E0306", f"layer '{node.name}' has {len(node.param_specs)} `param {{ }}` blocks but "
                    f"{node.layer.type} has {n_params} learnable blobs",
                    node.param_specs[n_params].pos() or node.layer.spec.pos,
                    help=f"remove the extra `param {{ }}` blocks (keep {n_params})"
                         + (" or set bias_term: true" if n_params == 1 else ""))


def check_duplicate_names(inf: Inference, c: Collector) -> None:
    """Weights are saved and copied by layer name: two layers with params may not share a name
    (the graph warns, W0201, about other duplicates)."""
    first: dict[str, object] = {}
    for node, shapes in inf.nodes.items():
        if not shapes.params:
            continue
        other = first.setdefault(node.name, node)
        if other is not node:
            c.error("E0214", f"two layers with params are named '{node.name}'", node.layer.spec.record.pos("name")
                    or node.layer.spec.pos, notes=[f"the other is {other.layer.type} '{other.name}' at {other.layer.spec.pos}",
                                                   "weights are saved, loaded and copied by layer name"],
                    help="give each layer a unique name (share a param by naming it: `param { name: \"w\" }`)")


def check_shared_params(inf: Inference, c: Collector) -> None:
    """Layers sharing a param by name must agree on its shape (STRICT) or count (PERMISSIVE)."""
    g = inf.graph
    owners: dict[str, tuple] = {}
    for node, shapes in inf.nodes.items():
        for i, spec in enumerate(node.param_specs[:len(shapes.params)]):
            if not spec.name:
                continue
            if spec.name not in owners:
                owners[spec.name] = (node, i)
                continue
            first, j = owners[spec.name]
            a, b = inf.nodes[first].params[j], shapes.params[i]
            same = a == b if spec.share_mode == "STRICT" else _count(a) == _count(b)
            if same:
                continue
            notes = [f"{first.layer.type} '{first.name}' at {first.layer.spec.pos} has it as {fmt(a)}",
                     f"{node.layer.type} '{node.name}' needs {fmt(b)}"]
            ax = node.layer.filter_depth_axis
            if i == 0 and ax is not None and len(a) == len(b) > ax and a[ax] != b[ax]:
                notes += [producer_note(g, first.bottoms[0], inf.nodes[first].bottoms[0]),
                          producer_note(g, node.bottoms[0], shapes.bottoms[0])]
                c.error("E0304", f"shared filter '{spec.name}' has depth {a[ax]} in '{first.name}' but '{node.name}' "
                        f"needs depth {b[ax]}: their inputs differ in depth", spec.pos("name"), notes=notes,
                        help="a filter spans its input's full depth; share filters only between layers whose "
                             "inputs have the same depth, or give this param its own name")
            else:
                c.error("E0304", f"shared param '{spec.name}' is {fmt(a)} in '{first.name}' but {fmt(b)} in "
                        f"'{node.name}'", spec.pos("name"), notes=notes,
                        help="make both layers' num_output and inputs agree, or give this param its own name")


def _count(s):
    n = 1
    for d in s:
        if d is None:
            return None
        n *= d
    return n


def check_weights(inf: Inference, weights: Weights, c: Collector) -> None:
    """Loaded weights must match the net's params as Caffe copies them (by layer name; blob count
    and shapes, legacy 4-D blobs allowed); a layer may explain a mismatch better (a filter's depth,
    an InnerProduct's input size)."""
    path = weights.path
    for node, shapes in inf.nodes.items():
        layer = node.layer
        blobs = weights.layers.get(layer.name)
        if blobs is None or not shapes.params:
            continue
        at = layer.spec.record.pos("name") or layer.spec.pos          # weights are matched by layer name
        if weights.whole_layers and len(blobs) != len(shapes.params) or len(blobs) > len(shapes.params):
            c.error("E0305", f"{layer.type} '{layer.name}' has {len(shapes.params)} param blobs but {path} has "
                    f"{len(blobs)} for it", at,
                    notes=[f"in the file: {', '.join(fmt(b.shape) for b in blobs if b is not None)}"],
                    help="check bias_term (and the layer type), or rename the layer to learn it from scratch")
            continue
        for i, shape in enumerate(shapes.params):
            if None in shape or i >= len(blobs) or blobs[i] is None or weights.fit(layer.name, i, tuple(shape)) is not None:
                continue
            have = tuple(blobs[i].shape)
            notes = [f"{path} has {layer.name}/{i} as {fmt(have)}; the net needs {fmt(shape)}"]
            e = layer.explain_weights(i, have, shape)
            if e is not None:
                notes += e.notes + [producer_note(inf.graph, node.bottoms[0], shapes.bottoms[0])]
                c.error(e.code, e.message, at, notes=notes, help=e.help)
                continue
            only_m = have[1:] == tuple(shape[1:]) and layer.p.has("num_output")
            c.error("E0305", f"cannot load param {i} of {layer.type} '{layer.name}': shape mismatch",
                    layer.pos("num_output") if only_m else at, notes=notes,
                    help="to learn this layer from scratch rather than load it, rename the layer"
                         + (f" (or set num_output: {have[0]})" if have[1:] == tuple(shape[1:]) else ""))


def check_usage(inf: Inference, c: Collector) -> None:
    """Warnings: tops nobody reads (but that are not net outputs by design); layers with params
    whose outputs reach no loss in TRAIN."""
    g = inf.graph
    last = g.nodes[-1] if g.nodes else None
    for node in g.nodes:
        layer = node.layer
        if layer.is_loss or layer.is_sink or node is last:
            continue
        for i, (user, top) in enumerate(zip(layer.spec.tops, node.tops)):
            if g.consumers.get(top):
                continue
            if layer.is_data or any(g.consumers.get(t) for t in node.tops):
                c.warning("W0701", f"top '{user}' of {layer.type} '{layer.name}' is never used",
                          layer.spec.record.item_pos("top", i) or layer.spec.pos,
                          notes=[f"the other tops of '{layer.name}' are read, so this one looks forgotten"]
                          if len(node.tops) > 1 else [],
                          help=f"feed it to a layer, or pass it to a Silence layer to make that explicit "
                               f'(`layer {{ type: "{layer_type_with("silences")}" bottom: "{user}" }}`)')
    if g.phase != "TRAIN":
        return
    reaches = _reaches_loss(g)
    for node, shapes in inf.nodes.items():
        learned = [i for i, _ in enumerate(shapes.params)
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
