"""Atomic writes: a failure mid-write keeps the old file and leaves no temporary behind."""
from __future__ import annotations

import pytest

from netdsl.files import write_atomic


def test_replaces_the_file(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"old")
    write_atomic(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new"
    assert [x.name for x in tmp_path.iterdir()] == ["w.bin"]


def test_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"old")

    def explode(f):
        f.write(b"half")
        raise KeyboardInterrupt          # Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, explode)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["w.bin"]
