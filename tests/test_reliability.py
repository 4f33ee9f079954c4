"""Bad input found by attacking netdsl as a careless or hostile user would (issue 14): each gets a
clear, located error and exit 2, never a traceback or a silently wrong result."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

import netdsl
from netdsl.cli import main
from netdsl.errors import NetdslError

ROOT = Path(__file__).resolve().parents[1]
IN = 'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {} }} }} }}\n'


def run(*argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert "Traceback" not in err.getvalue()
    return code, err.getvalue()


def net(tmp_path, text) -> Path:
    p = tmp_path / "n.net"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, bad", [
    (IN.format("dim: 2 dim: -4 dim: 8 dim: 8"), "-4"),
    ('input: "x" input_dim: 1 input_dim: 0 input_dim: 2 input_dim: 2\n', "0"),
    (IN.format("dim: 2 dim: 3") + 'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 5000000000 } }\n', "5000000000"),
    ('layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 3 dim: -1 } } }\n', "-1"),
])
def test_dimensions_must_be_positive_integers_that_fit(tmp_path, text, bad):
    code, err = run("check", net(tmp_path, text))
    assert code == 2 and "error[E0505]" in err and f"has dimension {bad}:" in err


@pytest.mark.parametrize("shapes", [{"x": (-1, 3)}, {"x": (2.5, 3)}, {"x": "2,3"}])
def test_api_shapes_must_be_positive_integers(tmp_path, shapes):
    p = net(tmp_path, 'layer { name: "in" type: "Input" top: "x" }\n')
    with pytest.raises(NetdslError) as e:
        netdsl.load(str(p), phase="test", shapes=shapes)
    assert e.value.diagnostic.code == "E0504"


def test_unknown_phase_is_an_error(tmp_path):
    with pytest.raises(NetdslError, match="unknown phase 'BOGUS'"):
        netdsl.load(str(net(tmp_path, IN.format("dim: 1"))), phase="bogus")


def test_layers_with_params_may_not_share_a_name(tmp_path):
    p = net(tmp_path, IN.format("dim: 2 dim: 3")
            + 'layer { name: "a" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 5 } }\n'
            + 'layer { name: "a" type: "InnerProduct" bottom: "y" top: "z" inner_product_param { num_output: 5 } }\n')
    code, err = run("check", p)
    assert code == 2 and "error[E0214]: two layers with params are named 'a'" in err


def test_a_nul_in_a_layer_name_is_refused(tmp_path):
    code, err = run("check", net(tmp_path, IN.replace('name: "in"', 'name: "i\\0n"').format("dim: 1")))
    assert code == 2 and "error[E0215]" in err


def test_flatten_end_axis_before_axis_is_refused(tmp_path):
    p = net(tmp_path, IN.format("dim: 2 dim: 3 dim: 4 dim: 5")
            + 'layer { name: "f" type: "Flatten" bottom: "x" top: "y" flatten_param { axis: 3 end_axis: 1 } }\n')
    code, err = run("check", p)
    assert code == 2 and "error[E0220]" in err and "end_axis 1 (axis 1) comes before axis 3" in err


def solver(tmp_path, **fields) -> Path:
    cfg = {"net": f'"{ROOT / "nets" / "lenet.net"}"', "base_lr": 0.01, "lr_policy": '"fixed"', "max_iter": 1,
           "display": 0, "snapshot_prefix": f'"{tmp_path / "run" / "x"}"'}
    cfg.update(fields)
    p = tmp_path / "solver.net"
    p.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return p


@pytest.mark.parametrize("fields, word", [
    ({"base_lr": "nan"}, "base_lr must be a finite number"),
    ({"base_lr": "inf"}, "base_lr must be a finite number"),
    ({"base_lr": -0.1}, "base_lr must be >= 0"),
    ({"type": '"AdaGrad"', "delta": 0}, "delta must be > 0"),
    ({"max_iter": -5}, "max_iter must be >= 0"),
    ({"display": -1}, "display must be >= 0"),
])
def test_solver_values_caffe_or_the_math_refuse(tmp_path, fields, word):
    code, err = run("check", solver(tmp_path, **fields))
    assert code == 2 and word in err


def test_cli_counts_must_make_sense(tmp_path):
    s = solver(tmp_path)
    code, err = run("train", s, "--max-iter", "-5")
    assert code == 2 and "--max-iter must be >= 0" in err
    code, err = run("test", ROOT / "nets" / "lenet.net", "--weights", "w.npz", "--iterations", "0")
    assert code == 2 and "--iterations must be at least 1" in err


def test_non_regular_files_are_never_read(tmp_path):
    code, err = run("check", "/dev/zero")
    assert code == 2 and "is not a regular file" in err
    code, err = run("check", tmp_path)
    assert code == 2 and "is not a regular file" in err
    p = net(tmp_path, IN.format("dim: 1 dim: 3"))
    code, err = run("check", p, "--weights", tmp_path)
    assert code == 2 and "is not a regular file" in err


@pytest.mark.parametrize("make, words", [
    (lambda p, np: p.write_bytes(b"PK\x03\x04broken"), "cannot read weights"),          # a truncated .npz
    (lambda p, np: np.save(p, np.zeros(3)) or p.with_suffix(".npz.npy").rename(p), "single .npy array"),
    (lambda p, np: np.savez(p, **{"in/0": np.array(["a", "b"])}), "not numbers"),
])
def test_odd_weight_files_are_clear_errors(tmp_path, make, words):
    import numpy as np
    w = tmp_path / "w.npz"
    make(w, np)
    code, err = run("check", net(tmp_path, IN.format("dim: 1 dim: 3")), "--weights", w)
    assert code == 2 and words in err


def test_damaged_solver_states_are_refused(tmp_path):
    import numpy as np
    s = solver(tmp_path)
    for i, state in enumerate(({"weights": np.array("w.npz")}, {"iter": np.array("10"), "weights": np.array("w.npz")},
                               {"iter": np.array(-3), "weights": np.array("w.npz")})):
        path = tmp_path / f"s{i}.solverstate.npz"
        np.savez(path, **state)
        code, err = run("train", s, "--snapshot", path)
        assert code == 2 and "error[E0705]" in err, err


API_NET = IN.format("dim: 2 dim: 3").replace('top: "x"', 'top: "x" top: "label"').replace(
    "shape { dim: 2 dim: 3 }", "shape { dim: 2 dim: 3 } shape { dim: 2 }") + \
    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" }\n'


@pytest.mark.parametrize("inputs, words", [
    ({"x": [[1, 2, 3]], "label": [0, 1]}, "has shape (1, 3), but the net was checked with (2, 3)"),
    ({"x": "abc", "label": [0, 1]}, "not an array of numbers"),
    ({"x": None, "label": [0, 1]}, "has shape ()"),
    ({"x": [[1, 2, 3]] * 2, "label": [0, 1], "lable": [1, 1]}, "'lable', which the net does not take"),
    ({"x": [[1, 2, 3]] * 2, "label": [-1, 1]}, "label -1 (position 0 of 'label') is not a class in [0, 3)"),
    ({"x": [[1, 2, 3]] * 2, "label": [0.5, 1]}, "label 0.5"),
])
def test_api_forward_inputs_are_checked(tmp_path, inputs, words):
    net_ = netdsl.load(str(net(tmp_path, API_NET)), phase="test")
    with pytest.raises(NetdslError) as e:
        net_.forward(**inputs)
    assert words in e.value.diagnostic.message


@pytest.mark.parametrize("dtype", ["banana", "int8", "complex64"])
def test_api_dtype_must_be_a_float_type(tmp_path, dtype):
    with pytest.raises(NetdslError, match="float32 or float64"):
        netdsl.load(str(net(tmp_path, API_NET)), phase="test", dtype=dtype)


def test_api_backward_needs_a_forward_each_time(tmp_path):
    net_ = netdsl.load(str(net(tmp_path, API_NET)), phase="train")
    with pytest.raises(NetdslError, match="backward\\(\\) needs a forward\\(\\) first"):
        net_.backward()
    net_.forward(x=[[1, 2, 3]] * 2, label=[0, 2])
    net_.backward()
    with pytest.raises(NetdslError, match="one backward per forward"):
        net_.backward()


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    from netdsl.files import write_atomic
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.part"))


def test_a_type_or_field_of_the_wrong_kind_is_one_error(tmp_path):
    code, err = run("check", net(tmp_path, 'layer { name: "a" type: 123 }\n'))
    assert code == 2 and err.count("error[") == 1 and "`type` expects a quoted string" in err
    code, err = run("check", net(tmp_path, IN.format("dim: 1 dim: 3")
                                 + 'layer { name: "f" type: "InnerProduct" bottom: "x" top: "y" '
                                 'inner_product_param { num_output { } } }\n'))
    assert code == 2 and err.count("error[") == 1 and "`num_output` expects an integer, got a message" in err
