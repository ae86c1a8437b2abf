"""Tokenizers of runs: the byte tokenizer, or a Hugging Face `tokenizer.json`.

Where a tokenizer comes from:

* `forgec import-hf SRC -o specs/NAME.forge` copies SRC's tokenizer files
  (compiler/importers/hf.py, `TOKENIZER_FILES`) into `specs/NAME.tokenizer/`, beside the spec;
* `forgec train specs/NAME.forge` uses that folder when it exists (else the
  byte tokenizer), records it in the run's settings (`tokenizer`: the folder,
  or "byte") and copies it into `RUN/tokenizer/`;
* `forgec generate`, `eval` and `export-hf` read `RUN/tokenizer/`; a run
  without one uses the byte tokenizer.

A tokenizer has `encode(text, eos=False)`, `decode(ids)`, `vocab_size`,
`eos_id` (the token that ends a document in packed data) and `identity` (a
hash of its files, "byte" for the byte tokenizer): a tokenized dataset records
the identity, and training refuses data made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from forgec.compiler.errors import RunError, UsageError
from forgec.compiler.importers.hf import copy_tokenizer as _copy_tokenizer
from forgec.compiler.importers.hf import spec_tokenizer_dir, tokenizer_files

from .data import ByteTokenizer

BYTE = "byte"
RUN_TOKENIZER = "tokenizer"  # RUN/tokenizer/


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst`; return their names."""
    try:
        return _copy_tokenizer(src, dst)
    except FileNotFoundError:
        raise RunError(f"{src} has no tokenizer.json") from None


def folder_identity(folder: str) -> str:
    """SHA-256 (first 16 hex digits) of the tokenizer files' names and bytes."""
    h = hashlib.sha256()
    for name in tokenizer_files(folder):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from a folder's tokenizer.json. Text is
    encoded without the tokenizer's own special tokens (no BOS): `eos=True`
    appends the end-of-text token, as packed training data needs."""

    def __init__(self, folder: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - a dependency
            raise RunError("reading tokenizer.json needs the tokenizers package "
                           "(pip install tokenizers)") from None
        self.folder = folder
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise RunError(f"{folder} has no tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 — a broken tokenizer.json is bad input
            raise RunError(f"cannot read {path}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.config = self._read_json("tokenizer_config.json")
        special = self._read_json("special_tokens_map.json")
        self.eos_token = (_token_content(self.config.get("eos_token"))
                          or _token_content(special.get("eos_token")))
        self.bos_token = (_token_content(self.config.get("bos_token"))
                          or _token_content(special.get("bos_token")))
        self._eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.stop_id = self._eos_id  # where generation stops (None: nowhere)
        self.identity = folder_identity(folder)

    def _read_json(self, name: str) -> dict:
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {path}: {e}") from None
        return value if isinstance(value, dict) else {}

    @property
    def eos_id(self) -> int:
        if self._eos_id is None:
            what = (f"its eos_token '{self.eos_token}' is not in the vocabulary" if self.eos_token
                    else "tokenizer_config.json names no eos_token")
            raise RunError(f"the tokenizer in {self.folder} has no end-of-text token ({what}); "
                           "packed documents need one: add \"eos_token\" to "
                           "tokenizer_config.json")
        return self._eos_id

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if eos else ids

    def encode_batch(self, texts: list[str], *, eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        if eos:
            out = [ids + [self.eos_id] for ids in out]
        return out

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> str:
        return f"the tokenizer of {self.folder} ({self.vocab_size} tokens)"


class Bytes(ByteTokenizer):
    """The byte tokenizer with the interface of HFTokenizer."""

    identity = BYTE
    folder = None
    bos_id = None
    stop_id = ByteTokenizer.eos_id

    def encode_batch(self, texts: list[str], *, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, eos=eos) for t in texts]

    def describe(self) -> str:
        return "the byte tokenizer"


def load_tokenizer(where: str | None) -> Bytes | HFTokenizer:
    """`where`: "byte" (or None), a folder with tokenizer.json, or a tokenizer.json file."""
    if where in (None, BYTE):
        return Bytes()
    if os.path.isfile(where) and os.path.basename(where) == "tokenizer.json":
        where = os.path.dirname(where) or "."
    if not os.path.isdir(where):
        raise UsageError(f"no tokenizer at '{where}' (a folder with tokenizer.json, or 'byte')")
    return HFTokenizer(where)


def resolve_tokenizer_setting(value: str) -> str:
    """--tokenizer: "byte", a folder with tokenizer.json (or the file), a spec
    (`specs/NAME.forge`: its NAME.tokenizer/, else bytes) or a training run
    (its RUN/tokenizer/, else bytes) → "byte" or an absolute tokenizer folder."""
    if value == BYTE:
        return BYTE
    if os.path.isfile(value) and value.endswith(".forge"):
        return default_tokenizer_setting(value)
    if os.path.isdir(value) and os.path.isfile(os.path.join(value, "run.json")):
        folder = os.path.join(value, RUN_TOKENIZER)
        return os.path.abspath(folder) if os.path.isdir(folder) else BYTE
    if os.path.isfile(value) and os.path.basename(value) == "tokenizer.json":
        value = os.path.dirname(value) or "."
    if os.path.isdir(value) and os.path.isfile(os.path.join(value, "tokenizer.json")):
        return os.path.abspath(value)
    raise UsageError(f"--tokenizer {value}: not 'byte', a folder with tokenizer.json, a .forge "
                     "spec or a training run")


def default_tokenizer_setting(spec: str) -> str:
    """The tokenizer a run of `spec` uses unless told: the folder beside the spec, else bytes."""
    folder = spec_tokenizer_dir(spec)
    return os.path.abspath(folder) if os.path.isdir(folder) else BYTE


def attach_run_tokenizer(run_dir: str, setting: str, *, resume: bool) -> Bytes | HFTokenizer:
    """Copy the tokenizer of the run's settings into RUN/tokenizer/ (a fresh run),
    or check that it is still the one the run started with (a resumed run)."""
    dst = os.path.join(run_dir, RUN_TOKENIZER)
    if setting == BYTE:
        if resume and os.path.isdir(dst):
            raise RunError(f"{run_dir} was trained with the tokenizer in {dst}, but the run's "
                           "settings say bytes")
        if not resume and os.path.isdir(dst):
            shutil.rmtree(dst)
        return Bytes()
    tok = load_tokenizer(setting)
    if resume:
        if not os.path.isdir(dst) or folder_identity(dst) != tok.identity:
            raise RunError(f"the tokenizer in {setting} is not the one {run_dir} started with "
                           f"({dst}); a resumed run keeps its tokenizer")
    else:
        copy_tokenizer(setting, dst)
    return tok


def run_tokenizer(run_dir: str) -> Bytes | HFTokenizer:
    """The tokenizer of a training run: RUN/tokenizer/ if it has one, else bytes."""
    folder = os.path.join(run_dir, RUN_TOKENIZER)
    return HFTokenizer(folder) if os.path.isdir(folder) else Bytes()


def byte_tokenizer_json() -> dict:
    """A tokenizer.json whose ids are exactly the byte tokenizer's: byte b is token b
    (GPT-2's byte-to-character table names the tokens), no merges, byte 0 is end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters, unordered
    chars = _gpt2_byte_chars()
    assert set(chars) == set(table)
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable character for each byte value 0..255."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(folder: str) -> list[str]:
    """tokenizer.json + tokenizer_config.json of the byte tokenizer (eos: byte 0)."""
    os.makedirs(folder, exist_ok=True)
    spec = byte_tokenizer_json()
    eos = _gpt2_byte_chars()[ByteTokenizer.eos_id]
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    return ["tokenizer.json", "tokenizer_config.json"]
