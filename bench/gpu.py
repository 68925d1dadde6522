"""The GPU benchmark: InternVL3-1B's native shapes with random weights in bf16, on one device.

Samples/s, peak memory, model FLOPs utilisation and the kernels' own time and count (is the GPU or the host the
bound?) of a CoT training step and of a Coconut stage-3 step (c_thought 2: 6 latents replace 3 of the 6 steps),
the ways of computing the thoughts against one another (methods.py), generation throughput, and the data loader on
448-px tiles. `run_gpu` runs them in that order and prints a table after each; with `--tiny` the same code runs on
a model of the same structure shrunk to run on a CPU in seconds (in float32 there), to check the code path rather
than to measure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from coconut import Coconut
from config import Config
from dataset import Encoding, to_device
from inputs import DATA_COLUMNS, data_row, image_block, loader_rate, pad_right, write_records
from measure import Column, kernel_profile, median_times, peak_bytes, print_table, sync_for
from methods import METHOD_COLUMNS, bench_methods
from models import load_base, pick_attn_implementation
from models.internvl import checkpoint_activations, fuse_rms_norms, image_seq_length, tile_size
from models.internvl import vision as vision_of

# dense bf16 tensor-core peak of the cards MFU is reported for (FLOP/s), matched against the device name
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
PAD = 151643  # InternVL3's <|endoftext|>, the pad id of the benchmark's batches
COT_STEP = "cot (Coconut, no latents)"  # the step the others are compared with ("vs CoT")

GPU_TRAIN_COLUMNS: list[Column] = [
    ("step", "step", "{}"),
    ("batch", "batch", "{}"),
    ("tokens", "text tokens", "{}"),
    ("ms", "ms", "{:.1f}"),
    ("kernel_ms", "kernel ms", "{:.1f}"),
    ("kernels", "kernels", "{}"),
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("step_memory_gb", "step GB", "{:.2f}"),
    ("peak_memory_gb", "peak GB", "{:.2f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("vs_cot", "vs CoT", "{:.2f}"),
]
GPU_GENERATE_COLUMNS: list[Column] = [
    ("batch", "batch", "{}"),
    ("prompt_tokens", "prompt", "{}"),
    ("new_tokens", "new", "{}"),
    ("plain_tokens_per_s", "generate tok/s", "{:.0f}"),
    ("coconut_tokens_per_s", "coconut tok/s", "{:.0f}"),
    ("ratio", "ratio", "{:.2f}"),
]


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


def build_gpu_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> InternVLForConditionalGeneration:
    """The random InternVL, built on `device` with its RMSNorms fused and cast to `dtype` (weights and all: no
    fp32 master copy)."""
    config = internvl3_1b_config(tiny)
    # the kernel a run picks, but sdpa on a CPU device even where CUDA and flash-attn are installed
    config._attn_implementation = pick_attn_implementation("sdpa" if device.type == "cpu" else None)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    fuse_rms_norms(model)  # as load_base builds every model the project trains
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


def gpu_batches(
    config: InternVLConfig, batch: int, question: int, steps: int, step_tokens: int, answer: int
) -> tuple[dict, dict, tuple[int, int, int]]:
    """A CoT batch (one image tile, question, `steps` steps, answer; steps and answer labelled) and the stage-3
    Coconut batch of the same records (the first 3 steps replaced by start + 6 latents + end), the answers of
    different lengths so that rows are padded. Ids: InternVL3's text ids, three spare ids for the latent tokens."""
    vocab, (start, end, latent), pad = 151643, (151671, 151672, 151673), PAD
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


def bench_gpu_train(
    coconut: Coconut, cot: dict, coconut_batch: dict, warmup: int, repeats: int, peak: float | None
) -> list[dict]:
    """The CoT step through Coconut (no latents), the Coconut stage-3 step and the CoT step through the model's
    own forward (a row marked out of memory where its full logits do not fit), each forward + backward + fused
    AdamW step on batches already on the model's device: time, samples/s, the GPU kernels' own time and count in
    one profiled step (a step whose kernels take far less than its wall time waits on the host), the step's
    memory and the allocator's peak, TFLOP/s and MFU (against `peak`, None: unknown)."""
    model = coconut.base
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step_of(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            forward().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    steps = {
        COT_STEP: (step_of(lambda: coconut(**cot).loss), cot),
        "coconut stage 3 (6 latents)": (step_of(lambda: coconut(**coconut_batch).loss), coconut_batch),
    }
    reference = "cot (transformers forward)"
    times = median_times({name: fn for name, (fn, _) in steps.items()}, warmup, repeats, sync_for(device))
    # timed on its own: at large batches its B x T x V logits no longer fit, and that must not cost the others
    steps[reference] = (step_of(lambda: model(**cot).loss), cot)
    try:
        times |= median_times({reference: steps[reference][0]}, warmup, repeats, sync_for(device))
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    rows = []
    for name, (fn, data) in steps.items():
        batch = data["input_ids"].shape[0]
        row = {"step": name, "batch": batch, "tokens": int(data["attention_mask"].sum())}
        if name not in times:
            rows.append(row | {"step": f"{name}: out of memory"})
            continue
        flops = train_flops(model, data)
        kernel_ms, kernels = kernel_profile(fn, device)
        rows.append(
            row
            | {
                "ms": 1e3 * times[name],
                "kernel_ms": kernel_ms,
                "kernels": kernels,
                "samples_per_s": batch / times[name],
                "step_memory_gb": (peak_bytes(fn, device) or 0) / 2**30,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                "tflops": flops / times[name] / 1e12,
                "mfu": flops / times[name] / peak if peak else None,
                "vs_cot": times[name] / times[COT_STEP],
            }
        )
    return rows


def bench_gpu_generate(
    coconut: Coconut, coconut_batch: dict, end: int, batch: int, new_tokens: int, repeats: int, dtype: torch.dtype
) -> dict:
    """Tokens/s of greedy `Coconut.generate` against the model's own `generate`, never stopping early, on `batch`
    copies of the first Coconut prompt up to its end-of-thought marker (the latents as plain ids for `generate`)."""
    model = coconut.base
    device = next(model.parameters()).device
    ids = coconut_batch["input_ids"][:1, : int((coconut_batch["input_ids"][0] == end).nonzero()[0]) + 1]
    ids = ids.expand(batch, -1)
    pixels = coconut_batch["pixel_values"][:1].expand(batch, -1, -1, -1)
    data = to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}, device, dtype)

    def coconut_generate() -> None:
        coconut.generate(**data, max_new_tokens=new_tokens)

    def plain_generate() -> None:
        model.generate(**data, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        times = median_times({"plain": plain_generate, "coconut": coconut_generate}, 1, repeats, sync_for(device))
    return {
        "batch": batch,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "plain_tokens_per_s": batch * new_tokens / times["plain"],
        "coconut_tokens_per_s": batch * new_tokens / times["coconut"],
        "ratio": times["plain"] / times["coconut"],
    }


def bench_gpu_data(config: InternVLConfig, records: int, batch: int, step_rate: float) -> dict:
    """The data loader on `records` PNGs of one tile each at stage 3 (c_thought 2) against `step_rate`, the
    samples/s of the Coconut stage-3 step that would eat them."""
    _, tokenizer = load_base("tiny")  # the byte-level tokenizer: tokenising is not what this measures
    with tempfile.TemporaryDirectory() as folder:
        size = tile_size(config)
        path = write_records(Path(folder), records, size, size, "q?", ["a", "b"])
        data_config = Config(coconut=True, c_thought=2, max_latent_stage=3, max_num_tiles=1, num_epochs=4)
        rates, _ = loader_rate(path, Encoding(tokenizer, data_config, vision_of(config)), batch)
    return data_row(f"{size}-px PNG, 1 tile", rates, step_rate, "coconut stage 3")


def run_gpu(args: argparse.Namespace) -> dict:
    """CoT and Coconut stage-3 training steps, the thought methods, generation and the data loader at InternVL3-1B
    shapes (`args.tiny`: the tiny model, batch 2, one repeat), a table printed after each. Returns the device, the
    model, the rows."""
    device = torch.device(args.device or "cuda")
    # bf16 as trained on a GPU; on a CPU (the --tiny check of the code path) float32, because a CPU without bf16
    # units (AVX2-only x86) emulates bf16 matmuls many times slower
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    began = time.perf_counter()
    model = build_gpu_model(tiny, device, dtype)
    if args.checkpointing:  # as run.py's activation_checkpointing
        checkpoint_activations(model)
    built = time.perf_counter() - began
    batch = args.batch or (2 if tiny else 16)
    cot, coconut_batch, (_, end, latent) = gpu_batches(
        model.config, batch, question=48, steps=6, step_tokens=16, answer=16
    )
    coconut = Coconut(model, latent, eos_token_id=-1)  # never stops early
    warmup, repeats = (1, 1) if tiny else (args.warmup, args.repeats)
    peak = peak_flops(device, args.peak_tflops)

    cot_dev, coconut_dev = to_device(cot, device, dtype), to_device(coconut_batch, device, dtype)
    train_rows = bench_gpu_train(coconut, cot_dev, coconut_dev, warmup, repeats, peak)
    print_table(train_rows, GPU_TRAIN_COLUMNS)

    # the thought methods on the stage-3 records (a spare id of InternVL3's vocabulary as the visual-latent token)
    method_rows = bench_methods("internvl3-1b", model, coconut_batch, (latent, end, PAD, 151670), 6, warmup, repeats)
    print_table(method_rows, METHOD_COLUMNS)

    model.eval()
    new_tokens = 8 if tiny else args.new_tokens
    gen_rows = [bench_gpu_generate(coconut, coconut_batch, end, 2 if tiny else 32, new_tokens, repeats, dtype)]
    print_table(gen_rows, GPU_GENERATE_COLUMNS)

    data_rows = [bench_gpu_data(model.config, 16 if tiny else 64, batch, train_rows[1]["samples_per_s"])]
    print_table(data_rows, DATA_COLUMNS)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": model.config._attn_implementation,
        "dtype": str(dtype),
        "vision_checkpointing": args.checkpointing,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": built,
        "peak_tflops": peak / 1e12 if peak else None,
        "train": train_rows,
        "methods": method_rows,
        "generate": gen_rows,
        "data": data_rows,
    }
