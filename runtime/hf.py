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
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight"), r"layers.\1.mlp.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight"), r"layers.\1.mlp.router.weight"),
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
]
_EXPERT = re.compile(
    r"layers\.(\d+)\.(?:block_sparse_moe|mlp|feed_forward)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_PACKED = re.compile(r"layers\.(\d+)\.(?:mlp|feed_forward)\.experts\.(gate_up_proj|down_proj)")
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


def hf_to_forge(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and pack the experts of) a HF state dict into forgec FQNs."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, t in hf.items():
        if _DERIVED.fullmatch(key):
            continue
        name = key.split(".", 1)[1] if key.startswith(("model.", "backbone.")) else key
        if key == "lm_head.weight":
            out[HEAD] = t
            continue
        for pattern, repl in _DIRECT:
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


def _tied(model: torch.nn.Module) -> bool:
    sd = model.state_dict(keep_vars=True)
    return HEAD in sd and EMBED in sd and sd[HEAD] is sd[EMBED]


def load_hf_checkpoint(model: torch.nn.Module, src: str | os.PathLike) -> torch.nn.Module:
    """Fill `model` (materialised, any dtype) from the HF checkpoint `src`, exactly:
    every parameter set, every checkpoint tensor used, shapes equal. Returns `model`."""
    state = hf_to_forge(read_hf_state_dict(src))
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
    missing = sorted(set(target) - set(state))
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
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "jamba", "mamba2")
# a family's own names for what the Llama names map to (HF name → its name)
_RENAMED = {
    "jamba": ((re.compile(r"model\.norm\.weight"), "model.final_layernorm.weight"),
              (re.compile(r"(model\.layers\.\d+)\.post_attention_layernorm\."), r"\1.pre_ff_layernorm."),
              (re.compile(r"(model\.layers\.\d+)\.mlp\."), r"\1.feed_forward.")),
    "mamba2": ((re.compile(r"model\.embed_tokens\."), "backbone.embeddings."),
               (re.compile(r"model\.norm\.weight"), "backbone.norm_f.weight"),
               (re.compile(r"^model\."), "backbone.")),
}


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
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight"), r"model.layers.\1.mlp.\2_proj.weight"),
    (re.compile(r"layers\.(\d+)\.mamba\.(.+)"), r"model.layers.\1.mamba.\2"),
    (re.compile(r"layers\.(\d+)\.norm\.weight"), r"model.layers.\1.norm.weight"),
    (re.compile(r"layers\.(\d+)\.mixer\.(.+)"), r"model.layers.\1.mixer.\2"),
]


def hf_name(key: str) -> str | None:
    """The HF name of a forgec tensor outside the experts, or None where a
    checkpoint of these families has no place for it."""
    for pattern, repl in _TO_HF:
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
    for key, t in model.state_dict().items():
        t = t.detach()
        name = hf_name(key)
        if name is not None:
            out[_family_name(model_type, name)] = t
        else:
            m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.(gate|up|down)_proj)", key)
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
    tensors = forge_to_hf(model, model_type)
    tied = _tied(model)
    tie_cfg = bool(cfg.get("tie_word_embeddings", False))
    if tie_cfg and not tied:
        raise RunError("config.json ties the head to the embedding (tie_word_embeddings) but "
                       "the model's head has its own weight")
    embed = tensors[_family_name(model_type, "model.embed_tokens.weight")]
    layers = _family_name(model_type, "model.layers.")
    checks = [("vocab_size", embed.shape[0]), ("hidden_size", embed.shape[1]),
              ("num_hidden_layers", len({k.split(".")[2] for k in tensors
                                         if k.startswith(layers)}))]
    q = tensors.get(_family_name(model_type, "model.layers.0.self_attn.q_proj.weight"))
    if q is not None and "num_attention_heads" in cfg:
        head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // cfg["num_attention_heads"]
        checks.append(("num_attention_heads × head_dim", q.shape[0],
                       cfg["num_attention_heads"] * head_dim))
    for check in checks:
        key, have = check[0], check[1]
        want = check[2] if len(check) > 2 else cfg.get(key)
        if want is not None and want != have:
            raise RunError(f"config {key} = {want} but the model has {have}")
    if tie_cfg:
        del tensors["lm_head.weight"]  # HF ties it again on load
    elif tied:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # safetensors: no sharing
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
