"""Lower: checked Graph -> Plan. Ordered steps, param slots (sharing resolved), need-backward
pruning (Caffe's rules), and memory plans of the forward and training schedules (memory.py), with
their peaks next to the naive total."""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import memory
from .errors import NetdslError
from .graph import Node
from .memory import Block
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
class Plan:
    name: str
    phase: str
    steps: list[Step]
    params: list[ParamSlot]
    blob_shapes: dict[str, tuple]
    outputs: list[str]
    inputs: list[str]              # tops of Input layers, fed by the caller
    arena: list[Block]             # the forward schedule's blobs, placed (positions = steps)
    arena_bytes: int
    peak_bytes: int                # most bytes live at one step (forward)
    train_arena: list[Block]       # forward then backward: blobs kept for backward, and gradients ("d:blob")
    train_arena_bytes: int
    train_peak_bytes: int
    naive_bytes: int               # every blob its own buffer

    def run_bytes(self, training: bool, itemsize: int = 4) -> int:
        """About what a Net running this plan holds at its peak: every blob (the executor keeps
        each its own buffer), in training the blobs kept for backward and the gradients, and every
        param (in training with its gradient and up to two solver history blobs). The memory
        budget check compares it with what the machine has before anything is allocated."""
        blobs = sum(b.nbytes for b in self.train_arena) if training else self.naive_bytes
        params = sum(_nbytes(p.shape) for p in self.params) * (4 if training else 1)
        return (blobs + params) // 4 * itemsize

    def find(self, role: str) -> Step | None:
        """The first step whose layer plays `role` (a Layer flag such as makes_proposals), for the
        commands that need one particular layer."""
        return next((s for s in self.steps if getattr(s.layer, role)), None)

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
        out.append("arena (forward schedule, float32): offset, size, blob, the steps it is live")
        for b in sorted(self.arena, key=lambda b: (b.offset, b.first)):
            out.append(f"  {b.offset:>10d} {_kib(b.nbytes):>10}  {b.name} {fmt(self.blob_shapes[b.name])}  "
                       f"[{b.first}-{b.last}]")
        out.append(f"memory: naive {_kib(self.naive_bytes)} (every blob its own buffer); forward arena "
                   f"{_kib(self.arena_bytes)} (peak live {_kib(self.peak_bytes)}); training arena "
                   f"{_kib(self.train_arena_bytes)} (peak live {_kib(self.train_peak_bytes)}: activations kept for "
                   "backward, plus gradients)")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"name": self.name, "phase": self.phase.lower(),
                "steps": [{"layer": s.node.name, "type": s.layer.type, "bottoms": s.node.bottoms, "tops": s.node.tops,
                           "params": [self.params[j].key for j in s.params], "need_backward": s.need_backward,
                           "propagate_down": s.propagate, "loss_weights": s.loss_weights} for s in self.steps],
                "params": [{"key": p.key, "shape": list(p.shape), "lr_mult": p.lr_mult, "decay_mult": p.decay_mult,
                            "frozen": p.frozen} for p in self.params],
                "blobs": {b: list(s) for b, s in self.blob_shapes.items()},
                "arena": [{"blob": b.name, "offset": b.offset, "bytes": b.nbytes, "first": b.first, "last": b.last}
                          for b in self.arena],
                "arena_bytes": self.arena_bytes, "peak_bytes": self.peak_bytes,
                "train_arena_bytes": self.train_arena_bytes, "train_peak_bytes": self.train_peak_bytes,
                "naive_bytes": self.naive_bytes}


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
        if need:
            needs_grad.update(node.tops)
        steps.append(Step(node, idx, need, prop, list(node.loss_weights)))
    _prune_to_loss(g, steps)
    if g.force_backward:
        _force_backward(steps)
    inputs = [t for s in steps if s.layer.fed_by_caller for t in s.node.tops]
    shapes = dict(shaped.blobs)
    arena, train = forward_blocks(steps, shapes, g.outputs), training_blocks(steps, shapes, g.outputs)
    return Plan(g.name, g.phase, steps, params, shapes, g.outputs, inputs, arena, memory.place(arena),
                memory.peak(arena), train, memory.place(train), memory.peak(train),
                sum(_nbytes(s) for s in shapes.values()))


def _force_backward(steps: list[Step]) -> None:
    """Caffe's force_backward: every layer runs backward and every bottom it allows gets a gradient,
    the net's inputs included (pycaffe's net.blobs['data'].diff). Layers with no backward at all
    (data, Accuracy) are left out, where Caffe would stop with "not implemented"."""
    for s in steps:
        if s.layer.no_backward:
            continue
        s.need_backward = True
        s.propagate = [p or s.layer.allow_force_backward(i) for i, p in enumerate(s.propagate)]


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


def forward_blocks(steps: list[Step], shapes: dict, outputs) -> list[Block]:
    """A blob is live from the step that produces it to the last step that reads it; the net's
    outputs to the end."""
    born, last = {}, {}
    for i, s in enumerate(steps):
        for b in s.node.bottoms:
            last[b] = i
        for t in s.node.tops:
            born[t] = last[t] = i
    for t in outputs:
        last[t] = len(steps) - 1
    return [Block(t, _nbytes(shapes[t]), born[t], last[t]) for t in born if t in shapes]


def training_blocks(steps: list[Step], shapes: dict, outputs) -> list[Block]:
    """Forward (positions 0..n-1) then backward (step i's backward at 2n-1-i). A blob a step's
    backward may read (its bottoms and tops) lives until that backward; the gradient of a blob
    ("d:blob") lives from the first backward that writes it (a loss top's: the start of the
    backward) until its producer's backward has read it."""
    n = len(steps)
    blocks = {b.name: b for b in forward_blocks(steps, shapes, outputs)}
    grad_first: dict[str, int] = {}
    producer = {t: i for i, s in enumerate(steps) for t in s.node.tops}
    for i, s in enumerate(steps):
        if not s.need_backward:
            continue
        for b in s.node.bottoms + s.node.tops:
            if b in blocks:
                blocks[b].last = max(blocks[b].last, 2 * n - 1 - i)
        for b, p in zip(s.node.bottoms, s.propagate):
            if p:
                grad_first[b] = min(grad_first.get(b, 2 * n), 2 * n - 1 - i)
        for t, w in zip(s.node.tops, s.loss_weights):
            if w:
                grad_first[t] = n
    grads = []
    for b, first in grad_first.items():
        j = producer.get(b)
        end = 2 * n - 1 - j if j is not None and steps[j].need_backward else first
        if b in shapes:
            grads.append(Block(f"d:{b}", _nbytes(shapes[b]), first, max(first, end)))
    return list(blocks.values()) + grads
