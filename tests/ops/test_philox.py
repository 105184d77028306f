"""Philox4x32-10 of blipfast/ops/_philox.py: known answers from Random123, an independent pure-Python
Philox, Triton's ``tl.randint4x`` / ``tl.randint`` (interpreter on CPU, CUDA on a GPU), the dropout rule
(all four words of a call: element (row, col) of a [rows, cols] view uses word col % 4 of counter
row * ceil(cols / 4) + col // 4), its threshold and its keep-rate statistics."""
from __future__ import annotations

import math
import os
import random
from fractions import Fraction

import pytest
import torch

from blipfast.ops import _philox
from blipfast.ops._philox import (
    dropout_keep_mask_2d,
    dropout_threshold,
    dropout_words_2d,
    new_seed,
    philox4_u32,
    philox_u32,
)
from tests.helpers.philox import M32, dropout_keep, dropout_word, philox4x32_10, philox_word, philox_words
from tests.helpers.runtime import HAS_CUDA


# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4]
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_independent_philox_known_answers(ctr, key, expected):
    assert philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_torch_philox_rounds_known_answers(ctr, key, expected):
    """The torch round function on general counters (c2, c3 != 0): all three Random123 answers."""
    c = [torch.tensor([x], dtype=torch.int64) for x in ctr]
    k = [torch.tensor(x, dtype=torch.int64) for x in key]
    got = _philox._rounds(*c, *k, 10)
    assert tuple(int(t[0]) for t in got) == expected


def test_philox4_u32_known_answers():
    # counter 0, key 0: Random123's first answer (our counters have c2 = c3 = 0, so only it applies as is)
    out = philox4_u32(torch.tensor(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert out[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counter (ffffffff, ffffffff, 0, 0), key (ffffffff, ffffffff): the seed -1 and counter -1 bit patterns
    assert tuple(philox4_u32(torch.tensor(-1), torch.tensor([-1]))[0].tolist()) == philox4x32_10((M32, M32, 0, 0),
                                                                                                (M32, M32))
    # the rounds argument is honoured
    assert tuple(philox4_u32(0, torch.zeros(1, dtype=torch.int64), n_rounds=7)[0].tolist()) == \
        philox4x32_10((0, 0, 0, 0), (0, 0), 7)


def test_philox_u32_known_answer():
    # counter 0, key 0: first word of Random123's answer
    out = philox_u32(torch.tensor(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert out.dtype == torch.int64
    assert int(out[0]) == 0x6627E8D5
    # counter (ffffffff, ffffffff, 0, 0), key (ffffffff, ffffffff): the seed -1 and offset -1 bit patterns
    got = int(philox_u32(torch.tensor(-1), torch.tensor([-1]))[0])
    assert got == philox4x32_10((M32, M32, 0, 0), (M32, M32))[0]
    # a changed round count changes the answer (the rounds argument is honoured)
    assert int(philox_u32(0, torch.zeros(1, dtype=torch.int64), n_rounds=7)[0]) == philox4x32_10((0, 0, 0, 0), (0, 0), 7)[0]


def _cases(n: int):
    rng = random.Random(torch.initial_seed())
    seeds = [0, 1, 2**32 - 1, 2**32, 2**62 - 1, 2**63 - 1, -1, -(2**63)] + [rng.randrange(-(2**63), 2**63) for _ in range(n)]
    offsets = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**62 + 7, 2**63 - 1]
    offsets += [rng.randrange(0, 2**32) for _ in range(n)] + [rng.randrange(2**32, 2**63) for _ in range(n)]
    return seeds, offsets


def test_philox_u32_matches_independent_implementation():
    seeds, offsets = _cases(12)
    off = torch.tensor(offsets, dtype=torch.int64)
    for seed in seeds:
        got = philox_u32(torch.tensor([seed], dtype=torch.int64), off).tolist()
        want = [philox_word(seed, o) for o in offsets]
        assert got == want, f"seed {seed}"
        assert all(0 <= g < 2**32 for g in got)


def test_philox4_u32_matches_independent_implementation():
    seeds, counters = _cases(12)
    ctr = torch.tensor(counters, dtype=torch.int64)
    for seed in seeds:
        got = philox4_u32(torch.tensor([seed], dtype=torch.int64), ctr)
        assert got.shape == (len(counters), 4) and got.dtype == torch.int64
        assert [tuple(r) for r in got.tolist()] == [philox_words(seed, c) for c in counters], f"seed {seed}"
        assert torch.equal(got[:, 0], philox_u32(torch.tensor([seed]), ctr))  # philox_u32 is the first word


def test_philox4_u32_keeps_counter_shape():
    ctr = torch.arange(12, dtype=torch.int64).view(3, 4) + 2**35
    a = philox4_u32(777, ctr)
    assert a.shape == (3, 4, 4)
    assert torch.equal(a, philox4_u32(torch.tensor([777]), ctr.flatten()).view(3, 4, 4))


def test_philox_u32_accepts_int_seed_and_keeps_offset_shape():
    off = torch.arange(12, dtype=torch.int64).view(3, 4) + 2**33
    a = philox_u32(12345, off)
    b = philox_u32(torch.tensor([12345]), off.flatten()).view(3, 4)
    assert a.shape == (3, 4) and torch.equal(a, b)
    assert a.flatten().tolist() == [philox_word(12345, int(o)) for o in off.flatten()]


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 2), (5, 4), (4, 7), (6, 13), (2, 64), (3, 257)])
def test_dropout_keep_mask_2d_rule(rows, cols):
    """Every element of the view against the rule written out with the pure-Python Philox."""
    seed = 987654321
    words = dropout_words_2d(torch.tensor([seed]), rows, cols, "cpu")
    assert words.shape == (rows, cols)
    assert words.tolist() == [[dropout_word(seed, r, c, cols) for c in range(cols)] for r in range(rows)]
    for p in (0.0, 0.1, 0.5, 0.9):
        want = torch.tensor([[dropout_keep(seed, r, c, cols, p) for c in range(cols)] for r in range(rows)])
        got = dropout_keep_mask_2d(torch.tensor([seed]), rows, cols, p, "cpu")
        assert got.dtype == torch.bool and torch.equal(got, want), p
    assert bool(dropout_keep_mask_2d(seed, rows, cols, 0.0, "cpu").all())  # p = 0 keeps everything


def test_dropout_rule_uses_all_four_words_and_rows_do_not_share_groups():
    seed, cols = -(2**61) + 3, 7  # two groups per row, the second one partial
    w = dropout_words_2d(seed, 3, cols, "cpu")
    for r in range(3):
        assert w[r, :4].tolist() == list(philox_words(seed, 2 * r))
        assert w[r, 4:].tolist() == list(philox_words(seed, 2 * r + 1)[:3])  # word 3 of the group is unused
    # the groups per row, not the row length, place the rows: 8 columns (2 groups) extend the 7-column view,
    # 9 columns (3 groups) move every row but the first
    assert torch.equal(dropout_words_2d(seed, 3, 8, "cpu")[:, :7], w)
    w9 = dropout_words_2d(seed, 3, 9, "cpu")
    assert torch.equal(w9[0, :7], w[0]) and w9[1, :4].tolist() == list(philox_words(seed, 3))


def test_dropout_rule_high_counters():
    """Counters beyond 2**32 (a huge view) use the high word: checked on the rule's element formula."""
    seed, cols = 12345, 10
    for row in (2**30 + 1, 2**31 + 7, 2**40 + 3):
        ctr = torch.tensor([row * 3 + c // 4 for c in range(cols)], dtype=torch.int64)
        got = philox4_u32(seed, ctr).gather(1, (torch.arange(cols) % 4)[:, None])[:, 0]
        assert got.tolist() == [dropout_word(seed, row, c, cols) for c in range(cols)]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_statistics(p):
    """Keep rate 1 - p overall, per word of the call (col % 4), per row and per column; adjacent words of
    one call and the same column of two seeds are independent (6 sigma bounds: failure odds < 1e-8)."""
    rows, cols = 512, 1001  # 251 groups per row, the last one partial
    k = dropout_keep_mask_2d(torch.tensor([2**33 + 99]), rows, cols, p, "cpu").double()
    q = 1 - p

    def near(x, mean, n, var=None):
        var = mean * (1 - mean) if var is None else var
        return abs(x - mean) <= 6 * math.sqrt(var / n) + 1e-12

    assert near(k.mean().item(), q, k.numel())
    for w in range(4):
        kw = k[:, w::4]
        assert near(kw.mean().item(), q, kw.numel()), f"word {w}"
    assert (k.mean(0) - q).abs().max() <= 6 * math.sqrt(p * q / rows)
    assert (k.mean(1) - q).abs().max() <= 6 * math.sqrt(p * q / cols)
    pair = (k[:, 0:1000:4] * k[:, 1:1000:4]).mean().item()  # words 0 and 1 of every full group
    assert near(pair, q * q, rows * 250)
    k2 = dropout_keep_mask_2d(torch.tensor([2**33 + 100]), rows, cols, p, "cpu").double()
    assert near((k * k2).mean().item(), q * q, k.numel())
    assert not torch.equal(k, k2)


def _round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)).__floor__())


def test_dropout_threshold_rounding():
    rng = random.Random(torch.initial_seed())
    ps = [0.0, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 0.999999, 1 - 2**-24]
    ks = [1, 2, 3, 2**23 - 1, 2**23, 2**24 - 2] + [rng.randrange(1, 2**24 - 1) for _ in range(20)]
    ps += [k / 2**24 for k in ks]  # exact: threshold k
    ps += [(k + 0.5) / 2**24 for k in ks]  # exact halves: round up to k + 1
    ps += [(k + 0.5) / 2**24 - 2**-40 for k in ks]  # just below a half: k
    ps += [rng.random() for _ in range(50)]
    for p in ps:
        assert dropout_threshold(p) == _round_half_up(Fraction(p) * 2**24), p
    for k in ks:
        assert dropout_threshold(k / 2**24) == k
        assert dropout_threshold((k + 0.5) / 2**24) == k + 1
        assert dropout_threshold((k + 0.5) / 2**24 - 2**-40) == k
    assert dropout_threshold(0.1) == 1677722  # 1677721.6 rounds up
    assert dropout_threshold(0.0) == 0


def test_new_seed_is_on_device_and_generator_driven():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1, s2 = new_seed("cpu", g1), new_seed("cpu", g2)
    assert s1.dtype == torch.int64 and s1.shape == (1,) and torch.equal(s1, s2)
    assert not torch.equal(new_seed("cpu", g1), s1)  # the generator advanced
    assert 0 <= int(s1) < 2**62


# ----------------------------------------------------------------------------------------------
# Triton's tl.randint4x / tl.randint (what the Triton kernels use) must be bit-identical


def _triton_device():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if HAS_CUDA:
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


_KERNEL = None


def _randint_kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def randint_kernel(seed_ptr, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
            idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = idx < n
            seed = tl.load(seed_ptr)
            off = tl.load(off_ptr + idx, mask=m, other=0)
            r = tl.randint(seed, off)
            tl.store(out_ptr + idx, r.to(tl.int32, bitcast=True), mask=m)

        _KERNEL = randint_kernel
    return _KERNEL


@pytest.mark.skipif(_triton_device() is None, reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
def test_philox_u32_equals_triton_randint():
    dev = _triton_device()
    kern = _randint_kernel()
    seeds, offsets = _cases(6)
    offsets = offsets + list(range(2**32 - 8, 2**32 + 8))
    off = torch.tensor(offsets, dtype=torch.int64, device=dev)
    n, block = off.numel(), 32
    for seed in seeds:
        seed_t = torch.tensor([seed], dtype=torch.int64, device=dev)
        out = torch.empty(n, dtype=torch.int32, device=dev)
        kern[((n + block - 1) // block,)](seed_t, off, out, n, BLOCK=block)
        tri = out.to(torch.int64) & M32
        ours = philox_u32(seed_t, off)
        assert torch.equal(tri.cpu(), ours.cpu()), f"seed {seed}"
        assert tri.cpu().tolist() == [philox_word(seed, o) for o in offsets], f"seed {seed}"


_KERNEL4 = None


def _randint4x_kernel():
    """Writes the four words of tl.randint4x per counter, interleaved the way the attention kernels
    interleave them (interleave(interleave(r0, r2), interleave(r1, r3)) = r0, r1, r2, r3 per counter)."""
    global _KERNEL4
    if _KERNEL4 is None:
        import triton
        import triton.language as tl

        @triton.jit
        def randint4x_kernel(seed_ptr, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
            idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = idx < n
            seed = tl.load(seed_ptr)
            off = tl.load(off_ptr + idx, mask=m, other=0)
            r0, r1, r2, r3 = tl.randint4x(seed, off)
            r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
            o = tl.program_id(0) * 4 * BLOCK + tl.arange(0, 4 * BLOCK)
            tl.store(out_ptr + o, r.to(tl.int32, bitcast=True), mask=o < 4 * n)

        _KERNEL4 = randint4x_kernel
    return _KERNEL4


@pytest.mark.skipif(_triton_device() is None, reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
def test_philox4_u32_equals_triton_randint4x():
    dev = _triton_device()
    kern = _randint4x_kernel()
    seeds, counters = _cases(6)
    counters = counters + list(range(2**32 - 8, 2**32 + 8))
    ctr = torch.tensor(counters, dtype=torch.int64, device=dev)
    n, block = ctr.numel(), 16
    for seed in seeds:
        seed_t = torch.tensor([seed], dtype=torch.int64, device=dev)
        out = torch.empty(4 * n, dtype=torch.int32, device=dev)
        kern[((n + block - 1) // block,)](seed_t, ctr, out, n, BLOCK=block)
        tri = (out.to(torch.int64) & M32).view(n, 4)
        assert torch.equal(tri.cpu(), philox4_u32(seed_t, ctr).cpu()), f"seed {seed}"
        assert [tuple(r) for r in tri.cpu().tolist()] == [philox_words(seed, c) for c in counters], f"seed {seed}"
