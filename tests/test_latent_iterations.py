"""`latent_iterations`: the thoughts by Jacobi iteration, on the tiny model of every family (InternVL, GPT-2, Qwen2).

Two references: the cache-free Jacobi reference (conftest.reference_logits with `iterations`), which reruns the
whole sequence without a cache for every iteration, and the sequential loop (latent_iterations 0), which a row of n
thoughts must match exactly, gradients included, from n iterations (rounds of feedback) on, and must not match
below.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import LAYOUTS, build_batch, has_vision, make_coconut, reference_logits, shifted_loss, tiny

from coconut import LATENT_TOKENS


def thought_counts(ids: torch.Tensor, latent_id: int) -> list[int]:
    """Each row's number of thoughts."""
    return (ids == latent_id).sum(1).tolist()


def bound(ids: torch.Tensor, latent_id: int) -> int:
    """The fewest iterations at which every row's thoughts are exact: its most thoughts (at least 1, so that a batch
    without thoughts still takes the iterated path)."""
    return max(*thought_counts(ids, latent_id), 1)


def step_ids_for(ids: torch.Tensor, latent_id: int) -> torch.Tensor:
    """Step supervision for c_thought 1: row r's thought g stands for a two-token step (g + 5, r + 9)."""
    counts = thought_counts(ids, latent_id)
    steps = torch.full((len(counts), max(max(counts), 1), 2), -100)
    for row, n in enumerate(counts):
        for group in range(n):
            steps[row, group] = torch.tensor([group + 5, row + 9])
    return steps


@pytest.mark.parametrize("iterations", [1, 2, "bound"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iterations_match_the_cache_free_jacobi_reference(any_base, layout, iterations):
    base, tokenizer = any_base
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS[layout])
    latent_id = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    iterations = bound(ids, latent_id) if iterations == "bound" else iterations
    model = make_coconut(base, tokenizer, latent_iterations=iterations)
    with torch.no_grad():
        out = model(ids, mask, labels=labels, pixel_values=pixels)
        ref = reference_logits(base, ids, mask, pixels, latent_id, iterations=iterations)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, shifted_loss(ref, labels), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "layout, mode",
    [(layout, "hidden") for layout in LAYOUTS]
    + [("misaligned_right_pad", "rescaled"), ("misaligned_left_pad", "projected")],
)
def test_iterations_at_the_bound_equal_the_sequential_loop(any_base, layout, mode):
    """Logits, loss, step loss, the thoughts and every parameter's gradient (projection included)."""
    base, tokenizer = any_base
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS[layout])
    sequential = make_coconut(base, tokenizer, thought_feedback=mode)
    steps = step_ids_for(ids, sequential.latent_token_id)
    iterated = make_coconut(
        base, tokenizer, thought_feedback=mode, latent_iterations=bound(ids, sequential.latent_token_id)
    )
    results = []
    for model in (sequential, iterated):
        out = model(ids, mask, labels=labels, pixel_values=pixels, step_ids=steps)
        params = list(model.parameters())
        grads = torch.autograd.grad(out.loss + out.thought_loss, params, allow_unused=True)
        results.append((out, dict(zip([name for name, _ in model.named_parameters()], grads))))
    (seq, seq_grads), (it, it_grads) = results
    real, latent = mask.bool(), ids == sequential.latent_token_id
    torch.testing.assert_close(it.logits[real], seq.logits[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(it.loss, seq.loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(it.thought_loss, seq.thought_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(it.inputs_embeds[latent], seq.inputs_embeds[latent], rtol=1e-9, atol=1e-9)
    assert seq_grads.keys() == it_grads.keys()
    checked = 0
    for name, g in it_grads.items():
        r = seq_grads[name]
        assert (g is None) == (r is None), name
        if g is not None:
            # parts of the vision tower take a float32 softmax even in float64: compare at that precision
            assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp(min=1e-30), name
            checked += 1
    assert checked >= len(list(sequential.decoder.parameters()))
    if mode == "projected" and latent.any():
        assert all(it_grads[name].abs().sum() > 0 for name in it_grads if name.startswith("projection."))


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
def test_a_row_is_exact_from_as_many_iterations_as_thoughts_and_only_then(any_base, iterations):
    """Rows of 2, 4 and 1 thoughts: each equals the sequential loop exactly when iterations >= its thoughts,
    and differs below (no silent fallback to the sequential loop); the loss is exact only when every row is."""
    base, tokenizer = any_base
    ids, mask, pixels, labels = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
    with torch.no_grad():
        seq = make_coconut(base, tokenizer)(ids, mask, labels=labels, pixel_values=pixels)
        it = make_coconut(base, tokenizer, latent_iterations=iterations)(ids, mask, labels=labels, pixel_values=pixels)
    counts = thought_counts(ids, make_coconut(base, tokenizer).latent_token_id)
    assert counts == [2, 4, 1]
    for row, n in enumerate(counts):
        real = mask[row].bool()
        gap = (it.logits[row, real] - seq.logits[row, real]).abs().max()
        assert (gap <= 1e-9) == (iterations >= n), (row, float(gap))
    assert bool(torch.isclose(it.loss, seq.loss, rtol=1e-9, atol=1e-12)) == (iterations >= 4)


def test_one_prefix_pass_then_the_iterations_over_the_block(any_base):
    """2 + T decoder calls: the columns before the batch's first latent once, then from there to the end T + 1
    times; without latents, one pass as the sequential loop."""
    base, tokenizer = any_base
    model = make_coconut(base, tokenizer, latent_iterations=3)
    widths = []
    handle = model.decoder.register_forward_hook(
        lambda m, args, kwargs, out: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
            model(ids, mask, pixel_values=pixels)
            first = int(torch.nonzero((ids == model.latent_token_id).any(0))[0])
            assert widths == [first] + [ids.shape[1] - first] * (3 + 1)
            widths.clear()
            ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["no_latents_several_tiles"])
            model(ids, mask, pixel_values=pixels)
            assert widths == [ids.shape[1]]
    finally:
        handle.remove()


@pytest.mark.parametrize("control", ["zeros", "noise"])
def test_controls_replace_every_pass_thoughts(any_base, control):
    """zeros: the Jacobi reference with a zero map; noise: each thought has the norm of what it replaced."""
    base, tokenizer = any_base
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_right_pad"])
    model = make_coconut(base, tokenizer, latent_iterations=3)
    latent = ids == model.latent_token_id
    with torch.no_grad():
        out = model(ids, mask, pixel_values=pixels, thoughts=control)
        own = model(ids, mask, pixel_values=pixels).inputs_embeds[latent]
        if control == "zeros":
            ref = reference_logits(base, ids, mask, pixels, model.latent_token_id, torch.zeros_like, iterations=3)
            torch.testing.assert_close(out.logits[mask.bool()], ref[mask.bool()], rtol=1e-9, atol=1e-9)
            assert out.inputs_embeds[latent].abs().max() == 0
            return
    # each row's first thought is fed from a state no thought precedes, the same in every pass from the second on:
    # its noise has the norm of the model's own first thought
    first = latent & ~torch.cat([torch.zeros_like(latent[:, :1]), latent[:, :-1]], 1)
    torch.testing.assert_close(out.inputs_embeds[first].norm(dim=-1), own[first[latent]].norm(dim=-1))
    assert torch.nn.functional.cosine_similarity(out.inputs_embeds[latent], own).abs().max() < 0.5


@pytest.mark.parametrize("how", ["pause control", "none feedback"])
def test_nothing_fed_back_makes_the_iterations_irrelevant(any_base, how):
    """Under the pause control or `none` feedback the latents are ordinary tokens: one pass, whatever k."""
    base, tokenizer = any_base
    ids, mask, pixels, _ = build_batch(base, tokenizer, *LAYOUTS["misaligned_left_pad"])
    feedback, control = ("hidden", "pause") if how == "pause control" else ("none", "model")
    calls = []
    with torch.no_grad():
        plain = make_coconut(base, tokenizer, thought_feedback=feedback)(
            ids, mask, pixel_values=pixels, thoughts=control
        )
        model = make_coconut(base, tokenizer, thought_feedback=feedback, latent_iterations=4)
        handle = model.decoder.register_forward_hook(lambda *_: calls.append(1))
        out = model(ids, mask, pixel_values=pixels, thoughts=control)
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)


ROWS = [(1, 3, 2, 2), (0, 9, 4, 1), (2, 2, 0, 3)]  # thoughts 2, 4, 0; tiles 1, 0, 2


@pytest.mark.parametrize("iterations", [1, 4])
def test_generate_batched_equals_each_row_alone(any_base, iterations):
    """A row's answer does not depend on its batch, below the bound too: every latent starts from its own embedding
    wherever the batch's first latent column lies."""
    base, tokenizer = any_base
    ids, mask, pixels, _ = build_batch(base, tokenizer, ROWS, [True, True, True])
    model = make_coconut(base, tokenizer, eos_token_id=-1, latent_iterations=iterations)
    new = 6
    batched = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=new)
    first_tile = 0
    for i, (n_tiles, *_rest) in enumerate(ROWS):
        n_tiles = n_tiles if has_vision(base) else 0
        keep = mask[i].bool()
        row_pixels = pixels[first_tile : first_tile + n_tiles] if n_tiles else None
        first_tile += n_tiles
        alone = model.generate(ids[i : i + 1, keep], mask[i : i + 1, keep], pixel_values=row_pixels, max_new_tokens=new)
        assert batched[i, -new:].tolist() == alone[0, -new:].tolist(), i


def test_generate_at_the_bound_equals_sequential_generation(any_base):
    """The cache keeps the last pass's keys and values: every token after the first is the sequential loop's too."""
    base, tokenizer = any_base
    ids, mask, pixels, _ = build_batch(base, tokenizer, ROWS, [True, False, True])
    expected = make_coconut(base, tokenizer, eos_token_id=-1).generate(ids, mask, pixel_values=pixels, max_new_tokens=6)
    model = make_coconut(base, tokenizer, eos_token_id=-1, latent_iterations=4)
    calls = []
    handle = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    out = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=6)
    handle.remove()
    assert out.tolist() == expected.tolist()
    assert len(calls) == 1 + (4 + 1) + 5  # the prefix, the block passes (the last gives the first token), 5 tokens


def _count_calls_on_two_ranks(rank: int, port: int, latents: list[int], folder: str) -> None:
    """One rank of a two-process gloo job: a batch with `latents[rank]` thoughts per row through a latent-iterations
    model; saves (decoder calls, logits) to `folder`/<rank>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        base, tokenizer = tiny("tiny-gpt2")
        ids, mask, _, _ = build_batch(base, tokenizer, [(0, 5, latents[rank], 4), (0, 3, latents[rank], 6)], [0, 0])
        model = make_coconut(base, tokenizer, latent_iterations=3)
        calls = []
        model.decoder.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            logits = model(ids, mask).logits
        torch.save((len(calls), logits), os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("latents, calls", [([2, 0], 2 + 3), ([0, 0], 1)])
def test_every_rank_makes_the_same_decoder_calls(tmp_path, latents, calls):
    """A rank without latents still makes 2 + T calls when another rank has some (values unchanged), and both make
    one when neither has any: sharded layers gather their weights on every call."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.start_processes(_count_calls_on_two_ranks, args=(port, latents, str(tmp_path)), nprocs=2, start_method="spawn")
    results = {rank: torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)}
    assert [results[rank][0] for rank in (0, 1)] == [calls, calls]
    base, tokenizer = tiny("tiny-gpt2")
    for rank in (0, 1):
        ids, mask, _, _ = build_batch(base, tokenizer, [(0, 5, latents[rank], 4), (0, 3, latents[rank], 6)], [0, 0])
        with torch.no_grad():
            alone = make_coconut(base, tokenizer, latent_iterations=3)(ids, mask).logits
        real = mask.bool()
        torch.testing.assert_close(results[rank][1][real], alone[real], rtol=1e-9, atol=1e-9)
