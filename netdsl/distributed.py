"""Data-parallel training over processes: Caffe's multi-GPU semantics on MPI (CPUs) or NCCL (GPUs).

Every rank holds the whole net and runs the solver's batch on its own shard of the data (rank r of
N takes items r, r+N, r+2N, ... of the global order, Caffe's DataLayer::Skip, so N ranks x batch b
read exactly the items one process reads with batch N*b). After backward the ranks average their
gradients with one allreduce over one flat buffer (the params' grads are views into it) that also
carries the loss and a stop flag, so every rank applies the same update, shows the same loss and
stops at the same iteration. Rank 0 alone logs, tests and snapshots; BatchNorm's running statistics
stay per rank (Caffe's behaviour), and the snapshot holds rank 0's.

A distributed engine is reached through a Communicator: OneRank (no engine: the interface's
contract, and a one-process run), MPIComm (mpi4py, NumPy buffers passed without pickling) and
NCCLComm (cupy.cuda.nccl, one rank per GPU, MPI only to start it). Every wait has a deadline: a
rank that dies is cleaned up by the MPI launcher, one that hangs or fails makes the others abort
with a message, never a silent hang.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from .backend import to_host
from .errors import EXIT_BUG, EXIT_USER, NetdslError, render_all

# The environment each MPI launcher gives its ranks: MPICH/Hydra and Slurm (PMI), Open MPI, MVAPICH.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
STEP_TIMEOUT = 600.0      # seconds a rank waits for the others in one collective (rank 0 may be testing)
FAIL_GRACE = 5.0          # seconds a failing rank waits to learn whether every rank failed alike
FORWARD_GRACE = 0.5       # seconds for the launcher to forward a rank's last message before MPI_Abort


def launched_ranks() -> int:
    """How many ranks the MPI launcher started this process among (1 outside mpiexec)."""
    for name in SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class OneRank:
    """The communicator interface, and its one-process case.

    allreduce_mean(buf): buf (a contiguous 1-D array) becomes the mean of every rank's buf, in place.
    broadcast(buf): every rank's buf becomes rank 0's, in place.
    broadcast_host(buf): the same for a small NumPy array (NCCL's buffers live on the GPU).
    agree(seconds): a barrier that gives up after `seconds`; True when every rank reached it.
    abort(code): end every rank's process now.
    `what` says where the ranks are, for the message when a collective times out.
    """
    rank, size, name, what = 0, 1, "one process", ""

    def allreduce_mean(self, buf) -> None:
        pass

    def broadcast(self, buf) -> None:
        pass

    def broadcast_host(self, buf) -> None:
        self.broadcast(buf)

    def agree(self, seconds: float) -> bool:
        return True

    def abort(self, code: int):
        raise SystemExit(code)


def _poll(test, seconds: float) -> bool:
    """Call test() until it is true or `seconds` pass: spin briefly, then back off to 10 ms naps."""
    deadline, nap = time.monotonic() + seconds, 0.0
    while not test():
        if time.monotonic() > deadline:
            return False
        if nap:
            time.sleep(nap)
        nap = min(0.01, nap * 2 or 1e-5)
    return True


class Watchdog:
    """Calls expire(what) when a collective outlasts its deadline. The collective itself blocks:
    MPI moves a large buffer only while a rank is inside an MPI call, so polling a nonblocking
    one with naps in between would stall it; this thread watches the clock instead."""

    def __init__(self, seconds: float, expire):
        self.seconds, self.expire, self.what, self.deadline = seconds, expire, "", None
        threading.Thread(target=self._watch, daemon=True, name="netdsl-watchdog").start()

    @contextmanager
    def __call__(self, what: str):
        self.what, self.deadline = what, time.monotonic() + self.seconds
        try:
            yield
        finally:
            self.deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.seconds / 4))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self.expire(self.what)
                return


class MPIComm(OneRank):
    """MPI_COMM_WORLD through mpi4py, NumPy buffers passed as they are (no pickling). A rank that
    waits in a collective longer than `timeout` reports it (E0754) and aborts every rank."""

    def __init__(self, timeout: float = STEP_TIMEOUT):
        try:
            from mpi4py import MPI
        except ImportError:
            raise NetdslError("E0750", "this process was started by an MPI launcher, but mpi4py is not installed",
                              help="pip install 'netdsl[mpi]' (mpi4py and mpich), or run without mpiexec") from None
        self.MPI, self.comm, self.timeout = MPI, MPI.COMM_WORLD, timeout
        self.failures = self.comm.Dup()     # agree() on its own communicator: it may meet a rank mid-collective
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.name = f"MPI ({' '.join(MPI.Get_library_version().split()[:3]).rstrip(',')})"
        self.deadline = Watchdog(timeout, self._expired)

    def allreduce_mean(self, buf) -> None:
        with self.deadline("the gradient allreduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        buf *= buf.dtype.type(1.0 / self.size)

    def broadcast(self, buf) -> None:
        with self.deadline("the broadcast of rank 0's weights"):
            self.comm.Bcast(buf, root=0)

    def agree(self, seconds: float) -> bool:
        return _poll(self.failures.Ibarrier().Test, seconds)

    def local_rank(self) -> int:
        """This rank's place among the ranks on its machine (which GPU it drives)."""
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()

    def local_size(self) -> int:
        """How many ranks share this rank's machine (and its cores)."""
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_size()

    def abort(self, code: int):
        sys.stderr.flush()
        time.sleep(FORWARD_GRACE)        # MPI_Abort tears down the launcher's output forwarding too
        self.comm.Abort(code)

    def _expired(self, what: str) -> None:
        error = NetdslError("E0754", f"rank {self.rank} of {self.size}: no answer from the other ranks for "
                            f"{self.timeout:g} s in {what}{self.what}",
                            notes=["another rank is stuck, or died without the launcher noticing; every rank is "
                                   "being stopped"],
                            help="look for the error of another rank above; raise --step-timeout if rank 0's "
                                 "tests or snapshots take longer than that")
        render_all(error.diagnostics)
        sys.stderr.flush()
        self.abort(EXIT_USER)


class NCCLComm(OneRank):
    """NCCL through cupy.cuda.nccl, one rank per GPU; MPI starts it (rank 0's unique id is
    broadcast) and runs the barriers. The allreduce is queued on the compute stream; the host then
    waits for it with a deadline (NCCL has none of its own) and aborts the NCCL communicator when
    it passes. `nccl` and `cupy` are parameters so the wiring can be tested without a GPU."""

    DTYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}

    def __init__(self, mpi: MPIComm, nccl=None, cupy=None):
        if cupy is None:
            import cupy
            from cupy.cuda import nccl
        self.mpi, self.nccl, self.cupy, self.timeout = mpi, nccl, cupy, mpi.timeout
        self.rank, self.size = mpi.rank, mpi.size
        cupy.cuda.Device(mpi.local_rank() % cupy.cuda.runtime.getDeviceCount()).use()    # one GPU per rank
        uid = mpi.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.name = f"NCCL {nccl.get_version()}"

    def allreduce_mean(self, buf) -> None:
        stream = self.cupy.cuda.get_current_stream()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf), self.nccl.NCCL_SUM, stream.ptr)
        buf *= buf.dtype.type(1.0 / self.size)
        self._wait(stream, "the gradient allreduce")

    def broadcast(self, buf) -> None:
        stream = self.cupy.cuda.get_current_stream()
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), 0, stream.ptr)
        self._wait(stream, "the broadcast of rank 0's weights")

    def broadcast_host(self, buf) -> None:
        self.mpi.broadcast(buf)

    def agree(self, seconds: float) -> bool:
        return self.mpi.agree(seconds)

    def abort(self, code: int):
        self.comm.abort()
        self.mpi.abort(code)

    def _dtype(self, buf) -> int:
        return getattr(self.nccl, self.DTYPES[buf.dtype.name])

    def _wait(self, stream, what: str) -> None:
        event = stream.record()
        if not _poll(lambda: event.done, self.timeout):
            self.comm.abort()
            raise NetdslError("E0754", f"rank {self.rank} of {self.size}: {what} did not finish in "
                              f"{self.timeout:g} s{self.what}", help="look for another rank's error above")


class DataParallel:
    """The Trainer's side of data parallelism: what a rank shares with the others and when.

    attach: shard the train net's data, and make the solver's grads views of one flat buffer
    (plus two floats: the loss and the stop flag). start: copy rank 0's weights and solver
    history to every rank. reduce: the step's one allreduce.
    """

    def __init__(self, comm: OneRank):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.stop_wanted = False       # a SIGINT on this rank, shared with the others at the next reduce
        self.flat = None

    def common_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank: the data order (and so the shards) depend on it."""
        buf = np.array([seed], np.int64)
        self.comm.broadcast_host(buf)
        return int(buf[0])

    def attach(self, trainer) -> None:
        if trainer.compiled is not None:
            raise NetdslError("E0752", "graph mode cannot train on several ranks yet",
                              help="use --graph off (eager) with --procs or mpiexec")
        trainer.net.set_shard(self.rank, self.size)
        params, xp = trainer.solver.params, trainer.backend.xp
        self.flat = xp.zeros(sum(p.grad.size for p in params) + 2, trainer.net.dtype)
        offset = 0
        for p in params:
            view = self.flat[offset:offset + p.grad.size].reshape(p.grad.shape)
            view[...] = p.grad
            p.grad, offset = view, offset + p.grad.size

    def start(self, trainer) -> None:
        """Every rank starts from rank 0's weights and solver history (Caffe's NCCL::Broadcast)."""
        blobs = [p.data for p in trainer.net.slots.values()]
        blobs += [h for b in trainer.solver.buffers for h in b.history]
        xp = trainer.backend.xp
        for a in blobs:
            buf = xp.ascontiguousarray(a).reshape(-1)
            self.comm.broadcast(buf)
            a[...] = buf.reshape(a.shape)         # a no-op copy onto itself when `a` was contiguous
        trainer.log(f"Data-parallel training on {self.size} ranks over {self.comm.name}: each rank's batch is "
                    f"1/{self.size} of the effective batch", echo=True)

    def reduce(self, trainer, loss: float) -> float:
        """Average the gradients, the loss and the stop flag over the ranks; returns the mean loss."""
        self.flat[-2] = loss
        self.flat[-1] = 1.0 if self.stop_wanted else 0.0
        self.comm.what = f" at iteration {trainer.iter}"
        self.comm.allreduce_mean(self.flat)
        loss, stop = (float(x) for x in to_host(self.flat[-2:]))
        if stop > 0:
            trainer.stop_requested = True
        return loss

    def fail(self, error: BaseException) -> int:
        """A rank's error: when every rank failed together (a divergence seen by all), rank 0 reports
        it and all exit 2; when this rank failed alone it reports it and aborts every rank. A timeout
        is this rank's alone by definition: it aborts at once."""
        timed_out = isinstance(error, NetdslError) and error.diagnostic.code == "E0754"
        together = not timed_out and self.comm.agree(FAIL_GRACE)
        code = EXIT_USER if isinstance(error, NetdslError) else 130 if isinstance(error, KeyboardInterrupt) else EXIT_BUG
        if together and self.rank != 0:
            return code
        where = f"rank {self.rank} of {self.size}"
        if isinstance(error, NetdslError):
            for d in error.diagnostics:
                d.notes.append(f"on {where}" + ("" if together else "; every rank is being stopped"))
            render_all(error.diagnostics)
        elif isinstance(error, KeyboardInterrupt):
            print(f"netdsl: {where} interrupted twice; stopping every rank without a snapshot", file=sys.stderr)
        else:
            print(f"netdsl: internal error on {where}: {type(error).__name__}: {error}\nthis is a bug in netdsl; "
                  "rerun with --debug for a traceback and report it", file=sys.stderr)
        sys.stderr.flush()
        if not together:
            self.comm.abort(code)
        return code


def resume_note(saved: int, now: int) -> str | None:
    """What changes when a snapshot written by `saved` ranks resumes on `now` ranks (None: nothing)."""
    if saved == now:
        return None
    return (f"warning W0750: the snapshot was written by {saved} rank(s), this run has {now}: the effective batch "
            f"changes from {saved} to {now} times the net's batch_size per update (the lr schedule and the solver "
            f"history do not), and the data continue from the same place in the shared order; resume with {saved} "
            "rank(s) to continue the run exactly")


# -- the command ----------------------------------------------------------------------------------

def cmd_train(args) -> int:
    """`netdsl train` on several ranks: launch mpiexec (--procs N), or be one rank of it."""
    ranks = launched_ranks()
    if args.procs is not None and args.procs < 1:
        raise NetdslError("E0752", f"--procs must be at least 1, got {args.procs}", help="e.g. --procs 2")
    if ranks == 1:
        return launch(args)
    if args.procs not in (None, ranks):
        raise NetdslError("E0752", f"--procs {args.procs}, but the MPI launcher started {ranks} ranks",
                          help=f"drop --procs under mpiexec, or run `mpiexec -n {args.procs} ...`")
    return train_rank(args, MPIComm(args.step_timeout))


def mpiexec_command(n: int) -> list[str]:
    """`mpiexec -n N` for N ranks on this machine, with what the MPI it belongs to needs there.

    The mpiexec installed beside this Python (by the same pip as mpi4py) comes first, then the one
    on PATH. MPICH runs any N as any user. Open MPI counts cores as slots and refuses more ranks than
    that, and refuses root (containers run as root): for one machine `--procs N` says what the user
    meant, so it adds --oversubscribe and, as root, --allow-run-as-root (as Horovod's launcher does).
    """
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise NetdslError("E0751", f"--procs {n} needs mpiexec, which is not on PATH",
                          help="pip install 'netdsl[mpi]' (mpi4py and mpich), or install Open MPI")
    flags = []
    if mpi_flavour(mpiexec) == "Open MPI":
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [mpiexec, *flags, "-n", str(n)]


def mpi_flavour(mpiexec: str) -> str:
    """"Open MPI" or "MPICH" (MPICH, Intel MPI, MVAPICH: Hydra's flags), from `mpiexec --version`."""
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    return "Open MPI" if "Open MPI" in out or "OpenRTE" in out else "MPICH"


def launch(args) -> int:
    """--procs N on one machine: `mpiexec -n N` this same command, each rank with its share of the
    cores for its BLAS threads (unless OMP_NUM_THREADS is set). Ctrl-C reaches the ranks as SIGUSR1,
    which both MPICH and Open MPI forward (Open MPI kills the ranks on SIGINT instead); a second
    Ctrl-C is passed on as SIGINT, which stops them without a snapshot."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--procs":
            skip = not skip
            continue
        if not a.startswith("--procs="):
            argv.append(a)
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // args.procs))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, env.get("OMP_NUM_THREADS", threads))
    # mpiexec in a session of its own, so a terminal's Ctrl-C reaches it only as forwarded from here
    proc = subprocess.Popen([*mpiexec_command(args.procs), sys.executable, "-m", "netdsl", *argv], env=env,
                            start_new_session=True)
    interrupts = []

    def forward(signum, _):
        if signum == signal.SIGINT:
            interrupts.append(signum)
            signum = signal.SIGUSR1 if len(interrupts) == 1 else signal.SIGINT
        proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if len(interrupts) > 1 and code not in (0, 130):     # Open MPI's mpiexec ended the ranks itself
        print("netdsl: interrupted twice; every rank has been stopped without a snapshot. Snapshots written before "
              "are intact.", file=sys.stderr)
        return 130
    if code not in (0, 130, EXIT_USER):
        print(f"netdsl: a rank ended abnormally (mpiexec exit status {code}); every rank has been stopped. "
              "Snapshots written before are intact (each is written atomically).", file=sys.stderr)
    return code


def rank_threads(args, mpi: MPIComm) -> int:
    """One rank's BLAS threads: --threads, else OMP_NUM_THREADS (which --procs sets, and the README
    asks of mpiexec users), else the machine's cores shared among its ranks. A lone process takes
    every core (netdsl/cpu/threads.py); N ranks doing so would run N threads per core, and OpenBLAS's
    threads spin waiting for each other."""
    if args.threads:
        return args.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    from .cpu.threads import available_cores
    return max(1, available_cores() // mpi.local_size())


def train_rank(args, mpi: MPIComm) -> int:
    """One rank of `mpiexec -n N netdsl train SOLVER`."""
    from .backend import get_backend
    from .train import Trainer
    parallel = DataParallel(mpi)
    # SIGUSR1 asks for a stop with a snapshot, as Ctrl-C: both MPICH's and Open MPI's mpiexec pass it
    # on to every rank, while Open MPI ends the ranks on SIGINT (`--procs` turns Ctrl-C into it)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(parallel, "stop_wanted", True))
    try:
        if args.graph == "on":
            raise NetdslError("E0752", "--graph on: graph mode cannot train on several ranks yet",
                              help="drop --graph on: each rank trains eagerly")
        if args.device == "gpu":
            get_backend("gpu")                         # CuPy and a device, or its clear error
            parallel = DataParallel(NCCLComm(mpi))     # before the nets: it picks this rank's GPU
        backend = get_backend(args.device)
        trainer = Trainer(args.solver, backend, seed=args.seed, max_iter=args.max_iter, data_dir=args.data_dir,
                          out=args.out, graph="off", parallel=parallel, progress=None if mpi.rank == 0 else False,
                          threads=rank_threads(args, mpi))
        if args.weights:
            trainer.log(str(trainer.net.load(args.weights)), echo=True)
        if args.snapshot:
            trainer.restore(args.snapshot)
        parallel.start(trainer)
        result = trainer.run()
    except BaseException as e:                 # noqa: BLE001 - any failure must stop every rank
        if getattr(args, "debug", False):
            import traceback
            traceback.print_exc()
        return parallel.fail(e)
    if result.interrupted:
        return 130
    if mpi.rank == 0:
        print(f"trained {result.iterations} iterations on {mpi.size} ranks in {result.seconds:.1f} s; weights: "
              f"{result.last_snapshot}{trainer.weights_suffix}")
    return 0
