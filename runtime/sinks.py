"""Where a run's metrics go beside metrics.jsonl: TensorBoard event files and
Weights & Biases.

TensorBoard: event files in the run folder itself (`tensorboard --logdir RUN`,
or the folder above several runs), written by torch.utils.tensorboard where
the `tensorboard` package is installed (`pip install 'forgec[train]'`); a
resumed run purges the events past its checkpoint, as it trims metrics.jsonl.
W&B: only with `--wandb PROJECT`, and the `wandb` package installed; the run
folder's W&B run id is fixed by the folder, so a resumed run continues it.

Each sink gets the numbers of a metrics row: loss, lr, grad_norm,
tokens_per_s, tokens, a task's throughput figures, the eval's numbers
(`eval/NAME`) and each MoE layer's max_load and dropped slots
(`moe/FQN/max_load`).
"""

from __future__ import annotations

import hashlib
import os
import sys

from forgec.compiler.errors import UsageError
from forgec.compiler.ops import metrics_key

# the key of the mixture-of-experts statistics in a metrics row, declared by the ops
# that fill the "experts" slot (a model's MoE hooks collect those)
MOE_KEY = metrics_key("experts")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, by TensorBoard tag."""
    out = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif key == "eval" and isinstance(value, dict):
            out.update({f"eval/{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif key == MOE_KEY and isinstance(value, dict):
            for fqn, layer in value.items():
                out[f"{MOE_KEY}/{fqn}/max_load"] = float(layer["max_load"])
                out[f"{MOE_KEY}/{fqn}/dropped"] = float(layer["dropped"])
    return out


class MetricSinks:
    """The sinks of a run's metrics rows (rank 0 / the single process only)."""

    def __init__(self, out: str, start: int, *, wandb_project: str | None = None,
                 config: dict | None = None) -> None:
        self.writers = []
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: no TensorBoard event files (the `tensorboard` package is not "
                  "installed: pip install 'forgec[train]')", file=sys.stderr)
        else:
            # purge_step: events of steps past the checkpoint are dropped, as the
            # resumed run logs them again
            self.tensorboard = SummaryWriter(log_dir=out, purge_step=start + 1 if start else None)
            self.writers.append(self._tensorboard_row)
        self.wandb = None
        if wandb_project is not None:
            wandb = import_wandb()
            run_id = "forgec-" + hashlib.sha1(os.path.realpath(out).encode()).hexdigest()[:12]
            self.wandb = wandb.init(project=wandb_project, dir=out, id=run_id, resume="allow",
                                    name=os.path.basename(os.path.realpath(out)),
                                    config=config or {})
            self.writers.append(self._wandb_row)

    def _tensorboard_row(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.tensorboard.add_scalar(tag, value, step)

    def _wandb_row(self, step: int, values: dict) -> None:
        self.wandb.log(values, step=step)

    def write(self, row: dict) -> None:
        if self.writers:
            values = scalars(row)
            for write in self.writers:
                write(row["step"], values)

    def close(self) -> None:
        if hasattr(self, "tensorboard"):
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def import_wandb():
    """The wandb module; a UsageError where it is not installed."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the `wandb` package (pip install wandb)") from None
    return wandb
