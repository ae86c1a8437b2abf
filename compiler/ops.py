"""The operator registry: the one place that says what each op is.

Each `OpDef` declares
  * its arguments (name, type, default, range) — checked by compiler/bind.py;
  * `derive`: defaults that depend on other arguments (e.g. kv_heads = heads);
  * its shape rule: the tensor shapes it expects and the shape it produces —
    used by compiler/lower.py and checked by compiler/checks/shapes.py;
  * its parameter layout: FQN suffix → shape, relative to the component
    (`q_proj.weight` under `layers.3.attention`) — used for FQNs, parameter
    counts and later for code generation;
  * its cost: forward FLOPs per token and KV-cache elements per token;
  * `causal`: whether a token's output depends only on earlier tokens;
  * its code: the PyTorch class it becomes (`class_name`, defined by the
    template `templates/ops/<template>.py.j2`), the constructor arguments
    (`ctor`), how its forward is called (`call`) and which optional code paths
    a component needs (`features`; a class only contains the union of the
    features its components use, so no dead branches are generated).
Adding an op means adding one `OpDef` here and its template.

Shapes are tuples whose entries are ints or the symbols "B" (batch) and
"S" (sequence).

Roles: "module" ops are applied to tensors; "config" ops (rope) are shared
settings that other ops name; "router" ops are written inline as an argument
of the op that routes (`moe(..., router = sigmoid_topk(...))`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int | str, ...]
Args = Mapping[str, Any]

REQUIRED = object()  # sentinel: an argument without a default


@dataclass(frozen=True)
class ArgSpec:
    name: str
    type: str  # "size" (positive int), "int", "float", "bool", "choice", "ref:<op>"
    default: Any = REQUIRED
    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    choices: tuple[str, ...] = ()
    doc: str = ""
    # The default depends on other arguments; `OpDef.derive` fills it in.
    derived: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.derived


def _no_weights(args: Args) -> dict[str, Shape]:
    return {}


def _zero(args: Args, seq_len: int) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    args: tuple[ArgSpec, ...]
    # "module": applied to tensors in a block's dataflow or the model's fixed
    # spine; "config": a shared setting other ops refer to (e.g. rope).
    role: str = "module"
    inputs: Callable[[Args], tuple[Shape, ...]] = lambda a: ()
    output: Callable[[Args], Shape | None] = lambda a: None
    weights: Callable[[Args], dict[str, Shape]] = _no_weights
    flops: Callable[[Args, int], int] = _zero  # forward FLOPs per token at a sequence length
    kv_elems: Callable[[Args], int] = lambda a: 0  # cached elements per token
    causal: Callable[[Args], bool] = lambda a: True
    derive: Callable[[dict[str, Any]], None] = lambda a: None
    # argument names that are sizes (checked positive by checks/positive_sizes.py)
    sizes: tuple[str, ...] = field(default=())
    # -- code generation (compiler/emit.py)
    template: str | None = None  # templates/ops/<template>.py.j2; None: nothing to emit
    class_name: str = ""
    # constructor keyword arguments, given the union of features of the op's class
    ctor: Callable[[Args, frozenset[str]], dict[str, Any]] = lambda a, u: {}
    # forward call; {m} is the module expression, {x} the input(s)
    call: str = "{m}({x})"
    call_fields: Callable[[Args], dict[str, Any]] = lambda a: {}
    # arguments of the class's init_weights: "", "std" or "std, out_std"
    init_args: str = "std, out_std"
    # parameters a token uses, if not all of them (mixture of experts)
    active_params: Callable[[Args], int] | None = None
    # tensor parallelism: submodule → "colwise" | "rowwise" (compiler/plans.py)
    tp: Mapping[str, str] = field(default_factory=dict)
    features: Callable[[Args], frozenset[str]] = lambda a: frozenset()

    def arg(self, name: str) -> ArgSpec | None:
        for a in self.args:
            if a.name == name:
                return a
        return None


def _hidden(dim: Any) -> Shape:
    return ("B", "S", dim)


# ---- the ops -------------------------------------------------------------------

def _attention_derive(a: dict[str, Any]) -> None:
    if a.get("kv_heads") is None:
        a["kv_heads"] = a["heads"]
    if a.get("head_dim") is None:
        dim, heads = a["dim"], a["heads"]
        # Not divisible: left unset, reported by checks/heads.py with the location.
        a["head_dim"] = dim // heads if heads and heads > 0 and dim % heads == 0 else None
        a["_head_dim_derived"] = True
    else:
        a["_head_dim_derived"] = False


def _attention_weights(a: Args) -> dict[str, Shape]:
    dim, hd, h, kv = a["dim"], a["head_dim"], a["heads"], a["kv_heads"]
    if hd is None:
        return {}
    w: dict[str, Shape] = {
        "q_proj.weight": (h * hd, dim),
        "k_proj.weight": (kv * hd, dim),
        "v_proj.weight": (kv * hd, dim),
        "o_proj.weight": (dim, h * hd),
    }
    if a["qkv_bias"]:
        w["q_proj.bias"] = (h * hd,)
        w["k_proj.bias"] = (kv * hd,)
        w["v_proj.bias"] = (kv * hd,)
    if a["out_bias"]:
        w["o_proj.bias"] = (dim,)
    if a["qk_norm"]:
        w["q_norm.weight"] = (hd,)
        w["k_norm.weight"] = (hd,)
    return w


def attended_keys(seq_len: int, causal: bool, window: int) -> float:
    """Average number of keys a query attends to over a sequence of `seq_len`."""
    if not causal:
        return float(min(seq_len, window) if window else seq_len)
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    # the first `window` queries see 1..window keys, the rest see `window`
    full = seq_len - window
    return (window * (window + 1) / 2 + full * window) / seq_len


def mask_key(a: Args) -> str:
    """Which attention mask an attention op reads: one per (causality, window)."""
    base = "causal" if a["causal"] else "full"
    return f"{base}_w{a['window']}" if a["window"] else base


def _attention_flops(a: Args, seq_len: int) -> int:
    hd = a["head_dim"]
    if hd is None:
        return 0
    proj = 2 * sum(_numel(s) for k, s in _attention_weights(a).items() if k.endswith("proj.weight"))
    keys = attended_keys(seq_len, a["causal"], a["window"])
    # QK^T and attention·V: 2 FLOPs per multiply-add, each heads·head_dim per key
    return int(proj + 2 * 2 * a["heads"] * hd * keys)


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        assert isinstance(d, int)
        n *= d
    return n


def _mlp_weights(names: tuple[str, ...], a: Args) -> dict[str, Shape]:
    dim, hidden = a["dim"], a["hidden"]
    w: dict[str, Shape] = {}
    for n in names:
        w[f"{n}.weight"] = (dim, hidden) if n == "down_proj" else (hidden, dim)
        if a.get("bias"):
            w[f"{n}.bias"] = (dim,) if n == "down_proj" else (hidden,)
    return w


def _mlp(name: str, doc: str, projections: tuple[str, ...], bias: bool,
         class_name: str) -> OpDef:
    args = [
        ArgSpec("dim", "size", doc="model width"),
        ArgSpec("hidden", "size", doc="hidden width (see ffn_hidden())"),
    ]
    if bias:
        args.append(ArgSpec("bias", "bool", False, doc="biases on the projections"))
    args.append(ArgSpec("zero_init", "bool", False, doc="zero-initialise down_proj"))
    return OpDef(
        template=name, class_name=class_name,
        tp={**{p: "colwise" for p in projections if p != "down_proj"}, "down_proj": "rowwise"},
        ctor=lambda a, u: {"dim": a["dim"], "hidden": a["hidden"],
                        **({"bias": a["bias"]} if bias else {}), "zero_init": a["zero_init"]},
        name=name, doc=doc, args=tuple(args), sizes=("dim", "hidden"),
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=lambda a: _mlp_weights(projections, a),
        flops=lambda a, s: 2 * sum(_numel(v) for k, v in _mlp_weights(projections, a).items()
                                   if k.endswith("weight")),
    )


def _rope_derive(a: dict[str, Any]) -> None:
    if a.get("rotary_dim") is None:
        a["rotary_dim"] = a["head_dim"]


OPS: dict[str, OpDef] = {}


def _register(*ops: OpDef) -> None:
    for op in ops:
        assert op.name not in OPS, op.name
        OPS[op.name] = op


_register(
    OpDef(
        name="embedding",
        doc="Token embedding table: ids (B, S) → (B, S, dim).",
        args=(
            ArgSpec("vocab", "size", doc="vocabulary size"),
            ArgSpec("dim", "size", doc="embedding width"),
        ),
        sizes=("vocab", "dim"),
        inputs=lambda a: (("B", "S"),),
        output=lambda a: _hidden(a["dim"]),
        weights=lambda a: {"embedding.weight": (a["vocab"], a["dim"])},
        template="embedding", class_name="TokenEmbedding", init_args="std",
        tp={"embedding": "rowwise"},
        ctor=lambda a, u: {"vocab": a["vocab"], "dim": a["dim"]},
    ),
    OpDef(
        name="lm_head",
        doc="Output projection to vocabulary logits; `tie` shares the embedding's weight.",
        args=(
            ArgSpec("dim", "size"),
            ArgSpec("vocab", "size"),
            ArgSpec("bias", "bool", False),
            ArgSpec("tie", "ref:embedding", None, doc="an embedding component to share weights with"),
        ),
        sizes=("dim", "vocab"),
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["vocab"]),
        weights=lambda a: {"proj.weight": (a["vocab"], a["dim"]),
                           **({"proj.bias": (a["vocab"],)} if a["bias"] else {})},
        flops=lambda a, s: 2 * a["vocab"] * a["dim"],
        template="lm_head", class_name="OutputHead", init_args="std",
        tp={"proj": "colwise"},
        ctor=lambda a, u: {"dim": a["dim"], "vocab": a["vocab"], "bias": a["bias"]},
    ),
    OpDef(
        name="linear",
        doc="A plain linear map (B, S, in_dim) → (B, S, out_dim).",
        args=(
            ArgSpec("in_dim", "size"),
            ArgSpec("out_dim", "size"),
            ArgSpec("bias", "bool", False),
            ArgSpec("zero_init", "bool", False, doc="initialise the weight to zero"),
        ),
        sizes=("in_dim", "out_dim"),
        inputs=lambda a: (_hidden(a["in_dim"]),),
        output=lambda a: _hidden(a["out_dim"]),
        weights=lambda a: {"weight": (a["out_dim"], a["in_dim"]),
                           **({"bias": (a["out_dim"],)} if a["bias"] else {})},
        flops=lambda a, s: 2 * a["in_dim"] * a["out_dim"],
        template="linear", class_name="Linear",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "bias": a["bias"],
                        "zero_init": a["zero_init"]},
    ),
    OpDef(
        name="rmsnorm",
        doc="RMSNorm over the last dimension, computed in fp32, with a weight.",
        args=(ArgSpec("dim", "size"), ArgSpec("eps", "float", 1e-5, min=0.0, max=1.0)),
        sizes=("dim",),
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=lambda a: {"weight": (a["dim"],)},
        template="rmsnorm", class_name="RMSNorm", init_args="",
        ctor=lambda a, u: {"dim": a["dim"], "eps": a["eps"]},
    ),
    OpDef(
        name="layernorm",
        doc="LayerNorm over the last dimension, with weight and (optionally) bias.",
        args=(
            ArgSpec("dim", "size"),
            ArgSpec("eps", "float", 1e-5, min=0.0, max=1.0),
            ArgSpec("bias", "bool", True),
        ),
        sizes=("dim",),
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=lambda a: {"weight": (a["dim"],), **({"bias": (a["dim"],)} if a["bias"] else {})},
        template="layernorm", class_name="LayerNorm", init_args="",
        ctor=lambda a, u: {"dim": a["dim"], "eps": a["eps"], "bias": a["bias"]},
    ),
    OpDef(
        name="rope",
        role="config",
        doc="Rotary position embedding settings, shared by the attention ops that name it.",
        args=(
            ArgSpec("head_dim", "size", doc="per-head width the tables are built for"),
            ArgSpec("max_seq_len", "size"),
            ArgSpec("theta", "float", 10000.0, min=1.0),
            ArgSpec("rotary_dim", "size", derived=True,
                    doc="rotate only the first rotary_dim channels (partial rotary)"),
            ArgSpec("scaling", "choice", "none", choices=("none", "llama3")),
            ArgSpec("scale_factor", "float", 8.0, min=1.0),
            ArgSpec("low_freq_factor", "float", 1.0, min=0.0),
            ArgSpec("high_freq_factor", "float", 4.0, min=0.0),
            ArgSpec("original_max_seq_len", "size", 8192),
            ArgSpec("doc_restart", "bool", False,
                    doc="restart positions at every document of a packed sequence"),
        ),
        sizes=("head_dim", "max_seq_len", "rotary_dim", "original_max_seq_len"),
        derive=_rope_derive,
    ),
    OpDef(
        name="rope2d",
        role="config",
        doc="2-D rotary positions for a vision encoder: half of each head's rotary pairs "
            "turn with the patch row, half with the column (a CLS token stays unrotated).",
        args=(
            ArgSpec("head_dim", "size", doc="per-head width; a multiple of 4"),
            ArgSpec("grid", "size", doc="patches per image side"),
            ArgSpec("theta", "float", 100.0, min=1.0),
        ),
        sizes=("head_dim", "grid"),
    ),
    OpDef(
        name="attention",
        doc="Multi-head / grouped-query attention with optional RoPE, qk-norm and window.",
        args=(
            ArgSpec("dim", "size", doc="model width"),
            ArgSpec("heads", "size", doc="query heads"),
            ArgSpec("kv_heads", "size", derived=True, doc="key/value heads (default: heads)"),
            ArgSpec("head_dim", "size", derived=True, doc="per-head width (default: dim / heads)"),
            ArgSpec("rope", "ref:rope|rope2d", None,
                    doc="a rope (or, in a vision encoder, rope2d) component; none for no positions"),
            ArgSpec("causal", "bool", True),
            ArgSpec("window", "int", 0, min=0, doc="sliding-window size; 0 for full attention"),
            ArgSpec("qkv_bias", "bool", False),
            ArgSpec("out_bias", "bool", False),
            ArgSpec("qk_norm", "bool", False, doc="per-head RMSNorm on q and k before RoPE"),
            ArgSpec("qk_norm_eps", "float", 1e-5, min=0.0, max=1.0),
            ArgSpec("zero_init", "bool", False, doc="zero-initialise o_proj (starts as identity)"),
        ),
        sizes=("dim", "heads", "kv_heads", "head_dim"),
        derive=_attention_derive,
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=_attention_weights,
        flops=_attention_flops,
        kv_elems=lambda a: 2 * a["kv_heads"] * (a["head_dim"] or 0) if a["causal"] else 0,
        causal=lambda a: bool(a["causal"]),
        template="attention", class_name="Attention",
        tp={"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
        ctor=lambda a, u: {"dim": a["dim"], "heads": a["heads"], "kv_heads": a["kv_heads"],
                        "head_dim": a["head_dim"], "causal": a["causal"],
                        "qkv_bias": a["qkv_bias"], "out_bias": a["out_bias"],
                        **({"qk_norm_eps": a["qk_norm_eps"]} if a["qk_norm"] else {}),
                        **({"use_rope": a["rope"] is not None}
                           if {"rope", "no_rope"} <= u else {}),
                        "zero_init": a["zero_init"]},
        call='{m}({x}, rope_cos, rope_sin, attn_mask["{mask_key}"]{kv})',
        call_fields=lambda a: {"mask_key": mask_key(a)},
        features=lambda a: frozenset(
            f for f, on in (("qk_norm", a["qk_norm"]), ("rope", a["rope"] is not None),
                            ("no_rope", a["rope"] is None),
                            ("partial_rotary", a["rope"] is not None
                             and a["rope"].component.args.get("rotary_dim", a["head_dim"])
                             != a["head_dim"]))
            if on),
    ),
    _mlp("swiglu", "SwiGLU MLP: down(silu(gate(x)) * up(x)).", ("gate_proj", "up_proj", "down_proj"),
         bias=False, class_name="SwiGLU"),
    _mlp("gelu_mlp", "Two-layer MLP with exact (erf) GELU.", ("up_proj", "down_proj"),
         bias=True, class_name="GeluMLP"),
    _mlp("relu_mlp", "Two-layer MLP with ReLU.", ("up_proj", "down_proj"), bias=True,
         class_name="ReluMLP"),
)


@dataclass(frozen=True)
class NestedCall:
    """A constructor argument that is itself a constructor call, e.g. a router."""

    class_name: str
    kwargs: tuple[tuple[str, Any], ...]


# ---- mixture of experts ------------------------------------------------------------

SCHEDULES = ("constant", "cosine_decay", "linear_warmup")


def _router_ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if not k.startswith("_")}


def _moe_derive(a: dict[str, Any]) -> None:
    if a.get("shared_hidden") is None:
        a["shared_hidden"] = a["hidden"]


def _moe_weights(a: Args) -> dict[str, Shape]:
    dim, hidden, e = a["dim"], a["hidden"], a["experts"]
    w: dict[str, Shape] = {
        "router.weight": (e, dim),
        "experts.gate_proj": (e, dim, hidden),
        "experts.up_proj": (e, dim, hidden),
        "experts.down_proj": (e, hidden, dim),
    }
    if a["shared_experts"]:
        sh = a["shared_experts"] * a["shared_hidden"]
        w.update({"shared_experts.gate_proj.weight": (sh, dim),
                  "shared_experts.up_proj.weight": (sh, dim),
                  "shared_experts.down_proj.weight": (dim, sh)})
    return w


def _moe_active(a: Args) -> int:
    """Router, top_k experts and the shared experts."""
    dim, hidden, e, k = a["dim"], a["hidden"], a["experts"], a["top_k"]
    shared = 3 * dim * a["shared_experts"] * a["shared_hidden"]
    return e * dim + k * 3 * dim * hidden + shared


def _moe_features(a: Args) -> frozenset[str]:
    router = a["router"].component
    f = {router.op.name}
    if a["shared_experts"]:
        f.add("shared")
    if a["capacity_factor"]:
        f.add("capacity")
    return frozenset(f)


def _moe_ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
    router = a["router"].component
    router_args = {"dim": a["dim"], "experts": a["experts"], "top_k": a["top_k"],
                   **router.op.ctor(router.args, u)}
    out: dict[str, Any] = {"dim": a["dim"], "hidden": a["hidden"], "experts": a["experts"],
                           "top_k": a["top_k"],
                           "router": NestedCall(router.op.class_name, tuple(router_args.items()))}
    if "shared" in u:
        out["shared_hidden"] = a["shared_experts"] * a["shared_hidden"]
    if "capacity" in u:
        out["capacity_factor"] = a["capacity_factor"]
    out["zero_init"] = a["zero_init"]
    return out


_register(
    OpDef(
        name="softmax_topk",
        role="router",
        doc="Token-choice router: softmax over experts, top-k, optional renormalisation; "
            "Switch-style load-balancing loss E·Σ f_i·P_i and router z-loss.",
        args=(
            ArgSpec("renormalize", "bool", True, doc="rescale the k weights to sum to 1"),
            ArgSpec("aux_loss_weight", "float", 0.01, min=0.0),
            ArgSpec("z_loss_weight", "float", 0.0, min=0.0),
        ),
        template="softmax_topk", class_name="SoftmaxTopK",
        ctor=_router_ctor,
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
        template="sigmoid_topk", class_name="SigmoidTopK",
        ctor=_router_ctor,
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
            ArgSpec("router", "op:router", doc="softmax_topk(...) or sigmoid_topk(...)"),
            ArgSpec("shared_experts", "int", 0, min=0, doc="experts every token uses"),
            ArgSpec("shared_hidden", "size", derived=True,
                    doc="hidden width of one shared expert (default: hidden)"),
            ArgSpec("capacity_factor", "float", 0.0, min=0.0,
                    doc="per-expert capacity ceil(T·k/E·factor) in training; 0: no limit"),
            ArgSpec("zero_init", "bool", False, doc="zero-initialise the down projections"),
        ),
        sizes=("dim", "experts", "hidden", "shared_hidden"),
        derive=_moe_derive,
        inputs=lambda a: (_hidden(a["dim"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=_moe_weights,
        active_params=_moe_active,
        flops=lambda a, s: 2 * _moe_active(a),
        template="moe", class_name="MoE",
        ctor=_moe_ctor,
        features=_moe_features,
    ),
)


# ---- vision: patch embedding, adapters ---------------------------------------------------


def _patch_grid(a: Args) -> int:
    return a["image_size"] // a["patch"] if a["patch"] > 0 else 0


def patch_tokens(a: Args) -> int:
    """Tokens a patch embedding produces: the patch grid, plus the CLS token."""
    return _patch_grid(a) ** 2 + (1 if a["cls_token"] else 0)


def _patch_weights(a: Args) -> dict[str, Shape]:
    dim, c, p = a["dim"], a["channels"], a["patch"]
    w: dict[str, Shape] = {"proj.weight": (dim, c, p, p), "proj.bias": (dim,)}
    if a["cls_token"]:
        w["cls_token"] = (1, 1, dim)
    if a["positions"] == "learned":
        w["pos_embedding"] = (1, patch_tokens(a), dim)
    return w


def _adapter_derive(a: dict[str, Any]) -> None:
    if "hidden" in a and a.get("hidden") is None:
        a["hidden"] = a["out_dim"]


_register(
    OpDef(
        name="patch_embed",
        doc="Images (B, channels, image_size, image_size) → patch tokens (B, S, dim): a "
            "strided convolution, optional CLS token, learned positions.",
        args=(
            ArgSpec("channels", "size", 3),
            ArgSpec("patch", "size", doc="patch side in pixels"),
            ArgSpec("dim", "size"),
            ArgSpec("image_size", "size"),
            ArgSpec("positions", "choice", "learned", choices=("learned", "none")),
            ArgSpec("cls_token", "bool", False),
        ),
        sizes=("channels", "patch", "dim", "image_size"),
        inputs=lambda a: (("B", a["channels"], a["image_size"], a["image_size"]),),
        output=lambda a: _hidden(a["dim"]),
        weights=_patch_weights,
        flops=lambda a, s: 2 * a["dim"] * a["channels"] * a["patch"] ** 2,
        template="patch_embed", class_name="PatchEmbedding", init_args="std",
        ctor=lambda a, u: {k: a[k] for k in ("channels", "patch", "dim", "image_size",
                                              "positions", "cls_token")},
    ),
    OpDef(
        name="mlp2",
        role="adapter",
        doc="Adapter: Linear → GELU → Linear from vision width to text width.",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("hidden", "size", derived=True, doc="default: out_dim")),
        sizes=("in_dim", "out_dim", "hidden"),
        derive=_adapter_derive,
        inputs=lambda a: (_hidden(a["in_dim"]),),
        output=lambda a: _hidden(a["out_dim"]),
        weights=lambda a: {"fc1.weight": (a["hidden"], a["in_dim"]), "fc1.bias": (a["hidden"],),
                           "fc2.weight": (a["out_dim"], a["hidden"]), "fc2.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["hidden"] * (a["in_dim"] + a["out_dim"]),
        template="mlp2", class_name="MLP2Adapter", init_args="std",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "hidden": a["hidden"]},
    ),
    OpDef(
        name="avgpool",
        role="adapter",
        doc="Adapter: average each window × window block of the patch grid, then a linear "
            "map to text width (fewer image tokens).",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("window", "size", doc="pooling window side, in patches")),
        sizes=("in_dim", "out_dim", "window"),
        inputs=lambda a: (_hidden(a["in_dim"]),),
        output=lambda a: _hidden(a["out_dim"]),
        weights=lambda a: {"proj.weight": (a["out_dim"], a["in_dim"]), "proj.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["in_dim"] * a["out_dim"],
        template="avgpool", class_name="AvgPoolAdapter", init_args="std",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "window": a["window"]},
    ),
    OpDef(
        name="attention_pool",
        role="adapter",
        doc="Adapter: a learned query attends over each window × window block of the patch "
            "grid (multi-head), then a linear map to text width.",
        args=(ArgSpec("in_dim", "size"), ArgSpec("out_dim", "size"),
              ArgSpec("window", "size"), ArgSpec("heads", "size", 1)),
        sizes=("in_dim", "out_dim", "window", "heads"),
        inputs=lambda a: (_hidden(a["in_dim"]),),
        output=lambda a: _hidden(a["out_dim"]),
        weights=lambda a: {"query": (1, 1, a["in_dim"]),
                           "attention.in_proj_weight": (3 * a["in_dim"], a["in_dim"]),
                           "attention.in_proj_bias": (3 * a["in_dim"],),
                           "attention.out_proj.weight": (a["in_dim"], a["in_dim"]),
                           "attention.out_proj.bias": (a["in_dim"],),
                           "proj.weight": (a["out_dim"], a["in_dim"]),
                           "proj.bias": (a["out_dim"],)},
        flops=lambda a, s: 2 * a["in_dim"] * (4 * a["in_dim"] + a["out_dim"]),
        template="attention_pool", class_name="AttentionPoolAdapter", init_args="std",
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"],
                           "window": a["window"], "heads": a["heads"]},
    ),
)

# ---- vision-language fusion -----------------------------------------------------------------
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


_register(
    OpDef(
        name="joint_decoder",
        role="fusion",
        doc="Image tokens are prefixed to the text (prefix_embeds); the logits of the image "
            "positions are sliced off (output_slice).",
        args=(ArgSpec("max_text", "size", doc="longest text sequence"),),
        sizes=("max_text",),
    ),
    OpDef(
        name="cross_attention",
        role="fusion",
        doc="A gated cross-attention block after every k-th decoder layer: text queries, "
            "image keys and values, no positions, no causal mask, tanh gates starting at 0 "
            "(so it starts as the identity).",
        args=(
            ArgSpec("every", "size", 1, doc="a block after layers every-1, 2·every-1, ..."),
            ArgSpec("heads", "size"),
            ArgSpec("hidden", "size", derived=True, doc="MLP width (default 4·dim)"),
        ),
        sizes=("every", "heads", "hidden"),
        weights=_xattn_weights,
        template="cross_attention", class_name="CrossAttentionBlock",
    ),
    OpDef(
        name="mot",
        role="fusion",
        doc="Mixture-of-Transformers: image tokens prefixed to the text as in the joint "
            "decoder, and every block component (norms, q/k/v/o, MLPs or MoEs) copied per "
            "modality; tokens use their modality's copy (by modality_ids), attention stays "
            "global over the whole sequence.",
        args=(
            ArgSpec("modalities", "list", doc='names, e.g. ["image", "text"]'),
            ArgSpec("max_text", "size"),
        ),
        sizes=("max_text",),
        template="mot", class_name="",
    ),
    OpDef(
        name="moma",
        role="fusion",
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
        template="moma", class_name="MoMaFFN",
    ),
)


def numel(shape: Shape) -> int:
    return _numel(shape)
