"""Philox4x32-10 of blipfast/ops/_philox.py: known answers from Random123, an independent pure-Python
Philox, Triton's ``tl.randint`` (interpreter on CPU, CUDA on a GPU) and the dropout threshold rule."""
from __future__ import annotations

import os
import random
from fractions import Fraction

import pytest
import torch

from blipfast.ops._philox import dropout_keep_mask, dropout_threshold, new_seed, philox_u32
from tests.conftest import HAS_CUDA

M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key, rounds: int = 10):
    """Philox4x32 on Python ints, written from Random123's philox.h: the key is bumped BEFORE rounds
    2..R (blipfast bumps after every round, which is the same schedule written differently)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + 0x9E3779B9) & M32
            k1 = (k1 + 0xBB67AE85) & M32
        p0 = 0xD2511F53 * c0  # mulhilo32(PHILOX_M4x32_0, ctr[0])
        p1 = 0xCD9E8D57 * c2  # mulhilo32(PHILOX_M4x32_1, ctr[2])
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def philox_word(seed: int, offset: int) -> int:
    """blipfast's draw: counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi) of the 64-bit
    two's-complement patterns, first output word."""
    seed &= 2**64 - 1
    offset &= 2**64 - 1
    return philox4x32_10((offset & M32, offset >> 32, 0, 0), (seed & M32, seed >> 32))[0]


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


def test_philox_u32_accepts_int_seed_and_keeps_offset_shape():
    off = torch.arange(12, dtype=torch.int64).view(3, 4) + 2**33
    a = philox_u32(12345, off)
    b = philox_u32(torch.tensor([12345]), off.flatten()).view(3, 4)
    assert a.shape == (3, 4) and torch.equal(a, b)
    assert a.flatten().tolist() == [philox_word(12345, int(o)) for o in off.flatten()]


def test_dropout_keep_mask_rule():
    seed, offsets = 987654321, torch.arange(2**32 - 100, 2**32 + 100, dtype=torch.int64)
    for p in (0.0, 0.1, 0.5, 0.9):
        thr = dropout_threshold(p)
        want = torch.tensor([(philox_word(seed, int(o)) >> 8) >= thr for o in offsets])
        assert torch.equal(dropout_keep_mask(torch.tensor([seed]), offsets, p), want)
    assert bool(dropout_keep_mask(torch.tensor([seed]), offsets, 0.0).all())  # p = 0 keeps everything


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
# Triton's tl.randint (what the Triton kernels use) must be bit-identical


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
