"""Train (or evaluate) Coconut on InternVL or a text causal LM through the staged curriculum of one YAML config.

    python run.py args/demo.yaml [key=value ...]                                   # one CPU or GPU
    torchrun --nnodes 1 --nproc_per_node N run.py args/multimodal_coconut.yaml     # DDP or FSDP2

This file sets up the job (config, processes, model, parallel wrapping); trainer.py runs the curriculum, and
`only_eval: true` evaluates a checkpoint instead. Mistakes a user can fix end as one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

import trainer
from coconut import Coconut
from config import Config, config_parser, load_config
from curriculum import Schedule
from dataset import CoconutDataset
from distributed import Job, autocast_context, check_parallel, leave_distributed, parallelize, setup_distributed
from evaluate import generate_and_score, write_evaluation
from models import build_model, encoding_for, sharded_layers
from utils import UserError, entry_point, seed_everything


def evaluate_only(config: Config, job: Job, model: Coconut, tokenizer: PreTrainedTokenizerBase) -> None:
    """Evaluate `load_model_path` on val_path at eval_stage (default: the curriculum's last stage), writing
    eval.json and predictions.jsonl to the run's folder."""
    if config.load_model_path == "none":
        raise UserError("config: only_eval needs load_model_path (a checkpoint file or an exported folder)")
    prompts = CoconutDataset.from_file(config.val_path, encoding_for(model.base, tokenizer, config)).prompts()
    prompts.set_stage(config.eval_stage if config.eval_stage >= 0 else Schedule.from_config(config).last_stage)
    model = parallelize(model, config, job.device, sharded_layers(model.base))
    model.eval()
    rows = generate_and_score(model, prompts, job, config.eval_batch_size)
    if job.is_main:
        print(json.dumps(write_evaluation(job.folder, rows, prompts.stage, config.val_path)))


def run_job(args: argparse.Namespace) -> None:
    """Set up this process's part of the job from the parsed command line, then train or evaluate."""
    config = load_config(args.config, args.overrides)
    info, device = setup_distributed(config)
    config = check_parallel(config, info, args.config)
    job = Job(info, device, autocast_context(config, device), Path(config.save_path) / config.name)
    seed_everything(config.seed)
    if config.generate_demo_data != "none":
        import demo_data

        if info.is_main:
            demo_data.write_missing(config)
        if info.world_size > 1:
            dist.barrier()
        demo_data.check(str(Path(config.train_path).parent), config.generate_demo_data, tuple(config.demo_moves))
    model, tokenizer = build_model(config)
    if config.only_eval:
        evaluate_only(config, job, model, tokenizer)
    else:
        encoding = encoding_for(model.base, tokenizer, config)
        train_data = CoconutDataset.from_file(config.train_path, encoding, training=True)
        data = (train_data, CoconutDataset.from_file(config.val_path, encoding))
        job.folder.mkdir(parents=True, exist_ok=True)
        model = parallelize(model, config, device, sharded_layers(model.base))
        trainer.train(config, job, model, tokenizer, data)


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python run.py CONFIG [key=value ...]`: train through the curriculum, or evaluate with only_eval."""
    args = config_parser("Train or evaluate Coconut on InternVL or a text causal LM.").parse_args(argv)
    finished = False
    try:
        run_job(args)  # returns before the job is left, so the model and its process-group handles are freed first
        finished = True
    finally:
        leave_distributed(finished)


if __name__ == "__main__":
    main()
