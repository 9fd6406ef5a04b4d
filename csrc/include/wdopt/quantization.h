// 8-bit optimizer states, the one C++ statement of their codes (wdopt/reference/quantization.py
// is the specification and derives them): a code byte per element and a float32 scale per block
// of 256 elements in memory order, the block's largest magnitude. A code q ≥ 1 stands for
// fl(g(q)·s), g(q) the float with bit pattern (0x3F8 − TOP + q) << 20 (4 significant bits, g(TOP)
// = 1); code 0 for zero. int8 codes for signed states (TOP 127), uint8 for second moments (TOP
// 255). Encoding is one product by the block's reciprocal and integer operations on its bit
// pattern, so every backend gets the same codes with no per-element division or root (no FMA
// contraction either: the builds pass -ffp-contract=off/--fmad=false).
#pragma once

#include <cstdint>
#include <type_traits>

#include "hd.h"
#include "rounding.h"

namespace wdopt {

constexpr int64_t kQuantBlock = 256;

template <bool SIGNED> struct StateCode {
  using code_t = std::conditional_t<SIGNED, int8_t, uint8_t>;
  static constexpr int kTop = SIGNED ? 127 : 255;
  static constexpr int kShift = 20;                                // 3 mantissa bits kept
  static constexpr uint32_t kLow = (1u << kShift) - 1u;            // the dropped bits
  static constexpr uint32_t kOffset = 0x3F8u - kTop;               // g(q)'s top 12 bits: kOffset + q
  static constexpr uint32_t kFirst = (kOffset + 1u) << kShift;     // g(1)'s bit pattern

  // Whether a block's scale encodes values: finite and positive. A zero scale (all zeros, or all
  // below fp32's smallest normal) or a NaN one (a poisoned block) gives zero codes; callers write
  // those without calling encode.
  WDOPT_HD static bool usable(float s) { return s > 0.0f && s <= 3.4028234663852886e38f; }

  // The scale of a block whose largest magnitude is ``largest`` (NaN: poisoned): itself, or 0
  // below fp32's smallest normal (its reciprocal would overflow).
  WDOPT_HD static float scale_of(float largest) { return largest < 0x1p-126f ? 0.0f : largest; }

  // The value of code q at scale s (NaN at a NaN scale, 0 at scale 0: a product). Selects only
  // (the CPU loops vectorize).
  WDOPT_HD static float decode(code_t q, float s) {
    const int32_t v = static_cast<int32_t>(q);
    const uint32_t a = static_cast<uint32_t>(v < 0 ? -v : v);
    const float g = a == 0u ? 0.0f : bits_float((kOffset + a) << kShift);
    const float m = g * s;
    return v < 0 ? -m : m;
  }

  // x's code at its block's usable scale s, given ``inverse`` = 1.0f / s (correctly rounded, once
  // per block): the ratio fl(|x|·inverse) rounded at bit 20 of its bit pattern to nearest (ties
  // away from zero) or, with STOCHASTIC, with the low 20 bits of the element's word ``bits``;
  // below g(1), 0 or 1 (up iff 2ρ > g(1), or ρ·2^16 ≥ (2^16 − r)·g(1) with r the word's low 16
  // bits); a nonzero second moment never 0. Float selects only: the CPU loops vectorize (built
  // with -fno-trapping-math).
  template <bool STOCHASTIC> WDOPT_HD static code_t encode(float x, float inverse, uint32_t bits) {
    const float a = x < 0.0f ? -x : x;
    const float ratio = a * inverse;
    const float first = bits_float(kFirst);
    const uint32_t carry = STOCHASTIC ? (bits & kLow) : (1u << (kShift - 1));
    const int32_t grid = static_cast<int32_t>(((float_bits(ratio) + carry) >> kShift) - kOffset);
    float up;
    if constexpr (STOCHASTIC) {
      const float r = static_cast<float>(static_cast<int32_t>(bits & 0xFFFFu));  // signed: vectorizes
      up = ratio * 65536.0f >= (65536.0f - r) * first ? 1.0f : 0.0f;
    } else {
      up = ratio * 2.0f > first ? 1.0f : 0.0f;
    }
    // A nonzero second moment never encodes to 0 (quantization.py's "Floor"): Adam divides by it.
    if constexpr (!SIGNED) up = a > 0.0f ? 1.0f : up;
    int32_t q = grid < kTop ? grid : kTop;
    q = ratio >= first ? q : static_cast<int32_t>(up);
    return static_cast<code_t>(SIGNED && x < 0.0f ? -q : q);
  }
};

}  // namespace wdopt
