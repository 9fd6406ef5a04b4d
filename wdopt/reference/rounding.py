"""Stochastic rounding: the specification every backend reproduces bit for bit.

A value computed in fp32 is stored to a bf16 or fp16 tensor by rounding it to one of its two
neighbours a (toward zero) and b (away from zero) at random, up with probability ≈ (|x| − |a|)/(|b| − |a|),
so that the stored value is x in expectation. Rounding to nearest instead loses every update smaller
than half an ulp: bf16 has 8 significant bits, and a weight-decay step lr·λ·p (≈ 1e-5·|p|) or a
late-training update is far below half an ulp (2^-9·|p|), so it rounds back to p and does nothing.

Random bits. They are a pure function of (key, count, lane, element index), never of threads,
blocks or launch shapes, so the reference, C++ CPU, CUDA and Triton backends draw the same bits:

    key     a per-parameter 32-bit stream key, kept in the parameter's state ``rng[0]`` (drawn from the
            group's ``rounding_seed`` and the parameter's position in the optimizer, see wdopt.optim)
    count   the parameter's stochastically rounded steps so far, ``rng[1]``; kernels read it on the
            device (a CUDA-graph replay draws new bits), the step driver advances it after the kernel
    lane    which stored array: 0 the parameter, 1, 2, 3 the optimizer's state tensors in the order
            of its kernel (AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD: momentum_buffer; Lion: exp_avg)
    index   the element's position in the tensor's memory (its offset from the first element; the
            kernels see dense tensors, so this is the index they loop over), plus the index base
            ``rng[2]`` where the state has one: the global index of a shard's first element (a
            DTensor's local shard, wdopt/optim/_dtensor.py), so that a sharded run draws the bits
            of the unsharded one, whatever the number of ranks; 0 for a whole tensor

    s    = fmix32(key ^ fmix32(count_lo ^ fmix32(count_hi + lane·0x632BE5AB)))     once per tensor and lane
    bits = fmix32(s + index_lo·0x9E3779B9 + index_hi·0x85EBCA77)                    per element (mod 2^32)

with fmix32 MurmurHash3's finalizer (a bijection of 32-bit words with full avalanche) and _lo/_hi
the low and high 32 bits. A Weyl sequence through a strong mixer (SplitMix's construction) gives
distinct, uncorrelated words for the elements of one tensor. Rounding uses r = bits & 0xFFFF:

    round up  ⇔  (|x| − |a|)·2^16 ≥ (2^16 − r)·(|b| − |a|)

so P(up) = ⌊(|x| − |a|)/(|b| − |a|)·2^16⌋/2^16, the exact fraction truncated to 16 bits. For bf16,
whose neighbours are fp32 bit patterns 2^16 apart, that is the carry of adding r to x's 16 dropped
bits: bits(x) + r, truncated. NaN, and fp16 values beyond its largest finite (65504), are rounded
to nearest.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9     # index_lo multiplier: 2^32/φ, the Weyl increment
INDEX_HI = 0x85EBCA77   # index_hi multiplier (tensors of more than 2^32 elements)
LANE = 0x632BE5AB       # lane multiplier
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fmix32(h):
    """MurmurHash3's 32-bit finalizer, on a Python int or an int64 tensor of 32-bit words."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def mul32(a, b: int):
    """a·b mod 2^32 for 32-bit words ``a`` (int or int64 tensor) and a 32-bit constant ``b``: the
    product is taken in 16-bit halves of b so that no int64 intermediate overflows."""
    if isinstance(a, int):
        return (a * b) & MASK32
    lo, hi = b & 0xFFFF, b >> 16
    return (a * lo + ((a * hi) & 0xFFFF) * 65536) & MASK32


def stream(key: int, count: int, lane: int) -> int:
    """The per-tensor, per-step, per-lane word s."""
    h = fmix32(((count >> 32) + lane * LANE) & MASK32)
    h = fmix32((count & MASK32) ^ h)
    return fmix32((key & MASK32) ^ h)


def parameter_key(seed: int, position: int) -> int:
    """A parameter's stream key, from the group's 64-bit ``rounding_seed`` and the parameter's
    position in its optimizer (its index in the state dict)."""
    h = fmix32((seed >> 32) & MASK32)
    h = fmix32((seed & MASK32) ^ h)
    return fmix32((h + mul32(position & MASK32, GOLDEN)) & MASK32)


def element_index(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor shaped like ``t``: each element's offset in memory from the first element (the
    index the kernels, which see dense tensors, give it). A tensor with gaps in memory (not dense)
    is copied to a contiguous work tensor before its kernel runs: its row-major index then."""
    dense = t.is_contiguous() or _dense(t)
    index = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
    stride = 1
    for d in reversed(range(t.dim())):
        step = t.stride(d) if dense else stride
        shape = [1] * t.dim()
        shape[d] = t.shape[d]
        index = index + torch.arange(t.shape[d], dtype=torch.int64, device=t.device).view(shape) * step
        stride *= t.shape[d]
    return index


def _dense(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def element_bits(s: int, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit word of each element (int64 tensor), from the tensor's word ``s``."""
    lo, hi = index & MASK32, index >> 32
    x = (s + mul32(lo, GOLDEN) + mul32(hi, INDEX_HI)) & MASK32
    return fmix32(x)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to bf16 or fp16 with the words ``bits`` (int64, x's shape)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding is from float32, got {x.dtype}")
    r = bits & 0xFFFF
    if dtype == torch.bfloat16:
        u = x.view(torch.int32).to(torch.int64) & MASK32
        y = (u + r) & 0xFFFF0000
        y = torch.where(y >= 2**31, y - 2**32, y).to(torch.int32).view(torch.float32).to(torch.bfloat16)
        # NaN: bf16's canonical quiet NaN, 0x7FC0, as the kernels store it (rounding.h's
        # bf16_bits_stochastic); a conversion keeps or drops the sign and payload by platform.
        nan = torch.tensor(0x7FC0, dtype=torch.int16, device=x.device).view(torch.bfloat16)
        return torch.where(torch.isnan(x), nan, y)
    if dtype == torch.float16:
        t = x.to(torch.float16)
        t_bits = t.view(torch.int16).to(torch.int64) & 0xFFFF
        sign, magnitude = t_bits & 0x8000, t_bits & 0x7FFF
        ax = x.abs()
        a_mag = torch.where(t.to(torch.float32).abs() > ax, magnitude - 1, magnitude)  # toward zero
        a, b = _half(a_mag), _half(a_mag + 1)
        threshold = (65536 - r).to(torch.float32) * (b - a) * 2.0**-16  # exact: 17 bits × powers of two
        out = torch.where((ax - a) >= threshold, a_mag + 1, a_mag) | sign
        special = torch.isnan(x) | (ax > 65504.0)
        return torch.where(special, t, _half_bits(out))
    raise TypeError(f"stochastic rounding is to bfloat16 or float16, got {dtype}")


def _half_bits(b: torch.Tensor) -> torch.Tensor:
    return torch.where(b >= 2**15, b - 2**16, b).to(torch.int16).view(torch.float16)


def _half(magnitude: torch.Tensor) -> torch.Tensor:
    """The non-negative fp16 value of 15-bit magnitudes, as fp32."""
    return _half_bits(magnitude).to(torch.float32)


class Rounder:
    """How one tensor's fp32 results are loaded and stored: its parameter (``load``/``store_param``)
    and its state tensors (``load_state``/``store_state``). Stochastically rounded with the
    parameter's ``rng`` (key, count) where the stored dtype is bf16 or fp16 or the state is 8-bit,
    else rounded to nearest; with a ``correction`` (a compensated bf16 parameter, below) the
    parameter is its master weight; a state whose lane has ``scales`` is 8-bit (quantization.py)."""

    def __init__(self, rng: torch.Tensor | None, param: torch.Tensor, correction: torch.Tensor | None = None,
                 scales: dict | None = None):
        self.key_count = None
        self.correction = correction
        self.scales = scales or {}
        if rng is not None:
            words = [int(v) for v in rng.tolist()]  # [key, count] or [key, count, index base]
            self.key_count = (words[0], words[1])
            self.index = element_index(param).cpu() + (words[2] if len(words) > 2 else 0)

    def load_state(self, t: torch.Tensor, lane: int, dtype: torch.dtype) -> torch.Tensor:
        """State tensor ``t`` (of ``lane``) in the math dtype."""
        if lane in self.scales:
            from .quantization import decode

            return decode(t, self.scales[lane])
        return t.to(dtype)

    def store_state(self, t: torch.Tensor, x: torch.Tensor, lane: int) -> None:
        """Write the new state ``x`` (math dtype) into ``t``: rounded to its dtype, or encoded."""
        if lane in self.scales:
            from .quantization import encode

            codes, scales = encode(x, t.dtype, t, self.bits(lane, x.device))
            t.copy_(codes)
            self.scales[lane].copy_(scales)
            return
        t.copy_(self(x, t.dtype, lane))

    def bits(self, lane: int, device) -> torch.Tensor | None:
        if self.key_count is None:
            return None
        return element_bits(stream(*self.key_count, lane), self.index).to(device)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype, lane: int) -> torch.Tensor:
        if self.key_count is None or dtype not in LOW_PRECISION or x.dtype != torch.float32:
            return x.to(dtype)
        return stochastic_round(x, dtype, self.bits(lane, x.device))

    def load(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The parameter in the math dtype: its master weight when compensated."""
        return param.to(dtype) if self.correction is None else combine(param, self.correction)

    def store_param(self, param: torch.Tensor, w: torch.Tensor) -> None:
        """Write the new parameter (lane 0): a compensated one as bf16 and correction."""
        if self.correction is None:
            param.copy_(self(w, param.dtype, 0))
            return
        p, c = split(w, self.correction.dtype, self.bits(0, w.device) if self.correction.dtype == torch.int8 else None)
        param.copy_(p)
        self.correction.copy_(c)


# ---------------------------------------------------------------------------- compensated bf16
#
# A bf16 parameter plus a correction state holding the low bits of an fp32 master weight w: the
# model computes with p = bf16(w) while the optimizer updates w, which therefore keeps 32 bits
# (int16 correction: w exactly) or 24 bits (int8 correction: w rounded to 16 significant bits,
# sign and 8 exponent bits, to nearest or stochastically). In bit patterns (as unsigned 32-bit
# words, the sign bit on top, so adding to the pattern moves the magnitude):
#
#     p_bits = (w_bits + 0x8000) >> 16            p: w to nearest bf16, ties away from zero
#     c      = w_bits − (p_bits << 16)            in [−2^15, 2^15): an int16 (32-bit master)
#     w_bits = (p_bits << 16) + c                 exact reconstruction
#
# The 24-bit master first rounds w_bits to a multiple of 2^8, then c = (w_bits − (p_bits << 16)) / 2^8
# is in [−128, 128): an int8. NaN is stored as bf16 NaN with c = 0. An fp32 w above bf16's largest
# finite gives p = ±inf, as rounding to bf16 does, while c keeps w itself.

CORRECTION_DTYPES = {32: torch.int16, 24: torch.int8}


def _words(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & MASK32


def _floats(words: torch.Tensor) -> torch.Tensor:
    words = words & MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(torch.float32)


def combine(param: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """The fp32 master weight of a bf16 ``param`` and its int16 or int8 ``correction``."""
    shift = 0 if correction.dtype == torch.int16 else 8
    p_bits = param.view(torch.int16).to(torch.int64) & 0xFFFF
    return _floats((p_bits << 16) + (correction.to(torch.int64) << shift))


def split(w: torch.Tensor, correction_dtype: torch.dtype, bits: torch.Tensor | None = None):
    """fp32 master ``w`` as (bf16 parameter, correction of ``correction_dtype``). A 24-bit master
    (int8) is rounded to 24 bits first: with the words ``bits`` stochastically (their low 8 bits,
    the carry rule of stochastic_round), else to nearest (ties away from zero)."""
    if w.dtype != torch.float32:
        raise TypeError(f"master weights are float32, got {w.dtype}")
    nan = torch.isnan(w)
    words = _words(w)
    if correction_dtype == torch.int8:
        add = (bits & 0xFF) if bits is not None else 0x80
        words = (words + add) & 0xFFFFFF00
    elif correction_dtype != torch.int16:
        raise TypeError(f"corrections are int16 (32-bit master) or int8 (24-bit), got {correction_dtype}")
    p_bits = (words + 0x8000) >> 16
    c = words - (p_bits << 16)
    if correction_dtype == torch.int8:
        c = c >> 8
    p_bits = torch.where(nan, 0x7FC0, p_bits)
    c = torch.where(nan, 0, c)
    param = torch.where(p_bits >= 2**15, p_bits - 2**16, p_bits).to(torch.int16).view(torch.bfloat16)
    return param, c.to(correction_dtype)
