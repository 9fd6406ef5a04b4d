// 8-bit optimizer states in the update engine (wdopt/reference/quantization.py is the
// specification, csrc/include/wdopt/quantization.h the codes' math, csrc/cpu/fused_cpu.cpp's
// for_each_block the CPU twin): each state is a code byte per element plus a float32 scale per
// block of 256 elements in memory order.
//
// Work unit: as update.cuh's, one thread block per (tensor, chunk), a chunk kChunk<T> elements (a
// multiple of 256, so no state block is split between thread blocks). The chunk is walked in
// sweeps of kThreads · 8 elements: thread t takes the 8 consecutive elements 8t … 8t + 7 of the
// sweep, so warp w covers exactly state block w of the sweep. A sweep is two phases:
//   1. each thread loads its parameter and gradient elements and its codes (16- and 8-byte
//      vectors into registers, Eight), decodes the states with their old block scales, runs the
//      optimizer's element function (Op::update, the math of csrc/include/wdopt/*.h, as
//      update_block does), stores the parameter (rounded or compensated as update_block stores
//      it), and leaves its new state values and their largest magnitude (inf if one is not
//      finite) in shared memory;
//   2. after a barrier, each thread reduces its warp's 32 largest magnitudes into the block's new
//      scale (a max: independent of order, so deterministic), NaN when a value was not finite;
//      the warp's first thread writes it, and each thread encodes its 8 values with it (to nearest,
//      or with SR stochastically with the element's word of the state's lane, as the reference).
// A second barrier ends the sweep (the next one reuses the shared memory). Everything that
// outlives a phase is in shared memory, so the host emulation (rows.cuh's Block) runs it exactly;
// the barriers (two per sweep, reached by every thread: the sweep loop is uniform) and the shared
// memory size (9 KiB per state, under the 48 KiB default) are only proved on a GPU. The element
// loops are not unrolled (each element is the update's IEEE divisions and roots, and the codes'
// integer operations); launched with kThreads threads and a 64-register bound (4 blocks per SM).
//
// States only (an Op with kStatesOnly, the rotational kernels' block phase, rotational.cuh): the
// same sweeps without the parameter, neither loaded nor stored; the Op updates the states alone.
//
// Monitored steps (telemetry rows need not be multiples of 256): first TelemetryKernel in its
// measuring mode (QUANT), which decodes the states with the old scales, computes the update and
// the parameter's stored value and sums the telemetry, writing nothing else; then this kernel.
// Both are pure functions of the same inputs (parameters, gradients, codes, old scales, the
// step's coefficients), so the parameters and states are the unmonitored step's and the
// telemetry is the fused step's: one launch more on a monitored step, no extra memory.
#pragma once

#include "../include/wdopt/quantization.h"
#include "telemetry.cuh"

namespace wdopt {
namespace cuda {
namespace {

// A loop the device compiler must not unroll: a thread's 8 elements stay one loop body (unrolled,
// the update's divisions and roots, with the first 8-bit code's, made the kernels several times as
// long to build). (Device passes only; host compilers warn on the pragma.)
#if defined(__CUDA_ARCH__)
#define WDOPT_NO_UNROLL _Pragma("unroll 1")
#else
#define WDOPT_NO_UNROLL
#endif

// Storage types with 8-bit states (the reference's and the driver's rule: not float64).
template <typename T> constexpr bool kQuantizable = !std::is_same_v<T, double>;

// Elements per thread and sweep: a warp's 32 threads cover one block of 256.
constexpr int kQuantElements = 8;
constexpr int kSweep = kThreads * kQuantElements;
static_assert(32 * kQuantElements == kQuantBlock, "a warp covers one state block");
static_assert(kChunk<float> % kSweep == 0 && kChunk<__half> % kSweep == 0, "a chunk is whole sweeps");

// The bits of a stream's element type and back (storage types, corrections, codes).
WDOPT_HD uint32_t element_bits(float x) { return float_bits(x); }
WDOPT_HD uint32_t element_bits(__half x) { return __half_as_ushort(x); }
WDOPT_HD uint32_t element_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
WDOPT_HD uint32_t element_bits(int16_t x) { return static_cast<uint16_t>(x); }
WDOPT_HD uint32_t element_bits(int8_t x) { return static_cast<uint8_t>(x); }
WDOPT_HD uint32_t element_bits(uint8_t x) { return x; }
template <typename E> WDOPT_HD E bits_element(uint32_t u);
template <> WDOPT_HD float bits_element<float>(uint32_t u) { return bits_float(u); }
template <> WDOPT_HD __half bits_element<__half>(uint32_t u) { return __ushort_as_half(static_cast<uint16_t>(u)); }
template <> WDOPT_HD __nv_bfloat16 bits_element<__nv_bfloat16>(uint32_t u) {
  return __ushort_as_bfloat16(static_cast<uint16_t>(u));
}
template <> WDOPT_HD int16_t bits_element<int16_t>(uint32_t u) { return static_cast<int16_t>(u); }
template <> WDOPT_HD int8_t bits_element<int8_t>(uint32_t u) { return static_cast<int8_t>(u); }
template <> WDOPT_HD uint8_t bits_element<uint8_t>(uint32_t u) { return static_cast<uint8_t>(u); }

// A thread's 8 elements of one stream (E of 1, 2 or 4 bytes) held in 64-bit registers, loaded and
// stored as 8- or 16-byte vectors, and read and written at an element index known at run time by
// selects over the words (no local memory): the element loop stays one loop body (WDOPT_NO_UNROLL).
template <typename E> struct Eight {
  static constexpr int kWords = static_cast<int>(sizeof(E));  // 8 elements: sizeof(E) words
  static constexpr uint64_t kMask = sizeof(E) == 4 ? 0xFFFFFFFFull : (uint64_t{1} << (8 * sizeof(E))) - 1u;
  uint64_t w[kWords];

  WDOPT_HD E get(int i) const {
    const int word = i * kWords / 8, shift = (i * kWords % 8) * 8;
    uint64_t x = w[0];
    WDOPT_UNROLL
    for (int k = 1; k < kWords; ++k) x = k == word ? w[k] : x;
    return bits_element<E>(static_cast<uint32_t>((x >> shift) & kMask));
  }
  WDOPT_HD void set(int i, E v) {
    const int word = i * kWords / 8, shift = (i * kWords % 8) * 8;
    const uint64_t bits = static_cast<uint64_t>(element_bits(v)) << shift, keep = ~(kMask << shift);
    WDOPT_UNROLL
    for (int k = 0; k < kWords; ++k) w[k] = k == word ? (w[k] & keep) | bits : w[k];
  }
  // From and to 8 elements of memory at ``p``, aligned to the vector (16 bytes, or 8 for bytes).
  WDOPT_HD void load(const E* p) {
    if constexpr (kWords == 1) {
      w[0] = *reinterpret_cast<const uint64_t*>(p);
    } else {
      WDOPT_UNROLL
      for (int k = 0; k < kWords / 2; ++k) {
        const ulonglong2 v = reinterpret_cast<const ulonglong2*>(p)[k];  // CUDA's 16-byte vector type
        w[2 * k] = v.x;
        w[2 * k + 1] = v.y;
      }
    }
  }
  WDOPT_HD void store(E* p) const {
    if constexpr (kWords == 1) {
      *reinterpret_cast<uint64_t*>(p) = w[0];
    } else {
      WDOPT_UNROLL
      for (int k = 0; k < kWords / 2; ++k) {
        const ulonglong2 v = make_ulonglong2(w[2 * k], w[2 * k + 1]);
#if defined(__CUDA_ARCH__)
        __stwb(reinterpret_cast<ulonglong2*>(p) + k, v);  // one 16-byte store (an assignment was split)
#else
        reinterpret_cast<ulonglong2*>(p)[k] = v;
#endif
      }
    }
  }
};

// ``inverse``: 1/s of the block's usable scale s, correctly rounded (once per block).
template <bool STOCHASTIC> WDOPT_HD uint8_t encode_state(bool is_signed, float x, float inverse, uint32_t bits) {
  return is_signed ? static_cast<uint8_t>(StateCode<true>::template encode<STOCHASTIC>(x, inverse, bits))
                   : StateCode<false>::template encode<STOCHASTIC>(x, inverse, bits);
}

// The tensors of one 8-bit launch: UpdateTable's columns (the state columns hold codes) plus each
// state's block scales (state k of row r: scales[k][r]). SR: stochastic encoding (``rng`` given,
// any storage type), and stochastic rounding of the parameter where it is bf16 or fp16.
template <int DEPTH, bool SR, int MASTER> struct QuantTable {
  static constexpr int kStates = DEPTH - 2;
  static constexpr int kRowBytes = DEPTH * 8 + kStates * 8 + 8 + 4 + 8 + (SR ? 8 : 0) + (MASTER != 16 ? 8 : 0);
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);

  void* ptr[DEPTH][kCapacity];
  float* scales[kStates][kCapacity];
  int64_t numel[kCapacity];
  int32_t block_begin[kCapacity + 1];
  int32_t n_tensors;
  int32_t first_tensor;
  FirstStepFlag flag[kCapacity];
  const int64_t* rng[SR ? kCapacity : 1];
  void* correction[MASTER != 16 ? kCapacity : 1];
};

// Whether an Op updates the states alone (Op::kStatesOnly, the rotational kernels' block phase:
// rotational.cuh): the kernel then neither reads nor writes the parameter (stream 0), whose x[0]
// the Op must not use, and encodes the new states as for any Op.
template <class Op, class = void> struct StatesOnly : std::false_type {};
template <class Op>
struct StatesOnly<Op, std::void_t<decltype(Op::kStatesOnly)>> : std::bool_constant<Op::kStatesOnly> {};

template <typename T, bool SR, int MASTER, class Op> struct QuantizedKernel {
  using M = opmath_t<T>;
  using Table = QuantTable<Op::kDepth, SR, MASTER>;
  using Master = Compensation<MASTER>;
  using C = typename Master::C;
  static constexpr int D = Op::kDepth, S = D - 2;
  static constexpr bool kParam = !StatesOnly<Op>::value;  // the parameter read and written
  static constexpr bool kParamSR = SR && kLowPrecision<T> && kParam;
  // Shared memory: the new states [S][8][kThreads], then each thread's largest magnitudes [S][kThreads].
  static constexpr size_t kSharedBytes = static_cast<size_t>(S) * (kQuantElements + 1) * kThreads * sizeof(float);
  static constexpr int kMinBlocks = 4;  // __launch_bounds__ hint: resident blocks per SM (64 registers)
  static_assert(kQuantizable<T> && S >= 1, "8-bit states of float32, float16 or bfloat16 tensors");
  static_assert(kSharedBytes <= 48 * 1024, "within the shared memory every device grants without opting in");
  static_assert(Op::kWrites == (((1u << D) - 1u) & (kParam ? ~2u : ~3u)),
                "every state is written, and the parameter unless states only");
  static_assert(kParam || MASTER == 16, "a states-only kernel has no parameter to compensate");
  static_assert(!Master::kOn || std::is_same_v<T, __nv_bfloat16>, "a compensated parameter is bf16");

  WDOPT_BLOCK static void run_block(const Table& table, const Op& op, const GradOptions& grad, int64_t block,
                                    unsigned char* shared) {
    if (step_skipped(grad.found_inf)) return;
    const int e = find_entry(table.block_begin, table.n_tensors, block);
    const int64_t first = (block - table.block_begin[e]) * int64_t{kChunk<T>};
    const int64_t left = table.numel[e] - first;
    const int n = left < kChunk<T> ? static_cast<int>(left) : kChunk<T>;
    T* const param = kParam ? static_cast<T*>(table.ptr[0][e]) + first : nullptr;
    const T* const grads = static_cast<const T*>(table.ptr[1][e]) + first;
    // Vectors when every stream is aligned (parameter and gradient 16 bytes, codes 8, corrections
    // a vector's), else the scalar path for the whole chunk.
    bool aligned = (!kParam || aligned16(param)) && aligned16(grads);
    WDOPT_UNROLL
    for (int s = 0; s < S; ++s) aligned = aligned && reinterpret_cast<uintptr_t>(codes_of(table, s, e, first)) % 8 == 0;
    if constexpr (Master::kOn) aligned = aligned && Master::aligned(static_cast<C*>(table.correction[e]) + first);
    const typename Op::Context ctx = op.context(table.first_tensor + e, table.flag[e]);
    // The parameter's rounding (lane 0), as update_block's; the states' words, lanes 1 … S.
    const Rounding<T, kParamSR> rounding(kParamSR ? table.rng[e] : nullptr, rounded_lanes(1u, MASTER));
    uint32_t stream[S];
    WDOPT_UNROLL
    for (int s = 0; s < S; ++s) {  // the index base folded in (rounding.h)
      stream[s] = SR ? fold_index_base(rounding_stream(table.rng[e][0], table.rng[e][1], s + 1u), table.rng[e][2]) : 0u;
    }
    const bool unscale = grad.grad_scale.ptr != nullptr;
    const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);
    float* const values = reinterpret_cast<float*>(shared);
    float* const tops = values + S * kQuantElements * kThreads;
    const Block blk{};

    for (int sweep = 0; sweep < n; sweep += kSweep) {
      // Phase 1: decode, update, store the parameter; the new states and their magnitudes to shared memory.
      blk.each([&](int t) {
        const int base = sweep + t * kQuantElements;
        float top[S];
        WDOPT_UNROLL
        for (int s = 0; s < S; ++s) top[s] = 0.0f;
        if (base < n) {
          const int count = n - base < kQuantElements ? n - base : kQuantElements;
          const bool vector = aligned && count == kQuantElements;
          const int64_t index = first + base;  // the element's offset in its tensor (rounding bits)
          C* const correction = Master::kOn ? static_cast<C*>(table.correction[e]) + index : nullptr;
          [[maybe_unused]] Eight<T> p{};  // zeros: the scalar path sets count of the 8 elements
          Eight<T> g{};
          Eight<uint8_t> q[S] = {};
          [[maybe_unused]] Eight<C> low{};
          float old_scale[S];
          WDOPT_UNROLL
          for (int s = 0; s < S; ++s) old_scale[s] = table.scales[s][e][index / kQuantBlock];
          if (vector) {
            if constexpr (kParam) p.load(param + base);
            g.load(grads + base);
            WDOPT_UNROLL
            for (int s = 0; s < S; ++s) q[s].load(codes_of(table, s, e, index));
            if constexpr (Master::kOn) low.load(correction);
          } else {
            WDOPT_NO_UNROLL
            for (int i = 0; i < count; ++i) {
              if constexpr (kParam) p.set(i, param[base + i]);
              g.set(i, grads[base + i]);
              WDOPT_UNROLL
              for (int s = 0; s < S; ++s) q[s].set(i, codes_of(table, s, e, index)[i]);
              if constexpr (Master::kOn) low.set(i, correction[i]);
            }
          }
          WDOPT_NO_UNROLL
          for (int i = 0; i < count; ++i) {
            M x[D];
            if constexpr (Master::kOn) {
              x[0] = Master::load(p.get(i), low.get(i));
            } else if constexpr (kParam) {
              x[0] = to_math(p.get(i));
            } else {
              x[0] = M(0);  // unused (states only)
            }
            x[1] = to_math(g.get(i));
            WDOPT_UNROLL
            for (int s = 0; s < S; ++s) x[2 + s] = decode_state(signed_codes(2 + s), q[s].get(i), old_scale[s]);
            if (unscale) x[1] = x[1] * inv_scale;
            if (grad.maximize) x[1] = -x[1];
            op.update(ctx, x);
            if constexpr (Master::kOn) {
              T stored;
              C stored_low;
              Master::store(rounding, index + i, x[0], stored, stored_low);
              p.set(i, stored);
              low.set(i, stored_low);
            } else if constexpr (kParam) {
              p.set(i, rounding.store(0, index + i, x[0]));
            }
            WDOPT_UNROLL
            for (int s = 0; s < S; ++s) {
              const float v = x[2 + s], a = v < 0.0f ? -v : v;
              values[(s * kQuantElements + i) * kThreads + t] = v;
              top[s] = a != a ? INFINITY : (a > top[s] ? a : top[s]);  // NaN: as an infinity, poisons the block
            }
          }
          if constexpr (kParam) {
            if (vector) {
              p.store(param + base);
              if constexpr (Master::kOn) low.store(correction);
            } else {
              WDOPT_NO_UNROLL
              for (int i = 0; i < count; ++i) {
                param[base + i] = p.get(i);
                if constexpr (Master::kOn) correction[i] = low.get(i);
              }
            }
          }
        }
        WDOPT_UNROLL
        for (int s = 0; s < S; ++s) tops[s * kThreads + t] = top[s];
      });
      blk.sync();
      // Phase 2: the warp's block scale, then the codes.
      blk.each([&](int t) {
        const int base = sweep + t * kQuantElements;
        if (base >= n) return;
        const int count = n - base < kQuantElements ? n - base : kQuantElements;
        const bool vector = aligned && count == kQuantElements;
        const int64_t index = first + base;
        const int warp = t & ~31;
        WDOPT_UNROLL
        for (int s = 0; s < S; ++s) {
          float top = 0.0f;
          for (int l = 0; l < 32; ++l) {
            const float v = tops[s * kThreads + warp + l];
            top = v > top ? v : top;
          }
          // The largest magnitude (0 below fp32's smallest normal), or NaN for a block with a
          // value that is not finite.
          const float scale = StateCode<true>::scale_of(top <= 3.4028234663852886e38f ? top : NAN);
          if (t == warp) table.scales[s][e][index / kQuantBlock] = scale;
          const bool usable = StateCode<true>::usable(scale);  // else zero codes
          const float inverse = usable ? 1.0f / scale : 1.0f;
          const bool is_signed = signed_codes(2 + s);
          Eight<uint8_t> codes{};
          WDOPT_NO_UNROLL
          for (int i = 0; i < count; ++i) {
            codes.set(i, usable ? encode_state<SR>(is_signed, values[(s * kQuantElements + i) * kThreads + t], inverse,
                                                   SR ? rounding_bits(stream[s], index + i) : 0u)
                                : uint8_t{0});
          }
          uint8_t* const out = codes_of(table, s, e, index);
          if (vector) {
            codes.store(out);
          } else {
            WDOPT_NO_UNROLL
            for (int i = 0; i < count; ++i) out[i] = codes.get(i);
          }
        }
      });
      blk.sync();
    }
  }

  // State s's codes of tensor e from element ``index`` on.
  WDOPT_HD static uint8_t* codes_of(const Table& table, int s, int e, int64_t index) {
    return static_cast<uint8_t*>(table.ptr[2 + s][e]) + index;
  }
};

// Every tensor of a call through QuantizedKernel<T, SR, MASTER, Op> (update_all's twin);
// ``scales`` as launchers.h lays them out.
template <typename T, bool SR, int MASTER, class Op>
cudaError_t quantized_all(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                          const FirstStepFlag* flags, const int64_t* const* rng, void* const* corrections,
                          float* const* scales, const Op& op, const GradOptions& grad, cudaStream_t stream) {
  using K = QuantizedKernel<T, SR, MASTER, Op>;
  QuantTable<Op::kDepth, SR, MASTER> table;  // deliberately not zeroed: rows past n_tensors are never read
  return pack_tables(
      table, n_tensors,
      [&](int64_t i) { return numels[i] < 0 ? int64_t{-1} : (numels[i] + kChunk<T> - 1) / kChunk<T>; },
      [&](int r, int64_t i) {
        for (int d = 0; d < Op::kDepth; ++d) table.ptr[d][r] = const_cast<void*>(columns[d][i]);
        for (int k = 0; k < Op::kDepth - 2; ++k) table.scales[k][r] = scales[k * n_tensors + i];
        table.numel[r] = numels[i];
        table.flag[r] = flags != nullptr ? flags[i] : nullptr;
        if constexpr (SR) table.rng[r] = rng[i];
        if constexpr (MASTER != 16) table.correction[r] = corrections[i];
      },
      [&](int64_t blocks) { return launch_rows<K>(blocks, K::kSharedBytes, stream, table, op, grad); });
}

// update_or_monitor's 8-bit twin: monitored, the measuring launch first (see the top of this
// file), then the update. SR: ``rng`` given (stochastic codes; the parameter's rounding too where
// T is bf16 or fp16).
template <typename T, bool SR, int MASTER, class Op>
cudaError_t quantized_or_monitor(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                                 const FirstStepFlag* flags, const int64_t* const* rng, void* const* corrections,
                                 float* const* scales, const Telemetry& telemetry, const Op& op,
                                 const GradOptions& grad, cudaStream_t stream) {
  if (telemetry.buffers != nullptr) {
    if (telemetry.rows == nullptr || (telemetry.columns != 4 && telemetry.columns != 8)) return cudaErrorInvalidValue;
    const cudaError_t err = telemetry_all<T, SR && kLowPrecision<T>, MASTER, Op, true>(
        columns, n_tensors, numels, flags, rng, corrections, telemetry, op, grad, stream, scales);
    if (err != cudaSuccess) return err;
  }
  return quantized_all<T, SR, MASTER>(columns, n_tensors, numels, flags, rng, corrections, scales, op, grad, stream);
}

// f(std::integral_constant<bool, SR>) for the 8-bit kernels of T (SR: ``rng`` given, whatever
// T); float64 has none.
template <typename T, class F> cudaError_t dispatch_quantized(const int64_t* const* rng, F&& f) {
  if constexpr (kQuantizable<T>) {
    return rng != nullptr ? f(std::true_type{}) : f(std::false_type{});
  } else {
    return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace wdopt
