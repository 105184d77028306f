// Philox4x32-10, bit-identical to blipfast/ops/_philox.py and to Triton's tl.randint4x / tl.randint:
// counter = (counter_lo, counter_hi, 0, 0), key = (seed_lo, seed_hi) of a 64-bit counter and a 64-bit seed.
//
//   philox4_u32(seed, counter)  all four 32-bit output words (one call = ~70 integer instructions);
//   philox_u32(seed, counter)   the first word only (the hard-negative sampler draws one per element).
//
// Dropout uses all four words of each call. A dropout site has a logical 2-D view [rows, cols] (the
// LayerNorm epilogue: [R, N]); with G4 = ceil(cols / 4) groups per row, element (row, col) uses word
// col % 4 of philox4_u32(seed, row * G4 + col / 4) and is kept iff (word >> 8) >= threshold, threshold =
// round_half_up(p * 2^24). Groups never straddle rows: 4 consecutive columns starting at a multiple of 4
// cost one call.
// Host-callable too, so the CPU build of the debug ops checks this very code against the torch version.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define BLIPFAST_HD __host__ __device__ __forceinline__
#else
#define BLIPFAST_HD inline
#endif

namespace blipfast {

struct Philox4 {
  uint32_t w[4];  // index it with compile-time constants only in device code (else it goes to local memory)
};

BLIPFAST_HD Philox4 philox4_u32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

BLIPFAST_HD uint32_t philox_u32(uint64_t seed, uint64_t counter) { return philox4_u32(seed, counter).w[0]; }

// 24-bit dropout threshold: drop iff (word >> 8) < threshold, threshold = round(p * 2^24).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0 + 0.5); }

// Keep bits of the 4 columns of dropout group `counter` (= row * G4 + col / 4): bit w <-> column 4 * (col / 4) + w.
BLIPFAST_HD uint32_t dropout_keep4(uint64_t seed, uint64_t counter, uint32_t threshold) {
  const Philox4 r = philox4_u32(seed, counter);
  return static_cast<uint32_t>((r.w[0] >> 8) >= threshold) | (static_cast<uint32_t>((r.w[1] >> 8) >= threshold) << 1) |
         (static_cast<uint32_t>((r.w[2] >> 8) >= threshold) << 2) |
         (static_cast<uint32_t>((r.w[3] >> 8) >= threshold) << 3);
}

// Number of dropout groups of a row of n columns.
BLIPFAST_HD int64_t dropout_groups(int64_t n) { return (n + 3) / 4; }

}  // namespace blipfast
