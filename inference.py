"""Answers from an exported model (`run.py`'s final/ or stage_<k>/ folder): loading it with the config it was
trained with, its evaluation prompts, answers with or without thought controls, what its thoughts decode to through
the language model head, and a comparison of several models on one records file. `infer.py` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from checkpoint import PROJECTION_FILE
from coconut import Coconut
from config import Config
from dataset import CoconutDataset, collate
from distributed import Job, autocast_context, dist_info
from evaluate import NO_CONTROLS, Controls, batch_pixels, generate_and_score, generate_answers, summarize
from images import Vision, draw_patches, image_file
from models import build_model, encoding_for, family
from records import load_records
from utils import UserError


@dataclass
class Exported:
    """A model loaded from an exported folder, with its tokenizer, its training config, the stage it reached and the
    job (device, autocast) it runs in."""

    model: Coconut
    tokenizer: PreTrainedTokenizerBase
    config: Config
    stage: int
    job: Job

    @property
    def vision(self) -> Vision | None:
        """How the model sees images (its family's `images.Vision`; None for a text model)."""
        return family(self.model.base.config.model_type).vision(self.model.base.config)

    @property
    def mode(self) -> str:
        """coconut, cot or no_cot: the one that training set."""
        return next(mode for mode in ("coconut", "cot", "no_cot") if getattr(self.config, mode))


def load_exported(folder: str, device: torch.device) -> Exported:
    """Load an exported folder onto `device` in eval mode; a folder that is not one stops with one line."""
    path = Path(folder)
    run_file = path / "coconut.json"
    if not run_file.is_file():
        raise UserError(f"{folder}: no coconut.json, so not a folder exported by run.py; use <run>/final or stage_<k>")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{folder}: no model weights (model.safetensors); export the model again")
    try:
        run = json.loads(run_file.read_text())
        values = dict(run["config"])
        # JSON turned the integer stage keys of stage_overrides into strings
        values["stage_overrides"] = {int(k): v for k, v in values.get("stage_overrides", {}).items()}
        config, stage = Config(**values), int(run["stage"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{run_file}: not a coconut.json written by run.py ({err})") from None
    if config.thought_feedback == "projected" and not (path / PROJECTION_FILE).is_file():
        raise UserError(f"{folder}: a projected model without {PROJECTION_FILE}; export the model again")
    model, tokenizer = build_model(dataclasses.replace(config, load_model_path=folder))
    # unwrapped here, so `bf16` means autocast (training under FSDP2 cast through its policy instead)
    job = Job(dist_info(), device, autocast_context(dataclasses.replace(config, use_fsdp=False), device))
    return Exported(model.to(device).eval(), tokenizer, config, stage, job)


def open_prompts(exported: Exported, records: str, stage: int) -> CoconutDataset:
    """Evaluation prompts of a records file at `stage`, built as training built them."""
    if not Path(records).is_file():
        raise UserError(f"{records}: records file not found")
    return prompts_of(exported, load_records(records), records, stage)


def prompts_of(
    exported: Exported, records: list[dict], source: str, stage: int, pad_latents: bool = False
) -> CoconutDataset:
    """`records` (read from `source`) as evaluation prompts at `stage`, built as training built them.

    `pad_latents` gives every prompt the stage's full number of thoughts, which a question without written steps
    needs (the number of thoughts is otherwise capped at the record's step count).
    """
    config = dataclasses.replace(exported.config, pad_latent_to_max=exported.config.pad_latent_to_max or pad_latents)
    prompts = CoconutDataset(records, encoding_for(exported.model.base, exported.tokenizer, config), source).prompts()
    prompts.set_stage(stage)
    return prompts


@torch.no_grad()
def _warm_up(exported: Exported, prompts: CoconutDataset, controls: Controls) -> None:
    """One untimed generation: it keeps one-time start-up work (CUDA kernels, allocator) out of the first batch's
    latency, so that methods evaluated one after another are timed alike."""
    device = exported.job.device
    first = collate([prompts[0]], prompts.pad_id, prompts.latent_id)
    with exported.job.autocast():
        exported.model.generate(
            first["input_ids"].to(device),
            first["attention_mask"].to(device),
            pixel_values=batch_pixels(first, device, controls),
            max_new_tokens=1,
            thoughts=controls.thoughts,
        )


def answer(
    exported: Exported, prompts: CoconutDataset, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[dict]:
    """`evaluate.generate_and_score` rows for every prompt, timed after a warm-up."""
    _warm_up(exported, prompts, controls)
    return generate_and_score(exported.model, prompts, exported.job, batch_size, controls)


def probe_thoughts(
    exported: Exported, prompts: CoconutDataset, k: int, batch_size: int, controls: Controls = NO_CONTROLS
) -> list[list[list[dict]]]:
    """Per prompt, per continuous thought in order: the top-k tokens the thought decodes to through the language
    model head, as [{"token", "id", "prob"}], most probable first (`probe_with_patches`)."""
    return probe_with_patches(exported, prompts, k, batch_size, controls)[0]


@torch.no_grad()
def probe_with_patches(
    exported: Exported, prompts: CoconutDataset, k: int, batch_size: int, controls: Controls = NO_CONTROLS
) -> tuple[list[list[list[dict]]], list[list[list[int]]]]:
    """Per prompt, per continuous thought in order: the top-k tokens the thought decodes to through the language
    model head, as [{"token", "id", "prob"}], most probable first; and the image-context tokens whose features the
    thought's patch positions took (visual_latents: indices into the prompt's image tokens, 0 = its first; empty
    without visual latents or without an image).

    A thought is the input embedding `Coconut.forward` put at a latent position (the last hidden state before
    it), so its decoding is also the model's next-token distribution at the position before the latent.
    """
    head = exported.model.base.get_output_embeddings()
    decode, device = exported.tokenizer.decode, exported.job.device
    probes, patches = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="probe", leave=False):
        items = [prompts[i] for i in range(start, min(start + batch_size, len(prompts)))]
        batch = collate(items, prompts.pad_id, prompts.latent_id)
        input_ids = batch["input_ids"].to(device)
        latent = input_ids == prompts.latent_id
        with exported.job.autocast():
            out = exported.model(
                input_ids,
                batch["attention_mask"].to(device),
                pixel_values=batch_pixels(batch, device, controls),
                thoughts=controls.thoughts,
            )
            # float before the softmax: bf16 probabilities over a large vocabulary round badly
            top = head(out.inputs_embeds[latent]).float().softmax(-1).topk(k)
        chosen = (
            [[i for i in picks if i >= 0] for picks in out.patches[latent].tolist()]
            if out.patches is not None
            else None
        )
        thoughts = [
            [{"token": decode([i]), "id": i, "prob": p} for i, p in zip(ids, probs)]
            for ids, probs in zip(top.indices.tolist(), top.values.tolist())
        ]
        chosen = chosen or [[] for _ in thoughts]
        for count in latent.sum(1).tolist():  # `inputs_embeds[latent]` lists the thoughts row by row
            probes.append(thoughts[:count])
            patches.append(chosen[:count])
            thoughts, chosen = thoughts[count:], chosen[count:]
    return probes, patches


def draw_chosen_patches(prompts: CoconutDataset, index: int, picks: list[list[int]], folder: Path) -> list[str]:
    """Write, for prompt `index`, one PNG per image into `folder` with the patches each thought chose (`picks`, as
    `probe_with_patches` gives them) outlined (`images.draw_patches`); returns the files' paths."""
    tokens, vision, per_tile = prompts.tokens[index], prompts.encoding.vision, prompts.encoding.vision.tokens_per_tile
    folder.mkdir(parents=True, exist_ok=True)
    written, first = [], 0
    for k, (path, n_tiles) in enumerate(zip(tokens.images, tokens.n_tiles)):
        mine = [[i - first for i in thought if first <= i < first + n_tiles * per_tile] for thought in picks]
        first += n_tiles * per_tile
        with image_file(path, str(path)) as image:
            drawn = draw_patches(image, mine, vision, prompts.config.max_num_tiles)
        name = folder / (f"{index}.png" if len(tokens.images) == 1 else f"{index}-image{k + 1}.png")
        drawn.save(name)
        written.append(str(name))
    return written


def ask(
    exported: Exported, image: str | None, question: str, stage: int, probe: int, controls: Controls = NO_CONTROLS
) -> tuple[dict, list[list[dict]], list[list[int]]]:
    """Answer one question (about one image, or text only); returns its `evaluate.generate_answers` row, the
    thoughts' probes and the patches each thought chose (`probe_with_patches`; both empty without `probe`)."""
    if image is not None and not Path(image).is_file():
        raise UserError(f"--image {image}: file not found")
    # a question has no written steps to count thoughts by: pad_latents gives it the stage's full number
    record = {"image": str(Path(image).resolve()) if image else None, "question": question}
    prompts = prompts_of(exported, [record], "--question", stage, pad_latents=True)
    _warm_up(exported, prompts, controls)
    row = generate_answers(exported.model, prompts, exported.job, 1, controls)[0]
    if not probe:
        return row, [], []
    thoughts, patches = probe_with_patches(exported, prompts, probe, 1, controls)
    return row, thoughts[0], patches[0]


def predict_records(
    exported: Exported,
    records: str,
    stage: int,
    batch_size: int,
    probe: int,
    controls: Controls = NO_CONTROLS,
    patch_folder: Path | None = None,
) -> list[dict]:
    """Answer rows for every record of a file; with `probe`, each row also holds its thoughts' top tokens, and for a
    visual-latent model the patches each thought chose ("patches") and the PNGs that show them, written into
    `patch_folder` ("patch_images", `draw_chosen_patches`)."""
    prompts = open_prompts(exported, records, stage)
    rows = answer(exported, prompts, batch_size, controls)
    if probe:
        probes, patches = probe_with_patches(exported, prompts, probe, batch_size, controls)
        for index, (row, thoughts, picks) in enumerate(zip(rows, probes, patches)):
            row["thoughts"] = thoughts
            if exported.model.visual_latents:
                row["patches"] = picks
                if patch_folder is not None:
                    row["patch_images"] = draw_chosen_patches(prompts, index, picks, patch_folder)
    return rows


def compare(
    methods: dict[str, str],
    records: str,
    controls: dict[str, list[Controls]],
    batch_size: int | None,
    device: torch.device,
) -> list[dict]:
    """Evaluate each exported folder (at its own mode and stage) on the same records, one row per method, plus a
    row for each of the method's `controls`: method, mode, stage, accuracy, gen_tokens, passes (sequential decoder
    passes), latency_ms, n."""
    rows = []
    for name, folder in methods.items():
        exported = load_exported(folder, device)
        prompts = open_prompts(exported, records, exported.stage)
        size = batch_size or exported.config.eval_batch_size
        # random patches replace what only a visual-latent model has
        kept = [c for c in controls.get(name, []) if c.thoughts != "random_patches" or exported.model.visual_latents]
        runs = [(name, NO_CONTROLS)] + [(f"{name} ({c.label})", c) for c in kept]
        for method, control in runs:
            result = summarize(answer(exported, prompts, size, control))
            rows.append(
                {
                    "method": method,
                    "mode": exported.mode,
                    "stage": exported.stage,
                    "accuracy": result["accuracy"],
                    "gen_tokens": result["gen_tokens"],
                    "passes": result["passes"],
                    "latency_ms": 1000 * result["latency_s"],
                    "n": result["n"],
                }
            )
        del exported  # one model in memory at a time
    return rows
