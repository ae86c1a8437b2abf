"""Packed documents in training: DocumentMask (compiler/ops/attention) confines
attention to each document without a (B, 1, S, S) mask — per-document SDPA on
the CPU, a FlexAttention BlockMask on a GPU — and gives the logits and
gradients of the boolean-mask path."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import spec_variant

from forgec.compiler.ops.attention.modules import DocumentMask

# documents of different lengths, cut differently in each row: a one-token
# document, a document of a whole row, documents longer than qwen_debug's window
DOC_IDS = torch.tensor([
    [0] * 5 + [1] * 1 + [2] * 20 + [3] * 14,
    [0] * 5 + [1] * 1 + [2] * 20 + [3] * 14,  # the same cuts: shares the first row's calls
    [0] * 40,
    [0] * 23 + [1] * 17,
])


def model_module(name: str):
    return importlib.import_module(f"generated.{name}.model")


def long_module(name: str):
    """A committed debug model whose sequences reach 512 tokens: there (from
    DOCUMENT_SPANS_FROM) packed documents attend span by span; the debug specs'
    128 or 256 tokens take the boolean mask, which is faster at those lengths."""
    return spec_variant(name, max_seq_len=512)


def boolean_mask(doc_ids: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """What the (B, 1, S, S) mask of the mask path says."""
    s = doc_ids.shape[1]
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if causal:
        allowed = allowed & (k <= q)
    if window:
        allowed = allowed & (q - k < window)
    return allowed


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("flex", [False, True], ids=["segments", "flex"])
@pytest.mark.parametrize("causal, window", [(True, 0), (True, 8), (False, 0)])
def test_document_attention_equals_the_boolean_mask(flex, causal, window):
    """Both paths, the per-document SDPA of the CPU and the FlexAttention block
    mask of the GPU (its forward runs on the CPU too), with grouped KV heads."""
    torch.manual_seed(0)
    b, s = DOC_IDS.shape
    q = torch.randn(b, 4, s, 16)
    k, v = torch.randn(b, 2, s, 16), torch.randn(b, 2, s, 16)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=boolean_mask(DOC_IDS, causal, window),
                                         enable_gqa=True)
    mask = DocumentMask(DOC_IDS, causal=causal, window=window, flex=flex)
    assert (mask.block_mask is not None) == flex
    with torch.no_grad():
        out = mask.attend(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_rows_with_the_same_documents_share_calls():
    mask = DocumentMask(DOC_IDS)
    assert mask.groups == [(0, 2, [(0, 5), (5, 6), (6, 26), (26, 40)]), (2, 3, [(0, 40)]),
                           (3, 4, [(0, 23), (23, 40)])]


def test_training_masks_hold_no_boolean_mask():
    """With doc_ids and neither cache nor padding, attention_masks gives each kind
    of attention a DocumentMask; with padding it is the boolean mask as before."""
    mod = long_module("qwen_debug")
    masks = mod.attention_masks(4, 40, doc_ids=DOC_IDS, config=mod.ModelConfig())
    assert set(masks) == {"causal", "causal_w16"}
    assert all(isinstance(m, mod.DocumentMask) for m in masks.values())
    assert masks["causal_w16"].window == 16 and masks["causal"].window == 0
    padded = mod.attention_masks(4, 40, doc_ids=DOC_IDS, key_valid=torch.ones(4, 40, dtype=bool))
    assert padded["causal"].shape == (4, 1, 40, 40)


def forward_both_ways(name: str, monkeypatch, grad: bool = False):
    """The model's logits (and gradients) with packed documents: DocumentMask,
    then the boolean (B, 1, S, S) masks of the mask path."""
    mod = long_module(name)
    torch.manual_seed(0)
    model = mod.Transformer()
    tokens = torch.randint(0, model.config.vocab_size, DOC_IDS.shape)
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            logits = model(tokens, doc_ids=DOC_IDS)
            if grad:
                (logits.square().mean() + model.get_moe_aux_loss()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
        original = mod.attention_masks

        def boolean_masks(b, s, *, doc_ids=None, key_valid=None, original=original, **kw):
            if doc_ids is not None and key_valid is None:  # the mask path, all keys valid
                key_valid = torch.ones(b, s, dtype=torch.bool)
            masks = original(b, s, doc_ids=doc_ids, key_valid=key_valid, **kw)
            assert all(m.shape == (b, 1, s, s) for m in masks.values())
            return masks

        monkeypatch.setattr(mod, "attention_masks", boolean_masks)
    return results


@pytest.mark.parametrize("name", ["llama_debug", "qwen_debug", "gptj_debug", "moe_debug"])
def test_packed_logits_equal_the_mask_path(name, monkeypatch):
    (fast, _), (slow, _) = forward_both_ways(name, monkeypatch)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_mask_path(monkeypatch):
    (fast, grads), (slow, slow_grads) = forward_both_ways("qwen_debug", monkeypatch, grad=True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert grads.keys() == slow_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mixture_of_transformers_attention_reads_document_masks(monkeypatch):
    """vlm_mot's decoder attends over every modality's tokens in one softmax
    (mot_attention): the same DocumentMask path."""
    (fast, _), (slow, _) = forward_both_ways("vlm_mot", monkeypatch)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_spans_only_where_sequences_reach_512_tokens():
    """Below DOCUMENT_SPANS_FROM the model has no DocumentMask: packed documents in
    training take the boolean mask of their doc_ids."""
    assert not hasattr(spec_variant("llama_debug", max_seq_len=511), "DocumentMask")
    assert hasattr(long_module("llama_debug"), "DocumentMask")
    mod = model_module("llama_debug")  # max_seq_len 256
    assert not hasattr(mod, "DocumentMask")
    masks = mod.attention_masks(4, 40, doc_ids=DOC_IDS)
    assert torch.equal(masks["causal"], boolean_mask(DOC_IDS, causal=True, window=0))
