"""Token embedding and output head: the ends of the spine."""

from __future__ import annotations

from typing import Any

from ..core import ArgSpec, Foreign, OpDef, hidden

# The head fuses its cross-entropy with its matmul, chunk by chunk (LinearCrossEntropy),
# where the vocabulary is wider than this many times the model: there the fp32 logits
# and their gradient outweigh any tensor a block keeps (an MLP's are 2.7-4 times the
# model wide), and at 128k tokens they dominate the step's memory; the fused head is
# also faster there (0.81x of the plain head's time at 8 x, benchmarks/bench_thresholds.py
# on the CPU). At 4 x and below, full logits and F.cross_entropy hold no more than a block
# does and are as fast or faster (the fused head: 0.96-1.04x, 1.24x at 512 tokens).
FUSED_LOSS_WIDTH = 4

# the ends of a Hugging Face / KempnerForge decoder
_EMBEDDING = Foreign("token_embedding")
_HEAD = Foreign("output_head")


def _check_tie(comp: Any, model: Any, diags: Any) -> None:
    """E074: a head tied to an embedding has the embedding's shape and no bias."""
    tie = comp.args.get("tie")
    if tie is None or not tie.component.ok:
        return
    emb = tie.component.args
    head = (comp.args["vocab"], comp.args["dim"])
    table = (emb["vocab"], emb["dim"])
    if min(*head, *table) <= 0:
        return  # reported by positive_sizes
    if head != table:
        diags.error("E074", f"'{comp.name}' ({head[0]} × {head[1]}) cannot share the "
                    f"weight of '{tie.component.name}' ({table[0]} × {table[1]})",
                    comp.arg_spans.get("tie", comp.span),
                    notes=[("embedding declared here", tie.component.span)])
        return
    if comp.args["bias"]:
        diags.error("E074", "a tied head cannot have a bias of its own",
                    comp.arg_spans.get("bias", comp.span))


def _check_head(comp: Any, model: Any, diags: Any) -> None:
    """E074 (tied heads) and E083: scaled logits come from a head without a bias (the
    fused loss scales the hidden states instead of the logits)."""
    _check_tie(comp, model, diags)
    if comp.args["logit_scale"] != 1.0 and comp.args["bias"]:
        diags.error("E083", "a head with logit_scale cannot have a bias",
                    comp.arg_spans.get("logit_scale", comp.span),
                    hint="scale the logits of a head without a bias")


OPS = (
    OpDef(
        name="embedding",
        doc="Token embedding table: ids (B, S) → (B, S, dim).",
        args=(
            ArgSpec("vocab", "size", doc="vocabulary size"),
            ArgSpec("dim", "size", doc="embedding width"),
            ArgSpec("scale", "float", 1.0, min=0.0,
                    doc="multiplier of the vectors, in the table's dtype (Gemma: sqrt(dim); "
                    "Granite's embedding_multiplier)"),
        ),
        sizes=("vocab", "dim"),
        inputs=lambda a: (("B", "S"),),
        output=lambda a: hidden(a["dim"]),
        weights=lambda a: {"embedding.weight": (a["vocab"], a["dim"])},
        slots=("token_embedding",),
        class_name="TokenEmbedding", init_args="std",
        tp={"embedding": "rowwise"},
        ctor=lambda a, u: {"vocab": a["vocab"], "dim": a["dim"],
                           **({"scale": a["scale"]} if a["scale"] != 1.0 else {})},
        features=lambda a: frozenset({"embed_scale"}) if a["scale"] != 1.0 else frozenset(),
        foreign={"hf": _EMBEDDING, "kf": _EMBEDDING},
    ),
    OpDef(
        name="lm_head",
        doc="Output projection to vocabulary logits; `tie` shares the embedding's weight.",
        args=(
            ArgSpec("dim", "size"),
            ArgSpec("vocab", "size"),
            ArgSpec("bias", "bool", False),
            ArgSpec("tie", "ref:embedding", None, doc="an embedding component to share weights with"),
            ArgSpec("softcap", "float", 0.0, min=0.0,
                    doc="soft-cap the logits: softcap · tanh(logits / softcap); 0 for none"),
            ArgSpec("logit_scale", "float", 1.0,
                    doc="multiplies the logits (Cohere's logit_scale); not with a bias (E083)"),
        ),
        sizes=("dim", "vocab"),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["vocab"]),
        weights=lambda a: {"proj.weight": (a["vocab"], a["dim"]),
                           **({"proj.bias": (a["vocab"],)} if a["bias"] else {})},
        flops=lambda a, s: 2 * a["vocab"] * a["dim"],
        slots=("output_head",), check=_check_head,
        class_name="OutputHead", init_args="std",
        tp={"proj": "colwise"},
        ctor=lambda a, u: {"dim": a["dim"], "vocab": a["vocab"], "bias": a["bias"],
                           **({"softcap": a["softcap"]} if a["softcap"] > 0 else {}),
                           **({"logit_scale": a["logit_scale"]} if "logit_scale" in u else {})},
        features=lambda a: frozenset({"logit_softcap"} if a["softcap"] > 0 else ())
        | frozenset({"logit_scale"} if a["logit_scale"] != 1.0 else ())
        | frozenset({"fused_loss"} if a["vocab"] > FUSED_LOSS_WIDTH * a["dim"] else ())
        | frozenset({"head_bias"} if a["bias"] else ()),
        foreign={"hf": _HEAD, "kf": _HEAD},
    ),
)
