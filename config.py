"""A run's configuration: the `Config` keys, and `load_config`, which reads, substitutes and checks a YAML file.

A run is described by one YAML file in `args/`. `load_config` turns it into a typed `Config`: it follows
`base_config:` chains, replaces `${VAR}` from the environment, applies `key=value` overrides from the command
line and checks every key and type, so a typo stops the run before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils import UserError

# how a thought's input embedding is made from the hidden state before it (coconut.Coconut.feed_back)
THOUGHT_FEEDBACK = ("hidden", "rescaled", "projected", "none")
# the synthetic sets demo_data.py writes: colour grids (images) and pointer chasing (text)
DEMO_SETS = ("grid", "graph")
# (fewest, most) moves per record of a demo set: three steps, one per curriculum stage of args/demo.yaml
DEMO_MOVES = (3, 3)


@dataclass
class Config:
    """Every key a YAML file in `args/` may set, with its default: the reference the docs point to. Names follow
    the original Coconut."""

    # run
    name: str = "run"  # outputs go to save_path/name
    seed: int = 0  # seeds the tiny model's weights, the data order and uniform_prob's draws
    save_path: str = "checkpoints"  # parent folder of the run's folder
    resume: str = "none"  # none: start fresh (a folder holding a run is refused); auto: continue the newest checkpoint
    only_eval: bool = False  # evaluate load_model_path on val_path at eval_stage instead of training
    save_only_improve: bool = False  # write a checkpoint only when validation accuracy improves
    # model
    model_id: str = "tiny"  # tiny, tiny-gpt2, tiny-qwen2 (random, offline), a local folder or a hub id
    load_model_path: str = "none"  # start from this checkpoint file or exported folder ("none": from model_id)
    latent_init: str = "mean"  # new token rows: "mean" of all rows, or the text of an existing token
    bf16: bool = False  # compute in bf16 (autocast, or FSDP2's mixed precision) over fp32 master weights
    attn_implementation: str = ""  # empty: flash_attention_2 when installed on CUDA, else sdpa
    # data
    train_path: str = ""  # training records (JSON list or JSONL)
    val_path: str = ""  # validation records: validation loss and generation accuracy after each epoch
    image_root: str = ""  # empty: image paths are relative to the data file's folder
    max_num_tiles: int = 12  # InternVL's dynamic tiling: at most this many tiles per image
    use_thumbnail: bool = True  # add a thumbnail of the whole image when it is cut into more than one tile
    prompt_template: str = "{image}{question}\n"  # the text before the thoughts; only {image} and {question}
    image_cache_mb: int = 1024  # memory for decoded tiles, shared by a dataset and its evaluation prompts
    max_length: int = 0  # longest training sequence in tokens (0: no limit)
    too_long: str = "error"  # a longer record: error (stop) or skip (drop, counted and listed)
    # training mode and curriculum
    coconut: bool = False  # the Coconut curriculum: stage k replaces the first k steps by latents
    cot: bool = False  # train on the full chain of thought (stage 0 throughout)
    no_cot: bool = False  # train on the answer alone, without steps
    no_thoughts: bool = False  # with coconut: remove steps per stage but insert no latents (the paper's ablation)
    c_thought: int = 1  # latents per removed step
    max_latent_stage: int = 3  # the last stage that adds latents; later stages remove every step
    epochs_per_stage: int = 1  # epochs each curriculum stage trains
    train_stage: int = -1  # k >= 0: every epoch trains stage k's sequences, on the curriculum's schedule; -1: off
    pad_latent_to_max: bool = False  # give every record the stage's full latents, even with fewer steps
    uniform_prob: float = 0.0  # chance that a training item takes a stage drawn uniformly from 0..its steps
    thought_feedback: str = "hidden"  # a thought's input: hidden (the paper), rescaled, projected, none (pause)
    latent_iterations: int = 0  # 0: a decoder pass per thought; T >= 1: T feedback rounds over all thoughts (Jacobi)
    thought_loss_weight: float = 0.0  # step supervision: weight of decoding each thought group into its step
    visual_latents: int = 0  # K > 0 (vision models): K positions after each thought, the patches it attends to most
    # optimisation
    num_epochs: int = 10  # length of the whole run; the stages follow from epochs_per_stage
    batch_size_training: int = 8  # micro-batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.01  # AdamW weight decay
    reset_optimizer: bool = False  # a new optimizer (and lr schedule) at each stage change, as the paper does
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    lr_schedule: str = "constant"  # constant | cosine (to zero at the next optimizer reset or the run's end)
    max_grad_norm: float = 1.0  # gradient-norm clipping
    # evaluation
    eval_batch_size: int = 32  # batch of validation loss and generation
    max_new_tokens: int = 64  # most tokens generated per answer
    eval_stage: int = -1  # only_eval: stage of the prompts; -1 = the curriculum's last stage
    # distribution and memory
    use_fsdp: bool = False  # shard with FSDP2 under torchrun (each vision and decoder layer, then the root)
    use_ddp: bool = False  # replicate with DDP under torchrun
    dist_timeout_s: int = 600  # a collective waiting longer (a rank died) fails instead of hanging
    bf16_weights: bool = False  # keep the parameters themselves in bf16 (default: fp32 master weights)
    activation_checkpointing: bool = False  # recompute the vision tower's activations in backward
    num_workers: int = 0  # data-loader processes (0: decode in the main process, whose tile cache lasts the run)
    keep_checkpoints: int = 2  # checkpoint files kept; older ones are deleted
    max_nonfinite_steps: int = 10  # stop after this many optimizer steps in a row with non-finite gradients
    report_to: str = "none"  # none | wandb | tensorboard
    log_every: int = 0  # also send loss, lr, grad norm and thought loss to report_to every N optimizer steps (0: off)
    generate_demo_data: str = "none"  # grid | graph: write that demo_data.py set when train_path's folder lacks it
    demo_moves: list = field(default_factory=lambda: list(DEMO_MOVES))  # [fewest, most] moves per demo record
    # {stage: {key: value}}: keys (STAGE_KEYS) that change from a given curriculum stage on
    stage_overrides: dict = field(default_factory=dict)

    def for_stage(self, stage: int) -> Config:
        """Return the config in force at curriculum `stage`: every override of a stage <= `stage`, in order."""
        values: dict[str, Any] = {}
        for start in sorted(self.stage_overrides):
            if start <= stage:
                values.update(self.stage_overrides[start])
        return dataclasses.replace(self, **values)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "dict": "a mapping",
    "list": "a list",
}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _check_value(key: str, value: Any, where: str) -> Any:
    """Return `value` converted to the type of `key`, or raise a UserError naming the key and the file."""
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{where}: unknown key '{key}'{hint}; remove it or fix its name")
    kind = _FIELDS[key].type
    if kind == "float" and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise UserError(f"{where}: key '{key}' must be {_TYPE_NAMES[kind]}, got {value!r}; fix its value")
    return float(value) if kind == "float" else value


def _substitute_env(value: Any, key: str, where: str) -> Any:
    """Replace every `${VAR}` in the strings of `value` from the environment; an unset variable is an error."""
    if isinstance(value, dict):
        return {k: _substitute_env(v, key, where) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise UserError(f"{where}: environment variable {name} (used by key '{key}') is not set; export it")
        return os.environ[name]

    return _ENV.sub(lookup, value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    """Read one YAML file and its `base_config` chain into {key: (value, file it came from)}."""
    if path in seen:
        raise UserError(f"{path}: base_config chain loops back to itself; remove the cycle")
    if not path.is_file():
        where = f"{seen[-1]}: base_config" if seen else "config"
        raise UserError(f"{where} file {path} does not exist; check the path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must be a mapping of key: value lines")
    values: dict[str, tuple[Any, str]] = {}
    base = raw.pop("base_config", None)
    if base is not None:
        values.update(_read_yaml((path.parent / str(base)).resolve(), seen + (path,)))
    values.update({key: (value, str(path)) for key, value in raw.items()})
    return values


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Load `path` (following `base_config`), apply `key=value` overrides, substitute `${VAR}` and validate.

    Every problem raises a `UserError` whose one line names the key, the file it came from and the fix:
    unknown keys, wrong types, unset environment variables and contradictory modes.
    """
    raw = _read_yaml(Path(path).resolve())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"command line: '{item}' is not key=value; write e.g. lr=1e-4")
        raw[key] = (_parse_value(text, key, "command line") if text else "", "command line")
    values = {}
    for key, (value, where) in raw.items():
        substituted = _substitute_env(value, key, where)
        if substituted != value and key in _FIELDS and _FIELDS[key].type not in ("str", "dict"):
            substituted = _parse_value(substituted, key, where)  # num_epochs: ${EPOCHS} is an integer, not text
        value = _check_value(key, substituted, where)
        if key == "stage_overrides":
            value = _check_stage_overrides(value, where)
        values[key] = value
    config = Config(**values)
    _check_modes(config, str(path))
    return config


def _parse_value(text: str, key: str, where: str) -> Any:
    """A value given as text (a command-line override, a substituted `${VAR}`) read as YAML reads it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"{where}: the value of '{key}' is not valid YAML ({text!r}); quote it") from None


# What the training loop reads per stage; every other key (data layout, evaluation, modes) holds for the whole run.
STAGE_KEYS = (
    "epochs_per_stage",
    "uniform_prob",
    "thought_loss_weight",
    "lr",
    "weight_decay",
    "warmup_steps",
    "lr_schedule",
    "max_grad_norm",
    "batch_size_training",
    "gradient_accumulation_steps",
    "num_workers",
    "max_nonfinite_steps",
)


def _check_stage_overrides(value: dict, where: str) -> dict[int, dict]:
    """Validate `stage_overrides`: integer stages mapping to valid values of the keys in STAGE_KEYS."""
    checked = {}
    for stage, keys in value.items():
        if not isinstance(stage, int) or not isinstance(keys, dict):
            raise UserError(f"{where}: stage_overrides must map stage numbers to key: value mappings")
        for key in keys:
            if key in _FIELDS and key not in STAGE_KEYS:
                raise UserError(
                    f"{where}: stage_overrides cannot change '{key}' (it holds for the whole run); set it at the "
                    f"top level. Per stage: {', '.join(STAGE_KEYS)}"
                )
        checked[stage] = {key: _check_value(key, v, f"{where} (stage_overrides {stage})") for key, v in keys.items()}
    return checked


def _check_modes(config: Config, where: str) -> None:
    """Reject contradictory or out-of-range settings with one line naming the keys, also in the config of every
    stage that `stage_overrides` changes."""
    _check_values(config, where)
    stages = sorted(config.stage_overrides)
    for stage in stages:
        _check_values(config.for_stage(stage), f"{where} (stage_overrides {stage})", last_stage=stage == stages[-1])


def _check_values(config: Config, where: str, last_stage: bool = True) -> None:
    """The checks of `_check_modes` on one stage's config. Only the last overridden stage must last an epoch:
    an earlier one may be skipped (`0: {epochs_per_stage: 0}` starts a Coconut run from a CoT model at stage 1),
    but the curriculum has to reach a stage that lasts."""
    modes = [m for m in ("coconut", "cot", "no_cot") if getattr(config, m)]
    if len(modes) != 1:
        got = " and ".join(modes) if modes else "none"
        raise UserError(f"{where}: set exactly one of coconut, cot, no_cot to true (got {got})")
    if config.no_thoughts and not config.coconut:
        raise UserError(f"{where}: no_thoughts is an ablation of the coconut curriculum; also set coconut: true")
    if config.use_fsdp and config.use_ddp:
        raise UserError(f"{where}: use_fsdp and use_ddp are both true; choose one")
    choices = {
        "resume": ("none", "auto"),
        "lr_schedule": ("constant", "cosine"),
        "report_to": ("none", "wandb", "tensorboard"),
        "too_long": ("error", "skip"),
        "thought_feedback": THOUGHT_FEEDBACK,
        "generate_demo_data": ("none", *DEMO_SETS),
    }
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise UserError(f"{where}: {key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    positive = (
        "c_thought",
        "num_epochs",
        "batch_size_training",
        "gradient_accumulation_steps",
        "max_num_tiles",
        "eval_batch_size",
        "max_new_tokens",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "dist_timeout_s",
    )
    for key in positive + (("epochs_per_stage",) if last_stage else ()):
        if getattr(config, key) < 1:
            raise UserError(f"{where}: {key} must be at least 1, got {getattr(config, key)}")
    not_negative = (
        "epochs_per_stage",
        "max_latent_stage",
        "lr",
        "weight_decay",
        "warmup_steps",
        "max_grad_norm",
        "num_workers",
        "max_length",
        "image_cache_mb",
        "thought_loss_weight",
        "log_every",
        "latent_iterations",
        "visual_latents",
    )
    for key in not_negative:
        if getattr(config, key) < 0:
            raise UserError(f"{where}: {key} must be at least 0, got {getattr(config, key)}")
    _check_latent_iterations(config, where)
    if config.visual_latents and (not config.coconut or config.thought_feedback == "none"):
        raise UserError(
            f"{where}: visual_latents looks at the image again after each continuous thought; set coconut: true and "
            "a thought_feedback other than none, or visual_latents: 0"
        )
    if config.log_every and config.report_to == "none":
        raise UserError(f"{where}: log_every sends step metrics to report_to's tracker; set report_to or log_every: 0")
    if config.train_stage < -1:
        raise UserError(f"{where}: train_stage must be -1 (each epoch's own stage) or a stage number")
    if config.train_stage > 0 and not config.coconut:
        raise UserError(
            f"{where}: cot and no_cot train the same sequences at every stage; set train_stage 0 (the curriculum's "
            f"schedule) or -1 (one stage), got {config.train_stage}"
        )
    if config.eval_stage < -1:
        raise UserError(f"{where}: eval_stage must be -1 (the last stage) or a stage number, got {config.eval_stage}")
    check_demo_moves(config.demo_moves, f"{where}: demo_moves")
    if not 0.0 <= config.uniform_prob <= 1.0:
        raise UserError(f"{where}: uniform_prob must be between 0 and 1, got {config.uniform_prob}")
    for key in ("{image}", "{question}"):
        if key not in config.prompt_template:
            raise UserError(f"{where}: prompt_template must contain {key}")
    try:
        config.prompt_template.format(image="", question="")
    except (KeyError, IndexError, ValueError):
        raise UserError(
            f"{where}: prompt_template may name only {{image}} and {{question}}; write other braces as {{{{ and }}}}"
        ) from None


def _check_latent_iterations(config: Config, where: str) -> None:
    """latent_iterations iterates thoughts fed back from hidden states: only a coconut run without `none` feedback
    has them, and not with visual_latents, whose patches each need a pass of their thought's own."""
    if not config.latent_iterations:
        return
    if not config.coconut:
        fix = "set coconut: true or latent_iterations: 0"
        raise UserError(f"{where}: latent_iterations iterates the coconut curriculum's thoughts; {fix}")
    if config.thought_feedback == "none":
        fix = "set latent_iterations: 0 or another thought_feedback"
        raise UserError(
            f"{where}: latent_iterations iterates thoughts fed back, which thought_feedback: none has not; {fix}"
        )
    if config.visual_latents:
        raise UserError(
            f"{where}: latent_iterations and visual_latents cannot be combined (the iterated thoughts have no pass of "
            "their own to choose patches in); set one of them to 0"
        )


def check_demo_moves(moves: Any, where: str) -> tuple[int, int]:
    """`moves` as (fewest, most) moves per demo record, or a UserError naming `where`: two integers with
    1 <= fewest <= most."""
    ints = isinstance(moves, (list, tuple)) and all(isinstance(m, int) and not isinstance(m, bool) for m in moves)
    if not ints or len(moves) != 2 or not 1 <= moves[0] <= moves[1]:
        raise UserError(f"{where} must be two integers fewest, most with 1 <= fewest <= most, got {moves!r}")
    return moves[0], moves[1]


def config_parser(description: str) -> argparse.ArgumentParser:
    """The command line of every config-driven entry point: a YAML path, then key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="a YAML file in args/")
    parser.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    return parser
