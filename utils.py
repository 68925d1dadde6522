"""What every module may share: the one user-error type and its `entry_point` wrapper, writing a file whole or not
at all, reading a checkpoint folder's config.json, and seeding."""

from __future__ import annotations

import functools
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

import numpy as np
import torch

P = ParamSpec("P")


class UserError(Exception):
    """A mistake the user can fix (config, data, paths, checkpoints): the one error type `entry_point` reports as
    one line, without a traceback."""


def entry_point(main: Callable[P, None]) -> Callable[P, None]:
    """Wrap the `main` of a command-line file: a UserError ends it with one `error: <message>` line on stderr and
    exit status 2, whichever process raised it."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            main(*args, **kwargs)
        except UserError as err:
            print(f"error: {_message(err)}", file=sys.stderr)
            sys.exit(2)

    return run


def _message(err: UserError) -> str:
    """The one-line message of a UserError. A DataLoader worker's error reaches the main process re-raised with the
    worker's whole traceback as its text; the message is that traceback's last line, after the type name."""
    text = str(err).strip()
    if text.startswith("Caught UserError"):
        return text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that it appears whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_checkpoint_config(folder: str | Path) -> dict:
    """The config.json of a model checkpoint folder; a missing folder or file stops with one line."""
    folder = Path(folder)
    hint = "pass a local checkpoint folder (config.json, *.safetensors, tokenizer files)"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; {hint}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json, so this is not a checkpoint; {hint}")
    return json.loads(config_file.read_text())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
