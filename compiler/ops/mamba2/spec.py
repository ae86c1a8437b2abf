"""The Mamba-2 (SSD) sequence mixer: a block's mixer in place of attention, holding a
fixed-size state per sequence when decoding."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def _derive(a: dict[str, Any]) -> None:
    if a.get("inner") is None:
        a["inner"] = a["heads"] * a["head_dim"]


def _conv_dim(a: Args) -> int:
    return a["inner"] + 2 * a["groups"] * a["state"]


def _weights(a: Args) -> dict[str, Shape]:
    dim, inner, h, conv_dim = a["dim"], a["inner"], a["heads"], _conv_dim(a)
    w: dict[str, Shape] = {
        "in_proj.weight": (inner + conv_dim + h, dim),
        "conv1d.weight": (conv_dim, 1, a["conv"]),
        "dt_bias": (h,),
        "A_log": (h,),
        "D": (h,),
        "norm.weight": (inner,),
        "out_proj.weight": (dim, inner),
    }
    if a["conv_bias"]:
        w["conv1d.bias"] = (conv_dim,)
    if a["bias"]:
        w["in_proj.bias"] = (inner + conv_dim + h,)
        w["out_proj.bias"] = (dim,)
    return w


def _flops(a: Args, seq_len: int) -> int:
    proj = sum(numel(s) for k, s in _weights(a).items() if k.endswith("proj.weight"))
    inner, n, chunk = a["inner"], a["state"], min(a["chunk"], seq_len)
    # the projections and the convolution; the scan: within a chunk c·b per pair of
    # positions (~chunk/2 keys a query, heads·state each) and their sum over x
    # (heads·head_dim each), across chunks the state in and out (2·inner·state)
    keys = (chunk + 1) / 2
    scan = 2 * keys * (a["heads"] * n + inner) + 2 * 2 * inner * n
    return int(2 * proj + 2 * _conv_dim(a) * a["conv"] + scan)


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E160: a convolution of width 1; E162: the heads split evenly into groups."""
    a, spans = comp.args, comp.arg_spans
    if a["conv"] == 1:
        diags.error("E160", "ssd's conv = 1 has no past to convolve: use 2 or more",
                    spans.get("conv", comp.span), hint="Mamba-2 uses conv = 4")
    if min(a["heads"], a["groups"]) > 0 and a["heads"] % a["groups"]:
        diags.error("E162", f"heads {a['heads']} is not a multiple of groups {a['groups']}",
                    spans.get("groups", comp.span),
                    hint="each group's B and C serve an equal number of heads")
    if a["inner"] != a["heads"] * a["head_dim"]:
        diags.error("E162", f"inner {a['inner']} is not heads × head_dim "
                    f"({a['heads']} × {a['head_dim']})", spans.get("inner", comp.span),
                    hint="leave inner out: it is heads × head_dim")


def _mamba2_args(config, note) -> list[tuple[str, Any, str | None]]:
    """The mixer's arguments from a Mamba2Config."""
    out: list[tuple[str, Any, str | None]] = [
        ("heads", config.get("num_heads", 128), note("num_heads")),
        ("head_dim", config.get("head_dim", 64), note("head_dim")),
        ("state", config.get("state_size", 128), note("state_size")),
        ("groups", config.get("n_groups", 8), note("n_groups")),
        ("chunk", config.get("chunk_size", 256), note("chunk_size")),
    ]
    if config.get("conv_kernel", 4) != 4:
        out.append(("conv", config["conv_kernel"], note("conv_kernel")))
    if not config.get("use_conv_bias", True):
        out.append(("conv_bias", False, None))
    if config.get("use_bias", False):
        out.append(("bias", True, None))
    out.append(("norm_eps", config.get("layer_norm_epsilon", 1e-5), note("layer_norm_epsilon")))
    return out


OPS = (
    OpDef(
        name="ssd",
        doc="Mamba-2 (SSD) sequence mixer with a chunked scan, a block's mixer in place "
            "of attention.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("heads", "size", doc="SSM heads (HF num_heads)"),
            ArgSpec("head_dim", "size", 64, doc="channels per head"),
            ArgSpec("inner", "size", derived=True, doc="inner width (heads × head_dim)"),
            ArgSpec("state", "size", 128, doc="SSM state size (HF state_size)"),
            ArgSpec("groups", "size", 1, doc="groups sharing B and C (HF n_groups)"),
            ArgSpec("conv", "size", 4, doc="causal convolution width (HF conv_kernel)"),
            ArgSpec("chunk", "size", 256, doc="scan chunk length (HF chunk_size)"),
            ArgSpec("conv_bias", "bool", True, doc="bias on the convolution"),
            ArgSpec("bias", "bool", False, doc="biases on in_proj and out_proj"),
            ArgSpec("norm_eps", "float", 1e-5, min=0.0, max=1.0, doc="eps of the gated norm"),
        ),
        sizes=("dim", "heads", "head_dim", "inner", "state", "groups", "conv", "chunk"),
        derive=_derive,
        derived_code={"inner": "{heads} * {head_dim}"},
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_weights,
        flops=_flops,
        # a state per sequence: the convolution's last conv - 1 inputs and the SSM state
        state_elems=lambda a: _conv_dim(a) * (a["conv"] - 1) + a["inner"] * a["state"],
        class_name="Mamba2",
        ctor=lambda a, u: {"dim": a["dim"], "heads": a["heads"], "head_dim": a["head_dim"],
                           "state": a["state"], "groups": a["groups"], "conv": a["conv"],
                           "chunk": a["chunk"], "conv_bias": a["conv_bias"], "bias": a["bias"],
                           "norm_eps": a["norm_eps"]},
        call='{m}({x}{kv}, padding=attn_mask["padding"])',
        reads_padding=True,
        caches=True, cache_class="Mamba2Cache",
        cache_args=("heads", "head_dim", "state", "groups", "conv"),
        check=_check,
        tp_unsupported="in_proj packs the gate, x, B, C and the time steps along its "
                       "output; split the model by fsdp or pipeline stages instead",
        foreign={"hf": Foreign("mamba2_mixer", args=_mamba2_args)},
    ),
)
