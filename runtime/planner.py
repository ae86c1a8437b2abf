"""`forgec plan SPEC --plan NAME --world N`: a parallel plan at scale, on paper.

The spec's package is generated into a temporary folder and its model built on
the meta device (no memory). Then, for every pipeline rank, a fake process
group of N ranks stands in for the cluster: the rank's pipeline stages are cut
from the model with the package's own `plan.build_stage` and sharded with its
own `plan.apply_fsdp` (FSDP2 `fully_shard` over the dp dimension of the
DeviceMesh) -- the code a real run executes -- and the local shards are read
off the resulting DTensors.

Rank layout: the mesh is (pp, dp), pipeline outermost, so rank = pp_rank * dp
+ dp_rank (torch's `init_device_mesh` order, as `forgec train --plan` uses).

Per rank, in bytes (`per_rank` in the JSON):
  params          parameter elements stored on the rank (FSDP padding excluded)
  param_bytes     fp32 master weights            4 B/element
  grad_bytes      fp32 gradients (sharded)       4 B/element
  optimizer_bytes AdamW's two fp32 moments       8 B/element
  gathered_bytes  FSDP all-gather buffers at their peak: the root's parameters
                  plus two units (the one computing and the one prefetched), in
                  the compute dtype, and one unit's unsharded gradient in the
                  reduce dtype; all units when `reshard = never`; 0 without FSDP
  activation_bytes tensors autograd saves for backward, measured by running the
                  stage's forward (and, on the last stage, the loss) on the meta
                  device under `saved_tensors_hooks`, times the microbatches a
                  schedule keeps in flight on that stage; a checkpointed unit
                  keeps only its input, plus one unit's activations recomputed
                  in backward. Attention is counted as fused kernels save it
                  (q, k, v, output, log-sum-exp), as torch's CPU and CUDA kernels do.
  logits_bytes    last stage: the fp32 logits' gradient (microbatch, seq, vocab),
                  alive with the saved activations at the start of backward
  total_bytes     the estimated peak of a training step (from the second on, when
                  AdamW's moments exist): weights + optimizer + gathered + the
                  larger of (activations + logits) and gradients -- backward frees
                  activations as it produces gradients, so the peak is at its
                  start or at its end

Checked against measured peaks on CPU (tests/test_planner.py: within 15 %).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import math
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from compiler.cli import RunError, UsageError

BYTES = {"fp32": 4, "bf16": 2}
MESH_ORDER = ("pp", "dp")  # pipeline outermost


# ---- what a stage's forward saves for backward ---------------------------------------


class _FusedAttention(torch.autograd.Function):
    """Stands in for `F.scaled_dot_product_attention` while measuring: saves what
    the fused (flash) kernels save, not the math fallback's S×S probabilities
    (which is what the meta device would dispatch to)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        # (B, H, S, D) as a transpose of (B, S, H, D) memory, like the fused
        # kernels' output, so that the usual transpose-reshape back is a view
        b, h, s, _ = q.shape
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement does no backward
        raise AssertionError("measurement only")


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    return _FusedAttention.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def unit_fqns(model: nn.Module) -> list[str]:
    """The model's top-level units in execution order: root modules and layers."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict):
            out += [f"{name}.{key}" for key in child]
        elif child is not None:
            out.append(name)
    return out


def saved_bytes_per_unit(pkg, micro_batch: int, seq_len: int, dtype: torch.dtype) -> dict:
    """{unit FQN: bytes autograd saves in one microbatch's forward}, measured on
    the meta device; the loss (cross-entropy over fp32 logits) counts for the
    output head. Parameters are not counted (they are memory of their own)."""
    with torch.device("meta"):
        model = pkg.Transformer()
    model.to(dtype)
    module = importlib.import_module(f"{pkg.__name__}.model")
    if hasattr(module, "rope_tables"):  # the tables init_weights_and_freqs() would make
        model.rope_cos, model.rope_sin = module.rope_tables(model.config.max_seq_len,
                                                            device="meta")
    current = ["?"]
    for fqn in unit_fqns(model):
        model.get_submodule(fqn).register_forward_pre_hook(
            lambda _m, _a, fqn=fqn: current.__setitem__(0, fqn))
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}
    per_unit: dict[str, int] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params and id(base) not in seen:
            seen[id(base)] = base  # keeps ids unique while measuring
            per_unit[current[0]] += base.numel() * base.element_size()
        return t

    tokens = torch.zeros(micro_batch, seq_len + 1, dtype=torch.long, device="meta")
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return dict(per_unit)


# ---- how many microbatches a schedule keeps in flight ---------------------------------


def in_flight(schedule: str | None, microbatches: int, pp: int, pp_rank: int,
              local_stages: int) -> int:
    """(microbatch, stage) forwards whose activations a pipeline rank holds at once,
    at most: GPipe runs every forward first; 1F1B warms up with pp - rank
    forwards; the interleaved and zero-bubble schedules warm up with
    (local_stages - 1) * pp + 2 * (pp - 1 - rank) + 1 (torch's warm-up rule)."""
    if schedule is None:
        return 1
    if schedule == "gpipe":
        return microbatches * local_stages
    if schedule == "1f1b":
        return min(microbatches, pp - pp_rank)
    warmup = (local_stages - 1) * pp + 2 * (pp - 1 - pp_rank) + 1
    return min(microbatches * local_stages, warmup)


# ---- FSDP shards under a fake process group ------------------------------------------


def chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of dim 0 that `torch.chunk(rows, parts)` gives part `index` (FSDP2's
    sharding: ceil-sized chunks, the last ones shorter or empty)."""
    size = -(-rows // parts)
    return max(0, min(rows, (index + 1) * size) - index * size)


def _stage_view(full: nn.Module) -> nn.Module:
    """A new root sharing `full`'s modules, with containers of its own, so that
    `build_stage` can prune it without touching `full` (building the model once
    serves every stage)."""
    view = object.__new__(type(full))
    nn.Module.__init__(view)
    for key, value in full.__dict__.items():
        if key not in view.__dict__:
            view.__dict__[key] = value
    view._parameters.update(full._parameters)
    view._buffers.update(full._buffers)
    view._non_persistent_buffers_set = set(full._non_persistent_buffers_set)
    for name, child in full._modules.items():
        view._modules[name] = nn.ModuleDict(child) if isinstance(child, nn.ModuleDict) else child
    return view


def _init_fake(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_stage(plan, full: nn.Module, plan_name: str, stage_index: int | None, mesh) -> dict:
    """Cut one stage (None: the whole model) with the package's `plan` module,
    apply the plan's FSDP and return {param FQN: (global shape, sharded over
    dp?)} and {unit FQN: elements}."""
    data = plan.PLANS[plan_name]
    model = _stage_view(full)
    if stage_index is not None:
        plan.build_stage(model, stage_index, plan_name)
    units = {fqn: sum(p.numel() for p in model.get_submodule(fqn).parameters())
             for fqn in unit_fqns(model)}
    sharded = "fsdp" in data and data["mesh"]["dp"] > 1
    if sharded:
        plan.apply_fsdp(model, mesh["dp"], plan_name)
    params = {}
    for fqn, p in model.named_parameters():
        is_dtensor = hasattr(p, "placements")
        if sharded:
            assert is_dtensor, f"{fqn} was not sharded"
            local = p.to_local().shape
            # what this rank (dp index 0) holds is torch.chunk's first part
            assert local[0] == chunk_rows(p.shape[0], data["mesh"]["dp"], 0), fqn
        params[fqn] = (tuple(p.shape), sharded)
    return {"params": params, "units": units}


# ---- the report -----------------------------------------------------------------------


def _compile_plan(spec: str, plan_name: str, world: int):
    from compiler.cli import _compile, _print_diagnostics, _sources_of
    from compiler.diagnostics import Diagnostics
    from compiler.plans import validate

    comp = _compile(spec, quiet=True)
    if comp is None:
        raise RunError(f"cannot plan {spec}: the spec has errors (above)")
    if plan_name not in comp.plans:
        known = ", ".join(comp.plans) or "none"
        raise UsageError(f"no plan '{plan_name}' in {spec} (plans: {known})")
    plan = comp.plans[plan_name]
    if plan.target in comp.vlms:
        raise RunError(f"plan '{plan_name}' is for the vision-language model '{plan.target}': "
                       "forgec plan reports text models' plans only, so far")
    diags = Diagnostics()
    validate(plan, comp.models[plan.target], comp.graphs[plan.target], diags, world=world)
    if diags.error_count:
        _print_diagnostics(diags, _sources_of(diags), False)
        raise RunError(f"plan '{plan_name}' does not fit {world} ranks (above)")
    if plan.target != comp.main_model():
        raise UsageError(f"plan '{plan_name}' is for '{plan.target}'; {spec} builds "
                         f"'{comp.main_model()}' (plan it from the spec that builds it)")
    mesh = plan.mesh
    if mesh["tp"] > 1 or mesh["ep"] > 1:
        raise RunError(f"plan '{plan_name}': forgec plan models dp and pp; tensor- and "
                       "expert-parallel degrees above 1 are not modelled yet")
    return comp, plan


def plan_report(spec: str, plan_name: str, world: int, *, micro_batch: int = 1,
                seq_len: int | None = None) -> dict:
    """The per-rank figures of `plan_name` at `world` ranks (see the module doc)."""
    from compiler.build import build

    from .package import import_package

    if world < 1 or micro_batch < 1 or (seq_len is not None and seq_len < 1):
        raise UsageError("--world, --micro-batch and --seq-len must be positive")
    comp, plan = _compile_plan(spec, plan_name, world)
    with tempfile.TemporaryDirectory(prefix="forgec-plan-") as tmp:
        pkg = import_package(build(comp, tmp, update=True).package)
        return _report(pkg, plan.target, plan_name, world, micro_batch, seq_len)


def _report(pkg, model_name: str, plan_name: str, world: int, micro_batch: int,
            seq_len: int | None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    plan = importlib.import_module(f"{pkg.__name__}.plan")
    data = plan.PLANS[plan_name]
    config = pkg.ModelConfig()
    seq = seq_len or config.max_seq_len
    if seq > config.max_seq_len:
        raise UsageError(f"--seq-len {seq} exceeds the model's max_seq_len {config.max_seq_len}")
    dp, pp = data["mesh"]["dp"], data["mesh"]["pp"]
    fsdp = data.get("fsdp")
    pipe = data.get("pipeline")
    compute = fsdp["compute"] if fsdp else "fp32"
    reduce = fsdp["reduce"] if fsdp else "fp32"
    ckpt = set(data["activation_checkpoint"])

    saved = saved_bytes_per_unit(pkg, micro_batch, seq, getattr(torch, {
        "fp32": "float32", "bf16": "bfloat16"}[compute]))
    with torch.device("meta"):
        full = pkg.Transformer()
    hidden_bytes = micro_batch * seq * config.dim * BYTES[compute]

    ranks = []
    for pp_rank in range(pp):
        stage_ids = plan.stages_of_rank(plan_name, pp_rank) if pipe else [None]
        _init_fake(pp_rank * dp, world)
        try:
            dims = (pp, dp)
            mesh = init_device_mesh("cpu", dims, mesh_dim_names=MESH_ORDER)
            stages = [shard_stage(plan, full, plan_name, s, mesh) for s in stage_ids]
        finally:
            _destroy()
        units = {u: n for st in stages for u, n in st["units"].items()}
        # activations: one microbatch of each of the rank's stages, checkpointed
        # units reduced to their input, times the schedule's in-flight forwards
        per_stage = []
        for st in stages:
            kept = sum(hidden_bytes if u in ckpt else saved.get(u, 0) for u in st["units"])
            per_stage.append(kept)
        flight = in_flight(pipe and pipe["schedule"], pipe["microbatches"] if pipe else 1, pp,
                           pp_rank, len(stage_ids))
        # warm-up forwards run in rounds of pp microbatches per local stage
        activations = sum(per_stage[(k // pp) % len(per_stage)] for k in range(flight))
        activations += max((saved.get(u, 0) for u in units if u in ckpt), default=0)
        last = "output_head" in units
        logits = micro_batch * seq * config.vocab_size * 4 if last else 0
        if fsdp and dp > 1:
            layer_units = [n for u, n in units.items() if u in fsdp["units"]]
            root = sum(n for u, n in units.items() if u not in fsdp["units"])
            biggest = max(layer_units, default=0)
            if fsdp["reshard"] == "never":
                gathered = (root + sum(layer_units)) * BYTES[compute]
            else:
                gathered = (root + 2 * biggest) * BYTES[compute]
            gathered += max(biggest, root) * BYTES[reduce]
        else:
            gathered = 0
        for dp_rank in range(dp):
            local = 0
            for st in stages:
                for shape, sharded in st["params"].values():
                    rows = chunk_rows(shape[0], dp, dp_rank) if sharded else shape[0]
                    local += rows * math.prod(shape[1:])
            row = {
                "rank": pp_rank * dp + dp_rank,
                "pp_rank": pp_rank,
                "dp_rank": dp_rank,
                "stages": [s for s in stage_ids if s is not None],
                "params": local,
                "param_bytes": 4 * local,
                "grad_bytes": 4 * local,
                "optimizer_bytes": 8 * local,
                "gathered_bytes": gathered,
                "activation_bytes": activations,
                "logits_bytes": logits,
            }
            # backward frees activations as it produces gradients: the peak is at its
            # start (all activations and the logits' gradient) or at its end (all grads)
            row["total_bytes"] = (row["param_bytes"] + row["optimizer_bytes"] + gathered
                                  + max(activations + logits, row["grad_bytes"]))
            ranks.append(row)

    params_total = sum(p.numel() for p in full.parameters())
    out = {"plan": plan_name, "model": model_name, "world": world,
           "mesh": data["mesh"], "micro_batch": micro_batch, "seq_len": seq,
           "compute_dtype": compute, "params_total": params_total,
           "params_stored": sum(r["params"] for r in ranks), "per_rank": ranks}
    if pipe:
        sp, sf = pipe["stage_params"], pipe["stage_flops"]
        out["pipeline"] = {
            "schedule": pipe["schedule"], "microbatches": pipe["microbatches"],
            "stages": len(sp), "stage_params": sp, "stage_flops": sf,
            "flops_balance": max(sf) / (sum(sf) / len(sf)),  # 1.0: perfectly even
            "params_balance": max(sp) / (sum(sp) / len(sp)),
        }
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def print_report(r: dict) -> None:
    m = r["mesh"]
    print(f"plan {r['plan']} for {r['model']}: {r['world']} ranks (dp {m['dp']} × pp {m['pp']}), "
          f"microbatch {r['micro_batch']} × {r['seq_len']} tokens, compute {r['compute_dtype']}")
    print(f"  parameters {r['params_total']:,}; stored over all ranks {r['params_stored']:,}")
    if "pipeline" in r:
        p = r["pipeline"]
        print(f"  pipeline {p['schedule']}, {p['microbatches']} microbatches, {p['stages']} "
              f"stages; FLOPs balance {p['flops_balance']:.3f}, parameter balance "
              f"{p['params_balance']:.3f} (max / mean)")
    # ranks of one pipeline rank differ at most by a padding row: show one per pp rank
    # and the extremes
    shown = {}
    for row in r["per_rank"]:
        shown.setdefault(row["pp_rank"], row)
    print(f"  {'ranks':<12} {'params':>16} {'weights':>11} {'grads':>11} {'AdamW':>11} "
          f"{'gathered':>11} {'activations':>12} {'logits':>11} {'total':>11}")
    for pp_rank, row in shown.items():
        first = pp_rank * m["dp"]
        label = f"{first}..{first + m['dp'] - 1}" if m["dp"] > 1 else str(first)
        print(f"  {label:<12} {row['params']:>16,} {_gib(row['param_bytes']):>11} "
              f"{_gib(row['grad_bytes']):>11} {_gib(row['optimizer_bytes']):>11} "
              f"{_gib(row['gathered_bytes']):>11} {_gib(row['activation_bytes']):>12} "
              f"{_gib(row['logits_bytes']):>11} {_gib(row['total_bytes']):>11}")
    peak = max(r["per_rank"], key=lambda row: row["total_bytes"])
    print(f"  peak: rank {peak['rank']}, {_gib(peak['total_bytes'])}")


def cmd_plan(args) -> int:
    report = plan_report(args.spec, args.plan, args.world, micro_batch=args.micro_batch,
                         seq_len=args.seq_len)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0
