"""The momentum-distilled ITC that BLIP (v1) pre-training and retrieval fine-tuning share (Salesforce BLIP
``BLIP_Pretrain`` and ``BLIP_Retrieval``, docs/semantics.md#blip-pre-training): :class:`MomentumITC`, a mixin of
:class:`~blipfast.models.blip_pretrain.BlipPretrain` and :class:`~blipfast.models.blip_retrieval.BlipRetrieval`.

- momentum copies ``*_m`` of the ViT, the text encoder and both projections (no gradient), updated ``p_m = m p_m +
  (1 - m) p`` (two foreach kernels) before they compute the momentum features;
- queues of ``queue_size`` past momentum features (``image_queue``, ``text_queue``) and their image ids
  (``idx_queue``, -100 when a model has none); the momentum features (and ids) of every rank are gathered and
  written at the pointer, on the device (the pointer never reaches the host; a queue whose size is not a multiple
  of the global batch wraps around where BLIP asserts);
- ITC over [batch | queue]: online features against the momentum features of the other modality, targets ``alpha
  softmax(s_m) + (1 - alpha) pos`` with ``pos`` the one-hot diagonal, or with image ids every column of the same
  id (the index queue included) normalised per row; the similarities in float32 also under autocast.

A model that mixes it in names its pointer buffer with ``_PTR`` (``queue_ptr`` in BLIP_Pretrain, ``ptr_queue`` in
BLIP_Retrieval) and its momentum pairs in :meth:`MomentumITC.model_pairs`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import convert
from ..distributed import gather_no_grad
from ..ops import no_autocast
from ._checks import check_text

MOMENTUM_MODULES = ("vision_model_m", "text_encoder_m", "vision_proj_m", "text_proj_m")


def check_pixels(who: str, cfg, pixel_values, input_ids, attention_mask) -> None:
    """``pixel_values`` float [B, 3, S, S] at the ViT's size with the captions ``input_ids`` / ``attention_mask``."""
    size = cfg.vision.image_size
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or not pixel_values.is_floating_point() \
            or tuple(pixel_values.shape[1:]) != (3, size, size) or pixel_values.shape[0] == 0:
        got = (f"{list(pixel_values.shape)} {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor)
               else type(pixel_values).__name__)
        raise ValueError(f"{who}: pixel_values must be a float tensor [B, 3, {size}, {size}], got {got}")
    if input_ids is not None:
        check_text(who, input_ids, attention_mask, pixel_values.shape[0], cfg.text.max_position_embeddings,
                   pixel_values.device, "pixel_values")


def as_alpha(who: str, alpha, device) -> torch.Tensor:
    """alpha as a 0-d float tensor on ``device`` (a Python float is validated; a tensor is taken as is, so that a
    trainer can feed a static buffer to a CUDA graph or a compiled step without recompiling)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point() or alpha.device != device:
            raise ValueError(f"{who}: alpha must be a float or a one-element float tensor on {device}, got "
                             f"{list(alpha.shape)} {alpha.dtype} on {alpha.device}")
        return alpha.reshape(())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{who}: alpha must be a float in [0, 1], got {alpha!r}")
    return torch.full((), float(alpha), dtype=torch.float64, device=device)


def features(h: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """normalize(proj(h)) in float32 (float64 stays), outside autocast: the ITC features."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    with no_autocast(h.device):
        return F.normalize(F.linear(h.to(dt), proj.weight.to(dt), proj.bias.to(dt)), dim=-1)


class MomentumITC:
    """Momentum encoders, queues and ITC (see the module docstring); mixed into an ``nn.Module`` that holds
    ``vision_model``, ``text_encoder``, ``vision_proj``, ``text_proj``, ``temp``, their momentum copies and a config
    with ``embed_dim``, ``queue_size`` and ``momentum``."""

    _PTR = "queue_ptr"
    _pairs = None

    def _register_queues(self) -> None:
        e, q = self.config.embed_dim, self.config.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer(self._PTR, torch.zeros(1, dtype=torch.long))

    @property
    def pointer(self) -> torch.Tensor:
        """The queue pointer (``queue_ptr`` / ``ptr_queue``)."""
        return getattr(self, self._PTR)

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
                    raise ValueError(f"{type(self).__name__}: {type(a).__name__} and its momentum copy differ in "
                                     f"their parameters")
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

    def momentum_features(self, pixel_values, input_ids, text_mask) -> tuple:
        """(image_feat_m, text_feat_m): the momentum update, then the momentum features (no gradient)."""
        with torch.no_grad():
            self.momentum_update()
            image_feat_m = features(self.vision_tokens(pixel_values, momentum=True)[:, 0], self.vision_proj_m)
            text_h_m = self.text_encoder_m(input_ids, attention_mask=text_mask).last_hidden_state
            return image_feat_m, features(text_h_m[:, 0], self.text_proj_m)

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
        ptr = self.pointer
        slots = (ptr + torch.arange(bw, device=feats.device)) % self.config.queue_size
        self.image_queue.index_copy_(1, slots, feats[:, :e].t())
        self.text_queue.index_copy_(1, slots, feats[:, e:].t())
        self.idx_queue.index_copy_(1, slots, ids.view(1, bw))
        ptr.copy_((ptr + bw) % self.config.queue_size)

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

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _load_with_momentum(self, state_dict: Mapping[str, torch.Tensor], ignore=(), what: str = "") -> None:
        """:func:`blipfast.convert.load_into` of a Salesforce BLIP / LAVIS / HF state dict where the momentum copies
        (absent: they start from the online modules, BLIP's ``copy_params``), the queues (absent: random, the index
        queue -100) and the pointer (absent: 0) may be missing; ``ignore`` as load_into's."""
        momentum = tuple(m + "." for m in MOMENTUM_MODULES)
        has_m = any(k.startswith(momentum + ("visual_encoder_m.",)) for k in state_dict)
        optional = [r"(image|text|idx)_queue\Z", r"(queue_ptr|ptr_queue)\Z", *ignore]
        if not has_m:
            optional += [m.replace(".", r"\.") for m in momentum]
        done = convert.load_into(self, state_dict, ignore=optional, what=what or f"{type(self).__name__} weights")
        with torch.no_grad():
            if "idx_queue" not in done.keys:
                self.idx_queue.fill_(-100)
            if self._PTR not in done.keys:
                self.pointer.zero_()
        if not has_m:
            self.copy_params()
