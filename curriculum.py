"""The curriculum: what a record's sequence holds at each stage, and which stage each epoch of a run trains.

`stage_plan` is the one rule that turns a stage into removed steps and latent tokens, for training sequences and
evaluation prompts alike. `Schedule` is a run's curriculum over its epochs, computed once from its Config; the
trainer and only_eval read it, and the datasets are told the stage it gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from config import Config


def stage_plan(stage: int, n_steps: int, config: Config) -> tuple[int, int]:
    """(steps removed, latent tokens) for a record with `n_steps` steps at curriculum `stage`.

    Stage k removes the first k steps and puts k x c_thought latents in their place; past max_latent_stage all
    steps go. The number of latent steps is capped at max_latent_stage and, unless pad_latent_to_max, at the
    record's own step count. The same rule builds training sequences and evaluation prompts.
    """
    if config.cot:
        return 0, 0
    if config.no_cot:
        return n_steps, 0
    removed = n_steps if stage > config.max_latent_stage else min(stage, n_steps)
    latent_steps = min(stage, config.max_latent_stage)
    if not config.pad_latent_to_max:
        latent_steps = min(latent_steps, n_steps)
    return removed, 0 if config.no_thoughts else latent_steps * config.c_thought


def latent_width(config: Config) -> int:
    """The positions each latent takes in a sequence: the thought, then its visual_latents patch positions."""
    return 1 + config.visual_latents


def has_markers(config: Config) -> bool:
    """Whether sequences carry <|start-latent|> and <|end-latent|>: in coconut mode, unless no_thoughts."""
    return config.coconut and not config.no_thoughts


@dataclass(frozen=True)
class Schedule:
    """A run's curriculum over its epochs, computed once from its Config: the stage each epoch trains, the config
    in force at each stage (stage_overrides applied), where the optimizer restarts and how many optimizer steps
    each learning-rate schedule spans.

    The schedule's stages (their epochs, overrides and optimizer restarts) and the sequences an epoch trains are
    one stage, except under train_stage, which pins the sequences to one stage while the schedule still steps
    through the curriculum's."""

    stages: tuple[int, ...]  # the schedule's stage in each epoch: its epochs, overrides and optimizer restarts
    configs: tuple[Config, ...]  # the config in force at stage 0, 1, ..., the last stage of the schedule
    reset_optimizer: bool  # a new optimizer (and learning-rate schedule) at each stage change
    train_stage: int = -1  # >= 0: the stage whose sequences every epoch trains; -1: each epoch's own

    @classmethod
    def from_config(cls, config: Config) -> Schedule:
        """The schedule of `config`: each stage lasts the epochs_per_stage in force at that stage (stage_overrides
        may lengthen stage 0, or skip it with 0 epochs); cot and no_cot train stage 0 throughout unless
        train_stage gives them the curriculum's stages."""
        configs, stages = [config.for_stage(0)], []
        staged = config.coconut or config.train_stage >= 0
        left = configs[0].epochs_per_stage if staged else config.num_epochs
        for _ in range(config.num_epochs):
            while left == 0:  # the stage is over (or lasts no epoch at all): the next one starts
                configs.append(config.for_stage(len(configs)))
                left = configs[-1].epochs_per_stage
            stages.append(len(configs) - 1)
            left -= 1
        return cls(tuple(stages), tuple(configs), config.reset_optimizer, config.train_stage)

    @property
    def last_stage(self) -> int:
        """The stage the run's last epoch trains (the one final/ is exported at)."""
        return self.stage(len(self.stages) - 1)

    def stage(self, epoch: int) -> int:
        """The curriculum stage whose sequences `epoch` (0-based) trains and validates on."""
        return self.train_stage if self.train_stage >= 0 else self.stages[epoch]

    def stage_config(self, epoch: int) -> Config:
        """The config in force in `epoch`: the run's, with its schedule stage's overrides applied."""
        return self.configs[self.stages[epoch]]

    def resets_optimizer(self, epoch: int) -> bool:
        """Whether `epoch` starts with a new optimizer: with reset_optimizer, at each stage change."""
        return self.reset_optimizer and epoch > 0 and self.stages[epoch] != self.stages[epoch - 1]

    def ends_stage(self, epoch: int) -> bool:
        """Whether `epoch` is the last to train its stage's sequences (a stage_<k>/ export follows it)."""
        return epoch == len(self.stages) - 1 or self.stage(epoch + 1) != self.stage(epoch)

    def epoch_steps(self, epoch: int, samples: int) -> int:
        """Optimizer steps of `epoch` at its stage's batch size and accumulation, for `samples` records per rank."""
        config = self.stage_config(epoch)
        return math.ceil(math.ceil(samples / config.batch_size_training) / config.gradient_accumulation_steps)

    def lr_steps(self, epoch: int, samples: int) -> int:
        """Optimizer steps the learning-rate schedule spans at `epoch`: those of the epochs from the last optimizer
        reset to the next (the stage's with reset_optimizer, else the run's), for `samples` training records per
        rank."""
        return sum(
            self.epoch_steps(other, samples)
            for other, stage in enumerate(self.stages)
            if not self.reset_optimizer or stage == self.stages[epoch]
        )
