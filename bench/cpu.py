"""The CPU benchmark: two Qwen2-shaped text models and the tiny InternVL, each wrapped in Coconut.

For each model at n = 0, 2, 4, 8 latents (batch 16, question 48 + n latents + up to 32 answer tokens, right-padded
as training batches are): Coconut forward+backward against the base model's own forward+backward (with labels) on
the same ids, their peak memory, and Coconut's samples/s; batched greedy `Coconut.generate` against the base
model's `transformers` `generate` on prompts of the same length; the ways of computing the thoughts against one
another (methods.py); the data loader's records/s against the training step's samples/s. `run_cpu` runs them all
and prints a table after each.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

import demo_data
from coconut import LATENT_TOKENS, Coconut
from config import Config
from dataset import Encoding
from images import Vision
from inputs import DATA_COLUMNS, data_row, image_block, loader_rate, pad_right, write_records
from measure import Column, median_times, peak_bytes, print_table, sync_for
from methods import METHOD_COLUMNS, bench_methods
from models import load_base
from models.internvl import IMAGE_BLOCK, fuse_rms_norms, tile_size
from patches import VISUAL_TOKEN

LATENTS = (0, 2, 4, 8)
# Qwen2-shaped text models: (hidden, layers, heads, kv heads, intermediate); vocabulary TEXT_VOCAB
TEXT_MODELS = {"text-h64x2": (64, 2, 4, 2, 256), "text-h256x4": (256, 4, 4, 2, 1024)}
TEXT_VOCAB = 512
CPU = torch.device("cpu")

TRAIN_COLUMNS: list[Column] = [
    ("model", "model", "{}"),
    ("latents", "n", "{}"),
    ("tokens", "T", "{}"),
    ("plain_ms", "plain ms", "{:.1f}"),
    ("coconut_ms", "coconut ms", "{:.1f}"),
    ("time_ratio", "time ratio", "{:.2f}"),
    ("vs_no_latents", "vs n=0", "{:.2f}"),
    ("plain_peak_mb", "plain MB", "{:.1f}"),
    ("coconut_peak_mb", "coconut MB", "{:.1f}"),
    ("memory_ratio", "mem ratio", "{:.2f}"),
    ("samples_per_s", "samples/s", "{:.1f}"),
]
GENERATE_COLUMNS: list[Column] = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("latents", "n", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("plain_tokens_per_s", "generate tok/s", "{:.0f}"),
    ("coconut_tokens_per_s", "coconut tok/s", "{:.0f}"),
    ("ratio", "ratio", "{:.2f}"),
]


def text_model(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> Qwen2ForCausalLM:
    """A random Qwen2-shaped causal LM (float32, sdpa attention, RMSNorms fused)."""
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    fuse_rms_norms(model)  # as load_base builds every model the project trains
    return model.train()


def token_batch(
    heads: list[list[int]],
    n_latents: int,
    answer: int,
    ids: tuple[int, int, int, int],
    vocab: int,
    generator: torch.Generator,
    vary: bool,
) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and labels: each row is its head, then (with latents) start + n latents + end, then an
    answer of random tokens below `vocab`, labelled. With `vary` the answers shorten across the batch down to 3/4
    of `answer`, so rows are padded as in training. `ids` holds the (start, end, latent, pad) token ids."""
    start, end, latent, pad = ids
    thought = [start] + [latent] * n_latents + [end] if n_latents else []
    rows, labels = [], []
    for k, head in enumerate(heads):
        length = answer - (k * answer // (4 * max(1, len(heads) - 1)) if vary else 0)
        target = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append(head + thought + target)
        labels.append([-100] * (len(head) + len(thought)) + target)
    return pad_right(rows, labels, pad)


class Case:
    """One model to benchmark: the base model, Coconut around it, and how to make its batches."""

    def __init__(
        self,
        name: str,
        base: nn.Module,
        ids: tuple[int, int, int, int],
        vocab_text: int,
        image_markers: tuple[int, int] | None = None,
        visual: int = -1,
    ) -> None:
        self.name, self.base, self.ids, self.vocab_text, self.image_markers = name, base, ids, vocab_text, image_markers
        self.visual = visual  # the visual-latent token's id (image models)
        self.coconut = Coconut(base, latent_token_id=ids[2], eos_token_id=-1)  # never stops early
        self.image = image_markers is not None

    def batch(self, batch: int, question: int, n_latents: int, answer: int, vary: bool = True) -> dict:
        """A training batch (or, with answer 0, prompts): an image block of one tile on image models, then
        random question tokens up to `question` tokens in all."""
        gen = torch.Generator().manual_seed(n_latents)
        block = image_block(self.base.config, self.image_markers) if self.image else []
        heads = [block + torch.randint(0, self.vocab_text, (question - len(block),), generator=gen).tolist()] * batch
        ids, mask, labels = token_batch(heads, n_latents, answer, self.ids, self.vocab_text, gen, vary)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.image:
            size = tile_size(self.base.config)
            out["pixel_values"] = torch.randn(batch, 3, size, size, generator=gen)
        return out


def cpu_cases() -> list[Case]:
    """The CPU models: the Qwen2-shaped text models and the tiny InternVL."""
    torch.manual_seed(0)
    cases = []
    for name, shape in TEXT_MODELS.items():
        v = TEXT_VOCAB
        cases.append(Case(name, text_model(*shape, vocab=v), (v - 4, v - 3, v - 2, v - 1), v - 4))
    base, tokenizer = load_base("tiny", visual=True)
    start, end, latent, visual = tokenizer.convert_tokens_to_ids([*LATENT_TOKENS, VISUAL_TOKEN])
    markers = tuple(tokenizer.convert_tokens_to_ids(["<img>", "</img>"]))
    ids = (start, end, latent, tokenizer.pad_token_id)
    cases.append(Case("image-tiny", base.train(), ids, 256, markers, visual))
    return cases


def train_step(step: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> Callable[[], None]:
    """Forward+backward of the loss `step` returns; the gradients are dropped after it, as an optimizer step's
    `zero_grad` drops them, so that each step allocates its own and its peak memory includes them."""

    def run() -> None:
        step().backward()
        for p in params:
            p.grad = None

    return run


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def bench_train(
    case: Case, latents: tuple[int, ...], batch: int, warmup: int, repeats: int, question: int = 48, answer: int = 32
) -> list[dict]:
    """Coconut forward+backward against the base model's forward+backward on the same ids, per latent count:
    times, peak memory, and (when n = 0 is among them) each step against Coconut's own step without latents."""
    params = [p for p in case.base.parameters() if p.requires_grad]
    rows = []
    for n in latents:
        data = case.batch(batch, question, n, answer)
        plain = train_step(lambda data=data: case.base(**data).loss, params)
        coconut = train_step(lambda data=data: case.coconut(**data).loss, params)
        times = median_times({"plain": plain, "coconut": coconut}, warmup, repeats, sync_for(CPU))
        memory = {"plain": peak_bytes(plain, CPU), "coconut": peak_bytes(coconut, CPU)}
        rows.append(
            {
                "model": case.name,
                "latents": n,
                "tokens": int(data["input_ids"].shape[1]),
                "plain_ms": 1e3 * times["plain"],
                "coconut_ms": 1e3 * times["coconut"],
                "time_ratio": times["coconut"] / times["plain"],
                "plain_peak_mb": _mb(memory["plain"]),
                "coconut_peak_mb": _mb(memory["coconut"]),
                "memory_ratio": memory["coconut"] / memory["plain"] if memory["plain"] else None,
                "samples_per_s": batch / times["coconut"],
            }
        )
    if rows[0]["latents"] == 0:  # the latents' own cost: against Coconut's step without them
        for row in rows:
            row["vs_no_latents"] = row["coconut_ms"] / rows[0]["coconut_ms"]
    return rows


def bench_generate(
    case: Case,
    batches: tuple[int, ...],
    latents: tuple[int, ...],
    new_tokens: int,
    warmup: int,
    repeats: int,
    question: int = 48,
) -> list[dict]:
    """Tokens/s of `Coconut.generate` (latents in the prompt) against the base model's own `generate` on
    prompts of the same length (the latents as ordinary tokens), both greedy, never stopping early."""
    rows = []
    for batch in batches:
        for n in latents:
            data = case.batch(batch, question, n, 0, vary=False)
            data.pop("labels")
            prompt = data["input_ids"].shape[1]

            def coconut(data: dict = data, width: int = prompt + new_tokens) -> None:
                assert case.coconut.generate(**data, max_new_tokens=new_tokens).shape[1] == width

            def plain(data: dict = data, width: int = prompt + new_tokens) -> None:
                kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                assert case.base.generate(**data, **kwargs).shape[1] == width

            with torch.no_grad():
                times = median_times({"plain": plain, "coconut": coconut}, warmup, repeats, sync_for(CPU))
            rows.append(
                {
                    "model": case.name,
                    "batch": batch,
                    "latents": n,
                    "prompt_tokens": prompt,
                    "new_tokens": new_tokens,
                    "plain_tokens_per_s": batch * new_tokens / times["plain"],
                    "coconut_tokens_per_s": batch * new_tokens / times["coconut"],
                    "ratio": times["plain"] / times["coconut"],
                }
            )
    return rows


def bench_data(
    case: Case, tokenizer: PreTrainedTokenizerBase, records: int, warmup: int, repeats: int, batch: int = 32
) -> list[dict]:
    """The data loader on demo_data's set (64-px images, one tile each; stage 3 with one thought per step: three
    latents) against the tiny InternVL's Coconut step on the loader's own first batch; and, for reference, the
    loader on 896 x 672 PNGs cut into InternVL's 448-px tiles (12 + thumbnail)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        demo_data.generate(folder, seed=0, sizes={"train": records})
        config = Config(coconut=True, c_thought=1, max_latent_stage=3, max_num_tiles=1, num_epochs=4)
        rates, first = loader_rate(
            Path(folder, "train.jsonl"), Encoding(tokenizer, config, Vision(64, 16, *IMAGE_BLOCK)), batch
        )
        params = [p for p in case.base.parameters() if p.requires_grad]
        step = train_step(lambda: case.coconut(**first).loss, params)
        seconds = median_times({"step": step}, warmup, repeats, sync_for(CPU))["step"]
        step_rate = first["input_ids"].shape[0] / seconds
        rows.append(data_row("demo 64-px, 1 tile", rates, step_rate, case.name))

        big = Path(folder, "big")
        big.mkdir()
        path = write_records(big, max(4, records // 16), 896, 672, "what is shown?", ["a", "b", "c"])
        config = Config(coconut=True, c_thought=2, max_latent_stage=3, max_num_tiles=12, num_epochs=4)
        rates, _ = loader_rate(path, Encoding(tokenizer, config, Vision(448, 256, *IMAGE_BLOCK)), batch)
        rows.append(data_row("896x672 PNG, 448-px tiles (13)", rates, None, None))
    return rows


def run_cpu(args: argparse.Namespace) -> dict:
    """Every CPU benchmark, a table printed after each model's training steps, after generation, after the thought
    methods and after the data loader; `args.quick` shrinks them to a smoke run (the first text model and the tiny
    InternVL, small batches, one repeat). Returns the rows of each table."""
    quick = dict(warmup=1, repeats=1) if args.quick else dict(warmup=args.warmup, repeats=args.repeats)
    latents = (0, 2) if args.quick else LATENTS
    cases = cpu_cases()
    if args.quick:
        cases = [cases[0], cases[-1]]
    result = {"train": [], "generate": [], "methods": [], "data": []}
    for case in cases:
        result["train"] += bench_train(case, latents=latents, batch=4 if args.quick else 16, **quick)
        print_table(result["train"][-len(latents) :], TRAIN_COLUMNS)
    for case in cases:
        result["generate"] += bench_generate(
            case,
            batches=(2,) if args.quick else (1, 32),
            latents=(2,) if args.quick else (0, 8),
            new_tokens=4 if args.quick else 32,
            warmup=1,
            repeats=1 if args.quick else 3,
        )
    print_table(result["generate"], GENERATE_COLUMNS)
    for case in cases:  # the thought methods at the demo's stage 3: 6 latents, 6 answer tokens
        start, end, latent, pad = case.ids
        data = case.batch(4 if args.quick else 16, 48, 6, 32)
        result["methods"] += bench_methods(case.name, case.base, data, (latent, end, pad, case.visual), 6, **quick)
    print_table(result["methods"], METHOD_COLUMNS)
    _, tokenizer = load_base("tiny")
    result["data"] = bench_data(cases[-1], tokenizer, records=32 if args.quick else 256, **quick)
    print_table(result["data"], DATA_COLUMNS)
    return result
