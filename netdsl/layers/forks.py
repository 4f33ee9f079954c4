"""Layers of Caffe's segmentation and mobile forks: BN (SegNet's and PSPNet's), Upsample and
DenseImageData (SegNet),
Interp (PSPNet / DeepLab), ConvolutionDepthwise and DepthwiseConvolution (MobileNet / ShuffleNet
forks), ShuffleChannel (ShuffleNet), Axpy (SENet) and PSROIPooling (R-FCN)."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..gpu.program import Unsupported
from ..registry import FILLER, F, Layer, Msg, ShapeError, filler_record, fmt, register
from .common import _indices
from .conv import Convolution, Pooling
from .data import _FileData


def _c_round(xp, v):
    """C's round(): halves away from zero."""
    whole = xp.trunc(v)
    return whole + xp.sign(v) * (xp.abs(v - whole) >= 0.5)


def _need_4d(layer, x, what="input", k=0):
    if len(x) != 4:
        raise ShapeError("E0221", f"{layer.type} '{layer.name}' needs a 4-D N x C x H x W {what}, got {len(x)}-D {fmt(x)}",
                         involves=(k,), help="feed it a convolution's (N x C x H x W) output")


# =============================================================================================
# BN: one type name, two forks' blob layouts

@register
class BN(Layer):
    """Batch normalisation with its own affine part, as two forks define the `BN` type.

    SegNet (alexgkendall/caffe-segnet; ENet's caffe-enet too), chosen when bn_param has `bn_mode`,
    `scale_filler` or `shift_filler`: 2 blobs, scale and shift, each 1 x C x 1 x 1. `bn_mode:
    INFERENCE` is y = scale * x + shift (compute_bn_statistics.py folds the statistics into the two
    blobs); `LEARN` (the default) normalises by the batch's own statistics in every phase,
    y = scale * (x - mean) / sqrt(var + 1e-9) + shift (biased variance), with optional tops 2 and 3
    the batch mean and variance (1 x C x 1 x 1).

    PSPNet (hszhao/PSPNet, `slope_filler bias_filler momentum eps frozen`): 4 blobs, each 1 x C x 1 x 1:
    slope, bias, moving mean, moving variance. With `frozen: true` or in TEST,
    y = slope * (x - mean) / sqrt(var + eps) + bias from the moving statistics (and with frozen, no
    blob learns). Otherwise the batch statistics (biased variance) normalise and the moving ones
    become momentum * old + (1 - momentum) * batch. A frozen layer's variance blob starts at 1."""
    type = "BN"
    in_place = True
    keeps_layout = True
    n_tops = (1, 3)
    messages = {"bn_param": Msg("BNParameter", {
        # PSPNet's fork
        "slope_filler": F(FILLER), "bias_filler": F(FILLER), "momentum": F(float, 0.9), "eps": F(float, 1e-5),
        "frozen": F(bool, False), "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN")),
        # SegNet's fork
        "scale_filler": F(FILLER), "shift_filler": F(FILLER),
        "bn_mode": F("enum", "LEARN", choices=("LEARN", "INFERENCE")),
    })}
    SEGNET_EPS = 1e-9                       # SegNet's var_eps_, fixed in its LayerSetUp

    def __init__(self, spec, phase):
        super().__init__(spec, phase)
        p = self.p
        self.segnet = any(p.has(k) for k in ("bn_mode", "scale_filler", "shift_filler"))
        self.frozen_params = not self.segnet and p.frozen     # PSPNet's frozen: Caffe zeroes every lr_mult

    def batch_stats(self) -> bool:
        if self.segnet:
            return self.p.bn_mode == "LEARN"
        return not (self.p.frozen or self.phase == "TEST")

    def validate(self):
        if len(self.spec.tops) > 1 and not (self.segnet and self.p.bn_mode == "LEARN"):
            return [ShapeError("E0202", f"BN '{self.name}' has {len(self.spec.tops)} tops, but only SegNet's "
                               "`bn_mode: LEARN` has the batch mean and variance tops", field="bn_mode" if self.segnet else None,
                               help=f"remove the extra tops ({', '.join(repr(t) for t in self.spec.tops[1:])})")]
        if not self.segnet and not 0 <= self.p.momentum <= 1:
            return [ShapeError("E0107", f"BN '{self.name}': momentum must lie in [0, 1], got {self.p.momentum}",
                               field="momentum", help="use `momentum: 0.95` (PSPNet's value)")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) < 2 or len(x) > 4:
            raise ShapeError("E0221", f"BN '{self.name}' needs an N x C (x H x W) input, got {fmt(x)}", involves=(0,),
                             help="normalise a 2-D or 4-D blob")
        stat = (1, x[1], 1, 1)
        return [x] + [stat] * (len(self.spec.tops) - 1)

    def param_shapes(self, bottoms):
        stat = (1, bottoms[0][1], 1, 1)
        return [stat] * (2 if self.segnet else 4)

    def fillers(self):
        p = self.p
        if self.segnet:
            return [p.scale_filler, p.shift_filler]
        return [p.slope_filler, p.bias_filler, None, filler_record(type="constant", value=1.0) if p.frozen else None]

    def macs(self, bottoms, tops):
        return 2 * int(np.prod([d or 0 for d in bottoms[0]]))

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        axes = (0,) + tuple(range(2, x.ndim))
        bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        scale, shift = (a.reshape(bshape) for a in params[:2])
        if self.segnet and self.p.bn_mode == "INFERENCE":
            return [x * scale + shift], ("affine", x, scale, axes)
        if self.batch_stats():
            mean = x.mean(axis=axes)
            var = ((x - mean.reshape(bshape)) ** 2).mean(axis=axes)
            if not self.segnet:                      # PSPNet: the moving averages, in place
                m = self.p.momentum
                for blob, v in ((params[2], mean), (params[3], var)):
                    blob *= m
                    blob += (1 - m) * v.reshape(blob.shape)
        else:
            mean, var = params[2].reshape(-1), params[3].reshape(-1)
        eps = self.SEGNET_EPS if self.segnet else self.p.eps
        inv_std = (1.0 / xp.sqrt(var + eps)).reshape(bshape)
        xc = x - mean.reshape(bshape)
        xhat = xc * inv_std
        y = (xhat * scale + shift).astype(x.dtype, copy=False)
        extra = [a.reshape(1, -1, 1, 1).astype(x.dtype, copy=False) for a in (mean, var)][: len(self.spec.tops) - 1]
        return [y] + extra, ("norm", xhat, xc, inv_std, scale, axes)

    def _affine(self, params):
        """(mul, add) per channel where the output is an affine map of the input (SegNet's INFERENCE,
        PSPNet's moving statistics); None where the batch's own statistics normalise."""
        blobs = [np.asarray(a, np.float64).reshape(-1) for a in params]
        if self.segnet and self.p.bn_mode == "INFERENCE":
            return blobs[0], blobs[1]
        if self.batch_stats():
            return None
        inv = blobs[0] / np.sqrt(blobs[3] + self.p.eps)
        return inv, blobs[1] - blobs[2] * inv

    def onnx_affine(self, ex, step):
        """(mul, add) per channel, for --fold-batchnorm."""
        return self._affine(ex.params(step)) if len(step.node.tops) == 1 else None

    def to_onnx(self, ex, step):
        """Mul and Add per channel; SegNet's LEARN mode (the batch's statistics in every phase) as
        ReduceMean over N, H, W, its biased variance and 1e-9."""
        x, nd = ex.bottoms(step)[0], len(ex.in_shape(step))
        if len(step.node.tops) > 1:
            raise ex.unsupported(step, "the batch mean and variance tops")
        params = ex.params(step)
        affine = self._affine(params)
        if affine is None:
            axes = [0] + list(range(2, nd))
            xc = ex.add_node("Sub", [x, ex.reduce("ReduceMean", x, axes)])
            var = ex.reduce("ReduceMean", ex.add_node("Mul", [xc, xc]), axes)
            x = ex.add_node("Div", [xc, ex.add_node("Sqrt", [ex.add_node("Add", [var, ex.scalar(self.SEGNET_EPS)])])])
            affine = [np.asarray(a, np.float64).reshape(-1) for a in params[:2]]
        mul, add = affine
        ex.chain(step, x, [("Mul", [ex.along(mul, 1, nd, suffix="mul")]), ("Add", [ex.along(add, 1, nd, suffix="add")])])

    def backward(self, xp, saved, dtops, params, need):
        dy = dtops[0]
        if saved[0] == "affine":                     # SegNet INFERENCE: y = scale * x + shift
            _, x, scale, axes = saved
            shape = params[0].shape
            return [dy * scale], [(dy * x).sum(axis=axes).reshape(shape), dy.sum(axis=axes).reshape(shape)]
        _, xhat, xc, inv_std, scale, axes = saved
        shape = params[0].shape
        dscale = (dy * xhat).sum(axis=axes).reshape(shape)
        dshift = dy.sum(axis=axes).reshape(shape)
        dxhat = dy * scale
        if self.batch_stats():
            dx = (dxhat - dxhat.mean(axis=axes, keepdims=True) - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)) * inv_std
            stats = [] if self.segnet else [xp.zeros(shape, dy.dtype), xp.zeros(shape, dy.dtype)]
            return [dx], [dscale, dshift] + stats
        if self.frozen_params:                       # Caffe's frozen backward: dx = dy * slope / std
            return [dxhat * inv_std], []
        # PSPNet in TEST with learnable blobs: the gradient of the test-time function
        dmean = -(dxhat * inv_std).sum(axis=axes).reshape(shape)
        dvar = (-0.5 * dxhat * xc * inv_std ** 3).sum(axis=axes).reshape(shape)
        return [dxhat * inv_std], [dscale, dshift, dmean, dvar]


# =============================================================================================
# Upsample: SegNet's max-unpooling by a Pooling layer's mask top

@register
class Upsample(Layer):
    """SegNet's max-unpooling: each input value goes to the flat position h * W + w (within its
    channel's output plane) that the mask bottom, a MAX Pooling layer's second top, names; every
    other output is 0. The output size is upsample_h x upsample_w, or else input * scale (scale_h,
    scale_w) minus pad_out_h / pad_out_w. Backward gathers the top gradient through the mask, as
    the fork does (where two inputs name one position, forward keeps the last, backward hands both
    its gradient). The mask gets no gradient.

    With one bottom, the nearest-neighbour upsampling of the YOLOv3 ports (ChenYingpeng/caffe-yolov3's
    and eric612/MobileNet-YOLO's upsample_layer): each value fills a scale_h x scale_w block of the
    output (input * scale); backward sums each block's gradient."""
    type = "Upsample"
    n_bottoms = (1, 2)
    bottom_roles = ("the values to unpool", "the mask top of the MAX Pooling layer")
    messages = {"upsample_param": Msg("UpsampleParameter", {
        "scale": F(int, 2), "scale_h": F(int, None), "scale_w": F(int, None),
        "pad_out_h": F(bool, False), "pad_out_w": F(bool, False),
        "upsample_h": F(int, None), "upsample_w": F(int, None)})}

    def _explicit(self) -> bool:
        return self.p.upsample_h is not None and self.p.upsample_w is not None

    def _scales(self):
        p = self.p
        if p.scale_h is not None or p.scale_w is not None:
            return p.scale_h, p.scale_w
        return p.scale, p.scale

    def _nearest(self) -> bool:
        return len(self.spec.bottoms) == 1

    def validate(self):
        p, errs = self.p, []
        given = [k for k in ("upsample_h", "upsample_w", "pad_out_h", "pad_out_w") if p.has(k)]
        if self._nearest() and given:
            return [ShapeError("E0108", f"Upsample '{self.name}' has one bottom (nearest-neighbour upsampling), which "
                               f"takes `scale` only, not `{given[0]}`", field=given[0],
                               help="add the Pooling layer's mask top as a second bottom to unpool, or use `scale`")]
        if self._explicit():
            for name in ("upsample_h", "upsample_w"):
                if getattr(p, name) <= 1:
                    errs.append(ShapeError("E0107", f"Upsample '{self.name}': `{name}` must be greater than 1, got "
                                           f"{getattr(p, name)}", field=name, help="give the unpooled size"))
            return errs
        if (p.upsample_h is None) != (p.upsample_w is None):
            missing = "upsample_w" if p.upsample_w is None else "upsample_h"
            return [ShapeError("E0106", f"Upsample '{self.name}': upsample_h and upsample_w go together; `{missing}` is missing",
                               field="upsample_h" if p.upsample_h is not None else "upsample_w",
                               help=f"add `{missing}` (the size of the Pooling layer's input)")]
        if (p.scale_h is None) != (p.scale_w is None):
            return [ShapeError("E0106", f"Upsample '{self.name}': scale_h and scale_w go together",
                               field="scale_h" if p.scale_h is not None else "scale_w", help="give both, or `scale`")]
        sh, sw = self._scales()
        for name, v in (("scale", sh), ("scale", sw)):
            if v <= 1:
                errs.append(ShapeError("E0107", f"Upsample '{self.name}': the scale must be greater than 1, got {v}",
                                       field=name, help="use `scale: 2` (the Pooling layer's stride)"))
        for name, s in (("pad_out_h", sh), ("pad_out_w", sw)):
            if getattr(p, name) and s != 2:
                errs.append(ShapeError("E0108", f"Upsample '{self.name}': `{name}` needs scale 2, got {s}", field=name,
                                       help="give upsample_h and upsample_w instead"))
        return errs

    def shape(self, bottoms):
        x, mask = bottoms[0], bottoms[-1]
        _need_4d(self, x)
        _need_4d(self, mask, "mask", 1)
        if tuple(x) != tuple(mask):
            raise ShapeError("E0320", f"Upsample '{self.name}': the mask {fmt(mask)} differs from the input {fmt(x)}",
                             involves=(0, 1), help="feed the mask top of the Pooling layer whose output this unpools")
        if self._explicit():
            oh, ow = self.p.upsample_h, self.p.upsample_w
        else:
            sh, sw = self._scales()
            oh = None if x[2] is None else x[2] * sh - int(self.p.pad_out_h)
            ow = None if x[3] is None else x[3] * sw - int(self.p.pad_out_w)
        return [(x[0], x[1], oh, ow)]

    @classmethod
    def check_net(cls, checking):
        for node in checking.graph.nodes:
            if isinstance(node.layer, cls) and not node.layer._nearest():
                node.layer.check_mask(node, checking.graph, checking.inference, checking.c)

    @staticmethod
    def _mask_fix(g, blobs, values: str) -> str | None:
        """The mask top of a MAX Pooling layer whose output has the shape of `values`, as a fix."""
        shape = blobs.get(values)
        pool = next((n for n in g.nodes if isinstance(n.layer, Pooling) and len(n.tops) == 2 and shape is not None
                     and blobs.get(n.tops[0]) == shape), None)
        return pool and f"use `bottom: \"{g.display(pool.tops[1])}\"`, the mask top of Pooling '{pool.name}'"

    def check_mask(self, node, g, inf, c) -> None:
        """The mask must be a MAX Pooling layer's mask top (flat positions h * W + w of that Pooling's
        input plane), and this layer must unpool to that input's H x W: else the values land in the
        wrong places, or past the plane's end. A mask fed from outside (an Input) is the caller's."""
        mask, blobs = node.bottoms[1], inf.blobs
        pool = g.producer.get(mask)
        if pool is None or pool.layer.is_data:
            return
        failed = inf.failed.get(node)
        if failed is not None:                  # E0320, mask and values differ: name the mask to use
            fix = self._mask_fix(g, blobs, node.bottoms[0])
            if failed.code == "E0320" and fix:
                c.diagnostics[:] = [d for d in c.diagnostics if d is not failed]
                c.error(failed.code, failed.message, failed.pos, notes=failed.notes, help=fix)
            return
        where = self.spec.record.item_pos("bottom", 1) or self.spec.pos
        shown = g.display(mask)
        if not isinstance(pool.layer, Pooling) or pool.tops.index(mask) != 1:
            is_values = isinstance(pool.layer, Pooling)
            fix = self._mask_fix(g, blobs, node.bottoms[0]) or (
                f"give Pooling '{pool.name}' a second top (`top: \"{pool.name}_mask\"`) and use it here" if is_values
                else "feed the mask top (second top) of the MAX Pooling layer whose output this unpools")
            made = f"the pooled values (top 0) of Pooling '{pool.name}'" if is_values else \
                f"made by {pool.layer.type} '{pool.name}'"
            c.error("E0376", f"Upsample '{self.name}': its mask bottom '{shown}' is {made}, not a MAX Pooling layer's "
                    "mask top", where,
                    notes=["the mask holds, per pooled value, the flat position h * W + w of its maximum in the "
                           "Pooling layer's input: the positions the values are put back to"], help=fix)
            return
        src, out = blobs.get(pool.bottoms[0]), blobs.get(node.tops[0])
        if src is None or out is None or None in (*src[2:], *out[2:]) or tuple(src[2:]) == tuple(out[2:]):
            return
        (h, w), (oh, ow) = src[2:], out[2:]
        form = ("upsample_h" if self._explicit() else "scale_h" if self.p.scale_h is not None else "scale")
        fix = f"set `upsample_h: {h} upsample_w: {w}`"
        x = blobs[node.bottoms[0]]
        if not self._explicit() and (h, w) in {(x[2] * 2 - a, x[3] * 2 - b) for a in (0, 1) for b in (0, 1)}:
            pads = "".join(f" pad_out_{k}: true" for k, v in (("h", x[2] * 2 - h), ("w", x[3] * 2 - w)) if v)
            fix += f", or `scale: 2{pads}`"
        c.error("E0377", f"Upsample '{self.name}' unpools to {oh} x {ow}, but its mask '{shown}' holds positions in "
                f"the {h} x {w} input '{g.display(pool.bottoms[0])}' of Pooling '{pool.name}'", self.pos(form),
                notes=[f"Pooling '{pool.name}' maps {fmt(src)} to {fmt(blobs[node.bottoms[0]])}; unpooling must give "
                       f"back {h} x {w} for each value to return to where its maximum was"
                       + ("" if oh * ow >= h * w else f" (on {oh} x {ow} the last positions fall off the plane)")],
                help=fix)

    def forward(self, xp, bottoms, params):
        if self._nearest():
            sh, sw = self._scales()
            return [bottoms[0].repeat(sh, axis=2).repeat(sw, axis=3)], None
        x, mask = bottoms
        n, c, h, w = x.shape
        _, _, oh, ow = self._out(x.shape)
        idx = _indices(xp, mask, oh * ow, self, f"the mask '{self.spec.bottoms[1]}'", True).reshape(n * c, h * w)
        rows = xp.arange(n * c)[:, None]
        y = xp.zeros((n * c, oh * ow), x.dtype)
        y[rows, idx] = x.reshape(n * c, h * w)
        return [y.reshape(n, c, oh, ow)], (rows, idx, x.shape)

    def _out(self, shape):
        return self.shape([tuple(shape), tuple(shape)])[0]

    def backward(self, xp, saved, dtops, params, need):
        dy = dtops[0]
        n, c = dy.shape[:2]
        if self._nearest():
            (sh, sw), (oh, ow) = self._scales(), dy.shape[2:]
            return [dy.reshape(n, c, oh // sh, sh, ow // sw, sw).sum(axis=(3, 5))], []
        rows, idx, shape = saved
        return [dy.reshape(n * c, -1)[rows, idx].reshape(shape), None], []

    def to_onnx(self, ex, step):
        """ScatterElements of each plane's values into zeros at the mask's positions: exact for any
        mask. (ONNX's MaxUnpool reads MaxPool's whole-tensor indices, not Caffe's per-plane ones; where
        overlapping windows name one position twice, ONNX leaves the order open, onnxruntime and
        netdsl keep the last.) The nearest variant: Resize, nearest, input index floor(output / scale)."""
        if self._nearest():
            return ex.add_node("Resize", [ex.bottoms(step)[0], "", ex.const("scales", [1, 1, *self._scales()])],
                               ex.tops(step), mode="nearest", coordinate_transformation_mode="asymmetric",
                               nearest_mode="floor")
        x, mask = ex.bottoms(step)
        oh, ow = ex.out_shape(step)[2:]
        values = ex.add_node("Reshape", [x, ex.ints([0, 0, -1])])
        index = ex.add_node("Cast", [ex.add_node("Reshape", [mask, ex.ints([0, 0, -1])])], to=7)     # 7: INT64
        zeros = ex.constant_like_shape(ex.dims_then(x, [oh * ow]), 0.0)
        planes = ex.add_node("ScatterElements", [zeros, index, values], axis=2)
        ex.add_node("Reshape", [planes, ex.ints([0, 0, oh, ow])], ex.tops(step))


@register
class DenseImageData(_FileData):
    """SegNet's reader of `image label-image` lines: data N x C x H x W and a per-pixel label
    N x 1 x H x W, checked (sized by new_height / new_width or crop_height / crop_width, else by
    --shape), never run (replace it with an Input layer to run the net)."""
    type = "DenseImageData"
    messages = {"dense_image_data_param": Msg("DenseImageDataParameter", {
        "source": F(str, ""), "batch_size": F(int, 1), "rand_skip": F(int, 0), "shuffle": F(bool, False),
        "new_height": F(int, 0), "new_width": F(int, 0), "crop_height": F(int, 0), "crop_width": F(int, 0),
        "is_color": F(bool, True), "mean_file": F(str, ""), "mirror": F(bool, False), "root_folder": F(str, "")},
        open=True)}

    def shape(self, bottoms):
        p = self.p
        h, w = (p.crop_height, p.crop_width) if p.crop_height and p.crop_width else (p.new_height, p.new_width)
        if p.batch_size <= 0 or not (h and w):
            return [None] * len(self.spec.tops)
        return [(p.batch_size, 3 if p.is_color else 1, h, w), (p.batch_size, 1, h, w)][: len(self.spec.tops)]

    def complete(self, tops):
        if len(tops) == 2 and tops[0] is not None and tops[1] is None:
            n, _, h, w = tops[0]
            tops[1] = (n, 1, h, w)               # one label per pixel
        return tops

    def hint_example(self, i):
        n = self.p.batch_size or "N"
        return f"--shape {self.spec.tops[i]}={n},1,H,W" if i == 1 else f"--shape {self.spec.tops[i]}={n},3,H,W (SegNet: {n},3,360,480)"


# =============================================================================================
# Interp: PSPNet's (DeepLab's) bilinear resize with aligned corners

@register
class Interp(Layer):
    """PSPNet's / DeepLab v2's bilinear resize (caffe_cpu_interp2): output corners sit on input
    corners. The input is first cropped by pad_beg / pad_end (<= 0) to H_eff = H + pad_beg + pad_end;
    the output size is (H_eff - 1) / shrink_factor + 1 (integer division), then o + (o - 1) *
    (zoom_factor - 1), either factor alone or both; or height x width; or the second bottom's size.
    Output row i reads input row r = i * (H_eff - 1) / (H_out - 1) (0 for one row), computed in float32
    as the fork does, from rows floor(r) and floor(r) + 1 with weights 1 - frac, frac."""
    type = "Interp"
    n_bottoms = (1, 2)
    bottom_roles = ("the input", "a blob whose height and width the output takes")
    messages = {"interp_param": Msg("InterpParameter", {
        "height": F(int, 0), "width": F(int, 0), "zoom_factor": F(int, 1), "shrink_factor": F(int, 1),
        "pad_beg": F(int, 0), "pad_end": F(int, 0),
        "interp_type": F(str, "bilinear", doc="bilinear (nearest_neighbor is not implemented)")})}

    def _specs(self):
        p = self.p
        return [name for name, on in (("zoom_factor / shrink_factor", p.has("zoom_factor") or p.has("shrink_factor")),
                                      ("height and width", p.has("height") and p.has("width")),
                                      ("a second bottom", len(self.spec.bottoms) == 2)) if on]

    def validate(self):
        p, errs = self.p, []
        specs = self._specs()
        if len(specs) != 1:
            errs.append(ShapeError("E0106" if not specs else "E0108",
                                   f"Interp '{self.name}': give the output size one way, got "
                                   + (" and ".join(specs) if specs else "none"),
                                   field=None, help="use zoom_factor and/or shrink_factor, or height and width, or a "
                                                    "second bottom"))
        if p.has("height") != p.has("width"):
            errs.append(ShapeError("E0106", f"Interp '{self.name}': height and width go together",
                                   field="height" if p.has("height") else "width", help="give both"))
        for name in ("zoom_factor", "shrink_factor"):
            if getattr(p, name) < 1:
                errs.append(ShapeError("E0107", f"Interp '{self.name}': `{name}` must be at least 1, got "
                                       f"{getattr(p, name)}", field=name, help=f"use `{name}: 2`"))
        for name in ("pad_beg", "pad_end"):
            if getattr(p, name) > 0:
                errs.append(ShapeError("E0108", f"Interp '{self.name}': `{name}` must be <= 0 (the fork only crops), "
                                       f"got {getattr(p, name)}", field=name, help=f"use `{name}: 0`"))
        if p.interp_type != "bilinear":
            errs.append(ShapeError("E0109", f"Interp '{self.name}': interp_type \"{p.interp_type}\" is not supported",
                                   field="interp_type", help='use `interp_type: "bilinear"`'))
        return errs

    def _size(self, n_in, ref, axis):
        p = self.p
        if n_in is not None:
            n_in = n_in + p.pad_beg + p.pad_end
        if p.has("zoom_factor") or p.has("shrink_factor"):
            if n_in is None:
                return None, n_in
            o = (n_in - 1) // p.shrink_factor + 1 if p.has("shrink_factor") else n_in
            return (o + (o - 1) * (p.zoom_factor - 1) if p.has("zoom_factor") else o), n_in
        if p.has("height") and p.has("width"):
            return (p.height if axis == 2 else p.width), n_in
        return ref[axis], n_in

    def shape(self, bottoms):
        x = bottoms[0]
        _need_4d(self, x)
        ref = bottoms[1] if len(bottoms) == 2 else None
        if ref is not None and len(ref) != 4:
            _need_4d(self, ref, "size reference", 1)
        out = []
        for axis, name in ((2, "height"), (3, "width")):
            o, eff = self._size(x[axis], ref, axis)
            if eff is not None and eff <= 0:
                raise ShapeError("E0401", f"Interp '{self.name}': cropping pad_beg {self.p.pad_beg} and pad_end "
                                 f"{self.p.pad_end} leaves an input {name} of {eff}", field="pad_beg", involves=(0,),
                                 help=f"crop at most {x[axis] - 1} in all (pad_beg + pad_end >= {1 - x[axis]})")
            if o is not None and o <= 0:
                raise ShapeError("E0401", f"Interp '{self.name}': output {name} is {o}", field=name, involves=(0,),
                                 help="give a positive output size")
            out.append(o)
        return [(x[0], x[1], out[0], out[1])]

    @classmethod
    def check_net(cls, checking):
        for node in checking.graph.nodes:
            if isinstance(node.layer, cls) and node not in checking.inference.failed:
                node.layer.check_joins(node, checking.graph, checking.inference, checking.c)

    def check_joins(self, node, g, inf, c) -> None:
        """PSPNet's pyramid: each pooled branch is resized back and concatenated (or summed) with the
        map it was pooled from. Where the Interp's size misses the other operands' (zoom_factor gives
        (H - 1) * zoom + 1, which only inputs of k * zoom + 1 pixels make whole), report it here, with
        its arithmetic, rather than at the Concat."""
        out = inf.blobs.get(node.tops[0])
        for join in g.consumers.get(node.tops[0], []):
            failed = inf.failed.get(join)
            if failed is None or failed.code not in ("E0320", "E0321") or out is None:
                continue
            others = {tuple(inf.blobs[b][2:]) for b in join.bottoms if b != node.tops[0] and b in inf.blobs}
            if len(others) != 1 or (want := others.pop()) == tuple(out[2:]) or len(want) != 2 or None in want:
                continue
            ref = next(b for b in join.bottoms if b != node.tops[0])
            x = inf.blobs[node.bottoms[0]]
            how = [self._arithmetic(x[2], "height"), self._arithmetic(x[3], "width")]
            field = next((f for f in ("zoom_factor", "shrink_factor", "height") if self.p.has(f)), None)
            c.diagnostics[:] = [d for d in c.diagnostics if d is not failed]
            c.error("E0378", f"Interp '{self.name}' resizes to {out[2]} x {out[3]}, but {join.layer.type} "
                    f"'{join.name}' joins it with '{g.display(ref)}' of {want[0]} x {want[1]}", self.pos(field),
                    notes=[h for h in how if h] + [f"{join.layer.type} '{join.name}' needs one spatial size"],
                    help=f"give Interp '{self.name}' the second bottom '{g.display(ref)}' (it then takes that blob's "
                         f"size), or set `height: {want[0]} width: {want[1]}` in place of "
                         f"{field or 'the size it has'}")

    def _arithmetic(self, n_in, name: str) -> str | None:
        """How the factors give one output side, e.g. "height: (6 - 1) x 10 + 1 = 51"."""
        p = self.p
        if n_in is None or not (p.has("zoom_factor") or p.has("shrink_factor")):
            return None
        eff = n_in + p.pad_beg + p.pad_end
        text, o = (f"{n_in} {p.pad_beg:+d} {p.pad_end:+d} = {eff}, " if p.pad_beg or p.pad_end else ""), eff
        if p.has("shrink_factor"):
            o = (eff - 1) // p.shrink_factor + 1
            text += f"shrink_factor: ({eff} - 1) / {p.shrink_factor} + 1 = {o}, "
        if p.has("zoom_factor"):
            z = o + (o - 1) * (p.zoom_factor - 1)
            text += f"zoom_factor: ({o} - 1) x {p.zoom_factor} + 1 = {z}"
        return f"{name}: {text.rstrip(', ')}"

    @staticmethod
    def weights(n_in: int, n_out: int) -> np.ndarray:
        """The n_out x n_in interpolation matrix of one axis, in the fork's float32 arithmetic."""
        a = np.zeros((n_out, n_in), np.float64)
        if n_in == n_out:
            return np.eye(n_in)
        ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        r = np.float32(ratio) * np.arange(n_out, dtype=np.float32)
        lo = r.astype(np.int64)
        frac = (r - lo.astype(np.float32)).astype(np.float64)
        hi = lo + (lo < n_in - 1)
        rows = np.arange(n_out)
        a[rows, lo] = 1.0 - frac
        a[rows, hi] += frac
        return a

    def _geometry(self, x_shape, out_shape):
        b = -self.p.pad_beg
        h_eff, w_eff = x_shape[2] + self.p.pad_beg + self.p.pad_end, x_shape[3] + self.p.pad_beg + self.p.pad_end
        return b, h_eff, w_eff, self.weights(h_eff, out_shape[2]), self.weights(w_eff, out_shape[3])

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        out = self.shape([tuple(b.shape) for b in bottoms])[0]
        b, he, we, ah, aw = self._geometry(x.shape, out)
        ah, aw = xp.asarray(ah, x.dtype), xp.asarray(aw, x.dtype)
        y = xp.matmul(xp.matmul(ah, x[:, :, b:b + he, b:b + we]), aw.T)
        return [y], (ah, aw, b, x.shape)

    def to_onnx(self, ex, step):
        """Resize, linear, `align_corners` (the fork's output corners on input corners), after a Slice
        for pad_beg / pad_end."""
        x, shape = ex.bottoms(step)[0], ex.in_shape(step)
        oh, ow = ex.out_shape(step)[2:]
        b, he, we = -self.p.pad_beg, shape[2] + self.p.pad_beg + self.p.pad_end, shape[3] + self.p.pad_beg + self.p.pad_end
        if (oh == 1 and he > 1) or (ow == 1 and we > 1):
            raise ex.unsupported(step, "an output side of 1 (ONNX's align_corners divides by it minus 1)")
        if (he, we) != tuple(shape[2:]):
            x = ex.add_node("Slice", [x, ex.ints([b, b]), ex.ints([b + he, b + we]), ex.ints([2, 3])])
        ex.add_node("Resize", [x, "", "", ex.dims_then(x, [oh, ow])], ex.tops(step), mode="linear",
                    coordinate_transformation_mode="align_corners")

    def backward(self, xp, saved, dtops, params, need):
        ah, aw, b, shape = saved
        dcrop = xp.matmul(xp.matmul(ah.T, dtops[0]), aw)
        if dcrop.shape == tuple(shape):
            dx = dcrop
        else:
            dx = xp.zeros(shape, dcrop.dtype)
            dx[:, :, b:b + dcrop.shape[2], b:b + dcrop.shape[3]] = dcrop
        return [dx] + [None] * (len(self.spec.bottoms) - 1), []


# =============================================================================================
# Depthwise convolution: a Convolution whose group is the input depth

class _Depthwise(Convolution):
    """A Convolution with group forced to the input depth (each filter sees one input channel;
    num_output a multiple of it, usually equal); the same convolution_param, any `group` ignored.
    Filters are num_output x 1 x kh x kw, as the forks store them."""
    gemm_epilogue = False
    filter_depth_axis = None            # a filter sees one channel, whatever the input depth

    def _check_input(self, x):
        if len(x) != 4:
            raise ShapeError("E0221", f"{self.type} '{self.name}' needs a 4-D N x C x H x W input, "
                             f"got {len(x)}-D {fmt(x)}", involves=(0,), help="reshape the input to 4-D")
        c, m = x[1], self.p.num_output
        if c is not None and m % c:
            raise ShapeError("E0303", f"{self.type} '{self.name}': num_output {m} is not a multiple of the input depth {c}",
                             field="num_output", involves=(0,),
                             notes=[f"a depthwise convolution gives each of the {c} input channels its own filters"],
                             help=f"use `num_output: {c}`")

    def param_shapes(self, bottoms):
        (kh, kw), _, _, _ = self.geometry()
        return [(self.p.num_output, 1, kh, kw)] + ([(self.p.num_output,)] if self.p.bias_term else [])

    def macs(self, bottoms, tops):
        (n, _, _, _), (_, m, oh, ow) = bottoms[0], tops[0]
        (kh, kw), _, _, _ = self.geometry()
        return n * m * oh * ow * kh * kw

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        _, st, pad, dil = self.geometry()
        y, cache = kernels.conv2d_forward(xp, x, params[0], params[1] if self.p.bias_term else None, st, pad, dil, x.shape[1])
        return [y], cache

    def explain_weights(self, i, have, want):
        return None

    def lower_check(self, lw, step):
        raise Unsupported(f"{self.type} '{self.name}' is a grouped convolution (graph mode: group 1)")

    def to_onnx(self, ex, step):
        (kh, kw), st, (ph, pw), dil = self.geometry()
        w, *b = ex.params(step)
        ex.add_node("Conv", ex.bottoms(step) + [ex.const("W", w)] + [ex.const("b", v) for v in b], ex.tops(step),
                    kernel_shape=[kh, kw], strides=list(st), pads=[ph, pw, ph, pw], dilations=list(dil),
                    group=ex.in_shape(step)[1])


@register
class ConvolutionDepthwise(_Depthwise):
    """ShuffleNet's / MobileNet's fork (farmingyard/ShuffleNet's conv_dw_layer)."""
    type = "ConvolutionDepthwise"


@register
class DepthwiseConvolution(_Depthwise):
    """yonghenglh6/DepthwiseConvolution's layer (used by MobileNet ports)."""
    type = "DepthwiseConvolution"


# =============================================================================================
# ShuffleChannel (ShuffleNet) and Axpy (SENet)

@register
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle: the C channels, seen as group x C/group, are transposed to
    C/group x group (output channel j * group + i is input channel i * C/group + j)."""
    type = "ShuffleChannel"
    messages = {"shuffle_channel_param": Msg("ShuffleChannelParameter", {"group": F(int, 1)})}

    def validate(self):
        if self.p.group <= 0:
            return [ShapeError("E0107", f"ShuffleChannel '{self.name}': group must be positive, got {self.p.group}",
                               field="group", help="use the group of the convolution before it, e.g. `group: 3`")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) < 2:
            raise ShapeError("E0221", f"ShuffleChannel '{self.name}' needs an N x C (x H x W) input, got {fmt(x)}",
                             involves=(0,), help="shuffle a convolution's output")
        g = self.p.group
        if x[1] is not None and x[1] % g:
            raise ShapeError("E0302", f"ShuffleChannel '{self.name}': input depth {x[1]} is not divisible by group {g}",
                             field="group", involves=(0,),
                             help=f"use `group: {max(d for d in range(1, x[1] + 1) if x[1] % d == 0 and d <= g)}` or another "
                                  f"divisor of {x[1]}, or give the layer before it a multiple of {g} channels "
                                  f"({x[1] + g - x[1] % g})")
        return [x]

    @staticmethod
    def shuffle(xp, x, g):
        n, c = x.shape[:2]
        rest = x.shape[2:]
        return xp.ascontiguousarray(x.reshape((n, g, c // g) + rest).swapaxes(1, 2)).reshape(x.shape)

    def forward(self, xp, bottoms, params):
        return [self.shuffle(xp, bottoms[0], self.p.group)], None

    def backward(self, xp, saved, dtops, params, need):
        dy = dtops[0]
        return [self.shuffle(xp, dy, dy.shape[1] // self.p.group)], []

    def to_onnx(self, ex, step):
        """Reshape to N x g x C/g x rest, Transpose the two channel axes, Reshape back."""
        shape, g = ex.in_shape(step), self.p.group
        split = ex.add_node("Reshape", [ex.bottoms(step)[0], ex.ints([0, g, shape[1] // g, -1])])
        swapped = ex.add_node("Transpose", [split], perm=[0, 2, 1, 3])
        ex.add_node("Reshape", [swapped, ex.ints([0, *shape[1:]])], ex.tops(step))


@register
class Axpy(Layer):
    """SENet's fused excitation: top = a * x + y, with a N x C (x 1 x 1) per channel and x, y
    N x C x H x W. Gradients: da = sum over H, W of x * dtop; dx = a * dtop; dy = dtop."""
    type = "Axpy"
    n_bottoms = (3, 3)
    bottom_roles = ("the per-channel scale a (N x C x 1 x 1)", "x", "y (added)")

    def shape(self, bottoms):
        a, x, y = bottoms
        if len(x) < 2:
            raise ShapeError("E0221", f"Axpy '{self.name}' needs an N x C (x H x W) x, got {fmt(x)}", involves=(1,),
                             help="feed a convolution's output")
        if tuple(x) != tuple(y):
            raise ShapeError("E0320", f"Axpy '{self.name}': x {fmt(x)} and y {fmt(y)} differ in shape", involves=(1, 2),
                             help="add blobs of one shape")
        if tuple(a[:2]) != tuple(x[:2]) or any(d != 1 for d in a[2:]) or len(a) > len(x):
            raise ShapeError("E0322", f"Axpy '{self.name}': the scale {fmt(a)} is not N x C x 1 x 1 for x {fmt(x)}",
                             involves=(0, 1), help=f"give a scale of shape {fmt(tuple(x[:2]) + (1,) * (len(x) - 2))}")
        return [x]

    def forward(self, xp, bottoms, params):
        a, x, y = bottoms
        s = a.reshape(a.shape[:2] + (1,) * (x.ndim - 2))
        return [s * x + y], (s, x, a.shape)

    def backward(self, xp, saved, dtops, params, need):
        s, x, a_shape = saved
        dt = dtops[0]
        da = (dt * x).sum(axis=tuple(range(2, x.ndim))).reshape(a_shape) if need[0] else None
        return [da, dt * s if need[1] else None, dt if need[2] else None], []

    def to_onnx(self, ex, step):
        a, x, y = ex.bottoms(step)
        nd = len(ex.in_shape(step, 1))
        scale = ex.along(a, 0, nd, len(ex.in_shape(step, 0)))
        ex.add_node("Add", [ex.add_node("Mul", [scale, x]), y], ex.tops(step))


# =============================================================================================
# PSROIPooling (R-FCN)

@register
class PSROIPooling(Layer):
    """R-FCN's position-sensitive RoI average pooling (daijifeng001/caffe-rfcn). Each RoI (batch
    index, x1, y1, x2, y2; image pixels, inclusive) is rounded (C's round) and scaled: start =
    round(x1) * spatial_scale, end = (round(x2) + 1) * spatial_scale, extent at least 0.1; it is cut
    into group_size x group_size bins, bin (i, j) spanning floor(i * extent / g + start) ..
    ceil((i + 1) * extent / g + start), clipped to the map. Output channel d of bin (i, j) averages
    input channel (d * g + i) * g + j over its bin (an empty bin gives 0). The input depth must be
    output_dim * group_size^2. Backward spreads each output's gradient evenly over its bin; the rois
    get none."""
    type = "PSROIPooling"
    n_bottoms = (2, 2)
    bottom_roles = ("the position-sensitive score maps", "the rois")
    messages = {"psroi_pooling_param": Msg("PSROIPoolingParameter", {
        "spatial_scale": F(float, None, doc="the feature map's scale relative to the image, e.g. 0.0625"),
        "output_dim": F(int, None, doc="the number of output channels (classes, or 8 for class-agnostic boxes)"),
        "group_size": F(int, None, doc="the pooled size (k x k bins)")})}

    def validate(self):
        errs = []
        for name, ex in (("spatial_scale", "0.0625"), ("output_dim", "21"), ("group_size", "7")):
            v = getattr(self.p, name)
            if v is None:
                errs.append(ShapeError("E0106", f"PSROIPooling '{self.name}': missing required field `{name}`",
                                       field="psroi_pooling_param", help=f"add `{name}: {ex}` to psroi_pooling_param"))
            elif v <= 0:
                errs.append(ShapeError("E0107", f"PSROIPooling '{self.name}': `{name}` must be positive, got {v}",
                                       field=name, help=f"use `{name}: {ex}`"))
        return errs

    def shape(self, bottoms):
        x, rois = bottoms
        _need_4d(self, x, "score map")
        if len(rois) != 2 and not (len(rois) == 4 and tuple(rois[2:]) == (1, 1)) or rois[1] not in (5, None):
            raise ShapeError("E0373", f"PSROIPooling '{self.name}': rois must be R x 5, got {fmt(rois)}", involves=(1,),
                             help="feed a Proposal layer's rois")
        d, g = self.p.output_dim, self.p.group_size
        if x[1] is not None and x[1] != d * g * g:
            raise ShapeError("E0302", f"PSROIPooling '{self.name}': input depth {x[1]} is not output_dim {d} x "
                             f"group_size^2 {g * g} = {d * g * g}", field="output_dim", involves=(0,),
                             help=f"give the convolution before it num_output {d * g * g}"
                                  + (f", or use `output_dim: {x[1] // (g * g)}`" if x[1] % (g * g) == 0 else ""))
        return [(rois[0], d, g, g)]

    def _bins(self, xp, rois, h, w, dtype):
        """Per RoI: batch index, and per bin row / column the 0/1 membership masks (R x g x H, R x g x W)
        and the bin areas (R x g x g)."""
        g = self.p.group_size
        r = rois.reshape(-1, 5)
        batch = r[:, 0].astype(xp.int64)
        scale = dtype.type(self.p.spatial_scale)
        c = _c_round(xp, r[:, 1:].astype(dtype))
        x1, y1 = c[:, 0] * scale, c[:, 1] * scale
        x2, y2 = (c[:, 2] + 1) * scale, (c[:, 3] + 1) * scale
        k = xp.arange(g + 1, dtype=dtype)[None, :]
        masks, sizes = [], []
        for lo, hi, n in ((y1, y2, h), (x1, x2, w)):
            step = xp.maximum(hi - lo, dtype.type(0.1)) / dtype.type(g)
            edges = k * step[:, None]
            start = xp.clip(xp.floor(edges[:, :-1] + lo[:, None]).astype(xp.int64), 0, n)
            end = xp.clip(xp.ceil(edges[:, 1:] + lo[:, None]).astype(xp.int64), 0, n)
            pos = xp.arange(n)[None, None, :]
            masks.append(((pos >= start[:, :, None]) & (pos < end[:, :, None])).astype(dtype))
            sizes.append(xp.maximum(end - start, 0))
        area = (sizes[0][:, :, None] * sizes[1][:, None, :]).astype(dtype)
        return batch, masks[0], masks[1], area

    def forward(self, xp, bottoms, params):
        x, rois = bottoms
        n, _, h, w = x.shape
        d, g = self.p.output_dim, self.p.group_size
        batch, mh, mw, area = self._bins(xp, rois, h, w, x.dtype)
        nr = mh.shape[0]
        if nr and (int(batch.min()) < 0 or int(batch.max()) >= n):
            raise ValueError(f"PSROIPooling '{self.name}': an RoI's batch index is outside [0, {n})")
        y = xp.zeros((nr, d, g, g), x.dtype)
        for b in range(n):
            sel = xp.nonzero(batch == b)[0]
            if not len(sel):
                continue
            xb = x[b].reshape(d, g, g, h, w)
            t = xp.matmul(xb, mw[sel].transpose(1, 2, 0)[None, None])      # d x g(i) x g(j) x H x R_b
            s = (t * mh[sel].transpose(1, 2, 0)[None, :, None]).sum(axis=3)  # d x g x g x R_b
            y[sel] = s.transpose(3, 0, 1, 2)
        y = xp.where(area[:, None] > 0, y / xp.maximum(area, 1)[:, None], xp.zeros((), x.dtype))
        return [y], (batch, mh, mw, area, x.shape)

    def backward(self, xp, saved, dtops, params, need):
        if not need[0]:
            return [None, None], []
        batch, mh, mw, area, shape = saved
        n, c, h, w = shape
        dy = dtops[0]
        gy = xp.where(area[:, None] > 0, dy / xp.maximum(area, 1)[:, None], xp.zeros((), dy.dtype))
        dx = xp.zeros(shape, dy.dtype)
        for b in range(n):
            sel = xp.nonzero(batch == b)[0]
            if not len(sel):
                continue
            a = gy[sel].transpose(1, 2, 3, 0)[..., None, :] * mh[sel].transpose(1, 2, 0)[None, :, None]  # d g g H R_b
            dx[b] = xp.matmul(a, mw[sel].transpose(1, 0, 2)[None, None]).reshape(c, h, w)
        return [dx, None], []

    def to_onnx(self, ex, step):
        raise ex.unsupported(step, "ONNX has no position-sensitive RoI pooling (RoiAlign samples points, it "
                                   "does not average R-FCN's rounded integer bins)")
