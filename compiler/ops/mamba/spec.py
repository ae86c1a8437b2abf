"""The Mamba (Mamba-1, selective scan) sequence mixer: a block's mixer in place of
attention, holding a fixed-size state per sequence when decoding."""

from __future__ import annotations

import math
from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def _derive(a: dict[str, Any]) -> None:
    if a.get("inner") is None:
        a["inner"] = a["expand"] * a["dim"]
    if a.get("dt_rank") is None:
        a["dt_rank"] = math.ceil(a["dim"] / 16) if a["dim"] > 0 else 0


def _weights(a: Args) -> dict[str, Shape]:
    dim, inner, n, r, k = a["dim"], a["inner"], a["state"], a["dt_rank"], a["conv"]
    w: dict[str, Shape] = {
        "in_proj.weight": (2 * inner, dim),
        "conv1d.weight": (inner, 1, k),
        "x_proj.weight": (r + 2 * n, inner),
        "dt_proj.weight": (inner, r),
        "dt_proj.bias": (inner,),
        "A_log": (inner, n),
        "D": (inner,),
        "out_proj.weight": (dim, inner),
    }
    if a["conv_bias"]:
        w["conv1d.bias"] = (inner,)
    if a["bias"]:
        w["in_proj.bias"] = (2 * inner,)
        w["out_proj.bias"] = (dim,)
    if a["dt_norms"]:
        w["dt_layernorm.weight"] = (r,)
        w["b_layernorm.weight"] = (n,)
        w["c_layernorm.weight"] = (n,)
    return w


def _flops(a: Args, seq_len: int) -> int:
    proj = sum(numel(s) for k, s in _weights(a).items() if k.endswith("proj.weight"))
    inner, n = a["inner"], a["state"]
    # the projections, the depthwise convolution, and per state element of the scan
    # the decay, the drive, the update and the read-out (about 8 FLOPs), plus the gate
    return 2 * proj + 2 * inner * a["conv"] + 8 * inner * n + 6 * inner


def _ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    out = {"dim": a["dim"], "state": a["state"], "conv": a["conv"], "expand": a["expand"],
           "inner": a["inner"], "dt_rank": a["dt_rank"], "conv_bias": a["conv_bias"],
           "bias": a["bias"]}
    if a["dt_norms"]:
        out["norm_eps"] = a["norm_eps"]
    return out


def _jamba_args(config, note) -> list[tuple[str, Any, str | None]]:
    """The mixer's arguments from a JambaConfig's mamba_* fields."""
    out: list[tuple[str, Any, str | None]] = []
    for arg, key, default in (("state", "mamba_d_state", 16), ("conv", "mamba_d_conv", 4),
                              ("expand", "mamba_expand", 2)):
        if config.get(key, default) != default:
            out.append((arg, config[key], note(key)))
    rank = config.get("mamba_dt_rank", "auto")
    if rank != "auto" and rank != math.ceil(config["hidden_size"] / 16):
        out.append(("dt_rank", rank, note("mamba_dt_rank")))
    if not config.get("mamba_conv_bias", True):
        out.append(("conv_bias", False, None))
    if config.get("mamba_proj_bias", False):
        out.append(("bias", True, None))
    out.append(("dt_norms", True, None))
    out.append(("norm_eps", config.get("rms_norm_eps", 1e-6), note("rms_norm_eps")))
    return out


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E160: the convolution needs a kernel of at least 2 (1 has no past to carry)."""
    if comp.args["conv"] == 1:
        diags.error("E160", "mamba's conv = 1 has no past to convolve: use 2 or more",
                    comp.arg_spans.get("conv", comp.span),
                    hint="Mamba and Jamba use conv = 4")


OPS = (
    OpDef(
        name="mamba",
        doc="Mamba-1 selective-scan sequence mixer (Jamba's), a block's mixer in place "
            "of attention.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("state", "size", 16, doc="SSM state size per channel (d_state)"),
            ArgSpec("conv", "size", 4, doc="causal convolution width (d_conv)"),
            ArgSpec("expand", "size", 2, doc="inner width = expand · dim"),
            ArgSpec("inner", "size", derived=True, doc="inner width (default: expand · dim)"),
            ArgSpec("dt_rank", "size", derived=True,
                    doc="rank of the time-step projection (default: ceil(dim / 16))"),
            ArgSpec("conv_bias", "bool", True, doc="bias on the convolution"),
            ArgSpec("bias", "bool", False, doc="biases on in_proj and out_proj"),
            ArgSpec("dt_norms", "bool", False,
                    doc="RMSNorm on dt, B and C before the scan (Jamba)"),
            ArgSpec("norm_eps", "float", 1e-6, min=0.0, max=1.0, doc="eps of those norms"),
        ),
        sizes=("dim", "state", "conv", "expand", "inner", "dt_rank"),
        derive=_derive,
        derived_code={"inner": "{expand} * {dim}", "dt_rank": "-(-{dim} // 16)"},
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_weights,
        flops=_flops,
        # a state per sequence, not per token: the last conv - 1 inputs and the SSM state
        state_elems=lambda a: a["inner"] * (a["conv"] - 1) + a["inner"] * a["state"],
        # the scan's backward: fp32 gradients of the stacked states, the decays and the
        # drives, (B, S, inner, state) each, alive together
        backward_bytes=lambda a, seq_len: 3 * 4 * a["inner"] * a["state"],
        class_name="Mamba",
        ctor=_ctor,
        call='{m}({x}{kv}, padding=attn_mask["padding"])',
        reads_padding=True,
        caches=True, cache_class="MambaCache", cache_args=("inner", "conv", "state"),
        check=_check,
        tp_unsupported="the scan's x_proj reads every channel of the inner width; "
                       "split the model by fsdp or pipeline stages instead",
        features=lambda a: frozenset({"dt_norms"} if a["dt_norms"] else ()),
        foreign={"hf": Foreign("mamba_mixer", args=_jamba_args)},
    ),
)
