"""Tests for the solver stage: lr policies, update rules, decay, clipping, state, validation."""
import io
from dataclasses import dataclass

import numpy as np
import pytest

from netdsl.solver import Solver, SolverConfig, learning_rate, resolved_type, validate


@dataclass
class P:
    data: np.ndarray
    grad: np.ndarray
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    name: str = "w"


def param(values, **kw) -> P:
    data = np.array(values, dtype=np.float64)
    return P(data, np.zeros_like(data), **kw)


def run(cfg, grads, w=(1.0, -2.0), **kw):
    """Apply one step per gradient to a single param; return the weights after each step."""
    p = param(w, **kw)
    solver = Solver(cfg, [p])
    seen = []
    for it, g in enumerate(grads):
        p.grad[...] = g
        solver.step(it)
        seen.append(p.data.copy())
    return seen


# ---------------------------------------------------------------------------------------------
# Learning-rate policies

def test_lenet_inv_policy_matches_caffe_log():
    cfg = SolverConfig(base_lr=0.01, lr_policy="inv", gamma=0.0001, power=0.75)
    assert f"{learning_rate(cfg, 100):g}" == "0.00992565"  # "Iteration 100, lr = 0.00992565"


POLICY_CASES = [
    # (config, [(iteration, expected lr)]) with base_lr 0.1
    (dict(lr_policy="fixed"), [(0, 0.1), (12345, 0.1)]),
    (dict(lr_policy="step", gamma=0.1, stepsize=10),
     [(0, 0.1), (9, 0.1), (10, 0.01), (19, 0.01), (20, 0.001)]),
    (dict(lr_policy="exp", gamma=0.9), [(0, 0.1), (1, 0.09), (3, 0.0729)]),
    (dict(lr_policy="inv", gamma=0.5, power=2.0), [(0, 0.1), (2, 0.025), (6, 0.00625)]),
    (dict(lr_policy="multistep", gamma=0.5, stepvalue=[5, 8]),
     [(0, 0.1), (4, 0.1), (5, 0.05), (7, 0.05), (8, 0.025), (1000, 0.025)]),
    # Caffe advances one step per iteration at most: a repeated stepvalue lands one later.
    (dict(lr_policy="multistep", gamma=0.5, stepvalue=[5, 5]), [(4, 0.1), (5, 0.05), (6, 0.025)]),
    (dict(lr_policy="poly", power=2.0, max_iter=10),
     [(0, 0.1), (5, 0.025), (9, 0.001), (10, 0.0)]),
    (dict(lr_policy="poly", power=1.0, max_iter=4), [(1, 0.075), (4, 0.0)]),
    # sigmoid: base / (1 + exp(-gamma * (iter - stepsize)))
    (dict(lr_policy="sigmoid", gamma=0.5, stepsize=10),
     [(10, 0.05), (0, 0.1 / (1 + np.exp(5.0))), (20, 0.1 / (1 + np.exp(-5.0))),
      (100000, 0.1)]),
]


@pytest.mark.parametrize("kw,expected", POLICY_CASES)
def test_lr_policies(kw, expected):
    cfg = SolverConfig(base_lr=0.1, **kw)
    for it, lr in expected:
        assert learning_rate(cfg, it) == pytest.approx(lr, rel=1e-12, abs=1e-300), it


def test_step_returns_the_rate_it_used():
    cfg = SolverConfig(base_lr=1.0, lr_policy="step", gamma=0.5, stepsize=2)
    p = param([0.0])
    solver = Solver(cfg, [p])
    assert [solver.step(it) for it in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


# ---------------------------------------------------------------------------------------------
# Update rules: w = [1, -2], grads [0.5, -1] then [0.25, 2], lr 0.1

G = [np.array([0.5, -1.0]), np.array([0.25, 2.0])]

RULE_CASES = [
    # SGD, momentum 0.9: v = 0.1*g = [0.05, -0.1]; then v = 0.9*v + 0.1*g2 = [0.07, 0.11]
    ("SGD", dict(momentum=0.9), [[0.95, -1.9], [0.88, -2.01]]),
    # Nesterov: update = 1.9*v_new - 0.9*v_old: [0.095, -0.19], then [0.088, 0.299]
    ("Nesterov", dict(momentum=0.9), [[0.905, -1.81], [0.817, -2.109]]),
    # AdaGrad, delta 0.5: h = g^2, update = 0.1*g/(sqrt(h) + 0.5) = [0.05/1, -0.1/1.5]
    ("AdaGrad", dict(delta=0.5),
     [[0.95, -1.933333333333], [0.92639320225, -2.00643093239]]),
    # RMSProp, rms_decay 0.9, delta 0.5: h = 0.1*g^2, update = 0.1*g/(sqrt(h) + 0.5)
    ("RMSProp", dict(rms_decay=0.9, delta=0.5),
     [[0.924025307335, -1.87748517734], [0.88668725644, -2.04415184401]]),
    # AdaDelta, momentum 0.9, delta 0.5: h = 0.1*g^2, u = g*sqrt((0 + 0.5)/(h + 0.5)),
    # update = 0.1*u, and the update history takes 0.1*u^2 (without the lr)
    ("AdaDelta", dict(momentum=0.9, delta=0.5),
     [[0.951204996353, -1.90871290708], [0.926322066589, -2.06223496924]]),
    # Adam, betas 0.9/0.999, delta 0.01: m = 0.1*g, v = 0.001*g^2,
    # update = 0.1 * sqrt(1-0.999)/(1-0.9) * m/(sqrt(v) + 0.01)
    ("Adam", dict(momentum=0.9, momentum2=0.999, delta=0.01),
     [[0.938742588672, -1.92402530734], [0.879213078901, -1.95609926393]]),
    # AdamW without decay is Adam
    ("AdamW", dict(momentum=0.9, momentum2=0.999, delta=0.01),
     [[0.938742588672, -1.92402530734], [0.879213078901, -1.95609926393]]),
]


@pytest.mark.parametrize("kind,kw,expected", RULE_CASES)
def test_rules_one_and_two_steps(kind, kw, expected):
    seen = run(SolverConfig(type=kind, base_lr=0.1, **kw), G)
    np.testing.assert_allclose(seen, expected, rtol=1e-10)


def test_rule_overwrites_grad_with_the_update_like_caffe_diff():
    p = param([1.0, -2.0])
    p.grad[...] = G[0]
    Solver(SolverConfig(base_lr=0.1, momentum=0.9), [p]).step(0)
    np.testing.assert_allclose(p.grad, [0.05, -0.1])


def test_params_are_updated_in_place():
    flat = np.array([1.0, -2.0, 3.0])  # a flat buffer, as a memory plan would hold
    a = P(flat[:2], np.array([1.0, 1.0]))
    b = P(flat[2:], np.array([1.0]))
    Solver(SolverConfig(base_lr=0.5), [a, b]).step(0)
    np.testing.assert_allclose(flat, [0.5, -2.5, 2.5])


@pytest.mark.parametrize("kind,kw", [case[:2] for case in RULE_CASES])
def test_float32_stays_float32(kind, kw):
    p = P(np.ones(3, np.float32), np.full(3, 0.5, np.float32))
    solver = Solver(SolverConfig(type=kind, base_lr=0.1, weight_decay=0.1, **kw), [p])
    solver.step(0)
    assert p.data.dtype == np.float32
    assert all(h.dtype == np.float32 for h in solver.state_dict().values())


# ---------------------------------------------------------------------------------------------
# Weight decay, lr_mult, decay_mult

def test_l2_and_l1_decay():
    zero = [np.zeros(2)]
    l2 = run(SolverConfig(base_lr=0.1, weight_decay=0.1), zero)[0]
    l1 = run(SolverConfig(base_lr=0.1, weight_decay=0.1, regularization_type="L1"), zero)[0]
    np.testing.assert_allclose(l2, [1 - 0.01 * 1, -2 + 0.01 * 2])  # w -= lr * wd * w
    np.testing.assert_allclose(l1, [1 - 0.01, -2 + 0.01])  # w -= lr * wd * sign(w)


def test_lr_mult_and_decay_mult():
    cfg = SolverConfig(base_lr=0.1, weight_decay=0.1)
    # local_rate 0.3, local_decay 0.2: w -= 0.3 * (g + 0.2*w)
    w = run(cfg, [np.array([1.0, 1.0])], lr_mult=3.0, decay_mult=2.0)[0]
    np.testing.assert_allclose(w, [1 - 0.3 * 1.2, -2 - 0.3 * (1 - 0.4)])
    assert run(cfg, [np.zeros(2)], decay_mult=0.0)[0].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam",
                                  "AdamW"])
def test_lr_mult_zero_freezes(kind):
    cfg = SolverConfig(type=kind, base_lr=0.1, weight_decay=0.1)
    assert run(cfg, G, lr_mult=0.0)[-1].tolist() == [1.0, -2.0]


def test_adamw_decouples_decay_from_the_gradient():
    kw = dict(base_lr=0.1, momentum=0.9, momentum2=0.999, delta=0.01, weight_decay=0.1)
    adamw = run(SolverConfig(type="AdamW", **kw), G[:1])[0]
    adam = run(SolverConfig(type="Adam", **kw), G[:1])[0]
    # AdamW: Adam's step on the raw gradient (above), plus lr * wd * w
    np.testing.assert_allclose(adamw, [0.938742588672 - 0.01, -1.92402530734 + 0.02], rtol=1e-10)
    # Adam: the decay joins the gradient, g + 0.1*w = [0.6, -1.2], and is normalised with it
    corr = np.sqrt(1 - 0.999) / (1 - 0.9)
    g = np.array([0.6, -1.2])
    np.testing.assert_allclose(adam, [1, -2] - 0.1 * corr * 0.1 * g / (np.sqrt(0.001) * abs(g)
                                                                       + 0.01), rtol=1e-10)


def test_adam_l2_decay_is_normalised_away_but_adamw_decay_is_not():
    kw = dict(base_lr=0.1, momentum=0.9, momentum2=0.999, weight_decay=0.01)
    zero = [np.zeros(2)]
    # With no gradient Adam's decay step is lr*sign(w), whatever weight_decay is...
    np.testing.assert_allclose(run(SolverConfig(type="Adam", **kw), zero)[0], [0.9, -1.9],
                               rtol=1e-5)
    # ...while AdamW shrinks w by lr*weight_decay.
    np.testing.assert_allclose(run(SolverConfig(type="AdamW", **kw), zero)[0], [0.999, -1.998])


# ---------------------------------------------------------------------------------------------
# Clipping and iter_size

def test_clip_by_global_norm():
    a, b = P(np.zeros(2), np.array([3.0, 0.0])), P(np.zeros(1), np.array([4.0]))
    solver = Solver(SolverConfig(base_lr=1.0, clip_gradients=1.0), [a, b])
    solver.step(0)
    np.testing.assert_allclose(np.concatenate([a.data, b.data]), [-0.6, 0.0, -0.8])
    assert solver.last_clip == pytest.approx((5.0, 0.2))


@pytest.mark.parametrize("clip", [-1.0, 5.0, 6.0])
def test_no_clip_when_disabled_or_within_bound(clip):
    p = P(np.zeros(2), np.array([3.0, 4.0]))
    solver = Solver(SolverConfig(base_lr=1.0, clip_gradients=clip), [p])
    solver.step(0)
    assert p.data.tolist() == [-3.0, -4.0] and solver.last_clip is None


def test_iter_size_scales_the_summed_diff_after_clipping():
    p = P(np.zeros(2), np.array([2.0, 4.0]))
    Solver(SolverConfig(base_lr=1.0, iter_size=2), [p]).step(0)
    assert p.data.tolist() == [-1.0, -2.0]
    # Caffe clips the summed diff (norm 5 -> 1), then divides by iter_size.
    p = P(np.zeros(2), np.array([3.0, 4.0]))
    Solver(SolverConfig(base_lr=1.0, iter_size=2, clip_gradients=1.0), [p]).step(0)
    np.testing.assert_allclose(p.data, [-0.3, -0.4])


# ---------------------------------------------------------------------------------------------
# Solver state

def _params(rng):
    return [P(rng.standard_normal((3, 2)), np.zeros((3, 2)), name="conv1_w"),
            P(rng.standard_normal(2), np.zeros(2), lr_mult=2.0, decay_mult=0.0, name="conv1_b")]


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam",
                                  "AdamW"])
def test_state_dict_round_trip_continues_bit_identically(kind):
    cfg = SolverConfig(type=kind, base_lr=0.01, lr_policy="inv", gamma=0.1, power=0.75,
                       momentum=0.0 if kind in ("AdaGrad", "RMSProp") else 0.9,
                       weight_decay=0.01)
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(g.shape) for g in (np.zeros((3, 2)), np.zeros(2))]
             for _ in range(6)]
    params = _params(np.random.default_rng(1))
    solver = Solver(cfg, params)

    def step(solver, params, it):
        for p, g in zip(params, grads[it]):
            p.grad[...] = g
        solver.step(it)

    for it in range(3):
        step(solver, params, it)
    buf = io.BytesIO()
    np.savez(buf, **solver.state_dict())
    buf.seek(0)
    resumed_params = [P(p.data.copy(), np.zeros_like(p.grad), p.lr_mult, p.decay_mult, p.name)
                      for p in params]
    resumed = Solver(cfg, resumed_params)
    with np.load(buf, allow_pickle=False) as state:
        histories = 2 if kind in ("AdaDelta", "Adam", "AdamW") else 1
        assert sorted(state.files) == [f"history.{i}" for i in range(2 * histories)]
        resumed.load_state_dict(state)
    for it in range(3, 6):
        step(solver, params, it)
        step(resumed, resumed_params, it)
    for p, q in zip(params, resumed_params):
        assert np.array_equal(p.data, q.data)


def test_state_dict_uses_caffe_history_order():
    params = _params(np.random.default_rng(0))
    state = Solver(SolverConfig(type="Adam"), params).state_dict()
    # first history blob of every param, then the second of every param
    assert [state[k].shape for k in sorted(state)] == [(3, 2), (2,), (3, 2), (2,)]


def test_load_state_dict_rejects_a_mismatch():
    params = _params(np.random.default_rng(0))
    sgd_state = Solver(SolverConfig(), params).state_dict()
    with pytest.raises(ValueError, match="needs 4"):
        Solver(SolverConfig(type="Adam"), params).load_state_dict(sgd_state)
    sgd_state["history.1"] = np.zeros(3)
    with pytest.raises(ValueError, match="conv1_b"):
        Solver(SolverConfig(), params).load_state_dict(sgd_state)


# ---------------------------------------------------------------------------------------------
# Validation

def test_default_and_real_caffe_configs_are_valid():
    assert validate(SolverConfig()) == []
    lenet = SolverConfig(net="lenet_train_test.prototxt", test_iter=[100], test_interval=500,
                         base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
                         gamma=0.0001, power=0.75, display=100, max_iter=10000, snapshot=5000,
                         snapshot_prefix="lenet", solver_mode="GPU")
    assert validate(lenet) == []


@pytest.mark.parametrize("kw,expected", [
    (dict(type="adam"), "type: unknown solver type 'adam'; did you mean 'Adam'?"),
    (dict(type="sgd"), "did you mean 'SGD'?"),
    (dict(lr_policy="stpe", stepsize=1), "lr_policy: unknown learning rate policy 'stpe'; "
                                         "did you mean 'step'?"),
    (dict(regularization_type="l1"), "did you mean 'L1'?"),
    (dict(lr_policy="step"), "stepsize: lr_policy 'step' needs stepsize > 0"),
    (dict(lr_policy="sigmoid", gamma=-1.0, stepsize=5), "gamma: lr_policy 'sigmoid' needs gamma"),
    (dict(type="AdaGrad", momentum=0.9), "momentum: momentum cannot be used with AdaGrad"),
    (dict(type="RMSProp", rms_decay=1.0), "rms_decay: rms_decay should lie between 0 and 1"),
    (dict(iter_size=0), "iter_size:"),
    (dict(average_loss=0), "average_loss:"),
    (dict(net="a", train_net="b"), "train_net: only one train net may be given"),
    (dict(test_iter=[100]), "test_interval: "),
    (dict(train_net="a", test_net=["b"], test_iter=[1, 2], test_interval=1), "test_iter: "),
    (dict(test_net=["b", "c"], test_iter=[1], test_interval=1), "test_iter: "),
    (dict(solver_type="ADAMW"), "solver_type: unknown solver_type 'ADAMW'"),
    (dict(solver_type="ADAM", type="Adam"), "solver_type: the old solver_type field"),
    (dict(solver_mode="gpu"), "did you mean 'GPU'?"),
])
def test_validate_reports_problems(kw, expected):
    problems = validate(SolverConfig(**kw))
    assert any(expected in p for p in problems), problems
    with pytest.raises(ValueError):
        Solver(SolverConfig(**kw), [])


def test_generic_net_may_be_tested_several_times():
    assert validate(SolverConfig(net="a", test_iter=[1, 2], test_interval=1)) == []


def test_legacy_solver_type_is_upgraded():
    cfg = SolverConfig(solver_type="NESTEROV")
    assert resolved_type(cfg) == "Nesterov" and Solver(cfg, []).type == "Nesterov"


# ---------------------------------------------------------------------------------------------
# Oracles: torch.optim (several steps, float64), and cupy parity

TORCH_CASES = [
    # (type, config, torch optimizer name, torch kwargs); Caffe keeps lr inside SGD's history,
    # which equals torch only at a fixed lr. delta 0 makes Caffe's and torch's eps placement moot.
    ("SGD", dict(momentum=0.9, weight_decay=0.01), "SGD",
     dict(momentum=0.9, weight_decay=0.01)),
    ("Nesterov", dict(momentum=0.9, weight_decay=0.01), "SGD",
     dict(momentum=0.9, weight_decay=0.01, nesterov=True)),
    ("AdaGrad", dict(delta=1e-3), "Adagrad", dict(eps=1e-3)),
    ("RMSProp", dict(rms_decay=0.9, delta=1e-3), "RMSprop", dict(alpha=0.9, eps=1e-3)),
    ("AdaDelta", dict(momentum=0.95, delta=1e-6), "Adadelta", dict(rho=0.95, eps=1e-6)),
    ("Adam", dict(momentum=0.9, momentum2=0.999, delta=0.0), "Adam",
     dict(betas=(0.9, 0.999), eps=0.0)),
    ("AdamW", dict(momentum=0.9, momentum2=0.99, delta=0.0, weight_decay=0.1), "AdamW",
     dict(betas=(0.9, 0.99), eps=0.0, weight_decay=0.1)),
]


@pytest.mark.parametrize("kind,kw,opt,opt_kw", TORCH_CASES)
def test_matches_torch_optim(kind, kw, opt, opt_kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = _params(rng)
    for p in params:
        p.lr_mult = p.decay_mult = 1.0
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    optimizer = getattr(torch.optim, opt)(tparams, lr=0.05, **opt_kw)
    solver = Solver(SolverConfig(type=kind, base_lr=0.05, **kw), params)
    for it in range(5):
        for p, t in zip(params, tparams):
            g = rng.standard_normal(p.data.shape)
            p.grad[...] = g
            t.grad = torch.tensor(g)
        solver.step(it)
        optimizer.step()
        for p, t in zip(params, tparams):
            np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    for kind, kw, _ in RULE_CASES:
        cfg = SolverConfig(type=kind, base_lr=0.1, weight_decay=0.1, clip_gradients=1.0,
                           iter_size=2, **kw)
        host = param([1.0, -2.0])
        dev = P(cupy.asarray(host.data), cupy.zeros(2))
        solvers = Solver(cfg, [host]), Solver(cfg, [dev], xp=cupy)
        for it, g in enumerate(G):
            host.grad[...] = g
            dev.grad[...] = cupy.asarray(g)
            for s in solvers:
                s.step(it)
        np.testing.assert_allclose(cupy.asnumpy(dev.data), host.data, rtol=1e-12)
        state = solvers[1].state_dict()
        assert all(type(a) is np.ndarray for a in state.values())
