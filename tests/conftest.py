"""Shared fixtures: tests read MNIST from ../shared/data (beside the checkout) when it exists."""
from __future__ import annotations

import os

import pytest
from support import shared_data_dir

if "NETDSL_DATA" not in os.environ and shared_data_dir() is not None:
    os.environ["NETDSL_DATA"] = str(shared_data_dir())


@pytest.fixture
def mnist_dir() -> str:
    d = shared_data_dir()
    if d is None:
        pytest.skip("MNIST not found (set NETDSL_DATA)")
    return str(d)
