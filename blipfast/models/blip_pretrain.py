"""BLIP (v1) pre-training (Salesforce BLIP ``BLIP_Pretrain``, docs/semantics.md#blip-pre-training) on blipfast's fused
ops.

A step computes BLIP's three losses with BLIP's semantics:

- ITC: image feature ``normalize(vision_proj(ViT(image)[:, 0]))``, text feature ``normalize(text_proj(text
  encoder(text)[:, 0]))`` (the encoder without cross-attention); momentum copies of the ViT, the text encoder and
  both projections (``*_m``, updated ``p_m = 0.995 p_m + 0.005 p`` before they compute the momentum features, no
  gradient) give the features of the batch and, through two queues of ``queue_size`` (57600) past momentum
  features, the columns [batch | queue] of the similarity matrices; targets ``alpha softmax(s_m) + (1 - alpha)
  one-hot`` (with ``image_ids``: BLIP_Retrieval's targets, every column of the same image id, the index queue
  included, a positive); ``temp`` is clamped to [0.001, 0.5] first. The momentum features are then enqueued,
  gathered over the process group under torch.distributed as BLIP does (the pointer moves on the device).
- ITM: the [ENC]-first caption through the image-grounded encoder, ``itm_head`` on the first position; negatives
  from the LOCAL batch drawn with weights ``softmax(s[:, :B]) + 1e-4``, the own pair (or same image id) excluded,
  by ``ops.sample_hard_negatives_from_gathered(..., floor=1e-4)`` on the device; labels [1]*B + [0]*2B.
- LM: the [DEC]-first caption through the decoder (causal self-attention of its own, every other parameter shared
  with the encoder), label-smoothed (0.1) next-token cross-entropy, [PAD] (and the first ``prompt_length``
  positions) excluded.

Where BLIP runs four text passes over the image (ITM positives, ITM negatives over gathered image copies, the
decoder) that each project the image tokens to cross-attention K/V in all 12 layers, here
``text_encoder.image_kv`` projects them ONCE per image; the 3B ITM rows (one pass) and the decoder share them
through ``kv_index`` (the decoder's cross-attention IS the encoder's). No host synchronisation (BLIP: one
``multinomial(...).item()`` per negative, ``int(queue_ptr)``): ``torch.compile(fullgraph=True)`` and CUDA graphs
work. The ViT is Hugging Face's ``BlipVisionModel`` (trainable) with SDPA attention (``blip_vision``).

Deliberate differences from BLIP: a batch of one trains ITM on its positive pair only (BLIP's sampler crashes);
a queue whose size is not a multiple of the global batch wraps around (BLIP asserts); the ITC similarities are
computed in float32 also under autocast.

Tied weights, as in BLIP since its commit 073b821 (``tie_encoder_decoder_weights(text_encoder, text_decoder.bert,
...)`` rebinds the ENCODER's parameters to the decoder's, whose word embeddings already are the LM head's output
weight): ``text_encoder.embeddings.word_embeddings.weight``, ``text_decoder.bert.embeddings.word_embeddings.weight``
and ``text_decoder.cls.predictions.decoder.weight`` are ONE parameter, whose gradient sums the embedding lookups of
the three text passes and the LM head. A checkpoint holds the three keys (``to_lavis_state_dict`` writes all three);
loading one whose three values differ (BLIP checkpoints trained before that commit) keeps the LM head's, as BLIP's
loader does (:func:`tie_word_embeddings`).

Weights: module names follow the HF key space of ``blipfast.convert`` for BLIP (``vision_model.*``,
``text_encoder.*``, ``text_decoder.{bert,cls}.*``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, the
``*_m`` copies, ``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr``); ``from_lavis`` /
``load_lavis_state_dict`` read Salesforce BLIP (and LAVIS BLIP) checkpoints, ``to_lavis_state_dict`` writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from transformers import BlipVisionModel
from transformers.utils import ModelOutput

from .. import convert, ops
from ..distributed import group_info, itm_batch_indices
from ._checks import check_index
from .blip import BlipTextLMHeadModel, BlipTextModel, share_encoder_decoder
from .blip_config import TEXT_DEFAULTS, TEXT_FIELDS, VISION_DEFAULTS, VISION_FIELDS, BlipConfigBase  # noqa: F401
from .blip_momentum import MomentumITC, as_alpha, check_pixels, features
from .blip_vision import fuse_vision_model
from .losses import decoder_lm_loss, itm_loss

# the LM head's output weight, the decoder's and the encoder's word embeddings: ONE parameter (BLIP's tie)
TIED_WORD_EMBEDDINGS = ("text_encoder.embeddings.word_embeddings.weight",
                        "text_decoder.bert.embeddings.word_embeddings.weight",
                        "text_decoder.cls.predictions.decoder.weight")


class BlipPretrainConfig(BlipConfigBase):
    """Configuration of :class:`BlipPretrain` (defaults: BLIP's ViT-B pre-training, ``configs/pretrain.yaml``).

    ``text``: a ``BlipTextConfig`` or a dict of its fields over BLIP's ``med_config`` (``encoder_hidden_size``
    defaults to the vision width); ``vision``: a ``BlipVisionConfig`` or a dict over BLIP's ViT-B/16 at 224 px.
    ``BlipPretrainConfig(**config.to_dict())`` rebuilds a config (docs: :mod:`blipfast.models.blip_config`)."""

    FIELDS = ("embed_dim", "queue_size", "momentum", "alpha", "enc_token_id", "bos_token_id", "lm_label_smoothing",
              "itm_floor", "prompt_length")
    DEFAULTS = dict(embed_dim=256, queue_size=57600, momentum=0.995, alpha=0.4, enc_token_id=30523,
                    bos_token_id=30522, lm_label_smoothing=0.1, itm_floor=1e-4, prompt_length=0)


@dataclass
class BlipPretrainOutput(ModelOutput):
    """``loss`` = ``loss_itc + loss_itm + loss_lm``; ``s_i2t`` / ``s_t2i`` [B, B]: the local block of the ITC
    logits the negatives were drawn from (detached); the negatives as local indices [B] (-1: nothing drawable)."""

    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    loss_lm: Optional[torch.Tensor] = None
    s_i2t: Optional[torch.Tensor] = None
    s_t2i: Optional[torch.Tensor] = None
    neg_text_index: Optional[torch.Tensor] = None
    neg_image_index: Optional[torch.Tensor] = None


def _check_index(name: str, t, b: int, device) -> torch.Tensor:
    return check_index("BlipPretrain", name, t, b, device, "pixel_values")


def tie_word_embeddings(state_dict: Mapping[str, torch.Tensor], keys=TIED_WORD_EMBEDDINGS) -> tuple[dict, list]:
    """(state dict, notes): the tied ``keys`` of a checkpoint made equal as BLIP's loader leaves them. BLIP's
    ``load_state_dict`` copies each key into the ONE tied parameter in module order, so the last key the checkpoint
    holds wins (``text_decoder.cls.predictions.decoder.weight`` when present): checkpoints trained before BLIP's
    commit 073b821 (which made the three one parameter) hold an LM-head weight of their own, and that is the one a
    model loaded from them uses. ``notes`` names the keys whose values were replaced."""
    present = [k for k in keys if k in state_dict]
    if len(present) < 2:
        return dict(state_dict), []
    winner = state_dict[present[-1]]
    out, notes = dict(state_dict), []
    for k in present[:-1]:
        if not torch.equal(state_dict[k], winner):
            out[k] = winner
            notes.append(f"{k} (replaced by {present[-1]}, as BLIP's loader leaves the tied weight)")
    return out, notes


class BlipPretrain(MomentumITC, nn.Module):
    """BLIP (v1) pre-training model (ITC + ITM + LM) on blipfast's fused ops; see the module docstring."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = config if isinstance(config, BlipPretrainConfig) else (
            BlipPretrainConfig(**config) if isinstance(config, dict) else BlipPretrainConfig() if config is None
            else None)
        if cfg is None:
            raise TypeError(f"BlipPretrain: config must be a BlipPretrainConfig or a dict, got {type(config).__name__}")
        self.config = cfg
        tc, vc, e = cfg.text, cfg.vision, cfg.embed_dim
        self.vision_model = fuse_vision_model(BlipVisionModel(vc))
        self.text_encoder = BlipTextModel(tc, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(tc)
        share_encoder_decoder(self.text_encoder, self.text_decoder.bert)
        # BLIP's tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention') rebinds the
        # encoder's word embeddings to the decoder's, which already ARE the LM head's output weight: one parameter
        self.text_decoder.cls.predictions.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.vision_proj = nn.Linear(vc.hidden_size, e)
        self.text_proj = nn.Linear(tc.hidden_size, e)
        self.itm_head = nn.Linear(tc.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # momentum copies (no gradient), initialised from the online modules as BLIP's copy_params()
        self.vision_model_m = fuse_vision_model(BlipVisionModel(vc))
        self.text_encoder_m = BlipTextModel(tc, add_pooling_layer=False, init_weights=False)
        self.vision_proj_m = nn.Linear(vc.hidden_size, e)
        self.text_proj_m = nn.Linear(tc.hidden_size, e)
        self.copy_params()
        self._register_queues()

    def lm_loss(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """Label-smoothed next-token cross-entropy of the decoder pass (:func:`~blipfast.models.losses.decoder_lm_loss`:
        [PAD] and the first ``prompt_length`` positions excluded, mean over the targets)."""
        cfg = self.config
        return decoder_lm_loss(self.text_decoder, hidden, decoder_ids, pad_token_id=cfg.text.pad_token_id,
                               prompt_length=cfg.prompt_length, label_smoothing=cfg.lm_label_smoothing)

    # ------------------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                alpha, image_ids: Optional[torch.Tensor] = None, negatives: Optional[tuple] = None,
                process_group=None, sample_seed=None) -> BlipPretrainOutput:
        """One pre-training step's losses (see the module docstring); updates the momentum copies and the queues.

        ``pixel_values`` [B, 3, S, S]; ``input_ids`` / ``attention_mask`` [B, T]: BERT-tokenised captions starting
        with [CLS] (1 = token); ``alpha``: the distillation weight (a float in [0, 1] or a one-element tensor on the
        device; BLIP ramps it to 0.4 over the first two epochs); ``image_ids`` [B]: pairs of the same image are ITC
        positives (the index queue included) and never each other's negatives; ``negatives``: ``(neg_text_index,
        neg_image_index)`` local indices (-1: none) instead of drawing; ``process_group``: the group the enqueued
        features are gathered over; ``sample_seed``: the seed of the draw (an int or an int64 one-element tensor;
        the rank is added, so ranks draw independently; default: from torch's RNG)."""
        cfg = self.config
        check_pixels("BlipPretrain", cfg, pixel_values, input_ids, attention_mask)
        dev = pixel_values.device
        b = input_ids.shape[0]
        rank, world = group_info(process_group)
        if b * world > cfg.queue_size:
            raise ValueError(f"BlipPretrain: the global batch ({b} x {world}) exceeds queue_size ({cfg.queue_size})")
        if image_ids is not None:
            image_ids = _check_index("image_ids", image_ids, b, dev)
        alpha = as_alpha("BlipPretrain", alpha, dev)
        input_ids = input_ids.long()
        text_mask = attention_mask != 0
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # ITC: online features, then the momentum update and the momentum features
        image_embeds = self.vision_tokens(pixel_values)
        image_feat = features(image_embeds[:, 0], self.vision_proj)
        text_h = self.text_encoder(input_ids, attention_mask=text_mask).last_hidden_state
        text_feat = features(text_h[:, 0], self.text_proj)
        image_feat_m, text_feat_m = self.momentum_features(pixel_values, input_ids, text_mask)
        loss_itc, s_i2t, s_t2i = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, image_ids)
        self._enqueue(image_feat_m, text_feat_m, image_ids, process_group)

        # ITM: negatives from the local batch (softmax + floor), image K/V once per image for all 3B rows
        if negatives is None:
            seed = ops.check_seed("BlipPretrain", sample_seed, dev) if sample_seed is not None else None
            if seed is not None and rank:
                seed = seed + rank
            neg_text, neg_image = ops.sample_hard_negatives_from_gathered(
                s_i2t[:, :b], s_t2i[:, :b], rank=0, image_ids=image_ids, image_ids_all=image_ids, seed=seed,
                floor=cfg.itm_floor)
        else:
            if not isinstance(negatives, (tuple, list)) or len(negatives) != 2:
                raise ValueError("BlipPretrain: negatives must be a pair (neg_text_index, neg_image_index)")
            neg_text = _check_index("negatives[0] (neg_text_index)", negatives[0], b, dev)
            neg_image = _check_index("negatives[1] (neg_image_index)", negatives[1], b, dev)
        batch = itm_batch_indices(neg_text, neg_image)
        image_kv = self.text_encoder.image_kv(image_embeds)
        enc_ids = torch.cat([torch.full_like(input_ids[:, :1], cfg.enc_token_id), input_ids[:, 1:]], 1)
        h_itm = self.text_encoder(enc_ids.index_select(0, batch.text_index),
                                  attention_mask=text_mask.index_select(0, batch.text_index), encoder_kv=image_kv,
                                  kv_index=batch.kv_index).last_hidden_state
        loss_itm = itm_loss(self.itm_head(h_itm[:, 0]), batch.labels, batch.weight)

        # LM: the [DEC] decoder over the same image K/V (its cross-attention is the encoder's)
        dec_ids = torch.cat([torch.full_like(input_ids[:, :1], cfg.bos_token_id), input_ids[:, 1:]], 1)
        h_dec = self.text_decoder.bert(dec_ids, attention_mask=text_mask, encoder_kv=image_kv, is_decoder=True,
                                       use_cache=False).last_hidden_state
        loss_lm = self.lm_loss(h_dec, dec_ids)

        return BlipPretrainOutput(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm,
                                  loss_lm=loss_lm, s_i2t=s_i2t[:, :b].detach(), s_t2i=s_t2i[:, :b].detach(),
                                  neg_text_index=neg_text, neg_image_index=neg_image)

    # ------------------------------------------------------------------------------------------
    # checkpoints (Salesforce BLIP / LAVIS BLIP names)

    def to_lavis_state_dict(self) -> dict:
        """The weights, momentum copies and queues under Salesforce BLIP names (``visual_encoder.*``,
        ``text_encoder.*``, ``text_decoder.*``, ``*_m``, ``image_queue``, ``queue_ptr``, ...), as BLIP_Pretrain
        saves them (LAVIS' BLIP models use the same names)."""
        sd = {k: v for k, v in self.state_dict().items() if not k.endswith("position_ids")}
        return convert.hf_to_blip(sd, strict=True).state_dict

    def load_lavis_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> list:
        """Load a Salesforce BLIP / LAVIS BLIP state dict (pre-training, retrieval or ITM checkpoints; HF BLIP
        names work too) with :func:`blipfast.convert.load_into`: every key must map to this model (a ValueError
        names those that do not). Absent momentum copies start from the online modules (BLIP's ``copy_params``),
        an absent index queue holds -100, absent queues stay random; every other parameter must be there.
        ``ptr_queue`` (BLIP_Retrieval) is the pointer. The three tied word-embedding keys go in as BLIP's loader
        takes them (:func:`tie_word_embeddings`); returns its notes (the keys whose values it replaced)."""
        state_dict, notes = tie_word_embeddings(state_dict)
        self._load_with_momentum(state_dict, what="BlipPretrain.load_lavis_state_dict")
        return notes

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "BlipPretrain":
        """A model from a Salesforce BLIP checkpoint: a ``.pth`` path (``weights_only=True``), a dict with key
        ``"model"``, or a plain state dict."""
        model = cls(config)
        model.load_lavis_state_dict(convert.load_state_dict(checkpoint))
        return model
