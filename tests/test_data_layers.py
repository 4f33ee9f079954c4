"""The layers that read the user's files (Data/LMDB, ImageData, HDF5Data, HDF5Output), Caffe's
DataTransformer, prefetching and resume, the data tools, and their located errors. Small data
sets made in tmp dirs: synthetic images, or a synthetic MNIST exported with export-mnist."""
from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_mnist import synthetic, synthetic_files, write_all

from netdsl import load as load_net
from netdsl.cli import main
from netdsl.data import images, tools
from netdsl.data.feed import BatchFeed
from netdsl.errors import NetdslError
from netdsl.layers.data import transform

lmdb = pytest.importorskip("lmdb")
h5py = pytest.importorskip("h5py")
Image = pytest.importorskip("PIL.Image")
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ helpers

def png_bytes(hwc: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format=fmt)
    return buf.getvalue()


def image_folder(root: Path, n=12, size=(8, 10), color=True, seed=0) -> tuple[Path, np.ndarray, np.ndarray]:
    """n PNGs and list.txt (`i.png label`); returns the list and the images (N x C x H x W, BGR)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shape = (n, *size, 3) if color else (n, *size)
    rgb = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    for i in range(n):
        (root / f"{i}.png").write_bytes(png_bytes(rgb[i]))
    (root / "list.txt").write_text("".join(f"{i}.png {labels[i]}\n" for i in range(n)))
    chw = rgb[..., ::-1].transpose(0, 3, 1, 2) if color else rgb[:, None]
    return root / "list.txt", chw, labels


def write(tmp: Path, text: str, name="net.net") -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def data_net(tmp: Path, layer: str, phase="TEST") -> object:
    tail = NET_TAIL if phase == "TRAIN" else '\nlayer { name: "s" type: "Silence" bottom: "data" bottom: "label" }\n'
    path = write(tmp, layer + tail)
    return load_net(path, phase=phase)


def image_data(source, root, extra="", transform_param="", batch=4):
    return (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{source}" '
            f'root_folder: "{root}/" batch_size: {batch} {extra} }} transform_param {{ {transform_param} }} }}')


def lmdb_data(source, transform_param="", batch=4):
    return (f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ source: "{source}" '
            f'backend: LMDB batch_size: {batch} }} transform_param {{ {transform_param} }} }}')


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ------------------------------------------------------------------------------ Datum

def test_datum_decodes_hand_written_wire_bytes():
    # channels 1, height 2, width 2, data 4 bytes, label 7: written field by field (caffe.proto numbers)
    raw = bytes([0x08, 1, 0x10, 2, 0x18, 2, 0x22, 4, 1, 2, 3, 250, 0x28, 7])
    chw, label = images.from_datum(raw, "rec")
    assert label == 7 and chw.dtype == np.uint8
    assert chw.tolist() == [[[1, 2], [3, 250]]]


def test_datum_float_data_packed_or_not():
    from netdsl.caffe_pb import messages
    d = messages()["Datum"](channels=1, height=1, width=3, label=2)
    d.float_data.extend([0.5, -1.0, 3.25])
    chw, label = images.from_datum(d.SerializeToString(), "rec")
    assert label == 2 and chw.dtype == np.float32 and chw.ravel().tolist() == [0.5, -1.0, 3.25]
    # unpacked (caffe.proto's proto2 default): tag 6 wire type 5 per value
    raw = bytes([0x08, 1, 0x10, 1, 0x18, 2]) + b"".join(bytes([0x35]) + np.float32(v).tobytes() for v in (1.5, 2.0))
    assert images.from_datum(raw, "rec")[0].ravel().tolist() == [1.5, 2.0]


def test_datum_round_trip_raw_and_encoded():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    chw, label = images.from_datum(images.to_datum(bgr, 3), "r")
    assert np.array_equal(chw, bgr) and label == 3
    png = images.to_datum(None, 4, images.encode_image(bgr, "png"))
    assert np.array_equal(images.from_datum(png, "r")[0], bgr)                 # lossless, BGR kept
    gray = images.from_datum(png, "r", color=False)[0]                       # force_gray
    assert gray.shape == (1, 5, 7)


def test_encoded_colour_is_bgr_like_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = png_bytes(rgb, fmt)
        ours = images.decode_image(data, True, "x")
        theirs = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).transpose(2, 0, 1)
        assert np.abs(ours.astype(int) - theirs).max() <= (0 if fmt == "PNG" else 2), fmt
        gray = images.decode_image(data, False, "x")[0]
        cv_gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert np.abs(gray.astype(int) - cv_gray).max() <= 2, fmt


def test_resize_matches_opencv_bilinear():
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(2).integers(0, 256, (3, 17, 23), dtype=np.uint8)
    for h, w in ((8, 11), (30, 41), (17, 5)):
        ours = images.resize(img, h, w)
        theirs = cv2.resize(img.transpose(1, 2, 0), (w, h), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_corrupt_datum_names_the_record():
    with pytest.raises(NetdslError) as e:
        images.from_datum(b"\xff\xff\xff", "db: record 'k'")
    assert e.value.diagnostic.code == "E0947" and "record 'k'" in str(e.value)
    with pytest.raises(NetdslError) as e:
        images.from_datum(bytes([0x08, 1, 0x10, 2, 0x18, 2, 0x22, 1, 9]), "r")    # 1 byte for 4 pixels
    assert e.value.diagnostic.code == "E0947"


# ------------------------------------------------------------------------------ the transformer

class Draws:
    """An rng whose integers() returns the values given, in order (checks the bounds asked)."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, high):
        v = self.values.pop(0)
        assert 0 <= v < high
        return v


def caffe_transform(datum, crop, scale, mirror_flip, h_off, w_off, mean=None, mean_values=()):
    """data_transformer.cpp's Transform(const Datum&, Dtype*), line for line."""
    c_n, height, width = datum.shape
    ch, cw = (crop, crop) if crop else (height, width)
    out = np.zeros((c_n, ch, cw), np.float32)
    for c in range(c_n):
        for h in range(ch):
            for w in range(cw):
                x = np.float32(datum[c, h_off + h, w_off + w])
                top_w = cw - 1 - w if mirror_flip else w
                if mean is not None:
                    v = (x - np.float32(mean[c, h_off + h, w_off + w])) * np.float32(scale)
                elif mean_values:
                    v = (x - np.float32(mean_values[c if len(mean_values) > 1 else 0])) * np.float32(scale)
                else:
                    v = x * np.float32(scale)
                out[c, h, top_w] = v
    return out


def test_transform_is_caffes_in_train():
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (2, 3, 7, 9), dtype=np.uint8)
    mean = rng.random((3, 7, 9)).astype(np.float32) * 100
    t = SimpleNamespace(crop_size=4, mirror=True, scale=0.017, mean_value=[])
    # per image, Caffe's order: mirror coin, row offset, column offset
    got = transform(list(batch), t, "TRAIN", Draws([1, 2, 5, 0, 3, 0]), mean)
    assert np.array_equal(got[0], caffe_transform(batch[0], 4, 0.017, True, 2, 5, mean))
    assert np.array_equal(got[1], caffe_transform(batch[1], 4, 0.017, False, 3, 0, mean))


def test_transform_test_phase_centre_crop_and_mean_values():
    batch = np.random.default_rng(4).integers(0, 256, (2, 3, 8, 11), dtype=np.uint8)
    t = SimpleNamespace(crop_size=5, mirror=False, scale=2.0, mean_value=[10.0, 20.0, 30.0])
    got = transform(list(batch), t, "TEST", Draws([]))
    for i in range(2):
        assert np.array_equal(got[i], caffe_transform(batch[i], 5, 2.0, False, 1, 3, mean_values=(10.0, 20.0, 30.0)))
    one = SimpleNamespace(crop_size=0, mirror=False, scale=1.0, mean_value=[7.5])
    assert np.array_equal(transform(batch, one, "TEST", None)[1], caffe_transform(batch[1], 0, 1.0, False, 0, 0,
                                                                                   mean_values=(7.5,)))


def test_mirror_applies_in_test_too_as_caffe():
    batch = np.arange(2 * 1 * 2 * 3, dtype=np.uint8).reshape(2, 1, 2, 3)
    t = SimpleNamespace(crop_size=0, mirror=True, scale=1.0, mean_value=[])
    got = transform(list(batch), t, "TEST", Draws([1, 0]))
    assert np.array_equal(got[0], batch[0][:, :, ::-1]) and np.array_equal(got[1], batch[1])


# ------------------------------------------------------------------------------ layers

def test_image_data_reads_images_in_list_order(tmp_path):
    listing, chw, labels = image_folder(tmp_path / "img")
    net = data_net(tmp_path, image_data(listing, tmp_path / "img", transform_param="scale: 0.5"))
    assert net.plan.blob_shapes[net.plan.steps[0].node.tops[0]] == (4, 3, 8, 10)
    for k in range(4):                                        # 12 images: wraps after 3 batches
        net.forward()
        idx = [(4 * k + j) % 12 for j in range(4)]
        assert np.array_equal(net.blobs["data"].data, chw[idx].astype(np.float32) * 0.5)
        assert np.array_equal(net.blobs["label"].data, labels[idx].astype(np.float32))


def test_image_data_resize_gray_and_crop_shapes(tmp_path):
    listing, _, _ = image_folder(tmp_path / "img")
    net = data_net(tmp_path, image_data(listing, tmp_path / "img", "new_height: 16 new_width: 12 is_color: false",
                                        "crop_size: 6 mirror: true"), phase="TRAIN")
    net.forward()
    assert net.blobs["data"].data.shape == (4, 1, 6, 6)


def test_lmdb_from_convert_imageset_equals_image_data(tmp_path, capsys):
    listing, chw, labels = image_folder(tmp_path / "img")
    for flags in ([], ["--encoded"], ["--encoded", "--encode-type", "jpg", "--resize", "8,10"]):
        db = tmp_path / f"db{len(flags)}"
        code, out = run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(db), *flags)
        assert code == 0, out
        net = data_net(tmp_path, lmdb_data(db, "scale: 0.5"))
        net.forward()
        want = chw[:4]
        if "jpg" in flags:                      # lossy: the images as the JPEG encoder left them
            want = np.stack([images.decode_image(images.encode_image(c, "jpg"), True, "") for c in want])
        assert np.array_equal(net.blobs["data"].data, want * np.float32(0.5))
        assert np.array_equal(net.blobs["label"].data, labels[:4].astype(np.float32))


def test_compute_mean_and_mean_file(tmp_path, capsys):
    listing, chw, _ = image_folder(tmp_path / "img", n=6)
    db, mean = tmp_path / "db", tmp_path / "mean.binaryproto"
    assert run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(db))[0] == 0
    code, out = run_cli(capsys, "data", "compute-mean", str(db), "-o", str(mean))
    assert code == 0, out
    from netdsl.weights import read_blobproto
    m = read_blobproto(str(mean))
    assert m.shape == (1, 3, 8, 10)
    np.testing.assert_allclose(m[0], chw.astype(np.float64).mean(0), rtol=1e-6)
    net = data_net(tmp_path, lmdb_data(db, f'mean_file: "{mean}" crop_size: 4', batch=6))
    net.forward()
    want = [caffe_transform(chw[i], 4, 1.0, False, 2, 3, m[0]) for i in range(6)]
    assert np.array_equal(net.blobs["data"].data, np.stack(want))
    assert run_cli(capsys, "data", "compute-mean", str(db), "-o", str(mean))[0] == 2     # never overwritten


def test_hdf5_data_and_output(tmp_path, capsys):
    rng = np.random.default_rng(5)
    x, y = rng.random((10, 4)).astype(np.float32), np.arange(10, dtype=np.float32)
    for i, sl in enumerate((slice(0, 6), slice(6, 10))):
        with h5py.File(tmp_path / f"p{i}.h5", "w") as f:
            f["data"], f["label"] = x[sl], y[sl]
    (tmp_path / "h5.txt").write_text(f"{tmp_path}/p0.h5\n{tmp_path}/p1.h5\n")
    out = tmp_path / "out.h5"
    net = load_net(write(tmp_path, f'''
layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{tmp_path}/h5.txt" batch_size: 4 }} }}
layer {{ name: "o" type: "HDF5Output" bottom: "data" bottom: "label" hdf5_output_param {{ file_name: "{out}" }} }}'''), phase="TEST")
    for _ in range(3):
        net.forward()
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["data"][()], x[[*range(10), 0, 1]]) and np.array_equal(f["label"][()], y[[*range(10), 0, 1]])


def test_export_mnist_formats_feed_the_layers(tmp_path, monkeypatch, capsys):
    write_all(tmp_path / "mnist" / "mnist", synthetic_files(seed=7))
    train_images, train_labels = synthetic(5, 7)
    out = tmp_path / "ex"
    for fmt in ("png", "lmdb", "hdf5"):
        code, text = run_cli(capsys, "data", "export-mnist", str(out), "--format", fmt, "--data-dir", str(tmp_path / "mnist"))
        assert code == 0, text
    want = train_images[:4, None].astype(np.float32) * np.float32(0.00390625)
    layers = [image_data(out / "train.txt", out, "is_color: false", "scale: 0.00390625"),
              lmdb_data(out / "mnist_train_lmdb", "scale: 0.00390625"),
              f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{out}/train_h5.txt" '
              'batch_size: 4 } }']
    for layer in layers:
        net = data_net(tmp_path, layer)
        net.forward()
        assert np.array_equal(net.blobs["data"].data, want), layer
        assert np.array_equal(net.blobs["label"].data, train_labels[:4].astype(np.float32))


# ------------------------------------------------------------------------------ prefetch and resume

def test_batch_order_is_fixed_by_the_seed_prefetched_or_not():
    def make(idx, rng):
        return [idx.copy(), rng.integers(1000, size=2)]

    feeds = [BatchFeed(make, 10, 4, seed=3, shuffle=True, skip=2, prefetch=p) for p in (0, 1, 4)]
    runs = [[f.next() for _ in range(7)] for f in feeds]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
    order0 = np.random.default_rng([3, 0]).permutation(10)
    assert np.array_equal(np.concatenate([b[0] for b in runs[0]])[:8], order0[2:10])     # rand_skip 2, epoch 0
    f = BatchFeed(make, 10, 4, seed=3, shuffle=True, skip=2, prefetch=4)
    f.load_state({"batch": 5})
    assert all(np.array_equal(x, y) for x, y in zip(f.next(), runs[0][5]))
    for feed in feeds:
        feed.close()


def test_prefetch_thread_error_is_raised_not_hung():
    def make(idx, rng):
        if idx[0] >= 4:
            raise NetdslError("E0947", "bad record")
        return [idx]

    f = BatchFeed(make, 20, 4, seed=0, prefetch=3)
    f.next()
    with pytest.raises(NetdslError, match="bad record"):
        f.next()
    assert f.state() == {"batch": 1}


def test_prefetch_thread_ends_with_its_net(tmp_path):
    import gc
    import threading
    import time
    listing, _, _ = image_folder(tmp_path / "img", n=8)
    net = data_net(tmp_path, image_data(listing, tmp_path / "img"))
    net.forward()

    def prefetching():
        return [t for t in threading.enumerate() if t.name == "netdsl-prefetch"]

    threads = prefetching()
    assert threads
    del net
    gc.collect()
    deadline = time.time() + 10
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in threads)


SOLVER = """net: "{net}"
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
max_iter: {max_iter}
snapshot: {snapshot}
snapshot_prefix: "{prefix}"
random_seed: 5
display: 0
"""

NET_TAIL = """
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def solver_for(tmp: Path, layer: str, name: str, max_iter: int, snapshot: int) -> str:
    net = write(tmp, layer + NET_TAIL, f"{name}.net")
    return write(tmp, SOLVER.format(net=net, max_iter=max_iter, snapshot=snapshot, prefix=tmp / name / "s"),
                 f"{name}_solver.net")


def weights(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_resume_is_bit_exact_with_shuffle_crop_mirror(tmp_path):
    listing, _, _ = image_folder(tmp_path / "img", n=10)
    layer = image_data(listing, tmp_path / "img", "shuffle: true rand_skip: 3", "crop_size: 6 mirror: true scale: 0.01",
                       batch=3)
    assert main(["train", solver_for(tmp_path, layer, "a", 12, 6)]) == 0
    assert main(["train", solver_for(tmp_path, layer, "b", 6, 6)]) == 0
    assert main(["train", solver_for(tmp_path, layer, "b", 12, 6), "--snapshot",
                 str(tmp_path / "b" / "s_iter_6.solverstate.npz")]) == 0
    a, b = weights(tmp_path / "a" / "s_iter_12.npz"), weights(tmp_path / "b" / "s_iter_12.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert int(weights(tmp_path / "b" / "s_iter_6.solverstate.npz")["train/data/d/batch"]) == 6


# ------------------------------------------------------------------------------ bad input: located, exit 2

def test_missing_source_check_and_train(tmp_path, capsys):
    layer = image_data(tmp_path / "nope.txt", tmp_path)
    code, out = run_cli(capsys, "check", write(tmp_path, layer + NET_TAIL))
    assert code == 2 and "not found" in out and "nope.txt" in out and "Traceback" not in out


def test_leveldb_source_says_convert_to_lmdb(tmp_path, capsys):
    db = tmp_path / "ldb"
    db.mkdir()
    (db / "CURRENT").write_text("MANIFEST-000001\n")
    code, out = run_cli(capsys, "check", write(tmp_path, lmdb_data(db) + NET_TAIL))
    assert code == 2 and "E0942" in out and "LevelDB" in out and "convert-imageset" in out


@pytest.mark.parametrize("line, code, what", [
    ("0.png five", "E0943", "not an integer"),
    ("0.png", "E0943", "not `path label`"),
    ("missing.png 1", "E0945", "cannot read the image"),
    ("bad.png 1", "E0946", "cannot decode"),
])
def test_list_file_errors_name_file_and_line(tmp_path, capsys, line, code, what):
    listing, _, _ = image_folder(tmp_path / "img", n=2)
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    listing.write_text(f"1.png 0\n\n{line}\n")
    if code in ("E0945", "E0946"):
        listing.write_text(f"{line}\n1.png 0\n")
    text = image_data(listing, tmp_path / "img") + NET_TAIL
    rc, out = run_cli(capsys, "check", write(tmp_path, text))
    assert rc == 2 and code in out and what in out, out
    assert f"list.txt:{3 if code == 'E0943' else 1}" in out


def test_empty_list_and_sizes_differ(tmp_path, capsys):
    listing, _, _ = image_folder(tmp_path / "img", n=2)
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    listing.write_text("0.png 1\nsmall.png 2\n")
    net = data_net(tmp_path, image_data(listing, tmp_path / "img", batch=2))
    with pytest.raises(NetdslError) as e:
        net.forward()
    assert e.value.diagnostic.code == "E0948" and "list.txt:2" in str(e.value)
    listing.write_text("\n\n")
    rc, out = run_cli(capsys, "check", write(tmp_path, image_data(listing, tmp_path / "img") + NET_TAIL))
    assert rc == 2 and "E0944" in out and "empty" in out


def test_hdf5_missing_dataset_and_length_mismatch(tmp_path, capsys):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"], f["labels"] = np.zeros((4, 2)), np.zeros(4)
    (tmp_path / "h5.txt").write_text(f"{tmp_path}/a.h5\n")
    layer = (f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{tmp_path}/h5.txt" '
             'batch_size: 2 } }')
    rc, out = run_cli(capsys, "check", write(tmp_path, layer + NET_TAIL))
    assert rc == 2 and "E0949" in out and "no dataset 'label'" in out and "h5.txt:1" in out
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"], f["label"] = np.zeros((4, 2)), np.zeros(3)
    rc, out = run_cli(capsys, "check", write(tmp_path, layer + NET_TAIL))
    assert rc == 2 and "different lengths" in out


def test_bad_record_mid_training_snapshots_and_names_it(tmp_path, capsys):
    listing, _, _ = image_folder(tmp_path / "img", n=8)
    db = tmp_path / "db"
    assert run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(db))[0] == 0
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"00000005_5.png", b"\x08\x03\x10\x08\x18\x0a\x22\x02ab")   # 2 bytes for a 3x8x10 image
    env.close()
    rc, out = run_cli(capsys, "train", solver_for(tmp_path, lmdb_data(db, batch=2), "c", 10, 0))
    assert rc == 2 and "E0947" in out and "record '00000005_5.png'" in out and "Traceback" not in out
    assert "training stopped at iteration 2" in out
    state = weights(tmp_path / "c" / "s_iter_2.solverstate.npz")
    assert int(state["train/data/d/batch"]) == 2


def test_tools_refuse_bad_options(tmp_path, capsys):
    listing, _, _ = image_folder(tmp_path / "img", n=2)
    rc, out = run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(tmp_path / "d"),
                      "--resize", "8")
    assert rc == 2 and "E0951" in out
    (tmp_path / "exists").mkdir()
    rc, out = run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(tmp_path / "exists"))
    assert rc == 2 and "already exists" in out
    listing.write_text("0.png 1\nnope.png 2\n")
    rc, out = run_cli(capsys, "data", "convert-imageset", f"{tmp_path}/img/", str(listing), str(tmp_path / "e"))
    assert rc == 2 and "list.txt:2" in out and not os.path.exists(tmp_path / "e")      # nothing half-written
    assert not list(tmp_path.glob("e.tmp-*"))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)         # import lmdb raises ImportError
    with pytest.raises(NetdslError) as e:
        images.need("lmdb", "the Data layer")
    assert e.value.diagnostic.code == "E0940" and 'pip install "netdsl[data]"' in e.value.diagnostic.help


# ------------------------------------------------------------------------------ the samples

@pytest.mark.parametrize("sample", ["lenet_imagedata", "lenet_lmdb"])
def test_samples_train_a_short_run(tmp_path, monkeypatch, capsys, mnist_dir, sample):
    monkeypatch.chdir(tmp_path)
    tools.export_mnist("data/mnist_png", "png", mnist_dir, limit=200, progress=False)
    if sample == "lenet_lmdb":
        for split in ("train", "test"):
            tools.convert_imageset("data/mnist_png/", f"data/mnist_png/{split}.txt", f"data/mnist_{split}_lmdb",
                                   gray=True, progress=False)
    code, out = run_cli(capsys, "train", str(REPO / "nets" / f"{sample}_solver.net"), "--max-iter", "30")
    assert code == 0, out
    assert (tmp_path / "runs" / sample / "lenet_iter_30.npz").exists()


def test_export_mnist_color_png_and_lmdb_agree(tmp_path, capsys):
    write_all(tmp_path / "mnist" / "mnist", synthetic_files(seed=8))
    out = tmp_path / "ex"
    for fmt in ("png", "lmdb"):
        code, text = run_cli(capsys, "data", "export-mnist", str(out), "--format", fmt, "--color",
                             "--data-dir", str(tmp_path / "mnist"))
        assert code == 0, text
    got = []
    for layer in (image_data(out / "train.txt", out), lmdb_data(out / "mnist_train_lmdb")):
        net = data_net(tmp_path, layer)
        net.forward()
        got.append(net.blobs["data"].data)
    assert got[0].shape == (4, 3, 32, 32) and np.array_equal(got[0], got[1])
    want = tools.tinted(synthetic(5, 8)[0], seed=0)[:4]          # the train split's 5 digits, tinted
    assert np.array_equal(got[0], want) and not np.array_equal(want[:, 0], want[:, 1])


def test_cifar10_quick_digits_sample_trains(tmp_path, monkeypatch, capsys, mnist_dir):
    monkeypatch.chdir(tmp_path)
    tools.export_mnist("data/digits_color", "lmdb", mnist_dir, limit=300, progress=False, color=True)
    tools.compute_mean("data/digits_color/mnist_train_lmdb", "data/digits_color/mean.binaryproto", progress=False)
    # the sample's solver, with one test batch (its own tests 10,000 images before the first step)
    solver = (REPO / "nets" / "cifar10_quick_digits_solver.net").read_text()
    solver = solver.replace('net: "cifar10_quick_digits.net"', f'net: "{REPO / "nets" / "cifar10_quick_digits.net"}"')
    solver = solver.replace("test_iter: 100", "test_iter: 1")
    code, out = run_cli(capsys, "train", write(tmp_path, solver, "solver.net"), "--max-iter", "2")
    assert code == 0, out
    assert (tmp_path / "runs" / "cifar10_quick_digits" / "cifar10_quick_iter_2.npz").exists()


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "P+tRNS", "LA", "I;16", "1"])
def test_png_fast_path_equals_pillow(mode):
    """decode_image reads common PNGs with netdsl's reader and leaves the rest to Pillow: either way
    the pixels are Pillow's, for every colour option (Pillow's encoder picks the row filters)."""
    from PIL import Image
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (13, 11, 4), dtype=np.uint8)
    base[4:7] = 250                                            # flat rows: Pillow filters them differently
    if mode in ("P", "P+tRNS"):
        im = Image.fromarray(base[:, :, :3]).quantize(16)
        if mode == "P+tRNS":
            im.info["transparency"] = bytes(range(0, 256, 16))
    elif mode == "I;16":
        im = Image.fromarray(base[:, :, 0].astype(np.uint16) * 257)
    else:
        im = Image.fromarray(base[:, :, :len(mode.replace(";16", ""))].squeeze()).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"transparency": im.info["transparency"]} if mode == "P+tRNS" else {}))
    data = buf.getvalue()
    for color in (True, False, None):
        np.testing.assert_array_equal(images.decode_image(data, color, "x"), images._pillow(data, color, "x"))


def test_png_fast_path_all_filters_and_damage():
    from test_scenes import encode_png
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)
    data = encode_png(rgb, [0, 1, 2, 3, 4, 4, 3, 2, 1], colour=2)
    assert images._png(data, True, "x") is not None                 # the fast path took it
    np.testing.assert_array_equal(images.decode_image(data, True, "x"), rgb[:, :, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(images.decode_image(data, True, "x"), images._pillow(data, True, "x"))
    for bad in (data[:100], data[:60] + bytes([data[60] ^ 1]) + data[61:]):   # truncated; a flipped IDAT byte
        with pytest.raises(NetdslError) as e:
            images.decode_image(bad, True, "list.txt:3 (a.png)")
        assert e.value.diagnostic.code == "E0946" and "list.txt:3" in e.value.diagnostic.message
