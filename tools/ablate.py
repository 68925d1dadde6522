"""Train one config under a list of variants and several seeds; tabulate and plot each stage's accuracy.

    python tools/ablate.py args/ablation.yaml                  # trains what is missing, then writes the table and plot
    python tools/ablate.py args/ablation.yaml --only paper     # just these variants (the table covers all finished)

The spec names the run config, the seeds, the folder, overrides shared by every run and the variants (each a
mapping of overrides, in run.py's keys; a variant's stage_overrides change the shared ones key by key). Each
(variant, seed) trains as its own `python run.py` process in `<save_path>/<variant>/seed<k>` with `resume=auto`:
an interrupted ablation continues where it stopped, and a finished run is not trained again.
`<save_path>/ablation.md` and `ablation.png` are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

import report
from utils import UserError, atomic_write_text, entry_point

SPEC_KEYS = {"config", "seeds", "save_path", "overrides", "variants"}


def read_spec(path: Path) -> dict:
    """The ablation spec, checked: a missing or unknown key, or a variant that is not a mapping, stops with one
    line."""
    if not path.is_file():
        raise UserError(f"{path}: ablation spec not found")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or not {"config", "seeds", "variants"} <= set(spec):
        raise UserError(f"{path}: an ablation spec has the keys config, seeds, variants (and save_path, overrides)")
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise UserError(f"{path}: seeds must be a list of integers")
    if not isinstance(spec["variants"], dict) or not all(isinstance(v, dict) for v in spec["variants"].values()):
        raise UserError(f"{path}: variants must map each name to a mapping of overrides ({{}} for none)")
    for name, values in [("overrides", spec.get("overrides", {})), *spec["variants"].items()]:
        stages = values.get("stage_overrides", {})
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise UserError(f"{path}: {name}: stage_overrides must map stage numbers to mappings of keys")
    return {"save_path": "checkpoints/ablation", "overrides": {}} | spec


def override_args(values: dict) -> list[str]:
    """`key=value` arguments for run.py; mappings and lists as YAML flow text, which run.py reads back."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in values.items()]  # fmt: skip


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


def train(spec: dict, variant: str, seed: int) -> Path:
    """Train (or finish) one variant at one seed and return its folder. Its minutes add up over resumed runs."""
    folder = Path(spec["save_path"]) / variant / f"seed{seed}"
    status = folder / "ablation.json"
    done = json.loads(status.read_text()) if status.exists() else {"finished": False, "minutes": 0.0}
    if done["finished"]:
        return folder
    values = run_overrides(spec, variant) | {"seed": seed, "resume": "auto"}
    values |= {"save_path": str(folder.parent), "name": folder.name}
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "run.py"),
        spec["config"],
        *override_args(values),
    ]
    print(f"ablation: {variant}, seed {seed}", flush=True)
    start = time.perf_counter()
    finished = subprocess.run(command).returncode == 0
    folder.mkdir(parents=True, exist_ok=True)
    minutes = done["minutes"] + (time.perf_counter() - start) / 60
    atomic_write_text(status, json.dumps({"finished": finished, "minutes": minutes}))
    if not finished:
        raise UserError(f"ablation: {variant} seed {seed} stopped (see above); fix it and run the ablation again")
    return folder


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="an ablation YAML, e.g. args/ablation.yaml")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="train just these variants")
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    unknown = set(args.only or ()) - set(spec["variants"])
    if unknown:
        raise UserError(f"--only {sorted(unknown)[0]}: no such variant in {args.spec}")
    out = Path(spec["save_path"])
    for variant in spec["variants"]:
        if args.only and variant not in args.only:
            continue
        for seed in spec["seeds"]:
            train(spec, variant, seed)
            results = report.ablation_results(out, spec["variants"], spec["seeds"])
            atomic_write_text(out / "ablation.md", report.ablation_table(results) + "\n")
            report.plot_ablation(results, out / "ablation.png")
    results = report.ablation_results(out, spec["variants"], spec["seeds"])
    print(report.ablation_table(results))
    print(f"table: {out / 'ablation.md'}\nplot: {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
