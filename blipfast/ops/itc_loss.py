"""In-batch image-text contrastive loss of BLIP-2 stage 1 (docs/semantics.md#itc).

image_feats [B, Q, E] and text_feats [B, E] are already normalised; temp is a 0-d tensor (learnable).
Both are gathered over the process group without gradient (img_all [BW, Q, E], txt_all [BW, E]) and

    s_i2t[b, j] = max_q <img[b, q], txt_all[j]> / temp      s_t2i[b, j] = max_q <txt[b], img_all[j, q]> / temp

loss = (CE(s_i2t, targets) + CE(s_t2i, targets)) / 2 with soft targets
(1 - label_smoothing) * pos / pos.sum(1) + label_smoothing / BW, where pos[b, j] is j == rank * B + b,
or, with image_ids, "j shows the same image as b". Gradients reach only the local rows and temp; the
max routes its gradient to the arg-max query. A single process needs no torch.distributed, and always
treats the gathered copies as constants (LAVIS does not when it runs without torch.distributed), so one
process holding the global batch gets the same loss and gradients as W processes under DDP.
"""
from __future__ import annotations

import torch

from ..kernels._constants import argmax_dtype
from . import _common as C
from ._dist import gather_no_grad, group_info

_OP = "itc_loss"
_SUPPORTED = ("triton", "torch")


def positive_mask(b: int, bw: int, offset: int, image_ids=None, image_ids_all=None, device=None) -> torch.Tensor:
    """bool [B, BW]: the positive pairs (the own pair, or every pair showing the same image)."""
    if image_ids is not None:
        return image_ids.view(-1, 1) == image_ids_all.view(1, -1)
    cols = torch.arange(bw, device=device).view(1, bw)
    return cols == (torch.arange(b, device=device) + offset).view(b, 1)


def _targets(pos: torch.Tensor, label_smoothing: float, dtype) -> torch.Tensor:
    pos = pos.to(dtype)
    return (1.0 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / pos.shape[1]


def _similarities(img, txt, img_all, txt_all, temp):
    acc = C.acc_dtype(img)
    s_i2t, a_i2t = torch.einsum("bqe,je->bjq", img.to(acc), txt_all.to(acc)).max(dim=-1)
    s_t2i, a_t2i = torch.einsum("be,jqe->bjq", txt.to(acc), img_all.to(acc)).max(dim=-1)
    t = temp.to(acc)
    return s_i2t / t, s_t2i / t, a_i2t, a_t2i


def itc_loss_ref(image_feats, text_feats, temp, *, label_smoothing=0.1, image_ids=None, process_group=None,
                 return_logits=False):
    """Pure-PyTorch reference (materialises [B, BW, Q]); differentiable in the local features and temp."""
    rank, _ = group_info(process_group)
    img_all = gather_no_grad(image_feats, process_group)
    txt_all = gather_no_grad(text_feats, process_group)
    ids_all = gather_no_grad(image_ids, process_group) if image_ids is not None else None
    b, bw = image_feats.shape[0], img_all.shape[0]
    s_i2t, s_t2i, _, _ = _similarities(image_feats, text_feats, img_all, txt_all, temp)
    tgt = _targets(positive_mask(b, bw, rank * b, image_ids, ids_all, image_feats.device), label_smoothing,
                   s_i2t.dtype)
    loss_i2t = -(torch.log_softmax(s_i2t, dim=1) * tgt).sum(dim=1).mean()
    loss_t2i = -(torch.log_softmax(s_t2i, dim=1) * tgt).sum(dim=1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    return (loss, s_i2t, s_t2i) if return_logits else loss


# ----------------------------------------------------------------------------------------------
# custom ops over already-gathered features


@torch.library.custom_op("blipfast::itc_loss_fwd", mutates_args=())
def _fwd(img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor, txt_all: torch.Tensor, temp: torch.Tensor,
         pos: torch.Tensor, label_smoothing: float, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, s_i2t, s_t2i, argmax_i2t, argmax_t2i, row_stats, dloss_dtemp); pos is the bool [B, BW]
    positive mask; row_stats [5, B] = (R_i2t, R_t2i, log l_i2t, log l_t2i, positives per row) with the rows'
    log-sum-exp = R + log l (R the row max) and
    dloss_dtemp (0-d) are saved for the backward."""
    with C.no_autocast(img.device):
        if backend == "triton":
            from ..kernels import itc as kern

            return kern.itc_loss_fwd(img, txt, img_all, txt_all, temp, pos, label_smoothing)
        s_i2t, s_t2i, a_i2t, a_t2i = _similarities(img, txt, img_all, txt_all, temp)
        tgt = _targets(pos, label_smoothing, s_i2t.dtype)
        # per element first, then sums: lse - sum(tgt * s) would cancel two sums of size ~1/temp (4 bits lost in fp32);
        # a row with +inf or nothing but -inf has a NaN log-softmax, hence a NaN loss and gradient, as the reference
        logp = torch.stack([torch.log_softmax(s_i2t, 1), torch.log_softmax(s_t2i, 1)])  # [2, B, BW]
        s = torch.stack([s_i2t, s_t2i])
        b = img.shape[0]
        loss = -(tgt * logp).sum() / (2 * b)
        dloss_dtemp = -((torch.exp(logp) - tgt) * s).sum() / (2 * b) / temp.to(s_i2t.dtype)
        # row statistics in the kernels' layout (R, log l with lse = R + log l): the torch backward reads only npos
        big_r = torch.nan_to_num(s.amax(2), nan=0.0, posinf=0.0, neginf=0.0)
        log_l = torch.logsumexp(s - big_r.unsqueeze(2), 2)
        stats = torch.cat([big_r, log_l, pos.sum(1, dtype=s_i2t.dtype).unsqueeze(0)])
        q = img.shape[1]
        return (loss, s_i2t, s_t2i, a_i2t.to(argmax_dtype(q)), a_t2i.to(argmax_dtype(q)), stats,
                dloss_dtemp.reshape(()))


@_fwd.register_fake
def _fwd_fake(img, txt, img_all, txt_all, temp, pos, label_smoothing, backend):
    b, q, bw = img.shape[0], img.shape[1], img_all.shape[0]
    acc = C.acc_dtype(img)
    return (img.new_empty((), dtype=acc), img.new_empty((b, bw), dtype=acc), img.new_empty((b, bw), dtype=acc),
            img.new_empty((b, bw), dtype=argmax_dtype(q)), img.new_empty((b, bw), dtype=argmax_dtype(q)),
            img.new_empty((5, b), dtype=acc), img.new_empty((), dtype=acc))


@torch.library.custom_op("blipfast::itc_loss_bwd", mutates_args=())
def _bwd(grad_loss: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor, txt_all: torch.Tensor,
         temp: torch.Tensor, pos: torch.Tensor, s_i2t: torch.Tensor, s_t2i: torch.Tensor, a_i2t: torch.Tensor,
         a_t2i: torch.Tensor, row_stats: torch.Tensor, dloss_dtemp: torch.Tensor, label_smoothing: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d image_feats, d text_feats, d temp)."""
    with C.no_autocast(img.device):
        if backend == "triton":
            from ..kernels import itc as kern

            return kern.itc_loss_bwd(grad_loss, img, txt, img_all, txt_all, temp, pos, s_i2t, s_t2i, a_i2t, a_t2i,
                                     row_stats, dloss_dtemp, label_smoothing)
        acc = s_i2t.dtype
        b, q, e = img.shape
        tgt = _targets(pos, label_smoothing, acc)
        g = grad_loss.to(acc) / (2 * b)
        ds_i2t = (torch.softmax(s_i2t, 1) - tgt) * g  # d loss / d s (softmax of the saved logits: exact rounding)
        ds_t2i = (torch.softmax(s_t2i, 1) - tgt) * g
        t = temp.to(acc)
        dtemp = grad_loss.to(acc) * dloss_dtemp
        # s_i2t[b, j] = <img[b, a_i2t[b, j]], txt_all[j]> / t: scatter over the arg-max query
        w = torch.zeros(b, q, ds_i2t.shape[1], dtype=acc, device=img.device)
        w.scatter_(1, a_i2t.long().unsqueeze(1), (ds_i2t / t).unsqueeze(1))
        dimg = torch.einsum("bqj,je->bqe", w, txt_all.to(acc))
        # s_t2i[b, j] = <txt[b], img_all[j, a_t2i[b, j]]> / t: the same scatter, then a product with every query
        # (as autograd of the reference: 0 times an infinite query that was not the arg-max is NaN there too)
        w2 = torch.zeros(b, ds_t2i.shape[1], q, dtype=acc, device=img.device)
        w2.scatter_(2, a_t2i.long().unsqueeze(2), (ds_t2i / t).unsqueeze(2))
        dtxt = torch.einsum("bjq,jqe->be", w2, img_all.to(acc))
        return dimg.to(img.dtype), dtxt.to(txt.dtype), dtemp.to(temp.dtype).reshape(temp.shape)


@_bwd.register_fake
def _bwd_fake(grad_loss, img, txt, img_all, txt_all, temp, pos, s_i2t, s_t2i, a_i2t, a_t2i, row_stats, dloss_dtemp,
              label_smoothing, backend):
    return img.new_empty(img.shape), txt.new_empty(txt.shape), temp.new_empty(temp.shape)


def _setup_context(ctx, inputs, output):
    img, txt, img_all, txt_all, temp, pos, label_smoothing, backend = inputs
    _, s_i2t, s_t2i, a_i2t, a_t2i, stats, dloss_dtemp = output
    ctx.save_for_backward(img, txt, img_all, txt_all, temp, pos, s_i2t, s_t2i, a_i2t, a_t2i, stats, dloss_dtemp)
    ctx.set_materialize_grads(False)  # only the loss is differentiated: no zero-filled logits gradients
    ctx.args = (label_smoothing, backend)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 8
    dimg, dtxt, dtemp = _bwd(grad_loss, *ctx.saved_tensors, *ctx.args)
    return dimg, dtxt, None, None, dtemp, None, None, None


torch.library.register_autograd("blipfast::itc_loss_fwd", _backward, setup_context=_setup_context)


def _check_common(image_feats, text_feats, temp, label_smoothing, image_ids):
    C.check_tensor(_OP, "image_feats", image_feats, ndim=3)
    dev = image_feats.device
    C.check_tensor(_OP, "text_feats", text_feats, ndim=2, device=dev)
    C.check_same_dtype(_OP, image_feats=image_feats, text_feats=text_feats)
    b, q, e = image_feats.shape
    C.check_shape(_OP, "text_feats", text_feats, (b, e))
    if b == 0 or q == 0 or e == 0:
        raise ValueError(f"{_OP}: image_feats must be non-empty, got shape {tuple(image_feats.shape)}")
    C.check_tensor(_OP, "temp", temp, device=dev)
    if temp.numel() != 1 or temp.dim() > 1:
        raise ValueError(f"{_OP}: temp must be a 0-d tensor (or have one element), got shape {tuple(temp.shape)}")
    C.check_positive_finite_scalar(_OP, "temp", temp)
    label_smoothing = C.check_unit_interval(_OP, "label_smoothing", label_smoothing)
    if image_ids is not None:
        C.check_tensor(_OP, "image_ids", image_ids, dtypes=(torch.int64, torch.int32), device=dev)
        C.check_shape(_OP, "image_ids", image_ids, (b,))
    return label_smoothing


def itc_loss(image_feats, text_feats, temp, *, label_smoothing=0.1, image_ids=None, process_group=None,
             return_logits=False, backend=None):
    """Scalar ITC loss (see module doc); with ``return_logits`` also (s_i2t, s_t2i), each [B, BW] fp32."""
    label_smoothing = _check_common(image_feats, text_feats, temp, label_smoothing, image_ids)
    dev = image_feats.device
    b = image_feats.shape[0]
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, image_feats.dtype)
    rank, _ = group_info(process_group)
    img_all = gather_no_grad(image_feats, process_group)
    txt_all = gather_no_grad(text_feats, process_group)
    ids_all = gather_no_grad(image_ids, process_group) if image_ids is not None else None
    pos = positive_mask(b, img_all.shape[0], rank * b, image_ids, ids_all, dev)
    out = _fwd(image_feats.contiguous(), text_feats.contiguous(), img_all.contiguous(), txt_all.contiguous(),
               temp.reshape(()), pos, label_smoothing, backend)
    return (out[0], out[1], out[2]) if return_logits else out[0]


def itc_loss_from_gathered(image_feats, text_feats, image_feats_all, text_feats_all, temp, *, rank=0,
                           label_smoothing=0.1, image_ids=None, image_ids_all=None, return_logits=False,
                           backend=None):
    """itc_loss over features that the caller already gathered (no communication here).

    ``image_feats_all`` [BW, Q, E] and ``text_feats_all`` [BW, E] are constants (no gradient flows into
    them); the local rows are rows ``rank * B .. rank * B + B - 1`` of them, which only matters for the
    default positives (with ``image_ids`` pass ``image_ids_all`` [BW] too). Used by the benchmarks to
    simulate a large world on one GPU and by callers that gather once for several losses."""
    label_smoothing = _check_common(image_feats, text_feats, temp, label_smoothing, image_ids)
    dev = image_feats.device
    b, q, e = image_feats.shape
    C.check_tensor(_OP, "image_feats_all", image_feats_all, ndim=3, device=dev)
    C.check_tensor(_OP, "text_feats_all", text_feats_all, ndim=2, device=dev)
    C.check_same_dtype(_OP, image_feats=image_feats, image_feats_all=image_feats_all, text_feats_all=text_feats_all)
    bw = image_feats_all.shape[0]
    C.check_shape(_OP, "image_feats_all", image_feats_all, (bw, q, e))
    C.check_shape(_OP, "text_feats_all", text_feats_all, (bw, e))
    C.check_gathered(_OP, rank, b, bw, image_ids, image_ids_all, dev)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, image_feats.dtype)
    pos = positive_mask(b, bw, rank * b, image_ids, image_ids_all, dev)
    out = _fwd(image_feats.contiguous(), text_feats.contiguous(), image_feats_all.detach().contiguous(),
               text_feats_all.detach().contiguous(), temp.reshape(()), pos, label_smoothing, backend)
    return (out[0], out[1], out[2]) if return_logits else out[0]
