"""8-bit optimizer states in Triton, the one Triton statement of their codes: wdopt/reference/quantization.py
is the specification (and derives them), csrc/include/wdopt/quantization.h the C++ twin whose
operations this follows one for one, so that the codes come out bit for bit.

A quantized state is a code per element (int8 signed, uint8 for second moments) and a float32
scale per block of QBLOCK elements in memory order. The element-wise kernels load every state
through ``load_state`` and store it through ``store_state``: unquantized (QUANTIZED False) they
are a plain load and ``rounding.rounded``, so the kernels compile unchanged. Quantized, a loop
iteration of BLOCK elements (a multiple of QBLOCK, starting on a block boundary) holds whole
blocks: the scale of each is the max over its new values, found with a reshape to
(BLOCK/QBLOCK, QBLOCK) and a row max, and then every element is encoded against it.

A monitored step (one program per telemetry row, rows not on block boundaries) cannot encode:
its rows cut blocks. The driver then runs the row kernel measuring only (WRITE False: states
decoded with their scales, the update computed, nothing stored but telemetry) and then the
ordinary chunk kernel, which stores: both are pure functions of the same memory, so the telemetry
describes exactly the update stored (multi_tensor.elementwise_passes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import table_value
from .rounding import rounded, rounding_bits

#: Elements per block scale (wdopt/reference/quantization.py BLOCK).
QBLOCK = tl.constexpr(256)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def state_pointer(table_ptr, row, COLUMN: tl.constexpr, NCOL: tl.constexpr, DTYPE: tl.constexpr,
                  ALIGNED: tl.constexpr, QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """A state tensor's address in ``COLUMN`` of ``row``: DTYPE values, or (QUANTIZED) int8/uint8 codes."""
    pointer = table_value(table_ptr, row, COLUMN, NCOL)
    if QUANTIZED:
        if SIGNED:
            pointer = pointer.to(tl.pointer_type(tl.int8))
        else:
            pointer = pointer.to(tl.pointer_type(tl.uint8))
    else:
        pointer = pointer.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def scale_pointer(table_ptr, row, COLUMN: tl.constexpr, NCOL: tl.constexpr):
    """The float32 block scales of a quantized state (address 0, never read, when not quantized)."""
    return table_value(table_ptr, row, COLUMN, NCOL).to(tl.pointer_type(tl.float32))


@triton.jit
def _offset(SIGNED: tl.constexpr):
    """0x3F8 − TOP (uint32): g(q), the ratio of code q ≥ 1 to its scale, has bit pattern (offset + q) << 20."""
    if SIGNED:
        return tl.full((), 0x3F8 - 127, tl.uint32)
    else:
        return tl.full((), 0x3F8 - 255, tl.uint32)


@triton.jit
def decode(q, s, SIGNED: tl.constexpr):
    """The value of int32 codes ``q`` at scale ``s`` (StateCode::decode): sign(q)·fl(g(|q|)·s),
    code 0 zero (NaN at a NaN scale, 0 at scale 0: a product)."""
    a = tl.abs(q).to(tl.uint32)
    g = tl.where(a == 0, 0.0, ((_offset(SIGNED) + a) << 20).to(tl.float32, bitcast=True))
    m = g * s
    return tl.where(q < 0, -m, m)


@triton.jit
def load_state(ptr, scale_ptr, offs, mask, COMPUTE: tl.constexpr, QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """A state in the math dtype: as stored, or decoded from its codes and its block's scale."""
    if QUANTIZED:
        q = tl.load(ptr + offs, mask=mask).to(tl.int32)
        s = tl.load(scale_ptr + offs // QBLOCK, mask=mask)
        return decode(q, s, SIGNED).to(COMPUTE)
    else:
        return tl.load(ptr + offs, mask=mask).to(COMPUTE)


@triton.jit
def encode(x, s, inverse, bits, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    """fp32 ``x``'s code at its block's scale ``s`` (``inverse``: 1/s correctly rounded;
    quantization.h StateCode::encode, step for step): the ratio ρ = |x|·inverse rounded at bit 20
    of its bit pattern (to nearest, ties away from zero, or with the low 20 bits of the element's
    word), at most TOP; below g(1), 0 or 1 (up iff 2ρ > g(1), or ρ·2^16 ≥ (2^16 − r)·g(1) with r
    the word's low 16 bits); exp_avg_sq's floor. Zero codes where the scale is 0 or NaN."""
    usable = (s > 0.0) & (s <= FLT_MAX)
    a = tl.where(usable, tl.abs(x), 0.0)
    ratio = a * tl.where(usable, inverse, 1.0)
    offset = _offset(SIGNED)
    first = ((offset + 1) << 20).to(tl.float32, bitcast=True)
    if STOCHASTIC:
        carry = bits & 0xFFFFF
    else:
        carry = tl.full(a.shape, 0x80000, tl.uint32)
    grid = (((ratio.to(tl.uint32, bitcast=True) + carry) >> 20) - offset).to(tl.int32, bitcast=True)
    if SIGNED:
        grid = tl.minimum(grid, 127)
    else:
        grid = tl.minimum(grid, 255)
    if STOCHASTIC:
        r = (bits & 0xFFFF).to(tl.int32).to(tl.float32)
        up = ratio * 65536.0 >= (65536.0 - r) * first
    else:
        up = ratio * 2.0 > first
    if not SIGNED:  # a nonzero second moment never encodes to 0 (reference/quantization.py's "Floor")
        up = up | (a > 0.0)
    q = tl.where(ratio >= first, grid, tl.where(up, 1, 0))
    q = tl.where(usable, q, 0)
    if SIGNED:
        q = tl.where(x < 0.0, -q, q)
    return q


@triton.jit
def block_scales(x, mask, BLOCK: tl.constexpr):
    """Each element's block scale and its reciprocal (correctly rounded, one division a block):
    the largest |x| of its block of QBLOCK (masked lanes count as 0), 0 when that is below fp32's
    smallest normal, NaN for a block holding a NaN or an infinity. ``x``: BLOCK values starting on
    a block boundary."""
    a = tl.abs(x)
    finite = a <= FLT_MAX  # NaN fails the comparison too
    bad = tl.where(mask & ~finite, 1, 0)
    a = tl.where(mask & finite, a, 0.0)  # the max then sees no NaN (its propagation is not defined)
    rows: tl.constexpr = BLOCK // QBLOCK
    largest = tl.max(tl.reshape(a, (rows, QBLOCK)), axis=1)
    poisoned = tl.max(tl.reshape(bad, (rows, QBLOCK)), axis=1) > 0
    largest = tl.where(largest < 1.1754943508222875e-38, 0.0, largest)  # 2^-126
    inverse = tl.div_rn(tl.full(largest.shape, 1.0, tl.float32), tl.where(largest > 0.0, largest, 1.0))
    largest = tl.where(poisoned, float("nan"), largest)
    return (tl.reshape(tl.broadcast_to(largest[:, None], (rows, QBLOCK)), (BLOCK,)),
            tl.reshape(tl.broadcast_to(inverse[:, None], (rows, QBLOCK)), (BLOCK,)))


@triton.jit
def store_state(ptr, scale_ptr, offs, mask, x, DTYPE: tl.constexpr, word, STOCHASTIC: tl.constexpr,
                QUANTIZED: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Store the updated state ``x`` (its lane's ``word``): rounded to DTYPE, or (QUANTIZED) as the
    codes of its blocks with their new scales. ``mask`` None: a full iteration."""
    if QUANTIZED:
        if mask is None:
            lanes = offs >= 0
        else:
            lanes = mask
        s, inverse = block_scales(x, lanes, BLOCK)
        bits = word
        if STOCHASTIC:
            bits = rounding_bits(word, offs)
        codes = encode(x.to(tl.float32), s, inverse, bits, SIGNED, STOCHASTIC)
        if SIGNED:
            tl.store(ptr + offs, codes.to(tl.int8), mask=mask)
        else:
            tl.store(ptr + offs, codes.to(tl.uint8), mask=mask)
        # A block's first element is in range whenever any of it is: it writes the scale.
        tl.store(scale_ptr + offs // QBLOCK, s, mask=lanes & (offs % QBLOCK == 0))
    else:
        tl.store(ptr + offs, rounded(x, DTYPE, word, offs, STOCHASTIC), mask=mask)
