"""Multi-head / grouped-query self-attention."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def _attention_derive(a: dict[str, Any]) -> None:
    if a.get("kv_heads") is None:
        a["kv_heads"] = a["heads"]
    if a.get("head_dim") is None:
        dim, heads = a["dim"], a["heads"]
        # Not divisible: left unset, reported with its location by this op's check (E070).
        a["head_dim"] = dim // heads if heads and heads > 0 and dim % heads == 0 else None
        a["_head_dim_derived"] = True
    else:
        a["_head_dim_derived"] = False


def _attention_weights(a: Args) -> dict[str, Shape]:
    dim, hd, h, kv = a["dim"], a["head_dim"], a["heads"], a["kv_heads"]
    if hd is None:
        return {}
    q_rows = 2 * h * hd if a["output_gate"] else h * hd  # each head's query, then its gate
    w: dict[str, Shape] = {
        "q_proj.weight": (q_rows, dim),
        "k_proj.weight": (kv * hd, dim),
        "v_proj.weight": (kv * hd, dim),
        "o_proj.weight": (dim, h * hd),
    }
    if a["qkv_bias"]:
        w["q_proj.bias"] = (q_rows,)
        w["k_proj.bias"] = (kv * hd,)
        w["v_proj.bias"] = (kv * hd,)
    if a["out_bias"]:
        w["o_proj.bias"] = (dim,)
    if a["qk_norm"] and a["qk_norm_over"] == "projection":
        w["q_norm.weight"] = (h * hd,)
        w["k_norm.weight"] = (kv * hd,)
    elif a["qk_norm"]:
        w["q_norm.weight"] = (hd,)
        w["k_norm.weight"] = (hd,)
        if a["qk_norm_kind"] == "layer":
            w["q_norm.bias"] = (hd,)
            w["k_norm.bias"] = (hd,)
    if a["sinks"]:
        w["sinks"] = (h,)
    if a["out_norm"]:
        w["out_norm.weight"] = (h * hd,)
    return w


def attended_keys(seq_len: int, causal: bool, window: int) -> float:
    """Average number of keys a query attends to over a sequence of `seq_len`."""
    if not causal:
        return float(min(seq_len, window) if window else seq_len)
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    # the first `window` queries see 1..window keys, the rest see `window`
    full = seq_len - window
    return (window * (window + 1) / 2 + full * window) / seq_len


def mask_key(a: Args) -> str:
    """Which attention mask an attention op reads: one per (causality, window)."""
    base = "causal" if a["causal"] else "full"
    return f"{base}_w{a['window']}" if a["window"] else base


def _attention_flops(a: Args, seq_len: int) -> int:
    hd = a["head_dim"]
    if hd is None:
        return 0
    proj = 2 * sum(numel(s) for k, s in _attention_weights(a).items() if k.endswith("proj.weight"))
    keys = attended_keys(seq_len, a["causal"], a["window"])
    # QK^T and attention·V: 2 FLOPs per multiply-add, each heads·head_dim per key
    return int(proj + 2 * 2 * a["heads"] * hd * keys)


def _attention_backward_bytes(a: Args, seq_len: int) -> int:
    """Soft-capped scores and sinks are computed as a (B, heads, S, S) tensor (a sink's
    learned logit makes SDPA's mask need a gradient, which only its math path gives):
    their backward holds two fp32 gradients of that size. SDPA's fused kernels hold
    none."""
    if a["softcap"] > 0 or a["sinks"]:
        return 2 * 4 * a["heads"] * seq_len
    return 0


def _two_bases(rope: Any) -> bool:
    """The rope an attention names has a second base for local layers (`local_theta`):
    its tables then hold both bases' angles, and every attention picks its half."""
    return rope is not None and bool(rope.component.args.get("local_theta"))


def _tp_refusal(a: Args) -> str:
    """Tensor parallelism splits the heads: a norm over all heads at once cannot run on a
    rank's share of them."""
    if a["qk_norm"] and a["qk_norm_over"] == "projection":
        return ("its qk-norm spans the whole projection, every head at once (qk_norm_over = "
                "projection); split the model by fsdp or pipeline stages instead")
    if a["out_norm"]:
        return ("its out_norm spans every head's output at once; split the model by fsdp or "
                "pipeline stages instead")
    if a["sinks"]:
        return ("its learned sinks are one parameter for all heads, which the plans' "
                "tensor-parallel layout does not split; split the model by fsdp or pipeline "
                "stages instead")
    return ""


def _features(a: Args) -> frozenset[str]:
    rope = a["rope"]
    partial = rope is not None and rope.component.args.get("rotary_dim", a["head_dim"]) \
        != a["head_dim"]
    return frozenset(f for f, on in (("qk_norm", a["qk_norm"]), ("rope", rope is not None),
                                     ("no_rope", rope is None), ("partial_rotary", partial),
                                     ("zero_init", a["zero_init"]),
                                     ("query_scale", a["scale"] is not None),
                                     ("attn_softcap", a["softcap"] > 0),
                                     ("unit_offset", a["qk_norm"] and a["qk_norm_unit_offset"]),
                                     ("local_rope", _two_bases(rope)),
                                     ("clip_qkv", a["clip_qkv"] > 0),
                                     ("qk_norm_projection", a["qk_norm"]
                                      and a["qk_norm_over"] == "projection"),
                                     ("sinks", a["sinks"]),
                                     ("output_gate", a["output_gate"]),
                                     ("late_qk_norm", a["qk_norm"]
                                      and a["qk_norm_after_rope"]),
                                     ("out_norm", a["out_norm"]),
                                     ("layer_qk_norm", a["qk_norm"]
                                      and a["qk_norm_kind"] == "layer"),
                                     ("attn_bias", a["qkv_bias"] or a["out_bias"]))
                     if on)


def _ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    out = {"dim": a["dim"], "heads": a["heads"], "kv_heads": a["kv_heads"],
           "head_dim": a["head_dim"], "causal": a["causal"],
           "qkv_bias": a["qkv_bias"], "out_bias": a["out_bias"]}
    if a["qk_norm"]:
        out["qk_norm_eps"] = a["qk_norm_eps"]
    if {"rope", "no_rope"} <= u:
        out["use_rope"] = a["rope"] is not None
    if "zero_init" in u:
        out["zero_init"] = a["zero_init"]
    if a["scale"] is not None:
        out["scale"] = a["scale"]
    if a["softcap"] > 0:
        out["softcap"] = a["softcap"]
    if a["qk_norm"] and a["qk_norm_unit_offset"]:
        out["qk_norm_unit_offset"] = True
    if a["local_rope"]:
        out["local_rope"] = True
    if "clip_qkv" in u:
        out["clip_qkv"] = a["clip_qkv"]
    if "qk_norm_projection" in u:
        out["qk_norm_projection"] = bool(a["qk_norm"] and a["qk_norm_over"] == "projection")
    if "sinks" in u:
        out["sinks"] = a["sinks"]
    if a["output_gate"]:
        out["output_gate"] = True
    if a["out_norm"]:
        out["out_norm_eps"] = a["out_norm_eps"]
    if "layer_qk_norm" in u:
        out["qk_layernorm"] = bool(a["qk_norm"] and a["qk_norm_kind"] == "layer")
    if "late_qk_norm" in u:
        out["qk_norm_after_rope"] = bool(a["qk_norm"] and a["qk_norm_after_rope"])
    return out


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E070/E071: the width splits evenly into heads, and heads into KV groups;
    E078/E075: the rope it names is its section's kind and fits its heads."""
    a, spans = comp.args, comp.arg_spans
    dim, heads, kv = a["dim"], a["heads"], a["kv_heads"]
    if a["qk_norm_over"] == "projection" and not a["qk_norm"]:
        diags.error("E082", "qk_norm_over = projection without qk_norm = true",
                    spans.get("qk_norm_over", comp.span),
                    hint="add qk_norm = true, or leave qk_norm_over out")
    if min(dim, heads, kv) > 0:  # else reported by positive_sizes
        if a["_head_dim_derived"] and dim % heads:
            near = [h for h in range(max(1, heads - 8), heads + 9) if dim % h == 0]
            diags.error("E070", f"dim {dim} is not divisible by heads {heads}",
                        spans.get("heads", comp.span),
                        hint="set head_dim explicitly" + (
                            f", or use heads = {min(near, key=lambda h: abs(h - heads))}"
                            if near else ""))
        if heads % kv:
            diags.error("E071", f"heads {heads} is not a multiple of kv_heads {kv}",
                        spans.get("kv_heads", spans.get("heads", comp.span)),
                        hint="each KV head serves an equal group of query heads")
    if a["qk_norm_kind"] != "rms" and not a["qk_norm"]:
        diags.error("E192", f"qk_norm_kind = {a['qk_norm_kind']} without a qk-norm",
                    spans.get("qk_norm_kind", comp.span),
                    hint="add qk_norm = true, or leave qk_norm_kind out")
    elif a["qk_norm_kind"] == "layer" and (a["qk_norm_over"] == "projection"
                                           or a["qk_norm_unit_offset"]):
        other = ("qk_norm_over" if a["qk_norm_over"] == "projection"
                 else "qk_norm_unit_offset")
        diags.error("E193", f"a LayerNorm qk-norm (qk_norm_kind = layer) with {other}",
                    spans.get(other, comp.span),
                    hint="the LayerNorm qk-norm is per head and scales by its weight")
    if a["qk_norm_after_rope"] and not a["qk_norm"]:
        diags.error("E190", "qk_norm_after_rope without a qk-norm",
                    spans.get("qk_norm_after_rope", comp.span),
                    hint="add qk_norm = true, or leave qk_norm_after_rope out")
    if a["qk_norm_unit_offset"] and not a["qk_norm"]:
        diags.error("E145", "qk_norm_unit_offset without a qk-norm",
                    spans.get("qk_norm_unit_offset", comp.span),
                    hint="add qk_norm = true, or leave qk_norm_unit_offset out")
    if a["scale"] is not None and a["scale"] <= 0:
        diags.error("E146", f"attention scale {a['scale']} is not positive",
                    spans.get("scale", comp.span),
                    hint="the scores are q·k times scale; Gemma's is "
                    "1 / sqrt(query_pre_attn_scalar)")
    if a["local_rope"] and not _two_bases(a.get("rope")):
        rope_name = a["rope"].component.name if a.get("rope") is not None else None
        diags.error("E079", "local_rope = true, but " + (
                    f"rope '{rope_name}' has no second base" if rope_name
                    else "this attention has no rope"),
                    spans.get("local_rope", comp.span),
                    hint="give the rope a local_theta (rope(..., local_theta = 10000.0))")
    if a.get("rope") is None:
        return
    rope = a["rope"].component
    kind = model.kind
    slot = "vision_positions" if kind == "vision" else "positions"
    if slot not in rope.op.slots:
        wanted = "rope2d" if kind == "vision" else "rope"
        diags.error("E078", f"a {kind} section's attention takes a {wanted}, not "
                    f"{rope.op.name} '{rope.name}'", spans.get("rope", comp.span),
                    hint="rope2d turns with patch rows and columns: vision encoders "
                    "only" if kind != "vision" else "an image has rows and columns: "
                    "use rope2d(head_dim, grid)")
        return
    if not rope.ok or a["head_dim"] is None or rope.args["head_dim"] <= 0:
        return  # a non-positive head_dim is reported by positive_sizes
    if rope.args["head_dim"] != a["head_dim"]:
        diags.error("E075", f"rope '{rope.name}' is built for head_dim "
                    f"{rope.args['head_dim']} but this attention has head_dim "
                    f"{a['head_dim']}", spans.get("rope", comp.span),
                    notes=[("rope declared here", rope.span)])


OPS = (
    OpDef(
        name="attention",
        doc="Multi-head / grouped-query attention with optional RoPE, qk-norm and window.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("heads", "size", doc="query heads"),
            ArgSpec("kv_heads", "size", derived=True, doc="key/value heads (default: heads)"),
            ArgSpec("head_dim", "size", derived=True, doc="per-head width (default: dim / heads)"),
            ArgSpec("rope", "ref:rope|rope2d", None,
                    doc="a rope (or, in a vision encoder, rope2d) component; none for no positions"),
            ArgSpec("causal", "bool", True),
            ArgSpec("window", "int", 0, min=0, doc="sliding-window size; 0 for full attention"),
            ArgSpec("qkv_bias", "bool", False),
            ArgSpec("out_bias", "bool", False),
            ArgSpec("qk_norm", "bool", False, doc="per-head RMSNorm on q and k before RoPE"),
            ArgSpec("qk_norm_eps", "float", 1e-5, min=0.0, max=1.0),
            ArgSpec("qk_norm_over", "choice", "head", choices=("head", "projection"),
                    doc="the qk-norm's span: each head, or the whole projection (OLMo 2)"),
            ArgSpec("zero_init", "bool", False, doc="zero-initialise o_proj (starts as identity)"),
            ArgSpec("scale", "float", None, min=0.0,
                    doc="scale of the scores q·k (default 1/sqrt(head_dim); Granite's "
                    "attention_multiplier, Gemma's 1/sqrt(query_pre_attn_scalar))"),
            ArgSpec("softcap", "float", 0.0, min=0.0,
                    doc="soft-cap the scores: softcap · tanh(scores / softcap); 0 for none"),
            ArgSpec("qk_norm_unit_offset", "bool", False,
                    doc="the qk-norms scale by 1 + weight (Gemma 3)"),
            ArgSpec("local_rope", "bool", False,
                    doc="turn with the rope's second base, local_theta (Gemma 3's local layers)"),
            ArgSpec("clip_qkv", "float", 0.0, min=0.0,
                    doc="clamp q, k and v to ±clip_qkv after the projections; 0: no clamp"),
            ArgSpec("sinks", "bool", False,
                    doc="a learned sink logit per head in each softmax (gpt-oss)"),
            ArgSpec("output_gate", "bool", False,
                    doc="q_proj also yields a gate per channel: the output times "
                        "sigmoid(gate) before o_proj (Qwen3-Next)"),
            ArgSpec("qk_norm_after_rope", "bool", False,
                    doc="the qk-norm follows RoPE instead of preceding it (HunYuan)"),
            ArgSpec("qk_norm_kind", "choice", "rms", choices=("rms", "layer"),
                    doc="the qk-norm: an RMSNorm, or a LayerNorm with a bias (Persimmon)"),
            ArgSpec("out_norm", "bool", False,
                    doc="an RMSNorm over all the heads' output before o_proj (BitNet)"),
            ArgSpec("out_norm_eps", "float", 1e-5, min=0.0, max=1.0),
        ),
        sizes=("dim", "heads", "kv_heads", "head_dim"),
        derive=_attention_derive,
        derived_code={"kv_heads": "{heads}", "head_dim": "{dim} // {heads}"},
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_attention_weights,
        flops=_attention_flops,
        backward_bytes=_attention_backward_bytes,
        kv_elems=lambda a: 2 * a["kv_heads"] * (a["head_dim"] or 0) if a["causal"] else 0,
        causal=lambda a: bool(a["causal"]),
        class_name="Attention",
        tp={"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
        tp_unsupported=_tp_refusal,
        ctor=_ctor,
        call='{m}({x}, rope_cos, rope_sin, attn_mask["{mask_key}"]{kv})',
        call_fields=lambda a: {"mask_key": mask_key(a)},
        mask=mask_key, caches=True, check=_check, split_by={"tp": ("heads", "kv_heads")},
        features=_features,
        # the self-attention of a Hugging Face / KempnerForge decoder layer
        foreign={"hf": Foreign("self_attention"), "kf": Foreign("self_attention")},
    ),
)
