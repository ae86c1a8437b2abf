"""Activation checkpointing as plan data, applied by runtime/parallel.py: every
policy trains to the losses of no checkpointing (fp32, ≤ 1e-6), and op-level
selective checkpointing recomputes what it should and nothing more."""

from __future__ import annotations

import collections
import importlib
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forgec.compiler.plans import SAC_SAVES
from forgec.runtime.parallel import (
    COMPILE_BACKEND_ENV,
    SAC_OPS,
    apply_activation_checkpointing,
    apply_compile,
    checkpoint_layer,
)
from forgec.runtime.train import Settings, accumulate_gradients, make_optimizer

TOL = 1e-6
LAYERS = [f"layers.{i}" for i in range(4)]
# (activation_checkpoint, activation_checkpoint_save) as plan.py records them
POLICIES = {
    "none": ([], {}),
    "full": (LAYERS, {}),
    "every_2": (["layers.0", "layers.2"], {}),
    "save_matmul_sdpa": (LAYERS, {u: ["matmul", "sdpa"] for u in LAYERS}),
    "save_sdpa": (LAYERS, {u: ["sdpa"] for u in LAYERS}),
    "every_2_save_matmul": (["layers.0", "layers.2"],
                            {u: ["matmul"] for u in ("layers.0", "layers.2")}),
}


def planmod(policy: str):
    layers, saves = POLICIES[policy]
    data = {"activation_checkpoint": layers}
    if saves:
        data["activation_checkpoint_save"] = saves
    return types.SimpleNamespace(PLANS={"p": data})


def losses(pkg, policy: str, steps: int = 2, compile: bool = False) -> list[float]:
    torch.manual_seed(0)
    model = pkg.Transformer()
    model.init_weights_and_freqs()
    apply_activation_checkpointing(model, planmod(policy), "p")
    if compile:
        apply_compile(model)
    optimizer = make_optimizer(model, Settings())
    vocab = pkg.ModelConfig().vocab_size
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (2, 17))
        doc_ids = (torch.arange(16) >= 10).long().expand(2, 16)  # two packed documents
        loss = accumulate_gradients(model, tokens[:, :-1], tokens[:, 1:], doc_ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(float(loss))
    return out


@pytest.mark.parametrize("name, policies", [
    ("llama_debug", [p for p in POLICIES if p != "none"]),
    ("moe_debug", ["save_matmul_sdpa"]),  # its experts' grouped matmuls kept
])
def test_every_policy_trains_to_the_losses_of_no_checkpointing(name, policies):
    pkg = importlib.import_module(f"generated.{name}")
    want = losses(pkg, "none")
    for policy in policies:
        got = losses(pkg, policy)
        worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert worst <= TOL, (name, policy, got, want)


def test_selective_checkpointing_compiles_per_block(monkeypatch):
    """`forgec train --compile` under op-level selective checkpointing: each
    selectively checkpointed block is compiled whole (fullgraph, the checkpoint
    and its policy traced; aot_eager traces what inductor would) and trains to
    the eager losses."""
    from generated import llama_debug

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    try:
        got = losses(llama_debug, "every_2_save_matmul", compile=True)
    finally:
        torch._dynamo.reset()
    want = losses(llama_debug, "none")
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL, (got, want)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def layer_ops(layer_of, save) -> tuple[collections.Counter, collections.Counter]:
    """The aten ops one layer's forward and backward (recomputation included) run."""
    layer = layer_of()
    if save is not None:
        layer = checkpoint_layer(layer, save)
    x = torch.randn(2, 16, 128, requires_grad=True)
    with OpCounter() as forward:
        out = layer(x)
    with OpCounter() as backward:
        out.sum().backward()
    return forward.counts, backward.counts


def test_selective_checkpointing_recomputes_all_but_the_saved_ops():
    """Backward of a checkpointed layer reruns its forward: all of it under
    `full`; under op-level selective checkpointing every op but the saved ones
    (their outputs are kept)."""
    from generated.llama_debug import Transformer

    def layer_of():
        torch.manual_seed(0)
        model = Transformer()
        model.init_weights_and_freqs()
        layer = model.layers["0"]
        cos, sin = model.rope_cos[None, :16], model.rope_sin[None, :16]
        return _Bound(layer, cos, sin)

    mm, attention = torch.ops.aten.mm.default, SAC_OPS["sdpa"][-1]
    forward, plain = layer_ops(layer_of, None)
    full = layer_ops(layer_of, ())[1]
    matmul = layer_ops(layer_of, ("matmul",))[1]
    both = layer_ops(layer_of, ("matmul", "sdpa"))[1]
    forward_mm = forward[mm]
    assert forward_mm >= 4 and forward[attention] == 1  # projections and the MLP
    # full recomputation stops early: after the MLP's up projections (the down
    # projection's output is needed by no backward)
    assert full[mm] == plain[mm] + forward_mm - 1 and full[attention] == 1
    assert matmul[mm] == plain[mm] and matmul[attention] == 1
    assert both[mm] == plain[mm] and both[attention] == 0
    # the rest (norms, RoPE, SiLU) is recomputed under every policy
    silu = torch.ops.aten.silu.default
    assert full[silu] == matmul[silu] == both[silu] == plain[silu] + 1


class _Bound(torch.nn.Module):
    """One decoder layer with its RoPE tables bound, called as layer(x)."""

    def __init__(self, layer, cos, sin):
        super().__init__()
        self.layer, self.cos, self.sin = layer, cos, sin

    def forward(self, x):
        return self.layer(x, self.cos, self.sin)


def test_the_op_classes_of_the_language_are_the_runtimes():
    assert tuple(sorted(SAC_OPS)) == SAC_SAVES
