"""Training a vision-language model: the image-caption task and its eval.

`forgec train` trains a spec whose package exports `VLM` on `CaptionTask`, in
the loop of runtime/loop.py (one process or a parallel plan). The
model reads synthetic images (runtime/vision_data.py, drawn at the size the
spec's vision encoder takes) and learns their captions: the loss is the mean
next-token cross-entropy over the caption bytes and the closing end-of-text,
plus the model's weighted MoE balance and router z-losses.

The eval runs on a fixed held-out set of EVAL_IMAGES images, in batches of
EVAL_BATCH, twice: with each image beside its own caption, and with the
images of every batch rolled by one (each caption beside another caption's
image). Teacher-forced accuracy over the caption targets of both shows
whether the image pathway is used: the text alone cannot tell a caption's
words, so only a model that reads its image beats the shuffled images.
`image_token_acc` restricts the same to the targets only the image decides
(the first byte of each word). The eval runs every `eval_every` steps and at
the end; its numbers go into that step's row of metrics.jsonl under "eval"
and are printed.

Everything about a step is a function of (seed, step), and the checkpoint
holds the data position: a resumed run repeats the losses and eval numbers of
an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import os

import torch

from forgec.compiler.errors import UsageError

from .data import IGNORE_INDEX
from .loop import MoEStats, TextTask, accumulate_batch, read_metrics
from .vision_data import TEXT_LEN, CaptionBatch, CaptionData, eval_set

EVAL_IMAGES = 128
EVAL_BATCH = 32


def image_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(image size, channels) the model's vision encoder takes."""
    return int(model.image_size), int(model.image_channels)


class CaptionTask(TextTask):
    """A vision-language model's image-caption task: the batches of
    runtime.vision_data.CaptionData, the caption cross-entropy, the held-out
    eval of the module docstring.

    The run uses torch's deterministic algorithms: MoMa's expert choice
    gathers tokens by index, and the CPU backward of such a gather adds up
    duplicate indices in a thread-dependent order unless asked not to."""

    vlm = True
    deterministic = True
    TARGETS = 2

    def new_model(self) -> torch.nn.Module:
        return self.pkg.VLM()

    def data(self, s) -> tuple[CaptionData, CaptionBatch]:
        size, channels = image_geometry(self.pkg.VLM)
        return CaptionData(size, channels, s.seed), eval_set(size, channels, EVAL_IMAGES)

    def tensors(self, batch) -> tuple[torch.Tensor, ...]:
        return batch.pixels, batch.inputs, batch.targets

    def forward(self, model: torch.nn.Module, chunk: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, inputs, targets = chunk
        return model(pixels, inputs), targets

    def loss(self, model: torch.nn.Module, chunk: tuple) -> torch.Tensor:
        """The summed cross-entropy of one micro-batch's trained targets: the
        model's fused head and loss, which never holds the full logits."""
        pixels, inputs, targets = chunk
        return model(pixels, inputs, targets=targets)

    def pipeline_inputs(self, chunk: tuple) -> tuple[tuple, dict, torch.Tensor]:
        """The images go to the first stage (plan.VLMStage), the text to every
        stage, the targets to the last (its fused head and loss)."""
        pixels, inputs, targets = chunk
        return (pixels,), {"tokens": inputs, "targets": targets}, targets

    def describe(self, s) -> str:
        return f"{s.batch_size} images x {s.seq_len} caption tokens"

    def describe_eval(self, s, held_out: CaptionBatch) -> str:
        return (f"; eval on {len(held_out.captions)} held-out images "
                f"{f'every {s.eval_every} steps and ' if s.eval_every else ''}at the end")

    def throughput(self, step: int, s, dt: float) -> dict:
        return {"images": step * s.batch_size, "images_per_s": s.batch_size / dt}

    def eval_due(self, step: int, s) -> bool:
        return step == s.steps or bool(s.eval_every and step % s.eval_every == 0)

    def evaluate(self, model: torch.nn.Module, held_out: CaptionBatch, **kw) -> dict:
        return evaluate(model, held_out, **kw)

    def eval_line(self, step: int, row: dict) -> str:
        return eval_line(step, row)

    def plot(self, metrics_path: str, png_path: str, title: str, s) -> None:
        plot_vlm(metrics_path, png_path, title + f"{s.batch_size} images")

    def determinism(self):
        return deterministic()


def accumulate_vlm_gradients(model: torch.nn.Module, batch: CaptionBatch, *, grad_accum: int = 1,
                             bf16: bool = False, moe_stats: MoEStats | None = None
                             ) -> torch.Tensor:
    """Forward and backward of one optimizer step's caption batch in
    `grad_accum` micro-batches (runtime.loop.accumulate_batch); returns the
    loss: caption cross-entropy per trained target plus the weighted router
    losses averaged over micro-batches."""
    task = CaptionTask(None)
    return accumulate_batch(model, task, task.tensors(batch), grad_accum=grad_accum, bf16=bf16,
                            moe_stats=moe_stats)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: CaptionBatch, batch_size: int = EVAL_BATCH, *,
             forward=None) -> dict:
    """Teacher-forced accuracy on `data` with the true images and with each
    batch's images rolled by one; see the module docstring. `forward(images,
    inputs)` computes the logits (the model's own forward by default); a
    pipeline stage before the last returns None and counts no hits."""
    forward = forward or model
    was_training = model.training
    model.eval()
    hits = {"true": [0, 0, 0], "shuffled": [0, 0, 0]}  # caption, image-token, whole-caption hits
    try:
        for start in range(0, len(data.captions), batch_size):
            device = next(model.parameters()).device
            pixels, inputs, targets, decisions = (
                t[start : start + batch_size].to(device)
                for t in (data.pixels, data.inputs, data.targets, data.decisions))
            trained = targets != IGNORE_INDEX
            for name, images in (("true", pixels), ("shuffled", pixels.roll(1, dims=0))):
                logits = forward(images, inputs)
                if logits is None:
                    continue
                right = logits.argmax(dim=-1) == targets
                hits[name][0] += int(right[trained].sum())
                hits[name][1] += int(right[decisions].sum())
                hits[name][2] += int((right | ~trained).all(dim=1).sum())
    finally:
        model.train(was_training)
    n_targets = int((data.targets != IGNORE_INDEX).sum())
    n_decisions, n_captions = int(data.decisions.sum()), len(data.captions)

    def share(hit: int, n: int) -> float:
        return round(hit / n, 6)

    row = {}
    for name, (caption, image, whole) in hits.items():
        row[f"caption_acc_{name}"] = share(caption, n_targets)
        row[f"image_token_acc_{name}"] = share(image, n_decisions)
        row[f"caption_exact_{name}"] = share(whole, n_captions)
    row["margin"] = round(row["caption_acc_true"] - row["caption_acc_shuffled"], 6)
    row["images"] = n_captions
    return row


def eval_line(step: int, ev: dict) -> str:
    return (f"eval step {step}: caption-token accuracy {ev['caption_acc_true']:.3f} with the true "
            f"images, {ev['caption_acc_shuffled']:.3f} with shuffled images "
            f"({ev['margin']:+.3f}); image-decided tokens {ev['image_token_acc_true']:.3f} vs "
            f"{ev['image_token_acc_shuffled']:.3f}; whole captions {ev['caption_exact_true']:.3f} "
            f"vs {ev['caption_exact_shuffled']:.3f} ({ev['images']} held-out images)")


def plot_vlm(metrics_path: str, png_path: str, title: str) -> None:
    """Loss (left) and the eval accuracies (right) of a VLM run as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    evals = [r for r in rows if "eval" in r]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in evals]
    for key, label in (("caption_acc_true", "caption tokens, true images"),
                       ("caption_acc_shuffled", "caption tokens, shuffled images"),
                       ("image_token_acc_true", "image-decided tokens, true images"),
                       ("image_token_acc_shuffled", "image-decided tokens, shuffled images")):
        ax.plot(steps, [r["eval"][key] for r in evals], marker="o", linewidth=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (teacher-forced)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)


def check_settings(s) -> None:
    """The settings a VLM run takes: the caption task fixes the text length
    and the data."""
    if s.seq_len not in (None, TEXT_LEN):
        raise UsageError(f"--seq-len does not apply to a vision-language model: the caption "
                         f"task fixes the text at {TEXT_LEN} tokens")
    if s.data is not None:
        raise UsageError("--data does not apply to a vision-language model: it trains on "
                         "synthetic image captions drawn on the fly")
    s.seq_len = TEXT_LEN


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms (warnings only where there are none)
    for the duration; see CaptionTask."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
