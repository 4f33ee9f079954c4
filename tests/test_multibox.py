"""SSD's MultiBoxLoss (netdsl/layers/multibox.py) against hand-worked examples of the fork's
bbox_util.cpp: MatchBBox (bipartite, then per prediction), MineHardExamples (MAX_NEGATIVE and
HARD_EXAMPLE), the loss value and where its gradient goes. The float64 gradient checks are the
MultiBoxLoss rows of tests/test_layers.py CASES."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_layers import build_layer, run

from netdsl.errors import NetdslError
from netdsl.layers.multibox import GroundTruth, match_bbox
from netdsl.layers.ssd import decode_boxes


def _gt(*boxes, labels=None):
    rows = np.array([[0, (labels or [1] * len(boxes))[k], k, *b, 0] for k, b in enumerate(boxes)], float)
    return GroundTruth(rows)


def _match(priors, gt, match_type, threshold=0.5):
    pri = np.array(priors, np.float32)
    _, sizes = decode_boxes(pri, np.ones_like(pri), np.zeros_like(pri), "CORNER", True)
    return match_bbox(gt, pri, sizes, -1, match_type, threshold, False)


# gt0 = [0, 0, .4, .4] and gt1 = [.2, 0, .6, .4]; IoUs worked out by hand:
#   prior 0 [.15, 0, .55, .4]: gt0 .1/.22 = .4545, gt1 .14/.18 = .7778
#   prior 1 [0, 0, .3, .4]:    gt0 .12/.16 = .75,  gt1 .04/.24 = .1667
#   prior 2 [0, 0, .4, .35]:   gt0 .14/.16 = .875, gt1 .08/.22 = .3636
#   prior 3 [.7, .7, 1, 1]:    no overlap
PRIORS = [[0.15, 0, 0.55, 0.4], [0, 0, 0.3, 0.4], [0, 0, 0.4, 0.35], [0.7, 0.7, 1, 1]]
GT2 = _gt([0, 0, 0.4, 0.4], [0.2, 0, 0.6, 0.4])


def test_bipartite_takes_the_largest_pair_first():
    # .875 (prior 2, gt0) first, then gt1's best free prior, prior 0 (.7778); prior 1 stays unmatched
    idx, ov = _match(PRIORS, GT2, "BIPARTITE")
    assert idx.tolist() == [1, -1, 0, -1]
    np.testing.assert_allclose(ov, [0.14 / 0.18, 0.75, 0.875, 0.0], rtol=1e-6)


def test_per_prediction_adds_each_free_prior_above_the_threshold():
    idx, _ = _match(PRIORS, GT2, "PER_PREDICTION", 0.5)
    assert idx.tolist() == [1, 0, 0, -1]          # prior 1 -> gt0 (.75 >= .5)
    idx, _ = _match(PRIORS, GT2, "PER_PREDICTION", 0.8)
    assert idx.tolist() == [1, -1, 0, -1]         # .75 < .8


def test_bipartite_ties_go_to_the_lower_prior_and_gt():
    box = [0.1, 0.1, 0.5, 0.5]
    idx, _ = _match([box, box], _gt(box, box), "BIPARTITE")
    assert idx.tolist() == [0, 1]
    idx, _ = _match([box, box], _gt(box), "PER_PREDICTION")
    assert idx.tolist() == [0, 0]


def test_cross_boundary_priors_are_ignored():
    pri = np.array([[-0.1, 0, 0.4, 0.4], [0, 0, 0.4, 0.4]], np.float32)
    _, sizes = decode_boxes(pri, np.ones_like(pri), np.zeros_like(pri), "CORNER", True)
    idx, ov = match_bbox(_gt([0, 0, 0.4, 0.4]), pri, sizes, -1, "PER_PREDICTION", 0.5, True)
    assert idx.tolist() == [-2, 0] and ov[0] == 0


# One image, one gt; two classes (background 0, digit 1). Prior 0 is the gt box, prior 1 overlaps it
# .6 (unmatched at threshold .7 but not a negative: .6 >= neg_overlap .5), priors 2-4 are far away.
GT = [0.1, 0.1, 0.3, 0.3]
MINE_PRIORS = [GT, [0.1, 0.1, 0.3, 0.1 + 0.2 / 0.6], [0.6, 0.6, 0.8, 0.8], [0.5, 0.1, 0.7, 0.3], [0.1, 0.6, 0.3, 0.8]]
CONF = [[0, 1], [0, 5], [0, 1], [0, 3], [0, 2]]    # -log p(background) = log(1 + e^s)


def _mine_inputs(loc0=(0.5, -2.0, 0.0, 0.0)):
    loc = np.zeros((1, 5, 4))
    loc[0, 0] = loc0
    pri = np.array(MINE_PRIORS).reshape(-1)
    priors = np.stack([pri, np.full(pri.size, 0.1)])[None]
    label = np.array([[[[0, 1, 0, *GT, 0]]]], float)
    return loc.reshape(1, -1), np.array(CONF, float).reshape(1, -1), priors, label


def softplus(x):
    return math.log1p(math.exp(x))


def test_max_negative_mining_and_the_loss_by_hand():
    params = "multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 neg_pos_ratio: 2 neg_overlap: 0.5 }"
    layer, (loss,), saved = run("MultiBoxLoss", params, *_mine_inputs())
    # 1 positive -> 2 negatives: priors 3 and 4 (prior 1 has the largest loss but overlaps .6)
    # box: target (gt - prior) / .1 = 0, smooth L1 of [.5, -2, 0, 0] = .125 + 1.5; class: prior 0 is a digit
    want = 1.625 + softplus(-1) + softplus(3) + softplus(2)          # / 1 match (VALID)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    (dloc, dconf, dpri, dlab), _ = layer.backward(np, saved, [np.array(2.0)], [], [True, True, False, False])
    assert dpri is None and dlab is None
    np.testing.assert_allclose(dloc.reshape(5, 4)[0], 2 * np.array([0.5, -1.0, 0.0, 0.0]))
    assert not dloc.reshape(5, 4)[1:].any()
    dconf = dconf.reshape(5, 2)
    sig = lambda s: 1 / (1 + math.exp(-s))      # noqa: E731  p(digit) of logits [0, s]
    np.testing.assert_allclose(dconf[0], 2 * np.array([1 - sig(1), sig(1) - 1]))
    np.testing.assert_allclose(dconf[3], 2 * np.array([-sig(3), sig(3)]))
    np.testing.assert_allclose(dconf[4], 2 * np.array([-sig(2), sig(2)]))
    assert not dconf[1].any() and not dconf[2].any()     # neither mined nor matched: no gradient


def test_hard_example_mining_by_hand():
    # losses: prior 0 softplus(-1) + 1.625 = 1.94, prior 1 softplus(5) = 5.01, prior 3 softplus(3) = 3.05, ...
    # sample_size 2 picks priors 1 and 3: the positive prior 0 is dropped, so nothing is matched (normaliser 1)
    params = ("multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 mining_type: HARD_EXAMPLE "
              "sample_size: 2 }")
    _, (loss,), _ = run("MultiBoxLoss", params, *_mine_inputs())
    assert float(loss) == pytest.approx(softplus(5) + softplus(3), rel=1e-12)


def test_no_mining_scores_every_prior_and_normalisations():
    base = "multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 mining_type: NONE }"
    every = 1.625 + softplus(-1) + softplus(5) + softplus(1) + softplus(3) + softplus(2)
    _, (loss,), _ = run("MultiBoxLoss", base, *_mine_inputs())
    assert float(loss) == pytest.approx(every, rel=1e-12)
    _, (loss,), _ = run("MultiBoxLoss", base + " loss_param { normalization: FULL }", *_mine_inputs())
    assert float(loss) == pytest.approx(every / 5, rel=1e-12)       # N x P = 1 x 5


def test_propagate_down_false_drops_the_term():
    # the fork adds a term only while its bottom propagates (its LayerSetUp's default: loc and conf do)
    params = ("multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 neg_pos_ratio: 2 } "
              "propagate_down: false propagate_down: true propagate_down: false propagate_down: false")
    layer = build_layer("MultiBoxLoss", params, [(1, 20), (1, 10), (1, 2, 20), (1, 1, 1, 8)])
    (loss,), _ = layer.forward(np, list(_mine_inputs()), [])
    assert float(loss) == pytest.approx(softplus(-1) + softplus(3) + softplus(2), rel=1e-12)


def test_variance_in_target_keeps_the_forks_gradient():
    # both sides are divided by the variance (.1), and the gradient is copied back as the fork does,
    # without the 1/variance factor of the exact derivative
    params = ("multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 encode_variance_in_target: true "
              "loc_loss_type: L2 }")
    layer, (loss,), saved = run("MultiBoxLoss", params, *_mine_inputs(loc0=(0.05, -0.2, 0.0, 0.0)))
    box = 0.5 * (0.5 ** 2 + 2.0 ** 2)
    assert float(loss) == pytest.approx(box + softplus(-1) + softplus(3) + softplus(2) + softplus(1), rel=1e-6)
    (dloc, _, _, _), _ = layer.backward(np, saved, [np.array(1.0)], [], [True, True, False, False])
    np.testing.assert_allclose(dloc.reshape(5, 4)[0], [0.5, -2.0, 0.0, 0.0], rtol=1e-6)


def test_bad_ground_truth_and_shapes_are_located_errors():
    loc, conf, priors, label = _mine_inputs()
    layer = build_layer("MultiBoxLoss", "multibox_loss_param { num_classes: 2 }",
                        [loc.shape, conf.shape, priors.shape, label.shape])
    for bad in ([0, 0, 0, *GT, 0], [0, 2, 0, *GT, 0], [1, 1, 0, *GT, 0]):    # background, label 2, item 1 of 1
        with pytest.raises(NetdslError) as e:
            layer.forward(np, [loc, conf, priors, np.array(bad, float).reshape(1, 1, 1, 8)], [])
        assert e.value.diagnostic.code == "E0640" and e.value.diagnostic.pos is not None
    with pytest.raises(NetdslError) as e:
        build_layer("MultiBoxLoss", "multibox_loss_param { num_classes: 2 }", [(1, 20), (1, 10), (1, 2, 20), (1, 5)])
    assert "E0380" in {d.code for d in e.value.diagnostics}
    with pytest.raises(NetdslError) as e:       # 5 priors, but a head predicting 6 boxes
        build_layer("MultiBoxLoss", "multibox_loss_param { num_classes: 2 }", [(1, 24), (1, 10), (1, 2, 20), (1, 1, 1, 8)])
    assert "E0371" in {d.code for d in e.value.diagnostics}
    with pytest.raises(NetdslError) as e:
        build_layer("MultiBoxLoss", "multibox_loss_param { num_classes: 2 share_location: false }",
                    [(1, 40), (1, 10), (1, 2, 20), (1, 1, 1, 8)])
    assert "mining_type" in str(e.value)


def test_padding_rows_and_difficult_boxes():
    loc, conf, priors, label = _mine_inputs()
    pad = np.array([-1] * 8, float)
    difficult = np.array([0, 1, 1, 0.6, 0.6, 0.8, 0.8, 1], float)
    rows = np.concatenate([label.reshape(1, 8), pad[None], difficult[None]]).reshape(1, 1, 3, 8)
    params = "multibox_loss_param { num_classes: 2 overlap_threshold: 0.7 neg_pos_ratio: 2 %s}"
    _, (base,), _ = run("MultiBoxLoss", params % "", loc, conf, priors, label)
    _, (skip,), _ = run("MultiBoxLoss", params % "use_difficult_gt: false ", loc, conf, priors, rows)
    assert float(skip) == pytest.approx(float(base), rel=1e-12)
    _, (use,), _ = run("MultiBoxLoss", params % "", loc, conf, priors, rows)
    assert float(use) != pytest.approx(float(base))          # prior 2 is now a positive
