"""The committed specs compile and have the published sizes."""

from __future__ import annotations

import pytest
from conftest import SPECS

from forgec.compiler.cost import cost
from forgec.compiler.driver import compile_spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_committed_specs_compile_without_errors(spec):
    result = compile_spec(str(spec))
    assert result.diagnostics.error_count == 0
    assert not [d for d in result.diagnostics.items if d.severity == "warning"]


@pytest.mark.parametrize("spec, params", [
    ("llama3_8b.forge", 8_030_261_248),
    ("llama3_70b.forge", 70_553_706_496),
])
def test_llama3_parameter_counts_match_meta(spec, params):
    result = compile_spec(f"specs/{spec}")
    c = cost(result.graphs[result.main_model()])
    assert c.params_total == params
    assert c.params_active == params
    assert c.supports_kv_cache


def test_deepseek_v3_parameter_counts_match_transformers_on_meta():
    """transformers' default DeepseekV3Config, counted on the meta device
    (`sum(p.numel() for p in DeepseekV3ForCausalLM(config).parameters())`; active: the
    experts' share times 8/256, the routers, shared experts and the rest counted whole;
    the score-correction bias is a buffer, not a parameter, in both)."""
    result = compile_spec("specs/deepseek_v3.forge")
    c = cost(result.graphs["deepseek_v3"])
    assert c.params_total == 671_026_404_352
    assert c.params_active == 37_552_282_624
    assert c.supports_kv_cache


def test_gpt_oss_120b_parameter_count_matches_transformers_on_meta():
    """transformers' default GptOssConfig on the meta device: attention with biases and
    sinks, routers with biases, experts with biases (YaRN changes no parameter)."""
    result = compile_spec("specs/gpt_oss_120b.forge")
    c = cost(result.graphs["gpt_oss_120b"])
    assert c.params_total == 116_829_156_672
