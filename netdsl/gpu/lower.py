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

from .program import THREADS, Launch, Program, Ref, Tensor, choose_tiling, plan_arena

SUPPORTED_LAYERS = ("MNIST", "Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss", "Accuracy")
LR_POLICY_IDS = {"fixed": 0, "step": 1, "exp": 2, "inv": 3, "multistep": 4, "poly": 5, "sigmoid": 6}
INT_MAX = 2**31 - 1
COUNTER_TRAIN = 0                 # counters[0]: the iteration (updates applied); [1 + i]: test i


class Unsupported(Exception):
    """Why graph mode cannot run a plan; the message names the layer or setting."""


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
    if cfg.clip_gradients >= 0:
        return "clip_gradients (the global norm needs a host round trip)"
    if cfg.lr_policy not in LR_POLICY_IDS:
        return f"lr_policy '{cfg.lr_policy}'"
    if cfg.lr_policy == "multistep" and len(cfg.stepvalue) > 64:
        return "more than 64 stepvalues"
    return None


def _sym(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _count(shape) -> int:
    return math.prod(shape)


def _blocks(n: int) -> tuple:
    return (max(1, min(math.ceil(n / THREADS), 132 * 16)), 1, 1)


def _loss_norm_mode(p) -> int:
    """SoftmaxWithLoss normalisation -> the kernel's NORM (0: N, 1: VALID, 2: NONE)."""
    mode = p.normalization if p.normalization is not None else (
        ("VALID" if p.normalize else "BATCH_SIZE") if p.normalize is not None else "VALID")
    return {"FULL": 0, "BATCH_SIZE": 0, "VALID": 1, "NONE": 2}[mode]


class _Lowering:
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
        return self.tensor(self.value[blob], _count(self.shape(blob)))

    def grad_out(self, blob) -> tuple[Ref, bool]:
        """Where to write blob's gradient, and whether to add to it (a later consumer)."""
        name = self.grad.setdefault(blob, f"d:{blob}")
        ref = self.tensor(name, _count(self.shape(blob)))
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
            if L.type not in SUPPORTED_LAYERS:
                raise Unsupported(f"{L.type} layer '{L.name}' has no graph-mode kernel (graph mode covers "
                                  f"{', '.join(SUPPORTED_LAYERS)})")
            for b in s.node.bottoms + s.node.tops:
                if any(d is None for d in self.shapes[b]):
                    raise Unsupported(f"blob '{b}' has a data-dependent shape")
            self._check_layer(L, s)
        if sum(s.layer.type == "MNIST" for s in self.steps) != 1:
            raise Unsupported("graph mode needs exactly one MNIST data layer")

    def _check_layer(self, L, s) -> None:
        t, p = L.type, L.p
        if t == "MNIST":
            if p.crop_size or (p.mirror and L.phase == "TRAIN") or len(p.mean_value) > 1:
                raise Unsupported(f"MNIST '{L.name}': crop_size / mirror / several mean_values")
        elif t == "Convolution":
            if p.group != 1:
                raise Unsupported(f"Convolution '{L.name}' has group {p.group} (graph mode: group 1)")
            if p.axis != 1:
                raise Unsupported(f"Convolution '{L.name}': axis {p.axis}")
        elif t == "Pooling":
            if len(s.node.tops) != 1 or p.pool not in ("MAX", "AVE"):
                raise Unsupported(f"Pooling '{L.name}': only MAX/AVE with one top")
        elif t == "ReLU":
            if p.negative_slope < 0:
                raise Unsupported(f"ReLU '{L.name}': negative_slope < 0")
        elif t in ("SoftmaxWithLoss", "Accuracy"):
            x = self.shape(s.node.bottoms[0])
            if (p.axis % len(x)) != 1 or _count(x[2:]) != 1 or len(s.node.tops) != 1:
                raise Unsupported(f"{t} '{L.name}': only N x C inputs (axis 1) and one top")

    def fusions(self):
        """ReLU steps riding in their producer's GEMM, and InnerProduct data gradients that apply a
        fused ReLU's backward mask."""
        fused, act_of, mask_into = set(), {}, {}
        for i, s in enumerate(self.steps):
            if s.layer.type != "ReLU":
                continue
            x = s.node.bottoms[0]
            j = self.producer.get(x)
            if j is None or self.steps[j].layer.type not in ("Convolution", "InnerProduct"):
                continue
            if self.consumers.get(x) != [i] or len(self.steps[j].node.tops) != 1:
                continue
            fused.add(i)
            act_of[j] = i
            if not self.train or not (s.need_backward and s.propagate and s.propagate[0]):
                continue
            y = s.node.tops[0]
            feeds = [k for k in self.consumers.get(y, []) if self._propagates(k, y)]
            if len(feeds) == 1 and self.steps[feeds[0]].layer.type == "InnerProduct":
                mask_into[feeds[0]] = i
        return fused, act_of, mask_into

    def _propagates(self, k: int, blob: str) -> bool:
        s = self.steps[k]
        return s.need_backward and any(p and b == blob for b, p in zip(s.node.bottoms, s.propagate))

    # -- the program ------------------------------------------------------------------------
    def build(self) -> Program:
        self.check_supported()
        self.fused, self.act_of, self.mask_into = self.fusions()
        self.scalar_outputs = [t for t in self.plan.outputs if _count(self.shape(t)) == 1]
        self.losses_seen = 0
        for i, s in enumerate(self.steps):
            getattr(self, "fwd_" + s.layer.type)(i, s)
        if self.train:
            for i in range(len(self.steps) - 1, -1, -1):
                s = self.steps[i]
                if s.need_backward and s.layer.type not in ("SoftmaxWithLoss", "MNIST", "Accuracy"):
                    getattr(self, "bwd_" + s.layer.type)(i, s)
            self.update()
            for key in self.layout.learnable:      # no gradient this iteration: zero, for the next
                if key not in self.pgrads:
                    n = self.layout.counts[key]
                    self.emit("zero", f"zero_{key}", {"CNT": n}, [self.param("grads", key)], _blocks(n),
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

    # -- forward ----------------------------------------------------------------------------
    def fwd_MNIST(self, i, s):
        L, tops = s.layer, s.node.tops
        n = self.shape(tops[0])[0]
        split = L.p.split.lower()
        mean = float(L.p.mean_value[0]) if L.p.mean_value else 0.0
        x = self.new_value(tops[0])
        y = self.new_value(tops[1]) if len(tops) > 1 else None
        self.data.append((L.name, split))
        params = dict(N=n, D=28 * 28, WIN=self.window, MEAN=int(bool(L.p.mean_value)), SCALE=int(L.p.scale != 1.0))
        self.emit("gather", f"{L.name}_gather", params,
                  [Ref(f"images:{split}"), Ref(f"labels:{split}"), Ref(f"seq:{self.name}", count=self.window * n),
                   Ref("counters", offset=self.counter, count=1), np.float32(mean), np.float32(L.p.scale), x, y],
                  _blocks(n * 784), note=f"gather {n} MNIST {split} images from the GPU-resident set")

    def _act(self, i):
        r = self.act_of.get(i)
        if r is None:
            return 0, 0.0
        return 1, float(self.steps[r].layer.p.negative_slope)

    def _out(self, i, s) -> Ref:
        y = s.node.tops[0]
        ref = self.new_value(y)
        r = self.act_of.get(i)
        if r is not None:                    # the fused ReLU's top is the same storage
            self.value[self.steps[r].node.tops[0]] = self.value[y]
        return ref

    def _conv_geom(self, s):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.layer.geometry()
        N, C, H, W = self.shape(s.node.bottoms[0])
        _, M, OH, OW = self.shape(s.node.tops[0])
        return dict(N=N, C=C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, OH=OH, OW=OW), M

    def fwd_Convolution(self, i, s):
        g, M = self._conv_geom(s)
        L, x = s.layer, s.node.bottoms[0]
        K, P, N = g["C"] * g["KH"] * g["KW"], g["OH"] * g["OW"], g["N"]
        if (g["KH"], g["KW"], g["SH"], g["SW"], g["PH"], g["PW"]) == (1, 1, 1, 1, 0, 0):
            col = self.val(x)                 # a 1x1 convolution's columns are its input
        else:
            col = self.tensor(f"col:{L.name}", N * K * P)
            self.emit("im2col", f"{L.name}_im2col", g, [self.val(x), col], _blocks(N * K * P))
        self.saved_col[i] = col
        keys = [self.plan.params[j].key for j in s.params]
        act, slope = self._act(i)
        y = self._out(i, s)
        self.gemm(f"{L.name}_fwd", A=self.param("params", keys[0]), B=col, C=y, M=M, N=P, K=K, batch=N,
                  LDA=K, LDB=P, LDC=P, SB=K * P, SC=M * P,
                  bias=self.param("params", keys[1]) if len(keys) > 1 else None, bias_mode=1, act=act, slope=slope)

    def fwd_InnerProduct(self, i, s):
        L, x = s.layer, s.node.bottoms[0]
        xs = self.shape(x)
        axis = L.p.axis % len(xs)
        nb, k, m = _count(xs[:axis]), _count(xs[axis:]), L.p.num_output
        keys = [self.plan.params[j].key for j in s.params]
        act, slope = self._act(i)
        y = self._out(i, s)
        self.gemm(f"{L.name}_fwd", A=self.val(x), B=self.param("params", keys[0]), C=y, M=nb, N=m, K=k,
                  LDA=k, TB=0 if L.p.transpose else 1, LDB=m if L.p.transpose else k, LDC=m,
                  bias=self.param("params", keys[1]) if len(keys) > 1 else None, bias_mode=2, act=act, slope=slope)

    def fwd_Pooling(self, i, s):
        L, x = s.layer, s.node.bottoms[0]
        N, C, H, W = self.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = L.geometry(self.shape(x))
        _, _, OH, OW = self.shape(s.node.tops[0])
        g = dict(NC=N * C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=OH, OW=OW)
        y = self.new_value(s.node.tops[0])
        if L.p.pool == "MAX":
            mask = self.tensor(f"mask:{L.name}", N * C * OH * OW, "i32")
            self.emit("maxpool_fwd", f"{L.name}_fwd", g, [self.val(x), y, mask], _blocks(N * C * OH * OW))
        else:
            self.emit("avepool_fwd", f"{L.name}_fwd", g, [self.val(x), y], _blocks(N * C * OH * OW))

    def fwd_ReLU(self, i, s):
        if i in self.fused:
            return
        x, y = s.node.bottoms[0], s.node.tops[0]
        n = _count(self.shape(x))
        self.emit("relu_fwd", f"{s.layer.name}_fwd", {"CNT": n},
                  [self.val(x), self.new_value(y), np.float32(s.layer.p.negative_slope)], _blocks(n))

    def fwd_SoftmaxWithLoss(self, i, s):
        L = s.layer
        x, label = s.node.bottoms
        n, c = self.shape(x)[0], self.shape(x)[1]
        top = s.node.tops[0]
        grad = self.train and s.need_backward and bool(s.propagate) and s.propagate[0]
        dx, acc = self.grad_out(x) if grad else (None, False)
        ignore = L.p.ignore_label
        w = s.loss_weights[0] if s.loss_weights else 1.0
        to_hist = self.train
        if not self.train:
            if top not in self.scalar_outputs:
                return
            accum = Ref(f"acc:{self.name}", offset=self.scalar_outputs.index(top), count=1)
            self.outputs.append(top)
        else:
            accum = None
        params = dict(N=n, C=c, GRAD=int(grad), ACC_GRAD=int(acc), HAS_IGNORE=int(ignore is not None),
                      NORM=_loss_norm_mode(L.p), TO_HISTORY=int(to_hist), ADD=int(self.losses_seen > 0))
        if self.train:
            self.losses_seen += 1
        self.emit("softmax_loss", f"{L.name}", params,
                  [self.val(x), self.val(label), dx, Ref("loss_hist", count=self.window) if to_hist else None,
                   accum, Ref("counters", offset=COUNTER_TRAIN, count=1) if to_hist else None,
                   np.int32(self.window), np.int32(ignore if ignore is not None else -1), np.float32(w)],
                  (1, 1, 1), note=f"softmax loss{' and its gradient' if grad else ''}")

    def fwd_Accuracy(self, i, s):
        if self.train:
            return                            # the train loop reports only the loss
        L = s.layer
        x, label = s.node.bottoms
        top = s.node.tops[0]
        if top not in self.scalar_outputs:
            return
        n, c = self.shape(x)[0], self.shape(x)[1]
        ignore = L.p.ignore_label
        self.outputs.append(top)
        self.emit("accuracy", L.name, dict(N=n, C=c, TOPK=L.p.top_k, HAS_IGNORE=int(ignore is not None)),
                  [self.val(x), self.val(label), Ref(f"acc:{self.name}", offset=self.scalar_outputs.index(top), count=1),
                   np.int32(ignore if ignore is not None else -1)], (1, 1, 1))

    # -- backward ---------------------------------------------------------------------------
    def bwd_Convolution(self, i, s):
        y = s.node.tops[0]
        if y not in self.grad:
            return
        g, M = self._conv_geom(s)
        L, x = s.layer, s.node.bottoms[0]
        K, P, N = g["C"] * g["KH"] * g["KW"], g["OH"] * g["OW"], g["N"]
        dy, col = Ref("arena", self.grad[y]), self.saved_col[i]
        keys = [self.plan.params[j].key for j in s.params]
        fuse_b = len(keys) > 1 and self.learnable(keys[1]) and self.learnable(keys[0]) and \
            (keys[0] in self.pgrads) == (keys[1] in self.pgrads)
        if self.learnable(keys[0]):
            acc = self.pgrad_acc(keys[0])
            bias = self.param("grads", keys[1]) if fuse_b else None
            if fuse_b:
                self.pgrad_acc(keys[1])
            self.gemm(f"{L.name}_dW", A=dy, B=col, C=self.param("grads", keys[0]), M=M, N=K, K=P, R=N,
                      LDA=P, RA=M * P, TB=1, LDB=P, RB=K * P, LDC=K, beta=acc, bias=bias, bias_mode=3)
        if len(keys) > 1 and self.learnable(keys[1]) and not fuse_b:
            self.emit("bias_grad", f"{L.name}_db", dict(N=N, M=M, P=P, ACC=int(self.pgrad_acc(keys[1]))),
                      [dy, self.param("grads", keys[1])], (M, 1, 1), (256, 1, 1))
        if s.propagate and s.propagate[0]:
            dx, acc = self.grad_out(x)
            w = self.param("params", keys[0])
            if col == self.val(x):            # 1x1: the column gradient is the image gradient
                self.gemm(f"{L.name}_dx", A=w, B=dy, C=dx, M=K, N=P, K=M, batch=N, TA=1, LDA=K, LDB=P, SB=M * P,
                          LDC=P, SC=K * P, beta=acc)
            else:
                dcol = self.tensor(f"dcol:{L.name}", N * K * P)
                self.gemm(f"{L.name}_dcol", A=w, B=dy, C=dcol, M=K, N=P, K=M, batch=N, TA=1, LDA=K, LDB=P,
                          SB=M * P, LDC=P, SC=K * P)
                self.emit("col2im", f"{L.name}_col2im", {**g, "ACC": int(acc)}, [dcol, dx], _blocks(N * g["C"] * g["H"] * g["W"]))

    def bwd_InnerProduct(self, i, s):
        y = s.node.tops[0]
        if y not in self.grad:
            return
        L, x = s.layer, s.node.bottoms[0]
        xs = self.shape(x)
        axis = L.p.axis % len(xs)
        nb, k, m = _count(xs[:axis]), _count(xs[axis:]), L.p.num_output
        dy = Ref("arena", self.grad[y])
        keys = [self.plan.params[j].key for j in s.params]
        tr = bool(L.p.transpose)
        fuse_b = not tr and len(keys) > 1 and self.learnable(keys[1]) and self.learnable(keys[0]) and \
            (keys[0] in self.pgrads) == (keys[1] in self.pgrads)
        if self.learnable(keys[0]):
            acc = self.pgrad_acc(keys[0])
            if tr:    # W is K x M: dW = x^T dy
                self.gemm(f"{L.name}_dW", A=self.val(x), B=dy, C=self.param("grads", keys[0]), M=k, N=m, K=nb,
                          TA=1, LDA=k, LDB=m, LDC=m, beta=acc)
            else:     # W is M x K: dW = dy^T x, and db = dy^T 1 as the ones column
                bias = self.param("grads", keys[1]) if fuse_b else None
                if fuse_b:
                    self.pgrad_acc(keys[1])
                self.gemm(f"{L.name}_dW", A=dy, B=self.val(x), C=self.param("grads", keys[0]), M=m, N=k, K=nb,
                          TA=1, LDA=m, LDB=k, LDC=k, beta=acc, bias=bias, bias_mode=3)
        if len(keys) > 1 and self.learnable(keys[1]) and not fuse_b:
            self.emit("col_sum", f"{L.name}_db", dict(N=nb, M=m, ACC=int(self.pgrad_acc(keys[1]))),
                      [dy, self.param("grads", keys[1])], _blocks(m))
        if s.propagate and s.propagate[0]:
            r = self.mask_into.get(i)
            act, aux, slope = 0, None, 0.0
            if r is not None:                 # apply the fused ReLU's backward here
                relu = self.steps[r]
                dx, acc = self.grad_out(relu.node.bottoms[0])
                act, aux, slope = 2, self.val(relu.node.tops[0]), float(relu.layer.p.negative_slope)
                self.relu_done.add(r)
            else:
                dx, acc = self.grad_out(x)
            w = self.param("params", keys[0])
            self.gemm(f"{L.name}_dx", A=dy, B=w, C=dx, M=nb, N=k, K=m, LDA=m, TB=int(tr), LDB=m if tr else k, LDC=k,
                      beta=acc, act=act, aux=aux, slope=slope)

    def bwd_Pooling(self, i, s):
        y = s.node.tops[0]
        if y not in self.grad or not (s.propagate and s.propagate[0]):
            return
        L, x = s.layer, s.node.bottoms[0]
        N, C, H, W = self.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = L.geometry(self.shape(x))
        _, _, OH, OW = self.shape(y)
        dx, acc = self.grad_out(x)
        g = dict(NC=N * C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=OH, OW=OW, ACC=int(acc))
        dy = Ref("arena", self.grad[y])
        if L.p.pool == "MAX":
            self.emit("maxpool_bwd", f"{L.name}_bwd", g, [dy, Ref("arena", f"mask:{L.name}"), dx], _blocks(N * C * H * W))
        else:
            self.emit("avepool_bwd", f"{L.name}_bwd", g, [dy, dx], _blocks(N * C * H * W))

    def bwd_ReLU(self, i, s):
        if i in self.relu_done:
            return
        y = s.node.tops[0]
        if y not in self.grad or not (s.propagate and s.propagate[0]):
            return
        x = s.node.bottoms[0]
        n = _count(self.shape(x))
        dx, acc = self.grad_out(x)
        self.emit("relu_bwd", f"{s.layer.name}_bwd", {"CNT": n, "ACC": int(acc)},
                  [Ref("arena", self.grad[y]), self.val(y), dx, np.float32(s.layer.p.negative_slope)], _blocks(n))

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


def solver_scalars(cfg) -> list:
    """The runtime scalar arguments of nd_sgd_update after its pointer arguments."""
    return [np.int32(LR_POLICY_IDS[cfg.lr_policy]), np.float64(cfg.base_lr), np.float64(cfg.gamma),
            np.float64(cfg.power), np.int32(cfg.stepsize), np.int32(cfg.max_iter), np.int32(len(cfg.stepvalue)),
            np.float32(cfg.momentum), np.float64(cfg.weight_decay), np.int32(cfg.regularization_type == "L1")]
