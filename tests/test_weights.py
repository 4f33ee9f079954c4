"""Weights in and out (weights.py, caffe_pb.py): .caffemodel V1 and V2, .npz, mean .binaryproto,
Caffe's CopyTrainedLayersFrom semantics, `netdsl convert`, and bad files. The V1 reader is tested
on bytes assembled here by hand, independently of netdsl's writer."""
from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pytest

import netdsl
from netdsl.cli import main
from netdsl.errors import NetdslError
from netdsl.weights import read_blobproto, read_weights, write_blobproto, write_caffemodel

NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
"""


# -------------------------------------------------------------- an independent protobuf encoder

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:          # length-delimited
    return key(number, 2) + varint(len(payload)) + payload


def v1_blob(a: np.ndarray, packed: bool) -> bytes:
    """A legacy BlobProto: num/channels/height/width (fields 1-4), data (5) packed or not."""
    dims = (1,) * (4 - a.ndim) + a.shape
    out = b"".join(key(i + 1, 0) + varint(d) for i, d in enumerate(dims))
    if packed:
        return out + ld(5, a.astype("<f4").tobytes())
    return out + b"".join(key(5, 5) + struct.pack("<f", v) for v in a.reshape(-1))


def v1_caffemodel(layers) -> bytes:
    """NetParameter { layers (2) { name (4) type (5, the V1 enum) blobs (6) blobs_lr (7) } }."""
    out = ld(1, b"tiny")
    for name, enum, blobs in layers:
        body = ld(4, name.encode()) + key(5, 0) + varint(enum)
        body += b"".join(ld(6, blob) for blob in blobs)
        body += key(7, 5) + struct.pack("<f", 1.0)
        out += ld(2, body)
    return out


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.net"
    p.write_text(NET)
    return str(p)


def params(rng):
    return {"conv": [rng.standard_normal((2, 1, 3, 3)).astype("f"), rng.standard_normal(2).astype("f")],
            "fc": [rng.standard_normal((3, 8)).astype("f"), rng.standard_normal(3).astype("f")]}


def test_reads_a_hand_assembled_v1_caffemodel_with_legacy_and_unpacked_blobs(tiny, tmp_path):
    p = params(np.random.default_rng(0))
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(v1_caffemodel([
        ("conv", 4, [v1_blob(p["conv"][0], True), v1_blob(p["conv"][1], False)]),    # CONVOLUTION
        ("fc", 14, [v1_blob(p["fc"][0], False), v1_blob(p["fc"][1], True)]),          # INNER_PRODUCT
        ("loss", 21, [])]))                                                            # SOFTMAX_LOSS: no blobs
    w = read_weights(str(path))
    assert w.types == {"conv": "Convolution", "fc": "InnerProduct"} and w.whole_layers
    assert w.layers["fc"][0].shape == (1, 1, 3, 8) and ("fc", 0) in w.legacy        # Caffe's 4-D legacy blob
    np.testing.assert_array_equal(w.layers["conv"][1].reshape(-1), p["conv"][1])   # unpacked floats decoded
    net = netdsl.load(tiny, phase="test", weights=str(path))
    for name, blobs in p.items():
        for got, want in zip(net.params[name], blobs):
            np.testing.assert_array_equal(got.data, want)                          # legacy 1x1x3x8 -> 3x8


def test_v2_round_trip_and_convert_to_npz_and_back_is_bit_identical(tiny, tmp_path):
    net = netdsl.load(tiny, phase="test")
    p = params(np.random.default_rng(1))
    for name, blobs in p.items():
        for blob, a in zip(net.params[name], blobs):
            blob.data[...] = a
    net.save(str(tmp_path / "w.caffemodel"))
    w = read_weights(str(tmp_path / "w.caffemodel"))
    assert w.types == {"conv": "Convolution", "fc": "InnerProduct"} and not w.legacy
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", str(tmp_path / "w.caffemodel"), str(tmp_path / "w.npz")]) == 0
        assert main(["convert", str(tmp_path / "w.npz"), str(tmp_path / "w2.caffemodel"), "--net", tiny]) == 0
        assert main(["convert", str(tmp_path / "w2.caffemodel"), str(tmp_path / "w2.npz")]) == 0
    a, b = np.load(tmp_path / "w.npz"), np.load(tmp_path / "w2.npz")
    assert sorted(a.files) == ["conv/0", "conv/1", "fc/0", "fc/1"]
    for k in a.files:
        assert a[k].dtype == np.float32 and a[k].tobytes() == b[k].tobytes() == p[k[:-2]][int(k[-1])].tobytes()
    assert (tmp_path / "w.caffemodel").read_bytes() == (tmp_path / "w2.caffemodel").read_bytes()


def test_copy_as_caffe_skips_and_lists_layers_the_net_lacks(tiny, tmp_path):
    p = params(np.random.default_rng(2))
    write_caffemodel(str(tmp_path / "w.caffemodel"), {"conv": ("Convolution", p["conv"]),
                                                      "fc8": ("InnerProduct", [np.zeros((5, 4), "f")])})
    net = netdsl.load(tiny, phase="test")
    copied = net.load(str(tmp_path / "w.caffemodel"))
    assert copied.layers == ["conv"] and copied.not_in_net == ["fc8"]
    assert str(copied) == f"copied 1 layer from {tmp_path / 'w.caffemodel'}; not in the net: fc8"
    np.testing.assert_array_equal(net.params["conv"][0].data, p["conv"][0])


def test_blob_count_and_shape_mismatches_name_the_layer_blob_and_shapes(tiny, tmp_path):
    net = netdsl.load(tiny, phase="test")
    write_caffemodel(str(tmp_path / "a.caffemodel"), {"fc": ("InnerProduct", [np.zeros((3, 8), "f")])})
    with pytest.raises(NetdslError, match="layer 'fc' .*1 blob there but 2 in the net"):
        net.load(str(tmp_path / "a.caffemodel"))
    write_caffemodel(str(tmp_path / "b.caffemodel"), {"fc": ("InnerProduct", [np.zeros((3, 9), "f"), np.zeros(3, "f")])})
    with pytest.raises(NetdslError, match="blob 0 of layer 'fc' .*3x9 there but the net needs 3x8"):
        net.load(str(tmp_path / "b.caffemodel"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["check", tiny, "--weights", str(tmp_path / "b.caffemodel")]) == 2
    assert "error[E0311]" in err.getvalue() and "expect 9 inputs per sample but the net gives 8" in err.getvalue()


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b'name: "tiny"\nlayer { name: "x" type: "ReLU" }\n', "is a text file"),
    (b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 10, "protobuf decoding failed"),     # a length past the end
    (bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)), "not a Caffe"),
])
def test_bad_weight_files_are_clear_errors(tiny, tmp_path, content, words):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", tiny, "--weights", str(path)])
    assert code == 2 and "Traceback" not in err.getvalue()
    assert words in err.getvalue() and str(path) in err.getvalue()


def test_truncated_caffemodel_is_refused(tiny, tmp_path):
    good = tmp_path / "good.caffemodel"
    write_caffemodel(str(good), {"fc": ("InnerProduct", [np.ones((3, 8), "f"), np.ones(3, "f")])})
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(NetdslError) as e:
        read_weights(str(cut))
    assert e.value.diagnostic.code == "E0802"


def test_mean_binaryproto_round_trip(tmp_path):
    mean = np.random.default_rng(4).uniform(0, 255, (3, 5, 7)).astype("f")
    write_blobproto(str(tmp_path / "mean.binaryproto"), mean[None])
    got = read_blobproto(str(tmp_path / "mean.binaryproto"))
    assert got.shape == (1, 3, 5, 7) and got.tobytes() == mean.tobytes()


def test_mnist_subtracts_a_mean_file(tmp_path):
    from support import shared_data_dir
    data = shared_data_dir()
    if data is None:
        pytest.skip("MNIST not found (set NETDSL_DATA)")
    mean = np.random.default_rng(5).uniform(0, 255, (1, 28, 28)).astype("f")
    write_blobproto(str(tmp_path / "mean.binaryproto"), mean[None])
    net_text = ('layer {{ name: "m" type: "MNIST" top: "data" mnist_param {{ split: TEST batch_size: 2 }} '
                'transform_param {{ scale: 0.5 {} }} }}')
    outs = []
    for extra in ("", f'mean_file: "{tmp_path / "mean.binaryproto"}"'):
        p = tmp_path / f"m{len(outs)}.net"
        p.write_text(net_text.format(extra))
        outs.append(netdsl.load(str(p), phase="test", data_dir=str(data)).forward()["data"])
    np.testing.assert_allclose(outs[1], outs[0] - 0.5 * mean[None], rtol=1e-6, atol=1e-5)   # (x - mean) * scale
