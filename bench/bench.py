"""Coconut's cost against plain training and generation, and the data loader against the training step.

    python bench/bench.py                             # CPU: two Qwen2-shaped text models and the tiny InternVL
    python bench/bench.py --gpu                       # one GPU: InternVL3-1B shapes in bf16, random weights (~1 min)
    python bench/bench.py --gpu --batch 64 --checkpointing   # 4x the batch, the vision tower recomputed in backward
    python bench/bench.py --gpu --device cpu --tiny   # the GPU code path on a tiny model (float32), to check it runs

CPU mode, for each model at n = 0, 2, 4, 8 latents (batch 16, question 48 + n latents + up to 32 answer tokens,
right-padded as training batches are): Coconut forward+backward against the base model's own forward+backward
(with labels) on the same ids, their peak memory, and Coconut's samples/s; batched greedy `Coconut.generate`
against the base model's `transformers` `generate` on prompts of the same length; the data loader's records/s
(`CoconutDataset` + `collate` on PNGs written to a temporary folder) against the training step's samples/s.

GPU mode: samples/s, peak memory, model FLOPs utilisation and the kernels' own time and count of a CoT step and
of a Coconut stage-3 step (c_thought 2: 6 latents replace 3 of the 6 steps), generation throughput, and the data
loader on 448-px tiles.

Every time is the median of interleaved repeats after warm-up, at fixed threads. A table goes to stdout and all
numbers to a JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# This file is only the command line; the benchmark lives beside it: measure.py (medians, peak memory, tables),
# inputs.py (batches and data sets both modes use), cpu.py and gpu.py (the two benchmarks). They import the
# project's modules (coconut, dataset, internvl, utils) from the repository root, put first on the path here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu import run_cpu  # noqa: E402
from gpu import run_gpu  # noqa: E402
from measure import TIMING_MMAP_THRESHOLD, machine, set_mmap_threshold  # noqa: E402
from utils import entry_point  # noqa: E402


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Parse the flags, fix the thread count and the allocator, run the CPU or the GPU benchmark and write its
    numbers, with the machine they were measured on and the run's seconds, to the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the InternVL3-1B-shaped GPU benchmark")
    parser.add_argument("--device", help="device of the --gpu benchmark (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="--gpu on a tiny model of the same structure")
    parser.add_argument("--quick", action="store_true", help="CPU: a smoke run (small batches, one repeat)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7 on CPU, 3 on GPU)")
    parser.add_argument("--batch", type=int, help="--gpu training batch (default 16)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="--gpu: activation checkpointing of the vision tower"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="--gpu generated tokens per row")
    parser.add_argument("--peak-tflops", type=float, help="--gpu: the device's dense bf16 peak, for MFU")
    parser.add_argument("--out", help="JSON file (default bench/results-cpu.json or results-gpu.json)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.gpu else 7)
    torch.set_num_threads(args.threads)
    set_mmap_threshold(TIMING_MMAP_THRESHOLD)
    info = machine()
    began = time.perf_counter()
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result = {"machine": info, **result, "seconds": time.perf_counter() - began}
    out = Path(args.out or Path(__file__).parent / f"results-{'gpu' if args.gpu else 'cpu'}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
