"""The repository's tolerance rule (docs/design.md#the-tolerance-rule), as numbers: a fast result in dtype ``t`` is
compared with the float64 reference ``ref64`` using PyTorch's own result in ``t``, ``torch_t``, as the yardstick:

    max |fast - ref64|  <=  factor * max |torch_t - ref64|  +  floor(t) * max |ref64|      (factor 2 for one op)

The floor is a few rounding units of ``t`` (machine epsilon) relative to the reference's magnitude, so a kernel
whose error is a fraction of the tensor's scale (half a gradient, a dropped mask) fails whatever that scale is; it
only matters where PyTorch's own error is a poor yardstick (a scalar, or an element PyTorch happens to get exactly).
fp16/bf16: one unit (their kernels compute in fp32 and round once, which PyTorch's own error contains). fp32/fp64:
32 units (3.8e-6 of the scale in fp32): reductions ordered differently from PyTorch's exceed twice its error by up
to 3 units on the CPU suite, and fp32 attention on a GPU multiplies in tf32x3 (about 4 units per product).

One rule, one place: ``blipfast selftest`` and the first-use check (docs/selftest.md) use :func:`torch_error`, and the
test suite's ``assert_within_torch_error`` (tests/helpers/tolerance.py) asserts on it.
"""
from __future__ import annotations

import math

import torch

FLOOR = {torch.float64: 32 * torch.finfo(torch.float64).eps, torch.float32: 32 * torch.finfo(torch.float32).eps,
         torch.float16: torch.finfo(torch.float16).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def scale_of(ref: torch.Tensor) -> float:
    """max |ref| (0 for an empty tensor)."""
    return float(ref.detach().abs().max()) if ref.numel() else 0.0


def floor(dtype: torch.dtype, ref: torch.Tensor, magnitude: float | None = None) -> float:
    """FLOOR[dtype] at the reference's magnitude max|ref| (or ``magnitude``); the smallest normal number of
    ``dtype`` (not a tolerance, only so that an all-zero reference accepts an all-zero result) when that is 0."""
    return FLOOR[dtype] * (scale_of(ref) if magnitude is None else magnitude) or torch.finfo(dtype).tiny


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b).abs().max()) if a.numel() else 0.0


def torch_error(fast: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype: torch.dtype | None = None,
                factor: float = 2.0, magnitude: float | None = None) -> tuple[float, float, float]:
    """(max|fast - ref64|, the bound ``factor * max|torch_lowp - ref64| + floor``, PyTorch's own error) of the rule.

    ``ref64`` is the float64 ground truth, ``torch_lowp`` PyTorch's own computation in the dtype under test (its
    error is the yardstick), ``dtype`` defaults to fast's dtype. ``magnitude`` replaces max|ref64| in the floor only
    for a quantity that comes out of cancelling terms and may be much smaller than they are (0 in exact
    arithmetic); pass the scale of those terms. A non-finite value of ``fast`` is an infinite error, a NaN in
    PyTorch's error a NaN bound (no result is within it: :func:`within`). Reads the tensors on the host: for
    checks and tests, never for a training step."""
    dtype = dtype or fast.dtype
    ref64 = ref64.detach().double()
    if fast.shape != ref64.shape or torch_lowp.shape != ref64.shape:
        raise ValueError(f"torch_error: shapes differ: fast {tuple(fast.shape)}, ref64 {tuple(ref64.shape)}, "
                         f"torch_lowp {tuple(torch_lowp.shape)}")
    err_fast = _max_abs_diff(fast, ref64)
    if fast.numel() and not bool(torch.isfinite(fast.detach()).all()):
        err_fast = math.inf
    err_torch = _max_abs_diff(torch_lowp, ref64)
    return err_fast, factor * err_torch + floor(dtype, ref64, magnitude), err_torch


def within(err: float, bound: float) -> bool:
    """The rule's verdict on :func:`torch_error`'s numbers: a finite error no larger than the bound."""
    return math.isfinite(err) and err <= bound


def rounding_units(err: float, err_torch: float, factor: float, dtype: torch.dtype, ref64: torch.Tensor,
                   magnitude: float | None = None) -> str:
    """How far ``err`` lies beyond ``factor`` x PyTorch's error, in rounding units of ``dtype`` at the reference's
    magnitude (for error messages)."""
    unit = torch.finfo(dtype).eps * (scale_of(ref64) if magnitude is None else magnitude)
    return f"{(err - factor * err_torch) / unit:.1f} units" if unit else "-"
