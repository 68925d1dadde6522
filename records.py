"""Records: the data format every data set is converted to, read and checked before anything is built from it.

A record is `{"id"?, "image": path | [paths] | null, "question", "steps": [str], "answer", "choices"?, "meta"?}`:
`choices` makes it multiple choice (the answer is an option's letter or text) and `meta` (data set, category)
groups accuracy in reports. A file is a JSON list or JSONL (one record a line).
"""

from __future__ import annotations

import json
from pathlib import Path

from scoring import choice_index
from utils import UserError

FIELDS = {"id", "image", "question", "steps", "answer", "choices", "meta"}


def read_records(path: str) -> list:
    """Parse a JSON list or JSONL file; a missing, unparsable or empty file stops with one line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: data file not found; check the path in the config")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the file") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}: line {number} is not JSON ({err.msg}); fix it (JSONL: one record a line)"
                ) from None
    if not records:
        raise UserError(f"{path}: no records; the file is empty")
    return records


def record_problem(record: object) -> str | None:
    """What is wrong with one record (None when it follows the format)."""
    if not isinstance(record, dict):
        return "must be an object with question, steps and answer"
    unknown = set(record) - FIELDS
    if unknown:
        return f"unknown field(s) {sorted(unknown)}; allowed are {sorted(FIELDS)}"
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"'{key}' must be a non-empty string"
    steps = record.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
        return "'steps' must be a list of non-empty strings"
    if not steps:
        return "'steps' is empty; give at least one reasoning step or leave the record out"
    image = record.get("image")
    if not (
        image is None or isinstance(image, str) or (isinstance(image, list) and all(isinstance(p, str) for p in image))
    ):
        return "'image' must be a path, a list of paths or null"
    choices = record.get("choices")
    if choices is not None and not (
        isinstance(choices, list) and all(isinstance(c, str) and c.strip() for c in choices)
    ):
        return "'choices' must be a list of non-empty strings"
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        return "'meta' must be an object (a mapping of key: value)"
    # checked here so a bad answer stops the run before training, not at the first evaluation's scoring
    if choices and choice_index(record["answer"], choices) is None:
        answer, count = record["answer"], len(choices)
        return f"answer {answer!r} names none of the {count} choices; the answer must be an option's letter or its text"
    return None


def record_name(path: str, index: int, record: object) -> str:
    """How messages name a record: file, index and id."""
    named = isinstance(record, dict) and "id" in record
    return f"{path}: record {index}" + (f" (id {record['id']!r})" if named else "")


def load_records(path: str) -> list[dict]:
    """Read and check a records file; the first bad record stops the run with its index/id and the problem."""
    records = read_records(path)
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise UserError(f"{record_name(path, index, record)}: {problem}")
    return records
