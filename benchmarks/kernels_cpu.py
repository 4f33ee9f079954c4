"""Benchmark: LeNet-sized conv and pooling kernels on the CPU, against PyTorch when it imports.

Run: python benchmarks/kernels_cpu.py [--repeat 50] [--threads 2]
Prints the median milliseconds per call of netdsl.kernels (NumPy, float32, batch 64) and of
torch.nn.functional on the same inputs with the same thread count.
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
        ("conv1 1->20 k5 28x28", arr(N, 1, 28, 28), arr(20, 1, 5, 5) * 0.1, arr(20), False),
        ("pool1 2x2/2 24x24", arr(N, 20, 24, 24), None, None, True),
        ("conv2 20->50 k5 12x12", arr(N, 20, 12, 12), arr(50, 20, 5, 5) * 0.1, arr(50), True),
        ("pool2 2x2/2 8x8", arr(N, 50, 8, 8), None, None, True),
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


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


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
    print(f"batch {N}, float32, {args.threads} threads; median ms per call"
          + ("" if torch else " (torch not importable: no comparison)"))
    print(f"{'kernel':24} {'pass':8} {'netdsl':>8} {'torch':>8} {'ratio':>6}")
    totals = np.zeros(2)
    for name, x, W, b, need_dx in lenet_cases(np.random.default_rng(0)):
        ours = netdsl_steps(x, W, b, need_dx)
        theirs = torch_steps(torch, x, W, b, need_dx) if torch else (None, None)
        for label, mine, peer in zip(("fwd", "fwd+bwd"), ours, theirs):
            a = median_ms(mine, args.repeat)
            t = median_ms(peer, args.repeat) if peer else float("nan")
            if label == "fwd+bwd":
                totals += (a, t)
            print(f"{name:24} {label:8} {a:8.3f} {t:8.3f} {a / t:6.2f}")
    print(f"{'total':24} {'fwd+bwd':8} {totals[0]:8.3f} {totals[1]:8.3f} "
          f"{totals[0] / totals[1]:6.2f}")


if __name__ == "__main__":
    main()
