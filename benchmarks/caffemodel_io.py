"""Reading and writing Caffe weights: VGG-16's 138 M params (a .caffemodel of about 528 MB written by
netdsl from random weights), netdsl side by side with OpenCV 4's Caffe importer on the same file.
Each measurement runs in a fresh process, so its peak RSS is its own: reported as the extra memory
over the process before the call, as a multiple of the file's size.

    python benchmarks/caffemodel_io.py [--runs 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONV = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]     # VGG-16: (channels, convs) per stage


def vgg16_prototxt() -> str:
    lines = ['name: "VGG_ILSVRC_16_layers"',
             'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }']
    bottom = "data"
    for s, (c, n) in enumerate(CONV, 1):
        for k in range(1, n + 1):
            name = f"conv{s}_{k}"
            lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                         f'convolution_param {{ num_output: {c} pad: 1 kernel_size: 3 }} }}')
            lines.append(f'layer {{ name: "relu{s}_{k}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            bottom = name
        lines.append(f'layer {{ name: "pool{s}" type: "Pooling" bottom: "{bottom}" top: "pool{s}" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }')
        bottom = f"pool{s}"
    for name, n in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        lines.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                     f'inner_product_param {{ num_output: {n} }} }}')
        bottom = name
    return "\n".join(lines) + "\n"


def vgg16_files(directory: Path) -> tuple[Path, Path]:
    """VGG-16's deploy prototxt and a .caffemodel of random weights for it (made once, then reused)."""
    import numpy as np

    from netdsl import syntax
    from netdsl.check import check
    from netdsl.weights import write_caffemodel
    net, model = directory / "vgg16_deploy.prototxt", directory / "vgg16_random.caffemodel"
    net.write_text(vgg16_prototxt())
    if not model.exists():
        shaped = check(syntax.parse(net.read_text(), str(net)), phase="TEST")
        rng = np.random.default_rng(0)
        layers = {n.name: (n.layer.type, [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shaped.params(n)])
                  for n in shaped.graph.nodes if shaped.params(n)}
        write_caffemodel(str(model), layers)
    return net, model


CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
what, net, model = sys.argv[1:4]
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if what == "netdsl-read":
    from netdsl.weights import read_weights
    import netdsl.caffe_pb as pb; pb.messages()
    base = rss(); t = time.perf_counter(); w = read_weights(model); dt = time.perf_counter() - t
    n = sum(a.size for blobs in w.layers.values() for a in blobs)
elif what == "opencv-read":
    import cv2
    base = rss(); t = time.perf_counter(); m = cv2.dnn.readNetFromCaffe(net, model); dt = time.perf_counter() - t
    n = 0
elif what == "netdsl-write":
    from netdsl.weights import write_caffemodel, read_weights
    w = read_weights(model)
    layers = {{k: ("", v) for k, v in w.layers.items()}}
    base = rss(); t = time.perf_counter(); write_caffemodel(model + ".out", layers); dt = time.perf_counter() - t
    n = 0
print(json.dumps({{"seconds": dt, "extra_bytes": rss() - base, "values": n}}))
"""


def run(what: str, net: Path, model: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), what, str(net), str(model)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    net, model = vgg16_files(Path(a.dir))
    size = os.path.getsize(model)
    print(f"VGG-16 .caffemodel: {size / 1e6:.0f} MB")
    for what in ("netdsl-read", "opencv-read", "netdsl-write"):
        try:
            rs = [run(what, net, model) for _ in range(a.runs)]
        except subprocess.CalledProcessError as e:
            print(f"  {what:<13} failed: {e.stderr.strip().splitlines()[-1] if e.stderr else e}")
            continue
        t = statistics.median(r["seconds"] for r in rs)
        mem = statistics.median(r["extra_bytes"] for r in rs) / size
        extra = f"; {rs[0]['values'] / 1e6:.1f} M values" if rs[0]["values"] else ""
        print(f"  {what:<13} {t:6.2f} s (median of {a.runs}), extra memory {mem:.2f}x the file{extra}")


if __name__ == "__main__":
    main()
