"""Multi-head latent attention (DeepSeek-V2 / V3): keys and values expanded from a
compressed latent, which is what the KV cache holds."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def _qk_dim(a: Args) -> int:
    return a["qk_nope_head_dim"] + a["qk_rope_head_dim"]


def _mla_weights(a: Args) -> dict[str, Shape]:
    dim, h, r = a["dim"], a["heads"], a["kv_lora_rank"]
    rope, v = a["qk_rope_head_dim"], a["v_head_dim"]
    w: dict[str, Shape] = {}
    if a["q_lora_rank"]:
        q = a["q_lora_rank"]
        w["q_a_proj.weight"] = (q, dim)
        if a["bias"]:
            w["q_a_proj.bias"] = (q,)
        w["q_a_layernorm.weight"] = (q,)
        w["q_b_proj.weight"] = (h * _qk_dim(a), q)
    else:
        w["q_proj.weight"] = (h * _qk_dim(a), dim)
    w["kv_a_proj_with_mqa.weight"] = (r + rope, dim)
    if a["bias"]:
        w["kv_a_proj_with_mqa.bias"] = (r + rope,)
    w["kv_a_layernorm.weight"] = (r,)
    w["kv_b_proj.weight"] = (h * (a["qk_nope_head_dim"] + v), r)
    w["o_proj.weight"] = (dim, h * v)
    if a["bias"]:
        w["o_proj.bias"] = (dim,)
    return w


def _mla_flops(a: Args, seq_len: int) -> int:
    """The projections (the latent expanded once per token, as in training), then
    QK^T over qk_nope + qk_rope and attention·V over v_head_dim per key."""
    proj = 2 * sum(numel(s) for k, s in _mla_weights(a).items()
                   if k.endswith("proj.weight") or k.endswith("mqa.weight"))
    keys = (seq_len + 1) / 2  # causal: the average query sees half the sequence
    return int(proj + 2 * a["heads"] * (_qk_dim(a) + a["v_head_dim"]) * keys)


def _mla_backward_bytes(a: Args, seq_len: int) -> int:
    """Keys and values of different head dims: SDPA runs its math path (torch's CPU
    flash kernel takes one head dim), whose backward holds two fp32 gradients of the
    (B, heads, S, S) scores."""
    return 2 * 4 * a["heads"] * seq_len if _qk_dim(a) != a["v_head_dim"] else 0


def _features(a: Args) -> frozenset[str]:
    return frozenset({"latent_q" if a["q_lora_rank"] else "direct_q",
                      "interleaved_rope" if a["rope_interleave"] else "half_split_rope"}
                     | ({"latent_scale"} if a["scale"] is not None else set()))


def _ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    out = {"dim": a["dim"], "heads": a["heads"], "kv_lora_rank": a["kv_lora_rank"],
           "qk_nope_head_dim": a["qk_nope_head_dim"],
           "qk_rope_head_dim": a["qk_rope_head_dim"], "v_head_dim": a["v_head_dim"]}
    if "latent_q" in u:
        out["q_lora_rank"] = a["q_lora_rank"]
    if {"interleaved_rope", "half_split_rope"} <= u:
        out["rope_interleave"] = a["rope_interleave"]
    out["bias"] = a["bias"]
    out["norm_eps"] = a["norm_eps"]
    if a["scale"] is not None:
        out["scale"] = a["scale"]
    return out


def _check(comp: Any, model: Any, diags: Any) -> None:
    """E150: the rope is built for the rotated part of a head (qk_rope_head_dim);
    E151: that part rotates whole (no partial rotary inside it)."""
    a, spans = comp.args, comp.arg_spans
    if a["scale"] is not None and a["scale"] <= 0:
        diags.error("E146", f"attention scale {a['scale']} is not positive",
                    spans.get("scale", comp.span),
                    hint="the scores are q·k times scale; DeepSeek's is "
                    "mscale² / sqrt(qk_nope_head_dim + qk_rope_head_dim)")
    rope = a["rope"].component
    where = spans.get("rope", comp.span)
    if "positions" not in rope.op.slots:
        diags.error("E150", f"multi-head latent attention takes a rope, not "
                    f"{rope.op.name} '{rope.name}'", where)
        return
    if not rope.ok or min(rope.args["head_dim"], a["qk_rope_head_dim"]) <= 0:
        return  # non-positive sizes are reported by positive_sizes
    if rope.args["head_dim"] != a["qk_rope_head_dim"]:
        diags.error("E150", f"rope '{rope.name}' is built for head_dim "
                    f"{rope.args['head_dim']} but this attention rotates "
                    f"qk_rope_head_dim {a['qk_rope_head_dim']} channels", where,
                    notes=[("rope declared here", rope.span)],
                    hint=f"rope(head_dim = {a['qk_rope_head_dim']}, ...): only the "
                    "rope part of a query or key head turns")
    elif rope.args["rotary_dim"] != rope.args["head_dim"]:
        diags.error("E151", f"rope '{rope.name}' rotates {rope.args['rotary_dim']} of its "
                    f"{rope.args['head_dim']} channels; multi-head latent attention "
                    "rotates its whole rope part", where,
                    notes=[("rope declared here", rope.span)],
                    hint="drop rotary_dim: qk_nope_head_dim already holds the channels "
                    "without positions")


OPS = (
    OpDef(
        name="mla",
        doc="Multi-head latent attention (DeepSeek-V2/V3): queries through an optional "
            "low-rank bottleneck, keys and values expanded per head from a normalised "
            "kv_lora_rank latent plus one shared rotated key of qk_rope_head_dim; the KV "
            "cache holds the latent and the rotated key.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("heads", "size", doc="query (and key/value) heads"),
            ArgSpec("kv_lora_rank", "size", doc="width of the compressed key/value latent"),
            ArgSpec("qk_nope_head_dim", "size", doc="per-head query/key channels without "
                    "positions"),
            ArgSpec("qk_rope_head_dim", "size", doc="per-head query/key channels that rotate "
                    "(the key's are shared by all heads)"),
            ArgSpec("v_head_dim", "size", doc="per-head value width"),
            ArgSpec("rope", "ref:rope", doc="a rope component built for qk_rope_head_dim"),
            ArgSpec("q_lora_rank", "int", 0, min=0,
                    doc="width of the query bottleneck; 0: queries projected directly"),
            ArgSpec("rope_interleave", "bool", True,
                    doc="channel pairs (0, 1), (2, 3), ... rotate (DeepSeek's layout); "
                    "false: the halves (0, d/2), ..."),
            ArgSpec("bias", "bool", False, doc="biases on q_a_proj, kv_a_proj_with_mqa and "
                    "o_proj"),
            ArgSpec("norm_eps", "float", 1e-6, min=0.0, max=1.0,
                    doc="eps of the RMSNorms on the query and key/value latents"),
            ArgSpec("scale", "float", None, min=0.0,
                    doc="scale of the scores q·k (default 1/sqrt(qk_nope_head_dim + "
                        "qk_rope_head_dim); DeepSeek's YaRN multiplies it by "
                        "mscale(scale_factor, mscale_all_dim)²)"),
        ),
        sizes=("dim", "heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim"),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_mla_weights,
        flops=_mla_flops,
        backward_bytes=_mla_backward_bytes,
        # the cache holds the normalised latent and the rotated shared key
        kv_elems=lambda a: a["kv_lora_rank"] + a["qk_rope_head_dim"],
        class_name="MLA",
        code=("MLA", "LatentCache"),
        cache_class="LatentCache", cache_args=("kv_lora_rank", "qk_rope_head_dim"),
        # per head: q_b_proj / kv_b_proj rows and o_proj columns; the latents are
        # computed whole on every rank (their projections are small)
        tp={"q_proj": "colwise", "q_b_proj": "colwise", "kv_b_proj": "colwise",
            "o_proj": "rowwise"},
        ctor=_ctor,
        call='{m}({x}, rope_cos, rope_sin, attn_mask["causal"]{kv})',
        mask=lambda a: "causal", caches=True, check=_check, split_by={"tp": ("heads",)},
        features=_features,
        # DeepSeek-V2 / V3's self-attention (q_lora_rank, kv_lora_rank, qk_nope_head_dim,
        # qk_rope_head_dim, v_head_dim, rope_interleave, attention_bias in their config);
        # its weights keep their Hugging Face names: self_attn.q_a_proj, q_a_layernorm,
        # q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
        # (the families whose configs say kv_lora_rank choose it; the others' plain attention)
        foreign={"hf": Foreign("self_attention", {"model_type": ("deepseek_v3", "deepseek_v2",
                                                                        "glm4_moe_lite",
                                                                        "sarvam_mla")},
                               {"heads": "num_attention_heads",
                                "q_lora_rank": "q_lora_rank",
                                "kv_lora_rank": "kv_lora_rank",
                                "qk_nope_head_dim": "qk_nope_head_dim",
                                "qk_rope_head_dim": "qk_rope_head_dim",
                                "v_head_dim": "v_head_dim",
                                "rope_interleave": "rope_interleave",
                                "bias": "attention_bias"})},
    ),
)
