"""Tiny Hugging Face tokenizers built in the test (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

TEXT = ("the quick brown fox jumps over the lazy dog; def f(x): return x * 2\n"
        "hello world, hello tokenizer, naïve café ✓\n")


def make_hf_tokenizer(folder: Path, vocab_size: int = 300, eos: str | None = "<|eot|>") -> Path:
    """A byte-level BPE tokenizer trained on TEXT, saved as tokenizer.json and
    tokenizer_config.json (eos_token `eos`) in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eot|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    kwargs = {"eos_token": eos} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(folder)
    return folder
