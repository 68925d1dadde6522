"""Staged multimodal data: records, InternVL image tiling, the Coconut curriculum and batching.

A record is `{"id"?, "image": path | [paths] | null, "question", "steps": [str], "answer"}` (plus optional
`choices` and `meta`, which the scorer reads). A training sequence at curriculum stage k is

    <img>(context)</img>\\n question \\n <|start-latent|> <|latent|> x n <|end-latent|> steps[k:] ### answer <eos>

where the first k steps are replaced by n = k x c_thought latents (see `stage_plan` for the one rule used in
training and evaluation). Tokenisation happens once per record; a stage change only re-assembles token lists.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from config import Config
from curriculum import has_markers, longest_sequence, stage_plan
from internvl import LATENT_TOKENS
from scoring import choice_index
from utils import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ANSWER_PREFIX = "### "
_FIELDS = {"id", "image", "question", "steps", "answer", "choices", "meta"}


# ---------------------------------------------------------------------------------------------- records


def read_records(path: str) -> list:
    """Parse a JSON list or JSONL file; a missing, unparsable or empty file stops with one line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: data file not found; check the path in the config")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the file") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}: line {number} is not JSON ({err.msg}); fix it (JSONL: one record a line)"
                ) from None
    if not records:
        raise UserError(f"{path}: no records; the file is empty")
    return records


def record_problem(record: object) -> str | None:
    """What is wrong with one record (None when it follows the format)."""
    if not isinstance(record, dict):
        return "must be an object with question, steps and answer"
    unknown = set(record) - _FIELDS
    if unknown:
        return f"unknown field(s) {sorted(unknown)}; allowed are {sorted(_FIELDS)}"
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"'{key}' must be a non-empty string"
    steps = record.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
        return "'steps' must be a list of non-empty strings"
    if not steps:
        return "'steps' is empty; give at least one reasoning step or leave the record out"
    image = record.get("image")
    if not (
        image is None or isinstance(image, str) or (isinstance(image, list) and all(isinstance(p, str) for p in image))
    ):
        return "'image' must be a path, a list of paths or null"
    choices = record.get("choices")
    if choices is not None and not (
        isinstance(choices, list) and all(isinstance(c, str) and c.strip() for c in choices)
    ):
        return "'choices' must be a list of non-empty strings"
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        return "'meta' must be an object (a mapping of key: value)"
    # checked here so a bad answer stops the run before training, not at the first evaluation's scoring
    if choices and choice_index(record["answer"], choices) is None:
        answer, count = record["answer"], len(choices)
        return f"answer {answer!r} names none of the {count} choices; the answer must be an option's letter or its text"
    return None


def record_name(path: str, index: int, record: object) -> str:
    """How messages name a record: file, index and id."""
    named = isinstance(record, dict) and "id" in record
    return f"{path}: record {index}" + (f" (id {record['id']!r})" if named else "")


def load_records(path: str) -> list[dict]:
    """Read and check a records file; the first bad record stops the run with its index/id and the problem."""
    records = read_records(path)
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise UserError(f"{record_name(path, index, record)}: {problem}")
    return records


def image_paths(record: dict, data_path: str, image_root: str) -> list[Path]:
    """The record's image files, relative to `image_root` or else to the data file's folder."""
    image = record.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    root = Path(image_root) if image_root else Path(data_path).parent
    return [root / p for p in paths]


# ---------------------------------------------------------------------------------------------- images


def tile_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's choice of (columns, rows): the grid with columns*rows <= max_tiles whose aspect ratio is closest
    to the image's; among equally close grids, a larger one wins when the image has more than half its pixels."""
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
        key=lambda g: (g[0] * g[1], g),
    )
    aspect = width / height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tile: int, max_tiles: int, use_thumbnail: bool) -> int:
    """How many tiles `tile_image` cuts an image of this size into (the thumbnail included)."""
    cols, rows = tile_grid(width, height, tile, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def tile_image(image: Image.Image, tile: int, max_tiles: int, use_thumbnail: bool) -> np.ndarray:
    """Cut an RGB image into InternVL's dynamic tiles: uint8 array of shape (tiles, tile, tile, 3).

    The image is resized to the chosen grid and cut row by row; when there is more than one tile, a thumbnail
    of the whole image follows.
    """
    cols, rows = tile_grid(image.width, image.height, tile, max_tiles)
    # reducing_gap: a huge image is first shrunk by whole factors, so tiling cost stays bounded
    grid = np.asarray(image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC, reducing_gap=3.0))
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    if use_thumbnail and len(tiles) > 1:
        thumb = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC, reducing_gap=3.0))
        tiles = np.concatenate([tiles, thumb[None]])
    return tiles


def normalize(tiles: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) tiles to the float (N, 3, H, W) tensor the vision tower takes (ImageNet mean/std)."""
    x = (tiles.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@contextmanager
def image_file(path: Path, where: str) -> Iterator[Image.Image]:
    """Open an image file lazily (header only until pixels are used); a missing or unreadable file stops with
    one line naming the record and the file."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise UserError(f"{where}: image {path} not found; fix the path or set image_root") from None
    except Image.DecompressionBombError:
        raise UserError(f"{where}: image {path} has too many pixels to decode safely; downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{where}: image {path} cannot be read ({err}); replace the file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: grey, palette and alpha images convert directly; 16-bit and 32-bit grey are
    scaled to 8 bits first (a plain conversion would clip them)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass
class TokenizedRecord:
    """A record's token ids, computed once: the prompt (image block and question), each step, the answer."""

    prompt: list[int]
    steps: list[list[int]]
    answer: list[int]
    images: list[Path]
    n_tiles: list[int]


def tokenize_record(
    record: dict,
    where: str,
    data_path: str,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    tile: int,
    per_tile: int,
) -> TokenizedRecord:
    """Token ids of one record; image sizes are read from file headers only, to count tiles."""
    paths = image_paths(record, data_path, config.image_root)
    counts = []
    for path in paths:
        with image_file(path, where) as image:
            size = image.size
        counts.append(num_tiles(*size, tile, config.max_num_tiles, config.use_thumbnail))
    blocks = ["<img>" + "<IMG_CONTEXT>" * (n * per_tile) + "</img>\n" for n in counts]
    if len(blocks) > 1:
        blocks = [f"Image-{k + 1}: {block}" for k, block in enumerate(blocks)]
    text = config.prompt_template.format(image="".join(blocks), question=record["question"])
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if prompt.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) != sum(counts) * per_tile:
        raise UserError(f"{where}: question contains image tokens; remove them")  # it spelled <IMG_CONTEXT>
    steps = [tokenizer.encode(step + "\n", add_special_tokens=False) for step in record["steps"]]
    answer = tokenizer.encode(ANSWER_PREFIX + record["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return TokenizedRecord(prompt, steps, answer, paths, counts)


class TileCache:
    """Decoded tiles by image path, up to `limit` bytes; one object, so a dataset and its `prompts()` view share
    the tiles and the budget."""

    def __init__(self, limit: int) -> None:
        self.tiles: dict[Path, np.ndarray] = {}
        self.limit, self.bytes = limit, 0

    def add(self, path: Path, tiles: np.ndarray) -> None:
        """Keep `tiles` if they fit in what is left of the budget."""
        if self.bytes + tiles.nbytes <= self.limit:
            self.tiles[path] = tiles
            self.bytes += tiles.nbytes


class CoconutDataset(torch.utils.data.Dataset):
    """Records of one file, tokenised once, served at the stage set by `set_stage`.

    An item is the full training sequence with labels (-100 on image, question, markers and latents); the view
    returned by `prompts()` serves evaluation prompts instead (up to and including the latents). Only a
    `mix_stages` dataset (the training set) draws items' stages with uniform_prob: validation stays at the epoch's
    stage, so its loss is measured where the stage table lists it.
    """

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        config: Config,
        tile: int,
        tokens_per_tile: int,
        mix_stages: bool = False,
    ) -> None:
        self.path, self.config, self.tile, self.for_generation = path, config, tile, False
        self.mix_stages = mix_stages
        self.records = load_records(path)
        self.positions = list(range(len(self.records)))  # each record's place in the file, kept when some are skipped
        self.start_id, self.end_id, self.latent_id = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.tokens = [
            tokenize_record(r, self._where(i), path, tokenizer, config, tile, tokens_per_tile)
            for i, r in enumerate(self.records)
        ]
        self._apply_max_length()
        self.cache = TileCache(config.image_cache_mb * 2**20)
        self.stage, self.epoch = 0, 0

    def _where(self, index: int) -> str:
        return record_name(self.path, self.positions[index], self.records[index])

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
                f"{self.path}: every record is longer than max_length {self.config.max_length}; raise max_length"
            )
        if long:
            names = ", ".join(str(self.records[i].get("id", i)) for i in long[:10])
            print(f"{self.path}: skipped {len(long)} records longer than max_length {self.config.max_length}: {names}")
            dropped = set(long)
            keep = [i for i in range(len(self.records)) if i not in dropped]
            self.records, self.tokens = [self.records[i] for i in keep], [self.tokens[i] for i in keep]
            self.positions = keep

    def prompts(self) -> CoconutDataset:
        """The same records as evaluation prompts for `generate`; shares tokens, image cache and stage."""
        view = copy.copy(self)
        view.for_generation = True
        return view

    def set_stage(self, stage: int, epoch: int = 0) -> None:
        """Serve curriculum `stage` (the trainer reads it from the run's Schedule); `epoch` seeds uniform_prob's
        draws, so with uniform_prob each item's stage is redrawn per epoch."""
        self.stage, self.epoch = stage, epoch

    def item_stage(self, index: int) -> int:
        """The stage of item `index` this epoch: the epoch's stage, or with probability uniform_prob a stage
        drawn uniformly from 0..steps (seeded by seed, epoch and index, so any worker order gives the same)."""
        if not self.mix_stages or self.for_generation or not self.config.coconut or self.config.uniform_prob == 0:
            return self.stage
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        if rng.random() < self.config.uniform_prob:
            return int(rng.integers(0, len(self.tokens[index].steps) + 1))
        return self.stage

    def pixel_values(self, index: int) -> torch.Tensor | None:
        """Normalised tiles of the item's images in order, or None for a text-only record."""
        tokens = self.tokens[index]
        if not tokens.images:
            return None
        tiles = [self._tiles(path, index) for path in tokens.images]
        return normalize(np.concatenate(tiles))

    def _tiles(self, path: Path, index: int) -> np.ndarray:
        """Decoded uint8 tiles of one image, kept in memory (up to image_cache_mb) so epochs don't re-decode."""
        tiles = self.cache.tiles.get(path)
        if tiles is None:
            with image_file(path, self._where(index)) as image:
                rgb = to_rgb(image)
            tiles = tile_image(rgb, self.tile, self.config.max_num_tiles, self.config.use_thumbnail)
            self.cache.add(path, tiles)
        return tiles

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        tokens = self.tokens[index]
        removed, n_latents = stage_plan(self.item_stage(index), len(tokens.steps), self.config)
        thought = [self.start_id] + [self.latent_id] * n_latents + [self.end_id] if has_markers(self.config) else []
        prompt = tokens.prompt + thought
        item = {"index": index, "pixel_values": self.pixel_values(index)}
        if self.for_generation:
            return item | {"input_ids": prompt}
        target = [t for step in tokens.steps[removed:] for t in step] + tokens.answer
        return item | {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


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
        "index": torch.tensor([item["index"] for item in batch]),
    }
    if "labels" in batch[0]:
        out["labels"] = labels
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device` (a text-only batch's pixel_values stay None). The copies do not
    block the host: from pinned memory they overlap with the work already queued."""
    return {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}
