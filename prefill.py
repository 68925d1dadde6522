"""The decoder passes that fill a batch's continuous thoughts, in one of three ways (`Coconut._prefill` picks):
`sequential`, one pass per latent column, each thought fed the hidden state before it; `iterated`, Jacobi iteration
over all thoughts at once (`latent_iterations`); `visual`, one pass per thought, each followed by the image patches
it chose (`visual_latents`). All three extend one KV cache, and the gradient flows back through every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from distributed import is_distributed
from kv_cache import forked
from patches import capture_query, thought_attention, top_patches


@dataclass
class Passes:
    """What the passes over one batch share: the decoder and the name of its cache argument (transformers 5.24
    renamed `past_key_values` to `cache`), the batch's attention mask and positions, the KV cache they fill, the map
    from a hidden state to the next thought's input (`Coconut.feed_back`; None when the latents are ordinary tokens,
    under the `none` feedback or the pause control), the `projected` feedback's module (else None), and the thought
    control (`coconut.THOUGHT_CONTROLS`)."""

    decoder: nn.Module
    cache_arg: str
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: Cache
    feed_back: Callable[[torch.Tensor], torch.Tensor] | None
    projection: nn.Module | None
    thoughts: str

    def run(self, part: torch.Tensor, start: int, cache: Cache | None = None) -> torch.Tensor:
        """One decoder pass over `part`, the columns from `start` on, against the keys and values in `cache`
        (default: the batch's cache), which it extends; returns the pass's final hidden states."""
        end = start + part.shape[1]
        out = self.decoder(
            inputs_embeds=part,
            attention_mask=self.attention_mask[:, :end],
            position_ids=self.position_ids[:, start:end],
            use_cache=True,
            **{self.cache_arg: self.cache if cache is None else cache},
        )
        return out.last_hidden_state

    def joined(self, hidden_parts: list[torch.Tensor]) -> torch.Tensor:
        """The passes' final hidden states, side by side. One pass means no rank's batch holds a thought (`segments`
        evens the passes): DDP still expects a gradient for the projection's parameters, so a multi-rank job then
        adds the projection times zero."""
        hidden = torch.cat(hidden_parts, dim=1)
        if self.projection is not None and len(hidden_parts) == 1 and is_distributed():
            hidden = hidden + 0.0 * self.projection(hidden[:, :1]).sum()
        return hidden


def control(thought: torch.Tensor, kind: str) -> torch.Tensor:
    """The thought, or what replaces it at inference: noise of its norm, or zeros ("pause" never gets here)."""
    if kind == "noise":
        noise = torch.randn_like(thought)
        return noise * (thought.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
    if kind == "zeros":
        return torch.zeros_like(thought)
    return thought


def latent_columns(latent: torch.Tensor) -> list[int]:
    """The columns that hold a latent in any row (the one host sync, before any pass); column 0 may not."""
    columns = torch.nonzero(latent.any(0)).flatten().tolist()
    if columns and columns[0] == 0:
        raise ValueError("a <|latent|> token sits in column 0: it needs a position before it")
    return columns


def segments(latent: torch.Tensor) -> list[tuple[int, int]]:
    """Column ranges of the decoder passes: split before every column that holds a latent in any row.

    Under a multi-rank job every rank must run the same number of passes (sharded layers gather their weights on
    each call), so a rank with fewer latent columns splits its longest segments further, which changes no value.
    """
    bounds = [0, *latent_columns(latent), latent.shape[1]]
    if is_distributed():
        passes = torch.tensor([len(bounds) - 1], device=latent.device)
        torch.distributed.all_reduce(passes, op=torch.distributed.ReduceOp.MAX)
        while len(bounds) - 1 < int(passes):
            i = max(range(len(bounds) - 1), key=lambda k: bounds[k + 1] - bounds[k])
            if bounds[i + 1] - bounds[i] < 2:
                raise ValueError("sequence too short to match the other ranks' number of latent passes")
            bounds.insert(i + 1, (bounds[i] + bounds[i + 1]) // 2)
    return list(zip(bounds[:-1], bounds[1:]))


def block_start(latent: torch.Tensor) -> int | None:
    """The first column the latent iterations rerun: the batch's first latent column; None when no row has a latent
    (on no rank of a multi-rank job), and one pass covers the sequence.

    Under a multi-rank job every rank must make the same 2 + latent_iterations decoder calls (sharded layers gather
    their weights on each call): a rank without latents, when another rank has some, reruns its last column, which
    changes no value.
    """
    columns = latent_columns(latent)
    if is_distributed():
        anywhere = torch.tensor([len(columns)], device=latent.device)
        torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
        if not columns and int(anywhere):
            if latent.shape[1] < 2:
                raise ValueError("sequence too short to match the other ranks' number of latent passes")
            return latent.shape[1] - 1
    return columns[0] if columns else None


def sequential(passes: Passes, embeds: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The thoughts in order, one pass per `segments` range: each pass ends just before a latent column, and its last
    hidden state, through `feed_back` (and `control`), fills that column in every row that has a latent there.
    Without feedback (`passes.feed_back` None) the latents are ordinary tokens and one pass covers the sequence.
    `embeds` are the batch's input embeddings, `latent` its latent mask (B x T). Returns the final hidden states
    and the input embeddings actually used."""
    paused = passes.feed_back is None
    hidden_parts, embed_parts = [], []
    for start, end in segments(torch.zeros_like(latent) if paused else latent):
        part = embeds[:, start:end]
        if hidden_parts and not paused:
            # the previous pass ended at column start-1: its last state gives the thought for column start
            thought = control(passes.feed_back(hidden_parts[-1][:, -1]), passes.thoughts)
            first = torch.where(latent[:, start, None], thought, part[:, 0])
            part = torch.cat([first.unsqueeze(1), part[:, 1:]], dim=1)
        hidden_parts.append(passes.run(part, start))
        embed_parts.append(part)
    return passes.joined(hidden_parts), torch.cat(embed_parts, dim=1)


def iterated(
    passes: Passes, embeds: torch.Tensor, latent: torch.Tensor, start: int, rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The thoughts by Jacobi iteration (after PCCoT, arXiv 2506.18582), T = `rounds` rounds of feedback: one pass
    over the columns before `start` (`block_start`) caches them; then T + 1 passes, numbered 0 to T, each run the
    block from `start` to the end (thoughts, and what follows them) against that cache. Pass 0 starts every latent
    from its `<|latent|>` embedding, even one whose previous column is cached: so a row's result never depends on
    where the other rows of its batch put their latents. In each pass t >= 1 every latent takes `feed_back` (and
    `control`) of pass t-1's final hidden state at the column before it. Passes before the last run against a fork
    of the cache (`kv_cache.forked`), so only pass T's keys and values stay in it.

    Exact for a row of n thoughts at T >= n: thought i's input in pass t >= 1 comes from pass t-1's state before
    it, which (causal attention) depends only on the columns before it, ordinary tokens and that pass's thoughts
    1..i-1. By induction on t, thoughts 1..t of pass t are the sequential loop's, as functions of the weights: none
    for t = 0, and if pass t-1 holds thoughts 1..t-1 exactly, the states before pass t's thoughts 1..t are exact,
    and so are those thoughts. So pass T holds all n thoughts exactly when T >= n and computes the sequential loop's
    function: logits, loss and every gradient are equal. Below the bound, thoughts T + 1 to n are in general
    inexact. Returns the final hidden states and the input embeddings of the last pass.
    """
    prefix = passes.run(embeds[:, :start], 0)
    block, in_block = embeds[:, start:], latent[:, start:, None]
    part, hidden = block, None
    for step in range(rounds + 1):
        if hidden is not None:
            # the state of the column before each block column: the prefix's last, then the previous pass's
            before = torch.cat([prefix[:, -1:], hidden[:, :-1]], dim=1)
            part = torch.where(in_block, control(passes.feed_back(before), passes.thoughts), block)
        hidden = passes.run(part, start, passes.cache if step == rounds else forked(passes.cache))
    return torch.cat([prefix, hidden], dim=1), torch.cat([embeds[:, :start], part], dim=1)


def visual(
    passes: Passes, embeds: torch.Tensor, latent: torch.Tensor, patch: torch.Tensor, image: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The thoughts with visual latents (after IVT-LR, arXiv 2510.12603): the k positions after every thought (`patch`,
    B x T, checked by `patches.visual_mask`) take the image features (as `Coconut.embed` gives them to the language
    model) at the k image-context positions (`image`, B x T) of the row that the thought's position attends to most
    at the decoder's last layer (`patches.thought_attention`), in image order. A row without image positions keeps
    the visual token's own embedding there.

    A thought's patches need its own pass, so the passes split before each row's first thought and after every
    thought: one pass holds a thought's patches and the next thought, which takes `feed_back` of the last hidden
    state of the thought before it (not of its patches). Each thought still costs one pass; the last thought's
    patches add one. The control replaces the thoughts as in `sequential` ("pause": the `<|latent|>` embedding,
    still one pass per thought) or, "random_patches", the choice: seeded random image positions (the same batch
    gives the same positions). Returns the final hidden states, the input embeddings actually used, and the patches
    chosen: B x T x k image-token indices of the row (0 = its first image token) and attention weights at each
    latent column, -1 and 0 elsewhere.
    """
    batch, width = latent.shape
    device = latent.device
    image_index = image.long().cumsum(1) - 1
    columns = torch.arange(width, device=device)
    # a thought's source: the column before it, or where that is a patch, the thought the patch belongs to
    owner = torch.where(latent, columns, -1).cummax(1).values
    source = torch.where(F.pad(patch[:, :-1], (1, 0)), F.pad(owner[:, :-1], (1, 0)), columns - 1)
    first = latent & (latent.long().cumsum(1) == 1)
    ranges = segments(first | F.pad(latent[:, :-1], (1, 0)))
    ends = torch.tensor([end for _, end in ranges], device=device)
    generator = torch.Generator().manual_seed(0) if passes.thoughts == "random_patches" else None
    attention = passes.decoder.layers[-1].self_attn
    patch_column = torch.full_like(image, -1, dtype=torch.long)  # at a patch position: the image column it copies
    chosen = torch.full((batch, width, k), -1, dtype=torch.long, device=device)
    weights = torch.zeros(batch, width, k, device=device)
    rows = torch.arange(batch, device=device)
    hidden_parts, embed_parts, lasts = [], [], []
    with capture_query(attention) as capture:
        for start, end in ranges:
            part, here = embeds[:, start:end], latent[:, start:end]
            has, offset = here.any(1), here.long().argmax(1)  # at most one thought per row in a pass
            column = start + offset
            if hidden_parts:
                # every source is the last column of an earlier pass: the one that ends right after it
                done = torch.stack(lasts, 1)
                index = torch.searchsorted(ends, source[rows, column] + 1).clamp(max=len(lasts) - 1)
                if passes.thoughts != "pause":
                    thought = control(passes.feed_back(done[rows, index]), passes.thoughts)
                    part = torch.where(here[..., None], thought[:, None].to(part.dtype), part)
                copied = patch_column[:, start:end]
                features = embeds[rows[:, None], copied.clamp(min=0)]
                part = torch.where((copied >= 0)[..., None], features, part)
            capture.offsets = offset
            hidden_parts.append(passes.run(part, start))
            embed_parts.append(part)
            lasts.append(hidden_parts[-1][:, -1])
            with torch.no_grad():
                if generator is None:
                    allowed = passes.attention_mask[:, :end].bool() & (columns[:end] <= column[:, None])
                    scores = thought_attention(capture.query, passes.cache.layers[-1].keys, allowed, attention.scaling)
                else:
                    scores = torch.rand(batch, end, generator=generator).to(device)
                picked, picked_weights = top_patches(scores, image[:, :end], k)
                picked = torch.where(has[:, None], picked, -1)
                into = (column[:, None] + 1 + torch.arange(k, device=device)).clamp(max=width - 1)
                patch_column.scatter_(1, into, torch.where(has[:, None], picked, patch_column.gather(1, into)))
                found = picked >= 0
                chosen[rows, column] = torch.where(found, image_index.gather(1, picked.clamp(min=0)), -1)
                weights[rows, column] = torch.where(found, picked_weights.float(), 0.0)
    return passes.joined(hidden_parts), torch.cat(embed_parts, dim=1), (chosen, weights)
