"""PyTorch twins of the nets benchmarks/lenet_cpu.py times: Caffe's LeNet, Caffe's cifar10_quick
and nets/rpn.net's trainable part, with Caffe's solver (SGD with per-param lr_mult and decay_mult,
netdsl's own learning-rate schedule) and the RPN's two losses. Each module attribute is named
after its netdsl layer ('/' as '_'), so `copy_params` can give a twin the netdsl net's weights.

Benchmark peers only: netdsl never imports torch at run time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet(nn.Module):
    """nets/lenet.net: conv 20, max pool, conv 50, max pool, ip 500, ReLU, ip 10."""
    outputs = ("ip2",)

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2, 2)
        x = F.max_pool2d(self.conv2(x), 2, 2)
        return self.ip2(F.relu(self.ip1(x.flatten(1))))


class Cifar10Quick(nn.Module):
    """Caffe's examples/cifar10/cifar10_quick_train_test.prototxt. Caffe's pooling rounds its output
    size up (ceil_mode), and its average divides by the window clipped to the padded input, which is
    PyTorch's count_include_pad rule."""
    outputs = ("ip2",)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1, self.ip2 = nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        return self.ip2(self.ip1(x.flatten(1)))


class DigitRPN(nn.Module):
    """nets/rpn.net's convolutions: the stride-8 trunk (dilations 1, 2, 4) and the RPN head; returns
    the score map (1, 2A, H, W) and the box deltas (1, 4A, H, W)."""
    outputs = ("rpn_cls_score", "rpn_bbox_pred")

    def __init__(self, anchors: int = 21):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv5 = nn.Conv2d(64, 64, 3, padding=2, dilation=2)
        self.conv6 = nn.Conv2d(64, 64, 3, padding=4, dilation=4)
        self.rpn_conv_3x3 = nn.Conv2d(64, 64, 3, padding=1)
        self.rpn_cls_score = nn.Conv2d(64, 2 * anchors, 1)
        self.rpn_bbox_pred = nn.Conv2d(64, 4 * anchors, 1)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, self.rpn_conv_3x3):
            x = F.relu(conv(x))
        return self.rpn_cls_score(x), self.rpn_bbox_pred(x)


def rpn_losses(score, deltas, labels, targets, inside, outside, sigma: float = 3.0):
    """nets/rpn.net's two losses, as netdsl's layers compute them: SoftmaxWithLoss over the score
    map reshaped to (1, 2, A*H, W) with ignore_label -1 and normalize (the mean over the labelled
    anchors), and caffe-fast-rcnn's SmoothL1Loss sum(w_out * f(w_in * (x - t))) / N."""
    n, _, h, w = score.shape
    cls = F.cross_entropy(score.view(n, 2, -1, w), labels.view(n, -1, w).long(), ignore_index=-1)
    d = inside * (deltas - targets)
    s2 = sigma * sigma
    ad = d.abs()
    f = torch.where(ad < 1.0 / s2, 0.5 * s2 * d * d, ad - 0.5 / s2)
    return cls, (outside * f).sum() / n


def module_of(model: nn.Module, layer: str) -> nn.Module:
    return getattr(model, layer.replace("/", "_"))


def copy_params(model: nn.Module, net) -> None:
    """Give the twin a netdsl Net's current weights (Caffe's blob layouts are PyTorch's)."""
    with torch.no_grad():
        for layer, blobs in net.params.items():
            m = module_of(model, layer)
            for p, blob in zip((m.weight, m.bias), blobs):
                p.copy_(torch.from_numpy(blob.data.reshape(tuple(p.shape))))


def caffe_sgd(model: nn.Module, net, cfg, tensor_lr: bool = False):
    """Caffe's SGD for the twin: one param group per blob with base_lr x lr_mult and weight_decay x
    decay_mult from the netdsl net's params, momentum, and netdsl's schedule (solver.learning_rate)
    as a LambdaLR. PyTorch keeps the rate out of the momentum history where Caffe folds it in: the
    same update while the rate is constant, within the schedule's drift per step otherwise.
    `tensor_lr` holds the rates in tensors, so a torch.compile'd step does not recompile as they move."""
    from netdsl.solver import learning_rate, resolved_type
    if resolved_type(cfg) != "SGD" or cfg.regularization_type != "L2":
        raise SystemExit(f"the PyTorch peer runs SGD with L2 decay, not {resolved_type(cfg)}/{cfg.regularization_type}")
    groups = []
    for layer, blobs in net.params.items():
        m = module_of(model, layer)
        for p, blob in zip((m.weight, m.bias), blobs):
            lr = cfg.base_lr * blob.lr_mult
            groups.append({"params": [p], "lr": torch.tensor(lr) if tensor_lr else lr,
                           "weight_decay": cfg.weight_decay * blob.decay_mult})
    opt = torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: learning_rate(cfg, it) / cfg.base_lr)
    return opt, sched
