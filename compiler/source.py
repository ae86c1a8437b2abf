"""Reading spec files: the only place the compiler touches the file system for input.

Everything that can go wrong with bytes (too large, binary, not UTF-8) becomes
a located `ForgeError`, never an exception escaping to the user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .diagnostics import Diagnostics, ForgeError, SourceCache, Span

# A hand-written spec is a few KB; anything past this is not a spec, and
# parsing megabytes of garbage would only delay the error.
MAX_SPEC_BYTES = 1 << 20


@dataclass(frozen=True)
class Source:
    path: str  # as shown in diagnostics (relative to the working directory when possible)
    abspath: str
    text: str


def display_path(path: str) -> str:
    """A stable, short name for diagnostics and source-map comments."""
    abspath = os.path.abspath(path)
    rel = os.path.relpath(abspath)
    return abspath if rel.startswith("..") else rel


def read_source(path: str, *, at: Span | None = None) -> Source:
    """Read a spec file; `at` locates the error when the path came from an import."""
    shown = display_path(path)
    where = at or Span.point(shown)
    if not os.path.exists(path):
        raise ForgeError("E001", f"no such file: '{shown}'", where)
    if os.path.isdir(path):
        raise ForgeError("E001", f"'{shown}' is a directory, not a spec file", where,
                         hint="pass a .forge file")
    try:
        size = os.path.getsize(path)
        if size > MAX_SPEC_BYTES:
            raise ForgeError("E005", f"'{shown}' is {size:,} bytes; specs are limited to "
                             f"{MAX_SPEC_BYTES:,} bytes", where)
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise ForgeError("E001", f"cannot read '{shown}': {e.strerror or e}", where) from None
    if len(data) > MAX_SPEC_BYTES:  # grew while we looked, or a special file
        raise ForgeError("E005", f"'{shown}' is larger than {MAX_SPEC_BYTES:,} bytes", where)
    return Source(shown, os.path.abspath(path), decode(shown, data))


def sources_of(diags: Diagnostics) -> SourceCache:
    """Re-read the files diagnostics point into, for the source line display."""
    cache = SourceCache()
    for f in {d.span.file for d in diags.items if d.span is not None}:
        try:
            cache.add(f, read_source(f).text)
        except Exception:  # noqa: BLE001 — a file we cannot show is shown without its line
            pass
    return cache


def decode(shown: str, data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = _position(data, nul)
        raise ForgeError("E004", "binary file: NUL byte in spec", Span.point(shown, line, col),
                         hint="specs are UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _position(data, e.start)
        raise ForgeError("E004", f"invalid UTF-8 (byte 0x{data[e.start]:02x})",
                         Span.point(shown, line, col), hint="specs are UTF-8 text") from None
    return text.removeprefix("\ufeff")


def _position(data: bytes, offset: int) -> tuple[int, int]:
    before = data[:offset]
    line = before.count(b"\n") + 1
    col = offset - (before.rfind(b"\n") + 1) + 1
    return line, col
