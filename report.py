"""Human-readable views of a run's metrics.jsonl: one line per epoch, a table per stage, a PNG plot.

    python report.py checkpoints/demo/metrics.jsonl      # prints the stage table and writes metrics.png beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            acc_ax.text(cur["epoch"] - 0.4, 0.02, f"stage {cur['stage']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the stage table and plot a run's metrics.jsonl.")
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    print(stage_table(args.metrics))
    print(f"plot: {plot_metrics(args.metrics, args.metrics.with_name('metrics.png'))}")


if __name__ == "__main__":
    main()
