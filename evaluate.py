"""Evaluation on every rank: validation loss and generation accuracy, each example counted exactly once.

Each rank takes every world_size-th example; the shorter shards are topped up with repeats that are run (so
every rank makes the same number of `generate` calls, as FSDP needs) but not counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset import CoconutDataset, collate, to_device
from distributed import dist_info, gather_objects, is_distributed
from scoring import extract_answer, is_correct


def shard(n: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """(index, counted) pairs for this rank: indices rank, rank+world, ..., padded with uncounted repeats so
    that every rank gets ceil(n / world) items."""
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    return [(i, True) for i in mine] + [(i % n, False) for i in range(per_rank - len(mine))]


def _batches(
    data: CoconutDataset, batch_size: int, rank: int, world: int
) -> Iterator[tuple[list[tuple[int, bool]], dict]]:
    """This rank's shard in batches: each batch's (index, counted) pairs and its collated items."""
    items = shard(len(data), rank, world)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield chunk, collate([data[i] for i, _ in chunk], data.pad_id, data.latent_id)


@torch.no_grad()
def validation_loss(model, data: CoconutDataset, batch_size: int, device: torch.device, autocast=nullcontext) -> float:
    """Mean per-example loss over `data` (training sequences at its current stage), across all ranks."""
    info = dist_info()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk, batch in _batches(data, batch_size, info.rank, info.world_size):
        counted = torch.tensor([c for _, c in chunk], device=device)
        batch = to_device(batch, device)
        with autocast():
            # per-example losses, so that uncounted repeats can be left out
            per_example = model(**batch).example_losses()
        total += torch.stack([(per_example * counted).sum(), counted.sum()]).double()
    if is_distributed():
        dist.all_reduce(total)
    return float(total[0] / total[1])


def batch_pixels(batch: dict, device: torch.device, blank_images: bool) -> torch.Tensor | None:
    """The batch's tiles on `device`, zeroed with `blank_images` (how much do answers depend on the image?);
    None for a text-only batch."""
    pixel_values = batch["pixel_values"]
    if pixel_values is None:
        return None
    return (torch.zeros_like(pixel_values) if blank_images else pixel_values).to(device)


@torch.no_grad()
def generate_and_score(
    model,
    data: CoconutDataset,
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    autocast=nullcontext,
    blank_images: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Greedy answers for every prompt of `data` (a `for_generation` dataset), scored against the records.

    Returns one row per example on every rank: index, id, prediction, answer, correct, generated tokens (up to
    and including EOS) and the per-example share of its batch's latency. `blank_images` replaces every tile with
    zeros, to measure how much the answers depend on the image.
    """
    info = dist_info()
    generate = model.module.generate if hasattr(model, "module") else model.generate
    rows = []
    batches = _batches(data, batch_size, info.rank, info.world_size)
    total = -(-len(shard(len(data), info.rank, info.world_size)) // batch_size)
    for chunk, batch in tqdm(batches, total=total, desc="generate", disable=not progress, leave=False):
        pixel_values = batch_pixels(batch, device, blank_images)
        start = time.perf_counter()
        with autocast():
            out = generate(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                pixel_values=pixel_values,
                max_new_tokens=max_new_tokens,
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()  # waits for the device, so the latency is whole
        latency = (time.perf_counter() - start) / len(out)
        for (index, counted), tokens in zip(chunk, new):
            if not counted:
                continue
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            record, position = data.records[index], data.positions[index]
            prediction = extract_answer(tokenizer.decode(tokens, skip_special_tokens=True))
            rows.append(
                {
                    "index": position,
                    "id": record.get("id", position),
                    "prediction": prediction,
                    "answer": record["answer"],
                    "correct": is_correct(prediction, record["answer"], record.get("choices")),
                    "gen_tokens": len(tokens),
                    "latency_s": latency,
                    "meta": record.get("meta", {}),
                }
            )
    return sorted((row for part in gather_objects(rows) for row in part), key=lambda row: row["index"])


def summarize(rows: list[dict]) -> dict:
    """Accuracy, mean generated tokens and mean latency per example of `generate_and_score` rows."""
    n = max(len(rows), 1)
    return {
        "accuracy": sum(r["correct"] for r in rows) / n,
        "gen_tokens": sum(r["gen_tokens"] for r in rows) / n,
        "latency_s": sum(r["latency_s"] for r in rows) / n,
        "n": len(rows),
    }
