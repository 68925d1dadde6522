"""The demo sets of demo_data.py: the text graph set checked against a reachability search of its own."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

import demo_data
from internvl import build_tiny_tokenizer
from records import load_records


def reachable(edges: list[tuple[str, str]], start: str) -> set[str]:
    """Nodes reachable from `start` along `edges` (breadth-first)."""
    seen, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for a, b in edges:
            if a == node and b not in seen:
                seen.add(b)
                frontier.append(b)
    return seen - {start}


def test_graph_set_needs_three_chained_lookups_and_answers_the_reachable_node(tmp_path: Path) -> None:
    demo_data.generate(str(tmp_path), "graph", seed=3, sizes={"train": 200, "val": 4})
    records = load_records(str(tmp_path / "train.jsonl"))
    assert len(records) == 200 and len(load_records(str(tmp_path / "val.jsonl"))) == 4
    assert not (tmp_path / "images").exists()
    tokenizer = build_tiny_tokenizer()
    for record in records:
        assert record["image"] is None and len(record["steps"]) == 3
        text = record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"]
        assert len(text) < 80 and len(tokenizer(text)["input_ids"]) == len(text)  # one token per character
        listed, query = record["question"].split(". from ")
        edges = [tuple(edge.split(">")) for edge in listed.split()]
        start, options = query.rstrip("?").split(": ")
        candidates = options.split(" or ")
        assert len(edges) == 10 and len(set(a for a, _ in edges)) == 10  # no node leaves by two edges
        reached = reachable(edges, start)
        assert [c for c in candidates if c in reached] == [record["answer"]]
        path = [start] + [step.split(">")[1] for step in record["steps"]]
        assert [tuple(step.split(">")) for step in record["steps"]] == list(zip(path, path[1:]))
        assert set(zip(path, path[1:])) <= set(edges) and path[-1] == record["answer"]
        # walking back from either candidate branches: each chain's last two nodes have two parents
        parents = Counter(b for _, b in edges)
        two = {node for node, count in parents.items() if count == 2}
        assert len(two) == 4 and {path[2], path[3], *candidates} <= two and set(parents.values()) == {1, 2}
    # both positions of the answer occur, so the order of the options gives nothing away
    assert {record["question"].endswith(f"{record['answer']}?") for record in records} == {True, False}


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
    monkeypatch.setattr(sys, "argv", ["demo_data.py", str(tmp_path), "--task", "graph", "--seed", "1"])
    demo_data.main()
    for split, count in {"train": 8000, "val": 256, "test": 512}.items():
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == count and rows[0]["id"] == f"{split}-00000" and rows[0]["image"] is None
