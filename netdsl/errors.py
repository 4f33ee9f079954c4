"""Diagnostics: source positions, located errors, the Errors bag and the renderer."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2      # success; a bug in netdsl; a user error (bad input, failed check)


class Pos(NamedTuple):
    """A span in a source file (1-based line and column; end is exclusive). A NamedTuple rather
    than a frozen dataclass: the parser makes one per token, and this is 4x cheaper."""
    file: str
    line: int
    column: int
    end_line: int = 0
    end_column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class Diagnostic:
    code: str
    message: str
    pos: Pos | None = None
    severity: str = "error"          # "error" | "warning"
    notes: list[str] = field(default_factory=list)
    help: str | None = None

    def to_json(self) -> dict:
        p = self.pos
        return {"code": self.code, "severity": self.severity, "message": self.message,
                "file": p.file if p else None, "line": p.line if p else None,
                "column": p.column if p else None, "notes": list(self.notes), "help": self.help}


class NetdslError(Exception):
    """A user error: bad input, missing data, a failed check. The CLI exits 2, no traceback."""

    def __init__(self, code: str, message: str, pos: Pos | None = None, *,
                 notes: list[str] | None = None, help: str | None = None):
        super().__init__(message)
        self.diagnostic = Diagnostic(code, message, pos, "error", list(notes or []), help)

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return [self.diagnostic]


class Errors(NetdslError):
    """Every diagnostic a stage found, raised once at the end of the stage."""

    def __init__(self, diagnostics: list[Diagnostic]):
        Exception.__init__(self, "; ".join(d.message for d in diagnostics))
        self._diagnostics = diagnostics

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return self._diagnostics


class Collector:
    """Gathers diagnostics during a stage; `raise_if_errors` raises them all at once."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []

    def error(self, code, message, pos=None, *, notes=None, help=None) -> None:
        self.diagnostics.append(Diagnostic(code, message, pos, "error", list(notes or []), help))

    def warning(self, code, message, pos=None, *, notes=None, help=None) -> None:
        self.diagnostics.append(Diagnostic(code, message, pos, "warning", list(notes or []), help))

    def add(self, err: NetdslError) -> None:
        self.diagnostics.extend(err.diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise Errors(sorted(self.diagnostics, key=_order))


def _order(d: Diagnostic):
    p = d.pos
    return (p.file, p.line, p.column) if p else ("", 0, 0)


# ---------------------------------------------------------------------------------- rendering

_COLOURS = {"error": "\033[1;31m", "warning": "\033[1;33m", "bold": "\033[1m",
            "blue": "\033[1;34m", "reset": "\033[0m"}


def use_colour(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ


_source_cache: dict[str, list[str]] = {}


def remember_source(path: str, text: str) -> None:
    """Keep a file's text so diagnostics can quote its lines."""
    _source_cache[path] = text.splitlines()


def _source_line(path: str, line: int) -> str | None:
    lines = _source_cache.get(path)
    if lines is None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        _source_cache[path] = lines
    return lines[line - 1] if 0 < line <= len(lines) else None


def render(d: Diagnostic, colour: bool = False) -> str:
    """rustc-style: `file:line:col: error[CODE]: message`, the line with a caret underline,
    then `= note:` and `= help:` lines."""
    c = _COLOURS if colour else {k: "" for k in _COLOURS}
    head = f"{c[d.severity]}{d.severity}[{d.code}]{c['reset']}{c['bold']}: {d.message}{c['reset']}"
    out = [f"{c['bold']}{d.pos}:{c['reset']} {head}" if d.pos else head]
    gutter = " "
    if d.pos and d.pos.line:
        text = _source_line(d.pos.file, d.pos.line)
        if text is not None:
            num = str(d.pos.line)
            gutter = " " * len(num)
            text = text.rstrip()
            start = max(d.pos.column, 1)
            if d.pos.end_line == d.pos.line and d.pos.end_column > start:
                end = d.pos.end_column
            else:
                end = max(len(text) + 1, start + 1)
            # columns count characters; show tabs as 4 spaces and keep the caret under its text
            shown = text.replace("\t", "    ")
            lead = len(text[:start - 1].replace("\t", "    ")) + max(start - 1 - len(text), 0)
            width = max(len(text[start - 1:end - 1].replace("\t", "    ")) + max(end - 1 - max(len(text), start - 1), 0), 1)
            out.append(f"{c['blue']}{gutter} |{c['reset']}")
            out.append(f"{c['blue']}{num} |{c['reset']} {shown}")
            out.append(f"{c['blue']}{gutter} |{c['reset']} {' ' * lead}"
                       f"{c[d.severity]}{'^' * width}{c['reset']}")
    for n in d.notes:
        out.append(f"{gutter} {c['blue']}={c['reset']} {c['bold']}note{c['reset']}: {n}")
    if d.help:
        out.append(f"{gutter} {c['blue']}={c['reset']} {c['bold']}help{c['reset']}: {d.help}")
    return "\n".join(out)


def render_all(diagnostics: list[Diagnostic], stream=None) -> None:
    stream = stream or sys.stderr
    colour = use_colour(stream)
    for d in diagnostics:
        print(render(d, colour), file=stream)
    n_err = sum(d.severity == "error" for d in diagnostics)
    n_warn = len(diagnostics) - n_err
    if n_err or n_warn:
        parts = [f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((n_err, "error"), (n_warn, "warning")) if n]
        print(" and ".join(parts) + " generated.", file=stream)
