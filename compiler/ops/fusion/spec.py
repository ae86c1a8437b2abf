"""Vision-language fusion: how image tokens reach the text decoder.

The vlm binder adds the text model's `dim` and `n_layers` to a fusion op's
arguments (compiler/vlm.py).
"""

from __future__ import annotations

from typing import Any

from ..core import Args, ArgSpec, Fusion, OpDef, Shape, numel

# A fusion op says how image tokens reach the text decoder (its `fusion` hooks: see
# core.Fusion); the vlm binder adds the text model's `dim` and `n_layers` to its
# arguments (compiler/vlm.py).

Layers = list[list[tuple[int, int, tuple[str, ...]]]]


# ---- the modality pass (compiler/checks/modality.py) -----------------------------------


def _check_modalities(comp: Any, diags: Any) -> None:
    """E136: a routed fusion's modalities are this VLM's inputs."""
    names = comp.args["modalities"]
    bad = [m for m in names if not m.isidentifier()]
    span = comp.arg_spans.get("modalities", comp.span)
    if bad:
        diags.error("E136", f"modality name {bad[0]!r} is not an identifier", span)
    elif len(set(names)) != len(names) or len(names) < 2:
        diags.error("E136", "modalities are two or more distinct names", span)
    elif not {"image", "text"} <= set(names):
        missing = sorted({"image", "text"} - set(names))
        diags.error("E136", f"the modalities must name this vlm's inputs: "
                    f"{', '.join(repr(m) for m in missing)} missing", span,
                    hint='image tokens come from the vision encoder, text from the tokens: '
                    '["image", "text"]')


def _check_fits(comp: Any, tokens: int, limit: int | None, diags: Any) -> None:
    """E132: image tokens and the text fit the decoder's positions."""
    max_text = comp.args["max_text"]
    if limit is not None and tokens + max_text > limit:
        diags.error("E132", f"{tokens} image tokens + max_text {max_text} exceed the "
                    f"decoder's max_seq_len {limit}",
                    comp.arg_spans.get("max_text", comp.span), hint=f"max_text ≤ {limit - tokens}")


def _check_routed(comp: Any, tokens: int, limit: int | None, diags: Any) -> None:
    _check_modalities(comp, diags)
    _check_fits(comp, tokens, limit, diags)


def _check_xattn(comp: Any, tokens: int, limit: int | None, diags: Any) -> None:
    """E133: the heads divide the text width, and a block fires at all."""
    f, spans = comp.args, comp.arg_spans
    if f["dim"] % f["heads"]:
        diags.error("E133", f"cross-attention heads {f['heads']} do not divide the text "
                    f"width {f['dim']}", spans.get("heads", comp.span))
    if f["every"] > f["n_layers"]:
        diags.error("E133", f"a block every {f['every']} layers never fires in "
                    f"{f['n_layers']} layers", spans.get("every", comp.span))


# ---- parameters and cost ---------------------------------------------------------------


def _xattn_after(a: Args) -> list[int]:
    """The decoder layers a cross-attention block follows: every-1, 2·every-1, ..."""
    return list(range(a["every"] - 1, a["n_layers"], a["every"]))


def _xattn_derive(a: dict[str, Any]) -> None:
    if a.get("hidden") is None and "dim" in a:  # once the vlm binder gave the text width
        a["hidden"] = 4 * a["dim"]


def _xattn_params(a: Args, layers: Layers) -> tuple[int, int]:
    n = sum(numel(s) for s in _xattn_weights(a).values())
    return n, n


def _xattn_flops(a: Args, seq: int, n: int) -> int:
    """Per text position: q and o projections, the gated MLP, scores and values over
    the n image tokens; per image token: its k and v projections."""
    dim, hidden = a["dim"], a["hidden"]
    return seq * (2 * (2 * dim * dim + 3 * dim * hidden) + 2 * 2 * dim * n) + n * 2 * 2 * dim * dim


def _mot_params(a: Args, layers: Layers) -> tuple[int, int]:
    """A copy of every block component per modality; a token uses one."""
    block_total = sum(p for layer in layers for p, _, _ in layer)
    return (len(a["modalities"]) - 1) * block_total, 0


def _mot_cost(a: Args, params: int, flops: int, slots: tuple[str, ...]) -> tuple[int, int]:
    return params * len(a["modalities"]), flops


def _mot_call(op: Any, a: Args, m: str, x: str, kv: str) -> str:
    if op.mask:  # an attention: one softmax over every modality's tokens
        return (f"mot_attention({m}, {x}, rope_cos, rope_sin, "
                f'attn_mask["{op.mask(a)}"]{kv}, modality)')
    return f"route({m}, {x}, modality)"


def _moma_params(a: Args, layers: Layers) -> tuple[int, int]:
    """The MLPs of each layer replaced by the expert groups of every modality."""
    mlp_total = mlp_active = n = 0
    for layer in layers:
        mlps = [(p, act) for p, act, slots in layer if "mlp" in slots]
        n += bool(mlps)
        mlp_total += sum(p for p, _ in mlps)
        mlp_active += sum(act for _, act in mlps)
    per_layer = sum(numel(s) for s in _moma_weights(a).values())
    expert = 3 * a["dim"] * a["hidden"]
    active = n * (a["dim"] * a["experts"] + a["capacity"] * a["experts"] * expert)
    return n * per_layer - mlp_total, int(active) - mlp_active


def _moma_cost(a: Args, params: int, flops: int, slots: tuple[str, ...]) -> tuple[int, int]:
    if "mlp" not in slots:
        return params, flops
    experts, dim = a["experts"], a["dim"]
    return (sum(numel(s) for s in _moma_weights(a).values()),
            2 * dim * experts + int(a["capacity"] * experts * 2 * 3 * dim * a["hidden"]))


def _moma_call(op: Any, a: Args, m: str, x: str, kv: str) -> str | None:
    return f"{m}({x}, modality)" if "mlp" in op.slots else None

def _moma_weights(a: Args) -> dict[str, Shape]:
    """Per modality and per layer: a router and packed experts (the MLPs they replace
    are not counted by the text model's graph either: see compiler/vlm.py)."""
    dim, hidden, e = a["dim"], a["hidden"], a["experts"]
    per = {"router.weight": (e, dim), "experts.gate_proj": (e, dim, hidden),
           "experts.up_proj": (e, dim, hidden), "experts.down_proj": (e, hidden, dim)}
    return {f"moma.{m}.{k}": v for m in a["modalities"] for k, v in per.items()}


def _xattn_weights(a: Args) -> dict[str, Shape]:
    dim, hidden = a["dim"], a["hidden"]
    per: dict[str, Shape] = {
        "attention_norm.weight": (dim,), "attention.q_proj.weight": (dim, dim),
        "attention.k_proj.weight": (dim, dim), "attention.v_proj.weight": (dim, dim),
        "attention.o_proj.weight": (dim, dim), "attention_gate": (1,),
        "mlp_norm.weight": (dim,), "mlp.gate_proj.weight": (hidden, dim),
        "mlp.up_proj.weight": (hidden, dim), "mlp.down_proj.weight": (dim, hidden),
        "mlp_gate": (1,),
    }
    return {f"cross_attention_layers.{k}.{name}": shape
            for k in range(a["n_layers"] // a["every"]) for name, shape in per.items()}


OPS = (
    OpDef(
        name="joint_decoder",
        role="fusion",
        summary="{image_tokens} image tokens per image are prefixed to the text of a causal "
                "decoder (joint decoder)",
        doc="Image tokens are prefixed to the text (prefix_embeds); the logits of the image "
            "positions are sliced off (output_slice).",
        args=(ArgSpec("max_text", "size", doc="longest text sequence"),),
        sizes=("max_text",),
        fusion=Fusion(prefixed=True, check=_check_fits),
    ),
    OpDef(
        name="cross_attention",
        role="fusion",
        summary="the decoder's text attends to the image tokens through gated cross-attention "
                "blocks (cross-attention fusion)",
        doc="A gated cross-attention block after every k-th decoder layer: text queries, "
            "image keys and values, no positions, no causal mask, tanh gates; its output "
            "projections start at zero (so it starts as the identity).",
        args=(
            ArgSpec("every", "size", 1, doc="a block after layers every-1, 2·every-1, ..."),
            ArgSpec("heads", "size"),
            ArgSpec("hidden", "size", derived=True, doc="MLP width (default 4·dim)"),
        ),
        sizes=("every", "heads", "hidden"),
        derive=_xattn_derive,
        derived_code={"hidden": "4 * {dim}"},
        weights=_xattn_weights,
        class_name="CrossAttentionBlock",
        fusion=Fusion(
            stack="cross_attention_layers", after=_xattn_after,
            stack_args=("dim", "heads", "hidden", "norm.eps"),
            stack_noun="cross-attention block",
            stack_hint="a cross-attention block travels with the decoder layer it follows; "
                       "list the layers only",
            check=_check_xattn, params=_xattn_params, stack_flops=_xattn_flops,
        ),
    ),
    OpDef(
        name="mot",
        role="fusion",
        summary="{image_tokens} image tokens per image are prefixed to the text; every block "
                "component has a copy per modality (Mixture-of-Transformers)",
        doc="Mixture-of-Transformers: image tokens prefixed to the text as in the joint "
            "decoder, and every block component (norms, q/k/v/o, MLPs or MoEs) copied per "
            "modality; tokens use their modality's copy (by modality_ids), attention stays "
            "global over the whole sequence.",
        args=(
            ArgSpec("modalities", "list", doc='names, e.g. ["image", "text"]'),
            ArgSpec("max_text", "size"),
        ),
        sizes=("max_text",),
        code=("route", "mot_attention"),
        fusion=Fusion(prefixed=True, routes="block", routing_doc="Mixture-of-Transformers",
                      check=_check_routed, params=_mot_params, layer_cost=_mot_cost,
                      call=_mot_call),
    ),
    OpDef(
        name="moma",
        role="fusion",
        summary="{image_tokens} image tokens per image are prefixed to the text; each block's MLP is "
                "a group of expert-choice experts per modality (MoMa)",
        doc="MoMa: shared attention, and each block's MLP replaced by per-modality groups of "
            "experts with expert-choice routing (each expert takes the top capacity·N tokens "
            "of its modality in the batch) — not causal, so the model is training-only.",
        args=(
            ArgSpec("modalities", "list", doc='names, e.g. ["image", "text"]'),
            ArgSpec("experts", "size", doc="experts per modality"),
            ArgSpec("hidden", "size", doc="hidden width of one expert"),
            ArgSpec("capacity", "float", 0.25, min=0.0, max=1.0,
                    doc="share of a modality's tokens each expert takes"),
            ArgSpec("max_text", "size"),
        ),
        sizes=("experts", "hidden", "max_text"),
        weights=_moma_weights,
        causal=lambda a: False,
        class_name="MoMaFFN",
        ctor=lambda a, u: {k: a[k] for k in ("dim", "hidden", "experts", "capacity",
                                              "modalities")},
        fusion=Fusion(prefixed=True, routes="mlp", routing_doc="Mixture-of-Modality-experts",
                      check=_check_routed, params=_moma_params, layer_cost=_moma_cost,
                      call=_moma_call),
    ),
)
