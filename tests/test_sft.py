"""Instruction tuning: `forgec tokenize --format pairs|chat` and training on
responses only, with every example its own document.

Tokenizers, templates and examples are built here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS
from tokenizer_helpers import make_hf_tokenizer

from forgec.compiler.cli import main as forgec
from forgec.runtime.data import (
    IGNORE_INDEX,
    MASK_DOC_START,
    MASK_TRAIN,
    ExampleData,
    PackedData,
    load_training_data,
)
from forgec.runtime.tokenizer import Bytes

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "specs" / "llama_debug.forge")

# a small template in the style of the Hub's: system, user and assistant turns,
# the assistant's in a {% generation %} block (transformers' assistant mask)
TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYS]{{ m['content'] | trim }}\n"
    "{% elif m['role'] == 'user' %}[USER]{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}[BOT]{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[BOT]{% endif %}"
)

# a generation prompt ending in a space: a reply starting with "d" starts with the
# token " d" (a merge of the tokenizer), which begins in the prompt; it is trained, as
# transformers marks it
SPACED = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "Assistant: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

CHATS = [
    [{"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "hello, the quick brown fox"}],
    [{"role": "system", "content": "  be naïve  "},
     {"role": "user", "content": "def f(x): return x * 2"},
     {"role": "assistant", "content": "the lazy dog ✓"},
     {"role": "user", "content": "again"},
     {"role": "assistant", "content": "dog café"}],
]

PAIRS = [
    {"prompt": "Q: 1+1?\nA: ", "response": "2"},
    {"prompt": "Q: the capital of France?\nA: ", "response": "Paris"},
    {"prompt": "say hi ", "response": "hi there, friend"},
    {"prompt": "count: ", "response": "one two three four five six"},
    {"prompt": "spell cat ", "response": "c-a-t"},
    {"prompt": "Q: colour of the sky?\nA: ", "response": "blue, mostly"},
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat_tokenizer(folder: Path, template: str = TEMPLATE) -> Path:
    """make_hf_tokenizer's tokenizer with `template` and a bos token in its config."""
    make_hf_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=template, bos_token="<|bos|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def read_examples(out: Path) -> list[tuple[list[int], list[int]]]:
    """(ids, trained flags) of each example of a dataset, from its files."""
    manifest = json.loads((out / "manifest.json").read_text())
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"])
                          for s in manifest["shards"]]).astype(np.int64)
    mask = np.concatenate([np.fromfile(out / s["mask"], dtype=np.uint8)
                           for s in manifest["shards"]])
    starts = list(np.flatnonzero(mask & MASK_DOC_START)) + [len(ids)]
    return [(ids[a:b].tolist(), ((mask[a:b] & MASK_TRAIN) != 0).astype(int).tolist())
            for a, b in zip(starts[:-1], starts[1:], strict=True)]


# ---- tokenizing -------------------------------------------------------------------------


@pytest.mark.parametrize("template", [TEMPLATE, SPACED], ids=["tags", "spaced"])
def test_chat_renders_as_transformers_and_masks_the_assistant_turns(tmp_path, template):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_dir = chat_tokenizer(tmp_path / "tok", template)
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    assert forgec(["tokenize", str(src), "-o", str(tmp_path / "ds"), "--tokenizer",
                   str(tok_dir), "--format", "chat", "--no-progress"]) == 0
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_dir / "tokenizer.json")),
                                 chat_template=template, bos_token="<|bos|>", eos_token="<|eot|>")
    examples = read_examples(tmp_path / "ds")
    assert len(examples) == len(CHATS)
    for (ids, mask), messages in zip(examples, CHATS, strict=True):
        want = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ids == list(want["input_ids"])
        assert mask == list(want["assistant_masks"])
        # the trained tokens are exactly each assistant turn and its end of turn
        turns = [m["content"] + "<|eot|>" for m in messages if m["role"] == "assistant"]
        trained = [i for i, m in zip(ids, mask, strict=True) if m]
        if template == TEMPLATE:
            assert hf.decode(trained) == "".join(turns)
        else:
            assert hf.decode(trained) == "".join(" " * t.startswith("d") + t for t in turns)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["examples"]["format"] == "chat"
    assert manifest["trained_tokens"] == sum(sum(m) for _, m in examples)


def test_pairs_train_the_response_and_end_of_text_only(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"q": p["prompt"], "a": p["response"], "id": i}
                                             for i, p in enumerate(PAIRS)])
    assert forgec(["tokenize", str(src), "-o", str(tmp_path / "ds"), "--format", "pairs",
                   "--prompt-field", "q", "--response-field", "a", "--no-progress"]) == 0
    examples = read_examples(tmp_path / "ds")
    for (ids, mask), pair in zip(examples, PAIRS, strict=True):
        prompt, response = pair["prompt"].encode(), pair["response"].encode()
        assert ids == list(prompt + response) + [0]
        assert mask == [0] * len(prompt) + [1] * (len(response) + 1)


def test_instruction_output_is_identical_for_any_worker_count_and_resumes(tmp_path):
    records = [{"messages": CHATS[i % 2]} for i in range(9)]
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    tok_dir = chat_tokenizer(tmp_path / "tok")
    common = [str(src), "--tokenizer", str(tok_dir), "--format", "chat", "--docs-per-shard",
              "2", "--no-progress"]
    assert forgec(["tokenize", *common, "-o", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert forgec(["tokenize", *common, "-o", str(tmp_path / "three"), "--workers", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "shard_00004.mask" in names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    # an interrupted run: shard 2's mask was never written, shard 3 is gone
    (tmp_path / "one" / "shard_00002.mask").unlink()
    (tmp_path / "one" / "shard_00003.json").unlink()
    (tmp_path / "one" / "manifest.json").unlink()
    assert forgec(["tokenize", *common, "-o", str(tmp_path / "one")]) == 0
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_bad_records_exit_1_with_file_line_and_reason(tmp_path, capsys):
    def run(records, fmt, *extra):
        src = write_jsonl(tmp_path / "bad.jsonl", records)
        code = forgec(["tokenize", str(src), "-o", str(tmp_path / "ds"), "--format", fmt,
                       "--force", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        return err, src

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    chat = ["--chat-template", str(template)]
    err, src = run([PAIRS[0], {"prompt": "x"}], "pairs")
    assert f"{src}:2: no text field 'response' (choose it with --response-field)" in err
    err, src = run([{"messages": CHATS[0]}, {"text": "no messages"}], "chat", *chat)
    assert f"{src}:2: no field 'messages' (choose it with --messages-field)" in err
    err, src = run([{"messages": CHATS[0]}, {"messages": CHATS[0][:1]}], "chat", *chat)
    assert f"{src}:2: the conversation has no assistant turn (nothing to train on)" in err
    tool = [{"role": "tool", "content": "42"}, *CHATS[0]]
    err, src = run([{"messages": CHATS[1]}, {"messages": CHATS[0]}, {"messages": tool}],
                   "chat", *chat)
    assert f"{src}:3: the chat template raised: unknown role: tool ({template})" in err
    err, src = run([{"messages": CHATS[0]}], "chat")  # the byte tokenizer has no template
    assert "the byte tokenizer has no chat_template (tokenizer_config.json); give one with " \
           "--chat-template FILE" in err


# ---- training -----------------------------------------------------------------------------


def pairs_dataset(tmp_path: Path, pairs: list[dict], name: str = "ds") -> Path:
    src = write_jsonl(tmp_path / f"{name}.jsonl", pairs)
    assert forgec(["tokenize", str(src), "-o", str(tmp_path / name), "--format", "pairs",
                   "--no-progress"]) == 0
    return tmp_path / name


def debug_model(seed: int = 0) -> torch.nn.Module:
    """llama_debug as `forgec train --seed SEED` initialises it."""
    from generated.llama_debug import model as pkg

    torch.manual_seed(seed)
    return pkg.Transformer()


def test_step_loss_is_the_cross_entropy_of_the_response_tokens(tmp_path):
    ds = pairs_dataset(tmp_path, PAIRS)
    assert forgec(["train", SPEC, "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size",
                   "4", "--seq-len", "48", "--data", str(ds), "--no-progress"]) == 0
    loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # the same batch, and targets found from the examples themselves: each run of
    # one doc_id in a row is the start of an example (or padding), trained where the
    # example's next token is a response token
    batch = load_training_data(str(ds), "uint16", 256, 48, 0, tok=Bytes()).next_batch(4)
    encoded = [(list((p["prompt"] + p["response"]).encode()) + [0],
                [0] * len(p["prompt"].encode()) + [1] * (len(p["response"].encode()) + 1))
               for p in PAIRS]
    positions, targets = [], []
    for r in range(4):
        inputs, docs = batch.inputs[r].tolist(), batch.doc_ids[r].tolist()
        starts = [j for j in range(len(docs)) if j == 0 or docs[j] != docs[j - 1]]
        for a, b in zip(starts, [*starts[1:], len(docs)], strict=True):
            match = [e for e in encoded if e[0][: b - a] == inputs[a:b]]
            if not match:
                continue  # padding
            ids, mask = match[0]
            for j in range(a, min(b, a + len(ids) - 1)):
                if mask[j - a + 1]:
                    positions.append((r, j))
                    targets.append(ids[j - a + 1])
    assert len(positions) == sum(int((batch.targets[r] != IGNORE_INDEX).sum()) for r in range(4))
    with torch.no_grad():
        logits = debug_model()(batch.inputs, doc_ids=batch.doc_ids)
    rows, cols = zip(*positions, strict=True)
    want = F.cross_entropy(logits[list(rows), list(cols)].double(), torch.tensor(targets))
    assert abs(loss - float(want)) <= 1e-6, (loss, float(want))


def test_an_example_packed_after_another_has_its_loss_alone(tmp_path):
    a, b = PAIRS[3], PAIRS[5]
    packed = load_training_data(str(pairs_dataset(tmp_path, [a, b], "ab")), "uint16", 256, 96,
                                0, tok=Bytes())
    alone = load_training_data(str(pairs_dataset(tmp_path, [b], "b")), "uint16", 256, 96, 0,
                               tok=Bytes())
    assert isinstance(packed, ExampleData) and packed.num_windows == 1
    model = debug_model()

    def per_token(data):
        x, t, doc = (torch.from_numpy(v)[None] for v in data.row(0))
        with torch.no_grad():
            logits = model(x, doc_ids=doc)
        ce = F.cross_entropy(logits[0], t[0], ignore_index=IGNORE_INDEX, reduction="none")
        return ce[t[0] != IGNORE_INDEX], doc[0]

    ce_packed, doc = per_token(packed)
    ce_alone, _ = per_token(alone)
    assert len(set(doc.tolist())) == 3  # a, b and the padding
    n_b = len(b["response"].encode()) + 1
    assert len(ce_alone) == n_b and len(ce_packed) == len(a["response"].encode()) + 1 + n_b
    assert torch.allclose(ce_packed[-n_b:], ce_alone, atol=1e-5, rtol=0)
    assert abs(float(ce_packed[-n_b:].mean()) - float(ce_alone.mean())) <= 1e-5


def test_prompt_positions_get_no_loss(tmp_path):
    """Perturbing the logits (or the target) of a prompt position leaves the loss and
    its gradient as they were; a response position's does not."""
    from forgec.runtime.loop import cross_entropy_sum, micro_batch_loss

    data = load_training_data(str(pairs_dataset(tmp_path, PAIRS)), "uint16", 256, 48, 0,
                              tok=Bytes())
    batch = data.next_batch(2)
    model = debug_model()
    with torch.no_grad():
        logits = model(batch.inputs, doc_ids=batch.doc_ids)
    n = int((batch.targets != IGNORE_INDEX).sum())

    def loss(lg, tg):
        return float(micro_batch_loss(model, cross_entropy_sum(lg, tg), n, 1))

    base = loss(logits, batch.targets)
    # the training step's fused head + cross-entropy skips the same positions
    with torch.no_grad():
        fused = model(batch.inputs, doc_ids=batch.doc_ids, targets=batch.targets)
    assert abs(float(fused) / n - base) < 1e-5
    inputs, docs = batch.inputs[0], batch.doc_ids[0]
    trained = (batch.targets[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    prompt = [j for j in range(1, trained[0]) if docs[j] == docs[0]]
    assert prompt and trained
    for j in prompt:
        lg = logits.clone()
        lg[0, j] += torch.randn(256)
        tg = batch.targets.clone()
        tg[0, j] = (int(inputs[j + 1]) + 1) % 256  # a target there would now count
        assert loss(lg, batch.targets) == base
        # the batch's targets say IGNORE there: the mask is what keeps the prompt out
        assert loss(lg, tg) != base
    lg = logits.clone()
    lg[0, trained[0]] += torch.randn(256)
    assert loss(lg, batch.targets) != base


def test_plain_datasets_keep_their_packing(tmp_path):
    """A dataset without a mask is PackedData: windows cut through documents at EOS."""
    (tmp_path / "d.txt").write_text("some plain text " * 20)
    assert forgec(["tokenize", str(tmp_path / "d.txt"), "-o", str(tmp_path / "ds"),
                   "--no-progress"]) == 0
    data = load_training_data(str(tmp_path / "ds"), "uint16", 256, 32, 0, tok=Bytes())
    assert type(data) is PackedData


def test_a_mixture_of_instructions_and_text_trains_and_resumes(tmp_path):
    import shutil

    ds = pairs_dataset(tmp_path, PAIRS)
    (tmp_path / "d.txt").write_text("some plain text, for a mixture. " * 40)
    assert forgec(["tokenize", str(tmp_path / "d.txt"), "-o", str(tmp_path / "plain"),
                   "--no-progress"]) == 0
    common = ["--batch-size", "2", "--seq-len", "48", "--no-progress", "--data",
              f"{ds}:0.7,{tmp_path / 'plain'}:0.3"]
    assert forgec(["train", SPEC, "--out", str(tmp_path / "full"), "--steps", "4", *common]) == 0
    assert forgec(["train", SPEC, "--out", str(tmp_path / "part"), "--steps", "4",
                   "--ckpt-every", "2", *common]) == 0
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_000004")
    assert forgec(["train", SPEC, "--out", str(tmp_path / "part"), "--steps", "4",
                   "--resume", "--no-progress"]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_instruction_data_under_a_pipeline_plan_equals_single_process(tmp_path):
    """pp2 (1F1B, 4 micro-batches) on 2 gloo ranks: the loss is normalised by the
    global batch's response tokens, as in one process."""
    from dist_helpers import spawn, train_runs

    from forgec.runtime.train import read_metrics, train

    ds = pairs_dataset(tmp_path, PAIRS * 3)
    settings = {"batch_size": 8, "seq_len": 48, "lr": 3e-3, "seed": 0}
    train(SPEC, str(tmp_path / "ref"), steps=3, data=str(ds), progress=False, **settings)
    argv = [SPEC, "--out", str(tmp_path / "pp2"), "--plan", "pp2", "--steps", "3",
            "--no-progress", "--data", str(ds)]
    for key, value in settings.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    torch.set_num_threads(1)
    spawn(train_runs, ([(argv, {})],), world=2, tmp_dir=str(tmp_path), timeout=240)

    def losses(run):
        return [r["loss"] for r in read_metrics(str(run / "metrics.jsonl"))]

    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "pp2")
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= 1e-5


def test_generate_chat_replies_to_the_rendered_user_message(tmp_path, capsys):
    from forgec.runtime.generate import generate, load_run_model

    ds = pairs_dataset(tmp_path, PAIRS)
    run = tmp_path / "run"
    assert forgec(["train", SPEC, "--out", str(run), "--steps", "2", "--batch-size", "2",
                   "--seq-len", "48", "--data", str(ds), "--no-progress"]) == 0
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    capsys.readouterr()
    assert forgec(["generate", str(run), "--chat", "--prompt", "hello", "--chat-template",
                   str(template), "--max-new-tokens", "12"]) == 0
    reply = capsys.readouterr().out
    # the reply continues the conversation as the template renders it
    model, _ = load_run_model(str(run))
    prompt = list(b"[USER]hello\n[BOT]")
    new = generate(model, [prompt], 12, eos_id=0)[0]
    if new and new[-1] == 0:
        new = new[:-1]
    assert reply == bytes(new).decode("utf-8", errors="replace") + "\n"
    assert forgec(["generate", str(run), "--chat", "--prompt", "hello"]) == 1
    err = capsys.readouterr().err
    assert "the byte tokenizer has no chat_template" in err and "Traceback" not in err
    assert forgec(["generate", str(run), "--prompt", "hello", "--chat-template",
                   str(template)]) == 2
    assert "--chat-template needs --chat" in capsys.readouterr().err


def test_eval_of_an_instruction_dataset_scores_the_responses(tmp_path, capsys):
    """`forgec eval --data` of a pairs dataset: the mean cross-entropy of the response
    tokens, each example run alone."""
    from forgec.runtime.generate import load_run_model

    ds = pairs_dataset(tmp_path, PAIRS)
    run = tmp_path / "run"
    assert forgec(["train", SPEC, "--out", str(run), "--steps", "1", "--batch-size", "2",
                   "--seq-len", "48", "--data", str(ds), "--no-progress"]) == 0
    capsys.readouterr()
    assert forgec(["eval", str(run), "--data", str(ds), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, _ = load_run_model(str(run))
    losses = []
    for p in PAIRS:
        prompt, response = p["prompt"].encode(), p["response"].encode() + b"\0"
        ids = torch.tensor([list(prompt + response)])
        with torch.no_grad():
            logits = model(ids[:, :-1])[0]
        losses += F.cross_entropy(logits[len(prompt) - 1 :], ids[0, len(prompt) :],
                                  reduction="none").tolist()
    assert result["tokens"] == len(losses)
    assert abs(result["loss"] - sum(losses) / len(losses)) <= 1e-5
