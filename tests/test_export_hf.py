"""`forgec export-hf`: a run → a transformers checkpoint with the run's logits.

For each family import-hf reads, a tiny random config is imported, trained a
step (so the weights are the run's, not the import's), exported, and loaded by
`transformers.AutoModelForCausalLM.from_pretrained`: its logits equal the run
model's within 1e-5 (the fp32 rounding of two equivalent op orders; see
tests/test_parity_hf.py). Specs the families cannot express are refused with
exit 1 and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as hf
from conftest import THREADS

from forgec.compiler.cli import main as forgec
from forgec.runtime.data import ByteTokenizer
from forgec.runtime.generate import load_run_model

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.15)
FAMILIES = {
    "llama": (hf.LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (hf.MistralConfig, dict(sliding_window=8)),
    "qwen2": (hf.Qwen2Config, dict(num_hidden_layers=4, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=2,
                                   tie_word_embeddings=True)),
    "qwen3": (hf.Qwen3Config, dict(head_dim=24, rms_norm_eps=1e-5, attention_bias=True)),
    "mixtral": (hf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (hf.Qwen3MoeConfig, dict(num_hidden_layers=4, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=48,
                                          head_dim=24, norm_topk_prob=False,
                                          mlp_only_layers=[0, 2])),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def train_run(spec: Path, run: Path, steps: int = 1) -> None:
    assert forgec(["train", str(spec), "--out", str(run), "--steps", str(steps),
                   "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0


def imported_run(tmp: Path, family: str) -> Path:
    config_cls, extra = FAMILIES[family]
    config_cls(**{**BASE, **extra}).save_pretrained(tmp / "hf")
    spec = tmp / f"{family}.forge"
    assert forgec(["import-hf", str(tmp / "hf"), "-o", str(spec)]) == 0
    train_run(spec, tmp / "run")
    return tmp / "run"


def assert_same_logits(run: Path, out: Path, vocab: int = 256) -> None:
    ref = hf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    model, _ = load_run_model(str(run))
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids)
    torch.testing.assert_close(expected, got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_computes_the_runs_logits(tmp_path, family):
    run = imported_run(tmp_path, family)
    out = tmp_path / "out"
    assert forgec(["export-hf", str(run), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert_same_logits(run, out)


def test_a_native_spec_exports_as_llama_with_shards_and_the_byte_tokenizer(tmp_path):
    from forgec.runtime.export import export_hf

    run = tmp_path / "run"
    train_run(ROOT / "specs" / "llama_debug.forge", run)
    out = tmp_path / "out"
    config = export_hf(str(run), str(out), max_shard_size=400_000)
    assert config["model_type"] == "llama" and config["eos_token_id"] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    for name in shards:
        assert (out / name).stat().st_size <= 400_000 + 70_000  # one tensor may overshoot
    assert_same_logits(run, out)
    # the exported tokenizer encodes exactly as the byte tokenizer the run trained with
    tok = hf.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n\treturn x ** 2  # ✓ naïve\n"
    assert tok(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text)
    assert tok.eos_token_id == 0 and tok.decode(ByteTokenizer().encode(text)) == text


def test_the_runs_tokenizer_is_exported(tmp_path):
    from tokenizer_helpers import make_hf_tokenizer

    tok_dir = make_hf_tokenizer(tmp_path / "tok", vocab_size=300)
    hf.LlamaConfig(**{**BASE, "vocab_size": 320}).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tok_dir / name).read_bytes())
    spec = tmp_path / "llama_tok.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    assert (tmp_path / "llama_tok.tokenizer" / "tokenizer.json").exists()
    train_run(spec, tmp_path / "run")
    out = tmp_path / "out"
    assert forgec(["export-hf", str(tmp_path / "run"), "-o", str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    tok = hf.AutoTokenizer.from_pretrained(out)
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot|>")
    assert_same_logits(tmp_path / "run", out, vocab=320)


def test_model_type_is_checked_against_the_spec(tmp_path, capsys):
    run = imported_run(tmp_path, "qwen2")
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x"),
                   "--model-type", "llama"]) == 1
    err = capsys.readouterr().err
    assert "a llama model cannot express this spec: attention_bias puts biases on q, k, v and " \
           "o together" in err
    assert not (tmp_path / "x").exists()


def test_a_spec_no_family_expresses_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train_run(ROOT / "specs" / "gptj_debug.forge", run)
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"forgec: error: cannot export {run}: norm is layernorm(...), not rmsnorm(...)" in err
    assert "Traceback" not in err


def test_a_changed_spec_or_a_full_folder_is_refused(tmp_path, capsys):
    spec = tmp_path / "m.forge"
    spec.write_text((ROOT / "specs" / "llama_debug.forge").read_text().replace(
        "llama_debug", "m"))
    train_run(spec, tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert forgec(["export-hf", str(tmp_path / "run"), "-o", str(tmp_path / "full")]) == 2
    assert "is not empty; --force replaces the checkpoint files in it" in capsys.readouterr().err
    for _ in range(2):  # replaces an export; leaves other files alone
        assert forgec(["export-hf", str(tmp_path / "run"), "-o", str(tmp_path / "full"),
                       "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "x"]
    spec.write_text(spec.read_text() + "\n# edited\n")
    assert forgec(["export-hf", str(tmp_path / "run"), "-o", str(tmp_path / "y")]) == 1
    assert "changed since" in capsys.readouterr().err


# ---- RoPE scaling: export-hf writes back the rope_parameters import-hf read ---------------


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16.0,
     "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.5,
     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
     "original_max_position_embeddings": 32},
    {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
     "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
     "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
     "original_max_position_embeddings": 32},
], ids=lambda r: r["rope_type"] + ("_af" if "attention_factor" in r else ""))
def test_the_rope_scaling_exports_as_it_was_imported(tmp_path, rope):
    from forgec.compiler.driver import compile_spec
    from forgec.runtime.export import describe, hf_config

    source = hf.LlamaConfig(**{**BASE, "head_dim": 16, "rope_parameters": rope})
    source.save_pretrained(tmp_path / "hf")
    spec = tmp_path / "m.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    result = compile_spec(str(spec))
    config = hf_config(describe(result.models["m"]), "llama")
    back = hf.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    assert back.rope_parameters == source.rope_parameters
    assert back.max_position_embeddings == source.max_position_embeddings



# ---- --config: any family import-hf reads, in the config it was imported from ------------

OTHER_FAMILIES = {
    # GeGLU, (1 + w) norms, a scaled embedding; parallel attention + MLP, LayerNorms and a
    # partial rotary; Falcon's new decoder layout
    "gemma": (hf.GemmaConfig, dict(head_dim=16)),
    "gpt_neox": (hf.GPTNeoXConfig, dict(num_key_value_heads=None)),
    "falcon": (hf.FalconConfig, dict(new_decoder_architecture=True, num_kv_heads=2,
                                     intermediate_size=None, num_key_value_heads=None)),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_a_trained_run_exports_in_the_config_it_was_imported_from(tmp_path, family):
    config_cls, extra = OTHER_FAMILIES[family]
    fields = {k: v for k, v in {**BASE, **extra}.items() if v is not None}
    config_cls(**fields).save_pretrained(tmp_path / "hf")
    spec = tmp_path / f"{family}.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    run = tmp_path / "run"
    train_run(spec, run)
    # without --config the family has no config of forgec's own
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x")]) == 1
    out = tmp_path / "out"
    assert forgec(["export-hf", str(run), "-o", str(out), "--config", str(tmp_path / "hf")]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert_same_logits(run, out)


def test_a_config_of_another_model_is_refused_before_writing(tmp_path, capsys):
    run = imported_run(tmp_path, "llama")
    other = tmp_path / "other"
    hf.LlamaConfig(**{**BASE, "intermediate_size": 128}).save_pretrained(other)
    same_sizes = tmp_path / "same_sizes"  # the run's sizes, another norm epsilon
    hf.LlamaConfig(**{**BASE, **FAMILIES["llama"][1], "rms_norm_eps": 0.5}).save_pretrained(
        same_sizes)
    for config, words in ((other, "describes another model than the run's"),
                          (same_sizes, "with the run's weights its logits differ")):
        assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x"), "--config",
                       str(config)]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not (tmp_path / "x").exists()
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x"), "--config",
                   str(tmp_path / "nowhere")]) == 2
    # a config import-hf refuses: its located errors, as import-hf prints them
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "config.json").write_text(json.dumps(
        {**json.loads((other / "config.json").read_text()), "num_attention_heads": 0}, indent=2))
    capsys.readouterr()
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "x"), "--config",
                   str(unreadable)]) == 1
    err = capsys.readouterr().err
    assert "error[E113]: 'num_attention_heads' must be positive, got 0" in err
    assert f"forgec cannot read {unreadable / 'config.json'} (above)" in err
    assert not (tmp_path / "x").exists()
