"""The SVG renderer of `forgec graph` on hand-made graphs: what the CLI tests' specs do not
have (a VLM's typed edges, dashed nodes, a cycle, text that XML must escape)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from forgec.compiler.graphio import to_svg

SVG = "{http://www.w3.org/2000/svg}"


def _groups(svg: str) -> dict[str, ET.Element]:
    return {g.get("id"): g for g in ET.fromstring(svg).iter(f"{SVG}g")}


def _stroke(group: ET.Element) -> tuple[str, bool]:
    """(colour, dashed) of a group's first path."""
    style = next(group.iter(f"{SVG}path")).get("style")
    return re.search(r"stroke: (#[0-9a-f]{6})", style).group(1), "stroke-dasharray" in style


def _vlm_like() -> nx.MultiDiGraph:
    g = nx.MultiDiGraph(name="toy")
    g.add_node("pixels", kind="input", shape=(2, 3, 8, 8))
    g.add_node("tokens", kind="input", shape=("B", "S"))
    g.add_node("encoder", kind="op", op="patch_embed", fqn="encoder", shape=(2, 4, 8))
    g.add_node("adapter", kind="op", op="linear", fqn="adapter", shape=("B", 4, 16))
    g.add_node("cut", kind="slice", drop=4, shape=("B", "S", 16))
    g.add_node("fuse", kind="op", op="cross_attention", fqn="fuse", shape=("B", "S", 16))
    g.add_edge("pixels", "encoder", modality="image")
    g.add_edge("encoder", "adapter", modality="image")
    g.add_edge("adapter", "cut", modality="image+text")
    g.add_edge("cut", "fuse")
    g.add_edge("tokens", "fuse", modality="memory")
    return g


def test_edges_are_coloured_by_modality_and_slices_dashed():
    g = _vlm_like()
    groups = _groups(to_svg(g, "full"))
    strokes = {(u, v): _stroke(groups[f"edge-{j}"]) for j, (u, v) in enumerate(g.edges())}
    assert strokes == {("pixels", "encoder"): ("#1a73e8", False),
                       ("encoder", "adapter"): ("#1a73e8", False),
                       ("adapter", "cut"): ("#9334e6", False),
                       ("cut", "fuse"): ("#555555", False),
                       ("tokens", "fuse"): ("#1a73e8", True)}
    outlines = {n: _stroke(groups[f"node-{i}"])[1] for i, n in enumerate(g.nodes)}
    assert outlines == {"pixels": False, "tokens": False, "encoder": False, "adapter": False,
                        "cut": True, "fuse": False}


def test_the_same_graph_gives_the_same_bytes_and_nodes_keep_their_rows():
    g = _vlm_like()
    svg = to_svg(g, "full")
    assert svg == to_svg(_vlm_like(), "full")
    groups = _groups(svg)

    def top(n):  # the middle of a node's text lines (labels of 2 and 3 lines share a row)
        i = list(g.nodes).index(n)
        ys = [float(re.search(r"translate\([\d.]+ ([\d.]+)\)", t.get("transform")).group(1))
              for t in groups[f"label-{i}"].iter(f"{SVG}text")]
        return (ys[0] + ys[-1]) / 2

    # each edge points down the page; `tokens` sits just above its consumer, not at the top
    for u, v in g.edges():
        assert top(u) < top(v), (u, v)
    assert top("tokens") == pytest.approx(top("cut"), abs=1)  # points; rows are ~60 apart


def test_a_cycle_and_text_that_xml_escapes_still_draw():
    g = nx.MultiDiGraph(name="a<b>&c")
    g.add_node("x<&>", kind="input", shape=None)
    g.add_node("s", kind="scale", factor=0.5)
    g.add_node("y", kind="op", op="o", fqn="y", shape=(1,))
    g.add_edges_from([("x<&>", "s"), ("s", "y"), ("y", "s")])
    groups = _groups(to_svg(g, "full"))
    assert [t.text for t in groups["title"].iter(f"{SVG}text")] == ["a<b>&c (full)"]
    assert [t.text for t in groups["label-0"].iter(f"{SVG}text")] == ["x<&>", "?"]
    assert [t.text for t in groups["label-1"].iter(f"{SVG}text")] == ["×0.5"]
    assert sum(name.startswith("edge-") for name in groups) == 3
