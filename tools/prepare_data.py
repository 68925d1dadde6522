"""Turn ScienceQA, M3CoT, A-OKVQA and the Coconut paper's text sets into this repo's reasoning records.

    python tools/prepare_data.py {scienceqa,m3cot,aokvqa,gsm8k,prontoqa,prosqa} --source SRC --out OUT_DIR [--split ...]

For the image sets, SRC is a Hugging Face hub id, a folder written by ``DatasetDict.save_to_disk``, a folder of
parquet files (the hub's ``data/<split>-*.parquet`` layout) or the data set's original JSON release: ScienceQA's
folder with ``problems.json`` and ``images/``, or A-OKVQA's folder with ``aokvqa_v1p0_<split>.json`` plus
``--coco-root``. For GSM8k, ProntoQA and ProsQA (text only), SRC is a folder holding the files the original Coconut
(arXiv 2412.06769, github.com/facebookresearch/coconut) trains on, ``gsm_<split>.json``, ``prontoqa_<split>.json``
or ``prosqa_<split>.json`` with split train, valid or test.
For every split it writes ``OUT_DIR/<split>.jsonl`` (one record a line), the images under
``OUT_DIR/images/<split>/`` and ``OUT_DIR/skipped_<split>.jsonl``, which gives the id and the reason of every
source record that was not written.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError
from PIL import Image, UnidentifiedImageError

from scoring import LETTERS
from utils import UserError, entry_point

SPLITS = ("train", "val", "test")
# Split names used by the hub and the original releases, mapped to the file names written here.
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "dev": "val", "test": "test"}
HUB_IDS = {"scienceqa": "derek-thomas/ScienceQA", "m3cot": "LightChen2333/M3CoT", "aokvqa": "HuggingFaceM4/A-OKVQA"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# The original Coconut's data files: <prefix>_{train,valid,test}.json, each a JSON list of records with these keys
# (ProsQA's also carry its graph, kept in meta). Its GSM8k files come from GSM8k-Aug, written by its
# preprocessing/gsm_icot.bash; its ProntoQA files by preprocessing/prontoqa.py; ProsQA's are published in its data/.
COCONUT_FILES = {"gsm8k": "gsm", "prontoqa": "prontoqa", "prosqa": "prosqa"}
COCONUT_KEYS = ("question", "steps", "answer")
PROSQA_GRAPH = ("idx_to_symbol", "edges", "root", "target", "neg_target")
# The image sets' rationales run to many sentences; the paper's text sets keep their steps as published, since its
# curriculum (stage k replaces the first k steps) counts them.
DEFAULT_MAX_STEPS = 6
SAFE_NAME = re.compile(r"[^\w.-]")
# Columns each converter reads, checked before any record is written so that a wrong source is named at once.
# A-OKVQA's answer and rationales are optional: its test split is published without them.
COLUMNS = {
    "scienceqa": tuple(
        "image question choices answer hint grade subject topic category skill lecture solution".split()
    ),
    "m3cot": tuple("id image question choices context answer rationale domain topic category".split()),
    "aokvqa": ("image", "question_id", "question", "choices"),
}
SCIENCEQA_RELEASE_KEYS = COLUMNS["scienceqa"] + ("split",)
AOKVQA_RELEASE_KEYS = ("image_id", "question_id", "question", "choices")
# "e.g. Earth" or "Mr. Lee" must not end a sentence; Python lookbehinds need one fixed width each.
SENTENCE_END = re.compile(
    r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bvs\.)"
    r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])"
)


@dataclass
class Options:
    """How rationales become steps, and which source records are kept."""

    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS for the image sets; the paper's text sets keep theirs
    max_step_chars: int | None = None
    with_lecture: bool = False
    all_questions: bool = False
    coco_root: Path | None = None


@dataclass
class Item:
    """One converted source record; ``image`` is still the source's image (a file path or hub bytes)."""

    id: str
    image: Path | dict[str, Any] | None
    question: str
    steps: list[str]
    answer: str | None
    choices: list[str]
    meta: dict[str, Any]


@dataclass
class SplitSummary:
    """What ``prepare`` did with one split: records written and, per reason, records skipped."""

    split: str
    records_file: Path
    skipped_file: Path
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        """Return the one-line summary that the command prints for this split."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        return (
            f"{self.split}: wrote {self.written} records to {self.records_file}; "
            f"skipped {self.skipped.total()} (listed in {self.skipped_file}){': ' + reasons if reasons else ''}"
        )


def split_sentences(text: str) -> list[str]:
    """Split a rationale into sentences, one step each.

    Lines are split first (rationales often put one step a line), then each line at sentence ends; runs of
    whitespace inside a sentence become single spaces, so that no step holds a newline, which separates the
    steps in the training sequence.
    """
    sentences = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            sentences.extend(SENTENCE_END.split(line))
    return sentences


def limit_steps(steps: Sequence[str], max_steps: int | None, max_step_chars: int | None = None) -> list[str]:
    """Merge adjacent steps until there are at most ``max_steps`` (None: no limit), never dropping text.

    With ``max_step_chars``, consecutive steps are first packed into one while the packed step stays within that
    many characters (a longer step stays on its own, uncut). Then, while there are too many steps, the adjacent
    pair with the shortest combined text is merged, which keeps the steps of similar length.
    """
    merged: list[str] = []
    for step in steps:
        if max_step_chars and merged and len(merged[-1]) + 1 + len(step) <= max_step_chars:
            merged[-1] = f"{merged[-1]} {step}"
        else:
            merged.append(step)
    while max_steps is not None and len(merged) > max_steps:
        i = min(range(len(merged) - 1), key=lambda k: len(merged[k]) + len(merged[k + 1]))
        merged[i : i + 2] = [f"{merged[i]} {merged[i + 1]}"]
    return merged


def format_question(question: str, choices: Sequence[str], context: str = "") -> str:
    """Return the question text the model reads: the question, its context if any, and the lettered options."""
    lines = [question.strip()]
    if context.strip():
        lines.append(f"Context: {context.strip()}")
    lines.append("Options: " + " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices)))
    return "\n".join(lines)


def option_letter(index: int | None, choices: Sequence[str]) -> str | None:
    """Return the letter of option ``index``, or None when there is no such option (or no answer at all)."""
    return LETTERS[index] if index is not None and 0 <= index < len(choices) else None


def convert_scienceqa(row: dict[str, Any], split: str, index: int, options: Options) -> Item:
    """Convert a ScienceQA question: the hint is its context, the solution's sentences are the steps.

    The hub copy has no question ids, so its records are named by split and position; the original release's
    records keep their problem id.
    """
    choices = list(row["choices"])
    steps = split_sentences(row["solution"] or "")
    if options.with_lecture:
        steps = split_sentences(row["lecture"] or "") + steps
    pid = row.get("pid")
    return Item(
        id=f"scienceqa-{pid}" if pid else f"scienceqa-{split}-{index}",
        image=row["image"],
        question=format_question(row["question"], choices, row["hint"] or ""),
        steps=steps,
        answer=option_letter(row["answer"], choices),
        choices=choices,
        meta={"dataset": "scienceqa", **{key: row[key] for key in ("subject", "grade", "topic", "category", "skill")}},
    )


def convert_m3cot(row: dict[str, Any], split: str, index: int, options: Options) -> Item:
    """Convert an M3CoT question: its context and lettered answer as published, the rationale's sentences as steps."""
    choices = list(row["choices"])
    answer = (row["answer"] or "").strip().upper()
    return Item(
        id=f"m3cot-{row['id']}",
        image=row["image"],
        question=format_question(row["question"], choices, row["context"] or ""),
        steps=split_sentences(row["rationale"] or ""),
        answer=answer if len(answer) == 1 and answer in LETTERS[: len(choices)] else None,
        choices=choices,
        meta={"dataset": "m3cot", **{key: row[key] for key in ("domain", "topic", "category")}},
    )


def convert_aokvqa(row: dict[str, Any], split: str, index: int, options: Options) -> Item:
    """Convert an A-OKVQA question in its multiple-choice form.

    The steps are the sentences of its three rationales, each kept once: annotators often repeat one another.
    """
    choices = list(row["choices"])
    steps, seen = [], set()
    for rationale in row.get("rationales") or []:
        for sentence in split_sentences(rationale):
            key = " ".join(re.sub(r"[^\w\s]", " ", sentence.lower()).split())
            if key not in seen:
                seen.add(key)
                steps.append(sentence)
    return Item(
        id=f"aokvqa-{row['question_id']}",
        image=row["image"],
        question=format_question(row["question"], choices),
        steps=steps,
        answer=option_letter(row.get("correct_choice_idx"), choices),
        choices=choices,
        meta={
            "dataset": "aokvqa",
            "question_id": row["question_id"],
            "difficult_direct_answer": row.get("difficult_direct_answer"),
        },
    )


def convert_coconut(row: dict[str, Any], split: str, index: int, options: Options) -> Item:
    """Convert a record of the original Coconut's GSM8k, ProntoQA or ProsQA files (``row["dataset"]`` names which,
    set by ``coconut_release``): question, steps and answer as published, ids by split and position as the files
    have none. ProsQA's graph (``idx_to_symbol``, ``edges``, ``root``, ``target``, ``neg_target``) goes into meta
    for analyses of what the thoughts encode."""
    dataset = row["dataset"]
    answer = str(row["answer"]).strip()
    return Item(
        id=f"{dataset}-{split}-{index}",
        image=None,
        question=row["question"].strip(),
        steps=[step.strip() for step in row["steps"] if step.strip()],
        answer=answer or None,
        choices=[],
        meta={"dataset": dataset, **{key: row[key] for key in PROSQA_GRAPH if key in row}},
    )


CONVERTERS: dict[str, Callable[[dict[str, Any], str, int, Options], Item]] = {
    "scienceqa": convert_scienceqa,
    "m3cot": convert_m3cot,
    "aokvqa": convert_aokvqa,
    **dict.fromkeys(COCONUT_FILES, convert_coconut),
}


def skip_reason(item: Item, options: Options) -> str | None:
    """Return why ``item`` cannot become a training record, or None when it can."""
    if item.answer is None:
        return "no answer among the options" if item.choices else "no answer"
    if not item.steps:
        return "no reasoning steps"
    if item.image is None and not options.all_questions and item.meta["dataset"] not in COCONUT_FILES:
        return "text-only question (--all-questions keeps it)"
    return None


def read_json(path: Path) -> Any:
    """Read a JSON file of an original release, turning a broken file into a one-line error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); download it again") from None


def require(keys: Iterable[str], needed: Sequence[str], where: str, dataset: str) -> None:
    """Stop with the name of the first column of ``needed`` that ``keys`` lacks."""
    present = set(keys)
    for key in needed:
        if key not in present:
            raise UserError(
                f"{where} has no column '{key}' (it has: {', '.join(sorted(present))}); "
                f"is this the {HUB_IDS.get(dataset) or COCONUT_FILES[dataset] + '_<split>.json'} data set?"
            )


def scienceqa_release(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Read ScienceQA's original release: ``problems.json`` and ``images/<split>/<pid>/image.png``."""
    splits: dict[str, list[dict[str, Any]]] = {}
    for pid, problem in read_json(root / "problems.json").items():
        where = f"problem {pid} of {root / 'problems.json'}"
        require(problem, SCIENCEQA_RELEASE_KEYS, where, "scienceqa")
        if problem["split"] not in SPLIT_NAMES:
            raise UserError(f"{where} has the unknown split '{problem['split']}'; expected train, val or test")
        image = root / "images" / problem["split"] / pid / problem["image"] if problem["image"] else None
        splits.setdefault(SPLIT_NAMES[problem["split"]], []).append({**problem, "pid": pid, "image": image})
    return splits


def aokvqa_release(root: Path, coco_root: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Read A-OKVQA's original release, whose images are COCO 2017's ``<split>2017/<image_id:012d>.jpg``."""
    if coco_root is None:
        raise UserError(
            f"{root} holds A-OKVQA's JSON release, which has no images; pass --coco-root, the folder that "
            "holds COCO 2017's train2017/, val2017/ and test2017/"
        )
    splits = {}
    for file in sorted(root.glob("aokvqa_v1p0_*.json")):
        split = file.stem.removeprefix("aokvqa_v1p0_")
        if split not in SPLIT_NAMES:
            raise UserError(f"cannot tell the split of {file}; expected aokvqa_v1p0_{{train,val,test}}.json")
        rows = []
        for n, question in enumerate(read_json(file)):
            require(question, AOKVQA_RELEASE_KEYS, f"record {n} of {file}", "aokvqa")
            image = coco_root / f"{split}2017" / f"{question['image_id']:012d}.jpg"
            rows.append({**question, "image": image})
        splits[SPLIT_NAMES[split]] = rows
    return splits


def coconut_release(root: Path, dataset: str) -> dict[str, list[dict[str, Any]]]:
    """Read the original Coconut's ``<prefix>_{train,valid,test}.json`` files of ``dataset`` found in ``root``."""
    prefix = COCONUT_FILES[dataset]
    splits = {}
    for split in ("train", "valid", "test"):
        file = root / f"{prefix}_{split}.json"
        if not file.is_file():
            continue
        rows = read_json(file)
        if not isinstance(rows, list):
            raise UserError(f"{file} is not a JSON list of records; pass the original Coconut's {prefix}_{split}.json")
        for n, row in enumerate(rows):
            where = f"record {n} of {file}"
            require(row if isinstance(row, dict) else {}, COCONUT_KEYS, where, dataset)
            steps = row["steps"]
            if not isinstance(row["question"], str) or not (
                isinstance(steps, list) and all(isinstance(step, str) for step in steps)
            ):
                raise UserError(
                    f"{where}: 'question' must be a string and 'steps' a list of strings; is this the original "
                    f"{file.name}?"
                )
        splits[SPLIT_NAMES[split]] = [{**row, "dataset": dataset} for row in rows]
    if not splits:
        raise UserError(
            f"{root} holds none of {prefix}_train.json, {prefix}_valid.json, {prefix}_test.json; pass the folder "
            f"with the original Coconut's {dataset} files (see docs/data.md)"
        )
    return splits


def first_line(error: BaseException) -> str:
    """Return the first line of an error's message (its cause's, when it has one) for a one-line report."""
    error = error.__cause__ or error
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def parquet_split(file: Path) -> str:
    """Return the split of a parquet file named like the hub's ``<split>-00000-of-00001.parquet``."""
    name = file.name.split("-")[0].removesuffix(".parquet")
    if name not in SPLIT_NAMES:
        raise UserError(f"cannot tell the split of {file}; name it <split>-*.parquet, split train, validation or test")
    return SPLIT_NAMES[name]


def load_local(path: Path, dataset: str) -> datasets.DatasetDict:
    """Load a ``save_to_disk`` folder, or a folder of parquet files (in it, or in its ``data/`` as on the hub)."""
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if (path / "state.json").is_file():
        raise UserError(
            f"{path} holds one saved split; save the splits together, e.g. "
            "DatasetDict({'train': ds}).save_to_disk(...), and pass that folder"
        )
    files: dict[str, list[str]] = {}
    for file in sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet")):
        files.setdefault(parquet_split(file), []).append(str(file))
    if not files:
        release = {"scienceqa": ", no problems.json", "aokvqa": ", no aokvqa_v1p0_<split>.json"}.get(dataset, "")
        raise UserError(
            f"{path} has no dataset_dict.json (from save_to_disk), no *.parquet files in it or in data/{release}; "
            "pass a folder in one of those formats (see --help)"
        )
    try:
        return datasets.load_dataset("parquet", data_files=files)
    except (DatasetGenerationError, ValueError, OSError) as error:
        raise UserError(
            f"could not read the parquet files of {path} as one data set ({first_line(error)}); "
            "pass a folder that holds only this data set's parquet files"
        ) from None


def load_hub(hub_id: str) -> datasets.DatasetDict:
    """Load a data set from the Hugging Face hub."""
    try:
        return datasets.load_dataset(hub_id)
    except Exception as error:  # offline, unknown or gated: every failure ends the run with the same advice
        raise UserError(
            f"{hub_id} is not a local folder and loading it from the Hugging Face hub failed ({first_line(error)}); "
            "check the path, or download the data set on a machine with internet (see docs/data.md)"
        ) from None


def checked_splits(splits: datasets.DatasetDict, dataset: str, source: str) -> dict[str, datasets.Dataset]:
    """Check a DatasetDict's columns and return its splits under this script's split names."""
    out = {}
    for name, split in splits.items():
        if name not in SPLIT_NAMES:
            print(f"note: ignoring split '{name}' of {source}: not train, validation or test")
            continue
        require(split.column_names, COLUMNS[dataset], f"split '{name}' of {source}", dataset)
        if isinstance(split.features["image"], datasets.Image):
            # Undecoded, the published PNG/JPEG bytes are written as they are rather than decoded and re-encoded.
            split = split.cast_column("image", datasets.Image(decode=False))
        out[SPLIT_NAMES[name]] = split
    return out


def load_source(dataset: str, source: str, coco_root: Path | None) -> dict[str, Iterable[dict[str, Any]]]:
    """Return the rows of each split of ``source``, whichever of the supported formats it is in."""
    path = Path(source)
    if dataset in COCONUT_FILES:
        if not path.is_dir():
            raise UserError(
                f"--source {source} is not a folder; pass the folder that holds {COCONUT_FILES[dataset]}_<split>.json"
            )
        return coconut_release(path, dataset)
    if path.is_dir():
        if dataset == "scienceqa" and (path / "problems.json").is_file():
            return scienceqa_release(path)
        if dataset == "aokvqa" and any(path.glob("aokvqa_v1p0_*.json")):
            return aokvqa_release(path, coco_root)
        return checked_splits(load_local(path, dataset), dataset, source)
    if path.exists():
        raise UserError(f"--source {source} is a file; pass the folder that holds the data set")
    if HUB_ID.fullmatch(source):
        return checked_splits(load_hub(source), dataset, source)
    raise UserError(
        f"source folder {source} does not exist; pass an existing folder or a hub id such as {HUB_IDS[dataset]}"
    )


def save_image(image: Path | dict[str, Any], out_dir: Path, split: str, record_id: str) -> str:
    """Write a record's image under ``out_dir/images/<split>/`` and return its path relative to ``out_dir``.

    PNG and JPEG files are copied byte for byte; other formats are converted to PNG.
    """
    if isinstance(image, dict) and image.get("bytes"):
        data = image["bytes"]
    elif isinstance(image, (Path, dict)):
        file = image if isinstance(image, Path) else Path(image.get("path") or "")
        if not file.is_file():
            raise UserError(
                f"record {record_id}: image file {file} is missing; unpack the data set's images where its "
                "release puts them (or check --coco-root)"
            )
        data = file.read_bytes()
    else:
        raise UserError(f"record {record_id}: its image is a {type(image).__name__}, not an image file or bytes")
    try:
        picture = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UserError(f"record {record_id}: its image is not a readable image file") from None
    suffix = {"PNG": ".png", "JPEG": ".jpg"}.get(picture.format, ".png")
    relative = f"images/{split}/{SAFE_NAME.sub('_', record_id)}{suffix}"
    target = out_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if picture.format in ("PNG", "JPEG"):
        target.write_bytes(data)
    else:
        picture.save(target, format="PNG")
    return relative


def write_split(
    dataset: str, split: str, rows: Iterable[dict[str, Any]], out_dir: Path, options: Options
) -> SplitSummary:
    """Convert one split's rows and write its records file, skipped file and images."""
    max_steps = options.max_steps or (None if dataset in COCONUT_FILES else DEFAULT_MAX_STEPS)
    summary = SplitSummary(split, out_dir / f"{split}.jsonl", out_dir / f"skipped_{split}.jsonl")
    with (
        summary.records_file.open("w", encoding="utf-8") as records,
        summary.skipped_file.open("w", encoding="utf-8") as skipped,
    ):
        for index, row in enumerate(rows):
            item = CONVERTERS[dataset](row, split, index, options)
            reason = skip_reason(item, options)
            if reason:
                skipped.write(json.dumps({"id": item.id, "reason": reason}, ensure_ascii=False) + "\n")
                summary.skipped[reason] += 1
                continue
            record = {
                "id": item.id,
                "image": None if item.image is None else save_image(item.image, out_dir, split, item.id),
                "question": item.question,
                "steps": limit_steps(item.steps, max_steps, options.max_step_chars),
                "answer": item.answer,
                **({"choices": item.choices} if item.choices else {}),  # open answers (the text sets): none
                "meta": item.meta,
            }
            records.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.written += 1
    return summary


def prepare(
    dataset: str, source: str, out_dir: Path, options: Options, splits: Sequence[str] | None = None
) -> list[SplitSummary]:
    """Prepare ``splits`` (default: every split the source has) of ``dataset`` into ``out_dir``."""
    rows = load_source(dataset, source, options.coco_root)
    wanted = list(dict.fromkeys(SPLIT_NAMES[s] for s in splits)) if splits else [s for s in SPLITS if s in rows]
    for split in wanted:
        if split not in rows:
            raise UserError(f"{source} has no '{split}' split (it has: {', '.join(sorted(rows))})")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_split(dataset, split, rows[split], out_dir, options) for split in wanted]


def positive_int(text: str) -> int:
    """Parse a command-line count that must be at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


@entry_point
def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line: prepare the splits, then print one summary line per split."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--source", required=True, help="hub id, save_to_disk folder, parquet folder or release")
    parser.add_argument("--out", required=True, type=Path, help="folder for <split>.jsonl and images/")
    parser.add_argument("--split", nargs="+", choices=sorted(SPLIT_NAMES), help="default: every split found")
    parser.add_argument(
        "--max-steps", type=positive_int, help=f"merge steps down to this many (image sets: {DEFAULT_MAX_STEPS})"
    )
    parser.add_argument(
        "--max-step-chars", type=positive_int, help="pack adjacent sentences into a step up to this length"
    )
    parser.add_argument("--with-lecture", action="store_true", help="ScienceQA: lecture sentences before the solution")
    parser.add_argument("--all-questions", action="store_true", help="keep questions without an image")
    parser.add_argument("--coco-root", type=Path, help="A-OKVQA JSON release: folder with train2017/, val2017/")
    args = parser.parse_args(argv)
    options = Options(args.max_steps, args.max_step_chars, args.with_lecture, args.all_questions, args.coco_root)
    for summary in prepare(args.dataset, args.source, args.out, options, args.split):
        print(summary.line())


if __name__ == "__main__":
    main()
