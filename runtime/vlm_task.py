"""Training a vision-language model: the image-caption task, its eval and the loop.

`forgec train` hands a spec whose package exports `VLM` to `train_vlm()`. The
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
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from .data import IGNORE_INDEX
from .vision_data import TEXT_LEN, CaptionBatch, CaptionData, eval_set

EVAL_IMAGES = 128
EVAL_BATCH = 32


def image_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(image size, channels) the model's vision encoder takes."""
    patch = model.vision_encoder.patch_embedding
    return int(patch.image_size), int(patch.proj.in_channels)


def prefer_looped_experts(model: torch.nn.Module) -> None:
    """On CPU, run grouped experts as a loop of matmuls: torch's CPU
    `_grouped_mm` backward is several times slower (the results are the same
    up to rounding). The package is private to the run, so this changes no
    other model."""
    module = sys.modules[type(model).__module__]
    if getattr(module, "GROUPED_MM", False) and next(model.parameters()).device.type == "cpu":
        module.GROUPED_MM = False


def accumulate_vlm_gradients(model: torch.nn.Module, batch: CaptionBatch, *, grad_accum: int = 1,
                             bf16: bool = False, moe_stats=None) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch in `grad_accum`
    micro-batches (gradients add up to those of the whole batch); returns the
    loss: caption cross-entropy per trained target plus the weighted router
    losses averaged over micro-batches."""
    n_targets = max(1, int((batch.targets != IGNORE_INDEX).sum()))
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    chunks = (t.to(device).chunk(grad_accum) for t in (batch.pixels, batch.inputs, batch.targets))
    for pixels, inputs, targets in zip(*chunks, strict=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixels, inputs)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        router_losses = model.get_moe_aux_loss().float() + model.get_moe_router_z_loss().float()
        loss = ce / n_targets + router_losses / grad_accum
        loss.backward()
        total += loss.detach()
        if moe_stats is not None:
            moe_stats.add(model)
    return total


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

    from .train import read_metrics

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


def train_vlm(spec: str, out: str, pkg, pkg_dir: str, s, *, resume: bool,
              saved_info: dict | None, progress: bool = True) -> dict:
    """The training loop of runtime.train.train() for a VLM package; same run
    folder, checkpoints and metrics, plus the caption eval.

    The run uses torch's deterministic algorithms: MoMa's expert choice
    gathers tokens by index, and the CPU backward of such a gather adds up
    duplicate indices in a thread-dependent order unless asked not to."""
    with deterministic():
        return _train_vlm(spec, out, pkg, pkg_dir, s, resume=resume, saved_info=saved_info,
                          progress=progress)


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms (warnings only where there are none)
    for the duration; see train_vlm."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _train_vlm(spec: str, out: str, pkg, pkg_dir: str, s, *, resume: bool,
               saved_info: dict | None, progress: bool) -> dict:
    from .train import (
        MoEStats,
        Progress,
        _write_lines,
        lr_at,
        make_optimizer,
        print_done,
        read_metrics,
        resume_from_latest,
        set_threads,
        trainer_state,
        trim_metrics,
        validate_settings,
    )

    check_settings(s)
    config = pkg.ModelConfig()
    validate_settings(s, config.max_seq_len)
    eval_every = getattr(s, "eval_every", 0) or 0
    threads = set_threads()

    torch.manual_seed(s.seed)
    random.seed(s.seed)
    model = pkg.VLM()
    model.train()
    prefer_looped_experts(model)
    size, channels = image_geometry(model)
    data = CaptionData(size, channels, s.seed)
    held_out = eval_set(size, channels, EVAL_IMAGES)
    optimizer = make_optimizer(model, s)
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resume:
        start = resume_from_latest(out, model, optimizer, data, s.steps)
        trim_metrics(metrics_path, start)
        info = {**saved_info, "settings": dataclasses.asdict(s)}
    else:
        info = {"spec": os.path.abspath(spec), "package": os.path.basename(pkg_dir),
                "settings": dataclasses.asdict(s)}
        _write_lines(metrics_path, [])
    info["task"] = "captions"  # a resumed run records a longer run too
    with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {os.path.basename(pkg_dir)} ({n_params:,} parameters) on {data.source}: "
          f"steps {start + 1}..{s.steps}, batch {s.batch_size} images x {s.seq_len} caption "
          f"tokens{f' in {s.grad_accum} micro-batches' if s.grad_accum > 1 else ''}, "
          f"{'bf16 autocast' if s.bf16 else 'fp32'}, {threads} threads; eval on "
          f"{EVAL_IMAGES} held-out images {f'every {eval_every} steps and ' if eval_every else ''}"
          "at the end", file=sys.stderr)
    bar = Progress(s.steps, start) if progress else None
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = s.clip if s.clip > 0 else float("inf")
    tokens_seen = start * s.batch_size * s.seq_len
    last: dict = {}
    with open(metrics_path, "a", encoding="utf-8") as log:
        for step in range(start + 1, s.steps + 1):
            t0 = time.perf_counter()
            batch = data.next_batch(s.batch_size)
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.set_moe_step(step, s.schedule_steps)
            moe_stats = MoEStats()
            loss = accumulate_vlm_gradients(model, batch, grad_accum=s.grad_accum, bf16=s.bf16,
                                            moe_stats=moe_stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens_seen += s.batch_size * s.seq_len
            last = {"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": s.batch_size * s.seq_len / dt, "tokens": tokens_seen,
                    "images": step * s.batch_size, "images_per_s": s.batch_size / dt}
            if moe_stats.counts:
                last["moe"] = moe_stats.row()
            if not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])):
                log.write(json.dumps(last) + "\n")
                raise RunError(f"training diverged at step {step} (loss {last['loss']}, grad "
                               f"norm {last['grad_norm']}); try a lower --lr")
            if step == s.steps or (eval_every and step % eval_every == 0):
                last["eval"] = evaluate(model, held_out)
            log.write(json.dumps(last) + "\n")
            log.flush()
            if bar:
                bar.update(step, last["loss"], lr, last["tokens_per_s"])
            if "eval" in last:
                if bar and bar.tty and step != s.steps:
                    sys.stderr.write("\n")
                print(eval_line(step, last["eval"]), file=sys.stderr)
            if step == s.steps or (s.ckpt_every and step % s.ckpt_every == 0):
                ckpt.save_checkpoint(out, step, model, optimizer, trainer_state(s, data))
    plot_vlm(metrics_path, os.path.join(out, "loss.png"),
             f"{os.path.basename(pkg_dir)}: seed {s.seed}, batch {s.batch_size} images")
    rows = read_metrics(metrics_path)
    evals = [r for r in rows if "eval" in r]
    summary = {"run": out, "steps": s.steps, "first_loss": rows[0]["loss"] if rows else None,
               "last_loss": rows[-1]["loss"] if rows else None, "last": last,
               "eval": evals[-1]["eval"] if evals else None}
    print_done(rows, out)
    return summary
