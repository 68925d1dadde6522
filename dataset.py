"""Datasets of tokenised records at a curriculum stage, and batching them.

A training sequence at curriculum stage k is

    <img>(context)</img>\\n question \\n <|start-latent|> <|latent|> x n <|end-latent|> steps[k:] ### answer <eos>

where the first k steps are replaced by n = k x c_thought latents (`curriculum.stage_plan` is the one rule used in
training and evaluation) and the image block is the model family's (`images.Vision`; a text model's has none).
With visual_latents K, each `<|latent|>` is followed by K `<|latent-image|>` positions (`curriculum.latent_width`).
Tokenisation happens once per record; a stage change only re-assembles token lists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from coconut import LATENT_TOKENS
from config import Config
from curriculum import has_markers, latent_width, stage_plan
from images import TileCache, Vision, image_file, image_paths, num_tiles, tile_image, tiles_to_tensor, to_rgb
from patches import VISUAL_TOKEN
from records import load_records, record_name
from scoring import ANSWER_MARK
from utils import UserError


@dataclass(frozen=True)
class Encoding:
    """What turns records into token ids for one model: its tokenizer, the run's config (prompt template, tiling,
    image_root, curriculum) and how the model sees images (its family's `Vision`; None for a text model)."""

    tokenizer: PreTrainedTokenizerBase
    config: Config
    vision: Vision | None


@dataclass
class TokenizedRecord:
    """A record's token ids, computed once: the prompt (image block and question), each step, the answer."""

    prompt: list[int]
    steps: list[list[int]]
    answer: list[int]
    images: list[Path]
    n_tiles: list[int]


def tokenize_record(record: dict, where: str, source: str, encoding: Encoding) -> TokenizedRecord:
    """Token ids of one record, named `where` in messages, from the file `source` (relative image paths start at
    its folder unless image_root is set); image sizes are read from file headers only, to count tiles."""
    tokenizer, config, vision = encoding.tokenizer, encoding.config, encoding.vision
    paths = image_paths(record, source, config.image_root)
    if paths and vision is None:
        raise UserError(
            f"{where}: has an image, but model {config.model_id} has no vision; "
            "set the record's image to null or use a vision-language model_id"
        )
    counts = []
    for path in paths:
        with image_file(path, where) as image:
            size = image.size
        counts.append(num_tiles(*size, vision.tile, config.max_num_tiles, config.use_thumbnail))
    blocks = [vision.block(n) + "\n" for n in counts]
    if len(blocks) > 1:
        blocks = [f"Image-{k + 1}: {block}" for k, block in enumerate(blocks)]
    text = config.prompt_template.format(image="".join(blocks), question=record["question"])
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if vision and prompt.count(tokenizer.convert_tokens_to_ids(vision.context)) != sum(counts) * vision.tokens_per_tile:
        raise UserError(f"{where}: question contains image tokens; remove them")  # it spelled the context token
    # a question to answer (infer.py) has neither steps nor an answer: its prompt is all it needs
    steps = [tokenizer.encode(step + "\n", add_special_tokens=False) for step in record.get("steps", [])]
    answer = []
    if "answer" in record:
        answer = tokenizer.encode(f"{ANSWER_MARK} {record['answer']}", add_special_tokens=False)
        answer.append(tokenizer.eos_token_id)
    return TokenizedRecord(prompt, steps, answer, paths, counts)


def longest_sequence(tokens: TokenizedRecord, config: Config) -> int:
    """The length of the longest training sequence the record gives at any stage: stage 0 for cot and no_cot,
    stages 0..max_latent_stage for coconut, each laid out by `stage_plan` as `CoconutDataset` builds it (markers,
    that stage's latents with their patch positions, the steps it keeps). Later stages and uniform_prob's draws give
    nothing longer: past max_latent_stage every step goes and the latent count stays at its maximum."""
    last = config.max_latent_stage if config.coconut else 0
    plans = (stage_plan(stage, len(tokens.steps), config) for stage in range(last + 1))
    middle = max(latents * latent_width(config) + sum(map(len, tokens.steps[removed:])) for removed, latents in plans)
    markers = 2 if has_markers(config) else 0
    return len(tokens.prompt) + markers + middle + len(tokens.answer)


class CoconutDataset(torch.utils.data.Dataset):
    """Records tokenised once, served at the stage set by `set_stage`.

    An item is the full training sequence with labels (-100 on image, question, markers and latents); the view
    returned by `prompts()` serves evaluation prompts instead (up to and including the latents). Only the
    `training` set draws items' stages with uniform_prob (validation stays at the epoch's stage, so its loss is
    measured where the stage table lists it) and, with thought_loss_weight, carries each item's `step_ids`: the
    tokens of the step each group of c_thought latents replaced, for `Coconut.step_loss`.
    """

    def __init__(self, records: list[dict], encoding: Encoding, source: str, training: bool = False) -> None:
        """`records` in the record format (records.py; a question to answer needs only question and image);
        `source` is the file they come from: messages name a record by it, and relative image paths start at its
        folder unless image_root is set."""
        self.records, self.encoding, self.source, self.training = records, encoding, source, training
        self.config, self.for_generation = encoding.config, False
        self.stage_config = self.config  # the config in force at the stage served (stage_overrides applied)
        self.positions = list(range(len(records)))  # each record's place in the file, kept when some are skipped
        tokenizer = encoding.tokenizer
        self.start_id, self.end_id, self.latent_id = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
        # the patch positions after each latent (a visual-latent model's tokenizer holds the token)
        patch = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN) if self.config.visual_latents else None
        self.thought_ids = [self.latent_id] + [patch] * self.config.visual_latents
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.tokens = [tokenize_record(r, self._where(i), source, encoding) for i, r in enumerate(records)]
        self._apply_max_length()
        self.cache = TileCache(self.config.image_cache_mb * 2**20)
        self.stage, self.epoch = 0, 0

    @classmethod
    def from_file(cls, path: str, encoding: Encoding, training: bool = False) -> CoconutDataset:
        """The records of a file, checked (`records.load_records`), as a dataset."""
        return cls(load_records(path), encoding, path, training)

    def _where(self, index: int) -> str:
        return record_name(self.source, self.positions[index], self.records[index])

    def _apply_max_length(self) -> None:
        """Enforce max_length: stop at the first longer record, or (too_long: skip) drop and report them all."""
        if self.config.max_length == 0:
            return
        long = [
            i
            for i in range(len(self.records))
            if longest_sequence(self.tokens[i], self.config) > self.config.max_length
        ]
        if long and self.config.too_long == "error":
            length = longest_sequence(self.tokens[long[0]], self.config)
            raise UserError(
                f"{self._where(long[0])}: {length} tokens, more than max_length {self.config.max_length}; "
                "raise max_length, shorten the record or set too_long: skip"
            )
        if len(long) == len(self.records):
            raise UserError(
                f"{self.source}: every record is longer than max_length {self.config.max_length}; raise max_length"
            )
        if long:
            names = ", ".join(str(self.records[i].get("id", i)) for i in long[:10])
            print(
                f"{self.source}: skipped {len(long)} records longer than max_length {self.config.max_length}: {names}"
            )
            dropped = set(long)
            keep = [i for i in range(len(self.records)) if i not in dropped]
            self.records, self.tokens = [self.records[i] for i in keep], [self.tokens[i] for i in keep]
            self.positions = keep

    def prompts(self) -> CoconutDataset:
        """The same records as evaluation prompts for `generate`; shares tokens, image cache and stage."""
        view = copy.copy(self)
        view.for_generation = True
        return view

    def set_stage(self, stage: int, epoch: int = 0, stage_config: Config | None = None) -> None:
        """Serve curriculum `stage` (the trainer reads it from the run's Schedule) under `stage_config`, the config
        in force there (default: the dataset's own), whose uniform_prob and thought_loss_weight the training set
        follows; `epoch` seeds uniform_prob's draws, so each item's stage is redrawn per epoch."""
        self.stage, self.epoch = stage, epoch
        self.stage_config = stage_config or self.config

    def item_stage(self, index: int) -> int:
        """The stage of item `index` this epoch: the epoch's stage, or with probability uniform_prob a stage
        drawn uniformly from 0..steps (seeded by seed, epoch and index, so any worker order gives the same)."""
        mix = self.stage_config.uniform_prob
        if not self.training or self.for_generation or not self.config.coconut or mix == 0:
            return self.stage
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        if rng.random() < mix:
            return int(rng.integers(0, len(self.tokens[index].steps) + 1))
        return self.stage

    def pixel_values(self, index: int) -> torch.Tensor | None:
        """Normalised tiles of the item's images in order, or None for a text-only record."""
        tokens = self.tokens[index]
        if not tokens.images:
            return None
        tiles = [self._tiles(path, index) for path in tokens.images]
        return tiles_to_tensor(np.concatenate(tiles))

    def _tiles(self, path: Path, index: int) -> np.ndarray:
        """Decoded uint8 tiles of one image, kept in memory (up to image_cache_mb) so epochs don't re-decode."""
        tiles = self.cache.tiles.get(path)
        if tiles is None:
            with image_file(path, self._where(index)) as image:
                rgb = to_rgb(image)
            tiles = tile_image(rgb, self.encoding.vision.tile, self.config.max_num_tiles, self.config.use_thumbnail)
            self.cache.add(path, tiles)
        return tiles

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        tokens = self.tokens[index]
        removed, n_latents = stage_plan(self.item_stage(index), len(tokens.steps), self.config)
        thought = [self.start_id] + self.thought_ids * n_latents + [self.end_id] if has_markers(self.config) else []
        prompt = tokens.prompt + thought
        item = {"pixel_values": self.pixel_values(index)}
        if self.for_generation:
            return item | {"input_ids": prompt}
        target = [t for step in tokens.steps[removed:] for t in step] + tokens.answer
        item |= {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}
        if self.training and self.config.coconut and self.stage_config.thought_loss_weight > 0:
            # group g of c_thought latents stands for written step g (none past the steps the stage removed)
            groups = n_latents // self.config.c_thought
            item["step_ids"] = [tokens.steps[g] if g < removed else [] for g in range(groups)]
            item["c_thought"] = self.config.c_thought  # the group width, so the model's caller need not pass it
        return item


def collate(batch: list[dict], pad_id: int, latent_id: int) -> dict:
    """Pad a list of items into tensors; tiles of all rows are concatenated in row order.

    Training rows (with labels) are shifted right so that their first latents share one column, which keeps the
    number of decoder passes at its minimum, then padded on the right. Generation prompts are padded on the
    left so every row's next token is the last column.
    """
    ids = [item["input_ids"] for item in batch]
    if "labels" in batch[0]:
        firsts = [seq.index(latent_id) if latent_id in seq else None for seq in ids]
        align = max((f for f in firsts if f is not None), default=0)
        left = [align - f if f is not None else 0 for f in firsts]
    else:
        left = [max(map(len, ids)) - len(seq) for seq in ids]
    width = max(pad + len(seq) for pad, seq in zip(left, ids))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (pad, seq) in enumerate(zip(left, ids)):
        input_ids[row, pad : pad + len(seq)] = torch.tensor(seq)
        attention_mask[row, pad : pad + len(seq)] = 1
        if "labels" in batch[row]:
            labels[row, pad : pad + len(seq)] = torch.tensor(batch[row]["labels"])
    tiles = [item["pixel_values"] for item in batch if item["pixel_values"] is not None]
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(tiles) if tiles else None,
    }
    if "labels" in batch[0]:
        out["labels"] = labels
    if "step_ids" in batch[0]:
        out["step_ids"] = _pad_steps([item["step_ids"] for item in batch])
        out["c_thought"] = batch[0]["c_thought"]
    return out


def _pad_steps(rows: list[list[list[int]]]) -> torch.Tensor:
    """Each row's step token lists as one B x G x L tensor, -100 after each step and for missing groups (at least
    1 x 1, so a batch without thoughts still carries the key every rank's forward expects)."""
    groups = max(1, *map(len, rows))
    length = max([1] + [len(step) for row in rows for step in row])
    out = torch.full((len(rows), groups, length), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        for g, step in enumerate(row):
            out[r, g, : len(step)] = torch.tensor(step, dtype=torch.long)
    return out


def to_device(batch: dict, device: torch.device, pixel_dtype: torch.dtype | None = None) -> dict:
    """A collated batch's tensors on `device` (a text-only batch's pixel_values stay None, c_thought an int), the
    tiles also cast to `pixel_dtype` when given (for a model whose weights are in that dtype, run without autocast:
    the benchmark's). The copies do not block the host: from pinned memory they overlap with the work already queued."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if pixel_dtype is not None and moved.get("pixel_values") is not None:
        moved["pixel_values"] = moved["pixel_values"].to(pixel_dtype)
    return moved
