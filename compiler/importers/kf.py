"""`forgec import-kf`: a KempnerForge model config (TOML) → a .forge spec.

KempnerForge reads its `ModelConfig` from the `[model]` table of a TOML file
(a model file such as `configs/model/llama_7b.toml`, or a whole training
config, whose other tables — `[train]`, `[optimizer]`, ... — are training
settings and are not read). A field left out takes KempnerForge's default,
and the spec says so. The mapping:

* dim, n_layers, n_heads, n_kv_heads (default n_heads), vocab_size,
  max_seq_len, rope_theta, init_std, tie_embeddings — one parameter each;
  head_dim is dim / n_heads;
* norm_type rmsnorm | layernorm (with bias, like `nn.LayerNorm`), norm_eps
  (also the qk-norm's eps: `qk_norm = true`);
* activation silu → swiglu; gelu → gelu_mlp, relu → relu_mlp (no biases);
* the MLP width: ffn_hidden_dim, else ffn_hidden(dim, ffn_dim_multiplier, 256)
  — KempnerForge's 256·ceil(int(4·dim·2/3·multiplier)/256) (the literal
  number where float rounding makes the two differ);
* num_experts > 0: layer i is a mixture of experts iff (i + 1) % moe_frequency
  == 0 (`every moe_frequency`); moe_top_k; moe_router softmax_topk (always
  renormalised, moe_aux_loss_weight) or sigmoid_topk (moe_bias_schedule,
  moe_sequence_aux_loss_weight); each expert's width is the MLP width times
  moe_expert_ffn_multiplier rounded to a multiple of 16; moe_shared_experts
  > 0 is one shared expert of that width (KempnerForge builds one);
* sdpa_backend (a kernel choice) and moe_packed_experts (a storage layout)
  do not change the model.

RoPE: forgec rotates the two halves of each head (HF Llama's layout). The
KempnerForge `position.py` that could be read for this importer rotates
interleaved pairs (complex form); where a version does, its checkpoints still
load key for key, but compute differently — the spec's header says so.

Not expressible, hence errors: a model_type other than "transformer", a
[model.vlm] table, moe_capacity_factor > 0 (KempnerForge caps each top-k
slot separately and also in evaluation; forgec caps an expert's slots in
training only), moe_gradient_scale = true, an MoE with a non-SiLU
activation, an unknown norm, activation or router.
"""

from __future__ import annotations

import math

from ..diagnostics import Diagnostics
from ..functions import FUNCTIONS
from ..ops import OPS, foreign_choices, foreign_default, foreign_op
from .common import Decoder, Expr, Fields, LayerKind, Located, Params, fmt

# the ops KempnerForge's choices name (each op's `foreign["kf"]`): value → op
NORMS = foreign_choices("kf", "norm", "norm_type")
MLPS = foreign_choices("kf", "mlp", "activation")
ROUTERS = foreign_choices("kf", "router", "moe_router")

# KempnerForge ModelConfig defaults (kempnerforge/config/model.py)
DEFAULTS = {
    "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": None, "vocab_size": 32000,
    "ffn_dim_multiplier": 1.0, "ffn_hidden_dim": None,
    "norm_type": foreign_default("kf", "norm", "norm_type"),
    "norm_eps": 1e-5, "activation": foreign_default("kf", "mlp", "activation"),
    "max_seq_len": 2048, "rope_theta": 10000.0,
    "tie_embeddings": False, "qk_norm": False, "init_std": 0.02, "model_type": "transformer",
    "sdpa_backend": "auto", "num_experts": 0, "moe_top_k": 2, "moe_frequency": 1,
    "moe_router": foreign_default("kf", "router", "moe_router"), "moe_shared_experts": 0,
    "moe_aux_loss_weight": 0.01,
    "moe_capacity_factor": 0.0, "moe_sequence_aux_loss_weight": 0.0,
    "moe_gradient_scale": False, "moe_bias_schedule": "constant", "moe_packed_experts": False,
    "moe_expert_ffn_multiplier": 1.0,
}


def kf_ffn_hidden(dim: int, multiplier: float) -> int:
    """KempnerForge's computed_ffn_hidden_dim without an override."""
    raw = int(4 * dim * (2 / 3) * multiplier)
    return 256 * math.ceil(raw / 256)


def round16(x: float) -> int:
    """To the nearest multiple of 16 (at least 16)."""
    return max(16, 16 * math.floor(x / 16 + 0.5))


class Importer:
    def __init__(self, src: Located, diags: Diagnostics, ignore: set[str]) -> None:
        self.src, self.diags, self.ignore = src, diags, ignore

    def run(self, name: str, source: str, max_seq_len: int | None) -> Decoder | None:
        src, diags = self.src, self.diags
        root = Fields(src, src.value, (), diags, source)
        table = src.value.get("model")
        if not isinstance(table, dict):
            diags.error("E112", f"{source} has no [model] table", src.span(()),
                        "a KempnerForge model config is a [model] table of dim, n_layers, ...")
            return None
        root.consume(*src.value)  # the other tables are training settings
        f = Fields(src, table, ("model",), diags, "[model]")
        g = lambda key, kind, **kw: f.get(key, kind, DEFAULTS[key], **kw)  # noqa: E731

        def note(key: str) -> str:
            return f"{key} (default)" if key in f.defaulted else key

        model_type = g("model_type", "str")
        if model_type is not None and model_type != "transformer":
            f.error("E111", "model_type", f"model_type '{model_type}' cannot be imported",
                    "forgec imports KempnerForge's dense and MoE `transformer`")
        if "vlm" in f:
            f.consume("vlm")
            f.error("E114", "vlm", "a vision-language model ([model.vlm]) cannot be imported",
                    "import the text model: remove the [model.vlm] table")
        f.consume("sdpa_backend", "moe_packed_experts")
        dim = g("dim", "int", positive=True)
        n_layers = g("n_layers", "int", positive=True)
        heads = g("n_heads", "int", positive=True)
        kv = g("n_kv_heads", "int?", positive=True)
        vocab = g("vocab_size", "int", positive=True)
        mult = g("ffn_dim_multiplier", "float", positive=True)
        ffn_dim = g("ffn_hidden_dim", "int?", positive=True)
        norm_type = g("norm_type", "str")
        eps = g("norm_eps", "float", positive=True)
        act = g("activation", "str")
        max_len = g("max_seq_len", "int", positive=True)
        theta = g("rope_theta", "float", positive=True)
        tie = g("tie_embeddings", "bool")
        qk_norm = g("qk_norm", "bool")
        init = g("init_std", "float")
        if norm_type is not None and norm_type not in NORMS:
            f.error("E114", "norm_type", f"norm_type '{norm_type}' cannot be expressed",
                    "KempnerForge's norms are rmsnorm and layernorm")
        if act is not None and act not in MLPS:
            f.error("E114", "activation", f"activation '{act}' cannot be expressed",
                    "KempnerForge's activations are silu (SwiGLU), gelu and relu")
        if kv and heads and heads % kv:
            f.error("E113", "n_kv_heads", f"n_kv_heads = {kv} does not divide n_heads = {heads}")
        for key, v in (("norm_eps", eps), ("init_std", init)):
            if v is not None and not 0 <= v <= 1:
                f.error("E113", key, f"'{key}' must be between 0 and 1, got {fmt(v)}")
        if dim and heads and dim % heads:
            f.error("E113", "n_heads", f"dim {dim} is not divisible by n_heads {heads} "
                    "(KempnerForge's head_dim is dim / n_heads)")
        moe = self._moe(f, g, act)
        f.unknown(self.ignore, "KempnerForge")
        if diags.error_count:
            return None

        p = Params()
        p.add("vocab_size", vocab, note("vocab_size"))
        p.add("dim", dim, note("dim"))
        p.add("n_layers", n_layers, note("n_layers"))
        p.add("n_heads", heads, note("n_heads"))
        p.add("n_kv_heads", heads if kv is None else kv,
              "n_kv_heads" if kv is not None else f"{note('n_kv_heads')} = n_heads")
        if max_seq_len is not None:
            p.add("max_seq_len", max_seq_len, f"--max-seq-len (max_seq_len = {max_len})")
        else:
            p.add("max_seq_len", max_len, note("max_seq_len"))
        p.add("norm_eps", eps, note("norm_eps"))
        p.add("rope_theta", theta, note("rope_theta"))
        p.add("init_std", init, note("init_std"))
        p("init_std")

        # the dense MLP width, KempnerForge's computed_ffn_hidden_dim
        if ffn_dim is not None:
            hidden = ffn_dim
            p.add("ffn_hidden", ffn_dim, "ffn_hidden_dim")
            same = False
        else:
            hidden = kf_ffn_hidden(dim, mult)
            same = hidden == FUNCTIONS["ffn_hidden"].impl(
                {"dim": dim, "multiplier": mult, "multiple_of": 256})
            p.add("ffn_multiplier", mult, note("ffn_dim_multiplier"))
            if same:
                p.add("ffn_hidden", Expr("ffn_hidden(dim, multiplier = ffn_multiplier, "
                                         "multiple_of = 256)"), f"= {hidden}")
            else:  # float rounding: forgec's formula would give another width
                p.add("ffn_hidden", hidden, "256·ceil(int(4·dim·2/3·ffn_dim_multiplier)/256)")

        def dense_hidden() -> str:
            if same:
                p("ffn_multiplier")
            return p("ffn_hidden")

        norm_op = NORMS[norm_type]
        attention = ["dim", f"heads = {p('n_heads')}", f"kv_heads = {p('n_kv_heads')}",
                     "rope = rope"]
        if qk_norm:
            attention += ["qk_norm = true", f"qk_norm_eps = {p('norm_eps')}"]
        kinds = [LayerKind(False, False) for _ in range(n_layers)]
        moe_call, notes = None, []
        if moe is not None:
            experts, top_k, freq, router_args, shared, expert_mult = moe
            p.add("n_experts", experts, "num_experts")
            p.add("top_k", top_k, note("moe_top_k"))
            if expert_mult == 1.0:
                expert_expr = dense_hidden()
            else:
                p.add("expert_hidden", round16(hidden * expert_mult), "the dense width × "
                      f"moe_expert_ffn_multiplier {fmt(expert_mult)}, to a multiple of 16")
                expert_expr = p("expert_hidden")
            args = ["dim", f"experts = {p('n_experts')}", f"top_k = {p('top_k')}",
                    f"hidden = {expert_expr}", router_args(p)]
            if shared:
                args.append("shared_experts = 1")
            moe_call = (foreign_op("kf", "experts", activation=act), args)
            kinds = [LayerKind(False, (i + 1) % freq == 0) for i in range(n_layers)]
            if freq > 1:
                notes.append(f"moe_frequency = {freq}: layer i is a mixture of experts iff "
                             f"(i + 1) % {freq} == 0")
            if shared:
                notes.append(f"moe_shared_experts = {shared}: KempnerForge builds one shared "
                             "expert of the experts' width")
        mlp = (MLPS[act], ["dim", f"hidden = {dense_hidden()}"]) \
            if any(not k.moe for k in kinds) else None

        header = [
            f"KempnerForge model imported by `forgec import-kf` from {source}.",
            "Each parameter's comment names the [model] field it comes from; \"(default)\": not",
            "in the file, KempnerForge's default. A KempnerForge checkpoint of a dense model",
            "loads with load_state_dict(strict=True): the parameter names are the same. forgec's",
            "RoPE rotates the two halves of each head (as HF Llama does); a KempnerForge version",
            "that rotates interleaved pairs computes differently with the same weights.",
        ]
        others = [k for k in src.value if k != "model"]
        if others:
            header.append("Not read (training settings): " + ", ".join(f"[{k}]" for k in others)
                          + ".")
        return Decoder(
            name=name, header=header, params=p,
            norm=f"{norm_op}(dim, eps = {p('norm_eps')})",
            rope=[f"head_dim = dim / {p('n_heads')}", f"max_seq_len = {p('max_seq_len')}",
                  f"theta = {p('rope_theta')}"],
            attention=attention, window=None, mlp=mlp, moe=moe_call, kinds=kinds, tie=tie,
            framework="kf", stack_notes=notes)

    def _moe(self, f: Fields, g, act: str | None):
        experts = g("num_experts", "int")
        keys = ("moe_top_k", "moe_frequency", "moe_router", "moe_shared_experts",
                "moe_aux_loss_weight", "moe_capacity_factor", "moe_sequence_aux_loss_weight",
                "moe_gradient_scale", "moe_bias_schedule", "moe_expert_ffn_multiplier")
        if not experts:
            if experts is not None and experts < 0:
                f.error("E113", "num_experts", f"num_experts must be ≥ 0, got {experts}")
            f.consume(*keys)  # KempnerForge ignores them in a dense model
            return None
        top_k = g("moe_top_k", "int", positive=True)
        freq = g("moe_frequency", "int", positive=True)
        router = g("moe_router", "str")
        shared = g("moe_shared_experts", "int")
        aux = g("moe_aux_loss_weight", "float")
        capacity = g("moe_capacity_factor", "float")
        seq_aux = g("moe_sequence_aux_loss_weight", "float")
        grad_scale = g("moe_gradient_scale", "bool")
        schedule = g("moe_bias_schedule", "str")
        expert_mult = g("moe_expert_ffn_multiplier", "float", positive=True)
        if act is not None and foreign_op("kf", "experts", activation=act) is None:
            f.error("E114", "activation", f"activation '{act}' in a mixture of experts cannot be "
                    "expressed: forgec's experts are SwiGLU", "use activation = \"silu\"")
        if top_k is not None and top_k > experts:
            f.error("E113", "moe_top_k", f"moe_top_k = {top_k} is more than the {experts} "
                    "experts")
        if capacity:
            f.error("E114", "moe_capacity_factor", f"moe_capacity_factor = {fmt(capacity)} "
                    "cannot be expressed: KempnerForge caps each top-k slot of an expert "
                    "separately and also in evaluation, forgec caps an expert's slots in "
                    "training only", "set it to 0.0 (no capacity limit)")
        if grad_scale:
            f.error("E114", "moe_gradient_scale", "moe_gradient_scale = true cannot be "
                    "expressed: forgec has no per-expert gradient scaling")
        if shared is not None and shared < 0:
            f.error("E113", "moe_shared_experts", f"moe_shared_experts must be ≥ 0, got {shared}")
        if router is not None and router not in ROUTERS:
            f.error("E114", "moe_router", f"moe_router '{router}' cannot be expressed",
                    "KempnerForge's routers are " + " and ".join(ROUTERS))
        config = {"moe_aux_loss_weight": aux, "moe_bias_schedule": schedule,
                  "moe_sequence_aux_loss_weight": seq_aux}
        router_op = OPS[ROUTERS[router]] if router in ROUTERS else None
        kf = router_op.foreign["kf"] if router_op is not None else None
        for arg, key in (kf.fields.items() if kf is not None else ()):
            choices, value = router_op.arg(arg).choices, config[key]
            if choices and value is not None and value not in choices:
                f.error("E114", key, f"{key} '{value}' cannot be expressed",
                        ", ".join(choices[:-1]) + " or " + choices[-1])
        if None in (top_k, freq, router, shared, aux, seq_aux, schedule, expert_mult):
            return None

        def router_args(p: Params) -> str:
            """The router's arguments as its op writes them (its `foreign["kf"].args`)."""
            args = []
            for arg, value, why in kf.args(config, lambda key: f"{key} (default)"
                                           if key in f.defaulted else key):
                if why is not None:  # a named model parameter, commented with its source
                    p.add(arg, value, why)
                    value = Expr(p(arg))
                args.append(f"{arg} = {fmt(value)}")
            return f"router = {router_op.name}({', '.join(args)})"
        return experts, top_k, freq, router_args, shared, expert_mult


def import_kf(src: Located, name: str, source: str, diags: Diagnostics, *,
              ignore: set[str] = frozenset(), max_seq_len: int | None = None) -> str | None:
    """The spec text for the KempnerForge config `src`, or None with errors in `diags`."""
    decoder = Importer(src, diags, set(ignore)).run(name, source, max_seq_len)
    if decoder is None or diags.error_count:
        return None
    return decoder.render()
