"""Shared fixtures: tests read MNIST from ../shared/data (beside the checkout) when it exists."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if "NETDSL_DATA" not in os.environ and (SHARED_DATA / "mnist").is_dir():
    os.environ["NETDSL_DATA"] = str(SHARED_DATA)


def _have_mnist() -> bool:
    d = os.environ.get("NETDSL_DATA")
    return bool(d) and (Path(d) / "mnist").is_dir()


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="MNIST not found (set NETDSL_DATA)")


@pytest.fixture
def mnist_dir() -> str:
    if not _have_mnist():
        pytest.skip("MNIST not found (set NETDSL_DATA)")
    return os.environ["NETDSL_DATA"]
