"""Does overlapping the gradient allreduce with backward pay here? LeNet, 2 ranks x batch 32.

    mpiexec -n 2 python benchmarks/distributed_overlap.py [--steps 20] [--blocks 7]
    MPIR_CVAR_ASYNC_PROGRESS=1 mpiexec -n 2 python benchmarks/distributed_overlap.py    # MPICH's progress thread

A prototype, not netdsl's path. Three ways to average the gradients, run block by block in turn
(so that all see the same background load), each rank with 1 BLAS thread:

  blocking      what netdsl does: backward, then one Allreduce over the flat buffer (DataParallel.reduce)
  overlap       one Iallreduce per layer's slice of the flat buffer, posted as soon as backward has added
                that layer's gradient (backward reaches the layers last first; their slices lie in
                forward order, so the buffer is sent from its end), all waited for before the update
  overlap+test  the same, and a Testall of the posted requests before each layer's backward: without
                a progress thread MPICH moves data only while a rank is inside an MPI call
  barrier       blocking, after a Barrier: splits the blocking wait into waiting for the other rank
                (the Barrier) and moving the bytes (the Allreduce)

Prints ms per step (median over the blocks; and the median over rounds of its difference from the
blocking block of the same round, which the load's drift affects less), the ms each step waits for the reduction once
backward is done, and the window overlap has: the backward left after the largest slice is
posted. The first step of each mode is checked: the averaged gradient equals a blocking Allreduce
of the complete local gradients exactly (a slice posted before its layer's backward had added to
it would differ).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from distributed_cpu import write_solver  # noqa: E402

from netdsl.backend import get_backend  # noqa: E402
from netdsl.distributed import DataParallel, MPIComm  # noqa: E402
from netdsl.train import Trainer  # noqa: E402

MODES = ("blocking", "overlap", "overlap+test", "barrier")


def layer_slices(net, flat) -> dict[int, tuple[int, int]]:
    """Each layer's (start, end) in the flat gradient buffer, by its step index."""
    base = flat.__array_interface__["data"][0]
    out = {}
    for i, params in enumerate(net.step_params):
        params = [p for p in params if not p.frozen]
        if params:
            starts = [(p.grad.__array_interface__["data"][0] - base) // flat.itemsize for p in params]
            a, b = min(starts), max(s + p.grad.size for s, p in zip(starts, params))
            assert b - a == sum(p.grad.size for p in params), "a layer's gradients are not one slice"
            out[i] = (a, b)
    return out


class Overlap:
    """Backward hooks that post each layer's slice once backward has added to it: the executor adds a
    layer's gradient after its after() hook, so the slice goes out at the next layer's before()."""

    def __init__(self, mpi: MPIComm, flat, slices, test: bool, into=None):
        self.MPI, self.comm, self.flat, self.test = mpi.MPI, mpi.comm, flat, test
        self.into = into                # None: in place; else the sums land here (the check)
        self.todo, self.requests, self.last = dict(slices), [], None
        self.largest = max(slices, key=lambda i: slices[i][1] - slices[i][0])
        self.posted = None                # when the largest slice went out

    def before(self, i: int) -> None:
        self._post(self.last)
        if self.test and self.requests:
            self.MPI.Request.Testall(self.requests)

    def after(self, i: int, backward: bool) -> None:
        self.last = i

    def finish(self, loss: float, size: int) -> None:
        self._post(self.last)
        self.flat[-2:] = loss, 0.0
        self.todo[-1] = (self.flat.size - 2, self.flat.size)     # the loss and the stop flag
        for i in list(self.todo):         # the layers backward did not reach, and the two floats
            self._post(i)
        self.MPI.Request.Waitall(self.requests)
        out = self.flat if self.into is None else self.into
        out *= out.dtype.type(1.0 / size)

    def _post(self, i) -> None:
        if i not in self.todo:
            return
        a, b = self.todo.pop(i)
        if i == self.largest:
            self.posted = time.perf_counter()
        send = self.MPI.IN_PLACE if self.into is None else self.flat[a:b]
        recv = self.flat[a:b] if self.into is None else self.into[a:b]
        self.requests.append(self.comm.Iallreduce(send, recv, op=self.MPI.SUM))


def step(tr: Trainer, dp: DataParallel, mpi: MPIComm, slices, mode: str, check: bool = False) -> tuple:
    """One training step; returns the seconds it waited for the reduction after backward, of which
    for the other rank (barrier), and the backward left after the largest slice was posted (overlap)."""
    net = tr.net
    net.zero_grad()
    net.forward()
    loss = net.loss()
    skew = window = 0.0
    if mode in ("blocking", "barrier"):
        net.backward()
        t0 = time.perf_counter()
        if mode == "barrier":
            mpi.comm.Barrier()
            skew = time.perf_counter() - t0
        dp.reduce(tr, loss)
    else:
        into = np.empty_like(dp.flat) if check else None
        hooks = Overlap(mpi, dp.flat, slices, mode == "overlap+test", into)
        net.backward(_hooks=hooks)
        t0 = time.perf_counter()
        window = t0 - hooks.posted
        hooks.finish(loss, mpi.size)
        if check:
            want = np.empty_like(dp.flat)
            mpi.comm.Allreduce(dp.flat, want, op=mpi.MPI.SUM)
            want *= want.dtype.type(1.0 / mpi.size)
            assert np.array_equal(into, want), f"{mode}: max difference {np.abs(into - want).max()}"
            dp.flat[...] = into
    wait = time.perf_counter() - t0
    tr.solver.step(tr.iter)
    tr.iter += 1
    return wait, skew, window


def progress_probe(mpi: MPIComm, n: int = 400_500, busy: float = 0.02, reps: int = 15) -> tuple[float, float]:
    """Does the MPI library move a posted Iallreduce while the rank computes and makes no MPI call?
    Returns the median seconds of a blocking Allreduce of n floats, and of the Wait for an
    Iallreduce posted `busy` seconds of NumPy work before (0 when it finished in the background)."""
    buf, a = np.ones(n, np.float32), np.ones((200, 200))
    blocking, waits = [], []
    for _ in range(reps):
        mpi.comm.Barrier()
        t0 = time.perf_counter()
        mpi.comm.Allreduce(mpi.MPI.IN_PLACE, buf, op=mpi.MPI.SUM)
        blocking.append(time.perf_counter() - t0)
        mpi.comm.Barrier()
        request, t0 = mpi.comm.Iallreduce(mpi.MPI.IN_PLACE, buf, op=mpi.MPI.SUM), time.perf_counter()
        while time.perf_counter() - t0 < busy:
            a @ a
        t0 = time.perf_counter()
        request.Wait()
        waits.append(time.perf_counter() - t0)
    return statistics.median(blocking), statistics.median(waits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--blocks", type=int, default=7, help="blocks per mode (the median is reported)")
    args = ap.parse_args()
    mpi = MPIComm()
    dp = DataParallel(mpi)
    tmp = Path(tempfile.mkdtemp())
    tr = Trainer(write_solver(tmp, "lenet", 32), get_backend("cpu"), parallel=dp, progress=False, threads=1,
                 out=str(tmp / "out"))
    dp.start(tr)
    slices = layer_slices(tr.net, dp.flat)
    blocking, wait = progress_probe(mpi)
    for mode in MODES:                    # warm up, and check the averaged gradient once per mode
        for k in range(3):
            step(tr, dp, mpi, slices, mode, check=k == 0)
    per_step = {m: [] for m in MODES}
    waits = {m: [] for m in MODES}            # per block: mean (wait, skew, window) per step
    for _ in range(args.blocks):
        for mode in MODES:
            mpi.comm.Barrier()
            t0 = time.perf_counter()
            sums = np.sum([step(tr, dp, mpi, slices, mode) for _ in range(args.steps)], axis=0)
            per_step[mode].append((time.perf_counter() - t0) / args.steps)
            waits[mode].append(sums / args.steps)
    if mpi.rank == 0:
        names = {i: tr.net.plan.steps[i].node.name for i in slices}
        print(f"{mpi.size} ranks over {mpi.name}, thread level {mpi.MPI.Query_thread()} (3 = MULTIPLE), "
              f"MPIR_CVAR_ASYNC_PROGRESS={os.environ.get('MPIR_CVAR_ASYNC_PROGRESS', 'unset')}; LeNet, 32 per rank; "
              f"slices in backward order: {', '.join(f'{names[i]} {b - a:,}' for i, (a, b) in sorted(slices.items(), reverse=True))}")
        print(f"progress without MPI calls: a blocking Allreduce of ip1's 400,500 floats takes {blocking * 1e3:.2f} ms; "
              f"an Iallreduce of them posted before 20 ms of NumPy work then waits {wait * 1e3:.2f} ms")
        print(f"medians of {args.blocks} blocks of {args.steps} steps; every block's ms/step in brackets\n")
        print("| mode | ms per step | against blocking, same round | ms waiting after backward | of which for the "
              "other rank | backward left after ip1 is posted | blocks |")
        print("|---|---|---|---|---|---|---|")
        for m in MODES:
            wait, skew, window = (statistics.median(w[j] for w in waits[m]) * 1e3 for j in range(3))
            blocks = " ".join(f"{t * 1e3:.0f}" for t in per_step[m])
            paired = statistics.median(a - b for a, b in zip(per_step[m], per_step["blocking"])) * 1e3
            print(f"| {m} | {statistics.median(per_step[m]) * 1e3:.1f} | {paired:+.1f} | {wait:.2f} | "
                  f"{f'{skew:.2f}' if m == 'barrier' else ''} | {f'{window:.2f}' if m.startswith('overlap') else ''} | "
                  f"{blocks} |", flush=True)


if __name__ == "__main__":
    main()
