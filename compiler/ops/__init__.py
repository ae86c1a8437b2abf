"""The operator registry: one folder per family of ops.

Every folder under compiler/ops/ with a `spec.py` is a family: its `spec.py`
declares the ops (`OPS`, a tuple of torch-free `OpDef`s: arguments, shapes,
parameters, cost, code generation), its `modules.py` holds their PyTorch code
(plain, importable modules; compiler/modular.py copies what a model uses into
its generated model.py). Adding a folder adds its ops: nothing else names them.
See docs/adding-an-op.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from .core import REQUIRED, ArgSpec, Foreign, NestedCall, OpDef, Shape, numel

OPS_DIR = os.path.dirname(__file__)


def _families() -> list[str]:
    """Folders that declare ops, in name order (so the registry is deterministic)."""
    return sorted(name for name in os.listdir(OPS_DIR)
                  if os.path.isfile(os.path.join(OPS_DIR, name, "spec.py")))


def _load() -> dict[str, OpDef]:
    ops: dict[str, OpDef] = {}
    for family in _families():
        spec = importlib.import_module(f"{__name__}.{family}.spec")
        for op in spec.OPS:
            assert op.name not in ops, f"op {op.name} declared twice"
            ops[op.name] = dataclasses.replace(op, folder=family)
    return ops


OPS: dict[str, OpDef] = _load()


def ops_for(slot: str) -> tuple[str, ...]:
    """The ops that may fill a named place (`OpDef.slots`), in registry order."""
    return tuple(name for name, op in OPS.items() if slot in op.slots)


def metrics_key(slot: str) -> str:
    """The key of the statistics of the ops filling `slot` in a metrics row (one key
    for the slot, so that a row reads the same whichever op fills it)."""
    keys = {op.metrics_key for name, op in OPS.items() if slot in op.slots}
    assert len(keys) == 1 and "" not in keys, f"the {slot} ops' metrics keys: {keys}"
    return keys.pop()


def foreign_ops(framework: str, role: str) -> dict[str, OpDef]:
    """The ops that express `role` in `framework`'s configs (`OpDef.foreign`)."""
    return {name: op for name, op in OPS.items()
            if framework in op.foreign and op.foreign[framework].role == role}


def foreign_op(framework: str, role: str, **config) -> str | None:
    """The op of `role` that `framework`'s config values choose (its `selects`), or
    None if none does (or several do)."""
    found = [name for name, op in foreign_ops(framework, role).items()
             if all(config.get(key, MISSING) in values
                    for key, values in op.foreign[framework].selects.items())]
    return found[0] if len(found) == 1 else None


def foreign_choices(framework: str, role: str, key: str) -> dict:
    """Config field `key`'s values that choose an op of `role`: value → op name."""
    return {value: name for name, op in foreign_ops(framework, role).items()
            for value in op.foreign[framework].selects.get(key, ())}


def foreign_default(framework: str, role: str, key: str):
    """The value of config field `key` that a config leaving it out stands for: the
    one that chooses the op of `role` the framework uses by default."""
    found = [op.foreign[framework].selects[key][0] for op in foreign_ops(framework, role).values()
             if op.foreign[framework].by_default and key in op.foreign[framework].selects]
    assert len(found) == 1, f"{framework}: no one default {role}"
    return found[0]


MISSING = object()


def modules_path(family: str) -> str:
    """The PyTorch source of a family of ops."""
    return os.path.join(OPS_DIR, family, "modules.py")


# helpers of single ops that the cost model and the emitter use
from .attention.spec import attended_keys, mask_key  # noqa: E402
from .vision.spec import patch_tokens  # noqa: E402

__all__ = ["OPS", "REQUIRED", "ArgSpec", "Foreign", "NestedCall", "OpDef", "Shape",
           "attended_keys", "foreign_choices", "foreign_default", "foreign_op", "foreign_ops", "mask_key",
           "metrics_key", "modules_path", "numel", "ops_for", "patch_tokens"]
