"""Refuse a training run that cannot fit, before it allocates anything.

A single-process run holds fp32 weights, their gradients and AdamW's two
fp32 moments: 16 bytes per parameter, whatever --bf16 (an autocast: the
weights stay fp32), before any activation. That is the compiler's own figure
(compiler/cost.py, `forgec info`'s "fp32 params" training memory). A run
whose figure exceeds the memory its device has available stops at once with
the figure and what to do instead.

Available memory: CUDA, the device's free memory (torch.cuda.mem_get_info);
CPU, /proc/meminfo's MemAvailable, or less where a cgroup memory limit leaves
less. FORGEC_MEMORY_LIMIT_BYTES, where set, stands in for the device's
available bytes (for tests, and for a budget below what the device has).

Under a parallel plan the launcher (runtime/distributed.py) checks each rank's
share instead (check_fits_plan: `forgec plan`'s per-rank parameters), before
any worker starts.
"""

from __future__ import annotations

import os

from forgec.compiler.cost import format_bytes
from forgec.compiler.errors import RunError, UsageError

MEMORY_ENV = "FORGEC_MEMORY_LIMIT_BYTES"


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's cgroup may still allocate (v2, else v1), or None."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, used = _read_int(os.path.join(root, limit)), _read_int(os.path.join(root, usage))
        if cap is not None and cap < 1 << 60 and used is not None:  # v1 "no limit" is huge
            return max(0, cap - used)
    return None


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes the run may still allocate on `device`, where they are), None when unknown."""
    override = os.environ.get(MEMORY_ENV)
    if override is not None:
        if not override.strip().isdigit():
            raise UsageError(f"{MEMORY_ENV} must be a number of bytes, not '{override}'")
        return int(override), f"the memory limit {MEMORY_ENV}"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} ({torch.cuda.get_device_name(device)})"
    known = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    return (min(known) if known else None), "this machine"


def training_bytes(spec: str) -> tuple[str, int, int, list[str]]:
    """(model, parameters, fp32 weights + gradients + AdamW bytes, the spec's
    plans for it) of the model `spec` trains, from the compiler's cost model."""
    from forgec.compiler.cost import cost, vlm_cost
    from forgec.compiler.driver import compile_and_report

    comp = compile_and_report(spec, quiet=True)
    if comp is None:  # build_package() has compiled it already: cannot happen
        raise RunError(f"cannot train {spec}: the spec has errors")
    name = comp.main_model()
    c = vlm_cost(comp, comp.vlms[name]) if name in comp.vlms else cost(comp.graphs[name])
    plans = sorted(p.name for p in comp.plans.values() if p.target == name)
    # 16 B/parameter: cost()'s "fp32" training memory of a text model; vlm_cost()
    # adds the encoder's and adapter's parameters to params_total only
    return name, c.params_total, 16 * c.params_total, plans


def check_fits(spec: str, device) -> None:
    """RunError (exit 1) if the run's weights, gradients and AdamW state alone
    exceed the memory available on `device`."""
    available, where = available_bytes(device)
    if available is None:
        return
    name, params, need, plans = training_bytes(spec)
    if need <= available:
        return
    plan = (f"a parallel plan over more devices (--plan {plans[0]}"
            + (f"; the spec's plans: {', '.join(plans)}" if len(plans) > 1 else "")
            + f"; `forgec plan {spec} --plan NAME --world N` shows each rank's memory)"
            if plans else "a parallel plan over more devices (add a `plan` to the spec; "
            "`forgec plan` shows each rank's memory)")
    raise RunError(
        f"{name} cannot train here: it needs {format_bytes(need)} for its {params:,} fp32 "
        f"weights, gradients and AdamW moments alone (`forgec info`; activations come on "
        f"top), and {where} has {format_bytes(available)} available. Train it with {plan}, "
        f"or a smaller model; --bf16 and a smaller --batch-size or --seq-len shrink only "
        f"the activations")


def check_fits_plan(spec: str, plan: str, world: int, device) -> None:
    """check_fits() of a run under a parallel plan, before its workers start:
    each rank's fp32 weights, gradients and AdamW moments are 16 bytes per
    parameter it stores (`forgec plan`'s per-rank figures). The ranks of a CPU
    run share this machine's memory (all of them start here); on GPUs each rank
    has a device of its own, and the largest rank must fit one."""
    available, where = available_bytes(device)
    if available is None:
        return
    _, params, need, _ = training_bytes(spec)
    # no rank holds more than the whole model and a tied copy of a table: far
    # below the limit, the planner's per-rank figures are not needed
    if 2 * need * (world if device.type == "cpu" else 1) <= available:
        return
    from .planner import plan_report

    report = plan_report(spec, plan, world)
    per_rank = [16 * r["params"] for r in report["per_rank"]]
    shared = device.type == "cpu"
    need = sum(per_rank) if shared else max(per_rank)
    if need <= available:
        return
    figure = (f"its {world} ranks need {format_bytes(need)} together for their fp32 weights, "
              f"gradients and AdamW moments alone (the largest rank "
              f"{format_bytes(max(per_rank))}), and they share {where}, which has "
              f"{format_bytes(available)} available" if shared else
              f"its largest rank needs {format_bytes(need)} for its fp32 weights, gradients "
              f"and AdamW moments alone, and {where} has {format_bytes(available)} available")
    todo = ("Run its ranks where each has memory of its own (GPUs, or the nodes of a "
            "cluster, with torchrun and `python -m forgec.runtime.worker`)" if shared else
            "Train it with a plan over more devices")
    raise RunError(
        f"{report['model']} cannot train here with plan '{plan}': {figure} (`forgec plan "
        f"{spec} --plan {plan} --world {world}` shows each rank's memory; activations come on "
        f"top). {todo}, or a smaller model; --bf16 and a smaller --batch-size or --seq-len "
        f"shrink only the activations")
