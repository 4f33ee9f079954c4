"""Old formats (upgrade.py): V1 net files and old solver files, upgraded as Caffe upgrades them,
in memory (W0206) and by `netdsl upgrade`."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from netdsl.cli import main
from netdsl.syntax import parse
from netdsl.upgrade import print_text, upgrade_net, upgrade_solver

REAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "real"

V1 = """name: "old"
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 8 scale: 0.0039 crop_size: 24 mirror: true }
}
layers {
  name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 param: "w" param: "b"
  inner_product_param { num_output: 10 }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" }
"""


def test_v1_net_upgrades_as_caffe_does():
    new = parse(print_text(upgrade_net(parse(V1, "old.net"))), "new.net")
    data, ip, loss = new.get("layer")
    assert [f.value.value for f in (data.value.get("type")[0], ip.value.get("type")[0], loss.value.get("type")[0])] \
        == ["Data", "InnerProduct", "SoftmaxWithLoss"]
    dp, tp = data.value.get("data_param")[0].value, data.value.get("transform_param")[0].value
    assert [f.name for f in dp.fields] == ["source", "batch_size"]
    assert [(f.name, str(f.value.value)) for f in tp.fields] == [("scale", "0.0039"), ("crop_size", "24"),
                                                                 ("mirror", "true")]
    params = [{f.name: f.value.value for f in p.value.fields} for p in ip.value.get("param")]
    assert params == [{"name": "w", "lr_mult": 1, "decay_mult": 1}, {"name": "b", "lr_mult": 2, "decay_mult": 0}]


def test_old_solver_type_becomes_type():
    new = upgrade_solver(parse('net: "n.net"\nbase_lr: 0.1\nsolver_type: NESTEROV\n', "s.net"))
    assert [(f.name, f.value.value) for f in new.fields][-1] == ("type", "Nesterov")


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/reference/real is not available")
def test_upgrade_command_on_a_real_v1_file_checks_like_the_in_memory_upgrade(tmp_path):
    nin = REAL / "natanielruiz+net-archive__nin_imagenet_train_val.prototxt"
    out = tmp_path / "nin.prototxt"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["upgrade", str(nin), "-o", str(out)]) == 0
    assert "V1 net: 33 layers upgraded" in err.getvalue() and "layers {" not in out.read_text()
    tables = []
    for path in (nin, out):
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            assert main(["check", str(path), "--phase", "train", "--shape", "data=64,3,224,224"]) == 0
        tables.append(o.getvalue().split("\n", 1)[1])             # the table, after the title line
        assert ("W0206" in e.getvalue()) == (path == nin)
    assert tables[0] == tables[1]
