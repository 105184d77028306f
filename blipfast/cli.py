"""Command line: ``blipfast bench`` (the main job) and ``blipfast info``.

``blipfast bench`` times blipfast against its baselines on whatever device is there (a CUDA GPU when
one is visible, else the CPU), prints one table and writes the JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

# capability -> module in blipfast.bench exposing cases(device, dtype, quick)
SUITES = ("qformer", "attention", "itc")


def _load_suite(name):
    try:
        return importlib.import_module(f"blipfast.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"blipfast.bench.{name}":
            return None
        raise


def bench(args) -> int:
    from .bench.common import device_name, format_table, run_cases, write_json, write_plot

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    wanted = SUITES if args.only is None else tuple(s.strip() for s in args.only.split(","))
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        print(f"blipfast bench: unknown suite(s) {unknown}; choose from {SUITES}", file=sys.stderr)
        return 2
    print(f"blipfast bench on {device_name(device)} ({device.type}), dtype {args.dtype}"
          f"{' (CPU runs fp32)' if device.type == 'cpu' else ''}", flush=True)
    results = []
    for name in wanted:
        mod = _load_suite(name)
        if mod is None:
            print(f"  [{name}] not available in this build", flush=True)
            continue
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
    print(format_table(results))
    if args.out:
        path = write_json(results, device, args.out, extra={"argv": sys.argv[1:], "quick": args.quick})
        png = write_plot(results, path)
        print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0


def info(args) -> int:
    from ._ext import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blipfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bench", help="time blipfast against its baselines on this machine's device")
    p.add_argument("--only", help=f"comma-separated suites among {','.join(SUITES)} (default: all)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="activation dtype on CUDA (autocast for the models; CPU runs fp32)")
    p.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke run)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per case (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON (empty string: do not write)")
    p.set_defaults(func=bench)
    p = sub.add_parser("info", help="print what was built (extension, CUDA archs, Triton)")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
