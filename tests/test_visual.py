"""Visual latents (`visual_latents` K > 0) against a cache-free reference on the tiny InternVL.

The reference (conftest.reference_visual_logits) fills one latent column at a time by recomputing the whole
sequence with the base model's own forward, and chooses each thought's patches from the eager attention weights of
another full forward (`output_attentions`): an implementation independent of the model's cache, segmenting, query
recomputation and top-K. Rows differ in tile counts, padding side and thought layout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_batch, make_coconut, plain_hidden, reference_visual_logits, shifted_loss

from coconut import VISUAL_TOKEN, positions_from_mask

VISUAL_LAYOUTS = {
    "right_pad": ([(2, 5, 3, 4), (1, 5, 3, 6)], [False, False]),
    "left_pad": ([(1, 3, 2, 8), (3, 9, 4, 2), (2, 2, 1, 4)], [True, True, True]),
    "mixed_padding_one_row_without_image": ([(1, 4, 2, 3), (2, 6, 3, 2), (0, 3, 1, 4)], [True, False, True]),
}


def chosen_of(out, ids, latent_id):
    """{(row, latent column): (image-token indices, weights)} from a forward's `patches` and `patch_weights`."""
    chosen = {}
    for row, col in torch.nonzero(ids == latent_id).tolist():
        picked = out.patches[row, col]
        if (picked >= 0).all():
            chosen[row, col] = (picked.tolist(), out.patch_weights[row, col].tolist())
        else:
            assert (picked == -1).all()
    return chosen


@pytest.mark.parametrize(
    ("layout", "k"), [("right_pad", 3), ("left_pad", 2), ("mixed_padding_one_row_without_image", 2)]
)
def test_forward_matches_the_reference(visual_base, layout, k):
    base, tokenizer, eager = visual_base
    model = make_coconut(base, tokenizer, visual_latents=k)
    ids, mask, pixels, labels = build_batch(base, tokenizer, *VISUAL_LAYOUTS[layout], visual=k)
    params = list(base.parameters())
    out = model(ids, mask, labels=labels, pixel_values=pixels)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    ref, ref_chosen = reference_visual_logits(
        base, eager, ids, mask, pixels, model.latent_token_id, visual_id, k, lambda h: h
    )
    ref_loss = shifted_loss(ref, labels)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)

    chosen = chosen_of(out, ids, model.latent_token_id)
    assert chosen.keys() == ref_chosen.keys() and len(chosen) > 0
    for key, (picked, weights) in chosen.items():
        assert picked == ref_chosen[key][0], key
        # eager attention takes its softmax in float32
        torch.testing.assert_close(torch.tensor(weights), torch.tensor(ref_chosen[key][1]).float(), atol=1e-6, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-9, atol=1e-9)
    for (name, _), g, r in zip(base.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp(min=1e-30), name
    assert all(g is not None for g in grads)  # the vision tower's too: the patches' values carry its gradient


def test_patches_hold_the_chosen_features_and_thoughts_the_previous_thought(visual_base):
    base, tokenizer, _ = visual_base
    k = 2
    model = make_coconut(base, tokenizer, visual_latents=k)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *VISUAL_LAYOUTS["left_pad"], visual=k)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=pixels)
        features = model.embed(ids, pixels)
        hidden = plain_hidden(base, out.inputs_embeds, mask, positions_from_mask(mask))
    image = ids == base.config.image_token_id
    for row, col in torch.nonzero(ids == model.latent_token_id).tolist():
        columns = torch.nonzero(image[row]).flatten()
        for i, index in enumerate(out.patches[row, col].tolist()):
            assert torch.equal(out.inputs_embeds[row, col + 1 + i], features[row, columns[index]])
        source = col - 1 if ids[row, col - 1] != model.visual_token_id else col - 1 - k
        assert ids[row, source] != model.visual_token_id
        torch.testing.assert_close(out.inputs_embeds[row, col], hidden[row, source], rtol=1e-9, atol=1e-9)


def test_one_pass_per_thought_and_one_for_the_last_patches(visual_base):
    base, tokenizer, _ = visual_base
    model = make_coconut(base, tokenizer, visual_latents=2)
    ids, mask, pixels, _ = build_batch(base, tokenizer, [(1, 4, 3, 2), (2, 4, 3, 5)], [False, False], visual=2)
    # right padding after image blocks of different lengths: align the first thoughts as the collator does
    calls = []
    handle = model.decoder.register_forward_hook(lambda m, args, out: calls.append(1))
    with torch.no_grad():
        model(ids[:1], mask[:1], pixel_values=pixels[:1])
    handle.remove()
    assert len(calls) == 1 + 3 + 1 == 1 + model.thought_passes(3)


def test_generate_left_padded_batch_matches_each_row_alone(visual_base):
    base, tokenizer, _ = visual_base
    rows = [(1, 3, 2, 2), (3, 9, 3, 1), (2, 2, 0, 3), (0, 4, 2, 1)]
    ids, mask, pixels, _ = build_batch(base, tokenizer, rows, [True] * 4, visual=2)
    model = make_coconut(base, tokenizer, eos_token_id=-1, visual_latents=2)
    new = 5
    with torch.no_grad():
        batched = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=new)
        first_tile = 0
        for i, (n_tiles, *_rest) in enumerate(rows):
            keep = mask[i].bool()
            row_pixels = pixels[first_tile : first_tile + n_tiles] if n_tiles else None
            first_tile += n_tiles
            alone = model.generate(ids[i : i + 1, keep], mask[i : i + 1, keep], pixel_values=row_pixels,
                                   max_new_tokens=new)  # fmt: skip
            assert batched[i, -new:].tolist() == alone[0, -new:].tolist(), i


@pytest.mark.parametrize("control", ["zeros", "pause"])
def test_controls_replace_the_thoughts_and_keep_choosing_by_attention(visual_base, control):
    base, tokenizer, eager = visual_base
    model = make_coconut(base, tokenizer, visual_latents=2)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *VISUAL_LAYOUTS["left_pad"], visual=2)
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=pixels, thoughts=control)
        table = base.get_input_embeddings().weight
        feed = {"zeros": torch.zeros_like, "pause": lambda h: table[model.latent_token_id]}[control]
        ref, ref_chosen = reference_visual_logits(
            base, eager, ids, mask, pixels, model.latent_token_id, visual_id, 2, feed
        )
    assert {key: value[0] for key, value in chosen_of(out, ids, model.latent_token_id).items()} == {
        key: value[0] for key, value in ref_chosen.items()
    }
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)


def test_random_patches_are_seeded_and_differ_from_the_chosen(visual_base):
    base, tokenizer, _ = visual_base
    model = make_coconut(base, tokenizer, visual_latents=3)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *VISUAL_LAYOUTS["right_pad"], visual=3)
    with torch.no_grad():
        own = model(ids, mask, pixel_values=pixels)
        first = model(ids, mask, pixel_values=pixels, thoughts="random_patches")
        again = model(ids, mask, pixel_values=pixels, thoughts="random_patches")
    assert torch.equal(first.patches, again.patches) and torch.equal(first.logits, again.logits)
    assert not torch.equal(first.patches, own.patches)
    latent = ids == model.latent_token_id
    image_tokens = (ids == base.config.image_token_id).sum(1)
    picked = first.patches[latent]
    assert (picked >= 0).all() and (picked < image_tokens.repeat_interleave(latent.sum(1))[:, None]).all()
    assert (picked.diff(dim=-1) > 0).all()  # k distinct positions, in image order


def test_a_misplaced_visual_token_is_refused(visual_base):
    base, tokenizer, _ = visual_base
    model = make_coconut(base, tokenizer, visual_latents=2)
    ids, mask, pixels, _ = build_batch(base, tokenizer, [(1, 3, 2, 4)], [False], visual=1)
    with pytest.raises(ValueError, match="followed by exactly 2"):
        model(ids, mask, pixel_values=pixels)
