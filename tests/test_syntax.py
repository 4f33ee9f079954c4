"""Unit tests of netdsl.syntax: the AST (messages, fields, values, positions) and located syntax errors."""
from __future__ import annotations

import pytest

from netdsl.errors import NetdslError, Pos
from netdsl.syntax import Field, Message, Scalar, Word, parse, parse_file


def value(text: str):
    """The value of the only field of a one-field text."""
    (f,) = parse(text, "t.net").fields
    assert isinstance(f.value, Scalar)
    return f.value.value


def error(text: str):
    with pytest.raises(NetdslError) as info:
        parse(text, "t.net")
    return info.value.diagnostic


def test_fields_messages_and_positions():
    m = parse('name: "x"\nlayer {\n  top: "a" top: "b"\n  d: [1, 2, 3]\n}\n', "t.net")
    assert isinstance(m, Message)
    assert m.pos == Pos("t.net", 1, 1)
    assert [f.name for f in m.fields] == ["name", "layer"]
    name = m.fields[0]
    assert isinstance(name, Field)
    assert name.pos == Pos("t.net", 1, 1, 1, 5)                 # the field name
    assert name.value == Scalar("x", Pos("t.net", 1, 7, 1, 10))   # the value, quotes included
    layer = m.get("layer")[0].value
    assert isinstance(layer, Message)
    assert layer.pos == Pos("t.net", 2, 1, 5, 2)                # from the name to the closing brace
    assert [f.value.value for f in layer.get("top")] == ["a", "b"]
    assert [f.pos.column for f in layer.get("top")] == [3, 12]
    assert [f.value.pos.column for f in layer.get("top")] == [8, 17]
    # a list is the field repeated, each value keeping its own position and the name's
    d = layer.get("d")
    assert [f.value.value for f in d] == [1, 2, 3]
    assert [f.value.pos.column for f in d] == [7, 10, 13]
    assert {f.pos for f in d} == {Pos("t.net", 4, 3, 4, 4)}
    assert m.get("missing") == []


@pytest.mark.parametrize("text, expected", [
    ("a: 10", 10), ("a: -3", -3), ("a: +3", 3), ("a: 0x1F", 31), ("a: -0x10", -16),
    ("a: 1.5", 1.5), ("a: .5", 0.5), ("a: 5.", 5.0), ("a: 2.5f", 2.5), ("a: 1e-4", 0.0001), ("a: 1E3", 1000.0),
    ("a: -2.5e2", -250.0),
])
def test_numbers(text, expected):
    v = value(text)
    assert v == expected
    assert type(v) is type(expected)


def test_whole_floats_stay_floats():
    assert type(value("a: 2.0")) is float
    assert type(value("a: 1e5")) is float


@pytest.mark.parametrize("text, expected", [
    ('a: "conv1"', "conv1"), ("a: 'rpn-data'", "rpn-data"), ('a: "x\\"y\\n"', 'x"y\n'), ("a: 'it\\'s'", "it's"),
    ('a: "\\101\\x42\\t"', "AB\t"), ('a: "a" "b"', "ab"), ("a: 'x' \"y\"", "xy"), ('a: "#not a comment"', "#not a comment"),
    ('a: ""', ""),
])
def test_strings(text, expected):
    assert value(text) == expected


def test_adjacent_strings_span_all_pieces():
    (f,) = parse('a: "a" "b"', "t.net").fields
    assert f.value.pos == Pos("t.net", 1, 4, 1, 11)


@pytest.mark.parametrize("text, word", [("a: MAX", "MAX"), ("a: true", "true"), ("a: TRAIN", "TRAIN"),
                                        ("a: -inf", "-inf"), ("a: - MAX", "-MAX")])
def test_enum_words_are_kept_apart_from_strings(text, word):
    v = value(text)
    assert v == Word(word)
    assert str(v) == word
    assert v != word                  # a Word is not the quoted string
    assert value(f'a: "{word}"') == word


def test_negative_word_position_includes_the_sign():
    (f,) = parse("a: -inf", "t.net").fields
    assert f.value.pos == Pos("t.net", 1, 4, 1, 8)


def test_comments_and_whitespace_are_ignored():
    m = parse("# heading\na: 1   # trailing\n\t b: 2\n# end", "t.net")
    assert [(f.name, f.value.value) for f in m.fields] == [("a", 1), ("b", 2)]
    assert m.fields[1].pos == Pos("t.net", 3, 3, 3, 4)            # a tab counts as one column
    assert parse("", "t.net").fields == ()
    assert parse("# only a comment\n", "t.net").fields == ()


def test_message_forms_are_equivalent():
    def shape(text):
        def strip(m):
            return tuple((f.name, strip(f.value) if isinstance(f.value, Message) else f.value.value) for f in m.fields)
        return strip(parse(text, "t.net"))
    expected = (("p", (("shape", (("dim", 1), ("dim", 3))),)),)
    assert shape("p { shape { dim: 1 dim: 3 } }") == expected
    assert shape("p: { shape: { dim: 1 dim: 3 } }") == expected
    assert shape("p < shape < dim: 1 dim: 3 > >") == expected
    assert shape("p { shape { dim: [1, 3] } }") == expected
    assert shape("p {\n  shape {\n    dim: 1\n    dim: 3\n  }\n}\n") == expected
    assert shape("p { }") == (("p", ()),)


def test_empty_list_gives_no_field():
    assert parse("a: []", "t.net").fields == ()


def test_semicolon_and_comma_after_a_message():
    assert [f.name for f in parse("a: 1; b: 2;", "t.net").fields] == ["a", "b"]
    assert [f.name for f in parse("a { b: 1 }, c: 2", "t.net").fields] == ["a", "c"]
    assert [f.name for f in parse("a: [1, 2], b: 3", "t.net").fields] == ["a", "a", "b"]


def test_comma_separator_after_a_scalar():
    m = parse("shape { dim: 1, dim: 3; }", "t.net")
    assert [f.value.value for f in m.fields[0].value.fields] == [1, 3]


@pytest.mark.parametrize("text, code, line, column, message", [
    ('layer {\n  name "x"\n}', "E0001", 2, 8, "expected ':' or '{' after `name`, found '\"x\"'"),
    ('a: "abc\nb: 1', "E0001", 1, 4, "unterminated string"),
    ("a: 1 @", "E0001", 1, 6, "unexpected character '@'"),
    ("a: ]", "E0001", 1, 4, "expected a value after `a:`, found ']'"),
    (": 1", "E0001", 1, 1, "':' without a field name before it"),
    ("a: 1\nb: 1 2", "E0001", 2, 6, "a second value 2 after the value of `b`"),
    ("a: 1\n}\n", "E0001", 2, 1, "unmatched '}'"),
    ("a { b: 1 >", "E0001", 1, 10, "'>' does not match the open message"),
    ("a  b", "E0001", 1, 4, "expected ':' or '{' after `a`, found 'b'"),
    ("a:", "E0002", 1, 3, "unexpected end of file after `:`"),
    ("layer {\n  a: 1\n", "E0002", 1, 1, "unexpected end of file: 1 message is not closed"),
    ("x {\n  a {\n    b: 1\n  c: 2\n}\n", "E0002", 2, 3,
     "unexpected end of file: 1 message is not closed; `a {` is probably missing its '}'"),
    ("{" * 101 + "}" * 101, "E0001", 1, 101, "messages are nested more than 100 deep"),
])
def test_syntax_errors_are_located(text, code, line, column, message):
    d = error(text)
    assert (d.code, d.pos.file, d.pos.line, d.pos.column, d.message) == (code, "t.net", line, column, message)
    assert d.severity == "error"
    assert d.help


def test_unclosed_message_notes_name_what_is_open():
    d = error("layer {\n  p {\n    a: 1\n")
    assert d.notes == ["still open at the end of the file: `layer {` at t.net:1:1, `p {` at t.net:2:3"]
    assert d.help == "add '}' at the end of `p { ... }`"


def test_stray_brace_names_the_last_closed_message():
    d = error("a { b: 1 }\n}\n")
    assert d.notes == ["every message is already closed here: the last one, `a`, was closed at t.net:1:10"]


def test_missing_value_before_closing_brace():
    d = error('layer {\n  name: "x"\n  top:\n}\n')
    assert d.code == "E0001"
    assert "unmatched" not in d.message
    assert "`top:`" in d.message


def test_parse_file(tmp_path):
    p = tmp_path / "n.net"
    p.write_text('name: "n"\nlayer { type: "ReLU" }\n', encoding="utf-8")
    m = parse_file(p)
    assert m.pos.file == str(p)
    assert m.get("layer")[0].pos == Pos(str(p), 2, 1, 2, 6)
    assert parse_file(str(p)) == m


def test_parse_file_errors(tmp_path):
    with pytest.raises(NetdslError) as info:
        parse_file(tmp_path / "missing.net")
    assert info.value.diagnostic.code == "E0003"
    assert info.value.diagnostic.message == f"no such file: {tmp_path / 'missing.net'}"
    bad = tmp_path / "latin1.net"
    bad.write_bytes(b'name: "caf\xe9"\n')
    with pytest.raises(NetdslError) as info:
        parse_file(bad)
    assert info.value.diagnostic.code == "E0003"
    p = tmp_path / "broken.net"
    p.write_text("a: 1\nb c\n", encoding="utf-8")
    with pytest.raises(NetdslError) as info:
        parse_file(p)
    assert str(info.value.diagnostic.pos) == f"{p}:2:3"
