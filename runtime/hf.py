"""Hugging Face checkpoints ↔ models generated from imported specs.

    load_hf_checkpoint(model, SRC)              SRC: a save_pretrained folder or a weights file
    save_hf_checkpoint(model, DIR, config=...)  writes DIR/model.safetensors + DIR/config.json

`model` is a `Transformer()` of a package built from a spec `forgec import-hf`
wrote (any spec with the same component names works: `token_embedding`,
`layers.{i}.attention_norm`, `.attention`, `.mlp_norm`, `.mlp`, `norm`,
`output_head`). Weights are read from `model.safetensors`,
`pytorch_model.bin`, or their sharded `*.index.json` forms.

Name mapping (HF → forgec), with `model.` optional on the HF side:

    model.embed_tokens.weight                      token_embedding.embedding.weight
    model.layers.i.input_layernorm.weight          layers.i.attention_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.*      layers.i.attention.{q,k,v,o}_proj.*
    model.layers.i.self_attn.{q,k}_norm.weight     layers.i.attention.{q,k}_norm.weight
    model.layers.i.post_attention_layernorm.weight layers.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight  layers.i.mlp.{gate,up,down}_proj.weight
    model.norm.weight                              norm.weight
    lm_head.weight                                 output_head.proj.weight (absent when tied)

Mixtures of experts: the router `…block_sparse_moe.gate.weight` (Mixtral) or
`…mlp.gate.weight` (Qwen3-MoE) becomes `layers.i.mlp.router.weight`; the E
experts' `nn.Linear` weights — `experts.e.{w1,w3,w2}` (Mixtral: gate, up,
down) or `experts.e.{gate,up,down}_proj` — are transposed and packed into
`layers.i.mlp.experts.gate_proj`/`up_proj` (E, dim, hidden) and `down_proj`
(E, hidden, dim). transformers 5's in-memory packing (`experts.gate_up_proj`
(E, 2·hidden, dim), `experts.down_proj` (E, dim, hidden)) is read too.

Other self-attention weights keep their names (`self_attn.X` ↔ `attention.X`:
multi-head latent attention's `q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, …,
gpt-oss's `sinks`). DeepSeek's `mlp.gate.e_score_correction_bias` is the sigmoid
router's `router.expert_bias` and `mlp.shared_experts.*` its shared experts; the
router's moving average of expert load (`router.load`, training state) is in no
checkpoint and keeps its value. gpt-oss's `mlp.router.{weight,bias}` keep their
names and its packed experts `experts.gate_up_proj` (E, dim, 2·hidden) /
`gate_up_proj_bias` hold gate and up columns interleaved (`down_proj` (E, hidden,
dim), `down_proj_bias`): they become `experts.{gate,up}_proj`, `{gate,up}_bias`,
`down_proj`, `down_bias`, and are written back packed for model_type gpt_oss.

Every tensor of the model must be filled and every tensor of the checkpoint
used, with matching shapes; anything else is a `RunError` naming the keys.
Derived buffers (`rotary_emb.inv_freq` of old checkpoints) are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from forgec.compiler.errors import RunError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

_DIRECT = [
    (re.compile(r"embed_tokens\.weight"), "token_embedding.embedding.weight"),
    (re.compile(r"norm\.weight"), "norm.weight"),
    (re.compile(r"layers\.(\d+)\.input_layernorm\.weight"), r"layers.\1.attention_norm.weight"),
    (re.compile(r"layers\.(\d+)\.post_attention_layernorm\.weight"), r"layers.\1.mlp_norm.weight"),
    (re.compile(r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)"),
     r"layers.\1.attention.\2_proj.\3"),
    (re.compile(r"layers\.(\d+)\.self_attn\.([qk])_norm\.weight"), r"layers.\1.attention.\2_norm.weight"),
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)"), r"layers.\1.mlp.\2_proj.\3"),
    (re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight"), r"layers.\1.mlp.router.weight"),
    (re.compile(r"layers\.(\d+)\.mlp\.gate\.e_score_correction_bias"), r"layers.\1.mlp.router.expert_bias"),
    (re.compile(r"layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight"),
     r"layers.\1.mlp.shared_experts.\2_proj.weight"),
    # other self-attention weights keep their names (multi-head latent attention's
    # q_a_proj, kv_a_proj_with_mqa, kv_a_layernorm, ...)
    (re.compile(r"layers\.(\d+)\.self_attn\.([\w.]+)"), r"layers.\1.attention.\2"),
    (re.compile(r"layers\.(\d+)\.mlp\.router\.(weight|bias)"), r"layers.\1.mlp.router.\2"),
    # Qwen2-MoE's one shared expert and its sigmoid gate; GraniteMoE's router
    (re.compile(r"layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight"),
     r"layers.\1.mlp.shared_experts.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.mlp\.shared_expert_gate\.weight"),
     r"layers.\1.mlp.shared_experts_gate.weight"),
    (re.compile(r"layers\.(\d+)\.block_sparse_moe\.router\.layer\.weight"),
     r"layers.\1.mlp.router.weight"),
    # Jamba's names: its MLP is `feed_forward`, its norms `pre_ff_layernorm` and
    # `final_layernorm`, its Mamba mixer `mamba` (the mamba op keeps HF's inner names)
    (re.compile(r"final_layernorm\.weight"), "norm.weight"),
    (re.compile(r"layers\.(\d+)\.pre_ff_layernorm\.weight"), r"layers.\1.mlp_norm.weight"),
    (re.compile(r"layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight"),
     r"layers.\1.mlp.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.feed_forward\.router\.weight"), r"layers.\1.mlp.router.weight"),
    (re.compile(r"layers\.(\d+)\.mamba\.(.+)"), r"layers.\1.mamba.\2"),
    # Mamba-2's (under `backbone.`): `embeddings`, `norm_f`, and blocks of a `norm` and
    # a `mixer` (the mamba2 op keeps HF's inner names)
    (re.compile(r"embeddings\.weight"), "token_embedding.embedding.weight"),
    (re.compile(r"norm_f\.weight"), "norm.weight"),
    (re.compile(r"layers\.(\d+)\.norm\.weight"), r"layers.\1.norm.weight"),
    (re.compile(r"layers\.(\d+)\.mixer\.(.+)"), r"layers.\1.mixer.\2"),
    # LayerNorms with biases and a head with a bias (PhiMoE)
    (re.compile(r"norm\.bias"), "norm.bias"),
    (re.compile(r"layers\.(\d+)\.input_layernorm\.bias"), r"layers.\1.attention_norm.bias"),
    (re.compile(r"layers\.(\d+)\.post_attention_layernorm\.bias"), r"layers.\1.mlp_norm.bias"),
    (re.compile(r"lm_head\.bias"), "output_head.proj.bias"),
    # MiniMax-M2 keeps the router's correction bias on its MoE block
    (re.compile(r"layers\.(\d+)\.block_sparse_moe\.e_score_correction_bias"),
     r"layers.\1.mlp.router.expert_bias"),
    # EXAONE-MoE keeps the router's correction bias on its MoE block
    (re.compile(r"layers\.(\d+)\.mlp\.e_score_correction_bias"), r"layers.\1.mlp.router.expert_bias"),
    # GraniteMoeSWA's router (its experts are transformers 5's packed ones, _PACKED)
    (re.compile(r"layers\.(\d+)\.block_sparse_moe\.router\.weight"),
     r"layers.\1.mlp.router.weight"),
    # Qwen3-Next's gated DeltaNet mixer `linear_attn` (the gated_deltanet op keeps HF's
    # inner names)
    (re.compile(r"layers\.(\d+)\.linear_attn\.(.+)"), r"layers.\1.linear_attn.\2"),
]
# A sandwich-norm decoder layer (Gemma 2, Gemma 3) norms after each sublayer too:
# there `post_attention_layernorm` follows the attention and `pre_feedforward_layernorm`
# is the MLP's input norm. A checkpoint with any pre_feedforward_layernorm reads so.
_SANDWICH = [
    (re.compile(r"layers\.(\d+)\.post_attention_layernorm\.weight"),
     r"layers.\1.post_attention_norm.weight"),
    (re.compile(r"layers\.(\d+)\.pre_feedforward_layernorm\.weight"), r"layers.\1.mlp_norm.weight"),
    (re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.weight"),
     r"layers.\1.post_mlp_norm.weight"),
]
# a family's own meaning of a Llama name: FlexOlmo norms the outputs of attention and
# experts only (OLMo 2's post-norms)
_FAMILY_DIRECT = {
    "flex_olmo": [
        (re.compile(r"layers\.(\d+)\.post_attention_layernorm\.weight"),
         r"layers.\1.attention_post_norm.weight"),
        (re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.weight"),
         r"layers.\1.mlp_post_norm.weight")],
}
# training state a Hugging Face checkpoint does not hold: the sigmoid router's moving
# average of expert load keeps its initial value
_TRAINING_STATE = re.compile(r"layers\.\d+\.mlp\.router\.load")
_EXPERT = re.compile(
    r"layers\.(\d+)\.(?:block_sparse_moe|mlp|feed_forward)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_PACKED = re.compile(
    r"layers\.(\d+)\.(?:mlp|feed_forward|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)")
# GraniteMoE packs its experts the same way under other names
_PACKED_LINEAR = re.compile(r"layers\.(\d+)\.block_sparse_moe\.(input|output)_linear\.weight")
_PACKED_LINEAR_NAMES = {"input": "gate_up_proj", "output": "down_proj"}
# GraniteMoeShared's shared expert: input_linear (2·hidden, dim) holds its gate rows, then
# its up rows
_SHARED_MLP = re.compile(r"layers\.(\d+)\.shared_mlp\.(input|output)_linear\.weight")
# gpt-oss packs its experts (E, in, out) with gate and up columns interleaved, and biases
_PACKED_BIASED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?")
_DERIVED = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}
HEAD, EMBED = "output_head.proj.weight", "token_embedding.embedding.weight"


# ---- reading ------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - a dev extra
        raise RunError("reading .safetensors needs the safetensors package "
                       "(pip install 'forgec[dev]')") from None
    return st


def _safetensors_shapes(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors as meta tensors, from its header alone."""
    _safetensors()
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {key: torch.empty(f.get_slice(key).get_shape(), device="meta")
                for key in f.keys()}  # noqa: SIM118 — safe_open is not a dict


def _load_file(path: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise RunError(f"no such checkpoint file: {path}")
    try:
        if path.endswith(".safetensors"):
            if shapes_only:
                return _safetensors_shapes(path)
            return _safetensors().load_file(path, device="cpu")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        return {k: t.to("meta") for k, t in tensors.items()} if shapes_only else tensors
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 — a corrupt file is bad input, not a bug
        raise RunError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _load_index(path: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot read the shard index {path}: {e}") from None
    folder = os.path.dirname(path)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _load_file(os.path.join(folder, shard), shapes_only)
        for key, tensor in tensors.items():
            if weight_map.get(key) == shard:
                out[key] = tensor
    missing = sorted(k for k in weight_map if k not in out)
    if missing:
        raise RunError(f"{path} lists tensors its shards do not hold: {', '.join(missing[:5])}")
    return out


def read_hf_state_dict(src: str | os.PathLike, *,
                       shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a HF checkpoint: a folder (safetensors before .bin, an index
    before a single file) or one weights file (.safetensors, .bin or *.index.json).
    `shapes_only`: meta tensors of their shapes (safetensors: read from the headers
    alone, nothing else loaded)."""
    src = os.fspath(src)
    if os.path.isdir(src):
        for name, reader in ((SAFE_INDEX, _load_index), (SAFE, _load_file),
                             (BIN_INDEX, _load_index), (BIN, _load_file)):
            path = os.path.join(src, name)
            if os.path.isfile(path):
                return reader(path, shapes_only)
        raise RunError(f"{src} holds no weights ({SAFE}, {BIN} or their .index.json)")
    if src.endswith(".index.json"):
        return _load_index(src, shapes_only)
    return _load_file(src, shapes_only)


# ---- HF → forgec names ------------------------------------------------------------------


def hf_to_forge(hf: Mapping[str, torch.Tensor],
                config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Rename (and pack the experts of) a HF state dict into forgec FQNs. `config`: the
    checkpoint's config.json (`checkpoint_config`); its model_type chooses the names of
    the families of TABLE_FAMILIES (without it: the Llama-style names)."""
    names = TABLE_FAMILIES.get((config or {}).get("model_type"))
    if callable(names):  # names that follow the config's layout (Falcon)
        names = names(config)
    if names is not None:
        return _table_to_forge(hf, names, config)
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    sandwich = any(".pre_feedforward_layernorm." in key for key in hf)
    direct = _SANDWICH + _DIRECT if sandwich else _DIRECT
    direct = _FAMILY_DIRECT.get((config or {}).get("model_type"), []) + direct
    biased = {m.group(1) for key in hf if (m := _PACKED_BIASED.search(key)) and m.group(3)}
    for key, t in hf.items():
        if _DERIVED.fullmatch(key):
            continue
        name = key.split(".", 1)[1] if key.startswith(("model.", "backbone.")) else key
        m = _PACKED_LINEAR.fullmatch(name)
        if m:
            name = f"layers.{m.group(1)}.mlp.experts.{_PACKED_LINEAR_NAMES[m.group(2)]}"
        m = _SHARED_MLP.fullmatch(name)
        if m:
            prefix = f"layers.{m.group(1)}.mlp.shared_experts."
            if m.group(2) == "input":
                gate, up = t.chunk(2)
                out[prefix + "gate_proj.weight"] = gate.contiguous()
                out[prefix + "up_proj.weight"] = up.contiguous()
            else:
                out[prefix + "down_proj.weight"] = t
            continue
        m = _PACKED_BIASED.fullmatch(name)
        if m and m.group(1) in biased:  # gpt-oss: (E, dim, 2·hidden), gate and up interleaved
            prefix = f"layers.{m.group(1)}.mlp.experts."
            if m.group(2) == "gate_up_proj":
                gate, up = (t[..., 0::2], t[..., 1::2])
                kind = "bias" if m.group(3) else "proj"
                out[prefix + f"gate_{kind}"] = gate.contiguous()
                out[prefix + f"up_{kind}"] = up.contiguous()
            else:
                out[prefix + ("down_bias" if m.group(3) else "down_proj")] = t
            continue
        if key == "lm_head.weight":
            out[HEAD] = t
            continue
        for pattern, repl in direct:
            if pattern.fullmatch(name):
                out[pattern.sub(repl, name)] = t
                break
        else:
            m = _EXPERT.fullmatch(name)
            if m:
                layer, e, role = int(m.group(1)), int(m.group(2)), _ROLE[m.group(3)]
                slot = experts.setdefault(layer, {}).setdefault(e, {})
                if role in slot:
                    raise RunError(f"two {role} projections for expert {e} of layer {layer} "
                                   f"(Mixtral's w1/w3/w2 and {role}_proj both present)")
                slot[role] = t
                continue
            m = _PACKED.fullmatch(name)
            if m:
                layer, what = int(m.group(1)), m.group(2)
                prefix = f"layers.{layer}.mlp.experts."
                if what == "gate_up_proj":  # (E, 2·hidden, dim), gate first
                    gate, up = t.chunk(2, dim=1)
                    out[prefix + "gate_proj"] = gate.transpose(1, 2).contiguous()
                    out[prefix + "up_proj"] = up.transpose(1, 2).contiguous()
                else:  # (E, dim, hidden)
                    out[prefix + "down_proj"] = t.transpose(1, 2).contiguous()
                continue
            unknown.append(key)
    if unknown:
        raise RunError(f"{len(unknown)} checkpoint tensor(s) have no place in a forgec model: "
                       + ", ".join(sorted(unknown)[:6]) + (" …" if len(unknown) > 6 else ""))
    for layer, by_expert in sorted(experts.items()):
        n = max(by_expert) + 1
        for e in range(n):
            have = by_expert.get(e, {})
            lacking = [r for r in ("gate", "up", "down") if r not in have]
            if lacking:
                raise RunError(f"layer {layer}: expert {e} of {n} has no "
                               f"{'/'.join(lacking)} projection in the checkpoint")
        prefix = f"layers.{layer}.mlp.experts."
        # nn.Linear stores (out, in); the packed experts are (E, in, out)
        for role in ("gate", "up", "down"):
            out[f"{prefix}{role}_proj"] = torch.stack(
                [by_expert[e][role].t() for e in range(n)]).contiguous()
    return out


# ---- families named by table ----------------------------------------------------------------
# The decoders forgec imports beyond the Llama-style six (compiler/importers/hf.py, DENSE):
# each family's checkpoint names as data. A forgec tensor `layers.{i}.{part}.{weight|bias}`
# is `{layer}{hf part}.{weight|bias}` in the checkpoint; a spine tensor `{name}.{weight|bias}`
# is `{spine[name]}{weight|bias}`.


class Names:
    def __init__(self, spine: dict[str, str], layer: str, parts: dict[str, str], *,
                 qkv: str | None = None, qkv_per_head: bool = False, gate_up: str | None = None,
                 interleaved: bool = False, derived: tuple[str, ...] = (),
                 qkv_kv_heads: int | None = None) -> None:
        self.spine, self.layer, self.parts = spine, layer, parts
        # q, k and v fused by KV head: each group's query heads, then its key, then its
        # value (Falcon; qkv_kv_heads groups)
        self.qkv_kv_heads = qkv_kv_heads
        # one fused projection holding q, k and v: all q rows, then k, then v (Phi-3), or
        # per head (GPT-NeoX: (heads, 3, head_dim) rows)
        self.qkv, self.qkv_per_head = qkv, qkv_per_head
        # one fused projection holding the MLP's gate rows, then its up rows (Phi-3)
        self.gate_up = gate_up
        # the checkpoint rotates interleaved channel pairs (GPT-J): q and k rows are
        # permuted to the half-split pairs of forgec's rope
        self.interleaved = interleaved
        self.derived = re.compile(
            re.escape(layer).replace(r"\{i\}", r"\d+") + "(?:" + "|".join(derived) + ")"
            if derived else r"(?!)")


_ATTENTION = {f"attention.{x}_proj": f"self_attn.{x}_proj" for x in "qkvo"}
_LLAMA_SPINE = {"token_embedding.embedding": "model.embed_tokens.", "norm": "model.norm.",
                "output_head.proj": "lm_head."}
TABLE_FAMILIES = {
    "gpt_neox": Names(
        {"token_embedding.embedding": "gpt_neox.embed_in.", "norm": "gpt_neox.final_layer_norm.",
         "output_head.proj": "embed_out."}, "gpt_neox.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         "attention.o_proj": "attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
         "mlp.down_proj": "mlp.dense_4h_to_h"},
        qkv="attention.query_key_value", qkv_per_head=True,
        derived=(r"attention\.bias", r"attention\.masked_bias", r"attention\.rotary_emb\.inv_freq")),
    "gptj": Names(
        {"token_embedding.embedding": "transformer.wte.", "norm": "transformer.ln_f.",
         "output_head.proj": "lm_head."}, "transformer.h.{i}.",
        {"attention_norm": "ln_1", **{f"attention.{x}_proj": f"attn.{x}_proj" for x in "qkv"},
         "attention.o_proj": "attn.out_proj", "mlp.up_proj": "mlp.fc_in",
         "mlp.down_proj": "mlp.fc_out"},
        interleaved=True, derived=(r"attn\.bias", r"attn\.masked_bias")),
    "phi": Names(
        {**_LLAMA_SPINE, "norm": "model.final_layernorm."}, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", **_ATTENTION, "attention.o_proj": "self_attn.dense",
         "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}),
    "stablelm": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **_ATTENTION, **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}),
    "starcoder2": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **_ATTENTION, "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}),
    "smollm3": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **_ATTENTION, **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}),
    "olmo": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {**_ATTENTION, **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}),
    "granite": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **_ATTENTION, **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}),
    "cohere": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", **_ATTENTION,
         **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}},
        interleaved=True),
    "olmo2": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_post_norm": "post_attention_layernorm",
         "mlp_post_norm": "post_feedforward_layernorm", **_ATTENTION,
         **{f"attention.{x}_norm": f"self_attn.{x}_norm" for x in "qk"},
         **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}),
    "glm4": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "attention_post_norm": "post_self_attn_layernorm",
         "mlp_norm": "post_attention_layernorm", "mlp_post_norm": "post_mlp_layernorm",
         **_ATTENTION, "mlp.down_proj": "mlp.down_proj"},
        gate_up="mlp.gate_up_proj", interleaved=True),
    "phi3": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         "attention.o_proj": "self_attn.o_proj", "mlp.down_proj": "mlp.down_proj"},
        qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
    # ---- LFM2: short convolutions and attention with per-head qk-norm ----
    "lfm2": Names(
        {**_LLAMA_SPINE, "norm": "model.embedding_norm."}, "model.layers.{i}.",
        {"attention_norm": "operator_norm", "mlp_norm": "ffn_norm", **_ATTENTION,
         "attention.o_proj": "self_attn.out_proj",
         **{f"attention.{x}_norm": f"self_attn.{x}_layernorm" for x in "qk"},
         **{f"conv.{x}": f"conv.{x}" for x in ("conv", "in_proj", "out_proj")},
         "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
         "mlp.down_proj": "feed_forward.w2"}),
}
# more decoders (issue #13): Llama's names with interleaved rotary pairs, or another
# family's names
_LLAMA_PARTS = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                **_ATTENTION, **{f"mlp.{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}
TABLE_FAMILIES.update({
    "helium": Names(_LLAMA_SPINE, "model.layers.{i}.", _LLAMA_PARTS, interleaved=True),
    "ernie4_5": Names(_LLAMA_SPINE, "model.layers.{i}.", _LLAMA_PARTS, interleaved=True),
    "glm": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **_ATTENTION, "mlp.down_proj": "mlp.down_proj"},
        gate_up="mlp.gate_up_proj", interleaved=True),
    "vaultgemma": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {**_LLAMA_PARTS, "mlp_norm": "pre_feedforward_layernorm"}),
    "olmo3": TABLE_FAMILIES["olmo2"],
    "exaone4": TABLE_FAMILIES["olmo2"],
    "cohere2": TABLE_FAMILIES["cohere"],
    "hunyuan_v1_dense": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {**_LLAMA_PARTS, "attention.q_norm": "self_attn.query_layernorm",
         "attention.k_norm": "self_attn.key_layernorm"}),
    "nemotron": Names(_LLAMA_SPINE, "model.layers.{i}.", _LLAMA_PARTS),  # norms with biases
    "bitnet": Names(
        _LLAMA_SPINE, "model.layers.{i}.",
        {**_LLAMA_PARTS, "attention.out_norm": "self_attn.attn_sub_norm",
         "mlp.sub_norm": "mlp.ffn_sub_norm"}),
    "falcon": lambda cfg: _falcon_names(cfg),
    "persimmon": Names(
        {**_LLAMA_SPINE, "norm": "model.final_layernorm."}, "model.layers.{i}.",
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         "attention.o_proj": "self_attn.dense", "attention.q_norm": "self_attn.q_layernorm",
         "attention.k_norm": "self_attn.k_layernorm", "mlp.up_proj": "mlp.dense_h_to_4h",
         "mlp.down_proj": "mlp.dense_4h_to_h"},
        qkv="self_attn.query_key_value", qkv_per_head=True),
})


def _falcon_names(cfg: Mapping) -> Names:
    """Falcon's names follow its layout: two norms (ln_attn, ln_mlp) in the new decoder
    architecture's parallel block, one (input_layernorm) in the others' parallel block, or
    two in a sequential one; its fused q/k/v grouped by KV head: num_kv_heads groups (new
    decoder architecture), one (multi-query), or one per head."""
    new = bool(cfg.get("new_decoder_architecture"))
    heads = cfg.get("num_attention_heads")
    if new and (cfg.get("num_ln_in_parallel_attn") or 2) == 2:
        norms = {"attention_norm": "ln_attn", "mlp_norm": "ln_mlp"}
    elif new or cfg.get("parallel_attn", True):
        norms = {"attention_norm": "input_layernorm"}
    else:
        norms = {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    kv = (cfg.get("num_kv_heads") or heads) if new else 1 if cfg.get("multi_query", True) \
        else heads
    return Names(
        {"token_embedding.embedding": "transformer.word_embeddings.",
         "norm": "transformer.ln_f.", "output_head.proj": "lm_head."}, "transformer.h.{i}.",
        {**norms, "attention.o_proj": "self_attention.dense",
         "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"},
        qkv="self_attention.query_key_value", qkv_kv_heads=kv)


def _heads(cfg: Mapping) -> tuple[int, int, int]:
    """(heads, head_dim, rotary width) of a table family's config."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    dim = cfg.get("hidden_size") or cfg.get("n_embd")
    if not heads or not dim:
        raise RunError("the checkpoint's config.json gives no num_attention_heads / "
                       "hidden_size: its fused or rotated projections cannot be read")
    head_dim = cfg.get("head_dim") or dim // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    fraction = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return heads, head_dim, cfg.get("rotary_dim") or int(head_dim * fraction)


def _qkv_rows(cfg: Mapping) -> list[int]:
    """The q, k and v rows of a fused projection of all q rows, then k, then v."""
    heads, head_dim, _ = _heads(cfg)
    kv = cfg.get("num_key_value_heads") or heads
    return [heads * head_dim, kv * head_dim, kv * head_dim]


def _half_split(rotary: int, head_dim: int) -> torch.Tensor:
    """forgec channel c of a head ← checkpoint channel perm[c]: interleaved rotary pairs
    (2j, 2j+1) become half-split pairs (j, j + rotary/2); the rest stay."""
    return torch.cat([torch.arange(0, rotary, 2), torch.arange(1, rotary, 2),
                      torch.arange(rotary, head_dim)])


def _permute_heads(t: torch.Tensor, perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Permute the rows of every head of a (heads·head_dim, ...) projection."""
    rows = t.reshape(-1, head_dim, *t.shape[1:])
    return rows[:, perm].reshape(t.shape).contiguous()


def _table_to_forge(hf: Mapping[str, torch.Tensor], names: Names,
                    cfg: Mapping) -> dict[str, torch.Tensor]:
    back = {h: f for f, h in names.spine.items()}  # "lm_head." → "output_head.proj"
    layer = re.compile(re.escape(names.layer).replace(r"\{i\}", r"(\d+)") + r"(.+)\.(weight|bias)")
    parts = {h: f for f, h in names.parts.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in hf.items():
        if names.derived.fullmatch(key):
            continue
        stem, _, kind = key.rpartition(".")
        if stem + "." in back and kind in ("weight", "bias"):
            out[f"{back[stem + '.']}.{kind}"] = t
            continue
        m = layer.fullmatch(key)
        if m and m.group(2) in parts:
            out[f"layers.{m.group(1)}.{parts[m.group(2)]}.{kind}"] = t
        elif m and m.group(2) == names.qkv and names.qkv_kv_heads is not None:
            heads, head_dim, _ = _heads(cfg)
            kv = names.qkv_kv_heads
            rest = t.shape[1:]
            groups = t.reshape(kv, heads // kv + 2, head_dim, *rest)
            for x, part in zip("qkv", (groups[:, :-2], groups[:, -2], groups[:, -1]),
                               strict=True):
                out[f"layers.{m.group(1)}.attention.{x}_proj.{kind}"] = \
                    part.reshape(-1, *rest).contiguous()
        elif m and m.group(2) == names.qkv and names.qkv_per_head:
            heads, head_dim, _ = _heads(cfg)
            q, k, v = t.reshape(heads, 3, head_dim, *t.shape[1:]).unbind(1)
            for x, part in zip("qkv", (q, k, v), strict=True):
                out[f"layers.{m.group(1)}.attention.{x}_proj.{kind}"] = \
                    part.reshape(heads * head_dim, *t.shape[1:]).contiguous()
        elif m and m.group(2) == names.qkv:
            for x, part in zip("qkv", t.split(_qkv_rows(cfg)), strict=True):
                out[f"layers.{m.group(1)}.attention.{x}_proj.{kind}"] = part.contiguous()
        elif m and m.group(2) == names.gate_up:
            gate, up = t.chunk(2)
            out[f"layers.{m.group(1)}.mlp.gate_proj.{kind}"] = gate.contiguous()
            out[f"layers.{m.group(1)}.mlp.up_proj.{kind}"] = up.contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise RunError(f"{len(unknown)} checkpoint tensor(s) have no place in a forgec model: "
                       + ", ".join(sorted(unknown)[:6]) + (" …" if len(unknown) > 6 else ""))
    if names.interleaved:
        _, head_dim, rotary = _heads(cfg)
        perm = _half_split(rotary, head_dim)
        for key in out:
            if re.fullmatch(r"layers\.\d+\.attention\.[qk]_proj\.(weight|bias)", key):
                out[key] = _permute_heads(out[key], perm, head_dim)
    return out


def _table_to_hf(state: Mapping[str, torch.Tensor], names: Names,
                 cfg: Mapping) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    if names.interleaved:
        _, head_dim, rotary = _heads(cfg)
        inverse = torch.argsort(_half_split(rotary, head_dim))
    for key, t in state.items():
        t = t.detach()
        stem, _, kind = key.rpartition(".")
        if stem in names.spine:
            out[names.spine[stem] + kind] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", stem)
        prefix = names.layer.format(i=m.group(1)) if m else ""
        qkv = m and re.fullmatch(r"attention\.([qkv])_proj", m.group(2))
        if names.interleaved and qkv and qkv.group(1) in "qk":
            t = _permute_heads(t, inverse, head_dim)
        gate_up = m and re.fullmatch(r"mlp\.(gate|up)_proj", m.group(2))
        if m and m.group(2) in names.parts:
            out[f"{prefix}{names.parts[m.group(2)]}.{kind}"] = t
        elif qkv and names.qkv:
            fused.setdefault((f"{prefix}{names.qkv}.{kind}", "qkv"), {})[qkv.group(1)] = t
        elif gate_up and names.gate_up:
            fused.setdefault((f"{prefix}{names.gate_up}.{kind}", "gate_up"), {})[
                gate_up.group(1)] = t
        else:
            unknown.append(key)
    for (name, what), pieces in fused.items():
        if what == "gate_up":
            out[name] = torch.cat([pieces["gate"], pieces["up"]])
        elif names.qkv_kv_heads is not None:
            heads, head_dim, _ = _heads(cfg)
            kv = names.qkv_kv_heads
            rest = pieces["q"].shape[1:]
            q = pieces["q"].reshape(kv, heads // kv, head_dim, *rest)
            k, v = (pieces[x].reshape(kv, 1, head_dim, *rest) for x in "kv")
            out[name] = torch.cat([q, k, v], dim=1).reshape(-1, *rest)
        elif names.qkv_per_head:
            heads, head_dim, _ = _heads(cfg)
            rows = [pieces[x].reshape(heads, head_dim, *pieces[x].shape[1:]) for x in "qkv"]
            t = torch.stack(rows, dim=1)
            out[name] = t.reshape(3 * heads * head_dim, *t.shape[3:])
        else:
            out[name] = torch.cat([pieces[x] for x in "qkv"])
    if unknown:
        raise RunError("this checkpoint format has no place for "
                       + ", ".join(unknown[:6]) + (" …" if len(unknown) > 6 else ""))
    return out


def checkpoint_config(src: str | os.PathLike) -> dict:
    """The config.json beside a checkpoint ({} if there is none)."""
    src = os.fspath(src)
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    path = os.path.join(folder, "config.json")
    return _config_dict(path) if os.path.isfile(path) else {}


def _tied(model: torch.nn.Module) -> bool:
    sd = model.state_dict(keep_vars=True)
    return HEAD in sd and EMBED in sd and sd[HEAD] is sd[EMBED]


def load_hf_checkpoint(model: torch.nn.Module, src: str | os.PathLike) -> torch.nn.Module:
    """Fill `model` (materialised, any dtype) from the HF checkpoint `src`, exactly:
    every parameter set, every checkpoint tensor used, shapes equal. Returns `model`."""
    state = hf_to_forge(read_hf_state_dict(src), checkpoint_config(src))
    target = model.state_dict()
    if any(t.is_meta for t in target.values()):
        raise RunError("materialise the model first (model.to_empty(device=...))")
    tied = _tied(model)
    if tied:
        if HEAD in state and EMBED in state and not torch.equal(state[HEAD], state[EMBED]):
            raise RunError("the spec ties output_head to token_embedding, but the checkpoint's "
                           "lm_head.weight differs from its embed_tokens.weight")
        if EMBED in state:
            state[HEAD] = state[EMBED]
    elif HEAD not in state and HEAD in target:
        raise RunError("the checkpoint has no lm_head.weight (its head is tied to the "
                       "embedding) but the spec's head is not tied: tie it "
                       "(lm_head(..., tie = token_embedding))")
    missing = sorted(k for k in set(target) - set(state) if not _TRAINING_STATE.fullmatch(k))
    state.update({k: target[k] for k in set(target) - set(state) - set(missing)})
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the checkpoint lacks {', '.join(missing[:6])}"
                         + (" …" if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"the model has no {', '.join(unexpected[:6])}"
                         + (" …" if len(unexpected) > 6 else ""))
        raise RunError("checkpoint does not fit the model: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(target[k].shape)})"
             for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        raise RunError("checkpoint shapes differ from the model's: " + ", ".join(wrong[:4])
                       + (" …" if len(wrong) > 4 else ""))
    model.load_state_dict(state, strict=True)
    return model


# ---- forgec → HF ----------------------------------------------------------------------

# Each family's names for a MoE layer's router and experts (the per-expert
# layout of the Hub's checkpoints, which transformers 5 also writes).
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.{w}",
                {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.{w}",
                  {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "jamba": ("feed_forward.router", "feed_forward.experts.{e}.{w}",
              {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_MOE_NAMES["deepseek_v3"] = _MOE_NAMES["deepseek_v2"] = _MOE_NAMES["qwen3_moe"]
_MOE_NAMES["qwen2_moe"] = _MOE_NAMES["olmoe"] = _MOE_NAMES["qwen3_moe"]
_MOE_NAMES["phimoe"] = _MOE_NAMES["minimax_m2"] = _MOE_NAMES["mixtral"]
_MOE_NAMES["glm4_moe"] = _MOE_NAMES["dots1"] = _MOE_NAMES["qwen3_moe"]
_MOE_NAMES["glm4_moe_lite"] = _MOE_NAMES["solar_open"] = _MOE_NAMES["sarvam_mla"] = \
    _MOE_NAMES["flex_olmo"] = _MOE_NAMES["exaone_moe"] = _MOE_NAMES["qwen3_moe"]
_MOE_NAMES["qwen3_next"] = _MOE_NAMES["qwen3_moe"]
# families whose experts are (E, 2·hidden, dim) gate-then-up and (E, dim, hidden) tensors
# under these names, and their router's name
_PACKED_LINEAR_FAMILIES = {"granitemoe": ("block_sparse_moe.input_linear.weight",
                                          "block_sparse_moe.output_linear.weight",
                                          "block_sparse_moe.router.layer.weight")}
_PACKED_LINEAR_FAMILIES["granitemoeshared"] = _PACKED_LINEAR_FAMILIES["granitemoe"]
_PACKED_LINEAR_FAMILIES["granitemoe_swa"] = ("block_sparse_moe.experts.gate_up_proj",
                                             "block_sparse_moe.experts.down_proj",
                                             "block_sparse_moe.router.weight")
# families whose shared expert is packed as GraniteMoeShared's shared_mlp
_SHARED_MLP_FAMILIES = ("granitemoeshared", "granitemoe_swa")
# families whose experts are written packed, as transformers keeps them in memory
_PACKED_FAMILIES = ("gpt_oss",)
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma", "gemma2",
             "gemma3_text", "deepseek_v2", "deepseek_v3", *_PACKED_FAMILIES, "jamba", "mamba2",
             "qwen2_moe", "olmoe", *_PACKED_LINEAR_FAMILIES, "phimoe",
             "glm4_moe", "dots1", "glm4_moe_lite", "solar_open", "sarvam_mla",
             "flex_olmo", "minimax_m2", "exaone_moe", "qwen3_next",
             # more decoders (issue #13) with the Llama names
             "ministral", "seed_oss", "arcee", "granite_swa",
             "bamba")  # (Bamba: Jamba's names, its Mamba-2 mixers under `mamba`)
# families whose q_proj also yields a gate per query channel (each head's query rows,
# then its gate rows)
_GATED_QUERY = ("qwen3_next",)
# a family's own names for what the Llama names map to (HF name → its name)
_RENAMED = {
    "jamba": ((re.compile(r"model\.norm\.weight"), "model.final_layernorm.weight"),
              (re.compile(r"(model\.layers\.\d+)\.post_attention_layernorm\."), r"\1.pre_ff_layernorm."),
              (re.compile(r"(model\.layers\.\d+)\.mlp\."), r"\1.feed_forward.")),
    "qwen2_moe": ((re.compile(r"(model\.layers\.\d+\.mlp)\.shared_experts\."), r"\1.shared_expert."),
                  (re.compile(r"(model\.layers\.\d+\.mlp)\.shared_experts_gate\."),
                   r"\1.shared_expert_gate.")),
    "exaone_moe": ((re.compile(r"(model\.layers\.\d+)\.mlp\.gate\.e_score_correction_bias"),
                    r"\1.mlp.e_score_correction_bias"),),
    "minimax_m2": ((re.compile(r"(model\.layers\.\d+)\.mlp\.gate\.e_score_correction_bias"),
                    r"\1.block_sparse_moe.e_score_correction_bias"),),
    "mamba2": ((re.compile(r"model\.embed_tokens\."), "backbone.embeddings."),
               (re.compile(r"model\.norm\.weight"), "backbone.norm_f.weight"),
               (re.compile(r"^model\."), "backbone.")),
}
_RENAMED["bamba"] = _RENAMED["jamba"]  # Bamba: Jamba's names
_RENAMED["qwen3_next"] = _RENAMED["qwen2_moe"]  # its shared expert and gate


def _family_name(model_type: str, name: str) -> str:
    """A Llama-style HF name as `model_type`'s checkpoints spell it."""
    for pattern, repl in _RENAMED.get(model_type, ()):
        name = pattern.sub(repl, name)
    return name


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read the config {path}: {e}") from None
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError("config must be a dict, a config.json path (or its folder), or a "
                    f"transformers config, not {type(config).__name__}")


# forgec's dense tensor names → HF's (the inverse of _DIRECT; experts: _MOE_NAMES)
_TO_HF = [
    (re.compile(r"token_embedding\.embedding\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"norm\.weight"), "model.norm.weight"),
    (re.compile(r"output_head\.proj\.weight"), "lm_head.weight"),
    (re.compile(r"layers\.(\d+)\.attention_norm\.weight"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.mlp_norm\.weight"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.attention\.([qkvo])_proj\.(weight|bias)"),
     r"model.layers.\1.self_attn.\2_proj.\3"),
    (re.compile(r"layers\.(\d+)\.attention\.([qk])_norm\.weight"), r"model.layers.\1.self_attn.\2_norm.weight"),
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)"), r"model.layers.\1.mlp.\2_proj.\3"),
    (re.compile(r"layers\.(\d+)\.mlp\.router\.expert_bias"),
     r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (re.compile(r"layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight"),
     r"model.layers.\1.mlp.shared_experts.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.mlp\.shared_experts_gate\.weight"),
     r"model.layers.\1.mlp.shared_experts_gate.weight"),
    (re.compile(r"layers\.(\d+)\.attention\.([\w.]+)"), r"model.layers.\1.self_attn.\2"),
    (re.compile(r"layers\.(\d+)\.mamba\.(.+)"), r"model.layers.\1.mamba.\2"),
    (re.compile(r"layers\.(\d+)\.norm\.weight"), r"model.layers.\1.norm.weight"),
    (re.compile(r"layers\.(\d+)\.mixer\.(.+)"), r"model.layers.\1.mixer.\2"),
    # post-norms alone (FlexOlmo)
    (re.compile(r"layers\.(\d+)\.attention_post_norm\.weight"),
     r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.mlp_post_norm\.weight"),
     r"model.layers.\1.post_feedforward_layernorm.weight"),
    # LayerNorms with biases and a head with a bias (PhiMoE)
    (re.compile(r"norm\.bias"), "model.norm.bias"),
    (re.compile(r"layers\.(\d+)\.attention_norm\.bias"), r"model.layers.\1.input_layernorm.bias"),
    (re.compile(r"layers\.(\d+)\.mlp_norm\.bias"), r"model.layers.\1.post_attention_layernorm.bias"),
    (re.compile(r"output_head\.proj\.bias"), "lm_head.bias"),
    (re.compile(r"layers\.(\d+)\.linear_attn\.(.+)"), r"model.layers.\1.linear_attn.\2"),
]


# the norms of a sandwich-norm layer (see _SANDWICH)
_SANDWICH_TO_HF = [
    (re.compile(r"layers\.(\d+)\.post_attention_norm\.weight"),
     r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.mlp_norm\.weight"), r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (re.compile(r"layers\.(\d+)\.post_mlp_norm\.weight"),
     r"model.layers.\1.post_feedforward_layernorm.weight"),
]


def hf_name(key: str, sandwich: bool = False) -> str | None:
    """The HF name of a forgec tensor outside the experts, or None where a
    checkpoint of these families has no place for it; `sandwich`: the model's
    layers norm after their sublayers too (`post_attention_norm`)."""
    for pattern, repl in (_SANDWICH_TO_HF + _TO_HF if sandwich else _TO_HF):
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


def forge_to_hf(model: torch.nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the HF names of `model_type` (the inverse of hf_to_forge)."""
    if model_type not in _FAMILIES:
        raise RunError(f"model_type '{model_type}' is not one forgec writes "
                       f"({', '.join(_FAMILIES)})")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    state = model.state_dict()
    sandwich = any(k.endswith(".post_attention_norm.weight") for k in state)
    for key, t in state.items():
        if _TRAINING_STATE.fullmatch(key):
            continue
        t = t.detach()
        shared = re.fullmatch(r"layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", key)
        if shared and model_type in _SHARED_MLP_FAMILIES:  # packed as shared_mlp's
            prefix = f"model.layers.{shared.group(1)}.shared_mlp."
            if shared.group(2) == "down":
                out[prefix + "output_linear.weight"] = t
            elif shared.group(2) == "gate":
                up = state[f"layers.{shared.group(1)}.mlp.shared_experts.up_proj.weight"]
                out[prefix + "input_linear.weight"] = torch.cat([t, up.detach()])
            continue
        name = hf_name(key, sandwich)
        if name is not None:
            out[_family_name(model_type, name)] = t
        else:
            m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.(gate|up|down)_proj)", key)
            b = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.(?:weight|bias)|experts\.(gate|up|down)_(proj|bias))", key)
            if b and model_type in _PACKED_FAMILIES:  # gpt-oss: packed, interleaved
                prefix = f"model.layers.{b.group(1)}.mlp."
                role, kind = b.group(3), b.group(4)
                if role is None:
                    out[prefix + b.group(2)] = t
                elif role == "down":
                    out[prefix + ("experts.down_proj" + ("_bias" if kind == "bias" else ""))] = t
                else:
                    name = prefix + "experts.gate_up_proj" + ("_bias" if kind == "bias" else "")
                    if name not in out:  # gate and up columns alternate
                        sd = model.state_dict()
                        gate = sd[f"layers.{b.group(1)}.mlp.experts.gate_{kind}"].detach()
                        up = sd[f"layers.{b.group(1)}.mlp.experts.up_{kind}"].detach()
                        out[name] = torch.stack([gate, up], dim=-1).flatten(-2)
                continue
            if m and model_type in _PACKED_LINEAR_FAMILIES:  # GraniteMoE: packed, gate first
                gate_up, down, router = _PACKED_LINEAR_FAMILIES[model_type]
                prefix = f"model.layers.{m.group(1)}."
                if m.group(3) is None:
                    out[prefix + router] = t
                elif m.group(3) == "down":  # (E, hidden, dim) → (E, dim, hidden)
                    out[prefix + down] = t.transpose(1, 2).contiguous()
                elif m.group(3) == "gate":  # with up: (E, 2·hidden, dim)
                    up = state[f"layers.{m.group(1)}.mlp.experts.up_proj"].detach()
                    out[prefix + gate_up] = torch.cat([t, up], dim=2).transpose(1, 2).contiguous()
                continue
            if m and model_type in _MOE_NAMES:
                router, expert, names = _MOE_NAMES[model_type]
                prefix = f"model.layers.{m.group(1)}."
                if m.group(3) is None:
                    out[prefix + router + ".weight"] = t
                else:
                    role = m.group(3)
                    for e in range(t.shape[0]):  # (E, in, out) → E nn.Linear (out, in)
                        w = expert.format(e=e, w=names[role])
                        out[f"{prefix}{w}.weight"] = t[e].t().contiguous()
                continue
            unknown.append(key)
    if unknown:
        raise RunError(f"a {model_type} checkpoint has no place for "
                       + ", ".join(unknown[:6]) + (" …" if len(unknown) > 6 else ""))
    return out


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """The tensor names in order, cut into groups of at most `max_bytes` (a larger
    tensor alone in its group)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def save_hf_checkpoint(model: torch.nn.Module, out_dir: str | os.PathLike, *,
                       config: Any, max_shard_size: int | None = None) -> None:
    """Write `model` as a HF checkpoint: `out_dir/model.safetensors` and `config.json`.
    With `max_shard_size` (bytes), tensors past it go to further shards
    `model-0000i-of-0000n.safetensors` named by `model.safetensors.index.json`.

    `config` is the HF config of the model (a dict, a config.json or its folder, or a
    transformers config object); its `model_type` picks the names. The sizes it states
    are checked against the model's tensors. `load_hf_checkpoint` of the result gives
    back exactly the same tensors.
    """
    cfg = _config_dict(config)
    model_type = cfg.get("model_type")
    names = TABLE_FAMILIES.get(model_type)
    if callable(names):
        names = names(cfg)
    if names is not None:
        tensors = _table_to_hf(model.state_dict(), names, cfg)
        head = names.spine["output_head.proj"] + "weight"
        embed_key = names.spine["token_embedding.embedding"] + "weight"
        layer_prefix = names.layer.split("{i}")[0]
    else:
        tensors = forge_to_hf(model, model_type)
        head = "lm_head.weight"
        embed_key = _family_name(model_type, "model.embed_tokens.weight")
        layer_prefix = _family_name(model_type, "model.layers.")
    tied = _tied(model)
    tie_cfg = bool(cfg.get("tie_word_embeddings", False))
    if tie_cfg and not tied:
        raise RunError("config.json ties the head to the embedding (tie_word_embeddings) but "
                       "the model's head has its own weight")
    embed = tensors[embed_key]
    layers = {k[len(layer_prefix):].split(".")[0] for k in tensors if k.startswith(layer_prefix)}
    checks = [("vocab_size", embed.shape[0]), ("hidden_size", embed.shape[1]),
              ("num_hidden_layers", len(layers))]
    q = tensors.get(_family_name(model_type, "model.layers.0.self_attn.q_proj.weight"))
    if q is not None and "num_attention_heads" in cfg:
        # a latent attention's query head also holds its rotated channels (qk_head_dim)
        head_dim = cfg.get("qk_head_dim") or cfg.get("head_dim") \
            or cfg.get("hidden_size", 0) // cfg["num_attention_heads"]
        rows = 2 if model_type in _GATED_QUERY else 1  # with the gate's
        checks.append(("num_attention_heads × head_dim", q.shape[0],
                       rows * cfg["num_attention_heads"] * head_dim))
    for check in checks:
        key, have = check[0], check[1]
        want = check[2] if len(check) > 2 else cfg.get(key)
        if want is not None and want != have:
            raise RunError(f"config {key} = {want} but the model has {have}")
    if tie_cfg:
        del tensors[head]  # HF ties it again on load
    elif tied:
        tensors[head] = tensors[head].clone()  # safetensors: no sharing
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    shards = _shards(tensors, max_shard_size)
    if len(shards) == 1:
        _safetensors().save_file(tensors, os.path.join(out_dir, SAFE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _safetensors().save_file({k: tensors[k] for k in keys},
                                     os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
            total += sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
            f.write("\n")
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
