"""Parse: .net text -> AST of immutable nodes (named tuples), each carrying its source position."""
from __future__ import annotations

import ast as _pyast
import gc
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from lark import Lark, Transformer
from lark.exceptions import UnexpectedInput

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


class _ToAst(Transformer):
    """Lark's embedded transformer (LALR callbacks build the AST while parsing, no parse tree):
    tokens carry their positions; `key: [a, b]` lists become repeated fields."""

    file = "<string>"            # set by parse() before each run

    def _pos(self, first, last=None) -> Pos:
        last = last or first
        return Pos(self.file, first.line, first.column, last.end_line, last.end_column)

    @staticmethod
    def _fields(items) -> tuple:
        out = []
        for f in items:
            out.extend(f) if isinstance(f, list) else out.append(f)
        return tuple(out)

    def start(self, items):
        return Message(self._fields(items), Pos(self.file, 1, 1))

    def scalar(self, items):
        name, value = items
        return Field(str(name), value, self._pos(name))

    def message(self, items):
        name, opener, *fields, closer = items
        return Field(str(name), Message(self._fields(fields), self._pos(name, closer)), self._pos(name))

    def list(self, items):
        name, *values = items
        return [Field(str(name), v, self._pos(name)) for v in values]

    def number(self, items):
        return Scalar(_number(str(items[0])), self._pos(items[0]))

    def string(self, items):
        return Scalar("".join(_unescape(str(t)) for t in items), self._pos(items[0], items[-1]))

    def word(self, items):
        return Scalar(Word(str(items[0])), self._pos(items[0]))

    def neg_word(self, items):
        return Scalar(Word("-" + str(items[1])), self._pos(items[0], items[1]))


_TRANSFORMER = _ToAst()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    # the basic lexer: the grammar's terminals never overlap, so Lark's contextual lexer only costs time
    return Lark(_grammar_path().read_text(), parser="lalr", lexer="basic", transformer=_TRANSFORMER,
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


_EXPECT_NAMES = {"NAME": "a field name", "NUMBER": "a number", "STRING": "a string",
                 "LBRACE": "'{'", "RBRACE": "'}'", "COLON": "':'", "LSQB": "'['", "RSQB": "']'",
                 "_COMMA": "','", "_SEMI": "';'", "MINUS": "'-'", "LESSTHAN": "'<'", "MORETHAN": "'>'",
                 "$END": "end of file"}


def _describe_expected(expected) -> str:
    names = sorted({_EXPECT_NAMES.get(e, e) for e in expected})
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1] if names else "?"


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


def parse(text: str, file: str = "<string>") -> Message:
    """Parse netdsl / protobuf text with the Lark grammar into a Message; syntax errors are
    NetdslError E0001 (and E0002 at end of file), explained with the scan below."""
    remember_source(file, text)
    parser = _parser()
    _TRANSFORMER.file = file
    try:
        with paused_gc():
            return parser.parse(text)
    except UnexpectedInput as e:
        if _depth(text) > MAX_DEPTH:
            raise _too_deep(text, file) from None
        raise _syntax_error(e, text, file) from None


@contextmanager
def paused_gc():
    """Pause Python's cyclic garbage collector while building a big acyclic structure (an AST, a
    shaped graph): its collections rescan the objects made so far and cost time for nothing here.
    With Lark's basic lexer this took parse + check of a 5 MB net from 0.29 to 0.45 MB/s
    (benchmarks/check_speed.py). Reference counting still frees everything; the collector resumes
    afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
        if tok.type in ("RBRACE", "MORETHAN", "RSQB", "_COMMA", "_SEMI", "COLON"):
            return NetdslError("E0001", f"field `{prev[1]}` has no value", _tokpos(file, prev),
                               help=f"write `{prev[1]}: value` or `{prev[1]} {{ ... }}`, or remove it")
        return NetdslError("E0001", f"expected ':' or '{{' after `{prev[1]}`, found {shown!r}", pos,
                           help=f"write `{prev[1]}: {shown}`" + (f" (or `{prev[1]} {{ ... }}` for a message)"
                                                               if tok.type == "NAME" else ""))
    if prev is not None and prev[0] == ":" and tok.type not in ("NUMBER", "STRING", "NAME"):
        field = toks[at - 2][1] if at > 1 else ""
        return NetdslError("E0001", f"expected a value after `{field}:`, found {shown!r}", pos,
                           help=_value_help(prev))
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


MAX_NET_BYTES = 256 << 20       # a net or solver text larger than this is not one (GoogLeNet's is 36 KB)


def parse_file(path: str | Path) -> Message:
    p = Path(path)
    try:
        if p.exists() and not p.is_file():     # a directory, /dev/zero, a FIFO: never read it to the end
            raise NetdslError("E0003", f"{p} is not a regular file", help="pass a .net or .prototxt text file")
        if p.exists() and p.stat().st_size > MAX_NET_BYTES:
            raise NetdslError("E0003", f"{p} is {p.stat().st_size >> 20} MiB: not a net definition",
                              help="pass the .prototxt (text), not the weights or a dataset")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NetdslError("E0003", f"no such file: {p}", help="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetdslError("E0003", f"cannot read {p}: {e}", help="pass a UTF-8 text .net or .prototxt file") from None
    return parse(text, str(path))
