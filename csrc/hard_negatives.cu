// ITM hard-negative sampling without a host synchronisation (docs/semantics.md#itm-hard-negatives), CUDA and CPU.
//
// Semantics (identical to sample_hard_negatives_ref in blipfast/ops/hard_negatives.py, index for index):
// for local row b of direction d (0: neg_text from s_i2t, 1: neg_image from s_t2i) and column j,
//     u   = (philox(seed, off) + 0.5) / 2^32,   off = (d * BW + row_offset + b) * BW + j
//     key = double(s[b, j]) + (-log(-log(u)))   if drawable[b, j] and s[b, j] is neither NaN nor -inf
//     key = -inf                                otherwise
//     out[b] = the smallest j with the largest key > -inf, or -1 when there is none.
// This is Gumbel-max: an exact draw from softmax(s[b, :]) restricted to the drawable columns. The Gumbel
// noise is finite (u in (0, 1)), so a +inf logit has key +inf: the first drawable +inf column wins.
//
// With a probability floor f > 0 (BLIP v1: weights softmax(s[b, :]) + 1e-4, own pair 0) the key of a drawable,
// finite column is instead
//     key = logaddexp(double(s[b, j]) - log_norm[d, b], log(f)) + (-log(-log(u)))
// where log_norm[d, b] is the log-sum-exp of the row over its non-NaN columns, excluded ones included (BLIP's
// softmax runs over the whole row before the own pair is zeroed): Gumbel-max over log(softmax + f), an exact draw
// from p_j proportional to softmax_j + f over the drawable columns. log_norm comes from the caller (one tensor
// for every implementation, so that they agree bit for bit); f = 0 takes the first formula, unchanged. A +inf
// logit still wins (key +inf).
// row_offset = rank * B makes the stream a function of the global row, so W ranks draw exactly what
// one process holding the global batch draws with the same seed.
//
// One block per (row, direction); each thread scans a strided slice of the row, then a warp-shuffle and
// shared-memory argmax (ties to the lowest index). The seed is read from device memory: no host sync,
// capturable in a CUDA graph. The CPU version runs the very same per-element code (philox.cuh and
// gumbel_key are host-callable) so CI checks the C++ logic against the torch reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "philox.cuh"

namespace blipfast {
namespace {

constexpr int kThreads = 256;

// The row's sort key for column j (see the header); -inf for columns that can never be drawn. log_floor = -inf:
// no floor (the plain softmax); else log(f), with log_norm the row's log-sum-exp.
template <typename T>
BLIPFAST_HD double gumbel_key(T value, bool drawable, uint64_t seed, uint64_t offset, double log_floor,
                              double log_norm) {
  const double x = static_cast<double>(value);
  if (!drawable || x != x || x == -HUGE_VAL) return -HUGE_VAL;
  const double u = (static_cast<double>(philox_u32(seed, offset)) + 0.5) * (1.0 / 4294967296.0);
  const double g = -log(-log(u));
  if (log_floor == -HUGE_VAL) return x + g;
  if (x == HUGE_VAL) return HUGE_VAL;
  const double z = x - log_norm;  // log softmax; -inf when the row holds a +inf (log_norm = +inf)
  const double hi = z > log_floor ? z : log_floor;
  const double lo = z > log_floor ? log_floor : z;
  const double w = hi + log1p(exp(lo - hi));  // log(softmax + f)
  return w + g;
}

// (k1, j1) beats (k2, j2): larger key, ties to the smaller index; j = -1 (nothing) loses every tie.
BLIPFAST_HD bool beats(double k1, int64_t j1, double k2, int64_t j2) {
  return k1 > k2 || (k1 == k2 && static_cast<uint64_t>(j1) < static_cast<uint64_t>(j2));
}

BLIPFAST_HD uint64_t row_base(int direction, int64_t bw, int64_t row_offset, int64_t b) {
  return (static_cast<uint64_t>(direction) * bw + row_offset + b) * static_cast<uint64_t>(bw);
}

void check_inputs(const at::Tensor& s_i2t, const at::Tensor& s_t2i, const at::Tensor& drawable,
                  const at::Tensor& seed, int64_t row_offset, double floor, const std::optional<at::Tensor>& log_norm) {
  TORCH_CHECK(s_i2t.dim() == 2, "sample_hard_negatives: s_i2t must be [B, BW], got ", s_i2t.sizes());
  TORCH_CHECK(s_t2i.sizes() == s_i2t.sizes(), "sample_hard_negatives: s_t2i must have the shape of s_i2t ",
              s_i2t.sizes(), ", got ", s_t2i.sizes());
  TORCH_CHECK(drawable.sizes() == s_i2t.sizes(), "sample_hard_negatives: drawable must have the shape of s_i2t ",
              s_i2t.sizes(), ", got ", drawable.sizes());
  TORCH_CHECK(s_t2i.scalar_type() == s_i2t.scalar_type(), "sample_hard_negatives: s_i2t and s_t2i must share a dtype");
  TORCH_CHECK(drawable.scalar_type() == at::kBool, "sample_hard_negatives: drawable must be bool");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "sample_hard_negatives: seed must be an int64 tensor with one element");
  TORCH_CHECK(s_t2i.device() == s_i2t.device() && drawable.device() == s_i2t.device() &&
                  seed.device() == s_i2t.device(),
              "sample_hard_negatives: all tensors must be on one device");
  TORCH_CHECK(row_offset >= 0, "sample_hard_negatives: row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(floor >= 0.0 && floor < HUGE_VAL, "sample_hard_negatives: floor must be finite and >= 0, got ", floor);
  if (floor > 0.0) {
    TORCH_CHECK(log_norm.has_value() && log_norm->defined(),
                "sample_hard_negatives: floor > 0 needs log_norm (float64 [2, B]: each row's log-sum-exp)");
    TORCH_CHECK(log_norm->scalar_type() == at::kDouble && log_norm->dim() == 2 && log_norm->size(0) == 2 &&
                    log_norm->size(1) == s_i2t.size(0),
                "sample_hard_negatives: log_norm must be a float64 tensor [2, B=", s_i2t.size(0), "], got ",
                log_norm->scalar_type(), " ", log_norm->sizes());
    TORCH_CHECK(log_norm->device() == s_i2t.device(), "sample_hard_negatives: all tensors must be on one device");
  }
}

// log(floor), or -inf for no floor
double log_floor_of(double floor) { return floor > 0.0 ? std::log(floor) : -HUGE_VAL; }

// ----------------------------------------------------------------------------------------------
// CUDA (the file also compiles as plain C++, CPU op only, for builds without nvcc)

#if defined(__CUDACC__)
template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_kernel(const T* __restrict__ s_i2t, const T* __restrict__ s_t2i, const bool* __restrict__ drawable,
              const int64_t* __restrict__ seed_ptr, int64_t* __restrict__ neg_text, int64_t* __restrict__ neg_image,
              int64_t bw, int64_t row_offset, double log_floor, const double* __restrict__ log_norm) {
  const int64_t b = blockIdx.x;
  const int direction = blockIdx.y;
  const double norm = log_norm != nullptr ? log_norm[direction * gridDim.x + b] : 0.0;
  const T* row = (direction == 0 ? s_i2t : s_t2i) + b * bw;
  const bool* ok = drawable + b * bw;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const uint64_t base = row_base(direction, bw, row_offset, b);

  double best = -HUGE_VAL;
  int64_t best_j = -1;
  for (int64_t j = threadIdx.x; j < bw; j += kThreads) {
    const double k = gumbel_key(row[j], ok[j], seed, base + static_cast<uint64_t>(j), log_floor, norm);
    if (k > best) {  // strictly: within a thread j increases, so the first maximum stays
      best = k;
      best_j = j;
    }
  }
  // warp argmax
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    const double k = __shfl_down_sync(0xffffffffu, best, delta);
    const int64_t j = __shfl_down_sync(0xffffffffu, best_j, delta);
    if (beats(k, j, best, best_j)) {
      best = k;
      best_j = j;
    }
  }
  __shared__ double s_key[kThreads / 32];
  __shared__ int64_t s_idx[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_key[warp] = best;
    s_idx[warp] = best_j;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? s_key[lane] : -HUGE_VAL;
    best_j = lane < kThreads / 32 ? s_idx[lane] : -1;
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) {
      const double k = __shfl_down_sync(0xffffffffu, best, delta);
      const int64_t j = __shfl_down_sync(0xffffffffu, best_j, delta);
      if (beats(k, j, best, best_j)) {
        best = k;
        best_j = j;
      }
    }
    if (lane == 0) (direction == 0 ? neg_text : neg_image)[b] = best_j;
  }
}

std::tuple<at::Tensor, at::Tensor> sample_hard_negatives_cuda(const at::Tensor& s_i2t_in, const at::Tensor& s_t2i_in,
                                                              const at::Tensor& drawable_in, const at::Tensor& seed,
                                                              int64_t row_offset, double floor,
                                                              const std::optional<at::Tensor>& log_norm_in) {
  check_inputs(s_i2t_in, s_t2i_in, drawable_in, seed, row_offset, floor, log_norm_in);
  TORCH_CHECK(s_i2t_in.is_cuda(), "sample_hard_negatives (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(s_i2t_in.device());
  const at::Tensor s_i2t = s_i2t_in.contiguous();
  const at::Tensor s_t2i = s_t2i_in.contiguous();
  const at::Tensor drawable = drawable_in.contiguous();
  const int64_t b = s_i2t.size(0);
  const int64_t bw = s_i2t.size(1);
  at::Tensor neg_text = at::empty({b}, s_i2t.options().dtype(at::kLong));
  at::Tensor neg_image = at::empty({b}, s_i2t.options().dtype(at::kLong));
  if (b == 0) return {neg_text, neg_image};
  TORCH_CHECK(b <= 2147483647, "sample_hard_negatives: too many rows");
  const dim3 grid(static_cast<unsigned>(b), 2);
  const at::Tensor log_norm = floor > 0.0 ? log_norm_in->contiguous() : at::Tensor();
  const double* norm_ptr = floor > 0.0 ? log_norm.data_ptr<double>() : nullptr;
  const double log_floor = log_floor_of(floor);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_i2t.scalar_type(), "sample_hard_negatives_cuda", [&] {
    sample_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        s_i2t.data_ptr<scalar_t>(), s_t2i.data_ptr<scalar_t>(), drawable.data_ptr<bool>(),
        seed.data_ptr<int64_t>(), neg_text.data_ptr<int64_t>(), neg_image.data_ptr<int64_t>(), bw, row_offset,
        log_floor, norm_ptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {neg_text, neg_image};
}
#endif  // __CUDACC__

// ----------------------------------------------------------------------------------------------
// CPU: the same keys, a sequential first-maximum per row

template <typename T>
int64_t draw_row_cpu(const T* row, const bool* ok, int64_t bw, uint64_t seed, uint64_t base, double log_floor,
                     double norm) {
  double best = -HUGE_VAL;
  int64_t best_j = -1;
  for (int64_t j = 0; j < bw; ++j) {
    const double k = gumbel_key(row[j], ok[j], seed, base + static_cast<uint64_t>(j), log_floor, norm);
    if (k > best) {
      best = k;
      best_j = j;
    }
  }
  return best_j;
}

std::tuple<at::Tensor, at::Tensor> sample_hard_negatives_cpu(const at::Tensor& s_i2t_in, const at::Tensor& s_t2i_in,
                                                             const at::Tensor& drawable_in, const at::Tensor& seed,
                                                             int64_t row_offset, double floor,
                                                             const std::optional<at::Tensor>& log_norm_in) {
  check_inputs(s_i2t_in, s_t2i_in, drawable_in, seed, row_offset, floor, log_norm_in);
  TORCH_CHECK(s_i2t_in.is_cpu(), "sample_hard_negatives (CPU): inputs must be CPU tensors");
  const at::Tensor s_i2t = s_i2t_in.contiguous();
  const at::Tensor s_t2i = s_t2i_in.contiguous();
  const at::Tensor drawable = drawable_in.contiguous();
  const int64_t b = s_i2t.size(0);
  const int64_t bw = s_i2t.size(1);
  at::Tensor neg_text = at::empty({b}, s_i2t.options().dtype(at::kLong));
  at::Tensor neg_image = at::empty({b}, s_i2t.options().dtype(at::kLong));
  const uint64_t seed_v = static_cast<uint64_t>(seed.item<int64_t>());
  const at::Tensor log_norm = floor > 0.0 ? log_norm_in->contiguous() : at::Tensor();
  const double* p_norm = floor > 0.0 ? log_norm.data_ptr<double>() : nullptr;
  const double log_floor = log_floor_of(floor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_i2t.scalar_type(), "sample_hard_negatives_cpu", [&] {
    const scalar_t* p_i2t = s_i2t.data_ptr<scalar_t>();
    const scalar_t* p_t2i = s_t2i.data_ptr<scalar_t>();
    const bool* p_ok = drawable.data_ptr<bool>();
    int64_t* out_text = neg_text.data_ptr<int64_t>();
    int64_t* out_image = neg_image.data_ptr<int64_t>();
    at::parallel_for(0, 2 * b, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int direction = static_cast<int>(i / b);
        const int64_t r = i % b;
        const scalar_t* row = (direction == 0 ? p_i2t : p_t2i) + r * bw;
        const double norm = p_norm != nullptr ? p_norm[direction * b + r] : 0.0;
        const int64_t j = draw_row_cpu(row, p_ok + r * bw, bw, seed_v, row_base(direction, bw, row_offset, r),
                                       log_floor, norm);
        (direction == 0 ? out_text : out_image)[r] = j;
      }
    });
  });
  return {neg_text, neg_image};
}

}  // namespace
}  // namespace blipfast

TORCH_LIBRARY_FRAGMENT(blipfast_C, m) {
  m.def(
      "sample_hard_negatives(Tensor s_i2t, Tensor s_t2i, Tensor drawable, Tensor seed, int row_offset=0, "
      "float floor=0.0, Tensor? log_norm=None) -> (Tensor, Tensor)");
}

#if defined(__CUDACC__)
TORCH_LIBRARY_IMPL(blipfast_C, CUDA, m) { m.impl("sample_hard_negatives", &blipfast::sample_hard_negatives_cuda); }
#endif

TORCH_LIBRARY_IMPL(blipfast_C, CPU, m) { m.impl("sample_hard_negatives", &blipfast::sample_hard_negatives_cpu); }
