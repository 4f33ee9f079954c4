"""Lower a Net's plan to compiled CPU ops (ops.py), as gpu/lower.py does for CUDA: each step whose
layer names a `cpu_op` gets one, the others keep their NumPy forward/backward (mixed plans).

Buffers are allocated here, once: a compiled step's tops and bottom gradients are views into one
arena laid out by the training schedule's liveness plan (plan.train_arena, memory.py), so nothing
is allocated in the step. A blob stays out of the shared arena (in a buffer of its own, still
preallocated) where the plan's liveness would not cover how it is used: a net output (read after
the step), a blob a NumPy layer reads (it may keep a view of it past its lifetime), a gradient
with more than one writer or one a NumPy layer reads.
"""
from __future__ import annotations

import numpy as np

from ..plan import Plan
from .ops import OPS


class Lowering:
    """What the ops ask while they are built: shapes, and their buffers."""

    def __init__(self, plan: Plan, dtype):
        self.plan, self.dtype = plan, np.dtype(dtype)
        self.blocks = {b.name: b for b in plan.train_arena}
        # the arena in elements: the plan sizes blobs at 4 bytes, so float64 doubles every offset
        self.arena = np.zeros(plan.train_arena_bytes // 4, self.dtype)
        self.private_bytes = 0
        steps = plan.steps
        self.ops_for = [_op_class(s, plan) for s in steps]
        self.producer = {t: i for i, s in enumerate(steps) for t in s.node.tops}
        self.readers: dict[str, list[int]] = {}
        self.grad_writers: dict[str, int] = {}
        for i, s in enumerate(steps):
            for b in s.node.bottoms:
                self.readers.setdefault(b, []).append(i)
            for b, p in zip(s.node.bottoms, s.propagate):
                if p and s.need_backward:
                    self.grad_writers[b] = self.grad_writers.get(b, 0) + 1
        self.fusions = self._fusions()

    def _fusions(self) -> dict[int, int]:
        """GEMM step -> the ReLU step it absorbs: the ReLU is the only reader of the GEMM's top,
        and both run compiled."""
        out = {}
        for i, s in enumerate(self.plan.steps):
            if not getattr(s.layer, "gemm_epilogue", False) or self.ops_for[i] is None or len(s.node.tops) != 1:
                continue
            readers = self.readers.get(s.node.tops[0], [])
            if len(readers) == 1 and self.ops_for[readers[0]] is OPS["relu"] and s.node.tops[0] not in self.plan.outputs:
                out[i] = readers[0]
        return out

    def shape(self, blob: str) -> tuple:
        return tuple(self.plan.blob_shapes[blob])

    def param_shape(self, i: int, k: int) -> tuple:
        return tuple(self.plan.params[self.plan.steps[i].params[k]].shape)

    def scratch(self, shape) -> np.ndarray:
        a = np.zeros(shape, self.dtype)
        self.private_bytes += a.nbytes
        return a

    def _view(self, block: str, shape) -> np.ndarray:
        b = self.blocks[block]
        start = b.offset // 4
        return self.arena[start:start + int(np.prod(shape))].reshape(shape)

    def value(self, blob: str, shape) -> np.ndarray:
        """The buffer a compiled step writes its top `blob` into."""
        shared = blob in self.blocks and blob not in self.plan.outputs and \
            all(self.ops_for[j] is not None for j in self.readers.get(blob, []))
        return self._view(blob, shape) if shared else self.scratch(shape)

    def grad(self, blob: str, shape) -> np.ndarray:
        """The buffer a compiled step writes the gradient of its bottom `blob` into."""
        j = self.producer.get(blob)
        shared = f"d:{blob}" in self.blocks and self.grad_writers.get(blob) == 1 and j is not None and \
            self.ops_for[j] is not None
        return self._view(f"d:{blob}", shape) if shared else self.scratch(shape)

    def fused_relu(self, i: int):
        """(relu?, negative_slope, the blob the GEMM step's epilogue writes) for step i."""
        j = self.fusions.get(i)
        if j is None:
            return False, 0.0, self.plan.steps[i].node.tops[0]
        relu = self.plan.steps[j]
        return True, float(relu.layer.p.negative_slope), relu.node.tops[0]

    def is_fused(self, i: int) -> bool:
        return i in self.fusions.values()


def _op_class(step, plan):
    cls = OPS.get(getattr(step.layer, "cpu_op", None))
    if cls is None or step.layer.stateful or cls.reason(step.layer) is not None or _dynamic(step, plan):
        return None
    return cls


def lower_cpu(net) -> Lowering:
    """Give `net` compiled runners for every step that has one; returns the lowering (for its
    buffers and what ran compiled)."""
    lw = Lowering(net.plan, net.dtype)
    for i, s in enumerate(net.plan.steps):
        cls = lw.ops_for[i]
        if cls is not None:
            net.runners[i] = cls(lw, i, s)
    return lw


def coverage(plan: Plan) -> tuple[list[str], dict[str, str]]:
    """(the layer types that run compiled, {type: why it runs NumPy}) for one plan."""
    compiled, numpy = [], {}
    for s in plan.steps:
        t, cls = s.layer.type, _op_class(s, plan)
        if cls is not None:
            compiled.append(t)
        else:
            why = "a blob's size is known only at run time" if _dynamic(s, plan) else cls_reason(s)
            numpy.setdefault(t, why)
    return sorted(set(compiled)), numpy


def _dynamic(step, plan) -> bool:
    """Whether a blob of the step has a size known only at run time (the R rois a Proposal keeps):
    the compiled kernels are sized when the net is lowered, so such a step runs NumPy."""
    return any(d is None for b in (*step.node.bottoms, *step.node.tops) for d in plan.blob_shapes.get(b, ()))


def cls_reason(step) -> str:
    cls = OPS.get(getattr(step.layer, "cpu_op", None))
    if cls is None:
        return "no compiled kernel"
    if step.layer.stateful:
        return "stateful (RNG or data source)"
    return cls.reason(step.layer) or ""


class _Recorded:
    """A source step's tops from the step being replayed (a data layer would read the next batch)."""

    def __init__(self, tops):
        self.tops = tops

    def forward(self, xp, bottoms, params):
        return self.tops, None


def replay_with_numpy(net) -> None:
    """Run the last step again with every layer's NumPy forward and backward, on the same batch
    (the source layers' tops, which never share the arena), the same random draws (forward_count
    rewound) and the same weights: afterwards net.values and the params' gradients are the NumPy
    layers', each blob in its own array. The compiled ops reuse buffers within a step, so only
    such a replay shows which layer first produced a NaN or Inf (the trainer's E0710)."""
    steps = net.plan.steps
    runners, states = net.runners, net.states
    sources = {i for i, s in enumerate(steps) if s.layer.stateful and not s.node.bottoms}
    net.runners = [_Recorded([net.values[t] for t in s.node.tops]) if i in sources else s.layer
                   for i, s in enumerate(steps)]
    net.states = [None if i in sources else st for i, st in enumerate(states)]
    net.forward_count -= 1
    try:
        net.zero_grad()
        net.forward()
        net.backward()
    finally:
        net.runners, net.states = runners, states
