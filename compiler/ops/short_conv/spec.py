"""A gated causal short convolution (LFM2's): a block's mixer in place of attention,
holding its last inputs per sequence when decoding."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden


def _weights(a: Args) -> dict[str, Shape]:
    dim, k = a["dim"], a["kernel"]
    w: dict[str, Shape] = {"conv.weight": (dim, 1, k), "in_proj.weight": (3 * dim, dim),
                           "out_proj.weight": (dim, dim)}
    if a["bias"]:
        w.update({"conv.bias": (dim,), "in_proj.bias": (3 * dim,), "out_proj.bias": (dim,)})
    return w


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E160: a kernel of 1 has no past to convolve."""
    if comp.args["kernel"] == 1:
        diags.error("E160", "short_conv's kernel = 1 has no past to convolve: use 2 or more",
                    comp.arg_spans.get("kernel", comp.span), hint="LFM2 uses kernel = 3")


def _lfm2_args(config, note) -> list[tuple[str, Any, str | None]]:
    out: list[tuple[str, Any, str | None]] = [
        ("kernel", config.get("conv_L_cache", 3), note("conv_L_cache"))]
    if config.get("conv_bias", False):
        out.append(("bias", True, None))
    return out


OPS = (
    OpDef(
        name="short_conv",
        doc="Gated causal short convolution (LFM2), a block's mixer in place of attention.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("kernel", "size", 3, doc="convolution width (HF conv_L_cache)"),
            ArgSpec("bias", "bool", False, doc="biases on the projections and the convolution"),
        ),
        sizes=("dim", "kernel"),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_weights,
        # the projections (4·dim² multiply-adds), the convolution and the two gates
        flops=lambda a, s: 2 * 4 * a["dim"] ** 2 + 2 * a["dim"] * a["kernel"] + 2 * a["dim"],
        state_elems=lambda a: a["dim"] * (a["kernel"] - 1),
        class_name="ShortConv",
        ctor=lambda a, u: {"dim": a["dim"], "kernel": a["kernel"], "bias": a["bias"]},
        call='{m}({x}{kv}, padding=attn_mask["padding"])',
        reads_padding=True,
        caches=True, cache_class="ConvCache", cache_args=("dim", "kernel"),
        check=_check,
        tp_unsupported="in_proj packs the gates B, C and the input along its output; "
                       "split the model by fsdp or pipeline stages instead",
        foreign={"hf": Foreign("conv_mixer", args=_lfm2_args)},
    ),
)
