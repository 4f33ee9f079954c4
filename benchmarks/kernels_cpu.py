"""Benchmark: LeNet-sized conv and pooling kernels on the CPU, against PyTorch when it imports.

Run: python benchmarks/kernels_cpu.py [--repeat 50] [--threads 2]
Prints milliseconds per call (median and best of --repeat) of netdsl.kernels (NumPy, float32,
batch 64) and of torch.nn.functional on the same inputs with the same thread count. The two are
called alternately, so a load spike on this shared machine hits both; compare the medians when
the machine is quiet, the bests when it is not.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from netdsl import kernels as K

N = 64


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


def time_ms(fns, repeat: int) -> list[tuple[float, float]]:
    """(median, best) ms per call of each function, called in turn so load spikes hit all alike."""
    for fn in fns:
        fn()
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [(float(np.median(ts)) * 1e3, min(ts) * 1e3) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"batch {N}, float32, {args.threads} threads; ms per call, median (best)"
          + ("" if torch else "; torch not importable: no comparison"))
    print(f"{'kernel':22} {'pass':8} {'netdsl':>16} {'torch':>16} {'ratio':>12}")
    totals = np.zeros((2, 2))
    nan = (float("nan"), float("nan"))
    for name, x, W, b, need_dx in lenet_cases(np.random.default_rng(0)):
        ours = netdsl_steps(x, W, b, need_dx)
        theirs = torch_steps(torch, x, W, b, need_dx) if torch else (None, None)
        for label, mine, peer in zip(("fwd", "fwd+bwd"), ours, theirs):
            a, t = time_ms([mine, peer], args.repeat) if peer else (time_ms([mine], args.repeat)[0], nan)
            if label == "fwd+bwd":
                totals += (a, t)
            print(row(name, label, a, t))
    print(row("total", "fwd+bwd", *totals))


def row(name, label, ours, theirs) -> str:
    pair = "{:7.3f} ({:6.3f})".format
    ratio = "{:5.2f} ({:4.2f})".format(ours[0] / theirs[0], ours[1] / theirs[1])
    return f"{name:22} {label:8} {pair(*ours)} {pair(*theirs)} {ratio}"


if __name__ == "__main__":
    main()
