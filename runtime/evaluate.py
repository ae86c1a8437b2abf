"""`forgec eval RUN_DIR`: held-out loss and perplexity, or lm-eval-harness tasks.

`--data` is a flat token file, a `forgec tokenize` folder (or its
manifest.json), or a .txt/.md/.jsonl/.parquet file that is tokenized here with
the run's tokenizer (each document followed by end-of-text). The stream is cut
into consecutive windows of `--seq-len` + 1 tokens sharing one token, exactly
as training packs it (runtime/data.pack_window: attention stays inside a
document, no target crosses a document boundary); the last window may be
shorter. The loss is the mean next-token cross-entropy over every target of
the stream, in nats; perplexity is exp(loss). The result does not depend on
`--batch-size` beyond fp32 rounding of the batched matmuls. An instruction
dataset (`forgec tokenize --format pairs|chat`) is scored as it trains: whole
examples packed in order (runtime/data.ExampleData), over response tokens only.

`--tasks` runs lm-eval-harness tasks on the run's model (runtime/lm_eval_adapter.py).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from forgec.compiler.errors import RunError, UsageError

from .data import (
    IGNORE_INDEX,
    TOKEN_DTYPES,
    ExampleData,
    check_vocab,
    is_dataset,
    load_dataset_mask,
    load_tokens,
    pack_window,
)


def eval_tokens(path: str, dtype: str, vocab_size: int, tokenizer, text_field: str):
    """The token stream of --data."""
    from .tokenize import _kind, documents_of_file

    if not os.path.exists(path):
        raise UsageError(f"no such file: '{path}'")
    if not is_dataset(path) and os.path.isfile(path) and _kind(path) is not None:
        docs = documents_of_file(path, text_field)
        if not docs:
            raise RunError(f"{path} holds no text")
        ids = [i for row in tokenizer.encode_batch(docs, eos=True) for i in row]
        tokens = np.asarray(ids, dtype=np.int64)
        check_vocab(tokens, vocab_size, f"{path} (tokenized)")
        return tokens
    return load_tokens(path, dtype, vocab_size, tokenizer)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens, seq_len: int, *, eos_id: int,
                 batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """{"loss", "perplexity", "tokens" (targets scored), "windows"} of `tokens`."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise RunError(f"the data holds {n} token(s); a loss needs at least 2")
    starts = list(range(0, n - 1, seq_len))
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    model.eval()
    for b in range(0, len(starts), batch_size):
        rows = [pack_window(np.asarray(tokens[s : min(s + seq_len + 1, n)]), eos_id)
                for s in starts[b : b + batch_size]]
        for group in _same_length(rows):  # only the last window may be shorter
            inputs, targets, doc_ids = (torch.from_numpy(np.stack(c)) for c in zip(*group,
                                                                                   strict=True))
            logits = model(inputs, doc_ids=doc_ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.double()
            count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise RunError("the data has no target to score (every token ends a document)")
    loss = float(total / count)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "windows": len(starts), "seq_len": seq_len}


@torch.no_grad()
def examples_loss(model: torch.nn.Module, data, *, batch_size: int = 8,
                  max_tokens: int | None = None) -> dict:
    """heldout_loss() of an instruction dataset (an ExampleData): its windows in
    order (those within the first `max_tokens` tokens), response tokens only."""
    windows = [i for i in range(data.num_windows)
               if max_tokens is None or data.win_stops[i] <= max_tokens] or [0]
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    model.eval()
    for b in range(0, len(windows), batch_size):
        rows = [data.row(i) for i in windows[b : b + batch_size]]
        inputs, targets, doc_ids = (torch.from_numpy(np.stack(c)) for c in zip(*rows,
                                                                               strict=True))
        logits = model(inputs, doc_ids=doc_ids)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").double()
        count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise RunError("the data has no response token to score")
    loss = float(total / count)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "windows": len(windows), "seq_len": data.seq_len}


def _same_length(rows: list) -> list[list]:
    groups: dict[int, list] = {}
    for row in rows:
        groups.setdefault(len(row[0]), []).append(row)
    return list(groups.values())


def cmd_eval(args) -> int:
    from .generate import load_run_model
    from .tokenizer import run_tokenizer
    from .train import set_threads

    if (args.data is None) == (args.tasks is None):
        raise UsageError("give --data (held-out loss) or --tasks (lm-eval tasks)")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError("--seq-len must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2")
    if args.data_dtype not in TOKEN_DTYPES:
        raise UsageError(f"--data-dtype must be one of {', '.join(TOKEN_DTYPES)}")
    model, info = load_run_model(args.run, decodable=args.tasks is not None)
    if hasattr(model, "encode_images"):
        raise RunError(f"{args.run} trained a vision-language model; eval scores text models")
    set_threads()
    tok = run_tokenizer(args.run)
    if args.tasks is not None:
        from .lm_eval_adapter import run_tasks

        results = run_tasks(model, tok, args.tasks.split(","), include_path=args.include_path,
                            limit=args.limit, batch_size=args.batch_size)
        print(json.dumps(results, indent=1, sort_keys=True) if args.json
              else _task_table(results))
        return 0
    max_len = model.config.max_seq_len
    seq_len = args.seq_len or min(info["settings"].get("seq_len") or max_len, max_len)
    if seq_len > max_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {max_len}")
    tokens = eval_tokens(args.data, args.data_dtype, model.config.vocab_size, tok,
                         args.text_field)
    mask = load_dataset_mask(args.data) if is_dataset(args.data) else None
    if mask is not None:
        data = ExampleData(tokens, mask, seq_len, 0, eos_id=tok.eos_id, source=args.data)
        result = examples_loss(model, data, batch_size=args.batch_size,
                               max_tokens=args.max_tokens)
    else:
        result = heldout_loss(model, tokens, seq_len, eos_id=tok.eos_id,
                              batch_size=args.batch_size, max_tokens=args.max_tokens)
    result["data"] = args.data
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(f"{args.data}: loss {result['loss']:.4f} nats/token, perplexity "
              f"{result['perplexity']:.3f} ({result['tokens']:,} tokens scored in "
              f"{result['windows']:,} windows of {seq_len})")
    sys.stdout.flush()
    return 0


def _task_table(results: dict) -> str:
    lines = []
    for task, metrics in sorted(results.items()):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                          if isinstance(v, float))
        lines.append(f"{task}: {shown}")
    return "\n".join(lines)
