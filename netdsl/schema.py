"""Typed message schemas (Caffe's protobuf messages) and coercion of AST messages into records."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import Collector, Pos
from .syntax import Field as AstField
from .syntax import Message, Scalar, Word


@dataclass(frozen=True)
class F:
    """One field of a message schema: a scalar type, an enum, or a nested message."""
    type: Any                       # int, float, bool, str, "enum", or a Msg
    default: Any = None
    repeated: bool = False
    choices: tuple[str, ...] = ()   # enum words
    required: bool = False
    doc: str = ""
    example: str = ""               # a typical value, for help lines (`add num_output: 64`)


@dataclass
class Msg:
    name: str
    fields: dict[str, F]
    open: bool = False              # accept unknown fields silently (foreign extensions)
    # (noun, field): messages of this type are named in diagnostics by a field of theirs,
    # e.g. ("layer", "name") -> "layer 'conv1': unknown field ..."
    context: tuple[str, str] | None = None

    def coerce(self, m: Message | None, c: Collector, where: str = "", pos: Pos | None = None,
               label: str | None = None) -> Record:
        return coerce(self, m, c, where, pos, label)


@dataclass
class Record:
    """A coerced message: attribute access with defaults, plus where each field was written."""
    _schema: Msg
    _values: dict[str, Any]
    _pos: dict[str, Pos]
    _msg_pos: Pos | None
    _ast: Message | None = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            v = self._values[name]
        except KeyError:
            raise AttributeError(f"{self._schema.name} has no field {name!r}") from None
        if type(v) is _Absent:          # an absent sub-message: its defaults, made on first use
            v = self._values[name] = defaults(v.schema)
        return v

    def has(self, name: str) -> bool:
        return name in self._pos

    def pos(self, name: str | None = None) -> Pos | None:
        return self._pos.get(name, self._msg_pos) if name else self._msg_pos

    def values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._values}

    def item_pos(self, name: str, index: int) -> Pos | None:
        """Where the value of repetition `index` of a repeated field is written (bottom 2, top 0)."""
        fields = self._ast.get(name) if self._ast else []
        return fields[index].value.pos if index < len(fields) else None

    def count(self, name: str) -> int:
        """How many times a field is written (0: absent, its default applies)."""
        return len(self._ast.get(name)) if self._ast is not None else 0

    def span(self, name: str, index: int = 0) -> Pos | None:
        """Where repetition `index` of a field is written, name to value (see `span`)."""
        fields = self._ast.get(name) if self._ast is not None else []
        return span(fields[min(index, len(fields) - 1)]) if fields else None


class _Absent:
    """Placeholder for a sub-message the text did not give. A LayerParameter has ~50 `*_param`
    messages and a layer reads one or two, so their default records are built only when read."""
    __slots__ = ("schema",)

    def __init__(self, schema: Msg):
        self.schema = schema


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else ""


def _kind(t) -> str:
    if isinstance(t, Msg):
        return f"a `{t.name} {{ ... }}` message"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a quoted string",
            "enum": "one of"}.get(t, str(t))


_BAD = object()                   # _scalar's result for a value it reported as wrong


def _scalar(f: F, name: str, s: Scalar, c: Collector, where: str):
    v = s.value
    if f.type == "enum":
        text = v.text if isinstance(v, Word) else v if isinstance(v, str) else None
        if text in f.choices:
            return text
        bad = f"`{name}` must be one of {', '.join(f.choices)}"
        tip = suggest(str(text), f.choices) if text else ""
        if not tip and text and text.upper() in f.choices:
            tip = f"did you mean `{text.upper()}`? (enum words are case-sensitive)"
        c.error("E0104", f"{where}invalid value {_show(v)} for `{name}`", s.pos,
                notes=[bad], help=tip or f"use one of: {', '.join(f.choices)}")
        return _BAD
    if f.type is bool:
        if isinstance(v, Word) and v.text in ("true", "false", "True", "False", "t", "f"):
            return v.text.lower() in ("true", "t")
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
    elif f.type is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif f.type is float:
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, Word) and v.text.lstrip("-").lower() in ("inf", "infinity", "nan"):
            return float(v.text)
    elif f.type is str:
        if isinstance(v, str):
            return v
        if isinstance(v, Word):     # protobuf requires quotes; be lenient and say so
            c.warning("W0101", f"{where}`{name}` expects a quoted string, got the word {v.text}", s.pos,
                      help=f'write `{name}: "{v.text}"`')
            return v.text
    c.error("E0103", f"{where}`{name}` expects {_kind(f.type)}, got {_show(v)}", s.pos,
            help=_type_help(f, name, v))
    return _BAD


def _type_help(f: F, name: str, v) -> str:
    if isinstance(v, str) and f.type in (int, float, bool):
        inner = v.strip()
        try:
            (int if f.type is int else float)(inner) if f.type is not bool else None
            if f.type is not bool or inner in ("true", "false"):
                return f"remove the quotes: `{name}: {inner}`"
        except ValueError:
            pass
    if f.type is int and isinstance(v, float) and math.isfinite(v):
        lo, hi = int(v // 1), int(v // 1) + 1
        return f"use a whole number: `{name}: {lo}` or `{name}: {hi}`"
    if f.type is str and isinstance(v, (int, float)):
        return f'quote it: `{name}: "{v}"`'
    if f.type is bool and isinstance(v, int):
        return f"write `{name}: {'true' if v else 'false'}` (true or false)"
    return f"write `{name}: {_example(f)}`"


def _show(v) -> str:
    if isinstance(v, Word):
        return v.text
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    return str(v)


def _example(f: F) -> str:
    if f.example:
        return f.example
    if f.default is not None and not isinstance(f.default, (list, tuple)):
        d = f.default
        return ("true" if d else "false") if isinstance(d, bool) else (f'"{d}"' if f.type is str else str(d))
    return {int: "1", float: "0.5", bool: "true", str: '"..."'}.get(f.type, f.choices[0] if f.choices else "...")


def _misplaced(schema: Msg, m: Message, name: str) -> str:
    """An unknown field that belongs in one of this message's sub-messages (`kernel_size` written
    directly in a layer instead of inside convolution_param)."""
    owners = [k for k, f in schema.fields.items() if isinstance(f.type, Msg) and name in f.type.fields]
    if not owners:
        return ""
    kind = next((af.value.value for af in m.fields if af.name == "type" and isinstance(af.value, Scalar)
                 and isinstance(af.value.value, str)), "")
    mine = [k for k in owners if k.replace("_", "").startswith(kind.lower()) and kind]
    if mine:
        return f"`{name}` belongs inside {mine[0]}: write `{mine[0]} {{ {name}: ... }}`"
    return f"`{name}` is a field of {', '.join(owners[:4])}{', ...' if len(owners) > 4 else ''}: move it inside one"


def span(af: AstField) -> Pos:
    """Where a field is written: from its name to the end of its value when both are on one line
    (`num_output: 16`), else its name."""
    p, v = af.pos, af.value.pos
    if isinstance(af.value, Scalar) and v.line == p.line and v.end_line == p.line:
        return Pos(p.file, p.line, p.column, p.line, v.end_column)
    return p


_TEMPLATES: dict[int, tuple[dict, list]] = {}


def _template(schema: Msg) -> tuple[dict, list]:
    """A schema's default values (sub-messages as shared _Absent markers) and its repeated fields,
    computed once per schema: a LayerParameter has ~60 fields and a net hundreds of layers."""
    key = id(schema)
    hit = _TEMPLATES.get(key)
    if hit is None or hit[2] is not schema:
        values = {name: None if f.repeated else (_Absent(f.type) if isinstance(f.type, Msg) else f.default)
                  for name, f in schema.fields.items()}
        hit = _TEMPLATES[key] = (values, [n for n, f in schema.fields.items() if f.repeated], schema)
    return hit[0], hit[1]


def coerce(schema: Msg, m: Message | None, c: Collector, where: str = "", pos: Pos | None = None,
           label: str | None = None) -> Record:
    """Coerce an AST message against a schema; every problem goes to the collector, located.
    `where` prefixes messages (e.g. "layer 'conv1': "); `label` names the message as written
    (convolution_param), defaulting to its schema's name."""
    template, repeated = _template(schema)
    values: dict[str, Any] = dict(template)
    for name in repeated:
        values[name] = []
    poss: dict[str, Pos] = {}
    if m is None:                 # an absent message: all defaults, nothing required
        return Record(schema, values, poss, pos, None)
    label = label or schema.name
    if schema.context:
        noun, key = schema.context
        named = [af.value.value for af in m.fields if af.name == key and isinstance(af.value, Scalar)
                 and isinstance(af.value.value, str)]
        where = f"{where}{noun} '{named[0]}': " if named else where
    for af in m.fields:
        f = schema.fields.get(af.name)
        if f is None:
            if not schema.open:
                tip = suggest(af.name, schema.fields) or _misplaced(schema, m, af.name)
                c.error("E0102", f"{where}unknown field `{af.name}` in {label}", af.pos,
                        help=tip or (f"{label} has the fields: {', '.join(sorted(schema.fields))}"
                                     if len(schema.fields) < 40 else f"remove `{af.name}`"))
            continue
        if isinstance(f.type, Msg):
            if not isinstance(af.value, Message):
                c.error("E0103", f"{where}`{af.name}` is a message: write `{af.name} {{ ... }}`", span(af),
                        help=f"wrap its fields in braces: `{af.name} {{ ... }}`")
                continue
            v = f.type.coerce(af.value, c, where, af.pos, af.name)
        else:
            if isinstance(af.value, Message):
                c.error("E0103", f"{where}`{af.name}` expects {_kind(f.type)}, got a message", af.pos,
                        help=f"write `{af.name}: {_example(f)}`")
                poss.setdefault(af.name, span(af))      # reported: not "missing" as well
                continue
            v = _scalar(f, af.name, af.value, c, where)
            if v is _BAD:             # reported; the field keeps its default (but counts as given)
                poss.setdefault(af.name, span(af))
                continue
        if f.repeated:
            values[af.name].append(v)
            poss.setdefault(af.name, span(af))
        else:
            if af.name in poss:
                c.error("E0105", f"{where}`{af.name}` is given twice in {label}", span(af),
                        notes=[f"first given at {poss[af.name]}"],
                        help="keep one of them; only repeated fields (like `bottom` or `dim`) may be given "
                             "more than once")
            values[af.name] = v
            poss[af.name] = span(af)
    for name, f in schema.fields.items():
        if f.required and name not in poss:
            c.error("E0106", f"{where}missing required field `{name}` in {label}", pos or m.pos,
                    help=f"add `{name}: {_example(f)}`" + (f" ({f.doc})" if f.doc else ""))
    return Record(schema, values, poss, pos or m.pos, m)


def defaults(schema: Msg) -> Record:
    """The record of an absent message: every field at its default."""
    return coerce(schema, None, Collector())
