"""GPU: eager CuPy parity with NumPy for every layer case, the CUDA kernels against their NumPy
twins, graph-mode training against eager training, and the CLI on --device gpu. Skipped without
CuPy or a CUDA device."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("CUPY_TF32", "0")          # FP32 GEMMs in CuPy (TF32 off), before cupy loads
cp = pytest.importorskip("cupy")

from netdsl.backend import cuda_available, get_backend

if not cuda_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from support import eager_iterations

from netdsl.cli import main
from netdsl.gpu.runtime import CompiledNet
from netdsl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SOLVER = str(ROOT / "nets" / "lenet_solver.net")
GPU = get_backend("gpu")

try:                                  # the layer case table of tests/test_layers.py, when present
    sys.path.insert(0, str(Path(__file__).parent))
    from test_layers import CASES, setup_case
except Exception:                     # pragma: no cover - a representative set otherwise
    CASES, setup_case = [], None


def _f32(a):
    return np.asarray(a, np.float32)


def _host(a):
    return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)


def _close(gpu, cpu, what, tol=2e-4):
    gpu, cpu = _host(gpu), _host(cpu)
    assert gpu.shape == cpu.shape, (what, gpu.shape, cpu.shape)
    scale = max(1.0, float(np.abs(cpu).max(initial=0.0)))
    err = float(np.abs(gpu.astype(np.float64) - cpu.astype(np.float64)).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------- eager layers: CuPy == NumPy

@pytest.mark.skipif(not CASES, reason="tests/test_layers.py has no CASES table")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_parity_cupy_numpy(case):
    layer, rng, bottoms, params = setup_case(case)
    bottoms, params = [_f32(b) for b in bottoms], [_f32(p) for p in params]
    outs = {}
    for xp in (np, cp):
        tops, saved = layer.forward(xp, [xp.asarray(b) for b in bottoms], [xp.asarray(p) for p in params], 1)
        dtops = [xp.asarray(np.random.default_rng(2 + j).standard_normal(np.shape(t)).astype(np.float32))
                 for j, t in enumerate(tops)]
        need = [True] * len(bottoms)
        grads = ([], [])
        if not layer.no_backward:
            grads = layer.backward(xp, saved, dtops, [xp.asarray(p) for p in params], need)
        outs[xp.__name__] = (tops, grads)
    (ct, (cdb, cdp)), (gt, (gdb, gdp)) = outs["numpy"], outs["cupy"]
    for j, (a, b) in enumerate(zip(gt, ct)):
        _close(a, b, f"{case.id} top {j}")
    for j, (a, b) in enumerate(zip(gdb, cdb)):
        if a is not None and b is not None and j in case.grad:
            _close(a, b, f"{case.id} bottom grad {j}")
    for j, (a, b) in enumerate(zip(gdp, cdp)):
        if a is not None and b is not None:
            _close(a, b, f"{case.id} param grad {j}")


# ------------------------------------------------------------------ CUDA kernels == NumPy twins

def _lenet(tmp_path, name, graph="off", backend=GPU, **kw):
    return Trainer(SOLVER, backend, out=str(tmp_path / name), progress=False, graph=graph, **kw)


@pytest.fixture(scope="module")
def mnist():
    d = os.environ.get("NETDSL_DATA")
    if not d or not (Path(d) / "mnist").is_dir():
        pytest.skip("MNIST not found (set NETDSL_DATA)")
    return d


def test_cuda_kernels_match_the_numpy_twins(tmp_path, mnist):
    """Every kernel of LeNet's train and test programs, launched directly (no graph) on the GPU,
    against the emulator from the same start: params, momentum, losses and test sums."""
    host = _lenet(tmp_path, "h", backend=get_backend("cpu"))
    dev = _lenet(tmp_path, "d")
    ref = CompiledNet(host.net, host.solver, host.sf.cfg, host.tests, host.sf.cfg.test_iter, xp=np, window=8,
                      executor="numpy")
    gpu = CompiledNet(dev.net, dev.solver, dev.sf.cfg, dev.tests, dev.sf.cfg.test_iter, xp=cp, window=8)
    gpu.executor.replay = gpu.executor.launch           # direct launches: kernels, not capture
    want, got = ref.train_chunk(0, 6), gpu.train_chunk(0, 6)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for key in host.net.slots:
        _close(dev.net.slots[key].data, host.net.slots[key].data, key, tol=1e-4)
    _close(gpu.buffers["history"], ref.buffers["history"], "momentum", tol=1e-4)
    a, b = gpu.test_sums(0, 3), ref.test_sums(0, 3)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_graph_mode_matches_eager_training(tmp_path, mnist):
    eager, graph = _lenet(tmp_path, "e", graph="off"), _lenet(tmp_path, "g", graph="on")
    assert eager.compiled is None and graph.compiled is not None
    losses = eager_iterations(eager, 20)
    got = np.concatenate([graph.compiled.train_chunk(0, 7), graph.compiled.train_chunk(7, 13)])
    np.testing.assert_allclose(got, losses, rtol=2e-3)
    for key in eager.net.slots:
        _close(graph.net.slots[key].data, eager.net.slots[key].data, key, tol=2e-3)
    assert graph.net.data_state() == eager.net.data_state()
    # the graph was captured once with an allocator that refuses: it exists and replays
    assert ("train", 1) in graph.compiled.executor.graphs


def test_graph_is_captured_without_allocations(tmp_path, mnist):
    tr = _lenet(tmp_path, "c", graph="on")
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    tr.compiled.train_chunk(0, 3)
    assert pool.used_bytes() == before          # capture and replay allocate nothing


# ------------------------------------------------------------------------------------------- CLI

def test_cli_train_gpu_graph_and_eager_then_test_on_cpu(tmp_path, mnist, capsys):
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert main(["train", SOLVER, "--device", "gpu", "--graph", mode, "--max-iter", "60", "--out", str(out)]) == 0
        log = (out / "lenet.log").read_text()
        assert ("graph mode" in log) == (mode == "on")
        weights = out / "lenet_iter_60.npz"
        assert weights.exists()
        # snapshots are host arrays: the CPU scores the GPU's weights
        assert main(["test", str(ROOT / "nets" / "lenet.net"), "--weights", str(weights), "--iterations", "5",
                     "--json", "--device", "cpu"]) == 0
        assert "accuracy" in capsys.readouterr().out
    # and a GPU run resumes from the CPU-readable solver state
    assert main(["train", SOLVER, "--device", "gpu", "--max-iter", "80", "--out", str(tmp_path / "on"),
                 "--snapshot", str(tmp_path / "on" / "lenet_iter_60.solverstate.npz")]) == 0


def test_cli_time_gpu(capsys, mnist):
    assert main(["time", str(ROOT / "nets" / "lenet.net"), "--device", "gpu", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "Average Forward-Backward" in out
