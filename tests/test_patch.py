"""apply_blipfast_to_blip2: the HF models keep their outputs, parameters and optimizer after the swap."""
from __future__ import annotations

import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

import blipfast
from blipfast.patch import apply_blipfast_to_blip2, revert_blipfast
from tests.conftest import assert_close


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
    model = Blip2ForImageTextRetrieval(_config()).eval()
    _perturb(model)
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.randint(1, 99, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with torch.no_grad():
        itm = model(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image
        itc = model(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    apply_blipfast_to_blip2(model)
    assert isinstance(model.qformer, blipfast.QFormer)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert_close(model(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image, itm, scale=10)
        assert_close(model(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image, itc, scale=10)
    revert_blipfast(model)
    assert not isinstance(model.qformer, blipfast.QFormer)
    with pytest.raises(ValueError, match="not patched"):
        revert_blipfast(model)


def test_conditional_generation_trains_through_the_patch():
    """An optimizer created before the swap updates the parameters the patched model uses; the loss and
    every gradient equal the unpatched model's; the training flag carries over."""
    cfg = _config()
    cfg.image_token_index = 98  # transformers 5.x: the prompt carries one image token per query
    model = Blip2ForConditionalGeneration(cfg).eval()  # eval: no dropout, so the two passes are comparable
    _perturb(model)
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    pixels = torch.randn(2, 3, 16, 16)
    text = torch.randint(3, 98, (2, 6))
    ids = torch.cat([torch.full((2, 4), 98), text], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), text], dim=1)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=pixels, input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_hf, grads_hf = step()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    apply_blipfast_to_blip2(model)
    loss_bf, grads_bf = step()
    assert_close(loss_bf, loss_hf, scale=10)
    assert grads_bf.keys() == grads_hf.keys()
    for n in grads_hf:
        assert_close(grads_bf[n], grads_hf[n], name=n, scale=10)
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
