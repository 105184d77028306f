// Post-LN block epilogue, forward: the register-path and general-path kernels and their launch tuning (the
// contract and the dropout rule: layernorm_epilogue.cuh).
#include <c10/cuda/CUDAException.h>

#include "layernorm_epilogue.cuh"

namespace blipfast {
namespace ln_epilogue {
namespace {

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
// launch

// threads per row: the vectorised path has every power of two from a warp to 512, the scalar one fewer
template <int VEC>
using FwdTpr = std::conditional_t<VEC == 1, IntList<32, 128, 512>, IntList<32, 64, 128, 256, 512>>;

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

}  // namespace

void launch_fwd(at::ScalarType st, const FwdParams& p, const Launch& L) {
  BLIPFAST_DISPATCH_LN(st, "ln_epilogue_fwd", [&] { fwd_launch<scalar_t>(p, L); });
}

}  // namespace ln_epilogue
}  // namespace blipfast
