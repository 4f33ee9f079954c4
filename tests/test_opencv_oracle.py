"""Deploy nets against an independent Caffe runtime: OpenCV 4's Caffe importer
(`cv2.dnn.readNetFromCaffe`, removed in OpenCV 5; an optional test dependency), given the same
random weights through a .caffemodel that netdsl writes (Net.save) and the same input. Every blob
that is not overwritten in place must agree to 1e-4 of its largest value (float32). The nets: BVLC's
LeNet, AlexNet and GoogLeNet (shared/reference/caffe) and the real deploy nets of
shared/reference/real."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import DEPLOY_NETS

from netdsl import syntax
from netdsl.check import check
from netdsl.executor import Net
from netdsl.plan import lower

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
    pytest.skip("this OpenCV has no Caffe importer (OpenCV 5 removed it)", allow_module_level=True)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

DEPLOY = DEPLOY_NETS + [
    # forks: ConvolutionDepthwise and ShuffleChannel (ShuffleNet), `ceil_mode: false` pooling (DenseNet)
    ("real/farmingyard+ShuffleNet__shufflenet_1x_g3_deploy.prototxt", (1, 3, 64, 64)),
    ("real/shicai+DenseNet-Caffe__DenseNet_201.prototxt", (1, 3, 64, 64)),
    # SSD's fork: Normalize, PriorBox, Permute, DetectionOutput (its rows compared as a set, see below)
    ("real/xzgz+caffe-ssd__models_VGGNet_VOC0712_SSD_300x300_deploy.prototxt", (1, 3, 300, 300)),
]


# ------------------------------------------------------------------------------------------ test

def random_weights(net: Net, rng) -> None:
    """Weights that keep activations in range through a deep net: He-scaled filters, small biases,
    BatchNorm statistics with scale factor 1, Scale near 1, PReLU slopes in [0, 0.5)."""
    for s in net.plan.steps:
        for i, p in enumerate(net.params.get(s.node.name, [])):
            shape, t = p.data.shape, s.layer.type
            if t == "BatchNorm":
                a = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape), np.ones(shape)][i]
            elif t == "Scale":
                a = rng.normal(1.0 if i == 0 else 0.0, 0.1, shape)
            elif t == "PReLU":
                a = rng.uniform(0, 0.5, shape)
            elif len(shape) > 1:
                fan_in = int(np.prod(shape[1:])) if t != "Deconvolution" else int(shape[0] * np.prod(shape[2:]))
                a = rng.normal(0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            else:
                a = rng.normal(0, 0.1, shape)
            p.data[...] = a


def detection_rows(rows) -> np.ndarray:
    """DetectionOutput's [image, label, score, xmin, ymin, xmax, ymax] rows as a set, ordered by image,
    label and descending score: the fork (and netdsl) emit each image's rows by label, OpenCV by score."""
    r = np.asarray(rows, np.float64).reshape(-1, 7)
    return r[np.lexsort((r[:, 3], -r[:, 2], r[:, 1], r[:, 0]))]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not available")
@pytest.mark.parametrize("name, shape", DEPLOY, ids=[d[0].split("__")[-1].split("/")[-1] for d in DEPLOY])
def test_deploy_net_matches_opencv(name, shape, tmp_path):
    path = REFERENCE / name
    shaped = check(syntax.parse(path.read_text(), str(path)), phase="TEST")
    data = next(t for s in shaped.graph.nodes if s.layer.fed_by_caller for t in s.tops)
    shaped = check(syntax.parse(path.read_text(), str(path)), phase="TEST", hints={data: shape})
    net = Net(lower(shaped, runnable=True), np, dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    random_weights(net, rng)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    net.forward(**{data: x})
    model = tmp_path / "w.caffemodel"
    net.save(str(model))                      # netdsl's writer: what OpenCV reads is what netdsl wrote
    cv = cv2.dnn.readNetFromCaffe(str(path), str(model))
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    cv.enableFusion(False)
    cv.setInput(x, data)
    # the last writer of every blob (an in-place chain's last layer; OpenCV may reuse the rest)
    last = {}
    for s in net.plan.steps:
        if not s.layer.fed_by_caller and s.node.tops:
            last[s.node.tops[0].split("#")[0]] = s
    names = [s.node.name for s in last.values()]
    outs = cv.forward(names)
    assert len(outs) == len(names)
    compared = 0
    for s, got in zip(last.values(), outs):
        want = net.values[s.node.tops[0]]
        assert got.size == want.size, (s.node.name, got.shape, want.shape)
        scale = max(float(np.abs(want).max()), 1e-6)
        got = got.reshape(want.shape)
        if s.layer.type == "DetectionOutput":     # same rows, other order: image and label exact, the rest to 1e-4
            got, want = detection_rows(got), detection_rows(want)
            np.testing.assert_array_equal(got[:, :2], want[:, :2])
            got, want, scale = got[:, 2:], want[:, 2:], 1.0
        err = float(np.abs(got - want).max())
        assert err <= 1e-4 * scale, f"{name}: blob '{s.node.tops[0]}' ({s.layer.type} '{s.node.name}') differs " \
                                    f"by {err:.3g} (largest value {scale:.3g})"
        compared += 1
    assert compared >= 5
