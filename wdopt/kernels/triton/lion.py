"""Lion in Triton: one multi-tensor element-wise kernel.

The math is ``lion_math``; see ``wdopt/reference/lion.py`` for the specification.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    PreparedLaunch, block_offsets, elementwise_passes, f64, f64_bits, full_blocks_end, gradient_constexprs, launch, lr_value,
    optional, table_value, statistics_add, store_row, telemetry_add, tensor_pointer, unscale, work_item,
)
from .quantization import load_state, scale_pointer, state_pointer, store_state
from .rounding import correction_pointer, load_param, rounding_words, store_param

# Table columns; RNG is the address of the tensor's [key, count, index base] (stochastic rounding), CORRECTION
# that of a compensated parameter's correction, EXP_AVG_SCALE that of exp_avg's block scales (8-bit
# states). The element count, or the row count of a monitored step, is the last column, NCOL - 1.
PARAM, GRAD, EXP_AVG, RNG, CORRECTION, EXP_AVG_SCALE, TELEMETRY_COLUMN, ROW_SIZE = (tl.constexpr(i) for i in range(8))
NCOL = tl.constexpr(9)


@triton.jit
def lion_direction(g, m, one_minus_beta1, one_minus_beta2):
    """sign(m + (1−β1)(g − m)) and the new m = m + (1−β2)(g − m); the rotational kernels use it too."""
    c = m + one_minus_beta1 * (g - m)
    # Lion's sign (wdopt/reference/lion.py): c itself where c is ±0 or NaN, so a NaN gradient makes
    # the parameter NaN instead of freezing it (torch.sign(nan) is 0; the reference does not use it).
    direction = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c))
    m = m + one_minus_beta2 * (g - m)
    return direction, m


@triton.jit
def lion_math(p, g, m, lr, decay, one_minus_beta1, one_minus_beta2):
    direction, m = lion_direction(g, m, one_minus_beta1, one_minus_beta2)
    p = p * decay - lr * direction
    return p, m


@triton.jit
def _lion_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, offs, mask, grad_scale_ptr,
                lr, decay, one_minus_beta1, one_minus_beta2, words,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                STATISTICS: tl.constexpr, STOCHASTIC: tl.constexpr, MASTER: tl.constexpr, QUANTIZED: tl.constexpr,
                WRITE: tl.constexpr, BLOCK: tl.constexpr):
    stored = load_param(param_ptr, correction_ptr, offs, mask, MASTER)  # the master weight when compensated
    grad = tl.load(grad_ptr + offs, mask=mask)
    p = stored.to(COMPUTE)
    g = unscale(grad.to(COMPUTE), grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, COMPUTE)
    m = load_state(exp_avg_ptr, exp_avg_scale_ptr, offs, mask, COMPUTE, QUANTIZED, True)
    # Direction statistics (wdopt/reference/telemetry.py): n = c, whose sign is the update; s = m.
    n, s = g, m
    if STATISTICS:
        n = m + one_minus_beta1 * (g - m)
    p, m = lion_math(p, g, m, lr, decay, one_minus_beta1, one_minus_beta2)
    # Stored through the lanes of rounding.py's specification: the parameter 0, exp_avg 1.
    new = store_param(param_ptr, correction_ptr, offs, mask, p, DTYPE, words[0], STOCHASTIC, MASTER, WRITE)
    if WRITE:
        store_state(exp_avg_ptr, exp_avg_scale_ptr, offs, mask, m, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
    return stored, new, grad, n, s  # for telemetry: Δω from the value stored


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "weight_decay_bits", "decay_lr_scale_bits"])
def _lion_kernel(
    table_ptr, work_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    lr_bits, beta1_bits, beta2_bits, weight_decay_bits, decay_lr_scale_bits,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, MAXIMIZE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr = False, STATISTICS: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = False, MASTER: tl.constexpr = 16, QUANTIZED: tl.constexpr = False,
    WRITE: tl.constexpr = True,
):
    row, start, end = work_item(table_ptr, work_ptr, found_inf_ptr, NCOL, CHUNK, HAS_FOUND_INF)
    param_ptr = tensor_pointer(table_ptr, row, PARAM, NCOL, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(table_ptr, row, GRAD, NCOL, DTYPE, ALIGNED)
    exp_avg_ptr = state_pointer(table_ptr, row, EXP_AVG, NCOL, DTYPE, ALIGNED, QUANTIZED, True)
    exp_avg_scale_ptr = scale_pointer(table_ptr, row, EXP_AVG_SCALE, NCOL)
    lr64 = lr_value(lr_bits, lr_ptr, LR_ON_DEVICE)
    decay = (1.0 - lr64 * f64(weight_decay_bits) * f64(decay_lr_scale_bits)).to(COMPUTE)
    lr = lr64.to(COMPUTE)
    one_minus_beta1 = (1.0 - f64(beta1_bits)).to(COMPUTE)
    one_minus_beta2 = (1.0 - f64(beta2_bits)).to(COMPUTE)
    words = rounding_words(table_ptr, row, RNG, NCOL, STOCHASTIC)
    correction_ptr = correction_pointer(table_ptr, row, CORRECTION, NCOL, ALIGNED, MASTER)

    if TELEMETRY:  # the work item is one telemetry row: elements [start·C, end·C)
        size = table_value(table_ptr, row, ROW_SIZE, NCOL)
        w2 = tl.zeros((BLOCK,), tl.float64)
        wd, d2, g2, n2, ns, wn, s2 = w2, w2, w2, w2, w2, w2, w2
        for block_start in range(start * size, end * size, BLOCK):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < end * size
            before, after, grad, n, s = _lion_block(
                param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, offs, mask, grad_scale_ptr,
                lr, decay, one_minus_beta1, one_minus_beta2, words, DTYPE, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE,
                STATISTICS, STOCHASTIC, MASTER, QUANTIZED, WRITE, BLOCK)
            w2, wd, d2, g2 = telemetry_add(w2, wd, d2, g2, before, after, grad, mask, grad_scale_ptr, HAS_GRAD_SCALE)
            if STATISTICS:
                n2, ns, wn, s2 = statistics_add(n2, ns, wn, s2, before, n, s, mask)
        store_row(table_ptr, row, TELEMETRY_COLUMN, NCOL, start, end > start, w2, wd, d2, g2, n2, ns, wn, s2, STATISTICS)
    else:
        full_end = full_blocks_end(start, end, BLOCK)
        for block_start in range(start, full_end, BLOCK):
            _lion_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr,
                        block_offsets(block_start, BLOCK), None,
                        grad_scale_ptr,
                        lr, decay, one_minus_beta1, one_minus_beta2, words, DTYPE, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE,
                        False, STOCHASTIC, MASTER, QUANTIZED, WRITE, BLOCK)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _lion_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_scale_ptr, offs, offs < end,
                        grad_scale_ptr,
                        lr, decay, one_minus_beta1, one_minus_beta2, words, DTYPE, COMPUTE, MAXIMIZE, HAS_GRAD_SCALE,
                        False, STOCHASTIC, MASTER, QUANTIZED, WRITE, BLOCK)


def lion(
    params, grads, exp_avgs,
    *, lr, beta1, beta2, weight_decay, decay_lr_scale, maximize, grad_scale=None, found_inf=None, telemetry=(),
    rng=(), correction=(), scales=None, table=None,
):
    """Lion on tensors of one device and dtype: one launch whatever their number (``telemetry``,
    ``rng``, ``correction`` and ``scales``: as in ``adamw``; exp_avg is lane 1).

    ``table="prepare"`` (the step driver's fast path): make the bucket's own table and return,
    without launching, the launch with everything but lr, decay_lr_scale and GradScaler's tensors
    fixed (multi_tensor.PreparedLaunch), which the caller calls at each step."""
    if not params:
        return None
    device, dtype = params[0].device, params[0].dtype
    prepared = _LionLaunch(params[0],
                           elementwise_passes(lambda: [params, grads, exp_avgs], params, telemetry, device, table, rng,
                                              correction, scales, [exp_avgs]),
                           dtype, beta1, beta2, weight_decay, maximize)
    if table == "prepare":
        return prepared
    prepared(lr, decay_lr_scale, grad_scale, found_inf)


class _LionLaunch(PreparedLaunch):
    """Lion's launch on one table (multi_tensor.PreparedLaunch)."""

    __slots__ = ("dummy", "dtype", "maximize", "constants")

    def __init__(self, dummy, passes, dtype, beta1, beta2, weight_decay, maximize):
        super().__init__(passes)
        self.dummy = dummy  # any tensor of the parameters' dtype: a pointer argument the kernel does not read
        self.dtype, self.maximize = dtype, maximize
        self.constants = f64_bits(beta1), f64_bits(beta2), f64_bits(weight_decay)

    def __call__(self, lr, decay_lr_scale, grad_scale, found_inf):
        lr_on_device = isinstance(lr, torch.Tensor)
        dummy = self.dummy
        for table, shape in self.passes:
            launch(
                _lion_kernel, (table.programs,), self.device,
                table.table, table.work, optional(lr if lr_on_device else None, dummy),
                optional(grad_scale, dummy), optional(found_inf, dummy),
                0 if lr_on_device else f64_bits(lr), *self.constants, f64_bits(decay_lr_scale),
                LR_ON_DEVICE=lr_on_device, **gradient_constexprs(self.dtype, self.maximize, grad_scale, found_inf),
                **shape,
            )
