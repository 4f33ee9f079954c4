"""Caffe's data layers that read the user's files: Data (an LMDB of Datums), ImageData (a list of
image files), HDF5Data (a list of .h5 files) and HDF5Output.

Shapes come from the data, as in Caffe's DataLayerSetUp: the checker opens the source and reads
its first item (a source that does not exist leaves the shape unknown, so nets whose data is
elsewhere still check with --shape). Running, each layer's source is a BatchFeed (data/feed.py):
batches made on a background thread in an order fixed by the seed, the cursor saved in snapshots."""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import ClassVar

import numpy as np

from ..errors import NetdslError
from ..registry import TRANSFORM, F, Layer, Msg, ShapeError, register
from .data import _DataLayer, _mean_file, transform

_TRANSFORM_FIELDS = ("scale", "mirror", "crop_size", "mean_file", "mean_value", "force_color", "force_gray")
_peeked: dict = {}


def _peek(key: tuple, make):
    """The checker's look at a source (its first item), cached while the file is unchanged."""
    path = key[1]
    stamp = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    if _peeked.get(key, (None,))[0] != stamp or stamp is None:
        _peeked[key] = (stamp, make())
    return _peeked[key][1]


class _Reader(_DataLayer):
    """A data layer over the user's files: the shape from the first item, a BatchFeed when run."""
    stateful = True
    n_tops = (1, 2)
    param: ClassVar[str]

    @property
    def source(self) -> str:
        return self.p.source

    def _open_source(self, first_only: bool = False):
        raise NotImplementedError

    def _first(self) -> tuple:
        """The tops' shapes per item, from the source's first item (raises NetdslError)."""
        raise NotImplementedError

    def _item_shapes(self):
        """Per-item shapes, None when the source does not exist (E0941); other source errors raise
        a ShapeError at `source`."""
        try:
            return _peek((self.type, os.path.abspath(self.source), *self._peek_key()), self._first)
        except NetdslError as e:
            d = e.diagnostic
            if d.code == "E0941":
                self._why = d.message
                return None
            raise ShapeError(d.code, d.message, field="source", notes=d.notes, help=d.help) from None

    def _peek_key(self) -> tuple:
        return ()

    def unknown_shape_note(self):
        return getattr(self, "_why", f"{self.type} reads '{self.source}'") + " (the shape comes from the data)"

    def validate(self):
        if self.p.batch_size <= 0:
            return [ShapeError("E0107", f"{self.type} '{self.name}': batch_size must be positive", field="batch_size",
                               help="e.g. `batch_size: 64`")]
        return []

    def feed(self, ctx, n: int, make, shuffle: bool, rand_skip: int, prefetch: int):
        from ..data.feed import BatchFeed
        skip = int(np.random.default_rng([ctx.seed, 2]).integers(rand_skip)) if rand_skip else 0
        return BatchFeed(make, n, self.p.batch_size, ctx.seed, shuffle=shuffle, skip=skip, prefetch=prefetch)

    def forward(self, xp, bottoms, params, state):
        return [xp.asarray(a) for a in state.source.next()], None


class _ImageReader(_Reader):
    """Data and ImageData: images through Caffe's DataTransformer (transform_param)."""
    legacy_transform: ClassVar[str]        # the xxx_param whose scale/mean_file/crop_size/mirror Caffe still reads

    def t(self):
        """transform_param, with the deprecated fields of data_param / image_data_param where
        transform_param does not give them (Caffe's UpgradeNetDataTransformation)."""
        tp, old = self.spec.record.transform_param, getattr(self.spec.record, self.legacy_transform)
        return SimpleNamespace(**{k: getattr(tp, k) if tp.has(k) or not old.has(k) else getattr(old, k)
                                  for k in _TRANSFORM_FIELDS})

    def color(self) -> bool | None:
        t = self.t()
        return True if t.force_color else False if t.force_gray else None

    def validate(self):
        errs, t = super().validate(), self.t()
        if t.mean_file and t.mean_value:
            errs.append(ShapeError("E0950", f"{self.type} '{self.name}': give mean_file or mean_value, not both",
                                   field="mean_value", help="remove one of them (Caffe refuses both too)"))
        if t.force_color and t.force_gray:
            errs.append(ShapeError("E0950", f"{self.type} '{self.name}': force_color and force_gray together",
                                   field="force_gray", help="remove one of them"))
        return errs

    def shape(self, bottoms):
        first = self._item_shapes()
        if first is None:
            return [None] * len(self.spec.tops)
        c, h, w = first
        t = self.t()
        if t.crop_size and (t.crop_size > h or t.crop_size > w):
            raise ShapeError("E0950", f"{self.type} '{self.name}': crop_size {t.crop_size} exceeds the {h}x{w} images",
                             field="crop_size", help=f"use crop_size {min(h, w)} or less")
        if len(t.mean_value) not in (0, 1, c):
            raise ShapeError("E0950", f"{self.type} '{self.name}': {len(t.mean_value)} mean_value for {c}-channel "
                             "images", field="mean_value", help=f"give one mean_value, or {c} (one per channel)")
        side = (t.crop_size, t.crop_size) if t.crop_size else (h, w)
        return [(self.p.batch_size, c, *side), (self.p.batch_size,)][: len(self.spec.tops)]

    def batches(self, ctx, src, n, shuffle, rand_skip, prefetch):
        """The BatchFeed over `src` (item(i) -> (C x H x W image, label); where(i) names item i)."""
        t, phase = self.t(), self.phase
        first = src.item(0)[0]
        mean = _mean_file(t.mean_file, first.shape) if t.mean_file else None
        if not t.crop_size:
            src.fixed = first.shape
        crop = t.crop_size

        def make(indices, rng):
            images, labels = [], np.empty(len(indices), np.float32)
            for j, i in enumerate(indices):
                image, labels[j] = src.item(int(i))
                if crop and min(image.shape[1:]) < crop:
                    raise NetdslError("E0948", f"{src.where(int(i))} is {image.shape[1]}x{image.shape[2]}, smaller "
                                      f"than crop_size {crop}", help="resize the images, or use a smaller crop_size")
                images.append(image)
            x = transform(images, t, phase, rng, mean)
            return [x, labels][: len(self.spec.tops)]

        return self.feed(ctx, n, make, shuffle, rand_skip, prefetch)


@register
class Data(_ImageReader):
    """Caffe's Data layer over an LMDB of Datums (raw pixels, float_data or encoded images), read
    in key order and wrapping around, as Caffe's cursor. LevelDB is not read (E0942)."""
    type = "Data"
    v1 = (5, "DATA")
    v1_transform_param = "data_param"
    legacy_transform = "data_param"
    messages = {"data_param": Msg("DataParameter", {
        "source": F(str, ""), "batch_size": F(int, 0), "rand_skip": F(int, 0),
        "backend": F("enum", "LEVELDB", choices=("LEVELDB", "LMDB")), "scale": F(float, 1.0),
        "mean_file": F(str, ""), "crop_size": F(int, 0), "mirror": F(bool, False),
        "force_encoded_color": F(bool, False), "prefetch": F(int, 4)}), "transform_param": TRANSFORM}

    def _peek_key(self):
        return (self.color(),)

    def _first(self):
        from ..data.sources import LmdbRecords
        return LmdbRecords(self.source, self.color()).item(0)[0].shape

    def hint_example(self, i):
        n = self.p.batch_size or "N"
        return f"--shape {self.spec.tops[i]}={n}" if i == 1 else f"--shape {self.spec.tops[i]}={n},C,H,W (e.g. {n},3,224,224)"

    def complete(self, tops):
        if len(tops) == 2 and tops[0] is not None and tops[1] is None:
            tops[1] = (tops[0][0],)            # one label per image
        return tops

    def open(self, ctx):
        from ..data.sources import LmdbRecords
        src = LmdbRecords(self.source, self.color())
        return self.batches(ctx, src, len(src), False, self.p.rand_skip, self.p.prefetch)


@register
class ImageData(_ImageReader):
    """Caffe's ImageData: `path label` lines of a list file, images decoded colour (BGR) or gray
    (is_color), resized to new_height x new_width when both are given, shuffled each epoch when
    `shuffle` (in every phase, as Caffe)."""
    type = "ImageData"
    v1 = (12, "IMAGE_DATA")
    v1_transform_param = "image_data_param"
    legacy_transform = "image_data_param"
    messages = {"image_data_param": Msg("ImageDataParameter", {
        "source": F(str, ""), "batch_size": F(int, 1), "rand_skip": F(int, 0), "shuffle": F(bool, False),
        "new_height": F(int, 0), "new_width": F(int, 0), "is_color": F(bool, True), "scale": F(float, 1.0),
        "mean_file": F(str, ""), "crop_size": F(int, 0), "mirror": F(bool, False), "root_folder": F(str, "")}),
        "transform_param": TRANSFORM}

    def validate(self):
        errs = super().validate()
        if bool(self.p.new_height) != bool(self.p.new_width):
            errs.append(ShapeError("E0950", f"ImageData '{self.name}': new_height and new_width go together",
                                   field="new_height" if self.p.new_height else "new_width",
                                   help="give both (resize to H x W) or neither (keep each image's size)"))
        return errs

    def _list(self):
        from ..data.sources import ImageList
        p = self.p
        return ImageList(p.source, p.root_folder, p.is_color, p.new_height, p.new_width)

    def _peek_key(self):
        p = self.p
        return (p.root_folder, p.is_color, p.new_height, p.new_width)

    def _first(self):
        return self._list().item(0)[0].shape

    def _item_shapes(self):
        """is_color fixes the channels; a resize or a crop the size (each image is checked when read)."""
        p, crop = self.p, self.t().crop_size
        c = 3 if p.is_color else 1
        if p.new_height and p.new_width:
            return (c, p.new_height, p.new_width)
        return (c, crop, crop) if crop else super()._item_shapes()

    def hint_example(self, i):
        n = self.p.batch_size or "N"
        return f"--shape {self.spec.tops[i]}={n}" if i == 1 else f"--shape {self.spec.tops[i]}={n},3,H,W"

    def open(self, ctx):
        src = self._list()
        return self.batches(ctx, src, len(src), self.p.shuffle, self.p.rand_skip, 4)


@register
class HDF5Data(_Reader):
    """Caffe's HDF5Data: one dataset per top, named like the top, rows from the .h5 files a list
    file names (read whole, as float32); no transform_param, as in Caffe."""
    type = "HDF5Data"
    v1 = (9, "HDF5_DATA")
    messages = {"hdf5_data_param": Msg("HDF5DataParameter", {
        "source": F(str, ""), "batch_size": F(int, 0), "shuffle": F(bool, False)})}
    n_tops = (1, None)

    def _peek_key(self):
        return tuple(self.spec.tops)

    def _first(self):
        from ..data.sources import Hdf5Rows
        rows = Hdf5Rows(self.source, list(self.spec.tops), limit=1)
        return [a.shape[1:] for a in rows.arrays.values()]

    def shape(self, bottoms):
        first = self._item_shapes()
        if first is None:
            return [None] * len(self.spec.tops)
        return [(self.p.batch_size, *s) for s in first]

    def hint_example(self, i):
        return f"--shape {self.spec.tops[i]}={self.p.batch_size or 'N'},D (the dataset's shape, batch first)"

    def open(self, ctx):
        from ..data.sources import Hdf5Rows
        rows = Hdf5Rows(self.source, list(self.spec.tops))
        arrays = list(rows.arrays.values())
        return self.feed(ctx, len(rows), lambda idx, rng: [a[idx] for a in arrays], self.p.shuffle, 0, 4)


@register
class HDF5Output(Layer):
    """Caffe's HDF5Output: writes its two bottoms to datasets `data` and `label` of file_name. The
    file is created (truncated) when the net is built, as Caffe; each forward appends its batch
    (Caffe rewrites the datasets each forward, which fails after the first: netdsl keeps them all)."""
    type = "HDF5Output"
    v1 = (10, "HDF5_OUTPUT")
    stateful = True
    is_sink = True
    no_backward = True
    messages = {"hdf5_output_param": Msg("HDF5OutputParameter", {"file_name": F(str, "")})}
    n_bottoms, n_tops = (2, 2), (0, 0)
    bottom_roles = ("data", "label")

    def validate(self):
        if not self.p.file_name:
            return [ShapeError("E0950", f"HDF5Output '{self.name}' has no file_name", field="file_name",
                               help='e.g. hdf5_output_param { file_name: "out.h5" }')]
        return []

    def shape(self, bottoms):
        return []

    def open(self, ctx):
        return Hdf5Writer(self.p.file_name)

    def forward(self, xp, bottoms, params, state):
        state.source.append([np.asarray(b.get() if hasattr(b, "get") else b, np.float32) for b in bottoms])
        return [], None


class Hdf5Writer:
    """HDF5Output's file: datasets data and label, growing along the first axis."""

    def __init__(self, path: str):
        from ..data.images import need
        self.h5py, self.path = need("h5py", "the HDF5Output layer"), path
        self._write(lambda f: None, "w")

    def _write(self, fn, mode="a"):
        try:
            with self.h5py.File(self.path, mode) as f:
                fn(f)
        except OSError as e:
            raise NetdslError("E0952", f"HDF5Output cannot write {self.path}: {e}",
                              help="check that the directory exists and is writable") from None

    def append(self, arrays) -> None:
        def add(f):
            for name, a in zip(("data", "label"), arrays):
                if name not in f:
                    f.create_dataset(name, data=a, maxshape=(None, *a.shape[1:]), chunks=True)
                else:
                    d = f[name]
                    d.resize(d.shape[0] + len(a), axis=0)
                    d[-len(a):] = a
        self._write(add)
