"""Human-readable views of a run's metrics.jsonl (one line per epoch, a table per stage, a PNG plot), of a method
comparison (infer.py compare) and of an ablation over variants and seeds (tools/ablate.py): each stage's validation
accuracy, and each variant's test results.
`python tools/show_run.py <run>/metrics.jsonl` prints a run's stage table and redraws its plot.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from config import Config
from curriculum import Schedule
from utils import UserError, atomic_write_text


class MetricsLog:
    """metrics.jsonl on rank 0, plus wandb or TensorBoard when `report_to` asks for one (imported only then)."""

    def __init__(self, folder: Path, config: Config, enabled: bool) -> None:
        self.path, self.enabled, self.backend = Path(folder) / "metrics.jsonl", enabled, None
        if not enabled or config.report_to == "none":
            return
        try:
            if config.report_to == "wandb":
                import wandb

                self.backend = wandb.init(project="multimodal-coconut", name=config.name, config=vars(config))
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.backend = SummaryWriter(str(Path(folder) / "tensorboard"))
        except ImportError:
            raise UserError(f"config: report_to {config.report_to} needs `pip install {config.report_to}`") from None

    def drop_from(self, epoch: int) -> None:
        """Forget the lines of `epoch` and later (a resumed run redoes them)."""
        if self.enabled and self.path.exists():
            kept = [m for m in read_metrics(self.path) if m["epoch"] < epoch]
            atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))

    def log(self, metrics: dict, step: int) -> None:
        """Append one epoch's metrics, and send them to the configured tracker at optimizer step `step`."""
        if not self.enabled:
            return
        # rewritten whole and renamed, so a crash mid-write cannot leave a torn line that stops the next resume
        before = self.path.read_text() if self.path.exists() else ""
        atomic_write_text(self.path, before + json.dumps(metrics) + "\n")
        self.send(metrics, step)

    def send(self, metrics: dict, step: int) -> None:
        """Send `metrics` to the configured tracker (if any) at optimizer step `step`; epoch lines and the step
        metrics of `log_every` share that x-axis, so one run's curves line up."""
        if not self.enabled or self.backend is None:
            return
        if hasattr(self.backend, "log"):
            self.backend.log(metrics, step=step)
            return
        for key, value in metrics.items():
            self.backend.add_scalar(key, value, step)
        self.backend.flush()  # its own flush runs every two minutes, and not at exit


def read_metrics(path: Path) -> list[dict]:
    """The epoch lines of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_epoch(m: dict) -> str:
    """One epoch's metrics as a single console line."""
    return (
        f"epoch {m['epoch']:3d}  stage {m['stage']}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
        f"val_accuracy {m['val_accuracy']:.3f}  gen_tokens {m['gen_tokens']:.1f}  samples/s {m['samples_per_s']:.1f}"
    )


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain Markdown table (it reads well in a terminal and pastes into the README)."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def stage_table(path: Path) -> str:
    """Per stage, the metrics of its last epoch: accuracy and generated tokens as the stage ended."""
    last = {}
    for m in read_metrics(path):
        last[m["stage"]] = m
    rows = [
        [stage, m["epoch"], f"{m['val_accuracy']:.3f}", f"{m['gen_tokens']:.1f}", f"{m['val_loss']:.4f}"]
        for stage, m in sorted(last.items())
    ]
    return format_table(["stage", "last epoch", "val accuracy", "generated tokens", "val loss"], rows)


def plot_metrics(path: Path, out: Path) -> Path:
    """Loss (train and validation) and accuracy per epoch, with dotted lines at stage changes, as a PNG."""
    plt = _pyplot()
    metrics = read_metrics(path)
    epochs = [m["epoch"] for m in metrics]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], label="train")
    loss_ax.plot(epochs, [m["val_loss"] for m in metrics], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [m["val_accuracy"] for m in metrics], marker="o")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.05), title="validation accuracy")
    for prev, cur in zip(metrics, metrics[1:]):
        if cur["stage"] != prev["stage"]:
            for ax in (loss_ax, acc_ax):
                ax.axvline(cur["epoch"] - 0.5, color="grey", linestyle=":")
            acc_ax.text(cur["epoch"] - 0.45, 0.03, f"stage {cur['stage']}", fontsize=8, rotation=90, color="grey")
    return _save(plt, fig, out)


def method_table(rows: list[dict]) -> str:
    """The comparison of methods (rows of `infer.compare`) as a Markdown table: accuracy, mean generated tokens,
    mean sequential decoder passes (continuous thoughts + generated tokens) and mean latency per example."""
    body = [
        [
            r["method"],
            r["mode"] + (f", stage {r['stage']}" if r["mode"] == "coconut" else ""),
            f"{r['accuracy']:.3f}",
            f"{r['gen_tokens']:.1f}",
            f"{r['passes']:.1f}",
            f"{r['latency_ms']:.1f}",
        ]
        for r in rows
    ]
    header = ["method", "mode", "accuracy", "mean generated tokens", "mean passes", "mean latency (ms/example)"]
    return format_table(header, body)


def plot_methods(rows: list[dict], out: Path) -> Path:
    """Accuracy and mean generated tokens per method (rows of `infer.compare`) as two bar charts in a PNG."""
    plt = _pyplot()
    names = [r["method"] for r in rows]
    fig, (acc_ax, tok_ax) = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((acc_ax, "accuracy", "accuracy", "{:.2f}"), (tok_ax, "gen_tokens", "mean generated tokens", "{:.1f}"))
    for ax, key, title, fmt in panels:
        values = [r[key] for r in rows]
        bars = ax.bar(names, values)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.set(title=title)
        ax.tick_params(axis="x", labelrotation=20)
    acc_ax.set_ylim(0, 1.05)
    return _save(plt, fig, out)


def ablation_results(folder: Path, variants: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per variant, over its finished seeds (`ablate.py` runs in `<folder>/<variant>/seed<k>`): each stage's
    validation accuracy at its last epoch, the last stage's generated tokens, and the minutes each run took."""
    results = {}
    for variant in variants:
        runs = finished_runs(folder, variant, seeds)
        if not runs:
            continue
        stages: dict[int, list[float]] = {}
        tokens, minutes = [], []
        for run in runs:
            last = {m["stage"]: m for m in read_metrics(run / "metrics.jsonl")}
            for stage, m in last.items():
                stages.setdefault(stage, []).append(m["val_accuracy"])
            tokens.append(last[max(last)]["gen_tokens"])
            minutes.append(_status(run)["minutes"])
        results[variant] = {"stages": stages, "gen_tokens": tokens, "minutes": minutes}
    return results


def finished_runs(folder: Path, variant: str, seeds: list[int]) -> list[Path]:
    """The folders of `variant`'s runs under `folder` (`<variant>/seed<k>`, as `ablate.py` writes them) that finished
    training, in the order of `seeds`."""
    runs = [folder / variant / f"seed{seed}" for seed in seeds]
    return [run for run in runs if (run / "ablation.json").exists() and _status(run)["finished"]]


def _status(run: Path) -> dict:
    """A run's ablation.json: finished, minutes, machine, commit."""
    return json.loads((run / "ablation.json").read_text())


def spread(values: list[float], digits: int) -> str:
    """mean ± standard deviation (and min-max when there is more than one value)."""
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = statistics.stdev(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ablation_table(results: dict[str, dict]) -> str:
    """`ablation_results` as a Markdown table: a row per variant, each stage's validation accuracy over the seeds
    (mean ± sd, min-max), the last stage's mean generated tokens and the minutes per run."""
    stages = sorted({s for r in results.values() for s in r["stages"]})
    header = ["variant", "seeds", *[f"stage {s}" for s in stages], "generated tokens", "minutes"]
    rows = [
        [
            name,
            len(r["minutes"]),
            *[spread(r["stages"][s], 3) if s in r["stages"] else "-" for s in stages],
            f"{statistics.mean(r['gen_tokens']):.1f}",
            spread(r["minutes"], 1),
        ]
        for name, r in results.items()
    ]
    return format_table(header, rows)


def plot_ablation(results: dict[str, dict], out: Path) -> Path:
    """Mean validation accuracy per stage for each variant, each seed's value as a dot, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        stages = sorted(r["stages"])
        line = ax.plot(stages, [statistics.mean(r["stages"][s]) for s in stages], marker="o", label=name)[0]
        for s in stages:
            ax.scatter([s] * len(r["stages"][s]), r["stages"][s], color=line.get_color(), s=12, alpha=0.5)
    ax.set(xlabel="curriculum stage", ylabel="validation accuracy", ylim=(0, 1.05), title="ablation")
    ax.set_xticks(sorted({s for r in results.values() for s in r["stages"]}))
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def test_folder(run: Path, thoughts: str = "model") -> Path:
    """Where `ablate.py` writes a run's test evaluation: `<run>/test/` with the model's own thoughts, and
    `<run>/test-<control>/` with them replaced by a control (`infer.py --thoughts <control>`)."""
    return run / ("test" if thoughts == "model" else f"test-{thoughts}")


def test_results(
    folder: Path, variants: list[str], seeds: list[int], controls: dict[str, list[str]] | None = None
) -> dict[str, dict]:
    """Per variant, over its seeds whose run finished and was evaluated on the test set (`ablate.py` writes
    `<folder>/<variant>/seed<k>/test/eval.json`): test accuracy, sequential decoder passes (thoughts and generated
    tokens) and generated tokens per answer, the last epoch's validation accuracy, the minutes of training, the
    machine and commit each run trained on, and under "controls" the test accuracy of each control of `controls`
    (control -> the variants it is run on) that lists the variant, over the runs evaluated with it."""
    results = {}
    for variant in variants:
        runs = [run for run in finished_runs(folder, variant, seeds) if (test_folder(run) / "eval.json").exists()]
        if not runs:
            continue
        tests = [json.loads((test_folder(run) / "eval.json").read_text()) for run in runs]
        statuses = [_status(run) for run in runs]
        applied = [control for control, listed in (controls or {}).items() if variant in listed]
        results[variant] = {
            "controls": {
                control: [
                    json.loads((test_folder(run, control) / "eval.json").read_text())["accuracy"]
                    for run in runs
                    if (test_folder(run, control) / "eval.json").exists()
                ]
                for control in applied
            },
            "test_accuracy": [t["accuracy"] for t in tests],
            "passes": [t["passes"] for t in tests],
            "gen_tokens": [t["gen_tokens"] for t in tests],
            "val_accuracy": [read_metrics(run / "metrics.jsonl")[-1]["val_accuracy"] for run in runs],
            "minutes": [s["minutes"] for s in statuses],
            "machines": [s["machine"] for s in statuses],
            "commits": [s["commit"] for s in statuses],
        }
    return results


def results_table(results: dict[str, dict], steps: dict[str, int]) -> str:
    """`test_results` as a Markdown table: a row per variant, each value's mean ± sd (min-max) over the seeds, and
    the optimizer steps of a run of the variant (`steps`); after the test accuracy, a column per control that any
    variant was tested with ("-" for a variant without it)."""
    controls = list(dict.fromkeys(control for r in results.values() for control in r["controls"]))
    header = [
        "variant",
        "seeds",
        "test accuracy",
        *(f"test accuracy, {control}" for control in controls),
        "val accuracy",
        "passes",
        "generated tokens",
        "optimizer steps",
        "minutes",
    ]
    rows = [
        [
            name,
            len(r["minutes"]),
            spread(r["test_accuracy"], 3),
            *(spread(r["controls"][c], 3) if r["controls"].get(c) else "-" for c in controls),
            spread(r["val_accuracy"], 3),
            spread(r["passes"], 1),
            spread(r["gen_tokens"], 1),
            steps[name],
            spread(r["minutes"], 1),
        ]
        for name, r in results.items()
    ]
    return format_table(header, rows)


def plot_results(results: dict[str, dict], out: Path) -> Path:
    """Test accuracy per variant: the mean as a bar, each seed's as a dot, as a PNG."""
    plt = _pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
    means = [statistics.mean(results[n]["test_accuracy"]) for n in names]
    bars = ax.bar(names, means, color="lightsteelblue")
    ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=8)
    for x, name in enumerate(names):
        values = results[name]["test_accuracy"]
        ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    ax.set(ylabel="test accuracy", ylim=(0, 1.05), title="test accuracy (bar: mean over seeds; dots: seeds)")
    ax.tick_params(axis="x", labelrotation=20)
    return _save(plt, fig, out)


def schedule_text(schedule: Schedule) -> str:
    """A run's schedule in one line: epochs per stage, the learning rate and its shape per stage (one value when
    every stage has the same), batch, optimizer restarts and the stage whose sequences it trains."""
    stages = sorted(set(schedule.stages))
    configs = [schedule.configs[s] for s in stages]

    def per_stage(values: list) -> str:
        return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))

    trains = "each epoch at its own stage" if schedule.train_stage < 0 else f"stage {schedule.train_stage} throughout"
    return (
        f"epochs {'/'.join(str(schedule.stages.count(s)) for s in stages)} (stages {per_stage(stages)}), "
        f"lr {per_stage([f'{c.lr:g}' for c in configs])} {per_stage([c.lr_schedule for c in configs])} "
        f"after {per_stage([c.warmup_steps for c in configs])} warm-up steps, "
        f"batch {per_stage([c.batch_size_training * c.gradient_accumulation_steps for c in configs])}, "
        f"{'a new optimizer per stage' if schedule.reset_optimizer else 'one optimizer'}; trains {trains}"
    )


def _pyplot():
    """matplotlib's pyplot on the Agg backend, which draws to files without a screen (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    """Write `fig` to `out` as a PNG, free it, and return `out`."""
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
