"""The recurrent sample (nets/lstm_sequence.net, docs/recurrent.md): an LSTM trained from Python with
netdsl's Solver to echo each input value K steps later, within sequences that restart at random
(cont = 0). No memoryless predictor can beat predicting 0 (x_{t-K} is independent of x_t); the
LSTM gets far below that, and the same net with its memory cut (cont = 0 at every step) cannot."""
from __future__ import annotations

import time

import numpy as np

import netdsl
from netdsl.solver import Solver, SolverConfig

NET = "nets/lstm_sequence.net"
T, N, K = 12, 16, 3          # the net's time steps and streams; the echo delay


def batch(rng, restart=0.1):
    """x ~ U(-1, 1); cont = 0 at t = 0 and at random restarts; target_t = x_{t-K} within the
    current sequence, else 0."""
    x = rng.uniform(-1, 1, (T, N, 1)).astype(np.float32)
    cont = (rng.uniform(size=(T, N)) >= restart).astype(np.float32)
    cont[0] = 0
    target = np.zeros_like(x)
    for n in range(N):
        start = 0
        for t in range(T):
            if cont[t, n] == 0:
                start = t
            if t - K >= start:
                target[t, n] = x[t - K, n]
    return dict(x=x, cont=cont, target=target)


def train(iters=400, cut_memory=False, seed=0):
    net = netdsl.load(NET, seed=seed)
    solver = Solver(SolverConfig(base_lr=0.01, type="Adam", momentum=0.9), net.learnable)
    rng = np.random.default_rng(seed)
    losses = []
    for it in range(iters):
        feed = batch(rng)
        if cut_memory:
            feed["cont"][:] = 0
        net.zero_grad()
        losses.append(float(net.forward(**feed)["loss"]))
        net.backward()
        solver.step(it)
    return net, losses


def evaluate(net, cut_memory=False, batches=20):
    rng = np.random.default_rng(12345)
    losses, baseline = [], []
    for _ in range(batches):
        feed = batch(rng)
        baseline.append(float((feed["target"] ** 2).sum()) / (2 * T))   # EuclideanLoss of predicting 0
        if cut_memory:
            feed["cont"][:] = 0
        losses.append(float(net.forward(**feed)["loss"]))
    return float(np.mean(losses)), float(np.mean(baseline))


def test_lstm_learns_a_task_that_needs_memory():
    start = time.perf_counter()
    net, losses = train()
    loss, baseline = evaluate(net)
    seconds = time.perf_counter() - start
    print(f"\nLSTM echo-{K}: loss {np.mean(losses[:20]):.3f} (first 20 iterations) -> {loss:.4f} held out; "
          f"no-memory baseline {baseline:.3f}; {seconds:.1f} s")
    assert loss < 0.05 * baseline
    assert seconds < 60


def test_lstm_without_memory_stays_at_the_baseline():
    net, _ = train(cut_memory=True)
    loss, baseline = evaluate(net, cut_memory=True)
    print(f"\nLSTM with cont = 0 everywhere: {loss:.3f} held out; baseline {baseline:.3f}")
    assert loss > 0.8 * baseline


def test_lstm_sample_net_layout():
    net = netdsl.load(NET, phase="test")
    assert [p.data.shape for p in net.params["lstm"]] == [(64, 1), (64,), (64, 16)]   # W_xc, b_c, W_hc
    net.forward(**batch(np.random.default_rng(0)))
    assert net.blobs["h"].data.shape == (T, N, 16) and net.blobs["pred"].data.shape == (T, N, 1)
