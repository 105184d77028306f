"""Timing core shared by ``blipfast bench`` and the pytest-benchmark suites.

GPU timing: CUDA events around each call after warm-up, the median of many runs, synchronising inside
the timed region; CPU timing: perf_counter. Every case reports ms, the derived throughput from an
explicit FLOP or byte formula, peak memory, and its ratio against the case's baseline in the same run.

Errors: a case that raises is a failure (``Result.failed``; ``blipfast bench`` exits non-zero, the pytest
harness fails), except a baseline marked ``optional`` with the reason it may be unable to run here (an
optional library, a torch or device that lacks a feature): that one reports n/a. blipfast's own cases
can never be optional.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch
from tqdm import tqdm


@dataclasses.dataclass
class Case:
    """One timed function: ``fn()`` runs it once; ``group`` ties a candidate to its baselines."""

    group: str
    name: str
    fn: Callable[[], object]
    flops: Optional[float] = None  # floating-point operations per call
    bytes: Optional[float] = None  # bytes that must move per call (the memory-bandwidth floor)
    baseline: bool = False
    params: dict = dataclasses.field(default_factory=dict)
    # a baseline that may be unable to run here, and why (e.g. "FlexAttention needs torch.compile on this
    # device"): when it raises it reports n/a instead of failing the run. None: any error is a failure.
    optional: Optional[str] = None
    # why the case cannot run here, known before it runs (e.g. no Java runtime for the caption scorer): reported
    # as skipped, never called, never a failure
    skip: Optional[str] = None
    # at most this many warm-up / timed calls (a case of seconds per call: a few suffice); None: the run's
    max_warmup: Optional[int] = None
    max_iters: Optional[int] = None
    measure_memory: bool = True  # False: no extra call for the peak GPU memory (host-side work)

    def __post_init__(self):
        if self.optional is not None and not self.baseline:
            raise ValueError(f"case {self.group!r} / {self.name!r}: only a baseline can be optional; an error in "
                             f"blipfast's own case is always a failure")


@dataclasses.dataclass
class Result:
    group: str
    name: str
    ms: Optional[float]
    ms_all: list
    tflops: Optional[float]
    tbps: Optional[float]
    peak_mem_mb: Optional[float]
    baseline: bool
    params: dict
    error: Optional[str] = None
    speedup_vs_best_baseline: Optional[float] = None
    failed: bool = False  # raised and was not an optional baseline: the run fails
    traceback: Optional[str] = None  # of a failure


def describe_error(exc: BaseException) -> str:
    """'ValueError: first line of the message' (at most 200 characters of it)."""
    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def failure(group: str, name: str, exc: BaseException) -> Result:
    """The Result of something in blipfast that raised outside a timed case (e.g. building a suite's cases);
    call it inside the ``except`` block (it records the traceback)."""
    return Result(group=group, name=name, ms=None, ms_all=[], tflops=None, tbps=None, peak_mem_mb=None,
                  baseline=False, params={}, error=describe_error(exc), failed=True, traceback=traceback.format_exc())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 5, iters: int = 30) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_cases(cases: list[Case], device: torch.device, warmup: int = 5, iters: int = 30,
              progress: Optional[str] = None) -> list[Result]:
    """Time every case; one that raises becomes a Result with ``error`` (n/a for an optional baseline,
    ``failed`` otherwise) and the others still run. ``progress``: the label of a tqdm bar on stderr."""
    results = []
    bar = tqdm(cases, desc=progress, unit="case", file=sys.stderr, disable=progress is None, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.group} / {case.name}"[-70:], refresh=True)
        times, mem, ms, err, tb = [], None, None, None, None
        if case.skip is not None:
            results.append(Result(group=case.group, name=case.name, ms=None, ms_all=[], tflops=None, tbps=None,
                                  peak_mem_mb=None, baseline=case.baseline, params=case.params,
                                  error=f"skipped: {case.skip}"))
            continue
        try:
            times = time_fn(case.fn, device, min(warmup, _cap(case.max_warmup, warmup)),
                            max(1, min(iters, _cap(case.max_iters, iters))))
            mem = peak_memory_mb(case.fn, device) if case.measure_memory else None
            ms = statistics.median(times)
        except Exception as exc:  # noqa: BLE001 - recorded; a failure unless the case is an optional baseline
            times, err = [], describe_error(exc)
            if case.optional is None:
                tb = traceback.format_exc()
        results.append(Result(
            group=case.group, name=case.name, ms=ms, ms_all=times,
            tflops=(case.flops / (ms * 1e-3) / 1e12) if (case.flops and ms) else None,
            tbps=(case.bytes / (ms * 1e-3) / 1e12) if (case.bytes and ms) else None,
            peak_mem_mb=mem, baseline=case.baseline, params=case.params,
            error=err if (err is None or tb is not None) else f"{case.optional} ({err})",
            failed=tb is not None, traceback=tb))
    bar.close()
    _ratios(results)
    return results


def _cap(limit: Optional[int], default: int) -> int:
    return default if limit is None else limit


def _ratios(results: list[Result]) -> None:
    """speedup of each non-baseline case = fastest baseline ms of its group / its ms."""
    best = {}
    for r in results:
        if r.baseline and r.ms is not None:
            best[r.group] = min(best.get(r.group, float("inf")), r.ms)
    for r in results:
        if not r.baseline and r.ms is not None and r.group in best:
            r.speedup_vs_best_baseline = best[r.group] / r.ms


def format_table(results: list[Result]) -> str:
    head = f"{'group':<44} {'impl':<26} {'ms':>9} {'TFLOP/s':>8} {'TB/s':>6} {'peak MB':>9} {'vs best base':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        def f(x, fmt):
            return format(x, fmt) if x is not None else "n/a"
        ratio = f"{r.speedup_vs_best_baseline:.2f}x" if r.speedup_vs_best_baseline else ("base" if r.baseline else "")
        lines.append(f"{r.group[:44]:<44} {r.name[:26]:<26} {f(r.ms, '9.3f'):>9} {f(r.tflops, '8.1f'):>8} "
                     f"{f(r.tbps, '6.2f'):>6} {f(r.peak_mem_mb, '9.1f'):>9} {ratio:>12}")
        if r.error:
            lines.append(f"{'':<44}   {'FAILED' if r.failed else 'n/a'}: {r.error}")
    return "\n".join(lines)


def write_json(results: list[Result], device: torch.device, out_dir: str, extra: Optional[dict] = None) -> str:
    from .._ext import build_info

    os.makedirs(out_dir, exist_ok=True)
    dev = device_name(device).replace(" ", "-").replace("/", "-")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    path = os.path.join(out_dir, f"{stamp}-{dev}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(out_dir, f"{stamp}-{dev}-{n}.json")
    payload = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "build": build_info(),
        "extra": extra or {},
        "results": [dataclasses.asdict(r) for r in results],
    }
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    return path


def write_plot(results: list[Result], json_path: str) -> Optional[str]:
    """A bar chart of ms per implementation, one panel row per group, next to the JSON (matplotlib, if
    installed; returns the PNG path or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = []
    for r in results:
        if r.group not in groups:
            groups.append(r.group)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.0 + 0.9 * len(groups) + 0.25 * len(results)),
                             squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rows = [r for r in results if r.group == g]
        names = [r.name for r in rows]
        ms = [r.ms if r.ms is not None else 0.0 for r in rows]
        colors = ["#999999" if r.baseline else "#1f77b4" for r in rows]
        ax.barh(names, ms, color=colors)
        for i, r in enumerate(rows):
            label = "n/a" if r.ms is None else f"{r.ms:.3g} ms" + (
                f"  ({r.speedup_vs_best_baseline:.2f}x)" if r.speedup_vs_best_baseline else "")
            ax.text(ms[i], i, " " + label, va="center", fontsize=7)
        ax.set_title(g, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("ms (median; grey = baseline)", fontsize=8)
    fig.tight_layout()
    path = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def captions(b: int, t: int, low: int, high: int, min_len: int, device, generator=None):
    """``(input_ids, attention_mask)`` [b, t] of [CLS]-started (101) captions with token ids in [low, high) and
    lengths drawn from [min_len, t], right-padded with 0 (as a BERT tokenizer pads to max_length)."""
    ids = torch.randint(low, high, (b, t), device=device, generator=generator)
    ids[:, 0] = 101
    lengths = torch.randint(min_len, t + 1, (b,), device=device, generator=generator)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def training_step(opt, amp, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One timed training step: zero the gradients, ``loss_fn()`` under ``amp``, backward, ``opt.step()``."""
    def run():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
    return run
