"""Vision-language fusion: how image tokens reach the text decoder.

The vlm binder adds the text model's `dim` and `n_layers` to a fusion op's
arguments (compiler/vlm.py).
"""

from __future__ import annotations

from ..core import Args, ArgSpec, OpDef, Shape

# A fusion op says how image tokens reach the text decoder; the vlm binder adds
# the text model's `dim` and `n_layers` to its arguments (compiler/vlm.py).

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
        weights=_xattn_weights,
        class_name="CrossAttentionBlock",
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
    ),
)
