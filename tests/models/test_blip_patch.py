"""apply_blipfast_to_blip: HF's BLIP (v1) models keep their scores, losses, gradients, generated tokens, parameters
and optimizer after the swap of their text encoder / decoder.

Outputs and gradients of the patched fp32 model are held to the float64 model (a cast copy) with the unpatched
fp32 model's error as the yardstick (tests/helpers/tolerance.py: assert_within_torch_error). Generated tokens are
compared in fp64: a random tiny model can have two next-token scores within fp32 rounding of each other,
where a legitimate 1-ulp difference would flip the argmax; in fp64 such a tie is
out of reach, so identical tokens are a sharp test of the decoding path (cache, beams, reordering, masks).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

import blipfast
from blipfast.patch import apply_blipfast_to_blip, revert_blipfast
from tests.helpers.qformer import _randomize, _seed_of
from tests.helpers.tolerance import assert_grads_within_torch_error, assert_within_torch_error

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

VOCAB = 60
BOS, EOS, SEP, PAD = 1, 2, 3, 0


def _config(label_smoothing: float = 0.0) -> BlipConfig:
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS, sep_token_id=SEP, pad_token_id=PAD,
                label_smoothing=label_smoothing)
    # text and vision widths are equal, as in every BLIP: the VQA decoder cross-attends to the question encoder
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def _model(cls, *, dtype=torch.float32, **cfg):
    torch.manual_seed(_seed_of(cls.__name__, dtype))
    model = cls(_config(**cfg)).to(dtype).eval()
    _randomize(model, torch.Generator().manual_seed(_seed_of(cls.__name__, "w")), all_weights=True)
    return model


def _text(bsz: int, t: int, padded: bool = True):
    ids = torch.randint(4, VOCAB, (bsz, t))
    ids[:, 0] = 101 % VOCAB
    mask = torch.ones(bsz, t, dtype=torch.long)
    if padded:
        lengths = torch.randint(2, t + 1, (bsz,))
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def _swap_and_check_sharing(model):
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    apply_blipfast_to_blip(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    for n in ("text_encoder", "text_decoder"):
        if hasattr(model, n):
            assert type(getattr(model, n)).__module__ == "blipfast.models.blip", n


def _check_patched_training(model, step):
    """``step(m, dtype)`` -> ({name: output}, {name: grad}) of model ``m`` on inputs in ``dtype``. The patched fp32
    model against a float64 copy, the unpatched fp32 model's error as the yardstick, every output and gradient."""
    ref64, g_ref64 = step(copy.deepcopy(model).double(), torch.float64)
    ref, g_ref = step(model, torch.float32)
    _swap_and_check_sharing(model)
    got, g_got = step(model, torch.float32)
    for name in ref:
        assert_within_torch_error(got[name], ref64[name], ref[name], name=name)
    assert_grads_within_torch_error(g_got, g_ref64, g_ref)


def test_retrieval_itm_and_itc_scores_unchanged():
    model = _model(BlipForImageTextRetrieval)
    pixels = torch.randn(3, 3, 32, 32)
    ids, mask = _text(3, 7)
    model64 = copy.deepcopy(model).double()

    def scores(m, x):
        with torch.no_grad():
            return [m(ids, x, use_itm_head=itm, attention_mask=mask).itm_score for itm in (True, False)]

    hf, ref64 = scores(model, pixels), scores(model64, pixels.double())
    _swap_and_check_sharing(model)
    assert apply_blipfast_to_blip(model) is model  # a second call is a no-op
    for name, f, r, lo in zip(("itm", "itc"), scores(model, pixels), ref64, hf):
        assert_within_torch_error(f, r, lo, name=name)
    revert_blipfast(model)
    assert type(model.text_encoder).__module__.startswith("transformers")
    with pytest.raises(ValueError, match="not patched"):
        revert_blipfast(model)


def test_captioning_loss_gradients_and_optimizer():
    """An optimizer created before the swap updates the parameters the patched model uses; the label-smoothed
    LM loss, the logits and every gradient are within the unpatched model's error; the training flag carries over."""
    model = _model(BlipForConditionalGeneration, label_smoothing=0.1)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _text(2, 8)
    ids[:, 0] = BOS
    labels = ids.masked_fill(mask == 0, -100)

    def step(m, dtype):
        m.zero_grad(set_to_none=True)
        out = m(pixels.to(dtype), input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return {"loss": out.loss.detach(), "logits": out.logits.detach()}, grads

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _check_patched_training(model, step)
    w = model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight
    before = w.clone()
    opt.step()
    assert not torch.equal(before, w)
    model.train()
    assert model.text_decoder.training and model.text_decoder.bert.training
    revert_blipfast(model)
    assert model.text_decoder.training


GENERATE = {
    "greedy": dict(max_length=12, min_length=4),  # min_length: a random model may end at once otherwise
    "beam": dict(num_beams=3, max_length=12, min_length=5),
    "beam-2-returned": dict(num_beams=3, num_return_sequences=2, max_length=10, length_penalty=0.5),
    "nucleus": dict(do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=12, min_length=4),
}


@pytest.mark.parametrize("how", list(GENERATE))
def test_captions_identical(how):
    model = _model(BlipForConditionalGeneration, dtype=torch.float64)
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    prompt = torch.tensor([[BOS, 7, 9, SEP]]).repeat(3, 1)  # "a picture of" + [SEP], as HF's processor gives
    kw = GENERATE[how]

    def run():
        torch.manual_seed(0)
        return (model.generate(pixels, **kw), model.generate(pixels, input_ids=prompt.clone(), **kw))

    ref = run()
    apply_blipfast_to_blip(model)
    got = run()
    for a, b in zip(got, ref):
        assert a.tolist() == b.tolist(), how
    assert ref[0].shape[1] > 2


def test_vqa_loss_gradients_and_answers():
    model = _model(BlipForQuestionAnswering, label_smoothing=0.1)
    pixels = torch.randn(2, 3, 32, 32)
    q_ids, _ = _text(2, 6, padded=False)  # HF drops the question padding in the decoder's cross-attention
    answers, a_mask = _text(2, 4)
    answers[:, 0] = BOS

    def step(m, dtype):  # HF feeds the labels as decoder input ids too, so they hold [PAD], not -100
        m.zero_grad(set_to_none=True)
        out = m(q_ids, pixels.to(dtype), labels=answers, decoder_attention_mask=a_mask)
        out.loss.backward()
        return {"loss": out.loss.detach()}, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    _check_patched_training(model, step)


@pytest.mark.parametrize("how", ["greedy", "beam"])
def test_vqa_answers_identical(how):
    model = _model(BlipForQuestionAnswering, dtype=torch.float64)
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    q_ids, q_mask = _text(3, 7)  # padded questions: the encoder masks the padding in both
    ref = model.generate(q_ids, pixels, attention_mask=q_mask, **GENERATE[how])
    apply_blipfast_to_blip(model)
    got = model.generate(q_ids, pixels, attention_mask=q_mask, **GENERATE[how])
    assert got.tolist() == ref.tolist()


def test_rejects_models_without_text_modules():
    with pytest.raises(TypeError, match="text_encoder"):
        apply_blipfast_to_blip(torch.nn.Linear(2, 2))
    assert isinstance(blipfast.apply_blipfast_to_blip, type(apply_blipfast_to_blip))
