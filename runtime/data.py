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
import os
from dataclasses import dataclass

import numpy as np
import torch

from compiler.errors import RunError, UsageError

EOS_ID = 0
VOCAB_SIZE = 256
IGNORE_INDEX = -100  # cross-entropy's ignore_index: a target that is not trained on
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

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        for _ in range(batch_size):
            rows.append(pack_window(self.window(int(self._order()[self.index])), self.eos_id))
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
