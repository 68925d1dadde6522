"""Tests of prepare_data.py on small fixtures written in each source's published schema and layout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import prepare, prepare_error, read_jsonl
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import Image

from prepare_data import limit_steps, split_sentences

ROOT = Path(__file__).resolve().parents[1]

# derek-thomas/ScienceQA's features, as its dataset card lists them.
SCIENCEQA_FEATURES = Features(
    {
        "image": datasets.Image(),
        "question": Value("string"),
        "choices": List(Value("string")),
        "answer": Value("int8"),
        **{
            name: Value("string")
            for name in ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
        },
    }
)
# LightChen2333/M3CoT's features, as its dataset card lists them.
M3COT_FEATURES = Features(
    {
        "id": Value("string"),
        "category": Value("string"),
        "image_id": Value("string"),
        "question": Value("string"),
        "choices": List(Value("string")),
        "context": Value("string"),
        "answer": Value("string"),
        "rationale": Value("string"),
        "split": Value("string"),
        "image": datasets.Image(),
        "domain": Value("string"),
        "topic": Value("string"),
    }
)
# HuggingFaceM4/A-OKVQA's columns; its card's dtypes could not be checked here, so these follow the release's JSON.
AOKVQA_FEATURES = Features(
    {
        "image": datasets.Image(),
        "question_id": Value("string"),
        "question": Value("string"),
        "choices": List(Value("string")),
        "correct_choice_idx": Value("int8"),
        "direct_answers": List(Value("string")),
        "difficult_direct_answer": Value("bool"),
        "rationales": List(Value("string")),
    }
)

MAP_LECTURE = (
    "Maps have four cardinal directions, or main directions. Those directions are north, south, east, and west.\n"
    "A compass rose is a set of arrows that point to the cardinal directions."
)
MAP_SOLUTION = (
    "To find the answer, look at the compass rose. Look at which way the north arrow is pointing. "
    "West Virginia is farthest north."
)
GECKO_SENTENCES = [
    "Look at the picture of the tree frog.",
    "The tree frog has sticky pads on its toes.",
    "Its feet are adapted for sticking to smooth surfaces.",
    "The pads help it climb smooth leaves.",
    "Now look at each animal.",
    "Figure out which animal has a similar adaptation.",
    "The Madagascar day gecko has sticky pads on its toes.",
    "Its feet are adapted for sticking to smooth surfaces.",
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the arrow files that loading parquet writes out of the shared home cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def picture(width: int, height: int, fmt: str = "PNG") -> bytes:
    """Return the bytes of a small one-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (width % 256, height % 256, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def scienceqa_question(**fields: object) -> dict:
    """Return a ScienceQA row with every published column; ``fields`` override the defaults."""
    row = {
        "image": {"bytes": picture(40, 30), "path": None},
        "question": "Which of these states is farthest north?",
        "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
        "answer": 0,
        "hint": "",
        "task": "closed choice",
        "grade": "grade2",
        "subject": "social science",
        "topic": "geography",
        "category": "Geography",
        "skill": "Read a map: cardinal directions",
        "lecture": MAP_LECTURE,
        "solution": MAP_SOLUTION,
    }
    return {**row, **fields}


def scienceqa_hub() -> DatasetDict:
    """Return a small ScienceQA in the hub's splits: train has one record of each kind prepare must handle."""
    train = [
        scienceqa_question(),
        scienceqa_question(
            image={"bytes": picture(50, 20), "path": None},
            question="Which animal's feet are also adapted for sticking to smooth surfaces?",
            choices=["Madagascar day gecko", "bald eagle"],
            hint="Tree frogs live in tropical rain forests.\nFigure: tree frog.",
            grade="grade4",
            subject="natural science",
            topic="biology",
            category="Adaptations",
            skill="Animal adaptations: feet and limbs",
            solution=" ".join(GECKO_SENTENCES[:4]) + "\n" + " ".join(GECKO_SENTENCES[4:]),
        ),
        scienceqa_question(
            image=None,
            question="Which word would you find on a dictionary page with the guide words shore - suit?",
            choices=["stump", "scarf"],
            subject="language science",
            solution="Put the words in alphabetical order. Since stump is between the guide words, it is on the page.",
        ),
        scienceqa_question(image={"bytes": picture(20, 20), "path": None}, solution=""),
    ]
    return DatasetDict(
        {
            "train": Dataset.from_list(train, features=SCIENCEQA_FEATURES),
            "validation": Dataset.from_list([scienceqa_question(answer=2)], features=SCIENCEQA_FEATURES),
            "test": Dataset.from_list([scienceqa_question(answer=3)], features=SCIENCEQA_FEATURES),
        }
    )


def test_split_sentences_keeps_numbers_and_abbreviations_whole() -> None:
    text = "The mass is 3.5 kg, e.g. Earth's pull.  It falls!\nNext line?  yes, it is.\n\n"
    assert split_sentences(text) == ["The mass is 3.5 kg, e.g. Earth's pull.", "It falls!", "Next line? yes, it is."]


def test_limit_steps_merges_the_shortest_neighbours_and_keeps_all_text() -> None:
    steps = ["aaaa", "b", "c", "dddd", "e"]
    assert limit_steps(steps, max_steps=3) == ["aaaa", "b c", "dddd e"]
    assert " ".join(limit_steps(GECKO_SENTENCES, max_steps=6)) == " ".join(GECKO_SENTENCES)
    assert limit_steps(steps, max_steps=6) == steps


def test_limit_steps_packs_sentences_up_to_max_step_chars() -> None:
    steps = ["One two.", "Three.", "A sentence that is longer than the limit.", "Four.", "Five."]
    assert limit_steps(steps, max_steps=6, max_step_chars=16) == [
        "One two. Three.",
        "A sentence that is longer than the limit.",
        "Four. Five.",
    ]


def test_scienceqa_saved_dataset_dict_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scienceqa_hub().save_to_disk(str(tmp_path / "raw"))
    out = tmp_path / "prepared"
    prepare("scienceqa", "--source", tmp_path / "raw", "--out", out)

    records = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in records] == ["scienceqa-train-0", "scienceqa-train-1"]
    north, gecko = records
    assert north == {
        "id": "scienceqa-train-0",
        "image": "images/train/scienceqa-train-0.png",
        "question": "Which of these states is farthest north?\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma",
        "steps": [
            "To find the answer, look at the compass rose.",
            "Look at which way the north arrow is pointing.",
            "West Virginia is farthest north.",
        ],
        "answer": "A",
        "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
        "meta": {
            "dataset": "scienceqa",
            "subject": "social science",
            "grade": "grade2",
            "topic": "geography",
            "category": "Geography",
            "skill": "Read a map: cardinal directions",
        },
    }
    assert gecko["question"] == (
        "Which animal's feet are also adapted for sticking to smooth surfaces?\n"
        "Context: Tree frogs live in tropical rain forests.\nFigure: tree frog.\n"
        "Options: (A) Madagascar day gecko (B) bald eagle"
    )
    # Eight solution sentences merged down to the default six steps, no text lost.
    assert len(gecko["steps"]) == 6 and " ".join(gecko["steps"]) == " ".join(GECKO_SENTENCES)
    assert Image.open(out / north["image"]).size == (40, 30)
    assert Image.open(out / gecko["image"]).size == (50, 20)

    assert read_jsonl(out / "skipped_train.jsonl") == [
        {"id": "scienceqa-train-2", "reason": "text-only question (--all-questions keeps it)"},
        {"id": "scienceqa-train-3", "reason": "no reasoning steps"},
    ]
    assert [r["answer"] for r in read_jsonl(out / "val.jsonl")] == ["C"]
    assert [r["answer"] for r in read_jsonl(out / "test.jsonl")] == ["D"]
    assert capsys.readouterr().out.splitlines()[0] == (
        f"train: wrote 2 records to {out / 'train.jsonl'}; skipped 2 (listed in {out / 'skipped_train.jsonl'}): "
        "no reasoning steps: 1, text-only question (--all-questions keeps it): 1"
    )


def test_scienceqa_parquet_folder_gives_the_same_records(tmp_path: Path) -> None:
    hub = scienceqa_hub()
    hub.save_to_disk(str(tmp_path / "saved"))
    for split, part in hub.items():
        part.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    prepare("scienceqa", "--source", tmp_path / "saved", "--out", tmp_path / "from_saved", "--max-steps", "3")
    prepare("scienceqa", "--source", tmp_path / "parquet", "--out", tmp_path / "from_parquet", "--max-steps", "3")

    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "skipped_train.jsonl"):
        assert (tmp_path / "from_parquet" / name).read_text() == (tmp_path / "from_saved" / name).read_text()
    records = read_jsonl(tmp_path / "from_parquet" / "train.jsonl")
    assert [len(r["steps"]) for r in records] == [3, 3]
    image = records[1]["image"]
    assert (tmp_path / "from_parquet" / image).read_bytes() == picture(50, 20)


def scienceqa_release(root: Path) -> None:
    """Write ScienceQA's original layout: problems.json and images/<split>/<pid>/image.png."""
    problems = {
        "1": {**scienceqa_question(), "image": "image.png", "split": "train"},
        "2": {**scienceqa_question(answer=1), "image": None, "split": "train"},
        "3": {**scienceqa_question(answer=2), "image": "image.png", "split": "val"},
        "4": {**scienceqa_question(answer=3), "image": "image.png", "split": "test"},
    }
    for pid, problem in problems.items():
        if problem["image"]:
            folder = root / "images" / problem["split"] / pid
            folder.mkdir(parents=True)
            (folder / "image.png").write_bytes(picture(30 + int(pid), 30))
    (root / "problems.json").write_text(json.dumps(problems))


def test_scienceqa_original_release_with_lecture_and_text_only_questions(tmp_path: Path) -> None:
    scienceqa_release(tmp_path / "scienceqa")
    out = tmp_path / "prepared"
    prepare(
        *("scienceqa", "--source", tmp_path / "scienceqa", "--out", out, "--split", "train", "val"),
        *("--with-lecture", "--all-questions", "--max-steps", "10"),
    )

    first, text_only = read_jsonl(out / "train.jsonl")
    assert first["id"] == "scienceqa-1" and text_only["id"] == "scienceqa-2"
    assert first["steps"] == [
        "Maps have four cardinal directions, or main directions.",
        "Those directions are north, south, east, and west.",
        "A compass rose is a set of arrows that point to the cardinal directions.",
        "To find the answer, look at the compass rose.",
        "Look at which way the north arrow is pointing.",
        "West Virginia is farthest north.",
    ]
    assert (out / first["image"]).read_bytes() == (tmp_path / "scienceqa/images/train/1/image.png").read_bytes()
    assert text_only["image"] is None and text_only["answer"] == "B"
    assert [r["id"] for r in read_jsonl(out / "val.jsonl")] == ["scienceqa-3"]
    assert not (out / "test.jsonl").exists()


def test_scienceqa_release_missing_image_names_the_record_and_file(tmp_path: Path) -> None:
    scienceqa_release(tmp_path / "scienceqa")
    missing = tmp_path / "scienceqa/images/train/1/image.png"
    missing.unlink()
    message = prepare_error("scienceqa", "--source", tmp_path / "scienceqa", "--out", tmp_path / "out")
    assert "record scienceqa-1" in message and str(missing) in message


def test_m3cot_round_trip(tmp_path: Path) -> None:
    def question(**fields: object) -> dict:
        row = {
            "id": "physical-commonsense-1398",
            "category": "Usage Purpose",
            "image_id": "1498",
            "question": "What is the likely purpose of the troll statue under the bridge?",
            "choices": ["To scare away trespassers", "To draw tourists", "To honor a legend", "To block the bridge"],
            "context": "",
            "answer": "B",
            "rationale": "The statue is a large troll under a city bridge.\n"
            "Such statues are public art that visitors come to see.\nSo it draws tourists.",
            "split": "train",
            "image": {"bytes": picture(60, 40), "path": None},
            "domain": "commonsense",
            "topic": "physical-commonsense",
        }
        return {**row, **fields}

    train = [
        question(),
        question(
            id="physics-1074",
            category="Materials",
            context="Select the best answer.",
            question="Which property do these three objects have in common?",
            choices=["fragile", "sticky", "fuzzy"],
            answer="C",
            rationale="Look at each object. A fuzzy object is covered in soft hair. All three objects are fuzzy.",
            domain="science",
            topic="natural-science",
        ),
        question(id="physical-commonsense-1400", rationale=""),
    ]
    DatasetDict(
        {
            "train": Dataset.from_list(train, features=M3COT_FEATURES),
            "validation": Dataset.from_list([question(id="social-1", split="dev")], features=M3COT_FEATURES),
            "test": Dataset.from_list([question(id="algebra-7", answer="E")], features=M3COT_FEATURES),
        }
    ).save_to_disk(str(tmp_path / "raw"))
    out = tmp_path / "prepared"
    prepare("m3cot", "--source", tmp_path / "raw", "--out", out)

    troll, fuzzy = read_jsonl(out / "train.jsonl")
    assert troll["id"] == "m3cot-physical-commonsense-1398" and troll["answer"] == "B"
    assert troll["steps"] == [
        "The statue is a large troll under a city bridge.",
        "Such statues are public art that visitors come to see.",
        "So it draws tourists.",
    ]
    assert troll["meta"] == {
        "dataset": "m3cot",
        "domain": "commonsense",
        "topic": "physical-commonsense",
        "category": "Usage Purpose",
    }
    assert fuzzy["question"] == (
        "Which property do these three objects have in common?\nContext: Select the best answer.\n"
        "Options: (A) fragile (B) sticky (C) fuzzy"
    )
    assert fuzzy["answer"] == "C" and len(fuzzy["steps"]) == 3
    assert Image.open(out / fuzzy["image"]).size == (60, 40)
    assert read_jsonl(out / "skipped_train.jsonl") == [
        {"id": "m3cot-physical-commonsense-1400", "reason": "no reasoning steps"}
    ]
    assert [r["id"] for r in read_jsonl(out / "val.jsonl")] == ["m3cot-social-1"]
    assert read_jsonl(out / "test.jsonl") == []
    assert read_jsonl(out / "skipped_test.jsonl") == [
        {"id": "m3cot-algebra-7", "reason": "no answer among the options"}
    ]


def aokvqa_question(**fields: object) -> dict:
    """Return an A-OKVQA question with the release's fields; ``fields`` override the defaults."""
    row = {
        "question_id": "22MexNkBPpdZGX6sxbxVBH",
        "question": "What is the man by the bags awaiting?",
        "choices": ["skateboarder", "train", "delivery", "cab"],
        "correct_choice_idx": 3,
        "direct_answers": ["cab"] * 7 + ["taxi"] * 3,
        "difficult_direct_answer": False,
        "rationales": [
            "He is standing at the curb with luggage. A cab can carry him and his bags.",
            "He is standing at the curb with luggage!",
            "Cabs stop at curbs to pick people up.",
        ],
    }
    return {**row, **fields}


AOKVQA_STEPS = [
    "He is standing at the curb with luggage.",
    "A cab can carry him and his bags.",
    "Cabs stop at curbs to pick people up.",
]


def test_aokvqa_hub_parquet_round_trip(tmp_path: Path) -> None:
    jpeg = picture(64, 48, "JPEG")
    splits = {
        "train": [aokvqa_question(image={"bytes": jpeg, "path": None})],
        # The test split is published without answers and rationales.
        "test": [
            aokvqa_question(
                question_id="test1",
                image={"bytes": jpeg, "path": None},
                correct_choice_idx=None,
                direct_answers=None,
                rationales=None,
            )
        ],
    }
    for split, rows in splits.items():
        Dataset.from_list(rows, features=AOKVQA_FEATURES).to_parquet(
            str(tmp_path / "raw" / "data" / f"{split}-00000-of-00001-abc.parquet")
        )
    out = tmp_path / "prepared"
    prepare("aokvqa", "--source", tmp_path / "raw", "--out", out)

    [record] = read_jsonl(out / "train.jsonl")
    assert record["id"] == "aokvqa-22MexNkBPpdZGX6sxbxVBH"
    assert (
        record["question"]
        == "What is the man by the bags awaiting?\nOptions: (A) skateboarder (B) train (C) delivery (D) cab"
    )
    assert record["steps"] == AOKVQA_STEPS and record["answer"] == "D"
    assert record["meta"] == {
        "dataset": "aokvqa",
        "question_id": "22MexNkBPpdZGX6sxbxVBH",
        "difficult_direct_answer": False,
    }
    assert record["image"].endswith(".jpg") and (out / record["image"]).read_bytes() == jpeg
    assert read_jsonl(out / "skipped_test.jsonl") == [{"id": "aokvqa-test1", "reason": "no answer among the options"}]


def aokvqa_release(root: Path, coco: Path) -> None:
    """Write A-OKVQA's JSON release and the COCO 2017 files its questions point to."""
    train = [{"split": "train", "image_id": 299207, **aokvqa_question()}]
    test = [{"split": "test", "image_id": 42, "question_id": "t1", "question": "Why?", "choices": ["a", "b"]}]
    root.mkdir()
    (root / "aokvqa_v1p0_train.json").write_text(json.dumps(train))
    (root / "aokvqa_v1p0_test.json").write_text(json.dumps(test))
    for folder, image_id in (("train2017", 299207), ("test2017", 42)):
        (coco / folder).mkdir(parents=True)
        (coco / folder / f"{image_id:012d}.jpg").write_bytes(picture(32, 24, "JPEG"))


def test_aokvqa_original_release_with_coco_folder(tmp_path: Path) -> None:
    aokvqa_release(tmp_path / "aokvqa", tmp_path / "coco")
    out = tmp_path / "prepared"
    prepare("aokvqa", "--source", tmp_path / "aokvqa", "--out", out, "--coco-root", tmp_path / "coco")

    [record] = read_jsonl(out / "train.jsonl")
    assert record["steps"] == AOKVQA_STEPS and record["answer"] == "D"
    coco_file = tmp_path / "coco/train2017/000000299207.jpg"
    assert (out / record["image"]).read_bytes() == coco_file.read_bytes()
    assert read_jsonl(out / "skipped_test.jsonl") == [{"id": "aokvqa-t1", "reason": "no answer among the options"}]


def test_aokvqa_release_without_coco_root_says_how_to_fix(tmp_path: Path) -> None:
    aokvqa_release(tmp_path / "aokvqa", tmp_path / "coco")
    message = prepare_error("aokvqa", "--source", tmp_path / "aokvqa", "--out", tmp_path / "out")
    assert "--coco-root" in message


def test_missing_column_is_named(tmp_path: Path) -> None:
    scienceqa_hub().remove_columns("solution").save_to_disk(str(tmp_path / "raw"))
    message = prepare_error("scienceqa", "--source", tmp_path / "raw", "--out", tmp_path / "out")
    assert "has no column 'solution'" in message and "derek-thomas/ScienceQA" in message


def test_folder_in_no_known_format_is_reported(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("not a data set")
    message = prepare_error("m3cot", "--source", tmp_path / "raw", "--out", tmp_path / "out")
    assert str(tmp_path / "raw") in message and "no dataset_dict.json" in message


def test_parquet_files_of_different_data_sets_are_reported(tmp_path: Path) -> None:
    scienceqa_hub()["train"].to_parquet(str(tmp_path / "raw" / "train-00000-of-00001.parquet"))
    question = aokvqa_question(image={"bytes": picture(8, 8), "path": None})
    Dataset.from_list([question], features=AOKVQA_FEATURES).to_parquet(str(tmp_path / "raw" / "test.parquet"))
    message = prepare_error("aokvqa", "--source", tmp_path / "raw", "--out", tmp_path / "out")
    assert f"could not read the parquet files of {tmp_path / 'raw'} as one data set" in message


def test_missing_split_is_reported(tmp_path: Path) -> None:
    DatasetDict({"train": scienceqa_hub()["train"]}).save_to_disk(str(tmp_path / "train_only"))
    message = prepare_error(
        "scienceqa", "--source", tmp_path / "train_only", "--out", tmp_path / "out", "--split", "test"
    )
    assert "no 'test' split (it has: train)" in message


def test_missing_source_folder_is_one_line_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "scienceqa", "--source", str(missing)]
        + ["--out", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: source folder {missing} does not exist; "
        "pass an existing folder or a hub id such as derek-thomas/ScienceQA\n"
    )
