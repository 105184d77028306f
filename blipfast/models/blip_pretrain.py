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
computed in float32 also under autocast. Like BLIP (its ``tie_encoder_decoder_weights`` rebinds the decoder's
word embeddings to the encoder's), the decoder's LM head keeps a weight of its own.

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
import torch.nn.functional as F
from transformers import BlipVisionConfig, BlipVisionModel
from transformers.utils import ModelOutput

from .. import convert, ops
from ..distributed import gather_no_grad, group_info, itm_batch_indices
from ..ops import linear_cross_entropy, no_autocast
from ._checks import check_index, check_text
from .blip import BlipTextLMHeadModel, BlipTextModel, blip_text_config, share_encoder_decoder
from .blip_vision import fuse_vision_model
from .losses import itm_loss

# BLIP's med_config.json (BERT-base with cross-attention, [DEC] and [ENC] added: vocab 30524), dropout on
TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                     initializer_range=0.02, pad_token_id=0, bos_token_id=30522, sep_token_id=102, eos_token_id=2,
                     label_smoothing=0.1)
TEXT_FIELDS = tuple(TEXT_DEFAULTS) + ("encoder_hidden_size",)
# BLIP's ViT-B/16 at 224 px (timm's LayerNorm eps 1e-6, no dropout)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
                       initializer_range=0.02)
VISION_FIELDS = tuple(VISION_DEFAULTS)


def _fields(cfg, names) -> dict:
    return {k: getattr(cfg, k) for k in names}


class BlipPretrainConfig:
    """Configuration of :class:`BlipPretrain` (defaults: BLIP's ViT-B pre-training, ``configs/pretrain.yaml``).

    ``text``: a ``BlipTextConfig`` or a dict of its fields over BLIP's ``med_config`` (``encoder_hidden_size``
    defaults to the vision width); ``vision``: a ``BlipVisionConfig`` or a dict over BLIP's ViT-B/16 at 224 px.
    ``BlipPretrainConfig(**config.to_dict())`` rebuilds a config."""

    FIELDS = ("embed_dim", "queue_size", "momentum", "alpha", "enc_token_id", "bos_token_id", "lm_label_smoothing",
              "itm_floor", "prompt_length")

    def __init__(self, text: Any = None, vision: Any = None, embed_dim: int = 256, queue_size: int = 57600,
                 momentum: float = 0.995, alpha: float = 0.4, enc_token_id: int = 30523, bos_token_id: int = 30522,
                 lm_label_smoothing: float = 0.1, itm_floor: float = 1e-4, prompt_length: int = 0):
        if isinstance(vision, BlipVisionConfig):
            vision = _fields(vision, VISION_FIELDS)
        elif vision is not None and not isinstance(vision, dict):
            raise TypeError(f"BlipPretrainConfig: vision must be a BlipVisionConfig or a dict, got "
                            f"{type(vision).__name__}")
        unknown = sorted(set(vision or {}) - set(VISION_FIELDS))
        if unknown:
            raise ValueError(f"BlipPretrainConfig: unknown vision field(s) {unknown}; known: {list(VISION_FIELDS)}")
        self.vision = BlipVisionConfig(**{**VISION_DEFAULTS, **(vision or {})})
        if text is not None and not isinstance(text, dict):
            text = _fields(blip_text_config(text), TEXT_FIELDS)
        text = {**TEXT_DEFAULTS, "encoder_hidden_size": self.vision.hidden_size, **(text or {})}
        unknown = sorted(set(text) - set(TEXT_FIELDS))
        if unknown:
            raise ValueError(f"BlipPretrainConfig: unknown text field(s) {unknown}; known: {list(TEXT_FIELDS)}")
        self.text = blip_text_config(text, is_decoder=True)  # cross-attention in every layer
        self.embed_dim, self.queue_size, self.momentum, self.alpha = embed_dim, queue_size, momentum, alpha
        self.enc_token_id, self.bos_token_id = enc_token_id, bos_token_id
        self.lm_label_smoothing, self.itm_floor, self.prompt_length = lm_label_smoothing, itm_floor, prompt_length
        self._validate()

    def _validate(self) -> None:
        def err(msg):
            raise ValueError(f"BlipPretrainConfig: {msg}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("embed_dim", "queue_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                err(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("momentum", "alpha", "lm_label_smoothing"):
            v = getattr(self, name)
            if not is_num(v) or not 0.0 <= v <= 1.0:
                err(f"{name} must be a float in [0, 1], got {v!r}")
        if not is_num(self.itm_floor) or not 0.0 <= self.itm_floor < float("inf"):
            err(f"itm_floor must be a finite float >= 0, got {self.itm_floor!r}")
        vocab = self.text.vocab_size
        for name in ("enc_token_id", "bos_token_id"):
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v < vocab:
                err(f"{name} must be an int in [0, vocab_size={vocab}), got {v!r} (the text vocabulary must include "
                    f"[DEC] and [ENC])")
        if not is_int(self.prompt_length) or not 0 <= self.prompt_length < self.text.max_position_embeddings:
            err(f"prompt_length must be an int in [0, max_position_embeddings), got {self.prompt_length!r}")
        if self.text.encoder_hidden_size != self.vision.hidden_size:
            err(f"text.encoder_hidden_size ({self.text.encoder_hidden_size}) must equal the vision width "
                f"({self.vision.hidden_size})")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            err(f"vision.hidden_size ({self.vision.hidden_size}) must be a multiple of vision.num_attention_heads "
                f"({self.vision.num_attention_heads})")

    def to_dict(self) -> dict:
        return {"text": _fields(self.text, TEXT_FIELDS), "vision": _fields(self.vision, VISION_FIELDS),
                **{k: getattr(self, k) for k in self.FIELDS}}

    def __eq__(self, other):
        return isinstance(other, BlipPretrainConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "BlipPretrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


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


def _check_batch(cfg: BlipPretrainConfig, pixel_values, input_ids, attention_mask) -> None:
    v = cfg.vision
    size = v.image_size
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or not pixel_values.is_floating_point() \
            or tuple(pixel_values.shape[1:]) != (3, size, size) or pixel_values.shape[0] == 0:
        got = (f"{list(pixel_values.shape)} {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor)
               else type(pixel_values).__name__)
        raise ValueError(f"BlipPretrain: pixel_values must be a float tensor [B, 3, {size}, {size}], got {got}")
    check_text("BlipPretrain", input_ids, attention_mask, pixel_values.shape[0], cfg.text.max_position_embeddings,
               pixel_values.device, "pixel_values")


def _check_index(name: str, t, b: int, device) -> torch.Tensor:
    return check_index("BlipPretrain", name, t, b, device, "pixel_values")


def _alpha(alpha, device) -> torch.Tensor:
    """alpha as a 0-d float32 tensor on ``device`` (a Python float is validated; a tensor is taken as is, so that
    a trainer can feed a static buffer to a CUDA graph or a compiled step without recompiling)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point() or alpha.device != device:
            raise ValueError(f"BlipPretrain: alpha must be a float or a one-element float tensor on {device}, got "
                             f"{list(alpha.shape)} {alpha.dtype} on {alpha.device}")
        return alpha.reshape(())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"BlipPretrain: alpha must be a float in [0, 1], got {alpha!r}")
    return torch.full((), float(alpha), dtype=torch.float64, device=device)


def _features(h: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """normalize(proj(h)) in float32 (float64 stays), outside autocast: the ITC features."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    with no_autocast(h.device):
        return F.normalize(F.linear(h.to(dt), proj.weight.to(dt), proj.bias.to(dt)), dim=-1)


class BlipPretrain(nn.Module):
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
        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pairs = None

    # ------------------------------------------------------------------------------------------
    # momentum encoders

    def model_pairs(self) -> list:
        """[(online module, momentum module)] as BLIP's ``model_pairs``."""
        return [(self.vision_model, self.vision_model_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def _param_lists(self):
        if self._pairs is None:
            on, mo = [], []
            for a, b in self.model_pairs():
                pa, pb = list(a.parameters()), list(b.parameters())
                if len(pa) != len(pb) or any(x.shape != y.shape for x, y in zip(pa, pb)):
                    raise ValueError(f"BlipPretrain: {type(a).__name__} and its momentum copy differ in their "
                                     f"parameters")
                on += pa
                mo += pb
            self._pairs = (on, mo)
        return self._pairs

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half() may swap Parameters: rebuild the lists
        self._pairs = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._pairs = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum copies = the online modules, frozen (BLIP's ``copy_params``)."""
        self._pairs = None
        on, mo = self._param_lists()
        for p, pm in zip(on, mo):
            pm.copy_(p)
            pm.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = momentum * p_m + (1 - momentum) * p`` for every momentum parameter (two foreach kernels)."""
        on, mo = self._param_lists()
        m = self.config.momentum
        torch._foreach_mul_(mo, m)
        torch._foreach_add_(mo, on, alpha=1.0 - m)

    # ------------------------------------------------------------------------------------------
    # the pieces

    def vision_tokens(self, pixel_values: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """The ViT's output tokens [B, N, width] (after its final LayerNorm, as BLIP's ``visual_encoder``)."""
        vit = self.vision_model_m if momentum else self.vision_model
        w = vit.embeddings.patch_embedding.weight
        return vit(pixel_values=pixel_values.to(w.dtype)).last_hidden_state

    @torch.no_grad()
    def _enqueue(self, image_feat_m, text_feat_m, image_ids, process_group) -> None:
        """BLIP's ``_dequeue_and_enqueue``: the momentum features (and image ids) of every rank at the pointer."""
        e = self.config.embed_dim
        feats = gather_no_grad(torch.cat([image_feat_m, text_feat_m], 1), process_group).to(self.image_queue.dtype)
        bw = feats.shape[0]
        if image_ids is not None:
            ids = gather_no_grad(image_ids, process_group)
        else:
            ids = torch.full((bw,), -100, dtype=torch.long, device=feats.device)
        slots = (self.queue_ptr + torch.arange(bw, device=feats.device)) % self.config.queue_size
        self.image_queue.index_copy_(1, slots, feats[:, :e].t())
        self.text_queue.index_copy_(1, slots, feats[:, e:].t())
        self.idx_queue.index_copy_(1, slots, ids.view(1, bw))
        self.queue_ptr.copy_((self.queue_ptr + bw) % self.config.queue_size)

    def _itc(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, image_ids):
        """(loss, s_i2t, s_t2i): BLIP's ITC over [batch | queue] with momentum-distilled targets."""
        b = image_feat.shape[0]
        dt = image_feat.dtype
        temp = self.temp.to(dt)
        with no_autocast(image_feat.device), torch.no_grad():
            img_all = torch.cat([image_feat_m, self.image_queue.t().to(dt)])  # [B + Q, E]
            txt_all = torch.cat([text_feat_m, self.text_queue.t().to(dt)])
            if image_ids is None:
                pos = F.one_hot(torch.arange(b, device=image_feat.device), img_all.shape[0]).to(dt)
            else:
                idx_all = torch.cat([image_ids, self.idx_queue[0]])
                pos = (image_ids[:, None] == idx_all[None, :]).to(dt)
                pos = pos / pos.sum(1, keepdim=True)
            a = alpha.to(dt)
            t_i2t = a * F.softmax(image_feat_m @ txt_all.t() / temp, dim=1) + (1 - a) * pos
            t_t2i = a * F.softmax(text_feat_m @ img_all.t() / temp, dim=1) + (1 - a) * pos
        with no_autocast(image_feat.device):
            s_i2t = (image_feat / temp) @ txt_all.t()
            s_t2i = (text_feat / temp) @ img_all.t()
            loss_i2t = -(F.log_softmax(s_i2t, dim=1) * t_i2t).sum(1).mean()
            loss_t2i = -(F.log_softmax(s_t2i, dim=1) * t_t2i).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2, s_i2t, s_t2i

    def lm_loss(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        """Label-smoothed next-token cross-entropy of the decoder pass (BLIP: targets = decoder ids with [PAD] and
        the first ``prompt_length`` positions -> -100, token t + 1 predicted at position t, mean over targets)."""
        cfg = self.config
        labels = decoder_ids
        if cfg.text.pad_token_id is not None:
            labels = labels.masked_fill(labels == cfg.text.pad_token_id, -100)
        if cfg.prompt_length:
            pos = torch.arange(labels.shape[1], device=labels.device)
            labels = labels.masked_fill(pos[None, :] < cfg.prompt_length, -100)
        head = self.text_decoder.cls.predictions
        tr = head.transform
        x = self.text_decoder._act(F.linear(hidden[:, :-1], tr.dense.weight, tr.dense.bias))
        x = F.layer_norm(x, x.shape[-1:], tr.LayerNorm.weight, tr.LayerNorm.bias, tr.LayerNorm.eps)
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), head.decoder.weight, head.decoder.bias,
                                    labels[:, 1:].reshape(-1), label_smoothing=cfg.lm_label_smoothing)

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
        _check_batch(cfg, pixel_values, input_ids, attention_mask)
        dev = pixel_values.device
        b = input_ids.shape[0]
        rank, world = group_info(process_group)
        if b * world > cfg.queue_size:
            raise ValueError(f"BlipPretrain: the global batch ({b} x {world}) exceeds queue_size ({cfg.queue_size})")
        if image_ids is not None:
            image_ids = _check_index("image_ids", image_ids, b, dev)
        alpha = _alpha(alpha, dev)
        input_ids = input_ids.long()
        text_mask = attention_mask != 0
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # ITC: online features, then the momentum update and the momentum features
        image_embeds = self.vision_tokens(pixel_values)
        image_feat = _features(image_embeds[:, 0], self.vision_proj)
        text_h = self.text_encoder(input_ids, attention_mask=text_mask).last_hidden_state
        text_feat = _features(text_h[:, 0], self.text_proj)
        with torch.no_grad():
            self.momentum_update()
            image_feat_m = _features(self.vision_tokens(pixel_values, momentum=True)[:, 0], self.vision_proj_m)
            text_h_m = self.text_encoder_m(input_ids, attention_mask=text_mask).last_hidden_state
            text_feat_m = _features(text_h_m[:, 0], self.text_proj_m)
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

    def load_lavis_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a Salesforce BLIP / LAVIS BLIP state dict (pre-training, retrieval or ITM checkpoints; HF BLIP
        names work too) with :func:`blipfast.convert.load_into`: every key must map to this model (a ValueError
        names those that do not). Absent momentum copies start from the online modules (BLIP's ``copy_params``),
        an absent index queue holds -100, absent queues stay random; every other parameter must be there.
        ``ptr_queue`` (BLIP_Retrieval) is the pointer."""
        momentum = ("vision_model_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
        has_m = any(k.startswith(momentum + ("visual_encoder_m.",)) for k in state_dict)
        optional = [r"(image|text|idx)_queue\Z", r"queue_ptr\Z"] + ([] if has_m else [m.replace(".", r"\.")
                                                                                      for m in momentum])
        done = convert.load_into(self, state_dict, ignore=optional, what="BlipPretrain.load_lavis_state_dict")
        if "idx_queue" not in done.keys:
            with torch.no_grad():
                self.idx_queue.fill_(-100)
        if not has_m:
            self.copy_params()

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "BlipPretrain":
        """A model from a Salesforce BLIP checkpoint: a ``.pth`` path (``weights_only=True``), a dict with key
        ``"model"``, or a plain state dict."""
        model = cls(config)
        model.load_lavis_state_dict(convert.load_state_dict(checkpoint))
        return model
