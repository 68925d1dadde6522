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
from config import load_config
from models.internvl import build_tiny_tokenizer
from records import load_records
from utils import UserError

ARROWS = {"pink": (0, 1), "blue": (1, 0), "lime": (0, -1), "gold": (-1, 0)}  # right, down, left, up
RGB = {(240, 110, 180): "pink", (40, 80, 220): "blue", (80, 200, 60): "lime", (230, 180, 30): "gold"}
CELLS = "abcdefghijklmnop"  # row by row


def stopped(main, argv: list[str]) -> list[str]:
    """The lines an entry point's `main(argv)` writes to stderr as it stops with a user error (exit status 2)."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
        main(argv)
    assert stop.value.code == 2
    return stderr.getvalue().splitlines()


def demo_run(folder: Path, tmp_path: Path) -> list[str]:
    """run.py on args/demo.yaml with `folder` as its data, expected to stop with a user error: what it wrote."""
    data = [f"train_path={folder}/train.jsonl", f"val_path={folder}/val.jsonl", f"save_path={tmp_path}"]
    return stopped(run.main, ["args/demo.yaml", *data])


def grid_walk(folder: Path, record: dict, moves: int) -> list[str]:
    """The steps of `moves` moves from the question's start cell, read off the record's image."""
    image = Image.open(folder / record["image"]).convert("RGB")
    assert image.size == (64, 64)
    colour = [[RGB[image.getpixel((16 * c + 8, 16 * r + 8))] for c in range(4)] for r in range(4)]
    r, c = divmod(CELLS.index(record["question"][-1]), 4)
    steps = []
    for _ in range(moves):
        left, read = CELLS[4 * r + c], colour[r][c]
        r, c = (r + ARROWS[read][0]) % 4, (c + ARROWS[read][1]) % 4
        steps.append(f"{left} {read} {CELLS[4 * r + c]}")
    return steps


def graph_walk(record: dict, moves: int) -> list[str]:
    """The steps of `moves` edges followed from the question's start node, read off its table."""
    table, start = record["question"].split(" from ")
    edges = dict(zip(CELLS, table))  # the k-th letter: where node k leads
    assert len(table) == 16 and all(a != b for a, b in edges.items())  # no edge back to its own node
    path = [start]
    for _ in range(moves):
        path.append(edges[path[-1]])
    return [f"{a}>{b}" for a, b in zip(path, path[1:])]


def test_grid_steps_restate_their_cell_and_the_answer_is_the_cell_reached(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), seed=3, sizes={"train": 200})
    records = load_records(str(tmp_path / "train.jsonl"))
    for record in records:
        steps = grid_walk(tmp_path, record, 3)
        assert record["steps"] == steps and record["answer"] == steps[-1][-1]
    # the phrasings vary, so no reading position is fixed; the answers spread over the cells
    assert len({record["question"][:-1] for record in records}) == 6
    assert len({record["answer"] for record in records}) == 16


def test_step_cells_are_the_cells_each_step_reads_and_reaches(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), seed=3, sizes={"train": 20})
    for record in load_records(str(tmp_path / "train.jsonl")):
        with Image.open(tmp_path / record["image"]) as image:
            pixels = image.convert("RGB")
            cells = demo_data.step_cells(record)
            for step, (reads, _) in zip(record["steps"], cells):
                x, y = (reads % 4) * 16 + 8, (reads // 4) * 16 + 8  # the read cell's centre in the 64-px image
                assert pixels.getpixel((x, y)) == demo_data.COLOURS[step.split()[1]]
                assert demo_data.cell_at(x, y, *image.size) == reads
        assert [reaches for _, reaches in cells[:-1]] == [reads for reads, _ in cells[1:]]
    with pytest.raises(UserError, match="step 'a>b' is not a grid step"):
        demo_data.step_cells({"id": "x", "steps": ["a>b"]})


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
        steps = graph_walk(record, 3)
        assert record["steps"] == steps and record["answer"] == steps[-1][-1]
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
    assert demo_run(folder, tmp_path) == [
        f"error: {folder}/train.jsonl: record 1 is not what this demo_data.py writes (an earlier format); delete "
        f"{folder} and the run writes the current set (or set generate_demo_data: none to train on it)"
    ]
    (folder / demo_data.MANIFEST).unlink()  # a set without a manifest
    with pytest.raises(UserError, match="does not hold the grid set"):
        demo_data.check(str(folder), "grid")


def test_runs_of_every_seed_share_the_demo_set_of_seed_0(tmp_path: Path) -> None:
    folder = tmp_path / "graph"
    # only_eval without a checkpoint stops the run with its error line just after the set is written
    data = [f"train_path={folder}/train.jsonl", f"val_path={folder}/val.jsonl", f"save_path={tmp_path}"]
    stopped(run.main, ["args/demo_text.yaml", *data, "seed=3", "only_eval=true"])
    demo_data.generate(str(tmp_path / "seed-0"), "graph", seed=0)
    for split in ("train", "val", "test"):
        assert (folder / f"{split}.jsonl").read_bytes() == (tmp_path / "seed-0" / f"{split}.jsonl").read_bytes()


# seed 0's first training records of the three-move sets (args/demo.yaml's and args/demo_text.yaml's)
GRID_SEED_0 = [
    {"question": "at i", "steps": ["i lime l", "l lime k", "k blue o"], "answer": "o"},
    {"question": "go from o", "steps": ["o gold k", "k lime j", "j gold f"], "answer": "f"},
]
GRAPH_SEED_0 = [
    {"question": "ohnphaejhgpnoehf from g", "steps": ["g>e", "e>h", "h>j"], "answer": "j"},
    {"question": "jdfcnbknepimnjpc from j", "steps": ["j>p", "p>c", "c>f"], "answer": "f"},
]


@pytest.mark.parametrize("task, expected", [("grid", GRID_SEED_0), ("graph", GRAPH_SEED_0)])
def test_three_moves_write_the_three_move_sets_unchanged(tmp_path: Path, task: str, expected: list[dict]) -> None:
    demo_data.generate(str(tmp_path / "default"), task, sizes={"train": 40})
    demo_data.generate(str(tmp_path / "range"), task, sizes={"train": 40}, moves=(3, 3))
    default, ranged = (
        (tmp_path / "default" / "train.jsonl").read_bytes(),
        (tmp_path / "range" / "train.jsonl").read_bytes(),
    )
    assert default == ranged
    records = load_records(str(tmp_path / "default" / "train.jsonl"))
    assert [{key: r[key] for key in ("question", "steps", "answer")} for r in records[:2]] == expected
    manifest = json.loads((tmp_path / "default" / demo_data.MANIFEST).read_text())
    assert manifest == {"task": task, "seed": 0, "moves": [3, 3]}


def test_the_hard_set_draws_3_to_6_moves_evenly_and_walks_them(tmp_path: Path) -> None:
    config = load_config("args/demo_hard.yaml")
    assert (config.demo_moves, config.max_latent_stage, config.generate_demo_data) == ([3, 6], 6, "grid")
    make_demo_data.main([str(tmp_path), "--moves", "3", "6"])  # seed 0, as the run writes it
    records = load_records(str(tmp_path / "train.jsonl"))
    assert len(records) == 8000
    counts = {moves: sum(len(r["steps"]) == moves for r in records) for moves in range(1, 10)}
    assert sum(counts[m] for m in (3, 4, 5, 6)) == 8000
    assert all(abs(counts[m] / 8000 - 1 / 4) < 0.02 for m in (3, 4, 5, 6)), counts
    for record in records:
        steps = grid_walk(tmp_path, record, len(record["steps"]))
        assert record["steps"] == steps and record["answer"] == steps[-1][-1]
    assert json.loads((tmp_path / demo_data.MANIFEST).read_text())["moves"] == [3, 6]
    demo_data.check(str(tmp_path), "grid", (3, 6))


def test_graph_records_take_their_moves_from_the_range(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), "graph", seed=2, sizes={"train": 400}, moves=(1, 4))
    records = load_records(str(tmp_path / "train.jsonl"))
    assert {len(r["steps"]) for r in records} == {1, 2, 3, 4}
    for record in records:
        steps = graph_walk(record, len(record["steps"]))
        assert record["steps"] == steps and record["answer"] == steps[-1][-1]


def test_a_set_of_other_moves_stops_the_run_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    demo_data.generate(str(folder), seed=0, sizes={"train": 4, "val": 2}, moves=(3, 6))
    demo_data.check(str(folder), "grid", (3, 6))
    assert demo_run(folder, tmp_path) == [
        f"error: {folder}/{demo_data.MANIFEST}: {folder} holds the grid set with 3-6 moves per record, the config "
        f"asks for 3-3 (demo_moves); delete {folder} and the run writes that set, or set demo_moves: [3, 6]"
    ]
    # a manifest without moves holds a three-move set
    demo_data.generate(str(folder), seed=0, sizes={"train": 4, "val": 2})
    (folder / demo_data.MANIFEST).write_text(json.dumps({"task": "grid", "seed": 0}) + "\n")
    demo_data.check(str(folder), "grid")
    with pytest.raises(UserError, match="holds the grid set with 3-3 moves per record, the config asks for 3-6"):
        demo_data.check(str(folder), "grid", (3, 6))


@pytest.mark.parametrize("moves", ["[4, 3]", "[0, 2]", "[3]", "[3, 4.5]", "[true, 3]"])
def test_bad_demo_moves_stop_with_one_line(moves: str) -> None:
    with pytest.raises(UserError, match=r"demo_moves must be two integers fewest, most with 1 <= fewest <= most"):
        load_config("args/demo.yaml", [f"demo_moves={moves}"])


def test_bad_moves_on_the_command_line_stop_with_one_line(tmp_path: Path) -> None:
    assert stopped(make_demo_data.main, [str(tmp_path), "--moves", "4", "3"]) == [
        "error: --moves must be two integers fewest, most with 1 <= fewest <= most, got [4, 3]"
    ]
    assert not (tmp_path / "train.jsonl").exists()
