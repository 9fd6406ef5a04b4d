"""Stochastic rounding of the kernels' fp32 results to bf16/fp16 storage, the one Triton statement
of it: wdopt/reference/rounding.py is the specification (and derives it), and
csrc/include/wdopt/rounding.h its C++ twin, whose arithmetic this follows step for step.

Words are tl.uint32, whose arithmetic wraps mod 2^32 as the specification's does. A kernel reads
its tensor's [key, count, index base] once per program (``rounding_words``: the four lanes' words) and stores
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
    tensor in ``row``, from the [key, count, index base] int64 triple whose address is in ``COLUMN``:
    read on the device, so that a CUDA graph's replay (after the driver advanced the count) draws new
    bits. The index base (a shard's global index of its element 0) is folded into the words:
    rounding_bits(word + base·GOLDEN, i) is the bits of element base + i, exactly when base + i
    does not carry out of its low 32 bits, which the driver ensures (wdopt/optim/_dtensor.py).
    Without STOCHASTIC, zeros that nothing reads."""
    if STOCHASTIC:
        rng = table_value(table_ptr, row, COLUMN, NCOL).to(tl.pointer_type(tl.int64))
        key = tl.load(rng)
        count = tl.load(rng + 1)
        base = tl.load(rng + 2)
        fold = base.to(tl.uint32) * GOLDEN + (base >> 32).to(tl.uint32) * INDEX_HI
        return (rounding_stream(key, count, 0) + fold, rounding_stream(key, count, 1) + fold,
                rounding_stream(key, count, 2) + fold, rounding_stream(key, count, 3) + fold)
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
    stochastically with the bits of its lane's ``word`` and the elements' offsets ``index``. (A
    float32 launch is STOCHASTIC when its 8-bit states round stochastically: its stores are exact.)"""
    if STOCHASTIC and DTYPE == tl.bfloat16:
        return stochastic_round_bf16(x, rounding_bits(word, index))
    elif STOCHASTIC and DTYPE == tl.float16:
        return stochastic_round_fp16(x, rounding_bits(word, index))
    else:
        return to_storage(x, DTYPE)


# ---------------------------------------------------------------------------- compensated bf16
#
# A bf16 parameter with an int16 (MASTER 32) or int8 (MASTER 24) correction holding the low bits
# of its fp32 master weight (wdopt/reference/rounding.py: combine, split; MASTER 16: a plain
# parameter). Every kernel reads and writes its parameter through ``load_param``/``store_param``,
# so that the update and the telemetry see the master weight and plain kernels compile unchanged.


@triton.jit
def correction_pointer(table_ptr, row, COLUMN: tl.constexpr, NCOL: tl.constexpr, ALIGNED: tl.constexpr,
                       MASTER: tl.constexpr):
    """The correction tensor of ``row`` (its address in ``COLUMN``), int8 for a 24-bit master and
    int16 otherwise; MASTER 16: address 0, which nothing reads."""
    pointer = table_value(table_ptr, row, COLUMN, NCOL)
    if MASTER == 24:
        pointer = pointer.to(tl.pointer_type(tl.int8))
    else:
        pointer = pointer.to(tl.pointer_type(tl.int16))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def load_param(param_ptr, correction_ptr, offs, mask, MASTER: tl.constexpr):
    """The parameter as the update reads it: as stored, or (MASTER 24/32) its fp32 master weight,
    w_bits = (p_bits << 16) + (c << shift) mod 2^32, shift 8 for an int8 correction (exact)."""
    stored = tl.load(param_ptr + offs, mask=mask)
    if MASTER == 16:
        return stored
    else:
        c = tl.load(correction_ptr + offs, mask=mask).to(tl.int32)
        if MASTER == 24:
            c = c << 8
        word = (stored.to(tl.uint16, bitcast=True).to(tl.uint32) << 16) + c.to(tl.uint32, bitcast=True)
        return word.to(tl.float32, bitcast=True)


@triton.jit
def store_param(param_ptr, correction_ptr, offs, mask, w, DTYPE: tl.constexpr, word, STOCHASTIC: tl.constexpr,
                MASTER: tl.constexpr, WRITE: tl.constexpr = True):
    """Store the updated parameter ``w`` (lane 0's ``word``) and return its value as stored, which
    telemetry's Δω measures: rounded to DTYPE, or (MASTER 24/32, fp32 ``w``) split into bf16 and
    correction, a 24-bit master rounded first to a multiple of 2^8 in bit pattern (nearest, or
    stochastically with the low 8 bits of the element's word). WRITE False: only the value
    (a measuring pass, wdopt/kernels/triton/quantization.py)."""
    if MASTER == 16:
        new = rounded(w, DTYPE, word, offs, STOCHASTIC)
        if WRITE:
            tl.store(param_ptr + offs, new, mask=mask)
        return new
    else:
        bits = w.to(tl.uint32, bitcast=True)
        if MASTER == 24:
            if STOCHASTIC:
                bits = (bits + (rounding_bits(word, offs) & 0xFF)) & 0xFFFFFF00
            else:
                bits = (bits + 0x80) & 0xFFFFFF00
        p_bits = (bits + 0x8000) >> 16
        c = (bits - (p_bits << 16)).to(tl.int32, bitcast=True)
        nan = w != w
        p_bits = tl.where(nan, 0x7FC0, p_bits)
        c = tl.where(nan, 0, c)
        if WRITE:
            tl.store(param_ptr + offs, p_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
            if MASTER == 24:
                tl.store(correction_ptr + offs, (c >> 8).to(tl.int8), mask=mask)  # exact: bits is a multiple of 2^8
            else:
                tl.store(correction_ptr + offs, c.to(tl.int16), mask=mask)
        # The stored master, combine(p, c), is the split word itself (c = bits − p_bits·2^16); NaN stays NaN.
        return tl.where(nan, w, bits.to(tl.float32, bitcast=True))
