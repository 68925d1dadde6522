"""Write a demo set (demo_data.py) to a folder, to look at or to train on with `generate_demo_data: none`.

python tools/make_demo_data.py data/grid                  # train/val/test .jsonl and images/, seeded
python tools/make_demo_data.py data/graph --task graph    # the text set: train/val/test .jsonl
python tools/make_demo_data.py data/grid-hard --moves 3 6 # 3 to 6 moves per record, each count equally likely
"""

from __future__ import annotations

import argparse

import demo_data
from config import DEMO_MOVES, DEMO_SETS, check_demo_moves
from utils import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    """`python tools/make_demo_data.py FOLDER [--task grid|graph] [--seed N] [--moves FEWEST MOST]`: write a demo
    set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--task", choices=DEMO_SETS, default="grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moves", type=int, nargs=2, default=DEMO_MOVES, metavar=("FEWEST", "MOST"),
        help="moves per record, drawn uniformly from FEWEST..MOST (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    moves = check_demo_moves(args.moves, "--moves")
    demo_data.generate(args.folder, args.task, args.seed, moves=moves)
    print(f"wrote {', '.join(f'{n} {s}' for s, n in demo_data.SPLITS.items())} records to {args.folder}")


if __name__ == "__main__":
    main()
