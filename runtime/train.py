"""`forgec train`: train a spec's model on CPU (or the default device).

The spec's package is generated into `RUN/package/` and imported from there.
AdamW on fp32 master weights (fused where available), optional bf16 autocast,
linear warmup then cosine decay to `min_lr`, grad-norm clipping, gradient
accumulation. Sequences are packed from documents; `doc_ids` keeps attention
inside a document and no target crosses a document boundary.

A run folder holds
  run.json          the spec, package name and settings of the run
  package/NAME/     the generated model package
  metrics.jsonl     one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, tokens
                    (and `moe`: per MoE layer, each expert's share of the routed slots
                    and the slots dropped by capacity; see MoEStats)
  checkpoints/      step_NNNNNN/ (see runtime/checkpoint.py)
  loss.png          the loss curve, written at the end

Everything about a step is a function of (seed, step): a seeded run repeats
bit for bit, and `resume=True` continues from the latest checkpoint with
exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from .data import IGNORE_INDEX, data_setting
from .package import build_package, import_package, read_run_info
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
    data: str | None = None  # a token file; None: the standard library's sources
    data_dtype: str = "uint16"
    # "byte", or a folder with tokenizer.json (default: the spec's NAME.tokenizer/ if it
    # exists); copied into RUN/tokenizer/ (runtime/tokenizer.py)
    tokenizer: str | None = None
    ckpt_every: int = 0  # 0: only at the end
    eval_every: int = 0  # VLM runs: caption eval every K steps (0: only at the end)
    schedule_steps: int | None = None  # the LR schedule's length: the first run's steps


# May differ between a run and its resumption; everything else must not.
RESUMABLE = ("steps", "ckpt_every", "eval_every")


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
                                 "run keeps its settings (only --steps and --ckpt-every may change)")
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
        (s.eval_every >= 0, "--eval-every must not be negative (0: only at the end)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def lr_at(step: int, s: Settings) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `lr`,
    then cosine to `min_lr` at `schedule_steps`, then `min_lr`."""
    if s.warmup and step <= s.warmup:
        return s.lr * step / s.warmup
    if step >= s.schedule_steps:
        return s.min_lr
    progress = (step - s.warmup) / max(1, s.schedule_steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def set_threads() -> int:
    """Use every core this process may run on (2 on the reference machine)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return n


def make_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """AdamW on the fp32 parameters; no weight decay on vectors (norms, biases).
    Under parallelism (runtime/distributed.py) each device mesh's DTensors have
    groups of their own, apart from plain tensors: AdamW's fused and foreach
    kernels take one kind of tensor at a time."""
    by_mesh: dict = {}
    for p in model.parameters():
        if p.requires_grad:
            by_mesh.setdefault(getattr(p, "device_mesh", None), []).append(p)
    groups = []
    for params in by_mesh.values():
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # no empty group: DCP cannot load a flattened optimizer state into one
    groups = [g for g in groups if g["params"]]
    kw = {"lr": s.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, **kw)


class MoEStats:
    """Routing statistics of one optimizer step, summed over its micro-batches:
    routed slots per expert and slots dropped by capacity, per MoE layer FQN."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped: dict[str, int] = {}

    def add(self, model: torch.nn.Module) -> None:
        for fqn, counts in model.get_expert_counts().items():
            counts = counts.detach().float().cpu()
            self.counts[fqn] = self.counts[fqn] + counts if fqn in self.counts else counts
        for fqn, n in model.get_dropped_tokens().items():
            self.dropped[fqn] = self.dropped.get(fqn, 0) + int(n)

    def row(self) -> dict:
        """{fqn: {"load": each expert's share of the routed slots, "max_load": the
        busiest expert's share times the number of experts (1.0 = balanced),
        "dropped": slots dropped}} -- empty for a model without MoE layers."""
        out = {}
        for fqn, counts in self.counts.items():
            share = counts / counts.sum().clamp(min=1)
            out[fqn] = {"load": [round(float(x), 6) for x in share],
                        "max_load": round(float(share.max()) * len(share), 6),
                        "dropped": self.dropped.get(fqn, 0)}
        return out


def accumulate_gradients(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         doc_ids: torch.Tensor, *, grad_accum: int = 1, bf16: bool = False,
                         moe_stats: MoEStats | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch, in `grad_accum`
    micro-batches; gradients add up to those of the whole batch. Returns the
    loss: mean next-token cross-entropy over the batch's trained targets plus
    the model's weighted MoE balance and router z-losses (averaged over
    micro-batches). `moe_stats`, if given, collects each micro-batch's routing."""
    n_targets = max(1, int((targets != IGNORE_INDEX).sum()))
    total = torch.zeros((), dtype=torch.float32, device=inputs.device)
    device_type = inputs.device.type
    for inp, tgt, doc in zip(inputs.chunk(grad_accum), targets.chunk(grad_accum),
                             doc_ids.chunk(grad_accum), strict=True):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inp, doc_ids=doc)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        router_losses = model.get_moe_aux_loss().float() + model.get_moe_router_z_loss().float()
        loss = ce / n_targets + router_losses / grad_accum
        loss.backward()
        total += loss.detach()
        if moe_stats is not None:
            moe_stats.add(model)
    return total


class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal,
    a line every tenth of the run otherwise."""

    def __init__(self, total: int, start: int, stream=None, width: int = 20) -> None:
        self.total, self.start, self.width = total, start, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, (total - start) // 10)
        self.t0 = time.perf_counter()
        self._last = 0

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        filled = int(self.width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] step {step}/{self.total} "
                f"loss {loss:.4f} lr {lr:.1e} {tokens_per_s:,.0f} tok/s "
                f"{_clock(elapsed)}<{_clock(eta)}")
        if self.tty:  # redraw in place; pad over a longer previous line
            self.stream.write("\r" + line.ljust(self._last) + ("\n" if step == self.total else ""))
            self._last = len(line)
        elif step == self.total or done % self.every == 0 or done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    return rows


def _write_lines(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def plot_losses(metrics_path: str, png_path: str, title: str) -> None:
    """The loss curve of metrics.jsonl as a PNG (matplotlib, Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)


def load_data(s: Settings, vocab_size: int):
    """The training stream of the settings: PackedData (or a MixedData of several)."""
    from .data import load_training_data
    from .tokenizer import load_tokenizer

    return load_training_data(s.data, s.data_dtype, vocab_size, s.seq_len, s.seed,
                              tok=load_tokenizer(s.tokenizer))


def _python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_python_rng_state(value: list) -> None:
    version, state, gauss = value
    random.setstate((version, tuple(state), gauss))


def resume_from_latest(out: str, model, optimizer, data, steps: int,
                       aliases: dict[str, str] | None = None) -> int:
    """Load `out`'s latest checkpoint into the model(s), optimizer(s), data order
    and Python RNG; return its step. Shared by every trainer (`aliases`: tied
    copies, see runtime/checkpoint.py)."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        raise RunError(f"{out} has no checkpoint to resume from")
    meta = ckpt.load_checkpoint(latest[1], model, optimizer, aliases)
    start = meta["step"]
    if steps < start:
        raise UsageError(f"--steps {steps} is before the latest checkpoint (step {start})")
    try:
        data.load_state_dict(meta["data"])
        _set_python_rng_state(meta["python_rng"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"checkpoint {latest[1]} is corrupt: bad trainer state ({e})") from None
    return start


def trim_metrics(metrics_path: str, step: int) -> None:
    """Drop the logged rows after `step` (a resumed run logs them again)."""
    _write_lines(metrics_path, [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step])


def trainer_state(s: Settings, data) -> dict:
    """What a checkpoint keeps beside the weights so that a resumed run repeats
    the uninterrupted one: data order, Python RNG, schedule and settings."""
    return {
        "data": data.state_dict(),
        "python_rng": _python_rng_state(),
        "schedule": {"lr": s.lr, "min_lr": s.min_lr, "warmup": s.warmup,
                     "schedule_steps": s.schedule_steps},
        "settings": dataclasses.asdict(s),
    }


def print_done(rows: list[dict], out: str) -> None:
    """The closing line of a run: first and last loss, where the plot and checkpoint are."""
    if rows:
        print(f"done: loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
              f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']}); {out}/loss.png, "
              f"checkpoint {ckpt.latest_checkpoint(out)[1]}", file=sys.stderr)


def train(spec: str, out: str, *, resume: bool = False, progress: bool = True,
          **overrides) -> dict:
    """Train `spec` into the run folder `out`; return a summary.

    `overrides` are Settings fields (None: not given). Raises UsageError or
    RunError for bad input.
    """
    if overrides.get("data") is not None:
        overrides["data"] = data_setting(overrides["data"])
    if overrides.get("tokenizer") is not None:
        overrides["tokenizer"] = resolve_tokenizer_setting(overrides["tokenizer"])
    elif not resume:
        overrides["tokenizer"] = default_tokenizer_setting(spec)
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
    if hasattr(pkg, "VLM"):  # a vision-language model learns image captions
        from .vlm_task import train_vlm

        return train_vlm(spec, out, pkg, pkg_dir, s, resume=resume, saved_info=saved_info,
                         progress=progress)
    if s.eval_every:
        raise UsageError("--eval-every applies to vision-language models (a caption eval); "
                         "a text model has no eval")
    config = pkg.ModelConfig()
    validate_settings(s, config.max_seq_len)
    data = load_data(s, config.vocab_size)
    threads = set_threads()

    torch.manual_seed(s.seed)
    random.seed(s.seed)
    model = pkg.Transformer()
    model.train()
    optimizer = make_optimizer(model, s)
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resume:
        start = resume_from_latest(out, model, optimizer, data, s.steps)
        trim_metrics(metrics_path, start)
    else:
        info = {"spec": os.path.abspath(spec), "package": os.path.basename(pkg_dir),
                "settings": dataclasses.asdict(s)}
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        _write_lines(metrics_path, [])
    if resume:  # record a longer run so that a later resume keeps it
        info = {**saved_info, "settings": dataclasses.asdict(s)}
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {os.path.basename(pkg_dir)} ({n_params:,} parameters) on {data.source}: "
          f"steps {start + 1}..{s.steps}, batch {s.batch_size}x{s.seq_len} tokens"
          f"{f' in {s.grad_accum} micro-batches' if s.grad_accum > 1 else ''}, "
          f"{'bf16 autocast' if s.bf16 else 'fp32'}, {threads} threads", file=sys.stderr)
    bar = Progress(s.steps, start) if progress else None
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = s.clip if s.clip > 0 else float("inf")
    tokens_seen = start * s.batch_size * s.seq_len
    last = {}
    with open(metrics_path, "a", encoding="utf-8") as log:
        for step in range(start + 1, s.steps + 1):
            t0 = time.perf_counter()
            batch = data.next_batch(s.batch_size)
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.set_moe_step(step, s.schedule_steps)
            moe_stats = MoEStats()
            loss = accumulate_gradients(model, batch.inputs, batch.targets, batch.doc_ids,
                                        grad_accum=s.grad_accum, bf16=s.bf16,
                                        moe_stats=moe_stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens_seen += s.batch_size * s.seq_len
            last = {"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": s.batch_size * s.seq_len / dt, "tokens": tokens_seen}
            if moe_stats.counts:
                last["moe"] = moe_stats.row()
            log.write(json.dumps(last) + "\n")
            log.flush()
            if bar:
                bar.update(step, last["loss"], lr, last["tokens_per_s"])
            if not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])):
                raise RunError(f"training diverged at step {step} (loss {last['loss']}, grad "
                               f"norm {last['grad_norm']}); try a lower --lr")
            if step == s.steps or (s.ckpt_every and step % s.ckpt_every == 0):
                ckpt.save_checkpoint(out, step, model, optimizer, trainer_state(s, data))
    plot_losses(metrics_path, os.path.join(out, "loss.png"),
                f"{os.path.basename(pkg_dir)}: seed {s.seed}, batch {s.batch_size}x{s.seq_len}")
    rows = read_metrics(metrics_path)
    summary = {"run": out, "steps": s.steps, "first_loss": rows[0]["loss"] if rows else None,
               "last_loss": rows[-1]["loss"] if rows else None, "last": last}
    print_done(rows, out)
    return summary
