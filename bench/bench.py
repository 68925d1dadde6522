"""Coconut's cost against plain training and generation, and the data loader against the training step.

    python bench/bench.py                             # CPU: two Qwen2-shaped text models and the tiny InternVL
    python bench/bench.py --gpu                       # one GPU: InternVL3-1B shapes in bf16, random weights (~1 min)
    python bench/bench.py --gpu --device cpu --tiny   # the GPU code path on a tiny model, to check that it runs

CPU mode, for each model at n = 0, 2, 4, 8 latents (batch 16, question 48 + n latents + up to 32 answer tokens,
right-padded as training batches are): Coconut forward+backward against the base model's own forward+backward
(with labels) on the same ids, their peak memory, and Coconut's samples/s; batched greedy `Coconut.generate`
against the base model's `transformers` `generate` on prompts of the same length; the data loader's records/s
(`CoconutDataset` + `collate` on PNGs written to a temporary folder) against the training step's samples/s.

GPU mode: samples/s, peak memory and model FLOPs utilisation of a CoT step and of a Coconut stage-3 step
(c_thought 2: 6 latents replace 3 of the 6 steps), generation throughput, and the data loader on 448-px tiles.

Every time is the median of interleaved repeats after warm-up, at fixed threads. A table goes to stdout and all
numbers to a JSON file (--out).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo_data  # noqa: E402
from coconut import Coconut  # noqa: E402
from dataset import CoconutDataset, collate  # noqa: E402
from internvl import LATENT_TOKENS, image_seq_length, load_base, tile_size  # noqa: E402
from utils import Config  # noqa: E402

LATENTS = (0, 2, 4, 8)
# Qwen2-shaped text models: (hidden, layers, heads, kv heads, intermediate); vocabulary TEXT_VOCAB
TEXT_MODELS = {"text-h64x2": (64, 2, 4, 2, 256), "text-h256x4": (256, 4, 4, 2, 1024)}
TEXT_VOCAB = 512
# dense bf16 tensor-core peak of the cards MFU is reported for (FLOP/s), matched against the device name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# glibc's mmap threshold while timing, fixed so that every run allocates alike (memory is measured at 4 KiB)
TIMING_MMAP_THRESHOLD = 1 << 16


# ---------------------------------------------------------------------------------------------- measuring


def sync_for(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: wait for queued GPU work; nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def median_times(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, sync: Callable[[], None]) -> dict:
    """Median wall seconds of each function; the functions take turns so that drifting load hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _mmap_threshold(size: int) -> None:
    """Make glibc serve (and on free, return to the system) every block of `size` bytes or more with its own
    mapping; setting it also stops glibc from raising the threshold by itself. Linux only, a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory that one call of `fn` needs above what is live before it: the CUDA allocator's peak on a GPU; on a
    CPU the rise of the resident set's high-water mark (None where /proc cannot reset it), measured with every
    block of 4 KiB or more mapped on its own, so that the resident set follows the live tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _mmap_threshold(4096)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - before
    except OSError:
        return None
    finally:
        _mmap_threshold(TIMING_MMAP_THRESHOLD)


def train_step(step: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> Callable[[], None]:
    """Forward+backward of the loss `step` returns; the gradients are dropped after it, as an optimizer step's
    `zero_grad` drops them, so that each step allocates its own and its peak memory includes them."""

    def run() -> None:
        step().backward()
        for p in params:
            p.grad = None

    return run


# ---------------------------------------------------------------------------------------------- models and batches


def text_model(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> Qwen2ForCausalLM:
    """A random Qwen2-shaped causal LM (float32, sdpa attention)."""
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
    return Qwen2ForCausalLM(config).train()


def pad_right(rows: list[list[int]], labels: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and labels of token rows padded on the right (as `collate` pads training rows)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask, label_ids = torch.zeros_like(ids), torch.full_like(ids, -100)
    for k, (row, label) in enumerate(zip(rows, labels)):
        ids[k, : len(row)], mask[k, : len(row)], label_ids[k, : len(row)] = torch.tensor(row), 1, torch.tensor(label)
    return ids, mask, label_ids


def token_batch(
    heads: list[list[int]],
    n_latents: int,
    answer: int,
    ids: tuple[int, int, int, int],
    vocab: int,
    generator: torch.Generator,
    vary: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    ) -> None:
        self.name, self.base, self.ids, self.vocab_text, self.image_markers = name, base, ids, vocab_text, image_markers
        start, end, latent, _ = ids
        self.coconut = Coconut(base, latent, start, end, eos_token_id=-1)  # never stops early
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


def image_block(config: InternVLConfig, markers: tuple[int, int], tiles: int = 1) -> list[int]:
    """`<img>` + context tokens + `</img>`, given the ids of the two markers."""
    return [markers[0]] + [config.image_token_id] * tiles * image_seq_length(config) + [markers[1]]


def cpu_cases() -> list[Case]:
    """The CPU models: the Qwen2-shaped text models and the tiny InternVL."""
    torch.manual_seed(0)
    cases = []
    for name, shape in TEXT_MODELS.items():
        v = TEXT_VOCAB
        cases.append(Case(name, text_model(*shape, vocab=v), (v - 4, v - 3, v - 2, v - 1), v - 4))
    base, tokenizer = load_base("tiny")
    start, end, latent = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    markers = tuple(tokenizer.convert_tokens_to_ids(["<img>", "</img>"]))
    cases.append(Case("image-tiny", base.train(), (start, end, latent, tokenizer.pad_token_id), 256, markers))
    return cases


def to(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Move a batch to `device`; pixel values also to the model's dtype."""
    moved = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in moved and dtype is not None:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


# ---------------------------------------------------------------------------------------------- CPU benchmarks


def bench_train(case: Case, latents=LATENTS, batch=16, question=48, answer=32, warmup=2, repeats=7) -> list[dict]:
    """Coconut forward+backward against the base model's forward+backward on the same ids, per latent count."""
    params = [p for p in case.base.parameters() if p.requires_grad]
    rows = []
    for n in latents:
        data = case.batch(batch, question, n, answer)
        plain = train_step(lambda data=data: case.base(**data).loss, params)
        coconut = train_step(lambda data=data: case.coconut(**data).loss, params)
        times = median_times({"plain": plain, "coconut": coconut}, warmup, repeats, lambda: None)
        memory = {"plain": peak_bytes(plain, torch.device("cpu")), "coconut": peak_bytes(coconut, torch.device("cpu"))}
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
    case: Case, batches=(1, 32), latents=(0, 8), question=48, new_tokens=32, warmup=1, repeats=3
) -> list[dict]:
    """Tokens/s of `Coconut.generate` (latents in the prompt) against the base model's own `generate` on
    prompts of the same length (the latents as ordinary tokens), both greedy, never stopping early."""
    rows = []
    for batch in batches:
        for n in latents:
            data = case.batch(batch, question, n, 0, vary=False)
            data.pop("labels")
            prompt = data["input_ids"].shape[1]

            def coconut(data=data, width=prompt + new_tokens) -> None:
                assert case.coconut.generate(**data, max_new_tokens=new_tokens).shape[1] == width

            def plain(data=data, width=prompt + new_tokens) -> None:
                kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                assert case.base.generate(**data, **kwargs).shape[1] == width

            with torch.no_grad():
                times = median_times({"plain": plain, "coconut": coconut}, warmup, repeats, lambda: None)
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


def write_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    """Smooth random RGB images (they compress like photos, unlike noise) saved as PNG; returns their names."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    names = []
    for k in range(count):
        phase = rng.uniform(0, 6, size=(3, 2))
        rgb = np.stack([np.sin(7 * x + a) * np.cos(5 * y + b) for a, b in phase], -1)
        name = f"img{k:04d}.png"
        Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


def loader_rate(
    path: str, tokenizer, config: Config, tile: int, per_tile: int, batch: int, epochs: int = 2
) -> tuple[list[float], dict]:
    """Records/s of `CoconutDataset` + `collate` through a DataLoader (in process) for each of `epochs` passes
    at the last epoch's stage: the first pass decodes and tiles every image, later ones find the tiles in the
    dataset's cache. Also returns the first batch."""
    data = CoconutDataset(path, tokenizer, config, tile, per_tile)
    data.set_epoch(config.num_epochs - 1)
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


def bench_data(case: Case, tokenizer, records=256, batch=32, warmup=1, repeats=3) -> list[dict]:
    """The data loader on demo_data's set (64-px images, one tile each; stage 3 of args/demo.yaml: three latents)
    against the tiny InternVL's Coconut step on the loader's own first batch; and, for reference, the loader
    on 896 x 672 PNGs cut into InternVL's 448-px tiles (12 + thumbnail)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        demo_data.generate(folder, seed=0, sizes={"train": records})
        config = Config(coconut=True, c_thought=1, max_latent_stage=3, max_num_tiles=1, num_epochs=4)
        rates, first = loader_rate(f"{folder}/train.jsonl", tokenizer, config, 64, 16, batch)
        first.pop("index")
        params = [p for p in case.base.parameters() if p.requires_grad]
        step = train_step(lambda: case.coconut(**first).loss, params)
        seconds = median_times({"step": step}, warmup, repeats, lambda: None)["step"]
        step_rate = first["input_ids"].shape[0] / seconds
        rows.append(_data_row("demo 64-px, 1 tile", rates, step_rate, case.name))

        big = Path(folder, "big")
        big.mkdir()
        names = write_images(big, max(4, records // 16), 896, 672)
        lines = [
            json.dumps({"image": name, "question": "what is shown?", "steps": ["a", "b", "c"], "answer": "x"})
            for name in names
        ]
        Path(big, "train.jsonl").write_text("\n".join(lines) + "\n")
        config = Config(coconut=True, c_thought=2, max_latent_stage=3, max_num_tiles=12, num_epochs=4)
        rates, _ = loader_rate(f"{big}/train.jsonl", tokenizer, config, 448, 256, batch)
        rows.append(_data_row("896x672 PNG, 448-px tiles (13)", rates, None, None))
    return rows


def _data_row(name: str, rates: list[float], step_rate: float | None, model: str | None) -> dict:
    return {
        "data": name,
        "loader_records_per_s_first_epoch": rates[0],
        "loader_records_per_s_cached": rates[-1],
        "step_model": model,
        "step_samples_per_s": step_rate,
        "loader_over_step": min(rates) / step_rate if step_rate else None,
    }


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def run_cpu(args: argparse.Namespace) -> dict:
    """Every CPU benchmark; `args.quick` shrinks them to a smoke run."""
    quick = dict(warmup=1, repeats=1) if args.quick else dict(warmup=args.warmup, repeats=args.repeats)
    latents = (0, 2) if args.quick else LATENTS
    cases = cpu_cases()
    if args.quick:
        cases = [cases[0], cases[-1]]
    result = {"train": [], "generate": [], "data": []}
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
    _, tokenizer = load_base("tiny")
    result["data"] = bench_data(cases[-1], tokenizer, records=32 if args.quick else 256, **quick)
    print_table(result["data"], DATA_COLUMNS)
    return result


# ---------------------------------------------------------------------------------------------- GPU benchmark


def internvl3_1b_config(tiny: bool) -> InternVLConfig:
    """InternVL3-1B's native config (448-px tiles of 14-px patches, pixel shuffle 0.5: 256 tokens a tile; Qwen2
    896 x 24 layers, vocabulary 151674, untied head), or the same structure shrunk for a CPU check."""
    if tiny:
        vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56)
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        text.update(intermediate_size=128, vocab_size=151674)
    else:
        vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        vision.update(image_size=448)
        text = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
        text.update(intermediate_size=4864, vocab_size=151674)
    vision_config = InternVLVisionConfig(patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu", **vision)
    text_config = Qwen2Config(
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False, **text
    )
    side = vision_config.image_size[0] // 14
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=151667,
        image_seq_length=side * side // 4,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash_attn imports, sdpa otherwise."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_gpu_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> InternVLForConditionalGeneration:
    """The random InternVL, built on `device` and cast to `dtype` (weights and all: no fp32 master copy)."""
    config = internvl3_1b_config(tiny)
    config._attn_implementation = attention_implementation(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    return model.to(dtype).train()


def train_flops(model: InternVLForConditionalGeneration, batch: dict) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward):

        6 x (N_vision x 1025 tokens per tile + N_projector x 256 per tile + N_decoder x text tokens
             + N_head x labelled tokens)
        + 3 x 4 x (d_vision x L_vision x 1025^2 per tile + d_text x L_text x sum over rows of T(T+1)/2)

    N_* are parameter counts (the embedding table does no matmul and is left out), text tokens are the unpadded
    ones, the head is counted where a label needs its logits, the second line is the attention score and value
    matmuls (causal in the decoder)."""
    config, inner = model.config, model.model

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    vision_tokens = (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2 + 1
    tiles = batch["pixel_values"].shape[0]
    decoder = inner.language_model
    lengths = batch["attention_mask"].sum(1).double()
    labelled = (batch["labels"][:, 1:] != -100).sum().item()
    dense = (
        count(inner.vision_tower) * vision_tokens * tiles
        + count(inner.multi_modal_projector) * image_seq_length(config) * tiles
        + (count(decoder) - count(decoder.embed_tokens)) * lengths.sum().item()
        + count(model.lm_head) * labelled
    )
    text, vision = config.text_config, config.vision_config
    attention = (
        vision.hidden_size * vision.num_hidden_layers * vision_tokens**2 * tiles
        + text.hidden_size * text.num_hidden_layers * (lengths * (lengths + 1) / 2).sum().item()
    )
    return 6 * dense + 12 * attention


def gpu_batches(config: InternVLConfig, batch: int, question: int, steps: int, step_tokens: int, answer: int):
    """A CoT batch (one image tile, question, `steps` steps, answer; steps and answer labelled) and the stage-3
    Coconut batch of the same records (the first 3 steps replaced by start + 6 latents + end), the answers of
    different lengths so that rows are padded. Ids: InternVL3's text ids, three spare ids for the latent tokens."""
    vocab, (start, end, latent), pad = 151643, (151671, 151672, 151673), 151643
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    cot, cot_labels, coconut, coconut_labels = [], [], [], []
    for k in range(batch):
        head = image_block(config, (151665, 151666)) + tokens(question)
        chain = [tokens(step_tokens) for _ in range(steps)]
        target = [t for step in chain for t in step] + tokens(answer - k % (answer // 4))
        kept = [t for step in chain[3:] for t in step] + target[steps * step_tokens :]
        thought = [start] + [latent] * 6 + [end]
        cot.append(head + target)
        cot_labels.append([-100] * len(head) + target)
        coconut.append(head + thought + kept)
        coconut_labels.append([-100] * (len(head) + len(thought)) + kept)
    size = config.vision_config.image_size[0]
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    names = ("input_ids", "attention_mask", "labels")
    cot_batch = dict(zip(names, pad_right(cot, cot_labels, pad))) | {"pixel_values": pixels}
    coconut_batch = dict(zip(names, pad_right(coconut, coconut_labels, pad))) | {"pixel_values": pixels}
    return cot_batch, coconut_batch, (start, end, latent)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak of the device (FLOP/s): --peak-tflops, or looked up from the CUDA device name."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def run_gpu(args: argparse.Namespace) -> dict:
    """CoT and Coconut stage-3 training steps, generation and the data loader at InternVL3-1B shapes."""
    device = torch.device(args.device or "cuda")
    dtype = torch.bfloat16
    sync = sync_for(device)
    tiny = args.tiny
    began = time.perf_counter()
    model = build_gpu_model(tiny, device, dtype)
    built = time.perf_counter() - began
    batch = args.batch or (2 if tiny else 16)
    cot, coconut_batch, (start, end, latent) = gpu_batches(
        model.config, batch, question=48, steps=6, step_tokens=16, answer=16
    )
    coconut = Coconut(model, latent, start, end, eos_token_id=-1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            forward().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    cot_dev, coconut_dev = to(cot, device, dtype), to(coconut_batch, device, dtype)
    steps = {
        "cot (Coconut, no latents)": (step_of(lambda: coconut(**cot_dev).loss), cot_dev),
        "coconut stage 3 (6 latents)": (step_of(lambda: coconut(**coconut_dev).loss), coconut_dev),
        "cot (transformers forward)": (step_of(lambda: model(**cot_dev).loss), cot_dev),
    }
    warmup, repeats = (1, 1) if tiny else (args.warmup, args.repeats)
    times = median_times({name: fn for name, (fn, _) in steps.items()}, warmup, repeats, sync)
    peak = peak_flops(device, args.peak_tflops)
    train_rows = []
    for name, (fn, data) in steps.items():
        flops = train_flops(model, data)
        train_rows.append(
            {
                "step": name,
                "batch": batch,
                "tokens": int(data["attention_mask"].sum()),
                "ms": 1e3 * times[name],
                "samples_per_s": batch / times[name],
                "step_memory_gb": (peak_bytes(fn, device) or 0) / 2**30,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                "tflops": flops / times[name] / 1e12,
                "mfu": flops / times[name] / peak if peak else None,
                "vs_cot": times[name] / times["cot (Coconut, no latents)"],
            }
        )
    print_table(train_rows, GPU_TRAIN_COLUMNS)
    model.eval()

    gen_rows = []
    new_tokens = 8 if tiny else args.new_tokens
    for gen_batch in (2,) if tiny else (32,):
        # the Coconut prompt up to its end-of-thought marker, the same for every row; its ids for plain generate
        ids = coconut_batch["input_ids"][:1, : int((coconut_batch["input_ids"][0] == end).nonzero()[0]) + 1]
        ids = ids.expand(gen_batch, -1)
        pixels = coconut_batch["pixel_values"][:1].expand(gen_batch, -1, -1, -1)
        data = to({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, device, dtype)
        prompt = ids.shape[1]

        def coconut_generate(data=data) -> None:
            coconut.generate(**data, max_new_tokens=new_tokens)

        def plain_generate(data=data) -> None:
            model.generate(
                **data, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )

        with torch.no_grad():
            gen_times = median_times({"plain": plain_generate, "coconut": coconut_generate}, 1, repeats, sync)
        gen_rows.append(
            {
                "batch": gen_batch,
                "prompt_tokens": prompt,
                "new_tokens": new_tokens,
                "plain_tokens_per_s": gen_batch * new_tokens / gen_times["plain"],
                "coconut_tokens_per_s": gen_batch * new_tokens / gen_times["coconut"],
                "ratio": gen_times["plain"] / gen_times["coconut"],
            }
        )
    print_table(gen_rows, GPU_GENERATE_COLUMNS)

    _, tokenizer = load_base("tiny")  # the byte-level tokenizer: tokenising is not what this measures
    with tempfile.TemporaryDirectory() as folder:
        size = tile_size(model.config)
        names = write_images(Path(folder), 16 if tiny else 64, size, size)
        lines = [json.dumps({"image": n, "question": "q?", "steps": ["a", "b"], "answer": "x"}) for n in names]
        Path(folder, "train.jsonl").write_text("\n".join(lines) + "\n")
        config = Config(coconut=True, c_thought=2, max_latent_stage=3, max_num_tiles=1, num_epochs=4)
        rates, _ = loader_rate(f"{folder}/train.jsonl", tokenizer, config, size, image_seq_length(model.config), batch)
    data_rows = [_data_row(f"{size}-px PNG, 1 tile", rates, train_rows[1]["samples_per_s"], "coconut stage 3")]
    print_table(data_rows, DATA_COLUMNS)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": model.config._attn_implementation,
        "dtype": str(dtype),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": built,
        "peak_tflops": peak / 1e12 if peak else None,
        "train": train_rows,
        "generate": gen_rows,
        "data": data_rows,
    }


# ---------------------------------------------------------------------------------------------- output


TRAIN_COLUMNS = [
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
GENERATE_COLUMNS = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("latents", "n", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("plain_tokens_per_s", "generate tok/s", "{:.0f}"),
    ("coconut_tokens_per_s", "coconut tok/s", "{:.0f}"),
    ("ratio", "ratio", "{:.2f}"),
]
DATA_COLUMNS = [
    ("data", "data", "{}"),
    ("loader_records_per_s_first_epoch", "loader rec/s (1st epoch)", "{:.0f}"),
    ("loader_records_per_s_cached", "loader rec/s (cached)", "{:.0f}"),
    ("step_samples_per_s", "step samples/s", "{:.1f}"),
    ("loader_over_step", "loader / step", "{:.1f}"),
]
GPU_TRAIN_COLUMNS = [
    ("step", "step", "{}"),
    ("batch", "batch", "{}"),
    ("tokens", "text tokens", "{}"),
    ("ms", "ms", "{:.1f}"),
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("step_memory_gb", "step GB", "{:.2f}"),
    ("peak_memory_gb", "peak GB", "{:.2f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("vs_cot", "vs CoT", "{:.2f}"),
]
GPU_GENERATE_COLUMNS = [
    ("batch", "batch", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("new_tokens", "new", "{}"),
    ("plain_tokens_per_s", "generate tok/s", "{:.0f}"),
    ("coconut_tokens_per_s", "coconut tok/s", "{:.0f}"),
    ("ratio", "ratio", "{:.2f}"),
]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table of `rows` (missing values shown as -)."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(format_table(rows, columns) + "\n", flush=True)


def machine() -> dict:
    """What the numbers were measured on."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min_at_start": load,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the InternVL3-1B-shaped GPU benchmark")
    parser.add_argument("--device", help="device of the --gpu benchmark (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="--gpu on a tiny model of the same structure")
    parser.add_argument("--quick", action="store_true", help="CPU: a smoke run (small batches, one repeat)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7 on CPU, 3 on GPU)")
    parser.add_argument("--batch", type=int, help="--gpu training batch (default 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="--gpu generated tokens per row")
    parser.add_argument("--peak-tflops", type=float, help="--gpu: the device's dense bf16 peak, for MFU")
    parser.add_argument("--out", help="JSON file (default bench/results-cpu.json or results-gpu.json)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.gpu else 7)
    torch.set_num_threads(args.threads)
    _mmap_threshold(TIMING_MMAP_THRESHOLD)
    info = machine()
    began = time.perf_counter()
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result = {"machine": info, **result, "seconds": time.perf_counter() - began}
    out = Path(args.out or Path(__file__).parent / f"results-{'gpu' if args.gpu else 'cpu'}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
