"""ITM hard-negative sampling without a host synchronisation (docs/semantics.md#itm-hard-negatives).

For local row b (global column ``rank * B + b`` is its own pair), one negative is drawn from the
softmax of the row's logits with the own pair excluded, or, with ``image_ids``, every column showing
the same image excluded:

    neg_image_index[b] ~ softmax(s_t2i[b, :])     (text b picks an image)
    neg_text_index[b]  ~ softmax(s_i2t[b, :])     (image b picks a text)

Exclusion is exact (probability 0); the references fill -10000 before the softmax, which differs from
this by exp(-10000)-sized terms. NaN and -inf logits never get drawn. A +inf logit takes all the mass: the
draw is then the first drawable +inf column, whatever the seed. A row with no drawable column (B * W = 1,
every other column excluded, or nothing but NaN and -inf) returns -1, and the ITM batch builder masks it out.

Sampling is Gumbel-max over Philox uniforms: u = (philox(seed, off) + 0.5) / 2**32 with
off = (direction * BW + rank * B + b) * BW + j, i.e. indexed by the GLOBAL row, so rank r's rows draw
exactly what rows [r * B, (r + 1) * B) of one process holding the whole batch draw under the same seed
(direction 0: neg_text from s_i2t, 1: neg_image from s_t2i), and
index = argmax_j(logit_j - log(-log u_j)) over the drawable columns, which is an exact draw from the
softmax. ``generator`` seeds it (a fresh seed is drawn from it on the device, no host sync); pass the
same ``seed`` on every rank to get the single-process draws.

``floor`` > 0 draws from p_j proportional to softmax_j + floor over the drawable columns instead: BLIP (v1)'s
ITM weights ``softmax(s[:, :B]) + 1e-4`` with the own pair set to 0. As there, the softmax runs over the
whole row, the excluded columns included (NaN columns left out), and only then are the excluded columns
removed. Same Philox stream, Gumbel-max over ``log(softmax + floor)`` (``logaddexp(s_j - lse, log floor)``,
with lse each row's log-sum-exp, computed once by :func:`row_log_norm` and handed to every implementation),
same exclusion rules: NaN and -inf logits are never drawn, a +inf logit still takes the draw. ``floor=0``
is the plain softmax draw, bit for bit as without the argument.
"""
from __future__ import annotations

import torch

import math

from . import _common as C
from ._dist import gather_no_grad, group_info
from .itc_loss import positive_mask
from ._philox import new_seed, philox_u32

_OP = "sample_hard_negatives"
_SUPPORTED = ("cuda", "torch")


def drawable_mask(b: int, bw: int, offset: int, image_ids=None, image_ids_all=None, device=None) -> torch.Tensor:
    """bool [B, BW]: columns that may be drawn as negatives, the complement of itc_loss's positive pairs
    (the own pair, or every column showing the same image)."""
    return ~positive_mask(b, bw, offset, image_ids, image_ids_all, device)


def gumbel_noise(seed: torch.Tensor, direction: int, b: int, bw: int, device, row_offset: int = 0) -> torch.Tensor:
    """float64 [B, BW] Gumbel(0, 1) noise of the Philox stream of one direction; local row b is global
    row ``row_offset + b`` (``rank * B``)."""
    rows = torch.arange(b, device=device, dtype=torch.int64).view(b, 1) + (direction * bw + row_offset)
    offs = rows * bw + torch.arange(bw, device=device, dtype=torch.int64).view(1, bw)
    u = (philox_u32(seed, offs).to(torch.float64) + 0.5) * (1.0 / 2**32)
    return -torch.log(-torch.log(u))


def row_log_norm(s_i2t: torch.Tensor, s_t2i: torch.Tensor) -> torch.Tensor:
    """float64 [2, B]: the log-sum-exp of every row of ``s_i2t`` (0) and ``s_t2i`` (1) over its non-NaN columns,
    excluded ones included: the normaliser of the softmax that a ``floor`` is added to."""
    x = torch.stack([s_i2t, s_t2i]).to(torch.float64)
    return torch.logsumexp(torch.where(torch.isnan(x), float("-inf"), x), dim=2)


def _draw(logits: torch.Tensor, drawable: torch.Tensor, noise: torch.Tensor, floor: float = 0.0,
          log_norm=None) -> torch.Tensor:
    logits = logits.to(torch.float64)
    ok = drawable & ~torch.isnan(logits) & (logits != float("-inf"))
    if floor > 0:  # log(softmax + floor) = logaddexp(s - lse, log floor); a +inf logit keeps key +inf
        lf = torch.tensor(math.log(floor), dtype=torch.float64, device=logits.device)
        z = logits - log_norm.unsqueeze(1)
        hi, lo = torch.maximum(z, lf), torch.minimum(z, lf)
        w = hi + torch.log1p(torch.exp(lo - hi))
        score = torch.where(logits == float("inf"), logits, w + noise)
    else:
        score = logits + noise
    key = torch.where(ok, score, torch.full_like(logits, float("-inf")))
    idx = key.argmax(dim=1)
    return torch.where(ok.any(dim=1), idx, torch.full_like(idx, -1))


def sample_hard_negatives_ref(s_i2t, s_t2i, drawable, seed, row_offset=0, floor=0.0, log_norm=None):
    """Reference draw for an explicit bool [B, BW] ``drawable`` mask: (neg_text_index, neg_image_index).
    ``row_offset`` (rank * B) is the global index of local row 0; ``floor`` as in the module doc (``log_norm``
    defaults to :func:`row_log_norm` of the logits)."""
    b, bw = s_i2t.shape
    if floor > 0 and log_norm is None:
        log_norm = row_log_norm(s_i2t, s_t2i)
    norms = (None, None) if floor <= 0 else (log_norm[0], log_norm[1])
    neg_text = _draw(s_i2t, drawable, gumbel_noise(seed, 0, b, bw, s_i2t.device, row_offset), floor, norms[0])
    neg_image = _draw(s_t2i, drawable, gumbel_noise(seed, 1, b, bw, s_i2t.device, row_offset), floor, norms[1])
    return neg_text, neg_image


@torch.library.custom_op("blipfast::sample_hard_negatives", mutates_args=())
def _sample(s_i2t: torch.Tensor, s_t2i: torch.Tensor, drawable: torch.Tensor, seed: torch.Tensor,
            row_offset: int, backend: str, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    with C.no_autocast(s_i2t.device):
        log_norm = row_log_norm(s_i2t, s_t2i) if floor > 0 else None
        if backend == "cuda":
            if floor > 0:
                return tuple(torch.ops.blipfast_C.sample_hard_negatives(s_i2t, s_t2i, drawable, seed, row_offset, floor,
                                                                        log_norm))
            return tuple(torch.ops.blipfast_C.sample_hard_negatives(s_i2t, s_t2i, drawable, seed, row_offset))
        return sample_hard_negatives_ref(s_i2t, s_t2i, drawable, seed, row_offset, floor, log_norm)


@_sample.register_fake
def _sample_fake(s_i2t, s_t2i, drawable, seed, row_offset, backend, floor=0.0):
    b = s_i2t.shape[0]
    return s_i2t.new_empty(b, dtype=torch.int64), s_i2t.new_empty(b, dtype=torch.int64)


def _check_logits(s_i2t, s_t2i):
    C.check_tensor(_OP, "s_i2t", s_i2t, ndim=2)
    if s_i2t.shape[0] == 0:
        raise ValueError(f"{_OP}: s_i2t must have at least one row, got shape {tuple(s_i2t.shape)}")
    C.check_tensor(_OP, "s_t2i", s_t2i, ndim=2, device=s_i2t.device)
    C.check_shape(_OP, "s_t2i", s_t2i, tuple(s_i2t.shape))
    C.check_same_dtype(_OP, s_i2t=s_i2t, s_t2i=s_t2i)


def _check_floor(floor) -> float:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor < float("inf"):
        raise ValueError(f"{_OP}: floor must be a finite float >= 0, got {floor!r}")
    return float(floor)


def _resolve_seed(seed, generator, dev):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
    seed = C.check_seed(_OP, seed, dev)
    return new_seed(dev, generator) if seed is None else seed


def sample_hard_negatives(s_i2t, s_t2i, *, image_ids=None, generator=None, process_group=None, seed=None,
                          backend=None, floor=0.0):
    """(neg_text_index [B], neg_image_index [B]): global int64 indices into the gathered batch, -1 where a
    row has nothing to draw. ``s_i2t``/``s_t2i`` are the [B, BW] temperature-scaled logits of itc_loss;
    ``image_ids`` [B] are this rank's image ids (gathered over ``process_group`` here). Pass the same
    ``seed`` on every rank (or ranks' generators in the same state) to reproduce a single process.
    ``floor``: draw from softmax + floor (BLIP v1: 1e-4; see the module doc)."""
    _check_logits(s_i2t, s_t2i)
    floor = _check_floor(floor)
    dev = s_i2t.device
    b, bw = s_i2t.shape
    rank, world = group_info(process_group)
    if bw != b * world:
        raise ValueError(f"{_OP}: s_i2t must be [B, B * world_size] = [{b}, {b * world}], got {[b, bw]}")
    if image_ids is not None:
        C.check_tensor(_OP, "image_ids", image_ids, dtypes=(torch.int64, torch.int32), device=dev)
        C.check_shape(_OP, "image_ids", image_ids, (b,))
    seed = _resolve_seed(seed, generator, dev)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, s_i2t.dtype)
    ids_all = gather_no_grad(image_ids, process_group) if image_ids is not None else None
    drawable = drawable_mask(b, bw, rank * b, image_ids, ids_all, dev)
    return _sample(s_i2t.detach().contiguous(), s_t2i.detach().contiguous(), drawable, seed, rank * b, backend,
                   floor=floor)


def sample_hard_negatives_from_gathered(s_i2t, s_t2i, *, rank=0, image_ids=None, image_ids_all=None, generator=None,
                                        seed=None, backend=None, floor=0.0):
    """sample_hard_negatives without communication: the local rows are global rows rank * B .. rank * B + B - 1
    of a [BW, BW] similarity matrix (``image_ids_all`` [BW] with ``image_ids``). Simulates any world size on
    one device (benchmarks, tests), or any local [B, B] block (BLIP v1 draws its negatives from the local batch).
    ``floor`` as in :func:`sample_hard_negatives`."""
    _check_logits(s_i2t, s_t2i)
    floor = _check_floor(floor)
    dev = s_i2t.device
    b, bw = s_i2t.shape
    C.check_gathered(_OP, rank, b, bw, image_ids, image_ids_all, dev)
    if image_ids is not None:
        C.check_tensor(_OP, "image_ids", image_ids, dtypes=(torch.int64, torch.int32), device=dev)
        C.check_shape(_OP, "image_ids", image_ids, (b,))
    seed = _resolve_seed(seed, generator, dev)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, s_i2t.dtype)
    drawable = drawable_mask(b, bw, rank * b, image_ids, image_ids_all, dev)
    return _sample(s_i2t.detach().contiguous(), s_t2i.detach().contiguous(), drawable, seed, rank * b, backend,
                   floor=floor)
