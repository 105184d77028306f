"""Argument checks shared by the pre-training models (``Blip2Stage1``, ``BlipPretrain``): a ValueError/TypeError
that names the model, the argument and what it got."""
from __future__ import annotations

import torch

_MASK_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _desc(t) -> str:
    return f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_text(who: str, input_ids, attention_mask, b: int, max_len: int, device, ref: str) -> None:
    """``input_ids`` int [B, T] with 1 <= T <= ``max_len``, ``attention_mask`` of its shape (bool, integer or
    float), both on ``device`` (the device of the argument named ``ref``)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != b \
            or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: input_ids must be an int64 tensor [B={b}, T], got {_desc(input_ids)}")
    t = input_ids.shape[1]
    if not 1 <= t <= max_len:
        raise ValueError(f"{who}: input_ids must have 1 <= T <= {max_len} tokens (max_position_embeddings), got {t}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{who}: attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {got}")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point() \
            and attention_mask.dtype not in _MASK_INTS:
        raise TypeError(f"{who}: attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if x.device != device:
            raise ValueError(f"{who}: {name} is on {x.device} but {ref} is on {device}")


def check_index(who: str, name: str, t, b: int, device, ref: str) -> torch.Tensor:
    """An int [B] index tensor on ``device`` (that of the argument named ``ref``), as int64."""
    if not isinstance(t, torch.Tensor) or t.shape != (b,) or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: {name} must be an int64 tensor [B={b}], got {_desc(t)}")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device} but {ref} is on {device}")
    return t.long()
