"""Tiny BlipRetrieval / BlipCaptioner configurations (the tiny BlipPretrain's text model and ViT, dropout off) and
restatements of Salesforce BLIP's retrieval evaluation (``train_retrieval.py`` ``evaluation``) and captioning loss
(``BLIP_Decoder.forward``) for tests/models/test_blip_retrieval*.py and test_blip_caption.py."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from blipfast.bench.blip_pretrain_baseline import med_forward, vit_forward
from blipfast.models.blip_caption import BlipCaptionConfig
from blipfast.models.blip_retrieval import BlipRetrievalConfig
from tests.helpers.blip_pretrain import DEC, ENC, SEP, VOCAB

TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, bos_token_id=DEC,
            sep_token_id=SEP, eos_token_id=SEP, pad_token_id=0)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=8)


def retrieval_config(**kw) -> BlipRetrievalConfig:
    base = dict(embed_dim=8, queue_size=12, enc_token_id=ENC, negative_all_rank=False, vit_grad_ckpt=False,
                vit_ckpt_layer=0, k_test=3)
    text, vision = dict(TEXT, **kw.pop("text", {})), dict(VISION, **kw.pop("vision", {}))
    return BlipRetrievalConfig(text=text, vision=vision, **{**base, **kw})


def caption_config(**kw) -> BlipCaptionConfig:
    base = dict(bos_token_id=DEC, prompt_length=3, max_length=9, min_length=4)
    text, vision = dict(TEXT, **kw.pop("text", {})), dict(VISION, **kw.pop("vision", {}))
    return BlipCaptionConfig(text=text, vision=vision, **{**base, **kw})


def jitter_(model, std: float = 0.05):
    """Non-trivial biases and LayerNorms (and momentum copies that differ from the online weights)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


@torch.no_grad()
def blip_score_matrices(model, pixel_values, input_ids, attention_mask, k: int) -> tuple:
    """``train_retrieval.py``'s ``evaluation`` over a ``BlipRetrieval``'s parameters (one process): ITC features,
    ``sims = image_embeds @ text_embeds.t()``, then per image row and per text row the top ``k`` re-scored by the ITM
    head's positive logit on the [ENC] text over ``k`` repeated copies of the image tokens, plus the cosine;
    -100 elsewhere."""
    m = copy.deepcopy(model).eval()
    image_feats = vit_forward(m.vision_model, pixel_values)
    image_embeds = F.normalize(F.linear(image_feats[:, 0], m.vision_proj.weight, m.vision_proj.bias), dim=-1)
    text_out = med_forward(m.text_encoder, input_ids, attention_mask)
    text_embeds = F.normalize(F.linear(text_out[:, 0], m.text_proj.weight, m.text_proj.bias))
    text_ids = input_ids.clone()
    text_ids[:, 0] = m.config.enc_token_id
    sims = image_embeds @ text_embeds.t()

    def itm(ids, atts, image):
        h = med_forward(m.text_encoder, ids, atts, image=image)
        return F.linear(h[:, 0], m.itm_head.weight, m.itm_head.bias)[:, 1]

    n_img, n_txt = sims.shape
    s_i2t = torch.full((n_img, n_txt), -100.0, dtype=sims.dtype)
    for i in range(n_img):
        top_sim, top_idx = sims[i].topk(k=min(k, n_txt), dim=0)
        enc = image_feats[i].repeat(top_idx.shape[0], 1, 1)
        s_i2t[i, top_idx] = itm(text_ids[top_idx], attention_mask[top_idx], enc) + top_sim
    s_t2i = torch.full((n_txt, n_img), -100.0, dtype=sims.dtype)
    for t in range(n_txt):
        top_sim, top_idx = sims.t()[t].topk(k=min(k, n_img), dim=0)
        n = top_idx.shape[0]
        s_t2i[t, top_idx] = itm(text_ids[t].repeat(n, 1), attention_mask[t].repeat(n, 1), image_feats[top_idx]) \
            + top_sim
    return s_i2t, s_t2i


def blip_caption_loss(model, pixel_values, input_ids, attention_mask):
    """``BLIP_Decoder.forward`` over a ``BlipCaptioner``'s parameters: [DEC] in place of [CLS], targets without
    [PAD] and the first ``prompt_length`` positions, the BERT decoder pass (its own K/V of the image in every layer),
    the LM head whose output weight IS the word embedding (``BertLMHeadModel``'s tie, restated), label-smoothed
    cross-entropy averaged over the targets (``CrossEntropyLoss(label_smoothing=0.1)``)."""
    cfg = model.config
    image_embeds = vit_forward(model.vision_model, pixel_values)
    ids = input_ids.clone()
    ids[:, 0] = cfg.bos_token_id
    targets = ids.masked_fill(ids == cfg.text.pad_token_id, -100)
    targets[:, :cfg.prompt_length] = -100
    dec = model.text_decoder
    h = med_forward(dec.bert, ids, attention_mask, image=image_embeds, causal=True)
    head = dec.cls.predictions
    tr = head.transform
    y = F.layer_norm(ACT2FN[cfg.text.hidden_act](F.linear(h, tr.dense.weight, tr.dense.bias)), h.shape[-1:],
                     tr.LayerNorm.weight, tr.LayerNorm.bias, tr.LayerNorm.eps)
    scores = F.linear(y, dec.bert.embeddings.word_embeddings.weight, head.bias)
    return F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), targets[:, 1:].reshape(-1),
                           label_smoothing=cfg.lm_label_smoothing)
