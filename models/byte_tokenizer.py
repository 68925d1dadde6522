"""The offline byte-level tokenizer every tiny random model uses: any text encodes, one token per byte, nothing is
unknown, and no download is needed. Each family adds its own special tokens (internvl.py, causal_lm.py)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def byte_level_tokenizer(eos_token: str, pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (the 256 byte symbols are ids 0-255), with `eos_token` and, when
    given, `pad_token` as special tokens after them."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token)
