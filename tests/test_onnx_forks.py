"""ONNX export of the fork layers (issue 10): each mapping checked by onnx's full checker and run by
onnxruntime against netdsl's forward (float32, within 1e-4 of each output's largest value), as
tests/test_onnx_export.py does for BVLC's layers; the layers with no exact mapping get a located
error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_onnx_export import TOL, _net, _ops, _within, random_weights

from netdsl.errors import NetdslError
from netdsl.executor import build_net
from netdsl.onnx_export import export, verify

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SEGNET = Path(__file__).resolve().parents[1] / "nets" / "segnet_digits.net"


def fork_weights(net, rng) -> None:
    """random_weights, with BN's statistics blobs made valid (variance positive)."""
    random_weights(net, rng)
    for s in net.plan.steps:
        if s.layer.type == "BN":
            for i, p in enumerate(net.params[s.node.name]):
                p.data[...] = [rng.normal(1, 0.2, p.data.shape), rng.normal(0, 0.2, p.data.shape),
                               rng.normal(0, 0.3, p.data.shape), rng.uniform(0.5, 2, p.data.shape)][i]


def roundtrip(tmp_path, text: str, batch=None, **kw):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = build_net(str(path), "TEST")
    fork_weights(net, np.random.default_rng(0))
    model, _ = export(net, batch=batch, **kw)
    onnx.checker.check_model(model, full_check=True)
    _within(verify(model, net), path.name)
    return model, net


def layer(name, kind, bottoms, params="", tops=None):
    tops = tops or [name]
    return (f'layer {{ name: "{name}" type: "{kind}" ' + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops) + f" {params} }}")


UNPOOL = {
    # SegNet's 2x2 stride 2, and a pooling that rounds up (ceil) unpooled to the odd size it came from
    "scale2": ((2, 3, 8, 10), "kernel_size: 2 stride: 2", "upsample_param { scale: 2 }"),
    "pad_out": ((1, 2, 7, 9), "kernel_size: 2 stride: 2", "upsample_param { upsample_h: 7 upsample_w: 9 }"),
    # overlapping 3x3 stride 2 windows: one position can be named twice (both keep the last)
    "overlap": ((1, 2, 9, 9), "kernel_size: 3 stride: 2 pad: 1", "upsample_param { upsample_h: 9 upsample_w: 9 }"),
}


@pytest.mark.parametrize("case", list(UNPOOL))
def test_pooling_mask_and_upsample(tmp_path, case):
    shape, pool, up = UNPOOL[case]
    body = "\n".join([layer("pool", "Pooling", ["x"], f"pooling_param {{ pool: MAX {pool} }}", ["pool", "mask"]),
                      layer("up", "Upsample", ["pool", "mask"], up),
                      layer("idx", "Power", ["mask"])])          # the mask itself as an output too
    model, _ = roundtrip(tmp_path, _net({"x": shape}, body))
    assert {"MaxPool", "Mod", "ScatterElements"} <= set(_ops(model))


BN = {
    "segnet_inference": "bn_param { bn_mode: INFERENCE }",
    "segnet_learn": "bn_param { bn_mode: LEARN }",          # the batch's statistics: ReduceMean
    "psp_test": "bn_param { momentum: 0.95 }",              # moving statistics in TEST
    "psp_frozen": "bn_param { frozen: true }",
}


@pytest.mark.parametrize("case", list(BN))
def test_bn(tmp_path, case):
    model, _ = roundtrip(tmp_path, _net({"x": (2, 3, 4, 5)}, layer("bn", "BN", ["x"], BN[case])))
    assert ("ReduceMean" in _ops(model)) == (case == "segnet_learn")


def test_bn_folds_into_the_convolution(tmp_path):
    body = "\n".join([layer("conv", "Convolution", ["x"], "convolution_param { num_output: 4 kernel_size: 3 }"),
                      layer("bn", "BN", ["conv"], BN["psp_test"], ["conv"])])
    model, _ = roundtrip(tmp_path, _net({"x": (1, 3, 6, 6)}, body), fold_batchnorm=True)
    assert _ops(model) == ["Conv"]


INTERP = {
    "zoom": ({"x": (2, 2, 4, 5)}, "interp_param { zoom_factor: 3 }"),
    "shrink": ({"x": (1, 2, 9, 7)}, "interp_param { shrink_factor: 2 }"),
    "shrink_zoom": ({"x": (1, 2, 9, 8)}, "interp_param { shrink_factor: 2 zoom_factor: 3 }"),
    "size": ({"x": (1, 2, 4, 6)}, "interp_param { height: 7 width: 3 }"),
    "crop": ({"x": (1, 2, 7, 6)}, "interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -1 }"),
    "reference": ({"x": (1, 2, 3, 3), "ref": (1, 1, 8, 5)}, ""),
}


@pytest.mark.parametrize("case", list(INTERP))
def test_interp(tmp_path, case):
    inputs, params = INTERP[case]
    model, _ = roundtrip(tmp_path, _net(inputs, layer("interp", "Interp", list(inputs), params)), batch="dynamic")
    assert "Resize" in _ops(model)


def test_interp_to_one_pixel_is_refused(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(_net({"x": (1, 2, 4, 4)}, layer("interp", "Interp", ["x"], "interp_param { height: 1 width: 3 }")))
    with pytest.raises(NetdslError) as e:
        export(build_net(str(path), "TEST"))
    assert e.value.diagnostic.code == "E0810" and "side of 1" in e.value.diagnostic.message


OTHERS = {
    "shuffle": ({"x": (2, 6, 3, 4)}, layer("s", "ShuffleChannel", ["x"], "shuffle_channel_param { group: 3 }"), "Transpose"),
    "shuffle_3d": ({"x": (2, 4, 5)}, layer("s", "ShuffleChannel", ["x"], "shuffle_channel_param { group: 2 }"), "Transpose"),
    "axpy": ({"a": (2, 3, 1, 1), "x": (2, 3, 4, 5), "y": (2, 3, 4, 5)}, layer("axpy", "Axpy", ["a", "x", "y"]), "Mul"),
    "axpy_2d": ({"a": (2, 3), "x": (2, 3, 4, 5), "y": (2, 3, 4, 5)}, layer("axpy", "Axpy", ["a", "x", "y"]), "Unsqueeze"),
    "upsample_nearest": ({"x": (2, 3, 3, 4)}, layer("up", "Upsample", ["x"], "upsample_param { scale_h: 2 scale_w: 3 }"),
                         "Resize"),
    "conv_dw": ({"x": (2, 4, 6, 6)}, layer("dw", "ConvolutionDepthwise", ["x"],
                                           "convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }"), "Conv"),
    "dw_conv": ({"x": (2, 3, 6, 6)}, layer("dw", "DepthwiseConvolution", ["x"],
                                           "convolution_param { num_output: 6 kernel_size: 3 }"), "Conv"),
    "normalize": ({"x": (2, 3, 4, 5)}, layer("n", "Normalize", ["x"], "norm_param { scale_filler { type: \"constant\" value: 20 } }"),
                  "ReduceSumSquare"),
    "normalize_channels": ({"x": (2, 3, 4, 5)}, layer("n", "Normalize", ["x"], "norm_param { across_spatial: false "
                                                      "channel_shared: false }"), "ReduceSumSquare"),
    "permute": ({"x": (2, 3, 4, 5)}, layer("p", "Permute", ["x"], "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
                "Transpose"),
    "priorbox": ({"feat": (1, 8, 3, 4), "data": (1, 3, 30, 40)},
                 layer("prior", "PriorBox", ["feat", "data"], "prior_box_param { min_size: 10 max_size: 20 "
                       "aspect_ratio: 2 flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }"),
                 "Identity"),
}


@pytest.mark.parametrize("case", list(OTHERS))
def test_fork_layer_mapping(tmp_path, case):
    inputs, body, op = OTHERS[case]
    model, _ = roundtrip(tmp_path, _net(inputs, body))
    assert op in _ops(model)


def test_psroi_pooling_is_refused_where_it_stands(tmp_path):
    body = layer("psroi", "PSROIPooling", ["x", "rois"], "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 }")
    path = tmp_path / "net.prototxt"
    path.write_text(_net({"x": (1, 8, 6, 6), "rois": (3, 5)}, body))
    with pytest.raises(NetdslError) as e:
        export(build_net(str(path), "TEST"))
    d = e.value.diagnostic
    assert d.code == "E0810" and "PSROIPooling layer 'psroi'" in d.message and d.pos.line == 3


@pytest.mark.usefixtures("mnist_dir")
def test_segmentation_sample_exports(tmp_path):
    """nets/segnet_digits.net's TEST phase: the scene is the input, the per-pixel scores the output."""
    net = build_net(str(SEGNET), "TEST")
    fork_weights(net, np.random.default_rng(1))
    model, _ = export(net)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["score"]
    errs = verify(model, net, inputs={"data": np.random.default_rng(2).uniform(0, 1, (1, 1, 64, 64)).astype(np.float32)})
    assert errs["score"] <= TOL


def test_reductions_take_axes_as_an_input_from_opset_18(tmp_path):
    body = "\n".join([layer("bn", "BN", ["x"], BN["segnet_learn"]),
                      layer("n", "Normalize", ["bn"], "norm_param { across_spatial: false }")])
    for opset in (13, 18):
        model, _ = roundtrip(tmp_path, _net({"x": (2, 3, 4, 5)}, body), opset=opset)
        reduce = next(n for n in model.graph.node if n.op_type == "ReduceMean")
        assert (len(reduce.input), len(reduce.attribute)) == ((2, 1) if opset == 18 else (1, 2))


SHUFFLENET = Path(__file__).resolve().parents[2] / "shared" / "reference" / "real" / \
    "farmingyard+ShuffleNet__shufflenet_1x_g3_deploy.prototxt"


@pytest.mark.skipif(not SHUFFLENET.is_file(), reason="shared/reference is not available")
def test_shufflenet_deploy_exports():
    """The real ShuffleNet deploy net (ConvolutionDepthwise, ShuffleChannel, BatchNorm, Eltwise,
    Concat), random weights, 224 x 224."""
    net = build_net(str(SHUFFLENET), "TEST")
    fork_weights(net, np.random.default_rng(0))
    model, _ = export(net)
    assert {"Transpose", "Conv"} <= set(_ops(model))
    _within(verify(model, net), SHUFFLENET.name)
