"""The gated DeltaNet sequence mixer (Qwen3-Next's linear attention): a block's mixer in
place of attention, holding a fixed-size state per sequence when decoding."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def _derive(a: dict[str, Any]) -> None:
    if a.get("v_heads") is None:
        a["v_heads"] = a["qk_heads"]
    if a.get("v_head_dim") is None:
        a["v_head_dim"] = a["qk_head_dim"]


def _key_dim(a: Args) -> int:
    return a["qk_heads"] * a["qk_head_dim"]


def _value_dim(a: Args) -> int:
    return a["v_heads"] * a["v_head_dim"]


def _conv_dim(a: Args) -> int:
    return 2 * _key_dim(a) + _value_dim(a)


def _weights(a: Args) -> dict[str, Shape]:
    dim, hv = a["dim"], a["v_heads"]
    return {
        "in_proj_qkvz.weight": (2 * _key_dim(a) + 2 * _value_dim(a), dim),
        "in_proj_ba.weight": (2 * hv, dim),
        "conv1d.weight": (_conv_dim(a), 1, a["conv"]),
        "dt_bias": (hv,),
        "A_log": (hv,),
        "norm.weight": (a["v_head_dim"],),
        "out_proj.weight": (dim, _value_dim(a)),
    }


def _flops(a: Args, seq_len: int) -> int:
    proj = sum(numel(s) for k, s in _weights(a).items() if k.endswith("proj.weight"))
    hv, dk, dv = a["v_heads"], a["qk_head_dim"], a["v_head_dim"]
    keys = (min(a["chunk"], seq_len) + 1) / 2
    # within a chunk, per pair of positions: β k·k and q·k (Dk each), the two triangular
    # solves (Dk + Dv) and the scores times the new values (Dv); across chunks the state
    # read by w and by q, and written by k (Dk·Dv each)
    scan = hv * (keys * (3 * dk + 2 * dv) + 3 * dk * dv)
    return int(2 * proj + 2 * _conv_dim(a) * a["conv"] + 2 * scan)


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E160: a convolution of width 1; E175: the value heads split evenly over the
    query/key heads."""
    a, spans = comp.args, comp.arg_spans
    if a["conv"] == 1:
        diags.error("E160", "gated_deltanet's conv = 1 has no past to convolve: use 2 or more",
                    spans.get("conv", comp.span), hint="Qwen3-Next uses conv = 4")
    if min(a["qk_heads"], a["v_heads"]) > 0 and a["v_heads"] % a["qk_heads"]:
        diags.error("E175", f"v_heads {a['v_heads']} is not a multiple of qk_heads "
                    f"{a['qk_heads']}", spans.get("v_heads", spans.get("qk_heads", comp.span)),
                    hint="each query/key head serves an equal group of value heads")


def _qwen3_next_args(config, note) -> list[tuple[str, Any, str | None]]:
    """The mixer's arguments from a Qwen3NextConfig."""
    out: list[tuple[str, Any, str | None]] = [
        ("qk_heads", config.get("linear_num_key_heads", 16), note("linear_num_key_heads")),
        ("v_heads", config.get("linear_num_value_heads", 32), note("linear_num_value_heads")),
        ("qk_head_dim", config.get("linear_key_head_dim", 128), note("linear_key_head_dim")),
        ("v_head_dim", config.get("linear_value_head_dim", 128), note("linear_value_head_dim")),
    ]
    if config.get("linear_conv_kernel_dim", 4) != 4:
        out.append(("conv", config["linear_conv_kernel_dim"], note("linear_conv_kernel_dim")))
    out.append(("norm_eps", config.get("rms_norm_eps", 1e-6), note("rms_norm_eps")))
    return out


OPS = (
    OpDef(
        name="gated_deltanet",
        doc="Gated DeltaNet sequence mixer (Qwen3-Next's linear attention) with a chunked "
            "delta rule, a block's mixer in place of attention.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("qk_heads", "size", doc="query/key heads (HF linear_num_key_heads)"),
            ArgSpec("v_heads", "size", derived=True,
                    doc="value heads (HF linear_num_value_heads; default: qk_heads)"),
            ArgSpec("qk_head_dim", "size", 128,
                    doc="channels per query/key head (HF linear_key_head_dim)"),
            ArgSpec("v_head_dim", "size", derived=True,
                    doc="channels per value head (HF linear_value_head_dim; default: "
                        "qk_head_dim)"),
            ArgSpec("conv", "size", 4, doc="causal convolution width (HF linear_conv_kernel_dim)"),
            ArgSpec("chunk", "size", 64, doc="delta-rule chunk length"),
            ArgSpec("norm_eps", "float", 1e-6, min=0.0, max=1.0,
                    doc="eps of the gated output norm"),
        ),
        sizes=("dim", "qk_heads", "v_heads", "qk_head_dim", "v_head_dim", "conv", "chunk"),
        derive=_derive,
        derived_code={"v_heads": "{qk_heads}", "v_head_dim": "{qk_head_dim}"},
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_weights,
        flops=_flops,
        # a state per sequence: the convolution's last conv - 1 inputs and a
        # (qk_head_dim, v_head_dim) matrix per value head
        state_elems=lambda a: _conv_dim(a) * (a["conv"] - 1)
        + a["v_heads"] * a["qk_head_dim"] * a["v_head_dim"],
        class_name="GatedDeltaNet",
        ctor=lambda a, u: {"dim": a["dim"], "qk_heads": a["qk_heads"], "v_heads": a["v_heads"],
                           "qk_head_dim": a["qk_head_dim"], "v_head_dim": a["v_head_dim"],
                           "conv": a["conv"], "chunk": a["chunk"], "norm_eps": a["norm_eps"]},
        call='{m}({x}{kv}, padding=attn_mask["padding"])',
        reads_padding=True,
        caches=True, cache_class="DeltaNetCache",
        cache_args=("qk_heads", "v_heads", "qk_head_dim", "v_head_dim", "conv"),
        check=_check,
        tp_unsupported="its convolution runs over all query, key and value channels at once, "
                       "which in_proj_qkvz packs per query/key head; split the model by fsdp "
                       "or pipeline stages instead",
        foreign={"hf": Foreign("gated_deltanet_mixer", args=_qwen3_next_args)},
    ),
)
