"""Visual latents (`visual_latents` K > 0) against a cache-free reference on the tiny InternVL.

The reference (conftest.reference_visual_logits) fills one latent column at a time by recomputing the whole
sequence with the base model's own forward, and chooses each thought's patches from the eager attention weights of
another full forward (`output_attentions`): an implementation independent of the model's cache, segmenting, query
recomputation and top-K. Rows differ in tile counts, padding side and thought layout.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import build_batch, make_coconut, plain_hidden, reference_visual_logits, shifted_loss
from PIL import Image

import demo_data
import infer
import inference
import patch_cells
import prefill
from checkpoint import export_pretrained
from coconut import positions_from_mask
from config import Config
from dataset import CoconutDataset, collate, longest_sequence
from images import Vision, draw_patches, patch_box
from models import build_model, encoding_for, load_base
from models.internvl import IMAGE_BLOCK
from patches import VISUAL_TOKEN
from utils import UserError

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


def test_passes_split_to_match_another_ranks_count_change_nothing(visual_base, monkeypatch):
    """A rank whose batch needs fewer passes than another rank's splits its longest passes further
    (`prefill.segments`); with enough of them, passes start inside a thought's patches and hold no thought, and a
    thought's source is no longer the pass before its own: the same logits, patches and weights."""
    base, tokenizer, _ = visual_base
    model = make_coconut(base, tokenizer, visual_latents=2)
    ids, mask, pixels, _ = build_batch(base, tokenizer, *VISUAL_LAYOUTS["right_pad"], visual=2)
    calls = []
    handle = model.decoder.register_forward_hook(lambda m, args, out: calls.append(1))
    with torch.no_grad():
        alone = model(ids, mask, pixel_values=pixels)
        own = len(calls)
        # a 2-rank job whose other rank runs 32 passes more (the collective's MAX, answered here): every pass of
        # this 54-column batch then spans 1 or 2 columns
        monkeypatch.setattr(prefill, "is_distributed", lambda: True)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda passes, op: passes.add_(32))
        split = model(ids, mask, pixel_values=pixels)
    handle.remove()
    assert len(calls) - own == own + 32
    real = mask.bool()
    torch.testing.assert_close(split.logits[real], alone.logits[real], rtol=1e-9, atol=1e-9)
    assert torch.equal(split.patches, alone.patches) and (alone.patches >= 0).any()
    torch.testing.assert_close(split.patch_weights, alone.patch_weights, rtol=1e-6, atol=1e-9)


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


def test_visual_latents_refuse_latent_iterations(visual_base):
    base, tokenizer, _ = visual_base
    with pytest.raises(ValueError, match="latent_iterations and visual_latents cannot be combined; set one of them"):
        make_coconut(base, tokenizer, latent_iterations=2, visual_latents=2)


def visual_config(**keys) -> Config:
    return Config(**({"coconut": True, "c_thought": 2, "max_latent_stage": 2, "visual_latents": 2} | keys))


def test_sequences_reserve_the_patch_positions_and_step_loss_reads_the_thoughts(visual_base, data_dir):
    base, tokenizer, _ = visual_base
    config = visual_config(thought_loss_weight=1.0)
    data = CoconutDataset.from_file(str(data_dir / "train.jsonl"), encoding_for(base, tokenizer, config), True)
    data.set_stage(2)
    latent, patch = tokenizer.convert_tokens_to_ids(["<|latent|>", VISUAL_TOKEN])
    item = data[0]
    text = tokenizer.decode(item["input_ids"])
    assert "<|start-latent|>" + "<|latent|><|latent-image|><|latent-image|>" * 4 + "<|end-latent|>" in text
    labelled = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
    assert latent not in labelled and patch not in labelled
    lengths = []
    for stage in range(3):
        data.set_stage(stage)
        lengths.append(len(data[0]["input_ids"]))
    assert longest_sequence(data.tokens[0], config) == max(lengths)
    assert lengths[2] - lengths[1] == 2 * 3 - len(data.tokens[0].steps[1])  # 2 more latents, each with 2 patches
    data.set_stage(2)
    batch = collate([data[i] for i in range(3)], data.pad_id, data.latent_id)
    prompts = data.prompts()
    assert prompts[0]["input_ids"] == item["input_ids"][: len(prompts[0]["input_ids"])]
    model = make_coconut(base, tokenizer, visual_latents=2)
    out = model(**batch)
    thoughts = out.inputs_embeds[batch["input_ids"] == latent]
    assert len(thoughts) == 3 * 4
    per_row = (batch["input_ids"] == latent).sum(1).tolist()
    expected = model.step_loss(thoughts, per_row, batch["step_ids"], 2)
    torch.testing.assert_close(out.thought_loss, expected, rtol=0, atol=0)


def test_a_text_model_refuses_visual_latents():
    with pytest.raises(UserError, match="visual_latents 2 looks at the image again, but tiny-gpt2 is a text model"):
        build_model(visual_config(model_id="tiny-gpt2"))


def test_patch_box_maps_tokens_to_tiles_cells_and_the_thumbnail():
    vision = Vision(64, 16, *IMAGE_BLOCK)  # 4 x 4 cells per tile
    # a 2 x 1 grid of tiles (128 x 64) plus its thumbnail: token 16 + 5 is tile 1, cell row 1, col 1
    assert patch_box(16 + 5, 128, 64, vision, 2) == (80.0, 16.0, 96.0, 32.0)
    assert patch_box(2 * 16 + 5, 128, 64, vision, 2) == (32.0, 16.0, 64.0, 32.0)  # the thumbnail's coarser cell
    drawn = np.asarray(draw_patches(Image.new("RGB", (128, 64)), [[3], [16 + 5]], vision, 2))
    assert drawn[0:16, 48:64].any() and drawn[16:32, 80:96].any()  # the chosen cells' outlines
    assert not drawn[40:64, 0:40].any()  # a cell nobody chose stays as it was


@pytest.fixture(scope="module")
def exported_visual(tmp_path_factory):
    """A random tiny visual-latent model (K = 2, stage 2) exported as run.py exports, and six demo records."""
    root = tmp_path_factory.mktemp("visual")
    demo_data.generate(str(root / "data"), sizes={"test": 6})
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny", visual=True)
    config = visual_config(c_thought=1, max_new_tokens=4, max_num_tiles=1, eval_batch_size=3)
    model = make_coconut(base, tokenizer, visual_latents=2)
    export_pretrained(model, tokenizer, root / "visual", {"config": dataclasses.asdict(config), "stage": 2})
    return root


def test_infer_probe_reports_and_draws_the_chosen_patches(exported_visual, capsys):
    records, out = exported_visual / "data" / "test.jsonl", exported_visual / "eval"
    infer.main([str(exported_visual / "visual"), "--records", str(records), "--probe", "2", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["passes"] == 2 + 1 + evaluation["gen_tokens"]  # a pass per thought, one for the last patches
    exported = inference.load_exported(str(exported_visual / "visual"), torch.device("cpu"))
    assert exported.model.visual_latents == 2
    prompts = inference.open_prompts(exported, str(records), 2)
    for index, row in enumerate(rows):
        assert len(row["patches"]) == 2 and all(len(p) == 2 for p in row["patches"])
        (png,) = row["patch_images"]
        with Image.open(png) as image:
            drawn = np.asarray(image.convert("RGB")).astype(int)
        with Image.open(prompts.tokens[index].images[0]) as image:
            size = image.size
            plain = np.asarray(draw_patches(image, [], prompts.encoding.vision, 1)).astype(int)
        changed = np.abs(drawn - plain).sum(-1) > 0
        boxes = [patch_box(i, *size, prompts.encoding.vision, 1) for p in row["patches"] for i in p]
        inside = np.zeros_like(changed)
        for left, top, right, bottom in boxes:
            inside[int(top) : int(bottom) + 1, int(left) : int(right) + 1] = True
        assert changed.any() and not (changed & ~inside).any(), index  # drawn only on the chosen cells

    infer.main([str(exported_visual / "visual"), "--question", "start 2,1; 3 moves", "--probe", "2",
                "--image", str(prompts.tokens[0].images[0])])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[-4:]] == ["thought 1", "thought 1 looked at", "thought 2",
                                                         "thought 2 looked at"]  # fmt: skip
    assert lines[-1].count("tile 0 cell") == 2


def test_random_patches_need_a_visual_latent_model(exported_visual, tmp_path):
    records = exported_visual / "data" / "test.jsonl"
    folder = tmp_path / "plain"
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny")
    config = dataclasses.asdict(visual_config(visual_latents=0, max_new_tokens=2))
    export_pretrained(make_coconut(base, tokenizer), tokenizer, folder, {"config": config, "stage": 1})
    with pytest.raises(UserError, match="random_patches needs a model trained with visual_latents"):
        infer.main.__wrapped__([str(folder), "--records", str(records), "--thoughts", "random_patches"])


def test_patch_cells_counts_the_cells_the_probe_chose(exported_visual, tmp_path):
    """tools/patch_cells.py against infer.py's probe: the tiny model sees one 16-px grid cell per image token."""
    records = str(exported_visual / "data" / "test.jsonl")
    run = tmp_path / "runs" / "k2" / "seed0"
    run.mkdir(parents=True)
    (run / "final").symlink_to(exported_visual / "visual")
    patch_cells.main([str(tmp_path / "runs"), "--records", records])
    infer.main([str(run / "final"), "--records", records, "--probe", "1", "--out", str(tmp_path / "eval")])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    steps = [demo_data.step_cells(record) for record in map(json.loads, open(records))]
    counted = json.loads((run / "test-probe" / "cells.json").read_text())
    assert counted["visual_latents"] == 2 and len(counted["thoughts"]) == 2  # c_thought 1, stage 2
    for thought, result in enumerate(counted["thoughts"]):
        assert result["n"] == len(rows) == 6 and result["chance"] == pytest.approx(6 * 2 / 16)
        assert result["reads"] == sum(cells[thought][0] in row["patches"][thought] for row, cells in zip(rows, steps))
        assert result["leads_to"] == sum(
            cells[thought][1] in row["patches"][thought] for row, cells in zip(rows, steps)
        )
    table = (tmp_path / "runs" / "patch_cells.md").read_text().splitlines()
    assert table[2].startswith("| variant | patches | thought | seeds | records |") and len(table) == 6
    with pytest.raises(UserError, match="delete it to probe again"):
        patch_cells.main.__wrapped__([str(tmp_path / "runs"), "--records", str(exported_visual / "other.jsonl")])
