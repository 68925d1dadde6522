"""Shared fixtures and helpers: the tiny offline models (InternVL and the text families), token rows laid out by
hand, and run.py on demo data."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import demo_data
import prepare_data
from coconut import LATENT_TOKENS, Coconut, decoder_of, positions_from_mask
from models import load_base
from models.internvl import image_seq_length
from patches import VISUAL_TOKEN

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)

# the tiny offline model of each family: InternVL, and two text causal LMs with different position schemes
# (GPT-2's learned absolute positions and own attention, Qwen2's rotary ones)
TINY_MODELS = ("tiny", "tiny-gpt2", "tiny-qwen2")
_BASES = {}


def tiny(model_id: str):
    """The tiny random `model_id` (float64, so exact comparisons are meaningful) and its tokenizer, built once."""
    if model_id not in _BASES:
        torch.manual_seed(0)
        model, tokenizer = load_base(model_id)
        _BASES[model_id] = model.double().eval(), tokenizer
    return _BASES[model_id]


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random InternVL and its tokenizer (`tiny`)."""
    return tiny("tiny")


@pytest.fixture(scope="session")
def visual_base():
    """The tiny random InternVL with the visual-latent token (float64, weights seeded as `tiny`'s), its tokenizer,
    and a copy of it on eager attention, whose attention weights the visual-latent reference reads."""
    torch.manual_seed(0)
    model, tokenizer = load_base("tiny", visual=True)
    model = model.double().eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, tokenizer, eager


@pytest.fixture(scope="session", params=TINY_MODELS)
def any_base(request):
    """Each family's tiny model and its tokenizer in turn (TINY_MODELS)."""
    return tiny(request.param)


def has_vision(base) -> bool:
    """Whether `base` is a vision-language model (takes pixel_values)."""
    return hasattr(base.config, "vision_config")


def plain_hidden(base, embeds, attention_mask, position_ids, pixel_values=None):
    """Final hidden states of one plain, cache-free pass over `embeds`: InternVL's own model (which places the image
    features itself) or a text model's decoder."""
    if has_vision(base):
        return base.model(
            inputs_embeds=embeds, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
    decoder = decoder_of(base)
    return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small demo data set (32 training and 8 validation records), written once per test module."""
    folder = tmp_path_factory.mktemp("demo")
    demo_data.generate(str(folder), seed=1, sizes={"train": 32, "val": 8})
    return folder


@pytest.fixture(scope="module")
def text_data_dir(data_dir, tmp_path_factory) -> Path:
    """The demo data set's records without their images (`image: null`), for the text models."""
    folder = tmp_path_factory.mktemp("text")
    for split in ("train", "val"):
        records = [
            json.loads(line) | {"image": None} for line in (data_dir / f"{split}.jsonl").read_text().splitlines()
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def make_coconut(
    base,
    tokenizer,
    eos_token_id: int | None = None,
    thought_feedback: str = "hidden",
    latent_iterations: int = 0,
    visual_latents: int = 0,
) -> Coconut:
    """Wrap `base` with the tokenizer's latent ids (a `projected` map seeded, in the base's dtype)."""
    latent = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    visual = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN) if visual_latents else -1
    torch.manual_seed(0)
    return Coconut(base, latent, eos, thought_feedback, latent_iterations, visual_latents, visual).to(base.dtype)


def image_block(base, tokenizer, n_tiles: int) -> list[int]:
    """`<img>` + context tokens for `n_tiles` tiles + `</img>`, as the data pipeline writes it."""
    if n_tiles == 0:
        return []
    ids = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    return [ids[0]] + [ids[1]] * (n_tiles * image_seq_length(base.config)) + [ids[2]]


def reference_logits(
    base, input_ids, attention_mask, pixel_values, latent_id, feed_back=lambda hidden: hidden, iterations: int = 0
):
    """Recompute the whole sequence once per distinct latent column, without a cache; each latent takes
    `feed_back` of the final hidden state before it (None: the latent token's own embedding, one plain pass).

    With `iterations` T > 0, Jacobi iteration instead: T + 1 plain passes over the whole sequence, the first with
    every latent's own token embedding, each of the T later ones with every latent at `feed_back` of the previous
    pass's final hidden state before it; the logits of the last."""
    positions = positions_from_mask(attention_mask)
    embeds = base.get_input_embeddings()(input_ids)
    latent = input_ids == latent_id

    def run(embeds):
        return plain_hidden(base, embeds, attention_mask, positions, pixel_values)

    head = base.get_output_embeddings()
    if feed_back is None:
        return head(run(embeds))
    if iterations:
        rows, cols = torch.nonzero(latent, as_tuple=True)
        current = embeds
        for _ in range(iterations):
            current = embeds.index_put((rows, cols), feed_back(run(current)[rows, cols - 1]))
        return head(run(current))
    for col in sorted(set(torch.nonzero(latent)[:, 1].tolist())):
        hidden = run(embeds)
        rows = torch.nonzero(latent[:, col]).flatten()
        cols = torch.full_like(rows, col)
        # the latent at column j gets the state of j-1 (mapped there only: padding's states may be NaN)
        embeds = embeds.index_put((rows, cols), feed_back(hidden[rows, cols - 1]))
    return head(run(embeds))


def reference_visual_logits(base, eager, input_ids, attention_mask, pixel_values, latent_id, visual_id, k, feed_back):
    """`reference_logits` with visual latents, cache-free and thought by thought: each latent takes `feed_back` of
    the final state before it (of the previous latent where a patch comes before it); then the k positions after it
    take the image features (as the vision tower and projector give them) at the row's k image positions of highest
    last-layer attention from the latent, averaged over heads, read from `eager` (the same weights on eager
    attention, `output_attentions`), ties to the lower index, in image order. Returns the logits and, per
    (row, latent column), the chosen image-token indices and their weights."""
    positions = positions_from_mask(attention_mask)
    image = input_ids == base.config.image_token_id
    features = base.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=base.config.vision_feature_layer,
        vision_feature_select_strategy=base.config.vision_feature_select_strategy,
    )
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    tile_count = image.sum(1) // features.shape[1]
    tile_start = (torch.cumsum(tile_count, 0) - tile_count).tolist()
    features = features.flatten(0, 1)
    first_feature = torch.cumsum(image.sum(1), 0) - image.sum(1)  # each row's first feature's index
    embeds = base.get_input_embeddings()(input_ids)
    latent, chosen = input_ids == latent_id, {}
    for col in sorted(set(torch.nonzero(latent)[:, 1].tolist())):
        hidden = plain_hidden(base, embeds, attention_mask, positions, pixel_values)
        for row in torch.nonzero(latent[:, col]).flatten().tolist():
            source = col - 1
            if input_ids[row, source] == visual_id:
                source = max(c for c in range(col) if latent[row, c])
            embeds = embeds.index_put((torch.tensor([row]), torch.tensor([col])), feed_back(hidden[row, source])[None])
        for row in torch.nonzero(latent[:, col]).flatten().tolist():
            columns = torch.nonzero(image[row]).flatten().tolist()
            if len(columns) < k:
                continue  # nothing to look at: the patches keep the visual token's embedding
            # the row alone, without its padding: eager attention's weights then hold no masked columns at all
            keep = attention_mask[row].bool()
            tiles = pixel_values[tile_start[row] : tile_start[row] + tile_count[row]]
            with torch.no_grad():
                attentions = eager.model(
                    inputs_embeds=embeds[row : row + 1, keep], pixel_values=tiles, output_attentions=True
                ).attentions[-1][0]
            at = int(keep[:col].sum())  # the latent's column in the unpadded row
            weight = attentions[:, at].mean(0)
            real = torch.nonzero(image[row, keep]).flatten().tolist()
            ranked = sorted(range(len(real)), key=lambda i: (-weight[real[i]].item(), i))[:k]
            picked = sorted(ranked)
            chosen[row, col] = (picked, [weight[real[i]].item() for i in picked])
            values = features[first_feature[row] + torch.tensor(picked)]
            cols = torch.arange(col + 1, col + 1 + k)
            embeds = embeds.index_put((torch.full_like(cols, row), cols), values)
    return base.get_output_embeddings()(plain_hidden(base, embeds, attention_mask, positions, pixel_values)), chosen


def shifted_loss(logits, labels):
    """The cross-entropy of each position's logits against the next label (-100 ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def build_batch(base, tokenizer, rows, pad_left, visual: int = 0):
    """rows: (n_tiles, prefix_len, n_latents, suffix_len); random text, padded left or right per row. A text model
    gets no tiles (its rows' n_tiles are read as 0). `visual` puts that many visual-latent tokens after each
    latent."""
    start, end, latent = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    patches = [tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)] * visual
    gen = torch.Generator().manual_seed(1)
    seqs, tiles = [], 0
    for n_tiles, prefix, n_latents, suffix in rows:
        n_tiles = n_tiles if has_vision(base) else 0
        text = lambda n: torch.randint(0, 256, (n,), generator=gen).tolist()  # noqa: E731
        marked = [start] + ([latent] + patches) * n_latents + [end] if n_latents else []
        seqs.append(image_block(base, tokenizer, n_tiles) + text(prefix) + marked + text(suffix))
        tiles += n_tiles
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (seq, left) in enumerate(zip(seqs, pad_left)):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, cols] = torch.tensor(seq)
        mask[i, cols] = 1
    pixels = None
    if tiles:
        size = base.config.vision_config.image_size
        pixels = torch.randn(tiles, 3, size[0], size[1], generator=gen, dtype=torch.float64)
    labels = torch.where((mask == 1) & (ids < 256), ids, -100)
    return ids, mask, pixels, labels


LAYOUTS = {
    "aligned": ([(1, 5, 3, 6), (1, 5, 3, 6)], [False, False]),
    "misaligned_right_pad": ([(1, 3, 2, 8), (0, 9, 4, 2), (2, 4, 1, 5)], [False, False, False]),
    "misaligned_left_pad": ([(1, 3, 2, 8), (0, 9, 4, 2), (0, 2, 0, 4)], [True, True, True]),
    "mixed_padding_text_only": ([(0, 3, 3, 4), (0, 7, 1, 2), (0, 5, 0, 6)], [True, False, True]),
    "no_latents_several_tiles": ([(2, 4, 0, 5), (1, 6, 0, 3)], [True, False]),
}


def run(args: list[str], folder: Path, data: Path, *overrides: str, nproc: int = 0, wait: bool = True, status: int = 0):
    """Start run.py on args/demo.yaml with a small, fast setting; torchrun when nproc > 0. With `wait`, check
    that it exits with `status`."""
    settings = [
        f"train_path={data}/train.jsonl",
        f"val_path={data}/val.jsonl",
        f"save_path={folder}",
        "generate_demo_data=none",
        "batch_size_training=8",
        "eval_batch_size=8",
        "max_new_tokens=8",
        "max_latent_stage=2",
        "stage_overrides={}",
        "epochs_per_stage=1",
        "num_epochs=3",
        "warmup_steps=0",
        *overrides,
    ]
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + [str(ROOT / "run.py"), "args/demo.yaml", *settings, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stderr[-3000:]
    return done


def metrics(folder: Path) -> list[dict]:
    """The epoch lines of a run's metrics.jsonl."""
    return read_jsonl(folder / "metrics.jsonl")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of an exported folder."""
    return load_file(folder / "model.safetensors")


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file back the way a training loader would."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prepare(*args: str | Path) -> None:
    """Run prepare_data.py's command line in-process."""
    prepare_data.main([str(arg) for arg in args])


def prepare_error(*args: str | Path) -> str:
    """Run prepare_data.py's command line, expecting it to stop on a user error (one `error:` line, exit status 2);
    return that line."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
        prepare(*args)
    assert stop.value.code == 2
    message = stderr.getvalue().splitlines()[-1]
    assert message.startswith("error: ")
    return message
