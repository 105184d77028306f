"""Philox4x32-10 counter-based random numbers in plain PyTorch.

One definition of "random" shared by every backend: the CUDA kernels (csrc/philox.cuh), the Triton
kernels (``tl.randint4x`` / ``tl.randint``) and the references below all evaluate
``philox4x32_10(counter = (c_lo, c_hi, 0, 0), key = (seed_lo, seed_hi))`` of a 64-bit counter and a 64-bit
seed (two's-complement bit patterns), which returns four 32-bit words.

Dropout (every dropout site: the LayerNorm epilogue, attention probabilities) uses all four words of each
call. A site has a logical 2-D view [rows, cols] (LayerNorm epilogue: [R, N]; attention: rows =
(b * H + h) * Lq + i, cols = j in [0, Lk)). With ``G4 = ceil(cols / 4)`` groups per row, element
(row, col) uses word ``col % 4`` of the call with counter ``row * G4 + col // 4`` and is kept iff
``(word >> 8) >= round_half_up(p * 2**24)``. Groups never straddle rows, so a kernel tile whose first
column is a multiple of 4 needs one Philox call per 4 elements, and a reference given the same seed
reproduces a kernel's dropout mask bit for bit (a backward pass regenerates its forward mask).

The hard-negative sampler (ops/hard_negatives.py) draws one uniform per element from the first word only
(``philox_u32``).

All arithmetic is on int64 tensors holding values in [0, 2**32), so it runs on any device without a
host synchronisation.
"""
from __future__ import annotations

import torch

from ..kernels._constants import dropout_threshold  # noqa: F401  (re-exported: one rule for kernels and ops)

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xffffffff for a 32-bit constant a and a tensor of 32-bit b."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    t_hi = a * b_hi  # < 2**48
    t_lo = a * b_lo  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _M32
    return hi, lo


def _seed_key(seed, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    return seed & _M32, (seed >> 32) & _M32


def _rounds(c0, c1, c2, c3, k0, k1, n_rounds: int):
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4_u32(seed, counter: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """The four 32-bit words of Philox4x32 for each 64-bit ``counter`` (int64 tensor) under ``seed``:
    int64 [*counter.shape, 4] with values in [0, 2**32), word w at ``[..., w]``.

    The counter is ``(counter_lo, counter_hi, 0, 0)`` and the key ``(seed_lo, seed_hi)``: bit-identical to
    Triton's ``tl.randint4x(seed, counter)`` and to ``philox4_u32`` of csrc/philox.cuh. ``seed`` is an int or
    an int64 tensor with one element (on any device).
    """
    counter = counter.to(torch.int64)
    k0, k1 = _seed_key(seed, counter.device)
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    return torch.stack(_rounds(c0, c1, c2, c2, k0, k1, n_rounds), dim=-1)


def philox_u32(seed, offset: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """First 32-bit output word of Philox4x32 for each ``offset`` (int64 tensor) under ``seed``
    (``philox4_u32(seed, offset)[..., 0]``; Triton's ``tl.randint``). Used per element by the hard-negative
    sampler; dropout uses all four words (``dropout_keep_mask_2d``).

    ``seed`` is an int or an int64 tensor with one element (on any device); returns int64 values in [0, 2**32).
    """
    offset = offset.to(torch.int64)
    k0, k1 = _seed_key(seed, offset.device)
    c0 = offset & _M32
    c1 = (offset >> 32) & _M32
    c2 = torch.zeros_like(c0)
    return _rounds(c0, c1, c2, c2, k0, k1, n_rounds)[0]


def dropout_words_2d(seed, rows: int, cols: int, device) -> torch.Tensor:
    """int64 [rows, cols]: the Philox word that the dropout rule assigns to element (r, c) of a
    site whose logical view has ``cols`` columns: word ``c % 4`` of counter ``row * ceil(cols / 4) + c // 4``."""
    g4 = (cols + 3) // 4
    counters = torch.arange(rows * g4, device=device, dtype=torch.int64)
    words = philox4_u32(seed, counters)  # [rows * G4, 4]
    return words.view(rows, g4 * 4)[:, :cols]


def dropout_keep_mask_2d(seed, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """Boolean keep-mask [rows, cols] of the blipfast dropout rule (module docstring) for a site whose
    logical 2-D view is [rows, cols]."""
    return (dropout_words_2d(seed, rows, cols, device) >> 8) >= dropout_threshold(p)


def new_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 seed drawn on ``device`` from torch's RNG (no host sync, CUDA-graph safe)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)
