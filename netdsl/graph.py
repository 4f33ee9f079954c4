"""Build: AST -> Graph. Phase/stage/level filtering, layer instantiation, in-place tops renamed to
fresh versions (conv1 -> conv1#2) so every blob has one producer; arity, unknown-bottom,
duplicate-top, order/cycle, loss-weight, propagate_down and no-loss checks."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import Collector, Pos
from .registry import BLOB_SHAPE, STATE_RULE, Layer, LayerSpec, layer_parameter_schema, layer_types
from .schema import F, Msg, Record, suggest
from .syntax import Message

NET_STATE = Msg("NetState", {"phase": F("enum", "TEST", choices=("TRAIN", "TEST")), "level": F(int, 0),
                             "stage": F(str, repeated=True)})
SOLVER_FIELDS = {"base_lr", "lr_policy", "max_iter", "net", "train_net", "test_iter", "solver_type", "type",
                 "snapshot_prefix", "momentum", "weight_decay", "display", "test_interval"}


def net_schema() -> Msg:
    return Msg("NetParameter", {
        "name": F(str, ""), "layer": F(layer_parameter_schema(), repeated=True),
        "input": F(str, repeated=True), "input_shape": F(BLOB_SHAPE, repeated=True),
        "input_dim": F(int, repeated=True), "force_backward": F(bool, False), "debug_info": F(bool, False),
        "state": F(NET_STATE)})


@dataclass(eq=False)
class Node:
    """One layer in the graph with its bottoms and tops renamed to SSA blob versions."""
    layer: Layer
    bottoms: list[str]                    # blob versions read
    tops: list[str]                       # blob versions written
    loss_weights: list[float]
    propagate_down: list[bool]
    param_specs: list[Record]             # ParamSpec per param (may be fewer than params)

    @property
    def name(self) -> str:
        return self.layer.name


@dataclass
class Graph:
    name: str
    phase: str
    file: str
    nodes: list[Node]
    producer: dict[str, Node]             # blob version -> node that writes it
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    blob_pos: dict[str, Pos] = field(default_factory=dict)
    force_backward: bool = False

    def display(self, blob: str) -> str:
        """The name the user wrote (conv1#2 -> conv1)."""
        return blob.split("#", 1)[0]

    @property
    def outputs(self) -> list[str]:
        return [t for n in self.nodes for t in n.tops if not self.consumers.get(t)]


def _rule_matches(rule: Record, phase: str, level: int, stages: set[str]) -> bool:
    if rule.phase is not None and rule.phase != phase:
        return False
    if rule.min_level is not None and level < rule.min_level:
        return False
    if rule.max_level is not None and level > rule.max_level:
        return False
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def included(rec: Record, phase: str, level: int, stages: set[str]) -> bool:
    """Caffe's StateMeetsRule: included if any include rule matches (none: yes); excluded if any
    exclude rule matches."""
    if rec.include:
        return any(_rule_matches(r, phase, level, stages) for r in rec.include)
    return not any(_rule_matches(r, phase, level, stages) for r in rec.exclude)


def build(ast: Message, phase: str = "TRAIN", stages: tuple[str, ...] = (), level: int = 0,
          c: Collector | None = None) -> Graph:
    """Build the graph of one phase. All problems go to the collector (raise with raise_if_errors)."""
    c = c if c is not None else Collector()
    file = ast.pos.file
    solver_keys = {f.name for f in ast.fields} & SOLVER_FIELDS
    if solver_keys and not ast.get("layer"):
        c.error("E0205", "this is a solver file, not a net", ast.fields[0].pos,
                notes=[f"it sets solver fields ({', '.join(sorted(solver_keys))})"],
                help="check the net it trains (its `net:` field), or run `netdsl train` on it")
        return Graph("", phase, file, [], {})
    if ast.get("layers"):
        c.error("E0206", "V1 `layers { }` blocks (Caffe before 2015) are not supported", ast.get("layers")[0].pos,
                help="upgrade the file with Caffe's upgrade_net_proto_text tool, which writes `layer { }` blocks")
        return Graph("", phase, file, [], {})
    net = net_schema().coerce(ast, c)
    specs = _legacy_inputs(net, c) + _layer_specs(net, c)
    g = Graph(net.name, phase, file, [], {}, force_backward=net.force_backward)
    types = layer_types()
    current: dict[str, str] = {}              # user blob name -> its latest version
    versions: dict[str, int] = {}
    later = {t: s for s in specs for t in s.tops}
    names: dict[str, object] = {}
    for spec in specs:
        rec = spec.record
        if rec.include and rec.exclude:
            c.error("E0203", f"layer '{spec.name}' has both include and exclude rules", rec.pos("exclude"),
                    notes=["Caffe allows one or the other: a layer is either included by rules or excluded by them"],
                    help="keep only the include rules, or only the exclude rules")
            continue
        if not included(rec, phase, level, set(stages)):
            continue
        cls = types.get(spec.type)
        if cls is None:
            _unknown_type(spec, types, c)
            continue
        _foreign_params(spec, cls, c)
        if spec.name and spec.name in names:
            c.warning("W0201", f"layer name '{spec.name}' is used twice in the {phase} net", rec.pos("name"),
                      notes=[f"first used at {names[spec.name]}"],
                      help="give each layer a unique name; weights are saved and loaded by layer name")
        names.setdefault(spec.name, rec.pos("name"))
        layer = cls(spec, phase)
        if not _arity_ok(layer, c):
            continue
        for err in layer.validate():
            c.error(err.code, err.message, layer.pos(err.field), notes=err.notes, help=err.help)
        bottoms = []
        ok = True
        for i, b in enumerate(spec.bottoms):
            if b in current:
                bottoms.append(current[b])
                continue
            ok = False
            _unknown_bottom(spec, i, b, current, later, c)
        tops = []
        for t in spec.tops:
            if t in current and t not in spec.bottoms:
                first = g.producer[current[t]]
                c.error("E0211", f"top '{t}' of layer '{spec.name}' is already produced by layer '{first.name}'",
                        _field_pos(rec, "top", spec.tops.index(t)) or spec.pos,
                        notes=[f"'{t}' is produced by {first.layer.type} '{first.name}' at {first.layer.spec.pos}"],
                        help=f"give this top a new name (e.g. '{spec.name}'), or write it in place by also "
                             f"listing it as a bottom")
                ok = False
                continue
            v = versions.get(t, 0) + 1
            versions[t] = v
            tops.append(t if v == 1 else f"{t}#{v}")
        if not ok:
            for t in spec.tops:      # keep names known so later layers do not cascade errors
                current.setdefault(t, t)
            continue
        node = Node(layer, bottoms, tops, _loss_weights(layer, c), _propagate_down(layer, c), list(rec.param))
        for t_user, t in zip(spec.tops, tops):
            current[t_user] = t
            g.producer[t] = node
            g.blob_pos[t] = spec.pos
        for b in bottoms:
            g.consumers.setdefault(b, []).append(node)
        g.nodes.append(node)
    if phase == "TRAIN" and g.nodes and not any(w for n in g.nodes for w in n.loss_weights) and not c.errors:
        c.error("E0213", f"the TRAIN net '{g.name or file}' has no loss", g.nodes[0].layer.spec.pos,
                notes=["training minimises the weighted sum of loss tops; none is present or all have "
                       "loss_weight 0"],
                help="add a loss layer (e.g. SoftmaxWithLoss with bottoms: scores, label), or check with "
                     "--phase test")
    return g


def _field_pos(rec: Record, name: str, index: int) -> Pos | None:
    fields = rec._ast.get(name) if rec._ast else []
    return fields[index].value.pos if index < len(fields) else None


def _legacy_inputs(net: Record, c: Collector) -> list[LayerSpec]:
    """Caffe's deprecated `input:` + `input_shape`/`input_dim` become one Input layer, as Caffe does."""
    if not net.input:
        return []
    shapes = [list(s.dim) for s in net.input_shape]
    if net.input_dim:
        if len(net.input_dim) % 4:
            c.error("E0501", f"input_dim gives {len(net.input_dim)} values; it needs 4 per input (N, C, H, W)",
                    net.pos("input_dim"), help="give 4 input_dim values per input, or use input_shape { dim: ... }")
            return []
        shapes = [net.input_dim[i:i + 4] for i in range(0, len(net.input_dim), 4)]
    if len(shapes) != len(net.input):
        c.error("E0501", f"{len(net.input)} inputs but {len(shapes)} input shapes", net.pos("input"),
                help="give one input_shape { dim: ... } per `input:`")
        return []
    schema = layer_parameter_schema()
    rec = schema.coerce(None, Collector())
    shape_recs = [BLOB_SHAPE.coerce(None, Collector()) for _ in shapes]
    for r, dims in zip(shape_recs, shapes):
        r._values["dim"] = dims
    rec.input_param._values["shape"] = shape_recs
    return [LayerSpec("input", "Input", [], list(net.input), net.pos("input"), rec)]


def _layer_specs(net: Record, c: Collector) -> list[LayerSpec]:
    specs = []
    for rec in net.layer:
        name = rec.name
        if not rec.has("type"):
            c.error("E0106", f"layer '{name}' has no type", rec.pos(),
                    help='add `type: "Convolution"` (or another layer type)')
            continue
        specs.append(LayerSpec(name, rec.type, list(rec.bottom), list(rec.top), rec.pos(), rec,
                               list(rec.loss_weight), list(rec.propagate_down)))
    return specs


def _unknown_type(spec: LayerSpec, types: dict, c: Collector) -> None:
    close = difflib.get_close_matches(spec.type, list(types), n=3, cutoff=0.5)
    lower = {t.lower(): t for t in types}
    if spec.type.lower() in lower:
        close = [lower[spec.type.lower()]]
    c.error("E0201", f"unknown layer type \"{spec.type}\" (layer '{spec.name}')", spec.record.pos("type"),
            help=(f"did you mean \"{close[0]}\"?" if close else "") +
                 ("" if close else f"known types: {', '.join(sorted(types))}"))


def _foreign_params(spec: LayerSpec, cls: type[Layer], c: Collector) -> None:
    own = set(cls.messages) | {"transform_param", "loss_param"}
    for key in spec.record._pos:
        if key.endswith("_param") and key not in own:
            mine = ", ".join(sorted(cls.messages)) or "no parameters"
            c.warning("W0102", f"{key} has no effect on {spec.type} layer '{spec.name}'", spec.record.pos(key),
                      help=f"{spec.type} reads {mine}; remove {key} or fix the layer type")


def _arity_ok(layer: Layer, c: Collector) -> bool:
    ok = True
    for what, have, (lo, hi) in (("bottom", len(layer.spec.bottoms), layer.n_bottoms),
                                 ("top", len(layer.spec.tops), layer.n_tops)):
        if have < lo or (hi is not None and have > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            c.error("E0202", f"{layer.type} '{layer.name}' takes {want} {what}s, got {have}", layer.spec.pos,
                    help=f"give it {want} `{what}:` fields")
            ok = False
    return ok


def _unknown_bottom(spec, i, b, current, later, c: Collector) -> None:
    pos = _field_pos(spec.record, "bottom", i) or spec.pos
    if b in later:
        producer = later[b]
        cyc = any(t in producer.bottoms for t in spec.tops)
        c.error("E0212", f"layer '{spec.name}' reads '{b}' before layer '{producer.name}' produces it"
                + (" (a cycle)" if cyc else ""), pos,
                notes=[f"'{b}' is produced by {producer.type} '{producer.name}' at {producer.pos}"] +
                      ([f"'{producer.name}' in turn reads '{spec.name}''s output: the graph has a cycle"] if cyc else []),
                help="nets are acyclic and layers run in file order: move this layer after "
                     f"'{producer.name}'" if not cyc else "break the cycle: one of the two must read another blob")
        return
    tip = suggest(b, current)
    c.error("E0210", f"unknown bottom blob '{b}' (layer '{spec.name}', bottom {i})", pos,
            help=tip or (f"known blobs here: {', '.join(sorted(current)) or 'none'}; a bottom must be a top of an "
                         "earlier layer"))


def _loss_weights(layer: Layer, c: Collector) -> list[float]:
    n, given = len(layer.spec.tops), layer.spec.loss_weights
    if given and len(given) != n:
        c.error("E0204", f"layer '{layer.name}' has {len(given)} loss_weight for {n} tops", layer.spec.record.pos("loss_weight"),
                help=f"give one loss_weight per top ({n})")
        given = []
    if given:
        return list(given)
    return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(n)]


def _propagate_down(layer: Layer, c: Collector) -> list[bool]:
    n, given = len(layer.spec.bottoms), layer.spec.propagate_down
    if given and len(given) != n:
        c.error("E0204", f"layer '{layer.name}' has {len(given)} propagate_down for {n} bottoms",
                layer.spec.record.pos("propagate_down"), help=f"give none, or one per bottom ({n})")
        return [True] * n
    return list(given) if given else [True] * n
