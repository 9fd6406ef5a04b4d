// Stochastic rounding of fp32 results to bf16/fp16 storage, the one C++ statement of it
// (wdopt/reference/rounding.py is the specification; its docstring derives it). Shared by the CPU
// and CUDA kernels. The random bits are a hash of (key, count, lane, element index): the same on
// every backend whatever the threads, blocks or launch shape.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "hd.h"

namespace wdopt {

// MurmurHash3's 32-bit finalizer.
WDOPT_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The word of one tensor, step and lane (0: the parameter; 1-3: the optimizer's state tensors).
WDOPT_HD uint32_t rounding_stream(int64_t key, int64_t count, uint32_t lane) {
  const uint64_t c = static_cast<uint64_t>(count);
  uint32_t h = fmix32(static_cast<uint32_t>(c >> 32) + lane * 0x632BE5ABu);
  h = fmix32(static_cast<uint32_t>(c) ^ h);
  return fmix32(static_cast<uint32_t>(key) ^ h);
}

// The word of element ``index`` (its offset in the tensor's memory).
WDOPT_HD uint32_t rounding_bits(uint32_t stream, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return fmix32(stream + static_cast<uint32_t>(i) * 0x9E3779B9u + static_cast<uint32_t>(i >> 32) * 0x85EBCA77u);
}

// A tensor's word with its index base folded in (a shard whose element 0 is element ``base`` of
// the whole tensor): rounding_bits(fold_index_base(s, base), i) == rounding_bits(s, base + i)
// whenever (base mod 2^32) + i < 2^32, i.e. the shard crosses no multiple of 2^32 elements, which
// the driver ensures (wdopt/optim/_dtensor.py). The GPU kernels fold it once per tensor instead of
// carrying a 64-bit base per thread (an extra register pair spilled the largest of them).
WDOPT_HD uint32_t fold_index_base(uint32_t stream, int64_t base) {
  const uint64_t b = static_cast<uint64_t>(base);
  return stream + static_cast<uint32_t>(b) * 0x9E3779B9u + static_cast<uint32_t>(b >> 32) * 0x85EBCA77u;
}

// rounding_bits(word, j) for a 32-bit j, ``word`` folded as above: the words of a run of elements
// that crosses no multiple of 2^32 (a 256-element state block does not) cost one multiply less
// each, and no 64-bit arithmetic in a vectorized loop.
WDOPT_HD uint32_t rounding_bits_within(uint32_t word, uint32_t j) { return fmix32(word + j * 0x9E3779B9u); }

// The same for a run of elements of a tensor whose element 0 is element ``base`` of the whole
// tensor: rounding_bits_within(run_word(stream, base, i0), uint32(i)) == rounding_bits(stream,
// base + i) for every i in [i0, run_end(base, i0)), the elements whose index base + i has the high
// word of base + i0 (the low words add modulo 2^32 whatever the carry). The CPU loops draw their
// words so: a 32-bit multiply-add and the hash per element, no 64-bit index arithmetic.
WDOPT_HD uint32_t run_word(uint32_t stream, int64_t base, int64_t i0) {
  const uint64_t high = static_cast<uint64_t>(base + i0) >> 32;
  return stream + static_cast<uint32_t>(static_cast<uint64_t>(base)) * 0x9E3779B9u +
         static_cast<uint32_t>(high) * 0x85EBCA77u;
}

WDOPT_HD int64_t run_end(int64_t base, int64_t i0) {
  return static_cast<int64_t>(((static_cast<uint64_t>(base + i0) >> 32) + 1) << 32) - base;
}

WDOPT_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

WDOPT_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// x rounded stochastically to bf16, returned as the fp32 value it is (its low 16 bits zero: the
// caller's conversion to bf16 is then exact). Adding r to the 16 bits bf16 drops carries into
// the kept bits exactly when the dropped fraction is at least (2^16 − r)/2^16. NaN: to nearest.
WDOPT_HD float stochastic_round_bf16(float x, uint32_t bits) {
  if (x != x) return x;
  return bits_float((float_bits(x) + (bits & 0xFFFFu)) & 0xFFFF0000u);
}

// Whether float bits u are a NaN, in integers: a float comparison in a select keeps GCC from
// vectorizing the loop (it will not if-convert it under the default -ftrapping-math).
WDOPT_HD bool nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// x rounded to nearest bf16 (ties to even), as bf16 bits: c10::BFloat16's conversion bit for bit
// (NaN becomes 0x7FC0), in integer operations a CPU loop vectorizes (c10's branch does not).
WDOPT_HD uint16_t bf16_bits_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(nan_bits(u) ? 0x7FC0u : rounded);
}

// stochastic_round_bf16's result as bf16 bits (NaN: 0x7FC0, as the conversion to nearest).
WDOPT_HD uint16_t bf16_bits_stochastic(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + (bits & 0xFFFFu)) >> 16;
  return static_cast<uint16_t>(nan_bits(u) ? 0x7FC0u : rounded);
}

// The non-negative fp16 value of a 15-bit magnitude, as fp32 (exact).
WDOPT_HD float half_magnitude(uint32_t m) {
  if (m < 0x400u) return static_cast<float>(m) * 5.9604644775390625e-08f;  // subnormal: m·2^-24
  if (m >= 0x7C00u) return bits_float(0x7F800000u);                          // inf (m never exceeds it here)
  return bits_float(((m >> 10) + 112u) << 23 | (m & 0x3FFu) << 13);           // exponent − 15 + 127
}

// x rounded stochastically to fp16, as fp16 bits; ``nearest`` is x rounded to nearest (fp16 bits,
// from the platform's conversion). a, b: x's neighbours toward and away from zero; round up when
// (|x| − a) ≥ (2^16 − r)·(b − a)·2^-16, every operation exact in fp32. NaN and |x| > 65504 (the
// largest finite fp16): to nearest.
WDOPT_HD uint16_t stochastic_round_fp16(float x, uint16_t nearest, uint32_t bits) {
  const float ax = x < 0.0f ? -x : x;
  if (x != x || ax > 65504.0f) return nearest;
  const uint32_t sign = nearest & 0x8000u, magnitude = nearest & 0x7FFFu;
  const uint32_t a_mag = half_magnitude(magnitude) > ax ? magnitude - 1u : magnitude;
  const float a = half_magnitude(a_mag), b = half_magnitude(a_mag + 1u);
  const float threshold = static_cast<float>(65536u - (bits & 0xFFFFu)) * (b - a) * 1.52587890625e-05f;  // 2^-16
  return static_cast<uint16_t>(sign | ((ax - a) >= threshold ? a_mag + 1u : a_mag));
}

}  // namespace wdopt

namespace wdopt {

// Compensated bf16 parameters (wdopt/reference/rounding.py states and derives the encoding): a
// bf16 parameter p plus the low bits c of its fp32 master weight w, an int16 (32-bit master: w
// exactly) or an int8 (24-bit master: w rounded to a multiple of 2^8 in its bit pattern).
template <int MASTER_BITS> struct Compensated {
  static_assert(MASTER_BITS == 24 || MASTER_BITS == 32, "24- or 32-bit master weights");
  static constexpr int kShift = MASTER_BITS == 32 ? 0 : 8;
  using correction_t = std::conditional_t<MASTER_BITS == 32, int16_t, int8_t>;

  // w from p's bf16 bits and the correction.
  WDOPT_HD static float combine(uint16_t p_bits, correction_t c) {
    return bits_float((static_cast<uint32_t>(p_bits) << 16) + (static_cast<uint32_t>(static_cast<int32_t>(c)) << kShift));
  }

  // w as (p's bf16 bits, correction). A 24-bit master first rounds w: ``add`` is 0x80 (to nearest,
  // ties away from zero) or the element's random word's low 8 bits (stochastically).
  WDOPT_HD static void split(float w, uint32_t add, uint16_t& p_bits, correction_t& c) {
    if (w != w) {
      p_bits = 0x7FC0u;
      c = 0;
      return;
    }
    uint32_t u = float_bits(w);
    if (MASTER_BITS == 24) u = (u + (add & 0xFFu)) & 0xFFFFFF00u;
    const uint32_t p = (u + 0x8000u) >> 16;
    // u − p·2^16 is in [−2^15, 2^15) (a multiple of 2^8 for 24 bits): exact as a signed difference.
    const int32_t low = static_cast<int32_t>(u - (p << 16));
    p_bits = static_cast<uint16_t>(p);
    c = static_cast<correction_t>(low / (1 << kShift));
  }
};

}  // namespace wdopt
