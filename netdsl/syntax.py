"""Parse: .net text -> AST of immutable nodes (named tuples), each carrying its source position."""
from __future__ import annotations

import ast as _pyast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from .errors import NetdslError, Pos, remember_source


@dataclass(frozen=True)
class Word:
    """An enum word such as MAX, TRAIN or true: kept apart from quoted strings."""
    text: str

    def __str__(self) -> str:
        return self.text


class Scalar(NamedTuple):
    value: int | float | str | Word
    pos: Pos


class Field(NamedTuple):
    name: str
    value: Scalar | Message
    pos: Pos                      # the field name; value.pos is the value


class Message(NamedTuple):
    fields: tuple[Field, ...]
    pos: Pos

    def get(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]


def _grammar_path() -> Path:
    installed = Path(__file__).parent / "grammars" / "net.lark"      # inside a wheel
    return installed if installed.exists() else Path(__file__).parent.parent / "grammars" / "net.lark"


@lru_cache(maxsize=1)
def _parser():
    from lark import Lark  # imported only when needed: the fast path below does not use it
    return Lark(_grammar_path().read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=False, cache=True)


def _unescape(tok: str) -> str:
    # protobuf text escapes are C escapes, a subset of Python's string literal escapes
    if "\\" not in tok:
        return tok[1:-1]
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


@lru_cache(maxsize=1)
def _to_ast():
    """Lark tree -> AST (the reference path; the fast parser below builds the same AST directly)."""
    from lark import Transformer, v_args

    class ToAst(Transformer):
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

    return ToAst


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


# ------------------------------------------------------------------------------ fast path
# The Lark grammar above is the definition of the language. Parsing a 36 KB GoogLeNet with Lark
# costs ~60 ms (LALR + tree + transform), so well-formed text goes through this hand-written
# scanner and parser for the same grammar (~5x faster), which builds the identical AST. On the
# first thing it does not expect it gives up and the text is parsed again by Lark, whose error
# is what the user sees. tests/test_fuzz.py checks that both accept the same texts and agree.

_TOKEN = re.compile(r"""
  (?P<WS>[ \t\f\r\n]+)
| (?P<COMMENT>\#[^\n]*)
| (?P<NUMBER>[-+]?0[xX][0-9a-fA-F]+|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?)
| (?P<NAME>[A-Za-z_][A-Za-z0-9_.]*)
| (?P<STRING>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
| (?P<P>[:{}<>\[\],;-])
""", re.VERBOSE)
_CLOSE = {"{": "}", "<": ">"}
MAX_DEPTH = 100               # deeper nesting is certainly a mistake (and would exhaust the stack)


class _GiveUp(Exception):
    """The fast parser met something it does not expect: let Lark parse (and diagnose) it."""


# one findall over the text: (whitespace before, token) pairs, kinds told apart by first character
_SPLIT = re.compile(r"""([ \t\f\r\n]*)(\#[^\n]*|[-+]?0[xX][0-9a-fA-F]+|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?"""
                    r"""|[A-Za-z_][A-Za-z0-9_.]*|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|[:{}<>\[\],;-])""")
_KIND = {**dict.fromkeys("0123456789+.", "NUMBER"), **dict.fromkeys('"\'', "STRING"), "#": "COMMENT",
         **dict.fromkeys("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_", "NAME")}


def _tokens(text: str) -> list[tuple]:
    """(kind, text, line, column, end_column) for every significant token; no token spans lines.
    Punctuation is its own kind ("{", ":", ...)."""
    out = []
    append = out.append
    pos, line, line_start = 0, 1, 0
    kinds = _KIND
    for ws, tok in _SPLIT.findall(text):
        if ws:
            nl = ws.count("\n")
            if nl:
                line += nl
                line_start = pos + ws.rindex("\n") + 1
            pos += len(ws)
        n = len(tok)
        kind = kinds.get(tok[0])
        if kind is None:
            kind = "NUMBER" if tok[0] == "-" and n > 1 else tok
        if kind != "COMMENT":
            col = pos - line_start + 1
            append((kind, tok, line, col, col + n))
        pos += n
    if text[pos:].strip(" \t\f\r\n"):     # findall skipped a character no token matches
        raise _GiveUp
    return out


def _parse_fast(text: str, file: str) -> Message:
    toks = _tokens(text)
    toks.append(("$END", "", 0, 0, 0))
    i = 0
    top: list[Field] = []
    # open messages: (name token, fields, closer)
    stack: list[tuple[tuple, list[Field], str]] = []
    fields = top
    while True:
        kind = toks[i][0]
        if kind == "NAME":
            name = toks[i]
            npos = Pos(file, name[2], name[3], name[2], name[4])
            i += 1
            kind = toks[i][0]
            if kind == ":":
                i += 1
                kind = toks[i][0]
            if kind in _CLOSE:                       # `name {` or `name: {` (or < >)
                if len(stack) >= MAX_DEPTH:
                    raise _GiveUp
                stack.append((name, fields, _CLOSE[kind]))
                fields = []
                i += 1
                continue
            if toks[i - 1][0] != ":":
                raise _GiveUp
            if kind == "[":                          # `name: [a, b]` = `name: a  name: b`
                i += 1
                if toks[i][0] != "]":
                    while True:
                        value, i = _value(toks, i, file)
                        fields.append(Field(name[1], value, npos))
                        if toks[i][0] == ",":
                            i += 1
                            continue
                        if toks[i][0] != "]":
                            raise _GiveUp
                        break
                i += 1
            else:
                value, i = _value(toks, i, file)
                fields.append(Field(name[1], value, npos))
            if toks[i][0] in (",", ";"):
                i += 1
        elif stack and kind == stack[-1][2]:
            name, parent, _ = stack.pop()
            close = toks[i]
            npos = Pos(file, name[2], name[3], name[2], name[4])
            parent.append(Field(name[1], Message(tuple(fields), Pos(file, name[2], name[3], close[2], close[4])),
                                npos))
            fields = parent
            i += 1
            if toks[i][0] in (",", ";"):
                i += 1
        elif kind == "$END" and not stack:
            return Message(tuple(top), Pos(file, 1, 1))
        else:
            raise _GiveUp


def _value(toks, i, file):
    kind, text, line, col, end = toks[i]
    if kind == "NUMBER":
        return Scalar(_number(text), Pos(file, line, col, line, end)), i + 1
    if kind == "NAME":
        return Scalar(Word(text), Pos(file, line, col, line, end)), i + 1
    if kind == "-":
        nxt = toks[i + 1]
        if nxt[0] != "NAME":
            raise _GiveUp
        return Scalar(Word("-" + nxt[1]), Pos(file, line, col, nxt[2], nxt[4])), i + 2
    if kind == "STRING":
        parts = [text]
        last = toks[i]
        i += 1
        while toks[i][0] == "STRING":
            last = toks[i]
            parts.append(last[1])
            i += 1
        return Scalar("".join(_unescape(t) for t in parts), Pos(file, line, col, last[2], last[4])), i
    raise _GiveUp


def parse_lark(text: str, file: str = "<string>") -> Message:
    """The reference parser (the grammar in grammars/net.lark); raises NetdslError E0001/E0002."""
    from lark.exceptions import UnexpectedInput
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    except RecursionError:
        raise _too_deep(text, file) from None
    try:
        return _flatten(_to_ast()(file).transform(tree))
    except RecursionError:
        raise _too_deep(text, file) from None


def parse(text: str, file: str = "<string>") -> Message:
    """Parse netdsl / protobuf text into a Message; syntax errors are NetdslError E0001.."""
    remember_source(file, text)
    try:
        return _parse_fast(text, file)
    except _GiveUp:
        pass
    if _depth(text) > MAX_DEPTH:
        raise _too_deep(text, file)
    return parse_lark(text, file)


def _depth(text: str) -> int:
    depth = deepest = 0
    for t in _scan(text):
        if t[0] in _CLOSE:
            depth += 1
            deepest = max(deepest, depth)
        elif t[0] in ("}", ">"):
            depth -= 1
    return deepest


def _too_deep(text: str, file: str) -> NetdslError:
    depth = 0
    for t in _scan(text):
        if t[0] in _CLOSE:
            depth += 1
            if depth > MAX_DEPTH:
                return NetdslError("E0001", f"messages are nested more than {MAX_DEPTH} deep", _tokpos(file, t),
                                   help="close the messages above with `}`; nets nest a few levels at most")
        elif t[0] in ("}", ">"):
            depth -= 1
    return NetdslError("E0001", f"messages are nested more than {MAX_DEPTH} deep", Pos(file, 1, 1),
                       help="close the messages with `}`; nets nest a few levels at most")


def _scan(text: str) -> list[tuple]:
    """Like _tokens, but never fails: an unexpected character becomes a ("?", ch, ...) token.
    Used only to explain syntax errors."""
    out = []
    pos, n, line, line_start = 0, len(text), 1, 0
    while pos < n:
        m = _TOKEN.match(text, pos)
        end = m.end() if m else pos + 1
        kind = m.lastgroup if m else "?"
        if kind == "WS":
            nl = text.count("\n", pos, end)
            if nl:
                line += nl
                line_start = text.rindex("\n", pos, end) + 1
        elif kind != "COMMENT":
            tok = text[pos:end]
            col = pos - line_start + 1
            out.append((tok if kind == "P" else kind, tok, line, col, col + end - pos))
        pos = end
    return out


def _structure(toks: list[tuple]):
    """Replay the braces: (messages still open at the end, the first message that looks unclosed
    judging by indentation, the last message closed before each token index)."""
    open_: list[tuple] = []          # (name token, opener token, indent column of its line)
    suspect = None
    last_closed: list[tuple | None] = []
    closed = None
    line_first: dict[int, int] = {}
    for k, t in enumerate(toks):
        line_first.setdefault(t[2], t[3])
    for k, t in enumerate(toks):
        last_closed.append(closed)
        kind = t[0]
        first_on_line = line_first.get(t[2]) == t[3]
        if first_on_line and open_ and suspect is None:
            name, opener, indent = open_[-1]
            closer = _CLOSE[opener[0]]
            if t[3] < indent or (t[3] == indent and kind != closer):
                suspect = (name, opener, t)
        if kind in _CLOSE:
            name = toks[k - 1] if k and toks[k - 1][0] == "NAME" else (
                toks[k - 2] if k > 1 and toks[k - 1][0] == ":" and toks[k - 2][0] == "NAME" else t)
            open_.append((name, t, line_first.get(name[2], name[3])))
        elif kind in ("}", ">") and open_ and kind == _CLOSE[open_[-1][1][0]]:
            name, opener, _ = open_.pop()
            closed = (name, t)
    return open_, suspect, last_closed


def _tokpos(file: str, t: tuple) -> Pos:
    return Pos(file, t[2], t[3], t[2], t[4])


def _syntax_error(e, text: str, file: str) -> NetdslError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken
    toks = _scan(text)
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    # the index of the offending token in our own scan (for the tokens around it)
    at = next((k for k, t in enumerate(toks) if (t[2], t[3]) >= (line, col)), len(toks))
    prev = toks[at - 1] if at else None
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        return _eof_error(text, file, toks)
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        if ch in "\"'":
            end = text.find("\n", e.pos_in_stream)
            end = len(text) if end < 0 else end
            width = len(text[e.pos_in_stream:end].rstrip()) or 1
            return NetdslError("E0001", "unterminated string", Pos(file, line, col, line, col + width),
                               notes=["a string ends with the same quote it starts with, on the same line"],
                               help=f"add the closing {ch} (write \\{ch} for a quote inside the string)")
        if ch in "+." and prev is not None:
            hint = "numbers look like 3, -1, 0.5, 1e-4 or 0x1F"
        else:
            hint = "fields look like `name: value` or `name { ... }`; comments start with #"
        return NetdslError("E0001", f"unexpected character {ch!r}", Pos(file, line, col, line, col + 1),
                           help=hint)
    tok = e.token
    pos = Pos(file, line, col, line, col + max(len(str(tok)), 1))
    expected = set(e.expected)
    shown = str(tok)
    if "COLON" in expected and "LBRACE" in expected and prev is not None and prev[0] == "NAME":
        if tok.type in ("RBRACE", "MORETHAN", "RSQB", "COMMA", "_SEP", "COLON"):
            return NetdslError("E0001", f"field `{prev[1]}` has no value", _tokpos(file, prev),
                               help=f"write `{prev[1]}: value` or `{prev[1]} {{ ... }}`, or remove it")
        return NetdslError("E0001", f"expected ':' or '{{' after `{prev[1]}`, found {shown!r}", pos,
                           help=f"write `{prev[1]}: {shown}`" + (f" (or `{prev[1]} {{ ... }}` for a message)"
                                                               if tok.type == "NAME" else ""))
    if tok.type in ("RBRACE", "MORETHAN"):
        if "RBRACE" in expected or "MORETHAN" in expected:
            return NetdslError("E0001", f"'{tok}' does not match the open message", pos,
                               help="close a message opened with `{` by `}`, and one opened with `<` by `>`")
        if "NAME" in expected:
            _, _, last_closed = _structure(toks)
            closed = last_closed[at] if at < len(last_closed) else None
            notes = [(f"every message is already closed here: the last one, `{closed[0][1]}`, was closed at "
                      f"{_tokpos(file, closed[1])}")] if closed else []
            return NetdslError("E0001", f"unmatched '{tok}'", pos, notes=notes,
                               help="remove it, or open its message with `name {`")
    if prev is not None and prev[0] == ":" and tok.type not in ("NUMBER", "STRING", "NAME"):
        field = toks[at - 2][1] if at > 1 else ""
        return NetdslError("E0001", f"expected a value after `{field}:`, found {shown!r}", pos,
                           help=_value_help(prev))
    if tok.type == "COLON":
        return NetdslError("E0001", "':' without a field name before it", pos,
                           help="write the field's name before the colon: `name: value`")
    if tok.type in ("NUMBER", "STRING") and "NAME" in expected and prev is not None:
        field = next((toks[k - 1][1] for k in range(at - 1, 0, -1) if toks[k][0] == ":" and toks[k - 1][0] == "NAME"),
                     None)
        if field:
            return NetdslError("E0001", f"a second value {shown} after the value of `{field}`", pos,
                               help=f"one value per field: remove it, repeat the field (`{field}: {shown}`), or "
                                    f"write a list (`{field}: [a, b]`)")
    return NetdslError("E0001", f"unexpected {shown!r}, expected {_describe_expected(expected)}", pos,
                       help="fields look like `name: value` or `name { ... }`, one after another")


def _value_help(prev) -> str:
    return "give the field a value: a number (3, -1, 0.5), a \"string\", an enum word (MAX) or a message { ... }"


def _eof_error(text: str, file: str, toks: list[tuple]) -> NetdslError:
    if toks:                        # just after the last token: where the missing text would go
        last = toks[-1]
        eof = Pos(file, last[2], last[4], last[2], last[4] + 1)
    else:
        eof = Pos(file, 1, 1, 1, 2)
    open_, suspect, _ = _structure(toks)
    if not open_:
        last = toks[-1] if toks else None
        what = f" after `{last[1]}`" if last else ""
        return NetdslError("E0002", f"unexpected end of file{what}", eof,
                           help="finish the last field: `name: value` or `name { ... }`")
    n = len(open_)
    noun = "message is" if n == 1 else "messages are"
    chain = ", ".join(f"`{name[1]} {op[1]}` at {_tokpos(file, name)}" for name, op, _ in open_)
    last = toks[-1]
    field = toks[-2][1] if last[0] == ":" and len(toks) > 1 else last[1] if last[0] == "NAME" else None
    if field is not None:          # cut off in the middle of a field
        closers = " ".join(_CLOSE[op[0]] for _, op, _ in reversed(open_))
        return NetdslError("E0002", f"unexpected end of file in the middle of field `{field}`", eof,
                           notes=[f"still open at the end of the file: {chain}"],
                           help=f"finish it (`{field}: value` or `{field} {{ ... }}`), then close the open "
                                f"messages with `{closers}`")
    if suspect is not None:
        name, opener, first = suspect
        closer = _CLOSE[opener[0]]
        return NetdslError("E0002", f"unexpected end of file: {n} {noun} not closed; `{name[1]} {opener[1]}` "
                           f"is probably missing its '{closer}'", _tokpos(file, name),
                           notes=[f"still open at the end of the file: {chain}",
                                  f"line {first[2]} (`{first[1]}`) is indented as if `{name[1]}` were already closed"],
                           help=f"add '{closer}' to close `{name[1]}` before line {first[2]}")
    name, opener, _ = open_[-1]
    closer = _CLOSE[opener[0]]
    return NetdslError("E0002", f"unexpected end of file: {n} {noun} not closed", _tokpos(file, name),
                       notes=[f"still open at the end of the file: {chain}"],
                       help=f"add '{closer}' at the end of `{name[1]} {opener[1]} ... {closer}`")


def parse_file(path: str | Path) -> Message:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NetdslError("E0003", f"no such file: {p}", help="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetdslError("E0003", f"cannot read {p}: {e}", help="pass a UTF-8 text .net or .prototxt file") from None
    return parse(text, str(path))
