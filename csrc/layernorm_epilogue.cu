// Post-LN block epilogue: the host side of the ops blipfast_C::ln_epilogue_fwd / ln_epilogue_bwd (argument
// checks, allocation, kernel parameters) and their registration; the kernels are in layernorm_epilogue_fwd.cu and
// layernorm_epilogue_bwd.cu, the contract in layernorm_epilogue.cuh.
// Only c10's CUDA headers (stream, guard, checks): ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart, as on the CI machines) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "layernorm_epilogue.cuh"

namespace blipfast {
namespace ln_epilogue {
namespace {

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
  launch_fwd(x.scalar_type(), p, L);
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
  launch_bwd(z.scalar_type(), p, L, fopt, dweight.data_ptr<float>(), dln_bias.data_ptr<float>(),
             dbias.data_ptr<float>());
  return {dx, dres, dweight, dln_bias, dbias};
}

}  // namespace
}  // namespace ln_epilogue
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
  m.impl("ln_epilogue_fwd", &blipfast::ln_epilogue::ln_epilogue_fwd);
  m.impl("ln_epilogue_bwd", &blipfast::ln_epilogue::ln_epilogue_bwd);
}
