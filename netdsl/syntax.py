"""Parse: .net text -> AST of frozen dataclasses, each node carrying its source position."""
from __future__ import annotations

import ast as _pyast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import NetdslError, Pos, remember_source


@dataclass(frozen=True)
class Word:
    """An enum word such as MAX, TRAIN or true: kept apart from quoted strings."""
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Scalar:
    value: int | float | str | Word
    pos: Pos


@dataclass(frozen=True)
class Field:
    name: str
    value: "Scalar | Message"
    pos: Pos                      # the field name; value.pos is the value


@dataclass(frozen=True)
class Message:
    fields: tuple[Field, ...]
    pos: Pos

    def get(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]


def _grammar_path() -> Path:
    installed = Path(__file__).parent / "grammars" / "net.lark"      # inside a wheel
    return installed if installed.exists() else Path(__file__).parent.parent / "grammars" / "net.lark"


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(_grammar_path().read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=False, cache=True)


def _unescape(tok: str) -> str:
    # protobuf text escapes are C escapes, a subset of Python's string literal escapes
    try:
        return _pyast.literal_eval(tok)
    except (ValueError, SyntaxError):
        return tok[1:-1]


def _number(text: str) -> int | float:
    t = text.rstrip("fF") if not text.lower().startswith(("0x", "-0x", "+0x")) else text
    if t.lower().lstrip("+-").startswith("0x"):
        return int(t, 16)
    try:
        return int(t)
    except ValueError:
        return float(t)


class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _pos(self, meta_or_tok) -> Pos:
        m = meta_or_tok
        return Pos(self.file, m.line, m.column, m.end_line, m.end_column)

    def start(self, items):
        return Message(tuple(items), Pos(self.file, 1, 1))

    @v_args(meta=True)
    def scalar(self, meta, items):
        name, value = items
        return Field(str(name), value, self._pos(name))

    @v_args(meta=True)
    def message(self, meta, items):
        name, *fields = items
        return Field(str(name), Message(tuple(fields), self._pos(meta)), self._pos(name))

    @v_args(meta=True)
    def list(self, meta, items):
        # `key: [a, b]` is sugar for repeating `key: a  key: b`
        name, *values = items
        return [Field(str(name), v, self._pos(name)) for v in values]

    @v_args(meta=True)
    def number(self, meta, items):
        return Scalar(_number(str(items[0])), self._pos(meta))

    @v_args(meta=True)
    def string(self, meta, items):
        return Scalar("".join(_unescape(str(t)) for t in items), self._pos(meta))

    @v_args(meta=True)
    def word(self, meta, items):
        return Scalar(Word(str(items[0])), self._pos(meta))

    @v_args(meta=True)
    def neg_word(self, meta, items):
        return Scalar(Word("-" + str(items[0])), self._pos(meta))


def _flatten(msg: Message) -> Message:
    """Expand list fields (`key: [a, b]`) into repeated fields, recursively."""
    out: list[Field] = []
    for f in msg.fields:
        for g in (f if isinstance(f, list) else [f]):
            if isinstance(g.value, Message):
                g = Field(g.name, _flatten(g.value), g.pos)
            out.append(g)
    return Message(tuple(out), msg.pos)


_EXPECT_NAMES = {"NAME": "a field name", "NUMBER": "a number", "STRING": "a string",
                 "LBRACE": "'{'", "RBRACE": "'}'", "COLON": "':'", "LSQB": "'['", "RSQB": "']'",
                 "COMMA": "','", "MINUS": "'-'", "LESSTHAN": "'<'", "MORETHAN": "'>'",
                 "$END": "end of file", "_SEP": "',' or ';'"}


def _describe_expected(expected) -> str:
    names = sorted({_EXPECT_NAMES.get(e, e) for e in expected})
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1] if names else "?"


def parse(text: str, file: str = "<string>") -> Message:
    """Parse netdsl / protobuf text into a Message; syntax errors are NetdslError E0001.."""
    remember_source(file, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    return _flatten(_ToAst(file).transform(tree))


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> NetdslError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        line = text.count("\n") + 1
        col = len(text.rsplit("\n", 1)[-1]) + 1
        depth = _open_braces(text)
        return NetdslError("E0002", "unexpected end of file" + (f": {depth} unclosed '{{'" if depth else ""),
                           Pos(file, line, col, line, col + 1),
                           help="close every `name {` with a matching `}`" if depth else
                           "finish the last field: `name: value` or `name { ... }`")
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        hint = ("strings are quoted with \" or ', and a string ends on the same line"
                if ch in "\"'" else "fields look like `name: value` or `name { ... }`")
        return NetdslError("E0001", f"unexpected character {ch!r}", Pos(file, line, col, line, col + 1),
                           help=hint)
    tok = e.token
    end = col + max(len(str(tok)), 1)
    expected = _describe_expected(e.expected)
    if tok.type == "RBRACE":
        msg, hint = "unmatched '}'", "remove it, or open its message with `name {`"
    elif tok.type in ("NAME", "STRING", "NUMBER") and "COLON" in e.expected:
        msg, hint = f"expected ':' or '{{' before {str(tok)!r}", "write `name: value` or `name { ... }`"
    else:
        msg, hint = f"unexpected {str(tok)!r}, expected {expected}", "fields look like `name: value` or `name { ... }`"
    return NetdslError("E0001", msg, Pos(file, line, col, line, end), help=hint)


def _open_braces(text: str) -> int:
    depth = 0
    for tok in _parser().lex(text):
        if tok.type == "LBRACE":
            depth += 1
        elif tok.type == "RBRACE":
            depth -= 1
    return max(depth, 0)


def parse_file(path: str | Path) -> Message:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NetdslError("E0003", f"no such file: {p}", help="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetdslError("E0003", f"cannot read {p}: {e}", help="pass a UTF-8 text .net or .prototxt file") from None
    return parse(text, str(path))
