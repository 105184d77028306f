"""blipfast.BlipVisDial (the BLIP paper's section 5.5 design, blipfast/models/blip_visdial.py) on synthetic dialogs:
the loss and every gradient against the design restated with BLIP's BERT passes (blipfast/bench/
blip_vqa_baseline.py: the caption through the text-only encoder, image + caption states repeated per candidate,
each candidate's pass projecting them to K/V itself), float64 to rounding; a tiny model fit to a few rounds ranks
their ground-truth answers first (VisDial metrics); the dialog text; loading a pre-training checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blipfast.bench.blip_pretrain_baseline import vit_forward
from blipfast.bench.blip_vqa_baseline import bert_forward
from blipfast.evaluation.visdial import visdial_metrics
from blipfast.models.blip_pretrain import BlipPretrain
from blipfast.models.blip_visdial import BlipVisDial, BlipVisDialConfig, dialog_text
from tests.helpers.blip_pretrain import ENC, tiny_config
from tests.helpers.blip_tasks import SIZE, text_vision, check_losses_and_grads, tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

F64 = torch.float64


def _config(**kw):
    t, v = text_vision(vision={"hidden_size": 32})
    return BlipVisDialConfig(text=t, vision=v, enc_token_id=ENC, bos_token_id=58, drop_path_rate=0.0, **kw)


def _batch(b=2, c=5):
    px = torch.randn(b, 3, SIZE, SIZE)
    cap, cap_mask = tokens(b, 6, [6, 4][:b])
    ids, mask = tokens(b * c, 9, [9, 5, 7, 8, 6, 9, 4, 7, 9, 5][:b * c])
    labels = torch.zeros(b, c, dtype=torch.long)
    labels[:, 1] = 1
    return px, cap, cap_mask, ids.view(b, c, -1), mask.view(b, c, -1), labels


def _restated(model, px, cap, cap_mask, ids, mask, labels):
    b, c, t = ids.shape
    image = vit_forward(model.vision_model, px)
    caption = bert_forward(model.text_encoder, cap, cap_mask)
    ctx = torch.cat([image, caption], 1)
    ctx_mask = torch.cat([torch.ones(image.shape[:2], dtype=torch.long), cap_mask], 1)
    rows = torch.arange(b).repeat_interleave(c)
    d = ids.reshape(b * c, t).clone()
    d[:, 0] = model.config.enc_token_id
    h = bert_forward(model.text_encoder, d, mask.reshape(b * c, t), [ctx[rows]], [ctx_mask[rows]])
    logits = model.itm_head(h[:, 0])
    return F.cross_entropy(logits, labels.flatten())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_loss_and_gradients_match_the_restated_design(dtype):
    px, cap, cap_mask, ids, mask, labels = _batch()
    model = BlipVisDial(_config()).train()
    runs = []
    for m, fn, dt in ((copy.deepcopy(model).to(dtype), "fast", dtype), (copy.deepcopy(model).double(), "ref", F64),
                      (copy.deepcopy(model).to(dtype), "low", dtype)):
        x = px.clone().to(dt).requires_grad_()
        loss = m(x, cap, cap_mask, ids, mask, labels).loss if fn == "fast" else \
            _restated(m, x, cap, cap_mask, ids, mask, labels)
        loss.backward()
        g = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
        g["pixel_values"] = x.grad
        runs.append((loss.detach(), g))
    (fl, fg), (rl, rg), (ll, lg) = runs
    check_losses_and_grads(fl, fg, rl, rg, ll, lg, dtype)


def test_a_fitted_model_ranks_the_ground_truth_first():
    torch.manual_seed(0)
    px, cap, cap_mask, ids, mask, labels = _batch(2, 8 // 2 * 2)
    model = BlipVisDial(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(px, cap, cap_mask, ids, mask, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(px, cap, cap_mask, ids, mask).scores
    m = visdial_metrics({r: scores[r].tolist() for r in range(2)}, {r: 1 for r in range(2)})
    assert m["r@1"] == 100.0 and m["mrr"] == 100.0
    # the context K/V is projected once per round and shared by its candidates
    with torch.no_grad():
        kv = model.context_kv(px, cap, cap_mask)
        one = model.score(kv, ids[1], mask[1], torch.ones(ids.shape[1], dtype=torch.long)).scores
    torch.testing.assert_close(one, scores[1])


def test_dialog_text_and_checks():
    assert dialog_text([("is it red", "yes"), ("big", "no")], "what shape", "a circle") == \
        "is it red yes big no [SEP] what shape [SEP] a circle"
    assert dialog_text([], "what shape", "a circle") == "what shape [SEP] a circle"
    with pytest.raises(ValueError, match="vision width"):
        BlipVisDialConfig(text=text_vision()[0], vision=text_vision()[1], enc_token_id=ENC, bos_token_id=58)
    model = BlipVisDial(_config())
    px, cap, cap_mask, ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="dialog_ids"):
        model(px, cap, cap_mask, ids[0], mask[0])
    with pytest.raises(ValueError, match="labels"):
        model(px, cap, cap_mask, ids, mask, labels.float())


def test_loads_a_pretraining_checkpoint():
    pre = BlipPretrain(tiny_config(vision={"hidden_size": 32}))
    model = BlipVisDial(_config())
    rep = model.load_lavis_state_dict(pre.to_lavis_state_dict())
    assert rep.initialised == [] and any(k.startswith("text_decoder.") for k in rep.left_out)
    assert torch.equal(model.itm_head.weight, pre.itm_head.weight)
    assert torch.equal(model.text_encoder.encoder.layer[1].crossattention.self.key.weight,
                       pre.text_encoder.encoder.layer[1].crossattention.self.key.weight)
