"""compiler/lower.py: node ids and FQNs, edges, shapes, and the model/block views."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from conftest import codes

from forgec.compiler.driver import compile_spec
from forgec.compiler.lower import (
    ADAPTER,
    FUSION,
    IMAGE,
    LOGITS,
    OUTPUT_SLICE,
    TEXT_PREFIX,
    TOKENS,
    VISION_PREFIX,
    block_view,
    lower,
    lower_vlm,
    model_view,
)

DEBUG = Path(__file__).resolve().parent.parent / "specs" / "llama_debug.forge"
LAYER = ["attention_norm", "attention", "add1", "mlp_norm", "mlp", "add2"]


@pytest.fixture(scope="module")
def debug():
    result = compile_spec(str(DEBUG))
    return result, result.graphs["llama_debug"]


def layer_ids(i: int) -> list[str]:
    return [f"layers.{i}/{n}" if n.startswith("add") else f"layers.{i}.{n}" for n in LAYER]


def inputs(g: nx.MultiDiGraph, node: str) -> list[str]:
    """A node's inputs in argument order."""
    return [src for _, src in sorted((d["index"], s) for s, _, d in g.in_edges(node, data=True))]


# ---- the full graph of llama_debug ---------------------------------------------------------------


def test_llama_debug_nodes_in_order(debug):
    _, g = debug
    expected = [TOKENS, "token_embedding"]
    for i in range(4):
        expected += layer_ids(i)
    expected += ["norm", "output_head", LOGITS]
    assert list(g.nodes) == expected
    assert g.number_of_nodes() == 2 + 4 * 6 + 3 == 29
    assert g.number_of_edges() == 1 + 4 * 8 + 3 == 36
    assert g.graph["name"] == "llama_debug"
    assert g.graph["model"].name == "llama_debug"


def test_llama_debug_node_attributes(debug):
    _, g = debug
    att = g.nodes["layers.0.attention"]
    assert (att["kind"], att["op"], att["fqn"], att["component"]) == (
        "op", "attention", "layers.0.attention", "attention")
    assert (att["layer"], att["block"], att["arity"], att["ok"]) == (0, "dense", 1, True)
    assert (att["span"].line, att["span"].col) == (22, 13)  # the application
    assert (att["decl_span"].line, att["decl_span"].col) == (18, 22)  # the declaration
    assert att["args"]["kv_heads"] == 2 and att["args"]["head_dim"] == 32

    mlp = g.nodes["layers.3.mlp"]
    assert (mlp["op"], mlp["fqn"], mlp["layer"]) == ("swiglu", "layers.3.mlp", 3)
    assert mlp["weights"] == {
        "layers.3.mlp.gate_proj.weight": (384, 128),
        "layers.3.mlp.up_proj.weight": (384, 128),
        "layers.3.mlp.down_proj.weight": (128, 384),
    }

    emb = g.nodes["token_embedding"]
    assert (emb["op"], emb["fqn"], emb["layer"], emb["block"]) == (
        "embedding", "token_embedding", None, None)
    assert emb["weights"] == {"token_embedding.embedding.weight": (256, 128)}

    head = g.nodes["output_head"]
    assert head["weights"] == {"output_head.proj.weight": (256, 128)}
    assert head["tied"] == {}

    add = g.nodes["layers.2/add1"]
    assert (add["kind"], add["fqn"], add["layer"], add["block"]) == ("add", "", 2, "dense")
    assert (add["span"].line, add["span"].col) == (22, 9)
    assert g.nodes["layers.2/add2"].get("block_output") is True
    assert not g.nodes["layers.2/add1"].get("block_output")

    assert g.nodes[TOKENS]["kind"] == "input"
    assert g.nodes[LOGITS]["kind"] == "output"


def test_llama_debug_attention_weights(debug):
    _, g = debug
    assert g.nodes["layers.1.attention"]["weights"] == {
        "layers.1.attention.q_proj.weight": (128, 128),
        "layers.1.attention.k_proj.weight": (64, 128),
        "layers.1.attention.v_proj.weight": (64, 128),
        "layers.1.attention.o_proj.weight": (128, 128),
    }


def test_llama_debug_edges_and_their_order(debug):
    _, g = debug
    assert inputs(g, "token_embedding") == [TOKENS]
    assert inputs(g, "layers.0.attention_norm") == ["token_embedding"]
    assert inputs(g, "layers.0.attention") == ["layers.0.attention_norm"]
    # h = x + attention(...): the residual is input 0, the branch input 1
    assert inputs(g, "layers.0/add1") == ["token_embedding", "layers.0.attention"]
    assert inputs(g, "layers.0.mlp_norm") == ["layers.0/add1"]
    assert inputs(g, "layers.0/add2") == ["layers.0/add1", "layers.0.mlp"]
    assert inputs(g, "layers.1.attention_norm") == ["layers.0/add2"]
    assert inputs(g, "layers.1/add1") == ["layers.0/add2", "layers.1.attention"]
    assert inputs(g, "norm") == ["layers.3/add2"]
    assert inputs(g, "output_head") == ["norm"]
    assert inputs(g, LOGITS) == ["output_head"]
    assert nx.is_directed_acyclic_graph(g)


def test_llama_debug_shapes(debug):
    _, g = debug
    assert g.nodes[TOKENS]["shape"] == ("B", "S")
    for node, data in g.nodes(data=True):
        if node not in (TOKENS, "output_head", LOGITS):
            assert data["shape"] == ("B", "S", 128), node
    assert g.nodes["output_head"]["shape"] == ("B", "S", 256)
    assert g.nodes[LOGITS]["shape"] == ("B", "S", 256)


def test_lower_is_repeatable(debug):
    result, g = debug
    again = lower(result.models["llama_debug"])
    assert list(again.nodes) == list(g.nodes)
    assert list(again.edges(data=True)) == list(g.edges(data=True))


# ---- topologies ------------------------------------------------------------------------------

TOPO = """\
model m {
  dim = 64
  token_embedding = embedding(256, dim)
  block gptj(x) {
    ln = layernorm(dim)
    a = attention(dim, heads = 4)
    f = gelu_mlp(dim, hidden = 256)
    y = ln(x)
    return x + a(y) + f(y)
  }
  block twice(x) {
    n = rmsnorm(dim)
    return x + n(n(x)) * 0.5
  }
  block extra(x) {
    n = rmsnorm(dim)
    return x + n(x)
  }
  layers = stack(4) { default: gptj  at 1: twice  after every 2: extra }
  norm = layernorm(dim)
  output_head = lm_head(dim, 256)
}
"""


@pytest.fixture
def topo(forge):
    result, diags = forge(TOPO)
    assert codes(diags, None) == []
    return result.graphs["m"]


def test_parallel_block_topology(topo):
    g = topo
    # y = ln(x) feeds both branches; x + a(y) + f(y) is ((x + a) + f)
    assert inputs(g, "layers.0.ln") == ["token_embedding"]
    assert inputs(g, "layers.0.a") == ["layers.0.ln"]
    assert inputs(g, "layers.0.f") == ["layers.0.ln"]
    assert sorted(g.successors("layers.0.ln")) == ["layers.0.a", "layers.0.f"]
    assert inputs(g, "layers.0/add1") == ["token_embedding", "layers.0.a"]
    assert inputs(g, "layers.0/add2") == ["layers.0/add1", "layers.0.f"]
    assert g.nodes["layers.0/add2"]["block_output"] is True
    assert [n for n in g.nodes if n.startswith("layers.0")] == [
        "layers.0.ln", "layers.0.a", "layers.0/add1", "layers.0.f", "layers.0/add2"]


def test_component_applied_twice_gets_a_suffixed_node_and_one_set_of_weights(topo):
    g = topo
    first, second = g.nodes["layers.1.n"], g.nodes["layers.1.n#1"]
    # the inner application comes first
    assert inputs(g, "layers.1.n") == ["layers.0/add2"]
    assert inputs(g, "layers.1.n#1") == ["layers.1.n"]
    assert first["fqn"] == second["fqn"] == "layers.1.n"
    assert first["weights"] == {"layers.1.n.weight": (64,)}
    assert second["weights"] == {}
    assert (first["span"].col, second["span"].col) == (18, 16)


def test_scaling_is_a_scale_node(topo):
    g = topo
    scale = g.nodes["layers.1/scale1"]
    assert (scale["kind"], scale["factor"], scale["shape"]) == ("scale", 0.5, ("B", "S", 64))
    assert inputs(g, "layers.1/scale1") == ["layers.1.n#1"]
    assert inputs(g, "layers.1/add2") == ["layers.0/add2", "layers.1/scale1"]


def test_inserted_blocks_get_their_own_fqns(topo):
    g = topo
    assert [n for n in g.nodes if n.startswith("extra_layers")] == [
        "extra_layers.0.n", "extra_layers.0/add1", "extra_layers.1.n", "extra_layers.1/add1"]
    n0 = g.nodes["extra_layers.0.n"]
    assert (n0["fqn"], n0["block"], n0["layer"]) == ("extra_layers.0.n", "extra", 1)
    assert n0["weights"] == {"extra_layers.0.n.weight": (64,)}
    assert g.nodes["extra_layers.1.n"]["layer"] == 3
    # inserted after layer 1, before layer 2
    assert inputs(g, "extra_layers.0.n") == ["layers.1/add2"]
    assert inputs(g, "layers.2.ln") == ["extra_layers.0/add1"]
    assert inputs(g, "norm") == ["extra_layers.1/add1"]


def test_model_view_has_one_node_per_layer(topo):
    view = model_view(topo)
    assert list(view.nodes) == [TOKENS, "token_embedding", "layers.0", "layers.1",
                                "extra_layers.0", "layers.2", "layers.3", "extra_layers.1",
                                "norm", "output_head", LOGITS]
    assert list(view.edges) == list(zip(list(view.nodes)[:-1], list(view.nodes)[1:], strict=True))
    assert view.nodes["layers.1"] == {"kind": "block", "block": "twice", "layer": 1,
                                      "shape": ("B", "S", 64)}
    assert view.nodes["extra_layers.0"]["block"] == "extra"
    assert view.nodes["norm"] == {"kind": "op", "op": "layernorm", "shape": ("B", "S", 64)}
    assert view.graph["name"] == "m"


def test_model_view_of_llama_debug(debug):
    _, g = debug
    view = model_view(g)
    assert list(view.nodes) == [TOKENS, "token_embedding", "layers.0", "layers.1", "layers.2",
                                "layers.3", "norm", "output_head", LOGITS]
    assert view.number_of_edges() == 8
    assert all(view.nodes[f"layers.{i}"]["shape"] == ("B", "S", 128) for i in range(4))


def test_block_view(debug):
    result, _ = debug
    view = block_view(result.models["llama_debug"], "dense")
    assert list(view.nodes) == ["x", "attention_norm", "attention", "add1", "mlp_norm", "mlp",
                                "add2", "return"]
    assert view.nodes["x"]["kind"] == "input"
    assert view.nodes["return"]["kind"] == "output"
    assert view.nodes["attention"]["fqn"] == "attention"
    assert view.nodes["attention"]["weights"]["attention.q_proj.weight"] == (128, 128)
    assert view.nodes["attention"]["layer"] is None
    assert inputs(view, "add1") == ["x", "attention"]
    assert inputs(view, "add2") == ["add1", "mlp"]
    assert inputs(view, "return") == ["add2"]
    assert view.number_of_edges() == 9


def test_block_view_with_two_inputs(forge):
    result, diags = forge("""\
        model m {
          dim = 64
          token_embedding = embedding(256, dim)
          block dense(x) {
            n = rmsnorm(dim)
            return x + n(x)
          }
          block pair(u, v) {
            n = rmsnorm(dim)
            return n(u) + v
          }
          layers = stack(1) { default: dense }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
        }
    """)
    assert codes(diags) == []
    view = block_view(result.models["m"], "pair")
    assert list(view.nodes) == ["u", "v", "n", "add1", "return"]
    assert inputs(view, "add1") == ["n", "v"]
    assert view.nodes["return"]["span"].line == 10


def test_tied_head_node(forge):
    result, diags = forge("""\
        model m {
          token_embedding = embedding(256, 64)
          block dense(x) {
            n = rmsnorm(64)
            return x + n(x)
          }
          layers = stack(1) { default: dense }
          norm = rmsnorm(64)
          output_head = lm_head(64, 256, tie = token_embedding)
        }
    """)
    assert codes(diags) == []
    head = result.graphs["m"].nodes["output_head"]
    assert head["weights"] == {}
    assert head["tied"] == {"output_head.proj.weight": "token_embedding.embedding.weight"}


# ---- a vision-language model is one graph --------------------------------------------------------

SPECS = Path(__file__).resolve().parent.parent / "specs"
# spec: (fusion, patch tokens, image tokens after the adapter, encoder width)
VLMS = {"vlm": ("joint_decoder", 64, 64, 96), "vlm_xattn": ("cross_attention", 64, 16, 96),
        "vlm_mot": ("mot", 64, 16, 96), "vlm_moma": ("moma", 64, 64, 96),
        "vlm_rope2d": ("joint_decoder", 65, 65, 64)}


@pytest.fixture(scope="module", params=sorted(VLMS))
def vlm(request):
    result = compile_spec(str(SPECS / f"{request.param}.forge"))
    return request.param, result, result.vlm_graphs[request.param]


def test_a_vlm_graph_holds_image_encoder_adapter_fusion_and_decoder(vlm):
    name, result, g = vlm
    fusion, patches, tokens, vdim = VLMS[name]
    assert nx.is_directed_acyclic_graph(g) and nx.is_weakly_connected(g)
    assert [n for n in g if g.in_degree(n) == 0] == [IMAGE, TOKENS]
    assert [n for n in g if g.out_degree(n) == 0] == [LOGITS]
    assert g.nodes[IMAGE]["kind"] == "input" and g.nodes[IMAGE]["shape"] == ("B", 3, 32, 32)
    assert inputs(g, f"{VISION_PREFIX}.patch_embedding") == [IMAGE]
    encoder = [n for n, d in g.nodes(data=True) if d.get("part") == VISION_PREFIX]
    assert {g.nodes[n]["shape"] for n in encoder} == {("B", patches, vdim)}
    assert {g.nodes[n]["group"] for n in encoder if g.nodes[n]["layer"] is not None} == {
        f"{VISION_PREFIX}.layers.0", f"{VISION_PREFIX}.layers.1"}
    assert inputs(g, ADAPTER) == [f"{VISION_PREFIX}.norm"]
    assert g.nodes[ADAPTER]["op"] == result.vlms[name].adapter.op.name
    assert g.nodes[ADAPTER]["shape"] == ("B", tokens, 128)
    assert inputs(g, f"{TEXT_PREFIX}.token_embedding") == [TOKENS]
    assert g.nodes[f"{TEXT_PREFIX}.token_embedding"]["shape"] == ("B", "S", 128)
    assert g.nodes[LOGITS]["shape"] == ("B", "S", 256)
    # every node's shape is known
    assert [n for n, d in g.nodes(data=True) if d["shape"] is None] == []
    # the parts the graph was made of are left as they were
    assert "part" not in result.graphs["llama_debug"].nodes["layers.0.attention"]
    assert result.graphs["llama_debug"].nodes["layers.0.attention"]["shape"] == ("B", "S", 128)


def test_a_vlm_graph_types_its_edges_by_modality(vlm):
    name, _, g = vlm
    fusion = VLMS[name][0]
    decoder = "text" if fusion == "cross_attention" else "image+text"
    expected = {}
    for u, v, d in g.edges(data=True):
        ends = {g.nodes[u].get("part"), g.nodes[v].get("part")}
        if ends & {VISION_PREFIX} or (u == ADAPTER and v == FUSION):
            expected[u, v] = "image"
        elif u == ADAPTER:
            expected[u, v] = "memory"
        elif u == TOKENS or v == FUSION or u == OUTPUT_SLICE:
            expected[u, v] = "text"
        else:
            expected[u, v] = decoder
        assert d["modality"] == expected[u, v], (u, v)
    assert set(expected.values()) == ({"image", "text", "memory"} if fusion == "cross_attention"
                                      else {"image", "text", "image+text"})


@pytest.mark.parametrize("name", ["vlm", "vlm_mot", "vlm_moma", "vlm_rope2d"])
def test_prefix_fusions_join_image_and_text_tokens_and_slice_the_logits(name):
    g = compile_spec(str(SPECS / f"{name}.forge")).vlm_graphs[name]
    fusion, _, tokens, _ = VLMS[name]
    seq = f"{tokens}+S"
    assert g.nodes[FUSION]["op"] == fusion
    assert inputs(g, FUSION) == [ADAPTER, f"{TEXT_PREFIX}.token_embedding"]
    assert g.nodes[FUSION]["shape"] == ("B", seq, 128)
    assert inputs(g, f"{TEXT_PREFIX}.layers.0.attention_norm") == [FUSION]
    assert g.nodes[f"{TEXT_PREFIX}.layers.3.attention"]["shape"] == ("B", seq, 128)
    assert inputs(g, OUTPUT_SLICE) == [f"{TEXT_PREFIX}.output_head"]
    assert g.nodes[f"{TEXT_PREFIX}.output_head"]["shape"] == ("B", seq, 256)
    assert g.nodes[OUTPUT_SLICE]["drop"] == tokens
    assert inputs(g, LOGITS) == [OUTPUT_SLICE]
    routed = {n: d["fusion"] for n, d in g.nodes(data=True) if "fusion" in d}
    if fusion == "mot":  # every op of every decoder block, a copy per modality
        assert sorted(routed) == sorted(f"{TEXT_PREFIX}.layers.{i}.{c}" for i in range(4)
                                        for c in ("attention_norm", "attention", "mlp_norm",
                                                  "mlp"))
        assert set(g.nodes[f"{TEXT_PREFIX}.layers.0.mlp_norm"]["weights"]) == {
            f"{TEXT_PREFIX}.layers.0.mlp_norm.{m}.weight" for m in ("image", "text")}
    elif fusion == "moma":  # the MLPs, replaced by experts per modality
        assert sorted(routed) == [f"{TEXT_PREFIX}.layers.{i}.mlp" for i in range(4)]
        assert g.nodes[f"{TEXT_PREFIX}.layers.0.mlp"]["weights"][
            f"{TEXT_PREFIX}.layers.0.mlp.image.experts.gate_proj"] == (4, 128, 128)
    else:
        assert routed == {}
    assert set(routed.values()) <= {fusion}


def test_cross_attention_takes_image_memory_after_every_kth_layer():
    g = compile_spec(str(SPECS / "vlm_xattn.forge")).vlm_graphs["vlm_xattn"]
    assert FUSION not in g and OUTPUT_SLICE not in g
    blocks = [n for n, d in g.nodes(data=True) if d.get("op") == "cross_attention"]
    assert blocks == [f"{TEXT_PREFIX}.cross_attention_layers.{k}" for k in range(2)]
    for k, block in enumerate(blocks):
        after = 2 * k + 1  # every = 2: after layers 1 and 3
        assert g.nodes[block]["after"] == after
        assert inputs(g, block) == [f"{TEXT_PREFIX}.layers.{after}/add2", ADAPTER]
        assert [d["modality"] for _, _, d in g.in_edges(block, data=True)] == ["text", "memory"]
        assert g.nodes[block]["shape"] == ("B", "S", 128)
        assert all(w.startswith(f"{block}.") for w in g.nodes[block]["weights"])
    assert inputs(g, f"{TEXT_PREFIX}.layers.2.attention_norm") == [blocks[0]]
    assert inputs(g, f"{TEXT_PREFIX}.norm") == [blocks[1]]
    assert inputs(g, LOGITS) == [f"{TEXT_PREFIX}.output_head"]


def test_the_model_view_of_a_vlm_keeps_modalities():
    g = compile_spec(str(SPECS / "vlm_xattn.forge")).vlm_graphs["vlm_xattn"]
    view = model_view(g)
    layers = [n for n, d in view.nodes(data=True) if d["kind"] == "block"]
    assert layers == [f"{VISION_PREFIX}.layers.0", f"{VISION_PREFIX}.layers.1"] + [
        f"{TEXT_PREFIX}.layers.{i}" for i in range(4)]
    assert view.nodes[f"{VISION_PREFIX}.layers.1"]["shape"] == ("B", 64, 96)
    assert view.edges[f"{TEXT_PREFIX}.layers.1", f"{TEXT_PREFIX}.cross_attention_layers.0"] == {
        "modality": "text"}
    assert view.edges[ADAPTER, f"{TEXT_PREFIX}.cross_attention_layers.1"] == {
        "modality": "memory"}
    assert view.edges[f"{VISION_PREFIX}.norm", ADAPTER] == {"modality": "image"}
    assert all(d["shape"] is not None for _, d in view.nodes(data=True))


def test_lowering_a_vlm_is_repeatable():
    result = compile_spec(str(SPECS / "vlm_moma.forge"))
    vlm = result.vlms["vlm_moma"]
    again = lower_vlm(vlm, result.graphs[vlm.text], result.graphs[vlm.vision])
    g = result.vlm_graphs["vlm_moma"]
    assert list(again.nodes(data=True)) == list(g.nodes(data=True))
    assert list(again.edges(data=True)) == list(g.edges(data=True))


def test_the_block_view_knows_its_input_shape(debug):
    result, _ = debug
    view = block_view(result.models["llama_debug"], "dense")
    assert view.nodes["x"]["shape"] == ("B", "S", 128)
    assert view.nodes["return"]["shape"] == ("B", "S", 128)
    vision = compile_spec(str(SPECS / "vlm.forge")).models["vit_tiny"]
    view = block_view(vision, "encoder")
    assert view.nodes["x"]["shape"] == ("B", "S", 96)
    assert all(d["shape"] is not None for _, d in view.nodes(data=True))
