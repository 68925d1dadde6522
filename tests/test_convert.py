"""Original-layout InternVL checkpoints load (internvl.py) and convert (convert.py) as the identical native model.

The tests write their own checkpoints: a tiny random native model is saved in the original
`internvl_chat` layout through an inverse key mapping written here from the documented names,
independently of internvl.py, together with an offline byte-level tokenizer.
"""

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

import convert
from models import internvl, pick_attn_implementation
from models.internvl import convert_state_dict, is_original_layout, load_internvl, native_config_from_original
from utils import UserError

VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=56,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)
TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=512,
    hidden_act="silu",
)
TOKENS_PER_TILE = 4  # (56 / 14)^2 patches, pixel-shuffled by 0.5 in each direction
TILES = 2
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]

# Native name fragment -> original name fragment, applied in order (the q/k/v fusion is handled apart).
NATIVE_TO_ORIGINAL = [
    ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.weight", "language_model.lm_head.weight"),
]

VARIANTS = {
    "tied": dict(tied=True, shards=1, norm_type="layer_norm", qk_norm=False, qkv_bias=True),
    "untied-sharded": dict(tied=False, shards=3, norm_type="layer_norm", qk_norm=False, qkv_bias=True),
    "rmsnorm-qknorm-nobias": dict(tied=False, shards=1, norm_type="rms_norm", qk_norm=True, qkv_bias=False),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges (one token per byte) plus InternVL's image tokens."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    return tokenizer


def native_model(tied: bool, norm_type: str, qk_norm: bool, qkv_bias: bool) -> InternVLForConditionalGeneration:
    """A random native model; every parameter is redrawn so that no zero or constant init hides a bad mapping."""
    config = InternVLConfig(
        vision_config={**VISION, "norm_type": norm_type, "use_qk_norm": qk_norm, "attention_bias": qkv_bias},
        text_config={"model_type": "qwen2", **TEXT, "tie_word_embeddings": tied},
        image_token_id=tiny_tokenizer().convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def original_config(tied: bool, norm_type: str, qk_norm: bool, qkv_bias: bool) -> dict:
    """An `internvl_chat` config.json shaped like OpenGVLab's, for the tiny sizes above."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "force_image_size": VISION["image_size"],
        "select_layer": -1,
        "ps_version": "v2",
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "tie_word_embeddings": False,  # as in InternVL3; the language model reads llm_config's flag
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **VISION,
            "norm_type": norm_type,
            "qk_normalization": qk_norm,
            "qkv_bias": qkv_bias,
            "initializer_factor": 1.0,
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "num_channels": 3,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **TEXT,
            "tie_word_embeddings": tied,
        },
    }


def to_original_layout(native: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename a native state dict to original names, fusing q, k, v into `attn.qkv` and dropping a tied head."""
    original = {}
    for key, tensor in native.items():
        if (tied and key == "lm_head.weight") or ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        if ".attention.q_proj." in key:
            tensor = torch.cat([native[key.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")])
            key = key.replace(".attention.q_proj.", ".attn.qkv.")
        for native_part, original_part in NATIVE_TO_ORIGINAL:
            key = key.replace(native_part, original_part)
        original[key] = tensor.detach().clone().contiguous()
    return original


def write_original_checkpoint(
    folder: Path, model: InternVLForConditionalGeneration, variant: dict, extra: dict | None = None
) -> None:
    """Save `model` as an original-layout checkpoint: config.json, tokenizer, and one or several shards."""
    folder.mkdir(parents=True, exist_ok=True)
    config = original_config(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(folder)
    weights = {**to_original_layout(model.state_dict(), variant["tied"]), **(extra or {})}
    if variant["shards"] == 1:
        save_file(weights, folder / "model.safetensors")
        return
    names = sorted(weights)
    weight_map = {}
    for shard in range(variant["shards"]):
        file = f"model-{shard + 1:05d}-of-{variant['shards']:05d}.safetensors"
        part = {name: weights[name] for name in names[shard :: variant["shards"]]}
        save_file(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def image_prompt_inputs() -> dict[str, torch.Tensor]:
    """Two tiles behind InternVL's `<img>` block, followed by a question."""
    context = "<IMG_CONTEXT>" * (TOKENS_PER_TILE * TILES)
    input_ids = tiny_tokenizer()(f"Look: <img>{context}</img> what is shown?", return_tensors="pt").input_ids
    torch.manual_seed(1)
    return {"input_ids": input_ids, "pixel_values": torch.randn(TILES, 3, 56, 56)}


def assert_same_logits(loaded: InternVLForConditionalGeneration, reference: InternVLForConditionalGeneration) -> None:
    """Both models give bit-identical logits on the same image-and-text input."""
    inputs = image_prompt_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_original_layout_loads_with_identical_logits(tmp_path: Path, variant: dict) -> None:
    reference = native_model(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    write_original_checkpoint(tmp_path, reference, variant)

    loaded = load_internvl(str(tmp_path))

    assert is_original_layout(tmp_path)
    assert not loaded.training
    assert loaded.config.tie_word_embeddings is variant["tied"]
    head_is_embeddings = loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert head_is_embeddings is variant["tied"]
    assert_same_logits(loaded, reference)


def test_cli_writes_native_copy_that_loads_directly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    variant = VARIANTS["untied-sharded"]
    reference = native_model(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    write_original_checkpoint(tmp_path / "original", reference, variant)

    convert.main([str(tmp_path / "original"), str(tmp_path / "native")])

    assert "converted" in capsys.readouterr().out
    assert not is_original_layout(tmp_path / "native")
    assert_same_logits(load_internvl(str(tmp_path / "native")), reference)
    copied = PreTrainedTokenizerFast.from_pretrained(tmp_path / "native")
    assert copied.convert_tokens_to_ids("<IMG_CONTEXT>") == reference.config.image_token_id


def test_missing_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="absent: no such folder"):
        load_internvl(str(tmp_path / "absent"))


def test_cli_reports_a_missing_folder_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        convert.main([str(tmp_path / "absent"), str(tmp_path / "native")])
    assert stop.value.code == 2
    assert re.fullmatch(r"error: .*absent: no such folder[^\n]*\n", capsys.readouterr().err)


def test_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        load_internvl(str(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(original_config(False, "layer_norm", False, True)))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_internvl(str(tmp_path))


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(original_config(False, "layer_norm", False, True)))
    save_file({"mlp1.0.weight": torch.ones(128)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="no tokenizer"):
        load_internvl(str(tmp_path))


def test_unexpected_original_key_is_named(tmp_path: Path) -> None:
    variant = VARIANTS["tied"]
    model = native_model(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    extra = {"vision_model.encoder.layers.0.attn.extra_scale": torch.ones(32)}
    write_original_checkpoint(tmp_path, model, variant, extra=extra)
    with pytest.raises(UserError, match=r"1 original weight\(s\).*layers\.0\.attn\.extra_scale"):
        load_internvl(str(tmp_path))


def test_head_tying_follows_config_and_stored_head() -> None:
    untied = original_config(False, "layer_norm", False, True)
    assert not native_config_from_original(untied, 258).tie_word_embeddings
    assert native_config_from_original(untied, 258, separate_head=False).tie_word_embeddings

    tied = native_config_from_original(original_config(True, "layer_norm", False, True), 258)
    assert tied.tie_word_embeddings and tied.text_config.tie_word_embeddings
    assert tied.image_seq_length == TOKENS_PER_TILE and tied.vision_feature_layer == -1
    embeddings = torch.ones(300, 64)
    stored = {"language_model.model.embed_tokens.weight": embeddings, "language_model.lm_head.weight": embeddings}
    assert convert_state_dict(stored, tied)["lm_head.weight"] is embeddings
    stored["language_model.lm_head.weight"] = torch.zeros(300, 64)
    with pytest.raises(UserError, match="differs from the embeddings"):
        convert_state_dict(stored, tied)


def test_keys_a_config_leaves_out_take_the_original_defaults() -> None:
    # OpenGVLab's InternVisionConfig: rms_norm, q/k normalisation, no qkv bias; InternVLChatConfig: ps_version v1
    original = original_config(False, "layer_norm", False, True)
    for key in ("norm_type", "qk_normalization", "qkv_bias"):
        del original["vision_config"][key]
    vision = native_config_from_original(original, 258).vision_config
    assert (vision.norm_type, vision.use_qk_norm, vision.attention_bias) == ("rms_norm", True, False)
    del original["ps_version"]
    with pytest.raises(UserError, match=r"ps_version 'v1' \(v1 when the config leaves it out\)"):
        native_config_from_original(original, 258)


@pytest.mark.parametrize("key, passed", [("dtype", torch.bfloat16), ("torch_dtype", torch.bfloat16), (None, "auto")])
def test_a_native_folder_loads_in_its_stored_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key, passed
) -> None:
    # transformers 4.x loads float32 when from_pretrained is given no dtype (5 keeps the stored one), so the dtype
    # config.json records is passed explicitly: under `dtype` (as 5 writes it), `torch_dtype` (as 4.x writes it),
    # or, recording none, "auto" (from_pretrained then reads the weights' dtype in either version)
    variant = VARIANTS["tied"]
    model = native_model(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    config = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items() if "dtype" not in k}
    (tmp_path / "config.json").write_text(json.dumps(config | ({key: "bfloat16"} if key else {})))
    asked = []
    real = InternVLForConditionalGeneration.from_pretrained.__func__
    spy = classmethod(lambda cls, *args, **kwargs: asked.append(kwargs["dtype"]) or real(cls, *args, **kwargs))
    monkeypatch.setattr(InternVLForConditionalGeneration, "from_pretrained", spy)

    loaded = load_internvl(str(tmp_path))

    assert asked == [passed]
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert load_internvl(str(tmp_path), dtype=torch.float32).dtype == torch.float32  # an explicit dtype wins


@pytest.mark.parametrize("layout, key", [("original", "select_layer"), ("native", "vision_feature_layer")])
def test_a_feature_layer_other_than_the_last_is_refused_at_load_before_transformers_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, key: str
) -> None:
    # transformers 4.x (4.57.6) loads such a checkpoint, then fails in the first forward: stop at load instead.
    # This transformers is 5.x, so the version check is patched; the logic around it is what is tested.
    variant = VARIANTS["tied"]
    model = native_model(variant["tied"], variant["norm_type"], variant["qk_norm"], variant["qkv_bias"])
    if layout == "original":
        write_original_checkpoint(tmp_path, model, variant)
    else:
        model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {key: -2}))

    monkeypatch.setattr(internvl, "transformers_before_5", lambda: True)
    with pytest.raises(UserError, match="vision_feature_layer \\(select_layer\\) -2 fails in transformers") as err:
        load_internvl(str(tmp_path))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(internvl, "transformers_before_5", lambda: False)
    assert load_internvl(str(tmp_path)).config.vision_feature_layer == -2  # transformers 5 runs it
    monkeypatch.setattr(internvl, "transformers_before_5", lambda: True)
    (tmp_path / "config.json").write_text(json.dumps(config | {key: -1}))
    assert load_internvl(str(tmp_path)).config.vision_feature_layer == -1  # the last layer loads on 4.x too


def test_attention_implementation_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick_attn_implementation("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_attn_implementation(None) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it raises ImportError
    assert pick_attn_implementation(None) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert pick_attn_implementation(None) == "flash_attention_2"
    assert pick_attn_implementation("sdpa") == "sdpa"


# The published OpenGVLab/InternVL3-1B config.json, less fields the conversion does not read.
INTERNVL3_1B = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "tie_word_embeddings": False,
    "use_thumbnail": True,
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": 151674,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "attention_dropout": 0.0,
        "drop_path_rate": 0.1,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 0.1,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
        "use_flash_attn": False,
    },
}


@pytest.mark.slow
def test_full_size_internvl3_1b_forward_backward() -> None:
    image_start, image_end, image_context = 151665, 151666, 151667  # ids in the InternVL3-1B tokenizer
    config = native_config_from_original(INTERNVL3_1B, image_context)
    assert config.image_seq_length == 256
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).train()
    assert 0.9e9 < sum(p.numel() for p in model.parameters()) < 1.0e9

    prompt = torch.randint(0, 151643, (12,)).tolist()
    image = [image_start] + [image_context] * 256 + [image_end]
    input_ids = torch.tensor([prompt[:4] + image + prompt[4:]])
    labels = input_ids.masked_fill(input_ids >= image_start, -100)
    out = model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 448, 448), labels=labels)
    out.loss.backward()

    assert torch.isfinite(out.loss)
    patch_grad = model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad
    assert patch_grad is not None and torch.isfinite(patch_grad).all() and patch_grad.abs().sum() > 0
