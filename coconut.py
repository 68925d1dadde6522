"""Coconut: continuous thoughts for InternVL (or any causal LM that takes `inputs_embeds` and a KV cache).

Every `<|latent|>` token at column j takes as its input embedding the final-layer hidden state at column j-1,
computed with all earlier thoughts already in place. That makes the sequence's columns depend on each other in
order, so `Coconut` runs the decoder in segments (`prefill.sequential`) split at each column that holds a latent in
any row: segment i ends just before latent column i, its last hidden state fills that column, and the KV cache
carries everything before it. Each position is computed exactly once, in (distinct latent columns + 1) passes, and the
gradient flows back through every pass to the vision tower, the projector and the language model.
With `latent_iterations: T` > 0 the thoughts are computed instead by Jacobi iteration (after PCCoT, arXiv
2506.18582; `prefill.iterated`): T rounds of feedback over all of them at once, in 2 + T decoder passes whatever the
number of thoughts (one over the columns before the batch's first thought, then T + 1 over the rest: the first with
the `<|latent|>` embeddings, each later one feeding every thought from the one before), with the sequential loop's
values and gradients in every row of at most T thoughts.
With `visual_latents: K` > 0 (a vision model) the K positions after every thought carry the image features that its
position attends to most (after IVT-LR, arXiv 2510.12603; `prefill.visual`), in one pass per thought and one
more for the last thought's patches. The two are not combined.

What the passes cost beyond one plain pass is kept to the passes themselves (see bench/bench.py): the KV cache
is written once into buffers of the final length (`kv_cache.WriteOnceLayer`) instead of copied on every pass and kept
alive, copy after copy, for backward; and the loss takes logits only at labelled positions, so a training step
never builds the B x T x V logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

import prefill
from config import THOUGHT_FEEDBACK
from distributed import is_distributed
from kv_cache import WriteOnceLayer
from patches import visual_mask

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
    many rounds of feedback over all of them at once (`prefill.iterated`) instead of one pass per thought.
    `visual_latents` K > 0 (a vision model only) makes the K `visual_token_id` positions after every thought carry the
    image features it attends to most (`prefill.visual`). The two are not combined: the iterated block has no pass of a
    thought's own in which to choose its patches.
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

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache_length: int,
        thoughts: str = "model",
    ) -> tuple[torch.Tensor, torch.Tensor, Cache, tuple[torch.Tensor, torch.Tensor] | None]:
        """Run the decoder over the whole sequence, filling each latent from the hidden state before it, in the
        passes of `prefill`: `prefill.visual` with `visual_latents`, `prefill.iterated` with `latent_iterations`
        (a batch without any latent, on every rank, takes `prefill.sequential`'s one pass), else `prefill.sequential`.

        `thoughts` other than "model" replaces every thought by a control (`THOUGHT_CONTROLS`): Gaussian noise of
        the thought's norm, zeros, or the `<|latent|>` embedding itself ("pause", which is what the `none`
        feedback trains with: the latents are then ordinary tokens and one pass covers the sequence).
        Returns the final hidden states (B x T x D), the input embeddings actually used, the KV cache, which has
        room for `cache_length` columns, and with visual latents the patches chosen (`prefill.visual`), else None.
        """
        embeds = self.embed(input_ids, pixel_values)
        latent = input_ids == self.latent_token_id
        cache = Cache(layers=[WriteOnceLayer(cache_length) for _ in range(self.decoder.config.num_hidden_layers)])
        feed_back = self.feed_back() if self.fills_thoughts(thoughts) else None
        passes = prefill.Passes(
            self.decoder, self.cache_arg, attention_mask, position_ids, cache, feed_back, self.projection, thoughts
        )
        if self.visual_latents:
            patch = visual_mask(input_ids, latent, self.visual_token_id, self.visual_latents)
            image = input_ids == self.base.config.image_token_id
            hidden, embeds, patches = prefill.visual(passes, embeds, latent, patch, image, self.visual_latents)
            return hidden, embeds, cache, patches
        start = prefill.block_start(latent) if self.latent_iterations and feed_back is not None else None
        if start is not None:
            hidden, embeds = prefill.iterated(passes, embeds, latent, start, self.latent_iterations)
        else:
            hidden, embeds = prefill.sequential(passes, embeds, latent)
        return hidden, embeds, cache, None

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
