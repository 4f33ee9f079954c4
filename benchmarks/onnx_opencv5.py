"""Do the ONNX files netdsl exports load in OpenCV 5 (which removed the Caffe importer) and give
netdsl's outputs? OpenCV 5 and the OpenCV 4 that the tests use cannot share an environment, so this
exports here and runs OpenCV 5 in another Python (a venv with `pip install "opencv-python-headless>=5"`):

    python benchmarks/onnx_opencv5.py --opencv5-python /path/to/venv/bin/python [--dir /tmp/onnx5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
REFERENCE = ROOT.parent / "shared" / "reference"
NETS = [("caffe/examples_mnist_lenet.prototxt", (2, 1, 28, 28)),
        ("caffe/models_bvlc_alexnet_deploy.prototxt", (2, 3, 227, 227)),
        ("caffe/models_bvlc_googlenet_deploy.prototxt", (2, 3, 224, 224)),
        ("real/KaimingHe+deep-residual-networks__prototxt_ResNet-50-deploy.prototxt", (2, 3, 224, 224))]

CHILD = r"""
import json, sys
import cv2, numpy as np
out = {}
for name in json.loads(sys.argv[1]):
    d = np.load(sys.argv[2] + "/" + name + ".npz")
    try:
        net = cv2.dnn.readNetFromONNX(sys.argv[2] + "/" + name + ".onnx")
        net.setInput(d["x"])
        got = net.forward()
        want = d["y"]
        out[name] = {"max_rel_err": float(np.abs(got.reshape(want.shape) - want).max() / np.abs(want).max())}
    except Exception as e:                       # report what OpenCV 5 lacks, per net
        out[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
print(json.dumps({"opencv": cv2.__version__, "nets": out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opencv5-python", required=True, help="a Python whose cv2 is OpenCV 5")
    ap.add_argument("--dir", default="/tmp/netdsl-onnx5")
    a = ap.parse_args()
    from test_onnx_export import random_weights

    from netdsl.executor import build_net
    from netdsl.onnx_export import export
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for rel, shape in NETS:
        path = REFERENCE / rel
        name = path.stem.split("__")[-1]
        shaped_net = build_net(str(path), "TEST", hints={next(iter(build_net(str(path), "TEST").plan.inputs)): shape})
        random_weights(shaped_net, np.random.default_rng(0))
        export(shaped_net, str(out / f"{name}.onnx"))
        x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
        y = shaped_net.forward(**{shaped_net.plan.inputs[0]: x})
        np.savez(out / f"{name}.npz", x=x, y=next(iter(y.values())))
        names.append(name)
    r = subprocess.run([a.opencv5_python, "-c", CHILD, json.dumps(names), str(out)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"OpenCV {result['opencv']} readNetFromONNX on netdsl's exports (random weights, batch 2):")
    for name, res in result["nets"].items():
        print(f"  {name:<48} " + (f"max relative error {res['max_rel_err']:.2e}" if "max_rel_err" in res
                                   else f"FAILED: {res['error']}"))


if __name__ == "__main__":
    main()
