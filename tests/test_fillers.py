"""Fillers: Caffe's initialisers, their statistics and seeding."""
from __future__ import annotations

import math

import numpy as np
import pytest

from netdsl.fillers import fill
from netdsl.registry import filler_record


def draw(shape=(64, 32, 3, 3), seed=0, **kw):
    return fill(filler_record(**kw), shape, np.random.default_rng(seed))


def test_constant_and_default_zero():
    assert (draw(type="constant", value=0.25) == 0.25).all()
    assert (fill(None, (3, 2), np.random.default_rng(0)) == 0).all()


def test_uniform_range_and_mean():
    x = draw(type="uniform", min=-2.0, max=3.0)
    assert x.min() >= -2 and x.max() < 3
    assert x.mean() == pytest.approx(0.5, abs=0.05)


def test_gaussian_moments_and_sparse():
    x = draw(type="gaussian", mean=1.0, std=0.5)
    assert x.mean() == pytest.approx(1.0, abs=0.02) and x.std() == pytest.approx(0.5, abs=0.02)
    # Caffe: each weight survives with probability sparse / num_outputs (shape[0])
    s = draw(shape=(100, 400), type="gaussian", std=1.0, sparse=20)
    assert (s != 0).mean() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 32 * 9), ("FAN_OUT", 64 * 9), ("AVERAGE", (32 * 9 + 64 * 9) / 2)])
def test_xavier_scale(norm, n):
    x = draw(type="xavier", variance_norm=norm)
    a = math.sqrt(3.0 / n)
    assert np.abs(x).max() <= a
    assert x.std() == pytest.approx(a / math.sqrt(3), rel=0.03)       # U(-a, a) has std a / sqrt(3)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 32 * 9), ("FAN_OUT", 64 * 9), ("AVERAGE", (32 * 9 + 64 * 9) / 2)])
def test_msra_scale(norm, n):
    x = draw(type="msra", variance_norm=norm)
    assert x.mean() == pytest.approx(0.0, abs=0.01)
    assert x.std() == pytest.approx(math.sqrt(2.0 / n), rel=0.03)


def test_positive_unitball_rows_sum_to_one():
    x = draw(shape=(10, 4, 2, 2), type="positive_unitball")
    assert (x >= 0).all()
    np.testing.assert_allclose(x.reshape(10, -1).sum(axis=1), 1.0, rtol=1e-6)


def test_bilinear_kernel_matches_caffe():
    # Caffe's bilinear filler for a 4x4 kernel (factor 2 upsampling): outer product of [.25 .75 .75 .25]
    x = draw(shape=(1, 1, 4, 4), type="bilinear")
    v = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(x[0, 0], np.outer(v, v), rtol=1e-6)


def test_seeded_and_float32():
    a, b = draw(type="xavier", seed=3), draw(type="xavier", seed=3)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, draw(type="xavier", seed=4))
