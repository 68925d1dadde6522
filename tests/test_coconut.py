"""Coconut's cached multi-pass forward and generate against a naive reference that recomputes everything, on the
tiny model of every family (InternVL, GPT-2, Qwen2).

The reference fills one latent column at a time by running the base model's own forward (its own image
merging, no cache) over the whole sequence, so any error in segmenting, caching, positions or image placement
shows up as a mismatch in logits, loss, gradients or generated tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LAYOUTS,
    build_batch,
    has_vision,
    image_block,
    make_coconut,
    plain_hidden,
    reference_logits,
    shifted_loss,
)

from coconut import positions_from_mask


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_reference(any_base, layout):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS[layout])

    out = model(ids, mask, labels=labels, pixel_values=pixels)
    grads = torch.autograd.grad(out.loss, list(base.parameters()), allow_unused=True)
    ref = reference_logits(base, ids, mask, pixels, model.latent_token_id)
    ref_loss = shifted_loss(ref, labels)
    ref_grads = torch.autograd.grad(ref_loss, list(base.parameters()), allow_unused=True)

    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-9, atol=1e-9)
    checked = 0
    for (name, _), g, r in zip(base.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            # parts of the vision tower take a float32 softmax even in float64: compare at that precision
            assert (g - r).abs().max() <= 1e-6 * r.abs().max(), name
            checked += 1
    unused = 0
    if pixels is None and has_vision(base):
        unused = len(list(base.model.vision_tower.parameters())) + len(
            list(base.model.multi_modal_projector.parameters())
        )
    assert checked == len(list(base.parameters())) - unused


def test_example_losses_match_per_row_losses_of_the_reference(any_base):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
    labels[1] = -100  # a row without labels counts 0
    with torch.no_grad():
        losses = model(ids, mask, labels=labels, pixel_values=pixels).example_losses()
        ref = reference_logits(base, ids, mask, pixels, model.latent_token_id)
    expected = [shifted_loss(ref[i : i + 1], labels[i : i + 1]) for i in (0, 2)]
    torch.testing.assert_close(losses, torch.stack([expected[0], torch.zeros_like(expected[0]), expected[1]]))
    with pytest.raises(ValueError, match="needs the labels"):
        model(ids, mask, pixel_values=pixels).example_losses()


def test_no_latents_equals_the_plain_model(any_base):
    """Without latents Coconut is exactly the base model's own forward (image features placed as InternVL does)."""
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["no_latents_several_tiles"])
    out = model(ids, mask, labels=labels, pixel_values=pixels)
    images = {"pixel_values": pixels} if has_vision(base) else {}
    plain = base(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **images)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], plain.logits[real], rtol=1e-10, atol=1e-10)


def test_thoughts_are_previous_hidden_states(any_base):
    """`inputs_embeds` holds, at each latent, the final hidden state of the column before it."""
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
    out = model(ids, mask, pixel_values=pixels)
    hidden = plain_hidden(base, out.inputs_embeds, mask, positions_from_mask(mask))
    rows, cols = torch.nonzero(ids == model.latent_token_id, as_tuple=True)
    assert len(rows) == 7
    torch.testing.assert_close(out.inputs_embeds[rows, cols], hidden[rows, cols - 1], rtol=1e-9, atol=1e-9)


def test_gradients_reach_vision_projector_and_language_model(tiny_base):
    base, tokenizer = tiny_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["aligned"])
    base.zero_grad()
    model(ids, mask, labels=labels, pixel_values=pixels).loss.backward()
    for part in (base.model.vision_tower, base.model.multi_modal_projector, base.model.language_model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.requires_grad)
    base.zero_grad()


def test_passes_one_per_latent_column_plus_one(any_base):
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_left_pad"])
    calls = []
    handle = model.decoder.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    with torch.no_grad():
        model(ids, mask, pixel_values=pixels)
    handle.remove()
    columns = torch.unique(torch.nonzero(ids == model.latent_token_id)[:, 1])
    assert len(calls) == len(columns) + 1


def reference_generate(base, ids, mask, pixels, latent_id, eos, max_new_tokens):
    """Greedy decoding for one unpadded row by recomputing the whole sequence for every new token."""
    for _ in range(max_new_tokens):
        logits = reference_logits(base, ids, mask, pixels, latent_id)
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        if token.item() == eos:
            break
    return ids[0].tolist()


def test_generate_left_padded_batch_matches_each_row_alone(any_base):
    base, tokenizer = any_base
    rows = [(1, 3, 2, 2), (0, 9, 4, 1), (2, 2, 0, 3)]
    ids, mask, pixels, _ = build_batch(base, tokenizer, rows, [True, True, True])
    latent_id = make_coconut(base, tokenizer).latent_token_id
    new = 6
    tile = image_block(base, tokenizer, 1)[1] if has_vision(base) else -1
    with torch.no_grad():
        alone, first_tile = [], 0
        for i, (n_tiles, *_rest) in enumerate(rows):
            n_tiles = n_tiles if has_vision(base) else 0  # as build_batch reads the rows
            keep = mask[i].bool()
            row_pixels = pixels[first_tile : first_tile + n_tiles] if n_tiles else None
            first_tile += n_tiles
            assert (ids[i] == tile).sum() == n_tiles * 16
            alone.append(
                reference_generate(base, ids[i : i + 1, keep], mask[i : i + 1, keep], row_pixels, latent_id, -1, new)
            )
        # make the first row stop early: EOS is the token it generates third
        eos = alone[0][-new + 2]
        model = make_coconut(base, tokenizer, eos_token_id=eos)
        out = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=new)
    assert out.shape == (3, ids.shape[1] + new)
    for i in range(3):
        expected = alone[i][len(alone[i]) - new :]
        if eos in expected:
            stop = expected.index(eos)
            expected = expected[: stop + 1] + [eos] * (new - stop - 1)
        assert out[i, -new:].tolist() == expected, i
        assert out[i, : ids.shape[1]].tolist() == ids[i].tolist()
    assert out[0, -new:].tolist()[2:] == [eos] * (new - 2)


def test_generate_uses_the_cache(any_base):
    """Each new token is one decoder call on one column: the prefix is never recomputed."""
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer, eos_token_id=-1)
    ids, mask, pixels, _ = build_batch(base, tokenizer, [(1, 3, 2, 2), (0, 5, 0, 1)], [True, True])
    widths = []
    handle = model.decoder.register_forward_hook(
        lambda m, args, kwargs, out: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    model.generate(ids, mask, pixel_values=pixels, max_new_tokens=5)
    handle.remove()
    assert sum(widths[:-4]) == ids.shape[1] and widths[-4:] == [1, 1, 1, 1]


def test_generate_moves_right_padding_to_the_left(any_base):
    """Prompts padded on the right, as the original Coconut's collator pads them, give the tokens their left-padded
    copies give, and come back left-padded."""
    base, tokenizer = any_base
    rows = [(1, 3, 2, 2), (0, 9, 4, 1), (2, 2, 0, 3)]
    left = build_batch(base, tokenizer, rows, [True, True, True])
    right = build_batch(base, tokenizer, rows, [False, False, False])
    assert not right[1][:, -1].all()  # some row really ends in padding
    model = make_coconut(base, tokenizer, eos_token_id=-1)
    expected = model.generate(left[0], left[1], pixel_values=left[2], max_new_tokens=4)
    assert torch.equal(model.generate(right[0], right[1], pixel_values=right[2], max_new_tokens=4), expected)


def test_the_original_positional_call_fails_loudly(tiny_base):
    """`model(ids, mask, labels, position_ids)`, the original Coconut's order, must not pass positions as pixels."""
    base, tokenizer = tiny_base
    model = make_coconut(base, tokenizer)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["aligned"])
    with pytest.raises(TypeError, match="positional"):
        model(ids, mask, labels, positions_from_mask(mask))
    with pytest.raises(TypeError, match="positional"):
        model.generate(ids, mask, pixels)
