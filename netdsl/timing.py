"""Time: per-layer forward and backward milliseconds, like `caffe time`."""
from __future__ import annotations

import time

import numpy as np

from .errors import NetdslError
from .executor import Net, build_net


def time_net(model: str, phase: str, iterations: int, backend, data_dir=None, kernels: str = "compiled",
             threads: int | None = None) -> dict:
    """What `netdsl train` runs (on the CPU: the same kernels and threads), timed per layer. With
    compiled kernels a ReLU fused into the GEMM before it shows no forward time of its own."""
    if iterations < 1:
        raise NetdslError("E0000", "--iterations must be at least 1", help="e.g. --iterations 50")
    net = build_net(model, phase, backend, data_dir=data_dir)
    from .cpu import use_kernels
    _, kernels_used = use_kernels(backend, kernels, threads, net)
    plan = net.plan
    inputs = {i.split("#")[0]: np.random.default_rng(0).standard_normal(plan.blob_shapes[i]).astype(np.float32)
              for i in plan.inputs}
    steps = plan.steps
    fwd = np.zeros(len(steps))
    bwd = np.zeros(len(steps))
    _run(net, inputs, None, None, backend)                 # warm-up: caches, allocator, data
    t0 = time.perf_counter()
    for _ in range(iterations):
        _run(net, inputs, fwd, bwd, backend)
    total = time.perf_counter() - t0
    return {"net": plan.name, "phase": phase.lower(), "device": backend.name, "iterations": iterations,
            "layers": [{"name": s.node.name, "type": s.layer.type, "forward_ms": 1e3 * f / iterations,
                        "backward_ms": 1e3 * b / iterations} for s, f, b in zip(steps, fwd, bwd)],
            "forward_ms": 1e3 * fwd.sum() / iterations, "backward_ms": 1e3 * bwd.sum() / iterations,
            "iteration_ms": 1e3 * total / iterations, "kernels": kernels_used}


def _run(net: Net, inputs, fwd, bwd, backend) -> None:
    """One forward and backward, timing each layer (synchronising the device around it)."""
    hooks = _Timer(fwd, bwd, backend) if fwd is not None else None
    net.forward(_hooks=hooks, **inputs)
    net.zero_grad()
    net.backward(_hooks=hooks)


class _Timer:
    def __init__(self, fwd, bwd, backend):
        self.fwd, self.bwd, self.backend = fwd, bwd, backend
        self.t = 0.0

    def before(self, i: int) -> None:
        self.backend.sync()
        self.t = time.perf_counter()

    def after(self, i: int, backward: bool) -> None:
        self.backend.sync()
        (self.bwd if backward else self.fwd)[i] += time.perf_counter() - self.t


def render_timing(r: dict) -> str:
    w = max(len(x["name"]) for x in r["layers"]) if r["layers"] else 5
    out = [f"timing '{r['net']}' ({r['phase']}, {r['device']}), average over {r['iterations']} iterations:"]
    out += [r["kernels"]] if r.get("kernels") else []
    out.append(f"{'layer':<{w}}  {'type':<16} {'forward ms':>11} {'backward ms':>12}")
    for x in r["layers"]:
        out.append(f"{x['name']:<{w}}  {x['type']:<16} {x['forward_ms']:>11.3f} {x['backward_ms']:>12.3f}")
    out.append(f"Average Forward pass: {r['forward_ms']:.3f} ms.")
    out.append(f"Average Backward pass: {r['backward_ms']:.3f} ms.")
    out.append(f"Average Forward-Backward: {r['iteration_ms']:.3f} ms.")
    return "\n".join(out)
