"""prepare_data.py on the original Coconut paper's text sets (GSM8k, ProntoQA, ProsQA), from files built here in the
exact layout and schema of that repository's data/ folder."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import prepare, prepare_error, read_jsonl

from records import load_records

# The original Coconut's text sets, in the layout and schema of its data/ folder: gsm_<split>.json as its
# preprocessing/gsm_icot.bash writes them from GSM8k-Aug, prontoqa_<split>.json as preprocessing/prontoqa.py writes
# them, prosqa_<split>.json as published (with the graph).
GSM = {
    "train": [
        {
            "question": "Ann buys 3 boxes of 4 pens and has 6 pens. How many pens does she have now?",
            "steps": ["<<3*4=12>>", "<<12+6=18>>"],
            "answer": "18",
        },
        {"question": "A question whose rationale was lost.", "steps": [], "answer": "5"},
        {
            "question": "Count to eight, one sum at a time.",
            "steps": [f"<<{n}+1={n + 1}>>" for n in range(8)],
            "answer": "8",
        },
    ],
    "valid": [
        {
            "question": "A farm has 1,000 hens and sells 250. How many are left?",
            "steps": ["<<1000-250=750>>"],
            "answer": "750",
        }
    ],
    "test": [{"question": "What is 2 times 21?", "steps": ["<<2*21=42>>"], "answer": "42"}],
}
PRONTOQA = {
    "question": "Every wumpus is a tumpus. Tumpuses are not sour. Alex is a wumpus. True or false: Alex is sour.",
    "steps": ["Alex is a wumpus. Every wumpus is a tumpus.", "Alex is a tumpus. Tumpuses are not sour."],
    "answer": "False",
}
PROSQA = {
    "question": "Tom is a terpus. Every terpus is a brimpus. Every brimpus is a lempus. Every rorpus is a scrompus. "
    "Is Tom a lempus or scrompus?",
    "answer": "Tom is a lempus.",
    "steps": ["Tom is a terpus.", "Every terpus is a brimpus.", "Every brimpus is a lempus."],
    "idx_to_symbol": ["Tom", "terpus", "brimpus", "lempus", "rorpus", "scrompus"],
    "edges": [[0, 1], [1, 2], [2, 3], [4, 5]],
    "root": 0,
    "target": 3,
    "neg_target": 5,
}


def write_coconut_files(root: Path, prefix: str, splits: dict[str, list[dict]]) -> Path:
    """Write `<prefix>_<split>.json` files (JSON lists, as the original Coconut's data/ holds them) into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (root / f"{prefix}_{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


def test_gsm8k_files_become_text_records_with_their_steps_unmerged(tmp_path: Path, capsys) -> None:
    source = write_coconut_files(tmp_path / "coconut-data", "gsm", GSM)
    prepare("gsm8k", "--source", source, "--out", tmp_path / "out")
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert train[0] == {
        "id": "gsm8k-train-0",
        "image": None,
        "question": GSM["train"][0]["question"],
        "steps": ["<<3*4=12>>", "<<12+6=18>>"],
        "answer": "18",
        "meta": {"dataset": "gsm8k"},
    }
    assert train[1]["steps"] == GSM["train"][2]["steps"]  # eight steps: the curriculum counts them, none merged
    assert read_jsonl(tmp_path / "out" / "skipped_train.jsonl") == [
        {"id": "gsm8k-train-1", "reason": "no reasoning steps"}
    ]
    assert read_jsonl(tmp_path / "out" / "val.jsonl")[0]["answer"] == "750"  # gsm_valid.json is the val split
    assert read_jsonl(tmp_path / "out" / "test.jsonl")[0]["id"] == "gsm8k-test-0"
    assert "train: wrote 2 records" in capsys.readouterr().out
    assert len(load_records(str(tmp_path / "out" / "train.jsonl"))) == 2


def test_gsm8k_max_steps_still_merges_when_asked(tmp_path: Path) -> None:
    source = write_coconut_files(tmp_path / "coconut-data", "gsm", {"train": GSM["train"]})
    prepare("gsm8k", "--source", source, "--out", tmp_path / "out", "--max-steps", "3")
    assert [len(r["steps"]) for r in read_jsonl(tmp_path / "out" / "train.jsonl")] == [2, 3]


def test_prontoqa_and_prosqa_files_keep_statements_and_prosqa_graph(tmp_path: Path) -> None:
    pronto = write_coconut_files(tmp_path / "pronto", "prontoqa", {"valid": [PRONTOQA]})
    prepare("prontoqa", "--source", pronto, "--out", tmp_path / "pronto-out")
    (record,) = read_jsonl(tmp_path / "pronto-out" / "val.jsonl")
    assert (record["question"], record["steps"], record["answer"]) == (
        PRONTOQA["question"],
        PRONTOQA["steps"],
        "False",
    )
    assert record["meta"] == {"dataset": "prontoqa"}
    prosqa = write_coconut_files(tmp_path / "pros", "prosqa", {"valid": [PROSQA], "test": [PROSQA]})
    prepare("prosqa", "--source", prosqa, "--out", tmp_path / "pros-out", "--split", "test")
    (record,) = read_jsonl(tmp_path / "pros-out" / "test.jsonl")
    assert record["answer"] == "Tom is a lempus." and record["steps"] == PROSQA["steps"] and record["image"] is None
    graph = {key: PROSQA[key] for key in ("idx_to_symbol", "edges", "root", "target", "neg_target")}
    assert record["meta"] == {"dataset": "prosqa", **graph}
    assert not (tmp_path / "pros-out" / "val.jsonl").exists()


def test_coconut_folder_without_its_files_or_with_a_wrong_record_is_one_line(tmp_path: Path) -> None:
    message = prepare_error("gsm8k", "--source", tmp_path, "--out", tmp_path / "out")
    assert "holds none of gsm_train.json, gsm_valid.json, gsm_test.json" in message
    broken = write_coconut_files(tmp_path / "broken", "prosqa", {"train": [PROSQA, {"question": "q", "answer": "a"}]})
    message = prepare_error("prosqa", "--source", broken, "--out", tmp_path / "out")
    assert f"record 1 of {broken / 'prosqa_train.json'} has no column 'steps'" in message
    write_coconut_files(broken, "prosqa", {"train": [{**PROSQA, "steps": "Tom is a terpus."}]})
    message = prepare_error("prosqa", "--source", broken, "--out", tmp_path / "out")
    assert "record 0 of" in message and "'steps' a list of strings; is this the original prosqa_train.json?" in message
    message = prepare_error("prontoqa", "--source", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert "is not a folder; pass the folder that holds prontoqa_<split>.json" in message
