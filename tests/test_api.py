"""The Python API: netdsl.load, forward/backward, blobs and params, save and load."""
from __future__ import annotations

import numpy as np
import pytest

import netdsl
from netdsl.errors import NetdslError

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.net"
    p.write_text(NET)
    return str(p)


def inputs():
    rng = np.random.default_rng(0)
    return {"data": rng.standard_normal((4, 3, 8, 8)).astype(np.float32), "label": np.array([0, 1, 2, 1], np.float32)}


def test_forward_backward_and_views(tiny):
    net = netdsl.load(tiny, phase="train")
    out = net.forward(**inputs())
    assert set(out) == {"loss"}
    assert out["loss"].shape == ()
    assert net.blobs["conv1"].data.shape == (4, 5, 6, 6)
    assert (net.blobs["conv1"].data >= 0).all()               # the in-place ReLU's output
    net.backward()
    w, b = net.params["conv1"]
    assert w.data.shape == (5, 3, 3, 3) and b.data.shape == (5,)
    assert np.abs(w.grad).sum() > 0
    assert net.blobs["fc"].grad.shape == (4, 3)


def test_gradient_matches_finite_difference(tiny):
    net = netdsl.load(tiny, phase="train", dtype="float64")
    x = {k: v.astype(np.float64) for k, v in inputs().items()}
    net.forward(**x)
    net.backward()
    w = net.params["fc"][0]
    analytic = w.grad[1, 7]
    eps = 1e-6
    w.data[1, 7] += eps
    up = float(net.forward(**x)["loss"])
    w.data[1, 7] -= 2 * eps
    down = float(net.forward(**x)["loss"])
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_save_and_load_roundtrip(tiny, tmp_path):
    a = netdsl.load(tiny, seed=1)
    path = str(tmp_path / "w.npz")
    a.save(path)
    b = netdsl.load(tiny, seed=2, weights=path)
    for name, ps in a.params.items():
        for p, q in zip(ps, b.params[name]):
            assert np.array_equal(p.data, q.data)


def test_missing_input_is_a_clear_error(tiny):
    net = netdsl.load(tiny)
    with pytest.raises(NetdslError, match="missing label"):
        net.forward(data=inputs()["data"])


def test_load_rejects_mismatched_weights(tiny, tmp_path):
    path = str(tmp_path / "w.npz")
    np.savez(path, **{"fc/0": np.zeros((7, 180), np.float32)})
    with pytest.raises(NetdslError, match="blob 0 of layer .fc. from .*: it is 7x180 there but the net needs 3x180") as e:
        netdsl.load(tiny, weights=path)
    assert "rename the layer" in e.value.diagnostic.help
