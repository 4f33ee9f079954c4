"""Data layers: Input, DummyData, MNIST, DigitScenes, DigitTags, Caffe's DataTransformer, and the
readers of files netdsl does not open (WindowData). Data, ImageData and HDF5Data are in readers.py."""
from __future__ import annotations

import numpy as np

from ..data.scenes import IGNORE
from ..gpu.program import Ref, Unsupported
from ..registry import BLOB_SHAPE, FILLER, TRANSFORM, F, Layer, Msg, ShapeError, register


class _DataLayer(Layer):
    is_data = True
    shape_from_hints = True
    no_backward = True
    n_bottoms = (0, 0)

    def backward(self, xp, saved, dtops, params, need):
        return [], []


@register
class Input(_DataLayer):
    type = "Input"
    messages = {"input_param": Msg("InputParameter", {"shape": F(BLOB_SHAPE, repeated=True)})}
    n_tops = (1, None)
    fed_by_caller = True
    legacy_input = True

    def unknown_shape_note(self):
        return "this Input layer gives no input_param { shape { dim: ... } }"

    def validate(self):
        n, t = len(self.p.shape), len(self.spec.tops)
        if n not in (0, 1, t):
            return [ShapeError("E0501", f"Input '{self.name}' has {n} shapes for {t} tops", field="shape",
                               help=f"give one shape for all tops, or {t} shapes, one per top")]
        return []

    def shape(self, bottoms):
        shapes = [tuple(s.dim) for s in self.p.shape]
        if not shapes:
            return [None] * len(self.spec.tops)        # filled in from --shape by the checker
        return shapes * len(self.spec.tops) if len(shapes) == 1 else shapes

    def forward(self, xp, bottoms, params):
        raise RuntimeError("Input blobs are fed by the caller")


@register
class MemoryData(Input):
    """Caffe's MemoryData: batches handed over from code (pycaffe's set_input_arrays); in netdsl the
    arrays are forward()'s keyword arguments, as for Input: data N x C x H x W and label N."""
    type = "MemoryData"
    v1 = (29, "MEMORY_DATA")
    messages = {"memory_data_param": Msg("MemoryDataParameter", {
        "batch_size": F(int, 0), "channels": F(int, 0), "height": F(int, 0), "width": F(int, 0)}),
        "transform_param": TRANSFORM}
    n_tops = (1, 2)

    def validate(self):
        return []

    def shape(self, bottoms):
        p = self.p
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)][: len(self.spec.tops)]


@register
class DummyData(_DataLayer):
    type = "DummyData"
    v1 = (32, "DUMMY_DATA")
    stateful = True
    messages = {"dummy_data_param": Msg("DummyDataParameter", {
        "data_filler": F(FILLER, repeated=True), "shape": F(BLOB_SHAPE, repeated=True),
        "num": F(int, repeated=True), "channels": F(int, repeated=True), "height": F(int, repeated=True),
        "width": F(int, repeated=True)})}
    n_tops = (1, None)

    def shape(self, bottoms):
        p, t = self.p, len(self.spec.tops)
        if p.shape:
            shapes = [tuple(s.dim) for s in p.shape]
        else:
            shapes = [tuple(x) for x in zip(p.num, p.channels, p.height, p.width)]
        if len(shapes) not in (1, t):
            raise ShapeError("E0501", f"DummyData '{self.name}' has {len(shapes)} shapes for {t} tops",
                             field="shape", help=f"give one shape, or {t} shapes (one per top)")
        return shapes * t if len(shapes) == 1 else shapes

    def forward(self, xp, bottoms, params, state):
        from ..fillers import fill
        fillers = self.p.data_filler or [None]
        fillers = fillers * len(state.tops) if len(fillers) == 1 else fillers
        return [xp.asarray(fill(f, s, state.rng)) for f, s in zip(fillers, state.tops)], None


class _FileData(_DataLayer):
    """Caffe's data layers that read files netdsl does not open yet: checked, with the shapes their
    params fix (batch size, crop, resize) and --shape for the rest; never run."""
    runnable = False
    n_tops = (1, 2)

    @property
    def run_help(self):
        return f"netdsl does not read {self.type}'s files yet: use an Input layer fed from Python, or MNIST"

    def unknown_shape_note(self):
        return f"Caffe's {self.type} layer reads '{self.p.source or 'its files'}', which netdsl does not open yet"

    def complete(self, tops):
        if len(tops) == 2 and tops[0] is not None and tops[1] is None:
            tops[1] = (tops[0][0],)            # one label per image
        return tops

    def hint_example(self, i):
        n = self.p.batch_size or "N"
        return f"--shape {self.spec.tops[i]}={n}" if i == 1 else f"--shape {self.spec.tops[i]}={n},3,H,W"

    def _image_tops(self, channels: int, height: int, width: int):
        """(N, C, H, W) and (N,) when the params fix the image size (crop, or resize), else unknown."""
        t = self.spec.record.transform_param
        crop, n = t.crop_size or self.p.crop_size, self.p.batch_size
        if crop:
            height = width = crop
        if n <= 0 or not (height and width):
            return [None] * len(self.spec.tops)
        c = 3 if t.force_color else 1 if t.force_gray else channels
        return [(n, c, height, width), (n,)][: len(self.spec.tops)]


@register
class WindowData(_FileData):
    """Caffe's WindowData (R-CNN fine-tuning): windows of images, warped to crop_size squares."""
    type = "WindowData"
    v1 = (24, "WINDOW_DATA")
    v1_transform_param = "window_data_param"
    messages = {"window_data_param": Msg("WindowDataParameter", {
        "source": F(str, ""), "scale": F(float, 1.0), "mean_file": F(str, ""), "batch_size": F(int, 0),
        "crop_size": F(int, 0), "mirror": F(bool, False), "fg_threshold": F(float, 0.5),
        "bg_threshold": F(float, 0.5), "fg_fraction": F(float, 0.25), "context_pad": F(int, 0),
        "crop_mode": F(str, "warp"), "cache_images": F(bool, False), "root_folder": F(str, "")}),
        "transform_param": TRANSFORM}

    def shape(self, bottoms):
        return self._image_tops(3, 0, 0)


MNIST_PARAM = Msg("MNISTParameter", {
    "split": F("enum", "TRAIN", choices=("TRAIN", "TEST")), "batch_size": F(int, 64),
    "shuffle": F(bool, True)})


@register
class MNIST(_DataLayer):
    """MNIST digits from the standard idx files: tops data N x 1 x 28 x 28 (float) and label N."""
    type = "MNIST"
    stateful = True
    graph_data = True
    messages = {"mnist_param": MNIST_PARAM, "transform_param": TRANSFORM}
    n_tops = (1, 2)

    def validate(self):
        p, errs = self.p, []
        if p.batch_size <= 0:
            errs.append(ShapeError("E0107", f"MNIST '{self.name}': batch_size must be positive", field="batch_size",
                                   help="use e.g. `batch_size: 64`"))
        if p.crop_size and p.crop_size > 28:
            errs.append(ShapeError("E0107", f"MNIST '{self.name}': crop_size {p.crop_size} exceeds the 28-pixel "
                                   "digits", field="crop_size", help="use `crop_size: 28` or less"))
        if len(p.mean_value) > 1:
            errs.append(ShapeError("E0107", f"MNIST '{self.name}': MNIST has 1 channel but {len(p.mean_value)} "
                                   "mean_value", field="mean_value", help="give one mean_value"))
        if p.mean_file and p.mean_value:
            errs.append(ShapeError("E0107", f"MNIST '{self.name}': give mean_file or mean_value, not both",
                                   field="mean_value", help="remove one of them (Caffe refuses both too)"))
        return errs

    def shape(self, bottoms):
        n, side = self.p.batch_size, self.p.crop_size or 28
        return [(n, 1, side, side), (n,)][: len(self.spec.tops)]

    def open(self, ctx):
        from ..data.mnist import MnistFeed, load_mnist
        images, labels = load_mnist(self.p.split.lower(), ctx.data_dir)
        feed = MnistFeed(images, labels, ctx.seed, self.p.shuffle and self.phase != "TEST")
        feed.mean = _mean_file(self.p.mean_file, (1, 28, 28)) if self.p.mean_file else None
        return feed

    def forward(self, xp, bottoms, params, state):
        feed = state.source
        idx = feed.next_indices(self.p.batch_size)
        x = transform(feed.images[idx][:, None].astype(np.float32), self.p, self.phase, state.rng, feed.mean)
        tops = [xp.asarray(x)]
        if len(self.spec.tops) == 2:
            tops.append(xp.asarray(feed.labels[idx].astype(np.float32)))
        return tops, None

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def lower_check(self, lw, step):
        p = self.p
        if p.crop_size or p.mirror or len(p.mean_value) > 1 or p.mean_file:
            raise Unsupported(f"MNIST '{self.name}': crop_size / mirror / several mean_values / mean_file")

    def lower_forward(self, lw, i, s):
        L, tops = s.layer, s.node.tops
        n = lw.shape(tops[0])[0]
        split = L.p.split.lower()
        mean = float(L.p.mean_value[0]) if L.p.mean_value else 0.0
        x = lw.new_value(tops[0])
        y = lw.new_value(tops[1]) if len(tops) > 1 else None
        lw.data.append((L.name, split))
        params = dict(N=n, D=28 * 28, WIN=lw.window, MEAN=int(bool(L.p.mean_value)), SCALE=int(L.p.scale != 1.0))
        lw.emit("gather", f"{L.name}_gather", params,
                [Ref(f"images:{split}"), Ref(f"labels:{split}"), Ref(f"seq:{lw.name}", count=lw.window * n),
                 Ref("counters", offset=lw.counter, count=1), np.float32(mean), np.float32(L.p.scale), x, y],
                lw.blocks(n * 784), note=f"gather {n} MNIST {split} images from the GPU-resident set")


def _mean_file(path: str, shape: tuple) -> np.ndarray:
    """transform_param's mean_file: a mean.binaryproto of the images' full size (C x H x W)."""
    from ..errors import NetdslError
    from ..weights import read_blobproto
    mean = read_blobproto(path)
    if mean.size != int(np.prod(shape)):
        raise NetdslError("E0802", f"mean file {path} is {'x'.join(map(str, mean.shape))}, but the images are "
                          f"{'x'.join(map(str, shape))}", help="use the mean of this dataset (compute_image_mean)")
    return mean.reshape(shape).astype(np.float32)


def transform(images, t, phase: str, rng, mean: np.ndarray | None = None) -> np.ndarray:
    """Caffe's DataTransformer on a batch (an N x C x H x W array, or a list of C x H x W images):
    each image is cropped to crop_size (at a random offset in TRAIN, the centre in TEST), mirrored
    at random when `mirror` (in every phase, as Caffe), and each value becomes (x - mean) * scale in
    float32, the mean being mean_file's pixel at the uncropped position or mean_value's channel.
    Per image, the random draws come in Caffe's order: the mirror coin, then the row and column
    offsets; `rng` is the batch's stream."""
    crop, mirror = t.crop_size, t.mirror
    mean_value = np.asarray(t.mean_value, np.float32).reshape(-1, 1, 1) if t.mean_value else None
    scale = np.float32(t.scale)
    if not crop and not mirror:                     # nothing random: the whole batch at once
        x = np.asarray(images, np.float32)
        x = x - mean[None] if mean is not None else x - mean_value[None] if mean_value is not None else x
        return np.ascontiguousarray(x * scale if t.scale != 1.0 else x, dtype=np.float32)
    out = []
    for image in images:
        flip = bool(rng.integers(2)) if mirror else False
        h, w = image.shape[1:]
        oy = ox = 0
        if crop:
            oy, ox = ((int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))) if phase == "TRAIN"
                      else ((h - crop) // 2, (w - crop) // 2))
        ch, cw = (crop, crop) if crop else (h, w)
        x = image[:, oy:oy + ch, ox:ox + cw].astype(np.float32)
        if mean is not None:
            x -= mean[:, oy:oy + ch, ox:ox + cw]
        elif mean_value is not None:
            x -= mean_value
        if flip:
            x = x[:, :, ::-1]
        out.append(x * scale if t.scale != 1.0 else x)
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@register
class DigitScenes(_DataLayer):
    """Detection scenes of real MNIST digits (one image per batch, as py-faster-rcnn):
    tops data 1 x C x H x W, im_info 1 x 3 (height, width, scale), gt_boxes G x 5 (or, with
    `label_format: SSD`, SSD's 1 x 1 x G x 8 label rows for MultiBoxLoss, see `ssd_label`).

    Forward number k returns scene k (then k+1, ...) of netdsl.data.scenes.DigitScenes with seed
    `seed` + the run seed: a pure function of (seed, split, k), so runs are reproducible and a
    resumed run continues from its cursor. split TRAIN draws MNIST training digits, TEST the
    test digits, so held-out scenes never show a digit image seen in training.

    `label_format: FOREGROUND` or `DIGIT` makes it a segmentation source instead: tops data and
    label 1 x 1 x H x W, per pixel 1 (FOREGROUND) or the digit + 1 (DIGIT) where a digit's ink is
    at least 0.5, 0 on the background, and 255 on a digit's fainter edge (use `ignore_label: 255`)."""
    type = "DigitScenes"
    feeds_scenes = True
    stateful = True
    messages = {"digit_scenes_param": Msg("DigitScenesParameter", {
        "split": F("enum", "TRAIN", choices=("TRAIN", "TEST")), "height": F(int, 224), "width": F(int, 224),
        "channels": F(int, 1), "min_digits": F(int, 1), "max_digits": F(int, 5), "min_size": F(int, 16),
        "max_size": F(int, 120), "seed": F(int, 0),
        "noise": F(float, 0.15, doc="the background's largest level: flat + gradient + grain in [0, noise]"),
        "label_format": F("enum", "BOXES", choices=("BOXES", "FOREGROUND", "DIGIT", "SSD"),
                          doc="BOXES: tops data, im_info, gt_boxes (G x 5 pixel boxes, py-faster-rcnn); SSD: the "
                              "third top as 1 x 1 x G x 8 rows; FOREGROUND / DIGIT: data and a per-pixel label"),
    })}
    n_tops = (2, 3)

    def validate(self):
        p = self.p
        errs = []
        if not 0 < p.min_size <= p.max_size <= min(p.height, p.width):
            errs.append(ShapeError("E0107", f"DigitScenes '{self.name}': need 0 < min_size <= max_size <= canvas "
                                   f"side, got {p.min_size}, {p.max_size}, {p.height}x{p.width}", field="max_size",
                                   help="e.g. `min_size: 16 max_size: 120` on a 224x224 canvas"))
        if not 1 <= p.min_digits <= p.max_digits:
            errs.append(ShapeError("E0107", f"DigitScenes '{self.name}': need 1 <= min_digits <= max_digits, got "
                                   f"{p.min_digits} and {p.max_digits}", field="max_digits",
                                   help="e.g. `min_digits: 1 max_digits: 5`"))
        if p.channels < 1:
            errs.append(ShapeError("E0107", f"DigitScenes '{self.name}': channels must be positive, got {p.channels}",
                                   field="channels", help="use `channels: 1` (gray) or `channels: 3` (tinted)"))
        if not 0 <= p.noise <= 1:
            errs.append(ShapeError("E0107", f"DigitScenes '{self.name}': noise must lie in [0, 1], got {p.noise}",
                                   field="noise", help="use `noise: 0.15` (the default) or 0 for a black background"))
        want = 3 if p.label_format in ("BOXES", "SSD") else 2
        if len(self.spec.tops) != want:
            tops = ("data, im_info and label" if p.label_format == "SSD" else "data, im_info and gt_boxes") \
                if want == 3 else "data and label"
            errs.append(ShapeError("E0202", f"DigitScenes '{self.name}' with label_format {p.label_format} has {want} "
                                   f"tops ({tops}), got {len(self.spec.tops)}", field="label_format" if p.has("label_format") else None,
                                   help=f"give {want} tops" + (", or `label_format: FOREGROUND` for data and a per-pixel "
                                                               "label" if want == 3 else "")))
        return errs

    def shape(self, bottoms):
        p = self.p
        data = (1, p.channels, p.height, p.width)
        if p.label_format in ("FOREGROUND", "DIGIT"):
            return [data, (1, 1, p.height, p.width)]
        return [data, (1, 3), (1, 1, None, 8) if p.label_format == "SSD" else (None, 5)]

    def open(self, ctx):
        from ..data.scenes import DigitScenes as Scenes
        p = self.p
        return ScenesFeed(Scenes(split=p.split.lower(), data_dir=ctx.data_dir, seed=p.seed + ctx.seed,
                                 height=p.height, width=p.width, channels=p.channels, min_digits=p.min_digits,
                                 max_digits=p.max_digits, min_size=p.min_size, max_size=p.max_size,
                                 noise=p.noise))

    def forward(self, xp, bottoms, params, state):
        if self.p.label_format in ("FOREGROUND", "DIGIT"):
            image, labels = state.source.next_labelled()
            if self.p.label_format == "FOREGROUND":
                labels = np.where(labels == IGNORE, labels, labels > 0)
            return [xp.asarray(image[None]), xp.asarray(labels[None, None].astype(np.float32))], None
        image, gt, (h, w) = state.source.next()
        info = np.array([[h, w, 1.0]], np.float32)
        if self.p.label_format == "SSD":
            gt = ssd_label(gt, image.shape[1:])
        return [xp.asarray(image[None].astype(np.float32)), xp.asarray(info), xp.asarray(gt.astype(np.float32))], None


def ssd_label(gt: np.ndarray, size) -> np.ndarray:
    """G x 5 pixel boxes (x1, y1, x2, y2 inclusive, class) as SSD's 1 x 1 x G x 8 label rows
    [item 0, class, instance, xmin, ymin, xmax, ymax, difficult 0], the corners normalised by the
    image's (height, width) `size` as AnnotatedData does: a box spanning pixels x1..x2 covers
    [x1, x2 + 1) of the width. No box: one row of -1, as AnnotatedData pads an empty batch."""
    h, w = size
    if not len(gt):
        return np.full((1, 1, 1, 8), -1.0)
    x1, y1, x2, y2, cls = (gt[:, k].astype(np.float64) for k in range(5))
    rows = np.stack([np.zeros(len(gt)), cls, np.arange(len(gt)), x1 / w, y1 / h, (x2 + 1) / w, (y2 + 1) / h,
                     np.zeros(len(gt))], axis=1)
    return rows.reshape(1, 1, -1, 8)


class ScenesFeed:
    """The DigitScenes layer's run state: the scene generator and a cursor (snapshotted), and an
    image fed from outside for one forward (`netdsl propose --image`). shard (rank, ranks): rank
    r of N takes scenes cursor + r, the cursor moving N scenes per forward."""
    shard = (0, 1)

    def __init__(self, scenes):
        self.scenes, self.cursor, self._fed = scenes, 0, None

    def state(self):
        return {"cursor": self.cursor}

    def load_state(self, state):
        self.cursor = int(state["cursor"])

    def feed(self, image, gt_boxes=None, im_size=None) -> None:
        """Make the next forward return `image` ((C, H, W) float in [0, 1], any H and W) with
        `gt_boxes` (G x 5, default none) instead of the next scene; the cursor does not move.
        im_info is (H, W, 1), or im_size (h, w) when the image is padded beyond the picture
        (proposals are clipped to im_info). Used by `netdsl propose --image`."""
        image = np.asarray(image, np.float32)
        channels = self.scenes.options["channels"]
        if image.ndim != 3 or image.shape[0] != channels:
            raise ValueError(f"DigitScenes needs a ({channels}, H, W) image, got {image.shape}")
        gt = np.zeros((0, 5), np.float32) if gt_boxes is None else np.asarray(gt_boxes, np.float32).reshape(-1, 5)
        self._fed = (image, gt, tuple(im_size) if im_size is not None else image.shape[1:])

    def next(self):
        """(image, gt boxes, (h, w)) of the next forward."""
        if self._fed is not None:
            fed, self._fed = self._fed, None
            return fed
        rank, ranks = self.shard
        image, gt = self.scenes.scene(self.cursor + rank)
        self.cursor += ranks
        return image, gt, image.shape[1:]

    def next_labelled(self):
        """(image, (H, W) label map) of the next scene (see netdsl.data.scenes.make_scene)."""
        image, _, labels = self.scenes.labelled_scene(self.cursor)
        self.cursor += 1
        return image, labels

@register
class DigitTags(_DataLayer):
    """netdsl: multi-label images for tagging: each of a batch's images holds min_digits..max_digits
    real MNIST digits (netdsl.data.scenes.DigitScenes' scenes, drawn small), and its tags are the set
    of digit classes present. Tops: data N x 1 x H x W and label N x 10, either soft labels (1/k for
    each of the k classes present: SoftmaxWithLoss's distributions, Mahajan et al. 2018) or a multi-hot
    0/1 row (SigmoidCrossEntropyLoss's targets). Batch k holds scenes k*N .. k*N + N - 1 of (seed + run
    seed, split), so runs repeat and a resumed run continues from its cursor; TEST draws the MNIST
    test digits."""
    type = "DigitTags"
    stateful = True
    messages = {"digit_tags_param": Msg("DigitTagsParameter", {
        "split": F("enum", "TRAIN", choices=("TRAIN", "TEST")), "batch_size": F(int, 32), "height": F(int, 32),
        "width": F(int, 32), "min_digits": F(int, 1), "max_digits": F(int, 4), "min_size": F(int, 12),
        "max_size": F(int, 20), "seed": F(int, 0),
        "labels": F("enum", "SOFT", choices=("SOFT", "MULTI_HOT"), doc="SOFT: 1/k per tag; MULTI_HOT: 1 per tag")})}
    n_tops = (2, 2)

    def validate(self):
        p = self.p
        for ok, field, what, example in (
                (p.batch_size > 0, "batch_size", f"batch_size must be positive, got {p.batch_size}", "32"),
                (0 < p.min_size <= p.max_size <= min(p.height, p.width), "max_size",
                 f"need 0 < min_size <= max_size <= the image side, got {p.min_size}, {p.max_size} on "
                 f"{p.height}x{p.width}", "20 (with min_size: 12 on 32x32)"),
                (1 <= p.min_digits <= p.max_digits, "max_digits",
                 f"need 1 <= min_digits <= max_digits, got {p.min_digits} and {p.max_digits}", "4")):
            if not ok:
                return [ShapeError("E0107", f"DigitTags '{self.name}': {what}", field=field,
                                   help=f"e.g. `{field}: {example}`")]
        return []

    def shape(self, bottoms):
        p = self.p
        return [(p.batch_size, 1, p.height, p.width), (p.batch_size, 10)]

    def open(self, ctx):
        from ..data.scenes import DigitScenes as Scenes
        p = self.p
        return TagsFeed(Scenes(split=p.split.lower(), data_dir=ctx.data_dir, seed=p.seed + ctx.seed, height=p.height,
                               width=p.width, min_digits=p.min_digits, max_digits=p.max_digits, min_size=p.min_size,
                               max_size=p.max_size))

    def forward(self, xp, bottoms, params, state):
        images, tags = state.source.next(self.p.batch_size)
        if self.p.labels == "SOFT":
            tags = tags / tags.sum(axis=1, keepdims=True)
        return [xp.asarray(images), xp.asarray(tags)], None


class TagsFeed:
    """DigitTags' run state: the scene generator and the next scene's index (snapshotted)."""

    def __init__(self, scenes):
        self.scenes, self.cursor = scenes, 0

    def state(self):
        return {"cursor": self.cursor}

    def load_state(self, state):
        self.cursor = int(state["cursor"])

    def next(self, n: int):
        """n images (n, 1, H, W) and their multi-hot tags (n, 10), float32."""
        images, tags = [], np.zeros((n, 10), np.float32)
        for k in range(n):
            image, gt = self.scenes.scene(self.cursor + k)
            images.append(image)
            tags[k, gt[:, 4].astype(int) - 1] = 1       # gt class = digit + 1
        self.cursor += n
        return np.stack(images).astype(np.float32), tags
