"""runtime/generate.py and `forgec generate`: KV-cache decoding equals full
forwards, batched left-padded prompts equal prompts alone, per-row EOS,
top-k / top-p filtering, training-only models."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import ENCODER_SPEC, ROOT
from conftest import cli as run_forgec

from forgec.compiler.errors import RunError
from forgec.runtime.data import ByteTokenizer
from forgec.runtime.generate import generate, generate_text, load_run_model
from forgec.runtime.package import build_package, import_package
from forgec.runtime.sampling import filter_logits, sample_next, top_k_mask, top_p_mask
from forgec.runtime.train import train

DEBUG = str(ROOT / "specs" / "llama_debug.forge")


PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self", "x"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short training run of the debug model, for loading from a checkpoint."""
    out = tmp_path_factory.mktemp("gen")
    train(DEBUG, str(out), progress=False, steps=4, seed=0, batch_size=4, seq_len=32)
    return out


@pytest.fixture(scope="module")
def trained(run_dir):
    m, _ = load_run_model(str(run_dir))
    return m


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The debug model at its seeded initialisation. Its greedy continuations
    vary from token to token (a briefly trained byte model mostly repeats the
    space), which makes exact token comparisons meaningful."""
    pkg = import_package(build_package(DEBUG, str(tmp_path_factory.mktemp("init"))))
    torch.manual_seed(0)
    return pkg.Transformer().eval()


def encode(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


@torch.no_grad()
def greedy_full_forward(model, prompt: list[int], n: int, eos_id: int | None = None) -> list[int]:
    """The reference: re-run the whole sequence without a cache for every token."""
    seq, out = list(prompt), []
    for _ in range(n):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos_id:
            break
    return out


@pytest.mark.parametrize("text", PROMPTS)
def test_kv_cache_greedy_equals_full_forward(model, text):
    prompt = encode(text)
    got = generate(model, [prompt], 32, eos_id=None)[0]
    assert len(got) == 32
    assert got == greedy_full_forward(model, prompt, 32)


def test_output_is_not_degenerate(model):
    """Guards the tests above: a model that always says the same byte proves little."""
    outs = [generate(model, [encode(t)], 32, eos_id=None)[0] for t in PROMPTS]
    assert all(len(set(out)) >= 5 for out in outs), outs


def test_batched_unequal_prompts_equal_each_alone(model):
    prompts = [encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    alone = [generate(model, [p], 24, eos_id=None)[0] for p in prompts]
    batched = generate(model, prompts, 24, eos_id=None)
    assert batched == alone
    # and in another order, with a duplicate
    order = [3, 0, 2, 0, 1]
    assert generate(model, [prompts[i] for i in order], 24, eos_id=None) == \
        [alone[i] for i in order]


def test_each_row_stops_at_its_own_eos(model):
    prompts = [encode(t) for t in PROMPTS[:3]]
    free = [generate(model, [p], 40, eos_id=None)[0] for p in prompts]
    # an "end-of-text" id that row 0 emits mid-way and the other rows never emit
    candidates = [t for t in free[0][1:30] if t not in free[1] and t not in free[2]]
    assert candidates, free
    eos = candidates[0]
    cut = free[0].index(eos) + 1
    out = generate(model, prompts, 40, eos_id=eos)
    assert out[0] == free[0][:cut] and out[0][-1] == eos and cut < 40  # stopped, kept EOS
    assert out[1] == free[1] and out[2] == free[2]  # the others went on to the limit
    # a row stops for good: its tokens after EOS are never reported
    assert generate(model, [prompts[0]], 40, eos_id=eos)[0] == out[0]


def test_all_rows_done_stops_early(model):
    prompt = encode(PROMPTS[1])
    first = generate(model, [prompt], 1, eos_id=None)[0][0]
    assert generate(model, [prompt, prompt], 50, eos_id=first) == [[first], [first]]


def test_top_k_1_equals_greedy(model):
    prompts = [encode(t) for t in PROMPTS]
    greedy = generate(model, prompts, 20, eos_id=None)
    sampled = generate(model, prompts, 20, eos_id=None, temperature=1.3, top_k=1, seed=123)
    assert sampled == greedy


def test_sampling_is_seeded(model):
    prompts = [encode(t) for t in PROMPTS]
    a = generate(model, prompts, 20, temperature=1.0, top_p=0.95, seed=5, eos_id=None)
    b = generate(model, prompts, 20, temperature=1.0, top_p=0.95, seed=5, eos_id=None)
    c = generate(model, prompts, 20, temperature=1.0, top_p=0.95, seed=6, eos_id=None)
    assert a == b and a != c
    assert a != generate(model, prompts, 20, eos_id=None)  # not greedy


def test_top_p_mask_keeps_the_smallest_sufficient_prefix():
    #                     0      1     2      3      4      5
    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.03125, 0.03125], dtype=torch.float64)
    # sorted: 0.5 (1), 0.25 (3), 0.125 (0), 0.0625 (2), 0.03125 (4, 5)
    cases = {
        0.1: {1},
        0.5: {1},  # 0.5 alone reaches 0.5
        0.5001: {1, 3},
        0.75: {1, 3},
        0.76: {1, 3, 0},
        0.875: {1, 3, 0},
        0.9: {1, 3, 0, 2},
        0.9375: {1, 3, 0, 2},
        0.95: {1, 3, 0, 2, 4, 5} - {min(4, 5)} | {min(4, 5)},  # one of the tied pair suffices
        1.0: {0, 1, 2, 3, 4, 5},
    }
    for p, expect in cases.items():
        keep = top_p_mask(probs, p)
        kept = set(torch.nonzero(keep).flatten().tolist())
        if p == 0.95:  # ties: exactly one of tokens 4 and 5
            assert kept - {4, 5} == {0, 1, 2, 3} and len(kept & {4, 5}) == 1, (p, kept)
        else:
            assert kept == expect, (p, kept)
        # the kept mass reaches p, and dropping the least likely kept token would not
        mass = float(probs[keep].sum())
        assert mass >= p - 1e-12
        assert mass - float(probs[keep].min()) < p
    # rows are independent
    two = torch.stack([probs, probs.flip(0)])
    keep = top_p_mask(two, 0.75)
    assert keep[0].tolist() == top_p_mask(probs, 0.75).tolist()
    assert keep[1].tolist() == top_p_mask(probs, 0.75).flip(0).tolist()


def test_top_k_mask_and_filter():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True, False],
                                              [True, True, False, False, False]]
    assert top_k_mask(logits, 9).all()
    out = filter_logits(logits, top_k=3)
    assert torch.isinf(out).sum() == 4 and torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]])
    # top-p after top-k: renormalised over the k survivors
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    out = filter_logits(probs.log(), top_k=2, top_p=0.5)  # survivors 4/7, 3/7: 4/7 >= 0.5
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_samples_stay_in_the_nucleus():
    logits = torch.tensor([1.0, 3.0, 2.5, -2.0, 0.0, 2.9]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    allowed = set(torch.nonzero(top_p_mask(logits[0].softmax(-1), 0.8)).flatten().tolist())
    assert allowed == {1, 5, 2}
    got = sample_next(logits, temperature=1.0, top_p=0.8, generator=gen)
    assert set(got.tolist()) == allowed  # every kept token drawn, nothing else
    got = sample_next(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(got.tolist()) == {1, 5}


def test_training_only_model_cannot_generate(tmp_path):
    spec = tmp_path / "enc_tiny.forge"
    spec.write_text(ENCODER_SPEC)
    pkg = import_package(build_package(str(spec), str(tmp_path / "run")))
    model = pkg.Transformer()
    assert not hasattr(model, "make_kv_caches")
    with pytest.raises(RunError, match="training-only"):
        generate(model, [[1, 2, 3]], 4)


def test_bad_requests(model):
    with pytest.raises(RunError, match="max_seq_len 256"):
        generate(model, [[65] * 200], 60)
    assert len(generate(model, [[65] * 200], 57, eos_id=None)[0]) == 57  # 200 + 57 - 1 = 256
    with pytest.raises(RunError, match="at least one token"):
        generate(model, [[65], []], 4)
    with pytest.raises(RunError, match="token id 300"):
        generate(model, [[65, 300]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[65]], 4, temperature=1.0, top_p=0.0)
    assert generate(model, [[65], [66, 67]], 0) == [[], []]


def test_generate_text(trained):
    greedy = generate(trained, [encode("def ")], 40)[0]
    assert greedy == greedy_full_forward(trained, encode("def "), 40, eos_id=0)
    text = generate_text(trained, "def ", 40, temperature=0)
    assert text == ByteTokenizer().decode(encode("def ") + [t for t in greedy if t != 0])


def test_cli_generate(run_dir, trained, tmp_path):
    proc = run_forgec("generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "40",
                      fresh=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate_text(trained, "def ", 40) + "\n"
    proc = run_forgec("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("forgec: error: no such run folder")
    proc = run_forgec("generate", str(run_dir), "--prompt", "x", "--top-p", "1.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--top-p" in proc.stderr


def test_cli_generate_bad_runs(tmp_path):
    spec = tmp_path / "enc_tiny.forge"
    spec.write_text(ENCODER_SPEC)
    enc = tmp_path / "enc"
    train(str(spec), str(enc), progress=False, steps=1, seed=0, batch_size=2, seq_len=16)
    proc = run_forgec("generate", str(enc), "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "training-only" in proc.stderr
    shutil.rmtree(enc / "checkpoints")
    proc = run_forgec("generate", str(enc), "--prompt", "x")
    assert proc.returncode == 1 and proc.stderr == f"forgec: error: {enc} has no checkpoint yet\n"


def test_static_compiled_decode_gives_the_eager_greedy_tokens(model):
    """compile=True: fixed-size caches and one compiled (inductor) decode step, with
    unequal left-padded prompts and a row that stops at its end-of-text early."""
    torch._dynamo.reset()
    prompts = [encode(t) for t in PROMPTS[:3]]
    free = generate(model, prompts, 24, eos_id=None)
    eos = next(t for t in free[0][1:20] if t not in free[1] and t not in free[2])
    want = generate(model, prompts, 24, eos_id=eos)
    assert len(want[0]) < 24 and len(want[1]) == 24  # row 0 stopped early, row 1 did not
    assert generate(model, prompts, 24, eos_id=eos, compile=True) == want
    torch._dynamo.reset()


def test_static_compiled_decode_of_sliding_windows_gives_the_eager_tokens(monkeypatch):
    """A static cache holds this step's keys in a slot after every history slot, so
    a sliding window must count positions rather than slots: qwen_debug (a window
    of 16 on every other layer) decodes 40 tokens past its window, left-padded,
    compiled (aot_eager: the same graph as inductor's, cheaply) as it does eagerly.
    Weights 5x their initial scale make each token depend on its context (at the
    initial scale the window's keys barely move the argmax)."""
    from forgec.runtime.parallel import COMPILE_BACKEND_ENV
    from generated import qwen_debug

    torch.manual_seed(0)
    model = qwen_debug.Transformer().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(5)
    prompts = [list(range(5, 25)), list(range(30, 42))]  # 20 and 12 tokens
    want = generate(model, prompts, 40, eos_id=None)
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    try:
        assert generate(model, prompts, 40, eos_id=None, compile=True) == want
    finally:
        torch._dynamo.reset()
