"""LeNet on one GPU, side by side in one process: netdsl eager (CuPy), netdsl graph mode (one CUDA
graph per iteration), PyTorch eager, torch.compile (default) and torch.compile(mode="reduce-overhead").

Same everything: MNIST on the GPU (uint8 for netdsl, float32 for torch, gathered per batch on the
GPU), batch 64, the same batch order and initial weights, Caffe's LeNet solver (SGD, lr 0.01, inv
policy gamma 1e-4 power 0.75, momentum 0.9, weight decay 5e-4, biases lr x2), FP32 with TF32 off.

    NETDSL_DATA=/path/to/data python benchmarks/lenet_gpu.py [--iters 500] [--full 10000] [--skip-compile]

Prints microseconds per iteration and images/s for each, then the wall time and final test accuracy
(10,000 test digits) of Caffe's 10,000 LeNet iterations for netdsl graph mode and for PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUPY_TF32", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from netdsl.backend import get_backend
from netdsl.gpu.runtime import take_batches
from netdsl.train import Trainer

SOLVER = str(ROOT / "nets" / "lenet_solver.net")
BATCH = 64
RESULTS: dict = {}


def report(name, us, extra=""):
    RESULTS[name] = {"us_per_iter": us, "images_per_s": BATCH / us * 1e6}
    print(f"{name:<34} {us:9.1f} us/iter {BATCH / us * 1e6:12,.0f} images/s {extra}", flush=True)


def trainer(graph, out, max_iter=10000):
    return Trainer(SOLVER, get_backend("gpu"), out=out, progress=False, graph=graph, max_iter=max_iter)


# ------------------------------------------------------------------------------------ netdsl

def netdsl_eager(iters, out):
    tr = trainer("off", out)
    cp = tr.backend.xp

    def step():
        tr.net.zero_grad()
        tr.net.forward()
        tr.net.backward()
        tr.solver.step(tr.iter)
        tr.iter += 1
    for _ in range(10):
        step()
    cp.cuda.Device().synchronize()
    n = max(50, iters // 4)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    cp.cuda.Device().synchronize()
    report("netdsl eager (CuPy)", (time.perf_counter() - t0) / n * 1e6)


def netdsl_graph(iters, out):
    t0 = time.perf_counter()
    tr = trainer("on", out)
    setup = time.perf_counter() - t0
    step = tr.compiled
    step.train_chunk(0, 20)                    # compile (NVRTC), capture, warm up
    it = 20
    t0 = time.perf_counter()
    step.train_chunk(it, iters)
    report("netdsl graph (chunk of replays)", (time.perf_counter() - t0) / iters * 1e6,
           f"(setup {setup:.2f} s, {len(step.train.launches)} kernels/iter)")
    # replay only: no index upload, no loss read-back
    ex, prog = step.executor, step.train
    ex.replay(prog, 10)
    ex.sync()
    t0 = time.perf_counter()
    ex.replay(prog, iters)
    ex.sync()
    report("netdsl graph (replays only)", (time.perf_counter() - t0) / iters * 1e6)
    per_kernel(step)


def per_kernel(step):
    """Each kernel of the train program alone: 20 launches of it captured in a CUDA graph, timed
    with events (so no Python launch overhead), after the whole-iteration numbers above."""
    cp = step.xp
    ex = step.executor
    rows = []
    for fn, grid, block, args in ex.bound["train"]:
        with ex.stream:
            ex.stream.begin_capture()
            for _ in range(20):
                fn(grid, block, args)
            graph = ex.stream.end_capture()
            graph.launch(ex.stream)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(ex.stream)
            for _ in range(5):
                graph.launch(ex.stream)
            end.record(ex.stream)
        end.synchronize()
        rows.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / 100)
    total = sum(rows)
    print(f"  per kernel (us, in-graph, alone): sum {total:.1f}")
    for launch, us in zip(step.train.launches, rows):
        print(f"    {launch.symbol:<28} {us:7.2f}  {launch.note}")
    RESULTS["netdsl_kernels_us"] = {launch.symbol: round(us, 2) for launch, us in zip(step.train.launches, rows)}


def netdsl_full(out):
    """Caffe's 10,000 iterations in graph mode: pure training time, then the final test."""
    tr = trainer("on", out)          # kernels are in CuPy's cache from the runs above
    step = tr.compiled
    t0 = time.perf_counter()
    it = 0
    while it < 10000:
        n = min(1000, 10000 - it)
        losses = step.train_chunk(it, n)
        it += n
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    sums = step.test_sums(0, 100)
    test_s = time.perf_counter() - t1
    acc = sums["accuracy"] / 100
    RESULTS["netdsl_graph_10k"] = {"train_s": wall, "test_s": test_s, "accuracy": acc, "last_loss": float(losses[-1])}
    print(f"netdsl graph: 10,000 iterations in {wall:.2f} s (incl. first capture); test accuracy {acc:.4f} "
          f"(10,000 digits, {test_s * 1e3:.0f} ms); last loss {losses[-1]:.4f}", flush=True)


def netdsl_train_command(out):
    """`netdsl train nets/lenet_solver.net --device gpu` end to end (tests every 500, 2 snapshots)."""
    tr = trainer("on", out)
    t0 = time.perf_counter()
    res = tr.run()
    wall = time.perf_counter() - t0
    final = res.tests[-1]
    RESULTS["netdsl_train_command"] = {"wall_s": wall, **{k: v for k, v in final.items() if k != "kind"}}
    print(f"netdsl train (graph, Caffe schedule: 21 tests of 10,000 digits, 2 snapshots): {wall:.2f} s; "
          f"final accuracy {final['accuracy']:.4f}", flush=True)


# ------------------------------------------------------------------------------------- torch

def torch_setup():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = True
    return torch


def torch_data(torch, tr):
    """The netdsl run's data on the GPU as float tensors, and its first 10,000 batches' indices."""
    name = tr.net.plan.steps[0].node.name
    feed, test = tr.net.source(name), tr.tests[0].source(tr.tests[0].plan.steps[0].node.name)
    dev = "cuda"
    x = torch.tensor(np.asarray(feed.images), device=dev).float().mul_(0.00390625).unsqueeze(1)
    y = torch.tensor(np.asarray(feed.labels).astype(np.int64), device=dev)
    tx = torch.tensor(np.asarray(test.images), device=dev).float().mul_(0.00390625).unsqueeze(1)
    ty = torch.tensor(np.asarray(test.labels).astype(np.int64), device=dev)
    idx = torch.tensor(take_batches(tr.net, name, 10000), device=dev)
    return x, y, tx, ty, idx


def torch_model(torch, state):
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
                      nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10)).cuda()
    load_state(torch, m, state)
    return m


def caffe_lr(it):
    return 0.01 * (1 + 1e-4 * it) ** -0.75


def torch_eager_runner(torch, model, state, data):
    """Idiomatic PyTorch: torch.optim.SGD (foreach) with weight/bias groups and a LambdaLR."""
    x, y, _, _, idx = data
    F = torch.nn.functional
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    box = {}

    def reset():
        load_state(torch, model, state)
        box["opt"] = opt = torch.optim.SGD([{"params": weights, "lr": 0.01}, {"params": biases, "lr": 0.02}],
                                           lr=0.01, momentum=0.9, weight_decay=5e-4)
        box["sched"] = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 + 1e-4 * it) ** -0.75)

    def step(i):
        b = idx[i]
        loss = F.cross_entropy(model(x[b]), y[b])
        box["opt"].zero_grad(set_to_none=True)
        loss.backward()
        box["opt"].step()
        box["sched"].step()
        return loss
    reset()
    return step, reset


def caffe_sgd_module(torch, model):
    """Caffe's SGD update (lr on the device from an iteration tensor) as a module whose momentum
    and iteration are buffers: static inputs, so reduce-overhead may capture their mutation."""
    class CaffeSGD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.mults = [2.0 if n.endswith("bias") else 1.0 for n, _ in model.named_parameters()]
            for i, p in enumerate(model.parameters()):
                self.register_buffer(f"h{i}", torch.zeros_like(p))
            self.register_buffer("it", torch.zeros((), device="cuda"))

        def forward(self, grads):
            rate = 0.01 * (1 + 1e-4 * self.it) ** -0.75
            for i, (p, g, m) in enumerate(zip(self.model.parameters(), grads, self.mults)):
                h = getattr(self, f"h{i}")
                h.mul_(0.9).add_((g + 5e-4 * p) * (rate * m))
                p.sub_(h)
            self.it.add_(1)

        def reset(self):
            for b in self.buffers():
                b.zero_()
    return CaffeSGD()


def torch_compiled_runner(torch, model, state, data, mode):
    """torch.compile of the forward+loss (its backward through AOTAutograd) and of the Caffe SGD
    update module (no recompiles: the lr is a device tensor)."""
    x, y, _, _, idx = data
    F = torch.nn.functional
    params = list(model.parameters())
    opt = caffe_sgd_module(torch, model)

    def fwd(b):
        return F.cross_entropy(model(x[b]), y[b])

    kw = {} if mode == "default" else {"mode": mode}
    fwd_c = torch.compile(fwd, **kw)
    upd_c = torch.compile(opt, **kw)

    def reset():
        with torch.no_grad():
            load_state(torch, model, state)
            opt.reset()

    def step(i):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss = fwd_c(idx[i])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            upd_c(grads)
        return loss
    return step, reset


def torch_graph_runner(torch, model, state, data):
    """PyTorch's strongest hand: the whole step (gather, forward, backward, Caffe SGD with the lr
    on the device) captured once with torch.cuda.graph and replayed; cuDNN and cuBLAS inside."""
    x, y, _, _, idx = data
    F = torch.nn.functional
    params = list(model.parameters())
    opt = caffe_sgd_module(torch, model)
    at = torch.zeros(1, dtype=torch.long, device="cuda")        # the iteration, indexing idx

    def body():
        b = torch.index_select(idx, 0, at).squeeze(0)
        loss = F.cross_entropy(model(x[b]), y[b])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            opt(grads)
            at.add_(1)
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                # warm-up off the capture stream, as the docs say
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = body()

    def reset():
        with torch.no_grad():
            load_state(torch, model, state)
            opt.reset()
            at.zero_()

    def step(i):
        graph.replay()
        return loss
    reset()
    return step, reset


def load_state(torch, model, state):
    with torch.no_grad():
        for i, name in ((0, "conv1"), (2, "conv2"), (5, "ip1"), (7, "ip2")):
            model[i].weight.copy_(torch.tensor(state[f"{name}/0"]))
            model[i].bias.copy_(torch.tensor(state[f"{name}/1"]))


def torch_accuracy(torch, model, data):
    _, _, tx, ty, _ = data
    with torch.no_grad():
        correct = sum(int((model(tx[i:i + 1000]).argmax(1) == ty[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    return correct / 10000


def torch_bench(name, torch, make, state, data, iters, full):
    model = torch_model(torch, state)
    step, reset = make(model)
    t0 = time.perf_counter()
    for i in range(30):                         # compile / autotune / capture
        step(i)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(30, 30 + iters):
        step(i)
    torch.cuda.synchronize()
    report(name, (time.perf_counter() - t0) / iters * 1e6, f"(warm-up incl. compile {warm:.1f} s)")
    if full:
        reset()                                 # the initial weights again; compiled code kept
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(10000):
            loss = step(i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        model.eval()
        acc = torch_accuracy(torch, model, data)
        model.train()
        RESULTS[name + " 10k"] = {"train_s": wall, "accuracy": acc, "last_loss": float(loss.detach())}
        print(f"{name}: 10,000 iterations in {wall:.2f} s; test accuracy {acc:.4f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="skip the two torch.compile variants")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="lenet_gpu_")
    cp = get_backend("gpu").xp
    dev = cp.cuda.runtime.getDeviceProperties(0)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    RESULTS["device"] = name
    RESULTS["date"] = time.strftime("%Y-%m-%d")
    print(f"device: {name}; CuPy {cp.__version__}; CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}; "
          f"batch {BATCH}; TF32 off", flush=True)
    parts = [("netdsl eager", lambda: netdsl_eager(args.iters, tmp + "/e")),
             ("netdsl graph", lambda: netdsl_graph(args.iters, tmp + "/g")),
             ("netdsl full", lambda: netdsl_full(tmp + "/f")),
             ("netdsl train", lambda: netdsl_train_command(tmp + "/t"))]
    for label, fn in parts:
        try:
            fn()
        except Exception:
            print(f"{label}: FAILED", flush=True)
            traceback.print_exc()
    if not args.skip_torch:
        try:
            torch = torch_setup()
            print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}", flush=True)
            ref = trainer("off", tmp + "/ref")
            state, data = ref.net.state(), torch_data(torch, ref)
            variants = [("PyTorch eager", lambda m: torch_eager_runner(torch, m, state, data), True)]
            if not args.skip_compile:
                variants += [("torch.compile default",
                              lambda m: torch_compiled_runner(torch, m, state, data, "default"), False),
                             ("torch.compile reduce-overhead",
                              lambda m: torch_compiled_runner(torch, m, state, data, "reduce-overhead"), True)]
            variants += [("PyTorch + manual CUDA graph", lambda m: torch_graph_runner(torch, m, state, data), True)]
            for label, make, full in variants:
                try:
                    torch_bench(label, torch, make, state, data, args.iters, full)
                except Exception:
                    print(f"{label}: FAILED", flush=True)
                    traceback.print_exc()
        except Exception:
            traceback.print_exc()
    base = RESULTS.get("netdsl graph (chunk of replays)", {}).get("us_per_iter")
    if base:
        print("\nratios (time / netdsl graph):")
        for k, v in RESULTS.items():
            if isinstance(v, dict) and "us_per_iter" in v:
                print(f"  {k:<34} {v['us_per_iter'] / base:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
