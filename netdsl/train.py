"""Train: the solver loop over a train net and its test nets. Caffe's iteration order, logs and
snapshots; atomic snapshot writes; SIGINT snapshots and stops; a non-finite loss or gradient
stops with the first layer that produced it, after snapshotting the last good state."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .debuginfo import DebugInfo
from .errors import NetdslError
from .executor import build_net, save_npz
from .files import prepare_output
from .frcnn import renormalise, unnormalised
from .solver import Solver, learning_rate
from .solverfile import SolverFile, load_solver


@dataclass
class TrainResult:
    iterations: int
    last_snapshot: str | None
    tests: list[dict]
    interrupted: bool = False
    seconds: float = 0.0


class Logger:
    """Caffe-style log lines to a file (always) and to stderr (when not drawing a progress bar);
    `stamp=False` writes lines as given (the metrics JSON lines). A write that fails mid-run (a
    full disk) warns once and stops logging to the file: training and its snapshots go on."""

    def __init__(self, path: str, echo: bool, stamp: bool = True):
        try:
            self.f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise NetdslError("E0770", f"cannot open {path}: {e.strerror or e}",
                              help="point snapshot_prefix / --out at a writable directory") from None
        self.path, self.echo, self.stamp = path, echo, stamp

    def __call__(self, msg: str, echo: bool | None = None) -> None:
        t = time.time()
        line = time.strftime("I%m%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}] {msg}" \
            if self.stamp else msg
        if self.f is not None:
            try:
                self.f.write(line + "\n")
                self.f.flush()
            except OSError as e:
                self.f = None
                print(f"warning[W0770]: cannot write {self.path} ({e.strerror or e}); it stops here, "
                      "training goes on", file=sys.stderr, flush=True)
        if self.echo if echo is None else echo:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()


class Silent(Logger):
    """The log of a rank other than 0 in data-parallel training: rank 0 alone speaks for the run."""

    def __init__(self):
        pass

    def __call__(self, msg: str, echo: bool | None = None) -> None:
        pass

    def close(self):
        pass


class Progress:
    """One redrawn line on a terminal: iteration, running loss, lr, it/s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0, self.last = total, enabled, time.time(), 0.0

    def update(self, it: int, loss: float, lr: float, start: int, force=False) -> None:
        now = time.time()
        if not self.enabled or (now - self.last < 0.1 and not force):
            return
        self.last = now
        rate = (it - start) / max(now - self.t0, 1e-9)
        frac = it / max(self.total, 1)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {it}/{self.total} loss {loss:.4f} lr {lr:.6g} {rate:.1f} it/s ")
        sys.stderr.flush()

    def clear(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


class Trainer:
    def __init__(self, solver_path: str, backend, *, seed: int | None = None, max_iter: int | None = None,
                 data_dir: str | None = None, out: str | None = None, progress: bool | None = None,
                 graph: str = "auto", parallel=None, debug_info: bool = False, cpu_kernels: str = "compiled",
                 threads: int | None = None):
        self.sf: SolverFile = load_solver(solver_path)
        cfg = self.sf.cfg
        if max_iter is not None:
            if max_iter < 0:
                raise NetdslError("E0000", f"--max-iter must be >= 0, got {max_iter}", help="e.g. --max-iter 1000")
            cfg.max_iter = max_iter
        if seed is None or seed < 0:      # Caffe's random_seed -1: a seed from the system
            seed = cfg.random_seed if seed is None and cfg.random_seed >= 0 else None
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.parallel = parallel            # distributed.DataParallel: one rank of several
        self.root = parallel is None or parallel.rank == 0      # rank 0 alone logs, tests and snapshots
        if parallel is not None:
            self.seed = parallel.common_seed(self.seed)
        self.backend = backend
        prefix = cfg.snapshot_prefix or os.path.splitext(os.path.basename(solver_path))[0]
        if prefix.endswith(("/", os.sep)):        # Caffe's "dir/" prefix: files named like the solver inside it
            prefix = os.path.join(prefix, os.path.splitext(os.path.basename(solver_path))[0])
        self.out = out or os.path.dirname(prefix) or "."
        self.prefix = os.path.join(self.out, os.path.basename(prefix))
        # weights snapshots: Caffe's binary .caffemodel when the solver asks for BINARYPROTO by name,
        # else netdsl's .npz (its default: one numpy file, no protobuf needed to read it back)
        explicit = self.sf.record.has("snapshot_format") and cfg.snapshot_format == "BINARYPROTO"
        self.weights_suffix = ".caffemodel" if explicit else ".npz"
        if self.root:
            self._prepare_output(out)
        self.progress_on = sys.stderr.isatty() if progress is None else progress
        self.log = Logger(self.prefix + ".log", echo=not self.progress_on) if self.root else Silent()
        self.metrics = Logger(self.prefix + "_metrics.jsonl", echo=False, stamp=False) if self.root else Silent()
        stages = tuple(cfg.train_state.stage) if cfg.train_state is not None else ()
        self.net = build_net(self.sf.train_net, "TRAIN", backend, seed=self.seed, data_dir=data_dir, stages=stages)
        self.tests = [build_net(src, "TEST", backend, seed=self.seed, data_dir=data_dir, share_from=self.net,
                                stages=tuple(cfg.test_state[i].stage) if i < len(cfg.test_state) else ())
                      for i, src in enumerate(self.sf.test_nets)] if self.root else []
        self.solver = Solver(cfg, self.net.learnable, xp=backend.xp)
        if debug_info:
            cfg.debug_info = True
        self.debug = DebugInfo(self.net, self.log, self.metrics) if cfg.debug_info else None
        if self.debug and not cfg.display:
            self.log("debug_info prints on display iterations, as Caffe's; with display: 0 none shows", echo=True)
        if (self.debug or parallel is not None) and cpu_kernels == "compiled":
            # the compiled kernels reuse buffers within a step (debug_info reads every blob after it) and
            # keep gradients in their own flat buffer (the allreduce has its own): these runs use NumPy's
            cpu_kernels = "numpy"
        from .cpu import compile_training  # the CPU: thread counts, compiled kernels and flat solver
        self.cpu = compile_training(self, cpu_kernels, threads)
        from .gpu.loop import compile_trainer  # graph mode (GPU): None means eager
        self.compiled = compile_trainer(self, graph)
        if parallel is not None:
            parallel.attach(self)
        self.iter = 0
        self.losses: deque = deque(maxlen=max(cfg.average_loss, 1))
        self.stop_requested = False
        self.last_snapshot = None
        self.test_results: list[dict] = []

    def _prepare_output(self, out: str | None) -> None:
        """Refuse, before any work, an output place that cannot take the log and the snapshots."""
        why = prepare_output(self.prefix)
        if why:
            rec = self.sf.record
            given = "--out" if out else "snapshot_prefix"
            raise NetdslError("E0770", f"cannot write the run's files to {self.prefix!r}: {why}",
                              rec.pos("snapshot_prefix") if given == "snapshot_prefix" and rec.has("snapshot_prefix")
                              else None, help=f"point {given} at a writable directory (e.g. `runs/mynet/`)")

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> str | None:
        """Write the weights and the solver state at this iteration (rank 0 alone, in data-parallel
        training; other ranks return None); a failed write (a full disk) stops the run with the
        previous snapshot intact (writes are atomic)."""
        if not self.root:
            return None
        try:
            return self._snapshot()
        except (OSError, NetdslError) as e:
            if isinstance(e, NetdslError) and e.diagnostic.code != "E0771":
                raise
            why = e.diagnostic.message if isinstance(e, NetdslError) else f"{e.strerror or e} ({e.filename or self.prefix})"
            before = (f"the previous snapshot {self.last_snapshot}{self.weights_suffix} is intact"
                      if self.last_snapshot else "no earlier snapshot was written in this run")
            raise NetdslError("E0771", f"cannot write the snapshot at iteration {self.iter}: {why}", notes=[before],
                              help="free space or point snapshot_prefix / --out elsewhere, then resume") from None

    def _snapshot(self) -> str:
        base = f"{self.prefix}_iter_{self.iter}"
        with unnormalised(self.net):      # py-faster-rcnn's snapshot: box deltas as a test net decodes them
            self.net.save(base + self.weights_suffix)
        state = {f"solver/{k}": v for k, v in self.solver.state_dict().items()}
        state["iter"] = np.array(self.iter)
        state["weights"] = np.array(os.path.basename(base + self.weights_suffix))
        state["seed"] = np.array(self.seed)
        state["procs"] = np.array(self.parallel.size if self.parallel else 1)
        state["losses"] = np.array(list(self.losses), dtype=np.float64)
        for name, net in [("train", self.net)] + [(f"test{i}", t) for i, t in enumerate(self.tests)]:
            state[f"{name}/forward_count"] = np.array(net.forward_count)
            for layer, cursor in net.data_state().items():
                for k, v in cursor.items():
                    state[f"{name}/data/{layer}/{k}"] = np.array(v)
        save_npz(base + ".solverstate.npz", state)
        # Caffe's words where the file is Caffe's (a binary proto .caffemodel); else what it is
        what = "binary proto file" if self.weights_suffix == ".caffemodel" else "NumPy archive (weights by layer/index)"
        self.log(f"Snapshotting to {what} {base}{self.weights_suffix}")
        self.log(f"Snapshotting solver state to NumPy archive {base}.solverstate.npz")
        self.last_snapshot = base
        return base

    def restore(self, path: str) -> None:
        import zipfile
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise NetdslError("E0705", f"cannot read solver state {path}: {e}",
                              help="pass a <prefix>_iter_N.solverstate.npz written by `netdsl train`") from None
        if "iter" not in state or "weights" not in state:
            missing = "iter" if "iter" not in state else "weights"
            raise NetdslError("E0705", f"{path} is not a solver state (no '{missing}')",
                              help="pass the .solverstate.npz that `netdsl train` wrote beside the weights")
        for key in ("iter", "seed"):
            v = state.get(key, np.array(0))
            if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
                raise NetdslError("E0705", f"{path}: '{key}' is {v!r}, not a non-negative integer",
                                  help="the solver state is damaged: resume from another snapshot")
        weights = os.path.join(os.path.dirname(path), str(state["weights"]))
        self.net.load(weights)
        renormalise(self.net)             # undo the snapshot's unnormalisation (netdsl.frcnn)
        try:
            self.solver.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("solver/")})
        except ValueError as e:
            raise NetdslError("E0705", f"{path} does not fit this solver: {e}",
                              help="resume with the solver (type and net) that wrote the snapshot, or start from its "
                                   "weights with --weights") from None
        self.iter = int(state["iter"])
        self.seed = int(state["seed"])
        from .distributed import resume_note
        note = resume_note(int(state.get("procs", 1)), self.parallel.size if self.parallel else 1)
        if note:
            self.log(note, echo=True)
        self.losses.extend(float(x) for x in state["losses"])
        for name, net in [("train", self.net)] + [(f"test{i}", t) for i, t in enumerate(self.tests)]:
            net.seed = self.seed
            net.forward_count = int(state.get(f"{name}/forward_count", 0))
            cursors: dict[str, dict] = {}
            for k, v in state.items():
                if k.startswith(f"{name}/data/"):
                    layer, field = k[len(name) + 6:].rsplit("/", 1)
                    cursors.setdefault(layer, {})[field] = v
            net.load_data_state(cursors)
        self.log(f"Restored solver state from {path} at iteration {self.iter}")

    # -- testing ----------------------------------------------------------------------------
    def test(self, i: int) -> dict:
        net, n = self.tests[i], self.sf.cfg.test_iter[i]
        self.log(f"Iteration {self.iter}, Testing net (#{i})")
        sums: dict[str, float] = {}
        if self.compiled is not None and self.compiled.has_test(i):
            sums = self.compiled.test_sums(i, n)          # graph mode: the test step's CUDA graph
        else:
            for _ in range(n):
                if self.stop_requested:              # Ctrl-C: stop now, not at the end of the pass
                    self.log(f"    Test net #{i} interrupted; its outputs are not recorded", echo=True)
                    return {}
                outs = net.forward()
                for k, v in outs.items():
                    if v.size == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.reshape(-1)[0])
        means = {k: v / n for k, v in sums.items()}
        weights = {s.layer.spec.tops[j]: w for s in net.plan.steps for j, w in enumerate(s.loss_weights)}
        for j, (k, v) in enumerate(means.items()):
            w = weights.get(k, 0.0)
            self.log(f"    Test net output #{j}: {k} = {v:.6g}" + (f" (* {w:g} = {v * w:.6g} loss)" if w else ""),
                     echo=True)
        rec = {"kind": "test", "net": i, "iter": self.iter, **means}
        self.metrics(json.dumps(rec))
        self.test_results.append(rec)
        return means

    def maybe_test(self):
        cfg = self.sf.cfg
        if cfg.test_interval and self.iter % cfg.test_interval == 0 and (self.iter > 0 or cfg.test_initialization):
            for i in range(len(self.tests)):
                self.test(i)

    # -- the loop ---------------------------------------------------------------------------
    def _non_finite(self, loss: float) -> str | None:
        """The first layer (in execution order) whose output or param gradient is NaN or Inf."""
        xp = self.backend.xp
        finite_grads = all(bool(xp.isfinite(p.grad).all()) for p in self.net.learnable)
        if math.isfinite(loss) and finite_grads:
            return None
        if self.cpu is not None:
            from .cpu.program import replay_with_numpy
            replay_with_numpy(self.net)
        for s in self.net.plan.steps:
            for u, t in zip(s.layer.spec.tops, s.node.tops):
                v = self.net.values.get(t)
                if v is not None and not bool(xp.isfinite(v).all()):
                    return f"{s.layer.type} '{s.node.name}' (its top '{u}')"
        for name, ps in self.net.params.items():
            for j, p in enumerate(ps):
                if not bool(xp.isfinite(p.grad).all()):
                    return f"the gradient of layer '{name}' param {j}"
        return "the loss"

    def _diverged(self, bad: str) -> NetdslError:
        """E0710, naming the last good weights: the current ones when they are finite (the step
        that diverged was not applied), snapshotted now; else the last snapshot of the run."""
        xp = self.backend.xp
        if all(bool(xp.isfinite(p.data).all()) for p in self.net.learnable):
            snap = self.snapshot() or f"{self.prefix}_iter_{self.iter}"          # rank 0 writes it
            good = f"the last good weights are in {snap}{self.weights_suffix} (resume with --snapshot {snap}.solverstate.npz)"
        elif self.last_snapshot:
            good = (f"the weights are already NaN or Inf, so none were saved now; the last snapshot is "
                    f"{self.last_snapshot}{self.weights_suffix}")
        else:
            good = "the weights are already NaN or Inf and no snapshot was written before: none were saved"
        return NetdslError("E0710", f"training diverged at iteration {self.iter}: {bad} produced NaN or Inf",
                           notes=[good], help="lower base_lr, add clip_gradients, or check the input scaling")

    def _train_outputs(self):
        """The train net's scalar outputs of the last forward, with their loss weights."""
        for step in self.net.plan.steps:
            for u, t, w in zip(step.layer.spec.tops, step.node.tops, step.loss_weights):
                v = self.net.values.get(t)
                if t in self.net.plan.outputs and v is not None and v.size == 1:
                    yield u, float(v.reshape(-1)[0]), w

    def display(self, k: int, smoothed: float, lr: float, rate: float, outputs=()) -> None:
        """Caffe's display lines for iteration k, and the metrics record."""
        self.log(f"Iteration {k} ({rate:.1f} iter/s), loss = {smoothed:.6g}")
        for j, (name, value, w) in enumerate(outputs):
            self.log(f"    Train net output #{j}: {name} = {value:.6g}" + (f" (* {w:g} = {value * w:.6g} loss)" if w else ""))
        self.log(f"Iteration {k}, lr = {lr:.6g}")
        self.metrics(json.dumps({"kind": "train", "iter": k, "loss": smoothed, "lr": lr}))

    def run(self) -> TrainResult:
        """Caffe's Solve: the loop (eager, or replayed CUDA graphs), then the final snapshot and test."""
        cfg = self.sf.cfg
        mode = ", graph mode" if self.compiled is not None else ""
        self.log(f"Solving {self.net.plan.name or 'net'} (seed {self.seed}, {self.backend.name}{mode})")
        self.log(f"Learning Rate Policy: {cfg.lr_policy}")
        start, t0 = self.iter, time.time()
        progress = Progress(cfg.max_iter, self.progress_on)
        old = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            if self.compiled is not None:
                from .gpu.loop import train_compiled
                train_compiled(self, progress, start, t0)
            else:
                self._train_eager(progress, start, t0)
            progress.clear()
            self._finish()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            if self.cpu is not None and self.blas_threads:  # the compiled kernels held OpenBLAS at one
                from .cpu.threads import set_openblas_threads
                set_openblas_threads(self.blas_threads)
            self.log.close()
            self.metrics.close()
        return TrainResult(self.iter, self.last_snapshot, self.test_results, self.stop_requested, time.time() - t0)

    def _train_eager(self, progress: Progress, start: int, t0: float) -> None:
        cfg, net = self.sf.cfg, self.net
        while self.iter < cfg.max_iter and not self.stop_requested:
            self.maybe_test()
            net.zero_grad()
            loss = 0.0
            debug = self.debug if cfg.display and self.iter % cfg.display == 0 else None  # as Caffe: display iterations
            for _ in range(cfg.iter_size):
                try:
                    net.forward()
                except NetdslError as e:           # a bad record met mid-training: keep what was learnt
                    progress.clear()
                    raise self._stopped(e) from None
                if debug:
                    debug.forward()
                loss += net.loss()
                net.backward()
                if debug:
                    debug.backward()
            loss /= cfg.iter_size
            if self.parallel is not None:
                loss = self.parallel.reduce(self, loss)
            bad = self._non_finite(loss)
            if bad:
                raise self._diverged(bad)
            self.losses.append(loss)
            smoothed = sum(self.losses) / len(self.losses)
            lr = learning_rate(cfg, self.iter)
            if cfg.display and self.iter % cfg.display == 0:
                rate = (self.iter - start) / max(time.time() - t0, 1e-9)
                self.display(self.iter, smoothed, lr, rate, self._train_outputs())
            if debug:
                debug.before_update()
            self.solver.step(self.iter)
            if debug:
                debug.after_update(self.iter)
            self.iter += 1
            progress.update(self.iter, smoothed, lr, start)
            if cfg.snapshot and self.iter % cfg.snapshot == 0:
                progress.clear()
                self.snapshot()

    def _stopped(self, error: NetdslError) -> NetdslError:
        """`error`, after a snapshot of the last good state (weights and cursors before this batch)."""
        snap = self.snapshot() or f"{self.prefix}_iter_{self.iter}"          # rank 0 writes it
        error.diagnostics[0].notes.append(f"training stopped at iteration {self.iter}; the last good state is in "
                                      f"{snap}{self.weights_suffix} (resume with --snapshot {snap}.solverstate.npz)")
        return error

    def _finish(self) -> None:
        cfg = self.sf.cfg
        if self.stop_requested:
            self.snapshot()
            self.log(f"Interrupted at iteration {self.iter}; resume with --snapshot "
                     f"{self.last_snapshot}.solverstate.npz", echo=True)
            return
        if cfg.snapshot_after_train and (not cfg.snapshot or self.iter % cfg.snapshot):
            self.snapshot()
        if cfg.test_interval and self.iter % cfg.test_interval == 0:
            for i in range(len(self.tests)):
                self.test(i)
        self.log("Optimization Done.")

    def _on_sigint(self, signum, frame):
        if self.stop_requested or self.parallel and self.parallel.stop_wanted:
            raise KeyboardInterrupt      # a second Ctrl-C: stop now (the snapshot is being written)
        if self.parallel is not None:
            self.parallel.stop_wanted = True      # every rank stops at the next step's allreduce
        else:
            self.stop_requested = True


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
