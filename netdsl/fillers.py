"""Fillers: Caffe's weight initialisers, drawn on the host from a seeded generator so CPU and GPU
runs start from identical weights."""
from __future__ import annotations

import math

import numpy as np


def _fans(shape) -> tuple[float, float]:
    count = math.prod(shape)
    fan_in = count / shape[0] if shape and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _n(f, shape) -> float:
    fan_in, fan_out = _fans(shape)
    return {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[f.variance_norm]


def fill(f, shape, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """One param blob. f is a FillerParameter record (None: zeros, Caffe's default constant 0)."""
    shape = tuple(int(d) for d in shape)
    if f is None or f.type == "constant":
        return np.full(shape, 0.0 if f is None else f.value, dtype=dtype)
    t = f.type
    if t == "uniform":
        x = rng.uniform(f.min, f.max, shape)
    elif t == "gaussian":
        x = rng.normal(f.mean, f.std, shape)
        if f.sparse >= 0:       # Caffe: keep each weight with probability sparse / num_outputs
            keep = rng.random(shape) < f.sparse / shape[0]
            x = x * keep
    elif t == "positive_unitball":
        x = rng.uniform(0.0, 1.0, shape)
        rows = x.reshape(shape[0], -1)
        x = (rows / rows.sum(axis=1, keepdims=True)).reshape(shape)
    elif t == "xavier":
        a = math.sqrt(3.0 / _n(f, shape))
        x = rng.uniform(-a, a, shape)
    elif t == "msra":
        x = rng.normal(0.0, math.sqrt(2.0 / _n(f, shape)), shape)
    elif t == "bilinear":
        x = _bilinear(shape)
    else:
        raise ValueError(f"unknown filler type {t!r}")
    return x.astype(dtype)


def _bilinear(shape) -> np.ndarray:
    """Caffe's bilinear upsampling kernel for Deconvolution (square kernels)."""
    kh, kw = shape[-2], shape[-1]
    f = math.ceil(kw / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    y, x = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    k = (1 - np.abs(x / f - c)) * (1 - np.abs(y / f - c))
    return np.broadcast_to(k, shape).copy()
