"""`forgec train SPEC --init-from SRC`: start a run from another model's weights.

SRC is a Hugging Face `save_pretrained` folder (config.json and safetensors or
.bin weights, read by runtime/hf.py), a forgec run folder (its latest
checkpoint) or one of a run's checkpoint folders (`RUN/checkpoints/step_N`, a
DCP checkpoint, runtime/checkpoint.py). Only the weights come from SRC: the
optimizer, the step count, the LR schedule and the data order start afresh,
as in a run from random weights.

Every parameter of the spec's model must be in SRC with its shape, and SRC
must hold nothing else: `check_fits_model()` compares the names and shapes
before anything trains (SRC's tensors are not read for it) and names the first
mismatch.

Under a parallel plan (runtime/distributed.py) the weights load where each
kind is correct for every plan: a DCP checkpoint after sharding, each rank
reading the pieces of its own shards (DCP reshards across world sizes,
plans and stages, as a resume does); a HF checkpoint into the whole model on
each rank's host before the plan prunes and shards it (so such a run always
initialises on the host, whatever its size).
"""

from __future__ import annotations

import os

import torch

from forgec.compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from . import hf


class InitSource:
    """Where a run's initial weights come from: `kind` "hf" (a HF folder) or
    "checkpoint" (a forgec DCP checkpoint folder)."""

    def __init__(self, given: str, kind: str, path: str, tokenizer: str | None) -> None:
        self.given = given  # as the user wrote it (for messages)
        self.kind = kind
        self.path = path
        self.tokenizer = tokenizer  # the source's tokenizer folder, if it has one

    @property
    def reshardable(self) -> bool:
        """Whether the weights load into a sharded model (DCP), rather than into
        the whole model before sharding."""
        return self.kind == "checkpoint"

    def describe(self) -> str:
        what = "the Hugging Face checkpoint" if self.kind == "hf" else "the checkpoint"
        return f"{what} {self.path}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The source's tensors under forgec FQNs, with their shapes (read from
        the files' headers where the format has them)."""
        if self.kind == "hf":
            tensors = hf.read_hf_state_dict(self.path, shapes_only=True)
            renamed = hf.hf_to_forge(tensors, hf.checkpoint_config(self.path))
            return {k: tuple(t.shape) for k, t in renamed.items()}
        import torch.distributed.checkpoint as dcp

        try:
            metadata = dcp.FileSystemReader(self.path).read_metadata()
        except Exception as e:  # noqa: BLE001 — an unreadable checkpoint is bad input
            raise RunError(f"checkpoint {self.path} cannot be read: {type(e).__name__}: {e}") \
                from None
        out = {}
        for key, meta in metadata.state_dict_metadata.items():
            if key.startswith("model.") and hasattr(meta, "size"):
                out[key[len("model."):]] = tuple(meta.size)
        return out

    def load_full(self, model: torch.nn.Module) -> None:
        """Fill the whole, materialised (unsharded) model."""
        if self.kind == "hf":
            hf.load_hf_checkpoint(model, self.path)
        else:
            ckpt.load_checkpoint(self.path, model)

    def load_parts(self, parts: list[torch.nn.Module]) -> None:
        """Fill this rank's model parts, sharded by a plan (DCP checkpoints only)."""
        if self.kind != "checkpoint":
            raise RunError(f"{self.describe()} loads only into a whole model")
        ckpt.load_checkpoint(self.path, parts)


def resolve_init_source(src: str) -> InitSource:
    """--init-from SRC: a HF folder, a forgec run folder (its latest checkpoint) or
    a checkpoint folder; UsageError for anything else."""
    if not os.path.exists(src):
        raise UsageError(f"--init-from {src}: no such file or folder")
    path = os.path.abspath(src)
    if os.path.isfile(os.path.join(path, ckpt.META)):  # RUN/checkpoints/step_N
        ckpt.read_meta(path)  # complete and intact
        run = os.path.dirname(os.path.dirname(path))
        return InitSource(src, "checkpoint", path, _tokenizer_of_run(run))
    if os.path.isfile(os.path.join(path, "run.json")):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise RunError(f"--init-from {src}: the run has no checkpoint yet")
        ckpt.read_meta(latest[1])
        return InitSource(src, "checkpoint", latest[1], _tokenizer_of_run(path))
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            os.path.isfile(os.path.join(path, name))
            for name in (hf.SAFE, hf.SAFE_INDEX, hf.BIN, hf.BIN_INDEX)):
        tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        return InitSource(src, "hf", path, tok)
    raise UsageError(f"--init-from {src}: not a Hugging Face checkpoint folder (config.json "
                     "and model.safetensors), a forgec run folder or one of its "
                     "checkpoints/step_N folders")


def _tokenizer_of_run(run: str) -> str | None:
    from .tokenizer import RUN_TOKENIZER

    folder = os.path.join(run, RUN_TOKENIZER)
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def check_fits_model(source: InitSource, model: torch.nn.Module, spec: str) -> None:
    """RunError naming the first parameter (in the model's order) that SRC lacks
    or holds with another shape, or the first tensor of SRC the model lacks.
    `model` may be on the meta device."""
    want = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    have = source.shapes()
    tied = hf.HEAD in want and hf.EMBED in want and \
        model.state_dict(keep_vars=True)[hf.HEAD] is model.state_dict(keep_vars=True)[hf.EMBED]
    if source.kind == "hf" and tied and hf.HEAD not in have and hf.EMBED in have:
        have[hf.HEAD] = have[hf.EMBED]  # HF leaves a tied head out; so does load_hf_checkpoint
    todo = ("initialise from a checkpoint of the spec's architecture, or make the spec match "
            "SRC (`forgec import-hf SRC -o NAME.forge` writes the spec of a Hugging Face "
            "checkpoint)")
    problem = None
    for name, shape in want.items():
        if name not in have:
            if source.kind == "hf" and name == hf.HEAD and hf.EMBED in have:
                problem = (f"SRC ties its head to the embedding (it has no lm_head.weight) "
                           f"but the spec's head {name} is not tied")
            else:
                problem = f"SRC has no parameter {name} (shape {list(shape)} in the spec's model)"
            break
        if have[name] != shape:
            problem = (f"parameter {name} has shape {list(have[name])} in SRC but "
                       f"{list(shape)} in the spec's model")
            break
    else:
        extra = [k for k in have if k not in want]
        if extra:
            problem = (f"SRC has a parameter {extra[0]} (shape {list(have[extra[0]])}) that the "
                       f"spec's model lacks")
    if problem is not None:
        raise RunError(f"--init-from {source.given} does not fit {spec}: {problem}; {todo}")
