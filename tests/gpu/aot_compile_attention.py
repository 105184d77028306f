"""Compile the attention kernels for a GPU target without a GPU (Triton's bundled ptxas) and report
their resources: registers, spill stack, shared memory, async-copy pipelining.

    python tests/gpu/aot_compile_attention.py            # headline shapes, default configs, sm_90
    python tests/gpu/aot_compile_attention.py --all      # every tuning candidate too
    python tests/gpu/aot_compile_attention.py --arch 80

Catches what the interpreter cannot (GPU-only compile errors, shared memory beyond the device's limit,
register spills) and prints the plan that `kernels/attention.py` would launch: the kernels and
constexprs come from its `kernel_plan` and default/candidate configurations. Exits 1 on a compile
failure or a kernel over the shared-memory limit. Pointer arguments and strides are given the 16-byte
divisibility that the JIT infers for torch tensors (without it the compiler cannot vectorise or pipeline
loads, and the report would be meaningless).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernel import: real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from blipfast.kernels import attention as A  # noqa: E402
from blipfast.kernels._attention_common import _rowset_table_kernel  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INT_PTR = {"SEED": "i64", "CHUNKS": "i32", "PERM": "i32", "IMGTAB": "i32", "IDX": "i64", "SIMG": "i32", "KPM": "u8"}
_F32_PTR = {"LSE", "DI"}
_DATA_PTR = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FLOATS = {"keep_scale", "qk_scale", "sm_scale"}
_UNALIGNED = {"skpb"}  # the padding mask's row stride is Lk (257, ...)


def _signature(fn, dtype: str, consts: dict):
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        if a in _DATA_PTR or a in _F32_PTR or a in _INT_PTR:
            sig[a] = "*" + (_INT_PTR.get(a) or ("fp32" if a in _F32_PTR else dtype))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in _FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
            if a.startswith("s") and a not in _UNALIGNED:  # strides of [B, L, H, D] tensors: multiples of D
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(fn, dtype: str, consts: dict, opts: dict, arch: int):
    consts = dict(consts)
    if "skpj" in fn.arg_names:
        consts["skpj"] = 1  # the JIT specialises a unit stride to a constant
    sig, attrs = _signature(fn, dtype, consts)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=opts)
    res = {"shared": k.metadata.shared, "async_copies": k.asm["ttgir"].count("async_copy_global_to_local")}
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    if m:
        res["regs"], res["stack"] = int(m.group(1)), int(m.group(2))
    return res


def headline_geometries():
    """(name, geometry, has_kpm): the benchmark shapes of issue 3 and the tested odd ones."""
    out = []
    for dt in (torch.bfloat16, torch.float16):
        for t in (32, 64):
            for mode in (0, 1, 2):
                for p in (0.0, 0.1):
                    if dt == torch.float16 and (mode, p) != (1, 0.0):
                        continue
                    out.append((f"self L=32+{t} mode{mode} p={p} {_TY[dt]}",
                                A._Geom(384, 384, 12, 32 + t, 32 + t, 64, mode, 32, 0, False, p, 0.125, dt), True))
        out.append((f"itg 32/64 {_TY[dt]}", A._Geom(384, 384, 12, 32, 64, 64, 1, 32, 32, False, 0.1, 0.125, dt), True))
        for lk in (257, 677):
            for p in (0.0, 0.1):
                out.append((f"cross Lk={lk} p={p} {_TY[dt]}",
                            A._Geom(384, 128, 12, 32, lk, 64, 0, 0, 0, True, p, 0.125, dt), False))
        for name, geom in ((f"cross no-index {_TY[dt]}", (128, 128, 12, 32, 257, 64, 0, 0, 0, False, 0.0, 0.125)),
                           (f"self D=88 {_TY[dt]}", (8, 8, 16, 64, 64, 88, 2, 32, 0, False, 0.1, 0.106)),
                           (f"self L=96 D=88 {_TY[dt]}", (8, 8, 16, 96, 96, 88, 1, 32, 0, False, 0.0, 0.106)),
                           (f"self L=300 {_TY[dt]}", (2, 2, 4, 300, 300, 64, 1, 32, 0, False, 0.0, 0.125))):
            out.append((name, A._Geom(*geom, dt), True))
    f32 = torch.float32
    for d in (64, 88):
        out.append((f"self D={d} fp32", A._Geom(16, 16, 12, 64, 64, d, 1, 32, 0, False, 0.1, 0.125, f32), True))
        out.append((f"self L=96 D={d} fp32", A._Geom(4, 4, 8, 96, 96, d, 2, 32, 0, False, 0.0, 0.125, f32), True))
        out.append((f"cross D={d} fp32", A._Geom(48, 16, 12, 32, 257, d, 0, 0, 0, True, 0.1, 0.125, f32), False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="every tuning candidate, not only the defaults")
    ap.add_argument("--only", default="", help="comma-separated substrings of the geometry names to keep")
    args = ap.parse_args(argv)
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    failures = 0
    seen = {}
    jobs = []
    for name, g, has_kpm in headline_geometries():
        if args.only and not any(f in name for f in args.only.split(",")):
            continue
        fwd = A._fwd_candidates(g) if args.all else [A._default_fwd_config(g)]
        bwd = A._bwd_candidates(g) if args.all else [A._default_bwd_config(g)]
        for backward, cfgs in ((False, fwd), (True, bwd)):
            for cfg in cfgs:
                for fn, meta, opts in A.kernel_plan(g, cfg, has_kpm, backward):
                    jobs.append((name, fn, _TY[g.dtype], meta, opts))
    jobs.append(("row-set tables", _rowset_table_kernel, "i32", dict(G=2, NB=512), dict(num_warps=4)))
    for name, fn, dt, meta, opts in jobs:
        key = (fn.__name__, dt, tuple(sorted(meta.items())), tuple(sorted(opts.items())))
        short = {k: v for k, v in meta.items() if k in ("MODE", "HAS_DROPOUT", "HAS_INDEX", "G", "HPP", "BLOCK_M",
                                                         "BLOCK_N", "BLOCK_D", "SINGLE_N", "FUSE_DQ")}
        if key in seen:
            continue
        try:
            r = seen[key] = compile_one(fn, dt, meta, opts, args.arch)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"FAIL {name:28s} {fn.__name__} {dt} {short} {opts}: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        over = r["shared"] > limit
        failures += over
        print(f"{'OVER' if over else 'ok  '} {name:28s} {fn.__name__:22s} {dt} {short} w{opts.get('num_warps')} "
              f"s{opts.get('num_stages', '-')}: regs {r.get('regs')} stack {r.get('stack')} smem {r['shared']} "
              f"async {r['async_copies']}", flush=True)
    print(f"{len(seen)} kernels compiled for sm_{args.arch}, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
