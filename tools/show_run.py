"""Print a finished (or running) run's per-stage table and redraw its loss/accuracy plot beside its metrics.

python tools/show_run.py checkpoints/demo/metrics.jsonl      # the table, then writes metrics.png beside it
"""

from __future__ import annotations

import argparse
from pathlib import Path

import report
from utils import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python tools/show_run.py METRICS`: print the stage table and write the plot beside the metrics file."""
    parser = argparse.ArgumentParser(description="Print the stage table and plot a run's metrics.jsonl.")
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args(argv)
    print(report.stage_table(args.metrics))
    print(f"plot: {report.plot_metrics(args.metrics, args.metrics.with_name('metrics.png'))}")


if __name__ == "__main__":
    main()
