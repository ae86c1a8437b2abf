"""What the generated models compute: goldens, caches, masks, init, FQNs, compile."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

GOLDEN = json.loads((Path(__file__).parent / "golden" / "logits.json").read_text())
DEBUG = ("llama_debug", "qwen_debug", "gptj_debug")


def load(name: str):
    return importlib.import_module(f"generated.{name}.model")


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return load(name).Transformer().eval()


def tokens(shape, seed=1, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # bit-stable reductions across machines


@pytest.mark.parametrize("name", DEBUG)
def test_logits_match_the_committed_goldens(name):
    model = build(name)
    with torch.no_grad():
        logits = model(tokens((2, 24)))
    golden = GOLDEN[name]
    torch.testing.assert_close(logits[0, :6, :8], torch.tensor(golden["slice"]), rtol=0, atol=1e-5)
    assert math.isclose(float(logits.abs().mean()), golden["mean_abs"], rel_tol=1e-5)


@pytest.mark.parametrize("name", DEBUG)
def test_meta_build_then_init_equals_eager_build(name):
    eager = build(name, seed=3)
    with torch.device("meta"):
        meta = load(name).Transformer()
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights_and_freqs()
    a, b = eager.state_dict(), meta.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # initialising again changes nothing
    meta.init_weights_and_freqs()
    assert all(torch.equal(a[k], meta.state_dict()[k]) for k in a)


@pytest.mark.parametrize("name", ["qwen_debug", "moe_debug"])
def test_models_of_several_block_kinds_copy_and_pickle(name):
    """TransformerBlock(config, i) picks layer i's block class; a copy (the
    distributed trainer copies the model once per local pipeline stage) and a
    pickle re-create each block as its own class with the same weights."""
    import copy
    import pickle

    model = build(name)
    x = tokens((1, 12))
    with torch.no_grad():
        want = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [type(b) for b in clone.layers.values()] == \
            [type(b) for b in model.layers.values()]
        assert len({type(b) for b in clone.layers.values()}) > 1
        with torch.no_grad():
            assert torch.equal(clone(x), want)


def test_packed_sequence_longer_than_the_model_is_refused_by_its_length():
    """Without a cache the length bounds every position (a shape check, so the
    forward also runs on the meta device); with one, the cache's contents do."""
    model = build("qwen_debug")
    x = tokens((1, 129))
    doc_ids = torch.zeros(1, 129, dtype=torch.long)
    with pytest.raises(ValueError, match="^sequence length 129 exceeds max_seq_len 128$"):
        model(x, doc_ids=doc_ids)
    with torch.device("meta"):
        meta = load("qwen_debug").Transformer()
    meta.rope_cos, meta.rope_sin = load("qwen_debug").rope_tables(128, device="meta")
    out = meta(torch.zeros(2, 128, dtype=torch.long, device="meta"),
               doc_ids=torch.zeros(2, 128, dtype=torch.long, device="meta"))
    assert out.shape == (2, 128, 256)


def test_llama_debug_parameter_names_follow_the_reference():
    model = build("llama_debug")
    names = set(dict(model.named_parameters()))
    expected = {"token_embedding.embedding.weight", "norm.weight", "output_head.proj.weight"}
    for i in range(4):
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.mlp_norm.weight"}
        expected |= {f"layers.{i}.attention.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    assert sum(p.numel() for p in model.parameters()) == 853_120
    assert list(model.layers) == ["0", "1", "2", "3"]


def test_qwen_debug_has_qk_norm_biases_and_a_tied_head():
    model = build("qwen_debug")
    sd = model.state_dict()
    assert "layers.0.attention.q_norm.weight" in sd and "layers.3.attention.k_proj.bias" in sd
    assert model.output_head.proj.weight is model.token_embedding.embedding.weight
    assert sd["layers.0.attention.q_proj.weight"].shape == (4 * 32, 96)  # heads·head_dim ≠ dim
    assert type(model.layers["0"]).__name__ == "LocalBlock"
    assert type(model.layers["1"]).__name__ == "GlobalBlock"
    # the tie survives a meta build
    with torch.device("meta"):
        meta = load("qwen_debug").Transformer()
    meta.to_empty(device="cpu")
    meta.init_weights_and_freqs()
    assert meta.output_head.proj.weight is meta.token_embedding.embedding.weight


@pytest.mark.parametrize("name", DEBUG)
def test_cached_decode_equals_the_full_forward(name):
    model = build(name)
    x = tokens((2, 40))  # longer than qwen_debug's 16-token window
    with torch.no_grad():
        full = model(x)
        caches = model.make_kv_caches(2, 64)
        steps = [model(x[:, :13], kv_caches=caches)]
        steps += [model(x[:, t : t + 1], kv_caches=caches) for t in range(13, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_left_padded_batch_equals_each_prompt_alone():
    model = build("llama_debug")
    long, short = tokens((1, 12), seed=5), tokens((1, 7), seed=6)
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = long[0], short[0]
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :5] = False
    mod = load("llama_debug")
    with torch.no_grad():
        out = model(batch, modality=mod.ModalityContext(key_padding_mask=pad))
        torch.testing.assert_close(out[0], model(long)[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(out[1, 5:], model(short)[0], rtol=0, atol=2e-5)
        # and decoding after the padded prefill continues each row correctly
        caches = model.make_kv_caches(2, 20)
        model(batch, modality=mod.ModalityContext(key_padding_mask=pad), kv_caches=caches)
        nxt = tokens((2, 1), seed=7)
        step = model(nxt, kv_caches=caches)
        alone = model(torch.cat([short, nxt[1:]], dim=1))
    torch.testing.assert_close(step[1, 0], alone[0, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["llama_debug", "qwen_debug"])
def test_packed_documents_do_not_see_each_other(name):
    model = build(name)
    x = tokens((2, 30))
    doc = torch.tensor([[0] * 10 + [1] * 12 + [2] * 8] * 2)
    y = x.clone()
    y[:, :10] = tokens((2, 10), seed=9)  # change document 0 only
    with torch.no_grad():
        a, b = model(x, doc_ids=doc), model(y, doc_ids=doc)
    torch.testing.assert_close(a[:, 10:], b[:, 10:], rtol=0, atol=0)
    assert not torch.allclose(a[:, :10], b[:, :10])


def test_doc_restart_gives_each_document_its_own_positions():
    # qwen_debug restarts RoPE positions per document: a packed document's logits
    # equal the logits of that document alone
    model = build("qwen_debug")
    x = tokens((1, 30))
    doc = torch.tensor([[0] * 10 + [1] * 20])
    with torch.no_grad():
        packed = model(x, doc_ids=doc)
        alone = model(x[:, 10:])
    torch.testing.assert_close(packed[:, 10:], alone, rtol=0, atol=2e-5)
    cos, _ = model._rope(1, 30, x.device, None, doc, None)
    expected = torch.cat([torch.arange(10), torch.arange(20)])
    assert torch.equal(cos[0], model.rope_cos[expected])
    # llama_debug keeps one position sequence across documents
    llama = build("llama_debug")
    cos, _ = llama._rope(1, 30, x.device, None, None)
    assert torch.equal(cos[0], llama.rope_cos[:30])


def test_sliding_window_block_ignores_tokens_outside_the_window():
    model = build("qwen_debug")
    block = model.layers["0"]  # a `local` block, window 16
    h = torch.randn(1, 40, 96)
    h2 = h.clone()
    h2[:, :5] = torch.randn(1, 5, 96)
    cos, sin = model.rope_cos[None, :40], model.rope_sin[None, :40]
    with torch.no_grad():
        a, b = block(h, cos, sin), block(h2, cos, sin)
    # position t sees t-15..t: positions ≥ 20 cannot see 0..4
    torch.testing.assert_close(a[:, 20:], b[:, 20:], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:20], b[:, 5:20])


def _reference_attention(att, x, cos, sin, window=0):
    """Attention written out by hand: repeat KV heads, explicit softmax."""
    b, s, _ = x.shape
    q = att.q_proj(x).view(b, s, att.heads, att.head_dim)
    k = att.k_proj(x).view(b, s, att.kv_heads, att.head_dim)
    v = att.v_proj(x).view(b, s, att.kv_heads, att.head_dim)
    if getattr(att, "q_norm", None) is not None:
        q, k = att.q_norm(q), att.k_norm(k)
    rot = cos.shape[-1]

    def rope(t):
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        half = rot // 2
        rotated = torch.cat([-t_rot[..., half:], t_rot[..., :half]], dim=-1)
        c, s_ = cos[:, :, None, :], sin[:, :, None, :]
        return torch.cat([t_rot * c + rotated * s_, t_pass], dim=-1)

    q, k = rope(q), rope(k)
    groups = att.heads // att.kv_heads
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(att.head_dim)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, -1)
    return att.o_proj(out)


@pytest.mark.parametrize("name, layer, window", [("llama_debug", "0", 0), ("qwen_debug", "0", 16),
                                                  ("qwen_debug", "1", 0), ("gptj_debug", "0", 0)])
def test_attention_equals_a_hand_written_reference(name, layer, window):
    model = build(name)
    block = model.layers[layer]
    att = block.attention if hasattr(block, "attention") else block.a
    x = torch.randn(2, 24, att.q_proj.in_features)
    cos, sin = model.rope_cos[None, :24], model.rope_sin[None, :24]
    key = f"causal_w{window}" if window else "causal"
    mask = load(name).attention_masks(2, 24, doc_ids=torch.zeros(2, 24, dtype=torch.long))[key]
    with torch.no_grad():
        ours = att(x, cos, sin, mask)
        ours_fast = att(x, cos, sin, None) if not window else ours
        ref = _reference_attention(att, x, cos, sin, window)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_fast, ref, rtol=0, atol=1e-5)


def test_partial_rotary_rotates_only_the_first_channels():
    mod = load("gptj_debug")
    model = build("gptj_debug")
    x = torch.randn(1, 8, 4, 16)
    out = mod.apply_rope(x, model.rope_cos[None, :8], model.rope_sin[None, :8])
    assert model.rope_cos.shape == (128, 4)
    torch.testing.assert_close(out[..., 4:], x[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1:, :, :4], x[:, 1:, :, :4])


def test_rope_tables_are_fp32_and_survive_a_dtype_cast():
    model = build("llama_debug").to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert "rope_cos" not in model.state_dict()
    out = model(tokens((1, 8)))
    assert out.dtype == torch.bfloat16


def test_init_follows_the_spec():
    llama = build("llama_debug", seed=0)  # depth-scaled: o_proj/down_proj std 0.02/sqrt(8)
    std = llama.layers["0"].attention.o_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.05 * 0.02 / math.sqrt(8)
    assert abs(llama.layers["0"].attention.q_proj.weight.std().item() - 0.02) < 0.001
    assert torch.equal(llama.norm.weight, torch.ones(128))
    gptj = build("gptj_debug")  # init_depth_scaled = false
    assert abs(gptj.layers["0"].f.down_proj.weight.std().item() - 0.02) < 0.001
    assert torch.equal(gptj.layers["0"].f.up_proj.bias, torch.zeros(256))


def test_config_other_than_the_spec_is_refused():
    mod = load("llama_debug")
    with pytest.raises(ValueError, match=r"dim=64 \(spec: 128\)"):
        mod.Transformer(mod.ModelConfig(dim=64))
    with pytest.raises(ValueError, match="text-only"):
        mod.Transformer(num_image_tokens=4)


def test_pipeline_stage_without_embedding_and_head_passes_hidden_states():
    model = build("llama_debug")
    x = tokens((2, 8))
    with torch.no_grad():
        full = model(x)
        hidden = model.token_embedding(x)
        model.token_embedding = None
        model.output_head = None
        out = model(hidden)
    assert out.shape == (2, 8, 128)
    model.output_head = build("llama_debug").output_head
    torch.testing.assert_close(model.output_head(out), full, rtol=0, atol=1e-6)


def test_training_step_gives_finite_gradients_everywhere():
    model = build("qwen_debug").train()
    x = tokens((2, 20))
    doc = torch.tensor([[0] * 8 + [1] * 12] * 2)
    logits = model(x, doc_ids=doc)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_block_compiles_without_graph_breaks():
    model = build("llama_debug")
    block = model.layers["0"]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    h = torch.randn(2, 16, 128)
    cos, sin = model.rope_cos[None, :16], model.rope_sin[None, :16]
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, cos, sin), block(h, cos, sin), rtol=0, atol=1e-6)
