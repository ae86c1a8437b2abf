"""Located diagnostics: every user-facing error of the compiler goes through here.

A diagnostic renders as

    specs/x.forge:12:17: error[E201]: unknown op 'atention'
       12 |   attention = atention(dim, heads = n_heads)
          |               ^^^^^^^^
      hint: did you mean 'attention'?

Passes report into a `Diagnostics` collector and keep going, so that every
independent error of a file is reported in one run; the driver stops between
passes once errors exist (see compiler/driver.py).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


class Span(NamedTuple):
    """A source range; lines and columns are 1-based, `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @staticmethod
    def point(file: str, line: int = 1, col: int = 1) -> Span:
        return Span(file, line, col, line, col + 1)


class Diagnostic(NamedTuple):
    severity: str  # "error" | "warning" | "note"
    code: str
    message: str
    span: Span | None
    hint: str | None = None
    notes: tuple[tuple[str, Span | None], ...] = ()


class ForgeError(Exception):
    """Raised for a user error that stops a pass outright (e.g. unreadable file)."""

    def __init__(self, code: str, message: str, span: Span | None, hint: str | None = None):
        super().__init__(message)
        self.diagnostic = Diagnostic("error", code, message, span, hint)


class CompileFailed(Exception):
    """Raised by the driver when a pass left errors behind; carries all of them."""

    def __init__(self, diagnostics: Diagnostics):
        super().__init__(f"{diagnostics.error_count} error(s)")
        self.diagnostics = diagnostics


@dataclass
class Diagnostics:
    items: list[Diagnostic] = field(default_factory=list)
    # what `items` holds, for O(1) de-duplication (a list scan is n² over big files)
    _seen: set[Diagnostic] = field(default_factory=set, repr=False, compare=False)

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None,
              notes: Iterable[tuple[str, Span | None]] = ()) -> None:
        self._add(Diagnostic("error", code, message, span, hint, tuple(notes)))

    def warning(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self._add(Diagnostic("warning", code, message, span, hint))

    def note(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self._add(Diagnostic("note", code, message, span, hint))

    def add(self, diagnostic: Diagnostic) -> None:
        self._add(diagnostic)

    def _add(self, diagnostic: Diagnostic) -> None:
        # The same fact reached along two paths (e.g. a base model checked
        # through two derived ones) is reported once.
        if diagnostic not in self._seen:
            self._seen.add(diagnostic)
            self.items.append(diagnostic)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    @property
    def error_count(self) -> int:
        return len(self.errors)

    def sorted(self) -> list[Diagnostic]:
        order = {"error": 0, "warning": 1, "note": 2}

        def key(d: Diagnostic):
            s = d.span
            loc = (s.file, s.line, s.col) if s else ("", 0, 0)
            return (loc, order[d.severity], d.code)

        return sorted(self.items, key=key)


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The nearest known name, for 'did you mean' hints."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    best = suggest(name, candidates)
    return f"did you mean '{best}'?" if best else None


class SourceCache:
    """Source text by file name, for rendering the offending line."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {}

    def add(self, file: str, text: str) -> None:
        self._lines[file] = text.split("\n")

    def line(self, file: str, line: int) -> str | None:
        lines = self._lines.get(file)
        if lines is None or not 1 <= line <= len(lines):
            return None
        return lines[line - 1]


_MAX_SHOWN_LINE = 200


def render(d: Diagnostic, sources: SourceCache) -> str:
    head = f"{d.severity}[{d.code}]: {d.message}"
    out = [f"{d.span}: {head}" if d.span else head]
    if d.span is not None:
        text = sources.line(d.span.file, d.span.line)
        if text is not None:
            text = text.replace("\t", " ")
            col = d.span.col
            if len(text) > _MAX_SHOWN_LINE:  # keep minified/huge lines readable
                start = max(0, col - 1 - _MAX_SHOWN_LINE // 2)
                text = text[start:start + _MAX_SHOWN_LINE]
                col -= start
            width = (d.span.end_col - d.span.col) if d.span.end_line == d.span.line else 1
            width = max(1, min(width, len(text) - col + 2))
            gutter = str(d.span.line)
            out.append(f" {gutter} | {text}")
            out.append(f" {' ' * len(gutter)} | {' ' * (col - 1)}{'^' * width}")
    if d.hint:
        out.append(f"  hint: {d.hint}")
    for message, span in d.notes:
        out.append(f"  note: {span}: {message}" if span else f"  note: {message}")
    return "\n".join(out)


def print_diagnostics(diags: Diagnostics, sources: SourceCache, quiet: bool = False) -> None:
    """Every diagnostic in source order on standard error, then the error count;
    `quiet` leaves out warnings and notes. `source.sources_of` gives the lines."""
    for d in diags.sorted():
        if quiet and d.severity != "error":
            continue
        print(render(d, sources), file=sys.stderr)
    if diags.error_count:
        n = diags.error_count
        print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)
