"""BLIP-2 image-text retrieval and feature extraction (LAVIS ``Blip2Qformer`` / HF ``Blip2ForImageTextRetrieval``).

``Blip2Retrieval.score_matrices`` computes LAVIS' ``compute_sim_matrix`` (docs/semantics.md#retrieval): the ITC
similarity of every image-text pair (max over the Q queries of the cosine of the projected, normalised features; no
temperature), then for every image the top k texts and for every text the top k images re-ranked with
``score = mean over queries of the ITM positive logit + ITC similarity``; every other entry is -100. Where LAVIS runs
one ITM pass per query row over k repeated copies of the image (2 N k pairs, each computing the image's
cross-attention K/V again, one host sync per row), here:

- the (image, text) pairs that both directions ask for are scored once (an i2t candidate that is also a t2i
  candidate is one pair: the ITM score of a pair does not depend on the direction that asked for it);
- the pairs are sorted by image; images are taken ``image_batch_size`` at a time, ``ln_vision`` and every cross
  layer's K/V computed ONCE per image and shared through ``kv_index`` by all its pairs, the i2t candidates and
  every t2i row that chose the image;
- the pairs run in batches of ``batch_size`` through ``QFormer(query_output_only=True)`` (the last layer computes
  only the query rows, the only ones the ITM head reads);
- within a group of images the pairs are sorted by text extent and each batch's texts are cut to its longest
  extent (LAVIS pads every caption to 35 tokens; the cut columns are padding in every row of the batch, so the
  scores are unchanged);
- host syncs: ``torch.unique`` of the pair keys and one transfer of the pairs and text extents to the host, where
  the batches are planned (two, once per call); no sync per query row or per batch: the scores stay on the
  device and the score matrices are returned there.

With ``pixel_values`` the kept vision model (HF ``Blip2VisionModel``) runs once per image; ``image_embeds`` are its
tokens BEFORE ``ln_vision`` (what ``blipfast cache-features`` stores). ``extract_features`` is LAVIS'
``Blip2Qformer.extract_features`` on tensors.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from .. import convert
from .blip2 import Blip2Stage1, Blip2Stage1Config

MODES = ("image", "text", "multimodal")
_DEC = 30522  # [DEC] of the BLIP-2 tokenizer


@dataclass
class Blip2Features(ModelOutput):
    """LAVIS ``BlipOutputFeatures``: ``image_embeds`` [B, Q, d] (query outputs) and ``image_embeds_proj`` [B, Q, E]
    (normalised projections) in mode "image"; ``text_embeds`` [B, T, d] and ``text_embeds_proj`` [B, T, E] in mode
    "text" (position 0 is [CLS]: ``text_embeds_proj[:, 0]`` is the ITC text feature); ``multimodal_embeds``
    [B, Q, d] (query outputs of the image-grounded pass over [queries | text]) in mode "multimodal"."""

    image_embeds: Optional[torch.Tensor] = None
    image_embeds_proj: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None
    text_embeds_proj: Optional[torch.Tensor] = None
    multimodal_embeds: Optional[torch.Tensor] = None


def _err(msg: str, cls=ValueError):
    raise cls(f"Blip2Retrieval: {msg}")


def _describe(t) -> str:
    return f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _inference(fn):
    """no_grad and eval mode (dropout off) for the call; the module's mode is restored afterwards."""

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with torch.no_grad(), _eval(self):
            return fn(self, *args, **kwargs)

    return run


@contextlib.contextmanager
def _eval(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Blip2Retrieval(nn.Module):
    """ITC + ITM retrieval over the stage-1 modules (see the module doc). Holds ``query_tokens``, ``ln_vision``,
    ``qformer``, ``embeddings``, ``vision_projection``, ``text_projection``, ``itm_head`` (HF names) and, when it
    has one, ``vision_model`` (HF ``Blip2VisionModel``, its ``post_layernorm`` unused: ``ln_vision`` is that).
    Its inference methods run without gradients and in eval mode (no dropout) whatever the module's mode."""

    # the pieces, shared with Blip2Stage1 (they read only the modules both classes hold)
    image_kv = Blip2Stage1.image_kv
    query_embeds = Blip2Stage1.query_embeds
    image_features = Blip2Stage1.image_features
    text_features = Blip2Stage1.text_features
    itm_logits = Blip2Stage1.itm_logits

    def __init__(self, config: Any = None, vision_model: Optional[nn.Module] = None):
        super().__init__()
        self._adopt(Blip2Stage1(config), vision_model)

    def _adopt(self, stage1: Blip2Stage1, vision_model: Optional[nn.Module]) -> None:
        self.config: Blip2Stage1Config = stage1.config
        for name in ("query_tokens", "ln_vision", "qformer", "embeddings", "vision_projection", "text_projection",
                     "itm_head"):
            setattr(self, name, getattr(stage1, name))
        self.vision_model = vision_model
        self.train(stage1.training)

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_stage1(cls, model: Blip2Stage1, vision_model: Optional[nn.Module] = None) -> "Blip2Retrieval":
        """A retrieval model over the very modules and Parameters of ``model`` (no copy)."""
        if not isinstance(model, Blip2Stage1):
            _err(f"from_stage1 needs a blipfast.Blip2Stage1, got {type(model).__name__}", TypeError)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(model, vision_model)
        return self

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: Any = None) -> "Blip2Retrieval":
        """From an HF ``Blip2ForImageTextRetrieval``: its Q-Former, embeddings, queries, projections and ITM head
        (copied), ``vision_model.post_layernorm`` as ``ln_vision``, and its ``vision_model`` itself (kept, shared).
        ``config`` defaults to one built from the HF config."""
        hc = getattr(hf_model, "config", None)
        if hc is None or not hasattr(hc, "qformer_config") or not hasattr(hf_model, "itm_head"):
            _err(f"from_hf needs an HF Blip2ForImageTextRetrieval, got {type(hf_model).__name__}", TypeError)
        if config is None:
            vocab = hc.qformer_config.vocab_size
            # [DEC] when the vocabulary has it; retrieval never decodes, so any id of the vocabulary does otherwise
            config = Blip2Stage1Config(qformer=hc.qformer_config, num_query_tokens=hc.num_query_tokens,
                                       embed_dim=hc.image_text_hidden_size, bos_token_id=min(_DEC, vocab - 1),
                                       ln_vision_eps=hc.vision_config.layer_norm_eps)
        stage1 = Blip2Stage1.from_hf(hf_model, config)
        return cls.from_stage1(stage1, getattr(hf_model, "vision_model", None))

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None, vision_config: Any = None) -> "Blip2Retrieval":
        """From a LAVIS BLIP-2 checkpoint (``.pth`` read with ``weights_only=True``, a dict with key "model", or a
        LAVIS-named state dict), as ``Blip2Stage1.from_lavis`` reads it. With ``vision_config`` (an HF
        ``Blip2VisionConfig`` or its dict) the checkpoint's EVA ViT (``visual_encoder.*``) becomes the
        ``vision_model`` (HF layout, as transformers' conversion maps it)."""
        sd = convert.load_state_dict(checkpoint)
        stage1 = Blip2Stage1.from_lavis(sd, config)
        vision = None if vision_config is None else _lavis_vision_model(sd, vision_config, stage1.ln_vision)
        return cls.from_stage1(stage1, vision)

    # ------------------------------------------------------------------------------------------
    # passes

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def score_dtype(self) -> torch.dtype:
        """float32 (float64 for a float64 model): the dtype of similarities and scores."""
        return torch.float64 if self.query_tokens.dtype == torch.float64 else torch.float32

    def _check_tokens(self, image_embeds, name="image_embeds"):
        width = self.config.qformer.encoder_hidden_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != width \
                or not image_embeds.is_floating_point() or 0 in image_embeds.shape:
            _err(f"{name} must be a non-empty float tensor [N, L, {width}] (ViT tokens before ln_vision), got "
                 f"{_describe(image_embeds)}")

    def _check_text(self, input_ids, attention_mask, n=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32) or 0 in input_ids.shape:
            _err(f"input_ids must be a non-empty int64 tensor [N, T], got {_describe(input_ids)}")
        if n is not None and input_ids.shape[0] != n:
            _err(f"input_ids must have {n} rows, got {input_ids.shape[0]}")
        if input_ids.shape[1] > self.config.qformer.max_position_embeddings:
            _err(f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings "
                 f"({self.config.qformer.max_position_embeddings})")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            _err(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got "
                 f"{_describe(attention_mask)}")
        if attention_mask.is_complex():
            _err(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}", TypeError)

    @_inference
    def encode_images(self, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """The vision model's tokens before ``ln_vision`` [N, L, width] (in its dtype, on the pixels' device),
        ``batch_size`` images at a time."""
        vm = self.vision_model
        if vm is None:
            _err("pixel_values need a vision model (from_hf of a model with one, or from_lavis with vision_config); "
                 "pass image_embeds (ViT tokens before ln_vision) instead")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3 \
                or not pixel_values.is_floating_point() or pixel_values.shape[0] == 0:
            _err(f"pixel_values must be a non-empty float tensor [N, 3, H, W], got {_describe(pixel_values)}")
        w = next(vm.parameters())
        out = []
        for i in range(0, pixel_values.shape[0], batch_size):
            x = pixel_values[i:i + batch_size].to(device=w.device, dtype=w.dtype)
            out.append(vm.encoder(inputs_embeds=vm.embeddings(x))[0])  # HF's forward, without post_layernorm
        return torch.cat(out).to(pixel_values.device)

    def _images(self, pixel_values, image_embeds, batch_size):
        if (pixel_values is None) == (image_embeds is None):
            _err("give pixel_values or image_embeds (ViT tokens before ln_vision), exactly one")
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, batch_size)
        self._check_tokens(image_embeds)
        return image_embeds

    def image_pass(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query outputs [B, Q, d] of the image pass (queries cross-attending to the images)."""
        x = image_embeds.to(self.device)
        return self.qformer(self.query_embeds(None, x.shape[0]), encoder_kv=self.image_kv(x)).last_hidden_state

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Outputs [B, T, d] of the text-only pass (text FFN, padding masked)."""
        ids = input_ids.to(self.device).long()
        return self.qformer(self.embeddings(ids), query_length=0,
                            attention_mask=attention_mask.to(self.device) != 0).last_hidden_state

    @_inference
    def extract_features(self, *, pixel_values: Optional[torch.Tensor] = None,
                         image_embeds: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, mode: str = "multimodal") -> Blip2Features:
        """LAVIS' feature extractor (see :class:`Blip2Features`): mode "image" needs the images, "text" the
        tokenised texts (``attention_mask`` defaults to all ones), "multimodal" both, one text per image."""
        if mode not in MODES:
            _err(f"mode must be one of {MODES}, got {mode!r}")
        if mode in ("text", "multimodal"):
            if attention_mask is None and isinstance(input_ids, torch.Tensor):
                attention_mask = torch.ones_like(input_ids)
            self._check_text(input_ids, attention_mask)
        if mode == "text":
            h = self.text_pass(input_ids, attention_mask)
            return Blip2Features(text_embeds=h, text_embeds_proj=self.text_features(h))
        images = self._images(pixel_values, image_embeds, 64)
        if mode == "image":
            q = self.image_pass(images)
            return Blip2Features(image_embeds=q, image_embeds_proj=self.image_features(q))
        b = images.shape[0]
        self._check_text(input_ids, attention_mask, n=b)
        ids, mask = input_ids.to(self.device).long(), attention_mask.to(self.device) != 0
        nq = self.config.num_query_tokens
        am = torch.cat([torch.ones(b, nq, dtype=torch.bool, device=self.device), mask], 1)
        out = self.qformer(self.query_embeds(ids, b), query_length=nq, attention_mask=am,
                           encoder_kv=self.image_kv(images.to(self.device)), query_output_only=True)
        return Blip2Features(multimodal_embeds=out.last_hidden_state)

    # ------------------------------------------------------------------------------------------
    # retrieval

    @_inference
    def itm_scores(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_index: torch.Tensor, text_index: torch.Tensor, *, batch_size: int = 1024,
                   image_batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Mean over the queries of the ITM positive logit of P pairs (image ``image_index[p]``, text
        ``text_index[p]``), [P] in ``score_dtype`` on the model's device.

        The pairs are planned on the host (:func:`_plan_pairs`): images with pairs are taken ``image_batch_size``
        at a time, their K/V computed once and shared by all their pairs; within such a group the pairs are
        sorted by text extent and run ``batch_size`` at a time, each batch's texts cut to its longest extent (the
        cut columns are padding in every row of the batch: the scores are unchanged). ``image_embeds`` may stay
        on the CPU (each group of images is moved when it is needed). Host syncs: one (the indices and text
        extents to the host) when they live on a GPU, none for CPU indices and masks."""
        self._check_tokens(image_embeds)
        self._check_text(input_ids, attention_mask)
        for name, v in (("batch_size", batch_size), ("image_batch_size", image_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(f"{name} must be a positive int, got {v!r}")
        for name, t in (("image_index", image_index), ("text_index", text_index)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32) \
                    or t.shape != image_index.shape:
                _err(f"{name} must be an int64 tensor [P] (as long as image_index), got {_describe(t)}")
        dev = self.device
        out = torch.empty(image_index.shape[0], dtype=self.score_dtype, device=dev)
        if out.numel() == 0:
            return out
        plan = _plan_pairs(image_index, text_index, attention_mask, image_embeds.shape[0], batch_size,
                           image_batch_size)
        cuda = dev.type == "cuda"
        order, img, txt = (t.pin_memory().to(dev, non_blocking=True) if cuda else t.to(dev)
                           for t in (plan.order, plan.image, plan.text))
        used_src = plan.used.to(image_embeds.device)
        used_dev = plan.used.to(dev)
        ids, mask = input_ids.to(dev).long(), attention_mask.to(dev) != 0
        nq = self.config.num_query_tokens
        ones = torch.ones(batch_size, nq, dtype=torch.bool, device=dev)
        lut = torch.empty(image_embeds.shape[0], dtype=torch.long, device=dev)
        bar = tqdm(total=out.numel(), unit="pair", desc="ITM re-rank", disable=not progress)
        for g0, g1, batches in plan.groups:
            ikv = self.image_kv(image_embeds.index_select(0, used_src[g0:g1]).to(dev, non_blocking=True))
            lut[used_dev[g0:g1]] = torch.arange(g1 - g0, device=dev)
            for b0, b1, width in batches:
                t_b = txt[b0:b1]
                am = torch.cat([ones[:b1 - b0], mask[:, :width].index_select(0, t_b)], 1)
                h = self.qformer(self.query_embeds(ids[:, :width].index_select(0, t_b), b1 - b0), query_length=nq,
                                 attention_mask=am, encoder_kv=ikv, kv_index=lut.index_select(0, img[b0:b1]),
                                 query_output_only=True).last_hidden_state
                out[b0:b1] = self.itm_logits(h)[:, 1].to(out.dtype)
                bar.update(b1 - b0)
        bar.close()
        return torch.empty_like(out).scatter_(0, order, out)

    def _query_features(self, image_embeds, batch_size) -> torch.Tensor:
        feats = [self.image_features(self.image_pass(image_embeds[i:i + batch_size])).to(self.score_dtype)
                 for i in range(0, image_embeds.shape[0], batch_size)]
        return torch.cat(feats)

    def _text_cls_features(self, ids, mask, batch_size) -> torch.Tensor:
        feats = [self.text_features(self.text_pass(ids[i:i + batch_size], mask[i:i + batch_size])[:, 0]).to(
            self.score_dtype)
                 for i in range(0, ids.shape[0], batch_size)]
        return torch.cat(feats)

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk_elems: int = 1 << 27) -> torch.Tensor:
        """[N_img, N_txt]: max over queries of ``image_feats`` [N_img, Q, E] . ``text_feats`` [N_txt, E] (LAVIS'
        ``sims_matrix``), computed a block of images at a time (never the whole [N_img, Q, N_txt])."""
        n_img, q, _ = image_feats.shape
        step = max(1, chunk_elems // max(1, q * text_feats.shape[0]))
        return torch.cat([torch.einsum("iqe,te->iqt", image_feats[i:i + step], text_feats).amax(1)
                          for i in range(0, n_img, step)])

    @_inference
    def score_matrices(self, *, pixel_values: Optional[torch.Tensor] = None,
                       image_embeds: Optional[torch.Tensor] = None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, k: int = 128, batch_size: int = 1024,
                       image_batch_size: int = 64, text_batch_size: int = 1024,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` in ``score_dtype`` on the model's device, with
        LAVIS' rule (module doc). ``k`` larger than a direction's candidates re-ranks them all (LAVIS' ``topk``
        would fail). ``batch_size`` pairs per ITM pass, ``image_batch_size`` images per K/V group (and per ViT / image pass),
        ``text_batch_size`` texts per text pass; ``progress`` shows a tqdm bar over the re-rank."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            _err(f"k must be a positive int, got {k!r}")
        images = self._images(pixel_values, image_embeds, image_batch_size)
        self._check_text(input_ids, attention_mask)
        dev = self.device
        ids, mask = input_ids.to(dev), attention_mask.to(dev)
        n_img, n_txt = images.shape[0], ids.shape[0]
        sims = self.itc_similarity(self._query_features(images, image_batch_size),
                                   self._text_cls_features(ids, mask, text_batch_size))
        k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
        top_i2t = sims.topk(k_i2t, dim=1).indices  # [N_img, k]
        top_t2i = sims.t().topk(k_t2i, dim=1).indices  # [N_txt, k]
        key_i2t = torch.arange(n_img, device=dev).repeat_interleave(k_i2t) * n_txt + top_i2t.flatten()
        key_t2i = top_t2i.flatten() * n_txt + torch.arange(n_txt, device=dev).repeat_interleave(k_t2i)
        keys, inverse = torch.unique(torch.cat([key_i2t, key_t2i]), return_inverse=True)  # sorted: image-major
        img, txt = keys // n_txt, keys % n_txt
        itm = self.itm_scores(images, ids, mask, img, txt, batch_size=batch_size, image_batch_size=image_batch_size,
                              progress=progress)
        score = itm + sims[img, txt]
        n1 = key_i2t.shape[0]
        s_i2t = torch.full((n_img, n_txt), -100.0, dtype=score.dtype, device=dev)
        s_i2t.view(-1)[key_i2t] = score[inverse[:n1]]
        s_t2i = torch.full((n_txt, n_img), -100.0, dtype=score.dtype, device=dev)
        t2i_flat = torch.arange(n_txt, device=dev).repeat_interleave(k_t2i) * n_img + top_t2i.flatten()
        s_t2i.view(-1)[t2i_flat] = score[inverse[n1:]]
        return s_i2t, s_t2i


@dataclass
class _PairPlan:
    """Pairs in the order they run (``order[i]``: the pair at position i), their images and texts, the images with
    pairs (``used``), and per group of images ``(first, end, [(pair start, pair end, text width), ...])``."""

    order: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    used: torch.Tensor
    groups: list


def _to_host(*tensors: torch.Tensor) -> list:
    """CPU copies of 1-D integer tensors, in one transfer when they share a device."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.long() for t in tensors]
    if len({t.device for t in tensors}) == 1:
        return list(torch.cat([t.long() for t in tensors]).cpu().split([t.numel() for t in tensors]))
    return [t.long().cpu() for t in tensors]


def _plan_pairs(image_index, text_index, attention_mask, n_img: int, batch_size: int, image_batch_size: int):
    """The batches of ``itm_scores``, planned on the host (see there)."""
    n_txt, t = attention_mask.shape
    if attention_mask.device.type == "meta":  # no data (cost counting): every text at full width
        img, txt = _to_host(image_index, text_index)
        extent = torch.full((n_txt,), t, dtype=torch.long)
    else:  # extent: last attended position + 1; the columns beyond it are padding
        ext = ((attention_mask != 0).long() * torch.arange(1, t + 1, device=attention_mask.device)).amax(1)
        img, txt, extent = _to_host(image_index, text_index, ext)
    if img.min() < 0 or img.max() >= n_img:
        _err(f"image_index must lie in [0, {n_img})")
    if txt.min() < 0 or txt.max() >= n_txt:
        _err(f"text_index must lie in [0, {n_txt})")
    counts = torch.bincount(img, minlength=n_img)
    used = counts.nonzero().flatten()
    group_of = torch.zeros(n_img, dtype=torch.long)
    group_of[used] = torch.arange(used.numel()) // image_batch_size
    pair_group, pair_extent = group_of[img], extent[txt]
    order = torch.argsort(pair_group * (t + 1) + pair_extent, stable=True)  # by group, then text extent
    ext_sorted = pair_extent[order].tolist()
    ends = torch.bincount(pair_group, minlength=int(group_of.max()) + 1).cumsum(0).tolist()
    groups, p0 = [], 0
    for g, p1 in enumerate(ends):
        batches = [(b0, min(p1, b0 + batch_size), max(1, ext_sorted[min(p1, b0 + batch_size) - 1]))
                   for b0 in range(p0, p1, batch_size)]
        groups.append((g * image_batch_size, min(used.numel(), (g + 1) * image_batch_size), batches))
        p0 = p1
    return _PairPlan(order=order, image=img[order], text=txt[order], used=used, groups=groups)


def _lavis_vision_model(sd: Mapping, vision_config: Any, ln_vision: nn.LayerNorm) -> nn.Module:
    """HF ``Blip2VisionModel`` with a LAVIS checkpoint's EVA ViT weights (and ``ln_vision`` as post_layernorm)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    if isinstance(vision_config, dict):
        vision_config = Blip2VisionConfig(**vision_config)
    vit = {k: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    if not vit:
        _err("from_lavis: vision_config was given but the checkpoint has no visual_encoder.* weights")
    vit.update({f"ln_vision.{k}": v for k, v in ln_vision.state_dict().items()})  # LAVIS' name of post_layernorm
    model = Blip2VisionModel(vision_config)
    convert.load_into(model, vit, prefix="vision_model.", what="Blip2Retrieval.from_lavis", into="vision_config")
    return model.eval()
