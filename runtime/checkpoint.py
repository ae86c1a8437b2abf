"""Checkpoints: DCP model + optimizer state, plus the trainer's own state.

`RUN/checkpoints/step_000120/` holds a `torch.distributed.checkpoint` of
{"model", "optim", "rng"} (works without a process group) and `trainer.json`
(step, data position, LR schedule, Python RNG state, and the SHA-256 of every
DCP file). A checkpoint is written into a hidden temporary folder and renamed
into place only once complete, so a crash never leaves a half-written
`step_*` folder and never damages an existing one. Loading verifies the
checksums first: a corrupt checkpoint is a one-line RunError, never a
traceback, and loading never modifies the checkpoint.

Under a process group (runtime/distributed.py) every rank writes its own
shards into the same folder and rank 0 alone writes `trainer.json` and renames
the folder. Model and optimizer state are keyed by parameter FQN (format 2
flattens the optimizer state per FQN), so a checkpoint saved at one world size
and plan loads at any other, single process included. A rank running several
pipeline stages passes one model (and optimizer) per stage. A weight tied
across pipeline stages (a head sharing the embedding's table) has a copy on a
later stage under the copy's own FQN; `aliases` ({copy FQN: weight FQN})
stores the copy's optimizer state under the weight's FQN, as one process
stores the one shared parameter's (the copy's values are the weight's, so the
ranks holding either write the same entries, once).
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

from forgec.compiler.errors import RunError

FORMAT = 2  # 1: the optimizer state nested as torch.optim saves it (still read)
META = "trainer.json"
_STEP_DIR = re.compile(r"step_(\d+)$")


def _dcp():
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    return dcp, no_dist


def _world() -> tuple[bool, int]:
    """(running under a process group, this rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def _options(flat: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flattened: one key per parameter FQN, so another stage split or world size
    # finds exactly the entries of its own parameters
    return StateDictOptions(flatten_optimizer_state_dict=flat)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _state_dicts(models: list, optimizers: list, flat: bool) -> list[tuple[dict, dict]]:
    """(model, optimizer) state dicts of each model part."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return [get_state_dict(m, o, options=_options(flat)) for m, o in
            zip(models, optimizers, strict=True)]


def _stored_key(key: str, aliases: dict[str, str]) -> str:
    """The checkpoint key of a flattened optimizer-state key ("state.FQN.exp_avg",
    "param_groups.FQN.lr"): a tied copy's FQN becomes its weight's."""
    kind, _, rest = key.partition(".")
    for copy, weight in aliases.items():
        if rest.startswith(copy + "."):
            return f"{kind}.{weight}{rest[len(copy):]}"
    return key


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


def prune_checkpoints(run_dir: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints of a run (those
    with their trainer.json); return the deleted steps. A folder without one
    is left alone, and the newest complete checkpoint is always kept. Each goes
    by a rename out of the `step_*` names first, so a crash mid-delete never
    leaves a damaged checkpoint where the next --resume would look."""
    complete = [(step, path) for step, path in list_checkpoints(run_dir)
                if os.path.isfile(os.path.join(path, META))]
    doomed = complete[:-max(1, keep)]
    root = os.path.join(run_dir, "checkpoints")
    for _, path in doomed:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=root)
        os.rename(path, os.path.join(old, "ckpt"))
        shutil.rmtree(old, ignore_errors=True)
    return [step for step, _ in doomed]


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict,
                    aliases: dict[str, str] | None = None) -> str:
    """Write checkpoint `step` atomically; return its folder. `model` and
    `optimizer` may be lists (one per pipeline stage of this rank); `aliases`:
    see the module doc."""
    import torch.distributed as dist

    dcp, no_dist = _dcp()
    distributed, rank = _world()
    root = os.path.join(run_dir, "checkpoints")
    final = checkpoint_dir(run_dir, step)
    tmp = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=root)
    if distributed:  # every rank writes its shards into rank 0's temporary folder
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        tmp = box[0]
    try:
        parts = _state_dicts(_as_list(model), _as_list(optimizer), flat=True)
        state = {"model": {k: v for m, _ in parts for k, v in m.items()},
                 "optim": {_stored_key(k, aliases or {}): v
                           for _, o in parts for k, v in o.items()},
                 "rng": {"torch": torch.get_rng_state()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
        if distributed:
            dist.barrier()  # all shards are on disk before rank 0 seals the folder
        if rank == 0:
            _seal(tmp, final, root, step, trainer_state)
        if distributed:
            dist.barrier()  # no rank goes on (or exits) before the checkpoint exists
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _seal(tmp: str, final: str, root: str, step: int, trainer_state: dict) -> None:
    """Checksum the shards, write trainer.json and rename the folder into place."""
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
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT) \
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


def load_checkpoint(path: str, model, optimizer=None,
                    aliases: dict[str, str] | None = None) -> dict:
    """Load model (and optimizer and torch RNG, when `optimizer` is given) state
    from a checkpoint folder; return its trainer state (trainer.json). `model`
    and `optimizer` may be lists (one per pipeline stage of this rank);
    `aliases`: see the module doc."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    meta = read_meta(path)
    dcp, no_dist = _dcp()
    models = _as_list(model)
    flat = meta["format"] >= 2
    try:
        if optimizer is None:
            parts = [(get_model_state_dict(m), {}) for m in models]
        else:
            parts = _state_dicts(models, _as_list(optimizer), flat)
        stored = (lambda k: _stored_key(k, aliases or {})) if flat else (lambda k: k)
        if flat or len(parts) > 1:
            state = {"model": {k: v for m, _ in parts for k, v in m.items()},
                     "optim": {stored(k): v for _, o in parts for k, v in o.items()}}
        else:  # format 1: the optimizer state as one nested dict
            state = {"model": parts[0][0], "optim": parts[0][1]}
        if optimizer is None:
            del state["optim"]
        else:
            state["rng"] = {"torch": torch.empty_like(torch.get_rng_state())}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        # dcp.load replaces non-tensor entries in `state`: hand each part its own keys
        for i, (m, (msd, osd)) in enumerate(zip(models, parts, strict=True)):
            msd = {k: state["model"][k] for k in msd}
            if optimizer is None:
                set_model_state_dict(m, msd)
            else:
                osd = {k: state["optim"][stored(k)] for k in osd} if flat else state["optim"]
                set_state_dict(m, _as_list(optimizer)[i], model_state_dict=msd,
                               optim_state_dict=osd, options=_options(flat))
        if optimizer is not None:
            torch.set_rng_state(state["rng"]["torch"])
    except Exception as e:  # noqa: BLE001 — any failure to read it is bad input
        raise RunError(f"checkpoint {path} cannot be loaded: {_first_line(e)}") from None
    return meta
