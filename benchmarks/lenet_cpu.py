"""LeNet training speed on the CPU, netdsl side by side with PyTorch in one run.

Same net (Caffe's LeNet), batch 64, solver (SGD, momentum 0.9, weight decay 5e-4, inv policy),
threads and float32; both read the same MNIST batches from memory. Reports ms per iteration
(median of several timed blocks, alternating the frameworks) and the ratios. netdsl runs with its
compiled CPU kernels (Numba) and with the NumPy layers (--cpu-kernels picks one).

    python benchmarks/lenet_cpu.py [--iters 200] [--blocks 5] [--threads 2] [--cpu-kernels both]
    python benchmarks/lenet_cpu.py --full       # also Caffe's 10,000 iterations: time and accuracy
    python benchmarks/lenet_cpu.py --jit        # the compiled path's first iteration, cold and warm cache
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def netdsl_stepper(kernels="compiled", threads=None, seed=1):
    """One training iteration of netdsl's LeNet, as `netdsl train` runs it (cpu/compile_training)."""
    from netdsl.cpu.threads import set_threads
    from netdsl.executor import build_net
    from netdsl.solver import Solver
    from netdsl.solverfile import load_solver
    sf = load_solver(str(ROOT / "nets" / "lenet_solver.net"))
    net = build_net(sf.train_net, "TRAIN", "cpu", seed=seed)
    set_threads(threads, kernels == "compiled")
    if kernels == "compiled":
        from netdsl.cpu import compile_nets, flat_solver
        compile_nets(net)
        solver = flat_solver(sf.cfg, net)
    else:
        solver = Solver(sf.cfg, net.learnable)
    state = {"it": 0}

    def step():
        net.zero_grad()
        net.forward()
        net.backward()
        solver.step(state["it"])
        state["it"] += 1
    return step


def torch_stepper(threads, seed=1):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from netdsl.data.mnist import load_mnist
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    x_all = torch.from_numpy(images.astype(np.float32)[:, None] * np.float32(1 / 256))
    y_all = torch.from_numpy(labels.astype(np.int64))

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
            self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

        def forward(self, x):
            x = F.max_pool2d(self.conv1(x), 2, 2)
            x = F.max_pool2d(self.conv2(x), 2, 2)
            return self.ip2(F.relu(self.ip1(x.flatten(1))))

    model = LeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)
    rng = np.random.default_rng(seed)
    state = {"perm": rng.permutation(len(y_all)), "cursor": 0}

    def step():
        if state["cursor"] + 64 > len(state["perm"]):
            state["perm"], state["cursor"] = rng.permutation(len(y_all)), 0
        idx = torch.from_numpy(state["perm"][state["cursor"]:state["cursor"] + 64])
        state["cursor"] += 64
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        sched.step()
    return step


def time_block(step, iters) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return 1e3 * (time.perf_counter() - t) / iters


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_iterations(threads) -> None:
    """In this process: the compiled path's first iteration (JIT or cache load) against the next."""
    t = time.perf_counter()
    step = netdsl_stepper("compiled", threads)
    build = time.perf_counter() - t
    times = []
    for _ in range(21):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"build {build:.2f} s, first iteration {times[0]:.2f} s, then {1e3 * statistics.median(times[1:]):.1f} ms/it: "
          f"first costs {times[0] - statistics.median(times[1:]):.2f} s more")


def jit_cost(threads) -> None:
    """The first iteration with an empty Numba cache (cold: compiles every kernel) and again with
    the cache it left (warm: loads them), each in a fresh process."""
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for what in ("cold", "warm"):
            r = subprocess.run([sys.executable, __file__, "--first"] + (["--threads", str(threads)] if threads else []),
                               env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True)
            print(f"  {what} cache: {r.stdout.strip()}")


def main():
    from netdsl.cpu.threads import available_cores
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, help="netdsl's kernel and BLAS threads and PyTorch's (default: netdsl's "
                    "policy, cpu/threads.py, and every core for PyTorch)")
    ap.add_argument("--cpu-kernels", choices=("both", "compiled", "numpy"), default="both")
    ap.add_argument("--full", action="store_true", help="also train 10,000 iterations with `netdsl train`")
    ap.add_argument("--jit", action="store_true", help="only the compiled path's JIT cost, cold and warm cache")
    ap.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "NETDSL_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["NETDSL_DATA"] = str(ROOT.parent / "shared" / "data")
    if args.first:
        return first_iterations(args.threads)
    if args.jit:
        return jit_cost(args.threads)
    kinds = ("compiled", "numpy") if args.cpu_kernels == "both" else (args.cpu_kernels,)
    steppers = {f"netdsl-{k}": netdsl_stepper(k, args.threads) for k in kinds}
    rss_netdsl = peak_rss_mib()
    for step in steppers.values():
        for _ in range(20):
            step()
    rss_netdsl = max(rss_netdsl, peak_rss_mib())
    try:
        steppers["pytorch"] = torch_stepper(args.threads or available_cores())
        for _ in range(20):
            steppers["pytorch"]()
    except ImportError:
        print("torch not installed: `pip install torch==2.13.0` for the side-by-side peer")
    times = {k: [] for k in steppers}
    for _ in range(args.blocks):
        for name, step in steppers.items():       # alternate, so drift hits both equally
            times[name].append(time_block(step, args.iters))
    threads = f"{args.threads} threads" if args.threads else "threads by netdsl's policy and all cores for PyTorch"
    print(f"LeNet, batch 64, SGD, {threads}, {args.blocks} blocks x {args.iters} iterations "
          f"(median ms/iteration):")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:16s} {v:7.2f} ms/it   (blocks: {', '.join(f'{x:.2f}' for x in times[k])})")
    for k in med:
        if k.startswith("netdsl") and "pytorch" in med:
            print(f"  ratio {k}/pytorch: {med[k] / med['pytorch']:.2f}  "
                  f"({'netdsl faster' if med[k] < med['pytorch'] else 'pytorch faster'})")
    print(f"  peak RSS after netdsl warm-up (before torch loads): {rss_netdsl:.0f} MiB")
    if args.full:
        out = "/tmp/netdsl_lenet_full"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "netdsl", "train", str(ROOT / "nets" / "lenet_solver.net"),
                        "--out", out], check=True, cwd=ROOT)
        wall = time.perf_counter() - t
        r = subprocess.run([sys.executable, "-m", "netdsl", "test", str(ROOT / "nets" / "lenet.net"), "--weights",
                            f"{out}/lenet_iter_10000.npz", "--iterations", "100", "--json"], check=True,
                           capture_output=True, text=True, cwd=ROOT)
        print(f"  netdsl train 10,000 iterations: {wall:.1f} s wall (with 21 tests of 10,000 images); "
              f"test: {r.stdout.strip()}")


if __name__ == "__main__":
    main()
