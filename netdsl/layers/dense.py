"""Layer: InnerProduct (fully connected), flattening the axes from `axis` on into K."""
from __future__ import annotations

import math

from ..gpu.program import Ref
from ..registry import FILLER, F, Layer, Msg, ShapeError, canonical_axis, count, fmt, register

IP = Msg("InnerProductParameter", {
    "num_output": F(int, None, required=True, doc="the number of outputs", example="10"),
    "bias_term": F(bool, True), "weight_filler": F(FILLER), "bias_filler": F(FILLER),
    "axis": F(int, 1), "transpose": F(bool, False),
    # netdsl extension: pin the input size K so the checker catches a resolution change upstream
    "input_size": F(int, None),
})


@register
class InnerProduct(Layer):
    type = "InnerProduct"
    v1 = (14, "INNER_PRODUCT")
    messages = {"inner_product_param": IP}
    gemm_epilogue = gemm_dx_mask = True
    cpu_op = "inner_product"

    def validate(self):
        if self.p.num_output is not None and self.p.num_output <= 0:
            return [ShapeError("E0107", f"InnerProduct '{self.name}': `num_output` must be positive, got "
                               f"{self.p.num_output}", field="num_output", help="set `num_output` to 1 or more")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        axis = canonical_axis(self.p.axis, len(x))
        k = count(x, axis)
        if self.p.input_size is not None and k is not None and k != self.p.input_size:
            raise ShapeError("E0311", f"InnerProduct '{self.name}' expects {self.p.input_size} inputs per "
                             f"sample but gets {k} ({fmt(x)} flattened from axis {axis})", field="input_size",
                             involves=(0,), help=f"set `input_size: {k}` (the weights must then be retrained), "
                                                 "or restore the upstream resolution")
        return [tuple(x[:axis]) + (self.p.num_output,)]

    def param_shapes(self, bottoms):
        x, m = bottoms[0], self.p.num_output
        k = count(x, canonical_axis(self.p.axis, len(x)))
        return [(k, m) if self.p.transpose else (m, k)] + ([(m,)] if self.p.bias_term else [])

    def fillers(self):
        return [self.p.weight_filler] + ([self.p.bias_filler] if self.p.bias_term else [])

    def macs(self, bottoms, tops):
        x = bottoms[0]
        axis = canonical_axis(self.p.axis, len(x))
        return count(x, 0, axis) * count(x, axis) * self.p.num_output

    def explain_weights(self, i, have, want):
        if i != 0 or have[0] != want[0]:
            return None
        return ShapeError("E0311", f"InnerProduct '{self.name}': the loaded weights expect "
                          f"{have[0 if self.p.transpose else -1]} inputs per sample but the net gives {want[1]}",
                          help="the input resolution or an upstream num_output changed since training: restore it, "
                               "or rename the layer to learn it from scratch")

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        axis = self.p.axis % x.ndim
        x2 = x.reshape(int(count(x.shape, 0, axis)), -1)
        w = params[0]
        y = x2 @ w if self.p.transpose else x2 @ w.T
        if self.p.bias_term:
            y += params[1]
        return [y.reshape(x.shape[:axis] + (self.p.num_output,))], (x2, x.shape)

    def backward(self, xp, saved, dtops, params, need):
        x2, xshape = saved
        dy = dtops[0].reshape(x2.shape[0], -1)
        w = params[0]
        dw = x2.T @ dy if self.p.transpose else dy.T @ x2
        grads = [dw] + ([dy.sum(axis=0)] if self.p.bias_term else [])
        dx = (dy @ w.T if self.p.transpose else dy @ w).reshape(xshape) if need[0] else None
        return [dx], grads

    def to_onnx(self, ex, step):
        """axis 1: Flatten + Gemm; any other axis: Reshape (..., K) + MatMul + Add."""
        axis, x = self.p.axis % len(ex.in_shape(step)), ex.bottoms(step)[0]
        w, *b = ex.params(step)
        if axis == 1:
            x = ex.add_node("Flatten", [x], axis=1) if len(ex.in_shape(step)) > 2 else x
            return ex.add_node("Gemm", [x, ex.const("W", w)] + [ex.const("b", v) for v in b], ex.tops(step),
                               transB=int(not self.p.transpose))
        flat = ex.add_node("Reshape", [x, ex.ints([0] * axis + [-1])])
        y = ex.add_node("MatMul", [flat, ex.const("W", w if self.p.transpose else w.T)], None if b else ex.tops(step))
        if b:
            ex.add_node("Add", [y, ex.const("b", b[0])], ex.tops(step))

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def lower_forward(self, lw, i, s):
        L, x = s.layer, s.node.bottoms[0]
        xs = lw.shape(x)
        axis = L.p.axis % len(xs)
        nb, k, m = math.prod(xs[:axis]), math.prod(xs[axis:]), L.p.num_output
        keys = [lw.plan.params[j].key for j in s.params]
        act, slope = lw.activation(i)
        y = lw.output(i, s)
        lw.gemm(f"{L.name}_fwd", A=lw.val(x), B=lw.param("params", keys[0]), C=y, M=nb, N=m, K=k,
                LDA=k, TB=0 if L.p.transpose else 1, LDB=m if L.p.transpose else k, LDC=m,
                bias=lw.param("params", keys[1]) if len(keys) > 1 else None, bias_mode=2, act=act, slope=slope)

    def lower_backward(self, lw, i, s):
        y = s.node.tops[0]
        if y not in lw.grad:
            return
        L, x = s.layer, s.node.bottoms[0]
        xs = lw.shape(x)
        axis = L.p.axis % len(xs)
        nb, k, m = math.prod(xs[:axis]), math.prod(xs[axis:]), L.p.num_output
        dy = Ref("arena", lw.grad[y])
        keys = [lw.plan.params[j].key for j in s.params]
        tr = bool(L.p.transpose)
        fuse_b = not tr and len(keys) > 1 and lw.learnable(keys[1]) and lw.learnable(keys[0]) and \
            (keys[0] in lw.pgrads) == (keys[1] in lw.pgrads)
        if lw.learnable(keys[0]):
            acc = lw.pgrad_acc(keys[0])
            if tr:    # W is K x M: dW = x^T dy
                lw.gemm(f"{L.name}_dW", A=lw.val(x), B=dy, C=lw.param("grads", keys[0]), M=k, N=m, K=nb,
                        TA=1, LDA=k, LDB=m, LDC=m, beta=acc)
            else:     # W is M x K: dW = dy^T x, and db = dy^T 1 as the ones column
                bias = lw.param("grads", keys[1]) if fuse_b else None
                if fuse_b:
                    lw.pgrad_acc(keys[1])
                lw.gemm(f"{L.name}_dW", A=dy, B=lw.val(x), C=lw.param("grads", keys[0]), M=m, N=k, K=nb,
                        TA=1, LDA=m, LDB=k, LDC=k, beta=acc, bias=bias, bias_mode=3)
        if len(keys) > 1 and lw.learnable(keys[1]) and not fuse_b:
            lw.emit("col_sum", f"{L.name}_db", dict(N=nb, M=m, ACC=int(lw.pgrad_acc(keys[1]))),
                    [dy, lw.param("grads", keys[1])], lw.blocks(m))
        if s.propagate and s.propagate[0]:
            r = lw.mask_into.get(i)
            act, aux, slope = 0, None, 0.0
            if r is not None:                 # apply the fused ReLU's backward here
                relu = lw.steps[r]
                dx, acc = lw.grad_out(relu.node.bottoms[0])
                act, aux, slope = 2, lw.val(relu.node.tops[0]), relu.layer.epilogue_slope()
                lw.relu_done.add(r)
            else:
                dx, acc = lw.grad_out(x)
            w = lw.param("params", keys[0])
            lw.gemm(f"{L.name}_dx", A=dy, B=w, C=dx, M=nb, N=k, K=m, LDA=m, TB=int(tr), LDB=m if tr else k, LDC=k,
                    beta=acc, act=act, aux=aux, slope=slope)
