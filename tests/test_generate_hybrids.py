"""Recurrent mixers (Mamba, Mamba-2, short convolutions) under left padding: a
left-padded batch computes for each row what the row computes alone, because the
mixers zero the padding's inputs and let no time pass there (`padding` of their
forward, `attn_mask["padding"]` in the generated blocks): Jamba's and Mamba-2's debug
models, and tests/test_op_short_conv.py's hybrid of short convolutions and attention."""

from __future__ import annotations

import importlib

import pytest
import torch

from forgec.runtime.generate import generate

PROMPTS = [list(range(5, 25)), list(range(40, 47)), [9]]  # 20, 7 and 1 tokens


def _tiny_lfm(tmp):
    """tests/test_op_short_conv.py's hybrid of short convolutions and attention."""
    from conftest import compile_text
    from test_op_short_conv import SPEC, _load

    from forgec.compiler.emit import emit_package

    comp, _ = compile_text(tmp, SPEC, name="tiny_lfm.forge")
    return _load(tmp, emit_package(comp, "tiny_lfm"))


@pytest.fixture(scope="module",
                params=["jamba_debug", "mamba2_debug", "qwen3_next_debug", "tiny_lfm"])
def model(request, tmp_path_factory):
    package = (_tiny_lfm(tmp_path_factory.mktemp("lfm")) if request.param == "tiny_lfm"
               else importlib.import_module(f"generated.{request.param}"))
    torch.manual_seed(0)
    model = package.Transformer().eval()
    with torch.no_grad():  # larger weights: each token depends on its context
        for param in model.parameters():
            param.mul_(3)
    return model


@torch.no_grad()
def test_a_left_padded_batch_computes_each_prompt_as_alone(model):
    width = max(map(len, PROMPTS))
    tokens = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    valid = torch.zeros(len(PROMPTS), width, dtype=torch.bool)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    context = model.ModalityContext
    batched = model(tokens, modality=context(key_padding_mask=valid))
    unmasked = model(tokens)
    for row, prompt in enumerate(PROMPTS):
        alone = model(torch.tensor([prompt]))[0]
        torch.testing.assert_close(batched[row, width - len(prompt):], alone, rtol=0, atol=1e-5)
        if len(prompt) < width:  # the padding would change the row: the test can fail
            first = width - len(prompt)  # the row's first token, right after its padding
            assert (unmasked[row, first] - alone[0]).abs().max() > 1e-2


def test_greedy_generation_of_a_left_padded_batch_equals_each_prompt_alone(model):
    # the prefill with its caches, then 12 steps; a row that ends early feeds padding
    alone = [generate(model, [prompt], 12, eos_id=None)[0] for prompt in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS) and len(set(alone[0])) >= 4, alone
    assert generate(model, PROMPTS, 12, eos_id=None) == alone
    eos = alone[1][3]  # row 1 stops after 4 tokens, the others decode on
    stopped = [a[: a.index(eos) + 1] if eos in a else a for a in alone]
    assert generate(model, PROMPTS, 12, eos_id=eos) == stopped


def test_the_compiled_decode_step_of_a_hybrid_gives_the_eager_tokens(monkeypatch):
    """compile=True: the Mamba-2 states in StaticStateCaches (a fixed size already,
    updated in place), a left-padded batch with a row that stops early; aot_eager
    compiles the graph inductor would, cheaply (tests/test_parity_ssm.py: Jamba's)."""
    from forgec.runtime.parallel import COMPILE_BACKEND_ENV

    torch.manual_seed(0)
    model = importlib.import_module("generated.mamba2_debug").Transformer().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3)
    free = generate(model, PROMPTS, 12, eos_id=None)
    eos = free[1][3]
    want = generate(model, PROMPTS, 12, eos_id=eos)
    assert len(want[1]) == 4 and len(want[0]) == 12, want
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    try:
        assert generate(model, PROMPTS, 12, eos_id=eos, compile=True) == want
    finally:
        torch._dynamo.reset()
