"""Self-test cases of ITM hard-negative sampling (``sample_hard_negatives``, the CUDA sampler; docs/selftest.md).

Three checks, in the dtype of the logits:

- **distribution**: 3000 independent draws of one row (each row has its own Philox stream) follow the softmax over
  the drawable columns (Pearson chi-square, p > 1e-4; the seed is fixed, so a correct sampler passes every time),
  for both directions, with a vanishing probability and two excluded columns; never an excluded column;
- **draw rules** on extreme logits (NaN, +-inf, +-3e38 or +-6e4 in fp16) and a row with nothing drawable: -1
  exactly for rows with no drawable column, never a NaN, -inf or excluded column, a +inf logit always wins;
- **index for index** equal to the reference's draws under the same seed on awkward sizes (B = 1 of a world of
  one, rank offsets, 300 and 512 columns), extreme logits included.

Full adds BLIP (v1)'s floored distribution (softmax + 1e-4) and a 256 x 1024 block. The sampler is reached
through the registered custom op with the backend named (:func:`draw`), so that a row can have any drawable mask.
"""
from __future__ import annotations

import functools
import math

import torch

from ..ops.hard_negatives import drawable_mask, sample_hard_negatives_ref
from .case import FULL, Case, Measure, equal_count


def draw(backend, s_i2t, s_t2i, drawable, seed, row_offset, floor=0.0):
    """(neg_text_index, neg_image_index) of the sampler on ``backend`` (the op's custom op)."""
    return torch.ops.blipfast.sample_hard_negatives(s_i2t, s_t2i, drawable, seed, row_offset, backend, floor=floor)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` against ``probs`` (cells with expectation < 5 pooled)."""
    n = counts.sum().double()
    exp = probs.double() * n
    big = exp >= 5
    obs_c = torch.cat([counts.double()[big], counts.double()[~big].sum().view(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64, device=stat.device), stat / 2))


def _expected(logits: torch.Tensor, drawable: torch.Tensor, floor: float) -> torch.Tensor:
    """The sampler's distribution over one row: softmax over the drawable columns, or with a floor BLIP's
    softmax over the whole row + floor, excluded columns then removed."""
    x = logits.double()
    if floor > 0:
        p = torch.softmax(x, 0) + floor
        p = torch.where(drawable, p, torch.zeros_like(p))
        return p / p.sum()
    return torch.softmax(torch.where(drawable, x, torch.tensor(float("-inf"), dtype=torch.float64, device=x.device)), 0)


def _distribution(inp, backend, dtype, floor=0.0):
    g = torch.Generator(device="cpu").manual_seed(1234)
    logits = (torch.randn(13, generator=g, device="cpu") * 1.5).to(dtype)
    logits[4] = -25.0  # a vanishing probability
    drawable = torch.ones(13, dtype=torch.bool, device="cpu")
    drawable[[2, 9]] = False  # e.g. the own pair and a same-image pair
    rows = 3000
    s = logits.view(1, 13).expand(rows, 13).contiguous()
    d = drawable.view(1, 13).expand(rows, 13).contiguous()
    seed = torch.tensor([987654321987], dtype=torch.int64, device=inp.device)
    half = (s.float() * 0.5).to(dtype)
    got = draw(backend, s.to(inp.device), half.to(inp.device), d.to(inp.device), seed, 0, floor)
    out = []
    for name, idx, lg in (("i2t", got[0], logits), ("t2i", got[1], half[0])):
        idx = idx.cpu()
        bad = int((idx < 0).sum()) + int((~drawable[idx.clamp_min(0)]).sum())
        out.append(Measure(f"excluded or -1 draws ({name})", float(bad), 0.0, "count"))
        p = chi_square_pvalue(torch.bincount(idx.clamp_min(0), minlength=13), _expected(lg, drawable, floor))
        out.append(Measure(f"chi-square ({name})", -math.log10(max(p, 1e-300)), 4.0, "-log10 p vs 4 (p > 1e-4)"))
    return out


def _extreme_cases(inp, dtype):
    """(s_i2t, s_t2i, drawable, seed, row_offset) with awkward sizes and extreme values."""
    out = []
    big = 6e4 if dtype == torch.float16 else 3e38
    for b, bw, off in [(1, 1, 0), (3, 12, 3), (5, 5, 0), (64, 512, 448), (2, 300, 17)]:
        s1, s2 = inp.randn(b, bw, scale=3.0).to(dtype), inp.randn(b, bw, scale=3.0).to(dtype)
        d = drawable_mask(b, bw, off, device=inp.device)
        if bw > 2:
            s1[0, :2] = float("nan")
            s2[-1, -1] = float("-inf")
            s1[-1, 1] = float("inf")
            s2[0, 0], s2[0, 1] = -big, big
            d[min(1, b - 1)] = False  # a row with nothing drawable
        out.append((s1, s2, d, inp.seed(), off))
    return out


def _rules(inp, backend, dtype):
    bad = 0
    for s1, s2, d, seed, off in _extreme_cases(inp, dtype):
        for s, idx in zip((s1, s2), draw(backend, s1, s2, d, seed, off)):
            ok = d & ~torch.isnan(s.double()) & (s.double() != float("-inf"))
            has = ok.any(1)
            bad += int(((idx >= 0) != has).sum())  # -1 exactly where nothing is drawable
            rows = torch.nonzero(has).flatten()
            bad += int((~ok[rows, idx[rows].clamp_min(0)]).sum())  # a NaN, -inf or excluded column drawn
            inf = (s.double() == float("inf")) & ok
            inf_rows = torch.nonzero(inf.any(1)).flatten()
            bad += int((~inf[inf_rows, idx[inf_rows].clamp_min(0)]).sum())  # a +inf logit did not win
    return [Measure("draw-rule violations", float(bad), 0.0, "count")]


def _exact(inp, backend, dtype, floor=0.0, sizes=None):
    got_all, want_all = [], []
    if sizes is None:
        cases = _extreme_cases(inp, dtype)
    else:
        cases = [(inp.randn(b, bw, scale=3.0).to(dtype), inp.randn(b, bw, scale=3.0).to(dtype),
                  drawable_mask(b, bw, off, device=inp.device), inp.seed(), off) for b, bw, off in sizes]
    for s1, s2, d, seed, off in cases:
        got_all += list(draw(backend, s1, s2, d, seed, off, floor))
        want_all += list(sample_hard_negatives_ref(s1, s2, d, seed, off, floor))
    return [equal_count("indices vs the reference", torch.cat(got_all), torch.cat(want_all))]


def sampler_cases(backend: str, dtype: torch.dtype, level: str) -> list:
    op = "sample_hard_negatives"
    part = functools.partial
    out = [Case(op, backend, dtype, "3000 x 13 (distribution)", part(_distribution, backend=backend, dtype=dtype)),
           Case(op, backend, dtype, "5 blocks, B=1..64, BW=1..512 (draw rules)", part(_rules, backend=backend,
                                                                                     dtype=dtype)),
           Case(op, backend, dtype, "5 blocks, B=1..64, BW=1..512 (vs reference)", part(_exact, backend=backend,
                                                                                       dtype=dtype))]
    if level == FULL:
        out += [Case(op, backend, dtype, "3000 x 13 floor=1e-4 (distribution)",
                     part(_distribution, backend=backend, dtype=dtype, floor=1e-4), FULL),
                Case(op, backend, dtype, "5 blocks floor=1e-4 (vs reference)",
                     part(_exact, backend=backend, dtype=dtype, floor=1e-4), FULL),
                Case(op, backend, dtype, "B=256 BW=1024 rank 3 (vs reference)",
                     part(_exact, backend=backend, dtype=dtype, sizes=[(256, 1024, 768)]), FULL)]
    return out


CASES = {("sample_hard_negatives", "cuda"): sampler_cases}
