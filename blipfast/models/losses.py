"""Losses of the model heads that are model logic rather than fused ops.

``itm_loss``: the image-text matching loss of BLIP-2 stage 1 (``Blip2Stage1``) and BLIP pre-training
(``BlipPretrain``) over the 3B rows of the ITM batch (blipfast.distributed: ``itm_batch_indices`` /
``exchange_itm_negatives``), whose ``weight`` is 0 for a row whose negative does not exist (nothing drawable,
or dropped by the exchange's capacity). It is sum(weight * CE) / sum(weight): LAVIS' (and BLIP's) plain mean
cross-entropy when every negative exists, the positives' mean when there is none (B * W = 1). It is a rule of
the ITM objective, not a kernel: a weighted cross-entropy over [3B, 2] logits, nothing to fuse or to keep out
of memory, so it lives with the models and runs as plain PyTorch.

``decoder_lm_loss``: the LM loss of BLIP's ``[DEC]`` decoder (pre-training's LM, captioning's ``blip_decoder``):
next-token cross-entropy with label smoothing, [PAD] and the prompt's positions excluded, the LM head's last GEMM
and the cross-entropy fused (``ops.linear_cross_entropy``: the [N, vocab] logits are never all in memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear_cross_entropy

__all__ = ["decoder_lm_loss", "itm_loss"]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(weight * CE(logits, labels)) / sum(weight) over logits [R, C], labels [R] (int64), weight [R] (float,
    0 drops a row); computed in fp32 (fp64 for fp64 logits). LAVIS' mean CE when every row has weight 1."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"itm_loss: logits must be a [R, C] tensor, got {_shape(logits)}")
    r = logits.shape[0]
    for name, t in (("labels", labels), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.shape != (r,):
            raise ValueError(f"itm_loss: {name} must be a [{r}] tensor (one per row of logits), got {_shape(t)}")
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * weight.to(ce.dtype)).sum() / weight.sum().to(ce.dtype)


def _shape(t) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def decoder_lm_loss(lm_model, hidden: torch.Tensor, decoder_ids: torch.Tensor, *, pad_token_id, prompt_length: int = 0,
                    label_smoothing: float = 0.1) -> torch.Tensor:
    """BLIP's LM loss of a decoder pass (``BertLMHeadModel`` with ``labels``, as ``BLIP_Decoder`` / ``BLIP_Pretrain``
    build them): targets = ``decoder_ids`` with [PAD] (``pad_token_id``) and the first ``prompt_length`` positions
    set to -100, token t + 1 predicted at position t, label-smoothed cross-entropy averaged over every target of
    the batch. ``lm_model``: a BlipTextLMHeadModel (its ``cls.predictions`` head); ``hidden`` [B, T, d] its
    ``bert`` pass over ``decoder_ids`` [B, T]."""
    labels = decoder_ids
    if pad_token_id is not None:
        labels = labels.masked_fill(labels == pad_token_id, -100)
    if prompt_length:
        pos = torch.arange(labels.shape[1], device=labels.device)
        labels = labels.masked_fill(pos[None, :] < prompt_length, -100)
    head = lm_model.cls.predictions
    tr = head.transform
    x = lm_model._act(F.linear(hidden[:, :-1], tr.dense.weight, tr.dense.bias))
    x = F.layer_norm(x, x.shape[-1:], tr.LayerNorm.weight, tr.LayerNorm.bias, tr.LayerNorm.eps)
    return linear_cross_entropy(x.reshape(-1, x.shape[-1]), head.decoder.weight, head.decoder.bias,
                                labels[:, 1:].reshape(-1), label_smoothing=label_smoothing)
