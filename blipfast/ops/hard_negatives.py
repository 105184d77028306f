"""ITM hard-negative sampling without a host synchronisation (SPEC.md section 3).

For local row b (global column ``rank * B + b`` is its own pair), one negative is drawn from the
softmax of the row's logits with the own pair excluded, or, with ``image_ids``, every column showing
the same image excluded:

    neg_image_index[b] ~ softmax(s_t2i[b, :])     (text b picks an image)
    neg_text_index[b]  ~ softmax(s_i2t[b, :])     (image b picks a text)

Exclusion is exact (probability 0); the references fill -10000 before the softmax, which differs from
this by exp(-10000)-sized terms. NaN and -inf logits never get drawn. A row with no drawable column
(B * W = 1, or every other column excluded) returns -1, and the ITM batch builder masks it out.

Sampling is Gumbel-max over Philox uniforms: u = (philox(seed, off) + 0.5) / 2**32 with
off = (direction * B + b) * BW + j (direction 0: neg_text from s_i2t, 1: neg_image from s_t2i), and
index = argmax_j(logit_j - log(-log u_j)) over the drawable columns, which is an exact draw from the
softmax. ``generator`` seeds it (a fresh seed is drawn from it on the device, no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as C
from ._dist import gather_no_grad, group_info
from ._philox import new_seed, philox_u32

_OP = "sample_hard_negatives"
_SUPPORTED = ("cuda", "torch")


def drawable_mask(b: int, bw: int, offset: int, image_ids=None, image_ids_all=None, device=None) -> torch.Tensor:
    """bool [B, BW]: columns that may be drawn as negatives (not the own pair / same image)."""
    if image_ids is not None:
        return image_ids.view(-1, 1) != image_ids_all.view(1, -1)
    cols = torch.arange(bw, device=device).view(1, bw)
    return cols != (torch.arange(b, device=device) + offset).view(b, 1)


def gumbel_noise(seed: torch.Tensor, direction: int, b: int, bw: int, device) -> torch.Tensor:
    """float64 [B, BW] Gumbel(0, 1) noise of the Philox stream of one direction."""
    offs = torch.arange(b * bw, device=device, dtype=torch.int64).view(b, bw) + direction * b * bw
    u = (philox_u32(seed, offs).to(torch.float64) + 0.5) * (1.0 / 2**32)
    return -torch.log(-torch.log(u))


def _draw(logits: torch.Tensor, drawable: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.float64)
    ok = drawable & ~torch.isnan(logits) & (logits != float("-inf"))
    key = torch.where(ok, logits + noise, torch.full_like(logits, float("-inf")))
    idx = key.argmax(dim=1)
    return torch.where(ok.any(dim=1), idx, torch.full_like(idx, -1))


def sample_hard_negatives_ref(s_i2t, s_t2i, drawable, seed):
    """Reference draw for an explicit bool [B, BW] ``drawable`` mask: (neg_text_index, neg_image_index)."""
    b, bw = s_i2t.shape
    neg_text = _draw(s_i2t, drawable, gumbel_noise(seed, 0, b, bw, s_i2t.device))
    neg_image = _draw(s_t2i, drawable, gumbel_noise(seed, 1, b, bw, s_i2t.device))
    return neg_text, neg_image


@torch.library.custom_op("blipfast::sample_hard_negatives", mutates_args=())
def _sample(s_i2t: torch.Tensor, s_t2i: torch.Tensor, drawable: torch.Tensor, seed: torch.Tensor,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        return tuple(torch.ops.blipfast_C.sample_hard_negatives(s_i2t, s_t2i, drawable, seed))
    return sample_hard_negatives_ref(s_i2t, s_t2i, drawable, seed)


@_sample.register_fake
def _sample_fake(s_i2t, s_t2i, drawable, seed, backend):
    b = s_i2t.shape[0]
    return s_i2t.new_empty(b, dtype=torch.int64), s_i2t.new_empty(b, dtype=torch.int64)


def sample_hard_negatives(s_i2t, s_t2i, *, image_ids=None, generator=None, process_group=None, seed=None,
                          backend=None):
    """(neg_text_index [B], neg_image_index [B]): global int64 indices into the gathered batch, -1 where a
    row has nothing to draw. ``s_i2t``/``s_t2i`` are the [B, BW] temperature-scaled logits of itc_loss;
    ``image_ids`` [B] are this rank's image ids (gathered over ``process_group`` here)."""
    C.check_tensor(_OP, "s_i2t", s_i2t, ndim=2)
    dev = s_i2t.device
    C.check_tensor(_OP, "s_t2i", s_t2i, ndim=2, device=dev)
    b, bw = s_i2t.shape
    C.check_shape(_OP, "s_t2i", s_t2i, (b, bw))
    rank, world = group_info(process_group)
    if bw != b * world:
        raise ValueError(f"{_OP}: s_i2t must be [B, B * world_size] = [{b}, {b * world}], got {[b, bw]}")
    if image_ids is not None:
        C.check_tensor(_OP, "image_ids", image_ids, dtypes=(torch.int64, torch.int32), device=dev)
        C.check_shape(_OP, "image_ids", image_ids, (b,))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
    seed = C.check_seed(_OP, seed, dev)
    if seed is None:
        seed = new_seed(dev, generator)
    backend = C.resolve_backend(_OP, backend, dev, _SUPPORTED, s_i2t.dtype)
    ids_all = gather_no_grad(image_ids, process_group) if image_ids is not None else None
    drawable = drawable_mask(b, bw, rank * b, image_ids, ids_all, dev)
    return _sample(s_i2t.detach().contiguous(), s_t2i.detach().contiguous(), drawable, seed, backend)
