"""Stochastic rounding of the kernels' fp32 results to bf16/fp16 storage, the one Triton statement
of it: wdopt/reference/rounding.py is the specification (and derives it), and
csrc/include/wdopt/rounding.h its C++ twin, whose arithmetic this follows step for step.

Words are tl.uint32, whose arithmetic wraps mod 2^32 as the specification's does. A kernel reads
its tensor's [key, count] once per program (``rounding_words``: the four lanes' words) and stores
every array through ``rounded`` with its lane's word and the elements' offsets in the tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import table_value, to_storage

# The specification's multipliers (wdopt/reference/rounding.py), as uint32 literals.
GOLDEN = tl.constexpr(0x9E3779B9)    # index_lo: the Weyl increment 2^32/φ
INDEX_HI = tl.constexpr(0x85EBCA77)  # index_hi (tensors of more than 2^32 elements)
LANE = tl.constexpr(0x632BE5AB)      # lane multiplier


@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finalizer (uint32 in, uint32 out)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def rounding_stream(key, count, LANE_INDEX: tl.constexpr):
    """The word of one tensor, step and lane, from the int64 key and count (narrowing to uint32
    keeps the low 32 bits)."""
    lane_word: tl.constexpr = LANE_INDEX * LANE & 0xFFFFFFFF  # lane·LANE mod 2^32, folded at compile time
    h = fmix32((count >> 32).to(tl.uint32) + tl.full((), lane_word, tl.uint32))
    h = fmix32(count.to(tl.uint32) ^ h)
    return fmix32(key.to(tl.uint32) ^ h)


@triton.jit
def rounding_words(table_ptr, row, COLUMN: tl.constexpr, NCOL: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The four lanes' words (0: the parameter, 1-3: the state tensors in the kernel's order) of the
    tensor in ``row``, from the [key, count] int64 pair whose address is in ``COLUMN``: read on the
    device, so that a CUDA graph's replay (after the driver advanced the count) draws new bits.
    Without STOCHASTIC, zeros that nothing reads."""
    if STOCHASTIC:
        rng = table_value(table_ptr, row, COLUMN, NCOL).to(tl.pointer_type(tl.int64))
        key = tl.load(rng)
        count = tl.load(rng + 1)
        return (rounding_stream(key, count, 0), rounding_stream(key, count, 1), rounding_stream(key, count, 2),
                rounding_stream(key, count, 3))
    else:
        zero = tl.full((), 0, tl.uint32)
        return zero, zero, zero, zero


@triton.jit
def rounding_bits(word, index):
    """The words of the elements at offsets ``index`` in their tensor, from the lane's ``word``.
    The index part is the same for every lane of an element: the compiler computes it once."""
    index = index.to(tl.int64)
    return fmix32(word + index.to(tl.uint32) * GOLDEN + (index >> 32).to(tl.uint32) * INDEX_HI)


@triton.jit
def stochastic_round_bf16(x, bits):
    """fp32 x rounded stochastically to bf16: adding r = bits & 0xFFFF to the 16 bits bf16 drops
    carries into the kept bits exactly when the dropped fraction is at least (2^16 − r)/2^16; the
    kept high half is then the bf16 pattern (taken as bits, not converted: the interpreter's
    conversion flushes fp32 subnormals to zero). NaN: to nearest."""
    kept = (x.to(tl.uint32, bitcast=True) + (bits & 0xFFFF)) >> 16
    y = kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, to_storage(x, tl.bfloat16), y)


@triton.jit
def half_magnitude(m):
    """The non-negative fp16 value of 15-bit magnitudes ``m`` (uint32), as fp32 (exact)."""
    return m.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def stochastic_round_fp16(x, bits):
    """fp32 x rounded stochastically to fp16. a, b: x's neighbours toward and away from zero (from
    the nearest value's magnitude bits); up when |x| − a ≥ (2^16 − r)·(b − a)·2^-16, every
    operation exact in fp32 ((b − a) is a power of two). NaN and |x| > 65504 (the largest finite
    fp16): to nearest."""
    nearest = x.to(tl.float16)
    nearest_bits = nearest.to(tl.uint16, bitcast=True).to(tl.uint32)
    sign = nearest_bits & 0x8000
    magnitude = nearest_bits & 0x7FFF
    ax = tl.abs(x)
    a_magnitude = tl.where(half_magnitude(magnitude) > ax, magnitude - 1, magnitude)
    a = half_magnitude(a_magnitude)
    b = half_magnitude(a_magnitude + 1)
    threshold = (65536 - (bits & 0xFFFF)).to(tl.float32) * (b - a) * 1.52587890625e-05  # 2^-16
    out = tl.where(ax - a >= threshold, a_magnitude + 1, a_magnitude) | sign
    y = out.to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.where((x != x) | (ax > 65504.0), nearest, y)


@triton.jit
def rounded(x, DTYPE: tl.constexpr, word, index, STOCHASTIC: tl.constexpr):
    """fp32/fp64 ``x`` as stored in DTYPE: rounded to nearest, or (STOCHASTIC, bf16 and fp16 only)
    stochastically with the bits of its lane's ``word`` and the elements' offsets ``index``."""
    if STOCHASTIC:
        bits = rounding_bits(word, index)
        if DTYPE == tl.bfloat16:
            return stochastic_round_bf16(x, bits)
        else:
            return stochastic_round_fp16(x, bits)
    else:
        return to_storage(x, DTYPE)
