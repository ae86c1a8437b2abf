"""Training data: a byte-level tokenizer, a default corpus and packed sequences.

* `ByteTokenizer`: UTF-8 bytes are the tokens (vocabulary 256); byte 0 doubles
  as end-of-text (`EOS_ID`), so a document is its bytes followed by one 0.
* `stdlib_corpus()`: a corpus every machine has, the Python standard library's
  own top-level `.py` sources, in sorted order, one document per file.
* `load_token_file()`: a user's flat token file (numpy memmap, uint16 or
  uint32), checked against the model's vocabulary. Within it, `eos_id` ends a
  document, exactly as in the byte corpus.
* `PackedData`: the token stream cut into fixed-length windows; each batch row
  carries `doc_ids` (attention stays inside a document) and targets that never
  cross a document boundary. The order of the windows is a permutation drawn
  from (seed, epoch); the position in it is a small `state_dict()` that a
  checkpoint stores, so a resumed run continues the exact stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from forgec.compiler.errors import RunError, UsageError

EOS_ID = 0
VOCAB_SIZE = 256
IGNORE_INDEX = -100  # cross-entropy's ignore_index: a target that is not trained on
MASK_TRAIN, MASK_DOC_START = 1, 2  # the bits of an instruction dataset's .mask byte
DEFAULT_CORPUS_BYTES = 4_000_000
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class ByteTokenizer:
    """UTF-8 bytes as token ids; `decode(encode(s)) == s` for every string."""

    vocab_size = VOCAB_SIZE
    eos_id = EOS_ID

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is not a byte (0..255)")
        return bytes(ids).decode("utf-8", errors="replace")


def stdlib_documents(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[tuple[str, bytes]]:
    """(name, bytes) of the standard library's top-level `.py` files, sorted by
    name; files that would take the total past `max_bytes` are skipped. NUL
    bytes (end-of-text) are removed from the sources."""
    root = os.path.dirname(os.__file__)
    docs: list[tuple[str, bytes]] = []
    total = 0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read().replace(b"\0", b"")
        if not data or total + len(data) > max_bytes:
            continue
        docs.append((name, data))
        total += len(data)
    if not docs:
        raise RunError(f"no Python sources found in {root} for the default corpus; pass --data")
    return docs


def pack_documents(docs: list[bytes], eos_id: int = EOS_ID) -> np.ndarray:
    """One token stream: each document's bytes followed by `eos_id`."""
    parts = []
    for doc in docs:
        parts.append(np.frombuffer(doc, dtype=np.uint8))
        parts.append(np.array([eos_id], dtype=np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def stdlib_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> np.ndarray:
    """The default training stream (uint8 byte tokens)."""
    return pack_documents([d for _, d in stdlib_documents(max_bytes)])


def check_vocab(tokens: np.ndarray, vocab_size: int, source: str, block: int = 1 << 24) -> None:
    """RunError naming the first token id >= vocab_size and its offset."""
    for start in range(0, len(tokens), block):
        chunk = np.asarray(tokens[start : start + block])
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            i = int(bad[0])
            raise RunError(
                f"{source}: token id {int(chunk[i])} at offset {start + i} is out of range for "
                f"the model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1})"
            )


def load_token_file(path: str, dtype: str, vocab_size: int) -> np.ndarray:
    """A read-only memmap of a flat token file, validated against the vocabulary."""
    if dtype not in TOKEN_DTYPES:
        raise UsageError(f"--data-dtype must be one of {', '.join(TOKEN_DTYPES)}, got '{dtype}'")
    if not os.path.exists(path):
        raise UsageError(f"no such file: '{path}'")
    if os.path.isdir(path):
        raise UsageError(f"'{path}' is a directory, not a token file")
    np_dtype = np.dtype(TOKEN_DTYPES[dtype])
    size = os.path.getsize(path)
    if size == 0:
        raise RunError(f"{path}: the token file is empty")
    if size % np_dtype.itemsize:
        raise RunError(
            f"{path}: {size} bytes is not a whole number of {dtype} tokens "
            f"({np_dtype.itemsize} bytes each); is --data-dtype right?"
        )
    try:
        tokens = np.memmap(path, dtype=np_dtype, mode="r")
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot map the token file: {e}") from None
    check_vocab(tokens, vocab_size, path)
    return tokens


def fingerprint(tokens: np.ndarray, edge: int = 1 << 20) -> str:
    """A cheap identity of a token stream: its length and first and last `edge` tokens."""
    h = hashlib.sha256()
    h.update(f"{len(tokens)}:{tokens.dtype}".encode())
    h.update(np.ascontiguousarray(tokens[:edge]).tobytes())
    h.update(np.ascontiguousarray(tokens[-edge:]).tobytes())
    return h.hexdigest()[:16]


def pack_window(window: np.ndarray, eos_id: int = EOS_ID) -> tuple[np.ndarray, ...]:
    """A window of L+1 stream tokens → (inputs, targets, doc_ids), each of length L.

    Token t's document id counts the end-of-text tokens before it in the
    window, so an EOS belongs to the document it ends. The target of input t is
    token t+1 unless input t is an EOS: then t+1 starts the next document and
    the target is IGNORE_INDEX.
    """
    window = np.asarray(window).astype(np.int64)
    inputs, targets = window[:-1], window[1:].copy()
    is_eos = inputs == eos_id
    doc_ids = np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int64)
    targets[is_eos] = IGNORE_INDEX
    return inputs, targets, doc_ids


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, IGNORE_INDEX where not trained on
    doc_ids: torch.Tensor  # (B, L) int64


class PackedData:
    """Fixed-length training windows of a token stream, in a seeded order.

    Window i is `tokens[i*L : i*L + L + 1]` (consecutive windows share one
    token, so every token but the first is a target once per epoch). Epoch e
    visits the windows in `default_rng([seed, e]).permutation(n)` order.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, *,
                 eos_id: int = EOS_ID, source: str = "data") -> None:
        if seq_len < 1:
            raise UsageError("--seq-len must be positive")
        self.tokens, self.seq_len, self.seed, self.eos_id = tokens, seq_len, seed, eos_id
        self.source = source
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise RunError(
                f"{source} holds {len(tokens)} tokens; a sequence of --seq-len {seq_len} "
                f"needs at least {seq_len + 1}"
            )
        self.fingerprint = fingerprint(tokens)
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), self.epoch
        return self._perm

    def window(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def row(self, i: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets, doc_ids) of window i."""
        return pack_window(self.window(i), self.eos_id)

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        for _ in range(batch_size):
            rows.append(self.row(int(self._order()[self.index])))
            self.index += 1
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        inputs, targets, doc_ids = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
        return Batch(inputs, targets, doc_ids)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seq_len": self.seq_len,
                "seed": self.seed, "num_windows": self.num_windows,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "seed", "num_windows", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise RunError(
                    f"the checkpoint's data position does not fit {self.source}: {key} was "
                    f"{state.get(key)!r}, now {getattr(self, key)!r} (the data changed?)"
                )
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0
                and 0 <= index < self.num_windows):
            raise RunError(f"the checkpoint's data position is invalid: {state!r}")
        self.epoch, self.index = epoch, index


# ---- tokenized datasets (`forgec tokenize`) and mixtures --------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "forgec-tokens/1"
MIX_BLOCK = 4096  # mixture choices are drawn this many rows at a time


def parse_data_setting(value: str) -> list[tuple[str, float | None]]:
    """`PATH` or a mixture `PATH:WEIGHT,PATH:WEIGHT,...` → [(path, weight or None)]."""
    parts = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"--data '{value}': an empty entry")
        path, weight = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                pass
            else:
                path = head
                if not (weight > 0 and np.isfinite(weight)):
                    raise UsageError(f"--data {item}: a weight must be a positive number")
        parts.append((path, weight))
    if len(parts) > 1 and any(w is None for _, w in parts):
        raise UsageError(f"--data '{value}': give each dataset of a mixture a weight, e.g. "
                         "--data a:0.7,b:0.3")
    return parts


def data_setting(value: str) -> str:
    """The --data value with absolute paths (what a run records)."""
    return ",".join(os.path.abspath(p) + (f":{w:g}" if w is not None else "")
                    for p, w in parse_data_setting(value))


class ShardedTokens:
    """The shards of a tokenized dataset as one read-only token sequence: len(),
    slices (a slice spanning shards is copied together) and dtype."""

    def __init__(self, paths: list[str], dtype: np.dtype) -> None:
        self.shards = [np.memmap(p, dtype=dtype, mode="r") if os.path.getsize(p)
                       else np.zeros(0, dtype=dtype) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        pieces = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            if hi > start:
                pieces.append(self.shards[i][max(start, lo) - lo : min(stop, hi) - lo])
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ExampleData(PackedData):
    """Instruction examples (`forgec tokenize --format pairs|chat`) packed whole
    into windows of seq_len + 1 tokens, in their order: a window takes the next
    examples while they fit and is padded after them (the padding is a document
    of its own, with no targets); an example longer than a window fills one
    alone, cut to its length. Each example is a document of its own (`doc_ids`),
    and only targets the mask marks as response tokens are trained: the loss is
    the mean over the batch's response tokens. The window order and position
    are those of PackedData."""

    def __init__(self, tokens, mask, seq_len: int, seed: int, *, eos_id: int = EOS_ID,
                 source: str = "data") -> None:
        if seq_len < 1:
            raise UsageError("--seq-len must be positive")
        self.tokens, self.mask, self.seq_len, self.seed = tokens, mask, seq_len, seed
        self.eos_id, self.source = eos_id, source
        starts = np.concatenate([np.flatnonzero(np.asarray(shard) & MASK_DOC_START) + offset
                                 for shard, offset in zip(mask.shards, mask.offsets[:-1],
                                                          strict=True)])
        stops = np.append(starts[1:], len(tokens))
        room = seq_len + 1
        win_starts, win_stops = [], []
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            if win_starts and stop - win_starts[-1] <= room and win_stops[-1] == start:
                win_stops[-1] = stop  # the example fits after the window's last one
            else:
                win_starts.append(start)
                win_stops.append(min(stop, start + room))
        self.win_starts, self.win_stops = np.array(win_starts), np.array(win_stops)
        self.num_windows = len(win_starts)
        if self.num_windows < 1:
            raise RunError(f"{source} holds no examples")
        h = hashlib.sha256(fingerprint(tokens).encode())
        h.update(fingerprint(mask).encode())
        self.fingerprint = h.hexdigest()[:16]
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    def row(self, i: int) -> tuple[np.ndarray, ...]:
        start, stop = int(self.win_starts[i]), int(self.win_stops[i])
        n, size = stop - start, self.seq_len + 1
        tokens = np.full(size, self.eos_id, dtype=np.int64)
        tokens[:n] = self.tokens[start:stop]
        flags = np.zeros(size, dtype=np.uint8)
        flags[:n] = self.mask[start:stop]
        if n < size:
            flags[n] = MASK_DOC_START  # the padding: one more document
        doc = np.cumsum((flags & MASK_DOC_START) != 0) - 1
        trained = ((flags[1:] & MASK_TRAIN) != 0) & (doc[1:] == doc[:-1])
        targets = np.where(trained, tokens[1:], IGNORE_INDEX)
        return tokens[:-1], targets, doc[:-1].astype(np.int64)


def read_manifest(path: str) -> tuple[dict, str]:
    """(manifest, its folder) of a `forgec tokenize` output folder or its manifest.json."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, MANIFEST) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        for shard in manifest["shards"]:
            if not isinstance(shard["file"], str) or not isinstance(shard["tokens"], int):
                raise ValueError("bad shard entry")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{file} is not a tokenized dataset's manifest: {e}") from None
    return manifest, folder


def is_dataset(path: str) -> bool:
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))) or (
        os.path.basename(path) == MANIFEST and os.path.isfile(path))


def load_dataset_tokens(path: str, vocab_size: int, tokenizer) -> ShardedTokens:
    """The tokens of a tokenized dataset, checked against the run's tokenizer and
    vocabulary (the manifest's per-shard largest id) and the shard sizes."""
    manifest, folder = read_manifest(path)
    tok = manifest.get("tokenizer", {})
    if tok.get("identity") != tokenizer.identity:
        raise RunError(f"{path} was tokenized with {tok.get('source', 'another tokenizer')} "
                       f"(identity {tok.get('identity')}); the run uses {tokenizer.describe()} "
                       f"(identity {tokenizer.identity}): tokenize it again with --tokenizer")
    dtype = manifest.get("dtype")
    if dtype not in TOKEN_DTYPES:
        raise RunError(f"{path}: the manifest's dtype {dtype!r} is not uint16 or uint32")
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    paths = []
    for shard in manifest["shards"]:
        file = os.path.join(folder, shard["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["tokens"] * itemsize:
            raise RunError(f"{file}: missing or not {shard['tokens']} tokens as the manifest "
                           "says (was the dataset changed?)")
        if shard.get("max_id", 0) >= vocab_size:
            raise RunError(f"{file}: token id {shard['max_id']} is out of range for the "
                           f"model's vocabulary of {vocab_size}")
        paths.append(file)
    tokens = ShardedTokens(paths, TOKEN_DTYPES[dtype])
    if len(tokens) == 0:
        raise RunError(f"{path}: the dataset holds no tokens")
    return tokens


def load_dataset_mask(path: str) -> ShardedTokens | None:
    """The loss mask of an instruction dataset (one byte per token, see
    runtime/tokenize.py), None for a dataset of plain documents."""
    manifest, folder = read_manifest(path)
    if "examples" not in manifest:
        return None
    paths = []
    for shard in manifest["shards"]:
        file = os.path.join(folder, str(shard.get("mask")))
        if not os.path.isfile(file) or os.path.getsize(file) != shard["tokens"]:
            raise RunError(f"{file}: missing or not the {shard['tokens']} bytes of the loss "
                           "mask the manifest says (was the dataset changed?)")
        paths.append(file)
    return ShardedTokens(paths, np.uint8)


def load_tokens(path: str, dtype: str, vocab_size: int, tokenizer) -> np.ndarray | ShardedTokens:
    """A flat token file or a tokenized dataset (folder or manifest.json)."""
    if is_dataset(path):
        return load_dataset_tokens(path, vocab_size, tokenizer)
    if os.path.isdir(path):
        raise UsageError(f"'{path}' is a folder without {MANIFEST} (make one with "
                         "`forgec tokenize`)")
    return load_token_file(path, dtype, vocab_size)


def corpus_tokens(tokenizer) -> np.ndarray:
    """The default corpus, tokenized (each file a document ended by eos)."""
    if tokenizer.identity == "byte":
        return stdlib_corpus()
    docs = [d.decode("utf-8", errors="replace") for _, d in stdlib_documents()]
    ids = [i for row in tokenizer.encode_batch(docs, eos=True) for i in row]
    return np.asarray(ids, dtype=np.uint32)


class MixedData:
    """Batches drawn from several PackedData streams: each row's source is a seeded
    weighted choice (a function of the seed and the row's index), each source
    keeps its own window order. `state_dict()` holds the row count and every
    source's position."""

    def __init__(self, parts: list[PackedData], weights: list[float], seed: int) -> None:
        total = sum(weights)
        self.parts, self.weights, self.seed = parts, [w / total for w in weights], seed
        self.rows = 0
        self._block, self._choices = -1, None
        self.source = " + ".join(f"{p.source} ({w:.0%})"
                                 for p, w in zip(parts, self.weights, strict=True))

    def choice(self, row: int) -> int:
        block = row // MIX_BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, 0x6D6978, block])
            self._choices = rng.choice(len(self.parts), size=MIX_BLOCK, p=self.weights)
            self._block = block
        return int(self._choices[row % MIX_BLOCK])

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        for _ in range(batch_size):
            rows.append(self.parts[self.choice(self.rows)].next_batch(1))
            self.rows += 1
        return Batch(*(torch.cat([getattr(b, f) for b in rows])
                       for f in ("inputs", "targets", "doc_ids")))

    def state_dict(self) -> dict:
        return {"rows": self.rows, "weights": self.weights,
                "parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("parts")
        if not isinstance(parts, list) or len(parts) != len(self.parts) \
                or state.get("weights") != self.weights:
            raise RunError("the checkpoint's data position is not one of this mixture "
                           f"({self.source}): the datasets or weights changed?")
        rows = state.get("rows")
        if not isinstance(rows, int) or rows < 0:
            raise RunError(f"the checkpoint's data position is invalid: {state!r}")
        for part, s in zip(self.parts, parts, strict=True):
            part.load_state_dict(s)
        self.rows = rows


def load_training_data(data: str | None, dtype: str, vocab_size: int, seq_len: int, seed: int,
                       *, tok) -> PackedData | MixedData:
    """The training stream: the default corpus, a token file, a tokenized dataset,
    or a weighted mixture of token files and datasets (`a:0.7,b:0.3`). Documents
    end with the tokenizer `tok`'s end-of-text token (runtime/tokenizer.py loads it)."""
    if data is None:
        tokens = corpus_tokens(tok)
        source = "the default corpus (Python standard library sources)"
        check_vocab(tokens, vocab_size, source)
        return PackedData(tokens, seq_len, seed, eos_id=tok.eos_id, source=source)
    parts = parse_data_setting(data)
    streams = []
    for i, (path, _) in enumerate(parts):
        tokens = load_tokens(path, dtype, vocab_size, tok)
        mask = load_dataset_mask(path) if is_dataset(path) else None
        if mask is None:
            streams.append(PackedData(tokens, seq_len, seed + i, eos_id=tok.eos_id, source=path))
        else:
            streams.append(ExampleData(tokens, mask, seq_len, seed + i, eos_id=tok.eos_id,
                                       source=path))
    if len(streams) == 1:
        return streams[0]
    return MixedData(streams, [w for _, w in parts], seed)
