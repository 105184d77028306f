"""An independent Philox4x32-10 on Python ints (written from Random123's philox.h) and blipfast's draws and dropout
rule written with it: the ground truth of tests/ops/test_philox.py, the attention references' dropout masks and the
C++ Philox of blipfast._C."""
from __future__ import annotations

from fractions import Fraction

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


def philox_words(seed: int, counter: int) -> tuple[int, int, int, int]:
    """blipfast's draw: counter (counter_lo, counter_hi, 0, 0), key (seed_lo, seed_hi) of the 64-bit
    two's-complement patterns, all four output words."""
    seed &= 2**64 - 1
    counter &= 2**64 - 1
    return philox4x32_10((counter & M32, counter >> 32, 0, 0), (seed & M32, seed >> 32))


def philox_word(seed: int, offset: int) -> int:
    """The first output word of ``philox_words`` (the hard-negative sampler's per-element draw)."""
    return philox_words(seed, offset)[0]


def dropout_word(seed: int, row: int, col: int, cols: int) -> int:
    """The dropout rule's word of element (row, col) of a [rows, cols] view: word col % 4 of the draw with
    counter row * ceil(cols / 4) + col // 4."""
    groups = -(-cols // 4)
    return philox_words(seed, row * groups + col // 4)[col % 4]


def dropout_keep(seed: int, row: int, col: int, cols: int, p: float) -> bool:
    """Keep iff (word >> 8) >= round_half_up(p * 2^24) (exact rational arithmetic)."""
    thr = int((Fraction(p) * 2**24 + Fraction(1, 2)).__floor__())
    return (dropout_word(seed, row, col, cols) >> 8) >= thr
