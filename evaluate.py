"""Evaluation on every rank: validation loss and generation accuracy, each example counted exactly once, and the
one writer of an evaluation's results (only_eval and infer.py).

Each rank takes every world_size-th example; the shorter shards are topped up with repeats that are run (so
every rank makes the same number of `generate` calls, as FSDP needs) but not counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from coconut import THOUGHT_CONTROLS
from dataset import CoconutDataset, collate, to_device
from distributed import Job, gather_objects, is_distributed, unwrap
from scoring import accuracy_report, extract_answer, is_correct


@dataclass(frozen=True)
class Controls:
    """What inference replaces to see what the answers depend on: every image tile by zeros (`blank_images`), and
    every continuous thought by a control of `coconut.THOUGHT_CONTROLS` ("model" keeps the model's thoughts)."""

    blank_images: bool = False
    thoughts: str = "model"

    def __post_init__(self) -> None:
        if self.thoughts not in THOUGHT_CONTROLS:
            raise ValueError(f"thoughts must be one of {THOUGHT_CONTROLS}, got {self.thoughts!r}")

    @property
    def label(self) -> str:
        """How a comparison names the control: "blank images", "thoughts: noise", ... ("" for none)."""
        parts = ["blank images"] * self.blank_images + [f"thoughts: {self.thoughts}"] * (self.thoughts != "model")
        return ", ".join(parts)


NO_CONTROLS = Controls()


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
def validation_loss(model: nn.Module, data: CoconutDataset, job: Job, batch_size: int) -> float:
    """Mean per-example loss over `data` (training sequences at its current stage), across all ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=job.device)
    for chunk, batch in _batches(data, batch_size, job.dist.rank, job.dist.world_size):
        counted = torch.tensor([c for _, c in chunk], device=job.device)
        batch = to_device(batch, job.device)
        with job.autocast():
            # per-example losses, so that uncounted repeats can be left out
            per_example = model(**batch).example_losses()
        total += torch.stack([(per_example * counted).sum(), counted.sum()]).double()
    if is_distributed():
        dist.all_reduce(total)
    return float(total[0] / total[1])


def batch_pixels(batch: dict, device: torch.device, controls: Controls) -> torch.Tensor | None:
    """The batch's tiles on `device`, zeroed with `blank_images` (how much do answers depend on the image?);
    None for a text-only batch."""
    pixel_values = batch["pixel_values"]
    if pixel_values is None:
        return None
    return (torch.zeros_like(pixel_values) if controls.blank_images else pixel_values).to(device)


@torch.no_grad()
def generate_answers(
    model: nn.Module, data: CoconutDataset, job: Job, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[dict]:
    """Greedy answers to every prompt of `data` (a `prompts()` view), each at most max_new_tokens long.

    Returns one row per prompt on every rank, in order: its index in `data`, the prediction (the text after the
    answer mark), the generated tokens (up to and including EOS), the sequential decoder passes the answer took
    (`passes`) and the prompt's share of its batch's latency. `controls` replaces the images or the thoughts, to
    measure how much the answers depend on them.
    """
    generate, thought_passes, eos = unwrap(model).generate, unwrap(model).thought_passes, data.eos_id
    decode = data.encoding.tokenizer.decode
    rows = []
    batches = _batches(data, batch_size, job.dist.rank, job.dist.world_size)
    total = -(-len(shard(len(data), job.dist.rank, job.dist.world_size)) // batch_size)
    for chunk, batch in tqdm(batches, total=total, desc="generate", disable=not job.is_main, leave=False):
        pixel_values = batch_pixels(batch, job.device, controls)
        start = time.perf_counter()
        with job.autocast():
            out = generate(
                batch["input_ids"].to(job.device),
                batch["attention_mask"].to(job.device),
                pixel_values=pixel_values,
                max_new_tokens=data.config.max_new_tokens,
                thoughts=controls.thoughts,
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()  # waits for the device, so the latency is whole
        latency = (time.perf_counter() - start) / len(out)
        thoughts = (batch["input_ids"] == data.latent_id).sum(1).tolist()
        for (index, counted), tokens, n_thoughts in zip(chunk, new, thoughts):
            if not counted:
                continue
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            prediction = extract_answer(decode(tokens, skip_special_tokens=True))
            # the prompt's last pass gives the first token, each further token takes one more
            passes = thought_passes(n_thoughts, controls.thoughts) + len(tokens)
            rows.append({"index": index, "prediction": prediction, "gen_tokens": len(tokens), "passes": passes,
                         "latency_s": latency})  # fmt: skip
    return sorted((row for part in gather_objects(rows) for row in part), key=lambda row: row["index"])


def generate_and_score(
    model: nn.Module, data: CoconutDataset, job: Job, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[dict]:
    """`generate_answers` scored against the records: one row per example on every rank, in order of the records'
    places in their file: index (that place), id, prediction, answer, correct, gen_tokens, passes, latency_s,
    meta."""
    rows = []
    for generated in generate_answers(model, data, job, batch_size, controls):
        record, position = data.records[generated["index"]], data.positions[generated["index"]]
        prediction = generated["prediction"]
        rows.append(
            {
                "index": position,
                "id": record.get("id", position),
                "prediction": prediction,
                "answer": record["answer"],
                "correct": is_correct(prediction, record["answer"], record.get("choices")),
                "gen_tokens": generated["gen_tokens"],
                "passes": generated["passes"],
                "latency_s": generated["latency_s"],
                "meta": record.get("meta", {}),
            }
        )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Accuracy, mean generated tokens, mean sequential decoder passes and mean latency per example of
    `generate_and_score` rows."""
    n = max(len(rows), 1)
    return {
        "accuracy": sum(r["correct"] for r in rows) / n,
        "gen_tokens": sum(r["gen_tokens"] for r in rows) / n,
        "passes": sum(r["passes"] for r in rows) / n,
        "latency_s": sum(r["latency_s"] for r in rows) / n,
        "n": len(rows),
    }


def write_evaluation(
    folder: Path, rows: list[dict], stage: int, records: str, controls: Controls = NO_CONTROLS
) -> dict:
    """Write an evaluation of `records` at `stage` under `controls` to `folder`: eval.json (`summarize`, the
    stage, records and controls, and accuracy per data set and category) and predictions.jsonl (the rows); return
    what eval.json holds."""
    result = summarize(rows) | {"stage": stage, "records": records}
    result |= {"thoughts": controls.thoughts, "blank_images": controls.blank_images, "groups": accuracy_report(rows)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(result, indent=2))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return result
