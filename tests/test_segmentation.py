"""The segmentation sample (issue 10): DigitScenes' per-pixel labels, nets/segnet_digits.net (SegNet's
mask-driven Upsample) and the IoU figures `netdsl test` reports for a net that classifies pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import netdsl
from netdsl import commands, plan, syntax
from netdsl.backend import get_backend
from netdsl.check import check, check_file
from netdsl.data.scenes import IGNORE
from netdsl.errors import NetdslError
from netdsl.evaluate import PixelConfusion
from netdsl.executor import Net
from netdsl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
NET = ROOT / "nets" / "segnet_digits.net"
SOLVER = ROOT / "nets" / "segnet_digits_solver.net"

pytestmark = pytest.mark.usefixtures("mnist_dir")


def scenes_layer(fmt: str, tops: str = 'top: "data" top: "label"') -> str:
    return (f'layer {{ name: "s" type: "DigitScenes" {tops} digit_scenes_param {{ height: 40 width: 48 '
            f'max_digits: 3 min_size: 12 max_size: 30 label_format: {fmt} }} }}\n')


@pytest.mark.parametrize("fmt", ["FOREGROUND", "DIGIT"])
def test_digit_scenes_label_formats(fmt, mnist_dir):
    net = Net(plan.lower(check_text(scenes_layer(f"{fmt} noise: 0.5"))), np, data_dir=mnist_dir)
    source = net.states[0].source
    assert source.scenes.options["noise"] == 0.5
    for k in range(3):
        out = net.forward()
        image, label = out["data"], out["label"]
        assert image.shape == (1, 1, 40, 48) and label.shape == (1, 1, 40, 48)
        want_image, _, want = source.scenes.labelled_scene(k)
        np.testing.assert_array_equal(image[0], want_image)
        if fmt == "FOREGROUND":
            want = np.where(want == IGNORE, IGNORE, want > 0)
        np.testing.assert_array_equal(label[0, 0], want)


def check_text(text: str):
    return check(syntax.parse(text, "t.net"), phase="TEST")


def test_label_format_needs_two_tops():
    with pytest.raises(NetdslError) as e:
        check_text(scenes_layer("FOREGROUND", 'top: "data" top: "im_info" top: "gt_boxes"'))
    assert "E0202" in {d.code for d in e.value.diagnostics}
    with pytest.raises(NetdslError) as e:
        check_text(scenes_layer("BOXES"))
    assert "E0202" in {d.code for d in e.value.diagnostics}
    with pytest.raises(NetdslError) as e:
        check_text(scenes_layer("FOREGROUND noise: 1.5"))
    assert "E0107" in {d.code for d in e.value.diagnostics}


def test_pixel_confusion_pools_images_and_skips_ignored():
    net = netdsl.load(str(NET), phase="test")
    found = PixelConfusion.for_net(net)
    assert found is not None and found.classes == 2
    counter = PixelConfusion(found.step, 6)           # its ignore_label (255) and axis, six classes
    scores = np.zeros((1, 6, 2, 3))
    pred = np.array([[0, 1, 1], [2, 0, 0]])          # argmax per pixel
    np.put_along_axis(scores, pred[None, None], 1.0, axis=1)
    labels = np.array([[[[0, 1, 2], [2, IGNORE, 0]]]], float)
    counter.add(scores, labels)
    counter.add(scores, np.zeros_like(labels))     # a second image: every pixel background
    r = counter.result()
    # class 0: TP 2 + 3, FP (pred 0, label not 0) 0, FN (label 0, pred not 0) 0 + 3 -> 5 / 8
    # class 1: TP 1, FP 1 + 2 (label 2, then 0, where 1 predicted), FN 0 -> 1 / 4
    # class 2: TP 1, FP 1 (second image), FN 1 (label 2 where 1 predicted) -> 1 / 3
    assert r["iou/class0"] == pytest.approx(5 / 8)
    assert r["iou/class1"] == pytest.approx(0.25)
    assert r["iou/class2"] == pytest.approx(1 / 3)
    assert np.isnan(r["iou/class5"])                 # never labelled nor predicted: not averaged

    assert r["mean_iou"] == pytest.approx((5 / 8 + 1 / 4 + 1 / 3) / 3)
    assert r["pixel_accuracy"] == pytest.approx(7 / 11)     # the ignored pixel not counted


def test_classifier_nets_get_no_iou():
    assert PixelConfusion.for_net(netdsl.load(str(ROOT / "nets" / "lenet.net"), phase="test")) is None


def test_sample_checks_and_learns(mnist_dir, tmp_path):
    """A short run of the sample's own solver lowers the loss and lifts the held-out mean IoU."""
    for phase in ("TRAIN", "TEST"):
        check_file(str(NET), phase=phase)
    cpu = get_backend("cpu")
    before = commands.test_outputs(str(NET), None, 10, cpu, mnist_dir)
    trainer = Trainer(str(SOLVER), cpu, max_iter=300, data_dir=mnist_dir, out=str(tmp_path))
    weights = trainer.run().last_snapshot + trainer.weights_suffix
    after = commands.test_outputs(str(NET), weights, 10, cpu, mnist_dir)
    assert after["loss"] < before["loss"] / 2
    assert after["mean_iou"] > max(before["mean_iou"] + 0.2, 0.6)
    assert after["iou/class0"] > 0.9


def test_upsample_mask_positions_outside_the_plane_are_refused():
    """A mask fed from outside (the checker cannot see where it comes from) is checked when it runs,
    as the fork's CHECK_LT(idx, upsample_h * upsample_w) does."""
    text = ('layer { name: "in" type: "Input" top: "x" top: "mask" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }\n'
            'layer { name: "up" type: "Upsample" bottom: "x" bottom: "mask" top: "up" upsample_param { scale: 2 } }\n')
    net = Net(plan.lower(check_text(text)), np)
    ok = net.forward(x=np.ones((1, 1, 2, 2)), mask=np.array([[[[0, 3], [9, 15]]]], float))["up"]
    assert ok.reshape(-1).nonzero()[0].tolist() == [0, 3, 9, 15]
    with pytest.raises(NetdslError) as e:
        net.forward(x=np.ones((1, 1, 2, 2)), mask=np.array([[[[0, 3], [9, 16]]]], float))
    assert e.value.diagnostic.code == "E0621" and "[0, 16)" in e.value.diagnostic.message


def test_nearest_upsample_copies_blocks_and_takes_scale_only():
    """The YOLOv3 ports' one-bottom Upsample: each value fills a scale_h x scale_w block."""
    up = 'layer { name: "up" type: "Upsample" bottom: "x" top: "up" upsample_param { scale_h: 2 scale_w: 3 } }\n'
    net = Net(plan.lower(check_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 '
                                    'dim: 4 dim: 5 } } }\n' + up)), np)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(x=x)["up"], np.kron(x, np.ones((1, 1, 2, 3), np.float32)))
    with pytest.raises(NetdslError) as e:
        check_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
                   + up.replace("scale_h: 2 scale_w: 3", "upsample_h: 8 upsample_w: 8"))
    assert "E0108" in {d.code for d in e.value.diagnostics}
