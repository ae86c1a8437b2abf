"""`forgec train`: train a spec's model on CPU (or the default device).

The spec's package is generated into `RUN/package/` and imported from there.
AdamW on fp32 master weights (fused where available), optional bf16 autocast,
linear warmup then cosine decay to `min_lr`, grad-norm clipping, gradient
accumulation. Sequences are packed from documents; `doc_ids` keeps attention
inside a document and no target crosses a document boundary. The loop is
runtime/loop.py's, shared with distributed runs (runtime/distributed.py); a
package exporting `VLM` trains the caption task of runtime/vlm_task.py.

A run folder holds
  run.json          the spec, package name and settings of the run
  package/NAME/     the generated model package
  metrics.jsonl     one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, tokens
                    (and `moe`: per MoE layer, each expert's share of the routed slots
                    and the slots dropped by capacity; see MoEStats)
  checkpoints/      step_NNNNNN/ (see runtime/checkpoint.py; --keep-last K keeps the newest K)
  events.out.tfevents.*  the metrics for TensorBoard, where it is installed (runtime/sinks.py)
  loss.png          the loss curve, written at the end

Everything about a step is a function of (seed, step): a seeded run repeats
bit for bit, and `resume=True` continues from the latest checkpoint with
exactly the losses of an uninterrupted run. SIGTERM or SIGUSR1 checkpoints
the step in progress and stops (runtime.loop.StopSignals); `resume=True` on a
folder with no checkpoint yet starts the run afresh. A run whose weights,
gradients and AdamW state cannot fit on its device is refused before it
allocates (runtime/memory.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from forgec.compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from .data import data_setting
from .loop import (  # noqa: F401 -- the trainer's API, re-exported
    LocalEngine,
    MoEStats,
    Progress,
    TextTask,
    accumulate_batch,
    load_data,
    lr_at,
    make_optimizer,
    plot_losses,
    print_done,
    read_metrics,
    resume_from_latest,
    run_steps,
    set_threads,
    trainer_state,
    trim_metrics,
    write_metrics,
)
from .memory import check_fits
from .package import build_package, import_package, read_run_info
from .sinks import import_wandb
from .tokenizer import (
    BYTE,
    attach_run_tokenizer,
    default_tokenizer_setting,
    resolve_tokenizer_setting,
)


@dataclass
class Settings:
    """What a run trains with; None fields get defaults that depend on others."""

    steps: int = 100
    seed: int = 0
    batch_size: int = 8  # sequences per optimizer step (split over grad_accum micro-batches)
    seq_len: int | None = None  # default: min(max_seq_len, 256)
    lr: float = 3e-3
    warmup: int | None = None  # default: min(100, steps // 10)
    min_lr: float | None = None  # default: lr / 10
    grad_accum: int = 1
    clip: float = 1.0  # max grad norm; 0 disables clipping
    weight_decay: float = 0.1
    bf16: bool = False
    compile: bool = False  # torch.compile each block (runtime.parallel.apply_compile)
    data: str | None = None  # token file, tokenized dataset or mixture; None: the stdlib's sources
    data_dtype: str = "uint16"
    # "byte", or a folder with tokenizer.json (default: the spec's NAME.tokenizer/ if it
    # exists); copied into RUN/tokenizer/ (runtime/tokenizer.py)
    tokenizer: str | None = None
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 0  # keep the newest K checkpoints (0: all)
    eval_every: int = 0  # VLM runs: caption eval every K steps (0: only at the end)
    schedule_steps: int | None = None  # the LR schedule's length: the first run's steps
    # initial weights (runtime/init_from.py): a HF folder, a run or a checkpoint (absolute)
    init_from: str | None = None


# May differ between a run and its resumption; everything else must not.
RESUMABLE = ("steps", "ckpt_every", "eval_every", "keep_last", "compile")


def resolve_settings(overrides: dict, saved: dict | None) -> Settings:
    """Settings from explicit overrides (None = not given) over the saved run's or defaults."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if saved is not None:
        for key, value in given.items():
            if key not in RESUMABLE and key in saved and saved[key] != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} {value} differs from the run's {saved[key]}; a resumed "
                                 "run keeps its settings (only --steps, --ckpt-every, --eval-every and "
                                 "--keep-last may change)")
        s = Settings(**{**{k: v for k, v in saved.items() if k in fields}, **given})
    else:
        s = Settings(**given)
    if s.schedule_steps is None:
        s.schedule_steps = s.steps
    if s.warmup is None:
        s.warmup = min(100, s.schedule_steps // 10)
    if s.min_lr is None:
        s.min_lr = s.lr / 10
    return s


def validate_settings(s: Settings, max_seq_len: int) -> None:
    if s.seq_len is None:
        s.seq_len = min(max_seq_len, 256)
    checks = [
        (s.steps >= 1, "--steps must be at least 1"),
        (s.batch_size >= 1, "--batch-size must be at least 1"),
        (s.grad_accum >= 1, "--grad-accum must be at least 1"),
        (s.batch_size % s.grad_accum == 0,
         f"--batch-size {s.batch_size} is not a multiple of --grad-accum {s.grad_accum}"),
        (s.seq_len >= 1, "--seq-len must be at least 1"),
        (s.seq_len <= max_seq_len, f"--seq-len {s.seq_len} exceeds the model's max_seq_len "
         f"{max_seq_len}"),
        (s.lr > 0 and math.isfinite(s.lr), "--lr must be a positive number"),
        (0 <= s.min_lr <= s.lr, "--min-lr must be between 0 and --lr"),
        (s.warmup >= 0, "--warmup must not be negative"),
        (s.clip >= 0, "--clip must not be negative (0 disables clipping)"),
        (s.weight_decay >= 0, "--weight-decay must not be negative"),
        (s.ckpt_every >= 0, "--ckpt-every must not be negative (0: only at the end)"),
        (s.keep_last >= 0, "--keep-last must not be negative (0: keep every checkpoint)"),
        (s.eval_every >= 0, "--eval-every must not be negative (0: only at the end)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def task_of(pkg, s) -> TextTask:
    """The task of the package's model (image captions for a package exporting
    `VLM`, else next-token prediction); checks (and completes) the settings it
    takes."""
    if hasattr(pkg, "VLM"):
        from .vlm_task import CaptionTask, check_settings

        check_settings(s)
        return CaptionTask(pkg)
    if s.eval_every:
        raise UsageError("--eval-every applies to vision-language models (a caption eval); "
                         "a text model has no eval")
    return TextTask(pkg)


def accumulate_gradients(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         doc_ids: torch.Tensor, *, grad_accum: int = 1, bf16: bool = False,
                         moe_stats: MoEStats | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's text batch in `grad_accum`
    micro-batches (runtime.loop.accumulate_batch); gradients add up to those
    of the whole batch. Returns the loss: mean next-token cross-entropy over
    the batch's trained targets plus the model's weighted MoE balance and
    router z-losses (averaged over micro-batches). `moe_stats`, if given,
    collects each micro-batch's routing."""
    return accumulate_batch(model, TextTask(None), (inputs, targets, doc_ids),
                            grad_accum=grad_accum, bf16=bf16, moe_stats=moe_stats)


def resumable(out: str, *, note: bool = True) -> bool:
    """Whether `--resume` continues `out`: it holds a checkpoint. A run stopped
    before its first checkpoint (or never started) has nothing to continue, and
    `--resume` starts it afresh with the given settings -- the one command line
    of every (re)start of a preemptible job."""
    if ckpt.latest_checkpoint(out) is not None:
        return True
    if note:
            print(f"nothing to resume in {out} (no checkpoint yet): starting a fresh run",
              file=sys.stderr)
    return False


def prepare_overrides(spec: str, overrides: dict, resume: bool):
    """Normalise the run's --data, --tokenizer and --init-from settings in
    `overrides` (shared with distributed runs); return the --init-from source
    (runtime/init_from.py), None without one or when `resume` continues a
    checkpoint (it wins over --init-from: a preemptible job's one command line
    starts from SRC, then resumes its own checkpoints). The tokenizer: --tokenizer,
    else the spec's own (NAME.tokenizer/), else SRC's, else bytes."""
    from .init_from import resolve_init_source

    if overrides.get("data") is not None:
        overrides["data"] = data_setting(overrides["data"])
    source = None
    if resume and overrides.get("init_from") is not None:
        overrides["init_from"] = None  # the run's own checkpoint wins
        if int(os.environ.get("RANK", "0")) == 0:
            print("resuming from the run's latest checkpoint: --init-from applies only to a "
                  "fresh start", file=sys.stderr)
    if overrides.get("init_from") is not None:
        source = resolve_init_source(overrides["init_from"])
        overrides["init_from"] = source.path
    if overrides.get("tokenizer") is not None:
        overrides["tokenizer"] = resolve_tokenizer_setting(overrides["tokenizer"])
    elif not resume:
        overrides["tokenizer"] = default_tokenizer_setting(spec)
        if overrides["tokenizer"] == BYTE and source is not None and source.tokenizer:
            overrides["tokenizer"] = source.tokenizer
    return None if resume else source


def check_init_source(source, task, spec: str) -> None:
    """The spec's model against --init-from's names and shapes (nothing allocated)."""
    if source is None:
        return
    from .init_from import check_fits_model

    with torch.device("meta"):
        check_fits_model(source, task.new_model(), spec)


def _write_run_info(out: str, info: dict) -> None:
    with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)


def train(spec: str, out: str, *, resume: bool = False, progress: bool = True,
          wandb: str | None = None, **overrides) -> dict:
    """Train `spec` into the run folder `out`; return a summary.

    `overrides` are Settings fields (None: not given); `wandb`: a W&B project
    to log to as well. Raises UsageError or RunError for bad input, and
    runtime.loop.Stopped after checkpointing on SIGTERM or SIGUSR1.
    """
    if wandb is not None:
        import_wandb()  # a usage error before anything else
    resume = resume and resumable(out)
    source = prepare_overrides(spec, overrides, resume)
    saved_info = read_run_info(out) if resume else None
    if not resume and ckpt.list_checkpoints(out):
        raise RunError(f"{out} already holds checkpoints (latest: step "
                       f"{ckpt.latest_checkpoint(out)[0]}); pass --resume to continue it, or "
                       "choose another --out")
    s = resolve_settings(overrides, saved_info["settings"] if saved_info else None)
    if not os.path.exists(spec):
        raise UsageError(f"no such file: '{spec}'")
    os.makedirs(out, exist_ok=True)
    pkg_dir = build_package(spec, out, check_only=resume)
    attach_run_tokenizer(out, s.tokenizer or BYTE, resume=resume)
    pkg = import_package(pkg_dir)
    if resume and os.path.basename(pkg_dir) != saved_info["package"]:
        raise RunError(f"{out} trained package {saved_info['package']}, not "
                       f"{os.path.basename(pkg_dir)}")
    task = task_of(pkg, s)
    validate_settings(s, pkg.ModelConfig().max_seq_len)
    check_init_source(source, task, spec)
    check_fits(spec, torch.get_default_device())  # before the model takes any memory
    with task.determinism():
        return _train(task, spec, out, pkg_dir, s, resume=resume, saved_info=saved_info,
                      progress=progress, wandb=wandb, source=source)


def _train(task: TextTask, spec: str, out: str, pkg_dir: str, s: Settings, *, resume: bool,
           saved_info: dict | None, progress: bool, wandb: str | None = None,
           source=None) -> dict:
    data, held_out = task.data(s)
    threads = set_threads()
    engine = LocalEngine(task, s)
    if source is not None:  # weights only: the optimizer, step and schedule start afresh
        source.load_full(engine.model)
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resume:
        start = resume_from_latest(out, engine.model, engine.optimizers[0], data, s.steps)
        trim_metrics(metrics_path, start)
        info = {**saved_info, "settings": dataclasses.asdict(s)}  # a later resume keeps it
    else:
        info = {"spec": os.path.abspath(spec), "package": os.path.basename(pkg_dir),
                "settings": dataclasses.asdict(s)}
        write_metrics(metrics_path, [])
    if task.vlm:
        info["task"] = "captions"
    _write_run_info(out, info)

    print(f"training {os.path.basename(pkg_dir)} ({engine.parameters_total():,} parameters) on "
          f"{data.source}: steps {start + 1}..{s.steps}, batch {task.describe(s)}"
          f"{f' in {s.grad_accum} micro-batches' if s.grad_accum > 1 else ''}, "
          f"{'bf16 autocast' if s.bf16 else 'fp32'}{', compiled' if s.compile else ''}, "
          f"{threads} threads"
          + (f", initialised from {source.describe()}" if source is not None else "")
          + task.describe_eval(s, held_out), file=sys.stderr)
    last = run_steps(engine, task, data, s, out=out, start=start, held_out=held_out,
                     progress=progress, wandb_project=wandb)
    task.plot(metrics_path, os.path.join(out, "loss.png"),
              f"{os.path.basename(pkg_dir)}: seed {s.seed}, batch ", s)
    rows = read_metrics(metrics_path)
    summary = {"run": out, "steps": s.steps, "first_loss": rows[0]["loss"] if rows else None,
               "last_loss": rows[-1]["loss"] if rows else None, "last": last}
    if task.vlm:
        evals = [r for r in rows if "eval" in r]
        summary["eval"] = evals[-1]["eval"] if evals else None
    print_done(rows, out)
    return summary
