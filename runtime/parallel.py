"""Apply a package's parallel plans: FSDP2, tensor and expert parallelism,
activation checkpointing and pipeline stages, with PyTorch's own engines.

A generated package's `plan.py` is data only (mesh, FSDP units, pipeline
stages, TP layout, expert FQNs, checkpointed layers, all module FQNs, which
are also the DCP checkpoint keys); this module is the one piece of code that
applies it, for `forgec train --plan` (runtime/distributed.py) and, under a
fake process group, `forgec plan` (runtime/planner.py). Every function takes
the package's plan module (`planmod`) and, where plans differ, a plan name:
the TP layout and the experts are the package's, the same in every plan. It knows no model
internals: it finds modules by the plan's FQNs and uses the generated API
(a GroupedExperts module's `compute`, a VLM's `pipeline_stage()`).

A model on a pipeline stage lacks some modules (None) and some layers; each
function applies to what the model holds.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import create_selective_checkpoint_contexts

# the plan's schedule names → torch.distributed.pipelining.schedules classes
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_TP_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def _find(model: nn.Module, fqn: str) -> nn.Module | None:
    """The submodule at `fqn`, or None where this (pipeline-stage) model lacks it."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


# ---- pipeline stages -------------------------------------------------------------------


def num_stages(planmod, plan: str) -> int:
    return len(planmod.PLANS[plan]["pipeline"]["stages"])


def stages_of_rank(planmod, plan: str, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` runs (several with virtual stages)."""
    cfg = planmod.PLANS[plan]
    stages = num_stages(planmod, plan)
    if cfg["pipeline"]["schedule"] == "zbv":  # V shape: down, then back up
        return [pp_rank, stages - 1 - pp_rank]
    return list(range(pp_rank, stages, cfg["mesh"]["pp"]))


def build_stage(model: nn.Module, stage_index: int, planmod, plan: str) -> nn.Module:
    """Prune `model` to one pipeline stage of the plan (FQNs unchanged) and return
    the module that runs it. Build the model on the meta device first: pruning
    it is free.

    The modules of STAGE_MODULES the stage lacks become None, the layers of
    STAGE_STACKS it lacks leave their ModuleDict. A decoder runs its stage
    itself (its forward skips what is None); a model whose stages pass other
    things along (a VLM: images, then hidden states) returns the module that
    runs a stage from its `pipeline_stage()`."""
    keep = set(planmod.PLANS[plan]["pipeline"]["stages"][stage_index])
    for fqn in planmod.STAGE_MODULES:
        if fqn not in keep:
            parent, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(parent), name, None)
    for fqn in planmod.STAGE_STACKS:
        container = model.get_submodule(fqn)
        for key in list(container.keys()):
            if f"{fqn}.{key}" not in keep:
                del container[key]
    as_stage = getattr(model, "pipeline_stage", None)
    return as_stage() if as_stage is not None else model


# ---- torch.compile -----------------------------------------------------------------------

COMPILE_BACKEND_ENV = "FORGEC_COMPILE_BACKEND"  # default inductor; aot_eager traces only


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block (every module of the model's `*layers` ModuleDicts)
    with fullgraph=True, as torchtitan does; after TP, EP and activation
    checkpointing, before FSDP. The block's `forward` is compiled, not its call,
    so FSDP's hooks run around the compiled code, and parameter names and
    state-dict keys stay unchanged. Under expert parallelism the all-to-all stays
    eager: a block holding ExpertParallel modules has its other parts compiled."""
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    for fqn, container in model.named_modules():
        if isinstance(container, nn.ModuleDict) and fqn.rpartition(".")[2].endswith("layers"):
            for block in container.values():
                # a checkpoint_wrapper recomputes the block it wraps: compile that block;
                # a selective one is compiled whole, so that the compiler traces the
                # checkpoint with its policy (torchtitan's order): an eager policy
                # sees a compiled block's kernels, not the ops it names
                if not getattr(block, "selective_save", ()):
                    block = getattr(block, "_checkpoint_wrapped_module", block)
                _compile_outside_ep(block, backend)
    return model


def _compile_outside_ep(module: nn.Module, backend: str) -> None:
    if not any(isinstance(m, ExpertParallel) for m in module.modules()):
        module.forward = torch.compile(module.forward, fullgraph=True, backend=backend)
        return
    for child in module.children():
        if not isinstance(child, ExpertParallel):
            _compile_outside_ep(child, backend)


# ---- activation checkpointing and FSDP ----------------------------------------------------


_aten = torch.ops.aten
# op-level selective checkpointing: the aten ops of each op class a plan's
# `activation_checkpoint_save` may keep (compiler/plans.py's SAC_SAVES), as
# torchtitan's save list names them (its every-other-matmul rule aside)
SAC_OPS = {
    "sdpa": tuple(getattr(_aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")),
    "matmul": (_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
               _aten.baddbmm.default, _aten._grouped_mm.default),
}


def saved_ops(save) -> list:
    """The aten ops whose outputs a checkpointed layer keeping the op classes
    `save` stores in forward (all others are recomputed in backward)."""
    return [op for kind in sorted(save) for op in SAC_OPS[kind]]


def checkpoint_layer(layer: nn.Module, save=()) -> nn.Module:
    """`layer` recomputing its activations in backward (torch.utils.checkpoint,
    non-reentrant); with op classes to `save`, selectively: the outputs of their
    ops are kept (create_selective_checkpoint_contexts) and only the rest is
    recomputed. The wrapper keeps state-dict keys unchanged (DCP checkpoints stay
    compatible)."""
    if not save:
        return checkpoint_wrapper(layer)
    wrapper = checkpoint_wrapper(layer, context_fn=functools.partial(
        create_selective_checkpoint_contexts, saved_ops(save)))
    wrapper.selective_save = tuple(sorted(save))  # apply_compile compiles it whole
    return wrapper


def apply_activation_checkpointing(model: nn.Module, planmod, plan: str) -> nn.Module:
    """Recompute the activations of the plan's layers in backward, keeping the
    outputs of the ops its `activation_checkpoint_save` names for a layer."""
    cfg = planmod.PLANS[plan]
    saves = cfg.get("activation_checkpoint_save", {})
    for fqn in cfg["activation_checkpoint"]:
        parent, _, key = fqn.rpartition(".")
        container = _find(model, parent)
        if container is not None and key in container:
            container[key] = checkpoint_layer(container[key], saves.get(fqn, ()))
    return model


def apply_fsdp(model: nn.Module, mesh, planmod, plan: str) -> nn.Module:
    """FSDP2 (`fully_shard`) on each unit of the plan present in `model`, then the
    root. Sharded parameters stay in their own dtype (fp32 master weights);
    `compute` only sets the dtype they are gathered in. Expert weights that
    apply_ep sharded stay out of FSDP (see reduce_expert_grads)."""
    cfg = planmod.PLANS[plan]["fsdp"]
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": cfg["reshard"] == "after_forward",
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=_DTYPES[cfg["compute"]], reduce_dtype=_DTYPES[cfg["reduce"]]),
    }
    if cfg["cpu_offload"]:
        # pinned host memory needs an accelerator; on a CPU mesh it stays pageable
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    experts = {p for m in model.modules() if isinstance(m, ExpertParallel)
               for p in m.parameters()}
    if experts:
        kwargs["ignored_params"] = experts
    for fqn in cfg["units"]:
        module = _find(model, fqn)
        if module is not None:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---- tensor parallelism ----------------------------------------------------------------


def apply_tp(model: nn.Module, mesh, planmod) -> nn.Module:
    """Tensor parallelism over `mesh` (1-D: the plan's tp ranks) by TP_PLAN: q/k/v
    and gate/up split by output features, o/down by input features, so that each
    rank runs its own heads and hidden features and one all-reduce per attention
    and MLP sums their outputs. Apply it before FSDP: FSDP then shards the TP
    shards over dp (2-D)."""
    layout = {}
    for pattern, style in planmod.TP_PLAN.items():
        prefix, star, rest = pattern.partition(".*.")
        if star:  # one entry per layer present on this (pipeline-stage) model
            fqns = [f"{prefix}.{key}.{rest}" for key in getattr(model, prefix, None) or {}]
        else:
            fqns = [pattern]
        for fqn in fqns:
            if _find(model, fqn) is not None:
                layout[fqn] = _TP_STYLES[style]()
    return parallelize_module(model, mesh, layout)


# ---- expert parallelism ----------------------------------------------------------------


class ExpertParallel:
    """The forward of a GroupedExperts module whose weights apply_ep sharded by
    expert over the ep ranks (mixed into its class, as fully_shard does).

    x arrives sorted by expert, so the rows for each rank's experts are
    contiguous: one all-to-all sends them to the rank holding their expert, that
    rank runs its own experts (GroupedExperts.compute on its weight shards) and
    a second all-to-all brings the results back in x's order.
    """

    ep_group = None  # the ep ranks' process group, set by apply_ep

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group = self.ep_group
        ep = dist.get_world_size(group)
        send = counts.view(ep, -1)  # rows for (rank, its expert)
        recv = torch.empty_like(send)  # rows from (rank, my expert)
        dist.all_to_all_single(recv, send, group=group)
        sent, received = send.sum(1).tolist(), recv.sum(1).tolist()
        x = all_to_all_single_autograd(x, received, sent, group)
        # x holds the rows of rank 0 for each of my experts, then rank 1's, ...:
        # the grouped matmul wants them by expert
        per_rank = recv.shape[1]  # experts per rank
        segment = torch.repeat_interleave(
            torch.arange(recv.numel(), device=x.device), recv.flatten())
        source, expert = segment // per_rank, segment % per_rank
        order = torch.argsort(expert * ep + source, stable=True)
        mine = {name: p.to_local() for name, p in self.named_parameters(recurse=False)}
        y = self.compute(x[order], recv.sum(0), **mine)[order.argsort()]
        return all_to_all_single_autograd(y, sent, received, group)


def apply_ep(model: nn.Module, mesh, planmod) -> nn.Module:
    """Expert parallelism over `mesh` (1-D: ep consecutive ranks of the dp
    dimension): each rank keeps 1/ep of the experts of every MoE layer
    (EXPERT_FQNS; weights sharded by expert, DTensor Shard(0)) and exchanges
    tokens with the others (ExpertParallel). The router, shared experts and the
    rest of the model stay data parallel; apply_fsdp leaves expert weights alone
    and reduce_expert_grads averages their gradients over dp."""
    for fqn in planmod.EXPERT_FQNS:
        experts = _find(model, fqn)
        if experts is None:  # not on this pipeline stage
            continue
        for name, param in list(experts.named_parameters(recurse=False)):
            shard = distribute_tensor(param.detach(), mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(shard, param.requires_grad))
        cls = type(experts)
        experts.__class__ = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
        experts.ep_group = mesh.get_group()
    return model


def reduce_expert_grads(model: nn.Module, mesh, planmod, plan: str) -> None:
    """After backward: average the expert gradients over the dp ranks, as FSDP
    does for the other parameters. A rank's expert gradient already sums the
    tokens of its ep group; the ranks holding the same experts (`mesh`, 1-D:
    one per ep group, dp / ep of them) add theirs."""
    dp = planmod.PLANS[plan]["mesh"]["dp"]
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            for param in module.parameters(recurse=False):
                if param.grad is not None:
                    grad = param.grad.to_local()
                    if mesh.size() > 1:
                        dist.all_reduce(grad, group=mesh.get_group())
                    grad.div_(dp)
