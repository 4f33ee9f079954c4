"""Tests for digit scenes, their PNG rendering, and the PNG reader and writer."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from support import needs_mnist, shared_data_dir

from netdsl.data.png import read_png, write_png
from netdsl.data.scenes import IGNORE, INK, DigitScenes, make_scene, render_scene_png, resample
from netdsl.errors import NetdslError


@pytest.fixture(scope="module")
def digits():
    """30 fake 28x28 digits: a random solid rectangle of ink whose value encodes the label
    (100 + 10 * label), so a scene's class can be checked against the pixels it drew."""
    rng = np.random.default_rng(7)
    images = np.zeros((30, 28, 28), np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    for k in range(30):
        y0, x0 = rng.integers(0, 10, 2)
        y1, x1 = y0 + rng.integers(3, 18), x0 + rng.integers(3, 18)
        images[k, y0:y1, x0:x1] = 100 + 10 * labels[k]
    return images, labels


def box_sides(boxes):
    return boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1


# ------------------------------------------------------------------------- make_scene

def test_scene_shapes_ranges_and_boxes_inside(digits):
    for seed in range(20):
        image, boxes = make_scene(seed, *digits, height=96, width=128, max_size=60)
        assert image.shape == (1, 96, 128) and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 1
        assert boxes.dtype == np.float32 and boxes.shape[1] == 5
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= 127).all() and (boxes[:, 3] <= 95).all()
        assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
        assert set(boxes[:, 4].astype(int)) <= set(range(1, 11))


def test_scene_is_deterministic_in_its_seed(digits):
    a = make_scene(5, *digits)
    b = make_scene(np.random.default_rng(5), *digits)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = make_scene(6, *digits)
    assert not np.array_equal(a[0], c[0])


def test_boxes_are_tight_around_the_ink(digits):
    for seed in range(30):
        image, boxes = make_scene(seed, *digits, noise=0, max_digits=4, height=128, width=128)
        ink = image[0] > 0
        covered = np.zeros_like(ink)
        for x1, y1, x2, y2, _ in boxes.astype(int):
            covered[y1:y2 + 1, x1:x2 + 1] = True
            # Every edge row and column of the box holds ink (compositing with max never
            # removes ink, so this holds even where boxes overlap).
            assert ink[y1, x1:x2 + 1].any() and ink[y2, x1:x2 + 1].any()
            assert ink[y1:y2 + 1, x1].any() and ink[y1:y2 + 1, x2].any()
        assert not (ink & ~covered).any()


def test_classes_match_the_digits_drawn(digits):
    for seed in range(15):
        image, boxes = make_scene(seed, *digits, noise=0, max_iou=0, max_cover=0)
        for x1, y1, x2, y2, cls in boxes.astype(int):
            peak = image[0, y1:y2 + 1, x1:x2 + 1].max() * 255
            assert round((peak - 100) / 10) == cls - 1


def test_digit_count_bounds(digits):
    counts = {len(make_scene(s, *digits, min_digits=2, max_digits=4)[1]) for s in range(40)}
    assert counts == {2, 3, 4}
    for s in range(10):
        assert len(make_scene(s, *digits, min_digits=3, max_digits=3)[1]) == 3


def test_sizes_and_overlap_limits(digits):
    longest = []
    for seed in range(40):
        _, boxes = make_scene(seed, *digits, max_digits=6, min_size=16, max_size=120,
                              max_iou=0.3, max_cover=0.5)
        w, h = box_sides(boxes)
        longest += list(np.maximum(w, h))
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
                ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
                inter = max(iw, 0) * max(ih, 0)
                area_a, area_b = w[i] * h[i], w[j] * h[j]
                assert inter / (area_a + area_b - inter) <= 0.3
                assert inter / min(area_a, area_b) <= 0.5
    assert 16 <= min(longest) and max(longest) <= 120
    assert min(longest) < 30 and max(longest) > 90     # the scales really vary


def test_max_size_is_capped_at_the_scene(digits):
    for seed in range(10):
        _, boxes = make_scene(seed, *digits, height=40, width=64, min_size=30, max_size=120)
        w, h = box_sides(boxes)
        assert (h <= 40).all() and (w <= 64).all()


def test_colour_scenes_keep_full_ink_in_one_channel(digits):
    image, boxes = make_scene(3, *digits, channels=3, noise=0, max_iou=0, max_cover=0)
    assert image.shape == (3, 224, 224)
    x1, y1, x2, y2, cls = boxes[0].astype(int)
    np.testing.assert_allclose(image[:, y1:y2 + 1, x1:x2 + 1].max() * 255, 100 + 10 * (cls - 1),
                               rtol=1e-5)


def test_label_maps_mark_each_digits_ink(digits):
    """Gray scenes without noise or overlap: a pixel is labelled with a box's class exactly where
    the image's ink reaches INK inside that box, IGNORE where fainter ink is, 0 elsewhere."""
    for seed in range(8):
        image, boxes, labels = make_scene(seed, *digits, noise=0, max_iou=0, max_cover=0, with_labels=True)
        plain_image, plain_boxes = make_scene(seed, *digits, noise=0, max_iou=0, max_cover=0)
        np.testing.assert_array_equal(image, plain_image)
        np.testing.assert_array_equal(boxes, plain_boxes)
        assert labels.shape == image.shape[1:] and labels.dtype == np.uint8
        ink = image[0]
        want = np.where(ink >= INK, 0, np.where(ink > 0, IGNORE, 0)).astype(np.uint8)
        inside = np.zeros(labels.shape, bool)
        for x1, y1, x2, y2, cls in boxes.astype(int):
            box = (slice(y1, y2 + 1), slice(x1, x2 + 1))
            want[box][ink[box] >= INK] = cls
            inside[box] = True
        np.testing.assert_array_equal(labels, want)
        assert not labels[~inside].any()


def test_invalid_parameters(digits):
    with pytest.raises(NetdslError) as e:
        make_scene(0, *digits, min_digits=3, max_digits=2, min_size=0)
    d = e.value.diagnostic
    assert d.code == "E0910" and len(d.notes) == 2 and d.help
    with pytest.raises(NetdslError) as e:
        make_scene(0, digits[0], digits[1][:5])
    assert e.value.diagnostic.code == "E0910"


def test_unplaceable_digits(digits):
    with pytest.raises(NetdslError) as e:
        make_scene(0, *digits, height=20, width=20, min_size=16, min_digits=4, max_digits=4,
                   max_iou=0, max_cover=0)
    assert e.value.diagnostic.code == "E0911"


def test_resample_keeps_extent_and_constant_level():
    # A tight crop whose edges each hold a single inked pixel: the hardest case to keep.
    crop = np.zeros((13, 9))
    crop[[0, -1], 4] = crop[6, [0, -1]] = 0.5
    for out in [(5, 3), (3, 2), (13, 9), (40, 7), (4, 30), (117, 81)]:
        r = resample(crop, *out)
        assert r.shape == out
        assert r[0].any() and r[-1].any() and r[:, 0].any() and r[:, -1].any()
        np.testing.assert_allclose(resample(np.full((13, 9), 0.25), *out), 0.25, rtol=1e-6)


# ------------------------------------------------------------------------- DigitScenes (real MNIST)

@needs_mnist
def test_digit_scenes_deterministic_and_split_specific():
    train = DigitScenes("train", shared_data_dir(), seed=1)
    again = DigitScenes("train", shared_data_dir(), seed=1)
    test = DigitScenes("test", shared_data_dir(), seed=1)
    a, boxes = train.scene(4)
    np.testing.assert_array_equal(a, again.scene(4)[0])
    np.testing.assert_array_equal(boxes, again.scene(4)[1])
    assert not np.array_equal(a, train.scene(5)[0])
    assert not np.array_equal(a, DigitScenes("train", shared_data_dir(), seed=2).scene(4)[0])
    assert not np.array_equal(a, test.scene(4)[0])
    assert len(train.images) == 60000 and len(test.images) == 10000
    np.testing.assert_array_equal(train.im_info(), [[224, 224, 1]])
    assert train.im_info().dtype == np.float32


@needs_mnist
def test_digit_scenes_options_and_bad_index():
    ds = DigitScenes("test", shared_data_dir(), height=100, width=150, max_digits=2, channels=3)
    image, boxes = ds.scene(0)
    assert image.shape == (3, 100, 150) and 1 <= len(boxes) <= 2
    np.testing.assert_array_equal(ds.im_info(), [[100, 150, 1]])
    with pytest.raises(NetdslError) as e:
        ds.scene(-1)
    assert e.value.diagnostic.code == "E0912"
    image2, boxes2, labels = ds.labelled_scene(0)
    np.testing.assert_array_equal(image2, image)
    np.testing.assert_array_equal(boxes2, boxes)
    assert labels.shape == (100, 150) and set(np.unique(labels)) <= {0, IGNORE, *boxes[:, 4].astype(int)}
    clean = DigitScenes("test", shared_data_dir(), height=100, width=150, max_digits=2, noise=0)
    image, _, labels = clean.labelled_scene(0)
    assert not image[:, labels == 0].any() and image[:, labels == 0].size        # noise 0: a black background
    with pytest.raises(NetdslError) as e:
        DigitScenes("test", shared_data_dir(), min_size=50, max_size=20)
    assert e.value.diagnostic.code == "E0910"


# ------------------------------------------------------------------------- rendering

def test_render_scene_png(tmp_path):
    image = np.zeros((1, 64, 64), np.float32)
    image[0, 12:29, 12:29] = 0.5
    gt = np.array([[10, 10, 30, 30, 3]], np.float32)
    rois = np.array([[0, 40, 5, 60, 20], [0, 5, 40, 20, 60]], np.float32)   # Caffe rois
    render_scene_png(tmp_path / "s.png", image, gt, proposals=rois, scores=[0.1, 0.9],
                     thickness=2)
    rgb = read_png(tmp_path / "s.png")
    assert rgb.shape == (64, 64, 3)
    assert tuple(rgb[10, 20]) == tuple(rgb[11, 20]) == tuple(rgb[30, 30]) == (0, 255, 0)
    assert tuple(rgb[5, 50]) == tuple(rgb[12, 41]) == (255, 0, 0)        # low score: red
    assert tuple(rgb[40, 10]) == tuple(rgb[60, 20]) == (255, 255, 0)     # high score: yellow
    assert tuple(rgb[20, 20]) == (128, 128, 128) and tuple(rgb[2, 2]) == (0, 0, 0)
    assert tuple(rgb[12, 42]) == (0, 0, 0)                  # 2 px lines, not filled boxes


# ------------------------------------------------------------------------- PNG

@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip(tmp_path, channels):
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (17, 23, channels), dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    np.testing.assert_array_equal(read_png(tmp_path / "x.png"), image)
    assert os.listdir(tmp_path) == ["x.png"]         # the temp file was renamed, not left


def test_png_grayscale_2d_input(tmp_path):
    image = np.arange(60, dtype=np.uint8).reshape(6, 10)
    write_png(tmp_path / "g.png", image)
    np.testing.assert_array_equal(read_png(tmp_path / "g.png")[..., 0], image)


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_png(image: np.ndarray, filters, colour: int, extra=b"") -> bytes:
    """An independent PNG encoder applying the given per-row filter types (PNG spec §9)."""
    h, w, bpp = image.shape
    rows, prev = [], [0] * (w * bpp)
    for y in range(h):
        cur, kind = image[y].reshape(-1).tolist(), filters[y % len(filters)]
        out = []
        for i, x in enumerate(cur):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
            out.append((x - pred) % 256)
        rows.append(bytes([kind] + out))
        prev = cur
    return png_file(struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0),
                    zlib.compress(b"".join(rows)), extra)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(ihdr: bytes, idat: bytes, extra=b"") -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels,colour", [(1, 0), (2, 4), (3, 2), (4, 6)])
def test_png_reads_all_filter_types(tmp_path, channels, colour):
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (10, 9, channels), dtype=np.uint8)
    image[3:6] = 250                                   # wrap-around cases for Up and Average
    (tmp_path / "f.png").write_bytes(encode_png(image, [0, 1, 2, 3, 4, 4, 3, 2, 1], colour))
    np.testing.assert_array_equal(read_png(tmp_path / "f.png"), image)


def test_png_palette_with_transparency(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)[:, :, None]
    extra = chunk(b"PLTE", palette.tobytes()) + chunk(b"tRNS", bytes([0, 128]))
    (tmp_path / "p.png").write_bytes(encode_png(index, [1, 4], colour=3, extra=extra))
    rgba = read_png(tmp_path / "p.png")
    assert rgba.shape == (2, 3, 4)
    np.testing.assert_array_equal(rgba[0, :, :3], palette)
    np.testing.assert_array_equal(rgba[1, :, 3], [255, 128, 0])


def _png_error(tmp_path, data: bytes) -> str:
    (tmp_path / "bad.png").write_bytes(data)
    with pytest.raises(NetdslError) as e:
        read_png(tmp_path / "bad.png")
    d = e.value.diagnostic
    assert str(tmp_path / "bad.png") in d.message and d.help
    return d.code


def test_png_errors(tmp_path):
    good = encode_png(np.zeros((4, 4, 3), np.uint8), [0], colour=2)
    assert _png_error(tmp_path, b"GIF89a" + good[6:]) == "E0913"
    assert _png_error(tmp_path, good[:40]) == "E0915"                           # truncated
    flipped = bytearray(good)
    flipped[40] ^= 0xFF
    assert _png_error(tmp_path, bytes(flipped)) == "E0915"                      # CRC
    interlaced = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 1)
    assert _png_error(tmp_path, png_file(interlaced, zlib.compress(b""))) == "E0914"
    deep = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    assert _png_error(tmp_path, png_file(deep, zlib.compress(b""))) == "E0914"
    ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 0, 0, 0, 0)
    assert _png_error(tmp_path, png_file(ihdr, zlib.compress(b"\x07\x01\x02"))) == "E0915"
    assert _png_error(tmp_path, png_file(ihdr, zlib.compress(b"\x00\x01"))) == "E0915"
    with pytest.raises(NetdslError) as e:
        read_png(tmp_path / "absent.png")
    assert e.value.diagnostic.code == "E0913"


def test_png_write_errors(tmp_path):
    with pytest.raises(NetdslError) as e:
        write_png(tmp_path / "no" / "such" / "dir.png", np.zeros((2, 2, 3), np.uint8))
    assert e.value.diagnostic.code == "E0916"
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 2), np.uint8))
