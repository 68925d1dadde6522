"""Thought feedback, step supervision and the inference controls against naive references.

The reference for every feedback mode (conftest.reference_logits; `hidden` is tests/test_coconut.py's) recomputes the
whole sequence without a cache once per latent column and fills each latent with the mode's map of the hidden state
before it: the same `projection` module for `projected`, an independent formula for `rescaled`, the plain forward
for `none`. The step-supervision reference decodes each (row, group) on its own through the language model. Every
test runs on the tiny model of each family (InternVL, GPT-2, Qwen2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYOUTS, build_batch, make_coconut, plain_hidden, reference_logits, shifted_loss

from coconut import positions_from_mask


def rescale(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each row scaled to the root-mean-square norm of the embedding rows (a constant: no gradient to the table)."""
    rms = torch.sqrt((table.detach() ** 2).sum(1).mean())
    return hidden / hidden.norm(dim=-1, keepdim=True) * rms


def fed_thoughts(base, embeds, ids, mask, latent_id, feed_back):
    """What each latent of `embeds` should hold: `feed_back` of the hidden state a plain pass over `embeds` gives
    the column before it (None: the latent token's own embedding)."""
    rows, cols = torch.nonzero(ids == latent_id, as_tuple=True)
    if feed_back is None:
        return base.get_input_embeddings()(ids)[rows, cols]
    hidden = plain_hidden(base, embeds, mask, positions_from_mask(mask))
    return feed_back(hidden[rows, cols - 1])


def feedback_map(mode, model):
    table = model.base.get_input_embeddings().weight
    return {
        "hidden": lambda h: h,
        "rescaled": lambda h: rescale(h, table),
        "projected": lambda h: model.projection(h),
        "none": None,
    }[mode]


@pytest.mark.parametrize("layout", ["aligned", "misaligned_left_pad", "mixed_padding_text_only"])
@pytest.mark.parametrize("mode", ["rescaled", "projected", "none"])
def test_feedback_modes_match_the_reference(any_base, mode, layout):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer, thought_feedback=mode).double()
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS[layout])
    params = list(model.parameters())
    out = model(ids, mask, labels=labels, pixel_values=pixels)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    feed_back = feedback_map(mode, model)
    ref = reference_logits(base, ids, mask, pixels, model.latent_token_id, feed_back)
    ref_loss = shifted_loss(ref, labels)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)
    latent = ids == model.latent_token_id
    expected = fed_thoughts(base, out.inputs_embeds, ids, mask, model.latent_token_id, feed_back)
    torch.testing.assert_close(out.inputs_embeds[latent], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-9, atol=1e-9)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp(min=1e-30), name
    if mode == "projected":
        assert all(g is not None for g in grads[-len(list(model.projection.parameters())) :])


def test_rescaled_thoughts_have_the_embedding_scale(any_base):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer, thought_feedback="rescaled")
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["aligned"])
    with torch.no_grad():
        thoughts = model(ids, mask, pixel_values=pixels).inputs_embeds[ids == model.latent_token_id]
    rms = base.get_input_embeddings().weight.pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(thoughts.norm(dim=-1), rms.expand(len(thoughts)))


def reference_step_loss(model, thoughts_per_row, step_ids, width):
    """Every (row, group) decoded alone: the group's thoughts, then the step, through the language model."""
    lm, head = model.decoder, model.base.get_output_embeddings()
    total, count = 0.0, 0
    for row, thoughts in enumerate(thoughts_per_row):
        for group in range(step_ids.shape[1]):
            step = step_ids[row, group]
            step = step[step != -100]
            if len(step) == 0:
                continue
            prefix = thoughts[group * width : (group + 1) * width]
            embeds = torch.cat([prefix, model.base.get_input_embeddings()(step)])[None]
            logits = head(lm(inputs_embeds=embeds).last_hidden_state)[0]
            total = total + F.cross_entropy(logits[width - 1 : -1], step, reduction="sum")
            count += len(step)
    return total / count


@pytest.mark.parametrize("width", [1, 2])
def test_step_loss_matches_decoding_each_group_alone(any_base, width):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    rows = [(1, 3, 2 * width, 4), (0, 5, 1 * width, 2), (0, 4, 0, 3)]
    ids, mask, pixels, labels = build_batch(base, tokenizer, rows, [False, False, False])
    # row 0 replaced two steps, row 1 one step (its second group is padding), row 2 none
    step_ids = torch.full((3, 2, 4), -100)
    step_ids[0, 0, :3] = torch.tensor([5, 6, 7])
    step_ids[0, 1, :4] = torch.tensor([8, 9, 10, 11])
    step_ids[1, 0, :2] = torch.tensor([12, 13])
    params = list(base.parameters())
    out = model(ids, mask, labels=labels, pixel_values=pixels, step_ids=step_ids, c_thought=width)
    grads = torch.autograd.grad(out.thought_loss, params, allow_unused=True, retain_graph=True)
    latent = ids == model.latent_token_id
    thoughts = [out.inputs_embeds[row][latent[row]] for row in range(3)]
    ref = reference_step_loss(model, thoughts, step_ids, width)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(out.thought_loss, ref, rtol=1e-9, atol=1e-9)
    for (name, _), g, r in zip(base.named_parameters(), grads, ref_grads):
        if r is not None:
            assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp(min=1e-30), name


def test_step_loss_without_supervised_thoughts_is_zero_and_keeps_the_graph(any_base):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["no_latents_several_tiles"])
    out = model(ids, mask, labels=labels, pixel_values=pixels, step_ids=torch.full((2, 1, 1), -100))
    assert out.thought_loss.item() == 0.0 and out.thought_loss.requires_grad


@pytest.mark.parametrize("control", ["zeros", "pause", "noise"])
def test_controls_replace_the_thoughts(any_base, control):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
    latent = ids == model.latent_token_id
    with torch.no_grad():
        own = model(ids, mask, pixel_values=pixels).inputs_embeds[latent]
        out = model(ids, mask, pixel_values=pixels, thoughts=control)
        feed = {"zeros": lambda h: torch.zeros_like(h), "pause": None}.get(control, lambda h: h)
        ref = reference_logits(base, ids, mask, pixels, model.latent_token_id, feed)
        expected = fed_thoughts(base, out.inputs_embeds, ids, mask, model.latent_token_id, feed)
    replaced = out.inputs_embeds[latent]
    if control == "noise":
        # same norm as the model's own thought at the first latent column, and nothing like it
        torch.testing.assert_close(replaced.norm(dim=-1)[:1], own.norm(dim=-1)[:1])
        assert F.cosine_similarity(replaced, own).abs().max() < 0.5
        return
    torch.testing.assert_close(replaced, expected, rtol=1e-9, atol=1e-9)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)


def test_generate_with_pause_thoughts_equals_a_pause_model(any_base):
    base, tokenizer = any_base
    ids, mask, pixels, _ = build_batch(base, tokenizer, [(1, 3, 2, 2), (0, 5, 3, 1)], [True, True])
    with torch.no_grad():
        controlled = make_coconut(base, tokenizer, eos_token_id=-1).generate(
            ids, mask, pixel_values=pixels, max_new_tokens=4, thoughts="pause"
        )
        paused = make_coconut(base, tokenizer, eos_token_id=-1, thought_feedback="none").generate(
            ids, mask, pixel_values=pixels, max_new_tokens=4
        )
    assert controlled.tolist() == paused.tolist()
