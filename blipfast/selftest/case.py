"""What a self-test check is: a :class:`Case` (one op, backend, dtype and shape) whose run returns
:class:`Measure` s (one per output or gradient, or a mask, a distribution, a draw rule), and the :class:`Inputs`
it draws from (docs/selftest.md). The cases of each op live in a module of this package (``attention``, ``itc``,
``negatives``, ``layernorm``); ``runner`` collects and runs them.

Inputs come from a private ``torch.Generator`` seeded per case (the caller's RNG state is untouched, and a verdict
is reproducible) and are made on the CPU, then moved, so that every device draws the same numbers.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import torch

from .tolerance import torch_error, within

QUICK, FULL = "quick", "full"
LEVELS = (QUICK, FULL)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Measure:
    """One compared quantity: ``error`` against ``bound`` (passes when finite and <= bound); ``what`` says what
    the two numbers are when they are not the tolerance rule's (e.g. "mismatches", "chi-square p-value")."""

    name: str
    error: float
    bound: float
    what: str = "max |fast - ref64|"

    @property
    def ok(self) -> bool:
        return within(self.error, self.bound)

    @property
    def ratio(self) -> float:
        """error / bound (how much of the bound is used; > 1 fails)."""
        if self.ok and self.error == 0:
            return 0.0
        return self.error / self.bound if self.bound > 0 else float("inf")


def rule(name: str, fast: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype,
         factor: float = 2.0) -> Measure:
    """The tolerance rule's measure of ``fast`` (tolerance.torch_error)."""
    err, bound, _ = torch_error(fast, ref64, lowp, dtype, factor)
    return Measure(name, err, bound)


def equal_count(name: str, got: torch.Tensor, want: torch.Tensor) -> Measure:
    """Exact equality: the number of differing elements against a bound of 0."""
    if got.shape != want.shape:
        return Measure(f"{name} (shape {tuple(got.shape)} != {tuple(want.shape)})", float("inf"), 0.0, "mismatches")
    return Measure(name, float((got != want).sum()), 0.0, "mismatches")


@dataclasses.dataclass
class Case:
    """One check: ``run(device)`` -> measures. ``shape`` is the label shown in the table."""

    op: str
    backend: str
    dtype: torch.dtype
    shape: str
    run: Callable[["Inputs"], list]
    level: str = QUICK

    @property
    def key(self) -> tuple:
        """(op, backend, dtype): what a verdict is about (the dispatch disables a failing key)."""
        return (self.op, self.backend, self.dtype)


class Inputs:
    """Random inputs of one case on its device, from a generator seeded by the case's label."""

    def __init__(self, case: Case, device: torch.device):
        self.device = device
        label = f"{case.op}|{case.backend}|{case.dtype}|{case.shape}"
        self.gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(label.encode()))

    def randn(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, device="cpu") * scale).to(device=self.device, dtype=dtype)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device="cpu").to(self.device)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.gen, device="cpu").to(self.device)

    def seed(self) -> torch.Tensor:
        """An int64 [1] dropout / sampling seed."""
        return torch.randint(-(2**62), 2**62, (1,), generator=self.gen, dtype=torch.int64, device="cpu").to(
            self.device)
