"""Whether a visual-latent model's thoughts choose the grid cells their steps read, on the grid demo.

    python tools/patch_cells.py results/visual --records data/grid/test.jsonl

Each finished run `<folder>/<variant>/seed<k>` (as tools/ablate.py writes them) whose final/ export has visual
latents answers the records with its probe (`inference.probe_with_patches`, as `infer.py --probe` does). For every
thought it counts the records whose chosen patches cover the cell that thought's step reads ("i" of the step
"i lime l") and the cell the step leads to ("l", which the next step reads), and what K patches drawn at random
would cover. A run is probed once, into `<run>/test-probe/cells.json`; `<folder>/patch_cells.md` tabulates every
such run, mean ± sd over a variant's seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import demo_data
import report
from images import Vision, image_file, patch_box
from inference import load_exported, open_prompts, probe_with_patches
from utils import UserError, atomic_write_text, entry_point


def chance(tokens: list[int], cell: int, k: int) -> float:
    """The probability that k of the image tokens drawn at random (`tokens`: the cell each token sees) include one
    that sees `cell`."""
    inside = tokens.count(cell)
    return 1 - math.comb(len(tokens) - inside, k) / math.comb(len(tokens), k)


def token_cells(count: int, size: tuple[int, int], vision: Vision, max_tiles: int) -> list[int]:
    """The grid cell (`demo_data.cell_at`) at the centre of what each of an image's `count` image tokens sees."""
    cells = []
    for token in range(count):
        left, top, right, bottom = patch_box(token, *size, vision, max_tiles)
        cells.append(demo_data.cell_at((left + right) / 2, (top + bottom) / 2, *size))
    return cells


def probe_cells(run: Path, records: str, device: torch.device) -> dict:
    """Probe `run`'s final/ export on `records` and count, per thought, the records it occurs in, those whose chosen
    patches cover its step's cell ("reads") and the cell the step leads to ("leads_to"), and the sum of the
    chances of covering the former at random ("chance")."""
    exported = load_exported(str(run / "final"), device)
    k, vision, c_thought = exported.model.visual_latents, exported.vision, exported.config.c_thought
    max_tiles = exported.config.max_num_tiles
    prompts = open_prompts(exported, records, exported.stage)
    _, patches = probe_with_patches(exported, prompts, 1, exported.config.eval_batch_size)
    counts: list[dict[str, float]] = []
    for index, picks in enumerate(patches):
        tokens, record = prompts.tokens[index], prompts.records[index]
        if len(tokens.images) != 1:
            raise UserError(
                f"{records}: record {record.get('id')} has {len(tokens.images)} images; a grid record has one"
            )
        with image_file(tokens.images[0], records) as image:
            size = image.size
        seen = token_cells(tokens.n_tiles[0] * vision.tokens_per_tile, size, vision, max_tiles)
        steps = demo_data.step_cells(record)
        for thought, chosen in enumerate(picks):
            if thought // c_thought >= len(steps):
                break  # a thought past the record's steps (none at the demos' last stages)
            reads, leads_to = steps[thought // c_thought]
            covered = {seen[token] for token in chosen}
            if len(counts) <= thought:
                counts.append({"n": 0, "reads": 0, "leads_to": 0, "chance": 0.0})
            row = counts[thought]
            row["n"] += 1
            row["reads"] += reads in covered
            row["leads_to"] += leads_to in covered
            row["chance"] += chance(seen, reads, k)
    return {"records": records, "visual_latents": k, "c_thought": c_thought, "thoughts": counts}


def cells_table(folder: Path, runs: dict[str, list[dict]]) -> str:
    """patch_cells.md: per variant and thought, the shares over its seeds' runs (mean ± sd, min-max)."""
    rows = []
    for variant, results in runs.items():
        first = results[0]
        for thought in range(max(len(r["thoughts"]) for r in results)):
            counted = [r["thoughts"][thought] for r in results if thought < len(r["thoughts"])]
            share = {key: [c[key] / c["n"] for c in counted] for key in ("reads", "leads_to", "chance")}
            rows.append([
                variant,
                first["visual_latents"],
                f"{thought + 1} (step {thought // first['c_thought'] + 1})",
                len(counted),
                counted[0]["n"],
                report.spread(share["reads"], 2),
                report.spread(share["leads_to"], 2),
                f"{sum(share['chance']) / len(counted):.2f}",
            ])  # fmt: skip
    header = ["variant", "patches", "thought", "seeds", "records", "its step's cell", "the cell it leads to", "chance"]
    return f"# {folder}: the cells the thoughts' patches cover, on {first['records']}\n\n" + report.format_table(
        header, rows
    )


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python tools/patch_cells.py FOLDER --records FILE`: probe every visual-latent run once, write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an ablation's save_path, e.g. results/visual")
    parser.add_argument("--records", required=True, help="grid demo records, e.g. data/grid/test.jsonl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for variant in sorted(path for path in args.folder.iterdir() if path.is_dir()):
        for run in sorted(variant.glob("seed*"), key=lambda path: int(path.name.removeprefix("seed"))):
            cached, export = run / "test-probe" / "cells.json", run / "final" / "coconut.json"
            if not cached.exists():
                if not export.exists():
                    continue  # still training: its export is written last
                if not json.loads(export.read_text())["config"].get("visual_latents"):
                    continue
                print(f"probe: {run}", flush=True)
                cached.parent.mkdir(exist_ok=True)
                atomic_write_text(cached, json.dumps(probe_cells(run, args.records, torch.device(args.device))))
            result = json.loads(cached.read_text())
            if result["records"] != args.records:
                raise UserError(
                    f"{cached}: probed on {result['records']}, not {args.records}; delete it to probe again"
                )
            runs.setdefault(variant.name, []).append(result)
    if not runs:
        raise UserError(f"{args.folder}: no finished run of a visual-latent model (<variant>/seed<k>/final)")
    table = cells_table(args.folder, runs)
    atomic_write_text(args.folder / "patch_cells.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
