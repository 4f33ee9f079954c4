"""Layer registry: the Layer base class, @register, and Caffe's LayerParameter schema."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

from .errors import Pos
from .schema import F, Msg, Record

Shape = tuple  # of int | None (None: data-dependent, e.g. Proposal's box count)

FILLER = Msg("FillerParameter", {
    "type": F(str, "constant", doc="constant, uniform, gaussian, positive_unitball, xavier, msra, bilinear"),
    "value": F(float, 0.0), "min": F(float, 0.0), "max": F(float, 1.0),
    "mean": F(float, 0.0), "std": F(float, 1.0), "sparse": F(int, -1),
    "variance_norm": F("enum", "FAN_IN", choices=("FAN_IN", "FAN_OUT", "AVERAGE")),
})


def filler_record(**values) -> Record:
    """A FillerParameter made in code (e.g. Scale's default of constant 1)."""
    defaults = {k: f.default for k, f in FILLER.fields.items()}
    return Record(FILLER, {**defaults, **values}, {}, None)


FILLER_TYPES = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")

PARAM_SPEC = Msg("ParamSpec", {
    "name": F(str, ""), "share_mode": F("enum", "STRICT", choices=("STRICT", "PERMISSIVE")),
    "lr_mult": F(float, 1.0), "decay_mult": F(float, 1.0),
})
STATE_RULE = Msg("NetStateRule", {
    "phase": F("enum", None, choices=("TRAIN", "TEST")), "min_level": F(int, None),
    "max_level": F(int, None), "stage": F(str, repeated=True), "not_stage": F(str, repeated=True),
})
BLOB_SHAPE = Msg("BlobShape", {"dim": F(int, repeated=True)})
BLOB_PROTO = Msg("BlobProto", {"shape": F(BLOB_SHAPE), "data": F(float, repeated=True),
                               "num": F(int, 0), "channels": F(int, 0), "height": F(int, 0), "width": F(int, 0)},
                 open=True)
TRANSFORM = Msg("TransformationParameter", {
    "scale": F(float, 1.0), "mirror": F(bool, False), "crop_size": F(int, 0), "mean_file": F(str, ""),
    "mean_value": F(float, repeated=True), "force_color": F(bool, False), "force_gray": F(bool, False),
    "resize_param": F(Msg("ResizeParameter", {}, open=True)), "distort_param": F(Msg("DistortionParameter", {}, open=True)),
    "expand_param": F(Msg("ExpansionParameter", {}, open=True)), "emit_constraint": F(Msg("EmitConstraint", {}, open=True)),
})
LOSS = Msg("LossParameter", {
    "ignore_label": F(int, None),
    "normalization": F("enum", None, choices=("FULL", "VALID", "BATCH_SIZE", "NONE")),
    "normalize": F(bool, None),
})

# Layer types of Caffe's forks that netdsl does not have (yet), and where they come from: an
# unknown type among these is named with its fork instead of a misleading did-you-mean.
FORK_TYPES = {
    "AnnotatedData": "SSD's Caffe fork (weiliu89/caffe)",
    "BoxAnnotatorOHEM": "R-FCN's Caffe fork (daijifeng001/caffe-rfcn)",
    "Reorg": "the YOLO Caffe ports", "Region": "the YOLO Caffe ports",
}

_REGISTRY: dict[str, type[Layer]] = {}
# every `<x>_param` message any registered layer reads, for LayerParameter's schema
_MESSAGES: dict[str, Msg] = {"transform_param": TRANSFORM, "loss_param": LOSS}


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make a layer type known by its `type` name."""
    assert cls.type not in _REGISTRY, cls.type
    _REGISTRY[cls.type] = cls
    for key, msg in cls.messages.items():
        assert _MESSAGES.get(key, msg) is msg, f"{key} declared twice with different schemas"
        _MESSAGES[key] = msg
    return cls


def layer_types() -> dict[str, type[Layer]]:
    from . import layers  # noqa: F401  (importing the package registers every layer)
    return _REGISTRY


def layer_type_with(role: str) -> str:
    """The type name of the registered layer class that plays `role` (a ClassVar flag set on the
    class itself: subclasses, such as MemoryData of Input, do not inherit the role)."""
    return next(t for t, cls in layer_types().items() if vars(cls).get(role))


def layer_parameter_schema() -> Msg:
    """Caffe's LayerParameter: the common fields plus every registered `<type>_param` message.
    Built once, and again only if a layer type registers a new message later."""
    layer_types()
    return _layer_parameter_schema(len(_MESSAGES))


@lru_cache(maxsize=4)
def _layer_parameter_schema(n_messages: int) -> Msg:
    fields = {
        "name": F(str, ""), "type": F(str, ""), "bottom": F(str, repeated=True), "top": F(str, repeated=True),
        "phase": F("enum", None, choices=("TRAIN", "TEST")), "loss_weight": F(float, repeated=True),
        "param": F(PARAM_SPEC, repeated=True), "blobs": F(BLOB_PROTO, repeated=True),
        "propagate_down": F(bool, repeated=True), "include": F(STATE_RULE, repeated=True),
        "exclude": F(STATE_RULE, repeated=True),
    }
    fields.update({k: F(m) for k, m in _MESSAGES.items()})
    return Msg("LayerParameter", fields, context=("layer", "name"))


class ShapeError(Exception):
    """Raised by a shape rule. `field` names the param to point at (a dotted path such as
    "shape.dim" reaches into sub-messages, `index` picks one repetition); `involves` lists the bottom
    indices whose shapes (and producers) the diagnostic should show."""

    def __init__(self, code: str, message: str, *, field: str | None = None, help: str | None = None,
                 notes: list[str] | None = None, involves: tuple[int, ...] = (), index: int | None = None,
                 hintable: bool = False):
        super().__init__(message)
        self.code, self.message, self.field, self.help = code, message, field, help
        self.notes, self.involves = list(notes or []), tuple(involves)
        self.index = index            # with a dotted field ("shape.dim"): which repetition to point at
        self.hintable = hintable      # --shape for every top of the layer replaces its shape rule


@dataclass
class LayerSpec:
    """A layer as written in the file, after coercion (what the graph builder hands to a Layer)."""
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    pos: Pos
    record: Record                       # the coerced LayerParameter
    loss_weights: list[float] = field(default_factory=list)
    propagate_down: list[bool] = field(default_factory=list)
    broken: bool = False                 # its params had errors: it is reported, not built


class Layer:
    """Base class of a layer type. A Layer object is the layer as written (its name, phase and
    Caffe params) and never changes after construction: shapes come out of inference as a
    ShapedGraph, and run state (RNG streams, data cursors) lives in the Net.

    A subclass declares Caffe's params (`messages`), arity and bottom roles, and defines next to
    each other: `shape` and `param_shapes` (pure integer arithmetic), `forward` and `backward`
    (xp-generic). Optional hooks, each asked by one part of the core: `validate` and `check_net`
    (the checker), `macs` (the summary), `open` (the Net, for stateful layers), `explain_*`
    (diagnostics with more context), and `lower_*` (graph mode on the GPU, see gpu/lower.py)."""
    type: ClassVar[str]
    messages: ClassVar[dict[str, Msg]] = {}
    n_bottoms: ClassVar[tuple[int, int | None]] = (1, 1)    # (min, max); None = unbounded
    n_tops: ClassVar[tuple[int, int | None]] = (1, 1)
    bottom_roles: ClassVar[tuple[str, ...]] = ()   # what each bottom is for, for arity errors
    arity_note: ClassVar[str] = ""            # said when a variadic layer gets too few bottoms
    is_loss: ClassVar[bool] = False       # top 0 gets loss_weight 1 unless set
    is_data: ClassVar[bool] = False
    is_sink: ClassVar[bool] = False       # its tops are outputs by design (Accuracy) or it has none (Silence)
    fed_by_caller: ClassVar[bool] = False # its tops are the net's inputs, given to forward() (Input)
    shape_from_hints: ClassVar[bool] = False  # --shape may give its tops (data layers, Python)
    in_place: ClassVar[bool] = False      # may write its top over its bottom
    keeps_layout: ClassVar[bool] = False  # top = bottom's shape and layout, element by element or per channel
    normalizes_scores: ClassVar[bool] = False  # its bottom is the scores a loss should read (Softmax)
    no_backward: ClassVar[bool] = False   # never propagates gradients (data, accuracy, targets)
    frozen_params: ClassVar[bool] = False # params are statistics, not learned (BatchNorm)
    stateful: ClassVar[bool] = False      # forward takes a RunState (RNG stream, data source)
    runnable: ClassVar[bool] = True       # False: checked only (Python; data layers whose files netdsl cannot read)
    run_help: ClassVar[str] = "remove it from the nets you train or run"
    filter_depth_axis: ClassVar[int | None] = None  # param 0 is a filter spanning its input's depth on this axis
    v1: ClassVar[tuple[int, str] | None] = None   # V1LayerParameter.LayerType: (enum number, enum name)
    v1_transform_param: ClassVar[str | None] = None  # V1 kept its transform fields in this message (data layers)
    # the one type a role names (found by `layer_type_with`): in help texts, upgrades and commands
    legacy_input: ClassVar[bool] = False  # what Caffe's deprecated `input:` fields become (Input)
    default_loss: ClassVar[bool] = False  # the loss to suggest for a classifier (SoftmaxWithLoss)
    silences: ClassVar[bool] = False      # takes blobs and makes nothing: marks tops unused on purpose (Silence)
    makes_proposals: ClassVar[bool] = False  # the RPN's region proposals (Proposal)
    feeds_scenes: ClassVar[bool] = False  # a data layer with ground-truth boxes an image can be fed to (DigitScenes)
    makes_detections: ClassVar[bool] = False  # detection rows [image, label, score, corners] (DetectionOutput)
    makes_box_targets: ClassVar[bool] = False  # samples rois with normalised box-delta targets (ProposalTarget)
    decodes_tags: ClassVar[bool] = False  # turns class probabilities into a multi-label prediction (MultiLabelDecode)
    sets_size: ClassVar[bool] = False     # computes a spatial size (Convolution, Pooling): diagnostics trace to it
    cpu_op: ClassVar[str | None] = None   # its compiled CPU op (cpu/ops.py OPS), if it has one

    def __init__(self, spec: LayerSpec, phase: str):
        self.spec = spec
        self.name = spec.name
        self.phase = phase
        self.p = _merge(spec.record, self.messages)

    # -- checking (pure: shapes in, shapes or ShapeError out) --------------------------------
    def validate(self) -> list[ShapeError]:
        """Param checks that need no shapes (e.g. num_output > 0)."""
        return []

    def shape(self, bottoms: list[Shape]) -> list[Shape]:
        """The top shapes, or ShapeError."""
        raise NotImplementedError

    def param_shapes(self, bottoms: list[Shape]) -> list[Shape]:
        """The shapes of the learnable blobs, given valid bottom shapes."""
        return []

    def complete(self, tops: list) -> list:
        """Data layers: derive the tops --shape did not give from those it did (Data's label)."""
        return tops

    def unknown_shape_note(self) -> str:
        """Why a top's shape is unknown before run time (shape_from_hints layers)."""
        return f"{self.type} layers produce shapes known only at run time"

    def hint_example(self, i: int) -> str:
        """The --shape that would give top i."""
        return f"--shape {self.spec.tops[i]}=N,C,H,W (e.g. N,3,224,224)"

    def fillers(self) -> list[Record | None]:
        """One filler per param blob (None: zeros); as many as param_shapes gives."""
        return []

    def macs(self, bottoms: list[Shape], tops: list[Shape]) -> int:
        return 0

    def explain(self, error: ShapeError, upstream) -> ShapeError:
        """Refine a ShapeError of this layer's shape rule with the graph around it (`upstream(k)`:
        the layer that set bottom k's size and its bottom shapes, see shapes.Upstream)."""
        return error

    def allow_force_backward(self, i: int) -> bool:
        """Caffe's AllowForceBackward: may `force_backward` give bottom i a gradient (not a loss's labels)."""
        return not (self.is_loss and i == 1)

    def explain_weights(self, i: int, have: Shape, want: Shape) -> ShapeError | None:
        """A better diagnosis than "shape mismatch" for loaded param i (have) vs the net's (want)."""
        return None

    @classmethod
    def check_net(cls, checking) -> None:
        """Net-level checks that concern this layer type, once per checked net that has one
        (`checking`: the graph, its shapes, the collector, and the other phases; see check.py)."""

    def pos(self, field: str | None) -> Pos:
        """Where a param (or a whole `xxx_param` message) is written; else the layer."""
        if not field:
            return self.spec.pos
        return self.p.pos(field) or (self.spec.record.pos(field) if self.spec.record.has(field) else None) or self.spec.pos

    # -- running (implemented per layer) ----------------------------------------------------
    def open(self, ctx) -> Any:
        """Stateful layers: the run state's source (a dataset and its cursor), made by the Net
        (ctx: data_dir, seed). It may define state() / load_state() for snapshots."""
        return None

    def forward(self, xp, bottoms: list, params: list) -> tuple[list, Any]:
        """-> (tops, saved). Stateful layers take a fourth argument, their RunState."""
        raise NotImplementedError

    def backward(self, xp, saved: Any, dtops: list, params: list, need: list[bool]) -> tuple[list, list]:
        raise NotImplementedError

    # -- graph mode on the GPU (gpu/lower.py): types that define lower_forward ------------------
    lower_forward: ClassVar[Any] = None   # (self, lw, i, step): emit the forward's kernel launches through lw
    lower_backward: ClassVar[Any] = None  # (self, lw, i, step): the same for backward (types that train)
    graph_data: ClassVar[bool] = False    # the data layer graph mode stages on the device (MNIST)
    gemm_epilogue: ClassVar[bool] = False # its forward GEMM can apply a following activation (fused ReLU)
    gemm_dx_mask: ClassVar[bool] = False  # its data-gradient GEMM can apply that activation's backward mask

    def lower_check(self, lw, step) -> None:
        """Raise gpu.program.Unsupported, with the reason, if graph mode cannot run this layer as
        configured (types with a lowering; the default accepts every configuration)."""

    def epilogue_slope(self) -> float | None:
        """An activation that can ride in its producer's GEMM epilogue: its negative slope."""
        return None

    # -- ONNX export (onnx_export.py): the layer's nodes through the exporter `ex` ----------------
    def to_onnx(self, ex, step) -> None:
        """Emit this layer's ONNX nodes (ex.add_node, ex.const, ex.bottoms(step), ex.tops(step),
        ex.params(step), shapes from the plan). The default: no mapping, a located error that
        suggests cutting the graph before the layer (--outputs)."""
        from .onnx_export import unsupported
        raise unsupported(self)


class RunState:
    """A stateful layer's per-run state, owned by the Net (one per step): the RNG stream of the
    current forward (seeded from net seed, step and forward count, so runs and resumes repeat),
    the step's top shapes, and the source the layer's `open` returned."""

    def __init__(self, tops: list[Shape], source: Any = None):
        self.tops, self.source, self.rng = tops, source, None

    def uniform(self, xp, shape):
        """U[0,1) drawn on the host so CPU and GPU runs see the same numbers."""
        return xp.asarray(self.rng.random(shape, dtype="float32"))


class _Merged:
    """The layer's `<type>_param` messages seen as one namespace (self.p.num_output)."""

    def __init__(self, records: list[Record]):
        self._records = records

    def __getattr__(self, name):
        for r in self._records:
            if name in r._values:
                return getattr(r, name)
        raise AttributeError(name)

    def has(self, name) -> bool:
        return any(r.has(name) for r in self._records)

    def record_of(self, name) -> Record | None:
        """The message in which a field is written."""
        return next((r for r in self._records if r.has(name)), None)

    def pos(self, name) -> Pos | None:
        for r in self._records:
            if r.has(name):
                return r.pos(name)
        return None


def _merge(record: Record, messages: dict[str, Msg]) -> _Merged:
    return _Merged([getattr(record, key) for key in messages])


# ------------------------------------------------------------------------ shape helpers

def count(shape: Shape, start: int = 0, end: int | None = None) -> int | None:
    dims = shape[start:end]
    return None if any(d is None for d in dims) else math.prod(dims)


def fmt(shape: Shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) if shape else "scalar"


def canonical_axis(axis: int, ndim: int, what: str = "axis", field: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError("E0220", f"{what} {axis} is out of range for a {ndim}-D input", field=field,
                         help=f"use an axis in [{-ndim}, {ndim - 1}]", involves=(0,))
    return axis % ndim


def spatial(p, name: str, default: int | None, h: str | None = None, w: str | None = None) -> tuple:
    """Caffe's kernel_size/pad/stride/dilation: a repeated field (1 value or one per axis) or
    the _h/_w pair. Returns (h, w); None when absent with no default."""
    h, w = h or f"{name}_h", w or f"{name}_w"
    hv = getattr(p, h) if p.has(h) else None
    wv = getattr(p, w) if p.has(w) else None
    if hv is not None or wv is not None:
        return (hv if hv is not None else default, wv if wv is not None else default)
    v = getattr(p, name)
    if isinstance(v, list):
        if not v:
            return (default, default)
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return (v, v) if v is not None else (default, default)
