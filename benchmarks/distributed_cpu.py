"""Data-parallel training on one machine's CPUs: 2 ranks x 1 BLAS thread against 1 process x 2
threads at the same effective batch, for LeNet (batch 64 = 2 x 32) and Caffe's cifar10_quick
(batch 100 = 2 x 50, fed by DummyData: the timing does not depend on the pixels); and the cost of
one allreduce (MPIComm.allreduce_mean, what each training step calls) against the gradient size.

    python benchmarks/distributed_cpu.py [--iters 20] [--repeats 3] [--nets lenet,cifar10_quick]
    mpiexec -n 2 python benchmarks/distributed_cpu.py --allreduce     # the allreduce table alone
    (Open MPI as root: mpiexec --allow-run-as-root -n 2 ...; the scaling runs add what it needs)

Reports ms per iteration (median of the repeats; each from `netdsl train`'s own loop time; 1 process
x 1 thread too, the compute per sample of the scaling model) and the speed-up of the two ranks.
Needs mpi4py and mpiexec (pip install "netdsl[mpi]").
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CIFAR10_QUICK = """name: "CIFAR10_quick"   # Caffe's examples/cifar10/cifar10_quick_train_test.prototxt, DummyData in
layer { name: "cifar" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: BATCH dim: 3 dim: 32 dim: 32 } shape { dim: BATCH }
    data_filler { type: "gaussian" std: 50 } data_filler { type: "constant" value: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 32 pad: 2 kernel_size: 5 weight_filler { type: "gaussian" std: 0.0001 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 32 pad: 2 kernel_size: 5 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 64 pad: 2 kernel_size: 5 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "pool3" type: "Pooling" bottom: "conv3" top: "pool3" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool3" top: "ip1" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 64 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
NETS = (("lenet", 64), ("cifar10_quick", 100))      # and their effective batch (Caffe's)
SOLVER = 'net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.004\nlr_policy: "fixed"\nrandom_seed: 1\n' \
         'snapshot_after_train: false\nsnapshot_prefix: "{prefix}"\n'


def write_solver(tmp: Path, name: str, batch: int) -> str:
    if name == "lenet":
        net = (ROOT / "nets" / "lenet.net").read_text().replace("split: TRAIN batch_size: 64",
                                                                  f"split: TRAIN batch_size: {batch}")
    else:
        net = CIFAR10_QUICK.replace("BATCH", str(batch))
    (tmp / f"{name}{batch}.net").write_text(net)
    solver = tmp / f"{name}{batch}_solver.net"
    solver.write_text(SOLVER.format(net=f"{name}{batch}.net", prefix=tmp / f"{name}{batch}"))
    return str(solver)


def seconds_per_iter(cmd: list[str], threads: int, iters: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    # --threads: a lone process otherwise takes every core whatever OMP_NUM_THREADS says; NumPy kernels
    # in all runs, as the ranks use them (the compiled kernels keep their own gradient buffer)
    out = subprocess.run(cmd + ["--max-iter", str(iters), "--threads", str(threads), "--cpu-kernels", "numpy"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return float(re.search(r"in ([0-9.]+) s", out.stdout).group(1)) / iters


def scaling(args) -> None:
    from netdsl.distributed import mpiexec_command  # `mpiexec -n 2` with what its MPI needs here
    tmp = Path(tempfile.mkdtemp())
    train = [sys.executable, "-m", "netdsl", "train"]
    print("| net | effective batch | 1 process x 1 thread | 1 process x 2 threads | 2 ranks x 1 thread | "
          "speed-up of 2 ranks over 2 threads |")
    print("|---|---|---|---|---|---|")
    for name, batch in NETS:
        if name not in args.nets.split(","):
            continue
        iters = args.iters * 3 if name == "lenet" else args.iters      # `netdsl train` prints 0.1 s
        single, one, two = [], [], []
        for _ in range(args.repeats):          # alternate, so all see the same background load
            single.append(seconds_per_iter(train + [write_solver(tmp, name, batch)], 1, iters))
            one.append(seconds_per_iter(train + [write_solver(tmp, name, batch)], 2, iters))
            two.append(seconds_per_iter(mpiexec_command(2) + train + [write_solver(tmp, name, batch // 2)], 1,
                                        iters))
        s, a, b = (statistics.median(x) * 1e3 for x in (single, one, two))
        print(f"| {name} | {batch} | {s:.1f} ms | {a:.1f} ms | {b:.1f} ms ({batch // 2} per rank) | {a / b:.2f}x |",
              flush=True)
    subprocess.run(mpiexec_command(2) + [sys.executable, __file__, "--allreduce"], cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)


def allreduce_table() -> None:
    """Under mpiexec: ms per allreduce_mean of n float32 (LeNet: 431,080 params, cifar10_quick: 145,578)."""
    from netdsl.distributed import MPIComm
    comm = MPIComm()
    if comm.rank == 0:
        print(f"\nallreduce_mean on {comm.size} ranks ({comm.name}), float32:\n")
        print("| floats | MB | ms per allreduce | GB/s (bytes / time) |")
        print("|---|---|---|---|")
    for n in (1_000, 10_000, 145_580, 431_082, 1_000_000, 4_000_000, 16_000_000):
        buf = np.ones(n, np.float32)
        reps = max(5, min(200, 20_000_000 // n))
        comm.allreduce_mean(buf)                       # warm up
        comm.agree(60)
        t0 = time.perf_counter()
        for _ in range(reps):
            comm.allreduce_mean(buf)
        dt = (time.perf_counter() - t0) / reps
        if comm.rank == 0:
            print(f"| {n:,} | {n * 4 / 1e6:.2f} | {dt * 1e3:.3f} | {n * 4 / dt / 1e9:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="iterations per timing (LeNet: 3x as many)")
    ap.add_argument("--nets", default="lenet,cifar10_quick")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--allreduce", action="store_true", help="(under mpiexec) the allreduce table alone")
    args = ap.parse_args()
    allreduce_table() if args.allreduce else scaling(args)


if __name__ == "__main__":
    main()
