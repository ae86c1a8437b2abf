"""The one training loop of every mode: single process or distributed, text or
image captions.

What differs between runs is two small objects handed to `run_steps()`:

* a task (`TextTask` here, runtime.vlm_task.CaptionTask): its model, data,
  the tensors of a batch and the forward of a micro-batch, the metrics it adds
  to a row, its eval and its plot. The loss of every mode is
  `micro_batch_loss()`: cross-entropy summed over the trained targets, divided
  by the optimizer step's target count, plus the model's weighted MoE balance
  and router z-losses averaged over the step's micro-batches.
* an engine: how this process holds the model and takes an optimizer step on a
  global batch. `LocalEngine` is one process holding the whole model;
  runtime.distributed.Engine is one rank of a parallel plan (FSDP, pipeline,
  tensor and expert parallelism). Either has `parts`, `optimizers`,
  `aliases`, `step(batch, step)` -> (loss, grad norm, MoE routing row) and
  `evaluate(held_out)`.

`run_steps()` does the rest, once: the data order, the LR schedule, the
metrics rows (with MoE routing statistics and the task's eval), the divergence
check, the progress bar and the checkpoints; `resume_from_latest()` restores
what a checkpoint holds. Everything about a step is a function of (seed, step).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time

import torch
import torch.nn.functional as F

from forgec.compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from . import parallel
from .data import IGNORE_INDEX
from .sinks import MOE_KEY, MetricSinks

# ---- the schedule and the optimizer ----------------------------------------------------


def lr_at(step: int, s) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `lr`,
    then cosine to `min_lr` at `schedule_steps`, then `min_lr`."""
    if s.warmup and step <= s.warmup:
        return s.lr * step / s.warmup
    if step >= s.schedule_steps:
        return s.min_lr
    progress = (step - s.warmup) / max(1, s.schedule_steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, s) -> torch.optim.Optimizer:
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


MOMENT_SLICE = 1 << 18  # elements (1 MiB in fp32) a first-step optimizer call updates


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()`, then the gradients set to None.

    Adam and AdamW create their two moments at their first step, which would put
    both moments beside every gradient (at a 128k-token vocabulary, where the
    embedding and the head are most of the parameters, that was the first step's
    peak). So that step runs one parameter at a time, and a plain parameter a
    slice of `MOMENT_SLICE` elements at a time: each call of `optimizer.step()`
    sees one slice (the parameter's `.data` a view of it, its gradient a copy),
    and the moments it makes are copied out, the first moment into the gradient's
    own storage, which it no longer needs, the second into a new buffer. So each
    parameter costs one new buffer, not two, and the step's peak is the moments
    alone. The update is the same bit for bit: Adam's arithmetic is per element,
    and each slice's call counts the same step. Other optimizers, and parameters
    that are not plain tensors (DTensors under FSDP), step a parameter at a time."""
    if optimizer.state:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    release_free_heap()  # the backward's freed activations, before the moments arrive
    for p, grad in zip(params, grads, strict=True):
        if isinstance(optimizer, torch.optim.Adam) and _owns_plain_storage(p, grad):
            _first_step_by_slices(optimizer, p, grad)
        else:
            p.grad = grad
            optimizer.step()
            p.grad = None
    optimizer.zero_grad(set_to_none=True)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere
    nothing). Tensors below glibc's mmap threshold live on its heap, and the pages
    of those a backward frees stay with the process: without this the first step's
    moments, too large for the heap, came on top of ~200 MiB of them."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError, TypeError):  # not glibc (Windows has no CDLL(None))
        pass


def _owns_plain_storage(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `grad` may become `param`'s first moment: plain contiguous tensors of
    one dtype, the gradient alone in its storage (not a view into a bucket)."""
    plain = type(param.data) is torch.Tensor and type(grad) is torch.Tensor
    return (plain and param.is_contiguous() and grad.is_contiguous() and grad._base is None
            and grad.dtype == param.dtype and grad.shape == param.shape
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())


def _first_step_by_slices(optimizer: torch.optim.Adam, param: torch.Tensor,
                          grad: torch.Tensor) -> None:
    full, flat_grad = param.data, grad.view(-1)
    flat, n = full.view(-1), full.numel()
    moments: dict[str, torch.Tensor] = {}  # per-element state, flat, whole parameter
    state: dict = {}
    for start in range(0, n, MOMENT_SLICE):
        end = min(n, start + MOMENT_SLICE)
        optimizer.state.pop(param, None)
        param.data = flat[start:end]
        param.grad = flat_grad[start:end].clone()
        optimizer.step()
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == (end - start,):
                if key not in moments:  # the first moment goes where the gradient was
                    moments[key] = flat_grad if not moments else torch.empty_like(flat)
                moments[key][start:end] = value
    param.data, param.grad = full, None
    optimizer.state[param] = {
        key: moments[key].view(full.shape) if key in moments else value
        for key, value in state.items()
    }


def set_threads() -> int:
    """Use every core this process may run on (2 on the reference machine)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return n


# ---- the loss ---------------------------------------------------------------------------


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the trained targets (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def router_loss(model: torch.nn.Module) -> torch.Tensor:
    """The model's weighted MoE balance and router z-losses of its last forward."""
    return model.get_moe_aux_loss().float() + model.get_moe_router_z_loss().float()


def micro_batch_loss(model: torch.nn.Module, cross_entropy: torch.Tensor, n_targets: int,
                     n_micro: int) -> torch.Tensor:
    """One micro-batch's share of the step's loss: its summed cross-entropy
    (task.loss) over the step's `n_targets` trained targets, plus its router
    losses over the step's `n_micro` micro-batches."""
    return cross_entropy / n_targets + router_loss(model) / n_micro


def count_targets(targets: torch.Tensor) -> int:
    """The trained targets of a batch (at least 1: the loss divides by it)."""
    return max(1, int((targets != IGNORE_INDEX).sum()))


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


def accumulate(model: torch.nn.Module, task, chunks, *, n_targets: int, n_micro: int,
               bf16: bool, device: torch.device, moe_stats: MoEStats | None = None,
               grad_scale: int = 1) -> torch.Tensor:
    """Forward and backward of `chunks` (micro-batches of the task's tensors);
    gradients add up over them. Returns the sum of their micro_batch_loss().
    `grad_scale` multiplies what backward sees (FSDP averages gradients over
    its dp ranks: each rank's share is scaled up by dp)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for chunk in chunks:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cross_entropy = task.loss(model, chunk)
        loss = micro_batch_loss(model, cross_entropy, n_targets, n_micro)
        (loss * grad_scale if grad_scale != 1 else loss).backward()
        total += loss.detach()
        if moe_stats is not None:
            moe_stats.add(model)
    return total


def accumulate_batch(model: torch.nn.Module, task, tensors, *, grad_accum: int = 1,
                     bf16: bool = False, moe_stats: MoEStats | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch (the task's tensors,
    rows first, targets at `task.TARGETS`) in `grad_accum` micro-batches;
    gradients add up to those of the whole batch. Returns the loss: mean
    cross-entropy over the batch's trained targets plus the weighted router
    losses averaged over micro-batches."""
    device = next(model.parameters()).device
    tensors = [t.to(device) for t in tensors]
    chunks = zip(*(t.chunk(grad_accum) for t in tensors), strict=True)
    return accumulate(model, task, chunks, n_targets=count_targets(tensors[task.TARGETS]),
                      n_micro=grad_accum, bf16=bf16, device=device, moe_stats=moe_stats)


# ---- the tasks ---------------------------------------------------------------------------


def load_data(s, vocab_size: int):
    """The training stream of a text run: the default corpus, --data's token file,
    tokenized dataset or weighted mixture (PackedData, or a MixedData of several),
    tokenized by the run's tokenizer."""
    from .data import load_training_data
    from .tokenizer import load_tokenizer

    return load_training_data(s.data, s.data_dtype, vocab_size, s.seq_len, s.seed,
                              tok=load_tokenizer(s.tokenizer))


class TextTask:
    """Next-token prediction over packed documents (runtime.data.PackedData):
    `doc_ids` keeps attention inside a document, no target crosses one."""

    vlm = False
    deterministic = False  # whether the run needs torch's deterministic algorithms
    TARGETS = 1  # the index of the targets in tensors()

    def __init__(self, pkg) -> None:
        self.pkg = pkg

    def new_model(self) -> torch.nn.Module:
        return self.pkg.Transformer()

    def data(self, s):
        """The run's training data and held-out set (None: the task has no eval)."""
        return load_data(s, self.pkg.ModelConfig().vocab_size), None

    def tensors(self, batch) -> tuple[torch.Tensor, ...]:
        """The batch's tensors, rows first; the targets are at index `TARGETS`."""
        return batch.inputs, batch.targets, batch.doc_ids

    def forward(self, model: torch.nn.Module, chunk: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of one micro-batch."""
        inputs, targets, doc_ids = chunk
        return model(inputs, doc_ids=doc_ids), targets

    def loss(self, model: torch.nn.Module, chunk: tuple) -> torch.Tensor:
        """The summed cross-entropy of one micro-batch's trained targets: the
        model's fused head and loss, which never holds the full logits."""
        inputs, targets, doc_ids = chunk
        return model(inputs, doc_ids=doc_ids, targets=targets)

    def pipeline_inputs(self, chunk: tuple) -> tuple[tuple, dict, torch.Tensor]:
        """(the first stage's inputs, every stage's keyword inputs, targets) of a
        micro-batch under a pipeline schedule. `targets` among the keyword inputs
        reaches the last stage only (its fused head and loss)."""
        inputs, targets, doc_ids = chunk
        return (inputs,), {"doc_ids": doc_ids, "targets": targets}, targets

    def describe(self, s) -> str:
        """The batch of a step, in words."""
        return f"{s.batch_size}x{s.seq_len} tokens"

    def describe_eval(self, s, held_out) -> str:
        """The eval of the run, in words (for the line that starts a run)."""
        return ""

    def throughput(self, step: int, s, dt: float) -> dict:
        """What the task adds to a metrics row beside the tokens."""
        return {}

    def eval_due(self, step: int, s) -> bool:
        return False

    def eval_line(self, step: int, row: dict) -> str:
        raise NotImplementedError

    def plot(self, metrics_path: str, png_path: str, title: str, s) -> None:
        plot_losses(metrics_path, png_path, title + f"{s.batch_size}x{s.seq_len}")

    def determinism(self):
        """A context for the run (see `deterministic`)."""
        return contextlib.nullcontext()


# ---- the single-process engine -----------------------------------------------------------


class LocalEngine:
    """The whole model on this process: the step of runtime.train.train()."""

    aliases = None

    def __init__(self, task, s) -> None:
        self.task, self.s = task, s
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        model = task.new_model()
        model.train()
        if s.compile:
            parallel.apply_compile(model)
        self.model = model
        self.parts = [model]
        self.optimizers = [make_optimizer(model, s)]
        self.params = [p for p in model.parameters() if p.requires_grad]

    def parameters_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, batch, step: int) -> tuple[float, float, dict]:
        """Forward, backward, clip and update on the batch; (loss, grad norm,
        MoE routing row of the metrics)."""
        s, model = self.s, self.model
        model.set_moe_step(step, s.schedule_steps)
        stats = MoEStats()
        loss = accumulate_batch(model, self.task, self.task.tensors(batch),
                                grad_accum=s.grad_accum, bf16=s.bf16, moe_stats=stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params,
                                                   s.clip if s.clip > 0 else float("inf"))
        optimizer_step(self.optimizers[0])
        return float(loss), float(grad_norm), stats.row() if stats.counts else {}

    def evaluate(self, held_out) -> dict:
        return self.task.evaluate(self.model, held_out)


# ---- stopping on a signal ----------------------------------------------------------------


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class Stopped(Exception):
    """The run stopped on SIGTERM or SIGUSR1 after checkpointing its last
    completed step: `forgec train` prints the message and exits 0, and the
    same command line with --resume continues it."""


class SignalTrap:
    """While active (`with`), STOP_SIGNALS call `on_signal(signum)` instead of
    their previous handlers, which come back on exit. Handlers are set only in the
    main thread (Python allows no other)."""

    def __init__(self) -> None:
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        raise NotImplementedError


class StopSignals(SignalTrap):
    """While active, SIGTERM and SIGUSR1 ask the loop to stop at the next step
    boundary instead of killing the process mid-step. Under a process group
    `requested()` all-reduces the flag, so every rank stops after the same step
    (each rank must receive the signal, or one of them: any rank's flag stops all)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: str | None = None

    def on_signal(self, signum: int) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether to stop after this step (the same answer on every rank)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.received is not None
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.received else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a signal to another rank"
        return bool(flag.item())


# ---- the loop ------------------------------------------------------------------------------


def run_steps(engine, task, data, s, *, out: str, start: int, held_out=None,
              log: bool = True, progress: bool = True, checkpoint_state: dict | None = None,
              wandb_project: str | None = None) -> dict:
    """Optimizer steps start+1..s.steps of the run in `out`; returns the last
    metrics row. `log`: this process writes metrics.jsonl (appending) and
    reports (rank 0). `checkpoint_state`: what checkpoints keep beside
    trainer_state(). The rows go to TensorBoard and W&B too (runtime/sinks.py;
    W&B with `wandb_project` only)."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    bar = Progress(s.steps, start) if progress and log else None
    tokens_seen = start * s.batch_size * s.seq_len
    last: dict = {}
    stream = open(metrics_path, "a", encoding="utf-8") if log else None
    sinks = MetricSinks(out, start, wandb_project=wandb_project,
                        config=dataclasses.asdict(s)) if log else None
    stop = StopSignals()
    try:
        stop.__enter__()
        for step in range(start + 1, s.steps + 1):
            t0 = time.perf_counter()
            batch = data.next_batch(s.batch_size)
            lr = lr_at(step, s)
            for optimizer in engine.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss, grad_norm, moe = engine.step(batch, step)
            dt = time.perf_counter() - t0
            tokens_seen += s.batch_size * s.seq_len
            last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": s.batch_size * s.seq_len / dt, "tokens": tokens_seen,
                    **task.throughput(step, s, dt)}
            if moe:
                last[MOE_KEY] = moe
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                if stream is not None:
                    stream.write(json.dumps(last) + "\n")
                raise RunError(f"training diverged at step {step} (loss {loss}, grad norm "
                               f"{grad_norm}); try a lower --lr")
            if task.eval_due(step, s):  # every rank takes part; the first reports
                last["eval"] = engine.evaluate(held_out)
            if stream is not None:
                stream.write(json.dumps(last) + "\n")
                stream.flush()
                sinks.write(last)
            if bar:
                bar.update(step, loss, lr, last["tokens_per_s"])
            if "eval" in last and log:
                if bar and bar.tty and step != s.steps:
                    sys.stderr.write("\n")
                print(task.eval_line(step, last["eval"]), file=sys.stderr)
            due = step == s.steps or (s.ckpt_every and step % s.ckpt_every == 0)
            stopping = step < s.steps and stop.requested()
            if due or stopping:
                path = ckpt.save_checkpoint(
                    out, step, engine.parts, engine.optimizers,
                    {**trainer_state(s, data), **(checkpoint_state or {})}, engine.aliases)
                if s.keep_last and log:
                    ckpt.prune_checkpoints(out, s.keep_last)
            if stopping:
                if bar and bar.tty:
                    sys.stderr.write("\n")
                raise Stopped(f"stopped by {stop.received} after step {step} of {s.steps}; "
                              f"checkpoint {path}; the same command with --resume continues")
    finally:
        stop.__exit__()
        if stream is not None:
            stream.close()
            sinks.close()
    return last


# ---- checkpoints of the trainer's state ----------------------------------------------------


def _python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_python_rng_state(value: list) -> None:
    version, state, gauss = value
    random.setstate((version, tuple(state), gauss))


def trainer_state(s, data) -> dict:
    """What a checkpoint keeps beside the weights so that a resumed run repeats
    the uninterrupted one: data order, Python RNG, schedule and settings."""
    return {
        "data": data.state_dict(),
        "python_rng": _python_rng_state(),
        "schedule": {"lr": s.lr, "min_lr": s.min_lr, "warmup": s.warmup,
                     "schedule_steps": s.schedule_steps},
        "settings": dataclasses.asdict(s),
    }


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


# ---- metrics, progress and the loss plot ---------------------------------------------------


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


def write_metrics(path: str, rows: list[dict]) -> None:
    """Replace metrics.jsonl by `rows` (atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def trim_metrics(metrics_path: str, step: int) -> None:
    """Drop the logged rows after `step` (a resumed run logs them again)."""
    write_metrics(metrics_path, [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step])


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


def print_done(rows: list[dict], out: str) -> None:
    """The closing line of a run: first and last loss, where the plot and checkpoint are."""
    if rows:
        print(f"done: loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> "
              f"{rows[-1]['loss']:.4f} (step {rows[-1]['step']}); {out}/loss.png, "
              f"checkpoint {ckpt.latest_checkpoint(out)[1]}", file=sys.stderr)
