"""`forgec eval RUN --data`: held-out loss and perplexity against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS

from forgec.compiler.cli import main as forgec
from forgec.runtime.generate import load_run_model

ROOT = Path(__file__).resolve().parent.parent
DOC = ("In the beginning the Universe was created. This has made a lot of people very angry "
       "and been widely regarded as a bad move. ") * 3


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert forgec(["train", str(ROOT / "specs" / "llama_debug.forge"), "--out", str(out),
                   "--steps", "2", "--batch-size", "2", "--seq-len", "64",
                   "--no-progress"]) == 0
    return out


def evaluate(capsys, *argv) -> dict:
    capsys.readouterr()
    assert forgec(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@torch.no_grad()
def test_loss_of_one_document_equals_a_direct_computation(run, tmp_path, capsys):
    tokens = np.array(list(DOC.encode()) + [0], dtype=np.uint16)  # one document, then EOS
    tokens.tofile(tmp_path / "doc.bin")
    got = evaluate(capsys, run, "--data", tmp_path / "doc.bin", "--seq-len", 48)
    model, _ = load_run_model(str(run))
    ids = torch.from_numpy(tokens.astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, 48):  # each window alone, no packing, no batching
        window = ids[start : start + 49]
        logits = model(window[None, :-1])[0]
        total += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += len(window) - 1
    assert got["tokens"] == count == len(tokens) - 1
    assert got["windows"] == math.ceil((len(tokens) - 1) / 48)
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
    assert got["perplexity"] == math.exp(got["loss"])
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@torch.no_grad()
def test_documents_do_not_see_each_other(run, tmp_path, capsys):
    """Packed documents score as if each stood alone (attention stays in its document,
    nothing predicts across an end-of-text), up to RoPE positions, which are relative."""
    docs = ["first document, short.", "a second one follows here", "and a third"]
    stream = [t for d in docs for t in list(d.encode()) + [0]]
    np.array(stream, dtype=np.uint16).tofile(tmp_path / "docs.bin")
    got = evaluate(capsys, run, "--data", tmp_path / "docs.bin", "--seq-len", 128)
    model, _ = load_run_model(str(run))
    total, count = 0.0, 0
    for d in docs:
        ids = torch.tensor(list(d.encode()) + [0])
        logits = model(ids[None, :-1])[0]
        total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        count += len(ids) - 1
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_text_input_equals_its_tokenized_dataset_and_batching_does_not_matter(run, tmp_path,
                                                                              capsys):
    lines = [json.dumps({"text": f"{DOC[i:]} {i}"}) for i in range(0, 60, 7)]
    (tmp_path / "held.jsonl").write_text("\n".join(lines) + "\n")
    assert forgec(["tokenize", str(tmp_path / "held.jsonl"), "-o", str(tmp_path / "ds"),
                   "--no-progress"]) == 0
    a = evaluate(capsys, run, "--data", tmp_path / "held.jsonl")
    b = evaluate(capsys, run, "--data", tmp_path / "ds", "--batch-size", 1)
    assert a["seq_len"] == 64  # the run's
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    c = evaluate(capsys, run, "--data", tmp_path / "held.jsonl", "--max-tokens", 100)
    assert c["tokens"] == 99 and c["windows"] == 2


@pytest.mark.parametrize("argv, code, message", [
    ([], 2, "give --data (held-out loss) or --tasks (lm-eval tasks)"),
    (["--data", "{tmp}/none.bin"], 2, "no such file: '{tmp}/none.bin'"),
    (["--data", "{tmp}/odd.bin"], 1, "{tmp}/odd.bin: 3 bytes is not a whole number of uint16 "
     "tokens (2 bytes each); is --data-dtype right?"),
    (["--data", "{tmp}/big.bin", "--data-dtype", "uint32"], 1, "{tmp}/big.bin: token id 300 at "
     "offset 1 is out of range for the model's vocabulary of 256 (ids 0..255)"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, argv, code, message):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    np.array([1, 300], dtype=np.uint32).tofile(tmp_path / "big.bin")
    capsys.readouterr()
    assert forgec(["eval", str(run), *[a.format(tmp=tmp_path) for a in argv]]) == code
    assert capsys.readouterr().err == f"forgec: error: {message.format(tmp=tmp_path)}\n"


# ---- lm-eval-harness tasks ---------------------------------------------------------------

MC = [
    {"question": "def f(x):\n    return", "choices": [" x", " banana", " 42!!"], "answer": 0},
    {"question": "import", "choices": [" os", " zzz", " ..."], "answer": 0},
    {"question": "for i in", "choices": [" range(10):", " qqq", " the"], "answer": 0},
    {"question": "class Foo(", "choices": ["object):", "xyz", "!!!"], "answer": 1},
    {"question": "The answer is", "choices": [" yes.", " no.", " maybe, who knows"], "answer": 2},
]


def local_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task: a YAML file naming local JSONL data."""
    folder.mkdir()
    data = folder / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    (folder / "forge_mc.yaml").write_text(f"""\
task: forge_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_lm_eval_tasks_score_as_transformers_scores_the_exported_model(run, tmp_path,
                                                                       monkeypatch, capsys):
    """The adapter over the generated model gives the loglikelihoods (and accuracy) that
    lm-eval's own Hugging Face model gives for the same weights through transformers."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from forgec.runtime.lm_eval_adapter import run_tasks
    from forgec.runtime.tokenizer import run_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = local_task(tmp_path / "tasks")
    model, _ = load_run_model(str(run))
    ours = run_tasks(model, run_tokenizer(str(run)), ["forge_mc"], include_path=str(tasks),
                     log_samples=True)
    assert forgec(["export-hf", str(run), "-o", str(tmp_path / "hf")]) == 0
    ref_lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1,
                  dtype="float32")
    ref = simple_evaluate(model=ref_lm, tasks=["forge_mc"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=True,
                          bootstrap_iters=0)

    def scores(samples):
        return [[float(r[0][0]) for r in s["resps"]] for s in
                sorted(samples["forge_mc"], key=lambda s: s["doc_id"])]

    got, expected = scores(ours["samples"]), scores(ref["samples"])
    assert len(got) == len(MC) and all(len(row) == 3 for row in got)
    assert np.allclose(got, expected, rtol=0, atol=1e-4)
    assert ours["forge_mc"]["acc,none"] == ref["results"]["forge_mc"]["acc,none"]
    # the CLI prints the same accuracy
    capsys.readouterr()
    assert forgec(["eval", str(run), "--tasks", "forge_mc", "--include-path", str(tasks),
                   "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["forge_mc"]["acc,none"] == ours["forge_mc"]["acc,none"]


def test_an_unknown_task_is_a_usage_error(run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = local_task(tmp_path / "tasks")
    assert forgec(["eval", str(run), "--tasks", "no_such_task", "--include-path",
                   str(tasks)]) == 2
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err
