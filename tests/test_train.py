"""run.py end to end on the tiny model: the curriculum, metrics, export, resume, and DDP/FSDP2 under torchrun."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import make_coconut, metrics, read_jsonl, run, weights
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, InternVLForConditionalGeneration

import checkpoint
import infer
import report
import trainer
from checkpoint import export_pretrained
from coconut import LATENT_TOKENS
from config import Config, load_config
from curriculum import Schedule
from dataset import CoconutDataset, collate
from distributed import DistInfo, Job
from evaluate import shard
from models import encoding_for, load_base, sharded_layers
from patches import VISUAL_TOKEN
from utils import UserError


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors of two state dicts."""
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    return (diff / sum(float((a[k].double() ** 2).sum()) for k in a)) ** 0.5


def test_curriculum_metrics_and_export(tmp_path, data_dir):
    run(["name=e2e"], tmp_path, data_dir)
    out = tmp_path / "e2e"
    lines = metrics(out)
    assert [m["stage"] for m in lines] == [0, 1, 2] and [m["epoch"] for m in lines] == [0, 1, 2]
    for m in lines:
        assert {"train_loss", "val_loss", "val_accuracy", "gen_tokens", "samples_per_s"} <= set(m)
        assert 0 <= m["val_accuracy"] <= 1 and 0 < m["gen_tokens"] <= 8 and m["train_loss"] > 0
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (out / "metrics.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("stage_*")) == ["stage_0", "stage_1", "stage_2"]
    assert [p.name for p in out.glob("checkpoint_*.pt")] == ["checkpoint_2.pt"]  # keep_checkpoints: 1

    model = InternVLForConditionalGeneration.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    assert ids == [len(tokenizer) - 3, len(tokenizer) - 2, len(tokenizer) - 1]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    state = torch.load(out / "checkpoint_2.pt", weights_only=False)["model"]
    exported = model.state_dict()
    for name, value in state.items():
        torch.testing.assert_close(exported[name.removeprefix("base.")], value, rtol=0, atol=0)


def test_a_text_model_trains_resumes_exports_and_answers(tmp_path, data_dir, text_data_dir, capsys):
    """run.py on tiny-gpt2 with text-only records: the curriculum, a resumed last epoch that ends on the same
    weights, an export that `AutoModelForCausalLM` loads, and infer.py's question without an image."""
    settings = ["model_id=tiny-gpt2", "keep_checkpoints=2", "c_thought=1"]
    run(["name=text", *settings], tmp_path, text_data_dir)
    out = tmp_path / "text"
    assert [m["stage"] for m in metrics(out)] == [0, 1, 2]
    assert metrics(out)[-1]["train_loss"] < metrics(out)[0]["train_loss"]
    # the last epoch again, from the checkpoint before it
    shutil.copytree(out, tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint_2.pt", "final"))
    resumed = run(["name=resumed", "resume=auto", *settings], tmp_path, text_data_dir)
    assert "resumed from" in resumed.stdout and "checkpoint_1.pt" in resumed.stdout
    straight = weights(out / "final")
    assert all(torch.equal(straight[k], v) for k, v in weights(tmp_path / "resumed" / "final").items())

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert isinstance(model, GPT2LMHeadModel) and model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    state = torch.load(out / "checkpoint_2.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"base.{name}"], rtol=0, atol=0)

    infer.main([str(out / "final"), "--question", "start 2,1; 3 moves", "--probe", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("answer: ")
    assert [line.split(":")[0] for line in lines[1:]] == ["thought 1", "thought 2"]  # stage 2 x c_thought 1
    image = next(data_dir.rglob("*.png"))
    with pytest.raises(SystemExit):
        infer.main([str(out / "final"), "--question", "q", "--image", str(image)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --question: record 0") and "model tiny-gpt2 has no vision" in error


@pytest.mark.parametrize("model_id", ["tiny-gpt2", "tiny-qwen2"])
def test_a_text_export_loads_as_the_same_causal_lm(tmp_path, model_id):
    """The exported folder (Qwen2's RMSNorms fused in memory, not in the file) loads with AutoModelForCausalLM and
    through load_base, each giving the trained model's logits."""
    torch.manual_seed(0)
    base, tokenizer = load_base(model_id)
    export_pretrained(make_coconut(base, tokenizer), tokenizer, tmp_path, {"config": {}, "stage": 0})
    ids = torch.tensor([tokenizer.encode("3 + 4 = 7")])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        reloaded, again = load_base(str(tmp_path))
        assert type(plain) is type(base) and type(reloaded) is type(base) and len(again) == len(tokenizer)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_step_supervision_and_a_projection_train_export_and_load(tmp_path, data_dir):
    extra = ["thought_feedback=projected", "thought_loss_weight=1", "stage_overrides={1: {uniform_prob: 0.5}}"]
    run(["name=sup", *extra], tmp_path, data_dir)
    lines = metrics(tmp_path / "sup")
    assert lines[0]["thought_loss"] == 0 and all(m["thought_loss"] > 0 for m in lines[1:])  # stage 0: no thoughts
    assert (tmp_path / "sup" / "final" / "thought_projection.safetensors").is_file()
    # stage 1 from the stage-0 export: the projection starts new, then is saved and loaded with the model
    run(["name=from_cot", *extra, f"load_model_path={tmp_path}/sup/stage_0", "num_epochs=1",
         "stage_overrides={0: {epochs_per_stage: 0}, 1: {epochs_per_stage: 1}}"], tmp_path, data_dir)  # fmt: skip
    run(["name=eval", "only_eval=true", f"load_model_path={tmp_path}/from_cot/final", "thought_feedback=projected"],
        tmp_path, data_dir)  # fmt: skip
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == 8
    # a projected model's export refuses to start a run that feeds thoughts back otherwise
    run(["name=mismatch", f"load_model_path={tmp_path}/sup/final"], tmp_path, data_dir, status=2)


def test_only_eval_scores_an_exported_model(tmp_path, data_dir):
    run(["name=e2e", "num_epochs=2"], tmp_path, data_dir)
    run(["name=eval", "only_eval=true", f"load_model_path={tmp_path}/e2e/final", "eval_stage=1"], tmp_path, data_dir)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert result["stage"] == 1 and result["n"] == len(predictions) == 8
    assert result["records"] == f"{data_dir}/val.jsonl"  # the key infer.py's eval.json has too
    assert result["accuracy"] == sum(json.loads(p)["correct"] for p in predictions) / 8
    assert result["groups"]["overall"] == {
        "correct": round(8 * result["accuracy"]),
        "total": 8,
        "accuracy": result["accuracy"],
    }


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (5, 3), (1, 4)])
def test_evaluation_shards_count_each_example_once(n, world):
    shards = [shard(n, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank makes the same number of calls
    counted = sorted(i for s in shards for i, c in s if c)
    assert counted == list(range(n))


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path, data_dir):
    run(["name=straight"], tmp_path, data_dir)
    proc = run(["name=killed"], tmp_path, data_dir, wait=False)
    first = tmp_path / "killed" / "checkpoint_0.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = run(["name=killed", "resume=auto"], tmp_path, data_dir)
    assert "resumed from" in resumed.stdout

    straight, killed = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert all(torch.equal(straight[k], killed[k]) for k in straight)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "samples_per_s"} for m in ms]  # noqa: E731
    assert strip(metrics(tmp_path / "killed")) == strip(metrics(tmp_path / "straight"))


def test_loader_workers_train_the_same_weights(tmp_path, data_dir):
    run(["name=main", "num_epochs=2"], tmp_path, data_dir)
    run(["name=workers", "num_epochs=2", "num_workers=2"], tmp_path, data_dir)
    main, workers = weights(tmp_path / "main" / "final"), weights(tmp_path / "workers" / "final")
    assert all(torch.equal(main[k], workers[k]) for k in main)


@pytest.mark.parametrize(
    "mode",
    [
        "use_ddp=true",
        "use_fsdp=true",
        "use_fsdp=true thought_feedback=projected thought_loss_weight=1",
        # DDP wraps any model alike, here a text model whose projection no thought uses at the CoT stage (DDP
        # still needs its gradient); FSDP2 shards GPT-2's transformer.h, the layout unlike InternVL's
        "use_ddp=true model_id=tiny-qwen2 thought_feedback=projected",
        "use_fsdp=true model_id=tiny-gpt2",
        # every rank makes 2 + latent_iterations decoder calls per forward, and backward runs through them all
        "use_fsdp=true latent_iterations=3",
    ],
)
def test_two_process_run_matches_single_process(tmp_path, data_dir, text_data_dir, mode):
    """DDP and FSDP2 against one process; the third case shards a thought projection and runs step supervision, the
    last two wrap text models (on the records without images)."""
    common = ["num_epochs=2", "lr=3e-3", *mode.split()[1:]]
    mode = mode.split()[0]
    data = text_data_dir if any(arg.startswith("model_id=") for arg in common) else data_dir
    run(["name=single", *common], tmp_path, data)
    run(["name=multi", mode, "batch_size_training=4", *common], tmp_path, data, nproc=2)
    assert_same_training(tmp_path / "single", tmp_path / "multi")


def assert_same_training(single: Path, multi: Path) -> None:
    """Two runs of one setting, in one process and in several, trained alike: every epoch's losses within 2%, and
    final weights closer together than the last epoch moved the one-process model."""
    assert len(metrics(multi)) == len(metrics(single))
    for a, b in zip(metrics(single), metrics(multi)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=2e-2)
    # per-rank mean losses vs one global mean differ slightly, and Adam amplifies tiny gradients: compare the
    # whole model's relative distance with how far the last epoch moved it
    final, before_last = weights(single / "final"), weights(sorted(single.glob("stage_*"))[-2])
    assert relative_distance(final, weights(multi / "final")) < 0.25 * relative_distance(final, before_last)


# visual latents (two patch positions after each of the stage's 2 x c_thought thoughts) with a projected feedback,
# whose projection no thought uses at stage 0, where DDP still needs its gradient
VISUAL = ["visual_latents=2", "thought_feedback=projected", "lr=3e-3", "keep_checkpoints=2"]


@pytest.fixture(scope="module")
def visual_run(data_dir, tmp_path_factory) -> Path:
    """The folder that holds run.py's `single` run: the tiny InternVL with `VISUAL`, stages 0..2 in one process."""
    root = tmp_path_factory.mktemp("visual")
    run(["name=single", *VISUAL], root, data_dir)
    return root


def test_visual_latents_train_export_and_answer(visual_run, data_dir):
    """The run's export records visual_latents and loads as InternVL with the patch token; infer.py answers with it
    on the patches its thoughts choose and on random ones, in a pass per thought, one for the last thought's
    patches and one per generated token."""
    out = visual_run / "single"
    assert [m["stage"] for m in metrics(out)] == [0, 1, 2]
    assert metrics(out)[-1]["train_loss"] < metrics(out)[0]["train_loss"]
    saved = json.loads((out / "final" / "coconut.json").read_text())
    assert saved["stage"] == 2 and saved["config"]["visual_latents"] == 2
    model = InternVLForConditionalGeneration.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.convert_tokens_to_ids(VISUAL_TOKEN) == len(tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)

    records, chosen = data_dir / "val.jsonl", {}
    for control in ("model", "random_patches"):
        answers = visual_run / control
        infer.main([str(out / "final"), "--records", str(records), "--thoughts", control, "--probe", "1",
                    "--out", str(answers)])  # fmt: skip
        rows = read_jsonl(answers / "predictions.jsonl")
        assert len(rows) == 8 and json.loads((answers / "eval.json").read_text())["n"] == 8
        for row in rows:
            assert len(row["thoughts"]) == 4  # stage 2 x c_thought 2
            assert row["passes"] == len(row["thoughts"]) + 1 + row["gen_tokens"]
            assert all(len(patches) == 2 for patches in row["patches"])
        chosen[control] = [row["patches"] for row in rows]
    assert chosen["random_patches"] != chosen["model"]


def test_a_visual_latent_run_resumes_to_the_same_weights(visual_run, data_dir):
    """The last epoch again from the checkpoint before it ends on the uninterrupted run's weights and metrics."""
    shutil.copytree(
        visual_run / "single", visual_run / "resumed", ignore=shutil.ignore_patterns("checkpoint_2.pt", "final")
    )
    resumed = run(["name=resumed", "resume=auto", *VISUAL], visual_run, data_dir)
    assert "resumed from" in resumed.stdout and "checkpoint_1.pt" in resumed.stdout
    for name in ("model.safetensors", "thought_projection.safetensors"):
        straight, again = (load_file(visual_run / run_name / "final" / name) for run_name in ("single", "resumed"))
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight), name
    strip = lambda ms: [{k: v for k, v in m.items() if k != "samples_per_s"} for m in ms]  # noqa: E731
    assert strip(metrics(visual_run / "resumed")) == strip(metrics(visual_run / "single"))


@pytest.mark.parametrize("mode", ["use_fsdp=true", "use_ddp=true"])
def test_visual_latents_two_processes_match_one(visual_run, data_dir, mode):
    """FSDP2 (the last attention layer's query read while its weights are gathered) and DDP on 2 ranks train as the
    one process does."""
    name = mode.split("_")[1].split("=")[0]
    run([f"name={name}", mode, "batch_size_training=4", *VISUAL], visual_run, data_dir, nproc=2)
    assert_same_training(visual_run / "single", visual_run / name)


def test_each_family_names_the_layers_fsdp_shards():
    internvl, gpt2, qwen2 = (load_base(model_id)[0] for model_id in ("tiny", "tiny-gpt2", "tiny-qwen2"))
    vision_and_text = [*internvl.model.vision_tower.encoder.layer, *internvl.model.language_model.layers]
    assert sharded_layers(internvl) == vision_and_text
    assert sharded_layers(gpt2) == list(gpt2.transformer.h) and len(gpt2.transformer.h) == 4
    assert sharded_layers(qwen2) == list(qwen2.model.layers) and len(qwen2.model.layers) == 4


def test_a_short_last_accumulation_group_averages_its_own_micro_batches(data_dir):
    # 32 records in micro-batches of 8, accumulating 3: optimizer steps over micro-batches [0, 1, 2] and [3]
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny")
    config = Config(cot=True, batch_size_training=8, gradient_accumulation_steps=3, lr=0.5, weight_decay=0.0)
    config.max_grad_norm = 1e9
    data = CoconutDataset.from_file(str(data_dir / "train.jsonl"), encoding_for(base, tokenizer, config))
    model = make_coconut(base, tokenizer)
    reference = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    job = Job(DistInfo(0, 0, 1), torch.device("cpu"))
    assert trainer.train_epoch(model, optimizer, data, Schedule.from_config(config), checkpoint.Progress(), job)

    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=config.seed)
    sampler.set_epoch(0)
    order = list(sampler)
    params = list(reference.parameters())
    for group in ([0, 1, 2], [3]):
        total = [torch.zeros_like(p) for p in params]
        for micro in group:
            batch = collate([data[i] for i in order[8 * micro : 8 * micro + 8]], data.pad_id, data.latent_id)
            grads = torch.autograd.grad(reference(**batch).loss, params, allow_unused=True)
            total = [t + (g if g is not None else 0) / len(group) for t, g in zip(total, grads)]
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= config.lr * g
    for trained, expected in zip(model.parameters(), params):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)


class Tracker:
    """Records what a MetricsLog sends, as TensorBoard's SummaryWriter receives it (add_scalar, flush)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.scalars.append((key, value, step))

    def flush(self) -> None:
        pass


def test_log_every_sends_each_window_of_steps_to_the_tracker(tmp_path, data_dir):
    # 32 records in micro-batches of 4, accumulating 2: 4 optimizer steps, sent after steps 2 and 4
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny")
    config = Config(cot=True, batch_size_training=4, gradient_accumulation_steps=2, report_to="tensorboard")
    config.log_every = 2
    data = CoconutDataset.from_file(str(data_dir / "train.jsonl"), encoding_for(base, tokenizer, config))
    logger = report.MetricsLog(tmp_path, Config(), enabled=True)  # no tracker of its own: the recorder stands in
    logger.backend = Tracker()
    progress = checkpoint.Progress()
    job = Job(DistInfo(0, 0, 1), torch.device("cpu"))
    model = make_coconut(base, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    assert trainer.train_epoch(model, optimizer, data, Schedule.from_config(config), progress, job, None, logger)
    sent = {(key, step): value for key, value, step in logger.backend.scalars}
    assert sorted(sent) == sorted((k, s) for k in ("train/loss", "train/lr", "train/grad_norm") for s in (2, 4))
    for step, micro in ((2, slice(0, 4)), (4, slice(4, 8))):  # each window's mean of its own micro-batch losses
        assert sent["train/loss", step] == pytest.approx(sum(progress.losses[micro]) / 4)
    assert progress.total_steps == 4 and progress.window == []  # all sent: the next window starts empty
    assert not (tmp_path / "metrics.jsonl").exists()  # epoch lines stay per epoch


def test_log_every_without_a_tracker_stops_with_one_line():
    with pytest.raises(UserError, match="log_every sends step metrics"):
        load_config("args/demo.yaml", ["log_every=10"])


def test_the_schedule_spans_each_epochs_own_steps():
    # 8 records per rank in micro-batches of 2: 4 optimizer steps an epoch, 2 once stage 2 accumulates 2
    config = Config(
        coconut=True, num_epochs=4, batch_size_training=2, stage_overrides={2: {"gradient_accumulation_steps": 2}}
    )
    assert [Schedule.from_config(config).lr_steps(e, 8) for e in range(4)] == [12] * 4
    config.reset_optimizer = True
    assert [Schedule.from_config(config).lr_steps(e, 8) for e in range(4)] == [4, 4, 2, 2]


def test_one_process_runs_a_torchrun_config_and_a_rerun_asks_for_resume(tmp_path, data_dir):
    done = run(["name=one", "use_fsdp=true", "num_epochs=1"], tmp_path, data_dir)
    assert "use_fsdp has no effect" in done.stdout
    again = run(["name=one", "num_epochs=1"], tmp_path, data_dir, status=2)
    assert "already holds a run" in again.stderr and "resume=auto" in again.stderr and "Traceback" not in again.stderr


def test_several_processes_need_ddp_or_fsdp(tmp_path, data_dir):
    done = run(["name=bare", "num_epochs=1"], tmp_path, data_dir, nproc=2, status=1)
    assert "2 processes but neither use_ddp nor use_fsdp is true" in done.stderr


def test_a_broken_image_found_by_a_loader_worker_stops_with_one_line(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    image = data / first["image"]
    image.write_bytes(image.read_bytes()[:100])  # the header survives: the pixels fail in the worker
    done = run(["name=broken", "num_workers=1"], tmp_path, data, status=2)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {data}/train.jsonl: record 0")
