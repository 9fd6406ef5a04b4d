// 8-bit state blocks in the CPU kernels (wdopt/reference/quantization.py is the specification,
// csrc/include/wdopt/quantization.h the codes' math): decode a block of codes into floats, and
// encode a block's new values with its new scale. In their own translation unit, built with
// -fno-trapping-math (see quantized_blocks.cpp), called once per block of 256 and state.
#pragma once

#include <cstdint>

namespace wdopt::cpu {

// out[j] = the value of code j (int8 codes when SIGNED, else uint8) at ``scale``, j < n.
template <bool SIGNED> void decode_block(const void* codes, float scale, float* out, int64_t n);

// Encodes x[0..n) into ``codes`` with the block's new scale, which it returns: the largest
// magnitude, or NaN if any value is not finite (the block is poisoned). With ``stochastic``, the
// words are rounding_bits(stream, first + j) (element first + j of the tensor), ``first`` a
// block's start (a multiple of 256: the run crosses no multiple of 2^32); else to nearest.
template <bool SIGNED>
float encode_block(const float* x, void* codes, int64_t n, bool stochastic, uint32_t stream, int64_t first);

}  // namespace wdopt::cpu
