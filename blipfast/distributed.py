"""Distributed pieces of BLIP-2 stage 1 (docs/semantics.md#stage-1-losses): gathers, the hard-negative exchange and the
index tensors of the ITM batch. Any torch.distributed backend (NCCL on GPUs, gloo on CPUs); without an
initialised process group everything works on one process.

Gathers
  ``gather_no_grad(t)``          [W*B, ...] constant copy (the ITC logits' features; ops/_dist.py).
  ``all_gather_with_grad(t)``    [W*B, ...] whose backward sums every rank's gradient of rank r's rows and
                                 hands it to rank r (LAVIS' ``all_gather_with_grad``).

Negative exchange
  ``fetch_rows(local, index)``   rows ``index`` (global, in [0, W*B), or -1) of the batch distributed as
                                 ``local`` [B, ...] on each rank; gradients go back to the owning rank.
  LAVIS all-gathers every rank's image embeddings with gradient (W*B x 257 x 1408) to pick B of them.
  Here each rank sends its B requests (W*B int64 in an all_gather), every owner packs the rows asked
  of it into a fixed-size [W, capacity] send buffer, and one ``all_to_all_single`` with equal splits
  delivers them; the backward is the mirror all_to_all followed by an index_add on the owner. Shapes
  are static and nothing is read back to the host, so the training step has no host sync.
  Exactness versus traffic: a requester may ask one owner for all n of its rows, so the exact static
  capacity is n (the default) and the exchange then moves W*n rows per rank, the all-gather's volume,
  but no gradient all-reduce of the whole gathered tensor and no [W*B, ...] gradient buffer. An integer
  ``capacity`` < n moves W*capacity rows; requests beyond it come back as zeros with ``valid`` false (the
  ITM weight drops them; with random batches the counts are ~Binomial(n, 1/W), so capacity = 2n/W + 8
  almost never overflows). ``capacity="auto"`` sizes the buffer to the largest count of this step at the
  price of one host sync (reading that count back), for bandwidth-bound multi-node runs.

ITM batch (3B sequences, docs/semantics.md#itm-hard-negatives; LAVIS order)
  texts  = [pos, pos, negative text of each image]     images = [pos, negative image of each text, pos]
  labels = [1]*B + [0]*2B. ``itm_batch_indices`` (one process, banks = the global batch) and
  ``exchange_itm_negatives`` (any world size, banks = [local rows; fetched negatives]) return index
  tensors: ``text_index`` into the text bank and ``kv_index`` into the image bank, to hand to
  ``ops.cross_attention(kv_index=...)`` so image K/V are computed once per image. ``weight`` is 0 for a
  row whose negative is -1 (nothing drawable: B*W = 1, or every other pair shows the same image) or
  overflowed the capacity; the models' ``itm_loss`` (blipfast/models/losses.py) is sum(weight * CE) /
  sum(weight), which is LAVIS' plain mean when every negative exists and uses the positives only when B*W = 1
  (there are no negatives then).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.distributed as dist

from .ops._dist import gather_no_grad, group_info

__all__ = [
    "ITMBatch",
    "ITMInputs",
    "all_gather_with_grad",
    "exchange_itm_negatives",
    "fetch_rows",
    "gather_no_grad",
    "group_info",
    "itm_batch_indices",
]


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # pragma: no cover - exotic groups
        return ""


# ----------------------------------------------------------------------------------------------
# gathers


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        rank, world = group_info(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, t.shape[0]
        out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if "nccl" in _backend_name(ctx.group):
            out = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # gloo (reduce_scatter is missing in some versions): all_reduce, keep the own slice
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            out = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].contiguous()
        return out, None


def all_gather_with_grad(t: torch.Tensor, process_group=None) -> torch.Tensor:
    """Concatenate ``t`` [B, ...] from every rank along dim 0; the backward sums all ranks' gradients of
    rank r's rows into rank r's ``t.grad`` (reduce-scatter). Identity on one process."""
    _, world = group_info(process_group)
    if world == 1:
        return t
    return _AllGatherWithGrad.apply(t, process_group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with equal splits along dim 0; its adjoint is the same exchange."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


# ----------------------------------------------------------------------------------------------
# negative exchange


def _slot_positions(owner: torch.Tensor, world: int) -> torch.Tensor:
    """For requests [..., n] with owner ranks (-1 = none): the position of each request among the same
    requester's earlier requests to the same owner (0, 1, 2, ...); -1 where the owner is -1. O(W * n)."""
    n = owner.shape[-1]
    key = torch.where(owner >= 0, owner, torch.full_like(owner, world))
    sorted_key, perm = torch.sort(key, dim=-1, stable=True)
    first = torch.searchsorted(sorted_key.contiguous(), sorted_key.contiguous(), side="left")
    pos_sorted = torch.arange(n, device=owner.device).expand_as(first) - first
    pos = torch.empty_like(pos_sorted).scatter_(-1, perm, pos_sorted)
    return torch.where(owner >= 0, pos, torch.full_like(pos, -1))


def fetch_rows(local: torch.Tensor, index: torch.Tensor, process_group=None, *,
               capacity: Union[int, str, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of the global batch whose rows ``rank*B .. rank*B+B-1`` are this rank's ``local``.

    local [B, ...] (same B on every rank), index long [n] of global rows in [0, W*B) or -1 (the same n on
    every rank). Returns (rows [n, ...], valid bool [n]); rows are zero where ``valid`` is false (index -1,
    or beyond ``capacity``). Differentiable in ``local`` when it is floating point: the gradient of a
    fetched row is summed into the owner's row. See the module doc for ``capacity`` (None: exact, n)."""
    if not isinstance(local, torch.Tensor) or local.dim() < 1:
        raise ValueError("fetch_rows: local must be a tensor with a leading batch dimension")
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError("fetch_rows: index must be a 1-D int64/int32 tensor")
    if index.device != local.device:
        raise ValueError(f"fetch_rows: index is on {index.device} but local is on {local.device}")
    rank, world = group_info(process_group)
    b, n = local.shape[0], index.shape[0]
    index = index.long()
    valid = index >= 0
    if world == 1:
        rows = local.index_select(0, index.clamp_min(0))
        return _zero_invalid(rows, valid), valid

    flat = local.reshape(b, -1)
    # 1. everybody's requests (tiny)
    req_all = torch.empty(world * n, dtype=torch.int64, device=index.device)
    dist.all_gather_into_tensor(req_all, index.contiguous(), group=process_group)
    req_all = req_all.view(world, n)
    owner_all = torch.where(req_all >= 0, torch.div(req_all, b, rounding_mode="floor"), torch.full_like(req_all, -1))
    pos_all = _slot_positions(owner_all, world)  # [W, n]
    if capacity is None:
        cap = n
    elif capacity == "auto":  # one host sync: the largest per-pair count (every rank sees the same req_all)
        cap = int((pos_all.max() + 1).clamp_min(1).item())
    elif isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 1:
        cap = min(int(capacity), n)
    else:
        raise ValueError(f"fetch_rows: capacity must be None, 'auto' or a positive int, got {capacity!r}")
    # 2. owner side: slot (s, p) of the send buffer holds the local row that requester s asked as its p-th
    #    request to this rank; one extra column catches everything that is not ours or overflows
    mine = (owner_all == rank) & (pos_all < cap)
    col = torch.where(mine, pos_all, torch.full_like(pos_all, cap))
    src = torch.full((world, cap + 1), -1, dtype=torch.int64, device=index.device)
    src.scatter_(1, col, torch.where(mine, req_all - rank * b, torch.full_like(req_all, -1)))
    src = src[:, :cap].reshape(-1)
    send = _zero_invalid(flat.index_select(0, src.clamp_min(0)), src >= 0)  # [W*cap, D]
    # 3. the exchange
    if send.is_floating_point() and send.requires_grad:
        recv = _AllToAll.apply(send, process_group)
    else:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=process_group)
    # 4. requester side: request i arrived as recv[owner, pos]
    owner, pos = owner_all[rank], pos_all[rank]
    valid = valid & (pos < cap)
    slot = torch.where(valid, owner * cap + pos, torch.zeros_like(pos))
    rows = _zero_invalid(recv.index_select(0, slot), valid)
    return rows.reshape((n,) + tuple(local.shape[1:])), valid


def _zero_invalid(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    mask = valid.view((-1,) + (1,) * (rows.dim() - 1))
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


# ----------------------------------------------------------------------------------------------
# ITM batch


@dataclasses.dataclass
class ITMBatch:
    """Index tensors of the 3B ITM sequences (LAVIS order: pos, text-with-negative-image, image-with-
    negative-text). ``text_index`` rows of the text bank, ``kv_index`` rows of the image bank (for
    ops.cross_attention), ``labels`` long (1 = match), ``weight`` float 0/1 (0: no negative)."""

    text_index: torch.Tensor
    kv_index: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor


@dataclasses.dataclass
class ITMInputs:
    """Banks and indices of the ITM batch on one rank: ``image_bank`` [2B, ...] = [local images; fetched
    negative images] (gradient reaches the owners), ``text_ids_bank`` / ``text_mask_bank`` [2B, T] =
    [local texts; fetched negative texts]; rows < B of each bank are the local pairs."""

    image_bank: torch.Tensor
    text_ids_bank: torch.Tensor
    text_mask_bank: Optional[torch.Tensor]
    batch: ITMBatch
    neg_image_valid: torch.Tensor
    neg_text_valid: torch.Tensor


def _check_negatives(neg_text_index, neg_image_index):
    for name, t in (("neg_text_index", neg_text_index), ("neg_image_index", neg_image_index)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ITM batch: {name} must be a 1-D int64/int32 tensor")
    if neg_text_index.shape != neg_image_index.shape or neg_text_index.device != neg_image_index.device:
        raise ValueError("ITM batch: neg_text_index and neg_image_index must have one shape and device")


def _assemble(pos_text, pos_image, neg_text, neg_image, text_ok, image_ok) -> ITMBatch:
    b = pos_text.shape[0]
    dev = pos_text.device
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=dev), torch.zeros(2 * b, dtype=torch.long, device=dev)])
    one = torch.ones(b, dtype=torch.float32, device=dev)
    return ITMBatch(
        text_index=torch.cat([pos_text, pos_text, torch.where(text_ok, neg_text, pos_text)]),
        kv_index=torch.cat([pos_image, torch.where(image_ok, neg_image, pos_image), pos_image]),
        labels=labels,
        weight=torch.cat([one, image_ok.float(), text_ok.float()]),
    )


def itm_batch_indices(neg_text_index: torch.Tensor, neg_image_index: torch.Tensor, *,
                      own_index: Optional[torch.Tensor] = None) -> ITMBatch:
    """Single-process ITM batch over banks that hold the whole (global) batch: the text and image banks
    are indexed by global row, ``own_index`` [B] are the rows of this process's pairs (default arange(B),
    i.e. this process holds the global batch). A negative of -1 becomes a weight-0 row that points at the
    own pair (any valid index would do: the weight drops it)."""
    _check_negatives(neg_text_index, neg_image_index)
    b = neg_text_index.shape[0]
    dev = neg_text_index.device
    own = torch.arange(b, device=dev) if own_index is None else own_index.long()
    if own.shape != (b,):
        raise ValueError(f"itm_batch_indices: own_index must be [{b}], got {list(own.shape)}")
    nt, ni = neg_text_index.long(), neg_image_index.long()
    return _assemble(own, own, nt, ni, nt >= 0, ni >= 0)


def exchange_itm_negatives(neg_text_index: torch.Tensor, neg_image_index: torch.Tensor, image_embeds: torch.Tensor,
                           text_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None, *, process_group=None,
                           capacity: Union[int, str, None] = None) -> ITMInputs:
    """Fetch the B negative images (``image_embeds`` [B, ...], or image K/V: any per-image tensor, with
    gradient back to the owner) and the B negative texts (``text_ids`` [B, T], ``text_mask`` [B, T], no
    gradient) named by the global indices of ``sample_hard_negatives``, and return the banks plus the
    ITM index tensors over them (rows >= B are the fetched ones). Works for any world size, 1 included."""
    _check_negatives(neg_text_index, neg_image_index)
    b = neg_text_index.shape[0]
    if image_embeds.shape[0] != b or text_ids.shape[0] != b:
        raise ValueError(f"exchange_itm_negatives: image_embeds and text_ids must have B = {b} rows")
    neg_images, image_ok = fetch_rows(image_embeds, neg_image_index, process_group, capacity=capacity)
    if text_mask is not None:
        if text_mask.shape != text_ids.shape:
            raise ValueError("exchange_itm_negatives: text_mask must have the shape of text_ids")
        packed = torch.cat([text_ids.long(), text_mask.long()], dim=1)
    else:
        packed = text_ids.long()
    neg_packed, text_ok = fetch_rows(packed, neg_text_index, process_group, capacity=capacity)
    t = text_ids.shape[1]
    ids_bank = torch.cat([text_ids, neg_packed[:, :t].to(text_ids.dtype)])
    mask_bank = torch.cat([text_mask, neg_packed[:, t:].to(text_mask.dtype)]) if text_mask is not None else None
    own = torch.arange(b, device=neg_text_index.device)
    batch = _assemble(own, own, own + b, own + b, text_ok, image_ok)
    return ITMInputs(image_bank=torch.cat([image_embeds, neg_images]), text_ids_bank=ids_bank, text_mask_bank=mask_bank,
                     batch=batch, neg_image_valid=image_ok, neg_text_valid=text_ok)
