"""A non-editable install into a fresh environment: every module imports from it, and the entry points run from
outside the checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

# the subprocesses see no checkout on their path, whatever the caller's PYTHONPATH
CLEAN_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
# what a checkout holds beyond the project itself: never part of what is installed
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "*.egg-info", "checkpoints", "data", "results", "__pycache__"
)


def library_modules() -> list[str]:
    """Every module the project installs: the root's modules (but setup.py) and models/'s."""
    root = [path.stem for path in ROOT.glob("*.py") if path.stem != "setup"]
    return sorted(root + [f"models.{path.stem}".removesuffix(".__init__") for path in (ROOT / "models").glob("*.py")])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a new environment holding a wheel-style install of a copy of the checkout (its dependencies
    are this environment's, reached through a path file, so nothing is downloaded)."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    venv.EnvBuilder(with_pip=False).create(work / "env")
    python = work / "env" / "bin" / "python"
    target = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True)
    packages = Path(target.stdout.decode().strip())
    # this environment's site-packages as a plain path: its own .pth files (the editable install) are not read
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", "--no-compile", str(source)], check=True, capture_output=True)
    shutil.rmtree(source)  # what runs below can only come from the install
    return python


def test_every_module_imports_from_the_install(installed, tmp_path):
    modules = library_modules()
    assert {"run", "infer", "coconut", "dataset", "utils", "models", "models.internvl"} <= set(modules)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).__file__)"
    done = subprocess.run(
        [installed, "-c", code, *modules], capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = done.stdout.split()
    assert len(files) == len(modules) and all(str(installed.parents[1]) in f for f in files), files


@pytest.mark.parametrize("entry_point, names", [("run", "overrides"), ("infer", "infer.py compare")])
def test_the_entry_points_answer_help_from_outside_the_checkout(installed, tmp_path, entry_point, names):
    command = [installed, "-m", entry_point, "--help"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    assert names in done.stdout  # infer's help shows its compare subcommand
