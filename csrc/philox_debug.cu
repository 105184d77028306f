// Debug ops
//   blipfast_C::philox_u32(Tensor seed, Tensor offsets) -> Tensor     first word, shape of offsets
//   blipfast_C::philox4_u32(Tensor seed, Tensor counters) -> Tensor   all four words, [*counters.shape, 4]
//
// Philox4x32-10 words for every int64 counter under the int64 seed (one element), as int64 values in
// [0, 2^32): the stream that every CUDA kernel of blipfast draws its dropout masks (all four words of a call,
// csrc/philox.cuh) and samples (first word) from. Each has a CUDA and a CPU implementation built from the same
// csrc/philox.cuh, so a CPU-only CI run checks the header bit for bit against blipfast/ops/_philox.py, and a
// GPU run checks the device code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "philox.cuh"

namespace blipfast {
namespace {

void check_args(const at::Tensor& seed, const at::Tensor& offsets, const char* op = "philox_u32",
                const char* what = "offsets") {
  TORCH_CHECK(seed.scalar_type() == at::kLong, "blipfast_C::", op, ": seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK(seed.numel() == 1, "blipfast_C::", op, ": seed must have exactly one element, got shape ", seed.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "blipfast_C::", op, ": ", what, " must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(seed.device() == offsets.device(), "blipfast_C::", op, ": seed is on ", seed.device(), " but ", what,
              " are on ", offsets.device());
}

std::vector<int64_t> shape4(const at::Tensor& counters) {
  std::vector<int64_t> s(counters.sizes().begin(), counters.sizes().end());
  s.push_back(4);
  return s;
}

at::Tensor philox_u32_cpu(const at::Tensor& seed, const at::Tensor& offsets) {
  check_args(seed, offsets);
  const at::Tensor off = offsets.contiguous();
  at::Tensor out = at::empty_like(off, at::MemoryFormat::Contiguous);
  const uint64_t s = static_cast<uint64_t>(seed.reshape({1}).data_ptr<int64_t>()[0]);
  const int64_t* in = off.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, off.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = static_cast<int64_t>(philox_u32(s, static_cast<uint64_t>(in[i])));
  });
  return out;
}

__global__ void philox_u32_kernel(const int64_t* __restrict__ seed, const int64_t* __restrict__ in,
                                  int64_t* __restrict__ out, int64_t n) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int64_t>(philox_u32(s, static_cast<uint64_t>(in[i])));
  }
}

at::Tensor philox_u32_cuda(const at::Tensor& seed, const at::Tensor& offsets) {
  check_args(seed, offsets);
  TORCH_CHECK(offsets.is_cuda(), "blipfast_C::philox_u32: offsets must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(offsets.device());
  const at::Tensor off = offsets.contiguous();
  const at::Tensor s = seed.reshape({1}).contiguous();
  at::Tensor out = at::empty_like(off, at::MemoryFormat::Contiguous);
  const int64_t n = off.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  philox_u32_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream(offsets.get_device()).stream()>>>(
      s.data_ptr<int64_t>(), off.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox4_u32_cpu(const at::Tensor& seed, const at::Tensor& counters) {
  check_args(seed, counters, "philox4_u32", "counters");
  const at::Tensor ctr = counters.contiguous();
  at::Tensor out = at::empty(shape4(ctr), ctr.options());
  const uint64_t s = static_cast<uint64_t>(seed.reshape({1}).data_ptr<int64_t>()[0]);
  const int64_t* in = ctr.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, ctr.numel(), 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Philox4 r = philox4_u32(s, static_cast<uint64_t>(in[i]));
      for (int w = 0; w < 4; ++w) o[4 * i + w] = static_cast<int64_t>(r.w[w]);
    }
  });
  return out;
}

__global__ void philox4_u32_kernel(const int64_t* __restrict__ seed, const int64_t* __restrict__ in,
                                   int64_t* __restrict__ out, int64_t n) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 r = philox4_u32(s, static_cast<uint64_t>(in[i]));
    out[4 * i + 0] = static_cast<int64_t>(r.w[0]);
    out[4 * i + 1] = static_cast<int64_t>(r.w[1]);
    out[4 * i + 2] = static_cast<int64_t>(r.w[2]);
    out[4 * i + 3] = static_cast<int64_t>(r.w[3]);
  }
}

at::Tensor philox4_u32_cuda(const at::Tensor& seed, const at::Tensor& counters) {
  check_args(seed, counters, "philox4_u32", "counters");
  TORCH_CHECK(counters.is_cuda(), "blipfast_C::philox4_u32: counters must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor ctr = counters.contiguous();
  const at::Tensor s = seed.reshape({1}).contiguous();
  at::Tensor out = at::empty(shape4(ctr), ctr.options());
  const int64_t n = ctr.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(counters.get_device()).stream();
  philox4_u32_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(s.data_ptr<int64_t>(), ctr.data_ptr<int64_t>(),
                                                                            out.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace blipfast

TORCH_LIBRARY_FRAGMENT(blipfast_C, m) {
  m.def("philox_u32(Tensor seed, Tensor offsets) -> Tensor");
  m.def("philox4_u32(Tensor seed, Tensor counters) -> Tensor");
}

TORCH_LIBRARY_IMPL(blipfast_C, CPU, m) {
  m.impl("philox_u32", &blipfast::philox_u32_cpu);
  m.impl("philox4_u32", &blipfast::philox4_u32_cpu);
}

TORCH_LIBRARY_IMPL(blipfast_C, CUDA, m) {
  m.impl("philox_u32", &blipfast::philox_u32_cuda);
  m.impl("philox4_u32", &blipfast::philox4_u32_cuda);
}
