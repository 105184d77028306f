"""The BLIP (v1) ViT: Hugging Face's ``BlipVisionModel`` with its self-attention computed by SDPA.

transformers' ``BlipAttention`` only has an eager implementation: it materialises the [B, H, N, N] attention
probabilities (197 x 197 per head at 224 px, 577 x 577 at 384 px) and autograd keeps them for the backward. BLIP
pre-training trains its ViT, so that is the largest activation of the step. :func:`use_sdpa_attention` switches
every ``BlipAttention`` of a model to :class:`SdpaBlipAttention` (the same module with the same parameters, state
dict keys and outputs; ``__class__`` is changed in place, nothing is copied), whose forward is one
``F.scaled_dot_product_attention`` call (FlashAttention or the memory-efficient kernel on a GPU). It returns no
attention probabilities (``None`` where HF returns them). :func:`use_eager_attention` undoes it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.blip.modeling_blip import BlipAttention

from ..ops._common import sdpa


class SdpaBlipAttention(BlipAttention):
    """``BlipAttention`` computed with SDPA (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        b, n, d = hidden_states.shape
        qkv = self.qkv(hidden_states).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout.p if self.training else 0.0
        ctx = sdpa(qkv[0], qkv[1], qkv[2], dropout_p=p)  # scale 1/sqrt(head_dim), as HF's
        return self.projection(ctx.transpose(1, 2).reshape(b, n, d)), None


def use_sdpa_attention(model: nn.Module) -> nn.Module:
    """Every ``BlipAttention`` in ``model`` becomes a :class:`SdpaBlipAttention` (in place); returns ``model``."""
    for m in model.modules():
        if type(m) is BlipAttention:
            m.__class__ = SdpaBlipAttention
    return model


def use_eager_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`use_sdpa_attention`; returns ``model``."""
    for m in model.modules():
        if type(m) is SdpaBlipAttention:
            m.__class__ = BlipAttention
    return model
