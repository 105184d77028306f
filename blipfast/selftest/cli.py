"""``blipfast selftest``: check every fused kernel against its reference on this machine's device (docs/selftest.md).

Prints a table (op, backend, dtype, shape, the worst error against its bound, pass) after a tqdm bar, writes the
JSON with ``--json``, caches each (op, backend, dtype)'s verdict for the first-use check of later processes, and
exits 1 when a check failed (2 on bad arguments).
"""
from __future__ import annotations

import json
import pathlib
import sys

from ..options import DTYPES, add_device_argument, dtype_name, resolve_device


def add_arguments(p) -> None:
    add_device_argument(p)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", dest="level", action="store_const", const="quick",
                       help="the first-use cases of every op (seconds; the default)")
    level.add_argument("--full", dest="level", action="store_const", const="full",
                       help="the quick cases plus the autotuning buckets, larger and awkward shapes and every "
                            "candidate tiling (a few minutes)")
    p.set_defaults(level="quick")
    p.add_argument("--json", type=pathlib.Path, help="write the results as JSON to this file")
    p.add_argument("--ops", help="comma-separated ops to check (default: every op with a fast backend)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated dtypes (default: fp32,fp16,bf16)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def _dtypes(text: str):
    names = [dtype_name(t.strip()) for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise ValueError(f"--dtypes: each must be one of {', '.join(sorted(DTYPES))}, got {text!r}")
    return [DTYPES[n] for n in names]


def run(args) -> int:
    from . import run as run_selftest
    from .cache import device_key
    from .runner import format_table, to_json

    try:
        device = resolve_device(args.device)
        dtypes = _dtypes(args.dtypes)
        ops = None if not args.ops else [o.strip() for o in args.ops.split(",") if o.strip()]
        results = run_selftest(device, args.level, ops=ops, dtypes=dtypes, progress=args.progress)
    except ValueError as exc:
        print(f"blipfast selftest: {exc}", file=sys.stderr)
        return 2
    key = device_key(device)
    print(f"blipfast selftest --{args.level} on {key['gpu']} (capability {key['capability']}, driver "
          f"{key['driver']}; torch {key['torch']}, triton {key['triton']}, blipfast {key['blipfast']})")
    if not results:
        print(f"no fast backend runs on {device} (the CPU runs the references; TRITON_INTERPRET=1 runs the Triton "
              f"kernels there): nothing to check")
    else:
        print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, args.level, key), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in results) else 1
