"""infer.py on tiny exported models: one question, a records file, thought probing, the comparison and its errors.

Predictions are checked against `evaluate.generate_and_score` on a model loaded without infer.py, and every probed
thought against a naive reference that fills the latents one at a time by rerunning the base model.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_coconut

import demo_data
import infer
import inference
from checkpoint import export_pretrained
from config import Config
from dataset import CoconutDataset
from distributed import DistInfo, Job
from evaluate import Controls, generate_and_score, summarize
from models import encoding_for, load_base
from utils import UserError

SETTINGS = {"max_new_tokens": 8, "max_num_tiles": 1, "eval_batch_size": 4}
COCONUT = Config(coconut=True, c_thought=1, max_latent_stage=2, **SETTINGS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Four exported random tiny models (coconut, projected-feedback coconut and coconut with 2 latent iterations
    at stage 2, cot), a folder without weights and six demo records."""
    root = tmp_path_factory.mktemp("infer")
    demo_data.generate(str(root / "data"), sizes={"test": 6})
    projected = dataclasses.replace(COCONUT, thought_feedback="projected")
    jacobi = dataclasses.replace(COCONUT, latent_iterations=2)
    models = (
        ("coconut", COCONUT, 2),
        ("cot", Config(cot=True, **SETTINGS), 0),
        ("projected", projected, 2),
        ("jacobi", jacobi, 2),
    )
    for name, config, stage in models:
        torch.manual_seed(0)
        base, tokenizer = load_base("tiny")
        run = {"config": dataclasses.asdict(config), "stage": stage}
        model = make_coconut(
            base, tokenizer, thought_feedback=config.thought_feedback, latent_iterations=config.latent_iterations
        )
        export_pretrained(model, tokenizer, root / name, run)
    (root / "no_weights").mkdir()
    (root / "no_weights" / "coconut.json").write_text((root / "coconut" / "coconut.json").read_text())
    return root


def test_single_question_prints_the_answer_and_each_thought(exported, capsys):
    image = exported / "data" / "images" / "test-00000.png"
    infer.main([str(exported / "coconut"), "--image", str(image), "--question", "start 2,1; 3 moves", "--probe", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("answer: ") and "8 tokens" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["thought 1", "thought 2"]  # stage 2 x c_thought 1
    assert all(line.count(" | ") == 2 for line in lines[1:])


def test_records_give_the_predictions_of_generate_and_score(exported, capsys):
    records = exported / "data" / "test.jsonl"
    infer.main([str(exported / "coconut"), "--records", str(records), "--probe", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "accuracy 0.000 | mean generated tokens 8.0" in out  # random weights: never right, never stops
    results = exported / "data" / "test.eval"  # beside the records, as only_eval writes into its run's folder
    rows = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    evaluation = json.loads((results / "eval.json").read_text())
    assert (evaluation["n"], evaluation["stage"], evaluation["records"]) == (6, 2, str(records))
    assert (evaluation["gen_tokens"], evaluation["passes"]) == (8, 2 + 8)  # stage 2's two thoughts, then 8 tokens
    assert len(rows) == 6
    assert {"id", "prediction", "answer", "correct", "gen_tokens", "passes", "latency_s", "thoughts"} <= set(rows[0])
    assert all(len(row["thoughts"]) == 2 and all(len(t) == 2 for t in row["thoughts"]) for row in rows)

    base, tokenizer = load_base(str(exported / "coconut"))
    data = CoconutDataset.from_file(str(records), encoding_for(base, tokenizer, COCONUT))
    prompts = data.prompts()
    prompts.set_stage(2)
    job = Job(DistInfo(0, 0, 1), torch.device("cpu"))
    expected = generate_and_score(make_coconut(base.eval(), tokenizer), prompts, job, batch_size=4)
    keys = ("id", "prediction", "answer", "correct", "gen_tokens", "passes")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in expected]


def test_records_with_meta_get_accuracy_per_data_set_and_category(exported, tmp_path, capsys):
    lines = (exported / "data" / "test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for i, record in enumerate(records):
        record["image"] = str(exported / "data" / record["image"])
        record["meta"] = {"dataset": "scienceqa", "subject": "maths" if i < 4 else "art", "grade": "grade1"}
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    infer.main([str(exported / "cot"), "--records", str(path)])
    out = capsys.readouterr().out
    for label, total in (("all", 6), ("scienceqa", 6), ("  subject = art", 2), ("  subject = maths", 4)):
        assert any(line.startswith(label) and line.split()[-2] == str(total) for line in out.splitlines()), label


def reference_thoughts(base, input_ids: list[int], pixel_values, latent_id: int) -> torch.Tensor:
    """The continuous thoughts of one prompt, filled one latent at a time by running the base model over the whole
    sequence (no cache, no Coconut): the last hidden state of the position before each latent."""
    ids = torch.tensor([input_ids])
    embeds = base.get_input_embeddings()(ids)
    thoughts = []
    for column in torch.nonzero(ids[0] == latent_id).flatten().tolist():
        hidden = base.model(inputs_embeds=embeds, pixel_values=pixel_values).last_hidden_state
        thoughts.append(hidden[0, column - 1])
        embeds[0, column] = thoughts[-1]
    return torch.stack(thoughts)


@pytest.mark.parametrize(
    "stage, c_thought, feedback, control, iterations, thoughts",
    [
        (2, 1, "hidden", "model", 0, 2),
        (3, 2, "hidden", "model", 0, 6),
        (3, 2, "hidden", "noise", 0, 6),  # noise of a hidden state's norm: still computed from it, pass by pass
        (3, 2, "hidden", "pause", 0, 0),
        (3, 2, "none", "model", 0, 0),
        (3, 2, "hidden", "model", 3, 4),  # Jacobi: the iterations + 1 block passes, whatever the number of thoughts
        (3, 2, "hidden", "model", 1, 2),  # one round of feedback: two block passes for six thoughts
        (1, 2, "rescaled", "zeros", 4, 5),
        (3, 2, "hidden", "pause", 3, 0),
        (0, 1, "hidden", "model", 3, 0),  # no thoughts to iterate: the prompt's one pass
    ],
)
def test_passes_are_the_thoughts_fed_back_plus_the_generated_tokens(
    exported, stage, c_thought, feedback, control, iterations, thoughts
):
    # every demo record has 3 steps: stage k with c_thought c puts k * c latents in its prompt
    config = dataclasses.replace(COCONUT, c_thought=c_thought, max_latent_stage=3, thought_feedback=feedback)
    base, tokenizer = load_base(str(exported / "coconut"))
    model = make_coconut(base.eval(), tokenizer, thought_feedback=feedback, latent_iterations=iterations)
    prompts = CoconutDataset.from_file(str(exported / "data" / "test.jsonl"), encoding_for(base, tokenizer, config))
    prompts = prompts.prompts()
    prompts.set_stage(stage)
    assert all(prompts[i]["input_ids"].count(prompts.latent_id) == stage * c_thought for i in range(len(prompts)))
    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:  # one record per batch: the decoder calls are that record's sequential passes
        rows = generate_and_score(
            model, prompts, Job(DistInfo(0, 0, 1), torch.device("cpu")), 1, Controls(thoughts=control)
        )
    finally:
        hook.remove()
    assert [r["passes"] for r in rows] == [thoughts + r["gen_tokens"] for r in rows]
    assert sum(r["passes"] for r in rows) == len(calls)
    assert summarize(rows)["passes"] == thoughts + summarize(rows)["gen_tokens"]


@pytest.mark.parametrize("stage, c_thought", [(2, 1), (1, 2)])
def test_probe_decodes_each_thought_through_the_head(exported, stage, c_thought):
    model = inference.load_exported(str(exported / "coconut"), torch.device("cpu"))
    model.config = dataclasses.replace(model.config, c_thought=c_thought)
    prompts = inference.open_prompts(model, str(exported / "data" / "test.jsonl"), stage)
    probes = inference.probe_thoughts(model, prompts, 5, 4)
    assert len(probes) == 6
    base = model.model.base
    with torch.no_grad():
        for index, thoughts in enumerate(probes):
            assert len(thoughts) == stage * c_thought and all(len(tokens) == 5 for tokens in thoughts)
            reference = reference_thoughts(
                base, prompts[index]["input_ids"], prompts.pixel_values(index), prompts.latent_id
            )
            probs = base.lm_head(reference).softmax(-1)
            assert [tokens[0]["id"] for tokens in thoughts] == probs.argmax(-1).tolist()
            top = torch.tensor([[t["prob"] for t in tokens] for tokens in thoughts])
            torch.testing.assert_close(top, probs.topk(5).values, rtol=1e-4, atol=1e-6)
    blank = inference.probe_thoughts(model, prompts, 5, 4, Controls(blank_images=True))
    assert blank[0][0][0]["prob"] != probes[0][0][0]["prob"]  # the thoughts read the image


def test_compare_writes_the_table_json_and_plot(exported, tmp_path, capsys):
    methods = [f"coconut={exported / 'coconut'}", f"cot={exported / 'cot'}"]
    records = str(exported / "data" / "test.jsonl")
    infer.main(["compare", *methods, "--records", records, "--blank", "coconut", "--out", str(tmp_path)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 3 and "| mean generated tokens | mean passes | mean latency (ms/example) |" in table[0]
    rows = json.loads((tmp_path / "compare.json").read_text())["methods"]
    assert [(r["method"], r["mode"], r["stage"], r["n"]) for r in rows] == [
        ("coconut", "coconut", 2, 6),
        ("coconut (blank images)", "coconut", 2, 6),
        ("cot", "cot", 0, 6),
    ]
    assert all(r["latency_ms"] > 0 and r["gen_tokens"] == 8 for r in rows)
    assert [r["passes"] for r in rows] == [2 + 8, 2 + 8, 8]  # coconut's 2 thoughts (stage 2) + its 8 tokens; cot
    assert [line.split(" | ")[4] for line in table[2:]] == ["10.0", "10.0", "8.0"]
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_help_names_the_compare_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        infer.main(["--help"])
    assert stop.value.code == 0
    assert "python infer.py compare NAME=FOLDER" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["{root}/data", "--question", "q"], "no coconut.json"),
        (["{root}/no_weights", "--question", "q"], "no model weights"),
        (["{root}/coconut", "--question", "q", "--image", "{root}/none.png"], "--image"),
        (["{root}/coconut", "--records", "{root}/none.jsonl"], "records file not found"),
        (["compare", "a={root}/coconut", "--records", "{root}/data/test.jsonl", "--blank", "b"], "--blank b"),
    ],
)
def test_user_errors_stop_with_one_line(exported, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        infer.main([arg.format(root=exported) for arg in args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_compare_runs_the_thought_controls(exported, tmp_path, capsys):
    records = str(exported / "data" / "test.jsonl")
    infer.main(["compare", f"coconut={exported / 'coconut'}", "--records", records, "--controls", "coconut",
                "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "compare.json").read_text())["methods"]
    names = ["coconut", "coconut (thoughts: noise)", "coconut (thoughts: zeros)", "coconut (thoughts: pause)"]
    assert [r["method"] for r in rows] == names


@pytest.mark.parametrize("control", ["noise", "zeros", "pause"])
def test_records_with_a_thought_control_change_what_the_model_is_fed(exported, tmp_path, control):
    model = inference.load_exported(str(exported / "coconut"), torch.device("cpu"))
    prompts = inference.open_prompts(model, str(exported / "data" / "test.jsonl"), 2)
    own = inference.probe_thoughts(model, prompts, 3, 6)
    replaced = inference.probe_thoughts(model, prompts, 3, 6, Controls(thoughts=control))
    assert own != replaced  # what sits at the latent positions is no longer the model's thought
    infer.main([str(exported / "coconut"), "--records", str(exported / "data" / "test.jsonl"), "--thoughts", control,
                "--out", str(tmp_path)])  # fmt: skip
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 6


def test_a_projected_export_loads_its_projection(exported, tmp_path):
    model = inference.load_exported(str(exported / "projected"), torch.device("cpu"))
    torch.manual_seed(0)
    base, tokenizer = load_base("tiny")
    original = make_coconut(base, tokenizer, thought_feedback="projected")
    for (name, value), (_, loaded) in zip(original.projection.state_dict().items(),
                                          model.model.projection.state_dict().items()):  # fmt: skip
        torch.testing.assert_close(loaded, value, rtol=0, atol=0, msg=name)
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in (exported / "projected").iterdir():
        if file.name != "thought_projection.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    with pytest.raises(UserError, match="without thought_projection.safetensors"):
        inference.load_exported(str(broken), torch.device("cpu"))


def test_an_export_records_its_latent_iterations_and_inference_uses_them(exported, tmp_path):
    """The jacobi export holds the coconut export's weights: at 2 iterations, the bound, its 2 thoughts are exact, so
    its answers and probes are coconut's (to float32 rounding), in 2 + 1 + 8 passes. An export without the key
    (written before it existed) iterates none."""
    assert json.loads((exported / "jacobi" / "coconut.json").read_text())["config"]["latent_iterations"] == 2
    assert inference.load_exported(str(exported / "jacobi"), torch.device("cpu")).model.latent_iterations == 2
    records = str(exported / "data" / "test.jsonl")
    older = tmp_path / "older"
    older.mkdir()
    for file in (exported / "jacobi").iterdir():
        (older / file.name).write_bytes(file.read_bytes())
    run = json.loads((older / "coconut.json").read_text())
    del run["config"]["latent_iterations"]
    (older / "coconut.json").write_text(json.dumps(run))
    results = {}
    for name, folder in (("coconut", exported / "coconut"), ("jacobi", exported / "jacobi"), ("older", older)):
        infer.main([str(folder), "--records", records, "--probe", "3", "--out", str(tmp_path / name)])
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        tokens = [(r["prediction"], [[t["id"] for t in thought] for thought in r["thoughts"]]) for r in rows]
        probs = [t["prob"] for r in rows for thought in r["thoughts"] for t in thought]
        results[name] = (tokens, probs, [r["passes"] for r in rows])
    assert results["jacobi"][0] == results["coconut"][0] == results["older"][0]
    assert results["jacobi"][1] == pytest.approx(results["coconut"][1], rel=1e-4)
    assert results["older"][1] == results["coconut"][1]
    assert results["jacobi"][2] == [2 + 1 + 8] * 6 and results["coconut"][2] == results["older"][2] == [2 + 8] * 6
