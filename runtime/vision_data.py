"""A synthetic image-caption task, drawn on the fly: no download.

Each image is a dark, slightly noisy square with one filled shape in it; the
shape, its colour and the quadrant it sits in are drawn independently and
uniformly, and so are its size and a small jitter of its place. The caption
names all three, e.g. ``red box top left``; its tokens are its UTF-8 bytes
(the byte tokenizer of runtime/data.py).

The captions are built so that the text alone cannot finish them: after each
word the next word is any of its kind with equal probability, so only the
image tells which. `decision_mask` marks those targets (the first byte of each
attribute word); every other byte of a caption follows from the bytes before it.

A model reads `BOS + caption` and is trained on the next-token targets
`caption + EOS` (BOS and EOS are both byte 0, end-of-text). Rows are padded on
the right to the longest caption; padded targets are IGNORE_INDEX.

Example i of the training stream is a function of (seed, i) alone, so the
stream position is one integer (`state_dict()`) and a resumed run continues
it exactly. The held-out evaluation set is drawn from another key and does
not depend on the run's seed: every run evaluates on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forgec.compiler.errors import RunError

from .data import EOS_ID, IGNORE_INDEX

BOS_ID = EOS_ID  # a caption starts after an end-of-text byte, like any document
COLOURS = {"red": (0.95, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.3, 1.0),
           "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("box", "disc", "cross")
ROWS = ("top", "bottom")
COLUMNS = ("left", "right")
VERSION = 1  # of the drawing and the captions: a checkpoint records it
_TRAIN, _EVAL = 0, 1  # first element of the RNG key of each stream


def caption_of(colour: str, shape: str, row: str, column: str) -> str:
    return f"{colour} {shape} {row} {column}"


def all_captions() -> list[str]:
    return [caption_of(c, s, r, k) for c in COLOURS for s in SHAPES for r in ROWS
            for k in COLUMNS]


TEXT_LEN = max(len(c) for c in all_captions()) + 1  # BOS + the longest caption


def draw(rng: np.random.Generator, size: int, channels: int = 3) -> tuple[np.ndarray, str]:
    """One image (channels, size, size) in [-1, 1] and its caption."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    row, column = ROWS[rng.integers(2)], COLUMNS[rng.integers(2)]
    half = size / 2
    radius = half * rng.uniform(0.38, 0.48)  # the shape stays inside its quadrant
    slack = max(0.0, half / 2 - radius)
    cy = half * (0.5 if row == "top" else 1.5) + rng.uniform(-slack, slack)
    cx = half * (0.5 if column == "left" else 1.5) + rng.uniform(-slack, slack)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = np.abs(y - cy), np.abs(x - cx)
    if shape == "box":
        inside = (dy <= radius * 0.85) & (dx <= radius * 0.85)
    elif shape == "disc":
        inside = dy**2 + dx**2 <= radius**2
    else:  # cross: two bars of a third of its width
        arm = radius / 3
        inside = ((dy <= arm) & (dx <= radius)) | ((dx <= arm) & (dy <= radius))
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    if channels != 3:  # a grey (or many-channel) encoder sees the brightness
        rgb = np.full(channels, rgb.mean(), dtype=np.float32)
    image = rng.normal(0.05, 0.02, size=(channels, size, size)).astype(np.float32)
    image[:, inside] = rgb[:, None]
    return np.clip(image, 0.0, 1.0) * 2 - 1, caption_of(colour, shape, row, column)


@dataclass
class CaptionBatch:
    pixels: torch.Tensor  # (B, C, H, W) float32 in [-1, 1]
    inputs: torch.Tensor  # (B, TEXT_LEN) int64: BOS + caption, right-padded with EOS
    targets: torch.Tensor  # (B, TEXT_LEN) int64: caption + EOS, IGNORE_INDEX after it
    decisions: torch.Tensor  # (B, TEXT_LEN) bool: targets only the image can tell
    captions: list[str]


def decision_mask(caption: str) -> list[bool]:
    """Per target (caption + EOS): True at the first byte of each word."""
    marks, start = [], True
    for ch in caption:
        marks.append(start)
        start = ch == " "
    return marks + [False]


def make_batch(images: list[np.ndarray], captions: list[str]) -> CaptionBatch:
    b = len(captions)
    inputs = torch.full((b, TEXT_LEN), EOS_ID, dtype=torch.long)
    targets = torch.full((b, TEXT_LEN), IGNORE_INDEX, dtype=torch.long)
    decisions = torch.zeros(b, TEXT_LEN, dtype=torch.bool)
    for row, caption in enumerate(captions):
        ids = list(caption.encode("utf-8"))
        inputs[row, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
        targets[row, : len(ids) + 1] = torch.tensor([*ids, EOS_ID])
        decisions[row, : len(ids) + 1] = torch.tensor(decision_mask(caption))
    pixels = torch.from_numpy(np.stack(images))
    return CaptionBatch(pixels, inputs, targets, decisions, list(captions))


class CaptionData:
    """The training stream: example i is drawn from default_rng([0, seed, i])."""

    def __init__(self, image_size: int, channels: int, seed: int) -> None:
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.index = 0
        self.source = (f"synthetic captioned {image_size}x{image_size} images "
                       f"({len(all_captions())} captions)")

    def example(self, i: int) -> tuple[np.ndarray, str]:
        return draw(np.random.default_rng([_TRAIN, self.seed, i]), self.image_size,
                    self.channels)

    def next_batch(self, batch_size: int) -> CaptionBatch:
        drawn = [self.example(self.index + k) for k in range(batch_size)]
        self.index += batch_size
        return make_batch(*zip(*drawn, strict=True))

    def state_dict(self) -> dict:
        return {"task": "captions", "version": VERSION, "seed": self.seed,
                "image_size": self.image_size, "channels": self.channels, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        for key in ("task", "version", "seed", "image_size", "channels"):
            if state.get(key) != self.state_dict()[key]:
                raise RunError(f"the checkpoint's data position does not fit {self.source}: "
                               f"{key} was {state.get(key)!r}, now {self.state_dict()[key]!r}")
        index = state.get("index")
        if not (isinstance(index, int) and index >= 0):
            raise RunError(f"the checkpoint's data position is invalid: {state!r}")
        self.index = index


def eval_set(image_size: int, channels: int, n: int) -> CaptionBatch:
    """The fixed held-out set: example i is drawn from default_rng([1, i])."""
    drawn = [draw(np.random.default_rng([_EVAL, i]), image_size, channels) for i in range(n)]
    return make_batch(*zip(*drawn, strict=True))
