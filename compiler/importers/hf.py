"""`forgec import-hf`: a Hugging Face `config.json` → a .forge spec.

Supported families (the `model_type` of the config): llama, mistral, qwen2,
qwen3, mixtral and qwen3_moe (`Importer`, with the MoE and sliding-window rules
of those families), and the decoders of `DENSE` (`DenseImporter`): GPT-NeoX,
GPT-J, Phi, Phi-3, StableLM, Starcoder2, OLMo, OLMo 2, Granite, Cohere, GLM-4,
SmolLM3, Gemma, Gemma 2, Gemma 3 (text), DeepSeek-V2, DeepSeek-V3 and gpt-oss, each a
small table (its config class's defaults, its names for the
shared fields, what its layer fixes) read by one translation of config fields
into ops: LayerNorm or RMSNorm, pre-, post- or sandwich norms, sequential or
parallel residuals, partial rotary, gelu / gelu-tanh MLPs written as modules of
the spec, biases, multipliers, NoPE layers, clip_qkv, qk-norm over the whole
projection — and, with a table of their experts' fields (`Experts`), the MoE
decoders OLMoE, Qwen2-MoE (a shared expert behind a sigmoid gate) and GraniteMoE;
further dense decoders as entries of the same table: Ministral, Seed-OSS, Helium,
ERNIE 4.5, GLM, Arcee, VaultGemma, OLMo 3, Cohere 2, EXAONE 4, Granite SWA, HunYuan
(dense), Nemotron, BitNet, Persimmon and Falcon (gated MLPs with biases, inner norms or
other activations, and ReLU², are modules of the spec; full layers without positions; a
qk-norm after RoPE or of LayerNorms; LayerNorm1P; a norm of the heads' output; Falcon's
layouts read by a rule of its fields).
The state-space hybrids of `HYBRID` (`HybridImporter`): Jamba (Mamba and attention
layers, experts, by period), Mamba-2, Bamba (Mamba-2 mixers and attention layers by
list, an MLP on each) and LFM2 (short convolutions and attention by layer_types).
Qwen3-Next is a `DENSE` family whose linear_attention layers (layer_types, else
full_attention_interval) are gated DeltaNet mixers beside gated attention. The
further mixtures of experts are `DENSE` entries too: PhiMoE (its sparsemixer router),
GraniteMoeShared and GraniteMoeSWA (a shared expert; windows, sinks, NoPE layers),
FlexOlmo (OLMo 2's layers, OLMoE's experts), and DeepSeek-V3's routed experts under
other attentions — GLM-4-MoE, dots.llm1, Solar Open, MiniMax-M2, EXAONE-MoE — or its own
(GLM-4-MoE-Lite, Sarvam-MLA). `REFUSED` names the families looked at whose layers the
language cannot say, each at the field that says why. The semantics follow
`transformers` 5.x (and the 4.x field names `rope_theta`/`rope_scaling` and
`num_experts` are read too); a field missing from the file takes the default of
transformers' config class, and the spec says so.

Every key of the config is accounted for: mapped into the spec, checked to
have a value the spec can express (else a located error), or known not to
change the model (token ids, dtype, `use_cache`, ...). A key the importer does
not know is an error (E115) unless `--ignore KEY` acknowledges it.

Decisions (see docs/errors.md, "Importing configs"):
* dropout (`attention_dropout`) and Mixtral's `router_jitter_noise` other than
  0 are errors: they change training, and forgec has neither;
* HF's MoE balance loss is only added when `output_router_logits` is true; the
  spec's `aux_loss_weight` is `router_aux_loss_coef` then, and 0 otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..diagnostics import Diagnostics
from ..ops import foreign_choices, foreign_op, foreign_ops
from ..ops.rope.spec import SCALING_ARGS, yarn_mscale
from .common import Decoder, Expr, Fields, LayerKind, Located, Params, fmt, own_module_name

MOE_FAMILIES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class Family:
    title: str
    architectures: tuple[str, ...]
    defaults: dict  # transformers 5.x defaults of the fields we read


_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
           "attention_dropout": 0.0, "rope_theta": 10000.0}

FAMILIES = {
    "llama": Family("Llama", ("LlamaForCausalLM",), {
        **_COMMON, "num_key_value_heads": None, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "head_dim": None}),
    "mistral": Family("Mistral", ("MistralForCausalLM",), {
        **_COMMON, "num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6, "sliding_window": 4096}),
    "qwen2": Family("Qwen2", ("Qwen2ForCausalLM",), {
        **_COMMON, "num_key_value_heads": 32, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "head_dim": None}),
    "qwen3": Family("Qwen3", ("Qwen3ForCausalLM",), {
        **_COMMON, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": 4096, "max_window_layers": 28}),
    "mixtral": Family("Mixtral", ("MixtralForCausalLM",), {
        **_COMMON, "rope_theta": 1000000.0, "num_key_value_heads": 8, "head_dim": None,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "sliding_window": None,
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0}),
    "qwen3_moe": Family("Qwen3-MoE", ("Qwen3MoeForCausalLM",), {
        **_COMMON, "num_key_value_heads": 4, "head_dim": None, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": 4096, "max_window_layers": None, "decoder_sparse_step": 1,
        "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "mlp_only_layers": []}),
}

# Keys that do not change the model's function: bookkeeping, generation and
# runtime flags. (`torch_dtype`/`dtype` is the checkpoint's storage type: the
# generated model takes any dtype.)
NOT_ARCHITECTURE = (
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    # splits the matmuls of pretraining tensor parallelism into slices: the same function
    "pretraining_tp",
)


# transformers' rope types: "default", and the rope op's scalings (the same names)
ROPE_TYPES = ("default", *[s for s in SCALING_ARGS if s != "none"])


def _float_list(values: list) -> Expr:
    """A list of numbers as .forge source: on one line if short, else wrapped at 96."""
    items = [fmt(float(v)) for v in values]
    if len(", ".join(items)) <= 60:
        return Expr("[" + ", ".join(items) + "]")
    rows = [""]
    for item in items:
        if rows[-1] and len(rows[-1]) + len(item) + 2 > 92:
            rows.append("")
        rows[-1] += (", " if rows[-1] else "") + item
    return Expr("[\n    " + ",\n    ".join(rows) + "]")


class Importer:
    def __init__(self, src: Located, diags: Diagnostics, ignore: set[str]) -> None:
        self.src, self.diags, self.ignore = src, diags, ignore
        self.p = Params()
        self.notes: list[str] = []
        self.layer_rule: str | None = None  # which layers slide, for a comment
        self.experts_key = "num_local_experts"
        self.act: str | None = None  # hidden_act: it chooses the MLP and expert ops
        self.partial_rotary = False  # the family's attention may rotate part of a head
        self.linear_mixer: str | None = None  # the foreign role of a linear-attention mixer
        # the top-level field of the RoPE base (GPT-NeoX's 4.x configs: rotary_emb_base)
        self.theta_key = "rope_theta"
        # (partial_rotary_factor or rotary_dim, the field it comes from)
        self.rotary_fraction: tuple[float | int, str] | None = None
        # the partial_rotary_factor of a config that leaves it out (Bamba's: 0.5)
        self.partial_default = 1.0
        self.max_pos: int | None = None  # max_position_embeddings
        # the RoPE's scaling, as transformers' rope_parameters (DeepSeek's softmax scale)
        self.rope_scaling: dict = {}

    def note_default(self, f: Fields, key: str, hf_key: str | None = None) -> str:
        name = hf_key or f.name(key)
        return f"{name} (default)" if key in f.defaulted else name

    def run(self, name: str, source: str, max_seq_len: int | None) -> Decoder | None:
        src, diags = self.src, self.diags
        if not isinstance(src.value, dict):
            diags.error("E110", "config.json must be a JSON object", src.span(()))
            return None
        f = Fields(src, src.value, (), diags, "config.json")
        model_type = f.get("model_type", "str", hint="a transformers config names its "
                           "family, e.g. \"model_type\": \"llama\"")
        if model_type is None:
            return None
        if model_type not in FAMILIES:
            f.error("E111", "model_type", f"model_type '{model_type}' cannot be imported",
                    "forgec imports " + ", ".join([*FAMILIES, *DENSE, *HYBRID]))
            return None
        fam = FAMILIES[model_type]
        d = fam.defaults
        f.consume(*NOT_ARCHITECTURE)
        archs = f.get("architectures", "list?", None)
        for i, a in enumerate(archs or []):
            if a not in fam.architectures:
                head = ("a causal language model" if str(a).endswith("ForCausalLM")
                        else "another head")
                self.diags.error("E114", f"architecture '{a}' is not {fam.architectures[0]}: "
                                 f"it has {head}", src.span(("architectures", i)),
                                 "forgec imports the causal language models of "
                                 + ", ".join(x.architectures[0] for x in FAMILIES.values()))

        p = self.p
        vocab = f.get("vocab_size", "int", positive=True)
        dim = f.get("hidden_size", "int", positive=True)
        n_layers = f.get("num_hidden_layers", "int", positive=True)
        heads = f.get("num_attention_heads", "int", positive=True)
        ffn = f.get("intermediate_size", "int", positive=True)
        kv = f.get("num_key_value_heads", "int?", d["num_key_value_heads"], positive=True)
        kv_note = self.note_default(f, "num_key_value_heads")
        if kv is None and heads:  # null: as many as query heads
            kv, kv_note = heads, kv_note + " = num_attention_heads"
        head_dim = f.get("head_dim", "int?", d["head_dim"], positive=True)
        hd_note = self.note_default(f, "head_dim")
        if head_dim is None and dim and heads:
            head_dim, hd_note = dim // heads, "hidden_size / num_attention_heads"
        max_pos = f.get("max_position_embeddings", "int", d["max_position_embeddings"],
                        positive=True)
        eps = f.get("rms_norm_eps", "float", d["rms_norm_eps"])
        init = f.get("initializer_range", "float", d["initializer_range"])
        for key, v in (("rms_norm_eps", eps), ("initializer_range", init)):
            if v is not None and not 0 <= v <= 1:
                f.error("E113", key, f"'{key}' must be between 0 and 1, got {fmt(v)}")
        if kv and heads and heads % kv:
            f.error("E113", "num_key_value_heads", f"num_key_value_heads = {kv} does not divide "
                    f"num_attention_heads = {heads}")
        tie = f.get("tie_word_embeddings", "bool", d["tie_word_embeddings"])
        act = f.get("hidden_act", "str", d["hidden_act"])
        self.act = act
        if act is not None and foreign_op("hf", "mlp", hidden_act=act) is None:
            f.error("E114", "hidden_act", f"hidden_act '{act}' cannot be expressed: forgec's "
                    "SwiGLU MLPs and experts use SiLU", "only silu (= swish) imports")
        drop = f.get("attention_dropout", "float", d["attention_dropout"])
        if drop:
            f.error("E114", "attention_dropout", f"attention_dropout = {fmt(drop)}: forgec has "
                    "no dropout, and HF applies it in training",
                    "set it to 0.0 to import the model for training without dropout")
        qkv_bias = out_bias = False
        if model_type == "llama":
            qkv_bias = out_bias = bool(f.get("attention_bias", "bool", d["attention_bias"]))
            if f.get("mlp_bias", "bool", d["mlp_bias"]):
                f.error("E114", "mlp_bias", "mlp_bias = true cannot be expressed: forgec's "
                        "swiglu has no biases")
        elif model_type in ("qwen3", "qwen3_moe"):
            qkv_bias = out_bias = bool(f.get("attention_bias", "bool", d["attention_bias"]))
        elif model_type == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
            if f.get("use_mrope", "bool", False):  # transformers 4.4x: Qwen2-VL's RoPE
                f.error("E114", "use_mrope", "use_mrope = true (multimodal RoPE) cannot be "
                        "expressed")

        if None in (vocab, dim, n_layers, heads, ffn, kv, head_dim, max_pos, eps, init, tie):
            self._rest(f, model_type, n_layers or 1)  # report the other fields' errors too
            return None

        p.add("vocab_size", vocab, "vocab_size")
        p.add("dim", dim, "hidden_size")
        p.add("n_layers", n_layers, "num_hidden_layers")
        p.add("n_heads", heads, "num_attention_heads")
        p.add("n_kv_heads", kv, kv_note)
        p.add("head_dim", head_dim, hd_note)
        p.add("ffn_hidden", ffn, "intermediate_size")
        if max_seq_len is not None:
            p.add("max_seq_len", max_seq_len,
                  f"--max-seq-len (max_position_embeddings = {max_pos})")
        else:
            p.add("max_seq_len", max_pos, self.note_default(f, "max_position_embeddings"))
        self.max_pos = max_pos  # what a RoPE scaling reads as the context
        p.add("norm_eps", eps, self.note_default(f, "rms_norm_eps"))
        p.add("init_std", init, self.note_default(f, "initializer_range"))
        p("init_std")

        rope = self._rope(f, d)
        window, kinds = self._layers(f, model_type, d, n_layers)
        moe_args, kinds, stack_notes = self._moe(f, model_type, d, kinds)

        attention = ["dim", f"heads = {p('n_heads')}", f"kv_heads = {p('n_kv_heads')}",
                     f"head_dim = {p('head_dim')}", "rope = rope"]
        if qkv_bias:
            attention.append("qkv_bias = true")
        if out_bias:
            attention.append("out_bias = true")
        if model_type in ("qwen3", "qwen3_moe"):
            attention += ["qk_norm = true", f"qk_norm_eps = {p('norm_eps')}"]
        acknowledged = f.unknown(self.ignore, fam.title)
        if diags.error_count or rope is None:
            return None

        shown = os.path.dirname(source) if source.endswith("config.json") else source
        archs_text = ", ".join(archs) if archs else f"no architectures (model_type {model_type})"
        version = src.value.get("transformers_version")
        header = [
            f"{fam.title} model imported by `forgec import-hf` from {source}",
            f"({archs_text}, model_type \"{model_type}\""
            + (f", transformers {version})." if version else ")."),
            "Each parameter's comment names the config.json field it comes from; \"(default)\":",
            "not in the file, transformers' default.",
            f"Weights: runtime.hf.load_hf_checkpoint(model, \"{shown}\").",
        ]
        header += self.notes
        if acknowledged:
            header.append("Ignored at the user's request (--ignore): " + ", ".join(acknowledged)
                          + ".")
        return Decoder(
            name=name, header=header, params=p,
            norm=f"{foreign_op('hf', 'norm')}(dim, eps = {p('norm_eps')})",
            rope=rope, attention=attention, window=window,
            mlp=(foreign_op("hf", "mlp", hidden_act=act), ["dim", f"hidden = {p('ffn_hidden')}"])
            if any(not k.moe for k in kinds) else None,
            moe=moe_args, kinds=kinds, tie=tie, framework="hf", stack_notes=stack_notes)

    def _rest(self, f: Fields, model_type: str, n_layers: int) -> None:
        """Check the other fields too, when the core sizes are missing or wrong."""
        d = FAMILIES[model_type].defaults
        for name in ("head_dim", "max_seq_len", "ffn_hidden"):  # placeholders, never written
            self.p.add(name, 0)
        self._rope(f, d)
        self._layers(f, model_type, d, n_layers)
        self._moe(f, model_type, d, [LayerKind(False, False)] * n_layers)
        f.unknown(self.ignore, FAMILIES[model_type].title)

    # ---- RoPE ------------------------------------------------------------------------

    def _rope(self, f: Fields, d: dict) -> list[str] | None:
        p = self.p
        theta_key = self.theta_key if self.theta_key in f else "rope_theta"
        top_theta = f.get(theta_key, "float", d["rope_theta"])
        theta_note = self.note_default(f, theta_key)
        params = f.get("rope_parameters", "dict?", None)
        scaling = f.get("rope_scaling", "dict?", None)
        if params is not None and scaling is not None:
            f.error("E116", "rope_scaling", "both rope_parameters and rope_scaling are given",
                    "transformers 5 writes rope_parameters; remove rope_scaling")
            return None
        rp = None
        if params is not None or scaling is not None:
            key = "rope_parameters" if params is not None else "rope_scaling"
            rp = Fields(self.src, params if params is not None else scaling, (key,), self.diags,
                        key)
        theta = top_theta
        rope_type = "default"
        if rp is not None:
            if "rope_theta" in rp:
                theta = rp.get("rope_theta", "float")
                theta_note = rp.name("rope_theta")
                if "rope_theta" in f and "rope_theta" not in f.defaulted and theta != top_theta:
                    rp.error("E116", "rope_theta", f"{rp.name('rope_theta')} = {fmt(theta)} "
                             f"contradicts rope_theta = {fmt(top_theta)}")
            key = "rope_type" if "rope_type" in rp or "type" not in rp else "type"
            rope_type = rp.get(key, "str", "default")
            if "rope_type" in rp and "type" in rp:
                rp.consume("type")
                if rp.obj["type"] != rope_type:
                    rp.error("E116", "type", f"{rp.name('type')} contradicts "
                             f"{rp.name('rope_type')}")
            if rope_type is None:  # reported (E113)
                rp.consume(*rp.obj)
                return None
            partial = rp.get("partial_rotary_factor", "float", self.partial_default)
            if partial is not None and partial != 1.0:
                if self.partial_rotary:
                    self.rotary_fraction = (partial, self.note_default(
                        rp, "partial_rotary_factor", rp.name("partial_rotary_factor")))
                else:
                    rp.error("E114", "partial_rotary_factor", "partial_rotary_factor = "
                             f"{fmt(partial)} cannot be expressed: this family rotates whole "
                             "heads")
            if rope_type not in ROPE_TYPES:
                rp.error("E114", key, f"rope type '{rope_type}' cannot be expressed: forgec's "
                         "rope has no such scaling",
                         "forgec's rope op scales as " + ", ".join(ROPE_TYPES))
                rp.consume(*rp.obj)  # that type's own settings are beside the point
                return None
        if rp is None and self.partial_default != 1.0:
            self.rotary_fraction = (self.partial_default, "partial_rotary_factor (default)")
        if theta is None:
            return None
        p.add("rope_theta", theta, theta_note)
        args = [f"head_dim = {p('head_dim')}", f"max_seq_len = {p('max_seq_len')}",
                f"theta = {p('rope_theta')}"]
        if self.rotary_fraction is not None and "head_dim" in p:
            fraction, field_name = self.rotary_fraction
            head_dim = p.value("head_dim")
            rotary = int(head_dim * fraction) if isinstance(fraction, float) else fraction
            if rotary != head_dim:
                p.add("rotary_dim", rotary, f"{field_name} = {fmt(fraction)}"
                      + (f" of head_dim {head_dim}" if isinstance(fraction, float) else ""))
                args.append(f"rotary_dim = {p('rotary_dim')}")
        if rp is not None and rope_type != "default":
            scaling = self._rope_scaling(f, rp, rope_type, d, key)
            if scaling is None:
                return None
            args += scaling
        if rp is not None:
            rp.unknown(self.ignore, "RoPE")
        return args

    def _rope_scaling(self, f: Fields, rp: Fields, rope_type: str, d: dict,
                      key: str = "rope_type") -> list[str] | None:
        """The rope's scaling arguments from rope_parameters (transformers 5) or
        rope_scaling (4.x) of type `rope_type`, read as modeling_rope_utils.py reads them
        (what is derived is said in the header)."""
        p = self.p
        where = rp.name(key)
        reads = SCALING_ARGS[rope_type]  # the rope's arguments of this scaling
        notes = {"llama3": "Llama 3 frequency scaling", "dynamic": "dynamic NTK scaling (the "
                 "base grows with a sequence past original_max_seq_len, transformers' "
                 "max_position_embeddings)", "yarn": "YaRN scaling", "longrope": "LongRoPE "
                 "scaling (the long factors past original_max_seq_len)"}
        said = [f"RoPE: {notes.get(rope_type, rope_type + ' scaling')} from {where}"]
        orig = None
        if "original_max_seq_len" in reads and rope_type != "dynamic":
            # transformers' standardize_rope_params: a top-level field wins (Phi-3 has
            # one by default), then rope_parameters', then max_position_embeddings
            if "original_max_position_embeddings" in f \
                    or "original_max_position_embeddings" in d:
                orig = f.get("original_max_position_embeddings", "int",
                             d.get("original_max_position_embeddings"), positive=True)
                rp.consume("original_max_position_embeddings")
                said.append("original_max_seq_len: "
                            + self.note_default(f, "original_max_position_embeddings"))
            else:
                orig = rp.get("original_max_position_embeddings", "int", self.max_pos,
                              positive=True)
                if "original_max_position_embeddings" in rp.defaulted:
                    said.append("original_max_seq_len: max_position_embeddings")
            if orig is None:
                return None
        if rope_type == "dynamic":
            # the threshold of transformers' dynamic_rope_update is max_position_embeddings;
            # the model accepts factor times as many positions (unless --max-seq-len says)
            if self.max_pos is None:
                return None
            orig = self.max_pos
        if rope_type in ("yarn", "longrope"):
            factor = rp.get("factor", "float?", None)
            if factor is None and self.max_pos:  # transformers' rule: the context's growth
                factor = self.max_pos / orig
                said.append("scale_factor: max_position_embeddings / "
                            "original_max_position_embeddings")
        else:
            factor = rp.get("factor", "float", hint=f"{rope_type} scaling needs factor")
        # a LongRoPE factor only sets the attention factor, 1 where it is ≤ 1 (a derived
        # one can be: max_position_embeddings below Phi-3's original 4096)
        shrunk = rope_type == "longrope" and factor is not None and factor < 1.0 \
            and "factor" not in rp.obj
        if shrunk:
            factor = None
            said[-1] = "attention_factor 1: max_position_embeddings is below the original"
        elif factor is None:
            return None
        elif factor < 1.0:
            rp.error("E113", "factor", f"'{rp.name('factor')}' must be ≥ 1, got {fmt(factor)}")
            return None
        args = [f"scaling = {rope_type}"]
        if factor is not None:
            args.append(f"scale_factor = {fmt(factor)}")
        if rope_type == "dynamic" and "max_seq_len" in p \
                and not p.items["max_seq_len"].note.startswith("--max-seq"):
            p.add("max_seq_len", int(self.max_pos * factor), "max_position_embeddings · "
                  f"{rp.name('factor')}: the dynamic base serves that context")
            p("max_seq_len")  # the rope's arguments read it already
        self.notes.append("; ".join(said) + ".")
        self.rope_scaling = {"rope_type": rope_type, "factor": factor}
        if rope_type == "llama3":
            low = rp.get("low_freq_factor", "float")
            high = rp.get("high_freq_factor", "float")
            if None in (low, high):
                return None
            args += [f"low_freq_factor = {fmt(low)}", f"high_freq_factor = {fmt(high)}"]
        if orig is not None:
            args.append(f"original_max_seq_len = {orig}")
        if rope_type == "yarn":
            # null or 0 is transformers' default (`beta_fast or 32`, `if mscale and ...`)
            for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 0.0),
                                  ("mscale_all_dim", 0.0)):
                v = rp.get(name, "float?", None)
                if v:
                    args.append(f"{name} = {fmt(v)}")
                self.rope_scaling[name] = v or default
            if rp.get("truncate", "bool?", None) is False:
                args.append("truncate = false")
        if rope_type in ("yarn", "longrope"):
            af = rp.get("attention_factor", "float?", None)
            if af is not None and af <= 0:
                rp.error("E113", "attention_factor", f"'{rp.name('attention_factor')}' "
                         f"must be positive, got {fmt(af)}")
                return None
            if af is not None or shrunk:
                args.append(f"attention_factor = {fmt(af if af is not None else 1.0)}")
        if rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = rp.get(name, "list")
                if factors is None:
                    return None
                if not all(isinstance(x, int | float) and not isinstance(x, bool)
                           and x > 0 for x in factors):
                    rp.error("E113", name, f"'{rp.name(name)}' must be a list of positive "
                             "numbers")
                    return None
                p.add(f"rope_{name}", _float_list(factors), rp.name(name))
                args.append(f"{name} = {p(f'rope_{name}')}")
        return args

    # ---- attention windows -------------------------------------------------------------

    def _layers(self, f: Fields, model_type: str, d: dict,
                n: int) -> tuple[str | None, list[LayerKind]]:
        """The sliding window (a parameter name) and which layers use it."""
        full = [LayerKind(False, False) for _ in range(n)]
        p = self.p
        if model_type == "llama":
            return None, full
        if model_type in ("mistral", "mixtral"):
            w = f.get("sliding_window", "int?", d["sliding_window"], positive=True)
            if w is None:
                return None, full
            p.add("window", w, self.note_default(f, "sliding_window"))
            return p("window"), [LayerKind(True, False) for _ in range(n)]
        use = f.get("use_sliding_window", "bool", d["use_sliding_window"])
        w = f.get("sliding_window", "int?", d["sliding_window"], positive=True)
        mwl = f.get("max_window_layers", "int?", d["max_window_layers"])
        effective = w if use else None
        if model_type == "qwen3_moe":
            # Qwen3-MoE slides every layer when use_sliding_window (max_window_layers unused)
            if effective is None:
                return None, full
            p.add("window", w, self.note_default(f, "sliding_window")
                  + " (use_sliding_window: every layer)")
            return p("window"), [LayerKind(True, False) for _ in range(n)]
        types = f.get("layer_types", "list?", None)
        if types is None:
            flags = [effective is not None and mwl is not None and i >= mwl for i in range(n)]
            rule = f"use_sliding_window: layers from max_window_layers = {mwl} on slide"
        else:
            if len(types) != n:
                f.error("E116", "layer_types", f"layer_types has {len(types)} entries for "
                        f"{n} layers (num_hidden_layers)")
                return None, full
            flags = []
            for i, t in enumerate(types):
                if t not in ("full_attention", "sliding_attention"):
                    self.diags.error("E114", f"layer type {t!r} cannot be expressed",
                                     self.src.span(("layer_types", i)),
                                     "layer types are full_attention or sliding_attention")
                flags.append(t == "sliding_attention")
            if any(flags) and effective is None:
                f.error("E116", "layer_types", "layer_types has sliding_attention layers but "
                        "there is no window (use_sliding_window is false or sliding_window "
                        "null)")
                return None, full
            rule = ("layer_types: sliding_attention on layers "
                    + ", ".join(str(i) for i, flag in enumerate(flags) if flag))
        if not any(flags):
            return None, full
        p.add("window", effective, "sliding_window")
        self.layer_rule = rule
        return p("window"), [LayerKind(flag, False) for flag in flags]

    # ---- mixture of experts ------------------------------------------------------------

    def _experts(self, f: Fields) -> int | None:
        """num_local_experts (transformers 5) or num_experts (4.x and the Hub's Qwen3-MoE)."""
        a = f.get("num_local_experts", "int", None) if "num_local_experts" in f else None
        b = f.get("num_experts", "int", None) if "num_experts" in f else None
        if a is not None and b is not None and a != b:
            f.error("E116", "num_experts", f"num_experts = {b} contradicts "
                    f"num_local_experts = {a}")
            return None
        if a is None and b is None:
            if "num_local_experts" not in f and "num_experts" not in f:
                f.error("E112", None, "config.json has no 'num_local_experts' (or "
                        "'num_experts')", "forgec does not guess sizes: write the field")
            return None
        self.experts_key = "num_local_experts" if a is not None else "num_experts"
        return a if a is not None else b

    def check_experts_act(self, f: Fields, key: str) -> None:
        """E114 at `key` where the experts cannot say hidden_act: a dense MLP of any
        activation is a spec module (GeGLU, a two-layer MLP), the experts are SwiGLUs."""
        if self.act is not None and foreign_op("hf", "experts", hidden_act=self.act) is None:
            f.error("E114", key, f"{key} '{self.act}' cannot be expressed for the experts",
                    "forgec's experts are SwiGLU (silu)")

    def _moe(self, f: Fields, model_type: str, d: dict, kinds: list[LayerKind]):
        if model_type not in MOE_FAMILIES:
            return None, kinds, [self.layer_rule] if self.layer_rule else []
        p, n = self.p, len(kinds)
        experts = self._experts(f)
        top_k = f.get("num_experts_per_tok", "int", positive=True)
        logits = f.get("output_router_logits", "bool", d["output_router_logits"])
        coef = f.get("router_aux_loss_coef", "float", d["router_aux_loss_coef"])
        notes = []
        if model_type == "mixtral":
            jitter = f.get("router_jitter_noise", "float", d["router_jitter_noise"])
            if jitter:
                f.error("E114", "router_jitter_noise", f"router_jitter_noise = {fmt(jitter)}: "
                        "forgec's router has no input jitter (HF applies it in training)",
                        "set it to 0.0 to import the model for training without jitter")
            renormalize, hidden_key = True, "intermediate_size"
            sparse = [experts is not None and experts > 0] * n
        else:
            renorm = f.get("norm_topk_prob", "bool", d["norm_topk_prob"])
            renormalize, hidden_key = renorm, "moe_intermediate_size"
            step = f.get("decoder_sparse_step", "int", d["decoder_sparse_step"], positive=True)
            only = f.get("mlp_only_layers", "list", d["mlp_only_layers"])
            only_set = set()
            for i, v in enumerate(only or []):
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
                    self.diags.error("E113", f"mlp_only_layers[{i}] = {v!r} is not a layer "
                                     f"(0 … {n - 1})", self.src.span(("mlp_only_layers", i)))
                else:
                    only_set.add(v)
            sparse = [bool(experts) and step is not None and i not in only_set
                      and (i + 1) % step == 0 for i in range(n)]
            if step is not None and only is not None and not all(sparse):
                rule = (f"(i + 1) % {step} == 0 and i is not in mlp_only_layers" if step > 1
                        else "i is not in mlp_only_layers")
                notes.append(f"decoder_sparse_step = {step}, mlp_only_layers = "
                             f"{sorted(only_set)}: layer i is a mixture of experts iff {rule}")
        expert_hidden = (f.get(hidden_key, "int", positive=True) if hidden_key != "intermediate_size"
                         else self.p.value("ffn_hidden") if "ffn_hidden" in p else None)
        if None in (experts, top_k, logits, coef, renormalize, expert_hidden):
            return None, kinds, notes
        if experts and top_k > experts:
            f.error("E113", "num_experts_per_tok", f"num_experts_per_tok = {top_k} is more than "
                    f"the {experts} experts")
            return None, kinds, notes
        if not any(sparse):
            return None, kinds, notes
        p.add("n_experts", experts, self.experts_key)
        p.add("top_k", top_k, "num_experts_per_tok")
        if model_type == "mixtral":
            hidden = p("ffn_hidden")
        else:
            p.add("expert_hidden", expert_hidden, "moe_intermediate_size")
            hidden = p("expert_hidden")
        if logits:
            p.add("aux_loss_weight", coef, self.note_default(f, "router_aux_loss_coef")
                  + " (HF: one loss over all layers)")
        else:
            p.add("aux_loss_weight", 0.0, f"output_router_logits false: HF adds no balance "
                  f"loss (router_aux_loss_coef {fmt(coef)})")
        router = (f"router = {foreign_op('hf', 'router')}(renormalize = {fmt(bool(renormalize))}, "
                  f"aux_loss_weight = {p('aux_loss_weight')})")
        self.check_experts_act(f, "hidden_act")
        moe = (foreign_op("hf", "experts", hidden_act=self.act),
               ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
                f"hidden = {hidden}", router])
        kinds = [LayerKind(k.window, s) for k, s in zip(kinds, sparse, strict=True)]
        if self.layer_rule:
            notes.append(self.layer_rule)
        return moe, kinds, notes


# ---- the general decoder importer --------------------------------------------------------
# A family is data: the defaults of its config class, the names its config gives the
# shared fields, and what its decoder layer fixes that no field says. The translation of a
# config into ops (`DenseImporter`) is shared.


@dataclass(frozen=True)
class Experts:
    """How a family's config says its mixture of experts (a softmax top-k router over
    SwiGLU experts; the defaults of the fields are the family's `Dense.defaults`)."""

    count: str = "num_experts"  # the number of routed experts
    hidden: str = "intermediate_size"  # one expert's hidden width
    # the top-k weights renormalised: True/False, or the config field that says
    renormalize: bool | str = "norm_topk_prob"
    # Qwen2-MoE: decoder_sparse_step and mlp_only_layers choose the MoE layers (the
    # others have a dense MLP of intermediate_size); else every layer is one
    sparse_step: bool = False
    # the config field of the shared expert's hidden width, gated by a sigmoid
    shared_gated: str | None = None
    # ---- PhiMoE's: the router its model_type chooses, reading its window (jitter_eps)
    # from this field; and the field of the training noise on the experts' input
    jitter: str | None = None
    input_jitter: str | None = None
    # the config field of one shared expert's hidden width, ungated (0: none;
    # GraniteMoeShared)
    shared: str | None = None


@dataclass(frozen=True)
class Dense:
    title: str
    architectures: tuple[str, ...]
    defaults: dict  # transformers 5.x defaults of the fields read (by their own names)
    # the shared fields' names in this family's config (hidden_size → n_embd ...)
    aliases: dict = field(default_factory=dict)
    norm: str = "layer_norm"  # the foreign role of its norm op
    # "sequential", "parallel", "parallel_shared", or a config field whose true value
    # makes the block parallel: (field, the parallel kind)
    residual: str | tuple[str, str] = "sequential"
    # biases: True/False, or the config field that says
    qkv_bias: bool | str = False
    out_bias: bool | str = False
    mlp_bias: bool | str = False
    head_bias: bool | str = False  # or the config field that says (PhiMoE's lm_head_bias)
    gated: bool = False  # a gated MLP (gate, up, down) rather than two layers (up, down)
    dropouts: tuple[str, ...] = ()  # must be 0 (forgec has no dropout)
    inert: tuple[str, ...] = ()  # fields of the family that do not change the causal LM
    # config field → the value the language can express (anything else is E114)
    fixed: dict = field(default_factory=dict)
    # the rotary width's field, when the config gives it as a width (GPT-J's rotary_dim)
    rotary_dim_field: str | None = None
    rope_theta: float | None = None  # a theta the family fixes (no field says it)
    # the 4.x configs' top-level names of the rotary fraction and base (the Hub's Pythia
    # configs: rotary_pct, rotary_emb_base); transformers 5 writes rope_parameters
    rotary_pct_field: str | None = None
    theta_field: str | None = None
    note: str = ""  # a header line about how the weights are read
    norm_args: str = ""  # further arguments of every norm (OLMo's: no weight, no bias)
    norm_eps: float | None = None  # an eps the family fixes (no field says it)
    clip_qkv: bool = False  # the config's clip_qkv clamps q, k and v (OLMo)
    # Granite's embedding_multiplier, residual_multiplier, attention_multiplier and
    # logits_scaling
    multipliers: bool = False
    logit_scale: bool = False  # the config's logit_scale multiplies the logits (Cohere)
    pre_norms: bool = True  # norms before attention and MLP
    post_norms: bool = False  # norms of their outputs, before the residual sum
    qk_norm_over: str | None = None  # a qk-norm: "head" or "projection" (OLMo 2)
    qk_norm_field: str | None = None  # a per-head qk-norm where this field is true (GLM-4-MoE)
    # ---- Gemma's (see GEMMA below)
    embedding_scale: str | None = None  # the embedding's multiplier, as the spec writes it
    # the post-norms' component names the weight loader reads them by
    post_norm_names: tuple[str, str] | None = None
    query_scale_field: str | None = None  # scores scaled by 1 / sqrt(this field)
    softcaps: bool = False  # attn_logit_softcapping and final_logit_softcapping
    # layer_types (else sliding_window_pattern) chooses sliding (local) or full (global)
    window_layers: bool = False
    local_rope: bool = False  # local layers turn with a base of their own (Gemma 3)
    qk_norm_args: tuple[str, ...] = ()  # further arguments of the qk-norm
    off: tuple[str, ...] = ()  # fields the language can say only false or null (E114)
    # ---- DeepSeek's (see DEEPSEEK below)
    latent: bool = False  # multi-head latent attention (q/kv_lora_rank ...)
    # routed experts after first_k_dense_replace dense layers: "sigmoid" (V3: grouped,
    # biased sigmoid scores) or "softmax" (V2: greedy top-k of softmax scores)
    routed: str | None = None
    # ---- gpt-oss's
    sinks: bool = False  # a learned sink logit per head in each softmax
    # the names of the sliding-window and full-attention blocks (window_layers)
    # (None: blocks named by kind, where sliding layers mix with dense and MoE ones)
    window_names: tuple[str, str] | None = ("local", "global")
    experts: Experts | None = None  # MoE layers (OLMoE, Qwen2-MoE, GraniteMoE)
    dense_mlp: bool = True  # False: every layer has experts, no field sizes a dense MLP
    # DeepSeek's expert fields this family has none of: the value its model fixes
    routed_fixed: dict = field(default_factory=dict)
    # ---- Qwen3-Next's
    # the foreign role of the mixer of its linear_attention layers (layer_types, else
    # every full_attention_interval-th layer attends), and the config fields it reads
    linear_mixer: str | None = None
    linear_mixer_fields: tuple[str, ...] = ()
    output_gate: bool = False  # q_proj also yields a sigmoid gate of the attention's output
    # ---- more decoders (issue #13, below)
    # the full-attention layers attend without positions: "always" (Cohere 2), or
    # "with_window" (EXAONE 4: where a sliding_window is set)
    full_nope: str | None = None
    # local_rope: the local layers' base only where it differs from the global one (OLMo 3)
    local_rope_if_differs: bool = False
    # without layer_types, layers 0, P, 2P ... are the full ones (else P - 1, 2P - 1, ...)
    full_first: bool = False
    # BitNet's inner norms: of the heads' output before o_proj, of the MLP's hidden before
    # down_proj (a norm in the MLP module)
    sub_norms: bool = False
    # the config field whose true value turns the qk-norm (qk_norm_over) on (Persimmon)
    qk_norm_field: str | None = None
    # a rule of the config's layout fields: (get, heads) → (KV heads or None, the residual
    # kind, the KV heads' note) (Falcon's new_decoder_architecture, multi_query, ...)
    layout: Callable | None = None


DENSE = {
    "gpt_neox": Dense(
        "GPT-NeoX", ("GPTNeoXForCausalLM",), {
            "hidden_act": "gelu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "use_parallel_residual": True,
            "attention_bias": True, "rope_theta": 10000.0, "attention_dropout": 0.0,
            "hidden_dropout": 0.0},
        residual=("use_parallel_residual", "parallel"), qkv_bias="attention_bias",
        out_bias="attention_bias", mlp_bias=True, dropouts=("attention_dropout", "hidden_dropout"),
        inert=("classifier_dropout", "is_decoder"), rotary_pct_field="rotary_pct",
        theta_field="rotary_emb_base",
        note="query_key_value (per head q, k, v) is split into q/k/v_proj on load."),
    "gptj": Dense(
        "GPT-J", ("GPTJForCausalLM",), {
            "activation_function": "gelu_new", "n_positions": 2048, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "rotary_dim": 64,
            "n_inner": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        aliases={"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                 "num_attention_heads": "n_head", "intermediate_size": "n_inner",
                 "max_position_embeddings": "n_positions", "layer_norm_eps": "layer_norm_epsilon",
                 "hidden_act": "activation_function"},
        residual="parallel_shared", mlp_bias=True, head_bias=True,
        dropouts=("resid_pdrop", "embd_pdrop", "attn_pdrop"), rotary_dim_field="rotary_dim",
        rope_theta=10000.0,
        note="GPT-J rotates interleaved channel pairs; q_proj and k_proj are permuted on load "
             "so that the spec's rope (half-split pairs) computes the same scores."),
    "phi": Dense(
        "Phi", ("PhiForCausalLM",), {
            "hidden_act": "gelu_new", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "qk_layernorm": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attention_dropout": 0.0},
        residual="parallel_shared", qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=True,
        rotary_pct_field="partial_rotary_factor",
        dropouts=("resid_pdrop", "embd_pdrop", "attention_dropout"),
        fixed={"qk_layernorm": False}),
    "stablelm": Dense(
        "StableLM", ("StableLmForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 32,
            "rope_theta": 10000.0, "use_qkv_bias": False, "qk_layernorm": False,
            "use_parallel_residual": False, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        residual=("use_parallel_residual", "parallel_shared"), qkv_bias="use_qkv_bias",
        gated=True, rotary_pct_field="partial_rotary_factor",
        dropouts=("hidden_dropout", "attention_dropout"),
        fixed={"qk_layernorm": False}),
    "starcoder2": Dense(
        "Starcoder2", ("Starcoder2ForCausalLM",), {
            "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 4096,
            "initializer_range": 0.018042, "norm_epsilon": 1e-5, "tie_word_embeddings": True,
            "num_key_value_heads": 2, "rope_theta": 10000.0, "sliding_window": None,
            "use_bias": True, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "embedding_dropout": 0.0},
        aliases={"layer_norm_eps": "norm_epsilon"},
        qkv_bias="use_bias", out_bias="use_bias", mlp_bias="use_bias",
        dropouts=("attention_dropout", "residual_dropout", "embedding_dropout")),
}

_RMS = {"layer_norm_eps": "rms_norm_eps"}  # the families that norm with RMSNorm
DENSE.update({
    # post-norms only (on the attention's and the MLP's outputs), qk-norm over the whole
    # q and k projections
    "olmo2": Dense(
        "OLMo 2", ("Olmo2ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), pre_norms=False, post_norms=True,
        qk_norm_over="projection"),
    # sandwich norms, half of each head rotating (interleaved), q/k/v biases, fused gate_up
    "glm4": Dense(
        "GLM-4", ("Glm4ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False, "num_key_value_heads": 2,
            "head_dim": 128, "rope_theta": 10000.0, "attention_bias": True,
            "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", gated=True,
        dropouts=("attention_dropout",), post_norms=True,
        note="GLM-4 rotates interleaved channel pairs; q_proj and k_proj are permuted on load "
             "so that the spec's rope (half-split pairs) computes the same scores; "
             "gate_up_proj is split into gate/up_proj."),
    # Llama with multipliers on the embedding, the residual branches, the scores, the logits
    "granite": Dense(
        "Granite", ("GraniteForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
            "residual_multiplier": 1.0, "attention_multiplier": 1.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        mlp_bias="mlp_bias", gated=True, dropouts=("attention_dropout",), multipliers=True),
    # parallel attention + MLP on one bias-free LayerNorm, interleaved rotary, scaled logits
    "cohere": Dense(
        "Cohere", ("CohereForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 8192, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": True, "num_key_value_heads": None,
            "rope_theta": 500000.0, "attention_bias": False, "attention_dropout": 0.0,
            "use_qk_norm": False, "logit_scale": 0.0625},
        norm_args=", bias = false", residual="parallel_shared", qkv_bias="attention_bias",
        out_bias="attention_bias", gated=True, dropouts=("attention_dropout",),
        fixed={"use_qk_norm": False}, logit_scale=True,
        note="Cohere rotates interleaved channel pairs; q_proj and k_proj are permuted on load "
             "so that the spec's rope (half-split pairs) computes the same scores."),
    # Llama-style with a LayerNorm that learns nothing (no weight, no bias, eps 1e-5)
    "olmo": Dense(
        "OLMo", ("OlmoForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "tie_word_embeddings": False, "num_key_value_heads": None, "rope_theta": 10000.0,
            "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None},
        norm_args=", bias = false, weight = false", norm_eps=1e-5, qkv_bias="attention_bias",
        out_bias="attention_bias", gated=True, dropouts=("attention_dropout",), clip_qkv=True),
    # Llama with NoPE layers: no_rope_layers[i] = 0 leaves layer i without positions
    "smollm3": Dense(
        "SmolLM3", ("SmolLM3ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "num_key_value_heads": 4,
            "rope_theta": 2000000.0, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
            "no_rope_layer_interval": 4, "no_rope_layers": None, "layer_types": None},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        mlp_bias="mlp_bias", gated=True, dropouts=("attention_dropout",),
        fixed={"use_sliding_window": False}),
    # Llama-style, with fused qkv_proj and gate_up_proj in the checkpoint (split on load)
    "phi3": Dense(
        "Phi-3", ("Phi3ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "sliding_window": None, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attention_dropout": 0.0,
            # longrope's pre-training context: this field wins over rope_parameters'
            "original_max_position_embeddings": 4096},
        aliases=_RMS, norm="norm", gated=True,
        rotary_pct_field="partial_rotary_factor",
        dropouts=("resid_pdrop", "embd_pdrop", "attention_dropout"),
        # the pre-training context of longrope scaling: no other RoPE reads it
        inert=("original_max_position_embeddings",),
        note="qkv_proj and gate_up_proj are split into q/k/v_proj and gate/up_proj on load."),
})

# Gemma: RMSNorm scaling by 1 + weight, the embedding multiplied by sqrt(hidden_size),
# a GeGLU MLP (gelu_pytorch_tanh); Gemma 2 adds sandwich norms, soft-capped scores and
# logits, sliding (local) and full (global) layers and 1 / sqrt(query_pre_attn_scalar);
# Gemma 3 a per-head qk-norm and a RoPE base of the local layers' own
_GEMMA = dict(
    aliases=_RMS, norm="norm", norm_args=", unit_offset = true", qkv_bias="attention_bias",
    out_bias="attention_bias", gated=True, dropouts=("attention_dropout",),
    embedding_scale="sqrt(dim)", off=("use_bidirectional_attention",),
    # Gemma's Hub configs write both activation fields; transformers 5 reads hidden_act
    # (Gemma) or hidden_activation (Gemma 2, 3) only
    inert=("hidden_activation", "cache_implementation"))
_GEMMA_DEFAULTS = {
    "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "head_dim": 256, "attention_bias": False,
    "attention_dropout": 0.0, "use_bidirectional_attention": None}
_GEMMA2 = dict(
    _GEMMA, aliases={**_RMS, "hidden_act": "hidden_activation"}, post_norms=True,
    inert=("hidden_act", "cache_implementation"),
    post_norm_names=("post_attention_norm", "post_mlp_norm"),
    query_scale_field="query_pre_attn_scalar", softcaps=True, window_layers=True)
DENSE.update({
    "gemma": Dense(
        "Gemma", ("GemmaForCausalLM",), {
            **_GEMMA_DEFAULTS, "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 16,
            "rope_theta": 10000.0},
        **_GEMMA),
    "gemma2": Dense(
        "Gemma 2", ("Gemma2ForCausalLM",), {
            **_GEMMA_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh",
            "num_key_value_heads": 4, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "sliding_window_pattern": 2},
        **_GEMMA2),
    "gemma3_text": Dense(
        "Gemma 3", ("Gemma3ForCausalLM",), {
            **_GEMMA_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh",
            "num_key_value_heads": 4, "max_position_embeddings": 131072,
            "use_bidirectional_attention": False, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "sliding_window_pattern": 6},
        **{**_GEMMA2, "local_rope": True, "qk_norm_over": "head",
           "qk_norm_args": ("qk_norm_unit_offset = true",)}),
})

# DeepSeek-V2 and V3: multi-head latent attention (its rope turns the qk_rope_head_dim
# channels), a SwiGLU MLP on the first first_k_dense_replace layers and routed plus
# shared experts on the others. head_dim and qk_head_dim are derived from the MLA sizes;
# num_key_value_heads is not read by MLA; neither model class adds a balance loss
# (output_router_logits) nor runs the multi-token-prediction layers
# (num_nextn_predict_layers)
_DEEPSEEK_DEFAULTS = {
    "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "attention_bias": False, "attention_dropout": 0.0, "first_k_dense_replace": 0,
    "n_shared_experts": None, "rope_interleave": True, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
_DEEPSEEK = dict(
    aliases=_RMS, norm="norm", gated=True, dropouts=("attention_dropout",), latent=True,
    inert=("head_dim", "qk_head_dim", "num_key_value_heads", "output_router_logits",
           "num_nextn_predict_layers"))
DENSE.update({
    "deepseek_v3": Dense(
        "DeepSeek-V3", ("DeepseekV3ForCausalLM",), {
            **_DEEPSEEK_DEFAULTS, "first_k_dense_replace": 3, "n_shared_experts": 1,
            "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
            "norm_topk_prob": True},
        routed="sigmoid", **_DEEPSEEK),
    "deepseek_v2": Dense(
        "DeepSeek-V2", ("DeepseekV2ForCausalLM",), {
            **_DEEPSEEK_DEFAULTS, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
            "topk_method": "greedy", "mlp_bias": False, "rope_interleave": None},
        routed="softmax", fixed={"topk_method": "greedy", "mlp_bias": False},
        **{**_DEEPSEEK, "inert": (*_DEEPSEEK["inert"], "norm_topk_prob")}),
})

# gpt-oss: q/k/v/o biases and a sink logit per head, sliding and full layers after
# layer_types, biased experts on every layer (its released RoPE: YaRN, the rope's scaling)
DENSE["gpt_oss"] = Dense(
    "gpt-oss", ("GptOssForCausalLM",), {
        "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 8,
        "head_dim": 64, "rope_theta": 150000.0, "attention_bias": True,
        "attention_dropout": 0.0, "sliding_window": 128, "sliding_window_pattern": 2,
        "num_experts_per_tok": 4, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
        "output_router_logits": False, "router_aux_loss_coef": 0.001},
    aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
    gated=True, dropouts=("attention_dropout",), window_layers=True,
    window_names=("sliding", "full"), sinks=True, routed="biased",
    note="The experts' packed gate_up_proj (gate and up columns interleaved) is split on "
         "load.")

# Hugging Face activations → the spec's activation functions (docs/language.md,
# "Composition"): a two-layer MLP with one of these is a module of the spec's own
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu", "relu2": "relu2"}
# those that the spec writes as a composition of its functions, {} their argument
_ACTIVATION_CALLS = {"relu2": "square(relu({}))"}


class DenseImporter(Importer):
    """One decoder family of DENSE: a config's fields → the ops that say them."""

    def _rotating_layers(self, f: Fields, d: dict, n: int) -> list[bool]:
        """Which layers rotate q and k: all, except those no_rope_layers marks 0 (SmolLM3;
        its default: every no_rope_layer_interval-th layer), and which are full-attention
        layers (layer_types: the only kind these families import)."""
        if "layer_types" in d:
            types = f.get("layer_types", "list?", d["layer_types"])
            known = ("full_attention", "linear_attention") if self.linear_mixer \
                else ("full_attention",)
            for i, t in enumerate(types or []):
                if t not in known:
                    self.diags.error("E114", f"layer type {t!r} cannot be expressed",
                                     self.src.span(("layer_types", i)),
                                     "this family imports " + " and ".join(known)
                                     + " layers only")
            if types is not None and len(types) != n:
                f.error("E116", "layer_types", f"layer_types has {len(types)} entries for "
                        f"{n} layers (num_hidden_layers)")
        if "layer_rope_theta" in d:  # GraniteMoeSWA: 0 leaves a layer without positions
            return self._layer_thetas(f, d, n)
        if "no_rope_layers" not in d:
            return [True] * n
        interval = f.get("no_rope_layer_interval", "int", d["no_rope_layer_interval"],
                         positive=True)
        flags = f.get("no_rope_layers", "list?", d["no_rope_layers"])
        if flags is None:
            return [interval is None or (i + 1) % interval != 0 for i in range(n)]
        if len(flags) != n:
            f.error("E116", "no_rope_layers", f"no_rope_layers has {len(flags)} entries for "
                    f"{n} layers (num_hidden_layers)")
            return [True] * n
        for i, v in enumerate(flags):
            if v not in (0, 1) or isinstance(v, float):
                self.diags.error("E113", f"no_rope_layers[{i}] = {v!r} is not 0 or 1",
                                 self.src.span(("no_rope_layers", i)))
        return [bool(v) for v in flags]

    def _layer_thetas(self, f: Fields, d: dict, n: int) -> list[bool]:
        """Which layers rotate, from layer_rope_theta: 0 is NoPE; any other base must be
        the model's (forgec's layers share one rope)."""
        thetas = f.get("layer_rope_theta", "list?", d["layer_rope_theta"])
        if thetas is None:
            return [True] * n
        if len(thetas) != n:
            f.error("E116", "layer_rope_theta", f"layer_rope_theta has {len(thetas)} entries "
                    f"for {n} layers (num_hidden_layers)")
            return [True] * n
        theta = self.p.value("rope_theta") if "rope_theta" in self.p else None
        for i, t in enumerate(thetas):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                self.diags.error("E113", f"layer_rope_theta[{i}] = {t!r} is not a number",
                                 self.src.span(("layer_rope_theta", i)))
            elif t and theta is not None and t != theta:
                self.diags.error("E114", f"layer_rope_theta[{i}] = {fmt(t)} cannot be "
                                 f"expressed: forgec's layers share one RoPE base "
                                 f"({fmt(theta)}, rope_theta)",
                                 self.src.span(("layer_rope_theta", i)),
                                 "each entry may be 0 (no positions) or the model's rope_theta")
        return [t != 0 for t in thetas]

    def _gemma_scales(self, f: Fields, fam: Dense, d: dict, attention: list[str],
                      embedding_args: list[str], head_args: list[str]) -> None:
        """The embedding's multiplier, the scores' scale and the soft caps (Gemma)."""
        p = self.p
        if fam.embedding_scale is not None:
            embedding_args.append(f"scale = {fam.embedding_scale}")
        if fam.query_scale_field is not None:
            k = fam.query_scale_field
            q = f.get(k, "float", d[k], positive=True)
            if q is not None:
                p.add(k, int(q) if float(q).is_integer() else q, self.note_default(f, k))
                attention.append(f"scale = 1 / sqrt({p(k)})")
        if fam.softcaps:
            for k, name, args in (("attn_logit_softcapping", "attn_softcap", attention),
                                  ("final_logit_softcapping", "logit_softcap", head_args)):
                cap = f.get(k, "float?", d[k], positive=True)
                if cap is not None:
                    p.add(name, cap, self.note_default(f, k))
                    args.append(f"softcap = {p(name)}")

    def _latent_sizes(self, f: Fields, d: dict) -> bool:
        """Read the sizes of multi-head latent attention (DeepSeek) into parameters; its
        rope turns the qk_rope_head_dim channels. False where one is missing or wrong."""
        p = self.p
        keys = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim")
        sizes = {k: f.get(k, "int?" if k == "q_lora_rank" else "int", d[k], positive=True)
                 for k in keys}
        interleave = f.get("rope_interleave", "bool?", d["rope_interleave"])
        bias = f.get("attention_bias", "bool", d["attention_bias"])
        model_type = f.obj["model_type"]
        self.latent_op = foreign_choices("hf", "self_attention", "model_type")[model_type]
        if bias is None or any(v is None for k, v in sizes.items() if k != "q_lora_rank"):
            return False
        for k, v in sizes.items():
            if v is not None:
                p.add(k, v, self.note_default(f, k))
        p.add("head_dim", sizes["qk_rope_head_dim"], "qk_rope_head_dim")  # the rope's
        args = ["dim", f"heads = {p('n_heads')}"]
        if sizes["q_lora_rank"] is not None:  # null: queries projected directly
            args.append(f"q_lora_rank = {p('q_lora_rank')}")
        args += [f"{k} = {p(k)}" for k in keys[1:]]
        args.append("rope = rope")
        if interleave is False:  # V2's null: its rope turns interleaved pairs too
            args.append("rope_interleave = false")
        if bias:
            args.append("bias = true")
        self.latent_args = args
        return True

    def _latent_attention(self, rope: list[str]) -> list[str]:
        """The mla arguments; the rope built for the qk_rope_head_dim channels."""
        p = self.p
        rope[0] = f"head_dim = {p('qk_rope_head_dim')}"
        p.items["head_dim"].used = False  # only the rope read it, now by its own name
        mscale_all_dim = self.rope_scaling.get("mscale_all_dim")
        if self.rope_scaling.get("rope_type") == "yarn" and mscale_all_dim:
            # DeepSeek's yarn_apply_mscale: the softmax scale times mscale², in its order
            mscale = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
            qk_head_dim = p.value("qk_nope_head_dim") + p.value("qk_rope_head_dim")
            p.add("attention_scale", qk_head_dim ** (-0.5) * mscale * mscale,
                  "(qk_nope_head_dim + qk_rope_head_dim)^-0.5 · (0.1 · mscale_all_dim · "
                  "ln factor + 1)², DeepSeek's YaRN")
            return [*self.latent_args, f"scale = {p('attention_scale')}"]
        return self.latent_args

    def _routed_experts(self, f: Fields, fam: Dense, d: dict, n: int):
        """DeepSeek's mixture of routed and shared experts, on the layers from
        first_k_dense_replace on: (op, arguments) and which layers have it."""
        p = self.p
        self.dense_layers_note = None
        key = fam.aliases.get  # the family's own field names (MiniMax-M2's)

        def read(k: str, kind: str, **kw):
            if k in fam.routed_fixed:  # no field says it: the family's model fixes it
                return fam.routed_fixed[k]
            name = key(k, k)
            return f.get(name, kind, d[name], **kw) if name in d else f.get(name, kind, **kw)

        experts = read("n_routed_experts", "int", positive=True)
        top_k = read("num_experts_per_tok", "int", positive=True)
        hidden = read("moe_intermediate_size", "int", positive=True)
        shared = read("n_shared_experts", "int?")
        sparse = None  # GLM-4.7-Flash: mlp_layer_types lists each layer's kind
        if "mlp_layer_types" in d:
            sparse, first = self._mlp_layer_types(f, d, n), 0
        elif "first_k_dense_replace" not in d:  # experts on every layer
            first = 0
        else:
            first = f.get("first_k_dense_replace", "int", d["first_k_dense_replace"])
        scale = read("routed_scaling_factor", "float")
        router_args = []
        if fam.routed == "sigmoid":
            router = foreign_choices("hf", "router", "model_type")[f.obj["model_type"]]
            normalize = read("norm_topk_prob", "bool")
            groups = [read(k, "int?", positive=True) for k in ("n_group", "topk_group")]
            if normalize is False:
                router_args.append("normalize = false")
            if scale is not None and scale != 1.0:
                p.add("routed_scale", scale, self.note_default(f, "routed_scaling_factor"))
                router_args.append(f"routed_scale = {p('routed_scale')}")
            if groups[0] is not None and groups[0] > 1:
                p.add("n_group", groups[0], self.note_default(f, "n_group"))
                p.add("topk_group", groups[1] or 1, self.note_default(f, "topk_group"))
                router_args += [f"n_group = {p('n_group')}", f"topk_group = {p('topk_group')}"]
        else:  # greedy top-k of softmax scores, neither renormalised nor balanced in HF
            router = foreign_op("hf", "router")
            f.consume("n_group", "topk_group")  # greedy routing reads neither
            if scale is not None and scale != 1.0:
                f.error("E114", "routed_scaling_factor", f"routed_scaling_factor = "
                        f"{fmt(scale)} cannot be expressed: forgec's softmax_topk router "
                        "does not scale its weights", "only routed_scaling_factor = 1.0 "
                        "imports with greedy routing")
            router_args += ["renormalize = false", "aux_loss_weight = 0.0"]
        if None in (experts, top_k, hidden, first) or (shared is not None and shared < 0) \
                or "mlp_layer_types" in d and sparse is None:
            return None, [False] * n
        if top_k > experts:
            f.error("E113", "num_experts_per_tok", f"num_experts_per_tok = {top_k} is more "
                    f"than the {experts} experts (n_routed_experts)")
        if first < 0:
            f.error("E113", "first_k_dense_replace", f"first_k_dense_replace = {first} is "
                    "not a number of layers")
            return None, [False] * n
        if first >= n or sparse is not None and not any(sparse):  # every layer dense
            return None, [False] * n
        if sparse is not None and not all(sparse):
            dense = [str(i) for i, s in enumerate(sparse) if not s]
            self.dense_layers_note = (f"mlp_layer_types: layer{'s' if len(dense) > 1 else ''} "
                                      + ", ".join(dense) + " ha" + ("ve" if len(dense) > 1
                                                                    else "s") + " a dense MLP")
        if 0 < first < n:
            self.dense_layers_note = (f"first_k_dense_replace = {first}: "
                                      + ("layer 0 has" if first == 1
                                         else f"the first {first} layers have")
                                      + " a dense MLP")
        p.add("n_experts", experts, key("n_routed_experts", "n_routed_experts"))
        p.add("top_k", top_k, "num_experts_per_tok")
        p.add("expert_hidden", hidden, key("moe_intermediate_size", "moe_intermediate_size"))
        args = ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
                f"hidden = {p('expert_hidden')}"]
        if shared:
            p.add("n_shared_experts", shared,
                  self.note_default(f, key("n_shared_experts", "n_shared_experts")))
            args.append(f"shared_experts = {p('n_shared_experts')}")
        args.append(f"router = {router}({', '.join(router_args)})")
        return (foreign_op("hf", "experts", hidden_act=self.act), args), \
            sparse if sparse is not None else [i >= first for i in range(n)]

    def _mlp_layer_types(self, f: Fields, d: dict, n: int) -> list[bool] | None:
        """Which layers have experts, from mlp_layer_types ("dense" or "sparse" each)."""
        types = f.get("mlp_layer_types", "list?", d["mlp_layer_types"])
        if types is None:  # transformers' default: a dense first layer
            return [i > 0 for i in range(n)]
        if len(types) != n:
            f.error("E116", "mlp_layer_types", f"mlp_layer_types has {len(types)} entries for "
                    f"{n} layers (num_hidden_layers)")
            return None
        for i, t in enumerate(types):
            if t not in ("dense", "sparse"):
                self.diags.error("E113", f"mlp layer type {t!r} is neither 'dense' nor "
                                 "'sparse'", self.src.span(("mlp_layer_types", i)))
        return [t == "sparse" for t in types]

    def _biased_experts(self, f: Fields, d: dict, n: int):
        """gpt-oss's experts on every layer: biases, a clamped SwiGLU, a router with a
        bias, softmax over the chosen logits (= renormalised top-k of the softmax)."""
        p = self.p
        experts = f.get("num_local_experts", "int", positive=True)
        top_k = f.get("num_experts_per_tok", "int", d["num_experts_per_tok"], positive=True)
        limit = f.get("swiglu_limit", "float", d["swiglu_limit"], positive=True)
        alpha = f.get("swiglu_alpha", "float", d["swiglu_alpha"], positive=True)
        logits = f.get("output_router_logits", "bool", d["output_router_logits"])
        coef = f.get("router_aux_loss_coef", "float", d["router_aux_loss_coef"])
        if None in (experts, top_k, limit, alpha, logits, coef):
            return None, [True] * n
        if top_k > experts:
            f.error("E113", "num_experts_per_tok", f"num_experts_per_tok = {top_k} is more "
                    f"than the {experts} experts (num_local_experts)")
        p.add("n_experts", experts, "num_local_experts")
        p.add("top_k", top_k, self.note_default(f, "num_experts_per_tok"))
        p.add("swiglu_limit", limit, self.note_default(f, "swiglu_limit"))
        args = ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
                f"hidden = {p('ffn_hidden')}", "bias = true",
                f"swiglu_limit = {p('swiglu_limit')}"]
        if alpha != 1.702:  # the op's default, gpt-oss's
            p.add("swiglu_alpha", alpha, self.note_default(f, "swiglu_alpha"))
            args.append(f"swiglu_alpha = {p('swiglu_alpha')}")
        if logits:
            p.add("aux_loss_weight", coef, self.note_default(f, "router_aux_loss_coef")
                  + " (HF: one loss over all layers)")
        else:
            p.add("aux_loss_weight", 0.0, f"output_router_logits false (router_aux_loss_coef "
                  f"{fmt(coef)}): HF adds none")
        args.append(f"router = {foreign_op('hf', 'router')}(bias = true, "
                    f"aux_loss_weight = {p('aux_loss_weight')})")
        return (foreign_op("hf", "experts", hidden_act=self.act), args), [True] * n

    def _window_flags(self, f: Fields, d: dict, n: int) -> list[bool]:
        """Which layers slide (Gemma 2, 3): layer_types, else every layer but each
        sliding_window_pattern-th (its 4.x configs; written `_sliding_window_pattern` by
        transformers 5, where layer_types says it)."""
        types = f.get("layer_types", "list?", None)
        pattern = d.get("sliding_window_pattern")
        for k in ("sliding_window_pattern", "_sliding_window_pattern"):
            if k in f and types is not None:  # layer_types says it (EXAONE's may be "LLLG")
                f.consume(k)
            elif k in f:
                pattern = f.get(k, "int", positive=True)
        if types is None and pattern is None:  # Ministral: every layer, if a window is set
            return [True] * n
        if types is None and DENSE[f.obj["model_type"]].full_first:  # Granite SWA
            return [i % pattern != 0 for i in range(n)]
        if types is None:
            return [(i + 1) % pattern != 0 for i in range(n)]
        if len(types) != n:
            f.error("E116", "layer_types", f"layer_types has {len(types)} entries for "
                    f"{n} layers (num_hidden_layers)")
        for i, t in enumerate(types):
            if t not in ("full_attention", "sliding_attention"):
                self.diags.error("E114", f"layer type {t!r} cannot be expressed",
                                 self.src.span(("layer_types", i)),
                                 "layer types are full_attention or sliding_attention")
        return [t == "sliding_attention" for t in types][:n] + [False] * (n - len(types))

    def _local_ropes(self, f: Fields, d: dict) -> list[str] | None:
        """Gemma 3's two RoPE bases: rope_parameters.full_attention / .sliding_attention
        (transformers 5), or rope_theta and rope_local_base_freq (4.x)."""
        p = self.p
        params = f.get("rope_parameters", "dict?", None)
        scaling: list[str] = []  # the global layers' (the local base is never scaled)
        if params is None:
            theta = f.get("rope_theta", "float", d["rope_theta"])
            local = f.get("rope_local_base_freq", "float", d.get("rope_local_base_freq", theta))
            old = f.get("rope_scaling", "dict?", None)
            if old is not None:
                r = Fields(self.src, old, ("rope_scaling",), self.diags, "rope_scaling")
                key = "rope_type" if "rope_type" in r or "type" not in r else "type"
                got = self._global_scaling(f, r, d, key)
                if got is None:
                    return None
                scaling = got
                r.unknown(self.ignore, "RoPE")
            notes = (self.note_default(f, "rope_theta"), self.note_default(f, "rope_local_base_freq"))
        else:
            f.consume("rope_theta", "rope_local_base_freq", "rope_scaling")
            rp = Fields(self.src, params, ("rope_parameters",), self.diags, "rope_parameters")
            thetas, notes = [], []
            for kind, default in (("full_attention", d["rope_theta"]),
                                  ("sliding_attention", d.get("rope_local_base_freq",
                                                             d["rope_theta"]))):
                sub = rp.get(kind, "dict", {})
                if sub is None:
                    return None
                r = Fields(self.src, sub, rp.path + (kind,), self.diags, rp.name(kind))
                if kind == "full_attention":
                    got = self._global_scaling(f, r, d, "rope_type")
                    if got is None:
                        return None
                    scaling = got
                else:
                    rope_type = r.get("rope_type", "str", "default")
                    if rope_type not in ("default", None):
                        r.error("E114", "rope_type", f"rope type '{rope_type}' of the "
                                f"{kind} layers cannot be expressed: forgec's rope scales "
                                "the global layers' base only")
                        r.consume(*r.obj)
                thetas.append(r.get("rope_theta", "float", default))
                notes.append(r.name("rope_theta") if "rope_theta" in r
                             else f"{r.name('rope_theta')} (default)")
                r.unknown(self.ignore, "RoPE")
            rp.unknown(self.ignore, "RoPE")
            theta, local = thetas
        if theta is None or local is None:
            return None
        p.add("rope_theta", theta, notes[0])
        if theta == local and DENSE[f.obj["model_type"]].local_rope_if_differs:
            self.one_base = True  # local and global layers turn alike: one base
            return [f"head_dim = {p('head_dim')}", f"max_seq_len = {p('max_seq_len')}",
                    f"theta = {p('rope_theta')}"]
        p.add("local_rope_theta", local, notes[1])
        return [f"head_dim = {p('head_dim')}", f"max_seq_len = {p('max_seq_len')}",
                f"theta = {p('rope_theta')}", f"local_theta = {p('local_rope_theta')}",
                *scaling]

    def _global_scaling(self, f: Fields, r: Fields, d: dict, key: str) -> list[str] | None:
        """The scaling of Gemma 3's global layers (its released configs: linear, factor 8)."""
        rope_type = r.get(key, "str", "default")
        if rope_type is None:
            return None
        if rope_type == "default":
            return []
        if rope_type not in ROPE_TYPES or rope_type in ("dynamic", "longrope"):
            r.error("E114", key, f"rope type '{rope_type}' of the global layers cannot be "
                    "expressed: forgec's rope with a local base scales as llama3, linear "
                    "or yarn")
            r.consume(*r.obj)
            return None
        return self._rope_scaling(f, r, rope_type, d, key)

    def run(self, name: str, source: str, max_seq_len: int | None) -> Decoder | None:
        src, diags, p = self.src, self.diags, self.p
        f = Fields(src, src.value, (), diags, "config.json")
        model_type = src.value["model_type"]
        f.consume("model_type")
        fam = DENSE[model_type]
        d = fam.defaults
        self.partial_rotary = True
        self.linear_mixer = fam.linear_mixer

        def key(canon: str) -> str:
            return fam.aliases.get(canon, canon)

        def get(canon: str, kind: str, **kw):
            k = key(canon)
            return f.get(k, kind, d[k], **kw) if k in d else f.get(k, kind, **kw)

        f.consume(*NOT_ARCHITECTURE, *fam.inert)
        archs = f.get("architectures", "list?", None)
        for i, a in enumerate(archs or []):
            if a not in fam.architectures:
                head = ("a causal language model" if str(a).endswith("ForCausalLM")
                        else "another head")
                diags.error("E114", f"architecture '{a}' is not {fam.architectures[0]}: "
                            f"it has {head}", src.span(("architectures", i)),
                            f"forgec imports {fam.architectures[0]}")
        vocab = get("vocab_size", "int", positive=True)
        dim = get("hidden_size", "int", positive=True)
        n_layers = get("num_hidden_layers", "int", positive=True)
        heads = get("num_attention_heads", "int", positive=True)
        ffn = get("intermediate_size", "int?", positive=True) if fam.dense_mlp else 0
        ffn_note = key("intermediate_size")
        if ffn is None and dim and key("intermediate_size") in d:  # GPT-J's n_inner: null
            ffn, ffn_note = 4 * dim, f"{key('intermediate_size')} null: 4 × {key('hidden_size')}"
        elif ffn is None and key("intermediate_size") in f \
                and f.raw(key("intermediate_size")) is None:
            f.error("E113", key("intermediate_size"), f"'{key('intermediate_size')}' is null: "
                    f"the {fam.title} MLP has no default width", "write the MLP's width")
        kv_key = "num_key_value_heads"
        kv = f.get(kv_key, "int?", d[kv_key], positive=True) if kv_key in d else None
        kv_note = self.note_default(f, kv_key) if kv_key in d else None
        if kv is None and heads:
            kv, kv_note = heads, (f"{kv_note} = num_attention_heads" if kv_note
                                  else f"{key('num_attention_heads')} (no grouped KV heads)")
        head_dim = dim // heads if dim and heads else None
        hd_note = f"{key('hidden_size')} / {key('num_attention_heads')}"
        if "head_dim" in d:
            given = f.get("head_dim", "int?", d["head_dim"], positive=True)
            if given is not None:
                head_dim, hd_note = given, self.note_default(f, "head_dim")
        elif dim and heads and dim % heads:
            f.error("E113", key("num_attention_heads"), f"{key('hidden_size')} = {dim} is not "
                    f"divisible by {key('num_attention_heads')} = {heads}")
        if kv and heads and heads % kv:
            f.error("E113", kv_key, f"{kv_key} = {kv} does not divide "
                    f"{key('num_attention_heads')} = {heads}")
        max_pos = get("max_position_embeddings", "int", positive=True)
        eps_key = key("layer_norm_eps")
        eps = get("layer_norm_eps", "float") if fam.norm_eps is None else fam.norm_eps
        init = get("initializer_range", "float")
        for k, v in ((eps_key, eps), ("initializer_range", init)):
            if v is not None and not 0 <= v <= 1:
                f.error("E113", k, f"'{k}' must be between 0 and 1, got {fmt(v)}")
        tie = get("tie_word_embeddings", "bool")
        act = get("hidden_act", "str")
        self.act = act
        for k in fam.dropouts:
            v = f.get(k, "float", d.get(k, 0.0))
            if v:
                f.error("E114", k, f"{k} = {fmt(v)}: forgec has no dropout, and HF applies "
                        "it in training", "set it to 0.0 to import the model for training "
                        "without dropout")
        for k, want in fam.fixed.items():
            v = f.get(k, type(want).__name__, d.get(k, want))
            if v is not None and v != want:
                f.error("E114", k, f"{k} = {fmt(v)} cannot be expressed by forgec's ops",
                        f"only {k} = {fmt(want)} imports")
        for k in fam.off:
            if f.get(k, "bool?", d.get(k)):
                f.error("E114", k, f"{k} = true cannot be expressed: forgec's decoders are "
                        "causal", f"only {k} = false (or null) imports")

        def flag(spec: bool | str) -> bool:
            return bool(get(spec, "bool")) if isinstance(spec, str) else spec

        qkv_bias, out_bias, mlp_bias = (flag(fam.qkv_bias), flag(fam.out_bias),
                                        flag(fam.mlp_bias))
        head_bias = flag(fam.head_bias)
        if tie and head_bias:  # transformers ties the weight and keeps the head's bias
            f.error("E114", key("tie_word_embeddings"), f"{key('tie_word_embeddings')} = true "
                    f"with the {fam.title} head's bias cannot be expressed: a tied head of "
                    "forgec has no bias of its own (E074)", "import the model untied")
        residual = fam.residual
        if isinstance(residual, tuple):
            residual = residual[1] if get(residual[0], "bool") else "sequential"
        if fam.layout is not None:
            layout_kv, residual, layout_note = fam.layout(get, heads)
            if layout_kv is not None:
                kv, kv_note = layout_kv, layout_note
            if kv and heads and heads % kv:
                f.error("E113", "num_kv_heads", f"num_kv_heads = {kv} does not divide "
                        f"num_attention_heads = {heads}")
        mlp_op = mlp_module = None
        if act is not None:
            if fam.gated:
                mlp_op = foreign_op("hf", "mlp", hidden_act=act)
                if (mlp_op is None or mlp_bias or fam.sub_norms) and act in ACTIVATIONS:
                    # written in the spec: act(gate(x)) * up(x), the projections biased
                    mlp_op, mlp_module = None, ACTIVATIONS[act]
                elif mlp_op is None:
                    f.error("E114", key("hidden_act"), f"{key('hidden_act')} '{act}' cannot be "
                            "expressed", "activations: " + ", ".join(ACTIVATIONS))
            elif act in ACTIVATIONS:
                mlp_op = foreign_op("hf", "two_layer_mlp", hidden_act=act)
                if mlp_op is None:
                    mlp_module = ACTIVATIONS[act]
            else:
                f.error("E114", key("hidden_act"), f"{key('hidden_act')} '{act}' cannot be "
                        "expressed", "activations: " + ", ".join(ACTIVATIONS))
        if fam.experts is not None or fam.routed:
            self.check_experts_act(f, key("hidden_act"))
        clip = f.get("clip_qkv", "float?", d["clip_qkv"], positive=True) if fam.clip_qkv else None
        if clip is not None and fam.qk_norm_over is not None:  # OLMoE
            f.error("E114", "clip_qkv", f"clip_qkv = {fmt(clip)} with qk-norm cannot be "
                    f"expressed: {fam.title} clamps q and k after their norms, forgec's "
                    "attention before", "set it to null to import the model without clamping")
        mult = {k: f.get(k, "float", d[k], positive=True)
                for k in (("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                           "logits_scaling") if fam.multipliers else ())
                + (("logit_scale",) if fam.logit_scale else ())}
        window = None
        if fam.window_layers:
            window = f.get("sliding_window", "int?", d["sliding_window"], positive=True)
        elif "use_sliding_window" in d:  # off (fam.fixed): its window is not used
            f.consume("sliding_window")
        elif "sliding_window" in d:
            window = f.get("sliding_window", "int?", d["sliding_window"], positive=True)
        if fam.theta_field is not None:
            self.theta_key = fam.theta_field
        if fam.rotary_pct_field is not None and fam.rotary_pct_field in f:
            pct = f.get(fam.rotary_pct_field, "float")
            if pct is not None and not 0 < pct <= 1:
                f.error("E113", fam.rotary_pct_field, f"'{fam.rotary_pct_field}' must be in "
                        f"(0, 1], got {fmt(pct)}")
            elif pct is not None and pct != 1.0:
                self.rotary_fraction = (pct, fam.rotary_pct_field)
        if fam.rotary_dim_field is not None:
            rd = f.get(fam.rotary_dim_field, "int?", d[fam.rotary_dim_field], positive=True)
            if rd is not None:
                self.rotary_fraction = (rd, fam.rotary_dim_field)

        if None in (vocab, dim, n_layers, heads, ffn, kv, head_dim, max_pos, eps, init, tie):
            for n in ("head_dim", "max_seq_len"):
                p.add(n, 0)
            if fam.local_rope:
                f.consume(*d, "layer_types", "_sliding_window_pattern")
                self._local_ropes(f, d)
            elif fam.latent or fam.routed or fam.window_layers:
                # their own fields are known, read or not
                f.consume(*d, "n_routed_experts", "moe_intermediate_size", "n_group",
                          "topk_group", "num_local_experts", "num_experts_per_tok",
                          "layer_types", "_sliding_window_pattern")
                self._rope(f, {"rope_theta": d.get("rope_theta", 10000.0)})
            else:
                self._rope(f, {"rope_theta": d.get("rope_theta", 10000.0)})
            if fam.linear_mixer is not None:  # its mixer's fields are known, read or not
                f.consume(*fam.linear_mixer_fields, "full_attention_interval", "layer_types")
            if fam.experts is not None:  # report the experts' fields' errors too
                p.add("ffn_hidden", 0)
                dense_experts(self, f, fam, [LayerKind(False, False)] * (n_layers or 1))
            f.unknown(self.ignore, fam.title)
            return None
        p.add("vocab_size", vocab, key("vocab_size"))
        p.add("dim", dim, key("hidden_size"))
        p.add("n_layers", n_layers, key("num_hidden_layers"))
        p.add("n_heads", heads, key("num_attention_heads"))
        p.add("n_kv_heads", kv, kv_note)
        p.add("head_dim", head_dim, hd_note)
        p.add("ffn_hidden", ffn, ffn_note)
        if max_seq_len is not None:
            p.add("max_seq_len", max_seq_len,
                  f"--max-seq-len ({key('max_position_embeddings')} = {max_pos})")
        else:
            p.add("max_seq_len", max_pos, self.note_default(f, key("max_position_embeddings")))
        self.max_pos = max_pos  # what a RoPE scaling reads as the context
        p.add("norm_eps", eps, self.note_default(f, eps_key) if fam.norm_eps is None
              else f"fixed by {fam.title}")
        p.add("init_std", init, self.note_default(f, "initializer_range"))
        p("init_std")
        if fam.rope_theta is not None:
            p.add("rope_theta", fam.rope_theta, f"fixed by {fam.title}")
            rope = [f"head_dim = {p('head_dim')}", f"max_seq_len = {p('max_seq_len')}",
                    f"theta = {p('rope_theta')}"]
            if self.rotary_fraction is not None and self.rotary_fraction[0] != head_dim:
                rd, field_name = self.rotary_fraction
                p.add("rotary_dim", rd, field_name)
                rope.append(f"rotary_dim = {p('rotary_dim')}")
        elif fam.local_rope:
            rope = self._local_ropes(f, d)
        elif fam.latent and not self._latent_sizes(f, d):
            rope = None
        else:
            rope = self._rope(f, d)
        attention = ["dim", f"heads = {p('n_heads')}"]
        if kv != heads:
            attention.append(f"kv_heads = {p('n_kv_heads')}")
        if head_dim * heads != dim:
            attention.append(f"head_dim = {p('head_dim')}")
        attention.append("rope = rope")
        if qkv_bias:
            attention.append("qkv_bias = true")
        if out_bias:
            attention.append("out_bias = true")
        qk_norm_over = fam.qk_norm_over
        if fam.qk_norm_field is not None:  # the config's switch (GLM-4-MoE, Persimmon)
            qk_norm_over = (qk_norm_over or "head") if get(fam.qk_norm_field, "bool") else None
        if qk_norm_over is not None:
            attention += ["qk_norm = true", f"qk_norm_eps = {p('norm_eps')}"]
            if qk_norm_over != "head":
                attention.append(f"qk_norm_over = {qk_norm_over}")
            attention += fam.qk_norm_args
        if clip is not None:
            p.add("clip_qkv", clip, "clip_qkv")
            attention.append(f"clip_qkv = {p('clip_qkv')}")
        embedding_args, head_args, residual_scale = [], [], None
        for k, v in mult.items():
            # Granite scales the scores by attention_multiplier itself (not 1/sqrt(head_dim)):
            # 1.0 is a scale too
            if v is None or v == 1.0 and k != "attention_multiplier":
                continue
            p.add(k, v, self.note_default(f, k))
            if k == "embedding_multiplier":
                embedding_args.append(f"scale = {p(k)}")
            elif k == "residual_multiplier":
                residual_scale = p(k)
            elif k == "attention_multiplier":
                attention.append(f"scale = {p(k)}")
            elif k == "logits_scaling":
                head_args.append(f"logit_scale = 1.0 / {p(k)}")
            else:
                head_args.append(f"logit_scale = {p(k)}")
        self._gemma_scales(f, fam, d, attention, embedding_args, head_args)
        if fam.sinks:
            attention.append("sinks = true")
        if fam.output_gate:
            attention.append("output_gate = true")
        if fam.sub_norms:
            attention += ["out_norm = true", f"out_norm_eps = {p('norm_eps')}"]
        moe, sparse = (self._biased_experts(f, d, n_layers) if fam.routed == "biased"
                       else self._routed_experts(f, fam, d, n_layers) if fam.routed
                       else (None, [False] * n_layers))
        if fam.latent and rope is not None:
            attention = self._latent_attention(rope)
        slides = (self._window_flags(f, d, n_layers) if fam.window_layers
                  else [True] * n_layers)
        set_window = window
        if not any(slides):
            window = None  # no layer reads it
        rotating = self._rotating_layers(f, d, n_layers)
        if fam.full_nope == "always" or fam.full_nope == "with_window" and set_window is not None:
            # only the sliding layers turn (none, without a window)
            rotating = [r and s and set_window is not None
                        for r, s in zip(rotating, slides, strict=True)]
        kinds = [LayerKind(window is not None and s, m, not rotates)
                 for s, m, rotates in zip(slides, sparse, rotating, strict=True)]
        stack_notes = []
        if fam.experts is not None:
            moe, kinds, stack_notes = dense_experts(self, f, fam, kinds)
        ssm = None
        if fam.linear_mixer is not None:
            ssm, linear = self._linear_layers(f, fam, d, n_layers)
            kinds = [LayerKind(k.window, k.moe, k.nope, lin)
                     for k, lin in zip(kinds, linear, strict=True)]
        if window is not None:
            p.add("window", window, self.note_default(f, "sliding_window"))
        acknowledged = f.unknown(self.ignore, fam.title)
        if diags.error_count or rope is None:
            return None

        modules = []
        hidden = p("ffn_hidden")
        if mlp_module is not None:
            linear = foreign_op("hf", "projection")
            bias = ", bias = true" if mlp_bias else ""
            # the activation as the spec writes it (ReLU² composes two functions)
            applied = _ACTIVATION_CALLS.get(mlp_module, mlp_module + "({})")
            if fam.gated and fam.sub_norms:  # the hidden normed before down_proj
                mname = own_module_name(f"gated_{mlp_module}_normed_mlp")
                norm = foreign_op("hf", fam.norm)
                modules.append([
                    f"# {fam.title}'s MLP: down(norm({applied.format('gate(x)')} * up(x))) "
                    f"({key('hidden_act')} {act})",
                    f"module {mname}(x) {{",
                    f"  gate_proj = {linear}(dim, {hidden}{bias})",
                    f"  up_proj   = {linear}(dim, {hidden}{bias})",
                    f"  sub_norm  = {norm}({hidden}, eps = {p('norm_eps')})",
                    f"  down_proj = {linear}({hidden}, dim{bias})",
                    f"  return down_proj(sub_norm({applied.format('gate_proj(x)')} * "
                    "up_proj(x)))",
                    "}"])
            elif fam.gated:
                mname = own_module_name(f"gated_{mlp_module}_mlp")
                modules.append([
                    f"# {fam.title}'s MLP: down({applied.format('gate(x)')} * up(x)) "
                    f"({key('hidden_act')} {act}" + (", biases)" if mlp_bias else ")"),
                    f"module {mname}(x) {{",
                    f"  gate_proj = {linear}(dim, {hidden}{bias})",
                    f"  up_proj   = {linear}(dim, {hidden}{bias})",
                    f"  down_proj = {linear}({hidden}, dim{bias})",
                    f"  return down_proj({applied.format('gate_proj(x)')} * up_proj(x))",
                    "}"])
            else:
                mname = own_module_name(f"{mlp_module}_mlp")
                modules.append([
                    f"# {fam.title}'s MLP: down({applied.format('up(x)')}) "
                    f"({key('hidden_act')} {act})",
                    f"module {mname}(x) {{",
                    f"  up_proj   = {linear}(dim, {hidden}{bias})",
                    f"  down_proj = {linear}({hidden}, dim{bias})",
                    f"  return down_proj({applied.format('up_proj(x)')})",
                    "}"])
            mlp = (mname, [])
        else:
            args = ["dim", f"hidden = {hidden}"]
            if mlp_bias and not fam.gated:
                args.append("bias = true")
            mlp = (mlp_op, args)

        if fam.experts is not None and moe is not None and all(k.moe for k in kinds):  # no dense MLP
            mlp = None
            p.items["ffn_hidden"].used = fam.experts.hidden == key("intermediate_size")
        elif fam.routed in ("sigmoid", "softmax") and moe is not None and all(sparse):
            p.items["ffn_hidden"].used = False  # the experts have a width of their own

        shown = os.path.dirname(source) if source.endswith("config.json") else source
        archs_text = ", ".join(archs) if archs else f"no architectures (model_type {model_type})"
        version = src.value.get("transformers_version")
        header = [
            f"{fam.title} model imported by `forgec import-hf` from {source}",
            f"({archs_text}, model_type \"{model_type}\""
            + (f", transformers {version})." if version else ")."),
            "Each parameter's comment names the config.json field it comes from; \"(default)\":",
            "not in the file, transformers' default.",
            f"Weights: runtime.hf.load_hf_checkpoint(model, \"{shown}\")."
            + (f" {fam.note}" if fam.note else ""),
        ]
        header += self.notes
        if acknowledged:
            header.append("Ignored at the user's request (--ignore): " + ", ".join(acknowledged)
                          + ".")
        if note := getattr(self, "dense_layers_note", None):
            stack_notes.insert(0, note)
        if any(k.nope for k in kinds):
            nope_field = ("layer_rope_theta" if "layer_rope_theta" in d
                          else "layer_types and sliding_window" if fam.full_nope == "with_window"
                          else "layer_types" if fam.full_nope == "always"
                          else "no_rope_layers")
            stack_notes.append(f"{nope_field}: layers " + ", ".join(
                str(i) for i, k in enumerate(kinds) if k.nope) + " attend without positions")
        return Decoder(
            name=name, header=header, params=p, stack_notes=stack_notes,
            norm=f"{foreign_op('hf', fam.norm)}(dim, eps = {p('norm_eps')}{fam.norm_args})",
            rope=rope, attention=attention, window=p("window") if window is not None else None,
            mlp=mlp if not all(sparse) else None, moe=moe, kinds=kinds, tie=tie,
            framework="hf", residual=residual, modules=modules, head_bias=head_bias,
            embedding_args=embedding_args, head_args=head_args, residual_scale=residual_scale,
            pre_norms=fam.pre_norms, post_norms=fam.post_norms,
            post_norm_names=fam.post_norm_names,
            window_names=fam.window_names if fam.window_layers else None,
            window_args=["local_rope = true"] if fam.local_rope
            and not getattr(self, "one_base", False) else [],
            attention_op=self.latent_op if fam.latent else None,
            ssm=ssm, ssm_names=("attention_norm", "linear_attn"),
            mixer_names=("deltanet", "full"))

    def _linear_layers(self, f: Fields, fam: Dense, d: dict,
                       n: int) -> tuple[tuple[str, list[str]] | None, list[bool]]:
        """Qwen3-Next: the linear-attention mixer (op, arguments) and which layers it
        mixes: layer_types' linear_attention layers, else all but every
        full_attention_interval-th."""
        p = self.p
        types = f.obj.get("layer_types")  # checked by _rotating_layers
        if isinstance(types, list) and len(types) == n:
            f.consume("full_attention_interval")  # transformers reads it only without them
            linear = [t == "linear_attention" for t in types]
        else:
            interval = f.get("full_attention_interval", "int", d["full_attention_interval"],
                             positive=True)
            linear = [interval is not None and (i + 1) % interval != 0 for i in range(n)]
        config = {"rms_norm_eps": p.value("norm_eps")}
        for k in fam.linear_mixer_fields:
            config[k] = f.get(k, "int", d[k], positive=True)
        qk, v = config.get("linear_num_key_heads"), config.get("linear_num_value_heads")
        if qk and v and v % qk:
            f.error("E116", "linear_num_value_heads", f"linear_num_value_heads = {v} is not a "
                    f"multiple of linear_num_key_heads = {qk}",
                    "each key head of the gated DeltaNet serves as many value heads")
            return None, linear
        if None in config.values() or not any(linear):
            return None, [False] * n
        op = foreign_op("hf", fam.linear_mixer)
        args = ["dim"]
        for arg, value, why in foreign_ops("hf", fam.linear_mixer)[op].foreign["hf"].args(
                config, lambda k: self.note_default(f, k)):
            if arg == "norm_eps":
                value = p("norm_eps")
            elif why is not None:
                p.add(f"linear_{arg}", value, why)
                value = p(f"linear_{arg}")
            else:
                value = fmt(value)
            args.append(f"{arg} = {value}")
        self.notes.append("Layers: " + ", ".join(
            str(i) for i, lin in enumerate(linear) if not lin) + " attend (full_attention); "
            "the others mix the sequence by gated DeltaNet (linear_attention).")
        return (op, args), linear


# ---- mixtures of experts of the general importer (OLMoE, Qwen2-MoE, GraniteMoE) ----------


def dense_experts(self: DenseImporter, f: Fields, fam: Dense, kinds: list[LayerKind]):
    """The MoE op and its arguments, the layers' kinds (which are MoE) and a stack note,
    from `fam.experts`' fields, for DenseImporter `self`."""
    ex, d, p, n = fam.experts, fam.defaults, self.p, len(kinds)
    experts = f.get(ex.count, "int", d[ex.count])
    top_k = f.get("num_experts_per_tok", "int", d["num_experts_per_tok"], positive=True)
    hidden = (f.get(ex.hidden, "int", d[ex.hidden], positive=True)
              if ex.hidden != "intermediate_size" else p.value("ffn_hidden"))
    logits = f.get("output_router_logits", "bool", d["output_router_logits"])
    coef = f.get("router_aux_loss_coef", "float", d["router_aux_loss_coef"])
    renormalize = (f.get(ex.renormalize, "bool", d[ex.renormalize])
                   if isinstance(ex.renormalize, str) else ex.renormalize)
    shared = (f.get(ex.shared_gated, "int", d[ex.shared_gated], positive=True)
              if ex.shared_gated else 0)
    plain_shared = f.get(ex.shared, "int", d[ex.shared]) if ex.shared else 0
    if plain_shared is not None and plain_shared < 0:
        f.error("E113", ex.shared, f"'{ex.shared}' must not be negative, got {plain_shared}")
        plain_shared = None
    jitter = f.get(ex.jitter, "float", d[ex.jitter]) if ex.jitter else 0.0
    if jitter is not None and jitter < 0:
        f.error("E113", ex.jitter, f"'{ex.jitter}' must not be negative, got {fmt(jitter)}")
        jitter = None
    noise = f.get(ex.input_jitter, "float", d[ex.input_jitter]) if ex.input_jitter else 0.0
    if noise:
        f.error("E114", ex.input_jitter, f"{ex.input_jitter} = {fmt(noise)} cannot be "
                "expressed: HF multiplies the experts' input by uniform noise in "
                f"[1 - {fmt(noise)}, 1 + {fmt(noise)}] in training, and forgec adds no noise",
                "set it to 0.0 to import the model for training without input noise")
    if experts is not None and experts < 0:
        f.error("E113", ex.count, f"'{ex.count}' must not be negative, got {experts}")
        experts = None
    if experts and top_k and top_k > experts:
        f.error("E113", "num_experts_per_tok", f"num_experts_per_tok = {top_k} is more than "
                f"the {experts} experts")
        top_k = None
    if ex.jitter and top_k is not None and top_k != 2:
        f.error("E114", "num_experts_per_tok", f"num_experts_per_tok = {top_k} cannot be "
                "expressed: this router always picks 2 experts (transformers routes 2 "
                "whatever the field says)", "only num_experts_per_tok = 2 imports")
        top_k = None
    notes: list[str] = []
    sparse = [bool(experts)] * n
    if ex.sparse_step:
        step = f.get("decoder_sparse_step", "int", d["decoder_sparse_step"], positive=True)
        only = f.get("mlp_only_layers", "list", d["mlp_only_layers"])
        only_set = set()
        for i, v in enumerate(only or []):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
                self.diags.error("E113", f"mlp_only_layers[{i}] = {v!r} is not a layer "
                                 f"(0 … {n - 1})", self.src.span(("mlp_only_layers", i)))
            else:
                only_set.add(v)
        sparse = [bool(experts) and step is not None and i not in only_set
                  and (i + 1) % step == 0 for i in range(n)]
        if step is not None and any(sparse) and not all(sparse):
            rule = (f"(i + 1) % {step} == 0 and i is not in mlp_only_layers" if step > 1
                    else "i is not in mlp_only_layers")
            notes.append(f"decoder_sparse_step = {step}, mlp_only_layers = "
                         f"{sorted(only_set)}: layer i is a mixture of experts iff {rule}")
    if None in (experts, top_k, hidden, logits, coef, renormalize, shared, jitter, noise,
                plain_shared) \
            or not any(sparse):
        return None, kinds, notes
    p.add("n_experts", experts, self.note_default(f, ex.count))
    p.add("top_k", top_k, self.note_default(f, "num_experts_per_tok"))
    if ex.hidden != "intermediate_size":
        p.add("expert_hidden", hidden, self.note_default(f, ex.hidden))
    if logits:
        p.add("aux_loss_weight", coef, self.note_default(f, "router_aux_loss_coef")
              + " (HF: one loss over all layers)")
    else:
        p.add("aux_loss_weight", 0.0, f"output_router_logits false: HF adds no balance "
              f"loss (router_aux_loss_coef {fmt(coef)})")
    args = ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
            f"hidden = {p('ffn_hidden' if ex.hidden == 'intermediate_size' else 'expert_hidden')}"]
    if shared:
        p.add("shared_hidden", shared, self.note_default(f, ex.shared_gated))
        args += ["shared_experts = 1", f"shared_hidden = {p('shared_hidden')}",
                 "shared_gate = true"]
    if plain_shared:
        p.add("shared_hidden", plain_shared, self.note_default(f, ex.shared))
        args += ["shared_experts = 1", f"shared_hidden = {p('shared_hidden')}"]
    if ex.jitter:
        router = foreign_choices("hf", "router", "model_type")[f.obj["model_type"]]
        p.add("jitter_eps", jitter, self.note_default(f, ex.jitter))
        args.append(f"router = {router}(jitter_eps = {p('jitter_eps')}, "
                    f"aux_loss_weight = {p('aux_loss_weight')})")
    else:
        args.append(f"router = {foreign_op('hf', 'router')}(renormalize = "
                    f"{fmt(bool(renormalize))}, aux_loss_weight = {p('aux_loss_weight')})")
    kinds = [LayerKind(k.window, s, k.nope) for k, s in zip(kinds, sparse, strict=True)]
    act = f.obj.get("hidden_act", d["hidden_act"])  # checked with the dense MLP's
    return (foreign_op("hf", "experts", hidden_act=act), args), kinds, notes


_MOE_COMMON = {"output_router_logits": False, "router_aux_loss_coef": 0.001,
               "num_experts_per_tok": 2}
DENSE.update({
    # OLMo 2's qk-norm over the whole projections on a Llama-style MoE (no post-norms)
    "olmoe": Dense(
        "OLMoE", ("OlmoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
            "clip_qkv": None, **_MOE_COMMON, "num_experts_per_tok": 8, "num_experts": 64,
            "router_aux_loss_coef": 0.01, "norm_topk_prob": False},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), clip_qkv=True, qk_norm_over="projection",
        experts=Experts()),
    # Qwen2 (q/k/v biases) whose MoE layers add a shared expert scaled by a sigmoid gate
    "qwen2_moe": Dense(
        "Qwen2-MoE", ("Qwen2MoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 16,
            "rope_theta": 10000.0, "qkv_bias": True, "attention_dropout": 0.0,
            "use_sliding_window": False, "sliding_window": 4096, "layer_types": None,
            **_MOE_COMMON, "num_experts_per_tok": 4, "num_experts": 60,
            "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
        aliases=_RMS, norm="norm", qkv_bias="qkv_bias", gated=True,
        dropouts=("attention_dropout",), fixed={"use_sliding_window": False},
        # which layers would slide, were use_sliding_window true
        inert=("max_window_layers",),
        experts=Experts(hidden="moe_intermediate_size", sparse_step=True,
                        shared_gated="shared_expert_intermediate_size")),
    # Granite's multipliers on a Mixtral-style MoE (softmax over the top-k logits)
    "granitemoe": Dense(
        "GraniteMoE", ("GraniteMoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
            "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
            "attention_multiplier": 1.0, **_MOE_COMMON, "num_local_experts": 8},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), multipliers=True,
        experts=Experts(count="num_local_experts", renormalize=True),
        note="Each layer's block_sparse_moe input_linear (gate rows, then up rows) and "
             "output_linear are its experts' packed projections."),
})

# ---- PhiMoE and further mixture-of-experts families (issue #13) ----
DENSE.update({
    # LayerNorms with biases, attention and head biases, experts on every layer routed
    # by sparsemixer (router_jitter_noise is its window, not noise)
    "phimoe": Dense(
        "PhiMoE", ("PhimoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "rope_theta": 1000000.0, "sliding_window": None, "attention_bias": False,
            "lm_head_bias": False, "attention_dropout": 0.0, **_MOE_COMMON,
            "num_local_experts": 16, "router_jitter_noise": 0.01, "input_jitter_noise": 0.0},
        aliases=_RMS, qkv_bias="attention_bias", out_bias="attention_bias",
        head_bias="lm_head_bias", gated=True, dropouts=("attention_dropout",),
        experts=Experts(count="num_local_experts", renormalize=False,
                        jitter="router_jitter_noise", input_jitter="input_jitter_noise")),
    # DeepSeek-V3's mixture (dense first layers, grouped biased sigmoid routing, shared
    # experts, a routed scale) under grouped-query attention: q/k/v biases, half of each
    # head rotating, an optional per-head qk-norm
    "glm4_moe": Dense(
        "GLM-4-MoE", ("Glm4MoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "head_dim": None, "rope_theta": 10000.0, "attention_bias": False,
            "attention_dropout": 0.0, "first_k_dense_replace": 1, "n_shared_experts": 1,
            "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "use_qk_norm": False},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", gated=True,
        dropouts=("attention_dropout",), routed="sigmoid", qk_norm_field="use_qk_norm",
        rotary_pct_field="partial_rotary_factor",
        # HF's causal LM adds no balance loss; the multi-token-prediction layers are not
        # part of it
        inert=("output_router_logits", "num_nextn_predict_layers", "num_mtp_layers")),
    # the same mixture under Qwen3's attention: a per-head qk-norm, sliding layers by
    # layer_types (max_window_layers only fills layer_types in)
    "dots1": Dense(
        "dots.llm1", ("Dots1ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 32,
            "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
            "first_k_dense_replace": 0, "n_shared_experts": None,
            "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": False, "sliding_window": 4096, "sliding_window_pattern": None},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), routed="sigmoid", qk_norm_over="head",
        window_layers=True, window_names=None,
        inert=("output_router_logits", "max_window_layers")),
    # DeepSeek-V3 with its layers' kinds listed (mlp_layer_types) rather than counted
    "glm4_moe_lite": Dense(
        "GLM-4-MoE-Lite", ("Glm4MoeLiteForCausalLM",), {
            **{k: v for k, v in _DEEPSEEK_DEFAULTS.items() if k != "first_k_dense_replace"},
            "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "n_shared_experts": 1,
            "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "q_lora_rank": 768, "qk_nope_head_dim": 192,
            "v_head_dim": 256, "mlp_layer_types": None},
        routed="sigmoid", **_DEEPSEEK),
    # GLM-4-MoE's experts on every layer under Llama's attention (q/k/v biases, full rotary)
    "solar_open": Dense(
        "Solar Open", ("SolarOpenForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "head_dim": 128, "rope_theta": 1000000.0, "attention_bias": False,
            "attention_dropout": 0.0, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": True},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", gated=True,
        dropouts=("attention_dropout",), routed="sigmoid", dense_mlp=False,
        inert=("output_router_logits",)),
    # DeepSeek-V3 itself under another name (its config also reads the original Sarvam keys)
    "sarvam_mla": Dense(
        "Sarvam-MLA", ("SarvamMLAForCausalLM",), {
            **_DEEPSEEK_DEFAULTS, "first_k_dense_replace": 1, "n_shared_experts": 1,
            "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "q_lora_rank": None, "initializer_range": 0.006},
        routed="sigmoid", **_DEEPSEEK),
    # OLMo 2's layers (post-norms only, qk-norm over the whole projections) with OLMoE's
    # experts on every layer
    "flex_olmo": Dense(
        "FlexOlmo", ("FlexOlmoForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 500000.0, "attention_bias": False, "attention_dropout": 0.0,
            **_MOE_COMMON, "num_experts_per_tok": 5, "num_experts": 7,
            "router_aux_loss_coef": 0.01, "norm_topk_prob": False},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), pre_norms=False, post_norms=True,
        qk_norm_over="projection", experts=Experts()),
    # Mixtral's layout (its names, experts of intermediate_size on every layer) routed on
    # biased sigmoid scores, normalised; OLMo 2's qk-norm over the projections, partial rotary
    "minimax_m2": Dense(
        "MiniMax-M2", ("MiniMaxM2ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 196608, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "head_dim": 128, "rope_theta": 5000000.0, "attention_dropout": 0.0,
            "num_experts_per_tok": 8, "num_local_experts": 256, "output_router_logits": False,
            "router_jitter_noise": 0.0},
        aliases={**_RMS, "n_routed_experts": "num_local_experts",
                 "moe_intermediate_size": "intermediate_size"},
        norm="norm", gated=True, dropouts=("attention_dropout",), routed="sigmoid",
        dense_mlp=False, qk_norm_over="projection",
        routed_fixed={"n_shared_experts": None, "routed_scaling_factor": 1.0,
                      "norm_topk_prob": True, "n_group": 1, "topk_group": 1},
        # HF adds Mixtral's balance loss only with output_router_logits, and multiplies
        # the experts' input by noise in training with router_jitter_noise
        fixed={"output_router_logits": False, "router_jitter_noise": 0.0},
        # router_aux_loss_coef weighs the loss output_router_logits (false) would add;
        # transformers turns rotary_dim into rope_parameters.partial_rotary_factor
        inert=("router_aux_loss_coef", "rotary_dim"),
        note="Its block_sparse_moe e_score_correction_bias is the router's expert_bias."),
    # GraniteMoeShared with sliding-window layers (layer_types), a sink logit per head and
    # NoPE layers (layer_rope_theta 0)
    "granitemoe_swa": Dense(
        "GraniteMoeSWA", ("GraniteMoeSWAForCausalLM",), {
            **DENSE["granitemoe"].defaults, "shared_intermediate_size": 0,
            "sliding_window": 128, "sliding_window_pattern": None, "layer_rope_theta": None},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), multipliers=True, sinks=True,
        window_layers=True, window_names=None,
        experts=Experts(count="num_local_experts", renormalize=True,
                        shared="shared_intermediate_size"),
        note="Each layer's block_sparse_moe input_linear (gate rows, then up rows) and "
             "output_linear are its experts' packed projections, shared_mlp's its shared "
             "expert's."),
    # DeepSeek-V3's experts (its fields named num_experts, num_shared_experts) on the layers
    # mlp_layer_types marks sparse; a per-head qk-norm; sliding layers by layer_types, and
    # where a window is set the full-attention layers without positions
    "exaone_moe": Dense(
        "EXAONE-MoE", ("ExaoneMoeForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 32,
            "rope_theta": 10000.0, "attention_dropout": 0.0, "sliding_window": 4096,
            "sliding_window_pattern": None, "mlp_layer_types": None, "num_experts": 64,
            "num_experts_per_tok": 8, "num_shared_experts": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1},
        aliases={**_RMS, "n_routed_experts": "num_experts",
                 "n_shared_experts": "num_shared_experts"},
        norm="norm", gated=True, dropouts=("attention_dropout",), routed="sigmoid",
        qk_norm_over="head", window_layers=True, window_names=None, full_nope="with_window",
        # mlp_layer_types is written from first_k_dense_replace, layer_types from
        # sliding_window_pattern (an int or a string of L and G); HF's causal LM adds no
        # balance loss
        inert=("first_k_dense_replace", "output_router_logits", "num_nextn_predict_layers")),
    # GraniteMoE with a shared SwiGLU expert (its gate and up rows packed in input_linear)
    "granitemoeshared": Dense(
        "GraniteMoeShared", ("GraniteMoeSharedForCausalLM",), {
            **DENSE["granitemoe"].defaults, "shared_intermediate_size": 0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), multipliers=True,
        experts=Experts(count="num_local_experts", renormalize=True,
                        shared="shared_intermediate_size"),
        note="Each layer's block_sparse_moe input_linear (gate rows, then up rows) and "
             "output_linear are its experts' packed projections, shared_mlp's its shared "
             "expert's."),
})


# Qwen3-Next: gated DeltaNet (linear attention) layers and gated attention layers (per-head
# qk-norms scaling by 1 + w, a quarter of each head rotating), every norm scaling by 1 + w,
# a mixture of experts with a shared expert behind a sigmoid gate (dense MLP layers by
# mlp_only_layers / decoder_sparse_step)
DENSE["qwen3_next"] = Dense(
    "Qwen3-Next", ("Qwen3NextForCausalLM",), {
        "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 2,
        "head_dim": 256, "rope_theta": 10000.0, "attention_bias": False,
        "attention_dropout": 0.0, "layer_types": None, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, **_MOE_COMMON,
        "num_experts_per_tok": 10, "num_experts": 512, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": []},
    aliases=_RMS, norm="norm", norm_args=", unit_offset = true", qkv_bias="attention_bias",
    out_bias="attention_bias", gated=True, dropouts=("attention_dropout",),
    rotary_pct_field="partial_rotary_factor", qk_norm_over="head",
    qk_norm_args=("qk_norm_unit_offset = true",), output_gate=True,
    linear_mixer="gated_deltanet_mixer",
    linear_mixer_fields=("linear_num_key_heads", "linear_num_value_heads",
                         "linear_key_head_dim", "linear_value_head_dim",
                         "linear_conv_kernel_dim"),
    experts=Experts(hidden="moe_intermediate_size", sparse_step=True,
                    shared_gated="shared_expert_intermediate_size"))


# ---- more decoders (issue #13) -------------------------------------------------------------
def _falcon_layout(get: Callable, heads: int | None) -> tuple[int | None, str, str]:
    """Falcon's KV heads and block from its layout fields: the new decoder architecture has
    num_kv_heads and a parallel block with two norms (num_ln_in_parallel_attn 2, its
    default) or one; the others one KV head (multi_query) or one per head, and a parallel
    block on one norm (parallel_attn) or a sequential one."""
    if get("new_decoder_architecture", "bool"):
        kv = get("num_kv_heads", "int?", positive=True)
        norms = get("num_ln_in_parallel_attn", "int?", positive=True)
        get("multi_query", "bool")
        get("parallel_attn", "bool")
        return (kv, "parallel" if norms in (None, 2) else "parallel_shared",
                "num_kv_heads (new_decoder_architecture)")
    get("num_kv_heads", "int?")  # read only by the new decoder architecture
    get("num_ln_in_parallel_attn", "int?")
    one = get("multi_query", "bool")
    return (1 if one else heads, "parallel_shared" if get("parallel_attn", "bool")
            else "sequential", "multi_query: one KV head" if one
            else "num_attention_heads (multi_query false)")


# Each is data over the shared translation: Llama-style layers with what the family's
# layer fixes. Checkpoint names: runtime/hf.py (TABLE_FAMILIES, else the Llama names).
_INTERLEAVED = ("{title} rotates interleaved channel pairs; q_proj and k_proj are permuted on "
                "load so that the spec's rope (half-split pairs) computes the same scores.")
_SLIDING = dict(window_layers=True, window_names=("sliding", "full"))
DENSE.update({
    # Mistral's layers, sliding after layer_types (default: all, where a window is set)
    "ministral": Dense(
        "Ministral", ("MinistralForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "head_dim": None, "rope_theta": 10000.0, "sliding_window": 4096,
            "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", gated=True, dropouts=("attention_dropout",), **_SLIDING),
    # Llama with q/k/v biases (attention_bias), an o_proj bias of its own and MLP biases
    "seed_oss": Dense(
        "Seed-OSS", ("SeedOssForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 524288, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 8,
            "head_dim": 128, "rope_theta": 10000.0, "attention_bias": True,
            "attention_out_bias": False, "mlp_bias": False, "attention_dropout": 0.1,
            "residual_dropout": 0.1},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_out_bias",
        mlp_bias="mlp_bias", gated=True, dropouts=("attention_dropout", "residual_dropout")),
    # Llama with interleaved rotary pairs, q/k/v biases (o_proj has none)
    "helium": Dense(
        "Helium", ("HeliumForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-8, "tie_word_embeddings": False, "num_key_value_heads": 20,
            "head_dim": 128, "rope_theta": 100000.0, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", mlp_bias="mlp_bias", gated=True,
        dropouts=("attention_dropout",), note=_INTERLEAVED.format(title="Helium")),
    # Llama with interleaved rotary pairs, every projection biased by use_bias
    "ernie4_5": Dense(
        "ERNIE 4.5", ("Ernie4_5ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "num_key_value_heads": 2,
            "head_dim": 128, "rope_theta": 500000.0, "use_bias": False},
        aliases=_RMS, norm="norm", qkv_bias="use_bias", out_bias="use_bias",
        mlp_bias="use_bias", gated=True, note=_INTERLEAVED.format(title="ERNIE 4.5")),
    # GLM-4 without its sandwich norms: interleaved partial rotary, q/k/v biases, fused
    # gate_up_proj
    "glm": Dense(
        "GLM", ("GlmForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
            "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False, "num_key_value_heads": 2,
            "head_dim": 128, "rope_theta": 10000.0, "attention_bias": True,
            "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", gated=True,
        dropouts=("attention_dropout",),
        note=_INTERLEAVED.format(title="GLM") + " gate_up_proj is split into gate/up_proj."),
    # Llama with a two-layer ReLU² MLP (up, down), written as a module of the spec
    "arcee": Dense(
        "Arcee", ("ArceeForCausalLM",), {
            "hidden_act": "relu2", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "head_dim": None, "rope_theta": 10000.0, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        mlp_bias="mlp_bias", dropouts=("attention_dropout",)),
    # Gemma 2 without its post-norms (a norm before attention and before the MLP)
    "vaultgemma": Dense(
        "VaultGemma", ("VaultGemmaForCausalLM",), {
            **_GEMMA_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh",
            "num_key_value_heads": 4, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "sliding_window_pattern": 2},
        **{**_GEMMA2, "post_norms": False, "post_norm_names": None}),
    # OLMo 2 (post-norms, qk-norm over the projections) with sliding layers after
    # layer_types (default: every 4th full) and a RoPE base per layer type
    "olmo3": Dense(
        "OLMo 3", ("Olmo3ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "rope_theta": 500000.0, "attention_bias": False, "attention_dropout": 0.0,
            "sliding_window": 4096, "sliding_window_pattern": 4},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), pre_norms=False, post_norms=True,
        qk_norm_over="projection", local_rope=True, local_rope_if_differs=True, **_SLIDING),
    # Cohere's parallel block with sliding layers (layer_types; default every 4th full);
    # only the sliding layers turn (the full ones attend without positions)
    "cohere2": Dense(
        "Cohere 2", ("Cohere2ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 8192, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": True, "num_key_value_heads": None,
            "head_dim": None, "rope_theta": 10000.0, "attention_bias": False,
            "attention_dropout": 0.0, "logit_scale": 0.0625, "sliding_window": 4096,
            "sliding_window_pattern": 4},
        norm_args=", bias = false", residual="parallel_shared", qkv_bias="attention_bias",
        out_bias="attention_bias", gated=True, dropouts=("attention_dropout",),
        logit_scale=True, full_nope="always", note=_INTERLEAVED.format(title="Cohere 2"),
        **_SLIDING),
    # OLMo 2's post-norms with a per-head qk-norm, sliding layers after layer_types; with
    # a window, the full layers attend without positions
    "exaone4": Dense(
        "EXAONE 4", ("Exaone4ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 32,
            "rope_theta": 10000.0, "attention_dropout": 0.0, "sliding_window": 4096,
            "sliding_window_pattern": 4},
        aliases=_RMS, norm="norm", gated=True, dropouts=("attention_dropout",),
        pre_norms=False, post_norms=True, qk_norm_over="head", full_nope="with_window",
        **_SLIDING),
    # Granite's multipliers, sliding layers (default: 0, 4, 8 ... full), a sink per head
    # (HF scales each head's output by sigmoid(lse − sink): a softmax with a sink logit),
    # layer_rope_theta 0: no positions
    "granite_swa": Dense(
        "Granite SWA", ("GraniteSWAForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 8192, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "num_key_value_heads": 4,
            "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
            "residual_multiplier": 1.0, "attention_multiplier": 1.0, "sliding_window": 128,
            "sliding_window_pattern": 4, "layer_rope_theta": None},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        mlp_bias="mlp_bias", gated=True, dropouts=("attention_dropout",), multipliers=True,
        sinks=True, full_first=True, **_SLIDING),
    # Llama whose per-head qk-norm (query_layernorm, key_layernorm) follows RoPE
    "hunyuan_v1_dense": Dense(
        "HunYuan (dense)", ("HunYuanDenseV1ForCausalLM",), {
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "head_dim": None, "rope_theta": 10000.0, "attention_bias": False,
            "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), qk_norm_over="head",
        qk_norm_args=("qk_norm_after_rope = true",), inert=("eod_token_id",)),
    # LayerNorm scaling by 1 + weight (LayerNorm1P), a two-layer ReLU² MLP, partial rotary
    "nemotron": Dense(
        "Nemotron", ("NemotronForCausalLM",), {
            "hidden_act": "relu2", "max_position_embeddings": 4096, "initializer_range": 0.0134,
            "norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": None,
            "head_dim": None, "rope_theta": 10000.0, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0},
        aliases={"layer_norm_eps": "norm_eps"}, norm_args=", unit_offset = true",
        qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias",
        dropouts=("attention_dropout",)),
    # Llama with RMSNorms inside: of the heads' output (attn_sub_norm) and of the gated
    # ReLU² MLP's hidden (ffn_sub_norm); its checkpoints' weights as they are (bf16)
    "bitnet": Dense(
        "BitNet", ("BitNetForCausalLM",), {
            "hidden_act": "relu2", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_key_value_heads": 5,
            "rope_theta": 500000.0, "attention_bias": False, "attention_dropout": 0.0},
        aliases=_RMS, norm="norm", qkv_bias="attention_bias", out_bias="attention_bias",
        gated=True, dropouts=("attention_dropout",), sub_norms=True),
    # LayerNorms, q and k normed per head by LayerNorms with biases (qk_layernorm), half of
    # each head rotating, a two-layer ReLU² MLP, biases everywhere, fused per-head
    # query_key_value
    "persimmon": Dense(
        "Persimmon", ("PersimmonForCausalLM",), {
            "hidden_act": "relu2", "max_position_embeddings": 16384, "initializer_range": 0.02,
            "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0,
            "qk_layernorm": True, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        qkv_bias=True, out_bias=True, mlp_bias=True, dropouts=("hidden_dropout",
                                                               "attention_dropout"),
        qk_norm_over="head", qk_norm_field="qk_layernorm",
        qk_norm_args=("qk_norm_kind = layer",),
        note="query_key_value (per head q, k, v) is split into q/k/v_proj on load."),
    # parallel attention + MLP on one LayerNorm (or two: the new decoder architecture's
    # ln_attn, ln_mlp), or a sequential block; multi-query, grouped or full KV heads;
    # ALiBi is refused (alibi, fixed false)
    "falcon": Dense(
        "Falcon", ("FalconForCausalLM",), {
            "activation": "gelu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "rope_theta": 10000.0,
            "ffn_hidden_size": None, "bias": False, "alibi": False,
            "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
            "num_ln_in_parallel_attn": None, "num_kv_heads": None, "hidden_dropout": 0.0,
            "attention_dropout": 0.0},
        aliases={"layer_norm_eps": "layer_norm_epsilon", "intermediate_size": "ffn_hidden_size",
                 "hidden_act": "activation"},
        qkv_bias="bias", out_bias="bias", mlp_bias="bias", fixed={"alibi": False},
        dropouts=("hidden_dropout", "attention_dropout"), layout=_falcon_layout,
        note="query_key_value (each KV head's queries, key and value) is split into "
             "q/k/v_proj on load."),
})


# Families whose causal LM the language cannot say: the field that says why (located where
# the config writes it, else at model_type), the reason and what to do.
REFUSED: dict[str, tuple[str, str, str]] = {
    # ---- mixture-of-experts families looked at for issue #13 ----
    "hunyuan_v1_moe": ("model_type", "HunYuan-MoE norms each head of q and k after the "
                       "rotary embedding, and forgec's attention norms them before it (the "
                       "per-channel weights do not commute with the rotation)",
                       "forgec's qk_norm runs before RoPE"),
    "minimax": ("layer_types", "MiniMax's lightning (linear) attention layers cannot be "
                "expressed: forgec has no linear-attention mixer",
                "forgec's self-attention ops are attention (softmax) and mla"),
    "ernie4_5_moe": ("moe_num_experts", "ERNIE 4.5 MoE chooses its experts on softmax "
                     "probabilities plus a score-correction bias and weighs them by the "
                     "unbiased probabilities, which no forgec router computes",
                     "softmax_topk chooses on the probabilities alone; sigmoid_topk's "
                     "correction bias goes with sigmoid scores"),
    "jetmoe": ("num_local_experts", "JetMoE routes its attention heads too (a mixture of "
               "attention experts, kv_channels wide), which forgec's attention cannot say",
               "forgec's experts replace the MLP only"),
    "longcat_flash": ("zero_expert_num", "LongCat-Flash routes tokens to zero-computation "
                      "experts and runs two attentions per layer, which forgec's moe and "
                      "blocks cannot say", "forgec's experts are SwiGLUs"),
}


# more decoders (issue #13) that the language cannot say
_POSITIONS = ("{title} adds learned absolute position embeddings ({key} of them) to the "
              "token embeddings: forgec's embedding has none, its positions are RoPE's",
              "forgec imports decoders with rotary positions (or none)")
REFUSED.update({
    "gpt2": ("n_positions", *(x.format(title="GPT-2", key="n_positions") for x in _POSITIONS)),
    "gpt_bigcode": ("n_positions", *(x.format(title="GPTBigCode", key="n_positions")
                                     for x in _POSITIONS)),
    "gpt_neo": ("max_position_embeddings",
                *(x.format(title="GPT-Neo", key="max_position_embeddings")
                  for x in _POSITIONS)),
    "opt": ("max_position_embeddings", *(x.format(title="OPT", key="max_position_embeddings")
                                         for x in _POSITIONS)),
    "apertus": ("hidden_act", "Apertus's xIELU activation has learned scalars per MLP "
                "(alpha_p, alpha_n), which no composition of the spec's functions has",
                "the spec's activations: silu, gelu, gelu_tanh, relu, sigmoid, tanh, square"),
})


def refuse(src: Located, diags: Diagnostics, model_type: str) -> None:
    """The located E114 of a REFUSED family."""
    key, message, hint = REFUSED[model_type]
    f = Fields(src, src.value, (), diags, "config.json")
    f.error("E114", key if key in f else "model_type", message, hint)


# ---- state-space hybrids (Jamba, Mamba-2, Bamba, LFM2) -----------------------------------
# A family is data as above; what it shares with the decoders is the reading of the core
# sizes, the spine and the header. Its mixer's arguments come from the mixer op's own
# reading of the config (`Foreign.args` of role "mamba_mixer" / "mamba2_mixer").


@dataclass(frozen=True)
class Hybrid:
    title: str
    architectures: tuple[str, ...]
    defaults: dict  # transformers 5.x defaults of the fields read
    mixer: str  # the foreign role of its state-space mixer op
    mixer_fields: tuple[str, ...]  # the config fields the mixer op reads
    # the mixer's norm and component, as the weight loader names them (None: the mixer
    # op's name, as Jamba's layers call their Mamba mixer)
    ssm_names: tuple[str, str | None]
    eps_key: str = "rms_norm_eps"
    # the layout's fields: (attention period, offset), (experts period, offset); None: all
    # layers are mixers without an MLP (Mamba-2)
    layout: tuple[tuple[str, str], tuple[str, str]] | None = None
    inert: tuple[str, ...] = ()  # fields that do not change the function (kernels, init)
    fixed: dict = field(default_factory=dict)  # field → the one value forgec expresses
    dropouts: tuple[str, ...] = ()
    # (Bamba, LFM2) the field listing the attention layers ("attn_layer_indices", or
    # "layer_types" naming each layer); the attention rotates (RoPE) and every layer has
    # an MLP of intermediate_size
    listed: str | None = None
    # the mixer's fields under the names of the mixer op's own config (Bamba's
    # mamba_n_heads is Mamba-2's num_heads): this family's field → the op's
    aliases: dict = field(default_factory=dict)
    # the mixer component is named after the op of this foreign role (Bamba's layers
    # call their Mamba-2 mixer as Jamba's call their Mamba one) instead of ssm_names[1]
    component_role: str | None = None
    param_prefix: str = "ssm_"  # of the mixer's named parameters
    block_name: str = "ssm"  # of the mixer's blocks
    # the attention normalises each head's queries and keys (LFM2's q/k_layernorm)
    qk_norm: bool = False
    # the partial_rotary_factor of a config that leaves it out (Bamba's 0.5)
    partial_rotary: float = 1.0
    # older field names transformers still reads, over the new ones: old → new
    renamed: dict = field(default_factory=dict)
    # fields of the original checkpoints that transformers reads nowhere, each repeating
    # another field (the value of a field, or a constant): they must agree with it
    mirrors: dict = field(default_factory=dict)


HYBRID = {
    "jamba": Hybrid(
        "Jamba", ("JambaForCausalLM",), {
            "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "max_position_embeddings": 262144,
            "num_key_value_heads": 8, "attention_dropout": 0.0, "num_experts": 16,
            "num_experts_per_tok": 2, "output_router_logits": False,
            "router_aux_loss_coef": 0.001, "expert_layer_period": 2, "expert_layer_offset": 1,
            "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16,
            "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto",
            "mamba_conv_bias": True, "mamba_proj_bias": False},
        mixer="mamba_mixer", ssm_names=("attention_norm", None),
        mixer_fields=("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                      "mamba_conv_bias", "mamba_proj_bias"),
        layout=(("attn_layer_period", "attn_layer_offset"),
                ("expert_layer_period", "expert_layer_offset")),
        # the CUDA kernels, the pure-PyTorch and the associative scans compute one function;
        # the logits kept by generation are not part of the model
        inert=("use_mamba_kernels", "use_mambapy", "use_associative_scan",
               "num_logits_to_keep"),
        dropouts=("attention_dropout",)),
    "mamba2": Hybrid(
        "Mamba-2", ("Mamba2ForCausalLM",), {
            "hidden_act": "silu", "initializer_range": 0.1, "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False, "num_heads": 128, "head_dim": 64, "state_size": 128,
            "n_groups": 8, "expand": 2, "conv_kernel": 4, "use_bias": False,
            "use_conv_bias": True, "chunk_size": 256, "residual_in_fp32": True,
            "time_step_limit": [0.0, float("inf")]},
        mixer="mamba2_mixer", ssm_names=("norm", "mixer"), eps_key="layer_norm_epsilon",
        mixer_fields=("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel",
                      "use_bias", "use_conv_bias", "chunk_size"),
        # initialisation only (time_step_rank is read by no layer of transformers' mixer)
        inert=("time_step_rank", "time_step_min", "time_step_max", "time_step_floor",
               "rescale_prenorm_residual"),
        fixed={"residual_in_fp32": True, "time_step_limit": [0.0, float("inf")]}),
    # ---- Bamba and LFM2 (attention layers by list, an MLP on every layer) ----
    "bamba": Hybrid(
        "Bamba", ("BambaForCausalLM",), {
            "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "max_position_embeddings": 262144,
            "num_key_value_heads": 8, "attention_dropout": 0.0, "rope_theta": 10000.0,
            "attn_layer_indices": None, "mamba_n_heads": 128, "mamba_d_head": "auto",
            "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2,
            "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
            "time_step_limit": [0.0, float("inf")], "z_loss_coefficient": 0.0,
            "attention_bias": False, "mlp_bias": False},
        mixer="mamba2_mixer", ssm_names=("attention_norm", None),
        mixer_fields=("mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups",
                      "mamba_d_conv", "mamba_proj_bias", "mamba_conv_bias",
                      "mamba_chunk_size"),
        aliases={"mamba_n_heads": "num_heads", "mamba_d_head": "head_dim",
                 "mamba_d_state": "state_size", "mamba_n_groups": "n_groups",
                 "mamba_d_conv": "conv_kernel", "mamba_proj_bias": "use_bias",
                 "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
                 "mamba_expand": "expand", "rms_norm_eps": "layer_norm_epsilon"},
        component_role="mamba_mixer", listed="attn_layer_indices", partial_rotary=0.5,
        # the kernels compute the same function; the logits kept by generation are not
        # part of the model
        inert=("use_mamba_kernels", "num_logits_to_keep"),
        fixed={"time_step_limit": [0.0, float("inf")]}, dropouts=("attention_dropout",)),
    "lfm2": Hybrid(
        "LFM2", ("Lfm2ForCausalLM",), {
            "initializer_range": 0.02, "norm_eps": 1e-5, "tie_word_embeddings": True,
            "max_position_embeddings": 128000, "num_key_value_heads": 8,
            "rope_theta": 1000000.0, "conv_bias": False, "conv_L_cache": 3,
            "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": True, "full_attn_idxs": None, "layer_types": None},
        mixer="conv_mixer", ssm_names=("attention_norm", "conv"), eps_key="norm_eps",
        mixer_fields=("conv_L_cache", "conv_bias"), listed="layer_types",
        param_prefix="conv_", block_name="conv", qk_norm=True,
        renamed={"tie_embedding": "tie_word_embeddings", "block_ff_dim": "intermediate_size"},
        # the Hub's LFM2 configs also carry the original code's names, which transformers
        # reads nowhere: initialisation, and repetitions of the fields it reads
        inert=("block_mlp_init_scale", "block_out_init_scale", "block_use_xavier_init",
               "conv_use_xavier_init"),
        mirrors={"block_dim": "hidden_size", "conv_dim": "hidden_size",
                 "conv_dim_out": "hidden_size", "num_heads": "num_attention_heads",
                 "block_norm_eps": "norm_eps", "theta": "rope_theta",
                 "block_use_swiglu": True, "use_pos_enc": True}),
}


class HybridImporter(Importer):
    """A state-space hybrid of HYBRID: Mamba mixers, attention and experts by period."""

    def run(self, name: str, source: str, max_seq_len: int | None) -> Decoder | None:
        src, diags, p = self.src, self.diags, self.p
        f = Fields(src, src.value, (), diags, "config.json")
        model_type = src.value["model_type"]
        f.consume("model_type")
        fam = HYBRID[model_type]
        d = fam.defaults
        f.consume(*NOT_ARCHITECTURE, *fam.inert)
        archs = f.get("architectures", "list?", None)
        for i, a in enumerate(archs or []):
            if a not in fam.architectures:
                diags.error("E114", f"architecture '{a}' is not {fam.architectures[0]}",
                            src.span(("architectures", i)),
                            f"forgec imports {fam.architectures[0]}")
        vocab = f.get("vocab_size", "int", positive=True)
        dim = f.get("hidden_size", "int", positive=True)
        n_layers = f.get("num_hidden_layers", "int", positive=True)
        eps = f.get(fam.eps_key, "float", d[fam.eps_key])
        init = f.get("initializer_range", "float", d["initializer_range"])
        for k, v in ((fam.eps_key, eps), ("initializer_range", init)):
            if v is not None and not 0 <= v <= 1:
                f.error("E113", k, f"'{k}' must be between 0 and 1, got {fmt(v)}")
        tie = f.get(self._key(f, fam, "tie_word_embeddings"), "bool", d["tie_word_embeddings"])
        # (LFM2's config has no hidden_act: its MLP and mixer are fixed)
        act = f.get("hidden_act", "str", d["hidden_act"]) if "hidden_act" in d else "silu"
        self.act = act
        if act is not None and act not in ("silu", "swish"):
            f.error("E114", "hidden_act", f"hidden_act '{act}' cannot be expressed: the "
                    f"{fam.title} mixer and experts of forgec use SiLU",
                    "only silu (= swish) imports")
        for k in fam.dropouts:
            v = f.get(k, "float", d.get(k, 0.0))
            if v:
                f.error("E114", k, f"{k} = {fmt(v)}: forgec has no dropout, and HF applies "
                        "it in training", "set it to 0.0 to import the model for training "
                        "without dropout")
        for k, want in fam.fixed.items():
            v = f.get(k, type(want).__name__, d.get(k, want))
            if isinstance(v, list):  # transformers 5 writes infinity as {"__float__": ...}
                v = [float(x["__float__"]) if isinstance(x, dict) and set(x) == {"__float__"}
                     and x["__float__"] in ("Infinity", "-Infinity", "NaN") else x for x in v]
            if v is not None and v != want:
                f.error("E114", k, f"{k} = {fmt(v)} cannot be expressed by forgec's "
                        f"{fam.title} mixer", f"only {k} = {fmt(want)} imports")
        for k, target in fam.mirrors.items():
            if k not in f:
                continue
            f.consume(k)
            if isinstance(target, bool):
                want, what = target, "transformers' only choice"
            elif target == "rope_theta" and "rope_theta" not in f:
                want = (src.value.get("rope_parameters") or {}).get("rope_theta", d[target])
                what = "rope_parameters.rope_theta"
            else:
                want, what = src.value.get(target, d.get(target)), target
            if f.obj[k] != want:
                f.error("E116", k, f"{k} = {fmt(f.obj[k])} contradicts {what} = {fmt(want)}",
                        f"transformers reads {what} and not {k}: make them agree")
        # the mixer's fields, type-checked and located here, read by the mixer op
        config = {"hidden_size": dim, fam.eps_key: eps}
        own = {op: k for k, op in fam.aliases.items()}  # the op's field → this family's
        for k in fam.mixer_fields:
            kind = {bool: "bool", int: "int"}.get(type(d[k]), "int")
            if k in ("mamba_dt_rank", "mamba_d_head") and isinstance(src.value.get(k), str):
                kind = "str"
            v = f.get(k, kind, d[k], positive=kind == "int")
            if kind == "str" and v != "auto":
                f.error("E113", k, f"'{k}' must be an integer or \"auto\", got {v!r}")
                v = None
            config[fam.aliases.get(k, k)] = v
        if fam.mixer == "mamba2_mixer":
            key = own.get("expand", "expand")
            expand = f.get(key, "int", d[key], positive=True)
            if config["head_dim"] == "auto":  # Bamba: the heads split the mixer's width
                config["head_dim"] = (expand * dim // config["num_heads"]
                                      if None not in (expand, dim, config["num_heads"]) else None)
            if None not in (expand, dim, config["num_heads"], config["head_dim"]) and \
                    expand * dim != config["num_heads"] * config["head_dim"]:
                f.error("E116", key, f"{key} × hidden_size = {expand * dim} is not "
                        f"{own.get('num_heads', 'num_heads')} × {own.get('head_dim', 'head_dim')}"
                        f" = {config['num_heads'] * config['head_dim']}",
                        f"transformers' {fam.title} mixer is "
                        f"{own.get('num_heads', 'num_heads')} × {own.get('head_dim', 'head_dim')}"
                        " wide")
            heads, groups = config["num_heads"], config["n_groups"]
            if heads and groups and heads % groups:
                f.error("E116", own.get("n_groups", "n_groups"),
                        f"{own.get('n_groups', 'n_groups')} = {groups} does not divide "
                        f"{own.get('num_heads', 'num_heads')} = {heads}")
        p.add("vocab_size", vocab, "vocab_size")
        p.add("dim", dim, "hidden_size")
        p.add("n_layers", n_layers, "num_hidden_layers")
        attention, kinds, rules, moe, mlp, rope = [], None, None, None, None, None
        if fam.layout is not None and n_layers:
            attention, kinds, rules, moe, mlp = self._jamba_layout(f, d, fam, n_layers, dim)
        elif fam.listed is not None and n_layers:
            attention, kinds, mlp, rope = self._listed_layout(f, d, fam, n_layers, dim)
        if None in (vocab, dim, n_layers, eps, init, tie) or None in config.values():
            f.unknown(self.ignore, fam.title)
            return None
        p.add("norm_eps", eps, self.note_default(f, fam.eps_key))
        p.add("init_std", init, self.note_default(f, "initializer_range"))
        p("init_std")
        if max_seq_len is not None:
            p.add("max_seq_len", max_seq_len, "--max-seq-len")
            p("max_seq_len")
        mixer_op = foreign_op("hf", fam.mixer)
        args = ["dim"]
        for arg, value, why in foreign_ops("hf", fam.mixer)[mixer_op].foreign["hf"].args(
                config, lambda k: self.note_default(f, own.get(k, k))):
            if arg == "norm_eps":
                value = p("norm_eps")
            elif why is not None and (kinds is None or any(k.ssm for k in kinds)):
                p.add(f"{fam.param_prefix}{arg}", value, why)
                value = p(f"{fam.param_prefix}{arg}")
            else:
                value = fmt(value)
            args.append(f"{arg} = {value}")
        if fam.layout is None and fam.listed is None:
            kinds = [LayerKind(False, False, False, True)] * n_layers
        acknowledged = f.unknown(self.ignore, fam.title)
        if diags.error_count or kinds is None or (fam.listed and any(not k.ssm for k in kinds)
                                                  and rope is None):
            return None
        shown = os.path.dirname(source) if source.endswith("config.json") else source
        archs_text = ", ".join(archs) if archs else f"no architectures (model_type {model_type})"
        version = src.value.get("transformers_version")
        header = [
            f"{fam.title} model imported by `forgec import-hf` from {source}",
            f"({archs_text}, model_type \"{model_type}\""
            + (f", transformers {version})." if version else ")."),
            "Each parameter's comment names the config.json field it comes from; \"(default)\":",
            "not in the file, transformers' default.",
            f"Weights: runtime.hf.load_hf_checkpoint(model, \"{shown}\").",
        ]
        header += self.notes
        if acknowledged:
            header.append("Ignored at the user's request (--ignore): " + ", ".join(acknowledged)
                          + ".")
        return Decoder(
            name=name, header=header, params=p,
            norm=f"{foreign_op('hf', 'norm')}(dim, eps = {p('norm_eps')})",
            rope=rope, attention=attention, window=None, mlp=mlp, moe=moe, kinds=kinds,
            tie=tie, framework="hf", ssm=(mixer_op, args),
            ssm_names=(fam.ssm_names[0], foreign_op("hf", fam.component_role)
                       if fam.component_role else fam.ssm_names[1] or mixer_op),
            rules=rules, mixer_names=(fam.block_name, "attn"),
            stack_notes=[self.layer_rule] if self.layer_rule else [])

    @staticmethod
    def _key(f: Fields, fam: Hybrid, key: str) -> str:
        """The field the config gives `key` under: an older name transformers reads over
        it (LFM2's tie_embedding, block_ff_dim) where the file has one."""
        old = next((old for old, new in fam.renamed.items() if new == key and old in f), None)
        if old is None:
            return key
        f.consume(key)  # transformers reads the older field over it
        return old

    def _listed_layout(self, f: Fields, d: dict, fam: Hybrid, n: int, dim: int | None):
        """Attention, the layers' kinds, the MLP and the RoPE of a hybrid that lists its
        attention layers: Bamba's attn_layer_indices; LFM2's layer_types ("conv" or
        "full_attention"), else its full_attn_idxs (all layers when null)."""
        p = self.p
        heads = f.get("num_attention_heads", "int", positive=True)
        kv = f.get("num_key_value_heads", "int?", d["num_key_value_heads"], positive=True)
        kv_note = self.note_default(f, "num_key_value_heads")
        if kv is None and heads:  # null: as many as query heads
            kv, kv_note = heads, kv_note + " = num_attention_heads"
        ffn_key = self._key(f, fam, "intermediate_size")
        ffn = f.get(ffn_key, "int", positive=True)
        max_pos = f.get("max_position_embeddings", "int", d["max_position_embeddings"],
                        positive=True)
        if dim and heads and dim % heads:
            f.error("E113", "num_attention_heads", f"hidden_size = {dim} is not divisible by "
                    f"num_attention_heads = {heads}")
        if kv and heads and heads % kv:
            f.error("E113", "num_key_value_heads", f"num_key_value_heads = {kv} does not "
                    f"divide num_attention_heads = {heads}")
        bias = False
        if "attention_bias" in d:
            bias = f.get("attention_bias", "bool", d["attention_bias"])
        if "mlp_bias" in d and f.get("mlp_bias", "bool", d["mlp_bias"]):
            f.error("E114", "mlp_bias", "mlp_bias = true cannot be expressed: forgec's "
                    "swiglu has no biases")
        if "z_loss_coefficient" in d:
            z = f.get("z_loss_coefficient", "float", d["z_loss_coefficient"])
            if z:
                f.error("E114", "z_loss_coefficient", f"z_loss_coefficient = {fmt(z)}: forgec's "
                        "training loss has no z-loss on the logits (HF adds it in training)",
                        "set it to 0.0 to import the model for training without it")
        attends = self._attention_layers(f, d, fam, n)
        hidden, ffn_note = (self._lfm2_hidden(f, d, ffn, ffn_key) if "block_multiple_of" in d
                            else (ffn, ffn_key))
        if None in (dim, heads, kv, ffn, max_pos, attends, hidden, bias):
            if "rope_parameters" in f or "rope_theta" in f:
                f.consume("rope_parameters", "rope_theta")
            return [], None, None, None
        kinds = [LayerKind(False, False, False, not a) for a in attends]
        p.add("ffn_hidden", hidden, ffn_note)
        mlp = (foreign_op("hf", "mlp", hidden_act=self.act), ["dim", f"hidden = {p('ffn_hidden')}"])
        if not any(attends):  # no attention layer: no positions either
            f.consume("rope_parameters", "rope_theta")
            return [], kinds, mlp, None
        p.add("n_heads", heads, "num_attention_heads")
        p.add("n_kv_heads", kv, kv_note)
        p.add("head_dim", dim // heads, "hidden_size / num_attention_heads")
        p.add("max_seq_len", max_pos, self.note_default(f, "max_position_embeddings"))
        p("max_seq_len")
        self.max_pos = max_pos  # what a RoPE scaling reads as the context
        self.partial_rotary = True
        self.partial_default = fam.partial_rotary
        rope = self._rope(f, d)
        attention = ["dim", f"heads = {p('n_heads')}"]
        if kv != heads:
            attention.append(f"kv_heads = {p('n_kv_heads')}")
        attention.append("rope = rope")
        if bias:
            attention += ["qkv_bias = true", "out_bias = true"]
        if fam.qk_norm:
            # (norm_eps: the eps of every norm, added with them)
            attention += ["qk_norm = true", "qk_norm_eps = norm_eps"]
        return attention, kinds, mlp, rope

    def _attention_layers(self, f: Fields, d: dict, fam: Hybrid, n: int) -> list[bool] | None:
        """Which layers attend (the others mix by the family's mixer), as its config lists
        them."""
        key = fam.listed
        if key == "layer_types" and f.get(key, "list?", d[key]) is None:
            key = "full_attn_idxs"  # LFM2: used where layer_types is null
        else:
            f.consume("full_attn_idxs")  # LFM2: layer_types wins (transformers ignores it)
        listed = f.get(key, "list?", d[key])
        if listed is None and key in f and f.obj[key] is not None:
            return None  # not a list (E113)
        if key == "layer_types":
            if len(listed) != n:
                f.error("E116", key, f"layer_types has {len(listed)} entries for {n} layers "
                        "(num_hidden_layers)")
                return None
            kinds = {"conv": False, "full_attention": True}
            for i, t in enumerate(listed):
                if t not in kinds:
                    self.diags.error("E114", f"layer type {t!r} cannot be expressed",
                                     self.src.span((key, i)),
                                     "LFM2's layer types are conv or full_attention")
            attends = [kinds.get(t, False) for t in listed]
            rule = "layer_types"
        else:
            if listed is None:  # Bamba: no attention layer; LFM2: all layers attend
                return [key == "full_attn_idxs"] * n
            for i, v in enumerate(listed):
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
                    self.diags.error("E113", f"{key}[{i}] = {v!r} is not a layer (0 … {n - 1})",
                                     self.src.span((key, i)))
            attends = [i in listed for i in range(n)]
            rule = key
        if any(attends) and not all(attends):
            self.layer_rule = f"{rule}: attention on layers " + ", ".join(
                str(i) for i, a in enumerate(attends) if a)
        return attends

    def _lfm2_hidden(self, f: Fields, d: dict, ffn: int | None,
                     ffn_key: str) -> tuple[int | None, str]:
        """LFM2's MLP width from intermediate_size: with block_auto_adjust_ff_dim, two
        thirds of it, and with a block_ffn_dim_multiplier, that times it rounded up to a
        multiple of block_multiple_of (Lfm2MLP)."""
        adjust = f.get("block_auto_adjust_ff_dim", "bool", d["block_auto_adjust_ff_dim"])
        mult = f.get("block_ffn_dim_multiplier", "float?", d["block_ffn_dim_multiplier"])
        multiple = f.get("block_multiple_of", "int", d["block_multiple_of"], positive=True)
        if None in (ffn, adjust, multiple):
            return None, ffn_key
        if not adjust:
            return ffn, ffn_key + " (block_auto_adjust_ff_dim false)"
        hidden = int(2 * ffn / 3)
        rule = f"int(2 × {ffn_key} / 3)"
        if mult is not None:
            hidden = int(mult * hidden)
            hidden = multiple * ((hidden + multiple - 1) // multiple)
            rule = (f"int(block_ffn_dim_multiplier × {rule}) rounded up to a multiple of "
                    "block_multiple_of")
        self.notes.append(f"The MLP's width (block_auto_adjust_ff_dim): {rule}.")
        return hidden, f"from {ffn_key} = {ffn} (see above)"

    def _jamba_layout(self, f: Fields, d: dict, fam: Hybrid, n: int, dim: int | None):
        """Attention, the layers' kinds, the stack's rules, the experts and the MLP of a
        Jamba: attention where i % attn_layer_period == attn_layer_offset, experts where
        i % expert_layer_period == expert_layer_offset (and num_experts > 1)."""
        p = self.p
        heads = f.get("num_attention_heads", "int", positive=True)
        kv = f.get("num_key_value_heads", "int", d["num_key_value_heads"], positive=True)
        ffn = f.get("intermediate_size", "int", positive=True)
        max_pos = f.get("max_position_embeddings", "int", d["max_position_embeddings"],
                        positive=True)
        experts = f.get("num_experts", "int", d["num_experts"], positive=True)
        top_k = f.get("num_experts_per_tok", "int", d["num_experts_per_tok"], positive=True)
        logits = f.get("output_router_logits", "bool", d["output_router_logits"])
        coef = f.get("router_aux_loss_coef", "float", d["router_aux_loss_coef"])
        periods = []
        for period_key, offset_key in fam.layout:
            period = f.get(period_key, "int", d[period_key], positive=True)
            offset = f.get(offset_key, "int", d[offset_key])
            if period is not None and offset is not None and not 0 <= offset < period:
                f.error("E113", offset_key, f"{offset_key} = {offset} is not in 0 … "
                        f"{period_key} − 1 = {period - 1}: no layer would match")
                offset = None
            periods.append((period, offset))
        if dim and heads and dim % heads:
            f.error("E113", "num_attention_heads", f"hidden_size = {dim} is not divisible by "
                    f"num_attention_heads = {heads}")
        if kv and heads and heads % kv:
            f.error("E113", "num_key_value_heads", f"num_key_value_heads = {kv} does not "
                    f"divide num_attention_heads = {heads}")
        if experts and top_k and experts > 1 and top_k > experts:
            f.error("E113", "num_experts_per_tok", f"num_experts_per_tok = {top_k} is more "
                    f"than the {experts} experts")
        if None in (heads, kv, ffn, max_pos, experts, top_k, logits, coef) or \
                None in (x for pair in periods for x in pair):
            return [], None, None, None, None
        (ap, ao), (ep, eo) = periods
        sparse = experts > 1
        attends = [i % ap == ao for i in range(n)]
        moe_layers = [sparse and i % ep == eo for i in range(n)]
        kinds = [LayerKind(False, m, False, not a) for a, m in zip(attends, moe_layers,
                                                                    strict=True)]
        p.add("n_heads", heads, "num_attention_heads")
        p.add("n_kv_heads", kv, self.note_default(f, "num_key_value_heads"))
        p.add("max_seq_len", max_pos, self.note_default(f, "max_position_embeddings"))
        p("max_seq_len")
        p.add("ffn_hidden", ffn, "intermediate_size")
        attention = ["dim", f"heads = {p('n_heads')}"]
        if kv != heads:
            attention.append(f"kv_heads = {p('n_kv_heads')}")

        def every(period: int, offset: int) -> str:
            return f"every {period} from {offset}" if period > 1 else "default"

        ssm, ssm_moe = LayerKind(False, False, False, True), LayerKind(False, True, False, True)
        attn, attn_moe = LayerKind(False, False), LayerKind(False, True)
        # the default: a Mamba layer without experts if there is one; then the experts'
        # layers, then the attention layers (a later rule wins), those of them with
        # experts by name unless they all have
        default = ssm if ssm in kinds else kinds[0]
        both = [i for i in range(n) if attends[i] and moe_layers[i]]
        all_moe = len(both) == sum(attends)
        rules = [("default", default, "")]
        if ssm_moe in kinds and default != ssm_moe:
            rules.append((every(ep, eo), ssm_moe, f"expert_layer_period {ep}, "
                          f"expert_layer_offset {eo}"))
        if any(attends) and default not in (attn, attn_moe):
            rules.append((every(ap, ao), attn_moe if all_moe else attn,
                          f"attn_layer_period {ap}, attn_layer_offset {ao}"))
        if not all_moe:
            rules += [(f"at {i}", attn_moe, "attention and experts") for i in both]
        moe = None
        if any(moe_layers):
            p.add("n_experts", experts, self.note_default(f, "num_experts"))
            p.add("top_k", top_k, self.note_default(f, "num_experts_per_tok"))
            if logits:
                p.add("aux_loss_weight", coef, self.note_default(f, "router_aux_loss_coef")
                      + " (HF: one loss over all layers)")
            else:
                p.add("aux_loss_weight", 0.0, "output_router_logits false: HF adds no "
                      f"balance loss (router_aux_loss_coef {fmt(coef)})")
            router = (f"router = {foreign_op('hf', 'router')}(renormalize = false, "
                      f"aux_loss_weight = {p('aux_loss_weight')})")
            moe = (foreign_op("hf", "experts", hidden_act=self.act),
                   ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
                    f"hidden = {p('ffn_hidden')}", router])
        mlp = (foreign_op("hf", "mlp", hidden_act=self.act),
               ["dim", f"hidden = {p('ffn_hidden')}"])
        return attention, kinds, rules, moe, mlp


# ---- the tokenizer ---------------------------------------------------------------------
# What a save_pretrained folder holds about its tokenizer (tokenizer.json is required).
# `forgec import-hf` copies them into `specs/NAME.tokenizer/`, where runs of the
# spec find them (runtime/tokenizer.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def spec_tokenizer_dir(spec: str) -> str:
    """`specs/NAME.tokenizer` for `specs/NAME.forge`."""
    return os.path.splitext(spec)[0] + ".tokenizer"


def tokenizer_files(folder: str) -> list[str]:
    """The tokenizer files present in `folder`, in TOKENIZER_FILES order."""
    return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst`, replacing the tokenizer
    files it held; return their names. `src` must hold a tokenizer.json."""
    import shutil

    names = tokenizer_files(src)
    if "tokenizer.json" not in names:
        raise FileNotFoundError(os.path.join(src, "tokenizer.json"))
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name not in names and os.path.isfile(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


def import_hf(src: Located, name: str, source: str, diags: Diagnostics, *,
              ignore: set[str] = frozenset(), max_seq_len: int | None = None) -> str | None:
    """The spec text for the config `src`, or None with the errors in `diags`."""
    model_type = src.value.get("model_type") if isinstance(src.value, dict) else None
    importer = DenseImporter if isinstance(model_type, str) and model_type in DENSE else Importer
    if isinstance(model_type, str) and model_type in HYBRID:
        importer = HybridImporter
    if isinstance(model_type, str) and model_type in REFUSED:
        refuse(src, diags, model_type)
        return None
    decoder = importer(src, diags, set(ignore)).run(name, source, max_seq_len)
    if decoder is None or diags.error_count:
        return None
    return decoder.render()
