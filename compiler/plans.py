"""Parallel plans: `plan NAME for MODEL { mesh(...) fsdp(...) pipeline(...) }`.

A plan is data beside the model. This module
  * declares the plan directives and their arguments (the directive registry),
  * binds a plan section against its target model (arguments may use the
    model's parameters),
  * validates it — degrees against the world size, pipeline stages against
    layers, TP degree against heads, EP degree against experts, tied weights
    across stages (E120–E129) — and
  * derives what the runtime applies: FSDP units, pipeline stages (split by a
    cost model over every op's FLOPs and parameters, or given as FQN lists),
    activation checkpointing per block kind and the TP colwise/rowwise map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from . import ast
from .bind import Model
from .cost import default_seq_len
from .diagnostics import Diagnostics, Span, did_you_mean
from .ops import OPS, ArgSpec, numel, patch_tokens

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class DirectiveDef:
    name: str
    doc: str
    args: tuple[ArgSpec, ...]
    open_args: bool = False  # keyword arguments named by the model (block kinds)


DIRECTIVES: dict[str, DirectiveDef] = {d.name: d for d in (
    DirectiveDef("mesh", "Device mesh degrees; their product is the world size.", (
        ArgSpec("dp", "int", 1, min=1, doc="data parallel (FSDP shards over it)"),
        ArgSpec("pp", "int", 1, min=1, doc="pipeline stages"),
        ArgSpec("tp", "int", 1, min=1, doc="tensor parallel"),
        ArgSpec("ep", "int", 1, min=1, doc="expert parallel (within dp)"),
    )),
    DirectiveDef("fsdp", "Fully sharded data parallelism (FSDP2) over the dp dimension.", (
        ArgSpec("units", "choice", "layers", choices=("layers", "blocks"),
                doc="one unit per layer, or per attention/MLP of each layer"),
        ArgSpec("reshard", "choice", "after_forward", choices=("after_forward", "never"),
                doc="free gathered parameters after each unit's forward"),
        ArgSpec("compute", "choice", "fp32", choices=DTYPES, doc="dtype of the computation"),
        ArgSpec("reduce", "choice", "fp32", choices=DTYPES, doc="dtype of gradient reduction"),
        ArgSpec("cpu_offload", "bool", False, doc="keep sharded parameters in host memory"),
    )),
    DirectiveDef("pipeline", "Pipeline parallelism over the pp dimension.", (
        ArgSpec("schedule", "choice", "1f1b", choices=SCHEDULES),
        ArgSpec("microbatches", "int", 4, min=1),
        ArgSpec("virtual_stages", "int", 1, min=1, doc="stages per rank (interleaved, zbv)"),
        ArgSpec("split", "any", "auto",
                doc='"auto" (cost model) or a list of FQN lists, one per stage'),
    )),
    DirectiveDef("activation_checkpoint",
                 "Recompute activations in backward: none, full or selective(every = K, "
                 "save = [OPS]) per block kind (`default = full, sparse = none`); a bare "
                 "selective checkpoints every other layer.",
                 (), open_args=True),
)}
AC_MODES = ("none", "full", "selective")
# op classes whose outputs op-level selective checkpointing keeps (runtime/parallel.py's
# SAC_OPS names the aten ops of each)
SAC_SAVES = ("matmul", "sdpa")
SELECTIVE_ARGS = (
    ArgSpec("every", "int", None, min=1,
            doc="checkpoint one layer in K (layer-level); 2 for a bare selective, 1 with save"),
)


@dataclass(frozen=True)
class Checkpointing:
    """How a block kind's layers recompute their activations in backward: `every`
    K-th layer is checkpointed (by its index among all layers; 0 for none), and
    a checkpointed layer keeps the outputs of the `save` op classes (op-level
    selective checkpointing) and recomputes the rest (all of it when empty)."""

    every: int = 0
    save: tuple[str, ...] = ()


AC_NONE, AC_FULL = Checkpointing(0), Checkpointing(1)


@dataclass
class Plan:
    name: str
    target: str
    span: Span
    name_span: Span
    mesh: dict[str, int] = field(default_factory=lambda: {"dp": 1, "pp": 1, "tp": 1, "ep": 1})
    mesh_span: Span | None = None
    fsdp: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None
    activation_checkpoint: dict[str, Checkpointing] = field(default_factory=dict)
    spans: dict[str, Span] = field(default_factory=dict)  # "directive.arg" → span

    @property
    def world(self) -> int:
        m = self.mesh
        return m["dp"] * m["pp"] * m["tp"]


def bind_plan(sec, binder, diags: Diagnostics) -> Plan | None:
    """Bind one plan section (its target model's parameters are in scope)."""
    if sec.target is None:
        diags.error("E090", f"plan '{sec.name}' needs a target: `plan {sec.name} for MODEL`",
                    sec.name_span)
        return None
    target, tspan = sec.target
    other = binder.program.sections.get(target)
    if other is None or other.kind not in ("model", "vlm"):
        diags.error("E021", f"unknown model '{target}'", tspan,
                    hint=did_you_mean(target, [n for n, s in binder.program.sections.items()
                                               if s.kind in ("model", "vlm")]))
        return None
    for name, decl in sec.decls.items():
        diags.error("E091", f"a plan holds directives such as mesh(...), not assignments "
                    f"('{name} = ...')", decl.name_span)
    scope = binder.section_scope(target)
    plan = Plan(sec.name, target, sec.span, sec.name_span)
    seen: dict[str, Span] = {}
    for stmt in sec.calls:
        call: ast.Call = stmt.call
        name = call.func.dotted
        d = DIRECTIVES.get(name)
        if d is None:
            diags.error("E091", f"unknown plan directive '{name}'", call.func.span,
                        hint=did_you_mean(name, DIRECTIVES)
                        or "directives: " + ", ".join(DIRECTIVES))
            continue
        if name in seen:
            diags.error("E091", f"'{name}' is given twice", call.func.span,
                        notes=[("first given here", seen[name])])
            continue
        seen[name] = call.func.span
        if d.open_args:
            _bind_checkpointing(call, binder, scope, plan, diags)
            continue
        args, spans, ok = binder.bind_args(name, d.args, call, scope)
        if not ok:
            continue
        args = {a.name: args[a.name] for a in d.args}  # declaration order, for plan.py
        for k, s in spans.items():
            plan.spans[f"{name}.{k}"] = s
        plan.spans[name] = call.span
        if name == "mesh":
            plan.mesh = args
            plan.mesh_span = call.span
        elif name == "fsdp":
            plan.fsdp = args
        elif name == "pipeline":
            plan.pipeline = args
    return plan


def _bind_checkpointing(call: ast.Call, binder, scope, plan: Plan, diags: Diagnostics) -> None:
    model_sec = binder.program.sections[plan.target]
    if model_sec.kind == "vlm":  # a vlm's layers are its text model's blocks
        from .vlm import section_refs

        text = section_refs(model_sec).get("text")
        model_sec = binder.program.sections.get(text[0]) if text else None
        if model_sec is None:
            return  # the vlm section reports its missing text model itself
    kinds = set(model_sec.blocks) | {"default"}
    for arg in call.args:
        if arg.name is None:
            diags.error("E092", "activation_checkpoint takes `BLOCK = none|full|selective` "
                        "(or `default = ...`)", arg.span)
            continue
        if arg.name not in kinds:
            diags.error("E092", f"'{plan.target}' has no block '{arg.name}'",
                        arg.name_span or arg.span, hint=did_you_mean(arg.name, kinds))
            continue
        mode = _bind_mode(arg.value, binder, scope, diags)
        if mode is None:
            continue
        plan.activation_checkpoint[arg.name] = mode
        plan.spans[f"activation_checkpoint.{arg.name}"] = arg.span


def _bind_mode(value: ast.Expr, binder, scope, diags: Diagnostics) -> Checkpointing | None:
    """`none`, `full`, `selective` or `selective(every = K, save = [OPS])`."""
    if isinstance(value, ast.Call) and value.func.dotted == "selective":
        return _bind_selective(value, binder, scope, diags)
    mode = value.parts[0] if isinstance(value, ast.Ref) and len(value.parts) == 1 else (
        value.value if isinstance(value, ast.Str) else None)
    if mode not in AC_MODES:
        name = value.func.dotted if isinstance(value, ast.Call) else mode
        diags.error("E092", "checkpointing mode must be one of none, full, selective or "
                    "selective(every = K, save = [OPS])", value.span,
                    hint=did_you_mean(str(name), AC_MODES) if name else None)
        return None
    return {"none": AC_NONE, "full": AC_FULL, "selective": Checkpointing(2)}[mode]


def _bind_selective(call: ast.Call, binder, scope, diags: Diagnostics) -> Checkpointing | None:
    saves = [a for a in call.args if a.name == "save"]
    rest = ast.Call(call.func, tuple(a for a in call.args if a.name != "save"), call.span)
    args, _, ok = binder.bind_args("selective", SELECTIVE_ARGS, rest, scope)
    save: list[str] = []
    for arg in saves[1:]:
        diags.error("E027", "argument 'save' given twice", arg.span,
                    notes=[("first given here", saves[0].span)])
        ok = False
    if saves:
        value = saves[0].value
        items = value.items if isinstance(value, ast.ListExpr) else (value,)
        if not items:
            diags.error("E093", "selective(save = []) keeps no op's output: that is `full`",
                        value.span, hint="list op classes to keep: "
                        + ", ".join(SAC_SAVES) + "; or write full")
            ok = False
        for item in items:
            name = (item.parts[0] if isinstance(item, ast.Ref) and len(item.parts) == 1
                    else item.value if isinstance(item, ast.Str) else None)
            if name not in SAC_SAVES:
                diags.error("E093", "selective(save = [...]) lists op classes whose outputs "
                            f"are kept: {', '.join(SAC_SAVES)}", item.span,
                            hint=did_you_mean(name, SAC_SAVES) if isinstance(name, str)
                            else None)
                ok = False
            elif name in save:
                diags.error("E093", f"'{name}' is listed twice in save", item.span)
                ok = False
            else:
                save.append(name)
    if not ok:
        return None
    every = args["every"] if args["every"] is not None else (1 if saves else 2)
    return Checkpointing(every, tuple(sorted(save)))


# ---- derived data --------------------------------------------------------------------


@dataclass
class Stage:
    fqns: list[str]
    params: int
    flops: int


def unit_costs(graph: nx.MultiDiGraph, seq: int | None = None) -> dict[str, tuple[int, int]]:
    """(parameters, forward FLOPs per token at sequence length `seq`, the model's
    own by default) by top-level unit: each layer (and inserted block), and the
    embedding / final norm / head."""
    seq = seq or default_seq_len(graph.graph["model"])
    out: dict[str, list[int]] = {}
    for _, d in graph.nodes(data=True):
        if d["kind"] != "op" or not d["ok"]:
            continue
        parts = d["fqn"].split(".")
        unit = ".".join(parts[:2]) if parts[0].endswith("layers") else parts[0]
        acc = out.setdefault(unit, [0, 0])
        acc[0] += sum(numel(s) for s in d["weights"].values())
        acc[1] += OPS[d["op"]].flops(d["args"], seq)
    return {k: (v[0], v[1]) for k, v in out.items()}


def layer_units(model: Model) -> list[str]:
    """Decoder layers in execution order, inserted blocks right after their layer."""
    after: dict[int, list[str]] = {}
    ordinal: dict[str, int] = {}
    for ins in model.inserted:
        k = ordinal.get(ins.block, 0)
        ordinal[ins.block] = k + 1
        after.setdefault(ins.after, []).append(f"{ins.block}_layers.{k}")
    units = []
    for slot in model.layers:
        units.append(f"layers.{slot.index}")
        units.extend(after.get(slot.index, []))
    return units


def auto_split(units: list[str], costs: dict[str, tuple[int, int]], n: int,
               first: int, last: int) -> list[list[str]]:
    """Contiguous split of `units` into n stages minimising the largest stage's
    FLOPs (the embedding's cost `first` counts on stage 0, the head's `last` on
    the final stage). Binary search on the bound with a greedy fill."""
    cost = [costs.get(u, (0, 0))[1] for u in units]

    def fill(bound: int) -> list[list[str]] | None:
        stages: list[list[str]] = [[]]
        load = first
        for i, u in enumerate(units):
            extra = last if i == len(units) - 1 else 0
            remaining_units = len(units) - i
            must_open = len(stages) < n and remaining_units == n - len(stages)
            if stages[-1] and (load + cost[i] + extra > bound or must_open):
                if len(stages) == n:
                    return None
                stages.append([])
                load = 0
            stages[-1].append(u)
            load += cost[i] + extra
            if load > bound:
                return None
        return stages if len(stages) == n else None

    def balanced(bound: int) -> list[list[str]] | None:
        """Each stage aims at an equal share of what is left, within `bound`."""
        stages, i = [], 0
        for j in range(n):
            left = n - j
            extra = [last if k == len(units) - 1 else 0 for k in range(len(units))]
            target = (sum(cost[i:]) + last + (first if j == 0 else 0)) / left
            load = first if j == 0 else 0
            group: list[str] = []
            limit = len(units) - i - (left - 1)  # leave a unit for every later stage
            while len(group) < limit:
                c = cost[i] + extra[i]
                if j < n - 1 and group and (load + c > bound
                                            or abs(load + c - target) > abs(load - target)):
                    break
                group.append(units[i])
                load += c
                i += 1
            if load > bound or not group:
                return None
            stages.append(group)
        return stages if i == len(units) else None

    lo, hi = max(cost, default=0), sum(cost) + first + last
    while lo < hi:  # the smallest bound the greedy fill meets
        mid = (lo + hi) // 2
        if fill(mid) is not None:
            hi = mid
        else:
            lo = mid + 1
    best = balanced(lo) or fill(lo)
    assert best is not None and len(best) == n
    return best


def stages_of(plan: Plan, model: Model, graph: nx.MultiDiGraph) -> list[Stage]:
    """The pipeline stages (FQNs), explicit or from the cost model."""
    units = layer_units(model)
    costs = unit_costs(graph)
    n = plan.mesh["pp"] * (plan.pipeline or {}).get("virtual_stages", 1)
    split = (plan.pipeline or {}).get("split", "auto")
    if split == "auto":
        first = costs.get("token_embedding", (0, 0))[1]
        last = costs.get("norm", (0, 0))[1] + costs.get("output_head", (0, 0))[1]
        groups = auto_split(units, costs, n, first, last) if n > 1 else [units]
    else:
        groups = [list(g) for g in split]
    groups[0] = ["token_embedding", *groups[0]]
    groups[-1] = [*groups[-1], "norm", "output_head"]
    return [Stage(g, sum(costs.get(u, (0, 0))[0] for u in g),
                  sum(costs.get(u, (0, 0))[1] for u in g)) for g in groups]


def fsdp_units(plan: Plan, model: Model) -> list[str]:
    units = []
    for unit in layer_units(model):
        if (plan.fsdp or {}).get("units") == "blocks":
            block = _block_of(model, unit)
            units += [f"{unit}.{c}" for c, comp in block.components.items()
                      if comp.op.role == "module" and comp.op.weights(comp.args)]
        else:
            units.append(unit)
    return units


def _block_of(model: Model, unit: str):
    prefix, index = unit.split(".")
    if prefix == "layers":
        return model.blocks[model.layers[int(index)].block]
    name = prefix[: -len("_layers")]
    return model.blocks[name]


def checkpointing_of(plan: Plan, model: Model) -> dict[str, Checkpointing]:
    """Each layer's checkpointing, by its block kind's mode (or the default)."""
    ac = plan.activation_checkpoint
    return {unit: ac.get(kind, ac.get("default", AC_NONE))
            for unit in layer_units(model) for kind in (_block_of(model, unit).name,)}


def checkpointed_units(plan: Plan, model: Model) -> list[str]:
    """Layers whose activations are recomputed: every `every`-th layer of each
    block kind's policy, counted over all layers."""
    return [unit for i, (unit, mode) in enumerate(checkpointing_of(plan, model).items())
            if mode.every and i % mode.every == 0]


def checkpoint_saves(plan: Plan, model: Model) -> dict[str, list[str]]:
    """Checkpointed layers that keep some ops' outputs (op-level selective
    checkpointing): FQN → the op classes kept."""
    modes = checkpointing_of(plan, model)
    return {unit: list(modes[unit].save) for unit in checkpointed_units(plan, model)
            if modes[unit].save}


def tp_plan(model: Model) -> dict[str, str]:
    """FQN pattern → "colwise" | "rowwise" of the layers' modules, from each op's
    declared TP layout. The embedding, the norms and the head stay whole on
    every tp rank: a vocabulary-parallel head would need a parallel loss."""
    out: dict[str, str] = {}
    for unit in layer_units(model):
        block = _block_of(model, unit)
        pattern = unit.split(".")[0] + ".*"
        for cname, comp in block.components.items():
            for sub, style in comp.op.tp.items():
                out[f"{pattern}.{cname}.{sub}"] = style
    return dict(sorted(out.items()))


# ---- validation ------------------------------------------------------------------------


def validate(plan: Plan, model: Model, graph: nx.MultiDiGraph, diags: Diagnostics,
             world: int | None = None, units: list[str] | None = None,
             split_hint: Callable[[str], str | None] | None = None) -> None:
    """Check `plan` against its model; `units` are the pipeline's units (the
    model's layers by default; a vlm's are vlm_units), `split_hint` may explain
    an unknown FQN in an explicit split."""
    m = plan.mesh
    where = plan.mesh_span or plan.name_span
    if world is not None and plan.world != world:
        diags.error("E120", f"plan '{plan.name}' needs {plan.world} ranks "
                    f"(dp {m['dp']} × pp {m['pp']} × tp {m['tp']}), not {world}", where)
    if m["ep"] > 1 and m["dp"] % m["ep"]:
        diags.error("E123", f"expert-parallel degree {m['ep']} must divide dp {m['dp']}",
                    plan.spans.get("mesh.ep", where))
    elif m["ep"] > 1 and not any("ep" in c.op.split_by for c in model.all_components()):
        diags.error("E123", f"expert-parallel degree {m['ep']} needs mixture-of-experts "
                    f"layers; '{model.name}' has no moe", plan.spans.get("mesh.ep", where))
    _validate_checkpointing(plan, model, diags)
    units = layer_units(model) if units is None else units
    if m["pp"] > 1 and plan.pipeline is None:
        diags.error("E121", f"pp = {m['pp']} needs a pipeline(...) directive", where)
    if plan.pipeline is not None:
        p = plan.pipeline
        v = p["virtual_stages"]
        stages = m["pp"] * v
        sched_span = plan.spans.get("pipeline.schedule", plan.spans.get("pipeline", where))
        if p["schedule"] in ("interleaved_1f1b",) and v < 2:
            diags.error("E125", f"schedule {p['schedule']} needs virtual_stages ≥ 2", sched_span)
        if p["schedule"] == "zbv" and v != 2:
            diags.error("E125", "schedule zbv runs exactly 2 virtual stages per rank",
                        sched_span)
        if p["schedule"] in ("gpipe", "1f1b") and v != 1:
            diags.error("E125", f"schedule {p['schedule']} runs one stage per rank; use "
                        "interleaved_1f1b or zbv for virtual stages",
                        plan.spans.get("pipeline.virtual_stages", sched_span))
        if stages > len(units):
            diags.error("E121", f"{stages} pipeline stages for {len(units)} layers",
                        plan.spans.get("mesh.pp", where),
                        hint="every stage needs at least one layer")
        if p["split"] != "auto":
            _validate_split(plan, units, stages, diags, split_hint)
        if m["pp"] > 1 and p["microbatches"] < m["pp"] and p["schedule"] != "gpipe":
            diags.error("E127", f"{p['schedule']} with {m['pp']} stages needs at least "
                        f"{m['pp']} microbatches, got {p['microbatches']}",
                        plan.spans.get("pipeline.microbatches", sched_span))
    # each op names the arguments a parallel degree splits (OpDef.split_by)
    for comp in model.all_components():
        why = comp.op.tp_refusal(comp.args) if m["tp"] > 1 else ""
        if why:
            diags.error("E161", f"tensor parallelism cannot split {comp.op.name} "
                        f"'{comp.name}': {why}",
                        plan.spans.get("mesh.tp", where),
                        notes=[(f"{comp.op.name} declared here", comp.span)])
            continue
        for arg in comp.op.split_by.get("tp", ()) if m["tp"] > 1 else ():
            if comp.args[arg] % m["tp"]:
                diags.error("E122", f"tensor-parallel degree {m['tp']} does not divide "
                            f"{arg} {comp.args[arg]} of '{comp.name}'",
                            plan.spans.get("mesh.tp", where),
                            notes=[(f"{comp.op.name} declared here", comp.span)])
    for comp in model.all_components():
        for arg in comp.op.split_by.get("ep", ()) if m["ep"] > 1 else ():
            if comp.args[arg] % m["ep"]:
                diags.error("E123", f"expert-parallel degree {m['ep']} does not divide the "
                            f"{comp.args[arg]} {arg} of '{comp.name}'",
                            plan.spans.get("mesh.ep", where),
                            notes=[(f"{comp.op.name} declared here", comp.span)])


def _validate_checkpointing(plan: Plan, model: Model, diags: Diagnostics) -> None:
    """A block kind's layer-level policy must checkpoint at least one of its layers:
    `every` counts over all layers, so a kind whose layers all fall between the
    multiples of `every` would silently checkpoint nothing (E094)."""
    modes = checkpointing_of(plan, model)
    chosen = set(checkpointed_units(plan, model))
    ac = plan.activation_checkpoint
    for kind, mode in ac.items():
        if not mode.every:
            continue
        governed = [u for u in modes if (_block_of(model, u).name == kind if kind != "default"
                                          else _block_of(model, u).name not in ac)]
        if governed and not chosen.intersection(governed):
            index = [str(layer_units(model).index(u)) for u in governed]
            diags.error("E094", f"selective(every = {mode.every}) checkpoints no '{kind}' "
                        f"layer: they are layers {', '.join(index)} and `every` counts over "
                        "all layers from 0", plan.spans[f"activation_checkpoint.{kind}"],
                        hint="choose an `every` that divides one of their indices, or `full`")


def _validate_split(plan: Plan, units: list[str], stages: int, diags: Diagnostics,
                    hint: Callable[[str], str | None] | None = None) -> None:
    span = plan.spans.get("pipeline.split", plan.name_span)
    split = plan.pipeline["split"]
    if not (isinstance(split, list) and all(isinstance(g, list) and g for g in split)
            and all(isinstance(f, str) for g in split for f in g)):
        diags.error("E126", 'split is "auto" or a list of non-empty FQN lists, one per stage',
                    span)
        return
    if len(split) != stages:
        diags.error("E126", f"split lists {len(split)} stages, the plan has {stages}", span)
        return
    flat = [f for g in split for f in g]
    if flat != units:
        missing = [u for u in units if u not in flat]
        unknown = [f for f in flat if f not in units]
        what = (f"unknown {unknown[0]!r}" if unknown else f"missing {missing[0]!r}" if missing
                else "layers out of order")
        diags.error("E126", f"split must list every layer once, in order: {what}", span,
                    hint=((hint and hint(unknown[0])) or did_you_mean(unknown[0], units))
                    if unknown else None)


def validate_vlm_plan(plan: Plan, vlm, models: dict[str, Model],
                      graphs: dict[str, nx.MultiDiGraph], diags: Diagnostics,
                      world: int | None = None) -> None:
    """A plan for a vision-language model shards it with FSDP (the vision
    encoder's layers, the decoder's layers and any cross-attention blocks are
    the units), pipelines it (its units are the vision encoder's layers, then
    the decoder's: vlm_units) and checkpoints decoder layers; tensor and expert
    parallelism are not supported for a vlm yet (E128). Pipelines are checked
    as a text model's are (E121, E125–E127); a decoder head tied to the
    embedding is not pipelined (E124)."""
    m = plan.mesh
    refused = [(k, f"{k} {m[k]}") for k in ("tp", "ep") if m[k] > 1]
    for key, what in refused:
        diags.error("E128", f"plan '{plan.name}' for the vision-language model '{vlm.name}' "
                    f"has {what}: forgec runs vlm plans with data and pipeline parallelism "
                    "only", plan.spans.get(f"mesh.{key}", plan.name_span),
                    hint="shard with mesh(dp = N) and fsdp(...), pipeline with mesh(pp = N) "
                    "and pipeline(...); tensor and expert parallelism are supported for text "
                    "models")
    if not refused:
        stack = vlm.fusion.op.fusion.stack

        def hint(fqn: str) -> str | None:
            if stack and fqn.startswith(f"transformer.{stack}."):
                return vlm.fusion.op.fusion.stack_hint
            return None

        validate(plan, models[vlm.text], graphs[vlm.text], diags, world,
                 units=vlm_units(vlm, models), split_hint=hint)
    head = models[vlm.text].components["output_head"]
    if m["pp"] > 1 and head.args.get("tie") is not None:
        # a text model's pipeline keeps a copy of the tied weight on the last
        # stage in step (pipeline["tied"]); a VLM's stages do not do that yet
        diags.error("E124", f"the pipeline of the vision-language model '{vlm.name}' cannot "
                    f"split its decoder's head, which is tied to the embedding: forgec "
                    "pipelines tied heads of text models only",
                    plan.spans.get("mesh.pp", plan.name_span),
                    notes=[("tied here", head.arg_spans.get("tie", head.span))],
                    hint="untie the decoder's head, or use pp = 1")


# ---- pipelines of vision-language models ------------------------------------------------


def vlm_units(vlm, models: dict[str, Model]) -> list[str]:
    """The units of a vlm's pipeline in execution order, as FQNs in the VLM module:
    the vision encoder's layers, then the decoder's (its inserted blocks after their
    layer). A cross-attention block is no unit: it travels with the layer it follows."""
    vision, text = models[vlm.vision], models[vlm.text]
    return ([f"vision_encoder.layers.{slot.index}" for slot in vision.layers]
            + [f"transformer.{unit}" for unit in layer_units(text)])


def _stack_after(vlm, text: Model) -> dict[int, int]:
    """Decoder layer → index of the fusion's block (cross-attention) that runs after it."""
    hooks = vlm.fusion.op.fusion
    return {layer: k for k, layer in enumerate(hooks.after(vlm.fusion.args))} \
        if hooks.stack else {}


def _companions(vlm, models: dict[str, Model]) -> tuple[dict[str, list[str]],
                                                        dict[str, list[str]]]:
    """Modules that travel with a unit of a vlm pipeline: (before it, after it). The
    vision encoder's final norm follows its last layer; the adapter and the token
    embedding come before the first decoder layer; each cross-attention block
    follows its decoder layer. (The patch embedding opens the first stage, the
    decoder's norm and head close the last.)"""
    vision, text = models[vlm.vision], models[vlm.text]
    first = f"transformer.{layer_units(text)[0]}"
    before = {first: ["adapter", "transformer.token_embedding"]}
    after: dict[str, list[str]] = {}
    if vision.layers:
        after[f"vision_encoder.layers.{vision.layers[-1].index}"] = ["vision_encoder.norm"]
    else:
        before[first].insert(0, "vision_encoder.norm")
    stack = vlm.fusion.op.fusion.stack
    for layer, k in _stack_after(vlm, text).items():
        after.setdefault(f"transformer.layers.{layer}", []).append(f"transformer.{stack}.{k}")
    return before, after


def _sample_tokens(vlm, text: Model) -> tuple[int, int]:
    """(decoder positions, text positions) of one training sample: image tokens and
    max_text where the image is prefixed, the text model's length otherwise."""
    if "max_text" in vlm.fusion.args:
        return vlm.image_tokens + vlm.fusion.args["max_text"], vlm.fusion.args["max_text"]
    seq = default_seq_len(text)
    return seq, seq


def vlm_unit_costs(vlm, models: dict[str, Model],
                   graphs: dict[str, nx.MultiDiGraph]) -> dict[str, tuple[int, int]]:
    """(parameters, forward FLOPs per sample — one image and its text) of each
    module a vlm pipeline places, by FQN in the VLM module, from every op of the
    vision encoder, adapter, decoder and fusion. The encoder's ops run on its
    patch tokens, the adapter per image token, the decoder's ops on the image
    and text tokens (_sample_tokens; the head on the text only); a MoT layer
    holds a copy of each component per modality (a token runs one), a MoMa
    layer's MLP is its modalities' expert groups (each expert takes `capacity`
    of the tokens), and a cross-attention block's text queries attend to the
    image tokens."""
    vision, text = models[vlm.vision], models[vlm.text]
    patches = patch_tokens(vision.components["patch_embedding"].args)
    out = {f"vision_encoder.{unit}": (params, flops * patches)
           for unit, (params, flops) in unit_costs(graphs[vlm.vision], patches).items()}
    a = vlm.adapter
    out["adapter"] = (sum(numel(s) for s in a.op.weights(a.args).values()),
                      a.op.flops(a.args, patches) * vlm.image_tokens)
    seq, text_tokens = _sample_tokens(vlm, text)
    f = vlm.fusion
    acc: dict[str, list[int]] = {}
    for _, d in graphs[vlm.text].nodes(data=True):
        if d["kind"] != "op" or not d["ok"]:
            continue
        parts = d["fqn"].split(".")
        in_layer = parts[0].endswith("layers")
        unit = ".".join(parts[:2]) if in_layer else parts[0]
        params = sum(numel(s) for s in d["weights"].values())
        flops = OPS[d["op"]].flops(d["args"], seq)
        if in_layer:  # the fusion's copies or replacements of a decoder component
            params, flops = f.op.fusion.layer_cost(f.args, params, flops, OPS[d["op"]].slots)
        tokens = text_tokens if unit == "output_head" else seq
        total = acc.setdefault(f"transformer.{unit}", [0, 0])
        total[0] += params
        total[1] += flops * tokens
    out.update({k: (v[0], v[1]) for k, v in acc.items()})
    blocks = _stack_after(vlm, text)
    if blocks:
        stack = f.op.fusion.stack
        params = sum(numel(s) for k, s in f.op.weights(f.args).items()
                     if k.startswith(f"{stack}.0."))
        flops = f.op.fusion.stack_flops(f.args, seq, vlm.image_tokens)
        for k in range(len(blocks)):
            out[f"transformer.{stack}.{k}"] = (params, flops)
    return out


def vlm_stages_of(plan: Plan, vlm, models: dict[str, Model],
                  graphs: dict[str, nx.MultiDiGraph]) -> list[Stage]:
    """The pipeline stages of a vlm (FQNs in the VLM module): its units split by
    the cost model (vlm_unit_costs, FLOPs per sample) or as given, each with the
    modules that travel with it (_companions); params and FLOPs per stage."""
    units = vlm_units(vlm, models)
    costs = vlm_unit_costs(vlm, models, graphs)
    before, after = _companions(vlm, models)

    def cost(fqn: str) -> tuple[int, int]:
        return costs.get(fqn, (0, 0))

    n = plan.mesh["pp"] * (plan.pipeline or {}).get("virtual_stages", 1)
    split = (plan.pipeline or {}).get("split", "auto")
    if split == "auto":
        # a unit weighs what travels with it
        loads = {u: (0, sum(cost(f)[1] for f in (*before.get(u, ()), u, *after.get(u, ()))))
                 for u in units}
        first = cost("vision_encoder.patch_embedding")[1]
        last = cost("transformer.norm")[1] + cost("transformer.output_head")[1]
        groups = auto_split(units, loads, n, first, last) if n > 1 else [units]
    else:
        groups = [list(g) for g in split]
    groups = [[f for u in g for f in (*before.get(u, ()), u, *after.get(u, ()))]
              for g in groups]
    groups[0] = ["vision_encoder.patch_embedding", *groups[0]]
    groups[-1] = [*groups[-1], "transformer.norm", "transformer.output_head"]
    return [Stage(g, sum(cost(f)[0] for f in g), sum(cost(f)[1] for f in g)) for g in groups]


def vlm_plan_data(plan: Plan, vlm, models: dict[str, Model],
                  graphs: dict[str, nx.MultiDiGraph] | None = None) -> dict[str, Any]:
    """What plan.py records for a vlm's plan, in plan_data's schema; FQNs are
    relative to the VLM module, and stage FLOPs are per sample (vlm_unit_costs).
    `graphs` are lowered here when not given."""
    text, vision = models[vlm.text], models[vlm.vision]
    data: dict[str, Any] = {"mesh": dict(plan.mesh), "world": plan.world}
    if plan.fsdp is not None:
        units = [f"vision_encoder.layers.{slot.index}" for slot in vision.layers]
        xattn_after = _stack_after(vlm, text)
        for unit in fsdp_units(plan, text):
            units.append(f"transformer.{unit}")
            layer = unit.split(".")
            if layer[0] == "layers" and len(layer) == 2 and int(layer[1]) in xattn_after:
                units.append(f"transformer.{vlm.fusion.op.fusion.stack}."
                             f"{xattn_after[int(layer[1])]}")
        data["fsdp"] = {**plan.fsdp, "units": units}
    if plan.pipeline is not None:
        if graphs is None:
            from .lower import lower

            graphs = {name: lower(models[name]) for name in (vlm.text, vlm.vision)}
        stages = vlm_stages_of(plan, vlm, models, graphs)
        data["pipeline"] = {k: v for k, v in plan.pipeline.items() if k != "split"}
        data["pipeline"]["stages"] = [s.fqns for s in stages]
        data["pipeline"]["stage_params"] = [s.params for s in stages]
        data["pipeline"]["stage_flops"] = [s.flops for s in stages]
    data["activation_checkpoint"] = [f"transformer.{u}" for u in checkpointed_units(plan, text)]
    saves = checkpoint_saves(plan, text)
    if saves:
        data["activation_checkpoint_save"] = {f"transformer.{u}": s for u, s in saves.items()}
    return data


def tied_across_stages(stages: list[Stage], graph: nx.MultiDiGraph) -> list[dict[str, Any]]:
    """Weights shared by modules of different stages (a head tied to the
    embedding): the first stage holds the weight, a later one a copy that the
    runtime keeps equal (the same initial values, the summed gradient).
    [{"weights": [weight FQN, copy FQN], "stages": [its stage, the copy's]}]."""
    def stage_of(fqn: str) -> int:
        return next(i for i, st in enumerate(stages)
                    if any(fqn.startswith(unit + ".") for unit in st.fqns))

    out = []
    for _, d in sorted(graph.nodes(data=True), key=lambda n: n[0]):
        for copy, weight in sorted(d.get("tied", {}).items()):
            pair = [stage_of(weight), stage_of(copy)]
            if pair[0] != pair[1]:
                out.append({"weights": [weight, copy], "stages": pair})
    return out


def plan_data(plan: Plan, model: Model, graph: nx.MultiDiGraph) -> dict[str, Any]:
    """What plan.py records for one plan."""
    data: dict[str, Any] = {"mesh": dict(plan.mesh), "world": plan.world}
    if plan.fsdp is not None:
        data["fsdp"] = {**plan.fsdp, "units": fsdp_units(plan, model)}
    if plan.pipeline is not None:
        stages = stages_of(plan, model, graph)
        data["pipeline"] = {k: v for k, v in plan.pipeline.items() if k != "split"}
        data["pipeline"]["stages"] = [s.fqns for s in stages]
        data["pipeline"]["stage_params"] = [s.params for s in stages]
        data["pipeline"]["stage_flops"] = [s.flops for s in stages]
        tied = tied_across_stages(stages, graph)
        if tied:
            data["pipeline"]["tied"] = tied
    data["activation_checkpoint"] = checkpointed_units(plan, model)
    saves = checkpoint_saves(plan, model)
    if saves:
        data["activation_checkpoint_save"] = saves
    return data

