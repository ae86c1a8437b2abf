"""RoPE scaling (the rope op's `scaling`): the tables the generated model computes are
transformers' own, bit for bit, and a model carries only the scaling its spec names.

The rope op's `rotary_tables` (compiler/ops/rope/modules.py) is specialised here as the
emitter specialises it (compiler/modular.py: one scaling's flags on) and compared with
transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) and its rotary embedding's
`cos = emb.cos() * attention_scaling`. Whole-model parity, decoding included, is in
tests/test_parity_hf.py (llama_linear, llama_dynamic, qwen2_yarn, phi3_longrope,
deepseek_v3_yarn, gpt_oss_yarn, gemma3_linear).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers as hf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from forgec.compiler.modular import copy_definitions
from forgec.compiler.ops import OPS

ROPE = OPS["rope"]
HEAD_DIM, MAX_POS, ORIGINAL = 16, 64, 16
SHORT = [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0]
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]

# (transformers' rope_parameters, the spec's rope arguments)
CASES = {
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
               dict(scale_factor=8.0, original_max_seq_len=ORIGINAL)),
    "linear": ({"rope_type": "linear", "factor": 4.0}, dict(scale_factor=4.0)),
    # the threshold of transformers' dynamic base is max_position_embeddings
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0},
                dict(scale_factor=2.0, original_max_seq_len=MAX_POS)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
              "beta_fast": 32.0, "beta_slow": 1.0},
             dict(scale_factor=4.0, original_max_seq_len=ORIGINAL)),
    "yarn_untruncated_mscale": (
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": ORIGINAL,
         "beta_fast": 8.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.707,
         "truncate": False},
        dict(scale_factor=40.0, original_max_seq_len=ORIGINAL, beta_fast=8.0, beta_slow=2.0,
             mscale=1.0, mscale_all_dim=0.707, truncate=False)),
    "longrope": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                  "original_max_position_embeddings": ORIGINAL},
                 dict(original_max_seq_len=ORIGINAL, short_factor=tuple(SHORT),
                      long_factor=tuple(LONG))),
}


def _args(scaling: str, **given) -> dict:
    """A rope component's arguments, defaults and derived ones filled in as bind does."""
    args = {a.name: a.default for a in ROPE.args if not a.required and not a.derived}
    args.update({"head_dim": HEAD_DIM, "max_seq_len": MAX_POS, "theta": 10000.0,
                 "scaling": scaling, "rotary_dim": None, "scale_factor": None,
                 "attention_factor": None, **given})
    ROPE.derive(args)
    return args


def _specialised(args: dict):
    """rotary_tables as a model with this rope gets it: (function, its source)."""
    sources = copy_definitions(["rotary_tables"], ROPE.features(args))
    namespace = {"torch": torch, "math": math}
    exec("\n\n".join(sources), namespace)  # noqa: S102 - the generated code, as emitted
    return namespace["rotary_tables"], "\n".join(sources)


def _call(fn, args: dict, positions: int, seq_len: int = 0):
    kw = dict(factor=args["scale_factor"], low_freq_factor=args["low_freq_factor"],
              high_freq_factor=args["high_freq_factor"],
              original_max_seq_len=args["original_max_seq_len"], beta_fast=args["beta_fast"],
              beta_slow=args["beta_slow"], truncate=args["truncate"],
              short_factor=args["short_factor"], long_factor=args["long_factor"],
              attention_factor=args["attention_factor"], seq_len=seq_len)
    params = fn.__code__.co_varnames[:fn.__code__.co_argcount + fn.__code__.co_kwonlyargcount]
    return fn(positions, args["rotary_dim"], args["theta"],
              **{k: v for k, v in kw.items() if k in params})


def _transformers(rope: dict, positions: int, seq_len: int | None = None):
    config = hf.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM,
                            max_position_embeddings=MAX_POS,
                            rope_parameters={**rope, "rope_theta": 10000.0})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None, seq_len=seq_len)
    if rope["rope_type"] == "dynamic" and seq_len is not None:  # as dynamic_rope_update
        inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](
            config, None, seq_len=torch.tensor(seq_len))
    emb = torch.outer(torch.arange(positions).float(), inv_freq)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@pytest.mark.parametrize("case", list(CASES))
def test_the_tables_are_transformers_bit_for_bit(case):
    rope, given = CASES[case]
    args = _args(rope["rope_type"], **given)
    fn, _ = _specialised(args)
    cos, sin = _call(fn, args, 40)
    want_cos, want_sin = _transformers(rope, 40)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_dynamic_grows_its_base_past_the_original_context():
    rope, given = CASES["dynamic"]
    args = _args("dynamic", **given)
    fn, _ = _specialised(args)
    plain, _ = _call(fn, args, 100)
    for seq_len in (MAX_POS, MAX_POS + 1, 100):  # as transformers' dynamic_rope_update
        cos, sin = _call(fn, args, 100, seq_len=seq_len)
        want_cos, want_sin = _transformers(rope, 100, seq_len if seq_len > MAX_POS else None)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), seq_len
    assert not torch.equal(cos, plain)  # the base did grow


def test_longrope_takes_the_long_factors_past_the_original_context():
    rope, given = CASES["longrope"]
    args = _args("longrope", **given)
    # transformers' attention factor: the factor derived as max_position_embeddings / original
    assert args["attention_factor"] == math.sqrt(1 + math.log(MAX_POS / ORIGINAL)
                                                 / math.log(ORIGINAL))
    fn, _ = _specialised(args)
    for seq_len, long in ((ORIGINAL, False), (ORIGINAL + 1, True)):
        cos, sin = _call(fn, args, 40, seq_len=seq_len)
        want_cos, want_sin = _transformers(rope, 40, seq_len)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), seq_len
        short_cos, _ = _transformers(rope, 40)
        assert torch.equal(cos, short_cos) != long


def test_deepseeks_attention_factor_and_softmax_mscale():
    # mscale = mscale_all_dim: cos and sin unscaled; the softmax scale carries mscale²
    args = _args("yarn", scale_factor=40.0, original_max_seq_len=4096, mscale=1.0,
                 mscale_all_dim=1.0, max_seq_len=163840)
    assert args["attention_factor"] == 1.0
    assert "ROPE_ATTENTION_FACTOR" not in ROPE.features(args)
    # gpt-oss's: 0.1 · ln 32 + 1 on cos and sin
    args = _args("yarn", scale_factor=32.0, original_max_seq_len=4096, truncate=False)
    assert args["attention_factor"] == 0.1 * math.log(32.0) + 1.0


@pytest.mark.parametrize("scaling, absent", [
    ("none", ("yarn_frequencies", "factor", "seq_len", "attention_factor", "math.")),
    ("linear", ("yarn_frequencies", "seq_len", "attention_factor", "original_max_seq_len")),
    ("yarn", ("seq_len", "short_factor", "low_freq_factor")),
])
def test_a_model_carries_only_its_own_scaling(scaling, absent):
    given = {} if scaling == "none" else CASES[scaling][1]
    _, source = _specialised(_args(scaling, **given))
    for word in absent:
        assert not re.search(rf"\b{re.escape(word)}", source), word
    assert "SCALING" not in source and "ROPE_ATTENTION_FACTOR" not in source
    if scaling == "none":  # straight-line: no branch at all
        assert "if " not in source
