"""Shared fixtures: the tiny offline InternVL and helpers to lay out token rows by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coconut import Coconut  # noqa: E402
from internvl import LATENT_TOKENS, image_seq_length, load_base  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random InternVL (float64, so exact comparisons are meaningful) and its tokenizer."""
    torch.manual_seed(0)
    model, tokenizer = load_base("tiny")
    return model.double().eval(), tokenizer


def make_coconut(base, tokenizer, eos_token_id: int | None = None) -> Coconut:
    """Wrap `base` with the tokenizer's latent ids."""
    latent = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return Coconut(base, latent, eos)


def image_block(base, tokenizer, n_tiles: int) -> list[int]:
    """`<img>` + context tokens for `n_tiles` tiles + `</img>`, as the data pipeline writes it."""
    if n_tiles == 0:
        return []
    ids = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    return [ids[0]] + [ids[1]] * (n_tiles * image_seq_length(base.config)) + [ids[2]]
