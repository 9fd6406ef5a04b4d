// The multi-tensor CUDA engine and the AdamW, SGD and Lion kernels built on it. No torch headers:
// csrc/cuda/binding.cpp turns torch tensors into the plain tables of launchers.h.
//
// Design
// ------
// * Work unit: one thread block updates one (tensor, chunk) pair; a chunk is kChunkBytes of each
//   stream (param, grad, state...), so every block moves the same number of bytes whatever the
//   dtype. Blocks are numbered tensor after tensor; ``TensorTable::chunk_begin`` is the prefix
//   sum of chunk counts and a block finds its tensor by binary search over it (uniform across the
//   block, so every lookup is a broadcast from the constant bank). One launch therefore covers
//   any number of chunks: the launch count depends only on how many tensors fit in one table.
// * Tables travel in the kernel arguments (up to 32 KB since CUDA 12.1 on sm_70+, a few hundred
//   tensors per launch), so a step performs no host-to-device copy: launches are asynchronous and
//   can be captured in a CUDA graph, which then replays with the same addresses and reads lr,
//   steps, grad_scale and found_inf from the device.
// * AdamW's step race: every block of a tensor needs the same step count t, but the step must be
//   advanced exactly once. A first tiny kernel reads each step, writes t = step + 1 back (one
//   thread per tensor, so no other thread reads it) and stores the per-tensor coefficients,
//   computed in double from the exact hyperparameters by ``adamw_coefficients``, into a scratch
//   buffer; the element-wise kernel, ordered after it on the stream, reads only the scratch.
//   SGD and Lion coefficients depend on lr alone: each block computes them itself.
// * Memory movement is shared: ``update_block`` loads Op::kDepth streams, converts to the math
//   type, unscales/negates the gradient (stream 1), calls the optimizer's element-wise function
//   from csrc/include/wdopt/*.h, rounds to the storage type and stores the streams the optimizer
//   writes. Full 16-byte vectors are used when every stream of the tensor is 16-byte aligned,
//   with a scalar tail; misaligned tensors (views) take the scalar path. Offsets are int64 across
//   chunks and int32 inside one.
// * Bit-for-bit agreement with the CPU backend needs IEEE division and square root (no fast
//   math) and no FMA contraction: build with --fmad=false. The reference (wdopt/reference) then
//   agrees bit for bit too: it takes correctly rounded square roots, as this code does.
//
// Host emulation: with WDOPT_HOST_EMULATION defined, no device code is built and every "launch"
// runs the same block bodies in host loops over blocks and threads, on host memory. Tests use it
// to check the engine's indexing, tails and step logic against the reference without a GPU
// (the bodies use neither shared memory nor barriers, so the emulation is exact).

#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../include/wdopt/adamw.h"
#include "../include/wdopt/hd.h"
#include "../include/wdopt/lion.h"
#include "../include/wdopt/sgd.h"

// Loops over streams and vector lanes have compile-time trip counts: unrolled, they keep every
// value in registers. (Device passes only; host compilers warn on the pragma.)
#if defined(__CUDA_ARCH__)
#define WDOPT_UNROLL _Pragma("unroll")
#else
#define WDOPT_UNROLL
#endif

#if defined(__USE_FAST_MATH__)
#error "wdopt's CUDA kernels need IEEE division and square root: do not build them with --use_fast_math"
#endif

namespace wdopt {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------ constants

constexpr int kThreads = 256;
// Bytes of each stream per block: 16 vector iterations per thread at 256 threads. Small enough
// that a 100M-parameter step makes several waves of blocks (little tail), large enough that the
// per-block cost (table lookup, coefficients) is negligible.
constexpr int64_t kChunkBytes = 65536;
constexpr int kVectorBytes = 16;

// Kernel-argument budget of one launch. nvcc rejects a kernel whose arguments exceed the target's
// limit, so a wrong value fails the build, never a launch.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr size_t kParamBytes = 32764;
#else
constexpr size_t kParamBytes = 4096;
#endif
// Left for the arguments other than the tensor table (optimizer hyperparameters, GradOptions).
constexpr size_t kOtherParamBytes = 256;

template <typename T> constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(T));
template <typename T> constexpr int kChunk = static_cast<int>(kChunkBytes / static_cast<int64_t>(sizeof(T)));
static_assert(kChunk<__half> % (kThreads * kVec<__half>) == 0, "a chunk is whole vector iterations");

std::atomic<int64_t> g_launches{0};

// ------------------------------------------------------------------------------------ tables

// The tensors of one launch: DEPTH address columns, sizes, chunk prefix sums and a per-tensor
// flag pointer (SGD's "first step", see FirstStepFlag). Passed by value as a kernel argument.
template <int DEPTH> struct TensorTable {
  static constexpr int kRowBytes = DEPTH * 8 + 8 + 4 + 8;
  static constexpr int kCapacity =
      static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);  // 32: counts, padding

  void* ptr[DEPTH][kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_begin[kCapacity + 1];  // chunk_begin[n_tensors]: chunks in this launch
  int32_t n_tensors;
  int32_t first_tensor;  // index in the call of row 0 (AdamW's coefficients are per call)
  FirstStepFlag flag[kCapacity];

  // The row owning chunk ``block``: the last row whose chunks start at or before it (empty
  // tensors own no chunk and are skipped, since the next row starts at the same chunk).
  WDOPT_HD int find_row(int64_t block) const {
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (chunk_begin[mid] <= block) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

// Step counts of one coefficient launch: one thread per tensor.
struct StepTable {
  static constexpr int kCapacity =
      static_cast<int>((kParamBytes - kOtherParamBytes - 16) / sizeof(float*));
  float* step[kCapacity];
  int32_t n_tensors;
  int32_t first_tensor;
};

// ------------------------------------------------------------------------------------ scalars

WDOPT_HD double read_scalar(const DeviceScalar& s) {
  return s.is_double ? *static_cast<const double*>(s.ptr) : static_cast<double>(*static_cast<const float*>(s.ptr));
}

// GradScaler found an inf/nan: the whole step is skipped.
WDOPT_HD bool step_skipped(const DeviceScalar& found_inf) {
  return found_inf.ptr != nullptr && read_scalar(found_inf) != 0.0;
}

// SGD's "the momentum buffer has no history yet": read on the device, so that a step captured in a
// CUDA graph before or after the first one replays correctly (the optimizer clears the flag after
// a step GradScaler did not skip). Null: the buffer has history.
WDOPT_HD bool is_first_step(FirstStepFlag flag) { return flag != nullptr && *flag != 0.0f; }

WDOPT_HD double lr_value(double lr, const DeviceScalar& lr_tensor) {
  return lr_tensor.ptr != nullptr ? read_scalar(lr_tensor) : lr;
}

// Storage <-> math type. Explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
WDOPT_HD float to_math(float x) { return x; }
WDOPT_HD double to_math(double x) { return x; }
WDOPT_HD float to_math(__half x) { return __half2float(x); }
WDOPT_HD float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> WDOPT_HD T to_storage(opmath_t<T> x);
template <> WDOPT_HD float to_storage<float>(float x) { return x; }
template <> WDOPT_HD double to_storage<double>(double x) { return x; }
template <> WDOPT_HD __half to_storage<__half>(float x) { return __float2half_rn(x); }
template <> WDOPT_HD __nv_bfloat16 to_storage<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of one stream; loaded and stored as one vector access.
template <typename T> struct alignas(kVectorBytes) Pack {
  T v[kVec<T>];
};

WDOPT_HD bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// ------------------------------------------------------------------------------------ engine

// One block's work: chunk ``block`` of the table, element-wise through ``op``. Streams: 0 is the
// parameter, 1 the gradient (read only), then the optimizer's state; Op::kWrites says which are
// written back.
template <typename T, class Op>
WDOPT_HD void update_block(const TensorTable<Op::kDepth>& table, const Op& op, const GradOptions& grad,
                           int64_t block, int thread) {
  using M = opmath_t<T>;
  constexpr int D = Op::kDepth;
  constexpr int V = kVec<T>;
  if (step_skipped(grad.found_inf)) return;

  const int row = table.find_row(block);
  const int64_t first = (block - table.chunk_begin[row]) * int64_t{kChunk<T>};
  const int64_t left = table.numel[row] - first;
  const int n = left < kChunk<T> ? static_cast<int>(left) : kChunk<T>;
  T* ptr[D];
  bool aligned = true;
  WDOPT_UNROLL
  for (int d = 0; d < D; ++d) {
    ptr[d] = static_cast<T*>(table.ptr[d][row]) + first;
    aligned = aligned && aligned16(ptr[d]);
  }
  const typename Op::Context ctx = op.context(table.first_tensor + row, table.flag[row]);
  // GradScaler's unscale multiplies by the reciprocal of the scale rounded to M, as torch's
  // unscale and the reference do (not a division per element).
  const bool unscale = grad.grad_scale.ptr != nullptr;
  const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);

  // One element: x[d] holds stream d in the math type; updated in place.
  auto element = [&](M(&x)[D]) {
    if (unscale) x[1] = x[1] * inv_scale;
    if (grad.maximize) x[1] = -x[1];
    op.update(ctx, x);
  };

  int done = 0;
  if (aligned) {
    const int vectors = n / V;
    for (int i = thread; i < vectors; i += kThreads) {
      Pack<T> pack[D];
      WDOPT_UNROLL
      for (int d = 0; d < D; ++d) pack[d] = reinterpret_cast<const Pack<T>*>(ptr[d])[i];
      WDOPT_UNROLL
      for (int e = 0; e < V; ++e) {
        M x[D];
        WDOPT_UNROLL
        for (int d = 0; d < D; ++d) x[d] = to_math(pack[d].v[e]);
        element(x);
        WDOPT_UNROLL
        for (int d = 0; d < D; ++d) {
          if ((Op::kWrites >> d) & 1u) pack[d].v[e] = to_storage<T>(x[d]);
        }
      }
      WDOPT_UNROLL
      for (int d = 0; d < D; ++d) {
        if ((Op::kWrites >> d) & 1u) reinterpret_cast<Pack<T>*>(ptr[d])[i] = pack[d];
      }
    }
    done = vectors * V;
  }
  for (int i = done + thread; i < n; i += kThreads) {
    M x[D];
    WDOPT_UNROLL
    for (int d = 0; d < D; ++d) x[d] = to_math(ptr[d][i]);
    element(x);
    WDOPT_UNROLL
    for (int d = 0; d < D; ++d) {
      if ((Op::kWrites >> d) & 1u) ptr[d][i] = to_storage<T>(x[d]);
    }
  }
}

template <typename T, class Op> struct UpdateKernel {
  using Table = TensorTable<Op::kDepth>;
  WDOPT_HD static void run(const Table& table, const Op& op, const GradOptions& grad, int64_t block, int thread) {
    update_block<T>(table, op, grad, block, thread);
  }
};

// ------------------------------------------------------------------------------------ launching

#ifndef WDOPT_HOST_EMULATION
// The one kernel entry: K::run on this block and thread. __grid_constant__ keeps the table in the
// parameter space (indexed in place, never copied to local memory).
template <class K, class A, class B, class C>
__global__ void __launch_bounds__(kThreads)
    entry(const __grid_constant__ A a, const __grid_constant__ B b, const __grid_constant__ C c) {
  K::run(a, b, c, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x));
}
#endif

template <class K, class A, class B, class C>
cudaError_t launch(int64_t blocks, cudaStream_t stream, const A& a, const B& b, const C& c) {
  static_assert(sizeof(A) + sizeof(B) + sizeof(C) <= kParamBytes, "kernel arguments over budget");
  static_assert(sizeof(B) + sizeof(C) <= kOtherParamBytes, "raise kOtherParamBytes");
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  g_launches.fetch_add(1, std::memory_order_relaxed);
#ifdef WDOPT_HOST_EMULATION
  (void)stream;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int thread = 0; thread < kThreads; ++thread) K::run(a, b, c, block, thread);
  }
  return cudaSuccess;
#else
  entry<K, A, B, C><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, b, c);
  return cudaGetLastError();
#endif
}

// Every tensor of a call through UpdateKernel<T, Op>: rows are packed into tables of
// TensorTable::kCapacity and each full table is launched (one launch for most models).
template <typename T, class Op>
cudaError_t update_all(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                       const FirstStepFlag* flags, const Op& op, const GradOptions& grad, cudaStream_t stream) {
  using Table = TensorTable<Op::kDepth>;
  Table table;  // ~32 KB, deliberately not zeroed: rows past n_tensors are never read
  table.n_tensors = 0;
  table.first_tensor = 0;
  int64_t chunks = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.n_tensors == 0) return cudaSuccess;
    table.chunk_begin[table.n_tensors] = static_cast<int32_t>(chunks);
    const cudaError_t err = launch<UpdateKernel<T, Op>>(chunks, stream, table, op, grad);
    table.first_tensor += table.n_tensors;
    table.n_tensors = 0;
    chunks = 0;
    return err;
  };
  for (int64_t i = 0; i < n_tensors; ++i) {
    if (numels[i] < 0) return cudaErrorInvalidValue;
    const int64_t count = (numels[i] + kChunk<T> - 1) / kChunk<T>;
    if (count > INT32_MAX) return cudaErrorInvalidValue;
    if (table.n_tensors == Table::kCapacity || chunks + count > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int r = table.n_tensors++;
    for (int d = 0; d < Op::kDepth; ++d) table.ptr[d][r] = const_cast<void*>(columns[d][i]);
    table.numel[r] = numels[i];
    table.chunk_begin[r] = static_cast<int32_t>(chunks);
    table.flag[r] = flags != nullptr ? flags[i] : nullptr;
    chunks += count;
  }
  return flush();
}

// The single dtype dispatch: f(T{}) with the storage type of ``dtype``.
template <class F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<bool, value>): turns a runtime flag into a template argument.
template <class F> cudaError_t dispatch_bool(bool value, F&& f) {
  return value ? f(std::true_type{}) : f(std::false_type{});
}

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

// The table entry owning ``block``: the last entry whose blocks start at or before it.
WDOPT_HD int find_entry(const int32_t* begin, int n, int64_t block) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (begin[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
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
// no limit in the host emulation.
int64_t shared_memory_optin_bytes() {
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

// ------------------------------------------------------------------------------------ telemetry

// The tensors of one telemetry launch: the update kernels' columns plus each tensor's telemetry
// buffer and row count; blocks are numbered tensor after tensor, kThreads / G rows per block.
template <int DEPTH> struct TelemetryTable {
  static constexpr int kRowBytes = DEPTH * 8 + 8 + 8 + 8 + 8 + 4 + 1;
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);

  void* ptr[DEPTH][kCapacity];
  double* telemetry[kCapacity];
  int64_t numel[kCapacity];
  int64_t rows[kCapacity];
  int32_t block_begin[kCapacity + 1];
  int32_t n_tensors;
  int32_t first_tensor;
  FirstStepFlag flag[kCapacity];
  uint8_t group_log2[kCapacity];
};

// The monitored update: the same element function as update_block (so parameters and state are
// bit-identical), walked row by row with the telemetry sums reduced per row.
template <typename T, class Op> struct TelemetryKernel {
  using Table = TelemetryTable<Op::kDepth>;
  static constexpr int kMinBlocks = 1;  // __launch_bounds__ hint: resident blocks per SM
  WDOPT_BLOCK static void run_block(const Table& table, const Op& op, const GradOptions& grad, int64_t block,
                                    unsigned char* shared) {
    using M = opmath_t<T>;
    constexpr int D = Op::kDepth;
    if (step_skipped(grad.found_inf)) return;
    const int e = find_entry(table.block_begin, table.n_tensors, block);
    const int lg = table.group_log2[e];
    const int64_t rows = table.rows[e];
    const int64_t cols = table.numel[e] / rows;
    const int64_t first_row = (block - table.block_begin[e]) << (kLog2Threads - lg);
    const typename Op::Context ctx = op.context(table.first_tensor + e, table.flag[e]);
    const bool unscale = grad.grad_scale.ptr != nullptr;
    const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);
    const double inv_scale_d = inverse_scale(grad);
    double* red = reinterpret_cast<double*>(shared);
    const Block blk{};
    blk.each([&](int t) {
      double acc[4] = {0, 0, 0, 0};
      const int64_t row = first_row + (t >> lg);
      if (row < rows) {
        const int64_t end = (row + 1) * cols;
        for (int64_t j = row * cols + (t & ((1 << lg) - 1)); j < end; j += int64_t{1} << lg) {
          M x[D];
          WDOPT_UNROLL
          for (int d = 0; d < D; ++d) x[d] = to_math(static_cast<const T*>(table.ptr[d][e])[j]);
          const T old = static_cast<const T*>(table.ptr[0][e])[j];
          const T g = static_cast<const T*>(table.ptr[1][e])[j];
          if (unscale) x[1] = x[1] * inv_scale;
          if (grad.maximize) x[1] = -x[1];
          op.update(ctx, x);
          WDOPT_UNROLL
          for (int d = 0; d < D; ++d) {
            if ((Op::kWrites >> d) & 1u) static_cast<T*>(table.ptr[d][e])[j] = to_storage<T>(x[d]);
          }
          telemetry_add(acc, old, to_storage<T>(x[0]), g, inv_scale_d);
        }
      }
      WDOPT_UNROLL
      for (int k = 0; k < 4; ++k) red[k * kThreads + t] = acc[k];
    });
    group_reduce<4>(blk, red, lg);
    blk.each([&](int t) {
      const int64_t row = first_row + (t >> lg);
      if ((t & ((1 << lg) - 1)) != 0 || row >= rows) return;
      WDOPT_UNROLL
      for (int k = 0; k < 4; ++k) table.telemetry[e][row * 4 + k] = red[k * kThreads + t];
    });
  }
};

// update_all's monitored twin: every tensor of a call through TelemetryKernel<T, Op>.
template <typename T, class Op>
cudaError_t telemetry_all(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                          const FirstStepFlag* flags, const Telemetry& telemetry, const Op& op, const GradOptions& grad,
                          cudaStream_t stream) {
  using Table = TelemetryTable<Op::kDepth>;
  Table table;  // deliberately not zeroed: rows past n_tensors are never read
  table.n_tensors = 0;
  table.first_tensor = 0;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.n_tensors == 0) return cudaSuccess;
    table.block_begin[table.n_tensors] = static_cast<int32_t>(blocks);
    const cudaError_t err =
        launch_rows<TelemetryKernel<T, Op>>(blocks, 4 * kThreads * sizeof(double), stream, table, op, grad);
    table.first_tensor += table.n_tensors;
    table.n_tensors = 0;
    blocks = 0;
    return err;
  };
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t rows = telemetry.rows[i];
    if (numels[i] < 0 || rows < 1 || numels[i] % rows != 0 || telemetry.buffers[i] == nullptr) {
      return cudaErrorInvalidValue;
    }
    const int lg = group_log2(numels[i] / rows);
    const int64_t count = (rows + (kThreads >> lg) - 1) >> (kLog2Threads - lg);
    if (count > INT32_MAX) return cudaErrorInvalidValue;
    if (table.n_tensors == Table::kCapacity || blocks + count > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int r = table.n_tensors++;
    for (int d = 0; d < Op::kDepth; ++d) table.ptr[d][r] = const_cast<void*>(columns[d][i]);
    table.telemetry[r] = telemetry.buffers[i];
    table.numel[r] = numels[i];
    table.rows[r] = rows;
    table.block_begin[r] = static_cast<int32_t>(blocks);
    table.group_log2[r] = static_cast<uint8_t>(lg);
    table.flag[r] = flags != nullptr ? flags[i] : nullptr;
    blocks += count;
  }
  return flush();
}

// Either engine, by whether the call is monitored.
template <typename T, class Op>
cudaError_t update_or_monitor(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                              const FirstStepFlag* flags, const Telemetry& telemetry, const Op& op,
                              const GradOptions& grad, cudaStream_t stream) {
  if (telemetry.buffers != nullptr) {
    if (telemetry.rows == nullptr) return cudaErrorInvalidValue;
    return telemetry_all<T>(columns, n_tensors, numels, flags, telemetry, op, grad, stream);
  }
  return update_all<T>(columns, n_tensors, numels, flags, op, grad, stream);
}

// ------------------------------------------------------------------------------------ AdamW

template <typename M> struct AdamWCoefficientArgs {
  AdamWHyper hyper;
  DeviceScalar lr_tensor;
  AdamWCoefficients<M>* out;  // the scratch buffer, one entry per tensor of the call
};

// One thread per tensor: t = step + 1 (float32, as torch's step tensor), written back unless
// found_inf, and this step's coefficients into the scratch buffer.
template <typename M> struct AdamWCoefficientKernel {
  WDOPT_HD static void run(const StepTable& steps, const AdamWCoefficientArgs<M>& args, const DeviceScalar& found_inf,
                           int64_t block, int thread) {
    const int64_t i = block * kThreads + thread;
    if (i >= steps.n_tensors || step_skipped(found_inf)) return;
    const float t = *steps.step[i] + 1.0f;
    args.out[steps.first_tensor + i] =
        adamw_coefficients<M>(args.hyper, lr_value(args.hyper.lr, args.lr_tensor), static_cast<double>(t));
    *steps.step[i] = t;
  }
};

// Streams: param, grad, exp_avg, exp_avg_sq (, max_exp_avg_sq).
template <typename M, bool AMSGRAD> struct AdamWOp {
  static constexpr int kDepth = AMSGRAD ? 5 : 4;
  static constexpr unsigned kWrites = AMSGRAD ? 0b11101u : 0b1101u;
  using Context = AdamWCoefficients<M>;
  const AdamWCoefficients<M>* coefficients;

  WDOPT_HD Context context(int tensor, FirstStepFlag) const { return coefficients[tensor]; }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const {
    if constexpr (AMSGRAD) {
      adamw_update<true>(x[0], x[1], x[2], x[3], x[4], c);
    } else {
      M unused = M(0);
      adamw_update<false>(x[0], x[1], x[2], x[3], unused, c);
    }
  }
};

template <typename M> cudaError_t adamw_coefficients_all(const AdamWArgs& a, AdamWCoefficients<M>* out, cudaStream_t stream) {
  const AdamWCoefficientArgs<M> args{
      AdamWHyper{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decay_lr_scale}, a.lr_tensor, out};
  StepTable table;
  for (int64_t first = 0; first < a.n_tensors; first += StepTable::kCapacity) {
    const int64_t n = a.n_tensors - first < StepTable::kCapacity ? a.n_tensors - first : StepTable::kCapacity;
    for (int64_t i = 0; i < n; ++i) table.step[i] = a.steps[first + i];
    table.n_tensors = static_cast<int32_t>(n);
    table.first_tensor = static_cast<int32_t>(first);
    const cudaError_t err =
        launch<AdamWCoefficientKernel<M>>((n + kThreads - 1) / kThreads, stream, table, args, a.grad.found_inf);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------ SGD

template <typename M, bool HAS_MOMENTUM, bool NESTEROV, bool DECOUPLED> struct SGDOp {
  // Streams: param, grad (, momentum_buffer).
  static constexpr int kDepth = HAS_MOMENTUM ? 3 : 2;
  static constexpr unsigned kWrites = HAS_MOMENTUM ? 0b101u : 0b1u;
  struct Context {
    SGDCoefficients<M> c;
    bool first_step;
  };
  SGDHyper hyper;
  DeviceScalar lr_tensor;

  WDOPT_HD Context context(int, FirstStepFlag first_step) const {
    return Context{sgd_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)), is_first_step(first_step)};
  }
  WDOPT_HD void update(const Context& ctx, M (&x)[kDepth]) const {
    if constexpr (HAS_MOMENTUM) {
      sgd_update<true, NESTEROV, DECOUPLED>(x[0], x[1], x[2], ctx.first_step, ctx.c);
    } else {
      M unused = M(0);
      sgd_update<false, NESTEROV, DECOUPLED>(x[0], x[1], unused, false, ctx.c);
    }
  }
};

// ------------------------------------------------------------------------------------ Lion

template <typename M> struct LionOp {
  // Streams: param, grad, exp_avg.
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b101u;
  using Context = LionCoefficients<M>;
  LionHyper hyper;
  DeviceScalar lr_tensor;

  WDOPT_HD Context context(int, FirstStepFlag) const { return lion_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)); }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const { lion_update(x[0], x[1], x[2], c); }
};

// ------------------------------------------------------------------------------------ rotational

// This step's per-tensor scalars, written by the prologue and read by every block of the tensor.
template <typename M> struct RotationCoefficients {
  AdamWCoefficients<M> adamw;  // decay-free (weight_decay 0): only the direction's scalars are used
  M inv_bias_correction1;      // 1/(1 − β1^t), rounded as the reference rounds it
  double undf_bias_correction; // 1 − undf^k
  int32_t first;               // k was 0: this step freezes the row norms
};

// Step counts of one prologue launch: one thread per tensor.
struct RotationStepTable {
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 16) / (2 * sizeof(float*)));
  float* rotational_step[kCapacity];
  float* step[kCapacity];  // AdamW only
  int32_t n_tensors;
  int32_t first_tensor;
};

template <typename M> struct RotationPrologueArgs {
  double lr, beta1, beta2, eps, undf;
  int32_t adamw;
  RotationCoefficients<M>* out;
};

// k = k + 1 (and AdamW's t = t + 1), written back unless found_inf, and the coefficients of the
// step, computed in double as the CPU kernel computes them.
template <typename M> struct RotationPrologueKernel {
  WDOPT_HD static void run(const RotationStepTable& steps, const RotationPrologueArgs<M>& a,
                           const DeviceScalar& found_inf, int64_t block, int thread) {
    const int64_t i = block * kThreads + thread;
    if (i >= steps.n_tensors || step_skipped(found_inf)) return;
    RotationCoefficients<M> c{};
    const float k_before = *steps.rotational_step[i];
    const float k = k_before + 1.0f;
    c.first = k_before == 0.0f ? 1 : 0;
    c.undf_bias_correction = 1.0 - pow(a.undf, static_cast<double>(k));
    if (a.adamw) {
      const float t = *steps.step[i] + 1.0f;
      c.adamw = adamw_coefficients<M>(AdamWHyper{a.lr, a.beta1, a.beta2, a.eps, 0.0, 1.0}, a.lr, static_cast<double>(t));
      c.inv_bias_correction1 = M(1) / static_cast<M>(1.0 - pow(a.beta1, static_cast<double>(t)));
      *steps.step[i] = t;
    } else {
      c.adamw = AdamWCoefficients<M>{};
      c.inv_bias_correction1 = M(1);
    }
    *steps.rotational_step[i] = k;
    a.out[steps.first_tensor + i] = c;
  }
};

// The rotational tensors of one row launch. ``tel_split``: telemetry rows per rotation row.
struct RotationTable {
  static constexpr int kRowBytes = 7 * 8 + 8 + 8 + 8 + 4 + 4 + 1;
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);

  void* param[kCapacity];
  const void* grad[kCapacity];
  void* state1[kCapacity];
  void* state2[kCapacity];
  void* norm[kCapacity];
  void* s_avg[kCapacity];
  double* telemetry[kCapacity];
  int64_t rows[kCapacity];
  int64_t cols[kCapacity];
  int32_t tel_split[kCapacity];
  int32_t block_begin[kCapacity + 1];
  FirstStepFlag flag[kCapacity];  // SGD: fresh momentum buffer
  int32_t n_tensors;
  int32_t first_tensor;
  uint8_t group_log2[kCapacity];
};

template <typename M> struct RotationArgs {
  double angle, lr, undf, eps;
  const RotationCoefficients<M>* coefficients;
  LionCoefficients<M> lion;
  M momentum;
  int32_t on_chip;  // elements of the on-chip row buffers of a block (a multiple of kThreads)
  bool zero_mean, projected;
};

enum DirectionKind : int { kAdamW = 0, kLion = 1, kSGDPlain = 2, kSGDMomentum = 3, kSGDNesterov = 4 };

template <typename T> struct DirectionContext {
  AdamWCoefficients<opmath_t<T>> adamw;
  opmath_t<T> inv_bias_correction1;
  LionCoefficients<opmath_t<T>> lion;
  opmath_t<T> momentum;
  bool first_step;
  T* state1;
  T* state2;
};

// u_j from the unscaled gradient g_j (csrc/include/wdopt/*.h), the state written back if ``write``.
template <typename T, int KIND>
WDOPT_HD opmath_t<T> direction(const DirectionContext<T>& c, opmath_t<T> g, int64_t j, bool write) {
  using M = opmath_t<T>;
  if constexpr (KIND == kAdamW) {
    M m = to_math(c.state1[j]), v = to_math(c.state2[j]);
    const M u = adamw_direction(g, m, v, c.inv_bias_correction1, c.adamw);
    if (write) {
      c.state1[j] = to_storage<T>(m);
      c.state2[j] = to_storage<T>(v);
    }
    return u;
  } else if constexpr (KIND == kLion) {
    M m = to_math(c.state1[j]);
    const M u = lion_direction(g, m, c.lion);
    if (write) c.state1[j] = to_storage<T>(m);
    return u;
  } else if constexpr (KIND == kSGDPlain) {
    (void)c, (void)j, (void)write;
    return g;
  } else {
    M b = to_math(c.state1[j]);
    const M u = sgd_direction<true, KIND == kSGDNesterov>(g, b, c.first_step, c.momentum);
    if (write) c.state1[j] = to_storage<T>(b);
    return u;
  }
}

// Per-row scalars in shared memory (one per group).
template <typename M> struct RowScalars {
  // Sums. On chip Σu, Σp, Σp², Σu·p, summed in M as the CPU kernel sums them (held exactly here,
  // used as M). Two-pass Σa, Σb, Σa², Σb², Σa·b (a = u − ku, b = p − kp), summed in double: ‖t‖²
  // and the norm of q are differences of these moments, which cancel when u is mostly radial.
  double s[5];
  M ku, kp;  // two-pass pivots: u and p of the row's first element
  M n, mean_u, radial, step, mean_q, to_sphere, centred_qq;
};
static_assert(sizeof(RowScalars<double>) * kMaxGroups <= kGroupBytes, "raise kGroupBytes");

template <typename T> size_t rotation_shared_bytes(int64_t on_chip) {
  return kRowHeaderBytes + static_cast<size_t>(on_chip) * (sizeof(opmath_t<T>) + sizeof(T));
}

// One block: kThreads / G rotation rows of one tensor (the CPU kernel's rotate_row, per group).
// On chip (the row fits the group's share of the row buffers): the row is read once (u into the
// buffer, p kept as stored) and the phases of rotate_row run on the buffer, sums from the values
// themselves. Longer rows: pass 1 computes u without writing state and sums pivot-shifted moments
// in double (so a nearly constant u, an uncentred p or a mostly radial u loses nothing to
// cancellation); ‖t‖², the centred norm of q and its mean follow in closed form from these
// moments; pass 2 recomputes u, writes state and p.
template <typename T, int KIND> struct RotationalRowKernel {
  using M = opmath_t<T>;
  // __launch_bounds__ hint: 3 resident blocks per SM caps registers at 80 per thread. Where ptxas
  // (CUDA 13, sm_80/sm_90) meets that without spilling, ask for it: 16-bit storage (64-77
  // registers unhinted) and fp32 Lion / plain SGD (90-96). fp32 AdamW and momentum SGD (96-108)
  // and fp64 (104-124) would spill 20-104 bytes (24-88 byte stack frames): left unhinted, at 2
  // blocks per SM (which is also what full-size row buffers allow: about 77 KB of shared memory
  // per block).
  static constexpr int kMinBlocks =
      (sizeof(T) == 2 || (sizeof(T) == 4 && (KIND == kLion || KIND == kSGDPlain))) ? 3 : 1;
  WDOPT_BLOCK static void run_block(const RotationTable& table, const RotationArgs<M>& args, const GradOptions& grad,
                                    int64_t block, unsigned char* shared) {
    if (step_skipped(grad.found_inf)) return;
    const int e = find_entry(table.block_begin, table.n_tensors, block);
    const int lg = table.group_log2[e];
    const int G = 1 << lg;
    const int64_t rows = table.rows[e], cols = table.cols[e];
    const int64_t first_row = (block - table.block_begin[e]) << (kLog2Threads - lg);
    const RotationCoefficients<M> rc = args.coefficients[table.first_tensor + e];
    const bool first = rc.first != 0;
    const DirectionContext<T> dc{rc.adamw, rc.inv_bias_correction1, args.lion, args.momentum, is_first_step(table.flag[e]),
                                 static_cast<T*>(table.state1[e]), static_cast<T*>(table.state2[e])};
    T* const p = static_cast<T*>(table.param[e]);
    const T* const g = static_cast<const T*>(table.grad[e]);
    M* const norm = static_cast<M*>(table.norm[e]);
    M* const s_avg = static_cast<M*>(table.s_avg[e]);
    const bool unscale = grad.grad_scale.ptr != nullptr;
    const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);
    const bool maximize = grad.maximize;
    auto grad_at = [&](int64_t j) {
      M x = to_math(g[j]);
      if (unscale) x = x * inv_scale;
      return maximize ? -x : x;
    };
    M* const red = reinterpret_cast<M*>(shared);
    RowScalars<M>* const rs = reinterpret_cast<RowScalars<M>*>(shared + kReductionBytes);
    const int64_t share = args.on_chip >> (kLog2Threads - lg);  // buffer elements per group
    M* const buf_u = reinterpret_cast<M*>(shared + kRowHeaderBytes);
    T* const buf_p = reinterpret_cast<T*>(shared + kRowHeaderBytes + static_cast<size_t>(args.on_chip) * sizeof(M));
    const bool zero_mean = args.zero_mean;
    const M size = static_cast<M>(cols);
    const Block blk{};
    // The row of thread t, or -1; its group's first thread ("leader") writes the row scalars.
    auto row_of = [&](int t) { const int64_t r = first_row + (t >> lg); return r < rows ? r : int64_t{-1}; };
    auto leader = [&](int t) { return (t & (G - 1)) == 0 && row_of(t) >= 0; };

    // The step (p − step·t) from ‖t‖², as rotate_row computes it; the leader of the row.
    auto step_from = [&](int64_t row, double tangent_sq, M n) {
      double scale;
      if (args.projected) {
        scale = args.lr;
      } else {
        const double s = args.undf * static_cast<double>(s_avg[row]) + (1.0 - args.undf) * tangent_sq;
        s_avg[row] = static_cast<M>(s);
        scale = args.angle * static_cast<double>(n) / (sqrt(s / rc.undf_bias_correction) + args.eps);
      }
      return static_cast<M>(scale);
    };
    // The exact (centred) norm of the row as stored, for its first step: one more sum.
    auto freeze_norm = [&](auto&& value_at) {
      blk.each([&](int t) {
        M c2 = 0;
        const int64_t row = row_of(t);
        if (row >= 0) {
          const M mean = zero_mean ? rs[t >> lg].mean_q : M(0);  // mean_q holds mean(p) here
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M c = value_at(t, row, j) - mean;
            c2 += c * c;
          }
        }
        red[t] = c2;
      });
      group_reduce<1>(blk, red, lg);
      blk.each([&](int t) {
        if (leader(t)) norm[row_of(t)] = sqrt(red[t]);
      });
      blk.sync();
    };

    if (cols <= share) {
      // ---- on chip: rotate_row's phases on the row buffers
      blk.each([&](int t) {
        M su = 0, sp = 0, spp = 0, sup = 0;
        const int64_t row = row_of(t);
        if (row >= 0) {
          M* const bu = buf_u + (t >> lg) * share;
          T* const bp = buf_p + (t >> lg) * share;
          const int64_t base = row * cols;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M u = direction<T, KIND>(dc, grad_at(base + j), base + j, true);
            const T pt = p[base + j];
            const M pj = to_math(pt);
            bu[j] = u;
            bp[j] = pt;
            su += u;
            sp += pj;
            spp += pj * pj;
            sup += u * pj;
          }
        }
        red[t] = su;
        red[kThreads + t] = sp;
        red[2 * kThreads + t] = spp;
        red[3 * kThreads + t] = sup;
      });
      group_reduce<4>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        WDOPT_UNROLL
        for (int k = 0; k < 4; ++k) r.s[k] = red[k * kThreads + t];
        r.mean_q = static_cast<M>(r.s[1]) / size;
      });
      blk.sync();
      if (first) freeze_norm([&](int t, int64_t, int64_t j) { return to_math(buf_p[(t >> lg) * share + j]); });
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.n = norm[row_of(t)];
        r.mean_u = zero_mean ? static_cast<M>(r.s[0]) / size : M(0);
        r.radial = r.n > 0 ? (static_cast<M>(r.s[3]) - r.mean_u * static_cast<M>(r.s[1])) / (r.n * r.n) : M(0);
      });
      blk.sync();
      // t = u − mean(u) − p·radial and ‖t‖²
      blk.each([&](int t) {
        M ts = 0;
        if (row_of(t) >= 0) {
          const RowScalars<M>& r = rs[t >> lg];
          M* const bu = buf_u + (t >> lg) * share;
          const T* const bp = buf_p + (t >> lg) * share;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M tj = bu[j] - r.mean_u - to_math(bp[j]) * r.radial;
            bu[j] = tj;
            ts += tj * tj;
          }
        }
        red[t] = ts;
      });
      group_reduce<1>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.step = step_from(row_of(t), static_cast<double>(red[t]), r.n);
      });
      blk.sync();
      // q = p − step·t, Σq, Σq²
      blk.each([&](int t) {
        M sq = 0, sqq = 0;
        if (row_of(t) >= 0) {
          const M step = rs[t >> lg].step;
          M* const bu = buf_u + (t >> lg) * share;
          const T* const bp = buf_p + (t >> lg) * share;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M q = to_math(bp[j]) - step * bu[j];
            bu[j] = q;
            sq += q;
            sqq += q * q;
          }
        }
        red[t] = sq;
        red[kThreads + t] = sqq;
      });
      group_reduce<2>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.mean_q = zero_mean ? red[t] / size : M(0);
        r.centred_qq = red[kThreads + t] - size * r.mean_q * r.mean_q;
      });
      blk.sync();
      if (first && zero_mean) {  // p may not be centred yet: the centred norm of q, summed exactly
        blk.each([&](int t) {
          M c2 = 0;
          if (row_of(t) >= 0) {
            const M mean = rs[t >> lg].mean_q;
            const M* const bu = buf_u + (t >> lg) * share;
            for (int64_t j = t & (G - 1); j < cols; j += G) c2 += (bu[j] - mean) * (bu[j] - mean);
          }
          red[t] = c2;
        });
        group_reduce<1>(blk, red, lg);
        blk.each([&](int t) {
          if (leader(t)) rs[t >> lg].centred_qq = red[t];
        });
        blk.sync();
      }
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.to_sphere = r.centred_qq > 0 ? r.n / sqrt(r.centred_qq) : M(0);  // a zero row stays zero
      });
      blk.sync();
      write_rows(blk, table, e, lg, first_row, shared, grad, [&](int t, int64_t, int64_t j, T& old) {
        const RowScalars<M>& r = rs[t >> lg];
        old = buf_p[(t >> lg) * share + j];
        return (buf_u[(t >> lg) * share + j] - r.mean_q) * r.to_sphere;
      });
      return;
    }

    // ---- two passes over memory. Pass 1: pivot-shifted moments of u and p in double (the
    // reduction slots read as doubles), state unwritten.
    double* const red_d = reinterpret_cast<double*>(shared);
    blk.each([&](int t) {
      double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
      const int64_t row = row_of(t);
      if (row >= 0) {
        const int64_t base = row * cols;
        const M ku = direction<T, KIND>(dc, grad_at(base), base, false);
        const M kp = to_math(p[base]);
        for (int64_t j = base + (t & (G - 1)); j < base + cols; j += G) {
          const double a =
              static_cast<double>(direction<T, KIND>(dc, grad_at(j), j, false)) - static_cast<double>(ku);
          const double b = static_cast<double>(to_math(p[j])) - static_cast<double>(kp);
          sa += a;
          sb += b;
          saa += a * a;
          sbb += b * b;
          sab += a * b;
        }
        if ((t & (G - 1)) == 0) {
          rs[t >> lg].ku = ku;
          rs[t >> lg].kp = kp;
        }
      }
      red_d[t] = sa;
      red_d[kThreads + t] = sb;
      red_d[2 * kThreads + t] = saa;
      red_d[3 * kThreads + t] = sbb;
      red_d[4 * kThreads + t] = sab;
    });
    group_reduce<5>(blk, red_d, lg);
    blk.each([&](int t) {
      if (!leader(t)) return;
      RowScalars<M>& r = rs[t >> lg];
      WDOPT_UNROLL
      for (int k = 0; k < 5; ++k) r.s[k] = red_d[k * kThreads + t];
      r.mean_q = static_cast<M>(static_cast<double>(r.kp) + r.s[1] / static_cast<double>(cols));  // mean(p)
    });
    blk.sync();
    if (first) freeze_norm([&](int, int64_t row, int64_t j) { return to_math(p[row * cols + j]); });
    // Closed forms, in double from the sums (docs/theory.md section 3.3).
    blk.each([&](int t) {
      if (!leader(t)) return;
      RowScalars<M>& r = rs[t >> lg];
      const double C = static_cast<double>(cols), inv_C = 1.0 / C;
      const double sa = r.s[0], sb = r.s[1], saa = r.s[2], sbb = r.s[3], sab = r.s[4];
      const double ma = sa * inv_C, mb = sb * inv_C;
      const double mean_u = static_cast<double>(r.ku) + ma, mean_p = static_cast<double>(r.kp) + mb;
      double vu = saa - sa * ma, vp = sbb - sb * mb;  // Σ(u − mean u)², Σ(p − mean p)²
      vu = vu > 0 ? vu : 0.0;
      vp = vp > 0 ? vp : 0.0;
      const double cov = sab - sa * mb;               // Σ(u − mean u)(p − mean p)
      const double spp = vp + C * mean_p * mean_p;    // Σp²
      const M n = norm[row_of(t)];
      r.n = n;
      r.mean_u = zero_mean ? static_cast<M>(mean_u) : M(0);
      const double delta = mean_u - static_cast<double>(r.mean_u);  // mean of u − mean_u as applied
      const double cross = cov + delta * C * mean_p;                  // Σ(u − mean_u)·p
      r.radial = n > 0 ? static_cast<M>(cross / (static_cast<double>(n) * static_cast<double>(n))) : M(0);
      const double rad = r.radial;
      // t = (u − mean_u) − radial·p: ‖t‖² from the moments
      double tangent_sq = vu + C * delta * delta - 2.0 * rad * cross + rad * rad * spp;
      tangent_sq = tangent_sq > 0 ? tangent_sq : 0.0;
      r.step = step_from(row_of(t), tangent_sq, n);
      const double step = r.step;
      // q = p − step·t: centred parts q_c = p_c − step·(u_c − radial·p_c)
      const double cross_c = cov - rad * vp;                           // Σp_c·t_c
      const double vt = vu - 2.0 * rad * cov + rad * rad * vp;         // Σt_c²
      double qq_c = vp - 2.0 * step * cross_c + step * step * vt;
      qq_c = qq_c > 0 ? qq_c : 0.0;
      const double mean_q = mean_p - step * (delta - rad * mean_p);
      r.mean_q = zero_mean ? static_cast<M>(mean_q) : M(0);
      const double off = mean_q - static_cast<double>(r.mean_q);
      const double qq = qq_c + C * off * off;
      r.to_sphere = qq > 0 ? static_cast<M>(static_cast<double>(n) / sqrt(qq)) : M(0);
    });
    blk.sync();
    // Pass 2: u again (the state is unchanged), state and p written.
    write_rows(blk, table, e, lg, first_row, shared, grad, [&](int t, int64_t base, int64_t j, T& old) {
      const RowScalars<M>& r = rs[t >> lg];
      const T pt = p[base + j];
      old = pt;
      const M pj = to_math(pt);
      const M u = direction<T, KIND>(dc, grad_at(base + j), base + j, true);
      const M q = pj - r.step * (u - r.mean_u - pj * r.radial);
      return (q - r.mean_q) * r.to_sphere;
    });
  }

  // The last phase: p ← value(t, base, j, old) for every element of the block's rows (``old``: p as
  // stored before), with the telemetry sums per telemetry row (tel_split of them per rotation row).
  template <class F>
  WDOPT_BLOCK static void write_rows(const Block& blk, const RotationTable& table, int e, int lg, int64_t first_row,
                                     unsigned char* shared, const GradOptions& grad, F&& value) {
    const int G = 1 << lg;
    const int64_t rows = table.rows[e], cols = table.cols[e];
    T* const p = static_cast<T*>(table.param[e]);
    const T* const g = static_cast<const T*>(table.grad[e]);
    double* const tel = table.telemetry[e];
    const int64_t segments = tel != nullptr ? table.tel_split[e] : 1;
    const int64_t seg_len = cols / segments;
    const double inv_scale = inverse_scale(grad);
    double* const red = reinterpret_cast<double*>(shared);
    for (int64_t s = 0; s < segments; ++s) {
      blk.each([&](int t) {
        double acc[4] = {0, 0, 0, 0};
        const int64_t row = first_row + (t >> lg);
        if (row < rows) {
          const int64_t base = row * cols;
          for (int64_t j = s * seg_len + (t & (G - 1)); j < (s + 1) * seg_len; j += G) {
            T old;
            const T now = to_storage<T>(value(t, base, j, old));
            p[base + j] = now;
            if (tel != nullptr) telemetry_add(acc, old, now, g[base + j], inv_scale);
          }
        }
        if (tel != nullptr) {
          WDOPT_UNROLL
          for (int k = 0; k < 4; ++k) red[k * kThreads + t] = acc[k];
        }
      });
      if (tel == nullptr) continue;
      group_reduce<4>(blk, red, lg);
      blk.each([&](int t) {
        const int64_t row = first_row + (t >> lg);
        if ((t & (G - 1)) != 0 || row >= rows) return;
        WDOPT_UNROLL
        for (int k = 0; k < 4; ++k) tel[(row * segments + s) * 4 + k] = red[k * kThreads + t];
      });
      blk.sync();
    }
  }
};

template <typename T, int KIND>
cudaError_t rotational_rows(const RotationalArgs& a, const RotationArgs<opmath_t<T>>& base_args, int64_t limit,
                            cudaStream_t stream) {
  RotationTable table;  // deliberately not zeroed: rows past n_tensors are never read
  table.n_tensors = 0;
  table.first_tensor = 0;
  int64_t blocks = 0, on_chip = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.n_tensors == 0) return cudaSuccess;
    table.block_begin[table.n_tensors] = static_cast<int32_t>(blocks);
    RotationArgs<opmath_t<T>> args = base_args;
    args.on_chip = static_cast<int32_t>(on_chip);
    const cudaError_t err = launch_rows<RotationalRowKernel<T, KIND>>(blocks, rotation_shared_bytes<T>(on_chip),
                                                                      stream, table, args, a.grad);
    table.first_tensor += table.n_tensors;
    table.n_tensors = 0;
    blocks = 0;
    on_chip = 0;
    return err;
  };
  for (int64_t i = 0; i < a.n_tensors; ++i) {
    const int64_t rows = a.rows[i];
    if (rows < 1 || a.numels[i] < 0 || a.numels[i] % rows != 0) return cudaErrorInvalidValue;
    // Empty tensors (rows of 0 elements) take their blocks as any other: the rows then do what the
    // CPU kernel's rotate_row does with them (norm 0 frozen, s_avg decayed, zero telemetry rows),
    // and table slot e is call position first_tensor + e (the prologue's coefficient index).
    const int64_t cols = a.numels[i] / rows;
    int64_t split = 1;
    if (a.telemetry.buffers != nullptr) {
      const int64_t tel_rows = a.telemetry.rows[i];
      if (a.telemetry.buffers[i] == nullptr || tel_rows < rows || tel_rows % rows != 0 ||
          cols % (tel_rows / rows) != 0 || tel_rows / rows > INT32_MAX) {
        return cudaErrorInvalidValue;
      }
      split = tel_rows / rows;
    }
    const int lg = group_log2(cols);
    const int64_t count = (rows + (kThreads >> lg) - 1) >> (kLog2Threads - lg);
    if (count > INT32_MAX) return cudaErrorInvalidValue;
    if (table.n_tensors == RotationTable::kCapacity || blocks + count > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int r = table.n_tensors++;
    table.param[r] = a.params[i];
    table.grad[r] = a.grads[i];
    table.state1[r] = a.state1 != nullptr ? a.state1[i] : nullptr;
    table.state2[r] = a.state2 != nullptr ? a.state2[i] : nullptr;
    table.norm[r] = a.rotational_norms[i];
    table.s_avg[r] = a.update_norm_avgs[i];
    table.telemetry[r] = a.telemetry.buffers != nullptr ? a.telemetry.buffers[i] : nullptr;
    table.rows[r] = rows;
    table.cols[r] = cols;
    table.tel_split[r] = static_cast<int32_t>(split);
    table.block_begin[r] = static_cast<int32_t>(blocks);
    table.group_log2[r] = static_cast<uint8_t>(lg);
    table.flag[r] = a.first_steps != nullptr ? a.first_steps[i] : nullptr;
    // Row buffers: as much of the limit as this launch's on-chip rows need (cols per group).
    const int64_t need = cols << (kLog2Threads - lg);
    if (need <= limit && need > on_chip) on_chip = (need + kThreads - 1) / kThreads * kThreads;
    blocks += count;
  }
  return flush();
}

}  // namespace

// ------------------------------------------------------------------------------------ launchers

size_t adamw_scratch_bytes(int64_t n_tensors) {
  static_assert(sizeof(AdamWCoefficients<double>) <= 64 && sizeof(AdamWCoefficients<float>) <= 64, "");
  return static_cast<size_t>(n_tensors > 0 ? n_tensors : 0) * sizeof(AdamWCoefficients<double>);
}

cudaError_t adamw(const AdamWArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX || a.scratch == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    auto* coefficients = static_cast<AdamWCoefficients<M>*>(a.scratch);
    cudaError_t err = adamw_coefficients_all<M>(a, coefficients, stream);
    if (err != cudaSuccess) return err;
    return dispatch_bool(a.amsgrad, [&](auto amsgrad) {
      using Op = AdamWOp<M, decltype(amsgrad)::value>;
      const void* const* columns[] = {a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs};
      return update_or_monitor<T>(columns, a.n_tensors, a.numels, nullptr, a.telemetry, Op{coefficients}, a.grad,
                                  stream);
    });
  });
}

cudaError_t sgd(const SGDArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX) return cudaErrorInvalidValue;
  const SGDHyper hyper{a.lr, a.weight_decay, a.momentum, a.dampening, a.decay_lr_scale, a.nesterov,
                       a.decoupled_weight_decay};
  const bool has_momentum = a.momentum != 0;
  // Nesterov means nothing without momentum. L2 decay with weight_decay == 0 is the reference's
  // "no decay term"; the decoupled form then multiplies by exactly 1 (1 - lr·0), which keeps p
  // bit for bit (signed zeros, infinities), where g + 0·p would not.
  const bool nesterov = has_momentum && a.nesterov;
  const bool decoupled = a.decoupled_weight_decay || a.weight_decay == 0;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    return dispatch_bool(has_momentum, [&](auto momentum) {
      return dispatch_bool(nesterov, [&](auto nest) {
        return dispatch_bool(decoupled, [&](auto dec) {
          constexpr bool kMomentum = decltype(momentum)::value;
          // (no momentum, nesterov) never runs; folding it into (no momentum, plain) saves a kernel.
          using Op = SGDOp<M, kMomentum, kMomentum && decltype(nest)::value, decltype(dec)::value>;
          const void* const* columns[] = {a.params, a.grads, a.momentum_buffers};
          return update_or_monitor<T>(columns, a.n_tensors, a.numels, a.first_steps, a.telemetry,
                                      Op{hyper, a.lr_tensor}, a.grad, stream);
        });
      });
    });
  });
}

cudaError_t lion(const LionArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX) return cudaErrorInvalidValue;
  const LionHyper hyper{a.lr, a.beta1, a.beta2, a.weight_decay, a.decay_lr_scale};
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = LionOp<opmath_t<T>>;
    const void* const* columns[] = {a.params, a.grads, a.exp_avgs};
    return update_or_monitor<T>(columns, a.n_tensors, a.numels, nullptr, a.telemetry, Op{hyper, a.lr_tensor}, a.grad,
                                stream);
  });
}

size_t rotational_scratch_bytes(int64_t n_tensors) {
  static_assert(sizeof(RotationCoefficients<double>) <= 128 && sizeof(RotationCoefficients<float>) <= 128, "");
  return static_cast<size_t>(n_tensors > 0 ? n_tensors : 0) * sizeof(RotationCoefficients<double>);
}

cudaError_t rotational(const RotationalArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX || a.scratch == nullptr || a.rows == nullptr) return cudaErrorInvalidValue;
  if (a.telemetry.buffers != nullptr && a.telemetry.rows == nullptr) return cudaErrorInvalidValue;
  const bool adamw = a.optimizer == RotationalOptimizer::AdamW, lion = a.optimizer == RotationalOptimizer::Lion;
  const bool sgd = a.optimizer == RotationalOptimizer::SGD;
  if (!adamw && !lion && !sgd) return cudaErrorInvalidValue;
  if ((adamw && (a.state1 == nullptr || a.state2 == nullptr || a.steps == nullptr)) ||
      (lion && a.state1 == nullptr) || (sgd && a.momentum != 0 && (a.state1 == nullptr || a.first_steps == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using M = opmath_t<T>;
    auto* coefficients = static_cast<RotationCoefficients<M>*>(a.scratch);
    // The prologue: step counts and this step's scalars, one thread per tensor.
    const RotationPrologueArgs<M> prologue{a.lr, a.beta1, a.beta2, a.eps, a.undf, adamw ? 1 : 0, coefficients};
    RotationStepTable steps;
    for (int64_t first = 0; first < a.n_tensors; first += RotationStepTable::kCapacity) {
      const int64_t n = std::min<int64_t>(a.n_tensors - first, RotationStepTable::kCapacity);
      for (int64_t i = 0; i < n; ++i) {
        steps.rotational_step[i] = a.rotational_steps[first + i];
        steps.step[i] = adamw ? a.steps[first + i] : nullptr;
      }
      steps.n_tensors = static_cast<int32_t>(n);
      steps.first_tensor = static_cast<int32_t>(first);
      const cudaError_t err = launch<RotationPrologueKernel<M>>((n + kThreads - 1) / kThreads, stream, steps,
                                                                prologue, a.grad.found_inf);
      if (err != cudaSuccess) return err;
    }
    RotationArgs<M> args{};
    args.angle = a.angle;
    args.lr = a.lr;
    args.undf = a.undf;
    args.eps = a.rotational_eps;
    args.coefficients = coefficients;
    args.lion = lion_coefficients<M>(LionHyper{a.lr, a.beta1, a.beta2, 0.0, 1.0}, a.lr);
    args.momentum = static_cast<M>(a.momentum);
    args.on_chip = 0;
    args.zero_mean = a.zero_mean;
    args.projected = a.projected;
    // Elements of the row buffers per block: a multiple of kThreads (0: every row takes two passes),
    // within what this device lets a block opt in to (99 KB on sm_86/89, 227 KB on sm_90, 64 KB on
    // sm_75): on a smaller device longer rows take the two-pass path instead of failing to launch.
    const int64_t wanted = a.on_chip_bytes > 0 ? a.on_chip_bytes : kRowBufferBytes;
    const int64_t bytes = std::max<int64_t>(0, std::min<int64_t>(wanted, shared_memory_optin_bytes() -
                                                                             static_cast<int64_t>(kRowHeaderBytes)));
    const int64_t limit = bytes / static_cast<int64_t>(sizeof(M) + sizeof(T)) / kThreads * kThreads;
    if (adamw) return rotational_rows<T, kAdamW>(a, args, limit, stream);
    if (lion) return rotational_rows<T, kLion>(a, args, limit, stream);
    if (a.momentum == 0) return rotational_rows<T, kSGDPlain>(a, args, limit, stream);
    if (a.nesterov) return rotational_rows<T, kSGDNesterov>(a, args, limit, stream);
    return rotational_rows<T, kSGDMomentum>(a, args, limit, stream);
  });
}

int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

}  // namespace cuda
}  // namespace wdopt
