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
    ({"type": '"Adam"', "momentum2": 2}, "momentum2 (beta2) must be in [0, 1)"),
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


# -- file-system faults, memory and decompression bounds, interrupted tests (issue 14: 4, 5, 6, 9, 12)

TINY = ('layer { name: "d" type: "DummyData" top: "x" top: "label" dummy_data_param { '
        'shape { dim: 4 dim: 3 } shape { dim: 4 } data_filler { type: "gaussian" } data_filler { type: "constant" } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 '
        'weight_filler { type: "xavier" } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }\n')


def tiny_solver(tmp_path, **fields) -> Path:
    return solver(tmp_path, net=f'"{net(tmp_path, TINY)}"', **fields)


@pytest.mark.parametrize("prefix, words", [
    ("afile/x", "is a file, not a directory"),
    ("afile/sub/x", "is a file, not a directory"),
    ("/proc/netdsl/x", "cannot write in /proc/netdsl"),
])
def test_an_unwritable_snapshot_prefix_is_refused_before_training(tmp_path, prefix, words):
    (tmp_path / "afile").write_text("")
    s = tiny_solver(tmp_path, snapshot_prefix=f'"{tmp_path / prefix if not prefix.startswith("/") else prefix}"')
    code, err = run("train", s)
    assert code == 2 and "error[E0770]" in err and words in err and "snapshot_prefix" in err, err


def test_out_pointing_at_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    code, err = run("train", tiny_solver(tmp_path), "--out", tmp_path / "afile")
    assert code == 2 and "error[E0770]" in err and "--out" in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_failed_snapshot_write_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from netdsl import executor
    real, calls = executor.write_atomic, []

    def fill_up(path, write):
        calls.append(path)
        if "_iter_4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)
    monkeypatch.setattr(executor, "write_atomic", fill_up)
    s = tiny_solver(tmp_path, max_iter=6, snapshot=2)
    code, err = run("train", s)
    assert code == 2 and "error[E0771]" in err and "No space left on device" in err, err
    assert "the previous snapshot" in err and "x_iter_2.npz is intact" in err
    assert np.load(tmp_path / "run" / "x_iter_2.npz")["ip/0"].shape == (2, 3)
    assert not list((tmp_path / "run").glob(".*.part"))


def test_stale_part_files_of_a_killed_write_are_removed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".x_iter_2.npz.abc123.part"
    other = run_dir / ".notes.part"              # not ours: left alone
    stale.write_bytes(b"half")
    other.write_bytes(b"theirs")
    code, err = run("train", tiny_solver(tmp_path))
    assert code == 0, err
    assert not stale.exists() and other.exists()


def test_a_log_that_cannot_be_written_warns_and_training_goes_on(tmp_path, monkeypatch):
    from netdsl import train
    s = tiny_solver(tmp_path, max_iter=3, display=1)
    trainer = train.Trainer(str(s), _cpu(), progress=False)

    class Full:
        def write(self, _):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass
    trainer.log.f = Full()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = trainer.run()
    assert result.iterations == 3 and err.getvalue().count("warning[W0770]") == 1


def _cpu():
    from netdsl.backend import get_backend
    return get_backend("cpu")


def test_diverged_weights_are_never_called_good(tmp_path):
    import numpy as np
    w = tmp_path / "nan.npz"
    np.savez(w, **{"ip/0": np.full((2, 3), np.nan, np.float32)})
    code, err = run("train", tiny_solver(tmp_path, snapshot=1, max_iter=3), "--weights", w)
    assert code == 2 and "error[E0710]" in err
    assert "the weights are already NaN or Inf and no snapshot was written before: none were saved" in err
    assert not list((tmp_path / "run").glob("*.npz"))


def test_a_diverging_run_prints_no_numpy_warnings(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a RuntimeWarning would become an exception: exit 1
        regression = TINY.replace("shape { dim: 4 }", "shape { dim: 4 dim: 2 }").replace(
            'data_filler { type: "constant" }', 'data_filler { type: "gaussian" }').replace("SoftmaxWithLoss", "EuclideanLoss")
        code, err = run("train", solver(tmp_path, net=f'"{net(tmp_path, regression)}"', base_lr="1e30", max_iter=20))
    assert code == 2 and "error[E0710]" in err and "RuntimeWarning" not in err


def test_an_interrupted_test_pass_stops_at_once(tmp_path):
    from netdsl.train import Trainer
    s = tiny_solver(tmp_path, test_iter=1000, test_interval=1000)
    trainer = Trainer(str(s), _cpu(), progress=False)
    trainer.stop_requested = True          # what Ctrl-C (the SIGINT handler) sets
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert trainer.test(0) == {}
    assert "Test net #0 interrupted" in err.getvalue() and trainer.tests[0].forward_count == 0


def test_extra_test_iters_test_a_generic_net_again(tmp_path):
    from netdsl.solverfile import load_solver
    sf = load_solver(str(tiny_solver(tmp_path, test_net=f'"{net(tmp_path, TINY)}"', test_iter="1 test_iter: 2",
                                     test_interval=1)))
    assert len(sf.test_nets) == 2          # the named test net, then the generic `net` once more (Caffe)


def test_a_net_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path):
    huge = net(tmp_path, IN.format("dim: 64 dim: 3 dim: 20000 dim: 20000"))
    code, err = run("time", huge, "--phase", "test")
    assert code == 2 and "error[E0775]" in err and "more than the memory available now" in err
    assert "the largest blob is 'x' 64x3x20000x20000" in err
    code, err = run("time", huge, "--phase", "test", "--memory-limit", "banana")
    assert code == 2 and "not a memory size" in err
    with pytest.raises(NetdslError, match="more than the memory limit"):
        netdsl.load(str(net(tmp_path, API_NET)), phase="test", memory_limit="16")
    assert netdsl.load(str(net(tmp_path, API_NET)), phase="test", memory_limit="off") is not None
    code, err = run("scenes", "-n", "1", "-o", tmp_path / "s", "--height", "30000", "--width", "30000")
    assert code == 2 and "a 30000x30000 scene needs about" in err


def test_an_npz_array_the_net_cannot_take_is_never_inflated(tmp_path):
    import resource
    import zipfile

    import numpy as np
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("ip/0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (20000, 20000)})
        zeros = bytes(1 << 22)
        for _ in range(20000 * 20000 * 4 // len(zeros)):
            f.write(zeros)
    assert bomb.stat().st_size < 3 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, err = run("check", net(tmp_path, TINY), "--weights", bomb)
    assert code == 2 and "bomb.npz has ip/0 as 20000x20000; the net needs 2x3" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10     # KiB: never 1.6 GB


def test_image_and_gzip_bombs_are_refused_before_inflating(tmp_path):
    import struct
    import zlib

    from netdsl.data import mnist
    from netdsl.data.png import _SIGNATURE, _chunk, read_png

    def png(w, h, idat):
        return (_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + _chunk(b"IDAT", idat)
                + _chunk(b"IEND", b""))
    (tmp_path / "huge.png").write_bytes(png(50000, 50000, zlib.compress(bytes(1 << 20))))
    with pytest.raises(NetdslError, match="50000x50000 pixels, more than this reader's limit"):
        read_png(tmp_path / "huge.png")
    (tmp_path / "liar.png").write_bytes(png(100, 100, zlib.compress(bytes(1 << 28), 9)))
    with pytest.raises(NetdslError, match="expected 10100"):
        read_png(tmp_path / "liar.png")
    import gzip
    d = tmp_path / "mnist"
    d.mkdir()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(300 << 20), 9))
    with pytest.raises(NetdslError, match="expands to more than 256 MiB"):
        mnist.read_uncompressed(d / "t10k-images-idx3-ubyte.gz")


def test_an_mnist_file_with_no_images_is_refused(tmp_path):
    from netdsl.data import mnist
    header = (0x0803).to_bytes(4, "big") + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with pytest.raises(NetdslError, match="holds no images"):
        mnist.parse_idx(header, Path("x"), 3)


def test_a_huge_image_to_propose_is_shrunk_not_run_at_full_size():
    import numpy as np

    from netdsl.propose import shrink
    image = np.random.default_rng(0).random((1, 3000, 1500), dtype=np.float32)
    small = shrink(image, 1000)
    assert small.shape == (1, 1000, 500) and abs(small.mean() - image.mean()) < 1e-3
    assert shrink(image[:, :800, :600], 1000) is not None and shrink(image[:, :800, :600], 1000).shape == (1, 800, 600)


def test_api_paths_are_checked(tmp_path):
    with pytest.raises(NetdslError, match="needs the path of a net file, got NoneType"):
        netdsl.load(None)
    net_ = netdsl.load(net(tmp_path, API_NET), phase="test")          # a pathlib.Path is a path
    with pytest.raises(NetdslError, match="cannot write weights to /proc/nope/x.npz"):
        net_.save("/proc/nope/x.npz")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_decompressing_mnist_leaves_no_resident_heap(mnist_dir):
    """tune_host_allocator keeps freed memory in the process; what MNIST's gunzip freed while the
    data layer opened is given back (release_free_heap), so a LeNet train net costs about its
    data (47 MiB of uint8 images) and blobs, not +36 MiB more (111 MiB before the fix, 75 after)."""
    import os
    import subprocess
    import sys
    code = ("import os\nfrom netdsl.executor import build_net\n"
            "def rss():\n    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            "r0 = rss()\nnet = build_net(os.path.join('nets', 'lenet.net'), 'TRAIN', 'cpu', seed=1)\nnet.forward()\n"
            "print((rss() - r0) // 1024)\n")
    root = Path(netdsl.__file__).resolve().parents[1]
    env = dict(os.environ, NETDSL_DATA=mnist_dir)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 95, out.stdout
