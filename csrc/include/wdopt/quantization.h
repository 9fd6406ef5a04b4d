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

  // x's code at its block's usable scale s (|x| ≤ s): the bracket lo ≤ |x| < hi from the
  // truncated root (the floor: it is ≥ 0), moved by one either way where the decoded neighbours
  // disagree, then to nearest (ties down) or, with STOCHASTIC, up iff (|x| − lo)·2^16 ≥
  // (2^16 − r)·(hi − lo), r the word's low 16 bits (rounding.h's rule). Selects on floats only,
  // no branches: the CPU loops vectorize (built with -fno-trapping-math). Equal to the
  // reference's steps: a decrement never applies at lo = 0 (magnitude 0 ≤ |x|), and an
  // increment past top − 1 is clamped back, where the reference does not make it.
  template <bool STOCHASTIC> WDOPT_HD static code_t encode(float x, float s, uint32_t bits) {
    constexpr float top = static_cast<float>(kTop), last = static_cast<float>(kTop - 1);
    const float a = x < 0.0f ? -x : x;
    const float ratio = a / s;
    const float root = SIGNED ? sqrtf(ratio) : sqrtf(sqrtf(ratio));
    float lo = static_cast<float>(static_cast<int32_t>(root * top));
    lo = lo < last ? lo : last;
    lo = magnitude(lo, s) > a ? lo - 1.0f : lo;
    lo = magnitude(lo + 1.0f, s) <= a ? lo + 1.0f : lo;
    lo = lo < last ? lo : last;
    const float d_lo = magnitude(lo, s), d_hi = magnitude(lo + 1.0f, s);
    float up;
    if constexpr (STOCHASTIC) {
      const float r = static_cast<float>(static_cast<int32_t>(bits & 0xFFFFu));  // signed: vectorizes
      up = (a - d_lo) * 65536.0f >= (65536.0f - r) * (d_hi - d_lo) ? 1.0f : 0.0f;
    } else {
      up = (a - d_lo) > (d_hi - a) ? 1.0f : 0.0f;
    }
    up = a >= d_hi ? 1.0f : up;
    const float q = lo + up;
    return static_cast<code_t>(static_cast<int32_t>(SIGNED && x < 0.0f ? -q : q));
  }
};

}  // namespace wdopt
