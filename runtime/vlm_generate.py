"""Captions from images: image prefill, then text decode with the KV cache.

A causal VLM package (joint decoder, cross-attention, Mixture-of-Transformers)
exports `VLM.make_kv_caches`, `VLM.prefill(pixels, tokens, caches)` (the image
and the prompt, returning the prompt's logits and the image context decode
needs: None where the image lives in the caches) and `VLM.decode(tokens,
caches, context)`. A training-only VLM (MoMa: expert choice looks at the
whole batch, later tokens included) has none of them and is refused.

Every prompt starts with BOS (end-of-text, as in training); prompts of
different lengths run as separate batches, so each row decodes exactly as it
would alone. A row ends after it emits end-of-text.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from forgec.compiler.errors import RunError, UsageError

from .data import ByteTokenizer
from .sampling import sample_next
from .vision_data import BOS_ID, eval_set


def check_caption_decodable(model: torch.nn.Module) -> None:
    """RunError for a VLM without image prefill and cached decoding."""
    if all(hasattr(model, a) for a in ("make_kv_caches", "prefill", "decode")):
        return
    raise RunError(f"the model of {model.spec} is training-only (its {model.fusion} fusion is not causal), "
                   "so it has no KV cache and cannot generate captions")


@torch.no_grad()
def generate_captions(model: torch.nn.Module, pixel_values: torch.Tensor,
                      prompts: list[list[int]] | None = None, max_new_tokens: int = 40, *,
                      temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, eos_id: int | None = 0,
                      seed: int | None = None) -> list[list[int]]:
    """The new tokens after each image (B, C, H, W) and its prompt (default: BOS
    alone; a prompt without a leading BOS gets one). A row ends after it emits
    `eos_id` (kept as its last token); temperature 0 is greedy."""
    check_caption_decodable(model)
    if temperature < 0:
        raise ValueError(f"temperature must not be negative, got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    batch = pixel_values.shape[0]
    if prompts is None:
        prompts = [[] for _ in range(batch)]
    if len(prompts) != batch:
        raise RunError(f"{len(prompts)} prompts for {batch} images")
    prompts = [list(p) if p[:1] == [BOS_ID] else [BOS_ID, *p] for p in prompts]
    vocab = model.transformer.config.vocab_size
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise RunError(f"prompt {row}: token id {bad[0]} is outside the vocabulary "
                           f"(0..{vocab - 1})")
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for width in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == width]
            new = _decode_group(model, pixel_values[rows].to(device),
                                torch.tensor([prompts[i] for i in rows], device=device),
                                max_new_tokens, temperature, top_k, top_p, eos_id, generator)
            for i, tokens in zip(rows, new, strict=True):
                out[i] = tokens
    finally:
        model.train(was_training)
    return out


def _decode_group(model, pixels, tokens, max_new_tokens, temperature, top_k, top_p, eos_id,
                  generator) -> list[list[int]]:
    """Prompts of one length: prefill, then one token a step until every row ends."""
    limit = model.transformer.config.max_seq_len
    caches = model.make_kv_caches(tokens.shape[0], limit)
    logits, context = model.prefill(pixels, tokens, caches)
    used = caches[0].length  # image tokens (where they sit in the caches) and the prompt
    if used + max_new_tokens - 1 > limit:
        raise RunError(f"the image and the prompt take {used} positions; {max_new_tokens} new "
                       f"tokens would exceed the decoder's max_seq_len {limit}")
    logits = logits[:, -1]
    out: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        for row in range(len(out)):
            if not done[row]:
                out[row].append(int(nxt[row]))
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # a finished row goes on decoding into its own cache rows; its output is dropped
        logits = model.decode(nxt[:, None], caches, context)[:, -1]
    return out


def caption_text(tokens: list[int], eos_id: int = 0) -> str:
    if tokens and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    return ByteTokenizer().decode(tokens)


def load_image(path: str, size: int, channels: int) -> torch.Tensor:
    """An image file as (1, channels, size, size) in [-1, 1], resized to `size`."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise RunError("reading --image needs Pillow (pip install pillow)") from None
    if not os.path.isfile(path):
        raise UsageError(f"no such file: '{path}'")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L").resize((size, size),
                                                                      Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as e:
        raise RunError(f"{path}: not an image Pillow can read ({e})") from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(array * 2 - 1)[None]


def caption_lines(model: torch.nn.Module, *, image: str | None, samples: int, prompt: str,
                  max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None, seed: int | None) -> list[str]:
    """`forgec generate` of a VLM run: a caption of `image`, or of `samples`
    held-out synthetic images beside their true captions."""
    from .vlm_task import image_geometry

    check_caption_decodable(model)
    size, channels = image_geometry(model)
    ids = ByteTokenizer().encode(prompt)
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if image is not None:
        pixels = load_image(image, size, channels)
        new = generate_captions(model, pixels, [ids], max_new_tokens, **kw)[0]
        return [prompt + caption_text(new)]
    held_out = eval_set(size, channels, samples)
    new = generate_captions(model, held_out.pixels, [ids] * samples, max_new_tokens, **kw)
    lines, right = [], 0
    for i, (truth, tokens) in enumerate(zip(held_out.captions, new, strict=True)):
        caption = prompt + caption_text(tokens)
        right += caption == truth
        lines.append(f"held-out image {i}: {caption!r} (true: {truth!r})"
                     f"{'' if caption == truth else '  <- wrong'}")
    lines.append(f"{right}/{samples} captions exactly right")
    return lines
