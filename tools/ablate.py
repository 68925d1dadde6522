"""Train one config under a list of variants and several seeds, test each run, tabulate and plot over the seeds.

    python tools/ablate.py args/ablation.yaml               # trains what is missing, then writes tables and plots
    python tools/ablate.py args/ablation.yaml --only paper  # just these variants (the tables: every finished run)
    python tools/ablate.py args/baselines.yaml --jobs 2     # two runs side by side, each one core and one thread
    python tools/ablate.py args/baselines.yaml --seeds 10   # just this seed (the tables: every finished run)

The spec names the run config, the seeds, the folder, overrides shared by every run, the variants (each a mapping of
overrides, in run.py's keys; a variant's stage_overrides change the shared ones key by key), with test_path the
records each finished run's final/ export answers, as `python infer.py <run>/final --records` does, and with
controls (a control of `infer.py --thoughts` -> the variants it tests) the same again under each control.
Each (variant, seed) trains as its own `python run.py` process in `<save_path>/<variant>/seed<k>` with
`resume=auto`, then writes its test evaluations to `<run>/test/` (and `<run>/test-<control>/`): an interrupted
ablation continues where it stopped, and a finished run is neither trained nor evaluated again. After every run,
`<save_path>/ablation.md` and `ablation.png` show each stage's validation accuracy and, with test_path, `results.md`
and `results.png` each variant's test results over the seeds (with the machine, commit, seeds and each variant's
schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

import demo_data
import report
from config import Config, load_config
from curriculum import Schedule
from records import load_records
from utils import UserError, atomic_write_text, entry_point

SPEC_KEYS = {"config", "seeds", "save_path", "overrides", "variants", "test_path", "controls"}
ROOT = Path(__file__).resolve().parents[1]


def read_spec(path: Path) -> dict:
    """The ablation spec, checked: a missing or unknown key, or a variant that is not a mapping, stops with one
    line."""
    if not path.is_file():
        raise UserError(f"{path}: ablation spec not found")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or not {"config", "seeds", "variants"} <= set(spec):
        raise UserError(
            f"{path}: an ablation spec has the keys config, seeds, variants "
            "(and save_path, overrides, test_path, controls)"
        )
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise UserError(f"{path}: seeds must be a list of integers")
    if not isinstance(spec["variants"], dict) or not all(isinstance(v, dict) for v in spec["variants"].values()):
        raise UserError(f"{path}: variants must map each name to a mapping of overrides ({{}} for none)")
    for name, values in [("overrides", spec.get("overrides", {})), *spec["variants"].items()]:
        stages = values.get("stage_overrides", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise UserError(f"{path}: {name}: stage_overrides must map stage numbers to mappings of keys")
    if not isinstance(spec.get("test_path", ""), str):
        raise UserError(f"{path}: test_path must be the path of a records file")
    _check_controls(path, spec)
    return {"save_path": "checkpoints/ablation", "overrides": {}} | spec


def override_args(values: dict) -> list[str]:
    """`key=value` arguments for run.py; mappings and lists as YAML flow text, which run.py reads back."""
    return [f"{key}={_flow(value)}" for key, value in values.items()]


def run_overrides(spec: dict, variant: str) -> dict:
    """The overrides of one variant's runs: the shared ones, then the variant's. A variant's stage_overrides change
    the shared ones key by key within each stage, so a variant names only what it changes."""
    shared, own = spec["overrides"], spec["variants"][variant]
    values = shared | own
    if "stage_overrides" in own:
        base, change = shared.get("stage_overrides", {}), own["stage_overrides"]
        stages = sorted(base.keys() | change.keys())
        values["stage_overrides"] = {s: base.get(s, {}) | change.get(s, {}) for s in stages}
    return values


def variant_config(spec: dict, variant: str) -> Config:
    """The config every run of `variant` trains with, its seed aside (the spec's config and the variant's
    overrides, checked as run.py checks them)."""
    return load_config(spec["config"], override_args(run_overrides(spec, variant)))


def machine(threads: int) -> str:
    """The CPU model, its logical cores and the threads a run computes with, in one line."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    models = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    cpu = models[0] if models else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''} per run"


def commit() -> str:
    """The repository's commit, and whether tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        # results/ is where runs like this one write: its files changing says nothing about the code
        changed = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"]
        status = subprocess.run(changed, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if status.stdout.strip() else "")


def _check_controls(path: Path, spec: dict) -> None:
    """A spec's controls map a control of `infer.py --thoughts` to the variants whose runs it tests, and need a
    test_path."""
    from coconut import THOUGHT_CONTROLS  # only here: the rest of the tool needs no torch

    controls, replacements = spec.get("controls", {}), [c for c in THOUGHT_CONTROLS if c != "model"]
    if controls and "test_path" not in spec:
        raise UserError(f"{path}: controls are tested on test_path; give one")
    for control, variants in controls.items() if isinstance(controls, dict) else [(None, None)]:
        if control not in replacements or not isinstance(variants, list):
            raise UserError(f"{path}: controls must map one of {', '.join(replacements)} to a list of variants")
        unknown = set(variants) - set(spec["variants"])
        if unknown:
            raise UserError(f"{path}: controls: {control}: no variant {sorted(unknown)[0]!r} in variants")


def launch(command: list[str], core: int | None, log: Path) -> bool:
    """Run `command` to its end and say whether it succeeded. On a `core`, the command is pinned to it with one
    thread, its output appended to `log` (runs side by side would interleave theirs on the console)."""
    if core is None:
        return subprocess.run(command).returncode == 0
    # OMP_NUM_THREADS sets torch's threads in a single process (distributed.py sets them only under torchrun)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        pinned = ["taskset", "--cpu-list", str(core), *command]
        return subprocess.run(pinned, env=env, stdout=out, stderr=subprocess.STDOUT).returncode == 0


def train(spec: dict, variant: str, seed: int, core: int | None) -> Path:
    """Train (or finish) one variant at one seed and return its folder. Its minutes add up over resumed runs; the
    machine and commit are those of the run's last training."""
    folder = Path(spec["save_path"]) / variant / f"seed{seed}"
    status = folder / "ablation.json"
    done = json.loads(status.read_text()) if status.exists() else {"finished": False, "minutes": 0.0}
    if done["finished"] and ((folder / "final").is_dir() or (folder / "test" / "eval.json").exists()):
        return folder
    if done["finished"]:  # a finished run that came without its export or test result: train it again
        done = {"finished": False, "minutes": 0.0}
    values = run_overrides(spec, variant) | {"seed": seed, "resume": "auto"}
    values |= {"save_path": str(folder.parent), "name": folder.name}
    command = [sys.executable, str(ROOT / "run.py"), spec["config"], *override_args(values)]
    log = folder / "ablation.log"
    print(f"ablation: {variant}, seed {seed}" + (f" (core {core}, log {log})" if core is not None else ""), flush=True)
    start = time.perf_counter()
    finished = launch(command, core, log)
    folder.mkdir(parents=True, exist_ok=True)
    threads = 1 if core is not None else _default_threads()
    record = {"finished": finished, "minutes": done["minutes"] + (time.perf_counter() - start) / 60}
    atomic_write_text(status, json.dumps(record | {"machine": machine(threads), "commit": commit()}))
    if not finished:
        where = "above" if core is None else log
        raise UserError(f"ablation: {variant} seed {seed} stopped (see {where}); fix it and run the ablation again")
    return folder


def _default_threads() -> int:
    """The threads torch computes with in a process started here without pinning."""
    import torch  # only here: the rest of the tool needs no torch

    return torch.get_num_threads()


def evaluate(folder: Path, records: str, core: int | None, thoughts: str = "model") -> None:
    """Answer `records` with the run's final/ export, as `infer.py <run>/final --records --thoughts` does, into
    `report.test_folder` (eval.json, predictions.jsonl); a run that has it is not evaluated again."""
    out = report.test_folder(folder, thoughts)
    if out.exists():
        return
    partial = out.with_name(out.name + ".partial")  # renamed when complete: an interruption leaves no half result
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, str(ROOT / "infer.py"), str(folder / "final"), "--records", records]
    command += ["--thoughts", thoughts]
    print(f"test: {folder}" + (f" ({thoughts} thoughts)" if thoughts != "model" else ""), flush=True)
    if not launch([*command, "--out", str(partial)], core, folder / "ablation.log"):
        raise UserError(f"ablation: testing {folder} stopped (see above or its ablation.log); fix it and run again")
    partial.rename(out)


def run_all(spec: dict, runs: list[tuple[str, int]], jobs: int, written: Callable[[], object]) -> None:
    """Train and test every (variant, seed) of `runs`, `jobs` at a time, calling `written` after each; with more
    than one job each run is pinned to its own core. The first run that fails stops the ones not yet started."""
    cores = sorted(os.sched_getaffinity(0))
    if jobs > len(cores):
        raise UserError(f"--jobs {jobs}: this process may use {len(cores)} cores; give each run its own")
    if jobs > 1:
        if shutil.which("taskset") is None:
            raise UserError(f"--jobs {jobs} pins each run to a core with taskset, which is not installed (util-linux)")
        write_demo_sets(spec, {variant for variant, _ in runs})
    free: queue.SimpleQueue = queue.SimpleQueue()
    for core in cores[:jobs] if jobs > 1 else [None]:
        free.put(core)

    def one(variant: str, seed: int) -> None:
        core = free.get()
        try:
            folder = train(spec, variant, seed, core)
            if "test_path" in spec:
                evaluate(folder, spec["test_path"], core)
                for control, variants in spec.get("controls", {}).items():
                    if variant in variants:
                        evaluate(folder, spec["test_path"], core, control)
        finally:
            free.put(core)

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, variant, seed) for variant, seed in runs]
        try:
            for future in as_completed(futures):
                future.result()
                written()
        except BaseException:
            for future in futures:
                future.cancel()  # the running ones end on their own
            raise


def write_demo_sets(spec: dict, variants: set[str]) -> None:
    """Write the demo sets that runs of `variants` would write at their start, once: two runs started together
    would write the same files at once, and one could read a file the other is rewriting."""
    for variant in variants:
        demo_data.write_missing(variant_config(spec, variant))


def write_tables(spec: dict, spec_path: Path) -> list[Path]:
    """Rewrite the ablation table and plot and, with test_path, the results table and plot; return their paths."""
    out, variants, seeds = Path(spec["save_path"]), list(spec["variants"]), spec["seeds"]
    stages = report.ablation_results(out, variants, seeds)
    if not stages:
        return []
    atomic_write_text(out / "ablation.md", report.ablation_table(stages) + "\n")
    paths = [out / "ablation.md", report.plot_ablation(stages, out / "ablation.png")]
    results = report.test_results(out, variants, seeds, spec.get("controls")) if "test_path" in spec else {}
    if results:
        atomic_write_text(out / "results.md", results_text(spec, spec_path, results) + "\n")
        paths += [out / "results.md", report.plot_results(results, out / "results.png")]
    return paths


def results_text(spec: dict, spec_path: Path, results: dict[str, dict]) -> str:
    """results.md: what the runs were (machine, commit, seeds, test set, each variant's overrides and schedule),
    then the table of `report.results_table`. A run's optimizer steps are counted by its Schedule, as the trainer
    counts them, for the training records of its config."""
    configs = {variant: variant_config(spec, variant) for variant in results}
    schedules = {variant: Schedule.from_config(config) for variant, config in configs.items()}
    samples = {path: len(load_records(path)) for path in {config.train_path for config in configs.values()}}
    steps = {}
    for variant, schedule in schedules.items():
        n = samples[configs[variant].train_path]
        steps[variant] = sum(schedule.epoch_steps(epoch, n) for epoch in range(len(schedule.stages)))
    records = ", ".join(f"{path} ({n} records)" for path, n in samples.items())

    def counted(key: str) -> str:
        values = [value for r in results.values() for value in r[key]]
        counts = {value: values.count(value) for value in values}
        return "; ".join(f"{value} ({n} run{'s' if n > 1 else ''})" for value, n in counts.items())

    lines = [
        f"# {spec_path}: test accuracy on {spec['test_path']}",
        "",
        f"- machine: {counted('machines')}",
        f"- commit: {counted('commits')}",
        f"- seeds: {', '.join(map(str, spec['seeds']))} (mean ± sd (min-max) over a variant's finished ones)",
        f"- config: {spec['config']}, shared overrides {_flow(spec['overrides'])}",
        f"- optimizer steps: each variant's schedule over {records}, one process per run",
        "",
        report.format_table(
            ["variant", "overrides", "schedule"],
            [[v, _flow(spec["variants"][v]), report.schedule_text(schedules[v])] for v in results],
        ),
        "",
        report.results_table(results, steps),
    ]
    return "\n".join(lines)


def _flow(value: object) -> str:
    """A value as one line of YAML flow text (a mapping as {key: value, ...}, {} for none)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python tools/ablate.py SPEC [--only VARIANT ...] [--seeds SEED ...] [--jobs N]`: train, test, tabulate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="an ablation YAML, e.g. args/ablation.yaml")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="train just these variants")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="train just these of the spec's seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each on its own core, one thread")
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    unknown = set(args.only or ()) - set(spec["variants"])
    if unknown:
        raise UserError(f"--only {sorted(unknown)[0]}: no such variant in {args.spec}")
    strange = set(args.seeds or ()) - set(spec["seeds"])
    if strange:
        raise UserError(f"--seeds {sorted(strange)[0]}: not one of {args.spec}'s seeds {spec['seeds']}")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give at least 1")
    seeds = [seed for seed in spec["seeds"] if not args.seeds or seed in args.seeds]
    runs = [(v, seed) for v in spec["variants"] if not args.only or v in args.only for seed in seeds]
    run_all(spec, runs, args.jobs, lambda: write_tables(spec, args.spec))
    for path in write_tables(spec, args.spec):
        print(path.read_text() if path.suffix == ".md" else f"plot: {path}")


if __name__ == "__main__":
    main()
