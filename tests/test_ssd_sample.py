"""The SSD sample: DigitScenes' SSD labels, a short training run of nets/ssd_digits.net (on
64 x 64 scenes) whose loss falls, `netdsl detect` and the mAP `netdsl test` reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import needs_mnist, shared_data_dir

from netdsl.cli import main
from netdsl.data.png import read_png, write_png
from netdsl.evaluate import APCounter, voc_ap
from netdsl.layers.data import ssd_label

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "nets" / "ssd_digits.net"
SOLVER = ROOT / "nets" / "ssd_digits_solver.net"


def test_ssd_label_rows_by_hand():
    rows = ssd_label(np.array([[2, 3, 9, 12, 5], [0, 0, 31, 15, 1]], np.float32), (16, 32))
    assert rows.shape == (1, 1, 2, 8)
    np.testing.assert_allclose(rows[0, 0, 0], [0, 5, 0, 2 / 32, 3 / 16, 10 / 32, 13 / 16, 0])
    np.testing.assert_allclose(rows[0, 0, 1], [0, 1, 1, 0, 0, 1, 1, 0])      # the whole image
    assert (ssd_label(np.zeros((0, 5)), (16, 32)) == -1).all()


def test_voc_ap_by_hand():
    # 2 gt boxes of class 1; detections by score: a false positive, then both boxes:
    # precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> made monotone: 2/3 over the whole recall range
    c = APCounter()
    gt = np.array([[0, 0, 9, 9, 1], [20, 20, 29, 29, 1]], float)
    c.add([[0, 1, 0.9, 40, 40, 49, 49], [0, 1, 0.8, 0, 0, 9, 9], [0, 1, 0.7, 21, 21, 29, 29],
           [0, 2, 0.95, 0, 0, 9, 9]], gt)
    r = c.result()
    assert r["ap"] == {"1": pytest.approx(2 / 3)} and r["mAP"] == pytest.approx(2 / 3)   # class 2 has no gt
    # a second detection of a taken box is a false positive; a class with gt but no detection scores 0
    c = APCounter()
    c.add([[0, 1, 0.9, 0, 0, 9, 9], [0, 1, 0.8, 0, 0, 9, 9]], [[0, 0, 9, 9, 1], [0, 0, 9, 9, 3]])
    assert c.per_class() == {1: pytest.approx(1.0), 3: 0.0}
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)


DATA = ["--data-dir", str(shared_data_dir())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """nets/ssd_digits.net on 64 x 64 scenes, trained 50 iterations (lr 0.003): (net file, weights, losses)."""
    from netdsl.backend import CPU
    from netdsl.train import Trainer
    d = tmp_path_factory.mktemp("ssd")
    net = d / "ssd.net"
    net.write_text(NET.read_text().replace("height: 128 width: 128", "height: 64 width: 64"))
    solver = d / "solver.net"
    solver.write_text(SOLVER.read_text().replace('net: "ssd_digits.net"', f'net: "{net}"')
                      .replace("display: 200", "display: 1").replace("average_loss: 200", "average_loss: 1")
                      .replace("base_lr: 0.001", "base_lr: 0.003"))
    Trainer(str(solver), CPU, max_iter=50, out=str(d), progress=False, data_dir=str(shared_data_dir())).run()
    losses = [json.loads(line)["loss"] for line in (d / "ssd_digits_metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    return net, d / "ssd_digits_iter_50.npz", losses


@needs_mnist
def test_short_training_lowers_the_loss(tiny):
    _, weights, losses = tiny
    assert len(losses) == 50 and weights.exists()
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


@needs_mnist
def test_detect_and_map(tiny, tmp_path, capsys):
    net, weights, _ = tiny
    assert main(["detect", str(net), "--weights", str(weights), "--scenes", "2", "-o", str(tmp_path / "d"),
                 "--threshold", "0.05", *DATA]) == 0
    out = json.loads((tmp_path / "d" / "detections.json").read_text())
    assert [x["png"] for x in out["images"]] == ["scene_0000_detections.png", "scene_0001_detections.png"]
    for x in out["images"]:
        assert read_png(tmp_path / "d" / x["png"]).shape == (64, 64, 3) and x["gt_boxes"]
        for label, score, *box in x["detections"]:
            assert 1 <= label <= 10 and 0 <= score <= 1 and box[0] <= box[2] + 1 and box[1] <= box[3] + 1
    # a PNG of another size: padded for the net, boxes clipped back to the picture
    write_png(tmp_path / "in.png", np.full((50, 70, 3), 30, np.uint8))
    assert main(["detect", str(net), "--weights", str(weights), "--image", str(tmp_path / "in.png"),
                 "-o", str(tmp_path / "q"), "--threshold", "0", *DATA]) == 0
    x = json.loads((tmp_path / "q" / "detections.json").read_text())["images"][0]
    assert x["image_size"] == [50, 70] and x["gt_boxes"] == []
    assert read_png(tmp_path / "q" / "in_detections.png").shape == (50, 70, 3)
    boxes = np.array([d[2:] for d in x["detections"]]).reshape(-1, 4)
    assert boxes[:, [0, 2]].max(initial=0) <= 69 and boxes[:, [1, 3]].max(initial=0) <= 49
    # --max-side shrinks the picture for the net; the JSON keeps the original's pixels
    assert main(["detect", str(net), "--weights", str(weights), "--image", str(tmp_path / "in.png"),
                 "-o", str(tmp_path / "s"), "--threshold", "0", "--max-side", "35", *DATA]) == 0
    x = json.loads((tmp_path / "s" / "detections.json").read_text())["images"][0]
    assert x["image_size"] == [50, 70] and x["scale"] == pytest.approx(0.5)
    assert read_png(tmp_path / "s" / "in_detections.png").shape == (25, 35, 3)
    boxes = np.array([d[2:] for d in x["detections"]]).reshape(-1, 4)
    assert boxes[:, [0, 2]].max(initial=0) <= 69 and boxes[:, [1, 3]].max(initial=0) <= 49
    capsys.readouterr()
    assert main(["test", str(net), "--weights", str(weights), "--iterations", "3", "--json", *DATA]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["mAP"] <= 1 and r["images"] == 3 and r["gt_boxes"] >= 3


@needs_mnist
def test_detect_bad_input_exits_2(tiny, tmp_path, capsys):
    net, weights, _ = tiny
    cases = [(["--scenes", "0"], "E0632"), (["--threshold", "2"], "E0632"), (["--max-side", "8"], "E0632"),
             (["-o", "/proc/nope"], "E0633")]
    for extra, code in cases:
        args = ["detect", str(net), "--weights", str(weights), "-o", str(tmp_path / "o"), *extra, *DATA]
        assert main(args) == 2
        assert code in capsys.readouterr().err
    assert main(["detect", str(ROOT / "nets" / "lenet.net"), "--weights", "w.npz", "-o", str(tmp_path)]) == 2
    assert "E0641" in capsys.readouterr().err
