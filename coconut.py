"""Coconut: continuous thoughts for InternVL (or any causal LM that takes `inputs_embeds` and a KV cache).

Every `<|latent|>` token at column j takes as its input embedding the final-layer hidden state at column j-1,
computed with all earlier thoughts already in place. That makes the sequence's columns depend on each other in
order, so `Coconut` runs the decoder in segments split at each column that holds a latent in any row: segment
i ends just before latent column i, its last hidden state fills that column, and the KV cache carries
everything before it. Each position is computed exactly once, in (distinct latent columns + 1) passes, and the
gradient flows back through every pass to the vision tower, the projector and the language model.
With `latent_iterations: T` > 0 the thoughts are computed instead by Jacobi iteration (after PCCoT, arXiv
2506.18582; `Coconut._iterate`): T rounds of feedback over all of them at once, in 2 + T decoder passes whatever the
number of thoughts (one over the columns before the batch's first thought, then T + 1 over the rest: the first with
the `<|latent|>` embeddings, each later one feeding every thought from the one before), with the sequential loop's
values and gradients in every row of at most T thoughts.
With `visual_latents: K` > 0 (a vision model) the K positions after every thought carry the image features that its
position attends to most (after IVT-LR, arXiv 2510.12603; `Coconut._prefill_visual`), in one pass per thought and one
more for the last thought's patches. The two are not combined.

What the passes cost beyond one plain pass is kept to the passes themselves (see bench/bench.py): the KV cache
is written once into buffers of the final length (`WriteOnceLayer`) instead of copied on every pass and kept
alive, copy after copy, for backward; and the loss takes logits only at labelled positions, so a training step
never builds the B x T x V logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from config import THOUGHT_FEEDBACK
from distributed import is_distributed
from patches import capture_query, thought_attention, top_patches, visual_mask

# the markers that open and close the continuous thoughts, and the token each thought takes the place of
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")

# what inference puts at the latent positions: the model's thoughts or a control that carries nothing; with visual
# latents also "random_patches": the model's thoughts, but seeded random image positions instead of the chosen ones
THOUGHT_CONTROLS = ("model", "noise", "zeros", "pause", "random_patches")


class CoconutOutput:
    """What `Coconut.forward` returns: the loss (None without labels), B x T x V logits, and the input
    embeddings with the continuous thoughts filled in.

    With labels, the loss comes from the labelled positions' logits alone, and the B x T x V logits are computed
    only if read (under the grad and autocast modes of the forward, so they equal logits computed in it): a
    training step never pays for them. Without labels they are computed in the forward.
    """

    def __init__(
        self,
        loss: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        hidden: torch.Tensor,
        head: nn.Module,
        labelled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        self.loss, self.inputs_embeds = loss, inputs_embeds
        self._hidden, self._head, self._logits = hidden, head, None
        self._labelled = labelled  # (logits at the labelled positions, shifted labels, their mask)
        self.thought_loss: torch.Tensor | None = None  # step supervision, set by `Coconut.forward` when asked
        # visual latents: B x T x K, at each latent column the row's image-token indices (0 = its first image
        # token) of the K patches its thought chose and their attention weights; -1 and 0 where none
        self.patches: torch.Tensor | None = None
        self.patch_weights: torch.Tensor | None = None
        self._grad = torch.is_grad_enabled()
        device = hidden.device.type
        self._autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))

    @property
    def logits(self) -> torch.Tensor:
        """The B x T x V logits, computed at the first read."""
        if self._logits is None:
            device, dtype, enabled = self._autocast
            with torch.set_grad_enabled(self._grad), torch.autocast(device, dtype, enabled=enabled):
                self._logits = self._head(self._hidden)
        return self._logits

    def example_losses(self) -> torch.Tensor:
        """Each row's mean cross-entropy over its labelled positions (0 for a row without labels), from the
        logits the loss was computed on: per-example losses without the B x T x V logits. Needs labels."""
        if self._labelled is None:
            raise ValueError("example_losses needs the labels passed to forward")
        logits, targets, keep = self._labelled
        token = F.cross_entropy(logits, targets[keep], reduction="none")
        per_row = torch.zeros(keep.shape, dtype=token.dtype, device=token.device).masked_scatter(keep, token)
        return per_row.sum(1) / keep.sum(1).clamp(min=1)


class Coconut(nn.Module):
    """Wraps a `transformers` InternVL (or causal LM) so that latent tokens carry continuous thoughts.

    `latent_token_id` marks thought positions (the `<|start-latent|>`/`<|end-latent|>` markers around them are
    ordinary tokens to the model); `eos_token_id` ends generation. `thought_feedback` says how a hidden state
    becomes the next thought's input embedding (`feed_back`). `latent_iterations` > 0 computes the thoughts by that
    many rounds of feedback over all of them at once (`_iterate`) instead of one pass per thought. `visual_latents`
    K > 0 (a vision model only) makes the K `visual_token_id` positions after every thought carry the image features
    it attends to most (`_prefill_visual`). The two are not combined: the iterated block has no pass of a thought's
    own in which to choose its patches.
    """

    def __init__(
        self,
        base: nn.Module,
        latent_token_id: int,
        eos_token_id: int,
        thought_feedback: str = "hidden",
        latent_iterations: int = 0,
        visual_latents: int = 0,
        visual_token_id: int = -1,
    ) -> None:
        super().__init__()
        if thought_feedback not in THOUGHT_FEEDBACK:
            raise ValueError(f"thought_feedback must be one of {THOUGHT_FEEDBACK}, got {thought_feedback!r}")
        if not isinstance(latent_iterations, int) or latent_iterations < 0:
            raise ValueError(f"latent_iterations must be an integer of at least 0, got {latent_iterations!r}")
        if visual_latents and (thought_feedback == "none" or not hasattr(base.config, "vision_config")):
            raise ValueError("visual_latents needs a vision-language model and thoughts fed back (not 'none')")
        if visual_latents and latent_iterations:
            raise ValueError("latent_iterations and visual_latents cannot be combined; set one of them to 0")
        self.visual_latents, self.visual_token_id = visual_latents, visual_token_id
        self.base = base
        self.latent_token_id = latent_token_id
        self.eos_token_id = eos_token_id
        self.thought_feedback = thought_feedback
        self.latent_iterations = latent_iterations
        width = base.get_input_embeddings().weight.shape[1]
        self.projection = ThoughtProjection(width) if thought_feedback == "projected" else None
        self.has_vision = hasattr(base.config, "vision_config")
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def decoder(self) -> nn.Module:
        """The language model's decoder stack (a property, so its weights are registered once, under `base`)."""
        return decoder_of(self.base)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered into the image-context positions, as InternVL does.

        Under a multi-rank job the vision tower runs once per call on every rank (on a blank tile when this
        rank's batch has no image) so that sharded layers see the same collectives everywhere.
        """
        embeds = self.base.get_input_embeddings()(input_ids)
        if not self.has_vision or (pixel_values is None and not is_distributed()):
            return embeds
        config = self.base.config
        image_mask = input_ids == config.image_token_id
        blank = pixel_values is None
        if blank:
            size = config.vision_config.image_size
            pixel_values = embeds.new_zeros(1, config.vision_config.num_channels, size[0], size[1])
        features = self.base.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        if blank:  # keeps the vision tower in the graph without changing any value
            return embeds + 0.0 * features.sum()
        if image_mask.sum().item() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{int(image_mask.sum())} image-context tokens but {features.shape[0]} tiles x "
                f"{features.shape[1]} features; the prompt's image block does not match pixel_values"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def feed_back(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map from the last hidden state before a thought to the thought's input embedding (rows of D), built
        once per forward: `rescaled` reads the embedding table's norm once, not once per latent pass.

        `hidden` feeds the state back as it is (the paper); `rescaled` gives it the root-mean-square norm of the
        input-embedding rows, the scale the decoder's first layer was trained on (the final norm leaves hidden
        states about sqrt(D) long, an order of magnitude off); `projected` maps it through `ThoughtProjection`.
        """
        if self.thought_feedback == "rescaled":
            table = self.base.get_input_embeddings().weight.detach()
            # at least float32: a bf16 sum over the vocabulary loses the norm's precision
            scale = table.to(torch.promote_types(table.dtype, torch.float32)).pow(2).sum(-1).mean().sqrt()
            return lambda hidden: hidden * (scale.to(hidden.dtype) / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        if self.thought_feedback == "projected":
            return self.projection
        return lambda hidden: hidden

    def fills_thoughts(self, thoughts: str = "model") -> bool:
        """Whether the latents are filled from hidden states, in decoder passes of their own. Not under `none`
        feedback or the pause control: the latents are then ordinary tokens, read with the prompt in one pass
        (except with visual latents, whose patches are still chosen thought by thought)."""
        return self.thought_feedback != "none" and (thoughts != "pause" or self.visual_latents > 0)

    def thought_passes(self, n_thoughts: int, thoughts: str = "model") -> int:
        """The sequential decoder passes that a row's `n_thoughts` thoughts add to its prompt's one: none without
        thoughts or when they are not filled (`fills_thoughts`); the block's `latent_iterations` + 1 when they are
        iterated (2 + latent_iterations in all); otherwise one per thought (n + 1 in all), and with visual latents
        one more, for the last thought's patches."""
        if n_thoughts == 0 or not self.fills_thoughts(thoughts):
            return 0
        if self.latent_iterations:
            return self.latent_iterations + 1
        return n_thoughts + (self.visual_latents > 0)

    @staticmethod
    def _latent_columns(latent_mask: torch.Tensor) -> list[int]:
        """The columns that hold a latent in any row (the one host sync, before any pass); column 0 may not."""
        columns = torch.nonzero(latent_mask.any(0)).flatten().tolist()
        if columns and columns[0] == 0:
            raise ValueError("a <|latent|> token sits in column 0: it needs a position before it")
        return columns

    def _segments(self, latent_mask: torch.Tensor) -> list[tuple[int, int]]:
        """Column ranges of the decoder passes: split before every column that holds a latent in any row.

        Under a multi-rank job every rank must run the same number of passes (sharded layers gather their
        weights on each call), so a rank with fewer latent columns splits its longest segments further, which
        changes no value.
        """
        width = latent_mask.shape[1]
        bounds = [0, *self._latent_columns(latent_mask), width]
        if is_distributed():
            passes = torch.tensor([len(bounds) - 1], device=latent_mask.device)
            torch.distributed.all_reduce(passes, op=torch.distributed.ReduceOp.MAX)
            while len(bounds) - 1 < int(passes):
                i = max(range(len(bounds) - 1), key=lambda k: bounds[k + 1] - bounds[k])
                if bounds[i + 1] - bounds[i] < 2:
                    raise ValueError("sequence too short to match the other ranks' number of latent passes")
                bounds.insert(i + 1, (bounds[i] + bounds[i + 1]) // 2)
        return list(zip(bounds[:-1], bounds[1:]))

    def _block_start(self, latent_mask: torch.Tensor) -> int | None:
        """The first column the latent iterations rerun: the batch's first latent column; None when no row has a
        latent (on no rank of a multi-rank job), and one pass covers the sequence.

        Under a multi-rank job every rank must make the same 2 + latent_iterations decoder calls (sharded layers
        gather their weights on each call): a rank without latents, when another rank has some, reruns its last
        column, which changes no value.
        """
        columns = self._latent_columns(latent_mask)
        if is_distributed():
            anywhere = torch.tensor([len(columns)], device=latent_mask.device)
            torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
            if not columns and int(anywhere):
                if latent_mask.shape[1] < 2:
                    raise ValueError("sequence too short to match the other ranks' number of latent passes")
                return latent_mask.shape[1] - 1
        return columns[0] if columns else None

    def _pass(
        self, part: torch.Tensor, start: int, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """One decoder pass over `part`, the columns from `start` on, against the keys and values in `cache`
        (which it extends); returns the pass's final hidden states."""
        end = start + part.shape[1]
        out = self.decoder(
            inputs_embeds=part,
            attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end],
            use_cache=True,
            **{self.cache_arg: cache},
        )
        return out.last_hidden_state

    def _iterate(
        self,
        embeds: torch.Tensor,
        latent_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        start: int,
        thoughts: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The thoughts by Jacobi iteration (after PCCoT, arXiv 2506.18582), T = `latent_iterations` rounds of
        feedback: one pass over the columns before `start`, the batch's first latent column, caches them; then
        T + 1 passes, numbered 0 to T, each run the block from `start` to the end (thoughts, and what follows them)
        against that cache. Pass 0 starts every latent from its `<|latent|>` embedding, even one whose previous
        column is cached: so a row's result never depends on where the other rows of its batch put their latents.
        In each pass t >= 1 every latent takes `feed_back` (and `_control`) of pass t-1's final hidden state at the
        column before it. Passes before the last run against a fork of the cache (`_forked`), so only pass T's keys
        and values stay in it.

        Exact for a row of n thoughts at T >= n: thought i's input in pass t >= 1 comes from pass t-1's state
        before it, which (causal attention) depends only on the columns before it, ordinary tokens and that pass's
        thoughts 1..i-1. By induction on t, thoughts 1..t of pass t are the sequential loop's, as functions of the
        weights: none for t = 0, and if pass t-1 holds thoughts 1..t-1 exactly, the states before pass t's thoughts
        1..t are exact, and so are those thoughts. So pass T holds all n thoughts exactly when T >= n and computes
        the sequential loop's function: logits, loss and every gradient are equal. Below the bound, thoughts T + 1
        to n are in general inexact. Returns the final hidden states and the input embeddings of the last pass.
        """
        feed_back = self.feed_back()
        prefix = self._pass(embeds[:, :start], 0, attention_mask, position_ids, cache)
        block, latent = embeds[:, start:], latent_mask[:, start:, None]
        part, hidden = block, None
        for step in range(self.latent_iterations + 1):
            if hidden is not None:
                # the state of the column before each block column: the prefix's last, then the previous pass's
                before = torch.cat([prefix[:, -1:], hidden[:, :-1]], dim=1)
                part = torch.where(latent, _control(feed_back(before), thoughts), block)
            layers = cache if step == self.latent_iterations else _forked(cache)
            hidden = self._pass(part, start, attention_mask, position_ids, layers)
        return torch.cat([prefix, hidden], dim=1), torch.cat([embeds[:, :start], part], dim=1)

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache_length: int,
        thoughts: str = "model",
    ) -> tuple[torch.Tensor, torch.Tensor, Cache, tuple[torch.Tensor, torch.Tensor] | None]:
        """Run the decoder over the whole sequence, filling each latent from the hidden state before it.

        `thoughts` other than "model" replaces every thought by a control (`THOUGHT_CONTROLS`): Gaussian noise of
        the thought's norm, zeros, or the `<|latent|>` embedding itself ("pause", which is what the `none`
        feedback trains with: the latents are then ordinary tokens and one pass covers the sequence).
        With `visual_latents`, `_prefill_visual` computes the thoughts and their patches instead; with
        `latent_iterations`, `_iterate` computes the thoughts (a batch without any, on every rank, takes the one
        pass here).
        Returns the final hidden states (B x T x D), the input embeddings actually used, the KV cache, which has
        room for `cache_length` columns, and with visual latents the patches chosen (`_prefill_visual`), else None.
        """
        embeds = self.embed(input_ids, pixel_values)
        latent_mask = input_ids == self.latent_token_id
        cache = Cache(layers=[WriteOnceLayer(cache_length) for _ in range(self.decoder.config.num_hidden_layers)])
        if self.visual_latents:
            return self._prefill_visual(input_ids, embeds, latent_mask, attention_mask, position_ids, cache, thoughts)
        paused = not self.fills_thoughts(thoughts)
        start = self._block_start(latent_mask) if self.latent_iterations and not paused else None
        if start is not None:
            hidden, embeds = self._iterate(embeds, latent_mask, attention_mask, position_ids, cache, start, thoughts)
            return hidden, embeds, cache, None
        feed_back = None if paused else self.feed_back()
        hidden_parts, embed_parts = [], []
        for start, end in self._segments(torch.zeros_like(latent_mask) if paused else latent_mask):
            part = embeds[:, start:end]
            if hidden_parts and not paused:
                # the previous pass ended at column start-1: its last state gives the thought for column start
                thought = _control(feed_back(hidden_parts[-1][:, -1]), thoughts)
                first = torch.where(latent_mask[:, start, None], thought, part[:, 0])
                part = torch.cat([first.unsqueeze(1), part[:, 1:]], dim=1)
            hidden_parts.append(self._pass(part, start, attention_mask, position_ids, cache))
            embed_parts.append(part)
        return self._joined(hidden_parts), torch.cat(embed_parts, dim=1), cache, None

    def _joined(self, hidden_parts: list[torch.Tensor]) -> torch.Tensor:
        """The passes' final hidden states, side by side. One pass means no rank's batch holds a thought (`_segments`
        evens the passes): DDP still expects a gradient for the projection's parameters, so a multi-rank job then
        adds the projection times zero."""
        hidden = torch.cat(hidden_parts, dim=1)
        if self.projection is not None and len(hidden_parts) == 1 and is_distributed():
            hidden = hidden + 0.0 * self.projection(hidden[:, :1]).sum()
        return hidden

    def _prefill_visual(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        latent: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        thoughts: str,
    ) -> tuple[torch.Tensor, torch.Tensor, Cache, tuple[torch.Tensor, torch.Tensor]]:
        """`_prefill` with visual latents (after IVT-LR, arXiv 2510.12603): the K positions after every thought take
        the image features (as `embed` gives them to the language model) at the K image-context positions of the
        row that the thought's position attends to most at the decoder's last layer (`thought_attention`), in
        image order. A row without image positions keeps the visual token's own embedding there.

        A thought's patches need its own pass, so the passes split before each row's first thought and after every
        thought: one pass holds a thought's patches and the next thought, which takes `feed_back` of the last hidden
        state of the thought before it (not of its patches). Each thought still costs one pass; the last thought's
        patches add one. `thoughts` replaces the thoughts as in `_prefill` ("pause": the `<|latent|>` embedding, still
        one pass per thought) or, "random_patches", the choice: seeded random image positions (the same batch gives
        the same positions). `embeds` are the sequence's input embeddings, `latent` its latent mask, and `cache`
        the empty cache to fill. Returns `_prefill`'s four items, the last (patches, weights): B x T x K image-token
        indices of the row (0 = its first image token) and attention weights at each latent column, -1 and 0
        elsewhere.
        """
        k, (batch, width) = self.visual_latents, input_ids.shape
        visual = visual_mask(input_ids, latent, self.visual_token_id, k)
        image = input_ids == self.base.config.image_token_id
        image_index = image.long().cumsum(1) - 1
        columns = torch.arange(width, device=input_ids.device)
        # a thought's source: the column before it, or where that is a patch, the thought the patch belongs to
        owner = torch.where(latent, columns, -1).cummax(1).values
        source = torch.where(F.pad(visual[:, :-1], (1, 0)), F.pad(owner[:, :-1], (1, 0)), columns - 1)
        first = latent & (latent.long().cumsum(1) == 1)
        segments = self._segments(first | F.pad(latent[:, :-1], (1, 0)))
        ends = torch.tensor([end for _, end in segments], device=input_ids.device)
        feed_back = self.feed_back()
        generator = torch.Generator().manual_seed(0) if thoughts == "random_patches" else None
        attention = self.decoder.layers[-1].self_attn
        patch_column = torch.full_like(input_ids, -1)  # at a patch position: the image column it copies
        chosen = torch.full((batch, width, k), -1, dtype=torch.long, device=input_ids.device)
        weights = torch.zeros(batch, width, k, device=input_ids.device)
        rows = torch.arange(batch, device=input_ids.device)
        hidden_parts, embed_parts, lasts = [], [], []
        with capture_query(attention) as capture:
            for start, end in segments:
                part, here = embeds[:, start:end], latent[:, start:end]
                has, offset = here.any(1), here.long().argmax(1)  # at most one thought per row in a pass
                column = start + offset
                if hidden_parts:
                    # every source is the last column of an earlier pass: the one that ends right after it
                    done = torch.stack(lasts, 1)
                    index = torch.searchsorted(ends, source[rows, column] + 1).clamp(max=len(lasts) - 1)
                    if thoughts != "pause":
                        thought = _control(feed_back(done[rows, index]), thoughts)
                        part = torch.where(here[..., None], thought[:, None].to(part.dtype), part)
                    copied = patch_column[:, start:end]
                    features = embeds[rows[:, None], copied.clamp(min=0)]
                    part = torch.where((copied >= 0)[..., None], features, part)
                capture.offsets = offset
                hidden_parts.append(self._pass(part, start, attention_mask, position_ids, cache))
                embed_parts.append(part)
                lasts.append(hidden_parts[-1][:, -1])
                with torch.no_grad():
                    if generator is None:
                        allowed = attention_mask[:, :end].bool() & (columns[:end] <= column[:, None])
                        scores = thought_attention(capture.query, cache.layers[-1].keys, allowed, attention.scaling)
                    else:
                        scores = torch.rand(batch, end, generator=generator).to(input_ids.device)
                    picked, picked_weights = top_patches(scores, image[:, :end], k)
                    picked = torch.where(has[:, None], picked, -1)
                    into = (column[:, None] + 1 + torch.arange(k, device=input_ids.device)).clamp(max=width - 1)
                    patch_column.scatter_(1, into, torch.where(has[:, None], picked, patch_column.gather(1, into)))
                    found = picked >= 0
                    chosen[rows, column] = torch.where(found, image_index.gather(1, picked.clamp(min=0)), -1)
                    weights[rows, column] = torch.where(found, picked_weights.float(), 0.0)
        return self._joined(hidden_parts), torch.cat(embed_parts, dim=1), cache, (chosen, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        step_ids: torch.Tensor | None = None,
        c_thought: int = 1,
        thoughts: str = "model",
    ) -> CoconutOutput:
        """Logits for every position and, with `labels`, the shifted cross-entropy over labels != -100 (the
        logits are then computed only if read, see `CoconutOutput`).

        Everything after the attention mask is keyword-only: the original Coconut's `model(ids, mask, labels,
        position_ids)` order would otherwise pass its positions as pixel_values. Positions default to the
        attention mask's cumulative sum minus one, so left and right padding both work. With `step_ids` (B x G x L,
        the tokens of the step each group of `c_thought` thoughts replaced, -100 padded; a collated training batch
        carries both), the output's `thought_loss` is the step supervision of `step_loss`. `thoughts` replaces the
        thoughts by a control (`_prefill`).
        """
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        hidden, embeds, _, patches = self._prefill(
            input_ids, attention_mask, pixel_values, position_ids, input_ids.shape[1], thoughts
        )
        head = self.base.get_output_embeddings()
        loss = labelled = None
        if labels is not None:
            # logits only where there is a label to predict: the rest of the B x T x V tensor is never needed
            targets = labels[:, 1:]
            keep = targets != -100
            logits = head(hidden[:, :-1][keep])
            # at least float32: a bf16 softmax over 150k classes loses the loss's precision
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits, targets[keep])
            labelled = (logits, targets, keep)
        output = CoconutOutput(loss, embeds, hidden, head, labelled)
        if patches is not None:
            output.patches, output.patch_weights = patches
        if step_ids is not None:
            latent = input_ids == self.latent_token_id
            per_row = latent.sum(1).tolist()
            output.thought_loss = self.step_loss(embeds[latent], per_row, step_ids, c_thought)
        if labels is None:  # whoever asks without labels wants the logits: compute them within the forward call
            _ = output.logits
        return output

    def step_loss(
        self, thoughts: torch.Tensor, per_row: list[int], step_ids: torch.Tensor, c_thought: int
    ) -> torch.Tensor:
        """Step supervision (after SIM-CoT, arXiv 2509.20317): each group of `c_thought` thoughts that replaced a
        written step is decoded back into that step by the language model itself, the group as a prefix and the
        step's tokens teacher-forced; the mean cross-entropy over the step tokens. Nothing of it runs at inference.

        `thoughts` are the latent positions' input embeddings row by row (N x D), `per_row` how many each row
        has, `step_ids` B x G x L: row b's group g (its thoughts g*c .. g*c+c-1 for c = c_thought) replaced the step
        whose tokens are step_ids[b, g], -100 after the step's end and for groups that replaced no step.
        """
        first = torch.tensor([0, *per_row[:-1]], device=thoughts.device).cumsum(0)  # each row's first thought
        row, group = torch.nonzero(step_ids[:, :, 0] != -100, as_tuple=True)
        scale = 1.0
        if row.numel() == 0:
            # still one decoder call, on a dummy group weighted 0: every rank must make the same calls (FSDP2
            # gathers each layer's weights per call) and DDP expects a gradient for every parameter
            prefix = thoughts.new_zeros(1, c_thought, thoughts.shape[-1])
            target, scale = step_ids.new_zeros(1, 1), 0.0
        else:
            index = (first[row] + group * c_thought)[:, None] + torch.arange(c_thought, device=thoughts.device)
            prefix, target = thoughts[index], step_ids[row, group]  # N x c_thought x D, N x L
        steps = self.base.get_input_embeddings()(target.clamp(min=0)).to(prefix.dtype)
        mask = target != -100
        keep = torch.cat([mask.new_ones(mask.shape[0], c_thought), mask], 1).long()
        hidden = self.decoder(inputs_embeds=torch.cat([prefix, steps], 1), attention_mask=keep, use_cache=False)
        # column c_thought-1+t predicts step token t
        logits = self.base.get_output_embeddings()(hidden.last_hidden_state[:, c_thought - 1 : -1][mask])
        return scale * F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target[mask])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        thoughts: str = "model",
    ) -> torch.Tensor:
        """Greedy decoding with a KV cache; latents in the prompt are filled as in `forward`.

        Every row's next token must sit in the last column, so prompts padded on the right (as the original
        Coconut's collator pads them) are first moved to the left: the returned ids hold the prompts left-padded,
        followed by the new tokens; a row that produced EOS is padded with EOS after it. Under a multi-rank job,
        decoding stops only when every row on every rank is done, so all ranks run the same number of decoder
        calls.
        """
        input_ids, attention_mask = left_padded(input_ids, attention_mask)
        position_ids = positions_from_mask(attention_mask)
        width = input_ids.shape[1] + max_new_tokens
        hidden, _, cache, _ = self._prefill(input_ids, attention_mask, pixel_values, position_ids, width, thoughts)
        head, embedding = self.base.get_output_embeddings(), self.base.get_input_embeddings()
        next_pos = position_ids[:, -1:] + 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = head(hidden[:, -1]).argmax(-1)
            token = torch.where(done, torch.full_like(token, self.eos_token_id), token)
            new_tokens.append(token)
            done |= token == self.eos_token_id
            if step == max_new_tokens - 1 or _all_done(done):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            out = self.decoder(
                inputs_embeds=embedding(token[:, None]),
                attention_mask=attention_mask,
                position_ids=next_pos,
                use_cache=True,
                **{self.cache_arg: cache},
            )
            hidden = out.last_hidden_state
            next_pos = next_pos + 1
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a `transformers` model, the module that takes `inputs_embeds` and returns
    `last_hidden_state`. transformers 4.x's `get_decoder` returns a GPT-2 LM head model itself, whose decoder is its
    base model (`transformer`); 5.x returns that directly."""
    decoder = model.get_decoder()
    return model.base_model if decoder is model else decoder


class ThoughtProjection(nn.Module):
    """The `projected` feedback: Linear-GELU-Linear-LayerNorm from hidden space into embedding space, as CODI
    (arXiv 2502.21074) feeds its thoughts back. Trained with the model, saved beside it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


def _control(thought: torch.Tensor, kind: str) -> torch.Tensor:
    """The thought, or what replaces it at inference: noise of its norm, or zeros ("pause" never gets here)."""
    if kind == "noise":
        noise = torch.randn_like(thought)
        return noise * (thought.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
    if kind == "zeros":
        return torch.zeros_like(thought)
    return thought


def _forked(cache: Cache) -> Cache:
    """A cache that starts from `cache`'s filled columns and grows by concatenation (`DynamicLayer`): a pass run
    against it attends to those columns as against `cache` and leaves `cache` as it was.

    Rolling `cache` back after a pass instead would let the next pass write over columns whose keys and values the
    earlier pass's attention saved for backward (`_Append` relies on no column being written twice); the fork's
    price is one copy of the cached columns per layer and pass.
    """
    layers = []
    for layer in cache.layers:
        fork = DynamicLayer()
        fork.lazy_initialization(layer.keys, layer.values)
        fork.keys, fork.values = layer.keys, layer.values
        layers.append(fork)
    return Cache(layers=layers)


class WriteOnceLayer(DynamicLayer):
    """A KV-cache layer that writes each pass's keys and values once into buffers of the final length and hands
    attention a view of the filled columns.

    `DynamicCache` concatenates instead: every pass copies the whole cache, and autograd keeps each copy alive for
    the backward of the attention that read it, so n latent passes held n copies of the growing cache (and
    generation copied it once per token). Here all passes share one buffer per layer.
    """

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.length, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.length, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.get_seq_length() + key_states.shape[2] > self.length:
            raise ValueError(f"the KV cache holds {self.length} columns; this pass would go past them")
        if torch.is_grad_enabled():
            self.keys = _Append.apply(self.key_buffer, self.keys, key_states)
            self.values = _Append.apply(self.value_buffer, self.values, value_states)
        else:  # generation: no gradient to route, and a plain write costs a third of the autograd.Function's call
            start = self.get_seq_length()
            end = start + key_states.shape[2]
            self.key_buffer[:, :, start:end], self.value_buffer[:, :, start:end] = key_states, value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class _Append(torch.autograd.Function):
    """Write `new` into `buffer` after the `earlier` columns and return all filled columns, with the gradient
    routed as `torch.cat([earlier, new], 2)` routes it, but without copying the earlier columns."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, earlier: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        start = 0 if earlier is None else earlier.shape[2]
        end = start + new.shape[2]
        buffer[:, :, start:end] = new
        ctx.start = start
        # Writes only ever go to columns no earlier view covers, so a view autograd saved for backward keeps the
        # values it was computed with. `.data` gives the view its own version counter, so that those later writes
        # into `buffer` do not trip autograd's check that saved tensors were not modified.
        return buffer.data[:, :, :end]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor]:
        return None, grad[:, :, : ctx.start] if ctx.start else None, grad[:, :, ctx.start :]


def left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with their padding moved to the left (each row rolled right by its trailing padding), unchanged
    when every row already ends on a token."""
    trailing = attention_mask.long().flip(1).cumsum(1).eq(0).sum(1)  # columns after each row's last token
    if not trailing.any():
        return input_ids, attention_mask
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    index = (columns[None, :] - trailing[:, None]) % input_ids.shape[1]
    return input_ids.gather(1, index), attention_mask.gather(1, index)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: cumulative sum of the mask minus one (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _all_done(done: torch.Tensor) -> bool:
    """True when every row has finished, on every rank of a multi-rank job."""
    remaining = (~done).sum()
    if is_distributed():
        torch.distributed.all_reduce(remaining)
    return int(remaining) == 0
