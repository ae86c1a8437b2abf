"""End-to-end behaviour of the `forgec` command line, run as users run it.

Every case goes through `run_forgec` (a fresh interpreter) and asserts the exit
status (0 ok, 1 spec errors, 2 usage errors, never 70), that no Python
traceback reaches the user, and, for spec errors, the exact located
`file:line:col: error[E###]` line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import ROOT, SPECS, run_forgec

LLAMA_8B = "specs/llama3_8b.forge"
LLAMA_70B = "specs/llama3_70b.forge"
DEBUG = "specs/llama_debug.forge"
VLM = "specs/vlm.forge"
DEBUG_LAYERS = 4

INFO_KEYS = {"params_total", "params_active", "flops_per_token", "kv_bytes_per_token",
             "supports_kv_cache"}

# A small valid spec; the robustness cases replace one line of it. Line numbers
# below refer to this text.
VALID = """\
model tiny {
  vocab_size  = 256
  dim         = 64
  n_layers    = 2
  n_heads     = 4
  max_seq_len = 128
  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len)
  block dense(x) {
    attention_norm = rmsnorm(dim)
    attention      = attention(dim, heads = n_heads, rope = rope)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 4 * dim)
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  layers      = stack(n_layers) { default: dense }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, vocab_size)
}
"""


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode != 70, proc.stderr


def errors_of(proc) -> list[tuple[str, int, int, str]]:
    """(file, line, col, code) of every located error line on stderr."""
    return [(m[1], int(m[2]), int(m[3]), m[4]) for m in
            re.finditer(r"^(.+?):(\d+):(\d+): error\[(E\d{3})\]: ", proc.stderr, re.MULTILINE)]


def assert_spec_error(proc, path: Path, code: str, line: int, col: int) -> None:
    """Exactly one error, `code`, located at path:line:col; exit status 1."""
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr
    assert errors_of(proc) == [(str(path), line, col, code)], proc.stderr
    assert proc.stderr.rstrip().endswith("\n1 error"), proc.stderr


def with_line(n: int, new: str) -> str:
    """VALID with its line n (1-based) replaced."""
    lines = VALID.split("\n")
    lines[n - 1] = new
    return "\n".join(lines)


def write(tmp_path: Path, text: str | bytes, name: str = "spec.forge") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---- check ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_check_accepts_every_committed_spec(spec):
    proc = run_forgec("check", str(spec.relative_to(ROOT)))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert " error[" not in proc.stderr
    assert re.search(rf"^specs/{spec.name}: ok: model \w+: \d+ layers, [\d,]+ parameters$",
                     proc.stdout, re.MULTILINE), proc.stdout


def test_the_valid_template_compiles(tmp_path):
    """The robustness cases below each change one line of VALID; VALID itself is fine."""
    path = write(tmp_path, VALID)
    proc = run_forgec("check", str(path))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"{path}: ok: model tiny: 2 layers, " in proc.stdout


def test_check_reports_good_specs_ok_beside_a_bad_one(tmp_path):
    bad = write(tmp_path, with_line(6, "  max_seq_len = 1 / 0"), "bad.forge")
    proc = run_forgec("check", DEBUG, str(bad), LLAMA_8B)
    no_traceback(proc)
    assert proc.returncode == 1
    assert "specs/llama_debug.forge: ok: model llama_debug: 4 layers, 853,120 parameters" \
        in proc.stdout
    assert "specs/llama3_8b.forge: ok: model llama3_8b: 32 layers, 8,030,261,248 parameters" \
        in proc.stdout
    assert str(bad) not in proc.stdout
    assert errors_of(proc) == [(str(bad), 6, 21, "E031")]


def test_check_reports_every_independent_error_in_one_run(tmp_path):
    text = """\
model tiny {
  dim      = 64
  n_heads  = 5
  width    = 7 / 2
  zero     = 1 / 0
  big      = 2 * 4611686018427387904
  token_embedding = embedding(256, dimm)
  block dense(x) {
    attention_norm = rmsnorm(dim, epsilon = 1e-5)
    attention      = attention(dim, heads = n_heads)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 4 * dim)
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  layers      = stack(2) { default: dense }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}
"""
    path = write(tmp_path, text)
    proc = run_forgec("check", "--quiet", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    assert errors_of(proc) == [
        (str(path), 4, 14, "E030"),   # 7 / 2
        (str(path), 5, 18, "E031"),   # the divisor 0
        (str(path), 6, 14, "E032"),   # overflow
        (str(path), 7, 36, "E021"),   # unknown name 'dimm'
        (str(path), 9, 35, "E023"),   # rmsnorm() has no 'epsilon'
        (str(path), 10, 37, "E070"),  # 64 not divisible by 5 heads (a check pass)
    ]
    assert proc.stderr.rstrip().endswith("\n6 errors")
    assert "warning[" not in proc.stderr  # --quiet prints errors only


# ---- info ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, params", [(LLAMA_8B, 8_030_261_248),
                                          (LLAMA_70B, 70_553_706_496)])
def test_info_json_has_the_published_parameter_counts(spec, params):
    proc = run_forgec("info", "--json", spec)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert INFO_KEYS <= doc.keys()
    assert doc["params_total"] == params
    assert doc["params_active"] == params
    assert doc["supports_kv_cache"] is True
    # GQA with 8 KV heads of 128 channels: K and V, bf16, per layer
    layers = 32 if spec == LLAMA_8B else 80
    assert doc["kv_bytes_per_token"] == layers * 2 * 8 * 128 * 2
    assert isinstance(doc["flops_per_token"], int) and doc["flops_per_token"] > 2 * params


def test_info_json_figures_follow_the_options():
    base = json.loads(run_forgec("info", "--json", LLAMA_8B).stdout)
    fp32 = run_forgec("info", "--json", "--kv-dtype", "fp32", "--seq-len", "1", LLAMA_8B)
    assert fp32.returncode == 0, fp32.stderr
    doc = json.loads(fp32.stdout)
    assert doc["kv_bytes_per_token"] == 2 * base["kv_bytes_per_token"]
    assert doc["seq_len"] == 1 and base["seq_len"] == 8192
    assert doc["flops_per_token"] < base["flops_per_token"]  # fewer keys to attend to


def test_info_human_output_mentions_the_parameter_count():
    proc = run_forgec("info", LLAMA_8B)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "8,030,261,248" in proc.stdout
    assert re.search(r"^\s+parameters\s+8,030,261,248$", proc.stdout, re.MULTILINE)
    assert "supports_kv_cache    yes" in proc.stdout


def test_info_of_a_bad_spec_is_exit_1_and_json_stays_clean(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = 7 / 2"))
    proc = run_forgec("info", "--json", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert errors_of(proc) == [(str(path), 6, 17, "E030")]


@pytest.mark.parametrize("argv", [
    ["info", "--model", "nope", DEBUG],
    ["info", "--seq-len", "0", DEBUG],
    ["info", "--seq-len", "abc", DEBUG],
    ["info", "--kv-dtype", "int3", DEBUG],
    ["frobnicate", DEBUG],
    [],
])
def test_usage_errors_are_exit_2(argv):
    proc = run_forgec(*argv)
    no_traceback(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip()


# ---- graph --------------------------------------------------------------------------------


def _dot_labels(dot: str) -> list[str]:
    return re.findall(r'^\s+n\d+ \[.*?label="([^"]*)"', dot, re.MULTILINE)


def test_graph_dot_model_view_has_one_node_per_layer():
    proc = run_forgec("graph", "--format", "dot", DEBUG)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    dot = proc.stdout
    assert dot.startswith("digraph ")
    assert dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}") == 1
    node_lines = re.findall(r"^\s+(n\d+) \[", dot, re.MULTILINE)
    edges = re.findall(r"^\s+(n\d+) -> (n\d+);$", dot, re.MULTILINE)
    assert len(set(node_lines)) == len(node_lines)
    layer_labels = sorted(label.split("\\n")[0] for label in _dot_labels(dot)
                          if label.startswith("layers."))
    assert layer_labels == [f"layers.{i}" for i in range(DEBUG_LAYERS)]
    # tokens, token_embedding, 4 layers, norm, output_head, logits: a chain
    assert len(node_lines) == DEBUG_LAYERS + 5
    assert len(edges) == len(node_lines) - 1
    assert {n for e in edges for n in e} == set(node_lines)


def test_graph_dot_full_view_has_every_op():
    proc = run_forgec("graph", "--format", "dot", "--view", "full", DEBUG)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("digraph ")
    labels = [label.split("\\n")[0] for label in _dot_labels(proc.stdout)]
    for i in range(DEBUG_LAYERS):
        for comp in ("attention_norm", "attention", "mlp_norm", "mlp"):
            assert f"layers.{i}.{comp}" in labels


def test_graph_json_full_view_names_modules_by_reference_fqn():
    proc = run_forgec("graph", "--format", "json", "--view", "full", DEBUG)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "llama_debug" and doc["view"] == "full"
    ops = {n["fqn"] for n in doc["nodes"] if n.get("kind") == "op"}
    expected = {"token_embedding", "norm", "output_head"} | {
        f"layers.{i}.{c}" for i in range(DEBUG_LAYERS)
        for c in ("attention_norm", "attention", "mlp_norm", "mlp")}
    assert ops == expected
    ids = {n["id"] for n in doc["nodes"]}
    assert {"tokens", "logits"} <= ids
    assert all(e["source"] in ids and e["target"] in ids for e in doc["edges"])
    attention = next(n for n in doc["nodes"] if n["fqn"] == "layers.0.attention")
    assert attention["op"] == "attention"
    assert attention["shape"] == ["B", "S", 128]
    assert attention["source"].startswith("specs/llama_debug.forge:")
    assert set(attention["weights"]) == {f"layers.0.attention.{p}_proj.weight"
                                         for p in "qkvo"}


def test_graph_json_model_view_has_one_node_per_layer():
    proc = run_forgec("graph", "--format", "json", LLAMA_70B)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    blocks = [n for n in doc["nodes"] if n.get("kind") == "block"]
    assert [n["id"] for n in blocks] == [f"layers.{i}" for i in range(80)]
    assert all(n["shape"] == ["B", "S", 8192] for n in blocks)


def test_graph_block_view():
    proc = run_forgec("graph", "--format", "json", "--view", "block:dense", DEBUG)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "llama_debug.dense"
    ops = {n["fqn"] for n in doc["nodes"] if n.get("kind") == "op"}
    assert ops == {"attention_norm", "attention", "mlp_norm", "mlp"}
    assert {"x", "return"} <= {n["id"] for n in doc["nodes"]}
    dot = run_forgec("graph", "--view", "block:dense", DEBUG)
    assert dot.returncode == 0 and dot.stdout.startswith("digraph ")


GOLDEN_GRAPHS = ROOT / "tests" / "golden" / "graph"


@pytest.mark.parametrize("argv, golden", [
    ([VLM], "vlm.dot"), (["--format", "json", VLM], "vlm.json"),
    (["specs/vlm_xattn.forge"], "vlm_xattn.dot"),
])
def test_graph_of_a_vlm_equals_its_golden(argv, golden):
    """The whole VLM, byte for byte (after a deliberate change: `forgec graph ... -o
    tests/golden/graph/NAME`, and review the diff)."""
    proc = run_forgec("graph", *argv)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (GOLDEN_GRAPHS / golden).read_text()
    assert run_forgec("graph", *argv).stdout == proc.stdout


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS if p.name.startswith("vlm")))
@pytest.mark.parametrize("view", ["model", "full"])
def test_graph_of_a_vlm_draws_all_of_it_with_every_shape_known(spec, view):
    proc = run_forgec("graph", "--format", "json", "--view", view, f"specs/{spec}")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == spec.removesuffix(".forge")
    ids = [n["id"] for n in doc["nodes"]]
    assert {"pixel_values", "vision_encoder.patch_embedding", "vision_encoder.norm", "adapter",
            "tokens", "transformer.token_embedding", "transformer.output_head", "logits"} <= set(ids)
    parts = {n.get("part") for n in doc["nodes"]}
    assert parts == {None, "vision_encoder", "adapter", "fusion", "transformer"}
    assert [n["id"] for n in doc["nodes"] if n.get("shape") is None] == []
    # producers come first
    position = {n: i for i, n in enumerate(ids)}
    assert all(position[e["source"]] < position[e["target"]] for e in doc["edges"])
    assert {e["modality"] for e in doc["edges"]} in (
        {"image", "text", "image+text"}, {"image", "text", "memory"})
    dot = run_forgec("graph", "--view", view, f"specs/{spec}").stdout
    labels = _dot_labels(dot)
    assert len(labels) == len(ids)
    assert not any(label.endswith("\\n?") for label in labels)


def test_graph_model_selects_the_vlm_or_one_of_its_parts():
    whole = run_forgec("graph", VLM)
    assert run_forgec("graph", "--model", "vlm", VLM).stdout == whole.stdout
    decoder = run_forgec("graph", "--format", "json", "--model", "llama_debug", VLM)
    assert decoder.returncode == 0, decoder.stderr
    assert decoder.stdout == run_forgec("graph", "--format", "json", DEBUG).stdout
    encoder = json.loads(run_forgec("graph", "--format", "json", "--model", "vit_tiny",
                                    VLM).stdout)
    assert encoder["model"] == "vit_tiny"
    assert [n["id"] for n in encoder["nodes"]] == ["pixels", "patch_embedding", "layers.0",
                                                   "layers.1", "norm", "features"]


def test_graph_block_view_of_a_vlm_finds_the_block_in_its_parts(tmp_path):
    doc = json.loads(run_forgec("graph", "--format", "json", "--view", "block:encoder",
                                VLM).stdout)
    assert doc["model"] == "vit_tiny.encoder"
    x = next(n for n in doc["nodes"] if n["id"] == "x")
    assert x["shape"] == ["B", "S", 96]
    assert all(n.get("shape") is not None for n in doc["nodes"])
    doc = json.loads(run_forgec("graph", "--format", "json", "--view", "block:dense",
                                VLM).stdout)
    assert doc["model"] == "llama_debug.dense"
    proc = run_forgec("graph", "--view", "block:nope", VLM)
    assert proc.returncode == 2
    assert "no block 'nope' in model 'vlm' (blocks: encoder, dense)" in proc.stderr
    spec = (ROOT / VLM).read_text().replace("block encoder(x)", "block dense(x)").replace(
        "default: encoder", "default: dense")
    (tmp_path / "llama_debug.forge").write_text((ROOT / DEBUG).read_text())
    path = write(tmp_path, spec, "vlm.forge")
    proc = run_forgec("graph", "--view", "block:dense", str(path))
    no_traceback(proc)
    assert proc.returncode == 2 and proc.stdout == ""
    assert ("block 'dense' is in both 'vit_tiny' and 'llama_debug'; choose one with --model"
            in proc.stderr)
    proc = run_forgec("graph", "--view", "block:dense", "--model", "vit_tiny", str(path))
    assert proc.returncode == 0, proc.stderr


def test_graph_writes_to_a_file(tmp_path):
    out = tmp_path / "g.json"
    proc = run_forgec("graph", "--format", "json", "-o", str(out), DEBUG)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert json.loads(out.read_text())["model"] == "llama_debug"


@pytest.mark.parametrize("argv, message", [
    (["--view", "nope"], "unknown view 'nope'"),
    (["--view", "block:nope"], "no block 'nope'"),
    (["--view", "block:"], "no block ''"),
    (["--model", "nope"], "no model 'nope'"),
    (["--format", "png"], "invalid choice"),
])
def test_graph_unknown_view_model_block_or_format_is_exit_2(argv, message):
    proc = run_forgec("graph", *argv, DEBUG)
    no_traceback(proc)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""


def test_graph_of_a_bad_spec_is_exit_1(tmp_path):
    path = write(tmp_path, with_line(4, "  n_layers    = 0"))
    proc = run_forgec("graph", str(path))
    assert_spec_error(proc, path, "E073", 17, 23)
    assert proc.stdout == ""


SVG = "{http://www.w3.org/2000/svg}"


def _svg_groups(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return {g.get("id"): g for g in root.iter(f"{SVG}g")}


def _label_lines(node: dict) -> list[str]:
    """What `forgec graph --format svg` writes in a node (the DOT labels, line by line)."""
    shape = "(" + ", ".join(map(str, node["shape"])) + ")" if node.get("shape") else "?"
    kind = node.get("kind")
    if kind == "add":
        return ["+"]
    if kind == "scale":
        return [f"×{node['factor']:g}"]
    if kind == "op":
        return [node.get("fqn") or node["id"], node["op"], shape]
    if kind == "block":
        return [node["id"], node["block"], shape]
    return [node["id"], shape]


@pytest.mark.parametrize("spec, view", [(DEBUG, "model"), (DEBUG, "block:dense"),
                                        ("specs/gptj_debug.forge", "full")])
def test_graph_svg_draws_every_node_and_edge(tmp_path, spec, view):
    """No Graphviz needed: every node is an outline with its label's lines, every edge an arrow."""
    doc = json.loads(run_forgec("graph", "--format", "json", "--view", view, spec).stdout)
    proc = run_forgec("graph", "--format", "svg", "--view", view, spec)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    groups = _svg_groups(proc.stdout)
    title = [t.text for t in groups["title"].iter(f"{SVG}text")]
    assert title == [f"{doc['model']} ({view})"]
    for i, node in enumerate(doc["nodes"]):
        assert list(groups[f"node-{i}"].iter(f"{SVG}path")), node["id"]
        lines = [t.text for t in groups[f"label-{i}"].iter(f"{SVG}text")]
        assert lines == _label_lines(node), node["id"]
    assert f"node-{len(doc['nodes'])}" not in groups
    edges = [g for name, g in groups.items() if name.startswith("edge-")]
    assert len(edges) == len(doc["edges"])
    assert all(len(list(g.iter(f"{SVG}path"))) == 2 for g in edges)  # a line and its head


def test_graph_svg_of_every_layer_and_same_bytes_twice(tmp_path):
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    for out in (first, second):
        proc = run_forgec("graph", "--format", "svg", "-o", str(out), DEBUG)
        no_traceback(proc)
        assert proc.returncode == 0, proc.stderr
    assert first.read_bytes() == second.read_bytes()
    groups = _svg_groups(first.read_text())
    labels = {t.text for name, g in groups.items() if name.startswith("label-")
              for t in g.iter(f"{SVG}text")}
    assert {f"layers.{i}" for i in range(DEBUG_LAYERS)} <= labels


# ---- robustness: usage errors ----------------------------------------------------------------


def test_a_directory_is_a_usage_error(tmp_path):
    proc = run_forgec("check", str(tmp_path))
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr == f"forgec: error: '{tmp_path}' is a directory, not a spec file\n"


def test_a_missing_path_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope.forge"
    for argv in (["check"], ["info"], ["graph"]):
        proc = run_forgec(*argv, str(missing))
        no_traceback(proc)
        assert proc.returncode == 2, argv
        assert proc.stderr == f"forgec: error: no such file: '{missing}'\n"


# ---- robustness: bytes ---------------------------------------------------------------------


def test_an_empty_file_is_E006(tmp_path):
    path = write(tmp_path, "")
    assert_spec_error(run_forgec("check", str(path)), path, "E006", 1, 1)


def test_a_file_of_only_comments_is_E006(tmp_path):
    path = write(tmp_path, "# nothing here\n/* nor\n   here */\n\n")
    assert_spec_error(run_forgec("check", str(path)), path, "E006", 1, 1)


def test_a_spec_without_a_model_checks_but_has_no_info_or_graph(tmp_path):
    shutil.copy(ROOT / DEBUG, tmp_path)
    path = write(tmp_path, 'import "llama_debug.forge"\nplan p for llama_debug {\n}\n')
    proc = run_forgec("check", str(path))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    for argv in (["info"], ["info", "--json"], ["graph"]):
        proc = run_forgec(*argv, str(path))
        assert_spec_error(proc, path, "E006", 1, 1)
        assert "the spec defines no model" in proc.stderr
        assert proc.stdout == ""


def test_binary_bytes_are_E004_at_the_nul(tmp_path):
    path = write(tmp_path, b"model m {\n  x = 1\x00\x01\x02\n}\n")
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E004", 2, 8)
    assert "NUL" in proc.stderr


def test_invalid_utf8_is_E004_at_the_bad_byte(tmp_path):
    text = with_line(3, '  dim = 64 # caf\xe9').encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
    path = write(tmp_path, text)
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E004", 3, 17)
    assert "invalid UTF-8 (byte 0xe9)" in proc.stderr


def test_a_10_mb_file_is_E005_without_reading_it(tmp_path):
    path = tmp_path / "huge.forge"
    with open(path, "w") as f:
        f.write(VALID)
        f.write("# padding\n" * 1_000_000)
    assert path.stat().st_size > 10_000_000
    proc, seconds = _timed("check", str(path))
    assert seconds < 5, f"{seconds:.1f} s"
    assert_spec_error(proc, path, "E005", 1, 1)


# ---- robustness: syntax --------------------------------------------------------------------


def test_10000_nested_parentheses_alone_are_a_syntax_error(tmp_path):
    path = write(tmp_path, "(" * 10_000 + ")" * 10_000)
    assert_spec_error(run_forgec("check", str(path)), path, "E002", 1, 1)


def test_10000_nested_parentheses_in_a_valid_spec_compile(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = " + "(" * 10_000 + "128" + ")" * 10_000))
    proc = run_forgec("info", "--json", str(path))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["seq_len"] == 128


def test_deeply_nested_expressions_are_E005(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = " + "-" * 10_000 + "128"))
    proc = run_forgec("check", str(path))
    # the first '-' is at column 17 (depth 0); the one at depth 65 is refused
    assert_spec_error(proc, path, "E005", 6, 17 + 65)
    assert "nested deeper than 64 levels" in proc.stderr


def test_a_number_with_5000_digits_is_E032(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = " + "7" * 5000))
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E032", 6, 17)
    assert "integer literal too large (5000 digits)" in proc.stderr


def test_an_unterminated_string_is_E003(tmp_path):
    path = write(tmp_path, with_line(6, '  name = "llama'))
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E003", 6, 10)
    assert "unterminated string" in proc.stderr


@pytest.mark.parametrize("line, col", [
    ("  /* a comment that never ends", 3),
    ("  max_seq_len = 128 /* a comment that never ends", 21),
])
def test_an_unterminated_block_comment_is_E003(tmp_path, line, col):
    path = write(tmp_path, with_line(6, line))
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E003", 6, col)
    assert "unterminated block comment" in proc.stderr


# ---- robustness: values --------------------------------------------------------------------


def test_a_huge_layer_count_is_E026_quickly(tmp_path):
    path = write(tmp_path, with_line(4, f"  n_layers    = {10**12}"))
    proc, seconds = _timed("check", str(path))
    assert seconds < 5, f"{seconds:.1f} s"
    assert_spec_error(proc, path, "E026", 17, 23)
    assert "got 1,000,000,000,000" in proc.stderr


def test_integer_overflow_is_E032(tmp_path):
    path = write(tmp_path, with_line(3, "  dim         = 2 * 4611686018427387904"))
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E032", 3, 17)
    assert "integer overflow" in proc.stderr


def test_division_by_zero_is_E031_at_the_divisor(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = 1/0"))
    assert_spec_error(run_forgec("check", str(path)), path, "E031", 6, 19)


def test_inexact_division_is_E030_with_a_rounding_hint(tmp_path):
    path = write(tmp_path, with_line(6, "  max_seq_len = 7 / 2"))
    proc = run_forgec("check", str(path))
    assert_spec_error(proc, path, "E030", 6, 17)
    assert "7 / 2 does not divide exactly" in proc.stderr
    hint = next(line for line in proc.stderr.splitlines() if line.startswith("  hint: "))
    assert "'//'" in hint and "3" in hint


def test_a_long_chain_of_definitions_is_E005_not_a_crash(tmp_path):
    chain = "".join(f"  p{i} = p{i + 1} + 1\n" for i in range(2000)) + "  p2000 = 0\n"
    path = write(tmp_path, VALID.replace("  max_seq_len = 128\n",
                                         "  max_seq_len = 128 + p0\n" + chain))
    proc = run_forgec("check", str(path))
    # max_seq_len's `+` is evaluation level 1, p_k's `+` level 3 + 2k: p49's (line 7 + 49)
    # is level 101, the first past the limit
    assert_spec_error(proc, path, "E005", 7 + 49, 9)
    assert "definitions nested deeper than 100 levels" in proc.stderr


def test_a_long_inheritance_chain_is_E005_not_a_crash(tmp_path):
    # derived models first, so that merging m0 must walk up the whole chain
    text = "".join(f"model m{i} extends m{i + 1} {{ }}\n" for i in range(1000))
    path = write(tmp_path, text + VALID.replace("model tiny {", "model m1000 {"))
    proc = run_forgec("check", "--quiet", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    # m64 is 64 levels below m0 and refused; the walk from m65 refuses m129; ...
    refused = range(64, 1000, 65)
    assert errors_of(proc) == [(str(path), i + 1, len(f"model m{i} extends ") + 1, "E005")
                               for i in refused]
    assert "inheritance chain deeper than 64 levels" in proc.stderr


def test_a_long_import_chain_is_E005_not_a_crash(tmp_path):
    for i in range(200):
        write(tmp_path, f'import "f{i + 1}.forge"\n', f"f{i}.forge")
    write(tmp_path, VALID, "f200.forge")
    proc = run_forgec("check", str(tmp_path / "f0.forge"))
    assert_spec_error(proc, tmp_path / "f64.forge", "E005", 1, 1)
    assert "imports nested deeper than 64 levels" in proc.stderr


# ---- robustness: size (each of these was quadratic once; 2-5x under the bound now) -------


def _timed(*argv: str) -> tuple[object, float]:
    """The run and the CPU seconds it took: a bound on the work done, which other
    processes sharing the machine (`make test` runs tests in parallel) do not stretch
    as they stretch wall time."""
    before = os.times()
    proc = run_forgec(*argv)
    after = os.times()
    return proc, (after.children_user - before.children_user
                  + after.children_system - before.children_system)


def test_a_block_of_8000_statements_in_reverse_order_is_fast(tmp_path):
    body = "".join(f"    s{k} = s{k - 1}\n" for k in range(8000, 1, -1)) + "    s1 = x\n"
    path = write(tmp_path, VALID.replace("  block dense(x) {\n", "  block dense(x) {\n" + body))
    proc, seconds = _timed("check", "--quiet", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    errors = errors_of(proc)
    # s8000 (line 10) .. s2 each read a value computed further down
    assert errors == [(str(path), 10 + i, 9 + len(str(8000 - i)), "E048") for i in range(7999)]
    assert seconds < 8, f"{seconds:.1f} s"


def test_3000_errors_in_one_file_are_reported_fast(tmp_path):
    errs = "".join(f"  z{i} = {i} / 0\n" for i in range(3000))
    path = write(tmp_path, VALID.replace("  max_seq_len = 128\n", "  max_seq_len = 128\n" + errs))
    proc, seconds = _timed("check", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    assert errors_of(proc) == [(str(path), 7 + i, 10 + 2 * len(str(i)), "E031")
                               for i in range(3000)]
    assert proc.stderr.count("warning[W001]") == 3000
    assert seconds < 8, f"{seconds:.1f} s"


def test_the_model_view_of_4096_layers_is_fast(tmp_path):
    path = write(tmp_path, with_line(4, "  n_layers    = 4096"))
    proc, seconds = _timed("graph", "--format", "dot", str(path))
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert len(re.findall(r'label="layers\.\d+\\n', proc.stdout)) == 4096
    assert seconds < 6, f"{seconds:.1f} s"
