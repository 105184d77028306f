"""The check cases of every fast backend and running them: one :class:`Result` per case, the verdict per
(op, backend, dtype), the table that ``blipfast selftest`` prints and the JSON it writes (docs/selftest.md).

Each op module of this package has ``CASES = {(op, backend): builder}`` with ``builder(backend, dtype, level) ->
list[Case]``. ``level`` is "quick" (the few cases that the first-use check runs before an op is trusted on a device,
and ``blipfast selftest --quick``) or "full" (``--full``: the quick cases plus the autotuning buckets, larger and
more awkward shapes, every candidate tiling). The linear ops (``concat_linear``, ``gelu_mlp``,
``linear_cross_entropy``) have no fast backend today (their one backend is PyTorch inside the custom op), so they
have no cases: a fused backend of theirs adds its builder to a module here like the others.

A case runs in a clean context whatever the caller's: gradients on (also under ``torch.no_grad`` or
``torch.inference_mode``), autocast off, CUDA's sync debug mode off (a check reads its results on the host), and
with ``autotune=False`` the attention kernels' heuristic tiling instead of timing candidates (the first-use check
and ``--quick``: seconds instead of a tuning run per bucket; ``--full`` checks every candidate explicitly). The
caller's random state is untouched: cases draw from their own generators. An exception is a failed case, with the
exception as its error: a kernel that does not compile or launch on a device is not trusted there either.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Iterable

import torch

from . import attention, itc, layernorm, negatives
from .cache import dtype_name
from .case import Case, Inputs, Measure

BUILDERS = {**attention.CASES, **itc.CASES, **negatives.CASES, **layernorm.CASES}


def registered() -> list:
    """The (op, backend) pairs that have check cases."""
    return sorted(BUILDERS)


def cases(op: str, backend: str, dtype: torch.dtype, level: str) -> list:
    """The check cases of ``op`` on ``backend`` in ``dtype`` at ``level`` (none when the pair has no cases)."""
    builder = BUILDERS.get((op, backend))
    return [] if builder is None else builder(backend, dtype, level)


def select(ops: Iterable[str] | None, dtypes: Iterable[torch.dtype], level: str, runnable) -> list:
    """Every case of ``ops`` (None: all) in ``dtypes`` at ``level`` whose backend ``runnable(backend, dtype)`` says
    can run here, op by op."""
    wanted = None if ops is None else set(ops)
    unknown = (wanted or set()) - {op for op, _ in BUILDERS}
    if unknown:
        raise ValueError(f"no self-test cases for {sorted(unknown)}; ops with a fast backend: "
                         f"{sorted({op for op, _ in BUILDERS})}")
    out = []
    for op, backend in registered():
        if wanted is not None and op not in wanted:
            continue
        for dtype in dtypes:
            if runnable(backend, dtype):
                out.extend(cases(op, backend, dtype, level))
    return out


@dataclasses.dataclass
class Result:
    case: Case
    measures: list
    exception: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exception is None and bool(self.measures) and all(m.ok for m in self.measures)

    @property
    def worst(self) -> Measure | None:
        """The failing measure with the largest error / bound, else the one closest to its bound."""
        if not self.measures:
            return None
        return max(self.measures, key=lambda m: (not m.ok, m.ratio if math.isfinite(m.ratio) else math.inf))

    def error_text(self) -> str | None:
        """Why the case failed (None when it passed)."""
        if self.ok:
            return None
        if self.exception is not None:
            return self.exception
        if not self.measures:
            return "no measure"
        bad = [m for m in self.measures if not m.ok]
        return f"{self.case.shape}: " + "; ".join(f"{m.name} {m.error:.3g} > {m.bound:.3g} ({m.what})" for m in bad)


@contextlib.contextmanager
def checking(device: torch.device, autotune: bool = True):
    """The context every case runs in (see the module docstring)."""
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            stack.callback(torch.cuda.set_sync_debug_mode, mode)
        if not autotune:
            old = os.environ.get("BLIPFAST_AUTOTUNE")
            os.environ["BLIPFAST_AUTOTUNE"] = "0"
            stack.callback(_restore_env, "BLIPFAST_AUTOTUNE", old)
        yield


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_case(case: Case, device: torch.device) -> Result:
    t0 = time.perf_counter()
    try:
        measures, exception = list(case.run(Inputs(case, device))), None
    except Exception as exc:  # noqa: BLE001 - a case that raises has failed; the error is its verdict's reason
        measures, exception = [], f"{case.shape}: {type(exc).__name__}: {exc}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Result(case, measures, exception, time.perf_counter() - t0)


def run_cases(cases: list, device: torch.device, *, autotune: bool = True, progress: bool = False,
              stop_on_failure: bool = False) -> list:
    """Run ``cases`` on ``device`` (a tqdm bar on stderr with ``progress``); with ``stop_on_failure`` stop at the
    first failed case (the first-use check: one failure decides the verdict)."""
    results = []
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="blipfast selftest", unit="case", file=sys.stderr)
    with checking(device, autotune):
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(f"{case.op} {dtype_name(case.dtype)}", refresh=False)
            results.append(run_case(case, device))
            if bar is not None:
                bar.update(1)
            if stop_on_failure and not results[-1].ok:
                break
    if bar is not None:
        bar.close()
    return results


def verdicts(results: list) -> dict:
    """(op, backend, dtype) -> (ok, error of the first failed case or None, number of cases run)."""
    out = {}
    for r in results:
        ok, err, n = out.get(r.case.key, (True, None, 0))
        if ok and not r.ok:
            ok, err = False, r.error_text()
        out[r.case.key] = (ok, err, n + 1)
    return out


def _num(x: float):
    return x if math.isfinite(x) else str(x)


def format_table(results: list) -> str:
    """The table of ``blipfast selftest``: op, backend, dtype, shape, the worst measure's error / bound, pass."""
    rows = []
    for r in results:
        w = r.worst
        if r.exception is not None:
            cell = "raised " + r.exception.split(": ", 1)[-1].split(":", 1)[0]
        elif w is None:
            cell = "-"
        else:
            cell = f"{w.error:.2e} / {w.bound:.2e} ({w.name})"
        rows.append((r.case.op, r.case.backend, dtype_name(r.case.dtype), r.case.shape, cell,
                     "pass" if r.ok else "FAIL"))
    head = ("op", "backend", "dtype", "shape", "error / bound (worst)", "pass")
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)] + [fmt.format(*row) for row in rows]
    failed = [r for r in results if not r.ok]
    lines.append(f"{len(results)} checks: {len(results) - len(failed)} passed, {len(failed)} failed "
                 f"({sum(r.seconds for r in results):.1f} s)")
    for r in failed:
        lines.append(f"FAIL {r.case.op} / {r.case.backend} / {dtype_name(r.case.dtype)}: {r.error_text()}")
    return "\n".join(lines)


def to_json(results: list, level: str, key: dict) -> dict:
    """The JSON of a run: the device's key, per-(op, backend, dtype) verdicts and every case's measures."""
    return {
        "level": level,
        "device": key,
        "passed": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "seconds": sum(r.seconds for r in results),
        "verdicts": {f"{op}/{backend}/{dtype_name(dt)}": {"ok": ok, "error": err, "cases": n}
                     for (op, backend, dt), (ok, err, n) in verdicts(results).items()},
        "cases": [{"op": r.case.op, "backend": r.case.backend, "dtype": dtype_name(r.case.dtype),
                   "shape": r.case.shape, "level": r.case.level, "ok": r.ok, "seconds": round(r.seconds, 4),
                   "exception": r.exception,
                   "measures": [{"name": m.name, "error": _num(m.error), "bound": _num(m.bound), "what": m.what,
                                 "ok": m.ok} for m in r.measures]} for r in results],
    }
