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
      "lab<C>i" the same with some -1 (ignored) labels, "dist" soft labels (rows on axis 1 sum to 1),
      "u" uniform (0,1) targets, "ui" the same with
      some -1 (ignored), "w" positive weights, "ref" a reference blob (shape only, no gradient),
      "roi<N>x<H>x<W>" R x 5 integer rois of an N-image batch of H x W pixels, "cont" recurrent
      T x N continuation flags (0/1, 0 at t = 0), "poolmask<H>x<W>" the mask top of a 2x2 stride-2 MAX
      Pooling of an H x W map (Upsample's second bottom).
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
    C("SoftmaxWithLoss", "", ((4, 3), (4, 3)), inputs=("n", "dist"), id="soft"),
    *[C("SoftmaxWithLoss", f"loss_param {{ normalization: {m} }}", ((2, 3, 2, 2), (2, 3, 2, 2)),
        inputs=("n", "dist"), id=f"soft-{m}") for m in ("FULL", "VALID", "BATCH_SIZE", "NONE")],
    C("MultiLabelDecode", "", ((4, 5),), inputs=("u",), id="cumulative"),
    C("MultiLabelDecode", "multilabel_decode_param { mode: TOP_K top_k: 2 axis: 2 }", ((2, 3, 4), (2, 3, 4)),
      inputs=("u", "dist"), id="topk-axis2-labels"),
    C("MultiLabelDecode", "multilabel_decode_param { mode: THRESHOLD threshold: 0.5 }", ((3, 4),), inputs=("u",),
      id="threshold"),
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
    C("PReLU", "", ((2, 3, 4),), inputs=("d",), id="per-channel"),
    C("PReLU", "", ((2, 3, 2, 2),), inputs=("d",), id="per-channel-4d"),
    C("PReLU", "prelu_param { channel_shared: true }", ((2, 3, 2, 2),), inputs=("d",), id="channel-shared"),
    C("PReLU", "", ((5, 4),), inputs=("d",), id="2d"),
    C("ELU", "", ((2, 3, 4),), inputs=("d",), id="alpha1"),
    C("ELU", "elu_param { alpha: 0.5 }", ((2, 3, 4),), inputs=("d",), id="alpha0.5"),
    C("AbsVal", "", ((2, 3, 4),), inputs=("d",)),
    C("Power", "", ((2, 3, 4),), id="identity"),
    C("Power", "power_param { power: 1 scale: 3 shift: -1 }", ((2, 3, 4),), id="linear"),
    C("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", ((2, 3, 4),), id="square"),
    C("Power", "power_param { power: 3 scale: 2 }", ((2, 3, 4),), id="cube-shift0"),
    C("Power", "power_param { power: 0.5 }", ((2, 3, 4),), inputs=("w",), grad=(0,), id="sqrt-shift0"),
    C("Power", "power_param { power: 2.5 scale: 0.5 shift: 3 }", ((2, 3, 4),), id="general"),
    C("Power", "power_param { power: -1.5 scale: -1 shift: 2 }", ((2, 3, 4),), inputs=("w",), grad=(0,),
      id="negative-power"),
    C("Power", "power_param { power: 0 scale: 2 shift: 1 }", ((2, 3, 4),), id="power0-constant"),
    C("Power", "power_param { power: 3 scale: 0 shift: 2 }", ((2, 3, 4),), id="scale0-constant"),
    C("Exp", "", ((2, 3, 4),), id="e"),
    C("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }", ((2, 3, 4),), id="base2"),
    C("Exp", "exp_param { scale: -1 shift: 0.5 }", ((2, 3, 4),), id="e-shift"),
    C("Log", "", ((2, 3, 4),), inputs=("w",), grad=(0,), id="e"),
    C("Log", "log_param { base: 10 scale: 2 shift: 1 }", ((2, 3, 4),), inputs=("w",), grad=(0,), id="base10"),
    C("Log", "log_param { scale: 0.5 shift: 4 }", ((2, 3, 4),), id="e-shift"),
    C("BNLL", "", ((2, 3, 4),)),
    C("Threshold", "", ((2, 3, 4),), inputs=("d",), id="default"),
    C("Threshold", "threshold_param { threshold: 0.1 }", ((2, 3, 4),), inputs=("d",), id="0.1"),
    C("Clip", "clip_param { min: -0.3 max: 0.4 }", ((2, 3, 4),), inputs=("d",)),
    # common layers (layers/common.py)
    C("Bias", "", ((2, 3, 2, 2),), id="1bottom"),
    C("Bias", "bias_param { axis: 1 num_axes: 2 }", ((2, 3, 2, 2),), id="num_axes2"),
    C("Bias", "bias_param { num_axes: 0 }", ((2, 3, 2),), id="num_axes0-scalar"),
    C("Bias", "bias_param { axis: 2 num_axes: -1 }", ((2, 3, 2, 2),), id="num_axes-1"),
    C("Bias", "", ((2, 3, 2, 2), (3,)), id="2bottoms"),
    C("Bias", "bias_param { axis: 0 }", ((2, 3, 4), (2, 3)), id="2bottoms-axis0"),
    C("Bias", "bias_param { axis: 2 }", ((2, 3, 4), ()), id="2bottoms-scalar"),
    C("Embed", "embed_param { num_output: 3 input_dim: 4 }", ((2, 5),), inputs=("lab4",), id="bias"),
    C("Embed", "embed_param { num_output: 2 input_dim: 3 bias_term: false }", ((7,),), inputs=("lab3",), id="nobias"),
    C("Tile", "tile_param { tiles: 3 }", ((2, 3, 2),), id="axis1"),
    C("Tile", "tile_param { axis: 0 tiles: 2 }", ((2, 3),), id="axis0"),
    C("Tile", "tile_param { axis: -1 tiles: 2 }", ((2, 2, 3),), id="axis-1"),
    *[C("Reduction", f"reduction_param {{ operation: {op} axis: {ax} coeff: {c} }}", ((2, 3, 4),), inputs=("d",),
        id=f"{op}-axis{ax}") for op, ax, c in (("SUM", 0, 1), ("ASUM", 1, 2), ("SUMSQ", 2, -0.5), ("MEAN", -1, 3))],
    C("Reduction", "", ((3, 2),), id="default"),
    C("ArgMax", "", ((3, 5),), id="default"),
    C("ArgMax", "argmax_param { top_k: 3 out_max_val: true }", ((2, 3, 2, 2),), id="flat-k3-val"),
    C("ArgMax", "argmax_param { axis: 1 top_k: 2 }", ((2, 4, 3),), id="axis1-k2"),
    C("ArgMax", "argmax_param { axis: -1 out_max_val: true }", ((2, 3, 4),), id="axis-1-val"),
    C("MVN", "", ((2, 3, 3, 4),), id="default"),
    C("MVN", "mvn_param { across_channels: true }", ((2, 3, 2, 3),), id="across"),
    C("MVN", "mvn_param { normalize_variance: false }", ((2, 3, 2, 2),), id="mean-only"),
    C("MVN", "mvn_param { across_channels: true normalize_variance: false }", ((3, 4),), id="2d-mean-only"),
    C("MVN", "mvn_param { across_channels: true }", ((3, 5),), id="2d-across"),
    C("SPP", "spp_param { pyramid_height: 1 }", ((2, 2, 3, 4),), inputs=("d",), id="h1-max"),
    C("SPP", "spp_param { pyramid_height: 2 }", ((2, 2, 5, 7),), inputs=("d",), id="h2-max-padded"),
    C("SPP", "spp_param { pyramid_height: 3 pool: AVE }", ((2, 2, 6, 7),), id="h3-ave"),
    C("SPP", "spp_param { pyramid_height: 3 pool: MAX }", ((1, 2, 8, 6),), inputs=("d",), id="h3-max"),
    C("Filter", "", ((4, 3), (4,)), inputs=("n", "lab2"), id="1blob"),
    C("Filter", "", ((6, 2, 2), (6, 3), (6, 1, 1)), tops=2, inputs=("n", "n", "lab2"), id="2blobs"),
    C("BatchReindex", "", ((3, 2, 2), (5,)), inputs=("n", "lab3"), id="repeats"),
    C("BatchReindex", "", ((4, 3), (2,)), inputs=("n", "lab4"), id="fewer"),
    C("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", (), id="2x3"),
    C("Parameter", "parameter_param { shape { } }", (), id="scalar"),
    # Im2col reads convolution_param, whose num_output the shared schema requires; Im2col ignores it
    C("Im2col", "convolution_param { num_output: 1 kernel_size: 3 }", ((2, 3, 5, 5),), id="k3"),
    C("Im2col", "convolution_param { num_output: 1 kernel_size: 3 stride: 2 pad: 1 }", ((2, 2, 5, 6),),
      id="stride2-pad1"),
    C("Im2col", "convolution_param { num_output: 1 kernel_size: 2 dilation: 2 pad: 1 }", ((1, 2, 4, 5),),
      id="dilation2"),
    C("Im2col", "convolution_param { num_output: 1 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_w: 1 }",
      ((2, 2, 4, 5),), id="kh3-kw2"),
    # more losses (layers/loss.py) and ROIPooling (layers/rpn.py)
    C("InfogainLoss", "", ((4, 3), (4,), (3, 3)), inputs=("n", "lab3", "w"), id="default"),
    C("InfogainLoss", "loss_param { ignore_label: -1 }", ((2, 3, 2, 2), (2, 1, 2, 2), (3, 3)),
      inputs=("n", "lab3i", "w"), id="ignore-spatial"),
    *[C("InfogainLoss", f"loss_param {{ ignore_label: -1 normalization: {m} }}", ((2, 3, 2), (2, 2), (9,)),
        inputs=("n", "lab3i", "w"), id=f"norm-{m}") for m in ("FULL", "BATCH_SIZE", "NONE")],
    C("InfogainLoss", "infogain_loss_param { axis: 2 }", ((2, 3, 4), (2, 3), (4, 4)), inputs=("n", "lab4", "w"),
      id="axis2"),
    C("InfogainLoss", "", ((3, 4), (3,), (4, 4)), tops=2, inputs=("n", "lab4", "w"), grad_tops=(0,), id="prob-top"),
    C("HingeLoss", "", ((4, 5), (4,)), inputs=("n", "lab5"), id="L1"),
    C("HingeLoss", "hinge_loss_param { norm: L2 }", ((4, 5), (4,)), inputs=("n", "lab5"), id="L2"),
    C("HingeLoss", "hinge_loss_param { norm: L2 }", ((3, 4, 1, 1), (3, 1, 1, 1)), inputs=("n", "lab4"), id="L2-nchw"),
    C("MultinomialLogisticLoss", "", ((4, 5), (4,)), inputs=("u", "lab5"), grad=(0,), id="default"),
    C("MultinomialLogisticLoss", "", ((3, 4, 1, 1), (3, 1, 1, 1)), inputs=("u", "lab4"), grad=(0,), id="nchw"),
    # without legacy_version Caffe's gradient divides by d + 1e-4: pairs inside the margin are checked by hand
    C("ContrastiveLoss", "", ((4, 8, 1, 1), (4, 8, 1, 1), (4, 1, 1, 1)), inputs=("n", "n", "lab2"), id="default"),
    C("ContrastiveLoss", "contrastive_loss_param { margin: 20 legacy_version: true }", ((5, 3), (5, 3), (5,)),
      inputs=("n", "n", "lab2"), id="legacy-in-margin"),
    C("ROIPooling", "roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.5 }", ((2, 3, 6, 7), (6, 5)),
      inputs=("d", "roi2x12x14"), id="scale0.5"),
    C("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", ((1, 2, 5, 6), (4, 5)),
      inputs=("d", "roi1x5x6"), id="scale1"),
    C("ROIPooling", "roi_pooling_param { pooled_h: 3 pooled_w: 3 spatial_scale: 0.0625 }", ((1, 2, 4, 5), (5, 5)),
      inputs=("d", "roi1x64x80"), id="zf-1/16"),
    # recurrent layers (layers/recurrent.py)
    C("RNN", "recurrent_param { num_output: 3 }", ((4, 2, 3), (4, 2)), inputs=("n", "cont"), id="basic"),
    C("RNN", "recurrent_param { num_output: 2 }", ((3, 2, 2, 2), (3, 2)), inputs=("n", "cont"), id="4d-input"),
    C("RNN", "recurrent_param { num_output: 3 }", ((4, 2, 3), (4, 2), (2, 5)), inputs=("n", "cont", "n"), id="static"),
    C("RNN", "recurrent_param { num_output: 3 expose_hidden: true }", ((4, 2, 3), (4, 2), (1, 2, 3)), tops=2,
      inputs=("n", "cont", "n"), grad=(0,), grad_tops=(0,), id="expose"),
    C("RNN", "recurrent_param { num_output: 2 expose_hidden: true }", ((3, 3, 2), (3, 3), (3, 2, 2), (1, 3, 2)),
      tops=2, inputs=("n", "cont", "n", "n"), grad=(0, 2), grad_tops=(0,), id="static-expose"),
    C("LSTM", "recurrent_param { num_output: 3 }", ((4, 2, 3), (4, 2)), inputs=("n", "cont"), id="basic"),
    C("LSTM", "recurrent_param { num_output: 2 }", ((3, 2, 2, 2), (3, 2)), inputs=("n", "cont"), id="4d-input"),
    C("LSTM", "recurrent_param { num_output: 3 }", ((4, 2, 3), (4, 2), (2, 5)), inputs=("n", "cont", "n"), id="static"),
    C("LSTM", "recurrent_param { num_output: 3 expose_hidden: true }", ((4, 2, 3), (4, 2), (1, 2, 3), (1, 2, 3)),
      tops=3, inputs=("n", "cont", "n", "n"), grad=(0,), grad_tops=(0,), id="expose"),
    C("LSTM", "recurrent_param { num_output: 2 expose_hidden: true }",
      ((3, 3, 2), (3, 3), (3, 2, 2), (1, 3, 2), (1, 3, 2)), tops=3, inputs=("n", "cont", "n", "n", "n"), grad=(0, 2),
      grad_tops=(0,), id="static-expose"),
]

CASES += [   # fork layers (layers/forks.py)
    C("BN", "bn_param { bn_mode: INFERENCE }", ((2, 3, 2, 3),), id="segnet-inference"),
    C("BN", "bn_param { bn_mode: LEARN scale_filler { type: \"constant\" value: 1 } }", ((3, 2, 2, 3),),
      id="segnet-learn"),
    C("BN", "bn_param { bn_mode: LEARN }", ((3, 2, 2, 3),), phase="TEST", tops=3, grad_tops=(0,), id="segnet-learn-stat-tops"),
    C("BN", "bn_param { bn_mode: LEARN }", ((5, 3),), id="segnet-learn-2d"),
    C("BN", "bn_param { momentum: 0.95 }", ((3, 2, 2, 3),), param_kinds=("n", "n", "bnmean", "bnvar"), id="psp-train"),
    C("BN", "", ((5, 3),), param_kinds=("n", "n", "bnmean", "bnvar"), id="psp-train-2d"),
    C("BN", "", ((3, 2, 2, 3),), phase="TEST", param_kinds=("n", "n", "bnmean", "bnvar"), id="psp-test"),
    C("BN", "bn_param { frozen: true momentum: 0.95 }", ((3, 2, 2, 3),), param_kinds=("n", "n", "bnmean", "bnvar"),
      id="psp-frozen"),
    C("Upsample", "upsample_param { scale: 2 }", ((2, 3, 2, 3), (2, 3, 2, 3)), inputs=("n", "poolmask4x6"), grad=(0,),
      id="scale2"),
    C("Upsample", "upsample_param { upsample_h: 5 upsample_w: 7 }", ((1, 2, 3, 4), (1, 2, 3, 4)), inputs=("n", "poolmask5x7"),
      grad=(0,), id="upsample_hw-odd"),
    C("Upsample", "upsample_param { scale: 2 pad_out_h: true }", ((1, 2, 3, 3), (1, 2, 3, 3)), inputs=("n", "poolmask5x6"),
      grad=(0,), id="pad_out_h"),
    C("Upsample", "upsample_param { scale: 2 }", ((2, 3, 2, 3),), id="nearest"),
    C("Upsample", "upsample_param { scale_h: 3 scale_w: 2 }", ((1, 2, 2, 3),), id="nearest-hw"),
    C("Interp", "interp_param { zoom_factor: 3 }", ((2, 2, 3, 4),), id="zoom3"),
    C("Interp", "interp_param { shrink_factor: 2 }", ((1, 2, 7, 6),), id="shrink2"),
    C("Interp", "interp_param { shrink_factor: 2 zoom_factor: 3 }", ((1, 2, 5, 6),), id="shrink2-zoom3"),
    C("Interp", "interp_param { height: 5 width: 3 }", ((1, 2, 4, 6),), id="height-width"),
    C("Interp", "interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -1 }", ((1, 2, 5, 6),), id="crop"),
    C("Interp", "", ((1, 2, 3, 3), (1, 1, 5, 7)), inputs=("n", "ref"), id="2nd-bottom"),
    C("ConvolutionDepthwise", "convolution_param { num_output: 3 kernel_size: 3 pad: 1 }", ((2, 3, 4, 4),), id="k3"),
    C("ConvolutionDepthwise", "convolution_param { num_output: 4 kernel_size: 3 stride: 2 bias_term: false }",
      ((1, 4, 5, 5),), id="stride2-nobias"),
    C("ConvolutionDepthwise", "convolution_param { num_output: 6 kernel_size: 2 }", ((1, 3, 3, 4),), id="multiplier2"),
    C("DepthwiseConvolution", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 }", ((2, 4, 3, 3),),
      id="k3-group"),
    C("ShuffleChannel", "shuffle_channel_param { group: 3 }", ((2, 6, 2, 2),), id="g3"),
    C("ShuffleChannel", "shuffle_channel_param { group: 2 }", ((2, 4, 3),), id="g2-3d"),
    C("Axpy", "", ((2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 2, 2)), id="4d"),
    C("Axpy", "", ((2, 3), (2, 3, 2, 3), (2, 3, 2, 3)), id="2d-scale"),
    C("PSROIPooling", "psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 group_size: 2 }", ((2, 8, 6, 7), (5, 5)),
      inputs=("n", "roi2x12x14"), id="scale0.5-g2"),
    C("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 3 }", ((1, 18, 5, 6), (4, 5)),
      inputs=("n", "roi1x5x6"), id="scale1-g3"),
]

CASES += [   # SSD's layers (layers/ssd.py); PriorBox and DetectionOutput have no backward: shapes and dtypes only
    C("Normalize", "", ((2, 3, 2, 3),), id="across-shared"),
    C("Normalize", "norm_param { across_spatial: false channel_shared: false }", ((2, 3, 2, 3),), id="ssd-conv4_3"),
    C("Normalize", "norm_param { across_spatial: false }", ((2, 4, 3, 2),), id="within-shared"),
    C("Normalize", "norm_param { channel_shared: false eps: 0.01 }", ((2, 3, 2, 2),), id="across-per-channel-eps"),
    C("Normalize", "norm_param { across_spatial: false channel_shared: false }", ((3, 5),), id="2d"),
    C("PriorBox", "prior_box_param { min_size: 4 max_size: 9 aspect_ratio: 2 }", ((1, 2, 2, 3), (1, 3, 8, 12)),
      inputs=("ref", "ref"), id="min-max-ar2"),
    C("PriorBox", "prior_box_param { min_size: 2 min_size: 5 aspect_ratio: 3 flip: false clip: true variance: 0.1 "
      "variance: 0.1 variance: 0.2 variance: 0.2 img_size: 10 step: 4 }", ((2, 4, 3, 3), (2, 3, 7, 7)),
      inputs=("ref", "ref"), id="2mins-clip-var4-img-step"),
    C("DetectionOutput", "detection_output_param { num_classes: 3 code_type: CORNER keep_top_k: 4 confidence_threshold: 0.2 "
      "nms_param { nms_threshold: 0.45 top_k: 5 } }", ((2, 24), (2, 18), (1, 2, 24)), inputs=("n", "u", "u"), id="corner"),
    C("DetectionOutput", "detection_output_param { num_classes: 3 share_location: false "
      "nms_param { nms_threshold: 0.3 eta: 0.9 } }", ((1, 60), (1, 15), (1, 2, 20)), inputs=("n", "u", "ref"),
      id="per-class-loc"),
]
MBOX = ((2, 48), (2, 36), (1, 2, 48), (1, 1, 3, 8))     # 2 images, 12 priors, 3 classes, 3 gt boxes
MBOX_IN = ("n", "n", "priors", "ssdgt2x3")
CASES += [   # SSD's MultiBoxLoss (layers/multibox.py): matching and mining are fixed by the priors, the labels and the
    # distinct losses, so central differences see the smooth part
    C("MultiBoxLoss", "multibox_loss_param { num_classes: 3 overlap_threshold: 0.3 neg_pos_ratio: 2 }", MBOX,
      inputs=MBOX_IN, id="ssd-default"),
    C("MultiBoxLoss", "multibox_loss_param { num_classes: 3 loc_loss_type: L2 conf_loss_type: LOGISTIC loc_weight: 2 "
      "match_type: BIPARTITE code_type: CENTER_SIZE mining_type: NONE } loss_param { normalization: BATCH_SIZE }",
      MBOX, inputs=MBOX_IN, id="l2-logistic-center-nomining"),
    C("MultiBoxLoss", "multibox_loss_param { num_classes: 3 code_type: CORNER_SIZE mining_type: HARD_EXAMPLE "
      "sample_size: 5 overlap_threshold: 0.2 } loss_param { normalization: FULL }", MBOX, inputs=MBOX_IN,
      id="hard-example-corner-size"),
    C("MultiBoxLoss", "multibox_loss_param { num_classes: 3 share_location: false use_prior_for_matching: false "
      "overlap_threshold: 0.3 mining_type: NONE }", ((2, 144), (2, 36), (1, 2, 48), (1, 1, 3, 8)), inputs=MBOX_IN, id="per-class-decoded"),
]

CASES += [   # py-faster-rcnn's ProposalTarget (layers/rpn.py): sampling and targets, no backward
    C("ProposalTarget", "proposal_target_param { num_classes: 4 }", ((12, 5), (3, 5)), tops=5,
      inputs=("roi1x40x40", "gt4x40x40"), id="voc-defaults"),
    C("ProposalTarget", "proposal_target_param { num_classes: 3 batch_size: 8 fg_fraction: 0.5 bg_thresh_lo: 0 "
      "normalize_targets: false }", ((20, 5), (2, 5)), tops=5, inputs=("roi1x30x30", "gt3x30x30"), id="end2end-lo0"),
]

DATA_TYPES = {"Input", "MemoryData", "DummyData", "MNIST", "DigitScenes", "DigitTags", "AnchorTarget", "Proposal",
              "Data", "ImageData", "HDF5Data", "HDF5Output"}   # tests/test_data_layers.py
CHECK_ONLY = {"WindowData", "Python", "DenseImageData"}   # runnable = False: shape rule only


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
    if kind == "dist":      # soft labels: a distribution over axis 1 per prediction, some entries 0
        t = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) > 0.3)
        t[:, :1] += 0.1
        return t / t.sum(axis=1, keepdims=True)
    if kind in ("u", "ui"):
        t = rng.uniform(0.05, 0.95, n)
        if kind == "ui":
            t[rng.permutation(n)[: max(1, n // 4)]] = -1
        return t.reshape(shape)
    if kind == "w":
        return rng.uniform(0.5, 1.5, shape)
    if kind == "ref":
        return np.zeros(shape)
    if kind == "cont":      # recurrent layers' T x N continuation flags: 0 starts a sequence (always at t = 0)
        c = (rng.uniform(size=shape) > 0.3).astype(F64)
        c[0] = 0.0
        return c
    if kind.startswith("poolmask"):     # Upsample's mask bottom: a real 2x2 stride-2 MAX pooling's mask top
        from netdsl import kernels
        hh, ww = (int(v) for v in kind[8:].split("x"))
        x = rng.permutation(shape[0] * shape[1] * hh * ww).reshape(shape[0], shape[1], hh, ww).astype(F64)
        mask = kernels.pool2d_mask(np, kernels.pool2d_forward(np, x, "max", 2, 2, 2, 2)[1])
        assert mask.shape == tuple(shape), (mask.shape, shape)
        return mask
    if kind.startswith("roi"):  # "roi<N>x<H>x<W>": R x 5 rois (batch < N, x1, y1, x2, y2), whole image pixels
        nb, hh, ww = (int(v) for v in kind[3:].split("x"))   # some reach past the image; none is malformed
        r = shape[0]
        x1, y1 = rng.integers(-2, ww, r), rng.integers(-2, hh, r)
        x2, y2 = x1 + rng.integers(0, ww // 2 + 3, r), y1 + rng.integers(0, hh // 2 + 3, r)
        return np.stack([rng.integers(0, nb, r), x1, y1, x2, y2], axis=1).astype(F64)
    if kind == "priors":    # PriorBox's 1 x 2 x (P * 4) top: boxes inside the unit square, variances 0.1 / 0.2
        xy = rng.uniform(0.0, 0.6, (shape[2] // 4, 2))
        wh = rng.uniform(0.15, 0.4, (shape[2] // 4, 2))
        var = np.tile([0.1, 0.1, 0.2, 0.2], shape[2] // 4)
        return np.stack([np.concatenate([xy, xy + wh], axis=1).reshape(-1), var])[None]
    if kind.startswith("ssdgt"):   # "ssdgt<N>x<C>": SSD's 1 x 1 x G x 8 label rows, images < N, labels 1..C-1
        nb, c = (int(v) for v in kind[5:].split("x"))
        g = shape[2]
        xy, wh = rng.uniform(0.0, 0.6, (g, 2)), rng.uniform(0.15, 0.4, (g, 2))
        rows = np.concatenate([np.stack([np.arange(g) % nb, rng.integers(1, c, g), np.arange(g)], axis=1), xy, xy + wh,
                               np.zeros((g, 1))], axis=1)
        return rows.reshape(shape)
    if kind.startswith("gt"):   # "gt<K>x<H>x<W>": G x 5 gt boxes (x1, y1, x2, y2, class in 1..K-1) in an H x W image
        k, hh, ww = (int(v) for v in kind[2:].split("x"))
        g = shape[0]
        x1, y1 = rng.integers(0, ww // 2, g), rng.integers(0, hh // 2, g)
        x2, y2 = x1 + rng.integers(4, ww // 2, g), y1 + rng.integers(4, hh // 2, g)
        return np.stack([x1, y1, x2, y2, rng.integers(1, k, g)], axis=1).astype(F64)
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
    rule = [tuple(s) for s in layer.top_shapes]       # None: a data-dependent dim (Filter's count)
    assert len(tops) == len(rule) and all(_compatible(r, t.shape) for r, t in zip(rule, tops)), \
        ([tuple(t.shape) for t in tops], rule)
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
    """rois R x 5 and a C x H x W map give R x C x pooled_h x pooled_w (the forward is table-tested)."""
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
# ---- neuron layers (layers/neuron.py): Caffe's formulas by hand, then PyTorch oracles

def _neuron(type_, params, x, layer_params=(), dy=None):
    """Forward, then backward of dy (default ones), of a one-bottom layer: (layer, y, dx, dparams)."""
    x = np.asarray(x, F64)
    ps = [np.asarray(p, F64) for p in layer_params]
    layer, (y,), saved = run(type_, params, x, layer_params=ps)
    if layer.no_backward:
        return layer, y, None, None
    (dx,), dps = layer.backward(np, saved, [np.ones_like(y) if dy is None else dy], ps, [True])
    return layer, y, dx, dps


def _check_error(type_, params, shape=(2, 3)):
    from netdsl.errors import NetdslError
    with pytest.raises(NetdslError) as e:
        build_layer(type_, params, [shape])
    return [d.code for d in e.value.diagnostics]


def test_prelu_default_slope_is_a_quarter_per_channel():
    text = ('name: "t"\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 } } }\n'
            'layer { name: "p" type: "PReLU" bottom: "x" top: "x" }\n'
            'layer { name: "q" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true } }\n'
            'layer { name: "r" type: "PReLU" bottom: "y" top: "z" prelu_param { filler { value: 0.1 } } }\n')
    net = make_net(text, phase="TEST")
    (p,), (q,), (r,) = net.params["p"], net.params["q"], net.params["r"]
    np.testing.assert_array_equal(p.data, [0.25] * 3)          # Caffe's default, not the filler's 0
    np.testing.assert_array_equal(q.data, [0.25])              # channel_shared: one slope
    np.testing.assert_array_equal(r.data, [0.1] * 3)           # a given filler replaces the default
    x = np.array([[[-2.0, 4.0]] * 3] * 2)
    out = net.forward(x=x)["z"]
    np.testing.assert_allclose(out, np.where(x > 0, x, x * 0.25 ** 2 * 0.1))


def test_prelu_gradients_by_hand():
    x = np.array([[-2.0, 3.0, 0.0], [-1.0, -4.0, 5.0]])          # N = 2, C = 3
    a = np.array([0.5, 0.25, -1.0])
    _, y, dx, (da,) = _neuron("PReLU", "", x, [a])
    np.testing.assert_allclose(y, [[-1.0, 3.0, 0.0], [-0.5, -1.0, 5.0]])
    # x <= 0 takes the slope (Caffe's side of the kink at 0); the slope's gradient sums x there
    np.testing.assert_allclose(dx, [[0.5, 1.0, -1.0], [0.5, 0.25, 1.0]])
    np.testing.assert_allclose(da, [-3.0, -4.0, 0.0])
    _, y, dx, (da,) = _neuron("PReLU", "prelu_param { channel_shared: true }", x, [[0.5]])
    np.testing.assert_allclose(da, [-7.0])
    np.testing.assert_allclose(dx, np.where(x > 0, 1.0, 0.5))
    assert _check_error("PReLU", "", shape=(4,)) == ["E0221"]   # Caffe: CHECK_GE(num_axes, 2)


def test_elu_and_absval_by_hand():
    x = np.array([-1.0, 0.0, 2.0])
    _, y, dx, _ = _neuron("ELU", "elu_param { alpha: 0.5 }", x)
    np.testing.assert_allclose(y, [0.5 * (math.exp(-1) - 1), 0.0, 2.0])
    np.testing.assert_allclose(dx, [0.5 * math.exp(-1), 0.5, 1.0])     # at 0: alpha + y = alpha
    _, y, dx, _ = _neuron("AbsVal", "", [-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(y, [2.0, 0.0, 3.0])
    np.testing.assert_array_equal(dx, [-1.0, 0.0, 1.0])                 # caffe_cpu_sign(0) = 0
    # AbsVal is the one Caffe refuses to run in place (CHECK_NE(top, bottom))
    assert [t for t in ("PReLU", "ELU", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold", "Clip")
            if not layer_types()[t].in_place] == ["AbsVal"]


def test_power_special_cases_follow_caffe():
    x = np.array([-2.0, 0.0, 2.0])
    dy = np.array([0.3, -0.7, 1.1])
    # power * scale == 0: a constant (1 for power 0, even 0^0; shift^power otherwise) and a zero gradient
    _, y, dx, _ = _neuron("Power", "power_param { power: 0 scale: 2 shift: 0 }", x, dy=dy)
    np.testing.assert_array_equal(y, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0])
    _, y, dx, _ = _neuron("Power", "power_param { power: 3 scale: 0 shift: 2 }", x, dy=dy)
    np.testing.assert_array_equal(y, [8.0, 8.0, 8.0])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0])
    # power 1: linear, gradient scale
    _, y, dx, _ = _neuron("Power", "power_param { scale: 3 shift: -1 }", x, dy=dy)
    np.testing.assert_allclose(y, [-7.0, -1.0, 5.0])
    np.testing.assert_allclose(dx, 3 * dy)
    # power 2: 2 scale (shift + scale x) with no division, so it is 0 (not 0/0) where the base is 0
    _, y, dx, _ = _neuron("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", x)
    np.testing.assert_allclose(y, [0.0, 1.0, 4.0])
    np.testing.assert_allclose(dx, [0.0, 1.0, 2.0])
    # shift 0: power y / x, NaN at x = 0 exactly as Caffe's caffe_div
    _, y, dx, _ = _neuron("Power", "power_param { power: 3 scale: 2 }", [0.0, 1.0])
    np.testing.assert_allclose(y, [0.0, 8.0])
    assert np.isnan(dx[0]) and dx[1] == pytest.approx(24.0)
    # the general case: diff_scale y / (shift + scale x)
    _, y, dx, _ = _neuron("Power", "power_param { power: 2.5 scale: 0.5 shift: 3 }", [2.0])
    np.testing.assert_allclose(y, [32.0])
    np.testing.assert_allclose(dx, [2.5 * 0.5 * 8.0])
    # a negative base to a fractional power is NaN, as C's pow
    _, y, _, _ = _neuron("Power", "power_param { power: 0.5 shift: -4 }", [1.0])
    assert np.isnan(y[0])


def test_bnll_is_stable_at_large_magnitudes():
    x = np.array([-1000.0, -60.0, 0.0, 60.0, 1000.0])
    _, y, dx, _ = _neuron("BNLL", "", x)
    np.testing.assert_allclose(y, [0.0, math.exp(-60), math.log(2), 60.0, 1000.0], rtol=1e-15, atol=0)
    e50 = math.exp(50)
    # Caffe's gradient clamps x at 50 before e^x / (e^x + 1)
    np.testing.assert_allclose(dx, [0.0, math.exp(-60) / (1 + math.exp(-60)), 0.5, e50 / (e50 + 1), e50 / (e50 + 1)],
                               rtol=1e-15, atol=0)
    layer = build_layer("BNLL", "", [(3,)])
    x32 = np.array([-1000.0, 100.0, 1000.0], np.float32)
    (y32,), saved = layer.forward(np, [x32], [])
    (dx32,), _ = layer.backward(np, saved, [np.ones(3, np.float32)], [], [True])
    assert y32.dtype == dx32.dtype == np.float32
    np.testing.assert_array_equal(y32, [0.0, 100.0, 1000.0])      # never log(1 + inf)
    np.testing.assert_array_equal(dx32, [0.0, 1.0, 1.0])          # never inf / inf


def test_exp_and_log_with_base_scale_shift():
    x = np.array([0.0, 1.0, -1.0])
    _, y, dx, _ = _neuron("Exp", "exp_param { base: 2 scale: 3 shift: 1 }", x)
    np.testing.assert_allclose(y, [2.0, 16.0, 0.25])
    np.testing.assert_allclose(dx, y * 3 * math.log(2))
    # base -1 is e; with a shift the factor is e^shift (BVLC master; older Caffe computed (-1)^shift)
    _, y, dx, _ = _neuron("Exp", "exp_param { shift: 1 }", x)
    np.testing.assert_allclose(y, np.exp(1 + x))
    np.testing.assert_allclose(dx, y)
    _, y, dx, _ = _neuron("Exp", "exp_param { base: 1 scale: 5 }", x)
    np.testing.assert_array_equal(y, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0])
    _, y, dx, _ = _neuron("Log", "log_param { base: 10 scale: 2 shift: 1 }", [0.0, 4.5, 49.5])
    np.testing.assert_allclose(y, [0.0, 1.0, 2.0], atol=1e-15)
    np.testing.assert_allclose(dx, 2 / (math.log(10) * np.array([1.0, 10.0, 100.0])))
    _, y, dx, _ = _neuron("Log", "", [1.0, math.e])
    np.testing.assert_allclose(y, [0.0, 1.0])
    np.testing.assert_allclose(dx, [1.0, 1 / math.e])
    # Caffe's LayerSetUp CHECKs: base -1 or > 0; Log also needs 1 / log(base) finite
    assert _check_error("Exp", "exp_param { base: 0 }") == ["E0107"]
    assert _check_error("Exp", "exp_param { base: -2 }") == ["E0107"]
    assert _check_error("Log", "log_param { base: 1 }") == ["E0107"]
    assert _check_error("Log", "log_param { base: -0.5 }") == ["E0107"]
    build_layer("Log", "log_param { base: 0.5 }", [(2, 3)])


def test_threshold_is_strict_and_has_no_backward():
    _, y, dx, _ = _neuron("Threshold", "threshold_param { threshold: 0.5 }", [-1.0, 0.5, 0.6, 2.0])
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0, 1.0])
    _, y, _, _ = _neuron("Threshold", "", [-0.1, 0.0, 0.1])
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0])
    assert layer_types()["Threshold"].no_backward
    # the plan prunes backward through it: the InnerProduct before it gets no gradient
    text = ('name: "t"\nlayer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 3 dim: 4 } '
            'shape { dim: 3 dim: 2 } } }\n' + _ip("a", "x", "a", 2)
            + 'layer { name: "th" type: "Threshold" bottom: "a" top: "h" }\n'
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "h" bottom: "t" top: "l" }\n')
    net = make_net(text)
    net.zero_grad()
    net.forward(**_feed())
    net.backward()
    assert not any(np.any(p.grad) for p in net.params["a"])


def test_clip_bounds_and_gradient_at_the_bounds():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    _, y, dx, _ = _neuron("Clip", "clip_param { min: -1 max: 1 }", x)
    np.testing.assert_array_equal(y, [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(dx, [0.0, 1.0, 1.0, 1.0, 0.0])   # min <= x <= max: both bounds pass it
    _, y, _, _ = _neuron("Clip", "clip_param { min: 1 max: -1 }", x)
    np.testing.assert_array_equal(y, [1.0] * 5)                    # max(min, min(x, max)), not np.clip
    assert _check_error("Clip", "clip_param { min: 0 }") == ["E0106"]
    assert _check_error("Clip", "") == ["E0106"]                   # Caffe would clip to [0, 0]


NEURON_TORCH = [   # (id, type, params, the same function in torch of (torch, x, *params))
    ("prelu", "PReLU", "", lambda t, x, a: t.nn.functional.prelu(x, a)),
    ("prelu-shared", "PReLU", "prelu_param { channel_shared: true }", lambda t, x, a: t.nn.functional.prelu(x, a)),
    ("elu", "ELU", "elu_param { alpha: 0.7 }", lambda t, x: t.nn.functional.elu(x, 0.7)),
    ("absval", "AbsVal", "", lambda t, x: t.abs(x)),
    ("power", "Power", "power_param { power: 2.5 scale: 0.5 shift: 3 }", lambda t, x: (3 + 0.5 * x) ** 2.5),
    ("power-square", "Power", "power_param { power: 2 scale: -1.5 shift: 0.5 }", lambda t, x: (0.5 - 1.5 * x) ** 2),
    ("exp", "Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }", lambda t, x: 2 ** (1 + 0.5 * x)),
    ("log", "Log", "log_param { base: 10 scale: 0.5 shift: 4 }", lambda t, x: t.log10(4 + 0.5 * x)),
    ("bnll", "BNLL", "", lambda t, x: t.nn.functional.softplus(x)),
    ("clip", "Clip", "clip_param { min: -0.5 max: 0.5 }", lambda t, x: t.clamp(x, -0.5, 0.5)),
]


@pytest.mark.parametrize("type_, params, fn", [c[1:] for c in NEURON_TORCH], ids=[c[0] for c in NEURON_TORCH])
def test_neuron_layers_match_torch(type_, params, fn):
    torch = _torch()
    rng = np.random.default_rng(zlib.crc32(params.encode()))
    x = rng.standard_normal((2, 3, 2, 2)) * 1.5
    x.flat[:3] = (0.5, -0.5, 0.0)       # Clip's bounds and the kinks at 0: torch takes the same side as Caffe
    layer = build_layer(type_, params, [x.shape])
    ps = [rng.standard_normal(s) * 0.7 for s in layer.param_shapes]
    tops, saved = forward(layer, [x], ps)
    dy = rng.standard_normal(x.shape)
    (dx,), dps = layer.backward(np, saved, [dy], ps, [True])
    xt = torch.tensor(x, requires_grad=True)
    pt = [torch.tensor(p, requires_grad=True) for p in ps]
    yt = fn(torch, xt, *pt)
    yt.backward(torch.tensor(dy))
    assert_close(tops[0], yt.detach().numpy(), 1e-12, "top")
    assert_close(dx, xt.grad.numpy(), 1e-12, "bottom")
    for g, p in zip(dps, pt):
        assert_close(g, p.grad.numpy(), 1e-12, "slope")


# =============================================================================================
# ---- recurrent layers: values by hand, Caffe's blob layout and fillers, cont resets, the state
# carried between forwards, no gradient to cont / h_0 / c_0, PyTorch oracles

def _sigm(v):
    return 1.0 / (1.0 + math.exp(-v))


def _rec_layer(type_, H, shapes, expose=False):
    extra = " expose_hidden: true" if expose else ""
    ntops = 1 + (({"RNN": 1, "LSTM": 2}[type_]) if expose else 0)
    return build_layer(type_, f"recurrent_param {{ num_output: {H}{extra} }}", shapes, ntops)


def test_rnn_by_hand():
    """H = K = 1: h_t = tanh(w_hh cont_t h_{t-1} + w_xh x_t + b_h), o_t = tanh(w_ho h_t + b_o)."""
    x, cont = np.array([0.5, -1.0, 2.0]).reshape(3, 1, 1), np.array([[0.0], [1.0], [0.0]])
    w_xh, b_h, w_hh, w_ho, b_o = 0.8, 0.1, -0.5, 1.5, -0.2
    params = [np.array([[w_xh]]), np.array([b_h]), np.array([[w_hh]]), np.array([[w_ho]]), np.array([b_o])]
    (o,), _ = forward(_rec_layer("RNN", 1, [x.shape, cont.shape]), [x, cont], params)
    h1 = math.tanh(w_xh * 0.5 + b_h)
    h2 = math.tanh(w_hh * h1 + w_xh * -1.0 + b_h)
    h3 = math.tanh(w_xh * 2.0 + b_h)                      # cont_3 = 0: h_2 is forgotten
    np.testing.assert_allclose(o.ravel(), [math.tanh(w_ho * h + b_o) for h in (h1, h2, h3)], rtol=1e-14)


def test_lstm_by_hand():
    """Zero weights and biases (0, 0, 0, atanh 0.5): i = f = o = 1/2, g = 1/2, so c_t = cont_t c_{t-1}/2 + 1/4:
    c = 1/4, 3/8, 7/16, then 1/4 again where cont restarts the sequence; h_t = tanh(c_t) / 2."""
    x, cont = np.zeros((4, 1, 2)), np.array([[0.0], [1.0], [1.0], [0.0]])
    params = [np.zeros((4, 2)), np.array([0.0, 0.0, 0.0, math.atanh(0.5)]), np.zeros((4, 1))]
    layer = _rec_layer("LSTM", 1, [x.shape, cont.shape, (1, 1, 1), (1, 1, 1)], expose=True)
    (h, h_T, c_T), _ = forward(layer, [x, cont, np.full((1, 1, 1), 5.0), np.full((1, 1, 1), 9.0)], params)
    cs = [0.25, 0.375, 0.4375, 0.25]                      # h_0 = 5, c_0 = 9 are zeroed by cont_1 = 0
    np.testing.assert_allclose(h.ravel(), [0.5 * math.tanh(c) for c in cs], rtol=1e-14)
    np.testing.assert_allclose([h_T.item(), c_T.item()], [0.5 * math.tanh(0.25), 0.25], rtol=1e-14)


def test_lstm_gate_order_is_i_f_o_g():
    """One step, H = K = 1, cont 1 with h_0 and c_0 exposed, and every weight distinct: Caffe's gate
    rows are (i, f, o, g), and W_hc reads cont_t h_{t-1}."""
    x, cont, h0, c0 = np.full((1, 1, 1), 0.7), np.ones((1, 1)), np.full((1, 1, 1), -0.4), np.full((1, 1, 1), 0.9)
    W_xc, b_c, W_hc = np.array([0.3, -0.6, 1.1, 0.5]), np.array([0.05, 0.2, -0.1, 0.3]), np.array([0.7, 0.4, -0.8, 1.2])
    layer = _rec_layer("LSTM", 1, [x.shape, cont.shape, h0.shape, c0.shape], expose=True)
    (h, h_T, c_T), _ = forward(layer, [x, cont, h0, c0], [W_xc.reshape(4, 1), b_c, W_hc.reshape(4, 1)])
    a = W_xc * 0.7 + b_c + W_hc * -0.4
    i, f, o, g = _sigm(a[0]), _sigm(a[1]), _sigm(a[2]), math.tanh(a[3])
    c = f * 0.9 + i * g
    assert c_T.item() == pytest.approx(c, rel=1e-14)
    assert h.item() == h_T.item() == pytest.approx(o * math.tanh(c), rel=1e-14)


def _rec_net_text(type_, H, T, N, K, static=0, fillers=""):
    inputs = f'shape {{ dim: {T} dim: {N} dim: {K} }} shape {{ dim: {T} dim: {N} }}'
    tops = 'top: "x" top: "cont"'
    if static:
        inputs += f' shape {{ dim: {N} dim: {static} }}'
        tops += ' top: "xs"'
    bottoms = 'bottom: "x" bottom: "cont"' + (' bottom: "xs"' if static else "")
    return (f'name: "t"\nlayer {{ name: "in" type: "Input" {tops} input_param {{ {inputs} }} }}\n'
            f'layer {{ name: "r" type: "{type_}" {bottoms} top: "h" recurrent_param {{ num_output: {H} {fillers} }} }}\n')


def test_rnn_lstm_blob_order_shapes_and_fillers():
    """Caffe's blob order: LSTM W_xc, b_c, W_xc_static, W_hc; RNN W_xh, b_h, W_xh_static, W_hh, W_ho, b_o.
    Weights take weight_filler and biases bias_filler; unset, both are Caffe's constant 0."""
    fill = 'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.5 }'
    lstm = make_net(_rec_net_text("LSTM", 4, 3, 2, 5, static=6, fillers=fill), "TEST")
    ps = lstm.params["r"]
    assert [p.data.shape for p in ps] == [(16, 5), (16,), (16, 6), (16, 4)]
    rnn = make_net(_rec_net_text("RNN", 4, 3, 2, 5, static=6, fillers=fill), "TEST")
    qs = rnn.params["r"]
    assert [p.data.shape for p in qs] == [(4, 5), (4,), (4, 6), (4, 4), (4, 4), (4,)]
    for blobs, biases in ((ps, {1}), (qs, {1, 5})):
        for j, p in enumerate(blobs):
            if j in biases:
                assert np.all(p.data == 0.5)
            else:
                assert 0.05 < float(p.data.std()) < 0.15 and abs(float(p.data.mean())) < 0.05
    plain = make_net(_rec_net_text("LSTM", 4, 3, 2, 5), "TEST")
    assert all(not np.any(p.data) for p in plain.params["r"])


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_cont_zero_mid_sequence_restarts_the_state(type_):
    """Each stream's segments between zeros of cont, run on their own from a zero state, give the
    same outputs and input gradients, and their parameter gradients sum to the whole's."""
    T, N, K, H = 6, 2, 3, 3
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, N, K))
    cont = np.array([[0, 0], [1, 1], [1, 0], [0, 1], [1, 1], [1, 0]], dtype=F64)
    layer = _rec_layer(type_, H, [x.shape, cont.shape])
    params = [rng.standard_normal(s) * 0.7 for s in layer.param_shapes]
    dy = rng.standard_normal((T, N, H))
    (y,), saved = forward(layer, [x, cont], params)
    (dx, dc), dps = layer.backward(np, saved, [dy], params, [True, True])
    assert dc is None
    total = [np.zeros_like(p) for p in params]
    for n in range(N):
        starts = [t for t in range(T) if cont[t, n] == 0] + [T]
        for a, b in zip(starts, starts[1:]):
            seg = _rec_layer(type_, H, [(b - a, 1, K), (b - a, 1)])
            xs, cs = x[a:b, n:n + 1], np.ones((b - a, 1))
            (ys,), sv = forward(seg, [xs, cs], params)
            assert_close(y[a:b, n:n + 1], ys, 1e-12, f"stream {n} steps {a}..{b}")
            (dxs, _), dss = seg.backward(np, sv, [dy[a:b, n:n + 1]], params, [True, False])
            assert_close(dx[a:b, n:n + 1], dxs, 1e-12, f"dx stream {n} steps {a}..{b}")
            total = [u + v for u, v in zip(total, dss)]
    for j, (u, v) in enumerate(zip(dps, total)):
        assert_close(u, v, 1e-12, f"param {j}")


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_state_carries_into_the_next_forward_unless_cont_restarts(type_):
    """Without expose_hidden Caffe copies h_T (and c_T) into the next forward's h_0 (c_0): a long
    sequence fed in two batches with cont_1 = 1 in the second equals it fed at once."""
    T, N, K, H = 3, 2, 2, 3
    fill = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2 * T, N, K))
    cont = np.ones((2 * T, N))
    cont[0] = 0
    whole = make_net(_rec_net_text(type_, H, 2 * T, N, K, fillers=fill), "TEST")
    halves = make_net(_rec_net_text(type_, H, T, N, K, fillers=fill), "TEST")
    y = whole.forward(x=x, cont=cont)["h"]
    halves.forward(x=x[:T], cont=cont[:T])
    assert_close(halves.forward(x=x[T:], cont=cont[T:])["h"], y[T:], 1e-12)
    fresh = make_net(_rec_net_text(type_, H, T, N, K, fillers=fill), "TEST")
    restart = cont[T:].copy()
    restart[0] = 0
    assert_close(halves.forward(x=x[T:], cont=restart)["h"], fresh.forward(x=x[T:], cont=restart)["h"], 1e-12)


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_exposed_hidden_state_gets_no_gradient_and_h_T_gradients_are_ignored(type_):
    """Caffe shares only the data of h_0 / c_0 and h_T / c_T with its unrolled net: no gradient to
    the initial state (nor to cont), and the final state's top gradients have no effect."""
    T, N, K, H = 3, 2, 2, 2
    nh = {"RNN": 1, "LSTM": 2}[type_]
    shapes = [(T, N, K), (T, N)] + [(1, N, H)] * nh
    layer = _rec_layer(type_, H, shapes, expose=True)
    rng = np.random.default_rng(7)
    bottoms = [rng.standard_normal(shapes[0]), np.ones((T, N))] + [rng.standard_normal(s) for s in shapes[2:]]
    params = [rng.standard_normal(s) * 0.7 for s in layer.param_shapes]
    tops, saved = forward(layer, bottoms, params)
    if type_ == "LSTM":                                   # RNN's top is o, not h
        assert_close(tops[1][0], tops[0][-1], 0, "h_T")
    dy = [rng.standard_normal(t.shape) for t in tops]
    db, dp = layer.backward(np, saved, dy, params, [True] * len(bottoms))
    assert db[1:] == [None] * (1 + nh)
    db0, dp0 = layer.backward(np, saved, [dy[0]] + [np.zeros_like(d) for d in dy[1:]], params, [True] * len(bottoms))
    assert_close(db[0], db0[0], 0, "dx")
    for a, b in zip(dp, dp0):
        assert_close(a, b, 0, "param grads")


def test_rnn_lstm_shape_errors():
    from netdsl.errors import NetdslError

    def codes(type_, params, shapes, ntops=1):
        with pytest.raises(NetdslError) as e:
            build_layer(type_, f"recurrent_param {{ {params} }}", shapes, ntops, "TEST")
        return [d.code for d in e.value.diagnostics]
    assert codes("LSTM", "num_output: 2", [(3, 2, 4), (3, 3)]) == ["E0221"]                # cont is not T x N
    assert codes("RNN", "num_output: 2", [(3,), (3, 1)]) == ["E0221"]                     # x is not T x N x ...
    assert codes("LSTM", "num_output: 2", [(3, 2, 4), (3, 2), (3, 5)]) == ["E0221"]       # static input not N x ...
    assert codes("LSTM", "num_output: 2 expose_hidden: true", [(3, 2, 4), (3, 2), (1, 2, 3), (1, 2, 2)], 3) == ["E0221"]
    assert codes("LSTM", "num_output: 2 expose_hidden: true", [(3, 2, 4), (3, 2), (1, 2, 2)], 3) == ["E0202"]
    assert codes("RNN", "num_output: 2 expose_hidden: true", [(3, 2, 4), (3, 2), (1, 2, 2)], 1) == ["E0202"]
    assert codes("RNN", "num_output: 0", [(3, 2, 4), (3, 2)]) == ["E0107"]
    assert codes("RNN", "", [(3, 2, 4), (3, 2)]) == ["E0106"]


def _torch_gates(w, H):
    """Caffe's gate blocks (i, f, o, g) <-> torch's (i, f, g, o): the same swap both ways."""
    return np.concatenate([w[:2 * H], w[3 * H:], w[2 * H:3 * H]])


REC_DIMS = (5, 3, 4, 3, 2)      # T, N, K, H, S of the torch comparisons


def _rec_inputs(kind: str, seed: int, static: bool, expose: bool, states: int):
    """(rng, layer, bottoms, params) of an RNN/LSTM comparison: x (T,N,K), cont (all 1, or 0 at the
    first step unless the hidden state is exposed), the static input, the exposed states."""
    T, N, K, H, S = REC_DIMS
    rng = np.random.default_rng(seed)
    shapes = [(T, N, K), (T, N)] + ([(N, S)] if static else []) + ([(1, N, H)] * states if expose else [])
    layer = _rec_layer(kind, H, shapes, expose)
    x, cont = rng.standard_normal(shapes[0]), np.ones((T, N))
    if not expose:
        cont[0] = 0
    bottoms = [x, cont] + [rng.standard_normal(s) for s in shapes[2:]]
    return rng, layer, bottoms, [rng.standard_normal(s) * 0.5 for s in layer.param_shapes]


@pytest.mark.parametrize("static, expose", [(False, False), (True, False), (False, True), (True, True)])
def test_lstm_matches_torch(static, expose):
    """torch.nn.LSTM with Caffe's weights (gate rows reordered, bias_hh = 0; the static input as
    extra input columns tiled over T). cont = 1 after the first step; with expose_hidden also at
    t = 1, so torch's (h_0, c_0) are Caffe's exposed h_0 / c_0."""
    torch = _torch()
    T, N, K, H, S = REC_DIMS
    rng, layer, bottoms, params = _rec_inputs("LSTM", 8 + 2 * static + expose, static, expose, states=2)
    x = bottoms[0]
    tops, saved = forward(layer, bottoms, params)
    net = torch.nn.LSTM(K + (S if static else 0), H).double()
    W_ih = np.concatenate([params[0], params[2]], axis=1) if static else params[0]
    with torch.no_grad():
        net.weight_ih_l0.copy_(torch.tensor(_torch_gates(W_ih, H)))
        net.weight_hh_l0.copy_(torch.tensor(_torch_gates(params[-1], H)))
        net.bias_ih_l0.copy_(torch.tensor(_torch_gates(params[1], H)))
        net.bias_hh_l0.zero_()
    xt = torch.tensor(x, requires_grad=True)
    inp = xt
    if static:
        st = torch.tensor(bottoms[2], requires_grad=True)
        inp = torch.cat([xt, st.expand(T, N, S)], dim=2)
    state = tuple(torch.tensor(b) for b in bottoms[-2:]) if expose else None
    yt, (hn, cn) = net(inp, state)
    assert_close(tops[0], yt.detach().numpy(), 1e-12, "h")
    if expose:
        assert_close(tops[1], hn.detach().numpy(), 1e-12, "h_T")
        assert_close(tops[2], cn.detach().numpy(), 1e-12, "c_T")
    dy = rng.standard_normal(tops[0].shape)
    yt.backward(torch.tensor(dy))
    dtops = [dy] + [np.zeros(t.shape) for t in tops[1:]]
    db, dp = layer.backward(np, saved, dtops, params, [True] * len(bottoms))
    assert_close(db[0], xt.grad.numpy(), 1e-12, "dx")
    gW = _torch_gates(net.weight_ih_l0.grad.numpy(), H)
    assert_close(dp[0], gW[:, :K], 1e-12, "dW_xc")
    assert_close(dp[1], _torch_gates(net.bias_ih_l0.grad.numpy(), H), 1e-12, "db_c")
    assert_close(dp[-1], _torch_gates(net.weight_hh_l0.grad.numpy(), H), 1e-12, "dW_hc")
    if static:
        assert_close(dp[2], gW[:, K:], 1e-12, "dW_xc_static")
        assert_close(db[2], st.grad.numpy(), 1e-12, "dx_static")


@pytest.mark.parametrize("static, expose", [(False, False), (True, False), (False, True), (True, True)])
def test_rnn_matches_torch(static, expose):
    """torch.nn.RNN (tanh; bias_hh = 0) gives Caffe's h; Caffe's output layer o = tanh(W_ho h + b_o)
    is added in torch."""
    torch = _torch()
    T, N, K, H, S = REC_DIMS
    rng, layer, bottoms, params = _rec_inputs("RNN", 20 + 2 * static + expose, static, expose, states=1)
    x = bottoms[0]
    tops, saved = forward(layer, bottoms, params)
    net = torch.nn.RNN(K + (S if static else 0), H, nonlinearity="tanh").double()
    with torch.no_grad():
        net.weight_ih_l0.copy_(torch.tensor(np.concatenate([params[0], params[2]], axis=1) if static else params[0]))
        net.weight_hh_l0.copy_(torch.tensor(params[-3]))
        net.bias_ih_l0.copy_(torch.tensor(params[1]))
        net.bias_hh_l0.zero_()
    W_ho, b_o = (torch.tensor(p, requires_grad=True) for p in params[-2:])
    xt = torch.tensor(x, requires_grad=True)
    inp = xt
    if static:
        st = torch.tensor(bottoms[2], requires_grad=True)
        inp = torch.cat([xt, st.expand(T, N, S)], dim=2)
    hs, hn = net(inp, torch.tensor(bottoms[-1]) if expose else None)
    ot = torch.tanh(hs @ W_ho.T + b_o)
    assert_close(tops[0], ot.detach().numpy(), 1e-12, "o")
    if expose:
        assert_close(tops[1], hn.detach().numpy(), 1e-12, "h_T")
    dy = rng.standard_normal(tops[0].shape)
    ot.backward(torch.tensor(dy))
    dtops = [dy] + [np.zeros(t.shape) for t in tops[1:]]
    db, dp = layer.backward(np, saved, dtops, params, [True] * len(bottoms))
    assert_close(db[0], xt.grad.numpy(), 1e-12, "dx")
    gW = net.weight_ih_l0.grad.numpy()
    assert_close(dp[0], gW[:, :K], 1e-12, "dW_xh")
    assert_close(dp[1], net.bias_ih_l0.grad.numpy(), 1e-12, "db_h")
    assert_close(dp[-3], net.weight_hh_l0.grad.numpy(), 1e-12, "dW_hh")
    assert_close(dp[-2], W_ho.grad.numpy(), 1e-12, "dW_ho")
    assert_close(dp[-1], b_o.grad.numpy(), 1e-12, "db_o")
    if static:
        assert_close(dp[2], gW[:, K:], 1e-12, "dW_xh_static")
        assert_close(db[2], st.grad.numpy(), 1e-12, "dx_static")


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_recurrent_net_gradients(type_):
    """Through a Net: the layer with a static input, InnerProduct (axis 2) and EuclideanLoss; the
    params' gradients match central differences, and cont gets none."""
    text = _rec_net_text(type_, 3, 4, 2, 2, static=2) + (
        'layer { name: "t" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 dim: 1 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "h" top: "p" inner_product_param { num_output: 1 axis: 2 '
        'weight_filler { type: "gaussian" std: 0.5 } } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }\n')
    text = text.replace("num_output: 3 ", 'num_output: 3 weight_filler { type: "gaussian" std: 0.5 } ')
    net = make_net(text)
    rng = np.random.default_rng(9)
    cont = np.ones((4, 2))
    cont[0] = 0
    cont[2, 1] = 0
    feed = dict(x=rng.standard_normal((4, 2, 2)), cont=cont, xs=rng.standard_normal((2, 2)), y=rng.standard_normal((4, 2, 1)))
    assert net_grads_match_numeric(net, feed) == 2 + len(net.params["r"])
    assert net.blobs["cont"].grad is None


# =============================================================================================
# ---- common layers (layers/common.py): Caffe's semantics by hand, then PyTorch oracles

def _common_error(type_, params, shapes, ntops=1):
    from netdsl.errors import NetdslError
    with pytest.raises(NetdslError) as e:
        build_layer(type_, params, shapes, ntops)
    return {d.code for d in e.value.diagnostics}


def test_bias_values_and_gradients():
    x = np.arange(12.0).reshape(2, 3, 2)
    layer = build_layer("Bias", "", [x.shape])
    assert layer.param_shapes == [(3,)]
    (y,), saved = forward(layer, [x], [np.array([0.5, 0.0, -1.0])])
    np.testing.assert_array_equal(y, x + [[[0.5], [0.0], [-1.0]]])
    dy = np.random.default_rng(0).standard_normal(x.shape)
    (dx,), (db,) = layer.backward(np, saved, [dy], [np.zeros(3)], [True])
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-14)
    # a scalar 2nd bottom applies from axis 0 whatever `axis` says (Caffe), and gets the total gradient
    layer, (y,), saved = run("Bias", "bias_param { axis: 2 }", x, np.array(2.0))
    np.testing.assert_array_equal(y, x + 2)
    (dx, db), dp = layer.backward(np, saved, [dy], [], [True, True])
    assert dp == [] and db.shape == () and float(db) == pytest.approx(dy.sum(), rel=1e-14)
    # the default filler is constant 0 (Scale's is 1)
    assert build_layer("Bias", "", [x.shape]).fillers()[0].value == 0.0
    assert "E0322" in _common_error("Bias", "", [(2, 3, 4), (4,)])
    assert "E0220" in _common_error("Bias", "bias_param { axis: 2 num_axes: 2 }", [(2, 3, 4)])


def test_embed_rows_bias_and_repeated_indices():
    W, b = np.arange(12.0).reshape(4, 3), np.array([0.5, -1.0, 2.0])
    idx = np.array([[0.0, 3.0], [3.0, 1.0]])
    layer = build_layer("Embed", "embed_param { num_output: 3 input_dim: 4 }", [idx.shape])
    assert layer.param_shapes == [(4, 3), (3,)] and layer.top_shapes == [(2, 2, 3)]
    (y,), saved = forward(layer, [idx], [W, b])
    np.testing.assert_array_equal(y, W[idx.astype(int)] + b)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    (dx,), (dW, db) = layer.backward(np, saved, [dy], [W, b], [True])
    assert dx is None                       # never a gradient to the indices
    want = np.zeros((4, 3))
    for (n, t), i in np.ndenumerate(idx):
        want[int(i)] += dy[n, t]
    np.testing.assert_allclose(dW, want, rtol=1e-14)
    assert not dW[2].any()
    np.testing.assert_allclose(db, dy.sum(axis=(0, 1)), rtol=1e-14)
    from netdsl.errors import NetdslError
    for bad in (4.0, -1.0, 1.5, np.nan):
        with pytest.raises(NetdslError) as e:
            forward(layer, [np.array([[0.0, bad], [1.0, 2.0]])], [W, b])
        assert e.value.diagnostic.code == "E0621"
    assert "E0106" in _common_error("Embed", "embed_param { num_output: 3 }", [(2,)])


def test_tile_repeats_the_whole_trailing_block():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, (y,), _ = run("Tile", "tile_param { tiles: 2 }", x)
    np.testing.assert_array_equal(y, [[1, 2, 3, 1, 2, 3], [4, 5, 6, 4, 5, 6]])
    layer, (y,), saved = run("Tile", "tile_param { axis: 0 tiles: 3 }", x)
    np.testing.assert_array_equal(y, np.vstack([x, x, x]))
    dy = np.arange(18.0).reshape(6, 3)
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    np.testing.assert_array_equal(dx, dy[:2] + dy[2:4] + dy[4:])
    assert "E0106" in _common_error("Tile", "", [(2, 3)])
    assert "E0107" in _common_error("Tile", "tile_param { tiles: 0 }", [(2, 3)])


def test_reduction_operations_by_hand():
    x = np.array([[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 4.0], [2.0, -0.5]]])
    for op, want in (("SUM", x.sum()), ("ASUM", np.abs(x).sum()), ("SUMSQ", (x * x).sum()), ("MEAN", x.mean())):
        layer, (y,), _ = run("Reduction", f"reduction_param {{ operation: {op} coeff: 2 }}", x)
        assert y.shape == () and layer.top_shapes == [()]
        assert float(y) == pytest.approx(2 * want, rel=1e-14), op
    # axis 1 keeps the leading axis and reduces ALL the tail axes (Caffe reduces no middle axis)
    layer, (y,), saved = run("Reduction", "reduction_param { operation: ASUM axis: 1 coeff: -3 }", x)
    np.testing.assert_allclose(y, -3 * np.abs(x).reshape(2, -1).sum(axis=1), rtol=1e-14)
    (dx,), _ = layer.backward(np, saved, [np.array([1.0, 2.0])], [], [True])
    np.testing.assert_array_equal(dx, -3 * np.sign(x) * np.array([1.0, 2.0]).reshape(2, 1, 1))
    assert dx[0, 1, 0] == 0                 # sign(0) = 0, as caffe_cpu_sign
    layer, (y,), saved = run("Reduction", "reduction_param { operation: MEAN axis: -1 coeff: 4 }", x)
    np.testing.assert_allclose(y, 4 * x.mean(axis=-1), rtol=1e-14)
    dy = np.arange(4.0).reshape(2, 2)
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    np.testing.assert_allclose(dx, np.repeat(dy[..., None] * 4 / 2, 2, axis=-1), rtol=1e-14)
    layer, _, saved = run("Reduction", "reduction_param { operation: SUMSQ axis: 2 coeff: 0.5 }", x)
    (dx,), _ = layer.backward(np, saved, [np.ones((2, 2))], [], [True])
    np.testing.assert_allclose(dx, x, rtol=1e-14)            # 2 * coeff * x


def test_argmax_ties_layouts_and_values():
    # Caffe sorts (value, index) pairs with std::greater: among equal values the larger index wins
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    _, (y,), _ = run("ArgMax", "", x)
    assert y.shape == (2, 1, 1)             # Caffe gives at least 3 axes: N x 1 x top_k
    np.testing.assert_array_equal(y.reshape(-1), [2, 3])
    _, (y,), _ = run("ArgMax", "argmax_param { top_k: 3 out_max_val: true }", x)
    assert y.shape == (2, 2, 3)             # per sample: the k indices, then the k values
    np.testing.assert_array_equal(y, [[[2, 1, 0], [3, 3, 1]], [[3, 2, 1], [2, 2, 2]]])
    x4 = np.random.default_rng(2).permutation(24).reshape(2, 3, 2, 2).astype(F64)
    layer, (y,), _ = run("ArgMax", "argmax_param { top_k: 2 }", x4)
    assert y.shape == layer.top_shapes[0] == (2, 1, 2, 1)
    np.testing.assert_array_equal(y[:, 0, :, 0], np.argsort(-x4.reshape(2, -1), axis=1)[:, :2])
    _, (y,), _ = run("ArgMax", "argmax_param { axis: 1 top_k: 2 out_max_val: true }", x4)
    np.testing.assert_array_equal(y, -np.sort(-x4, axis=1)[:, :2])
    _, (y,), _ = run("ArgMax", "argmax_param { axis: -1 }", x4)
    np.testing.assert_array_equal(y, np.argmax(x4, axis=-1)[..., None])
    assert "E0361" in _common_error("ArgMax", "argmax_param { top_k: 5 }", [(2, 4)])
    assert "E0361" in _common_error("ArgMax", "argmax_param { axis: 1 top_k: 4 }", [(2, 3, 5)])


def test_mvn_adds_eps_to_the_std_and_keeps_caffes_gradient():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 2, 3))
    for across, rows in ((False, x.reshape(6, -1)), (True, x.reshape(2, -1))):
        layer, (y,), saved = run("MVN", f"mvn_param {{ across_channels: {str(across).lower()} eps: 0.5 }}", x)
        d = rows - rows.mean(axis=1, keepdims=True)
        sd = np.sqrt((d ** 2).mean(axis=1, keepdims=True)) + 0.5        # eps on the std, not the variance
        np.testing.assert_allclose(y, (d / sd).reshape(x.shape), rtol=1e-13)
        # backward is Caffe's (dy - mean(dy) - y mean(y dy)) / (std + eps): the exact gradient only
        # when eps = 0, so with this large eps it differs from the numerical one (as Caffe's does)
        dy = rng.standard_normal(x.shape)
        (dx,), _ = layer.backward(np, saved, [dy], [], [True])
        g, yr = dy.reshape(rows.shape), (d / sd)
        want = (g - g.mean(axis=1, keepdims=True) - yr * (yr * g).mean(axis=1, keepdims=True)) / sd
        np.testing.assert_allclose(dx, want.reshape(x.shape), rtol=1e-12)
        num = numeric_grad(lambda: float((forward(layer, [x], [])[0][0] * dy).sum()), x)
        assert np.abs(dx - num).max() > 1e-3
    _, (y,), _ = run("MVN", "", np.full((2, 2, 3), 7.0))
    assert y.shape == (2, 2, 3, 1) and not y.any()           # constant rows: 0 / (0 + eps)
    # Caffe reshapes the top to num x channels x height x width
    layer, (y,), _ = run("MVN", "mvn_param { across_channels: true }", x.reshape(2, -1))
    assert y.shape == layer.top_shapes[0] == (2, 18, 1, 1)
    _, (y,), saved = run("MVN", "mvn_param { normalize_variance: false }", x)
    np.testing.assert_allclose(y, x - x.mean(axis=(2, 3), keepdims=True), atol=1e-15)
    assert "E0221" in _common_error("MVN", "", [(1, 2, 3, 4, 5)])


def test_spp_levels_are_caffes_pooling_flattened_and_concatenated():
    from netdsl.layers.common import SPP
    assert SPP.level(5, 2) == (3, 1) and SPP.level(7, 2) == (4, 1) and SPP.level(7, 4) == (2, 1)
    assert SPP.level(6, 4) == (2, 1) and SPP.level(8, 4) == (2, 0) and SPP.level(5, 1) == (5, 0)
    x = np.random.default_rng(4).permutation(2 * 2 * 6 * 7).reshape(2, 2, 6, 7) * 0.1
    for pool in ("MAX", "AVE"):
        layer, (y,), _ = run("SPP", f"spp_param {{ pyramid_height: 3 pool: {pool} }}", x)
        parts = []
        for bins in (1, 2, 4):
            (kh, ph), (kw, pw) = SPP.level(6, bins), SPP.level(7, bins)
            ref, _ = pool_ref(x, pool, kh, kw, kh, kw, ph, pw)
            assert ref.shape[2:] == (bins, bins)
            parts.append(ref.reshape(2, -1))
        assert y.shape == layer.top_shapes[0] == (2, 2 * 21)
        np.testing.assert_allclose(y, np.concatenate(parts, axis=1), rtol=1e-14)
    _, (y,), _ = run("SPP", "spp_param { pyramid_height: 1 }", x)      # one level: not flattened
    np.testing.assert_array_equal(y, x.max(axis=(2, 3), keepdims=True))
    # 4 bins over 5 rows need pad 2 >= kernel 2, which Caffe's Pooling rejects
    assert "E0402" in _common_error("SPP", "spp_param { pyramid_height: 3 }", [(1, 1, 5, 8)])
    assert "E0106" in _common_error("SPP", "", [(1, 1, 5, 8)])
    assert "E0109" in _common_error("SPP", "spp_param { pyramid_height: 2 pool: STOCHASTIC }", [(1, 1, 4, 4)])


def test_filter_keeps_nonzero_items_and_routes_gradients():
    x, z = np.arange(12.0).reshape(4, 3), np.arange(8.0).reshape(4, 2, 1)
    sel = np.array([0.0, 2.0, 0.0, -1.0]).reshape(4, 1)           # nonzero, whatever its sign, keeps
    layer = build_layer("Filter", "", [x.shape, z.shape, sel.shape], ntops=2)
    assert layer.top_shapes == [(None, 3), (None, 2, 1)]
    tops, saved = forward(layer, [x, z, sel], [])
    np.testing.assert_array_equal(tops[0], x[[1, 3]])
    np.testing.assert_array_equal(tops[1], z[[1, 3]])
    dys = [np.ones(t.shape) for t in tops]
    (dx, dz, dsel), _ = layer.backward(np, saved, dys, [], [True, True, False])
    assert dsel is None
    np.testing.assert_array_equal(dx, [[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(dz[:, :, 0], [[0, 0], [1, 1], [0, 0], [1, 1]])
    tops, saved = forward(layer, [x, z, np.zeros((4, 1))], [])
    assert tops[0].shape == (0, 3)
    (dx, _, _), _ = layer.backward(np, saved, [np.zeros((0, 3)), np.zeros((0, 2, 1))], [], [True, False, False])
    assert dx.shape == x.shape and not dx.any()
    assert "E0221" in _common_error("Filter", "", [(4, 3), (4, 2)])
    assert "E0221" in _common_error("Filter", "", [(4, 3), (5,)])
    assert "E0202" in _common_error("Filter", "", [(4, 3), (4, 3), (4,)], ntops=1)


def test_filter_in_a_net_has_a_data_dependent_top():
    text = ('name: "t"\n'
            'layer { name: "in" type: "Input" top: "x" top: "s" input_param { shape { dim: 4 dim: 3 } '
            'shape { dim: 4 } } }\n'
            'layer { name: "f" type: "Filter" bottom: "x" bottom: "s" top: "y" }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z" inner_product_param { num_output: 2 } }\n')
    net = make_net(text, phase="TEST")
    out = net.forward(x=np.ones((4, 3)), s=np.array([1.0, 0.0, 1.0, 1.0]))
    assert out["z"].shape == (3, 2)
    assert_net_shapes(net)


def test_batch_reindex_gathers_and_accumulates():
    x = np.arange(6.0).reshape(3, 2)
    perm = np.array([2.0, 0.0, 2.0, 2.7])            # 2.7 -> 2: Caffe's static_cast<int> truncates
    layer, (y,), saved = run("BatchReindex", "", x, perm)
    assert layer.top_shapes == [(4, 2)]
    np.testing.assert_array_equal(y, x[[2, 0, 2, 2]])
    dy = np.arange(8.0).reshape(4, 2) + 1
    (dx, dp), _ = layer.backward(np, saved, [dy], [], [True, False])
    assert dp is None
    np.testing.assert_array_equal(dx, [dy[1], [0, 0], dy[0] + dy[2] + dy[3]])
    from netdsl.errors import NetdslError
    for bad in (3.0, -0.5):
        with pytest.raises(NetdslError):
            forward(layer, [x, np.array([0.0, bad, 1.0, 1.0])], [])
    assert "E0221" in _common_error("BatchReindex", "", [(3, 2), (2, 2)])


def test_parameter_top_is_its_zero_initialised_blob():
    text = ('name: "t"\n'
            'layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "in" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "l" type: "EuclideanLoss" bottom: "p" bottom: "t" top: "l" }\n')
    net = make_net(text)
    (blob,) = net.params["p"]
    assert blob.data.shape == (2, 3) and not blob.data.any()     # Caffe fills nothing
    blob.data[...] = np.arange(6.0).reshape(2, 3)
    t = np.ones((2, 3))
    net.forward(t=t)
    np.testing.assert_array_equal(net.values["p"], blob.data)
    net.backward()
    np.testing.assert_allclose(blob.grad, (blob.data - t) / 2, rtol=1e-14)
    assert "E0107" in _common_error("Parameter", "parameter_param { shape { dim: 2 dim: -1 } }", [])


def test_im2col_matches_naive_caffe_loops():
    x = np.random.default_rng(5).standard_normal((2, 2, 5, 6))
    layer, (y,), saved = run("Im2col", "convolution_param { num_output: 1 kernel_h: 3 kernel_w: 2 stride_h: 2 "
                                       "pad: 1 dilation: 2 }", x)
    kh, kw, sh, sw, ph, pw, dh, dw = 3, 2, 2, 1, 1, 1, 2, 2
    oh, ow = (5 + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (6 + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    ref = np.zeros((2, 2 * kh * kw, oh, ow))
    for n, c, i, j, r, q in itertools.product(range(2), range(2), range(kh), range(kw), range(oh), range(ow)):
        h, w = r * sh - ph + i * dh, q * sw - pw + j * dw
        if 0 <= h < 5 and 0 <= w < 6:
            ref[n, (c * kh + i) * kw + j, r, q] = x[n, c, h, w]
    np.testing.assert_array_equal(y, ref)
    dy = np.random.default_rng(6).standard_normal(y.shape)
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    want = np.zeros(x.shape)                   # col2im: every column entry back to its pixel, summed
    for n, c, i, j, r, q in itertools.product(range(2), range(2), range(kh), range(kw), range(oh), range(ow)):
        h, w = r * sh - ph + i * dh, q * sw - pw + j * dw
        if 0 <= h < 5 and 0 <= w < 6:
            want[n, c, h, w] += dy[n, (c * kh + i) * kw + j, r, q]
    np.testing.assert_allclose(dx, want, rtol=1e-13, atol=1e-15)
    assert "E0401" in _common_error("Im2col", "convolution_param { num_output: 1 kernel_size: 7 }", [(1, 1, 5, 5)])


def test_im2col_needs_no_num_output():
    build_layer("Im2col", "convolution_param { kernel_size: 2 }", [(1, 1, 4, 4)])


def test_common_layers_match_torch():
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    # Embed = F.embedding (+ bias); its weight gradient accumulates repeated indices
    W, b, idx = rng.standard_normal((5, 3)), rng.standard_normal(3), rng.integers(0, 5, (4, 3)).astype(F64)
    layer, (y,), saved = run("Embed", "embed_param { num_output: 3 input_dim: 5 }", idx, layer_params=(W, b))
    Wt = torch.tensor(W, requires_grad=True)
    yt = F.embedding(torch.tensor(idx, dtype=torch.long), Wt) + torch.tensor(b)
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    _, (dW, _) = layer.backward(np, saved, [dy], [W, b], [False])
    assert_close(y, yt.detach().numpy(), 1e-14)
    assert_close(dW, Wt.grad.numpy(), 1e-13)
    # Tile = Tensor.repeat along the axis
    x = rng.standard_normal((2, 3, 4))
    _, (y,), _ = run("Tile", "tile_param { axis: 1 tiles: 3 }", x)
    np.testing.assert_array_equal(y, torch.tensor(x).repeat(1, 3, 1).numpy())
    # ArgMax without axis = topk over each flattened sample (distinct values: no ties)
    x = rng.permutation(60).reshape(3, 4, 5).astype(F64)
    _, (y,), _ = run("ArgMax", "argmax_param { top_k: 4 out_max_val: true }", x)
    v, i = torch.topk(torch.tensor(x).flatten(1), 4)
    np.testing.assert_array_equal(y, torch.stack([i.double(), v], 1).numpy())
    # BatchReindex = index_select, whose backward accumulates
    x, perm = rng.standard_normal((4, 3)), np.array([3.0, 1.0, 3.0, 0.0, 3.0])
    layer, (y,), saved = run("BatchReindex", "", x, perm)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.index_select(xt, 0, torch.tensor(perm, dtype=torch.long))
    dy = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    (dx, _), _ = layer.backward(np, saved, [dy], [], [True, False])
    assert_close(y, yt.detach().numpy(), 1e-15)
    assert_close(dx, xt.grad.numpy(), 1e-14)


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction_matches_torch(op):
    torch = _torch()
    x = np.random.default_rng(8).standard_normal((2, 3, 4))
    layer, (y,), saved = run("Reduction", f"reduction_param {{ operation: {op} axis: 1 coeff: 1.5 }}", x)
    xt = torch.tensor(x, requires_grad=True)
    f = {"SUM": lambda a: a, "ASUM": torch.abs, "SUMSQ": lambda a: a * a, "MEAN": lambda a: a}[op]
    yt = 1.5 * (f(xt).flatten(1).mean(1) if op == "MEAN" else f(xt).flatten(1).sum(1))
    dy = np.array([0.7, -1.3])
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(y, yt.detach().numpy(), 1e-14)
    assert_close(dx, xt.grad.numpy(), 1e-14)


@pytest.mark.parametrize("across", [False, True])
def test_mvn_matches_torch_group_norm(across):
    """MVN = group_norm (1 group across channels, C groups per channel) up to Caffe's eps 1e-9
    on the std (torch adds eps to the variance; here 0)."""
    torch = _torch()
    x = np.random.default_rng(9).standard_normal((2, 3, 4, 5))
    layer, (y,), saved = run("MVN", f"mvn_param {{ across_channels: {str(across).lower()} }}", x)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.group_norm(xt, 1 if across else 3, eps=0.0)
    dy = np.random.default_rng(10).standard_normal(x.shape)
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(y, yt.detach().numpy(), 1e-8)
    assert_close(dx, xt.grad.numpy(), 1e-8)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_matches_torch_pooling(pool):
    """Each level is torch pooling with kernel = stride = ceil(in / bins), Caffe's pad and
    ceil_mode (AVE: count_include_pad, as Caffe's divisor); then flatten and concatenate."""
    torch = _torch()
    from netdsl.layers.common import SPP
    F = torch.nn.functional
    x = np.random.default_rng(11).permutation(2 * 3 * 6 * 7).reshape(2, 3, 6, 7) * 0.01
    layer, (y,), saved = run("SPP", f"spp_param {{ pyramid_height: 3 pool: {pool} }}", x)
    xt = torch.tensor(x, requires_grad=True)
    parts = []
    for bins in (1, 2, 4):
        (kh, ph), (kw, pw) = SPP.level(6, bins), SPP.level(7, bins)
        if pool == "MAX":
            p = F.max_pool2d(xt, (kh, kw), (kh, kw), (ph, pw), ceil_mode=True)
        else:
            p = F.avg_pool2d(xt, (kh, kw), (kh, kw), (ph, pw), ceil_mode=True, count_include_pad=True)
        parts.append(p.flatten(1))
    yt = torch.cat(parts, 1)
    dy = np.random.default_rng(12).standard_normal(y.shape)
    yt.backward(torch.tensor(dy))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(y, yt.detach().numpy(), 1e-14)
    assert_close(dx, xt.grad.numpy(), 1e-13)


def test_im2col_matches_torch_unfold():
    torch = _torch()
    x = np.random.default_rng(13).standard_normal((2, 3, 6, 5))
    layer, (y,), saved = run("Im2col", "convolution_param { num_output: 1 kernel_size: 3 stride: 2 pad: 1 "
                                       "dilation: 2 }", x)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.unfold(xt, 3, dilation=2, padding=1, stride=2)
    dy = np.random.default_rng(14).standard_normal(y.shape)
    yt.backward(torch.tensor(dy.reshape(yt.shape)))
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    assert_close(y.reshape(yt.shape), yt.detach().numpy(), 1e-15)
    assert_close(dx, xt.grad.numpy(), 1e-14)


# =============================================================================================
# ---- more losses and ROIPooling: exact Caffe values, Caffe's loops, PyTorch oracles

def _run(type_, params, bottoms, dtop=1.0, phase="TRAIN", ntops=1):
    """Forward and backward of one layer on given float64 bottoms: (loss or top, dbottoms)."""
    layer = build_layer(type_, params, [b.shape for b in bottoms], ntops, phase)
    tops, saved = layer.forward(np, bottoms, [])
    dtops = [np.array(dtop) if t.shape == () else np.full(t.shape, dtop) for t in tops]
    dbottoms, _ = layer.backward(np, saved, dtops, [], [True] * len(bottoms))
    return tops[0], dbottoms


def _diagnostics(type_, params, shapes, ntops=1):
    from netdsl.errors import NetdslError
    with pytest.raises(NetdslError) as e:
        build_layer(type_, params, shapes, ntops)
    return e.value.diagnostics


KLOG = 1e-20       # Caffe's kLOG_THRESHOLD


def test_infogain_loss_by_hand():
    """Equal scores: p = 1/3. loss = -sum_l H[y, l] log p_l / VALID count; gradient p * rowsum(H[y]) - H[y]."""
    H = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.0]])
    loss, (dx, dl, dh) = _run("InfogainLoss", "", [np.zeros((2, 3)), np.array([0.0, 2.0]), H])
    assert_close(loss, math.log(3), 1e-12, "loss")              # (log 3 + (0.5 + 0.5) log 3) / 2
    third = 1 / 3
    assert_close(dx, np.array([[third - 1, third, third], [third - 0.5, third - 0.5, third]]) / 2, 1e-12, "dx")
    assert dl is None and dh is None                            # no gradient to the labels or H


def test_infogain_loss_identity_h_is_softmax_loss_and_ignore_label():
    rng = np.random.default_rng(3)
    x, lab = rng.standard_normal((2, 4, 3)), np.array([[0.0, 3.0, -1.0], [2.0, -1.0, 1.0]])
    p = "loss_param { ignore_label: -1 }"
    a, (da, _, _) = _run("InfogainLoss", p, [x, lab, np.eye(4)])
    b, (db, _) = _run("SoftmaxWithLoss", p, [x, lab])
    assert_close(a, b, 1e-12, "loss")
    assert_close(da, db, 1e-12, "dx")
    assert not np.any(da[0, :, 2]) and not np.any(da[1, :, 1])     # ignored positions get zero gradient


def test_infogain_loss_clamps_at_klog_threshold_not_flt_min():
    """p_1 = e^-1000 underflows to 0: Caffe's log(max(p, kLOG_THRESHOLD = 1e-20)) = -46.05, not
    log(FLT_MIN) = -87.34 as SoftmaxWithLoss; the gradient p * rowsum - H does not see the clamp."""
    loss, (dx, _, _) = _run("InfogainLoss", "", [np.array([[0.0, -1000.0]]), np.array([0.0]),
                                                 np.array([[0.0, 1.0], [0.0, 0.0]])])
    assert_close(loss, -math.log(KLOG), 1e-12, "loss")
    assert_close(dx, np.array([[1.0, -1.0]]), 1e-12, "dx")


def test_infogain_loss_param_errors():
    ds = _diagnostics("InfogainLoss", 'infogain_loss_param { source: "H.binaryproto" }', [(2, 3), (2,), (3, 3)])
    assert [d.code for d in ds] == ["E0109"]
    d = ds[0]
    assert "third bottom" in d.help and "source" in d.help and "read_blobproto" in d.help
    line = build_net_text("InfogainLoss", 'infogain_loss_param { source: "H.binaryproto" }', [(2, 3), (2,), (3, 3)],
                          1, "TRAIN").splitlines()[d.pos.line - 1]
    assert line[d.pos.column - 1:].startswith("source")          # points at the field
    assert [d.code for d in _diagnostics("InfogainLoss", "", [(2, 3), (2,)])] == ["E0202"]
    assert [d.code for d in _diagnostics("InfogainLoss", "loss_param { normalize: true }",
                                         [(2, 3), (2,), (3, 3)])] == ["E0108"]
    assert [d.code for d in _diagnostics("InfogainLoss", "", [(2, 3), (2,), (2, 2)])] == ["E0360"]
    assert [d.code for d in _diagnostics("InfogainLoss", "", [(2, 3), (3,), (3, 3)])] == ["E0360"]


def test_hinge_loss_l1_and_l2_by_hand():
    """t = -1 at the label, +1 elsewhere; m = max(0, 1 + t x). L1 = sum m / N, dx = sign(t m) / N
    (0 where the margin is met, x = -1 off the label included); L2 = sum m^2 / N, dx = 2 t m / N."""
    x, lab = np.array([[0.5, -2.0, 0.3], [1.5, 0.2, -1.0]]), np.array([0.0, 1.0])
    l1, (d1, dl) = _run("HingeLoss", "", [x, lab])
    assert_close(l1, (0.5 + 0 + 1.3 + 2.5 + 0.8 + 0) / 2, 1e-12, "L1")
    assert_close(d1, np.array([[-1, 0, 1], [1, -1, 0]]) / 2, 1e-12, "L1 dx")
    l2, (d2, _) = _run("HingeLoss", "hinge_loss_param { norm: L2 }", [x, lab])
    assert_close(l2, (0.25 + 1.69 + 6.25 + 0.64) / 2, 1e-12, "L2")
    assert_close(d2, np.array([[-0.5, 0, 1.3], [2.5, -0.8, 0]]), 1e-12, "L2 dx")
    assert dl is None


def test_multinomial_logistic_loss_by_hand_with_the_clamp():
    """loss = -sum log(max(p[label], 1e-20)) / N; Caffe's gradient -1 / (N max(p, 1e-20)), clamp included."""
    p = np.array([[0.2, 0.5, 0.3], [0.0, 0.1, 0.9]])
    loss, (dp, dl) = _run("MultinomialLogisticLoss", "", [p, np.array([1.0, 0.0])])
    assert_close(loss, (-math.log(0.5) - math.log(KLOG)) / 2, 1e-12, "loss")
    want = np.zeros((2, 3))
    want[0, 1], want[1, 0] = -1 / (2 * 0.5), -1 / (2 * KLOG)
    np.testing.assert_allclose(dp, want, rtol=1e-12)
    assert dl is None


def test_contrastive_loss_by_hand():
    """a = 0, b = (3,4), (0.3,0.4), (3,4): d = 5, 0.5, 5. y = 2 (similar: int(y) != 0), 0.7 (int 0:
    dissimilar), 0. margin 1: loss = (25 + (1 - 0.5)^2 + 0) / 3 / 2. Caffe's gradient for a pair
    inside the margin is -(margin - d) / (d + 1e-4) (a - b) / N (not / d); b gets its negative."""
    a, b, y = np.zeros((3, 2)), np.array([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]]), np.array([2.0, 0.7, 0.0])
    loss, (da, db, dy) = _run("ContrastiveLoss", "", [a, b, y], dtop=1.5)
    assert_close(loss, (25 + 0.25) / 6, 1e-12, "loss")
    d = a - b
    want = np.stack([d[0], -(1 - 0.5) / (0.5 + 1e-4) * d[1], 0 * d[2]]) * 1.5 / 3
    assert_close(da, want, 1e-12, "da")
    assert_close(db, -want, 1e-12, "db")
    assert dy is None
    exact = -(1 - 0.5) / 0.5 * d[1] * 1.5 / 3               # the derivative of the loss: Caffe's differs by 2e-4
    assert 1e-4 < float(np.abs(da[1] - exact).max() / np.abs(exact).max()) < 3e-4
    loss, (da, db, _) = _run("ContrastiveLoss", "contrastive_loss_param { legacy_version: true }", [a, b, y])
    assert_close(loss, (25 + (1 - 0.25)) / 6, 1e-12, "legacy loss")      # max(margin - d^2, 0)
    assert_close(da, np.stack([d[0], -d[1], 0 * d[2]]) / 3, 1e-12, "legacy da")
    assert_close(db, -da, 1e-12, "legacy db")


def test_contrastive_loss_shape_errors():
    assert [d.code for d in _diagnostics("ContrastiveLoss", "", [(2, 3), (2, 4), (2,)])] == ["E0360"]
    assert [d.code for d in _diagnostics("ContrastiveLoss", "", [(2, 3), (2, 3), (3,)])] == ["E0360"]
    assert [d.code for d in _diagnostics("ContrastiveLoss", "", [(2, 3, 2, 2), (2, 3, 2, 2), (2,)])] == ["E0221"]


def test_hinge_and_multinomial_need_one_label_per_sample():
    for t in ("HingeLoss", "MultinomialLogisticLoss"):
        assert [d.code for d in _diagnostics(t, "", [(4, 3), (3,)])] == ["E0360"]
        assert [d.code for d in _diagnostics(t, "", [(4, 3), (4, 3)])] == ["E0360"]


# ---- ROIPooling

def _roi(params, x, rois, dy=None):
    layer = build_layer("ROIPooling", f"roi_pooling_param {{ {params} }}", [x.shape, rois.shape], phase="TEST")
    (y,), saved = layer.forward(np, [x, rois], [])
    (dx, dr), _ = layer.backward(np, saved, [np.ones_like(y) if dy is None else dy], [], [True, False])
    assert dr is None                                           # no gradient to the rois
    return y, dx


def test_roipooling_by_hand_overlapping_bins_share_an_argmax():
    """roi (0,0)-(3,2) on a 4 x 5 map, 2 x 2 bins: roi 4 wide, 3 high; bin rows floor(1.5 i) ..
    ceil(1.5 (i+1)) = [0,2) and [1,3) overlap on row 1, columns [0,2) and [2,4). The maximum 100 at
    (1, 1) wins both left bins, so its gradient is the sum of theirs."""
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    x[0, 0, 1, 1] = 100.0
    dy = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    y, dx = _roi("pooled_h: 2 pooled_w: 2", x, np.array([[0.0, 0, 0, 3, 2]]), dy)
    np.testing.assert_array_equal(y[0, 0], [[100, 8], [100, 13]])
    want = np.zeros((4, 5))
    want[1, 1], want[1, 3], want[2, 3] = 1 + 3, 2, 4
    np.testing.assert_array_equal(dx[0, 0], want)


def test_roipooling_rounds_halves_away_from_zero_like_c():
    """spatial_scale 0.5: x 1 -> 0.5 -> 1 and 5 -> 2.5 -> 3 (C's round; NumPy's would give 0 and 2),
    so the 1 x 1 bin is rows and columns 1..3 and its max is x[3, 3]."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = _roi("pooled_h: 1 pooled_w: 1 spatial_scale: 0.5", x, np.array([[0.0, 1, 1, 5, 5]]))
    assert y.item() == 15.0
    y, _ = _roi("pooled_h: 1 pooled_w: 1 spatial_scale: 0.5", x, np.array([[0.0, 1, 1, 3, 3]]))
    assert y.item() == 10.0                                     # 1.5 -> 2: rows and columns 1..2


def test_roipooling_clipping_and_empty_bins_give_zero():
    """roi (-1,-1)-(1,1) at scale 0.5: -0.5 -> -1, 0.5 -> 1; 3 x 3 bins of one cell each. The first
    bin row and column fall off the map: 0 there (even though every value is negative)."""
    x = -np.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    dy = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    y, dx = _roi("pooled_h: 3 pooled_w: 3 spatial_scale: 0.5", x, np.array([[0.0, -1, -1, 1, 1]]), dy)
    np.testing.assert_array_equal(y[0, 0], [[0, 0, 0], [0, -1, -2], [0, -5, -6]])
    want = np.zeros((4, 4))
    want[:2, :2] = [[5, 6], [8, 9]]
    np.testing.assert_array_equal(dx[0, 0], want)


def test_roipooling_malformed_roi_pools_one_cell_but_gets_no_gradient():
    """x2 < x1 and y2 < y1: Caffe forces the roi to 1 x 1 (every bin is x[y1, x1]), but its backward loops
    visit only cells inside [x1, x2] x [y1, y2], none here: no gradient, as caffe-fast-rcnn."""
    x = np.arange(24.0).reshape(2, 1, 3, 4)
    y, dx = _roi("pooled_h: 2 pooled_w: 2", x, np.array([[1.0, 2, 1, 0, 0]]))
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), x[1, 0, 1, 2]))
    assert not np.any(dx)


def test_roipooling_batch_index_picks_the_image():
    x = np.stack([np.zeros((2, 3, 3)), np.ones((2, 3, 3))]) + np.arange(9.0).reshape(3, 3)
    y, dx = _roi("pooled_h: 1 pooled_w: 1", x, np.array([[1.0, 0, 0, 2, 2], [0.0, 0, 0, 1, 1]]))
    np.testing.assert_array_equal(y[:, :, 0, 0], [[9, 9], [4, 4]])
    assert dx[1, :, 2, 2].tolist() == [1, 1] and dx[0, :, 1, 1].tolist() == [1, 1] and dx.sum() == 4
    with pytest.raises(ValueError):
        _roi("pooled_h: 1 pooled_w: 1", x, np.array([[2.0, 0, 0, 2, 2]]))


def test_roipooling_param_errors():
    ds = _diagnostics("ROIPooling", "roi_pooling_param { pooled_h: 0 pooled_w: 7 }", [(1, 2, 4, 4), (3, 5)])
    assert [d.code for d in ds] == ["E0107"]
    assert [d.code for d in _diagnostics("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }",
                                         [(2, 4), (3, 5)])] == ["E0221"]
    assert [d.code for d in _diagnostics("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }",
                                         [(1, 2, 4, 4), (3, 4)])] == ["E0373"]


def _roi_pool_caffe_loops(x, rois, pooled_h, pooled_w, scale, dy):
    """caffe-fast-rcnn's ROIPoolingLayer::Forward_cpu and Backward_cpu, loop for loop, in float64
    (the backward visits the cells inside the roi and, for each, the bins that may contain it)."""
    n, c, h, w = x.shape

    def cround(v):
        return math.floor(v + 0.5) if v >= 0 else math.ceil(v - 0.5)
    y = np.full((len(rois), c, pooled_h, pooled_w), -float(np.finfo(np.float32).max))
    arg = np.full(y.shape, -1)
    dx = np.zeros_like(x)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        x1, y1, x2, y2 = (cround(v * scale) for v in roi[1:])
        bh, bw = max(y2 - y1 + 1, 1) / pooled_h, max(x2 - x1 + 1, 1) / pooled_w
        for ch, i, j in itertools.product(range(c), range(pooled_h), range(pooled_w)):
            hs, he = min(max(math.floor(i * bh) + y1, 0), h), min(max(math.ceil((i + 1) * bh) + y1, 0), h)
            ws, we = min(max(math.floor(j * bw) + x1, 0), w), min(max(math.ceil((j + 1) * bw) + x1, 0), w)
            if he <= hs or we <= ws:
                y[r, ch, i, j] = 0
            for hh, ww in itertools.product(range(hs, he), range(ws, we)):
                if x[b, ch, hh, ww] > y[r, ch, i, j]:
                    y[r, ch, i, j], arg[r, ch, i, j] = x[b, ch, hh, ww], hh * w + ww
        for ch, hh, ww in itertools.product(range(c), range(max(0, y1), min(h, y2 + 1)), range(max(0, x1), min(w, x2 + 1))):
            p0 = min(max(math.floor((hh - y1) / bh), 0), pooled_h), min(max(math.ceil((hh - y1 + 1) / bh), 0), pooled_h)
            q0 = min(max(math.floor((ww - x1) / bw), 0), pooled_w), min(max(math.ceil((ww - x1 + 1) / bw), 0), pooled_w)
            for i, j in itertools.product(range(*p0), range(*q0)):
                if arg[r, ch, i, j] == hh * w + ww:
                    dx[b, ch, hh, ww] += dy[r, ch, i, j]
    return y, dx


ROI_CASES = [c for c in CASES if c.type == "ROIPooling"]


@pytest.mark.parametrize("case", ROI_CASES, ids=ids(ROI_CASES))
def test_roipooling_matches_caffe_loops(case: Case):
    layer, rng, (x, rois), _ = setup_case(case)
    rois = np.concatenate([rois, [[0, 5, 4, 1, 6], [0, 2, 9, 3, 1], [0, 40, 40, 60, 70]]])   # malformed, off the map
    p = layer.p
    dy = rng.standard_normal((len(rois), x.shape[1], p.pooled_h, p.pooled_w))
    want_y, want_dx = _roi_pool_caffe_loops(x, rois, p.pooled_h, p.pooled_w, p.spatial_scale, dy)
    y, dx = _roi(f"pooled_h: {p.pooled_h} pooled_w: {p.pooled_w} spatial_scale: {p.spatial_scale}", x, rois, dy)
    assert_close(y, want_y, 0, "top")
    assert_close(dx, want_dx, 1e-12, "dx")


def test_roipooling_runs_in_a_net_and_trains():
    """ROIPooling was checked only (E0610 when run); it now lowers with runnable=True and its input
    gradient flows through a net."""
    text = ('name: "t"\nlayer { name: "in" type: "Input" top: "x" top: "rois" top: "t" input_param { '
            'shape { dim: 1 dim: 2 dim: 6 dim: 6 } shape { dim: 3 dim: 5 } shape { dim: 3 dim: 2 } } }\n'
            'layer { name: "c" type: "Convolution" bottom: "x" top: "f" convolution_param { num_output: 2 kernel_size: 3 '
            'pad: 1 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "p" type: "ROIPooling" bottom: "f" bottom: "rois" top: "pool" '
            'roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 } }\n'
            + _ip("fc", "pool", "y", 2) +
            'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l" }\n')
    ch = check_mod.check(syntax.parse(text, "t.net"), phase="TRAIN")
    net = Net(plan_mod.lower(ch, runnable=True), np, dtype=F64)
    rng = np.random.default_rng(4)
    feed = dict(x=rng.standard_normal((1, 2, 6, 6)), rois=np.array([[0, 0, 0, 11, 11], [0, 2, 4, 7, 9], [0, 6, 0, 9, 3.0]]),
                t=rng.standard_normal((3, 2)))
    assert net_grads_match_numeric(net, feed) == 4


def test_infogain_loss_matches_torch_soft_target_cross_entropy():
    """torch's cross_entropy with probability targets H[label] is -sum_l H[y, l] log_softmax_l; Caffe
    divides the sum by the normaliser (VALID: the non-ignored count)."""
    torch = _torch()
    rng = np.random.default_rng(5)
    x, lab, H = rng.standard_normal((6, 4)), np.array([0.0, 3, -1, 2, 1, -1]), rng.uniform(0, 2, (4, 4))
    loss, (dx, _, _) = _run("InfogainLoss", "loss_param { ignore_label: -1 }", [x, lab, H])
    keep = lab >= 0
    xt = torch.tensor(x, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(xt[keep], torch.tensor(H[lab[keep].astype(int)]), reduction="sum") / keep.sum()
    lt.backward()
    assert_close(loss, lt.item(), 1e-12, "loss")
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")


def test_hinge_loss_matches_torch():
    """Caffe's L1 hinge is torch's hinge_embedding_loss (target -1, margin 1) of -t x, summed over
    classes, / N (torch's multi_margin_loss is a different, pairwise loss); L2 squares the terms."""
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(6)
    x, lab = rng.standard_normal((5, 4)), rng.integers(0, 4, 5).astype(F64)
    t = torch.tensor(np.where(np.arange(4)[None] == lab[:, None], -1.0, 1.0))
    for norm in ("L1", "L2"):
        loss, (dx, _) = _run("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", [x, lab], dtop=0.7)
        xt = torch.tensor(x, requires_grad=True)
        if norm == "L1":
            lt = F.hinge_embedding_loss(-t * xt, -torch.ones_like(t), margin=1.0, reduction="sum") / 5
        else:
            lt = (F.relu(1 + t * xt) ** 2).sum() / 5
        (lt * 0.7).backward()
        assert_close(loss, lt.item(), 1e-12, norm)
        assert_close(dx, xt.grad.numpy(), 1e-12, f"{norm} dx")


def test_multinomial_logistic_loss_matches_torch_nll():
    torch = _torch()
    rng = np.random.default_rng(7)
    p = rng.uniform(0.01, 1, (6, 5))
    p /= p.sum(axis=1, keepdims=True)
    lab = rng.integers(0, 5, 6)
    loss, (dp, _) = _run("MultinomialLogisticLoss", "", [p, lab.astype(F64)])
    pt = torch.tensor(p, requires_grad=True)
    lt = torch.nn.functional.nll_loss(torch.log(pt.clamp_min(KLOG)), torch.tensor(lab))
    lt.backward()
    assert_close(loss, lt.item(), 1e-12, "loss")
    assert_close(dp, pt.grad.numpy(), 1e-12, "dp")


# =============================================================================================
# ---- fork layers (layers/forks.py): each fork's blob layout and formula by hand, Caffe's loops,
# PyTorch oracles, and the real nets that use them

def _real_dir():
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "shared" / "reference" / "real"


def _bn(params, bottoms, phase="TRAIN", tops=1):
    return build_layer("BN", params, bottoms, tops, phase)


def test_bn_blob_layouts_and_fillers_follow_each_fork():
    seg = _bn('bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 1 } '
              'shift_filler { type: "constant" value: 0.001 } }', ((1, 4, 2, 2),), "TEST")
    assert seg.segnet and seg.param_shapes == [(1, 4, 1, 1)] * 2 and not seg.frozen_params
    assert [f.value for f in seg.fillers()] == [1.0, 0.001]
    psp = _bn('bn_param { slope_filler { type: "constant" value: 1 } frozen: true momentum: 0.95 }', ((1, 4, 2, 2),), "TEST")
    assert not psp.segnet and psp.param_shapes == [(1, 4, 1, 1)] * 4 and psp.frozen_params
    f = psp.fillers()
    assert f[0].value == 1.0 and f[2] is None and f[3].type == "constant" and f[3].value == 1.0   # frozen: var starts at 1
    assert _bn("", ((1, 4),)).fillers()[3] is None
    assert not _bn("", ((1, 4, 2, 2),)).frozen_params


def test_bn_segnet_inference_is_scale_times_x_plus_shift():
    layer = _bn("bn_param { bn_mode: INFERENCE }", ((2, 3, 2, 2),), "TEST")
    rng = np.random.default_rng(0)
    x, s, b = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((1, 3, 1, 1)), rng.standard_normal((1, 3, 1, 1))
    (y,), saved = layer.forward(np, [x], [s, b])
    assert_close(y, s * x + b, 1e-15)
    dy = rng.standard_normal(y.shape)
    (dx,), (ds, db) = layer.backward(np, saved, [dy], [s, b], [True])
    assert_close(dx, s * dy, 1e-15)
    assert_close(ds, (x * dy).sum(axis=(0, 2, 3), keepdims=True), 1e-14)
    assert_close(db, dy.sum(axis=(0, 2, 3), keepdims=True), 1e-14)


def test_bn_segnet_learn_uses_batch_statistics_with_eps_1e_9_in_every_phase():
    rng = np.random.default_rng(1)
    x, s, b = rng.standard_normal((3, 2, 2, 3)), rng.standard_normal((1, 2, 1, 1)), rng.standard_normal((1, 2, 1, 1))
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = (x ** 2).mean(axis=(0, 2, 3), keepdims=True) - mean ** 2       # SegNet's E(x^2) - E(x)^2
    want = s * (x - mean) / np.sqrt(var + 1e-9) + b
    for phase in ("TRAIN", "TEST"):
        layer = _bn("bn_param { bn_mode: LEARN }", ((3, 2, 2, 3),), phase, tops=3)
        (y, m, v), _ = layer.forward(np, [x], [s, b])
        assert_close(y, want, 1e-12)
        assert_close(m, mean, 1e-14)
        assert_close(v, var, 1e-13)


def test_bn_pspnet_moving_averages_test_formula_and_frozen_backward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 2, 3))
    s, b = rng.standard_normal((1, 2, 1, 1)), rng.standard_normal((1, 2, 1, 1))
    mean0, var0 = rng.standard_normal((1, 2, 1, 1)), rng.uniform(0.5, 2, (1, 2, 1, 1))
    # TRAIN: batch statistics (biased variance); the blobs become m * old + (1 - m) * batch
    layer = _bn("bn_param { momentum: 0.95 eps: 1e-5 }", ((3, 2, 2, 3),))
    params = [s, b, mean0.copy(), var0.copy()]
    (y,), _ = layer.forward(np, [x], params)
    bm, bv = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    assert_close(y, s * (x - bm) / np.sqrt(bv + 1e-5) + b, 1e-12)
    assert_close(params[2], 0.95 * mean0 + 0.05 * bm, 1e-14)
    assert_close(params[3], 0.95 * var0 + 0.05 * bv, 1e-14)
    # TEST, and frozen in any phase: the moving statistics, blobs untouched
    want = s * (x - mean0) / np.sqrt(var0 + 1e-5) + b
    for text, phase in (("", "TEST"), ("bn_param { frozen: true }", "TRAIN")):
        layer = _bn(text, ((3, 2, 2, 3),), phase)
        params = [s, b, mean0.copy(), var0.copy()]
        (y,), saved = layer.forward(np, [x], params)
        assert_close(y, want, 1e-12)
        assert np.array_equal(params[2], mean0) and np.array_equal(params[3], var0)
    dy = rng.standard_normal(x.shape)
    (dx,), dparams = layer.backward(np, saved, [dy], params, [True])
    assert_close(dx, dy * s / np.sqrt(var0 + 1e-5), 1e-12)               # Caffe's frozen backward
    assert dparams == []


def test_bn_errors():
    with pytest.raises(Exception, match="only SegNet's `bn_mode: LEARN`"):
        _bn("bn_param { bn_mode: INFERENCE }", ((1, 2, 2, 2),), "TEST", tops=2)
    with pytest.raises(Exception, match="momentum must lie"):
        _bn("bn_param { momentum: 1.5 }", ((1, 2, 2, 2),), "TEST")


def test_upsample_by_hand_and_gathering_backward():
    layer = build_layer("Upsample", "upsample_param { scale: 2 }", ((1, 1, 1, 2), (1, 1, 1, 2)), 1, "TEST")
    x, mask = np.array([[[[5.0, 7.0]]]]), np.array([[[[4.0, 3.0]]]])     # 2 x 4 output: (1, 0) and (0, 3)
    (y,), saved = layer.forward(np, [x, mask], [])
    assert_close(y, [[[[0, 0, 0, 7], [5, 0, 0, 0]]]], 0)
    dy = np.arange(8.0).reshape(1, 1, 2, 4)
    (dx, dmask), _ = layer.backward(np, saved, [dy], [], [True, False])
    assert_close(dx, [[[[4.0, 3.0]]]], 0) and dmask is None


@pytest.mark.parametrize("shape, params", [((1, 2, 6, 8), "scale: 2"), ((2, 3, 7, 5), "upsample_h: 7 upsample_w: 5"),
                                           ((1, 2, 5, 8), "scale: 2 pad_out_h: true")])
def test_upsample_after_max_pooling_matches_torch_max_unpool2d(shape, params):
    torch = pytest.importorskip("torch")
    n, c, h, w = shape
    text = (f'name: "u" force_backward: true layer {{ name: "in" type: "Input" top: "x" input_param {{ {_dims(shape)} }} }}\n'
            'layer { name: "pool" type: "Pooling" bottom: "x" top: "p" top: "mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            f'layer {{ name: "up" type: "Upsample" bottom: "p" bottom: "mask" top: "u" upsample_param {{ {params} }} }}\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "u" bottom: "x" top: "l" }')
    net = make_net(text)
    x = np.random.default_rng(3).permutation(np.prod(shape)).reshape(shape) / 10.0
    net.forward(x=x)
    xt = torch.tensor(x, requires_grad=True)
    pooled, idx = torch.nn.functional.max_pool2d(xt, 2, 2, ceil_mode=True, return_indices=True)
    pooled.retain_grad()
    u = torch.nn.functional.max_unpool2d(pooled, idx, 2, 2, output_size=(h, w))
    assert_close(net.values["u"], u.detach().numpy(), 1e-15)
    assert_close(net.values["mask"], idx.numpy().astype(F64), 0)          # Caffe's mask = PyTorch's indices
    net.backward()
    ((u - xt) ** 2).sum().div(2 * n).backward()
    assert_close(net.grads["p"], pooled.grad.numpy(), 1e-12)


def test_upsample_errors():
    with pytest.raises(Exception, match="mask 1x2x3x3 differs"):
        build_layer("Upsample", "", ((1, 2, 2, 2), (1, 2, 3, 3)), 1, "TEST")
    with pytest.raises(Exception, match="upsample_w` is missing"):
        build_layer("Upsample", "upsample_param { upsample_h: 4 }", ((1, 2, 2, 2), (1, 2, 2, 2)), 1, "TEST")
    with pytest.raises(Exception, match="needs scale 2"):
        build_layer("Upsample", "upsample_param { scale: 3 pad_out_w: true }", ((1, 2, 2, 2), (1, 2, 2, 2)), 1, "TEST")


@pytest.mark.parametrize("params, x, out", [
    ("zoom_factor: 8", (1, 1, 60, 60), (473, 473)), ("zoom_factor: 3", (1, 1, 3, 4), (7, 10)),
    ("shrink_factor: 2", (1, 1, 7, 6), (4, 3)), ("shrink_factor: 4 zoom_factor: 2", (1, 1, 9, 10), (5, 5)),
    ("height: 60 width: 61", (1, 1, 6, 6), (60, 61)), ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (1, 1, 8, 9), (9, 11))])
def test_interp_output_size_follows_the_fork(params, x, out):
    assert build_layer("Interp", f"interp_param {{ {params} }}", (x,), 1, "TEST").top_shapes[0][2:] == out


def test_interp_uses_the_forks_float32_source_rows():
    """caffe_cpu_interp2 computes the source row in float32: 0.1f * 3 is not 0.3."""
    a = layer_types()["Interp"].weights(31, 11)              # ratio (31 - 1) / (11 - 1) = 3 exactly
    assert_close(a, np.eye(31)[::3][:11], 0)
    a = layer_types()["Interp"].weights(4, 31)               # ratio 0.1f
    r = np.float32(np.float32(3) / np.float32(30)) * np.arange(31, dtype=np.float32)
    lo = r.astype(int)
    for i in range(31):
        want = np.zeros(4)
        want[lo[i]] += 1 - float(r[i] - np.float32(lo[i]))
        want[min(lo[i] + 1, 3)] += float(r[i] - np.float32(lo[i]))
        assert_close(a[i], want, 0, f"row {i}")


@pytest.mark.parametrize("x, size", [((2, 3, 5, 7), (9, 13)), ((1, 2, 60, 60), (473, 473)), ((1, 2, 8, 9), (3, 4)),
                                     ((1, 1, 1, 4), (5, 4)), ((1, 2, 6, 6), (6, 6))])
def test_interp_matches_torch_bilinear_align_corners(x, size):
    torch = pytest.importorskip("torch")
    layer = build_layer("Interp", f"interp_param {{ height: {size[0]} width: {size[1]} }}", (x,), 1, "TEST")
    rng = np.random.default_rng(4)
    xv = rng.standard_normal(x)
    (y,), saved = layer.forward(np, [xv], [])
    xt = torch.tensor(xv, requires_grad=True)
    yt = torch.nn.functional.interpolate(xt, size=size, mode="bilinear", align_corners=True)
    assert_close(y, yt.detach().numpy(), 1e-6)                 # the fork's float32 source rows: within 1e-6
    dy = rng.standard_normal(y.shape)
    (dx,), _ = layer.backward(np, saved, [dy], [], [True])
    yt.backward(torch.tensor(dy))
    assert_close(dx, xt.grad.numpy(), 1e-5)


def test_interp_crop_reads_the_inner_window_and_errors():
    rng = np.random.default_rng(5)
    xv = rng.standard_normal((1, 2, 6, 7))
    crop = build_layer("Interp", "interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -2 }", ((1, 2, 6, 7),), 1, "TEST")
    plain = build_layer("Interp", "interp_param { zoom_factor: 2 }", ((1, 2, 3, 4),), 1, "TEST")
    assert_close(crop.forward(np, [xv], [])[0][0], plain.forward(np, [xv[:, :, 1:4, 1:5]], [])[0][0], 0)
    with pytest.raises(Exception, match="give the output size one way"):
        build_layer("Interp", "", ((1, 2, 3, 4),), 1, "TEST")
    with pytest.raises(Exception, match="must be <= 0"):
        build_layer("Interp", "interp_param { zoom_factor: 2 pad_beg: 1 }", ((1, 2, 3, 4),), 1, "TEST")
    with pytest.raises(Exception, match="not supported"):
        build_layer("Interp", 'interp_param { zoom_factor: 2 interp_type: "nearest_neighbor" }', ((1, 2, 3, 4),), 1, "TEST")


@pytest.mark.parametrize("type_", ["ConvolutionDepthwise", "DepthwiseConvolution"])
def test_depthwise_is_a_convolution_grouped_by_the_input_depth(type_):
    torch = pytest.importorskip("torch")
    p = "num_output: 8 kernel_size: 3 stride: 2 pad: 1"
    dw = build_layer(type_, f"convolution_param {{ {p} }}", ((2, 4, 7, 6),), 1, "TEST")
    conv = build_layer("Convolution", f"convolution_param {{ {p} group: 4 }}", ((2, 4, 7, 6),), 1, "TEST")
    assert dw.param_shapes == conv.param_shapes == [(8, 1, 3, 3), (8,)] and dw.top_shapes == conv.top_shapes
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((8, 1, 3, 3)), rng.standard_normal(8)
    (y,), _ = dw.forward(np, [x], [w, b])
    assert_close(y, conv.forward(np, [x], [w, b])[0][0], 1e-14)
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), 2, 1, groups=4)
    assert_close(y, want.numpy(), 1e-12)
    with pytest.raises(Exception, match="not a multiple of the input depth"):
        build_layer(type_, "convolution_param { num_output: 6 kernel_size: 3 }", ((1, 4, 5, 5),), 1, "TEST")


def test_shuffle_channel_by_hand_and_against_torch():
    layer = build_layer("ShuffleChannel", "shuffle_channel_param { group: 3 }", ((1, 6, 1, 1),), 1, "TEST")
    x = np.arange(6.0).reshape(1, 6, 1, 1)
    (y,), saved = layer.forward(np, [x], [])
    assert y.ravel().tolist() == [0, 2, 4, 1, 3, 5]               # out[j * g + i] = in[i * C/g + j]
    (dx,), _ = layer.backward(np, saved, [y], [], [True])
    assert_close(dx, x, 0)                                           # backward is the inverse shuffle
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(7).standard_normal((2, 12, 3, 2))
    layer = build_layer("ShuffleChannel", "shuffle_channel_param { group: 4 }", ((2, 12, 3, 2),), 1, "TEST")
    assert_close(layer.forward(np, [x], [])[0][0], torch.nn.functional.channel_shuffle(torch.tensor(x), 4).numpy(), 0)
    with pytest.raises(Exception, match="not divisible by group 4"):
        build_layer("ShuffleChannel", "shuffle_channel_param { group: 4 }", ((1, 6, 2, 2),), 1, "TEST")


def test_axpy_by_hand():
    layer = build_layer("Axpy", "", ((2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 2, 2)), 1, "TEST")
    rng = np.random.default_rng(8)
    a, x, y = rng.standard_normal((2, 3, 1, 1)), rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((2, 3, 2, 2))
    (t,), saved = layer.forward(np, [a, x, y], [])
    assert_close(t, a * x + y, 1e-15)
    dt = rng.standard_normal(t.shape)
    (da, dx, dy), _ = layer.backward(np, saved, [dt], [], [True, True, True])
    assert_close(da, (x * dt).sum(axis=(2, 3), keepdims=True), 1e-14)
    assert_close(dx, a * dt, 1e-15) and assert_close(dy, dt, 0)
    with pytest.raises(Exception, match="is not N x C x 1 x 1"):
        build_layer("Axpy", "", ((2, 3, 2, 1), (2, 3, 2, 2), (2, 3, 2, 2)), 1, "TEST")


def psroi_ref(x, rois, scale, d, g):
    """caffe-rfcn's PSROIPoolingForward / Backward loops (float64)."""
    n, c, h, w = x.shape
    y, route = np.zeros((len(rois), d, g, g)), []
    for r, roi in enumerate(rois):
        b = int(roi[0])
        c_round = [math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1) for v in roi[1:]]
        sw, sh = c_round[0] * scale, c_round[1] * scale
        ew, eh = (c_round[2] + 1) * scale, (c_round[3] + 1) * scale
        rw, rh = max(ew - sw, 0.1), max(eh - sh, 0.1)
        bh, bw = rh / g, rw / g
        for ct, ph, pw in itertools.product(range(d), range(g), range(g)):
            hs = min(max(math.floor(ph * bh + sh), 0), h)
            ws = min(max(math.floor(pw * bw + sw), 0), w)
            he = min(max(math.ceil((ph + 1) * bh + sh), 0), h)
            we = min(max(math.ceil((pw + 1) * bw + sw), 0), w)
            ch = (ct * g + ph) * g + pw
            if he <= hs or we <= ws:
                continue
            area = (he - hs) * (we - ws)
            y[r, ct, ph, pw] = x[b, ch, hs:he, ws:we].sum() / area
            route.append((r, ct, ph, pw, b, ch, hs, he, ws, we, area))
    return y, route


@pytest.mark.parametrize("scale, d, g, shape", [(0.5, 2, 2, (2, 8, 6, 7)), (1.0, 3, 3, (1, 27, 5, 6)), (0.0625, 2, 3, (1, 18, 4, 5))])
def test_psroi_pooling_matches_rfcn_loops(scale, d, g, shape):
    rng = np.random.default_rng(9)
    rois = np.array([[0, 0, 0, 15, 11], [shape[0] - 1, 3.4, 2.5, 9.6, 7.5], [0, -5, -5, 2, 1], [0, 4, 4, 4, 4],
                     [shape[0] - 1, 9, 3, 2, 1], [0, 0, 0, 200, 200]], float)
    layer = build_layer("PSROIPooling", f"psroi_pooling_param {{ spatial_scale: {scale} output_dim: {d} group_size: {g} }}",
                        (shape, rois.shape), 1, "TEST")
    x = rng.standard_normal(shape)
    (y,), saved = layer.forward(np, [x, rois], [])
    want, route = psroi_ref(x, rois, scale, d, g)
    assert_close(y, want, 1e-13)
    dy = rng.standard_normal(y.shape)
    (dx, drois), _ = layer.backward(np, saved, [dy], [], [True, False])
    dref = np.zeros(shape)
    for r, ct, ph, pw, b, ch, hs, he, ws, we, area in route:
        dref[b, ch, hs:he, ws:we] += dy[r, ct, ph, pw] / area
    assert_close(dx, dref, 1e-13)
    assert drois is None


def test_psroi_pooling_errors():
    with pytest.raises(Exception, match="input depth 10 is not output_dim 2 x group_size"):
        build_layer("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 }",
                    ((1, 10, 4, 4), (3, 5)), 1, "TEST")
    with pytest.raises(Exception, match="missing required field `group_size`"):
        build_layer("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 }", ((1, 8, 4, 4), (3, 5)), 1, "TEST")


@pytest.mark.parametrize("mode, rnd, out", [("ceil_mode: false", "", 2), ("ceil_mode: true", "", 3),
                                            ("ceil_mode: true", "round_mode: FLOOR", 3), ("ceil_mode: false", "round_mode: CEIL", 2),
                                            ("", "round_mode: FLOOR", 2), ("", "", 3)])
def test_pooling_ceil_mode_is_round_mode(mode, rnd, out):
    layer = build_layer("Pooling", f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {mode} {rnd} }}", ((1, 1, 6, 6),),
                        1, "TEST")
    assert layer.top_shapes[0] == (1, 1, out, out)
    (y,), _ = layer.forward(np, [np.arange(36.0).reshape(1, 1, 6, 6)], [])
    assert y.shape == (1, 1, out, out)


@pytest.mark.parametrize("interp", ["zoom_factor: 3", "height: 20 width: 5"])
def test_interp_and_shuffle_channel_match_opencv(interp, tmp_path):
    """OpenCV 4's Caffe importer implements Interp (zoom_factor or height/width; its shrink_factor
    and pad_beg/pad_end differ from the fork, so those are checked against the fork's source above)."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no Caffe importer")
    text = ('name: "t" input: "data" input_shape { dim: 1 dim: 6 dim: 7 dim: 9 }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 1 } }\n'
            f'layer {{ name: "interp" type: "Interp" bottom: "conv" top: "interp" interp_param {{ {interp} }} }}\n'
            'layer { name: "shuf" type: "ShuffleChannel" bottom: "interp" top: "shuf" shuffle_channel_param { group: 3 } }\n')
    (tmp_path / "n.prototxt").write_text(text)
    net = Net(plan_mod.lower(check_mod.check(syntax.parse(text, "n"), phase="TEST"), runnable=True), np, dtype=np.float32)
    rng = np.random.default_rng(11)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.normal(0, 0.5, b.data.shape)
    x = rng.uniform(-1, 1, (1, 6, 7, 9)).astype(np.float32)
    net.forward(data=x)
    net.save(str(tmp_path / "w.caffemodel"))
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "n.prototxt"), str(tmp_path / "w.caffemodel"))
    cv.setInput(x, "data")
    for name, got in zip(["interp", "shuf"], cv.forward(["interp", "shuf"])):
        assert_close(got.reshape(net.values[name].shape), net.values[name], 1e-5, name)


def _fork_weights(net, rng):
    for s in net.plan.steps:
        for i, p in enumerate(net.params.get(s.node.name, [])):
            shape, t = p.data.shape, s.layer.type
            if t == "BN":
                a = [rng.normal(1, 0.1, shape), rng.normal(0, 0.1, shape), rng.normal(0, 0.1, shape),
                     rng.uniform(0.5, 1.5, shape)][i]
            elif t == "BatchNorm":
                a = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape), np.ones(shape)][i]
            elif t == "Scale":
                a = rng.normal(1.0 if i == 0 else 0.0, 0.1, shape)
            elif len(shape) > 1:
                a = rng.normal(0, np.sqrt(2.0 / max(int(np.prod(shape[1:])), 1)), shape)
            else:
                a = rng.normal(0, 0.1, shape)
            p.data[...] = a


SEGNET_INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 360 dim: 480 } } }\n'
REAL_FORK_NETS = [   # (file, (a substitution of its data layer, if any), input, output)
    ("alexgkendall+SegNet-Tutorial__Models_segnet_inference.prototxt",
     (r'layer \{\s*name: "data"\s*type: "DenseImageData".*?\n\}\n', SEGNET_INPUT), (1, 3, 360, 480), "prob"),
    ("hszhao+PSPNet__evaluation_prototxt_pspnet50_ADE20K_473.prototxt", None, (1, 3, 473, 473), "conv6_interp"),
    ("farmingyard+ShuffleNet__shufflenet_1x_g3_deploy.prototxt", None, (1, 3, 224, 224), "fc1000"),
    ("shicai+DenseNet-Caffe__DenseNet_201.prototxt", None, (1, 3, 224, 224), "fc6"),
]


@pytest.mark.skipif(not _real_dir().is_dir(), reason="shared/reference is not available")
@pytest.mark.parametrize("name, sub, shape, out", REAL_FORK_NETS, ids=[n[0].split("+")[0] for n in REAL_FORK_NETS])
def test_real_fork_nets_check_clean_and_run(name, sub, shape, out):
    """SegNet (BN, Upsample, DenseImageData), PSPNet (BN, Interp), ShuffleNet (ConvolutionDepthwise,
    ShuffleChannel) and DenseNet (ceil_mode) check with no error and run forward in float32."""
    import re
    text = (_real_dir() / name).read_text()
    check_mod.check(syntax.parse(text, name), phase="TEST", hints={"data": shape} if sub else None)   # raises on errors
    if sub:
        text = re.sub(sub[0], sub[1], text, count=1, flags=re.S)
    plan = plan_mod.lower(check_mod.check(syntax.parse(text, name), phase="TEST"), runnable=True)
    net = Net(plan, np, dtype=np.float32, seed=0)
    rng = np.random.default_rng(10)
    _fork_weights(net, rng)
    y = net.forward(data=rng.uniform(-1, 1, shape).astype(np.float32))[out]
    assert np.all(np.isfinite(y)) and np.abs(y).max() > 0


# =============================================================================================
# ---- SSD layers (layers/ssd.py): the fork's priors, decoding, NMS and output rows by hand

def test_normalize_values_by_hand():
    x = np.array([3.0, 0.0, 4.0, 1.0]).reshape(1, 2, 1, 2)      # channel 0: 3, 0; channel 1: 4, 1
    _, (y,), _ = run("Normalize", "norm_param { across_spatial: false channel_shared: false }", x,
                     layer_params=(np.array([2.0, 3.0]),))
    assert_close(y, np.array([2 * 3 / 5, 0.0, 3 * 4 / 5, 3 * 1 / 1]).reshape(x.shape), 1e-9)
    _, (y,), _ = run("Normalize", "", x, layer_params=(np.array(0.5),))       # across_spatial, one shared scale
    assert_close(y, 0.5 * x / math.sqrt(26 + 1e-10), 1e-15)
    layer = build_layer("Normalize", "norm_param { channel_shared: false }", [(1, 2, 1, 2)])
    assert layer.param_shapes == [(2,)] and build_layer("Normalize", "", [(1, 2, 1, 2)]).param_shapes == [()]
    assert layer.fillers()[0].type == "constant" and layer.fillers()[0].value == 1.0
    filled = build_layer("Normalize", 'norm_param { scale_filler { type: "constant" value: 20 } }', [(1, 2, 1, 2)])
    assert filled.fillers()[0].value == 20.0


def test_normalize_shared_scale_backward_is_the_forks_formula():
    """With one scale the fork's backward, s (dy - x (x . dy) / |x|^2) / |x| per image, is the
    derivative; the scale's gradient sum(y dy) / s = sum(x dy) / |x|."""
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((2, 3, 2, 2))
    layer, _, saved = run("Normalize", "", x, layer_params=(np.array(1.7),))
    (dx,), (ds,) = layer.backward(np, saved, [dy], [np.array(1.7)], [True])
    for n in range(2):
        norm = math.sqrt(float((x[n] ** 2).sum()) + 1e-10)
        assert_close(dx[n], 1.7 * (dy[n] - x[n] * float((x[n] * dy[n]).sum()) / norm ** 2) / norm, 1e-12)
    assert_close(ds, sum(float((x[n] * dy[n]).sum()) / math.sqrt(float((x[n] ** 2).sum()) + 1e-10) for n in range(2)))


def _prior_rows(cells, sizes, img_w, img_h):
    """Expected PriorBox boxes: for each (cx, cy) cell, each (w, h), [cx -/+ w/2, cy -/+ h/2] / image."""
    return np.array([[(cx - w / 2) / img_w, (cy - h / 2) / img_h, (cx + w / 2) / img_w, (cy + h / 2) / img_h]
                     for cx, cy in cells for w, h in sizes])


def test_priorbox_2x2_map_by_hand():
    """min 2, max 8, ratio 2 (flipped to 0.5) on a 2 x 2 map of an 8 x 8 image: step 4, centres 2 and 6;
    per cell the min square, the sqrt(2 * 8) = 4 square, then 2 sqrt2 x sqrt2 and sqrt2 x 2 sqrt2 (min_size
    times sqrt(ar), not the max square's side), cells row-major."""
    _, (top,), _ = run("PriorBox", "prior_box_param { min_size: 2 max_size: 8 aspect_ratio: 2 variance: 0.1 variance: 0.1 "
                       "variance: 0.2 variance: 0.2 }", np.zeros((1, 5, 2, 2)), np.zeros((1, 3, 8, 8)))
    r2 = math.sqrt(2.0)
    want = _prior_rows([(2, 2), (6, 2), (2, 6), (6, 6)], [(2, 2), (4, 4), (2 * r2, 2 / r2), (2 / r2, 2 * r2)], 8, 8)
    assert top.shape == (1, 2, 4 * 4 * 4)
    assert_close(top[0, 0].reshape(-1, 4), want, 1e-7)          # float centres and sizes: float32 rounding
    np.testing.assert_array_equal(top[0, 1].reshape(-1, 4), np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), (16, 1)))
    assert top[0, 0, 0] == 0.125 and top[0, 0, 4] == 0.0 and top[0, 0, 6] == 0.5    # exact where the arithmetic is


def test_priorbox_ratios_flip_clip_steps_and_int_sizes():
    """A ratio repeated (0.5 is 2's flip) is dropped; flip: false keeps 3 only; min_size 2.7 is used as 2
    (the fork's `int min_size_`); img_h/img_w and step_h/step_w replace the image bottom and the step;
    clip clamps to [0, 1]; one variance fills all four."""
    layer, (top,), _ = run("PriorBox", "prior_box_param { min_size: 2.7 aspect_ratio: 2 aspect_ratio: 0.5 "
                           "aspect_ratio: 3 flip: true clip: true img_h: 10 img_w: 20 step_h: 5 step_w: 4 offset: 0 }",
                           np.zeros((1, 1, 1, 2)), np.zeros((1, 3, 99, 99)))
    assert [float(a) for a in layer.aspect_ratios()] == pytest.approx([1, 2, 0.5, 3, 1 / 3])
    assert layer.num_priors() == 5 and top.shape == (1, 2, 1 * 2 * 5 * 4)
    sizes = [(2, 2)] + [(2 * math.sqrt(a), 2 / math.sqrt(a)) for a in (2, 0.5, 3, 1 / 3)]
    want = np.clip(_prior_rows([(0, 0), (4, 0)], sizes, 20, 10), 0, 1)
    assert_close(top[0, 0].reshape(-1, 4), want, 1e-7)
    assert top[0, 0].min() == 0.0 and np.all(top[0, 1] == np.float32(0.1))
    layer = build_layer("PriorBox", "prior_box_param { min_size: 4 aspect_ratio: 3 flip: false }", [(1, 1, 3, 3), (1, 3, 9, 9)])
    assert layer.num_priors() == 2 and layer.top_shapes == [(1, 2, 3 * 3 * 2 * 4)]


@pytest.mark.parametrize("params, code", [
    ("", "E0106"), ("min_size: 4 max_size: 4", "E0107"), ("min_size: 4 min_size: 8 max_size: 9", "E0107"),
    ("min_size: 4 variance: 0.1 variance: 0.2", "E0107"), ("min_size: 4 img_size: 8 img_h: 8 img_w: 8", "E0107"),
    ("min_size: 4 step_h: 8", "E0107")])
def test_priorbox_rejects_the_params_the_fork_checks(params, code):
    from netdsl.errors import NetdslError
    with pytest.raises(NetdslError) as e:
        build_layer("PriorBox", f"prior_box_param {{ {params} }}", [(1, 1, 2, 2), (1, 3, 8, 8)])
    assert code in [d.code for d in e.value.diagnostics]


def test_detection_output_decodes_like_the_fork():
    from netdsl.layers.ssd import decode_boxes
    prior, var = np.array([[0.2, 0.2, 0.6, 0.6]]), np.array([[0.1, 0.1, 0.2, 0.2]])
    loc = np.array([[1.0, -1.0, 0.0, 5 * math.log(0.5)]])
    box, size = decode_boxes(prior, var, loc, "CENTER_SIZE", False)   # centre 0.44, 0.36; size 0.4 x 0.2
    assert box.dtype == np.float32 and size.dtype == np.float32
    assert_close(box, [[0.24, 0.26, 0.64, 0.46]], 1e-6)
    assert_close(size, [0.08], 1e-6)
    box, _ = decode_boxes(prior, var, np.array([[0.1, -0.1, 0.0, math.log(0.5)]]), "CENTER_SIZE", True)
    assert_close(box, [[0.24, 0.26, 0.64, 0.46]], 1e-6)
    box, _ = decode_boxes(prior, var, np.array([[1.0, 2.0, 3.0, 4.0]]), "CORNER", False)
    assert_close(box, [[0.3, 0.4, 1.2, 1.4]], 1e-6)
    box, _ = decode_boxes(prior, var, np.array([[1.0, 2.0, 3.0, 4.0]]), "CORNER_SIZE", False)
    assert_close(box, [[0.2 + 0.04, 0.2 + 0.08, 0.6 + 0.24, 0.6 + 0.32]], 1e-6)
    box, size = decode_boxes(prior, var, np.array([[0.0, 0.0, -5.0, 0.0]]), "CORNER", False)    # xmax < xmin
    assert size[0] == 0.0


# four priors: 1 overlaps 0 (IoU 0.905), 3 overlaps 0 (1/3) and 1 (0.311), 2 overlaps none
SSD_PRIORS = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9], [0.1, 0.3, 0.5, 0.7]])
SSD_CONF = np.array([[0.1, 0.7, 0.2], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])   # background, 1, 2


def _detect(params, n=1, conf=SSD_CONF):
    priors = np.stack([SSD_PRIORS.reshape(-1), np.full(16, 0.1)])[None]
    loc, scores = np.zeros((n, 16)), np.tile(conf.reshape(1, -1), (n, 1))
    _, (top,), _ = run("DetectionOutput", f"detection_output_param {{ num_classes: 3 code_type: CORNER {params} }}",
                       loc, scores, priors, phase="TEST")
    return top


def _row(i, label, prior, score):
    return [i, label, np.float32(score)] + [np.float32(v) for v in SSD_PRIORS[prior]]


def test_detection_output_nms_per_class_by_hand():
    """Class 1 by score: 1 (.8) kept, 0 (.7) suppressed by 1 (IoU .905 > .45), 3 (.6; .311 to 1) and 2 (.3)
    kept. Class 2: priors 0, 2 and 3 tie at .2 above the threshold .15 (1 is below): the stable sort keeps
    prior order, and none overlaps another by more than 1/3. Rows by label, each in NMS order."""
    top = _detect("confidence_threshold: 0.15 nms_param { nms_threshold: 0.45 }")
    want = [_row(0, 1, 1, 0.8), _row(0, 1, 3, 0.6), _row(0, 1, 2, 0.3),
            _row(0, 2, 0, 0.2), _row(0, 2, 2, 0.2), _row(0, 2, 3, 0.2)]
    assert top.shape == (1, 1, 6, 7)
    np.testing.assert_array_equal(top[0, 0], np.array(want))


def test_detection_output_top_k_keep_top_k_and_eta():
    # top_k: 2 before NMS: class 1 sees 1 and 0 (0 suppressed), class 2 sees 0 and 2
    top = _detect("confidence_threshold: 0.15 nms_param { nms_threshold: 0.45 top_k: 2 }")
    np.testing.assert_array_equal(top[0, 0], np.array([_row(0, 1, 1, 0.8), _row(0, 2, 0, 0.2), _row(0, 2, 2, 0.2)]))
    # keep_top_k: 4 over both classes by score (ties in label, then NMS order); rows by label again
    top = _detect("confidence_threshold: 0.15 keep_top_k: 4 nms_param { nms_threshold: 0.45 }")
    np.testing.assert_array_equal(top[0, 0], np.array([_row(0, 1, 1, 0.8), _row(0, 1, 3, 0.6), _row(0, 1, 2, 0.3),
                                                       _row(0, 2, 0, 0.2)]))
    # adaptive NMS: after keeping prior 1 the threshold 0.6 becomes 0.3 (it was above 0.5), so 3 (.311) goes
    top = _detect("confidence_threshold: 0.5 nms_param { nms_threshold: 0.6 eta: 0.5 }")
    np.testing.assert_array_equal(top[0, 0], np.array([_row(0, 1, 1, 0.8)]))
    top = _detect("confidence_threshold: 0.5 nms_param { nms_threshold: 0.6 }")
    np.testing.assert_array_equal(top[0, 0], np.array([_row(0, 1, 1, 0.8), _row(0, 1, 3, 0.6)]))


def test_detection_output_without_detections_gives_a_row_per_image():
    top = _detect("confidence_threshold: 0.9", n=2)
    np.testing.assert_array_equal(top, np.array([[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1.0]])[None, None])


def test_detection_output_images_background_and_per_class_boxes():
    """Two images: rows of image 0, then image 1. background_label_id: 2 makes class 0 a detection class.
    share_location: false reads each class's own boxes (loc P x num_classes x 4)."""
    top = _detect("background_label_id: 2 confidence_threshold: 0.45 nms_param { nms_threshold: 0.45 }", n=2)
    per_image = [[0, 0.5], [1, 0.8], [1, 0.6]]                 # class 0: prior 2; class 1: priors 1 and 3
    np.testing.assert_array_equal(top[0, 0, :, :3], np.array([[i, lab, np.float32(s)] for i in (0, 1) for lab, s in per_image]))
    loc = np.zeros((1, 4, 3, 4))
    loc[0, 2, 1] = [1.0, 1.0, 1.0, 1.0]                          # class 1's box of prior 2 moves by variance 0.1
    priors = np.stack([SSD_PRIORS.reshape(-1), np.full(16, 0.1)])[None]
    _, (top,), _ = run("DetectionOutput", "detection_output_param { num_classes: 3 share_location: false code_type: CORNER "
                       "confidence_threshold: 0.25 nms_param { nms_threshold: 0.45 } }",
                       loc.reshape(1, -1), SSD_CONF.reshape(1, -1), priors, phase="TEST")
    row = next(r for r in top[0, 0] if r[1] == 1 and r[2] == np.float32(0.3))
    assert_close(row[3:], SSD_PRIORS[2] + 0.1, 1e-6)


def test_detection_output_shape_rule_checks_the_counts():
    from netdsl.errors import NetdslError
    layer = build_layer("DetectionOutput", "detection_output_param { num_classes: 21 }",
                        [(2, 8732 * 4), (2, 8732 * 21), (1, 2, 8732 * 4)], phase="TEST")
    assert layer.top_shapes == [(1, 1, None, 7)]
    for shapes in ([(2, 100), (2, 525), (1, 2, 104)], [(2, 104), (2, 500), (1, 2, 104)], [(2, 104), (2, 546), (2, 104)]):
        with pytest.raises(NetdslError) as e:
            build_layer("DetectionOutput", "detection_output_param { num_classes: 21 }", shapes, phase="TEST")
        assert {d.code for d in e.value.diagnostics} & {"E0371", "E0221"}
    with pytest.raises(NetdslError) as e:
        build_layer("DetectionOutput", "detection_output_param { share_location: true }", [(1, 4), (1, 2), (1, 2, 4)])
    assert "E0106" in [d.code for d in e.value.diagnostics]


def test_ssd300_deploy_net_checks_and_runs():
    import pathlib
    path = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "real"
            / "xzgz+caffe-ssd__models_VGGNet_VOC0712_SSD_300x300_deploy.prototxt")
    if not path.exists():
        pytest.skip("shared/reference is not available")
    ch = check_mod.check(syntax.parse(path.read_text(), str(path)), phase="TEST")
    shapes = {t: s for n in ch.graph.nodes for t, s in zip(n.tops, ch.nodes[n].tops)}
    assert shapes["mbox_priorbox"] == (1, 2, 8732 * 4) and shapes["detection_out"] == (1, 1, None, 7)


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

