"""Build: AST -> Graph. Phase/stage/level filtering, layer instantiation, in-place tops renamed to
fresh versions (conv1 -> conv1#2) so every blob has one producer; arity, unknown-bottom,
duplicate-top, order/cycle, loss-weight, propagate_down and no-loss checks."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import Collector, NetdslError, Pos
from .registry import BLOB_SHAPE, FILLER_TYPES, FORK_TYPES, Layer, LayerSpec, layer_parameter_schema, layer_type_with, layer_types
from .schema import F, Msg, Record, suggest
from .syntax import Message
from .upgrade import upgrade_net

NET_STATE = Msg("NetState", {"phase": F("enum", "TEST", choices=("TRAIN", "TEST")), "level": F(int, 0),
                             "stage": F(str, repeated=True)})
SOLVER_FIELDS = {"base_lr", "lr_policy", "max_iter", "net", "train_net", "test_iter", "solver_type", "type",
                 "snapshot_prefix", "momentum", "weight_decay", "display", "test_interval"}


_NET_SCHEMA: list = [None, None]           # (the LayerParameter schema it was built on, the schema)


def net_schema() -> Msg:
    layer_schema = layer_parameter_schema()
    if _NET_SCHEMA[0] is not layer_schema:
        _NET_SCHEMA[:] = [layer_schema, _net_schema(layer_schema)]
    return _NET_SCHEMA[1]


def _net_schema(layer_schema: Msg) -> Msg:
    return Msg("NetParameter", {
        "name": F(str, ""), "layer": F(layer_schema, repeated=True),
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
        first = ast.get("layers")[0].pos
        if ast.get("layer"):
            c.error("E0206", "the file mixes V1 `layers { }` blocks with current `layer { }` blocks", first,
                    help="write every layer as `layer { }` (`netdsl upgrade FILE` converts the V1 ones)")
            return Graph("", phase, file, [], {})
        try:
            ast = upgrade_net(ast)
        except NetdslError as e:
            c.diagnostics.extend(e.diagnostics)
            return Graph("", phase, file, [], {})
        n = len(ast.get("layer"))
        c.warning("W0206", f"V1 net file (`layers {{ }}`, Caffe before 2015): its {n} layers were upgraded in memory",
                  first, notes=["as Caffe's upgrade does: enum types to strings, blobs_lr and weight_decay to "
                                "`param { lr_mult decay_mult }`, data layers' scale/mean_file/crop_size/mirror to "
                                "transform_param"],
                  help=f"upgrade the file for good: `netdsl upgrade {file} -o NEW.prototxt`")
    before = len(c.errors)
    net = net_schema().coerce(ast, c)
    specs = _legacy_inputs(net, c) + _layer_specs(net, c)
    types = layer_types()
    _forgive_unknown_params(specs, types, c)
    _mark_broken(specs, c.errors[before:])
    g = Graph(net.name, phase, file, [], {}, force_backward=net.force_backward)
    current: dict[str, str] = {}              # user blob name -> its latest version
    versions: dict[str, int] = {}

    def in_phase(s: LayerSpec) -> bool:
        return included(s.record, phase, level, set(stages)) and not (s.record.include and s.record.exclude)
    names: dict[str, object] = {}
    for spec in specs:
        rec = spec.record
        if rec.include and rec.exclude:
            c.error("E0203", f"layer '{spec.name}' has both include and exclude rules", rec.pos("exclude"),
                    notes=[(f"include at {rec.pos('include')}; Caffe takes one or the other: a layer is either "
                            "included by rules or excluded by them")],
                    help="keep only the include rules, or only the exclude rules")
            _keep_names(spec, current)
            continue
        if not included(rec, phase, level, set(stages)):
            continue
        cls = types.get(spec.type)
        if cls is None and spec.broken and not spec.type:    # its `type:` itself was reported (not a string)
            _keep_names(spec, current)
            continue
        if cls is None:
            _unknown_type(spec, types, c)
            _keep_names(spec, current)
            continue
        if spec.broken:                       # its params are reported; checking it further would cascade
            _keep_names(spec, current)
            continue
        _foreign_params(spec, cls, c)
        _auto_tops(spec, cls, current)
        if spec.name and spec.name in names:
            c.warning("W0201", f"layer name '{spec.name}' is used twice in the {phase} net", rec.pos("name"),
                      notes=[f"first used at {names[spec.name]}"],
                      help="give each layer a unique name; weights are saved and loaded by layer name")
        names.setdefault(spec.name, rec.pos("name"))
        if "\x00" in spec.name:               # a zip member name (.npz snapshot) would be cut there
            c.error("E0215", f"layer name {spec.name!r} contains a NUL character", rec.pos("name"),
                    help="remove the \\0 from the name: weights are saved under the layer's name")
            continue
        layer = cls(spec, phase)
        if not _arity_ok(layer, c, current):
            continue
        invalid = layer.validate()
        for err in invalid:
            message = err.message if f"'{layer.name}'" in err.message else f"{layer.type} '{layer.name}': {err.message}"
            c.error(err.code, message, layer.pos(err.field), notes=err.notes, help=err.help)
        bad_filler = _check_fillers(layer, c)
        bottoms = []
        ok = not invalid and not bad_filler     # a layer with bad params is reported, not shape-checked
        for i, b in enumerate(spec.bottoms):
            if b in current:
                bottoms.append(current[b])
                continue
            ok = False
            _unknown_bottom(spec, i, b, current, specs, phase, in_phase, g.producer.get, c)
        tops = []
        for k, t in enumerate(spec.tops):
            if t in spec.tops[:k]:
                c.error("E0211", f"layer '{spec.name}' lists top '{t}' twice", rec.item_pos("top", k) or spec.pos,
                        notes=[f"tops: {', '.join(repr(x) for x in spec.tops)}"],
                        help="each top is a different output: give it its own name, or remove the repeat")
                ok = False
                continue
            first = g.producer.get(current[t]) if t in current and t not in spec.bottoms else None
            if first is not None:
                c.error("E0211", f"top '{t}' of layer '{spec.name}' is already produced by layer '{first.name}'",
                        rec.item_pos("top", spec.tops.index(t)) or spec.pos,
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
        _no_loss(g, c)
    return g


def _no_loss(g: Graph, c: Collector) -> None:
    last = g.nodes[-1]
    outputs = [t for t in g.outputs if not g.producer[t].layer.is_data]
    shown = ", ".join(f"'{g.display(t)}' ({g.producer[t].layer.type} '{g.producer[t].name}')" for t in outputs[:4])
    losses = [n for n in g.nodes if n.layer.is_loss]
    notes = ["training minimises the weighted sum of the loss tops; this net has "
             + ("loss layers, but every loss_weight is 0" if losses else "no loss layer")]
    if shown:
        notes.append(f"its outputs: {shown}")
    # the scores a loss should read: the input of a final Softmax, else the last output
    scores = last.bottoms[0] if last.layer.normalizes_scores and last.bottoms else (outputs[-1] if outputs else None)
    labels = [t for n in g.nodes if n.layer.is_data for t in n.tops if "label" in t]
    if scores is not None:
        example = (f'layer {{ name: "loss" type: "{layer_type_with("default_loss")}" bottom: "{g.display(scores)}" bottom: '
                   f'"{g.display(labels[0]) if labels else "label"}" top: "loss" }}')
        help = f"add a loss after layer '{last.name}', e.g. `{example}`; or check the net with --phase test"
    else:
        help = "add a loss layer (e.g. SoftmaxWithLoss reading the scores and the labels), or check with --phase test"
    c.error("E0213", f"the TRAIN net '{g.name or g.file}' has no loss", last.layer.spec.record.pos("type")
            or last.layer.spec.pos, notes=notes, help=help)


def _keep_names(spec: LayerSpec, current: dict[str, str]) -> None:
    """A layer that is reported and left out still names its tops, so the layers reading them do
    not report unknown bottoms as well (their shapes stay unknown, so they are not checked)."""
    for t in spec.tops:
        current.setdefault(t, t)


def _mark_broken(specs: list[LayerSpec], errors) -> None:
    """Layers whose params had errors (unknown field, wrong type, ...) are not built: their values
    fell back to defaults, and shape rules would report nonsense or fail on them."""
    if not errors:
        return
    for spec in specs:
        ast = spec.record._ast
        if ast is None:
            continue
        start, end = (ast.pos.line, ast.pos.column), (ast.pos.end_line, ast.pos.end_column)
        spec.broken = any(d.pos is not None and start <= (d.pos.line, d.pos.column) <= end for d in errors)


def _check_fillers(layer: Layer, c: Collector) -> bool:
    """An unknown filler type would only fail when the weights are drawn: report it here."""
    bad, seen = False, set()
    for f in layer.fillers():
        if f is not None and id(f) not in seen and f.type not in FILLER_TYPES:
            seen.add(id(f))                    # one filler may serve several blobs (RNN's weights)
            c.error("E0104", f"{layer.type} '{layer.name}': unknown filler type \"{f.type}\"", f.pos("type"),
                    help=suggest(f.type, FILLER_TYPES) or f"use one of: {', '.join(FILLER_TYPES)}")
            bad = True
    return bad


def _legacy_inputs(net: Record, c: Collector) -> list[LayerSpec]:
    """Caffe's deprecated `input:` + `input_shape`/`input_dim` become one Input layer, as Caffe does."""
    if not net.input:
        return []
    shapes = [list(s.dim) for s in net.input_shape]
    schema = layer_parameter_schema()
    rec = schema.coerce(None, Collector())
    broken = [LayerSpec("input", layer_type_with("legacy_input"), [], list(net.input), net.pos("input"), rec, broken=True)]
    if net.input_dim:
        if len(net.input_dim) != 4 * len(net.input):
            n = len(net.input)
            c.error("E0501", f"{n} input{'s' if n != 1 else ''} ({', '.join(repr(i) for i in net.input)}) "
                    f"need{'s' if n == 1 else ''} "
                    f"{4 * n} input_dim values (N, C, H, W each), but {len(net.input_dim)} are given",
                    net.pos("input_dim"), notes=[f"given: {', '.join(map(str, net.input_dim))}"],
                    help="give 4 `input_dim:` per input (e.g. input_dim: 1 input_dim: 3 input_dim: 224 "
                         "input_dim: 224), or use `input_shape { dim: ... }`")
            return broken
        shapes = [net.input_dim[i:i + 4] for i in range(0, len(net.input_dim), 4)]
    if len(shapes) != len(net.input):
        c.error("E0501", f"{len(net.input)} inputs but {len(shapes)} input shapes", net.pos("input"),
                help="give one `input_shape { dim: ... }` per `input:`")
        return broken
    shape_recs = [BLOB_SHAPE.coerce(None, Collector()) for _ in shapes]
    for r, dims in zip(shape_recs, shapes):
        r._values["dim"] = dims
    rec.input_param._values["shape"] = shape_recs
    return [LayerSpec("input", layer_type_with("legacy_input"), [], list(net.input), net.pos("input"), rec)]


def _type_help(rec: Record) -> str:
    """Suggest the type whose parameters the layer gives (`convolution_param` -> Convolution)."""
    for key in rec._pos:
        owner = next((t for t, cls in layer_types().items() if key in cls.messages), None)
        if key.endswith("_param") and key != "transform_param" and owner:
            return f'add `type: "{owner}"` (its {key} belongs to {owner}), or another layer type'
    return 'add `type: "..."` naming the layer type (an unknown one lists the known types)'


def _layer_specs(net: Record, c: Collector) -> list[LayerSpec]:
    specs = []
    for rec in net.layer:
        name = rec.name
        if not rec.has("type"):
            c.error("E0106", f"layer '{name}' has no type", rec.pos(), help=_type_help(rec))
            continue
        specs.append(LayerSpec(name, rec.type, list(rec.bottom), list(rec.top), rec.pos(), rec,
                               list(rec.loss_weight), list(rec.propagate_down)))
    return specs


def _unknown_type(spec: LayerSpec, types: dict, c: Collector) -> None:
    fork = FORK_TYPES.get(spec.type)
    if fork:
        c.error("E0201", f"layer type \"{spec.type}\" (layer '{spec.name}') comes from {fork}, which netdsl does not "
                "support yet", spec.record.pos("type"),
                notes=[f"{spec.type} is not a layer of BVLC Caffe; netdsl implements BVLC's catalogue and some forks' "
                       "layers (docs/layers.md)"],
                help="replace the layer with built-in ones that compute the same, or check the net without it")
        return
    lower = {t.lower(): t for t in types}
    close = [lower[spec.type.lower()]] if spec.type.lower() in lower else \
        difflib.get_close_matches(spec.type, list(types), n=1, cutoff=0.75)      # a typo, not a look-alike
    c.error("E0201", f"unknown layer type \"{spec.type}\" (layer '{spec.name}')", spec.record.pos("type"),
            help=f"did you mean \"{close[0]}\"?" if close else f"known types: {', '.join(sorted(types))}")


def _forgive_unknown_params(specs: list[LayerSpec], types: dict, c: Collector) -> None:
    """A layer of an unknown type gets one error (E0201), not another for its own `xxx_param`
    block, which netdsl cannot know either."""
    for spec in specs:
        ast = spec.record._ast
        if spec.type in types or ast is None:
            continue
        start, end = (ast.pos.line, ast.pos.column), (ast.pos.end_line, ast.pos.end_column)
        c.diagnostics[:] = [d for d in c.diagnostics if not (
            d.code == "E0102" and "_param`" in d.message and d.pos is not None
            and start <= (d.pos.line, d.pos.column) <= end)]


def _auto_tops(spec: LayerSpec, cls: type[Layer], current: dict) -> None:
    """Caffe's AutoTopBlobs: a loss layer written with fewer tops than it needs gets anonymous
    ones ("(automatic)"), so its loss still counts."""
    if not cls.is_loss:
        return
    while len(spec.tops) < cls.n_tops[0]:
        name, k = "(automatic)", 1
        while name in current or name in spec.tops:
            name, k = f"(automatic)_{k}", k + 1
        spec.tops.append(name)


def _foreign_params(spec: LayerSpec, cls: type[Layer], c: Collector) -> None:
    own = set(cls.messages) | {"transform_param", "loss_param"}
    for key in spec.record._pos:
        if key.endswith("_param") and key not in own:
            mine = ", ".join(sorted(cls.messages)) or "no parameters"
            c.warning("W0102", f"{key} has no effect on {spec.type} layer '{spec.name}'", spec.record.pos(key),
                      help=f"{spec.type} reads {mine}; remove {key} or fix the layer type")


def _arity_ok(layer: Layer, c: Collector, known=()) -> bool:
    ok = True
    spec = layer.spec
    for what, names, (lo, hi) in (("bottom", spec.bottoms, layer.n_bottoms), ("top", spec.tops, layer.n_tops)):
        have = len(names)
        if lo <= have and (hi is None or have <= hi):
            continue
        ok = False
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        plural = what if (hi if lo == hi else lo) == 1 and lo == hi else what + "s"
        given = ", ".join(f"'{n}'" for n in names) or "none"
        roles = layer.bottom_roles if what == "bottom" else ()
        notes = [f"it has {have} {what}{'s' if have != 1 else ''}: {given}"]
        if roles:
            notes.append(f"{layer.type} reads " + ", ".join(f"{r} (bottom {i})" for i, r in enumerate(roles)))
        if hi is not None and have > hi:
            extra = names[hi:]
            pos = spec.record.item_pos(what, hi) or spec.pos
            shown = ", ".join(f'`{what}: "{n}"`' for n in extra)
            help = f"remove {shown}" + (f", or use a layer type that takes {have} {what}s" if what == "bottom"
                                        else "")
        else:
            pos = (spec.record.item_pos(what, have - 1) if have else spec.record.pos("type")) or spec.pos
            missing = [roles[i] for i in range(have, min(lo, len(roles)))] if roles else []
            help = (f"add {lo - have} more `{what}:` " + (f"({', '.join(missing)})" if missing else "")).rstrip()
            labels = [b for b in known if "label" in b and b not in names]
            if layer.arity_note and names:
                help += f" (a blob shaped like '{names[0]}')"
            if "the labels" in missing and labels:
                help += f', e.g. `bottom: "{labels[0]}"`'
            if what == "bottom" and layer.arity_note:
                notes.append(layer.arity_note)
            if what == "top" and have == 0:
                help = f'add `top: "{layer.name or layer.type.lower()}"`'
        c.error("E0202", f"{layer.type} '{layer.name}' takes {want} {plural}, got {have}", pos,
                notes=notes, help=help)
    return ok


def _unknown_bottom(spec, i, b, current, specs, phase, in_phase, producer_of, c: Collector) -> None:
    pos = spec.record.item_pos("bottom", i) or spec.pos
    here = specs.index(spec)
    makers = [s for s in specs if b in s.tops and s is not spec]
    after = [s for s in makers if specs.index(s) > here and in_phase(s)]
    if after:
        producer = after[0]
        cyc = any(t in producer.bottoms for t in spec.tops)
        c.error("E0212", f"layer '{spec.name}' reads '{b}' before layer '{producer.name}' produces it"
                + (" (a cycle)" if cyc else ""), pos,
                notes=[f"'{b}' is produced by {producer.type} '{producer.name}' at {producer.pos}, later in the file"] +
                      ([(f"layer '{producer.name}' in turn reads '{next(t for t in spec.tops if t in producer.bottoms)}'"
                         f", an output of layer '{spec.name}': the graph has a cycle")] if cyc else []),
                help=(f"layers run in file order: move layer '{spec.name}' after layer '{producer.name}'" if not cyc
                      else f"nets are acyclic: one of '{spec.name}' and '{producer.name}' must read another blob"))
        return
    elsewhere = [s for s in makers if not in_phase(s)]
    if elsewhere:
        s = elsewhere[0]
        c.error("E0210", f"layer '{spec.name}' reads '{b}', which no layer of the {phase} net produces", pos,
                notes=[(f"'{b}' is produced by {s.type} '{s.name}' at {s.pos}, which is not in the {phase} net "
                        "(its include/exclude rules leave it out)")],
                help=f"include layer '{s.name}' in the {phase} phase too, or leave layer '{spec.name}' out of it "
                     f"(`include {{ phase: {'TRAIN' if phase == 'TEST' else 'TEST'} }}`)")
        return
    tip = suggest(b, current)
    notes = []
    if tip:
        close = tip.split("`")[1]
        node = producer_of(current[close])
        if node is not None:
            notes.append(f"'{close}' is produced by {node.layer.type} '{node.name}' at {node.layer.spec.pos}")
    else:
        names = list(current)
        shown = ", ".join(f"'{n}'" for n in names[-8:])
        more = f" (and {len(names) - 8} earlier)" if len(names) > 8 else ""
        notes.append(f"blobs produced before this layer: {shown or 'none'}{more}")
    c.error("E0210", f"unknown bottom blob '{b}' (layer '{spec.name}', bottom {i})", pos, notes=notes,
            help=tip or "a bottom must be a top of an earlier layer: fix the name, or add the layer that "
                        f"produces '{b}' before '{spec.name}'")


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
