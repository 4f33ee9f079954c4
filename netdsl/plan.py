"""Lower: checked Graph -> Plan. Ordered steps, param slots (sharing resolved), need-backward
pruning (Caffe's rules), and a liveness-based memory plan with its peak next to the naive total."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import NetdslError
from .graph import Node
from .registry import fmt
from .shapes import ShapedGraph


@dataclass
class ParamSlot:
    """One learnable blob; layers sharing a param by name point at the same slot."""
    key: str                       # '<layer>/<i>' of its owner, or the shared name
    shape: tuple
    lr_mult: float
    decay_mult: float
    filler: object
    owner: str                     # first layer that declared it
    frozen: bool = False           # statistics (BatchNorm) or lr_mult 0: never updated


@dataclass
class Step:
    node: Node
    params: list[int]              # indices into Plan.params
    need_backward: bool            # run backward at all
    propagate: list[bool]          # per bottom: compute its gradient
    loss_weights: list[float]

    @property
    def layer(self):
        return self.node.layer


@dataclass
class Buffer:
    id: int
    nbytes: int
    blobs: list[str] = field(default_factory=list)


@dataclass
class Plan:
    name: str
    phase: str
    steps: list[Step]
    params: list[ParamSlot]
    blob_shapes: dict[str, tuple]
    outputs: list[str]
    inputs: list[str]              # tops of Input layers, fed by the caller
    buffers: list[Buffer]
    assignment: dict[str, int]     # blob -> buffer id (forward pass)
    naive_bytes: int
    peak_bytes: int
    train_peak_bytes: int

    def find(self, layer_type: str) -> Step | None:
        """The first step of a layer type (for commands that need one data layer, by type)."""
        return next((s for s in self.steps if s.layer.type == layer_type), None)

    def render(self) -> str:
        out = [f"plan '{self.name}' ({self.phase}): {len(self.steps)} steps, {len(self.params)} param blobs"]
        out.append("steps:")
        for i, s in enumerate(self.steps):
            n = s.node
            flags = []
            if s.need_backward:
                flags.append("backward" + ("" if all(s.propagate) or not s.propagate else
                                           f" (to {', '.join(b for b, p in zip(n.bottoms, s.propagate) if p) or 'params only'})"))
            if any(s.loss_weights):
                flags.append("loss x " + ",".join(f"{w:g}" for w in s.loss_weights))
            ps = ", ".join(f"{self.params[j].key}{'*' if self.params[j].frozen else ''}" for j in s.params)
            out.append(f"  {i:3d} {n.layer.type:<16} {n.name:<18} {', '.join(n.bottoms) or '-'} -> "
                       f"{', '.join(n.tops) or '-'}" + (f"  params[{ps}]" if ps else "") +
                       (f"  [{'; '.join(flags)}]" if flags else ""))
        out.append("buffers (forward liveness, float32):")
        for b in self.buffers:
            out.append(f"  buf{b.id:<3d} {_kib(b.nbytes):>10}  {', '.join(f'{x} {fmt(self.blob_shapes[x])}' for x in b.blobs)}")
        out.append(f"memory: naive {_kib(self.naive_bytes)} (every blob its own buffer); planned forward "
                   f"{_kib(sum(b.nbytes for b in self.buffers))} (peak live {_kib(self.peak_bytes)}); training peak "
                   f"live (activations kept for backward, plus gradients) {_kib(self.train_peak_bytes)}")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"name": self.name, "phase": self.phase.lower(),
                "steps": [{"layer": s.node.name, "type": s.layer.type, "bottoms": s.node.bottoms, "tops": s.node.tops,
                           "params": [self.params[j].key for j in s.params], "need_backward": s.need_backward,
                           "propagate_down": s.propagate, "loss_weights": s.loss_weights} for s in self.steps],
                "params": [{"key": p.key, "shape": list(p.shape), "lr_mult": p.lr_mult, "decay_mult": p.decay_mult,
                            "frozen": p.frozen} for p in self.params],
                "blobs": {b: list(s) for b, s in self.blob_shapes.items()},
                "buffers": [{"id": b.id, "bytes": b.nbytes, "blobs": b.blobs} for b in self.buffers],
                "naive_bytes": self.naive_bytes, "peak_bytes": self.peak_bytes,
                "train_peak_bytes": self.train_peak_bytes}


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _nbytes(shape) -> int:
    return 4 * math.prod(d if d is not None else 0 for d in shape)


def lower(shaped: ShapedGraph, runnable: bool = False) -> Plan:
    """Lower a checked graph. With runnable=True, layers that can only be checked are errors."""
    g = shaped.graph
    if runnable:
        for n in g.nodes:
            if not n.layer.runnable:
                raise NetdslError("E0610", f"{n.layer.type} layer '{n.name}' can be checked but not run by netdsl",
                                  n.layer.spec.pos, help=n.layer.run_help)
    params: list[ParamSlot] = []
    by_key: dict[str, int] = {}
    steps: list[Step] = []
    needs_grad: set[str] = set()            # blobs whose gradient someone needs
    for node in g.nodes:
        layer = node.layer
        idx = []
        fillers = layer.fillers()
        for i, shape in enumerate(shaped.params(node)):
            spec = node.param_specs[i] if i < len(node.param_specs) else None
            key = spec.name if spec is not None and spec.name else f"{layer.name}/{i}"
            if key not in by_key:
                lr = spec.lr_mult if spec is not None else 1.0
                dm = spec.decay_mult if spec is not None else 1.0
                by_key[key] = len(params)
                params.append(ParamSlot(key, tuple(shape), lr, dm, fillers[i] if i < len(fillers) else None,
                                        layer.name, frozen=layer.frozen_params or lr == 0))
            idx.append(by_key[key])
        learn = any(not params[j].frozen for j in idx)
        prop = [pd and b in needs_grad and not layer.no_backward for b, pd in zip(node.bottoms, node.propagate_down)]
        need = not layer.no_backward and (learn or any(prop))
        if need or (g.force_backward and not layer.no_backward):
            needs_grad.update(node.tops)
        steps.append(Step(node, idx, need, prop, list(node.loss_weights)))
    _prune_to_loss(g, steps)
    inputs = [t for s in steps if s.layer.fed_by_caller for t in s.node.tops]
    shapes = dict(shaped.blobs)
    buffers, assignment, peak = _plan_forward(steps, shapes, g)
    train_peak = _train_peak(steps, shapes)
    naive = sum(_nbytes(s) for s in shapes.values())
    return Plan(g.name, g.phase, steps, params, shapes, g.outputs, inputs, buffers, assignment, naive, peak, train_peak)


def _prune_to_loss(g, steps: list[Step]) -> None:
    """Caffe: a layer whose outputs reach no loss needs no backward."""
    contributes: set[str] = set()
    for s in reversed(steps):
        node = s.node
        reaches = any(s.loss_weights) or any(t in contributes for t in node.tops)
        if not reaches:
            s.need_backward = False
            s.propagate = [False] * len(node.bottoms)
        elif s.need_backward:
            contributes.update(b for b, p in zip(node.bottoms, s.propagate) if p)
        if reaches:
            contributes.update(b for b in node.bottoms)


def _last_use(steps: list[Step]) -> dict[str, int]:
    last = {}
    for i, s in enumerate(steps):
        for b in s.node.bottoms + s.node.tops:
            last[b] = i
    return last


def _plan_forward(steps, shapes, g):
    """Greedy best-fit reuse: a blob's buffer is free after its last reader (forward only)."""
    last = _last_use(steps)
    outputs = set(g.outputs)
    free: list[Buffer] = []
    buffers: list[Buffer] = []
    assignment: dict[str, int] = {}
    live, peak = 0, 0
    for i, s in enumerate(steps):
        for t in s.node.tops:
            size = _nbytes(shapes.get(t, ()))
            fit = [b for b in free if b.nbytes >= size]
            if fit:
                b = min(fit, key=lambda b: b.nbytes)
                free.remove(b)
            else:
                b = Buffer(len(buffers), size)
                buffers.append(b)
            b.blobs.append(t)
            assignment[t] = b.id
            live += size
        peak = max(peak, live)
        for b in set(s.node.bottoms + s.node.tops):
            if last.get(b) == i and b not in outputs and b in assignment:
                free.append(buffers[assignment[b]])
                live -= _nbytes(shapes.get(b, ()))
    return buffers, assignment, peak


def _train_peak(steps, shapes) -> int:
    """Peak live bytes over forward then backward: activations stay until their consumers'
    backward; a gradient lives from its first producer's backward to its blob's producer."""
    n = len(steps)
    born, dies = {}, {}
    for i, s in enumerate(steps):
        for t in s.node.tops:
            born[t], dies[t] = i, i
        for b in s.node.bottoms:
            dies[b] = max(dies.get(b, 0), 2 * n - 1 - i if s.need_backward else i)
    events = [0] * (2 * n + 1)
    for b, t0 in born.items():
        size = _nbytes(shapes.get(b, ()))
        events[t0] += size
        events[max(dies[b], t0) + 1] -= size
    for i, s in enumerate(steps):          # gradients of the blobs this step propagates into
        if s.need_backward:
            for b, p in zip(s.node.bottoms, s.propagate):
                if p:
                    start = 2 * n - 1 - i
                    events[start] += _nbytes(shapes.get(b, ()))
                    events[min(start + 2, 2 * n)] -= _nbytes(shapes.get(b, ()))
    peak = live = 0
    for e in events:
        live += e
        peak = max(peak, live)
    return peak
