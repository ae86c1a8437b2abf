"""`forgec import-kf`: KempnerForge [model] tables → specs, and KF checkpoints load as they are.

KempnerForge facts used here (its `ModelConfig` and model code): the MLP width is
`ffn_hidden_dim`, else 256·ceil(int(4·dim·2/3·ffn_dim_multiplier)/256); layer i
is a mixture of experts iff (i + 1) % moe_frequency == 0; the state-dict names
of a dense model are `token_embedding.embedding.weight`,
`layers.{i}.attention_norm.*`, `layers.{i}.attention.{q,k,v,o}_proj.weight`
(`q_norm`/`k_norm` with qk_norm), `layers.{i}.mlp_norm.*`,
`layers.{i}.mlp.{gate,up,down}_proj.weight` (SwiGLU; `up`/`down` for GELU and
ReLU), `norm.*`, `output_head.proj.weight` — written out below by hand, not
derived from forgec's own model.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_forgec

from forgec.compiler.build import build
from forgec.compiler.cost import cost
from forgec.compiler.diagnostics import Diagnostics
from forgec.compiler.driver import compile_spec
from forgec.compiler.importers import kf
from forgec.compiler.importers.common import JSONSyntaxError, parse_toml
from forgec.compiler.importers.kf import import_kf

LLAMA_7B = """\
# Llama 7B model configuration.

[model]
dim = 4096
n_layers = 32
n_heads = 32
n_kv_heads = 32
vocab_size = 32000
ffn_hidden_dim = 11008
norm_type = "rmsnorm"
activation = "silu"
max_seq_len = 4096
rope_theta = 10000.0
tie_embeddings = false
"""


def convert(text: str, name: str = "m", **kw) -> tuple[str | None, Diagnostics]:
    diags = Diagnostics()
    try:
        src = parse_toml(textwrap.dedent(text), "model.toml")
    except JSONSyntaxError as e:
        diags.error("E110", str(e), e.span)
        return None, diags
    return import_kf(src, name, "model.toml", diags, **kw), diags


def compiled(tmp: Path, text: str, name: str):
    spec = tmp / f"{name}.forge"
    spec.write_text(text)
    result = compile_spec(str(spec))
    assert not result.diagnostics.items, [d.message for d in result.diagnostics.items]
    return spec, result


def generate(tmp: Path, spec: Path):
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    path = tmp / "pkg" / spec.stem / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"kf_{spec.stem}_{id(tmp)}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def errors(diags: Diagnostics) -> list[tuple[str, int, int]]:
    return [(d.code, d.span.line, d.span.col) for d in diags.sorted() if d.severity == "error"]


def test_llama_7b_has_its_published_size(tmp_path):
    (tmp_path / "llama_7b.toml").write_text(LLAMA_7B)
    out = tmp_path / "llama_7b.forge"
    proc = run_forgec("import-kf", str(tmp_path / "llama_7b.toml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "model llama_7b, 32 layers, 6,738,415,616 parameters" in proc.stderr
    text = out.read_text()
    assert re.search(r"^  ffn_hidden\s+= 11008\s+# ffn_hidden_dim$", text, re.M)
    assert re.search(r"^  norm_eps\s+= 1e-5\s+# norm_eps \(default\)$", text, re.M)
    assert run_forgec("check", "-q", str(out)).returncode == 0


@pytest.mark.parametrize("dim, mult", [(4096, 1.3), (2048, 1.0), (768, 1.5), (1600, 1.2),
                                       (5120, 1.3), (320, 0.75)])
def test_mlp_width_is_kempnerforges(tmp_path, dim, mult):
    text, diags = convert(f"[model]\ndim = {dim}\nn_heads = 8\nn_layers = 2\n"
                          f"ffn_dim_multiplier = {mult}\n")
    assert not diags.items
    _, result = compiled(tmp_path, text, "m")
    expected = 256 * math.ceil(int(4 * dim * (2 / 3) * mult) / 256)
    assert result.models["m"].params["ffn_hidden"] == expected
    assert "ffn_hidden(dim, multiplier = ffn_multiplier, multiple_of = 256)" in text


def test_mlp_width_falls_back_to_the_number_where_the_formulas_differ(monkeypatch):
    monkeypatch.setattr(kf, "kf_ffn_hidden", lambda dim, mult: 4352)
    text, diags = convert("[model]\ndim = 1024\nn_heads = 8\nn_layers = 2\n")
    assert not diags.items
    assert re.search(r"^  ffn_hidden\s+= 4352\s+# 256·ceil", text, re.M)
    assert "ffn_hidden(dim" not in text


def test_moe_layers_every_frequency_with_a_shared_expert(tmp_path):
    text, diags = convert("""\
        [model]
        dim = 64
        n_layers = 6
        n_heads = 4
        n_kv_heads = 2
        vocab_size = 128
        ffn_hidden_dim = 96
        num_experts = 4
        moe_top_k = 2
        moe_frequency = 3
        moe_shared_experts = 1
        moe_aux_loss_weight = 0.02
        moe_expert_ffn_multiplier = 0.5

        [train]
        batch_size = 8
        """, name="kmoe")
    assert not diags.items, errors(diags)
    assert "every 3: sparse" in text and "Not read (training settings): [train]." in text
    spec, result = compiled(tmp_path, text, "kmoe")
    model = result.models["kmoe"]
    assert [slot.block for slot in model.layers] == ["dense", "dense", "sparse"] * 2
    assert model.params["expert_hidden"] == 48  # 96 · 0.5
    # KempnerForge's own count: attention, E experts + router + one shared expert, norms
    d, h, e, kv = 64, 96, 4, 2
    attn = d * d + 2 * d * (kv * 16) + d * d
    moe_layer = attn + e * 3 * d * 48 + d * e + 3 * d * 48 + 2 * d
    dense_layer = attn + 3 * d * h + 2 * d
    assert cost(result.graphs["kmoe"]).params_total == \
        2 * moe_layer + 4 * dense_layer + 2 * 128 * d + d
    mod = generate(tmp_path, spec)
    m = mod.Transformer()
    assert type(m.layers["2"].mlp).__name__ == "MoE" and m.layers["2"].mlp.shared_experts
    assert m.layers["2"].mlp.router.renormalize


def test_sigmoid_router_takes_the_schedule(tmp_path):
    text, diags = convert("""\
        [model]
        dim = 64
        n_layers = 2
        n_heads = 4
        num_experts = 4
        moe_router = "sigmoid_topk"
        moe_bias_schedule = "cosine_decay"
        moe_sequence_aux_loss_weight = 0.001
        """, name="ksig")
    assert not diags.items
    assert "router = sigmoid_topk(schedule = cosine_decay, seq_aux_loss_weight = 0.001)" in text
    compiled(tmp_path, text, "ksig")


def kf_dense_state_dict(n_layers, dim, heads, kv, hidden, vocab, *, qk_norm, layernorm,
                        gated, tied):
    """The state dict of a dense KempnerForge Transformer, by its (known) key names."""
    hd = dim // heads
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    norm = (lambda p: {f"{p}.weight": r(dim), f"{p}.bias": r(dim)}) if layernorm \
        else (lambda p: {f"{p}.weight": r(dim)})
    sd = {"token_embedding.embedding.weight": r(vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd.update(norm(p + "attention_norm"))
        sd[p + "attention.q_proj.weight"] = r(heads * hd, dim)
        sd[p + "attention.k_proj.weight"] = r(kv * hd, dim)
        sd[p + "attention.v_proj.weight"] = r(kv * hd, dim)
        sd[p + "attention.o_proj.weight"] = r(dim, heads * hd)
        if qk_norm:
            sd[p + "attention.q_norm.weight"] = r(hd)
            sd[p + "attention.k_norm.weight"] = r(hd)
        sd.update(norm(p + "mlp_norm"))
        if gated:
            sd[p + "mlp.gate_proj.weight"] = r(hidden, dim)
        sd[p + "mlp.up_proj.weight"] = r(hidden, dim)
        sd[p + "mlp.down_proj.weight"] = r(dim, hidden)
    sd.update(norm("norm"))
    sd["output_head.proj.weight"] = sd["token_embedding.embedding.weight"] if tied \
        else r(vocab, dim)
    return sd


@pytest.mark.parametrize("norm_type, activation, qk_norm, tied", [
    ("rmsnorm", "silu", True, False),
    ("layernorm", "gelu", False, True),
    ("rmsnorm", "relu", False, False),
])
def test_a_kempnerforge_state_dict_loads_strictly(tmp_path, norm_type, activation, qk_norm,
                                                   tied):
    text, diags = convert(f"""\
        [model]
        dim = 64
        n_layers = 2
        n_heads = 4
        n_kv_heads = 2
        vocab_size = 128
        ffn_hidden_dim = 96
        norm_type = "{norm_type}"
        activation = "{activation}"
        qk_norm = {str(qk_norm).lower()}
        tie_embeddings = {str(tied).lower()}
        max_seq_len = 64
        """, name="kdense")
    assert not diags.items, errors(diags)
    spec, _ = compiled(tmp_path, text, "kdense")
    model = generate(tmp_path, spec).Transformer()
    sd = kf_dense_state_dict(2, 64, 4, 2, 96, 128, qk_norm=qk_norm,
                             layernorm=norm_type == "layernorm", gated=activation == "silu",
                             tied=tied)
    model.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert (model.output_head.proj.weight is model.token_embedding.embedding.weight) == tied
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 8)))).all()


def test_defaults_are_kempnerforges_and_say_so():
    text, diags = convert("[model]\ndim = 256\nn_heads = 4\n")
    assert not diags.items
    assert re.search(r"^  n_layers\s+= 32\s+# n_layers \(default\)$", text, re.M)
    assert re.search(r"^  vocab_size\s+= 32000\s+# vocab_size \(default\)$", text, re.M)
    assert re.search(r"^  n_kv_heads\s+= 4\s+# n_kv_heads \(default\) = n_heads$", text, re.M)
    assert re.search(r"^  max_seq_len\s+= 2048\s+# max_seq_len \(default\)$", text, re.M)


def test_dense_models_ignore_the_moe_settings_like_kempnerforge():
    text, diags = convert("[model]\ndim = 64\nn_heads = 4\nmoe_top_k = 3\n"
                          "moe_capacity_factor = 1.5\n")
    assert not diags.items and "moe(" not in text


@pytest.mark.parametrize("body, code, line, col", [
    ('model_type = "mot"', "E111", 3, 1),
    ('norm_type = "batchnorm"', "E114", 3, 1),
    ('activation = "swiglu"', "E114", 3, 1),
    ("num_experts = 4\nmoe_gradient_scale = true", "E114", 4, 1),
    ('num_experts = 4\nactivation = "gelu"', "E114", 4, 1),
    ('num_experts = 4\nmoe_router = "expert_choice"', "E114", 4, 1),
    ("num_experts = 4\nmoe_top_k = 5", "E113", 4, 1),
    ("dim = 66", "E113", 2, 1),  # n_heads 4 does not divide it
    ('dim = "64"', "E113", 3, 1),
    ("rope_scaling = 8.0", "E115", 3, 1),
    ("n_layers = 2\n\n[model.vlm]\narch = \"joint_decoder\"", "E114", 5, 1),
    ("dim = 64\ndim = 128", "E110", 4, 10),  # where tomllib stops
])
def test_errors_point_at_the_key(body, code, line, col):
    _, diags = convert(f"[model]\nn_heads = 4\n{body}\n")
    assert errors(diags) == [(code, line, col)], [(d.code, d.span.line, d.span.col, d.message)
                                                  for d in diags.items]


def test_unknown_fields_can_be_acknowledged():
    text, diags = convert("[model]\ndim = 64\nn_heads = 4\nmy_knob = 1\n",
                          ignore={"model.my_knob"})
    assert not diags.items and text is not None


def test_cli_reports_with_the_toml_line(tmp_path):
    cfg = tmp_path / "moe.toml"
    cfg.write_text("[model]\ndim = 64\nn_heads = 4\nnum_experts = 8\n"
                   "moe_capacity_factor = 1.25\n")
    out = tmp_path / "moe.forge"
    proc = run_forgec("import-kf", str(cfg), "-o", str(out))
    assert proc.returncode == 1
    assert "moe.toml:5:1: error[E114]: moe_capacity_factor = 1.25 cannot be expressed" \
        in proc.stderr
    assert " 5 | moe_capacity_factor = 1.25" in proc.stderr and not out.exists()
    assert run_forgec("import-kf", str(tmp_path), "-o", str(out)).returncode == 2
