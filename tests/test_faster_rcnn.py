"""py-faster-rcnn runs unchanged (issue 10): param_str read as its layers read it (a safe YAML
subset), its Python layers built as the built-in AnchorTarget / Proposal / ProposalTarget, the
RoIDataLayer's two layouts, the VGG16 end2end test net's forward, test.py's detections, and a short
training run of nets/faster_rcnn_digits.net."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import netdsl
from netdsl import boxes, syntax
from netdsl.check import check, check_file
from netdsl.errors import NetdslError
from netdsl.executor import Net
from netdsl.frcnn import detections
from netdsl.param_str import ParamStrError, parse
from netdsl.plan import lower

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "reference" / "real"
VGG16_TEST = REAL / "rbgirshick+py-faster-rcnn__models_pascal_voc_VGG16_faster_rcnn_end2end_test.prototxt"
ZF_FAST_RCNN = REAL / "rbgirshick+py-faster-rcnn__models_pascal_voc_ZF_faster_rcnn_alt_opt_stage1_fast_rcnn_train.prototxt"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="shared/reference/real is not available")


# ------------------------------------------------------------------------------ param_str

PARAM_STRS = [
    ("'feat_stride': 16", {"feat_stride": 16}),
    ("'feat_stride': 16\n'scales': !!python/tuple [4, 8, 16, 32]", {"feat_stride": 16, "scales": [4, 8, 16, 32]}),
    ("{'feat_stride': 16, 'scales': !!python/tuple [8, 16]}", {"feat_stride": 16, "scales": [8, 16]}),
    ("'num_classes': 21 # VOC\n", {"num_classes": 21}),
    ("a: 1e-3\nb: 1.0e-3\nc: yes\nd: ~\ne: 0x1F\nf: 017\ng: 1_000", {"a": "1e-3", "b": 0.001, "c": True, "d": None,
                                                                    "e": 31, "f": 15, "g": 1000}),
    ("{h: 'it''s', i: \"a\\tb\", j: {k: [1, [2.5, -3]]}, l: .5, m: Off}",
     {"h": "it's", "i": "a\tb", "j": {"k": [1, [2.5, -3]]}, "l": 0.5, "m": False}),
    ("", {}), ("  \n", {}), ("{}", {}),
]


@pytest.mark.parametrize("text, want", PARAM_STRS)
def test_param_str_reads_yaml_as_py_faster_rcnn(text, want):
    assert parse(text) == want


def test_param_str_agrees_with_pyyaml():
    """PyYAML itself (safe loader, tuples as lists) is the oracle where it is installed."""
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    for text, _ in PARAM_STRS:
        assert parse(text) == (yaml.load(text, Loader=Loader) or {}), text


@pytest.mark.parametrize("text, offset, what", [
    ("a: !!python/object/apply:os.system ['ls']", 3, "tag"),
    ("a: !!int 3", 3, "tag"),
    ("a: &x 1\nb: *x", 3, "anchors"),
    ("- 1\n- 2", 0, "block sequence"),
    ("a:\n  b: 1", 5, "indented"),
    ("{a: 1", 5, "closing `}`"),
    ("a: [1, 2", 8, "closing `]`"),
    ("a: 'x", 3, "no closing"),
    ("'feat_stride': 16, 'scales': (4, 8, 16, 32)", 27, "`: ` inside a value"),
    ("a: 1:30", 3, "sexagesimal"),
])
def test_param_str_outside_the_subset_is_located(text, offset, what):
    with pytest.raises(ParamStrError) as e:
        parse(text)
    assert e.value.offset == offset and what in e.value.message


# ------------------------------------------------------------------------- Python layers run

RPN_INPUTS = ('input: "score" input_shape { dim: 1 dim: 24 dim: 4 dim: 5 }\n'
              'input: "deltas" input_shape { dim: 1 dim: 48 dim: 4 dim: 5 }\n'
              'input: "info" input_shape { dim: 1 dim: 3 }\n')


def python_layer(name, module, layer, param_str, bottoms, tops):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return (f'layer {{ name: "{name}" type: "Python" {b} {t} python_param {{ module: "{module}" layer: "{layer}" '
            f'param_str: "{param_str}" }} }}\n')


def proposal_net(param_str: str) -> str:
    return RPN_INPUTS + python_layer("proposal", "rpn.proposal_layer", "ProposalLayer", param_str,
                                     ("score", "deltas", "info"), ("rois",))


def test_python_proposal_runs_as_the_builtin_with_four_tuple_scales():
    """The issue's case: `'scales': !!python/tuple [4, 8, 16, 32]` gives four scales (A = 12), and the
    net runs: the same rois as the built-in Proposal with the same parameters."""
    shaped = check(syntax.parse(proposal_net(r"'feat_stride': 16\n'scales': !!python/tuple [4, 8, 16, 32]"), "t.net"),
                   phase="TEST")
    [w] = shaped.diagnostics
    assert w.code == "W0215" and "built-in Proposal" in w.message and "scales (4, 8, 16, 32)" in w.message
    layer = shaped.graph.nodes[-1].layer
    assert layer.type == "Proposal" and layer.num_anchors() == 12 and layer.p.feat_stride == 16
    rng = np.random.default_rng(0)
    feed = dict(score=rng.uniform(0, 1, (1, 24, 4, 5)).astype(np.float32),
                deltas=(rng.standard_normal((1, 48, 4, 5)) * 0.1).astype(np.float32),
                info=np.array([[64, 80, 1]], np.float32))
    net = Net(lower(shaped, runnable=True), np, dtype=np.float32)
    net.forward(**feed)
    builtin = RPN_INPUTS + ('layer { name: "proposal" type: "Proposal" bottom: "score" bottom: "deltas" bottom: "info" '
                            'top: "rois" proposal_param { feat_stride: 16 scales: [4, 8, 16, 32] } }\n')
    ref = Net(lower(check(syntax.parse(builtin, "b.net"), phase="TEST"), runnable=True), np, dtype=np.float32)
    ref.forward(**feed)
    assert net.blobs["rois"].data.shape[0] > 0
    np.testing.assert_array_equal(net.blobs["rois"].data, ref.blobs["rois"].data)


def diagnostics(text: str, phase: str = "TEST"):
    try:
        return check(syntax.parse(text, "t.net"), phase=phase).diagnostics
    except NetdslError as e:
        return e.diagnostics


@pytest.mark.parametrize("param_str, code, what", [
    ("'scales': !!python/tuple [8, 16, 32]", "E0386", "no 'feat_stride'"),
    ("'feat_stride': 16.5", "E0386", "positive integer"),
    ("'feat_stride': 16\\n'scales': 'big'", "E0386", "`scales`"),
    ("'feat_stride': !!python/name:os.system", "E0385", "tag"),
    ("'feat_stride': 16\\n'seed': 1", "W0216", "'seed'"),
])
def test_python_layer_param_str_problems_are_located(param_str, code, what):
    found = [d for d in diagnostics(proposal_net(param_str)) if d.code == code]
    assert found and what in found[0].message and found[0].pos.line == 4, [str(d) for d in found]


# ------------------------------------------------------------------------------ ProposalTarget

GT = np.array([[0, 0, 9, 9, 1]], np.float64)                   # one 10 x 10 box of class 1
ROIS = np.array([[0, 0, 0, 9, 9],                               # IoU 1: foreground, targets 0
                 [0, 0, 0, 9, 4],                               # IoU 0.5: foreground (>= FG_THRESH)
                 [0, 0, 0, 9, 1],                               # IoU 0.2: background
                 [0, 50, 50, 60, 60]], np.float64)              # IoU 0: below BG_THRESH_LO, dropped


def test_proposal_targets_by_hand():
    rois, labels, targets, w_in, w_out = boxes.proposal_targets(ROIS, GT, 3, np.random.default_rng(0))
    # candidates: the 4 rois and the gt box itself (IoU 1); 3 foreground, 1 background, 1 dropped
    order = np.lexsort(rois.T[::-1])
    rois, labels, targets, w_in, w_out = rois[order], labels[order], targets[order], w_in[order], w_out[order]
    np.testing.assert_array_equal(rois, [[0, 0, 0, 9, 1], [0, 0, 0, 9, 4], [0, 0, 0, 9, 9], [0, 0, 0, 9, 9]])
    np.testing.assert_array_equal(labels, [0, 1, 1, 1])
    assert targets.shape == w_in.shape == w_out.shape == (4, 12)
    # (0,0,9,4) -> (0,0,9,9): w 10, h 5 -> 10, centre y 2.5 -> 5: (0, 0.5, 0, log 2) / (0.1, 0.1, 0.2, 0.2)
    np.testing.assert_allclose(targets[1], [0, 0, 0, 0, 0, 5, 0, math.log(2) / 0.2, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(targets[[0, 2, 3]], 0)
    np.testing.assert_array_equal(w_in[1:, 4:8], 1)
    assert w_in[0].sum() == 0 and w_in[1:].sum() == 12
    np.testing.assert_array_equal(w_out, w_in)
    assert rois.dtype == labels.dtype == targets.dtype == np.float32


def test_proposal_targets_sample_fg_fraction_of_batch_and_repeat_with_the_seed():
    rng = np.random.default_rng(5)
    x1 = rng.uniform(0, 3, 60)
    fg = np.stack([np.zeros(60), x1, x1, x1 + 9, x1 + 9], 1)           # IoU >= 0.5 with GT
    bg = np.stack([np.zeros(40), np.zeros(40), np.zeros(40), np.full(40, 9), rng.uniform(1, 3, 40)], 1)   # 0.2-0.4
    rois = np.vstack([fg, bg])
    a = boxes.proposal_targets(rois, GT, 2, np.random.default_rng(1), batch_size=16)
    labels = a[1]
    assert len(labels) == 16 and (labels[:4] == 1).all() and (labels[4:] == 0).all()   # round(0.25 * 16) = 4 fg
    b = boxes.proposal_targets(rois, GT, 2, np.random.default_rng(1), batch_size=16)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = boxes.proposal_targets(rois, GT, 2, np.random.default_rng(2), batch_size=16)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="class 1"):
        boxes.proposal_targets(rois, GT, 1, np.random.default_rng(1))


def proposal_target_net(layer: str) -> str:
    return ('input: "rpn_rois" input_shape { dim: 4 dim: 5 }\ninput: "gt_boxes" input_shape { dim: 1 dim: 5 }\n'
            + layer + 'layer { name: "s" type: "Silence" bottom: "rois" bottom: "labels" bottom: "t" bottom: "wi" '
            'bottom: "wo" }\n')


def test_python_proposal_target_layer_is_the_builtin():
    tops = ("rois", "labels", "t", "wi", "wo")
    py = proposal_target_net(python_layer("roi-data", "rpn.proposal_target_layer", "ProposalTargetLayer",
                                          "'num_classes': 3", ("rpn_rois", "gt_boxes"), tops))
    builtin = proposal_target_net('layer { name: "roi-data" type: "ProposalTarget" bottom: "rpn_rois" '
                                  'bottom: "gt_boxes" top: "rois" top: "labels" top: "t" top: "wi" top: "wo" '
                                  'proposal_target_param { num_classes: 3 } }\n')
    outs = []
    for text in (py, builtin):
        shaped = check(syntax.parse(text, "t.net"), phase="TEST")
        assert shaped.blobs["t"] == (None, 12) and shaped.blobs["labels"] == (None,)
        net = Net(lower(shaped, runnable=True), np, dtype=np.float32, seed=4)
        net.forward(rpn_rois=ROIS.astype(np.float32), gt_boxes=GT.astype(np.float32))
        outs.append([net.blobs[t].data.copy() for t in tops])
    assert outs[0][0].shape == (4, 5)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ RoIDataLayer

@needs_real
def test_roi_data_fast_rcnn_layout_gets_its_shapes():
    """The 6-top layout (alt-opt's Fast R-CNN stage): only `data` needs --shape; num_classes from
    param_str gives the 4 x 21 target columns. Checked, not run (W0601)."""
    shaped = check(syntax.parse(ZF_FAST_RCNN.read_text(), str(ZF_FAST_RCNN)), phase="TRAIN",
                   hints={"data": (2, 3, 600, 1000)})
    b = shaped.blobs
    assert (b["rois"], b["labels"], b["bbox_targets"], b["bbox_outside_weights"]) == \
        ((None, 5), (None,), (None, 84), (None, 84))
    assert b["cls_score"] == (None, 21) and b["bbox_pred"] == (None, 84)
    assert [d.code for d in shaped.diagnostics] == ["W0601"]
    with pytest.raises(NetdslError) as e:
        lower(shaped, runnable=True)
    assert e.value.diagnostics[0].code == "E0610"


def test_roi_data_rpn_layout_and_a_wrong_top_count():
    three = python_layer("data", "roi_data_layer.layer", "RoIDataLayer", "'num_classes': 21", (),
                         ("data", "im_info", "gt_boxes"))
    shaped = check(syntax.parse(three, "t.net"), phase="TEST", hints={"data": (1, 3, 60, 80)})
    assert shaped.blobs["im_info"] == (1, 3) and shaped.blobs["gt_boxes"] == (None, 5)
    four = python_layer("data", "roi_data_layer.layer", "RoIDataLayer", "'num_classes': 21", (), ("a", "b", "c", "d"))
    assert [d.code for d in diagnostics(four)] == ["E0387"]


# ------------------------------------------------------------------------------ detections

def test_detections_follow_test_py():
    """im_detect + test_net by hand: rois / scale, deltas decoded (zero deltas keep the box, plus
    py-faster-rcnn's one pixel), clipped to the original image, per-class threshold and NMS 0.3,
    then the max_per_image cut over all classes."""
    rois = np.array([[0, 0, 0, 19, 19], [0, 2, 2, 21, 21], [0, 40, 40, 59, 59], [0, 150, 10, 199, 39]], np.float32)
    prob = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.01, 0.69], [0.5, 0.0, 0.5]], np.float32)
    deltas = np.zeros((4, 12), np.float32)
    deltas[2, 8:12] = [0.1, 0, 0, 0]                    # class 2's box of roi 2 moves right by 0.1 x its width
    info = np.array([100, 200, 2.0])                    # a 50 x 100 image scaled by 2
    rows = detections(rois, prob, deltas, info)
    np.testing.assert_allclose(rows, [
        [0, 1, 0.9, 0, 0, 10.5, 10.5],                  # (0, 0, 9.5, 9.5) with width 10.5: x2 = 0 + 10.5
        [0, 2, 0.69, 21.05, 20, 31.55, 30.5],           # roi 1 (IoU 0.68 > 0.3 with roi 0) is suppressed
        [0, 2, 0.5, 75, 5, 99, 20.5],                   # x2 100.5 clipped to the original image's 99
    ], rtol=1e-6)
    assert len(detections(rois, prob, deltas, info, max_per_image=2)) == 2
    assert len(detections(rois, prob, deltas, info, score_thresh=0.6)) == 2
    # no box regression: the rois themselves
    np.testing.assert_allclose(detections(rois, prob, None, info)[0], [0, 1, 0.9, 0, 0, 9.5, 9.5])


# ------------------------------------------------------------------------------ VGG16 end2end

@needs_real
def test_vgg16_end2end_test_net_runs_forward_and_detects():
    """py-faster-rcnn's own VGG16 faster_rcnn_end2end test.prototxt, unchanged, on a 64 x 64 image
    with random weights: RPN, Python ProposalLayer (as the built-in), ROIPooling, the fc head."""
    shaped = check(syntax.parse(VGG16_TEST.read_text(), str(VGG16_TEST)), phase="TEST", hints={"data": (1, 3, 64, 64)})
    assert [d.code for d in shaped.diagnostics] == ["W0215"]
    net = Net(lower(shaped, runnable=True), np, dtype=np.float32, seed=0)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():             # He-scaled uniform weights (variance 2 / fan_in), in place
        for p in blobs:
            fan_in = int(np.prod(p.data.shape[1:])) if p.data.ndim > 1 else 0
            rng.random(dtype=np.float32, out=p.data)
            p.data -= np.float32(0.5)
            p.data *= np.float32(2 * math.sqrt(6 / fan_in) if fan_in else 0.02)
    net.forward(data=rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32), im_info=np.array([[64, 64, 1]], np.float32))
    rois, prob, pred = (net.blobs[k].data for k in ("rois", "cls_prob", "bbox_pred"))
    r = rois.shape[0]
    assert r >= 1 and prob.shape == (r, 21) and pred.shape == (r, 84)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    assert (rois[:, 0] == 0).all() and (rois[:, 1:] >= 0).all() and (rois[:, [3, 4]] <= 63).all()
    rows = detections(rois, prob, pred, [64, 64, 1], score_thresh=0.0)
    assert rows.shape[1] == 7 and len(rows) >= 1 and set(np.unique(rows[:, 1])) <= set(range(1, 21))
    assert (rows[:, 3:] >= 0).all() and (rows[:, 5:] <= 63).all()


# ------------------------------------------------------------------------------ training

def test_digits_net_is_written_as_py_faster_rcnn_writes_it():
    shaped = check_file(str(ROOT / "nets" / "faster_rcnn_digits.net"), phase="TRAIN")
    assert sorted(d.message.split("built-in ")[1].split(" ")[0] for d in shaped.diagnostics if d.code == "W0215") == \
        ["AnchorTarget", "Proposal", "ProposalTarget"]


@pytest.mark.usefixtures("mnist_dir")
def test_digits_net_trains_with_all_four_losses_decreasing():
    """60 SGD steps on one fixed scene (the scene stream's noise would hide a short run's trend; the
    longer run on the stream is measured in docs/faster_rcnn.md): every loss of the end2end net,
    RPN and Fast R-CNN head, ends lower than it started."""
    from netdsl.solver import Solver, SolverConfig
    net = netdsl.load(str(ROOT / "nets" / "faster_rcnn_digits.net"), phase="train", seed=0)
    feed = next(st.source for s, st in zip(net.plan.steps, net.states) if s.layer.type == "DigitScenes")
    image, gt = feed.scenes.scene(0)
    solver = Solver(SolverConfig(base_lr=0.01, momentum=0.9, lr_policy="fixed"), net.learnable)
    names = ("rpn_cls_loss", "rpn_loss_bbox", "loss_cls", "loss_bbox")
    losses = []
    for it in range(60):
        feed.feed(image, gt)
        net.zero_grad()
        net.forward()
        losses.append([float(net.blobs[k].data) for k in names])
        net.backward()
        solver.step(it)
    losses = np.array(losses)
    first, last = losses[:10].mean(axis=0), losses[-10:].mean(axis=0)
    assert np.isfinite(losses).all()
    assert (last < 0.9 * first).all(), dict(zip(names, np.round(last / first, 3)))


# ------------------------------------------------------------------------------ OpenCV 4

TINY_FRCNN = """\
name: "tiny_frcnn"
input: "data"
input_shape { dim: 1 dim: 3 dim: 128 dim: 128 }
input: "im_info"
input_shape { dim: 1 dim: 3 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 16 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 16 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "rpn_cls_score" type: "Convolution" bottom: "conv4" top: "rpn_cls_score"
  convolution_param { num_output: 18 kernel_size: 1 } }
layer { name: "rpn_bbox_pred" type: "Convolution" bottom: "conv4" top: "rpn_bbox_pred"
  convolution_param { num_output: 36 kernel_size: 1 } }
layer { bottom: "rpn_cls_score" top: "rpn_cls_score_reshape" name: "rpn_cls_score_reshape" type: "Reshape"
  reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }
layer { name: 'rpn_cls_prob_reshape' type: 'Reshape' bottom: 'rpn_cls_prob' top: 'rpn_cls_prob_reshape'
  reshape_param { shape { dim: 0 dim: 18 dim: -1 dim: 0 } } }
{proposal}
layer { name: "roi_pool" type: "ROIPooling" bottom: "conv3" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.125 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 16 } }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score"
  inner_product_param { num_output: 3 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred"
  inner_product_param { num_output: 12 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }
"""
PY_PROPOSAL = """layer { name: 'proposal' type: 'Python' bottom: 'rpn_cls_prob_reshape' bottom: 'rpn_bbox_pred'
  bottom: 'im_info' top: 'rois'
  python_param { module: 'rpn.proposal_layer' layer: 'ProposalLayer' param_str: "'feat_stride': 16" } }"""
# OpenCV 4.14's Caffe importer does not map the Python layer (it cannot create type "Python"): its
# Faster R-CNN samples rewrite it as its own Proposal layer with py-faster-rcnn's TEST settings.
CV_PROPOSAL = """layer { name: 'proposal' type: 'Proposal' bottom: 'rpn_cls_prob_reshape' bottom: 'rpn_bbox_pred'
  bottom: 'im_info' top: 'rois'
  proposal_param { feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16
                   scale: 32 pre_nms_topn: 6000 post_nms_topn: 300 nms_thresh: 0.7 } }"""


def test_proposal_and_roi_pooling_path_matches_opencv(tmp_path):
    """A small end2end-style test net (py-faster-rcnn's Python ProposalLayer, ROIPooling, an fc
    head) against OpenCV 4's Caffe importer, same weights (a .caffemodel netdsl writes) and input.
    OpenCV's Proposal keeps boxes under min_size (py-faster-rcnn drops them) and pads to 300 rows,
    so its rois of both sides >= 16 px are compared with netdsl's as a set; for every roi, pool5,
    cls_prob and bbox_pred agree to 1e-4 of their largest value."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no Caffe importer (OpenCV 5 removed it)")
    text = TINY_FRCNN.replace("{proposal}", PY_PROPOSAL)
    net = Net(lower(check(syntax.parse(text, "tiny.prototxt"), phase="TEST"), runnable=True), np, dtype=np.float32)
    rng = np.random.default_rng(0)
    for name, blobs in net.params.items():
        for p in blobs:       # small box deltas keep the proposals inside the image and apart
            p.data[...] = rng.normal(0, 0.3, p.data.shape) * (0.05 if name == "rpn_bbox_pred" else 1)
    x = rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    info = np.array([[128, 128, 1]], np.float32)
    net.forward(data=x, im_info=info)
    net.save(str(tmp_path / "w.caffemodel"))
    (tmp_path / "cv.prototxt").write_text(TINY_FRCNN.replace("{proposal}", CV_PROPOSAL))
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "cv.prototxt"), str(tmp_path / "w.caffemodel"))
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.setInput(x, "data")
    cv.setInput(info, "im_info")
    cv_rois, *cv_outs = cv.forward(["proposal", "roi_pool", "cls_prob", "bbox_pred"])
    cv_rois = cv_rois.reshape(-1, 5)
    ours = net.blobs["rois"].data
    side = np.minimum(cv_rois[:, 3] - cv_rois[:, 1], cv_rois[:, 4] - cv_rois[:, 2]) + 1
    big = np.flatnonzero(side >= 16)
    assert 10 <= len(ours) == len(big)
    dist = np.abs(ours[:, None, 1:] - cv_rois[None, big, 1:]).max(axis=-1)
    match = big[dist.argmin(axis=1)]
    assert dist.min(axis=1).max() <= 1e-4 * 128 and len(set(match)) == len(ours)
    for blob, got in zip(("pool5", "cls_prob", "bbox_pred"), cv_outs):
        want = net.blobs[blob].data
        got = got.reshape((-1,) + want.shape[1:])[match]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), blob
