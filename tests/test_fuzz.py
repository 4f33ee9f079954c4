"""Property tests: mutated real nets (tokens deleted, duplicated, swapped or replaced, numbers
changed, files cut short) never crash the checker. Every outcome is exit 0, or exit 2 with located
diagnostics; never exit 1 (an internal error).

NETDSL_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py   # a longer hunt
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netdsl.cli import main
from netdsl.errors import render

REPO = Path(__file__).parents[1]
REFERENCE = Path(__file__).parents[2] / "shared" / "reference"
EXAMPLES = int(os.environ.get("NETDSL_FUZZ_EXAMPLES", "150"))

# (file, extra CLI arguments that make the unmutated file check clean)
SOURCES: list[tuple[Path, list[str]]] = [(p, []) for p in sorted((REPO / "nets").glob("*.net"))]
SOURCES += [(p, []) for p in sorted((REPO / "tests" / "diagnostics").glob("*.net"))][::4]
_HINTS = {"cifar10_quick_train_test": "data=100,3,32,32", "lenet_train_test": "data=64,1,28,28",
          "caffenet_train_val": "data=256,3,227,227", "faster_rcnn_end2end_train": "data=1,3,600,1000",
          "stage1_rpn_train": "data=1,3,600,1000"}
if REFERENCE.is_dir():
    for p in sorted(REFERENCE.rglob("*")):
        if p.suffix in (".prototxt", ".pt"):
            hint = next((h for k, h in _HINTS.items() if k in p.name), None)
            SOURCES.append((p, ["--shape", hint] if hint else []))
TEXTS = {p: p.read_text() for p, _ in SOURCES}

TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|[A-Za-z_][\w.]*"""
                   r"""|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|.""", re.DOTALL)
NUMBERS = ["0", "-1", "1", "2", "3", "7", "16", "1000", "2.5", "-5", "1e9", "0x10", "99999999", "-0"]
WORDS = ["layer", "{", "}", ":", "top", "bottom", '"data"', '"conv1"', "MAX", "true", "[", "]", ",", "-", '"',
         "num_output", "kernel_size", "include", "phase", "TRAIN", "dim", "type", '"Reshape"', '"Python"',
         '"Concat"', '"Eltwise"', "reshape_param", "shape", "pad", "stride", "group", "axis", "scales"]

WORKDIR = Path(tempfile.mkdtemp(prefix="netdsl-fuzz-"))
atexit.register(shutil.rmtree, WORKDIR, True)
shutil.copy(REPO / "nets" / "lenet.net", WORKDIR / "lenet.net")       # lenet_solver.net's net


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutants(draw):
    path, args = draw(st.sampled_from(SOURCES))
    toks = tokens(TEXTS[path])
    solid = [i for i, t in enumerate(toks) if not t.isspace() and not t.startswith("#")]
    for _ in range(draw(st.integers(1, 3))):
        if not solid:
            break
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "replace", "truncate"]))
        i = solid[draw(st.integers(0, len(solid) - 1))]
        if kind == "delete":
            toks[i] = ""
        elif kind == "duplicate":
            toks[i] = toks[i] + " " + toks[i]
        elif kind == "swap":
            j = solid[draw(st.integers(0, len(solid) - 1))]
            toks[i], toks[j] = toks[j], toks[i]
        elif kind == "number":
            nums = [k for k in solid if re.fullmatch(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?", toks[k])]
            if nums:
                toks[nums[draw(st.integers(0, len(nums) - 1))]] = draw(st.sampled_from(NUMBERS))
        elif kind == "replace":
            toks[i] = draw(st.sampled_from(WORDS + [toks[k] for k in solid[:200]]))
        else:
            toks = toks[:i]
            solid = [k for k in solid if k < i]
    if args and draw(st.booleans()):           # unknown (?) or odd dims in the --shape hint
        blob, dims = args[1].split("=")
        dims = [draw(st.sampled_from([d, "?", "1", "2", "3"])) for d in dims.split(",")]
        dims = dims[:draw(st.integers(1, len(dims)))] if draw(st.booleans()) else dims
        args = ["--shape", f"{blob}={','.join(dims)}"]
    phase = draw(st.sampled_from([[], ["--phase", "train"], ["--phase", "test"]]))
    return path, "".join(toks), args + phase


def run_check(text: str, name: str, args: list[str]) -> tuple[int, str, str]:
    target = WORKDIR / name
    target.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(target), *args, "--json"])
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutants())
def test_mutated_nets_never_crash(case):
    path, text, args = case
    code, out, err = run_check(text, path.name, args)
    assert code in (0, 2), f"exit {code} on a mutant of {path.name} {args}:\n{err}\n--- text ---\n{text}"
    result = json.loads(out)
    assert result["ok"] == (code == 0)
    errors = [d for d in result["diagnostics"] if d["severity"] == "error"]
    if code == 2:
        assert errors, result
    for d in errors:
        assert d["file"] and d["line"] and d["column"], d
        assert d["help"], d
    # the text rendering of the same diagnostics works too (it quotes the source line)
    for d in result["diagnostics"]:
        assert d["message"] in render(_diag(d))


def _diag(d):
    from netdsl.errors import Diagnostic, Pos
    pos = Pos(d["file"], d["line"], d["column"]) if d["file"] else None
    return Diagnostic(d["code"], d["message"], pos, d["severity"], d.get("notes", []), d["help"])


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    deep = tmp_path / "deep.net"
    deep.write_text("a { " * 5000 + "}" * 5000)
    code, out, _ = run_check(deep.read_text(), "deep.net", [])
    diagnostics = json.loads(out)["diagnostics"]
    assert code == 2 and diagnostics and all(d["line"] for d in diagnostics)


# ------------------------------------------------------------------ mutations with a known verdict
# Not only "no crash": these mutations of LeNet have one right answer each, and a wrong success
# (exit 0) or the wrong error fails the test.
LENET_TEXT = (REPO / "nets" / "lenet.net").read_text()
_BOTTOMS = [m for m in re.finditer(r'bottom: "(\w+)"', LENET_TEXT)]
_NUM_OUTPUTS = [m for m in re.finditer(r"num_output: (\d+)", LENET_TEXT)]
_BRACES = [m for m in re.finditer(r"\}", LENET_TEXT)]


@st.composite
def known_verdicts(draw):
    kind = draw(st.sampled_from(["bottom", "num_output", "brace", "pool"]))
    t = LENET_TEXT
    if kind == "bottom":                       # a bottom renamed to a blob nobody makes: E0210
        m = draw(st.sampled_from(_BOTTOMS))
        name = draw(st.text("xyzq", min_size=3, max_size=6))
        return t[:m.start(1)] + name + t[m.end(1):], "E0210"
    if kind == "num_output":                   # zero or negative: E0107; beyond 2^31: E0505
        m = draw(st.sampled_from(_NUM_OUTPUTS))
        v = draw(st.sampled_from(["0", "-3", "3000000000"]))
        return t[:m.start(1)] + v + t[m.end(1):], "E0505" if v == "3000000000" else "E0107"
    if kind == "brace":                        # a closing brace dropped: a syntax error
        m = draw(st.sampled_from(_BRACES))
        return t[:m.start()] + t[m.end():], "E0001/E0002"
    k = draw(st.integers(30, 60))              # a pooling window past Caffe's arithmetic: E0401
    return t.replace("kernel_size: 2", f"kernel_size: {k}", 1), "E0401"


@settings(max_examples=max(EXAMPLES // 3, 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(known_verdicts())
def test_mutations_with_a_known_verdict_get_it(case):
    """Checked in both phases (a mutated layer may live in one only): the verdict must come."""
    text, codes = case
    path = WORKDIR / "verdict.net"
    path.write_text(text)
    found = []
    for phase in ("train", "test"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["check", str(path), "--phase", phase, "--json"])
        assert rc in (0, 2)
        found += [d["code"] for d in json.loads(out.getvalue())["diagnostics"] if d["severity"] == "error"]
    assert set(codes.split("/")) & set(found), f"expected {codes}, got {found or 'a success'}"
