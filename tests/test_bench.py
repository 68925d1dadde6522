"""bench/bench.py: a smoke run of the CPU benchmark and of the GPU benchmark's code path on a tiny model.

Both run as subprocesses, side by side (one thread each), because the benchmark sets process-wide state: torch's
thread count and glibc's allocation threshold. The numbers are not checked against targets, only for being
there and sane.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("bench")
    runs = {
        "cpu": ["--quick"],
        # --peak-tflops gives the MFU column a value on a CPU too
        "gpu": ["--gpu", "--device", "cpu", "--tiny", "--peak-tflops", "1", "--checkpointing"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH), *flags, "--threads", "1", "--out", str(folder / f"{name}.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, flags in runs.items()
    }
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)  # a guard against a hang, not a speed check
        assert proc.returncode == 0, log
        assert "| model" in log or "| step" in log  # the tables were printed
        out[name] = json.loads((folder / f"{name}.json").read_text())
    return out


def test_cpu_json_has_every_row_with_sane_numbers(results):
    cpu = results["cpu"]
    assert {(r["model"], r["latents"]) for r in cpu["train"]} == {
        (model, n) for model in ("text-h64x2", "image-tiny") for n in (0, 2)
    }
    for row in cpu["train"]:
        for key in ("plain_ms", "coconut_ms", "time_ratio", "vs_no_latents", "samples_per_s"):
            assert positive(row[key]), (row, key)
        assert row["memory_ratio"] is None or positive(row["memory_ratio"]), row
        assert row["tokens"] == 48 + 32 + (row["latents"] + 2 if row["latents"] else 0)
    no_latents = [r for r in cpu["train"] if r["latents"] == 0]
    assert all(r["vs_no_latents"] == 1 for r in no_latents)
    assert {(r["model"], r["batch"], r["latents"]) for r in cpu["generate"]} == {
        ("text-h64x2", 2, 2),
        ("image-tiny", 2, 2),
    }
    for row in cpu["generate"]:
        assert all(positive(row[k]) for k in ("plain_tokens_per_s", "coconut_tokens_per_s", "ratio")), row
    assert len(cpu["data"]) == 2
    demo, tiles = cpu["data"]
    assert all(positive(demo[k]) for k in ("loader_records_per_s_cached", "step_samples_per_s", "loader_over_step"))
    assert positive(tiles["loader_records_per_s_first_epoch"]) and tiles["step_samples_per_s"] is None
    assert cpu["machine"]["threads"] == 1


def test_gpu_code_path_runs_on_a_tiny_model(results):
    gpu = results["gpu"]
    # float32 on a CPU: bf16 there is emulated, many times slower, on CPUs without bf16 units
    assert gpu["dtype"] == "torch.float32" and gpu["attention"] == "sdpa" and gpu["vision_checkpointing"]
    steps = {row["step"]: row for row in gpu["train"]}
    assert set(steps) == {"cot (Coconut, no latents)", "coconut stage 3 (6 latents)", "cot (transformers forward)"}
    for row in steps.values():
        for key in ("ms", "samples_per_s", "tflops", "mfu", "vs_cot", "step_memory_gb"):
            assert positive(row[key]), (row, key)
        assert row["kernel_ms"] is None and row["kernels"] is None  # GPU kernels only: none on a CPU
    assert steps["cot (Coconut, no latents)"]["vs_cot"] == 1
    # the CoT rows carry the 3 steps that the Coconut rows replace by 8 thought tokens
    cot, coconut = steps["cot (Coconut, no latents)"], steps["coconut stage 3 (6 latents)"]
    assert cot["tokens"] - coconut["tokens"] == cot["batch"] * (3 * 16 - 8)
    (generate,) = gpu["generate"]
    assert positive(generate["coconut_tokens_per_s"]) and positive(generate["ratio"])
    (data,) = gpu["data"]
    assert positive(data["loader_over_step"])


# passes per answer at 6 thoughts and 6 generated tokens: one per thought, T + 1 for Jacobi's block, one more for
# the last visual thought's patches (Coconut.thought_passes)
METHOD_PASSES = {
    "sequential": 12,
    "jacobi T=1": 8,
    "jacobi T=2": 9,
    "jacobi T=3": 10,
    "visual K=1": 13,
    "visual K=4": 13,
}


@pytest.mark.parametrize(
    "mode, models",
    [("cpu", {"text-h64x2": False, "image-tiny": True}), ("gpu", {"internvl3-1b": True})],
)
def test_thought_methods_rows(results, mode, models):
    rows = results[mode]["methods"]
    expected = {
        (model, method)
        for model, vision in models.items()
        for method in METHOD_PASSES
        if vision or "visual" not in method
    }
    assert {(r["model"], r["method"]) for r in rows} == expected
    for row in rows:
        assert row["latents"] == 6 and row["passes"] == METHOD_PASSES[row["method"]], row
        assert all(positive(row[k]) for k in ("train_ms", "train_vs_sequential", "answer_ms")), row
        assert row["method"] != "sequential" or row["train_vs_sequential"] == row["answer_vs_sequential"] == 1
