"""The reference corpus (real Caffe and py-faster-rcnn files in shared/reference/) parses and checks
clean; the `check --json` schema; `compile`; CLI exit codes, --werror, colour and imports."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netdsl.cli import main
from netdsl.syntax import parse_file

REPO = Path(__file__).parents[1]
REFERENCE = Path(__file__).parents[2] / "shared" / "reference"
LENET = REPO / "nets" / "lenet.net"

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not available")


def corpus() -> list[Path]:
    """BVLC's and py-faster-rcnn's reference files. reference/real/ (real nets from forks) is the
    conformance corpus of the real-nets issues: it needs layers netdsl does not have yet."""
    if not REFERENCE.is_dir():
        return []
    return sorted(p for d in ("caffe", "py-faster-rcnn") for p in (REFERENCE / d).rglob("*")
                  if p.is_file() and p.suffix in (".prototxt", ".pt", ".net"))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def check_json(*argv: str) -> tuple[int, dict]:
    code, out, _ = run("check", *argv, "--json")
    return code, json.loads(out)


# Each net of the corpus, the phases it is meant for, and the --shape its data layers need.
# Nets with Input layers or `input:` fields need no hints; Data and py-faster-rcnn's Python data
# layers read their shapes from --shape.
NETS = {
    "caffe/examples_cifar10_cifar10_quick_train_test.prototxt": (("train", "test"), ["data=100,3,32,32"]),
    "caffe/examples_mnist_lenet.prototxt": (("test",), []),
    "caffe/examples_mnist_lenet_train_test.prototxt": (("train", "test"), ["data=64,1,28,28"]),
    "caffe/models_bvlc_alexnet_deploy.prototxt": (("test",), []),
    "caffe/models_bvlc_googlenet_deploy.prototxt": (("test",), []),
    "caffe/models_bvlc_reference_caffenet_train_val.prototxt": (("train", "test"), ["data=256,3,227,227"]),
    "py-faster-rcnn/models_pascal_voc_VGG16_faster_rcnn_end2end_train.prototxt": (("train",), ["data=1,3,600,1000"]),
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_alt_opt_rpn_test.pt": (("test",), []),
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_alt_opt_stage1_rpn_train.pt": (("train",), ["data=1,3,600,1000"]),
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_end2end_test.prototxt": (("test",), []),
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_end2end_train.prototxt": (("train",), ["data=1,3,600,1000"]),
}
SOLVERS = [
    "caffe/examples_cifar10_cifar10_quick_solver.prototxt",
    "caffe/examples_mnist_lenet_solver.prototxt",
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_alt_opt_stage1_rpn_solver60k80k.pt",
    "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_end2end_solver.prototxt",
]
CASES = [(net, phase, hints) for net, (phases, hints) in NETS.items() for phase in phases]


@needs_reference
def test_corpus_is_fully_classified():
    names = {str(p.relative_to(REFERENCE)) for p in corpus()}
    assert names == set(NETS) | set(SOLVERS)


@needs_reference
@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_every_reference_file_parses(path):
    assert parse_file(path).fields


@needs_reference
@pytest.mark.parametrize("net,phase,hints", CASES, ids=[f"{Path(n).name}-{p}" for n, p, _ in CASES])
def test_reference_net_checks_clean(net, phase, hints):
    argv = [REFERENCE / net, "--phase", phase] + [a for h in hints for a in ("--shape", h)]
    code, out = check_json(*argv)
    errors = [d for d in out["diagnostics"] if d["severity"] == "error"]
    assert code == 0 and out["ok"] and not errors, errors
    assert out["layers"] and out["phase"] == phase
    # every top of every layer has a shape (dims may be null only where the data decides them)
    for layer in out["layers"]:
        for blob, dims in layer["top_shapes"].items():
            assert dims is not None, (layer["name"], blob)


@needs_reference
@pytest.mark.parametrize("net", [n for n, (_, hints) in NETS.items() if hints])
def test_nets_with_data_layers_ask_for_shapes(net):
    code, out = check_json(REFERENCE / net, "--phase", NETS[net][0][0])
    assert code == 2 and not out["ok"]
    codes = {d["code"] for d in out["diagnostics"] if d["severity"] == "error"}
    assert codes == {"E0502"}
    assert all(d["line"] and d["column"] for d in out["diagnostics"])


@needs_reference
def test_alexnet_params_and_output():
    code, out = check_json(REFERENCE / "caffe/models_bvlc_alexnet_deploy.prototxt")
    assert code == 0
    assert out["total_params"] == 60_965_224
    last = out["layers"][-1]
    assert last["name"] == "prob" and last["top_shapes"] == {"prob": [10, 1000]}
    fc6 = next(layer for layer in out["layers"] if layer["name"] == "fc6")
    assert fc6["param_shapes"] == [[4096, 9216], [4096]] and fc6["params"] == 4096 * 9216 + 4096
    assert fc6["macs"] == 10 * 9216 * 4096


@needs_reference
def test_caffenet_matches_alexnet_params():
    code, out = check_json(REFERENCE / "caffe/models_bvlc_reference_caffenet_train_val.prototxt",
                           "--phase", "train", "--shape", "data=256,3,227,227")
    assert code == 0 and out["total_params"] == 60_965_224


@needs_reference
def test_googlenet_output():
    code, out = check_json(REFERENCE / "caffe/models_bvlc_googlenet_deploy.prototxt")
    assert code == 0
    assert out["layers"][-1]["top_shapes"] == {"prob": [10, 1000]}
    assert len(out["layers"]) > 100


@needs_reference
def test_unknown_dims_are_null():
    code, out = check_json(REFERENCE / "py-faster-rcnn/models_pascal_voc_ZF_faster_rcnn_end2end_test.prototxt")
    assert code == 0
    proposal = next(layer for layer in out["layers"] if layer["name"] == "proposal")
    assert proposal["top_shapes"] == {"rois": [None, 5]}


@needs_reference
@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_solvers_name_their_nets(solver):
    """The corpus keeps solvers without their nets' original directory layout, so `check` on them
    validates the solver and then reports the missing net, located at its `net:` field."""
    code, out = check_json(REFERENCE / solver)
    assert code == 2
    [d] = out["diagnostics"]
    assert d["code"] == "E0704" and d["line"] and d["column"] and d["file"].endswith(Path(solver).name)
    assert "net" in d["message"]


# --------------------------------------------------------------------------------- JSON schema

TOP_KEYS = {"ok", "net", "phase", "layers", "total_params", "params_unknown", "total_macs", "diagnostics"}
LAYER_KEYS = {"name", "type", "bottoms", "tops", "top_shapes", "param_shapes", "params", "macs"}
DIAG_KEYS = {"code", "severity", "message", "file", "line", "column", "help"}


def assert_schema(out: dict) -> None:
    assert set(out) == TOP_KEYS
    assert isinstance(out["ok"], bool) and isinstance(out["net"], str) and out["phase"] in ("train", "test")
    assert isinstance(out["total_params"], int) and isinstance(out["total_macs"], int)
    for layer in out["layers"]:
        assert set(layer) == LAYER_KEYS
        assert isinstance(layer["bottoms"], list) and isinstance(layer["tops"], list)
        assert set(layer["top_shapes"]) == set(layer["tops"])
        for dims in layer["top_shapes"].values():
            assert dims is None or all(d is None or isinstance(d, int) for d in dims)
        assert all(isinstance(s, list) for s in layer["param_shapes"])
        assert isinstance(layer["params"], int) and isinstance(layer["macs"], int)
    for d in out["diagnostics"]:
        assert DIAG_KEYS <= set(d) <= DIAG_KEYS | {"notes"}
        assert d["severity"] in ("error", "warning")


def test_json_schema_of_a_clean_net():
    code, out = check_json(LENET, "--phase", "train")
    assert code == 0
    assert_schema(out)
    assert out["ok"] is True and out["net"] == str(LENET) and out["phase"] == "train"
    assert out["total_params"] == 431_080
    conv1 = out["layers"][1]
    assert conv1["name"] == "conv1" and conv1["top_shapes"] == {"conv1": [64, 20, 24, 24]}
    assert conv1["param_shapes"] == [[20, 1, 5, 5], [20]] and conv1["params"] == 520


def test_json_schema_of_errors(tmp_path):
    bad = tmp_path / "bad.net"
    bad.write_text('layer { name: "x" type: "Convolutoin" top: "x" }\n')
    code, out = check_json(bad)
    assert code == 2
    assert_schema(out)
    assert out["ok"] is False and out["layers"] == []
    [d] = out["diagnostics"]
    assert d["code"] == "E0201" and d["line"] == 1 and d["column"] == 19 and d["file"] == str(bad)
    assert "Convolution" in d["help"]


def test_json_with_warnings_and_werror():
    net = REPO / "tests" / "diagnostics" / "warn_unused_top.net"
    code, out = check_json(net)
    assert code == 0 and out["ok"] is True and [d["severity"] for d in out["diagnostics"]] == ["warning"]
    code, out = check_json(net, "--werror")
    assert code == 2 and out["ok"] is False
    assert_schema(out)


# -------------------------------------------------------------------------------- compile & CLI

@pytest.mark.parametrize("emit", ["plan", "json", "dot"])
def test_compile_lenet(emit):
    code, out, err = run("compile", LENET, "--emit", emit)
    assert code == 0, err
    if emit == "json":
        plan = json.loads(out)
        assert plan["name"] == "LeNet" and plan["steps"]
    elif emit == "dot":
        assert out.startswith('digraph "LeNet"') and out.rstrip().endswith("}") and "conv1" in out
    else:
        assert "LeNet" in out and "conv1" in out


def test_exit_codes(tmp_path, monkeypatch):
    assert run("check", LENET)[0] == 0
    bad = tmp_path / "bad.net"
    bad.write_text("layer {\n")
    code, _, err = run("check", bad)
    assert code == 2 and "error[E0002]" in err and "Traceback" not in err
    assert run("check", tmp_path / "missing.net")[0] == 2
    assert run("check", LENET, "--shape", "oops")[0] == 2
    assert run("frobnicate")[0] == 2

    import netdsl.check

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(netdsl.check, "check_path", boom)
    code, _, err = run("check", LENET)
    assert code == 1 and "internal error" in err and "Traceback" not in err


def test_werror_turns_warnings_into_errors():
    net = REPO / "tests" / "diagnostics" / "warn_foreign_param.net"
    code, out, err = run("check", net)
    assert code == 0 and "warning[W0102]" in err and "1 warning generated." in err and out
    code, out, err = run("check", net, "--werror")
    assert code == 2 and "error[W0102]" in err and "1 error generated." in err and not out


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal(monkeypatch):
    from netdsl.check import check_path
    from netdsl.errors import render_all
    monkeypatch.delenv("NO_COLOR", raising=False)
    try:
        check_path(str(REPO / "tests" / "diagnostics" / "unknown_bottom.net"))
    except Exception as e:       # noqa: BLE001 - the NetdslError with the diagnostics
        diags = e.diagnostics
    plain, tty = io.StringIO(), _Tty()
    render_all(diags, plain)
    render_all(diags, tty)
    assert "\033[" not in plain.getvalue()
    assert "\033[" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = _Tty()
    render_all(diags, tty)
    assert "\033[" not in tty.getvalue()
    code, _, err = run("check", REPO / "tests" / "diagnostics" / "unknown_bottom.net")
    assert code == 2 and "\033[" not in err


def test_check_never_imports_cupy(tmp_path):
    """Even with a (fake) cupy importable, `check` must not import it: the CLI stays light."""
    fake = tmp_path / "cupy"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    code = ("import sys; from netdsl.cli import main; rc = main(['check', sys.argv[1], '--phase', 'train']); "
            "print(rc, 'cupy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", code, str(LENET)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60, check=False)
    rc, cupy = res.stdout.split()[-2:]
    assert rc == "0" and cupy == "False", res.stdout + res.stderr


def test_cli_subprocess_no_traceback(tmp_path):
    bad = tmp_path / "bad.net"
    bad.write_text('layer { name: "a" type: "ReLU" bottom: "nope" top: "a" }\n')
    res = subprocess.run([sys.executable, "-m", "netdsl", "check", str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=False)
    assert res.returncode == 2
    assert "error[E0210]" in res.stderr and "Traceback" not in res.stderr and "\033[" not in res.stderr


@pytest.mark.parametrize("path", sorted((REPO / "nets").glob("*.net")), ids=lambda p: p.name)
@pytest.mark.parametrize("phase", ["train", "test"])
def test_repo_nets_check_clean(path, phase):
    """nets/*.net (solvers included: their train net is checked) have no errors in either phase;
    a test net (*_test.net, py-faster-rcnn's test.prototxt style) has no loss, so its TRAIN phase
    has exactly the no-loss error."""
    stem = next((s for s in GENERATED if path.stem.startswith(s)), None)
    if stem is not None and not (REPO / "data").exists():
        code, out = check_json(path, "--phase", phase)      # a fresh checkout: the data is not made yet
        assert code == 2 and {d["code"] for d in out["diagnostics"]} == {"E0502"}, out["diagnostics"]
    hints = [a for shape in GENERATED[stem][phase == "test"] for a in ("--shape", shape)] if stem else []
    code, out = check_json(path, "--phase", phase, *hints)
    if phase == "train" and path.name.endswith("_test.net"):
        assert code == 2 and [d["code"] for d in out["diagnostics"] if d["severity"] == "error"] == ["E0213"]
        return
    assert code == 0 and out["ok"], out["diagnostics"]


# nets/ reading data that `netdsl data` makes (their first lines say how; tests/test_data_layers.py
# trains them on it): without it, only their data shapes are unknown; with the shapes it has (TRAIN,
# TEST), they check clean
GENERATED = {"lenet_imagedata": (("data=64,1,28,28", "label=64"), ("data=100,1,28,28", "label=100")),
             "lenet_lmdb": (("data=64,1,28,28", "label=64"), ("data=100,1,28,28", "label=100")),
             "cifar10_quick_digits": (("data=100,3,32,32", "label=100"),) * 2}


def test_solver_checks_its_train_net():
    code, out = check_json(REPO / "nets" / "lenet_solver.net")
    assert code == 0 and out["phase"] == "train" and Path(out["net"]).name == "lenet.net"
    assert any(layer["type"] == "SoftmaxWithLoss" for layer in out["layers"])


def test_weights_are_checked_against_param_shapes(tmp_path):
    np = pytest.importorskip("numpy")
    w = tmp_path / "w.npz"
    np.savez(w, **{"conv1/0": np.zeros((20, 3, 5, 5), "f"), "ip1/0": np.zeros((500, 1000), "f"),
                   "ip2/0": np.zeros((12, 500), "f"), "conv2/0": np.zeros((50, 20, 5, 5), "f")})
    code, out = check_json(LENET, "--weights", w)
    assert code == 2
    got = [(d["code"], d["line"]) for d in out["diagnostics"]]
    text = LENET.read_text().splitlines()
    assert [c for c, _ in got] == ["E0301", "E0311", "E0305"]
    assert 'name: "conv1"' in text[got[0][1] - 1] and 'name: "ip1"' in text[got[1][1] - 1]
    assert "num_output: 10" in text[got[2][1] - 1]
    assert "num_output: 12" in out["diagnostics"][2]["help"]


def test_compile_reports_check_errors(tmp_path):
    bad = tmp_path / "bad.net"
    bad.write_text('layer { name: "a" type: "ReLU" bottom: "nope" top: "a" }\n')
    code, out, err = run("compile", bad)
    assert code == 2 and "error[E0210]" in err and not out


def test_params_that_need_runtime_dims_make_the_total_a_lower_bound(tmp_path):
    """--shape data=1,3,?,?: the conv params are known, the InnerProduct's are not; the total says
    it is a lower bound and names the layer (it used to leave them out silently)."""
    net = tmp_path / "n.net"
    net.write_text('layer { name: "data" type: "Input" top: "data" }\n'
                   'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 4 kernel_size: 3 } }\n'
                   'layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 2 } }\n')
    code, out = check_json(net, "--shape", "data=1,3,?,?")
    assert code == 0 and out["total_params"] == 4 * 3 * 9 + 4 + 2 and out["params_unknown"] == ["fc"]   # fc's bias is known
    code, text, _ = run("check", net, "--shape", "data=1,3,?,?")
    assert "params: 114 (114 trainable, 0 frozen), a lower bound: the params of 'fc' depend on dims known only " \
           "at run time" in text
    code, out = check_json(net, "--shape", "data=1,3,8,8")
    assert out["params_unknown"] == [] and out["total_params"] == 112 + 2 * 4 * 36 + 2


# The conformance corpus of real nets (shared/reference/real/, see its SOURCES.md): every file, BVLC
# or fork, checks clean in the phases it is written for, with the --shape hints a
# user would give for its data and the stages its solver would set.
REAL = REFERENCE / "real"
REAL_NETS = {
    "BVLC+caffe__examples_finetune_pascal_detection_pascal_finetune_trainval_test.prototxt": [("train", []), ("test", [])],
    "BVLC+caffe__examples_hdf5_classification_nonlinear_train_val.prototxt":
        [(ph, ["data=10,4", "label=10"]) for ph in ("train", "test")],
    "BVLC+caffe__examples_mnist_mnist_autoencoder.prototxt":
        [("train", ["data=100,1,28,28"]), ("test", ["data=100,1,28,28", "--stage", "test-on-test"])],
    "BVLC+caffe__examples_siamese_mnist_siamese_train_test.prototxt":
        [(ph, ["pair_data=64,2,28,28"]) for ph in ("train", "test")],
    "BVLC+caffe__models_bvlc_googlenet_train_val.prototxt":
        [("train", ["data=32,3,224,224"]), ("test", ["data=50,3,224,224"])],
    "BVLC+caffe__models_finetune_flickr_style_train_val.prototxt": [("train", []), ("test", [])],
    "CMU-Perceptual-Computing-Lab+openpose__models_pose_coco_pose_deploy_linevec.prototxt": [("test", [])],
    "KaimingHe+deep-residual-networks__prototxt_ResNet-50-deploy.prototxt": [("test", [])],
    "kpzhang93+MTCNN_face_detection_alignment__code_codes_MTCNNv1_model_det1.prototxt": [("test", [])],
    "rbgirshick+py-faster-rcnn__models_pascal_voc_VGG16_faster_rcnn_end2end_test.prototxt": [("test", [])],
    "rbgirshick+py-faster-rcnn__models_pascal_voc_ZF_faster_rcnn_alt_opt_stage1_fast_rcnn_train.prototxt":
        [("train", ["data=2,3,600,1000", "rois=128,5", "labels=128", "bbox_targets=128,84",
                    "bbox_inside_weights=128,84", "bbox_outside_weights=128,84"])],
    "shelhamer+fcn.berkeleyvision.org__voc-fcn8s_deploy.prototxt": [("test", [])],
    "shicai+MobileNet-Caffe__mobilenet_deploy.prototxt": [("test", [])],
    "soeaver+caffe-model__cls_inception_deploy_inception-v3.prototxt": [("test", [])],
    # the forks' layers (layers/forks.py)
    "alexgkendall+SegNet-Tutorial__Models_segnet_inference.prototxt": [("test", ["data=1,3,360,480"])],
    "farmingyard+ShuffleNet__shufflenet_1x_g3_deploy.prototxt": [("test", [])],
    "hszhao+PSPNet__evaluation_prototxt_pspnet50_ADE20K_473.prototxt": [("test", [])],
    "shicai+DenseNet-Caffe__DenseNet_201.prototxt": [("test", [])],
    "xzgz+caffe-ssd__models_VGGNet_VOC0712_SSD_300x300_deploy.prototxt": [("test", [])],          # layers/ssd.py
    # a V1 file: upgraded in memory, with a warning
    "natanielruiz+net-archive__nin_imagenet_train_val.prototxt": [(ph, ["data=64,3,224,224"]) for ph in ("train", "test")],
}
REAL_CASES = [(f, ph, hints) for f, runs in REAL_NETS.items() for ph, hints in runs]


def _hint_args(hints):
    out, it = [], iter(hints)
    for h in it:
        out += [h, next(it)] if h.startswith("--") else ["--shape", h]
    return out


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/reference/real is not available")
def test_real_corpus_is_fully_classified():
    names = {p.name for p in REAL.glob("*.prototxt")}
    assert names == set(REAL_NETS)


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/reference/real is not available")
@pytest.mark.parametrize("name, phase, hints", REAL_CASES, ids=[f"{c[0].split('__')[-1]}-{c[1]}" for c in REAL_CASES])
def test_real_net_checks_clean(name, phase, hints):
    code, out = check_json(REAL / name, "--phase", phase, *_hint_args(hints))
    assert code == 0, [d["message"] for d in out["diagnostics"] if d["severity"] == "error"]
    assert out["total_params"] > 0 and not out["params_unknown"]
