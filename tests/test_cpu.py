"""The compiled CPU path (netdsl/cpu/) against its reference, the NumPy layers: every compiled op
forward and backward in float32 and float64, mixed plans, the flat-buffer solver for every update
rule, LeNet's loss curve, and that `check` never loads Numba."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from support import ROOT, eager_iterations, needs_mnist, shared_data_dir

from netdsl import syntax
from netdsl.check import check
from netdsl.cpu.program import coverage, lower_cpu
from netdsl.cpu.update import FlatSolver, flatten
from netdsl.executor import Net
from netdsl.plan import lower
from netdsl.solver import SOLVER_TYPES, Solver, SolverConfig

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


def _close(have, want, dtype, err_msg=""):
    """Equal to the dtype's rounding. The absolute tolerance scales with the array's largest
    value: a direct convolution sums its terms in another order than the GEMM of the NumPy layer,
    so a value that cancels to near zero differs by the rounding of its terms."""
    tol = dict(TOL[dtype])
    finite = np.abs(np.asarray(want)[np.isfinite(want)])             # a MAX pool's empty window is -inf
    tol["atol"] *= max(1.0, float(finite.max(initial=0)))
    np.testing.assert_allclose(have, want, **tol, err_msg=err_msg)


def _net(layers: str, x_shape, t_shape, dtype, seed=4, extra_inputs=""):
    """A net: Input data (x_shape) and target (t_shape), the layers under test reading 'data' and
    writing 'out', then a NumPy EuclideanLoss against the target (a mixed plan by construction)."""
    dims = lambda s: " ".join(f"dim: {d}" for d in s)  # noqa: E731
    text = f"""name: "t" force_backward: true
layer {{ name: "in" type: "Input" top: "data" top: "target" {extra_inputs}
  input_param {{ shape {{ {dims(x_shape)} }} shape {{ {dims(t_shape)} }} }} }}
{layers}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }}
"""
    plan = lower(check(syntax.parse(text, "t.net"), phase="TRAIN"), runnable=True)
    return Net(plan, np, dtype=dtype, seed=seed), Net(plan, np, dtype=dtype, seed=seed)


def _step(net, inputs):
    net.zero_grad()
    out = {k: np.array(v) for k, v in net.forward(**inputs).items()}
    net.backward()
    return out, {k: np.array(b.grad) for k, b in net.blobs.items() if b.grad is not None}, \
        {f"{k}/{i}": np.array(p.grad) for k, ps in net.params.items() for i, p in enumerate(ps)}


def _compare(layers, x_shape, t_shape, dtype, x=None, compiled_types=()):
    ref, got = _net(layers, x_shape, t_shape, dtype)
    lower_cpu(got)
    done, _ = coverage(got.plan)
    assert set(compiled_types) <= set(done), done
    rng = np.random.default_rng(0)
    inputs = {"data": rng.standard_normal(x_shape) if x is None else x, "target": rng.standard_normal(t_shape)}
    for _ in range(2):                      # twice: the preallocated buffers are reused correctly
        a, b = _step(ref, inputs), _step(got, inputs)
        for want, have in zip(a, b):
            assert want.keys() == have.keys()
            for k in want:
                _close(have[k], want[k], dtype, err_msg=k)
    return got


CONV = 'layer {{ name: "c" type: "Convolution" bottom: "data" top: "out" convolution_param {{ num_output: {m} {p} ' \
       'weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "uniform" min: -1 max: 1 }} }} }}'
CONV_CASES = [  # (num_output, params, x shape, top shape): gemm layout (small maps) and batched (>= 512 pixels)
    (4, "kernel_size: 3", (2, 3, 7, 6), (2, 4, 5, 4)),
    (3, "kernel_size: 3 pad: 1 stride: 2", (2, 2, 9, 8), (2, 3, 5, 4)),
    (2, "kernel_size: 3 pad: 2 dilation: 2", (2, 2, 6, 7), (2, 2, 6, 7)),
    (3, "kernel_h: 2 kernel_w: 3 stride_h: 2 pad_w: 1 bias_term: false", (2, 2, 7, 7), (2, 3, 3, 7)),
    (3, "kernel_size: 3 pad: 1", (2, 2, 24, 24), (2, 3, 24, 24)),
    (2, "kernel_size: 5 stride: 1 pad: 2 bias_term: false", (1, 3, 24, 24), (1, 2, 24, 24)),
    (2, "kernel_size: 3 stride: 2 pad: 1", (1, 2, 47, 45), (1, 2, 24, 23)),
    # an image's float32 top is 4 KiB and the batch > 8: the epilogue moves 8 images at a time
    (16, "kernel_size: 3 pad: 1", (10, 2, 8, 8), (10, 16, 8, 8)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,p,xs,ts", CONV_CASES)
def test_convolution_matches_numpy(m, p, xs, ts, dtype):
    _compare(CONV.format(m=m, p=p), xs, ts, dtype, compiled_types=["Convolution"])


DIRECT_CASES = [  # (num_output, params, x shape, top shape): shapes that run direct (cpu/direct.py)
    (16, "kernel_size: 3 pad: 1", (2, 8, 9, 7), (2, 16, 9, 7)),               # one vector, a tail column
    (20, "kernel_size: 5 pad: 2", (3, 3, 12, 11), (3, 20, 12, 11)),           # a part vector, cifar's conv1
    (5, "kernel_size: 3 pad: 2 dilation: 2", (2, 8, 10, 10), (2, 5, 10, 10)),
    (33, "kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2 bias_term: false", (2, 6, 8, 13), (2, 33, 8, 13)),
    (8, "kernel_size: 3 pad: 1", (2, 8, 20, 4), (2, 8, 20, 4)),               # several rows a tile, a tail row
    (64, "kernel_size: 5 pad: 2", (2, 32, 8, 8), (2, 64, 8, 8)),              # cifar's conv3
    (16, "kernel_size: 3 stride: 2 pad: 1", (2, 16, 9, 8), (2, 16, 5, 4)),    # strided: dx by GEMM + col2im
    (12, "kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 3 pad_w: 2", (2, 8, 11, 13), (2, 12, 5, 5)),
    (8, "kernel_size: 3 stride: 2 pad: 2 dilation: 2", (2, 8, 9, 9), (2, 8, 5, 5)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,p,xs,ts", DIRECT_CASES)
@pytest.mark.parametrize("direct", [True, False])
def test_direct_convolution_matches_numpy(m, p, xs, ts, dtype, direct, monkeypatch):
    """Direct, and (switched off) im2col + GEMM on the same shapes."""
    from netdsl.cpu import ops
    monkeypatch.setattr(ops, "DIRECT", direct)
    got = _compare(CONV.format(m=m, p=p), xs, ts, dtype, compiled_types=["Convolution"])
    assert type(got.runners[1]) is (ops.DirectConvOp if direct else ops.ConvOp)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [0, 0.25])
def test_direct_convolution_with_relu_fused_matches_numpy(dtype, slope):
    from netdsl.cpu.ops import DirectConvOp
    relu = f'layer {{ name: "r" type: "ReLU" bottom: "out" top: "out" relu_param {{ negative_slope: {slope} }} }}'
    got = _compare(CONV.format(m=20, p="kernel_size: 3 pad: 1") + relu, (2, 8, 6, 6), (2, 20, 6, 6), dtype,
                   compiled_types=["Convolution", "ReLU"])
    assert isinstance(got.runners[1], DirectConvOp) and got.runners[2].fused


def _random_geometries(count, seed=7):
    """(num_output, params, x shape, top shape) of random convolutions: kernels 1-5 a side,
    strides 1-3, pads, dilation 1-2, 1-40 input and 1-70 output channels."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < count:
        (kh, kw), (sh, sw), (ph, pw) = rng.integers(1, 6, 2), rng.integers(1, 4, 2), rng.integers(0, 4, 2)
        d, C, M, N = int(rng.integers(1, 3)), int(rng.integers(1, 41)), int(rng.integers(1, 71)), int(rng.integers(1, 4))
        H, W = int(rng.integers(4, 30)), int(rng.integers(4, 30))
        if H + 2 * ph < d * (kh - 1) + 1 or W + 2 * pw < d * (kw - 1) + 1:
            continue
        OH, OW = (H + 2 * ph - d * (kh - 1) - 1) // sh + 1, (W + 2 * pw - d * (kw - 1) - 1) // sw + 1
        out.append((M, f"kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} "
                       f"dilation: {d}", (N, C, H, W), (N, M, OH, OW)))
    return out


def test_random_convolutions_match_numpy():
    """A seeded sweep of geometries (direct or im2col as the rule picks), float64, with a ReLU."""
    from netdsl.cpu.ops import DirectConvOp
    relu = 'layer { name: "r" type: "ReLU" bottom: "out" top: "out" }'
    direct = 0
    for m, p, xs, ts in _random_geometries(24):
        got = _compare(CONV.format(m=m, p=p) + relu, xs, ts, np.float64, compiled_types=["Convolution"])
        direct += isinstance(got.runners[1], DirectConvOp)
    assert direct >= 6, direct                  # the sweep reaches the direct kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_convolution_tiles_for_avx2_match_numpy(dtype, monkeypatch):
    """On a CPU without AVX-512 the tiles are of 256-bit vectors and half the accumulators: the
    same cases with that tiling (LLVM compiles it for this CPU just the same)."""
    from netdsl.cpu import direct
    monkeypatch.setattr(direct, "lanes", lambda dt: 32 // np.dtype(dt).itemsize)
    monkeypatch.setattr(direct, "budget", lambda: 12)
    for m, p, xs, ts in DIRECT_CASES[:4]:
        _compare(CONV.format(m=m, p=p), xs, ts, dtype, compiled_types=["Convolution"])


@pytest.mark.parametrize("layer,out", [
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "out" convolution_param { num_output: 8 '
     'kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }', (2, 8, 22, 22)),      # direct, no pad
    ('layer { name: "p" type: "Pooling" bottom: "data" top: "out" pooling_param { pool: MAX kernel_size: 3 '
     'stride: 2 } }', (2, 8, 12, 12))])                                                      # by vectors
def test_generated_kernels_read_a_data_layers_float32_in_a_float64_net(layer, out):
    """Data layers give float32 tops whatever the net's dtype: the generated kernels, which take
    raw pointers, must be handed the net's dtype (as the Numba kernels' typed calls convert)."""
    from netdsl.cpu.ops import DirectConvOp, PoolingOp
    text = f"""name: "t" force_backward: true
layer {{ name: "in" type: "DummyData" top: "data" top: "target" dummy_data_param {{
  shape {{ dim: 2 dim: 8 dim: 24 dim: 24 }} shape {{ dim: {out[0]} dim: {out[1]} dim: {out[2]} dim: {out[3]} }}
  data_filler {{ type: "gaussian" std: 1 }} }} }}
{layer}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }}
"""
    plan = lower(check(syntax.parse(text, "t.net"), phase="TRAIN"), runnable=True)
    ref, got = Net(plan, np, dtype=np.float64, seed=3), Net(plan, np, dtype=np.float64, seed=3)
    lower_cpu(got)
    op = got.runners[1]
    assert isinstance(op, DirectConvOp) or isinstance(op, PoolingOp) and op.rows is not None
    a, b = _step(ref, {}), _step(got, {})
    assert ref.values["data"].dtype == np.float32                 # the case this guards
    np.testing.assert_allclose(np.array(got.values["out"]), np.array(ref.values["out"]), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(b[0]["loss"], a[0]["loss"], rtol=1e-6)   # the NumPy pooling keeps float32
    for k in a[2]:
        np.testing.assert_allclose(b[2][k], a[2][k], rtol=1e-10, atol=1e-10, err_msg=k)


def _torch_euclidean(torch, out, target):
    """Caffe's EuclideanLoss in PyTorch: sum of squares / (2N)."""
    return ((out - target) ** 2).sum() / (2 * out.shape[0])


@pytest.mark.parametrize("m,p,xs,ts", DIRECT_CASES[1:3] + DIRECT_CASES[5:8])
def test_direct_convolution_matches_torch(m, p, xs, ts):
    """An independent reference: PyTorch's conv2d with the net's weights, forward and the
    gradients of data, weights and bias through Caffe's EuclideanLoss, float64."""
    torch = pytest.importorskip("torch")
    from netdsl.cpu.ops import DirectConvOp
    ref, got = _net(CONV.format(m=m, p=p), xs, ts, np.float64)
    lower_cpu(got)
    assert isinstance(got.runners[1], DirectConvOp)
    rng = np.random.default_rng(0)
    x, target = rng.standard_normal(xs), rng.standard_normal(ts)
    _, grads, pgrads = _step(got, {"data": x, "target": target})
    L = got.plan.steps[1].layer
    (kh, kw), stride, pad, dil = L.geometry()
    W = torch.tensor(np.array(got.params["c"][0].data))
    b = torch.tensor(np.array(got.params["c"][1].data)) if L.p.bias_term else None
    xt = torch.tensor(x, requires_grad=True)
    Wt = W.clone().requires_grad_(True)
    bt = b.clone().requires_grad_(True) if b is not None else None
    out = torch.nn.functional.conv2d(xt, Wt, bt, stride=stride, padding=pad, dilation=dil)
    _torch_euclidean(torch, out, torch.tensor(target)).backward()
    np.testing.assert_allclose(np.array(got.values["out"]), out.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grads["data"], xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pgrads["c/0"], Wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    if bt is not None:
        np.testing.assert_allclose(pgrads["c/1"], bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_max_pooling_by_row_vectors_matches_torch():
    """An independent reference: PyTorch's max_pool2d in ceil mode (Caffe's output size), values
    and the gradient routed to each window's max, float64, wide rows and a padded window."""
    torch = pytest.importorskip("torch")
    for p, xs, ts, (k, s, pad) in [("pool: MAX kernel_size: 3 stride: 2", (2, 3, 37, 40), (2, 3, 18, 20), (3, 2, 0)),
                                   ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (2, 2, 30, 33), (2, 2, 16, 17), (3, 2, 1))]:
        layer = f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "out" pooling_param {{ {p} }} }}'
        _, got = _net(layer, xs, ts, np.float64)
        lower_cpu(got)
        assert got.runners[1].rows is not None
        rng = np.random.default_rng(0)
        x, target = rng.standard_normal(xs), rng.standard_normal(ts)
        _, grads, _ = _step(got, {"data": x, "target": target})
        xt = torch.tensor(x, requires_grad=True)
        out = torch.nn.functional.max_pool2d(xt, k, s, pad, ceil_mode=True)
        _torch_euclidean(torch, out, torch.tensor(target)).backward()
        np.testing.assert_array_equal(np.array(got.values["out"]), out.detach().numpy())
        np.testing.assert_allclose(grads["data"], xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_direct_convolution_is_chosen_where_it_wins():
    """Taps enough, and with stride 1 dx no larger than 2.5 y (docs/benchmarks.md has the
    measurements)."""
    from netdsl.cpu.direct import fits
    assert fits(5, 5, 1, 1, 2, 2, 1, 1, 32, 16, 16, 32, 16, 16, dx=True) is None          # cifar's conv2
    assert fits(5, 5, 2, 2, 2, 2, 1, 1, 32, 16, 16, 32, 8, 8, dx=True) is None            # dx by GEMM + col2im
    assert fits(1, 1, 1, 1, 0, 0, 1, 1, 64, 28, 28, 42, 28, 28, dx=True) == "a 1x1 kernel is a GEMM of its input"
    assert fits(5, 5, 1, 1, 0, 0, 1, 1, 1, 28, 28, 20, 24, 24, dx=False) == "fewer than 64 taps per output"  # LeNet conv1
    assert fits(5, 5, 1, 1, 0, 0, 1, 1, 20, 12, 12, 50, 8, 8, dx=True) is None            # LeNet conv2: dx 2.25x y
    small = (5, 5, 1, 1, 0, 0, 1, 1, 20, 8, 8, 50, 4, 4)                                  # dx 4x y
    assert fits(*small, dx=True) == "dx as a convolution would run over dy's zero border"
    assert fits(*small, dx=False) is None                                                # a test net's forward
    assert fits(3, 3, 1, 1, 3, 3, 1, 1, 8, 8, 8, 8, 12, 12, dx=True) == "padding wider than the kernel"
    assert fits(3, 3, 1, 1, 1, 1, 1, 1, 64, 6000, 6000, 64, 6000, 6000, dx=False) == \
        "an image too large for the kernels' 32-bit offsets"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [0, 0.25])
def test_gemm_with_relu_fused_matches_numpy(dtype, slope):
    relu = f'layer {{ name: "r" type: "ReLU" bottom: "out" top: "out" relu_param {{ negative_slope: {slope} }} }}'
    conv = CONV.format(m=3, p="kernel_size: 3", ) + relu
    got = _compare(conv, (2, 2, 6, 6), (2, 3, 4, 4), dtype, compiled_types=["Convolution", "ReLU"])
    assert got.runners[2].fused
    ip = 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "out" inner_product_param { num_output: 5 ' \
         'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } } }' + relu
    got = _compare(ip, (3, 2, 2, 2), (3, 5), dtype, compiled_types=["InnerProduct", "ReLU"])
    assert got.runners[2].fused


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", ["num_output: 5", "num_output: 4 transpose: true", "num_output: 3 bias_term: false",
                               "num_output: 3 axis: 2"])
def test_inner_product_matches_numpy(p, dtype):
    ts = (2, 3, 3) if "axis: 2" in p else ((2, 4) if "transpose" in p else (2, int(p.split()[1])))
    _compare(f'layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "out" inner_product_param {{ {p} '
             'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } } }',
             (2, 3, 2, 2), ts, dtype, compiled_types=["InnerProduct"])


POOL_CASES = [  # (params, x shape, top shape)
    ("pool: MAX kernel_size: 2 stride: 2", (2, 3, 6, 8), (2, 3, 3, 4)),
    ("pool: MAX kernel_size: 3 stride: 2", (2, 2, 7, 6), (2, 2, 3, 3)),
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (2, 2, 6, 7), (2, 2, 4, 4)),
    ("pool: MAX kernel_size: 2 stride: 2", (1, 2, 5, 5), (1, 2, 3, 3)),
    ("pool: MAX global_pooling: true", (2, 3, 4, 5), (2, 3, 1, 1)),
    ("pool: AVE kernel_size: 3 stride: 2", (2, 2, 7, 8), (2, 2, 3, 4)),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (2, 2, 6, 7), (2, 2, 4, 4)),
    ("pool: AVE kernel_size: 2 stride: 2", (2, 2, 4, 6), (2, 2, 2, 3)),
    ("pool: AVE global_pooling: true", (2, 3, 4, 5), (2, 3, 1, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p,xs,ts", POOL_CASES)
def test_pooling_matches_numpy_ties_included(p, xs, ts, dtype):
    """Inputs of three values make ties in most windows: the gradient must go to Caffe's first max."""
    layer = f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "out" pooling_param {{ {p} }} }}'
    _compare(layer, xs, ts, dtype, compiled_types=["Pooling"])
    ties = np.random.default_rng(1).integers(0, 3, xs).astype(dtype)
    _compare(layer, xs, ts, dtype, x=ties, compiled_types=["Pooling"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vectors", [True, False])
@pytest.mark.parametrize("p,xs,ts", [("pool: MAX kernel_size: 3 stride: 2", (2, 3, 37, 40), (2, 3, 18, 20)),
                                     # ceil mode: the last window of each row and column starts past the plane
                                     ("pool: MAX kernel_size: 1 stride: 3", (2, 2, 35, 35), (2, 2, 13, 13)),
                                     ("pool: MAX kernel_h: 2 kernel_w: 3 stride_w: 2 pad_w: 1", (2, 2, 9, 35), (2, 2, 8, 18))])
def test_max_pooling_by_row_vectors_matches_numpy(p, xs, ts, vectors, dtype, monkeypatch):
    """Rows wider than a vector (a full one and a part one per row, clipped windows at the
    edges), ties in most windows: the vector kernel (maxpool.py) and, where LLVM cannot compile
    it, kernels.max_pool_forward."""
    from netdsl.cpu import maxpool
    if not vectors:
        monkeypatch.setattr(maxpool, "UNAVAILABLE", "switched off")
    layer = f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "out" pooling_param {{ {p} }} }}'
    ties = np.random.default_rng(1).integers(0, 3, xs).astype(dtype)
    got = _compare(layer, xs, ts, dtype, x=ties, compiled_types=["Pooling"])
    assert (got.runners[1].rows is not None) == vectors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_a_mixed_plan_match_numpy(dtype):
    """A NumPy layer (TanH) between compiled ones, and a ReLU of the net's input."""
    layers = ('layer { name: "r" type: "ReLU" bottom: "data" top: "r" relu_param { negative_slope: 0.1 } }'
              'layer { name: "t" type: "TanH" bottom: "r" top: "t" }'
              + CONV.format(m=2, p="kernel_size: 3").replace('bottom: "data"', 'bottom: "t"'))
    got = _compare(layers, (2, 2, 5, 5), (2, 2, 3, 3), dtype, compiled_types=["ReLU", "Convolution"])
    done, numpy = coverage(got.plan)
    assert "TanH" in numpy and "EuclideanLoss" in numpy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", ["", "loss_param { ignore_label: 1 }", "loss_param { normalization: BATCH_SIZE }",
                               "loss_param { ignore_label: 0 normalization: FULL }"])
def test_softmax_loss_matches_numpy(p, dtype):
    text = f"""name: "s" force_backward: true
layer {{ name: "in" type: "Input" top: "x" top: "label" input_param {{ shape {{ dim: 3 dim: 4 dim: 2 dim: 3 }}
  shape {{ dim: 3 dim: 1 dim: 2 dim: 3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" loss_weight: 2 {p} }}
"""
    plan = lower(check(syntax.parse(text, "s.net"), phase="TRAIN"), runnable=True)
    ref, got = Net(plan, np, dtype=dtype), Net(plan, np, dtype=dtype)
    lower_cpu(got)
    assert coverage(plan)[0] == ["SoftmaxWithLoss"]
    rng = np.random.default_rng(2)
    inputs = {"x": rng.standard_normal((3, 4, 2, 3)) * 3, "label": rng.integers(0, 4, (3, 1, 2, 3))}
    a, b = _step(ref, inputs), _step(got, inputs)
    np.testing.assert_allclose(b[0]["loss"], a[0]["loss"], **TOL[dtype])
    np.testing.assert_allclose(b[1]["x"], a[1]["x"], **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weights,sigma", [(False, 1.0), (True, 3.0)])
@pytest.mark.parametrize("learned_target", [False, True])
def test_smooth_l1_loss_matches_numpy(weights, sigma, learned_target, dtype):
    """caffe-fast-rcnn's SmoothL1Loss with 2 and 4 bottoms, both branches of f: the loss, the
    predictions' gradient and, when an InnerProduct computes the targets (shaped differently,
    with the same count), theirs."""
    extra = 'bottom: "w_in" bottom: "w_out"' if weights else ""
    shapes = "shape { dim: 2 dim: 8 dim: 3 dim: 3 } shape { dim: 2 dim: 72 }" + \
        (" shape { dim: 2 dim: 8 dim: 3 dim: 3 } shape { dim: 2 dim: 8 dim: 3 dim: 3 }" if weights else "")
    tops = 'top: "x" top: "t"' + (' top: "w_in" top: "w_out"' if weights else "")
    target = "t"
    if learned_target:
        target = "tp"
        extra_layer = ('layer { name: "ip" type: "InnerProduct" bottom: "t" top: "tp" inner_product_param { '
                       'num_output: 72 weight_filler { type: "gaussian" std: 0.1 } } }')
    text = f"""name: "s" force_backward: true
layer {{ name: "in" type: "Input" {tops} input_param {{ {shapes} }} }}
{extra_layer if learned_target else ""}
layer {{ name: "loss" type: "SmoothL1Loss" bottom: "x" bottom: "{target}" {extra} top: "loss" loss_weight: 2
  smooth_l1_loss_param {{ sigma: {sigma} }} }}
"""
    plan = lower(check(syntax.parse(text, "s.net"), phase="TRAIN"), runnable=True)
    ref, got = Net(plan, np, dtype=dtype, seed=1), Net(plan, np, dtype=dtype, seed=1)
    lower_cpu(got)
    assert "SmoothL1Loss" in coverage(plan)[0]
    rng = np.random.default_rng(5)
    inputs = {"x": rng.standard_normal((2, 8, 3, 3)), "t": rng.standard_normal((2, 72)) * 0.3}
    if weights:
        inputs |= {"w_in": rng.integers(0, 2, (2, 8, 3, 3)) * 1.0, "w_out": rng.random((2, 8, 3, 3))}
    for _ in range(2):
        a, b = _step(ref, inputs), _step(got, inputs)
        np.testing.assert_allclose(b[0]["loss"], a[0]["loss"], **TOL[dtype])
        for want, have in zip(a[1:], b[1:]):
            assert want.keys() == have.keys()
            for k in want:
                _close(have[k], want[k], dtype, err_msg=k)
        assert ("tp" in a[1]) == learned_target


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_smooth_l1_loss_matches_torch(sigma):
    """The compiled SmoothL1Loss against an independent reference: caffe-fast-rcnn's f with sigma
    is PyTorch's smooth_l1_loss with beta = 1 / sigma^2; loss and the predictions' gradient."""
    torch = pytest.importorskip("torch")
    text = f"""name: "s" force_backward: true
layer {{ name: "in" type: "Input" top: "x" top: "t" top: "w_in" top: "w_out"
  input_param {{ shape {{ dim: 2 dim: 8 dim: 3 dim: 3 }} shape {{ dim: 2 dim: 72 }} shape {{ dim: 2 dim: 8 dim: 3 dim: 3 }}
  shape {{ dim: 2 dim: 8 dim: 3 dim: 3 }} }} }}
layer {{ name: "loss" type: "SmoothL1Loss" bottom: "x" bottom: "t" bottom: "w_in" bottom: "w_out" top: "loss"
  loss_weight: 2 smooth_l1_loss_param {{ sigma: {sigma} }} }}
"""
    net = Net(lower(check(syntax.parse(text, "s.net"), phase="TRAIN"), runnable=True), np, dtype=np.float64)
    lower_cpu(net)
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((2, 8, 3, 3)), rng.standard_normal((2, 72)) * 0.3
    w_in, w_out = rng.integers(0, 2, x.shape) * 1.0, rng.random(x.shape)
    out, grads, _ = _step(net, {"x": x, "t": t, "w_in": w_in, "w_out": w_out})
    xt = torch.tensor(x, requires_grad=True)
    d = torch.tensor(w_in) * (xt - torch.tensor(t.reshape(x.shape)))
    f = torch.nn.functional.smooth_l1_loss(d, torch.zeros_like(d), beta=1.0 / sigma ** 2, reduction="none")
    want = (torch.tensor(w_out) * f).sum() / x.shape[0]
    (2 * want).backward()                   # loss_weight 2 scales the gradient, not the top
    np.testing.assert_allclose(out["loss"], want.item(), rtol=1e-12)
    np.testing.assert_allclose(grads["x"], xt.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_softmax_loss_checks_labels_like_numpy():
    from netdsl.errors import NetdslError
    text = """name: "s"
layer { name: "in" type: "Input" top: "x" top: "label" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" }
"""
    net = Net(lower(check(syntax.parse(text, "s.net"), phase="TRAIN"), runnable=True), np)
    lower_cpu(net)
    with pytest.raises(NetdslError) as e:
        net.forward(x=np.zeros((2, 3)), label=np.array([0, 3]))
    assert e.value.diagnostic.code == "E0621"


@pytest.mark.parametrize("kind", list(SOLVER_TYPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_solver_matches_solver(kind, dtype):
    """Every update rule, with lr/decay multipliers, L1 and L2, clipping and iter_size, and the
    history blobs a snapshot saves."""
    class P:
        def __init__(self, data, lr, dm):
            self.data, self.grad, self.lr_mult, self.decay_mult, self.name = data, data * 0, lr, dm, "p"
    momentum = 0.0 if kind in ("AdaGrad", "RMSProp") else 0.9
    for reg, clip, iters in (("L2", -1.0, 1), ("L1", 0.5, 2)):
        cfg = SolverConfig(type=kind, base_lr=0.05, momentum=momentum, weight_decay=0.01, regularization_type=reg,
                           clip_gradients=clip, iter_size=iters, lr_policy="inv", gamma=0.1, power=0.75,
                           delta=1e-6 if kind != "AdaDelta" else 1e-3)
        rng = np.random.default_rng(5)
        shapes, mults = [(3, 4), (5,), (2, 2, 3)], [(1.0, 1.0), (2.0, 0.0), (0.5, 3.0)]
        init = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ref = [P(a.copy(), *m) for a, m in zip(init, mults)]
        got = [P(a.copy(), *m) for a, m in zip(init, mults)]
        data, grad = flatten(got, dtype)
        solvers = Solver(cfg, ref), FlatSolver(cfg, got, data, grad)
        for it in range(4):
            grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
            for ps, s in zip((ref, got), solvers):
                for p, g in zip(ps, grads):
                    p.grad[...] = g
                s.step(it)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b.data, a.data, rtol=1e-5 if dtype == np.float32 else 1e-11, atol=1e-6)
            np.testing.assert_allclose(b.grad, a.grad, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)
        want, have = solvers[0].state_dict(), solvers[1].state_dict()
        assert want.keys() == have.keys()
        for k in want:
            np.testing.assert_allclose(have[k], want[k], rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)


@needs_mnist
def test_lenet_loss_curve_matches_numpy(tmp_path, monkeypatch):
    """The README's training, first iterations: the compiled path's losses are NumPy's to float32
    rounding; its tops live in the liveness plan's arena."""
    from netdsl.backend import CPU
    from netdsl.train import Trainer
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    curves = {}
    for kernels in ("numpy", "compiled"):
        tr = Trainer(str(ROOT / "nets" / "lenet_solver.net"), CPU, seed=3, out=str(tmp_path / kernels),
                     progress=False, cpu_kernels=kernels)
        curves[kernels] = eager_iterations(tr, 8)
    np.testing.assert_allclose(curves["compiled"], curves["numpy"], rtol=2e-5)
    assert isinstance(tr.solver, FlatSolver) and tr.cpu is not None
    arena = tr.cpu.arena
    shared = [t for t, v in tr.net.values.items() if np.shares_memory(v, arena)]
    assert {"conv1", "pool1", "conv2", "pool2"} <= {t.split("#")[0] for t in shared}, shared
    assert {"Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss"} <= set(coverage(tr.net.plan)[0])


@needs_mnist
def test_training_gives_openblas_its_threads_back(tmp_path, monkeypatch):
    """The compiled kernels hold OpenBLAS at one thread while they train; afterwards NumPy's own
    GEMMs (inference in the same process) get the count they had before."""
    from netdsl.backend import CPU
    from netdsl.cpu.threads import openblas_threads, set_openblas_threads
    from netdsl.train import Trainer
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    if not set_openblas_threads(2):
        pytest.skip("NumPy's BLAS is not an OpenBLAS")
    tr = Trainer(str(ROOT / "nets" / "lenet_solver.net"), CPU, seed=3, max_iter=2, out=str(tmp_path), progress=False)
    assert tr.cpu is not None and openblas_threads() == 1
    tr.run()
    assert openblas_threads() == 2


def test_check_never_imports_numba():
    code = ("import sys\nfrom netdsl.cli import main\ntry:\n    main(['check', 'nets/lenet.net'])\n"
            "except SystemExit:\n    pass\nprint('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("threads", [None, 1])
def test_one_thread_pool_for_kernels_and_gemms(threads):
    """With compiled kernels, Numba's pool (its OpenMP layer where that loads) gets the threads and
    OpenBLAS, whose GEMMs it calls block by block, keeps one; in a fresh process, where the
    threading layer is still to be chosen."""
    code = f"""
import ctypes, numba, numpy as np
from netdsl.cpu import blas, threads
blas_n, kernel_n = threads.set_threads({threads}, True)
x = np.ones(4096, np.float32)
from netdsl.cpu.kernels import relu_forward
relu_forward(x, x.copy(), np.float32(0))
print(blas.NATIVE, blas_n, kernel_n, threads.openblas_threads(), numba.get_num_threads(), numba.threading_layer())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    native, blas_n, kernel_n, openblas_n, numba_n, layer = out.split()
    from netdsl.cpu.threads import available_cores
    want = threads or min(available_cores(), __import__("numba").config.NUMBA_NUM_THREADS)
    assert native == "True" and int(blas_n) == int(openblas_n) == 1       # NumPy's wheel bundles OpenBLAS
    assert int(kernel_n) == int(numba_n) == want
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (loads where libgomp does)
    except ImportError:
        assert layer == "workqueue"
    else:
        assert layer == "omp"


@needs_mnist
def test_bad_thread_count_is_a_located_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    r = subprocess.run([sys.executable, "-m", "netdsl", "train", "nets/lenet_solver.net", "--threads", "0",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "E0731" in r.stderr and "Traceback" not in r.stderr


@needs_mnist
@pytest.mark.filterwarnings("ignore::RuntimeWarning")        # the overflow under test (the CLI silences these)
def test_divergence_names_the_same_layer_as_numpy(tmp_path, monkeypatch):
    """Compiled ops share buffers within a step, so E0710 replays the step with the NumPy layers
    to find the first layer that made a NaN or Inf: the same one the NumPy kernels name."""
    from netdsl.backend import CPU
    from netdsl.errors import NetdslError
    from netdsl.train import Trainer
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    solver = tmp_path / "s.net"
    solver.write_text(f'net: "{ROOT / "nets" / "lenet.net"}"\nbase_lr: 1e18\nlr_policy: "fixed"\nmax_iter: 50\n'
                      f'snapshot_prefix: "{tmp_path}/run/x"\n')
    said = {}
    for kernels in ("numpy", "compiled"):
        tr = Trainer(str(solver), CPU, seed=3, out=str(tmp_path / kernels), progress=False, cpu_kernels=kernels)
        with pytest.raises(NetdslError) as e:
            tr.run()
        said[kernels] = e.value.diagnostic.message
    assert "diverged at iteration" in said["numpy"] and "produced NaN or Inf" in said["numpy"]
    assert said["compiled"] == said["numpy"]


@needs_mnist
def test_compiled_buffers_must_fit_the_memory_budget(tmp_path, monkeypatch, capsys):
    """The compiled path's arena and scratch (16.47 MiB for LeNet's train net: no columns where
    convolutions run direct) are checked against --memory-limit as the net's blobs are (16.25
    MiB): 16.35M passes the one and stops at the other."""
    from netdsl.cli import main
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    solver = tmp_path / "s.net"
    solver.write_text(f'net: "{ROOT / "nets" / "lenet.net"}"\nbase_lr: 0.01\nmax_iter: 2\nlr_policy: "fixed"\n'
                      f'snapshot_prefix: "{tmp_path}/run/x"\n')
    assert main(["train", str(solver), "--memory-limit", "16.35M"]) == 2
    assert "error[E0775]: net 'LeNet', its compiled CPU kernels' buffers, needs about" in \
        capsys.readouterr().err
    assert main(["train", str(solver), "--memory-limit", "16.35M", "--cpu-kernels", "numpy"]) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_matches_numpy_every_orientation_and_batch(dtype):
    """blas.gemm (OpenBLAS's Fortran GEMM on a block per thread) against NumPy's matmul: both
    transposes, beta, shapes split by rows, by columns or not at all, and batches with a shared
    operand, with fewer images than threads among them."""
    from netdsl.cpu import blas
    rng = np.random.default_rng(0)
    tol = TOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-3)
    for ta in (False, True):
        for tb in (False, True):
            for m, n, k in [(5, 7, 3), (50, 700, 300), (300, 50, 600), (1, 1, 1)]:
                a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
                b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
                c = rng.standard_normal((m, n)).astype(dtype)
                want = (a.T if ta else a) @ (b.T if tb else b) + 0.5 * c
                np.testing.assert_allclose(blas.gemm(a, b, c, ta, tb, beta=0.5), want, **tol)
    w, d = rng.standard_normal((7, 12)).astype(dtype), rng.standard_normal((5, 7, 9)).astype(dtype)
    x = rng.standard_normal((5, 12, 9)).astype(dtype)
    for images in (5, 1):
        np.testing.assert_allclose(blas.gemm(w, x[:images], np.empty((images, 7, 9), dtype)), w @ x[:images], **tol)
        np.testing.assert_allclose(blas.gemm(d[:images], x[:images], np.empty((images, 7, 12), dtype), tb=True),
                                   d[:images] @ x[:images].transpose(0, 2, 1), **tol)
        np.testing.assert_allclose(blas.gemm(w, d[:images], np.empty((images, 12, 9), dtype), ta=True),
                                   w.T @ d[:images], **tol)
    from netdsl.cpu.threads import set_openblas_threads
    if set_openblas_threads(2):             # OpenBLAS threads itself: one call, no nested pools
        try:
            for shape in ((300, 50, 600), (50, 700, 300)):
                a, b = rng.standard_normal(shape[::2]).astype(dtype), rng.standard_normal(shape[:0:-1]).astype(dtype)
                np.testing.assert_allclose(blas.gemm(a, b, np.empty(shape[:2], dtype)), a @ b, **tol)
            np.testing.assert_allclose(blas.gemm(w, x, np.empty((5, 7, 9), dtype)), w @ x, **tol)
        finally:
            set_openblas_threads(1)
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.gemm(w.T, w, np.empty((12, 12), dtype))


def test_convolution_without_a_native_blas_uses_numpy(monkeypatch):
    """Where NumPy's BLAS is not an OpenBLAS netdsl can call, the ops' GEMMs are NumPy's matmul."""
    from netdsl.cpu import blas
    monkeypatch.setattr(blas, "NATIVE", False)
    for m, p, xs, ts in (CONV_CASES[0], CONV_CASES[4]):
        _compare(CONV.format(m=m, p=p), xs, ts, np.float64, compiled_types=["Convolution"])
    _compare('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "out" inner_product_param { num_output: 4 '
             'transpose: true weight_filler { type: "gaussian" std: 0.5 } } }', (2, 3, 2, 2), (2, 4), np.float64)
