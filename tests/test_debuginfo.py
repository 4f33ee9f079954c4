"""`debug_info: true`: Caffe's per-layer [Forward]/[Backward]/[Update] lines on display iterations,
checked against values computed here from the Net's blobs and params; the metrics records; the
snapshot log lines."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_train import solver

from netdsl.backend import get_backend
from netdsl.gpu.lower import solver_problem
from netdsl.train import Trainer

LINE = re.compile(r"^I\d{4} [\d:.]+\] {5}(\[\w+\] .*)$")


def debug_lines(log: str) -> list[str]:
    return [m.group(1) for m in map(LINE.match, log.splitlines()) if m]


def mean_abs(a) -> float:
    return float(np.abs(np.asarray(a, np.float64)).sum()) / a.size


def close(text: str, value: float) -> bool:
    return float(text) == pytest.approx(value, rel=2e-5, abs=1e-12)


def test_lenet_debug_lines_match_the_net(tmp_path, mnist_dir):
    tr = Trainer(solver(tmp_path, max_iter=1, display=1, debug_info="true"), get_backend("cpu"), data_dir=mnist_dir,
                 progress=False)
    tr.run()
    net = tr.net
    lines = debug_lines((tmp_path / "run" / "lenet.log").read_text())
    fwd = [ln for ln in lines if ln.startswith("[Forward]")]
    bwd = [ln for ln in lines if ln.startswith("[Backward]")]
    upd = [ln for ln in lines if ln.startswith("[Update]")]
    blobs, params = net.blobs, net.params
    # forward: every layer's tops in order (in-place relu1 shows ip1 after the ReLU), then its params
    # as they were before the update (p.grad now holds the update, data = before - update)
    want = []
    for s in net.plan.steps:
        for u, t in zip(s.layer.spec.tops, s.node.tops):
            want.append((f"[Forward] Layer {s.node.name}, top blob {u} data: ", mean_abs(net.values[t])))
        for j, p in enumerate(params.get(s.node.name, [])):
            want.append((f"[Forward] Layer {s.node.name}, param blob {j} data: ", mean_abs(p.data + p.grad)))
    assert len(fwd) == len(want) == 18
    for line, (prefix, value) in zip(fwd, want):
        assert line.startswith(prefix) and close(line[len(prefix):], value), (line, value)
    assert close(fwd[-1].rsplit(" ", 1)[1], float(blobs["loss"].data))
    # backward: last layer first; bottom diffs from net.grads; conv1 has no bottom line (data needs none)
    assert bwd[0].startswith("[Backward] Layer loss, bottom blob ip2 diff: ")
    assert close(bwd[0].rsplit(" ", 1)[1], mean_abs(net.grads["ip2"]))
    assert not any("bottom blob data" in ln or "Layer mnist" in ln for ln in bwd)
    relu = next(ln for ln in bwd if ln.startswith("[Backward] Layer relu1, bottom blob ip1 diff: "))
    relu_in = next(s.node.bottoms[0] for s in net.plan.steps if s.node.name == "relu1")
    assert close(relu.rsplit(" ", 1)[1], mean_abs(net.grads[relu_in]))
    norms = bwd[-1]
    assert norms.startswith("[Backward] All net params (data, diff): L1 norm = (")
    nums = [float(x) for x in re.findall(r"[-\d.e+]+(?=[,)])", norms)]
    before = [p.data + p.grad for ps in params.values() for p in ps]
    assert nums[0] == pytest.approx(sum(np.abs(b).sum() for b in before), rel=1e-4)
    assert nums[2] == pytest.approx(np.sqrt(sum((b.astype(np.float64) ** 2).sum() for b in before)), rel=1e-4)
    # update: each param's data before the update and the update itself
    assert len(upd) == 8
    p = params["ip2"][0]
    line = next(ln for ln in upd if ln.startswith("[Update] Layer ip2, param 0 data: "))
    data, diff = re.match(r".* data: (\S+); diff: (\S+)$", line).groups()
    assert close(data, mean_abs(p.data + p.grad)) and close(diff, mean_abs(p.grad))
    # the same numbers in the metrics file
    rec = next(json.loads(x) for x in (tmp_path / "run" / "lenet_metrics.jsonl").read_text().splitlines()
               if json.loads(x)["kind"] == "debug")
    assert rec["iter"] == 0 and rec["update"]["ip2 0"] == pytest.approx(mean_abs(p.grad), rel=1e-6)
    assert set(rec) == {"kind", "iter", "data", "param_data", "diff", "param_diff", "update"}


def test_debug_lines_only_on_display_iterations(tmp_path, mnist_dir):
    tr = Trainer(solver(tmp_path, max_iter=3, display=2, debug_info="true", base_lr=0.001), get_backend("cpu"),
                 data_dir=mnist_dir, progress=False)
    tr.run()
    log = (tmp_path / "run" / "lenet.log").read_text()
    assert len([ln for ln in debug_lines(log) if ln.startswith("[Backward] All net params")]) == 2   # iterations 0, 2
    assert "Snapshotting to NumPy archive (weights by layer/index)" in log
    assert [json.loads(x)["iter"] for x in (tmp_path / "run" / "lenet_metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "debug"] == [0, 2]


def test_debug_info_flag_and_graph_mode(tmp_path, mnist_dir):
    tr = Trainer(solver(tmp_path, max_iter=0), get_backend("cpu"), data_dir=mnist_dir, progress=False, debug_info=True)
    assert tr.sf.cfg.debug_info and tr.debug is not None
    assert "debug_info" in solver_problem(tr.sf.cfg)           # graph mode trains eagerly (or --graph on refuses)
