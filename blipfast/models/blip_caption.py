"""BLIP (v1) image captioning (Salesforce BLIP ``BLIP_Decoder``, ``models/blip.py`` ``blip_decoder``, and
``train_caption.py``; docs/blip-finetune.md) on blipfast's fused ops.

Training loss (``BLIP_Decoder.forward``): the caption is ``prompt + pre_caption(caption)`` ("a picture of "),
BERT-tokenised with [DEC] in place of [CLS]; the image-grounded decoder (causal self-attention, cross-attention to
the ViT's tokens in every layer) predicts token t + 1 at position t; the targets exclude [PAD] and the first
``prompt_length`` positions (``len(tokenizer(prompt).input_ids) - 1``: [DEC] and the prompt's words, 4 for BLIP's
prompt with BERT's vocabulary); label-smoothed (0.1) cross-entropy averaged over every target of the batch. The
image K/V of all decoder layers come from one GEMM and the LM head's last GEMM is fused with the cross-entropy
(``ops.linear_cross_entropy``).

Generation (``BLIP_Decoder.generate``, transformers' ``generate`` on the decoder): the prompt's tokens without the
final [SEP] start every caption, [SEP] ends it; beam search (3 beams) or nucleus sampling (``top_p`` 0.9 with
repetition penalty 1.1, as BLIP's ``sample=True``); ``max_length`` 20 and ``min_length`` 5 count the prompt's
tokens, as BLIP's transformers counted them; :meth:`BlipCaptioner.caption` decodes and cuts the prompt from the
text. The decoder's cross-attention K/V are computed once per image and cached.

Weights: HF ``BlipForConditionalGeneration`` names (``vision_model.*``, ``text_decoder.{bert,cls}.*``; the word
embeddings and the LM head's output weight are one parameter, as in BLIP's ``BertLMHeadModel``);
:meth:`BlipCaptioner.load_lavis_state_dict` reads Salesforce captioning checkpoints
(``model_base_caption_capfilt_large.pth``, ...) and pre-training checkpoints as BLIP's ``load_checkpoint`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from transformers import BlipVisionModel
from transformers.utils import ModelOutput

from .. import convert
from .blip import BlipTextLMHeadModel
from .blip_config import BlipConfigBase
from .blip_momentum import check_pixels
from .blip_pretrain import tie_word_embeddings
from .blip_vision import fit_position_embeddings, fuse_vision_model, set_grad_checkpointing
from .blip2_retrieval import _inference
from .losses import decoder_lm_loss

WHO = "BlipCaptioner"
PROMPT = "a picture of "
_DECODER_TIE = ("text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight")
# what a captioner leaves unused from a pre-training or retrieval checkpoint (BLIP's strict=False load)
_UNUSED = ("text_encoder.", "text_encoder_m.", "vision_model_m.", "visual_encoder_m.", "vision_proj", "text_proj",
           "itm_head.", "temp", "image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")


class BlipCaptionConfig(BlipConfigBase):
    """Configuration of :class:`BlipCaptioner`; defaults: BLIP's ``configs/caption_coco.yaml`` with ViT-B/16 at
    384 px (no ViT checkpointing; beam 3, max 20, min 5 tokens counting the prompt; nucleus ``top_p`` 0.9 when
    sampling; ``prompt_length`` 4, "a picture of " with BERT's vocabulary)."""

    FIELDS = ("bos_token_id", "prompt_length", "lm_label_smoothing", "num_beams", "max_length", "min_length", "top_p",
              "vit_grad_ckpt", "vit_ckpt_layer")
    DEFAULTS = dict(bos_token_id=30522, prompt_length=4, lm_label_smoothing=0.1, num_beams=3, max_length=20,
                    min_length=5, top_p=0.9, vit_grad_ckpt=False, vit_ckpt_layer=0)
    IMAGE_SIZE = 384

    def _validate(self) -> None:
        super()._validate()
        if self.min_length > self.max_length:
            self._err(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        if self.prompt_length >= self.max_length:
            self._err(f"max_length ({self.max_length}) counts the prompt's {self.prompt_length} tokens: it must "
                      f"exceed them")


@dataclass
class BlipCaptionOutput(ModelOutput):
    """``loss``: the LM loss of the batch."""

    loss: Optional[torch.Tensor] = None


def _err(msg: str, cls=ValueError):
    raise cls(f"{WHO}: {msg}")


class BlipCaptioner(nn.Module):
    """BLIP (v1) captioner: ViT + image-grounded ``[DEC]`` decoder with its LM head; see the module docstring."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = BlipCaptionConfig.of(config, WHO)
        self.config = cfg
        self.vision_model = fuse_vision_model(BlipVisionModel(cfg.vision))
        if cfg.vit_grad_ckpt:
            set_grad_checkpointing(self.vision_model, cfg.vit_ckpt_layer)
        self.text_decoder = BlipTextLMHeadModel(cfg.text)  # word embeddings tied to the LM head (transformers)

    @property
    def device(self) -> torch.device:
        return self.text_decoder.cls.predictions.bias.device

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's output tokens [B, N, width]."""
        w = self.vision_model.embeddings.patch_embedding.weight
        return self.vision_model(pixel_values=pixel_values.to(w.dtype)).last_hidden_state

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> BlipCaptionOutput:
        """BLIP_Decoder's loss: ``pixel_values`` [B, 3, S, S]; ``input_ids`` / ``attention_mask`` [B, T]: the
        BERT-tokenised ``prompt + caption`` ([CLS] first: it is replaced by [DEC])."""
        cfg = self.config
        check_pixels(WHO, cfg, pixel_values, input_ids, attention_mask)
        ids = input_ids.long()
        dec_ids = torch.cat([torch.full_like(ids[:, :1], cfg.bos_token_id), ids[:, 1:]], 1)
        bert = self.text_decoder.bert
        h = bert(dec_ids, attention_mask=attention_mask != 0, encoder_kv=bert.image_kv(self.vision_tokens(pixel_values)),
                 is_decoder=True, use_cache=False).last_hidden_state
        loss = decoder_lm_loss(self.text_decoder, h, dec_ids, pad_token_id=cfg.text.pad_token_id,
                               prompt_length=cfg.prompt_length, label_smoothing=cfg.lm_label_smoothing)
        return BlipCaptionOutput(loss=loss)

    # ------------------------------------------------------------------------------------------
    # generation

    @_inference
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, *, sample: bool = False,
                 num_beams: Optional[int] = None, max_length: Optional[int] = None,
                 min_length: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None) -> torch.Tensor:
        """Token ids [B, L] (the prompt's included) of BLIP_Decoder's ``generate``: ``input_ids`` [B, P] or [P] is
        the prompt ([DEC] first, without the final [SEP]); beam search (``num_beams``, repetition penalty 1.0) or,
        with ``sample``, nucleus sampling (``top_p``, repetition penalty 1.1; transformers draws from torch's RNG).
        Defaults from the config; ``max_length`` / ``min_length`` count the prompt."""
        cfg = self.config
        check_pixels(WHO, cfg, pixel_values, None, None)
        b = pixel_values.shape[0]
        ids = input_ids.to(self.device).long()
        ids = ids.expand(b, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != b or ids.shape[1] == 0:
            _err(f"input_ids must be the prompt's tokens [P] or [B={b}, P], got {list(input_ids.shape)}")
        max_length = cfg.max_length if max_length is None else max_length
        if not ids.shape[1] < max_length <= cfg.text.max_position_embeddings:
            _err(f"max_length {max_length} must exceed the prompt's {ids.shape[1]} tokens and not exceed "
                 f"max_position_embeddings ({cfg.text.max_position_embeddings})")
        image_embeds = self.vision_tokens(pixel_values.to(self.device))
        kw = dict(max_length=max_length, min_length=cfg.min_length if min_length is None else min_length,
                  eos_token_id=cfg.text.sep_token_id, pad_token_id=cfg.text.pad_token_id)
        if sample:
            kw.update(do_sample=True, top_p=cfg.top_p if top_p is None else top_p, num_beams=1,
                      repetition_penalty=1.1 if repetition_penalty is None else repetition_penalty)
        else:
            kw.update(do_sample=False, num_beams=cfg.num_beams if num_beams is None else num_beams,
                      repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty)
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        return self.text_decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          encoder_hidden_states=image_embeds, encoder_attention_mask=mask, **kw)

    def caption(self, pixel_values: torch.Tensor, tokenizer, prompt: str = PROMPT, **kwargs) -> list:
        """Captions (str) of the images, as BLIP_Decoder's ``generate`` returns them: ``prompt`` tokenised by
        ``tokenizer`` (BLIP's BERT tokenizer with [DEC]), [DEC] in place of [CLS], the final [SEP] dropped; the
        output decoded without special tokens and the prompt's characters cut. ``kwargs``: :meth:`generate`'s."""
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"][0]
        ids = torch.cat([ids.new_tensor([self.config.bos_token_id]), ids[1:-1]])
        out = self.generate(pixel_values, ids, **kwargs)
        return [t[len(prompt):] for t in tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def to_lavis_state_dict(self) -> dict:
        """The weights under Salesforce BLIP names (``visual_encoder.*``, ``text_decoder.*``), as BLIP_Decoder
        saves them (the tied word embeddings and LM head weight under both keys)."""
        sd = {k: v for k, v in self.state_dict().items() if not k.endswith("position_ids")}
        return convert.hf_to_blip(sd, strict=True).state_dict

    def load_lavis_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                              what: str = f"{WHO}.load_lavis_state_dict") -> list:
        """Load a Salesforce BLIP checkpoint's state dict (captioning or pre-training; LAVIS' and HF's names too)
        as BLIP's ``load_checkpoint`` does: the ViT's position embeddings interpolated to its grid, the keys a
        captioner has no place for (a pre-training checkpoint's encoder, momentum copies, heads and queues) unused,
        the decoder's word embeddings and LM head weight (one parameter) from the LM head's key when both are there
        and differ (BLIP loads the head's last). Every other key must map (:func:`blipfast.convert.load_into`).
        Returns notes: what was interpolated, replaced or left unused; ``what`` names the weights in errors."""
        sd, notes = tie_word_embeddings(state_dict, _DECODER_TIE)
        notes = fit_position_embeddings(sd, self) + notes
        unused = sorted(k for k in sd if k.startswith(_UNUSED))
        if unused:
            notes.append(f"{len(unused)} key(s) unused (no place in a captioner), e.g. {unused[:3]}")
        convert.load_into(self, {k: v for k, v in sd.items() if k not in unused}, what=what)
        return notes

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "BlipCaptioner":
        """A model from a Salesforce BLIP checkpoint (a ``.pth`` path read with ``weights_only=True``, a dict with
        key "model" or a state dict); ``config`` defaults to the sizes the weights tell."""
        sd = convert.load_state_dict(checkpoint)
        if config is None:
            config = BlipCaptionConfig.from_state_dict(convert.to_hf(sd)[0].state_dict, "text_decoder.bert.")
        model = cls(config)
        model.load_lavis_state_dict(sd)
        return model

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: Any = None) -> "BlipCaptioner":
        """From an HF ``BlipForConditionalGeneration`` (weights copied); ``config`` defaults to one built from the
        HF config (its text config's [DEC] as ``bos_token_id``)."""
        hc = getattr(hf_model, "config", None)
        if hc is None or not hasattr(hf_model, "text_decoder") or not hasattr(hf_model, "vision_model"):
            _err(f"from_hf needs an HF BlipForConditionalGeneration, got {type(hf_model).__name__}", TypeError)
        if config is None:
            tc = hc.text_config
            config = BlipCaptionConfig(text=tc, vision=hc.vision_config, bos_token_id=tc.bos_token_id)
        model = cls(config)
        model.load_lavis_state_dict(hf_model.state_dict())
        w = hf_model.text_decoder.cls.predictions.bias
        return model.to(device=w.device, dtype=w.dtype).train(hf_model.training)
