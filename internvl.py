"""The base InternVL model and its tokenizer: the tiny offline one, real checkpoints, and the latent tokens.

Every run gets its model through `load_base`, which returns a native `transformers`
`InternVLForConditionalGeneration` and a tokenizer that already holds the image tokens and the three latent
tokens. The tiny model (`model_id: tiny`) is random-initialised and built offline, but from there on it takes
exactly the path a real checkpoint takes: latent tokens are added and embeddings resized by the same code.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from convert import load_internvl, load_tokenizer, pick_attn_implementation
from utils import UserError

IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any text encodes (one token per byte), nothing is unknown.

    It carries the same special tokens as InternVL3's Qwen2.5 tokenizer (image tokens, `<|im_end|>` as EOS,
    `<|endoftext|>` as padding), so code written against it runs unchanged on the real one.
    """
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    return fast


def tiny_config(vocab_size: int, image_token_id: int) -> InternVLConfig:
    """A 0.7M-parameter InternVL (text hidden 128 x 4 layers, vision hidden 64 x 2 layers, 64-px tiles).

    Each 64-px tile is cut into 8-px patches (64 of them), which the pixel shuffle turns into 16 context
    tokens, so a CPU can train it in minutes.
    """
    vision = InternVLVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=64,
        patch_size=8,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def image_seq_length(config: InternVLConfig) -> int:
    """Context tokens one tile becomes: patches per side squared, times the pixel-shuffle ratio squared."""
    vision = config.vision_config
    side = vision.image_size[0] // vision.patch_size[0]
    return int(side * side * config.downsample_ratio**2)


def tile_size(config: InternVLConfig) -> int:
    """Pixel size of one square image tile the vision tower expects."""
    return int(config.vision_config.image_size[0])


def fuse_rms_norms(model: torch.nn.Module) -> None:
    """Replace every Qwen2 RMSNorm in `model` by `torch.nn.RMSNorm` over the same weight `Parameter`.

    The function is the same up to rounding (torch normalises float64 inputs in float64, transformers in
    float32), and parameter names, state dicts and sharding are unchanged. What changes is the cost: on CUDA
    torch's RMSNorm is one fused kernel forward and one backward, where the transformers module launches about
    ten elementwise kernels each way, and Coconut's single-column latent passes are bound by kernel launches
    (README, Benchmarks).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Qwen2RMSNorm):
                # on "meta": its own weight would only be thrown away for the existing one
                fused = torch.nn.RMSNorm(child.weight.shape, eps=child.variance_epsilon, device="meta")
                fused.weight = child.weight
                setattr(parent, name, fused)


def checkpoint_vision_tower(model: InternVLForConditionalGeneration) -> None:
    """Activation checkpointing of the vision tower's layers: their activations are recomputed in backward.

    Only the vision tower: decoder layers write the KV cache that links Coconut's latent passes, and a
    checkpointed decoder layer would write it again when recomputed. transformers 5 renamed the method.
    """
    tower = model.model.vision_tower
    enable = getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable
    enable()


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


def load_base(
    model_id: str,
    latent_init: str = "mean",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Return the base InternVL model (in `dtype`, RMSNorms fused) and its tokenizer, latent tokens included.

    `model_id` is "tiny" (random, offline), a local folder in the native or the original InternVL layout, or a
    hub id (downloaded once, then read from the local cache). `attn_implementation` None picks flash-attention 2
    when it is installed on CUDA, else sdpa.
    """
    if model_id == "tiny":
        tokenizer = build_tiny_tokenizer()
        config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
        model = InternVLForConditionalGeneration._from_config(
            config, attn_implementation=pick_attn_implementation(attn_implementation)
        ).to(dtype)
    else:
        folder = model_id if os.path.isdir(model_id) else _download(model_id)
        model = load_internvl(folder, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(folder)
    add_latent_tokens(model, tokenizer, latent_init)
    fuse_rms_norms(model)
    return model, tokenizer


def _download(model_id: str) -> str:
    """Fetch a hub checkpoint into the local cache (no-op when cached) and return its folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id)
    except Exception as err:  # the hub client raises many types; the user needs the one-line reason
        raise UserError(f"config: model_id '{model_id}' is no local folder and could not be fetched ({err})") from None
