"""The compiled CPU path (Numba): the plan lowered to compiled kernels over preallocated buffers
(program.py, ops.py, kernels.py), the solver update as one pass over a flat parameter buffer
(update.py), and the thread policy (threads.py). This package's __init__ imports no Numba: only
choosing the compiled kernels does, so `netdsl check` and the NumPy path never load it."""
from __future__ import annotations

from ..errors import NetdslError

CPU_KERNELS = ("compiled", "numpy")


def compile_training(trainer, kernels: str = "compiled", threads: int | None = None):
    """Trainer's hook: on the CPU, set the thread counts and, with compiled kernels, lower the train
    and test nets and swap in the flat-buffer solver. Returns the train net's Lowering, or None
    (NumPy kernels, or not on the CPU). `trainer.blas_threads` keeps OpenBLAS's count from before,
    which Trainer.run restores."""
    from .threads import openblas_threads
    trainer.blas_threads = openblas_threads()       # Trainer.run gives OpenBLAS its threads back
    lw, said = use_kernels(trainer.backend, kernels, threads, trainer.net, trainer.tests)
    if said:
        trainer.log(said)
    if lw is not None:
        trainer.solver = flat_solver(trainer.sf.cfg, trainer.net)
    return lw


def use_kernels(backend, kernels: str, threads: int | None, net, tests=()):
    """On the CPU: the thread counts set and, with compiled kernels, `net` and its `tests` lowered.
    Returns (net's Lowering or None, the line that says what runs; empty off the CPU)."""
    if kernels not in CPU_KERNELS:
        raise NetdslError("E0730", f"unknown --cpu-kernels '{kernels}'", help="use --cpu-kernels compiled or numpy")
    if threads is not None and threads < 1:
        raise NetdslError("E0731", f"--threads must be at least 1, got {threads}", help="e.g. --threads 2")
    if backend.name != "cpu":
        return None, ""
    from .threads import set_threads
    compiled = kernels == "compiled"
    if compiled:
        _need_numba()
    blas, kernel = set_threads(threads, compiled)
    if not compiled:
        return None, f"CPU: NumPy kernels, {blas} BLAS thread{'s' if blas != 1 else ''}"
    lw = compile_nets(net, tests)
    from .program import coverage
    done, numpy = coverage(net.plan)
    pool = (f"{kernel} thread{'s' if kernel != 1 else ''} (GEMMs included)" if blas == 1
            else f"{kernel} kernel and {blas} BLAS threads")
    return lw, (f"CPU: compiled kernels ({', '.join(done) or 'none'}), {pool}"
                + (f"; NumPy for {', '.join(f'{t} ({why})' for t, why in numpy.items())}" if numpy else ""))


def compile_nets(net, tests=()):
    """Lower a train net and its test nets (which share its params) to compiled ops; their buffers
    (each net's arena and its ops' scratch, allocated but not yet touched) must fit the memory
    budget (E0775)."""
    from ..memory import require
    from .program import lower_cpu
    what = f"net '{net.plan.name or 'net'}'{' (with its test nets)' if tests else ''}, its compiled CPU kernels' buffers,"
    hint = "train with --cpu-kernels numpy (the NumPy layers allocate step by step)"
    try:
        lowerings = [lower_cpu(t) for t in tests] + [lower_cpu(net)]
    except MemoryError:
        raise NetdslError("E0775", f"{what} could not be allocated: the system refused the memory",
                          help=f"{hint}; or make the net smaller (batch, image size)") from None
    require(sum(lw.arena.nbytes + lw.private_bytes for lw in lowerings), what,
            notes=["the blobs of compiled layers live in one arena per net; im2col's columns and the "
                   "gradients of weights in buffers of their own"], hint=hint)
    return lowerings[-1]


def flat_solver(cfg, net):
    """The flat-buffer solver for a net's learnable params (moving them into flat buffers)."""
    from .update import FlatSolver, flatten
    data, grad = flatten(net.learnable, net.dtype)
    return FlatSolver(cfg, net.learnable, data, grad)


def _need_numba() -> None:
    try:
        import numba  # noqa: F401
    except ImportError:
        raise NetdslError("E0732", "the compiled CPU kernels need Numba, which is not installed",
                          help="pip install numba (netdsl's install brings it), or train with --cpu-kernels numpy") from None
