"""Distributed training: `forgec train SPEC --plan NAME --nproc K`.

The parallel plan is data in the package's `plan.py` (mesh, FSDP units,
pipeline stages, checkpointed layers), applied by runtime/parallel.py; this
module runs the workers:

* `launch()` (the `forgec train --plan` command) checks everything a user can
  get wrong, generates the package once, then starts K workers with
  `python -m torch.distributed.run --standalone` running `python -m
  runtime.worker` — the same entry a multi-node `torchrun` uses.
* Each worker runs the single-process trainer's loop (runtime/loop.py's
  run_steps) with an `Engine` in place of its LocalEngine: the Engine holds
  this rank's part of the model and takes the optimizer step.
* Each worker joins the process group (NCCL on GPU, gloo on CPU) and a
  DeviceMesh ("pp", "dp", "tp") from the plan's `mesh`, builds its model
  part(s) with `parallel.build_stage`, applies `apply_tp` (over "tp"), `apply_ep`
  (experts over groups of ep consecutive "dp" ranks), then
  `apply_activation_checkpointing` and `apply_fsdp` (FSDP2 over "dp", 2-D
  over TP shards; fp32 master weights, `compute` only sets the dtype
  parameters are gathered in), and runs the plan's pipeline schedule
  (`parallel.SCHEDULES`) with `PipelineStage`s over "pp".
* The global batch is the single-process trainer's: every rank draws the same
  batch and takes its data-parallel slice (the ranks of a TP group take the
  same one). Expert gradients, which FSDP leaves alone, are averaged over dp
  after backward (`parallel.reduce_expert_grads`). The loss is normalised by the
  global number of targets, so gradients and the logged loss equal those of
  one process that runs the same micro-batches as gradient accumulation
  (single-process `--grad-accum` = dp × `--grad-accum` × pipeline
  microbatches); for a dense model, those of any `--grad-accum`. MoE balance/z losses are averaged over all micro-batches,
  the routers' load counts are summed over data-parallel ranks before the
  bias update, and under a pipeline each stage adds its own MoE losses'
  gradient in backward. Gradient clipping uses the norm over all shards and
  stages, counting a piece held by several ranks (TP replicas, expert
  copies) once.
* A vision-language model (a package exporting `VLM`) trains
  runtime/vlm_task.py's caption task the same way (`CaptionTask`): each dp
  rank takes its rows of the global image-caption batch. Its pipeline stages
  are the package's VLMStage modules: the first takes the images, every stage the
  text tokens (a keyword argument each schedule passes to all stages). Every
  rank runs the whole held-out eval (FSDP gathers each unit; under a pipeline
  each eval batch goes through the stages in order) and rank 0 logs it, so
  losses and eval rows equal the single-process run's.
* Checkpoints are DCP shards keyed by FQN (runtime/checkpoint.py): save at
  one world size or plan, resume at any other, single process included.
* Initial weights are the single-process trainer's for the same seed: a fresh
  run builds the whole model on the host with the seed, then prunes and
  shards it (each rank holds the full model once, at start). Past
  HOST_INIT_MAX_PARAMS, and on resume, ranks build on the meta device and
  initialise only their own shards (same distribution, other values).
  `--init-from SRC` (runtime/init_from.py) then loads SRC's weights: a DCP
  checkpoint into the sharded parts (DCP reshards it), a HF checkpoint into
  the whole model on the host before the plan prunes and shards it.
* The run's tokenizer (its setting resolved by the launcher, as the single
  process trainer resolves it) reaches the workers as --tokenizer; rank 0
  copies it into RUN/tokenizer/.
* A plan whose ranks cannot hold their weights, gradients and AdamW moments
  is refused by the launcher before any worker starts (runtime/memory.py).

Every worker leaves through `teardown()`: destroying the process group and
collecting garbage before exit avoids a known abort at interpreter exit
("terminate called without an active exception").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import warnings
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from forgec.compiler.errors import RunError, UsageError

from . import checkpoint as ckpt
from . import parallel
from .loop import (
    MoEStats,
    SignalTrap,
    TextTask,
    accumulate,
    count_targets,
    make_optimizer,
    optimizer_step,
    print_done,
    read_metrics,
    resume_from_latest,
    router_loss,
    run_steps,
    write_metrics,
)
from .memory import check_fits_plan
from .package import build_package, import_package, read_run_info
from .tokenizer import BYTE, attach_run_tokenizer
from .train import (
    check_init_source,
    prepare_overrides,
    resolve_settings,
    resumable,
    task_of,
    validate_settings,
)

# the `forgec train` options a worker receives unchanged from the launcher
FORWARDED = ("steps", "seed", "ckpt_every", "keep_last", "eval_every", "batch_size", "seq_len", "lr",
             "warmup", "min_lr", "grad_accum", "clip", "weight_decay", "data", "data_dtype",
             "tokenizer", "init_from")
SETTINGS = (*FORWARDED, "bf16", "compile")
# A fresh run initialises the whole model on every rank's host, as one process
# would (identical weights for a seed), up to this size; larger models are
# initialised on each rank's own shards, from the meta device.
HOST_INIT_MAX_PARAMS = 2_000_000_000
STATUS_ENV = "FORGEC_LAUNCH_STATUS"  # where launch() wants a worker's bad-input error
PID_PREFIX = "pid."  # a worker's pid file beside the status file: pid.RANK


# ---- the launcher ---------------------------------------------------------------------


def plan_module(pkg):
    import importlib

    return importlib.import_module(pkg.__name__ + ".plan")


def check_plan(planmod, name: str, spec: str, nproc: int | None) -> dict:
    """The plan `name` of the package; UsageError where it cannot run here."""
    plans = planmod.PLANS
    if name not in plans:
        known = ", ".join(sorted(plans)) or "none"
        raise UsageError(f"{spec} has no plan '{name}' (plans: {known})")
    cfg = plans[name]
    m = cfg["mesh"]
    if nproc is not None and nproc != cfg["world"]:
        raise UsageError(f"plan '{name}' runs on {cfg['world']} processes (dp {m['dp']} × pp "
                         f"{m['pp']} × tp {m['tp']}), not --nproc {nproc}")
    if m["dp"] > 1 and "fsdp" not in cfg:
        raise UsageError(f"plan '{name}' has dp = {m['dp']} but no fsdp(...) directive: "
                         "data parallelism runs as FSDP2")
    return cfg


def check_batch(cfg: dict, s) -> None:
    """The batch must split evenly over dp ranks, micro-batches and pipeline microbatches."""
    dp = cfg["mesh"]["dp"]
    if s.batch_size % dp:
        raise UsageError(f"--batch-size {s.batch_size} does not split over dp = {dp} ranks")
    local = s.batch_size // dp
    if local % s.grad_accum:
        raise UsageError(f"--batch-size {s.batch_size} / dp {dp} = {local} sequences per rank "
                         f"do not split into --grad-accum {s.grad_accum} micro-batches")
    pipe = cfg.get("pipeline")
    if pipe and len(pipe["stages"]) > 1 and (local // s.grad_accum) % pipe["microbatches"]:
        raise UsageError(f"{local // s.grad_accum} sequences per rank and micro-batch do not "
                         f"split into the plan's {pipe['microbatches']} pipeline microbatches")


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def launch(args) -> int:
    """`forgec train SPEC --plan NAME [--nproc K]`: validate, build, run torchrun."""
    if args.plan is None:
        raise UsageError("--nproc needs --plan NAME (the spec's parallel plan to run)")
    if args.nproc is not None and args.nproc < 1:
        raise UsageError("--nproc must be at least 1")
    spec, out = args.spec, args.out
    if not os.path.exists(spec):
        raise UsageError(f"no such file: '{spec}'")
    overrides = settings_of(args)
    args.resume = args.resume and resumable(out)  # the workers start afresh too
    source = prepare_overrides(spec, overrides, args.resume)
    for key in ("data", "tokenizer", "init_from"):  # the workers get them resolved
        setattr(args, key, overrides[key])
    saved = read_run_info(out)["settings"] if args.resume else None
    _check_run_dir(out, args.resume)
    s = resolve_settings(overrides, saved)
    os.makedirs(out, exist_ok=True)
    pkg = import_package(build_package(spec, out, check_only=args.resume))
    cfg = check_plan(plan_module(pkg), args.plan, spec, args.nproc)
    task = task_of(pkg, s)
    validate_settings(s, pkg.ModelConfig().max_seq_len)
    check_batch(cfg, s)
    check_init_source(source, task, spec)
    nproc = cfg["world"]
    check_fits_plan(spec, args.plan, nproc,
                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "forgec.runtime.worker", *worker_argv(args)]
    env = dict(os.environ)
    # torchrun would otherwise set 1 thread per worker with a warning; share the cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="forgec-launch-") as tmp:
        # workers report a bad-input error here and exit 0, so that torchrun
        # adds no failure report (and no traceback) to the one-line message
        status = os.path.join(tmp, "status.json")
        env[STATUS_ENV] = status
        with _ForwardSignals(tmp) as forward:
            proc = subprocess.Popen(cmd, env=env)
            while True:
                try:
                    returncode = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    forward.deliver()
        if returncode != 0:
            raise RunError(f"distributed training failed (torchrun exit status "
                           f"{returncode}); see the messages above")
        if os.path.exists(status):
            with open(status, encoding="utf-8") as f:
                error = json.load(f)
            raise (UsageError if error["usage"] else RunError)(error["message"])
    return 0


class _ForwardSignals(SignalTrap):
    """While the launcher waits for torchrun, SIGTERM or SIGUSR1 sent to it go
    to every worker (each wrote its pid beside the status file, `PID_PREFIX`RANK),
    not to torchrun's agent, which would end the workers: each worker then
    checkpoints and stops after the same step (runtime.loop.StopSignals) and
    exits cleanly, and so does the launcher."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.received: int | None = None
        self.sent: set[int] = set()

    def on_signal(self, signum: int) -> None:
        self.received = signum
        self.deliver()

    def deliver(self) -> None:
        """Send the received signal to every worker that has not had it yet
        (a worker that starts later gets it on a later call)."""
        if self.received is None:
            return
        for name in sorted(os.listdir(self.folder)):
            if not name.startswith(PID_PREFIX):
                continue
            try:
                with open(os.path.join(self.folder, name), encoding="ascii") as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue  # being written
            if pid not in self.sent:
                self.sent.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, self.received)


def _check_run_dir(out: str, resume: bool) -> None:
    if not resume and ckpt.list_checkpoints(out):
        raise RunError(f"{out} already holds checkpoints (latest: step "
                       f"{ckpt.latest_checkpoint(out)[0]}); pass --resume to continue it, or "
                       "choose another --out")
    if resume and ckpt.latest_checkpoint(out) is None:
        raise RunError(f"{out} has no checkpoint to resume from")


def worker_argv(args) -> list[str]:
    """The worker's command line: the same `forgec train` options."""
    argv = [args.spec, "--out", args.out, "--plan", args.plan]
    for key in FORWARDED:
        value = getattr(args, key)
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    for flag in ("resume", "bf16", "compile", "no_progress"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- one rank -------------------------------------------------------------------------


class _Tie(NamedTuple):
    """A weight and its copy on another pipeline stage (Engine._tied_weights):
    the FQNs, this rank's (parameter, is the copy) of them, and the process
    group of the pp ranks holding them (None: this rank holds both, or none)."""

    weight: str
    copy: str
    local: list
    group: object


@dataclasses.dataclass
class Layout:
    """This rank's place: world, data-parallel, pipeline and tensor-parallel
    coordinates, device. `ep_mesh` ("ep_replica", "ep") splits the dp ranks
    into groups of ep ranks that share out the experts; ranks at the same
    place in each group hold the same experts."""

    rank: int
    world: int
    dp: int
    pp: int
    dp_rank: int
    pp_rank: int
    mesh: object
    device: torch.device
    tp: int = 1
    tp_rank: int = 0
    ep: int = 1
    ep_mesh: object = None


def setup(cfg: dict) -> Layout:
    """Join the process group and build the ("pp", "dp", "tp") mesh of the plan:
    tp innermost, so that a tensor-parallel group is adjacent ranks (one node)."""
    from torch.distributed.device_mesh import init_device_mesh

    _init_group()
    world = dist.get_world_size()
    m = cfg["mesh"]
    if world != cfg["world"]:
        raise UsageError(f"the plan runs on {cfg['world']} processes (dp {m['dp']} × pp "
                         f"{m['pp']} × tp {m['tp']}), this launch has {world}")
    cuda = torch.cuda.is_available()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (m["pp"], m["dp"], m["tp"]),
                            mesh_dim_names=("pp", "dp", "tp"))
    ep_mesh = None
    if m["ep"] > 1:  # torchtitan's layout: ep consecutive dp ranks share out the experts
        ep_mesh = mesh._unflatten("dp", (m["dp"] // m["ep"], m["ep"]), ("ep_replica", "ep"))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda
              else torch.device("cpu"))
    return Layout(dist.get_rank(), world, m["dp"], m["pp"], mesh["dp"].get_local_rank(),
                  mesh["pp"].get_local_rank(), mesh, device, tp=m["tp"],
                  tp_rank=mesh["tp"].get_local_rank(), ep=m["ep"], ep_mesh=ep_mesh)


def teardown() -> None:
    """Leave the process group cleanly (see the module docstring)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


class _AddLossGrad(torch.autograd.Function):
    """Identity on `out` whose backward also back-propagates `loss` (with
    gradient 1): a pipeline stage's MoE losses join the training objective
    although the loss function only sees the last stage's logits."""

    @staticmethod
    def forward(ctx, out, loss):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class _RouterLosses:
    """Forward hook of a pipeline stage: attach its MoE losses (weight
    `scale`) to its output and record their value for the logged loss."""

    def __init__(self) -> None:
        self.scale = 1.0  # the stage's objective weight of one micro-batch's router loss
        self.report = 1.0  # its weight in the logged loss
        self.values: list[torch.Tensor] = []
        self.stats = None  # the step's MoEStats
        self.inferring = False  # PipelineStage's shape inference is not a training forward

    def __call__(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        loss = router_loss(module)
        if not loss.requires_grad:
            return None  # no MoE layer on this stage
        if not self.inferring:
            self.values.append(loss.detach() * self.report)
            if self.stats is not None:
                self.stats.add(module)
        if isinstance(output, tuple):  # several tensors to the next stage: attach to the first
            return (_AddLossGrad.apply(output[0], loss * self.scale), *output[1:])
        return _AddLossGrad.apply(output, loss * self.scale)


def _stage_class():
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        """PipelineStage whose shape inference leaves no trace: the first step
        runs the stage once on placeholder inputs to learn tensor shapes, which
        would count tokens in the MoE routers' load buffers and log router
        losses. Buffers are restored and the hook told to ignore it."""

        hook: _RouterLosses | None = None

        def _own(self, kwargs: dict | None) -> dict | None:
            """The schedule gives every stage the same keyword inputs; `targets` is
            for the last stage's fused head and loss, which returns the summed
            cross-entropy instead of the (micro-batch, S, vocab) logits."""
            if kwargs and not self.is_last:
                return {k: v for k, v in kwargs.items() if k != "targets"}
            return kwargs

        def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
            return super().forward_one_chunk(fwd_chunk_id, args, self._own(kwargs),
                                             save_forward_output)

        def _forward_metadata_inference(self, args, kwargs=None, has_backward=False):
            kwargs = self._own(kwargs)
            saved = [(b, b.detach().clone()) for b in self.submod.buffers()]
            if self.hook is not None:
                self.hook.inferring = True
            try:
                return super()._forward_metadata_inference(args, kwargs, has_backward)
            finally:
                if self.hook is not None:
                    self.hook.inferring = False
                with torch.no_grad():
                    for buf, value in saved:
                        buf.copy_(value)

    return Stage


class Engine:
    """This rank's model part(s), optimizer(s) and (pipeline) schedule."""

    def __init__(self, pkg, planmod, plan: str, layout: Layout, s, *, fresh: bool,
                 task: TextTask | None = None, init=None) -> None:
        self.planmod, self.plan, self.layout, self.s = planmod, plan, layout, s
        self.init = init  # --init-from's source (runtime/init_from.py), or None
        self.task = task or TextTask(pkg)
        cfg = planmod.PLANS[plan]
        self.cfg = cfg
        pipe = cfg.get("pipeline")
        self.pipe = pipe if pipe and len(pipe["stages"]) > 1 else None
        self.microbatches = self.pipe["microbatches"] if self.pipe else 1
        # micro-batches of one optimizer step, over all ranks
        self.total_micro = layout.dp * s.grad_accum * self.microbatches
        stage_ids = parallel.stages_of_rank(planmod, plan, layout.pp_rank) if self.pipe else [None]
        self.stage_ids = stage_ids
        # every pipeline stage's pp rank (empty without a pipeline)
        self.stage_owner = {sid: r for r in range(layout.pp)
                            for sid in parallel.stages_of_rank(planmod, plan, r)} if self.pipe else {}
        self.parts = self._build(pkg, stage_ids, fresh)
        if init is not None and init.reshardable:  # DCP: each rank reads its own shards
            init.load_parts(self.parts)
        self.ties = self._tied_weights()
        self._sync_tied(grads=False)  # the copies start equal to their weight
        self.optimizers = [make_optimizer(p, s) for p in self.parts]
        self.params = [p for part in self.parts for p in part.parameters() if p.requires_grad]
        copies = {id(p) for tie in self.ties for p, is_copy in tie.local if is_copy}
        # a tied copy's gradient is its weight's: counted once, in the weight's stage
        self.counted = [p for p in self.params if id(p) not in copies]
        self.copies = [p for p in self.params if id(p) in copies]
        # checkpoints keep a copy's optimizer state under its weight's FQN
        self.aliases = {tie.copy: tie.weight for tie in self.ties}
        self.schedule = self._schedule() if self.pipe else None
        self._n_targets = 1
        with torch.device("meta"):  # whether any stage has MoE layers (all ranks agree)
            self._has_moe = bool(self.task.new_model().get_expert_counts())

    # -- building --

    def _build(self, pkg, stage_ids: list, fresh: bool) -> list[nn.Module]:
        planmod, plan, layout = self.planmod, self.plan, self.layout
        with torch.device("meta"):
            n_params = sum(p.numel() for p in self.task.new_model().parameters())
        limit = int(os.environ.get("FORGEC_HOST_INIT_MAX_PARAMS", HOST_INIT_MAX_PARAMS))
        # a HF checkpoint loads into the whole model before the plan shards it
        whole = self.init is not None and not self.init.reshardable
        self.host_init = fresh and (n_params <= limit or whole)
        if self.host_init:
            # exactly the single-process trainer's initialisation for the seed
            torch.manual_seed(self.s.seed)
            random.seed(self.s.seed)
            full = self.task.new_model()
            if whole:
                self.init.load_full(full)
            parts = [full if sid is None else parallel.build_stage(
                full if i == len(stage_ids) - 1 else copy.deepcopy(full), sid, planmod, plan)
                for i, sid in enumerate(stage_ids)]
        else:  # allocate only this rank's shards (a resume overwrites them)
            parts = []
            for sid in stage_ids:
                with torch.device("meta"):
                    m = self.task.new_model()
                parts.append(m if sid is None else parallel.build_stage(m, sid, planmod, plan))
        self.hook = _RouterLosses() if self.pipe else None
        if self.hook is not None:
            # the stage's objective is dp × its share (FSDP averages over dp)
            self.hook.scale = 1.0 / (self.s.grad_accum * self.microbatches)
            self.hook.report = 1.0 / self.total_micro
        for sid, part in zip(stage_ids, parts, strict=True):
            part.train()
            if self.hook is not None:
                part.register_forward_hook(self.hook)
            if self.host_init:
                part.to(layout.device)
            # torchtitan's order: TP, EP, activation checkpointing, compile, then FSDP
            if layout.tp > 1:
                parallel.apply_tp(part, layout.mesh["tp"], planmod)
            if layout.ep > 1:
                parallel.apply_ep(part, layout.ep_mesh["ep"], planmod)
            parallel.apply_activation_checkpointing(part, planmod, plan)
            if self.s.compile:
                parallel.apply_compile(part)
            if "fsdp" in self.cfg:
                parallel.apply_fsdp(part, layout.mesh["dp"], planmod, plan)
            if not self.host_init:
                part.to_empty(device=layout.device)
                self._seed_shard_init(sid)
                with warnings.catch_warnings():  # CPU: handled by _seed_shard_init
                    warnings.filterwarnings("ignore", "DTensor random operators")
                    part.init_weights_and_freqs()
                self._share_replicated_init(part)
        return parts

    def _tied_weights(self) -> list[_Tie]:
        """The plan's weights shared across pipeline stages (a head tied to the
        embedding; plan data `pipeline.tied`): the first stage holds the weight,
        a later one a copy. A group of the pp ranks holding either joins them
        (at each dp and tp coordinate: their shards match)."""
        ties = []
        layout = self.layout
        for tie in (self.pipe or {}).get("tied", []):
            pp_ranks = sorted({self.stage_owner[sid] for sid in tie["stages"]})
            group = None
            if len(pp_ranks) > 1:  # every rank creates every group, in one order
                for d in range(layout.dp):
                    for t in range(layout.tp):
                        ranks = [int(layout.mesh.mesh[p, d, t]) for p in pp_ranks]
                        g = dist.new_group(ranks)
                        if layout.rank in ranks:
                            group = g
            local = [(part.get_parameter(fqn), i > 0)
                     for sid, part in zip(self.stage_ids, self.parts, strict=True)
                     for i, (fqn, at) in enumerate(zip(tie["weights"], tie["stages"],
                                                       strict=True)) if sid == at]
            ties.append(_Tie(tie["weights"][0], tie["weights"][1], local, group))
        return ties

    @torch.no_grad()
    def _sync_tied(self, grads: bool) -> None:
        """Keep each tied copy equal to its weight: at the start, the copy takes
        the weight's values (`grads` False); after backward, the weight and the
        copy both take the sum of their gradients (`grads` True), the gradient
        of the one shared weight of the unpipelined model."""
        from torch.distributed.tensor import DTensor

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        for tie in self.ties:
            pieces = [(local(p.grad if grads else p), is_copy) for p, is_copy in tie.local]
            if not pieces:
                continue
            total = torch.zeros_like(pieces[0][0])
            for piece, is_copy in pieces:
                if grads or not is_copy:
                    total += piece
            if tie.group is not None:
                dist.all_reduce(total, group=tie.group)
            for piece, _ in pieces:
                piece.copy_(total)

    def _seed_shard_init(self, sid: int | None) -> None:
        """Seed the initialisation of this rank's shards: another seed per stage
        (stages of the same shape must not repeat weights). On CUDA, DTensor's
        RNG draws each shard's piece of one full tensor from a seed shared by
        the dp ranks of a stage; on CPU it draws every shard alike, so each dp
        rank gets its own seed there (independent draws of the same law)."""
        layout = self.layout
        seed = self.s.seed * 1_000_003 + (sid or 0)
        if layout.device.type == "cuda":
            from torch.distributed.tensor._random import manual_seed

            torch.manual_seed(seed)
            manual_seed(seed, layout.mesh["dp"])
        else:  # tp ranks too: their TP shards differ (_share_replicated_init)
            torch.manual_seed(seed + 7919 * layout.dp_rank + 104729 * layout.tp_rank)

    def _share_replicated_init(self, part: nn.Module) -> None:
        """CPU, after _seed_shard_init: ranks holding the same piece of a weight
        must hold the same values. The ranks of a tp group share every weight
        (or FSDP shard) that TP does not split, and the dp / ep ranks holding
        the same experts share them: each copies its first holder's draw."""
        from torch.distributed.tensor import DTensor

        layout = self.layout
        if layout.device.type == "cuda":
            return  # DTensor's RNG already draws replicas alike
        replicas = layout.ep_mesh["ep_replica"] if layout.ep > 1 else None
        with torch.no_grad():
            for param in part.parameters():
                names = param.device_mesh.mesh_dim_names if isinstance(param, DTensor) else ()
                split = {n for n, p in zip(names, getattr(param, "placements", ()),
                                           strict=True) if not p.is_replicate()}
                local = param.to_local() if isinstance(param, DTensor) else param
                if layout.tp > 1 and "tp" not in split:
                    dist.broadcast(local, group=layout.mesh.get_group("tp"), group_src=0)
                if replicas is not None and replicas.size() > 1 and "ep" in split:
                    dist.broadcast(local, group=replicas.get_group(), group_src=0)

    def _schedule(self):
        from torch.distributed.pipelining import schedules

        layout = self.layout
        n = parallel.num_stages(self.planmod, self.plan)
        Stage = _stage_class()
        Stage.hook = self.hook
        group = layout.mesh.get_group("pp")
        stages = [Stage(part, sid, n, layout.device, group=group)
                  for sid, part in zip(self.stage_ids, self.parts, strict=True)]
        cls = getattr(schedules, parallel.SCHEDULES[self.pipe["schedule"]])
        multi = issubclass(cls, schedules.PipelineScheduleMulti)
        self.has_first = 0 in self.stage_ids
        self.has_last = n - 1 in self.stage_ids
        # the loss is already normalised by the global target count: no 1/microbatches
        return cls(stages if multi else stages[0], n_microbatches=self.microbatches,
                   loss_fn=self._pipeline_loss, scale_grads=False)

    def _pipeline_loss(self, cross_entropy: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's output is already its micro-batch's summed cross-entropy
        (the task's pipeline_inputs hand it the targets)."""
        return cross_entropy / self._n_targets * self.layout.dp

    # -- the held-out eval of a vision-language model --

    def evaluate(self, held_out) -> dict:
        """forgec.runtime.vlm_task.evaluate of the whole model: unpipelined, every rank
        runs it (FSDP gathers each unit); pipelined, each eval batch goes through
        the stages in order and the last stage's ranks count the hits. Every rank
        returns the same row."""
        if self.schedule is None:
            return self.task.evaluate(self.parts[0], held_out)
        for part in self.parts[1:]:
            part.eval()
        try:
            row = self.task.evaluate(self.parts[0], held_out, forward=self._pipeline_logits)
        finally:
            for part in self.parts[1:]:
                part.train()
        pp_rank = self.stage_owner[len(self.stage_owner) - 1]  # the last stage's
        shared = [row]
        dist.broadcast_object_list(shared, src=int(self.layout.mesh.mesh[pp_rank, 0, 0]))
        return shared[0]

    @torch.no_grad()
    def _pipeline_logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """The logits of one whole eval batch through the pipeline stages in
        order (forward only, no microbatches, so each stage computes what the
        unpipelined model does): every stage's output goes to the next stage's
        rank. The logits on the last stage's ranks, None elsewhere."""
        group = self.layout.mesh.get_group("pp")
        owner = self.stage_owner
        mine = dict(zip(self.stage_ids, self.parts, strict=True))
        n = len(owner)
        x: tuple = (pixels,)
        for sid in range(n):
            if sid not in mine:
                continue
            if sid > 0 and owner[sid - 1] != self.layout.pp_rank:
                x = self._recv(owner[sid - 1], group)
            out = mine[sid](*x, tokens=tokens)
            x = out if isinstance(out, tuple) else (out,)
            if sid < n - 1 and owner[sid + 1] != self.layout.pp_rank:
                self._send(x, owner[sid + 1], group)
        return x[0] if n - 1 in mine else None

    def _send(self, tensors: tuple, peer: int, group) -> None:
        """Tensors to pipeline rank `peer`, their shapes first."""
        dst = dist.get_global_rank(group, peer)
        dist.send_object_list([[(t.shape, t.dtype) for t in tensors]], dst=dst, group=group)
        for t in tensors:
            dist.send(t.contiguous(), dst=dst, group=group)

    def _recv(self, peer: int, group) -> tuple:
        src = dist.get_global_rank(group, peer)
        meta = [None]
        dist.recv_object_list(meta, src=src, group=group)
        out = []
        for shape, dtype in meta[0]:
            t = torch.empty(shape, dtype=dtype, device=self.layout.device)
            dist.recv(t, src=src, group=group)
            out.append(t)
        return tuple(out)

    # -- one optimizer step --

    def step(self, batch, step: int) -> tuple[float, float, dict]:
        """Forward, backward, clip and update on the global batch; (loss, grad
        norm, MoE routing row of the metrics — on rank 0 only)."""
        s, layout = self.s, self.layout
        stats = MoEStats()
        for part in self.parts:
            self._sync_router_load(part)
            part.set_moe_step(step, s.schedule_steps)
        tensors = self.task.tensors(batch)
        self._n_targets = count_targets(tensors[self.task.TARGETS])
        local = s.batch_size // layout.dp
        rows = slice(layout.dp_rank * local, (layout.dp_rank + 1) * local)
        tensors = [t[rows].to(layout.device) for t in tensors]
        chunks = zip(*(t.chunk(s.grad_accum) for t in tensors), strict=True)
        if self.schedule is None:
            # FSDP averages gradients over dp: scale this rank's share up by dp
            total = accumulate(self.parts[0], self.task, chunks, n_targets=self._n_targets,
                               n_micro=self.total_micro, bf16=s.bf16, device=layout.device,
                               moe_stats=stats, grad_scale=layout.dp)
        else:
            total = torch.zeros((), dtype=torch.float32, device=layout.device)
            autocast = torch.autocast(layout.device.type, dtype=torch.bfloat16, enabled=s.bf16)
            self.hook.values.clear()
            self.hook.stats = stats
            for chunk in chunks:
                losses: list[torch.Tensor] = []
                args, kwargs, tgt = self.task.pipeline_inputs(chunk)
                with autocast:
                    self.schedule.step(*(args if self.has_first else ()),
                                       target=tgt if self.has_last else None,
                                       losses=losses, return_outputs=False, **kwargs)
                for mb_loss in losses:
                    total += mb_loss.detach().float() / layout.dp
            for value in self.hook.values:
                total += value
        if layout.ep > 1:  # FSDP reduced the other gradients in backward
            for part in self.parts:
                parallel.reduce_expert_grads(part, layout.ep_mesh["ep_replica"], self.planmod,
                                             self.plan)
        self._sync_tied(grads=True)
        total /= layout.tp  # the ranks of a tp group computed the same loss
        dist.all_reduce(total)  # every rank's share of the global loss
        grad_norm = clip_grad_norm(self.counted, s.clip if s.clip > 0 else math.inf,
                                   layout.device, layout.dp * layout.tp,
                                   copies=self.copies)
        for opt in self.optimizers:
            optimizer_step(opt)
        return float(total), grad_norm, self._gather_stats(stats)

    def _gather_stats(self, stats) -> dict:
        """The step's routing row (train.MoEStats) over all ranks, on rank 0:
        dp ranks saw other rows of the batch (their counts add up), pp ranks
        hold other layers."""
        if not self._has_moe:
            return {}
        mine = ({k: v.tolist() for k, v in stats.counts.items()}, stats.dropped)
        if self.layout.tp_rank != 0:
            mine = ({}, {})  # the same tokens as tp rank 0's
        every = [None] * self.layout.world if self.layout.rank == 0 else None
        dist.gather_object(mine, every, dst=0)
        if every is None:
            return {}
        total = MoEStats()
        for counts, dropped in every:
            for fqn, c in counts.items():
                c = torch.tensor(c)
                total.counts[fqn] = total.counts[fqn] + c if fqn in total.counts else c
            for fqn, n in dropped.items():
                total.dropped[fqn] = total.dropped.get(fqn, 0) + n
        return total.row()

    def _sync_router_load(self, part: nn.Module) -> None:
        """Sum the routers' pending load counts over dp ranks (each saw a slice)."""
        if self.layout.dp == 1:
            return
        group = self.layout.mesh.get_group("dp")
        for load in part.get_router_load().values():
            dist.all_reduce(load, group=group)

    def parameters_total(self) -> int:
        """Parameters of the whole model (over all stages and shards)."""
        n = torch.tensor(sum(p.numel() for p in self.counted), dtype=torch.float64)
        # DTensor numel is global: count each stage once (dp and tp rank 0 of each stage)
        if self.layout.dp_rank != 0 or self.layout.tp_rank != 0:
            n.zero_()
        dist.all_reduce(n)
        return int(n)


def clip_grad_norm(params: list, max_norm: float, device: torch.device,
                   stage_ranks: int = 1, copies: list = ()) -> float:
    """torch.nn.utils.clip_grad_norm_ over every shard and stage; returns the
    total norm. Pipeline stages (along pp) hold disjoint parameters, but for
    tied copies (`copies`: scaled with the rest, not counted); within a
    stage's `stage_ranks` (dp × tp) ranks, FSDP shards along dp, TP along tp
    and expert parallelism along ep, and what a placement does not split is
    replicated. The squared norms of the local pieces add up over the world,
    each weighted by 1 / its number of copies."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            local = g.to_local()
            # Shard, or FSDP's _StridedShard over a TP shard (not a Shard subclass)
            pieces = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements)
                               if not p.is_replicate())
        else:
            local, pieces = g, 1
        sq += torch.linalg.vector_norm(local.float()) ** 2 * (pieces / stage_ranks)
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads + [p.grad for p in copies if p.grad is not None]:
            g.mul_(coef)
    return norm


def train_distributed(spec: str, out: str, *, plan: str, resume: bool = False,
                      progress: bool = True, **overrides) -> dict:
    """One rank of `forgec train --plan`: runtime/loop.py's loop over this
    rank's part of the model and batch (Engine). Rank 0 writes run.json,
    metrics.jsonl, trainer.json and loss.png."""
    rank = int(os.environ.get("RANK", "0"))
    # before any rank can write a checkpoint: every rank decides alike
    resume = resume and resumable(out, note=rank == 0)
    source = prepare_overrides(spec, overrides, resume)
    saved_info = read_run_info(out) if resume else None
    s = resolve_settings(overrides, saved_info["settings"] if saved_info else None)
    _init_group()
    _check_run_dir(out, resume)  # again: torchrun may start workers without launch()
    pkg_dir = _build_once(spec, out, resume, rank, s.tokenizer)
    pkg = import_package(pkg_dir)
    planmod = plan_module(pkg)
    cfg = check_plan(planmod, plan, spec, None)
    task = task_of(pkg, s)
    validate_settings(s, pkg.ModelConfig().max_seq_len)
    check_batch(cfg, s)
    check_init_source(source, task, spec)
    if task.deterministic:  # a worker process trains one run: for all of it
        torch.use_deterministic_algorithms(True, warn_only=True)
    layout = setup(cfg)
    if "OMP_NUM_THREADS" not in os.environ:  # share this machine's cores among its ranks
        torch.set_num_threads(max(1, _cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    data, held_out = task.data(s)
    engine = Engine(pkg, planmod, plan, layout, s, fresh=not resume, task=task, init=source)

    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resume:
        start = resume_from_latest(out, engine.parts, engine.optimizers, data, s.steps,
                                   engine.aliases)
    n_params = engine.parameters_total()
    if rank == 0:
        info = {**(saved_info or {}), "spec": os.path.abspath(spec),
                "package": os.path.basename(pkg_dir), "settings": dataclasses.asdict(s),
                "plan": plan, "world": layout.world}
        if task.vlm:
            info["task"] = "captions"
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start]
        write_metrics(metrics_path, kept if resume else [])
        pipe = engine.pipe
        how = (f"dp {layout.dp} × pp {layout.pp} × tp {layout.tp}"
               + (f", experts over ep {layout.ep}" if layout.ep > 1 else "")
               + (f", {pipe['schedule']} over {len(pipe['stages'])} stages in "
                  f"{pipe['microbatches']} microbatches" if pipe else ""))
        print(f"training {os.path.basename(pkg_dir)} ({n_params:,} parameters) with plan "
              f"'{plan}' on {layout.world} processes ({how}, {layout.device.type}): steps "
              f"{start + 1}..{s.steps}, batch {task.describe(s)}, "
              f"{'bf16 autocast' if s.bf16 else 'fp32'}{', compiled' if s.compile else ''}"
              + task.describe_eval(s, held_out)
              + (f", initialised from {source.describe()}" if source is not None else
                 "" if resume or engine.host_init else
                 "; weights initialised per shard (not those of a single process)"),
              file=sys.stderr)
    last = run_steps(engine, task, data, s, out=out, start=start, held_out=held_out,
                     log=rank == 0, progress=progress,
                     checkpoint_state={"plan": plan, "world": layout.world})
    summary = {"run": out, "steps": s.steps, "last": last}
    if rank == 0:
        task.plot(metrics_path, os.path.join(out, "loss.png"),
                  f"{os.path.basename(pkg_dir)} ({plan}): seed {s.seed}, batch ", s)
        print_done(read_metrics(metrics_path), out)
    return summary


def _init_group() -> None:
    """Join the process group (env:// from torchrun): NCCL on GPU, gloo on CPU."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("FORGEC_DIST_TIMEOUT", "600")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def _build_once(spec: str, out: str, resume: bool, rank: int, tokenizer: str | None) -> str:
    """Rank 0 generates the package and copies the run's tokenizer into
    RUN/tokenizer/ (others would race it); every rank gets the package's
    folder, or rank 0's error."""
    result: list = [None, None]
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            result[0] = build_package(spec, out, check_only=resume)
            attach_run_tokenizer(out, tokenizer or BYTE, resume=resume)
        except (UsageError, RunError) as e:
            result[1] = (isinstance(e, UsageError), str(e))
    dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        usage, message = result[1]
        raise (UsageError if usage else RunError)(message)
    return result[0]
