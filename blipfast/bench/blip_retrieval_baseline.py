"""Salesforce BLIP's retrieval fine-tuning forward (``BLIP_Retrieval.forward``, models/blip_retrieval.py),
restated in plain PyTorch over a ``blipfast.BlipRetrieval``'s parameters: the baseline of the retrieval
fine-tuning benchmark and the ground truth of the tests.

Written as BLIP runs it (the BERT passes, the timm ViT and the momentum loop of
blipfast/bench/blip_pretrain_baseline.py): the ITC targets from ``idx`` (``torch.eq(idx, idx_all)`` over [batch |
index queue], normalised per row) before the momentum update; the online logits against the momentum features
plus the queues; ``_dequeue_and_enqueue`` with the ids at ``int(ptr_queue)`` (a host sync), asserting that the
queue size is a multiple of the batch; the ITM positives in one pass and the 2B negatives in another, each
projecting the image tokens to cross-attention K/V itself; the negatives drawn with ``torch.multinomial(weights[b],
1).item()`` (2B host syncs) from ``softmax(image_feat @ text_feat.t() / temp)`` with every same-id column zeroed,
all image draws first, unless negatives are given. One process: with ``negative_all_rank`` the "gathered" batch
is the local one (BLIP's gathers of one process), the gathers restated as copies.

A given negative of -1 (nothing drawable) leaves its row out of the ITM mean, as blipfast does (BLIP's
multinomial crashes there). Dropout follows ``model.training``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blip_pretrain_baseline import _lin, _momentum_update, _up, med_forward, vit_forward


@torch.no_grad()
def _dequeue_and_enqueue(model, image_feat, text_feat, idxs) -> None:
    bs = image_feat.shape[0]
    ptr = int(model.ptr_queue)
    assert model.config.queue_size % bs == 0  # BLIP: "for simplicity"
    model.image_queue[:, ptr:ptr + bs] = image_feat.T
    model.text_queue[:, ptr:ptr + bs] = text_feat.T
    model.idx_queue[:, ptr:ptr + bs] = idxs.T
    model.ptr_queue[0] = (ptr + bs) % model.config.queue_size


def _draw(weights, generator) -> list:
    return [torch.multinomial(weights[b], 1, generator=generator).item() for b in range(weights.shape[0])]


def blip_retrieval_forward(model, pixel_values, input_ids, attention_mask, alpha, idx, *, negatives=None,
                           generator=None) -> dict:
    """BLIP_Retrieval's losses of ``model`` (a ``blipfast.BlipRetrieval``), see the module doc: ``{"loss",
    "loss_itc", "loss_itm"}``; updates the momentum copies and the queues. ``negatives``: (text, image) indices."""
    cfg = model.config
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    bs, dev = input_ids.shape[0], pixel_values.device
    alpha = float(alpha)

    image_embeds = vit_forward(model.vision_model, pixel_values)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev)  # noqa: F841 (BLIP's all-ones)
    image_feat = F.normalize(_lin(_up(image_embeds[:, 0]), model.vision_proj), dim=-1)
    text_out = med_forward(model.text_encoder, input_ids, attention_mask)
    text_feat = F.normalize(_lin(_up(text_out[:, 0]), model.text_proj), dim=-1)

    # ITC
    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), model.idx_queue.clone().detach()], dim=1)
    pos_idx = torch.eq(idx, idx_all).to(image_feat.dtype)
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    with torch.no_grad():
        _momentum_update(model)
        image_embeds_m = vit_forward(model.vision_model_m, pixel_values)
        image_feat_m = F.normalize(_lin(_up(image_embeds_m[:, 0]), model.vision_proj_m), dim=-1)
        image_feat_m_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach().to(image_feat.dtype)], 1)
        text_out_m = med_forward(model.text_encoder_m, input_ids, attention_mask)
        text_feat_m = F.normalize(_lin(_up(text_out_m[:, 0]), model.text_proj_m), dim=-1)
        text_feat_m_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach().to(image_feat.dtype)], 1)
        sim_i2t_m = image_feat_m @ text_feat_m_all / model.temp
        sim_t2i_m = text_feat_m @ image_feat_m_all / model.temp
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_m_all / model.temp
    sim_t2i = text_feat @ image_feat_m_all / model.temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    idxs = torch.cat([idx])  # concat_all_gather(idx) of one process
    _dequeue_and_enqueue(model, image_feat_m, text_feat_m, idxs)

    # ITM
    encoder_input_ids = input_ids.clone()
    encoder_input_ids[:, 0] = cfg.enc_token_id
    output_pos = med_forward(model.text_encoder, encoder_input_ids, attention_mask, image=image_embeds)
    world = cfg.negative_all_rank  # one process: the "world" tensors are copies of the local ones
    with torch.no_grad():
        mask = torch.eq(idx, idxs.t()) if world else torch.eq(idx, idx.t())
        text_w = torch.cat([text_feat]) if world else text_feat
        image_w = torch.cat([image_feat]) if world else image_feat
        weights_i2t = F.softmax(image_feat @ text_w.t() / model.temp, dim=1)
        weights_i2t.masked_fill_(mask, 0)
        weights_t2i = F.softmax(text_feat @ image_w.t() / model.temp, dim=1)
        weights_t2i.masked_fill_(mask, 0)
    image_embeds_world = image_embeds  # all_gather_with_grad of one process
    ids_world = torch.cat([encoder_input_ids]) if world else encoder_input_ids
    atts_world = torch.cat([attention_mask]) if world else attention_mask
    if negatives is None:
        neg_image, neg_text = _draw(weights_t2i, generator), _draw(weights_i2t, generator)
    else:
        neg_text, neg_image = negatives[0].tolist(), negatives[1].tolist()
    ok_img = torch.tensor([j >= 0 for j in neg_image], device=dev)
    ok_txt = torch.tensor([j >= 0 for j in neg_text], device=dev)
    image_embeds_neg = torch.stack([image_embeds_world[max(j, 0)] for j in neg_image], dim=0)
    text_ids_neg = torch.stack([ids_world[max(j, 0)] for j in neg_text], dim=0)
    text_atts_neg = torch.stack([atts_world[max(j, 0)] for j in neg_text], dim=0)
    text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    output_neg = med_forward(model.text_encoder, text_ids_all, text_atts_all, image=image_embeds_all)
    vl_embeddings = torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0)
    vl_output = _up(_lin(vl_embeddings, model.itm_head))
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(dev)
    weight = torch.cat([torch.ones(bs, device=dev), ok_img.float(), ok_txt.float()]).to(vl_output.dtype)
    loss_itm = (F.cross_entropy(vl_output, itm_labels, reduction="none") * weight).sum() / weight.sum()
    return {"loss": loss_ita + loss_itm, "loss_itc": loss_ita, "loss_itm": loss_itm}

