"""The InternVL family: the tiny offline model, real checkpoints in either layout, and what the rest of the code
needs to know about the architecture (`vision`: tile size, context tokens per tile, the image block; the layers to
shard; the vision tower to checkpoint), under the names every family module offers `models.family`.

`models.load_base` loads every InternVL model through this module. The tiny model (`model_id: tiny`) is
random-initialised and built offline. A checkpoint folder is either in the native `transformers` layout
(`model_type: internvl`) or in OpenGVLab's original remote-code layout (`internvl_chat`, how InternVL3-1B-Pretrained
is published): that one is read without `trust_remote_code` by building the equivalent native `InternVLConfig`,
renaming the weights onto `InternVLForConditionalGeneration` and loading them strictly (`KEY_RULES`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x keeps it in modeling_utils
    from transformers.modeling_utils import no_init_weights

from images import Vision
from models.byte_tokenizer import byte_level_tokenizer
from models.causal_lm import tiny_qwen2_config
from utils import UserError, read_checkpoint_config

TINY_IDS = ("tiny",)
MODEL_TYPES = ("internvl", "internvl_chat")  # config.json model_type: native layout, original layout
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_BLOCK = ("<img>", IMAGE_CONTEXT_TOKEN, "</img>")  # start, context (once per context token), end
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
TEXT_INIT_STD = 0.06  # the tiny model's decoder-side init (tiny_config)
CHECKPOINT_HINT = "pass a local InternVL3 checkpoint folder (config.json, *.safetensors, tokenizer files)"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with the special tokens of InternVL3's Qwen2.5 tokenizer (image tokens,
    `<|im_end|>` as EOS, `<|endoftext|>` as padding), so code written against it runs unchanged on the real one."""
    fast = byte_level_tokenizer(EOS_TOKEN, PAD_TOKEN)
    fast.add_tokens(list(IMAGE_BLOCK), special_tokens=True)
    return fast


def tiny_config(vocab_size: int, image_token_id: int) -> InternVLConfig:
    """A 0.7M-parameter InternVL (text hidden 128 x 4 layers, vision hidden 64 x 2 layers, 64-px tiles).

    Each 64-px tile is cut into 8-px patches (64 of them), which the pixel shuffle turns into 16 context
    tokens, so a CPU can train it in minutes. The decoder, its embeddings and the projector start at
    N(0, TEXT_INIT_STD) rather than transformers' 0.02, a scale meant for widths of 768 and up: at width 128 the
    attention logits start so flat that the demo's image read (a letter finding its cell) sits on a loss plateau
    for 9 epochs or more, where 0.06 brings it off by about epoch 5 (docs/experiments.md has the runs).
    """
    vision = InternVLVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=64,
        patch_size=8,
    )
    text = tiny_qwen2_config(vocab_size)
    text.initializer_range = TEXT_INIT_STD
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def tiny_model(
    model_id: str, attn_implementation: str | None
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """The tiny random InternVL (`model_id` "tiny", the one of TINY_IDS; float32) and its byte-level tokenizer,
    built offline.

    transformers starts InternViT's position embeddings at zero, which a pretrained checkpoint never has: two cells
    of one colour would then enter the language model as the same token, and the tiny model learns to find a cell
    by where the question sits rather than by what its token holds (docs/experiments.md). They start like the
    tower's other weights here, N(0, initializer_range = 0.02), under the run's seed.
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN))
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    torch.nn.init.normal_(
        model.model.vision_tower.embeddings.position_embeddings, std=config.vision_config.initializer_range
    )
    return model, tokenizer


def image_seq_length(config: InternVLConfig) -> int:
    """Context tokens one tile becomes: patches per side squared, times the pixel-shuffle ratio squared."""
    vision = config.vision_config
    side = vision.image_size[0] // vision.patch_size[0]
    return int(side * side * config.downsample_ratio**2)


def tile_size(config: InternVLConfig) -> int:
    """Pixel size of one square image tile the vision tower expects."""
    return int(config.vision_config.image_size[0])


def vision(config: InternVLConfig) -> Vision:
    """How the model sees images: its tile size, context tokens per tile and image block
    `<img><IMG_CONTEXT>...</img>`."""
    return Vision(tile_size(config), image_seq_length(config), *IMAGE_BLOCK)


def sharded_layers(model: InternVLForConditionalGeneration) -> list[torch.nn.Module]:
    """The layers FSDP2 shards one by one: the vision tower's, then the language model's."""
    return list(model.model.vision_tower.encoder.layer) + list(model.model.language_model.layers)


def load(
    folder: str, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """An InternVL3 checkpoint folder in either layout (`load_internvl`) and its tokenizer."""
    return load_internvl(folder, dtype=dtype, attn_implementation=attn_implementation), load_tokenizer(folder)


def fuse_rms_norms(model: torch.nn.Module) -> None:
    """Replace every Qwen2 RMSNorm in `model` by `torch.nn.RMSNorm` over the same weight `Parameter`.

    The function is the same up to rounding (torch normalises float64 inputs in float64, transformers in
    float32), and parameter names, state dicts and sharding are unchanged. What changes is the cost: on CUDA
    torch's RMSNorm is one fused kernel forward and one backward, where the transformers module launches about
    ten elementwise kernels each way, and Coconut's single-column latent passes are bound by kernel launches
    (bench/README.md).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Qwen2RMSNorm):
                # on "meta": its own weight would only be thrown away for the existing one
                fused = torch.nn.RMSNorm(child.weight.shape, eps=child.variance_epsilon, device="meta")
                fused.weight = child.weight
                setattr(parent, name, fused)


def checkpoint_activations(model: InternVLForConditionalGeneration) -> None:
    """Activation checkpointing of the vision tower's layers: their activations are recomputed in backward.

    Only the vision tower: decoder layers write the KV cache that links Coconut's latent passes, and a
    checkpointed decoder layer would write it again when recomputed. transformers 5 renamed the method.
    """
    tower = model.model.vision_tower
    enable = getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable
    enable()


_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_NATIVE_LAYER = r"model.vision_tower.encoder.layer.\1."
# Original name (full match) -> native name: the one source of the mapping (docs/model.md points here).
KEY_RULES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (_LAYER + r"attn\.proj\.(weight|bias)", _NATIVE_LAYER + r"attention.projection_layer.\2"),
    (_LAYER + r"attn\.(q_norm|k_norm)\.weight", _NATIVE_LAYER + r"attention.\2.weight"),
    (_LAYER + r"ls1", _NATIVE_LAYER + "lambda_1"),
    (_LAYER + r"ls2", _NATIVE_LAYER + "lambda_2"),
    (_LAYER + r"norm1\.(weight|bias)", _NATIVE_LAYER + r"layernorm_before.\2"),
    (_LAYER + r"norm2\.(weight|bias)", _NATIVE_LAYER + r"layernorm_after.\2"),
    (_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)", _NATIVE_LAYER + r"mlp.\2.\3"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]
FUSED_QKV = re.compile(_LAYER + r"attn\.qkv\.(weight|bias)")
ORIGINAL_HEAD = "language_model.lm_head.weight"
NATIVE_HEAD = "lm_head.weight"
NATIVE_EMBEDDINGS = "model.language_model.embed_tokens.weight"
# What the original InternVisionConfig assumes for the keys a vision_config may leave out
ORIGINAL_VISION_DEFAULTS = {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False}


def is_original_layout(folder: str | Path) -> bool:
    """Tell whether `folder` holds the original remote-code layout rather than the native one.

    The answer comes from `model_type` in the folder's config.json: `internvl_chat` is the original
    OpenGVLab layout, `internvl` the native `transformers` one; anything else is not an InternVL
    checkpoint this module can load, so it raises `UserError`.
    """
    model_type = read_checkpoint_config(folder).get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{folder}: config.json has model_type {model_type!r}; {CHECKPOINT_HINT}")
    return model_type == "internvl_chat"


def native_config_from_original(original: dict, image_token_id: int, separate_head: bool = True) -> InternVLConfig:
    """Build the native `InternVLConfig` equivalent to an original `internvl_chat` config.json.

    The vision tower comes from `vision_config`, the language model from `llm_config` (a Qwen2 config),
    and the projector and image-token settings from `downsample_ratio`, the tile size and `select_layer`.
    The head is tied when the language model config says so or when the checkpoint stores no separate
    head (`separate_head=False`). Preprocessing fields (`template`, `dynamic_image_size`, `use_thumbnail`,
    `max_dynamic_patch`, `min_dynamic_patch`) have no place in the native config and are not carried.
    Settings the native classes cannot reproduce raise `UserError` instead of loading a different model.
    """
    vision, llm = ORIGINAL_VISION_DEFAULTS | original["vision_config"], original["llm_config"]
    if llm.get("model_type") != "qwen2":
        raise UserError(f"llm_config model_type {llm.get('model_type')!r} is not supported, only qwen2")
    ps_version = original.get("ps_version", "v1")  # the original InternVLChatConfig's default
    if ps_version != "v2":
        raise UserError(f"ps_version {ps_version!r} (v1 when the config leaves it out): the native pixel shuffle is v2")
    if vision["qk_normalization"] and vision["layer_norm_eps"] != 1e-6:
        raise UserError("qk_normalization with layer_norm_eps != 1e-6: native q/k norms use 1e-6")
    # Qwen2Config defaulted to untied in the transformers releases these checkpoints were written with.
    tied = llm.get("tie_word_embeddings", False) or not separate_head
    tile_size = original.get("force_image_size") or vision["image_size"]
    # A dtype on the text part alone would build a mixed-precision model; load_internvl picks one for all.
    text = {k: v for k, v in llm.items() if k not in ("torch_dtype", "dtype", "tie_word_embeddings")}
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"),
        # The position embeddings are stored for vision_config.image_size; other tile sizes interpolate them.
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
        norm_type=vision["norm_type"],
        layer_norm_eps=vision["layer_norm_eps"],
        use_qk_norm=vision["qk_normalization"],
        attention_bias=vision["qkv_bias"],
        attention_dropout=vision.get("attention_dropout", 0.0),
        projection_dropout=vision.get("dropout", 0.0),
    )
    return InternVLConfig(
        vision_config=vision_config,
        text_config=Qwen2Config(**text, tie_word_embeddings=tied),
        image_token_id=image_token_id,
        image_seq_length=int((tile_size // vision["patch_size"]) ** 2 * original["downsample_ratio"] ** 2),
        downsample_ratio=original["downsample_ratio"],
        vision_feature_layer=original.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )


def convert_state_dict(original_sd: dict[str, torch.Tensor], config: InternVLConfig) -> dict[str, torch.Tensor]:
    """Rename an original InternVL state dict onto `InternVLForConditionalGeneration`.

    Vision and projector names follow `KEY_RULES`, each fused `attn.qkv` is split into q, k and v
    (stored in that order along the output dimension), and language model weights move under
    `model.language_model.` and `lm_head.`. With a tied config the result holds the embedding matrix
    as `lm_head.weight` too, as a native state dict does; a stored head that differs from it is an
    error, since the original model would have ignored one of the two. Keys matching no rule raise
    `UserError` listing them: nothing is dropped silently.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in original_sd.items():
        if fused := FUSED_QKV.fullmatch(key):
            layer, kind = fused.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part
            continue
        native = next((re.sub(p, r, key) for p, r in KEY_RULES if re.fullmatch(p, key)), None)
        if native is None:
            unknown.append(key)
        else:
            converted[native] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise UserError(f"{len(unknown)} original weight(s) have no native counterpart: {shown}")
    if config.tie_word_embeddings and NATIVE_EMBEDDINGS in converted:
        embeddings = converted[NATIVE_EMBEDDINGS]
        if NATIVE_HEAD in converted and not torch.equal(converted[NATIVE_HEAD], embeddings):
            raise UserError(
                f"tie_word_embeddings is true but {ORIGINAL_HEAD} differs from the embeddings; "
                "set llm_config.tie_word_embeddings to false to keep the separate head"
            )
        converted[NATIVE_HEAD] = embeddings
    return converted


def load_internvl(
    folder: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> InternVLForConditionalGeneration:
    """Load an InternVL3 checkpoint from a local folder, in either layout, as the native model.

    A native folder goes through `from_pretrained`; an original one is converted in memory: the image
    token id comes from the folder's tokenizer (`<IMG_CONTEXT>`), the weights from `model.safetensors`
    or the shards its index names, and every native parameter must be filled. `dtype=None` keeps the
    stored dtype; `attn_implementation=None` is transformers' default kernel. Nothing is downloaded and no
    remote code runs; problems with the folder raise `UserError`. The model is returned in eval mode.
    """
    path = Path(folder)
    stored = read_checkpoint_config(path)
    original = is_original_layout(path)
    _check_feature_layer(folder, stored.get("select_layer" if original else "vision_feature_layer", -1))
    if not original:
        return InternVLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype or stored_dtype(stored), attn_implementation=attn_implementation
        )
    weight_files = _weight_files(path)
    image_token_id = load_tokenizer(path).convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    original_sd: dict[str, torch.Tensor] = {}
    for file in weight_files:
        original_sd.update(load_file(file))
    config = native_config_from_original(stored, image_token_id, separate_head=ORIGINAL_HEAD in original_sd)
    converted = convert_state_dict(original_sd, config)
    # Random initialisation of a 1B model is wasted work: every parameter is overwritten below.
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(
            config,
            dtype=dtype or next(iter(converted.values())).dtype,
            attn_implementation=attn_implementation,
        )
    loaded = model.load_state_dict(converted, strict=False)
    if loaded.missing_keys or loaded.unexpected_keys:
        raise UserError(
            f"{folder}: converted weights do not fit the model built from its config.json; "
            f"missing {sorted(loaded.missing_keys)}, unexpected {sorted(loaded.unexpected_keys)}"
        )
    model.tie_weights()
    return model.eval()


def transformers_before_5() -> bool:
    """Whether the installed transformers is a 4.x release (4.57.6 is the oldest this repo supports)."""
    return int(transformers.__version__.split(".")[0]) < 5


def _check_feature_layer(folder: str, layer: int) -> None:
    """Refuse, at load, a vision feature layer other than the last under transformers 4.x: its InternVL loads such
    a checkpoint and then fails in the first forward."""
    if layer != -1 and transformers_before_5():
        raise UserError(
            f"{folder}: vision_feature_layer (select_layer) {layer} fails in transformers {transformers.__version__}'s "
            "InternVL at the first forward; install transformers 5 or use a checkpoint that selects layer -1"
        )


def stored_dtype(config: dict) -> torch.dtype | str:
    """The dtype a native folder's weights are stored in, as its config.json records it (transformers 5 writes
    `dtype`, 4.x `torch_dtype`); "auto" when it records none, which makes `from_pretrained` read the weights'.

    Passed to `from_pretrained` explicitly because its default differs: transformers 5 keeps the stored dtype,
    4.x loads float32.
    """
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if name else "auto"


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json; {CHECKPOINT_HINT}")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint folder's tokenizer (either layout), checked to hold InternVL's image-context token."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise UserError(
            f"{folder}: no tokenizer (tokenizer_config.json or tokenizer.json), needed for the "
            f"{IMAGE_CONTEXT_TOKEN} id; copy the tokenizer files of the original checkpoint into it"
        )
    # AutoTokenizer cannot read the remote-code config.json; the language model type it looks for is qwen2.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=Qwen2Config(), local_files_only=True)
    if IMAGE_CONTEXT_TOKEN not in tokenizer.get_vocab():
        raise UserError(f"{folder}: the tokenizer has no {IMAGE_CONTEXT_TOKEN} token")
    return tokenizer
