"""A Faster R-CNN's final boxes end to end, as py-faster-rcnn's test.prototxt and tools/test_net.py
make them: a short training run of nets/faster_rcnn_digits_solver.net (whose snapshots hold
bbox_pred unnormalised, as py-faster-rcnn's snapshot writes it), then nets/faster_rcnn_digits_test.net
through `netdsl detect` and `netdsl test`, and detection_rows' dispatch between SSD and Faster R-CNN."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import needs_mnist, shared_data_dir

from netdsl import frcnn
from netdsl.backend import CPU, to_host
from netdsl.check import check_file
from netdsl.cli import main
from netdsl.data.png import read_png
from netdsl.detect import detection_rows, has_detections
from netdsl.errors import NetdslError
from netdsl.evaluate import build_test_net

ROOT = Path(__file__).resolve().parents[1]
NETS = ROOT / "nets"
TEST_NET = NETS / "faster_rcnn_digits_test.net"
DATA = ["--data-dir", str(shared_data_dir())]
STDS, MEANS = np.tile([0.1, 0.1, 0.2, 0.2], 11), np.zeros(44)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 iterations of nets/faster_rcnn_digits_solver.net: (solver file, trainer, its final weights file)."""
    from netdsl.train import Trainer
    d = tmp_path_factory.mktemp("frcnn")
    solver = d / "solver.net"
    solver.write_text((NETS / "faster_rcnn_digits_solver.net").read_text()
                      .replace('net: "faster_rcnn_digits.net"', f'net: "{NETS / "faster_rcnn_digits.net"}"'))
    trainer = Trainer(str(solver), CPU, max_iter=8, out=str(d), progress=False, data_dir=str(shared_data_dir()))
    trainer.run()
    return solver, trainer, d / "frcnn_iter_8.npz"


@needs_mnist
def test_snapshot_unnormalises_bbox_pred_and_resume_renormalises(trained):
    solver, trainer, weights = trained
    live = {k: v.copy() for k, v in trainer.net.state().items()}
    with np.load(weights) as z:
        saved = {k: z[k] for k in z.files}
    assert [n for n, _, _ in frcnn.target_normalisation(trainer.net)] == ["bbox_pred"]
    # py-faster-rcnn's snapshot: W * stds, b * stds + means (per output row); every other blob as trained
    np.testing.assert_allclose(saved["bbox_pred/0"], live["bbox_pred/0"] * STDS[:, None], rtol=1e-6)
    np.testing.assert_allclose(saved["bbox_pred/1"], live["bbox_pred/1"] * STDS + MEANS, rtol=1e-6, atol=1e-9)
    assert not np.allclose(saved["bbox_pred/0"], live["bbox_pred/0"])
    for k in live:
        if not k.startswith("bbox_pred/"):
            np.testing.assert_array_equal(saved[k], live[k])
    # resuming from the snapshot gives back the training weights (to float rounding)
    from netdsl.train import Trainer
    resumed = Trainer(str(solver), CPU, out=str(weights.parent / "resumed"), progress=False,
                      data_dir=str(shared_data_dir()))
    resumed.restore(str(weights).replace(".npz", ".solverstate.npz"))
    for k, v in resumed.net.state().items():
        np.testing.assert_allclose(v, live[k], rtol=1e-5, atol=1e-8)


@needs_mnist
def test_detect_and_map_of_the_test_net(trained, tmp_path, capsys):
    *_, weights = trained
    assert main(["detect", str(TEST_NET), "--weights", str(weights), "--scenes", "2", "-o", str(tmp_path / "d"),
                 *DATA]) == 0
    out = json.loads((tmp_path / "d" / "detections.json").read_text())
    assert [x["png"] for x in out["images"]] == ["scene_0000_detections.png", "scene_0001_detections.png"]
    for x in out["images"]:
        assert read_png(tmp_path / "d" / x["png"]).shape == (128, 128, 3) and x["gt_boxes"]
        assert len(x["detections"]) <= 100                      # test_net's max_per_image
        for label, score, *box in x["detections"]:
            assert 1 <= label <= 10 and 0.05 < score <= 1
            assert 0 <= box[0] <= box[2] <= 127 and 0 <= box[1] <= box[3] <= 127
    capsys.readouterr()
    assert main(["test", str(TEST_NET), "--weights", str(weights), "--iterations", "3", "--json", *DATA]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["mAP"] <= 1 and r["images"] == 3 and r["gt_boxes"] >= 3


@needs_mnist
def test_detection_rows_dispatch(trained):
    *_, weights = trained
    data = str(shared_data_dir())
    # Faster R-CNN: the Proposal's rois, cls_prob and bbox_pred through py-faster-rcnn's im_detect + NMS
    net = build_test_net(str(TEST_NET), str(weights), CPU, data, 0)
    net.forward()
    b = {k: to_host(net.blobs[k]) for k in ("rois", "cls_prob", "bbox_pred", "im_info")}
    want = frcnn.detections(b["rois"], b["cls_prob"], b["bbox_pred"], b["im_info"][0])
    assert len(want) and np.array_equal(detection_rows(net), want)
    # SSD: DetectionOutput's rows (fractions of the image) in pixels
    ssd = build_test_net(str(NETS / "ssd_digits.net"), None, CPU, data, 0)
    ssd.forward()
    top = to_host(ssd.blobs[ssd.plan.find("makes_detections").layer.spec.tops[0]]).reshape(-1, 7)
    top = top[top[:, 1] >= 0]
    rows = detection_rows(ssd)
    np.testing.assert_allclose(rows[:, :3], top[:, :3])
    np.testing.assert_allclose(rows[:, 3:], top[:, 3:] * 128 - [0, 0, 1, 1], rtol=1e-5, atol=1e-4)
    # neither (the train net: a Proposal, but its head ends in losses) is E0641
    assert has_detections(str(TEST_NET)) and has_detections(str(NETS / "ssd_digits.net"))
    assert not has_detections(str(NETS / "faster_rcnn_digits.net"))
    train = build_test_net(str(NETS / "faster_rcnn_digits.net"), None, CPU, data, 0)
    train.forward()
    with pytest.raises(NetdslError) as e:
        detection_rows(train)
    assert e.value.diagnostic.code == "E0641"


def test_head_is_found_by_structure_not_by_name(tmp_path):
    text = TEST_NET.read_text()
    renamed = tmp_path / "renamed.net"
    renamed.write_text(text.replace('top: "cls_prob"', 'top: "scores"').replace('top: "bbox_pred"', 'top: "deltas"')
                       .replace('bottom: "cls_prob"', 'bottom: "scores"'))
    start = text.index('layer {\n  name: "bbox_pred"')
    no_reg = tmp_path / "no_reg.net"
    no_reg.write_text(text[:start] + text[text.index("layer {", start + 1):])
    for path, want in [(TEST_NET, ("rois", "cls_prob", "bbox_pred")), (renamed, ("rois", "scores", "deltas")),
                       (no_reg, ("rois", "cls_prob", None))]:
        g = check_file(str(path), phase="TEST").graph
        assert frcnn.head(g.nodes, g.outputs) == want, path
    g = check_file(str(NETS / "faster_rcnn_digits.net"), phase="TEST").graph
    assert frcnn.head(g.nodes, g.outputs) is None


def test_detect_on_a_net_without_detections_exits_2(tmp_path, capsys):
    assert main(["detect", str(NETS / "faster_rcnn_digits.net"), "--weights", "w.npz", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "E0641" in err and "faster_rcnn_digits_test.net" in err
