"""What BLIP's fine-tuned task models share (``BlipVQA``, ``BlipNLVR``, ``BlipVisDial``; docs/blip-finetune.md):
their configuration, their trainable ViT, the ViT position embeddings interpolated to the task resolution, the
zero-shot video input and the loading of Salesforce BLIP checkpoints.

- :class:`~blipfast.models.blip_config.BlipTaskConfig` (re-exported here): their configuration, one
  :class:`~blipfast.models.blip_config.BlipConfigBase` as every BLIP (v1) model's (the MED text model, the ViT at
  the task's size, BLIP's ``[ENC]`` / ``[DEC]`` token ids and the ViT's stochastic depth ``drop_path_rate``).
- :func:`task_vit`: HF's ``BlipVisionModel`` with SDPA attention (``fuse_vision_model``) whose encoder layers add
  timm's ``DropPath`` (:class:`DropPathBlipEncoderLayer`, the same draw as timm 0.4.12: one Bernoulli per sample,
  the kept branch scaled by ``1 / keep``), training only.
- :func:`interpolate_pos_embed`: BLIP's ``interpolate_pos_embed`` (``models/vit.py``): the patch grid of a
  checkpoint's position embeddings resized bicubically (``align_corners=False``), the [CLS] position kept.
- :func:`video_tokens`: zero-shot video (the BLIP paper's section 5.6): the ViT tokens of ``F`` frames of a video
  concatenated into one image input ``[F * N, width]``.
- :func:`load_task_checkpoint`: a Salesforce BLIP / HF state dict into a task model as BLIP's ``load_checkpoint``
  does it: position embeddings interpolated, keys whose shape differs from the model's dropped (BLIP deletes them
  and the parameter keeps its initialisation), the keys the task model has no place for (a pre-training
  checkpoint's momentum encoders, queues, ITC / ITM heads, ...) left out; unlike BLIP's ``strict=False`` nothing
  is silent: the returned :class:`TaskLoad` lists the keys left out and the parameters that kept their
  initialisation, and a key that fits nothing the model or ``optional`` names is a ValueError.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip import BlipEncoderLayer

from .. import convert
from .blip_config import BlipTaskConfig  # noqa: F401  (re-exported: the task models' configuration lives there)
from .blip_vision import fuse_vision_model

__all__ = ["BlipTaskConfig", "DropPathBlipEncoderLayer", "TaskCheckpoints", "TaskLoad", "interpolate_pos_embed",
           "load_task_checkpoint", "task_vit", "video_tokens"]


# ----------------------------------------------------------------------------------------------
# the ViT: SDPA attention, GELU recomputed, stochastic depth


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm 0.4.12's ``drop_path``: each sample's branch is kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class DropPathBlipEncoderLayer(BlipEncoderLayer):
    """HF's ``BlipEncoderLayer`` with timm's stochastic depth on both residual branches (``drop_prob``), as BLIP's
    ViT ``Block``: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    drop_prob: float = 0.0

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
        x = hidden_states + drop_path(h, self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.layer_norm2(x)), self.drop_prob, self.training)


def task_vit(vision: BlipVisionConfig, drop_path_rate: float) -> BlipVisionModel:
    """A trainable BLIP ViT (HF ``BlipVisionModel``, SDPA attention) with stochastic depth ``linspace(0,
    drop_path_rate, depth)`` over its blocks (BLIP's ``VisionTransformer``)."""
    vit = fuse_vision_model(BlipVisionModel(vision))
    layers = vit.encoder.layers
    rates = torch.linspace(0, drop_path_rate, len(layers), device="cpu").tolist()  # BLIP's dpr (float32 steps)
    for layer, p in zip(layers, rates):
        if p > 0:
            layer.__class__ = DropPathBlipEncoderLayer
            layer.drop_prob = p
    return vit


def vision_tokens(vit: BlipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The ViT's output tokens [B, N, width] (after its final LayerNorm, BLIP's ``visual_encoder(image)``)."""
    w = vit.embeddings.patch_embedding.weight
    return vit(pixel_values=pixel_values.to(w.dtype)).last_hidden_state


def video_tokens(vit: BlipVisionModel, frames: torch.Tensor) -> torch.Tensor:
    """Zero-shot video input: ``frames`` [V, F, 3, S, S] -> the ViT tokens of every frame concatenated per video
    [V, F * N, width] (BLIP's ``video_feat.view(B, -1, width)``)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
        got = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"video_tokens: frames must be [videos, frames, 3, S, S], got {got}")
    v, f = frames.shape[:2]
    tokens = vision_tokens(vit, frames.flatten(0, 1))
    return tokens.view(v, f * tokens.shape[1], tokens.shape[2])


# ----------------------------------------------------------------------------------------------
# checkpoints


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """BLIP's ``interpolate_pos_embed``: position embeddings [1, 1 + n, W] of a square grid of n patches resized
    (bicubic, ``align_corners=False``) to ``num_patches`` (a square); the [CLS] position kept; unchanged when the
    grids agree."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"interpolate_pos_embed: pos_embed must be [1, 1 + patches, width], got "
                         f"{list(pos_embed.shape)}")
    orig, new = int(math.isqrt(pos_embed.shape[1] - 1)), int(math.isqrt(num_patches))
    if orig * orig != pos_embed.shape[1] - 1 or new * new != num_patches:
        raise ValueError(f"interpolate_pos_embed: needs square patch grids, got {pos_embed.shape[1] - 1} -> "
                         f"{num_patches} patches")
    if orig == new:
        return pos_embed
    w = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, orig, orig, w).permute(0, 3, 1, 2)
    dt = grid.dtype
    grid = F.interpolate(grid.float() if dt in (torch.float16, torch.bfloat16) else grid, size=(new, new),
                         mode="bicubic", align_corners=False).to(dt)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@dataclass
class TaskLoad:
    """What :func:`load_task_checkpoint` did: ``keys`` (the model's keys it filled), ``initialised`` (the
    model's keys the checkpoint does not fill: they keep their initialisation, as under BLIP's ``strict=False``),
    ``left_out`` (checkpoint keys the task model has no place for, or of another shape: BLIP drops them too)."""

    keys: list
    initialised: list
    left_out: list = field(default_factory=list)

    def notes(self) -> list:
        """What a log says of the load: a line for the keys left out and one for those initialised (six named)."""
        out = []
        for label, keys in (("left out", self.left_out), ("initialised (not in the checkpoint)", self.initialised)):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 6 else ""
                out.append(f"{label}: " + ", ".join(keys[:6]) + more)
        return out


_POS = ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")


def load_task_checkpoint(model: nn.Module, source, *, optional: Sequence[str] = (), drop: Sequence[str] = (),
                         initialise: Sequence[str] = (), rewrite=None, what: str = "weights") -> TaskLoad:
    """Load a Salesforce BLIP, HF or blipfast state dict (or a path :func:`blipfast.convert.load_state_dict`
    reads) into a BLIP task model (see the module docstring).

    ``drop``: regular expressions (matched at the start of a key in the source's or HF's names) of source keys
    the task has no place for (left out and listed); ``initialise``: of the model's keys the source may lack
    (e.g. NLVR2's merge layers and head when starting from pre-training); ``optional``: both. ``rewrite``: a
    function ``state dict -> state dict`` applied (in HF names) before loading (e.g. NLVR2's twin copies). Keys of
    another shape than the model's are left out (BLIP deletes them). Anything else the source lacks or holds is a
    ValueError naming ``what``."""
    sd = convert.load_state_dict(source.weights if isinstance(source, convert.Source) else source)
    conv, _ = convert.to_hf(sd)
    sd = {**conv.unmapped, **conv.state_dict}  # what does not map keeps its name: load_into reports it
    if rewrite is not None:
        sd = rewrite(sd)
    own = model.state_dict()
    pos_key = _POS[0]
    if pos_key in sd and pos_key in own and sd[pos_key].shape != own[pos_key].shape \
            and sd[pos_key].shape[-1] == own[pos_key].shape[-1]:
        sd[pos_key] = interpolate_pos_embed(sd[pos_key], own[pos_key].shape[1] - 1)
    drop_rx = [re.compile(p) for p in (*drop, *optional)]
    left_out = []
    for k in list(sd):
        if k in own and tuple(sd[k].shape) != tuple(own[k].shape):
            left_out.append(f"{k} {list(sd[k].shape)} (the model's is {list(own[k].shape)})")
            del sd[k]
        elif k not in own and any(p.match(k) for p in drop_rx):
            left_out.append(k)
            del sd[k]
    may_lack = [*initialise, *optional, *(re.escape(k.split(" ")[0]) + r"\Z" for k in left_out)]
    done = convert.load_into(model, sd, ignore=may_lack, what=what)
    return TaskLoad(keys=done.keys, initialised=done.absent, left_out=sorted(left_out))


class TaskCheckpoints:
    """``from_lavis`` and ``to_lavis_state_dict`` of a task model (a module with ``load_lavis_state_dict``)."""

    @classmethod
    def from_lavis(cls, checkpoint, config: Any = None):
        """A model from a Salesforce BLIP checkpoint (a ``.pth`` path read with ``weights_only=True``, a dict with
        key ``"model"``, or a state dict)."""
        model = cls(config)
        model.load_lavis_state_dict(convert.load_state_dict(checkpoint))
        return model

    def to_lavis_state_dict(self) -> dict:
        """The weights under Salesforce BLIP names (``visual_encoder.*``, ``text_encoder.*``, ...)."""
        sd = {k: v for k, v in self.state_dict().items() if not k.endswith("position_ids")}
        return convert.hf_to_blip(sd, strict=True).state_dict


def check_pixels(who: str, pixel_values, size: int, lead: int = 1) -> None:
    """``pixel_values`` a float tensor [..., 3, size, size] with ``lead`` leading dimensions (at least one row)."""
    ok = isinstance(pixel_values, torch.Tensor) and pixel_values.is_floating_point() \
        and pixel_values.dim() == 3 + lead and tuple(pixel_values.shape[-3:]) == (3, size, size) \
        and pixel_values.shape[0] > 0
    if not ok:
        got = (f"{list(pixel_values.shape)} {pixel_values.dtype}" if isinstance(pixel_values, torch.Tensor)
               else type(pixel_values).__name__)
        lead_s = "B, 2, " if lead == 2 else "B, "
        raise ValueError(f"{who}: pixel_values must be a float tensor [{lead_s}3, {size}, {size}], got {got}")


def check_embeds(who: str, image_embeds, width: int) -> None:
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != width \
            or image_embeds.shape[0] == 0:
        got = list(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
        raise ValueError(f"{who}: image_embeds must be [B, N, {width}], got {got}")


def enc_ids(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """``input_ids`` [B, T] with position 0 replaced by ``token_id`` (BLIP's ``input_ids[:, 0] = enc_token_id``)."""
    return torch.cat([torch.full_like(input_ids[:, :1], token_id), input_ids[:, 1:]], 1).long()
