"""Process-group helpers of the ops (the model-level exchange lives in blipfast/distributed.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_info(process_group=None) -> tuple[int, int]:
    """(rank, world_size) in ``process_group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def gather_no_grad(t: torch.Tensor, process_group=None) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, without gradient (a detached copy on one rank)."""
    _, world = group_info(process_group)
    t = t.detach()
    if world == 1:
        return t
    out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=process_group)
    return out
