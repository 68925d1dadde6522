"""Inputs that the CPU and the GPU benchmark share: right-padded token rows, InternVL's image block, PNG data sets,
and the data loader's records/s with the table row that sets it against the training step's samples/s.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import InternVLConfig

from curriculum import Schedule
from dataset import CoconutDataset, Encoding, collate
from measure import Column
from models.internvl import image_seq_length

DATA_COLUMNS: list[Column] = [
    ("data", "data", "{}"),
    ("loader_records_per_s_first_epoch", "loader rec/s (1st epoch)", "{:.0f}"),
    ("loader_records_per_s_cached", "loader rec/s (cached)", "{:.0f}"),
    ("step_samples_per_s", "step samples/s", "{:.1f}"),
    ("loader_over_step", "loader / step", "{:.1f}"),
]


def pad_right(rows: list[list[int]], labels: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and labels of token rows padded on the right (as `collate` pads training rows)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask, label_ids = torch.zeros_like(ids), torch.full_like(ids, -100)
    for k, (row, label) in enumerate(zip(rows, labels)):
        ids[k, : len(row)], mask[k, : len(row)], label_ids[k, : len(row)] = torch.tensor(row), 1, torch.tensor(label)
    return ids, mask, label_ids


def image_block(config: InternVLConfig, markers: tuple[int, int]) -> list[int]:
    """`<img>` + the context tokens of one tile + `</img>`, given the ids of the two markers."""
    return [markers[0]] + [config.image_token_id] * image_seq_length(config) + [markers[1]]


def write_records(folder: Path, count: int, width: int, height: int, question: str, steps: list[str]) -> Path:
    """`count` smooth random RGB images (they compress like photos, unlike noise) saved as PNG in `folder`, and a
    train.jsonl beside them with one record per image (`question`, `steps`, answer "x"); returns its path."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    lines = []
    for k in range(count):
        phase = rng.uniform(0, 6, size=(3, 2))
        rgb = np.stack([np.sin(7 * x + a) * np.cos(5 * y + b) for a, b in phase], -1)
        name = f"img{k:04d}.png"
        Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(folder / name)
        lines.append(json.dumps({"image": name, "question": question, "steps": steps, "answer": "x"}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def loader_rate(path: Path, encoding: Encoding, batch: int, epochs: int = 2) -> tuple[list[float], dict]:
    """Records/s of `CoconutDataset` + `collate` through a DataLoader (in process) for each of `epochs` passes
    at the last epoch's stage: the first pass decodes and tiles every image, later ones find the tiles in the
    dataset's cache. Also returns the first batch."""
    data = CoconutDataset.from_file(str(path), encoding)
    data.set_stage(Schedule.from_config(encoding.config).last_stage)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, collate_fn=partial(collate, pad_id=data.pad_id, latent_id=data.latent_id)
    )
    rates, first = [], None
    for _ in range(epochs):
        start = time.perf_counter()
        for item in loader:
            first = first if first is not None else item
        rates.append(len(data) / (time.perf_counter() - start))
    return rates, first


def data_row(name: str, rates: list[float], step_rate: float | None, model: str | None) -> dict:
    """A row of DATA_COLUMNS: the loader's first and cached epochs against the samples/s of `model`'s training
    step (None: the loader alone); the loader's slower epoch is the one that must keep up."""
    return {
        "data": name,
        "loader_records_per_s_first_epoch": rates[0],
        "loader_records_per_s_cached": rates[-1],
        "step_model": model,
        "step_samples_per_s": step_rate,
        "loader_over_step": min(rates) / step_rate if step_rate else None,
    }
