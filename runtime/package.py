"""Build a spec's package into a run folder and import it from there.

A run never imports the repository's `generated/` packages: `forgec train`
generates the spec's package afresh into `RUN/package/NAME/` and imports it
under a module name private to that folder, so two runs (or a run and the
repository) never share module state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from types import ModuleType

from forgec.compiler.errors import RunError, UsageError


def build_package(spec: str, run_dir: str, *, check_only: bool = False) -> str:
    """Generate the package of `spec` into `run_dir/package/`; return its folder.

    With `check_only`, nothing is written and a package that the spec would
    change is a RunError (a resumed run must train the model it started with).
    """
    from forgec.compiler.build import build
    from forgec.compiler.diagnostics import ForgeError
    from forgec.compiler.driver import compile_and_report

    comp = compile_and_report(spec, quiet=True)  # prints located diagnostics; None on errors
    if comp is None:
        raise RunError(f"cannot train {spec}: the spec has errors (above)")
    out = os.path.join(run_dir, "package")
    try:
        result = build(comp, out, check=check_only, update=not check_only)
    except ForgeError as e:
        d = e.diagnostic
        raise RunError(f"{spec}: {d.code}: {d.message}") from None
    if result.status == "stale":
        if not os.path.isdir(result.package):
            raise RunError(f"{run_dir} has no package {os.path.basename(result.package)}: "
                           f"was the run started from {spec}?")
        raise RunError(f"{spec} no longer generates the package this run was started with "
                       f"({result.package}); a resumed run must train the same model")
    return result.package


def _module_name(pkg_dir: str) -> str:
    path = os.path.realpath(pkg_dir)
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    return f"_forgec_run_{digest}_{os.path.basename(path)}"


def import_package(pkg_dir: str) -> ModuleType:
    """Import the generated package in `pkg_dir` (fresh: stale modules are dropped)."""
    init = os.path.join(pkg_dir, "__init__.py")
    if not os.path.isfile(init):
        raise RunError(f"no generated package in {pkg_dir}")
    name = _module_name(pkg_dir)
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[pkg_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RunError(f"cannot import the package in {pkg_dir}: {type(e).__name__}: {e}") from None
    return module


def run_package_dir(run_dir: str) -> str:
    """The package folder of a training run (named in its run.json)."""
    info = read_run_info(run_dir)
    return os.path.join(run_dir, "package", info["package"])


def read_run_info(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise UsageError(f"no such run folder: '{run_dir}'")
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise RunError(f"{run_dir} is not a training run (no run.json)")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("package"), str) \
                or not isinstance(info.get("settings"), dict):
            raise ValueError("missing 'package' or 'settings'")
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable: {e}") from None
    return info
