"""BLIP-2's ViT (EVA ViT-g/14 as Hugging Face's ``Blip2VisionModel`` holds it) made cheap to train.

BLIP-2's fine-tuning recipes (LAVIS ``freeze_vit: False``: COCO captioning, retrieval) train the 1B-parameter ViT at
364 px, where its activations dominate the step. The blocks are pre-LN without layer scale or relative position
bias (LAVIS' ``eva_vit.py`` with ``init_values=None``; depth 39, width 1408, 16 heads, MLP 6144, exact GELU,
LayerNorm eps 1e-6), i.e. HF's ``Blip2EncoderLayer``::

    h = x + proj(attention(qkv(LN1(x))))          y = h + fc2(gelu(fc1(LN2(h))))

:func:`fuse_blip2_vision_model` switches every ``Blip2EncoderLayer`` (and InstructBLIP's identical
``InstructBlipEncoderLayer``) of a model to a block that computes the same function with

- ``layernorm_linear`` for LN1 + the QKV projection and ``layernorm_gelu_mlp`` for LN2 + the MLP
  (blipfast/models/_prenorm_linear.py): the backward keeps the normalised inputs in the GEMM dtype and the GELU's
  input, recomputing the LayerNorm outputs and the GELU (elementwise, no GEMM is recomputed); no GEMM keeps a
  copy of its weight (the output projection runs as ``concat_linear``);
- one SDPA call on strided q/k/v views of the QKV output (FlashAttention on CUDA under bf16/fp16, the memory-
  efficient kernel in fp32): no [B, H, N, N] probabilities are materialised (HF's eager path keeps them);
- optional gradient checkpointing per block (``checkpoint=``: every block as LAVIS' ``use_grad_checkpoint``,
  every k-th block, or a set of blocks, e.g. the last k as BLIP's ``vit_ckpt_layer``), ``use_reentrant=False``;
  the recomputation skips the block's last GEMM (fc2: its output is never used there, and its saved input comes
  out of fc1), as plain autograd's early stop does for LAVIS' blocks.

Post-LN epilogues (``ops.bias_dropout_add_layernorm``: ``LayerNorm(dropout(x + b) + residual)``) do not fit a
pre-LN block: the residual stream itself flows on and needs the gradient of the sum, which that op does not return.

The modules keep their parameters, state-dict keys and outputs (``__class__`` is changed in place, nothing is
copied): HF checkpoints load as before, and LAVIS' ``visual_encoder.*`` through ``blipfast.convert.lavis_to_hf``
(EVA's ``q_bias`` / ``v_bias`` become the fused ``qkv.bias``). :func:`unfuse_blip2_vision_model` undoes it.

Position embeddings: :func:`interpolate_position_embedding` is LAVIS' ``eva_vit.interpolate_pos_embed`` (bicubic,
``align_corners=False``, float32, the CLS position kept) on a tensor; it equals HF's ``interpolate_pos_encoding``.
LAVIS interpolates once, when it loads the 224-px ViT into a 364-px model, and then trains the [1, 677, 1408]
table; :func:`resize_position_embedding` does that to a model, :func:`interpolate_pos_embed_state_dict` to a
checkpoint. (HF's ``interpolate_pos_encoding=True`` instead interpolates the 224-px table in every forward.)
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

from ..ops import concat_linear
from ._prenorm_linear import layernorm_gelu_mlp, layernorm_linear
from .blip_vision import sdpa_qkv
from .layers import gelu_approximate

CheckpointSpec = Union[None, bool, int, str, Iterable[int]]


def _qkv_bias(attn: nn.Module) -> Optional[torch.Tensor]:
    """The [3d] bias of the fused QKV GEMM: transformers 5.x holds it as ``qkv.bias`` (q | k | v), 4.x and LAVIS as
    ``q_bias`` / ``v_bias`` with no key bias."""
    if attn.qkv.bias is not None:
        return attn.qkv.bias
    q, v = getattr(attn, "q_bias", None), getattr(attn, "v_bias", None)
    return None if q is None else torch.cat((q, torch.zeros_like(v, requires_grad=False), v))


_STATE = threading.local()  # .recomputing: inside a checkpointed block's recomputation


@contextlib.contextmanager
def _recomputing():
    prev = getattr(_STATE, "recomputing", False)
    _STATE.recomputing = True
    try:
        yield
    finally:
        _STATE.recomputing = prev


def _checkpoint_contexts():
    """``torch.utils.checkpoint``'s ``context_fn``: nothing around the forward, the recomputing flag around the
    recomputation (which then skips the block's last GEMM: its output is never used, only its saved input)."""
    return contextlib.nullcontext(), _recomputing()


def prenorm_vit_block(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One pre-LN ViT block (``layer_norm1``, ``self_attn.qkv`` / ``.projection``, ``layer_norm2``, ``mlp.fc1`` /
    ``.fc2``: HF's BLIP-2, InstructBLIP and BLIP ViT layers) on ``x`` [B, N, d]; see the module doc. In a
    checkpoint's recomputation the MLP's second GEMM is skipped (the output is discarded there)."""
    attn, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.layer_norm1, layer.layer_norm2
    p = getattr(attn, "attention_dropout", 0.0) if attn.training else 0.0
    qkv = layernorm_linear(x, ln1.weight, ln1.bias, ln1.eps, attn.qkv.weight, _qkv_bias(attn))
    proj = attn.projection  # concat_linear over one weight: keeps no bf16 copy of it under autocast
    h = x + concat_linear(sdpa_qkv(qkv, attn.num_heads, p), (proj.weight,), (proj.bias,))
    approximate = gelu_approximate(mlp.config.hidden_act)
    if approximate is None:  # another activation: HF's MLP as it is
        return h + mlp(ln2(h))
    recomputing = getattr(_STATE, "recomputing", False)
    y = layernorm_gelu_mlp(h, ln2.weight, ln2.bias, ln2.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                           approximate=approximate, compute_output=not recomputing)
    return h if recomputing else h + (y + mlp.fc2.bias)


class _FusedBlock:
    """Mixin of the fused layer classes: ``forward`` runs :func:`prenorm_vit_block`, under checkpointing when the
    layer is marked (``blipfast_checkpoint``) and autograd records; HF's own gradient checkpointing, when a user
    turned it on, wraps the call already and is left to do so."""

    blipfast_checkpoint = False

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hf_ckpt = getattr(self, "gradient_checkpointing", False) and self.training
        if self.blipfast_checkpoint and not hf_ckpt and torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # the compiler's partitioner recomputes only what the backward needs
                return _checkpoint(prenorm_vit_block, self, hidden_states, use_reentrant=False)
            return _checkpoint(prenorm_vit_block, self, hidden_states, use_reentrant=False,
                               context_fn=_checkpoint_contexts)
        return prenorm_vit_block(self, hidden_states)


class FusedBlip2EncoderLayer(_FusedBlock, Blip2EncoderLayer):
    """``Blip2EncoderLayer`` computed by :func:`prenorm_vit_block` (see the module doc)."""


_FUSED: dict = {Blip2EncoderLayer: FusedBlip2EncoderLayer}


def _fused_classes() -> dict:
    """{HF layer class: fused class}; InstructBLIP's is added on first use (its modelling code loads slowly)."""
    if len(_FUSED) == 1:
        from transformers.models.instructblip.modeling_instructblip import InstructBlipEncoderLayer

        class FusedInstructBlipEncoderLayer(_FusedBlock, InstructBlipEncoderLayer):
            """``InstructBlipEncoderLayer`` computed by :func:`prenorm_vit_block`."""

        _FUSED[InstructBlipEncoderLayer] = FusedInstructBlipEncoderLayer
    return _FUSED


def checkpointed_blocks(depth: int, checkpoint: CheckpointSpec) -> frozenset:
    """The indices of the blocks to checkpoint out of ``depth``: None / False / 0 none; True or "all" every block
    (LAVIS' ``use_grad_checkpoint``); an int k >= 1 every k-th block from the first (0, k, 2k, ...); an iterable
    the blocks it names (the last k, as BLIP's ``vit_ckpt_layer = k``: ``range(depth - k, depth)``)."""
    if checkpoint is None or checkpoint is False:
        return frozenset()
    if checkpoint is True or checkpoint == "all":
        return frozenset(range(depth))
    if isinstance(checkpoint, str):
        raise ValueError(f"checkpoint: the only string is 'all', got {checkpoint!r}")
    if isinstance(checkpoint, int):
        if checkpoint < 0:
            raise ValueError(f"checkpoint: every k-th block needs k >= 1 (0: none), got {checkpoint}")
        return frozenset(range(0, depth, checkpoint)) if checkpoint else frozenset()
    blocks = frozenset(checkpoint)
    bad = sorted(i for i in blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth)
    if bad:
        raise ValueError(f"checkpoint: block indices must be ints in [0, {depth}), got {bad[:5]}")
    return blocks


def _encoders(model: nn.Module) -> list:
    """The ``ModuleList``s of ViT layers in ``model`` (one per ViT it holds)."""
    classes = tuple(_fused_classes()) + tuple(_fused_classes().values())
    return [m.layers for m in model.modules()
            if isinstance(getattr(m, "layers", None), nn.ModuleList) and m.layers and isinstance(m.layers[0], classes)]


def set_vision_checkpointing(model: nn.Module, checkpoint: CheckpointSpec) -> nn.Module:
    """Mark the fused ViT blocks of ``model`` to checkpoint (see :func:`checkpointed_blocks`); returns ``model``."""
    encoders = _encoders(model)
    for layers in encoders:
        marked = checkpointed_blocks(len(layers), checkpoint)
        for i, layer in enumerate(layers):
            if not isinstance(layer, _FusedBlock):
                raise ValueError("set_vision_checkpointing: the ViT is not fused; call fuse_blip2_vision_model first")
            layer.blipfast_checkpoint = i in marked
    return model


def fuse_blip2_vision_model(model: nn.Module, *, checkpoint: CheckpointSpec = None) -> nn.Module:
    """Switch every BLIP-2 / InstructBLIP ViT layer of ``model`` (a ``Blip2VisionModel`` or any model holding one)
    to the fused block, in place, and mark the blocks to checkpoint; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_blip2_vision_model: expected an nn.Module, got {type(model).__name__}")
    classes = _fused_classes()
    found = False
    for m in model.modules():
        fused = classes.get(type(m))
        if fused is not None:
            m.__class__ = fused
            found = True
        found = found or isinstance(m, _FusedBlock)
    if not found:
        raise ValueError(f"fuse_blip2_vision_model: {type(model).__name__} holds no Blip2EncoderLayer")
    return set_vision_checkpointing(model, checkpoint)


def unfuse_blip2_vision_model(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_blip2_vision_model`; returns ``model``."""
    back = {v: k for k, v in _fused_classes().items()}
    for m in model.modules():
        if type(m) in back:
            m.__dict__.pop("blipfast_checkpoint", None)
            m.__class__ = back[type(m)]
    return model


# ----------------------------------------------------------------------------------------------
# position embeddings


def _grid(size) -> tuple:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(h, bool) or isinstance(w, bool) or not (isinstance(h, int) and isinstance(w, int)) or h < 1 or w < 1:
        raise ValueError(f"grid must be a positive int or (height, width), got {size!r}")
    return h, w


def interpolate_position_embedding(pos_embed: torch.Tensor, grid, *, extra_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` [1, extra_tokens + n * n, d] resized to a ``grid`` (int or (height, width)) of patches: the
    extra (CLS) positions kept, the n x n table interpolated bicubically (``align_corners=False``) in float32, as
    LAVIS' ``eva_vit.interpolate_pos_embed`` does; returned in float32. The same grid returns the table as it is."""
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, positions, d], got {getattr(pos_embed, 'shape', pos_embed)!r}")
    h, w = _grid(grid)
    n2 = pos_embed.shape[1] - extra_tokens
    n = math.isqrt(max(n2, 0))
    if n2 < 1 or n * n != n2:
        raise ValueError(f"pos_embed: {pos_embed.shape[1]} positions are not {extra_tokens} + a square grid")
    pos = pos_embed.float()
    if (n, n) == (h, w):
        return pos
    d = pos.shape[-1]
    tokens = pos[:, extra_tokens:].reshape(1, n, n, d).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat((pos[:, :extra_tokens], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def resize_position_embedding(vision_model: nn.Module, image_size: int) -> nn.Module:
    """Make a ``Blip2VisionModel`` (or InstructBLIP's) take ``image_size`` px images without
    ``interpolate_pos_encoding``: its position table is interpolated once (:func:`interpolate_position_embedding`)
    and becomes a new trainable Parameter, as LAVIS builds its 364-px ViT; the config follows. Returns the model."""
    emb = getattr(vision_model, "embeddings", None)
    if emb is None or not hasattr(emb, "position_embedding"):
        raise TypeError(f"resize_position_embedding: expected an HF BLIP-2 ViT, got {type(vision_model).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < emb.patch_size:
        raise ValueError(f"image_size must be an int >= the patch size {emb.patch_size}, got {image_size!r}")
    grid = image_size // emb.patch_size
    old = emb.position_embedding
    with torch.no_grad():
        new = interpolate_position_embedding(old.detach(), grid).to(old.dtype)
    emb.position_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
    emb.image_size = image_size
    emb.num_patches = grid * grid
    emb.num_positions = grid * grid + 1
    vision_model.config.image_size = image_size
    return vision_model


_POS_KEYS = ("embeddings.position_embedding", "pos_embed")


def interpolate_pos_embed_state_dict(state_dict: Mapping[str, torch.Tensor], image_size: int,
                                     patch_size: int = 14) -> dict:
    """A copy of ``state_dict`` whose ViT position tables (HF ``*embeddings.position_embedding``, LAVIS
    ``*pos_embed``) fit ``image_size`` px images of ``patch_size`` patches: what LAVIS does to the 224-px
    ``eva_vit_g.pth`` when it builds a 364-px ViT (tables of another size are interpolated, in float32, and stored
    in their own dtype)."""
    for name, v in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    grid = image_size // patch_size
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k.endswith(_POS_KEYS) and isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[1] != grid * grid + 1:
            out[k] = interpolate_position_embedding(v, grid).to(v.dtype)
    return out
