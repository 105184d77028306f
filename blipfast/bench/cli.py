"""``blipfast bench``: run the suites of blipfast.bench on this machine's device, print and save the table."""
from __future__ import annotations

import importlib
import sys

import torch

# capability -> module in blipfast.bench exposing cases(device, dtype, quick)
SUITES = ("qformer", "attention", "itc", "retrieval")


def add_arguments(p) -> None:
    p.add_argument("--only", help=f"comma-separated suites among {','.join(SUITES)} (default: all)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="activation dtype on CUDA (autocast for the models; CPU runs fp32)")
    p.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke run)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per case (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON (empty string: do not write)")


def run(args) -> int:
    from .common import device_name, format_table, run_cases, write_json, write_plot

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    wanted = SUITES if args.only is None else tuple(s.strip() for s in args.only.split(","))
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        print(f"blipfast bench: unknown suite(s) {unknown}; choose from {SUITES}", file=sys.stderr)
        return 2
    print(f"blipfast bench on {device_name(device)} ({device.type}), dtype {args.dtype}"
          f"{' (CPU runs fp32)' if device.type == 'cpu' else ''}", flush=True)
    results, counted, notes = [], {}, []
    for name in wanted:
        mod = importlib.import_module(f"blipfast.bench.{name}")
        if hasattr(mod, "counted_report"):  # costs counted from the code: the same on every device
            table, payload = mod.counted_report()
            print(table + "\n", flush=True)
            notes.append(table)
            counted[name] = payload
        cases = mod.cases(device, dtype=dtype, quick=args.quick)
        if not cases:
            print(f"  [{name}] skipped: needs a CUDA device", flush=True)
            continue
        iters = args.iters if args.iters else (30 if device.type == "cuda" else 3)
        warmup = 5 if device.type == "cuda" else 1
        results += run_cases(cases, device, warmup=warmup, iters=iters,
                             progress=lambda s: print(f"  timing {s}", flush=True))
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for table in notes:
        print(table + "\n")
    print(format_table(results))
    if args.out:
        path = write_json(results, device, args.out, extra={"argv": sys.argv[1:], "quick": args.quick,
                                                            "counted": counted})
        png = write_plot(results, path)
        print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0
