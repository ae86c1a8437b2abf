"""PhiMoE's sparsemixer router against transformers' own `sparsemixer` function.

Evaluation: the same two experts and weights for random logits (a window wide enough
to hold several experts). Training: where each pick's window holds one expert the
Gumbel sample is that expert and the midpoint factor 1, so the forward values and the
gradient sparsemixer estimates for the logits are deterministic: both agree with
transformers'. The importer side (PhiMoE → spec → logits) is tests/test_parity_hf.py.
"""

from __future__ import annotations

import torch
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from forgec.compiler.ops.moe.modules import SparseMixer


def _router(logits_weight: torch.Tensor, jitter_eps: float) -> SparseMixer:
    experts, dim = logits_weight.shape
    router = SparseMixer(dim, experts, 2, jitter_eps=jitter_eps, aux_loss_weight=0.01)
    with torch.no_grad():
        router.weight.copy_(logits_weight)
    return router


def test_evaluation_picks_and_weights_match_transformers():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    router = _router(w, jitter_eps=0.3).eval()
    weights, ids = router(x)
    expected_weights, expected_ids = sparsemixer(x.reshape(-1, 8) @ w.t(), 0.3, False)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)
    assert (weights < 0.99).any()  # some windows held several experts
    assert router.aux_loss is None


def test_training_samples_and_gradient_match_transformers():
    # One seed, the same draws in the same order: the same Gumbel samples for both picks,
    # and for the first pick the same midpoint factor, weight and gradient. (transformers
    # draws the second pick's midpoint twice, forgec once: its factor may differ.)
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 8, generator=g), torch.randn(1, 60, 8, generator=g)
    router = _router(w, jitter_eps=0.3).train()
    torch.manual_seed(2)
    weights, ids = router(x)
    upstream = torch.randn(weights.shape[0], generator=g)
    (weights[:, 0] * upstream).sum().backward()

    logits = (x.reshape(-1, 8) @ w.t()).requires_grad_(True)
    torch.manual_seed(2)
    expected_weights, expected_ids = sparsemixer(logits, 0.3, True)
    (expected_weights[:, 0] * upstream).sum().backward()
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights[:, 0], expected_weights[:, 0], rtol=0, atol=1e-6)
    # the router weight's gradient is the logits' gradient through x
    torch.testing.assert_close(router.weight.grad, logits.grad.t() @ x.reshape(-1, 8),
                               rtol=1e-5, atol=1e-5)
    assert logits.grad.abs().sum() > 1  # sparsemixer's estimate, not zero
    assert (weights[:, 0] < 0.3).any()  # some first picks sampled, scaled by 1/3
    assert router.aux_loss is not None and router.aux_loss > 0


def test_training_samples_within_the_window_only():
    # a wide window: the picks vary with the seed, yet never leave the window, and the
    # two picks of a token differ
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(6, 8, generator=g), torch.randn(1, 200, 8, generator=g)
    router = _router(w, jitter_eps=0.2).train()
    logits = x.reshape(-1, 8) @ w.t()
    best, _ = logits.max(-1, keepdim=True)
    inside = (best - logits) / logits.abs().clamp(min=best) <= 0.4
    torch.manual_seed(4)
    _, first_ids = router(x)
    torch.manual_seed(5)
    _, other_ids = router(x)
    assert not torch.equal(first_ids, other_ids)
    assert inside.gather(1, first_ids[:, :1]).all()
    assert (first_ids[:, 0] != first_ids[:, 1]).all()
