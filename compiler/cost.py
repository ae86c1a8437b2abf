"""What a model costs: parameters, FLOPs, KV-cache and training memory.

All figures are read off the lowered graph, whose nodes carry each module's
parameter layout from the op registry, so every op is counted by the same rule
it is generated from.

Conventions (documented in docs/language.md, `forgec info`):
  * parameters: unique tensors; a tied head counts once (with the embedding);
  * FLOPs: forward, per token, 2 per multiply-add, matmuls (the head included,
    the embedding lookup not) plus attention scores and values at the given
    sequence length, averaged over positions (causal: (S+1)/2 keys per query);
  * training memory: weights + gradients + AdamW's two moments, all in the
    parameter dtype (fp32: 16 B/param, bf16: 8 B/param); activations excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .lower import FUSION
from .ops import OPS, numel

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass
class Cost:
    model: str
    n_layers: int
    params_total: int
    params_active: int
    flops_per_token: int
    seq_len: int
    kv_bytes_per_token: int
    kv_dtype: str
    supports_kv_cache: bool
    non_causal: list[str]
    breakdown: dict[str, int] = field(default_factory=dict)
    # the fixed-size decoding state per sequence (recurrent mixers), in kv_dtype
    state_bytes_per_seq: int = 0
    training_memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "flops_per_token": self.flops_per_token,
            "seq_len": self.seq_len,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_dtype": self.kv_dtype,
            "state_bytes_per_seq": self.state_bytes_per_seq,
            "supports_kv_cache": self.supports_kv_cache,
            "non_causal": self.non_causal,
            "breakdown": self.breakdown,
            "training_memory": self.training_memory,
        }


def group_of(fqn: str) -> str:
    """`layers.3.attention.q_proj.weight` → `layers.*.attention`."""
    parts = fqn.split(".")
    if len(parts) >= 3 and parts[0].endswith("layers") and parts[1].isdigit():
        return ".".join([parts[0], "*", parts[2]])
    return parts[0]


def cost(graph: nx.MultiDiGraph, seq_len: int | None = None, kv_dtype: str = "bf16") -> Cost:
    model = graph.graph["model"]
    if seq_len is None:
        seq_len = default_seq_len(model)
    total = active = flops = kv = state = 0
    breakdown: dict[str, int] = {}
    for _, data in graph.nodes(data=True):
        if data["kind"] != "op" or not data["ok"]:
            continue
        op = OPS[data["op"]]
        for name, shape in data["weights"].items():
            n = numel(shape)
            total += n
            key = group_of(name)
            breakdown[key] = breakdown.get(key, 0) + n
        if data["weights"]:  # counted once per module, like its weights
            active += (op.active_params(data["args"]) if op.active_params
                       else sum(numel(s) for s in data["weights"].values()))
        flops += op.flops(data["args"], seq_len)
        kv += op.kv_elems(data["args"])
        state += op.state_elems(data["args"])
    supports = graph.graph.get("supports_kv_cache", True)
    mem = {dtype: {"weights": total * b, "grads": total * b, "optimizer": 2 * total * b,
                   "total": 4 * total * b}
           for dtype, b in (("fp32", 4), ("bf16", 2))}
    return Cost(
        model=model.name, n_layers=len(model.layers), params_total=total, params_active=active,
        flops_per_token=flops, seq_len=seq_len,
        kv_bytes_per_token=kv * DTYPE_BYTES[kv_dtype] if supports else 0, kv_dtype=kv_dtype,
        supports_kv_cache=supports,
        non_causal=[fqn for fqn, _ in graph.graph.get("non_causal", [])],
        breakdown=breakdown, training_memory=mem,
        state_bytes_per_seq=state * DTYPE_BYTES[kv_dtype] if supports else 0,
    )


def default_seq_len(model) -> int:
    """The sequence length figures are quoted at: the model's max_seq_len, else 2048."""
    value = model.params.get("max_seq_len")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    for comp in model.all_components():
        if "positions" in comp.op.slots:  # the rotary tables' length
            return comp.args["max_seq_len"]
    return 2048


def vlm_cost(comp, vlm) -> Cost:
    """A VLM's cost: its text model's FLOPs and KV cache, with the encoder's,
    adapter's and fusion's parameters added (`comp` is a driver.Compilation)."""
    from .vlm import fusion_params

    c = cost(comp.graphs[vlm.text])
    vision = cost(comp.graphs[vlm.vision])
    extra = vision.params_total + sum(numel(s) for s in
                                      vlm.adapter.op.weights(vlm.adapter.args).values())
    fusion_total, fusion_active = fusion_params(vlm, comp.models[vlm.text])
    c.params_total += extra + fusion_total
    c.params_active += extra + fusion_active
    found = comp.vlm_graphs[vlm.name].graph  # checks/causality.py over the VLM's graph
    if not found["supports_kv_cache"]:
        c.supports_kv_cache = False
        c.kv_bytes_per_token = 0
        c.state_bytes_per_seq = 0
        if any(fqn == FUSION for fqn, _ in found["non_causal"]):
            c.non_causal = [*c.non_causal, f"fusion {vlm.fusion.op.name} ({vlm.name})"]
    c.breakdown = {**{f"vision_encoder.{k}": v for k, v in vision.breakdown.items()},
                   "adapter": sum(numel(s) for s in vlm.adapter.op.weights(vlm.adapter.args)
                                  .values()),
                   **c.breakdown}
    return c


def format_bytes(n: float) -> str:
    """A byte count as people read it: `1,234 B`, `119.66 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError
