"""`netdsl gradcheck`: central differences (against closed forms), the kink rule, every sample net
passing, and a layer whose backward is broken (monkeypatched) failing with located errors."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

import netdsl
from netdsl import gradient_check as gc
from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.layers.dense import InnerProduct

NETS = Path(__file__).resolve().parents[1] / "nets"


def test_numeric_grad_against_closed_forms():
    x = np.array([[0.3, -1.2], [2.0, 0.7]])
    np.testing.assert_allclose(gc.numeric_grad(lambda: float((x ** 3).sum()), x), 3 * x ** 2, rtol=1e-8)
    np.testing.assert_allclose(gc.numeric_grad(lambda: float(np.sin(x).sum()), x), np.cos(x), rtol=1e-8)
    assert x[0, 0] == 0.3                                  # restored


def test_kinks_are_skipped_and_wrong_smooth_gradients_are_not():
    r = np.array([0.7, -1.3])
    x = np.array([0.0, 0.0])                               # ReLU's kink: Caffe's gradient there is 0
    relu = lambda: float((np.maximum(x, 0) * r).sum())     # noqa: E731
    f0 = relu()
    assert gc._coordinate(relu, f0, x, (0,), 0.0, 1e-5, 1e-5)[0] == "kink"
    assert gc._coordinate(relu, f0, x, (0,), 5.0, 1e-5, 1e-5)[0] == "fail"   # outside both slopes
    y = np.array([0.4, 3.0])
    square = lambda: float((y ** 2).sum() * 50)            # noqa: E731   large curvature, no kink
    f0 = square()
    assert gc._coordinate(square, f0, y, (1,), 300.0, 1e-5, 1e-5)[0] == "pass"
    assert gc._coordinate(square, f0, y, (1,), 300.0 * 1.001, 1e-5, 1e-5)[0] == "fail"


def test_lstm_sample_passes():
    r = netdsl.gradcheck(str(NETS / "lstm_sequence.net"))
    assert r.ok and {row.layer for row in r.rows} == {"lstm", "pred", "loss"}
    assert all(row.checked == min(row.size, 40) for row in r.rows)


def test_lenet_passes(mnist_dir):
    r = netdsl.gradcheck(str(NETS / "lenet.net"), data_dir=mnist_dir, samples=10)
    assert r.ok and len(r.rows) == 15
    assert [row.what for row in r.rows if row.layer == "conv1"] == ["param 0", "param 1"]   # data needs no gradient


def test_rpn_passes(mnist_dir):
    r = netdsl.gradcheck(str(NETS / "rpn.net"), data_dir=mnist_dir, samples=3)
    assert r.ok and any(row.type == "SmoothL1Loss" for row in r.rows)


def test_multilabel_sample_passes_both_ways(mnist_dir):
    for stage in ("softmax", "sigmoid"):
        r = netdsl.gradcheck(str(NETS / "multilabel_digits.net"), data_dir=mnist_dir, samples=5, stages=(stage,))
        assert r.ok, r.render()


def test_a_broken_backward_fails_with_a_located_error(monkeypatch):
    right = InnerProduct.backward

    def broken(self, xp, saved, dtops, params, need):
        dbottoms, dparams = right(self, xp, saved, dtops, params, need)
        return dbottoms, [dparams[0] * 1.01] + list(dparams[1:])     # 1% off in the weights' gradient
    monkeypatch.setattr(InnerProduct, "backward", broken)
    r = netdsl.gradcheck(str(NETS / "lstm_sequence.net"))
    assert not r.ok
    (bad,) = [row for row in r.rows if not row.ok]
    assert (bad.layer, bad.what) == ("pred", "param 0") and bad.failed == 16
    (d,) = r.diagnostics()
    assert d.code == "E0743" and d.pos.file.endswith("lstm_sequence.net") and "'pred' param 0" in d.message
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["gradcheck", str(NETS / "lstm_sequence.net"), "--layers", "pred"]) == 2
    assert "FAIL" in out.getvalue() and "1 layer(s) fail" in out.getvalue() and "error[E0743]" in err.getvalue()


def test_cli_passes_and_checks_its_arguments():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["gradcheck", str(NETS / "lstm_sequence.net"), "--layers", "pred,loss", "--samples", "5"]) == 0
    assert "4 of 4 blobs pass" in out.getvalue()
    for bad, code in (({"eps": 0.0}, "E0741"), ({"layers": ["lstn"]}, "E0740"), ({"layers": ["input"]}, "E0742")):
        with pytest.raises(NetdslError) as e:
            gc.gradcheck(str(NETS / "lstm_sequence.net"), **bad)
        assert e.value.diagnostic.code == code


def test_a_deploy_net_is_checked_as_with_force_backward():
    """No loss: every layer with a backward, every top, and every bottom force_backward reaches."""
    path = NETS.parents[1] / "shared" / "reference" / "caffe" / "examples_mnist_lenet.prototxt"
    if not path.exists():
        pytest.skip("shared/reference is not available")
    r = netdsl.gradcheck(str(path), phase="TEST", samples=3)
    assert r.ok and ("conv1", "bottom 'data'") in {(row.layer, row.what) for row in r.rows}
    assert r.rows[-1].type == "Softmax"
