"""Philox4x32-10 counter-based random numbers in plain PyTorch.

One definition of "random" shared by every backend: the CUDA kernels (csrc/philox.cuh), the Triton
kernels (``tl.randint``) and the references below all draw ``philox(seed, offset)`` with
``counter = (offset_lo, offset_hi, 0, 0)`` and ``key = (seed_lo, seed_hi)`` and keep the first 32-bit
word. Dropout keeps an element iff ``(word >> 8) >= round(p * 2**24)``, so a reference given the same
seed reproduces a kernel's dropout mask bit for bit, and a backward pass regenerates its forward mask.

All arithmetic is on int64 tensors holding values in [0, 2**32), so it runs on any device without a
host synchronisation.
"""
from __future__ import annotations

import math

import torch

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


def philox_u32(seed: torch.Tensor, offset: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """First 32-bit output of Philox4x32 for each ``offset`` (int64 tensor) under ``seed``.

    ``seed`` is an int or an int64 tensor with one element (on any device); returns int64 values in [0, 2**32).
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    seed = seed.reshape(()).to(device=offset.device, dtype=torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    offset = offset.to(torch.int64)
    c0 = offset & _M32
    c1 = (offset >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """24-bit threshold: an element is dropped iff ``philox >> 8 < dropout_threshold(p)``."""
    return int(math.floor(float(p) * (1 << 24) + 0.5))  # round half up, as csrc/philox.cuh


def dropout_keep_mask(seed: torch.Tensor, offset: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask of the blipfast dropout rule for each ``offset``."""
    return (philox_u32(seed, offset) >> 8) >= dropout_threshold(p)


def new_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 seed drawn on ``device`` from torch's RNG (no host sync, CUDA-graph safe)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)
