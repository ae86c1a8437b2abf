"""Checkpoints: DCP model + optimizer state, plus the trainer's own state.

`RUN/checkpoints/step_000120/` holds a `torch.distributed.checkpoint` of
{"model", "optim", "rng"} (works without a process group) and `trainer.json`
(step, data position, LR schedule, Python RNG state, and the SHA-256 of every
DCP file). A checkpoint is written into a hidden temporary folder and renamed
into place only once complete, so a crash never leaves a half-written
`step_*` folder and never damages an existing one. Loading verifies the
checksums first: a corrupt checkpoint is a one-line RunError, never a
traceback, and loading never modifies the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings

import torch

from compiler.cli import RunError

FORMAT = 1
META = "trainer.json"
_STEP_DIR = re.compile(r"step_(\d+)$")


def _dcp():
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    return dcp, no_dist


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint of a run, by step."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict) -> str:
    """Write checkpoint `step` atomically; return its folder."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dcp, no_dist = _dcp()
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=root)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "rng": {"torch": torch.get_rng_state()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
        files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        meta = {"format": FORMAT, "step": step, **trainer_state, "files": files}
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # only a rerun of the same step gets here
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".old", dir=root)
            os.rename(final, os.path.join(old, "ckpt"))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(path: str) -> dict:
    """trainer.json of a checkpoint, after verifying every file's checksum."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise RunError(f"checkpoint {path} is incomplete: it has no {META}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunError(f"checkpoint {path} is corrupt: {META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT \
            or not isinstance(meta.get("files"), dict) or not isinstance(meta.get("step"), int):
        raise RunError(f"checkpoint {path} is corrupt: {META} is not a forgec checkpoint "
                       f"of format {FORMAT}")
    for name, digest in sorted(meta["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise RunError(f"checkpoint {path} is corrupt: {name} is missing")
        if _sha256(file) != digest:
            raise RunError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_checkpoint(path: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load model (and optimizer and torch RNG, when `optimizer` is given) state
    from a checkpoint folder; return its trainer state (trainer.json)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    meta = read_meta(path)
    dcp, no_dist = _dcp()
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd,
                     "rng": {"torch": torch.empty_like(torch.get_rng_state())}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            torch.set_rng_state(state["rng"]["torch"])
    except Exception as e:  # noqa: BLE001 — any failure to read it is bad input
        raise RunError(f"checkpoint {path} cannot be loaded: {_first_line(e)}") from None
    return meta
