"""The compiled GPU step, checked without a GPU: lowering, the arena planner, tiling, the generated
CUDA (compiled by nvcc when installed) and the whole step run by the NumPy twins of the kernels
against the eager executor."""
from __future__ import annotations

import gzip
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import eager_iterations

from netdsl import syntax
from netdsl.backend import get_backend
from netdsl.check import check
from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.gpu.codegen import emit_cuda, generate
from netdsl.gpu.kernels.solver import device_learning_rate
from netdsl.gpu.lower import Unsupported, lower_train, param_layout
from netdsl.gpu.program import check_arena, choose_tiling
from netdsl.gpu.runtime import CompiledNet, take_batches
from netdsl.plan import lower
from netdsl.solver import SolverConfig, learning_rate
from netdsl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "nets" / "lenet.net"


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> str:
    """A small synthetic MNIST (200 train, 150 test digits): batches wrap over epochs."""
    root = tmp_path_factory.mktemp("data")
    d = root / "mnist"
    d.mkdir()
    rng = np.random.default_rng(7)
    for split, n in (("train", 200), ("t10k", 150)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for k in range(n):            # a learnable pattern: a bright bar whose place is the label
            images[k, 2 + 2 * labels[k]:4 + 2 * labels[k], 4:24] = 250
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return str(root)


def trainer(tmp_path, data, name, **kw) -> Trainer:
    return Trainer(str(ROOT / "nets" / "lenet_solver.net"), get_backend("cpu"), data_dir=data,
                   out=str(tmp_path / name), progress=False, graph="off", **kw)


def plan_of(text: str, phase="TRAIN"):
    return lower(check(syntax.parse(text, "t.net"), phase=phase), runnable=True)


# ----------------------------------------------------------------------------------------- the step

def test_emulated_step_matches_eager_training(tmp_path, tiny_mnist):
    eager, comp = trainer(tmp_path, tiny_mnist, "a"), trainer(tmp_path, tiny_mnist, "b")
    step = CompiledNet(comp.net, comp.solver, comp.sf.cfg, comp.tests, comp.sf.cfg.test_iter, xp=np,
                       window=4, executor="numpy")
    want = eager_iterations(eager, 7)
    got = step.train_chunk(0, 4).tolist() + step.train_chunk(4, 3).tolist()     # the window wraps
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key, p in eager.net.slots.items():
        np.testing.assert_allclose(comp.net.slots[key].data, p.data, rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(eager.solver.buffers, comp.solver.buffers):     # float32 sums in other orders:
        scale = np.abs(a.history[0]).max()                             # to the history's own scale
        np.testing.assert_allclose(b.history[0], a.history[0], rtol=1e-4, atol=1e-3 * scale)
    # the data layer's cursor (what a snapshot records) advanced exactly as eagerly
    assert comp.net.data_state() == eager.net.data_state()
    # the compiled test step: same sums as the eager test loop, over batches that wrap the set
    sums = {}
    for _ in range(3):
        for k, v in eager.tests[0].forward().items():
            sums[k] = sums.get(k, 0.0) + float(v)
    got = step.test_sums(0, 3)
    assert set(got) == set(sums) == {"accuracy", "loss"}
    assert got["accuracy"] == pytest.approx(sums["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(sums["loss"], rel=1e-5)


def test_params_are_views_of_the_flat_buffers(tmp_path, tiny_mnist):
    tr = trainer(tmp_path, tiny_mnist, "v")
    step = CompiledNet(tr.net, tr.solver, tr.sf.cfg, tr.tests, tr.sf.cfg.test_iter, xp=np, executor="numpy")
    w = tr.net.params["conv1"][0]
    w.data[...] = 3.0                          # what net.load / restore do
    off = step.layout.offsets["conv1/0"]
    assert (step.buffers["params"][off:off + w.data.size] == 3.0).all()
    assert tr.tests[0].params["conv1"][0].data is w.data       # the test net shares it


def test_lenet_program_shape_and_fusions():
    plan = plan_of(LENET.read_text())
    prog = lower_train(plan, param_layout(plan), 64, SolverConfig(momentum=0.9))
    kinds = [launch.kind for launch in prog.launches]
    assert kinds[0] == "gather" and kinds[-2:] == ["sgd", "advance"]
    assert "relu_fwd" not in kinds and "relu_bwd" not in kinds     # ReLU rides in ip1's and ip2's GEMMs
    # bias gradients ride in the weight-gradient GEMMs; every gradient is assigned first: no zeroing
    assert not {"zero", "bias_grad", "col_sum"} & set(kinds)
    assert all(launch.params["BIAS"] == 3 for launch in prog.launches if launch.symbol.endswith("_dW"))
    assert len(prog.launches) == 22
    ip1 = next(launch for launch in prog.launches if launch.symbol.endswith("ip1_fwd"))
    assert ip1.params["ACT"] == 1 and ip1.params["BIAS"] == 2
    ip2_dx = next(launch for launch in prog.launches if launch.symbol.endswith("ip2_dx"))
    assert ip2_dx.params["ACT"] == 2
    assert not any(launch.symbol.endswith("conv1_col2im") for launch in prog.launches)   # data needs no gradient
    check_arena(prog)
    assert prog.arena_bytes < sum(t.nbytes for t in prog.tensors.values())           # memory is reused


def test_arena_places_overlapping_lifetimes_apart():
    from netdsl.gpu.program import Launch, Program, Ref, Tensor, plan_arena
    tensors = {n: Tensor(n, c) for n, c in (("a", 1000), ("b", 10), ("c", 1000), ("d", 500))}
    uses = [("a",), ("a", "b"), ("b", "c"), ("c", "d"), ("d",)]
    prog = Program("p", [Launch("zero", f"k{i}", {}, [Ref("arena", n) for n in u], (1,), (1,))
                         for i, u in enumerate(uses)], tensors)
    size = plan_arena(prog)
    check_arena(prog)
    assert tensors["a"].offset == tensors["c"].offset      # a is dead before c is born
    assert size < sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("m,n,k,batch", [(20, 576, 25, 64), (50, 500, 4096, 1), (64, 500, 800, 1),
                                         (1, 1, 1, 1), (500, 800, 64, 1), (20, 25, 36864, 1)])
def test_tiling_covers_the_problem(m, n, k, batch):
    t = choose_tiling(m, n, k, batch)
    assert t.grid[0] * t.bn >= n and t.grid[1] * t.bm >= m and t.grid[2] == batch * t.splits
    assert t.kchunk % t.bk == 0 and (t.splits - 1) * t.kchunk < k <= t.splits * t.kchunk


def test_unsupported_layers_and_solvers_say_why():
    text = LENET.read_text().replace('type: "ReLU"', 'type: "Sigmoid"')
    plan = plan_of(text)
    with pytest.raises(Unsupported, match="Sigmoid layer 'relu1'"):
        lower_train(plan, param_layout(plan), 8, SolverConfig())
    plan = plan_of(LENET.read_text())
    with pytest.raises(Unsupported, match="Adam"):
        lower_train(plan, param_layout(plan), 8, SolverConfig(type="Adam"))
    with pytest.raises(Unsupported, match="clip_gradients"):
        lower_train(plan, param_layout(plan), 8, SolverConfig(clip_gradients=10))


def test_graph_on_needs_the_gpu(tmp_path, tiny_mnist):
    with pytest.raises(NetdslError, match="--graph on needs --device gpu"):
        Trainer(str(ROOT / "nets" / "lenet_solver.net"), get_backend("cpu"), data_dir=tiny_mnist,
                out=str(tmp_path / "g"), progress=False, graph="on")


def test_take_batches_matches_next_indices(tmp_path, tiny_mnist):
    a, b = trainer(tmp_path, tiny_mnist, "ta"), trainer(tmp_path, tiny_mnist, "tb")
    name = a.net.plan.steps[0].node.name
    want = np.stack([a.net.source(name).next_indices(64) for _ in range(9)])   # 9 x 64 over 200 digits: 2 wraps
    got = np.concatenate([take_batches(b.net, name, 4), take_batches(b.net, name, 5)])
    np.testing.assert_array_equal(got, want)
    assert a.net.data_state() == b.net.data_state()


POLICIES = [dict(lr_policy="fixed"), dict(lr_policy="step", gamma=0.1, stepsize=10),
            dict(lr_policy="exp", gamma=0.9), dict(lr_policy="inv", gamma=1e-4, power=0.75),
            dict(lr_policy="multistep", gamma=0.5, stepvalue=[5, 5, 9]), dict(lr_policy="poly", power=2.0, max_iter=10),
            dict(lr_policy="sigmoid", gamma=0.5, stepsize=10)]


@pytest.mark.parametrize("policy", POLICIES, ids=[p["lr_policy"] for p in POLICIES])
def test_device_learning_rate_is_the_solvers(policy):
    from netdsl.gpu.lower import solver_scalars
    cfg = SolverConfig(base_lr=0.1, **policy)
    pid, base, gamma, power, stepsize, max_iter = (float(v) for v in solver_scalars(cfg)[:6])
    for it in (0, 1, 4, 5, 6, 9, 10, 11, 20, 12345):
        if cfg.lr_policy == "poly" and it > cfg.max_iter:
            continue
        got = device_learning_rate(int(pid), it, base, gamma, power, int(stepsize), int(max_iter),
                                           cfg.stepvalue)
        assert np.float32(got) == np.float32(learning_rate(cfg, it)), (it, got)


# ------------------------------------------------------------------------------- generated source

def test_emit_cuda_prints_the_generated_source(capsys):
    assert main(["compile", str(LENET), "--emit", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "nd_gemm<train_" in out and 'extern "C" __global__' in out and "program 'test0'" in out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_generated_cuda_compiles_with_nvcc(tmp_path):
    src = tmp_path / "lenet.cu"
    src.write_text(emit_cuda(str(LENET)))
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", str(src), "-o", str(tmp_path / "lenet.ptx")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    ptx = (tmp_path / "lenet.ptx").read_text()
    assert "conv1_fwd(" in ptx and ".entry nd_sgd_update" in ptx


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_kernel_variant_compiles_with_nvcc(tmp_path):
    """AVE pooling, unfused ReLU, 1x1 convolution, padding, ignore_label: the templates LeNet skips."""
    text = """name: "v"
layer { name: "d" type: "MNIST" top: "data" top: "label" mnist_param { batch_size: 8 } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "r1" type: "ReLU" bottom: "p1" top: "p1" relu_param { negative_slope: 0.1 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3" param { lr_mult: 0 } param { lr_mult: 1 }
        convolution_param { num_output: 5 kernel_size: 3 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "c3" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        loss_param { ignore_label: 3 } }
"""
    plan = plan_of(text)
    prog = lower_train(plan, param_layout(plan), 16, SolverConfig(momentum=0.9, weight_decay=1e-3))
    kinds = {launch.kind for launch in prog.launches}
    assert {"avepool_fwd", "avepool_bwd", "relu_fwd", "relu_bwd", "bias_grad", "col2im"} <= kinds
    src = tmp_path / "v.cu"
    src.write_text(generate([prog]))
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", str(src), "-o", str(tmp_path / "v.ptx")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr


def test_variant_net_emulates_like_eager(tmp_path, tiny_mnist):
    """The variant net above (AVE pooling, leaky ReLU after pooling, 1x1 conv, ignore_label) through
    the emulated step against the eager executor, with a test net too."""
    text = """name: "v"
layer { name: "d" type: "MNIST" top: "data" top: "label" include { phase: TRAIN }
        mnist_param { batch_size: 8 } transform_param { scale: 0.0039 mean_value: 30 } }
layer { name: "d" type: "MNIST" top: "data" top: "label" include { phase: TEST }
        mnist_param { batch_size: 16 split: TEST } transform_param { scale: 0.0039 mean_value: 30 } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "r1" type: "ReLU" bottom: "p1" top: "p1" relu_param { negative_slope: 0.1 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2"
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3" param { lr_mult: 0 } param { lr_mult: 1 }
        convolution_param { num_output: 5 kernel_size: 3 pad: 1 dilation: 2 weight_filler { type: "xavier" }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "side" type: "InnerProduct" bottom: "c3" top: "side" inner_product_param { num_output: 3 } }
layer { name: "p2" type: "Pooling" bottom: "c3" top: "p2" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "p2" top: "ip"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST }
        accuracy_param { top_k: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        loss_param { ignore_label: 3 } }
"""
    net = tmp_path / "v.net"
    net.write_text(text)
    solver = tmp_path / "v_solver.net"
    solver.write_text('net: "v.net"\ntest_iter: 2\ntest_interval: 100\nbase_lr: 0.05\nmomentum: 0.9\n'
                      'weight_decay: 0.001\nlr_policy: "step"\ngamma: 0.5\nstepsize: 2\nmax_iter: 10\nrandom_seed: 3\n')

    def make(name):
        return Trainer(str(solver), get_backend("cpu"), data_dir=tiny_mnist, out=str(tmp_path / name),
                       progress=False, graph="off")
    eager, comp = make("e"), make("c")
    step = CompiledNet(comp.net, comp.solver, comp.sf.cfg, comp.tests, comp.sf.cfg.test_iter, xp=np,
                       window=8, executor="numpy")
    kinds = {launch.kind for launch in step.train.launches}
    assert {"bias_grad", "zero", "col2im", "avepool_bwd", "relu_bwd"} <= kinds    # c3's bias; side's params
    want = eager_iterations(eager, 5)
    np.testing.assert_allclose(step.train_chunk(0, 5), want, rtol=1e-5)
    for key, p in eager.net.slots.items():
        np.testing.assert_allclose(comp.net.slots[key].data, p.data, rtol=1e-4, atol=1e-6, err_msg=key)
    sums = {}
    for _ in range(2):
        for k, v in eager.tests[0].forward().items():
            if v.size == 1:
                sums[k] = sums.get(k, 0.0) + float(v)
    got = step.test_sums(0, 2)
    assert got["acc"] == pytest.approx(sums["acc"], abs=1e-6)
    assert got["loss"] == pytest.approx(sums["loss"], rel=1e-5)
    assert math.isfinite(got["loss"])


# --------------------------------------------------------------------------------- no CuPy / no GPU

def test_gpu_without_cupy_is_a_clear_error(monkeypatch, capsys):
    import sys

    from netdsl import backend
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` raises ImportError
    monkeypatch.setattr(backend, "_GPU", None)
    with pytest.raises(NetdslError) as e:
        backend.get_backend("gpu")
    d = e.value.diagnostic
    assert d.code == "E0802" and "CuPy" in d.message
    assert 'pip install "netdsl[gpu]"' in d.help and "cupy-cuda12x" in d.help and "cupy-cuda13x" in d.help
    assert not backend.cuda_available()
    assert main(["train", str(ROOT / "nets" / "lenet_solver.net"), "--device", "gpu", "--max-iter", "1"]) == 2
    assert "cupy-cuda13x" in capsys.readouterr().err
