// Post-LN block epilogue  y = LayerNorm(dropout(x + bias) + residual)  — forward and backward.
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
// Only c10's CUDA headers (stream, guard, checks): ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart, as on the CI machines) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "philox.cuh"

namespace blipfast {
namespace {

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
// forward, register path

template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(TPR * fwd_rpb<TPR>()) ln_fwd_reg_kernel(const FwdParams p) {
  constexpr int ITERS = kFwdElems / VEC;
  constexpr int RPB = fwd_rpb<TPR>();
  __shared__ float red[RPB * (TPR / kWarp) * 2];
  const int lane = threadIdx.x % TPR;
  const int rib = threadIdx.x / TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + rib;
  const bool valid = row < p.rows;
  if constexpr (TPR == kWarp) {
    if (!valid) return;  // a whole warp, and no block-wide barrier below
  }
  const int n = static_cast<int>(p.n);
  const int64_t base = valid ? row * p.n : 0;

  Pack<T, VEC> xs[ITERS], rs[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * TPR + lane) * VEC;
    if (valid && col < n) {
      xs[it] = ld<T, VEC>(static_cast<const T*>(p.x) + base + col);
      rs[it] = ld<T, VEC>(static_cast<const T*>(p.res) + base + col);
    }
  }
  // (dropout and valid are uniform over the row's warps: keep_bits may be warp-collective)
  const uint32_t keep = p.dropout && valid
      ? keep_bits<VEC, ITERS, TPR>(static_cast<uint64_t>(*p.seed), row, lane, n, p.threshold) : ~0u;

  float v[ITERS][VEC];
  float s[1] = {0.f};
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * TPR + lane) * VEC;
    if (valid && col < n) {
      Pack<float, VEC> bv;
      if (p.bias != nullptr) {
        bv = ld<float, VEC>(p.bias + col);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) bv.v[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float h = static_cast<float>(xs[it].v[j]) + bv.v[j];
        if (p.dropout) h *= (keep >> (it * VEC + j)) & 1u ? p.scale : 0.f;
        v[it][j] = static_cast<float>(static_cast<T>(h + static_cast<float>(rs[it].v[j])));  // z as stored
        s[0] += v[it][j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[it][j] = 0.f;
    }
  }
  row_sum<TPR, RPB, 1>(s, red, rib, lane);
  const float m0 = s[0] / static_cast<float>(n);
  const float inv_n = 1.f / static_cast<float>(n);

  float sq[2] = {0.f, 0.f};
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * TPR + lane) * VEC;
    if (valid && col < n) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[it][j] - m0;
        sq[0] += d;
        sq[1] += d * (d * inv_n);
      }
    }
  }
  row_sum<TPR, RPB, 2>(sq, red, rib, lane);
  const float2 stats = row_mean_rstd(m0, sq, static_cast<float>(n), p.eps);
  const float mean = stats.x, rstd = stats.y;
  if (!valid) return;  // after the last barrier
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int col = (it * TPR + lane) * VEC;
    if (col < n) {
      const Pack<float, VEC> wv = ld<float, VEC>(p.w + col);
      const Pack<float, VEC> lv = ld<float, VEC>(p.lb + col);
      Pack<T, VEC> yv, zv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        yv.v[j] = static_cast<T>((v[it][j] - mean) * rstd * wv.v[j] + lv.v[j]);
        zv.v[j] = static_cast<T>(v[it][j]);
      }
      st<T, VEC>(static_cast<T*>(p.y) + base + col, yv);
      st<T, VEC>(static_cast<T*>(p.z) + base + col, zv);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// forward, general path: one block per row, z recomputed in each pass (two-pass statistics, row_mean_rstd); each
// thread owns whole dropout groups (4 consecutive columns, one Philox call)

// z of the columns 4g .. 4g + 3 of a row (grp0: the row's first Philox counter); 0 for columns >= n
template <typename T>
__device__ __forceinline__ void fwd_z4(const FwdParams& p, int64_t base, int64_t grp0, int64_t g, uint64_t seed,
                                       float (&zz)[4]) {
  const uint32_t keep = p.dropout ? dropout_keep4(seed, static_cast<uint64_t>(grp0 + g), p.threshold) : 0xFu;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int64_t c = 4 * g + w;
    zz[w] = 0.f;
    if (c < p.n) {
      float h = static_cast<float>(static_cast<const T*>(p.x)[base + c]) + (p.bias != nullptr ? p.bias[c] : 0.f);
      if (p.dropout) h *= (keep >> w) & 1u ? p.scale : 0.f;
      zz[w] = static_cast<float>(static_cast<T>(h + static_cast<float>(static_cast<const T*>(p.res)[base + c])));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGeneralThreads) ln_fwd_general_kernel(const FwdParams p) {
  __shared__ float red[(kGeneralThreads / kWarp) * 2];
  const int64_t row = blockIdx.x;
  const int64_t base = row * p.n;
  const int64_t g4 = dropout_groups(p.n);
  const int64_t grp0 = row * g4;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0ull;
  float s[1] = {0.f};
  for (int64_t g = threadIdx.x; g < g4; g += kGeneralThreads) {
    float zz[4];
    fwd_z4<T>(p, base, grp0, g, seed, zz);
#pragma unroll
    for (int w = 0; w < 4; ++w) s[0] += zz[w];  // 0 past the row's end
  }
  row_sum<kGeneralThreads, 1, 1>(s, red, 0, threadIdx.x);
  const float m0 = s[0] / static_cast<float>(p.n);
  const float inv_n = 1.f / static_cast<float>(p.n);
  float sq[2] = {0.f, 0.f};
  for (int64_t g = threadIdx.x; g < g4; g += kGeneralThreads) {
    float zz[4];
    fwd_z4<T>(p, base, grp0, g, seed, zz);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (4 * g + w < p.n) {
        const float d = zz[w] - m0;
        sq[0] += d;
        sq[1] += d * (d * inv_n);
      }
    }
  }
  row_sum<kGeneralThreads, 1, 2>(sq, red, 0, threadIdx.x);
  const float2 stats = row_mean_rstd(m0, sq, static_cast<float>(p.n), p.eps);
  const float mean = stats.x, rstd = stats.y;
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
  for (int64_t g = threadIdx.x; g < g4; g += kGeneralThreads) {
    float zz[4];
    fwd_z4<T>(p, base, grp0, g, seed, zz);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t c = 4 * g + w;
      if (c < p.n) {
        static_cast<T*>(p.y)[base + c] = static_cast<T>((zz[w] - mean) * rstd * p.w[c] + p.lb[c]);
        static_cast<T*>(p.z)[base + c] = static_cast<T>(zz[w]);
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// backward, register path: row-local dz and dx; column partials in registers over a grid-stride loop

template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(TPR * bwd_rpb<TPR>(), 2) ln_bwd_reg_kernel(const BwdParams p) {
  constexpr int ITERS = kBwdElems / VEC;
  constexpr int RPB = bwd_rpb<TPR>();
  __shared__ float red[RPB * (TPR / kWarp) * 2];
  extern __shared__ float colbuf[];  // [RPB][n], only when RPB > 1
  const int lane = threadIdx.x % TPR;
  const int rib = threadIdx.x / TPR;
  const int n = static_cast<int>(p.n);
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0ull;

  float dw[ITERS][VEC], dlb[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[it][j] = dlb[it][j] = db[it][j] = 0.f;
  }

  // every thread of the block runs the same iterations (barriers inside)
  for (int64_t rg = blockIdx.x; rg * RPB < p.rows; rg += gridDim.x) {
    const int64_t row = rg * RPB + rib;
    const bool valid = row < p.rows;
    const int64_t base = valid ? row * p.n : 0;
    const float m = valid ? p.mean[row] : 0.f;
    const float rs = valid ? p.rstd[row] : 0.f;
    float xh[ITERS][VEC], g[ITERS][VEC];
    float s[2] = {0.f, 0.f};
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (valid && col < n) {
        const Pack<T, VEC> dyv = ld<T, VEC>(static_cast<const T*>(p.dy) + base + col);
        const Pack<T, VEC> zv = ld<T, VEC>(static_cast<const T*>(p.z) + base + col);
        const Pack<float, VEC> wv = ld<float, VEC>(p.w + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = static_cast<float>(dyv.v[j]);
          xh[it][j] = (static_cast<float>(zv.v[j]) - m) * rs;
          g[it][j] = d * wv.v[j];
          s[0] += g[it][j];
          s[1] += g[it][j] * xh[it][j];
          dw[it][j] += d * xh[it][j];
          dlb[it][j] += d;
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xh[it][j] = g[it][j] = 0.f;
      }
    }
    // (dropout and valid are uniform over the row's warps: keep_bits may be warp-collective)
    const uint32_t keep = p.dropout && valid ? keep_bits<VEC, ITERS, TPR>(seed, row, lane, n, p.threshold) : ~0u;
    row_sum<TPR, RPB, 2>(s, red, rib, lane);
    const float a = s[0] / static_cast<float>(n);
    const float b = s[1] / static_cast<float>(n);
    if (valid) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int col = (it * TPR + lane) * VEC;
        if (col < n) {
          Pack<T, VEC> dzv, dxv;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float dz = rs * ((g[it][j] - a) - xh[it][j] * b);
            dzv.v[j] = static_cast<T>(dz);
            if (p.dropout) {
              const float d = (keep >> (it * VEC + j)) & 1u ? dz * p.scale : dz * 0.f;
              dxv.v[j] = static_cast<T>(d);
              db[it][j] += d;
            } else {
              db[it][j] += dz;
            }
          }
          st<T, VEC>(static_cast<T*>(p.dres) + base + col, dzv);
          if (p.dropout) st<T, VEC>(static_cast<T*>(p.dx) + base + col, dxv);
        }
      }
    }
  }

  // this block's column partials -> part[q][blockIdx.x][:]
  if constexpr (RPB == 1) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * TPR + lane) * VEC;
      if (col < n) {
        Pack<float, VEC> a0, a1, a2;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          a0.v[j] = dw[it][j];
          a1.v[j] = dlb[it][j];
          a2.v[j] = db[it][j];
        }
        st<float, VEC>(p.part + (0 * p.P + blockIdx.x) * p.n + col, a0);
        st<float, VEC>(p.part + (1 * p.P + blockIdx.x) * p.n + col, a1);
        st<float, VEC>(p.part + (2 * p.P + blockIdx.x) * p.n + col, a2);
      }
    }
  } else {
    // the RPB rows of the block hold partials of the same columns: add them in a fixed order
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      __syncthreads();
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int col = (it * TPR + lane) * VEC;
        if (col < n) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            colbuf[rib * n + col + j] = q == 0 ? dw[it][j] : (q == 1 ? dlb[it][j] : db[it][j]);
        }
      }
      __syncthreads();
      float* out = p.part + (q * p.P + blockIdx.x) * p.n;
      for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float acc = colbuf[c];
#pragma unroll
        for (int r = 1; r < RPB; ++r) acc += colbuf[r * n + c];
        out[c] = acc;
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// backward, general path

template <typename T>
__global__ void __launch_bounds__(kGeneralThreads) ln_bwd_general_row_kernel(const BwdParams p) {
  __shared__ float red[(kGeneralThreads / kWarp) * 2];
  const int64_t row = blockIdx.x;
  const int64_t base = row * p.n;
  const T* __restrict__ dy = static_cast<const T*>(p.dy) + base;
  const T* __restrict__ z = static_cast<const T*>(p.z) + base;
  const float m = p.mean[row], rs = p.rstd[row];
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0ull;
  float s[2] = {0.f, 0.f};
  for (int64_t c = threadIdx.x; c < p.n; c += kGeneralThreads) {
    const float xh = (static_cast<float>(z[c]) - m) * rs;
    const float g = static_cast<float>(dy[c]) * p.w[c];
    s[0] += g;
    s[1] += g * xh;
  }
  row_sum<kGeneralThreads, 1, 2>(s, red, 0, threadIdx.x);
  const float a = s[0] / static_cast<float>(p.n);
  const float b = s[1] / static_cast<float>(p.n);
  if (threadIdx.x == 0) p.ab[row] = make_float2(a, b);
  // dz and dx: each thread owns whole dropout groups (4 consecutive columns, one Philox call)
  const int64_t g4 = dropout_groups(p.n);
  for (int64_t gi = threadIdx.x; gi < g4; gi += kGeneralThreads) {
    const uint32_t keep = p.dropout ? dropout_keep4(seed, static_cast<uint64_t>(row * g4 + gi), p.threshold) : 0xFu;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t c = 4 * gi + w;
      if (c < p.n) {
        const float xh = (static_cast<float>(z[c]) - m) * rs;
        const float g = static_cast<float>(dy[c]) * p.w[c];
        const float dz = rs * ((g - a) - xh * b);
        static_cast<T*>(p.dres)[base + c] = static_cast<T>(dz);
        if (p.dropout) static_cast<T*>(p.dx)[base + c] = static_cast<T>((keep >> w) & 1u ? dz * p.scale : dz * 0.f);
      }
    }
  }
}

constexpr int kColX = 32, kColY = 8;
constexpr int kColCols = 4 * kColX;  // columns of a column-partials block: each thread owns one dropout group

// column partial sums of kColCols columns over the rows of split blockIdx.y (of P splits); thread x owns the
// 4 columns of dropout group blockIdx.x * kColX + x (one Philox call per row for all four)
template <typename T>
__global__ void __launch_bounds__(kColX * kColY) ln_bwd_general_col_kernel(const BwdParams p) {
  __shared__ float sm[3][kColY][4][kColX + 1];  // [quantity][row slice][column in group][group]
  const int64_t gi = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;  // the thread's dropout group
  const int64_t c0 = 4 * gi;                                                   // its first column
  const int64_t g4 = dropout_groups(p.n);
  const int64_t chunk = (p.rows + p.P - 1) / p.P;
  const int64_t r0 = blockIdx.y * chunk;
  const int64_t r1 = r0 + chunk < p.rows ? r0 + chunk : p.rows;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0ull;
  float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f}, acc2[4] = {0.f, 0.f, 0.f, 0.f};
  if (c0 < p.n) {
    float w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = c0 + j < p.n ? p.w[c0 + j] : 0.f;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColY) {
      const uint32_t keep = p.dropout ? dropout_keep4(seed, static_cast<uint64_t>(r * g4 + gi), p.threshold) : 0xFu;
      const float rs = p.rstd[r];
      const float m = p.mean[r];
      const float2 ab = p.ab[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (c0 + j < p.n) {
          const int64_t off = r * p.n + c0 + j;
          const float d = static_cast<float>(static_cast<const T*>(p.dy)[off]);
          const float xh = (static_cast<float>(static_cast<const T*>(p.z)[off]) - m) * rs;
          const float dz = rs * ((d * w[j] - ab.x) - xh * ab.y);
          acc0[j] += d * xh;
          acc1[j] += d;
          if (p.dropout) {
            acc2[j] += (keep >> j) & 1u ? dz * p.scale : dz * 0.f;
          } else {
            acc2[j] += dz;
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    sm[0][threadIdx.y][j][threadIdx.x] = acc0[j];
    sm[1][threadIdx.y][j][threadIdx.x] = acc1[j];
    sm[2][threadIdx.y][j][threadIdx.x] = acc2[j];
  }
  __syncthreads();
  if (threadIdx.y < 3) {
    const int q = threadIdx.y;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c0 + j < p.n) {
        float t = sm[q][0][j][threadIdx.x];
#pragma unroll
        for (int i = 1; i < kColY; ++i) t += sm[q][i][j][threadIdx.x];
        p.part[(q * p.P + blockIdx.y) * p.n + c0 + j] = t;
      }
    }
  }
}

// out_q[c] = sum over the P partial rows of part[q][.][c], in a fixed order (deterministic)
__global__ void __launch_bounds__(kColX * kColY)
col_reduce_kernel(const float* __restrict__ part, int64_t P, int64_t n, float* __restrict__ o0,
                  float* __restrict__ o1, float* __restrict__ o2) {
  __shared__ float sm[kColY][kColX + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  const int q = blockIdx.y;
  float acc = 0.f;
  if (c < n) {
    for (int64_t r = threadIdx.y; r < P; r += kColY) acc += part[(q * P + r) * n + c];
  }
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t = sm[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < kColY; ++i) t += sm[i][threadIdx.x];
    (q == 0 ? o0 : (q == 1 ? o1 : o2))[c] = t;
  }
}

// ----------------------------------------------------------------------------------------------
// host side: pick the smallest TPR whose TPR * elements-per-thread covers N

template <int... Is>
struct IntList {};

// threads per row: the vectorised path has every power of two from a warp to 512, the scalar one fewer
template <int VEC>
using FwdTpr = std::conditional_t<VEC == 1, IntList<32, 128, 512>, IntList<32, 64, 128, 256, 512>>;
template <int VEC>
using BwdTpr = std::conditional_t<VEC == 1, IntList<32, 256>, IntList<32, 64, 128, 256>>;

// number of SMs of a device, cached (a host-side attribute query: no stream work, capture-safe)
int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

struct Launch {
  cudaStream_t stream;
  int sms;
};

template <typename T, int VEC, int TPR, int... Ts>
bool fwd_try(const FwdParams& p, const Launch& L, IntList<TPR, Ts...>) {
  if (p.n <= static_cast<int64_t>(TPR) * kFwdElems) {
    constexpr int RPB = fwd_rpb<TPR>();
    const int64_t blocks = (p.rows + RPB - 1) / RPB;
    ln_fwd_reg_kernel<T, VEC, TPR><<<static_cast<unsigned>(blocks), TPR * RPB, 0, L.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  if constexpr (sizeof...(Ts) > 0) {
    return fwd_try<T, VEC>(p, L, IntList<Ts...>{});
  } else {
    return false;
  }
}

template <typename T, int VEC, int TPR, int... Ts>
bool bwd_try(BwdParams p, const Launch& L, at::Tensor& part, IntList<TPR, Ts...>) {
  if (p.n <= static_cast<int64_t>(TPR) * kBwdElems) {
    constexpr int RPB = bwd_rpb<TPR>();
    const size_t smem = RPB > 1 ? static_cast<size_t>(RPB) * p.n * sizeof(float) : 0;  // <= 16 KiB
    // 2 blocks per SM (what __launch_bounds__ guarantees): a grid fixed by the device alone keeps the
    // column sums deterministic, and no occupancy query runs inside a CUDA-graph capture
    const int64_t groups = (p.rows + RPB - 1) / RPB;
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(groups, 2LL * L.sms));
    part = at::empty({3, grid, p.n}, part.options());
    p.part = part.data_ptr<float>();
    p.P = grid;
    ln_bwd_reg_kernel<T, VEC, TPR><<<static_cast<unsigned>(grid), TPR * RPB, smem, L.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  if constexpr (sizeof...(Ts) > 0) {
    return bwd_try<T, VEC>(p, L, part, IntList<Ts...>{});
  } else {
    return false;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T>
void fwd_launch(const FwdParams& p, const Launch& L) {
  constexpr int V = vec_width<T>();
  const bool vec_ok = p.n % V == 0 && aligned16(p.x) && aligned16(p.res) && aligned16(p.y) && aligned16(p.z) &&
                      aligned16(p.w) && aligned16(p.lb) && (p.bias == nullptr || aligned16(p.bias));
  if (vec_ok && fwd_try<T, V>(p, L, FwdTpr<V>{})) return;
  if (fwd_try<T, 1>(p, L, FwdTpr<1>{})) return;
  ln_fwd_general_kernel<T><<<static_cast<unsigned>(p.rows), kGeneralThreads, 0, L.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bwd_launch(BwdParams p, const Launch& L, at::Tensor& part) {
  constexpr int V = vec_width<T>();
  const bool vec_ok = p.n % V == 0 && aligned16(p.dy) && aligned16(p.z) && aligned16(p.w) && aligned16(p.dres) &&
                      (p.dx == nullptr || aligned16(p.dx));
  if (vec_ok && bwd_try<T, V>(p, L, part, BwdTpr<V>{})) return;
  if (bwd_try<T, 1>(p, L, part, BwdTpr<1>{})) return;
  // general: a row pass (dz, dx, per-row a and b), then column partials over P row splits
  at::Tensor ab = at::empty({p.rows, 2}, part.options());
  p.ab = reinterpret_cast<float2*>(ab.data_ptr<float>());
  ln_bwd_general_row_kernel<T><<<static_cast<unsigned>(p.rows), kGeneralThreads, 0, L.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t col_blocks = (p.n + kColCols - 1) / kColCols;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({p.rows, (4LL * L.sms + col_blocks - 1) / col_blocks, 65535}));
  part = at::empty({3, splits, p.n}, part.options());
  p.part = part.data_ptr<float>();
  p.P = splits;
  ln_bwd_general_col_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits)),
                                 dim3(kColX, kColY), 0, L.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------------------------
// validation

void check_param(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "blipfast_C: ", name, " is on ", t.device(), " but x is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "blipfast_C: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "blipfast_C: ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "blipfast_C: ", name, " must be contiguous");
}

void check_act(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "blipfast_C: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "blipfast_C: ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "blipfast_C: ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "blipfast_C: ", name, " must be contiguous");
}

const int64_t* check_seed(const std::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& ref) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "blipfast_C: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return nullptr;
  TORCH_CHECK(seed.has_value(), "blipfast_C: dropout_p > 0 needs a seed (int64 tensor with one element)");
  const at::Tensor& s = *seed;
  TORCH_CHECK(s.device() == ref.device(), "blipfast_C: seed is on ", s.device(), " but the inputs are on ", ref.device());
  TORCH_CHECK(s.scalar_type() == at::kLong, "blipfast_C: seed must be int64, got ", s.scalar_type());
  TORCH_CHECK(s.numel() == 1, "blipfast_C: seed must have exactly one element, got shape ", s.sizes());
  return s.data_ptr<int64_t>();
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "blipfast_C: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "blipfast_C: ", name, " must be 2-D [rows, N], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "blipfast_C: ", name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(1) > 0, "blipfast_C: ", name, " must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), "blipfast_C: ", name, " rows longer than 2^31 are not supported");
  TORCH_CHECK(x.is_contiguous(), "blipfast_C: ", name, " must be contiguous");
}

#define BLIPFAST_DISPATCH_LN(st, NAME, ...)                                                      \
  switch (st) {                                                                                 \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                          \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }                        \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }                \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", st);                              \
  }

// ----------------------------------------------------------------------------------------------
// ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_epilogue_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& ln_bias, const std::optional<at::Tensor>& seed, double eps, double dropout_p) {
  check_x(x, "x");
  check_act(residual, "residual", x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  check_param(weight, "weight", n, x);
  check_param(ln_bias, "ln_bias", n, x);
  if (bias.has_value()) check_param(*bias, "bias", n, x);
  // the math is fp32: an eps below the smallest normal float32 would be a subnormal or 0 there (a constant row:
  // rsqrt(0) = inf, 0 * inf = NaN), one above its largest would be inf
  TORCH_CHECK(eps >= static_cast<double>(std::numeric_limits<float>::min()) &&
                  eps <= static_cast<double>(std::numeric_limits<float>::max()),
              "blipfast_C: eps must be a normal float32 (>= 1.18e-38, <= 3.4e38), got ", eps);
  const int64_t* seed_ptr = check_seed(seed, dropout_p, x);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor z = at::empty_like(x);
  // the row statistics in one allocation: stats[0] = mean, stats[1] = rstd (one tensor for autograd to save)
  at::Tensor stats = at::empty({2, rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, z, stats};

  FwdParams p{};
  p.x = x.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.res = residual.data_ptr();
  p.w = weight.data_ptr<float>();
  p.lb = ln_bias.data_ptr<float>();
  p.seed = seed_ptr;
  p.y = y.data_ptr();
  p.z = z.data_ptr();
  p.mean = stats.data_ptr<float>();
  p.rstd = p.mean + rows;
  p.rows = rows;
  p.n = n;
  p.eps = static_cast<float>(eps);
  p.dropout = dropout_p > 0.0;
  p.threshold = p.dropout ? dropout_threshold(dropout_p) : 0u;
  p.scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  const Launch L{c10::cuda::getCurrentCUDAStream(x.get_device()).stream(), sm_count(x.get_device())};
  BLIPFAST_DISPATCH_LN(x.scalar_type(), "ln_epilogue_fwd", [&] { fwd_launch<scalar_t>(p, L); });
  return {y, z, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ln_epilogue_bwd(
    const at::Tensor& dy, const at::Tensor& z, const at::Tensor& stats, const at::Tensor& weight,
    const std::optional<at::Tensor>& seed, double dropout_p) {
  check_x(z, "z");
  check_act(dy, "dy", z, "z");
  const int64_t rows = z.size(0), n = z.size(1);
  TORCH_CHECK(stats.device() == z.device(), "blipfast_C: stats is on ", stats.device(), " but z is on ", z.device());
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "blipfast_C: stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == rows,
              "blipfast_C: stats must have shape [2, ", rows, "] (mean, rstd), got ", stats.sizes());
  TORCH_CHECK(stats.is_contiguous(), "blipfast_C: stats must be contiguous");
  check_param(weight, "weight", n, z);
  const int64_t* seed_ptr = check_seed(seed, dropout_p, z);

  const c10::cuda::CUDAGuard guard(z.device());
  const bool dropout = dropout_p > 0.0;
  at::Tensor dres = at::empty_like(z);
  at::Tensor dx = dropout ? at::empty_like(z) : at::empty({0}, z.options());
  const auto fopt = z.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({n}, fopt), dln_bias = at::empty({n}, fopt), dbias = at::empty({n}, fopt);
  if (rows == 0) {
    dweight.zero_();
    dln_bias.zero_();
    dbias.zero_();
    return {dx, dres, dweight, dln_bias, dbias};
  }

  BwdParams p{};
  p.dy = dy.data_ptr();
  p.z = z.data_ptr();
  p.mean = stats.data_ptr<float>();
  p.rstd = p.mean + rows;
  p.w = weight.data_ptr<float>();
  p.seed = seed_ptr;
  p.dx = dropout ? dx.data_ptr() : nullptr;
  p.dres = dres.data_ptr();
  p.rows = rows;
  p.n = n;
  p.dropout = dropout;
  p.threshold = dropout ? dropout_threshold(dropout_p) : 0u;
  p.scale = dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  const Launch L{c10::cuda::getCurrentCUDAStream(z.get_device()).stream(), sm_count(z.get_device())};
  at::Tensor part = at::empty({0}, fopt);
  BLIPFAST_DISPATCH_LN(z.scalar_type(), "ln_epilogue_bwd", [&] { bwd_launch<scalar_t>(p, L, part); });
  const int64_t P = part.size(1);
  col_reduce_kernel<<<dim3(static_cast<unsigned>((n + kColX - 1) / kColX), 3), dim3(kColX, kColY), 0, L.stream>>>(
      part.data_ptr<float>(), P, n, dweight.data_ptr<float>(), dln_bias.data_ptr<float>(), dbias.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dres, dweight, dln_bias, dbias};
}

}  // namespace
}  // namespace blipfast

TORCH_LIBRARY_FRAGMENT(blipfast_C, m) {
  m.def(
      "ln_epilogue_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, Tensor? seed, "
      "float eps, float dropout_p) -> (Tensor y, Tensor z, Tensor stats)");
  m.def(
      "ln_epilogue_bwd(Tensor dy, Tensor z, Tensor stats, Tensor weight, Tensor? seed, "
      "float dropout_p) -> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dln_bias, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(blipfast_C, CUDA, m) {
  m.impl("ln_epilogue_fwd", &blipfast::ln_epilogue_fwd);
  m.impl("ln_epilogue_bwd", &blipfast::ln_epilogue_bwd);
}
