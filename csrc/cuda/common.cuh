// What every engine of csrc/cuda shares: constants, the kernel-argument budget, scalars and
// storage rounding, 16-byte packs, launching (device or host emulation), dtype dispatch, and the
// binary search by which a block finds its table entry.
//
// Translation units: the engines live in headers (this one; update.cuh, the element-wise update
// engine; rows.cuh and telemetry.cuh, monitored updates row by row; quantized.cuh, 8-bit states;
// rotational.cuh, the rotational row engine), the optimizers' Ops in optimizers.cuh, and the
// launchers of launchers.h in the .cu files that instantiate the kernels: adamw.cu, sgd.cu (with
// sgd_l2.cu, SGD's L2 kernels), lion.cu, rotational.cu and rotational_quantized.cu (the rotational
// kernels with 8-bit states). One file held them all until its nvcc run alone outlasted the rest
// of a 16-core build (84 s); torch's builder runs nvcc once per file,
// in parallel, and the files are cut to cost it about the same (15 to 20 s each on one core, 80 in
// all as before, 2026-11-28). Everything in these headers is in an anonymous namespace (each file
// its own copy, no symbol shared between files by accident) except the launch counter below, of
// which there must be one. No torch headers: csrc/cuda/binding.cpp turns torch tensors into the
// plain tables of launchers.h.
//
// Design
// ------
// * Work unit: one thread block updates one (tensor, chunk) pair; a chunk is kChunkBytes of each
//   stream (param, grad, state...), so every block moves the same number of bytes whatever the
//   dtype. Blocks are numbered tensor after tensor; ``UpdateTable::block_begin`` is the prefix
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
// * Stochastic rounding (``rng`` given, bf16/fp16): the same engines built with SR = true, whose
//   tables carry each tensor's [key, count, index base] pointer; a block hashes its tensor's lane words once
//   (Rounding) and each store hashes the element's offset in the tensor, so the bits are the
//   reference's whatever the chunking. The round-to-nearest kernels are built as before.
// * Compensated bf16 parameters (``corrections`` given): the bf16 engines built with MASTER = 32
//   or 24 (int16 or int8 corrections), whose tables carry each parameter's correction pointer;
//   stream 0 is loaded as the fp32 master weight (Compensation), updated as an fp32 parameter
//   value would be, and stored split. A parameter's 16-byte vector goes with one 16- or 8-byte
//   vector of its corrections; a misaligned correction takes the scalar path.
// * 8-bit states (``scales`` given): quantized.cuh's engine, the same Ops (their update and the
//   math of csrc/include/wdopt), a chunk's states decoded block by block with their old scales,
//   updated, and encoded with the new ones; monitored, TelemetryKernel measures first (QUANT).
// * Bit-for-bit agreement with the CPU backend needs IEEE division and square root (no fast
//   math) and no FMA contraction: build with --fmad=false. The reference (wdopt/reference) then
//   agrees bit for bit too: it takes correctly rounded square roots, as this code does.
//
// Host emulation: with WDOPT_HOST_EMULATION defined, no device code is built and every "launch"
// runs the same block bodies in host loops over blocks and threads, on host memory. Tests use it
// to check the engine's indexing, tails and step logic against the reference without a GPU
// (the update bodies use neither shared memory nor barriers, so their emulation is exact; the row
// engines' and the 8-bit engine's phases run one after another per block, so only a GPU run can
// show a missing barrier).

#pragma once

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
#include "../include/wdopt/rounding.h"
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

// Every launch of every translation unit counts here (launch_count(), in adamw.cu): inline, so
// that the files share one counter; in the anonymous namespace below each would count its own.
inline std::atomic<int64_t> g_launches{0};

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

// ------------------------------------------------------------------------------------ stochastic rounding

// Storage types whose stores may round stochastically; float and double stores always round to
// nearest, so no stochastic-rounding kernels are built for them.
template <typename T> constexpr bool kLowPrecision = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The rounding lane of update stream d (wdopt/reference/rounding.py): stream 0, the parameter, is
// lane 0; stream 1, the gradient, is never stored; state stream d >= 2 is lane d - 1 (the
// operator's order: AdamW exp_avg 1, exp_avg_sq 2, max_exp_avg_sq 3; SGD's buffer and Lion's
// exp_avg 1).
WDOPT_HD constexpr uint32_t stream_lane(int d) { return d == 0 ? 0u : static_cast<uint32_t>(d - 1); }

// The lanes (a bit each) of the streams an Op writes (Op::kWrites, a bit per stream).
constexpr unsigned written_lanes(unsigned writes) { return (writes & 1u) | (writes >> 2) << 1; }

// How a kernel stores its results in T: rounded to nearest (to_storage), or with SR (bf16 and
// fp16 only) stochastically with the bits of (tensor, step, lane, element index), which
// csrc/include/wdopt/rounding.h computes; the CPU kernels' Rounding (csrc/cpu/fused_cpu.cpp) is
// the twin. ``index`` is the element's offset in its tensor, never in a chunk or row: the bits
// must not depend on how a launch cuts the tensor.
template <typename T, bool SR> struct Rounding {
  WDOPT_HD Rounding(const int64_t*, unsigned) {}
  WDOPT_HD T store(uint32_t, int64_t, opmath_t<T> x) const { return to_storage<T>(x); }
  // The ``add`` with which a 24-bit master weight is split (Compensation below): to nearest.
  WDOPT_HD uint32_t master_add(int64_t) const { return 0x80u; }
};

template <typename T> struct Rounding<T, true> {
  static_assert(kLowPrecision<T>, "stochastic rounding stores bf16 or fp16");
  uint32_t stream[4];

  // One tensor's words for this step, for each lane in ``lanes``, from its [key, count, index base]
  // read on the device (the driver advances count after the kernel: a CUDA-graph replay draws new
  // bits), the base folded in (rounding.h). Three hashes a word, which each thread takes once per
  // block: only for the lanes it stores.
  WDOPT_HD Rounding(const int64_t* rng, unsigned lanes) {
    const int64_t key = rng[0], count = rng[1], base = rng[2];
    WDOPT_UNROLL
    for (uint32_t lane = 0; lane < 4; ++lane) {
      stream[lane] = (lanes >> lane) & 1u ? fold_index_base(rounding_stream(key, count, lane), base) : 0u;
    }
  }

  WDOPT_HD T store(uint32_t lane, int64_t index, float x) const {
    const uint32_t bits = rounding_bits(stream[lane], index);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __float2bfloat16_rn(stochastic_round_bf16(x, bits));  // exact: the value is a bf16
    } else {
      return __ushort_as_half(stochastic_round_fp16(x, __half_as_ushort(__float2half_rn(x)), bits));
    }
  }

  // Stochastically: the element's lane-0 word (the parameter's), as the reference's split takes it.
  WDOPT_HD uint32_t master_add(int64_t index) const { return rounding_bits(stream[0], index); }
};

// f(std::integral_constant<bool, SR>): stochastic rounding when ``rng`` is given and T is bf16 or
// fp16 (a float or double call with rng rounds to nearest, as the reference does).
template <typename T, class F> cudaError_t dispatch_rounding(const int64_t* const* rng, F&& f) {
  if constexpr (kLowPrecision<T>) {
    if (rng != nullptr) return f(std::true_type{});
  }
  return f(std::false_type{});
}

// ------------------------------------------------------------------------------------ compensated bf16

// Compensated bf16 parameters (wdopt/reference/rounding.py; rounding.h's Compensated holds the
// encoding): MASTER 32 or 24, a bf16 parameter whose fp32 master weight keeps its low bits in an
// int16 or int8 correction laid out like it; 16: a plain parameter (no correction). The kernels
// load stream 0 as the master weight, update it as an fp32 parameter value, and store it split.
template <int MASTER> struct Compensation {
  static constexpr bool kOn = MASTER != 16;
  using Comp = Compensated<kOn ? MASTER : 32>;
  using C = typename Comp::correction_t;
  // The corrections of one 16-byte parameter vector (16 bytes of int16, 8 of int8): one access.
  static constexpr int kPackBytes = kVec<__nv_bfloat16> * static_cast<int>(sizeof(C));
  struct alignas(kPackBytes) Pack {
    C v[kVec<__nv_bfloat16>];
  };

  WDOPT_HD static bool aligned(const void* c) { return reinterpret_cast<uintptr_t>(c) % kPackBytes == 0; }

  WDOPT_HD static float load(__nv_bfloat16 p, C c) { return Comp::combine(__bfloat16_as_ushort(p), c); }

  // Writes w split into p and c (element ``index`` of its tensor: a 24-bit master's rounding bits)
  // and returns the master weight as stored.
  template <bool SR>
  WDOPT_HD static float store(const Rounding<__nv_bfloat16, SR>& rounding, int64_t index, float w, __nv_bfloat16& p,
                              C& c) {
    uint16_t bits;
    C low;
    Comp::split(w, MASTER == 24 ? rounding.master_add(index) : 0u, bits, low);
    p = __ushort_as_bfloat16(bits);
    c = low;
    return Comp::combine(bits, low);
  }
};

// The lanes whose words a kernel's Rounding hashes: those of the streams it writes, less the
// parameter's where a 32-bit master weight is split exactly (no rounding bits).
constexpr unsigned rounded_lanes(unsigned writes, int master) {
  return written_lanes(writes) & (master == 32 ? ~1u : ~0u);
}

// f(std::integral_constant<int, MASTER>): 24 or 32 with ``corrections`` (bf16 only: a call of
// another dtype with corrections is invalid), else 16. Only bf16 builds compensated kernels.
template <typename T, class F> cudaError_t dispatch_master(void* const* corrections, int master_bits, F&& f) {
  if (corrections == nullptr) return f(std::integral_constant<int, 16>{});
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (master_bits == 32) return f(std::integral_constant<int, 32>{});
    if (master_bits == 24) return f(std::integral_constant<int, 24>{});
  }
  return cudaErrorInvalidValue;
}

// 16 bytes of one stream; loaded and stored as one vector access.
template <typename T> struct alignas(kVectorBytes) Pack {
  T v[kVec<T>];
};

WDOPT_HD bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

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

// The packing loop of every engine: tensor after tensor into ``table`` (entries numbered from 0,
// ``block_begin`` the prefix sum of their block counts), launching each full table. Tables travel
// in the kernel arguments, so a call of more tensors than one table holds takes several launches.
// ``blocks_of(i)``: tensor i's block count (negative: invalid arguments); ``fill(r, i)`` writes
// entry r for tensor i; ``go(blocks)`` launches the packed table.
template <class Table, class BlocksOf, class Fill, class Go>
cudaError_t pack_tables(Table& table, int64_t n_tensors, BlocksOf&& blocks_of, Fill&& fill, Go&& go) {
  table.n_tensors = 0;
  table.first_tensor = 0;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.n_tensors == 0) return cudaSuccess;
    table.block_begin[table.n_tensors] = static_cast<int32_t>(blocks);
    const cudaError_t err = go(blocks);
    table.first_tensor += table.n_tensors;
    table.n_tensors = 0;
    blocks = 0;
    return err;
  };
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t count = blocks_of(i);
    if (count < 0 || count > INT32_MAX) return cudaErrorInvalidValue;
    if (table.n_tensors == Table::kCapacity || blocks + count > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int r = table.n_tensors++;
    table.block_begin[r] = static_cast<int32_t>(blocks);
    fill(r, i);
    blocks += count;
  }
  return flush();
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

}  // namespace
}  // namespace cuda
}  // namespace wdopt
