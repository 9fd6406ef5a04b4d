"""8-bit optimizer states: the specification of their codes, blocks and rounding.

A state tensor (AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``,
Lion's ``exp_avg``) is held as one byte per element plus one float32 scale per block of 256
elements, the blocks cut in the tensor's memory order (the element index of rounding.py): 1.016
bytes per element instead of 4 (fp32) or 2 (bf16). Kernels decode a block, update it in fp32 as
an unquantized state would be, and encode the new values with a new scale, in one pass.

Codes: small floats under the block's scale. The scale s of a block is its largest magnitude
(exact), and a code is a float with 4 significant bits (3 stored) relative to it:

    g(q)     = the fp32 number with bit pattern (0x3F8 − TOP + q) << 20      for q ≥ 1: g(TOP) = 1
    value(q) = fl(g(q) · s),  value(0) = 0

with TOP = 127 for signed states (int8 q in [−127, 127], x = sign(q)·value(|q|)) and 255 for
second moments (uint8 q in [0, 255]). Each code below TOP is the next smaller 4-significant-bit
float: relative steps of 1/16 to 1/8 at every magnitude, from s down to s·1.25·2^-16 (signed: 16
binades of 8 codes) or s·1.25·2^-32 (second moments: 32 binades; sqrt(v), which Adam divides
by, keeps 16). That is a blockwise float code (bitsandbytes' dynamic code and fp8 with a block
scale are cousins) chosen so that encoding is one product and integer operations on its bit
pattern, exact on every backend, with no per-element division or root: x's ratio
ρ = fl(|x| · fl(1/s)) (ρ ≤ 1 + 2^-23: at most TOP; the reciprocal once per block) is rounded at bit 20 of its
bit pattern,

    to nearest:      q = (bits(ρ) + 2^19) >> 20 − (0x3F8 − TOP)              (ties away from zero)
    stochastically:  q = (bits(ρ) + (r & (2^20 − 1))) >> 20 − (0x3F8 − TOP)

at most TOP, with r the element's random word (rounding.py's rule: P(up) is the dropped
fraction to 2^-20). Below g(1) the code is 0 or 1, linearly: up iff 2ρ > g(1) to nearest (ties
down), or, stochastically, up iff ρ·2^16 ≥ (2^16 − (r & 0xFFFF))·g(1) (every product exact:
g(1) has 4 significant bits). The block's largest value decodes to itself (its ρ is within two
ulps of 1 and rounds to 1, but for a chance of order 2^-20 when stochastic), so the scale follows
it exactly from step to step.

A block whose largest magnitude is below 2^-126 (fp32's smallest normal) is stored as zeros,
scale 0: its reciprocal would overflow. A state that small does not move Adam's steps (ε is
1e-8) or anything else.

Rounding. To nearest, a code is sticky: an element whose ratio to its block's largest changes
by less than half a code step per update (exp_avg_sq's moves by 1 − β2 = 1e-3 of itself) keeps
its code and then moves with the scale, i.e. with the block's largest element, which is exact.
Stochastic rounding (``stochastic_rounding``) keeps every element unbiased on its own, so a
slowly decaying average is not frozen relative to its block (tests/test_quantized_states.py
measures both after the gradient scale drops).

Floor. A nonzero exp_avg_sq below value(1) encodes to 1, never to 0, to nearest and
stochastically alike: v is biased up there, never down to a zero that Adam would divide by
(with exp_avg a nonzero code, the step would be m/ε: 10^4–10^6 × lr on heavy-tailed gradients).

Non-finite values: a block with a NaN or an infinity gets a NaN scale and decodes to NaN
throughout: the state is poisoned for the whole block of 256, and the parameters it updates
become NaN. For a NaN that is what an fp32 state does to its element's parameter; an infinity is
harsher here: an fp32 exp_avg_sq of inf (from a finite gradient of order 1e20 or more)
only stops its element (m/sqrt(inf) = 0), where this code makes the block's 256 parameters NaN
(found by a probe, 2026-11-28; an inf-saturating scale would freeze the block instead, a change
of format not made). A block of zeros has scale 0 and zero codes.

Format history: wdopt's first 8-bit code (square-root-spaced codes, x = s·sign(q)·q²/127² and
s·(q²/255²)²) kept its block scales in ``key + "_scale"``; this code's are ``key +
"_block_scale"``. A state dict with the old keys loads through ``decode_legacy`` (wdopt.optim
converts it on load: the values kept, then encoded in this code).
"""

from __future__ import annotations

import math

import torch

from .rounding import _floats, _words, element_index

BLOCK = 256
SIGNED_MAX, UNSIGNED_MAX = 127, 255
CODE_DTYPES = (torch.int8, torch.uint8)
SHIFT = 20                  # a code is the top 12 bits of an fp32 bit pattern: 3 mantissa bits
ONE = 0x3F8                 # the top 12 bits of 1.0
SMALLEST_SCALE = 2.0**-126  # fp32's smallest normal: a block below it is stored as zeros
SCALE_SUFFIX = "_block_scale"     # state key + this: the block scales of this code
LEGACY_SCALE_SUFFIX = "_scale"    # wdopt's first code (decode_legacy)


def blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def top_code(signed: bool) -> int:
    return SIGNED_MAX if signed else UNSIGNED_MAX


def _offset(signed: bool) -> int:
    """The top 12 bits of g(q) are this plus q."""
    return ONE - top_code(signed)


def first_code(signed: bool) -> float:
    """g(1): the smallest nonzero code's ratio to the scale."""
    return float(_floats(torch.tensor((_offset(signed) + 1) << SHIFT)))


def _decode_flat(q: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of int64 codes ``q`` (memory order) with per-element scales: sign(q)·fl(g(|q|)·s)
    (NaN at a NaN scale, 0 at scale 0: products)."""
    a = q.abs()
    g = torch.where(a == 0, 0.0, _floats((_offset(signed) + a) << SHIFT))
    magnitude = g * scale
    return torch.where(q < 0, -magnitude, magnitude)


def _per_element(scales: torch.Tensor, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(BLOCK)[:numel]


def _memory_order(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    flat[index.flatten()] = x.flatten()
    return flat


def decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 state of ``codes`` (int8: signed, uint8: exp_avg_sq's code) and its block ``scales``."""
    signed = codes.dtype == torch.int8
    index = element_index(codes).to(codes.device)
    flat = _memory_order(codes, index).to(torch.int64)
    values = _decode_flat(flat, _per_element(scales.to(torch.float32), codes.numel()), signed)
    return values[index]


def encode(x: torch.Tensor, code_dtype: torch.dtype, like: torch.Tensor, bits: torch.Tensor | None = None):
    """fp32 ``x`` (shaped and laid out like ``like``) as (codes of ``code_dtype``, block scales);
    ``bits``: the elements' random words (rounding.py) for stochastic rounding, else nearest."""
    if x.dtype != torch.float32:
        raise TypeError(f"states are encoded from float32, got {x.dtype}")
    signed = code_dtype == torch.int8
    top = top_code(signed)
    index = element_index(like).to(x.device)
    flat = _memory_order(x, index)
    n = flat.numel()
    padded = torch.zeros(blocks(n) * BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    # The block's largest magnitude; a block with a NaN or an infinity gets a NaN scale, one of
    # values below fp32's smallest normal scale 0.
    scales = padded.abs().view(-1, BLOCK).amax(dim=1)
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, float("nan")))
    scales = torch.where(scales < SMALLEST_SCALE, 0.0, scales)
    s = _per_element(scales, n)
    usable = s > 0  # False at 0 and NaN: zero codes
    inverse = 1.0 / torch.where(usable, s, 1.0)
    a = torch.where(usable, flat.abs(), 0.0)
    ratio = a * inverse
    first = first_code(signed)
    words = _words(ratio)
    if bits is None:
        q = ((words + (1 << (SHIFT - 1))) >> SHIFT) - _offset(signed)
        up = ratio * 2.0 > first
    else:
        bits = _memory_order(bits, index)
        q = ((words + (bits & ((1 << SHIFT) - 1))) >> SHIFT) - _offset(signed)
        up = ratio * 65536.0 >= (65536 - (bits & 0xFFFF)).to(torch.float32) * first
    if not signed:  # a nonzero second moment never encodes to 0 (the docstring's "Floor")
        up = up | (a > 0)
    q = torch.where(ratio >= first, torch.clamp(q, max=top), up.to(torch.int64))
    q = torch.where(usable, q, 0)
    if signed:
        q = torch.where(flat < 0, -q, q)
    codes = torch.empty_like(like, dtype=code_dtype)  # the parameter's layout
    codes.copy_(q[index].to(code_dtype))
    return codes, scales


def decode_legacy(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 state of codes saved by wdopt's first 8-bit code (``key + "_scale"``: the exact
    block maximum s; x = s·sign(q)·q²/127² signed, s·(q²/255²)² for second moments)."""
    signed = codes.dtype == torch.int8
    top = SIGNED_MAX if signed else UNSIGNED_MAX
    index = element_index(codes).to(codes.device)
    q = _memory_order(codes, index).to(torch.int64)
    s = _per_element(scales.to(torch.float32), codes.numel())
    t = (q * q).to(torch.float32) / float(top * top)
    magnitude = s * t if signed else s * (t * t)
    return torch.where(q < 0, -magnitude, magnitude)[index]
