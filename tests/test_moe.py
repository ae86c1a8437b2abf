"""Mixture of experts: counts, routing, balancing bias, capacity, dispatch, collectors."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from forgec.compiler.build import build
from forgec.compiler.cost import cost
from forgec.compiler.driver import compile_spec

LLAMA = (ROOT / "specs" / "llama_debug.forge").read_text()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def moe_spec(mlp: str) -> str:
    """llama_debug with every MLP replaced by `mlp`."""
    old = "mlp            = swiglu(dim, hidden = ffn_hidden(dim, multiple_of = 64))"
    assert old in LLAMA
    return LLAMA.replace(old, f"mlp = {mlp}")


def generate(tmp_path: Path, text: str, name: str = "moe_case"):
    """Compile `text`, build its package into tmp_path and import it."""
    spec = tmp_path / f"{name}.forge"
    spec.write_text(text)
    build(compile_spec(str(spec)), str(tmp_path / "pkg"), update=True)
    path = tmp_path / "pkg" / name / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"{name}_{id(tmp_path)}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def test_mixtral_counts_match_the_published_figures():
    result = compile_spec("specs/mixtral_8x7b.forge")
    c = cost(result.graphs["mixtral_8x7b"])
    assert c.params_total == 46_702_792_704
    assert c.params_active == 12_879_925_248
    # forward FLOPs: 2 per active weight in matmuls, plus attention
    assert c.flops_per_token > 2 * (c.params_active - 32000 * 4096)


def test_moe_debug_places_experts_on_odd_layers():
    from generated.moe_debug import model as mod

    torch.manual_seed(0)
    model = mod.Transformer()
    assert mod.MOE_FQNS == ("layers.1.mlp", "layers.3.mlp")
    assert type(model.layers["1"].mlp).__name__ == "MoE"
    assert type(model.layers["0"].mlp).__name__ == "SwiGLU"
    sd = model.state_dict()
    assert sd["layers.1.mlp.experts.gate_proj"].shape == (8, 128, 64)
    assert sd["layers.1.mlp.router.weight"].shape == (8, 128)
    assert "layers.1.mlp.router.expert_bias" in sd  # checkpointed, not trained
    assert "layers.1.mlp.router.expert_bias" not in dict(model.named_parameters())


def test_one_expert_top1_equals_the_dense_mlp(tmp_path):
    mod = generate(tmp_path, moe_spec(
        "moe(dim, experts = 1, top_k = 1, hidden = 384, router = softmax_topk())"))
    torch.manual_seed(0)
    model = mod.Transformer()
    moe = model.layers["0"].mlp
    assert not hasattr(mod, "SwiGLU")  # no dense MLP in an all-MoE model: no class for it
    from generated.llama_debug.model import SwiGLU

    dense = SwiGLU(128, 384)
    with torch.no_grad():  # the dense MLP with the expert's weights (Linear stores (out, in))
        dense.gate_proj.weight.copy_(moe.experts.gate_proj[0].t())
        dense.up_proj.weight.copy_(moe.experts.up_proj[0].t())
        dense.down_proj.weight.copy_(moe.experts.down_proj[0].t())
    x = torch.randn(2, 10, 128)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_grouped_matmul_and_loop_dispatch_agree(grad):
    from generated.moe_debug import model as mod

    torch.manual_seed(0)
    moe = mod.Transformer().layers["1"].mlp.eval()
    x = torch.randn(2, 12, 128, requires_grad=grad)
    results = []
    for grouped in (True, False):
        mod.GROUPED_MM = grouped
        try:
            out = moe(x)
            if grad:
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
                grads = torch.autograd.grad((out * g).sum(), [x, moe.experts.gate_proj])
                results.append((out.detach(), *grads))
            else:
                results.append((out.detach(),))
        finally:
            mod.GROUPED_MM = True
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_capacity_drops_exactly_the_overflow_in_a_documented_order(tmp_path):
    mod = generate(tmp_path, moe_spec(
        "moe(dim, experts = 4, top_k = 1, hidden = 32, router = softmax_topk(), "
        "capacity_factor = 1.0)"))
    torch.manual_seed(0)
    moe = mod.Transformer().layers["0"].mlp.train()
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.rand(2, 10, 128) + 0.1  # positive, so expert 0 scores highest
    out = moe(x)
    tokens, capacity = 20, math.ceil(20 * 1 / 4 * 1.0)
    assert moe.dropped_tokens == tokens - capacity == 15
    flat = out.reshape(-1, 128)
    # the first `capacity` tokens in flattened batch order are kept, the rest get 0
    assert (flat[:capacity].abs().sum(dim=-1) > 0).all()
    assert torch.equal(flat[capacity:], torch.zeros(tokens - capacity, 128))
    moe.eval()  # evaluation never drops
    assert (moe(x).reshape(-1, 128).abs().sum(dim=-1) > 0).all() and moe.dropped_tokens == 0


def test_capacity_counts_slots_per_expert_not_per_choice(tmp_path):
    mod = generate(tmp_path, moe_spec(
        "moe(dim, experts = 4, top_k = 2, hidden = 32, router = softmax_topk(), "
        "capacity_factor = 1.0)"))
    torch.manual_seed(0)
    moe = mod.Transformer().layers["0"].mlp.train()
    with torch.no_grad():  # first choice expert 0, second choice expert 1, for every token
        moe.router.weight.zero_()
        moe.router.weight[0] = 2.0
        moe.router.weight[1] = 1.0
    moe(torch.rand(1, 8, 128) + 0.1)
    # 16 slots, capacity ceil(16/4) = 4 per expert: experts 0 and 1 keep 4 each
    assert moe.dropped_tokens == 16 - 8


def test_sigmoid_bias_moves_toward_balance_without_gradient():
    from generated.moe_debug import model as mod

    torch.manual_seed(0)
    model = mod.Transformer().train()
    router = model.layers["1"].mlp.router
    router.bias_rate = 0.05  # a fast rate, so that 30 steps show the effect
    with torch.no_grad():  # skew: expert 0 scores high for every token
        router.weight[0] += 0.5
    x = torch.randint(0, 256, (2, 32))
    shares = []
    for step in range(30):
        model.set_moe_step(step, 1000)
        loss = model(x).float().logsumexp(-1).mean() + model.get_moe_aux_loss()
        loss.backward()
        assert router.expert_bias.grad is None
        counts = router.expert_counts
        shares.append(float(counts[0] / counts.sum()))
        model.zero_grad()
    assert router.expert_bias[0] < 0  # the overloaded expert is pushed down
    assert router.expert_bias[1:].max() > 0
    assert shares[-1] < shares[0]
    assert router.expert_bias.requires_grad is False


def test_sigmoid_gate_weights_use_unbiased_scores_and_group_limits():
    from generated.moe_debug import model as mod

    torch.manual_seed(0)
    router = mod.Transformer().layers["1"].mlp.router.eval()
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0, 0, 0, 0, 0, 0]))
    x = torch.randn(1, 16, 128)
    weights, ids = router(x)
    scores = torch.sigmoid(x.reshape(-1, 128) @ router.weight.t())
    assert (ids == 1).any(dim=-1).all()  # the biased expert is always chosen...
    expected = scores.gather(1, ids)
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, expected)  # ...but weighted by its real score
    groups = ids // 2  # 4 groups of 2 experts, topk_group = 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_switch_aux_loss_and_collectors_cover_every_moe(tmp_path):
    mod = generate(tmp_path, moe_spec(
        "moe(dim, experts = 4, top_k = 2, hidden = 32, "
        "router = softmax_topk(aux_loss_weight = 0.5, z_loss_weight = 0.1))"))
    torch.manual_seed(0)
    model = mod.Transformer().train()
    model(torch.randint(0, 256, (2, 16)))
    assert mod.MOE_FQNS == tuple(f"layers.{i}.mlp" for i in range(4))
    routers = [model.layers[str(i)].mlp.router for i in range(4)]
    torch.testing.assert_close(model.get_moe_aux_loss(), sum(r.aux_loss for r in routers))
    torch.testing.assert_close(model.get_moe_router_z_loss(), sum(r.z_loss for r in routers))
    r = routers[0]
    counts = model.get_expert_counts()
    assert set(counts) == set(mod.MOE_FQNS)
    assert all(int(c.sum()) == 2 * 16 * 2 for c in counts.values())  # T·k slots
    assert model.get_dropped_tokens() == dict.fromkeys(mod.MOE_FQNS, 0)
    assert r.aux_loss > 0


def test_sparsemixer_trains_in_a_generated_model(tmp_path):
    # the generated model carries sparsemixer's sampling and gradient estimate: a training
    # step routes 2 slots a token, records the balance loss and reaches the router
    mod = generate(tmp_path, moe_spec(
        "moe(dim, experts = 4, top_k = 2, hidden = 32, "
        "router = sparsemixer(jitter_eps = 0.3, aux_loss_weight = 0.5))"))
    assert "class SparseMixerGrad" in (tmp_path / "pkg" / "moe_case" / "model.py").read_text()
    torch.manual_seed(0)
    model = mod.Transformer()
    model.init_weights_and_freqs()
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    loss = model(ids[:, :-1], targets=ids[:, 1:]) + model.get_moe_aux_loss()
    loss.backward()
    router = model.layers["0"].mlp.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert model.get_moe_aux_loss() > 0
    assert all(int(c.sum()) == 2 * 15 * 2 for c in model.get_expert_counts().values())


def test_switch_aux_loss_formula():
    from generated.mixtral_8x7b import model as mod

    router = mod.SoftmaxTopK(dim=16, experts=4, top_k=2, renormalize=True,
                             aux_loss_weight=1.0, z_loss_weight=1.0).train()
    torch.manual_seed(0)
    router.weight.data.normal_()
    x = torch.randn(1, 10, 16)
    weights, ids = router(x)
    logits = x.reshape(-1, 16) @ router.weight.t()
    probs = logits.softmax(-1)
    share = torch.bincount(ids.flatten(), minlength=4).float() / 20
    torch.testing.assert_close(router.aux_loss, 4 * (share * probs.mean(0)).sum())
    torch.testing.assert_close(router.z_loss, logits.logsumexp(-1).square().mean())
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))  # renormalised


def test_cached_decode_equals_full_forward_with_experts():
    from generated.moe_debug import model as mod

    torch.manual_seed(0)
    model = mod.Transformer().eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(x)
        caches = model.make_kv_caches(2, 32)
        steps = [model(x[:, :7], kv_caches=caches)]
        steps += [model(x[:, t : t + 1], kv_caches=caches) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("mlp, code, where", [
    ("moe(dim, experts = 4, top_k = 5, hidden = 32, router = softmax_topk())", "E100", 20),
    ("moe(dim, experts = 6, top_k = 2, hidden = 32, router = sigmoid_topk(n_group = 4))",
     "E101", 20),
    ("moe(dim, experts = 8, top_k = 2, hidden = 32, "
     "router = sigmoid_topk(n_group = 4, topk_group = 5))", "E101", 20),
    ("moe(dim, experts = 8, top_k = 4, hidden = 32, "
     "router = sigmoid_topk(n_group = 4, topk_group = 1))", "E101", 20),
    ("moe(dim, experts = 8, top_k = 2, hidden = 32, shared_gate = true, "
     "router = softmax_topk())", "E102", 20),
    ("moe(dim, experts = 8, top_k = 2, hidden = 32, router = rope)", "E025", 20),
    ("moe(dim, experts = 8, top_k = 2, hidden = 32, router = softmax_topk(), "
     "capacity_factor = -1.0)", "E026", 20),
    # sparsemixer (PhiMoE's router) picks exactly two experts
    ("moe(dim, experts = 8, top_k = 3, hidden = 32, router = sparsemixer())", "E185", 20),
])
def test_moe_arguments_are_checked(forge, mlp, code, where):
    comp, diags = forge(moe_spec(mlp))
    assert comp is None
    assert [(d.code, d.span.line) for d in diags.errors] == [(code, where)]
