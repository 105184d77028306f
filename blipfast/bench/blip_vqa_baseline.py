"""Salesforce BLIP's VQA and NLVR2 forwards (``BLIP_VQA.forward`` / ``rank_answer``, models/blip_vqa.py;
``BLIP_NLVR.forward`` with models/nlvr_encoder.py), restated in plain PyTorch over a ``blipfast.BlipVQA`` /
``blipfast.BlipNLVR``'s parameters: the baseline of the VQA benchmark and the ground truth of the task models' tests.

Written as BLIP runs it, not as blipfast does: BERT layers (med.py / nlvr_encoder.py) with BLIP's additive masks
(``(1 - mask) * -10000``, causal for the decoder) and SDPA, every pass projecting its cross-attention K/V itself;
the question states repeated per answer in a Python loop over the batch (BLIP's ``n``) and per candidate with
BLIP's ``tile`` (a host-built index); the decoder's logits over every position, the label-smoothed (0.1, BLIP's
hard-coded value) token loss summed per sequence; ``rank_answer``'s loop over the questions and its boolean
index ``topk_ids[max_topk_ids >= 0, max_topk_ids]``; NLVR2's twin cross-attention (two ``BertSelfAttention``,
``dense0`` / ``dense1``, averaged or merged, one dropout, residual, LayerNorm). The ViT is BLIP's timm ViT
restated by :func:`blipfast.bench.blip_pretrain_baseline.vit_forward` (no stochastic depth: the tests compare
with ``drop_path_rate`` 0, and the stochastic depth has a test of its own). Dropout follows ``model.training``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .blip_pretrain_baseline import vit_forward
from .counting import sdpa

_NEG = -10000.0
SMOOTHING = 0.1  # med.py: CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)


def _lin(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def _ln(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _additive(mask, dtype):
    return (1.0 - mask.to(dtype)) * _NEG


def bert_forward(text_model, input_ids, attention_mask, images=(), image_masks=(), causal=False):
    """BLIP's ``BertModel`` forward (med.py; nlvr_encoder.py when two images are given) over a blipfast text model's
    parameters: [B, T, d]. ``images``: () (text only), one [B, N, W] (``crossattention.self``) or two (the twin
    ``self0`` / ``self1`` with ``dense0`` / ``dense1`` and the merge layer); ``image_masks`` their 0/1 masks
    (default all ones)."""
    cfg = text_model.config
    train = text_model.training
    p_hid = cfg.hidden_dropout_prob if train else 0.0
    p_att = cfg.attention_probs_dropout_prob if train else 0.0
    act = ACT2FN[cfg.hidden_act]
    b, t = input_ids.shape
    h = cfg.num_attention_heads
    emb = text_model.embeddings
    x = emb.word_embeddings.weight[input_ids] + emb.position_embeddings.weight[:t][None]
    x = F.dropout(_ln(x, emb.LayerNorm), p_hid, train)
    allowed = attention_mask[:, None, None, :].to(x.dtype)
    if causal:
        allowed = torch.tril(torch.ones(t, t, dtype=x.dtype, device=x.device))[None, None] * allowed
    mask = _additive(allowed, x.dtype)
    image_masks = list(image_masks) or [None] * len(images)
    cross = [(img.to(x.dtype), _additive((m if m is not None else torch.ones(img.shape[:2], device=x.device))
                                         [:, None, None, :], x.dtype)) for img, m in zip(images, image_masks)]

    def heads(y):
        return y.view(y.shape[0], y.shape[1], h, -1).transpose(1, 2)

    def attend(proj, xq, xkv, m):
        ctx = sdpa(heads(_lin(xq, proj.query)), heads(_lin(xkv, proj.key)), heads(_lin(xkv, proj.value)),
                   attn_mask=m.expand(b, 1, t, xkv.shape[1]), dropout_p=p_att)
        return ctx.transpose(1, 2).reshape(b, t, -1)

    def out(dense_ln, y, residual):
        return _ln(F.dropout(_lin(y, dense_ln.dense), p_hid, train) + residual, dense_ln.LayerNorm)

    for layer in text_model.encoder.layer:
        x = out(layer.attention.output, attend(layer.attention.self, x, x, mask), x)
        ca = getattr(layer, "crossattention", None)
        if len(cross) == 1:
            x = out(ca.output, attend(ca.self, x, *cross[0]), x)
        elif len(cross) == 2:
            o = ca.output
            h0 = _lin(attend(ca.self0, x, *cross[0]), o.dense0)
            h1 = _lin(attend(ca.self1, x, *cross[1]), o.dense1)
            y = _lin(torch.cat([h0, h1], dim=-1), o.merge_layer) if o.merge_layer is not None else (h0 + h1) / 2
            x = _ln(F.dropout(y, p_hid, train) + x, o.LayerNorm)
        x = out(layer.output, act(_lin(x, layer.intermediate.dense)), x)
    return x


def lm_logits(lm_model, hidden):
    """BLIP's ``BertOnlyMLMHead``: decoder(LayerNorm(act(dense(h))))."""
    p = lm_model.cls.predictions
    y = _ln(ACT2FN[lm_model.config.hidden_act](_lin(hidden, p.transform.dense)), p.transform.LayerNorm)
    return _lin(y, p.decoder)


def _decoder_loss(model, input_ids, attention_mask, states, states_mask, labels):
    """BLIP's ``text_decoder(..., labels=..., reduction='none')``: per-sequence summed smoothed token loss."""
    dec = model.text_decoder
    h = bert_forward(dec.bert, input_ids, attention_mask, [states], [states_mask], causal=True)
    logits = lm_logits(dec, h)
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), reduction="none",
                           label_smoothing=SMOOTHING)
    return loss.view(logits.shape[0], -1).sum(1), logits


def _encode_question(model, image_embeds, question_ids, question_mask):
    q = question_ids.clone()
    q[:, 0] = model.config.enc_token_id
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return bert_forward(model.text_encoder, q, question_mask, [image_embeds], [image_atts])


def blip_vqa_loss(model, pixel_values, question_ids, question_mask, answer_ids, answer_mask, weights, n):
    """``BLIP_VQA.forward(train=True)``: ``n`` (a list) answers per question, flat answers [sum(n), Ta]."""
    cfg = model.config
    image_embeds = vit_forward(model.vision_model, pixel_values)
    answer_ids = answer_ids.clone()
    answer_ids[:, 0] = cfg.bos_token_id
    targets = answer_ids.masked_fill(answer_ids == cfg.text.pad_token_id, -100)
    q_out = _encode_question(model, image_embeds, question_ids, question_mask)
    states, atts = [], []
    for b, k in enumerate(n):
        states += [q_out[b]] * k
        atts += [question_mask[b]] * k
    per, _ = _decoder_loss(model, answer_ids, answer_mask, torch.stack(states, 0), torch.stack(atts, 0), targets)
    loss = weights * per
    return loss.sum() / pixel_values.shape[0]


def tile(x, dim, n_tile):
    """BLIP's ``tile`` (models/blip_vqa.py)."""
    init_dim = x.size(dim)
    repeat_idx = [1] * x.dim()
    repeat_idx[dim] = n_tile
    x = x.repeat(*repeat_idx)
    order_index = torch.LongTensor(np.concatenate([init_dim * np.arange(n_tile) + i for i in range(init_dim)]))
    return torch.index_select(x, dim, order_index.to(x.device))


def blip_rank_answer(model, question_states, question_atts, answer_ids, answer_atts, k):
    """``BLIP_VQA.rank_answer``: the chosen candidate per question [Q] (and, for the tests, the top-k candidate
    indices and their ``-loss``)."""
    cfg = model.config
    dec = model.text_decoder
    answer_ids = answer_ids.clone()
    answer_ids[:, 0] = cfg.bos_token_id
    num_ques = question_states.size(0)
    start_ids = answer_ids[0, 0].repeat(num_ques, 1)
    h = bert_forward(dec.bert, start_ids, torch.ones_like(start_ids), [question_states], [question_atts],
                     causal=True)
    logits = lm_logits(dec, h)[:, 0, :]
    answer_first_token = answer_ids[:, 1]
    prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_first_token)
    topk_probs, topk_ids = prob_first_token.topk(k, dim=1)
    input_ids, input_atts = [], []
    for b, topk_id in enumerate(topk_ids):
        input_ids.append(answer_ids.index_select(dim=0, index=topk_id))
        input_atts.append(answer_atts.index_select(dim=0, index=topk_id))
    input_ids = torch.cat(input_ids, dim=0)
    input_atts = torch.cat(input_atts, dim=0)
    targets_ids = input_ids.masked_fill(input_ids == cfg.text.pad_token_id, -100)
    question_states = tile(question_states, 0, k)
    question_atts = tile(question_atts, 0, k)
    per, _ = _decoder_loss(model, input_ids, input_atts, question_states, question_atts, targets_ids)
    log_probs_sum = (-per).view(num_ques, k)
    max_topk_ids = log_probs_sum.argmax(dim=1)
    # BLIP: topk_ids[max_topk_ids >= 0, max_topk_ids]; a boolean index is a nonzero (a host sync) inside the index
    # kernel, written out here so that the operator counter sees it
    max_ids = topk_ids[(max_topk_ids >= 0).nonzero(as_tuple=True)[0], max_topk_ids]
    return max_ids, topk_ids, log_probs_sum


def blip_vqa_rank(model, pixel_values, question_ids, question_mask, answer_ids, answer_mask, k):
    """``BLIP_VQA.forward(train=False, inference='rank')``: the ViT, the question encoder, ``rank_answer``."""
    image_embeds = vit_forward(model.vision_model, pixel_values)
    q_out = _encode_question(model, image_embeds, question_ids, question_mask)
    return blip_rank_answer(model, q_out, question_mask, answer_ids, answer_mask, k)


def blip_nlvr_forward(model, pixel_values, input_ids, attention_mask, targets):
    """``BLIP_NLVR.forward``: (loss, prediction [B, 2]); ``pixel_values`` [B, 2, 3, S, S]."""
    b = pixel_values.shape[0]
    images = torch.cat([pixel_values[:, 0], pixel_values[:, 1]], dim=0)
    image_embeds = vit_forward(model.vision_model, images)
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=images.device)
    image0_embeds, image1_embeds = torch.split(image_embeds, b)
    ids = input_ids.clone()
    ids[:, 0] = model.config.enc_token_id
    h = bert_forward(model.text_encoder, ids, attention_mask, [image0_embeds, image1_embeds],
                     [image_atts[:b], image_atts[b:]])
    prediction = model.cls_head(h[:, 0, :])
    return F.cross_entropy(prediction, targets), prediction
