"""BLIP (v1) image-text retrieval fine-tuning and inference (Salesforce BLIP ``BLIP_Retrieval``,
``models/blip_retrieval.py``, and ``train_retrieval.py``'s evaluation; docs/blip-finetune.md) on blipfast's
fused ops.

A training step computes BLIP_Retrieval's two losses with its semantics:

- ITC exactly as in pre-training (:mod:`~blipfast.models.blip_momentum`: momentum encoders 0.995, image / text /
  index queues of 57600, ``temp`` clamped to [0.001, 0.5] first) with the image ids ``idx`` of the batch: every
  batch or queue column of the same id is a positive, ``pos / pos.sum(1)``, mixed with the momentum similarities
  by ``alpha``; the momentum features and the ids of every rank are enqueued after the ITC loss, before ITM.
- ITM on the [ENC]-first caption through the image-grounded encoder, ``itm_head`` on the first position, labels
  [1]*B + [0]*2B in BLIP's row order (positives, each text with a negative image, each image with a negative
  text). The negatives are drawn from ``softmax(s)`` of the ONLINE in-batch similarities ``image_feat @
  text_feat.T / temp`` with every column of the same image id excluded (no 1e-4 floor, unlike pre-training), by
  ``ops.sample_hard_negatives`` on the device: from the local batch, or with ``negative_all_rank`` (BLIP's COCO
  recipe) from the gathered global batch, the chosen images' ViT tokens and texts fetched from their ranks with
  gradients by :func:`blipfast.distributed.exchange_itm_negatives` (W*B requests and one all-to-all, no host sync;
  BLIP all-gathers every rank's [B, 577, 768] ViT tokens with gradient and reads each draw back to the host).
  The image K/V of every cross-attention layer are projected once per image (B, or 2B with fetched negatives)
  and shared by all 3B ITM rows through ``kv_index`` (BLIP projects them for 3B rows).

Inference, ``score_matrices`` (``train_retrieval.py``'s ``evaluation``): cosine similarities of the normalised ITC
features (no temperature); for every image its top ``k`` texts and for every text its top ``k`` images are
re-scored as ``itm_head([ENC] output)[:, 1]`` (the positive logit) plus the cosine; every other entry is -100. A
pair both directions ask for is scored once, each image's K/V once for all its pairs (as
:class:`~blipfast.models.blip2_retrieval.Blip2Retrieval` does).

Deliberate differences from BLIP: a row with nothing drawable (every other pair of the batch shows its image)
trains ITM without that negative (BLIP's multinomial crashes); a queue whose size is not a multiple of the global
batch wraps around (BLIP asserts); ``vit_grad_ckpt`` recomputes whole ViT blocks (BLIP: attention and MLP).

Weights: HF names (``vision_model.*``, ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``,
the ``*_m`` copies, the queues and ``ptr_queue``); :meth:`BlipRetrieval.load_lavis_state_dict` reads Salesforce
retrieval checkpoints (``model_base_retrieval_coco.pth``, ...) and pre-training checkpoints as BLIP's
``load_checkpoint`` does (position embeddings interpolated to the ViT's grid, the decoder's keys unused, the
pre-training ``queue_ptr`` not taken), :meth:`BlipRetrieval.from_hf` HF's ``BlipForImageTextRetrieval``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import BlipVisionModel
from transformers.utils import ModelOutput

from .. import convert, ops
from ..distributed import exchange_itm_negatives, gather_no_grad, group_info, itm_batch_indices
from ..ops import no_autocast
from ._checks import check_index
from .blip import BlipTextModel
from .blip_config import BlipConfigBase
from .blip_momentum import MomentumITC, as_alpha, check_pixels, features
from .blip_vision import fit_position_embeddings, fuse_vision_model, set_grad_checkpointing
from .blip2_retrieval import _inference, _plan_pairs
from .losses import itm_loss

WHO = "BlipRetrieval"


class BlipRetrievalConfig(BlipConfigBase):
    """Configuration of :class:`BlipRetrieval`; defaults: BLIP's ``configs/retrieval_coco.yaml`` with ViT-B/16 at
    384 px (``negative_all_rank`` on, the last 4 ViT blocks checkpointed, ``k_test`` 256; Flickr30k: ``k_test``
    128, ``negative_all_rank`` off). Fields as :class:`~blipfast.models.blip_config.BlipConfigBase` describes."""

    FIELDS = ("embed_dim", "queue_size", "momentum", "alpha", "enc_token_id", "negative_all_rank", "k_test",
              "vit_grad_ckpt", "vit_ckpt_layer")
    DEFAULTS = dict(embed_dim=256, queue_size=57600, momentum=0.995, alpha=0.4, enc_token_id=30523,
                    negative_all_rank=True, k_test=256, vit_grad_ckpt=True, vit_ckpt_layer=4)
    IMAGE_SIZE = 384


@dataclass
class BlipRetrievalOutput(ModelOutput):
    """``loss`` = ``loss_itc + loss_itm``; ``s_i2t`` / ``s_t2i`` [B, B or W*B]: the online similarities the
    negatives were drawn from (detached); the negatives [B] (-1: nothing drawable), global rows with
    ``negative_all_rank`` under torch.distributed, local rows otherwise."""

    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    s_i2t: Optional[torch.Tensor] = None
    s_t2i: Optional[torch.Tensor] = None
    neg_text_index: Optional[torch.Tensor] = None
    neg_image_index: Optional[torch.Tensor] = None


def _err(msg: str, cls=ValueError):
    raise cls(f"{WHO}: {msg}")


def rerank_topk(sims: torch.Tensor, k: int, itm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    """(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img]) from the similarities ``sims`` [N_img, N_txt]: every
    image's top ``k`` texts and every text's top ``k`` images get ``itm(image_index, text_index) + sims``, every
    other entry -100. The pairs both directions ask for go to ``itm`` once (``torch.unique``, image-major)."""
    dev = sims.device
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    top_i2t = sims.topk(k_i2t, dim=1).indices  # [N_img, k]
    top_t2i = sims.t().topk(k_t2i, dim=1).indices  # [N_txt, k]
    key_i2t = torch.arange(n_img, device=dev).repeat_interleave(k_i2t) * n_txt + top_i2t.flatten()
    key_t2i = top_t2i.flatten() * n_txt + torch.arange(n_txt, device=dev).repeat_interleave(k_t2i)
    keys, inverse = torch.unique(torch.cat([key_i2t, key_t2i]), return_inverse=True)
    img, txt = keys // n_txt, keys % n_txt
    score = itm(img, txt) + sims[img, txt]
    n1 = key_i2t.shape[0]
    s_i2t = torch.full((n_img, n_txt), -100.0, dtype=score.dtype, device=dev)
    s_i2t.view(-1)[key_i2t] = score[inverse[:n1]]
    s_t2i = torch.full((n_txt, n_img), -100.0, dtype=score.dtype, device=dev)
    s_t2i.view(-1)[torch.arange(n_txt, device=dev).repeat_interleave(k_t2i) * n_img + top_t2i.flatten()] = \
        score[inverse[n1:]]
    return s_i2t, s_t2i


class BlipRetrieval(MomentumITC, nn.Module):
    """BLIP (v1) retrieval model: ITC (momentum encoders, queues, image ids) + ITM training, ITC top-k + ITM
    re-ranking inference; see the module docstring."""

    _PTR = "ptr_queue"

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = BlipRetrievalConfig.of(config, WHO)
        self.config = cfg
        tc, vc, e = cfg.text, cfg.vision, cfg.embed_dim
        self.vision_model = fuse_vision_model(BlipVisionModel(vc))
        if cfg.vit_grad_ckpt:
            set_grad_checkpointing(self.vision_model, cfg.vit_ckpt_layer)
        self.text_encoder = BlipTextModel(tc, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vc.hidden_size, e)
        self.text_proj = nn.Linear(tc.hidden_size, e)
        self.itm_head = nn.Linear(tc.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.vision_model_m = fuse_vision_model(BlipVisionModel(vc))
        self.text_encoder_m = BlipTextModel(tc, add_pooling_layer=False, init_weights=False)
        self.vision_proj_m = nn.Linear(vc.hidden_size, e)
        self.text_proj_m = nn.Linear(tc.hidden_size, e)
        self.copy_params()
        self._register_queues()

    @property
    def device(self) -> torch.device:
        return self.temp.device

    # ------------------------------------------------------------------------------------------
    # training

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                alpha, image_ids: torch.Tensor, negatives: Optional[tuple] = None, process_group=None,
                sample_seed=None) -> BlipRetrievalOutput:
        """One retrieval fine-tuning step's losses (see the module docstring); updates the momentum copies and the
        queues. ``pixel_values`` [B, 3, S, S]; ``input_ids`` / ``attention_mask`` [B, T]: BERT-tokenised captions
        starting with [CLS]; ``alpha``: a float in [0, 1] or a one-element tensor on the device (BLIP ramps it
        over the first epoch); ``image_ids`` [B] (required: BLIP's ``idx``); ``negatives``: ``(neg_text_index,
        neg_image_index)`` instead of drawing (global rows with ``negative_all_rank`` under torch.distributed, else
        local; -1: none); ``process_group``: the group of the gathers; ``sample_seed``: the draw's seed (an int or
        an int64 one-element tensor, the same on every rank; default: from torch's RNG)."""
        cfg = self.config
        check_pixels(WHO, cfg, pixel_values, input_ids, attention_mask)
        dev = pixel_values.device
        b = input_ids.shape[0]
        rank, world = group_info(process_group)
        if b * world > cfg.queue_size:
            _err(f"the global batch ({b} x {world}) exceeds queue_size ({cfg.queue_size})")
        image_ids = check_index(WHO, "image_ids", image_ids, b, dev, "pixel_values")
        alpha = as_alpha(WHO, alpha, dev)
        input_ids = input_ids.long()
        text_mask = attention_mask != 0
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_embeds = self.vision_tokens(pixel_values)
        image_feat = features(image_embeds[:, 0], self.vision_proj)
        text_h = self.text_encoder(input_ids, attention_mask=text_mask).last_hidden_state
        text_feat = features(text_h[:, 0], self.text_proj)
        image_feat_m, text_feat_m = self.momentum_features(pixel_values, input_ids, text_mask)
        loss_itc, _, _ = self._itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, image_ids)
        self._enqueue(image_feat_m, text_feat_m, image_ids, process_group)

        all_rank = cfg.negative_all_rank and world > 1
        enc_ids = torch.cat([torch.full_like(input_ids[:, :1], cfg.enc_token_id), input_ids[:, 1:]], 1)
        with torch.no_grad(), no_autocast(dev):  # BLIP: softmax(image_feat @ text_feat(_world).t() / temp)
            temp = self.temp.to(image_feat.dtype)
            txt_w = gather_no_grad(text_feat, process_group) if all_rank else text_feat
            img_w = gather_no_grad(image_feat, process_group) if all_rank else image_feat
            s_i2t, s_t2i = image_feat @ txt_w.t() / temp, text_feat @ img_w.t() / temp
        neg_text, neg_image = self._negatives(s_i2t, s_t2i, image_ids, negatives, all_rank, process_group, rank,
                                              sample_seed, dev)
        if all_rank:  # the chosen images' ViT tokens and texts from their ranks (gradients go back to them)
            inp = exchange_itm_negatives(neg_text, neg_image, image_embeds, enc_ids, text_mask,
                                         process_group=process_group)
            batch, image_bank, ids_bank, mask_bank = inp.batch, inp.image_bank, inp.text_ids_bank, inp.text_mask_bank
        else:
            batch = itm_batch_indices(neg_text, neg_image)
            image_bank, ids_bank, mask_bank = image_embeds, enc_ids, text_mask
        h_itm = self.text_encoder(ids_bank.index_select(0, batch.text_index),
                                  attention_mask=mask_bank.index_select(0, batch.text_index),
                                  encoder_kv=self.text_encoder.image_kv(image_bank),
                                  kv_index=batch.kv_index).last_hidden_state
        loss_itm = itm_loss(self.itm_head(h_itm[:, 0]), batch.labels, batch.weight)
        return BlipRetrievalOutput(loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm, s_i2t=s_i2t,
                                   s_t2i=s_t2i, neg_text_index=neg_text, neg_image_index=neg_image)

    def _negatives(self, s_i2t, s_t2i, image_ids, negatives, all_rank, process_group, rank, sample_seed, dev):
        """(neg_text_index, neg_image_index): given, or drawn from softmax(s) without the same-id columns."""
        if negatives is not None:
            if not isinstance(negatives, (tuple, list)) or len(negatives) != 2:
                _err("negatives must be a pair (neg_text_index, neg_image_index)")
            b = image_ids.shape[0]
            return tuple(check_index(WHO, f"negatives[{i}]", t, b, dev, "pixel_values")
                         for i, t in enumerate(negatives))
        seed = ops.check_seed(WHO, sample_seed, dev) if sample_seed is not None else None
        if all_rank:  # the same seed on every rank: the draws of one process holding the global batch
            return ops.sample_hard_negatives(s_i2t, s_t2i, image_ids=image_ids, process_group=process_group,
                                             seed=seed)
        if seed is not None and rank:  # local draws: each rank its own stream
            seed = seed + rank
        return ops.sample_hard_negatives_from_gathered(s_i2t, s_t2i, rank=0, image_ids=image_ids,
                                                       image_ids_all=image_ids, seed=seed)

    # ------------------------------------------------------------------------------------------
    # inference

    @property
    def score_dtype(self) -> torch.dtype:
        return torch.float64 if self.temp.dtype == torch.float64 else torch.float32

    @_inference
    def encode_images(self, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """The ViT's tokens [N, L, width] of ``pixel_values`` [N, 3, S, S], ``batch_size`` images at a time (no
        gradient, eval mode), on the pixels' device."""
        check_pixels(WHO, self.config, pixel_values, None, None)
        out = [self.vision_tokens(pixel_values[i:i + batch_size].to(self.device))
               for i in range(0, pixel_values.shape[0], batch_size)]
        return torch.cat(out).to(pixel_values.device)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features [N, E] of ViT tokens [N, L, width]."""
        return features(image_embeds[:, 0].to(self.device), self.vision_proj).to(self.score_dtype)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features [N, E] of [CLS]-first captions (the text-only encoder pass)."""
        h = self.text_encoder(input_ids.to(self.device).long(),
                              attention_mask=attention_mask.to(self.device) != 0).last_hidden_state
        return features(h[:, 0], self.text_proj).to(self.score_dtype)

    def _check_inputs(self, image_embeds, input_ids, attention_mask):
        w = self.config.vision.hidden_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != w \
                or not image_embeds.is_floating_point() or 0 in image_embeds.shape:
            got = list(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            _err(f"image_embeds must be a non-empty float tensor [N, L, {w}] (the ViT's tokens), got {got}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape \
                or input_ids.dtype not in (torch.int64, torch.int32):
            _err("input_ids must be a non-empty int64 tensor [N, T]")
        if input_ids.shape[1] > self.config.text.max_position_embeddings:
            _err(f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings "
                 f"({self.config.text.max_position_embeddings})")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            _err(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}")

    @_inference
    def itm_scores(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_index: torch.Tensor, text_index: torch.Tensor, *, batch_size: int = 1024,
                   image_batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """ITM positive logits [P] (``itm_head`` on the [ENC] position, [CLS] of ``input_ids`` replaced by [ENC]) of
        the pairs (image ``image_index[p]``, text ``text_index[p]``), planned as
        :meth:`blipfast.models.blip2_retrieval.Blip2Retrieval.itm_scores` plans them: each image's K/V once for all
        its pairs, texts of a batch cut to their longest extent."""
        self._check_inputs(image_embeds, input_ids, attention_mask)
        for name, v in (("batch_size", batch_size), ("image_batch_size", image_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(f"{name} must be a positive int, got {v!r}")
        dev = self.device
        out = torch.empty(image_index.shape[0], dtype=self.score_dtype, device=dev)
        if out.numel() == 0:
            return out
        plan = _plan_pairs(image_index, text_index, attention_mask, image_embeds.shape[0], batch_size,
                           image_batch_size)
        order, img, txt = (t.to(dev) for t in (plan.order, plan.image, plan.text))
        used_src, used_dev = plan.used.to(image_embeds.device), plan.used.to(dev)
        ids, mask = input_ids.to(dev).long(), attention_mask.to(dev) != 0
        ids = torch.cat([torch.full_like(ids[:, :1], self.config.enc_token_id), ids[:, 1:]], 1)
        lut = torch.empty(image_embeds.shape[0], dtype=torch.long, device=dev)
        bar = tqdm(total=out.numel(), unit="pair", desc="ITM re-rank", disable=not progress)
        for g0, g1, batches in plan.groups:
            ikv = self.text_encoder.image_kv(image_embeds.index_select(0, used_src[g0:g1]).to(dev))
            lut[used_dev[g0:g1]] = torch.arange(g1 - g0, device=dev)
            for b0, b1, width in batches:
                t_b = txt[b0:b1]
                h = self.text_encoder(ids[:, :width].index_select(0, t_b),
                                      attention_mask=mask[:, :width].index_select(0, t_b), encoder_kv=ikv,
                                      kv_index=lut.index_select(0, img[b0:b1])).last_hidden_state
                out[b0:b1] = self.itm_head(h[:, 0])[:, 1].to(out.dtype)
                bar.update(b1 - b0)
        bar.close()
        return torch.empty_like(out).scatter_(0, order, out)

    @_inference
    def score_matrices(self, *, pixel_values: Optional[torch.Tensor] = None,
                       image_embeds: Optional[torch.Tensor] = None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, k: Optional[int] = None, batch_size: int = 1024,
                       image_batch_size: int = 64, text_batch_size: int = 1024,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` with BLIP's rule (module docstring), in
        ``score_dtype`` on the model's device. Images as ``pixel_values`` or ViT tokens ``image_embeds``;
        ``input_ids`` / ``attention_mask`` [N_txt, T]: [CLS]-first captions; ``k`` (default ``config.k_test``)
        larger than a direction's candidates re-ranks them all."""
        k = self.config.k_test if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            _err(f"k must be a positive int, got {k!r}")
        if (pixel_values is None) == (image_embeds is None):
            _err("give pixel_values or image_embeds (the ViT's tokens), exactly one")
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, image_batch_size)
        self._check_inputs(image_embeds, input_ids, attention_mask)
        img = torch.cat([self.image_features(image_embeds[i:i + image_batch_size])
                         for i in range(0, image_embeds.shape[0], image_batch_size)])
        txt = torch.cat([self.text_features(input_ids[i:i + text_batch_size], attention_mask[i:i + text_batch_size])
                         for i in range(0, input_ids.shape[0], text_batch_size)])

        def itm(image_index, text_index):
            return self.itm_scores(image_embeds, input_ids, attention_mask, image_index, text_index,
                                   batch_size=batch_size, image_batch_size=image_batch_size, progress=progress)

        return rerank_topk(img @ txt.t(), k, itm)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def to_lavis_state_dict(self) -> dict:
        """Weights, momentum copies, queues and ``ptr_queue`` under Salesforce BLIP names, as BLIP_Retrieval saves
        them."""
        sd = {k: v for k, v in self.state_dict().items() if not k.endswith("position_ids")}
        return convert.hf_to_blip(sd, strict=True).state_dict

    def load_lavis_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                              what: str = f"{WHO}.load_lavis_state_dict") -> list:
        """Load a Salesforce BLIP checkpoint's state dict (retrieval, ITM or pre-training; LAVIS' and HF's names
        too) as BLIP's ``load_checkpoint`` does: ViT position embeddings interpolated to this ViT's grid, the text
        decoder's keys (a pre-training checkpoint's) unused, a pre-training ``queue_ptr`` not taken (BLIP_Retrieval
        names its pointer ``ptr_queue``: it starts at 0), absent momentum copies copied from the online modules,
        absent queues random (the index queue -100), an absent ``temp`` (HF's models have none) 0.07. Every other
        key must map (:func:`blipfast.convert.load_into`: a ValueError names the others). Returns notes: what was
        interpolated, left unused or not taken; ``what`` names the weights in errors."""
        sd = dict(state_dict)
        notes = fit_position_embeddings(sd, self)
        unused = sorted(k for k in sd if k.startswith("text_decoder."))
        if unused:
            notes.append(f"{len(unused)} text_decoder.* key(s) unused (the captioning decoder)")
        if "queue_ptr" in sd and "ptr_queue" not in sd:
            sd.pop("queue_ptr")
            notes.append("queue_ptr not taken (BLIP_Retrieval's ptr_queue starts at 0)")
        if "temp" not in sd:
            notes.append("temp absent: 0.07")
        self._load_with_momentum({k: v for k, v in sd.items() if k not in unused}, ignore=[r"temp\Z"],
                                 what=what)
        return notes

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None) -> "BlipRetrieval":
        """A model from a Salesforce BLIP checkpoint (a ``.pth`` path read with ``weights_only=True``, a dict with
        key "model" or a state dict); ``config`` defaults to the sizes the weights tell
        (:meth:`BlipRetrievalConfig.from_state_dict`)."""
        sd = convert.load_state_dict(checkpoint)
        if config is None:
            config = BlipRetrievalConfig.from_state_dict(convert.to_hf(sd)[0].state_dict)
        model = cls(config)
        model.load_lavis_state_dict(sd)
        return model

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: Any = None) -> "BlipRetrieval":
        """From an HF ``BlipForImageTextRetrieval`` (its weights copied; the momentum copies start from them, the
        queues random, ``temp`` 0.07); ``config`` defaults to one built from the HF config."""
        hc = getattr(hf_model, "config", None)
        if hc is None or not hasattr(hf_model, "itm_head") or not hasattr(hf_model, "text_encoder"):
            _err(f"from_hf needs an HF BlipForImageTextRetrieval, got {type(hf_model).__name__}", TypeError)
        if config is None:
            tc = hc.text_config
            config = BlipRetrievalConfig(text=tc, vision=hc.vision_config, embed_dim=hc.image_text_hidden_size,
                                         enc_token_id=min(30523, tc.vocab_size - 1))
        model = cls(config)
        model.load_lavis_state_dict(hf_model.state_dict())
        w = hf_model.itm_head.weight
        return model.to(device=w.device, dtype=w.dtype).train(hf_model.training)
