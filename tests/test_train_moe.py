"""Training mixture-of-experts models: the loss adds the weighted balance and
router z-losses, metrics.jsonl carries per-layer expert load and dropped slots,
the router schedule advances every step, and the debug MoE model learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import ROOT
from test_moe import LLAMA, generate, moe_spec

from forgec.runtime.data import IGNORE_INDEX
from forgec.runtime.train import MoEStats, accumulate_gradients, read_metrics, train

MOE_DEBUG = str(ROOT / "specs" / "moe_debug.forge")
SOFTMAX_MOE = ("moe(dim, experts = 4, top_k = 2, hidden = 32, capacity_factor = 0.5, "
               "router = softmax_topk(aux_loss_weight = 0.5, z_loss_weight = 0.1))")


def test_the_loss_adds_balance_and_z_losses(tmp_path):
    mod = generate(tmp_path, moe_spec(SOFTMAX_MOE))
    torch.manual_seed(0)
    model = mod.Transformer().train()
    tokens = torch.randint(0, 256, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :3] = IGNORE_INDEX
    doc_ids = torch.zeros_like(inputs)

    stats = MoEStats()
    loss = accumulate_gradients(model, inputs, targets, doc_ids, moe_stats=stats)

    # the same forward by hand: CE over the trained targets + both router losses
    logits = model(inputs, doc_ids=doc_ids)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    aux, z = model.get_moe_aux_loss().detach(), model.get_moe_router_z_loss().detach()
    assert float(aux) > 0 and float(z) > 0
    torch.testing.assert_close(loss, ce.detach() + aux + z, rtol=1e-6, atol=1e-6)
    # the z-loss reaches the router weights through backward
    router = model.layers["0"].mlp.router
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0

    row = stats.row()
    assert set(row) == set(mod.MOE_FQNS)
    for fqn, layer in row.items():
        assert len(layer["load"]) == 4
        assert abs(sum(layer["load"]) - 1) < 1e-5
        assert abs(layer["max_load"] - max(layer["load"]) * 4) < 1e-5
        # capacity ceil(T·k/E·0.5) = ceil(32·2/4·0.5) = 8 slots an expert; all 64
        # routed slots are counted, those beyond the capacity are dropped
        counts = model.get_expert_counts()[fqn]
        assert layer["dropped"] == int((counts - 8).clamp(min=0).sum())
        assert layer["dropped"] > 0


def test_stats_sum_over_micro_batches(tmp_path):
    mod = generate(tmp_path, moe_spec(SOFTMAX_MOE))
    torch.manual_seed(0)
    model = mod.Transformer().train()
    tokens = torch.randint(0, 256, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = torch.zeros_like(inputs)
    expected = {}
    for half in inputs.chunk(2):
        model(half, doc_ids=doc_ids[:2])
        for fqn, c in model.get_expert_counts().items():
            expected[fqn] = expected.get(fqn, 0) + c
    stats = MoEStats()
    accumulate_gradients(model, inputs, targets, doc_ids, grad_accum=2, moe_stats=stats)
    for fqn, counts in expected.items():
        torch.testing.assert_close(stats.counts[fqn], counts.float())


def test_moe_debug_learns_and_logs_routing(tmp_path):
    summary = train(MOE_DEBUG, str(tmp_path / "run"), progress=False, steps=30, seed=0,
                    batch_size=4, seq_len=32, lr=3e-3)
    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)
    assert summary["last_loss"] == rows[-1]["loss"]
    for r in rows:
        assert set(r["moe"]) == {"layers.1.mlp", "layers.3.mlp"}
        for layer in r["moe"].values():
            assert len(layer["load"]) == 8
            assert abs(sum(layer["load"]) - 1) < 1e-5
            assert isinstance(layer["dropped"], int) and layer["dropped"] >= 0
    # a dense model logs no routing
    dense = train(str(ROOT / "specs" / "llama_debug.forge"), str(tmp_path / "dense"),
                  progress=False, steps=1, seed=0, batch_size=2, seq_len=16)
    assert "moe" not in dense["last"]


def test_the_router_schedule_advances_every_step(tmp_path, monkeypatch):
    from forgec.runtime import package

    calls = []
    real_import = package.import_package

    def spying_import(pkg_dir):
        pkg = real_import(pkg_dir)
        original = pkg.Transformer.set_moe_step

        def set_moe_step(self, step, max_steps):
            calls.append((step, max_steps))
            return original(self, step, max_steps)

        monkeypatch.setattr(pkg.Transformer, "set_moe_step", set_moe_step)
        return pkg

    monkeypatch.setattr("forgec.runtime.train.import_package", spying_import)
    train(MOE_DEBUG, str(tmp_path / "run"), progress=False, steps=3, seed=0, batch_size=2,
          seq_len=16)
    assert calls == [(1, 3), (2, 3), (3, 3)]


SIGMOID_MOE = ("moe(dim, experts = 4, top_k = 2, hidden = 32, "
               "router = sigmoid_topk(bias_rate = 0.01, schedule = constant))")


def test_router_load_is_what_the_bias_update_reads(tmp_path):
    """get_router_load() is the routers' pending load, summed over the forwards
    since the last set_moe_step: distributed training sums it over dp ranks in
    place before set_moe_step moves the balancing bias by it."""
    mod = generate(tmp_path, moe_spec(SIGMOID_MOE))
    torch.manual_seed(0)
    model = mod.Transformer().train()
    tokens = torch.randint(0, 256, (2, 16))
    doc_ids = torch.zeros_like(tokens)
    expected: dict = {}
    for half in (slice(0, 1), slice(1, 2)):
        model(tokens[half], doc_ids=doc_ids[half])
        for fqn, counts in model.get_expert_counts().items():
            expected[fqn] = expected.get(fqn, 0) + counts
    load = model.get_router_load()
    assert set(load) == set(mod.MOE_FQNS)
    for fqn, counts in expected.items():
        assert float(counts.sum()) == 2 * 16 * 2  # every token's top-2 slots
        torch.testing.assert_close(load[fqn], counts.float(), rtol=0, atol=0)

    def bias():
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("expert_bias")}

    # a load zeroed in place moves no bias: set_moe_step reads these very tensors
    first = next(iter(load))
    load[first].zero_()
    before = bias()
    model.set_moe_step(1, 10)
    after = bias()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(moved) == len(load) - 1 and not any(k.startswith(first) for k in moved)
    # the update consumed the load
    assert all(float(v.abs().sum()) == 0 for v in model.get_router_load().values())
    # a softmax router has no bias to balance, a dense model no router
    for name, text in (("softmax", moe_spec(SOFTMAX_MOE)), ("dense", LLAMA)):
        (tmp_path / name).mkdir()
        assert generate(tmp_path / name, text).Transformer().get_router_load() == {}
