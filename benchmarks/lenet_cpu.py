"""CPU training speed, netdsl side by side with PyTorch in one run: Caffe's LeNet (the default),
Caffe's cifar10_quick and nets/rpn.net.

Both sides run the same net with the same solver settings (Caffe's SGD: momentum, weight decay,
biases at lr_mult 2, the solver's lr policy), threads, float32 and initial weights (PyTorch's
model is given the netdsl net's). Reports ms per iteration (median of several timed blocks, the
frameworks alternating block by block, so drift hits all alike) and netdsl's ratio to each PyTorch peer.
netdsl runs with its compiled CPU kernels (Numba) and with the NumPy layers (--cpu-kernels);
PyTorch eager, with its model and loss torch.compile'd, and with the optimizer's step compiled too
(--torch).

What one timed iteration contains, on each side:
  lenet          nets/lenet_solver.net (batch 64; inv policy). netdsl: its MNIST layer (a shuffled
                 batch from the MNIST arrays in memory, scaled by 1/256), forward, backward, update.
                 PyTorch: a shuffled batch indexed from MNIST scaled once up front, forward,
                 cross-entropy, backward, update.
  cifar10_quick  Caffe's cifar10_quick (batch 100; its solver: base_lr 0.001, momentum 0.9, weight
                 decay 0.004, fixed), as benchmarks/distributed_cpu.py's CIFAR10_QUICK with an Input
                 layer for its DummyData. Both sides read the same batches (8 batches of N(0, 50^2)
                 pixels and random labels, in turn, from the same arrays): forward, backward, update.
  rpn            nets/rpn_solver.net (one 224x224 scene; step policy). netdsl: the whole train net:
                 DigitScenes draws a scene, the convolutions, AnchorTarget (NumPy), the softmax loss
                 (ignore_label -1) and SmoothL1 (sigma 3, inside and outside weights), backward,
                 update. PyTorch: the same DigitScenes and AnchorTarget (netdsl's NumPy layers, on a
                 netdsl Net of its own with the same seed: the same scenes and samples), then the
                 same convolutions and losses (torch_peers.py), backward, update. That shared NumPy
                 part is also timed alone and printed.
torch.compile's compile time is reported apart: the warm-up iterations' time beyond steady state
(a later peer reuses what an earlier one compiled, and TorchInductor keeps an on-disk cache: for
one peer's cold compile, run it alone with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1).
Before timing, the script checks that the PyTorch model's outputs have the netdsl net's shapes and
that its first loss, on netdsl's first batch with netdsl's initial weights, agrees to float32.

    python benchmarks/lenet_cpu.py [--net lenet|cifar10_quick|rpn] [--iters N] [--blocks 5] [--threads 2]
                                   [--cpu-kernels both|compiled|numpy] [--torch eager,compile,compile-step]
    python benchmarks/lenet_cpu.py --full       # Caffe's 10,000 LeNet iterations, netdsl and PyTorch: wall time, accuracy
    python benchmarks/lenet_cpu.py --jit        # the compiled path's first iteration, cold and warm cache
    python benchmarks/lenet_cpu.py --rss [--net N] [--iters 200]   # netdsl's peak RSS against its budget, term by term
    python benchmarks/lenet_cpu.py --layers [--net N]    # netdsl's ms per layer, forward and backward
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 20                          # untimed iterations per side before the blocks (torch.compile compiles here)


# -- the nets: what each side is fed ------------------------------------------------------------
class Bench:
    """One net on both sides: its solver, what netdsl's forward is given, the batches the PyTorch
    step reads (torch tensors by blob name, 'data' the model's input), and the losses. This class
    is LeNet's; the other nets override what differs."""
    model = "LeNet"                 # the torch_peers class
    iters = 200                     # default iterations per timed block
    loss_tops = ("loss",)

    def solver(self) -> str:
        return str(ROOT / "nets" / "lenet_solver.net")

    def rss_solver(self) -> str:
        """The solver `--rss` trains with `netdsl train`'s Trainer (its data layers, its test nets)."""
        return self.solver()

    def feed(self):
        """() -> the keyword inputs of netdsl's forward for one step."""
        return dict

    def batches(self, ref, seed: int):
        """() -> one step's batch for PyTorch; `ref` is a netdsl Net of the same net."""
        import torch

        from netdsl.data.mnist import load_mnist
        images, labels = load_mnist("train")
        x_all = torch.from_numpy(images.astype(np.float32)[:, None] * np.float32(1 / 256))
        y_all = torch.from_numpy(labels.astype(np.int64))
        rng = np.random.default_rng(seed)
        state = {"perm": rng.permutation(len(y_all)), "cursor": 0}
        batch = ref.plan.blob_shapes["data"][0]

        def next_batch():
            if state["cursor"] + batch > len(state["perm"]):
                state["perm"], state["cursor"] = rng.permutation(len(y_all)), 0
            idx = torch.from_numpy(state["perm"][state["cursor"]:state["cursor"] + batch])
            state["cursor"] += batch
            return {"data": x_all[idx], "label": y_all[idx]}
        return next_batch

    def reference(self, net) -> dict:
        """The batch a netdsl net's last forward read, for PyTorch."""
        import torch
        b = net.blobs
        return {"data": torch.from_numpy(b["data"].data.copy()), "label": torch.from_numpy(b["label"].data.astype(np.int64))}

    def losses(self, out, batch) -> tuple:
        import torch.nn.functional as F
        return (F.cross_entropy(out, batch["label"]),)


class Cifar10Quick(Bench):
    model, iters = "Cifar10Quick", 30
    POOL = 8                        # distinct batches, fed in turn

    def __init__(self):
        self._dir = None

    @functools.cached_property
    def pool(self) -> tuple[np.ndarray, np.ndarray]:
        """The batches both sides read: images (POOL, 100, 3, 32, 32) and labels (POOL, 100)."""
        rng = np.random.default_rng(0)
        return (rng.standard_normal((self.POOL, 100, 3, 32, 32)) * 50).astype(np.float32), \
            rng.integers(0, 10, (self.POOL, 100))

    def _write(self, name: str, net_text: str) -> str:
        from distributed_cpu import SOLVER
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="netdsl_cifar10_quick_")
        tmp = Path(self._dir.name)
        (tmp / f"{name}.net").write_text(net_text)
        (tmp / f"{name}_solver.net").write_text(SOLVER.format(net=f"{name}.net", prefix=tmp / name))
        return str(tmp / f"{name}_solver.net")

    def solver(self) -> str:
        from distributed_cpu import CIFAR10_QUICK
        text = CIFAR10_QUICK.replace("BATCH", "100")
        start, end = text.index('layer { name: "cifar"'), text.index('layer { name: "conv1"')
        feed = ('layer { name: "cifar" type: "Input" top: "data" top: "label"\n'
                '  input_param { shape { dim: 100 dim: 3 dim: 32 dim: 32 } shape { dim: 100 } } }\n')
        return self._write("cifar10_quick_input", text[:start] + feed + text[end:])

    def rss_solver(self) -> str:
        from distributed_cpu import CIFAR10_QUICK
        return self._write("cifar10_quick_dummy", CIFAR10_QUICK.replace("BATCH", "100"))

    def feed(self):
        images, labels = self.pool[0], self.pool[1].astype(np.float32)
        turn = itertools.cycle(range(self.POOL))

        def inputs():
            k = next(turn)
            return {"data": images[k], "label": labels[k]}
        return inputs

    def batches(self, ref, seed):
        import torch
        x, y = (torch.from_numpy(a) for a in self.pool)
        turn = itertools.cycle(range(self.POOL))

        def next_batch():
            k = next(turn)
            return {"data": x[k], "label": y[k]}
        return next_batch


RPN_BLOBS = ("data", "rpn_labels", "rpn_bbox_targets", "rpn_bbox_inside_weights", "rpn_bbox_outside_weights")


class Rpn(Bench):
    model, iters = "DigitRPN", 100
    loss_tops = ("rpn_cls_loss", "rpn_loss_bbox")

    def solver(self):
        return str(ROOT / "nets" / "rpn_solver.net")

    def batches(self, ref, seed):
        import torch
        numpy_part = rpn_numpy_part(ref)
        return lambda: {k: torch.from_numpy(v) for k, v in numpy_part().items() if k in RPN_BLOBS}

    def reference(self, net):
        import torch
        return {k: torch.from_numpy(net.blobs[k].data.copy()) for k in RPN_BLOBS}

    def losses(self, out, batch):
        from torch_peers import rpn_losses
        return rpn_losses(out[0], out[1], *(batch[k] for k in RPN_BLOBS[1:]))


BENCHES = {"lenet": Bench, "cifar10_quick": Cifar10Quick, "rpn": Rpn}


def rpn_numpy_part(net):
    """() -> the RPN step's NumPy part as netdsl's Net runs it, by blob name: DigitScenes draws a
    scene, AnchorTarget labels the anchors, each with the Net's random stream for that forward
    (executor.Net.forward), so a Net with the same seed sees the same scenes and samples. Only the
    shape of AnchorTarget's score-map bottom is read: it gets zeros of that shape."""
    steps = net.plan.steps
    scenes = next(i for i, s in enumerate(steps) if s.layer.type == "DigitScenes")
    anchors = next(i for i, s in enumerate(steps) if s.layer.type == "AnchorTarget")
    score = steps[anchors].node.bottoms[0]
    values = {score: np.zeros(net.plan.blob_shapes[score], net.dtype)}
    count = itertools.count()

    def run(i, n):
        state = net.states[i]
        state.rng = np.random.default_rng([net.seed, i, n])
        tops, _ = steps[i].layer.forward(np, [values[b] for b in steps[i].node.bottoms], [], state)
        values.update(zip(steps[i].node.tops, tops))

    def part():
        n = next(count)
        run(scenes, n)
        run(anchors, n)
        return values
    return part


# -- the steppers --------------------------------------------------------------------------------
def netdsl_stepper(bench: Bench, kernels="compiled", threads=None, seed=1, hooks=None):
    """One training iteration of netdsl, as `netdsl train` runs it (cpu.use_kernels); `hooks`
    (a LayerClock) times each layer. kernels "compiled-im2col": compiled, every convolution
    im2col + GEMM (none direct)."""
    from netdsl.backend import CPU
    from netdsl.cpu import flat_solver, use_kernels
    from netdsl.cpu.threads import set_threads
    from netdsl.executor import build_net
    from netdsl.solver import Solver
    from netdsl.solverfile import load_solver
    sf = load_solver(bench.solver())
    net = build_net(sf.train_net, "TRAIN", "cpu", seed=seed)
    if kernels == "compiled-im2col":
        from netdsl.cpu import ops
        ops.DIRECT = False
    try:
        lowered, _ = use_kernels(CPU, kernels.removesuffix("-im2col"), threads, net)
    finally:
        if kernels == "compiled-im2col":
            ops.DIRECT = True
    solver = flat_solver(sf.cfg, net) if lowered is not None else Solver(sf.cfg, net.learnable)
    feed = bench.feed()
    state = {"it": 0}

    def step():
        net.zero_grad()
        net.forward(_hooks=hooks, **feed())
        net.backward(_hooks=hooks)
        solver.step(state["it"])
        state["it"] += 1
    step.net = net
    step.threads = lambda: set_threads(threads, lowered is not None)
    return step


TORCH_MODES = ("eager", "compile", "compile-step")
KINDS = {"both": ("compiled", "numpy"), "all": ("compiled", "compiled-im2col", "numpy")}


def torch_stepper(bench: Bench, threads: int, mode="eager", seed=1):
    """One training iteration of the PyTorch twin, and the model. mode: "eager"; "compile" (the
    model and its losses torch.compile'd as one function: forward and, through AOTAutograd,
    backward; the optimizer eager); "compile-step" (the optimizer's step compiled too, its rates
    in tensors): the whole step compiled, in the two pieces PyTorch's recipes use."""
    import torch
    import torch_peers

    from netdsl.executor import build_net
    from netdsl.solverfile import load_solver
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    sf = load_solver(bench.solver())
    ref = build_net(sf.train_net, "TRAIN", "cpu", seed=seed)      # netdsl's initial weights, its data layers
    model = getattr(torch_peers, bench.model)()
    torch_peers.copy_params(model, ref)
    opt, sched = torch_peers.caffe_sgd(model, ref, sf.cfg, tensor_lr=mode == "compile-step")

    def loss_of(batch):
        return sum(bench.losses(model(batch["data"]), batch))
    loss = loss_of if mode == "eager" else torch.compile(loss_of)
    opt_step = torch.compile(opt.step) if mode == "compile-step" else opt.step
    next_batch = bench.batches(ref, seed)

    def step():
        batch = next_batch()
        opt.zero_grad(set_to_none=True)
        loss(batch).backward()
        opt_step()
        sched.step()
    return step, model


def sanity_check(bench: Bench, seed=1) -> None:
    """Print whether the PyTorch twin has the netdsl net's output shapes and, given netdsl's initial
    weights and its first batch, the same outputs and first losses (to float32 rounding)."""
    import torch
    import torch_peers

    from netdsl.executor import build_net
    from netdsl.solverfile import load_solver
    net = build_net(load_solver(bench.solver()).train_net, "TRAIN", "cpu", seed=seed)
    net.forward(**bench.feed()())
    model = getattr(torch_peers, bench.model)()
    torch_peers.copy_params(model, net)
    batch = bench.reference(net)
    with torch.no_grad():
        out = model(batch["data"])
        losses = bench.losses(out, batch)
    outs = out if isinstance(out, tuple) else (out,)
    for name, o in zip(model.outputs, outs):
        theirs, ours = o.numpy(), net.blobs[name].data
        if theirs.shape != ours.shape:
            print(f"check: output {name}: pytorch {theirs.shape}, netdsl {ours.shape}: SHAPES DIFFER")
            continue
        rel = np.abs(theirs - ours).max() / max(np.abs(ours).max(), 1e-30)
        print(f"check: output {name} {'x'.join(map(str, ours.shape))} on both sides; largest difference "
              f"{rel:.1e} of its largest value")
    for top, loss in zip(bench.loss_tops, losses):
        ours, theirs = float(net.blobs[top].data), float(loss)
        rel = abs(ours - theirs) / max(abs(ours), 1e-12)
        print(f"check: first {top}: netdsl {ours:.6f}, pytorch {theirs:.6f}, relative difference {rel:.1e} "
              f"({'agree' if rel < 1e-4 else 'DISAGREE'} to float32 tolerance 1e-4)")


# -- timing ---------------------------------------------------------------------------------------
def time_block(step, iters) -> float:
    if hasattr(step, "threads"):            # a netdsl step: its thread counts (the other kind's may be set)
        step.threads()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return 1e3 * (time.perf_counter() - t) / iters


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_by_side(args, bench: Bench) -> None:
    from netdsl.cpu.threads import available_cores
    kinds = KINDS.get(args.cpu_kernels, (args.cpu_kernels,))
    steppers = {f"netdsl-{k}": netdsl_stepper(bench, k, args.threads) for k in kinds}
    warm = {}                                              # seconds of the warm-up iterations
    for name, step in steppers.items():
        warm[name] = time_block(step, WARMUP) * WARMUP / 1e3
    rss_netdsl = peak_rss_mib()
    modes = [m for m in args.torch.split(",") if m]
    try:
        sanity_check(bench)
    except ImportError:
        modes = []
        print("torch not installed: `pip install torch==2.13.0` for the side-by-side peer")
    for mode in modes:
        name = "pytorch" if mode == "eager" else f"pytorch-{mode}"
        try:
            step, _ = torch_stepper(bench, args.threads or available_cores(), mode)
            warm[name] = time_block(step, WARMUP) * WARMUP / 1e3
            steppers[name] = step
        except Exception as e:      # noqa: BLE001  (torch.compile needs a C++ compiler and may fail here)
            why = str(e).strip().splitlines()
            print(f"{name}: failed, left out: {type(e).__name__}: {why[0] if why else ''}")
    if bench.model == "DigitRPN":
        from netdsl.executor import build_net
        from netdsl.solverfile import load_solver
        part = rpn_numpy_part(build_net(load_solver(bench.solver()).train_net, "TRAIN", "cpu", seed=1))
        print(f"rpn: the NumPy part both steps contain (DigitScenes + AnchorTarget): {time_block(part, 20):.2f} ms/it")
    iters = args.iters or bench.iters
    times = {k: [] for k in steppers}
    for _ in range(args.blocks):
        for name, step in steppers.items():       # alternate, so drift hits all equally
            times[name].append(time_block(step, iters))
    threads = f"{args.threads} threads" if args.threads else "threads by netdsl's policy and all cores for PyTorch"
    print(f"{args.net}, SGD, {threads}, float32, {args.blocks} blocks x {iters} iterations (median ms/iteration):")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:22s} {v:8.2f} ms/it   (blocks: {', '.join(f'{x:.2f}' for x in times[k])}; warm-up "
              f"{WARMUP} its {warm[k]:.1f} s, {max(0.0, warm[k] - WARMUP * v / 1e3):.1f} s beyond steady state)")
    peers = [k for k in med if k.startswith("pytorch")]
    for k in med:
        if k.startswith("netdsl") and peers:
            print(f"  ratio {k}: " + ", ".join(f"{med[k] / med[p]:.2f}x {p}" for p in peers))
    print(f"  peak RSS after netdsl's warm-up (before torch loads): {rss_netdsl:.0f} MiB")


class LayerClock:
    """Net.forward/backward hooks: the seconds of each step's forward and backward."""

    def __init__(self):
        self.times: dict[tuple[int, bool], list[float]] = {}

    def before(self, i):
        self.t = time.perf_counter()

    def after(self, i, backward):
        self.times.setdefault((i, backward), []).append(time.perf_counter() - self.t)


def layer_times(args, bench: Bench) -> None:
    """netdsl's ms per layer, forward and backward (median over the iterations), for each kernel
    kind: where a step's time goes."""
    kinds = KINDS.get(args.cpu_kernels, (args.cpu_kernels,))
    clocks, total = {}, {}
    for kind in kinds:
        clocks[kind] = LayerClock()
        step = netdsl_stepper(bench, kind, args.threads, hooks=clocks[kind])
        time_block(step, WARMUP)
        clocks[kind].times.clear()
        total[kind] = time_block(step, args.iters or bench.iters)
    steps = step.net.plan.steps
    print(f"{args.net}: ms per layer, median of {args.iters or bench.iters} iterations, forward / backward")
    print(f"  {'layer':24s} {'type':18s}" + "".join(f" {k:>17s}" for k in kinds))
    for i, s in enumerate(steps):
        cells = []
        for kind in kinds:
            f, b = (statistics.median(clocks[kind].times.get((i, d), [0.0])) * 1e3 for d in (False, True))
            cells.append(f"{f:7.2f} / {b:7.2f}")
        print(f"  {s.node.name:24s} {s.layer.type:18s}" + "".join(f" {c:>17s}" for c in cells))
    print(f"  {'whole step (update too)':43s}" + "".join(f" {total[k]:17.2f}" for k in kinds))


def first_iterations(threads) -> None:
    """In this process: the compiled path's first iteration (JIT or cache load) against the next."""
    t = time.perf_counter()
    step = netdsl_stepper(Bench(), "compiled", threads)
    build = time.perf_counter() - t
    times = []
    for _ in range(21):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"build {build:.2f} s, first iteration {times[0]:.2f} s, then {1e3 * statistics.median(times[1:]):.1f} ms/it: "
          f"first costs {times[0] - statistics.median(times[1:]):.2f} s more")


def jit_cost(threads) -> None:
    """The first iteration with an empty Numba cache (cold: compiles every kernel) and again with
    the cache it left (warm: loads them), each in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for what in ("cold", "warm"):
            r = subprocess.run([sys.executable, __file__, "--first"] + (["--threads", str(threads)] if threads else []),
                               env=env, cwd=ROOT,
                               capture_output=True, text=True, check=True)
            print(f"  {what} cache: {r.stdout.strip()}")


# -- Caffe's 10,000 LeNet iterations ----------------------------------------------------------------
def full_runs(threads, kernels: str, max_iter: int | None) -> None:
    """`netdsl train nets/lenet_solver.net` and the same schedule in PyTorch, one after the other:
    wall time (tests included) and the final test accuracy of each. `max_iter` shortens both runs."""
    from netdsl.solverfile import load_solver
    cfg = load_solver(Bench().solver()).cfg
    iters = max_iter or cfg.max_iter
    out = tempfile.mkdtemp(prefix="netdsl_lenet_full_")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "netdsl", "train", str(ROOT / "nets" / "lenet_solver.net"), "--out", out,
                    "--cpu-kernels", kernels, "--max-iter", str(iters)] + (["--threads", str(threads)] if threads else []),
                   check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    r = subprocess.run([sys.executable, "-m", "netdsl", "test", str(ROOT / "nets" / "lenet.net"), "--weights",
                        f"{out}/lenet_iter_{iters}.npz", "--iterations", "100", "--json"], check=True,
                       capture_output=True, text=True, cwd=ROOT)
    print(f"netdsl ({kernels}) train {iters:,} iterations: {wall:.1f} s wall (tests included); "
          f"test: {r.stdout.strip()}", flush=True)
    from netdsl.cpu.threads import available_cores
    wall, accuracy, tests = torch_full(threads or available_cores(), iters)
    print(f"pytorch (eager) {iters:,} iterations: {wall:.1f} s wall (with {tests} tests of {cfg.test_iter[0] * 100:,} images); "
          f"final accuracy {accuracy:.4f}")


def torch_full(threads: int, max_iter: int, seed=1) -> tuple[float, float, int]:
    """nets/lenet_solver.net in PyTorch: max_iter iterations of its schedule, testing over the test
    images (test_iter batches of 100) at iteration 0 and every test_interval, as Caffe and `netdsl
    train` do. Returns (wall seconds, the accuracy after the run (tested untimed, as `netdsl test`
    is), the number of timed tests)."""
    import torch

    from netdsl.data.mnist import load_mnist
    from netdsl.solverfile import load_solver
    bench = Bench()
    cfg = load_solver(bench.solver()).cfg
    t = time.perf_counter()
    step, model = torch_stepper(bench, threads, "eager", seed)
    images, labels = load_mnist("test")
    n = cfg.test_iter[0] * 100
    x = torch.from_numpy(images[:n].astype(np.float32)[:, None] * np.float32(1 / 256))
    y = torch.from_numpy(labels[:n].astype(np.int64))

    def test() -> float:
        with torch.no_grad():
            right = sum(int((model(x[i:i + 100]).argmax(1) == y[i:i + 100]).sum()) for i in range(0, n, 100))
        return right / n
    tests = [test()]
    for it in range(1, max_iter + 1):
        step()
        if it % cfg.test_interval == 0:
            tests.append(test())
    wall = time.perf_counter() - t
    return wall, test(), len(tests)


# -- peak RSS against its budget ------------------------------------------------------------------
def status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def array_bytes(objects, depth: int = 3) -> int:
    """Bytes of the distinct memory owned by the NumPy arrays the objects hold: their attributes,
    in lists, tuples and dicts, and in the netdsl objects they hold (`depth` levels down). Views
    count once, as their owner."""
    owners, seen = {}, set()

    def visit(x, depth):
        if isinstance(x, np.ndarray):
            while isinstance(x.base, np.ndarray):
                x = x.base
            owners[id(x)] = x.nbytes
        elif isinstance(x, (list, tuple)) or isinstance(x, dict):
            for v in x.values() if isinstance(x, dict) else x:
                visit(v, depth)
        elif depth >= 0 and type(x).__module__.startswith("netdsl") and hasattr(x, "__dict__") and id(x) not in seen:
            seen.add(id(x))
            for v in vars(x).values():
                visit(v, depth - 1)
    for o in objects:
        visit(o, depth)
    return sum(owners.values())


def rss_budget(bench: Bench, kernels: str, threads, iters: int) -> None:
    """Train `iters` iterations with `netdsl train`'s Trainer in this process and print its peak
    RSS next to the budget: the interpreter-and-libraries baseline (RSS after importing NumPy,
    netdsl's training modules and, for compiled kernels, Numba and the kernels, before any net is
    built), Numba's LLVM runtime (what a first tiny @njit compile adds: the kernels' first call
    starts it, even from the on-disk cache), the plans' blobs (Plan.run_bytes's: the train net's
    blobs kept for backward and its gradients, every test net blob), params and their gradients,
    the solver's history, and the datasets the data layers hold. The compiled kernels'
    preallocated buffers (arenas and scratch; pages never touched are not resident) are printed
    as a term of their own. `--net cifar10_quick` trains distributed_cpu.py's CIFAR10_QUICK
    (DummyData, as the Trainer needs a data layer; no test net)."""
    import netdsl.train  # noqa: F401
    if kernels == "compiled":
        import numba

        import netdsl.cpu.kernels  # noqa: F401
        import netdsl.cpu.ops  # noqa: F401
    baseline = status_kib("VmRSS") * 1024
    jit = 0
    if kernels == "compiled":                 # LLVM starts at the first compiled call (even a cached one)
        numba.njit(lambda x: x + 1)(1)
        jit = status_kib("VmRSS") * 1024 - baseline
    from netdsl.backend import CPU
    from netdsl.solver import SOLVER_TYPES, resolved_type
    from netdsl.train import Trainer
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(bench.rss_solver(), CPU, max_iter=iters, out=out, progress=False, cpu_kernels=kernels,
                          threads=threads)
        built, built_peak = status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
        trainer.run()
    peak = status_kib("VmHWM") * 1024
    nets = [trainer.net] + trainer.tests
    size = trainer.net.dtype.itemsize
    params = sum(p.data.nbytes for p in trainer.net.slots.values())
    terms = {
        "baseline (interpreter, numpy" + (", numba, netdsl.cpu kernels)" if kernels == "compiled" else ", netdsl)"): baseline,
        **({"Numba's JIT runtime (LLVM), started by a first @njit call": jit} if kernels == "compiled" else {}),
        "train net blobs (plan: kept for backward + gradients)": sum(b.nbytes for b in trainer.net.plan.train_arena) * size // 4,
        "test net blobs (plan)": sum(t.plan.naive_bytes for t in trainer.tests) * size // 4,
        "params + gradients": 2 * params,
        f"solver history ({resolved_type(trainer.sf.cfg)})": SOLVER_TYPES[resolved_type(trainer.sf.cfg)] * params,
        "datasets (data layers' arrays)": array_bytes(s.source for n in nets for s in n.states if s is not None),
    }
    compiled = array_bytes((r for n in nets for r in n.runners if r.__class__.__module__ == "netdsl.cpu.ops"), depth=0)
    mib = 1 << 20
    print(f"peak RSS of {bench.model} ({kernels} kernels, {iters} iterations, {len(trainer.tests)} test nets):")
    for what, n in terms.items():
        print(f"  {what:58s} {n / mib:8.1f} MiB")
    budget = sum(terms.values())
    print(f"  {'budget (the terms above)':58s} {budget / mib:8.1f} MiB")
    if kernels == "compiled":
        print(f"  {'compiled kernels buffers (arenas + scratch), beside the plan':58s} {compiled / mib:8.1f} MiB")
    print(f"  {'RSS once the Trainer is built (nets, data, kernels lowered)':58s} {built / mib:8.1f} MiB "
          f"(peak so far {built_peak / mib:.1f})")
    print(f"  {'peak RSS (VmHWM)':58s} {peak / mib:8.1f} MiB: {(peak - budget) / mib:+.1f} MiB against the budget"
          + (f", {(peak - budget - compiled) / mib:+.1f} with the compiled buffers" if kernels == "compiled" else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", choices=tuple(BENCHES), default="lenet")
    ap.add_argument("--iters", type=int, help="iterations per timed block (default: lenet 200, cifar10_quick 30, rpn "
                    "100); with --rss, iterations trained (default 200); with --full, iterations of both runs "
                    "(default: the solver's 10,000)")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, help="netdsl's kernel and BLAS threads and PyTorch's (default: netdsl's "
                    "policy, cpu/threads.py, and every core for PyTorch)")
    ap.add_argument("--cpu-kernels", choices=("both", "all", "compiled", "compiled-im2col", "numpy"), default="both",
                    help="netdsl's sides: both = compiled and numpy; all adds compiled-im2col (every convolution "
                    "im2col + GEMM, none direct; side by side and --layers only)")
    ap.add_argument("--torch", default="eager,compile", help=f"PyTorch peers, of {', '.join(TORCH_MODES)} ('' for "
                    "none)")
    ap.add_argument("--full", action="store_true", help="only Caffe's 10,000 LeNet iterations, netdsl and PyTorch")
    ap.add_argument("--jit", action="store_true", help="only the compiled path's JIT cost, cold and warm cache")
    ap.add_argument("--rss", action="store_true", help="only netdsl's peak RSS against its budget (a fresh process "
                    "per kernel kind)")
    ap.add_argument("--layers", action="store_true", help="only netdsl's ms per layer, forward and backward")
    ap.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "im2col" in " ".join(KINDS.get(args.cpu_kernels, (args.cpu_kernels,))) and (args.rss or args.full or args.jit):
        ap.error("compiled-im2col is for the side-by-side timing and --layers")
    if "NETDSL_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["NETDSL_DATA"] = str(ROOT.parent / "shared" / "data")
    bench = BENCHES[args.net]()
    if args.first:
        return first_iterations(args.threads)
    if args.jit:
        return jit_cost(args.threads)
    if args.rss and args.cpu_kernels == "both":
        for kernels in ("compiled", "numpy"):
            subprocess.run([sys.executable, __file__] + sys.argv[1:] + ["--cpu-kernels", kernels], check=True)
        return
    if args.rss:
        return rss_budget(bench, args.cpu_kernels, args.threads, args.iters or 200)
    if args.layers:
        return layer_times(args, bench)
    if args.full:
        return full_runs(args.threads, "numpy" if args.cpu_kernels == "numpy" else "compiled", args.iters)
    side_by_side(args, bench)


if __name__ == "__main__":
    main()
