"""The ways of computing the thoughts against one another, on the same weights and records: the sequential loop
(one decoder pass per thought), Jacobi iteration (`latent_iterations` T = 1, 2, 3: T + 1 passes over the whole
block) and, on an image model, visual latents (`visual_latents` K = 1, 4: K image patches after every thought).

Per method: the sequential decoder passes one answer takes (its thoughts' passes + the generated tokens, as
`tools/ablate.py` counts them), a training step's time (forward + backward of the loss), and greedy generation's
latency for one answer. The visual rows train on the same records with K `<|latent-image|>` positions after each
latent, so their steps are longer by those positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from coconut import Coconut
from dataset import to_device
from inputs import pad_right
from measure import Column, median_times, sync_for

# method name -> the Coconut options it sets; the visual ones run only where the model has a vision tower
METHODS: dict[str, dict[str, int]] = {
    "sequential": {},
    "jacobi T=1": {"latent_iterations": 1},
    "jacobi T=2": {"latent_iterations": 2},
    "jacobi T=3": {"latent_iterations": 3},
    "visual K=1": {"visual_latents": 1},
    "visual K=4": {"visual_latents": 4},
}
SEQUENTIAL = "sequential"  # the row the others are compared with

METHOD_COLUMNS: list[Column] = [
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("latents", "n", "{}"),
    ("passes", "passes", "{}"),
    ("train_ms", "train ms", "{:.1f}"),
    ("train_vs_sequential", "vs seq.", "{:.2f}"),
    ("answer_ms", "answer ms", "{:.1f}"),
    ("answer_vs_sequential", "vs seq.", "{:.2f}"),
]


def with_patches(data: dict, latent: int, visual: int, k: int, pad: int) -> dict:
    """`data` (right-padded rows) with `k` `visual` ids after every `latent` id, unlabelled, re-padded with `pad`."""
    rows, labels = [], []
    for ids, mask, label in zip(data["input_ids"], data["attention_mask"], data["labels"]):
        row, row_labels = [], []
        for token, target in zip(ids[mask.bool()].tolist(), label[mask.bool()].tolist()):
            row.append(token)
            row_labels.append(target)
            if token == latent:
                row += [visual] * k
                row_labels += [-100] * k
        rows.append(row)
        labels.append(row_labels)
    return dict(zip(("input_ids", "attention_mask", "labels"), pad_right(rows, labels, pad))) | {
        key: value for key, value in data.items() if key not in ("input_ids", "attention_mask", "labels")
    }


def prompt_of(data: dict, end: int) -> dict:
    """The first row of `data` up to and including its end-of-thought id `end`: one answer's prompt."""
    ids = data["input_ids"][:1, : int((data["input_ids"][0] == end).nonzero()[0]) + 1]
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return prompt | ({"pixel_values": data["pixel_values"][:1]} if "pixel_values" in data else {})


def bench_methods(
    name: str,
    base: nn.Module,
    data: dict,
    ids: tuple[int, int, int, int],
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> list[dict]:
    """Every method of METHODS that `base` supports, on the training batch `data` (on the CPU, right-padded, its
    latents in one block per row; moved to the model's device and dtype) and on its first row's prompt: passes per
    answer, the training step's forward + backward and one answer's greedy generation of `new_tokens` tokens, each
    timed against the sequential loop's. `ids` holds the (latent, end-of-thought, pad, visual-latent) token ids."""
    latent, end, pad, visual = ids
    device, dtype = next(base.parameters()).device, next(base.parameters()).dtype
    vision = hasattr(base.config, "vision_config")
    n = int((data["input_ids"][0] == latent).sum())
    params = [p for p in base.parameters() if p.requires_grad]
    steps: dict[str, Callable[[], None]] = {}
    answers: dict[str, Callable[[], None]] = {}
    passes: dict[str, int] = {}
    for method, options in METHODS.items():
        if options.get("visual_latents") and not vision:
            continue
        coconut = Coconut(base, latent, eos_token_id=-1, visual_token_id=visual, **options)  # never stops early
        batch = (
            with_patches(data, latent, visual, options["visual_latents"], pad) if "visual_latents" in options else data
        )
        batch, prompt = to_device(batch, device, dtype), to_device(prompt_of(batch, end), device, dtype)

        def step(coconut: Coconut = coconut, batch: dict = batch) -> None:
            coconut(**batch).loss.backward()
            for p in params:
                p.grad = None

        def answer(coconut: Coconut = coconut, prompt: dict = prompt) -> None:
            with torch.no_grad():
                coconut.generate(**prompt, max_new_tokens=new_tokens)

        steps[method], answers[method] = step, answer
        passes[method] = coconut.thought_passes(n) + new_tokens
    train = median_times(steps, warmup, repeats, sync_for(device))
    generate = median_times(answers, warmup, repeats, sync_for(device))
    return [
        {
            "model": name,
            "method": method,
            "latents": n,
            "passes": passes[method],
            "new_tokens": new_tokens,
            "train_ms": 1e3 * train[method],
            "train_vs_sequential": train[method] / train[SEQUENTIAL],
            "answer_ms": 1e3 * generate[method],
            "answer_vs_sequential": generate[method] / generate[SEQUENTIAL],
        }
        for method in steps
    ]
