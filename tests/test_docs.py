"""The documentation stays true to the code: every config key is named, links resolve, and every command the docs
show runs a file that exists, with configs that exist, override keys that `Config` has and flags that the script's
own parser accepts."""

import argparse
import dataclasses
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# docs/experiments.md is the dated history: its commands and configs are those of the code they ran on
CURRENT_DOCS = [doc for doc in DOCS if doc.name != "experiments.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]+`")
INLINE_CODE = re.compile(r"`([^`]+)`")  # a code span, which may run over a line break
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
SEPARATORS = {"&&", "||", ";", "|"}
CONFIG_SCRIPTS = ("run.py", "tools/validate.py")  # their command line is a YAML file and key=value overrides
NAMED_CONFIG = re.compile(r"(?<![\w/])args/([\w.-]+\.yaml)\b")
PLACEHOLDER = re.compile(r"[A-Z]+")  # args/X.yaml, tools/X.py


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def config_fields() -> list[str]:
    """Names of every `Config` field."""
    return [field.name for field in dataclasses.fields(config.Config)]


def test_every_config_key_is_named_in_configuration_md():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    named = set()
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        named.update(re.findall(r"\w+", span))
    missing = [name for name in config_fields() if name not in named]
    assert not missing, f"docs/configuration.md does not name (in `code`) these Config keys: {missing}"


def test_docs_exist():
    for name in ("configuration", "data", "demo", "model", "paper", "training", "inference", "experiments"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert (ROOT / "bench" / "README.md").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
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


def shell_commands(text: str) -> list[tuple[str, bool]]:
    """Each command line of the text's shell code blocks (continuation lines joined) and of its inline code spans
    that start with `python` or `torchrun`, with whether it came from a code block."""
    commands = []
    for kind, body in FENCE.findall(text):
        if kind in SHELL_BLOCKS:
            commands += [(line, True) for line in body.replace("\\\n", " ").splitlines()]
    for span in INLINE_CODE.findall(FENCE.sub("", text)):
        span = " ".join(span.split())
        if span.startswith(("python ", "torchrun ")):
            commands.append((span, False))
    return commands


def script_calls(line: str, strict: bool) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for every `python X.py ...` and `torchrun ... X.py ...` in a command line. A line
    that does not parse as shell words fails in a code block; an inline span falls back to whitespace words."""
    if not re.search(r"\b(python3?|torchrun)\b", line):
        return []
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        assert not strict, f"not a shell command line: {line}"
        words = line.split()
    calls, segment = [], []
    for word in [*words, ";"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        if segment[:1] in (["python"], ["python3"]) and len(segment) > 1 and not segment[1].startswith("-"):
            calls.append((segment[1], segment[2:]))
        elif segment[:1] == ["torchrun"]:
            at = next((i for i, w in enumerate(segment) if w.endswith(".py")), None)
            assert at is not None, f"torchrun starts no script: {line}"
            calls.append((segment[at], segment[at + 1 :]))
        segment = []
    return calls


class _Parsed(Exception):
    """Stops a script's main() at its first parse_args, carrying the parser it built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _stop(parser: argparse.ArgumentParser, *args, **kwargs):
    raise _Parsed(parser)


@functools.cache
def options_of(script: str, subcommand: str) -> frozenset[str]:
    """The option strings (`--out`, `-h`, ...) of the parser `script`'s main() builds for `subcommand` (infer.py's
    `compare`; "" for none), taken from the script itself: main() runs until it starts parsing."""
    path = ROOT / script
    name = f"_docs_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    with mock.patch.object(sys, "path", [str(path.parent), *sys.path]):  # as `python script` runs it: bench/ first
        spec.loader.exec_module(module)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _stop):
        try:
            module.main([subcommand] if subcommand else [])
        except _Parsed as parsed:
            return frozenset(opt for action in parsed.parser._actions for opt in action.option_strings)
    raise AssertionError(f"{script}: main() parsed no command line")


def command_problems(script: str, args: list[str]) -> list[str]:
    """What is wrong with `python script args...` as the docs write it: a missing script or config, an override
    key that Config lacks, a flag the script's parser lacks."""
    if PLACEHOLDER.fullmatch(Path(script).stem):
        return []  # python tools/X.py
    if not (ROOT / script).is_file():
        return [f"{script}: no such file"]
    problems = []
    for arg in args:
        named = NAMED_CONFIG.fullmatch(arg)
        if named and not PLACEHOLDER.fullmatch(Path(named.group(1)).stem) and not (ROOT / arg).is_file():
            problems.append(f"{arg}: no such config")
    if script in CONFIG_SCRIPTS:
        keys = set(config_fields())
        problems += [
            f"{script}: '{arg}' overrides no Config key"
            for arg in args
            if (key := re.match(r"(\w+)=", arg)) and key.group(1) not in keys
        ]
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("-") and len(arg) > 1]
    if flags:
        subcommand = "compare" if script == "infer.py" and args[:1] == ["compare"] else ""
        known = options_of(script, subcommand)
        problems += [
            f"{script}{' compare' if subcommand else ''}: no option {flag}" for flag in flags if flag not in known
        ]
    return problems


@pytest.mark.parametrize("doc", CURRENT_DOCS, ids=doc_id)
def test_commands_run_files_configs_keys_and_flags_that_exist(doc):
    problems = []
    for line, strict in shell_commands(doc.read_text(encoding="utf-8")):
        for script, args in script_calls(line, strict):
            problems += [f"{problem}   in: {line}" for problem in command_problems(script, args)]
    assert not problems, f"{doc_id(doc)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", CURRENT_DOCS, ids=doc_id)
def test_named_configs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    named = {f"args/{name}" for name in NAMED_CONFIG.findall(text) if not PLACEHOLDER.fullmatch(Path(name).stem)}
    named |= {f"args/{span}" for span in re.findall(r"`([\w-]+\.yaml)`", text)}
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"{doc_id(doc)} names configs that do not exist: {missing}"


def test_wrong_commands_are_caught():
    assert command_problems("tools/prepare.py", []) == ["tools/prepare.py: no such file"]
    assert command_problems("run.py", ["args/demo.yaml", "epochs=3"]) == ["run.py: 'epochs=3' overrides no Config key"]
    assert command_problems("run.py", ["args/demo2.yaml"]) == ["args/demo2.yaml: no such config"]
    assert command_problems("infer.py", ["compare", "a=b", "--records", "r", "--probe", "3"]) == [
        "infer.py compare: no option --probe"
    ]
    assert command_problems("tools/make_demo_data.py", ["data/grid", "--set=graph"]) == [
        "tools/make_demo_data.py: no option --set"
    ]
    assert script_calls("python -m pytest -q && torchrun --nproc_per_node 4 run.py args/X.yaml # 4 GPUs", True) == [
        ("run.py", ["args/X.yaml"])
    ]


def test_readme_is_short_and_holds_the_ci_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is over 200 lines: move detail into docs/"
    command = 'pip install -e ".[dev]" && python -m pytest -q'
    assert command in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").replace("pip install -q ", "pip install ")
    assert command in ci, "CI no longer runs the README's test command"


def test_readme_maps_every_module_and_tool():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    files = [*ROOT.glob("*.py"), *(ROOT / "models").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    unnamed = sorted(str(f.relative_to(ROOT)) for f in files if f"`{f.name}`" not in readme and f.name != "setup.py")
    assert not unnamed, f"README.md's map does not name: {unnamed}"


def test_license_and_citation():
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert cff["license"] == "MIT"
    assert any("2412.06769" in str(ref) for ref in cff["references"]), "CITATION.cff does not cite the Coconut paper"


# the tools that write results/: the runner's tables, the probe's cell counts
RESULT_WRITERS = ("python tools/ablate.py ", "python tools/patch_cells.py ")
COPY = re.compile(r"^<!-- copied from (\S+) by `([^`]+)` -->\n(.*?)^<!-- end of copy -->", re.DOTALL | re.MULTILINE)


def copied_lines(block: str, source: list[str]) -> list[str]:
    """The block's lines that are not, in order, lines of `source` (a copy may leave lines out, never change one)."""
    left, wrong = iter(source), []
    for line in filter(None, block.splitlines()):
        if line not in left:  # consumes `left` up to the match, so the order is checked too
            wrong.append(line)
    return wrong


@pytest.mark.parametrize("doc", CURRENT_DOCS, ids=doc_id)
def test_copied_results_are_the_files_the_runs_wrote(doc):
    """A table marked as copied is the runner's file line for line: results are never typed by hand."""
    for path, command, block in COPY.findall(doc.read_text(encoding="utf-8")):
        source = ROOT / path
        assert source.is_file(), f"{doc.name}: copied from {path}, which does not exist"
        assert command.startswith(RESULT_WRITERS), f"{doc.name}: {command!r} does not write {path}"
        wrong = copied_lines(block, source.read_text(encoding="utf-8").splitlines())
        assert not wrong, f"{doc.name}: not in {path} (copy it again from the file): {wrong[0]}"


def test_a_changed_copy_is_caught():
    source = ["# title", "- seeds: 1, 2", "| a | 1.0 |", "| b | 0.5 |"]
    assert copied_lines("- seeds: 1, 2\n\n| b | 0.5 |\n", source) == []
    assert copied_lines("| a | 1.0 |\n| b | 0.6 |\n", source) == ["| b | 0.6 |"]
    assert copied_lines("| b | 0.5 |\n| a | 1.0 |\n", source) == ["| a | 1.0 |"]  # out of order
