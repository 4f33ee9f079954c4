"""`netdsl detect`: run a detector's TEST phase on DigitScenes scenes or PNG images, draw its
boxes with class and score, and write detections.json.

Everything here works on detection rows [image_id, label, score, x1, y1, x2, y2] in pixels of
the net's input image (inclusive corners, netdsl.boxes' +1 convention). `detection_rows` is the
one place that knows where a net's rows come from: SSD's DetectionOutput top, whose corners are
fractions of the image, or a py-faster-rcnn-style test net's rois, cls_prob and bbox_pred
(netdsl.frcnn); a detector with another head plugs in there."""
from __future__ import annotations

import os
import time

import numpy as np

from . import frcnn
from .backend import to_host
from .errors import NetdslError

# Error codes of this module (and of the mAP in netdsl.evaluate):
#   E0641 the net has no detection output in its TEST phase
#   E0642 mAP: the TEST net has no DigitScenes layer giving ground truth
# Bad argument values and unwritable outputs are E0632 and E0633, as for `netdsl propose`.
NO_DETECTIONS = ("detect and mAP need a net whose TEST phase ends in DetectionOutput (nets/ssd_digits.net) or a "
                 "Faster R-CNN test net: a Proposal, then a Softmax over the proposals' head as a net output "
                 "(nets/faster_rcnn_digits_test.net)")


def add_parsers(sub) -> None:
    """Register the `detect` subcommand (called once from commands.add_parsers)."""
    from .propose import add_run_options
    p = sub.add_parser("detect", help="draw a trained detector's boxes (class, score) on scenes or PNGs; "
                                      "write them as JSON")
    p.add_argument("model", help="the net file: its TEST phase ends in a DetectionOutput layer (nets/ssd_digits.net) "
                                 "or is a Faster R-CNN test net (nets/faster_rcnn_digits_test.net)")
    add_run_options(p, "detections.json")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="draw detections scoring at least this (default 0.3; the JSON has all)")
    p.set_defaults(func=cmd_detect)


# ------------------------------------------------------------------------------ detection rows

def has_detections(model: str, phase: str = "TEST") -> bool:
    """Whether `model` (a net file) makes detection rows in `phase` (see `detection_rows`)."""
    from .check import check_file
    g = check_file(model, phase=phase).graph
    return any(n.layer.makes_detections for n in g.nodes) or frcnn.head(g.nodes, g.outputs) is not None


def detection_rows(net) -> np.ndarray:
    """The (K, 7) rows [image_id, label, score, x1, y1, x2, y2] of the last forward, in pixels of
    the input image, from either family of detector: an SSD's DetectionOutput, or a Faster
    R-CNN test net's Proposal rois, cls_prob and bbox_pred (`frcnn.head` finds them) through
    py-faster-rcnn's im_detect and per-class NMS. Neither is E0641."""
    det = net.plan.find("makes_detections")
    if det is not None:
        return ssd_rows(net, det)
    blobs = frcnn.head([s.node for s in net.plan.steps], net.plan.outputs)
    if blobs is not None:
        return frcnn.net_detections(net, blobs, net.plan.find("makes_proposals").layer.spec.bottoms[2])
    raise NetdslError("E0641", f"net '{net.plan.name}' has no detection output in its TEST phase",
                      help=NO_DETECTIONS)


def ssd_rows(net, det) -> np.ndarray:
    """The DetectionOutput top's rows, whose corners are fractions of the image, scaled back as
    `ssd_label` scaled the ground truth ([x1, x2 + 1) of the width); its 'no detection' rows
    (label -1) dropped."""
    rows = to_host(net.blobs[det.layer.spec.tops[0]]).reshape(-1, 7).astype(np.float64)
    rows = rows[rows[:, 1] >= 0]
    h, w = image_size(net)
    rows[:, [3, 5]] *= w
    rows[:, [4, 6]] *= h
    rows[:, [5, 6]] -= 1
    return rows


def image_size(net) -> tuple[int, int]:
    """(height, width) of the input image of the last forward (the scenes layer's data top)."""
    data = net.plan.find("feeds_scenes")
    return tuple(to_host(net.blobs[data.layer.spec.tops[0]]).shape[2:])


def ground_truth(net) -> np.ndarray:
    """The scenes layer's ground truth of the last forward as G x 5 pixel boxes [x1, y1, x2, y2,
    class] (its third top: G x 5 already, or SSD's label rows, scaled back)."""
    data = net.plan.find("feeds_scenes")
    if data is None or len(data.layer.spec.tops) < 3:
        raise NetdslError("E0642", f"net '{net.plan.name}' has no DigitScenes layer giving ground truth in its "
                          "TEST phase", help="mAP needs ground truth: feed the net from a DigitScenes layer")
    gt = to_host(net.blobs[data.layer.spec.tops[2]]).astype(np.float64)
    if gt.shape[-1] == 5:
        return gt.reshape(-1, 5)
    rows = gt.reshape(-1, 8)
    rows = rows[rows[:, 0] != -1]
    h, w = image_size(net)
    return np.stack([rows[:, 3] * w, rows[:, 4] * h, rows[:, 5] * w - 1, rows[:, 6] * h - 1, rows[:, 1]], axis=1)


# ------------------------------------------------------------------------------------ detect

ROWS_FORMAT = "detections: [label, score, x1, y1, x2, y2], inclusive pixel corners; DigitScenes' label is the digit + 1"

def caption(label: int, score: float) -> str:
    """A box's caption: the digit (DigitScenes' class is the digit + 1) and the score, e.g. "7 .93"."""
    s = f"{score:.2f}"
    return f"{int(label) - 1} {s[1:] if s.startswith('0') else s}"


def detect(model: str, weights: str, out: str, scenes: int | None = None, images=(), threshold: float = 0.3,
           seed: int = 0, backend=None, data_dir=None, max_side: int = 1000) -> dict:
    """Run the net's TEST phase on `scenes` held-out scenes or on the PNG files `images` (each
    downscaled to at most `max_side` pixels a side); write one PNG per input, as the net saw it
    (gt green; detections scoring >= threshold red to yellow by score, captioned) and
    detections.json (boxes in the original image's pixels; `scale` is how much it was shrunk).
    Returns what the JSON holds."""
    from .data.scenes import render_scene_png
    from .evaluate import build_test_net
    from .propose import PAD_MULTIPLE, _mkdir, _write_json, pad_to, run_inputs
    if not 0 <= threshold <= 1:
        raise NetdslError("E0632", f"--threshold must lie in [0, 1], got {threshold}", help="e.g. --threshold 0.3")
    if not has_detections(model):
        raise NetdslError("E0641", f"{model}: the TEST phase has no detection output", help=NO_DETECTIONS)
    net = build_test_net(model, weights, backend, data_dir, seed)
    data = net.plan.find("feeds_scenes")
    if data is None:
        raise NetdslError("E0642", f"net '{net.plan.name}' has no DigitScenes layer to feed scenes or images to",
                          help="feed the detector from a DigitScenes layer (see nets/ssd_digits.net)")
    inputs = run_inputs(images, scenes, data.layer.p.channels, "detections", max_side)
    _mkdir(out)
    records, seconds = [], 0.0
    for k, (name, source, image, size) in enumerate(inputs):
        t0 = time.perf_counter()
        if image is not None:
            net.source(data.node.name).feed(pad_to(image, PAD_MULTIPLE), None, im_size=image.shape[1:])
        net.forward()
        rows = detection_rows(net)
        seconds += time.perf_counter() - t0
        picture = to_host(net.blobs[data.layer.spec.tops[0]])[0]
        gt = ground_truth(net) if image is None else np.zeros((0, 5))
        if image is not None:                          # back to the picture: drop the padding, clip to it
            picture = picture[:, :image.shape[1], :image.shape[2]]
            rows[:, [3, 5]] = rows[:, [3, 5]].clip(0, image.shape[2] - 1)
            rows[:, [4, 6]] = rows[:, [4, 6]].clip(0, image.shape[1] - 1)
        shown = rows[rows[:, 2] >= threshold]
        render_scene_png(os.path.join(out, name), picture, gt, shown[:, 3:7], shown[:, 2],
                         texts=[caption(r[1], r[2]) for r in shown])
        size = size or picture.shape[1:]
        scale = picture.shape[2] / size[1]
        rec = {"png": name, "image_size": [int(size[0]), int(size[1])], "gt_boxes": gt.tolist(),
               "detections": [[int(r[1]), float(r[2]), *map(float, r[3:7] / scale)] for r in rows]}
        records.append({"scene": k, **rec} if source is None else {"source": source, "scale": scale, **rec})
    result = {"model": model, "weights": weights, "seed": seed, "threshold": threshold, "format": ROWS_FORMAT,
              "images": records, "seconds": seconds, "images_per_second": len(records) / max(seconds, 1e-9)}
    _write_json(os.path.join(out, "detections.json"), result)
    return result


def cmd_detect(args) -> int:
    from .backend import get_backend
    r = detect(args.model, args.weights, args.out, args.scenes, args.image, args.threshold, args.seed,
               get_backend(args.device), args.data_dir, args.max_side)
    drawn = sum(d[1] >= args.threshold for x in r["images"] for d in x["detections"])
    print(f"wrote {len(r['images'])} PNG(s) and detections.json to {args.out}: {drawn} detections scoring >= "
          f"{args.threshold:g} drawn, {r['images_per_second']:.1f} images/s")
    return 0
