"""ONNX export of VGG-16 with its weights: 138 M params from a .caffemodel (random values, written by
netdsl as benchmarks/caffemodel_io.py does) to a .onnx, as `netdsl export` does it. Reports the time
of the whole export (reading the weights included) and of its parts, the file size, and optionally
(--verify) onnxruntime against netdsl on one image.

    python benchmarks/onnx_export.py [--runs 3] [--dir /tmp] [--verify]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from caffemodel_io import vgg16_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--verify", action="store_true")
    a = ap.parse_args()

    from netdsl.executor import build_net
    from netdsl.onnx_export import export
    net, weights = vgg16_files(Path(a.dir))
    out = Path(a.dir) / "vgg16.onnx"
    print(f"VGG-16: {os.path.getsize(weights) / 1e6:.0f} MB .caffemodel")
    totals, builds = [], []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        model, built = export(str(net), str(out), weights=str(weights))
        totals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_net(str(net), "TEST", weights=str(weights))          # the part that is reading the weights
        builds.append(time.perf_counter() - t0)
        del model
    total, build = statistics.median(totals), statistics.median(builds)
    print(f"  export (netdsl export, weights read included): {total:6.2f} s (median of {a.runs})")
    print(f"    of which building the net and reading the weights: {build:6.2f} s; ONNX graph and file: {total - build:6.2f} s")
    print(f"  {out}: {os.path.getsize(out) / 1e6:.0f} MB")
    if a.verify:
        from netdsl.onnx_export import verify
        t0 = time.perf_counter()
        err = verify(str(out), built)
        print(f"  verify: largest relative difference {max(err.values()):.3g} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
