"""The documentation names every config key and links only to files that exist."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def config_fields() -> list[str]:
    """Names of every `Config` field, from config.py where the layout has it, else from utils.py."""
    module = importlib.import_module("config" if (ROOT / "config.py").is_file() else "utils")
    return [field.name for field in dataclasses.fields(module.Config)]


def test_every_config_key_is_named_in_configuration_md():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    named = set()
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        named.update(re.findall(r"\w+", span))
    missing = [name for name in config_fields() if name not in named]
    assert not missing, f"docs/configuration.md does not name (in `code`) these Config keys: {missing}"


def test_docs_exist():
    for name in ("configuration", "data", "model", "training", "inference", "experiments"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert (ROOT / "bench" / "README.md").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    text = CODE_SPAN.sub("", FENCE.sub("", doc.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same file
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"
