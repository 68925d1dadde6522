"""Records, InternVL tiling, the stage layout, labels and the collator, on the tiny tokenizer and model."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from conftest import make_coconut, tiny
from PIL import Image

import dataset
from coconut import LATENT_TOKENS
from config import Config
from curriculum import Schedule, stage_plan
from dataset import CoconutDataset, Encoding, collate, longest_sequence
from images import Vision, num_tiles, tile_grid, tile_image
from models import encoding_for
from models.internvl import IMAGE_BLOCK
from records import load_records, record_problem
from scoring import is_correct
from utils import UserError
from validate import find_problems


@pytest.mark.parametrize(
    "size, grid",
    [((800, 600), (4, 3)), ((1920, 1080), (4, 2)), ((300, 1200), (1, 4)), ((448, 448), (1, 1)), ((1000, 1000), (3, 3))],
)
def test_tile_grid_follows_internvl_rule(size, grid):
    # worked by hand from InternVL's rule: closest aspect ratio, ties to the larger grid only for big images
    assert tile_grid(*size, 448, 12) == grid


def test_tiles_cut_row_by_row_with_thumbnail():
    image = np.zeros((128, 192, 3), dtype=np.uint8)  # 3 x 2 grid of 64-px tiles, each a different grey
    for r in range(2):
        for c in range(3):
            image[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64] = 10 * (r * 3 + c + 1)
    tiles = tile_image(Image.fromarray(image), 64, 6, use_thumbnail=True)
    assert tiles.shape == (7, 64, 64, 3)
    assert [int(t[32, 32, 0]) for t in tiles[:6]] == [10, 20, 30, 40, 50, 60]
    assert num_tiles(192, 128, 64, 6, True) == 7 and num_tiles(64, 64, 64, 6, True) == 1
    assert len(tile_image(Image.fromarray(image), 64, 6, use_thumbnail=False)) == 6


def write_data(tmp_path, records, sizes=((64, 64),)):
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (k * 40, 100, 200)).save(tmp_path / f"img{k}.png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


RECORDS = [
    {"id": "a", "image": "img0.png", "question": "Q one?", "steps": ["s1", "s2", "s3"], "answer": "7"},
    {"id": "b", "image": ["img0.png", "img1.png"], "question": "Q two?", "steps": ["t1"], "answer": "x"},
    {"id": "c", "image": None, "question": "Q three?", "steps": ["u1", "u2"], "answer": "yes"},
]


def make_dataset(tmp_path, tiny_base, training=False, **keys):
    base, tokenizer = tiny_base
    config = Config(**({"coconut": True, "c_thought": 2, "max_latent_stage": 2} | keys))
    path = write_data(tmp_path, RECORDS, sizes=((64, 64), (128, 64)))
    return CoconutDataset.from_file(path, encoding_for(base, tokenizer, config), training=training)


@pytest.mark.parametrize(
    "keys, stage, n_steps, expected",
    [
        ({}, 0, 3, (0, 0)),
        ({}, 1, 3, (1, 2)),
        ({}, 2, 3, (2, 4)),
        ({}, 3, 3, (3, 4)),  # past max_latent_stage: all steps go, latents stay at max
        ({}, 3, 1, (1, 2)),  # few steps: latents capped at the record's steps
        ({"pad_latent_to_max": True}, 3, 1, (1, 4)),
        ({"pad_latent_to_max": True}, 2, 1, (1, 4)),
        ({"no_thoughts": True}, 2, 3, (2, 0)),
        ({"coconut": False, "cot": True}, 5, 3, (0, 0)),
        ({"coconut": False, "no_cot": True}, 0, 3, (3, 0)),
    ],
)
def test_stage_plan(keys, stage, n_steps, expected):
    config = Config(**({"coconut": True, "c_thought": 2, "max_latent_stage": 2} | keys))
    assert stage_plan(stage, n_steps, config) == expected


def test_training_sequence_layout_and_labels(tmp_path, tiny_base):
    _, tokenizer = tiny_base
    data = make_dataset(tmp_path, tiny_base)
    start, end, latent = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    data.set_stage(1)  # first step -> 2 latents
    item = data[0]
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("<img>" + "<IMG_CONTEXT>" * 16 + "</img>\nQ one?\n")
    assert text.endswith("<|start-latent|><|latent|><|latent|><|end-latent|>s2\ns3\n### 7<|im_end|>")
    labelled = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tokenizer.decode(labelled) == "s2\ns3\n### 7<|im_end|>"
    assert item["labels"][: item["input_ids"].index(end) + 1] == [-100] * (item["input_ids"].index(end) + 1)
    assert item["pixel_values"].shape == (1, 3, 64, 64)
    # two images: the wide one is 2 tiles + thumbnail, each block numbered as InternVL writes it
    two = data[1]
    assert two["pixel_values"].shape == (4, 3, 64, 64)
    assert tokenizer.decode(two["input_ids"]).startswith("Image-1: <img>")
    assert two["input_ids"].count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 4 * 16
    assert data[2]["pixel_values"] is None


@pytest.mark.parametrize("model_id", ["tiny-gpt2", "tiny-qwen2"])
def test_a_text_model_writes_no_image_block_and_refuses_an_image(tmp_path, model_id):
    base, tokenizer = tiny(model_id)
    config = Config(coconut=True, c_thought=2, max_latent_stage=2, model_id=model_id)
    encoding = encoding_for(base, tokenizer, config)
    assert encoding.vision is None
    data = CoconutDataset.from_file(write_data(tmp_path, RECORDS[2:]), encoding)
    data.set_stage(1)
    item = data[0]
    eos = tokenizer.eos_token
    assert (
        tokenizer.decode(item["input_ids"])
        == f"Q three?\n<|start-latent|><|latent|><|latent|><|end-latent|>u2\n### yes{eos}"
    )
    assert item["pixel_values"] is None
    if model_id == "tiny-gpt2":  # GPT-2's tokenizer has no pad token: its EOS pads
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(
        UserError, match=rf"data.jsonl: record 1 \(id 'a'\): has an image, but model {model_id} has no vision"
    ):
        CoconutDataset.from_file(write_data(tmp_path, RECORDS[2:] + RECORDS[:2]), encoding)


def test_generation_prompt_and_cot_layout(tmp_path, tiny_base):
    _, tokenizer = tiny_base
    data = make_dataset(tmp_path, tiny_base).prompts()
    data.set_stage(2)
    assert tokenizer.decode(data[0]["input_ids"]).endswith(
        "Q one?\n<|start-latent|>" + "<|latent|>" * 4 + "<|end-latent|>"
    )
    assert "labels" not in data[0]
    cot = make_dataset(tmp_path, tiny_base, coconut=False, cot=True)
    cot.set_stage(3)
    assert tokenizer.decode(cot[2]["input_ids"]) == "Q three?\nu1\nu2\n### yes<|im_end|>"
    no_cot = make_dataset(tmp_path, tiny_base, coconut=False, no_cot=True)
    assert tokenizer.decode(no_cot[2]["input_ids"]) == "Q three?\n### yes<|im_end|>"


def test_uniform_prob_is_seeded_and_varies_by_epoch(tmp_path, tiny_base):
    data = make_dataset(tmp_path, tiny_base, training=True, uniform_prob=1.0, max_latent_stage=3)
    validation = make_dataset(tmp_path, tiny_base, uniform_prob=1.0, max_latent_stage=3)
    schedule = Schedule.from_config(data.config)
    stages = {}
    for epoch in range(6):
        data.set_stage(schedule.stage(epoch), epoch)
        stages[epoch] = [data.item_stage(0) for _ in range(2)]
        assert stages[epoch][0] == stages[epoch][1]  # same epoch, same draw
        validation.set_stage(schedule.stage(epoch), epoch)
        assert [validation.item_stage(i) for i in range(3)] == [validation.stage] * 3  # only training mixes
    assert len({s[0] for s in stages.values()}) > 1
    again = make_dataset(tmp_path, tiny_base, training=True, uniform_prob=1.0, max_latent_stage=3)
    again.set_stage(schedule.stage(4), 4)
    assert again.item_stage(0) == stages[4][0]


def test_collator_aligns_first_latents_and_batch_runs_through_model(tmp_path, tiny_base):
    base, tokenizer = tiny_base
    data = make_dataset(tmp_path, tiny_base)
    data.set_stage(1)
    latent = tokenizer.convert_tokens_to_ids("<|latent|>")
    batch = collate([data[i] for i in range(3)], tokenizer.pad_token_id, latent)
    firsts = [row.tolist().index(latent) for row in batch["input_ids"]]
    assert len(set(firsts)) == 1
    assert batch["pixel_values"].shape[0] == 1 + 4
    out = make_coconut(base, tokenizer)(**batch)
    assert torch.isfinite(out.loss)

    prompts = make_dataset(tmp_path, tiny_base).prompts()
    batch = collate([prompts[i] for i in range(3)], tokenizer.pad_token_id, latent)
    assert batch["attention_mask"][:, -1].all() and "labels" not in batch


def test_tokenised_once_and_images_decoded_once(tmp_path, tiny_base, monkeypatch):
    data = make_dataset(tmp_path, tiny_base)
    calls = []
    monkeypatch.setattr(dataset, "tokenize_record", lambda *a: calls.append(a))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    for stage in range(3):
        data.set_stage(stage)
        for i in range(len(data)):
            data[i]
    assert calls == [] and len(opened) == 2  # two distinct image files, each decoded once


def test_a_dataset_and_its_prompts_view_share_one_image_cache_budget(tmp_path, tiny_base):
    # 448-px tiles of 0.6 MB each: a budget of 1 MB holds one image, whichever view decoded it
    _, tokenizer = tiny_base
    records = [dict(RECORDS[0], image=f"img{k}.png") for k in range(2)]
    path = write_data(tmp_path, records, sizes=((448, 448), (448, 448)))
    config = Config(cot=True, max_num_tiles=1, image_cache_mb=1)
    data = CoconutDataset.from_file(path, Encoding(tokenizer, config, Vision(448, 16, *IMAGE_BLOCK)))
    data.pixel_values(0)
    data.prompts().pixel_values(1)
    assert len(data.cache.tiles) == 1 and data.cache.bytes == 448 * 448 * 3 <= 2**20


def test_bad_records_name_the_record(tmp_path, tiny_base):
    bad = dict(RECORDS[0], steps="not a list")
    path = write_data(tmp_path, [RECORDS[0], bad])
    with pytest.raises(UserError, match=r"data.jsonl: record 1 \(id 'a'\): 'steps' must be a list"):
        load_records(path)
    missing = dict(RECORDS[0], image="nope.png")
    with pytest.raises(UserError, match="record 0 .*nope.png not found"):
        base, tokenizer = tiny_base
        CoconutDataset.from_file(write_data(tmp_path, [missing]), encoding_for(base, tokenizer, Config(cot=True)))


MULTIPLE_CHOICE = dict(RECORDS[0], choices=["eight", "nine"], answer="B", meta={"dataset": "demo"})


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"choices": "A or B"}, "'choices' must be a list of non-empty strings"),
        ({"choices": ["eight", 9]}, "'choices' must be a list of non-empty strings"),
        ({"choices": ["eight", " "]}, "'choices' must be a list of non-empty strings"),
        ({"meta": ["demo"]}, "'meta' must be an object"),
        ({"answer": "C"}, "answer 'C' names none of the 2 choices; the answer must be an option's letter or its text"),
        ({"answer": "ten"}, "answer 'ten' names none of the 2 choices"),
    ],
)
def test_bad_choices_and_meta_are_record_problems(tmp_path, tiny_base, keys, message):
    # unchecked, each of these would load and train, then crash or mislead scoring at the first evaluation
    bad = MULTIPLE_CHOICE | keys
    assert record_problem(bad).startswith(message)
    path = write_data(tmp_path, [MULTIPLE_CHOICE, bad])
    with pytest.raises(UserError, match=re.escape(f"record 1 (id 'a'): {message}")):
        load_records(path)
    base, tokenizer = tiny_base
    count, problems = find_problems(path, encoding_for(base, tokenizer, Config(cot=True)))
    assert count == 2 and problems == [f"{path}: record 1 (id 'a'): {record_problem(bad)}"]


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"answer": "b"},
        {"answer": "(B)"},
        {"answer": "Nine"},
        {"answer": "(B) nine"},
        {"choices": []},
        {"meta": None},
    ],
)
def test_answers_naming_an_option_pass_and_score(keys):
    record = MULTIPLE_CHOICE | keys
    assert record_problem(record) is None
    assert is_correct("(B)", record["answer"], record["choices"])  # scoring takes it without a ValueError


@pytest.mark.parametrize(
    "keys",
    [
        {"coconut": False, "cot": True},
        {"coconut": False, "no_cot": True},
        {},
        {"no_thoughts": True},
        {"pad_latent_to_max": True},
        {"max_latent_stage": 0},
    ],
    ids=["cot", "no_cot", "coconut", "no_thoughts", "pad_latent_to_max", "max_latent_stage_0"],
)
def test_longest_sequence_is_the_longest_item_of_the_curriculum(tmp_path, tiny_base, keys):
    # steps of very different lengths, so the longest stage differs between records and modes
    records = [
        dict(RECORDS[0], steps=["a b c d e f g h", "s2", "a b c d e f g h i j k l m n o p"]),
        dict(RECORDS[1], steps=["t1"]),
        dict(RECORDS[2], steps=["u1 u1 u1 u1 u1 u1 u1 u1 u1 u1", "u2"]),
    ]
    base, tokenizer = tiny_base
    config = Config(**({"coconut": True, "c_thought": 3, "max_latent_stage": 2} | keys))
    path = write_data(tmp_path, records, sizes=((64, 64), (128, 64)))
    data = CoconutDataset.from_file(path, encoding_for(base, tokenizer, config))
    built = [0] * len(data)
    schedule = Schedule.from_config(config)
    for epoch in range(config.num_epochs):  # as the trainer walks the curriculum (stages 0..9 here)
        data.set_stage(schedule.stage(epoch), epoch)
        built = [max(n, len(data[i]["input_ids"])) for i, n in enumerate(built)]
    assert [longest_sequence(tokens, config) for tokens in data.tokens] == built
    # a record exactly at max_length is kept
    config = dataclasses.replace(config, max_length=max(built))
    fits = CoconutDataset.from_file(path, encoding_for(base, tokenizer, config))
    assert len(fits) == len(records)


def test_schedule_with_a_longer_first_stage():
    # overrides hold from their stage on: stage 0 lasts 3 epochs, later stages 2
    overrides = {0: {"epochs_per_stage": 3}, 1: {"epochs_per_stage": 2}, 2: {"lr": 0.1}}
    schedule = Schedule.from_config(Config(coconut=True, num_epochs=9, epochs_per_stage=9, stage_overrides=overrides))
    assert schedule.stages == (0, 0, 0, 1, 1, 2, 2, 3, 3)
    assert [schedule.stage_config(e).lr for e in (4, 5)] == [Config().lr, 0.1]
    assert [e for e in range(9) if schedule.ends_stage(e)] == [2, 4, 6, 8] and schedule.last_stage == 3
    assert Schedule.from_config(Config(cot=True, num_epochs=3)).stages == (0, 0, 0)


def test_a_stage_of_no_epochs_is_skipped_and_resets_the_optimizer_once():
    overrides = {0: {"epochs_per_stage": 0}, 1: {"epochs_per_stage": 2}}
    config = Config(coconut=True, num_epochs=4, reset_optimizer=True, stage_overrides=overrides)
    schedule = Schedule.from_config(config)
    assert schedule.stages == (1, 1, 2, 2)
    assert [e for e in range(4) if schedule.resets_optimizer(e)] == [2]


def test_training_items_carry_the_steps_their_thought_groups_replaced(tmp_path, tiny_base):
    base, tokenizer = tiny_base
    data = make_dataset(tmp_path, tiny_base, training=True, thought_loss_weight=1.0)
    data.set_stage(2)
    # c_thought 2, stage 2: record a's four latents stand for s1 and s2; record b has one step and two latents
    assert [tokenizer.decode(step) for step in data[0]["step_ids"]] == ["s1\n", "s2\n"]
    assert [tokenizer.decode(step) for step in data[1]["step_ids"]] == ["t1\n"]
    latent = tokenizer.convert_tokens_to_ids("<|latent|>")
    batch = collate([data[i] for i in range(3)], tokenizer.pad_token_id, latent)
    assert batch["step_ids"].shape == (3, 2, 3) and batch["c_thought"] == 2  # the group width travels with them
    assert batch["step_ids"][1, 1].tolist() == [-100] * 3  # record b's second group replaced no step
    data.set_stage(0)
    assert collate([data[0]], tokenizer.pad_token_id, latent)["step_ids"].tolist() == [[[-100]]]
    validation = make_dataset(tmp_path, tiny_base, thought_loss_weight=1.0)
    validation.set_stage(2)
    assert "step_ids" not in validation[0]
    unsupervised = make_dataset(tmp_path, tiny_base, training=True)
    unsupervised.set_stage(2)
    assert "step_ids" not in unsupervised[0]


def test_uniform_prob_and_step_supervision_follow_the_stage_config(tmp_path, tiny_base):
    data = make_dataset(tmp_path, tiny_base, training=True, max_latent_stage=3)
    config = Config(coconut=True, c_thought=2, max_latent_stage=3, stage_overrides={1: {"uniform_prob": 1.0}})
    data.set_stage(0, 3, config.for_stage(0))
    assert data.item_stage(0) == 0  # stage 0 keeps uniform_prob 0: CoT is not mixed
    draws = set()
    for epoch in range(8):
        data.set_stage(1, epoch, config.for_stage(1))
        draws.add(data.item_stage(0))
    assert len(draws) > 1
