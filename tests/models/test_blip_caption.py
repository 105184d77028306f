"""blipfast.BlipCaptioner against Salesforce BLIP's ``BLIP_Decoder``: the loss and every gradient against its forward
restated in plain PyTorch (tests/helpers/blip_finetune.py: the BERT decoder pass with its own image K/V per layer,
the LM head tied to the word embeddings, ``CrossEntropyLoss(label_smoothing=0.1)`` over the targets without [PAD]
and the prompt), float64 to rounding and float32 within PyTorch's own error; generation against transformers'
``BlipForConditionalGeneration.generate`` (BLIP's generate: [DEC] first, the prompt's [SEP] dropped, [SEP] ends,
lengths counting the prompt) on the same weights; the checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch

from blipfast.models.blip_caption import BlipCaptionConfig, BlipCaptioner
from tests.helpers.blip_finetune import TEXT, VISION, blip_caption_loss, caption_config, jitter_
from tests.helpers.blip_pretrain import CLS, DEC, SEP, make_batch
from tests.helpers.tolerance import assert_within_torch_error

F64 = torch.float64


def _loss_and_grads(model, fn, px, ids, mask, dtype):
    x = px.clone().to(dtype).requires_grad_()
    loss = fn(model, x, ids, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["pixel_values"] = x.grad
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _fast(m, x, ids, mask):
    return m(x, ids, mask).loss


def _batch():
    px, ids, mask = make_batch(4, 9, pad_rows=(1, 3))
    ids[2, 7:] = 0  # a caption that ends early: padding beyond its [SEP]
    mask[2, 7:] = 0
    return px, ids, mask


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_loss_and_gradients_equal_blips_float64(prompt_length):
    torch.manual_seed(21)
    model = jitter_(BlipCaptioner(caption_config(prompt_length=prompt_length)).double().train())
    px, ids, mask = _batch()
    fl, fg = _loss_and_grads(copy.deepcopy(model), _fast, px, ids, mask, F64)
    bl, bg = _loss_and_grads(copy.deepcopy(model), blip_caption_loss, px, ids, mask, F64)
    torch.testing.assert_close(fl, bl, rtol=1e-12, atol=1e-12)
    assert fg.keys() == bg.keys()
    assert "text_decoder.cls.predictions.decoder.weight" not in fg  # one parameter with the word embeddings
    scale = max(g.abs().max().item() for g in bg.values())
    for n in bg:
        err = (fg[n] - bg[n]).abs().max().item()
        assert err <= 1e-11 * scale, f"d {n}: {err:.3e} (scale {scale:.3e})"


def test_loss_and_gradients_float32():
    torch.manual_seed(22)
    model = jitter_(BlipCaptioner(caption_config()).double().train())
    px, ids, mask = _batch()
    runs = {tag: _loss_and_grads(copy.deepcopy(model).to(dt), fn, px, ids, mask, dt)
            for tag, fn, dt in (("fast", _fast, torch.float32), ("base32", blip_caption_loss, torch.float32),
                                ("ref", blip_caption_loss, F64))}
    (fl, fg), (ll, lg), (rl, rg) = runs["fast"], runs["base32"], runs["ref"]
    assert_within_torch_error(fl.reshape(1), rl.reshape(1), ll.reshape(1), dtype=torch.float32, name="loss")
    names = sorted(rg)
    cat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    assert_within_torch_error(cat(fg), cat(rg), cat(lg), dtype=torch.float32, name="all gradients", factor=4.0)


def _hf_twin(model):
    from transformers import BlipConfig, BlipForConditionalGeneration

    cfg = BlipConfig(text_config=model.config.text.to_dict(), vision_config=model.config.vision.to_dict())
    hf = BlipForConditionalGeneration(cfg).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf


@pytest.mark.hf
@pytest.mark.parametrize("num_beams,min_length", [(3, 6), (1, 4)])
def test_generation_is_transformers_blip_generate(num_beams, min_length):
    """Beam search (3 beams, max 9, min 6 tokens with the prompt) and greedy: the tokens of HF's
    BlipForConditionalGeneration.generate on the same weights, the prompt counted in the lengths."""
    torch.manual_seed(23)
    model = jitter_(BlipCaptioner(caption_config()), 0.3).eval()
    hf = _hf_twin(model)
    px = torch.randn(3, 3, 16, 16)
    prompt = torch.tensor([[CLS, 5, 7, SEP]]).expand(3, -1).clone()
    kw = dict(num_beams=num_beams, max_length=9, min_length=min_length, repetition_penalty=1.0)
    want = hf.generate(pixel_values=px, input_ids=prompt.clone(), **kw)
    got = model.generate(px, torch.tensor([DEC, 5, 7]), **kw)
    assert torch.equal(got, want)
    assert got.shape[1] <= 9 and (got[:, :3] == torch.tensor([DEC, 5, 7])).all()
    ended = [(row == SEP).nonzero() for row in got]
    assert all(e.numel() == 0 or e[0, 0] + 1 >= min_length for e in ended)


def test_caption_strings_cut_the_prompt_and_sampling_draws_from_torch():
    from blipfast.testing.blip import tokenizer

    tok = tokenizer(["a red circle", "a blue square on a white background"])
    torch.manual_seed(24)
    cfg = caption_config(text={"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                               "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id,
                               "pad_token_id": tok.pad_token_id},
                         bos_token_id=tok.bos_token_id, max_length=12, min_length=5)
    model = jitter_(BlipCaptioner(cfg), 0.3)
    px = torch.randn(2, 3, 16, 16)
    caps = model.caption(px, tok, prompt="a picture of ")
    ids = model.generate(px, torch.tensor([tok.bos_token_id] + tok("a picture of ")["input_ids"][1:-1]))
    full = tok.batch_decode(ids, skip_special_tokens=True)
    assert caps == [f[len("a picture of "):] for f in full] and all(f.startswith("a picture of") for f in full)
    torch.manual_seed(1)
    a = model.caption(px, tok, sample=True)
    torch.manual_seed(1)
    assert model.caption(px, tok, sample=True) == a


def test_checkpoints_salesforce_pretraining_and_hf():
    """Salesforce names round trip; a pre-training checkpoint (224 px, the LM head's own weight as BLIP before
    073b821 left it) initialises the 384-px-style captioner as BLIP's loader does: the head's weight for the tied
    pair, the position embeddings interpolated, the encoder / momentum / heads / queues unused."""
    from blipfast.models.blip_pretrain import BlipPretrain
    from tests.helpers.blip_pretrain import tiny_config

    torch.manual_seed(25)
    model = jitter_(BlipCaptioner(caption_config()))
    sd = model.to_lavis_state_dict()
    assert torch.equal(sd["text_decoder.cls.predictions.decoder.weight"],
                       sd["text_decoder.bert.embeddings.word_embeddings.weight"])
    back = BlipCaptioner.from_lavis({"model": sd}, caption_config())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    pre = jitter_(BlipPretrain(tiny_config()))
    psd = pre.to_lavis_state_dict()
    head = torch.randn_like(psd["text_decoder.cls.predictions.decoder.weight"])
    psd["text_decoder.cls.predictions.decoder.weight"] = head
    cap = BlipCaptioner(caption_config(vision={"image_size": 32}))
    notes = cap.load_lavis_state_dict(psd)
    assert torch.equal(cap.text_decoder.bert.embeddings.word_embeddings.weight, head)
    assert any("replaced" in n for n in notes) and any("unused" in n for n in notes)
    assert any("position embedding" in n for n in notes)
    assert cap.vision_model.embeddings.position_embedding.shape[1] == 17
    with pytest.raises(ValueError, match="lacks"):
        cap.load_lavis_state_dict({k: v for k, v in psd.items() if not k.startswith("text_decoder.cls")})


@pytest.mark.hf
def test_from_hf_keeps_the_weights():
    torch.manual_seed(26)
    model = jitter_(BlipCaptioner(caption_config()))
    hf = _hf_twin(model)
    twin = BlipCaptioner.from_hf(hf, caption_config())
    for k, v in model.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    auto = BlipCaptioner.from_hf(hf)
    assert auto.config.bos_token_id == TEXT["bos_token_id"] and auto.config.vision.image_size == VISION["image_size"]


def test_config_and_argument_errors():
    cfg = caption_config()
    assert BlipCaptionConfig(**cfg.to_dict()) == cfg
    d = BlipCaptionConfig()
    assert (d.vision.image_size, d.num_beams, d.max_length, d.min_length, d.top_p, d.prompt_length) == \
        (384, 3, 20, 5, 0.9, 4)
    with pytest.raises(ValueError, match="min_length"):
        caption_config(min_length=10, max_length=9)
    with pytest.raises(ValueError, match="top_p"):
        caption_config(top_p=1.5)
    model = BlipCaptioner(caption_config())
    px, ids, mask = make_batch(2, 5)
    with pytest.raises(ValueError, match="input_ids"):
        model(px, ids[:1], mask)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(px, torch.tensor([DEC]), max_length=100)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(px, torch.tensor([[DEC]] * 3))
