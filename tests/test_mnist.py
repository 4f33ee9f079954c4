"""Tests for the MNIST data stage: directory resolution, idx parsing, validation, download."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from support import needs_mnist, shared_data_dir

from netdsl.data import download
from netdsl.data.mnist import ALL_FILES, data_dir, load_mnist, verify_mnist
from netdsl.errors import NetdslError


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_file(directory: Path, name: str, content: bytes, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def synthetic_files(seed: int = 0) -> dict[str, bytes]:
    """Uncompressed content of a tiny but well-formed MNIST (5 train, 3 test digits)."""
    tr, te = synthetic(5, seed), synthetic(3, seed + 1)
    return {"train-images-idx3-ubyte": idx_bytes(tr[0]),
            "train-labels-idx1-ubyte": idx_bytes(tr[1]),
            "t10k-images-idx3-ubyte": idx_bytes(te[0]),
            "t10k-labels-idx1-ubyte": idx_bytes(te[1])}


def write_all(directory: Path, files: dict[str, bytes], gz: bool = True) -> None:
    for name, content in files.items():
        write_file(directory, name, content, gz)


# ------------------------------------------------------------------------- data directory

def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NETDSL_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("NETDSL_DATA")
    assert data_dir() == tmp_path / "xdg" / "netdsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_dir() == tmp_path / "home" / ".cache" / "netdsl"


# ------------------------------------------------------------------------- real MNIST

@needs_mnist
def test_real_mnist_shapes_and_known_labels(monkeypatch):
    monkeypatch.setenv("NETDSL_DATA", str(shared_data_dir()))
    x, y = load_mnist("train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert list(y[:5]) == [5, 0, 4, 1, 9]           # the well-known first training labels
    assert np.bincount(y, minlength=10).min() > 5000
    xt, yt = load_mnist("test", shared_data_dir())
    assert xt.shape == (10000, 28, 28) and list(yt[:3]) == [7, 2, 1]
    assert not x.flags.writeable                    # shared cached arrays must not be mutated


@needs_mnist
def test_real_mnist_checksums_match_embedded_constants():
    assert verify_mnist(shared_data_dir() / "mnist", checksums=download.SHA256) == []


@needs_mnist
def test_repeated_load_is_served_from_cache():
    first = load_mnist("test", shared_data_dir())
    again = load_mnist("test", shared_data_dir())
    assert first[0] is again[0] and first[1] is again[1]


# ------------------------------------------------------------------------- synthetic idx files

@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_round_trip(tmp_path, gz):
    images, labels = synthetic(7, 3)
    write_file(tmp_path / "mnist", "t10k-images-idx3-ubyte", idx_bytes(images), gz)
    write_file(tmp_path / "mnist", "t10k-labels-idx1-ubyte", idx_bytes(labels), gz)
    x, y = load_mnist("test", tmp_path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_replaced_file_is_decoded_again(tmp_path):
    write_all(tmp_path / "mnist", synthetic_files(0))
    first = load_mnist("test", tmp_path)[1]
    new_labels = (first + 1) % 10
    write_file(tmp_path / "mnist", "t10k-labels-idx1-ubyte", idx_bytes(new_labels))
    os.utime(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", ns=(1, 1))
    np.testing.assert_array_equal(load_mnist("test", tmp_path)[1], new_labels)


def test_missing_files_are_listed_with_directory_and_fix(tmp_path):
    write_file(tmp_path / "mnist", "train-images-idx3-ubyte", idx_bytes(synthetic(2, 0)[0]))
    with pytest.raises(NetdslError) as e:
        load_mnist("train", tmp_path)
    d = e.value.diagnostic
    assert d.code == "E0901" and str(tmp_path / "mnist") in d.message
    assert any("train-labels-idx1-ubyte" in n for n in d.notes)
    assert not any("train-images" in n for n in d.notes)
    assert "netdsl data mnist" in d.help and "NETDSL_DATA" in d.help and "--data-dir" in d.help


def test_unknown_split(tmp_path):
    with pytest.raises(NetdslError) as e:
        load_mnist("validation", tmp_path)
    assert e.value.diagnostic.code == "E0902"


def _corrupt_case(tmp_path, images: bytes, labels: bytes, gz=True):
    write_file(tmp_path / "mnist", "t10k-images-idx3-ubyte", images, gz)
    write_file(tmp_path / "mnist", "t10k-labels-idx1-ubyte", labels, gz)
    with pytest.raises(NetdslError) as e:
        load_mnist("test", tmp_path)
    d = e.value.diagnostic
    assert "netdsl data mnist --force" in d.help
    return d


def test_truncated_image_file(tmp_path):
    images, labels = synthetic(4, 0)
    d = _corrupt_case(tmp_path, idx_bytes(images)[:-10], idx_bytes(labels))
    assert d.code == "E0905" and "truncated" in d.message and "t10k-images" in d.message


def test_trailing_bytes(tmp_path):
    images, labels = synthetic(4, 0)
    d = _corrupt_case(tmp_path, idx_bytes(images), idx_bytes(labels) + b"\0", gz=False)
    assert d.code == "E0905" and "trailing" in d.message and "t10k-labels" in d.message


def test_wrong_magic_number(tmp_path):
    images, labels = synthetic(4, 0)
    # A labels file where an images file belongs: magic 0x801 instead of 0x803.
    d = _corrupt_case(tmp_path, idx_bytes(labels), idx_bytes(labels))
    assert d.code == "E0904" and "0x00000801" in d.message and "0x00000803" in d.message


def test_wrong_image_size(tmp_path):
    d = _corrupt_case(tmp_path, idx_bytes(np.zeros((2, 32, 32))), idx_bytes(np.zeros(2)))
    assert d.code == "E0904" and "32x32" in d.message


def test_bad_gzip(tmp_path):
    images, labels = synthetic(4, 0)
    write_file(tmp_path / "mnist", "t10k-labels-idx1-ubyte", idx_bytes(labels))
    path = write_file(tmp_path / "mnist", "t10k-images-idx3-ubyte", idx_bytes(images))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(NetdslError) as e:
        load_mnist("test", tmp_path)
    assert e.value.diagnostic.code == "E0903" and str(path) in e.value.diagnostic.message


def test_label_out_of_range(tmp_path):
    images, labels = synthetic(4, 0)
    labels[2] = 11
    d = _corrupt_case(tmp_path, idx_bytes(images), idx_bytes(labels))
    assert d.code == "E0906" and "11" in d.message and "index 2" in d.message


def test_count_mismatch(tmp_path):
    images, labels = synthetic(4, 0)
    d = _corrupt_case(tmp_path, idx_bytes(images), idx_bytes(labels[:3]))
    assert d.code == "E0906" and any("4 images" in n for n in d.notes)


def test_verify_flags_missing_and_bad_checksums(tmp_path):
    files = synthetic_files()
    sums = {n: hashlib.sha256(c).hexdigest() for n, c in files.items()}
    write_all(tmp_path, files)
    assert verify_mnist(tmp_path, checksums=sums) == []
    write_file(tmp_path, "t10k-images-idx3-ubyte", b"garbage", gz=False)   # shadowed by .gz
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    write_file(tmp_path, "train-labels-idx1-ubyte", files["train-labels-idx1-ubyte"] + b"x")
    assert verify_mnist(tmp_path, checksums=sums) == ["train-labels-idx1-ubyte",
                                                      "t10k-labels-idx1-ubyte"]
    assert verify_mnist(tmp_path) == ["t10k-labels-idx1-ubyte"]


# ------------------------------------------------------------------------- download

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):     # keep pytest output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A threaded HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, www dir,
    list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_Handler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    # A short poll interval keeps shutdown() (which waits one poll) from slowing every test.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, httpd.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_mirror():
    """A URL whose port refuses connections: bound once to get a free port, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture
def files(monkeypatch):
    """Tiny synthetic MNIST files, with their checksums swapped in for the real ones."""
    content = synthetic_files()
    monkeypatch.setattr(download, "SHA256",
                        {n: hashlib.sha256(c).hexdigest() for n, c in content.items()})
    return content


def test_download_success_then_load(server, files, tmp_path):
    url, www, requests = server
    write_all(www / "good", files)
    target = tmp_path / "data"
    assert download.download_mnist(target, progress=False, mirrors=[url + "/good/"]) \
        == target / "mnist"
    assert sorted(requests) == sorted(f"/good/{n}.gz" for n in ALL_FILES)
    x, y = load_mnist("train", target)
    np.testing.assert_array_equal(x, np.frombuffer(files["train-images-idx3-ubyte"][16:],
                                                   np.uint8).reshape(5, 28, 28))
    assert not [p for p in (target / "mnist").iterdir() if p.name.endswith(".part")]


def test_download_skips_valid_files_unless_forced(server, files, tmp_path):
    url, www, requests = server
    write_all(www / "good", files)
    test_only = {n: c for n, c in files.items() if n.startswith("t10k")}
    write_all(tmp_path / "mnist", test_only, gz=False)
    download.download_mnist(tmp_path, progress=False, mirrors=[url + "/good"])
    assert sorted(requests) == ["/good/train-images-idx3-ubyte.gz",
                                "/good/train-labels-idx1-ubyte.gz"]
    requests.clear()
    download.download_mnist(tmp_path, progress=False, mirrors=[url + "/good"])
    assert requests == []
    download.download_mnist(tmp_path, force=True, progress=False, mirrors=[url + "/good"])
    assert len(requests) == 4


def test_download_replaces_corrupt_file(server, files, tmp_path):
    url, www, _ = server
    write_all(www / "good", files)
    write_all(tmp_path / "mnist", files)
    write_file(tmp_path / "mnist", "train-labels-idx1-ubyte", b"\0\0\x08\x01broken")
    download.download_mnist(tmp_path, progress=False, mirrors=[url + "/good/"])
    assert verify_mnist(tmp_path / "mnist", checksums=download.SHA256) == []


def test_checksum_mismatch_falls_back_to_next_mirror(server, files, tmp_path):
    url, www, requests = server
    write_all(www / "good", files)
    write_all(www / "bad", {n: c[:-1] + bytes([c[-1] ^ 1]) for n, c in files.items()})
    download.download_mnist(tmp_path, progress=False, mirrors=[url + "/bad/", url + "/good/"])
    assert len(requests) == 8
    assert verify_mnist(tmp_path / "mnist", checksums=download.SHA256) == []


def test_checksum_mismatch_everywhere_is_an_error_and_nothing_is_kept(server, files, tmp_path):
    url, www, _ = server
    write_all(www / "bad", {n: c + b"extra" for n, c in files.items()})
    (www / "bad" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(NetdslError) as e:
        download.download_mnist(tmp_path, progress=False, mirrors=[url + "/bad/"])
    diags = e.value.diagnostics
    assert [d.code for d in diags] == ["E0908"] * 4
    labels = next(d for d in diags if "t10k-labels" in d.message)
    assert "not a valid gzip" in labels.notes[0]
    images = next(d for d in diags if "train-images" in d.message)
    assert "checksum mismatch" in images.notes[0] and url in images.notes[0]
    assert str(tmp_path / "mnist") in images.help
    assert list((tmp_path / "mnist").iterdir()) == []


def test_unreachable_mirror_falls_back(server, files, tmp_path, dead_mirror):
    url, www, requests = server
    write_all(www / "good", files)
    download.download_mnist(tmp_path, progress=False, mirrors=[dead_mirror, url + "/good/"])
    assert len(requests) == 4
    assert verify_mnist(tmp_path / "mnist", checksums=download.SHA256) == []


def test_http_404_falls_back(server, files, tmp_path):
    url, www, requests = server
    write_all(www / "good", files)
    download.download_mnist(tmp_path, progress=False, mirrors=[url + "/missing/", url + "/good/"])
    assert len(requests) == 8


def test_offline_error_lists_urls_and_where_to_put_files(files, tmp_path, dead_mirror):
    with pytest.raises(NetdslError) as e:
        download.download_mnist(tmp_path, progress=False, mirrors=[dead_mirror])
    diags = e.value.diagnostics
    assert [d.code for d in diags] == ["E0907"] * 4
    first = diags[0]
    assert first.notes[0].startswith(dead_mirror + "train-images-idx3-ubyte.gz: unreachable")
    # The dead mirror is not retried for the remaining files.
    assert "skipped" in diags[1].notes[0]
    assert str(tmp_path / "mnist") in first.help and "by hand" in first.help


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NetdslError) as e:
        download.download_mnist(blocker, progress=False, mirrors=[])
    assert e.value.diagnostic.code == "E0909" and str(blocker) in e.value.diagnostic.message


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_tty(server, files, tmp_path, monkeypatch, capsys):
    url, www, _ = server
    write_all(www / "good", files)
    download.download_mnist(tmp_path / "a", mirrors=[url + "/good/"])
    assert capsys.readouterr().err == ""
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    download.download_mnist(tmp_path / "b", mirrors=[url + "/good/"])
    lines = tty.getvalue().split("\n")[:-1]
    assert len(lines) == 4
    assert all(line.split("\r")[-1].rstrip().endswith("100%") for line in lines)
    assert "train-images-idx3-ubyte.gz" in lines[0]


@needs_mnist
def test_real_files_download_and_verify(server, tmp_path):
    url, www, _ = server
    for name in ALL_FILES:
        (www / f"{name}.gz").symlink_to(shared_data_dir() / "mnist" / f"{name}.gz")
    download.download_mnist(tmp_path, progress=False, mirrors=[url])
    assert verify_mnist(tmp_path / "mnist", checksums=download.SHA256) == []
