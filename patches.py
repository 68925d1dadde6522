"""Which image patches a visual-latent thought chooses (`Coconut` with `visual_latents`): the patch positions of a
sequence, the last attention layer's query at each thought captured by a hook, that query's softmax attention over
the cached keys, and the top-K image positions by it. docs/model.md says why these weights.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# the token at each of the visual_latents positions after a thought, which carry the image features it chose
VISUAL_TOKEN = "<|latent-image|>"


def visual_mask(input_ids: torch.Tensor, latent: torch.Tensor, visual_token_id: int, k: int) -> torch.Tensor:
    """The patch positions (B x T): the `visual_token_id` tokens, checked to be exactly the k columns after every
    latent."""
    visual = input_ids == visual_token_id
    expected = torch.zeros_like(latent)
    for shift in range(1, k + 1):
        expected[:, shift:] |= latent[:, :-shift]
    if not torch.equal(visual, expected):
        raise ValueError(f"every <|latent|> must be followed by exactly {k} {VISUAL_TOKEN} tokens, and only there")
    return visual


class LastQuery:
    """A forward hook on the decoder's last attention layer that keeps, of each pass, the query at one column per
    row (`offsets`, set before the pass) as that layer computes it: its input (already normed), q projection, q
    norm where the family has one, rotary embedding. Run inside the layer's call, it finds the layer's weights
    whole even where FSDP2 shards them between calls."""

    def __init__(self) -> None:
        self.offsets: torch.Tensor | None = None
        self.query: torch.Tensor | None = None  # B x H x 1 x head_dim

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        with torch.no_grad():
            states = kwargs["hidden_states"]
            rows = torch.arange(states.shape[0], device=states.device)
            query = module.q_proj(states[rows, self.offsets]).view(len(rows), -1, 1, module.head_dim)
            if hasattr(module, "q_norm"):
                query = module.q_norm(query)
            cos, sin = (table[rows, self.offsets][:, None] for table in kwargs["position_embeddings"])
            self.query, _ = sys.modules[type(module).__module__].apply_rotary_pos_emb(query, query, cos, sin)


@contextmanager
def capture_query(attention: nn.Module) -> Iterator[LastQuery]:
    """`LastQuery` hooked on `attention` for the duration of the block."""
    capture = LastQuery()
    handle = attention.register_forward_hook(capture, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()


def thought_attention(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """The softmax attention weights of one query per row (B x H x 1 x d, after RoPE) over the cached keys
    (B x KVH x T' x d, after RoPE, T' >= T; each KV head serves H / KVH query heads, as grouped-query attention
    shares them), over the key columns the query may see (`allowed`, B x T), averaged over the heads: B x T."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    keys = keys[:, :, : allowed.shape[1]].repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    scores = (query.to(dtype) @ keys.to(dtype).transpose(-1, -2)).squeeze(2) * scaling
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)


def top_patches(scores: torch.Tensor, image: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k image columns (`image`, B x T) of highest score per row, ties to the lower column, in column order,
    and their scores; -1 where a row has fewer than k image columns."""
    scores = F.pad(scores.masked_fill(~image, float("-inf")), (0, max(0, k - scores.shape[1])), value=float("-inf"))
    best = scores.sort(dim=-1, descending=True, stable=True)
    picked, values = best.indices[:, :k], best.values[:, :k]
    order = picked.argsort(-1)
    picked, values = picked.gather(1, order), values.gather(1, order)
    return torch.where(values > float("-inf"), picked, -1), values
