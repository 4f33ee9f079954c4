"""Layers that move data without arithmetic weights: Eltwise, Concat, Slice, Split, Flatten,
Reshape, Permute, Crop, Silence."""
from __future__ import annotations

from ..registry import F, Layer, Msg, ShapeError, canonical_axis, count, fmt, register


def _size_formula(up, axis: int) -> tuple[str, int] | None:
    """How a Convolution or Pooling (`up`: its node and shapes) computed its output size on a
    spatial axis, with numbers."""
    from .. import kernels
    if up is None or up[0].layer.type not in ("Pooling", "Convolution"):
        return None
    layer, n, hw = up[0].layer, up[1].bottoms[0][axis], axis - 2
    if layer.type == "Pooling":
        if layer.p.global_pooling:
            return None
        (k, s, p) = (g[hw] for g in layer.geometry(up[1].bottoms[0]))
        rnd = "ceil" if layer.ceil() else "floor"
        out = kernels.pool_out_size(n, k, s, p, rnd == "ceil")
        return f"{rnd}(({n} + 2*{p} - {k}) / {s}) + 1 = {out}", out
    (kk, st, pad, dil) = layer.geometry()
    k, s, p, d = kk[hw], st[hw], pad[hw], dil[hw]
    ext = d * (k - 1) + 1
    return f"floor(({n} + 2*{p} - {ext}) / {s}) + 1 = {(n + 2 * p - ext) // s + 1}", (n + 2 * p - ext) // s + 1


def _rounding_hint(bottoms, upstream, i: int, j: int, axis: int) -> tuple[list[str], str] | None:
    """Operands i and j differ by one pixel in a spatial axis because a Pooling rounded its output
    size up (Caffe's default) where a Convolution rounded down: say so, with the arithmetic."""
    from .. import kernels
    a, b = bottoms[i][axis], bottoms[j][axis]
    if a is None or b is None or abs(a - b) != 1:
        return None
    big, small = (i, j) if a > b else (j, i)
    pool, other = upstream(big), upstream(small)
    if pool is None or pool[0].layer.type != "Pooling" or not pool[0].layer.ceil() \
            or pool[0].layer.p.global_pooling:
        return None
    name = ("height", "width")[axis - 2] if axis in (2, 3) else f"axis {axis}"
    f_pool = _size_formula(pool, axis)
    if f_pool is None:
        return None
    pl = pool[0].layer
    notes = [f"off by one in the {name}: Pooling rounds up (ceil, Caffe's default), Convolution rounds down (floor)",
             f"Pooling '{pl.name}' at {pl.spec.pos} gives {f_pool[0]}"]
    fixes = []
    (k, s, p) = (g[axis - 2] for g in pl.geometry(pool[1].bottoms[0]))
    floor_out = kernels.pool_out_size(pool[1].bottoms[0][axis], k, s, p, False)
    if floor_out == bottoms[small][axis]:
        fixes.append(f"add `round_mode: FLOOR` to pooling_param of '{pl.name}' (giving {floor_out})")
    f_other = _size_formula(other, axis)
    if f_other is not None:
        ol = other[0].layer
        notes.append(f"{ol.type} '{ol.name}' at {ol.spec.pos} gives {f_other[0]}")
        if ol.type == "Convolution":
            kk, st, pad, dil = ol.geometry()
            n = other[1].bottoms[0][axis]
            hw = axis - 2
            ext = dil[hw] * (kk[hw] - 1) + 1
            want = bottoms[big][axis]
            for extra in (1, 2):
                q = pad[hw] + extra
                if (n + 2 * q - ext) // st[hw] + 1 == want:
                    fixes.append(f"set `pad: {q}` on Convolution '{ol.name}' (giving {want})")
                    break
    if not fixes:
        fixes.append(f"add `round_mode: FLOOR` to pooling_param of '{pl.name}', or pad the other branch")
    return notes, " or ".join(fixes)


def _explain_mismatch(error: ShapeError, upstream) -> ShapeError:
    """Eltwise and Concat: operands that differ by a pixel get the rounding story (above)."""
    operands = getattr(error, "operands", None)
    if operands is None:
        return error
    bottoms, i, axes = operands
    for ax in axes:
        r = _rounding_hint(bottoms, upstream, 0, i, ax)
        if r:
            error.notes, error.help = r
            break
    return error


@register
class Eltwise(Layer):
    type = "Eltwise"
    v1 = (25, "ELTWISE")
    arity_note = "Eltwise combines 2 or more blobs of one shape element by element"
    messages = {"eltwise_param": Msg("EltwiseParameter", {
        "operation": F("enum", "SUM", choices=("PROD", "SUM", "MAX")),
        "coeff": F(float, repeated=True), "stable_prod_grad": F(bool, True)})}
    n_bottoms = (2, None)

    def validate(self):
        p, nb = self.p, len(self.spec.bottoms)
        if p.coeff and p.operation != "SUM":
            return [ShapeError("E0110", f"Eltwise '{self.name}': coeff applies only to SUM", field="coeff",
                               help="remove coeff, or use `operation: SUM`")]
        if p.coeff and len(p.coeff) != nb:
            return [ShapeError("E0110", f"Eltwise '{self.name}' has {len(p.coeff)} coeff for {nb} bottoms",
                               field="coeff", help=f"give exactly {nb} coeff values, one per bottom")]
        return []

    def shape(self, bottoms):
        ref = bottoms[0]
        for i, s in enumerate(bottoms[1:], 1):
            if len(s) != len(ref) or any(a is not None and b is not None and a != b for a, b in zip(s, ref)):
                e = ShapeError("E0320", f"Eltwise '{self.name}' operands differ: "
                               f"'{self.spec.bottoms[0]}' is {fmt(ref)} but '{self.spec.bottoms[i]}' is {fmt(s)}",
                               involves=(0, i), help=f"make every bottom {fmt(ref)}: check num_output and strides "
                                                     f"of the branch producing '{self.spec.bottoms[i]}'")
                e.operands = (bottoms, i, range(2, min(len(s), len(ref))))
                raise e
        return [ref]

    def explain(self, error, upstream):
        if getattr(error, "operands", None) is None:
            return error
        bottoms, i, _ = error.operands
        s, ref, src = bottoms[i], bottoms[0], upstream(i)
        if len(s) == len(ref) > 1 and s[1] != ref[1] and s[0] == ref[0] and src is not None \
                and src[0].layer.type in ("Convolution", "InnerProduct") and s[2:] == ref[2:]:
            error.help = (f"set `num_output: {ref[1]}` on {src[0].layer.type} '{src[0].name}', or project '"
                          f"{self.spec.bottoms[0]}' to {s[1]} channels (e.g. a 1x1 Convolution) before the sum")
        return _explain_mismatch(error, upstream)

    def forward(self, xp, bottoms, params):
        op = self.p.operation
        if op == "SUM":
            coeff = self.p.coeff or [1.0] * len(bottoms)
            y = bottoms[0] * coeff[0] if coeff[0] != 1 else bottoms[0].copy()
            for c, b in zip(coeff[1:], bottoms[1:]):
                y += b * c if c != 1 else b
            return [y], None
        if op == "PROD":
            y = bottoms[0].copy()
            for b in bottoms[1:]:
                y *= b
            return [y], (bottoms, y)
        y = bottoms[0].copy()
        arg = xp.zeros(y.shape, dtype=xp.int32)
        for i, b in enumerate(bottoms[1:], 1):
            # Caffe: bottoms 0 and 1 are compared as `a > b ? 0 : 1`, so a tie goes to bottom 1;
            # each later bottom must be strictly greater to take over
            better = b >= y if i == 1 else b > y
            y = xp.where(better, b, y)
            arg = xp.where(better, i, arg)
        return [y], arg

    def backward(self, xp, saved, dtops, params, need):
        dy, op, n = dtops[0], self.p.operation, len(self.spec.bottoms)
        if op == "SUM":
            coeff = self.p.coeff or [1.0] * n
            return [dy * c if c != 1 else dy for c in coeff], []
        if op == "PROD":
            bottoms, y = saved
            out = []
            for i in range(n):
                others = None
                for j, b in enumerate(bottoms):
                    if j != i:
                        others = b.copy() if others is None else others * b
                out.append(dy * others)       # the stable form: no division by the bottom
            return out, []
        return [dy * (saved == i) for i in range(n)], []

    def to_onnx(self, ex, step):
        ins, op = ex.bottoms(step), self.p.operation
        if op == "PROD":
            return ex.chain(step, ins[0], [("Mul", [b]) for b in ins[1:]])
        if op == "SUM" and self.p.coeff:
            ins = [b if c == 1 else ex.add_node("Mul", [b, ex.scalar(c)]) for b, c in zip(ins, self.p.coeff)]
        ex.add_node("Sum" if op == "SUM" else "Max", ins, ex.tops(step))


@register
class Concat(Layer):
    type = "Concat"
    v1 = (3, "CONCAT")
    arity_note = "Concat joins blobs along an axis"
    messages = {"concat_param": Msg("ConcatParameter", {"axis": F(int, 1), "concat_dim": F(int, None)})}
    n_bottoms = (1, None)

    def axis(self, ndim):
        a = self.p.concat_dim if self.p.concat_dim is not None and not self.p.has("axis") else self.p.axis
        return canonical_axis(a, ndim)

    def shape(self, bottoms):
        ref = bottoms[0]
        ax = self.axis(len(ref))
        total = 0
        for i, s in enumerate(bottoms):
            if len(s) != len(ref):
                raise ShapeError("E0321", f"Concat '{self.name}': '{self.spec.bottoms[i]}' is {len(s)}-D "
                                 f"({fmt(s)}) but '{self.spec.bottoms[0]}' is {len(ref)}-D ({fmt(ref)})",
                                 involves=(0, i), help="flatten or reshape the operands to the same rank")
            for d in range(len(ref)):
                if d != ax and s[d] is not None and ref[d] is not None and s[d] != ref[d]:
                    e = ShapeError("E0321", f"Concat '{self.name}' along axis {ax}: '{self.spec.bottoms[0]}'"
                                   f" is {fmt(ref)} but '{self.spec.bottoms[i]}' is {fmt(s)} (axis {d} differs: "
                                   f"{ref[d]} vs {s[d]})", involves=(0, i),
                                   help=f"every bottom must match on all axes but the concat axis {ax}; "
                                        f"make '{self.spec.bottoms[i]}' {ref[d]} on axis {d}")
                    e.operands = (bottoms, i, [d] if d >= 2 else [])
                    raise e
            total = None if total is None or s[ax] is None else total + s[ax]
        return [ref[:ax] + (total,) + ref[ax + 1:]]

    def explain(self, error, upstream):
        return _explain_mismatch(error, upstream)

    def forward(self, xp, bottoms, params):
        return [xp.concatenate(bottoms, axis=self.axis(bottoms[0].ndim))], [b.shape[self.axis(b.ndim)] for b in bottoms]

    def backward(self, xp, sizes, dtops, params, need):
        dy = dtops[0]
        ax = self.axis(dy.ndim)
        cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        return list(xp.split(dy, cuts, axis=ax)), []

    def to_onnx(self, ex, step):
        ex.add_node("Concat", ex.bottoms(step), ex.tops(step), axis=self.axis(len(ex.in_shape(step))))


@register
class Slice(Layer):
    type = "Slice"
    v1 = (33, "SLICE")
    messages = {"slice_param": Msg("SliceParameter", {"axis": F(int, 1), "slice_point": F(int, repeated=True),
                                                      "slice_dim": F(int, None)})}
    n_tops = (1, None)

    def shape(self, bottoms):
        x = bottoms[0]
        ax = canonical_axis(self.p.slice_dim if self.p.slice_dim is not None and not self.p.has("axis")
                            else self.p.axis, len(x))
        n, pts, ntop = x[ax], self.p.slice_point, len(self.spec.tops)
        if pts:
            if len(pts) != ntop - 1:
                raise ShapeError("E0330", f"Slice '{self.name}' has {len(pts)} slice_point for {ntop} tops",
                                 field="slice_point", help=f"give {ntop - 1} slice points for {ntop} tops")
            bad = next((k for k, p in enumerate(pts) if p <= (pts[k - 1] if k else 0)
                        or (n is not None and p >= n)), None)
            if bad is not None:
                p = pts[bad]
                why = (f"not after the previous point {pts[bad - 1]}" if bad and p <= pts[bad - 1] else
                       f"outside axis {ax} of size {n}, whose points lie strictly between 0 and {n}")
                raise ShapeError("E0331", f"Slice '{self.name}': slice_point {p} is {why}", field="slice_point",
                                 index=bad, involves=(0,),
                                 notes=[f"slice points {pts} cut axis {ax} of {fmt(x)} into {ntop} pieces"],
                                 help=f"use increasing points strictly between 0 and {n}"
                                      + (f", e.g. `slice_point: {n // ntop}`" if ntop == 2 and n and n > 1 else ""))
            sizes = [b - a for a, b in zip([0] + pts, pts + [n])] if n is not None else [None] * ntop
        else:
            if n is not None and n % ntop:
                raise ShapeError("E0331", f"Slice '{self.name}': axis {ax} of size {n} does not split evenly "
                                 f"into {ntop} tops", involves=(0,), help="give explicit `slice_point` values")
            sizes = [None if n is None else n // ntop] * ntop
        self.sizes, self.ax = sizes, ax
        return [x[:ax] + (s,) + x[ax + 1:] for s in sizes]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        n = x.shape[self.ax]
        pts = self.p.slice_point or [n // len(self.spec.tops) * i for i in range(1, len(self.spec.tops))]
        return [y.copy() for y in xp.split(x, pts, axis=self.ax)], None

    def backward(self, xp, saved, dtops, params, need):
        return [xp.concatenate(dtops, axis=self.ax)], []

    def to_onnx(self, ex, step):
        ax = canonical_axis(self.p.slice_dim if self.p.slice_dim is not None and not self.p.has("axis") else self.p.axis,
                            len(ex.in_shape(step)))
        sizes = [ex.out_shape(step, i)[ax] for i in range(len(step.node.tops))]
        ex.add_node("Split", ex.bottoms(step) + [ex.ints(sizes)], ex.tops(step), axis=ax)


@register
class Split(Layer):
    type = "Split"
    v1 = (22, "SPLIT")
    n_tops = (1, None)
    keeps_layout = True

    def shape(self, bottoms):
        return [bottoms[0]] * len(self.spec.tops)

    def forward(self, xp, bottoms, params):
        return [bottoms[0]] * len(self.spec.tops), None

    def backward(self, xp, saved, dtops, params, need):
        g = dtops[0].copy()
        for d in dtops[1:]:
            g += d
        return [g], []

    def to_onnx(self, ex, step):
        for t in ex.tops(step):
            ex.add_node("Identity", ex.bottoms(step), [t])


class _View(Layer):
    """A new shape over the same values (Flatten, Reshape): forward and backward are reshapes."""

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        return [x.reshape(self.shape([tuple(x.shape)])[0])], x.shape

    def backward(self, xp, shape, dtops, params, need):
        return [dtops[0].reshape(shape)], []


@register
class Flatten(_View):
    type = "Flatten"
    v1 = (8, "FLATTEN")
    messages = {"flatten_param": Msg("FlattenParameter", {"axis": F(int, 1), "end_axis": F(int, -1)})}

    def shape(self, bottoms):
        x = bottoms[0]
        a = canonical_axis(self.p.axis, len(x))
        e = canonical_axis(self.p.end_axis, len(x), "end_axis", "end_axis")
        if e < a:
            raise ShapeError("E0220", f"Flatten '{self.name}': end_axis {self.p.end_axis} (axis {e}) comes before axis "
                             f"{self.p.axis} (axis {a}) of the {len(x)}-D input", field="end_axis", involves=(0,),
                             help=f"use an end_axis at or after axis {a} (-1: to the last axis)")
        return [x[:a] + (count(x, a, e + 1),) + x[e + 1:]]

    def to_onnx(self, ex, step):
        x = ex.in_shape(step)
        a, e = canonical_axis(self.p.axis, len(x)), canonical_axis(self.p.end_axis, len(x))
        ex.add_node("Reshape", ex.bottoms(step) + [ex.ints([0] * a + [-1] + list(x[e + 1:]))], ex.tops(step))



@register
class Reshape(_View):
    type = "Reshape"
    messages = {"reshape_param": Msg("ReshapeParameter", {
        "shape": F(Msg("BlobShape", {"dim": F(int, repeated=True)})), "axis": F(int, 0), "num_axes": F(int, -1)})}

    def shape(self, bottoms):
        x = bottoms[0]
        dims = list(self.p.shape.dim)
        nd = len(x)
        axis = self.p.axis if self.p.axis >= 0 else nd + 1 + self.p.axis
        if not 0 <= axis <= nd:
            raise ShapeError("E0220", f"Reshape '{self.name}': axis {self.p.axis} is out of range for a "
                             f"{nd}-D input", field="axis", involves=(0,), help=f"use an axis in [{-nd - 1}, {nd}]")
        end = nd if self.p.num_axes == -1 else axis + self.p.num_axes
        if end > nd or self.p.num_axes < -1:
            raise ShapeError("E0220", f"Reshape '{self.name}': axis + num_axes = {end} exceeds the input's {nd} "
                             "axes", field="num_axes", involves=(0,), help="reduce num_axes")
        if dims.count(-1) > 1:
            where = [i for i, d in enumerate(dims) if d == -1]
            raise ShapeError("E0340", f"Reshape '{self.name}' has {len(where)} -1 dims (dims "
                             f"{', '.join(map(str, where))} of {{{' '.join(f'dim: {d}' for d in dims)}}}); only one "
                             "can be inferred", field="shape.dim", index=where[1], involves=(0,),
                             notes=["-1 means \"whatever size keeps the element count\", which fixes one dim, not two"],
                             help="keep one -1 and give the others explicitly (or 0, to copy the input's size at that "
                                  "position)")
        out = []
        for i, d in enumerate(dims):
            if d == 0:
                if axis + i >= nd:
                    raise ShapeError("E0340", f"Reshape '{self.name}': dim {i} is 0 (copy the input's axis "
                                     f"{axis + i}) but the input {fmt(x)} has only {nd} axes", field="shape",
                                     involves=(0,), help="give an explicit size instead of 0")
                out.append(x[axis + i])
            elif d < -1:
                raise ShapeError("E0340", f"Reshape '{self.name}': dim {d} is invalid", field="shape",
                                 help="dims are positive, 0 (copy) or -1 (infer)")
            else:
                out.append(d)
        replaced = x[axis:end]
        total = count(replaced)
        if -1 in dims:
            known = count(tuple(d for d in out if d != -1))
            i = out.index(-1)
            if total is None or known is None:
                out[i] = None
            elif known == 0 or total % known:
                raise ShapeError("E0341", f"Reshape '{self.name}' cannot infer the -1 dim: {total} elements "
                                 f"({fmt(replaced)}) do not divide by {known} ({' x '.join(map(str, dims))}, "
                                 "without the -1)", field="shape", involves=(0,),
                                 help=f"choose dims whose product divides {total}")
            else:
                out[i] = total // known
        else:
            prod = count(tuple(out))
            if total is not None and prod is not None and prod != total:
                help = f"fix the dims so their product is {total}"
                for k in reversed(range(len(out))):
                    rest = count(tuple(d for j, d in enumerate(out) if j != k))
                    if dims[k] > 0 and rest and total % rest == 0:
                        alt = [d if j != k else -1 for j, d in enumerate(dims)]
                        shown = " ".join(f"dim: {d}" for d in alt)
                        got = tuple(d if j != k else total // rest for j, d in enumerate(out))
                        help = f"infer one dim with -1, e.g. `shape {{ {shown} }}` (giving {fmt(got)}), or " + help
                        break
                raise ShapeError("E0341", f"Reshape '{self.name}' changes the element count: input {fmt(x)} "
                                 f"has {total} values but shape {{{' '.join(f'dim: {d}' for d in dims)}}} has {prod}",
                                 field="shape", involves=(0,),
                                 notes=["Reshape keeps every value: the new dims' product must equal the input's count"],
                                 help=help)
        return [x[:axis] + tuple(out) + x[end:]]

    def to_onnx(self, ex, step):
        """ONNX's 0 copies the input's size at the same index, which is where Caffe's 0 reads it; the
        axes before `axis` are copied (0), those after the replaced span are given."""
        x = ex.in_shape(step)
        axis = self.p.axis if self.p.axis >= 0 else len(x) + 1 + self.p.axis
        end = len(x) if self.p.num_axes == -1 else axis + self.p.num_axes
        shape = [0] * axis + list(self.p.shape.dim) + list(x[end:])
        ex.add_node("Reshape", ex.bottoms(step) + [ex.ints(shape)], ex.tops(step))



@register
class Permute(Layer):
    type = "Permute"
    messages = {"permute_param": Msg("PermuteParameter", {"order": F(int, repeated=True)})}

    def order(self, nd):
        given = [o % nd if o < 0 else o for o in self.p.order]
        if any(not 0 <= o < nd for o in given) or len(set(given)) != len(given):
            raise ShapeError("E0342", f"Permute '{self.name}': order {self.p.order} is not a permutation of "
                             f"the input's {nd} axes", field="order", involves=(0,),
                             help=f"list each axis in 0..{nd - 1} at most once")
        return given + [a for a in range(nd) if a not in given]     # SSD's rule: the rest keep order

    def shape(self, bottoms):
        x = bottoms[0]
        return [tuple(x[o] for o in self.order(len(x)))]

    def forward(self, xp, bottoms, params):
        order = self.order(bottoms[0].ndim)
        return [xp.ascontiguousarray(bottoms[0].transpose(order))], order

    def backward(self, xp, order, dtops, params, need):
        inv = [order.index(i) for i in range(len(order))]
        return [xp.ascontiguousarray(dtops[0].transpose(inv))], []

    def to_onnx(self, ex, step):
        ex.add_node("Transpose", ex.bottoms(step), ex.tops(step), perm=self.order(len(ex.in_shape(step))))


@register
class Crop(Layer):
    type = "Crop"
    bottom_roles = ("the blob to crop", "the reference blob whose size it takes")
    messages = {"crop_param": Msg("CropParameter", {"axis": F(int, 2), "offset": F(int, repeated=True)})}
    n_bottoms = (2, 2)

    def offsets(self, nd):
        ax = canonical_axis(self.p.axis, nd)
        off = self.p.offset
        n = nd - ax
        if len(off) not in (0, 1, n):
            raise ShapeError("E0350", f"Crop '{self.name}' has {len(off)} offsets for {n} cropped axes",
                             field="offset", help=f"give 0, 1 or {n} offsets")
        return ax, [0] * n if not off else off * n if len(off) == 1 else list(off)

    def shape(self, bottoms):
        x, ref = bottoms
        if len(x) != len(ref):
            raise ShapeError("E0350", f"Crop '{self.name}': input {fmt(x)} and reference {fmt(ref)} differ "
                             "in rank", involves=(0, 1), help="crop to a reference of the same rank")
        ax, off = self.offsets(len(x))
        for i, o in enumerate(off):
            d = ax + i
            if x[d] is not None and ref[d] is not None and o + ref[d] > x[d]:
                raise ShapeError("E0351", f"Crop '{self.name}' reaches beyond its input on axis {d}: offset {o} "
                                 f"+ reference size {ref[d]} > input size {x[d]}", field="offset",
                                 involves=(0, 1),
                                 help=f"use an offset of at most {max(x[d] - ref[d], 0)}" if x[d] >= ref[d]
                                 else f"the reference is larger than the input ({ref[d]} > {x[d]}); "
                                      "crop the larger blob to the smaller one")
        return [x[:ax] + ref[ax:]]

    def forward(self, xp, bottoms, params):
        x, ref = bottoms
        ax, off = self.offsets(x.ndim)
        idx = tuple(slice(None) for _ in range(ax)) + tuple(slice(o, o + ref.shape[ax + i]) for i, o in enumerate(off))
        return [x[idx].copy()], (x.shape, idx)

    def backward(self, xp, saved, dtops, params, need):
        shape, idx = saved
        dx = xp.zeros(shape, dtype=dtops[0].dtype)
        dx[idx] = dtops[0]
        return [dx, None], []

    def to_onnx(self, ex, step):
        ax, off = self.offsets(len(ex.in_shape(step)))
        ref = ex.in_shape(step, 1)
        ends = [o + ref[ax + i] for i, o in enumerate(off)]
        ex.add_node("Slice", [ex.bottoms(step)[0], ex.ints(off), ex.ints(ends), ex.ints(range(ax, ax + len(off)))],
                    ex.tops(step))


@register
class Silence(Layer):
    type = "Silence"
    v1 = (36, "SILENCE")
    n_bottoms, n_tops = (1, None), (0, 0)
    is_sink = True
    silences = True

    def shape(self, bottoms):
        return []

    def forward(self, xp, bottoms, params):
        return [], [(b.shape, b.dtype) for b in bottoms]

    def backward(self, xp, saved, dtops, params, need):
        return [xp.zeros(s, dtype=d) for s, d in saved], []
