"""Data stage: synthetic detection scenes of MNIST digits for the region-proposal sample, and
their per-pixel labels for the segmentation sample."""
from __future__ import annotations

import os

import numpy as np

from netdsl.data.mnist import load_mnist
from netdsl.data.png import write_png
from netdsl.errors import NetdslError

# Error codes of this module:
#   E0910 invalid scene parameters       E0912 invalid scene index
#   E0911 the digits cannot be placed within the overlap limits

_SPLIT_IDS = {"train": 0, "test": 1}
IGNORE = 255            # the label of a digit's faint edge (ink below INK): neither digit nor background
INK = 0.5               # a pixel belongs to a digit where the digit's ink is at least this
_GREEN = (0, 255, 0)


def make_scene(rng_or_seed, digit_images: np.ndarray, digit_labels: np.ndarray, *,
               height: int = 224, width: int = 224, min_digits: int = 1, max_digits: int = 5,
               min_size: int = 16, max_size: int = 120, channels: int = 1,
               min_aspect: float = 0.6, max_aspect: float = 1.6, max_iou: float = 0.3,
               max_cover: float = 0.5, noise: float = 0.15, max_tries: int = 50,
               with_labels: bool = False) -> tuple[np.ndarray, ...]:
    """One scene: float32 image (channels, height, width) in [0, 1] and float32 gt_boxes (G, 5)
    rows x1, y1, x2, y2, class with inclusive corners and class = digit label + 1. With
    `with_labels`, also the uint8 (height, width) label map: the class (digit + 1) where a digit's
    ink is at least INK, IGNORE on its fainter edge, 0 elsewhere (a later digit's ink overwrites an
    earlier one's, as it does in the image).

    G is drawn from min_digits..max_digits. Each digit is cropped to its ink, stretched by an
    aspect factor in [min_aspect, max_aspect], resampled so its longer side is a log-uniform
    size in [min_size, max_size] (max_size is capped at the image size), tinted (when
    channels > 1) and composited with max() onto a background of level and noise up to `noise`
    (0 gives a black background). Its box is the tight box of its nonzero resampled pixels. A
    placement is redrawn, up to max_tries times, while the box has IoU > max_iou with a placed
    box or covers more than max_cover of the smaller box's area (which IoU alone allows for a
    small digit inside a big one); a digit that cannot be placed is dropped, unless dropping
    it would leave fewer than min_digits (E0911)."""
    rng = np.random.default_rng(rng_or_seed)
    max_size = min(max_size, height, width)
    _check_params(digit_images, digit_labels, height, width, min_digits, max_digits,
                  min_size, max_size, channels, min_aspect, max_aspect)
    image = _background(rng, channels, height, width, noise)
    labels = np.zeros((height, width), np.uint8)
    boxes: list[list[float]] = []
    for k in range(int(rng.integers(min_digits, max_digits + 1))):
        for attempt in range(max_tries):
            # Later attempts cap the size lower, so a crowded scene still finds a small gap.
            cap = max(min_size, max_size * (1 - attempt / max_tries))
            i = int(rng.integers(len(digit_images)))
            patch = _digit_patch(rng, digit_images[i], min_size, cap, min_aspect, max_aspect)
            ys, xs = np.nonzero(patch)
            if ys.size == 0:                # a blank digit has no box to learn; draw another
                continue
            ph, pw = patch.shape
            x0 = int(rng.integers(width - pw + 1))
            y0 = int(rng.integers(height - ph + 1))
            box = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max(), y0 + ys.max()]
            if all(_acceptable(box, b, max_iou, max_cover) for b in boxes):
                colour = rng.uniform(0.4, 1.0, channels)
                colour /= colour.max()      # the brightest channel carries full ink
                region = image[:, y0:y0 + ph, x0:x0 + pw]
                np.maximum(region, patch[None] * colour[:, None, None], out=region)
                boxes.append(box + [int(digit_labels[i]) + 1])
                _paint_labels(labels[y0:y0 + ph, x0:x0 + pw], patch, boxes[-1][4])
                break
        else:
            if k < min_digits:
                raise NetdslError(
                    "E0911", f"could not place digit {k + 1} of at least {min_digits} in a "
                             f"{height}x{width} scene within {max_tries} tries",
                    notes=[f"sizes {min_size}..{max_size} px, max IoU {max_iou}, "
                           f"max cover {max_cover}"],
                    help="lower min_digits or min_size/max_size, or use a larger scene")
    gt = np.asarray(boxes, np.float32).reshape(-1, 5)
    return (image, gt, labels) if with_labels else (image, gt)


def _paint_labels(region: np.ndarray, patch: np.ndarray, cls: int) -> None:
    """A digit's pixels (ink >= INK) take its class; its faint edge marks only background IGNORE."""
    region[(patch > 0) & (region == 0)] = IGNORE
    region[patch >= INK] = cls


def _check_params(images, labels, height, width, min_digits, max_digits, min_size, max_size,
                  channels, min_aspect=0.6, max_aspect=1.6) -> None:
    problems = []
    if height < 1 or width < 1:
        problems.append(f"the scene size {height}x{width} must be positive")
    if not 1 <= min_digits <= max_digits:
        problems.append(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    if not 1 <= min_size <= max_size:
        problems.append(f"need 1 <= min_size <= max_size (max_size is capped at the scene size "
                        f"{height}x{width}), got {min_size} and {max_size}")
    if channels < 1:
        problems.append(f"channels must be at least 1, got {channels}")
    if not 0 < min_aspect <= max_aspect:
        problems.append(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
    if np.ndim(images) != 3 or len(images) == 0 or len(images) != len(labels):
        problems.append(f"need a non-empty (N, h, w) digit array and N labels, got shapes "
                        f"{np.shape(images)} and {np.shape(labels)}")
    if problems:
        raise NetdslError("E0910", "invalid digit-scene parameters", notes=problems,
                          help="fix the values named above; the defaults are 224x224 scenes of "
                               "1..5 digits of 16..120 px")


def _background(rng, channels: int, height: int, width: int, noise: float) -> np.ndarray:
    """A flat level plus a gentle gradient plus pixel noise, all within [0, noise]."""
    if noise <= 0:
        return np.zeros((channels, height, width), np.float32)
    level = rng.uniform(0, noise / 2)
    gy, gx = rng.uniform(-1, 1, 2) * noise / 4
    ramp = gy * np.linspace(-1, 1, height)[:, None] + gx * np.linspace(-1, 1, width)[None, :]
    grain = rng.normal(0, noise / 4, (channels, height, width))
    return np.clip(level + ramp + grain, 0, noise).astype(np.float32)


def _digit_patch(rng, digit: np.ndarray, min_size: int, max_size: float,
                 min_aspect: float, max_aspect: float) -> np.ndarray:
    """The digit cropped to its ink and resampled to a random size and stretch, in [0, 1]."""
    ys, xs = np.nonzero(digit)
    if ys.size == 0:
        return np.zeros((1, 1), np.float32)
    crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32) / 255
    aspect = crop.shape[1] / crop.shape[0] * rng.uniform(min_aspect, max_aspect)
    side = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max_size)))))
    if aspect >= 1:
        out_h, out_w = max(1, round(side / aspect)), side
    else:
        out_h, out_w = side, max(1, round(side * aspect))
    return resample(crop, out_h, out_w)


def resample(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a 2-D float image: area averaging along an axis that shrinks, bilinear (pixel
    centres aligned) along one that grows. Both keep the ink's extent: edge rows and columns
    of ink stay nonzero, so a tight crop resamples to a tight patch."""
    wy = _resample_weights(image.shape[0], out_h)
    wx = _resample_weights(image.shape[1], out_w)
    return (wy @ image @ wx.T).astype(np.float32)


def _resample_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix whose row i holds the weights of output pixel i."""
    if n_out < n_in:
        # Output pixel i covers input span [i*s, (i+1)*s); weight = overlap length / s.
        s = n_in / n_out
        lo = np.arange(n_out)[:, None] * s
        j = np.arange(n_in)[None, :]
        return np.clip(np.minimum(lo + s, j + 1) - np.maximum(lo, j), 0, None) / s
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    j0 = np.floor(x).astype(int)
    j1 = np.minimum(j0 + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), j0), 1 - (x - j0))
    np.add.at(w, (np.arange(n_out), j1), x - j0)
    return w


def _acceptable(a, b, max_iou: float, max_cover: float) -> bool:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return (inter / (area_a + area_b - inter) <= max_iou
            and inter / min(area_a, area_b) <= max_cover)


class DigitScenes:
    """Scenes of MNIST digits: `scene(i)` is a pure function of (seed, split, i). Training
    scenes use the MNIST training digits, test scenes the MNIST test digits."""

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None,
                 seed: int = 0, height: int = 224, width: int = 224, max_digits: int = 5,
                 min_size: int = 16, max_size: int = 120, *, min_digits: int = 1,
                 channels: int = 1, noise: float = 0.15):
        self.images, self.labels = load_mnist(split, data_dir)   # E0902 for an unknown split
        self.split, self.seed = split, seed
        self.options = dict(height=height, width=width, min_digits=min_digits,
                            max_digits=max_digits, min_size=min_size, max_size=max_size,
                            channels=channels)
        # Validate now rather than at the first scene.
        _check_params(self.images, self.labels, **{**self.options,
                                                   "max_size": min(max_size, height, width)})
        self.options["noise"] = noise

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene `i` (any integer >= 0): image (C, H, W) float32 and gt_boxes (G, 5) float32."""
        return make_scene(self._rng(i), self.images, self.labels, **self.options)

    def labelled_scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scene `i` as `scene(i)` gives it, and its (H, W) uint8 label map (see make_scene)."""
        return make_scene(self._rng(i), self.images, self.labels, **self.options, with_labels=True)

    def _rng(self, i):
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise NetdslError("E0912", f"scene index {i!r} is not a non-negative integer",
                              help="scenes are numbered 0, 1, 2, ...")
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])

    def im_info(self) -> np.ndarray:
        """The (1, 3) im_info blob of every scene: height, width, scale 1.0."""
        return np.array([[self.options["height"], self.options["width"], 1.0]], np.float32)


def render_scene_png(path: str | os.PathLike, image: np.ndarray, gt_boxes: np.ndarray,
                     proposals: np.ndarray | None = None, scores: np.ndarray | None = None,
                     thickness: int = 1, texts: list[str] | None = None) -> None:
    """Draw `image` ((C, H, W) or (H, W) in [0, 1]; with fewer than 3 channels the first is
    shown as gray, otherwise the first 3 as RGB) with gt_boxes (G, 4|5; x1, y1, x2, y2 first)
    in green over proposals ((P, 4) boxes, or (P, 5) Caffe rois whose column 0 is the batch
    index) shaded from red (lowest score) to yellow (highest), in `thickness` px lines, each
    with its text (e.g. a detection's class and score; digits, '.', '-' and ' ') written above
    its top-left corner, and write it as a PNG."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"render_scene_png needs a (C, H, W) or (H, W) image, got {image.shape}")
    rgb = image[[0, 0, 0]] if image.shape[0] < 3 else image[:3]
    canvas = np.ascontiguousarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
                                  .transpose(1, 2, 0))
    if proposals is not None and len(proposals):
        props = _as_boxes(proposals, "proposals")
        props = props[:, 1:5] if props.shape[1] == 5 else props
        if scores is None:
            ranks = np.zeros(len(props))
        else:
            s = np.asarray(scores, np.float64).reshape(-1)
            ranks = (s - s.min()) / (np.ptp(s) or 1.0)
        # Lowest score first, so the best proposals are drawn on top.
        labels = list(texts) if texts is not None else [""] * len(props)
        for box, r, text in sorted(zip(props, ranks, labels), key=lambda t: t[1]):
            _draw_box(canvas, box, (255, int(255 * r), 0), thickness)
            _draw_text(canvas, int(round(box[0])), int(round(box[1])) - 6, text, (255, int(255 * r), 0))
    for box in _as_boxes(gt_boxes, "gt_boxes"):
        _draw_box(canvas, box[:4], _GREEN, thickness)
    write_png(path, canvas)


def _as_boxes(x, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] not in (4, 5):
        raise ValueError(f"{name} must have shape (N, 4) or (N, 5), got {a.shape}")
    return a


def _draw_box(canvas: np.ndarray, box, colour, thickness: int) -> None:
    """Outline (x1, y1, x2, y2), inclusive, `thickness` px inwards, clipped to the canvas."""
    h, w, _ = canvas.shape
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    for t in range(thickness):
        left, right, top, bot = x1 + t, x2 - t, y1 + t, y2 - t
        if left > right or top > bot:
            break
        cols = slice(max(left, 0), min(right, w - 1) + 1)
        rows = slice(max(top, 0), min(bot, h - 1) + 1)
        for y in (top, bot):
            if 0 <= y < h:
                canvas[y, cols] = colour
        for x in (left, right):
            if 0 <= x < w:
                canvas[rows, x] = colour


# A 3 x 5 pixel font for box captions: each glyph is 5 rows of 3 bits.
_GLYPHS = {"0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
           "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
           "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
           " ": (0, 0, 0, 0, 0)}


def _draw_text(canvas: np.ndarray, x: int, y: int, text: str, colour) -> None:
    """Write `text` with its top-left at (x, y) (moved inside the canvas), 4 px a character."""
    h, w, _ = canvas.shape
    y = min(max(y, 0), h - 5)
    x = min(max(x, 0), w - 4 * len(text))
    for k, ch in enumerate(text):
        rows = _GLYPHS.get(ch, _GLYPHS[" "])
        for dy, bits in enumerate(rows):
            for dx in range(3):
                px, py = x + 4 * k + dx, y + dy
                if bits >> (2 - dx) & 1 and 0 <= px < w and 0 <= py < h:
                    canvas[py, px] = colour
