"""The `geglu` op (compiler/ops/geglu/): its module against the formula, and a whole
model using it against Hugging Face Llama with `hidden_act = "gelu_pytorch_tanh"`."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
import transformers as hf
from conftest import compile_text

from forgec.compiler.cost import cost
from forgec.compiler.emit import emit_package
from forgec.compiler.ops.geglu.modules import GeGLU
from forgec.compiler.plans import tp_plan
from forgec.runtime.hf import load_hf_checkpoint

SPEC = """
model tiny_geglu {
  vocab_size = 128
  dim        = 64
  n_layers   = 2
  n_heads    = 4
  max_seq_len = 128

  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len)

  block dense(x) {
    attention_norm = rmsnorm(dim, eps = 1e-6)
    attention      = attention(dim, heads = n_heads, kv_heads = 2, rope = rope)
    mlp_norm       = rmsnorm(dim, eps = 1e-6)
    mlp            = geglu(dim, hidden = 96)

    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }

  layers      = stack(n_layers) { default: dense }
  norm        = rmsnorm(dim, eps = 1e-6)
  output_head = lm_head(dim, vocab_size)
}
"""


def test_geglu_is_the_tanh_gelu_gated_mlp():
    torch.manual_seed(0)
    mlp = GeGLU(8, 24)
    with torch.no_grad():
        mlp.init_weights(0.3, 0.3)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mlp = mlp.double()
    g = x @ mlp.gate_proj.weight.T
    gelu_tanh = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    expected = (gelu_tanh * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.equal(mlp(x), (torch.nn.functional.silu(g) * (x @ mlp.up_proj.weight.T))
                           @ mlp.down_proj.weight.T)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    comp, diags = compile_text(tmp_path_factory.mktemp("geglu"), SPEC, name="tiny_geglu.forge")
    assert comp is not None and diags.error_count == 0
    return comp


def test_a_spec_with_geglu_counts_and_splits_like_a_gated_mlp(compiled):
    graph = compiled.graphs["tiny_geglu"]
    c = cost(graph)
    # two norms, q and o (64 × 64), k and v (2 kv heads × 16 = 32 × 64), three projections
    per_layer = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96
    assert c.params_total == 2 * 128 * 64 + 2 * per_layer + 64
    plan = tp_plan(compiled.models["tiny_geglu"])
    assert plan["layers.*.mlp.gate_proj"] == plan["layers.*.mlp.up_proj"] == "colwise"
    assert plan["layers.*.mlp.down_proj"] == "rowwise"


def _load(tmp_path, files: dict[str, str]):
    pkg = tmp_path / "tiny_geglu"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    spec = importlib.util.spec_from_file_location("tiny_geglu_model", pkg / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_a_geglu_model_equals_hugging_face_llama_with_a_tanh_gelu(compiled, tmp_path):
    files = emit_package(compiled, "tiny_geglu")
    assert "class GeGLU" in files["model.py"] and "class SwiGLU" not in files["model.py"]
    assert "zero_init" not in files["model.py"]  # no spec component starts at zero
    config = hf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, hidden_act="gelu_pytorch_tanh",
                            initializer_range=0.15, rms_norm_eps=1e-6)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "hf")
    torch.manual_seed(1)  # every weight must come from the checkpoint
    model = _load(tmp_path, files).Transformer().eval()
    load_hf_checkpoint(model, tmp_path / "hf")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-5)
