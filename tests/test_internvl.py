"""The tiny offline model and tokenizer, and the latent-token rows: the path every checkpoint takes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import image_block, make_coconut
from transformers import InternVLForConditionalGeneration
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from coconut import LATENT_TOKENS
from models import add_latent_tokens, load_base
from models.internvl import (
    IMAGE_BLOCK,
    build_tiny_tokenizer,
    checkpoint_activations,
    fuse_rms_norms,
    image_seq_length,
    tiny_config,
)
from utils import UserError


def test_tiny_tokenizer_encodes_any_text_without_unknowns():
    tokenizer = build_tiny_tokenizer()
    text = "Grüße, 東京! <img><IMG_CONTEXT></img> 3.5 → ∑"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    assert len(set(tokenizer.convert_tokens_to_ids(list(IMAGE_BLOCK)))) == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def fresh_model(tied: bool = True):
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config), tokenizer


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rule", ["mean", "#"])
def test_latent_rows_follow_the_init_rule_for_embeddings_and_head(rule, tied):
    model, tokenizer = fresh_model(tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    old = len(tokenizer)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    add_latent_tokens(model, tokenizer, rule)
    assert tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)) == [old, old + 1, old + 2]
    for table, before in (
        (model.get_input_embeddings().weight, before_in),
        (model.get_output_embeddings().weight, before_out),
    ):
        assert table.shape[0] == old + 3
        expected = before.mean(0) if rule == "mean" else before[tokenizer.convert_tokens_to_ids("#")]
        for row in table[old:]:
            torch.testing.assert_close(row, expected)
        torch.testing.assert_close(table[:old], before)  # existing rows untouched


def test_latent_init_must_be_one_token():
    model, tokenizer = fresh_model()
    with pytest.raises(UserError, match="latent_init 'two words' is 9 tokens"):
        add_latent_tokens(model, tokenizer, "two words")


def test_load_base_tiny_is_ready_for_coconut():
    model, tokenizer = load_base("tiny")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 264
    assert image_seq_length(model.config) == 16 and model.config.image_token_id == tokenizer.convert_tokens_to_ids(
        "<IMG_CONTEXT>"
    )
    # a saved model with the tokens already present is not resized again
    add_latent_tokens(model, tokenizer, "mean")
    assert model.get_input_embeddings().weight.shape[0] == 264


def test_vision_checkpointing_recomputes_without_changing_loss_or_gradients():
    model, tokenizer = load_base("tiny")
    model = model.double().train()
    coconut = make_coconut(model, tokenizer)
    latent = coconut.latent_token_id
    start = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[0])
    ids = image_block(model, tokenizer, 2) + [5, 6, start, latent, latent, 7, 8]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    batch["labels"] = torch.tensor([[-100] * (len(ids) - 2) + ids[-2:]])
    batch["pixel_values"] = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = coconut(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    checkpoint_activations(model)
    assert model.model.vision_tower.encoder.gradient_checkpointing
    # the decoder writes the KV cache that links the latent passes: it must not be recomputed
    assert not model.model.language_model.gradient_checkpointing
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(plain_loss, rel=1e-12) and grads.keys() == plain_grads.keys()
    assert any("vision_tower" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fused_rms_norms_keep_names_outputs_and_gradients():
    model, tokenizer = fresh_model()
    fused = copy.deepcopy(model)
    fuse_rms_norms(fused)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * fused.config.text_config.num_hidden_layers + 1
    assert not any(isinstance(m, Qwen2RMSNorm) for m in fused.modules())
    assert fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.tensor([tokenizer.encode("a test of the norms", add_special_tokens=False)])
    outputs = []
    for m in (model, fused):
        logits = m(input_ids=ids).logits
        logits.square().mean().backward()
        outputs.append((logits, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (logits, grads), (fused_logits, fused_grads) = outputs
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and any("layernorm" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_load_base_fuses_the_rms_norms():
    model, _ = load_base("tiny")
    assert not any(isinstance(m, Qwen2RMSNorm) for m in model.modules())
