"""The text family: any `transformers` causal language model (GPT-2, Qwen2/2.5/3, Llama, ...), without vision.

`models.load_base` loads through this module every folder whose config.json names no vision-language family: the
Auto classes read its model_type, so any architecture `AutoModelForCausalLM` knows loads (its weights, its
tokenizer, nothing else). Two tiny random models are built offline for tests and the text demo: `tiny-gpt2`
(learned absolute positions, GPT-2's own attention and cache layout) and `tiny-qwen2` (rotary positions, grouped
query attention, RMSNorm), both with the byte-level tokenizer and the size of the tiny InternVL's text part.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from coconut import decoder_of
from images import Vision
from models.byte_tokenizer import byte_level_tokenizer
from utils import UserError

TINY_IDS = ("tiny-gpt2", "tiny-qwen2")
GPT2_EOS = "<|endoftext|>"  # GPT-2's one special token: its EOS, and (set_pad_token) its padding
QWEN_EOS, QWEN_PAD = "<|im_end|>", "<|endoftext|>"


def tiny_qwen2_config(vocab_size: int) -> Qwen2Config:
    """The tiny Qwen2 (hidden 128 x 4 layers, 4 heads over 2 key-value heads): `tiny-qwen2`, and the text part of
    the tiny InternVL."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def tiny_model(model_id: str, attn_implementation: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny random `model_id` (one of TINY_IDS, float32) and its byte-level tokenizer, built offline."""
    if model_id == "tiny-gpt2":
        tokenizer = set_pad_token(byte_level_tokenizer(GPT2_EOS))
        eos = tokenizer.eos_token_id
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=1024,
            # no dropout, as the tiny InternVL: runs that split batches differently train the same model
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        return GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation), tokenizer
    tokenizer = byte_level_tokenizer(QWEN_EOS, QWEN_PAD)
    config = tiny_qwen2_config(len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation), tokenizer


def load(
    folder: str, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM checkpoint folder (native `transformers` layout) in `dtype`, with its tokenizer (padding by its
    EOS when it has no pad token). A model type that is no causal LM, or a folder without a tokenizer, raises
    `UserError`."""
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except ValueError as err:  # an unknown model_type
        raise UserError(f"{folder}: config.json is no model this transformers knows ({err})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"{folder}: config.json has model_type {config.model_type!r}, which is no causal language model; "
            "pass a causal LM (GPT-2, Qwen2, Llama, ...) or an InternVL3 checkpoint folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{folder}: no tokenizer could be read ({err}); copy the model's tokenizer files into it"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), set_pad_token(tokenizer)


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer`, padding by its EOS when it has no pad token of its own (GPT-2's): padding is never attended
    to nor labelled, so which token fills it does not matter."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vision(config: PretrainedConfig) -> Vision | None:
    """A text model sees no images."""
    return None


def sharded_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The layers FSDP2 shards one by one: the decoder's blocks, wherever the architecture keeps them (Qwen2 and
    Llama in `model.layers`, GPT-2 in `transformer.h`): the one ModuleList of `num_hidden_layers` blocks."""
    decoder, count = decoder_of(model), model.config.num_hidden_layers
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(lists) != 1:
        raise UserError(f"{type(decoder).__name__}: cannot tell which module holds its {count} decoder layers")
    return list(lists[0])


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Refused: activation_checkpointing recomputes a vision tower, and a text model has none."""
    raise UserError(
        f"config: activation_checkpointing recomputes the vision tower's activations, and {model.config.model_type} "
        "has no vision tower; set activation_checkpointing: false"
    )
