"""The region-proposal sample (issue 4): nets/rpn.net and its solver, the DigitScenes and RPN
layers in a net, and the `scenes`, `propose` and `test` commands. Real MNIST digits; < 60 s."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import netdsl
from netdsl import boxes
from netdsl.check import check_file
from netdsl.data.png import read_png
from netdsl.errors import NetdslError
from netdsl.evaluate import RecallCounter, evaluate_recall, recall_key
from netdsl.solver import Solver, SolverConfig

ROOT = Path(__file__).resolve().parents[1]
RPN = ROOT / "nets" / "rpn.net"
SOLVER = ROOT / "nets" / "rpn_solver.net"

pytestmark = pytest.mark.usefixtures("mnist_dir")


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "netdsl", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def layer(net, kind: str):
    return next(s.layer for s in net.plan.steps if s.layer.type == kind)


def run_state(net, kind: str):
    """The RunState the net keeps for its (stateful) layer of this kind."""
    return next(st for s, st in zip(net.plan.steps, net.states) if s.layer.type == kind)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """`netdsl train nets/rpn_solver.net` for a few iterations: the snapshot it writes."""
    out = tmp_path_factory.mktemp("rpn_run")
    r = run_cli("train", str(SOLVER), "--out", str(out), "--max-iter", "6")
    assert r.returncode == 0, r.stderr
    assert "Optimization Done." in (out / "rpn.log").read_text()
    w = out / "rpn_iter_6.npz"
    assert w.exists(), sorted(os.listdir(out))
    return w


# ---------------------------------------------------------------------------------- the nets

@pytest.mark.parametrize("phase", ["train", "test"])
def test_rpn_net_checks_clean(phase):
    r = run_cli("check", str(RPN), "--phase", phase, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["diagnostics"] == []          # no errors and no warnings
    types = [row["type"] for row in out["layers"]]
    if phase == "train":
        assert {"AnchorTarget", "SoftmaxWithLoss", "SmoothL1Loss"} <= set(types) and "Proposal" not in types
    else:
        assert "Proposal" in types and "AnchorTarget" not in types


def test_rpn_net_layout_matches_the_anchors():
    """2A score channels, 4A box channels, the (1, 2, A*H, W) reshape and the labels agree."""
    ch = check_file(str(RPN), phase="TRAIN")
    at = next(n.layer for n in ch.graph.nodes if n.layer.type == "AnchorTarget")
    a = at.num_anchors()
    net = netdsl.load(str(RPN), phase="train", seed=0)
    net.forward()
    b = net.blobs
    _, c, h, w = b["rpn_cls_score"].data.shape
    assert c == 2 * a and b["rpn_bbox_pred"].data.shape == (1, 4 * a, h, w)
    assert b["rpn_cls_score_reshape"].data.shape == (1, 2, a * h, w)
    assert b["rpn_labels"].data.shape == (1, 1, a * h, w)
    assert at.p.feat_stride * h == b["data"].data.shape[2]          # the backbone's stride is feat_stride
    loss_cls = next(s for s in net.plan.steps if s.layer.type == "SoftmaxWithLoss")
    assert list(loss_cls.propagate) == [True, False]
    assert layer(net, "SoftmaxWithLoss").p.ignore_label == -1
    assert layer(net, "SmoothL1Loss").p.sigma == 3.0


def test_checker_catches_an_anchor_count_mismatch(tmp_path):
    """Adding a scale to the layers without resizing the heads is E0371 (anchor count)."""
    text = RPN.read_text()
    changed, n = re.subn(r"(scales: [\d.]+)(\s+allowed_border|\s+min_size)", r"\1 scales: 24\2", text)
    assert n == 2, "expected one scales list in AnchorTarget and one in Proposal"
    bad = tmp_path / "rpn_bad.net"
    bad.write_text(changed)
    for phase in ("TRAIN", "TEST"):
        with pytest.raises(NetdslError) as e:
            check_file(str(bad), phase=phase)
        assert "E0371" in {d.code for d in e.value.diagnostics}


# -------------------------------------------------------------------------------- the data

def test_digit_scenes_layer_is_deterministic_and_split_specific():
    def first_scenes(phase, seed, n=2):
        net = netdsl.load(str(RPN), phase=phase, seed=seed)
        data, state = layer(net, "DigitScenes"), run_state(net, "DigitScenes")
        out = []
        for _ in range(n):
            tops, _ = data.forward(np, [], [], state)
            out.append([np.asarray(t) for t in tops])
        return out

    a, b = first_scenes("train", 1), first_scenes("train", 1)
    for x, y in zip(a, b):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    assert not np.array_equal(a[0][0], a[1][0])                       # the cursor moves
    c = first_scenes("train", 2)
    assert not np.array_equal(a[0][0], c[0][0])                       # the seed matters
    t = first_scenes("test", 1)
    assert not np.array_equal(a[0][0], t[0][0])
    img, info, gt = a[0]
    assert img.shape == (1, 1, 224, 224) and info.tolist() == [[224, 224, 1]]
    assert gt.ndim == 2 and gt.shape[1] == 5 and len(gt) >= 1
    net = netdsl.load(str(RPN), phase="test", seed=0)
    assert run_state(net, "DigitScenes").source.scenes.split == "test"           # held-out digits
    assert run_state(netdsl.load(str(RPN), phase="train"), "DigitScenes").source.scenes.split == "train"


def test_scenes_command_renders_pngs(tmp_path):
    r = run_cli("scenes", "-n", "2", "-o", str(tmp_path), "--split", "test", "--seed", "3")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "scenes.json").read_text())
    assert [s["index"] for s in meta["scenes"]] == [0, 1]
    for s in meta["scenes"]:
        png = read_png(tmp_path / s["png"])
        assert png.shape == (224, 224, 3)
        x1, y1 = map(int, s["gt_boxes"][0][:2])
        assert tuple(png[y1, x1]) == (0, 255, 0)                      # the gt box is drawn in green
    from netdsl.data.scenes import DigitScenes
    _, gt = DigitScenes("test", seed=3).scene(1)
    assert np.allclose(meta["scenes"][1]["gt_boxes"], gt)


# ------------------------------------------------------------------------------- training

def test_training_overfits_one_scene():
    """SGD on a single fixed scene drives the RPN loss (both terms together) well down."""
    net = netdsl.load(str(RPN), phase="train", seed=0)
    data = run_state(net, "DigitScenes").source
    image, gt = data.scenes.scene(0)
    solver = Solver(SolverConfig(base_lr=0.05, momentum=0.9, lr_policy="fixed"), net.learnable)
    losses = []
    for it in range(40):
        data.feed(image, gt)
        net.forward()
        losses.append(net.loss())
        net.zero_grad()
        net.backward()
        solver.step(it)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * losses[0], np.round(losses, 3)


def test_anchor_target_in_the_net():
    net = netdsl.load(str(RPN), phase="train", seed=0)
    net.forward()
    b = net.blobs
    at = layer(net, "AnchorTarget")
    labels = b["rpn_labels"].data.reshape(-1)
    assert (labels == 1).sum() + (labels == 0).sum() <= at.p.batch_size
    assert 1 <= (labels == 1).sum() <= at.p.batch_size * at.p.fg_fraction
    # the same (seed, forward count) samples the same anchors; the next forward others
    again = netdsl.load(str(RPN), phase="train", seed=0)
    again.forward()
    assert np.array_equal(again.blobs["rpn_labels"].data, b["rpn_labels"].data)
    # every gt box has a positive anchor
    h, w = b["rpn_cls_score"].data.shape[2:]
    a = at.num_anchors()
    pos = (b["rpn_labels"].data.reshape(a, h, w).transpose(1, 2, 0).reshape(-1) == 1)
    anchors = boxes.shift_anchors(at.anchors(), h, w, at.p.feat_stride)
    gt = b["gt_boxes"].data[:, :4]
    assert (boxes.bbox_overlaps(gt, anchors[pos]).max(axis=1) > 0.3).all()


def test_cli_training_writes_snapshots(weights):
    state = np.load(weights)
    assert {"conv1/0", "rpn_cls_score/0", "rpn_bbox_pred/0"} <= set(state.files)


# ------------------------------------------------------------------------------ proposals

def test_proposals_shape_and_order(weights):
    net = netdsl.load(str(RPN), phase="test", weights=str(weights), seed=0)
    prop = layer(net, "Proposal")
    assert prop.top_n() == (6000, 300) or prop.p.post_nms_top_n is not None
    net.forward()
    b = net.blobs
    rois, scores = b["rois"].data, b["scores"].data
    assert rois.ndim == 2 and rois.shape[1] == 5 and scores.shape == (len(rois), 1)
    assert 0 < len(rois) <= prop.top_n()[1]
    assert (rois[:, 0] == 0).all()
    assert (rois[:, 1] <= rois[:, 3]).all() and (rois[:, 2] <= rois[:, 4]).all()
    assert rois[:, 1:].min() >= 0 and rois[:, [1, 3]].max() <= 223 and rois[:, [2, 4]].max() <= 223
    assert (np.diff(scores[:, 0]) <= 0).all()                          # best first
    # the layer gives exactly boxes.proposals' output
    kw = dict(feat_stride=prop.p.feat_stride, anchors=prop.anchors(), pre_nms_top_n=6000,
              post_nms_top_n=prop.top_n()[1], nms_thresh=prop.p.nms_thresh, min_size=prop.p.min_size)
    args = (b["rpn_cls_prob_reshape"].data, b["rpn_bbox_pred"].data, b["im_info"].data)
    ref = boxes.proposals(*args, **kw)
    assert np.array_equal(ref[0], rois) and np.array_equal(ref[1], scores)


def test_nms_limit_keeps_the_unlimited_prefix():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (500, 2))
    dets = np.concatenate([xy, xy + rng.uniform(5, 40, (500, 2))], axis=1)
    scores = rng.random(500)
    full = boxes.nms(dets, scores, 0.5)
    for limit in (1, 7, 50, len(full), len(full) + 10):
        assert np.array_equal(boxes.nms(dets, scores, 0.5, limit=limit), full[:limit])


def test_recall_counter():
    c = RecallCounter(tops=(1, 2), ious=(0.5, 0.7))
    gt = np.array([[0, 0, 9, 9, 1], [20, 20, 29, 29, 2]], np.float32)
    rois = np.array([[0, 20, 20, 29, 29], [0, 0, 0, 9, 7]], np.float32)   # exact, then IoU 0.8
    c.add(rois, gt)
    r = c.result()
    assert r[recall_key(1, 0.5)] == 0.5 and r[recall_key(2, 0.7)] == 1.0 and r["gt_boxes"] == 2
    c.add(np.zeros((0, 5)), gt[:1])                                     # no proposals: a miss
    assert c.result()[recall_key(2, 0.5)] == 2 / 3


def test_propose_command_writes_png_and_json(weights, tmp_path):
    r = run_cli("propose", str(RPN), "--weights", str(weights), "--scenes", "2", "-o", str(tmp_path / "p"),
                "--top", "5")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "p" / "proposals.json").read_text())
    assert [x["scene"] for x in out["images"]] == [0, 1]
    for x in out["images"]:
        assert read_png(tmp_path / "p" / x["png"]).shape == (224, 224, 3)
        props = np.array(x["proposals"])
        assert props.shape[1] == 5 and 0 < len(props) <= 300
        assert (np.diff(props[:, 4]) <= 0).all() and len(x["gt_boxes"]) >= 1
    # --image: any PNG, here noise of an odd size
    from netdsl.data.png import write_png
    write_png(tmp_path / "in.png", (np.random.default_rng(0).random((150, 203)) * 255).astype(np.uint8))
    r = run_cli("propose", str(RPN), "--weights", str(weights), "--image", str(tmp_path / "in.png"),
                "-o", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "q" / "proposals.json").read_text())
    x = out["images"][0]
    assert x["image_size"] == [150, 203] and x["gt_boxes"] == []     # padded for the net, clipped back
    assert read_png(tmp_path / "q" / "in_proposals.png").shape == (150, 203, 3)
    props = np.array(x["proposals"])
    assert len(props) and props[:, [0, 2]].max() <= 202 and props[:, [1, 3]].max() <= 149


def test_test_command_reports_recall(weights):
    r = run_cli("test", str(RPN), "--weights", str(weights), "--iterations", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in (50, 100, 300):
        for t in (0.5, 0.7):
            v = out[f"recall@{k}/iou{t}"]
            assert 0.0 <= v <= 1.0
    assert out["recall@50/iou0.7"] <= out["recall@300/iou0.7"] <= out["recall@300/iou0.5"]
    assert out["scenes"] == 3 and out["gt_boxes"] >= 3
    r = run_cli("test", str(RPN), "--weights", str(weights), "--iterations", "2")
    assert r.returncode == 0 and "top 300" in r.stdout and "0.7" in r.stdout
    # the Python entry point agrees with the command
    again = evaluate_recall(str(RPN), str(weights), 3)
    assert again["recall@300/iou0.7"] == out["recall@300/iou0.7"]


def test_resumed_training_matches_a_straight_run(tmp_path):
    """Scenes (the data layer's cursor) and anchor sampling (seeded per forward) resume exactly."""
    from netdsl.backend import CPU
    from netdsl.train import Trainer
    solver = tmp_path / "solver.net"
    solver.write_text(SOLVER.read_text().replace('net: "rpn.net"', f'net: "{RPN}"')
                      .replace("snapshot: 5000", "snapshot: 2").replace("display: 100", "display: 0"))
    Trainer(str(solver), CPU, max_iter=4, out=str(tmp_path / "a"), progress=False).run()
    t = Trainer(str(solver), CPU, max_iter=4, out=str(tmp_path / "b"), progress=False)
    t.restore(str(tmp_path / "a" / "rpn_iter_2.solverstate.npz"))
    t.run()
    straight, resumed = np.load(tmp_path / "a" / "rpn_iter_4.npz"), np.load(tmp_path / "b" / "rpn_iter_4.npz")
    assert sorted(straight.files) == sorted(resumed.files)
    for k in straight.files:
        assert np.array_equal(straight[k], resumed[k]), k
