"""Autoregressive generation with the generated model's KV cache.

Prompts of unequal length run as one batch: they are left-padded and the
padding is masked with `ModalityContext(key_padding_mask=...)`; the model
restarts RoPE positions at each row's first real token, so a row decodes
exactly as it would alone. Each row stops at its own end-of-text token.
"""

from __future__ import annotations

import torch

from compiler.errors import RunError

from .sampling import sample_next


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
             eos_id: int | None = 0, seed: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return the new
    tokens of each row. A row ends after it emits `eos_id` (kept as its last
    token); None disables stopping. temperature 0 is greedy decoding; `seed`
    makes sampling reproducible."""
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
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            for row in range(batch):
                if not done[row]:
                    out[row].append(int(nxt[row]))
            if eos_id is not None:
                done |= nxt == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            # finished rows feed padding (masked out) while the others go on
            step_tokens = torch.where(done, torch.full_like(nxt, pad), nxt)[:, None]
            logits = model(step_tokens, modality=context(key_padding_mask=~done[:, None]),
                           kv_caches=caches)[:, -1]
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
                  tokenizer=None, reply_only: bool = False) -> str:
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
                   top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed)[0]
    if new and new[-1] == eos_id:
        new = new[:-1]
    return tok.decode(new if reply_only else ids + new)
