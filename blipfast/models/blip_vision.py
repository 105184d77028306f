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
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.blip.modeling_blip import BlipAttention, BlipMLP

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
