"""`forgec export-hf RUN_DIR -o DIR`: a training run → a transformers checkpoint.

DIR gets `config.json`, the weights as safetensors (sharded past
`--max-shard-size`, with `model.safetensors.index.json`) and the tokenizer
files: the run's own (`RUN/tokenizer/`), or for a byte-tokenizer run a
tokenizer.json that encodes exactly as the byte tokenizer does.
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` then computes the
run's logits.

config.json is the inverse of `forgec import-hf`: it is derived from the spec
the run was built from (compiled again; its sources must hash as the run's
package records), for the families import-hf reads — llama, mistral, qwen2,
qwen3, mixtral, qwen3_moe. The spec must be a decoder those families
express, which is checked exactly:

* components `token_embedding`, `rope`, `norm` (rmsnorm), `output_head`
  (no bias; tied or not; the rope is found by its op's role, so any name does
  as long as the attentions use it), and every layer's block is
  `h = x + attention(attention_norm(x)); return h + mlp(mlp_norm(h))` with
  rmsnorms, a causal RoPE attention and a SwiGLU `mlp` or a `moe` of
  softmax_topk routing without shared experts;
* one value for each size across layers, one norm epsilon;
* every argument the mapping does not read has its default.

With `--config PATH` the config.json is instead a Hugging Face config the user
gives — for any family import-hf reads, typically the one the spec was imported
from — once shown to describe the run's model: import-hf reads it, the spec it
writes is built, and that model, loaded with the weights as they are written
under this config, must compute the run's logits (`config_like`); nothing is
written otherwise.

The family is inferred (qk-norm: Qwen3 / Qwen3-MoE; experts without it:
Mixtral; q/k/v biases without an output bias: Qwen2; a window on every layer:
Mistral; else Llama) unless `--model-type` names one, which is checked to
express the spec. Training-only settings that a HF config has no field for
(zero_init, capacity_factor, z-loss, doc_restart) do not change the logits
and are reported as a note.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from forgec.compiler.errors import RunError, UsageError
from forgec.compiler.ops import OPS, foreign_op
from forgec.compiler.ops.rope.spec import SCALING_ARGS, default_attention_factor

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# Arguments that only shape training (initialisation, training-time routing and
# packing): a HF config has no field for them and the logits do not depend on them.
TRAINING_ONLY = {"zero_init", "capacity_factor", "aux_loss_weight", "z_loss_weight",
                 "doc_restart"}


class NotExportable(Exception):
    """The spec is not a decoder of the requested (or any) HF family."""


@dataclass
class Layer:
    window: int
    moe: dict | None  # {"experts", "top_k", "hidden", "renormalize", "aux_loss_weight"}


@dataclass
class Decoder:
    """What a HF config of these families says about a forgec model."""

    vocab: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    out_bias: bool
    qk_norm: bool
    eps: float
    ffn_hidden: int | None  # the dense layers' SwiGLU width (None: no dense layer)
    hidden_act: str  # the MLPs' and experts' activation, as their ops name it
    rope: dict
    max_seq_len: int
    tie: bool
    init_std: float
    layers: list[Layer]
    training_only: list[str] = field(default_factory=list)


# ---- the spec → Decoder --------------------------------------------------------------


def _plain(value: Any) -> Any:
    from forgec.compiler.bind import ComponentValue

    return value.component.name if isinstance(value, ComponentValue) else value


def _defaults(component) -> dict:
    return {a.name: a.default for a in component.op.args if not a.derived}


def _only(component, used: set[str], where: str, notes: list[str]) -> dict:
    """The component's arguments; refuse one the mapping does not read unless it
    has its default. Training-only arguments off their defaults become notes."""
    defaults = _defaults(component)
    args = {k: _plain(v) for k, v in component.args.items() if not k.startswith("_")}
    for key, value in sorted(args.items()):
        if key in used or key not in defaults or value == defaults[key]:
            continue
        if key in TRAINING_ONLY:
            notes.append(f"{where}.{key} = {value}")
            continue
        raise NotExportable(f"{where}: {key} = {value} has no Hugging Face config field "
                            f"(only its default {defaults[key]} exports)")
    return args


def _role(component) -> str | None:
    """The component's place in a Hugging Face decoder (`OpDef.foreign`), if any."""
    hf = component.op.foreign.get("hf")
    return hf.role if hf is not None else None


def _op(component, name: str, where: str) -> None:
    if component.op.name != name:
        raise NotExportable(f"{where} is {component.op.name}(...), not {name}(...)")


def _flow_tree(block) -> tuple:
    """The block's return value as an expression of its input (sums sorted)."""
    from forgec.compiler.bind import FAdd, FApply, FRef, FScale

    if len(block.inputs) != 1:
        raise NotExportable(f"block {block.name} takes {len(block.inputs)} inputs, not one")
    env = {block.inputs[0]: ("in",)}

    def tree(expr) -> tuple:
        if isinstance(expr, FRef):
            return env[expr.name]
        if isinstance(expr, FApply):
            return ("apply", expr.component, tuple(tree(a) for a in expr.args))
        if isinstance(expr, FAdd):
            return _add(tree(expr.left), tree(expr.right))
        if isinstance(expr, FScale):
            return ("scale", expr.factor, tree(expr.operand))
        raise NotExportable(f"block {block.name}: an expression forgec cannot export")

    for name, expr, _span in block.flow:
        env[name] = tree(expr)
    return tree(block.ret)


def _add(a: tuple, b: tuple) -> tuple:
    return ("add", *sorted((a, b), key=repr))


def _canonical(attention: str) -> tuple:
    """`h = x + attention(attention_norm(x)); return h + mlp(mlp_norm(h))` as a tree,
    with `attention` the name of the block's self-attention."""
    x = ("in",)
    h = _add(x, ("apply", attention, (("apply", "attention_norm", (x,)),)))
    return _add(h, ("apply", "mlp", (("apply", "mlp_norm", (h,)),)))


def _by_role(components: dict, places: set[str], role: str) -> tuple[str | None, set[str]]:
    """The component of `role` among those not at a named place (`places`), and the
    rest of those. The decoder layout names most components by their place
    (`norm`, `mlp_norm`, ...); the positions and the self-attention are found by
    the role their op declares, or, when no op of the role is there, the one
    component left over stands in their place (so that its op is reported)."""
    others = set(components) - places
    found = [n for n in sorted(others) if _role(components[n]) == role]
    if len(found) == 1:
        return found[0], others - set(found)
    if len(others) == 1:
        return others.pop(), set()
    return None, others


def _ref_arg(op, target: str) -> str:
    """The argument of `op` that names a component of op `target` (`ref:<op>|...`)."""
    found = [a.name for a in op.args if a.type.startswith("ref:")
             and target in a.type.removeprefix("ref:").split("|")]
    assert len(found) == 1, f"{op.name}: no one argument refers to {target}"
    return found[0]


def _placed(block, name: str) -> bool:
    """Whether a Hugging Face checkpoint has a place for every weight of the block's
    component `name` (the tensor names are the component names: runtime/hf.py)."""
    from .hf import hf_name

    comp = block.components[name]
    return all(hf_name(f"layers.0.{name}.{w}") is not None for w in comp.op.weights(comp.args))


# the rope's scaling arguments → transformers' rope_parameters keys (the scaling's name is
# its rope_type; the rope op's SCALING_ARGS says which arguments each reads)
ROPE_PARAMETERS = {
    "scaling": "rope_type", "scale_factor": "factor", "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_seq_len": "original_max_position_embeddings", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor", "truncate": "truncate",
    "short_factor": "short_factor", "long_factor": "long_factor",
}


def rope_parameters(rope_args: dict) -> dict:
    """transformers' rope_parameters of a rope's arguments: the ones its scaling reads
    (dynamic's original_max_seq_len is max_position_embeddings there), an attention
    factor only where it is not the one transformers derives."""
    scaling = rope_args["scaling"]
    out: dict[str, Any] = {"rope_type": "default" if scaling == "none" else scaling,
                           "rope_theta": float(rope_args["theta"])}
    for arg in SCALING_ARGS[scaling]:
        value = rope_args[arg]
        if arg == "original_max_seq_len" and scaling == "dynamic":
            continue
        if arg in ("mscale", "mscale_all_dim") and not value:
            continue  # 0: none, transformers' null
        if arg == "attention_factor" and value == default_attention_factor(rope_args):
            continue  # transformers derives the same
        if isinstance(value, tuple | list):
            value = [float(v) for v in value]
        elif isinstance(value, float | int) and not isinstance(value, bool) \
                and arg != "original_max_seq_len":
            value = float(value)
        out[ROPE_PARAMETERS[arg]] = value
    return out


def describe(model) -> Decoder:
    """The Decoder of a bound model (compiler.bind.Model); NotExportable if the
    model is not a pre-norm RMSNorm/RoPE/SwiGLU-or-MoE decoder."""
    notes: list[str] = []
    comps = model.components
    # the model's components → the ops a HF decoder has there; the positions
    # component is the one whose op plays that role, whatever its name
    positions_op = foreign_op("hf", "positions")
    places = {"token_embedding", "norm", "output_head"}
    pos, extra = _by_role(comps, places, "positions")
    if extra:
        raise NotExportable(f"model-level component(s) {', '.join(sorted(extra))} have no "
                            "place in a Hugging Face decoder")
    # with none at all, the message names it as import-hf's layout does: after its op
    pos = pos or positions_op
    expected = {name: foreign_op("hf", role) for name, role in (
        ("token_embedding", "token_embedding"), (pos, "positions"), ("norm", "norm"),
        ("output_head", "output_head"))}
    for name, op in expected.items():
        if name not in comps:
            raise NotExportable(f"the model has no '{name}' ({op}) component")
        _op(comps[name], op, name)
    if model.inserted:
        raise NotExportable("the stack inserts blocks between layers")
    emb = _only(comps["token_embedding"], {"vocab", "dim"}, "token_embedding", notes)
    head = _only(comps["output_head"], {"vocab", "dim", "tie", "bias"}, "output_head", notes)
    if head["bias"]:
        raise NotExportable("output_head has a bias; these families' lm_head has none")
    norm = _only(comps["norm"], {"dim", "eps"}, "norm", notes)
    rope_args = _only(comps[pos], {"head_dim", "max_seq_len", "theta", "rotary_dim",
                                   *ROPE_PARAMETERS}, pos, notes)
    if rope_args["rotary_dim"] != rope_args["head_dim"]:
        raise NotExportable(f"rope rotates {rope_args['rotary_dim']} of {rope_args['head_dim']} "
                            "channels per head; these families rotate whole heads")
    rope = rope_parameters(rope_args)
    max_seq_len = rope_args["max_seq_len"]
    if rope["rope_type"] == "dynamic":  # transformers' threshold of the dynamic base
        max_seq_len = rope_args["original_max_seq_len"]

    attention_op = foreign_op("hf", "self_attention")
    rope_arg = _ref_arg(OPS[attention_op], positions_op)  # attention's argument naming the rope
    attn_keys = ("dim", "heads", "kv_heads", "head_dim", "qkv_bias", "out_bias", "qk_norm")
    eps = {float(norm["eps"])}
    attention: dict | None = None
    ffn_hidden: set[int] = set()
    layers: list[Layer] = []
    acts: set[str] = set()  # hidden_act of the MLP and expert ops
    for slot in model.layers:
        block = model.blocks[slot.block]
        where = f"block {block.name}"
        # the layer's self-attention is the component whose op plays that role; the
        # norms and the MLP are named by their place
        att, rest = _by_role(block.components, {"attention_norm", "mlp_norm", "mlp"},
                             "self_attention")
        want = {"attention_norm": expected["norm"], att: attention_op,
                "mlp_norm": expected["norm"]}
        names = set(block.components)
        # its weights must sit where a checkpoint's names put them (runtime/hf.py)
        if att is None or rest or names != {*want, "mlp"} or not _placed(block, att):
            raise NotExportable(f"{where} has components {', '.join(sorted(names))}; a Hugging "
                                "Face decoder layer has attention_norm, attention, mlp_norm, mlp")
        for name, op in want.items():
            _op(block.components[name], op, f"{where}.{name}")
        if _flow_tree(block) != _canonical(att):
            raise NotExportable(f"{where} is not `h = x + attention(attention_norm(x)); return "
                                "h + mlp(mlp_norm(h))`")
        for name in ("attention_norm", "mlp_norm"):
            eps.add(float(_only(block.components[name], {"dim", "eps"}, f"{where}.{name}",
                                notes)["eps"]))
        a = _only(block.components[att], {*attn_keys, rope_arg, "causal", "window",
                                          "qk_norm_eps"}, f"{where}.{att}", notes)
        if not a["causal"]:
            raise NotExportable(f"{where}.{att} is not causal")
        if a[rope_arg] != pos:
            raise NotExportable(f"{where}.{att} does not use the model's {pos}")
        if a["qk_norm"]:
            eps.add(float(a["qk_norm_eps"]))
        if a["head_dim"] != rope_args["head_dim"]:
            raise NotExportable(f"{where}.{att} has head_dim {a['head_dim']} but the rope "
                                f"{rope_args['head_dim']}")
        this = {k: a[k] for k in attn_keys}
        if attention is not None and this != attention:
            diff = [k for k in attn_keys if this[k] != attention[k]]
            raise NotExportable(f"{where}.{att} differs from the first layer's in "
                                f"{', '.join(diff)}; a HF config has one attention")
        attention = this
        mlp = block.components["mlp"]
        if _role(mlp) == "mlp":
            acts.add(mlp.op.foreign["hf"].selects["hidden_act"][0])
            ffn_hidden.add(_only(mlp, {"dim", "hidden"}, f"{where}.mlp", notes)["hidden"])
            layers.append(Layer(int(a["window"]), None))
        elif _role(mlp) == "experts":
            acts.add(mlp.op.foreign["hf"].selects["hidden_act"][0])
            m = _only(mlp, {"dim", "experts", "top_k", "hidden", "router"}, f"{where}.mlp",
                      notes)
            if m["shared_experts"]:
                raise NotExportable(f"{where}.mlp has shared experts")
            router = mlp.args["router"].component
            if _role(router) != "router" or "renormalize" not in router.args:
                raise NotExportable(f"{where}.mlp routes with {router.op.name}; these families "
                                    "route with softmax top-k")
            r = _only(router, {"renormalize", "aux_loss_weight"}, f"{where}.mlp.router", notes)
            layers.append(Layer(int(a["window"]), {
                "experts": m["experts"], "top_k": m["top_k"], "hidden": m["hidden"],
                "renormalize": bool(r["renormalize"]),
                "aux_loss_weight": float(r["aux_loss_weight"])}))
        else:
            uses = " or ".join(name for role in ("mlp", "experts")
                               for name, op in OPS.items()
                               if op.foreign.get("hf") and op.foreign["hf"].role == role)
            raise NotExportable(f"{where}.mlp is {mlp.op.name}(...); these families use {uses}")
    if not layers:
        raise NotExportable("the model has no layers")
    if len(eps) > 1:
        raise NotExportable(f"the norms use different epsilons ({', '.join(map(str, sorted(eps)))}"
                            "); a HF config has one rms_norm_eps")
    if len(ffn_hidden) > 1:
        raise NotExportable("the dense layers' mlp widths differ")
    if len(acts) > 1:
        raise NotExportable("the MLPs and experts use different activations; a HF config has "
                            "one hidden_act")
    moes = [x.moe for x in layers if x.moe]
    for m in moes[1:]:
        if m != moes[0]:
            raise NotExportable("the mixture-of-experts layers differ; a HF config has one")
    return Decoder(
        vocab=emb["vocab"], dim=emb["dim"], heads=attention["heads"],
        kv_heads=attention["kv_heads"], head_dim=attention["head_dim"],
        qkv_bias=bool(attention["qkv_bias"]), out_bias=bool(attention["out_bias"]),
        qk_norm=bool(attention["qk_norm"]), eps=eps.pop(),
        ffn_hidden=ffn_hidden.pop() if ffn_hidden else None, hidden_act=acts.pop(), rope=rope,
        max_seq_len=max_seq_len, tie=head["tie"] is not None,
        init_std=float(model.params.get("init_std", 0.02)), layers=layers,
        training_only=sorted(set(notes)))


# ---- Decoder → config.json --------------------------------------------------------------


def infer_family(d: Decoder) -> str:
    if any(x.moe for x in d.layers):
        return "qwen3_moe" if d.qk_norm else "mixtral"
    if d.qk_norm:
        return "qwen3"
    if d.qkv_bias and not d.out_bias:
        return "qwen2"
    windows = {x.window for x in d.layers}
    if windows != {0} and len(windows) == 1:
        return "mistral"
    if windows != {0}:
        return "qwen2"  # windows on some layers: layer_types; refused below if not Qwen2
    return "llama"


def hf_config(d: Decoder, model_type: str, *, dtype: str = "float32",
              token_ids: dict | None = None) -> dict:
    """The config.json of `d` as a `model_type` model; NotExportable if that
    family cannot express it."""
    if model_type not in FAMILIES:
        raise UsageError(f"--model-type {model_type}: export-hf writes {', '.join(FAMILIES)}")
    moe_layers = [x.moe for x in d.layers if x.moe]
    moe = moe_layers[0] if moe_layers else None
    windows = [x.window for x in d.layers]
    n = len(d.layers)

    def refuse(why: str) -> NotExportable:
        return NotExportable(f"a {model_type} model cannot express this spec: {why}")

    if model_type in ("mixtral", "qwen3_moe") and moe is None:
        raise refuse("it has no mixture-of-experts layer")
    if model_type not in ("mixtral", "qwen3_moe") and moe is not None:
        raise refuse("it has mixture-of-experts layers (export as mixtral or qwen3_moe)")
    if (model_type in ("qwen3", "qwen3_moe")) != d.qk_norm:
        raise refuse("qk-norm " + ("is missing" if not d.qk_norm else "is not part of it"))
    if model_type == "qwen2":
        if not d.qkv_bias or d.out_bias:
            raise refuse("Qwen2 has q/k/v biases and no output bias")
    elif model_type in ("mistral", "mixtral"):
        if d.qkv_bias or d.out_bias:
            raise refuse("its attention has no biases")
    elif d.qkv_bias != d.out_bias:
        raise refuse("attention_bias puts biases on q, k, v and o together")

    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": d.vocab, "hidden_size": d.dim, "num_hidden_layers": n,
        "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim, "max_position_embeddings": d.max_seq_len,
        "rms_norm_eps": d.eps, "initializer_range": d.init_std,
        "tie_word_embeddings": d.tie, "hidden_act": d.hidden_act, "attention_dropout": 0.0,
        "rope_parameters": d.rope, "dtype": dtype, "use_cache": True,
    }
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = d.qkv_bias
    if model_type == "llama":
        cfg["mlp_bias"] = False
    dense_hidden = d.ffn_hidden
    if model_type == "mixtral":
        if d.ffn_hidden is not None:
            raise refuse("every Mixtral layer is a mixture of experts")
        if not moe["renormalize"]:
            raise refuse("Mixtral renormalises the top-k weights (renormalize = true)")
        dense_hidden = moe["hidden"]
    if dense_hidden is None:  # Qwen3-MoE with experts on every layer: any width
        dense_hidden = moe["hidden"]
    cfg["intermediate_size"] = dense_hidden

    if model_type == "llama" and any(windows):
        raise refuse("Llama has no sliding window")
    if model_type in ("mistral", "mixtral", "qwen3_moe") and len(set(windows)) > 1:
        raise refuse(f"{model_type} slides the window on every layer or none")
    if model_type in ("mistral", "mixtral"):
        cfg["sliding_window"] = windows[0] or None
    elif model_type == "qwen3_moe":
        cfg["use_sliding_window"] = bool(windows[0])
        cfg["sliding_window"] = windows[0] or None
        cfg["max_window_layers"] = n
    elif model_type in ("qwen2", "qwen3"):
        sizes = {w for w in windows if w}
        if len(sizes) > 1:
            raise refuse("its layers use windows of different sizes")
        cfg["use_sliding_window"] = bool(sizes)
        cfg["sliding_window"] = sizes.pop() if sizes else None
        cfg["max_window_layers"] = n
        cfg["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]

    if moe is not None:
        cfg["num_local_experts"] = moe["experts"]
        cfg["num_experts_per_tok"] = moe["top_k"]
        aux = moe["aux_loss_weight"]
        cfg["output_router_logits"] = aux > 0
        cfg["router_aux_loss_coef"] = aux if aux > 0 else 0.001
        if model_type == "mixtral":
            cfg["router_jitter_noise"] = 0.0
        else:
            cfg["moe_intermediate_size"] = moe["hidden"]
            cfg["norm_topk_prob"] = moe["renormalize"]
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = [i for i, x in enumerate(d.layers) if x.moe is None]
    cfg.update(token_ids or {})
    return cfg


# ---- the run ----------------------------------------------------------------------------


def run_model_spec(run_dir: str):
    """The bound model (compiler.bind.Model) of the spec a run was built from,
    compiled afresh and checked to be the run's (same sources hash)."""
    from forgec.compiler.driver import compile_and_report

    from .package import read_run_info, run_package_dir

    info = read_run_info(run_dir)
    spec = info.get("spec")
    with open(os.path.join(run_package_dir(run_dir), "spec.json"), encoding="utf-8") as f:
        recorded = json.load(f)
    if not isinstance(spec, str) or not os.path.isfile(spec):
        raise RunError(f"export-hf reads the spec {run_dir} was trained from ({spec}), which is "
                       "gone")
    comp = compile_and_report(spec, quiet=True)
    if comp is None:
        raise RunError(f"{spec} has errors now (above); export-hf needs the spec of the run")
    from forgec.compiler.emit import source_hash

    if source_hash(comp) != recorded.get("source_sha256"):
        raise RunError(f"{spec} changed since {run_dir} was built from it; export-hf needs the "
                       "spec of the run (restore it)")
    name = recorded["model"]
    if name in comp.vlms or name not in comp.models:
        raise RunError(f"{run_dir} trained {name}, which is not a text decoder: export-hf "
                       "writes causal language models")
    return comp.models[name]


def export_hf(run_dir: str, out_dir: str, *, model_type: str | None = None,
              config_from: str | None = None, max_shard_size: int = 5 * 10**9,
              force: bool = False, note_stream=None) -> dict:
    """Write the run's latest weights, config.json and tokenizer into `out_dir`.
    Returns the config. `config_from`: a Hugging Face config.json (or its folder) to
    write instead of deriving one, checked to describe the run's model (config_like)."""
    import torch

    from .generate import load_run_model
    from .hf import save_hf_checkpoint
    from .tokenizer import copy_tokenizer, run_tokenizer, write_byte_tokenizer

    note_stream = note_stream if note_stream is not None else sys.stderr
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UsageError(f"{out_dir} is not empty; --force replaces the checkpoint files in it")
    if model_type is not None and model_type not in FAMILIES:
        raise UsageError(f"--model-type {model_type}: export-hf writes {', '.join(FAMILIES)}")
    if model_type is not None and config_from is not None:
        raise UsageError("--model-type and --config exclude each other: the config names "
                         "its model_type")
    model_ir = run_model_spec(run_dir)
    tok = run_tokenizer(run_dir)
    decoder = None
    try:
        model, _ = load_run_model(run_dir)
        if config_from is not None:
            config = config_like(config_from, model, run_dir)
        else:
            decoder = describe(model_ir)
            family = model_type or infer_family(decoder)
            ids = {"eos_token_id": tok.eos_id}
            if getattr(tok, "bos_id", None) is not None:
                ids["bos_token_id"] = tok.bos_id
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            config = hf_config(decoder, family, dtype=dtype, token_ids=ids)
    except NotExportable as e:
        raise RunError(f"cannot export {run_dir}: {e}") from None
    if os.path.isdir(out_dir) and force:  # only what an export writes: -o may be any folder
        from forgec.compiler.importers.hf import TOKENIZER_FILES

        for name in os.listdir(out_dir):
            if name in ("config.json", *TOKENIZER_FILES) or (
                    name.startswith("model") and ".safetensors" in name):
                os.remove(os.path.join(out_dir, name))
    with torch.no_grad():
        save_hf_checkpoint(model, out_dir, config=config, max_shard_size=max_shard_size)
    if tok.folder is not None:
        copy_tokenizer(tok.folder, out_dir)
    else:
        write_byte_tokenizer(out_dir)
    if decoder is not None and decoder.training_only:
        note_stream.write("note: not in config.json (training-only; the logits do not depend "
                          "on them): " + ", ".join(decoder.training_only) + "\n")
    return config


def config_like(source: str, model, run_dir: str) -> dict:
    """The Hugging Face config at `source` (a config.json or its folder, e.g. the one the
    run's spec was imported from), once it is shown to describe `model`: forgec
    import-hf reads it, the imported spec is built, and that model, given the weights
    as save_hf_checkpoint writes them under this config, computes the run's logits.
    NotExportable (a located error) where it does not."""
    import shutil
    import tempfile

    import torch

    from forgec.compiler.diagnostics import Diagnostics, SourceCache, print_diagnostics
    from forgec.compiler.importers.common import JSONSyntaxError, parse_json
    from forgec.compiler.importers.hf import import_hf

    from .hf import load_hf_checkpoint, save_hf_checkpoint
    from .package import build_package, import_package

    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"--config {source}: cannot read {path}: {e.strerror or e}") from None
    diags = Diagnostics()
    try:
        spec_text = import_hf(parse_json(text, path), "exported", path, diags)
    except JSONSyntaxError as e:
        raise UsageError(f"--config {path}: not JSON: {e}") from None
    if spec_text is None or diags.error_count:
        sources = SourceCache()
        sources.add(path, text)
        print_diagnostics(diags, sources)  # located, as forgec import-hf prints them
        raise NotExportable(f"forgec cannot read {path} (above)")
    config = json.loads(text)  # valid JSON: parse_json read it
    work = tempfile.mkdtemp(prefix="forgec-export-")
    try:
        spec = os.path.join(work, "exported.forge")
        with open(spec, "w", encoding="utf-8") as f:
            f.write(spec_text)
        described = import_package(build_package(spec, work)).Transformer()
        try:
            with torch.no_grad():
                save_hf_checkpoint(model, os.path.join(work, "hf"), config=config)
            load_hf_checkpoint(described, os.path.join(work, "hf"))
        except (RunError, ValueError, KeyError) as e:
            raise NotExportable(f"{path} describes another model than the run's: {e}") from None
        described.to(next(model.parameters()).dtype).eval()
        vocab = min(model.config.vocab_size, described.config.vocab_size)
        probe = torch.randint(0, vocab, (2, min(16, model.config.max_seq_len)),
                              generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = model(probe), described(probe)
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
            diff = (want - got).abs().max().item() if want.shape == got.shape else "shapes"
            raise NotExportable(f"{path} describes another model than the run's: with the "
                                f"run's weights its logits differ (max {diff})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return config
