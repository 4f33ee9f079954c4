"""Caffe's data tools: convert_imageset (images + list file -> LMDB of Datums), compute_image_mean
(LMDB -> mean.binaryproto), and export-mnist (MNIST as a PNG folder, an LMDB or HDF5 files, so the
file-reading layers can be tried on real data). Outputs are written beside their final name and
moved into place when complete: an interrupted or failed run leaves nothing half-written.

Error codes: E0951 bad options or an output that exists / cannot be written."""
from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np

from ..errors import NetdslError
from .images import decode_image, encode_image, from_datum, need, to_datum
from .sources import ImageList, LmdbRecords

_LMDB_MAP_SIZE = 1 << 40        # address space only (the file grows as written), as Caffe's db_lmdb.cpp


class Progress:
    """A one-line bar on stderr when it is a terminal (nothing otherwise)."""

    def __init__(self, label: str, total: int, enabled: bool | None = None):
        self.label, self.total, self.done, self.last = label, total, 0, 0.0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            filled = 30 * self.done // max(self.total, 1)
            sys.stderr.write(f"\r{self.label:24} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _fresh(out: str) -> str:
    """A temporary path beside `out`, which must not exist yet."""
    if os.path.exists(out):
        raise NetdslError("E0951", f"{out} already exists", help="choose another output path, or remove it first")
    return f"{out}.tmp-{os.getpid()}"


def _finish(tmp: str, out: str) -> None:
    os.replace(tmp, out)


def _discard(tmp: str) -> None:
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        os.remove(tmp)


class LmdbWriter:
    """An LMDB being filled (in a temporary directory until `commit`), committing every 1000 records
    as convert_imageset does."""

    def __init__(self, out: str):
        lmdb = need("lmdb", "writing an LMDB")
        self.out, self.tmp = out, _fresh(out)
        try:
            self.env = lmdb.open(self.tmp, map_size=_LMDB_MAP_SIZE, subdir=True)
        except lmdb.Error as e:
            raise NetdslError("E0951", f"cannot create the LMDB {out}: {e}", help="check the directory") from None
        self.txn, self.count = self.env.begin(write=True), 0

    def put(self, key: bytes, value: bytes) -> None:
        self.txn.put(key, value)
        self.count += 1
        if self.count % 1000 == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            self.txn.commit()
            self.env.close()
            _finish(self.tmp, self.out)
        else:
            self.txn.abort()
            self.env.close()
            _discard(self.tmp)


def convert_imageset(root: str, list_file: str, out: str, resize_to: tuple[int, int] | None = None,
                     shuffle: bool = False, gray: bool = False, encode_type: str | None = None,
                     seed: int = 0, progress: bool | None = None) -> int:
    """Caffe's convert_imageset: each `path label` line's image (root + path) as a Datum, keys
    `%08d_path` in list order (shuffled by `seed` with `shuffle`); raw BGR/gray pixels, or
    encoded (encode_type png/jpg: the file's own bytes when its format and channels already match
    and there is no resize, as Caffe's ReadImageToDatum). Returns the number of records."""
    images = ImageList(list_file, root, not gray, *(resize_to or (0, 0)))
    order = np.random.default_rng(seed).permutation(len(images)) if shuffle else np.arange(len(images))
    bar = Progress("convert-imageset", len(images), progress)
    with LmdbWriter(out) as db:
        for n, i in enumerate(order):
            i = int(i)
            path = images.paths[i]
            if encode_type:
                ext = os.path.splitext(path)[1].lower().lstrip(".").replace("jpeg", "jpg")
                data = images.read(i)
                native = decode_image(data, None, images.where(i))      # a corrupt file fails here, not in training
                if resize_to is not None or ext != encode_type or (native.shape[0] == 3) == gray:
                    data = encode_image(images.item(i)[0], encode_type)
                value = to_datum(None, images.labels[i], data)
            else:
                value = to_datum(images.item(i)[0], images.labels[i])
            db.put(f"{n:08d}_{path}".encode(), value)
            bar.step()
    bar.close()
    return len(images)


def compute_mean(db: str, out: str, progress: bool | None = None) -> np.ndarray:
    """Caffe's compute_image_mean: the per-pixel mean of every Datum (1 x C x H x W), summed
    exactly and divided in float32, written as a BlobProto (mean.binaryproto)."""
    from ..weights import write_blobproto
    records = LmdbRecords(db)
    first = records.item(0)[0]
    records.fixed = first.shape
    total = np.zeros(first.shape, np.float64)
    bar = Progress("compute-mean", len(records), progress)
    with records.env.begin() as txn:
        for i, key in enumerate(records.keys):
            total += from_datum(txn.get(key), records.where(i))[0]
            bar.step()
    bar.close()
    mean = (total.astype(np.float32) / np.float32(len(records)))[None]
    tmp = _fresh(out)
    try:
        write_blobproto(tmp, mean)
        _finish(tmp, out)
    except OSError as e:
        _discard(tmp)
        raise NetdslError("E0951", f"cannot write {out}: {e.strerror}", help="check the directory") from None
    return mean


def tinted(images: np.ndarray, seed: int) -> np.ndarray:
    """MNIST digits as a CIFAR-10-sized colour set: N x 3 x 32 x 32 uint8 (BGR), each 28 x 28 digit
    centred on a 32 x 32 canvas, its ink and background two random colours (drawn from `seed`)
    at least 96 apart on average, so the colour says nothing about the class."""
    rng = np.random.default_rng(seed)
    n = len(images)
    bg = rng.integers(0, 256, (n, 3)).astype(np.float32)
    fg = rng.integers(0, 256, (n, 3)).astype(np.float32)
    close = np.abs(fg - bg).mean(1) < 96
    fg[close] = 255 - bg[close]
    ink = np.zeros((n, 32, 32), np.float32)
    ink[:, 2:30, 2:30] = images / np.float32(255)
    out = bg[:, :, None, None] * (1 - ink[:, None]) + fg[:, :, None, None] * ink[:, None]
    return np.rint(out).astype(np.uint8)


def export_mnist(out: str, fmt: str, data_dir: str | None = None, limit: int | None = None,
                 progress: bool | None = None, color: bool = False) -> list[str]:
    """MNIST's train and test splits under `out`, as
    png:  train/NNNNN.png, test/..., and list files train.txt / test.txt (`train/00000.png 5`);
    lmdb: mnist_train_lmdb / mnist_test_lmdb of raw 1x28x28 Datums (Caffe's convert_mnist_data);
    hdf5: train.h5 / test.h5 (datasets data N x 1 x 28 x 28 float32 scaled to [0, 1) by 1/256, as
          LeNet's scale, and label N) and the list files train_h5.txt / test_h5.txt.
    `limit`: the first N images of each split. `color`: the digits `tinted` (3 x 32 x 32) instead of
    1 x 28 x 28 gray. Returns what was written."""
    from .mnist import load_mnist
    if fmt not in ("png", "lmdb", "hdf5"):
        raise NetdslError("E0951", f"unknown export format '{fmt}'", help="use --format png, lmdb or hdf5")
    os.makedirs(out, exist_ok=True)
    written = []
    for split in ("train", "test"):
        images, labels = load_mnist(split, data_dir)
        images, labels = images[:limit], labels[:limit]
        chw = tinted(images, seed=0 if split == "train" else 1) if color else images[:, None]
        bar = Progress(f"export {split} ({fmt})", len(images), progress)
        if fmt == "png":
            written += _export_png(out, split, chw, labels, bar)
        elif fmt == "lmdb":
            target = os.path.join(out, f"mnist_{split}_lmdb")
            with LmdbWriter(target) as db:
                for i, (image, label) in enumerate(zip(chw, labels)):
                    db.put(f"{i:08d}".encode(), to_datum(image, int(label)))
                    bar.step()
            written.append(target)
        else:
            written += _export_hdf5(out, split, chw, labels, bar)
        bar.close()
    return written


def _export_png(out, split, images, labels, bar) -> list[str]:
    from .png import write_png
    folder, listing = os.path.join(out, split), os.path.join(out, f"{split}.txt")
    tmp = _fresh(folder)
    _fresh(listing)
    os.makedirs(tmp)
    lines = []
    try:
        for i, (image, label) in enumerate(zip(images, labels)):
            write_png(os.path.join(tmp, f"{i:05d}.png"), image[0] if len(image) == 1 else image[::-1].transpose(1, 2, 0))
            lines.append(f"{split}/{i:05d}.png {int(label)}\n")
            bar.step()
    except BaseException:
        _discard(tmp)
        raise
    _finish(tmp, folder)
    with open(listing, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return [folder, listing]


def _export_hdf5(out, split, images, labels, bar) -> list[str]:
    h5py = need("h5py", "writing HDF5")
    target, listing = os.path.join(out, f"{split}.h5"), os.path.join(out, f"{split}_h5.txt")
    tmp = _fresh(target)
    _fresh(listing)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=images.astype(np.float32) * np.float32(0.00390625))
        f.create_dataset("label", data=labels.astype(np.float32))
    _finish(tmp, target)
    bar.step(len(images))
    with open(listing, "w", encoding="utf-8") as f:
        f.write(os.path.abspath(target) + "\n")
    return [target, listing]
