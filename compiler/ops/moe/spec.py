"""Mixture of experts: token-choice routers and the routed, packed experts."""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Foreign, NestedCall, OpDef, Shape, hidden
from ..mlp.spec import SILU

SCHEDULES = ("constant", "cosine_decay", "linear_warmup")


def _router_ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in a.items()
            if not k.startswith("_") and (k != "bias" or "router_bias" in u)}


def _moe_derive(a: dict[str, Any]) -> None:
    if a.get("shared_hidden") is None:
        a["shared_hidden"] = a["hidden"]


def _moe_weights(a: Args) -> dict[str, Shape]:
    dim, width, e = a["dim"], a["hidden"], a["experts"]
    w: dict[str, Shape] = {
        "router.weight": (e, dim),
        "experts.gate_proj": (e, dim, width),
        "experts.up_proj": (e, dim, width),
        "experts.down_proj": (e, width, dim),
    }
    if a["bias"]:
        w.update({"experts.gate_bias": (e, width), "experts.up_bias": (e, width),
                  "experts.down_bias": (e, dim)})
    if a["router"] is not None and a["router"].component.args.get("bias"):
        w["router.bias"] = (e,)
    if a["shared_experts"]:
        sh = a["shared_experts"] * a["shared_hidden"]
        w.update({"shared_experts.gate_proj.weight": (sh, dim),
                  "shared_experts.up_proj.weight": (sh, dim),
                  "shared_experts.down_proj.weight": (dim, sh)})
        if a["shared_gate"]:
            w["shared_experts_gate.weight"] = (1, dim)
    return w


def _moe_active(a: Args) -> int:
    """Router, top_k experts and the shared experts."""
    dim, width, e, k = a["dim"], a["hidden"], a["experts"], a["top_k"]
    shared = 3 * dim * a["shared_experts"] * a["shared_hidden"]
    if a["shared_experts"] and a["shared_gate"]:
        shared += dim
    expert = 3 * dim * width + (2 * width + dim if a["bias"] else 0)
    router = e * dim + (e if a["router"].component.args.get("bias") else 0)
    return router + k * expert + shared


def _moe_features(a: Args) -> frozenset[str]:
    f = set()
    if a["shared_experts"]:
        f.add("shared")
        if a["shared_gate"]:
            f.add("shared_gate")
    if a["capacity_factor"]:
        f.add("capacity")
    if a["zero_init"]:
        f.add("zero_init")
    if a["bias"]:
        f.add("expert_bias")
    if a["swiglu_limit"]:
        f.add("clamped_swiglu")
    if a["router"].component.args.get("bias"):
        f.add("router_bias")
    return frozenset(f)


def _moe_ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    router = a["router"].component
    router_args = {"dim": a["dim"], "experts": a["experts"], "top_k": a["top_k"],
                   **router.op.ctor(router.args, u)}
    out: dict[str, Any] = {"dim": a["dim"], "hidden": a["hidden"], "experts": a["experts"],
                           "top_k": a["top_k"],
                           "router": NestedCall(router.op.class_name, tuple(router_args.items()))}
    if "shared" in u:  # the shared experts run as one SwiGLU of their total width
        n = a["shared_experts"]
        out["shared_hidden"] = a["shared_hidden"] if n == 1 else n * a["shared_hidden"]
    if "shared_gate" in u:
        out["shared_gate"] = a["shared_gate"]
    if "capacity" in u:
        out["capacity_factor"] = a["capacity_factor"]
    if "zero_init" in u:
        out["zero_init"] = a["zero_init"]
    if "expert_bias" in u:
        out["bias"] = a["bias"]
    if "clamped_swiglu" in u:
        out["swiglu_limit"] = a["swiglu_limit"]
        out["swiglu_alpha"] = a["swiglu_alpha"]
    return out


def _check_moe(comp: Any, model: Any, diags: Any) -> None:
    """E100: 0 < top_k ≤ experts; E102: a shared gate needs shared experts; then the
    router's own rules."""
    a, spans = comp.args, comp.arg_spans
    experts, k = a["experts"], a["top_k"]
    if experts <= 0:
        return  # reported by positive_sizes
    if not 0 < k <= experts:
        diags.error("E100", f"top_k must be in 1..{experts} (the number of experts), got {k}",
                    spans.get("top_k", comp.span))
        return
    if a["shared_gate"] and not a["shared_experts"]:
        diags.error("E102", "shared_gate = true gates the shared experts, but this moe has "
                    "none", spans.get("shared_gate", comp.span),
                    hint="add shared_experts = 1 (and shared_hidden), or leave shared_gate out")
    router = a["router"].component
    if router.op.check is not None:
        router.op.check(router, comp, diags)


def _check_groups(router: Any, moe: Any, diags: Any) -> None:
    """E101: the groups divide the experts evenly, a token may use at most all groups,
    and the groups it may use hold at least top_k experts."""
    experts, k = moe.args["experts"], moe.args["top_k"]
    r, rspans = router.args, router.arg_spans
    groups, topk_group = r["n_group"], r["topk_group"]
    if experts % groups:
        diags.error("E101", f"{experts} experts do not split into {groups} equal groups",
                    rspans.get("n_group", router.span))
    elif topk_group > groups:
        diags.error("E101", f"topk_group {topk_group} exceeds n_group {groups}",
                    rspans.get("topk_group", router.span))
    elif k > topk_group * (experts // groups):
        diags.error("E101", f"top_k {k} exceeds the {topk_group * (experts // groups)} "
                    f"experts in {topk_group} of {groups} groups",
                    moe.arg_spans.get("top_k", moe.span),
                    hint="raise topk_group or lower top_k")


def _check_sparsemixer(router: Any, moe: Any, diags: Any) -> None:
    """E185: sparsemixer picks exactly two experts (its second pick masks out the first)."""
    k = moe.args["top_k"]
    if k != 2:
        diags.error("E185", f"sparsemixer routes every token to exactly 2 experts, but this "
                    f"moe has top_k = {k}", moe.arg_spans.get("top_k", moe.span),
                    hint="set top_k = 2, or route with softmax_topk")


def _softmax_kf_args(config: Args, note: Any) -> list[tuple[str, Any, str | None]]:
    """KempnerForge's softmax router always renormalises; its sequence loss and bias
    schedule belong to the sigmoid router only."""
    return [("renormalize", True, None),
            ("aux_loss_weight", config["moe_aux_loss_weight"], note("moe_aux_loss_weight"))]


def _sigmoid_kf_args(config: Args, note: Any) -> list[tuple[str, Any, str | None]]:
    """forgec's sigmoid_topk is DeepSeek-V3's router; its bias-update constants are
    forgec's defaults."""
    seq_aux = config["moe_sequence_aux_loss_weight"]
    return [("schedule", config["moe_bias_schedule"], None),
            *([("seq_aux_loss_weight", seq_aux, None)] if seq_aux else [])]


OPS = (
    OpDef(
        name="softmax_topk",
        role="router",
        doc="Token-choice router: softmax over experts, top-k, optional renormalisation; "
            "Switch-style load-balancing loss E·Σ f_i·P_i and router z-loss.",
        args=(
            ArgSpec("renormalize", "bool", True, doc="rescale the k weights to sum to 1"),
            ArgSpec("aux_loss_weight", "float", 0.01, min=0.0),
            ArgSpec("z_loss_weight", "float", 0.0, min=0.0),
            ArgSpec("bias", "bool", False, doc="a bias on the router logits (gpt-oss)"),
        ),
        class_name="SoftmaxTopK",
        ctor=_router_ctor,
        # Mixtral's and Qwen3-MoE's router; KempnerForge's moe_router = "softmax_topk"
        foreign={"hf": Foreign("router"),
                 "kf": Foreign("router", {"moe_router": ("softmax_topk",)},
                               {"aux_loss_weight": "moe_aux_loss_weight"}, by_default=True,
                               args=_softmax_kf_args)},
    ),
    OpDef(
        name="sigmoid_topk",
        role="router",
        doc="DeepSeek-V3 router: top-k of sigmoid scores plus a load-balancing bias "
            "(a buffer, no gradient) moved toward balance each step; gate weights from the "
            "unbiased scores, normalised and scaled; optional group-limited routing.",
        args=(
            ArgSpec("bias_rate", "float", 1e-3, min=0.0, doc="bias update speed"),
            ArgSpec("schedule", "choice", "constant", choices=SCHEDULES,
                    doc="how the update rate changes over training (set_moe_step)"),
            ArgSpec("load_ema", "float", 0.9, min=0.0, max=1.0,
                    doc="decay of the moving average of expert load"),
            ArgSpec("normalize", "bool", True, doc="rescale the k weights to sum to 1"),
            ArgSpec("routed_scale", "float", 1.0, min=0.0, doc="factor on the routed output"),
            ArgSpec("n_group", "int", 1, min=1, doc="expert groups (group-limited routing)"),
            ArgSpec("topk_group", "int", 1, min=1, doc="groups a token may use"),
            ArgSpec("seq_aux_loss_weight", "float", 0.0, min=0.0,
                    doc="weight of the sequence-wise balance loss"),
            ArgSpec("z_loss_weight", "float", 0.0, min=0.0),
        ),
        class_name="SigmoidTopK", check=_check_groups,
        ctor=_router_ctor,
        # DeepSeek-V3's router (its e_score_correction_bias is expert_bias; the weights
        # runtime/hf.py maps); KempnerForge's moe_router = "sigmoid_topk"
        foreign={"hf": Foreign("router", {"model_type": ("deepseek_v3", "glm4_moe",
                                                                "dots1", "glm4_moe_lite",
                                                                "solar_open", "sarvam_mla",
                                                                "minimax_m2", "exaone_moe")},
                               {"normalize": "norm_topk_prob",
                                "routed_scale": "routed_scaling_factor",
                                "n_group": "n_group", "topk_group": "topk_group"}),
                 "kf": Foreign("router", {"moe_router": ("sigmoid_topk",)},
                               {"schedule": "moe_bias_schedule",
                                "seq_aux_loss_weight": "moe_sequence_aux_loss_weight"},
                               args=_sigmoid_kf_args)},
    ),
    OpDef(
        name="sparsemixer",
        role="router",
        doc="PhiMoE's router: two picks, each the best remaining expert weighed by a "
            "softmax over the experts whose logits lie within 2·jitter_eps (relative) of "
            "its own; in training each pick is a Gumbel sample of that softmax, with "
            "sparsemixer's midpoint gradient estimate for the router.",
        args=(
            ArgSpec("jitter_eps", "float", 0.01, min=0.0,
                    doc="relative width of the window of experts a pick's softmax covers"),
            ArgSpec("aux_loss_weight", "float", 0.01, min=0.0),
            ArgSpec("z_loss_weight", "float", 0.0, min=0.0),
        ),
        class_name="SparseMixer", check=_check_sparsemixer,
        ctor=_router_ctor,
        # PhiMoE's router: its config calls the window router_jitter_noise
        foreign={"hf": Foreign("router", {"model_type": ("phimoe",)},
                               {"jitter_eps": "router_jitter_noise"})},
    ),
    OpDef(
        name="moe",
        doc="Mixture of SwiGLU experts with token-choice routing, packed expert weights "
            "(E, in, out) run by grouped matmuls, optional shared experts and a per-expert "
            "capacity (training only).",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("experts", "size", doc="routed experts"),
            ArgSpec("top_k", "int", doc="experts per token"),
            ArgSpec("hidden", "size", doc="hidden width of one expert"),
            ArgSpec("router", "op:router", doc="softmax_topk(...), sigmoid_topk(...) or sparsemixer(...)"),
            ArgSpec("shared_experts", "int", 0, min=0, doc="experts every token uses"),
            ArgSpec("shared_hidden", "size", derived=True,
                    doc="hidden width of one shared expert (default: hidden)"),
            ArgSpec("shared_gate", "bool", False,
                    doc="scale the shared experts' output by a learned sigmoid gate "
                    "σ(x·w) per token (Qwen2-MoE's shared_expert_gate)"),
            ArgSpec("capacity_factor", "float", 0.0, min=0.0,
                    doc="per-expert capacity ceil(T·k/E·factor) in training; 0: no limit"),
            ArgSpec("zero_init", "bool", False, doc="zero-initialise the down projections"),
            ArgSpec("bias", "bool", False, doc="biases on the experts' gate, up and down "
                    "projections (gpt-oss)"),
            ArgSpec("swiglu_limit", "float", 0.0, min=0.0,
                    doc="gpt-oss's clamped SwiGLU: gate ≤ limit, |up| ≤ limit, "
                    "gate·σ(alpha·gate)·(up + 1); 0: plain SwiGLU"),
            ArgSpec("swiglu_alpha", "float", 1.702, min=0.0,
                    doc="the clamped SwiGLU's sigmoid sharpness"),
        ),
        sizes=("dim", "experts", "hidden", "shared_hidden"),
        derive=_moe_derive,
        derived_code={"shared_hidden": "{hidden}"},
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=_moe_weights,
        active_params=_moe_active,
        flops=lambda a, s: 2 * _moe_active(a),
        class_name="MoE", code=("MoE", "ExpertsMeasured"), slots=("mlp", "experts"),
        check=_check_moe, metrics_key="moe",
        split_by={"ep": ("experts",)},
        ctor=_moe_ctor,
        features=_moe_features,
        # the experts are SwiGLUs: Hugging Face's hidden_act, KempnerForge's activation
        foreign={"hf": Foreign("experts", {"hidden_act": SILU}),
                 "kf": Foreign("experts", {"activation": ("silu",)})},
    ),
)
