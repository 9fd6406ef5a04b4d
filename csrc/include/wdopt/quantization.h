// 8-bit optimizer states, the one C++ statement of their codes (wdopt/reference/quantization.py
// is the specification and derives them): a code byte per element and a float32 scale per block
// of 256 elements in memory order. Signed states (int8 q): x = s·sign(q)·q²/127²; second moments
// (uint8 q): x = s·(q²/255²)². Every operation below is the reference's, in the same order, so the
// codes come out bit for bit (no FMA contraction: the builds pass -ffp-contract=off/--fmad=false).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "hd.h"

namespace wdopt {

constexpr int64_t kQuantBlock = 256;

template <bool SIGNED> struct StateCode {
  using code_t = std::conditional_t<SIGNED, int8_t, uint8_t>;
  static constexpr int kTop = SIGNED ? 127 : 255;

  // Whether a block's scale encodes values: finite and positive. A zero scale (all zeros) or a
  // NaN one (a poisoned block) gives zero codes; callers write those without calling encode.
  WDOPT_HD static bool usable(float s) { return s > 0.0f && s <= 3.4028234663852886e38f; }

  // The magnitude of code q ≥ 0 (an integer held in a float: q² is exact) at scale s: q²/top²
  // correctly rounded, then s·t (signed) or s·t².
  WDOPT_HD static float magnitude(float q, float s) {
    const float t = (q * q) / static_cast<float>(kTop * kTop);
    return SIGNED ? s * t : s * (t * t);
  }

  WDOPT_HD static float decode(code_t q, float s) {
    const float v = static_cast<float>(q);
    const float m = magnitude(v < 0.0f ? -v : v, s);
    return v < 0.0f ? -m : m;
  }

  // The first guess of |x|'s bracket from ratio = |x|/s (at most 1, or an ulp or so above it
  // when the caller multiplies by 1/s): the truncated real code top·ratio^½ (signed) or
  // top·ratio^¼, clamped to top − 1. Within one of the bracket, which the decoded neighbours
  // decide, whatever the roots' last bits.
  WDOPT_HD static float guess(float ratio) {
    const float root = SIGNED ? sqrtf(ratio) : sqrtf(sqrtf(ratio));
    const float lo = static_cast<float>(static_cast<int32_t>(root * static_cast<float>(kTop)));  // ≥ 0: the floor
    return lo < static_cast<float>(kTop - 1) ? lo : static_cast<float>(kTop - 1);
  }

  // The code of x, |x| = a, in its bracket lo ≤ a < hi (d_lo, d_hi: their magnitudes; a ≥ hi only
  // at lo = top − 1, where |x| = s): to nearest (ties down), up from an unsigned code 0 where
  // a > 0, or, with STOCHASTIC, up iff
  // (a − lo)·2^16 ≥ (2^16 − r)·(hi − lo), r the word's low 16 bits (rounding.h's rule). Selects
  // on floats only, no branches: the CPU loops vectorize (built with -fno-trapping-math).
  template <bool STOCHASTIC>
  WDOPT_HD static code_t round_in(float x, float a, float lo, float d_lo, float d_hi, uint32_t bits) {
    float up;
    if constexpr (STOCHASTIC) {
      const float r = static_cast<float>(static_cast<int32_t>(bits & 0xFFFFu));  // signed: vectorizes
      up = (a - d_lo) * 65536.0f >= (65536.0f - r) * (d_hi - d_lo) ? 1.0f : 0.0f;
    } else {
      up = (a - d_lo) > (d_hi - a) ? 1.0f : 0.0f;
    }
    up = a >= d_hi ? 1.0f : up;
    // A nonzero second moment never encodes to 0 (quantization.py's "Floor"): Adam divides by it.
    // lo = 0 < a as one float select: written with && it kept GCC's encode loop scalar (9x slower).
    if constexpr (!SIGNED) up = lo < (a > 0.0f ? 1.0f : 0.0f) ? 1.0f : up;
    const float q = lo + up;
    return static_cast<code_t>(static_cast<int32_t>(SIGNED && x < 0.0f ? -q : q));
  }

  // x's code at its block's usable scale s (|x| ≤ s), the reference's steps: the guess from
  // |x|/s, moved by one either way where the decoded neighbours disagree, then round_in. (A
  // decrement never applies at lo = 0, magnitude 0 ≤ |x|; an increment past top − 1 is clamped
  // back, where the reference does not make it.) The CPU encodes most blocks a cheaper way with
  // the same result (csrc/cpu/quantized_blocks.cpp).
  template <bool STOCHASTIC> WDOPT_HD static code_t encode(float x, float s, uint32_t bits) {
    constexpr float last = static_cast<float>(kTop - 1);
    const float a = x < 0.0f ? -x : x;
    float lo = guess(a / s);
    lo = magnitude(lo, s) > a ? lo - 1.0f : lo;
    lo = magnitude(lo + 1.0f, s) <= a ? lo + 1.0f : lo;
    lo = lo < last ? lo : last;
    return round_in<STOCHASTIC>(x, a, lo, magnitude(lo, s), magnitude(lo + 1.0f, s), bits);
  }
};

}  // namespace wdopt
