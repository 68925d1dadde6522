"""Score generated answers against records and summarise accuracy per data set and category.

The model is trained on ``{question}\\n{step 1}\\n...### {answer}<eos>``, so its answer is the text after the
last ``###``. Multiple-choice answers are compared as option letters, whether the model wrote the letter or
the option's text; open answers are compared after normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters: choice i is LETTERS[i]
ANSWER_MARK = "###"  # ends a training sequence's steps; the answer follows it after one space
# what may stand before an answer that names an option: "The answer is", "Answer:", "The correct answer is"
ANSWER_PHRASE = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?answer\b\s*(?:is\b)?\s*:?\s*", re.IGNORECASE)
BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
# "(B) nine", "(b) nine", "B. nine", "B: nine", "B) nine"; a bare lowercase "a." would read as an article.
LETTER_THEN_TEXT = re.compile(r"\(([A-Za-z])\)\s*\S|([A-Z])[.:)]\s+\S")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
# Every punctuation mark except a decimal point or a minus sign that belongs to a number.
PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d)|-(?=\d))[^\w\s]|_")
ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# Default breakdowns, as the ScienceQA and M3CoT papers group their results; ScienceQA's 127 "category" values
# would swamp a summary table. A-OKVQA marks the questions whose direct answer is hard.
REPORT_KEYS = {"scienceqa": ("subject", "grade"), "m3cot": ("domain", "topic"), "aokvqa": ("difficult_direct_answer",)}


def extract_answer(generated: str) -> str:
    """Return the model's answer: the first non-empty line after the last ``###``, else the whole text.

    Both are stripped of surrounding whitespace; "###" with nothing after it gives "".
    """
    if ANSWER_MARK not in generated:
        return generated.strip()
    after = generated.rsplit(ANSWER_MARK, 1)[1].strip()
    return after.splitlines()[0].strip() if after else ""


def normalize(text: str) -> str:
    """Normalise an answer for exact comparison.

    Lowercase; numbers in one form ("3.0" and "3", "1,000" and "1000"); punctuation, the articles a/an/the and
    extra whitespace removed.
    """
    text = THOUSANDS_COMMA.sub("", text.lower())
    text = NUMBER.sub(lambda number: format(Decimal(number.group()).normalize(), "f"), text)
    text = ARTICLES.sub(" ", PUNCTUATION.sub(" ", text))
    return " ".join(text.split())


def choice_index(text: str, choices: Sequence[str]) -> int | None:
    """Return the index of the option that ``text`` names, or None when it names none.

    Accepted: a letter alone ("B", "(B)", "B.", "b"), the option's text (normalised), or a letter followed by
    text ("(B) nine", "B. nine"), each possibly after "The answer is" or "Answer:".
    """
    text = ANSWER_PHRASE.sub("", text.strip(), count=1)
    letter = BARE_LETTER.fullmatch(text)
    if letter and LETTERS.index(letter.group(1).upper()) < len(choices):
        return LETTERS.index(letter.group(1).upper())
    normalized = normalize(text)
    for i, choice in enumerate(choices):
        if normalize(choice) == normalized:
            return i
    letter = LETTER_THEN_TEXT.match(text)
    if letter:
        index = LETTERS.index((letter.group(1) or letter.group(2)).upper())
        return index if index < len(choices) else None
    return None


def is_correct(prediction: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """Return whether ``prediction`` (an extracted answer) matches the record's ``answer``.

    With ``choices`` both are read as options (see ``choice_index``) and compared by index; an answer that names
    no option is a data error and raises ValueError. Without them the normalised texts must be equal.
    """
    if not choices:
        return normalize(prediction) == normalize(answer)
    expected = choice_index(answer, choices)
    if expected is None:
        raise ValueError(f"answer {answer!r} names none of the options {list(choices)}")
    return choice_index(prediction, choices) == expected


def _accuracy(counts: list[int]) -> dict[str, Any]:
    correct, total = counts
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def accuracy_report(rows: Iterable[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Count accuracy overall, per data set (``meta["dataset"]``) and per category within each data set.

    Each row has ``correct`` (bool) and optionally ``meta``. Categories are the values of the meta ``keys``
    (default: ``REPORT_KEYS`` of the row's data set); rows without a data set count as "unknown". Returns
    ``{"overall": acc, "datasets": {name: {"overall": acc, "by": {key: {value: acc}}}}}`` where each ``acc``
    is ``{"correct", "total", "accuracy"}``, data sets and values sorted by name.
    """
    counts: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        meta = row.get("meta") or {}
        dataset = str(meta.get("dataset", "unknown"))
        dataset_keys = keys if keys is not None else REPORT_KEYS.get(dataset, ())
        groups = [(), (dataset,)]
        groups += [(dataset, key, str(meta[key])) for key in dataset_keys if key in meta]
        for group in groups:
            tally = counts.setdefault(group, [0, 0])
            tally[0] += bool(row["correct"])
            tally[1] += 1
    report: dict[str, Any] = {"overall": _accuracy(counts.get((), [0, 0])), "datasets": {}}
    for group in sorted(counts):
        if len(group) == 1:
            report["datasets"][group[0]] = {"overall": _accuracy(counts[group]), "by": {}}
        elif len(group) == 3:
            dataset, key, value = group
            report["datasets"][dataset]["by"].setdefault(key, {})[value] = _accuracy(counts[group])
    return report


def format_report(report: dict[str, Any]) -> str:
    """Return ``accuracy_report``'s result as a plain-text table, one row per group."""
    rows = [("all", report["overall"])]
    for dataset, part in report["datasets"].items():
        rows.append((dataset, part["overall"]))
        for key, values in part["by"].items():
            rows += [(f"  {key} = {value}", acc) for value, acc in values.items()]
    width = max(len(label) for label, _ in rows + [("group", None)])
    lines = [f"{'group':<{width}}  {'correct':>7}  {'total':>7}  {'accuracy':>8}"]
    for label, acc in rows:
        lines.append(f"{label:<{width}}  {acc['correct']:>7}  {acc['total']:>7}  {acc['accuracy']:>8.2%}")
    return "\n".join(lines)
