"""Solver: learning-rate policies and parameter update rules (Caffe's sgd_solver.cpp and kin)."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy

# Update rule -> how many history blobs it keeps per param (Caffe's history_ layout).
SOLVER_TYPES = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2, "Adam": 2,
                "AdamW": 2}
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
REGULARIZATION_TYPES = ("L2", "L1")
# The deprecated SolverType enum, as Caffe's UpgradeSolverType maps it onto `type`.
LEGACY_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                       "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


@dataclass
class SolverConfig:
    """Caffe's SolverParameter: every field of BVLC caffe.proto, by name, with its default.

    Two defaults are ours, because caffe.proto has none: base_lr (an unset float reads 0.0 there,
    which never learns) and lr_policy (Caffe aborts on an unset policy). type also accepts
    "AdamW", a netdsl extension (see Solver). Fields marked "loop" are read by the training loop,
    not here; those marked "unused" are accepted so real Caffe solver files load unchanged.
    """
    # Nets (loop): one train net from net | net_param | train_net | train_net_param.
    net: str | None = None
    net_param: Any = None
    train_net: str | None = None
    test_net: list[str] = field(default_factory=list)
    train_net_param: Any = None
    test_net_param: list[Any] = field(default_factory=list)
    train_state: Any = None
    test_state: list[Any] = field(default_factory=list)
    # Testing and display (loop).
    test_iter: list[int] = field(default_factory=list)
    test_interval: int = 0
    test_compute_loss: bool = False
    test_initialization: bool = True
    display: int = 0
    average_loss: int = 1
    debug_info: bool = False
    # The learning rate and its schedule.
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepsize: int = 0
    stepvalue: list[int] = field(default_factory=list)
    max_iter: int = 0
    # The update.
    type: str = "SGD"
    solver_type: str | None = None  # deprecated enum (SGD, NESTEROV, ...); upgraded to `type`
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0
    iter_size: int = 1
    random_seed: int = -1
    # Snapshots and weights (loop).
    snapshot: int = 0
    snapshot_prefix: str = ""
    snapshot_diff: bool = False
    snapshot_format: str = "BINARYPROTO"
    snapshot_after_train: bool = True
    weights: list[str] = field(default_factory=list)
    # Unused: the device comes from the backend; netdsl trains on one device.
    solver_mode: str = "GPU"
    device_id: int = 0
    layer_wise_reduce: bool = True


class Param(Protocol):
    """A learnable blob as the solver sees it; data and grad are numpy or cupy arrays."""
    data: Any
    grad: Any
    lr_mult: float
    decay_mult: float
    name: str


def resolved_type(cfg: SolverConfig) -> str:
    """The update rule's name, with the deprecated solver_type enum upgraded as Caffe does."""
    return LEGACY_SOLVER_TYPES.get(cfg.solver_type, cfg.type)


def learning_rate(cfg: SolverConfig, it: int) -> float:
    """Caffe's GetLearningRate, where `it` counts the updates already applied.

    Computed in float64 from the config; Caffe computes it in the net's Dtype (usually float32),
    so the two agree to float32 rounding.
    """
    policy, base = cfg.lr_policy, cfg.base_lr
    if policy == "fixed":
        return base
    if policy == "step":
        return base * cfg.gamma ** (it // cfg.stepsize)
    if policy == "exp":
        return base * cfg.gamma ** it
    if policy == "inv":
        return base * (1.0 + cfg.gamma * it) ** -cfg.power
    if policy == "multistep":
        return base * cfg.gamma ** _multistep_count(cfg.stepvalue, it)
    if policy == "poly":
        # Past max_iter Caffe's pow() gives NaN; Python's ** would give a complex number.
        return base * max(0.0, 1.0 - it / cfg.max_iter) ** cfg.power
    if policy == "sigmoid":
        # 1/(1+exp(-x)) written with tanh, which cannot overflow for large |x|.
        return base * 0.5 * (1.0 + math.tanh(0.5 * cfg.gamma * (it - cfg.stepsize)))
    raise ValueError(f"unknown lr_policy '{policy}'")


def _multistep_count(stepvalue: list[int], it: int) -> int:
    """How many stepvalues Caffe has passed at iteration `it`.

    Caffe advances its step counter at most once per iteration, so a repeated or out-of-order
    stepvalue takes effect one iteration after the step before it.
    """
    count, reached = 0, -1
    for value in stepvalue:
        reached = max(value, reached + 1)
        if reached > it:
            break
        count += 1
    return count


@dataclass
class _Buffers:
    """One param's solver memory, as Caffe names it: history (kept) and update/temp (scratch)."""
    history: list[Any]
    update: Any
    temp: Any


class Solver:
    """Applies Caffe's ApplyUpdate to a list of params, in place, on numpy or cupy arrays.

    One step: clip all diffs by their global L2 norm; then per param scale the diff by
    1/iter_size, add weight decay (L2: weight_decay*decay_mult*w, L1: ...*sign(w)) and turn the
    diff into the update with the rule, using local_rate = lr*lr_mult; finally data -= diff.
    Like Caffe, the rule overwrites p.grad: after step() it holds the update just applied.

    AdamW (netdsl, Loshchilov & Hutter's decoupled weight decay): Adam's update with the decay
    kept out of the gradient and applied to the weights directly, scaled like the step,
        w -= local_rate * (correction * m / (sqrt(v) + delta) + weight_decay * decay_mult * w)
    which is torch.optim.AdamW with lr = lr*lr_mult and weight_decay = weight_decay*decay_mult
    (a frozen param, lr_mult 0, stays frozen). Caffe's Adam instead adds the decay to the gradient
    (L2 regularisation), where Adam's per-weight normalisation rescales it: a weight with a small
    gradient then moves about local_rate towards zero per step whatever weight_decay is, while
    AdamW shrinks every weight by the same fraction local_rate*weight_decay*decay_mult.
    """

    def __init__(self, cfg: SolverConfig, params: list[Param], xp: Any = numpy):
        problems = validate(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.params, self.xp = cfg, list(params), xp
        self.type = resolved_type(cfg)
        self.decoupled = self.type == "AdamW"
        self.rule = {"SGD": self._sgd, "Nesterov": self._nesterov, "AdaGrad": self._adagrad,
                     "RMSProp": self._rmsprop, "AdaDelta": self._adadelta, "Adam": self._adam,
                     "AdamW": self._adam}[self.type]
        self.buffers = [
            _Buffers([xp.zeros_like(p.data) for _ in range(SOLVER_TYPES[self.type])],
                     xp.empty_like(p.data), xp.empty_like(p.data))
            for p in self.params]
        # (L2 norm, scale factor) when the last step clipped, for Caffe's "Gradient clipping" log.
        self.last_clip: tuple[float, float] | None = None

    def step(self, it: int) -> float:
        """Apply one update at iteration `it` (updates already applied); return the lr used."""
        cfg = self.cfg
        rate = learning_rate(cfg, it)
        self.last_clip = self._clip_gradients()
        for p, b in zip(self.params, self.buffers):
            diff = p.grad
            if cfg.iter_size != 1:
                diff *= 1.0 / cfg.iter_size  # the diffs were summed over iter_size passes
            local_rate = rate * p.lr_mult
            local_decay = cfg.weight_decay * p.decay_mult
            if local_decay and not self.decoupled:
                diff += self._decay(p.data, b.temp, local_decay)
            self.rule(diff, b, local_rate, it)
            if local_decay and self.decoupled:
                diff += self._decay(p.data, b.temp, local_rate * local_decay)
            p.data -= diff
        return rate

    def state_dict(self) -> dict[str, numpy.ndarray]:
        """The history blobs on the host, keyed history.<i> in Caffe's SolverState order."""
        return {key: self._to_host(h) for key, _, h in self._histories()}

    def load_state_dict(self, state) -> None:
        """Restore history blobs saved by state_dict (a dict or an np.load result), in place."""
        expected = list(self._histories())
        if set(state.keys()) != {key for key, _, _ in expected}:
            raise ValueError(f"solver state has {len(state.keys())} history blobs, "
                             f"{self.type} needs {len(expected)}")
        for key, p, h in expected:
            saved = state[key]
            if tuple(saved.shape) != tuple(h.shape):
                raise ValueError(f"solver state {key} has shape {tuple(saved.shape)}, "
                                 f"param '{p.name}' has shape {tuple(h.shape)}")
            h[...] = self.xp.asarray(saved)

    def _histories(self):
        # Caffe stores the first history blob of every param, then the second of every param.
        n = len(self.params)
        for k in range(SOLVER_TYPES[self.type]):
            for i, (p, b) in enumerate(zip(self.params, self.buffers)):
                yield f"history.{k * n + i}", p, b.history[k]

    def _to_host(self, a):
        # A cupy array needs the device-to-host copy; a numpy one is copied so it stays a snapshot.
        return self.xp.asnumpy(a) if hasattr(self.xp, "asnumpy") else a.copy()

    def _clip_gradients(self) -> tuple[float, float] | None:
        clip = self.cfg.clip_gradients
        if clip < 0:
            return None
        norm = math.sqrt(sum(float(self.xp.vdot(p.grad, p.grad)) for p in self.params))
        if norm <= clip:
            return None
        scale = clip / norm
        for p in self.params:
            p.grad *= scale
        return norm, scale

    def _decay(self, w, out, scale: float):
        """scale*w (L2) or scale*sign(w) (L1), written into out."""
        if self.cfg.regularization_type == "L1":
            self.xp.sign(w, out=out)
            out *= scale
        else:
            self.xp.multiply(w, scale, out=out)
        return out

    # The rules: each turns the diff into the update, in place, as Caffe's ComputeUpdateValue.

    def _sgd(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        # Caffe keeps the lr inside the history (v = momentum*v + local_rate*diff), so a change
        # of lr takes effect at once rather than being scaled into the momentum.
        (history,) = b.history
        diff *= local_rate
        history *= self.cfg.momentum
        history += diff
        diff[...] = history

    def _nesterov(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        momentum = self.cfg.momentum
        b.update[...] = b.history[0]  # the old history, to step back from
        self._sgd(diff, b, local_rate, it)
        # update = (1+momentum)*v_new - momentum*v_old
        diff *= 1.0 + momentum
        b.update *= -momentum
        diff += b.update

    def _adagrad(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        (history,) = b.history
        self.xp.multiply(diff, diff, out=b.update)
        history += b.update
        self._divide_by_rms(diff, diff, history, b.update, local_rate)

    def _rmsprop(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        (history,) = b.history
        self.xp.multiply(diff, diff, out=b.update)
        _decay_average(history, b.update, self.cfg.rms_decay)
        self._divide_by_rms(diff, diff, history, b.update, local_rate)

    def _adadelta(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        # history: squared diffs, then squared updates. Note the lr is applied after the update
        # history is taken, so the history holds lr-free updates.
        xp, cfg = self.xp, self.cfg
        grads, updates = b.history
        xp.multiply(diff, diff, out=b.update)
        _decay_average(grads, b.update, cfg.momentum)
        xp.add(updates, cfg.delta, out=b.update)
        xp.add(grads, cfg.delta, out=b.temp)
        b.update /= b.temp
        xp.sqrt(b.update, out=b.update)
        diff *= b.update
        xp.multiply(diff, diff, out=b.update)
        _decay_average(updates, b.update, cfg.momentum)
        diff *= local_rate

    def _adam(self, diff, b: _Buffers, local_rate: float, it: int) -> None:
        # Caffe folds both bias corrections into one factor (t = it+1) and adds delta to the
        # uncorrected sqrt(v), so delta acts sqrt(1-beta2^t) times larger than torch's eps.
        cfg = self.cfg
        beta1, beta2, t = cfg.momentum, cfg.momentum2, it + 1
        correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        m, v = b.history
        b.update[...] = diff
        _decay_average(m, b.update, beta1)
        self.xp.multiply(diff, diff, out=b.update)
        _decay_average(v, b.update, beta2)
        self._divide_by_rms(diff, m, v, b.update, local_rate * correction)

    def _divide_by_rms(self, out, numerator, history, scratch, scale: float) -> None:
        """out = scale * numerator / (sqrt(history) + delta)."""
        self.xp.sqrt(history, out=scratch)
        scratch += self.cfg.delta
        self.xp.divide(numerator, scratch, out=out)
        out *= scale


def _decay_average(average, x, decay: float) -> None:
    """average = decay*average + (1-decay)*x, in place; x is scratch and is overwritten."""
    x *= 1.0 - decay
    average *= decay
    average += x


def validate(cfg: SolverConfig) -> list[str]:
    """What Caffe would refuse in this solver config, as messages "<field>: <problem>".

    The field name leads each message so the caller can point at it. Not checked: that some train
    net is named, since a netdsl net file may carry its own solver.
    """
    problems: list[str] = []

    def problem(name: str, message: str) -> None:
        problems.append(f"{name}: {message}")

    if cfg.solver_type is not None:
        if cfg.solver_type not in LEGACY_SOLVER_TYPES:
            problem("solver_type", _unknown("solver_type", cfg.solver_type, LEGACY_SOLVER_TYPES))
        elif cfg.type != "SGD":
            problem("solver_type", "the old solver_type field (enum) and the new type field "
                                   "(string) cannot both be specified")
    kind = resolved_type(cfg)
    if kind not in SOLVER_TYPES:
        problem("type", _unknown("solver type", kind, SOLVER_TYPES))
    if kind in ("AdaGrad", "RMSProp") and cfg.momentum != 0:
        problem("momentum", f"momentum cannot be used with {kind}")
    if kind == "RMSProp" and not 0 <= cfg.rms_decay < 1:
        problem("rms_decay", "rms_decay should lie between 0 and 1")
    if cfg.regularization_type not in REGULARIZATION_TYPES:
        problem("regularization_type",
                _unknown("regularization type", cfg.regularization_type, REGULARIZATION_TYPES))

    policy = cfg.lr_policy
    if policy not in LR_POLICIES:
        problem("lr_policy", _unknown("learning rate policy", policy, LR_POLICIES))
    if policy in ("step", "sigmoid") and cfg.stepsize <= 0:
        problem("stepsize", f"lr_policy '{policy}' needs stepsize > 0")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and cfg.gamma < 0:
        problem("gamma", f"lr_policy '{policy}' needs gamma >= 0")

    # numbers the update multiplies by must be finite (a NaN lr makes every "good" snapshot NaN)
    for name in ("base_lr", "momentum", "weight_decay", "gamma", "power", "delta", "momentum2", "rms_decay",
                 "clip_gradients"):
        v = getattr(cfg, name, None)
        if v is not None and not math.isfinite(v):
            problem(name, f"{name} must be a finite number, got {v}")
    if math.isfinite(cfg.base_lr) and cfg.base_lr < 0:
        problem("base_lr", f"base_lr must be >= 0, got {cfg.base_lr}")
    if kind in ("AdaGrad", "RMSProp", "AdaDelta") and cfg.delta <= 0:       # 0/0 for a param with no gradient
        problem("delta", f"{kind} divides by sqrt(history) + delta: delta must be > 0, got {cfg.delta}")
    if kind in ("Adam", "AdamW") and cfg.delta < 0:
        problem("delta", f"{kind}'s delta must be >= 0, got {cfg.delta}")
    if kind in ("Adam", "AdamW") and not 0 <= cfg.momentum2 < 1:     # sqrt(1 - momentum2^t) is Adam's bias correction
        problem("momentum2", f"{kind}'s momentum2 (beta2) must be in [0, 1), got {cfg.momentum2}")
    if kind in ("Adam", "AdamW") and not 0 <= cfg.momentum < 1:
        problem("momentum", f"{kind}'s momentum (beta1) must be in [0, 1), got {cfg.momentum}")
    if cfg.max_iter < 0:
        problem("max_iter", f"max_iter must be >= 0, got {cfg.max_iter}")
    if cfg.display < 0:
        problem("display", f"display must be >= 0 (0: never), got {cfg.display}")
    if cfg.iter_size < 1:
        problem("iter_size", "iter_size must be at least 1")
    if cfg.average_loss < 1:
        problem("average_loss", "average_loss must be at least 1")
    train_nets = [n for n in ("net", "net_param", "train_net", "train_net_param")
                  if getattr(cfg, n) is not None]
    if len(train_nets) > 1:
        problem(train_nets[1], "only one train net may be given (found "
                               + ", ".join(train_nets) + ")")
    # Only a separate train net forbids extra test_iters: with a generic net (net, net_param,
    # or the net file itself) each extra test_iter tests that net once more.
    num_test_nets = len(cfg.test_net) + len(cfg.test_net_param)
    separate = cfg.net is None and cfg.net_param is None and (
        cfg.train_net is not None or cfg.train_net_param is not None)
    if len(cfg.test_iter) < num_test_nets or separate and len(cfg.test_iter) != num_test_nets:
        problem("test_iter", "test_iter must be specified for each test network")
    if cfg.test_state and len(cfg.test_state) != len(cfg.test_iter):
        problem("test_state", "test_state must be unspecified or specified once per test net")
    if cfg.test_iter and cfg.test_interval <= 0:
        problem("test_interval", "test_iter is given, so test_interval must be > 0")
    for name, allowed in (("snapshot_format", ("BINARYPROTO", "HDF5")),
                          ("solver_mode", ("CPU", "GPU"))):
        if getattr(cfg, name) not in allowed:
            problem(name, _unknown(name, getattr(cfg, name), allowed))
    return problems


def _unknown(what: str, value: str, known) -> str:
    """"unknown <what> 'x'; did you mean 'y'? (known: ...)", matching case-insensitively."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    hint = f"; did you mean '{by_lower[close[0]]}'?" if close else ""
    return f"unknown {what} '{value}'{hint} (known: {', '.join(known)})"
