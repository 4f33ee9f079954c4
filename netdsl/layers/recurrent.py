"""Layers: Caffe's recurrent layers, RNN and LSTM (RecurrentLayer: T x N x ... inputs, the `cont`
sequence-continuation bottom, an optional static input, expose_hidden).

Caffe unrolls the recurrence into an internal net of InnerProduct, Scale, Eltwise and LSTMUnit
layers; here the same math runs as a loop over T, and backward is backprop through time over the
batch's T steps. As in Caffe:

- bottoms: x (T, N, ...), cont (T, N), [x_static (N, ...)], and with expose_hidden h_0 [, c_0]
  (1, N, num_output); tops: the per-step output (T, N, num_output), and with expose_hidden
  h_T [, c_T] (1, N, num_output);
- cont_t multiplies h_{t-1} (and, in the LSTM unit, the forget gate), so cont_t = 0 starts a
  sequence;
- x and x_static get gradients; cont, h_0 and c_0 get none, and the gradients of h_T and c_T are
  ignored (Caffe shares only their data with the unrolled net);
- without expose_hidden the state at T is carried into the next forward's h_0 (and c_0): the Net
  keeps it as this layer's run state.
"""
from __future__ import annotations

from typing import ClassVar

from ..registry import FILLER, F, Layer, Msg, ShapeError, count, fmt, register

RECURRENT = Msg("RecurrentParameter", {
    "num_output": F(int, None, required=True, doc="the hidden state size", example="16"),
    "weight_filler": F(FILLER), "bias_filler": F(FILLER),
    "debug_info": F(bool, False, doc="Caffe: log the unrolled net's debug info (accepted, ignored)"),
    "expose_hidden": F(bool, False, doc="add bottoms h_0 [, c_0] and tops h_T [, c_T]"),
})


def sigmoid(xp, x):
    return 0.5 * xp.tanh(0.5 * x) + 0.5


class _Carry:
    """The hidden state at the last step of the previous forward (a Net's run state)."""

    def __init__(self):
        self.state = None


class _Recurrent(Layer):
    """Caffe's RecurrentLayer: arity, shape rule, the input and static transforms, the carried state.
    A subclass gives the cell: `hidden` (its state blobs), `gates` (rows of W_x per unit of
    num_output), its recurrent params (`recurrent_shapes`, `recurrent_fillers`), `run` and `run_back`."""
    messages = {"recurrent_param": RECURRENT}
    stateful = True
    hidden: ClassVar[tuple[str, ...]] = ("h",)
    gates: ClassVar[int] = 1
    n_bottoms = (2, 3)
    n_tops = (1, 1)
    bottom_roles = ("the input x (T x N x ...)", "the continuation flags cont (T x N)", "the static input (N x ...)")

    def __init__(self, spec, phase):
        super().__init__(spec, phase)
        k = len(self.hidden) if self.p.expose_hidden else 0
        self.n_bottoms = (2 + k, 3 + k)
        self.n_tops = (1 + k, 1 + k)
        if k:
            exposed = tuple(f"the initial {s} ({s}_0, 1 x N x num_output)" for s in self.hidden)
            self.bottom_roles = self.bottom_roles[:2] + exposed
            self.arity_note = (f"with expose_hidden, {self.type} reads x, cont, an optional static input, then "
                               + ", ".join(f"{s}_0" for s in self.hidden))

    @property
    def n_exposed(self) -> int:
        return len(self.hidden) if self.p.expose_hidden else 0

    @property
    def static(self) -> bool:
        return len(self.spec.bottoms) > 2 + self.n_exposed

    def validate(self):
        n = self.p.num_output
        if n is not None and n <= 0:
            return [ShapeError("E0107", f"{self.type} '{self.name}': `num_output` must be positive, got {n}",
                               field="num_output", help="set `num_output` to the hidden state size, e.g. 16")]
        return []

    def shape(self, bottoms):
        x, cont, H = bottoms[0], bottoms[1], self.p.num_output
        if len(x) < 2:
            raise ShapeError("E0221", f"{self.type} '{self.name}' needs its input as T x N x ..., got {fmt(x)}",
                             involves=(0,), help="put the time steps on axis 0 and the streams on axis 1")
        T, N = x[0], x[1]
        if len(cont) != 2 or not _fits(cont, (T, N)):
            raise ShapeError("E0221", f"{self.type} '{self.name}': cont must be T x N = {fmt((T, N))} like the "
                             f"input's first two axes, got {fmt(cont)}", involves=(0, 1),
                             help=f"give one continuation flag per time step and stream ({fmt((T, N))})")
        first = 2
        if self.static:
            s = bottoms[2]
            if len(s) < 1 or not _fits(s[:1], (N,)):
                raise ShapeError("E0221", f"{self.type} '{self.name}': the static input must be N x ... with "
                                 f"N = {N} streams, got {fmt(s)}", involves=(0, 2),
                                 help="give one static input per stream (axis 0 = the input's axis 1)")
            first = 3
        want = (1, N, H)
        for j, name in enumerate(self.hidden[:self.n_exposed]):
            h = bottoms[first + j]
            if len(h) != 3 or not _fits(h, want):
                raise ShapeError("E0221", f"{self.type} '{self.name}': {name}_0 must be {fmt(want)} "
                                 f"(1 x N x num_output), got {fmt(h)}", involves=(0, first + j),
                                 help=f"give the initial {name} as a {fmt(want)} blob")
        return [(T, N, H)] + [want] * self.n_exposed

    def param_shapes(self, bottoms):
        x, H = bottoms[0], self.p.num_output
        G = self.gates * H
        shapes = [(G, count(x, 2)), (G,)]
        if self.static:
            shapes.append((G, count(bottoms[2], 1)))
        return shapes + self.recurrent_shapes(H)

    def fillers(self):
        w, b = self.p.weight_filler, self.p.bias_filler
        return [w, b] + ([w] if self.static else []) + self.recurrent_fillers(w, b)

    def macs(self, bottoms, tops):
        x, H = bottoms[0], self.p.num_output
        T, N = x[0], x[1]
        if None in (T, N, count(x, 2)) or (self.static and count(bottoms[2], 1) is None):
            return 0
        m = T * N * self.gates * H * (count(x, 2) + H) + T * N * self.extra_macs(H)
        return m + (N * self.gates * H * count(bottoms[2], 1) if self.static else 0)

    def allow_force_backward(self, i):
        return i != 1                                   # Caffe: never to the continuation flags

    def open(self, ctx):
        return None if self.p.expose_hidden else _Carry()

    # -- running ---------------------------------------------------------------------------
    def forward(self, xp, bottoms, params, state=None):
        x, cont = bottoms[0], bottoms[1]
        T, N, H = x.shape[0], x.shape[1], self.p.num_output
        x2 = x.reshape(T, N, -1)
        pre = x2 @ params[0].T + params[1]              # W_x x_t + b, every step at once
        k, xs, xs_shape = 2, None, None
        if self.static:
            xs_shape = bottoms[2].shape
            xs = bottoms[2].reshape(N, -1)
            pre = pre + (xs @ params[2].T)[None]        # W_s x_static, the same at every step
            k = 3
        carry = getattr(state, "source", None)
        if self.p.expose_hidden:
            h0 = [b[0] for b in bottoms[k:]]
        elif isinstance(carry, _Carry) and _usable(carry.state, x, (N, H)):
            h0 = carry.state
        else:
            h0 = [xp.zeros((N, H), dtype=x.dtype) for _ in self.hidden]
        c = cont.astype(x.dtype)[:, :, None]
        out, last, cell = self.run(xp, pre, c, h0, params[k:])
        if isinstance(carry, _Carry):
            carry.state = [s.copy() for s in last]
        tops = [out] + ([s[None] for s in last] if self.p.expose_hidden else [])
        return tops, (x2, x.shape, xs, xs_shape, c, cell)

    def backward(self, xp, saved, dtops, params, need):
        x2, xshape, xs, xs_shape, c, cell = saved
        k = 3 if self.static else 2
        dpre, drec = self.run_back(xp, dtops[0], c, cell, params[k:])   # d(pre), T x N x G
        T, N, G = dpre.shape
        flat = dpre.reshape(T * N, G)
        dparams = [flat.T @ x2.reshape(T * N, -1), flat.sum(axis=0)]
        dbottoms = [None] * len(need)
        if need[0]:
            dbottoms[0] = (dpre @ params[0]).reshape(xshape)
        if self.static:
            dsum = dpre.sum(axis=0)
            dparams.append(dsum.T @ xs)
            if need[2]:
                dbottoms[2] = (dsum @ params[2]).reshape(xs_shape)
        return dbottoms, dparams + drec

    def run(self, xp, pre, c, h0, rec):
        """-> (the output top, the state at T, what run_back needs)."""
        raise NotImplementedError

    def run_back(self, xp, dout, c, cell, rec):
        """-> (d pre, the recurrent params' gradients), backprop through time."""
        raise NotImplementedError


@register
class RNN(_Recurrent):
    """h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]);
    o_t = tanh(W_ho h_t + b_o); the top is o. Params (Caffe's order): W_xh, b_h, [W_xh_static],
    W_hh, W_ho, b_o."""
    type = "RNN"

    def recurrent_shapes(self, H):
        return [(H, H), (H, H), (H,)]

    def recurrent_fillers(self, w, b):
        return [w, w, b]

    def extra_macs(self, H):
        return H * H

    def run(self, xp, pre, c, h0, rec):
        W_hh, W_ho, b_o = rec
        T, N, H = pre.shape
        hs = xp.empty((T + 1, N, H), dtype=pre.dtype)
        hs[0] = h0[0]
        for t in range(T):
            hs[t + 1] = xp.tanh(pre[t] + (c[t] * hs[t]) @ W_hh.T)
        o = xp.tanh(hs[1:] @ W_ho.T + b_o)
        return o, [hs[T]], (hs, o)

    def run_back(self, xp, dout, c, cell, rec):
        W_hh, W_ho, _ = rec
        hs, o = cell
        T, N, H = o.shape
        do = dout * (1 - o * o)
        dW_ho = do.reshape(T * N, H).T @ hs[1:].reshape(T * N, H)
        db_o = do.sum(axis=(0, 1))
        dh_out = do @ W_ho
        dpre = xp.empty_like(dh_out)
        dh = xp.zeros((N, H), dtype=o.dtype)
        for t in range(T - 1, -1, -1):
            dpre[t] = (dh_out[t] + dh) * (1 - hs[t + 1] * hs[t + 1])
            dh = (dpre[t] @ W_hh) * c[t]
        dW_hh = dpre.reshape(T * N, H).T @ (c * hs[:-1]).reshape(T * N, H)
        return dpre, [dW_hh, dW_ho, db_o]


@register
class LSTM(_Recurrent):
    """Caffe's LSTM: gate pre-activations W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static
    x_static] in the order (i, f, o, g); i, f, o = sigmoid, g = tanh; c_t = cont_t f_t c_{t-1} +
    i_t g_t; h_t = o_t tanh(c_t); the top is h. Params: W_xc, b_c, [W_xc_static], W_hc."""
    type = "LSTM"
    hidden = ("h", "c")
    gates = 4

    def recurrent_shapes(self, H):
        return [(4 * H, H)]

    def recurrent_fillers(self, w, b):
        return [w]

    def extra_macs(self, H):
        return 0

    def run(self, xp, pre, c, h0, rec):
        (W_hc,) = rec
        T, N, G = pre.shape
        H = G // 4
        hs = xp.empty((T + 1, N, H), dtype=pre.dtype)
        cs = xp.empty_like(hs)
        tcs = xp.empty((T, N, H), dtype=pre.dtype)
        acts = xp.empty((T, N, G), dtype=pre.dtype)     # i, sigmoid(f'), o, g (f = cont * sigmoid(f'))
        hs[0], cs[0] = h0
        for t in range(T):
            a = pre[t] + (c[t] * hs[t]) @ W_hc.T
            acts[t, :, :3 * H] = sigmoid(xp, a[:, :3 * H])
            acts[t, :, 3 * H:] = xp.tanh(a[:, 3 * H:])
            i, s, o, g = (acts[t, :, j * H:(j + 1) * H] for j in range(4))
            cs[t + 1] = c[t] * s * cs[t] + i * g
            tcs[t] = xp.tanh(cs[t + 1])
            hs[t + 1] = o * tcs[t]
        return hs[1:], [hs[T], cs[T]], (hs, cs, tcs, acts)

    def run_back(self, xp, dout, c, cell, rec):
        (W_hc,) = rec
        hs, cs, tcs, acts = cell
        T, N, G = acts.shape
        H = G // 4
        dpre = xp.empty_like(acts)
        dh = xp.zeros((N, H), dtype=acts.dtype)
        dc = xp.zeros_like(dh)
        for t in range(T - 1, -1, -1):
            i, s, o, g = (acts[t, :, j * H:(j + 1) * H] for j in range(4))
            dht = dout[t] + dh
            dct = dc + dht * o * (1 - tcs[t] * tcs[t])
            dpre[t, :, :H] = dct * g * i * (1 - i)
            dpre[t, :, H:2 * H] = dct * cs[t] * c[t] * s * (1 - s)
            dpre[t, :, 2 * H:3 * H] = dht * tcs[t] * o * (1 - o)
            dpre[t, :, 3 * H:] = dct * i * (1 - g * g)
            dc = dct * c[t] * s
            dh = (dpre[t] @ W_hc) * c[t]
        dW_hc = dpre.reshape(T * N, G).T @ (c * hs[:-1]).reshape(T * N, H)
        return dpre, [dW_hc]


def _fits(shape, want) -> bool:
    return all(a is None or b is None or a == b for a, b in zip(shape, want))


def _usable(state, x, shape) -> bool:
    """The carried state fits this forward (same backend, dtype and N x H)."""
    return state is not None and all(type(s) is type(x) and s.dtype == x.dtype and s.shape == shape for s in state)
