"""Unit tests of netdsl.schema: coercing AST messages into Records against Msg/F schemas, and the
diagnostics for unknown fields, wrong types, repeats, enums and required fields.

The schemas are defined here (copies of Caffe's FillerParameter and ParamSpec with Caffe's defaults,
plus small ones of our own), so the tests depend on schema.py alone, not on the layer registry."""
from __future__ import annotations

import math

import pytest

from netdsl.errors import Collector, Pos
from netdsl.schema import F, Msg, Record, defaults, suggest
from netdsl.syntax import parse

FILLER = Msg("FillerParameter", {
    "type": F(str, "constant"), "value": F(float, 0.0), "min": F(float, 0.0), "max": F(float, 1.0),
    "mean": F(float, 0.0), "std": F(float, 1.0), "sparse": F(int, -1),
    "variance_norm": F("enum", "FAN_IN", choices=("FAN_IN", "FAN_OUT", "AVERAGE")),
})
PARAM_SPEC = Msg("ParamSpec", {
    "name": F(str, ""), "share_mode": F("enum", "STRICT", choices=("STRICT", "PERMISSIVE")),
    "lr_mult": F(float, 1.0), "decay_mult": F(float, 1.0),
})
CONV = Msg("ConvParameter", {"num_output": F(int, required=True, doc="output channels", example="64"),
                             "kernel_size": F(int, repeated=True), "bias_term": F(bool, True), "weight_filler": F(FILLER)})
LAYER = Msg("Layer", {"name": F(str, ""), "type": F(str, ""), "bottom": F(str, repeated=True), "param": F(PARAM_SPEC, repeated=True),
                      "conv_param": F(CONV), "pool_param": F(Msg("PoolParameter", {"kernel_size": F(int, 0)}))},
            context=("layer", "name"))


def coerce(schema: Msg, text: str, **kw) -> tuple[Record, Collector]:
    c = Collector()
    return schema.coerce(parse(text, "s.net"), c, **kw), c


def only(c: Collector):
    assert len(c.diagnostics) == 1, c.diagnostics
    d = c.diagnostics[0]
    return d.code, d.severity, (d.pos.line, d.pos.column, d.pos.end_column), d.message, d.help


def test_caffe_defaults_and_coercion():
    r, c = coerce(FILLER, 'type: "xavier" std: 2 sparse: 3.0')
    assert c.diagnostics == []
    assert r.values() == {"type": "xavier", "value": 0.0, "min": 0.0, "max": 1.0, "mean": 0.0, "std": 2.0, "sparse": 3,
                          "variance_norm": "FAN_IN"}
    assert type(r.std) is float and type(r.sparse) is int           # int -> float, whole float -> int
    assert defaults(PARAM_SPEC).values() == {"name": "", "share_mode": "STRICT", "lr_mult": 1.0, "decay_mult": 1.0}


def test_has_and_pos():
    r, _ = coerce(FILLER, 'type: "xavier"\n  std: 2')
    assert r.has("type") and r.has("std")
    assert not r.has("mean")
    assert r.pos("type") == Pos("s.net", 1, 1, 1, 15)       # name to the end of the value
    assert r.pos("std") == Pos("s.net", 2, 3, 2, 9)
    assert r.pos("mean") == r.pos() == Pos("s.net", 1, 1)    # absent: the message's position
    assert defaults(FILLER).pos() is None and defaults(FILLER).pos("type") is None


def test_attribute_errors():
    r = defaults(FILLER)
    with pytest.raises(AttributeError, match="FillerParameter has no field 'stdev'"):
        r.stdev
    with pytest.raises(AttributeError):
        r._private


def test_nested_and_absent_messages():
    r, c = coerce(CONV, 'num_output: 8 weight_filler { type: "gaussian" std: 0.01 }')
    assert c.diagnostics == []
    assert (r.weight_filler.type, r.weight_filler.std, r.weight_filler.mean) == ("gaussian", 0.01, 0.0)
    assert r.weight_filler.pos() == Pos("s.net", 1, 15, 1, 28)     # the sub-message's field name
    r, _ = coerce(CONV, "num_output: 8")
    assert r.weight_filler.values() == defaults(FILLER).values()
    assert not r.weight_filler.has("type")


def test_repeated_fields_keep_order():
    r, c = coerce(LAYER, 'bottom: "a" bottom: "b" param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }')
    assert c.diagnostics == []
    assert r.bottom == ["a", "b"]
    assert [(p.lr_mult, p.decay_mult) for p in r.param] == [(1.0, 1.0), (2.0, 0.0)]
    assert r.pos("bottom") == Pos("s.net", 1, 1, 1, 12)             # the first one
    r, _ = coerce(CONV, "num_output: 1 kernel_size: [3, 5]")
    assert r.kernel_size == [3, 5]
    assert defaults(LAYER).bottom == [] and defaults(LAYER).param == []


def test_given_twice():
    r, c = coerce(PARAM_SPEC, "lr_mult: 1 lr_mult: 2")
    assert only(c)[:4] == ("E0105", "error", (1, 12, 22), "`lr_mult` is given twice in ParamSpec")
    assert c.diagnostics[0].notes == ["first given at s.net:1:1"]
    assert r.lr_mult == 2.0                                         # the last one wins, as in protobuf
    r, c = coerce(CONV, "num_output: 1 weight_filler { std: 2 }\nweight_filler { mean: 1 }")
    assert only(c)[:4] == ("E0105", "error", (2, 1, 14), "`weight_filler` is given twice in ConvParameter")
    assert (r.weight_filler.std, r.weight_filler.mean) == (1.0, 1.0)  # a repeated message replaces, not merges


def test_unknown_field_suggests():
    assert suggest("kernal_size", ["kernel_size", "pad"]) == "did you mean `kernel_size`?"
    assert suggest("zzz", ["kernel_size", "pad"]) == ""
    _, c = coerce(FILLER, 'typ: "xavier"')
    assert only(c) == ("E0102", "error", (1, 1, 4), "unknown field `typ` in FillerParameter", "did you mean `type`?")
    _, c = coerce(PARAM_SPEC, "zzzzzz: 1")
    assert only(c)[4] == "ParamSpec has the fields: decay_mult, lr_mult, name, share_mode"


def test_unknown_field_in_layer_context_and_misplaced():
    _, c = coerce(LAYER, 'name: "c1" type: "Conv"\nnum_output: 3')
    assert only(c) == ("E0102", "error", (2, 1, 11), "layer 'c1': unknown field `num_output` in Layer",
                       "`num_output` belongs inside conv_param: write `conv_param { num_output: ... }`")
    _, c = coerce(LAYER, 'name: "p" kernel_size: 3')
    assert only(c)[4] == "`kernel_size` is a field of conv_param, pool_param: move it inside one"
    _, c = coerce(LAYER, 'name: "c1" conv_param { num_output: 1 weight_filler { tpye: "x" } }')
    assert only(c)[3:] == ("layer 'c1': unknown field `tpye` in weight_filler", "did you mean `type`?")


def test_open_messages_accept_unknown_fields():
    r, c = coerce(Msg("Open", {"a": F(int, 0)}, open=True), "a: 1 b: 2")
    assert c.diagnostics == [] and r.a == 1


@pytest.mark.parametrize("text, message, column, help", [
    ("sparse: 2.5", "`sparse` expects an integer, got 2.5", 9, "use a whole number: `sparse: 2` or `sparse: 3`"),
    ('std: "1"', '`std` expects a number, got "1"', 6, "remove the quotes: `std: 1`"),
    ("mean: x", "`mean` expects a number, got x", 7, "write `mean: 0.0`"),
    ("type: 3", "`type` expects a quoted string, got 3", 7, 'quote it: `type: "3"`'),
    ("std { }", "`std` expects a number, got a message", 1, "write `std: 1.0`"),
])
def test_wrong_type(text, message, column, help):
    r, c = coerce(FILLER, text)
    code, _, pos, msg, hlp = only(c)
    assert (code, pos[:2], msg, hlp) == ("E0103", (1, column), message, help)
    assert r.values() == defaults(FILLER).values()                  # a bad value keeps the default


def test_scalar_for_a_message_and_bools():
    _, c = coerce(CONV, "num_output: 1 weight_filler: 5")
    assert only(c)[:4] == ("E0103", "error", (1, 15, 31), "`weight_filler` is a message: write `weight_filler { ... }`")
    for word, expected in (("true", True), ("false", False), ("True", True), ("f", False), ("1", True), ("0", False)):
        r, c = coerce(CONV, f"num_output: 1 bias_term: {word}")
        assert (r.bias_term, c.diagnostics) == (expected, [])
    _, c = coerce(CONV, "num_output: 1 bias_term: 2")
    assert only(c)[3:] == ("`bias_term` expects true or false, got 2", "write `bias_term: true` (true or false)")


def test_floats_accept_inf_and_nan_words():
    r, c = coerce(FILLER, "min: -inf max: inf std: nan")
    assert c.diagnostics == []
    assert (r.min, r.max) == (-math.inf, math.inf) and math.isnan(r.std)


def test_bare_word_for_a_string_warns():
    r, c = coerce(FILLER, "type: xavier")
    assert r.type == "xavier"
    assert only(c) == ("W0101", "warning", (1, 7, 13), "`type` expects a quoted string, got the word xavier",
                       'write `type: "xavier"`')
    assert c.errors == [] and c.warnings == c.diagnostics


@pytest.mark.parametrize("text, help", [
    ("share_mode: PERMISIVE", "did you mean `PERMISSIVE`?"),
    ("share_mode: strict", "did you mean `STRICT`? (enum words are case-sensitive)"),
    ("share_mode: NONE", "use one of: STRICT, PERMISSIVE"),
])
def test_enum_choices(text, help):
    r, c = coerce(PARAM_SPEC, text)
    word = text.split()[1]
    assert only(c) == ("E0104", "error", (1, 13, 13 + len(word)), f"invalid value {word} for `share_mode`", help)
    assert c.diagnostics[0].notes == ["`share_mode` must be one of STRICT, PERMISSIVE"]
    assert r.share_mode == "STRICT"


def test_enum_accepts_words_and_strings():
    assert coerce(FILLER, "variance_norm: FAN_OUT")[0].variance_norm == "FAN_OUT"
    assert coerce(FILLER, 'variance_norm: "AVERAGE"')[0].variance_norm == "AVERAGE"


def test_required_fields():
    r, c = coerce(CONV, "kernel_size: 3")
    assert only(c) == ("E0106", "error", (1, 1, 0), "missing required field `num_output` in ConvParameter",
                       "add `num_output: 64` (output channels)")
    assert r.num_output is None
    # inside a layer: located at the sub-message and named as written
    _, c = coerce(LAYER, 'name: "c"\nconv_param { kernel_size: 3 }')
    assert only(c)[2:4] == ((2, 1, 11), "layer 'c': missing required field `num_output` in conv_param")
    # an absent message is all defaults and requires nothing
    assert CONV.coerce(None, c).num_output is None
    # a wrong value still counts as given
    _, c = coerce(CONV, 'num_output: "8"')
    assert [d.code for d in c.diagnostics] == ["E0103"]


def test_where_prefix():
    _, c = coerce(PARAM_SPEC, "lr_mult: x", where="layer 'conv1': ")
    assert only(c)[3] == "layer 'conv1': `lr_mult` expects a number, got x"
