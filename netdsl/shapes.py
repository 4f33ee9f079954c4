"""Infer: Graph -> ShapedGraph. Calls each layer's pure shape rule in order, attaches positions and
producer notes to every ShapeError, fills data tops from --shape hints. The result is a value:
blob shapes, and per node its bottom, top and param shapes. Checks that span layers live in
check.py (and, where they concern one layer type, in that type's `check_net`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import Collector, Diagnostic, Pos
from .graph import Graph, Node
from .registry import Layer, Shape, ShapeError, fmt
from .schema import suggest


@dataclass(frozen=True)
class NodeShapes:
    bottoms: tuple[Shape, ...]
    tops: tuple[Shape, ...]
    params: tuple[Shape, ...]


@dataclass(frozen=True)
class ShapedGraph:
    """A checked phase of a net: its graph, the shape of every blob version, and per node (whose
    shape rule succeeded) its shapes. Immutable; any number of Nets can be built from one."""
    graph: Graph
    blobs: MappingProxyType
    nodes: MappingProxyType                 # Node -> NodeShapes
    diagnostics: tuple[Diagnostic, ...] = ()

    def params(self, node: Node) -> tuple[Shape, ...]:
        s = self.nodes.get(node)
        return s.params if s is not None else ()

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


@dataclass
class Inference:
    """Inference in progress (and what the net-level checks read): shapes so far, and the
    diagnostic of each node whose shape rule failed (a later check may replace it)."""
    graph: Graph
    blobs: dict[str, Shape] = field(default_factory=dict)
    nodes: dict[Node, NodeShapes] = field(default_factory=dict)
    failed: dict[Node, Diagnostic] = field(default_factory=dict)

    def upstream(self, node: Node, k: int):
        """The layer that set the size of bottom k of `node`, looking through layers that keep
        their input's shape: (node, its NodeShapes), or None."""
        up = self.graph.producer.get(node.bottoms[k]) if k < len(node.bottoms) else None
        for _ in range(50):
            s = self.nodes.get(up) if up is not None else None
            if s is None:
                return None
            if up.layer.sets_size or not (s.bottoms and s.tops and s.tops[0] == s.bottoms[0] and up.bottoms):
                return up, s
            up = self.graph.producer.get(up.bottoms[0])
        return None

    def freeze(self, diagnostics) -> ShapedGraph:
        return ShapedGraph(self.graph, MappingProxyType(dict(self.blobs)), MappingProxyType(dict(self.nodes)),
                           tuple(diagnostics))


def producer_note(g: Graph, blob: str, shape: Shape) -> str:
    node = g.producer.get(blob)
    who = f" (produced by {node.layer.type} '{node.name}' at {node.layer.spec.pos})" if node else ""
    return f"input '{g.display(blob)}' is {fmt(shape)}{who}"


def infer(g: Graph, hints: dict[str, Shape], c: Collector) -> Inference:
    """Shapes of every blob version; a blob whose producer failed is left out (no cascades)."""
    inf = Inference(g)
    shapes = inf.blobs
    used_hints = set()
    for node in g.nodes:
        layer = node.layer
        if any(b not in shapes for b in node.bottoms):
            continue
        bottoms = [shapes[b] for b in node.bottoms]
        try:
            tops = layer.shape(list(bottoms))
        except ShapeError as e:
            if e.hintable and layer.spec.tops and all(t in hints for t in layer.spec.tops):
                tops = [None] * len(node.tops)          # --shape gives every top
            else:
                _report(inf, node, bottoms, layer.explain(e, lambda k, node=node: inf.upstream(node, k)), c)
                continue
        if layer.shape_from_hints:
            tops = list(tops) + [None] * (len(node.tops) - len(tops))
            for i, user in enumerate(layer.spec.tops):
                if user in hints:
                    tops[i] = hints[user]
                    used_hints.add(user)
            tops = layer.complete(tops)
        reported = False
        for i, (user, top) in enumerate(zip(layer.spec.tops, node.tops)):
            shape = tops[i] if i < len(tops) else None
            bad = bad_dim(shape)
            if bad is not None:
                reported = True
                c.error("E0505", f"the shape of '{user}' ({layer.type} '{layer.name}') has dimension {bad!r}: every "
                        "dimension must be a positive integer below 2^31", layer.spec.record.item_pos("top", i)
                        or layer.spec.pos, notes=[f"the shape is {fmt(tuple(shape))}"],
                        help="fix the shape's dims (input_param, input_dim, --shape), or the num_output that made it")
                continue
            if shape is None and reported:
                continue
            if shape is None:
                reported = True
                c.error("E0502", f"the shape of '{user}' ({layer.type} '{layer.name}') cannot be known without its "
                        "data", layer.spec.record.item_pos("top", i) or layer.spec.pos,
                        notes=[layer.unknown_shape_note()], help=f"pass its shape: {layer.hint_example(i)}")
                continue
            shapes[top] = tuple(shape)
        if all(t in shapes for t in node.tops):
            inf.nodes[node] = NodeShapes(tuple(bottoms), tuple(shapes[t] for t in node.tops),
                                         tuple(tuple(p) for p in layer.param_shapes(bottoms)))
    for name in sorted(set(hints) - used_hints):
        _unused_hint(g, name, hints[name], c)
    return inf


def bad_dim(shape):
    """The first dimension of a shape that no blob can have (<= 0, fractional, >= 2^31), or None."""
    if shape is None:
        return None
    for d in shape:
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 0 < d < 2 ** 31):
            return d
    return None


def _report(inf: Inference, node: Node, bottoms, e: ShapeError, c: Collector) -> None:
    layer, g = node.layer, inf.graph
    notes = list(e.notes) + [producer_note(g, node.bottoms[i], bottoms[i]) for i in e.involves
                             if i < len(node.bottoms)]
    message = e.message if f"'{layer.name}'" in e.message else f"{layer.type} '{layer.name}': {e.message}"
    c.error(e.code, message, error_pos(layer, e), notes=notes, help=e.help)
    inf.failed[node] = c.diagnostics[-1]


def _unused_hint(g: Graph, name: str, dims, c: Collector) -> None:
    """--shape for a blob no data layer produces: point at the closest data top, else the first
    data layer, else the first layer."""
    tops = {g.display(t): (n, i) for n in g.nodes for i, t in enumerate(n.tops)}
    data = {u: v for u, v in tops.items() if v[0].layer.shape_from_hints}
    computed = name in tops and name not in data
    tip = suggest(name, data) if not computed else ""
    target = tops[name] if computed else data.get(tip.split("`")[1]) if tip else next(iter(data.values()), None)
    if target is not None:
        node, i = target
        pos = node.layer.spec.record.item_pos("top", i) or node.layer.spec.pos
    else:
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


def error_pos(layer: Layer, e: ShapeError) -> Pos:
    """A shape error points at the param it names, else at the bottom whose shape is wrong."""
    rec = layer.spec.record
    if e.field is None and e.involves:
        return rec.item_pos("bottom", e.involves[-1]) or layer.spec.pos
    if e.field and "." not in e.field and e.index is not None:
        r = layer.p.record_of(e.field)
        if r is not None and r.count(e.field):
            return r.span(e.field, e.index)
    if e.field and "." in e.field:
        first, *rest = e.field.split(".")
        sub = getattr(layer.p, first, None) if layer.p.has(first) else None
        for name in rest[:-1]:
            sub = getattr(sub, name, None) if sub is not None and sub.has(name) else None
        if sub is not None and sub.count(rest[-1]):
            return sub.span(rest[-1], e.index or 0)
        return layer.pos(first)
    return layer.pos(e.field)
