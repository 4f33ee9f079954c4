"""Unit tests of netdsl.graph.build: phase/stage/level filtering, SSA renaming of in-place tops,
producer/consumer maps, legacy inputs, and each graph diagnostic by code and line:column."""
from __future__ import annotations

import pytest

from netdsl.errors import Collector
from netdsl.graph import Graph, build
from netdsl.syntax import parse

DATA = 'layer { name: "data" type: "Input" top: "data" top: "label" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n'
RELU = 'layer {{ name: "{0}" type: "ReLU" bottom: "{1}" top: "{2}" }}\n'


def net(body: str, phase: str = "TEST", stages: tuple[str, ...] = (), level: int = 0) -> tuple[Graph, Collector]:
    c = Collector()
    return build(parse(DATA + body, "t.net"), phase, stages, level, c), c


def diags(c: Collector) -> list[tuple[str, str]]:
    return [(d.code, f"{d.pos.line}:{d.pos.column}") for d in c.diagnostics]


LENET_ISH = DATA + """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1" include { phase: TRAIN } }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
"""


def test_in_place_tops_become_ssa_versions():
    c = Collector()
    g = build(parse('name: "lenetish"\n' + LENET_ISH, "t.net"), "TRAIN", (), 0, c)
    assert c.diagnostics == []
    assert (g.name, g.phase, g.file) == ("lenetish", "TRAIN", "t.net")
    assert [(n.name, n.bottoms, n.tops) for n in g.nodes] == [
        ("data", [], ["data", "label"]), ("conv1", ["data"], ["conv1"]), ("relu1", ["conv1"], ["conv1#2"]),
        ("drop1", ["conv1#2"], ["conv1#3"]), ("ip", ["conv1#3"], ["ip"]), ("loss", ["ip", "label"], ["loss"])]
    assert {b: n.name for b, n in g.producer.items()} == {
        "data": "data", "label": "data", "conv1": "conv1", "conv1#2": "relu1", "conv1#3": "drop1", "ip": "ip", "loss": "loss"}
    assert {b: [n.name for n in ns] for b, ns in g.consumers.items()} == {
        "data": ["conv1"], "conv1": ["relu1"], "conv1#2": ["drop1"], "conv1#3": ["ip"], "ip": ["loss"], "label": ["loss"]}
    assert g.outputs == ["loss"]
    assert [g.display(b) for b in ("conv1", "conv1#2", "conv1#3", "ip")] == ["conv1", "conv1", "conv1", "ip"]
    assert [(n.loss_weights, n.propagate_down) for n in g.nodes] == [
        ([0.0, 0.0], []), ([0.0], [True]), ([0.0], [True]), ([0.0], [True]), ([0.0], [True]), ([1.0], [True, True])]


def test_test_phase_leaves_out_train_layers():
    g, c = net(LENET_ISH[len(DATA):])
    assert c.diagnostics == []
    assert [n.name for n in g.nodes] == ["data", "conv1", "relu1", "ip", "loss", "acc"]
    assert g.producer["conv1#2"].name == "relu1" and "conv1#3" not in g.producer
    assert [n.name for n in g.consumers["ip"]] == ["loss", "acc"]
    assert g.outputs == ["loss", "acc"]
    assert g.nodes[-1].loss_weights == [0.0]            # Accuracy is not a loss


def test_explicit_loss_weight_and_propagate_down():
    g, c = net('layer { name: "s" type: "Sigmoid" bottom: "data" top: "s" loss_weight: 0.5 }\n'
               'layer { name: "l" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "l" '
               'propagate_down: true propagate_down: false }\n', "TRAIN")
    assert c.diagnostics == []
    assert [(n.loss_weights, n.propagate_down) for n in g.nodes[1:]] == [([0.5], [True]), ([1.0], [True, False])]


RULES = {                                              # rule -> included for ((), 0), (a), (b), (a, b), level 1, level 2
    "": (True, True, True, True, True, True),
    'include { phase: TEST }': (True, True, True, True, True, True),
    'include { phase: TRAIN }': (False, False, False, False, False, False),
    'exclude { phase: TEST }': (False, False, False, False, False, False),
    'include { stage: "a" }': (False, True, False, True, False, False),
    'include { stage: "a" stage: "b" }': (False, False, False, True, False, False),
    'include { stage: "a" } include { stage: "b" }': (False, True, True, True, False, False),
    'include { phase: TEST stage: "a" }': (False, True, False, True, False, False),
    'include { not_stage: "b" }': (True, True, False, False, True, True),
    'exclude { stage: "a" }': (True, False, True, False, True, True),
    'include { min_level: 2 }': (False, False, False, False, False, True),
    'include { max_level: 1 }': (True, True, True, True, True, False),
    'include { min_level: 1 max_level: 1 }': (False, False, False, False, True, False),
}
STATES = [((), 0), (("a",), 0), (("b",), 0), (("a", "b"), 0), ((), 1), ((), 2)]


@pytest.mark.parametrize("rule", list(RULES))
def test_state_meets_rule(rule):
    got = []
    for stages, level in STATES:
        g, c = net(f'layer {{ name: "x" type: "ReLU" bottom: "data" top: "x" {rule} }}\n', "TEST", stages, level)
        assert c.diagnostics == []
        got.append("x" in [n.name for n in g.nodes])
    assert tuple(got) == RULES[rule]


def test_legacy_inputs_become_one_input_layer():
    c = Collector()
    text = 'input: "data"\ninput: "im"\n' + "".join(f"input_dim: {d}\n" for d in (1, 3, 8, 8, 1, 2, 1, 1)) + RELU.format("r", "data", "r")
    g = build(parse(text, "t.net"), "TEST", (), 0, c)
    assert c.diagnostics == []
    first = g.nodes[0]
    assert (first.name, first.layer.type, first.bottoms, first.tops) == ("input", "Input", [], ["data", "im"])
    assert str(first.layer.spec.pos) == "t.net:1:1"
    assert [list(s.dim) for s in first.layer.spec.record.input_param.shape] == [[1, 3, 8, 8], [1, 2, 1, 1]]
    assert g.producer["im"] is first and [n.name for n in g.consumers["data"]] == ["r"]
    shaped = build(parse('input: "data"\ninput_shape { dim: 1 dim: 3 }\n', "t.net"), "TEST", (), 0, c)
    assert [list(s.dim) for s in shaped.nodes[0].layer.spec.record.input_param.shape] == [[1, 3]]


def test_legacy_input_dim_count():
    c = Collector()
    g = build(parse('input: "data"\ninput_dim: 1\ninput_dim: 3\n', "t.net"), "TEST", (), 0, c)
    assert diags(c) == [("E0501", "2:1")] and g.nodes == []


# each case: the body after DATA (line 1), the phase, and the diagnostics expected as (code, "line:column")
ERRORS = {
    "E0201 unknown type": ('layer { name: "r" type: "Relu" bottom: "data" top: "r" }\n' + RELU.format("s", "r", "s"),
                           "TEST", [("E0201", "2:19")]),
    "E0202 too many bottoms": ('layer { name: "r" type: "ReLU" bottom: "data" bottom: "label" top: "r" }\n',
                               "TEST", [("E0202", "2:55")]),
    "E0202 no top": ('layer { name: "r" type: "ReLU" bottom: "data" }\n', "TEST", [("E0202", "2:19")]),
    "E0202 loss without labels": ('layer { name: "l" type: "SoftmaxWithLoss" bottom: "data" top: "l" }\n',
                                  "TEST", [("E0202", "2:51")]),
    "E0210 typo": (RELU.format("r", "dta", "r"), "TEST", [("E0210", "2:40")]),
    "E0210 other phase": ('layer { name: "p" type: "ReLU" bottom: "data" top: "p" include { phase: TRAIN } }\n'
                          + RELU.format("r", "p", "r"), "TEST", [("E0210", "3:40")]),
    "E0211 produced twice": (RELU.format("a", "data", "x") + 'layer { name: "b" type: "Sigmoid" bottom: "data" top: "x" }\n',
                             "TEST", [("E0211", "3:55")]),
    "E0211 listed twice": ('layer { name: "s" type: "Split" bottom: "data" top: "x" top: "x" }\n', "TEST", [("E0211", "2:62")]),
    "E0212 read before": (RELU.format("a", "y", "x") + RELU.format("b", "data", "y"), "TEST", [("E0212", "2:40")]),
    "E0212 cycle": (RELU.format("a", "y", "x") + RELU.format("b", "x", "y"), "TEST", [("E0212", "2:40")]),
    "E0203 include and exclude": ('layer { name: "a" type: "ReLU" bottom: "data" top: "x"\n  include { phase: TEST }\n'
                                  '  exclude { phase: TRAIN } }\n' + RELU.format("b", "x", "y"), "TEST", [("E0203", "4:3")]),
    "E0204 loss_weight": ('layer { name: "a" type: "ReLU" bottom: "data" top: "x" loss_weight: 1 loss_weight: 2 }\n',
                          "TEST", [("E0204", "2:56")]),
    "E0204 propagate_down": ('layer { name: "a" type: "ReLU" bottom: "data" top: "x" propagate_down: false propagate_down: true }\n',
                             "TEST", [("E0204", "2:56")]),
    "E0213 no loss": (RELU.format("r", "data", "r") + 'layer { name: "sm" type: "Softmax" bottom: "r" top: "prob" }\n',
                      "TRAIN", [("E0213", "3:20")]),
    "E0213 zero loss_weight": ('layer { name: "l" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "l" loss_weight: 0 }\n',
                               "TRAIN", [("E0213", "2:19")]),
    "W0201 duplicate name": (RELU.format("a", "data", "x") + RELU.format("a", "x", "y"), "TEST", [("W0201", "3:9")]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_diagnostics_by_code_and_position(case):
    body, phase, expected = ERRORS[case]
    _, c = net(body, phase)
    assert diags(c) == expected
    assert all(d.pos.file == "t.net" and d.help for d in c.diagnostics)


def test_diagnostic_messages():
    def message(body, phase="TEST"):
        _, c = net(body, phase)
        (d,) = c.diagnostics
        return d.message, d.help, d.notes
    assert message(ERRORS["E0201 unknown type"][0])[:2] == ("unknown layer type \"Relu\" (layer 'r')", 'did you mean "ReLU"?')
    assert message(ERRORS["E0210 typo"][0]) == ("unknown bottom blob 'dta' (layer 'r', bottom 0)", "did you mean `data`?",
                                                ["'data' is produced by Input 'data' at t.net:1:1"])
    assert message(ERRORS["E0211 produced twice"][0])[0] == "top 'x' of layer 'b' is already produced by layer 'a'"
    assert message(ERRORS["E0212 read before"][0])[0] == "layer 'a' reads 'y' before layer 'b' produces it"
    assert message(ERRORS["E0212 cycle"][0])[0] == "layer 'a' reads 'y' before layer 'b' produces it (a cycle)"
    assert message(ERRORS["E0202 too many bottoms"][0])[0] == "ReLU 'r' takes exactly 1 bottom, got 2"
    assert message(ERRORS["W0201 duplicate name"][0])[2] == ["first used at t.net:2:9"]
    assert message(ERRORS["E0213 no loss"][0], "TRAIN")[0] == "the TRAIN net 't.net' has no loss"


def test_reported_layers_are_left_out_without_cascades():
    g, c = net(ERRORS["E0201 unknown type"][0])
    assert [n.name for n in g.nodes] == ["data", "s"]           # 's' reads the unknown layer's top without E0210
    assert g.nodes[1].bottoms == ["r"] and "r" not in g.producer
    g, c = net(ERRORS["E0203 include and exclude"][0])
    assert [n.name for n in g.nodes] == ["data", "b"] and len(c.diagnostics) == 1
    g, c = net(ERRORS["E0212 read before"][0], "TRAIN")           # no E0213 on top of another error
    assert diags(c) == [("E0212", "2:40")]


def test_no_loss_only_in_train():
    _, c = net(ERRORS["E0213 no loss"][0], "TEST")
    assert c.diagnostics == []


def test_duplicate_names_in_different_phases_are_fine():
    g, c = net('layer { name: "a" type: "ReLU" bottom: "data" top: "x" include { phase: TRAIN } }\n'
               'layer { name: "a" type: "Sigmoid" bottom: "data" top: "x" include { phase: TEST } }\n')
    assert c.diagnostics == [] and g.nodes[1].layer.type == "Sigmoid"


def test_solver_files_are_rejected_and_v1_layers_upgraded():
    c = Collector()
    g = build(parse('net: "n.net"\nbase_lr: 0.01\n', "s.net"), "TRAIN", (), 0, c)
    assert diags(c) == [("E0205", "1:1")] and g.nodes == []
    c = Collector()
    g = build(parse('name: "v1"\ninput: "x"\ninput_dim: 1\ninput_dim: 1\ninput_dim: 4\ninput_dim: 4\n'
                    'layers { name: "c" type: CONVOLUTION bottom: "x" top: "c" blobs_lr: 1 blobs_lr: 2 weight_decay: 1 '
                    'weight_decay: 0 convolution_param { num_output: 2 kernel_size: 3 } }\n', "t.net"), "TEST", (), 0, c)
    assert diags(c) == [("W0206", "7:1")]
    conv = g.nodes[1]
    assert conv.layer.type == "Convolution"
    assert [(p.lr_mult, p.decay_mult) for p in conv.param_specs] == [(1.0, 1.0), (2.0, 0.0)]
    c = Collector()
    build(parse('layers { name: "c" type: RELU }\nlayer { name: "d" type: "ReLU" }\n', "t.net"), "TEST", (), 0, c)
    assert diags(c) == [("E0206", "1:1")]                  # V1 and V2 blocks mixed


def test_build_without_a_collector():
    g = build(parse(DATA + RELU.format("r", "data", "r"), "t.net"), "TEST")
    assert [n.tops for n in g.nodes] == [["data", "label"], ["r"]]


# ---------------------------------------------------------------------------- real-file defects

def test_loss_layer_without_top_gets_an_automatic_one():
    """Caffe's AutoTopBlobs: a loss layer with no top still counts (BVLC's pascal_finetune)."""
    g, c = net('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }\n'
               'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }\n'
               'layer { name: "loss2" type: "EuclideanLoss" bottom: "ip" bottom: "ip" }\n', phase="TRAIN")
    assert c.diagnostics == []
    loss, loss2 = g.nodes[-2:]
    assert loss.tops == ["(automatic)"] and loss.loss_weights == [1.0]
    assert loss2.tops == ["(automatic)_1"] and loss2.loss_weights == [1.0]


def test_unknown_type_is_one_error_even_with_its_own_param_block():
    g, c = net('layer { name: "n" type: "Quantise" bottom: "data" top: "n" quantise_param { eps: 1 } }\n')
    assert [d.code for d in c.diagnostics] == ["E0201"]
    assert c.diagnostics[0].help.startswith("known types: ")      # no look-alike suggested


def test_fork_layer_types_name_their_fork_not_a_look_alike():
    g, c = net('layer { name: "pb" type: "Reorg" bottom: "data" top: "pb" reorg_param { stride: 2 } }\n')
    (d,) = c.diagnostics
    assert d.code == "E0201" and "YOLO Caffe ports" in d.message and "did you mean" not in (d.help or "")
    assert diags(c) == [("E0201", "2:20")]                          # at `type:`


def test_a_typo_still_gets_did_you_mean():
    g, c = net('layer { name: "c" type: "Convolutoin" bottom: "data" top: "c" }\n'
               'layer { name: "r" type: "relu" bottom: "data" top: "r" }\n')
    assert [d.help for d in c.diagnostics] == ['did you mean "Convolution"?', 'did you mean "ReLU"?']
