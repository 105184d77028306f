"""InstructBLIP: blipfast's InstructBlipQFormer against HF's InstructBlipQFormerModel (outputs, gradients, keys,
shared parameters) and HF InstructBlipForConditionalGeneration's generated tokens before and after the swap."""
from __future__ import annotations

import copy

import pytest
import torch

import blipfast
from blipfast.models.blip2_stage2 import Blip2Stage2
from blipfast.testing import blip2 as T
from tests.helpers.tolerance import assert_grads_within_torch_error, assert_within_torch_error

pytestmark = pytest.mark.hf  # compares with transformers' own models: CI also runs it on the lowest supported

Q = T.NUM_QUERY


def _hf_qformer():
    from transformers import InstructBlipQFormerModel

    qcfg = T.configs("opt", instruct=True)[1]
    return T.sharpen(InstructBlipQFormerModel(qcfg), 1.0).eval()


def _instruction(bsz, width):
    ids = torch.randint(5, len(T.VOCAB), (bsz, width))
    mask = torch.ones_like(ids)
    ids[-1, width - 3:], mask[-1, width - 3:] = T.PAD, 0  # one padded instruction
    return ids, mask


@pytest.mark.parametrize("inputs", ["queries+instruction", "queries", "instruction"])
def test_qformer_matches_hf_outputs_and_gradients(inputs):
    hf = _hf_qformer()
    bf = blipfast.InstructBlipQFormer.from_hf(hf).eval()
    assert list(bf.state_dict()) == list(hf.state_dict())
    ref64 = copy.deepcopy(hf).double()
    bsz, width = 3, 7
    ids, mask = _instruction(bsz, width)
    queries = torch.randn(bsz, Q, 32)
    image = torch.randn(bsz, 9, 24)
    kw = {"input_ids": None}
    if inputs != "instruction":
        kw.update(query_embeds=queries, encoder_hidden_states=image)
    if inputs != "queries":
        kw["input_ids"] = ids
        with_queries = torch.cat([torch.ones(bsz, Q, dtype=torch.long), mask], 1)
        kw["attention_mask"] = with_queries if "queries" in inputs else mask
    kw64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in kw.items()}
    outs = [m(**(kw64 if m is ref64 else kw)).last_hidden_state for m in (ref64, hf, bf)]
    weight = torch.randn_like(outs[1])
    if "attention_mask" in kw:  # padded rows are not compared (HF's additive mask vs blipfast's true mask agree there)
        weight = weight * kw["attention_mask"][..., None]
    for o in outs:
        (o * weight.to(o.dtype)).sum().backward()
    kept = [(o * (weight != 0)).detach() for o in outs]
    assert_within_torch_error(kept[2], kept[0], kept[1])
    g64, g32 = dict(ref64.named_parameters()), dict(hf.named_parameters())
    graded = [(n, p) for n, p in bf.named_parameters() if g32[n].grad is not None]
    assert len(graded) > 10
    assert_grads_within_torch_error({n: p.grad for n, p in graded}, {n: g64[n].grad for n, _ in graded},
                                    {n: g32[n].grad for n, _ in graded})


def test_patch_shares_parameters_and_reverts():
    from transformers import InstructBlipQFormerModel

    model = T.blip2("opt", instruct=True)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    blipfast.apply_blipfast_to_blip2(model)
    assert isinstance(model.qformer, blipfast.InstructBlipQFormer)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.qformer.qformer.layernorm.weight is params["qformer.embeddings.layernorm.weight"]
    model.train()
    assert model.qformer.qformer.training  # dropout follows the wrapper's mode
    blipfast.revert_blipfast(model)
    assert isinstance(model.qformer, InstructBlipQFormerModel) and model.qformer.training


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_after_swap_equals_hf(kind, beams):
    hf = T.blip2(kind, instruct=True)
    px = torch.randn(3, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    qids, qmask = _instruction(3, 6)
    prompt = torch.randint(5, len(T.VOCAB), (3, 4))
    ids = torch.cat([torch.full((3, Q), T.IMAGE), prompt], 1)
    kw = dict(qformer_input_ids=qids, qformer_attention_mask=qmask, max_new_tokens=8, num_beams=beams)
    scored = dict(output_scores=True, return_dict_in_generate=True)
    out = hf.generate(pixel_values=px, input_ids=ids, **kw, **scored)
    other = hf.generate(pixel_values=px, input_ids=ids, **dict(kw, qformer_input_ids=qids.flip(0)), **scored)
    # the instruction reaches the LLM through the Q-Former: the first step's scores move (a random tiny model may
    # still pick the same tokens for both instructions, so the tokens alone cannot show it)
    a, b = out.scores[0], other.scores[0]
    assert (a - b)[a.isfinite() & b.isfinite()].abs().max() > 1e-3  # (-inf: tokens masked by min_new_tokens)
    want = out.sequences
    blipfast.apply_blipfast_to_blip2(hf)
    assert torch.equal(hf.generate(pixel_values=px, input_ids=ids, **kw), want)
    stage2 = Blip2Stage2(hf).eval()
    assert stage2.is_instructblip
    new = want[:, ids.shape[1]:] if kind == "opt" else want
    assert torch.equal(stage2.generate(pixel_values=px, input_ids=prompt, **kw), new)
    with pytest.raises(ValueError, match="qformer_input_ids"):
        stage2.generate(pixel_values=px, input_ids=prompt, max_new_tokens=2)


def test_stage2_loss_equals_hf():
    hf = T.sharpen(T.blip2("opt", instruct=True), 1.0)
    reference = copy.deepcopy(hf)
    stage2 = Blip2Stage2(hf).eval()
    px = torch.randn(2, 3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    qids, qmask = _instruction(2, 5)
    text = torch.randint(5, len(T.VOCAB), (2, 6))
    ids = torch.cat([torch.full((2, Q), T.IMAGE), text], 1)
    with torch.no_grad():
        want = reference(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                         labels=torch.cat([torch.full((2, Q), -100), text], 1)).loss
        ref64 = copy.deepcopy(reference).double()(pixel_values=px.double(), qformer_input_ids=qids,
                                                  qformer_attention_mask=qmask, input_ids=ids,
                                                  labels=torch.cat([torch.full((2, Q), -100), text], 1)).loss
        got = stage2(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=text,
                     labels=text).loss
    assert_within_torch_error(got, ref64, want, name="loss")
    trainable = {n for n, _ in stage2.trainable_parameters()}
    assert "qformer.embeddings.word_embeddings.weight" in trainable
