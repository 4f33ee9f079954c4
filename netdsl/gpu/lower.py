"""Lower a Plan to GPU Programs: the training iteration (gather, forward, backward, SGD update) and
the test step (gather, forward, accumulate the scalar outputs), as launches of library kernels.

Fusions: a ReLU whose input comes only from a Convolution or InnerProduct rides in that GEMM's
epilogue (with the bias); its backward mask rides in the epilogue of the one InnerProduct data
gradient that feeds it; SoftmaxWithLoss writes its bottom's gradient while computing the loss.
Anything outside the supported set raises Unsupported with the reason, and training runs eagerly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..registry import layer_types
from .program import THREADS, Launch, Program, Ref, Tensor, Unsupported, choose_tiling, plan_arena

LR_POLICY_IDS = {"fixed": 0, "step": 1, "exp": 2, "inv": 3, "multistep": 4, "poly": 5, "sigmoid": 6}
INT_MAX = 2**31 - 1
COUNTER_TRAIN = 0                 # counters[0]: the iteration (updates applied); [1 + i]: test i


@dataclass
class ParamLayout:
    """Where each param blob lives in the flat params / grads / history buffers (elements)."""
    offsets: dict[str, int]
    counts: dict[str, int]
    learnable: list[str]          # keys the solver updates, in the plan's param order
    lr_mult: dict[str, float]
    decay_mult: dict[str, float]
    total: int


def param_layout(plan) -> ParamLayout:
    offsets, counts, learn, lr, dm = {}, {}, [], {}, {}
    at = 0
    for slot in plan.params:
        n = math.prod(slot.shape)
        offsets[slot.key], counts[slot.key] = at, n
        at += (n + 63) // 64 * 64            # 256-byte aligned slots
        lr[slot.key], dm[slot.key] = (0.0 if slot.frozen else slot.lr_mult), slot.decay_mult
        if not slot.frozen:
            learn.append(slot.key)
    return ParamLayout(offsets, counts, learn, lr, dm, max(at, 64))


def solver_problem(cfg) -> str | None:
    """Why the compiled update cannot apply this solver config, or None."""
    from ..solver import resolved_type
    kind = resolved_type(cfg)
    if kind != "SGD":
        return f"the compiled step implements the SGD solver; this solver is {kind}"
    if cfg.iter_size != 1:
        return f"iter_size {cfg.iter_size} (the compiled step runs one forward/backward per update)"
    if cfg.debug_info:
        return "debug_info (its per-layer statistics are printed by the eager loop)"
    if cfg.clip_gradients >= 0:
        return "clip_gradients (the global norm needs a host round trip)"
    if cfg.lr_policy not in LR_POLICY_IDS:
        return f"lr_policy '{cfg.lr_policy}'"
    if cfg.lr_policy == "multistep" and len(cfg.stepvalue) > 64:
        return "more than 64 stepvalues"
    return None


def _sym(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def graph_mode_layers() -> list[str]:
    """The layer types with a graph-mode lowering."""
    return sorted(t for t, cls in layer_types().items() if cls.lower_forward is not None)


class _Lowering:
    """One Program being built. Layer types emit their launches through it (`lower_forward`,
    `lower_backward` in their class): it owns the arena tensors, gradients and param slots."""
    COUNTER_TRAIN = COUNTER_TRAIN

    def __init__(self, plan, layout: ParamLayout, name: str, train: bool, window: int, counter: int, cfg=None):
        self.plan, self.layout, self.name, self.train, self.cfg = plan, layout, name, train, cfg
        self.window, self.counter = window, counter
        self.launches: list[Launch] = []
        self.tensors: dict[str, Tensor] = {}
        self.value: dict[str, str] = {}          # blob -> arena tensor holding its value
        self.grad: dict[str, str] = {}           # blob -> arena tensor holding its gradient
        self.written: set[str] = set()           # blobs whose gradient has a first contribution
        self.sems = 0
        self.outputs: list[str] = []
        self.data: list[tuple] = []              # (layer name, split) of the gathers
        self.saved_col: dict[int, Ref] = {}      # convolution step -> its columns (for dW)
        self.relu_done: set[int] = set()         # ReLU steps whose backward rode in a GEMM
        self.pgrads: set[str] = set()            # param grads with a first (assigning) write
        self.shapes = plan.blob_shapes
        self.steps = plan.steps
        self.producer = {t: i for i, s in enumerate(self.steps) for t in s.node.tops}
        self.consumers: dict[str, list[int]] = {}
        for i, s in enumerate(self.steps):
            for b in s.node.bottoms:
                self.consumers.setdefault(b, []).append(i)

    # -- helpers ----------------------------------------------------------------------------
    def shape(self, blob) -> tuple:
        return tuple(self.shapes[blob])

    def tensor(self, name: str, count: int, dtype: str = "f32") -> Ref:
        if name not in self.tensors:
            if count > INT_MAX:
                raise Unsupported(f"tensor {name} has {count} elements (over 2^31)")
            self.tensors[name] = Tensor(name, count, dtype)
        return Ref("arena", name)

    def val(self, blob) -> Ref:
        return Ref("arena", self.value[blob])

    def new_value(self, blob) -> Ref:
        self.value[blob] = f"v:{blob}"
        return self.tensor(self.value[blob], math.prod(self.shape(blob)))

    def grad_out(self, blob) -> tuple[Ref, bool]:
        """Where to write blob's gradient, and whether to add to it (a later consumer)."""
        name = self.grad.setdefault(blob, f"d:{blob}")
        ref = self.tensor(name, math.prod(self.shape(blob)))
        acc = blob in self.written
        self.written.add(blob)
        return ref, acc

    def param(self, space: str, key: str) -> Ref:
        return Ref(space, offset=self.layout.offsets[key], count=self.layout.counts[key])

    def learnable(self, key: str) -> bool:
        return key in self.layout.lr_mult and self.layout.lr_mult[key] != 0.0

    def pgrad_acc(self, key: str) -> bool:
        """Whether a param gradient write must add (a shared param's second user) or may assign."""
        acc = key in self.pgrads
        self.pgrads.add(key)
        return acc

    def emit(self, kind: str, what: str, params: dict, args: list, grid, block=(THREADS, 1, 1), note=""):
        sym = f"{_sym(self.name)}_{len(self.launches):02d}_{_sym(what)}"
        self.launches.append(Launch(kind, sym, dict(params), list(args), tuple(grid), tuple(block), note or what))

    def gemm(self, what: str, *, A, B, C, M, N, K, R=1, batch=1, TA=0, TB=0, LDA, LDB, LDC, SA=0, SB=0, SC=0,
             RA=0, RB=0, beta=False, bias=None, bias_mode=0, act=0, aux=None, slope=0.0, note=""):
        t = choose_tiling(M, N + (bias_mode == 3 and bias is not None), R * K, batch)
        ws = None
        if t.splits > 1:
            tiles = t.grid[0] * t.grid[1]
            self.sems = max(self.sems, batch * tiles)
            ws = self.tensor(f"ws:{len(self.launches)}", batch * tiles * t.splits * t.bm * t.bn)
        params = dict(TA=int(TA), TB=int(TB), M=M, N=N, K=K, R=R, LDA=LDA, LDB=LDB, LDC=LDC, SA=SA, SB=SB, SC=SC,
                      RA=RA, RB=RB, BETA=int(beta), BIAS=bias_mode if bias is not None else 0, ACT=act,
                      BM=t.bm, BN=t.bn, BK=t.bk, SPLITS=t.splits, KCHUNK=t.kchunk, BATCH=batch)
        self.emit("gemm", what, params, [A, B, C, bias, aux, ws, Ref("sems") if ws else None, np.float32(slope)],
                  t.grid, note=note or f"{what}: {batch} x [{M} x {N} x {R * K}] GEMM, tile {t.bm}x{t.bn}, "
                                        f"{t.splits} split(s)")

    # -- analysis ---------------------------------------------------------------------------
    def check_supported(self) -> None:
        for s in self.steps:
            L = s.layer
            if L.lower_forward is None or (self.train and s.need_backward and L.lower_backward is None):
                raise Unsupported(f"{L.type} layer '{L.name}' has no graph-mode kernel (graph mode covers "
                                  f"{', '.join(graph_mode_layers())})")
            for b in s.node.bottoms + s.node.tops:
                if any(d is None for d in self.shapes[b]):
                    raise Unsupported(f"blob '{b}' has a data-dependent shape")
            L.lower_check(self, s)
        if sum(s.layer.graph_data for s in self.steps) != 1:
            raise Unsupported("graph mode needs exactly one data layer it can stage on the device (MNIST)")

    def fusions(self):
        """Activations riding in their producer's GEMM epilogue (a ReLU after a Convolution or
        InnerProduct), and data-gradient GEMMs that apply such an activation's backward mask."""
        fused, act_of, mask_into = set(), {}, {}
        for i, s in enumerate(self.steps):
            if s.layer.epilogue_slope() is None:
                continue
            x = s.node.bottoms[0]
            j = self.producer.get(x)
            if j is None or not self.steps[j].layer.gemm_epilogue:
                continue
            if self.consumers.get(x) != [i] or len(self.steps[j].node.tops) != 1:
                continue
            fused.add(i)
            act_of[j] = i
            if not self.train or not (s.need_backward and s.propagate and s.propagate[0]):
                continue
            y = s.node.tops[0]
            feeds = [k for k in self.consumers.get(y, []) if self._propagates(k, y)]
            if len(feeds) == 1 and self.steps[feeds[0]].layer.gemm_dx_mask:
                mask_into[feeds[0]] = i
        return fused, act_of, mask_into

    def _propagates(self, k: int, blob: str) -> bool:
        s = self.steps[k]
        return s.need_backward and any(p and b == blob for b, p in zip(s.node.bottoms, s.propagate))

    # -- the program ------------------------------------------------------------------------
    def build(self) -> Program:
        self.check_supported()
        self.fused, self.act_of, self.mask_into = self.fusions()
        self.scalar_outputs = [t for t in self.plan.outputs if math.prod(self.shape(t)) == 1]
        self.losses_seen = 0
        for i, s in enumerate(self.steps):
            s.layer.lower_forward(self, i, s)
        if self.train:
            for i in range(len(self.steps) - 1, -1, -1):
                s = self.steps[i]
                if s.need_backward:
                    s.layer.lower_backward(self, i, s)
            self.update()
            for key in self.layout.learnable:      # no gradient this iteration: zero, for the next
                if key not in self.pgrads:
                    n = self.layout.counts[key]
                    self.emit("zero", f"zero_{key}", {"CNT": n}, [self.param("grads", key)], self.blocks(n),
                              note=f"zero the gradient of {key} (nothing writes it)")
        if not self.train:
            missing = [t for t in self.scalar_outputs if t not in self.outputs]
            if missing:
                raise Unsupported(f"test output '{missing[0]}' is not an Accuracy or loss")
            self.outputs = [t for t in self.scalar_outputs]
        self.emit("advance", "advance", {}, [Ref("counters", count=8), np.int32(self.counter)], (1, 1, 1), (32, 1, 1),
                  note="iteration counter += 1")
        prog = Program(self.name, self.launches, self.tensors, self.outputs, sems=self.sems, data=self.data,
                       window=self.window, counter=self.counter)
        plan_arena(prog)
        return prog

    def activation(self, i) -> tuple[int, float]:
        """(ACT, slope) for the GEMM of step i: 1 and the slope when an activation rides in it."""
        r = self.act_of.get(i)
        if r is None:
            return 0, 0.0
        return 1, self.steps[r].layer.epilogue_slope()

    @staticmethod
    def blocks(n: int) -> tuple:
        return (max(1, min(math.ceil(n / THREADS), 132 * 16)), 1, 1)

    def elementwise(self, kinds: tuple[str, str], backward: bool, s, *scalars) -> None:
        """Emit an element-wise layer's forward (kinds[0]: x -> y) or backward (kinds[1]:
        dy, x, y -> dx) kernel, as registered by gpu.kernel.elementwise."""
        x, y = s.node.bottoms[0], s.node.tops[0]
        n = math.prod(self.shape(x))
        extra = [np.float32(v) for v in scalars]
        if not backward:
            self.emit(kinds[0], f"{s.layer.name}_fwd", {"CNT": n}, [self.val(x), self.new_value(y), *extra], self.blocks(n))
        elif y in self.grad and s.propagate and s.propagate[0]:
            dx, acc = self.grad_out(x)
            self.emit(kinds[1], f"{s.layer.name}_bwd", {"CNT": n, "ACC": int(acc)},
                      [Ref("arena", self.grad[y]), self.val(x), self.val(y), dx, *extra], self.blocks(n))

    def output(self, i, s) -> Ref:
        """The value tensor of step i's top (shared with an activation riding in its GEMM)."""
        y = s.node.tops[0]
        ref = self.new_value(y)
        r = self.act_of.get(i)
        if r is not None:                    # the fused ReLU's top is the same storage
            self.value[self.steps[r].node.tops[0]] = self.value[y]
        return ref

    # -- the update -------------------------------------------------------------------------
    def update(self):
        lay = self.layout
        if not lay.learnable:
            return
        biggest = max(lay.counts[k] for k in lay.learnable)
        self.emit("sgd", "sgd_update", {}, [Ref("params", count=lay.total), Ref("grads", count=lay.total),
                                            Ref("history", count=lay.total), Ref("ptab_i"), Ref("ptab_f"),
                                            Ref("counters", offset=COUNTER_TRAIN, count=1), Ref("steps")]
                  + solver_scalars(self.cfg),
                  (max(1, min(math.ceil(biggest / (THREADS * 4)), 1024)), len(lay.learnable), 1),
                  note="SGD with momentum and weight decay (Caffe), lr from the device's iteration counter")


def lower_train(plan, layout: ParamLayout, window: int, cfg) -> Program:
    """The training iteration of a TRAIN plan under solver config `cfg`."""
    problem = solver_problem(cfg)
    if problem:
        raise Unsupported(problem)
    return _Lowering(plan, layout, "train", True, window, COUNTER_TRAIN, cfg).build()


def lower_test(plan, layout: ParamLayout, index: int, batches: int) -> Program:
    """One batch of test net `index`: its scalar outputs are added to float64 accumulators."""
    missing = [p.key for p in plan.params if p.key not in layout.offsets]
    if missing:
        raise Unsupported(f"test net param '{missing[0]}' is not shared with the train net")
    return _Lowering(plan, layout, f"test{index}", False, batches, 1 + index).build()


def lower_layer(plan, layout: ParamLayout, index: int, train: bool = True, name: str = "probe") -> tuple[Program, int]:
    """One step's launches alone: its forward, then (train) its backward. Its bottoms are the arena
    tensors `v:<blob>` and its tops' gradients `d:<blob>`, set from outside; every tensor gets its
    own memory. Returns the program and how many launches are the forward's. This is how the layer
    table runs each layer type's lowering through the emulator against its eager forward/backward."""
    lw = _Lowering(plan, layout, name, train, 1, COUNTER_TRAIN)
    s = plan.steps[index]
    s.layer.lower_check(lw, s)
    lw.fused, lw.act_of, lw.mask_into = set(), {}, {}
    lw.scalar_outputs = [t for t in s.node.tops if math.prod(lw.shape(t)) == 1] if not train else []
    lw.losses_seen = 0
    for b in s.node.bottoms:
        lw.new_value(b)
    s.layer.lower_forward(lw, index, s)
    n_forward = len(lw.launches)
    if train and s.need_backward:
        for t in s.node.tops:
            if not s.loss_weights or not any(s.loss_weights):
                lw.grad_out(t)
        s.layer.lower_backward(lw, index, s)
    prog = Program(lw.name, lw.launches, lw.tensors, lw.outputs, sems=lw.sems)
    at = 0
    for t in prog.tensors.values():
        t.offset, at = at, at + (t.nbytes + 255) // 256 * 256
    prog.arena_bytes = at
    return prog, n_forward


def solver_scalars(cfg) -> list:
    """The runtime scalar arguments of nd_sgd_update after its pointer arguments."""
    return [np.int32(LR_POLICY_IDS[cfg.lr_policy]), np.float64(cfg.base_lr), np.float64(cfg.gamma),
            np.float64(cfg.power), np.int32(cfg.stepsize), np.int32(cfg.max_iter), np.int32(len(cfg.stepvalue)),
            np.float32(cfg.momentum), np.float64(cfg.weight_decay), np.int32(cfg.regularization_type == "L1")]
