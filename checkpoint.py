"""Training checkpoints (atomic, checksummed, resumable) and the final `save_pretrained` export.

A checkpoint is one file in `<save_path>/<name>/`: `checkpoint_<N>.pt` after epoch N, or
`checkpoint_<N>_micro<M>.pt` when a stop signal ended epoch N after M micro-batches. It holds the full (gathered)
model and optimizer state, every rank's progress (epoch, micro-batch, schedule step, losses so far) and RNG states.
It is written to a temporary name, flushed and renamed, then a `.sha256` file is written beside it the same way:
a checkpoint without a matching checksum (a crash mid-write, a truncated copy) is skipped with a message and the
next older one is used. Under FSDP2 the state is gathered to rank 0, which writes; every rank reads it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase

from distributed import dist_info, gather_objects, unwrap
from utils import UserError, atomic_write_text

PROJECTION_FILE = "thought_projection.safetensors"  # an exported `projected` model's thought projection
PROJECTION_PREFIX = "projection."  # its parameters' names in Coconut's state dict
_NAME = re.compile(r"checkpoint_(\d+)(?:_micro(\d+))?\.pt$")


@dataclass
class Progress:
    """Everything a checkpoint must hold, besides weights and optimizer, to continue a run exactly."""

    epoch: int = 0  # the epoch in progress
    micro: int = 0  # micro-batches of that epoch already trained
    step: int = 0  # optimizer steps since the last optimizer reset (drives the schedule)
    total_steps: int = 0  # optimizer steps since the run began (the trackers' x-axis)
    best: float = -1.0  # best validation accuracy so far
    losses: list[float] = field(default_factory=list)  # this epoch's micro-batch losses so far
    thought_losses: list[float] = field(default_factory=list)  # and their step-supervision losses, when trained
    samples: int = 0  # this epoch's samples so far on this rank
    # with log_every: [loss, thought loss or None] of each micro-batch since the last step metrics were sent,
    # across epochs, of optimizer steps that were taken
    window: list[list[float | None]] = field(default_factory=list)
    bad_steps: int = 0  # non-finite steps in a row


def rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _position(path: Path) -> tuple[int, int] | None:
    """(epoch to continue, micro-batch to continue from) encoded in a checkpoint's file name."""
    match = _NAME.search(path.name)
    if not match:
        return None
    epoch, micro = int(match.group(1)), match.group(2)
    return (epoch + 1, 0) if micro is None else (epoch, int(micro))


def checkpoint_path(folder: Path, epoch: int, micro: int) -> Path:
    """The file name for a run that will continue at (`epoch`, `micro`)."""
    return folder / (f"checkpoint_{epoch - 1}.pt" if micro == 0 else f"checkpoint_{epoch}_micro{micro}.pt")


def save_checkpoint(folder: Path, progress: Progress, model: nn.Module, optimizer: Optimizer) -> Path:
    """Write a checkpoint of `progress`, model and optimizer; collective, rank 0 writes.

    A failed write (disk full) removes its temporary file, leaves the older checkpoints as they were and stops
    with one line.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, [optimizer], options=options)
    progresses, rngs = gather_objects(dataclasses.asdict(progress)), gather_objects(rng_state())
    path = checkpoint_path(folder, progress.epoch, progress.micro)
    if dist_info().rank == 0:
        state = {"model": model_state, "optimizer": optim_state, "progress": progresses, "rng": rngs}
        digest = atomic_save(state, path)
        atomic_write_text(path.with_suffix(".sha256"), digest)
    return path


def atomic_save(obj: object, path: Path) -> str:
    """`torch.save` to a temporary file in the same folder, flush it to disk, rename it over `path`; return its
    sha256. On failure the temporary file is removed and a UserError names the cause."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write (disk full) as either
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"{path}: could not write the checkpoint ({getattr(err, 'strerror', None) or 'write failed'}); "
            "free disk space and resume; older checkpoints are intact"
        ) from None
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest first."""
    found = [(pos, p) for p in folder.glob("checkpoint_*.pt") if (pos := _position(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose checksum matches; newer ones that do not are skipped with a message."""
    for path in reversed(_checkpoints(folder)):
        expected = path.with_suffix(".sha256")
        if expected.is_file() and expected.read_text().strip() == _sha256(path):
            return path
        if dist_info().rank == 0:
            print(f"ignoring {path}: incomplete or corrupt (no matching {expected.name})", file=sys.stderr)
    return None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (rank 0 only; the others return at once)."""
    if dist_info().rank != 0:
        return
    for path in _checkpoints(folder)[:-keep]:
        path.with_suffix(".sha256").unlink(missing_ok=True)
        path.unlink()


def _read_state(path: Path | str) -> dict:
    """A checkpoint file's contents; a file that is not one of this repo's checkpoints stops with one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many kinds (pickle, zip, runtime) for a file it cannot read
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}); give a checkpoint_<N>.pt") from None
    if not isinstance(state, dict) or not {"model", "progress"} <= set(state):
        raise UserError(f"{path}: not a checkpoint written by run.py; give a checkpoint_<N>.pt or an exported folder")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state from `path`; return this rank's progress dict.

    Only a job of as many processes as wrote it can resume it: the progress and data order are per rank.
    """
    state = _read_state(path)
    written, world = len(state["progress"]), dist_info().world_size
    if written != world:
        raise UserError(f"{path}: written by {written} process(es), this job has {world}; resume with {written}")
    set_state_dict(
        model,
        [optimizer],
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    set_rng_state(state["rng"][dist_info().rank])
    return state["progress"][dist_info().rank]


def load_model_weights(path: str, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint file into `model` (used to start from a CoT checkpoint); a
    thought projection the checkpoint lacks keeps its new initialisation."""
    state = _read_state(path)
    try:
        keys = set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: its weights do not fit this model ({first[:200]}); check model_id") from None
    misfits = [k for k in keys.missing_keys if not k.startswith(PROJECTION_PREFIX)] + keys.unexpected_keys
    if misfits:
        hint = "set thought_feedback: projected" if misfits[0].startswith(PROJECTION_PREFIX) else "check model_id"
        raise UserError(f"{path}: its weights do not fit this model ({misfits[0]} and others); {hint}")


def load_projection(folder: Path, model: nn.Module) -> None:
    """Load an exported folder's thought projection into a `projected` Coconut `model`; a folder without one (a
    CoT or `hidden` model) leaves the new projection as it is."""
    file = folder / PROJECTION_FILE
    if not file.is_file():
        return
    if model.projection is None:
        raise UserError(f"{folder}: holds a projected model's {PROJECTION_FILE}; set thought_feedback: projected")
    model.projection.load_state_dict(load_file(file))


def export_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, run: dict) -> None:
    """Write the base model inside the (possibly parallel-wrapped) Coconut `model` with `save_pretrained`, the
    tokenizer (latent tokens included) and `run` (the training config and the stage the model was trained to) as
    coconut.json to `folder`.

    A `projected` model's thought projection goes to thought_projection.safetensors beside the weights.
    Collective under FSDP2 (the weights are gathered first); rank 0 writes.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state, _ = get_state_dict(model, [], options=options)
    if dist_info().rank != 0:
        return
    prefix = "base."
    base = unwrap(model).base
    base.save_pretrained(folder, state_dict={k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    projection = {k[len(PROJECTION_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
    if projection:
        save_file(projection, folder / PROJECTION_FILE)
    tokenizer.save_pretrained(folder)
    (folder / "coconut.json").write_text(json.dumps(run, indent=2))
