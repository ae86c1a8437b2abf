"""The fused, chunked head + cross-entropy of training (OutputHead with targets,
Transformer.forward(..., targets=...)) against the plain path: full logits, then
F.cross_entropy. Loss and gradients agree within 1e-5."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import spec_variant

from forgec.compiler.ops.embedding.modules import IGNORE_INDEX, LinearCrossEntropy, OutputHead
from forgec.runtime.data import IGNORE_INDEX as RUNTIME_IGNORE_INDEX
from forgec.runtime.loop import TextTask, accumulate_batch, cross_entropy_sum, router_loss


def model_module(name: str):
    return importlib.import_module(f"generated.{name}.model")


def wide_module(name: str):
    """A committed debug model with a vocabulary wide enough (1024 tokens, over 4 times
    its width) that its head fuses the loss: the debug specs' 256 tokens do not."""
    return spec_variant(name, vocab_size=1024)


def plain_loss(head: OutputHead, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x).float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def test_ignore_index_is_the_runtimes():
    assert IGNORE_INDEX == RUNTIME_IGNORE_INDEX == -100


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])  # one row, uneven, even, one chunk
def test_chunked_loss_and_gradients_equal_the_plain_path(bias, chunk):
    torch.manual_seed(0)
    head = OutputHead(24, 97, bias=bias)
    if bias:
        torch.nn.init.normal_(head.proj.bias)
    x = torch.randn(3, 16, 24, requires_grad=True)
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = IGNORE_INDEX  # prompt positions of instruction tuning, say
    targets[2, -1] = IGNORE_INDEX
    inputs = [x, *head.parameters()]
    ref = plain_loss(head, x, targets)
    fused = LinearCrossEntropy.apply(x.flatten(0, 1), head.proj.weight, head.proj.bias,
                                     targets.flatten(), chunk)
    assert fused.dtype == torch.float32 and fused.shape == ()
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-5 * ref.item())
    # the incoming gradient scales all of them (the loop divides by the target count)
    for want, got in zip(grads_of(ref * 0.37, inputs), grads_of(fused * 0.37, inputs), strict=True):
        assert (want - got).abs().max() < 1e-5


def test_kept_graph_backward_leaves_the_saved_gradients_unscaled():
    """A pipeline schedule's split backward (zero-bubble schedules) differentiates
    the loss for the inputs with the graph kept, then again for the weights: the
    first call must not scale what the second one reads (in place it did, and
    autograd raised 'modified by an inplace operation')."""
    torch.manual_seed(0)
    head = OutputHead(24, 97, bias=True)
    x = torch.randn(40, 24, requires_grad=True)
    targets = torch.randint(0, 97, (40,))
    weights = list(head.parameters())
    ref = plain_loss(head, x[None], targets[None]) * 0.37
    fused = LinearCrossEntropy.apply(x, *weights, targets, 16) * 0.37
    got = [*torch.autograd.grad(fused, [x], retain_graph=True),
           *torch.autograd.grad(fused, weights)]
    for want, have in zip(grads_of(ref, [x, *weights]), got, strict=True):
        assert (want - have).abs().max() < 1e-5


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    head = OutputHead(8, 11)
    x = torch.randn(2, 3, 8, requires_grad=True)
    loss = head(x, torch.full((2, 3), IGNORE_INDEX))
    loss.backward()
    assert float(loss) == 0.0
    assert not x.grad.any() and not head.proj.weight.grad.any()


def test_head_forward_with_targets_checks_their_shape():
    head = OutputHead(8, 11)
    with pytest.raises(ValueError, match=r"targets have shape \(2, 4\), expected \(2, 3\)"):
        head(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))


def test_chunk_bounds_the_logits_held_at_once():
    """The forward never builds an (N, vocab) tensor: record the largest matmul output."""
    torch.manual_seed(0)
    head = OutputHead(16, 64)
    x = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 64, (40,))
    largest = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.linear:
                largest.append(out.shape)
            return out

    with Watch():
        LinearCrossEntropy.apply(x, head.proj.weight, None, targets, 8).backward()
    assert largest and all(shape == (8, 64) for shape in largest)


@pytest.mark.parametrize("name", ["llama_debug", "qwen_debug", "moe_debug", "gptj_debug"])
def test_model_loss_and_gradients_equal_the_plain_path(name):
    """The model's training entry point: the step's loss (cross-entropy over the
    trained targets plus the MoE router losses) and every parameter's gradient
    equal those of the full logits. qwen_debug ties its head to the embedding."""
    mod = wide_module(name)
    torch.manual_seed(0)
    model = mod.Transformer()
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 24))
    targets = torch.randint(0, vocab, (2, 24))
    targets[:, :4] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(tokens, doc_ids=doc_ids)
    ref = cross_entropy_sum(logits, targets) / 40 + router_loss(model)
    fused = model(tokens, doc_ids=doc_ids, targets=targets) / 40 + router_loss(model)
    assert abs(float(fused) - float(ref)) < 1e-5
    want, got = grads_of(ref, params), grads_of(fused, params)
    for (pname, _), a, b in zip(model.named_parameters(), want, got, strict=True):
        assert (a - b).abs().max() < 1e-5, pname


def test_training_step_uses_the_fused_loss(monkeypatch):
    """accumulate_batch (every trainer's step) calls the model with targets and
    never asks it for logits, and its loss is the plain path's."""
    mod = wide_module("llama_debug")
    torch.manual_seed(0)
    model = mod.Transformer()
    tokens = torch.randint(0, 256, (4, 16))
    targets = torch.randint(0, 256, (4, 16))
    targets[0] = IGNORE_INDEX
    doc_ids = torch.zeros(4, 16, dtype=torch.long)
    with torch.no_grad():
        ref = cross_entropy_sum(model(tokens), targets) / 48
    heads = []
    original = type(model.output_head).forward

    def spy(self, x, targets=None):
        heads.append(targets is not None)
        return original(self, x, targets)

    monkeypatch.setattr(type(model.output_head), "forward", spy)
    loss = accumulate_batch(model, TextTask(None), (tokens, targets, doc_ids), grad_accum=2)
    assert heads == [True, True]
    assert abs(float(loss) - float(ref)) < 1e-5


def test_bf16_autocast_follows_the_plain_path():
    """Under bf16 autocast the head's matmuls run in bf16 as nn.Linear's would,
    the softmax in fp32: the loss agrees with the plain path to bf16 rounding."""
    mod = wide_module("llama_debug")
    torch.manual_seed(0)
    model = mod.Transformer()
    tokens = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = cross_entropy_sum(model(tokens), targets)
        fused = model(tokens, targets=targets)
    assert fused.dtype == torch.float32
    assert abs(float(fused) - float(ref)) < 1e-3 * float(ref)
    gx = grads_of(fused, [model.token_embedding.embedding.weight])[0]
    gr = grads_of(ref, [model.token_embedding.embedding.weight])[0]
    assert torch.allclose(gx, gr, rtol=0.05, atol=1e-4)


def test_targets_need_the_output_head():
    mod = model_module("llama_debug")
    model = mod.Transformer()
    model.output_head = None  # a pipeline stage before the last
    with pytest.raises(ValueError, match="targets need the output head"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))



def test_head_weight_gradient_is_not_copied():
    """The forward computes the head's weight gradient; backward scales it in place
    and AccumulateGrad takes that very tensor as .grad (no second vocab × dim copy)."""
    torch.manual_seed(0)
    head = OutputHead(16, 100)
    loss = head(torch.randn(2, 8, 16, requires_grad=True), torch.randint(0, 100, (2, 8)))
    assert loss.grad_fn.saved_tensors[1].shape == head.proj.weight.shape
    saved = loss.grad_fn.saved_tensors[1].data_ptr()  # no reference kept: it would force a copy
    (loss * 0.5).backward()
    assert head.proj.weight.grad.data_ptr() == saved


def test_the_head_fuses_its_loss_only_where_the_vocabulary_is_over_four_times_wider():
    """The compiler emits the fused head where the vocabulary is wider than 4 × dim
    (FUSED_LOSS_WIDTH); llama_debug's 256 tokens at width 128 train through full logits
    and F.cross_entropy: the loss and gradients of the plain path, bit for bit."""
    assert not hasattr(spec_variant("llama_debug", vocab_size=512), "LinearCrossEntropy")
    assert hasattr(spec_variant("llama_debug", vocab_size=513), "LinearCrossEntropy")
    mod = model_module("llama_debug")
    assert not hasattr(mod, "LinearCrossEntropy")
    torch.manual_seed(0)
    model = mod.Transformer()
    tokens = torch.randint(0, 256, (2, 24))
    targets = torch.randint(0, 256, (2, 24))
    targets[:, :4] = IGNORE_INDEX
    params = list(model.parameters())
    ref = cross_entropy_sum(model(tokens), targets)
    loss = model(tokens, targets=targets)
    assert torch.equal(loss, ref)
    for want, got in zip(grads_of(ref, params), grads_of(loss, params), strict=True):
        assert torch.equal(want, got)
    with pytest.raises(ValueError, match=r"targets have shape \(2, 23\), expected \(2, 24\)"):
        model(tokens, targets=targets[:, 1:])
