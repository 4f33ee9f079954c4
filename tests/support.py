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
