"""Direct convolution: micro-kernels generated as LLVM IR for each layer's shape (jit.py),
driven by Numba's thread pool. No im2col
columns: a tile of output pixels for a block of output channels keeps its sums in vector
registers while it runs over every (input channel, ky, kx) tap, the way oneDNN's JIT kernels
work. The vectors run along the output channels (the weights' rows, laid out tap-major), each
input value is broadcast, so any map size and kernel size fill the vectors.

One tile kernel serves the three passes of a training step:
  forward   out[o, y, x] = sum_t x[off_t + y*rs + x*cs] * w[t, o]   (+ bias, ReLU; planes)
  dx        the same with dy padded as x and the weights flipped and transposed
  dW        dWt[tap, o] += sum_pixels x[pix + tap] * dy[o, pix]      (rows, accumulated)
Every stride and offset of a tile is a constant of its kernel (a layer's kernels are compiled
when the plan is lowered; LLVM folds them into the addresses); the drivers call them through the
trampoline netdsl_tile."""
from __future__ import annotations

import functools

import numpy as np
from numba import config, get_thread_id, njit, prange, uintp

from .jit import budget, compile_ir, fresh_name, lanes, register, splat

_ARGS = "ptr noalias %x, ptr noalias %w, ptr noalias %out, i64 %T, ptr noalias %offs, i64 %nvalid, ptr noalias %bias, double %slope"


@functools.cache
def tile_kernel(dtype, n: int, PR: int, PC: int, OV: int, rs: int, cs: int, ws: int, ors: int, ocs: int,
                bias: bool, relu: bool, accumulate: bool) -> int:
    """The address of a kernel for one tile of PR x PC pixels (or taps) by OV vectors of n lanes
    of output channels: acc[pr, pc, v] = sum_{t < T} x[offs[t] + pr*rs + pc*cs] * w[t*ws + v],
    then + bias[v], ReLU with negative slope `slope`, and stored (added, with `accumulate`) at
    out[pr*ors + pc*ocs + v], the lanes v < nvalid. w and bias are read for all OV vectors (pad
    them)."""
    dt = np.dtype(dtype)
    ty, a = ("float", 4) if dt == np.float32 else ("double", 8)
    vt, sfx = f"<{n} x {ty}>", f"v{n}f{8 * a}"
    name = fresh_name("netdsl_tile")
    iota = "<" + ", ".join(f"i64 {i}" for i in range(n)) + ">"
    acc = [(pr, pc, o) for pr in range(PR) for pc in range(PC) for o in range(OV)]
    L = [f"define void @{name}({_ARGS}) #0 {{", "entry:", "  %none = icmp eq i64 %T, 0",
         "  br i1 %none, label %exit, label %loop", "loop:", "  %t = phi i64 [0, %entry], [%t1, %loop]"]
    L += [f"  %a{pr}_{pc}_{o} = phi {vt} [zeroinitializer, %entry], [%n{pr}_{pc}_{o}, %loop]" for pr, pc, o in acc]
    L += ["  %tp = getelementptr inbounds i32, ptr %offs, i64 %t", "  %to32 = load i32, ptr %tp, align 4",
          "  %to = sext i32 %to32 to i64", f"  %xb = getelementptr inbounds {ty}, ptr %x, i64 %to",
          f"  %wo = mul nuw i64 %t, {ws}", f"  %wb = getelementptr inbounds {ty}, ptr %w, i64 %wo"]
    for o in range(OV):
        L += [f"  %wp{o} = getelementptr inbounds {ty}, ptr %wb, i64 {o * n}", f"  %wv{o} = load {vt}, ptr %wp{o}, align {a}"]
    for pr in range(PR):
        for pc in range(PC):
            p = f"{pr}_{pc}"
            L += [f"  %xp{p} = getelementptr inbounds {ty}, ptr %xb, i64 {pr * rs + pc * cs}",
                  f"  %xs{p} = load {ty}, ptr %xp{p}, align {a}"] + splat(n, ty, f"%xs{p}", f"xv{p}")
            L += [f"  %n{p}_{o} = call {vt} @llvm.fma.{sfx}({vt} %xv{p}, {vt} %wv{o}, {vt} %a{p}_{o})" for o in range(OV)]
    L += ["  %t1 = add nuw i64 %t, 1", "  %more = icmp ult i64 %t1, %T", "  br i1 %more, label %loop, label %exit",
          "exit:"]
    L += [f"  %f{pr}_{pc}_{o} = phi {vt} [zeroinitializer, %entry], [%n{pr}_{pc}_{o}, %loop]" for pr, pc, o in acc]
    L += splat(n, "i64", "%nvalid", "lim")
    if relu:
        L += [f"  %s0 = fptrunc double %slope to {ty}" if ty == "float" else "  %s0 = fadd double %slope, 0.0"]
        L += splat(n, ty, "%s0", "sv")
    for o in range(OV):
        L += [f"  %lane{o} = add <{n} x i64> {iota}, splat (i64 {o * n})",
              f"  %m{o} = icmp slt <{n} x i64> %lane{o}, %lim"]
        if bias:
            L += [f"  %bp{o} = getelementptr inbounds {ty}, ptr %bias, i64 {o * n}", f"  %bv{o} = load {vt}, ptr %bp{o}, align {a}"]
    for pr, pc, o in acc:
        p, v = f"{pr}_{pc}_{o}", f"%f{pr}_{pc}_{o}"
        if bias:
            L.append(f"  %b{p} = fadd {vt} {v}, %bv{o}")
            v = f"%b{p}"
        if relu:
            L += [f"  %pos{p} = fcmp ogt {vt} {v}, zeroinitializer", f"  %neg{p} = fmul {vt} {v}, %sv",
                  f"  %r{p} = select <{n} x i1> %pos{p}, {vt} {v}, {vt} %neg{p}"]
            v = f"%r{p}"
        L.append(f"  %op{p} = getelementptr inbounds {ty}, ptr %out, i64 {pr * ors + pc * ocs + o * n}")
        if accumulate:
            L += [f"  %old{p} = call {vt} @llvm.masked.load.{sfx}.p0(ptr align {a} %op{p}, <{n} x i1> %m{o}, {vt} zeroinitializer)",
                  f"  %sum{p} = fadd {vt} %old{p}, {v}"]
            v = f"%sum{p}"
        L.append(f"  call void @llvm.masked.store.{sfx}.p0({vt} {v}, ptr align {a} %op{p}, <{n} x i1> %m{o})")
    L += ["  ret void", "}",
          f"declare {vt} @llvm.fma.{sfx}({vt}, {vt}, {vt})",
          f"declare {vt} @llvm.masked.load.{sfx}.p0(ptr, <{n} x i1>, {vt})",
          f"declare void @llvm.masked.store.{sfx}.p0({vt}, ptr, <{n} x i1>)",
          'attributes #0 = { nounwind }']
    return compile_ir("\n".join(L), name)


def _probe(dtype):
    n = lanes(dtype)
    tile_kernel(dtype, n, 1, 2, 1, 1, 1, n, 1, 1, True, True, False)
    tile_kernel(dtype, n, 1, 2, 1, 1, 1, n, 1, 1, False, False, True)


_tile, UNAVAILABLE = register("tile", ("ptr", "ptr", "ptr", "i64", "ptr", "i64", "ptr", "double"), _probe)
_u = uintp


@njit(cache=True, parallel=True)
def conv_planes(fns, x, w, out, offs, bias, slope, rs, cs, PR, PC, OB, rows, lo, hi, sh, dh, per_ky):
    """out (N, M, OH, OW) = the tiles of kernels `fns` [full, last column, last row, corner]
    over x (N images), a task for each image's PR output rows and OB channels: the tiles go
    channel-last into the thread's `rows` (PR*OW*OB), which then moves to the output planes.
    The taps run kernel row by kernel row (per_ky each): a tile runs only the kernel rows that
    reach x's real rows [lo, hi), not its zero border."""
    N, M, OH, OW = out.shape
    kh = offs.size // per_ky
    xs, item, ws = x.size // N, out.itemsize, w.shape[1]
    ny, no = (OH + PR - 1) // PR, (M + OB - 1) // OB
    for task in prange(N * ny * no):
        n, r = task // (ny * no), task % (ny * no)
        y0, o0 = (r // no) * PR, (r % no) * OB
        pr = min(PR, OH - y0)
        a = max(0, (lo - (y0 + pr - 1) * sh + dh - 1) // dh)
        b = max(a, min(kh, (hi - 1 - y0 * sh) // dh + 1))
        t0, T = a * per_ky, (b - a) * per_ky
        last = 2 if pr < PR else 0
        buf = rows[get_thread_id()]
        for x0 in range(0, OW, PC):
            f = fns[last + (1 if OW - x0 < PC else 0)]
            _tile(f, x.ctypes.data + (n * xs + y0 * rs + x0 * cs) * item, w.ctypes.data + (t0 * ws + o0) * item,
                  buf.ctypes.data + x0 * OB * item, T, offs.ctypes.data + t0 * 4, M - o0,
                  bias.ctypes.data + o0 * item, slope)
        for o in range(min(OB, M - o0)):
            for y in range(pr):
                for i in range(OW):
                    out[n, o0 + o, y0 + y, i] = buf[_u((y * OW + i) * OB + o)]


@njit(cache=True, parallel=True)
def conv_rows(fns, x, dy, rows, dWt, part, offs, C, kh, kw, PR, OB, plane, rs, OW, lo, hi, sh, dh, S):
    """dWt (G, C*kh*kw, Mp) += per image group g, the taps' sums over the pixels: a task for each
    group and each of S slices of the input channels, image by image: the image's dy (N, M, P)
    as pixel rows in the thread's `rows` (P, Mp), then every tile of taps over it and x while both
    are in cache, a tile for PR kernel rows of an input channel and OB output channels. A tile
    sums only the output rows whose input rows reach x's real rows [lo, hi). part[n] = the sums of
    dy[n]'s planes (when part has columns: the bias gradient's terms)."""
    G, _, Mp = dWt.shape
    N, M = dy.shape[0], dy.shape[1]
    OH = offs.size // OW
    xs, item = x.size // N, x.itemsize
    per = (N + G - 1) // G
    for task in prange(G * S):
        g, sl = task // S, task % S
        buf = rows[get_thread_id()]
        for n in range(g * per, min(N, (g + 1) * per)):
            _pixel_rows(dy[n], buf, part[n], sl == 0 and part.shape[1] > 0)
            for c in range(sl * C // S, (sl + 1) * C // S):
                for ky0 in range(0, kh, PR):
                    pr = min(PR, kh - ky0)
                    y0 = max(0, (lo - (ky0 + pr - 1) * dh + sh - 1) // sh)
                    y1 = min(OH, (hi - 1 - ky0 * dh) // sh + 1)
                    if y1 <= y0:
                        continue
                    for o0 in range(0, M, OB):
                        _tile(fns[1 if pr < PR else 0], x.ctypes.data + (n * xs + c * plane + ky0 * rs) * item,
                              buf.ctypes.data + (y0 * OW * Mp + o0) * item,
                              dWt.ctypes.data + ((g * C * kh + c * kh + ky0) * kw * Mp + o0) * item, (y1 - y0) * OW,
                              offs.ctypes.data + y0 * OW * 4, M - o0, 0, 0.0)     # no bias


@njit(cache=True)
def _pixel_rows(dy, rows, part, sums):
    """rows[p, o] = dy[o, p] (dy (M, P)), a block of pixels at a time; part[o] = the sum of dy[o]
    (with `sums`)."""
    M, P = dy.shape
    for p0 in range(0, P, 64):
        for o in range(M):
            s = part.dtype.type(0)
            for p in range(p0, min(P, p0 + 64)):
                v = dy[o, p]
                rows[p, o] = v
                s += v
            if sums:
                part[o] = s if p0 == 0 else part[o] + s


@njit(cache=True, parallel=True)
def pad_into(x, xp, ph, pw):
    """xp's interior = x (N, C, H, W); its border (zero) untouched."""
    N, C, H, W = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for y in range(H):
            xp[n, c, ph + y, pw:pw + W] = x[n, c, y]


def _split(n: int, most: int) -> int:
    """The tile size <= most that splits n into the fewest, most even tiles."""
    parts = -(-n // max(1, min(n, most)))
    return -(-n // parts)


def _channel_blocks(M: int, n: int, most: int):
    """(vectors a block, channels a block, M padded to whole blocks): M channels in blocks of at
    most `most` (at least one) vectors of n lanes, as even as they come."""
    ov = _split(-(-M // n), max(1, most))
    return ov, ov * n, -(-M // (ov * n)) * ov * n


def fits(kh, kw, sh, sw, ph, pw, dh, dw, C, H, W, M, OH, OW, dx: bool) -> str | None:
    """Why a convolution runs im2col + GEMM rather than direct (None: direct). Measured
    (docs/benchmarks.md): the direct kernels win where a tile has taps enough to run over and dx
    is as large as y; a 1x1 kernel's columns are its input, already a GEMM."""
    if UNAVAILABLE:
        return UNAVAILABLE
    if kh * kw == 1:
        return "a 1x1 kernel is a GEMM of its input"
    if C * kh * kw < 64:
        return "fewer than 64 taps per output"
    if kw > budget():
        return "kernel wider than a tile"
    if max(C * (H + 2 * ph) * (W + 2 * pw), M * (OH + 2 * dh * kh) * (OW + 2 * dw * kw)) >= 2 ** 31:
        return "an image too large for the kernels' 32-bit offsets"
    dx = dx and (sh, sw) == (1, 1)            # strided: dx by GEMM and col2im
    if dx and (ph > dh * (kh - 1) or pw > dw * (kw - 1)):
        return "padding wider than the kernel"
    if dx and H * W > 2.5 * OH * OW:        # LeNet's conv2 (2.25x) is faster direct, dx's border and all
        return "dx as a convolution would run over dy's zero border"
    return None


class Planes:
    """A convolution's output planes (N, M, OH, OW) from an input padded by ph rows and pw columns
    (N, C, HP, WP):
    the tap table, the tiling and its kernels. Weights (kh*C*kw, Mp), taps (ky, c, kx)
    in rows, bias (Mp,). `scratch(shape)` allocates the threads' buffers."""

    def __init__(self, scratch, dtype, C, kh, kw, ph, sh, sw, dh, dw, HP, WP, M, OH, OW, bias, relu):
        n = lanes(dtype)
        ov, self.OB, self.Mp = _channel_blocks(M, n, budget() // 8)
        per = budget() // ov
        self.PC = _split(OW, per)
        self.PR = _split(OH, max(1, per // self.PC))
        self.rs, self.cs, self.sh, self.dh, self.per_ky = sh * WP, sw, sh, dh, C * kw
        self.lo, self.hi = ph, HP - ph
        self.offs = np.array([ky * dh * WP + c * HP * WP + kx * dw for ky in range(kh) for c in range(C)
                              for kx in range(kw)], np.int32)
        fns = np.zeros(4, np.int64)
        for last_row in (0, 1):
            for last_col in (0, 1):
                pr = OH % self.PR if last_row else self.PR
                pc = OW % self.PC if last_col else self.PC
                if pr and pc:
                    fns[2 * last_row + last_col] = tile_kernel(np.dtype(dtype), n, pr, pc, ov, sh * WP, sw, self.Mp,
                                                               OW * self.OB, self.OB, bias, relu, False)
        self.fns = fns
        self.rows = scratch((config.NUMBA_NUM_THREADS, self.PR * OW * self.OB))

    def __call__(self, x, w, out, bias, slope):
        conv_planes(self.fns, x, w, out, self.offs, bias, float(slope), self.rs, self.cs, self.PR, self.PC, self.OB,
                    self.rows, self.lo, self.hi, self.sh, self.dh, self.per_ky)


class Rows:
    """A convolution's weight gradient, taps (c, ky, kx) by output channel (G, C*kh*kw, Mp) for
    each image group, from the input padded by ph rows and pw columns (N, C, HP, WP) and dy
    (N, M, OH*OW), each image of it made
    pixel rows (OH*OW, Mp) in the thread's buffer as its turn comes."""

    def __init__(self, scratch, dtype, N, C, kh, kw, ph, sh, sw, dh, dw, HP, WP, M, OH, OW, threads):
        n = lanes(dtype)
        ov, self.OB, self.Mp = _channel_blocks(M, n, budget() // kw)
        self.PR = _split(kh, max(1, budget() // (kw * ov)))
        self.C, self.kh, self.kw = C, kh, kw
        self.plane, self.rs, self.OW, self.lo, self.hi, self.sh, self.dh = HP * WP, dh * WP, OW, ph, HP - ph, sh, dh
        self.G = min(N, threads)                        # image groups, one a thread,
        self.S = min(C, -(-2 * threads // self.G)) if self.G < threads else 1   # or slices of channels
        self.offs = np.array([y * sh * WP + x * sw for y in range(OH) for x in range(OW)], np.int32)
        fns = np.zeros(2, np.int64)
        for last in (0, 1):
            pr = kh % self.PR if last else self.PR
            if pr:
                fns[last] = tile_kernel(np.dtype(dtype), n, pr, kw, ov, dh * WP, dw, self.Mp, kw * self.Mp, self.Mp,
                                        False, False, True)
        self.fns = fns
        self.rows = scratch((config.NUMBA_NUM_THREADS, OH * OW, self.Mp))      # a thread's image of dy

    def __call__(self, x, dy, dWt, part):
        dWt.fill(0)
        conv_rows(self.fns, x, dy, self.rows, dWt, part, self.offs, self.C, self.kh, self.kw, self.PR, self.OB,
                  self.plane, self.rs, self.OW, self.lo, self.hi, self.sh, self.dh, self.S)
