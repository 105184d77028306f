"""blipfast.BlipNLVR against Salesforce BLIP's ``BLIP_NLVR`` (with nlvr_encoder.py) restated in plain PyTorch
(blipfast/bench/blip_vqa_baseline.py): the loss, the logits and every gradient, float64 to rounding and float32
within PyTorch's own error, on a tiny model whose first layer averages the twin outputs and whose second merges
them; the twin cross-attention's structure; the image pairs' K/V shared by ``kv_index``; loading BLIP's NLVR2
checkpoint and a pre-training checkpoint (its cross-attention copied into both branches, as BLIP's loader does)."""
from __future__ import annotations

import copy

import pytest
import torch

from blipfast.bench.blip_vqa_baseline import blip_nlvr_forward
from blipfast.models.blip_nlvr import BlipNLVR
from blipfast.models.blip_pretrain import BlipPretrain
from tests.helpers.blip_pretrain import tiny_config
from tests.helpers.blip_tasks import SIZE, check_losses_and_grads, nlvr_config, tokens
from tests.helpers.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

F64 = torch.float64


def _batch(b=3):
    px = torch.randn(b, 2, 3, SIZE, SIZE)
    ids, mask = tokens(b, 9, [9, 5, 7][:b])
    labels = torch.tensor([1, 0, 1][:b])
    return px, ids, mask, labels


def _run(model, fn, px, dtype):
    x = px.clone().to(dtype).requires_grad_()
    loss, logits = fn(model, x)
    loss.backward()
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    g["pixel_values"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach(), g


def _fast(m, x, ids, mask, labels):
    out = m(x, ids, mask, labels)
    return out.loss, out.logits


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_loss_logits_and_gradients_match_blip(dtype):
    px, ids, mask, labels = _batch()
    model = BlipNLVR(nlvr_config()).train()
    assert model.text_encoder.encoder.layer[0].crossattention.output.merge_layer is None
    assert model.text_encoder.encoder.layer[1].crossattention.output.merge_layer is not None
    fast, ref, low = copy.deepcopy(model).to(dtype), copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    fl, flog, fg = _run(fast, lambda m, x: _fast(m, x, ids, mask, labels), px, dtype)
    rl, rlog, rg = _run(ref, lambda m, x: blip_nlvr_forward(m, x, ids, mask, labels), px, F64)
    ll, llog, lg = _run(low, lambda m, x: blip_nlvr_forward(m, x, ids, mask, labels), px, dtype)
    assert len(rg) > 40 and all(fg[k].abs().sum() > 0 for k in fg if "merge_layer" in k or "dense1" in k)
    check_losses_and_grads(fl, fg, rl, rg, ll, lg, dtype)
    if dtype == F64:
        assert_close(flog, rlog, name="logits")


def test_twin_cross_attention_reads_each_image_with_its_own_branch():
    """With identical branches and averaging in every layer, swapping the two images changes nothing; with
    different branches it does; and a merge layer over [h0 | h1] that picks h0 makes image 1 irrelevant."""
    px, ids, mask, _ = _batch()
    model = BlipNLVR(nlvr_config(merge_from_layer=2)).double().eval()
    px = px.double()
    swapped = px.flip(1)
    with torch.no_grad():
        for layer in model.text_encoder.encoder.layer:
            ca = layer.crossattention
            ca.self1.load_state_dict(ca.self0.state_dict())
            ca.output.dense1.load_state_dict(ca.output.dense0.state_dict())
    assert_close(model(px, ids, mask).logits, model(swapped, ids, mask).logits, name="swapped, twins equal")
    with torch.no_grad():
        model.text_encoder.encoder.layer[1].crossattention.self1.key.weight.mul_(3.0)
    assert not torch.allclose(model(px, ids, mask).logits, model(swapped, ids, mask).logits)
    merged = BlipNLVR(nlvr_config(merge_from_layer=0)).double().eval()
    with torch.no_grad():
        for layer in merged.text_encoder.encoder.layer:
            w = layer.crossattention.output.merge_layer.weight
            w.zero_()
            w[:, :w.shape[0]] = torch.eye(w.shape[0], dtype=F64)
    other = px.clone()
    other[:, 1] = torch.randn_like(other[:, 1])
    assert_close(merged(px, ids, mask).logits, merged(other, ids, mask).logits, name="merge keeps h0 only")


def test_shared_image_pairs_by_kv_index():
    px, ids, mask, _ = _batch()
    model = BlipNLVR(nlvr_config()).double().eval()
    e0, e1 = model.image_embeds(px[:2].double())
    te = model.text_encoder
    rows = torch.tensor([0, 1, 1])
    shared = te(ids, mask, te.image_kv(e0, e1), kv_index=rows)
    copied = te(ids, mask, te.image_kv(e0[rows], e1[rows]))
    assert_close(shared, copied, name="kv_index")
    with pytest.raises(ValueError, match="kv_index"):
        te(ids, mask, te.image_kv(e0, e1))


def test_loads_nlvr_and_pretraining_checkpoints():
    model = BlipNLVR(nlvr_config(text={"num_hidden_layers": 2}, vision={"hidden_size": 32}))
    sd = model.to_lavis_state_dict()
    assert "cls_head.2.weight" in sd and "text_encoder.encoder.layer.1.crossattention.output.merge_layer.bias" in sd
    other = BlipNLVR(nlvr_config(text={"num_hidden_layers": 2}, vision={"hidden_size": 32}))
    rep = other.load_lavis_state_dict(sd)
    assert rep.initialised == [] and rep.left_out == []
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    pre = BlipPretrain(tiny_config(vision={"hidden_size": 32}))
    rep = other.load_lavis_state_dict(pre.to_lavis_state_dict())
    assert rep.initialised == sorted(["cls_head.0.bias", "cls_head.0.weight", "cls_head.2.bias", "cls_head.2.weight",
                                      *(f"text_encoder.encoder.layer.1.crossattention.output.merge_layer.{w}"
                                        for w in ("bias", "weight"))])
    assert any(k.startswith("text_decoder.") for k in rep.left_out)
    for i in range(2):
        ca, src = other.text_encoder.encoder.layer[i].crossattention, pre.text_encoder.encoder.layer[i].crossattention
        for twin in (ca.self0, ca.self1):
            assert torch.equal(twin.key.weight, src.self.key.weight) and torch.equal(twin.query.bias, src.self.query.bias)
        for dense in (ca.output.dense0, ca.output.dense1):
            assert torch.equal(dense.weight, src.output.dense.weight)
        assert torch.equal(ca.output.LayerNorm.weight, src.output.LayerNorm.weight)


def test_bad_inputs_name_the_argument():
    px, ids, mask, labels = _batch()
    model = BlipNLVR(nlvr_config())
    with pytest.raises(ValueError, match="pixel_values"):
        model(px[:, 0], ids, mask)
    with pytest.raises(ValueError, match="two images"):
        model(torch.cat([px, px], 1), ids, mask)
    with pytest.raises(ValueError, match="labels"):
        model(px, ids, mask, labels.float())
    with pytest.raises(ValueError, match="merge_from_layer"):
        nlvr_config(merge_from_layer=-1)
