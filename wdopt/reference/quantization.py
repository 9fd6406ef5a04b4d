"""8-bit optimizer states: the specification of their codes, blocks and rounding.

A state tensor (AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``,
Lion's ``exp_avg``) is held as one byte per element plus one float32 scale per block of 256
elements, the blocks cut in the tensor's memory order (the element index of rounding.py): 1.016
bytes per element instead of 4 (fp32) or 2 (bf16). Kernels decode a block, update it in fp32 as
an unquantized state would be, and encode the new values with a new scale, in one pass.

Codes. A block's scale s is the largest magnitude of its new values, so the largest element is
exact and the others are relative to it. A linear code would give the small values (most of a
block: gradients are heavy-tailed) a handful of levels, or none; the codes are spaced in a space
that keeps them:

    signed states (int8 q in [−127, 127]):   x = s · sign(q) · q²/127²         (sqrt spacing)
    exp_avg_sq (uint8 q in [0, 255]):        x = s · (q²/255²)²                 (4th-root spacing)

so the smallest nonzero magnitudes are s·6e-5 and s·2.4e-10 (sqrt(v), which Adam divides by, keeps
4.8 decades). Decoding is exactly ``s * (t * t)`` with t = q²/255² for the second moment and
``s * t`` with t = q²/127² for signed states, each a correctly rounded fp32 division of an exact
integer, so the extreme codes decode to exactly ±s.

Rounding. A value x between the decoded neighbours lo ≤ |x| < hi of its code bracket rounds to
nearest (ties down) or, with ``stochastic_rounding``, up with probability ≈ (|x| − lo)/(hi − lo),
with the same rule and random words as rounding.py (its lane is the state's): stochastic rounding
keeps the state unbiased, so a slowly decaying average is not frozen at a code. The bracket comes
from the real code c = 127·sqrt(|x|/s) (255·(|x|/s)^¼), floored, then moved by one where the
decoded neighbours say the floor was off (so it never depends on how a root rounds).

Floor. A nonzero exp_avg_sq below its smallest code (s·2.4e-10) encodes to that code, 1, never to 0,
to nearest and stochastically alike: v is biased up there, never down to a zero that Adam would
divide by. Without it, an element whose gradient is 10^-5 of its block's largest keeps v at 0
while its exp_avg, a sqrt-spaced code (s·6e-5), rounds to a nonzero code (stochastically, every
so often), and its step is m/ε: 10^4–10^6 × lr on heavy-tailed gradients. With it, what is left
is the coarseness of both moments' lowest codes (m's first codes a factor 4 apart, v's 16): with
gradient scales spread over e^±9 within a block, steps of tens of lr on a few elements in 10^4
(tests/test_quantized_states.py::test_heavy_tailed_gradients_take_bounded_steps).

Non-finite values: a block with a NaN or an infinity gets a NaN scale and decodes to NaN
throughout: the state is poisoned, as an fp32 state would be in that element, but for the whole
block of 256 (and the parameters it updates become NaN, as they would).
"""

from __future__ import annotations

import math

import torch

from .rounding import element_index

BLOCK = 256
SIGNED_MAX, UNSIGNED_MAX = 127, 255
CODE_DTYPES = (torch.int8, torch.uint8)


def blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def _memory_order(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    flat[index.flatten()] = x.flatten()
    return flat


def _decode_flat(q: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of int64 codes ``q`` (memory order) with per-element scales."""
    if signed:
        t = (q * q).to(torch.float32) / float(SIGNED_MAX * SIGNED_MAX)
        return torch.where(q < 0, -(scale * t), scale * t)
    t = (q * q).to(torch.float32) / float(UNSIGNED_MAX * UNSIGNED_MAX)
    return scale * (t * t)


def _per_element(scales: torch.Tensor, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(BLOCK)[:numel]


def decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 state of ``codes`` (int8: signed, uint8: exp_avg_sq's code) and its block ``scales``."""
    signed = codes.dtype == torch.int8
    index = element_index(codes).to(codes.device)
    flat = _memory_order(codes, index).to(torch.int64)
    values = _decode_flat(flat, _per_element(scales, codes.numel()), signed)
    return values[index]


def encode(x: torch.Tensor, code_dtype: torch.dtype, like: torch.Tensor, bits: torch.Tensor | None = None):
    """fp32 ``x`` (shaped and laid out like ``like``) as (codes of ``code_dtype``, block scales);
    ``bits``: the elements' random words (rounding.py) for stochastic rounding, else nearest."""
    if x.dtype != torch.float32:
        raise TypeError(f"states are encoded from float32, got {x.dtype}")
    signed = code_dtype == torch.int8
    top = SIGNED_MAX if signed else UNSIGNED_MAX
    index = element_index(like).to(x.device)
    flat = _memory_order(x, index)
    n = flat.numel()
    padded = torch.zeros(blocks(n) * BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    # The block's largest magnitude; a block with a NaN or an infinity gets a NaN scale.
    scales = padded.abs().view(-1, BLOCK).amax(dim=1)
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, float("nan")))
    s = _per_element(scales, n)
    a = flat.abs()
    ratio = torch.where(s > 0, a / s, torch.zeros_like(a))
    root = torch.sqrt(ratio) if signed else torch.sqrt(torch.sqrt(ratio))
    lo = torch.clamp(torch.floor(root * float(top)), 0, top - 1).to(torch.int64)
    # The floor of a rounded root can be one off: move the bracket until lo ≤ |x| < hi decode.
    lo = torch.where(_decode_flat(lo, s, signed).abs() > a, torch.clamp(lo - 1, min=0), lo)
    lo = torch.where((_decode_flat(lo + 1, s, signed).abs() <= a) & (lo + 1 < top), lo + 1, lo)
    d_lo, d_hi = _decode_flat(lo, s, signed).abs(), _decode_flat(lo + 1, s, signed).abs()
    if bits is None:
        up = (a - d_lo) > (d_hi - a)
    else:
        r = (_memory_order(bits, index) & 0xFFFF).to(torch.float32)
        up = (a - d_lo) * 65536.0 >= (65536.0 - r) * (d_hi - d_lo)
    up = up | (a >= d_hi)  # |x| = s: the top code
    if not signed:  # a nonzero second moment never encodes to 0 (the docstring's "Floor")
        up = up | ((lo == 0) & (a > 0))
    q = torch.where(up, lo + 1, lo)
    q = torch.where(torch.isfinite(s) & (s > 0), q, torch.zeros_like(q))
    if signed:
        q = torch.where(flat < 0, -q, q)
    codes = torch.empty_like(like, dtype=code_dtype)  # the parameter's layout
    codes.copy_(q[index].to(code_dtype))
    return codes, scales
