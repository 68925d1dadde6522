"""Answers from an exported model (`run.py`'s final/ or stage_<k>/ folder), what its thoughts decode to, and a
comparison of methods on one test set.

    python infer.py FOLDER --image IMG --question "start 2,1; 3 moves" [--stage K] [--probe 5]
    python infer.py FOLDER --records test.jsonl [--out FOLDER] [--probe 5] [--blank-images] [--thoughts noise]
    python infer.py compare no_cot=A cot=B coconut=C --records test.jsonl [--blank coconut] [--controls coconut]

The mode (coconut, cot, no_cot) and the prompt format come from the folder's coconut.json, the number of thoughts
from its stage unless `--stage` sets another. `--probe K` decodes every continuous thought through the language
model head, as the Coconut paper does, and reports its top-K tokens. `--thoughts noise|zeros|pause` replaces every
continuous thought by Gaussian noise of its norm, zeros, or the `<|latent|>` embedding: a thought that carries
information costs accuracy when replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

import report
from checkpoint import PROJECTION_FILE
from coconut import THOUGHT_CONTROLS, Coconut
from config import Config
from dataset import CoconutDataset, collate
from distributed import Job, autocast_context, dist_info
from evaluate import (
    NO_CONTROLS,
    Controls,
    batch_pixels,
    generate_and_score,
    generate_answers,
    summarize,
    write_evaluation,
)
from models import build_model, encoding_for
from records import load_records
from scoring import format_report
from utils import UserError, entry_point


@dataclass
class Exported:
    """A model loaded from an exported folder, with its tokenizer, its training config, the stage it reached and the
    job (device, autocast) it runs in."""

    model: Coconut
    tokenizer: PreTrainedTokenizerBase
    config: Config
    stage: int
    job: Job

    @property
    def mode(self) -> str:
        """coconut, cot or no_cot: the one that training set."""
        return next(mode for mode in ("coconut", "cot", "no_cot") if getattr(self.config, mode))


def load_exported(folder: str, device: torch.device) -> Exported:
    """Load an exported folder onto `device` in eval mode; a folder that is not one stops with one line."""
    path = Path(folder)
    run_file = path / "coconut.json"
    if not run_file.is_file():
        raise UserError(f"{folder}: no coconut.json, so not a folder exported by run.py; use <run>/final or stage_<k>")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{folder}: no model weights (model.safetensors); export the model again")
    try:
        run = json.loads(run_file.read_text())
        values = dict(run["config"])
        # JSON turned the integer stage keys of stage_overrides into strings
        values["stage_overrides"] = {int(k): v for k, v in values.get("stage_overrides", {}).items()}
        config, stage = Config(**values), int(run["stage"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{run_file}: not a coconut.json written by run.py ({err})") from None
    if config.thought_feedback == "projected" and not (path / PROJECTION_FILE).is_file():
        raise UserError(f"{folder}: a projected model without {PROJECTION_FILE}; export the model again")
    model, tokenizer = build_model(dataclasses.replace(config, load_model_path=folder))
    # unwrapped here, so `bf16` means autocast (training under FSDP2 cast through its policy instead)
    job = Job(dist_info(), device, autocast_context(dataclasses.replace(config, use_fsdp=False), device))
    return Exported(model.to(device).eval(), tokenizer, config, stage, job)


def open_prompts(exported: Exported, records: str, stage: int) -> CoconutDataset:
    """Evaluation prompts of a records file at `stage`, built as training built them."""
    if not Path(records).is_file():
        raise UserError(f"{records}: records file not found")
    return prompts_of(exported, load_records(records), records, stage)


def prompts_of(
    exported: Exported, records: list[dict], source: str, stage: int, pad_latents: bool = False
) -> CoconutDataset:
    """`records` (read from `source`) as evaluation prompts at `stage`, built as training built them.

    `pad_latents` gives every prompt the stage's full number of thoughts, which a question without written steps
    needs (the number of thoughts is otherwise capped at the record's step count).
    """
    config = dataclasses.replace(exported.config, pad_latent_to_max=exported.config.pad_latent_to_max or pad_latents)
    prompts = CoconutDataset(records, encoding_for(exported.model.base, exported.tokenizer, config), source).prompts()
    prompts.set_stage(stage)
    return prompts


@torch.no_grad()
def _warm_up(exported: Exported, prompts: CoconutDataset, controls: Controls) -> None:
    """One untimed generation: it keeps one-time start-up work (CUDA kernels, allocator) out of the first batch's
    latency, so that methods evaluated one after another are timed alike."""
    device = exported.job.device
    first = collate([prompts[0]], prompts.pad_id, prompts.latent_id)
    with exported.job.autocast():
        exported.model.generate(
            first["input_ids"].to(device),
            first["attention_mask"].to(device),
            pixel_values=batch_pixels(first, device, controls),
            max_new_tokens=1,
            thoughts=controls.thoughts,
        )


def answer(
    exported: Exported, prompts: CoconutDataset, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[dict]:
    """`evaluate.generate_and_score` rows for every prompt, timed after a warm-up."""
    _warm_up(exported, prompts, controls)
    return generate_and_score(exported.model, prompts, exported.job, batch_size, controls)


@torch.no_grad()
def probe_thoughts(
    exported: Exported, prompts: CoconutDataset, k: int, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[list[list[dict]]]:
    """Per prompt, per continuous thought in order: the top-k tokens the thought decodes to through the language
    model head, as [{"token", "id", "prob"}], most probable first.

    A thought is the input embedding `Coconut.forward` put at a latent position (the last hidden state before
    it), so its decoding is also the model's next-token distribution at the position before the latent.
    """
    head = exported.model.base.get_output_embeddings()
    decode, device = exported.tokenizer.decode, exported.job.device
    probes = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="probe", leave=False):
        items = [prompts[i] for i in range(start, min(start + batch_size, len(prompts)))]
        batch = collate(items, prompts.pad_id, prompts.latent_id)
        input_ids = batch["input_ids"].to(device)
        latent = input_ids == prompts.latent_id
        with exported.job.autocast():
            embeds = exported.model(
                input_ids,
                batch["attention_mask"].to(device),
                pixel_values=batch_pixels(batch, device, controls),
                thoughts=controls.thoughts,
            ).inputs_embeds
            # float before the softmax: bf16 probabilities over a large vocabulary round badly
            top = head(embeds[latent]).float().softmax(-1).topk(k)
        thoughts = [
            [{"token": decode([i]), "id": i, "prob": p} for i, p in zip(ids, probs)]
            for ids, probs in zip(top.indices.tolist(), top.values.tolist())
        ]
        for count in latent.sum(1).tolist():  # `embeds[latent]` lists the thoughts row by row
            probes.append(thoughts[:count])
            thoughts = thoughts[count:]
    return probes


def format_thought(n: int, tokens: list[dict]) -> str:
    """One thought's probe as a console line: thought 1: 'red' 0.41 | 'blue' 0.22 ..."""
    return f"thought {n}: " + " | ".join(f"{t['token']!r} {t['prob']:.2f}" for t in tokens)


def format_summary(result: dict) -> str:
    """`evaluate.summarize` output as one console line."""
    return (
        f"accuracy {result['accuracy']:.3f} | mean generated tokens {result['gen_tokens']:.1f} | "
        f"mean latency {1000 * result['latency_s']:.1f} ms/example | {result['n']} examples"
    )


def ask(
    exported: Exported, image: str | None, question: str, stage: int, probe: int, controls: Controls = NO_CONTROLS
) -> tuple[dict, list[list[dict]]]:
    """Answer one question (about one image, or text only); returns its `evaluate.generate_answers` row and the
    thoughts' probes (empty without `probe`)."""
    if image is not None and not Path(image).is_file():
        raise UserError(f"--image {image}: file not found")
    # a question has no written steps to count thoughts by: pad_latents gives it the stage's full number
    record = {"image": str(Path(image).resolve()) if image else None, "question": question}
    prompts = prompts_of(exported, [record], "--question", stage, pad_latents=True)
    _warm_up(exported, prompts, controls)
    row = generate_answers(exported.model, prompts, exported.job, 1, controls)[0]
    thoughts = probe_thoughts(exported, prompts, probe, 1, controls)[0] if probe else []
    return row, thoughts


def predict_records(
    exported: Exported, records: str, stage: int, batch_size: int, probe: int, controls: Controls = NO_CONTROLS
) -> list[dict]:
    """Answer rows for every record of a file; with `probe`, each row also holds its thoughts' top tokens."""
    prompts = open_prompts(exported, records, stage)
    rows = answer(exported, prompts, batch_size, controls)
    if probe:
        for row, thoughts in zip(rows, probe_thoughts(exported, prompts, probe, batch_size, controls)):
            row["thoughts"] = thoughts
    return rows


def compare(
    methods: dict[str, str],
    records: str,
    controls: dict[str, list[Controls]],
    batch_size: int | None,
    device: torch.device,
) -> list[dict]:
    """Evaluate each exported folder (at its own mode and stage) on the same records, one row per method, plus a
    row for each of the method's `controls`: method, mode, stage, accuracy, gen_tokens, passes (sequential decoder
    passes), latency_ms, n."""
    rows = []
    for name, folder in methods.items():
        exported = load_exported(folder, device)
        prompts = open_prompts(exported, records, exported.stage)
        size = batch_size or exported.config.eval_batch_size
        runs = [(name, NO_CONTROLS)] + [(f"{name} ({c.label})", c) for c in controls.get(name, [])]
        for method, control in runs:
            result = summarize(answer(exported, prompts, size, control))
            rows.append(
                {
                    "method": method,
                    "mode": exported.mode,
                    "stage": exported.stage,
                    "accuracy": result["accuracy"],
                    "gen_tokens": result["gen_tokens"],
                    "passes": result["passes"],
                    "latency_ms": 1000 * result["latency_s"],
                    "n": result["n"],
                }
            )
        del exported  # one model in memory at a time
    return rows


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
    stage = exported.stage if args.stage is None else args.stage
    print(f"{args.folder}: {exported.mode}, stage {stage}", file=sys.stderr)
    if args.question is not None:
        controls = Controls(args.blank_images, args.thoughts)
        row, thoughts = ask(exported, args.image, args.question, stage, args.probe, controls)
        print(f"answer: {row['prediction']}  ({row['gen_tokens']} tokens, {1000 * row['latency_s']:.0f} ms)")
        for n, tokens in enumerate(thoughts, 1):
            print(format_thought(n, tokens))
        return
    batch_size = args.batch_size or exported.config.eval_batch_size
    controls = Controls(args.blank_images, args.thoughts)
    rows = predict_records(exported, args.records, stage, batch_size, args.probe, controls)
    out = Path(args.out or Path(args.records).with_suffix(".eval"))
    result = write_evaluation(out, rows, stage, args.records)
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
        help="also run NAME with its thoughts replaced by noise, zeros and the latent token (pause)",
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
