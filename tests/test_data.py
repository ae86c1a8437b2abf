"""runtime/data.py: byte tokenizer, default corpus, packing with doc_ids, token files."""

from __future__ import annotations

import numpy as np
import pytest

from forgec.compiler.errors import RunError, UsageError
from forgec.runtime.data import (
    EOS_ID,
    IGNORE_INDEX,
    ByteTokenizer,
    PackedData,
    check_vocab,
    load_token_file,
    pack_documents,
    pack_window,
    stdlib_corpus,
    stdlib_documents,
)


@pytest.mark.parametrize("text", ["", "hello", "def f(x):\n    return x\n", "naïve — 漢字 🙂",
                                  "tab\tand\x01control"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, eos=True) == ids + [EOS_ID]


def test_tokenizer_rejects_non_bytes():
    with pytest.raises(ValueError, match="256|not a byte"):
        ByteTokenizer().decode([65, 256])


def test_stdlib_corpus_is_deterministic_and_bounded():
    docs = stdlib_documents(max_bytes=1_000_000)
    assert docs == stdlib_documents(max_bytes=1_000_000)
    names = [n for n, _ in docs]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert len(docs) >= 5
    assert sum(len(d) for _, d in docs) <= 1_000_000
    assert all(d and b"\0" not in d for _, d in docs)
    stream = stdlib_corpus(max_bytes=1_000_000)
    assert stream.dtype == np.uint8
    assert len(stream) == sum(len(d) + 1 for _, d in docs)
    # exactly one end-of-text per document, at each document's end
    ends = np.flatnonzero(stream == EOS_ID)
    assert list(ends) == list(np.cumsum([len(d) + 1 for _, d in docs]) - 1)


def _docs_stream(lengths):
    """A stream of documents whose tokens name their document: doc k is made of
    token k + 1 (never EOS); returns (stream, global document index of each token)."""
    docs = [bytes([k + 1]) * n for k, n in enumerate(lengths)]
    stream = pack_documents(docs)
    doc_of = np.concatenate([[k] * (n + 1) for k, n in enumerate(lengths)])
    return stream, doc_of


def test_pack_window_doc_ids_follow_document_boundaries():
    stream, doc_of = _docs_stream([3, 1, 5, 2])
    # stream: 1 1 1 0 | 2 0 | 3 3 3 3 3 0 | 4 4 0
    inputs, targets, doc_ids = pack_window(stream)
    assert list(inputs) == list(stream[:-1])
    assert list(doc_ids) == list(doc_of[:-1])  # the window starts at a document start
    assert list(doc_ids) == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    # the target after each EOS is the next document's first token: not trained on
    expect = [int(t) for t in stream[1:]]
    for i in np.flatnonzero(stream[:-1] == EOS_ID):
        expect[i] = IGNORE_INDEX
    assert list(targets) == expect


def test_pack_window_starting_mid_document():
    stream, doc_of = _docs_stream([6, 2, 4])
    _, _, doc_ids = pack_window(stream[4:12])
    # relative ids: equal exactly where the global documents are equal
    glob = doc_of[4:11]
    assert list(doc_ids) == list(glob - glob[0])


def test_packed_batches_never_cross_documents():
    lengths = [5, 1, 9, 3, 14, 2, 7, 11, 4, 6, 8, 1, 12]
    stream, doc_of = _docs_stream(lengths)
    data = PackedData(stream, seq_len=8, seed=3)
    seen = []
    for _ in range(3):
        batch = data.next_batch(3)
        for row in range(3):
            inp, tgt, doc = (x[row].numpy() for x in (batch.inputs, batch.targets, batch.doc_ids))
            # find the window this row is (windows start at multiples of seq_len)
            starts = [s for s in range(0, len(stream) - 8, 8)
                      if np.array_equal(stream[s : s + 8], inp)]
            assert starts, "row is not a window of the stream"
            s = starts[0]
            seen.append(s)
            g = doc_of[s : s + 8]
            # attention: same doc_id exactly when the same document
            assert np.array_equal(doc[:, None] == doc[None, :], g[:, None] == g[None, :])
            for t in range(8):
                if tgt[t] == IGNORE_INDEX:
                    assert inp[t] == EOS_ID and doc_of[s + t + 1] != doc_of[s + t]
                else:
                    assert tgt[t] == stream[s + t + 1]
                    assert doc_of[s + t + 1] == doc_of[s + t]  # target in the same document
    assert len(seen) == 9


def test_epoch_order_is_seeded_and_complete():
    stream = np.arange(1, 202, dtype=np.uint16)  # 201 distinct tokens → 25 windows of 8
    a, b, c = (PackedData(stream, 8, seed) for seed in (0, 0, 1))
    assert a.num_windows == 25
    first = [a.next_batch(5).inputs for _ in range(5)]  # one full epoch
    assert all(np.array_equal(x, b.next_batch(5).inputs) for x in first)
    starts = sorted(int(row[0]) - 1 for x in first for row in x)
    assert all(np.array_equal(row, stream[int(row[0]) - 1 : int(row[0]) + 7])
               for x in first for row in x)
    assert starts == list(range(0, 200, 8))  # each window exactly once per epoch
    other = [c.next_batch(5).inputs for _ in range(5)]
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["index"] == 0
    # the next epoch has a different order
    assert not np.array_equal(a.next_batch(25).inputs, np.concatenate(first))


def test_state_dict_resumes_the_exact_stream():
    stream = (np.arange(1000) * 37 % 251).astype(np.uint16)
    a = PackedData(stream, 16, seed=5)
    for _ in range(7):
        a.next_batch(4)  # crosses into epoch 1 (62 windows)
    state = a.state_dict()
    rest = [a.next_batch(4) for _ in range(20)]
    b = PackedData(stream, 16, seed=5)
    b.load_state_dict(state)
    for x in rest:
        y = b.next_batch(4)
        assert np.array_equal(x.inputs, y.inputs) and np.array_equal(x.targets, y.targets)
        assert np.array_equal(x.doc_ids, y.doc_ids)
    with pytest.raises(RunError, match="seq_len"):
        PackedData(stream, 8, seed=5).load_state_dict(state)
    with pytest.raises(RunError, match="fingerprint"):
        PackedData(stream[:-5], 16, seed=5).load_state_dict(state)


def test_token_file_round_trip(tmp_path):
    ids = np.array([5, 0, 250, 255, 1, 0, 7], dtype=np.uint16)
    path = tmp_path / "tok.bin"
    ids.tofile(path)
    tokens = load_token_file(str(path), "uint16", 256)
    assert isinstance(tokens, np.memmap) and np.array_equal(tokens, ids)
    ids32 = np.array([70000, 3, 0, 12], dtype=np.uint32)
    ids32.tofile(tmp_path / "t32.bin")
    assert np.array_equal(load_token_file(str(tmp_path / "t32.bin"), "uint32", 70001), ids32)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_names_first_bad_id_and_offset(tmp_path, dtype):
    ids = np.array([1, 2, 3, 300, 4, 999, 5], dtype=dtype)
    path = tmp_path / "bad.bin"
    ids.tofile(path)
    with pytest.raises(RunError) as e:
        load_token_file(str(path), dtype, 256)
    msg = str(e.value)
    assert "token id 300 at offset 3" in msg and "999" not in msg and "\n" not in msg
    assert load_token_file(str(path), dtype, 1000) is not None


def test_check_vocab_offset_beyond_first_block():
    tokens = np.zeros(100, dtype=np.uint16)
    tokens[77] = 256
    tokens[90] = 4000
    with pytest.raises(RunError, match="token id 256 at offset 77"):
        check_vocab(tokens, 256, "x", block=10)


def test_token_file_bad_inputs(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_token_file(str(tmp_path / "missing.bin"), "uint16", 256)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(RunError, match="not a whole number of uint16"):
        load_token_file(str(odd), "uint16", 256)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(RunError, match="empty"):
        load_token_file(str(empty), "uint32", 256)
    with pytest.raises(RunError, match="needs at least 17"):
        PackedData(np.ones(10, dtype=np.uint16), 16, seed=0, source="short.bin")
