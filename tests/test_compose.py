"""Composition in specs: element-wise dataflow and modules of the spec's own, compiled
like built-in ops (FQNs, parameters, FLOPs, shapes, tensor parallelism, errors)."""

from __future__ import annotations

import pytest
from conftest import ROOT, codes

from forgec.compiler.cost import cost
from forgec.compiler.driver import compile_spec
from forgec.compiler.plans import tp_plan

MODEL = """\
model m {{
  dim = 64
  hidden = 128
  token_embedding = embedding(256, dim)
{modules}
  block dense(x) {{
    mlp_norm = rmsnorm(dim)
{body}
  }}
  layers = stack(2) {{ default: dense }}
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}}
"""

GEGLU = """\
  module gated_gelu(x) {
    gate_proj = linear(dim, hidden)
    up_proj   = linear(dim, hidden)
    down_proj = linear(hidden, dim)
    return down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))
  }"""


def model(forge, modules: str, *body: str):
    return forge(MODEL.format(modules=modules, body="\n".join(f"    {b}" for b in body)))


def weights(result) -> dict:
    g = result.graphs["m"]
    return {k: v for _, d in g.nodes(data=True) if d["kind"] == "op" for k, v in d["weights"].items()}


def test_a_module_is_a_component_with_nested_fqns_params_and_flops(forge):
    composed, diags = model(forge, GEGLU, "mlp = gated_gelu()", "return x + mlp(mlp_norm(x))")
    assert codes(diags, None) == []
    builtin, diags = model(forge, "", "mlp = geglu(dim, hidden)", "return x + mlp(mlp_norm(x))")
    assert codes(diags, None) == []
    w = weights(composed)
    assert {k: v for k, v in w.items() if k.startswith("layers.0.mlp.")} == {
        "layers.0.mlp.gate_proj.weight": (128, 64),
        "layers.0.mlp.up_proj.weight": (128, 64),
        "layers.0.mlp.down_proj.weight": (64, 128),
    }
    # the same parameter names, shapes, counts and FLOPs as the built-in GeGLU op
    assert w == weights(builtin)
    a, b = cost(composed.graphs["m"]), cost(builtin.graphs["m"])
    assert (a.params_total, a.flops_per_token, a.breakdown) == \
        (b.params_total, b.flops_per_token, b.breakdown)
    mlp = composed.models["m"].blocks["dense"].components["mlp"]
    assert mlp.op.inputs({}) == (("B", "S", 64),) and mlp.op.output({}) == ("B", "S", 64)


def test_a_module_applied_twice_shares_its_parameters(forge):
    result, diags = model(forge, GEGLU, "mlp = gated_gelu()",
                          "return x + mlp(mlp_norm(x)) + mlp(x)")
    assert codes(diags, None) == []
    assert sum(1 for k in weights(result) if k.startswith("layers.0.mlp.")) == 3
    g = result.graphs["m"]
    assert "layers.0.mlp#1.down_proj" in g and g.nodes["layers.0.mlp#1.down_proj"]["weights"] == {}


def test_modules_nest(forge):
    modules = GEGLU + """
  module twice(x) {
    first  = gated_gelu()
    second = gated_gelu()
    return second(first(x)) - x
  }"""
    result, diags = model(forge, modules, "mlp = twice()", "return x + mlp(mlp_norm(x))")
    assert codes(diags, None) == []
    assert "layers.1.mlp.second.down_proj.weight" in weights(result)
    assert tp_plan(result.models["m"]) == {
        "layers.*.mlp.first.down_proj": "rowwise", "layers.*.mlp.first.gate_proj": "colwise",
        "layers.*.mlp.first.up_proj": "colwise", "layers.*.mlp.second.down_proj": "rowwise",
        "layers.*.mlp.second.gate_proj": "colwise", "layers.*.mlp.second.up_proj": "colwise",
    }


def test_tensor_parallelism_is_column_in_row_out(forge):
    result, diags = model(forge, GEGLU, "mlp = gated_gelu()", "return x + mlp(mlp_norm(x))")
    assert tp_plan(result.models["m"]) == {"layers.*.mlp.down_proj": "rowwise",
                                           "layers.*.mlp.gate_proj": "colwise",
                                           "layers.*.mlp.up_proj": "colwise"}


def test_maps_whose_shards_would_meet_whole_tensors_stay_whole(forge):
    # the product leaves the module sharded if both maps split by columns: both stay whole;
    # the norm inside needs a whole input, so `up` feeding it stays whole too, and the
    # nested module keeps its own layout
    modules = GEGLU + """
  module gate_only(x) {
    proj = linear(dim, dim)
    gate = linear(dim, dim)
    return proj(x) * sigmoid(gate(x))
  }
  module normed(x) {
    up = linear(dim, dim)
    n  = rmsnorm(dim)
    inner = gated_gelu()
    return inner(n(up(x)))
  }"""
    result, diags = model(forge, modules, "g = gate_only()", "k = normed()",
                          "return x + g(mlp_norm(x)) + k(x)")
    assert codes(diags, None) == []
    assert tp_plan(result.models["m"]) == {"layers.*.k.inner.down_proj": "rowwise",
                                           "layers.*.k.inner.gate_proj": "colwise",
                                           "layers.*.k.inner.up_proj": "colwise"}


def test_element_wise_shapes_are_checked_inside_modules(forge):
    modules = """\
  module bad(x) {
    wide   = linear(dim, hidden)
    narrow = linear(dim, dim)
    return narrow(x) * wide(x)
  }"""
    _, diags = model(forge, modules, "mlp = bad()", "return x + mlp(mlp_norm(x))")
    assert codes(diags) == [("E055", 8, 12)]
    assert diags.errors[0].message == \
        "cannot multiply (B, S, 64) and (B, S, 128) element-wise"


@pytest.mark.parametrize("modules, body, expected, message", [
    (GEGLU, "return x + mlp(mlp_norm(x), x)", ("E057", 14, 16),
     "'mlp' (module gated_gelu) takes 1 input, got 2"),
    (GEGLU.replace("(x)", "(x, y)", 1), "return x + mlp(mlp_norm(x), x)", ("E067", 5, 24),
     "input 'y' of module 'gated_gelu' is never used"),
])
def test_module_application_errors(forge, modules, body, expected, message):
    _, diags = model(forge, modules, "mlp = gated_gelu()", body)
    assert codes(diags) == [expected]
    assert diags.errors[0].message == message


def test_unknown_module_is_E022_with_a_suggestion(forge):
    _, diags = model(forge, GEGLU, "mlp = gated_gelo()", "return x + mlp(mlp_norm(x))")
    assert codes(diags) == [("E022", 13, 11)]
    assert diags.errors[0].hint == "did you mean 'gated_gelu'?"


def test_recursion_is_E065(forge):
    modules = """\
  module loop(x) {
    again = loop()
    return again(x)
  }"""
    _, diags = model(forge, modules, "mlp = loop()", "return x + mlp(mlp_norm(x))")
    assert codes(diags) == [("E065", 6, 13)]
    assert diags.errors[0].message == "module uses itself: loop → loop"


def test_composed_debug_spec():
    result = compile_spec(str(ROOT / "specs" / "composed_debug.forge"))
    assert result.diagnostics.error_count == 0
    c = cost(result.graphs["composed_debug"])
    # per layer: attention 4·128² (GQA: q, o 128² and k, v 64·128), gate 128², norms 2·128,
    # GeGLU 3·128·256 (layers 0, 2) or ReLU² 2·128·256 (layers 1, 3)
    attention = 2 * 128 * 128 + 2 * 64 * 128
    layer = attention + 128 * 128 + 2 * 128
    expected = 2 * 256 * 128 + 128 + 4 * layer + 2 * 3 * 128 * 256 + 2 * 2 * 128 * 256
    assert c.params_total == expected


def test_module_declarations_parse_as_modules():
    from forgec.compiler.parse import parse

    (section,) = parse("model m { module g(x, y) { p = linear(4, 4)\n return p(x) * y } }",
                       "s.forge").sections
    (decl,) = section.body
    assert decl.kind == "module" and decl.name == "g"
    assert [n for n, _ in decl.inputs] == ["x", "y"] and len(decl.body) == 2


def test_a_module_and_a_block_of_one_name_clash(forge):
    modules = GEGLU + "\n  block gated_gelu(x) { return x }"
    _, diags = model(forge, modules, "mlp = gated_gelu()", "return x + mlp(mlp_norm(x))")
    assert ("E020", 11, 9) in codes(diags)
    assert any(d.message == "block 'gated_gelu' clashes with a module of the same name"
               for d in diags.errors)


def test_a_derived_model_inherits_and_overrides_modules(forge):
    text = MODEL.format(modules=GEGLU, body="    mlp = gated_gelu()\n"
                        "    return x + mlp(mlp_norm(x))") + """
model bigger extends m {
  hidden = 256
  module gated_gelu(x) {
    down_proj = linear(hidden, dim, bias = true)
  }
}
"""
    result, diags = forge(text)
    assert codes(diags, None) == []
    w = {k: v for _, d in result.graphs["bigger"].nodes(data=True) if d["kind"] == "op"
         for k, v in d["weights"].items()}
    assert w["layers.0.mlp.gate_proj.weight"] == (256, 64)
    assert w["layers.0.mlp.down_proj.bias"] == (64,)


def test_an_unapplied_component_of_a_module_is_W002(forge):
    modules = GEGLU.replace("    return", "    spare     = linear(dim, dim)\n    return")
    _, diags = model(forge, modules, "mlp = gated_gelu()", "return x + mlp(mlp_norm(x))")
    assert codes(diags, None) == [("W002", 9, 5)]
    (warning,) = [d for d in diags.items if d.severity == "warning"]
    assert warning.message == "component 'spare' of module 'gated_gelu' is never applied"


def test_the_tp_degree_must_divide_the_features_a_module_splits(forge):
    text = MODEL.format(modules=GEGLU.replace("hidden)", "96)").replace("(hidden,", "(96,"),
                        body="    mlp = gated_gelu()\n    return x + mlp(mlp_norm(x))")
    result, diags = forge(text + "plan tp4 for m {\n  mesh(tp = 4)\n}\n")
    assert codes(diags) == []
    forge_text = text + "plan tp64 for m {\n  mesh(tp = 64)\n}\n"
    _, diags = forge(forge_text)
    assert [d.message for d in diags.errors] == [
        f"tensor-parallel degree 64 does not divide {size} 96 of 'mlp'"
        for size in ("down_proj.in_features", "gate_proj.out_features", "up_proj.out_features")]
    assert {(d.code, d.span.line) for d in diags.errors} == {("E122", 21)}  # at the mesh


@pytest.mark.parametrize("name, cls", [("transformer", "Transformer"), ("dense_block", "DenseBlock"),
                                       ("model_config", "ModelConfig")])
def test_a_module_class_must_not_shadow_generated_classes(forge, name, cls):
    modules = GEGLU.replace("gated_gelu", name) + "\n  block dense(x) { return x }"
    text = MODEL.format(modules=modules, body=f"    mlp = {name}()\n"
                        "    return x + mlp(mlp_norm(x))")
    text = text.replace("  block dense(x) {\n    mlp_norm", "  block main(x) {\n    mlp_norm")
    text = text.replace("default: dense }", "default: main  at 0: dense }")
    _, diags = forge(text)
    assert codes(diags) == [("E059", 5, 10)]
    assert diags.errors[0].message == \
        f"module '{name}' would become class {cls}, which the generated code defines already"


def test_a_module_is_generated_as_a_class_reading_model_config():
    model_py = (ROOT / "generated" / "composed_debug" / "model.py").read_text()
    start = model_py.index("class GegluMlp(nn.Module):")
    cls = model_py[start:model_py.index("\n\n\nclass ", start)]
    assert cls == '''class GegluMlp(nn.Module):
    """Module `geglu_mlp` (specs/composed_debug.forge:20): x (B, S, 128) → (B, S, 128)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(in_dim=config.dim, out_dim=config.hidden)
        self.up_proj = Linear(in_dim=config.dim, out_dim=config.hidden)
        self.down_proj = Linear(in_dim=config.hidden, out_dim=config.dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.gate_proj.init_weights(std, out_std)
        self.up_proj.init_weights(std, out_std)
        self.down_proj.init_weights(out_std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # spec: specs/composed_debug.forge:24
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))'''
    assert "        self.mlp = GegluMlp(config)\n" in model_py
    assert "        h = x + attention * torch.sigmoid(self.gate(a))  # (B, S, 128)\n" in model_py


def test_module_dataflow_is_straight_line_with_shapes(forge, tmp_path):
    from forgec.compiler.emit import emit_package

    modules = """\
  module gated(x) {
    up   = linear(dim, hidden)
    gate = linear(dim, hidden)
    down = linear(hidden, dim)
    u = up(x)
    g = softcap(gate(x) - u, 30.0)
    return down(u * silu(g))
  }"""
    result, diags = model(forge, modules, "mlp = gated()", "return x + mlp(mlp_norm(x))")
    assert codes(diags, None) == []
    files = emit_package(result, "m")
    assert files == emit_package(result, "m")  # deterministic
    body = files["model.py"]
    assert "        u = self.up(x)  # (B, S, 128)\n" in body
    assert "        g = 30.0 * torch.tanh((self.gate(x) - u) / 30.0)  # (B, S, 128)\n" in body
    assert "        return self.down(u * F.silu(g))\n" in body
