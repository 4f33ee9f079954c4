"""Data-parallel training (netdsl/distributed.py): the communicator contract and the shard rule in
one process, and, under `mpiexec -n 2` on this machine, equivalence with one process of twice the
batch, Ctrl-C, a killed rank and a stuck rank. The MPI tests skip without mpi4py and mpiexec."""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_mnist import idx_bytes

from netdsl.backend import get_backend
from netdsl.data.mnist import MnistFeed
from netdsl.distributed import DataParallel, NCCLComm, OneRank, mpi_flavour, mpiexec_command, rank_threads, resume_note
from netdsl.errors import NetdslError
from netdsl.executor import build_net
from netdsl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
try:
    import mpi4py  # noqa: F401
    HAVE_MPI = shutil.which("mpiexec") is not None
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec (pip install 'netdsl[mpi]')")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """A small synthetic MNIST (256 train, 100 test digits) with a learnable pattern."""
    root = tmp_path_factory.mktemp("data")
    (root / "mnist").mkdir()
    rng = np.random.default_rng(3)
    for split, n in (("train", 256), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for k in range(n):
            images[k, 2 + 2 * labels[k]:4 + 2 * labels[k], 4:24] = 250
        (root / "mnist" / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / "mnist" / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return str(root)


def lenet_solver(tmp: Path, name: str, batch: int, solver: str, **extra) -> str:
    """LeNet (nets/lenet.net with the train batch changed) and a solver without tests."""
    net = (ROOT / "nets" / "lenet.net").read_text().replace("split: TRAIN batch_size: 64", f"split: TRAIN batch_size: {batch}")
    (tmp / f"{name}.net").write_text(net)
    rule = 'type: "SGD" base_lr: 0.01 momentum: 0.9' if solver == "SGD" else 'type: "Adam" base_lr: 0.001 momentum: 0.9'
    fields = {"max_iter": 50, "weight_decay": 0.0005, "lr_policy": '"inv"', "gamma": 0.0001, "power": 0.75,
              "random_seed": 1, "display": 10, **extra}
    body = f'net: "{name}.net"\n{rule}\n' + "".join(f"{k}: {v}\n" for k, v in fields.items())
    path = tmp / f"{name}_solver.net"
    path.write_text(body + f'snapshot_prefix: "{tmp / name}"\n')
    return str(path)


def weights(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def netdsl(*args, data: str, env=None):
    """`python -m netdsl ARGS` from the repository root, one BLAS thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NETDSL_DATA": data, **(env or {})}
    return [sys.executable, "-m", "netdsl", *args], env


# -- one process: the contract ---------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_the_single_process_batches():
    """Rank r of N takes items r, r+N, ... of the shared order: together, one process's batch of N*b."""
    images, labels = np.zeros((50, 28, 28), np.uint8), np.arange(50) % 10
    whole = MnistFeed(images, labels, seed=5, shuffle=True)
    ranks = [MnistFeed(images, labels, seed=5, shuffle=True) for _ in range(3)]
    for r, feed in enumerate(ranks):
        feed.shard = (r, 3)
    for _ in range(7):                                  # wraps over epochs (7 x 12 > 50)
        got = [feed.next_indices(4) for feed in ranks]
        want = whole.next_indices(12)
        assert sorted(np.concatenate(got)) == sorted(want)
        for r in range(3):
            np.testing.assert_array_equal(got[r], want[r::3])
    assert {f.cursor for f in ranks} == {whole.cursor} and {f.epoch for f in ranks} == {whole.epoch}


def test_one_rank_data_parallel_trains_exactly_as_one_process(tmp_path, digits):
    """The whole DataParallel path (flat gradient buffer, reduce, start) on the one-rank
    communicator changes nothing: the same weights bit for bit, and a resumable snapshot."""
    solver = lenet_solver(tmp_path, "lenet", 16, "SGD", max_iter=6)
    plain = Trainer(solver, get_backend("cpu"), data_dir=digits, out=str(tmp_path / "a"), progress=False,
                    cpu_kernels="numpy")   # data-parallel runs use the NumPy kernels
    plain.run()
    dp = DataParallel(OneRank())
    tr = Trainer(solver, get_backend("cpu"), data_dir=digits, out=str(tmp_path / "b"), progress=False, parallel=dp)
    dp.start(tr)
    grads = [p.grad for p in tr.solver.params]
    assert all(np.shares_memory(g, dp.flat) for g in grads)       # the grads live in the one flat buffer
    assert dp.flat.size == sum(g.size for g in grads) + 2
    tr.run()
    a, b = weights(str(tmp_path / "a" / "lenet_iter_6.npz")), weights(str(tmp_path / "b" / "lenet_iter_6.npz"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with np.load(tmp_path / "b" / "lenet_iter_6.solverstate.npz") as z:
        assert int(z["procs"]) == 1


def test_start_gives_every_rank_rank_0s_weights_and_history(tmp_path, digits):
    """start() broadcasts into the params and the solver history themselves (not into copies)."""
    class Rank1(OneRank):
        rank, size = 1, 2

        def broadcast(self, buf):            # what arrives from rank 0
            buf[...] = 7

    dp = DataParallel(Rank1())
    tr = Trainer(lenet_solver(tmp_path, "lenet", 8, "Adam"), get_backend("cpu"), data_dir=digits,
                 out=str(tmp_path / "e"), progress=False, parallel=dp)
    assert tr.seed == 7 and not tr.root and tr.tests == []
    dp.start(tr)
    assert all((p.data == 7).all() for p in tr.net.slots.values())
    assert all((h == 7).all() for b in tr.solver.buffers for h in b.history)
    assert not (tmp_path / "e").exists()                  # a rank other than 0 writes nothing


def test_a_stop_on_any_rank_is_agreed_at_the_next_step(tmp_path, digits):
    """A SIGINT sets only this rank's wish; the reduce turns it into every rank's stop."""
    dp = DataParallel(OneRank())
    tr = Trainer(lenet_solver(tmp_path, "lenet", 8, "SGD", max_iter=100), get_backend("cpu"), data_dir=digits,
                 out=str(tmp_path / "c"), progress=False, parallel=dp)
    tr._on_sigint(signal.SIGINT, None)
    assert dp.stop_wanted and not tr.stop_requested
    result = tr.run()
    assert result.interrupted and result.iterations == 1
    assert os.path.exists(tmp_path / "c" / "lenet_iter_1.solverstate.npz")


def test_resume_with_another_number_of_ranks_says_what_changes():
    assert resume_note(2, 2) is None
    note = resume_note(2, 4)
    assert "W0750" in note and "from 2 to 4 times the net's batch_size" in note and "resume with 2" in note


def test_each_rank_takes_its_share_of_the_cores(monkeypatch):
    """--threads, else OMP_NUM_THREADS (set by --procs), else the machine's cores over its ranks:
    not every core per rank, the default of a lone process."""
    mpi, args = type("MPI", (), {"local_size": lambda self: 2})(), SimpleNamespace(threads=None)
    monkeypatch.setattr("netdsl.cpu.threads.available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert rank_threads(args, mpi) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_threads(args, mpi) == 3
    args.threads = 5
    assert rank_threads(args, mpi) == 5


def test_a_data_source_without_a_shard_rule_is_refused(tmp_path, digits):
    tr = Trainer(lenet_solver(tmp_path, "lenet", 8, "SGD"), get_backend("cpu"), data_dir=digits,
                 out=str(tmp_path / "d"), progress=False)

    class Cursor:                     # a source with a cursor (snapshotted) but no shard rule
        def state(self):
            return {}
    next(s for s in tr.net.states if s is not None).source = Cursor()
    with pytest.raises(NetdslError) as e:
        tr.net.set_shard(1, 2)
    assert e.value.diagnostic.code == "E0753" and "'mnist'" in str(e.value)
    lstm = build_net(str(ROOT / "nets" / "lstm_sequence.net"), "TRAIN")
    lstm.set_shard(1, 2)          # the LSTM's carried state is run state, not data: no shard rule needed


class FakeNCCL:
    """cupy.cuda.nccl's surface, over host arrays: the other ranks' buffers are given, and the
    collective sums them with this rank's (what NCCL_SUM over N ranks computes)."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self, others):
        self.others, self.calls, self.aborted = others, [], False
        self.arrays = {}

    def get_unique_id(self):
        return (1, 2, 3)

    def get_version(self):
        return 21903

    def NcclCommunicator(self, size, uid, rank):
        self.calls.append(("init", size, uid, rank))
        return self

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append(("allReduce", count, dtype, op, stream))
        a = self.arrays[send]
        a += sum(self.others)

    def bcast(self, buf, count, dtype, root, stream):
        self.calls.append(("bcast", count, dtype, root, stream))

    def abort(self):
        self.aborted = True


class FakeCupy:
    """cupy.cuda's stream, events that finish at once (or never), and 2 devices."""

    def __init__(self, finishes=True):
        stream = type("Stream", (), {"ptr": 99, "record": lambda s: type("E", (), {"done": finishes})()})()
        self.used = []
        device = type("Device", (), {"__init__": lambda d, i: setattr(d, "id", i),
                                     "use": lambda d: self.used.append(d.id)})
        runtime = type("runtime", (), {"getDeviceCount": staticmethod(lambda: 2)})
        self.cuda = type("cuda", (), {"get_current_stream": staticmethod(lambda: stream), "Device": device,
                                      "runtime": runtime})


class Device:
    """A host array posing as a cupy one: .data.ptr names it in the fake NCCL's table."""

    def __init__(self, nccl, a):
        self.a = a
        self.data = type("Ptr", (), {"ptr": id(a)})()
        nccl.arrays[id(a)] = a
        self.size, self.dtype = a.size, a.dtype

    def __imul__(self, x):
        self.a *= x
        return self


def test_nccl_communicator_wiring_without_a_gpu():
    """NCCLComm's calls as cupy.cuda.nccl receives them: the dtype code, the count, SUM then
    divide by the ranks, on the current stream; a collective that never finishes aborts NCCL.
    (The real NCCL path needs GPUs: see docs/distributed.md for what this does not cover.)"""
    mpi = type("MPI", (), {"rank": 0, "size": 2, "timeout": 0.05, "local_rank": lambda self: 3, "comm": type("C", (), {
        "bcast": staticmethod(lambda obj, root: obj)})()})()
    nccl, cupy = FakeNCCL([np.array([3.0, 5.0], np.float32)]), FakeCupy()
    comm = NCCLComm(mpi, nccl=nccl, cupy=cupy)
    assert nccl.calls[0] == ("init", 2, (1, 2, 3), 0) and cupy.used == [1]       # local rank 3 of 2 GPUs: GPU 1
    buf = Device(nccl, np.array([1.0, 1.0], np.float32))
    comm.allreduce_mean(buf)
    np.testing.assert_allclose(buf.a, [2.0, 3.0])
    assert nccl.calls[1] == ("allReduce", 2, FakeNCCL.NCCL_FLOAT32, FakeNCCL.NCCL_SUM, 99)
    comm.broadcast(Device(nccl, np.zeros(3)))
    assert nccl.calls[2] == ("bcast", 3, FakeNCCL.NCCL_FLOAT64, 0, 99)
    stuck = NCCLComm(mpi, nccl=nccl, cupy=FakeCupy(finishes=False))
    with pytest.raises(NetdslError) as e:
        stuck.allreduce_mean(Device(nccl, np.ones(2, np.float32)))
    assert e.value.diagnostic.code == "E0754" and nccl.aborted


# -- mpiexec -n 2 ----------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("rule", ["SGD", "Adam"])
def test_two_ranks_of_batch_32_equal_one_process_of_batch_64(tmp_path, digits, rule):
    """Caffe's multi-GPU semantics: after 50 iterations 2 ranks x 32 and 1 x 64 hold the same
    weights to float32 rounding (the shards interleave the one order; the loss is a batch mean).
    SGD's 2-rank run goes through `--procs 2` to iteration 30, then resumes its snapshot under
    `mpiexec -n 2` (the same N: the data cursor, history and iteration carry over exactly)."""
    two = lenet_solver(tmp_path, "two", 32, rule, snapshot=30)
    cmd, env = netdsl("train", two, data=digits)
    first = cmd + ["--procs", "2", "--max-iter", "30"] if rule == "SGD" else [*mpiexec_command(2), *cmd]
    run = subprocess.Popen(first, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    Trainer(lenet_solver(tmp_path, "one", 64, rule), get_backend("cpu"), data_dir=digits, progress=False, cpu_kernels="numpy").run()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "Data-parallel training on 2 ranks" in err and out.count("trained") == 1
    if rule == "SGD":
        resume = [*mpiexec_command(2), *cmd, "--snapshot", str(tmp_path / "two_iter_30.solverstate.npz")]
        run = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "W0750" not in run.stderr, run.stderr
    assert "trained 50 iterations on 2 ranks" in (out if rule == "Adam" else run.stdout)
    one, two = weights(str(tmp_path / "one_iter_50.npz")), weights(str(tmp_path / "two_iter_50.npz"))
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=2e-5, err_msg=k)
    with np.load(tmp_path / "two_iter_50.solverstate.npz") as z:
        assert int(z["procs"]) == 2


def start_two_ranks(tmp_path, digits, *extra, snapshot=2, procs=False):
    """2 ranks training until stopped, by `mpiexec -n 2` or `--procs 2`, in a process group of their own
    (as a terminal's foreground job); returns once the first snapshot is written."""
    solver = lenet_solver(tmp_path, "run", 16, "SGD", max_iter=100000, snapshot=snapshot, display=1)
    cmd, env = netdsl("train", solver, *extra, data=digits)
    cmd = cmd + ["--procs", "2"] if procs else [*mpiexec_command(2), *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / f"run_iter_{snapshot}.solverstate.npz").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    return proc


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of rank `rank` among mpiexec's descendants (by its PMI_RANK, or Open MPI's rank)."""
    todo, seen = [launcher], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    for pid in seen[1:]:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if {f"PMI_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode()} & set(env):
            return pid
    raise AssertionError(f"no rank {rank} under {launcher}")


def ended_within(proc, seconds: float) -> tuple[int, str]:
    t0 = time.time()
    out, _ = proc.communicate(timeout=seconds)
    return proc.returncode, out + f"\n(ended after {time.time() - t0:.1f} s)"


def resumable(tmp_path, digits, state: Path) -> None:
    tr = Trainer(lenet_solver(tmp_path, "run", 16, "SGD", max_iter=0), get_backend("cpu"), data_dir=digits,
                 out=str(tmp_path / "resumed"), progress=False)
    tr.restore(str(state))
    assert tr.iter == int(state.name.split("_iter_")[1].split(".")[0])
    tr.log.close()             # one process resuming 2 ranks' snapshot: W0750 says what changes
    assert "W0750: the snapshot was written by 2 rank(s), this run has 1" in (tmp_path / "resumed" / "run.log").read_text()


@needs_mpi
@pytest.mark.parametrize("how", ["Ctrl-C to mpiexec", "SIGUSR1 to mpiexec", "Ctrl-C to --procs"])
def test_ctrl_c_stops_every_rank_with_a_snapshot(tmp_path, digits, how):
    """Ctrl-C (SIGINT to the terminal's foreground process group) or SIGUSR1 to mpiexec: every rank
    stops after the same step, with a snapshot. Open MPI's mpiexec does not forward SIGINT but kills
    the ranks within a second: there the run ends at once and the last snapshot is whole."""
    proc = start_two_ranks(tmp_path, digits, procs=how.endswith("--procs"))
    if how.startswith("SIGUSR1"):
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    code, out = ended_within(proc, 30)
    last = max(tmp_path.glob("run_iter_*.solverstate.npz"), key=lambda p: int(p.name.split("_")[2].split(".")[0]))
    if how == "Ctrl-C to mpiexec" and mpi_flavour(mpiexec_command(2)[0]) == "Open MPI":
        assert code != 0 and "Interrupted at iteration" not in out, out
    else:
        assert code == 130, out
        assert "Interrupted at iteration" in out and "resume with --snapshot" in out
    resumable(tmp_path, digits, last)


@needs_mpi
def test_a_second_ctrl_c_stops_every_rank_without_a_snapshot(tmp_path, digits):
    """--procs: the second Ctrl-C, before the first one's stop is done, ends every rank at once, under
    MPICH (which forwards it) and Open MPI (whose mpiexec kills the ranks) alike: exit 130, one line."""
    proc = start_two_ranks(tmp_path, digits, procs=True)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = ended_within(proc, 30)
    assert code == 130 and "interrupted twice" in out, out
    resumable(tmp_path, digits, tmp_path / "run_iter_2.solverstate.npz")


@needs_mpi
def test_a_killed_rank_stops_the_others_and_the_snapshot_survives(tmp_path, digits):
    proc = start_two_ranks(tmp_path, digits)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    code, out = ended_within(proc, 15)
    noticed = "noticed that process rank 1" if mpi_flavour(mpiexec_command(2)[0]) == "Open MPI" else "BAD TERMINATION"
    assert code != 0 and noticed in out and "signal 9" in out, out
    resumable(tmp_path, digits, tmp_path / "run_iter_2.solverstate.npz")


@needs_mpi
def test_a_stuck_rank_is_named_and_every_rank_stops(tmp_path, digits):
    proc = start_two_ranks(tmp_path, digits, "--step-timeout", "3")      # long enough for a loaded machine
    os.kill(rank_pid(proc.pid, 1), signal.SIGSTOP)     # alive but silent: only a deadline can notice
    code, out = ended_within(proc, 30)
    assert code != 0, out
    assert "E0754" in out and "rank 0 of 2: no answer from the other ranks for 3 s" in out, out
    resumable(tmp_path, digits, tmp_path / "run_iter_2.solverstate.npz")


@needs_mpi
def test_an_error_on_every_rank_is_reported_once_and_exits_2(tmp_path, digits):
    """A user error all ranks hit alike (here: no MNIST in the data directory) ends every rank
    cleanly with exit 2 and rank 0's diagnostic, printed once; no MPI_Abort is needed."""
    cmd, env = netdsl("train", lenet_solver(tmp_path, "lenet", 16, "SGD"), "--data-dir", str(tmp_path / "none"),
                      data=digits)
    run = subprocess.run([*mpiexec_command(2), *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("error[E09") == 1 and "on rank 0 of 2" in run.stderr and "MPI_Abort" not in run.stderr
