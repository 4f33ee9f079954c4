"""Kernels: naive-loop references, central-difference gradient checks and Caffe's out sizes."""

import numpy as np
import pytest
from reference import conv_ref, deconv_ref, lrn_across_ref, lrn_within_ref, max_pool_backward_ref, numeric_grad, pool_ref

from netdsl import kernels as K

xp = np


# ---------------------------------------------------------------------------------------------
# Naive references (float64, written the way Caffe's CPU loops are)

# ---------------------------------------------------------------------------------------------
# Helpers

def rand(rng, *shape):
    return rng.standard_normal(shape)


def distinct(rng, *shape):
    """Values at least 0.01 apart, so max pooling has no kink within a finite difference."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 + rng.uniform(0, 1e-3, shape)


def check_grads(forward, backward, inputs, rng, atol=1e-6):
    """forward() -> (y, cache) over the arrays in inputs; backward(dy, cache) -> their grads."""
    y, cache = forward()
    R = rand(rng, *y.shape)
    grads = backward(R, cache)
    for arr, grad in zip(inputs, grads):
        num = numeric_grad(lambda: float((forward()[0] * R).sum()), arr)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=atol)


@pytest.fixture(params=["gemm", "batched"])
def layout(request, monkeypatch):
    """Runs a convolution test under both column layouts, with tiny transpose slabs."""
    monkeypatch.setattr(K, "BATCHED_MIN_PIXELS", 10**9 if request.param == "gemm" else 0)
    monkeypatch.setattr(K, "_SLAB", 7)
    return request.param


# ---------------------------------------------------------------------------------------------
# Output sizes (known Caffe values)

def test_conv_out_size():
    assert K.conv_out_size(227, 11, 4, 0) == 55          # AlexNet conv1
    assert K.conv_out_size(27, 5, 1, 2) == 27            # AlexNet conv2
    assert K.conv_out_size(224, 7, 2, 3) == 112          # GoogLeNet conv1
    assert K.conv_out_size(28, 5) == 24                  # LeNet conv1
    assert K.conv_out_size(10, 3, 1, 0, 2) == 6          # dilation 2: effective kernel 5
    assert K.conv_out_size(8, 3, 2, 0) == 3              # floors (8-3)/2 = 2.5


def test_deconv_out_size():
    assert K.deconv_out_size(55, 11, 4, 0) == 227        # inverts AlexNet conv1
    assert K.deconv_out_size(16, 4, 2, 1) == 32          # FCN-style 2x upsampling
    assert K.deconv_out_size(6, 3, 1, 0, 2) == 10


def test_pool_out_size():
    assert K.pool_out_size(55, 3, 2) == 27               # AlexNet pool1
    assert K.pool_out_size(112, 3, 2) == 56              # GoogLeNet pool1, rounds up
    assert K.pool_out_size(112, 3, 2, ceil=False) == 55
    assert K.pool_out_size(24, 2, 2) == 12               # LeNet pool1
    assert K.pool_out_size(32, 3, 2) == 16               # CIFAR-10 quick pool1
    assert K.pool_out_size(5, 3, 4, 2) == 2              # padding correction: 3 -> 2
    assert K.pool_out_size(1, 2, 2, 1) == 1              # padding correction: 2 -> 1
    assert K.pool_out_size(4, 2, 2, 1) == 3              # no correction needed
    # a window larger than the input: Caffe's ceil((1 - 2) / 2) + 1 = 1 (C's ceil(-0.5) is 0)
    assert K.pool_out_size(1, 2, 2) == 1
    assert K.pool_out_size(3, 4, 2) == 1
    assert K.pool_out_size(1, 2, 2, ceil=False) == 0     # floor(-0.5) + 1: Caffe's FLOOR mode has no window
    assert K.pool_out_size(1, 4, 1) == -2                # Caffe would fail to reshape: the checker says E0401


def test_pooling_layer_follows_caffes_arithmetic_for_small_inputs():
    """No "window does not fit" error where Caffe has none (OpenPose's 1x1 placeholder input);
    E0401 only where Caffe's own formula leaves no window."""
    from netdsl import syntax
    from netdsl.check import check
    from netdsl.errors import NetdslError
    net = ('layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 2 dim: {h} dim: {w} }} }} }}\n'
           'layer {{ name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {p} }} }}')
    ok = check(syntax.parse(net.format(h=1, w=1, p="pool: MAX kernel_size: 2 stride: 2"), "t.net"), phase="TEST")
    assert ok.blobs["y"] == (1, 2, 1, 1)
    with pytest.raises(NetdslError) as e:
        check(syntax.parse(net.format(h=1, w=1, p="pool: MAX kernel_size: 4 stride: 1"), "t.net"), phase="TEST")
    assert [d.code for d in e.value.diagnostics] == ["E0401"]
    assert "ceil((1 + 2*0 - 4) / 1) + 1 = -2" in e.value.diagnostics[0].notes[0]


# ---------------------------------------------------------------------------------------------
# Convolution

CONV_CASES = [
    # x shape, (M, kh, kw), stride, pad, dilation, group, bias
    ((2, 3, 7, 7), (4, 3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    ((2, 3, 8, 7), (4, 3, 2), (2, 1), (1, 0), (1, 1), 1, False),     # non-square, stride, pad
    ((2, 4, 9, 9), (6, 3, 3), (2, 2), (2, 1), (2, 1), 2, True),      # dilation, groups
    ((1, 2, 6, 5), (3, 1, 1), (1, 1), (0, 0), (1, 1), 1, True),      # 1x1
    ((3, 6, 5, 6), (6, 2, 3), (1, 2), (1, 1), (1, 2), 3, True),      # 3 groups
]


def conv_inputs(rng, x_shape, mk, group, bias):
    M, kh, kw = mk
    x = rand(rng, *x_shape)
    W = rand(rng, M, x_shape[1] // group, kh, kw)
    return x, W, (rand(rng, M) if bias else None)


@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", CONV_CASES)
def test_conv_forward_matches_reference(layout, x_shape, mk, stride, pad, dil, group, bias):
    rng = np.random.default_rng(0)
    x, W, b = conv_inputs(rng, x_shape, mk, group, bias)
    y, cache = K.conv2d_forward(xp, x, W, b, stride, pad, dil, group)
    assert cache.geom.layout == layout
    np.testing.assert_allclose(y, conv_ref(x, W, b, stride, pad, dil, group), atol=1e-12)


@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", CONV_CASES)
def test_conv_gradients(layout, x_shape, mk, stride, pad, dil, group, bias):
    rng = np.random.default_rng(1)
    x, W, b = conv_inputs(rng, x_shape, mk, group, bias)
    params = [x, W] + ([b] if bias else [])
    check_grads(lambda: K.conv2d_forward(xp, x, W, b, stride, pad, dil, group),
                lambda dy, c: [g for g in K.conv2d_backward(xp, dy, c, W) if g is not None],
                params, rng)


def test_conv_backward_skips_dx_and_db(layout):
    rng = np.random.default_rng(2)
    x, W, _ = conv_inputs(rng, (2, 3, 6, 6), (4, 3, 3), 1, False)
    y, cache = K.conv2d_forward(xp, x, W)
    dx, dW, db = K.conv2d_backward(xp, np.ones_like(y), cache, W, need_dx=False)
    assert dx is None and db is None and dW.shape == W.shape


def test_conv_float32(layout):
    rng = np.random.default_rng(3)
    x, W, b = conv_inputs(rng, (4, 3, 10, 10), (5, 3, 3), 1, True)
    y, _ = K.conv2d_forward(xp, x.astype(np.float32), W.astype(np.float32), b.astype(np.float32),
                            1, 1)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, conv_ref(x, W, b, (1, 1), (1, 1), (1, 1), 1), atol=1e-4)


@pytest.mark.parametrize("stride,pad,dil", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_col2im_is_adjoint_of_im2col(layout, stride, pad, dil):
    rng = np.random.default_rng(4)
    x = rand(rng, 2, 3, 7, 8)
    cols = K.im2col(xp, x, 3, 2, stride, stride, pad, pad, dil, dil)
    c = rand(rng, *cols.shape)
    dx = K.col2im(xp, c, x.shape, 3, 2, stride, stride, pad, pad, dil, dil)
    assert np.isclose((cols * c).sum(), (x * dx).sum())


# ---------------------------------------------------------------------------------------------
# Deconvolution

DECONV_CASES = [
    ((2, 3, 4, 4), (2, 3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    ((2, 4, 3, 4), (4, 4, 3), (2, 2), (1, 1), (1, 1), 2, True),      # 2x upsampling, groups
    ((1, 2, 3, 3), (3, 3, 2), (2, 1), (0, 1), (2, 1), 1, False),     # dilation, non-square
]


def deconv_inputs(rng, x_shape, mk, group, bias):
    M, kh, kw = mk
    x = rand(rng, *x_shape)
    W = rand(rng, x_shape[1], M // group, kh, kw)
    return x, W, (rand(rng, M) if bias else None)


@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", DECONV_CASES)
def test_deconv_forward_matches_reference(layout, x_shape, mk, stride, pad, dil, group, bias):
    rng = np.random.default_rng(5)
    x, W, b = deconv_inputs(rng, x_shape, mk, group, bias)
    y, _ = K.deconv2d_forward(xp, x, W, b, stride, pad, dil, group)
    np.testing.assert_allclose(y, deconv_ref(x, W, b, stride, pad, dil, group), atol=1e-12)


@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", DECONV_CASES)
def test_deconv_gradients(layout, x_shape, mk, stride, pad, dil, group, bias):
    rng = np.random.default_rng(6)
    x, W, b = deconv_inputs(rng, x_shape, mk, group, bias)
    params = [x, W] + ([b] if bias else [])
    check_grads(lambda: K.deconv2d_forward(xp, x, W, b, stride, pad, dil, group),
                lambda dy, c: [g for g in K.deconv2d_backward(xp, dy, c, W) if g is not None],
                params, rng)


# ---------------------------------------------------------------------------------------------
# Pooling

POOL_CASES = [
    # x shape, kernel, stride, pad, ceil
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0), True),      # the reshape fast path
    ((2, 3, 7, 7), (2, 2), (2, 2), (0, 0), True),      # odd size: ceil hangs over the end
    ((2, 3, 7, 7), (2, 2), (2, 2), (0, 0), False),
    ((2, 2, 9, 9), (3, 3), (2, 2), (0, 0), True),      # CIFAR/GoogLeNet style, window clipped
    ((2, 2, 9, 8), (3, 2), (2, 1), (1, 1), True),      # padding, non-square
    ((1, 2, 5, 5), (3, 3), (4, 4), (2, 2), True),      # the padding correction case
    ((1, 2, 6, 6), (3, 3), (1, 1), (1, 1), False),     # overlapping, floor
    ((1, 2, 1, 1), (2, 2), (2, 2), (0, 0), True),      # the window overhangs a 1x1 input (OpenPose)
    ((2, 1, 3, 3), (4, 4), (2, 2), (0, 0), True),      # larger than the input: one clipped window
]


@pytest.mark.parametrize("mode", ["max", "ave"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,k,s,p,ceil", POOL_CASES)
def test_pool_forward_matches_reference(mode, dtype, x_shape, k, s, p, ceil):
    x = np.random.default_rng(7).standard_normal(x_shape).astype(dtype)
    y, _ = K.pool2d_forward(xp, x, mode, *k, *s, *p, ceil=ceil)
    ref, _ = pool_ref(x.astype(np.float64), mode, *k, *s, *p, ceil)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 if dtype == np.float32 else 0)


@pytest.mark.parametrize("mode", ["max", "ave"])
@pytest.mark.parametrize("x_shape,k,s,p,ceil", POOL_CASES)
def test_pool_gradients(mode, x_shape, k, s, p, ceil):
    rng = np.random.default_rng(8)
    x = distinct(rng, *x_shape)
    check_grads(lambda: K.pool2d_forward(xp, x, mode, *k, *s, *p, ceil=ceil),
                lambda dy, c: [K.pool2d_backward(xp, dy, c)], [x], rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,k,s,p,ceil", POOL_CASES)
def test_max_pool_ties_route_to_first_max(dtype, x_shape, k, s, p, ceil):
    rng = np.random.default_rng(9)
    x = np.maximum(rng.integers(-2, 3, x_shape), 0).astype(dtype)   # ReLU-like: many ties
    y, cache = K.pool2d_forward(xp, x, "max", *k, *s, *p, ceil=ceil)
    dy = rng.standard_normal(y.shape).astype(dtype)
    _, mask = pool_ref(x.astype(np.float64), "max", *k, *s, *p, ceil)
    np.testing.assert_allclose(K.pool2d_backward(xp, dy, cache),
                               max_pool_backward_ref(dy, mask, x.shape), rtol=1e-6)


@pytest.mark.parametrize("mode", ["max", "ave"])
def test_global_pool(mode):
    rng = np.random.default_rng(10)
    x = distinct(rng, 2, 3, 5, 4)
    y, _ = K.pool2d_forward(xp, x, mode, global_=True)
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(y, pool_ref(x, mode, 5, 4, 1, 1, 0, 0)[0])
    check_grads(lambda: K.pool2d_forward(xp, x, mode, global_=True),
                lambda dy, c: [K.pool2d_backward(xp, dy, c)], [x], rng)


def test_global_max_pool_ties_route_to_first_max():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 1.0
    y, cache = K.pool2d_forward(xp, x, "max", global_=True)
    dx = K.pool2d_backward(xp, np.ones_like(y), cache)
    assert dx[0, 0, 1, 2] == 1.0 and dx.sum() == 1.0


@pytest.mark.parametrize("k,s", [(2, 2), (2, 1)])          # the pairs path and the windows path
def test_max_pool_skips_nan_like_caffe(k, s):
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, :2, :2] = [[np.nan, 1.0], [3.0, 2.0]]
    y, cache = K.pool2d_forward(xp, x, "max", k, k, s, s)
    ref, mask = pool_ref(x, "max", k, k, s, s, 0, 0)
    assert y[0, 0, 0, 0] == 3.0
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(K.pool2d_backward(xp, np.ones_like(y), cache),
                                  max_pool_backward_ref(np.ones_like(y), mask, x.shape))


@pytest.mark.parametrize("x_shape,k,s,p,ceil",
                         POOL_CASES + [((2, 3, 4, 5), (4, 5), (1, 1), (0, 0), True)])  # + global
def test_max_pool_mask_is_caffes_flat_argmax(x_shape, k, s, p, ceil):
    x = np.maximum(np.random.default_rng(14).integers(-2, 3, x_shape), 0).astype(np.float32)
    _, cache = K.pool2d_forward(xp, x, "max", *k, *s, *p, ceil=ceil)
    mask = K.pool2d_mask(xp, cache)
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, pool_ref(x.astype(np.float64), "max", *k, *s, *p, ceil)[1])


# ---------------------------------------------------------------------------------------------
# LRN

LRN_CASES = [(5, 1e-1, 0.75, 1.0), (3, 2.0, 0.5, 2.0)]


@pytest.mark.parametrize("n,alpha,beta,k", LRN_CASES)
def test_lrn_across_channels(n, alpha, beta, k):
    rng = np.random.default_rng(11)
    x = rand(rng, 2, 7, 3, 4)
    y, _ = K.lrn_forward(xp, x, n, alpha, beta, k, "ACROSS_CHANNELS")
    np.testing.assert_allclose(y, lrn_across_ref(x, n, alpha, beta, k), rtol=1e-12)
    check_grads(lambda: K.lrn_forward(xp, x, n, alpha, beta, k, "ACROSS_CHANNELS"),
                lambda dy, c: [K.lrn_backward(xp, dy, c)], [x], rng)


@pytest.mark.parametrize("n,alpha,beta,k", LRN_CASES)
def test_lrn_within_channel(n, alpha, beta, k):
    rng = np.random.default_rng(12)
    x = rand(rng, 2, 2, 5, 6)
    y, _ = K.lrn_forward(xp, x, n, alpha, beta, k, "WITHIN_CHANNEL")
    np.testing.assert_allclose(y, lrn_within_ref(x, n, alpha, beta), rtol=1e-12)
    check_grads(lambda: K.lrn_forward(xp, x, n, alpha, beta, k, "WITHIN_CHANNEL"),
                lambda dy, c: [K.lrn_backward(xp, dy, c)], [x], rng)


# ---------------------------------------------------------------------------------------------
# Softmax

def test_softmax_and_log_softmax():
    rng = np.random.default_rng(13)
    x = rand(rng, 3, 5, 2)
    e = np.exp(x)
    ref = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(K.softmax(xp, x, 1), ref, rtol=1e-12)
    np.testing.assert_allclose(K.log_softmax(xp, x, 1), np.log(ref), rtol=1e-12)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32)
    np.testing.assert_allclose(K.softmax(xp, x, 1), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(K.log_softmax(xp, x, 1), [[-np.log(2), -np.log(2), -2000.0 - np.log(2)]],
                               rtol=1e-6)



# ---------------------------------------------------------------------------------------------
# NumPy / CuPy parity (skipped without CuPy and a CUDA device)

def _cuda():
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except cupy.cuda.runtime.CUDARuntimeError:       # no driver or no device
        return None


cupy = _cuda()
needs_cuda = pytest.mark.skipif(cupy is None, reason="needs CuPy and a CUDA device")


def assert_parity(fn, *arrays, rtol=1e-5, atol=1e-5):
    """fn(xp, *arrays) -> tuple of arrays (or None); the CuPy run must match the NumPy run."""
    expected = fn(np, *arrays)
    got = fn(cupy, *[cupy.asarray(a) for a in arrays])
    for e, g in zip(expected, got):
        assert (e is None) == (g is None)
        if e is not None:
            np.testing.assert_allclose(cupy.asnumpy(g), e, rtol=rtol, atol=atol)


@needs_cuda
@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", CONV_CASES)
def test_cupy_conv_parity(layout, x_shape, mk, stride, pad, dil, group, bias):
    x, W, b = conv_inputs(np.random.default_rng(15), x_shape, mk, group, bias)
    x, W, b = x.astype(np.float32), W.astype(np.float32), b if b is None else b.astype(np.float32)

    def run(xp, x, W, *b):
        y, cache = K.conv2d_forward(xp, x, W, b[0] if b else None, stride, pad, dil, group)
        return (y,) + K.conv2d_backward(xp, xp.sin(y), cache, W)
    assert_parity(run, x, W, *([b] if bias else []))


@needs_cuda
@pytest.mark.parametrize("x_shape,mk,stride,pad,dil,group,bias", DECONV_CASES)
def test_cupy_deconv_parity(layout, x_shape, mk, stride, pad, dil, group, bias):
    x, W, b = deconv_inputs(np.random.default_rng(16), x_shape, mk, group, bias)

    def run(xp, x, W, *b):
        y, cache = K.deconv2d_forward(xp, x, W, b[0] if b else None, stride, pad, dil, group)
        return (y,) + K.deconv2d_backward(xp, xp.sin(y), cache, W)
    assert_parity(run, x, W, *([b] if bias else []))


@needs_cuda
@pytest.mark.parametrize("mode", ["max", "ave"])
@pytest.mark.parametrize("x_shape,k,s,p,ceil",
                         POOL_CASES + [((2, 3, 4, 5), (4, 5), (1, 1), (0, 0), True)])
def test_cupy_pool_parity(mode, x_shape, k, s, p, ceil):
    x = np.maximum(np.random.default_rng(17).integers(-2, 3, x_shape), 0).astype(np.float32)

    def run(xp, x):
        y, cache = K.pool2d_forward(xp, x, mode, *k, *s, *p, ceil=ceil)
        mask = K.pool2d_mask(xp, cache) if mode == "max" else None
        return y, K.pool2d_backward(xp, xp.cos(y), cache), mask
    assert_parity(run, x)


@needs_cuda
@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_cupy_lrn_and_softmax_parity(region):
    x = np.random.default_rng(18).standard_normal((2, 7, 5, 6)).astype(np.float32)

    def run(xp, x):
        y, cache = K.lrn_forward(xp, x, 5, 0.5, 0.75, 2.0, region)
        return y, K.lrn_backward(xp, xp.cos(y), cache), K.softmax(xp, x, 1), K.log_softmax(xp, x, 1)
    assert_parity(run, x)
