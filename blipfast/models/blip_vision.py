"""The BLIP (v1) ViT: Hugging Face's ``BlipVisionModel`` with a leaner attention and MLP.

transformers' ``BlipAttention`` only has an eager implementation: it materialises the [B, H, N, N] attention
probabilities (197 x 197 per head at 224 px, 577 x 577 at 384 px) and autograd keeps them for the backward; its
``BlipMLP`` keeps the [B, N, 4d] GELU output. BLIP pre-training trains its ViT, so these are the largest
activations of the step. :func:`fuse_vision_model` switches every ``BlipAttention`` of a model to
:class:`SdpaBlipAttention` (one ``F.scaled_dot_product_attention`` call: FlashAttention or the memory-efficient
kernel on a GPU; it returns no attention probabilities, ``None`` where HF returns them) and every GELU ``BlipMLP``
to :class:`RecomputeGeluBlipMLP` (``blipfast.ops.gelu_mlp``: the GELU is recomputed in the backward
instead of kept). The modules keep their parameters, state dict keys and outputs: ``__class__`` is changed in
place, nothing is copied. :func:`unfuse_vision_model` undoes it.

For the fine-tuned models (retrieval and captioning at 384 px, VQA at 480 px) from a 224 px checkpoint, as BLIP's
``load_checkpoint`` does (``models/vit.py`` ``interpolate_pos_embed``): :func:`interpolate_pos_embed` resizes a
position embedding [1, 1 + g*g, d] to another patch grid (the class token's entry kept, the grid bicubic,
``align_corners=False``), and :func:`fit_position_embeddings` applies it to every ViT position embedding of a state
dict whose grid differs from the model's. :func:`set_grad_checkpointing` is BLIP's ``vit_grad_ckpt`` /
``vit_ckpt_layer``: the last ``ckpt_layer`` blocks recompute their activations in the backward.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.blip.modeling_blip import BlipAttention, BlipMLP

from ..convert import blip_to_hf
from ..ops import gelu_mlp, sdpa
from .layers import gelu_approximate


def sdpa_qkv(qkv: torch.Tensor, num_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """The attention context [B, N, d] of a fused QKV projection's output [B, N, 3d] (q | k | v, heads of d / H
    each): one SDPA call with scale 1/sqrt(head_dim), as HF's ViTs; q, k, v are strided views of ``qkv``."""
    b, n, d3 = qkv.shape
    d = d3 // 3
    qkv = qkv.view(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    ctx = sdpa(qkv[0], qkv[1], qkv[2], dropout_p=dropout_p)
    return ctx.transpose(1, 2).reshape(b, n, d)


class SdpaBlipAttention(BlipAttention):
    """``BlipAttention`` computed with SDPA (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        p = self.dropout.p if self.training else 0.0
        return self.projection(sdpa_qkv(self.qkv(hidden_states), self.num_heads, p)), None


class RecomputeGeluBlipMLP(BlipMLP):
    """``BlipMLP`` with a GELU activation whose backward recomputes the GELU (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        approximate = gelu_approximate(self.config.hidden_act)
        y = gelu_mlp(hidden_states, self.fc1.weight, self.fc1.bias, self.fc2.weight, approximate=approximate)
        return y + self.fc2.bias


def fuse_vision_model(model: nn.Module) -> nn.Module:
    """Switch ``model``'s ``BlipAttention`` and GELU ``BlipMLP`` modules (in place); returns ``model``."""
    for m in model.modules():
        if type(m) is BlipAttention:
            m.__class__ = SdpaBlipAttention
        elif type(m) is BlipMLP and gelu_approximate(m.config.hidden_act) is not None:
            m.__class__ = RecomputeGeluBlipMLP
    return model


def unfuse_vision_model(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_vision_model`; returns ``model``."""
    for m in model.modules():
        if type(m) is SdpaBlipAttention:
            m.__class__ = BlipAttention
        elif type(m) is RecomputeGeluBlipMLP:
            m.__class__ = BlipMLP
    return model


# ----------------------------------------------------------------------------------------------
# position embeddings at another resolution, gradient checkpointing


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """BLIP's ``interpolate_pos_embed``: ``pos_embed`` [1, 1 + g*g, d] for a grid of ``num_patches`` (a square)
    patches; the class token's entry is kept, the g x g grid is resized bicubically (``align_corners=False``) in
    float32 and cast back. Returned as is when the grids agree."""
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        got = list(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"interpolate_pos_embed: pos_embed must be [1, 1 + g*g, d], got {got}")
    old, new = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_patches)
    if old * old != pos_embed.shape[1] - 1 or new * new != num_patches:
        raise ValueError(f"interpolate_pos_embed: {pos_embed.shape[1] - 1} and {num_patches} patches must both be "
                         f"square grids")
    if old == new:
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def fit_position_embeddings(state_dict: dict, model: nn.Module) -> list:
    """Resize (:func:`interpolate_pos_embed`) the ViT position embeddings of ``state_dict`` (Salesforce names
    ``visual_encoder[_m].pos_embed`` or HF names ``...embeddings.position_embedding``) whose grid differs from that
    of ``model``'s embedding of the same name, in place; returns notes naming what it resized (BLIP's loader prints
    "reshape position embedding from 196 to 576")."""
    own = model.state_dict()
    done = []
    for key, t in list(state_dict.items()):
        if not key.endswith(("pos_embed", "embeddings.position_embedding")) or not isinstance(t, torch.Tensor):
            continue
        name = key if key in own else next(iter(blip_to_hf({key: t}).state_dict), None)
        if name in own and t.dim() == 3 and t.shape != own[name].shape and t.shape[-1] == own[name].shape[-1]:
            state_dict[key] = interpolate_pos_embed(t, own[name].shape[1] - 1)
            done.append(f"{key} (position embedding reshaped from {t.shape[1] - 1} to {own[name].shape[1] - 1} "
                        f"patches)")
    return done


def set_grad_checkpointing(vision_model: nn.Module, ckpt_layer: int) -> nn.Module:
    """BLIP's ``VisionTransformer(use_grad_checkpointing=True, ckpt_layer=k)``: blocks ``i >= depth - k`` recompute
    their forward in the backward (``torch.utils.checkpoint``, non-reentrant; BLIP wraps each block's attention and
    MLP with fairscale's ``checkpoint_wrapper``: the same values, the LayerNorms kept); ``0`` turns it off, more
    than the ViT's depth checkpoints every block.
    ``vision_model``: an HF ``BlipVisionModel``; returns it."""
    layers = vision_model.encoder.layers
    if isinstance(ckpt_layer, bool) or not isinstance(ckpt_layer, int) or ckpt_layer < 0:
        raise ValueError(f"set_grad_checkpointing: ckpt_layer must be an int >= 0, got {ckpt_layer!r}")
    from torch.utils.checkpoint import checkpoint

    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i >= len(layers) - ckpt_layer
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return vision_model
