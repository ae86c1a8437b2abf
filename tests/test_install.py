"""`pip install .` (a wheel, not the editable checkout) works from any folder.

The wheel is built from a copy of the sources (the build writes beside them), installed
into a fresh virtual environment and run from a folder outside the repository: it must
carry everything the compiler and the runtime read (grammar, templates, op sources), and
generate byte for byte what the checkout generates. The compiler needs no torch: under
Python 3.12 and 3.13 (no CPU torch wheel here), a venv with only the compiler's
dependencies checks, builds and reports on specs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, run_forgec

SPEC = "specs/llama_debug.forge"  # relative: the generated code names it
GOLDEN = ROOT / "generated" / "llama_debug"
# the folders the wheel installs, as forgec.compiler and forgec.runtime (generated/ is test data)
PACKAGES = ("compiler", "runtime")


def _env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(argv, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _sources(root: Path) -> set[str]:
    """The checkout's files under PACKAGES, as wheel paths (under forgec/)."""
    return {"forgec/" + p.relative_to(root).as_posix() for pkg in PACKAGES
            for p in (root / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                 "--no-build-isolation", "--wheel-dir", out, src], cwd=src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("forgec-*.whl")
    return path


def _venv(path: Path, python: str = sys.executable) -> Path:
    """A bare venv at `path`; its python."""
    proc = _run([python, "-m", "venv", "--without-pip", path], cwd=path.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=python.parent)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def _pip(python: Path, *args) -> None:
    """pip of this interpreter, installing into the venv of `python` (which has none)."""
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", *args],
                cwd=python.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _workdir(path: Path) -> Path:
    """A folder outside the checkout holding a copy of the debug spec."""
    (path / "specs").mkdir(parents=True)
    shutil.copy(ROOT / SPEC, path / SPEC)
    return path


COMMANDS = {"check": ["check", SPEC], "info": ["info", "--json", SPEC]}


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict[str, str]:
    """What the checkout prints for COMMANDS (and the SVG), run from such a folder."""
    work = _workdir(tmp_path_factory.mktemp("checkout"))
    out = {}
    for name, argv in {**COMMANDS, "svg": ["graph", "--format", "svg", SPEC]}.items():
        proc = run_forgec(*argv, cwd=work)
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout
    return out


def _build_and_compare(forgec: Path, work: Path, expected: dict[str, str]) -> None:
    """check, build and info of the debug spec give what the checkout gives."""
    for name, argv in COMMANDS.items():
        proc = _run([forgec, *argv], cwd=work)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected[name], name
    build = _run([forgec, "build", "-o", "out", SPEC], cwd=work)
    assert build.returncode == 0, build.stderr
    built = sorted(p.name for p in (work / "out" / "llama_debug").iterdir())
    assert built == sorted(p.name for p in GOLDEN.iterdir() if p.is_file())
    for name in built:
        assert (work / "out" / "llama_debug" / name).read_bytes() == (GOLDEN / name).read_bytes()


def test_the_wheel_holds_every_source_and_data_file_and_no_other_top_level_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    installed = {n for n in names if ".dist-info/" not in n}
    assert installed == _sources(ROOT)
    assert {n.split("/")[0] for n in installed} == {"forgec"}  # no generic top-level name
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Python: <3.14,>=3.11" in text
    assert "Requires-Dist: torch==2.13.0; extra == \"train\"" in text


def test_the_installed_wheel_builds_trains_and_draws_outside_the_checkout(wheel, expected,
                                                                          tmp_path):
    python = _venv(tmp_path / "venv")
    # third-party packages from this environment: its path less the checkout (its venv, which
    # may sit inside the checkout, stays). A .pth path line adds the folder only, without
    # running that folder's own .pth files (the checkout's editable install).
    prefix = Path(sys.prefix).resolve()
    paths = [p for p in sys.path if p and (Path(p).resolve().is_relative_to(prefix)
                                           or not Path(p).resolve().is_relative_to(ROOT))]
    (_site_packages(python) / "this_env.pth").write_text("".join(f"{p}\n" for p in paths))
    _pip(python, "--no-deps", wheel)
    work = _workdir(tmp_path / "work")
    where = _run([python, "-c", "import forgec.compiler, forgec.runtime; "
                  "print(forgec.compiler.__file__); print(forgec.runtime.__file__)"], cwd=work)
    assert where.returncode == 0, where.stderr
    # and nothing under the generic names other distributions use
    generic = _run([python, "-c", "import compiler"], cwd=work)
    assert generic.returncode != 0 and "No module named 'compiler'" in generic.stderr
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(tmp_path / "venv"), line
    forgec = tmp_path / "venv" / "bin" / "forgec"
    _build_and_compare(forgec, work, expected)
    svg = _run([forgec, "graph", "--format", "svg", SPEC], cwd=work)
    assert svg.returncode == 0, svg.stderr
    assert svg.stdout == expected["svg"]
    # the runtime too: the same seeded losses as the checkout's
    train = ["train", SPEC, "--out", "run", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
             "--no-progress"]
    proc = _run([forgec, *train], cwd=work)
    assert proc.returncode == 0, proc.stderr
    checkout = _workdir(tmp_path / "checkout")
    proc = run_forgec(*train, cwd=checkout, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (w / "run" / "metrics.jsonl")
                                                    .read_text().splitlines())]
              for w in (work, checkout)]
    assert [step for step, _ in losses[0]] == [1, 2]
    assert losses[0] == losses[1]


def _interpreter(version: str) -> str | None:
    """A working python`version` on PATH or under pyenv."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/"
                                                          f"python{version}"))
    for c in candidates:
        if c and subprocess.run([c, "-c", ""], capture_output=True).returncode == 0:
            return c
    return None


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_the_compiler_runs_without_torch_under_other_pythons(wheel, expected, tmp_path,
                                                             version):
    found = _interpreter(version)
    if found is None:
        pytest.skip(f"no Python {version} interpreter on PATH or under ~/.pyenv")
    python = _venv(tmp_path / "venv", found)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # the compiler's own: matplotlib only draws SVGs and loss curves
    _pip(python, *[d for d in deps if not d.startswith("matplotlib")])
    _pip(python, "--no-deps", wheel)
    work = _workdir(tmp_path / "work")
    no_torch = _run([python, "-c", "import torch"], cwd=work)
    assert no_torch.returncode != 0
    forgec = tmp_path / "venv" / "bin" / "forgec"
    _build_and_compare(forgec, work, expected)
    train = _run([forgec, "train", SPEC, "--out", "run"], cwd=work)
    assert train.returncode == 2
    assert train.stderr == ("forgec: error: `forgec train` needs torch, which is not installed: "
                            "pip install 'forgec[train]'\n")
