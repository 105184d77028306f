"""Triton kernels of ``blipfast.ops.qformer_attention`` and ``blipfast.ops.cross_attention``.

Entry points (called by the ops' custom ops when backend == "triton"; contracts in docs/ops.md):

    qformer_attention_fwd(q, k, v, key_padding_mask, seed, num_query, mode, dropout_p, scale) -> (out, lse)
    qformer_attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed, num_query, mode, dropout_p,
                          scale) -> (dq, dk, dv)
    cross_attention_fwd(q, k, v, kv_index, key_padding_mask, seed, dropout_p, scale) -> (out, lse)
    cross_attention_bwd(grad_out, q, k, v, out, lse, kv_index, key_padding_mask, seed, dropout_p, scale)
        -> (dq, dk, dv)

q/k/v are [B, L, H, D] views whose last dim is contiguous (strides are passed, nothing is copied); out
and the gradients are contiguous in the inputs' dtypes; lse is fp64 [B, H, Lq] (natural log; fp64 so that the
backward's probabilities keep fp32 precision at any score magnitude) with -inf for a row
that has no allowed key. A kv_index value outside [0, M) (which the op rejects first) is skipped by the
row-set tables: its row-set's out, lse and dq rows are left unwritten and its K/V get no gradient, and
nothing is read or written out of bounds. Every entry point also takes ``config=`` (a dict of block
sizes, see ``_default_fwd_config`` / ``_default_bwd_config``) so tests can force particular tilings.

Tiling (see _attention_fwd.py / _attention_bwd.py): self-attention keys (Q-Former: 32 + <= 64 tokens)
fit one BLOCK_N tile, so the forward is a single exact-softmax pass and the backward is ONE kernel per
(batch, heads) that writes dQ, dK and dV. Cross-attention with kv_index stacks G = BLOCK_M // Lq
row-sets of the same image in one tile (one pass over the image's K/V serves them all); the row-set
tables are built on the device by one small kernel (no host sync) and dK/dV are reduced per image by
the program that owns them: deterministic, no atomics.

Block sizes come from shape heuristics; on CUDA the first call of a tuning bucket also times a few
candidate configurations and caches the fastest (``BLIPFAST_AUTOTUNE=0`` keeps the heuristic). A bucket
(``_Geom.key``) holds every input of the heuristics in the form they use it - power-of-two buckets of
rows, keys and row-sets per image, exact heads and head dim, dtype, mode, index, dropout on/off - so a
training run with varying text lengths tunes once per bucket, and a configuration chosen for one member
is valid for every member. Timing is impossible while a CUDA graph is captured: a bucket first seen
then gets the heuristic configuration, recorded so that later eager calls use the graph's tiling. A
candidate that fails while being timed (e.g. out of shared memory on this device) is skipped with an
``AutotuneWarning`` naming the kernels, the configuration and the error (once per configuration); when
every candidate fails, the call raises a RuntimeError listing each failure.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch
import triton

from ._attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ._attention_common import build_rowset_tables
from ._constants import dropout_threshold
from ._attention_fwd import attn_fwd_kernel

MODE_IDS = {"bidirectional": 0, "causal": 1, "unimodal": 2, "itc_itg": 3}


def _np2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _floor_p2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


@dataclasses.dataclass
class _Geom:
    """Everything about a call that is not a tensor pointer."""

    n: int  # row-sets (q.shape[0])
    m: int  # K/V groups (k.shape[0])
    h: int
    lq: int
    lk: int
    d: int
    mode: int
    nq: int
    seq_off: int
    has_index: bool
    dropout_p: float
    scale: float
    dtype: torch.dtype

    @property
    def block_d(self) -> int:
        return max(16, _np2(self.d))

    @property
    def offs64(self) -> bool:
        """Philox counters of the dropout rule (rows * ceil(Lk / 4), ops/_philox.py) need 64 bits."""
        return self.n * self.h * self.lq * ((self.lk + 3) // 4) >= 2**31

    @property
    def per_image(self) -> int:
        """Row-sets per image (cross-attention with kv_index), what the stacking heuristic uses."""
        return max(1, self.n // max(self.m, 1))

    def key(self, kind: str) -> tuple:
        """The autotuning bucket. The heuristics and candidate lists below read a geometry only through
        these values (the power-of-two rounding of Lq and Lk, the power-of-two floor of row-sets per
        image), so every member of a bucket gets the same candidates; rows (N) are bucketed too."""
        return (kind, self.mode, self.has_index, self.dropout_p > 0, self.dtype, self.h, self.d,
                _np2(self.lq), _np2(self.lk), _np2(self.n), _floor_p2(self.per_image) if self.has_index else 0)


def _rowsets_per_tile(g: _Geom, block_m: int) -> int:
    return max(1, block_m // max(g.lq, 1)) if (g.has_index and g.lq <= block_m) else 1


# ----------------------------------------------------------------------------------------------
# configurations


# Register / shared-memory budgets behind the defaults were read from sm_90 builds (bf16, D = 64, 4 warps
# unless said): self forward 64x64 tile 91 regs (168 with dropout); fused self backward BLOCK_M 32 x
# BLOCK_N 64 182 regs (64 x 64 needs 8 warps); cross forward 64 stacked rows 131 regs (128 rows: 8 warps);
# cross dK/dV 253 regs with 64 stacked rows (128 spill; with dropout: 32 keys x 8 warps, 109 regs).
# fp32 (3xTF32) gets small tiles. tests/gpu/aot_compile_attention.py prints these for every default.


def _single_key_tile(g: _Geom, bwd: bool) -> int:
    """BLOCK_N that holds all of a self-attention row-set's keys, or 0 when they need several tiles."""
    if g.has_index:
        return 0
    cap = 128
    if g.dtype == torch.float32:
        cap = 64 if g.block_d <= 64 else 32
    elif bwd and g.block_d > 64:
        cap = 64
    bn = max(16, _np2(g.lk))
    return bn if bn <= cap else 0


def _stacked_rows(g: _Geom) -> int:
    """Cross-attention tile rows: the largest power of two G <= N / M row-sets of one image stacked
    (fewer half-empty tiles than rounding up), at most 64 rows (128 when images are shared by 4 or more
    row-sets on average); a row-set longer than 64 rows is split into 64-row blocks instead."""
    lq = max(16, _np2(g.lq))
    if not g.has_index or g.lq > 64:
        return min(lq, 64)
    stack = _floor_p2(g.per_image)
    cap = 128 if stack >= 4 and g.block_d <= 64 and g.dtype != torch.float32 else 64
    return min(lq * stack, cap)


def _default_fwd_config(g: _Geom) -> dict:
    fp32 = g.dtype == torch.float32
    bn = _single_key_tile(g, bwd=False)
    if bn:  # all keys in one tile: single pass
        # with dropout a 128-key tile takes 32 rows: tuned when every score drew its own Philox call; with one
        # tl.randint4x per 4 scores, 64 rows x 8 warps compiles to 166 registers on sm_90 (was 233): re-tune on a GPU
        bm = min(max(16, _np2(g.lq)), 32 if (fp32 or (g.dropout_p > 0 and bn >= 128)) else 64)
        warps = 8 if (fp32 or bm * bn > 64 * 64 or g.block_d > 64) else 4
        return dict(BLOCK_M=bm, BLOCK_N=bn, HPP=1, num_warps=warps, num_stages=1)
    bm = _stacked_rows(g) if g.has_index else min(max(16, _np2(g.lq)), 64)
    if fp32:
        bm = min(bm, 32)
    bn = max(16, min(32 if (fp32 and g.block_d > 64) else 64, _np2(g.lk)))
    warps = 8 if (bm >= 128 or fp32 or g.block_d > 64) else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, HPP=1, num_warps=warps, num_stages=2)


def _fwd_candidates(g: _Geom) -> list[dict]:
    base = _default_fwd_config(g)
    out = [base]
    if g.dtype == torch.float32:
        return out
    if _single_key_tile(g, bwd=False):
        for hpp in (2, 4):  # with num_stages 2 the next head's loads overlap this head's math
            if g.h % hpp == 0:
                out.append({**base, "HPP": hpp, "num_stages": 2})
        if base["BLOCK_M"] > 16:
            out.append({**base, "BLOCK_M": base["BLOCK_M"] // 2})
        out.append({**base, "num_warps": 8 if base["num_warps"] == 4 else 4})
    else:
        bn_max = max(16, _np2(g.lk))
        if base["BLOCK_N"] > 16:
            out.append({**base, "BLOCK_N": base["BLOCK_N"] // 2})
        if base["BLOCK_N"] * 2 <= min(bn_max, 128):
            out.append({**base, "BLOCK_N": base["BLOCK_N"] * 2, "num_warps": 8})
        out.append({**base, "num_stages": 3})
        if g.has_index and g.lq <= 64:
            for bm in (64, 128):
                if bm != base["BLOCK_M"] and bm >= _np2(g.lq):
                    out.append({**base, "BLOCK_M": bm, "num_warps": 8 if bm >= 128 else 4})
    return _dedupe(out)


def _default_bwd_config(g: _Geom) -> dict:
    fp32 = g.dtype == torch.float32
    bn = _single_key_tile(g, bwd=True)
    if bn:  # one kernel writes dQ, dK, dV of a (batch, heads) pair
        bm = min(max(16, _np2(g.lq)), 16 if (fp32 and g.block_d > 64) else 32)
        warps = 8 if (fp32 or bn > 64 or g.block_d > 64) else 4
        # fp32: no multi-stage buffers (two stages of 3xTF32 operands take ~140 KB of shared memory)
        return dict(BLOCK_M=bm, BLOCK_N=bn, HPP=1, num_warps=warps, num_stages=1 if fp32 else 2)
    fwd = _default_fwd_config(g)
    # dK/dV tiles: S^T is [BLOCK_N keys, BLOCK_M rows]; at most 64 stacked rows (128 spills)
    bm = min(fwd["BLOCK_M"], 64 if not fp32 else 32)
    # dropout: 32 keys x 8 warps (tuned with one Philox call per score: 109 regs, 64 x 4 spilled; with one call
    # per 4 scores sm_90 AOT gives 128 regs + 8 B stack here, 64 keys x 8 warps 251 regs and no spill: re-tune)
    drop = g.dropout_p > 0
    bn = max(16, min(64 if not (fp32 or drop) else 32, _np2(g.lk)))
    warps = 8 if (fp32 or g.block_d > 64 or drop) else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, HPP=1, num_warps=warps, num_stages=2,
                DQ_BLOCK_M=fwd["BLOCK_M"], DQ_BLOCK_N=min(fwd["BLOCK_N"], 64), DQ_num_warps=fwd["num_warps"])


def _bwd_candidates(g: _Geom) -> list[dict]:
    base = _default_bwd_config(g)
    out = [base]
    if g.dtype == torch.float32:
        return out
    if _single_key_tile(g, bwd=True):
        if g.h % 2 == 0:
            out.append({**base, "HPP": 2})
        if base["BLOCK_M"] > 16:
            out.append({**base, "BLOCK_M": base["BLOCK_M"] // 2})
        if base["BLOCK_M"] < min(64, max(16, _np2(g.lq))):
            out.append({**base, "BLOCK_M": base["BLOCK_M"] * 2, "num_warps": 8})
        out.append({**base, "num_stages": 1})
    else:
        if base["BLOCK_N"] > 16:
            out.append({**base, "BLOCK_N": base["BLOCK_N"] // 2})
        if base["BLOCK_N"] < 64 <= _np2(g.lk):
            out.append({**base, "BLOCK_N": 64})
        if base["BLOCK_M"] > max(16, _np2(g.lq)) or (not g.has_index and base["BLOCK_M"] > 16):
            out.append({**base, "BLOCK_M": base["BLOCK_M"] // 2})
        out.append({**base, "num_warps": 8 if base["num_warps"] == 4 else 4})
        if base["DQ_BLOCK_N"] > 16:
            out.append({**base, "DQ_BLOCK_N": base["DQ_BLOCK_N"] // 2})
    return _dedupe(out)


def _dedupe(cfgs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in cfgs:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


_TUNED: dict = {}


def _tuning_possible(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("BLIPFAST_AUTOTUNE", "1") != "0"


def _choose(g: _Geom, kind: str, candidates: list[dict], run, device: torch.device) -> dict:
    """The configuration of g's tuning bucket: cached, else timed on first use (CUDA only), else the
    heuristic (candidates[0], a function of the bucket). Under CUDA-graph capture nothing is timed; a
    bucket first seen there records the heuristic, so eager calls reuse the graph's tiling. A candidate that
    fails is skipped with an AutotuneWarning; none that runs is a RuntimeError listing every failure."""
    key = g.key(kind)
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or not _tuning_possible(device):
        return candidates[0]
    if torch.cuda.is_current_stream_capturing():
        _TUNED[key] = candidates[0]
        return candidates[0]
    from triton.testing import do_bench

    best, best_ms, failures = None, float("inf"), []
    for cfg in candidates:
        try:
            ms = do_bench(lambda: run(cfg), warmup=3, rep=20)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory on this device: reported, not raised
            failures.append((cfg, exc))
            _report_failure(g, kind, cfg, exc)
            continue
        if best is None or ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        listed = "\n".join(f"  {_describe(cfg)}: {type(exc).__name__}: {exc}" for cfg, exc in failures)
        raise RuntimeError(f"blipfast.kernels.attention: no configuration of {_kernel_names(g, kind, candidates[0])} "
                           f"runs for the tuning bucket {key}; every candidate failed:\n{listed}") from failures[-1][1]
    _TUNED[key] = best
    return best


class AutotuneWarning(UserWarning):
    """A candidate configuration failed while autotuning (the others still compete)."""


_REPORTED: set = set()  # (kernels, configuration) already warned about: one warning per failing configuration


def _describe(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def _kernel_names(g: _Geom, kind: str, cfg: dict) -> str:
    """The Triton kernels a configuration of kind ``fwd`` / ``bwd`` launches (kernel_plan's choice)."""
    if kind == "fwd":
        return "attn_fwd_kernel"
    return "attn_bwd_dq_kernel + attn_bwd_dkdv_kernel" if g.lk > cfg.get("BLOCK_N", g.lk) else "attn_bwd_dkdv_kernel"


def _report_failure(g: _Geom, kind: str, cfg: dict, exc: Exception) -> None:
    names = _kernel_names(g, kind, cfg)
    if (names, _describe(cfg)) in _REPORTED:
        return
    _REPORTED.add((names, _describe(cfg)))
    warnings.warn(f"blipfast.kernels.attention: autotuning {names}: the configuration {_describe(cfg)} failed and is "
                  f"skipped ({type(exc).__name__}: {exc})", AutotuneWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# launches


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _kpm_args(kpm: Optional[torch.Tensor], dummy: torch.Tensor):
    if kpm is None:
        return dummy, 0, 0
    if kpm.dtype == torch.bool:
        kpm = kpm.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def _common_consts(g: _Geom, has_kpm: bool, cfg: dict) -> dict:
    # cfg may force 64-bit Philox counters (tests: identical masks either way below 2**31 counters)
    return dict(MODE=g.mode, HAS_KPM=has_kpm, HAS_DROPOUT=g.dropout_p > 0.0, OFFS64=cfg.get("OFFS64", g.offs64),
                HAS_INDEX=g.has_index, BLOCK_D=g.block_d, HEAD_DIM=g.d,
                DOT_PREC=_dot_precision(g.dtype))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32x3"  # three TF32 products: fp32 accuracy on tensor cores (plain "ieee" spills badly)
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "upcast"  # Triton's interpreter multiplies the raw bits of bf16 tensors in tl.dot
    return "tf32"  # ignored for 16-bit operands


def _scalars(g: _Geom) -> tuple:
    thr = dropout_threshold(g.dropout_p) if g.dropout_p > 0.0 else 0
    keep = 1.0 / (1.0 - g.dropout_p)
    return g.h, g.lq, g.lk, g.nq, g.seq_off, thr, keep, g.scale


def _fwd_meta(g: _Geom, cfg: dict, has_kpm: bool) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of the forward kernel for a configuration."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    meta = dict(G=_rowsets_per_tile(g, bm), HPP=cfg["HPP"], BLOCK_M=bm, BLOCK_N=bn, SINGLE_N=g.lk <= bn,
                **_common_consts(g, has_kpm, cfg))
    return meta, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _dq_meta(g: _Geom, cfg: dict, has_kpm: bool) -> tuple[dict, dict]:
    bm = cfg.get("DQ_BLOCK_M", cfg["BLOCK_M"])
    meta = dict(G=_rowsets_per_tile(g, bm), HPP=cfg["HPP"], BLOCK_M=bm, BLOCK_N=cfg.get("DQ_BLOCK_N", cfg["BLOCK_N"]),
                **_common_consts(g, has_kpm, cfg))
    return meta, dict(num_warps=cfg.get("DQ_num_warps", cfg["num_warps"]), num_stages=cfg["num_stages"])


def _dkdv_meta(g: _Geom, cfg: dict, has_kpm: bool) -> tuple[dict, dict]:
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    meta = dict(G=_rowsets_per_tile(g, bm), HPP=cfg["HPP"], FUSE_DQ=g.lk <= bn, BLOCK_M=bm, BLOCK_N=bn,
                **_common_consts(g, has_kpm, cfg))
    return meta, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def kernel_plan(g: _Geom, cfg: dict, has_kpm: bool, backward: bool) -> list:
    """[(jit kernel, constexprs, launch options)] that a forward or backward call launches (besides the
    row-set table kernel); tests/gpu/aot_compile_attention.py compiles exactly these for sm_90."""
    if not backward:
        return [(attn_fwd_kernel, *_fwd_meta(g, cfg, has_kpm))]
    plan = [(attn_bwd_dq_kernel, *_dq_meta(g, cfg, has_kpm))] if g.lk > cfg["BLOCK_N"] else []
    return plan + [(attn_bwd_dkdv_kernel, *_dkdv_meta(g, cfg, has_kpm))]


def _launch_fwd(g: _Geom, q, k, v, out, lse, kpm, seed, kv_index, cfg: dict) -> None:
    meta, opts = _fwd_meta(g, cfg, kpm is not None)
    dummy = lse
    if g.has_index:
        _, _, chunks, n_tiles = build_rowset_tables(kv_index, g.m, meta["G"])
    else:
        chunks, n_tiles = dummy, g.n
    grid = (n_tiles * (g.h // meta["HPP"]), triton.cdiv(g.lq, meta["BLOCK_M"]) if meta["G"] == 1 else 1)
    if grid[0] == 0 or grid[1] == 0:
        return
    kpm_t, skpb, skpj = _kpm_args(kpm, dummy)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, kpm_t, seed if seed is not None else dummy, chunks,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), skpb, skpj, *_scalars(g), **meta, **opts)


def _launch_bwd(g: _Geom, do, q, k, v, out, lse, dq, dk, dv, kpm, seed, kv_index, cfg: dict) -> None:
    if g.lk == 0:  # no key at all: every row is empty
        dq.zero_()
        return
    dummy = lse
    kpm_t, skpb, skpj = _kpm_args(kpm, dummy)
    seed_t = seed if seed is not None else dummy
    scal = (*_scalars(g), g.scale)
    meta, opts = _dkdv_meta(g, cfg, kpm is not None)
    di = perm = imgtab = dummy
    if not meta["FUSE_DQ"]:
        qmeta, qopts = _dq_meta(g, cfg, kpm is not None)
        if g.has_index:
            perm, imgtab, chunks, n_tiles = build_rowset_tables(kv_index, g.m, qmeta["G"])
        else:
            chunks, n_tiles = dummy, g.n
        di = torch.empty((g.n, g.h, g.lq), dtype=torch.float32, device=q.device)
        grid = (n_tiles * (g.h // qmeta["HPP"]), triton.cdiv(g.lq, qmeta["BLOCK_M"]) if qmeta["G"] == 1 else 1)
        if grid[0] > 0:
            attn_bwd_dq_kernel[grid](
                q, k, v, out, do, lse, di, dq, kpm_t, seed_t, chunks,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq),
                skpb, skpj, *scal, **qmeta, **qopts)
    elif g.has_index:
        perm, imgtab, _, _ = build_rowset_tables(kv_index, g.m, 1)
    grid = (g.m * (g.h // meta["HPP"]) * triton.cdiv(g.lk, meta["BLOCK_N"]),)
    if grid[0] == 0:
        return
    attn_bwd_dkdv_kernel[grid](
        q, k, v, out, do, lse, di, dq, dk, dv, kpm_t, seed_t, perm, imgtab,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq),
        *_strides(dk), *_strides(dv), skpb, skpj, *scal, **meta, **opts)


# ----------------------------------------------------------------------------------------------
# entry points


def _check_dropout(dropout_p: float, seed) -> None:
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention kernels: dropout_p > 0 needs a seed tensor")


def _fwd(g: _Geom, q, k, v, kpm, seed, kv_index, config):
    _check_dropout(g.dropout_p, seed)
    out = torch.empty((g.n, g.lq, g.h, g.d), dtype=q.dtype, device=q.device)
    lse = torch.empty((g.n, g.h, g.lq), dtype=torch.float64, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if g.h % (config or {}).get("HPP", 1):
        raise ValueError("config: HPP must divide the number of heads")

    def run(cfg):
        _launch_fwd(g, q, k, v, out, lse, kpm, seed, kv_index, cfg)

    cfg = config or _choose(g, "fwd", _fwd_candidates(g), run, q.device)
    run(cfg)
    return out, lse


def _bwd(g: _Geom, grad_out, q, k, v, out, lse, kpm, seed, kv_index, config):
    _check_dropout(g.dropout_p, seed)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 and k.numel() == 0:
        return dq, dk, dv
    if q.numel() == 0 or g.lq == 0:  # no rows: K/V get no gradient
        return dq, dk.zero_(), dv.zero_()
    if g.h % (config or {}).get("HPP", 1):
        raise ValueError("config: HPP must divide the number of heads")

    def run(cfg):
        _launch_bwd(g, grad_out, q, k, v, out, lse, dq, dk, dv, kpm, seed, kv_index, cfg)

    cfg = config or _choose(g, "bwd", _bwd_candidates(g), run, q.device)
    run(cfg)
    return dq, dk, dv


def _self_geom(q, k, num_query, mode, dropout_p, scale) -> _Geom:
    b, lq, h, d = q.shape
    lk = k.shape[1]
    return _Geom(n=b, m=b, h=h, lq=lq, lk=lk, d=d, mode=MODE_IDS[mode], nq=int(num_query), seq_off=lk - lq,
                 has_index=False, dropout_p=float(dropout_p), scale=float(scale), dtype=q.dtype)


def _cross_geom(q, k, kv_index, dropout_p, scale) -> _Geom:
    n, lq, h, d = q.shape
    m, lk = k.shape[0], k.shape[1]
    return _Geom(n=n, m=m, h=h, lq=lq, lk=lk, d=d, mode=0, nq=0, seq_off=0, has_index=kv_index is not None,
                 dropout_p=float(dropout_p), scale=float(scale), dtype=q.dtype)


def qformer_attention_fwd(q, k, v, key_padding_mask, seed, num_query, mode, dropout_p, scale, *, config=None):
    g = _self_geom(q, k, num_query, mode, dropout_p, scale)
    return _fwd(g, q, k, v, key_padding_mask, seed, None, config)


def qformer_attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, seed, num_query, mode, dropout_p, scale,
                          *, config=None):
    g = _self_geom(q, k, num_query, mode, dropout_p, scale)
    return _bwd(g, grad_out, q, k, v, out, lse, key_padding_mask, seed, None, config)


def _index(kv_index):
    return None if kv_index is None else kv_index.to(torch.int64).contiguous()


def cross_attention_fwd(q, k, v, kv_index, key_padding_mask, seed, dropout_p, scale, *, config=None):
    g = _cross_geom(q, k, kv_index, dropout_p, scale)
    return _fwd(g, q, k, v, key_padding_mask, seed, _index(kv_index), config)


def cross_attention_bwd(grad_out, q, k, v, out, lse, kv_index, key_padding_mask, seed, dropout_p, scale, *,
                        config=None):
    g = _cross_geom(q, k, kv_index, dropout_p, scale)
    return _bwd(g, grad_out, q, k, v, out, lse, key_padding_mask, seed, _index(kv_index), config)
