"""Where a process sits in a torchrun job, and what that changes: joining and leaving the job, the `Job` every part
of a run reads, wrapping the model for DDP or FSDP2 (and `unwrap`), bf16 autocast, and collecting values from every
rank."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from config import Config
from utils import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job; a plain `python` run is rank 0 of 1."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0


@dataclass(frozen=True)
class Job:
    """What every part of a run needs to know about this process, built once: where it sits in the job, the device
    it computes on, how it computes in bf16, and the run's output folder (None outside a training run)."""

    dist: DistInfo
    device: torch.device
    autocast: Callable[[], AbstractContextManager] = nullcontext  # `with job.autocast():` around model calls
    folder: Path | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.dist.is_main


def dist_info() -> DistInfo:
    """Read rank, local rank (which device this process drives) and world size from torchrun's environment."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_distributed() -> bool:
    """True when a process group with more than one rank is running (collectives must then match)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: object) -> list:
    """Every rank's `obj` (any picklable value), in rank order; a one-element list outside a multi-rank job."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def setup_distributed(config: Config) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one (nccl on CUDA, gloo on CPU); the device is the local rank's.

    Collectives time out after dist_timeout_s, so the survivors of a dead rank exit instead of hanging.
    """
    info = dist_info()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if info.world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=config.dist_timeout_s))
        if not cuda:  # ranks on one host share its cores; oversubscribing them is many times slower
            local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return info, device


def leave_distributed(finished: bool) -> None:
    """Leave the torchrun job, if this process joined one.

    A rank that `finished` first waits for the others, so no rank shuts its connections while a peer is still
    writing the final export; collecting garbage first frees the wrapped model's process-group handles while the
    interpreter is alive (gloo aborts the process when they are freed during its shutdown).
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def check_parallel(config: Config, info: DistInfo, path: str) -> Config:
    """The config with its parallel wrapping checked against the number of processes. Several processes need
    use_ddp or use_fsdp (unwrapped, each would train its own copy of the model); one process needs neither, so
    `python run.py` runs a torchrun config on one device, unwrapped, and says so."""
    if info.world_size > 1 and not (config.use_ddp or config.use_fsdp):
        raise UserError(
            f"{path}: {info.world_size} processes but neither use_ddp nor use_fsdp is true; set one "
            "(each process would otherwise train its own copy of the model)"
        )
    if info.world_size == 1 and (config.use_ddp or config.use_fsdp):
        print(f"one process: {'use_ddp' if config.use_ddp else 'use_fsdp'} has no effect, the model runs unwrapped")
        return dataclasses.replace(config, use_ddp=False, use_fsdp=False)
    return config


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards a model in place: it stays its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parallelize(model: nn.Module, config: Config, device: torch.device, layers: list[nn.Module]) -> nn.Module:
    """Move a Coconut model to `device` and wrap it for DDP or FSDP2 (each of `layers`, the ones its family lists in
    `models.sharded_layers`, sharded on its own, then the root)."""
    model.to(device)
    if config.use_ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.bf16 else None
        kwargs = {"mp_policy": policy} if policy else {}
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        register_fsdp_forward_method(model, "generate")
    return model


def autocast_context(config: Config, device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast when `bf16` is set, except under FSDP2, whose mixed-precision policy casts instead."""
    if config.bf16 and not config.use_fsdp:
        return partial(torch.autocast, device.type, torch.bfloat16)
    return nullcontext
