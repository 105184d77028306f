// Philox4x32-10, bit-identical to blipfast/ops/_philox.py and to Triton's tl.randint:
// counter = (offset_lo, offset_hi, 0, 0), key = (seed_lo, seed_hi), first 32-bit output word.
// Host-callable too, so the CPU build of the debug op checks this very code against the torch version.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define BLIPFAST_HD __host__ __device__ __forceinline__
#else
#define BLIPFAST_HD inline
#endif

namespace blipfast {

BLIPFAST_HD uint32_t philox_u32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
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
  return c0;
}

// 24-bit dropout threshold: drop iff (philox >> 8) < threshold, threshold = round(p * 2^24).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0 + 0.5); }

BLIPFAST_HD bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold) {
  return (philox_u32(seed, offset) >> 8) >= threshold;
}

}  // namespace blipfast
