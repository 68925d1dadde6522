"""Tests of scoring.py on generated strings shaped like the model's output."""

from __future__ import annotations

import pytest

from scoring import accuracy_report, extract_answer, format_report, is_correct, normalize

CHOICES = ["eight", "nine", "ten"]


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        ("Count the dots.\nThere are nine.\n### B", "B"),
        ("Step one ### not this\n### (C) ten  ", "(C) ten"),
        ("### B\nThe model kept talking.", "B"),
        ("###\nB\n", "B"),
        ("steps\n###", ""),
        ("  no marker here \n", "no marker here"),
    ],
)
def test_extract_answer(generated: str, answer: str) -> None:
    assert extract_answer(generated) == answer


@pytest.mark.parametrize(
    "prediction",
    ["B", "(B)", "B.", "b", "The answer is B", "the answer is (B) nine.", "Answer: B", "nine", "Nine.", "B. nine"],
)
def test_multiple_choice_predictions_naming_the_answer(prediction: str) -> None:
    assert is_correct(prediction, "B", CHOICES)


@pytest.mark.parametrize(
    "prediction", ["A", "(C)", "ten", "", "D", "The answer is eight", "nine or ten", "Because it is B"]
)
def test_multiple_choice_predictions_not_naming_the_answer(prediction: str) -> None:
    assert not is_correct(prediction, "B", CHOICES)


def test_multiple_choice_answer_that_names_no_option_is_a_data_error() -> None:
    with pytest.raises(ValueError, match="names none of the options"):
        is_correct("B", "F", CHOICES)


@pytest.mark.parametrize(
    ("prediction", "answer", "correct"),
    [
        ("3.0", "3", True),
        ("1,000 kg", "1000 kg", True),
        ("The Cat.", "cat", True),
        ("  an   apple ", "apple", True),
        ("-2", "2", False),
        ("3.5", "35", False),
        ("cats", "cat", False),
    ],
)
def test_open_answers(prediction: str, answer: str, correct: bool) -> None:
    assert is_correct(prediction, answer) is correct


@pytest.mark.parametrize(
    ("generated", "answer", "correct"),
    [
        # GSM8k (the original Coconut's gsm_<split>.json): the answer is a number, compared as a number
        ("<<3*4=12>>\n<<12+6=18>>\n### 18", "18", True),
        ("### 18.0", "18", True),
        ("### 1,000", "1000", True),
        ("### 1000", "1,000", True),
        ("### 180", "18", False),
        ("### -18", "18", False),
        # ProsQA: the answer is the statement naming the reachable concept
        ("Tom is a terpus.\nEvery terpus is a brimpus.\n### Tom is a lempus.", "Tom is a lempus.", True),
        ("### Tom is a lempus", "Tom is a lempus.", True),
        ("### tom is a lempus.", "Tom is a lempus.", True),
        ("### Tom is a scrompus.", "Tom is a lempus.", False),
        ("### Tom is not a lempus.", "Tom is a lempus.", False),
        ("### Tom is a lempus or scrompus.", "Tom is a lempus.", False),
        # ProntoQA: True or False
        ("Alex is a wumpus. Every wumpus is a tumpus.\n### False", "False", True),
        ("### True", "False", False),
    ],
)
def test_paper_text_sets_answers(generated: str, answer: str, correct: bool) -> None:
    assert is_correct(extract_answer(generated), answer) is correct


def test_normalize() -> None:
    assert normalize("The well-known value is 0.50, not 2.") == "well known value is 0.5 not 2"


ROWS = [
    {"correct": True, "meta": {"dataset": "scienceqa", "subject": "natural science", "grade": "grade4"}},
    {"correct": False, "meta": {"dataset": "scienceqa", "subject": "natural science", "grade": "grade2"}},
    {"correct": True, "meta": {"dataset": "scienceqa", "subject": "social science", "grade": "grade2"}},
    {"correct": True, "meta": {"dataset": "m3cot", "domain": "commonsense", "topic": "physical-commonsense"}},
    {"correct": False},
]


def test_accuracy_report_counts_per_data_set_and_category() -> None:
    report = accuracy_report(ROWS)
    assert report["overall"] == {"correct": 3, "total": 5, "accuracy": 0.6}
    assert list(report["datasets"]) == ["m3cot", "scienceqa", "unknown"]
    science = report["datasets"]["scienceqa"]
    assert science["overall"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert science["by"]["subject"] == {
        "natural science": {"correct": 1, "total": 2, "accuracy": 0.5},
        "social science": {"correct": 1, "total": 1, "accuracy": 1.0},
    }
    assert science["by"]["grade"]["grade2"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert report["datasets"]["m3cot"]["by"] == {
        "domain": {"commonsense": {"correct": 1, "total": 1, "accuracy": 1.0}},
        "topic": {"physical-commonsense": {"correct": 1, "total": 1, "accuracy": 1.0}},
    }
    assert report["datasets"]["unknown"] == {"overall": {"correct": 0, "total": 1, "accuracy": 0.0}, "by": {}}


def test_accuracy_report_with_chosen_keys() -> None:
    report = accuracy_report(ROWS, keys=["grade"])
    assert list(report["datasets"]["scienceqa"]["by"]) == ["grade"]
    assert report["datasets"]["m3cot"]["by"] == {}


def test_format_report_table() -> None:
    lines = format_report(accuracy_report(ROWS[:3])).splitlines()
    assert lines[0].split() == ["group", "correct", "total", "accuracy"]
    assert lines[1].split() == ["all", "2", "3", "66.67%"]
    assert lines[2].split() == ["scienceqa", "2", "3", "66.67%"]
    assert "  subject = natural science" in lines[-2] and lines[-2].split()[-3:] == ["1", "2", "50.00%"]
    assert len({len(line) for line in lines}) == 1


def test_scoring_prepared_records_end_to_end() -> None:
    records = [
        {"answer": "A", "choices": ["West Virginia", "Louisiana"], "meta": {"dataset": "scienceqa", "grade": "g2"}},
        {"answer": "B", "choices": ["gecko", "bald eagle"], "meta": {"dataset": "scienceqa", "grade": "g4"}},
        {"answer": "D", "choices": ["a", "b", "c", "cab"], "meta": {"dataset": "aokvqa"}},
    ]
    generated = [
        "Look at the compass rose.\nWest Virginia is farthest north.\n### A",
        "The gecko has sticky pads.\n### gecko",
        "He has luggage at the curb.\n### The answer is (D) cab<|im_end|>",
    ]
    rows = [
        {"correct": is_correct(extract_answer(text), r["answer"], r["choices"]), "meta": r["meta"]}
        for text, r in zip(generated, records, strict=True)
    ]
    assert [row["correct"] for row in rows] == [True, False, True]
    assert accuracy_report(rows)["datasets"]["scienceqa"]["overall"]["accuracy"] == 0.5
