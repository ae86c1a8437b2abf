"""`forgec plan SPEC --plan NAME --world N`: a parallel plan at scale, on paper.

The spec's package is generated into a temporary folder and its model (the
decoder, or for a vision-language spec the whole VLM: vision encoder,
adapter, decoder and any cross-attention blocks) built on the meta device
(no memory). Then, for every pipeline rank, a fake process group of N ranks
stands in for the cluster: the rank's pipeline stages are cut from the model
by the package's plan data with runtime/parallel.py's `build_stage` and
sharded with its `apply_tp` (tensor parallelism over the tp dimension: q/k/v
and gate/up split by output features, o/down by input features), `apply_ep`
(each MoE layer's experts shared out over ep consecutive dp ranks) and
`apply_fsdp` (FSDP2 `fully_shard` over the dp dimension of the DeviceMesh)
-- the code a real run executes -- and the local shards are read off the
resulting DTensors. Nothing here knows a model's layout: units, stages, FSDP
units and checkpointed regions are FQNs relative to the root module, read off
the model and the plan data.

Rank layout: the mesh is (pp, dp, tp), pipeline outermost, so rank =
(pp_rank * dp + dp_rank) * tp + tp_rank (torch's `init_device_mesh` order, as
`forgec train --plan` uses). Mixture-of-experts layers run on the meta device
with placeholders for their per-expert row counts (_meta_routing), as if every
token reached its top_k experts: no capacity drops, an upper bound; with
expert parallelism a rank's experts are taken to receive their share of the
routed rows (balanced routing).

A microbatch is `--micro-batch` sequences of `--seq-len` text tokens, fed as
the trainers feed them: packed with document ids for a text model (so every
attention call has the packed-document mask), one image per sequence for a
VLM (whose joint decoder holds the image tokens in its sequence too).

Per rank (`per_rank` in the JSON: `rank` and its `pp_rank`, `dp_rank`,
`tp_rank` and `stages`), memory in bytes:
  params          parameter elements stored on the rank (FSDP padding excluded)
  param_bytes     fp32 master weights            4 B/element
  grad_bytes      fp32 gradients (sharded)       4 B/element
  optimizer_bytes AdamW's two fp32 moments       8 B/element
  gathered_bytes  FSDP all-gather buffers at their peak: the root's parameters
                  plus two units (the one computing and the one prefetched), in
                  the compute dtype, and one unit's unsharded gradient in the
                  reduce dtype; all units when `reshard = never`; 0 without FSDP
  activation_bytes tensors autograd saves for backward, measured by running the
                  model's forward (under tensor parallelism, that of a tp rank: its
                  heads and hidden features) and the loss on the meta device under
                  `saved_tensors_hooks` and attributed to the unit running, summed
                  over the rank's stages, times the microbatches a schedule keeps
                  in flight; a checkpointed region keeps only its input (and,
                  under op-level selective checkpointing, the outputs of the ops
                  whose classes it keeps: matmuls, attention), plus one region's
                  activations recomputed in backward. Attention is counted
                  as fused kernels save it (q, k, v, output, log-sum-exp, and a
                  boolean mask converted to q's dtype, per call), as torch's CPU and
                  CUDA kernels do. A pipeline stage also holds each in-flight
                  microbatch's output until its backward
  logits_bytes    last stage: one chunk of the fp32 logits of the fused head +
                  cross-entropy the trainers call (model(..., targets=...)),
                  alive with the saved activations at the end of the forward;
                  what the loss keeps for backward (its input's and the head's
                  gradients) counts among the head's saved activations
  pipeline_buffer_bytes  what torch's PipelineStage allocates once and keeps: a
                  receive buffer per microbatch for the stage's input (all but
                  the first stage) and one for its output's gradient (all but the
                  last)
  total_bytes     the estimated peak of a training step (from the second on, when
                  AdamW's moments exist): weights + optimizer + gathered + pipeline
                  buffers + the transient part. Backward frees activations as it
                  produces gradients, so where every forward runs before the first
                  backward (one microbatch, GPipe) the peak is at its start or when
                  the gradients exist; where forwards follow backwards (1F1B's
                  steady state) the gradients sit beside the activations in flight.
                  An op whose backward holds more than its forward saved (a
                  scan's full-size gradients, explicit S×S scores' gradients)
                  says how much per token in its OpDef (`backward_bytes`): the
                  largest such workspace, less what the units after it saved
                  (freed by then), is added to the activations at that point.

Checked against measured peaks on CPU: one process (tests/test_planner.py) and
every rank of real 2-rank FSDP, pipeline, VLM, tensor- and expert-parallel training
(tests/test_planner_ranks.py), within 15 %, where each rank's `params` equals
the shards it holds.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import math
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from forgec.compiler.errors import RunError, UsageError

from . import parallel

BYTES = {"fp32": 4, "bf16": 2}
MESH_ORDER = ("pp", "dp", "tp")  # pipeline outermost


# ---- what a stage's forward saves for backward ---------------------------------------


class _FusedAttention(torch.autograd.Function):
    """Stands in for `F.scaled_dot_product_attention` while measuring: saves what
    the fused (flash) kernels save, not the math fallback's S×S probabilities
    (which is what the meta device would dispatch to). A boolean mask is
    saved as SDPA passes it to the kernels: converted, per call, to an
    additive mask of q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        # (B, H, S, D) as a transpose of (B, S, H, D) memory, like the fused
        # kernels' output, so that the usual transpose-reshape back is a view
        b, h, s, _ = q.shape
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if mask is not None and mask.dtype == torch.bool:
            mask = q.new_empty(mask.shape)
        _OpOutputs.record("sdpa", out)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement does no backward
        raise AssertionError("measurement only")


_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    if q.shape[-1] != v.shape[-1] or (attn_mask is not None and attn_mask.requires_grad):
        # keys and values of different head dims (multi-head latent attention), or a
        # mask that needs a gradient (learned sink logits): torch's CPU flash kernel
        # takes neither, so SDPA runs its math path, which saves the S×S
        # probabilities; so does the meta device
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)
    return _FusedAttention.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def _fused_attention():
    # torch's own global, not a torch-function mode: nn.MultiheadAttention (a VLM
    # adapter's) calls SDPA from inside F.multi_head_attention_forward, where a mode
    # is no longer active
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


class _GroupedMatmul(torch.autograd.Function):
    """Stands in for a generated package's `grouped_mm` (rows of x sorted by
    expert times each expert's weight) while measuring: the same output shape
    and the same saved tensors as torch._grouped_mm (x and the weights), without
    the per-expert row counts the meta device cannot know."""

    @staticmethod
    def forward(ctx, x, w, counts):
        offsets = counts.cumsum(0).to(torch.int32)  # as grouped_mm passes them
        ctx.save_for_backward(x, w, offsets)
        out = x.new_empty(x.shape[0], w.shape[-1])
        _OpOutputs.record("matmul", out)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the measurement does no backward
        raise AssertionError("measurement only")


class _OpOutputs(TorchDispatchMode):
    """Records, while measuring, the output of every op of an op class that
    op-level selective checkpointing may keep (runtime.parallel.SAC_OPS; the
    attention and grouped-matmul stand-ins record theirs themselves): what a
    selectively checkpointed region stores in forward."""

    active: _OpOutputs | None = None

    def __init__(self, on_output):
        super().__init__()
        self.on_output = on_output
        self.kinds = {op: kind for kind, ops in parallel.SAC_OPS.items() for op in ops}

    @classmethod
    def record(cls, kind: str, out: torch.Tensor) -> None:
        if cls.active is not None:
            cls.active.on_output(kind, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = self.kinds.get(func)
        if kind is not None:
            self.on_output(kind, out if isinstance(out, torch.Tensor) else out[0])
        return out

    def __enter__(self):
        _OpOutputs.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        _OpOutputs.active = None
        return super().__exit__(*exc)


def _meta_bincount(original):
    def bincount(input, weights=None, minlength=0):
        if input.is_meta:  # how many per expert: a value, of a known size
            return torch.empty(minlength, dtype=torch.long, device="meta")
        return original(input, weights, minlength)
    return bincount


@contextlib.contextmanager
def _meta_routing(module, model: nn.Module):
    """Mixture-of-experts layers on the meta device: their row counts per expert
    become placeholders of the right size, and the package's `ExpertsMeasured`
    (where it has experts) runs their grouped matmuls as _GroupedMatmul and drops
    no slot for capacity (every token reaches its top_k experts: an upper bound of
    what a capacity keeps)."""
    measured = getattr(module, "ExpertsMeasured", None)  # a package without experts: none
    original = torch.bincount
    torch.bincount = _meta_bincount(original)
    try:
        with (measured(model, _GroupedMatmul.apply) if measured is not None
              else contextlib.nullcontext()):
            yield
    finally:
        torch.bincount = original


def unit_fqns(model: nn.Module, prefix: str = "") -> list[str]:
    """The model's units in execution order: each layer of a ModuleDict and each
    other child of the root. A child that holds layers of its own (a VLM's
    vision encoder and decoder) is a container: its own children are the
    units. FQNs are relative to `model`, as the plan's FQN lists are."""
    out = []
    for name, child in model.named_children():
        fqn = prefix + name
        if isinstance(child, nn.ModuleDict):
            out += [f"{fqn}.{key}" for key, layer in child.items() if layer is not None]
        elif child is None:
            continue
        elif _is_container(child):
            out += unit_fqns(child, fqn + ".")
        else:
            out.append(fqn)
    return out


def _is_container(module: nn.Module) -> bool:
    return any(isinstance(c, nn.ModuleDict) for c in module.children())


def covers(fqns, unit: str) -> bool:
    """Whether `unit` is one of `fqns` or inside one of them."""
    return any(unit == f or unit.startswith(f + ".") for f in fqns)


def new_model(pkg) -> nn.Module:
    """The package's trainable model: the VLM of a vision-language package, else
    the decoder."""
    return pkg.VLM() if hasattr(pkg, "VLM") else pkg.Transformer()


def _meta_tables(model: nn.Module, module) -> None:
    """The RoPE tables init_weights_and_freqs() would make (plain attributes,
    not parameters), on the meta device: the decoder's, and a vision encoder's
    2-D ones."""
    for mod in model.modules():
        if getattr(mod, "rope_cos", False) is None:
            if hasattr(mod, "config"):
                tables = module.rope_tables(mod.config.max_seq_len, device="meta")
            else:
                tables = module.vision_rope_tables(device="meta")
            mod.rope_cos, mod.rope_sin = tables


def example_batch(model: nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype,
                  device="meta") -> tuple[tuple, dict, torch.Tensor]:
    """(forward arguments, keyword arguments, next-token targets) of one
    microbatch as the trainers feed it: `seq_len` text tokens, packed with
    their document ids for a text model (which build the attention mask of
    packed documents); for a VLM one image per sequence (in the compute dtype,
    as FSDP's mixed precision casts the inputs)."""
    tokens = torch.zeros(micro_batch, seq_len + 1, dtype=torch.long, device=device)
    if not hasattr(model, "vision_encoder"):
        doc_ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)
        return (tokens[:, :-1],), {"doc_ids": doc_ids}, tokens[:, 1:]
    size, channels = int(model.image_size), int(model.image_channels)
    pixels = torch.zeros(micro_batch, channels, size, size, dtype=dtype, device=device)
    return (pixels, tokens[:, :-1]), {}, tokens[:, 1:]


@dataclasses.dataclass
class Activations:
    """What one microbatch's forward (and loss) keeps for backward, per unit."""

    saved: dict[str, int]  # unit → bytes autograd saves (the loss counts for the last unit)
    order: list[str]  # units in the order the forward runs them
    inputs: dict[str, int]  # unit or checkpointed region → bytes of its (first) input
    keeps_input: set[str]  # units among whose saved tensors is their own input
    shapes: dict[str, tuple]  # unit → shape of its (first) input
    logits_bytes: int  # one chunk of the fused loss's fp32 logits
    # unit → op class → bytes of the outputs of that class's ops (SAC_OPS): what a
    # selectively checkpointed unit keeping the class stores
    op_outputs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # unit → op class → bytes of those outputs that autograd saves too (a
    # selectively checkpointed unit does not recompute them in backward)
    op_outputs_saved: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def first_unit(self, fqns) -> str | None:
        """The first unit, in execution order, of a stage (its FQN list)."""
        return next((u for u in self.order if covers(fqns, u)), None)


def measure_activations(pkg, micro_batch: int, seq_len: int, dtype: torch.dtype,
                        regions=(), tp: tuple | None = None) -> Activations:
    """Run one microbatch's forward and fused cross-entropy (model(...,
    targets=...), as the trainers do) on the meta device under
    `saved_tensors_hooks` and attribute every tensor autograd saves to the unit
    running (parameters are memory of their own). Attention is counted as the
    fused kernels save it; the loss is the package's own, which runs on the meta
    device too. `regions` (checkpointed FQNs) get their input measured too.
    `tp` = (plan module, degree): measure a tensor-parallel rank's forward
    (tp_slice)."""
    with torch.device("meta"):
        model = new_model(pkg)
    if tp is not None:
        tp_slice(model, *tp)
    model.to(dtype)
    module = importlib.import_module(f"{pkg.__name__}.model")
    _meta_tables(model, module)
    current = ["?"]
    order: list[str] = []
    inputs: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    input_of: dict[str, torch.Tensor] = {}

    def first_tensor(args, kwargs) -> torch.Tensor | None:
        return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)

    def enter(fqn: str, unit: bool):
        def hook(_m, args, kwargs):
            x = first_tensor(args, kwargs)
            if x is not None and fqn not in inputs:
                inputs[fqn] = x.numel() * x.element_size()
                shapes[fqn] = tuple(x.shape)
                input_of[fqn] = x if x._base is None else x._base
            if unit:
                current[0] = fqn
                if fqn not in order:
                    order.append(fqn)
        return hook

    units = unit_fqns(model)
    for fqn in units:
        model.get_submodule(fqn).register_forward_pre_hook(enter(fqn, True), with_kwargs=True)
    for fqn in regions:
        if fqn not in units:
            model.get_submodule(fqn).register_forward_pre_hook(enter(fqn, False),
                                                               with_kwargs=True)
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}
    saved_by: dict[int, str] = {}
    per_unit: dict[str, int] = collections.Counter()
    kept: dict[int, tuple[str, torch.Tensor]] = {}  # SAC_OPS outputs: id → (op class, base)
    op_outputs: dict[str, dict[str, int]] = {}
    op_outputs_saved: dict[str, dict[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params and id(base) not in seen:
            seen[id(base)] = base  # keeps ids unique while measuring
            saved_by[id(base)] = current[0]
            size = base.numel() * base.element_size()
            per_unit[current[0]] += size
            if id(base) in kept:
                by_kind = op_outputs_saved.setdefault(current[0], {})
                kind = kept[id(base)][0]
                by_kind[kind] = by_kind.get(kind, 0) + size
        return t

    first_matmul: dict[str, int] = {}  # unit → fp32 bytes of its first matmul's output

    def on_output(kind: str, out: torch.Tensor) -> None:
        if kind == "matmul":
            first_matmul.setdefault(current[0], out.numel() * 4)
        base = out if out._base is None else out._base
        if id(base) not in kept:
            kept[id(base)] = (kind, base)
            by_kind = op_outputs.setdefault(current[0], {})
            by_kind[kind] = by_kind.get(kind, 0) + base.numel() * base.element_size()

    args, kwargs, targets = example_batch(model, micro_batch, seq_len, dtype)
    try:
        with _fused_attention(), _meta_routing(module, model), \
                _OpOutputs(on_output), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*args, targets=targets, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e).lower():
            raise
        # token routing sizes tensors by their values, which the meta device has not
        raise RunError(f"forgec plan cannot measure this model's activations on the meta "
                       f"device: its forward depends on tensor values ({str(e)[:60]}...); "
                       "modality-routed (MoT, MoMa) models are not "
                       "modelled yet") from None
    keeps = {u for u in order if u in input_of and saved_by.get(id(input_of[u])) == u}
    # the last unit is the head, whose loss runs chunk by chunk: its first matmul is
    # the first chunk's logits (the largest), held in fp32
    logits_bytes = first_matmul.get(order[-1], 0) if order else 0
    return Activations(dict(per_unit), order, inputs, keeps, shapes,
                       logits_bytes, op_outputs, op_outputs_saved)


def tp_slice(model: nn.Module, plan, degree: int) -> None:
    """Turn `model` into what one tensor-parallel rank computes: runtime.parallel's
    `apply_tp` shards it by the package's `plan` under a fake process group of
    `degree` ranks, then each sharded weight becomes a plain parameter holding rank 0's slice
    and the input/output hooks TP added are removed. Without sequence
    parallelism a rank runs exactly this model (its heads and hidden features
    at full sequence length; the all-reduce after o/down keeps the shape), so
    its forward saves what the rank's saves."""
    from torch.distributed.device_mesh import init_device_mesh

    hooks = {m: (set(m._forward_pre_hooks), set(m._forward_hooks)) for m in model.modules()}
    _init_fake(0, degree)
    try:
        mesh = init_device_mesh("cpu", (degree,), mesh_dim_names=("tp",))
        parallel.apply_tp(model, mesh["tp"], plan)
    finally:
        _destroy()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and hasattr(p, "placements"):
                module._parameters[name] = nn.Parameter(p.to_local(),
                                                        requires_grad=p.requires_grad)
        pre, post = hooks.get(module, (set(), set()))
        for key in set(module._forward_pre_hooks) - pre:
            del module._forward_pre_hooks[key]
        for key in set(module._forward_hooks) - post:
            del module._forward_hooks[key]


def saved_bytes_per_unit(pkg, micro_batch: int, seq_len: int, dtype: torch.dtype) -> dict:
    """{unit FQN: bytes autograd saves in one microbatch's forward} (see
    measure_activations)."""
    return measure_activations(pkg, micro_batch, seq_len, dtype).saved


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
    """A new root sharing `full`'s units, with containers of its own (the root,
    its ModuleDicts and, in a VLM, the vision encoder and decoder), so that
    `build_stage` can prune it without touching `full` (building the model
    once serves every stage)."""
    if isinstance(full, nn.ModuleDict):  # of layers: units, shared
        return nn.ModuleDict(dict(full.items()))
    view = object.__new__(type(full))
    nn.Module.__init__(view)
    for key, value in full.__dict__.items():
        if key not in view.__dict__:
            view.__dict__[key] = value
    view._parameters.update(full._parameters)
    view._buffers.update(full._buffers)
    view._non_persistent_buffers_set = set(full._non_persistent_buffers_set)
    for name, child in full._modules.items():
        container = child is not None and (isinstance(child, nn.ModuleDict)
                                           or _is_container(child))
        view._modules[name] = _stage_view(child) if container else child
    return view


def _init_fake(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Placement(NamedTuple):
    """How a parameter is split over the ranks of its stage."""

    shape: tuple  # global
    tp_dim: int | None  # the dim tensor parallelism splits over tp
    ep_dim: int | None  # the dim expert parallelism splits over ep (the experts)
    fsdp: bool  # FSDP shards dim 0 (of what TP left) over dp


def local_shape(p: Placement, tp: int, tp_rank: int, dp: int, dp_rank: int, ep: int) -> tuple:
    """The part of a parameter a rank stores: TP's torch.chunk of `tp_dim` over
    tp, EP's of the experts over the ep ranks (consecutive dp ranks), then
    FSDP's of dim 0 over dp."""
    out = list(p.shape)
    if p.tp_dim is not None:
        out[p.tp_dim] = chunk_rows(out[p.tp_dim], tp, tp_rank)
    if p.ep_dim is not None:
        out[p.ep_dim] = chunk_rows(out[p.ep_dim], ep, dp_rank % ep)
    if p.fsdp:
        out[0] = chunk_rows(out[0], dp, dp_rank)
    return tuple(out)


def _placement(p) -> Placement:
    names = p.device_mesh.mesh_dim_names if hasattr(p, "placements") else ()
    dims = {name: pl.dim for name, pl in zip(names, getattr(p, "placements", ()), strict=True)
            if hasattr(pl, "dim")}  # Shard, or FSDP's _StridedShard over a TP shard
    return Placement(tuple(p.shape), dims.get("tp"), dims.get("ep"), "dp" in dims)


def shard_stage(plan, full: nn.Module, plan_name: str, stage_index: int | None, mesh,
                ep_mesh=None) -> dict:
    """Cut one stage (None: the whole model) by the package's `plan` module,
    apply the plan's tensor and expert parallelism and FSDP as the trainer
    does, and return {param FQN: Placement}, the stage's units in order, and
    {FSDP unit FQN or "" (the root): elements FSDP gathers there, as one tp
    rank holds them}."""
    data = plan.PLANS[plan_name]
    m = data["mesh"]
    model = _stage_view(full)
    if stage_index is not None:
        model = parallel.build_stage(model, stage_index, plan, plan_name)
    if m["tp"] > 1:
        parallel.apply_tp(model, mesh["tp"], plan)
    if m["ep"] > 1:
        parallel.apply_ep(model, ep_mesh["ep"], plan)
    groups: dict[str, int] = collections.Counter()
    fsdp_units = sorted(data["fsdp"]["units"] if "fsdp" in data else [], key=len, reverse=True)
    for fqn, p in model.named_parameters():
        if _placement(p).ep_dim is not None:
            continue  # expert shards stay out of FSDP
        # a parameter belongs to the innermost FSDP unit holding it, else the root
        local = p.to_local() if hasattr(p, "placements") else p
        groups[next((u for u in fsdp_units if covers([u], fqn)), "")] += local.numel()
    if "fsdp" in data and m["dp"] > 1:
        parallel.apply_fsdp(model, mesh["dp"], plan, plan_name)
    params = {fqn: _placement(p) for fqn, p in model.named_parameters()}
    for fqn, p in model.named_parameters():
        # what this rank (index 0 everywhere) holds: torch.chunk's first parts
        local = p.to_local() if hasattr(p, "placements") else p
        assert tuple(local.shape) == local_shape(params[fqn], m["tp"], 0, m["dp"], 0,
                                                 m["ep"]), fqn
    return {"params": params, "units": unit_fqns(model), "groups": dict(groups)}


def unit_workspace(acts: Activations,
                   backward_bytes: dict[str, Callable[[int], int]]) -> dict[str, int]:
    """{unit: bytes the backward of its largest op holds beyond the saved tensors}:
    a component's bytes per token at the unit's sequence length, times the
    microbatch's tokens there."""
    out: dict[str, int] = {}
    for unit in acts.order:
        shape = acts.shapes.get(unit, ())
        if len(shape) < 2:
            continue
        batch, seq = shape[:2]
        need = max((per_token(seq) for fqn, per_token in backward_bytes.items()
                    if covers([unit], fqn)), default=0)
        if need:
            out[unit] = need * batch * seq
    return out


def backward_extra(acts: Activations, units: list[str], workspace: dict[str, int]) -> int:
    """What a unit's backward workspace adds, at most, to the activations held at the
    start of backward (`units`: those of the stage whose backward runs first): its
    workspace, less what the units after it saved (freed before it runs); the logits'
    gradient is gone by then too."""
    extra = freed = 0
    for unit in reversed(units):
        extra = max(extra, workspace.get(unit, 0) - freed)
        freed += acts.saved.get(unit, 0)
    return extra


def stage_activations(acts: Activations, units: list[str], ckpt: list[str],
                      saves: dict[str, list[str]] | None = None) -> int:
    """Bytes one microbatch's forward of `units` keeps for backward: what they
    save, except that a checkpointed region keeps only its input and, under
    op-level selective checkpointing (`saves`: region → op classes), the
    outputs of the ops it keeps."""
    saves = saves or {}
    kept, regions = 0, set()
    for u in units:
        region = next((c for c in ckpt if covers([c], u)), None)
        if region is None:
            kept += acts.saved.get(u, 0)
            continue
        if region not in regions:
            regions.add(region)
            kept += acts.inputs.get(region, 0)
        kept += sum(acts.op_outputs.get(u, {}).get(k, 0) for k in saves.get(region, ()))
    return kept


def recomputed(acts: Activations, units: list[str], ckpt: list[str],
               saves: dict[str, list[str]] | None = None) -> int:
    """The largest checkpointed region's activations, rebuilt in backward (less
    the outputs a selectively checkpointed region kept: they are not rebuilt)."""
    saves = saves or {}

    def rebuilt(c: str) -> int:
        return sum(acts.saved.get(u, 0) - sum(acts.op_outputs_saved.get(u, {}).get(k, 0)
                                              for k in saves.get(c, ()))
                   for u in units if covers([c], u))

    return max((rebuilt(c) for c in ckpt), default=0)


# ---- the report -----------------------------------------------------------------------


def _compile_plan(spec: str, plan_name: str, world: int):
    """(compilation, plan, the longest text a sequence may have: None for the
    decoder's max_seq_len)."""
    from forgec.compiler.diagnostics import Diagnostics, print_diagnostics
    from forgec.compiler.driver import compile_and_report
    from forgec.compiler.plans import validate, validate_vlm_plan
    from forgec.compiler.source import sources_of

    comp = compile_and_report(spec, quiet=True)
    if comp is None:
        raise RunError(f"cannot plan {spec}: the spec has errors (above)")
    if plan_name not in comp.plans:
        known = ", ".join(comp.plans) or "none"
        raise UsageError(f"no plan '{plan_name}' in {spec} (plans: {known})")
    plan = comp.plans[plan_name]
    diags = Diagnostics()
    vlm = comp.vlms.get(plan.target)
    if vlm is not None:
        validate_vlm_plan(plan, vlm, comp.models, comp.graphs, diags, world=world)
    else:
        validate(plan, comp.models[plan.target], comp.graphs[plan.target], diags, world=world)
    if diags.error_count:
        print_diagnostics(diags, sources_of(diags))
        raise RunError(f"plan '{plan_name}' does not fit {world} ranks (above)")
    if plan.target != comp.main_model():
        raise UsageError(f"plan '{plan_name}' is for '{plan.target}'; {spec} builds "
                         f"'{comp.main_model()}' (plan it from the spec that builds it)")
    max_text = vlm.fusion.args.get("max_text") if vlm is not None else None
    return comp, plan, max_text


def plan_report(spec: str, plan_name: str, world: int, *, micro_batch: int = 1,
                seq_len: int | None = None) -> dict:
    """The per-rank figures of `plan_name` at `world` ranks (see the module doc)."""
    from forgec.compiler.build import build

    from .package import import_package

    if world < 1 or micro_batch < 1 or (seq_len is not None and seq_len < 1):
        raise UsageError("--world, --micro-batch and --seq-len must be positive")
    comp, plan, max_text = _compile_plan(spec, plan_name, world)
    with tempfile.TemporaryDirectory(prefix="forgec-plan-") as tmp:
        pkg = import_package(build(comp, tmp, update=True).package)
        graph = comp.graphs.get(plan.target) or comp.vlm_graphs.get(plan.target)
        return _report(pkg, plan.target, plan_name, world, micro_batch, seq_len, max_text,
                       op_backward_bytes(graph))


def op_backward_bytes(graph) -> dict[str, Callable[[int], int]]:
    """{component FQN: its op's OpDef.backward_bytes (bytes per token, at a sequence
    length, that its backward holds beyond what its forward saved)} for every op
    component of the spec's graph."""
    from forgec.compiler.ops import OPS

    out = {}
    for _, data in graph.nodes(data=True) if graph is not None else ():
        if data["kind"] == "op" and data["ok"]:
            out[data["fqn"]] = functools.partial(OPS[data["op"]].backward_bytes, data["args"])
    return out


def _text_limit(pkg, max_text: int | None) -> tuple[int, str]:
    """The longest text sequence of the package's model, and what sets it."""
    limit = pkg.ModelConfig().max_seq_len
    if not hasattr(pkg, "VLM"):
        return limit, f"the model's max_seq_len {limit}"
    if max_text is not None:  # the image tokens share the decoder's sequence
        return max_text, f"the vlm's max_text {max_text}"
    return limit, f"the decoder's max_seq_len {limit}"


def _report(pkg, model_name: str, plan_name: str, world: int, micro_batch: int,
            seq_len: int | None, max_text: int | None = None,
            backward_bytes: dict[str, Callable[[int], int]] | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    plan = importlib.import_module(f"{pkg.__name__}.plan")
    data = plan.PLANS[plan_name]
    vlm = hasattr(pkg, "VLM")
    limit, what = _text_limit(pkg, max_text)
    seq = seq_len or limit
    if seq > limit:
        raise UsageError(f"--seq-len {seq} exceeds {what}")
    dp, pp, tp, ep = (data["mesh"][k] for k in ("dp", "pp", "tp", "ep"))
    fsdp = data.get("fsdp")
    pipe = data.get("pipeline")
    if pipe and len(pipe["stages"]) < 2:
        pipe = None  # one stage: the whole model (as the trainer runs it)
    n_stages = len(pipe["stages"]) if pipe else 1
    microbatches = pipe["microbatches"] if pipe else 1
    compute = fsdp["compute"] if fsdp else "fp32"
    reduce = fsdp["reduce"] if fsdp else "fp32"
    ckpt = list(data["activation_checkpoint"])
    saves = data.get("activation_checkpoint_save", {})

    acts = measure_activations(pkg, micro_batch, seq, getattr(torch, {
        "fp32": "float32", "bf16": "bfloat16"}[compute]), regions=ckpt,
        tp=(plan, tp) if tp > 1 else None)
    with torch.device("meta"):
        full = new_model(pkg)
    params_total = sum(p.numel() for p in full.parameters())
    workspace = unit_workspace(acts, backward_bytes or {})

    def boundary(stage: int) -> int:
        """Bytes of the hidden state a microbatch brings into `stage`."""
        first = acts.first_unit(pipe["stages"][stage])
        return acts.inputs.get(first, 0) if first else 0

    ranks = []
    for pp_rank in range(pp):
        stage_ids = parallel.stages_of_rank(plan, plan_name, pp_rank) if pipe else [None]
        _init_fake(pp_rank * dp * tp, world)
        try:
            mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=MESH_ORDER)
            ep_mesh = None
            if ep > 1:  # as the trainer splits dp: ep consecutive ranks share the experts
                ep_mesh = mesh._unflatten("dp", (dp // ep, ep), ("ep_replica", "ep"))
            stages = [shard_stage(plan, full, plan_name, s, mesh, ep_mesh) for s in stage_ids]
        finally:
            _destroy()
        units = [u for st in stages for u in st["units"]]
        # activations: one microbatch of each of the rank's stages, checkpointed
        # regions reduced to their input, times the schedule's in-flight forwards
        per_stage, buffers = [], 0
        for sid, st in zip(stage_ids, stages, strict=True):
            kept = stage_activations(acts, st["units"], ckpt, saves)
            if sid is not None:
                first = acts.first_unit(pipe["stages"][sid])
                if sid > 0:
                    # the schedule receives each microbatch's input into a buffer of
                    # its own, kept across steps; a first unit that saves its input
                    # saves that buffer (counted here, not again as an activation)
                    buffers += microbatches * boundary(sid)
                    if first in acts.keeps_input or covers(ckpt, first):
                        kept -= boundary(sid)
                if sid < n_stages - 1:
                    # the output stays with the schedule until its backward, and each
                    # microbatch has a buffer for the output's gradient
                    kept += boundary(sid + 1)
                    buffers += microbatches * boundary(sid + 1)
            per_stage.append(kept)
        flight = in_flight(pipe and pipe["schedule"], microbatches, pp, pp_rank,
                           len(stage_ids))
        # warm-up forwards run in rounds of pp microbatches per local stage
        activations = sum(per_stage[(k // pp) % len(per_stage)] for k in range(flight))
        activations += recomputed(acts, units, ckpt, saves)
        # a schedule that runs forwards after its first backward holds the
        # stage's gradients beside the activations in flight (1F1B's steady
        # state); one that runs every forward first frees a microbatch's
        # activations before the first gradients appear
        steady = flight < microbatches * len(stage_ids)
        last_stage = ((flight - 1) // pp) % len(per_stage)
        last_forward = per_stage[last_stage]
        # a backward's own workspace, beside the activations not freed yet
        extra = backward_extra(acts, stages[last_stage]["units"], workspace)
        last = pipe is None or n_stages - 1 in stage_ids
        logits = acts.logits_bytes if last else 0
        if fsdp and dp > 1:
            groups = collections.Counter()
            for st in stages:
                groups.update(st["groups"])
            root = groups.pop("", 0)
            biggest = max(groups.values(), default=0)
            if fsdp["reshard"] == "never":
                gathered = (root + sum(groups.values())) * BYTES[compute]
            else:
                gathered = (root + 2 * biggest) * BYTES[compute]
            gathered += max(biggest, root) * BYTES[reduce]
        else:
            gathered = 0
        for dp_rank, tp_rank in itertools.product(range(dp), range(tp)):
            local = sum(math.prod(local_shape(p, tp, tp_rank, dp, dp_rank, ep))
                        for st in stages for p in st["params"].values())
            row = {
                "rank": (pp_rank * dp + dp_rank) * tp + tp_rank,
                "pp_rank": pp_rank,
                "dp_rank": dp_rank,
                "tp_rank": tp_rank,
                "stages": [s for s in stage_ids if s is not None],
                "params": local,
                "param_bytes": 4 * local,
                "grad_bytes": 4 * local,
                "optimizer_bytes": 8 * local,
                "gathered_bytes": gathered,
                "activation_bytes": activations,
                "logits_bytes": logits,
                "pipeline_buffer_bytes": buffers,
            }
            # backward frees activations as it produces gradients: the peak is at the
            # end of the forward (all activations and a chunk of the loss's logits) or
            # when the gradients exist (at the end of backward; with the activations
            # still in flight, in a steady state)
            grads = row["grad_bytes"]
            transient = (activations + max(logits, extra) + grads if steady else
                         max(activations + max(logits, extra),
                             activations - last_forward + grads))
            row["total_bytes"] = (row["param_bytes"] + row["optimizer_bytes"] + gathered
                                  + buffers + transient)
            ranks.append(row)

    out = {"plan": plan_name, "model": model_name, "world": world,
           "mesh": data["mesh"], "micro_batch": micro_batch, "seq_len": seq,
           "compute_dtype": compute, "params_total": params_total,
           "params_stored": sum(r["params"] for r in ranks),
           "saved_bytes_per_microbatch": acts.saved, "per_rank": ranks}
    if vlm:
        out["vlm"] = _vlm_summary(pkg, acts, seq)
    if pipe:
        sp, sf = pipe["stage_params"], pipe["stage_flops"]
        out["pipeline"] = {
            "schedule": pipe["schedule"], "microbatches": pipe["microbatches"],
            "stages": len(sp), "stage_params": sp, "stage_flops": sf,
            "flops_balance": max(sf) / (sum(sf) / len(sf)),  # 1.0: perfectly even
            "params_balance": max(sp) / (sum(sp) / len(sp)),
        }
    return out


def _vlm_summary(pkg, acts: Activations, seq: int) -> dict:
    """A VLM's sequence (one image per sequence: a joint decoder's sequence
    holds its tokens before the text; cross-attention keeps them beside it) and
    its saved activations by part (vision encoder, adapter, decoder)."""
    module = importlib.import_module(f"{pkg.__name__}.model")
    parts = collections.Counter()
    for unit, n in acts.saved.items():
        parts[unit.split(".")[0]] += n
    layer = next(u for u in acts.order if u.startswith("transformer.layers."))
    return {"image_tokens": module.IMAGE_TOKENS, "text_tokens": seq,
            "decoder_seq_len": acts.shapes[layer][1], "saved_bytes_by_part": dict(parts)}


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def print_report(r: dict) -> None:
    m = r["mesh"]
    seq = f"{r['seq_len']} tokens"
    if "vlm" in r:
        v = r["vlm"]
        joint = v["decoder_seq_len"] > v["text_tokens"]
        seq = (f"({v['image_tokens']} image + {v['text_tokens']} text tokens)" if joint else
               f"{v['text_tokens']} text tokens attending to {v['image_tokens']} image tokens")
    degrees = f"dp {m['dp']} × pp {m['pp']}" + (f" × tp {m['tp']}" if m["tp"] > 1 else "")
    print(f"plan {r['plan']} for {r['model']}: {r['world']} ranks ({degrees}), "
          f"microbatch {r['micro_batch']} × {seq}, compute {r['compute_dtype']}")
    print(f"  parameters {r['params_total']:,}; stored over all ranks {r['params_stored']:,}")
    if "vlm" in r:
        parts = ", ".join(f"{name} {_gib(n)}" for name, n in
                          r["vlm"]["saved_bytes_by_part"].items())
        print(f"  saved for backward per microbatch: {parts}")
    pipe = "pipeline" in r
    if pipe:
        p = r["pipeline"]
        print(f"  pipeline {p['schedule']}, {p['microbatches']} microbatches, {p['stages']} "
              f"stages; FLOPs balance {p['flops_balance']:.3f}, parameter balance "
              f"{p['params_balance']:.3f} (max / mean)")
    # ranks of one pipeline rank differ at most by a padding row (of an FSDP or a
    # TP chunk): show one per pp rank
    shown = {}
    for row in r["per_rank"]:
        shown.setdefault(row["pp_rank"], row)
    print(f"  {'ranks':<12} {'params':>16} {'weights':>11} {'grads':>11} {'AdamW':>11} "
          f"{'gathered':>11} {'activations':>12} {'logits':>11} "
          + (f"{'p2p buffers':>11} " if pipe else "") + f"{'total':>11}")
    for pp_rank, row in shown.items():
        size = m["dp"] * m["tp"]
        first = pp_rank * size
        label = f"{first}..{first + size - 1}" if size > 1 else str(first)
        print(f"  {label:<12} {row['params']:>16,} {_gib(row['param_bytes']):>11} "
              f"{_gib(row['grad_bytes']):>11} {_gib(row['optimizer_bytes']):>11} "
              f"{_gib(row['gathered_bytes']):>11} {_gib(row['activation_bytes']):>12} "
              f"{_gib(row['logits_bytes']):>11} "
              + (f"{_gib(row['pipeline_buffer_bytes']):>11} " if pipe else "")
              + f"{_gib(row['total_bytes']):>11}")
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
