// Post-LN block epilogue  y = LayerNorm(dropout(x + bias) + residual)  — forward and backward: what their files
// share (the contract, device helpers, kernel parameters, the launch entry points).
//
// Contract (blipfast/ops/layernorm_epilogue.py, whose torch implementation _fwd_torch/_bwd_torch is the
// specification): x, residual [R, N] contiguous, one dtype in {fp32, fp16, bf16}; bias (optional),
// weight, ln_bias [N] fp32; all math in fp32. Forward returns y and the pre-norm sum z (x's dtype) and
// the fp32 row statistics mean, rstd. The statistics and y are those of z as stored (the fp32 sum rounded
// to x's dtype): backward sees only the stored z, and statistics of the unrounded sum would make its
// xhat = (z - mean) * rstd inconsistent (for N = 1, rstd = 1/sqrt(eps) times a rounding error). Backward regenerates the dropout mask from the same
// Philox stream (the rule of csrc/philox.cuh on the [R, N] view: element (r, c) uses word c % 4 of
// philox4_u32(seed, r * ceil(N / 4) + c / 4)) and returns dx (empty when
// dropout_p == 0: then dx == dresidual), dresidual, and the fp32 column sums dweight, dln_bias, dbias,
// reduced deterministically (per-block partials, then a fixed-order second pass; no atomics).
//
// Paths:
//   register  N <= 16384 forward, N <= 4096 backward: TPR threads per row (a warp up to N = 1024 in
//             forward / 512 in backward, then 2..16 warps), each thread holding ITERS vectors of VEC
//             elements in registers, so x and residual are read once and y, z written once. 16-byte
//             loads/stores when N is a multiple of the vector width and every pointer is 16-byte
//             aligned, scalar otherwise. Columns a thread does not own are predicated off.
//   general   any N: one 512-thread block per row that recomputes z in each of its passes (forward), a
//             row pass plus a column pass (backward).
// Dropout: one Philox call per group of 4 columns, all four words used (philox.cuh). The vectorised
// register path owns whole groups per thread (VEC = 4 or 8 consecutive columns); the scalar register path
// (a thread's columns are TPR apart) has each lane draw one group for its warp and shares the bits with
// warp ballots; the general path gives each thread whole groups. The bits are drawn in rolled loops (the
// Philox code exists once per kernel instead of once per element: much smaller kernels, much faster
// builds). The seed is read from device memory: no host sync, CUDA-graph capturable.
//
// Files: layernorm_epilogue.cuh (this), layernorm_epilogue_fwd.cu (forward kernels and their launch tuning),
// layernorm_epilogue_bwd.cu (backward kernels, the column reduction and their launch tuning), layernorm_epilogue.cu
// (host argument checks, the two ops, their registration).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "philox.cuh"

namespace blipfast {
namespace ln_epilogue {

constexpr int kWarp = 32;
constexpr int kGeneralThreads = 512;
constexpr int kFwdElems = 32;  // elements per thread, register path (one 32-bit word of dropout bits)
constexpr int kBwdElems = 16;  // backward keeps five arrays of them: 80 registers, 2 blocks of 256 per SM

// ----------------------------------------------------------------------------------------------
// device helpers

template <typename T, int V>
struct alignas(sizeof(T) * V >= 16 ? 16 : sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void st(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // butterfly: every lane ends with the bitwise-same sum
}

// Sum of NV values over the TPR threads of one row (RPB rows per block); every thread of the row gets
// the same result. When a row spans several warps this synchronises the block, so every thread of the
// block must call it.
template <int TPR, int RPB, int NV>
__device__ __forceinline__ void row_sum(float (&v)[NV], float* red /*[RPB][TPR / 32][NV]*/, int rib, int lane) {
  constexpr int kWarps = TPR / kWarp;
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = warp_sum(v[k]);
  if constexpr (kWarps > 1) {
    if (lane % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) red[(rib * kWarps + lane / kWarp) * NV + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float s = red[rib * kWarps * NV + k];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) s += red[(rib * kWarps + w) * NV + k];
      v[k] = s;
    }
    __syncthreads();  // red is reused right after
  }
}

// Row statistics, the corrected two-pass rule (the torch implementation's _row_stats): with m0 = sum(z) / n
// and d = z - m0, sums[0] = sum(d) and sums[1] = sum(d * (d / n)) give mean = m0 + sum(d) / n (exactly c for
// a row of one value c, where m0 can be an ulp off and eps = 1e-12 would multiply that ulp by 1e6) and
// var = sum(d * (d / n)) - (sum(d) / n)^2 (d / n first: no overflow of the sum for |d| up to ~1e20; beyond,
// var = inf and rstd = 0, not inf - inf), never below 0 (NaN stays NaN: no fmaxf).
__device__ __forceinline__ float2 row_mean_rstd(float m0, const float (&sums)[2], float n, float eps) {
  const float m1 = sums[0] / n;
  float var = isinf(sums[1]) ? sums[1] : sums[1] - m1 * m1;
  var = var < 0.f ? 0.f : var;
  return make_float2(m0 + m1, rsqrtf(var + eps));
}

// Dropout keep bits of a thread's ITERS * VEC elements of row `row` (n columns): bit it * VEC + j <-> column
// (it * TPR + lane) * VEC + j, 0 for the columns >= n. The rule of philox.cuh: column c uses word c % 4 of the
// call with counter row * ceil(n / 4) + c / 4. Rolled loops: the Philox rounds are emitted once.
//   VEC % 4 == 0  a thread's VEC columns of an iteration start at a multiple of VEC: VEC / 4 whole groups,
//                 one call each (ITERS * VEC / 4 calls per thread).
//   VEC == 1      a thread's columns are TPR apart. A warp's 32 lanes hold 32 consecutive columns (8 groups)
//                 per iteration, so 4 iterations need 32 groups: lane s draws group s % 8 of iteration
//                 4a + s / 8, and lane l reads its bit of iteration 4a + t from lane 8t + l / 4, word l % 4,
//                 through 4 ballots (ITERS / 4 calls per thread). Warp-collective: all 32 lanes of the warp
//                 must call it (callers branch on conditions uniform per row, and TPR % 32 == 0).
template <int VEC, int ITERS, int TPR>
__device__ __forceinline__ uint32_t keep_bits(uint64_t seed, int64_t row, int lane, int n, uint32_t threshold) {
  static_assert(ITERS * VEC <= 32, "one 32-bit word of keep bits per thread");
  static_assert(VEC == 1 || VEC % 4 == 0, "a thread owns whole dropout groups, or one column per iteration");
  const int64_t grp0 = row * dropout_groups(n);  // counter of the row's first group
  uint32_t bits = 0u;
  if constexpr (VEC % 4 == 0) {
    constexpr int kGpi = VEC / 4;  // groups per iteration
#pragma unroll 1
    for (int e = 0; e < ITERS * kGpi; ++e) {
      const int col = ((e / kGpi) * TPR + lane) * VEC + (e % kGpi) * 4;  // the group's first column
      if (col < n) {
        const uint32_t left = static_cast<uint32_t>(n - col);  // >= 1
        const uint32_t in_row = left >= 4u ? 0xFu : (1u << left) - 1u;
        bits |= (dropout_keep4(seed, static_cast<uint64_t>(grp0 + col / 4), threshold) & in_row) << (4 * e);
      }
    }
  } else {
    static_assert(TPR % kWarp == 0 && ITERS % 4 == 0, "warp-cooperative draws: whole warps, 4 iterations a batch");
    const int l = lane % kWarp;
    const int wbase = lane - l;  // column offset of this warp's lanes within an iteration
#pragma unroll 1
    for (int a = 0; a < ITERS / 4; ++a) {
      // this lane draws group l % 8 of the warp's columns in iteration 4a + l / 8
      const int gcol = (4 * a + l / 8) * TPR + wbase + 4 * (l % 8);  // that group's first column
      const uint32_t nib =
          gcol < n ? dropout_keep4(seed, static_cast<uint64_t>(grp0 + gcol / 4), threshold) : 0u;
      // bw: bit s = word l % 4 of the group drawn by lane s (this lane's column (4a + t) * TPR + lane is
      // word l % 4 of its group, drawn by lane 8t + l / 4)
      uint32_t bw = 0u;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t b = __ballot_sync(0xffffffffu, (nib >> w) & 1u);
        if (w == l % 4) bw = b;
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int col = (4 * a + t) * TPR + lane;
        if (col < n) bits |= ((bw >> (8 * t + l / 4)) & 1u) << (4 * a + t);
      }
    }
  }
  return bits;
}

// ----------------------------------------------------------------------------------------------
// parameters

struct FwdParams {
  const void* x;
  const float* bias;  // nullable
  const void* res;
  const float* w;
  const float* lb;
  const int64_t* seed;  // read only when dropout
  void* y;
  void* z;
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t n;
  float eps;
  uint32_t threshold;
  float scale;
  bool dropout;
};

struct BwdParams {
  const void* dy;
  const void* z;
  const float* mean;
  const float* rstd;
  const float* w;
  const int64_t* seed;
  void* dx;  // nullptr when !dropout
  void* dres;
  float* part;  // [3][P][n]: partial sums of dweight, dln_bias, dbias
  float2* ab;   // general path: per row (mean(g), mean(g * xhat))
  int64_t P;
  int64_t rows;
  int64_t n;
  uint32_t threshold;
  float scale;
  bool dropout;
};

template <int TPR>
constexpr int fwd_rpb() { return TPR >= 128 ? 1 : 128 / TPR; }  // rows per block
template <int TPR>
constexpr int bwd_rpb() { return TPR >= 256 ? 1 : 256 / TPR; }

// ----------------------------------------------------------------------------------------------
// launches (host side): each path picks the smallest TPR (threads per row) whose TPR * elements-per-thread
// covers N

template <int... Is>
struct IntList {};

struct Launch {
  cudaStream_t stream;
  int sms;
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

#define BLIPFAST_DISPATCH_LN(st, NAME, ...)                                                      \
  switch (st) {                                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                          \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }                        \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }                \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", st);                              \
  }

// the forward kernels for x's dtype st (layernorm_epilogue_fwd.cu)
void launch_fwd(at::ScalarType st, const FwdParams& p, const Launch& L);
// the backward kernels for z's dtype st, then the fixed-order column reduction into dweight, dln_bias, dbias
// (layernorm_epilogue_bwd.cu); fopt: float32 options on z's device, for the partial sums
void launch_bwd(at::ScalarType st, BwdParams p, const Launch& L, const at::TensorOptions& fopt, float* dweight,
                float* dln_bias, float* dbias);

}  // namespace ln_epilogue
}  // namespace blipfast
