"""``blipfast bench``: run the suites of blipfast.bench on this machine's device, print and save the table.

Exit status: 0 when every case of blipfast ran (a suite without its device, or an optional baseline that
cannot run here, is reported and skipped); 1 when any of blipfast's cases (or a required baseline, or the
building of a suite) raised: the table and the JSON still come out, then the failures are named on stderr
with their tracebacks. 2: bad arguments."""
from __future__ import annotations

import importlib
import sys

import torch

from ..options import add_device_argument, add_dtype_argument, resolve_device, resolve_dtype

# capability -> module in blipfast.bench exposing cases(device, dtype, quick)
SUITES = ("stage1", "qformer", "attention", "itc", "retrieval", "train_data", "blip_pretrain", "blip_retrieval",
          "blip_vqa", "blip2_finetune", "eval")
ALIASES = {"data": "train_data"}  # --only data: the training data path (the loaders alone, and in the loop)


def add_arguments(p) -> None:
    p.add_argument("--only", help=f"comma-separated suites among {','.join(SUITES)} (default: all; data is "
                   f"train_data)")
    add_device_argument(p)
    add_dtype_argument(p, "activation dtype on CUDA, autocast for the models", default="bf16", note="CPU runs fp32")
    p.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke run)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per case (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON (empty string: do not write)")


def run(args) -> int:
    from .common import device_name, failure, format_table, run_cases, write_json, write_plot

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"blipfast bench: {exc}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device)
    wanted = SUITES if args.only is None else tuple(ALIASES.get(s.strip(), s.strip()) for s in args.only.split(","))
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        print(f"blipfast bench: unknown suite(s) {unknown}; choose from {SUITES}", file=sys.stderr)
        return 2
    print(f"blipfast bench on {device_name(device)} ({device.type}), dtype {args.dtype}"
          f"{' (CPU runs fp32)' if device.type == 'cpu' else ''}", flush=True)
    results, counted, notes = [], {}, []
    for name in wanted:
        try:
            mod = importlib.import_module(f"blipfast.bench.{name}")
            if hasattr(mod, "counted_report"):  # costs counted from the code: the same on every device
                table, payload = mod.counted_report()
                print(table + "\n", flush=True)
                notes.append(table)
                counted[name] = payload
            cases = mod.cases(device, dtype=dtype, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - building the suite is blipfast's code: a failure, reported below
            results.append(failure(f"{name} suite", "building the cases", exc))
            continue
        if not cases:
            print(f"  [{name}] skipped: needs a CUDA device", flush=True)
            continue
        iters = args.iters if args.iters else (30 if device.type == "cuda" else 3)
        warmup = 5 if device.type == "cuda" else 1
        results += run_cases(cases, device, warmup=warmup, iters=iters, progress=name)
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for table in notes:
        print(table + "\n")
    print(format_table(results))
    for name in wanted:
        mod = importlib.import_module(f"blipfast.bench.{name}")
        text = mod.images_per_s(results) if hasattr(mod, "images_per_s") else ""
        if text:  # (empty when the suite timed nothing here)
            print(f"\n{name}:\n" + text)
    if args.out:
        path = write_json(results, device, args.out, extra={"argv": sys.argv[1:], "quick": args.quick,
                                                            "counted": counted})
        png = write_plot(results, path)
        print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    failed = [r for r in results if r.failed]
    if failed:
        print(f"\nblipfast bench: {len(failed)} case(s) FAILED (errors in blipfast or a required baseline, "
              f"not a missing optional baseline):", file=sys.stderr)
        for r in failed:
            print(f"\n--- {r.group} / {r.name}: {r.error}\n{r.traceback or ''}", file=sys.stderr, end="")
        print("\nFAILED: " + "; ".join(f"{r.group} / {r.name}" for r in failed), file=sys.stderr, flush=True)
        return 1
    return 0
