"""Test support shared by several test files: where the shared MNIST copy is, and eager
training iterations (the oracle for the compiled GPU step)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from netdsl.data.mnist import verify_mnist

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """A directory holding a valid mnist/: $NETDSL_DATA, else ../shared/data beside the checkout."""
    for base in (os.environ.get("NETDSL_DATA"), ROOT.parent / "shared" / "data"):
        if base and (Path(base) / "mnist").is_dir() and not verify_mnist(Path(base) / "mnist"):
            return Path(base)
    return None


needs_mnist = pytest.mark.skipif(shared_data_dir() is None, reason="MNIST not found (set NETDSL_DATA)")


def eager_iterations(tr, n: int) -> list[float]:
    """n iterations of a Trainer's eager loop body; the losses."""
    losses = []
    for _ in range(n):
        tr.net.zero_grad()
        tr.net.forward()
        losses.append(tr.net.loss())
        tr.net.backward()
        tr.solver.step(tr.iter)
        tr.iter += 1
    return losses


# The deploy nets compared with independent runtimes (OpenCV 4, onnxruntime): (file under
# shared/reference, input shape: small where the net allows, to keep the test fast)
DEPLOY_NETS = [
    ("caffe/examples_mnist_lenet.prototxt", (1, 1, 28, 28)),
    ("caffe/models_bvlc_alexnet_deploy.prototxt", (1, 3, 227, 227)),
    ("caffe/models_bvlc_googlenet_deploy.prototxt", (1, 3, 224, 224)),
    ("real/KaimingHe+deep-residual-networks__prototxt_ResNet-50-deploy.prototxt", (1, 3, 224, 224)),
    ("real/shicai+MobileNet-Caffe__mobilenet_deploy.prototxt", (1, 3, 96, 96)),
    ("real/soeaver+caffe-model__cls_inception_deploy_inception-v3.prototxt", (1, 3, 139, 139)),
    ("real/shelhamer+fcn.berkeleyvision.org__voc-fcn8s_deploy.prototxt", (1, 3, 64, 64)),
    ("real/CMU-Perceptual-Computing-Lab+openpose__models_pose_coco_pose_deploy_linevec.prototxt", (1, 3, 32, 32)),
    ("real/kpzhang93+MTCNN_face_detection_alignment__code_codes_MTCNNv1_model_det1.prototxt", (1, 3, 24, 24)),
]
