"""Training checkpoints (atomic, resumable) and the final `save_pretrained` export.

A checkpoint is one file `<save_path>/<name>/checkpoint_<epoch>.pt` holding the full (gathered) model and
optimizer state, the schedule's step, every rank's RNG states and the epoch. It is written to a temporary name and
renamed, so a reader never sees a half-written file. Under FSDP2 the state is gathered to rank 0 with
`torch.distributed.checkpoint.state_dict` and written by rank 0 alone; every rank reads it back on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from utils import is_distributed

_NAME = re.compile(r"checkpoint_(\d+)\.pt$")


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


def _gather(obj: object) -> list:
    """Every rank's `obj`, in rank order (a one-element list outside a multi-rank job)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered to rank 0 under FSDP2 (other ranks get an empty dict).

    Collective: every rank must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, _ = get_state_dict(model, [], options=options)
    return model_state


def save_checkpoint(folder: Path, epoch: int, model, optimizer, extra: dict) -> Path | None:
    """Write `checkpoint_<epoch>.pt` atomically (collective; rank 0 writes). Returns the path on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, [optimizer], options=options)
    rngs = _gather(rng_state())
    path = folder / f"checkpoint_{epoch}.pt"
    if is_distributed() and dist.get_rank() != 0:
        return None
    state = {
        "epoch": epoch,
        "model": model_state,
        "optimizer": optim_state,
        "rng": rngs,
        **extra,
    }
    atomic_save(state, path)
    return path


def atomic_save(obj: object, path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, flush it to disk, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest epoch in `folder`, or None."""
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (rank 0 only; the others return at once)."""
    if is_distributed() and dist.get_rank() != 0:
        return
    found = sorted((int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := _NAME.search(p.name)))
    for _, path in found[:-keep]:
        path.unlink()


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state from `path`; return the whole checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_state_dict(
        model,
        [optimizer],
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    rank = dist.get_rank() if is_distributed() else 0
    set_rng_state(state["rng"][rank])
    return state


def load_model_weights(path: str, model: torch.nn.Module) -> None:
    """Load only the model weights of a checkpoint file into `model` (used to start from a CoT checkpoint)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))


def export_pretrained(model: torch.nn.Module, base: torch.nn.Module, tokenizer, folder: Path, run: dict) -> None:
    """Write the base model with `save_pretrained`, the tokenizer (latent tokens included) and `run` (the
    training config and the stage the model was trained to) as coconut.json to `folder`.

    Collective under FSDP2 (the weights are gathered first); rank 0 writes.
    """
    state = full_model_state(model)
    if is_distributed() and dist.get_rank() != 0:
        return
    prefix = "base."
    base_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    base.save_pretrained(folder, state_dict=base_state)
    tokenizer.save_pretrained(folder)
    (folder / "coconut.json").write_text(json.dumps(run, indent=2))
