"""ablate.py on the tiny model: every (variant, seed) trains and is tested once, an interrupted ablation continues,
runs go side by side with --jobs, the tables and plots summarise the seeds, and the baseline specs give every
row one budget."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, metrics

import ablate
import demo_data
import trainer
from config import load_config
from curriculum import Schedule

SETTINGS = {
    "generate_demo_data": "none",
    "batch_size_training": 8,
    "eval_batch_size": 8,
    "max_new_tokens": 8,
    "max_latent_stage": 1,
    "stage_overrides": {},
    "num_epochs": 2,
    "warmup_steps": 0,
}


def run_ablate(spec, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ablate.py"), str(spec), *args],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
    )  # fmt: skip


def test_ablation_trains_each_variant_and_seed_once_and_tabulates(tmp_path, data_dir):
    overrides = SETTINGS | {"train_path": f"{data_dir}/train.jsonl", "val_path": f"{data_dir}/val.jsonl"}
    spec = {
        "config": "args/demo.yaml",
        "seeds": [0, 1],
        "save_path": str(tmp_path / "runs"),
        "overrides": overrides,
        "variants": {"paper": {}, "steps": {"thought_loss_weight": 1.0, "thought_feedback": "rescaled"}},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = run_ablate(path, "--only", "steps", "--seeds", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("ablation: ") == 1 and "ablation: steps, seed 1" in first.stdout
    assert "thought_loss" in metrics(tmp_path / "runs" / "steps" / "seed1")[-1]
    second = run_ablate(path, "--seeds", "1")  # the finished run is not trained again
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("ablation: ") == 1 and "ablation: paper, seed 1" in second.stdout
    table = (tmp_path / "runs" / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| variant | seeds | stage 0 | stage 1 | generated tokens | minutes |")
    assert [row.split(" | ")[0:2] for row in table[2:]] == [["| paper", "1"], ["| steps", "1"]]
    assert (tmp_path / "runs" / "ablation.png").stat().st_size > 0


def test_a_bad_spec_stops_with_one_line(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text("config: args/demo.yaml\nseeds: [0]\nvariants: {a: {}}\nlr: 1\n")
    bad = run_ablate(path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "\n" not in bad.stderr.strip()
    path.write_text("config: args/demo.yaml\nseeds: [0]\nvariants: {a: {}}\n")
    unknown = run_ablate(path, "--only", "b")
    assert unknown.returncode == 2 and "--only b: no such variant" in unknown.stderr
    seed = run_ablate(path, "--seeds", "3")
    assert seed.returncode == 2 and "--seeds 3: not one of" in seed.stderr
    path.write_text("config: args/demo.yaml\nseeds: [0]\nvariants: {a: {stage_overrides: {1: 0.5}}}\n")
    stages = run_ablate(path)
    assert stages.returncode == 2 and "a: stage_overrides must map stage numbers to mappings" in stages.stderr
    path.write_text(
        "config: args/demo.yaml\nseeds: [0]\ntest_path: t.jsonl\nvariants: {a: {}}\ncontrols: {noise: [b]}\n"
    )
    control = run_ablate(path)
    assert control.returncode == 2 and "controls: noise: no variant 'b'" in control.stderr
    path.write_text(
        "config: args/demo.yaml\nseeds: [0]\ntest_path: t.jsonl\nvariants: {a: {}}\ncontrols: {model: [a]}\n"
    )
    control = run_ablate(path)
    assert control.returncode == 2 and "controls must map one of noise, zeros" in control.stderr


def test_a_variant_changes_the_shared_stage_overrides_key_by_key():
    spec = ablate.read_spec(ROOT / "args" / "ablation.yaml")
    shared = spec["overrides"]["stage_overrides"]
    paper = ablate.run_overrides(spec, "paper")
    assert paper["thought_loss_weight"] == 0.0 and paper["load_model_path"] == spec["overrides"]["load_model_path"]
    assert paper["stage_overrides"] == shared | {1: shared[1] | {"uniform_prob": 0.0}}
    assert ablate.run_overrides(spec, "rescaled")["stage_overrides"] == shared


def test_runs_side_by_side_are_tested_once_and_tabulated(tmp_path, data_dir):
    overrides = SETTINGS | {"train_path": f"{data_dir}/train.jsonl", "val_path": f"{data_dir}/val.jsonl"}
    spec = {
        "config": "args/demo.yaml",
        "seeds": [0, 1],
        "save_path": str(tmp_path / "runs"),
        "test_path": f"{data_dir}/val.jsonl",
        "overrides": overrides,
        "variants": {"cot": {"coconut": False, "cot": True, "train_stage": 0}, "coconut": {}},
        "controls": {"noise": ["coconut"]},
    }
    path = tmp_path / "baselines.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    first = run_ablate(path, "--jobs", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("ablation: ") == 4 and first.stdout.count("test: ") == 6  # and coconut's 2 controls
    for variant in spec["variants"]:
        for seed in spec["seeds"]:
            run = tmp_path / "runs" / variant / f"seed{seed}"
            assert len(metrics(run)) == 2 and (run / "test" / "eval.json").is_file()
            assert "1 thread per run" in (run / "ablation.json").read_text()  # pinned, one thread
            assert "resumed" not in (run / "ablation.log").read_text()
    assert [m["stage"] for m in metrics(tmp_path / "runs" / "cot" / "seed0")] == [0, 0]
    tests = {
        v: json.loads((tmp_path / "runs" / v / "seed0" / "test" / "eval.json").read_text()) for v in ("cot", "coconut")
    }
    assert tests["cot"]["passes"] == tests["cot"]["gen_tokens"]  # a pass per generated token
    assert tests["coconut"]["passes"] == tests["coconut"]["gen_tokens"] + 2  # and one per thought (c_thought 2)
    noise = json.loads((tmp_path / "runs" / "coconut" / "seed0" / "test-noise" / "eval.json").read_text())
    assert noise["thoughts"] == "noise" and not (tmp_path / "runs" / "cot" / "seed0" / "test-noise").exists()
    again = run_ablate(path)  # all trained and tested: nothing runs again
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ablation: " not in again.stdout and "test: " not in again.stdout
    results = (tmp_path / "runs" / "results.md").read_text()
    assert "- seeds: 0, 1" in results and "1 thread per run (4 runs)" in results and "- commit: " in results
    table = results.split("\n\n")[-1].splitlines()
    header = (
        "| variant | seeds | test accuracy | test accuracy, noise | val accuracy | passes | generated tokens "
        "| optimizer steps | minutes |"
    )
    assert table[0] == header
    # 32 training records in batches of 8: 4 optimizer steps an epoch, 2 epochs
    assert [row.split(" | ")[:2] for row in table[2:]] == [["| cot", "2"], ["| coconut", "2"]]
    assert all(" | 8 | " in row for row in table[2:])
    assert table[2].count(" ± ") == 5 and " | - | " in table[2] and table[3].count(" ± ") == 6  # noise: coconut only
    assert "trains stage 0 throughout" in results and (tmp_path / "runs" / "results.png").stat().st_size > 0


def lr_trace(schedule: Schedule, samples: int) -> list[float]:
    """The learning rate at every optimizer step of a run, as trainer.train_epoch sets it."""
    trace, step = [], 0
    for epoch in range(len(schedule.stages)):
        if schedule.resets_optimizer(epoch):
            step = 0
        config, total = schedule.stage_config(epoch), schedule.lr_steps(epoch, samples)
        for _ in range(schedule.epoch_steps(epoch, samples)):
            trace.append(config.lr * trainer.lr_factor(step, total, config))
            step += 1
    return trace


def budget(schedule: Schedule, samples: int) -> dict:
    """What a run's optimisation is made of, beside what it trains on."""
    epochs = range(len(schedule.stages))
    keys = ("batch_size_training", "gradient_accumulation_steps", "lr", "weight_decay", "max_grad_norm")
    return {
        "steps": [schedule.epoch_steps(e, samples) for e in epochs],
        "resets": [schedule.resets_optimizer(e) for e in epochs],
        "lr": lr_trace(schedule, samples),
        "optimizer": [[getattr(schedule.stage_config(e), k) for k in keys] for e in epochs],
    }


ALL_ROWS = {"cot", "no_cot", "coconut", "paper", "pause", "no_curriculum", "no_thoughts"}


@pytest.mark.parametrize(
    "name, demo, rows",
    [
        ("baselines.yaml", "demo.yaml", ALL_ROWS),
        ("baselines_text.yaml", "demo_text.yaml", ALL_ROWS),
        ("baselines_hard.yaml", "demo_hard.yaml", {"cot", "no_cot", "coconut", "paper", "pause"}),
    ],
)
def test_the_baseline_rows_share_one_budget(name, demo, rows):
    spec = ablate.read_spec(ROOT / "args" / name)
    assert set(spec["variants"]) == rows
    assert len(spec["seeds"]) >= 5 and len(set(spec["seeds"]) - set(range(7))) >= 2  # 0-6 chose the recipe
    configs = {variant: ablate.variant_config(spec, variant) for variant in spec["variants"]}
    assert configs["coconut"] == load_config(f"args/{demo}")  # the demo's recipe as it is
    for samples in (8000, 1001):
        budgets = {variant: budget(Schedule.from_config(c), samples) for variant, c in configs.items()}
        assert all(b == budgets["coconut"] for b in budgets.values())
        assert sum(budgets["coconut"]["steps"]) == len(budgets["coconut"]["lr"])
    if name == "baselines.yaml":  # the demo's budget: 15 epochs of 250 steps, a restart at each of 4 stages
        assert sum(budget(Schedule.from_config(configs["cot"]), 8000)["steps"]) == 3750
        paper, keys = load_config("args/demo_paper.yaml"), ("thought_loss_weight", "uniform_prob", "thought_feedback")
        for stage in range(4):  # the paper row is args/demo_paper.yaml
            row, own = configs["paper"].for_stage(stage), paper.for_stage(stage)
            assert [getattr(row, k) for k in keys] == [getattr(own, k) for k in keys]
    if name == "baselines_hard.yaml":  # 14 epochs of 250 steps, stages 0-6
        assert sum(budget(Schedule.from_config(configs["cot"]), 8000)["steps"]) == 3500
    last = Schedule.from_config(configs["coconut"]).last_stage
    pinned = {"cot": 0, "no_cot": 0, "no_curriculum": last}
    assert {v: Schedule.from_config(configs[v]).last_stage for v in pinned if v in rows} == {
        v: stage for v, stage in pinned.items() if v in rows
    }
    assert configs["cot"].cot and configs["no_cot"].no_cot
    assert "no_thoughts" not in rows or configs["no_thoughts"].no_thoughts
    assert configs["pause"].thought_feedback == "none" and configs["pause"].thought_loss_weight == 0


def test_runs_side_by_side_find_their_demo_set_written(tmp_path):
    """Two runs started together would both write a missing demo set; ablate.py writes it once before them."""
    spec = ablate.read_spec(ROOT / "args" / "baselines_text.yaml")
    folder = tmp_path / "graph"
    spec["overrides"] |= {"train_path": str(folder / "train.jsonl"), "val_path": str(folder / "val.jsonl")}
    ablate.write_demo_sets(spec, {"cot", "coconut"})
    demo_data.check(str(folder), "graph", tuple(ablate.variant_config(spec, "cot").demo_moves))
    assert (folder / "test.jsonl").is_file()


def same_runs(spec: dict, variant: str, other: dict, other_variant: str) -> bool:
    """Whether `variant`'s runs folder is a link that resolves to `other_variant`'s in the other spec."""
    folder = ROOT / spec["save_path"] / variant
    return folder.is_symlink() and folder.resolve() == (ROOT / other["save_path"] / other_variant).resolve()


@pytest.mark.parametrize(
    "name, baselines", [("iterations.yaml", "baselines.yaml"), ("iterations_hard.yaml", "baselines_hard.yaml")]
)
def test_the_iteration_rows_differ_in_latent_iterations_alone(name, baselines):
    """Each row of an iterations spec is its baselines spec's coconut row with one latent_iterations: the same budget,
    and the sequential row is that very config, its runs folder a link to the baselines' coconut runs (trained once)."""
    spec = ablate.read_spec(ROOT / "args" / name)
    configs = {variant: ablate.variant_config(spec, variant) for variant in spec["variants"]}
    coconut = ablate.variant_config(ablate.read_spec(ROOT / "args" / baselines), "coconut")
    assert configs["sequential"] == coconut and spec["seeds"] == ablate.read_spec(ROOT / "args" / baselines)["seeds"]
    assert same_runs(spec, "sequential", ablate.read_spec(ROOT / "args" / baselines), "coconut")
    assert sorted(c.latent_iterations for c in configs.values()) == [0, 1, 2, 3]
    for config in configs.values():
        assert dataclasses.replace(config, latent_iterations=0) == coconut


@pytest.mark.parametrize(
    "name, baselines", [("visual.yaml", "baselines.yaml"), ("visual_hard.yaml", "baselines_hard.yaml")]
)
def test_the_visual_rows_differ_in_patches_and_thoughts_per_step_alone(name, baselines):
    """Each row of a visual-latents spec is its baselines spec's coconut row with visual_latents K in 0, 1, 4 and
    c_thought 1 or 2: the same budget; c2_k0 is that very config, its runs folder a link to the coconut runs."""
    spec = ablate.read_spec(ROOT / "args" / name)
    configs = {variant: ablate.variant_config(spec, variant) for variant in spec["variants"]}
    coconut = ablate.variant_config(ablate.read_spec(ROOT / "args" / baselines), "coconut")
    assert configs["c2_k0"] == coconut and spec["seeds"] == ablate.read_spec(ROOT / "args" / baselines)["seeds"]
    assert same_runs(spec, "c2_k0", ablate.read_spec(ROOT / "args" / baselines), "coconut")
    assert {(c.c_thought, c.visual_latents) for c in configs.values()} == {(c, k) for c in (1, 2) for k in (0, 1, 4)}
    for config in configs.values():
        assert dataclasses.replace(config, visual_latents=0, c_thought=2) == coconut
