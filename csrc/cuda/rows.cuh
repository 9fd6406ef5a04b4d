// What the row engines share (telemetry rows and rotational rows): thread groups per row, group
// reductions in shared memory, row launches with dynamic shared memory within the device's limit,
// and the telemetry sums of one element.
#pragma once

#include "common.cuh"

namespace wdopt {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------ row engine

// The row kernels (telemetry variants of the update kernels, the rotational kernel) reduce over
// rows: one group of G = 32 … kThreads consecutive threads per row (kThreads / G rows per block),
// per-thread partial sums over a fixed strided walk of the row, then a fixed-order tree in shared
// memory. No atomics: the result depends on G only, which depends on the row length only.
//
// Their bodies are written as phases separated by barriers (Block::each, Block::sync), and keep
// everything that outlives a phase in shared memory: the host emulation then runs a block phase
// by phase, thread after thread, and computes exactly what the device does.
constexpr int kLog2Threads = 8;
static_assert((1 << kLog2Threads) == kThreads, "kThreads is a power of two");
constexpr int kMaxGroups = kThreads / 32;

#ifdef WDOPT_HOST_EMULATION
#define WDOPT_BLOCK inline
struct Block {
  template <class F> void each(F&& f) const {
    for (int t = 0; t < kThreads; ++t) f(t);
  }
  void sync() const {}
};
#else
#define WDOPT_BLOCK __device__ __forceinline__
struct Block {
  template <class F> __device__ __forceinline__ void each(F&& f) const { f(static_cast<int>(threadIdx.x)); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};
#endif

// log2 of the threads per row for rows of ``cols`` elements: about 8 elements per thread, 32 at
// least (a warp), kThreads at most.
inline int group_log2(int64_t cols) {
  int lg = 5;
  while (lg < kLog2Threads && (int64_t{8} << lg) < cols) ++lg;
  return lg;
}

// Sums N values over each group of G = 2^lg threads: thread t's values are red[k·kThreads + t];
// the group's sums end at its first thread's slots. Starts and ends with a barrier.
template <int N, typename S> WDOPT_BLOCK void group_reduce(const Block& blk, S* red, int lg) {
  blk.sync();
  for (int s = (1 << lg) >> 1; s > 0; s >>= 1) {
    blk.each([&](int t) {
      if ((t & ((1 << lg) - 1)) < s) {
        WDOPT_UNROLL
        for (int k = 0; k < N; ++k) red[k * kThreads + t] += red[k * kThreads + t + s];
      }
    });
    blk.sync();
  }
}

// Shared memory of a row kernel: reduction slots (6 per thread, 8 bytes each), per-group scalars,
// then (rotational kernel) the on-chip row buffers.
constexpr size_t kReductionBytes = 6 * kThreads * sizeof(double);
constexpr size_t kGroupBytes = 1024;
constexpr size_t kRowHeaderBytes = kReductionBytes + kGroupBytes;
// Default on-chip row buffers of the rotational kernel per block.
constexpr int64_t kRowBufferBytes = 65536;

#ifndef WDOPT_HOST_EMULATION
template <class K, class A, class B, class C>
__global__ void __launch_bounds__(kThreads, K::kMinBlocks)
    row_entry(const __grid_constant__ A a, const __grid_constant__ B b, const __grid_constant__ C c) {
  extern __shared__ __align__(16) unsigned char wdopt_shared[];
  K::run_block(a, b, c, static_cast<int64_t>(blockIdx.x), wdopt_shared);
}
#endif

// Bytes of dynamic shared memory a block may opt in to on the current device (the binding set it);
// no limit in the host emulation. Inline: a file that includes this header without launching rows
// (the emulation's C interface) must not warn that it is unused.
inline int64_t shared_memory_optin_bytes() {
#ifdef WDOPT_HOST_EMULATION
  return INT64_MAX / 2;
#else
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return 48 * 1024;  // the limit every device grants without opting in
  }
  return bytes;
#endif
}

// A row kernel launch with ``shared_bytes`` of dynamic shared memory.
template <class K, class A, class B, class C>
cudaError_t launch_rows(int64_t blocks, size_t shared_bytes, cudaStream_t stream, const A& a, const B& b,
                        const C& c) {
  static_assert(sizeof(A) + sizeof(B) + sizeof(C) <= kParamBytes, "kernel arguments over budget");
  static_assert(sizeof(B) + sizeof(C) <= kOtherParamBytes, "raise kOtherParamBytes");
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  g_launches.fetch_add(1, std::memory_order_relaxed);
#ifdef WDOPT_HOST_EMULATION
  (void)stream;
  // Shared memory starts as garbage on the device: NaN here, for every block.
  std::vector<double> shared((shared_bytes + sizeof(double) - 1) / sizeof(double));
  for (int64_t block = 0; block < blocks; ++block) {
    std::fill(shared.begin(), shared.end(), std::numeric_limits<double>::quiet_NaN());
    K::run_block(a, b, c, block, reinterpret_cast<unsigned char*>(shared.data()));
  }
  return cudaSuccess;
#else
  if (shared_bytes > 48 * 1024) {  // opt-in above the default limit (not a stream operation)
    const cudaError_t err = cudaFuncSetAttribute(row_entry<K, A, B, C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  row_entry<K, A, B, C><<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(a, b, c);
  return cudaGetLastError();
#endif
}

// Telemetry sums of one element: ω (old), the stored new value and the gradient as stored.
template <typename T> WDOPT_HD void telemetry_add(double (&acc)[4], T old, T now, T g, double inv_scale) {
  const double w = static_cast<double>(to_math(old));
  const double d = static_cast<double>(to_math(now)) - w;
  const double gh = static_cast<double>(to_math(g)) * inv_scale;
  acc[0] += w * w;
  acc[1] += w * d;
  acc[2] += d * d;
  acc[3] += gh * gh;
}

WDOPT_HD double inverse_scale(const GradOptions& grad) {
  return grad.grad_scale.ptr != nullptr ? 1.0 / read_scalar(grad.grad_scale) : 1.0;
}


}  // namespace
}  // namespace cuda
}  // namespace wdopt
