"""MAX pooling vectorised across output columns: a kernel generated as LLVM IR for each layer's
shape (jit.py) computes a vector of outputs of one row, each lane gathering its window's cells
(masked where the window leaves the plane) and keeping Caffe's first max in scan order with
strict compares, as kernels.max_pool_forward does one output at a time (~4x faster: cifar10_quick's
3x3/2 pool1, 5.4 -> 1.2 ms)."""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .jit import compile_ir, fresh_name, lanes, register, splat

_NEG_INF = "0xFFF0000000000000"         # -inf, as LLVM writes a float or double constant


@functools.cache
def pool_kernel(dtype, n: int, kw: int, sw: int, H: int, W: int) -> int:
    """The address of a kernel for n outputs of one row: kernel(x, y, arg, hs, ws0, nl, iy0, iy1)
    with x the input plane (H x W), output lane i's window starting at row hs and column
    ws0 + i*sw, its rows iy0 <= iy < iy1 inside the plane; y[i] = the window's max, arg[i] = its
    flat index in the plane (the window's top-left cell if nothing beats -inf, -1 where that cell
    is padding or past the plane), for lanes i < nl."""
    ty, a = ("float", 4) if np.dtype(dtype) == np.float32 else ("double", 8)
    vt, it, sfx = f"<{n} x {ty}>", f"<{n} x i64>", f"v{n}f{8 * a}"
    iota = "<" + ", ".join(f"i64 {i}" for i in range(n)) + ">"
    name = fresh_name("netdsl_pool")
    L = [f"define void @{name}(ptr noalias %x, ptr noalias %y, ptr noalias %arg, i64 %hs, i64 %ws0, i64 %nl, "
         "i64 %iy0, i64 %iy1) {", "entry:"]
    steps = "<" + ", ".join(f"i64 {i * sw}" for i in range(n)) + ">"
    L += splat(n, "i64", "%ws0", "ws0s") + [f"  %ws = add {it} %ws0s, {steps}"]
    L += splat(n, "i64", "%nl", "nls") + [f"  %lanes = icmp slt {it} {iota}, %nls"]
    L += [f"  %hsW = mul i64 %hs, {W}"] + splat(n, "i64", "%hsW", "hsWs")
    L += [f"  %hin = icmp ult i64 %hs, {H}", f"  %win = icmp ult {it} %ws, splat (i64 {W})",    # 0 <= start < size
          f"  %tl = add {it} %hsWs, %ws", f"  %tl1 = select <{n} x i1> %win, {it} %tl, {it} splat (i64 -1)",
          f"  %at0 = select i1 %hin, {it} %tl1, {it} splat (i64 -1)",
          "  %any = icmp slt i64 %iy0, %iy1", "  br i1 %any, label %row, label %exit", "row:",
          "  %iy = phi i64 [%iy0, %entry], [%iy1n, %row]",
          f"  %b = phi {vt} [splat ({ty} {_NEG_INF}), %entry], [%b{kw - 1}, %row]",
          f"  %at = phi {it} [%at0, %entry], [%t{kw - 1}, %row]",
          f"  %rW = mul i64 %iy, {W}"] + splat(n, "i64", "%rW", "rWs")
    best, at = "%b", "%at"
    for dc in range(kw):                 # the row's cells in scan order: a strict > keeps the first max
        L += [f"  %c{dc} = add {it} %ws, splat (i64 {dc})",
              f"  %in{dc} = icmp ult {it} %c{dc}, splat (i64 {W})",          # 0 <= column < W
              f"  %m{dc} = and <{n} x i1> %in{dc}, %lanes",
              f"  %ix{dc} = add {it} %rWs, %c{dc}",
              f"  %p{dc} = getelementptr {ty}, ptr %x, {it} %ix{dc}",
              f"  %v{dc} = call {vt} @llvm.masked.gather.{sfx}.v{n}p0(<{n} x ptr> align {a} %p{dc}, "
              f"<{n} x i1> %m{dc}, {vt} splat ({ty} {_NEG_INF}))",
              f"  %g{dc} = fcmp ogt {vt} %v{dc}, {best}",
              f"  %b{dc} = select <{n} x i1> %g{dc}, {vt} %v{dc}, {vt} {best}",
              f"  %t{dc} = select <{n} x i1> %g{dc}, {it} %ix{dc}, {it} {at}"]
        best, at = f"%b{dc}", f"%t{dc}"
    L += ["  %iy1n = add i64 %iy, 1", "  %more = icmp slt i64 %iy1n, %iy1", "  br i1 %more, label %row, label %exit",
          "exit:", f"  %fb = phi {vt} [splat ({ty} {_NEG_INF}), %entry], [{best}, %row]",
          f"  %ft = phi {it} [%at0, %entry], [{at}, %row]", f"  %fi = trunc {it} %ft to <{n} x i32>",
          f"  call void @llvm.masked.store.{sfx}.p0({vt} %fb, ptr align {a} %y, <{n} x i1> %lanes)",
          f"  call void @llvm.masked.store.v{n}i32.p0(<{n} x i32> %fi, ptr align 4 %arg, <{n} x i1> %lanes)",
          "  ret void", "}",
          f"declare {vt} @llvm.masked.gather.{sfx}.v{n}p0(<{n} x ptr>, <{n} x i1>, {vt})",
          f"declare void @llvm.masked.store.{sfx}.p0({vt}, ptr, <{n} x i1>)",
          f"declare void @llvm.masked.store.v{n}i32.p0(<{n} x i32>, ptr, <{n} x i1>)"]
    return compile_ir("\n".join(L), name)


_pool, UNAVAILABLE = register("pool", ("ptr", "ptr", "ptr", "i64", "i64", "i64", "i64", "i64"),
                             lambda dtype: pool_kernel(dtype, lanes(dtype), 3, 2, 8, 8))


class MaxPool:
    """A MAX pooling layer's forward: its kernel, for planes (Q, H, W) -> (Q, OH, OW)."""

    def __init__(self, dtype, kh, kw, sh, sw, ph, pw, H, W):
        self.n = lanes(dtype)
        self.geom = (kh, sh, sw, ph, pw)
        self.fn = pool_kernel(np.dtype(dtype), self.n, kw, sw, H, W)

    def __call__(self, x, y, arg):
        max_pool_rows(self.fn, self.n, x, y, arg, *self.geom)


@njit(cache=True, parallel=True)
def max_pool_rows(fn, n, x, y, arg, kh, sh, sw, ph, pw):
    """y, arg (Q, OH, OW) = each window's max and where, n outputs of a row a kernel call."""
    Q, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    item = x.itemsize
    for q in prange(Q):
        xq = x.ctypes.data + q * H * W * item
        for oy in range(OH):
            hs = oy * sh - ph
            for ox in range(0, OW, n):
                o = (q * OH + oy) * OW + ox
                _pool(fn, xq, y.ctypes.data + o * item, arg.ctypes.data + o * 4, hs, ox * sw - pw, min(n, OW - ox),
                      max(hs, 0), min(hs + kh, H))
