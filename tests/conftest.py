"""Shared fixtures and helpers: the tiny offline InternVL, token rows laid out by hand, and run.py on demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_data  # noqa: E402
from coconut import LATENT_TOKENS, Coconut  # noqa: E402
from internvl import image_seq_length  # noqa: E402
from models import load_base  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random InternVL (float64, so exact comparisons are meaningful) and its tokenizer."""
    torch.manual_seed(0)
    model, tokenizer = load_base("tiny")
    return model.double().eval(), tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small demo data set (32 training and 8 validation records), written once per test module."""
    folder = tmp_path_factory.mktemp("demo")
    demo_data.generate(str(folder), seed=1, sizes={"train": 32, "val": 8})
    return folder


def make_coconut(base, tokenizer, eos_token_id: int | None = None) -> Coconut:
    """Wrap `base` with the tokenizer's latent ids."""
    latent = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return Coconut(base, latent, eos)


def image_block(base, tokenizer, n_tiles: int) -> list[int]:
    """`<img>` + context tokens for `n_tiles` tiles + `</img>`, as the data pipeline writes it."""
    if n_tiles == 0:
        return []
    ids = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    return [ids[0]] + [ids[1]] * (n_tiles * image_seq_length(base.config)) + [ids[2]]


def run(args: list[str], folder: Path, data: Path, *overrides: str, nproc: int = 0, wait: bool = True, status: int = 0):
    """Start run.py on args/demo.yaml with a small, fast setting; torchrun when nproc > 0. With `wait`, check
    that it exits with `status`."""
    settings = [
        f"train_path={data}/train.jsonl",
        f"val_path={data}/val.jsonl",
        f"save_path={folder}",
        "generate_demo_data=false",
        "batch_size_training=8",
        "eval_batch_size=8",
        "max_new_tokens=8",
        "max_latent_stage=2",
        "stage_overrides={}",
        "epochs_per_stage=1",
        "num_epochs=3",
        "warmup_steps=0",
        *overrides,
    ]
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + [str(ROOT / "run.py"), "args/demo.yaml", *settings, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stderr[-3000:]
    return done


def metrics(folder: Path) -> list[dict]:
    """The epoch lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of an exported folder."""
    return load_file(folder / "model.safetensors")
