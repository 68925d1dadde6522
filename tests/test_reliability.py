"""Bad input stops with one clear line; preemption, kill -9, a full disk, NaNs and a dead rank lose nothing."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, metrics, run, weights
from PIL import Image

import checkpoint
import report
import run as run_module
import trainer
import utils
from coconut import Coconut
from config import Config
from curriculum import Schedule
from dataset import CoconutDataset, Encoding
from distributed import DistInfo, Job
from images import Vision, tile_image, to_rgb
from models import load_base
from models.internvl import IMAGE_BLOCK
from records import load_records
from utils import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return load_base("tiny")[1]


GOOD = {"id": "g", "image": "ok.png", "question": "q?", "steps": ["s"], "answer": "a"}


def write_records(folder: Path, records: list, name: str = "data.jsonl") -> str:
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "ok.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def dataset(path: str, tokenizer, **keys) -> CoconutDataset:
    config = Config(**({"cot": True, "max_num_tiles": 4} | keys))
    return CoconutDataset.from_file(path, Encoding(tokenizer, config, Vision(64, 16, *IMAGE_BLOCK)))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data.jsonl: data file not found"),
        ("", "data.jsonl: no records; the file is empty"),
        ('{"question": "q"}\nnot json\n', "data.jsonl: line 2 is not JSON"),
        ('[{"question": "q",]', "data.jsonl: not valid JSON"),
        ('{"id": 7, "steps": ["s"], "answer": "a"}\n', r"record 0 \(id 7\): 'question' must be a non-empty string"),
        ('{"question": "q", "answer": "a"}\n', "record 0: 'steps' must be a list of non-empty strings"),
        ('{"question": "q", "steps": "s", "answer": "a"}\n', "'steps' must be a list"),
        ('{"question": "q", "steps": [], "answer": "a"}\n', "'steps' is empty"),
        ('{"question": "q", "steps": ["s", ""], "answer": "a"}\n', "'steps' must be a list of non-empty strings"),
        ('{"question": "q", "steps": ["s"], "answer": ""}\n', "'answer' must be a non-empty string"),
        ('{"question": "q", "steps": ["s"], "answer": 3}\n', "'answer' must be a non-empty string"),
        ('{"question": "q", "steps": ["s"], "answer": "a", "image": 5}\n', "'image' must be a path"),
        ('{"question": "q", "steps": ["s"], "answer": "a", "imgae": "x"}\n', r"unknown field\(s\) \['imgae'\]"),
        ("[1, 2]", "record 0: must be an object"),
    ],
)
def test_bad_data_files_name_the_file_and_record(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_records(str(path))
    assert "\n" not in str(err.value)


def broken_images(folder: Path) -> dict[str, str]:
    """Files that are not usable images, each with the message it must give."""
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return {
        "missing.png": "missing.png not found; fix the path or set image_root",
        "empty.png": "empty.png cannot be read",
        "text.png": "text.png cannot be read",
        "truncated.png": "truncated.png cannot be read",
    }


def test_bad_images_name_the_record_and_file(tmp_path, tokenizer):
    for name, message in broken_images(tmp_path).items():
        path = write_records(tmp_path, [GOOD, dict(GOOD, id="bad", image=name)])
        with pytest.raises(UserError, match=r"data.jsonl: record 1 \(id 'bad'\): image .*" + message):
            data = dataset(path, tokenizer)
            data[1]  # the header may read fine: decoding happens when the item is served


def test_decompression_bomb_is_refused(tmp_path, tokenizer, monkeypatch):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2x this
    path = write_records(tmp_path, [dict(GOOD, image="big.png")])
    with pytest.raises(UserError, match="big.png has too many pixels to decode safely; downscale it"):
        dataset(path, tokenizer)


def test_a_huge_image_is_reduced_by_whole_factors_before_resampling(monkeypatch):
    image = Image.new("RGB", (8000, 6000), (90, 90, 90))
    factors = []
    real_reduce = Image.Image.reduce
    monkeypatch.setattr(Image.Image, "reduce", lambda self, f, **k: factors.append(f) or real_reduce(self, f, **k))
    tiles = tile_image(image, 448, 12, use_thumbnail=True)
    assert tiles.shape == (13, 448, 448, 3)  # 4 x 3 grid + thumbnail, whatever the input size
    assert (tiles == 90).all()
    # the thumbnail, 13 to 18 times smaller, is first shrunk by the whole factors (5, 4): resampling then reads
    # 20 times fewer pixels than the 48-million-pixel source, so the cost of tiling stays bounded
    assert factors == [(5, 4)]


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 200, 200),
        ("RGBA", (10, 20, 30, 0), 10),
        ("P", 3, None),
        ("I;16", 65535, 255),
        ("I", 1000, 255),
        ("1", 1, 255),
    ],
)
def test_non_rgb_images_become_8_bit_rgb(mode, value, expected):
    image = Image.new(mode, (8, 8), value)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if expected is not None:
        assert np.asarray(rgb)[0, 0, 0] == expected


def test_too_long_records_error_or_skip_counted(tmp_path, tokenizer, capsys):
    long = dict(GOOD, id="long", steps=["x" * 200])
    path = write_records(tmp_path, [GOOD, long, dict(long, id="long2")])
    with pytest.raises(UserError, match=r"record 1 \(id 'long'\): \d+ tokens, more than max_length 100"):
        dataset(path, tokenizer, max_length=100)
    kept = dataset(path, tokenizer, max_length=100, too_long="skip")
    assert [r["id"] for r in kept.records] == ["g"]
    assert "skipped 2 records longer than max_length 100: long, long2" in capsys.readouterr().out
    # messages keep naming a record by its place in the file when earlier ones were skipped
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    path = write_records(tmp_path, [long, dict(GOOD, image="truncated.png")], "skipped.jsonl")
    kept = dataset(path, tokenizer, max_length=100, too_long="skip")
    with pytest.raises(UserError, match=r"skipped.jsonl: record 1 \(id 'g'\): image .*truncated.png cannot be read"):
        kept.pixel_values(0)
    with pytest.raises(UserError, match="every record is longer than max_length 100; raise max_length"):
        dataset(write_records(tmp_path, [long]), tokenizer, max_length=100, too_long="skip")


def test_model_folder_without_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_base(str(tmp_path))


@pytest.mark.parametrize(
    "model_type, message",
    [("no_such_model", "is no model this transformers knows"), ("vit", "'vit', which is no causal language model")],
)
def test_a_folder_of_no_causal_lm_stops_with_one_line(tmp_path, model_type, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UserError, match=message):
        load_base(str(tmp_path))


def test_validate_lists_every_bad_record(tmp_path):
    broken_images(tmp_path)
    records = [GOOD, dict(GOOD, id="b1", answer=""), dict(GOOD, id="b2", image="truncated.png"), GOOD]
    records += [dict(GOOD, id="b3", image="missing.png"), dict(GOOD, id="b4", steps=["y" * 300])]
    path = write_records(tmp_path, records)
    config = tmp_path / "c.yaml"
    config.write_text(f"cot: true\ntrain_path: {path}\nmax_length: 200\nmax_num_tiles: 1\n")
    done = subprocess.run([sys.executable, "tools/validate.py", str(config)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split("(id ")[1].split(")")[0] for line in lines[:-1]] == ["'b1'", "'b2'", "'b3'", "'b4'"]
    assert lines[-1] == f"{path}: 6 records, 4 problems"
    good = write_records(tmp_path, [GOOD], "good.jsonl")
    ok = subprocess.run(
        [sys.executable, "tools/validate.py", str(config), f"train_path={good}"], cwd=ROOT, capture_output=True
    )
    assert ok.returncode == 0


def wait_for(path_glob, folder: Path, proc, timeout=240):
    deadline = time.time() + timeout
    while not list(folder.glob(path_glob)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert list(folder.glob(path_glob)), f"{path_glob} never appeared"


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(tmp_path, data_dir):
    common = ["num_epochs=3", "batch_size_training=2"]
    run(["name=straight", *common], tmp_path, data_dir)
    proc = run(["name=stopped", *common], tmp_path, data_dir, wait=False)
    # epoch 0 ends with its checkpoint, then the stage_0 export (coconut.json last): epoch 1 trains after that,
    # 16 micro-batches, and a signal among them must write a mid-epoch checkpoint
    wait_for("stage_0/coconut.json", tmp_path / "stopped", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    partial = list((tmp_path / "stopped").glob("checkpoint_*_micro*.pt"))
    assert len(partial) == 1, proc.stderr.read()
    run(["name=stopped", "resume=auto", *common], tmp_path, data_dir)
    straight, stopped = weights(tmp_path / "straight" / "final"), weights(tmp_path / "stopped" / "final")
    assert all(torch.equal(straight[k], stopped[k]) for k in straight)
    assert [m["epoch"] for m in metrics(tmp_path / "stopped")] == [0, 1, 2]


def test_kill_9_at_random_moments_then_resume(tmp_path, data_dir):
    run(["name=straight"], tmp_path, data_dir)
    reference = weights(tmp_path / "straight" / "final")
    rng = random.Random(0)
    for trial in range(3):
        name = f"killed{trial}"
        proc = run([f"name={name}", "keep_checkpoints=2"], tmp_path, data_dir, wait=False)
        wait_for("metrics.jsonl", tmp_path / name, proc)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run([f"name={name}", "resume=auto", "keep_checkpoints=2"], tmp_path, data_dir)
        resumed = weights(tmp_path / name / "final")
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), trial


def test_corrupt_newest_checkpoint_is_ignored(tmp_path, data_dir):
    run(["name=c", "num_epochs=2", "keep_checkpoints=2"], tmp_path, data_dir)
    newest = tmp_path / "c" / "checkpoint_1.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn copy
    done = run(["name=c", "num_epochs=3", "resume=auto", "keep_checkpoints=2"], tmp_path, data_dir)
    assert "ignoring" in done.stderr and "checkpoint_1.pt: incomplete or corrupt" in done.stderr
    assert "resumed from" in done.stdout and "checkpoint_0.pt" in done.stdout


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, data_dir):
    run(["name=full", "num_epochs=1"], tmp_path, data_dir)
    folder = tmp_path / "full"
    size = (folder / "checkpoint_0.pt").stat().st_size

    def small_disk():  # writes beyond this size fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    cmd = [sys.executable, "run.py", "args/demo.yaml", f"train_path={data_dir}/train.jsonl"]
    cmd += [f"val_path={data_dir}/val.jsonl", f"save_path={tmp_path}", "name=full", "resume=auto", "num_epochs=2"]
    cmd += ["generate_demo_data=none", "batch_size_training=8", "eval_batch_size=8", "max_new_tokens=8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert done.returncode == 2
    assert "checkpoint_1.pt: could not write the checkpoint (" in done.stderr and "free disk space" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(folder.glob("*.tmp"))
    assert torch.load(folder / "checkpoint_0.pt", weights_only=False)["progress"][0]["epoch"] == 1


def test_a_signal_during_evaluation_stops_after_the_epochs_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    real = trainer.generate_and_score

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends, here while the epoch is being evaluated
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate_and_score", signalled)
    args = ["args/demo.yaml", f"train_path={data_dir}/train.jsonl", f"val_path={data_dir}/val.jsonl"]
    args += [f"save_path={tmp_path}", "generate_demo_data=none", "batch_size_training=8", "eval_batch_size=8"]
    args += ["max_new_tokens=4", "num_epochs=3", "stage_overrides={}", "name=eval"]
    with pytest.raises(SystemExit) as stop:
        run_module.main(args)
    assert stop.value.code == 143
    assert "stopped by signal: wrote" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "eval").glob("checkpoint_*.pt")] == ["checkpoint_0.pt"]
    assert [m["epoch"] for m in metrics(tmp_path / "eval")] == [0]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data_dir, monkeypatch, capsys):
    real = Coconut.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if out.loss is not None and 2 <= len(calls) <= 3:  # two bad micro-batches, then healthy again
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Coconut, "forward", poisoned)
    args = ["args/demo.yaml", f"train_path={data_dir}/train.jsonl", f"val_path={data_dir}/val.jsonl"]
    args += [f"save_path={tmp_path}", "generate_demo_data=none", "batch_size_training=8", "eval_batch_size=8"]
    args += ["max_new_tokens=4", "num_epochs=1", "stage_overrides={}"]
    run_module.main(args + ["name=skip"])
    out = capsys.readouterr().out
    assert "skipped step 1: non-finite gradients (1 in a row)" in out and "(2 in a row)" in out
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "skip" / "final").values())

    calls.clear()
    monkeypatch.setattr(Coconut, "forward", lambda self, *a, **k: _nan(real(self, *a, **k)))
    with pytest.raises(SystemExit) as stop:
        run_module.main(args + ["name=stop", "max_nonfinite_steps=3"])
    assert stop.value.code == 2
    assert "3 optimizer steps in a row had non-finite gradients" in capsys.readouterr().err


def _nan(out):
    if out.loss is not None:
        out.loss = out.loss * float("nan")
    return out


def test_a_dead_rank_ends_the_job(tmp_path, data_dir):
    proc = run(["name=dead", "use_ddp=true", "batch_size_training=1", "num_epochs=20", "dist_timeout_s=20"],
               tmp_path, data_dir, nproc=2, wait=False)  # fmt: skip
    wait_for("checkpoint_0.pt", tmp_path / "dead", proc)
    victim = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_rank(int(pid), proc.pid, "1"))
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # the survivor's collective times out (dist_timeout_s) instead of hanging


def _is_rank(pid: int, launcher: int, rank: str) -> bool:
    """True for a worker process of `launcher` whose RANK is `rank`."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return parent == launcher and f"RANK={rank}".encode() in environ


def test_a_file_that_is_not_a_fitting_checkpoint_stops_with_one_line(tmp_path):
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny")
    model = Coconut(base, tokenizer.convert_tokens_to_ids("<|latent|>"), 0)
    garbage, foreign, wrong_shape, two_ranks = (tmp_path / f"{n}.pt" for n in ("garbage", "foreign", "shape", "ranks"))
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"weights": {}}, foreign)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.zeros(3, 3)
    torch.save({"model": state, "progress": [{}]}, wrong_shape)
    torch.save({"model": model.state_dict(), "optimizer": {}, "progress": [{}, {}], "rng": [{}, {}]}, two_ranks)
    cases = [
        (checkpoint.load_model_weights, garbage, "garbage.pt: not a readable checkpoint"),
        (checkpoint.load_model_weights, foreign, "foreign.pt: not a checkpoint written by run.py"),
        (checkpoint.load_model_weights, wrong_shape, "shape.pt: its weights do not fit this model"),
        (lambda p, m: checkpoint.load_checkpoint(p, m, None), two_ranks, "written by 2 process.*resume with 2"),
    ]
    for load, path, message in cases:
        with pytest.raises(UserError, match=message) as err:
            load(str(path), model)
        assert "\n" not in str(err.value)


def test_a_crash_while_logging_metrics_leaves_the_log_whole(tmp_path, monkeypatch):
    log = report.MetricsLog(tmp_path, Config(cot=True), enabled=True)
    log.log({"epoch": 0, "train_loss": 1.0}, step=0)

    def crash(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(utils.os, "replace", crash)
    with pytest.raises(OSError):
        log.log({"epoch": 1, "train_loss": 0.5}, step=10)
    assert report.read_metrics(log.path) == [{"epoch": 0, "train_loss": 1.0}]


def test_a_mid_epoch_resume_at_another_batch_size_stops_with_one_line():
    progress = checkpoint.Progress(epoch=3, micro=2, samples=16)  # stopped after two micro-batches of 8
    config = Config(cot=True, batch_size_training=4)
    with pytest.raises(
        UserError, match="stopped epoch 3 after 2 micro-batches of 8; resume with batch_size_training=8"
    ):
        job = Job(DistInfo(0, 0, 1), torch.device("cpu"))
        trainer.train_epoch(None, None, list(range(40)), Schedule.from_config(config), progress, job)
