"""Regenerate tests/golden/logits.json — run by hand, and review the diff.

The numeric goldens pin what each debug model computes: a fixed seed gives fixed
weights, a fixed input gives fixed logits. A change here means the generated
models compute something else; it must be deliberate.

    .venv/bin/python tests/golden/update_logits.py
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

SPECS = ("llama_debug", "qwen_debug", "gptj_debug")
OUT = Path(__file__).with_name("logits.json")


def logits_of(name: str) -> dict:
    """Logits[0, :6, :8] and the mean |logit| over (2, 24, vocab) of
    `generated.<name>` at seed 0 on a fixed input."""
    module = importlib.import_module(f"generated.{name}.model")
    torch.manual_seed(0)
    model = module.Transformer().eval()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        logits = model(tokens)
    return {
        "slice": [[round(v, 7) for v in row] for row in logits[0, :6, :8].tolist()],
        "mean_abs": round(float(logits.abs().mean()), 9),
    }


def main() -> None:
    torch.set_num_threads(1)
    data = {name: logits_of(name) for name in SPECS}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
