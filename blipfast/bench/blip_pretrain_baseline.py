"""Salesforce BLIP's pre-training forward (``BLIP_Pretrain.forward``, models/blip_pretrain.py), restated in plain
PyTorch over a ``blipfast.BlipPretrain``'s parameters: the baseline of the BLIP pre-training benchmark and the
ground truth of its tests.

Written as BLIP runs it, not as blipfast does: the MED text passes are BERT layers over the HF-named parameters
(``attention.self.{query,key,value}``, ``crossattention.*``, ``intermediate``/``output``) with BLIP's additive
masks (``(1 - mask) * -10000``, causal for the decoder) and SDPA; four text passes see the image (ITC text-only,
ITM positives, ITM negatives over gathered copies of the negative images, the decoder), each projecting the
image tokens to cross-attention K/V itself; the momentum update is BLIP's loop over parameter pairs; ITC
concatenates the queues (``.clone().detach()``) and materialises the targets; ``_dequeue_and_enqueue`` slices
the queues at ``int(queue_ptr)`` (a host sync) and asserts that the queue size is a multiple of the batch, as BLIP
does; ITM draws each negative with ``torch.multinomial(weights[b], 1).item()`` from ``softmax(s[:, :B]) + 1e-4``
with the diagonal zeroed (2B host syncs) unless negatives are given. The ViT is BLIP's timm ViT restated over the
model's ``BlipVisionModel`` parameters (pre-LN blocks, SDPA attention, a plain GELU MLP). One process (W = 1): the
enqueued features are this process' own.

A given negative of -1 (nothing drawable, e.g. B = 1) leaves its row out of the ITM mean, as blipfast does (BLIP's
multinomial crashes there). Dropout follows ``model.training``. With ``image_ids`` the ITC targets and the
negatives' exclusion are those of ``BLIP_Retrieval`` (index queue), the negatives' weights stay BLIP_Pretrain's.
BLIP's weight tie is restated, not read from the model: the LM head's output weight is the text encoder's word
embedding matrix (one parameter for the encoder's, the decoder's and the head's), so a model that kept a head
weight of its own would compute another LM loss here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .counting import sdpa

_NEG = -10000.0


def _lin(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def _ln(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def med_forward(text_model, input_ids, attention_mask, image=None, causal=False):
    """BLIP's ``BertModel`` (med.py) forward over a ``BlipTextModel``'s parameters: [B, T, d] hidden states.
    ``image`` [B, N, W]: cross-attention in every layer (its K/V projected here); ``causal``: the decoder's mask."""
    cfg = text_model.config
    train = text_model.training
    p_hid = cfg.hidden_dropout_prob if train else 0.0
    p_att = cfg.attention_probs_dropout_prob if train else 0.0
    act = ACT2FN[cfg.hidden_act]
    b, t = input_ids.shape
    h = cfg.num_attention_heads
    emb = text_model.embeddings
    pos = torch.arange(t, device=input_ids.device)
    x = F.embedding(input_ids, emb.word_embeddings.weight) + F.embedding(pos, emb.position_embeddings.weight)[None]
    x = F.dropout(_ln(x, emb.LayerNorm), p_hid, train)
    allowed = (attention_mask != 0)[:, None, None, :]
    if causal:
        allowed = allowed & torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))[None, None]
    mask = (~allowed).to(x.dtype) * _NEG  # [B, 1, 1 or T, T]

    def heads(y):
        return y.view(y.shape[0], y.shape[1], h, -1).transpose(1, 2)

    def attend(proj, xq, xkv, m):
        ctx = sdpa(heads(_lin(xq, proj.query)), heads(_lin(xkv, proj.key)), heads(_lin(xkv, proj.value)),
                   attn_mask=None if m is None else m.expand(b, 1, t, xkv.shape[1]), dropout_p=p_att)
        return ctx.transpose(1, 2).reshape(b, t, -1)

    def out(dense_ln, y, residual):
        return _ln(F.dropout(_lin(y, dense_ln.dense), p_hid, train) + residual, dense_ln.LayerNorm)

    for layer in text_model.encoder.layer:
        x = out(layer.attention.output, attend(layer.attention.self, x, x, mask), x)
        if image is not None:
            ca = layer.crossattention
            x = out(ca.output, attend(ca.self, x, image.to(x.dtype), None), x)
        x = out(layer.output, act(_lin(x, layer.intermediate.dense)), x)
    return x


def vit_forward(vit, pixel_values):
    """BLIP's ViT (timm ``VisionTransformer``, vit.py) over an HF ``BlipVisionModel``'s parameters: [B, N, width]."""
    cfg = vit.config
    emb = vit.embeddings
    w = emb.patch_embedding.weight
    x = F.conv2d(pixel_values.to(w.dtype), w, emb.patch_embedding.bias, stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = torch.cat([emb.class_embedding.expand(b, 1, d).to(x.dtype), x], 1) + emb.position_embedding[:, :n + 1]
    h = cfg.num_attention_heads
    act = ACT2FN[cfg.hidden_act]
    for layer in vit.encoder.layers:
        a = layer.self_attn
        qkv = _lin(_ln(x, layer.layer_norm1), a.qkv).view(b, n + 1, 3, h, d // h).permute(2, 0, 3, 1, 4)
        ctx = sdpa(qkv[0], qkv[1], qkv[2])
        x = x + _lin(ctx.transpose(1, 2).reshape(b, n + 1, d), a.projection)
        x = x + _lin(act(_lin(_ln(x, layer.layer_norm2), layer.mlp.fc1)), layer.mlp.fc2)
    return _ln(x, vit.post_layernorm)


@torch.no_grad()
def _momentum_update(model) -> None:
    m = model.config.momentum
    for online, momentum in model.model_pairs():
        for p, pm in zip(online.parameters(), momentum.parameters()):
            pm.data = pm.data * m + p.data * (1.0 - m)


@torch.no_grad()
def _dequeue_and_enqueue(model, image_feat, text_feat, idx) -> None:
    bs = image_feat.shape[0]
    ptr = int(model.queue_ptr)
    assert model.config.queue_size % bs == 0  # BLIP: "for simplicity"
    model.image_queue[:, ptr:ptr + bs] = image_feat.T
    model.text_queue[:, ptr:ptr + bs] = text_feat.T
    model.idx_queue[:, ptr:ptr + bs] = idx.view(1, bs)
    model.queue_ptr[0] = (ptr + bs) % model.config.queue_size


def _up(x):
    return x if x.dtype == torch.float64 else x.float()


def blip_pretrain_forward(model, pixel_values, input_ids, attention_mask, alpha, *, image_ids=None, negatives=None,
                          generator=None) -> dict:
    """The three losses of ``model`` (a ``blipfast.BlipPretrain``) as BLIP_Pretrain computes them (see the module
    doc): ``{"loss", "loss_itc", "loss_itm", "loss_lm"}``; updates the momentum copies and the queues."""
    cfg = model.config
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    bs = input_ids.shape[0]
    dev = pixel_values.device
    alpha = float(alpha)

    image_embeds = vit_forward(model.vision_model, pixel_values)
    image_feat = F.normalize(_lin(_up(image_embeds[:, 0]), model.vision_proj), dim=-1)
    text_out = med_forward(model.text_encoder, input_ids, attention_mask)
    text_feat = F.normalize(_lin(_up(text_out[:, 0]), model.text_proj), dim=-1)

    # momentum features and ITC
    if image_ids is not None:
        idx = image_ids.view(-1, 1)
        idx_all = torch.cat([idx.t(), model.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).to(image_feat.dtype)
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    with torch.no_grad():
        _momentum_update(model)
        image_embeds_m = vit_forward(model.vision_model_m, pixel_values)
        image_feat_m = F.normalize(_lin(_up(image_embeds_m[:, 0]), model.vision_proj_m), dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach().to(image_feat.dtype)], dim=1)
        text_out_m = med_forward(model.text_encoder_m, input_ids, attention_mask)
        text_feat_m = F.normalize(_lin(_up(text_out_m[:, 0]), model.text_proj_m), dim=-1)
        text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach().to(image_feat.dtype)], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / model.temp
        sim_t2i_m = text_feat_m @ image_feat_all / model.temp
        if image_ids is None:
            sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype, device=dev)
            sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / model.temp
    sim_t2i = text_feat @ image_feat_all / model.temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    _dequeue_and_enqueue(model, image_feat_m, text_feat_m,
                         image_ids if image_ids is not None else torch.full((bs,), -100, device=dev))

    # ITM
    encoder_input_ids = input_ids.clone()
    encoder_input_ids[:, 0] = cfg.enc_token_id
    output_pos = med_forward(model.text_encoder, encoder_input_ids, attention_mask, image=image_embeds)
    if negatives is None:
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1) + cfg.itm_floor
            weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1) + cfg.itm_floor
            if image_ids is None:
                weights_t2i.fill_diagonal_(0)
                weights_i2t.fill_diagonal_(0)
            else:
                same = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1))
                weights_t2i.masked_fill_(same, 0)
                weights_i2t.masked_fill_(same, 0)
        neg_image = [torch.multinomial(weights_t2i[b], 1, generator=generator).item() for b in range(bs)]
        neg_text = [torch.multinomial(weights_i2t[b], 1, generator=generator).item() for b in range(bs)]
    else:
        neg_text, neg_image = negatives[0].tolist(), negatives[1].tolist()
    ok_img = torch.tensor([j >= 0 for j in neg_image], device=dev)
    ok_txt = torch.tensor([j >= 0 for j in neg_text], device=dev)
    image_embeds_neg = torch.stack([image_embeds[max(j, 0)] for j in neg_image], dim=0)
    text_ids_neg = torch.stack([encoder_input_ids[max(j, 0)] for j in neg_text], dim=0)
    text_atts_neg = torch.stack([attention_mask[max(j, 0)] for j in neg_text], dim=0)
    text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
    text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
    output_neg = med_forward(model.text_encoder, text_ids_all, text_atts_all, image=image_embeds_all)
    vl_embeddings = torch.cat([output_pos[:, 0, :], output_neg[:, 0, :]], dim=0)
    vl_output = _up(_lin(vl_embeddings, model.itm_head))
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(dev)
    weight = torch.cat([torch.ones(bs, device=dev), ok_img.float(), ok_txt.float()]).to(vl_output.dtype)
    loss_itm = (F.cross_entropy(vl_output, itm_labels, reduction="none") * weight).sum() / weight.sum()

    # LM
    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = cfg.bos_token_id
    decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == cfg.text.pad_token_id, -100)
    decoder_targets[:, :cfg.prompt_length] = -100
    dec_out = med_forward(model.text_decoder.bert, decoder_input_ids, attention_mask, image=image_embeds, causal=True)
    head = model.text_decoder.cls.predictions
    y = _ln(ACT2FN[cfg.text.hidden_act](_lin(dec_out, head.transform.dense)), head.transform.LayerNorm)
    # BLIP's tie (models/blip_pretrain.py since 073b821): the LM head's output weight IS the word embedding that the
    # encoder and the decoder look their tokens up in (its bias is the head's own)
    scores = F.linear(y, model.text_encoder.embeddings.word_embeddings.weight, head.decoder.bias)
    loss_lm = F.cross_entropy(_up(scores[:, :-1, :]).reshape(-1, scores.shape[-1]),
                              decoder_targets[:, 1:].reshape(-1), label_smoothing=cfg.lm_label_smoothing)
    return {"loss": loss_ita + loss_itm + loss_lm, "loss_itc": loss_ita, "loss_itm": loss_itm, "loss_lm": loss_lm}
