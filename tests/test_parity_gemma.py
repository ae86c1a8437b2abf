"""Gemma's new paths, on their own and in the committed example.

The parity of Gemma, Gemma 2 and Gemma 3 (text) with transformers — logits within
1e-5, greedy decoding with the KV cache, a round trip through save_hf_checkpoint —
is tested on the specs `forgec import-hf` writes, in tests/test_parity_hf.py
(families gemma, gemma2, gemma3). Here: the soft-capped head's fused loss, soft-capped
attention and sinks on packed documents, and specs/gemma2_debug.forge decoding with
its cache and training.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from forgec.compiler.ops.attention.modules import Attention, DocumentMask
from forgec.compiler.ops.embedding.modules import OutputHead

# ---- the new paths of the op modules, on their own --------------------------------------


def test_softcapped_fused_loss_equals_autograd_through_the_cap():
    torch.manual_seed(0)
    head = OutputHead(16, 40, softcap=3.0)
    head.init_weights(0.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 7))
    targets[0, 2] = -100  # not trained on
    loss = head(x, targets)
    gx, gw = torch.autograd.grad(loss, (x, head.proj.weight))
    logits = head(x)
    assert logits.abs().max() < 3.0  # capped
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    rx, rw = torch.autograd.grad(ref, (x, head.proj.weight))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("kind, window", [({"softcap": 5.0}, 0), ({"sinks": True}, 0),
                                          ({"softcap": 5.0}, 2), ({"sinks": True}, 2)])
def test_explicitly_scored_attention_on_packed_documents_attends_within_each(kind, window):
    """Soft-capped scores and sinks cannot go through SDPA: on packed documents
    (a DocumentMask, sliding-window or not) such attention takes the documents'
    boolean mask, and each document's output is that of the document alone."""
    torch.manual_seed(0)
    attn = Attention(16, 2, use_rope=False, **kind)
    attn.init_weights(0.5, 0.5)
    x = torch.randn(2, 7, 16)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])

    def alone(part: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(part.shape[1])
        keep = pos[None, :] <= pos[:, None]
        if window:
            keep = keep & (pos[:, None] - pos[None, :] < window)
        return attn(part, None, None, keep[None, None])

    for flex in (False, True):
        packed = attn(x, None, None, DocumentMask(doc_ids, window=window, flex=flex))
        for row in range(2):
            cut = int((doc_ids[row] == 0).sum())
            want = torch.cat([alone(x[row:row + 1, :cut]), alone(x[row:row + 1, cut:])], dim=1)
            torch.testing.assert_close(packed[row:row + 1], want, rtol=1e-5, atol=1e-6)


# ---- the committed example, specs/gemma2_debug.forge ------------------------------------


def _gemma2_debug(seed: int = 0):
    torch.manual_seed(seed)
    return importlib.import_module("generated.gemma2_debug.model").Transformer()


def test_gemma2_debug_decodes_with_the_cache_as_the_full_forward():
    model = _gemma2_debug().eval()
    x = torch.randint(0, 256, (2, 76), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 76 tokens: past the 64-token window of the local layers
        full = model(x)
        caches = model.make_kv_caches(2, 80)
        steps = [model(x[:, :60], kv_caches=caches)]
        steps += [model(x[:, t : t + 1], kv_caches=caches) for t in range(60, 76)]
    assert full.abs().max() < 30.0  # the soft-capped logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_gemma2_debug_trains():
    model = _gemma2_debug().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(4):
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1, losses
