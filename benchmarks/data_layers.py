"""The file-reading data layers' speed (issue 13), on MNIST made into files in a temp directory.

1. Each layer alone (read + decode + transform, batch 64, scale 1/256), images per second, with
   prefetch off (batches made on demand) and on (made by the background thread while the caller
   waits): PNG and JPEG files through ImageData, raw and PNG-encoded Datums through Data (LMDB),
   and HDF5Data.
2. LeNet's training step (Caffe's LeNet solver, batch 64) reading MNIST through the in-memory MNIST
   layer, through ImageData (PNG) and through Data (raw LMDB), prefetch on and off: ms per step,
   median of blocks, the variants alternated block by block.

    python benchmarks/data_layers.py [--images 4000] [--batches 40] [--steps 50] [--blocks 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from netdsl.data import images as imgs
from netdsl.data import tools

LENET = (ROOT / "nets" / "lenet.net").read_text()
LENET_BODY = LENET[LENET.index('layer {\n  name: "conv1"'):]


def make_files(d: Path, n: int) -> dict[str, str]:
    """The MNIST training images (first n) as files, and the data layer reading each."""
    from netdsl.data.mnist import load_mnist
    x, y = load_mnist("train")
    x, y = x[:n], y[:n]
    tools.export_mnist(str(d / "png"), "png", limit=n, progress=False)
    (d / "jpg").mkdir()
    with open(d / "jpg.txt", "w") as f:
        for i in range(n):
            (d / "jpg" / f"{i}.jpg").write_bytes(imgs.encode_image(x[i][None], "jpg"))
            f.write(f"{i}.jpg {y[i]}\n")
    tools.export_mnist(str(d / "lmdb"), "lmdb", limit=n, progress=False)
    tools.convert_imageset(f"{d}/png/", str(d / "png" / "train.txt"), str(d / "enc_lmdb"), gray=True,
                           encode_type="png", progress=False)
    tools.export_mnist(str(d / "h5"), "hdf5", limit=n, progress=False)
    tp = "transform_param { scale: 0.00390625 }"
    image = ('layer {{ name: "d" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{}" '
             'root_folder: "{}" batch_size: 64 is_color: false }} ')
    lmdb = ('layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ source: "{}" backend: LMDB '
            'batch_size: 64 }} ')
    return {
        "MNIST (in memory)": 'layer { name: "d" type: "MNIST" top: "data" top: "label" mnist_param { batch_size: 64 } '
                             + tp + " }",
        "ImageData, PNG files": image.format(d / "png" / "train.txt", f"{d}/png/") + tp + " }",
        "ImageData, JPEG files": image.format(d / "jpg.txt", f"{d}/jpg/") + tp + " }",
        "Data, LMDB of raw Datums": lmdb.format(d / "lmdb" / "mnist_train_lmdb") + tp + " }",
        "Data, LMDB of PNG Datums": lmdb.format(d / "enc_lmdb") + tp + " }",
        "HDF5Data": f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: '
                    f'"{d}/h5/train_h5.txt" batch_size: 64 }} }}',
    }


def build(d: Path, layer: str, phase: str, body: str):
    from netdsl.executor import build_net
    path = d / "net.net"
    path.write_text(layer + "\n" + body)
    return build_net(str(path), phase, "cpu", seed=1)


def layer_alone(d: Path, layer: str, batches: int, prefetch: bool) -> float:
    net = build(d, layer, "TEST", 'layer { name: "s" type: "Silence" bottom: "data" bottom: "label" }')
    src = net.source("d")
    if hasattr(src, "prefetch"):
        src.prefetch = 4 if prefetch else 0
    net.forward()                                   # warm-up (and the prefetch thread's start)
    t = time.perf_counter()
    for _ in range(batches):
        net.forward()
    return batches * 64 / (time.perf_counter() - t)


def stepper(d: Path, layer: str, prefetch: bool):
    from netdsl.solver import Solver
    from netdsl.solverfile import load_solver
    sf = load_solver(str(ROOT / "nets" / "lenet_solver.net"))
    net = build(d, layer, "TRAIN", LENET_BODY)
    src = net.source("d")
    if hasattr(src, "prefetch"):
        src.prefetch = 4 if prefetch else 0
    solver = Solver(sf.cfg, net.learnable)
    it = [0]

    def step():
        net.zero_grad()
        net.forward()
        net.backward()
        solver.step(it[0])
        it[0] += 1
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--threads", type=int, help="BLAS threads of the LeNet step (default: every core, as netdsl "
                    "train); fewer leave a core to the prefetch thread")
    args = ap.parse_args()
    from netdsl.cpu.threads import set_threads
    set_threads(args.threads, False)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        layers = make_files(d, args.images)
        print(f"## each layer alone: images/s (batch 64, {args.batches} batches)\n")
        print("| layer | prefetch off | prefetch on |\n|---|---:|---:|")
        for name, layer in layers.items():
            if name.startswith("MNIST"):
                print(f"| {name} | {layer_alone(d, layer, args.batches, False):,.0f} | (no prefetch) |")
                continue
            off, on = (layer_alone(d, layer, args.batches, p) for p in (False, True))
            print(f"| {name} | {off:,.0f} | {on:,.0f} |")
        variants = {"MNIST (in memory)": (layers["MNIST (in memory)"], False)}
        for name in ("ImageData, PNG files", "Data, LMDB of raw Datums"):
            for p in (True, False):
                variants[f"{name}, prefetch {'on' if p else 'off'}"] = (layers[name], p)
        steps = {k: stepper(d, *v) for k, v in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for k, step in steps.items():
            for _ in range(5):
                step()
        for _ in range(args.blocks):
            for k, step in steps.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[k].append((time.perf_counter() - t) / args.steps * 1000)
        base = statistics.median(times["MNIST (in memory)"])
        print(f"\n## LeNet training step, ms (median of {args.blocks} blocks of {args.steps})\n")
        print("| data layer | ms / step | vs MNIST in memory |\n|---|---:|---:|")
        for k, ts in times.items():
            m = statistics.median(ts)
            print(f"| {k} | {m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
