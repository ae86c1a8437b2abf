"""Qwen3-Next: the committed `generated.qwen3_next_debug` package (3 gated DeltaNet
layers, then a gated attention layer; experts with a shared expert on each), filled from
a tiny random `Qwen3NextForCausalLM` through `runtime.hf.load_hf_checkpoint`:

* computes transformers' logits (within 1e-4: the delta rule is a scan, chunked by 8
  here and by 64 in transformers, and the logits are of size ~5);
* each layer holds the cache of its mixer (a `DeltaNetCache` for DeltaNet, a `KVCache`
  for attention), and cached decoding — a prompt over several chunks, a chunk of a few
  positions, then one at a time — equals the full forward;
* trains: four AdamW steps on one batch lower the loss.

The import of Qwen3-Next configs (`forgec import-hf`) and its parity with transformers
(greedy decoding, the save_hf_checkpoint round trip) are in tests/test_parity_hf.py; the
op itself in tests/test_op_gated_deltanet.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from conftest import ROOT, THREADS, codes, compile_text

from forgec.compiler.cost import cost
from forgec.compiler.driver import compile_spec
from forgec.runtime.hf import load_hf_checkpoint
from generated.qwen3_next_debug import model as qwen3_next_debug

# specs/qwen3_next_debug.forge as a Qwen3NextConfig
CONFIG = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, shared_expert_intermediate_size=48,
              intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, initializer_range=0.15)  # 0.15: see test_parity_hf


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF Qwen3-Next, the forgec model with its weights)."""
    tmp = tmp_path_factory.mktemp("qwen3_next")
    config = hf.Qwen3NextConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():  # HF starts its norms at zero (1 + w) or one: move them
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.2)
    ref.save_pretrained(tmp / "hf")
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = qwen3_next_debug.Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def test_the_debug_spec_computes_transformers_logits(pair):
    ref, model = pair
    ids = _tokens(21, 2, seed=2)
    torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-4)


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(pair):
    _, model = pair
    caches = model.make_kv_caches(2, 21)
    assert [type(c).__name__ for c in caches] == ["DeltaNetCache"] * 3 + ["KVCache"]
    assert tuple(caches[0].recurrent_state.shape) == (2, 4, 16, 16)
    assert tuple(caches[0].conv_state.shape) == (2, 2 * 32 + 64, 3)
    ids = _tokens(21, 2, seed=5)
    full = model(ids)
    # a prompt over two chunks, a chunk of a few positions, then one position at a time
    parts = [model(ids[:, :11], kv_caches=caches), model(ids[:, 11:14], kv_caches=caches)]
    parts += [model(ids[:, t : t + 1], kv_caches=caches) for t in range(14, 21)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)
    assert all(c.length == 21 for c in caches)


def test_the_debug_spec_trains():
    torch.manual_seed(0)
    model = qwen3_next_debug.Transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _tokens(17, 2, seed=7)
    losses = []
    for _ in range(4):
        loss = model(ids[:, :-1], targets=ids[:, 1:]) / ids[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_the_debug_spec_has_transformers_parameter_count_and_state():
    c = cost(compile_spec(str(ROOT / "specs" / "qwen3_next_debug.forge"))
             .graphs["qwen3_next_debug"])
    with torch.device("meta"):
        ref = hf.Qwen3NextForCausalLM(hf.Qwen3NextConfig(**CONFIG))
    assert c.params_total == sum(p.numel() for p in ref.parameters())
    # per token: the attention layer's keys and values (2 KV heads × 16, bf16); per
    # sequence: 3 DeltaNet layers' last 3 convolution inputs (2·32 + 64 channels) and
    # states (4 value heads × 16 × 16)
    assert c.kv_bytes_per_token == 2 * 2 * 16 * 2
    assert c.state_bytes_per_seq == 3 * (128 * 3 + 4 * 16 * 16) * 2


def test_tensor_parallelism_over_gated_deltanet_is_a_located_error(tmp_path):
    spec = (ROOT / "specs" / "qwen3_next_debug.forge").read_text()
    _, diags = compile_text(tmp_path, """\
        import "qwen3_next_debug.forge"

        plan tp2 for qwen3_next_debug {
          mesh(tp = 2)
        }
        """, extra={"qwen3_next_debug.forge": spec})
    assert ("E161", 4, 8) in codes(diags)
    error = next(d for d in diags.sorted() if d.code == "E161")
    assert "gated_deltanet 'linear_attn'" in error.message
