"""Train (or evaluate) Coconut on InternVL through the staged curriculum of one YAML config.

    python run.py args/demo.yaml [key=value ...]                                   # one CPU or GPU
    torchrun --nnodes 1 --nproc_per_node N run.py args/multimodal_coconut.yaml     # DDP or FSDP2

Each epoch trains at the curriculum stage of that epoch, then measures validation loss and generation accuracy
on every rank, appends one JSON line to <save_path>/<name>/metrics.jsonl and writes a checkpoint. The last
model of each stage and of the run is exported with `save_pretrained` (stage_<k>/ and final/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import report
from coconut import Coconut
from dataset import CoconutDataset, collate, stage_for_epoch
from evaluate import generate_and_score, summarize, validation_loss
from internvl import LATENT_TOKENS, image_seq_length, load_base, tile_size
from utils import Config, DistInfo, UserError, dist_info, load_config, seed_everything


def setup_distributed() -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one (nccl on CUDA, gloo on CPU); the device is the local rank's."""
    info = dist_info()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if info.world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if not cuda:  # ranks on one host share its cores; oversubscribing them is many times slower
            local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return info, device


def build_model(config: Config) -> tuple[Coconut, object]:
    """The base model (or the checkpoint to start from) wrapped in Coconut, and its tokenizer."""
    start_from = config.load_model_path
    if start_from != "none" and not Path(start_from).exists():
        raise UserError(f"config: load_model_path {start_from} does not exist; train stage 0 first or fix the path")
    folder = start_from if start_from != "none" and Path(start_from).is_dir() else config.model_id
    dtype = torch.bfloat16 if config.bf16_weights else torch.float32
    base, tokenizer = load_base(folder, config.latent_init, dtype, config.attn_implementation or None)
    start, end, latent = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    model = Coconut(base, latent, start, end, tokenizer.eos_token_id)
    if start_from != "none" and Path(start_from).is_file():
        checkpoint.load_model_weights(start_from, model)
    return model, tokenizer


def parallelize(model: Coconut, config: Config, device: torch.device) -> torch.nn.Module:
    """Move to `device` and wrap for DDP or FSDP2 (each vision and decoder layer sharded, then the root)."""
    model.to(device)
    if config.activation_checkpointing:
        # only the vision tower: decoder layers write the KV cache that links the latent passes, and a
        # checkpointed layer would write it again when it is recomputed in backward
        model.base.model.vision_tower.gradient_checkpointing_enable()
    if config.use_ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.bf16 else None
        kwargs = {"mp_policy": policy} if policy else {}
        layers = list(model.base.model.vision_tower.encoder.layer) + list(model.decoder.layers)
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        register_fsdp_forward_method(model, "generate")
    return model


def autocast_context(config: Config, device: torch.device):
    """bf16 autocast when `bf16` is set, except under FSDP2, whose mixed-precision policy casts instead."""
    if config.bf16 and not config.use_fsdp:
        return partial(torch.autocast, device.type, torch.bfloat16)
    return nullcontext


def open_dataset(path: str, tokenizer, config: Config, model: Coconut) -> CoconutDataset:
    """A data file tokenised and tiled for `model`'s tile size and tokens per tile."""
    base_config = model.base.config
    return CoconutDataset(path, tokenizer, config, tile_size(base_config), image_seq_length(base_config))


def lr_factor(step: int, total: int, config: Config) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine to zero at `total` steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Logger:
    """metrics.jsonl on rank 0, plus wandb or TensorBoard when `report_to` asks for one (imported only then)."""

    def __init__(self, folder: Path, config: Config, enabled: bool) -> None:
        self.path, self.enabled, self.backend = folder / "metrics.jsonl", enabled, None
        if not enabled or config.report_to == "none":
            return
        try:
            if config.report_to == "wandb":
                import wandb

                self.backend = wandb.init(project="multimodal-coconut", name=config.name, config=vars(config))
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.backend = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            raise UserError(f"config: report_to {config.report_to} needs `pip install {config.report_to}`") from None

    def drop_after(self, epoch: int) -> None:
        """Forget lines of epochs after `epoch` (a resumed run redoes them)."""
        if self.enabled and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["epoch"] <= epoch]
            self.path.write_text("".join(line + "\n" for line in lines))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.backend is not None and hasattr(self.backend, "log"):
            self.backend.log(metrics, step=metrics["epoch"])
        elif self.backend is not None:
            for key, value in metrics.items():
                self.backend.add_scalar(key, value, metrics["epoch"])


def train(config: Config, info: DistInfo, device: torch.device) -> None:
    """The whole curriculum: train, evaluate, log, checkpoint and export, resuming where asked."""
    folder = Path(config.save_path) / config.name
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(config)
    train_data = open_dataset(config.train_path, tokenizer, config, model)
    val_data = open_dataset(config.val_path, tokenizer, config, model)
    val_prompts = val_data.prompts()
    base = model.base
    model = parallelize(model, config, device)
    autocast = autocast_context(config, device)
    optimizer = make_optimizer(model, config)
    logger = Logger(folder, config, info.is_main)
    state = {"step": 0, "best": -1.0}
    first_epoch = 0
    latest = checkpoint.latest_checkpoint(folder) if config.resume == "auto" else None
    if latest is not None:
        saved = checkpoint.load_checkpoint(latest, model, optimizer)
        state = {"step": saved["step"], "best": saved["best"]}
        first_epoch = saved["epoch"] + 1
        logger.drop_after(saved["epoch"])
        if info.is_main:
            print(f"resumed from {latest} (epoch {saved['epoch']})")

    for epoch in range(first_epoch, config.num_epochs):
        stage = stage_for_epoch(epoch, config)
        stage_config = config.for_stage(stage)
        new_stage = epoch > 0 and stage != stage_for_epoch(epoch - 1, config)
        if new_stage and config.reset_optimizer:
            optimizer = make_optimizer(model, stage_config)
            state["step"] = 0
        for dataset in (train_data, val_data, val_prompts):
            dataset.set_epoch(epoch)
        train_loss, samples_per_s = train_epoch(
            model, optimizer, train_data, stage_config, state, info, device, autocast, epoch
        )
        val_loss = validation_loss(model, val_data, config.eval_batch_size, device, autocast)
        rows = generate_and_score(
            model,
            val_prompts,
            tokenizer,
            config.eval_batch_size,
            config.max_new_tokens,
            device,
            autocast,
            progress=info.is_main,
        )
        result = summarize(rows)
        metrics = {
            "epoch": epoch,
            "stage": stage,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": result["accuracy"],
            "gen_tokens": result["gen_tokens"],
            "samples_per_s": samples_per_s,
            "lr": optimizer.param_groups[0]["lr"],
        }
        logger.log(metrics)
        if info.is_main:
            print(report.format_epoch(metrics))
        improved = result["accuracy"] > state["best"]
        state["best"] = max(state["best"], result["accuracy"])
        if improved or not config.save_only_improve:
            checkpoint.save_checkpoint(folder, epoch, model, optimizer, {"step": state["step"], "best": state["best"]})
            checkpoint.prune_checkpoints(folder, config.keep_checkpoints)
        last_of_stage = epoch == config.num_epochs - 1 or stage_for_epoch(epoch + 1, config) != stage
        if last_of_stage:
            run_info = {"config": dataclasses.asdict(config), "stage": stage}
            checkpoint.export_pretrained(model, base, tokenizer, folder / f"stage_{stage}", run_info)
    final_stage = stage_for_epoch(config.num_epochs - 1, config)
    run_info = {"config": dataclasses.asdict(config), "stage": final_stage}
    checkpoint.export_pretrained(model, base, tokenizer, folder / "final", run_info)
    if info.is_main and logger.path.exists():
        print(report.stage_table(logger.path))
        print(f"plot: {report.plot_metrics(logger.path, folder / 'metrics.png')}")


def train_epoch(model, optimizer, data, config: Config, state: dict, info: DistInfo, device, autocast, epoch: int):
    """One pass over the training set with gradient accumulation; returns (mean loss, samples/s on this rank)."""
    sampler = DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        data,
        batch_size=config.batch_size_training,
        sampler=sampler,
        collate_fn=partial(collate, pad_id=data.pad_id, latent_id=data.latent_id),
        num_workers=config.num_workers,
    )
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * _epochs_until_reset(epoch, config)
    model.train()
    losses, samples, start = [], 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} stage {data.stage}", disable=not info.is_main, leave=False)
    for micro, batch in enumerate(bar):
        last_micro = (micro + 1) % config.gradient_accumulation_steps == 0 or micro + 1 == len(loader)
        batch.pop("index")
        batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
        with _grad_sync(model, last_micro), autocast():
            loss = model(**batch).loss
            (loss / config.gradient_accumulation_steps).backward()
        losses.append(loss.item())
        samples += batch["input_ids"].shape[0]
        if last_micro:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(state["step"], total_steps, config)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    model.eval()
    mean = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    if info.world_size > 1:
        dist.all_reduce(mean)
    return float(mean[0] / mean[1]), samples * info.world_size / (time.perf_counter() - start)


def _epochs_until_reset(epoch: int, config: Config) -> int:
    """Epochs the learning-rate schedule spans: to the stage's end with reset_optimizer, else to the run's end."""
    if not config.reset_optimizer:
        return config.num_epochs
    stage = stage_for_epoch(epoch, config)
    first = next(e for e in range(epoch + 1) if stage_for_epoch(e, config) == stage)
    last = max(e for e in range(first, config.num_epochs) if stage_for_epoch(e, config) == stage)
    return last - first + 1


def _grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP `no_sync`, FSDP2 requires_gradient_sync)."""
    if hasattr(model, "no_sync"):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def evaluate_only(config: Config, info: DistInfo, device: torch.device) -> None:
    """Evaluate `load_model_path` on val_path at eval_stage (default: the curriculum's last stage)."""
    if config.load_model_path == "none":
        raise UserError("config: only_eval needs load_model_path (a checkpoint file or an exported folder)")
    model, tokenizer = build_model(config)
    stage = config.eval_stage if config.eval_stage >= 0 else stage_for_epoch(config.num_epochs - 1, config)
    data = open_dataset(config.val_path, tokenizer, config, model)
    data.stage = stage
    model = parallelize(model, config, device)
    model.eval()
    autocast = autocast_context(config, device)
    rows = generate_and_score(
        model,
        data.prompts(),
        tokenizer,
        config.eval_batch_size,
        config.max_new_tokens,
        device,
        autocast,
        progress=info.is_main,
    )
    result = summarize(rows) | {"stage": stage, "val_path": config.val_path}
    if info.is_main:
        folder = Path(config.save_path) / config.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(result, indent=2))
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or evaluate Coconut on InternVL.")
    parser.add_argument("config", help="a YAML file in args/")
    parser.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        info, device = setup_distributed()
        seed_everything(config.seed)
        if config.generate_demo_data and not Path(config.train_path).exists():
            import demo_data

            if info.is_main:
                demo_data.generate(str(Path(config.train_path).parent), config.seed)
            if info.world_size > 1:
                dist.barrier()
        (evaluate_only if config.only_eval else train)(config, info, device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
