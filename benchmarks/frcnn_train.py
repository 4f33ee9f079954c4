"""Faster R-CNN end2end on digit scenes (nets/faster_rcnn_digits.net, py-faster-rcnn's Python
layers run as built-ins): train with its solver and report each of the four losses (rpn_cls_loss,
rpn_loss_bbox, loss_cls, loss_bbox) averaged over windows of iterations, and the time per iteration.

    python benchmarks/frcnn_train.py                        # 1500 iterations, windows of 100
    python benchmarks/frcnn_train.py --iterations 300 --window 50

Caffe's log prints each output of the last iteration only (its smoothed `loss` is the total), so
the per-loss trend is measured here, iteration by iteration. BLAS threads default to 1 (see
benchmarks/rpn_train.py: small GEMMs on a shared 2-core machine are faster single-threaded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOSSES = ("rpn_cls_loss", "rpn_loss_bbox", "loss_cls", "loss_bbox")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default=str(ROOT / "nets" / "faster_rcnn_digits_solver.net"))
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", args.threads)
    import numpy as np

    from netdsl.backend import CPU
    from netdsl.train import Trainer
    tr = Trainer(args.solver, CPU, max_iter=args.iterations, out=str(ROOT / "runs" / "frcnn_bench"), progress=False)
    rows, start = [], time.perf_counter()
    for _ in range(args.iterations):
        tr.net.zero_grad()
        tr.net.forward()
        rows.append([float(tr.net.blobs[k].data) for k in LOSSES])
        tr.net.backward()
        tr.solver.step(tr.iter)
        tr.iter += 1
    seconds = time.perf_counter() - start
    rows = np.array(rows)
    windows = [{"iterations": f"{i + 1}-{min(i + args.window, len(rows))}",
                **{k: round(float(v), 4) for k, v in zip(LOSSES, rows[i:i + args.window].mean(axis=0))}}
               for i in range(0, len(rows), args.window)]
    out = {"iterations": args.iterations, "seconds": round(seconds, 1), "ms_per_iteration": round(1000 * seconds /
           args.iterations, 1), "windows": windows, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "blas_threads": os.environ["OPENBLAS_NUM_THREADS"]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"{'iterations':>12} " + " ".join(f"{k:>14}" for k in LOSSES))
    for w in windows:
        print(f"{w['iterations']:>12} " + " ".join(f"{w[k]:>14.4f}" for k in LOSSES))
    print(f"{out['ms_per_iteration']} ms per iteration ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
