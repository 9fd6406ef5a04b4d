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

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

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

// The tensors of one launch: DEPTH address columns, sizes, chunk prefix sums and one byte of
// per-tensor flags (SGD's "first step"). Passed by value as a kernel argument.
template <int DEPTH> struct TensorTable {
  static constexpr int kRowBytes = DEPTH * 8 + 8 + 4 + 1;
  static constexpr int kCapacity =
      static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);  // 32: counts, padding

  void* ptr[DEPTH][kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_begin[kCapacity + 1];  // chunk_begin[n_tensors]: chunks in this launch
  int32_t n_tensors;
  int32_t first_tensor;  // index in the call of row 0 (AdamW's coefficients are per call)
  uint8_t flag[kCapacity];

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
                       const uint8_t* flags, const Op& op, const GradOptions& grad, cudaStream_t stream) {
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
    table.flag[r] = flags != nullptr ? flags[i] : 0;
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

  WDOPT_HD Context context(int tensor, uint8_t) const { return coefficients[tensor]; }
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

  WDOPT_HD Context context(int, uint8_t first_step) const {
    return Context{sgd_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)), first_step != 0};
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

  WDOPT_HD Context context(int, uint8_t) const { return lion_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)); }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const { lion_update(x[0], x[1], x[2], c); }
};

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
      return update_all<T>(columns, a.n_tensors, a.numels, nullptr, Op{coefficients}, a.grad, stream);
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
          return update_all<T>(columns, a.n_tensors, a.numels, a.first_steps, Op{hyper, a.lr_tensor}, a.grad, stream);
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
    return update_all<T>(columns, a.n_tensors, a.numels, nullptr, Op{hyper, a.lr_tensor}, a.grad, stream);
  });
}

int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

}  // namespace cuda
}  // namespace wdopt
