"""Autoregressive generation with the generated model's KV cache.

Prompts of unequal length run as one batch: they are left-padded and the
padding is masked with `ModalityContext(key_padding_mask=...)`; the model
restarts RoPE positions at each row's first real token, so a row decodes
exactly as it would alone. Each row stops at its own end-of-text token.

`compile=True` decodes with static shapes: after the (eager) prefill, the caches
move into fixed-size StaticKVCache buffers (a sequence mixer's state, of fixed size
already, is counted by a StaticStateCache) and one decode step of fixed shapes
is compiled once (torch.compile; CUDA graphs on a GPU, mode "reduce-overhead"),
so every new token runs the same compiled code.
"""

from __future__ import annotations

import os

import torch

from forgec.compiler.errors import RunError

from .sampling import sample_next


class StaticKVCache:
    """A layer's KV cache of fixed shape, for a compiled decode step; it has the
    generated KVCache's API (`length`, `valid`, `next_pos`, `update`, `commit`).

    `size` slots hold the keys and values so far, `valid` marks the filled real
    ones, `cursor` (a tensor, so that the compiled step has no Python counter) is
    the next free slot. `length` is always `size`: the model attends over the
    `size` slots plus the token of this step. That token's keys and values go
    into one more slot at the end of the buffers, so `update` returns the buffers
    themselves (no copy of the cache per step, where concatenating the new keys
    would copy all of it); `commit` then moves them into slot `cursor`, valid
    for later steps. Every step has the same shapes; slots not yet filled are
    masked out (attention does not depend on where a key sits: RoPE is already
    applied to it).
    """

    def __init__(self, cache, size: int) -> None:
        filled = cache.length
        if filled > size:
            raise ValueError(f"the cache holds {filled} positions, more than {size}")
        # + the slot of this step's token; keys and values may differ in width (MLA's)
        self.k = cache.k.new_zeros(*cache.k.shape[:2], size + 1, cache.k.shape[3])
        self.v = cache.v.new_zeros(*cache.v.shape[:2], size + 1, cache.v.shape[3])
        b = cache.k.shape[0]
        self.k[:, :, :filled], self.v[:, :, :filled] = cache.k[:, :, :filled], cache.v[:, :, :filled]
        self.valid = torch.zeros(b, size, dtype=torch.bool, device=cache.k.device)
        self.valid[:, :filled] = cache.valid[:, :filled]
        self.next_pos = cache.next_pos.clone()
        self.cursor = torch.tensor([filled], device=cache.k.device)
        self.length = self.max_seq_len = size
        if self.k.is_cuda:  # CUDA graphs replay on these very buffers
            for t in (self.k, self.v, self.valid, self.next_pos, self.cursor):
                torch._dynamo.mark_static_address(t)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[:, :, -1:] = k.to(self.k.dtype)
        self.v[:, :, -1:] = v.to(self.v.dtype)
        return self.k, self.v

    def commit(self, valid: torch.Tensor) -> None:
        self.k.index_copy_(2, self.cursor, self.k[:, :, -1:])
        self.v.index_copy_(2, self.cursor, self.v[:, :, -1:])
        self.valid.index_copy_(1, self.cursor, valid)
        self.next_pos += valid.sum(dim=1)
        self.cursor += 1


class StaticStateCache:
    """A recurrent layer's decoding state (a sequence mixer's: its convolution's last
    inputs, its scan state), for a compiled decode step. That state has a fixed size
    already and the layer's own cache updates it in place, so this one holds the same
    tensors (and convolves through that cache); it counts positions as StaticKVCache
    does (`length` always `size`, `valid`, `next_pos`, `cursor`), so that every
    layer's cache tells the model the same, without a Python counter."""

    def __init__(self, cache, size: int) -> None:
        filled = cache.length
        if filled > size:
            raise ValueError(f"the cache holds {filled} positions, more than {size}")
        self.cache = cache
        counters = ("valid", "next_pos")
        states = {k: v for k, v in vars(cache).items()
                  if isinstance(v, torch.Tensor) and k not in counters}
        self.__dict__.update(states)  # the same tensors: updated in place by the layer
        device = cache.valid.device
        self.valid = torch.zeros(cache.valid.shape[0], size, dtype=torch.bool, device=device)
        self.valid[:, :filled] = cache.valid[:, :filled]
        self.next_pos = cache.next_pos.clone()
        self.cursor = torch.tensor([filled], device=device)
        self.length = self.max_seq_len = size
        if device.type == "cuda":  # CUDA graphs replay on these very buffers
            for t in (*states.values(), self.valid, self.next_pos, self.cursor):
                torch._dynamo.mark_static_address(t)

    def convolve(self, x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
        return self.cache.convolve(x, conv)

    def advance(self, s: int) -> None:
        """`length` stays `size`: the positions are counted by `commit`."""

    def commit(self, valid: torch.Tensor) -> None:
        self.valid.index_copy_(1, self.cursor, valid)
        self.next_pos += valid.sum(dim=1)
        self.cursor += 1


def _static(cache, size: int):
    """The fixed-shape form of a layer's cache for the compiled decode step."""
    if hasattr(cache, "update"):  # attention's keys and values
        return StaticKVCache(cache, size)
    if hasattr(cache, "convolve"):  # a sequence mixer's state
        return StaticStateCache(cache, size)
    raise RunError(f"a {type(cache).__name__} has no static form for the compiled decode "
                   "step: generate without compile")


def _decode_step(model, context, caches, tokens, valid):
    """One token per row through the model with static caches: logits (B, vocab)."""
    return model(tokens, modality=context(key_padding_mask=valid), kv_caches=caches)[:, -1]


def compiled_decode_step(device: torch.device):
    """_decode_step compiled (CUDA graphs on a GPU); shapes are fixed for a run."""
    from .parallel import COMPILE_BACKEND_ENV

    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(_decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)


def check_decodable(model: torch.nn.Module) -> None:
    if hasattr(model, "encode_images"):  # a vision-language model: captions from images
        from .vlm_generate import check_caption_decodable

        check_caption_decodable(model)
        return
    if not hasattr(model, "make_kv_caches"):
        raise RunError(f"the model of {model.spec} is training-only (it has a non-causal op), so it "
                       "has no KV cache and cannot generate text")


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = 0, seed: int | None = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return the new
    tokens of each row. A row ends after it emits `eos_id` (kept as its last
    token); None disables stopping. temperature 0 is greedy decoding; `seed`
    makes sampling reproducible. `compile`: a static-shape compiled decode step."""
    check_decodable(model)
    if temperature < 0:
        raise ValueError(f"temperature must not be negative, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RunError("every prompt needs at least one token")
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise RunError(f"prompt {row}: token id {bad[0]} is outside the vocabulary "
                           f"(0..{vocab - 1})")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    batch, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens - 1  # the last new token is never fed back
    if total > max_len:
        raise RunError(f"the longest prompt ({width} tokens) plus {max_new_tokens} new tokens "
                       f"exceeds the model's max_seq_len {max_len}")
    param = next(model.parameters())
    device = param.device
    pad = eos_id if eos_id is not None else 0
    tokens = torch.full((batch, width), pad, dtype=torch.long, device=device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt):] = True
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    context = model.ModalityContext
    was_training = model.training
    model.eval()
    try:
        caches = model.make_kv_caches(batch, max_seq_len=total)
        logits = model(tokens, modality=context(key_padding_mask=valid), kv_caches=caches)[:, -1]
        step = lambda *args: _decode_step(model, *args)  # noqa: E731
        if compile and max_new_tokens > 1:
            caches = [_static(cache, total) for cache in caches]
            compiled = compiled_decode_step(device)
            step = lambda *args: compiled(model, *args)  # noqa: E731
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            # one host copy of the tokens per step, not two per row
            for row, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
                if not finished:
                    out[row].append(token)
            if eos_id is not None:
                done |= nxt == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            # finished rows feed padding (masked out) while the others go on
            step_tokens = torch.where(done, torch.full_like(nxt, pad), nxt)[:, None]
            logits = step(context, caches, step_tokens, ~done[:, None])
    finally:
        model.train(was_training)
    return out


def load_run_model(run_dir: str, *, decodable: bool = True) -> tuple[torch.nn.Module, dict]:
    """The model of a training run, with the weights of its latest checkpoint
    (`decodable`: refuse a model that cannot generate)."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .package import import_package, read_run_info, run_package_dir
    from .train import set_threads

    info = read_run_info(run_dir)
    pkg = import_package(run_package_dir(run_dir))
    set_threads()
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise RunError(f"{run_dir} has no checkpoint yet")
    try:
        model = pkg.VLM() if hasattr(pkg, "VLM") else pkg.Transformer()
    except Exception as e:  # noqa: BLE001 — a broken package in the run folder is bad input
        raise RunError(f"cannot build the model of {run_dir}: {type(e).__name__}: {e}") from None
    if decodable:
        check_decodable(model)
    load_checkpoint(latest[1], model)
    model.eval()
    return model, info


def generate_text(model: torch.nn.Module, prompt: str, max_new_tokens: int, *,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = 0, note_stream=None, token_file: str | None = None,
                  tokenizer=None, reply_only: bool = False, compile: bool = False) -> str:
    """The prompt and its continuation as text (stops at end-of-text); the
    continuation alone with `reply_only`. `tokenizer`: the run's
    (runtime/tokenizer.py); the byte tokenizer by default."""
    from .tokenizer import Bytes

    tok = tokenizer if tokenizer is not None else Bytes()
    if model.config.vocab_size < tok.vocab_size:
        raise RunError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                       f"{tok.describe()}: text prompts cannot be encoded")
    if token_file and note_stream is not None and tok.identity == "byte":
        note_stream.write(f"note: this run trained on {token_file}; prompt and output use the "
                          "byte tokenizer\n")
    ids = tok.encode(prompt)
    if not ids:
        raise RunError("the prompt encodes to no tokens")
    room = model.config.max_seq_len - len(ids) + 1
    if room < 1:
        raise RunError(f"the prompt is {len(ids)} tokens; the model's max_seq_len is "
                       f"{model.config.max_seq_len}")
    if max_new_tokens > room and note_stream is not None:
        note_stream.write(f"note: --max-new-tokens {max_new_tokens} cut to {room} "
                          f"(max_seq_len {model.config.max_seq_len})\n")
    eos_id = tok.stop_id  # None: a tokenizer without end-of-text; generate to the end
    new = generate(model, [ids], min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed, compile=compile)[0]
    if new and new[-1] == eos_id:
        new = new[:-1]
    return tok.decode(new if reply_only else ids + new)
