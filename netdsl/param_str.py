"""py-faster-rcnn's `python_param { param_str }`, read as its layers read it (`yaml.load`), without
YAML's power to build Python objects: a parser for the subset those files use, which constructs
only dicts, lists, strings, numbers, booleans and None.

The subset: one mapping, either in flow style (`{'feat_stride': 16, 'scales': [8, 16]}`) or as
block lines (`'feat_stride': 16` then `'scales': !!python/tuple [4, 8, 16, 32]` on the next line);
values are plain or quoted scalars, flow lists and flow mappings; `!!python/tuple [..]` gives a
list (the only tag py-faster-rcnn's files use; the layers only iterate it); `#` comments. Plain
scalars resolve as PyYAML's YAML 1.1 resolver does: `~`/`null`, `yes`/`no`/`true`/`off`...,
decimal, 0x hex, 0o-less octal (`017`) and 0b integers with `_` separators, floats only with a
dot (`1e-3` is a string, `1.0e-3` a float), `.inf`, `.nan`. Everything else (other tags, anchors
and aliases, block sequences, multi-line scalars, sexagesimal numbers) is a ParamStrError with
the offset where it starts, never a guess."""
from __future__ import annotations

import re

_INT = re.compile(r"[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|0|[1-9][0-9_]*)")
_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+][0-9]+)?")
_BOOL = {v: b for b, words in ((True, "yes true on"), (False, "no false off"))
         for w in words.split() for v in (w, w.capitalize(), w.upper())}
_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
            "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0"}
_HEX = {"x": 2, "u": 4, "U": 8}
TUPLE_TAG = "!!python/tuple"


class ParamStrError(ValueError):
    """Outside the subset, or not YAML: `offset` is the character of param_str where it starts."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.message, self.offset = message, offset


def parse(text: str) -> dict:
    """param_str -> dict (empty for an empty or blank string, as py-faster-rcnn's None would fail
    on its first key lookup anyway: the caller reports the missing key)."""
    p = _Parser(text)
    p.skip(newlines=True)
    if p.at_end():
        return {}
    if p.peek() == "{":
        out = p.flow_map()
        p.skip(newlines=True)
        if not p.at_end():
            p.fail("text after the closing `}`")
        return out
    return p.block_map()


def resolve(plain: str):
    """A plain scalar's value under PyYAML's YAML 1.1 resolver (the subset above)."""
    if plain in ("", "~", "null", "Null", "NULL"):
        return None
    if plain in _BOOL:
        return _BOOL[plain]
    if _INT.fullmatch(plain):
        s = plain.replace("_", "")
        sign, digits = (-1, s[1:]) if s[0] == "-" else (1, s.lstrip("+"))
        base = 2 if digits.startswith("0b") else 16 if digits.startswith("0x") else 8 if len(digits) > 1 and \
            digits[0] == "0" else 10
        return sign * int(digits[2:] if base in (2, 16) else digits, base)
    if _FLOAT.fullmatch(plain):
        return float(plain.replace("_", ""))
    low = plain.lstrip("+-")
    if low in (".inf", ".Inf", ".INF"):
        return float("-inf") if plain[0] == "-" else float("inf")
    if plain in (".nan", ".NaN", ".NAN"):
        return float("nan")
    return plain


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def fail(self, what: str, at: int | None = None):
        raise ParamStrError(what, self.i if at is None else at)

    def at_end(self) -> bool:
        return self.i >= len(self.s)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip(self, newlines: bool) -> None:
        """Spaces (and newlines where allowed) and `#` comments."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            elif c == "#" and (self.i == 0 or s[self.i - 1] in " \t\r\n"):
                while self.i < len(s) and s[self.i] not in "\r\n":
                    self.i += 1
            else:
                return

    def expect(self, c: str, what: str) -> None:
        if self.peek() != c:
            self.fail(f"expected {what}, found {self.peek()!r}" if self.peek() else f"expected {what} at the end")
        self.i += 1

    # -- mappings --------------------------------------------------------------------------
    def block_map(self) -> dict:
        out = {}
        while True:
            key = self.key(flow=False)
            out[key] = self.value(flow=False)
            self.skip(newlines=False)
            if self.at_end():
                return out
            if self.peek() not in "\r\n":
                self.fail(f"expected the end of the line after the value of {key!r}, found {self.peek()!r}")
            self.skip(newlines=True)
            if self.at_end():
                return out
            if self.s[self.i - 1] in " \t":
                self.fail("an indented line: nested block mappings are outside the subset (write `{...}`)")

    def flow_map(self) -> dict:
        out = {}
        for _ in self.flow_items("{", "}", "a `{...}` mapping"):
            key = self.key(flow=True)
            self.skip(newlines=True)
            out[key] = self.value(flow=True)
        return out

    def flow_items(self, open_: str, close: str, what: str):
        """Step through a flow collection: yields once per item, the caller parses it."""
        self.expect(open_, f"`{open_}`")
        self.skip(newlines=True)
        while self.peek() != close:
            yield
            self.skip(newlines=True)
            if self.peek() == ",":
                self.i += 1
                self.skip(newlines=True)
            elif self.peek() != close:
                self.fail(f"expected `,` or `{close}` in {what}" if self.peek() else f"missing the closing `{close}`")
        self.i += 1

    def key(self, flow: bool):
        start = self.i
        if self.peek() in "[{":
            self.fail("a list or mapping as a key is outside the subset")
        key = self.scalar(flow, key=True)
        if isinstance(key, (list, dict)):
            self.fail("a list or mapping as a key is outside the subset", start)
        self.skip(newlines=False)
        if self.peek() != ":":
            self.fail(f"expected `:` after the key {key!r}" if self.peek() else f"the key {key!r} has no `: value`")
        self.i += 1
        if not flow and self.peek() not in " \t\r\n" and not self.at_end():
            self.fail("`:` must be followed by a space")
        self.skip(newlines=False)
        return key

    # -- values ----------------------------------------------------------------------------
    def value(self, flow: bool):
        c = self.peek()
        if c == "!":
            start = self.i
            m = re.compile(r"!\S*").match(self.s, self.i)
            tag = m.group(0)
            if tag != TUPLE_TAG:
                self.fail(f"the tag `{tag}` is outside the subset (it would construct a Python object or "
                          f"retype a value); only `{TUPLE_TAG} [..]` is read, as a list", start)
            self.i = m.end()
            self.skip(newlines=flow)
            if self.peek() != "[":
                self.fail(f"`{TUPLE_TAG}` must be followed by a `[...]` list", start)
            return self.flow_seq()
        if c == "[":
            return self.flow_seq()
        if c == "{":
            return self.flow_map()
        return self.scalar(flow, key=False)

    def flow_seq(self) -> list:
        return [self.value(flow=True) for _ in self.flow_items("[", "]", "a `[...]` list")]

    def scalar(self, flow: bool, key: bool):
        c = self.peek()
        if c == "'":
            return self.single()
        if c == '"':
            return self.double()
        if c in "&*":
            self.fail("anchors and aliases (`&`, `*`) are outside the subset")
        if c in "|>%@`" or (c in "-?" and self.s[self.i + 1:self.i + 2] in ("", " ", "\t", "\r", "\n")):
            what = "a block sequence (`- item`)" if c == "-" else f"`{c}`"
            self.fail(f"{what} is outside the subset: write lists as `[a, b]`")
        start, s = self.i, self.s
        stop = ",[]{}" if flow else ""
        while self.i < len(s):
            ch = s[self.i]
            if ch in "\r\n" or ch in stop or (ch == "#" and s[self.i - 1] in " \t"):
                break
            if ch == ":" and s[self.i + 1:self.i + 2] in ("", " ", "\t", "\r", "\n") + \
                    ((",", "]", "}") if flow else ()):
                if key or flow:
                    break
                self.fail("`: ` inside a value: give one `key: value` per line, or write `{'a': 1, 'b': 2}`")
            self.i += 1
        text = s[start:self.i].rstrip(" \t")
        if ":" in text and not key and re.fullmatch(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?", text):
            self.fail(f"the sexagesimal number {text!r} is outside the subset", start)
        return text if key else resolve(text)

    def single(self) -> str:
        start, s, out = self.i, self.s, []
        self.i += 1
        while True:
            j = s.find("'", self.i)
            if j < 0:
                self.fail("a quoted string with no closing `'`", start)
            out.append(s[self.i:j])
            self.i = j + 1
            if s[self.i:self.i + 1] != "'":
                text = "".join(out)
                if "\n" in text:
                    self.fail("a quoted string across lines is outside the subset", start)
                return text
            out.append("'")
            self.i += 1

    def double(self) -> str:
        start, s, out = self.i, self.s, []
        self.i += 1
        while self.i < len(s):
            c = s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c in "\r\n":
                break
            if c == "\\":
                e = s[self.i + 1:self.i + 2]
                if e in _ESCAPES:
                    out.append(_ESCAPES[e])
                    self.i += 2
                    continue
                n = _HEX.get(e)
                digits = s[self.i + 2:self.i + 2 + n] if n else ""
                if not n or not re.fullmatch(r"[0-9a-fA-F]+", digits) or len(digits) != n:
                    self.fail(f"an unknown escape `\\{e}` in a double-quoted string")
                out.append(chr(int(digits, 16)))
                self.i += 2 + n
                continue
            out.append(c)
            self.i += 1
        self.fail('a quoted string with no closing `"` on its line', start)
