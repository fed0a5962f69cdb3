// A CPU emulator for the subset of CUDA that epban's kernels use, so that the CUDA source
// itself (not a CPU rewrite of it) is built with g++ and checked by CI, which has no GPU.
//
// A launch runs its blocks one after another. Within a block every CUDA thread is a fiber
// (ucontext) with its own stack and threadIdx; a fiber runs until it reaches a barrier
// (__syncthreads, or the warp exchange of a __shfl_*_sync) or returns, then the next one
// runs. A barrier opens when every live thread of its scope (block or warp) waits at it;
// a state where none can open (a barrier under divergent control flow) is reported as an
// error instead of hanging. Threads run in lane order, in reverse or in a seeded shuffle
// (set_schedule): a missing __syncthreads shows as a wrong result under some order.
//
// Memory: __shared__ variables become function statics (one block runs at a time, so
// they are the block's shared memory); dynamic shared memory (SSIM_DYNAMIC_SHARED) is
// filled with 0xFF bytes (float NaN) before every block, so reads of shared memory no
// thread wrote show up as NaN. Global memory is the CPU tensors' memory.
//
// Not emulated: warps in lockstep (code that relies on it is wrong on the GPU too),
// atomics, textures, streams (launches run at once, synchronously), cooperative groups.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <utility>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace epban_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class Schedule { kLaneOrder = 0, kReverse = 1, kShuffle = 2 };

struct Settings {
  Schedule schedule = Schedule::kLaneOrder;
  uint64_t seed = 0;
  int64_t launches = 0;  // launches run so far (tests check that a kernel ran here)
  std::vector<int64_t> block_sizes;  // threads of each launch since the last reset (which kernel ran)
};

inline Settings& settings() {
  static Settings s;
  return s;
}

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // from stack_pool()
  Dim3 thread_idx;
  int lane = 0, warp = 0;
  Wait wait = Wait::kNone;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  Dim3 block_idx, block_dim, grid_dim;
  std::vector<unsigned char> dynamic_shared;
  std::vector<uint64_t> warp_slots;  // one 8-byte slot per thread for the warp exchanges
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;
};

// Fiber stacks, allocated once (untouched pages cost nothing) and reused by every launch.
inline char* stack_pool(int thread, size_t bytes) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= thread) stacks.emplace_back(new char[bytes]);
  return stacks[thread].get();
}

inline Block*& active_block() {
  static Block* b = nullptr;
  return b;
}

inline Fiber& this_thread() { return *active_block()->current; }

inline void yield_waiting(Wait w) {
  Block& b = *active_block();
  Fiber& f = *b.current;
  f.wait = w;
  swapcontext(&f.context, &b.scheduler);
}

inline void fiber_entry() {
  Block& b = *active_block();
  try {
    b.body(b.body_arg);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  b.current->wait = Wait::kDone;  // uc_link resumes the scheduler
}

// Runs one block of `threads` fibers to completion.
inline void run_block(Block& b, int threads, std::vector<int>& order, std::mt19937_64& rng) {
  constexpr size_t kStack = 256 * 1024;
  b.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack = stack_pool(t, kStack);
    f.thread_idx = Dim3(t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y));
    f.lane = t % 32;
    f.warp = t / 32;
    f.wait = Wait::kNone;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::fill(b.dynamic_shared.begin(), b.dynamic_shared.end(), 0xFF);
  const int warps = (threads + 31) / 32;
  for (;;) {
    if (settings().schedule == Schedule::kShuffle) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      Fiber& f = b.fibers[t];
      if (f.wait != Wait::kNone) continue;
      b.current = &f;
      swapcontext(&b.scheduler, &f.context);
    }
    b.current = nullptr;
    if (b.error) std::rethrow_exception(b.error);
    // Every fiber now waits or is done: open the barriers whose scope has fully arrived.
    int live = 0, at_block = 0;
    for (const Fiber& f : b.fibers) {
      live += f.wait != Wait::kDone;
      at_block += f.wait == Wait::kBlock;
    }
    if (live == 0) return;
    bool opened = false;
    if (at_block == live) {
      for (Fiber& f : b.fibers)
        if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      opened = true;
    }
    for (int w = 0; w < warps && !opened; ++w) {
      int warp_live = 0, warp_waiting = 0;
      for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t) {
        warp_live += b.fibers[t].wait != Wait::kDone;
        warp_waiting += b.fibers[t].wait == Wait::kWarp;
      }
      if (warp_live > 0 && warp_waiting == warp_live) {
        for (int t = w * 32; t < std::min(threads, w * 32 + 32); ++t)
          if (b.fibers[t].wait == Wait::kWarp) b.fibers[t].wait = Wait::kNone;
        opened = true;
      }
    }
    if (!opened) {
      throw std::runtime_error("cuda_emu: deadlock in block (" + std::to_string(b.block_idx.x) + ", " +
                               std::to_string(b.block_idx.y) + ", " + std::to_string(b.block_idx.z) +
                               "): threads wait at barriers that cannot open "
                               "(a barrier or shuffle under divergent control flow)");
    }
  }
}

// Whether this OS thread is running a launch (a kernel's fibers run on the launching thread).
inline bool& launching() {
  thread_local bool flag = false;
  return flag;
}

// One launch at a time (the __shared__ statics and the active block are process-wide).
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

template <typename Body>
void run_grid(Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, Body& body) {
  bool& in_launch = launching();
  if (in_launch) throw std::runtime_error("cuda_emu: a launch inside a kernel is not supported");
  const std::lock_guard<std::mutex> lock(launch_mutex());
  in_launch = true;
  struct Reset {
    bool& flag;
    ~Reset() { flag = false; }
  } reset{in_launch};
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) throw std::runtime_error("cuda_emu: block size must be 1..1024 threads");
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.dynamic_shared.resize(dynamic_shared_bytes);
  b.warp_slots.resize(threads);
  b.body = [](void* p) { (*static_cast<Body*>(p))(); };
  b.body_arg = &body;
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = settings().schedule == Schedule::kReverse ? threads - 1 - t : t;
  std::mt19937_64 rng(settings().seed + static_cast<uint64_t>(settings().launches));
  ++settings().launches;
  settings().block_sizes.push_back(threads);
  active_block() = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = Dim3(x, y, z);
          run_block(b, threads, order, rng);
        }
  } catch (...) {
    active_block() = nullptr;
    throw;
  }
  active_block() = nullptr;
}

// SSIM_LAUNCH(grid, block, smem, stream, kernel)(args...): the arguments are converted to
// the kernel's parameter types once, as a CUDA launch copies them.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  Dim3 grid, block;
  size_t dynamic_shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    auto body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, dynamic_shared_bytes, body);
  }
};

template <typename... Params>
Launch<Params...> launch(Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, void (*kernel)(Params...)) {
  return Launch<Params...>{kernel, grid, block, dynamic_shared_bytes};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(active_block()->dynamic_shared.data());
}

inline void syncthreads() { yield_waiting(Wait::kBlock); }

// The value of lane `src` of the calling thread's warp (own value when src is outside it).
template <typename T>
T warp_exchange(unsigned mask, T value, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "cuda_emu: shuffles of at most 8 bytes");
  if (mask != 0xffffffffu) throw std::runtime_error("cuda_emu: only full-warp shuffles are emulated");
  Block& b = *active_block();
  Fiber& f = *b.current;
  std::memcpy(&b.warp_slots[f.warp * 32 + f.lane], &value, sizeof(T));
  yield_waiting(Wait::kWarp);  // every lane has written its slot
  T out = value;
  const int src_index = f.warp * 32 + src;
  if (src >= 0 && src < 32 && src_index < static_cast<int>(b.fibers.size())) {
    if (b.fibers[src_index].wait == Wait::kDone) throw std::runtime_error("cuda_emu: shuffle from an exited lane");
    std::memcpy(&out, &b.warp_slots[src_index], sizeof(T));
  }
  yield_waiting(Wait::kWarp);  // every lane has read before the slots are reused
  return out;
}

}  // namespace epban_emu

// ---- the CUDA built-ins, for the kernels' source
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::epban_emu::this_thread().thread_idx)
#define blockIdx (::epban_emu::active_block()->block_idx)
#define blockDim (::epban_emu::active_block()->block_dim)
#define gridDim (::epban_emu::active_block()->grid_dim)
inline void __syncthreads() { ::epban_emu::syncthreads(); }
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return ::epban_emu::warp_exchange(mask, value, ::epban_emu::this_thread().lane + static_cast<int>(delta));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return ::epban_emu::warp_exchange(mask, value, ::epban_emu::this_thread().lane ^ lane_mask);
}

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};

#define SSIM_LAUNCH(grid, block, smem, stream, ...) \
  ::epban_emu::launch(::epban_emu::Dim3(grid), ::epban_emu::Dim3(block), (smem), __VA_ARGS__)
#define SSIM_DYNAMIC_SHARED(type, name) type* name = ::epban_emu::dynamic_shared<type>()

// ---- the CUDA runtime and c10::cuda calls of the host code
using cudaStream_t = void*;
using cudaError_t = int;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 132;  // the SMs of the GPU the strip plans are quoted for
  return 0;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return 0;
}
#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10
