"""`netdsl export`: ONNX models that keep Caffe's semantics, checked by onnx's full checker and run by
onnxruntime against netdsl's own forward (float32; every output within 1e-4 of its largest value).
The deploy nets of tests/test_opencv_oracle.py at a dynamic batch run at two sizes, then one
focused net per mapping (pooling's ceil rounding and trim, the AVE divisor's overhang, Eltwise
coeffs, Crop, Reshape 0/-1, Softmax and InnerProduct on axis 2, ...), fold-batchnorm, the CLI and
the errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import DEPLOY_NETS

from netdsl.check import check
from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.executor import build_net
from netdsl.onnx_export import export, export_onnx, verify
from netdsl.syntax import parse

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
LENET = REFERENCE / "caffe" / "examples_mnist_lenet.prototxt"

DEPLOY = DEPLOY_NETS
TOL = 1e-4


def random_weights(net, rng) -> None:
    """tests/test_opencv_oracle.py's helper, in float32: He-scaled filters, small biases, BatchNorm
    statistics with scale factor 2 (the stored sums are divided by it), Scale near 1, PReLU slopes."""
    for s in net.plan.steps:
        for i, p in enumerate(net.params.get(s.node.name, [])):
            shape, t = p.data.shape, s.layer.type
            if t == "BatchNorm":
                a = [rng.normal(0, 0.2, shape), rng.uniform(1.0, 3.0, shape), np.full(shape, 2.0)][i]
            elif t == "Scale":
                a = rng.normal(1.0 if i == 0 else 0.0, 0.1, shape)
            elif t == "PReLU":
                a = rng.uniform(0, 0.5, shape)
            elif len(shape) > 1:                # He-scaled, uniform (quick to draw for FCN's 134 M)
                fan_in = int(np.prod(shape[1:])) if t != "Deconvolution" else int(shape[0] * np.prod(shape[2:]))
                a = rng.random(shape, dtype=np.float32)
                a -= np.float32(0.5)
                a *= np.float32(np.sqrt(24.0 / max(fan_in, 1)))
            else:
                a = rng.normal(0, 0.1, shape)
            p.data[...] = a


def _within(errs: dict, what: str) -> None:
    assert errs, what
    for name, e in errs.items():
        assert e <= TOL, f"{what}: output '{name}' differs from netdsl by {e:.3g} of its largest value"


# ------------------------------------------------------------------------------------ deploy nets

@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not available")
@pytest.mark.parametrize("name, shape", DEPLOY, ids=[d[0].split("__")[-1].split("/")[-1] for d in DEPLOY])
def test_deploy_net_matches_onnxruntime(name, shape):
    path = str(REFERENCE / name)
    data = next(t for n in check(parse(Path(path).read_text(), path), phase="TEST").graph.nodes
                if n.layer.fed_by_caller for t in n.layer.spec.tops)
    net = build_net(path, "TEST", hints={data: shape})
    random_weights(net, np.random.default_rng(0))
    last = net.plan.steps[-1]                 # the logits too: a saturated softmax would hide errors
    outs = list(dict.fromkeys(b.split("#")[0] for b in last.node.bottoms + last.node.tops))
    model, _ = export(net, batch="dynamic", outputs=outs)
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _within(verify(sess, net), f"{name} batch 1")
    net2 = build_net(path, "TEST", hints={data: (2,) + shape[1:]}, share_from=net)     # the same param blobs
    _within(verify(sess, net2, np.random.default_rng(1)), f"{name} batch 2")


# --------------------------------------------------------------------------------- focused cases

def _net(inputs: dict, body: str) -> str:
    head = [f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ {" ".join(f"dim: {d}" for d in s)} }} }} }}'
            for n, s in inputs.items()]
    return "\n".join(head) + "\n" + body + "\n"


def roundtrip(tmp_path, text: str, **kw):
    """Export a net (random weights), check the model and compare it with netdsl; the model."""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = build_net(str(path), "TEST")
    random_weights(net, np.random.default_rng(0))
    model, _ = export(net, **kw)
    onnx.checker.check_model(model, full_check=True)
    _within(verify(model, net), path.name)
    return model


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _attr(model, op: str, name: str):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _pool(name, bottom, params):
    return f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" pooling_param {{ {params} }} }}'


POOLS = [
    # ceil rounding with a trimmed last window (5 + 2*1 - 2 = 5: ceil gives 4 windows, the 4th starts in the padding)
    ("trim", (1, 2, 5, 7), "kernel_size: 2 stride: 2 pad: 1"),
    # ceil with overhang past in + pad: AVE's divisor clipped (Caffe), corrected by a constant ratio
    ("overhang", (2, 3, 6, 8), "kernel_size: 3 stride: 2 pad: 1"),
    ("unpadded_ceil", (1, 2, 6, 9), "kernel_size: 3 stride: 2"),
    ("rect", (1, 2, 9, 7), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1"),
    ("floor", (1, 2, 7, 7), "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    ("floor_short", (1, 2, 6, 6), "kernel_size: 3 stride: 2 round_mode: FLOOR"),
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("case, shape, params", POOLS, ids=[p[0] for p in POOLS])
def test_pooling_keeps_caffe_rounding(tmp_path, pool, case, shape, params):
    model = roundtrip(tmp_path, _net({"x": shape}, _pool("pool", "x", f"pool: {pool} {params}")))
    pads = _attr(model, "MaxPool" if pool == "MAX" else "AveragePool", "pads")
    if case in ("trim", "overhang", "unpadded_ceil"):
        assert pads[2:] != pads[:2], "Caffe's ceil rounding becomes an explicit end pad"
    if pool == "AVE":
        assert ("Mul" in _ops(model)) == (case in ("overhang", "unpadded_ceil")), "a divisor correction where windows overhang"


def test_global_pooling(tmp_path):
    body = _pool("gmax", "x", "pool: MAX global_pooling: true") + "\n" + _pool("gave", "x", "pool: AVE global_pooling: true")
    model = roundtrip(tmp_path, _net({"x": (2, 3, 5, 6)}, body))
    assert {"GlobalMaxPool", "GlobalAveragePool"} <= set(_ops(model))


ELEMENTWISE = {
    "relu_slope": ('type: "ReLU" relu_param { negative_slope: 0.2 }', "LeakyRelu"),
    "relu": ('type: "ReLU"', "Relu"),
    "sigmoid": ('type: "Sigmoid"', "Sigmoid"),
    "tanh": ('type: "TanH"', "Tanh"),
    "prelu": ('type: "PReLU"', "PRelu"),
    "prelu_shared": ('type: "PReLU" prelu_param { channel_shared: true }', "PRelu"),
    "elu": ('type: "ELU" elu_param { alpha: 0.7 }', "Elu"),
    "absval": ('type: "AbsVal"', "Abs"),
    "power": ('type: "Power" power_param { power: 1.5 scale: 0.5 shift: 2 }', "Pow"),
    "power_const": ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', "ConstantOfShape"),
    "exp": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', "Exp"),
    "log": ('type: "Log" log_param { base: 10 scale: 0.5 shift: 2 }', "Log"),
    "bnll": ('type: "BNLL"', "Softplus"),
    "clip": ('type: "Clip" clip_param { min: -0.3 max: 0.4 }', "Min"),
    "swish": ('type: "Swish" swish_param { beta: 1.5 }', "Sigmoid"),
    "threshold": ('type: "Threshold" threshold_param { threshold: 0.1 }', "Greater"),
    "dropout": ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', "Identity"),
    "lrn": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }', "LRN"),
    "lrn_within": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }', "AveragePool"),
    "softmax_axis2": ('type: "Softmax" softmax_param { axis: 2 }', "Softmax"),
    "bias": ('type: "Bias"', "Add"),
    "scale_bias": ('type: "Scale" scale_param { bias_term: true }', "Mul"),
    "batchnorm": ('type: "BatchNorm"', "BatchNormalization"),
    "permute": ('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', "Transpose"),
    "flatten": ('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', "Reshape"),
    "reshape": ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 4 } }', "Reshape"),
    "reshape_span": ('type: "Reshape" reshape_param { axis: 1 num_axes: 2 shape { dim: -1 } }', "Reshape"),
    "tile": ('type: "Tile" tile_param { axis: 2 tiles: 3 }', "Tile"),
    "ip_axis2": ('type: "InnerProduct" inner_product_param { num_output: 6 axis: 2 }', "MatMul"),
    "ip_axis2_transpose": ('type: "InnerProduct" inner_product_param { num_output: 6 axis: 2 transpose: true }', "MatMul"),
    "ip_transpose": ('type: "InnerProduct" inner_product_param { num_output: 6 transpose: true }', "Gemm"),
    "conv_group_dilation": ('type: "Convolution" convolution_param { num_output: 6 group: 3 kernel_h: 2 kernel_w: 3 '
                            'dilation: 2 stride_h: 2 pad_w: 1 }', "Conv"),
    "deconv": ('type: "Deconvolution" convolution_param { num_output: 6 group: 3 kernel_h: 4 kernel_w: 3 stride: 2 '
               'pad: 1 }', "ConvTranspose"),
}


@pytest.mark.parametrize("case", list(ELEMENTWISE))
def test_layer_mapping(tmp_path, case):
    params, op = ELEMENTWISE[case]
    body = f'layer {{ name: "y" bottom: "x" top: "y" {params} }}'
    model = roundtrip(tmp_path, _net({"x": (2, 3, 4, 5)}, body))
    assert op in _ops(model)
    assert all(n.name.startswith("y") and n.doc_string.endswith(":2:1") for n in model.graph.node)


MULTI = {
    "eltwise_coeffs": ({"a": (2, 3, 4, 4), "b": (2, 3, 4, 4), "c": (2, 3, 4, 4)},
                       'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "s" '
                       'eltwise_param { operation: SUM coeff: 0.5 coeff: -1 coeff: 2 } }'),
    "eltwise_prod_max": ({"a": (2, 3, 4), "b": (2, 3, 4), "c": (2, 3, 4)},
                         'layer { name: "p" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "p" '
                         'eltwise_param { operation: PROD } }\n'
                         'layer { name: "m" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "m" '
                         'eltwise_param { operation: MAX } }'),
    "crop": ({"x": (1, 3, 10, 12), "r": (1, 3, 6, 7), "z": (1, 5, 8, 8), "q": (1, 3, 6, 6)},
             'layer { name: "c" type: "Crop" bottom: "x" bottom: "r" top: "c" crop_param { axis: 2 offset: 2 offset: 3 } }\n'
             'layer { name: "d" type: "Crop" bottom: "z" bottom: "q" top: "d" crop_param { axis: 1 offset: 1 } }'),
    "concat_slice_split": ({"a": (2, 3, 4), "b": (2, 5, 4)},
                           'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
                           'layer { name: "sl" type: "Slice" bottom: "cat" top: "s1" top: "s2" top: "s3" '
                           'slice_param { slice_point: 1 slice_point: 6 } }\n'
                           'layer { name: "sp" type: "Split" bottom: "s3" top: "t1" top: "t2" }\n'
                           'layer { name: "cat2" type: "Concat" bottom: "a" bottom: "a" top: "cat2" concat_param { axis: 2 } }'),
    "scale_bias_bottoms": ({"x": (2, 3, 4, 5), "s": (3, 4), "b": (3,)},
                           'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "sc" scale_param { bias_term: true } }\n'
                           'layer { name: "bi" type: "Bias" bottom: "sc" bottom: "b" top: "bi" }'),
}


@pytest.mark.parametrize("case", list(MULTI))
def test_multi_input_mapping(tmp_path, case):
    inputs, body = MULTI[case]
    model = roundtrip(tmp_path, _net(inputs, body))
    assert [i.name for i in model.graph.input] == list(inputs)        # a Crop's reference too: the net's signature


def test_in_place_chains_get_distinct_names_and_training_layers_drop(tmp_path):
    body = """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
layer { name: "silence" type: "Silence" bottom: "label" }"""
    model = roundtrip(tmp_path, _net({"data": (2, 1, 8, 8), "label": (2,)}, body))
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["ip"]
    conv, relu = model.graph.node[0], model.graph.node[1]
    assert (conv.name, conv.output[0], relu.name, relu.output[0]) == ("conv1", "conv1_1", "relu1", "conv1_2")
    assert "conv1" in [n.output[0] for n in model.graph.node]          # the chain's last version keeps the name
    assert {p.key: p.value for p in model.metadata_props}["source"].endswith("net.prototxt")


FOLD = """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "conv3" type: "Convolution" bottom: "bn2" top: "conv3" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv3" top: "bn3" }
layer { name: "other" type: "ReLU" bottom: "conv3" top: "other" }"""


def test_fold_batchnorm_equals_unfolded(tmp_path):
    plain = roundtrip(tmp_path, _net({"data": (2, 3, 6, 6)}, FOLD))
    folded = roundtrip(tmp_path, _net({"data": (2, 3, 6, 6)}, FOLD), fold_batchnorm=True)
    assert _ops(plain).count("BatchNormalization") == 3
    assert _ops(folded).count("BatchNormalization") == 1            # bn3: conv3 is read by another layer too
    assert "Mul" not in _ops(folded) and len(folded.graph.node) == len(plain.graph.node) - 4
    sess = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (plain, folded)]
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 6, 6)).astype(np.float32)
    for a, b in zip(*(s.run(None, {"data": x}) for s in sess)):
        assert np.abs(a - b).max() <= TOL * np.abs(a).max()


def test_batch_sizes_and_opset(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(_net({"x": (1, 3, 7, 7)}, _pool("pool", "x", "pool: AVE kernel_size: 3 stride: 2 pad: 1") + "\n" +
                         'layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }'))
    model = export_onnx(str(path), str(tmp_path / "m.onnx"), batch=3, opset=13)
    assert model.opset_import[0].version == 13
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 7, 7]
    net = build_net(str(path), "TEST", hints={"x": (3, 3, 7, 7)})        # fillers from the same seed: the same weights
    _within(verify(str(tmp_path / "m.onnx"), net), "batch 3")
    with pytest.raises(NetdslError, match="opset 11"):
        export_onnx(str(path), opset=11)


def test_unsupported_layer_is_located(tmp_path):
    body = """layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "red" type: "Reduction" bottom: "fc" top: "red" }"""
    path = tmp_path / "net.prototxt"
    path.write_text(_net({"x": (2, 3)}, body))
    with pytest.raises(NetdslError) as e:
        export_onnx(str(path))
    d = e.value.diagnostic
    assert "Reduction layer 'red'" in d.message and d.pos.line == 3 and "--outputs fc" in d.help
    model = export_onnx(str(path), outputs="fc")                          # cut before it: fine
    assert [o.name for o in model.graph.output] == ["fc"]


def test_external_data(tmp_path, monkeypatch):
    import netdsl.onnx_export as ox
    monkeypatch.setattr(ox, "EXTERNAL_BYTES", 0)
    path = tmp_path / "net.prototxt"
    path.write_text(_net({"x": (1, 3, 8, 8)}, 'layer { name: "c" type: "Convolution" bottom: "x" top: "c" '
                                              'convolution_param { num_output: 32 kernel_size: 3 } }'))
    model, net = export(str(path), str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx.data").is_file() and model.graph.initializer[0].raw_data     # the returned model keeps its data
    _within(verify(str(tmp_path / "m.onnx"), net), "external data")


@pytest.mark.skipif(not LENET.is_file(), reason="shared/reference is not available")
def test_cli_export_with_weights_and_verify(tmp_path, capsys):
    net = build_net(str(LENET), "TEST")
    random_weights(net, np.random.default_rng(0))
    net.save(str(tmp_path / "w.caffemodel"))
    out = tmp_path / "lenet.onnx"
    assert main(["export", str(LENET), "--weights", str(tmp_path / "w.caffemodel"), "-o", str(out), "--batch", "4",
                 "--verify"]) == 0
    text = capsys.readouterr().out
    err = float(text.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert err <= TOL and "outputs prob" in text
    w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    np.testing.assert_array_equal(w["conv1/W"], net.params["conv1"][0].data)      # the weights as given
    assert main(["export", str(LENET), "-o", str(out), "--batch", "zero"]) == 2


def test_without_onnx_says_what_to_install(monkeypatch):
    from netdsl.onnx_export import require_onnx
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(NetdslError) as e:
        require_onnx()
    assert 'pip install "netdsl[onnx]"' in e.value.diagnostic.help


@pytest.mark.skipif(not LENET.is_file(), reason="shared/reference is not available")
def test_check_never_imports_onnx():
    code = (f"import sys; from netdsl.cli import main; rc = main(['check', {str(LENET)!r}]); "
            "assert rc == 0 and 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_trained_lenet_scores_the_same_mnist_accuracy_in_onnxruntime(tmp_path):
    """nets/lenet.net trained briefly, its weights exported with Caffe's deploy LeNet (the same layer
    names): onnxruntime classifies 1,000 held-out digits exactly as netdsl does."""
    from support import shared_data_dir

    import netdsl
    from netdsl.data.mnist import load_mnist
    from netdsl.solver import Solver, SolverConfig
    data = shared_data_dir()
    if data is None or not LENET.is_file():
        pytest.skip("MNIST or shared/reference not available")
    net = netdsl.load(str(Path(__file__).parents[1] / "nets" / "lenet.net"), phase="train", data_dir=str(data))
    solver = Solver(SolverConfig(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed"), net.learnable)
    for it in range(150):
        net.zero_grad()
        net.forward()
        net.backward()
        solver.step(it)
    net.save(str(tmp_path / "lenet.caffemodel"))
    images, labels = load_mnist("test", str(data))
    x = (images[:1000, None].astype(np.float32) * np.float32(0.00390625))
    model, deploy = export(str(LENET), str(tmp_path / "lenet.onnx"), weights=str(tmp_path / "lenet.caffemodel"),
                           batch=1000, shapes={"data": (1000, 1, 28, 28)})
    ours = deploy.forward(data=x)["prob"].argmax(axis=1)
    session = ort.InferenceSession(str(tmp_path / "lenet.onnx"), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    acc_ours, acc_theirs = float((ours == labels[:1000]).mean()), float((theirs == labels[:1000]).mean())
    assert acc_ours > 0.85 and acc_theirs == acc_ours and (ours == theirs).all()
