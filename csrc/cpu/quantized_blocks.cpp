// The 8-bit state blocks of quantized_blocks.h. -fno-trapping-math for this file only: without it
// GCC keeps the float selects of the encoding as branches and the loops stay scalar (several
// times slower); it changes no result (no reassociation or contraction, only the assumption that no
// floating-point exception traps, which torch never enables), and the rest of the extension
// keeps the default (it would vectorize more loops there, and take half as long again to build).
#pragma GCC optimize("no-trapping-math")

#include "quantized_blocks.h"

#include <algorithm>

#include "../include/wdopt/quantization.h"
#include "../include/wdopt/rounding.h"

namespace wdopt::cpu {

template <bool SIGNED> void decode_block(const void* codes, float scale, float* __restrict__ out, int64_t n) {
  using Code = StateCode<SIGNED>;
  const auto* __restrict__ q = static_cast<const typename Code::code_t*>(codes);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = Code::decode(q[j], scale);
}

// A block's codes at its usable scale, to nearest or stochastically. The words come from the
// block's folded stream (a block is 256-aligned, so it crosses no multiple of 2^32: rounding.h's
// rounding_bits_within).
template <bool SIGNED, bool STOCHASTIC>
void encode_codes(const float* __restrict__ x, typename StateCode<SIGNED>::code_t* __restrict__ q, int64_t n,
                  float scale, uint32_t stream, int64_t first) {
  using Code = StateCode<SIGNED>;
  const uint32_t word = STOCHASTIC ? fold_index_base(stream, first) : 0u;
  const float inverse = 1.0f / scale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    q[j] = Code::template encode<STOCHASTIC>(
        x[j], inverse, STOCHASTIC ? rounding_bits_within(word, static_cast<uint32_t>(j)) : 0u);
  }
}

template <bool SIGNED>
float encode_block(const float* __restrict__ x, void* codes, int64_t n, bool stochastic, uint32_t stream,
                   int64_t first) {
  using Code = StateCode<SIGNED>;
  auto* __restrict__ q = static_cast<typename Code::code_t*>(codes);
  float top = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const float a = x[j] < 0.0f ? -x[j] : x[j];
    nan |= a != a;
    top = a > top ? a : top;
  }
  const float scale = Code::scale_of(nan || top > 3.4028234663852886e38f ? __builtin_nanf("") : top);
  if (!Code::usable(scale)) {  // all zeros, or poisoned: zero codes (a NaN scale decodes to NaN)
    std::fill(q, q + n, typename Code::code_t(0));
  } else if (stochastic) {
    encode_codes<SIGNED, true>(x, q, n, scale, stream, first);
  } else {
    encode_codes<SIGNED, false>(x, q, n, scale, stream, first);
  }
  return scale;
}

template void decode_block<true>(const void*, float, float*, int64_t);
template void decode_block<false>(const void*, float, float*, int64_t);
template float encode_block<true>(const float*, void*, int64_t, bool, uint32_t, int64_t);
template float encode_block<false>(const float*, void*, int64_t, bool, uint32_t, int64_t);

}  // namespace wdopt::cpu
