"""The training loop: curriculum epochs, evaluation, checkpoints, and the guards that keep a long run alive.

`train` runs the epochs of the curriculum from wherever the newest checkpoint left off. Each epoch trains at its
stage, evaluates, appends a metrics line and writes a checkpoint. A SIGTERM or SIGINT (what a scheduler sends
before preemption) ends the current optimizer step, writes a mid-epoch checkpoint that `resume: auto` continues
from exactly, and exits with status 143; a step whose gradients are not finite is skipped and counted, and too many
in a row stop the run with its checkpoints intact.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

import checkpoint
import report
from config import Config
from curriculum import Schedule
from dataset import CoconutDataset, collate, to_device
from distributed import Job, is_distributed
from evaluate import generate_and_score, summarize, validation_loss
from utils import UserError

PREEMPTED_EXIT = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on their signal


class StopFlag:
    """Set by SIGTERM/SIGINT; `requested()` agrees across ranks so that all of them stop at the same step."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal (collective: every rank must ask at the same point)."""
        flag = torch.tensor([float(self.raised)], device=device)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lr_factor(step: int, total: int, config: Config) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine to zero at `total` steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train(
    config: Config,
    job: Job,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: tuple[CoconutDataset, CoconutDataset],
) -> None:
    """The whole curriculum: train, evaluate, log, checkpoint and export to `job.folder`, resuming where asked.

    `model` is the (parallel-wrapped) Coconut model, `data` the training and the validation set.
    """
    train_data, val_data = data
    val_prompts = val_data.prompts()
    schedule = Schedule.from_config(config)
    optimizer = make_optimizer(model, config)
    logger = report.MetricsLog(job.folder, config, job.is_main)
    progress = _resume(config, job, model, optimizer, logger)
    stop = StopFlag()

    for epoch in range(progress.epoch, config.num_epochs):
        stage = schedule.stage(epoch)
        if progress.micro == 0 and schedule.resets_optimizer(epoch):  # not when resuming mid-epoch
            optimizer = make_optimizer(model, schedule.stage_config(epoch))
            progress.step = 0
        for dataset in (train_data, val_data, val_prompts):
            dataset.set_stage(stage, epoch, schedule.stage_config(epoch))
        progress.epoch = epoch
        start, samples_before = time.perf_counter(), progress.samples  # a resumed epoch counts from here
        if not train_epoch(model, optimizer, train_data, schedule, progress, job, stop, logger):
            _stopped(checkpoint.save_checkpoint(job.folder, progress, model, optimizer), job)
        samples_per_s = (progress.samples - samples_before) * job.dist.world_size / (time.perf_counter() - start)
        metrics = {"epoch": epoch, "stage": stage, "train_loss": _mean_across_ranks(progress.losses, job.device)}
        if progress.thought_losses:
            metrics["thought_loss"] = _mean_across_ranks(progress.thought_losses, job.device)
        metrics["val_loss"] = validation_loss(model, val_data, job, config.eval_batch_size)
        result = summarize(generate_and_score(model, val_prompts, job, config.eval_batch_size))
        metrics |= {"val_accuracy": result["accuracy"], "gen_tokens": result["gen_tokens"]}
        metrics |= {"samples_per_s": samples_per_s, "lr": optimizer.param_groups[0]["lr"]}
        logger.log(metrics, progress.total_steps)
        if job.is_main:
            print(report.format_epoch(metrics))
        improved = result["accuracy"] > progress.best
        progress.best = max(progress.best, result["accuracy"])
        progress.epoch, progress.micro, progress.samples = epoch + 1, 0, 0
        progress.losses, progress.thought_losses = [], []
        saved = improved or not config.save_only_improve
        if saved:
            path = checkpoint.save_checkpoint(job.folder, progress, model, optimizer)
            checkpoint.prune_checkpoints(job.folder, config.keep_checkpoints)
        if schedule.ends_stage(epoch):
            _export(model, tokenizer, config, stage, job.folder / f"stage_{stage}")
        # a signal during evaluation or saving: the epoch's checkpoint is the place to continue from
        if saved and epoch < config.num_epochs - 1 and stop.requested(job.device):
            _stopped(path, job)
    _export(model, tokenizer, config, schedule.last_stage, job.folder / "final")
    if job.is_main and logger.path.exists():
        print(report.stage_table(logger.path))
        print(f"plot: {report.plot_metrics(logger.path, job.folder / 'metrics.png')}")


def _resume(
    config: Config, job: Job, model: nn.Module, optimizer: Optimizer, logger: report.MetricsLog
) -> checkpoint.Progress:
    """Where the run starts: the newest checkpoint's progress (model and optimizer restored) with resume: auto, else
    the beginning; a fresh run into a folder that already holds one is refused."""
    folder, progress = job.folder, checkpoint.Progress()
    if config.resume == "none" and (any(folder.glob("checkpoint_*.pt")) or logger.path.exists()):
        raise UserError(
            f"{folder} already holds a run (checkpoints or metrics.jsonl); set resume=auto to continue it, or "
            "choose another name or save_path"
        )
    latest = checkpoint.latest_checkpoint(folder) if config.resume == "auto" else None
    if latest is not None:
        progress = checkpoint.Progress(**checkpoint.load_checkpoint(latest, model, optimizer))
        if job.is_main:
            print(f"resumed from {latest} (epoch {progress.epoch}, micro-batch {progress.micro})")
    logger.drop_from(progress.epoch)  # the epochs this run (re)does, all of them when no checkpoint was found
    return progress


def _export(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config, stage: int, folder: Path) -> None:
    """Export the model trained to `stage`, with the run's config, for infer.py and later runs."""
    checkpoint.export_pretrained(model, tokenizer, folder, {"config": dataclasses.asdict(config), "stage": stage})


def train_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    data: CoconutDataset,
    schedule: Schedule,
    progress: checkpoint.Progress,
    job: Job,
    stop: StopFlag | None = None,
    logger: report.MetricsLog | None = None,
) -> bool:
    """Train the rest of the current epoch (from `progress.micro`) with its stage's config, the learning rate
    following the schedule's steps; False when a stop signal ended it early (no `stop`: never). With `logger` and
    log_every, every log_every optimizer steps send their mean loss (and thought loss), the learning rate and the
    last gradient norm to the tracker.

    The data order depends only on seed and epoch, so a resumed epoch skips exactly the micro-batches that the
    interrupted run had trained. Each optimizer step averages the micro-batch losses of its accumulation group,
    the epoch's last group too when it is shorter.
    """
    config = schedule.stage_config(progress.epoch)
    info = job.dist
    sampler = DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed)
    lr_span = schedule.lr_steps(progress.epoch, len(sampler))  # len(sampler): this rank's share of the records
    if progress.samples != min(progress.micro * config.batch_size_training, len(sampler)):
        size = progress.samples // progress.micro  # the mid-epoch offset counts micro-batches of this size
        raise UserError(
            f"config: the checkpoint stopped epoch {progress.epoch} after {progress.micro} micro-batches of {size}; "
            f"resume with batch_size_training={size}"
        )
    sampler.set_epoch(progress.epoch)
    order = list(sampler)[progress.micro * config.batch_size_training :]
    loader = DataLoader(
        data,
        batch_size=config.batch_size_training,
        sampler=order,
        collate_fn=partial(collate, pad_id=data.pad_id, latent_id=data.latent_id),
        num_workers=config.num_workers,
        pin_memory=job.device.type == "cuda",  # page-locked batches copy to the GPU without blocking the host
    )
    n_micro = math.ceil(len(sampler) / config.batch_size_training)
    accumulate = config.gradient_accumulation_steps
    model.train()
    bar = tqdm(
        loader, desc=f"epoch {progress.epoch} stage {data.stage}", disable=not info.is_main, leave=False,
        initial=progress.micro, total=n_micro,
    )  # fmt: skip
    for batch in bar:
        group_start = progress.micro // accumulate * accumulate
        group = min(accumulate, n_micro - group_start)
        progress.micro += 1
        last_micro = progress.micro == group_start + group
        batch = to_device(batch, job.device)
        with _grad_sync(model, last_micro), job.autocast():
            out = model(**batch)
            loss = out.loss
            if out.thought_loss is not None:  # step supervision: the batch carries step_ids
                loss = loss + config.thought_loss_weight * out.thought_loss
                progress.thought_losses.append(out.thought_loss.item())
            (loss / group).backward()
        progress.losses.append(out.loss.item())
        if config.log_every:
            thought = progress.thought_losses[-1] if out.thought_loss is not None else None
            progress.window.append([progress.losses[-1], thought])
        progress.samples += batch["input_ids"].shape[0]
        if not last_micro:
            continue
        for param_group in optimizer.param_groups:  # both may change with the stage (stage_overrides)
            param_group["lr"] = config.lr * lr_factor(progress.step, lr_span, config)
            param_group["weight_decay"] = config.weight_decay
        # the norm is global (DDP and FSDP2 gradients are synchronised), so every rank takes the same branch
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if torch.isfinite(norm):
            optimizer.step()
            progress.step += 1
            progress.total_steps += 1
            progress.bad_steps = 0
            if logger is not None and config.log_every and progress.total_steps % config.log_every == 0:
                _send_window(progress, optimizer, float(norm), job, logger)
        else:
            progress.bad_steps += 1
            del progress.window[-group:]  # the losses of a step not taken do not describe the model
            if info.is_main:
                print(f"skipped step {progress.step}: non-finite gradients ({progress.bad_steps} in a row)")
            if progress.bad_steps >= config.max_nonfinite_steps:
                raise UserError(
                    f"config: {progress.bad_steps} optimizer steps in a row had non-finite gradients (epoch "
                    f"{progress.epoch}); lower lr or check the data; checkpoints are intact"
                )
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{progress.losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if stop is not None and stop.requested(job.device):
            return False
    model.eval()
    return True


def _stopped(path: Path, job: Job) -> None:
    """Exit as a preempted job after a stop signal, naming the checkpoint that `resume: auto` continues from."""
    if job.is_main:
        print(f"stopped by signal: wrote {path}; continue with resume=auto", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)


def _send_window(
    progress: checkpoint.Progress, optimizer: Optimizer, norm: float, job: Job, logger: report.MetricsLog
) -> None:
    """Send the step metrics of log_every: the window's mean loss (and thought loss) over every rank, the learning
    rate and the last gradient norm; then start a new window. Every rank computes the means (a collective)."""
    metrics = {
        "train/loss": _mean_across_ranks([loss for loss, _ in progress.window], job.device),
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/grad_norm": norm,
    }
    thoughts = [thought for _, thought in progress.window if thought is not None]
    if thoughts:
        metrics["train/thought_loss"] = _mean_across_ranks(thoughts, job.device)
    logger.send(metrics, progress.total_steps)
    progress.window = []


def _mean_across_ranks(values: list[float], device: torch.device) -> float:
    """Mean of every rank's values."""
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _grad_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP `no_sync`, FSDP2 requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return nullcontext()
