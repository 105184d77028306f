"""BLIP (v1) NLVR2 (Salesforce BLIP ``BLIP_NLVR``, ``models/blip_nlvr.py`` with ``models/nlvr_encoder.py``;
docs/blip-finetune.md) on blipfast's fused ops.

Two images per example: the ViT runs once over the batch's first images followed by its second images (BLIP's
``torch.cat([image0, image1])``), and the sentence ([ENC] first) goes through a text encoder whose every layer
has a *twin* cross-attention (:class:`BlipNLVRTextModel`, ``nlvr_encoder.py``'s ``BertAttention`` with
``self0`` / ``self1``): the same queries attend to the first image's tokens with the projections ``self0`` and to
the second's with ``self1``; each context goes through its own output projection (``dense0`` / ``dense1``); the two
are averaged in layers below ``merge_from_layer`` (6) and mixed by a ``merge_layer`` Linear over their
concatenation (no activation: BLIP's ``act`` is commented out) from that layer on; then one dropout, the residual
and the LayerNorm. The classification head ``cls_head`` (Linear, ReLU, Linear to 2) reads the [ENC] position; the
loss is the cross-entropy against the labels (1: the sentence is true).

On the fused ops: both query projections are one GEMM, every layer's K/V of the first image (``self0``) and of the
second (``self1``) come from one GEMM each (:meth:`BlipNLVRTextModel.image_kv`), the attentions are
``ops.cross_attention`` (sharing the K/V by ``kv_index`` when several sentences see one image pair), the post-LN
epilogues ``ops.bias_dropout_add_layernorm``.

Weights: BLIP_NLVR's names (HF's text names plus ``self0`` / ``self1`` / ``dense0`` / ``dense1`` /
``merge_layer`` and ``cls_head.{0,2}``); :meth:`BlipNLVR.load_lavis_state_dict` reads ``model_base_nlvr.pth``, or
a pre-training checkpoint as initialisation the way BLIP's ``blip_nlvr.load_checkpoint`` does it: each layer's
cross-attention (``crossattention.self.*``, ``crossattention.output.dense.*``) copied into both branches, the
merge layers and the head initialised, the position embeddings interpolated to 384 px.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .. import convert, ops
from ..ops import concat_linear
from ._checks import check_text
from .blip import BlipTextEmbeddings
from .blip_config import BlipTaskConfig
from .blip_finetune import (TaskCheckpoints, TaskLoad, check_embeds, check_pixels, enc_ids, load_task_checkpoint,
                            task_vit, vision_tokens)
from .blip_vqa import PRETRAIN_EXTRAS
from .layers import (DenseLN, ImageKV, Intermediate, LayerPlan, Projections, activation, attention_block,
                     dropout_settings, ffn, gelu_approximate, init_weights, qkv_projection, run_layers, stacked_kv)

__all__ = ["BlipNLVR", "BlipNLVRConfig", "BlipNLVROutput", "BlipNLVRTextModel"]


class BlipNLVRConfig(BlipTaskConfig):
    """:class:`~blipfast.models.blip_config.BlipTaskConfig` at BLIP's NLVR2 resolution (384 px,
    ``configs/nlvr.yaml``), plus ``merge_from_layer``: the first layer whose twin outputs are merged by a Linear
    (BLIP: ``layer_num >= 6``); the layers below average them."""

    IMAGE_SIZE = 384
    FIELDS = BlipTaskConfig.FIELDS + ("merge_from_layer",)
    DEFAULTS = {**BlipTaskConfig.DEFAULTS, "merge_from_layer": 6}


# ----------------------------------------------------------------------------------------------
# parameter holders under BLIP_NLVR's names


class _SelfAttention(nn.Module):  # attention: self (query, key, value), output (dense, LayerNorm)
    def __init__(self, cfg):
        super().__init__()
        self.self = Projections(cfg, cfg.hidden_size)
        self.output = DenseLN(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class TwinOutput(nn.Module):
    """``nlvr_encoder.BertSelfOutput(twin=True, merge=...)``: ``dense0``, ``dense1``, ``merge_layer`` (2d -> d, in
    the merging layers; None elsewhere) and ``LayerNorm``."""

    def __init__(self, cfg, merge: bool):
        super().__init__()
        d = cfg.hidden_size
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dense0 = nn.Linear(d, d)
        self.dense1 = nn.Linear(d, d)
        self.merge_layer = nn.Linear(2 * d, d) if merge else None


class TwinCrossAttention(nn.Module):
    """``nlvr_encoder.BertAttention(is_cross_attention=True)``: ``self0`` and ``self1`` (query from the text, key /
    value from the image width) and the :class:`TwinOutput` ``output``."""

    def __init__(self, cfg, merge: bool):
        super().__init__()
        self.self0 = Projections(cfg, cfg.encoder_hidden_size)
        self.self1 = Projections(cfg, cfg.encoder_hidden_size)
        self.output = TwinOutput(cfg, merge)


class NLVRLayer(nn.Module):
    def __init__(self, cfg, merge: bool):
        super().__init__()
        self.attention = _SelfAttention(cfg)
        self.crossattention = TwinCrossAttention(cfg, merge)
        self.intermediate = Intermediate(cfg)
        self.output = DenseLN(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Encoder(nn.Module):
    def __init__(self, cfg, merge_from: int):
        super().__init__()
        self.layer = nn.ModuleList(NLVRLayer(cfg, i >= merge_from) for i in range(cfg.num_hidden_layers))


@dataclass
class _TwinPlan(LayerPlan):
    """A LayerPlan with the second image's K/V per layer (``cross_kv`` holds the first's) and its key mask."""

    cross_kv1: dict = field(default_factory=dict)
    encoder_mask1: Optional[torch.Tensor] = None


def twin_cross_attention_block(ca: TwinCrossAttention, x: torch.Tensor, kv0, kv1, num_heads: int, plan: _TwinPlan,
                               seeds) -> torch.Tensor:
    """The twin cross-attention of the rows ``x`` [B, T, d]: one GEMM for both queries, one attention per image
    (``ops.cross_attention``, own dropout each), the outputs projected by ``dense0`` / ``dense1`` and averaged or
    merged, then dropout + residual + LayerNorm in one epilogue. Draws three seeds."""
    d = x.shape[-1]
    q = concat_linear(x, (ca.self0.query.weight, ca.self1.query.weight), (ca.self0.query.bias, ca.self1.query.bias))
    q0, q1 = q.unflatten(-1, (2, num_heads, d // num_heads)).unbind(-3)
    c0 = ops.cross_attention(q0, kv0[0], kv0[1], kv_index=plan.kv_index, key_padding_mask=plan.encoder_mask,
                             dropout_p=plan.p_att, seed=next(seeds, None)).reshape(x.shape)
    c1 = ops.cross_attention(q1, kv1[0], kv1[1], kv_index=plan.kv_index, key_padding_mask=plan.encoder_mask1,
                             dropout_p=plan.p_att, seed=next(seeds, None)).reshape(x.shape)
    o = ca.output
    if o.merge_layer is not None:  # merge_layer(cat(dense0(c0), dense1(c1))), its bias in the epilogue
        h = torch.cat([F.linear(c0, o.dense0.weight, o.dense0.bias), F.linear(c1, o.dense1.weight, o.dense1.bias)], -1)
        y, bias = F.linear(h, o.merge_layer.weight), o.merge_layer.bias
    else:  # (dense0(c0) + dense1(c1)) / 2
        y, bias = (F.linear(c0, o.dense0.weight) + F.linear(c1, o.dense1.weight)) * 0.5, (o.dense0.bias + o.dense1.bias) * 0.5
    ln = o.LayerNorm
    return ops.bias_dropout_add_layernorm(y, bias, x, ln.weight, ln.bias, eps=ln.eps, dropout_p=plan.p_hid,
                                          seed=next(seeds, None))


class BlipNLVRTextModel(nn.Module):
    """BLIP's NLVR2 text encoder (``nlvr_encoder.BertModel``, no pooler): embeddings, then per layer bidirectional
    self-attention, the twin cross-attention (:func:`twin_cross_attention_block`) and the FFN."""

    def __init__(self, cfg, merge_from_layer: int = 6, *, init: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = BlipTextEmbeddings(cfg)
        self.encoder = _Encoder(cfg, merge_from_layer)
        self._act = activation(cfg.hidden_act)
        self._gelu = gelu_approximate(cfg.hidden_act)
        if init:
            init_weights(self, cfg.initializer_range)

    def image_kv(self, image0_embeds: torch.Tensor, image1_embeds: torch.Tensor, mask0=None, mask1=None) -> tuple:
        """(first image's, second image's) :class:`~blipfast.models.ImageKV` of every layer: the K/V of ``self0``
        over ``image0_embeds`` [M, N, width] and of ``self1`` over ``image1_embeds``, one GEMM each."""
        cfg = self.config
        h = cfg.num_attention_heads
        out = []
        for name, x, m in (("self0", image0_embeds, mask0), ("self1", image1_embeds, mask1)):
            check_embeds("BlipNLVRTextModel", x, cfg.encoder_hidden_size)
            w = self.encoder.layer[0].crossattention.self0.key.weight
            projs = [getattr(layer.crossattention, name) for layer in self.encoder.layer]
            out.append(ImageKV(stacked_kv(projs, x.to(w.dtype), h, cfg.hidden_size // h),
                               None if m is None else m != 0))
        return tuple(out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_kv: tuple,
                kv_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last hidden states [B, T, d] of ``input_ids`` [B, T] (as given: BLIP_NLVR puts [ENC] first) over the
        image pair's K/V ``encoder_kv`` (from :meth:`image_kv`; ``kv_index`` [B]: the pair of each row)."""
        cfg = self.config
        kv0, kv1 = encoder_kv
        x = self.embeddings(input_ids)
        if kv_index is None and kv0[0][0].shape[0] != x.shape[0]:
            raise ValueError(f"BlipNLVRTextModel: {kv0[0][0].shape[0]} image pairs for {x.shape[0]} sentences: pass "
                             f"kv_index")
        p_hid, p_att, sites = dropout_settings(cfg, self.training, sites_per_layer=6)
        plan = _TwinPlan(mode="bidirectional", num_query=0, attention_mask=attention_mask != 0, p_hid=p_hid,
                         p_att=p_att, dropout_sites=sites, cross_kv=dict(enumerate(kv0)), kv_index=kv_index,
                         encoder_mask=kv0.key_padding_mask, cross_kv1=dict(enumerate(kv1)),
                         encoder_mask1=kv1.key_padding_mask)
        return run_layers(self.encoder.layer, x, plan, self._layer, False)[0]

    def _layer(self, i: int, layer: NLVRLayer, x: torch.Tensor, plan: _TwinPlan, seeds) -> torch.Tensor:
        h = self.config.num_attention_heads
        q, k, v = qkv_projection(layer.attention.self, x, h, x.shape[-1] // h)
        x = attention_block(layer.attention.output, x, q, k, v, plan, seeds, num_query=0, mode="bidirectional",
                            key_padding_mask=plan.attention_mask)
        x = twin_cross_attention_block(layer.crossattention, x, plan.cross_kv[i], plan.cross_kv1[i], h, plan, seeds)
        return ffn(self._act, self._gelu, layer.intermediate, layer.output, x, plan.p_hid, next(seeds, None))


@dataclass
class BlipNLVROutput(ModelOutput):
    """``loss`` (with labels): the mean cross-entropy; ``logits`` [B, 2] (class 1: the sentence is true)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


_TWIN_SOURCE = re.compile(r"(text_encoder\.encoder\.layer\.\d+\.crossattention\.)(self|output\.dense)\.(.*)\Z")


def _twin_copies(sd: dict) -> dict:
    """BLIP's ``blip_nlvr.load_checkpoint``: every ``crossattention.self.*`` into ``self0`` and ``self1``, every
    ``crossattention.output.dense.*`` into ``dense0`` and ``dense1`` (a pre-training checkpoint's single
    cross-attention starts both branches)."""
    out = {}
    for k, v in sd.items():
        m = _TWIN_SOURCE.match(k)
        if m is None:
            out[k] = v
            continue
        for j in "01":
            out[f"{m.group(1)}{m.group(2)}{j}.{m.group(3)}"] = v
    return out


class BlipNLVR(TaskCheckpoints, nn.Module):
    """BLIP's NLVR2 model (see the module docstring)."""

    def __init__(self, config: Any = None):
        super().__init__()
        cfg = BlipNLVRConfig.of(config)
        self.config = cfg
        tc = cfg.text
        self.vision_model = task_vit(cfg.vision, cfg.drop_path_rate)
        self.text_encoder = BlipNLVRTextModel(tc, cfg.merge_from_layer)
        d = tc.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))

    def image_embeds(self, pixel_values: torch.Tensor) -> tuple:
        """(first images', second images') ViT tokens [B, N, width] of ``pixel_values`` [B, 2, 3, S, S], from one ViT
        pass over [all first images; all second images] (BLIP's order)."""
        check_pixels("BlipNLVR", pixel_values, self.config.vision.image_size, lead=2)
        if pixel_values.shape[1] != 2:
            raise ValueError(f"BlipNLVR: pixel_values must hold two images per example [B, 2, 3, S, S], got "
                             f"{list(pixel_values.shape)}")
        b = pixel_values.shape[0]
        tokens = vision_tokens(self.vision_model, torch.cat([pixel_values[:, 0], pixel_values[:, 1]]))
        return tokens[:b], tokens[b:]

    def forward(self, pixel_values: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                image_embeds: Optional[tuple] = None) -> BlipNLVROutput:
        """``pixel_values`` [B, 2, 3, S, S] (or ``image_embeds``: the pair of ViT token tensors [B, N, width]);
        ``input_ids`` / ``attention_mask`` [B, T] (BERT-tokenised, [CLS] first: [ENC] replaces it); ``labels`` [B]
        (0 / 1) for the loss."""
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("BlipNLVR: give pixel_values or image_embeds (one of them)")
        e0, e1 = self.image_embeds(pixel_values) if image_embeds is None else image_embeds
        b = e0.shape[0]
        check_text("BlipNLVR", input_ids, attention_mask, b, self.config.text.max_position_embeddings, e0.device,
                   "the image input")
        h = self.text_encoder(enc_ids(input_ids, self.config.enc_token_id), attention_mask,
                              self.text_encoder.image_kv(e0, e1))
        logits = self.cls_head(h[:, 0])
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (b,) or labels.is_floating_point():
                raise ValueError(f"BlipNLVR: labels must be an int tensor [{b}] of 0 / 1")
            loss = F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels.long())
        return BlipNLVROutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def load_lavis_state_dict(self, state_dict, what: str = "BlipNLVR.load_lavis_state_dict") -> TaskLoad:
        """``model_base_nlvr.pth`` / ``model_large_nlvr.pth``, or a pre-training checkpoint as initialisation (twin
        copies of its cross-attention; merge layers and head initialised); HF names work too."""
        sd = convert.load_state_dict(state_dict)
        pretrain = any(_TWIN_SOURCE.match(k) for k in sd)
        start = (r"text_encoder\.encoder\.layer\.\d+\.crossattention\.output\.merge_layer\.", r"cls_head\.")
        return load_task_checkpoint(self, sd, drop=PRETRAIN_EXTRAS + (r"text_decoder\.",),
                                    initialise=start if pretrain else (), rewrite=_twin_copies, what=what)
