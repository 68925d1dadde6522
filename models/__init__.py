"""The seam where a model family plugs in: which family a model belongs to, loading a base model and its tokenizer,
the latent tokens, and the Coconut model a run trains.

A family is a module offering the same names: TINY_IDS (the offline random models it builds) and `tiny_model`,
`load` (a checkpoint folder -> model and tokenizer), `vision` (how its models see images: `images.Vision`, or None
for a text model), `sharded_layers` (what FSDP2 shards one by one) and `checkpoint_activations`. Vision-language
families (today InternVL, internvl.py) claim config.json's model_type by their MODEL_TYPES; every other model type
is a text causal LM (causal_lm.py). Adding a family is one module and one entry in VISION_FAMILIES.

`load_base` turns a model id into a native `transformers` model and a tokenizer that holds the family's special
tokens and the three latent tokens: a tiny offline model ("tiny", "tiny-gpt2", "tiny-qwen2"), a local checkpoint
folder or a hub id (downloaded once). From there every model takes the same path: latent tokens added, embeddings
resized and RMSNorms fused by the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import checkpoint
from coconut import LATENT_TOKENS, Coconut
from config import Config
from dataset import Encoding
from models import causal_lm, internvl
from patches import VISUAL_TOKEN
from utils import UserError, read_checkpoint_config

VISION_FAMILIES = (internvl,)  # each claims the config.json model types in its MODEL_TYPES
TINY_FAMILIES = {model_id: family for family in (*VISION_FAMILIES, causal_lm) for model_id in family.TINY_IDS}


def family(model_type: str) -> ModuleType:
    """The family module of a config.json `model_type`: the vision-language family that claims it, else the text
    causal LMs."""
    return next((f for f in VISION_FAMILIES if model_type in f.MODEL_TYPES), causal_lm)


def pick_attn_implementation(requested: str | None) -> str:
    """Choose the attention kernel: an explicit `requested` value wins, otherwise the fastest available.

    That is `flash_attention_2` when CUDA is available and the `flash_attn` package imports, and
    PyTorch's `sdpa` everywhere else (CPU runs, GPUs without flash-attn).
    """
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def load_base(
    model_id: str,
    latent_init: str = "mean",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    visual: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Return the base model (in `dtype`, RMSNorms fused) and its tokenizer, latent tokens included (and with
    `visual`, for visual_latents > 0, `VISUAL_TOKEN`).

    `model_id` is a tiny offline model (TINY_FAMILIES), a local checkpoint folder or a hub id (downloaded once, then
    read from the local cache) of an InternVL3 or any causal LM. `attn_implementation` None picks flash-attention 2
    when it is installed on CUDA, else sdpa.
    """
    attn_implementation = pick_attn_implementation(attn_implementation)
    if model_id in TINY_FAMILIES:
        model, tokenizer = TINY_FAMILIES[model_id].tiny_model(model_id, attn_implementation)
        model = model.to(dtype)
    else:
        folder = model_id if os.path.isdir(model_id) else _download(model_id)
        model_type = read_checkpoint_config(folder).get("model_type")
        model, tokenizer = family(model_type).load(folder, dtype, attn_implementation)
    add_latent_tokens(model, tokenizer, latent_init, visual)
    internvl.fuse_rms_norms(model)  # Qwen2's RMSNorms, wherever they are (InternVL's text part, a Qwen2 model)
    return model, tokenizer


def _download(model_id: str) -> str:
    """Fetch a hub checkpoint into the local cache (no-op when cached) and return its folder."""
    from huggingface_hub import snapshot_download

    try:
        # weights as safetensors only: a hub repo may also hold the same weights for other frameworks
        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"])
    except Exception as err:  # the hub client raises many types; the user needs the one-line reason
        raise UserError(f"config: model_id '{model_id}' is no local folder and could not be fetched ({err})") from None


def add_latent_tokens(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, init: str, visual: bool = False
) -> None:
    """Add the three latent tokens to `tokenizer` (and with `visual` a fourth, `VISUAL_TOKEN`: only a visual-latent
    model has it, so every other model's vocabulary and checkpoints stay as they are), resize `model`'s embeddings
    and initialise the new rows.

    `init` is the rule for the new input rows (and output rows when the head is untied): "mean" copies the mean
    of the existing rows, any other string copies the row of the token that text encodes to. Either way the new
    rows have the scale of the trained ones, never a fresh random draw.
    """
    tokens = [*LATENT_TOKENS, VISUAL_TOKEN] if visual else list(LATENT_TOKENS)
    tokenizer.add_tokens(tokens, special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    old_size = model.get_input_embeddings().weight.shape[0]
    # already present (e.g. a checkpoint saved by this repo; a CoT model a visual-latent run starts from lacks only
    # the visual token, whose row alone is then new)
    if max(new_ids) < old_size:
        return
    if init != "mean":
        source = tokenizer.encode(init, add_special_tokens=False)
        if len(source) != 1:
            raise UserError(f"config: latent_init '{init}' is {len(source)} tokens; use 'mean' or one token's text")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
            tables.append(head.weight)
        for table in tables:
            row = table[:old_size].mean(0) if init == "mean" else table[source[0]]
            table[old_size:] = row


def build_model(config: Config) -> tuple[Coconut, PreTrainedTokenizerBase]:
    """The base model (or the checkpoint to start from) wrapped in Coconut with the config's thought feedback and
    latent iterations and visual latents (a text model refuses them), and its tokenizer. A `projected` model starting
    from a model without a projection (a CoT model) gets a new one; with activation_checkpointing, the family's
    vision tower recomputes its activations in backward."""
    start_from = config.load_model_path
    if start_from != "none" and not Path(start_from).exists():
        raise UserError(f"config: load_model_path {start_from} does not exist; train stage 0 first or fix the path")
    folder = start_from if start_from != "none" and Path(start_from).is_dir() else config.model_id
    dtype = torch.bfloat16 if config.bf16_weights else torch.float32
    visual = config.visual_latents > 0
    base, tokenizer = load_base(folder, config.latent_init, dtype, config.attn_implementation or None, visual)
    if visual and family(base.config.model_type).vision(base.config) is None:
        raise UserError(
            f"config: visual_latents {config.visual_latents} looks at the image again, but {config.model_id} is a "
            "text model; set visual_latents: 0 or use a vision-language model_id"
        )
    latent_id = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN) if visual else -1
    if config.activation_checkpointing:
        family(base.config.model_type).checkpoint_activations(base)
    model = Coconut(
        base,
        latent_id,
        tokenizer.eos_token_id,
        config.thought_feedback,
        config.latent_iterations,
        config.visual_latents,
        visual_id,
    )
    if start_from != "none" and Path(start_from).is_file():
        checkpoint.load_model_weights(start_from, model)
    elif start_from != "none":
        checkpoint.load_projection(Path(start_from), model)
    return model, tokenizer


def encoding_for(base: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config) -> Encoding:
    """How records become token ids for `base`: its family's `Vision` (None for a text model), with `config`."""
    return Encoding(tokenizer, config, family(base.config.model_type).vision(base.config))


def sharded_layers(base: nn.Module) -> list[nn.Module]:
    """The layers of `base` FSDP2 shards one by one, as its family lists them."""
    return family(base.config.model_type).sharded_layers(base)
