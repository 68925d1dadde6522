"""YAML configs: base chains, ${VAR}, command-line overrides, per-stage overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import Config, load_config
from curriculum import Schedule
from utils import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_base_config_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/data")
    write(tmp_path, "base.yaml", "coconut: true\nlr: 0.001\nc_thought: 2\ntrain_path: ${DATA_DIR}/train.jsonl\n")
    path = write(tmp_path, "run.yaml", "base_config: base.yaml\nc_thought: 3\nname: child\n")
    config = load_config(path, ["lr=5e-5", "bf16=true", "name=cli"])
    assert (config.c_thought, config.lr, config.bf16, config.name) == (3, 5e-5, True, "cli")
    assert config.train_path == "/data/train.jsonl"
    assert config.batch_size_training == Config().batch_size_training  # defaults fill the rest


def test_environment_variables_fill_typed_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("EPOCHS", "5")
    monkeypatch.setenv("BF16", "true")
    monkeypatch.setenv("LR", "1e-4")
    config = load_config(write(tmp_path, "a.yaml", "cot: true\nnum_epochs: ${EPOCHS}\nbf16: ${BF16}\nlr: ${LR}\n"))
    assert (config.num_epochs, config.bf16, config.lr) == (5, True, 1e-4)


def test_a_skipped_first_stage_loads(tmp_path):
    text = "coconut: true\nstage_overrides: {0: {epochs_per_stage: 0}, 1: {epochs_per_stage: 3}}\n"
    config = load_config(write(tmp_path, "a.yaml", text))
    assert [config.for_stage(s).epochs_per_stage for s in (0, 1, 2)] == [0, 3, 3]


def test_stage_overrides_apply_from_their_stage_on(tmp_path):
    path = write(tmp_path, "a.yaml", "coconut: true\nlr: 0.1\nstage_overrides:\n  2: {lr: 0.01}\n  4: {lr: 0.001}\n")
    config = load_config(path)
    assert [config.for_stage(s).lr for s in (0, 1, 2, 3, 4, 9)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("coconut: true\nlrr: 1\n", [], r"a.yaml: unknown key 'lrr' \(did you mean 'lr'\?\)"),
        ("coconut: true\nlr: fast\n", [], "a.yaml: key 'lr' must be a number, got 'fast'"),
        ("coconut: true\nc_thought: 1.5\n", [], "key 'c_thought' must be an integer"),
        ("coconut: true\nbf16: 1\n", [], "key 'bf16' must be true or false"),
        ("coconut: true\ncot: true\n", [], "set exactly one of coconut, cot, no_cot to true \\(got coconut and cot\\)"),
        ("lr: 1\n", [], "set exactly one of coconut, cot, no_cot"),
        ("cot: true\nuse_fsdp: true\nuse_ddp: true\n", [], "use_fsdp and use_ddp are both true; choose one"),
        ("cot: true\ntrain_path: ${NOPE_UNSET}/x\n", [], "environment variable NOPE_UNSET .*'train_path'.* is not set"),
        ("cot: true\n", ["lr"], "command line: 'lr' is not key=value"),
        ("cot: true\n", ["epochs=3"], "command line: unknown key 'epochs'"),
        ("cot: [unclosed\n", [], "a.yaml: not valid YAML at line"),
        ("coconut: true\nstage_overrides: {1: {cot: true}}\n", [], "stage_overrides cannot change 'cot'"),
        ("coconut: true\nstage_overrides: {1: {lr: x}}\n", [], r"\(stage_overrides 1\): key 'lr' must be a number"),
        ("no_thoughts: true\ncot: true\n", [], "no_thoughts is an ablation of the coconut curriculum"),
        ("base_config: missing.yaml\ncot: true\n", [], "base_config file .*missing.yaml does not exist"),
        ("coconut: true\nstage_overrides: {2: {c_thought: 2}}\n", [], "stage_overrides cannot change 'c_thought'"),
        ("coconut: true\nstage_overrides: {1: {gradient_accumulation_steps: 0}}\n", [],
         r"\(stage_overrides 1\): gradient_accumulation_steps must be at least 1"),
        ("coconut: true\nstage_overrides: {1: {lr_schedule: cosin}}\n", [], "lr_schedule must be one of"),
        # a curriculum whose stages from 1 on last no epoch would never end
        ("coconut: true\nstage_overrides: {1: {epochs_per_stage: 0}}\n", [], "epochs_per_stage must be at least 1"),
        ("coconut: true\nstage_overrides: {0: {epochs_per_stage: -1}, 1: {epochs_per_stage: 1}}\n", [],
         r"\(stage_overrides 0\): epochs_per_stage must be at least 0"),
        ("cot: true\nkeep_checkpoints: 0\n", [], "keep_checkpoints must be at least 1"),
        ("cot: true\nlr: -1\n", [], "lr must be at least 0, got -1"),
        ("cot: true\n", ["max_length=-7"], "max_length must be at least 0"),
        ("cot: true\ndist_timeout_s: 0\n", [], "dist_timeout_s must be at least 1"),
        ("cot: true\neval_stage: -9\n", [], "eval_stage must be -1"),
        ("cot: true\n", ["eval_batch_size=0"], "eval_batch_size must be at least 1"),
        ("coconut: true\ntrain_stage: -2\n", [], "train_stage must be -1"),
        ("no_cot: true\ntrain_stage: 2\n", [], "cot and no_cot train the same sequences at every stage"),
        ("cot: true\nprompt_template: '{image}Q: {question} {answer}'\n", [], "prompt_template may name only"),
        ("cot: true\n", ["name=[x"], r"command line: the value of 'name' is not valid YAML \('\[x'\); quote it"),
        ("coconut: true\nthought_feedback: projection\n", [], "thought_feedback must be one of hidden, rescaled"),
        ("coconut: true\n", ["thought_loss_weight=-1"], "thought_loss_weight must be at least 0"),
        ("coconut: true\nstage_overrides: {1: {thought_feedback: none}}\n", [], "cannot change 'thought_feedback'"),
        ("cot: true\ngenerate_demo_data: true\n", [], "key 'generate_demo_data' must be a string, got True"),
        ("cot: true\n", ["generate_demo_data=grpah"], "generate_demo_data must be one of none, grid, graph"),
        ("coconut: true\nlatent_iterations: -1\n", [], "latent_iterations must be at least 0, got -1"),
        ("coconut: true\nlatent_iterations: 2.5\n", [], "key 'latent_iterations' must be an integer"),
        ("cot: true\nlatent_iterations: 3\n", [], "latent_iterations iterates the coconut curriculum's thoughts; set"),
        ("coconut: true\nthought_feedback: none\n", ["latent_iterations=3"], "thought_feedback: none has not; set"),
        ("coconut: true\nstage_overrides: {1: {latent_iterations: 2}}\n", [], "cannot change 'latent_iterations'"),
        ("cot: true\nvisual_latents: 2\n", [], "visual_latents looks at the image again .* set coconut: true"),
        ("coconut: true\nthought_feedback: none\n", ["visual_latents=2"], "thought_feedback other than none"),
        ("coconut: true\n", ["visual_latents=-1"], "visual_latents must be at least 0, got -1"),
        ("coconut: true\nvisual_latents: 2\n", ["latent_iterations=3"], "cannot be combined .*; set one of them to 0"),
    ],
)  # fmt: skip
def test_bad_configs_stop_with_one_line(tmp_path, monkeypatch, text, overrides, message):
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    path = write(tmp_path, "a.yaml", text)
    with pytest.raises(UserError, match=message) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_latent_iterations_load_for_a_coconut_run(tmp_path):
    assert load_config(write(tmp_path, "a.yaml", "coconut: true\n")).latent_iterations == 0
    assert load_config(write(tmp_path, "a.yaml", "coconut: true\nlatent_iterations: 1\n")).latent_iterations == 1
    config = load_config(
        write(tmp_path, "a.yaml", "coconut: true\nthought_feedback: projected\n"), ["latent_iterations=4"]
    )
    assert config.latent_iterations == 4


def test_shipped_configs_load():
    """Every run config in args/ loads (a file with `variants` is a tools/ablate.py spec, not a run config)."""
    specs = {path.name for path in Path("args").glob("*.yaml") if "variants" in yaml.safe_load(path.read_text())}
    assert {"ablation.yaml", "baselines.yaml", "iterations.yaml"} <= specs
    names = sorted(path.name for path in Path("args").glob("*.yaml") if path.name not in specs)
    assert {"demo.yaml", "demo_text.yaml", "gsm_coconut.yaml", "prosqa_coconut_1gpu.yaml"} <= set(names)
    for name in names:
        assert load_config(f"args/{name}").model_id


CURRICULUM = {
    "num_epochs": 7,
    "reset_optimizer": True,
    "stage_overrides": {0: {"epochs_per_stage": 3}, 1: {"epochs_per_stage": 1}, 2: {"epochs_per_stage": 2}},
}


def test_train_stage_keeps_the_curriculum_schedule_and_pins_the_sequences():
    coconut = Schedule.from_config(Config(coconut=True, **CURRICULUM))
    assert coconut.stages == (0, 0, 0, 1, 2, 2, 3)
    for config, trained in [
        (Config(cot=True, train_stage=0, **CURRICULUM), 0),  # CoT on Coconut's schedule
        (Config(no_cot=True, train_stage=0, **CURRICULUM), 0),
        (Config(coconut=True, train_stage=3, **CURRICULUM), 3),  # w/o curriculum
    ]:
        schedule = Schedule.from_config(config)
        assert schedule.stages == coconut.stages
        assert [schedule.resets_optimizer(e) for e in range(7)] == [coconut.resets_optimizer(e) for e in range(7)]
        assert [schedule.lr_steps(e, 10) for e in range(7)] == [coconut.lr_steps(e, 10) for e in range(7)]
        assert [schedule.stage(e) for e in range(7)] == [trained] * 7 and schedule.last_stage == trained
        assert [schedule.ends_stage(e) for e in range(7)] == [False] * 6 + [True]  # one stage_<k>/ export


def test_cot_and_no_cot_without_train_stage_train_one_stage():
    """demo_no_cot.yaml inherits the demo's stage_overrides and reset_optimizer: its 8 epochs stay one stage."""
    schedule = Schedule.from_config(load_config("args/demo_no_cot.yaml"))
    assert schedule.stages == (0,) * 8 and not any(schedule.resets_optimizer(e) for e in range(8))
    assert Schedule.from_config(Config(cot=True, **CURRICULUM)).stages == (0,) * 7
