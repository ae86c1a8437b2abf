"""`forgec tokenize INPUT... -o OUT`: text, JSONL and Parquet → sharded token files.

Inputs are files or folders (walked recursively in sorted order): `.txt`/`.md`
files are one document each; `.jsonl` files one document per line (the
`--text-field` of each JSON object); `.parquet` files one per row of that
column (read with pyarrow). Empty documents are skipped.

The documents, in input order, are cut into shards of `--docs-per-shard`
documents. Shard k is `OUT/shard_0000k.bin`: each document's tokens followed by
the tokenizer's end-of-text token, as uint16 (vocabularies up to 65,536) or
uint32, the flat format `forgec train --data` reads. Because the cut depends
only on the inputs, the output is byte-identical for any `--workers`.

Each finished shard is written under a temporary name, renamed, and described
by `OUT/shard_0000k.json` (tokens, documents, largest id, SHA-256); a run that
is interrupted and started again skips the shards it finished. When all are
done, `OUT/manifest.json` lists them with the tokenizer's identity (training
refuses a dataset tokenized differently from its model) and the totals.

Instruction data (`--format pairs` or `--format chat`, JSONL only) is one
example per line: a prompt/response pair (`--prompt-field`, `--response-field`)
or a conversation (`--messages-field`: [{role, content}, ...]) rendered with
the tokenizer's chat template (runtime/chat.py). Beside each shard's tokens,
`shard_0000k.mask` holds one byte per token (runtime/data.py): MASK_TRAIN where the token is a
response (assistant) token, so predicting it is trained, and MASK_DOC_START on
each example's first token: every example is its own document in training.
The manifest records the format and the mask files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from forgec.compiler.errors import RunError, UsageError

TEXT_EXT = (".txt", ".md", ".text")
JSONL_EXT = (".jsonl", ".ndjson")
PARQUET_EXT = (".parquet",)
PLAN = "plan.json"


@dataclass(frozen=True)
class Examples:
    """How instruction records are read (`--format pairs|chat`)."""

    format: str
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chat_template: str | None = None  # a file; None: the tokenizer's own


@dataclass(frozen=True)
class Piece:
    """Documents [start, stop) of one input file (for JSONL: byte offsets of
    whole lines; for Parquet: rows; for text: the one document, 0..1)."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    start: int
    stop: int


def _kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in TEXT_EXT:
        return "text"
    if ext in JSONL_EXT:
        return "jsonl"
    if ext in PARQUET_EXT:
        return "parquet"
    return None


def input_files(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, kind) of every input file: files as given, folders walked in sorted order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names)
                          if _kind(n) and not n.startswith(".")]
            if not found:
                raise UsageError(f"{item} holds no .txt, .md, .jsonl or .parquet files")
            files += [(f, _kind(f)) for f in found]
        elif os.path.isfile(item):
            kind = _kind(item)
            if kind is None:
                raise UsageError(f"{item}: not a .txt, .md, .jsonl or .parquet file")
            files.append((item, kind))
        else:
            raise UsageError(f"no such file or folder: '{item}'")
    return [(os.path.abspath(f), k) for f, k in files]


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency
        raise RunError("reading .parquet needs pyarrow (pip install pyarrow)") from None
    return pq


def plan_pieces(path: str, kind: str, per_shard: int) -> list[tuple[Piece, int]]:
    """The file's documents in pieces of at most `per_shard`: (piece, documents)."""
    if kind == "text":
        return [(Piece(path, kind, 0, 1), 1)]
    if kind == "parquet":
        try:
            rows = _parquet().ParquetFile(path).metadata.num_rows
        except Exception as e:  # noqa: BLE001 — a broken file is bad input
            raise RunError(f"cannot read {path}: {e}") from None
        return [(Piece(path, kind, s, min(s + per_shard, rows)), min(per_shard, rows - s))
                for s in range(0, rows, per_shard)]
    out, start, count, offset = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            if line.strip():
                count += 1
                if count == per_shard:
                    out.append((Piece(path, kind, start, offset), count))
                    start, count = offset, 0
    if count:
        out.append((Piece(path, kind, start, offset), count))
    return out


def plan_shards(files: list[tuple[str, str]], per_shard: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into shards of at most `per_shard` documents."""
    shards: list[list[Piece]] = [[]]
    room = per_shard
    for path, kind in files:
        for piece, n in plan_pieces(path, kind, per_shard):
            if n > room:  # a piece never spans shards: start a new one
                shards.append([])
                room = per_shard
            shards[-1].append(piece)
            room -= n
    return [s for s in shards if s]


def read_documents(piece: Piece, text_field: str) -> list[str]:
    """The texts of a piece's documents (empty ones included)."""
    if piece.kind == "text":
        try:
            with open(piece.path, encoding="utf-8", errors="replace") as f:
                return [f.read()]
        except OSError as e:
            raise RunError(f"cannot read {piece.path}: {e}") from None
    if piece.kind == "parquet":
        pq = _parquet()
        try:
            pf = pq.ParquetFile(piece.path)
            if text_field not in pf.schema_arrow.names:
                raise RunError(f"{piece.path} has no column '{text_field}' (columns: "
                               f"{', '.join(pf.schema_arrow.names)}); choose it with "
                               "--text-field")
            texts, first = [], 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                lo, hi = max(piece.start, first), min(piece.stop, first + n)
                if lo < hi:
                    column = pf.read_row_group(g, columns=[text_field]).column(0)
                    texts += column.slice(lo - first, hi - lo).to_pylist()
                first += n
        except RunError:
            raise
        except Exception as e:  # noqa: BLE001 — a broken file is bad input
            raise RunError(f"cannot read {piece.path}: {e}") from None
        bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)),
                   None)
        if bad is not None:
            raise RunError(f"{piece.path}: row {piece.start + bad}: column '{text_field}' is "
                           "not text")
        return [t or "" for t in texts]
    texts = []
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.stop - piece.start)
    offset = piece.start
    for raw in data.split(b"\n"):
        at, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise RunError(f"{piece.path}:{_line_of(piece.path, at)}: not JSON: {e}") from None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise RunError(f"{piece.path}:{_line_of(piece.path, at)}: no text field "
                           f"'{text_field}' (choose it with --text-field)")
        texts.append(text)
    return texts


def _line_of(path: str, offset: int) -> int:
    """The 1-based line number of the byte `offset` of a file (for messages)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def documents_of_file(path: str, text_field: str) -> list[str]:
    """Every non-empty document of one input file (for `forgec eval --data`)."""
    kind = _kind(path)
    if kind is None:
        raise UsageError(f"{path}: not a .txt, .md, .jsonl or .parquet file")
    texts = []
    for piece, _ in plan_pieces(path, kind, 1 << 30):
        texts += read_documents(piece, text_field)
    return [t for t in texts if t]


# ---- workers ------------------------------------------------------------------------------

_TOKENIZER = None
_TEMPLATE = None


def _init_worker(setting: str, examples: Examples | None = None) -> None:
    global _TOKENIZER, _TEMPLATE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from .tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(setting)
    if examples is not None and examples.format == "chat":
        from .chat import load_chat_template

        _TEMPLATE = load_chat_template(_TOKENIZER, examples.chat_template)


def read_examples(piece: Piece, examples: Examples) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of each record of a JSONL piece; bad records are located errors."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.stop - piece.start)
    out, offset = [], piece.start
    for raw in data.split(b"\n"):
        at, offset = offset, offset + len(raw) + 1
        if raw.strip():
            try:
                out.append(encode_record(raw, examples))
            except RunError as e:
                raise RunError(f"{piece.path}:{_line_of(piece.path, at)}: {e}") from None
    return out


def encode_record(raw: bytes, examples: Examples) -> tuple[list[int], list[int]]:
    """(ids, mask) of one JSONL record; RunError says what is wrong with it."""
    from .chat import TemplateError, check_messages, encode_chat, encode_pair

    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise RunError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RunError("not a JSON object")
    if examples.format == "pairs":
        for name, flag in ((examples.prompt_field, "prompt"),
                           (examples.response_field, "response")):
            if not isinstance(obj.get(name), str):
                raise RunError(f"no text field '{name}' (choose it with --{flag}-field)")
        ids, mask = encode_pair(_TOKENIZER, obj[examples.prompt_field],
                                obj[examples.response_field])
    else:
        messages = obj.get(examples.messages_field)
        if messages is None:
            raise RunError(f"no field '{examples.messages_field}' (choose it with "
                           "--messages-field)")
        why = check_messages(messages, examples.messages_field)
        if why:
            raise RunError(why)
        try:
            ids, mask = encode_chat(_TOKENIZER, _TEMPLATE, messages)
        except TemplateError as e:
            raise RunError(f"{e} ({_TEMPLATE.origin})") from None
    if not any(mask):
        raise RunError("the response renders to no tokens (nothing to train on)")
    return ids, mask


def _write(path: str, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, then rename it."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def tokenize_shard(out: str, index: int, pieces: list[Piece], text_field: str,
                   dtype: str, examples: Examples | None = None) -> dict:
    """Tokenize one shard into OUT/shard_NNNNN.bin (and .mask for instruction
    data); return (and write) its description."""
    from .data import MASK_DOC_START, MASK_TRAIN

    mask = None
    if examples is None:
        texts = [t for p in pieces for t in read_documents(p, text_field) if t]
        ids = _TOKENIZER.encode_batch(texts, eos=True) if texts else []
    else:
        records = [r for p in pieces for r in read_examples(p, examples)]
        ids = [r[0] for r in records]
        mask = np.fromiter((m for _, row in records for m in row), dtype=np.uint8,
                           count=sum(len(r) for r in ids))
        starts = np.cumsum([0] + [len(r) for r in ids[:-1]]).astype(np.int64)
        mask[starts] |= MASK_DOC_START
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int64,
                       count=sum(len(r) for r in ids))
    tokens = flat.astype(dtype)
    name = f"shard_{index:05d}"
    if mask is not None:  # before the .bin: a finished .bin says its shard is whole
        _write(os.path.join(out, name + ".mask"), mask.tobytes())
    tmp = os.path.join(out, f".{name}.bin.tmp")
    with open(tmp, "wb") as f:
        f.write(tokens.tobytes())
    os.replace(tmp, os.path.join(out, name + ".bin"))
    info = {"file": name + ".bin", "tokens": int(tokens.size), "documents": len(ids),
            "max_id": int(flat.max()) if flat.size else 0,
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    if mask is not None:
        info.update(mask=name + ".mask", mask_sha256=hashlib.sha256(mask.tobytes()).hexdigest(),
                    trained=int((mask & MASK_TRAIN).sum()))
    tmp = os.path.join(out, f".{name}.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(out, name + ".json"))
    return info


def _run_shard(job) -> dict:
    return tokenize_shard(*job)


def _finished(out: str, index: int, dtype: str) -> dict | None:
    """The description of shard `index` if it was finished (its .bin has the size it says)."""
    name = f"shard_{index:05d}"
    try:
        with open(os.path.join(out, name + ".json"), encoding="utf-8") as f:
            info = json.load(f)
        size = os.path.getsize(os.path.join(out, name + ".bin"))
    except (OSError, ValueError):
        return None
    if size != info.get("tokens", -1) * np.dtype(dtype).itemsize:
        return None
    if "mask" in info:
        try:
            if os.path.getsize(os.path.join(out, info["mask"])) != info["tokens"]:
                return None
        except OSError:
            return None
    return info


# ---- the command --------------------------------------------------------------------------


def tokenize(inputs: list[str], out: str, *, tokenizer: str = "byte", text_field: str = "text",
             docs_per_shard: int = 10_000, workers: int = 1, progress: bool = True,
             force: bool = False, examples: Examples | None = None) -> dict:
    """Tokenize `inputs` into the dataset folder `out`; return its manifest."""
    from .data import MANIFEST, MANIFEST_FORMAT
    from .tokenizer import load_tokenizer, resolve_tokenizer_setting

    if docs_per_shard < 1:
        raise UsageError("--docs-per-shard must be at least 1")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if examples is not None and examples.format == "text":
        examples = None
    setting = resolve_tokenizer_setting(tokenizer)
    tok = load_tokenizer(setting)
    described = None
    if examples is not None:
        described = {"format": examples.format}
        if examples.format == "pairs":
            described.update(prompt_field=examples.prompt_field,
                             response_field=examples.response_field)
        else:
            from .chat import load_chat_template

            template = load_chat_template(tok, examples.chat_template)
            described.update(messages_field=examples.messages_field,
                             chat_template_sha256=hashlib.sha256(
                                 template.source.encode()).hexdigest())
    eos_id = tok.eos_id
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    files = input_files(inputs)
    if examples is not None:
        other = [p for p, kind in files if kind != "jsonl"]
        if other:
            raise UsageError(f"{other[0]}: --format {examples.format} reads .jsonl files only")
    plan = {"format": MANIFEST_FORMAT, "tokenizer": {
        "identity": tok.identity, "source": setting, "vocab_size": tok.vocab_size,
        "eos_id": eos_id}, "dtype": dtype, "text_field": text_field,
        "docs_per_shard": docs_per_shard,
        "inputs": [{"path": p, "size": os.path.getsize(p)} for p, _ in files]}
    if described is not None:
        plan["examples"] = described
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"-o {out} is a file")
    os.makedirs(out, exist_ok=True)
    plan_path = os.path.join(out, PLAN)
    if os.path.isfile(plan_path) and not force:
        with open(plan_path, encoding="utf-8") as f:
            previous = json.load(f)
        if {k: v for k, v in previous.items() if k != "shards"} != plan:
            raise UsageError(f"{out} holds a dataset of other inputs or settings; --force "
                             "starts it afresh, or choose another -o")
    elif os.listdir(out) and not force:
        raise UsageError(f"{out} is not empty; --force replaces its contents")
    if force:
        for name in os.listdir(out):
            if name.startswith(("shard_", ".shard_")) or name in (PLAN, MANIFEST):
                os.remove(os.path.join(out, name))
    shards = plan_shards(files, docs_per_shard)
    with open(plan_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    os.replace(plan_path + ".tmp", plan_path)

    done = {i: info for i in range(len(shards)) if (info := _finished(out, i, dtype))}
    todo = [(out, i, pieces, text_field, dtype, examples) for i, pieces in enumerate(shards)
            if i not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), initial=len(done), unit="shard", desc="tokenize",
                   file=sys.stderr)
    try:
        if workers == 1 or len(todo) <= 1:
            _init_worker(setting, examples)
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            for job in todo:
                done[job[1]] = tokenize_shard(*job)
                if bar:
                    bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(setting, examples)) as pool:
                futures = {pool.submit(_run_shard, job): job[1] for job in todo}
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    if bar:
                        bar.update(1)
    finally:
        if bar:
            bar.close()
    listed = [done[i] for i in range(len(shards))]
    total_docs = sum(s["documents"] for s in listed)
    manifest = {**plan, "shards": listed, "tokens": sum(s["tokens"] for s in listed),
                "documents": total_docs}
    if examples is not None:
        manifest["trained_tokens"] = sum(s["trained"] for s in listed)
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, MANIFEST))
    return manifest


def cmd_tokenize(args) -> int:
    examples = Examples(args.format, args.prompt_field, args.response_field,
                        args.messages_field, args.chat_template)
    manifest = tokenize(args.inputs, args.output, tokenizer=args.tokenizer,
                        text_field=args.text_field, docs_per_shard=args.docs_per_shard,
                        workers=args.workers, progress=not args.no_progress, force=args.force,
                        examples=examples)
    print(f"wrote {args.output}: {manifest['tokens']:,} tokens of {manifest['documents']:,} "
          f"{'examples' if 'examples' in manifest else 'documents'} in "
          f"{len(manifest['shards'])} shard(s) ({manifest['dtype']}), "
          f"tokenizer {manifest['tokenizer']['source']}", file=sys.stderr)
    return 0
