"""Run compiled Programs with NumPy: the CPU oracle of the GPU step.

Every library kernel has a twin here with the same semantics (addressing included: GEMM operands
are strided views of the flat buffers, bounds-checked), and the arena is one byte array laid out
exactly as on the device, so a liveness or aliasing mistake in the planner shows up on the CPU.
The tests compare this against the eager executor, and the CUDA kernels against this.
"""
from __future__ import annotations

import math

import numpy as np

from .program import Program, Ref

F32 = np.float32
FLT_MIN = float(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)


class Memory:
    """The device's buffers on the host: the arena plus named persistent buffers."""

    def __init__(self, arena_bytes: int, buffers: dict[str, np.ndarray]):
        self.arena = np.zeros(max(arena_bytes, 256), np.uint8)
        self.buffers = buffers

    def resolve(self, program: Program, ref: Ref | None):
        if ref is None:
            return None
        if ref.space == "arena":
            t = program.tensors[ref.name]
            dtype = np.int32 if t.dtype == "i32" else F32
            return self.arena[t.offset:t.offset + t.nbytes].view(dtype)
        buf = self.buffers[ref.space]
        end = ref.offset + ref.count if ref.count else len(buf)
        assert end <= len(buf), f"{ref} runs past buffer {ref.space} ({len(buf)})"
        return buf[ref.offset:end]


def run(program: Program, mem: Memory) -> None:
    for launch in program.launches:
        args = [mem.resolve(program, a) if isinstance(a, Ref) or a is None else a for a in launch.args]
        KERNELS[launch.kind](launch.params, *args)


def _view(buf, offset: int, shape, strides):
    """A bounds-checked strided view of a flat array (strides in elements)."""
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    assert 0 <= offset and last < len(buf), f"strided access [{offset}, {last}] outside {len(buf)} elements"
    return np.lib.stride_tricks.as_strided(buf[offset:], shape, [s * buf.itemsize for s in strides])


# ------------------------------------------------------------------------------------- kernels

def gather(p, images, labels, seq, counter, mean, scale, x, y):
    n, d = p["N"], p["D"]
    idx = seq[(int(counter[0]) % p["WIN"]) * n:][:n]
    v = images.reshape(-1, d)[idx].astype(F32)
    if p["MEAN"]:
        v = v - F32(mean)
    if p["SCALE"]:
        v = v * F32(scale)
    x[:n * d] = v.reshape(-1)
    if y is not None:
        y[:n] = labels[idx].astype(F32)


def _geom(p):
    return [p[k] for k in ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW")]


def im2col(p, x, col):
    N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _geom(p)
    img = np.zeros((N, C, H + 2 * PH + DH * KH + SH * OH, W + 2 * PW + DW * KW + SW * OW), F32)
    img[:, :, PH:PH + H, PW:PW + W] = x[:N * C * H * W].reshape(N, C, H, W)
    out = col[:N * C * KH * KW * OH * OW].reshape(N, C, KH, KW, OH, OW)
    for ky in range(KH):
        for kx in range(KW):
            out[:, :, ky, kx] = img[:, :, ky * DH:ky * DH + SH * OH:SH, kx * DW:kx * DW + SW * OW:SW]


def col2im(p, col, dx):
    N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _geom(p)
    img = np.zeros((N, C, H + 2 * PH + DH * KH + SH * OH, W + 2 * PW + DW * KW + SW * OW), F32)
    c = col[:N * C * KH * KW * OH * OW].reshape(N, C, KH, KW, OH, OW)
    for ky in range(KH):
        for kx in range(KW):
            img[:, :, ky * DH:ky * DH + SH * OH:SH, kx * DW:kx * DW + SW * OW:SW] += c[:, :, ky, kx]
    out = dx[:N * C * H * W].reshape(N, C, H, W)
    g = img[:, :, PH:PH + H, PW:PW + W]
    out[...] = out + g if p["ACC"] else g


def gemm(p, A, B, C, bias, aux, ws, sems, slope):
    M, N, K, R = p["M"], p["N"], p["K"], p["R"]
    if p["SPLITS"] > 1:      # the partial tiles must fit the workspace, the tickets the semaphores
        tiles = math.ceil(M / p["BM"]) * math.ceil((N + (p["BIAS"] == 3)) / p["BN"])
        assert len(ws) >= p["BATCH"] * tiles * p["SPLITS"] * p["BM"] * p["BN"]
        assert len(sems) >= p["BATCH"] * tiles
    for b in range(p["BATCH"]):
        a = _view(A, b * p["SA"], (R, M, K), (p["RA"], 1 if p["TA"] else p["LDA"], p["LDA"] if p["TA"] else 1))
        bb = _view(B, b * p["SB"], (R, K, N), (p["RB"], 1 if p["TB"] else p["LDB"], p["LDB"] if p["TB"] else 1))
        acc = np.einsum("rik,rkj->ij", a.astype(np.float64), bb.astype(np.float64)).astype(F32)
        if p["BIAS"] == 3:                       # the ones column: row sums of op(A) -> bias
            rows = a.astype(np.float64).sum(axis=(0, 2)).astype(F32)
            bias[:M] = bias[:M] + rows if p["BETA"] else rows
        c = _view(C, b * p["SC"], (M, N), (p["LDC"], 1))
        v = acc + c if p["BETA"] else acc
        if p["BIAS"] == 1:
            v = v + bias[:M, None]
        elif p["BIAS"] == 2:
            v = v + bias[None, :N]
        if p["ACT"] == 1:
            v = np.where(v > 0, v, v * F32(slope))
        elif p["ACT"] == 2:
            m = _view(aux, b * p["SC"], (M, N), (p["LDC"], 1))
            v = np.where(m > 0, v, v * F32(slope))
        c[...] = v


def _pool_geom(p):
    return [p[k] for k in ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW")]


def maxpool_fwd(p, x, y, mask):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    xs = x[:NC * H * W].reshape(NC, H * W)
    ys, ms = y[:NC * OH * OW].reshape(NC, OH, OW), mask[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws = oy * SH - PH, ox * SW - PW
            he, we = min(hs + KH, H), min(ws + KW, W)
            hs, ws = max(hs, 0), max(ws, 0)
            cells = [h * W + w for h in range(hs, he) for w in range(ws, we)]
            vals = xs[:, cells]
            k = np.argmax(vals, axis=1)                     # the first max, as the strict '>'
            ys[:, oy, ox] = vals[np.arange(NC), k]
            ms[:, oy, ox] = np.asarray(cells)[k]


def maxpool_bwd(p, dy, mask, dx):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    g = np.zeros((NC, H * W), F32)
    d, m = dy[:NC * OH * OW].reshape(NC, -1), mask[:NC * OH * OW].reshape(NC, -1)
    for j in range(OH * OW):
        np.add.at(g, (np.arange(NC), m[:, j]), d[:, j])
    out = dx[:NC * H * W].reshape(NC, H * W)
    out[...] = out + g if p["ACC"] else g


def _ave_window(oy, ox, p):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    hs, ws = oy * SH - PH, ox * SW - PW
    he, we = min(hs + KH, H + PH), min(ws + KW, W + PW)
    size = (he - hs) * (we - ws)
    return max(hs, 0), max(ws, 0), min(he, H), min(we, W), size


def avepool_fwd(p, x, y):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    xs = x[:NC * H * W].reshape(NC, H, W)
    ys = y[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws, he, we, size = _ave_window(oy, ox, p)
            ys[:, oy, ox] = xs[:, hs:he, ws:we].reshape(NC, -1).sum(axis=1, dtype=F32) / F32(size)


def avepool_bwd(p, dy, dx):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    g = np.zeros((NC, H, W), F32)
    d = dy[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws, he, we, size = _ave_window(oy, ox, p)
            g[:, hs:he, ws:we] += (d[:, oy, ox] / F32(size))[:, None, None]
    out = dx[:NC * H * W].reshape(NC, H, W)
    out[...] = out + g if p["ACC"] else g


def bias_grad(p, dy, db):
    N, M, P = p["N"], p["M"], p["P"]
    s = dy[:N * M * P].reshape(N, M, P).sum(axis=(0, 2), dtype=np.float64).astype(F32)
    db[:M] = db[:M] + s if p["ACC"] else s


def col_sum(p, dy, db):
    N, M = p["N"], p["M"]
    s = dy[:N * M].reshape(N, M).sum(axis=0, dtype=np.float64).astype(F32)
    db[:M] = db[:M] + s if p["ACC"] else s


def relu_fwd(p, x, y, slope):
    n = p["CNT"]
    v = x[:n]
    y[:n] = np.where(v > 0, v, v * F32(slope))


def relu_bwd(p, dy, y, dx, slope):
    n = p["CNT"]
    g = np.where(y[:n] > 0, dy[:n], dy[:n] * F32(slope))
    dx[:n] = dx[:n] + g if p["ACC"] else g


def zero(p, buf):
    buf[:p["CNT"]] = 0


def softmax_loss(p, x, label, dx, hist, accum, counter, cap, ignore, weight):
    N, C = p["N"], p["C"]
    xs = x[:N * C].reshape(N, C).astype(np.float64)
    lab = label[:N].astype(np.int64)
    ok = lab != ignore if p["HAS_IGNORE"] else np.ones(N, bool)
    safe = np.where(ok, lab, 0)
    e = np.exp(xs - xs.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    valid = float(ok.sum())
    norm = {0: max(1.0, float(N)), 1: max(1.0, valid), 2: 1.0}[p["NORM"]]
    loss = float((-np.log(np.maximum(prob[np.arange(N), safe], FLT_MIN)) * ok).sum()) / norm
    if p["GRAD"]:
        g = prob.copy()
        g[np.arange(N), safe] -= 1
        g *= (ok * (float(weight) / norm))[:, None]
        out = dx[:N * C].reshape(N, C)
        out[...] = out + g.astype(F32) if p["ACC_GRAD"] else g.astype(F32)
    if p["TO_HISTORY"]:
        slot = int(counter[0]) % int(cap)
        v = F32(loss) * F32(weight)
        hist[slot] = hist[slot] + v if p["ADD"] else v
    else:
        accum[0] += float(F32(loss))


def accuracy(p, x, label, accum, ignore):
    N, C = p["N"], p["C"]
    xs = x[:N * C].reshape(N, C)
    lab = label[:N].astype(np.int64)
    ok = lab != ignore if p["HAS_IGNORE"] else np.ones(N, bool)
    safe = np.where(ok, lab, 0)
    better = (xs >= xs[np.arange(N), safe][:, None]).sum(axis=1) - 1
    correct = float(((better < p["TOPK"]) & ok).sum())
    valid = float(ok.sum())
    accum[0] += float(F32(correct / valid)) if valid else 0.0


def device_learning_rate(policy: int, it: int, base, gamma, power, stepsize, max_iter, steps) -> float:
    """nd_learning_rate, line for line."""
    if policy == 0:
        return base
    if policy == 1:
        return base * math.pow(gamma, it // stepsize)
    if policy == 2:
        return base * math.pow(gamma, it)
    if policy == 3:
        return base * math.pow(1.0 + gamma * it, -power)
    if policy == 4:
        count, reached = 0, -1
        for v in steps:
            reached = max(int(v), reached + 1)
            if reached > it:
                break
            count += 1
        return base * math.pow(gamma, count)
    if policy == 5:
        return base * math.pow(max(0.0, 1.0 - it / max_iter), power)
    return base * 0.5 * (1.0 + math.tanh(0.5 * gamma * (it - stepsize)))


def sgd(p, w, g, h, ptab_i, ptab_f, counter, steps, policy, base, gamma, power, stepsize, max_iter, nsteps,
        momentum, weight_decay, l1):
    rate = device_learning_rate(int(policy), int(counter[0]), float(base), float(gamma), float(power),
                                int(stepsize), int(max_iter), steps[:int(nsteps)])
    for q in range(len(ptab_i) // 2):
        off, cnt = int(ptab_i[2 * q]), int(ptab_i[2 * q + 1])
        local_rate = F32(rate * float(ptab_f[2 * q]))
        local_decay = F32(float(weight_decay) * float(ptab_f[2 * q + 1]))
        wv, d = w[off:off + cnt], g[off:off + cnt].copy()
        if local_decay != 0:
            d = d + (np.sign(wv).astype(F32) * local_decay if l1 else wv * local_decay)
        d = d * local_rate
        hv = h[off:off + cnt] * F32(momentum) + d
        h[off:off + cnt] = hv
        g[off:off + cnt] = hv
        w[off:off + cnt] = wv - hv


def advance(p, counter, slot):
    counter[int(slot)] += 1


KERNELS = {f.__name__: f for f in (gather, im2col, col2im, gemm, maxpool_fwd, maxpool_bwd, avepool_fwd, avepool_bwd,
                                   bias_grad, col_sum, relu_fwd, relu_bwd, zero, softmax_loss, accuracy, sgd, advance)}
