"""State-space hybrids: Jamba's and Mamba-2's caches, training, size and plans.

Their parity with `transformers` (logits, greedy decoding with the caches, the round
trip through `save_hf_checkpoint`) is tested on imported specs in
tests/test_parity_hf.py. Here the committed `generated.jamba_debug` package (4 layers —
Mamba, Mamba + experts, attention without positions, Mamba + experts), filled from a
tiny random `JambaForCausalLM` through `runtime.hf.load_hf_checkpoint`, checks:

* each layer holds the cache of its mixer (`make_kv_caches`: a `MambaCache` for a
  Mamba layer, a `KVCache` for attention);
* cached decoding, a chunk at a time, equals the full forward (within 1e-4: the
  logits are of size ~5 and the chunks regroup the fp32 sums); the same for
  `specs/mamba2_debug.forge` (the SSD mixer, its scan chunked by 8 positions);
* `generate` decodes a hybrid, eagerly and with the compiled static decode step.

`specs/jamba.forge` is transformers' default JambaConfig: its parameter count is
51,570,323,328 as `JambaForCausalLM(JambaConfig())` counts it on the meta device.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from conftest import ROOT, THREADS, codes, compile_text

from forgec.compiler.cost import cost
from forgec.compiler.driver import compile_spec
from forgec.runtime.generate import generate
from forgec.runtime.hf import load_hf_checkpoint
from generated.jamba_debug import model as jamba_debug
from generated.mamba2_debug import model as mamba2_debug

PROMPT, NEW = 20, 32
# specs/jamba_debug.forge as a JambaConfig
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4,
              num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
              expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16,
              mamba_d_conv=4, mamba_expand=2, rms_norm_eps=1e-6,
              max_position_embeddings=256, use_mamba_kernels=False,
              tie_word_embeddings=False, initializer_range=0.15)  # 0.15: see test_parity_hf


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF Jamba, the forgec model with its weights, the HF folder)."""
    tmp = tmp_path_factory.mktemp("jamba")
    config = hf.JambaConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.JambaForCausalLM(config).eval()
    with torch.no_grad():  # HF starts its norms at one: move them, so a swapped norm shows
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp / "hf")
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = jamba_debug.Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, tmp


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (batch, n), generator=g)





@torch.no_grad()
def _greedy_forgec(model, prompt: torch.Tensor, n: int) -> list[int]:
    caches = model.make_kv_caches(1, prompt.shape[1] + n)
    x, tokens = prompt, []
    for _ in range(n):
        x = model(x, kv_caches=caches)[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(x))
    return tokens



def test_each_layer_holds_the_cache_of_its_mixer(pair):
    _, model, _ = pair
    caches = model.make_kv_caches(2, 16)
    assert [type(c).__name__ for c in caches] == ["MambaCache", "MambaCache", "KVCache",
                                                 "MambaCache"]
    state = caches[0]  # the last conv - 1 inputs and the state, whatever the length
    assert tuple(state.conv_state.shape) == (2, 128, 3)
    assert tuple(state.ssm_state.shape) == (2, 128, 16)


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(pair):
    _, model, _ = pair
    ids = _tokens(24, 2, seed=5)
    full = model(ids)
    caches = model.make_kv_caches(2, 24)
    # a prompt, a chunk of several positions, then one at a time
    parts = [model(ids[:, :10], kv_caches=caches), model(ids[:, 10:15], kv_caches=caches)]
    parts += [model(ids[:, t : t + 1], kv_caches=caches) for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)
    assert all(c.length == 24 for c in caches)



def test_the_debug_spec_trains():
    torch.manual_seed(0)
    model = jamba_debug.Transformer()
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


def test_jamba_has_the_default_jamba_config_parameter_count():
    # transformers: sum(p.numel() for p in JambaForCausalLM(JambaConfig()).parameters())
    # on the meta device (transformers 5.24)
    c = cost(compile_spec(str(ROOT / "specs" / "jamba.forge")).graphs["jamba"])
    assert c.params_total == 51_570_323_328
    # per token: 4 attention layers' keys and values (8 KV heads × 128, bf16); per
    # sequence: 28 Mamba layers' convolution inputs (3 × 8192) and states (16 × 8192)
    assert c.kv_bytes_per_token == 4 * 2 * 8 * 128 * 2
    assert c.state_bytes_per_seq == 28 * 8192 * (3 + 16) * 2


def test_tensor_parallelism_over_mamba_is_a_located_error(tmp_path):
    specs = {name: (ROOT / "specs" / name).read_text() for name in ("jamba.forge",
                                                                    "jamba_debug.forge")}
    _, diags = compile_text(tmp_path, """\
        import "jamba_debug.forge"

        plan tp2 for jamba_debug {
          mesh(tp = 2)
        }
        """, extra=specs)
    assert ("E161", 4, 8) in codes(diags)
    error = next(d for d in diags.sorted() if d.code == "E161")
    assert "mamba 'mamba'" in error.message and "fsdp" in error.message


# specs/mamba2_debug.forge as a Mamba2Config
MAMBA2 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
              expand=2, state_size=16, n_groups=2, chunk_size=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mamba2_pair(tmp_path_factory):
    """(HF Mamba-2, the forgec model with its weights, the HF folder)."""
    tmp = tmp_path_factory.mktemp("mamba2")
    torch.manual_seed(0)
    ref = hf.Mamba2ForCausalLM(hf.Mamba2Config(**MAMBA2)).eval()
    with torch.no_grad():  # away from HF's init (norms at one, D at one, ...)
        for p in ref.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp / "hf")
    torch.manual_seed(1)
    model = mamba2_debug.Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, tmp




@torch.no_grad()
def test_mamba2_cached_decoding_equals_the_full_forward(mamba2_pair):
    _, model, _ = mamba2_pair
    ids = _tokens(21, 2, seed=5)
    full = model(ids)
    caches = model.make_kv_caches(2, 21)
    assert [type(c).__name__ for c in caches] == ["Mamba2Cache"] * 2
    assert tuple(caches[0].ssm_state.shape) == (2, 8, 16, 16)
    parts = [model(ids[:, :11], kv_caches=caches)]  # two chunks, then one position at a time
    parts += [model(ids[:, t : t + 1], kv_caches=caches) for t in range(11, 21)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)



def test_generate_decodes_a_hybrid_eagerly_and_compiled(pair, monkeypatch):
    # compiled: the recurrent states in StaticStateCaches beside the attention's
    # StaticKVCache (aot_eager: the graph inductor would compile, cheaply)
    from forgec.runtime.parallel import COMPILE_BACKEND_ENV

    _, model, _ = pair
    prompt = _tokens(PROMPT, 1, seed=3)[0].tolist()
    eager = generate(model, [prompt], 8, eos_id=None)
    assert eager == [_greedy_forgec(model, torch.tensor([prompt]), 8)]
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    try:
        assert generate(model, [prompt], 8, eos_id=None, compile=True) == eager
    finally:
        torch._dynamo.reset()
