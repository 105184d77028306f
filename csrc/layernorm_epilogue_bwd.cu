// Post-LN block epilogue, backward: the register-path and general-path kernels, the deterministic column
// reduction and their launch tuning (the contract and the dropout rule: layernorm_epilogue.cuh).
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "layernorm_epilogue.cuh"

namespace blipfast {
namespace ln_epilogue {
namespace {

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
// launch

// threads per row: the vectorised path has every power of two from a warp to 256, the scalar one a warp or 256
template <int VEC>
using BwdTpr = std::conditional_t<VEC == 1, IntList<32, 256>, IntList<32, 64, 128, 256>>;

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

}  // namespace

void launch_bwd(at::ScalarType st, BwdParams p, const Launch& L, const at::TensorOptions& fopt, float* dweight,
                float* dln_bias, float* dbias) {
  at::Tensor part = at::empty({0}, fopt);
  BLIPFAST_DISPATCH_LN(st, "ln_epilogue_bwd", [&] { bwd_launch<scalar_t>(p, L, part); });
  const int64_t P = part.size(1);
  col_reduce_kernel<<<dim3(static_cast<unsigned>((p.n + kColX - 1) / kColX), 3), dim3(kColX, kColY), 0, L.stream>>>(
      part.data_ptr<float>(), P, p.n, dweight, dln_bias, dbias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ln_epilogue
}  // namespace blipfast
