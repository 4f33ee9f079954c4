"""Multi-label tagging of digit images: softmax + soft labels + the cumulative rule vs sigmoid +
binary cross-entropy + a tuned threshold, on nets/multilabel_digits.net (one backbone, trained
twice by nets/multilabel_softmax_solver.net and nets/multilabel_sigmoid_solver.net).

Both are scored on held-out TEST scenes (MNIST test digits, run seed 0: the scenes `netdsl test
nets/multilabel_digits.net --iterations N/100 [--stage sigmoid]` scores): per-sample F1, precision,
recall, exact-match rate and mAP over classes. Thresholds are tuned on validation scenes, composed
of MNIST *training* digits with a scene seed training never used (training reads scene seed 1 =
digit_tags_param.seed 0 + random_seed 1): the sigmoid net's fixed threshold, and (reported beside
the default 0.95) the cumulative rule's. The cumulative rule's test F1 is also given for every
threshold in 0.80..0.99.

    python benchmarks/multilabel_digits.py --train        # train both (1500 iterations each), then score
    python benchmarks/multilabel_digits.py --runs runs    # score runs/multilabel_{softmax,sigmoid}/ml_iter_1500.npz
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from netdsl.data.scenes import DigitScenes  # noqa: E402
from netdsl.evaluate import collect_tags, tag_metrics  # noqa: E402
from netdsl.executor import build_net  # noqa: E402
from netdsl.layers.loss import decode_tags  # noqa: E402

NET = ROOT / "nets" / "multilabel_digits.net"
VARIANTS = {"softmax": (), "sigmoid": ("sigmoid",)}
VALIDATION_SEED = 1000
CUMULATIVE = [0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
FIXED = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]


def train(variant: str, runs: Path) -> float:
    from netdsl.backend import get_backend
    from netdsl.train import Trainer
    t0 = time.time()
    Trainer(str(ROOT / "nets" / f"multilabel_{variant}_solver.net"), get_backend("cpu"),
            out=str(runs / f"multilabel_{variant}"), progress=False).run()
    return time.time() - t0


def scores(variant: str, weights: Path, n: int, validation: bool, data_dir=None):
    """(probabilities, truth) over n scenes: TEST scenes, or validation scenes of training digits."""
    net = build_net(str(NET), "TEST", "cpu", weights=str(weights), stages=VARIANTS[variant], data_dir=data_dir)
    feed = net.source("tags")
    if validation:
        feed.scenes = DigitScenes("train", data_dir, seed=VALIDATION_SEED, **feed.scenes.options)
    _, _, truth, probs = collect_tags(net, n // net.plan.blob_shapes["data"][0])
    return probs, truth


def metrics(probs, truth, mode: str, threshold: float, top_k: int = 1) -> dict:
    return tag_metrics(decode_tags(np, probs, mode, threshold, top_k), truth, probs)


def best(probs, truth, mode: str, grid) -> float:
    return max(grid, key=lambda t: metrics(probs, truth, mode, t)["f1"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="where the two runs are (or go, with --train)")
    ap.add_argument("--train", action="store_true", help="train both variants first")
    ap.add_argument("--iter", type=int, default=1500, help="the snapshot to score (default 1500, max_iter)")
    ap.add_argument("--test", type=int, default=2000, help="held-out TEST scenes (default 2000)")
    ap.add_argument("--val", type=int, default=1000, help="validation scenes for tuning (default 1000)")
    ap.add_argument("--data-dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    out: dict = {}
    for variant in VARIANTS:
        seconds = train(variant, runs) if args.train else None
        w = runs / f"multilabel_{variant}" / f"ml_iter_{args.iter}.npz"
        vp, vt = scores(variant, w, args.val, True, args.data_dir)
        tp, tt = scores(variant, w, args.test, False, args.data_dir)
        r = out[variant] = {"train_seconds": seconds}
        if variant == "softmax":
            tuned = best(vp, vt, "CUMULATIVE", CUMULATIVE)
            r["cumulative 0.95"] = metrics(tp, tt, "CUMULATIVE", 0.95)
            r[f"cumulative {tuned:g} (tuned)"] = metrics(tp, tt, "CUMULATIVE", tuned)
            r["cumulative sweep (test F1)"] = {f"{t:g}": metrics(tp, tt, "CUMULATIVE", t)["f1"] for t in CUMULATIVE}
            r["fixed threshold 0.5"] = metrics(tp, tt, "THRESHOLD", 0.5)
            tuned_fixed = best(vp, vt, "THRESHOLD", FIXED)
            r[f"fixed threshold {tuned_fixed:g} (tuned)"] = metrics(tp, tt, "THRESHOLD", tuned_fixed)
            r["top-1"] = metrics(tp, tt, "TOP_K", 1.0, 1)
        else:
            tuned = best(vp, vt, "THRESHOLD", FIXED)
            r["fixed threshold 0.5"] = metrics(tp, tt, "THRESHOLD", 0.5)
            r[f"fixed threshold {tuned:g} (tuned)"] = metrics(tp, tt, "THRESHOLD", tuned)
            r["cumulative 0.95"] = metrics(tp, tt, "CUMULATIVE", 0.95)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"held-out TEST scenes: {args.test}; validation scenes (tuning): {args.val}")
    print("| loss | decoding | F1 | precision | recall | exact | mAP | tags/sample |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in out.items():
        for name, m in r.items():
            if isinstance(m, dict) and "f1" in m:
                print(f"| {variant} | {name} | {m['f1']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} | "
                      f"{m['exact']:.4f} | {m['mAP']:.4f} | {m['tags_per_sample']:.2f} |")
    sweep = out["softmax"]["cumulative sweep (test F1)"]
    print("\ncumulative rule, test F1 by threshold: " + ", ".join(f"{t}: {f:.4f}" for t, f in sweep.items()))
    for variant, r in out.items():
        if r["train_seconds"]:
            print(f"{variant}: trained in {r['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
