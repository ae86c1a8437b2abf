"""What composed specs compute: generated/composed_debug against hand-written PyTorch."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from forgec.compiler.driver import compile_spec
from forgec.compiler.ops.geglu.modules import GeGLU


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # bit-stable reductions across machines


def load():
    return importlib.import_module("generated.composed_debug.model")


def test_composed_geglu_equals_the_builtin_op_on_the_same_weights():
    mod = load()
    torch.manual_seed(0)
    composed = mod.GegluMlp(mod.ModelConfig())
    composed.init_weights(0.02, 0.01)
    builtin = GeGLU(dim=128, hidden=256)
    builtin.load_state_dict(composed.state_dict())  # the same parameter names
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        assert torch.equal(composed(x), builtin(x))


def test_composed_relu2_equals_its_definition():
    mod = load()
    torch.manual_seed(0)
    relu2 = mod.PrimerMlp(mod.ModelConfig())
    relu2.init_weights(0.02, 0.01)
    x = torch.randn(2, 5, 128)
    up, down = relu2.up_proj.weight, relu2.down_proj.weight
    with torch.no_grad():
        assert torch.equal(relu2(x), F.relu(x @ up.T).pow(2) @ down.T)


def test_the_gated_attention_output_is_the_attention_times_the_sigmoid_gate():
    mod = load()
    torch.manual_seed(0)
    model = mod.Transformer().eval()
    block = model.layers["0"]
    x = torch.randn(2, 6, 128)
    cos, sin = model.rope_cos[None, :6], model.rope_sin[None, :6]
    with torch.no_grad():
        a = block.attention_norm(x)
        mask = mod.attention_masks(2, 6, device=x.device)["causal"]
        h = x + block.attention(a, cos, sin, mask) * torch.sigmoid(block.gate(a))
        expected = h + block.mlp(block.mlp_norm(h))
        assert torch.equal(block(x, cos, sin), expected)


def test_parameter_names_are_the_compilers_fqns():
    mod = load()
    result = compile_spec(str(ROOT / "specs" / "composed_debug.forge"))
    graph = result.graphs["composed_debug"]
    fqns = {k: tuple(v) for _, d in graph.nodes(data=True) if d["kind"] == "op"
            for k, v in d["weights"].items()}
    with torch.device("meta"):
        model = mod.Transformer()
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == fqns
    assert "layers.1.mlp.up_proj.weight" in fqns and "layers.0.mlp.gate_proj.weight" in fqns


def test_the_composed_model_trains():
    mod = load()
    torch.manual_seed(0)
    model = mod.Transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_cached_decode_equals_the_full_forward():
    torch.manual_seed(0)
    model = load().Transformer().eval()
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        caches = model.make_kv_caches(2, 64)
        steps = [model(x[:, :11], kv_caches=caches)]
        steps += [model(x[:, t : t + 1], kv_caches=caches) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)
