"""BLIP (v1) discriminative Visual Dialog (the BLIP paper's section 5.5; docs/blip-finetune.md). Salesforce released
no VisDial code: this is the paper's description built from BLIP's parts, and the design is blipfast's.

The paper: "we concatenate image and caption embeddings, and pass them to the dialog encoder through
cross-attention. The dialog encoder is trained with the ITM loss to discriminate whether the answer is true or
false for a question, given the entire dialog history and the image-caption embeddings." Here:

- the image embeddings are the ViT tokens [N, width]; the caption embeddings are the caption ([CLS] first) through
  the text encoder without cross-attention (BLIP's unimodal ``mode='text'`` pass) [Tc, d]; their concatenation
  [N + Tc] (with the caption's padding masked) is the cross-attention input, so the vision width must equal the text
  width (ViT-B with BERT-base: 768);
- the dialog encoder is the same text encoder in its image-grounded mode: [ENC], then the dialog history (the
  previous rounds' questions and answers), [SEP], the question, [SEP], one candidate answer (the text is built by
  :func:`dialog_text`; the tokenizer keeps the end when it has to cut);
- the ITM head (Linear to 2) on the [ENC] position scores each of the (100) candidates: ``p(true)`` =
  softmax(logits)[1] ranks them (:mod:`blipfast.evaluation.visdial`: MRR, R@1/5/10, mean rank, NDCG);
- training: the ITM cross-entropy over the rows of a batch, the ground-truth answer labelled 1 and the other
  candidates given 0 (the caller picks how many negatives per round).

The cross-attention K/V of a round's image + caption are projected once for every layer and shared by its
candidates through ``kv_index`` (100 candidates: one projection instead of 100). Weights load from a BLIP
pre-training or retrieval checkpoint (``text_encoder``, ``visual_encoder``, ``itm_head``; the rest left out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .. import convert
from ._checks import check_text
from .blip import BlipTextModel
from .blip_config import BlipTaskConfig
from .blip_finetune import TaskLoad, check_pixels, enc_ids, load_task_checkpoint, task_vit, vision_tokens
from .blip_vqa import PRETRAIN_EXTRAS
from .layers import ImageKV

__all__ = ["BlipVisDial", "BlipVisDialConfig", "BlipVisDialOutput", "dialog_text"]


class BlipVisDialConfig(BlipTaskConfig):
    """:class:`~blipfast.models.blip_config.BlipTaskConfig` at 384 px; the vision width must equal the text width
    (the caption's states join the image tokens)."""

    IMAGE_SIZE = 384

    def _validate(self) -> None:
        super()._validate()
        if self.vision.hidden_size != self.text.hidden_size:
            self._err(f"the vision width ({self.vision.hidden_size}) must equal the text width "
                      f"({self.text.hidden_size}): the caption's states join the image tokens")


def dialog_text(history: Sequence, question: str, answer: str, sep: str = "[SEP]") -> str:
    """The dialog encoder's text of one candidate: the previous rounds' ``(question, answer)`` pairs, ``sep``, the
    question, ``sep``, the candidate answer (the tokenizer adds [CLS], which the model replaces by [ENC])."""
    past = " ".join(f"{q} {a}" for q, a in history)
    return f"{past} {sep} {question} {sep} {answer}" if past else f"{question} {sep} {answer}"


@dataclass
class BlipVisDialOutput(ModelOutput):
    """``loss`` (with labels): the ITM cross-entropy; ``logits`` [R, 2] of the candidate rows; ``scores`` [R]:
    p(true) of each row (the ranking score)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


class BlipVisDial(nn.Module):
    """BLIP's discriminative VisDial model (see the module docstring)."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = BlipVisDialConfig.of(config)
        self.config = cfg
        self.vision_model = task_vit(cfg.vision, cfg.drop_path_rate)
        self.text_encoder = BlipTextModel(cfg.text, add_pooling_layer=False)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)

    def context_kv(self, pixel_values: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> ImageKV:
        """The cross-attention K/V (every layer) of each image with its caption: ViT tokens and the caption's
        text-only states concatenated [B, N + Tc] (the caption's padding masked)."""
        check_pixels("BlipVisDial", pixel_values, self.config.vision.image_size)
        b = pixel_values.shape[0]
        check_text("BlipVisDial", caption_ids, caption_mask, b, self.config.text.max_position_embeddings,
                   pixel_values.device, "pixel_values")
        image = vision_tokens(self.vision_model, pixel_values)
        caption = self.text_encoder(caption_ids.long(), attention_mask=caption_mask != 0).last_hidden_state
        mask = torch.cat([torch.ones(image.shape[:2], dtype=torch.bool, device=image.device), caption_mask != 0], 1)
        return self.text_encoder.image_kv(torch.cat([image, caption.to(image.dtype)], 1), mask)

    def score(self, context: ImageKV, dialog_ids: torch.Tensor, dialog_mask: torch.Tensor,
              context_index: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None
              ) -> BlipVisDialOutput:
        """ITM logits of candidate rows ``dialog_ids`` / ``dialog_mask`` [R, T] ([CLS] first: [ENC] replaces it)
        over ``context`` (:meth:`context_kv`); ``context_index`` [R]: the round of each row (None: row i, round i);
        ``labels`` [R] (1: the ground-truth answer) for the loss."""
        r = dialog_ids.shape[0] if isinstance(dialog_ids, torch.Tensor) else 0
        dev = context[0][0].device
        check_text("BlipVisDial", dialog_ids, dialog_mask, r, self.config.text.max_position_embeddings, dev,
                   "the context")
        h = self.text_encoder(enc_ids(dialog_ids, self.config.enc_token_id), attention_mask=dialog_mask != 0,
                              encoder_kv=context, kv_index=context_index).last_hidden_state
        logits = self.itm_head(h[:, 0])
        x = logits if logits.dtype == torch.float64 else logits.float()
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (r,) or labels.is_floating_point():
                raise ValueError(f"BlipVisDial: labels must be an int tensor [{r}] of 0 / 1")
            loss = F.cross_entropy(x, labels.long())
        return BlipVisDialOutput(loss=loss, logits=logits, scores=x.softmax(-1)[:, 1])

    def forward(self, pixel_values: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                dialog_ids: torch.Tensor, dialog_mask: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> BlipVisDialOutput:
        """Rounds with their candidates: ``pixel_values`` [B, 3, S, S], ``caption_*`` [B, Tc], ``dialog_*``
        [B, C, T] (C candidates per round), ``labels`` [B, C]; ``scores`` come back as [B, C]."""
        if not isinstance(dialog_ids, torch.Tensor) or dialog_ids.dim() != 3:
            raise ValueError("BlipVisDial: dialog_ids must be [B, C, T] (C candidate answers per round)")
        b, c, _ = dialog_ids.shape
        kv = self.context_kv(pixel_values, caption_ids, caption_mask)
        index = torch.arange(b * c, device=dialog_ids.device) // c
        out = self.score(kv, dialog_ids.flatten(0, 1), dialog_mask.flatten(0, 1), index,
                         None if labels is None else labels.flatten())
        return BlipVisDialOutput(loss=out.loss, logits=out.logits.view(b, c, 2), scores=out.scores.view(b, c))

    def load_lavis_state_dict(self, state_dict, what: str = "BlipVisDial.load_lavis_state_dict") -> TaskLoad:
        """A Salesforce BLIP pre-training or retrieval checkpoint (or a blipfast VisDial one): its ViT, text
        encoder and ITM head; the rest left out and listed."""
        return load_task_checkpoint(self, state_dict, drop=PRETRAIN_EXTRAS + (r"text_decoder\.",), what=what)

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "BlipVisDial":
        model = cls(config)
        model.load_lavis_state_dict(convert.load_state_dict(checkpoint))
        return model
