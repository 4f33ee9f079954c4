"""Layers: one table of cases driving generic checks of every registered layer type.

For each case in CASES the layer is built the way a net builds it (parse -> check, so its shape
rule has run and set bottom/top/param shapes) and then driven directly through
`Layer.forward` / `Layer.backward` in float64:

- the shape rule equals the shapes forward returns (and forward keeps float64);
- a central-difference check of the gradient of loss = sum_i sum(top_i * R_i), R fixed random, for
  EVERY bottom that propagates and EVERY learnable param (inputs near kinks - ReLU at 0, max
  pooling / Eltwise MAX ties - are avoided by drawing distinct values with gaps);
- loss layers: backward of a top gradient equal to a loss weight w is w times the unit gradient,
  which is the numerical derivative of the loss.

Then: naive-loop Caffe references for Convolution, Deconvolution and Pooling (through the layer
classes), exact values of the Caffe formulas that matter, the data and RPN layers' shape rules,
net-level gradient plumbing through `Net`, and (optional) PyTorch CPU oracles.
"""
from __future__ import annotations

import itertools
import math
import shutil
import subprocess
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest
from reference import conv_ref, deconv_ref, numeric_grad, pool_ref
from support import needs_mnist, shared_data_dir

from netdsl import check as check_mod
from netdsl import plan as plan_mod
from netdsl import syntax
from netdsl.executor import Net
from netdsl.gpu import emulate
from netdsl.gpu.codegen import generate
from netdsl.gpu.lower import lower_layer, param_layout
from netdsl.gpu.program import Ref, Unsupported
from netdsl.registry import RunState, layer_types, spatial

F64 = np.float64
FLT_MIN = float(np.finfo(np.float32).tiny)


# =============================================================================================
# Building a layer the way a net does

def _dims(shape) -> str:
    return "shape { " + " ".join(f"dim: {d}" for d in shape) + " }"


def build_net_text(type_: str, params: str, bottoms, ntops: int, phase: str, extra: str = "") -> str:
    lines = ['name: "t"']
    if bottoms:
        tops = " ".join(f'top: "b{i}"' for i in range(len(bottoms)))
        lines.append(f'layer {{ name: "in" type: "Input" {tops} input_param {{ '
                     + " ".join(_dims(s) for s in bottoms) + " } }")
    b = " ".join(f'bottom: "b{i}"' for i in range(len(bottoms)))
    t = " ".join(f'top: "t{i}"' for i in range(ntops))
    lines.append(f'layer {{ name: "L" type: "{type_}" {b} {t} {params} {extra} }}')
    if phase == "TRAIN":     # a TRAIN net needs a loss; keep it apart from the layer under test
        lines.append('layer { name: "zin" type: "Input" top: "z" input_param { shape { dim: 1 } } }')
        lines.append('layer { name: "zloss" type: "EuclideanLoss" bottom: "z" bottom: "z" top: "zl" }')
    return "\n".join(lines)


class Built:
    """A layer built the way a net builds it, with the shapes inference gave it; `forward` hands a
    stateful layer a RunState whose RNG stream is fixed by `seed` (Dropout's mask repeats)."""

    def __init__(self, layer, shapes):
        self.layer, self.shapes = layer, shapes

    def __getattr__(self, name):
        return getattr(self.layer, name)

    @property
    def param_shapes(self):
        return list(self.shapes.params)

    @property
    def top_shapes(self):
        return list(self.shapes.tops)

    def forward(self, xp, bottoms, params, seed: int = 0):
        if not self.layer.stateful:
            return self.layer.forward(xp, bottoms, params)
        state = RunState(self.top_shapes)
        state.rng = np.random.default_rng(seed)
        return self.layer.forward(xp, bottoms, params, state)


def build_layer(type_: str, params: str = "", bottoms=(), ntops: int = 1, phase: str = "TRAIN") -> Built:
    """The checked layer named L, with its shapes."""
    text = build_net_text(type_, params, bottoms, ntops, phase)
    ch = check_mod.check(syntax.parse(text, "t.net"), phase=phase)
    (node,) = [n for n in ch.graph.nodes if n.name == "L"]
    return Built(node.layer, ch.nodes[node])


def make_net(text: str, phase: str = "TRAIN", share_from=None, data_dir=None, seed=0) -> Net:
    ch = check_mod.check(syntax.parse(text, "t.net"), phase=phase)
    return Net(plan_mod.lower(ch), np, dtype=F64, share_from=share_from, data_dir=data_dir, seed=seed)


# =============================================================================================
# The table

@dataclass
class Case:
    """One parameterization of one layer type.

    inputs: per-bottom generator (see `gen`), default "n" (standard normal):
      "d" distinct values at least 0.05 apart and 0.025 away from 0 (shared pool across every "d"
          bottom of the case, so Eltwise MAX has no ties either), "lab<C>" integer labels in [0,C),
      "lab<C>i" the same with some -1 (ignored) labels, "u" uniform (0,1) targets, "ui" the same with
      some -1 (ignored), "w" positive weights, "ref" a reference blob (shape only, no gradient).
    grad: the bottoms to gradient-check (default: those drawn "n" or "d").
    grad_tops: the tops that carry a gradient (default all; not Pooling's mask or the loss's prob).
    params: per-param generator ("n" default, "pos", "bnmean"/"bnvar"/"bnfactor" for BatchNorm).
    """
    type: str
    params_text: str = ""
    bottom_shapes: tuple = ()
    phase: str = "TRAIN"
    tops: int = 1
    inputs: tuple = ()
    grad: tuple | None = None
    grad_tops: tuple | None = None
    param_kinds: tuple = ()
    id: str = ""
    tol: float = 1e-6

    def __post_init__(self):
        self.inputs = tuple(self.inputs) + ("n",) * (len(self.bottom_shapes) - len(self.inputs))
        if self.grad is None:
            self.grad = tuple(i for i, k in enumerate(self.inputs) if k in ("n", "d"))
        if self.grad_tops is None:
            self.grad_tops = tuple(range(self.tops))
        self.id = f"{self.type}-{self.id}" if self.id else self.type

    def layer(self):
        return build_layer(self.type, self.params_text, self.bottom_shapes, self.tops, self.phase)

    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def C(*a, **kw) -> Case:
    return Case(*a, **kw)


X4 = (2, 3, 5, 5)
CONV_VARIANTS = [
    ("k3", "num_output: 4 kernel_size: 3", X4),
    ("stride2-pad1", "num_output: 4 kernel_size: 3 stride: 2 pad: 1", X4),
    ("dilation2", "num_output: 3 kernel_size: 2 dilation: 2 pad: 1", X4),
    ("group2", "num_output: 4 kernel_size: 3 group: 2 pad: 1", (2, 4, 4, 4)),
    ("nobias", "num_output: 4 kernel_size: 3 bias_term: false", X4),
    ("kh3-kw2", "num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2", (2, 3, 5, 6)),
    ("all", "num_output: 4 kernel_size: 2 stride: 2 pad: 2 dilation: 2 group: 2", (1, 4, 6, 5)),
    ("k1", "num_output: 3 kernel_size: 1", (2, 2, 3, 3)),
]
DECONV_VARIANTS = [
    ("k3", "num_output: 3 kernel_size: 3", (2, 2, 3, 3)),
    ("stride2-pad1", "num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 3, 3)),
    ("dilation2", "num_output: 2 kernel_size: 2 dilation: 2", (2, 2, 3, 3)),
    ("group2", "num_output: 4 kernel_size: 3 group: 2 stride: 2", (1, 4, 3, 3)),
    ("nobias", "num_output: 3 kernel_size: 2 stride: 2 bias_term: false", (2, 2, 3, 3)),
    ("kh3-kw2", "num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 1 stride_h: 2 stride_w: 1", (2, 2, 3, 4)),
    ("all", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2", (1, 2, 3, 3)),
]
POOL_VARIANTS = [   # (id, pooling_param, input, tops)
    ("max-k3s2-ceil", "pool: MAX kernel_size: 3 stride: 2", (2, 2, 6, 6), 1),
    ("max-k3s2-floor", "pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR", (2, 2, 6, 6), 1),
    ("ave-k3s2-ceil", "pool: AVE kernel_size: 3 stride: 2", (2, 2, 6, 6), 1),
    ("ave-k3s2-floor", "pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR", (2, 2, 6, 6), 1),
    ("max-pad1", "pool: MAX kernel_size: 3 stride: 2 pad: 1", (1, 2, 5, 6), 1),
    ("ave-pad1", "pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 2, 5, 6), 1),
    ("max-padcorrection", "pool: MAX kernel_size: 2 stride: 2 pad: 1", (1, 2, 5, 5), 1),
    ("ave-padcorrection", "pool: AVE kernel_size: 2 stride: 2 pad: 1", (1, 2, 5, 5), 1),
    ("ave-k3s3p2-correction", "pool: AVE kernel_size: 3 stride: 3 pad: 2", (1, 2, 4, 4), 1),
    ("max-pairs", "pool: MAX kernel_size: 2 stride: 2", (2, 2, 4, 6), 1),
    ("ave-pairs", "pool: AVE kernel_size: 2 stride: 2", (2, 2, 4, 6), 1),
    ("max-global", "pool: MAX global_pooling: true", (2, 3, 3, 4), 1),
    ("ave-global", "pool: AVE global_pooling: true", (2, 3, 3, 4), 1),
    ("max-kh3kw2", "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1", (1, 2, 5, 4), 1),
    ("ave-kh3kw2", "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_w: 1", (1, 2, 5, 4), 1),
    ("max-mask", "pool: MAX kernel_size: 3 stride: 2 pad: 1", (1, 2, 5, 6), 2),
    ("max-mask-pairs", "pool: MAX kernel_size: 2 stride: 2", (1, 2, 4, 4), 2),
    ("max-mask-global", "pool: MAX global_pooling: true", (2, 2, 3, 3), 2),
]

CASES: list[Case] = []
for _id, _p, _x in CONV_VARIANTS:
    CASES.append(C("Convolution", f"convolution_param {{ {_p} }}", (_x,), id=_id))
for _id, _p, _x in DECONV_VARIANTS:
    CASES.append(C("Deconvolution", f"convolution_param {{ {_p} }}", (_x,), id=_id))
for _id, _p, _x, _t in POOL_VARIANTS:
    CASES.append(C("Pooling", f"pooling_param {{ {_p} }}", (_x,), tops=_t, inputs=("d",), grad_tops=(0,), id=_id))

CASES += [
    # InnerProduct
    C("InnerProduct", "inner_product_param { num_output: 4 }", ((2, 3, 2, 2),), id="axis1"),
    C("InnerProduct", "inner_product_param { num_output: 5 axis: 2 }", ((2, 3, 4),), id="axis2"),
    C("InnerProduct", "inner_product_param { num_output: 3 axis: -1 }", ((2, 2, 4),), id="axis-1"),
    C("InnerProduct", "inner_product_param { num_output: 4 transpose: true }", ((3, 5),), id="transpose"),
    C("InnerProduct", "inner_product_param { num_output: 4 bias_term: false }", ((3, 2, 3),), id="nobias"),
    C("InnerProduct", "inner_product_param { num_output: 2 axis: 2 transpose: true bias_term: false }",
      ((2, 3, 4),), id="axis2-transpose-nobias"),
    # activations
    C("ReLU", "", ((2, 3, 4),), inputs=("d",), id="slope0"),
    C("ReLU", "relu_param { negative_slope: 0.1 }", ((2, 3, 4),), inputs=("d",), id="slope0.1"),
    C("Sigmoid", "", ((2, 3, 4),)),
    C("TanH", "", ((2, 3, 4),)),
    C("Swish", "swish_param { beta: 1.5 }", ((2, 3, 4),)),
    C("Dropout", "", ((2, 3, 4),), id="train"),
    C("Dropout", "dropout_param { dropout_ratio: 0.3 }", ((2, 3, 4),), id="train-0.3"),
    C("Dropout", "", ((2, 3, 4),), phase="TEST", id="test"),
    C("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }", ((2, 3, 4),), id="train-noscale"),
    C("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }", ((2, 3, 4),), phase="TEST",
      id="test-noscale"),
    # normalisation
    C("LRN", "", ((2, 6, 2, 3),), id="across-default"),
    C("LRN", "lrn_param { local_size: 3 alpha: 2.0 beta: 0.75 k: 2.0 }", ((2, 4, 3, 3),), id="across-3"),
    C("LRN", "lrn_param { local_size: 3 alpha: 2.0 beta: 0.75 norm_region: WITHIN_CHANNEL }", ((2, 2, 4, 5),),
      id="within-3"),
    C("LRN", "lrn_param { local_size: 5 alpha: 3.0 beta: 0.6 k: 5.0 norm_region: WITHIN_CHANNEL }",
      ((1, 2, 5, 4),), id="within-5"),
    C("BatchNorm", "", ((3, 2, 2, 3),), param_kinds=("bnmean", "bnvar", "bnfactor"), id="train-4d"),
    C("BatchNorm", "", ((5, 3),), param_kinds=("bnmean", "bnvar", "bnfactor"), id="train-2d"),
    C("BatchNorm", "", ((3, 2, 2, 3),), phase="TEST", param_kinds=("bnmean", "bnvar", "bnfactor"), id="test"),
    C("BatchNorm", "batch_norm_param { use_global_stats: true }", ((3, 2, 2, 3),),
      param_kinds=("bnmean", "bnvar", "bnfactor"), id="train-global"),
    C("Scale", "", ((2, 3, 2, 2),), id="1bottom"),
    C("Scale", "scale_param { bias_term: true }", ((2, 3, 2, 2),), id="1bottom-bias"),
    C("Scale", "scale_param { axis: 1 num_axes: 2 bias_term: true }", ((2, 3, 2, 2),), id="num_axes2"),
    C("Scale", "scale_param { num_axes: 0 }", ((2, 3, 2),), id="num_axes0-scalar"),
    C("Scale", "scale_param { axis: 2 num_axes: -1 }", ((2, 3, 2, 2),), id="num_axes-1"),
    C("Scale", "", ((2, 3, 2, 2), (3,)), id="2bottoms"),
    C("Scale", "scale_param { axis: 0 bias_term: true }", ((2, 3, 4), (2, 3)), id="2bottoms-axis0-bias"),
    # element-wise and tensor plumbing
    C("Eltwise", "", ((2, 3, 2), (2, 3, 2)), id="sum"),
    C("Eltwise", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }", ((2, 3), (2, 3), (2, 3)),
      id="sum-coeff"),
    C("Eltwise", "eltwise_param { operation: PROD }", ((2, 3, 2), (2, 3, 2), (2, 3, 2)), id="prod"),
    C("Eltwise", "eltwise_param { operation: MAX }", ((2, 3, 2), (2, 3, 2), (2, 3, 2)), inputs=("d", "d", "d"),
      id="max"),
    C("Concat", "", ((2, 3, 2), (2, 1, 2), (2, 2, 2)), id="axis1"),
    C("Concat", "concat_param { axis: 0 }", ((2, 3), (1, 3)), id="axis0"),
    C("Concat", "concat_param { concat_dim: 2 }", ((1, 2, 1), (1, 2, 3)), id="concat_dim"),
    C("Slice", "slice_param { slice_point: 1 slice_point: 3 }", ((2, 5, 2),), tops=3, id="points"),
    C("Slice", "slice_param { axis: 0 }", ((4, 3),), tops=2, id="even-axis0"),
    C("Slice", "slice_param { slice_dim: 2 slice_point: 2 }", ((1, 2, 3),), tops=2, id="slice_dim"),
    C("Split", "", ((2, 3),), tops=2, id="2"),
    C("Split", "", ((2, 3, 2),), tops=3, id="3"),
    C("Flatten", "", ((2, 3, 2, 2),), id="default"),
    C("Flatten", "flatten_param { axis: 1 end_axis: 2 }", ((2, 3, 2, 2),), id="axis1-end2"),
    C("Reshape", "reshape_param { shape { dim: 0 dim: -1 } }", ((2, 3, 2, 2),), id="copy-infer"),
    C("Reshape", "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } }", ((1, 6, 3, 2),), id="rpn"),
    C("Reshape", "reshape_param { shape { dim: 2 dim: 3 } axis: 1 num_axes: 1 }", ((2, 6, 2),), id="axis1-num_axes1"),
    C("Reshape", "reshape_param { shape { dim: -1 } axis: -2 }", ((2, 3, 2),), id="axis-2"),
    C("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }", ((2, 3, 2, 4),), id="nhwc"),
    C("Permute", "permute_param { order: 2 }", ((2, 3, 4),), id="partial-order"),
    C("Crop", "crop_param { offset: 1 offset: 2 }", ((2, 2, 5, 6), (2, 2, 3, 3)), inputs=("n", "ref"), id="2offsets"),
    C("Crop", "crop_param { offset: 1 }", ((2, 2, 5, 6), (2, 2, 3, 4)), inputs=("n", "ref"), id="1offset"),
    C("Crop", "crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }", ((2, 4, 3, 5), (2, 2, 3, 2)),
      inputs=("n", "ref"), id="axis1"),
    C("Crop", "", ((1, 2, 4, 4), (1, 2, 2, 3)), inputs=("n", "ref"), id="default-offset0"),
    C("Silence", "", ((2, 3), (4,)), tops=0),
    # softmax and losses
    C("Softmax", "", ((2, 4, 3),), id="axis1"),
    C("Softmax", "softmax_param { axis: 2 }", ((2, 3, 4),), id="axis2"),
    C("Softmax", "softmax_param { axis: -1 }", ((3, 5),), id="axis-1"),
    C("SoftmaxWithLoss", "", ((4, 3), (4,)), inputs=("n", "lab3"), id="default"),
    C("SoftmaxWithLoss", "loss_param { ignore_label: -1 }", ((6, 3), (6,)), inputs=("n", "lab3i"), id="ignore"),
    *[C("SoftmaxWithLoss", f"loss_param {{ ignore_label: -1 normalization: {m} }}", ((2, 3, 2, 2), (2, 1, 2, 2)),
        inputs=("n", "lab3i"), id=f"norm-{m}") for m in ("FULL", "VALID", "BATCH_SIZE", "NONE")],
    C("SoftmaxWithLoss", "loss_param { ignore_label: -1 normalize: false }", ((3, 4), (3,)), inputs=("n", "lab4i"),
      id="normalize-false"),
    C("SoftmaxWithLoss", "loss_param { ignore_label: -1 normalize: true }", ((1, 2, 6, 3), (1, 1, 6, 3)),
      inputs=("n", "lab2i"), id="rpn-spatial"),
    C("SoftmaxWithLoss", "softmax_param { axis: 2 }", ((2, 3, 4), (2, 3)), inputs=("n", "lab4"), id="axis2"),
    C("SoftmaxWithLoss", "", ((3, 4), (3,)), tops=2, inputs=("n", "lab4"), grad_tops=(0,), id="prob-top"),
    C("SigmoidCrossEntropyLoss", "", ((3, 4), (3, 4)), inputs=("n", "u"), id="default"),
    C("SigmoidCrossEntropyLoss", "loss_param { ignore_label: -1 }", ((3, 2, 2), (3, 2, 2)), inputs=("n", "ui"),
      id="ignore"),
    C("SigmoidCrossEntropyLoss", "loss_param { ignore_label: -1 normalization: VALID }", ((3, 4), (3, 4)),
      inputs=("n", "ui"), id="ignore-valid"),
    C("EuclideanLoss", "", ((3, 4), (3, 4)), id="same-shape"),
    C("EuclideanLoss", "", ((3, 2, 2), (3, 4)), id="count1-match"),
    C("SmoothL1Loss", "", ((2, 3, 2), (2, 3, 2)), id="2bottoms-sigma1"),
    C("SmoothL1Loss", "smooth_l1_loss_param { sigma: 3.0 }", ((2, 3, 2), (2, 3, 2)), id="2bottoms-sigma3"),
    C("SmoothL1Loss", "", ((2, 4, 2, 2),) * 4, inputs=("n", "n", "w", "w"), id="4bottoms-sigma1"),
    C("SmoothL1Loss", "smooth_l1_loss_param { sigma: 3.0 }", ((1, 8, 2, 3),) * 4, inputs=("n", "n", "w", "w"),
      id="4bottoms-sigma3-rpn"),
    C("Accuracy", "", ((6, 4), (6,)), inputs=("n", "lab4"), id="top1"),
    C("Accuracy", "accuracy_param { top_k: 3 }", ((6, 5), (6,)), inputs=("n", "lab5"), id="top3"),
    C("Accuracy", "accuracy_param { ignore_label: -1 }", ((6, 4), (6,)), inputs=("n", "lab4i"), id="ignore"),
    C("Accuracy", "", ((6, 4), (6,)), tops=2, inputs=("n", "lab4"), id="per-class"),
    C("Accuracy", "accuracy_param { axis: 2 }", ((2, 3, 4), (2, 3)), inputs=("n", "lab4"), id="axis2"),
    # neuron layers (layers/neuron.py)
    # common layers (layers/common.py)
    # more losses (layers/loss.py) and ROIPooling (layers/rpn.py)
    # recurrent layers (layers/recurrent.py)
]

DATA_TYPES = {"Input", "DummyData", "MNIST", "DigitScenes", "AnchorTarget", "Proposal"}
CHECK_ONLY = {"Data", "Python", "ROIPooling"}      # runnable = False or no reader: shape rule only


def ids(cases):
    return [c.id for c in cases]


def test_table_covers_every_registered_layer_type():
    covered = {c.type for c in CASES} | DATA_TYPES | CHECK_ONLY
    assert set(layer_types()) <= covered, sorted(set(layer_types()) - covered)
    assert len({c.id for c in CASES}) == len(CASES)


# =============================================================================================
# Inputs and params

def gen(kind: str, shape, rng, pool=None) -> np.ndarray:
    n = math.prod(shape)
    if kind == "n":
        return rng.standard_normal(shape)
    if kind == "d":
        return pool(n).reshape(shape)
    if kind.startswith("lab"):
        ignore = kind.endswith("i")
        c = int(kind[3:-1] if ignore else kind[3:])
        lab = rng.integers(0, c, n).astype(F64)
        if ignore:
            lab[rng.permutation(n)[: max(1, n // 4)]] = -1
        return lab.reshape(shape)
    if kind in ("u", "ui"):
        t = rng.uniform(0.05, 0.95, n)
        if kind == "ui":
            t[rng.permutation(n)[: max(1, n // 4)]] = -1
        return t.reshape(shape)
    if kind == "w":
        return rng.uniform(0.5, 1.5, shape)
    if kind == "ref":
        return np.zeros(shape)
    raise ValueError(kind)


def distinct_pool(rng, total: int):
    """Hands out values from one shuffled grid with 0.05 spacing and no value within 0.025 of 0."""
    vals = list((rng.permutation(total) - total / 2 + 0.5) * 0.05 + rng.uniform(-0.004, 0.004, total))

    def take(n):
        out = np.array(vals[:n])
        del vals[:n]
        return out
    return take


def make_inputs(case: Case, rng):
    total = sum(math.prod(s) for s, k in zip(case.bottom_shapes, case.inputs) if k == "d")
    pool = distinct_pool(rng, total)
    return [gen(k, s, rng, pool) for k, s in zip(case.inputs, case.bottom_shapes)]


def make_params(layer, case: Case, rng):
    out = []
    kinds = case.param_kinds or ("n",) * len(layer.param_shapes)
    for kind, shape in zip(kinds, layer.param_shapes):
        if kind == "n":
            out.append(np.array(rng.standard_normal(shape) * 0.7))
        elif kind == "bnmean":
            out.append(rng.standard_normal(shape) * 2.5)
        elif kind == "bnvar":
            out.append(rng.uniform(0.5, 2.0, shape) * 2.5)
        elif kind == "bnfactor":
            out.append(np.full(shape, 2.5))
        else:
            raise ValueError(kind)
    return out


def forward(layer: Built, bottoms, params, seed: int = 0):
    """Forward with a fixed random stream (Dropout's mask is the same on every call)."""
    return layer.forward(np, bottoms, params, seed)



def assert_close(actual, expected, tol=1e-6, what=""):
    actual, expected = np.asarray(actual, F64), np.asarray(expected, F64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


def setup_case(case: Case):
    layer = case.layer()
    rng = np.random.default_rng(case.seed())
    bottoms = make_inputs(case, rng)
    params = make_params(layer, case, rng)
    return layer, rng, bottoms, params


# =============================================================================================
# Generic, table-driven tests

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_shape_rule_matches_forward(case: Case):
    layer, rng, bottoms, params = setup_case(case)
    assert [tuple(s) for s in layer.param_shapes] == [p.shape for p in params]
    tops, _ = forward(layer, bottoms, params)
    assert [tuple(t.shape) for t in tops] == [tuple(s) for s in layer.top_shapes]
    for t in tops:
        assert t.dtype == F64, f"{case.id}: a float64 forward returned {t.dtype}"
        assert np.all(np.isfinite(t))


GRAD_CASES = [c for c in CASES if not layer_types()[c.type].no_backward]


@pytest.mark.parametrize("case", GRAD_CASES, ids=ids(GRAD_CASES))
def test_gradients_match_central_differences(case: Case):
    layer, rng, bottoms, params = setup_case(case)
    tops, saved = forward(layer, bottoms, params)
    R = [rng.standard_normal(t.shape) if i in case.grad_tops else np.zeros(t.shape) for i, t in enumerate(tops)]

    def objective():
        ts, _ = forward(layer, bottoms, params)
        return sum(float((t * r).sum()) for t, r in zip(ts, R))

    need = [i in case.grad for i in range(len(bottoms))]
    kept = [r.copy() for r in R], [b.copy() for b in bottoms]
    dbottoms, dparams = layer.backward(np, saved, R, params, need)
    # the executor keeps every top gradient (net.blobs[..].grad) and every input: read-only
    for a, b in zip(R + bottoms, kept[0] + kept[1]):
        np.testing.assert_array_equal(a, b)
    assert len(dbottoms) == len(bottoms)
    for i in case.grad:
        assert dbottoms[i] is not None, f"no gradient for bottom {i}"
        assert_close(dbottoms[i], numeric_grad(objective, bottoms[i]), case.tol * 10, f"bottom {i}")
    if layer.frozen_params:
        return
    assert len(dparams) == len(params)
    for j, p in enumerate(params):
        assert_close(dparams[j], numeric_grad(objective, p), case.tol * 10, f"param {j}")


LOSS_CASES = [c for c in CASES if layer_types()[c.type].is_loss]


@pytest.mark.parametrize("case", LOSS_CASES, ids=ids(LOSS_CASES))
def test_loss_backward_of_the_loss_weight(case: Case):
    """A loss top's gradient is its loss weight: backward(w) = w * d(loss)/d(bottom)."""
    layer, rng, bottoms, params = setup_case(case)
    tops, saved = forward(layer, bottoms, params)
    assert tops[0].shape == ()
    extra = [np.zeros(t.shape) for t in tops[1:]]
    need = [i in case.grad for i in range(len(bottoms))]
    g1, _ = layer.backward(np, saved, [np.array(1.0)] + extra, params, need)
    w = 2.5
    gw, _ = layer.backward(np, saved, [np.array(w)] + extra, params, need)
    for i in case.grad:
        num = numeric_grad(lambda: float(forward(layer, bottoms, params)[0][0]), bottoms[i])
        assert_close(g1[i], num, 1e-5, f"bottom {i}")
        assert_close(gw[i], w * num, 1e-5, f"bottom {i} x {w}")
    for i, b in enumerate(bottoms):      # labels, targets' weights: never a gradient
        if i not in case.grad and case.inputs[i] != "n":
            assert g1[i] is None or not np.any(g1[i])


# =============================================================================================
# Naive references (Caffe's CPU loops, float64) through the layer classes

def _geometry(layer):
    p = layer.p
    k = spatial(p, "kernel_size", None, "kernel_h", "kernel_w")
    dil = spatial(p, "dilation", 1) if layer.type != "Pooling" else (1, 1)
    return k, spatial(p, "stride", 1), spatial(p, "pad", 0), dil


CONV_REF_CASES = [c for c in CASES if c.type in ("Convolution", "Deconvolution")]


@pytest.mark.parametrize("case", CONV_REF_CASES, ids=ids(CONV_REF_CASES))
def test_convolution_matches_naive_loops(case: Case):
    layer, rng, (x,), params = setup_case(case)
    (y,), _ = forward(layer, [x], params)
    _, st, pad, dil = _geometry(layer)
    ref = conv_ref if case.type == "Convolution" else deconv_ref
    b = params[1] if layer.p.bias_term else None
    assert_close(y, ref(x, params[0], b, st, pad, dil, layer.p.group), 1e-12)


POOL_REF_CASES = [c for c in CASES if c.type == "Pooling"]


@pytest.mark.parametrize("case", POOL_REF_CASES, ids=ids(POOL_REF_CASES))
def test_pooling_matches_caffe_loops(case: Case):
    layer, rng, (x,), _ = setup_case(case)
    tops, saved = forward(layer, [x], [])
    p = layer.p
    if p.global_pooling:
        (kh, kw), (sh, sw), (ph, pw) = x.shape[2:], (1, 1), (0, 0)
    else:
        (kh, kw), (sh, sw), (ph, pw), _ = _geometry(layer)
    y, mask = pool_ref(x, p.pool, kh, kw, sh, sw, ph, pw, p.round_mode == "CEIL")
    assert_close(tops[0], y, 1e-12)
    if p.pool == "MAX":
        # backward routes each top gradient to the input cell the mask names (Caffe's first max)
        dy = rng.standard_normal(y.shape)
        (dx,), _ = layer.backward(np, saved, [dy] + [np.zeros(y.shape)] * (len(tops) - 1), [], [True])
        ref = np.zeros(x.shape)
        for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
            for r, q in np.ndindex(*y.shape[2:]):
                ref[n, c].flat[int(mask[n, c, r, q])] += dy[n, c, r, q]
        assert_close(dx, ref, 1e-12)
    if len(tops) == 2:
        np.testing.assert_array_equal(tops[1], mask)


def test_pooling_max_ties_take_the_first_max_like_caffe():
    """Caffe's strict '>' keeps the first maximum in row-major window order (all three paths)."""
    for params, shape in (("kernel_size: 2 stride: 2", (1, 1, 4, 4)), ("kernel_size: 3 stride: 2", (1, 1, 5, 5)),
                          ("global_pooling: true", (1, 1, 3, 3))):
        layer = build_layer("Pooling", f"pooling_param {{ pool: MAX {params} }}", [shape], ntops=2)
        x = np.ones(shape)
        tops, saved = forward(layer, [x], [])
        _, mask = pool_ref(x, "MAX", *_pool_geom(layer, x), ceil=True)
        np.testing.assert_array_equal(tops[1], mask)
        dy = np.random.default_rng(0).standard_normal(tops[0].shape)
        (dx,), _ = layer.backward(np, saved, [dy, np.zeros(dy.shape)], [], [True])
        ref = np.zeros(shape)
        for m, g in zip(mask.reshape(-1), dy.reshape(-1)):
            ref.reshape(-1)[int(m)] += g
        assert_close(dx, ref, 1e-15)


def test_pooling_mask_top_is_rejected_for_ave():
    from netdsl.errors import NetdslError
    with pytest.raises(NetdslError):
        build_layer("Pooling", "pooling_param { pool: AVE kernel_size: 2 }", [(1, 1, 4, 4)], ntops=2)


def _pool_geom(layer, x):
    if layer.p.global_pooling:
        return (x.shape[2], x.shape[3], 1, 1, 0, 0)
    (kh, kw), (sh, sw), (ph, pw), _ = _geometry(layer)
    return (kh, kw, sh, sw, ph, pw)


def test_pooling_pad_correction_applies_to_both_axes_when_either_is_padded():
    shape = (1, 1, 4, 5)
    layer = build_layer("Pooling", "pooling_param { pool: MAX kernel_h: 2 kernel_w: 1 stride_h: 1 stride_w: 3 "
                                   "pad_h: 1 pad_w: 0 }", [shape])
    x = np.arange(20.0).reshape(shape)
    y, _ = pool_ref(x, "MAX", 2, 1, 1, 3, 1, 0)
    assert layer.top_shapes[0] == y.shape        # Caffe: 5 x 2; netdsl: 5 x 3
    (top,), _ = forward(layer, [x], [])
    assert_close(top, y)


# =============================================================================================
# Exact values of the Caffe formulas that matter

def run(type_, params, *bottoms, ntops=1, phase="TRAIN", layer_params=()):
    layer = build_layer(type_, params, [b.shape for b in bottoms], ntops, phase)
    tops, saved = forward(layer, [np.asarray(b, F64) for b in bottoms], list(layer_params))
    return layer, tops, saved


def test_softmax_loss_clamps_probability_at_flt_min():
    x = np.array([[0.0, 1000.0], [0.0, 0.0]])
    layer, (loss,), saved = run("SoftmaxWithLoss", "loss_param { normalization: NONE }", x, np.array([0.0, 0.0]))
    assert float(loss) == pytest.approx(-math.log(FLT_MIN) + math.log(2.0), rel=1e-12)
    # the gradient ignores the clamp, as Caffe's: p - onehot
    (dx, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, False])
    np.testing.assert_allclose(dx, [[-1.0, 1.0], [-0.5, 0.5]], atol=1e-15)


def test_softmax_loss_every_normalization_by_hand():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2, 2))
    lab = np.array([[0, 1, -1, 2], [-1, -1, 1, 0]], F64).reshape(2, 1, 2, 2)
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    nll = 0.0
    for n, h, w in itertools.product(range(2), range(2), range(2)):
        k = int(lab[n, 0, h, w])
        if k >= 0:
            nll -= math.log(p[n, k, h, w])
    expect = {"FULL": nll / 8, "VALID": nll / 5, "BATCH_SIZE": nll / 2, "NONE": nll}
    for mode, value in expect.items():
        _, (loss,), _ = run("SoftmaxWithLoss", f"loss_param {{ ignore_label: -1 normalization: {mode} }}", x, lab)
        assert float(loss) == pytest.approx(value, rel=1e-12), mode
    # the deprecated `normalize` maps true -> VALID, false -> BATCH_SIZE, and yields to `normalization`
    for text, value in (("normalize: true", expect["VALID"]), ("normalize: false", expect["BATCH_SIZE"]),
                        ("normalize: false normalization: FULL", expect["FULL"]), ("", expect["VALID"])):
        _, (loss,), _ = run("SoftmaxWithLoss", f"loss_param {{ ignore_label: -1 {text} }}", x, lab)
        assert float(loss) == pytest.approx(value, rel=1e-12), text


def test_softmax_loss_normaliser_is_clamped_at_one():
    """Every label ignored: VALID's count is 0, clamped to 1, so the loss and gradient are 0, not NaN."""
    x = np.random.default_rng(2).standard_normal((3, 4))
    layer, (loss,), saved = run("SoftmaxWithLoss", "loss_param { ignore_label: 7 }", x, np.full(3, 7.0))
    assert float(loss) == 0.0
    (dx, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, False])
    assert np.all(dx == 0)
    # a single valid label with NONE / FULL on a 1-element batch: normaliser 1 either way
    _, (l1,), _ = run("SoftmaxWithLoss", "loss_param { normalization: FULL }", x[:1], np.array([2.0]))
    p = np.exp(x[0]) / np.exp(x[0]).sum()
    assert float(l1) == pytest.approx(-math.log(p[2]), rel=1e-12)


def test_softmax_loss_rpn_layout():
    """(1, 2, A*H, W) scores with (1, 1, A*H, W) labels, ignore -1, normalize: true -> mean over valid."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 3))
    lab = rng.integers(-1, 2, (1, 1, 6, 3)).astype(F64)
    layer, (loss,), saved = run("SoftmaxWithLoss", "loss_param { ignore_label: -1 normalize: true }", x, lab)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    valid = lab[0, 0] >= 0
    picked = np.where(lab[0, 0] == 1, logp[0, 1], logp[0, 0])
    assert float(loss) == pytest.approx(-(picked * valid).sum() / valid.sum(), rel=1e-12)
    (dx, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, False])
    assert np.all(dx[:, :, ~valid] == 0)


def test_accuracy_ties_count_against():
    x = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0], [0.0, 3.0, 3.0], [5.0, 1.0, 2.0]])
    lab = np.array([0.0, 0.0, 2.0, 1.0])
    # row 0: tie with class 1 -> wrong at top-1, right at top-2; row 1: right; row 2: tie -> wrong;
    # row 3: class 1 is third -> wrong at top-1 and top-2
    _, (acc,), _ = run("Accuracy", "", x, lab)
    assert float(acc) == pytest.approx(1 / 4)
    _, (acc2,), _ = run("Accuracy", "accuracy_param { top_k: 2 }", x, lab)
    assert float(acc2) == pytest.approx(3 / 4)
    _, (acc3, per), _ = run("Accuracy", "accuracy_param { top_k: 2 }", x, lab, ntops=2)
    assert float(acc3) == float(acc2)
    np.testing.assert_allclose(per, [1.0, 0.0, 1.0])        # class 1: 0 of 1
    _, (acc4, per4), _ = run("Accuracy", "accuracy_param { ignore_label: 1 }", x, lab, ntops=2)
    assert float(acc4) == pytest.approx(1 / 3)              # row 3 is ignored: 1 of 3
    np.testing.assert_allclose(per4, [0.5, 0.0, 0.0])       # ignored class counts nothing (0, not NaN)
    _, (acc5,), _ = run("Accuracy", "accuracy_param { ignore_label: 0 }", x[:1], lab[:1])
    assert float(acc5) == 0.0                               # no valid label: 0, not NaN
    # top_k 3 over 4 classes: a 3-way tie above the true class is 3 "better" classes -> wrong
    x4 = np.array([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    _, (acc6,), _ = run("Accuracy", "accuracy_param { top_k: 3 }", x4, np.array([3.0, 2.0, 2.0, 0.0]))
    assert float(acc6) == pytest.approx(2 / 4)              # rows 1 and 2 right, rows 0 and 3 wrong


def test_dropout_scales_by_one_over_keep_in_train_and_is_identity_in_test():
    x = np.random.default_rng(4).uniform(1, 2, (50, 40))
    layer, (y,), mask = run("Dropout", "dropout_param { dropout_ratio: 0.3 }", x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-15)
    assert abs(1 - kept.mean() - 0.3) < 0.03
    (dx,), _ = layer.backward(np, mask, [np.ones_like(x)], [], [True])
    np.testing.assert_allclose(dx, kept / 0.7, rtol=1e-15)
    _, (yt,), _ = run("Dropout", "dropout_param { dropout_ratio: 0.3 }", x, phase="TEST")
    np.testing.assert_array_equal(yt, x)
    # caffe-fast-rcnn's scale_train: false scales at TEST time instead
    _, (y2,), _ = run("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }", x)
    np.testing.assert_allclose(y2[y2 != 0], x[y2 != 0], rtol=1e-15)
    _, (y3,), _ = run("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }", x, phase="TEST")
    np.testing.assert_allclose(y3, x * 0.7, rtol=1e-15)


def test_dropout_mask_follows_the_net_seed():
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 8 } } }\n'
            'layer { name: "d" type: "Dropout" bottom: "x" top: "y" }\n'
            'layer { name: "l" type: "EuclideanLoss" bottom: "y" bottom: "x" top: "l" }')
    x = np.ones((4, 8))
    a, b, c = make_net(text), make_net(text), make_net(text, seed=1)
    ya, yb, yc = (n.forward(x=x) and n.blobs["y"].data.copy() for n in (a, b, c))
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(ya, yc)
    ya2 = a.forward(x=x) and a.blobs["y"].data
    assert not np.array_equal(ya, ya2)          # a new mask every iteration


def test_euclidean_loss_is_half_mean_over_batch():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    b = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    layer, (loss,), saved = run("EuclideanLoss", "", a, b)
    assert float(loss) == pytest.approx((4 + 9 + 1 + 1) / (2 * 2))
    (da, db), _ = layer.backward(np, saved, [np.array(3.0)], [], [True, True])
    np.testing.assert_allclose(da, 3.0 * (a - b) / 2)
    np.testing.assert_allclose(db, -3.0 * (a - b) / 2)


def test_sigmoid_cross_entropy_is_stable_at_large_magnitudes():
    x = np.array([[100.0, -100.0, 100.0, -100.0]])
    t = np.array([[0.0, 1.0, 1.0, 0.0]])
    layer, (loss,), saved = run("SigmoidCrossEntropyLoss", "", x, t)
    assert float(loss) == pytest.approx(200.0, rel=1e-12)        # two confident mistakes, N = 1
    (dx, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, False])
    np.testing.assert_allclose(dx, [[1.0, -1.0, 0.0, 0.0]], atol=1e-40)
    _, (small,), _ = run("SigmoidCrossEntropyLoss", "", x[:, 2:], t[:, 2:])
    assert 0.0 <= float(small) < 1e-40
    # default normalisation is BATCH_SIZE (N = 2 here), and ignored targets count for nothing
    x2 = np.array([[0.0, 2.0], [-1.0, 3.0]])
    t2 = np.array([[1.0, -1.0], [0.0, 1.0]])
    el = np.log1p(np.exp(-np.abs(x2))) + np.maximum(x2, 0) - x2 * t2
    _, (l2,), _ = run("SigmoidCrossEntropyLoss", "loss_param { ignore_label: -1 }", x2, t2)
    assert float(l2) == pytest.approx((el.sum() - el[0, 1]) / 2, rel=1e-12)
    _, (l3,), _ = run("SigmoidCrossEntropyLoss", "loss_param { ignore_label: -1 normalization: VALID }", x2, t2)
    assert float(l3) == pytest.approx((el.sum() - el[0, 1]) / 3, rel=1e-12)


def test_smooth_l1_by_hand():
    x = np.array([[0.05, 0.5, -2.0, 0.2]])
    t = np.zeros_like(x)
    w_in = np.array([[1.0, 1.0, 0.5, 0.0]])
    w_out = np.array([[2.0, 1.0, 1.0, 1.0]])
    # sigma 3: threshold 1/9; d = w_in * x = [0.05, 0.5, -1, 0]
    f = np.array([0.5 * 9 * 0.05 ** 2, 0.5 - 0.5 / 9, 1 - 0.5 / 9, 0.0]) * w_out[0]
    layer, (loss,), saved = run("SmoothL1Loss", "smooth_l1_loss_param { sigma: 3 }", x, t, w_in, w_out)
    assert float(loss) == pytest.approx(f.sum(), rel=1e-12)
    (dx, dt, dwi, dwo), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, True, False, False])
    np.testing.assert_allclose(dx, [[9 * 0.05 * 2, 1.0, -0.5, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(dt, -dx)
    assert dwi is None and dwo is None


def test_batchnorm_moving_average_and_scale_factor():
    """Caffe: s = maf*s + 1; mean_sum = mean + maf*mean_sum; var_sum = m/(m-1)*var + maf*var_sum;
    global stats divide the sums by s."""
    rng = np.random.default_rng(5)
    maf, eps = 0.9, 1e-5
    shape = (2, 3, 2, 2)
    layer = build_layer("BatchNorm", f"batch_norm_param {{ moving_average_fraction: {maf} }}", [shape])
    params = [np.zeros(3), np.zeros(3), np.zeros(1)]
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape) * 2 + 1
    m = 8
    mean1, var1 = x1.mean(axis=(0, 2, 3)), x1.var(axis=(0, 2, 3))
    mean2, var2 = x2.mean(axis=(0, 2, 3)), x2.var(axis=(0, 2, 3))
    (y1,), _ = forward(layer, [x1], params)
    # TRAIN normalises with the batch's biased variance
    assert_close(y1, (x1 - mean1.reshape(1, 3, 1, 1)) / np.sqrt(var1.reshape(1, 3, 1, 1) + eps), 1e-12)
    assert_close(params[2], [1.0], 1e-15)
    assert_close(params[0], mean1, 1e-15)
    assert_close(params[1], var1 * m / (m - 1), 1e-15)
    forward(layer, [x2], params)
    assert_close(params[2], [maf + 1], 1e-15)
    assert_close(params[0], mean2 + maf * mean1, 1e-14)
    assert_close(params[1], var2 * m / (m - 1) + maf * var1 * m / (m - 1), 1e-14)
    # TEST uses the sums divided by the scale factor, and leaves them alone
    test = build_layer("BatchNorm", "", [shape], phase="TEST")
    before = [p.copy() for p in params]
    x3 = rng.standard_normal(shape)
    (y3,), _ = forward(test, [x3], params)
    mu, var = params[0] / params[2][0], params[1] / params[2][0]
    assert_close(y3, (x3 - mu.reshape(1, 3, 1, 1)) / np.sqrt(var.reshape(1, 3, 1, 1) + eps), 1e-12)
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    # a zero scale factor (never trained) means zero statistics, as Caffe
    (y0,), _ = forward(test, [x3], [np.ones(3), np.ones(3), np.zeros(1)])
    assert_close(y0, x3 / np.sqrt(eps), 1e-12)


def test_batchnorm_m_equal_one_has_no_correction():
    layer = build_layer("BatchNorm", "", [(1, 2)])
    params = [np.zeros(2), np.zeros(2), np.zeros(1)]
    forward(layer, [np.array([[3.0, 4.0]])], params)
    np.testing.assert_array_equal(params[1], [0.0, 0.0])       # var 0 * (m/(m-1) -> 1), not a division by 0
    np.testing.assert_array_equal(params[0], [3.0, 4.0])


def test_eltwise_max_tie_goes_where_caffe_sends_it():
    """Caffe compares bottoms 0 and 1 with `a > b ? 0 : 1` (a tie goes to bottom 1), later bottoms
    with a strict '>' (a tie keeps the earlier winner)."""
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([1.0, 1.0, 3.0])
    c = np.array([0.0, 2.0, 3.0])
    layer, (y,), saved = run("Eltwise", "eltwise_param { operation: MAX }", a, b, c)
    np.testing.assert_array_equal(y, [1.0, 2.0, 3.0])
    (da, db, dc), _ = layer.backward(np, saved, [np.ones(3)], [], [True] * 3)
    np.testing.assert_array_equal(da, [0, 1, 0])
    np.testing.assert_array_equal(db, [1, 0, 1])
    np.testing.assert_array_equal(dc, [0, 0, 0])


def test_lrn_against_formulas():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 3, 3))
    _, (y,), _ = run("LRN", "lrn_param { local_size: 3 alpha: 2 beta: 0.75 k: 1.5 }", x)
    ref = np.zeros_like(x)
    for c in range(5):
        lo, hi = max(0, c - 1), min(5, c + 2)
        ref[:, c] = x[:, c] * (1.5 + 2 / 3 * (x[:, lo:hi] ** 2).sum(axis=1)) ** -0.75
    assert_close(y, ref, 1e-12)
    _, (yw,), _ = run("LRN", "lrn_param { local_size: 3 alpha: 2 beta: 0.75 k: 7 norm_region: WITHIN_CHANNEL }", x)
    avg, _ = pool_ref(x * x, "AVE", 3, 3, 1, 1, 1, 1)
    assert_close(yw, x * (1 + 2 * avg) ** -0.75, 1e-12)       # WITHIN ignores k, as Caffe


def test_scale_and_bias_values():
    x = np.arange(12.0).reshape(2, 3, 2)
    layer = build_layer("Scale", "scale_param { bias_term: true }", [x.shape])
    (y,), _ = forward(layer, [x], [np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0])])
    np.testing.assert_allclose(y, x * [[[1], [2], [3]]] + [[[0.5], [0.0], [-1.0]]])


def test_silence_backward_is_zero_and_keeps_dtype():
    layer, tops, saved = run("Silence", "", np.ones((2, 3)), np.ones(4), ntops=0)
    assert tops == []
    dxs, _ = layer.backward(np, saved, [], [], [True, True])
    assert [d.shape for d in dxs] == [(2, 3), (4,)] and all(d.dtype == F64 and not d.any() for d in dxs)


# =============================================================================================
# Data and region-proposal layers: the shape rule equals forward's shapes

def _compatible(rule, actual) -> bool:
    return len(rule) == len(actual) and all(r is None or r == a for r, a in zip(rule, actual))


def assert_net_shapes(net: Net):
    """Every blob the net computed has the shape its producer's shape rule gave (None = any)."""
    seen = 0
    for name, value in net.values.items():
        rule = net.plan.blob_shapes[name]
        assert _compatible(tuple(rule), value.shape), (name, rule, value.shape)
        seen += 1
    assert seen


LOSS_TAIL = ('layer { name: "zin" type: "Input" top: "z" input_param { shape { dim: 1 } } }\n'
             'layer { name: "zl" type: "EuclideanLoss" bottom: "z" bottom: "z" top: "zl" }\n')


def test_input_and_dummydata_shapes():
    text = ('layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } '
            'shape { dim: 4 } } }\n'
            'layer { name: "dd" type: "DummyData" top: "c" top: "d" dummy_data_param { '
            'shape { dim: 2 dim: 1 dim: 3 } shape { dim: 5 } data_filler { type: "gaussian" } } }\n'
            'layer { name: "dd2" type: "DummyData" top: "e" dummy_data_param { num: 1 channels: 2 height: 3 width: 4 '
            'data_filler { type: "constant" value: 7 } } }\n' + LOSS_TAIL)
    net = make_net(text)
    net.forward(a=np.zeros((2, 3)), b=np.zeros(4), z=np.zeros(1))
    assert_net_shapes(net)
    assert net.blobs["e"].data.shape == (1, 2, 3, 4) and np.all(net.blobs["e"].data == 7)


DATA_DIR = str(shared_data_dir())


@needs_mnist
@pytest.mark.parametrize("params, phase", [("mnist_param { batch_size: 3 }", "TRAIN"),
                                           ("mnist_param { batch_size: 2 split: TEST } transform_param "
                                            "{ crop_size: 24 scale: 0.00390625 }", "TEST")])
def test_mnist_shapes(params, phase):
    text = f'layer {{ name: "m" type: "MNIST" top: "data" top: "label" {params} }}\n' + LOSS_TAIL
    net = make_net(text, phase=phase, data_dir=DATA_DIR)
    net.forward(z=np.zeros(1))
    assert_net_shapes(net)


@needs_mnist
def test_digit_scenes_shapes():
    text = ('layer { name: "s" type: "DigitScenes" top: "data" top: "im_info" top: "gt_boxes" '
            'digit_scenes_param { height: 64 width: 80 channels: 3 max_digits: 3 min_size: 16 max_size: 40 } }\n'
            + LOSS_TAIL)
    net = make_net(text, data_dir=DATA_DIR)
    for _ in range(2):
        net.forward(z=np.zeros(1))
        assert_net_shapes(net)


RPN_INPUTS = ('layer { name: "in" type: "Input" top: "score" top: "deltas" top: "gt" top: "info" input_param { '
              'shape { dim: 1 dim: 12 dim: 4 dim: 5 } shape { dim: 1 dim: 24 dim: 4 dim: 5 } '
              'shape { dim: 2 dim: 5 } shape { dim: 1 dim: 3 } } }\n')
ANCHORS = "scales: 2 scales: 4 ratios: 0.5 ratios: 1 ratios: 2 feat_stride: 16"   # 6 anchors


def _rpn_feed(rng):
    return dict(score=rng.uniform(0, 1, (1, 12, 4, 5)), deltas=rng.standard_normal((1, 24, 4, 5)) * 0.1,
                gt=np.array([[10.0, 8.0, 50.0, 40.0, 1.0], [30.0, 20.0, 70.0, 60.0, 2.0]]),
                info=np.array([[64.0, 80.0, 1.0]]), z=np.zeros(1))


def test_anchor_target_shapes():
    text = RPN_INPUTS + (f'layer {{ name: "at" type: "AnchorTarget" bottom: "score" bottom: "gt" bottom: "info" '
                         f'top: "labels" top: "targets" top: "w_in" top: "w_out" anchor_target_param {{ {ANCHORS} '
                         'allowed_border: 100 } }\n') + LOSS_TAIL
    net = make_net(text)
    net.forward(**_rpn_feed(np.random.default_rng(0)))
    assert_net_shapes(net)
    assert net.blobs["labels"].data.shape == (1, 1, 24, 5)


@pytest.mark.parametrize("ntops", [1, 2])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_proposal_shapes(ntops, phase):
    tops = 'top: "rois"' + (' top: "scores"' if ntops == 2 else "")
    text = RPN_INPUTS + (f'layer {{ name: "p" type: "Proposal" bottom: "score" bottom: "deltas" bottom: "info" {tops} '
                         f'proposal_param {{ {ANCHORS} min_size: 2 }} }}\n') + LOSS_TAIL
    net = make_net(text, phase=phase)
    net.forward(**_rpn_feed(np.random.default_rng(1)))
    assert_net_shapes(net)
    assert net.blobs["rois"].data.shape[0] >= 1


def test_roipooling_shape_rule_is_caffe_fast_rcnn():
    """Checked only (runnable = False): rois R x 5 and a C x H x W map give R x C x pooled_h x pooled_w."""
    text = ('layer { name: "in" type: "Input" top: "x" top: "rois" input_param { shape { dim: 1 dim: 8 dim: 6 dim: 6 }'
            ' shape { dim: 7 dim: 5 } } }\n'
            'layer { name: "L" type: "ROIPooling" bottom: "x" bottom: "rois" top: "pool" '
            'roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.0625 } }\n')
    ch = check_mod.check(syntax.parse(text, "t.net"), phase="TEST")
    assert ch.blobs["pool"] == (7, 8, 3, 2)


# =============================================================================================
# Net-level: the executor's gradient plumbing

def net_grads_match_numeric(net: Net, feed: dict, tol=1e-6):
    net.zero_grad()
    net.forward(**feed)
    net.backward()

    def loss():
        net.forward(**feed)
        return net.loss()
    checked = 0
    for key, p in net.slots.items():
        if p.frozen:
            continue
        num = numeric_grad(loss, p.data)
        assert_close(p.grad, num, tol * 10, key)
        checked += 1
    return checked


def _ip(name, bottom, top, n, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


INPUTS = 'layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }\n'


def _feed(seed=0):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((3, 4)), t=rng.standard_normal((3, 2)))


def test_fan_out_accumulates_gradients():
    text = (INPUTS + _ip("a", "x", "a", 3) + _ip("b", "a", "b", 2) + _ip("c", "a", "c", 2)
            + 'layer { name: "lb" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "lb" }\n'
            + 'layer { name: "lc" type: "EuclideanLoss" bottom: "c" bottom: "t" top: "lc" }\n')
    net = make_net(text)
    assert net_grads_match_numeric(net, _feed()) == 6
    # the fan-out blob's gradient is the sum of both readers'
    only_b = make_net(text.replace('top: "lc" }', 'top: "lc" loss_weight: 0 }'), share_from=net)
    only_c = make_net(text.replace('top: "lb" }', 'top: "lb" loss_weight: 0 }'), share_from=net)
    ga = []
    for n in (net, only_b, only_c):
        n.zero_grad()
        n.forward(**_feed())
        n.backward()
        ga.append(n.slots["a/0"].grad.copy())
    assert_close(ga[0], ga[1] + ga[2], 1e-12)


def test_in_place_relu():
    text = (INPUTS + _ip("a", "x", "a", 3) + 'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }\n'
            + _ip("b", "a", "b", 2) + 'layer { name: "l" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "l" }\n')
    net = make_net(text)
    feed = _feed(1)
    net.forward(**feed)
    pre = net.values["a"]
    post = net.values["a#2"]
    np.testing.assert_array_equal(post, np.maximum(pre, 0))
    assert (pre < 0).any()                        # the pre-activation survives for backward
    assert net_grads_match_numeric(net, feed) == 4


def test_shared_params_sum_their_gradients():
    share = 'param { name: "w" } param { name: "wb" }'
    text = (INPUTS + _ip("a", "x", "a", 4, share) + _ip("a2", "a", "a2", 4, share) + _ip("b", "a2", "b", 2)
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "l" }\n')
    net = make_net(text)
    assert set(net.slots) == {"w", "wb", "b/0", "b/1"}
    assert net.params["a"][0] is net.params["a2"][0]
    assert net_grads_match_numeric(net, _feed(2)) == 4


def test_propagate_down_zero_stops_the_gradient():
    text = (INPUTS + _ip("a", "x", "a", 3)
            + _ip("b", "a", "b", 2, "propagate_down: 0")
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "l" }\n')
    net = make_net(text)
    steps = {s.node.name: s for s in net.plan.steps}
    assert steps["b"].need_backward and steps["b"].propagate == [False]

    def boom(*a, **k):
        raise AssertionError("backward below a propagate_down: 0")
    steps["a"].layer.backward = boom
    net.forward(**_feed())
    net.backward()
    assert not net.slots["a/0"].grad.any() and not net.slots["a/1"].grad.any()
    assert net.slots["b/0"].grad.any()
    # the propagate_down of a loss: labels never, scores only if asked
    text2 = (INPUTS + _ip("a", "x", "a", 2)
             + 'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "t" top: "l" propagate_down: 0 '
               'propagate_down: 1 }\n')
    net2 = make_net(text2)
    net2.forward(**_feed())
    net2.backward()
    assert not net2.slots["a/0"].grad.any()


def test_loss_weight_scales_loss_and_gradients():
    base = (INPUTS + _ip("a", "x", "a", 2) + 'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "t" '
            'top: "l" LW }\n')
    one, two = make_net(base.replace("LW", "")), make_net(base.replace("LW", "loss_weight: 2"))
    for n in (one, two):
        n.forward(**_feed())
        n.backward()
    assert two.loss() == pytest.approx(2 * one.loss(), rel=1e-14)
    assert_close(two.slots["a/0"].grad, 2 * one.slots["a/0"].grad, 1e-14)
    assert net_grads_match_numeric(two, _feed()) == 2
    # a non-loss layer with a loss weight contributes sum(top) * w
    text = INPUTS + _ip("a", "x", "a", 2, "loss_weight: 0.5")
    net = make_net(text)
    net.forward(**_feed())
    assert net.loss() == pytest.approx(0.5 * net.blobs["a"].data.sum(), rel=1e-14)
    assert net_grads_match_numeric(net, _feed()) == 2


def test_layer_not_reaching_the_loss_gets_no_backward():
    text = (INPUTS + _ip("a", "x", "a", 3) + _ip("side", "a", "side", 2) + _ip("b", "a", "b", 2)
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "l" }\n')
    net = make_net(text)
    steps = {s.node.name: s for s in net.plan.steps}
    assert not steps["side"].need_backward

    def boom(*a, **k):
        raise AssertionError("backward of a layer that reaches no loss")
    steps["side"].layer.backward = boom
    assert net_grads_match_numeric(net, _feed()) == 6     # side/0 and side/1: zero, as numerically
    assert not net.slots["side/0"].grad.any()


def test_test_net_shares_the_train_nets_weights():
    text = (INPUTS + _ip("a", "x", "a", 3)
            + 'layer { name: "bn" type: "BatchNorm" bottom: "a" top: "a" }\n'
            + _ip("b", "a", "b", 2)
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "b" bottom: "t" top: "l" }\n')
    train = make_net(text)
    test = make_net(text, phase="TEST", share_from=train)
    for key, p in train.slots.items():
        assert test.slots[key] is p
    feed = _feed(3)
    train.forward(**feed)                         # updates the shared BatchNorm statistics
    assert train.params["bn"][2].data[0] == 1.0
    train.params["a"][0].data[...] *= 2          # a solver step, seen by the TEST net at once
    test.forward(**feed)
    a = feed["x"] @ train.params["a"][0].data.T + train.params["a"][1].data
    mean, var = (p.data / train.params["bn"][2].data[0] for p in train.params["bn"][:2])
    a = (a - mean) / np.sqrt(var + 1e-5)
    b = a @ train.params["b"][0].data.T + train.params["b"][1].data
    assert_close(test.blobs["b"].data, b, 1e-12)
    assert train.params["bn"][2].data[0] == 1.0  # TEST leaves the statistics alone


def test_whole_small_convnet_gradients():
    """Conv -> ReLU -> MAX pool -> LRN -> Scale(bias) -> IP -> SoftmaxWithLoss through Net."""
    text = ('layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 2 dim: 6 dim: 6 } '
            'shape { dim: 2 } } }\n'
            'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 3 '
            'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.1 } } }\n'
            'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
            'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }\n'
            'layer { name: "n" type: "LRN" bottom: "p" top: "n" lrn_param { local_size: 3 alpha: 0.5 } }\n'
            'layer { name: "s" type: "Scale" bottom: "n" top: "n" scale_param { bias_term: true } }\n'
            'layer { name: "f" type: "InnerProduct" bottom: "n" top: "f" inner_product_param { num_output: 3 '
            'weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "l" type: "SoftmaxWithLoss" bottom: "f" bottom: "y" top: "l" }\n')
    net = make_net(text)
    rng = np.random.default_rng(9)
    feed = dict(x=rng.standard_normal((2, 2, 6, 6)), y=np.array([0.0, 2.0]))
    assert net_grads_match_numeric(net, feed, tol=1e-5) == 6


# =============================================================================================
# PyTorch CPU oracles (optional)

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("case", [c for c in CONV_REF_CASES], ids=ids(CONV_REF_CASES))
def test_conv_matches_torch(case: Case):
    torch = _torch()
    F = torch.nn.functional
    layer, rng, (x,), params = setup_case(case)
    (y,), saved = forward(layer, [x], params)
    _, st, pad, dil = _geometry(layer)
    W = torch.tensor(params[0], requires_grad=True)
    b = torch.tensor(params[1], requires_grad=True) if layer.p.bias_term else None
    xt = torch.tensor(x, requires_grad=True)
    op = F.conv2d if case.type == "Convolution" else F.conv_transpose2d
    yt = op(xt, W, b, stride=st, padding=pad, dilation=dil, groups=layer.p.group)
    assert_close(y, yt.detach().numpy(), 1e-12)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    (dx,), dps = layer.backward(np, saved, [dy], params, [True])
    assert_close(dx, xt.grad.numpy(), 1e-12)
    assert_close(dps[0], W.grad.numpy(), 1e-12)
    if b is not None:
        assert_close(dps[1], b.grad.numpy(), 1e-12)


TORCH_POOL = [   # (pool, kernel, stride, pad, input) with torch-legal pad <= k/2
    ("MAX", 3, 2, 0, (1, 2, 6, 6)), ("MAX", 3, 2, 1, (1, 2, 5, 6)), ("MAX", 2, 2, 1, (1, 2, 5, 5)),
    ("MAX", 3, 1, 1, (1, 2, 4, 4)), ("AVE", 3, 2, 0, (1, 2, 6, 6)), ("AVE", 3, 2, 1, (1, 2, 5, 6)),
    ("AVE", 2, 2, 1, (1, 2, 5, 5)), ("AVE", 3, 3, 1, (1, 2, 7, 8)), ("AVE", 2, 2, 0, (1, 2, 4, 4)),
]


@pytest.mark.parametrize("pool, k, s, p, shape", TORCH_POOL)
def test_pooling_matches_torch_ceil_mode(pool, k, s, p, shape):
    """Caffe's CEIL rounding = torch ceil_mode=True whenever stride <= kernel (torch drops a last
    window starting in the right padding in every ceil-mode case, Caffe only when pad > 0; the two
    can differ only when stride > kernel, which these cases avoid). Caffe's AVE divisor counts pad
    cells but clips the window at in + pad = torch's count_include_pad=True divisor (both compute
    (min(start+k, in+pad) - start) per axis); with count_include_pad=False torch divides by the
    in-image cells only, which differs from Caffe at every padded border and at clipped
    ceil-mode windows, so that setting is not compared."""
    torch = _torch()
    F = torch.nn.functional
    layer = build_layer("Pooling", f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} }}", [shape])
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    x = distinct_pool(rng, math.prod(shape))(math.prod(shape)).reshape(shape)
    (y,), saved = forward(layer, [x], [])
    xt = torch.tensor(x, requires_grad=True)
    if pool == "MAX":
        yt = F.max_pool2d(xt, k, s, p, ceil_mode=True)
    else:
        yt = F.avg_pool2d(xt, k, s, p, ceil_mode=True, count_include_pad=True)
    assert_close(y, yt.detach().numpy(), 1e-12)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(dx, xt.grad.numpy(), 1e-12)


def test_pooling_ave_differs_from_torch_excluding_pad():
    """Documents the difference: Caffe's AVE divides border windows by the padded size."""
    torch = _torch()
    F = torch.nn.functional
    x = np.ones((1, 1, 4, 4))
    _, (y,), _ = run("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }", x)
    yt = F.avg_pool2d(torch.tensor(x), 3, 1, 1, count_include_pad=False).numpy()
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9) and yt[0, 0, 0, 0] == pytest.approx(1.0)
    assert y[0, 0, 1, 1] == yt[0, 0, 1, 1] == pytest.approx(1.0)


@pytest.mark.parametrize("size, alpha, beta, k", [(5, 1.0, 0.75, 1.0), (3, 2.0, 0.6, 2.0)])
def test_lrn_across_channels_matches_torch(size, alpha, beta, k):
    torch = _torch()
    x = np.random.default_rng(size).standard_normal((2, 6, 3, 3))
    layer, (y,), saved = run("LRN", f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}", x)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha, beta, k)
    assert_close(y, yt.detach().numpy(), 1e-12)
    dy = np.random.default_rng(0).standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(dx, xt.grad.numpy(), 1e-10)


@pytest.mark.parametrize("mode, reduction", [("VALID", "mean"), ("NONE", "sum")])
def test_softmax_cross_entropy_matches_torch(mode, reduction):
    torch = _torch()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 2, 2))
    lab = rng.integers(-1, 4, (3, 2, 2)).astype(F64)
    layer, (loss,), saved = run("SoftmaxWithLoss", f"loss_param {{ ignore_label: -1 normalization: {mode} }}",
                                x, lab.reshape(3, 1, 2, 2))
    xt = torch.tensor(x, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(lab, dtype=torch.long), ignore_index=-1,
                                           reduction=reduction)
    assert float(loss) == pytest.approx(float(lt.detach()), rel=1e-12)
    lt.backward()
    (dx, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, False])
    assert_close(dx, xt.grad.numpy(), 1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 3)])
def test_batchnorm_training_outputs_match_torch(shape):
    torch = _torch()
    x = np.random.default_rng(12).standard_normal(shape) * 3 + 1
    layer, (y,), saved = run("BatchNorm", "", x, layer_params=(np.zeros(shape[1]), np.zeros(shape[1]), np.zeros(1)))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, None, None, training=True, eps=1e-5)
    assert_close(y, yt.detach().numpy(), 1e-12)
    dy = np.random.default_rng(0).standard_normal(shape)
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(dx, xt.grad.numpy(), 1e-10)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_float32_stays_float32(case: Case):
    """Nets train in float32: no layer may silently promote its tops or gradients to float64."""
    layer, rng, bottoms, params = setup_case(case)
    bottoms = [b.astype(np.float32) for b in bottoms]
    params = [p.astype(np.float32) for p in params]
    tops, saved = forward(layer, bottoms, params)
    for t in tops:
        assert t.dtype == np.float32, f"top {t.dtype}"
    if layer.no_backward:
        return
    dtops = [np.ones(t.shape, np.float32) for t in tops]
    need = [i in case.grad for i in range(len(bottoms))]
    dbottoms, dparams = layer.backward(np, saved, dtops, params, need)
    for i, g in enumerate(dbottoms):
        if g is not None and need[i]:
            assert g.dtype == np.float32, f"bottom {i} grad {g.dtype}"
    for j, g in enumerate(dparams):
        if g is not None:
            assert g.dtype == np.float32, f"param {j} grad {g.dtype}"


# =============================================================================================
# Graph mode: every layer type with a GPU lowering, run by the kernels' NumPy twins (emulate.py)

GRAPH_CASES = [c for c in CASES if layer_types()[c.type].lower_forward is not None]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=ids(GRAPH_CASES))
def test_graph_mode_lowering_matches_eager(case: Case):
    """The launches a layer type emits for graph mode, run in float32 by the NumPy twins of the
    kernels over an emulated arena, give its own eager forward and backward (in float64)."""
    text = build_net_text(case.type, case.params_text, case.bottom_shapes, case.tops, case.phase)
    plan = plan_mod.lower(check_mod.check(syntax.parse(text, "t.net"), phase=case.phase))
    index = next(i for i, s in enumerate(plan.steps) if s.node.name == "L")
    step, layout = plan.steps[index], param_layout(plan)
    train = not step.layer.no_backward
    step.need_backward, step.propagate = train, [i in case.grad for i in range(len(step.node.bottoms))]
    try:
        prog, n_forward = lower_layer(plan, layout, index, train)
    except Unsupported as e:
        pytest.skip(f"graph mode does not take this configuration: {e}")
    layer, rng, bottoms, params = setup_case(case)
    bottoms = [b.astype(np.float32).astype(F64) for b in bottoms]
    params = [p.astype(np.float32).astype(F64) for p in params]
    keys = [plan.params[j].key for j in step.params]
    buf = {"params": np.zeros(layout.total, np.float32), "grads": np.zeros(layout.total, np.float32),
           "loss_hist": np.zeros(1, np.float32), "counters": np.zeros(8, np.int32),
           "sems": np.zeros(max(prog.sems, 1), np.uint32), "acc:probe": np.zeros(max(len(prog.outputs), 1))}
    for k, p in zip(keys, params):
        buf["params"][layout.offsets[k]:layout.offsets[k] + p.size] = p.reshape(-1)
    mem = emulate.Memory(prog.arena_bytes, buf)

    def arena(name):
        return mem.resolve(prog, Ref("arena", name))

    for b, x in zip(step.node.bottoms, bottoms):
        arena(f"v:{b}")[:] = x.reshape(-1)
    emulate.run(replace(prog, launches=prog.launches[:n_forward]), mem)
    tops, saved = forward(layer, [b.copy() for b in bottoms], [p.copy() for p in params])
    for t, want in zip(step.node.tops, tops):
        if layer.is_loss:
            got = buf["loss_hist"][:1]
        elif t in prog.outputs:
            got = buf["acc:probe"][prog.outputs.index(t):][:1]
        else:
            got = arena(f"v:{t}")
        assert_close(got.reshape(want.shape), want, 1e-4, f"{case.id}: top {t}")
    if not train:
        return
    dtops = [np.ones(t.shape) if layer.is_loss else rng.standard_normal(t.shape).astype(np.float32).astype(F64)
             for t in tops]
    if not layer.is_loss:
        for t, d in zip(step.node.tops, dtops):
            arena(f"d:{t}")[:] = d.reshape(-1)
    emulate.run(replace(prog, launches=prog.launches[n_forward:]), mem)
    dbottoms, dparams = layer.backward(np, saved, dtops, params, step.propagate)
    for b, want in zip(step.node.bottoms, dbottoms):
        if want is not None and step.propagate[step.node.bottoms.index(b)]:
            assert_close(arena(f"d:{b}").reshape(want.shape), want, 1e-4, f"{case.id}: gradient of {b}")
    for k, want in zip(keys, dparams):
        got = buf["grads"][layout.offsets[k]:layout.offsets[k] + want.size]
        assert_close(got.reshape(want.shape), want, 1e-4, f"{case.id}: gradient of param {k}")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_graph_mode_kernels_of_every_layer_compile(tmp_path):
    """The CUDA every graph-mode layer case emits (one translation unit) compiles with nvcc."""
    programs = []
    for k, case in enumerate(GRAPH_CASES):
        text = build_net_text(case.type, case.params_text, case.bottom_shapes, case.tops, case.phase)
        plan = plan_mod.lower(check_mod.check(syntax.parse(text, "t.net"), phase=case.phase))
        index = next(i for i, s in enumerate(plan.steps) if s.node.name == "L")
        try:
            programs.append(lower_layer(plan, param_layout(plan), index, not plan.steps[index].layer.no_backward,
                                        name=f"case{k}")[0])
        except Unsupported:
            continue
    assert {L for p in programs for L in (x.kind for x in p.launches)} >= {"swish_fwd", "maxpool_fwd", "gemm"}
    src = tmp_path / "layers.cu"
    src.write_text(generate(programs, "the layer table"))
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", str(src), "-o", str(tmp_path / "layers.ptx")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# =============================================================================================
# CuPy parity (skipped without CuPy and a GPU): the same layer code on xp = cupy

def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no usable CUDA device")
    return cupy


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_cupy_matches_numpy(case: Case):
    cp = _cupy()
    layer, rng, bottoms, params = setup_case(case)
    host_params = [p.copy() for p in params]
    dev_params = [cp.asarray(p) for p in params]
    tops, saved = forward(layer, bottoms, host_params)
    dtops = [rng.standard_normal(t.shape) for t in tops]
    dtops_dev = [cp.asarray(d) for d in dtops]
    dev_tops, dev_saved = layer.forward(cp, [cp.asarray(b) for b in bottoms], dev_params, 0)  # Dropout: same mask
    for t, d in zip(tops, dev_tops):
        assert_close(cp.asnumpy(d), t, 1e-12, "top")
    for p, d in zip(host_params, dev_params):          # BatchNorm's statistics update alike
        assert_close(cp.asnumpy(d), p, 1e-12, "param after forward")
    if layer.no_backward:
        return
    need = [i in case.grad for i in range(len(bottoms))]
    db, dp = layer.backward(np, saved, dtops, host_params, need)
    ddb, ddp = layer.backward(cp, dev_saved, dtops_dev, dev_params, need)
    for i in case.grad:
        assert_close(cp.asnumpy(ddb[i]), db[i], 1e-12, f"bottom {i}")
    for a, b in zip(dp, ddp):
        assert_close(cp.asnumpy(b), a, 1e-12, "param grad")

