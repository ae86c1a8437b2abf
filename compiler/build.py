"""`forgec build`: write generated packages atomically, or check them for drift.

A spec `specs/NAME.forge` becomes the package `<out>/NAME/`. All files are
rendered in memory first; they are then written to a temporary folder beside
the target and swapped in with renames, so a failing build never leaves a
half-written package. An existing package whose files would change is only
replaced with `update=True`: the committed packages are golden files, and
changing them is a deliberate act.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from dataclasses import dataclass

from .diagnostics import ForgeError, Span
from .driver import Compilation
from .emit import emit_package


@dataclass
class BuildResult:
    package: str  # folder
    status: str  # "created" | "updated" | "unchanged" | "stale"
    diff: str = ""


def package_name(spec_path: str) -> str:
    name = os.path.splitext(os.path.basename(spec_path))[0]
    if not name.isidentifier() or name.startswith("_"):
        raise ForgeError("E007", f"'{os.path.basename(spec_path)}' cannot name a Python package",
                         Span.point(spec_path), hint="spec file names are identifiers, "
                         "e.g. llama_debug.forge")
    return name


def read_package(folder: str) -> dict[str, str]:
    files: dict[str, str] = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    files[name] = f.read()
    return files


def unified_diff(old: dict[str, str], new: dict[str, str], folder: str) -> str:
    out = []
    for name in sorted(set(old) | set(new)):
        if name in new and name in old and old[name] == new[name]:
            continue
        if name not in new and (name.endswith(".pyc") or name == "__pycache__"):
            continue
        path = os.path.join(folder, name)
        out.extend(difflib.unified_diff(
            old.get(name, "").splitlines(keepends=True), new.get(name, "").splitlines(keepends=True),
            fromfile=f"a/{path}" if name in old else "/dev/null",
            tofile=f"b/{path}" if name in new else "/dev/null"))
    return "".join(out)


def build(comp: Compilation, out_dir: str, *, check: bool = False,
          update: bool = False) -> BuildResult:
    spec = comp.program.root
    name = package_name(spec)
    files = emit_package(comp, comp.main_model())
    folder = os.path.join(out_dir, name)
    old = read_package(folder)
    diff = unified_diff(old, files, folder)
    if not diff:
        return BuildResult(folder, "unchanged")
    if check or (old and not update):
        return BuildResult(folder, "stale", diff)
    _write_atomically(folder, files)
    return BuildResult(folder, "updated" if old else "created", diff)


def _write_atomically(folder: str, files: dict[str, str]) -> None:
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        if os.path.exists(folder):
            backup = tmp + ".old"
            os.rename(folder, backup)
            os.rename(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
