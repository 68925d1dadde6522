"""The seam where a model family plugs in: loading a base model and its tokenizer, the latent tokens, and the
Coconut model a run trains.

`load_base` turns a model id into a native `transformers` model and a tokenizer that holds the image tokens and
the three latent tokens: "tiny" (random, offline), a local checkpoint folder, whose config.json's model_type names
the family that loads it (today only InternVL, internvl.py), or a hub id (downloaded once). From there every model
takes the same path: latent tokens added, embeddings resized and RMSNorms fused by the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import checkpoint
import internvl
from coconut import LATENT_TOKENS, Coconut
from config import Config
from dataset import Encoding
from utils import UserError, read_checkpoint_config


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
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Return the base model (in `dtype`, RMSNorms fused) and its tokenizer, latent tokens included.

    `model_id` is "tiny" (random, offline), a local checkpoint folder or a hub id (downloaded once, then read from
    the local cache). `attn_implementation` None picks flash-attention 2 when it is installed on CUDA, else sdpa.
    """
    attn_implementation = pick_attn_implementation(attn_implementation)
    if model_id == "tiny":
        model, tokenizer = internvl.tiny_model(attn_implementation)
        model = model.to(dtype)
    else:
        folder = model_id if os.path.isdir(model_id) else _download(model_id)
        model_type = read_checkpoint_config(folder).get("model_type")
        if model_type not in internvl.MODEL_TYPES:  # the one family so far; a new one adds its branch here
            raise UserError(f"{folder}: config.json has model_type {model_type!r}; {internvl.CHECKPOINT_HINT}")
        model = internvl.load_internvl(folder, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = internvl.load_tokenizer(folder)
    add_latent_tokens(model, tokenizer, latent_init)
    internvl.fuse_rms_norms(model)
    return model, tokenizer


def _download(model_id: str) -> str:
    """Fetch a hub checkpoint into the local cache (no-op when cached) and return its folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id)
    except Exception as err:  # the hub client raises many types; the user needs the one-line reason
        raise UserError(f"config: model_id '{model_id}' is no local folder and could not be fetched ({err})") from None


def add_latent_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, init: str) -> None:
    """Add the three latent tokens to `tokenizer`, resize `model`'s embeddings and initialise the new rows.

    `init` is the rule for the new input rows (and output rows when the head is untied): "mean" copies the mean
    of the existing rows, any other string copies the row of the token that text encodes to. Either way the new
    rows have the scale of the trained ones, never a fresh random draw.
    """
    tokenizer.add_tokens(list(LATENT_TOKENS), special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    old_size = model.get_input_embeddings().weight.shape[0]
    if min(new_ids) < old_size:  # already present (e.g. a checkpoint saved by this repo)
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
    """The base model (or the checkpoint to start from) wrapped in Coconut with the config's thought feedback, and
    its tokenizer. A `projected` model starting from a model without a projection (a CoT model) gets a new one."""
    start_from = config.load_model_path
    if start_from != "none" and not Path(start_from).exists():
        raise UserError(f"config: load_model_path {start_from} does not exist; train stage 0 first or fix the path")
    folder = start_from if start_from != "none" and Path(start_from).is_dir() else config.model_id
    dtype = torch.bfloat16 if config.bf16_weights else torch.float32
    base, tokenizer = load_base(folder, config.latent_init, dtype, config.attn_implementation or None)
    latent_id = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[2])
    model = Coconut(base, latent_id, tokenizer.eos_token_id, config.thought_feedback)
    if start_from != "none" and Path(start_from).is_file():
        checkpoint.load_model_weights(start_from, model)
    elif start_from != "none":
        checkpoint.load_projection(Path(start_from), model)
    return model, tokenizer


def encoding_for(base: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config) -> Encoding:
    """How records become token ids for `base`: its tile size and context tokens per tile, with `config`."""
    return Encoding(tokenizer, config, internvl.tile_size(base.config), internvl.image_seq_length(base.config))
