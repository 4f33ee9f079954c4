"""Run: a Plan on a backend. Forward, backward with gradient accumulation for fan-out and shared
params, need-backward pruning, propagate_down, loss_weight; params as data/grad pairs. The Net owns
all run state (param blobs, stateful layers' RNG streams and data sources, saved tensors), so any
number of Nets can run one plan. `build_net` is the one way from a net file to a Net."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .backend import release_free_heap, to_host, tune_host_allocator
from .errors import NetdslError
from .files import write_atomic
from .fillers import fill
from .plan import Plan
from .registry import RunState, fmt


@dataclass
class Blob:
    data: object
    grad: object = None


class ParamBlob:
    """A learnable blob: data and gradient, plus its solver multipliers (shared between layers
    and between the TRAIN and TEST nets by key)."""

    def __init__(self, key: str, data, lr_mult: float, decay_mult: float, frozen: bool):
        self.name = key
        self.data = data
        self.grad = data * 0
        self.lr_mult = 0.0 if frozen else lr_mult
        self.decay_mult = decay_mult
        self.frozen = frozen


@dataclass
class Copied:
    """What Net.load copied: the layers, and the file's layers the net does not have."""
    layers: list[str]
    not_in_net: list[str]
    path: str = ""

    def __str__(self) -> str:
        n = len(self.layers)
        skipped = f"; not in the net: {', '.join(self.not_in_net)}" if self.not_in_net else ""
        return f"copied {n} layer{'s' if n != 1 else ''} from {self.path}{skipped}"


@dataclass
class RunContext:
    """What data layers need to bind to their source."""
    data_dir: str | None = None
    seed: int = 0


class Net:
    """A runnable net: `forward(**inputs)`, `backward()`, `blobs`, `params`, `save`, `load`."""

    def __init__(self, plan: Plan, xp=np, dtype=np.float32, seed: int = 0, data_dir: str | None = None,
                 share_from: Net | None = None):
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            self.dtype = None
        if self.dtype is None or self.dtype.name not in ("float32", "float64"):
            raise NetdslError("E0622", f"dtype {dtype!r}: a net runs in float32 or float64",
                              help='use dtype="float32" (the default) or "float64"')
        self.plan, self.xp, self.seed = plan, xp, seed
        self._backward_ready = False
        if xp is np:
            tune_host_allocator()
        shared = share_from.slots if share_from is not None else {}
        self.slots: dict[str, ParamBlob] = {}
        for i, slot in enumerate(plan.params):
            if slot.key in shared:
                self.slots[slot.key] = shared[slot.key]
                continue
            data = fill(slot.filler, slot.shape, np.random.default_rng([seed, i]), self.dtype)
            self.slots[slot.key] = ParamBlob(slot.key, xp.asarray(data), slot.lr_mult, slot.decay_mult, slot.frozen)
        self.step_params = [[self.slots[plan.params[j].key] for j in s.params] for s in plan.steps]
        self.values: dict = {}
        self.grads: dict = {}
        self._saved: list = [None] * len(plan.steps)
        self.forward_count = 0
        self.rank = 0                  # data-parallel rank (set_shard): ranks > 0 draw their own random streams
        ctx = RunContext(data_dir, seed)
        self.states = [RunState([plan.blob_shapes[t] for t in s.node.tops], s.layer.open(ctx))
                       if s.layer.stateful else None for s in plan.steps]
        if xp is np and any(self.states):
            release_free_heap()
        # what runs each step's forward/backward: the layer (NumPy), or a compiled op (cpu/program.py)
        self.runners = [s.layer for s in plan.steps]

    def source(self, layer_name: str):
        """The data source (and cursor) of a stateful layer, by layer name."""
        for s, state in zip(self.plan.steps, self.states):
            if s.node.name == layer_name and state is not None:
                return state.source
        raise KeyError(layer_name)

    def data_state(self) -> dict[str, dict]:
        """Each data source's cursor by layer name, for snapshots (a resumed run reads the same batches)."""
        return {s.node.name: state.source.state() for s, state in zip(self.plan.steps, self.states)
                if state is not None and hasattr(state.source, "state")}

    def set_shard(self, rank: int, ranks: int) -> None:
        """Make this net rank `rank` of `ranks` data-parallel replicas: each data layer's source
        reads its share of the shared order (see distributed.py); random layers (DummyData,
        crops, mirrors, Dropout) draw a stream of their own on every rank."""
        self.rank = rank
        for s, state in zip(self.plan.steps, self.states):
            source = state.source if state is not None else None
            if s.layer.is_data and source is not None and not hasattr(source, "shard"):
                raise NetdslError("E0753", f"{s.layer.type} '{s.node.name}' cannot be split between ranks",
                                  help="train it in one process, or feed it from a layer with a shard rule (MNIST, "
                                       "DigitScenes, DummyData)")
            if source is not None and hasattr(source, "shard"):
                source.shard = (rank, ranks)

    def load_data_state(self, states: dict[str, dict]) -> None:
        for s, state in zip(self.plan.steps, self.states):
            if s.node.name in states and state is not None:
                state.source.load_state(states[s.node.name])

    # -- pycaffe-style views ---------------------------------------------------------------
    @property
    def params(self) -> dict[str, list[ParamBlob]]:
        return {s.node.name: ps for s, ps in zip(self.plan.steps, self.step_params) if ps}

    @property
    def blobs(self) -> dict[str, Blob]:
        """Every blob by the name the user wrote (its latest version), with .data and .grad
        (the gradient from the last backward, or None)."""
        out = {}
        for s in self.plan.steps:
            for u, t in zip(s.layer.spec.tops, s.node.tops):
                if t in self.values:
                    out[u] = Blob(self.values[t], self.grads.get(t))
        return out

    @property
    def learnable(self) -> list[ParamBlob]:
        return [p for p in self.slots.values() if not p.frozen]

    # -- running ---------------------------------------------------------------------------
    def forward(self, _hooks=None, **inputs) -> dict:
        """Run every step; returns the net's outputs (tops nobody reads) by user name."""
        xp, plan = self.xp, self.plan
        missing = [i for i in plan.inputs if plan.steps and i.split("#")[0] not in inputs]
        if missing:
            raise NetdslError("E0620", f"forward() needs the net's inputs: missing {', '.join(missing)}",
                              help="pass each Input top as a keyword argument: net.forward(data=array)")
        names = {i.split("#")[0] for i in plan.inputs}
        unknown = sorted(set(inputs) - names)
        if unknown:
            raise NetdslError("E0620", f"forward() got {', '.join(repr(u) for u in unknown)}, which the net does not "
                              f"take", help=f"the net's inputs: {', '.join(sorted(names)) or 'none'}")
        for name in names:
            inputs[name] = self._input(name, inputs[name])
        values = {}
        rng_base = self.forward_count
        for i, step in enumerate(plan.steps):
            layer = step.layer
            if layer.fed_by_caller:
                for u, t in zip(layer.spec.tops, step.node.tops):
                    values[t] = inputs[u]                  # checked and converted by _input
                continue
            bottoms = [values[b] for b in step.node.bottoms]
            params = [p.data for p in self.step_params[i]]
            state = self.states[i]
            if _hooks:
                _hooks.before(i)
            if state is None:
                tops, saved = self.runners[i].forward(xp, bottoms, params)
            else:
                state.rng = np.random.default_rng([self.seed, i, rng_base] + ([self.rank] if self.rank else []))
                tops, saved = layer.forward(xp, bottoms, params, state)
            if _hooks:
                _hooks.after(i, False)
            for t, v in zip(step.node.tops, tops):
                values[t] = v
            self._saved[i] = saved if step.need_backward else None
        self.forward_count += 1
        self.values = values
        self._backward_ready = True
        return {t.split("#")[0]: values[t] for t in plan.outputs if t in values}

    def loss(self) -> float:
        total = 0.0
        for step in self.plan.steps:
            for w, t in zip(step.loss_weights, step.node.tops):
                if w:
                    total += w * float(self.values[t].sum())
        return total

    def _input(self, name: str, value):
        """An input array: numbers of exactly the shape the plan was checked with, in the net's dtype."""
        want = tuple(self.plan.blob_shapes[name])
        try:
            a = self.xp.asarray(value, dtype=self.dtype)
        except (TypeError, ValueError):
            raise NetdslError("E0620", f"forward() input '{name}' is {type(value).__name__} {value!r:.60}: not an "
                              "array of numbers", help=f"pass an array of shape {want}") from None
        if a.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, a.shape)):
            raise NetdslError("E0620", f"forward() input '{name}' has shape {tuple(a.shape)}, but the net was checked "
                              f"with {want}", help=f"pass shape {want}, or load the net with shapes={{{name!r}: ...}}")
        return a

    def backward(self, _hooks=None) -> None:
        """Accumulate param gradients (into p.grad) from the loss tops of the last forward."""
        if not self._backward_ready:
            raise NetdslError("E0623", "backward() needs a forward() first (one backward per forward)",
                              help="call net.forward(...) before each net.backward()")
        self._backward_ready = False
        xp, plan, values = self.xp, self.plan, self.values
        grads: dict = {}
        for step in plan.steps:
            for w, t in zip(step.loss_weights, step.node.tops):
                if w:
                    grads[t] = xp.full(values[t].shape, w, dtype=self.dtype)
        for i in range(len(plan.steps) - 1, -1, -1):
            step = plan.steps[i]
            if not step.need_backward:
                continue
            tops = step.node.tops
            if not any(t in grads for t in tops):
                continue
            dtops = [grads[t] if t in grads else xp.zeros(values[t].shape, self.dtype) for t in tops]
            params = self.step_params[i]
            if _hooks:
                _hooks.before(i)
            dbottoms, dparams = self.runners[i].backward(xp, self._saved[i], dtops, [p.data for p in params],
                                                         step.propagate)
            if _hooks:
                _hooks.after(i, True)
            for p, g in zip(params, dparams):
                if g is not None and not p.frozen:
                    p.grad += g
            for b, prop, g in zip(step.node.bottoms, step.propagate, dbottoms):
                if prop and g is not None:
                    grads[b] = grads[b] + g if b in grads else g
            self._saved[i] = None
        self.grads = grads

    def zero_grad(self) -> None:
        for p in self.slots.values():
            p.grad[...] = 0

    # -- weights ---------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Weights as `<layer>/<i>` host arrays, the format of `--weights` and snapshots."""
        out = {}
        for name, ps in self.params.items():
            for i, p in enumerate(ps):
                out[f"{name}/{i}"] = to_host(p.data)
        return out

    def save(self, path: str) -> None:
        """The weights as `.caffemodel` (Caffe's binary NetParameter, by the suffix) or netdsl's .npz,
        written atomically; a path that cannot be written is E0771 (an existing file stays intact)."""
        path = os.fspath(path)
        try:
            if path.endswith(".caffemodel"):
                from .weights import write_caffemodel
                types = {s.node.name: s.layer.type for s in self.plan.steps}
                write_caffemodel(path, {name: (types[name], [to_host(p.data) for p in ps])
                                        for name, ps in self.params.items()}, self.plan.name)
            else:
                save_npz(path, self.state())
        except OSError as e:
            raise NetdslError("E0771", f"cannot write weights to {path}: {e.strerror or e}",
                              help="check that the directory exists, is writable and has space") from None

    def load(self, weights) -> Copied:
        """Copy weights by layer name as Caffe's CopyTrainedLayersFrom: a path (.caffemodel, V1 or V2,
        or .npz), a weights.Weights, or `<layer>/<i>` arrays. Layers of the file the net lacks are
        skipped and listed; a blob count or shape mismatch is an error naming the layer, the blob
        and both shapes."""
        from .weights import Weights, from_arrays, read_weights
        if isinstance(weights, (str, os.PathLike)):
            weights = read_weights(str(weights), {name: [p.data.shape for p in ps] for name, ps in self.params.items()})
        elif not isinstance(weights, Weights):
            weights = from_arrays(weights)
        mine = self.params
        for name, blobs in weights.layers.items():
            ps = mine.get(name)
            if ps is None:
                continue
            if weights.whole_layers and len(blobs) != len(ps) or len(blobs) > len(ps):
                raise NetdslError("E0305", f"cannot copy layer '{name}' from {weights.path}: it has {len(blobs)} "
                                  f"blob{'s' if len(blobs) != 1 else ''} there but {len(ps)} in the net",
                                  help="check bias_term and the layer type, or rename the layer to learn it from "
                                       "scratch")
            for i, p in enumerate(ps):
                if i >= len(blobs) or blobs[i] is None:
                    continue
                a = weights.fit(name, i, tuple(p.data.shape))
                if a is None:
                    raise NetdslError("E0305", f"cannot copy blob {i} of layer '{name}' from {weights.path}: it is "
                                      f"{'x'.join(map(str, blobs[i].shape))} there but the net needs "
                                      f"{'x'.join(map(str, p.data.shape))}",
                                      help="to learn this layer from scratch rather than load it, rename the layer; "
                                           "`netdsl check --weights` lists every mismatch")
                p.data[...] = self.xp.asarray(a, dtype=self.dtype)
        return Copied([n for n in weights.layers if n in mine], [n for n in weights.layers if n not in mine],
                      weights.path)


def save_npz(path: str, arrays: dict) -> None:
    """Weights and solver state as .npz, written atomically (see files.write_atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def build_net(source, phase: str = "TRAIN", device="cpu", *, weights=None, seed: int = 0,
              data_dir: str | None = None, stages=(), level: int = 0, hints: dict | None = None,
              share_from: Net | None = None, dtype=np.float32, memory_limit="default") -> Net:
    """Check, lower and instantiate one phase of a net: what every command and `netdsl.load` do.
    `source` is a path, or (path, an inline NetParameter AST or None) as a solver file gives it;
    `device` "cpu", "gpu" or a Backend; `weights` a path or {"<layer>/<i>": array};
    `memory_limit` bytes, "8G", "auto" or "off" (default: the CLI's --memory-limit, else "auto")."""
    from .backend import get_backend
    from .check import check
    from .plan import lower
    from .syntax import parse_file
    path, inline = source if isinstance(source, tuple) else (source, None)
    ast = inline if inline is not None else parse_file(path)
    plan = lower(check(ast, phase=phase.upper(), stages=stages, level=level, hints=hints), runnable=True)
    check_memory(plan, phase.upper() == "TRAIN", 8 if dtype in ("float64", np.float64) else 4, memory_limit)
    backend = get_backend(device) if isinstance(device, str) else device
    net = Net(plan, backend.xp, dtype=dtype, seed=seed, data_dir=data_dir, share_from=share_from)
    if weights is not None:
        net.load(weights)
    return net


def check_memory(plan, training: bool, itemsize: int, limit="default") -> None:
    """Refuse a net whose blobs and params cannot fit in memory before allocating any of them
    (E0775): a 16 GB Input or a `num_output: 1000000000` fails here, not in the kernel's OOM killer."""
    from .memory import require
    shapes = plan.blob_shapes
    biggest = max(shapes, key=lambda b: math.prod(d or 0 for d in shapes[b]), default=None)
    require(plan.run_bytes(training, itemsize), f"net '{plan.name or 'net'}' ({plan.phase}), its blobs and params,",
            [f"the largest blob is '{biggest}' {fmt(shapes[biggest])}"] if biggest else [], limit)
