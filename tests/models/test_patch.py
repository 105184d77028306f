"""apply_blipfast_to_blip2: the HF models keep their outputs, parameters and optimizer after the swap."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

import blipfast
from blipfast.patch import apply_blipfast_to_blip2, revert_blipfast
from tests.helpers.tolerance import assert_grads_within_torch_error, assert_within_torch_error

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported


def _config():
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 encoder_hidden_size=32, vocab_size=99, use_qformer_text_input=True)
    text = OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                     word_embed_proj_dim=32, max_position_embeddings=64)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=4, image_text_hidden_size=16)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def test_retrieval_model_outputs_unchanged_and_params_shared():
    """The patched model's ITM and ITC logits are within HF's own fp32 error of the float64 model."""
    model = Blip2ForImageTextRetrieval(_config()).eval()
    _perturb(model)
    model64 = copy.deepcopy(model).double()
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.randint(1, 99, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0

    def logits(m, x):
        with torch.no_grad():
            return [m(x, ids, mask, use_image_text_matching_head=itm).logits_per_image for itm in (True, False)]

    hf, ref64 = logits(model, pixels), logits(model64, pixels.double())
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    apply_blipfast_to_blip2(model)
    assert isinstance(model.qformer, blipfast.QFormer)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    for name, f, r, lo in zip(("ITM logits", "ITC logits"), logits(model, pixels), ref64, hf):
        assert_within_torch_error(f, r, lo, name=name)
    revert_blipfast(model)
    assert not isinstance(model.qformer, blipfast.QFormer)
    with pytest.raises(ValueError, match="not patched"):
        revert_blipfast(model)


def test_conditional_generation_trains_through_the_patch():
    """An optimizer created before the swap updates the parameters the patched model uses; the loss and
    every gradient are within the unpatched fp32 model's error of the float64 model; the training flag
    carries over."""
    cfg = _config()
    cfg.image_token_index = 98  # transformers 5.x: the prompt carries one image token per query
    model = Blip2ForConditionalGeneration(cfg).eval()  # eval: no dropout, so the two passes are comparable
    _perturb(model)
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    model64 = copy.deepcopy(model).double()
    pixels = torch.randn(2, 3, 16, 16)
    text = torch.randint(3, 98, (2, 6))
    ids = torch.cat([torch.full((2, 4), 98), text], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), text], dim=1)

    def step(m, x):
        m.zero_grad(set_to_none=True)
        out = m(pixel_values=x, input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss64, grads64 = step(model64, pixels.double())
    loss_hf, grads_hf = step(model, pixels)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    apply_blipfast_to_blip2(model)
    loss_bf, grads_bf = step(model, pixels)
    assert_within_torch_error(loss_bf, loss64, loss_hf, name="loss")
    assert_grads_within_torch_error(grads_bf, grads64, grads_hf)
    before = model.qformer.encoder.layer[0].attention.attention.query.weight.clone()
    opt.step()
    assert not torch.equal(before, model.qformer.encoder.layer[0].attention.attention.query.weight)
    model.train()
    assert model.qformer.training
    revert_blipfast(model)
    assert model.qformer.training and not isinstance(model.qformer, blipfast.QFormer)


def test_rejects_models_without_qformer():
    with pytest.raises(TypeError, match="qformer"):
        apply_blipfast_to_blip2(torch.nn.Linear(2, 2))
