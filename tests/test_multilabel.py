"""Multi-label classification: SoftmaxWithLoss's soft labels, the MultiLabelDecode layer, the
multi-label metrics of `netdsl test`, and the MultiDigits data layer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_layers import F64, build_layer, forward, run

from netdsl.errors import NetdslError


def _reference_soft_loss(x, t, axis, mode):
    """-sum label log softmax in float64, written out, and Caffe's normaliser for `mode`."""
    logp = x - x.max(axis=axis, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=axis, keepdims=True))
    total = -(t * logp).sum()
    outer = math.prod(x.shape[:axis])
    inner = math.prod(x.shape[axis + 1:])
    return total / max(1, {"FULL": outer * inner, "VALID": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode])


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_soft_label_loss_and_gradient_against_float64_reference(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 2))
    t = rng.uniform(0, 1, x.shape)
    t /= t.sum(axis=1, keepdims=True)
    layer, (loss,), saved = run("SoftmaxWithLoss", f"loss_param {{ normalization: {mode} }}", x, t)
    assert float(loss) == pytest.approx(_reference_soft_loss(x, t, 1, mode), rel=1e-12)
    (dx, dt), _ = layer.backward(np, saved, [np.array(2.0)], [], [True, False])
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    norm = _reference_soft_loss(x, t, 1, mode) / _reference_soft_loss(x, t, 1, "NONE")
    np.testing.assert_allclose(dx, 2.0 * (p - t) * norm, rtol=1e-12, atol=1e-15)
    assert dt is None


def test_soft_label_paper_example():
    """Mahajan et al.'s [0, 0.5, 0.5, 0]: the loss is the mean of the two tags' -log p."""
    x = np.array([[0.3, 1.2, -0.4, 2.0]])
    _, (loss,), _ = run("SoftmaxWithLoss", "", x, np.array([[0, 0.5, 0.5, 0]]))
    logp = x[0] - np.log(np.exp(x[0]).sum())
    assert float(loss) == pytest.approx(-(logp[1] + logp[2]) / 2, rel=1e-12)


@pytest.mark.parametrize("axis", [1, 2])
def test_one_hot_soft_labels_equal_hard_labels(axis):
    rng = np.random.default_rng(1)
    shape = (3, 4, 5)
    x = rng.standard_normal(shape)
    c = shape[axis]
    hard = rng.integers(0, c, shape[:axis] + shape[axis + 1:]).astype(F64)
    onehot = np.moveaxis(np.eye(c)[hard.astype(int)], -1, axis)
    params = f"softmax_param {{ axis: {axis} }}"
    lh, (loss_h,), sh = run("SoftmaxWithLoss", params, x, hard)
    ls, (loss_s,), ss = run("SoftmaxWithLoss", params, x, onehot)
    assert float(loss_s) == pytest.approx(float(loss_h), rel=1e-12)
    (gh, _), _ = lh.backward(np, sh, [np.array(1.0)], [], [True, False])
    (gs, _), _ = ls.backward(np, ss, [np.array(1.0)], [], [True, False])
    np.testing.assert_allclose(gs, gh, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("row, what", [([0.2, 0.3, 0.2], "sums to 0.7"), ([1.2, -0.2, 0.0], "negative entry")])
def test_a_soft_label_row_that_is_no_distribution_is_a_located_error(row, what):
    t = np.array([[1.0, 0, 0], [0.5, 0.5, 0], row, [0, 0, 1]])
    layer = build_layer("SoftmaxWithLoss", "", [(4, 3), (4, 3)])
    with pytest.raises(NetdslError) as e:
        forward(layer, [np.zeros((4, 3)), t], [])
    d = e.value.diagnostic
    assert d.code == "E0661" and "sample 2" in d.message and what in d.message and "'L'" in d.message


def test_soft_label_error_names_the_spatial_position():
    t = np.full((2, 3, 2, 2), 1 / 3)
    t[1, :, 0, 1] = [0.9, 0.9, 0.0]
    layer = build_layer("SoftmaxWithLoss", "", [(2, 3, 2, 2), (2, 3, 2, 2)])
    with pytest.raises(NetdslError, match=r"sample 1 \(position \(1, 0, 1\)\) sums to 1.8"):
        forward(layer, [np.zeros((2, 3, 2, 2)), t], [])


def test_soft_labels_refuse_ignore_label_at_check_time():
    from netdsl import check, syntax
    text = """layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "t" top: "l" loss_param { ignore_label: -1 } }"""
    with pytest.raises(NetdslError) as e:
        check.check(syntax.parse(text, "t.net"), phase="TRAIN")
    d = e.value.diagnostics[0]
    assert d.code == "E0660" and d.pos.line == 2 and "soft labels" in d.message


def test_hard_labels_keep_their_count_error():
    """Labels neither one per prediction nor of the scores' shape: Caffe's count error, unchanged."""
    with pytest.raises(NetdslError) as e:
        build_layer("SoftmaxWithLoss", "", [(4, 3), (4, 2)])
    assert e.value.diagnostics[0].code == "E0360"


# ---------------------------------------------------------------------------------- decoding

def decode(params, probs):
    _, (pred,), _ = run("MultiLabelDecode", params, np.asarray(probs, F64))
    return pred.astype(int).tolist()


def test_cumulative_rule_on_hand_made_cases():
    probs = [[0.97, 0.02, 0.01, 0.00],      # one confident tag
             [0.02, 0.50, 0.46, 0.02],      # two tags of about 0.5: 0.5 + 0.46 = 0.96 >= 0.95
             [0.30, 0.30, 0.30, 0.10],      # 0.9 after three: the fourth is needed too
             [0.10, 0.20, 0.65, 0.05]]      # ranked 0.65, 0.2, 0.1: 0.85 < 0.95 -> 0.95 reached at three
    assert decode("", probs) == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert decode("multilabel_decode_param { threshold: 0.8 }", probs) == \
        [[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 0]]
    # a tag alone at 1.0 is taken alone, whatever the threshold
    assert decode("multilabel_decode_param { threshold: 1.0 }", [[0, 1.0, 0]]) == [[0, 1, 0]]


def test_cumulative_ties_take_the_lower_class_first():
    assert decode("multilabel_decode_param { threshold: 0.5 }", [[0.25, 0.25, 0.25, 0.25]]) == [[1, 1, 0, 0]]


def test_top_k_and_threshold_modes():
    probs = [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]
    assert decode("multilabel_decode_param { mode: TOP_K top_k: 2 }", probs) == [[0, 1, 1], [1, 0, 1]]
    assert decode("multilabel_decode_param { mode: THRESHOLD threshold: 0.3 }", probs) == [[0, 1, 1], [1, 0, 1]]
    assert decode("multilabel_decode_param { mode: THRESHOLD threshold: 0.9 }", probs) == [[0, 0, 0], [0, 0, 0]]


def test_decode_on_another_axis():
    probs = np.array([[[0.96, 0.04], [0.02, 0.5], [0.02, 0.46]]])        # (1, 3 classes, 2 positions)
    pred = decode("multilabel_decode_param { axis: 1 }", probs)
    assert pred == [[[1, 0], [0, 1], [0, 1]]]


@pytest.mark.parametrize("params, code", [
    ("multilabel_decode_param { threshold: 1.5 }", "E0107"),
    ("multilabel_decode_param { mode: TOP_K top_k: 0 }", "E0107"),
    ("multilabel_decode_param { mode: TOP_K top_k: 4 }", "E0361")])
def test_decode_params_are_checked(params, code):
    with pytest.raises(NetdslError) as e:
        build_layer("MultiLabelDecode", params, [(2, 3)])
    assert e.value.diagnostics[0].code == code


# ---------------------------------------------------------------------------------- metrics

def test_tag_metrics_by_hand():
    from netdsl.evaluate import tag_metrics
    truth = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]])
    scores = np.array([[0.9, 0.05, 0.05], [0.1, 0.5, 0.4], [0.2, 0.1, 0.7], [0.3, 0.4, 0.3]])
    m = tag_metrics(pred, truth, scores)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["recall"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0) / 4)
    assert m["exact"] == pytest.approx(0.25) and m["samples"] == 4
    # class 0: scores 0.9 (T), 0.3 (T), 0.2, 0.1 -> ranks 1, 2: AP 1
    # class 1: 0.5 (T), 0.4, 0.1, 0.05 (T) -> precision 1/1 at rank 1, 2/4 at rank 4: AP 0.75
    # class 2: 0.7 (T), ... -> AP 1
    assert m["mAP"] == pytest.approx((1 + 0.75 + 1) / 3)


def test_tag_metrics_empty_sets_and_absent_classes():
    from netdsl.evaluate import tag_metrics
    m = tag_metrics(np.zeros((2, 3)), np.array([[0, 0, 0], [0, 1, 0]]), np.full((2, 3), 0.5))
    assert m["f1"] == pytest.approx(0.5) and m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["mAP"] == pytest.approx(0.5)      # class 1 only: on a tie its true sample (the 2nd) ranks 2nd


# ---------------------------------------------------------------------------------- DigitTags and the sample

NET = Path(__file__).resolve().parents[1] / "nets" / "multilabel_digits.net"


def test_digit_tags_are_the_classes_present(mnist_dir):
    from test_layers import make_net

    from netdsl.data.scenes import DigitScenes
    text = ('layer { name: "t" type: "DigitTags" top: "data" top: "label" '
            'digit_tags_param { batch_size: 6 labels: %s seed: 3 } }')
    soft = make_net(text % "SOFT", "TEST", data_dir=mnist_dir, seed=2)
    hot = make_net(text % "MULTI_HOT", "TEST", data_dir=mnist_dir, seed=2)
    soft.forward(), hot.forward()
    assert [soft.plan.blob_shapes[b] for b in ("data", "label")] == [(6, 1, 32, 32), (6, 10)]   # the shape rule
    assert soft.blobs["data"].data.shape == (6, 1, 32, 32) and soft.blobs["label"].data.shape == (6, 10)
    scenes = DigitScenes("train", mnist_dir, seed=5, height=32, width=32, max_digits=4, min_size=12, max_size=20)
    for k in range(6):
        image, gt = scenes.scene(k)
        present = sorted(set(int(c) - 1 for c in gt[:, 4]))
        np.testing.assert_array_equal(soft.blobs["data"].data[k], image)
        assert np.flatnonzero(hot.blobs["label"].data[k]).tolist() == present
        np.testing.assert_allclose(soft.blobs["label"].data[k][present], 1 / len(present))
        assert soft.blobs["label"].data[k].sum() == pytest.approx(1.0)
    soft.forward()                                  # the next batch continues at scene 6
    np.testing.assert_array_equal(soft.blobs["data"].data[0], scenes.scene(6)[0])
    assert soft.source("t").state() == {"cursor": 12}


def test_digit_tags_params_are_checked():
    with pytest.raises(NetdslError) as e:
        build_layer("DigitTags", "digit_tags_param { min_size: 30 max_size: 40 }", [], ntops=2)
    assert e.value.diagnostics[0].code == "E0107" and "max_size" in e.value.diagnostics[0].message


@pytest.mark.parametrize("stage", [[], ["--stage", "sigmoid"]])
def test_netdsl_test_reports_multilabel_metrics(tmp_path, mnist_dir, stage):
    import contextlib
    import io
    import json

    import netdsl
    from netdsl.cli import main
    net = netdsl.load(str(NET), phase="test", stages=tuple(stage[1:]), data_dir=mnist_dir)
    net.save(str(tmp_path / "w.npz"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["test", str(NET), "--weights", str(tmp_path / "w.npz"), "--iterations", "2", "--json",
                     "--data-dir", mnist_dir, *stage]) == 0
    r = json.loads(out.getvalue())
    assert r["samples"] == 200 and {"f1", "precision", "recall", "mAP", "exact"} <= set(r)
    assert 1 <= r["true_tags_per_sample"] <= 4 and all(0 <= r[k] <= 1 for k in ("f1", "precision", "recall", "mAP"))


def test_trainer_builds_test_nets_in_their_test_state(tmp_path, mnist_dir):
    from netdsl.backend import get_backend
    from netdsl.train import Trainer
    path = tmp_path / "solver.net"
    path.write_text(f'net: "{NET}"\ntrain_state {{ stage: "sigmoid" }}\ntest_state {{ stage: "sigmoid" }}\n'
                    f'test_iter: 1\ntest_interval: 100\nbase_lr: 0.01\nmax_iter: 0\nsnapshot_prefix: "{tmp_path}/r"\n')
    tr = Trainer(str(path), get_backend("cpu"), data_dir=mnist_dir, progress=False)
    assert [s.layer.type for s in tr.net.plan.steps][-1] == "SigmoidCrossEntropyLoss"
    assert [s.layer.type for s in tr.tests[0].plan.steps][-2:] == ["Sigmoid", "MultiLabelDecode"]
