"""`forgec import-hf` (config.json → spec, located errors) and runtime.hf (weights).

Numerical parity with transformers is tests/test_parity_hf.py; here: what the
importer writes and refuses, where it points, the documented examples of
docs/errors.md, and loading/saving checkpoints (shards, .bin, tied heads, MoE
packing, an exact round trip).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as hf
from conftest import ROOT, THREADS, run_forgec

from forgec.compiler.build import build
from forgec.compiler.cli import main as forgec
from forgec.compiler.cost import cost
from forgec.compiler.diagnostics import Diagnostics
from forgec.compiler.driver import compile_spec
from forgec.compiler.errors import RunError
from forgec.compiler.importers.common import JSONSyntaxError, parse_json, parse_toml, selectors
from forgec.compiler.importers.hf import import_hf
from forgec.compiler.importers.kf import import_kf
from forgec.runtime.hf import forge_to_hf, hf_to_forge, load_hf_checkpoint, save_hf_checkpoint

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
}


# The config.json files of published models (as on the Hugging Face Hub), with the
# parameter counts of their checkpoints.
HUB = {
    # Llama-3.1-8B: 8_030_261_248 parameters
    'llama31_8b': (8_030_261_248, '{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256}'),
    # Mistral-7B-v0.1: 7_241_732_096 parameters
    'mistral_7b': (7_241_732_096, '{"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000}'),
    # Mixtral-8x7B-v0.1: 46_702_792_704 parameters
    'mixtral_8x7b': (46_702_792_704, '{"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": false, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000}'),
    # Qwen2.5-7B: 7_615_616_512 parameters
    'qwen25_7b': (7_615_616_512, '{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true, "use_mrope": false, "use_sliding_window": false, "vocab_size": 152064}'),
    # Qwen3-8B: 8_190_735_360 parameters
    'qwen3_8b': (8_190_735_360, '{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}'),
    # Qwen3-30B-A3B: 30_532_122_624 parameters
    'qwen3_30b_a3b': (30_532_122_624, '{"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}'),
    # gemma-2-2b: 2_614_341_888 parameters (a 4.42 config: both activation fields, no
    # layer_types)
    'gemma2_2b': (2_614_341_888, '{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000}'),
    # gemma-3-1b-pt: 999_885_952 parameters (a 4.50 config: rope_local_base_freq,
    # sliding_window_pattern)
    'gemma3_1b': (999_885_952, '{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144}'),
    # pythia-70m (GPT-NeoX, a transformers 4.24 config: rotary_pct, rotary_emb_base):
    # 70_426_624 parameters
    'pythia_70m': (70_426_624, '{"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": true, "use_parallel_residual": true, "vocab_size": 50304}'),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def write_config(folder: Path, cfg: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2)
    (folder / "config.json").write_text(text)
    return folder


def import_text(text: str, name: str = "m", **kw) -> tuple[str | None, Diagnostics]:
    diags = Diagnostics()
    try:
        src = parse_json(text, "config.json")
    except JSONSyntaxError as e:
        diags.error("E110", str(e), e.span)
        return None, diags
    return import_hf(src, name, "config.json", diags, **kw), diags


def errors(diags: Diagnostics) -> list[tuple[str, int, int]]:
    return [(d.code, d.span.line, d.span.col) for d in diags.sorted() if d.severity == "error"]


def position(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first `needle` in `text`."""
    i = text.index(needle)
    return text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)


def generate(tmp: Path, spec: Path):
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    name = spec.stem
    path = tmp / "pkg" / name / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"imp_{name}_{id(tmp)}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


# ---- what the importer writes ----------------------------------------------------------


def test_llama_spec_is_readable_and_compiles_cleanly(tmp_path):
    text, diags = import_text(json.dumps(LLAMA, indent=2), name="llama_tiny")
    assert not diags.items
    assert "model llama_tiny {" in text
    assert re.search(r"^  dim\s+= 64\s+# hidden_size$", text, re.M)
    assert re.search(r"^  n_kv_heads\s+= 2\s+# num_key_value_heads$", text, re.M)
    assert re.search(r"^  init_std\s+= 0.02\s+# initializer_range \(default\)$", text, re.M)
    assert "block dense(x) {" in text and "layers      = stack(n_layers) { default: dense }" in text
    assert "(LlamaForCausalLM, model_type \"llama\")" in text
    spec = tmp_path / "llama_tiny.forge"
    spec.write_text(text)
    result = compile_spec(str(spec))
    assert not result.diagnostics.items  # no warning either: every parameter is used
    assert errors(result.diagnostics) == []


@pytest.mark.parametrize("name", list(HUB))
def test_published_configs_import_with_their_parameter_counts(tmp_path, name):
    params, text = HUB[name]
    spec, diags = import_text(text, name=name)
    assert not diags.items, errors(diags)
    path = tmp_path / f"{name}.forge"
    path.write_text(spec)
    result = compile_spec(str(path))
    assert not result.diagnostics.items
    assert cost(result.graphs[name]).params_total == params


def test_cli_writes_the_spec_and_refuses_to_overwrite(tmp_path):
    src = write_config(tmp_path / "hf", LLAMA)
    out = tmp_path / "llama_tiny.forge"
    proc = run_forgec("import-hf", str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "model llama_tiny, 2 layers" in proc.stderr
    assert run_forgec("check", "-q", str(out)).returncode == 0
    again = run_forgec("import-hf", str(src / "config.json"), "-o", str(out))
    assert again.returncode == 2 and "exists; --force replaces it" in again.stderr
    assert run_forgec("import-hf", str(src), "-o", str(out), "--force").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "no such file or folder"),
    (["{empty}"], "has no config.json"),
    (["{src}", "-o", "{tmp}/not-a-name.forge"], "cannot name a model"),
    (["{src}", "-o", "{tmp}/x.txt"], "must be a .forge file"),
    (["{src}", "-o", "{tmp}/missing/x.forge"], "no folder"),
    (["{src}", "--max-seq-len", "0"], "--max-seq-len must be positive"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    src = write_config(tmp_path / "hf", LLAMA)
    (tmp_path / "empty").mkdir()
    argv = [a.format(src=src, tmp=tmp_path, empty=tmp_path / "empty") for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "ok.forge")]
    proc = run_forgec("import-hf", *argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_importing_does_not_import_torch(tmp_path):
    src = write_config(tmp_path / "hf", LLAMA)
    code = textwrap.dedent(f"""\
        import sys
        from forgec.compiler.cli import main
        assert main(["import-hf", {str(src)!r}, "-o", {str(tmp_path / 'a.forge')!r}]) == 0
        assert "forgec.compiler.importers.hf" in sys.modules
        assert "torch" not in sys.modules, "torch imported"
        print("ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == "ok\n", proc.stderr


def test_transformers_4_field_names_give_the_same_spec():
    v5 = {**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}}
    del v5["rope_theta"]
    v4 = {**LLAMA, "rope_theta": 500000.0,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    a, da = import_text(json.dumps(v5))
    b, db = import_text(json.dumps(v4))
    assert not da.items and not db.items
    body = lambda t: t[t.index("model m {"):]  # noqa: E731 — the header names the fields
    assert re.sub(r"#.*", "", body(a)) == re.sub(r"#.*", "", body(b))
    assert "scaling = llama3, scale_factor = 8.0" in a and "original_max_seq_len = 64" in a


def test_qwen2_sliding_layers_and_biases():
    cfg = {**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
           "num_hidden_layers": 6, "use_sliding_window": True, "sliding_window": 16,
           "max_window_layers": 4, "tie_word_embeddings": True}
    text, diags = import_text(json.dumps(cfg))
    assert not diags.items
    assert "qkv_bias = true" in text and "out_bias" not in text
    assert "block dense_local(x) extends dense {" in text
    assert "window = window" in text and re.search(r"^\s*last 2:\s+dense_local$", text, re.M)
    assert "lm_head(dim, vocab_size, tie = token_embedding)" in text
    # without use_sliding_window HF ignores sliding_window
    text, diags = import_text(json.dumps({**cfg, "use_sliding_window": False}))
    assert not diags.items and "window" not in text.split("model m {")[1]


def test_qwen3_moe_stack_follows_sparse_step_and_mlp_only_layers():
    cfg = {**LLAMA, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
           "num_hidden_layers": 8, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [5],
           "norm_topk_prob": True, "head_dim": 24}
    text, diags = import_text(json.dumps(cfg))
    assert not diags.items, errors(diags)
    rules = re.search(r"layers = stack\(n_layers\) \{\n(.*?)\n  \}", text, re.S).group(1)
    # sparse where (i + 1) % 2 == 0 except 5: layers 1, 3, 7
    assert [r.split() for r in rules.splitlines()] == [
        ["default:", "dense"], ["at", "1:", "sparse"], ["at", "3:", "sparse"],
        ["at", "7:", "sparse"]]
    assert "renormalize = true" in text and "qk_norm = true" in text
    assert re.search(r"^  n_experts\s+= 4\s+# num_experts$", text, re.M)


def test_moe_balance_loss_follows_output_router_logits():
    cfg = {**LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
           "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02}
    off, _ = import_text(json.dumps(cfg))
    on, _ = import_text(json.dumps({**cfg, "output_router_logits": True}))
    assert re.search(r"^  aux_loss_weight = 0.0 ", off, re.M)
    assert re.search(r"^  aux_loss_weight = 0.02 ", on, re.M)


def test_ignored_fields_are_listed_in_the_spec():
    cfg = {**LLAMA, "my_field": 3}
    _, diags = import_text(json.dumps(cfg))
    assert [d.code for d in diags.errors] == ["E115"]
    assert "--ignore my_field" in diags.errors[0].hint
    text, diags = import_text(json.dumps(cfg), ignore={"my_field"})
    assert not diags.items and "(--ignore): my_field." in text


@pytest.mark.parametrize("n, layers, expected", [
    (8, set(range(8)), ["default"]),
    (8, {0, 1}, ["first 2"]),
    (8, {6, 7}, ["last 2"]),
    (8, {1, 3, 5, 7}, ["every 2"]),
    (9, {0, 3, 6}, ["every 3 from 0"]),
    (8, {2, 5}, ["every 3"]),
    (8, {1, 2, 5}, ["at 1", "at 2", "at 5"]),
])
def test_stack_selectors(n, layers, expected):
    assert selectors(layers, n) == expected


# ---- located errors -----------------------------------------------------------------------


def test_unsupported_values_are_located_errors_naming_the_field():
    cfg = {**LLAMA, "hidden_act": "gelu", "mlp_bias": True, "attention_dropout": 0.1,
           "rope_scaling": {"rope_type": "proportional", "factor": 4.0}}
    text = json.dumps(cfg, indent=2)
    spec, diags = import_text(text)
    assert spec is None
    found = {(d.code, d.span.line, d.span.col): d.message for d in diags.errors}
    for key, word in (('"hidden_act"', "hidden_act 'gelu'"), ('"mlp_bias"', "mlp_bias"),
                      ('"attention_dropout"', "attention_dropout"),
                      ('"rope_type"', "rope type 'proportional'")):
        where = ("E114", *position(text, key))
        assert where in found and word in found[where], (where, found)
    assert len(found) == 4  # the refused type's own settings are not reported as unknown


def test_cli_renders_the_config_line_and_writes_nothing(tmp_path):
    cfg = {**LLAMA, "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4,
                                        "factor": 2.0}}
    del cfg["rope_theta"]
    src = write_config(tmp_path / "hf", cfg)
    out = tmp_path / "m.forge"
    proc = run_forgec("import-hf", str(src), "-o", str(out))
    assert proc.returncode == 1
    line, col = position((src / "config.json").read_text(), '"rope_type"')
    assert f"config.json:{line}:{col}: error[E114]: rope type 'proportional'" in proc.stderr
    assert '"rope_type": "proportional"' in proc.stderr and "^^^^^^^^^^^" in proc.stderr
    assert "1 error" in proc.stderr and not out.exists()


@pytest.mark.parametrize("cfg, code, key", [
    ({**LLAMA, "model_type": "bert"}, "E111", '"model_type"'),
    ({k: v for k, v in LLAMA.items() if k != "num_hidden_layers"}, "E112", "{"),
    ({**LLAMA, "num_attention_heads": 0}, "E113", '"num_attention_heads"'),
    ({**LLAMA, "vocab_size": 12.5}, "E113", '"vocab_size"'),
    ({**LLAMA, "architectures": ["LlamaForSequenceClassification"]}, "E114",
     '"LlamaForSequenceClassification"'),
    ({**LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
      "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.1},
     "E114", '"router_jitter_noise"'),
    ({**LLAMA, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
      "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]},
     "E114", '"chunked_attention"'),
    # a dense MLP could say gelu_pytorch_tanh (GeGLU), experts cannot: refused, not `None(...)`
    ({**LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
      "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "gelu_pytorch_tanh"},
     "E114", '"hidden_act"'),
    ({**LLAMA, "quantization_config": {"bits": 4}}, "E115", '"quantization_config"'),
    ({**LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
      "num_local_experts": 4, "num_experts": 8, "num_experts_per_tok": 2}, "E116",
     '"num_experts"'),
    ({**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
      "layer_types": ["full_attention"]}, "E116", '"layer_types"'),
    ({**LLAMA, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
      "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
      "mlp_only_layers": [0, 7]}, "E113", "7]"),
])
def test_errors_point_at_the_key(cfg, code, key):
    text = json.dumps(cfg, indent=2).replace('[\n    0,\n    7\n  ]', "[0, 7]")
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


def test_every_error_of_a_config_is_reported_at_once():
    cfg = {**LLAMA, "hidden_act": "relu", "foo": 1, "attention_dropout": 0.5}
    del cfg["vocab_size"]
    _, diags = import_text(json.dumps(cfg, indent=2))
    assert sorted(d.code for d in diags.errors) == ["E112", "E114", "E114", "E115"]


# ---- the documented examples (docs/errors.md, "Importing configs") ------------------------

DOC = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
EXAMPLE = re.compile(r"^```(json|toml) file=(\S+)\n(.*?)^```\n"
                     r"<!-- import-expect: (E\d{3}) at (\S+):(\d+):(\d+) -->", re.M | re.S)
IMPORT_CODES = [f"E11{i}" for i in range(7)]


def doc_examples():
    out = []
    for section in re.split(r"^### ", DOC, flags=re.M)[1:]:
        code = section.split(" ", 1)[0]
        for m in EXAMPLE.finditer(section):
            out.append((code, *m.groups()))
    return out


EXAMPLES = doc_examples()


def test_every_import_code_is_documented_with_an_example():
    assert sorted({e[0] for e in EXAMPLES}) == IMPORT_CODES
    assert len(re.findall(r"^<!-- import-expect:", DOC, re.M)) == len(EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e[4]}@{e[2]}:{e[5]}:{e[6]}")
def test_documented_example_reports_its_code_there(example):
    section, kind, file, body, code, where, line, col = example
    assert section == code and file == where
    diags = Diagnostics()
    try:
        src = (parse_json if kind == "json" else parse_toml)(body, file)
    except JSONSyntaxError as e:
        diags.error("E110", str(e), e.span)
    else:
        (import_hf if kind == "json" else import_kf)(src, "m", file, diags)
    assert errors(diags) == [(code, int(line), int(col))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


def test_every_import_code_in_the_source_is_documented():
    source = "".join(p.read_text() for p in (ROOT / "compiler" / "importers").glob("*.py"))
    assert sorted(set(re.findall(r'"(E11\d)"', source))) == IMPORT_CODES


# ---- checkpoints ---------------------------------------------------------------------------


def tiny_hf(model_cls, config_cls, seed=0, **kw):
    config = config_cls(**{**{k: v for k, v in LLAMA.items()
                              if k not in ("architectures", "model_type", "torch_dtype")},
                           "initializer_range": 0.1, **kw})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config).eval()


def imported(tmp: Path, folder: Path, name: str):
    spec = tmp / f"{name}.forge"
    assert forgec(["import-hf", str(folder), "-o", str(spec), "--force"]) == 0
    return generate(tmp, spec)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin", "bin-sharded"])
def test_sharded_and_bin_checkpoints_load_like_safetensors(tmp_path, fmt):
    ref = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig)
    ref.save_pretrained(tmp_path / "single")
    kwargs = {"max_shard_size": "20KB"} if fmt.endswith("sharded") else {}
    if fmt.startswith("bin"):  # transformers 5 only writes safetensors: make the .bin files
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        out = tmp_path / fmt
        out.mkdir()
        if fmt == "bin":
            torch.save(sd, out / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": keys[i::2] for i in range(2)}
            for name, part in shards.items():
                torch.save({k: sd[k] for k in part}, out / name)
            index = {"weight_map": {k: n for n, part in shards.items() for k in part}}
            (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        ref.save_pretrained(tmp_path / fmt, **kwargs)
        assert (tmp_path / fmt / "model.safetensors.index.json").exists()
    mod = imported(tmp_path, tmp_path / "single", "llama_ck")
    a, b = mod.Transformer(), mod.Transformer()
    load_hf_checkpoint(a, tmp_path / "single")
    load_hf_checkpoint(b, tmp_path / fmt)
    assert_same_state(a, b)


def test_round_trip_load_save_load_is_exact_and_transformers_reads_it(tmp_path):
    for name, model_cls, config_cls, kw in (
            ("qwen2_rt", hf.Qwen2ForCausalLM, hf.Qwen2Config, {"tie_word_embeddings": True}),
            ("qwen3_rt", hf.Qwen3ForCausalLM, hf.Qwen3Config, {"head_dim": 24}),
            ("mixtral_rt", hf.MixtralForCausalLM, hf.MixtralConfig,
             {"num_local_experts": 4, "num_experts_per_tok": 2})):
        ref = tiny_hf(model_cls, config_cls, **kw)
        ref.save_pretrained(tmp_path / name)
        mod = imported(tmp_path, tmp_path / name, name)
        first = load_hf_checkpoint(mod.Transformer(), tmp_path / name)
        save_hf_checkpoint(first, tmp_path / f"{name}_out", config=tmp_path / name)
        second = load_hf_checkpoint(mod.Transformer(), tmp_path / f"{name}_out")
        assert_same_state(first, second)
        back = model_cls.from_pretrained(tmp_path / f"{name}_out",
                                         attn_implementation="eager").eval()
        ids = torch.randint(0, 128, (1, 12))
        with torch.no_grad():
            assert torch.equal(back(ids).logits, ref(ids).logits), name


def test_tied_heads_must_match(tmp_path):
    ref = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig)
    ref.save_pretrained(tmp_path / "untied")
    tied = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    untied_mod = imported(tmp_path, tmp_path / "untied", "untied")
    tied_mod = imported(tmp_path, tmp_path / "tied", "tied")
    m = load_hf_checkpoint(tied_mod.Transformer(), tmp_path / "tied")
    assert m.output_head.proj.weight is m.token_embedding.embedding.weight
    with pytest.raises(RunError, match="no lm_head.weight.*not tied"):
        load_hf_checkpoint(untied_mod.Transformer(), tmp_path / "tied")
    with pytest.raises(RunError, match="ties output_head.*differs"):
        load_hf_checkpoint(tied_mod.Transformer(), tmp_path / "untied")
    with pytest.raises(RunError, match="tie_word_embeddings"):
        save_hf_checkpoint(untied_mod.Transformer(), tmp_path / "bad", config=tmp_path / "tied")


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    small = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig)
    small.save_pretrained(tmp_path / "small")
    wide = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig, intermediate_size=128)
    wide.save_pretrained(tmp_path / "wide")
    biased = tiny_hf(hf.LlamaForCausalLM, hf.LlamaConfig, attention_bias=True)
    biased.save_pretrained(tmp_path / "biased")
    mod = imported(tmp_path, tmp_path / "small", "small")
    with pytest.raises(RunError, match=r"layers\.0\.mlp\.gate_proj\.weight \(128, 64\) \(model \(96, 64\)\)"):
        load_hf_checkpoint(mod.Transformer(), tmp_path / "wide")  # shapes differ
    with pytest.raises(RunError, match=r"the model has no layers\.0\.attention\.k_proj\.bias"):
        load_hf_checkpoint(mod.Transformer(), tmp_path / "biased")
    with pytest.raises(RunError, match="holds no weights"):
        load_hf_checkpoint(mod.Transformer(), tmp_path)


def test_moe_experts_are_transposed_and_packed():
    hf_sd = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight":
             torch.randn(3, 2) if w != "w2" else torch.randn(2, 3)
             for e in range(4) for w in ("w1", "w2", "w3")}
    hf_sd["model.layers.0.block_sparse_moe.gate.weight"] = torch.randn(4, 2)
    sd = hf_to_forge(hf_sd)
    gate = sd["layers.0.mlp.experts.gate_proj"]
    assert gate.shape == (4, 2, 3) and sd["layers.0.mlp.experts.down_proj"].shape == (4, 3, 2)
    e, x = 2, torch.randn(5, 2)  # expert e as a Linear: x @ W1ᵀ
    assert torch.allclose(x @ gate[e], x @ hf_sd[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"].t())
    assert torch.equal(sd["layers.0.mlp.router.weight"],
                       hf_sd["model.layers.0.block_sparse_moe.gate.weight"])
    # transformers 5's in-memory packing reads the same
    packed = {"model.layers.0.mlp.experts.gate_up_proj": torch.cat(
                  [torch.stack([hf_sd[f"model.layers.0.block_sparse_moe.experts.{i}.{w}.weight"]
                                for i in range(4)]) for w in ("w1", "w3")], dim=1),
              "model.layers.0.mlp.experts.down_proj": torch.stack(
                  [hf_sd[f"model.layers.0.block_sparse_moe.experts.{i}.w2.weight"]
                   for i in range(4)])}
    sd2 = hf_to_forge(packed)
    for role in ("gate", "up", "down"):
        assert torch.equal(sd2[f"layers.0.mlp.experts.{role}_proj"],
                           sd[f"layers.0.mlp.experts.{role}_proj"])
    del hf_sd["model.layers.0.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(RunError, match="expert 3 of 4 has no up projection"):
        hf_to_forge(hf_sd)


def test_forge_to_hf_names_are_the_inverse(tmp_path):
    ref = tiny_hf(hf.Qwen3MoeForCausalLM, hf.Qwen3MoeConfig, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0],
                  head_dim=24)
    ref.save_pretrained(tmp_path / "q")
    mod = imported(tmp_path, tmp_path / "q", "qmoe")
    m = load_hf_checkpoint(mod.Transformer(), tmp_path / "q")
    names = forge_to_hf(m, "qwen3_moe")
    from safetensors.torch import load_file
    original = load_file(tmp_path / "q" / "model.safetensors")
    assert names.keys() == original.keys()
    for k in names:
        assert torch.equal(names[k], original[k]), k


# ---- the general importer's families: what they refuse, located ----------------------------

def _family_config(cls, **fields) -> dict:
    """A transformers config of a small model as save_pretrained writes it, with `fields`."""
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    if cls is hf.GPTJConfig:
        small = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    elif cls is not hf.GPTNeoXConfig:  # GPT-NeoX has no grouped KV heads
        small["num_key_value_heads"] = 4
    cfg = json.loads(cls(**small).to_json_string(use_diff=False))
    return {**cfg, **fields}


@pytest.mark.parametrize("cls, fields, code, key", [
    (hf.PhiConfig, {"qk_layernorm": True}, "E114", '"qk_layernorm"'),
    (hf.GPTJConfig, {"resid_pdrop": 0.1}, "E114", '"resid_pdrop"'),
    (hf.CohereConfig, {"use_qk_norm": True}, "E114", '"use_qk_norm"'),
    (hf.SmolLM3Config, {"no_rope_layers": [1, 1, 0]}, "E116", '"no_rope_layers"'),
    (hf.SmolLM3Config, {"use_sliding_window": True}, "E114", '"use_sliding_window"'),
    (hf.StableLmConfig, {"hidden_act": "quick_gelu"}, "E114", '"hidden_act"'),
    (hf.GPTNeoXConfig, {"hidden_act": "quick_gelu"}, "E114", '"hidden_act"'),
    (hf.Phi3Config, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                         "short_factor": [1.0] * 8, "long_factor": [0.0] * 8}},
     "E113", '"long_factor"'),
    (hf.OlmoConfig, {"clip_qkv": -1.0}, "E113", '"clip_qkv"'),
    (hf.Starcoder2Config, {"bias_everywhere": 1}, "E115", '"bias_everywhere"'),
    (hf.GemmaConfig, {"hidden_act": "quick_gelu"}, "E114", '"hidden_act"'),
    (hf.Gemma2Config, {"attn_logit_softcapping": -1.0}, "E113", '"attn_logit_softcapping"'),
    (hf.Gemma2Config, {"layer_types": ["sliding_attention", "chunked_attention"]}, "E114",
     '"chunked_attention"'),
    (hf.Gemma3TextConfig, {"use_bidirectional_attention": True}, "E114",
     '"use_bidirectional_attention"'),
    (hf.Gemma3TextConfig, {"rope_parameters": {
        "full_attention": {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "E114",
     '"rope_type"'),
    (hf.DeepseekV2Config, {"topk_method": "group_limited_greedy", "num_experts_per_tok": 2},
     "E114", '"topk_method"'),
    (hf.DeepseekV2Config, {"routed_scaling_factor": 16.0, "num_experts_per_tok": 2}, "E114",
     '"routed_scaling_factor"'),
    # YaRN stretches a context: a factor below 1 does not
    (hf.GptOssConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 0.5, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}},
     "E113", '"factor"'),
    (hf.DeepseekV3Config, {"first_k_dense_replace": -1}, "E113", '"first_k_dense_replace"'),
    (hf.DeepseekV3Config, {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "attention_factor": -1.0,
        "original_max_position_embeddings": 4096}}, "E113", '"attention_factor"'),
    (hf.OlmoeConfig, {"clip_qkv": 2.0}, "E114", '"clip_qkv"'),
    (hf.OlmoeConfig, {"num_experts_per_tok": 65}, "E113", '"num_experts_per_tok"'),
    (hf.Qwen2MoeConfig, {"use_sliding_window": True}, "E114", '"use_sliding_window"'),
    (hf.Qwen2MoeConfig, {"shared_expert_intermediate_size": 0}, "E113",
     '"shared_expert_intermediate_size"'),
    (hf.GraniteMoeConfig, {"router_z_loss": 0.1}, "E115", '"router_z_loss"'),
    # PhiMoE: training noise on the experts' input; sparsemixer picks exactly two
    (hf.PhimoeConfig, {"input_jitter_noise": 0.1}, "E114", '"input_jitter_noise"'),
    (hf.PhimoeConfig, {"num_experts_per_tok": 3}, "E114", '"num_experts_per_tok"'),
    # mixture-of-experts families whose layers the language cannot say
    (hf.HunYuanMoEV1Config, {}, "E114", '"model_type"'),
    (hf.MiniMaxConfig, {}, "E114", '"layer_types"'),
    (hf.Ernie4_5_MoeConfig, {}, "E114", '"moe_num_experts"'),
    (hf.JetMoeConfig, {}, "E114", '"num_local_experts"'),
    (hf.LongcatFlashConfig, {}, "E114", '"zero_expert_num"'),
])
def test_the_general_importers_errors_point_at_the_key(cls, fields, code, key):
    text = json.dumps(_family_config(cls, **fields), indent=2)
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


def test_an_imported_family_spec_reads_like_one_written_by_hand():
    # parallel blocks on one norm, a gelu-tanh MLP as a module of the spec, partial rotary
    text = json.dumps(_family_config(hf.PhiConfig), indent=2)
    spec, diags = import_text(text, "phi_tiny")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert "module gelu_tanh_mlp(x) {" in spec
    assert "    y = attention_norm(x)\n    return x + attention(y) + mlp(y)\n" in spec
    assert "rotary_dim  = 8        # rope_parameters.partial_rotary_factor = 0.5" in spec
    assert "output_head = lm_head(dim, vocab_size, bias = true)" in spec
    assert "mlp_norm" not in spec and "n_kv_heads" not in spec  # nothing unused


def test_gemma_layer_patterns_read_like_the_papers():
    # Gemma 2 alternates local and global layers, Gemma 3 has one global in six; the
    # scores are scaled by query_pre_attn_scalar, the logits soft-capped (Gemma 2)
    # without layer_types (4.x configs): Gemma 2 alternates, Gemma 3 follows
    # sliding_window_pattern (transformers 5 writes it as _sliding_window_pattern)
    def config(cls, n):
        cfg = _family_config(cls, num_hidden_layers=n)
        del cfg["layer_types"]
        return json.dumps(cfg)

    spec, diags = import_text(config(hf.Gemma2Config, 6))
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert "    default: local\n    every 2: global\n" in spec
    assert "scale = 1 / sqrt(query_pre_attn_scalar), softcap = attn_softcap" in spec
    assert "lm_head(dim, vocab_size, tie = token_embedding, softcap = logit_softcap)" in spec
    spec, diags = import_text(config(hf.Gemma3TextConfig, 12))
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert "    default: local\n    every 6: global\n" in spec
    assert "local_theta = local_rope_theta" in spec and "local_rope = true" in spec
    assert "softcap" not in spec  # Gemma 3 caps nothing
# ---- state-space hybrids -------------------------------------------------------------


def _hybrid_config(cls, **fields) -> dict:
    """A small Jamba or Mamba-2 config as save_pretrained writes it, with `fields`."""
    if cls is hf.Mamba2Config:
        small = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=8,
                     head_dim=16, state_size=16, n_groups=2, chunk_size=8)
    else:
        small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                     attn_layer_period=4, attn_layer_offset=2, max_position_embeddings=128)
    return {**json.loads(cls(**small).to_json_string(use_diff=False)), **fields}


@pytest.mark.parametrize("cls, fields, code, key", [
    (hf.JambaConfig, {"attn_layer_offset": 4}, "E113", '"attn_layer_offset"'),
    (hf.JambaConfig, {"hidden_act": "gelu"}, "E114", '"hidden_act"'),
    (hf.JambaConfig, {"attention_dropout": 0.1}, "E114", '"attention_dropout"'),
    (hf.JambaConfig, {"mamba_dt_rank": "half"}, "E113", '"mamba_dt_rank"'),
    (hf.Mamba2Config, {"residual_in_fp32": False}, "E114", '"residual_in_fp32"'),
    (hf.Mamba2Config, {"time_step_limit": [0.0, 10.0]}, "E114", '"time_step_limit"'),
    (hf.Mamba2Config, {"expand": 3}, "E116", '"expand"'),
    (hf.Mamba2Config, {"n_groups": 3}, "E116", '"n_groups"'),
])
def test_the_hybrid_importers_errors_point_at_the_key(cls, fields, code, key):
    text = json.dumps(_hybrid_config(cls, **fields), indent=2)
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


@pytest.mark.parametrize("fields, rules", [
    # transformers' default layout: attention every 8 from 4, experts every 2 from 1
    ({"num_hidden_layers": 16, "attn_layer_period": 8, "attn_layer_offset": 4},
     ["default:        ssm", "every 2 from 1: ssm_moe", "every 8 from 4: attn "]),
    # attention layers with experts: by name (layer 1), the others a block of their own
    ({"num_hidden_layers": 6, "attn_layer_period": 3, "attn_layer_offset": 1},
     ["default:        ssm", "every 2 from 1: ssm_moe", "every 3 from 1: attn ",
      "at 1:           attn_moe"]),
    # experts on every layer
    ({"expert_layer_period": 1, "expert_layer_offset": 0},
     ["default:        ssm_moe", "every 4 from 2: attn_moe"]),
    # every attention layer has experts; a single expert is a dense MLP
    ({"attn_layer_period": 2, "attn_layer_offset": 1}, ["every 2 from 1: attn_moe"]),
    ({"num_experts": 1}, ["default:        ssm", "every 4 from 2: attn "]),
])
def test_jamba_layouts_import_with_transformers_parameter_count(tmp_path, fields, rules):
    cfg = _hybrid_config(hf.JambaConfig, **fields)
    spec, diags = import_text(json.dumps(cfg, indent=2), "jamba_tiny")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    for rule in rules:
        assert f"    {rule}" in spec
    (tmp_path / "jamba_tiny.forge").write_text(spec)
    result = compile_spec(str(tmp_path / "jamba_tiny.forge"))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    with torch.device("meta"):
        ref = hf.JambaForCausalLM(hf.JambaConfig(**cfg))
    assert cost(result.graphs["jamba_tiny"]).params_total == sum(
        p.numel() for p in ref.parameters())


def test_the_default_jamba_config_imports_as_specs_jamba(tmp_path):
    text = json.dumps(json.loads(hf.JambaConfig().to_json_string(use_diff=False)))
    spec, diags = import_text(text, "jamba_default")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    (tmp_path / "jamba_default.forge").write_text(spec)
    c = cost(compile_spec(str(tmp_path / "jamba_default.forge")).graphs["jamba_default"])
    assert c.params_total == 51_570_323_328  # specs/jamba.forge's, transformers' count


@pytest.mark.parametrize("cls, model_cls", [
    (hf.OlmoeConfig, hf.OlmoeForCausalLM),
    (hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM),
    (hf.GraniteMoeConfig, hf.GraniteMoeForCausalLM),
    (hf.Mamba2Config, hf.Mamba2ForCausalLM),
])
def test_default_configs_import_with_transformers_parameter_count(tmp_path, cls, model_cls):
    # transformers' default config of the family (2 layers, to keep it quick): the spec
    # counts what the model holds
    config = cls(num_hidden_layers=2)
    cfg = json.loads(config.to_json_string(use_diff=False))
    name = cfg["model_type"] + "_default"
    spec, diags = import_text(json.dumps(cfg, indent=2), name)
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    (tmp_path / f"{name}.forge").write_text(spec)
    result = compile_spec(str(tmp_path / f"{name}.forge"))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    with torch.device("meta"):
        ref = model_cls(config)
    assert cost(result.graphs[name]).params_total == sum(p.numel() for p in ref.parameters())


# ---- hybrids listing their attention layers: Bamba, LFM2 (branch zhyb) ----------------


def _listed_small(cls, **fields):
    """A small Bamba or LFM2 config, with `fields`."""
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if cls is hf.BambaConfig:
        small.update(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_state=16,
                     mamba_n_groups=2, mamba_chunk_size=8)
    else:
        small.update(layer_types=["conv", "full_attention", "conv"])
    return cls(**small, **fields)


def _listed_config(cls, **fields) -> dict:
    """A small Bamba or LFM2 config as save_pretrained writes it, with `fields`."""
    return {**json.loads(_listed_small(cls).to_json_string(use_diff=False)), **fields}


@pytest.mark.parametrize("cls, fields, code, key", [
    (hf.BambaConfig, {"z_loss_coefficient": 0.1}, "E114", '"z_loss_coefficient"'),
    (hf.BambaConfig, {"mlp_bias": True}, "E114", '"mlp_bias"'),
    (hf.BambaConfig, {"mamba_expand": 3}, "E116", '"mamba_expand"'),
    (hf.BambaConfig, {"mamba_n_groups": 3}, "E116", '"mamba_n_groups"'),
    (hf.BambaConfig, {"mamba_d_head": "half"}, "E113", '"mamba_d_head"'),
    (hf.BambaConfig, {"time_step_limit": [0.0, 10.0]}, "E114", '"time_step_limit"'),
    (hf.BambaConfig, {"attention_dropout": 0.1}, "E114", '"attention_dropout"'),
    (hf.BambaConfig, {"attn_layer_indices": [7]}, "E113", "7"),
    (hf.BambaConfig, {"hidden_act": "gelu"}, "E114", '"hidden_act"'),
    (hf.Lfm2Config, {"layer_types": ["conv", "full_attention"]}, "E116", '"layer_types"'),
    (hf.Lfm2Config, {"layer_types": ["conv", "sliding_attention", "conv"]}, "E114",
     '"sliding_attention"'),
    (hf.Lfm2Config, {"block_multiple_of": 0}, "E113", '"block_multiple_of"'),
    (hf.Lfm2Config, {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6}},
     "E114", '"rope_type"'),
    (hf.Lfm2Config, {"block_dim": 32}, "E116", '"block_dim"'),
    (hf.Lfm2Config, {"block_use_swiglu": False}, "E116", '"block_use_swiglu"'),
    (hf.Lfm2Config, {"conv_dim_in": 64}, "E115", '"conv_dim_in"'),
])
def test_bamba_and_lfm2_errors_point_at_the_key(cls, fields, code, key):
    text = json.dumps(_listed_config(cls, **fields), indent=2)
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


# ---- Qwen3-Next (gated DeltaNet and gated attention layers) ---------------------------

def _qwen3_next_config(**fields) -> dict:
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                 linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=48,
                 max_position_embeddings=128)
    return {**json.loads(hf.Qwen3NextConfig(**small).to_json_string(use_diff=False)),
            **fields}


@pytest.mark.parametrize("fields, code, key", [
    ({"linear_num_value_heads": 3}, "E116", '"linear_num_value_heads"'),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention",
                      "full_attention"]}, "E114", '"sliding_attention"'),
    ({"hidden_act": "gelu"}, "E114", '"hidden_act"'),
    ({"attention_dropout": 0.1}, "E114", '"attention_dropout"'),
    ({"linear_conv_kernel_dim": 0}, "E113", '"linear_conv_kernel_dim"'),
])
def test_qwen3_next_import_errors_point_at_the_key(fields, code, key):
    text = json.dumps(_qwen3_next_config(**fields), indent=2)
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


@pytest.mark.parametrize("cls, model_cls, fields, expect", [
    # transformers' defaults: Mamba-2 mixers of 128 heads, attention nowhere
    (hf.BambaConfig, hf.BambaForCausalLM, {}, ["default: ssm"]),
    (hf.BambaConfig, hf.BambaForCausalLM, {"attn_layer_indices": [1]},
     ["last 1:  attn", "rotary_dim = rotary_dim", "# rope_parameters.partial_rotary_factor"]),
    # all layers attend (full_attn_idxs null); the MLP's width by LFM2's rule (8192)
    (hf.Lfm2Config, hf.Lfm2ForCausalLM, {}, ["default: attn", "ffn_hidden  = 8192"]),
    (hf.Lfm2Config, hf.Lfm2ForCausalLM, {"layer_types": ["conv", "full_attention"],
                                         "block_auto_adjust_ff_dim": False},
     ["last 1:  attn", "ffn_hidden  = 12288", "tie = token_embedding"]),
])
def test_bamba_and_lfm2_defaults_import_with_transformers_parameter_count(
        tmp_path, cls, model_cls, fields, expect):
    config = cls(num_hidden_layers=2, **fields)
    cfg = json.loads(config.to_json_string(use_diff=False))
    name = cfg["model_type"] + "_default"
    spec, diags = import_text(json.dumps(cfg, indent=2), name)
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    for text in expect:
        assert text in spec
    (tmp_path / f"{name}.forge").write_text(spec)
    result = compile_spec(str(tmp_path / f"{name}.forge"))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    with torch.device("meta"):
        ref = model_cls(config)
    assert cost(result.graphs[name]).params_total == sum(p.numel() for p in ref.parameters())


def test_bamba_head_width_auto_and_lfm2s_older_field_names(tmp_path):
    # mamba_d_head "auto": mamba_expand × hidden_size / mamba_n_heads; LFM2's tie_embedding
    # and block_ff_dim are read over tie_word_embeddings and intermediate_size, as
    # transformers does
    bamba = {**_listed_config(hf.BambaConfig), "mamba_d_head": "auto"}
    spec, diags = import_text(json.dumps(bamba, indent=2), "bamba_auto")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert "ssm_head_dim = 16       # mamba_d_head" in spec
    # and the Hub's configs' names of the original code that transformers reads nowhere
    lfm2 = {**_listed_config(hf.Lfm2Config), "tie_embedding": False, "block_ff_dim": 144,
            "block_dim": 64, "conv_dim": 64, "conv_dim_out": 64, "num_heads": 4, "theta": 1e6,
            "block_norm_eps": 1e-5, "block_use_swiglu": True, "use_pos_enc": True,
            "block_use_xavier_init": True, "block_mlp_init_scale": 1.0}
    spec, diags = import_text(json.dumps(lfm2, indent=2), "lfm2_old")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    (tmp_path / "lfm2_old.forge").write_text(spec)
    result = compile_spec(str(tmp_path / "lfm2_old.forge"))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    config = hf.Lfm2Config.from_dict(lfm2)
    assert not config.tie_word_embeddings and config.intermediate_size == 144
    with torch.device("meta"):
        ref = hf.Lfm2ForCausalLM(config)
    assert cost(result.graphs["lfm2_old"]).params_total == sum(
        p.numel() for p in ref.parameters())
    assert "tie = token_embedding" not in spec and "from block_ff_dim = 144" in spec


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
@pytest.mark.parametrize("cls, model_cls", [(hf.BambaConfig, hf.BambaForCausalLM),
                                            (hf.Lfm2Config, hf.Lfm2ForCausalLM)])
def test_bamba_and_lfm2_with_scaled_rope_import_with_parity(tmp_path, cls, model_cls, rope_type):
    # a dynamic scaling reads the context (max_position_embeddings): the hybrids' importer
    # once left it unset, and the import exited 1 without a word
    rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 1000.0}
    torch.manual_seed(0)
    ref = model_cls(_listed_small(cls, rope_parameters=rope)).eval()
    ref.save_pretrained(tmp_path / "hf")
    spec = tmp_path / "scaled.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    assert f"scaling = {rope_type}" in spec.read_text()
    model = load_hf_checkpoint(generate(tmp_path, spec).Transformer().eval(), tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=1e-4, atol=1e-4)
# ---- RoPE scaling: the released configs of DeepSeek-V3 and gpt-oss-120b (YaRN) ------------

# their config.json as on the Hugging Face Hub (deepseek-ai/DeepSeek-V3, openai/gpt-oss-120b)
RELEASED_YARN = {
    "deepseek_v3": '{"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model", "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true, "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 129280}',
    "gpt_oss_120b": '{"architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"], "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": false, "pad_token_id": 199999, "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}, "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false}, "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0", "use_cache": true, "vocab_size": 201088}',
}
# fields of the released files that are not transformers' (DeepSeek's remote code, the
# quantised checkpoints' settings, gpt-oss's original names): acknowledged with --ignore
RELEASED_IGNORE = {
    "deepseek_v3": {"auto_map", "aux_loss_alpha", "ep_size", "moe_layer_freq",
                    "quantization_config", "scoring_func", "seq_aux", "topk_method"},
    "gpt_oss_120b": {"experts_per_token", "initial_context_length", "quantization_config"},
}


@pytest.mark.parametrize("name", list(RELEASED_YARN))
def test_released_yarn_configs_import_as_the_committed_specs_say(tmp_path, name):
    # the YaRN rope_scaling imports; the spec's rope (and DeepSeek's softmax scale) is the
    # committed spec's, argument for argument, with the same parameter count
    text = RELEASED_YARN[name]
    spec, diags = import_text(text, name=name, ignore=RELEASED_IGNORE[name])
    assert not diags.items, [(d.code, d.message) for d in diags.items]
    assert "scaling = yarn" in spec
    path = tmp_path / f"{name}.forge"
    path.write_text(spec)
    got = compile_spec(str(path))
    assert not got.diagnostics.items
    want = compile_spec(f"specs/{name}.forge")
    assert cost(got.graphs[name]).params_total == cost(want.graphs[name]).params_total

    def positions(result):
        model = result.models[name]
        rope = next(c for c in model.all_components() if "positions" in c.op.slots)
        attention = [c for c in model.all_components() if c.op.name in ("mla", "attention")]
        return rope.args, {c.args.get("scale") for c in attention}

    (got_rope, got_scale), (want_rope, want_scale) = positions(got), positions(want)
    assert got_rope["scaling"] == "yarn" and got_rope["scale_factor"] in (40.0, 32.0)
    if name == "deepseek_v3":
        # the committed spec is transformers' default DeepseekV3Config (4,096 positions,
        # plain RoPE; its pp16_ep64 plan trains at 4,096); the released file adds YaRN
        # to 163,840 positions and DeepSeek's mscale² on the softmax scale
        assert want_rope["scaling"] == "none" and got_rope["max_seq_len"] == 163840
        assert got_scale == {0.1352337788608801}
        return
    assert got_rope == want_rope
    assert got_scale == want_scale


def test_gemma3s_global_scaling_reads_the_same_in_both_config_formats():
    # transformers 5 nests it under full_attention; 4.x configs (the released Gemma 3 4B+)
    # write rope_scaling beside rope_theta and rope_local_base_freq: the same rope
    v5 = _family_config(hf.Gemma3TextConfig, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling={"rope_type": "linear", "factor": 8.0})
    specs = []
    for cfg in (v5, v4):
        spec, diags = import_text(json.dumps(cfg, indent=2))
        assert not diags.items, [(d.code, d.message) for d in diags.items]
        specs.append(re.sub(r"#.*", "", spec[spec.index("model m {"):]))
    assert specs[0] == specs[1]
    assert "local_theta = local_rope_theta, scaling = linear, scale_factor = 8.0)" in specs[0]
# ---- further mixture-of-experts families (issue #13) ----------------------------------


def test_sarvam_mla_is_deepseek_v3_under_another_name():
    # the same sizes give the same spec (the header aside): the parity of DeepSeek-V3's
    # (tests/test_parity_hf.py) holds for it
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                 kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                 n_shared_experts=1, initializer_range=0.02, max_position_embeddings=128)
    specs = []
    for cls in (hf.SarvamMLAConfig, hf.DeepseekV3Config):
        spec, diags = import_text(cls(**sizes).to_json_string(use_diff=False))
        assert spec is not None, [(d.code, d.message) for d in diags.items]
        specs.append([line for line in spec.splitlines() if not line.startswith("#")])
    assert specs[0] == specs[1]
    assert any("mla(" in line for line in specs[0])
@pytest.mark.parametrize("layout, rules", [
    # transformers' layer_types from full_attention_interval 4: the last of 4 attends
    ({}, ["default: deltanet_moe", "last 1:  full_moe"]),
    # the Hub's configs state the interval instead of the list (here every 2nd attends);
    # decoder_sparse_step 2 leaves layers 0 and 2 dense
    ({"layer_types": None, "full_attention_interval": 2, "decoder_sparse_step": 2},
     ["default: deltanet", "every 2: full_moe"]),
])
def test_qwen3_next_layouts_import_with_transformers_parameter_count(tmp_path, layout, rules):
    cfg = {k: v for k, v in _qwen3_next_config(**layout).items() if v is not None}
    spec, diags = import_text(json.dumps(cfg, indent=2), "qwen3_next_tiny")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    for rule in rules:
        assert f"    {rule}" in spec
    (tmp_path / "qwen3_next_tiny.forge").write_text(spec)
    result = compile_spec(str(tmp_path / "qwen3_next_tiny.forge"))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    with torch.device("meta"):
        ref = hf.Qwen3NextForCausalLM(hf.Qwen3NextConfig(**cfg))
    assert cost(result.graphs["qwen3_next_tiny"]).params_total == sum(
        p.numel() for p in ref.parameters())


def test_the_default_qwen3_next_config_imports_with_transformers_parameter_count(tmp_path):
    config = hf.Qwen3NextConfig(num_hidden_layers=4)  # 3 DeltaNet layers, 1 attention
    cfg = json.loads(config.to_json_string(use_diff=False))
    spec, diags = import_text(json.dumps(cfg, indent=2), "qwen3_next_default")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    (tmp_path / "qwen3_next_default.forge").write_text(spec)
    result = compile_spec(str(tmp_path / "qwen3_next_default.forge"))
    with torch.device("meta"):
        ref = hf.Qwen3NextForCausalLM(config)
    c = cost(result.graphs["qwen3_next_default"])
    assert c.params_total == sum(p.numel() for p in ref.parameters())
    # per sequence: each DeltaNet layer's last 3 convolution inputs (2·16·128 + 32·128
    # channels) and its states (32 value heads × 128 × 128), bf16
    assert c.state_bytes_per_seq == 3 * (8192 * 3 + 32 * 128 * 128) * 2


# ---- more decoders (issue #13) -------------------------------------------------------------


def test_a_gated_mlp_with_biases_is_written_as_a_module():
    # Granite's mlp_bias (once refused): the SwiGLU said by composition, biases on its three
    # projections (parity: tests/test_parity_hf.py, seed_oss)
    spec, diags = import_text(json.dumps(_family_config(hf.GraniteConfig, mlp_bias=True)))
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert ("  module gated_silu_mlp(x) {\n"
            "    gate_proj = linear(dim, ffn_hidden, bias = true)\n"
            "    up_proj   = linear(dim, ffn_hidden, bias = true)\n"
            "    down_proj = linear(ffn_hidden, dim, bias = true)\n"
            "    return down_proj(silu(gate_proj(x)) * up_proj(x))\n  }") in spec
    assert "    mlp            = gated_silu_mlp()\n" in spec


@pytest.mark.parametrize("cls, key", [
    (hf.GPT2Config, '"n_positions"'),
    (hf.GPTBigCodeConfig, '"n_positions"'),
    (hf.GPTNeoConfig, '"max_position_embeddings"'),
    (hf.OPTConfig, '"max_position_embeddings"'),
    (hf.ApertusConfig, '"hidden_act"'),
])
def test_refused_families_name_the_field(cls, key):
    # families the language cannot say: one located E114 at the field that says why
    text = json.dumps(json.loads(cls().to_json_string(use_diff=False)), indent=2)
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [("E114", *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


_DROP = object()  # a field of the small config the family does not have


@pytest.mark.parametrize("cls, fields, code, key", [
    (hf.SeedOssConfig, {"residual_dropout": 0.0}, "E114", '"attention_dropout"'),  # 0.1
    (hf.GraniteSWAConfig, {"layer_rope_theta": [10000.0, 5e5]}, "E114", "500000.0"),
    (hf.GraniteSWAConfig, {"layer_rope_theta": [10000.0]}, "E116", '"layer_rope_theta"'),
    (hf.Exaone4Config, {"layer_types": ["sliding_attention", "chunked_attention"]}, "E114",
     '"chunked_attention"'),
    (hf.HunYuanDenseV1Config, {"rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0,
                                                   "rope_theta": 10000.0, "factor": 1.0}},
     "E115", '"alpha"'),  # HunYuan's NTK alpha: not transformers' dynamic scaling
    (hf.NemotronConfig, {"hidden_act": "quick_gelu"}, "E114", '"hidden_act"'),
    (hf.FalconConfig, {"alibi": True, "intermediate_size": _DROP, "num_key_value_heads": _DROP},
     "E114", '"alibi"'),
])
def test_more_decoders_errors_point_at_the_key(cls, fields, code, key):
    cfg = {k: v for k, v in _family_config(cls, **fields).items() if v is not _DROP}
    text = json.dumps(cfg, indent=2).replace("[\n    10000.0,\n    500000.0\n  ]",
                                             "[10000.0, 500000.0]")
    spec, diags = import_text(text)
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


@pytest.mark.parametrize("cls, model_cls, fields", [
    (hf.MinistralConfig, hf.MinistralForCausalLM, dict(head_dim=128)),
    (hf.SeedOssConfig, hf.SeedOssForCausalLM, dict(attention_dropout=0.0,
                                                    residual_dropout=0.0)),
    (hf.Ernie4_5Config, hf.Ernie4_5ForCausalLM, {}),
    (hf.GlmConfig, hf.GlmForCausalLM, {}),
    (hf.ArceeConfig, hf.ArceeForCausalLM, {}),
    (hf.VaultGemmaConfig, hf.VaultGemmaForCausalLM, {}),
    (hf.Olmo3Config, hf.Olmo3ForCausalLM, {}),
    (hf.Cohere2Config, hf.Cohere2ForCausalLM, {}),
    (hf.Exaone4Config, hf.Exaone4ForCausalLM, {}),
    (hf.GraniteSWAConfig, hf.GraniteSWAForCausalLM, {}),
    (hf.HunYuanDenseV1Config, hf.HunYuanDenseV1ForCausalLM, dict(num_key_value_heads=8,
                                                                  head_dim=128)),
    (hf.NemotronConfig, hf.NemotronForCausalLM, dict(num_key_value_heads=8)),
    (hf.HeliumConfig, hf.HeliumForCausalLM, {}),
    (hf.BitNetConfig, hf.BitNetForCausalLM, {}),
    (hf.PersimmonConfig, hf.PersimmonForCausalLM, {}),
    (hf.FalconConfig, hf.FalconForCausalLM, {}),
    (hf.FalconConfig, hf.FalconForCausalLM, dict(new_decoder_architecture=True,
                                                  hidden_size=4096, num_attention_heads=64,
                                                  num_kv_heads=8)),
])
def test_more_default_configs_import_with_transformers_parameter_count(tmp_path, cls,
                                                                        model_cls, fields):
    config = cls(num_hidden_layers=2, **fields)
    cfg = json.loads(config.to_json_string(use_diff=False))
    name = cfg["model_type"] + "_default"
    spec, diags = import_text(json.dumps(cfg, indent=2), name)
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    (tmp_path / f"{name}.forge").write_text(spec)
    result = compile_spec(str(tmp_path / f"{name}.forge"))
    assert not result.diagnostics.errors, [d.message for d in result.diagnostics.items]
    with torch.device("meta"):
        ref = model_cls(config)
    assert cost(result.graphs[name]).params_total == sum(p.numel() for p in ref.parameters())


# ---- every family's config, mutated: an import writes a spec or says why ------------------

MUTANTS = [None, 0, -1, 1, 3, 1.5, -0.5, 1e9, "", "x", "relu", True, False, [], {}, [0, 1],
           {"rope_type": "yarn", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}]


def test_mutated_configs_of_every_family_import_or_say_why():
    """1 to 3 fields of each parity family's config deleted or set to a wrong value, 20
    times per family: the importer never raises, and a config it refuses has an error
    (found this way: a null intermediate_size refused in silence, a non-positive
    hidden_size or a missing query_pre_attn_scalar raising)."""
    import copy
    import random

    from test_parity_hf import BASE, FAMILIES

    rng = random.Random(0)
    for name, (cls, _, extra) in FAMILIES.items():
        fields = {k: v for k, v in {**BASE, **copy.deepcopy(extra)}.items()
                  if v is not None or k not in BASE}
        cfg = json.loads(cls(**fields).to_json_string(use_diff=False))
        for _ in range(20):
            mutant = copy.deepcopy(cfg)
            for key in rng.sample(sorted(cfg), rng.randint(1, 3)):
                if rng.random() < 0.25:
                    del mutant[key]
                else:
                    mutant[key] = copy.deepcopy(rng.choice(MUTANTS))
            changed = {k: mutant.get(k, "<deleted>") for k in cfg if mutant.get(k) != cfg[k]}
            spec, diags = import_text(json.dumps(mutant, indent=2), name)
            assert spec is not None or diags.error_count, (name, changed)


@pytest.mark.parametrize("cls, fields, code, key", [
    (hf.Starcoder2Config, {"intermediate_size": None}, "E113", '"intermediate_size"'),
    (hf.Lfm2Config, {"hidden_size": 0}, "E113", '"hidden_size"'),
])
def test_found_by_mutation_errors_point_at_the_key(cls, fields, code, key):
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if cls is hf.Lfm2Config:
        small["layer_types"] = ["conv", "full_attention"]
    text = json.dumps({**json.loads(cls(**small).to_json_string(use_diff=False)), **fields},
                      indent=2)
    spec, diags = import_text(text, "mutant")
    assert spec is None
    assert errors(diags) == [(code, *position(text, key))], [
        (d.code, d.span.line, d.span.col, d.message) for d in diags.items]


def test_a_gemma_config_without_query_pre_attn_scalar_takes_transformers_default():
    cfg = json.loads(hf.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=128).to_json_string(use_diff=False))
    del cfg["query_pre_attn_scalar"]
    spec, diags = import_text(json.dumps(cfg, indent=2), "gemma2_default_scale")
    assert spec is not None, [(d.code, d.message) for d in diags.items]
    assert "query_pre_attn_scalar = 256" in spec and "(default)" in spec


def test_a_tied_head_with_a_bias_is_refused_at_the_config_field():
    # transformers ties GPT-J's lm_head.weight to the embedding and keeps lm_head.bias;
    # a tied head of forgec has no bias (E074): refused where the user's file says it,
    # not in the spec forgec would write
    cfg = hf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                        n_positions=128, tie_word_embeddings=True)
    text = cfg.to_json_string(use_diff=False)
    spec, diags = import_text(text, "gptj_tied")
    assert spec is None
    assert errors(diags) == [("E114", *position(text, '"tie_word_embeddings"'))]


def test_modules_the_importer_writes_are_never_named_like_an_op(tmp_path, monkeypatch):
    """A family whose MLP no op claims (Arcee's two-layer ReLU² MLP, BitNet's gated
    one with a norm inside) is written as a module of the spec, named after its
    activation. An op added later under that name would make the spec E069 (a module
    named like an op): the importer takes another name instead, and the spec still
    compiles."""
    from forgec.compiler.ops import OPS

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    configs = [hf.ArceeConfig(**small).to_dict(), hf.BitNetConfig(**small).to_dict()]
    written = []  # (config, the module the importer writes for its MLP)
    for cfg in configs:
        text, diags = import_text(json.dumps(cfg), name="tiny")
        assert not diags.error_count
        written += [(cfg, m) for m in re.findall(r"^  module (\w+)\(x\) \{$", text, re.M)]
    assert written  # one of them at least, whatever ops exist
    cfg, name = written[0]
    # an op of that name, which no config chooses (only its name matters here)
    some_op = next(iter(OPS.values()))
    monkeypatch.setitem(OPS, name, dataclasses.replace(some_op, foreign={}))
    text, diags = import_text(json.dumps(cfg), name="tiny")
    assert not diags.error_count
    assert f"module {name}(x)" not in text and f"module {name}_module(x) {{" in text
    spec = tmp_path / "tiny.forge"
    spec.write_text(text)
    assert errors(compile_spec(str(spec)).diagnostics) == []
