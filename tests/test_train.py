"""Training end to end: the CLI on real MNIST, snapshots and exact resume, SIGINT, NaN stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from netdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "nets" / "lenet.net"


def solver(tmp_path: Path, **fields) -> str:
    cfg = {"net": f'"{LENET}"', "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
           "lr_policy": '"inv"', "gamma": 0.0001, "power": 0.75, "display": 10, "max_iter": 40,
           "snapshot": 0, "snapshot_prefix": f'"{tmp_path / "run" / "lenet"}"', "random_seed": 7}
    cfg.update(fields)
    path = tmp_path / "solver.net"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items() if v is not None))
    return str(path)


def run_cli(*args, timeout=300, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "netdsl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_lenet_trains_past_90_percent(tmp_path, mnist_dir):
    s = solver(tmp_path, max_iter=300, display=100, test_iter=10, test_interval=300)
    r = run_cli("train", s)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    weights = tmp_path / "run" / "lenet_iter_300.npz"
    assert weights.exists()
    assert "Test net output #0: accuracy" in r.stderr
    r = run_cli("test", str(LENET), "--weights", str(weights), "--iterations", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"accuracy", "loss"}
    assert out["accuracy"] > 0.90
    log = (tmp_path / "run" / "lenet.log").read_text()
    assert "Iteration 100, lr = 0.00992565" in log          # Caffe's inv policy value
    metrics = [json.loads(x) for x in (tmp_path / "run" / "lenet_metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics if m["kind"] == "train"] == [0, 100, 200]
    assert any(m["kind"] == "test" and m["iter"] == 300 for m in metrics)


def test_resume_is_bitwise_identical(tmp_path, mnist_dir):
    straight = tmp_path / "a"
    straight.mkdir()
    assert main(["train", solver(straight, max_iter=40, snapshot=20)]) == 0
    split = tmp_path / "b"
    split.mkdir()
    assert main(["train", solver(split, max_iter=20, snapshot=20)]) == 0
    snap = split / "run" / "lenet_iter_20.solverstate.npz"
    assert main(["train", solver(split, max_iter=40, snapshot=20), "--snapshot", str(snap)]) == 0
    a, b = load(straight / "run" / "lenet_iter_40.npz"), load(split / "run" / "lenet_iter_40.npz")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    sa = load(straight / "run" / "lenet_iter_40.solverstate.npz")
    assert int(sa["iter"]) == 40


def test_snapshots_load_without_pickle(tmp_path, mnist_dir):
    assert main(["train", solver(tmp_path, max_iter=10, snapshot=5)]) == 0
    for n in (5, 10):
        w = load(tmp_path / "run" / f"lenet_iter_{n}.npz")
        assert w["conv1/0"].shape == (20, 1, 5, 5)
        st = load(tmp_path / "run" / f"lenet_iter_{n}.solverstate.npz")
        assert int(st["iter"]) == n
    assert not list((tmp_path / "run").glob(".*.part"))       # atomic writes leave no temporaries


def test_sigint_snapshots_and_stops(tmp_path, mnist_dir):
    s = solver(tmp_path, max_iter=100000, display=1)
    p = subprocess.Popen([sys.executable, "-m", "netdsl", "train", s], cwd=ROOT, stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in p.stderr:
        if "Iteration 5," in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "Interrupted at iteration" in err
    snaps = sorted((tmp_path / "run").glob("lenet_iter_*.solverstate.npz"))
    assert snaps, err
    st = load(snaps[-1])
    assert int(st["iter"]) >= 5
    assert (tmp_path / "run" / f"lenet_iter_{int(st['iter'])}.npz").exists()


def test_nan_stops_with_layer_and_snapshot(tmp_path, mnist_dir):
    s = solver(tmp_path, base_lr=1e12, lr_policy='"fixed"', max_iter=200)
    r = run_cli("train", s)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error[E0710]: training diverged at iteration" in r.stderr
    assert "produced NaN or Inf" in r.stderr
    snaps = list((tmp_path / "run").glob("lenet_iter_*.npz"))
    assert snaps
    for p in snaps:
        if not p.name.endswith(".solverstate.npz"):
            assert all(np.isfinite(v).all() for v in load(p).values())


def test_bad_solver_is_located(tmp_path):
    path = tmp_path / "s.net"
    path.write_text(f'net: "{LENET}"\nbase_lr: 0.01\nlr_policy: "invv"\nmax_iter: 10\n')
    r = run_cli("train", str(path))
    assert r.returncode == 2
    assert f"{path}:3:1: error[E0702]" in r.stderr
    assert "inv" in r.stderr and "Traceback" not in r.stderr


def test_missing_net_file_is_located(tmp_path):
    path = tmp_path / "s.net"
    path.write_text('net: "nowhere.net"\nbase_lr: 0.01\nmax_iter: 10\n')
    r = run_cli("train", str(path))
    assert r.returncode == 2
    assert "error[E0704]" in r.stderr and "nowhere.net" in r.stderr


def test_time_reports_every_layer(mnist_dir):
    r = run_cli("time", str(LENET), "--iterations", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [x["name"] for x in report["layers"]] == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1",
                                                     "ip2", "loss"]
    assert report["forward_ms"] > 0 and report["backward_ms"] > 0
    r = run_cli("time", str(LENET), "--iterations", "2")
    assert "Average Forward-Backward:" in r.stdout


def test_time_runs_what_train_runs(mnist_dir):
    """`netdsl time` times the kernels `netdsl train` would use, with the same thread policy, and
    says which."""
    r = run_cli("time", str(LENET), "--iterations", "2", "--json")
    assert json.loads(r.stdout)["kernels"].startswith("CPU: compiled kernels (Convolution, InnerProduct, Pooling")
    r = run_cli("time", str(LENET), "--iterations", "2", "--cpu-kernels", "numpy", "--threads", "1")
    assert r.returncode == 0 and "CPU: NumPy kernels, 1 BLAS thread\n" in r.stdout
    r = run_cli("time", str(LENET), "--iterations", "2", "--threads", "0")
    assert r.returncode == 2 and "E0731" in r.stderr and "Traceback" not in r.stderr


def test_plot_writes_png_or_explains(tmp_path, mnist_dir):
    assert main(["train", solver(tmp_path, max_iter=20, display=5)]) == 0
    out = tmp_path / "curves.png"
    r = run_cli("plot", str(tmp_path / "run"), "-o", str(out))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and "pip install" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_binaryproto_snapshots_are_caffemodels_that_resume(tmp_path, mnist_dir):
    """snapshot_format: BINARYPROTO (named in the solver) snapshots Caffe's .caffemodel; resuming
    from it continues exactly as from netdsl's .npz."""
    s = solver(tmp_path, max_iter=20, snapshot=10, snapshot_format="BINARYPROTO")
    r = run_cli("train", s)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert (run / "lenet_iter_10.caffemodel").exists() and not (run / "lenet_iter_10.npz").exists()
    assert "weights: " + str(run / "lenet_iter_20.caffemodel") in r.stdout
    r = run_cli("train", s, "--snapshot", str(run / "lenet_iter_10.solverstate.npz"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    from netdsl.weights import read_weights
    a, b = read_weights(str(run / "lenet_iter_20.caffemodel")), read_weights(str(tmp_path / "b" / "lenet_iter_20.caffemodel"))
    assert all(np.array_equal(x, y) for k in a.layers for x, y in zip(a.layers[k], b.layers[k]))
