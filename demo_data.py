"""The demo sets: synthetic multi-step reasoning that a tiny model learns on a CPU, and that needs its steps.

Both come in the same split sizes and take a number of moves (steps) per record from a range (fewest, most):
each record draws its count uniformly from it, so that a curriculum stage replaces a different share of each chain.
The default (3, 3) gives every record three steps, one curriculum stage each (args/demo.yaml, args/demo_text.yaml);
args/demo_hard.yaml trains on 3 to 6.

**grid** (images, args/demo.yaml). Each 64-px image is a 4 x 4 grid of coloured cells, one 16-px cell per vision
token of the tiny model. Every colour is an arrow: pink moves right, blue down, lime left, gold up (wrapping around
the edges). Cells are named by one letter, row by row (a b c d / e f g h / i j k l / m n o p). The question gives a
start cell in one of six phrasings ("from i", "start at i", ...); the answer is the cell reached after the record's
moves (one of 16). Each step restates the cell it starts from, then the colour read there and the cell it leads to
("i lime l"), so one step is one look at the image, while a direct answer has to chain three looks inside the
network. Written so, the steps are the text set's: after a continuous thought the next written step starts by
copying its cell out of the thought and reads the image from that written letter, as in CoT, and the answer is the
last cell, not one more read; the varied phrasings keep the model from learning reads bound to where the question
sits (docs/experiments.md has the measurements behind both).

**graph** (text only, args/demo_text.yaml): pointer chasing in a random graph of 16 nodes a..p where every node
has one outgoing edge (to another node), the text counterpart of the grid. The question is the graph as a table, the
k-th letter naming where node k's edge leads ("ehbadcgfkjilnmpo": a>e, b>h, c>b, ...), then a start node: "... from
c". Each step is one edge followed ("c>b", "b>h", "h>f"), one look-up in the table; the answer is the node reached
after three edges ("f", one of 16), which a direct answer has to chain three look-ups inside the network for. A
record is about 40 characters, one token each under the byte-level tokenizer. The table is read by position: a
ProsQA-like set whose edges are listed in random order needs look-ups by content, which neither tiny-gpt2 nor
tiny-qwen2 learns in 10 CoT epochs (docs/experiments.md).
`run.py` writes a config's set on first run (`generate_demo_data`); `python tools/make_demo_data.py` writes one
anywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from config import DEMO_MOVES, Config
from utils import UserError

# four-letter names: every step then has its tokens at the same offsets, which a tiny model learns faster
COLOURS = {"pink": (240, 110, 180), "blue": (40, 80, 220), "lime": (80, 200, 60), "gold": (230, 180, 30)}
MOVES = {"pink": (0, 1), "blue": (1, 0), "lime": (0, -1), "gold": (-1, 0)}
TEMPLATES = ("from {}", "go from {}", "start at {}", "starting from {}", "begin at {}", "at {}")
GRID, CELL = 4, 16
SPLITS = {"train": 8000, "val": 256, "test": 512}
NODES = "abcdefghijklmnop"  # the graph set's nodes in the order of its table; the grid's cells row by row
MANIFEST = "demo_data.json"  # which set, seed and moves a folder holds, for `check`


def cell_name(row: int, column: int) -> str:
    """A cell's one-letter name: one token per cell under the byte-level tokenizer, which the tiny model learns to
    read far faster than a three-token "r,c" whose meaning it has to compose (docs/experiments.md)."""
    return NODES[row * GRID + column]


def make_example(rng: random.Random, hops: int) -> tuple[list[list[str]], dict]:
    """One random grid and its record of `hops` moves (without id and image path)."""
    grid = [[rng.choice(list(COLOURS)) for _ in range(GRID)] for _ in range(GRID)]
    r, c = rng.randrange(GRID), rng.randrange(GRID)
    question = rng.choice(TEMPLATES).format(cell_name(r, c))
    steps = []
    for _ in range(hops):
        colour, start = grid[r][c], cell_name(r, c)
        dr, dc = MOVES[colour]
        r, c = (r + dr) % GRID, (c + dc) % GRID
        steps.append(f"{start} {colour} {cell_name(r, c)}")
    return grid, {"question": question, "steps": steps, "answer": cell_name(r, c)}


def step_cells(record: dict) -> list[tuple[int, int]]:
    """Per step of a grid record ("i lime l"), the index (row by row) of the cell it reads and of the cell it leads
    to; a record that is not the grid set's stops with one line."""
    cells = []
    for step in record["steps"]:
        parts = step.split()
        if len(parts) != 3 or parts[1] not in COLOURS or not {parts[0], parts[2]} <= set(NODES):
            raise UserError(f"record {record.get('id')}: step {step!r} is not a grid step like 'i lime l'")
        cells.append((NODES.index(parts[0]), NODES.index(parts[2])))
    return cells


def cell_at(x: float, y: float, width: int, height: int) -> int:
    """The index (row by row) of the grid cell at pixel (x, y) of a width x height grid image."""
    return min(int(y * GRID / height), GRID - 1) * GRID + min(int(x * GRID / width), GRID - 1)


def make_graph_example(rng: random.Random, hops: int) -> dict:
    """One random graph question and its record of `hops` edges followed (without id and image)."""
    table = [rng.choice([m for m in NODES if m != n]) for n in NODES]  # table[k]: where node k's edge leads
    node = rng.choice(NODES)
    question, steps = f"{''.join(table)} from {node}", []
    for _ in range(hops):
        nxt = table[NODES.index(node)]
        steps.append(f"{node}>{nxt}")
        node = nxt
    return {"question": question, "steps": steps, "answer": node}


def make_record(task: str, rng: random.Random, moves: tuple[int, int]) -> tuple[list[list[str]] | None, dict]:
    """One record of set `task` (without id and image path) and, for the grid, its grid. Its number of moves is
    drawn uniformly from `moves` (fewest, most); a range of one count draws nothing from `rng`, so the (3, 3) sets
    are the three-move sets the demo's results in docs/experiments.md were measured on."""
    fewest, most = moves
    hops = fewest if fewest == most else rng.randint(fewest, most)
    return make_example(rng, hops) if task == "grid" else (None, make_graph_example(rng, hops))


def draw(grid: list[list[str]]) -> Image.Image:
    """The grid as a 64 x 64 RGB image."""
    image = Image.new("RGB", (GRID * CELL, GRID * CELL))
    pen = ImageDraw.Draw(image)
    for r, row in enumerate(grid):
        for c, colour in enumerate(row):
            pen.rectangle([c * CELL, r * CELL, (c + 1) * CELL - 1, (r + 1) * CELL - 1], fill=COLOURS[colour])
    return image


def generate(
    folder: str,
    task: str = "grid",
    seed: int = 0,
    sizes: dict[str, int] = SPLITS,
    moves: tuple[int, int] = DEMO_MOVES,
) -> None:
    """Write demo set `task` (DEMO_SETS), each record of (fewest, most) `moves`, as
    `<folder>/{train,val,test}.jsonl`, the grid's images under `<folder>/images/`; the same seed and moves always
    give the same files."""
    root = Path(folder)
    (root / "images" if task == "grid" else root).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in sizes.items():
        lines = []
        for k in range(count):
            grid, record = make_record(task, rng, moves)
            image = f"images/{split}-{k:05d}.png" if grid else None
            if grid:
                draw(grid).save(root / image)
            lines.append(json.dumps({"id": f"{split}-{k:05d}", "image": image, **record}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / MANIFEST).write_text(json.dumps({"task": task, "seed": seed, "moves": list(moves)}) + "\n")


def write_missing(config: Config) -> None:
    """Write `config`'s demo set (generate_demo_data, demo_moves) into train_path's folder when that folder lacks
    the training or the validation file; its seed is always 0, so every seed of a run trains on one set."""
    if config.generate_demo_data == "none" or all(Path(p).exists() for p in (config.train_path, config.val_path)):
        return
    generate(str(Path(config.train_path).parent), config.generate_demo_data, moves=tuple(config.demo_moves))


def check(folder: str, task: str, moves: tuple[int, int] = DEMO_MOVES) -> None:
    """Raise UserError unless `folder` holds demo set `task` of (fewest, most) `moves` as this generator writes it:
    its manifest names the task and the moves, and the first training record is the one the manifest's seed gives
    now (a set written by an earlier format of the generator fails here instead of training a run on the wrong
    task)."""
    root = Path(folder)
    fix = f"delete {folder} and the run writes the current set (or set generate_demo_data: none to train on it)"
    manifest = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).exists() else {}
    if manifest.get("task") != task:
        raise UserError(f"{root / MANIFEST}: {folder} does not hold the {task} set of this demo_data.py; {fix}")
    written = tuple(manifest.get("moves", DEMO_MOVES))  # a manifest without moves holds a three-move set
    if written != tuple(moves):
        raise UserError(
            f"{root / MANIFEST}: {folder} holds the {task} set with {written[0]}-{written[1]} moves per record, "
            f"the config asks for {moves[0]}-{moves[1]} (demo_moves); delete {folder} and the run writes that set, "
            f"or set demo_moves: [{written[0]}, {written[1]}]"
        )
    expected = make_record(task, random.Random(manifest["seed"]), written)[1]
    with open(root / "train.jsonl", encoding="utf-8") as lines:
        first = json.loads(lines.readline())  # one record is enough, the set is large
    if {key: first.get(key) for key in expected} != expected:
        raise UserError(
            f"{root / 'train.jsonl'}: record 1 is not what this demo_data.py writes (an earlier format); {fix}"
        )
