"""Rules shared by the kernels and the ops, kept here so that blipfast.kernels imports nothing from
blipfast (the house flows one way: ops -> kernels). Triton-free: the ops import it on every backend.
"""
from __future__ import annotations

import math

import torch


def dropout_threshold(p: float) -> int:
    """24-bit threshold of the Philox dropout rule (blipfast/ops/_philox.py): an element is dropped iff
    ``word >> 8 < dropout_threshold(p)``; p * 2**24 rounded half up, as csrc/philox.cuh."""
    return int(math.floor(float(p) * (1 << 24) + 0.5))


def argmax_dtype(q: int) -> torch.dtype:
    """dtype of the ITC loss's saved arg-max query index: uint8 while Q <= 256, else int32 (the Triton
    kernels of kernels/itc.py store it, the reference and the fake of blipfast/ops/itc_loss.py match)."""
    return torch.uint8 if q <= 256 else torch.int32
