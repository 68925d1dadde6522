"""The command line of inference.py: answers from an exported model (`run.py`'s final/ or stage_<k>/ folder), what
its thoughts decode to, and a comparison of methods on one test set.

    python infer.py FOLDER --image IMG --question "from h" [--stage K] [--probe 5]
    python infer.py FOLDER --records test.jsonl [--out FOLDER] [--probe 5] [--blank-images] [--thoughts noise]
    python infer.py compare no_cot=A cot=B coconut=C --records test.jsonl [--blank coconut] [--controls coconut]

The mode (coconut, cot, no_cot) and the prompt format come from the folder's coconut.json, the number of thoughts
from its stage unless `--stage` sets another. `--probe K` decodes every continuous thought through the language
model head, as the Coconut paper does, and reports its top-K tokens; for a visual-latent model also the image
patches each thought chose (with --records, drawn on the images: <out>/patches/<index>.png). `--thoughts
noise|zeros|pause` replaces every continuous thought by Gaussian noise of its norm, zeros, or the `<|latent|>`
embedding: a thought that carries information costs accuracy when replaced. `--thoughts random_patches` (a
visual-latent model) keeps the thoughts but gives their patch positions seeded random image patches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import report
from coconut import THOUGHT_CONTROLS
from evaluate import Controls, write_evaluation
from inference import ask, compare, load_exported, predict_records
from scoring import format_report
from utils import UserError, entry_point


def format_thought(n: int, tokens: list[dict]) -> str:
    """One thought's probe as a console line: thought 1: 'red' 0.41 | 'blue' 0.22 ..."""
    return f"thought {n}: " + " | ".join(f"{t['token']!r} {t['prob']:.2f}" for t in tokens)


def format_patches(n: int, indices: list[int], tokens_per_tile: int) -> str:
    """The patches one thought chose as a console line: thought 1 looked at: tile 0 cell 3, tile 1 cell 12"""
    cells = ", ".join(f"tile {i // tokens_per_tile} cell {i % tokens_per_tile}" for i in indices)
    return f"thought {n} looked at: {cells or 'no image'}"


def format_summary(result: dict) -> str:
    """`evaluate.summarize` output as one console line."""
    return (
        f"accuracy {result['accuracy']:.3f} | mean generated tokens {result['gen_tokens']:.1f} | "
        f"mean latency {1000 * result['latency_s']:.1f} ms/example | {result['n']} examples"
    )


def _parse_methods(pairs: list[str], blank: list[str], controlled: list[str]) -> dict[str, str]:
    """NAME=FOLDER arguments as {name: folder}; a malformed pair, a repeated name or an unknown --blank or
    --controls name stops."""
    methods = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"compare: '{pair}' is not NAME=FOLDER; write e.g. coconut=checkpoints/demo/final")
        if name in methods:
            raise UserError(f"compare: method name '{name}' is given twice")
        methods[name] = folder
    for option, names in (("--blank", blank), ("--controls", controlled)):
        unknown = [name for name in names if name not in methods]
        if unknown:
            raise UserError(f"compare: {option} {unknown[0]} names no method; choose from {', '.join(methods)}")
    return methods


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low`."""

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {low}, got {text!r}")
        return int(text)

    return parse


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_at_least(1), help="default: eval_batch_size of coconut.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def answer_main(argv: list[str]) -> None:
    """`python infer.py FOLDER (--image IMG --question Q | --records FILE) ...`: answers, accuracy, probes."""
    parser = argparse.ArgumentParser(
        description="Answer questions with an exported Coconut model.",
        epilog="To compare methods on one test set: python infer.py compare NAME=FOLDER ... --records FILE "
        "(see python infer.py compare --help).",
    )
    parser.add_argument("folder", help="an exported folder (with coconut.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--question", help="one question (with --image, or text only)")
    source.add_argument("--records", help="a records file (JSON or JSONL) to answer and score")
    parser.add_argument("--image", help="the image the --question is about")
    parser.add_argument(
        "--stage",
        type=_at_least(0),
        help="curriculum stage of the prompts (its number of thoughts); default: coconut.json's",
    )
    parser.add_argument("--probe", type=_at_least(0), default=0, metavar="K", help="show each thought's top-K tokens")
    parser.add_argument("--blank-images", action="store_true", help="replace every image tile with zeros")
    parser.add_argument(
        "--thoughts", choices=THOUGHT_CONTROLS, default="model", help="replace every continuous thought (a control)"
    )
    parser.add_argument("--out", help="folder for eval.json and predictions.jsonl; default: <records>.eval/")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    if args.image and args.records:
        parser.error("--image goes with --question; a records file names its own images")
    exported = load_exported(args.folder, torch.device(args.device))
    if args.thoughts == "random_patches" and not exported.model.visual_latents:
        raise UserError(f"{args.folder}: --thoughts random_patches needs a model trained with visual_latents > 0")
    stage = exported.stage if args.stage is None else args.stage
    print(f"{args.folder}: {exported.mode}, stage {stage}", file=sys.stderr)
    if args.question is not None:
        controls = Controls(args.blank_images, args.thoughts)
        row, thoughts, patches = ask(exported, args.image, args.question, stage, args.probe, controls)
        print(f"answer: {row['prediction']}  ({row['gen_tokens']} tokens, {1000 * row['latency_s']:.0f} ms)")
        for n, tokens in enumerate(thoughts, 1):
            print(format_thought(n, tokens))
            if exported.model.visual_latents:
                print(format_patches(n, patches[n - 1], exported.vision.tokens_per_tile))
        return
    batch_size = args.batch_size or exported.config.eval_batch_size
    controls = Controls(args.blank_images, args.thoughts)
    out = Path(args.out or Path(args.records).with_suffix(".eval"))
    rows = predict_records(exported, args.records, stage, batch_size, args.probe, controls, out / "patches")
    result = write_evaluation(out, rows, stage, args.records, controls)
    print(format_summary(result))
    if any(row["meta"] for row in rows):  # per data set and category, as the data sets' papers report accuracy
        print(format_report(result["groups"]))
    print(f"results: {out / 'eval.json'}, predictions: {out / 'predictions.jsonl'}")


def compare_main(argv: list[str]) -> None:
    """`python infer.py compare NAME=FOLDER ... --records FILE [--blank NAME] [--controls NAME]`: the table,
    compare.json, the plot."""
    parser = argparse.ArgumentParser(prog="infer.py compare", description="Compare exported models on one test set.")
    parser.add_argument("methods", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--records", required=True, help="the records file every method answers")
    parser.add_argument("--blank", action="append", default=[], metavar="NAME", help="also run NAME on blank images")
    parser.add_argument(
        "--controls", action="append", default=[], metavar="NAME",
        help="also run NAME with its thoughts replaced by noise, zeros and the latent token (pause), and for a "
        "visual-latent model with random patches",
    )  # fmt: skip
    parser.add_argument("--out", help="folder for compare.json and compare.png; default: the records' folder")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    methods = _parse_methods(args.methods, args.blank, args.controls)
    controls = {name: [] for name in methods}
    for name in args.blank:
        controls[name].append(Controls(blank_images=True))
    for name in args.controls:
        controls[name] += [Controls(thoughts=kind) for kind in THOUGHT_CONTROLS if kind != "model"]
    rows = compare(methods, args.records, controls, args.batch_size, torch.device(args.device))
    out = Path(args.out or Path(args.records).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"records": args.records, "methods": rows}, indent=2))
    print(report.method_table(rows))
    print(f"results: {out / 'compare.json'}")
    print(f"plot: {report.plot_methods(rows, out / 'compare.png')}")


@entry_point
def main(argv: list[str] | None = None) -> None:
    """The command line: `compare ...` compares methods, anything else answers with one folder."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare_main(argv[1:])
    else:
        answer_main(argv)


if __name__ == "__main__":
    main()
