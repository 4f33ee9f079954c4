"""Layers: Convolution, Deconvolution and Pooling (shape rules, forward, backward)."""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..gpu.program import Ref, Unsupported
from ..registry import FILLER, F, Layer, Msg, ShapeError, fmt, register, spatial

CONV = Msg("ConvolutionParameter", {
    # required by Convolution and Deconvolution (their validate), not by Im2col, which shares the message
    "num_output": F(int, None, doc="the number of filters = the output depth", example="64"),
    "bias_term": F(bool, True),
    "pad": F(int, repeated=True), "kernel_size": F(int, repeated=True), "stride": F(int, repeated=True),
    "dilation": F(int, repeated=True),
    "pad_h": F(int, None), "pad_w": F(int, None), "kernel_h": F(int, None), "kernel_w": F(int, None),
    "stride_h": F(int, None), "stride_w": F(int, None),
    "group": F(int, 1), "weight_filler": F(FILLER), "bias_filler": F(FILLER), "axis": F(int, 1),
    "force_nd_im2col": F(bool, False),
    "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN")),
    # netdsl extension: pin each filter's depth (= input depth / group) so the checker verifies it
    "filter_depth": F(int, None),
})


class _ConvBase(Layer):
    messages = {"convolution_param": CONV}
    filter_depth_axis = 1
    sets_size = True
    kernel_forward = staticmethod(kernels.conv2d_forward)      # Deconvolution swaps in its pair
    kernel_backward = staticmethod(kernels.conv2d_backward)

    def forward(self, xp, bottoms, params):
        _, st, pad, dil = self.geometry()
        y, cache = self.kernel_forward(xp, bottoms[0], params[0], params[1] if self.p.bias_term else None,
                                       st, pad, dil, self.p.group)
        return [y], cache

    def backward(self, xp, cache, dtops, params, need):
        dx, dw, db = self.kernel_backward(xp, dtops[0], cache, params[0], need[0])
        return [dx], [dw] + ([db] if self.p.bias_term else [])

    def geometry(self):
        p = self.p
        kh, kw = spatial(p, "kernel_size", None, "kernel_h", "kernel_w")
        return (kh, kw), spatial(p, "stride", 1), spatial(p, "pad", 0), spatial(p, "dilation", 1)

    def validate(self):
        p, errs = self.p, []
        if p.num_output is None:
            return [ShapeError("E0106", f"layer '{self.name}': missing required field `num_output` in convolution_param",
                               field="convolution_param", help="add `num_output: 64` (the number of filters = the output depth)")]
        (kh, kw), st, pad, dil = self.geometry()
        if kh is None or kw is None:
            errs.append(ShapeError("E0106", f"{self.type} '{self.name}' has no kernel size", field=None,
                                   help="add `kernel_size: 3` (or kernel_h and kernel_w) to convolution_param"))
        for name, v in (("num_output", p.num_output), ("kernel_size", kh), ("kernel_size", kw),
                        ("stride", st[0]), ("stride", st[1]), ("dilation", dil[0]), ("dilation", dil[1]),
                        ("group", p.group)):
            if v is not None and v <= 0:
                errs.append(ShapeError("E0107", f"{self.type} '{self.name}': `{name}` must be positive, got {v}",
                                       field=name, help=f"set `{name}` to 1 or more"))
        for name, v in (("pad", pad[0]), ("pad", pad[1])):
            if v < 0:
                errs.append(ShapeError("E0107", f"{self.type} '{self.name}': `pad` must be >= 0, got {v}",
                                       field="pad", help="set `pad: 0` or more"))
        for name in ("kernel_size", "stride", "pad", "dilation"):
            if len(getattr(p, name)) > 2:
                errs.append(ShapeError("E0108", f"{self.type} '{self.name}': `{name}` is given "
                                       f"{len(getattr(p, name))} times; netdsl convolves 2-D maps",
                                       field=name, help=f"give `{name}` once (square) or twice (h, w)"))
        if p.axis != 1:
            errs.append(ShapeError("E0108", f"{self.type} '{self.name}': only axis 1 (NCHW) is supported",
                                   field="axis", help="remove `axis`"))
        if p.num_output and p.group > 0 and p.num_output % p.group:
            errs.append(ShapeError("E0303", f"{self.type} '{self.name}': num_output {p.num_output} is not "
                                   f"divisible by group {p.group}", field="num_output",
                                   help=f"make num_output a multiple of {p.group}, e.g. "
                                        f"{math.ceil(p.num_output / p.group) * p.group}"))
        return errs

    def fillers(self):
        return [self.p.weight_filler] + ([self.p.bias_filler] if self.p.bias_term else [])

    # -- ONNX (onnx_export.py): Conv / ConvTranspose; Caffe's filter layouts are ONNX's ------------
    onnx_op = "Conv"

    def to_onnx(self, ex, step):
        (kh, kw), st, (ph, pw), dil = self.geometry()
        w, *b = ex.params(step)
        attrs = dict(kernel_shape=[kh, kw], strides=list(st), pads=[ph, pw, ph, pw], dilations=list(dil), group=self.p.group)
        if self.onnx_op == "ConvTranspose":     # output_padding makes up any difference from Caffe's size
            n, o = ex.in_shape(step)[2:], ex.out_shape(step)[2:]
            extra = [o[i] - kernels.deconv_out_size(n[i], (kh, kw)[i], st[i], (ph, pw)[i], dil[i]) for i in (0, 1)]
            if any(extra):
                attrs["output_padding"] = extra
        ex.add_node(self.onnx_op, ex.bottoms(step) + [ex.const("W", w)] + [ex.const("b", v) for v in b], ex.tops(step),
                    **attrs)

    def _check_input(self, x):
        if len(x) != 4:
            raise ShapeError("E0221", f"{self.type} '{self.name}' needs a 4-D N x C x H x W input, "
                             f"got {len(x)}-D {fmt(x)}", involves=(0,),
                             help="reshape the input to 4-D, or use InnerProduct for flat vectors")
        c, g = x[1], self.p.group
        if c is not None and c % g:
            m = self.p.num_output or c
            ok = max(d for d in range(1, g + 1) if c % d == 0 and m % d == 0)
            raise ShapeError("E0302", f"{self.type} '{self.name}': input depth {c} is not divisible by "
                             f"group {g}", field="group", involves=(0,),
                             notes=[f"group {g} splits the input's {c} channels and the {m} filters into {g} groups"],
                             help=f"use `group: {ok}` (it divides both the input depth {c} and num_output {m}), "
                                  f"or make the input depth a multiple of {g}")
        fd = self.p.filter_depth
        if fd is not None and c is not None and fd != c // g:
            raise ShapeError("E0301", f"{self.type} '{self.name}' filter depth {fd} does not match input "
                             f"depth {c}" + (f" / group {g} = {c // g}" if g > 1 else ""), field="filter_depth",
                             involves=(0,),
                             help=f"a filter spans the full depth of its input{' group' if g > 1 else ''}; "
                                  f"remove filter_depth or set it to {c // g}")


@register
class Convolution(_ConvBase):
    type = "Convolution"
    v1 = (4, "CONVOLUTION")
    gemm_epilogue = True
    cpu_op = "conv"

    def shape(self, bottoms):
        x = bottoms[0]
        self._check_input(x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry()
        out = []
        for axis, n, k, s, p, d in (("height", x[2], kh, sh, ph, dh), ("width", x[3], kw, sw, pw, dw)):
            if n is None:
                out.append(None)
                continue
            o = kernels.conv_out_size(n, k, s, p, d)
            if o <= 0:
                ext = d * (k - 1) + 1
                raise ShapeError("E0401", f"Convolution '{self.name}' output {axis} is {o}: the "
                                 f"{'dilated ' if d > 1 else ''}kernel ({ext}) is larger than the padded input "
                                 f"({n} + 2*{p} = {n + 2 * p})", field="kernel_size", involves=(0,),
                                 notes=[f"out = floor((in + 2*pad - (dilation*(k-1)+1)) / stride) + 1 "
                                        f"= floor(({n} + 2*{p} - {ext}) / {s}) + 1 = {o}"],
                                 help=f"use a kernel of at most {n + 2 * p}, add padding "
                                      f"(pad: {math.ceil((ext - n) / 2)}), or remove a downsampling layer before it")
            out.append(o)
        return [(x[0], self.p.num_output, out[0], out[1])]

    def param_shapes(self, bottoms):
        (kh, kw), _, _, _ = self.geometry()
        m, g, c = self.p.num_output, self.p.group, bottoms[0][1]
        return [(m, None if c is None else c // g, kh, kw)] + ([(m,)] if self.p.bias_term else [])

    def macs(self, bottoms, tops):
        (n, c, _, _), (_, m, oh, ow) = bottoms[0], tops[0]
        (kh, kw), _, _, _ = self.geometry()
        return n * m * oh * ow * (c // self.p.group) * kh * kw

    def onnx_fold(self, params, mul, add):
        """--fold-batchnorm: y' = mul * y + add per output channel, folded into the filters and bias."""
        b = params[1] if len(params) > 1 else 0.0
        return [params[0] * mul.reshape(-1, 1, 1, 1), b * mul + add]

    def explain_weights(self, i, have, want):
        g = self.p.group
        if i != 0 or len(have) != 4 or have[1] == want[1]:
            return None
        return ShapeError("E0301", f"Convolution '{self.name}': the loaded filters have depth {have[1]} but the input "
                          f"depth is {want[1] * g}" + (f" / group {g}" if g > 1 else ""),
                          help=f"the weights were trained on a {have[1] * g}-deep input: restore that "
                               "input, or rename the layer to learn it from scratch")



    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def lower_check(self, lw, step):
        if self.p.group != 1:
            raise Unsupported(f"Convolution '{self.name}' has group {self.p.group} (graph mode: group 1)")

    def lower_forward(self, lw, i, s):
        g, M = _gpu_geometry(lw, s)
        L, x = s.layer, s.node.bottoms[0]
        K, P, N = g["C"] * g["KH"] * g["KW"], g["OH"] * g["OW"], g["N"]
        if (g["KH"], g["KW"], g["SH"], g["SW"], g["PH"], g["PW"]) == (1, 1, 1, 1, 0, 0):
            col = lw.val(x)                 # a 1x1 convolution's columns are its input
        else:
            col = lw.tensor(f"col:{L.name}", N * K * P)
            lw.emit("im2col", f"{L.name}_im2col", g, [lw.val(x), col], lw.blocks(N * K * P))
        lw.saved_col[i] = col
        keys = [lw.plan.params[j].key for j in s.params]
        act, slope = lw.activation(i)
        y = lw.output(i, s)
        lw.gemm(f"{L.name}_fwd", A=lw.param("params", keys[0]), B=col, C=y, M=M, N=P, K=K, batch=N,
                LDA=K, LDB=P, LDC=P, SB=K * P, SC=M * P,
                bias=lw.param("params", keys[1]) if len(keys) > 1 else None, bias_mode=1, act=act, slope=slope)

    def lower_backward(self, lw, i, s):
        y = s.node.tops[0]
        if y not in lw.grad:
            return
        g, M = _gpu_geometry(lw, s)
        L, x = s.layer, s.node.bottoms[0]
        K, P, N = g["C"] * g["KH"] * g["KW"], g["OH"] * g["OW"], g["N"]
        dy, col = Ref("arena", lw.grad[y]), lw.saved_col[i]
        keys = [lw.plan.params[j].key for j in s.params]
        fuse_b = len(keys) > 1 and lw.learnable(keys[1]) and lw.learnable(keys[0]) and \
            (keys[0] in lw.pgrads) == (keys[1] in lw.pgrads)
        if lw.learnable(keys[0]):
            acc = lw.pgrad_acc(keys[0])
            bias = lw.param("grads", keys[1]) if fuse_b else None
            if fuse_b:
                lw.pgrad_acc(keys[1])
            lw.gemm(f"{L.name}_dW", A=dy, B=col, C=lw.param("grads", keys[0]), M=M, N=K, K=P, R=N,
                    LDA=P, RA=M * P, TB=1, LDB=P, RB=K * P, LDC=K, beta=acc, bias=bias, bias_mode=3)
        if len(keys) > 1 and lw.learnable(keys[1]) and not fuse_b:
            lw.emit("bias_grad", f"{L.name}_db", dict(N=N, M=M, P=P, ACC=int(lw.pgrad_acc(keys[1]))),
                    [dy, lw.param("grads", keys[1])], (M, 1, 1), (256, 1, 1))
        if s.propagate and s.propagate[0]:
            dx, acc = lw.grad_out(x)
            w = lw.param("params", keys[0])
            if col == lw.val(x):            # 1x1: the column gradient is the image gradient
                lw.gemm(f"{L.name}_dx", A=w, B=dy, C=dx, M=K, N=P, K=M, batch=N, TA=1, LDA=K, LDB=P, SB=M * P,
                        LDC=P, SC=K * P, beta=acc)
            else:
                dcol = lw.tensor(f"dcol:{L.name}", N * K * P)
                lw.gemm(f"{L.name}_dcol", A=w, B=dy, C=dcol, M=K, N=P, K=M, batch=N, TA=1, LDA=K, LDB=P,
                        SB=M * P, LDC=P, SC=K * P)
                lw.emit("col2im", f"{L.name}_col2im", {**g, "ACC": int(acc)}, [dcol, dx], lw.blocks(N * g["C"] * g["H"] * g["W"]))


def _gpu_geometry(lw, s):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.layer.geometry()
    N, C, H, W = lw.shape(s.node.bottoms[0])
    _, M, OH, OW = lw.shape(s.node.tops[0])
    return dict(N=N, C=C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, OH=OH, OW=OW), M


@register
class Deconvolution(_ConvBase):
    type = "Deconvolution"
    v1 = (39, "DECONVOLUTION")
    onnx_op = "ConvTranspose"
    kernel_forward = staticmethod(kernels.deconv2d_forward)
    kernel_backward = staticmethod(kernels.deconv2d_backward)

    def shape(self, bottoms):
        x = bottoms[0]
        self._check_input(x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry()
        out = []
        for axis, n, k, s, p, d in (("height", x[2], kh, sh, ph, dh), ("width", x[3], kw, sw, pw, dw)):
            o = None if n is None else kernels.deconv_out_size(n, k, s, p, d)
            if o is not None and o <= 0:
                most = max((s * (n - 1) + d * (k - 1)) // 2, 0)
                raise ShapeError("E0401", f"Deconvolution '{self.name}' output {axis} is {o}: pad {p} crops away "
                                 f"all {o + 2 * p} pixels it makes", field="pad",
                                 involves=(0,), notes=[f"out = stride*(in-1) + dilation*(k-1)+1 - 2*pad = "
                                                       f"{s}*({n}-1) + {d * (k - 1) + 1} - 2*{p} = {o}"],
                                 help=f"use `pad: {most}`{' or less' if most else ''}, or a larger kernel or stride")
            out.append(o)
        return [(x[0], self.p.num_output, out[0], out[1])]

    def param_shapes(self, bottoms):
        (kh, kw), _, _, _ = self.geometry()
        m, g = self.p.num_output, self.p.group
        return [(bottoms[0][1], m // g, kh, kw)] + ([(m,)] if self.p.bias_term else [])

    def macs(self, bottoms, tops):
        (n, c, h, w) = bottoms[0]
        (kh, kw), _, _, _ = self.geometry()
        return n * c * h * w * (self.p.num_output // self.p.group) * kh * kw



POOL = Msg("PoolingParameter", {
    "pool": F("enum", "MAX", choices=("MAX", "AVE", "STOCHASTIC")),
    "pad": F(int, 0), "pad_h": F(int, None), "pad_w": F(int, None),
    "kernel_size": F(int, None), "kernel_h": F(int, None), "kernel_w": F(int, None),
    "stride": F(int, 1), "stride_h": F(int, None), "stride_w": F(int, None),
    "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN")),
    "global_pooling": F(bool, False),
    "round_mode": F("enum", "CEIL", choices=("CEIL", "FLOOR")),
    # DenseNet-Caffe's / PSPNet's forks: `ceil_mode: false` = `round_mode: FLOOR` (wins where both are written)
    "ceil_mode": F(bool, None),
})


@register
class Pooling(Layer):
    type = "Pooling"
    v1 = (17, "POOLING")
    messages = {"pooling_param": POOL}
    sets_size = True
    cpu_op = "pooling"
    n_tops = (1, 2)

    def ceil(self) -> bool:
        """Caffe's round_mode, or the forks' ceil_mode where written."""
        return self.p.ceil_mode if self.p.has("ceil_mode") else self.p.round_mode == "CEIL"

    def geometry(self, x=None):
        p = self.p
        if p.global_pooling:
            return (x[2], x[3]) if x else (None, None), (1, 1), (0, 0)
        return (spatial(p, "kernel_size", None, "kernel_h", "kernel_w"), spatial(p, "stride", 1), spatial(p, "pad", 0))

    def validate(self):
        p, errs = self.p, []
        if p.pool == "STOCHASTIC":
            errs.append(ShapeError("E0109", f"Pooling '{self.name}': STOCHASTIC pooling is not supported",
                                   field="pool", help="use `pool: MAX` or `pool: AVE`"))
        if len(self.spec.tops) == 2 and p.pool != "MAX":
            errs.append(ShapeError("E0202", f"Pooling '{self.name}' has 2 tops, but only MAX pooling has the "
                                   "second (mask) top", field="pool",
                                   help=f"remove the second top '{self.spec.tops[1]}', or use `pool: MAX`"))
        if p.global_pooling:
            if p.has("kernel_size") or p.has("kernel_h"):
                errs.append(ShapeError("E0108", f"Pooling '{self.name}': global_pooling takes the whole map; "
                                       "kernel_size must not be set", field="kernel_size", help="remove kernel_size"))
            return errs
        (kh, kw), (sh, sw), (ph, pw) = self.geometry()
        if kh is None or kw is None:
            errs.append(ShapeError("E0106", f"Pooling '{self.name}' has no kernel size",
                                   help="add `kernel_size: 2` to pooling_param, or `global_pooling: true`"))
            return errs
        for name, v in (("kernel_size", kh), ("kernel_size", kw), ("stride", sh), ("stride", sw)):
            if v <= 0:
                errs.append(ShapeError("E0107", f"Pooling '{self.name}': `{name}` must be positive, got {v}",
                                       field=name, help=f"set `{name}` to 1 or more"))
        if ph >= kh or pw >= kw or ph < 0 or pw < 0:
            errs.append(ShapeError("E0402", f"Pooling '{self.name}': pad {max(ph, pw)} >= kernel "
                                   f"{min(kh, kw)}, so a window can lie entirely inside the padding",
                                   field="pad", notes=["Caffe requires pad < kernel_size"],
                                   help=f"use `pad: {max(min(kh, kw) - 1, 0)}` or less, or a larger kernel"))
        return errs

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) != 4:
            raise ShapeError("E0221", f"Pooling '{self.name}' needs a 4-D N x C x H x W input, got "
                             f"{len(x)}-D {fmt(x)}", involves=(0,), help="pool a convolution's output")
        (kh, kw), (sh, sw), (ph, pw) = self.geometry(x)
        ceil = self.ceil()
        out = []
        for axis, n, k, s, p in (("height", x[2], kh, sh, ph), ("width", x[3], kw, sw, pw)):
            if n is None:
                out.append(None)
                continue
            o = kernels.pool_out_size(n, k, s, p, ceil, bool(ph or pw))
            if o <= 0:            # Caffe's arithmetic alone decides: a window may overhang a small input
                rnd = "ceil" if ceil else "floor"
                raise ShapeError("E0401", f"Pooling '{self.name}' output {axis} is {o}: the {k}-wide window "
                                 f"overhangs the padded input ({n} + 2*{p} = {n + 2 * p}) by more than a stride",
                                 field="kernel_size", involves=(0,),
                                 notes=[f"out = {rnd}((in + 2*pad - k) / stride) + 1 = {rnd}(({n} + 2*{p} - {k}) / {s}) + 1"
                                        f" = {o}"],
                                 help=f"use `kernel_size: {n + 2 * p}` or less (or `global_pooling: true`), "
                                      "or remove a downsampling layer before it")
            out.append(o)
        top = (x[0], x[1], out[0], out[1])
        return [top, top][: len(self.spec.tops)]

    def macs(self, bottoms, tops):
        n, c, oh, ow = tops[0]
        (kh, kw), _, _ = self.geometry(bottoms[0])
        return n * c * oh * ow * kh * kw

    def forward(self, xp, bottoms, params):
        (kh, kw), (sh, sw), (ph, pw) = self.geometry(bottoms[0].shape)
        y, cache = kernels.pool2d_forward(xp, bottoms[0], self.p.pool.lower(), kh, kw, sh, sw, ph, pw,
                                          ceil=self.ceil())
        if len(self.spec.tops) == 2:      # Caffe's optional mask top: flat argmax index (MAX only)
            return [y, kernels.pool2d_mask(xp, cache)], cache
        return [y], cache

    def backward(self, xp, cache, dtops, params, need):
        return [kernels.pool2d_backward(xp, dtops[0], cache)], []

    def to_onnx(self, ex, step):
        """Caffe's ceil rounding and last-window trim become explicit end pads (floor rounding); AVE
        windows that overhang in + pad (where Caffe clips the divisor) get a constant correction."""
        p, x, ins, outs = self.p, ex.in_shape(step), ex.bottoms(step), ex.tops(step)
        if len(outs) == 2 and p.global_pooling:
            raise ex.unsupported(step, "a global pooling's mask top (give kernel_size instead)")
        if p.global_pooling:
            return ex.add_node("GlobalMaxPool" if p.pool == "MAX" else "GlobalAveragePool", ins, outs)
        (kh, kw), (sh, sw), (ph, pw) = self.geometry(x)
        oh, ow = ex.out_shape(step)[2:]
        # the last window starts at (o-1)*s - pad: the end pad reaches its end (never negative)
        ends = [max((o - 1) * s + k - n - q, 0) for o, s, k, n, q in ((oh, sh, kh, x[2], ph), (ow, sw, kw, x[3], pw))]
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw] + ends)
        if p.pool == "MAX" and len(outs) == 2:   # the mask: MaxPool's ((n * C + c) * H + h) * W + w, per plane
            _, index = ex.add_node("MaxPool", ins, [outs[0], ex.tmp("indices")], **attrs)
            return ex.add_node("Cast", [ex.add_node("Mod", [index, ex.ints([x[2] * x[3]])])], outs[1], to=1)
        if p.pool == "MAX":
            return ex.add_node("MaxPool", ins, outs, **attrs)
        div = kernels._ave_divisor(np, kernels.PoolGeom(kh, kw, sh, sw, ph, pw, x[2], x[3], oh, ow), np.float64)
        ratio = kh * kw / div                   # ONNX divides by the whole window inside its pads
        exact = np.all(ratio == 1)
        y = ex.add_node("AveragePool", ins, outs if exact else None, count_include_pad=1, **attrs)
        if not exact:
            ex.add_node("Mul", [y, ex.const("divisor_ratio", ratio)], outs)

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def lower_check(self, lw, step):
        if len(step.node.tops) != 1 or self.p.pool not in ("MAX", "AVE"):
            raise Unsupported(f"Pooling '{self.name}': only MAX/AVE with one top")

    def lower_forward(self, lw, i, s):
        L, x = s.layer, s.node.bottoms[0]
        N, C, H, W = lw.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = L.geometry(lw.shape(x))
        _, _, OH, OW = lw.shape(s.node.tops[0])
        g = dict(NC=N * C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=OH, OW=OW)
        y = lw.new_value(s.node.tops[0])
        if L.p.pool == "MAX":
            mask = lw.tensor(f"mask:{L.name}", N * C * OH * OW, "i32")
            lw.emit("maxpool_fwd", f"{L.name}_fwd", g, [lw.val(x), y, mask], lw.blocks(N * C * OH * OW))
        else:
            lw.emit("avepool_fwd", f"{L.name}_fwd", g, [lw.val(x), y], lw.blocks(N * C * OH * OW))

    def lower_backward(self, lw, i, s):
        y = s.node.tops[0]
        if y not in lw.grad or not (s.propagate and s.propagate[0]):
            return
        L, x = s.layer, s.node.bottoms[0]
        N, C, H, W = lw.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = L.geometry(lw.shape(x))
        _, _, OH, OW = lw.shape(y)
        dx, acc = lw.grad_out(x)
        g = dict(NC=N * C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=OH, OW=OW, ACC=int(acc))
        dy = Ref("arena", lw.grad[y])
        if L.p.pool == "MAX":
            lw.emit("maxpool_bwd", f"{L.name}_bwd", g, [dy, Ref("arena", f"mask:{L.name}"), dx], lw.blocks(N * C * H * W))
        else:
            lw.emit("avepool_bwd", f"{L.name}_bwd", g, [dy, dx], lw.blocks(N * C * H * W))
