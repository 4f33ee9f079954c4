"""`netdsl propose` (run a trained region-proposal net on scenes or a PNG; draw and dump its
proposals) and `netdsl scenes` (render sample DigitScenes with their ground-truth boxes)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .errors import NetdslError
from .files import write_atomic
from .memory import require

# Error codes of this module and netdsl.evaluate:
#   E0630 the net has no Proposal layer (TEST)      E0632 an invalid argument value
#   E0631 the net has no DigitScenes layer (TEST)   E0633 cannot write an output file
#   E0634 the image's channels do not fit the net


def add_parsers(sub) -> None:
    """Register the `propose` and `scenes` subcommands (called once from commands.add_parsers)."""
    p = sub.add_parser("propose", help="draw a trained RPN's top proposals on scenes or a PNG; write them as JSON")
    p.add_argument("model", help="the net file (its TEST phase must end in a Proposal layer, as nets/rpn.net)")
    add_run_options(p, "proposals.json")
    p.add_argument("--top", type=int, default=10, help="proposals drawn per image (default 10; the JSON has all)")
    p.set_defaults(func=cmd_propose)

    p = sub.add_parser("scenes", help="render sample DigitScenes (MNIST digit detection scenes) with their boxes")
    p.add_argument("-n", type=int, default=8, help="how many scenes (default 8)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--split", choices=("train", "test"), default="train", type=str.lower,
                   help="MNIST digits to draw from (train scenes use the training digits)")
    p.add_argument("--seed", type=int, default=0,
                   help="scene seed: a DigitScenes layer with `seed: s` in a run with seed r shows seed s + r")
    p.add_argument("--first", type=int, default=0, help="index of the first scene (default 0)")
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--max-digits", type=int, default=5)
    p.add_argument("--min-size", type=int, default=16)
    p.add_argument("--max-size", type=int, default=120)
    p.add_argument("--data-dir", help="dataset directory (default: $NETDSL_DATA or the user cache dir)")
    p.set_defaults(func=cmd_scenes)


def add_run_options(p, json_name: str) -> None:
    """The options of a command that runs a trained net on scenes or PNGs and draws what it finds
    (`propose`, `detect`): weights, the inputs, the output directory, seed, device, data."""
    p.add_argument("--weights", required=True, help="trained weights (.npz)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scenes", type=int, default=None, metavar="N",
                   help="run on the first N scenes of the net's TEST data layer (default 4)")
    g.add_argument("--image", action="append", default=[], metavar="PNG",
                   help="run on this PNG instead (repeatable); no ground truth is drawn")
    p.add_argument("-o", "--out", required=True, help=f"output directory for the PNGs and {json_name}")
    p.add_argument("--max-side", type=int, default=1000,
                   help="downscale --image inputs to at most this many pixels a side (default 1000, py-faster-rcnn's)")
    p.add_argument("--seed", type=int, default=0, help="run seed of the TEST net (picks the scenes, as `test`)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--data-dir", help="dataset directory (default: $NETDSL_DATA or the user cache dir)")


# ------------------------------------------------------------------------------------- scenes

def render_scenes(out: str, n: int, split: str = "train", seed: int = 0, first: int = 0, data_dir=None,
                  **options) -> list[dict]:
    """Write scenes first..first+n-1 as PNGs (gt boxes in green) plus scenes.json; returns the records."""
    from .data.scenes import DigitScenes, render_scene_png
    if n < 1 or first < 0:
        raise NetdslError("E0632", f"need -n >= 1 and --first >= 0, got {n} and {first}",
                          help="e.g. `netdsl scenes -n 8 -o scenes/`")
    h, w, c = options.get("height", 224), options.get("width", 224), options.get("channels", 1)
    if min(h, w, c) >= 1:             # the generator refuses the rest; a scene and its drawing: ~7 floats a pixel
        require(h * w * max(c, 3) * 4 * 7, f"a {h}x{w} scene")
    scenes = DigitScenes(split=split, data_dir=data_dir, seed=seed, **options)
    _mkdir(out)
    records = []
    for i in range(first, first + n):
        image, gt = scenes.scene(i)
        name = f"scene_{split}_{i:04d}.png"
        render_scene_png(os.path.join(out, name), image, gt)
        records.append({"index": i, "png": name, "gt_boxes": gt.tolist()})
    _write_json(os.path.join(out, "scenes.json"), {"split": split, "seed": seed, "options": options,
                                                   "scenes": records})
    return records


def cmd_scenes(args) -> int:
    records = render_scenes(args.out, args.n, args.split, args.seed, args.first, args.data_dir,
                            height=args.height, width=args.width, channels=args.channels,
                            max_digits=args.max_digits, min_size=args.min_size, max_size=args.max_size)
    digits = sum(len(r["gt_boxes"]) for r in records)
    print(f"wrote {len(records)} {args.split} scenes ({digits} digits) to {args.out} "
          f"(scene_{args.split}_NNNN.png, scenes.json)")
    return 0


# ------------------------------------------------------------------------------------ propose

def image_blob(png: np.ndarray, channels: int) -> np.ndarray:
    """A decoded PNG (H, W, C) uint8 as a (channels, H, W) float32 image in [0, 1]: colour is
    averaged to gray for a 1-channel net, gray is repeated for a 3-channel one; alpha is dropped."""
    a = np.asarray(png, np.float32) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    colour = a[:, :, :3] if a.shape[2] >= 3 else a[:, :, :1]
    if channels == 1:
        out = colour.mean(axis=2, keepdims=True)
    elif colour.shape[2] == channels:
        out = colour
    elif colour.shape[2] == 1:
        out = np.repeat(colour, channels, axis=2)
    else:
        raise NetdslError("E0634", f"cannot feed a {colour.shape[2]}-channel image to a {channels}-channel net",
                          help="give a grayscale or RGB PNG")
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def run_proposals(net, feed=None) -> dict:
    """One forward of a TEST net with a Proposal layer: image (C, H, W), gt (G, 5), rois (R, 4)
    and scores (R,), best first. `feed` (image, gt) replaces the next scene of its DigitScenes layer."""
    from .backend import to_host
    from .evaluate import proposal_blobs
    rois_name, scores_name, gt_name = proposal_blobs(net)
    data = net.plan.find("feeds_scenes")
    size = None
    if feed is not None:
        image, gt = feed
        size = image.shape[1:]
        net.source(data.node.name).feed(pad_to(image, PAD_MULTIPLE), gt, im_size=size)
    net.forward()
    blobs = net.blobs
    rois = to_host(blobs[rois_name]).reshape(-1, 5)
    scores = to_host(blobs[scores_name]).reshape(-1) if scores_name else np.zeros(len(rois), np.float32)
    image = to_host(blobs[data.layer.spec.tops[0]])[0]
    if size is not None:
        image = image[:, :size[0], :size[1]]
    return {"image": image, "gt": to_host(blobs[gt_name]).reshape(-1, 5), "rois": rois[:, 1:5], "scores": scores}


# An image of any size is zero-padded (bottom and right) to a multiple of this before the forward
# pass, so every downsampling and the upsampling in the backbone meet again at the same size;
# im_info keeps the picture's own size, so proposals are clipped to it.
PAD_MULTIPLE = 32


def pad_to(image: np.ndarray, multiple: int) -> np.ndarray:
    """(C, H, W) zero-padded at the bottom and right to multiples of `multiple`."""
    _, h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    return np.pad(image, ((0, 0), (0, ph), (0, pw))) if ph or pw else image


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """(C, H, W) downscaled (area averaging) so that its longer side is at most `max_side`, as
    py-faster-rcnn's test scales cap an image's longer side (TEST.MAX_SIZE 1000): an 8000x8000
    photo runs at 1000x1000 instead of needing gigabytes of activations."""
    from .data.scenes import resample
    _, h, w = image.shape
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    oh, ow = max(round(h * s), 1), max(round(w * s), 1)
    return np.stack([resample(c, oh, ow) for c in image])


def run_inputs(images, scenes: int | None, channels: int, suffix: str, max_side: int) -> list[tuple]:
    """What `propose` and `detect` run on: (output PNG name, source PNG or None, (C, H, W) image
    downscaled to at most `max_side` a side or None, the PNG's own (H, W) or None) for each PNG in
    `images`, else for each of the first `scenes` scenes (default 4)."""
    from .data.png import read_png
    if max_side < 32:
        raise NetdslError("E0632", f"--max-side must be at least 32, got {max_side}", help="e.g. --max-side 1000")
    if not images:
        n = 4 if scenes is None else scenes
        if n < 1:
            raise NetdslError("E0632", f"--scenes must be at least 1, got {n}", help="e.g. --scenes 8")
        return [(f"scene_{i:04d}_{suffix}.png", None, None, None) for i in range(n)]
    inputs = []
    for p in images:
        image = image_blob(read_png(p), channels)
        inputs.append((f"{os.path.splitext(os.path.basename(p))[0]}_{suffix}.png", p, shrink(image, max_side),
                       image.shape[1:]))
        del image
    return inputs


def propose(model: str, weights: str, out: str, scenes: int | None = None, images=(), top: int = 10, seed: int = 0,
            backend=None, data_dir=None, max_side: int = 1000) -> dict:
    """Run the net's TEST phase on `scenes` held-out scenes or on the PNG files `images` (each
    downscaled to at most `max_side` pixels a side), write one PNG per input (gt green; the top
    `top` proposals red to yellow by score) and proposals.json (boxes in the original image's
    pixels; `scale` is how much it was shrunk)."""
    from .data.scenes import render_scene_png
    from .evaluate import build_test_net
    if top < 0:
        raise NetdslError("E0632", f"--top must be >= 0, got {top}", help="e.g. --top 10")
    net = build_test_net(model, weights, backend, data_dir, seed)
    data = net.plan.find("feeds_scenes")
    inputs = [(name, source, None if image is None else (image, np.zeros((0, 5), np.float32)), size)
              for name, source, image, size in run_inputs(images, scenes, data.layer.p.channels if data else 1,
                                                          "proposals", max_side)]
    _mkdir(out)
    records, seconds = [], 0.0
    for k, (name, source, feed, size) in enumerate(inputs):
        t0 = time.perf_counter()
        r = run_proposals(net, feed)
        seconds += time.perf_counter() - t0
        render_scene_png(os.path.join(out, name), r["image"], r["gt"], r["rois"][:top], r["scores"][:top])
        size = size or r["image"].shape[1:]
        scale = r["image"].shape[2] / size[1]
        rec = {"png": name, "image_size": [int(size[0]), int(size[1])],
               "gt_boxes": r["gt"].tolist(),
               "proposals": [[*map(float, b / scale), float(s)] for b, s in zip(r["rois"], r["scores"])]}
        if source is None:
            rec = {"scene": k, **rec}
        else:
            rec = {"source": source, "scale": scale, **rec}
        records.append(rec)
    result = {"model": model, "weights": weights, "seed": seed,
              "format": "proposals: [x1, y1, x2, y2, score], inclusive pixel corners, best first",
              "images": records, "seconds": seconds}
    _write_json(os.path.join(out, "proposals.json"), result)
    return result


def cmd_propose(args) -> int:
    from .backend import get_backend
    r = propose(args.model, args.weights, args.out, args.scenes, args.image, args.top, args.seed,
                get_backend(args.device), args.data_dir, args.max_side)
    n = len(r["images"])
    props = sum(len(x["proposals"]) for x in r["images"])
    print(f"wrote {n} PNG{'s' if n != 1 else ''} and proposals.json ({props} proposals, "
          f"{props / max(r['seconds'], 1e-9):.0f} proposals/s) to {args.out}")
    return 0


# -------------------------------------------------------------------------------------- files

def _mkdir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NetdslError("E0633", f"cannot create output directory {path}: {e.strerror or e}",
                          help="choose a writable directory with -o") from None


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=1) + "\n"
    try:
        write_atomic(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise NetdslError("E0633", f"cannot write {path}: {e.strerror or e}",
                          help="check that the directory is writable") from None
