"""`forgec tokenize`, tokenizers of runs, and training on datasets and mixtures.

Every tokenizer and corpus is built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import THREADS
from tokenizer_helpers import TEXT, make_hf_tokenizer

from forgec.compiler.cli import main as forgec
from forgec.runtime.data import MixedData, PackedData, ShardedTokens, parse_data_setting
from forgec.runtime.tokenizer import Bytes, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def corpus(folder: Path, seed: int = 0) -> list[str]:
    """Write a.jsonl (with a blank line and an empty text), b.parquet (3 row groups)
    and sub/*.txt into `folder`; return the non-empty documents in tokenize's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)

    def doc(n: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, n))) + " ✓"

    (folder / "sub").mkdir(parents=True)
    jsonl = [doc(30) for _ in range(37)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl)]
    lines.insert(5, "")
    lines.insert(9, json.dumps({"text": ""}))
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    parquet = [doc(20) for _ in range(25)]
    pq.write_table(pa.table({"id": list(range(25)), "text": parquet}), folder / "b.parquet",
                   row_group_size=10)
    texts = [doc(80) for _ in range(3)]
    for i, t in enumerate(texts):
        (folder / "sub" / f"t{i}.txt").write_text(t, encoding="utf-8")
    return jsonl + parquet + texts


def read_dataset(out: Path) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"])
                           for s in manifest["shards"]])


def test_tokens_are_each_document_then_end_of_text_in_input_order(tmp_path):
    docs = corpus(tmp_path / "in")
    out = tmp_path / "ds"
    assert forgec(["tokenize", str(tmp_path / "in"), "-o", str(out), "--docs-per-shard", "8",
                   "--no-progress"]) == 0
    expected = [i for d in docs for i in list(d.encode("utf-8")) + [0]]
    assert read_dataset(out).tolist() == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == len(expected) and manifest["documents"] == len(docs)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["identity"] == "byte"
    # a.jsonl: 38 non-blank lines in pieces of 8 (the second holds the empty text, which
    # is dropped); b.parquet: 25 rows as 8, 8, 8, 1; the 1-row piece shares its shard
    # with the three text files
    assert [s["documents"] for s in manifest["shards"]] == [8, 7, 8, 8, 6, 8, 8, 8, 4]
    for shard in manifest["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype=np.uint16)
        assert shard["tokens"] == tokens.size and shard["max_id"] == int(tokens.max())


def test_output_is_identical_for_any_worker_count_and_hf_tokenizer(tmp_path):
    docs = corpus(tmp_path / "in")
    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        assert forgec(["tokenize", str(tmp_path / "in"), "-o", str(out), "--tokenizer",
                       str(tok_dir), "--workers", str(workers), "--docs-per-shard", "7",
                       "--no-progress"]) == 0
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    tok = load_tokenizer(str(tok_dir))
    eot = tok.tok.token_to_id("<|eot|>")
    expected = [i for d in docs for i in tok.tok.encode(d, add_special_tokens=False).ids + [eot]]
    assert read_dataset(outs[0]).tolist() == expected
    assert tok.decode(expected[: expected.index(eot)]) == docs[0]


def test_an_interrupted_run_resumes_and_skips_finished_shards(tmp_path, capsys):
    corpus(tmp_path / "in")
    argv = ["tokenize", str(tmp_path / "in"), "-o", str(tmp_path / "ds"),
            "--docs-per-shard", "10", "--no-progress"]
    assert forgec(argv) == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    # an interruption: the manifest and the last shards were never written; shard 1 is torn
    (tmp_path / "ds" / "manifest.json").unlink()
    for name in ("shard_00003.bin", "shard_00004.json"):
        (tmp_path / "ds" / name).unlink()
    (tmp_path / "ds" / "shard_00001.bin").write_bytes(b"\1\0")
    kept = (tmp_path / "ds" / "shard_00000.bin").stat().st_mtime_ns
    assert forgec(argv) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == whole
    assert (tmp_path / "ds" / "shard_00000.bin").stat().st_mtime_ns == kept  # skipped
    # other inputs into the same folder: refused unless --force
    (tmp_path / "in" / "sub" / "new.txt").write_text("more")
    capsys.readouterr()
    assert forgec(argv) == 2
    assert "holds a dataset of other inputs or settings; --force" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["tokenize", "{tmp}/nope", "-o", "{tmp}/o"], "no such file or folder: '{tmp}/nope'"),
    (["tokenize", "{tmp}/x.csv", "-o", "{tmp}/o"], "{tmp}/x.csv: not a .txt, .md, .jsonl or "
     ".parquet file"),
    (["tokenize", "{tmp}/d.txt", "-o", "{tmp}/o", "--tokenizer", "{tmp}"],
     "--tokenizer {tmp}: not 'byte', a folder with tokenizer.json, a .forge spec or a "
     "training run"),
    (["tokenize", "{tmp}/d.txt", "-o", "{tmp}/o", "--workers", "0"],
     "--workers must be at least 1"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "d.txt").write_text("text")
    assert forgec([a.format(tmp=tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err == f"forgec: error: {message.format(tmp=tmp_path)}\n"


def test_bad_records_are_located_errors(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    assert forgec(["tokenize", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o"),
                   "--no-progress"]) == 1
    assert capsys.readouterr().err == (f"forgec: error: {tmp_path}/bad.jsonl:3: no text field "
                                       "'text' (choose it with --text-field)\n")


def test_sharded_tokens_slice_across_shards(tmp_path):
    parts = [np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 13)]
    paths = []
    for i, p in enumerate(parts):
        paths.append(tmp_path / f"{i}.bin")
        p.astype(np.uint16).tofile(paths[-1])
    tokens = ShardedTokens([str(p) for p in paths], np.uint16)
    flat = np.arange(13)
    assert len(tokens) == 13
    for a in range(-13, 14):
        for b in range(-13, 15):
            assert tokens[a:b].tolist() == flat[a:b].tolist()


def test_mixture_weights_and_resumption():
    a = PackedData(np.arange(1, 1001) % 7 + 1, 8, seed=0, source="a")
    b = PackedData(np.full(1001, 100), 8, seed=1, source="b")
    mix = MixedData([a, b], [3.0, 1.0], seed=5)
    batches = [mix.next_batch(16) for _ in range(50)]
    from_b = sum(int((x.inputs[:, 0] == 100).sum()) for x in batches)
    assert abs(from_b / 800 - 0.25) < 0.05 and mix.weights == [0.75, 0.25]
    # a copy restored from the state after 20 batches continues identically
    mix2 = MixedData([PackedData(np.arange(1, 1001) % 7 + 1, 8, seed=0, source="a"),
                      PackedData(np.full(1001, 100), 8, seed=1, source="b")], [3.0, 1.0], 5)
    ref = MixedData([PackedData(np.arange(1, 1001) % 7 + 1, 8, seed=0, source="a"),
                     PackedData(np.full(1001, 100), 8, seed=1, source="b")], [3.0, 1.0], 5)
    for _ in range(20):
        ref.next_batch(16)
    mix2.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    for x in batches[20:]:
        assert torch.equal(mix2.next_batch(16).inputs, x.inputs)


@pytest.mark.parametrize("value, parsed", [
    ("d", [("d", None)]),
    ("a:0.7,b:0.3", [("a", 0.7), ("b", 0.3)]),
    ("C:/x:2,b:1", [("C:/x", 2.0), ("b", 1.0)]),
])
def test_data_settings_parse(value, parsed):
    assert parse_data_setting(value) == parsed


def test_a_mixture_needs_weights(capsys):
    from forgec.compiler.errors import UsageError

    with pytest.raises(UsageError, match="give each dataset of a mixture a weight"):
        parse_data_setting("a,b:1")


def test_training_on_a_mixture_resumes_like_an_uninterrupted_run(tmp_path):
    corpus(tmp_path / "in")
    for name, src in (("ds1", tmp_path / "in"), ("ds2", tmp_path / "in" / "sub")):
        assert forgec(["tokenize", str(src), "-o", str(tmp_path / name), "--no-progress"]) == 0
    data = f"{tmp_path / 'ds1'}:0.6,{tmp_path / 'ds2'}:0.4"
    spec = str(ROOT / "specs" / "llama_debug.forge")
    common = ["--batch-size", "2", "--seq-len", "32", "--no-progress", "--data", data]
    assert forgec(["train", spec, "--out", str(tmp_path / "full"), "--steps", "4", *common]) == 0
    assert forgec(["train", spec, "--out", str(tmp_path / "part"), "--steps", "4",
                   "--ckpt-every", "2", *common]) == 0
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_000004")  # stopped after step 2
    assert forgec(["train", spec, "--out", str(tmp_path / "part"), "--steps", "4",
                   "--resume", "--no-progress"]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_a_dataset_of_another_tokenizer_is_refused(tmp_path, capsys):
    (tmp_path / "d.txt").write_text(TEXT)
    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    assert forgec(["tokenize", str(tmp_path / "d.txt"), "-o", str(tmp_path / "ds"),
                   "--tokenizer", str(tok_dir), "--no-progress"]) == 0
    assert forgec(["train", str(ROOT / "specs" / "llama_debug.forge"), "--out",
                   str(tmp_path / "run"), "--steps", "1", "--data", str(tmp_path / "ds"),
                   "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ds'} was tokenized with {tok_dir}" in err
    assert "the run uses the byte tokenizer (identity byte)" in err


def test_a_spec_with_a_tokenizer_trains_and_generates_with_it(tmp_path, capsys):
    """import-hf copies the tokenizer beside the spec; the run records it, trains its
    default corpus with it and `generate` decodes with it."""
    import transformers as hf

    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    hf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=64).save_pretrained(
        tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tok_dir / name).read_bytes())
    spec = tmp_path / "tiny.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    assert "wrote " + str(tmp_path / "tiny.tokenizer") in capsys.readouterr().err
    run = tmp_path / "run"
    assert forgec(["train", str(spec), "--out", str(run), "--steps", "1", "--batch-size", "2",
                   "--seq-len", "32", "--no-progress"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["settings"]["tokenizer"] == str(tmp_path / "tiny.tokenizer")
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (
        tok_dir / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert forgec(["generate", str(run), "--prompt", "hello world", "--max-new-tokens",
                   "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello world")
    # the continuation is the model's greedy tokens, decoded by the run's tokenizer
    from forgec.runtime.generate import generate, load_run_model

    model, _ = load_run_model(str(run))
    tok = load_tokenizer(str(tok_dir))
    new = generate(model, [tok.encode("hello world")], 5, eos_id=tok.eos_id)[0]
    new = new[:-1] if new and new[-1] == tok.eos_id else new
    assert out == tok.decode(tok.encode("hello world") + new) + "\n"
    # --tokenizer overrides the spec's
    assert forgec(["train", str(spec), "--out", str(tmp_path / "bytes"), "--steps", "1",
                   "--batch-size", "2", "--seq-len", "32", "--no-progress", "--tokenizer",
                   "byte"]) == 0
    assert json.loads((tmp_path / "bytes" / "run.json").read_text())["settings"][
        "tokenizer"] == "byte"
    assert not (tmp_path / "bytes" / "tokenizer").exists()
    # resuming with a changed tokenizer is refused
    make_hf_tokenizer(tmp_path / "tiny.tokenizer", vocab_size=290)
    assert forgec(["train", str(spec), "--out", str(run), "--steps", "2", "--resume",
                   "--no-progress"]) == 1
    assert "a resumed run keeps its tokenizer" in capsys.readouterr().err


def test_the_byte_tokenizer_is_the_default(tmp_path):
    from forgec.runtime.tokenizer import default_tokenizer_setting, run_tokenizer

    assert default_tokenizer_setting(str(ROOT / "specs" / "llama_debug.forge")) == "byte"
    assert isinstance(run_tokenizer(str(tmp_path)), Bytes)


def test_import_hf_copies_the_tokenizer_and_drops_a_stale_one(tmp_path, capsys):
    import transformers as hf

    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    hf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    spec = tmp_path / "m.forge"
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec)]) == 0
    assert sorted(p.name for p in (tmp_path / "m.tokenizer").iterdir()) == ["tokenizer.json"]
    assert f"wrote {tmp_path / 'm.tokenizer'}/: tokenizer.json" in capsys.readouterr().err
    # imported again from a folder without a tokenizer: the old one is not this model's
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert forgec(["import-hf", str(tmp_path / "hf"), "-o", str(spec), "--force"]) == 0
    assert not (tmp_path / "m.tokenizer").exists()
    assert f"runs of {spec} use the byte tokenizer" in capsys.readouterr().err
