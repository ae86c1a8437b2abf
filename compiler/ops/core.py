"""What an op is: its declaration (`OpDef`) and its arguments (`ArgSpec`).

Each `OpDef` declares
  * its arguments (name, type, default, range) — checked by compiler/bind.py;
  * `derive`: defaults that depend on other arguments (e.g. kv_heads = heads);
  * its shape rule: the tensor shapes it expects and the shape it produces —
    used by compiler/lower.py and checked by compiler/checks/shapes.py;
  * its parameter layout: FQN suffix → shape, relative to the component
    (`q_proj.weight` under `layers.3.attention`) — used for FQNs, parameter
    counts and code generation;
  * its cost: forward FLOPs per token and KV-cache elements per token, and
    the workspace of its backward per token (`forgec plan`);
  * `causal`: whether a token's output depends only on earlier tokens;
  * its code: the definitions of its folder's `modules.py` it needs (`code`,
    by default its `class_name`), copied into the generated model.py by
    compiler/modular.py; the constructor arguments (`ctor`); how its forward
    is called (`call`); and the optional code paths a component needs
    (`features`: a feature `qk_norm` keeps the `if QK_NORM:` branches of the
    module source, so no dead branch is generated).

Shapes are tuples whose entries are ints or the symbols "B" (batch) and
"S" (sequence).

Roles: "module" ops are applied to tensors; "config" ops (rope) are shared
settings that other ops name; "router" ops are written inline as an argument
of the op that routes (`moe(..., router = sigmoid_topk(...))`); "adapter" and
"fusion" ops connect a vision encoder to a decoder.
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


@dataclass(frozen=True)
class Foreign:
    """How another framework's model config expresses an op (`OpDef.foreign`, keyed by
    the framework: "hf" for Hugging Face transformers, "kf" for KempnerForge). The
    importers (compiler/importers/) and `forgec export-hf` (runtime/export.py) read it:
    they name no op themselves."""

    # the op's place in that framework's decoder: "token_embedding", "positions",
    # "self_attention", "norm", "mlp", "experts", "router" or "output_head"
    role: str
    # config field → the values that choose this op among the ops of its role
    # (KempnerForge's `norm_type = "layernorm"`); the first is the one an export writes
    selects: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # argument → the config field it is read from
    fields: Mapping[str, str] = field(default_factory=dict)
    # the framework chooses it where a config leaves its `selects` fields out
    by_default: bool = False
    # the op's arguments as the spec writes them, given the config's values and
    # note(field) (the field's name, "(default)" where the file leaves it out): a list
    # of (argument, value, note); a note makes the value a named model parameter
    # commented with it, None writes the value in place
    args: Callable[[Mapping[str, Any], Callable[[str], str]],
                   list[tuple[str, Any, str | None]]] = lambda config, note: []


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
    # cached elements per sequence, whatever its length (a recurrent mixer's state)
    state_elems: Callable[[Args], int] = lambda a: 0
    # bytes per token, at a sequence length, that the op's backward holds at its peak
    # beyond what its forward saved, in fp32 training (a scan's full-size gradients,
    # the gradients of explicit S×S scores): `forgec plan` adds them to the activations
    backward_bytes: Callable[[Args, int], int] = _zero
    causal: Callable[[Args], bool] = lambda a: True
    derive: Callable[[dict[str, Any]], None] = lambda a: None
    # the same defaults as Python over the other arguments, e.g. {"kv_heads": "{heads}"}:
    # generated code computes them from the ModelConfig fields the arguments read
    derived_code: Mapping[str, str] = field(default_factory=dict)
    # argument names that are sizes (checked positive by checks/positive_sizes.py)
    sizes: tuple[str, ...] = field(default=())
    # the named places the op may fill: spine slots of a model ("token_embedding",
    # "norm", "output_head") or of a vision encoder ("patch_embedding"); "mlp", a
    # block's feed-forward (which a MoMa fusion replaces by its experts); "experts",
    # a mixture of experts (the model's MoE hooks collect it); "positions" and
    # "vision_positions", the rotary tables of a decoder and of a vision encoder;
    # "adapter", a VLM's map from the vision encoder's width to the decoder's
    slots: tuple[str, ...] = field(default=())
    # -- code generation (compiler/emit.py, compiler/modular.py)
    class_name: str = ""
    # definitions of the folder's modules.py the op needs; default: (class_name,)
    code: tuple[str, ...] = ()
    # the op's folder under compiler/ops/ (filled in by the registry)
    folder: str = ""
    # constructor keyword arguments, given the union of features of the model
    ctor: Callable[[Args, frozenset[str]], dict[str, Any]] = lambda a, u: {}
    # the attention mask a component reads, one per kind ("causal", "causal_w16", ...);
    # None: it reads none
    mask: Callable[[Args], str] | None = None
    # each application holds a cache slot when the model decodes: an instance of
    # `cache_class` (a definition of the op's modules.py, or the attention's KVCache),
    # built by make_kv_caches as cache_class(batch_size, max_seq_len, *cache_args),
    # the arguments read from the component; the call's {kv} passes it
    caches: bool = False
    # a recurrent mixer that zeroes the contributions of padding itself: its call reads
    # attn_mask["padding"], the (B, S) validity of the step's positions (None: all real),
    # which attention_masks then provides
    reads_padding: bool = False
    cache_class: str = "KVCache"
    cache_args: tuple[str, ...] = ("kv_heads", "head_dim")
    # the op's own validation of a component, run by compiler/checks/op_rules.py:
    # check(component, context, diags), the context being the model (or vision
    # encoder) for a component, and the routing component for a router
    check: Callable[[Any, Any, Any], None] | None = None
    # a fusion's sentence in the generated VLM's docstring ({image_tokens} filled in)
    summary: str = ""
    # how a fusion op brings image tokens to the decoder (role "fusion"; see Fusion)
    fusion: Fusion | None = None
    # an adapter that pools the patch grid: the argument giving its window side
    pool_window: str = ""
    # forward call; {m} is the module expression, {x} the input(s)
    call: str = "{m}({x})"
    call_fields: Callable[[Args], dict[str, Any]] = lambda a: {}
    # arguments of the class's init_weights: "", "std" or "std, out_std"
    init_args: str = "std, out_std"
    # parameters a token uses, if not all of them (mixture of experts)
    active_params: Callable[[Args], int] | None = None
    # tensor parallelism: submodule → "colwise" | "rowwise" (compiler/plans.py)
    tp: Mapping[str, str] = field(default_factory=dict)
    # why tensor parallelism cannot split the op ("" where `tp` says how it does), or a
    # function of the component's arguments saying so: a plan with tp > 1 over a model
    # using it is an error (E161) saying so
    tp_unsupported: str | Callable[[Args], str] = ""
    # a plain linear map: inside a module of the spec's own (compiler/compose.py), tensor
    # parallelism may split it by columns (reading the module's input) or by rows
    # (producing its output)
    splittable: bool = False
    # mesh axis → the arguments its degree must divide (heads by "tp", experts by "ep")
    split_by: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    features: Callable[[Args], frozenset[str]] = lambda a: frozenset()
    # the key of its statistics in a training run's metrics row (the "experts" slot's
    # routing load and dropped slots; runtime/loop.py, runtime/sinks.py)
    metrics_key: str = ""
    # how other frameworks' configs express it (importers, export-hf): framework → Foreign
    foreign: Mapping[str, Foreign] = field(default_factory=dict)

    def arg(self, name: str) -> ArgSpec | None:
        for a in self.args:
            if a.name == name:
                return a
        return None

    def tp_refusal(self, args: Args) -> str:
        """Why tensor parallelism cannot split a component of these arguments ("": it can)."""
        why = self.tp_unsupported
        return why(args) if callable(why) else why

    @property
    def definitions(self) -> tuple[str, ...]:
        """The names of the folder's modules.py that the generated model copies."""
        return self.code or ((self.class_name,) if self.class_name else ())


def _no_check(comp: Any, tokens: int, positions: int | None, diags: Any) -> None:
    return None


def _no_params(args: Args, layers: list[list[tuple[int, int, tuple[str, ...]]]]) -> tuple[int, int]:
    return 0, 0


def _same_cost(args: Args, params: int, flops: int, slots: tuple[str, ...]) -> tuple[int, int]:
    return params, flops


@dataclass(frozen=True)
class Fusion:
    """How a fusion op joins image tokens to the text decoder: what the vlm binder,
    lowering (`lower_vlm`), the modality pass, the plans and the emitter read, so
    that none of them names a fusion kind. compiler/ops/fusion/spec.py declares one
    per kind; docs/adding-an-op.md ("Adding a fusion kind") walks through them."""

    # image tokens are prefixed to the text: the decoder runs over image + text
    # positions (ModalityContext.prefix_embeds) and the image positions' logits are
    # sliced off (output_slice)
    prefixed: bool = False
    # which block components a token's modality chooses: "" none; "block" every
    # component has a copy per modality (weights `<fqn>.<modality>.<name>`, built as
    # `nn.ModuleDict({m: ... for m in MODALITIES})`); a slot name ("mlp") the
    # components filling that slot are replaced by the fusion op's own module, which
    # takes the modality groups (its weights: the op's, one layer's, `<kind>.…`)
    routes: str = ""
    # the argument naming the modalities (generated as the constant MODALITIES)
    modalities_arg: str = "modalities"
    # what the generated MODALITIES comment calls the routing
    routing_doc: str = ""
    # a stack of blocks the fusion adds to the decoder (`transformer.<stack>.<k>`),
    # block k after decoder layer after(args)[k], fed the image tokens as memory
    # (ModalityContext.image_features); its weights are the op's `<stack>.<k>.…`
    stack: str = ""
    after: Callable[[Args], list[int]] = lambda a: []
    # the stack block's constructor arguments, in order: the op's arguments, or
    # `COMPONENT.ARG` of the text model (`norm.eps`)
    stack_args: tuple[str, ...] = ()
    # what the generated comments and messages call a stack block
    stack_noun: str = ""
    # the hint of E126 when an explicit pipeline split names a stack block
    stack_hint: str = ""
    # the modality pass (E132, E133, E136): check(component, image tokens per image,
    # the decoder's position limit or None, diags)
    check: Callable[[Any, int, int | None, Any], None] = _no_check
    # parameters the fusion adds to the text model's: (total, active per token), given
    # the decoder's layers, each a list of its components' (parameters, active
    # parameters, slots)
    params: Callable[[Args, list[list[tuple[int, int, tuple[str, ...]]]]],
                     tuple[int, int]] = _no_params
    # (parameters, FLOPs per token) of a decoder component under the fusion, from its
    # own and its slots (the pipeline's cost model)
    layer_cost: Callable[[Args, int, int, tuple[str, ...]], tuple[int, int]] = _same_cost
    # FLOPs of one stack block per sample: (args, decoder positions, image tokens)
    stack_flops: Callable[[Args, int, int], int] = lambda a, seq, n: 0
    # the code of a routed component's forward, or None for the op's own call:
    # call(op, args, module, inputs, kv) with `modality` the groups in scope
    call: Callable[[Any, Args, str, str, str], str | None] = lambda op, a, m, x, kv: None


@dataclass(frozen=True)
class NestedCall:
    """A constructor argument that is itself a constructor call, e.g. a router."""

    class_name: str
    kwargs: tuple[tuple[str, Any], ...]


def hidden(dim: Any) -> Shape:
    """The shape of hidden states of width `dim`."""
    return ("B", "S", dim)


def numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        assert isinstance(d, int)
        n *= d
    return n
