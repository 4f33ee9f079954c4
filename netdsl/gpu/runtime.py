"""Run the compiled step: persistent buffers, the eager Net's params rebound as views of the flat
buffers, and an executor — CUDA (CuPy RawModule, each program captured once as a CUDA graph and
replayed) or NumPy (emulate.py, the CPU oracle).

The host's only per-chunk work: fill the batch-index window from the data layer (so the order,
and the data layer's snapshot state, are exactly the eager run's), set the iteration counter,
replay, and read back the losses of the chunk.
"""
from __future__ import annotations

import numpy as np

from . import emulate
from .codegen import generate
from .kernel import symbol
from .lower import Unsupported, lower_test, lower_train, param_layout
from .program import Program, Ref


def take_batches(net, layer_name: str, batches: int) -> np.ndarray:
    """The next `batches` batches of image indices of a net's MNIST layer, advancing its feed's
    cursor exactly as that many eager forwards would."""
    n = next(s.layer.p.batch_size for s in net.plan.steps if s.node.name == layer_name)
    return net.source(layer_name).next_indices(batches * n).reshape(batches, n)


class CompiledNet:
    """The train iteration (and test steps) of a Trainer's nets, compiled, with their buffers.

    After construction the eager nets' params, gradients and the solver's momentum are views of
    the flat device buffers, so snapshots, `--weights`, restore and eager tests keep working.
    """

    def __init__(self, net, solver, cfg, tests=(), test_iters=(), xp=np, window: int = 1024,
                 executor: str = "cuda", unroll: int = 1):
        self.net, self.solver, self.cfg, self.xp = net, solver, cfg, xp
        self.window = window
        self.layout = param_layout(net.plan)
        self.train = lower_train(net.plan, self.layout, window, cfg)
        self.tests: list[Program | None] = []
        self.test_nets = list(tests)
        self.test_reasons: list[str | None] = []
        for i, (t, n) in enumerate(zip(tests, test_iters)):
            try:
                self.tests.append(lower_test(t.plan, self.layout, i, n))
                self.test_reasons.append(None)
            except Unsupported as e:
                self.tests.append(None)
                self.test_reasons.append(str(e))
        self.programs = [self.train] + [p for p in self.tests if p is not None]
        self.source = generate(self.programs, f"net '{net.plan.name}'")
        self.buffers = self._allocate()
        self._bind_params()
        arena = max(p.arena_bytes for p in self.programs)
        if executor == "cuda":
            self.executor = CudaExecutor(xp, self.source, self.programs, self.buffers, arena, unroll)
        else:
            self.executor = NumpyExecutor(self.programs, self.buffers, arena)

    # -- buffers ----------------------------------------------------------------------------
    def _allocate(self) -> dict:
        xp, lay, cfg = self.xp, self.layout, self.cfg
        learn = lay.learnable
        ptab_i = np.array([[lay.offsets[k], lay.counts[k]] for k in learn], np.int64).reshape(-1)
        ptab_f = np.array([[lay.lr_mult[k], lay.decay_mult[k]] for k in learn], np.float64).reshape(-1)
        buf = {
            "params": xp.zeros(lay.total, np.float32), "grads": xp.zeros(lay.total, np.float32),
            "history": xp.zeros(lay.total, np.float32), "counters": xp.zeros(8, np.int32),
            "loss_hist": xp.zeros(self.window, np.float32),
            "sems": xp.zeros(max([p.sems for p in self.programs] + [1]), np.uint32),
            "ptab_i": xp.asarray(ptab_i if len(ptab_i) else np.zeros(2, np.int64)),
            "ptab_f": xp.asarray(ptab_f if len(ptab_f) else np.zeros(2, np.float64)),
            "steps": xp.asarray(np.array(list(cfg.stepvalue) or [0], np.int32)),
        }
        for prog, net in [(self.train, self.net)] + [(p, t) for p, t in zip(self.tests, self.test_nets) if p]:
            for layer_name, split in prog.data:
                feed = net.source(layer_name)
                if f"images:{split}" not in buf:
                    buf[f"images:{split}"] = xp.asarray(np.ascontiguousarray(feed.images).reshape(-1))
                    buf[f"labels:{split}"] = xp.asarray(np.ascontiguousarray(feed.labels).reshape(-1))
                n = next(s.layer.p.batch_size for s in net.plan.steps if s.node.name == layer_name)
                buf[f"seq:{prog.name}"] = xp.zeros(prog.window * n, np.int32)
            buf[f"acc:{prog.name}"] = xp.zeros(max(1, len(prog.outputs)), np.float64)
        return buf

    def _bind_params(self) -> None:
        """Copy the params (and momentum) in, then make the eager objects views of the buffers."""
        lay, b = self.layout, self.buffers
        history = {id(p): buf.history for p, buf in zip(self.solver.params, self.solver.buffers)}
        for key, p in self.net.slots.items():
            off, n = lay.offsets[key], lay.counts[key]
            shape = p.data.shape
            b["params"][off:off + n] = self.xp.asarray(p.data).reshape(-1)
            p.data = b["params"][off:off + n].reshape(shape)
            p.grad = b["grads"][off:off + n].reshape(shape)
            if id(p) in history and history[id(p)]:
                b["history"][off:off + n] = self.xp.asarray(history[id(p)][0]).reshape(-1)
                history[id(p)][0] = b["history"][off:off + n].reshape(shape)

    # -- running ----------------------------------------------------------------------------
    def _fill_window(self, prog: Program, net, first: int, count: int) -> None:
        """Rows first..first+count-1 (mod the window) of the program's batch-index window."""
        for layer_name, _ in prog.data:
            idx = take_batches(net, layer_name, count).astype(np.int32)
            rows = (first + np.arange(count)) % prog.window
            host = np.empty((prog.window, idx.shape[1]), np.int32)
            host[rows] = idx
            if count == prog.window:
                self.executor.upload(f"seq:{prog.name}", host.reshape(-1))
            else:
                for r0, r1 in _runs(rows):
                    n = idx.shape[1]
                    self.executor.upload(f"seq:{prog.name}", host[r0:r1].reshape(-1), offset=r0 * n)

    def train_chunk(self, it: int, count: int) -> np.ndarray:
        """Run iterations it .. it+count-1 (count <= window); returns their losses."""
        assert 0 < count <= self.window
        self._fill_window(self.train, self.net, it, count)
        self.executor.upload("counters", np.array([it], np.int32), offset=self.train.counter)
        self.executor.replay(self.train, count)
        hist = self.executor.download("loss_hist")
        return hist[(it + np.arange(count)) % self.window]

    def has_test(self, i: int) -> bool:
        return i < len(self.tests) and self.tests[i] is not None

    def test_sums(self, i: int, batches: int) -> dict[str, float]:
        """Sum of each scalar output of test net i over `batches` batches (as the eager test loop)."""
        prog, net = self.tests[i], self.test_nets[i]
        done = 0
        self.executor.upload(f"acc:{prog.name}", np.zeros(max(1, len(prog.outputs)), np.float64))
        while done < batches:
            count = min(prog.window, batches - done)
            self._fill_window(prog, net, 0, count)
            self.executor.upload("counters", np.array([0], np.int32), offset=prog.counter)
            self.executor.replay(prog, count)
            done += count
        net.forward_count += batches
        acc = self.executor.download(f"acc:{prog.name}")
        return {t.split("#")[0]: float(acc[j]) for j, t in enumerate(prog.outputs)}

    def sync(self) -> None:
        self.executor.sync()


def _runs(rows: np.ndarray):
    """Contiguous [start, end) runs of a sequence of row numbers that wraps once at most."""
    start = prev = int(rows[0])
    for r in rows[1:]:
        r = int(r)
        if r != prev + 1:
            yield start, prev + 1
            start = r
        prev = r
    yield start, prev + 1


class NumpyExecutor:
    """Programs run launch by launch by the NumPy twins of the kernels."""

    def __init__(self, programs, buffers, arena_bytes):
        self.buffers = buffers
        self.mem = emulate.Memory(arena_bytes, buffers)

    def upload(self, name, host, offset=0):
        self.buffers[name][offset:offset + len(host)] = host

    def download(self, name):
        return self.buffers[name].copy()

    def replay(self, prog, count):
        for _ in range(count):
            emulate.run(prog, self.mem)

    def sync(self):
        pass


def _refuse_allocation(size):
    raise RuntimeError(f"netdsl: a device allocation ({size} bytes) was attempted during CUDA graph capture")


class CudaExecutor:
    """Kernels compiled once by NVRTC; each program captured once into a CUDA graph on its own
    stream (with an allocator that refuses), then replayed."""

    def __init__(self, cp, source, programs, buffers, arena_bytes, unroll=1):
        self.cp, self.buffers, self.unroll = cp, buffers, max(1, unroll)
        self.arena = cp.zeros(max(arena_bytes, 256), np.uint8)
        self.module = cp.RawModule(code=source, options=("-std=c++17",))
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.bound: dict[str, list] = {}
        self.graphs: dict[tuple, object] = {}
        self.regs: dict[str, int] = {}
        for prog in programs:
            calls = []
            for launch in prog.launches:
                fn = self.module.get_function(symbol(launch))
                self.regs[symbol(launch)] = fn.num_regs      # loads the module before any capture
                args = tuple(self._arg(prog, a) for a in launch.args)
                calls.append((fn, launch.grid, launch.block, args))
            self.bound[prog.name] = calls

    def _arg(self, prog: Program, a):
        if a is None:
            return np.uint64(0)                # a null pointer
        if not isinstance(a, Ref):
            return a                           # numpy scalars carry their C type
        if a.space == "arena":
            t = prog.tensors[a.name]
            view = self.arena[t.offset:t.offset + t.nbytes]
            return view.view(np.int32 if t.dtype == "i32" else np.float32)
        buf = self.buffers[a.space]
        return buf[a.offset:a.offset + a.count] if a.count else buf[a.offset:]

    def launch(self, prog: Program, count: int = 1) -> None:
        """Run the program's kernels directly (no graph): the debugging path for the kernels."""
        with self.stream:
            for _ in range(count):
                for fn, grid, block, args in self.bound[prog.name]:
                    fn(grid, block, args)

    def capture(self, prog: Program, repeat: int):
        cp = self.cp
        get = getattr(cp.cuda, "get_allocator", None)
        previous = get() if get else cp.get_default_memory_pool().malloc
        with self.stream:
            cp.cuda.set_allocator(_refuse_allocation)
            try:
                self.stream.begin_capture()
                try:
                    for _ in range(repeat):
                        for fn, grid, block, args in self.bound[prog.name]:
                            fn(grid, block, args)
                finally:
                    graph = self.stream.end_capture()
            finally:
                cp.cuda.set_allocator(previous)
        return graph

    def graph(self, prog: Program, repeat: int = 1):
        key = (prog.name, repeat)
        if key not in self.graphs:
            self.cp.cuda.Device().synchronize()
            self.graphs[key] = self.capture(prog, repeat)
        return self.graphs[key]

    def replay(self, prog: Program, count: int) -> None:
        self.cp.cuda.Device().synchronize()    # eager work on other streams (loads, restores) is done
        big = self.unroll if prog.name == "train" else 1
        if count >= big > 1:
            g = self.graph(prog, big)
            for _ in range(count // big):
                g.launch(self.stream)
            count %= big
        if count:
            g = self.graph(prog, 1)
            for _ in range(count):
                g.launch(self.stream)

    def upload(self, name, host, offset=0):
        with self.stream:
            self.buffers[name][offset:offset + len(host)].set(np.ascontiguousarray(host), stream=self.stream)

    def download(self, name):
        self.stream.synchronize()
        return self.buffers[name].get(stream=self.stream)

    def sync(self):
        self.stream.synchronize()
