// Kernels that check the emulator itself (tests/test_ssim_cuda_emu.py): that a missing
// __syncthreads gives a wrong result under some schedule, that a barrier which cannot open
// and a launch from a kernel are reported, and that warp shuffles and the dynamic
// shared-memory poison behave as stated.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_emu.h"

namespace {

// Thread 0 sums the block's 256 values from shared memory: right only if every thread has
// stored its value first (the barrier).
__global__ void block_sum_kernel(const float* values, float* out, bool barrier) {
  SSIM_DYNAMIC_SHARED(float, slots);
  slots[threadIdx.x] = values[threadIdx.x];
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int i = 0; i < 256; ++i) sum += slots[i];
    out[0] = sum;
  }
}

// Lane 0 of warp 0 waits at the block barrier while its warp-mates wait in a shuffle.
__global__ void divergent_barrier_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffles_kernel(const float* values, int delta, float* down, float* xor_out, float* unwritten) {
  SSIM_DYNAMIC_SHARED(float, never_written);
  const float v = values[threadIdx.x];
  down[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, delta);
  xor_out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 3);
  unwritten[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void empty_kernel() {}

// A kernel that launches a kernel (dynamic parallelism, not emulated): must be refused.
__global__ void nested_launch_kernel() {
  if (threadIdx.x == 0) SSIM_LAUNCH(1, 32, 0, nullptr, empty_kernel)();
}

void nested_launch() { SSIM_LAUNCH(1, 32, 0, nullptr, nested_launch_kernel)(); }

at::Tensor block_sum(const at::Tensor& values, bool barrier) {
  TORCH_CHECK(values.numel() == 256 && values.scalar_type() == at::kFloat && values.is_contiguous());
  at::Tensor out = at::empty({1}, values.options());
  SSIM_LAUNCH(1, 256, 256 * sizeof(float), nullptr, block_sum_kernel)(values.data_ptr<float>(),
                                                                       out.data_ptr<float>(), barrier);
  return out;
}

void divergent_barrier() {
  at::Tensor out = at::empty({64}, at::TensorOptions().dtype(at::kFloat));
  SSIM_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffles(const at::Tensor& values, int64_t delta) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat && values.is_contiguous());
  const int n = static_cast<int>(values.numel());
  at::Tensor down = at::empty_like(values), xor_out = at::empty_like(values), unwritten = at::empty_like(values);
  SSIM_LAUNCH(1, n, n * sizeof(float), nullptr, shuffles_kernel)(values.data_ptr<float>(), static_cast<int>(delta),
                                                                  down.data_ptr<float>(), xor_out.data_ptr<float>(),
                                                                  unwritten.data_ptr<float>());
  return {down, xor_out, unwritten};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(epban_cuda_emu, m) {
  m.def("selftest_block_sum", &block_sum);
  m.def("selftest_divergent_barrier", &divergent_barrier);
  m.def("selftest_shuffles", &shuffles);
  m.def("selftest_nested_launch", &nested_launch);
}
