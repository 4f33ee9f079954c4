"""Golden diagnostics: every tests/diagnostics/NAME.net is checked with `netdsl check NAME.net [args]`
from inside tests/diagnostics, and its stderr must equal NAME.expected exactly.

Arguments come from a first-line comment `# args: --phase train --shape data=1,3,32,32`; a case
whose first line is `# exit: 0` expects success (warnings only), otherwise exit code 2.
Regenerate the expected files after an intended change with

    NETDSL_UPDATE_GOLDEN=1 python -m pytest tests/test_diagnostics.py

and review the diff.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from netdsl.cli import main

HERE = Path(__file__).parent / "diagnostics"
CASES = sorted(p.name for p in HERE.glob("*.net")) + sorted(p.name for p in HERE.glob("*.prototxt"))
UPDATE = os.environ.get("NETDSL_UPDATE_GOLDEN") == "1"
HEAD = re.compile(r"(?:\S+:\d+:\d+: )?(error|warning)\[")


def header(path: Path) -> tuple[list[str], int]:
    """The case's CLI arguments and expected exit code, from its leading comment lines."""
    args, code = [], 2
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*(args|exit):(.*)", line)
        if not m:
            break
        if m.group(1) == "args":
            args += shlex.split(m.group(2))
        else:
            code = int(m.group(2))
    return args, code


def run_case(name: str) -> tuple[int, str, str]:
    args, _ = header(HERE / name)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", name, *args])
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    code, _, err = run_case(name)
    _, want_code = header(HERE / name)
    expected = HERE / (Path(name).stem + ".expected")
    if UPDATE:
        expected.write_text(err)
    assert expected.exists(), f"no {expected.name}; run with NETDSL_UPDATE_GOLDEN=1 to create it"
    assert err == expected.read_text()
    assert code == want_code, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("name", CASES)
def test_golden_errors_are_located_and_helped(name):
    """Every error names file:line:col, quotes the line with a caret, and ends with a help line."""
    code, _, err = run_case(name)
    blocks: list[str] = []
    for line in err.splitlines():
        if HEAD.match(line) or re.match(r"\d+ (error|warning)", line):
            blocks.append(line)
        elif blocks:
            blocks[-1] += "\n" + line
    errors = [b for b in blocks if HEAD.match(b) and HEAD.match(b).group(1) == "error"]
    if code == 2:
        assert errors, err
    for b in errors:
        assert re.match(r"[^\s:]+:\d+:\d+: error\[[EW]\d{4}\]: ", b), b
        assert "\n  |" in b or re.search(r"\n\s+\|", b), b           # the quoted source line
        assert "^" in b, b
        assert re.search(r"= help: \S", b.splitlines()[-1]), b


def test_enough_cases():
    assert len(CASES) >= 30


def test_every_expected_has_a_case():
    stems = {Path(c).stem for c in CASES}
    orphans = [p.name for p in HERE.glob("*.expected") if p.stem not in stems]
    assert not orphans
