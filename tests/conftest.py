"""Shared test helpers: write a spec to a temp folder, compile it, run the CLI."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from forgec.compiler.cli import main
from forgec.compiler.diagnostics import CompileFailed, Diagnostics
from forgec.compiler.driver import Compilation, compile_spec
from forgec.compiler.emit import emit_package

# Under pytest-xdist (`pytest -n 2 --dist loadfile`; `make test` runs serially, which
# measured faster on 2 cores) each worker gets its share of the cores. torch's default,
# one thread per core in every worker, would oversubscribe the machine (OpenMP threads
# spin at their barriers). Set before torch is first imported, so that this process
# and every process it starts read it.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores))
# what a test that sets torch's thread count asks for: every core of this process's share
THREADS = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.forge"))

# A training-only (bidirectional) model: no KV cache, no generation.
ENCODER_SPEC = """
model enc_tiny {
  vocab_size  = 256
  dim         = 32
  n_layers    = 1
  n_heads     = 2
  max_seq_len = 64

  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len)

  block enc(x) {
    attention_norm = rmsnorm(dim)
    attention      = attention(dim, heads = n_heads, rope = rope, causal = false)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 64)

    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }

  layers      = stack(n_layers) { default: enc }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, vocab_size)
}
"""


def compile_text(tmp_path: Path, text: str, name: str = "spec.forge",
                 extra: dict[str, str] | None = None) -> tuple[Compilation | None, Diagnostics]:
    """Compile `text` (dedented) as tmp_path/name; `extra` writes more files beside it."""
    for rel, body in (extra or {}).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(body))
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    diags = Diagnostics()
    try:
        return compile_spec(str(path), diags), diags
    except CompileFailed:
        return None, diags


@functools.cache
def _variants_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="forgec-variants-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def _spec_variant(name: str, values: tuple[tuple[str, object], ...]) -> ModuleType:
    folder = _variants_dir() / f"{name}_{len(os.listdir(_variants_dir()))}"
    shutil.copytree(ROOT / "specs", folder)
    for key, value in values:  # in every file: the one that defines it is the one read
        found = 0
        for path in folder.glob("*.forge"):
            text, n = re.subn(rf"^(  {key}\s*=\s*)[^\s#]+", rf"\g<1>{value}",
                              path.read_text(), flags=re.M)
            path.write_text(text)
            found += n
        assert found, f"no `{key} = ...` in specs/"
    diags = Diagnostics()
    comp = compile_spec(str(folder / f"{name}.forge"), diags)
    files = emit_package(comp, comp.main_model())
    module_path = folder / "model.py"
    module_path.write_text(files["model.py"])
    spec = importlib.util.spec_from_file_location(f"variant_{folder.name}", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def spec_variant(name: str, **values: object) -> ModuleType:
    """The model module that specs/NAME.forge compiles to with some of its model-level
    values changed (`spec_variant("llama_debug", vocab_size=1024)`): a committed model at
    the sizes where the compiler emits other code (a fused loss, document spans)."""
    return _spec_variant(name, tuple(sorted(values.items())))


def codes(diags: Diagnostics, severity: str | None = "error") -> list[tuple[str, int, int]]:
    """(code, line, col) of every diagnostic, sorted."""
    return [(d.code, d.span.line if d.span else 0, d.span.col if d.span else 0)
            for d in diags.sorted() if severity is None or d.severity == severity]


def run_forgec(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh interpreter (as users do)."""
    return subprocess.run([sys.executable, "-m", "forgec.compiler.cli", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def cli(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """The CLI: in a fresh interpreter (`fresh`, as users run it), or in this
    process (no torch start-up; main() is what the `forgec` script runs)."""
    if fresh:
        return run_forgec(*args, timeout=120)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def forge(tmp_path):
    def _compile(text: str, **kw):
        return compile_text(tmp_path, text, **kw)
    return _compile
