"""The solver update over one flat parameter buffer: every learnable blob's data, gradient and
history are views into flat arrays, and one compiled pass (kernels.update) applies the whole
update rule to all of them. Snapshots and resuming are Solver's: its history blobs are the views."""
from __future__ import annotations

import math

import numpy as np

from ..solver import SOLVER_TYPES, Solver, learning_rate
from . import kernels as K


def flatten(params, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Move each param's data and grad into one flat array each (in order); returns them."""
    n = sum(p.data.size for p in params)
    data, grad = np.empty(n, dtype), np.zeros(n, dtype)
    o = 0
    for p in params:
        k, shape = p.data.size, p.data.shape
        data[o:o + k] = p.data.reshape(-1)
        grad[o:o + k] = p.grad.reshape(-1)
        p.data, p.grad = data[o:o + k].reshape(shape), grad[o:o + k].reshape(shape)
        o += k
    return data, grad


def chunks(seg: np.ndarray, size: int = 1 << 16) -> np.ndarray:
    """The update kernels' work items: rows (start, end, param index) cutting each param's
    segment [seg[i], seg[i+1]) into slices of at most `size` elements (one parallel loop over all)."""
    rows = [(a, min(a + size, e), i) for i, (s, e) in enumerate(zip(seg[:-1], seg[1:])) for a in range(s, e, size)]
    return np.array(rows, np.int64).reshape(-1, 3)


class FlatSolver(Solver):
    """Solver's step as one kernel over flat buffers made by `flatten` (the same params, in order)."""

    def __init__(self, cfg, params, data: np.ndarray, grad: np.ndarray):
        super().__init__(cfg, params)
        self.w, self.g = data, grad
        self.seg = np.concatenate([[0], np.cumsum([p.data.size for p in self.params])]).astype(np.int64)
        self.chunks = chunks(self.seg)
        self.lr_mults = np.array([p.lr_mult for p in self.params], np.float64)
        self.decay_mults = np.array([p.decay_mult for p in self.params], np.float64)
        hist = [np.zeros(data.size, data.dtype) for _ in range(SOLVER_TYPES[self.type])]
        for k, h in enumerate(hist):
            for s, e, p, b in zip(self.seg[:-1], self.seg[1:], self.params, self.buffers):
                b.history[k] = h[s:e].reshape(p.data.shape)
        self.h0 = hist[0]
        self.h1 = hist[1] if len(hist) > 1 else np.empty(0, data.dtype)

    def step(self, it: int) -> float:
        cfg, kind = self.cfg, self.type
        rate = learning_rate(cfg, it)
        self.last_clip = self._clip_gradients()
        rates = rate * self.lr_mults
        decays = cfg.weight_decay * self.decay_mults
        shrinks = np.zeros_like(decays)
        if kind in ("Adam", "AdamW"):
            t = it + 1
            if self.decoupled:
                shrinks, decays = rates * decays, shrinks
            rates = rates * (math.sqrt(1.0 - cfg.momentum2 ** t) / (1.0 - cfg.momentum ** t))
        f = self.w.dtype.type                      # scalars in the buffers' dtype
        args = (self.w, self.g, self.h0) + ((self.h1,) if kind in ("AdaDelta", "Adam", "AdamW") else ()) + \
            (self.chunks, rates.astype(self.w.dtype), decays.astype(self.w.dtype), shrinks.astype(self.w.dtype),
             f(1.0 / cfg.iter_size), cfg.regularization_type == "L1")
        m, m2, delta = f(cfg.momentum), f(cfg.momentum2), f(cfg.delta)
        if kind == "SGD":
            K.sgd(*args, m, f(1), f(0))
        elif kind == "Nesterov":
            K.sgd(*args, m, f(1.0 + cfg.momentum), m)
        elif kind == "AdaGrad":
            K.rms(*args, f(1), f(1), delta)
        elif kind == "RMSProp":
            K.rms(*args, f(cfg.rms_decay), f(1.0 - cfg.rms_decay), delta)
        elif kind == "AdaDelta":
            K.adadelta(*args, m, f(1.0 - cfg.momentum), delta)
        else:
            K.adam(*args, m, f(1.0 - cfg.momentum), m2, f(1.0 - cfg.momentum2), delta)
        return rate
