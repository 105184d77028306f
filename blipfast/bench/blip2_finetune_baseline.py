"""LAVIS' BLIP-2 caption fine-tuning step (``Blip2OPT.forward`` with ``freeze_vit: False``), restated in PyTorch over
a ``blipfast.Blip2Stage2``'s parameters: the baseline of the fine-tuning benchmark (blipfast/bench/blip2_finetune.py).

Written as LAVIS runs it, with SDPA where LAVIS materialises attention probabilities:

- the EVA ViT (``lavis/models/eva_vit.py``: ``VisionTransformer.forward_features``): patch embedding, CLS token and
  the (364-px) position table, then 39 pre-LN blocks, each ``x + proj(attn(LN1(x)))``, ``x + fc2(gelu(fc1(LN2(x))))``
  in plain autograd (the QKV bias built per forward as ``cat(q_bias, 0, v_bias)``); with ``checkpoint=True`` every
  block under ``torch.utils.checkpoint`` (LAVIS' ``use_grad_checkpoint``, ``caption_coco_ft.yaml``; restated
  non-reentrant, which keeps the same tensors); no final norm;
- ``ln_vision``, then the BERT Q-Former over the query tokens with cross-attention to the image tokens (LAVIS'
  ``Qformer.bert(query_embeds=..., encoder_hidden_states=...)``; the stage-1 restatement's pass, each cross layer
  projecting the image K/V itself), ``opt_proj``;
- the frozen OPT run by transformers on [query outputs | prompt + caption embeddings] with labels -100 on the
  queries, the prompt and the padding (``self.opt_model(inputs_embeds=..., attention_mask=..., labels=...)``).

Dropout follows the modules' training mode; the ViT has none (``drop_path_rate: 0``, attention dropout 0).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .counting import sdpa
from .stage1_baseline import _Pass


def _ln(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _lavis_qkv_bias(attn):
    """EVA's per-forward ``cat(q_bias, zeros, v_bias)`` (HF 5.x keeps it fused: its q and v thirds)."""
    d = attn.qkv.weight.shape[1]
    if attn.qkv.bias is not None:
        q_bias, v_bias = attn.qkv.bias[:d], attn.qkv.bias[2 * d:]
    else:
        q_bias, v_bias = attn.q_bias, attn.v_bias
    return torch.cat((q_bias, torch.zeros_like(v_bias, requires_grad=False), v_bias))


def eva_block(layer, x: torch.Tensor) -> torch.Tensor:
    """One ``eva_vit.Block`` (``init_values=None``, no drop path) over an HF ``Blip2EncoderLayer``'s parameters."""
    attn, mlp = layer.self_attn, layer.mlp
    b, n, c = x.shape
    qkv = F.linear(_ln(x, layer.layer_norm1), attn.qkv.weight, _lavis_qkv_bias(attn))
    qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    ctx = sdpa(qkv[0], qkv[1], qkv[2])  # LAVIS: (q * scale) @ k^T, softmax, @ v
    x = x + F.linear(ctx.transpose(1, 2).reshape(b, n, -1), attn.projection.weight, attn.projection.bias)
    h = F.gelu(F.linear(_ln(x, layer.layer_norm2), mlp.fc1.weight, mlp.fc1.bias))
    return x + F.linear(h, mlp.fc2.weight, mlp.fc2.bias)


def lavis_vit_forward(vision_model, pixel_values: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """``eva_vit.VisionTransformer.forward_features`` over an HF ``Blip2VisionModel``'s parameters: [B, N, width]."""
    emb = vision_model.embeddings
    w = emb.patch_embedding
    x = F.conv2d(pixel_values, w.weight, w.bias, stride=w.stride).flatten(2).transpose(1, 2)
    x = torch.cat((emb.class_embedding.expand(x.shape[0], -1, -1), x), dim=1) + emb.position_embedding
    for layer in vision_model.encoder.layers:
        x = _checkpoint(eva_block, layer, x, use_reentrant=False) if checkpoint else eva_block(layer, x)
    return x


def lavis_caption_loss(stage2, pixel_values, input_ids, attention_mask, labels, *, checkpoint: bool = False):
    """The caption fine-tuning loss of ``stage2`` (a decoder-only ``blipfast.Blip2Stage2``) as LAVIS' ``Blip2OPT``
    computes it. ``input_ids`` / ``attention_mask`` / ``labels`` [B, T]: prompt + caption, right-padded, labels
    -100 on the prompt and the padding (``Blip2Stage2.make_text_batch``)."""
    m = stage2.model
    image = _ln(lavis_vit_forward(m.vision_model, pixel_values, checkpoint=checkpoint), m.vision_model.post_layernorm)
    qf = m.qformer
    run = _Pass(SimpleNamespace(qformer=qf, config=SimpleNamespace(qformer=qf.config), training=qf.training))
    b, nq = image.shape[0], m.query_tokens.shape[1]
    q_out, _ = run(m.query_tokens.expand(b, -1, -1), nq, None, image=image)
    inputs_opt = F.linear(q_out, m.language_projection.weight, m.language_projection.bias)
    lm = m.language_model
    embeds = lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([inputs_opt.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, nq), attention_mask], dim=1)
    targets = torch.cat([labels.new_full((b, nq), -100), labels], dim=1)
    return lm(inputs_embeds=embeds, attention_mask=mask, labels=targets, use_cache=False).loss
