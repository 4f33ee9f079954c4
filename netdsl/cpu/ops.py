"""Compiled CPU ops: drop-in replacements for a layer's forward/backward (same signatures) that
run netdsl/cpu/kernels.py over buffers allocated once, when the plan is lowered (program.py).
A layer names its op with the class attribute `cpu_op`; `reason(layer)` says why an instance of
that type falls back to NumPy (None: it runs compiled)."""
from __future__ import annotations

import math

import numpy as np

from . import direct as D
from . import kernels as K
from . import maxpool
from .blas import gemm


class Op:
    """One step's compiled forward/backward. `lw` (program.Lowering) hands out its buffers."""

    def __init__(self, lw, i: int, step):
        self.layer, self.step = step.layer, step

    @staticmethod
    def reason(layer) -> str | None:
        return None


def _conv_shapes(lw, step):
    """A Convolution step's geometry ((kh, kw), (sh, sw), (ph, pw), (dh, dw)), its bottom's shape
    (N, C, H, W) and its top's (N, M, OH, OW)."""
    return step.layer.geometry(), lw.shape(step.node.bottoms[0]), lw.shape(step.node.tops[0])


class ConvOp(Op):
    """Convolution in NumPy's column layout for its size (kernels.conv_geom): compiled im2col,
    the GEMM (OpenBLAS), the epilogue with the bias and a fused ReLU; backward the rows of dy
    with the bias gradient in the same pass, dW and the column gradient by GEMM (the columns'
    buffer reused for it), then compiled col2im."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        from ..kernels import conv_geom
        L, node = self.layer, step.node
        ((kh, kw), (sh, sw), (ph, pw), (dh, dw)), (N, C, H, W), (_, M, OH, OW) = _conv_shapes(lw, step)
        g = conv_geom(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
        self.batched = g.layout == "batched"
        self.geom = (kh, kw, sh, sw, ph, pw, dh, dw, OH, OW)
        k, P = C * kh * kw, OH * OW
        # batched: a ones row after the columns carries the bias through the GEMM (as NumPy's)
        self.cols = lw.scratch((N, k + 1, P) if self.batched else (k, P * N))
        self.dcols = lw.scratch((N, k, P)) if self.batched and step.propagate and step.propagate[0] else None
        if self.batched:
            self.cols[:, k] = 1
            self.W1 = lw.scratch((M, k + 1))
        self.rows = None if self.batched else lw.scratch((M, P * N))
        self.nblock = K.batch_block(N, M * P * lw.dtype.itemsize)
        self.relu, slope, out = lw.fused_relu(i)
        self.slope = lw.dtype.type(slope)
        self.y = lw.value(out, (N, M, OH, OW))
        self.dx = lw.grad(node.bottoms[0], (N, C, H, W)) if step.propagate and step.propagate[0] else None
        self.dW = lw.scratch((M, k))
        # dW transposed (the faster GEMM): per image, with db as its last row, when batched
        self.dWt = lw.scratch((N, k + 1, M) if self.batched else (k, M))
        self.dWsum = lw.scratch((k + 1, M)) if self.batched and N > 1 else None
        self.bias = L.p.bias_term
        self.db = lw.scratch((M,) if self.bias else (0,))   # empty: no bias

    @staticmethod
    def reason(layer):
        return "group > 1" if layer.p.group != 1 else None

    def forward(self, xp, bottoms, params):
        x = np.ascontiguousarray(bottoms[0])
        W = params[0].reshape(params[0].shape[0], -1)
        b = params[1] if self.bias else self.db
        y3 = self.y.reshape(self.y.shape[0], self.y.shape[1], -1)
        if self.batched:
            K.im2col_batched(x, self.cols, *self.geom)
            self.W1[:, :-1] = W
            self.W1[:, -1] = b if self.bias else 0
            gemm(self.W1, self.cols, y3)
            if self.relu:
                K.bias_act_nmp(y3, self.db[:0], self.relu, self.slope)
        else:
            K.im2col_gemm(x, self.cols, *self.geom)
            gemm(W, self.cols, self.rows)
            K.gemm_epilogue(self.rows, b, y3, self.relu, self.slope, self.nblock)
        return [self.y], None

    def backward(self, xp, saved, dtops, params, need):
        dy = np.ascontiguousarray(dtops[0])
        dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
        W = params[0].reshape(params[0].shape[0], -1)
        dx = self.dx if need[0] else None
        if self.batched:
            gemm(self.cols, dy3, self.dWt, tb=True)                 # 1.6x faster than dy3 @ cols^T
            acc = self.dWt[0] if self.dWsum is None else np.sum(self.dWt, axis=0, out=self.dWsum)
            self.dW[...] = acc[:-1].T
            if self.bias:
                self.db[...] = acc[-1]
            if dx is not None:
                gemm(W, dy3, self.dcols, ta=True)
                K.col2im_batched(self.dcols, dx, *self.geom)
        else:
            K.gemm_rows(dy3, self.rows, self.db, self.nblock)
            gemm(self.cols, self.rows, self.dWt, tb=True)           # 1.6x faster than rows @ cols.T
            self.dW[...] = self.dWt.T
            if dx is not None:
                gemm(W, self.rows, self.cols, ta=True)
                K.col2im_gemm(self.cols, dx, *self.geom)
        return [dx], [self.dW.reshape(params[0].shape)] + ([self.db] if self.bias else [])


class DirectConvOp(Op):
    """Convolution without im2col (direct.py): the input padded into a buffer of its own, then
    compiled tiles with the bias and a fused ReLU; backward dW from dy as pixel rows, dx as the
    forward convolution of dy (padded) with the weights flipped, or with a stride, by GEMM and
    col2im as ConvOp's."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        from numba import get_num_threads
        L, node = self.layer, step.node
        ((kh, kw), (sh, sw), (ph, pw), (dh, dw)), (N, C, H, W), (_, M, OH, OW) = _conv_shapes(lw, step)
        dt, self.pad = lw.dtype, (ph, pw)
        self.relu, slope, out = lw.fused_relu(i)
        self.slope = float(slope)
        self.y = lw.value(out, (N, M, OH, OW))
        HP, WP = H + 2 * ph, W + 2 * pw
        self.xpad = lw.scratch((N, C, HP, WP)) if ph or pw else None
        self.bias = L.p.bias_term
        self.fwd = D.Planes(lw.scratch, dt, C, kh, kw, ph, sh, sw, dh, dw, HP, WP, M, OH, OW, self.bias, self.relu)
        self.wt = lw.scratch((kh, C, kw, self.fwd.Mp))          # taps (ky, c, kx) by output channel
        self.b = lw.scratch((self.fwd.Mp,))
        if not step.need_backward:                              # a test net's step: forward only
            return
        self.dx = lw.grad(node.bottoms[0], (N, C, H, W)) if step.propagate and step.propagate[0] else None
        self.strided = (sh, sw) != (1, 1)
        if self.dx is not None and self.strided:
            self.geom = (kh, kw, sh, sw, ph, pw, dh, dw, OH, OW)
            self.dcols = lw.scratch((N, C * kh * kw, OH * OW))
        elif self.dx is not None:
            self.q = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
            HQ, WQ = OH + 2 * self.q[0], OW + 2 * self.q[1]
            self.dyp = lw.scratch((N, M, HQ, WQ))
            self.bwd = D.Planes(lw.scratch, dt, M, kh, kw, self.q[0], 1, 1, dh, dw, HQ, WQ, C, H, W, False, False)
            self.wf = lw.scratch((kh, M, kw, self.bwd.Mp))      # flipped taps (ky, o, kx) by input channel
        self.grad = D.Rows(lw.scratch, dt, N, C, kh, kw, ph, sh, sw, dh, dw, HP, WP, M, OH, OW, get_num_threads())
        self.dWt = lw.scratch((self.grad.G, C * kh * kw, self.grad.Mp))
        self.dWsum = lw.scratch(self.dWt.shape[1:]) if self.grad.G > 1 else self.dWt[0]
        self.dW = lw.scratch((M, C * kh * kw))
        self.db = lw.scratch((M,) if self.bias else (0,))   # empty: no bias
        self.dbs = lw.scratch((N, M) if self.bias else (N, 0))

    def forward(self, xp, bottoms, params):
        x = np.ascontiguousarray(bottoms[0], dtype=self.y.dtype)     # a data layer's float32 in a float64 net
        if self.xpad is not None:
            D.pad_into(x, self.xpad, *self.pad)
            x = self.xpad
        M = params[0].shape[0]
        self.wt[..., :M] = params[0].transpose(2, 1, 3, 0)
        if self.bias:
            self.b[:M] = params[1]
        self.fwd(x, self.wt.reshape(-1, self.wt.shape[-1]), self.y, self.b, self.slope)
        return [self.y], x

    def backward(self, xp, x, dtops, params, need):
        dy = np.ascontiguousarray(dtops[0], dtype=self.y.dtype)
        M = dy.shape[1]
        self.grad(x, dy.reshape(dy.shape[0], M, -1), self.dWt, self.dbs)
        if self.bias:
            np.sum(self.dbs, axis=0, out=self.db)
        acc = self.dWt[0] if self.grad.G == 1 else np.sum(self.dWt, axis=0, out=self.dWsum)
        self.dW[...] = acc[:, :M].T
        dx, W = None, params[0]
        if need[0] and self.dx is not None and self.strided:
            gemm(W.reshape(M, -1), dy.reshape(dy.shape[0], M, -1), self.dcols, ta=True)
            K.col2im_batched(self.dcols, self.dx, *self.geom)
            dx = self.dx
        elif need[0] and self.dx is not None:
            D.pad_into(dy, self.dyp, *self.q)
            self.wf[..., :W.shape[1]] = W[:, :, ::-1, ::-1].transpose(2, 0, 3, 1)
            self.bwd(self.dyp, self.wf.reshape(-1, self.wf.shape[-1]), self.dx, self.b, 0.0)
            dx = self.dx
        return [dx], [self.dW.reshape(params[0].shape)] + ([self.db] if self.bias else [])


DIRECT = True       # off: every convolution runs im2col + GEMM (tests and benchmarks compare the two)


def conv_op(lw, i, step):
    """The compiled op for a Convolution: direct where its shape wins (direct.fits), im2col otherwise."""
    ((kh, kw), (sh, sw), (ph, pw), (dh, dw)), (_, C, H, W), (_, M, OH, OW) = _conv_shapes(lw, step)
    dx = bool(step.need_backward and step.propagate and step.propagate[0])
    direct = DIRECT and D.fits(kh, kw, sh, sw, ph, pw, dh, dw, C, H, W, M, OH, OW, dx) is None
    return (DirectConvOp if direct else ConvOp)(lw, i, step)


conv_op.reason = ConvOp.reason


class InnerProductOp(Op):
    """InnerProduct: the GEMM, then bias (and a fused ReLU) in one pass; backward three GEMMs'
    worth of NumPy dot into preallocated outputs and a compiled column sum for the bias."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        L, node = self.layer, step.node
        xs = lw.shape(node.bottoms[0])
        axis = L.p.axis % len(xs)
        self.B, self.K, M = math.prod(xs[:axis]), math.prod(xs[axis:]), L.p.num_output
        self.relu, slope, out = lw.fused_relu(i)
        self.slope = lw.dtype.type(slope)
        self.y = lw.value(out, lw.shape(node.tops[0]))
        self.dx = lw.grad(node.bottoms[0], xs) if step.propagate and step.propagate[0] else None
        self.dW = lw.scratch(lw.param_shape(i, 0))
        self.bias = L.p.bias_term
        self.db = lw.scratch((M,) if self.bias else (0,))   # empty: no bias
        self.t = L.p.transpose

    def forward(self, xp, bottoms, params):
        x2 = np.ascontiguousarray(bottoms[0]).reshape(self.B, self.K)
        y2 = self.y.reshape(self.B, -1)
        gemm(x2, params[0], y2, tb=not self.t)
        if self.bias or self.relu:
            K.bias_act(y2, params[1] if self.bias else self.db, self.relu, self.slope)
        return [self.y], x2

    def backward(self, xp, x2, dtops, params, need):
        dy = np.ascontiguousarray(dtops[0]).reshape(self.B, -1)
        W = params[0]
        if self.t:
            gemm(x2, dy, self.dW, ta=True)
        else:
            gemm(dy, x2, self.dW, ta=True)
        if self.bias:
            K.column_sums(dy, self.db)
        dx = None
        if need[0] and self.dx is not None:
            gemm(dy, W, self.dx.reshape(self.B, self.K), tb=self.t)
            dx = self.dx
        return [dx], [self.dW] + ([self.db] if self.bias else [])


class ReLUOp(Op):
    """ReLU, or nothing in forward when the GEMM before it applied it (lowering fused them)."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        node = step.node
        self.fused = lw.is_fused(i)
        self.slope = lw.dtype.type(self.layer.p.negative_slope)
        shape = lw.shape(node.tops[0])
        self.y = None if self.fused else lw.value(node.tops[0], shape)
        self.dx = lw.grad(node.bottoms[0], shape) if step.propagate and step.propagate[0] else None

    @staticmethod
    def reason(layer):
        return "negative_slope < 0" if layer.p.negative_slope < 0 else None

    def forward(self, xp, bottoms, params):
        if self.fused:
            return [bottoms[0]], bottoms[0]
        K.relu_forward(np.ascontiguousarray(bottoms[0]).reshape(-1), self.y.reshape(-1), self.slope)
        return [self.y], self.y

    def backward(self, xp, y, dtops, params, need):
        if not need[0] or self.dx is None:
            return [None], []
        K.relu_backward(np.ascontiguousarray(dtops[0]).reshape(-1), y.reshape(-1), self.dx.reshape(-1), self.slope)
        return [self.dx], []


class PoolingOp(Op):
    """MAX (Caffe's first-max ties, the argmax kept for backward; 2x2 windows by pairs of rows,
    others a row's outputs a vector at a time) and AVE pooling, any window."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        L, node = self.layer, step.node
        xs = lw.shape(node.bottoms[0])
        (kh, kw), (sh, sw), (ph, pw) = L.geometry(xs)
        self.geom = (kh, kw, sh, sw, ph, pw)
        self.max = L.p.pool == "MAX"
        self.pairs = self.max and self.geom == (2, 2, 2, 2, 0, 0) and xs[2] % 2 == 0 and xs[3] % 2 == 0
        ys = lw.shape(node.tops[0])
        # MAX pooling by vectors of a row's outputs (maxpool.py), where LLVM compiles it and a row
        # fills half a vector or more (global pooling's one output a row runs faster one by one)
        self.rows = None
        if self.max and not self.pairs and maxpool.UNAVAILABLE is None and 2 * ys[3] >= maxpool.lanes(lw.dtype):
            self.rows = maxpool.MaxPool(lw.dtype, kh, kw, sh, sw, ph, pw, xs[2], xs[3])
        self.y = lw.value(node.tops[0], ys)
        self.arg = np.empty(ys, np.int32) if self.max else None
        self.dx = lw.grad(node.bottoms[0], xs) if step.propagate and step.propagate[0] else None

    @staticmethod
    def reason(layer):
        if len(layer.spec.tops) != 1:
            return "the mask top"
        return None if layer.p.pool in ("MAX", "AVE") else f"{layer.p.pool} pooling"

    def forward(self, xp, bottoms, params):
        x, y = _planes(np.ascontiguousarray(bottoms[0], dtype=self.y.dtype)), _planes(self.y)   # a data layer's float32
        if self.pairs:
            K.max_pool_2x2(x, y, _planes(self.arg))
        elif self.rows is not None:
            self.rows(x, y, _planes(self.arg))
        elif self.max:
            K.max_pool_forward(x, y, _planes(self.arg), *self.geom)
        else:
            K.ave_pool(x, y, *self.geom, False)
        return [self.y], None

    def backward(self, xp, saved, dtops, params, need):
        if not need[0] or self.dx is None:
            return [None], []
        dy = np.ascontiguousarray(dtops[0])
        if self.max:
            K.max_pool_backward(_planes(dy, flat=True), _planes(self.arg, flat=True), _planes(self.dx, flat=True))
        else:
            K.ave_pool(_planes(self.dx), _planes(dy), *self.geom, True)
        return [self.dx], []


def _planes(a, flat=False):
    """NCHW as (N*C, H, W) planes, or (N*C, H*W)."""
    return a.reshape((a.shape[0] * a.shape[1],) + ((-1,) if flat else a.shape[2:]))


class SoftmaxLossOp(Op):
    """SoftmaxWithLoss: softmax, the loss and (in backward) the gradient, labels checked as the
    NumPy layer checks them."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        L, node = self.layer, step.node
        xs = lw.shape(node.bottoms[0])
        ax = L.p.axis % len(xs)
        self.shape3 = (math.prod(xs[:ax]), xs[ax], math.prod(xs[ax + 1:]))
        self.prob = lw.value(node.tops[1], xs) if len(node.tops) == 2 else lw.scratch(xs)
        self.loss = lw.scratch(())                   # the net's output: never in the shared arena
        self.dx = lw.grad(node.bottoms[0], xs) if step.propagate and step.propagate[0] else None
        ignore = L.p.ignore_label
        self.ignore = (int(ignore) if ignore is not None else 0, ignore is not None)

    def forward(self, xp, bottoms, params):
        from ..layers.loss import FLT_MIN, class_labels, normalization, normalizer
        x, labels = bottoms
        outer, C, inner = self.shape3
        lab = class_labels(np, self.layer, labels, C).astype(np.int64)
        total, valid = K.softmax_loss_forward(np.ascontiguousarray(x).reshape(self.shape3), lab,
                                              self.prob.reshape(self.shape3), *self.ignore, FLT_MIN)
        norm = normalizer(normalization(self.layer.p, "VALID"), outer, inner, valid)
        self.loss[...] = total / norm
        tops = [self.loss] + ([self.prob] if len(self.step.node.tops) == 2 else [])
        return tops, (lab, norm)

    def backward(self, xp, saved, dtops, params, need):
        if not need[0] or self.dx is None:
            return [None, None], []
        lab, norm = saved
        K.softmax_loss_backward(self.prob.reshape(self.shape3), lab, self.dx.reshape(self.shape3), *self.ignore,
                                float(dtops[0]) / norm)
        return [self.dx, None], []


class SmoothL1LossOp(Op):
    """caffe-fast-rcnn's SmoothL1Loss: the loss in one pass that keeps each element's gradient
    factor, the predictions' and targets' gradients from it in backward."""

    def __init__(self, lw, i, step):
        super().__init__(lw, i, step)
        node, prop = step.node, step.propagate or ()
        xs = lw.shape(node.bottoms[0])
        self.n = xs[0]
        self.loss = lw.scratch(())                   # the net's output: never in the shared arena
        self.g = lw.scratch((math.prod(xs),))
        self.dx = lw.grad(node.bottoms[0], xs) if prop and prop[0] else None
        self.dt = lw.grad(node.bottoms[1], lw.shape(node.bottoms[1])) if len(prop) > 1 and prop[1] else None
        self.s2 = float(self.layer.p.sigma) ** 2

    def forward(self, xp, bottoms, params):
        flat = [np.ascontiguousarray(b).reshape(-1) for b in bottoms]
        weights = flat[2:] if len(flat) == 4 else [self.g[:0]] * 2
        self.loss[...] = K.smooth_l1_forward(flat[0], flat[1], *weights, self.g, self.s2) / self.n
        return [self.loss], None

    def backward(self, xp, saved, dtops, params, need):
        scale = self.g.dtype.type(float(dtops[0]) / self.n)
        grads = [None] * len(need)
        for k, buf, sign in ((0, self.dx, 1), (1, self.dt, -1)):
            if need[k] and buf is not None:
                K.scaled(self.g, sign * scale, buf.reshape(-1))
                grads[k] = buf
        return grads, []


OPS = {"conv": conv_op, "inner_product": InnerProductOp, "relu": ReLUOp, "pooling": PoolingOp,
       "softmax_loss": SoftmaxLossOp, "smooth_l1_loss": SmoothL1LossOp}
