"""Parallel plans: binding, validation with locations, stage splits, plan.py data."""

from __future__ import annotations

import importlib

import pytest
from conftest import ROOT

from forgec.compiler.driver import compile_spec
from forgec.compiler.plans import auto_split, plan_data

LLAMA = (ROOT / "specs" / "llama_debug.forge").read_text()
BASE = LLAMA[: LLAMA.index("# ---- parallel plans")]


def errors(diags):
    return [(d.code, d.span.line, d.span.col) for d in diags.errors]


def with_plan(body: str) -> str:
    return BASE + "plan p for llama_debug {\n" + body + "\n}\n"


def line_of_plan(offset: int) -> int:
    """Line number of the plan body's line `offset` (1 = first line inside)."""
    return BASE.count("\n") + 1 + offset


def test_committed_plans_bind_and_are_listed():
    comp = compile_spec("specs/llama_debug.forge")
    assert set(comp.plans) == {"fsdp2", "pp2", "pp2_gpipe", "pp2_interleaved", "fsdp2_pp2",
                               "tp2", "dp2_tp2"}
    assert comp.plans["dp2_tp2"].mesh == {"dp": 2, "pp": 1, "tp": 2, "ep": 1}
    assert comp.plans["fsdp2"].mesh == {"dp": 2, "pp": 1, "tp": 1, "ep": 1}
    assert comp.plans["fsdp2_pp2"].world == 4
    big = compile_spec("specs/llama3_70b.forge")
    assert big.plans["dp64_pp8"].world == 512


@pytest.mark.parametrize("body, expected", [
    ("  mesh(dp = 2)\n  fdsp()", [("E091", 2, 3)]),
    ("  mesh(dp = 2)\n  mesh(dp = 4)", [("E091", 2, 3)]),
    ("  mesh(dpp = 2)", [("E023", 1, 8)]),
    ("  mesh(dp = 0)", [("E026", 1, 13)]),
    ("  mesh(pp = 2)\n  pipeline(schedule = pipedream)", [("E026", 2, 23)]),
    ("  activation_checkpoint(sparse = full)", [("E092", 1, 25)]),
    ("  activation_checkpoint(dense = half)", [("E092", 1, 33)]),
    ("  activation_checkpoint(dense = selectiv(every = 2))", [("E092", 1, 33)]),
    ("  activation_checkpoint(dense = selective(evry = 2))", [("E023", 1, 43)]),
    ("  activation_checkpoint(dense = selective(every = 0))", [("E026", 1, 51)]),
    ("  activation_checkpoint(dense = selective(save = [matmul, softmax]))",
     [("E093", 1, 59)]),
    ("  activation_checkpoint(dense = selective(save = []))", [("E093", 1, 50)]),
    ("  activation_checkpoint(dense = selective(save = [matmul, matmul]))", [("E093", 1, 59)]),
    ("  x = 1", [("E091", 1, 3)]),
])
def test_plan_binding_errors_are_located(forge, body, expected):
    comp, diags = forge(with_plan(body))
    base = line_of_plan(0)
    assert errors(diags) == [(c, base + line, col) for c, line, col in expected]


SPARSE_EVERY_2 = """
  block sparse(x) extends dense {
    mlp = swiglu(dim, hidden = 128)
  }
  layers = stack(n_layers) {
    default:        dense
    every 2 from 1: sparse
  }
"""


def test_a_selective_policy_that_checkpoints_no_layer_of_its_kind_is_located(forge):
    """`every` counts over all layers: the sparse layers 1 and 3 hold no multiple of 2."""
    src = with_plan("  activation_checkpoint(sparse = selective(every = 2), dense = full)")
    src = src.replace("  layers      = stack(n_layers) { default: dense }\n", SPARSE_EVERY_2)
    comp, diags = forge(src)
    line = src[: src.index("activation_checkpoint(sparse")].count("\n") + 1
    assert errors(diags) == [("E094", line, 25)]
    assert "they are layers 1, 3" in diags.errors[0].message
    comp, diags = forge(src.replace("every = 2", "every = 3"))  # layer 3 is sparse
    assert errors(diags) == []
    data = plan_data(comp.plans["p"], comp.models["llama_debug"], comp.graphs["llama_debug"])
    assert data["activation_checkpoint"] == ["layers.0", "layers.2", "layers.3"]


@pytest.mark.parametrize("mode, layers, saves", [
    ("none", [], None),
    ("full", ["layers.0", "layers.1", "layers.2", "layers.3"], None),
    ("selective", ["layers.0", "layers.2"], None),
    ("selective()", ["layers.0", "layers.2"], None),
    ("selective(every = 3)", ["layers.0", "layers.3"], None),
    ("selective(every = n_layers / 2)", ["layers.0", "layers.2"], None),
    ("selective(save = [matmul])", ["layers.0", "layers.1", "layers.2", "layers.3"],
     ["matmul"]),
    ("selective(save = [matmul, sdpa], every = 2)", ["layers.0", "layers.2"],
     ["matmul", "sdpa"]),
    ('selective(save = ["sdpa"])', ["layers.0", "layers.1", "layers.2", "layers.3"],
     ["sdpa"]),
])
def test_checkpointing_policies_become_plan_data(forge, mode, layers, saves):
    comp, diags = forge(with_plan(f"  activation_checkpoint(default = {mode})"))
    assert errors(diags) == []
    data = plan_data(comp.plans["p"], comp.models["llama_debug"], comp.graphs["llama_debug"])
    assert data["activation_checkpoint"] == layers
    if saves is None:
        assert "activation_checkpoint_save" not in data
    else:
        assert data["activation_checkpoint_save"] == {u: saves for u in layers}


def test_plan_without_a_target_and_with_an_unknown_target(forge):
    comp, diags = forge(BASE + "plan p {\n  mesh(dp = 2)\n}\n")
    assert errors(diags) == [("E090", line_of_plan(0), 6)]
    comp, diags = forge(BASE + "plan p for llama_debu {\n  mesh(dp = 2)\n}\n")
    assert errors(diags) == [("E021", line_of_plan(0), 12)]
    assert diags.errors[0].hint == "did you mean 'llama_debug'?"


@pytest.mark.parametrize("body, code, offset", [
    ("  mesh(pp = 8)\n  pipeline(microbatches = 8)", "E121", 1),     # 8 stages, 4 layers
    ("  mesh(pp = 2)", "E121", 1),                                     # pp without pipeline
    ("  mesh(pp = 2)\n  pipeline(schedule = interleaved_1f1b)", "E125", 2),
    ("  mesh(pp = 2)\n  pipeline(schedule = zbv, virtual_stages = 1)", "E125", 2),
    ("  mesh(pp = 2)\n  pipeline(schedule = gpipe, virtual_stages = 2)", "E125", 2),
    ("  mesh(pp = 2)\n  pipeline(microbatches = 1)", "E127", 2),
    ("  mesh(tp = 4)", "E122", 1),                                     # 4 ∤ 2 KV heads
    ("  mesh(dp = 4, ep = 3)", "E123", 1),
    ('  mesh(pp = 2)\n  pipeline(split = [["layers.0"], ["layers.1", "layers.2", "layers.3"],'
     ' ["layers.4"]])', "E126", 2),
    ('  mesh(pp = 2)\n  pipeline(split = [["layers.0", "layers.2"], ["layers.1", "layers.3"]])',
     "E126", 2),
    ('  mesh(pp = 2)\n  pipeline(split = [["layers.0", "layers.1"], ["layers.2", "layer.3"]])',
     "E126", 2),
])
def test_plan_validation_errors_are_located(forge, body, code, offset):
    comp, diags = forge(with_plan(body))
    found = errors(diags)
    assert len(found) == 1 and found[0][:2] == (code, line_of_plan(offset)), found


def test_expert_parallelism_needs_experts(forge):
    comp, diags = forge(with_plan("  mesh(dp = 2, ep = 2)\n  fsdp()"))
    [err] = diags.errors
    assert (err.code, err.span.line, err.span.col) == ("E123", line_of_plan(1), 16)
    assert err.message == ("expert-parallel degree 2 needs mixture-of-experts layers; "
                           "'llama_debug' has no moe")


@pytest.mark.parametrize("extra, words", [
    ("qk_norm = true, qk_norm_over = projection", "qk_norm_over = projection"),
    ("out_norm = true", "out_norm spans every head's output"),
    ("sinks = true", "learned sinks are one parameter for all heads"),
])
def test_a_norm_over_all_heads_refuses_tensor_parallelism(forge, extra, words):
    # OLMo 2's qk-norm and BitNet's out_norm read every head at once: a rank holding half
    # of them cannot run them, so a tp plan is E161 at compile time (forgec plan and
    # training once raised at run time)
    old = "attention(dim, heads = n_heads, kv_heads = n_kv_heads, rope = rope)"
    new = f"attention(dim, heads = n_heads, kv_heads = n_kv_heads, rope = rope, {extra})"
    assert old in BASE
    comp, diags = forge(BASE.replace(old, new) + "plan p for llama_debug {\n  mesh(tp = 2)\n}\n")
    [err] = diags.errors
    assert (err.code, err.span.line, err.span.col) == ("E161", line_of_plan(1), 8)
    assert "tensor parallelism cannot split attention 'attention'" in err.message
    assert words in err.message


def test_tied_head_across_stages_is_recorded_for_the_runtime(forge):
    """The embedding goes to the first stage, the head to the last: plan data
    names the shared weight and its copy, so the runtime keeps them equal."""
    from forgec.compiler.plans import plan_data

    text = with_plan("  mesh(pp = 2)\n  pipeline()").replace(
        "output_head = lm_head(dim, vocab_size)",
        "output_head = lm_head(dim, vocab_size, tie = token_embedding)")
    comp, diags = forge(text)
    assert not diags.errors
    plan = next(iter(comp.plans.values()))
    data = plan_data(plan, comp.models[plan.target], comp.graphs[plan.target])
    assert data["pipeline"]["tied"] == [
        {"weights": ["token_embedding.embedding.weight", "output_head.proj.weight"],
         "stages": [0, 1]}]
    # an untied head: nothing to keep in step
    comp, diags = forge(with_plan("  mesh(pp = 2)\n  pipeline()"))
    plan = next(iter(comp.plans.values()))
    data = plan_data(plan, comp.models[plan.target], comp.graphs[plan.target])
    assert "stages" in data["pipeline"] and "tied" not in data["pipeline"]


def test_world_size_must_match_the_mesh():
    from forgec.compiler.diagnostics import Diagnostics
    from forgec.compiler.plans import validate

    comp = compile_spec("specs/llama3_70b.forge")
    plan = comp.plans["dp64_pp8"]
    diags = Diagnostics()
    validate(plan, comp.models["llama3_70b"], comp.graphs["llama3_70b"], diags, world=256)
    assert [(d.code, d.message) for d in diags.errors] == [
        ("E120", "plan 'dp64_pp8' needs 512 ranks (dp 64 × pp 8 × tp 1), not 256")]


def test_auto_split_balances_flops_and_keeps_order():
    units = [f"layers.{i}" for i in range(10)]
    costs = {u: (1, 10) for u in units}
    stages = auto_split(units, costs, 4, first=0, last=15)
    assert [u for s in stages for u in s] == units
    loads = [sum(10 for _ in s) + (15 if i == 3 else 0) for i, s in enumerate(stages)]
    assert max(loads) == 30  # optimum: the head's stage gets one layer
    assert [len(s) for s in stages] == [3, 3, 3, 1]
    assert auto_split(units, costs, 10, 0, 0) == [[u] for u in units]


def test_70b_plan_stages_are_balanced():
    comp = compile_spec("specs/llama3_70b.forge")
    data = plan_data(comp.plans["dp64_pp8"], comp.models["llama3_70b"],
                     comp.graphs["llama3_70b"])
    stages = data["pipeline"]["stages"]
    assert len(stages) == 16 and stages[0][0] == "token_embedding"
    assert stages[-1][-2:] == ["norm", "output_head"]
    flops = data["pipeline"]["stage_flops"]
    assert max(flops) / (sum(flops) / len(flops)) < 1.2
    assert sum(len([f for f in s if f.startswith("layers.")]) for s in stages) == 80
    assert data["activation_checkpoint"] == [f"layers.{i}" for i in range(80)]


def test_generated_plan_module_carries_the_plans():
    from forgec.runtime.parallel import stages_of_rank

    plan = importlib.import_module("generated.llama_debug.plan")
    assert plan.PLANS["fsdp2"]["fsdp"]["units"] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert plan.PLANS["pp2_interleaved"]["pipeline"]["stages"] == [
        ["token_embedding", "layers.0"], ["layers.1"], ["layers.2"],
        ["layers.3", "norm", "output_head"]]
    assert stages_of_rank(plan, "pp2_interleaved", 1) == [1, 3]
    assert plan.PLANS["fsdp2_pp2"]["activation_checkpoint"] == ["layers.0", "layers.2"]
    assert "activation_checkpoint_save" not in plan.PLANS["fsdp2_pp2"]
    sac = importlib.import_module("generated.llama3_8b.plan").PLANS["fsdp8_sac"]
    layers = [f"layers.{i}" for i in range(32)]
    assert sac["activation_checkpoint"] == layers
    assert sac["activation_checkpoint_save"] == {u: ["matmul", "sdpa"] for u in layers}
    assert plan.TP_PLAN["layers.*.attention.o_proj"] == "rowwise"


PLAN_DATA = {"LAYER_FQNS", "STAGE_MODULES", "STAGE_STACKS", "TP_PLAN", "EXPERT_FQNS", "PLANS"}


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (ROOT / "generated").glob("*/plan.py")))
def test_generated_plan_py_is_data_only(name):
    """plan.py is a docstring and literal assignments, nothing that runs: the code
    applying plans is runtime/parallel.py's."""
    import ast

    tree = ast.parse((ROOT / "generated" / name / "plan.py").read_text())
    doc, *body = tree.body
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    assigned = set()
    for node in body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)[:80]
        ast.literal_eval(node.value)  # raises on anything but a literal
        assigned.add(node.targets[0].id)
    assert assigned == PLAN_DATA


def test_tp_plan_splits_the_layers_and_leaves_the_rest_whole():
    """forgec.runtime.parallel.apply_tp shards exactly the modules TP_PLAN names, column-
    or row-wise as it says; the embedding, norms and head stay plain tensors."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from forgec.runtime.parallel import apply_tp
    from forgec.runtime.planner import _destroy, _init_fake
    from generated.llama_debug import Transformer
    from generated.llama_debug import plan as plans

    _init_fake(0, 2)
    try:
        with torch.device("meta"):
            model = Transformer()
        apply_tp(model, init_device_mesh("cpu", (2,)), plans)
        split = {}
        for fqn, p in model.named_parameters():
            if isinstance(p, DTensor):
                (placement,) = p.placements
                assert isinstance(placement, Shard)
                split[fqn] = placement.dim
    finally:
        _destroy()
    dims = {"colwise": 0, "rowwise": 1}  # nn.Linear weights are (out, in)
    want = {f"layers.{i}.{rest}.weight": dims[style]
            for pattern, style in plans.TP_PLAN.items()
            for i in range(4) for rest in [pattern.removeprefix("layers.*.")]}
    assert split == want
    assert len(want) == 4 * 7


def test_build_stage_keeps_only_the_stage_and_its_fqns():
    import torch

    from forgec.runtime.parallel import build_stage
    from generated.llama_debug import Transformer
    from generated.llama_debug import plan as plans

    with torch.device("meta"):
        model = Transformer()
    first = build_stage(model, 0, plans, "pp2")
    assert list(first.layers) == ["0", "1"] and first.norm is None and first.output_head is None
    names = {n for n, _ in first.named_parameters()}
    assert "layers.1.attention.q_proj.weight" in names and "token_embedding.embedding.weight" in names
    assert not any(n.startswith(("layers.2", "norm", "output_head")) for n in names)


# ---- plans for vision-language models ------------------------------------------------

XATTN = (ROOT / "specs" / "vlm_xattn.forge").read_text()


def test_vlm_plan_shards_vision_decoder_and_cross_attention_layers(tmp_path):
    from forgec.compiler.plans import vlm_plan_data

    for name in ("llama_debug.forge", "vlm.forge", "vlm_xattn.forge"):
        (tmp_path / name).write_text((ROOT / "specs" / name).read_text())
    spec = tmp_path / "vlm_xattn.forge"
    spec.write_text(XATTN + "\nplan dp2 for vlm_xattn {\n  mesh(dp = 2)\n  fsdp()\n"
                    "  activation_checkpoint(dense = full)\n}\n")
    comp = compile_spec(str(spec))
    data = vlm_plan_data(comp.plans["dp2"], comp.vlms["vlm_xattn"], comp.models)
    # a gated cross-attention block after every 2nd decoder layer, each its own unit
    assert data["fsdp"]["units"] == [
        "vision_encoder.layers.0", "vision_encoder.layers.1",
        "transformer.layers.0", "transformer.layers.1",
        "transformer.cross_attention_layers.0",
        "transformer.layers.2", "transformer.layers.3",
        "transformer.cross_attention_layers.1"]
    assert data["activation_checkpoint"] == [f"transformer.layers.{i}" for i in range(4)]
    assert data["world"] == 2


def test_vlm_plan_units_exist_in_the_generated_model():
    import torch

    from generated.vlm import VLM
    from generated.vlm.plan import PLANS

    with torch.device("meta"):
        model = VLM()
    units = PLANS["fsdp2_vlm"]["fsdp"]["units"]
    assert units[:2] == ["vision_encoder.layers.0", "vision_encoder.layers.1"]
    for fqn in units:
        model.get_submodule(fqn)  # raises if the FQN names nothing
    assert compile_spec("specs/vlm.forge").plans["fsdp2_vlm"].world == 2


def vlm_plan_errors(tmp_path, directives: str, target: str = "vlm") -> list:
    """The errors of a plan for the shipped `target` vlm, (code, line in the plan
    section, col), and the diagnostics."""
    from forgec.compiler.diagnostics import CompileFailed

    for name in ("llama_debug.forge", "vlm.forge", "vlm_xattn.forge"):
        (tmp_path / name).write_text((ROOT / "specs" / name).read_text())
    spec = tmp_path / f"{target}.forge"
    text = spec.read_text()
    start = text.count("\n") + 1  # the plan's first line
    spec.write_text(text + f"plan bad for {target} {{\n{directives}\n}}\n")
    with pytest.raises(CompileFailed) as e:
        compile_spec(str(spec))
    errs = e.value.diagnostics.errors
    return [(d.code, d.span.line - start + 1, d.span.col) for d in errs], errs


@pytest.mark.parametrize("directives, where", [
    ("  mesh(dp = 2, ep = 2)\n  fsdp()", [(2, 16)]),
    ("  mesh(tp = 2, pp = 2)\n  pipeline()", [(2, 8)]),
])
def test_vlm_plans_refuse_tensor_and_expert_parallelism(tmp_path, directives, where):
    got, errs = vlm_plan_errors(tmp_path, directives)
    assert got == [("E128", line, col) for line, col in where]
    assert "forgec runs vlm plans with data and pipeline parallelism only" in errs[0].message


V0, V1 = '"vision_encoder.layers.0"', '"vision_encoder.layers.1"'
D = [f'"transformer.layers.{i}"' for i in range(4)]


@pytest.mark.parametrize("target, directives, code, where, words", [
    # the units are the vision encoder's layers, then the decoder's: 6, not 4
    ("vlm", "  mesh(pp = 8)\n  pipeline(microbatches = 8)", "E121", (2, 8),
     "8 pipeline stages for 6 layers"),
    ("vlm", f"  mesh(pp = 2)\n  pipeline(split = [[{V0}, {D[0]}], [{V1}, {', '.join(D[1:])}]])",
     "E126", (3, 12), "in order: layers out of order"),
    ("vlm", f"  mesh(pp = 2)\n  pipeline(split = [[{V0}, {V1}], [{', '.join(D[:3])}]])",
     "E126", (3, 12), "missing 'transformer.layers.3'"),
    ("vlm", f"  mesh(pp = 2)\n  pipeline(split = [[{V0}, {V1}, \"layers.0\"], [{', '.join(D[1:])}]])",
     "E126", (3, 12), "unknown 'layers.0'"),
    ("vlm_xattn", f"  mesh(pp = 2)\n  pipeline(split = [[{V0}, {V1}, {D[0]}, {D[1]}, "
     f"\"transformer.cross_attention_layers.0\"], [{D[2]}, {D[3]}]])",
     "E126", (3, 12), "unknown 'transformer.cross_attention_layers.0'"),
    ("vlm", "  mesh(pp = 2)\n  pipeline(microbatches = 1)", "E127", (3, 12),
     "1f1b with 2 stages needs at least 2 microbatches"),
])
def test_vlm_pipeline_errors_are_located(tmp_path, target, directives, code, where, words):
    got, errs = vlm_plan_errors(tmp_path, directives, target)
    assert got == [(code, *where)], got
    assert words in errs[0].message, errs[0].message
    if "cross_attention_layers" in words:
        assert errs[0].hint == ("a cross-attention block travels with the decoder layer it "
                                "follows; list the layers only")


def test_vlm_auto_split_counts_the_vision_encoder(tmp_path):
    """The cost model weighs the vision encoder's ops at its patch tokens against
    the decoder's: a wide encoder (256 patches, 4 layers) fills stage 0 alone, the
    shipped small one (64 patches, 2 layers) shares it with 2 decoder layers."""
    from forgec.compiler.cost import cost
    from forgec.compiler.plans import vlm_plan_data

    (tmp_path / "llama_debug.forge").write_text(LLAMA)
    vlm = (ROOT / "specs" / "vlm.forge").read_text()
    wide = vlm[vlm.index("vision vit_tiny"):vlm.index("vlm vlm {")].replace(
        "vit_tiny", "vit_wide").replace("image_size = 32", "image_size = 64").replace(
        "n_layers   = 2", "n_layers   = 4")
    (tmp_path / "wide.forge").write_text(
        'import "llama_debug.forge"\n' + wide + """
vlm wide {
  text    = llama_debug
  vision  = vit_wide
  adapter = avgpool(vit_wide.dim, llama_debug.dim, window = 2)
  fusion  = joint_decoder(max_text = 128)
}

plan wide_pp2 for wide {
  mesh(pp = 2)
  pipeline(schedule = gpipe, microbatches = 2)
}
""")
    comp = compile_spec(str(tmp_path / "wide.forge"))
    pipe = vlm_plan_data(comp.plans["wide_pp2"], comp.vlms["wide"], comp.models,
                         comp.graphs)["pipeline"]
    assert pipe["stages"] == [
        ["vision_encoder.patch_embedding", *[f"vision_encoder.layers.{i}" for i in range(4)],
         "vision_encoder.norm"],
        ["adapter", "transformer.token_embedding", *[f"transformer.layers.{i}" for i in range(4)],
         "transformer.norm", "transformer.output_head"]]
    # stage 0 is the encoder: its FLOPs per image are the encoder's own cost at 256 patches
    assert pipe["stage_flops"][0] == cost(comp.graphs["vit_wide"], seq_len=256).flops_per_token * 256
    # each of the 6 other cuts leaves a costlier stage
    costs = pipe["stage_flops"]
    assert max(costs) / min(costs) < 1.1
    layers = {int(f.rsplit(".", 1)[1]) for f in pipe["stages"][0] if "layers" in f}
    assert layers == {0, 1, 2, 3}
    small = importlib.import_module("generated.vlm.plan").PLANS["pp2_vlm"]["pipeline"]
    assert small["stages"][0][-3:] == ["transformer.token_embedding", "transformer.layers.0",
                                       "transformer.layers.1"]
    assert sum(small["stage_params"]) == 1_116_000  # every parameter on one stage


@pytest.mark.parametrize("name", ["vlm", "vlm_xattn", "vlm_mot", "vlm_moma", "vlm_rope2d"])
def test_vlm_stages_chain_to_the_whole_model(tmp_path, monkeypatch, name):
    """build_stage cuts the generated VLM into stages (the plan's stage_params,
    the VLM's own parameter names) whose VLMStage forwards, chained, compute the
    whole model's logits: 4 stages cut inside the vision encoder and between the
    decoder layers (a cross-attention block on each decoder stage), and 2 whose
    first holds the encoder's end, the adapter and a decoder layer."""
    import copy

    import torch

    from forgec.compiler.plans import vlm_plan_data
    from forgec.runtime.parallel import build_stage

    for f in ("llama_debug", "vlm", name):
        (tmp_path / f"{f}.forge").write_text((ROOT / "specs" / f"{f}.forge").read_text())
    splits = {"four": [[V0], [V1], D[:2], D[2:]], "two": [[V0, V1, D[0]], D[1:]]}
    spec = tmp_path / f"{name}.forge"
    spec.write_text(spec.read_text() + "".join(
        f"\nplan {name}_{k} for {name} {{\n  mesh(pp = {len(g)})\n  pipeline(schedule = gpipe, "
        f"split = [{', '.join('[' + ', '.join(s) + ']' for s in g)}])\n}}\n"
        for k, g in splits.items()))
    comp = compile_spec(str(spec))
    pkg = importlib.import_module(f"generated.{name}")
    planmod = importlib.import_module(f"generated.{name}.plan")
    torch.manual_seed(0)
    full = pkg.VLM().eval()
    with torch.no_grad():  # away from the initialisation (zero gates, identical copies)
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    patch = full.vision_encoder.patch_embedding
    pixels = torch.randn(3, patch.proj.in_channels, patch.image_size, patch.image_size)
    tokens = torch.randint(0, 256, (3, 26))
    with torch.no_grad():
        want = full(pixels, tokens)
    for k in splits:
        plan = f"{name}_{k}"
        data = vlm_plan_data(comp.plans[plan], comp.vlms[name], comp.models, comp.graphs)
        monkeypatch.setitem(planmod.PLANS, plan, data)
        x, names = (pixels,), []
        for sid, params in enumerate(data["pipeline"]["stage_params"]):
            stage = build_stage(copy.deepcopy(full), sid, planmod, plan)
            assert sum(p.numel() for p in stage.parameters()) == params, (plan, sid)
            names += [n for n, _ in stage.named_parameters()]
            with torch.no_grad():
                out = stage(*x, tokens=tokens)
            x = out if isinstance(out, tuple) else (out,)
        assert sorted(names) == sorted(n for n, _ in full.named_parameters())
        assert len(x) == 1 and torch.equal(x[0], want), plan


def test_deepseek_v3_plan_splits_61_layers_over_16_stages_and_experts_over_64_ranks():
    comp = compile_spec("specs/deepseek_v3.forge")
    plan = comp.plans["pp16_ep64"]
    assert plan.world == 2048
    assert plan.mesh == {"dp": 128, "pp": 16, "tp": 1, "ep": 64}
    data = plan_data(plan, comp.models["deepseek_v3"], comp.graphs["deepseek_v3"])
    stages = data["pipeline"]["stages"]
    assert len(stages) == 16 and stages[0][0] == "token_embedding"
    assert stages[-1][-2:] == ["norm", "output_head"]
    layers = [f for s in stages for f in s if f.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(61)]
    flops = data["pipeline"]["stage_flops"]
    assert max(flops) / (sum(flops) / len(flops)) < 1.1
