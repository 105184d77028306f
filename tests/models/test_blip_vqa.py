"""blipfast.BlipVQA against Salesforce BLIP's ``BLIP_VQA`` restated in plain PyTorch (blipfast/bench/
blip_vqa_baseline.py: BERT passes with -10000 masks, the question states repeated per answer by a loop over ``n``,
``rank_answer`` with ``tile`` and its boolean index).

Training loss and every gradient (parameters and pixels) on deep copies of one tiny random model: float64 to
float64 rounding, float32 within PyTorch's own float32 error; answers given flat with their question index or in
fixed slots with unused ones. Rank inference chooses BLIP's answers (and the same top-k candidates, with the
same summed losses); generation is transformers' beam search over BLIP's decoder; checkpoints load from
Salesforce BLIP VQA and pre-training state dicts (the position embeddings interpolated) and from HF's
``BlipForQuestionAnswering``."""
from __future__ import annotations

import copy

import pytest
import torch

from blipfast.bench.blip_vqa_baseline import blip_rank_answer, blip_vqa_loss, blip_vqa_rank
from blipfast.models.blip_finetune import interpolate_pos_embed
from blipfast.models.blip_pretrain import BlipPretrain
from blipfast.models.blip_vqa import BlipVQA
from tests.helpers.blip_pretrain import tiny_config
from tests.helpers.blip_tasks import SIZE, check_losses_and_grads, tokens, vqa_config
from tests.helpers.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

F64 = torch.float64


def _batch(b=3, n=(2, 1, 3)):
    px = torch.randn(b, 3, SIZE, SIZE)
    q, qm = tokens(b, 7, [7, 4, 6][:b])
    a, am = tokens(sum(n), 5, [5, 3, 4, 5, 2, 3][:sum(n)])
    w = torch.rand(sum(n))
    index = torch.tensor([i for i, k in enumerate(n) for _ in range(k)])
    return px, q, qm, a, am, w, index, list(n)


def _grads(model, x):
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    g["pixel_values"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return g


def _run(model, fn, px, dtype):
    x = px.clone().to(dtype).requires_grad_()
    loss = fn(model, x)
    loss.backward()
    return loss.detach(), _grads(model, x)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_loss_and_gradients_match_blip(dtype):
    px, q, qm, a, am, w, index, n = _batch()
    model = BlipVQA(vqa_config()).train()
    fast, ref, low = copy.deepcopy(model).to(dtype), copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    fl, fg = _run(fast, lambda m, x: m(x, q, qm, a, am, w.to(dtype), index).loss, px, dtype)
    rl, rg = _run(ref, lambda m, x: blip_vqa_loss(m, x, q, qm, a, am, w.double(), n), px, F64)
    ll, lg = _run(low, lambda m, x: blip_vqa_loss(m, x, q, qm, a, am, w.to(dtype), n), px, dtype)
    assert set(fg) == set(rg) and len(rg) > 40
    check_losses_and_grads(fl, fg, rl, rg, ll, lg, dtype)


def test_answer_slots_equal_flat_answers():
    """[B, A, Ta] slots with unused ones (weight 0, nothing after the first token) give the flat answers' loss and
    gradients."""
    px, q, qm, a, am, w, index, n = _batch()
    model = BlipVQA(vqa_config()).double().train()
    flat_l, flat_g = _run(model, lambda m, x: m(x, q, qm, a, am, w.double(), index).loss, px, F64)
    slots, ta = 3, a.shape[1]
    sa = torch.zeros(3, slots, ta, dtype=torch.long)
    sm = torch.zeros(3, slots, ta, dtype=torch.long)
    sw = torch.zeros(3, slots, dtype=F64)
    sa[..., 0], sm[..., 0] = 1, 1
    pos = [0, 0, 0]
    for r, qi in enumerate(index.tolist()):
        sa[qi, pos[qi]], sm[qi, pos[qi]], sw[qi, pos[qi]] = a[r], am[r], w[r]
        pos[qi] += 1
    slot_l, slot_g = _run(model, lambda m, x: m(x, q, qm, sa, sm, sw).loss, px, F64)
    check_losses_and_grads(slot_l, slot_g, flat_l, flat_g, flat_l, flat_g, F64)


def _answer_list(c=11, ta=5):
    lengths = [3, 5, 4, 3, 2, 5, 4, 3, 5, 4, 3][:c]
    return tokens(c, ta, lengths)


@pytest.mark.parametrize("k", [1, 4, 11])
def test_rank_answers_choose_blips_answer(k):
    px, q, qm, *_ = _batch()
    model = BlipVQA(vqa_config()).double().eval()
    with torch.no_grad():  # sharper weights: the candidates' losses differ clearly
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    ans, ans_mask = _answer_list()
    ref_ids, ref_top, ref_lp = blip_vqa_rank(model, px.double(), q, qm, ans, ans_mask, k)
    states = model.question_states(model.image_embeds(px.double()), q, qm)
    ids, top, loss = model.rank_answers(states, qm, ans, ans_mask, k)
    assert torch.equal(top, ref_top)
    assert_close(-loss, ref_lp, name="summed log-probabilities")
    assert torch.equal(ids, ref_ids)
    # the restated rank_answer over the same question states agrees too
    assert torch.equal(blip_rank_answer(model, states, qm, ans, ans_mask, k)[0], ids)


def test_rank_answers_float32_agrees_with_float64():
    px, q, qm, *_ = _batch()
    model = BlipVQA(vqa_config()).eval()
    ans, ans_mask = _answer_list()
    s32 = model.question_states(model.image_embeds(px), q, qm)
    _, top32, loss32 = model.rank_answers(s32, qm, ans, ans_mask, 4)
    m64 = copy.deepcopy(model).double()
    s64 = m64.question_states(m64.image_embeds(px.double()), q, qm)
    _, top64, loss64 = m64.rank_answers(s64, qm, ans, ans_mask, 4)
    assert torch.equal(top32, top64)
    assert_close(loss32.double(), loss64, dtype=torch.float32, name="losses")


def test_generate_answers_is_blips_beam_search():
    """Beam 3, at most 10 tokens, [DEC] first; every question position attended (BLIP's ones mask): the same
    sequences as transformers' own BlipTextLMHeadModel with these weights."""
    from transformers import BlipTextLMHeadModel as HFDecoder

    px, q, qm, *_ = _batch()
    model = BlipVQA(vqa_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    states = model.question_states(model.image_embeds(px), q, qm)
    out = model.generate_answers(states)
    assert out.shape[0] == 3 and out.shape[1] <= 10 and (out[:, 0] == model.config.bos_token_id).all()
    hf = HFDecoder(model.text_decoder.config).eval()
    hf.load_state_dict(model.text_decoder.state_dict(), strict=False)
    ref = hf.generate(input_ids=out[:, :1], encoder_hidden_states=states,
                      encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long), num_beams=3,
                      max_length=10, min_length=1, eos_token_id=model.config.text.sep_token_id,
                      pad_token_id=model.config.text.pad_token_id)
    assert torch.equal(out, ref)


def test_loads_salesforce_vqa_and_pretraining_checkpoints():
    model = BlipVQA(vqa_config(vision={"image_size": 2 * SIZE}))
    # a VQA checkpoint under Salesforce names round-trips exactly
    sd = model.to_lavis_state_dict()
    assert any(k.startswith("visual_encoder.") for k in sd) and "text_decoder.cls.predictions.bias" in sd
    other = BlipVQA(vqa_config(vision={"image_size": 2 * SIZE}))
    rep = other.load_lavis_state_dict(sd)
    assert rep.initialised == [] and rep.left_out == []
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    # a pre-training checkpoint (224 px there, 16 px here) initialises it: pos_embed interpolated, extras left out
    pre = BlipPretrain(tiny_config())
    psd = pre.to_lavis_state_dict()
    # BLIP's checkpoints hold one tensor for the decoder's word embeddings and its LM head (tied)
    psd["text_decoder.cls.predictions.decoder.weight"] = psd["text_decoder.bert.embeddings.word_embeddings.weight"]
    rep = other.load_lavis_state_dict(psd)
    # the pre-training decoder cross-attends at the vision width (24 here, as ViT-L's 1024), the VQA decoder at the
    # text width: BLIP drops those K/V weights and they keep their initialisation
    kv = [f"text_decoder.bert.encoder.layer.{i}.crossattention.self.{n}.weight" for i in (0, 1) for n in ("key", "value")]
    assert rep.initialised == sorted(kv)
    assert all(any(x.startswith(k + " [32, 24]") for x in rep.left_out) for k in kv)
    assert any(k.startswith("text_encoder_m.") for k in rep.left_out) and "temp" in rep.left_out
    pe = pre.vision_model.embeddings.position_embedding
    assert torch.equal(other.vision_model.embeddings.position_embedding, interpolate_pos_embed(pe.detach(), 16))
    assert torch.equal(other.text_decoder.bert.encoder.layer[1].crossattention.self.query.weight,
                       pre.text_decoder.bert.encoder.layer[1].crossattention.self.query.weight)
    with pytest.raises(ValueError, match="do not map"):
        other.load_lavis_state_dict({**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks"):
        other.load_lavis_state_dict({k: v for k, v in sd.items() if not k.startswith("text_decoder.cls")})


def test_interpolate_pos_embed_is_blips():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pe, 24 * 24)
    grid = pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    assert torch.equal(out, torch.cat([pe[:, :1], ref.permute(0, 2, 3, 1).flatten(1, 2)], 1))
    assert interpolate_pos_embed(pe, 14 * 14) is pe
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pe, 10)


def test_from_hf_blip_for_question_answering():
    from transformers import BlipConfig, BlipForQuestionAnswering

    cfg = vqa_config()
    text = {k: getattr(cfg.text, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "max_position_embeddings", "pad_token_id",
                                              "bos_token_id", "sep_token_id", "eos_token_id")}
    vis = {k: getattr(cfg.vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "image_size", "patch_size")}
    hf = BlipForQuestionAnswering(BlipConfig(text_config={**text, "encoder_hidden_size": 24},
                                             vision_config=vis)).eval()
    with pytest.raises(ValueError, match="another shape"):  # HF's decoder cross-attends at the vision width
        BlipVQA.from_hf(hf, enc_token_id=cfg.enc_token_id)
    hf = BlipForQuestionAnswering(BlipConfig(text_config={**text, "encoder_hidden_size": 32},
                                             vision_config={**vis, "hidden_size": 32})).eval()
    model = BlipVQA.from_hf(hf, enc_token_id=cfg.enc_token_id)
    for k, v in hf.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_bad_inputs_name_the_argument():
    px, q, qm, a, am, w, index, n = _batch()
    model = BlipVQA(vqa_config())
    with pytest.raises(ValueError, match="pixel_values"):
        model(px[:, :, :8], q, qm, a, am, w, index)
    with pytest.raises(ValueError, match="answer_index"):
        model(px, q, qm, a, am, w)
    with pytest.raises(ValueError, match="answer_weight"):
        model(px, q, qm, a, am, w[:2], index)
    with pytest.raises(ValueError, match="attention_mask"):
        model(px, q, qm[:, :3], a, am, w, index)
    with pytest.raises(ValueError, match="pixel_values or image_embeds"):
        model(None, q, qm, a, am, w, index)
    with pytest.raises(ValueError, match="k must be"):
        model.rank_answers(torch.zeros(3, 7, 32), qm, a, am, k=0)
