"""The demo sets of demo_data.py, each checked against a walk of its own (the grid's read off its images)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import demo_data
import make_demo_data
import run
from models.internvl import build_tiny_tokenizer
from records import load_records
from utils import UserError


def test_grid_steps_restate_their_cell_and_the_answer_is_the_cell_reached(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), seed=3, sizes={"train": 200})
    arrows = {"pink": (0, 1), "blue": (1, 0), "lime": (0, -1), "gold": (-1, 0)}  # right, down, left, up
    rgb = {(240, 110, 180): "pink", (40, 80, 220): "blue", (80, 200, 60): "lime", (230, 180, 30): "gold"}
    cells = "abcdefghijklmnop"  # row by row
    records = load_records(str(tmp_path / "train.jsonl"))
    for record in records:
        image = Image.open(tmp_path / record["image"]).convert("RGB")
        assert image.size == (64, 64)
        colour = [[rgb[image.getpixel((16 * c + 8, 16 * r + 8))] for c in range(4)] for r in range(4)]
        r, c = divmod(cells.index(record["question"][-1]), 4)
        steps = []
        for _ in range(3):
            left, read = cells[4 * r + c], colour[r][c]
            r, c = (r + arrows[read][0]) % 4, (c + arrows[read][1]) % 4
            steps.append(f"{left} {read} {cells[4 * r + c]}")
        assert record["steps"] == steps and record["answer"] == cells[4 * r + c]
    # the phrasings vary, so no reading position is fixed; the answers spread over the cells
    assert len({record["question"][:-1] for record in records}) == 6
    assert len({record["answer"] for record in records}) == 16


def test_graph_set_needs_three_chained_lookups_and_answers_the_node_reached(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), "graph", seed=3, sizes={"train": 200, "val": 4})
    records = load_records(str(tmp_path / "train.jsonl"))
    assert len(records) == 200 and len(load_records(str(tmp_path / "val.jsonl"))) == 4
    assert not (tmp_path / "images").exists()
    tokenizer = build_tiny_tokenizer()
    for record in records:
        assert record["image"] is None and len(record["steps"]) == 3
        text = record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"]
        assert len(text) < 48 and len(tokenizer(text)["input_ids"]) == len(text)  # one token per character
        table, start = record["question"].split(" from ")
        edges = dict(zip("abcdefghijklmnop", table))  # the k-th letter: where node k leads
        assert len(table) == 16 and all(a != b for a, b in edges.items())  # no edge back to its own node
        path = [start]
        for _ in range(3):
            path.append(edges[path[-1]])
        assert record["steps"] == [f"{a}>{b}" for a, b in zip(path, path[1:])] and record["answer"] == path[-1]
    # the answers spread over the nodes: nothing to learn without the look-ups
    assert len({record["answer"] for record in records}) == 16


def test_same_seed_same_files_and_the_grid_stays_the_default(tmp_path: Path) -> None:
    for name in ("a", "b"):
        demo_data.generate(str(tmp_path / name), "graph", seed=5, sizes={"test": 16})
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    demo_data.generate(str(tmp_path / "grid"), seed=5, sizes={"test": 2})
    (record,) = load_records(str(tmp_path / "grid" / "test.jsonl"))[:1]
    assert record["image"] == "images/test-00000.png" and (tmp_path / "grid" / record["image"]).is_file()


def test_command_line_writes_the_named_set_in_the_demo_split_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_demo_data.main([str(tmp_path), "--task", "graph", "--seed", "1"])
    for split, count in {"train": 8000, "val": 256, "test": 512}.items():
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == count and rows[0]["id"] == f"{split}-00000" and rows[0]["image"] is None


def test_a_set_from_an_earlier_generator_stops_the_run_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    demo_data.generate(str(folder), seed=3, sizes={"train": 4, "val": 2})
    demo_data.check(str(folder), "grid")  # as written: accepted
    with pytest.raises(UserError, match="does not hold the graph set"):
        demo_data.check(str(folder), "graph")
    # an older format of the grid set: steps without the restated cell ("lime l"), the answer a colour
    lines = (folder / "train.jsonl").read_text().splitlines()
    old = json.loads(lines[0])
    old |= {"steps": [step.split(" ", 1)[1] for step in old["steps"]], "answer": "blue"}
    (folder / "train.jsonl").write_text("\n".join([json.dumps(old), *lines[1:]]) + "\n")
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
        run.main(["args/demo.yaml", f"train_path={folder}/train.jsonl", f"val_path={folder}/val.jsonl",
                  f"save_path={tmp_path}"])  # fmt: skip
    assert stop.value.code == 2
    assert stderr.getvalue().splitlines() == [
        f"error: {folder}/train.jsonl: record 1 is not what this demo_data.py writes (an earlier format); delete "
        f"{folder} and the run writes the current set (or set generate_demo_data: none to train on it)"
    ]
    (folder / demo_data.MANIFEST).unlink()  # a set without a manifest
    with pytest.raises(UserError, match="does not hold the grid set"):
        demo_data.check(str(folder), "grid")


def test_runs_of_every_seed_share_the_demo_set_of_seed_0(tmp_path: Path) -> None:
    folder = tmp_path / "graph"
    # only_eval without a checkpoint stops the run with its error line just after the set is written
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run.main(["args/demo_text.yaml", f"train_path={folder}/train.jsonl", f"val_path={folder}/val.jsonl",
                  "seed=3", "only_eval=true", f"save_path={tmp_path}"])  # fmt: skip
    demo_data.generate(str(tmp_path / "seed-0"), "graph", seed=0)
    for split in ("train", "val", "test"):
        assert (folder / f"{split}.jsonl").read_bytes() == (tmp_path / "seed-0" / f"{split}.jsonl").read_bytes()
