"""Benchmark: LeNet-sized conv and pooling kernels on the CPU, against PyTorch when it imports.

Run: python -m benchmarks.kernels_cpu [--repeat 50] [--threads 2] [--default-malloc]
(from the repository root)
Prints milliseconds per call (median and best of --repeat) of netdsl.kernels (NumPy, float32,
batch 64) and of torch.nn.functional on the same inputs with the same thread count. On a shared
machine compare the medians when it is quiet, the bests when it is not.

By default glibc malloc is told to keep freed memory (see keep_freed_memory): otherwise every
large temporary comes back as fresh pages and the page faults cost more than the arithmetic.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time

import numpy as np

from netdsl import kernels as K

N = 64


def keep_freed_memory() -> bool:
    """Stop glibc returning big freed blocks to the OS (mmap threshold 32 MiB, no trimming)."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def lenet_cases(rng):
    """(name, x, W, b, need_dx): LeNet's two convolutions; None W means 2x2/2 max pooling."""
    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    return [
        ("conv1 1->20 k5 28²", arr(N, 1, 28, 28), arr(20, 1, 5, 5) * 0.1, arr(20), False),
        ("pool1 max 2x2/2 24²", arr(N, 20, 24, 24), None, None, True),
        ("conv2 20->50 k5 12²", arr(N, 20, 12, 12), arr(50, 20, 5, 5) * 0.1, arr(50), True),
        ("pool2 max 2x2/2 8²", arr(N, 50, 8, 8), None, None, True),
    ]


def netdsl_steps(x, W, b, need_dx):
    """(forward, forward+backward) closures for one case."""
    if W is None:
        y, _ = K.pool2d_forward(np, x, "max", 2, 2, 2, 2)
        dy = np.ones_like(y)

        def fwd():
            return K.pool2d_forward(np, x, "max", 2, 2, 2, 2)

        def fwd_bwd():
            return K.pool2d_backward(np, dy, fwd()[1])
        return fwd, fwd_bwd
    y, _ = K.conv2d_forward(np, x, W, b)
    dy = np.ones_like(y)

    def fwd():
        return K.conv2d_forward(np, x, W, b)

    def fwd_bwd():
        return K.conv2d_backward(np, dy, fwd()[1], W, need_dx)
    return fwd, fwd_bwd


def netdsl_chain(cases):
    """conv1 -> pool1 -> conv2 -> pool2 forward, then backward in reverse, as in training."""
    (_, x, W1, b1, _), _, (_, _, W2, b2, _), _ = cases

    def step():
        y1, c1 = K.conv2d_forward(np, x, W1, b1)
        p1, q1 = K.pool2d_forward(np, y1, "max", 2, 2, 2, 2)
        y2, c2 = K.conv2d_forward(np, p1, W2, b2)
        p2, q2 = K.pool2d_forward(np, y2, "max", 2, 2, 2, 2)
        d = K.pool2d_backward(np, np.ones_like(p2), q2)
        d = K.conv2d_backward(np, d, c2, W2, True)[0]
        d = K.pool2d_backward(np, d, q1)
        K.conv2d_backward(np, d, c1, W1, False)
    return step


def torch_chain(torch, cases):
    """The same chain through torch.nn.functional and autograd."""
    F = torch.nn.functional
    (_, x, W1, b1, _), _, (_, _, W2, b2, _), _ = cases
    tx = torch.from_numpy(x)
    params = [torch.from_numpy(a).requires_grad_() for a in (W1, b1, W2, b2)]

    def step():
        y = F.max_pool2d(F.conv2d(tx, params[0], params[1]), 2, 2)
        y = F.max_pool2d(F.conv2d(y, params[2], params[3]), 2, 2)
        y.backward(torch.ones_like(y))
    return step


def torch_steps(torch, x, W, b, need_dx):
    F = torch.nn.functional
    tx = torch.from_numpy(x).requires_grad_(need_dx)
    if W is None:
        def op():
            return F.max_pool2d(tx, 2, 2)
    else:
        tW, tb = torch.from_numpy(W).requires_grad_(), torch.from_numpy(b).requires_grad_()

        def op():
            return F.conv2d(tx, tW, tb)
    dy = torch.ones_like(op())

    def fwd():
        with torch.no_grad():
            return op()

    def fwd_bwd():
        op().backward(dy)
    return fwd, fwd_bwd


def time_ms(fn, repeat: int) -> tuple[float, float]:
    """(median, best) ms per call. Each library runs in its own block: OpenBLAS and torch's
    OpenMP pool both spin-wait after a call, so interleaving them would time each other's spin."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3, min(times) * 1e3


def row(name, label, ours, theirs) -> str:
    pair = "{:7.3f} ({:6.3f})".format
    ratio = f"{ours[0] / theirs[0]:5.2f} ({ours[1] / theirs[1]:4.2f})"
    return f"{name:22} {label:8} {pair(*ours)} {pair(*theirs)} {ratio}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc malloc as it is")
    args = ap.parse_args()
    tuned = not args.default_malloc and keep_freed_memory()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"batch {N}, float32, {args.threads} threads, {'tuned' if tuned else 'default'} malloc;"
          " ms per call, median (best)"
          + ("" if torch else "; torch not importable: no comparison"))
    print(f"{'kernel':22} {'pass':8} {'netdsl':>16} {'torch':>16} {'ratio':>12}")
    totals = np.zeros((2, 2))
    nan = (float("nan"), float("nan"))
    cases = lenet_cases(np.random.default_rng(0))
    for name, x, W, b, need_dx in cases:
        ours = netdsl_steps(x, W, b, need_dx)
        theirs = torch_steps(torch, x, W, b, need_dx) if torch else (None, None)
        for label, mine, peer in zip(("fwd", "fwd+bwd"), ours, theirs):
            a = time_ms(mine, args.repeat)
            t = time_ms(peer, args.repeat) if peer else nan
            if label == "fwd+bwd":
                totals += (a, t)
            print(row(name, label, a, t))
    print(row("sum of the above", "fwd+bwd", *totals))
    chain = time_ms(netdsl_chain(cases), args.repeat)
    print(row("conv1..pool2 chained", "fwd+bwd", chain,
              time_ms(torch_chain(torch, cases), args.repeat) if torch else nan))


if __name__ == "__main__":
    main()
