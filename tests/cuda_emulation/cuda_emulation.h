// Runs the CUDA kernels of neptune_ext on the CPU, for machines without a GPU.
//
// Compile a .cu with NEPTUNE_CUDA_EMULATION defined and this directory on the
// include path, as C++: the kernels become plain functions, and a launch runs
// every warp of the grid, one after another, with its 32 lanes as cooperative
// fibers (ucontext) on one OS thread. A lane runs until it reaches a warp
// shuffle, where it waits (yields) until every lane named in the shuffle's
// mask has arrived; so the kernels' lane-level protocol runs as written.
//
// What it checks, beyond the results themselves:
//   * every shuffle: the calling lane and the source lane are in the mask, and
//     all lanes that share a mask reach the same shuffle (else: a lane waits
//     forever while its group diverged or exited, reported as a deadlock);
//   * vector loads and stores are aligned to their width (NEPTUNE_CHECK_ALIGNED);
// and the kernels' outputs and scratch are filled with NaN before launch (see
// new_tensor in the .cu), so an element nobody writes shows up.
//
// What it cannot check: timing, the GPU memory model (the warps of a grid run
// sequentially here, so a race between warps cannot show), register pressure.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;
using cudaStream_t = int;

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace c10

namespace neptune_emu {

struct Lane {
  ucontext_t ctx;
  std::vector<char> stack;
  uint64_t phase = 0;  // shuffle barriers passed
  uint64_t slot = 0;   // value offered at the current shuffle
  bool done = false;
};

struct State {
  ucontext_t scheduler;
  Lane lanes[32];
  int current = 0;
  uint64_t progress = 0;
  std::function<void()>* body = nullptr;
  std::string error;
};

inline State& state() {
  static State s;
  return s;
}

inline void record_error(const std::string& msg) {
  State& s = state();
  if (s.error.empty())
    s.error = msg + " (block " + std::to_string(blockIdx.x) + ", thread " +
              std::to_string(threadIdx.x) + ")";
}

inline void yield_lane() {
  State& s = state();
  swapcontext(&s.lanes[s.current].ctx, &s.scheduler);
}

// Waits until every lane of `mask` has passed as many barriers as this one.
inline void group_barrier(unsigned mask) {
  State& s = state();
  Lane& me = s.lanes[s.current];
  const uint64_t target = ++me.phase;
  ++s.progress;
  for (;;) {
    bool all = true;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && s.lanes[l].phase < target) all = false;
    if (all) return;
    yield_lane();
  }
}

template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  State& s = state();
  const int lane = s.current;
  if (!(mask >> lane & 1u)) record_error("__shfl_sync: calling lane not in the mask");
  if (src < 0 || src > 31 || !(mask >> src & 1u))
    record_error("__shfl_sync: source lane " + std::to_string(src) + " not in the mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  s.lanes[lane].slot = bits;
  group_barrier(mask);  // every lane of the mask has offered its value
  const uint64_t got = s.lanes[src & 31].slot;
  group_barrier(mask);  // every lane has read before any offers the next one
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void lane_entry() {
  State& s = state();
  (*s.body)();
  s.lanes[s.current].done = true;
  ++s.progress;
  swapcontext(&s.lanes[s.current].ctx, &s.scheduler);
}

// Runs `body` (the kernel call) for every thread of a grid of `grid` blocks of
// `block` threads, warp by warp.
inline void launch_grid(unsigned grid, unsigned block, std::function<void()> body) {
  TORCH_CHECK(block % 32 == 0, "cuda emulation: block size must be a multiple of 32");
  State& s = state();
  s.body = &body;
  s.error.clear();
  blockDim.x = block;
  gridDim.x = grid;
  constexpr size_t kStack = 256 * 1024;
  for (auto& l : s.lanes)
    if (l.stack.size() != kStack) l.stack.assign(kStack, 0);
  for (unsigned b = 0; b < grid && s.error.empty(); ++b) {
    for (unsigned w = 0; w < block / 32 && s.error.empty(); ++w) {
      for (int l = 0; l < 32; ++l) {
        Lane& lane = s.lanes[l];
        lane.phase = 0;
        lane.done = false;
        getcontext(&lane.ctx);
        lane.ctx.uc_stack.ss_sp = lane.stack.data();
        lane.ctx.uc_stack.ss_size = lane.stack.size();
        lane.ctx.uc_link = &s.scheduler;
        makecontext(&lane.ctx, lane_entry, 0);
      }
      int unfinished = 32;
      while (unfinished > 0) {
        const uint64_t before = s.progress;
        unfinished = 0;
        for (int l = 0; l < 32; ++l) {
          if (s.lanes[l].done) continue;
          s.current = l;
          blockIdx.x = b;
          threadIdx.x = w * 32 + l;
          swapcontext(&s.scheduler, &s.lanes[l].ctx);
          if (!s.lanes[l].done) ++unfinished;
        }
        if (unfinished > 0 && s.progress == before) {
          // Restore the ids of a stuck lane for the message; the fibers are abandoned.
          for (int l = 0; l < 32; ++l)
            if (!s.lanes[l].done) {
              blockIdx.x = b;
              threadIdx.x = w * 32 + l;
              break;
            }
          record_error("deadlock: lanes wait at a shuffle for lanes that diverged or exited");
          break;
        }
      }
    }
  }
  s.body = nullptr;
  TORCH_CHECK(s.error.empty(), "cuda emulation: ", s.error);
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    record_error("misaligned " + std::to_string(bytes) + "-byte vector access");
}

}  // namespace neptune_emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = neptune_emu::state().current;
  return neptune_emu::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset, int width = 32) {
  const int lane = neptune_emu::state().current;
  const int src = lane ^ offset;
  return neptune_emu::shuffle(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}

// Every lane of the mask waits here until all have arrived (the barrier of a shuffle), so
// what they wrote before is seen by all after - as __syncwarp orders a warp's memory.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const int lane = neptune_emu::state().current;
  if (!(mask >> lane & 1u)) neptune_emu::record_error("__syncwarp: calling lane not in the mask");
  neptune_emu::group_barrier(mask);
}

#define NEPTUNE_LAUNCH(kernel, grid, stream, ...) \
  ::neptune_emu::launch_grid((grid), kBlock, [&] { kernel(__VA_ARGS__); })
#define NEPTUNE_CHECK_ALIGNED(ptr, bytes) ::neptune_emu::check_aligned((ptr), (bytes))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
