"""AdamW in Triton: per-tensor coefficients, then one multi-tensor element-wise kernel.

The math is ``adamw_math``; see ``wdopt/reference/adamw.py`` for the specification.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    PreparedLaunch, block_offsets, cdiv, div, elementwise_passes, f64, f64_bits, full_blocks_end, gradient_constexprs, launch,
    lr_value, optional, sqrt, table_value, statistics_add, store_row, telemetry_add, tensor_pointer, unscale, work_item,
)
from .quantization import load_state, scale_pointer, state_pointer, store_state
from .rounding import correction_pointer, load_param, rounding_words, store_param

# Table columns; RNG is the address of the tensor's [key, count, index base] (stochastic rounding), CORRECTION
# that of a compensated parameter's correction, *_SCALE those of the states' block scales (8-bit
# states). The element count, or the row count of a monitored step, is the last column, NCOL - 1.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, RNG, CORRECTION, EXP_AVG_SCALE, EXP_AVG_SQ_SCALE, \
    MAX_EXP_AVG_SQ_SCALE, TELEMETRY_COLUMN, ROW_SIZE = (tl.constexpr(i) for i in range(13))
NCOL = tl.constexpr(14)
# Per-tensor coefficients computed once per step, in fp64 (kernels round them once to the compute
# dtype): decay factor, step size lr/(1−β1^t), sqrt(1−β2^t).
NCOEF = tl.constexpr(3)
ROWS_PER_PROGRAM = 128


@triton.jit
def adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2):
    """m + (1−β1)(g − m) and β2·v + (1−β2)·g²."""
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    return m, v


@triton.jit
def adam_denominator(v, inv_bias_correction2_sqrt, eps, COMPUTE: tl.constexpr):
    return sqrt(v, COMPUTE) * inv_bias_correction2_sqrt + eps


@triton.jit
def adamw_math(p, g, m, v, v_max, decay, step_size, inv_bias_correction2_sqrt,
               one_minus_beta1, beta2, one_minus_beta2, eps, AMSGRAD: tl.constexpr, COMPUTE: tl.constexpr):
    p = p * decay
    m, v = adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2)
    if AMSGRAD:
        # NaN-propagating, as torch.maximum (the reference) and max_nan (adamw.h): a NaN v must not be
        # dropped in favour of the old v_max.
        v_max = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
        denom = adam_denominator(v_max, inv_bias_correction2_sqrt, eps, COMPUTE)
    else:
        denom = adam_denominator(v, inv_bias_correction2_sqrt, eps, COMPUTE)
    p = p - step_size * div(m, denom, COMPUTE)
    return p, m, v, v_max


@triton.jit
def adamw_statistics(g, m, v, v_max, inv_bias_correction2_sqrt, beta2, one_minus_beta2, eps,
                     AMSGRAD: tl.constexpr, COMPUTE: tl.constexpr):
    """Direction statistics' (n, s) (wdopt/reference/telemetry.py): ĝ and m over this step's
    denominator, from the state before the step (adamw_math's v and denominator, recomputed)."""
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        v = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
    # One division (each is a slow path in exact math): statistics need not round as the update does.
    inv_denom = div(1.0, adam_denominator(v, inv_bias_correction2_sqrt, eps, COMPUTE), COMPUTE)
    return g * inv_denom, m * inv_denom


@triton.jit
def adamw_direction(g, m, v, inv_bias_correction1, inv_bias_correction2_sqrt,
                    one_minus_beta1, beta2, one_minus_beta2, eps, COMPUTE: tl.constexpr):
    """The rotational variants' direction: Adam's step without decay and without −lr,
    (m·1/(1−β1^t)) / (sqrt(v)/sqrt(1−β2^t) + ε), with the moments updated as adamw_math does."""
    m, v = adam_moments(g, m, v, one_minus_beta1, beta2, one_minus_beta2)
    u = div(m * inv_bias_correction1, adam_denominator(v, inv_bias_correction2_sqrt, eps, COMPUTE), COMPUTE)
    return u, m, v


@triton.jit
def power(base, exponent):
    """base ** exponent in fp64 by repeated squaring (exact to a few fp64 ulps, no libm)."""
    result = tl.full(exponent.shape, 1.0, tl.float64)
    base = tl.full(exponent.shape, 1.0, tl.float64) * base
    remaining = tl.max(exponent, axis=0)
    while remaining > 0:
        result = tl.where((exponent & 1) == 1, result * base, result)
        base = base * base
        exponent = exponent >> 1
        remaining = remaining >> 1
    return result


@triton.jit(do_not_specialize=["rows", "lr_bits", "beta1_bits", "beta2_bits", "weight_decay_bits", "decay_lr_scale_bits"])
def _adamw_coefficients_kernel(
    table_ptr, coef_ptr, found_inf_ptr, lr_ptr, rows,
    lr_bits, beta1_bits, beta2_bits, weight_decay_bits, decay_lr_scale_bits,
    LR_ON_DEVICE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ROWS: tl.constexpr,
):
    """Advance each tensor's step (unless GradScaler found an inf) and compute its coefficients."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = row < rows
    step_ptr = tl.load(table_ptr + row * NCOL + STEP, mask=in_range, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=in_range, other=0.0) + 1.0
    advanced_rows = rows
    if HAS_FOUND_INF:
        advanced_rows = tl.where(tl.load(found_inf_ptr) != 0, 0, rows)
    tl.store(step_ptr, step, mask=row < advanced_rows)

    t = step.to(tl.int64)
    lr = lr_value(lr_bits, lr_ptr, LR_ON_DEVICE)
    decay = 1.0 - lr * f64(weight_decay_bits) * f64(decay_lr_scale_bits)
    step_size = lr / (1.0 - power(f64(beta1_bits), t))
    bias_correction2_sqrt = tl.sqrt(1.0 - power(f64(beta2_bits), t))
    out = coef_ptr + row * NCOEF
    tl.store(out + 0, tl.full(row.shape, 1.0, tl.float64) * decay, mask=in_range)
    tl.store(out + 1, step_size, mask=in_range)
    tl.store(out + 2, bias_correction2_sqrt, mask=in_range)


@triton.jit
def _adamw_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, scale_ptrs,
                 offs, mask,
                 grad_scale_ptr, decay, step_size, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2,
                 eps, words, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, STATISTICS: tl.constexpr, STOCHASTIC: tl.constexpr,
                 MASTER: tl.constexpr, QUANTIZED: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    stored = load_param(param_ptr, correction_ptr, offs, mask, MASTER)  # the master weight when compensated
    grad = tl.load(grad_ptr + offs, mask=mask)
    p = stored.to(COMPUTE)
    g = unscale(grad.to(COMPUTE), grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, COMPUTE)
    m = load_state(exp_avg_ptr, scale_ptrs[0], offs, mask, COMPUTE, QUANTIZED, True)
    v = load_state(exp_avg_sq_ptr, scale_ptrs[1], offs, mask, COMPUTE, QUANTIZED, False)
    v_max = v
    if AMSGRAD:
        v_max = load_state(max_exp_avg_sq_ptr, scale_ptrs[2], offs, mask, COMPUTE, QUANTIZED, False)
    n, s = g, m
    if STATISTICS:
        n, s = adamw_statistics(g, m, v, v_max, inv_bias_correction2_sqrt, beta2, one_minus_beta2, eps, AMSGRAD,
                                COMPUTE)
    p, m, v, v_max = adamw_math(p, g, m, v, v_max, decay, step_size, inv_bias_correction2_sqrt,
                                one_minus_beta1, beta2, one_minus_beta2, eps, AMSGRAD, COMPUTE)
    # Stored through the lanes of rounding.py's specification: the parameter 0, then the states in order.
    new = store_param(param_ptr, correction_ptr, offs, mask, p, DTYPE, words[0], STOCHASTIC, MASTER, WRITE)
    if WRITE:
        store_state(exp_avg_ptr, scale_ptrs[0], offs, mask, m, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
        store_state(exp_avg_sq_ptr, scale_ptrs[1], offs, mask, v, DTYPE, words[2], STOCHASTIC, QUANTIZED, False, BLOCK)
        if AMSGRAD:
            store_state(max_exp_avg_sq_ptr, scale_ptrs[2], offs, mask, v_max, DTYPE, words[3], STOCHASTIC, QUANTIZED,
                        False, BLOCK)
    return stored, new, grad, n, s  # for telemetry: Δω from the value stored


@triton.jit(do_not_specialize=["beta1_bits", "beta2_bits", "eps_bits"])
def _adamw_kernel(
    table_ptr, work_ptr, coef_ptr, grad_scale_ptr, found_inf_ptr,
    beta1_bits, beta2_bits, eps_bits,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr = False, STATISTICS: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = False, MASTER: tl.constexpr = 16, QUANTIZED: tl.constexpr = False,
    WRITE: tl.constexpr = True,
):
    row, start, end = work_item(table_ptr, work_ptr, found_inf_ptr, NCOL, CHUNK, HAS_FOUND_INF)
    param_ptr = tensor_pointer(table_ptr, row, PARAM, NCOL, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(table_ptr, row, GRAD, NCOL, DTYPE, ALIGNED)
    exp_avg_ptr = state_pointer(table_ptr, row, EXP_AVG, NCOL, DTYPE, ALIGNED, QUANTIZED, True)
    exp_avg_sq_ptr = state_pointer(table_ptr, row, EXP_AVG_SQ, NCOL, DTYPE, ALIGNED, QUANTIZED, False)
    max_exp_avg_sq_ptr = state_pointer(table_ptr, row, MAX_EXP_AVG_SQ, NCOL, DTYPE, ALIGNED, QUANTIZED, False)
    scale_ptrs = (scale_pointer(table_ptr, row, EXP_AVG_SCALE, NCOL),
                  scale_pointer(table_ptr, row, EXP_AVG_SQ_SCALE, NCOL),
                  scale_pointer(table_ptr, row, MAX_EXP_AVG_SQ_SCALE, NCOL))
    decay = tl.load(coef_ptr + row * NCOEF + 0).to(COMPUTE)
    step_size = tl.load(coef_ptr + row * NCOEF + 1).to(COMPUTE)
    # 1/sqrt(1−β2^t) from the rounded root, as the reference computes it.
    inv_bias_correction2_sqrt = div(1.0, tl.load(coef_ptr + row * NCOEF + 2).to(COMPUTE), COMPUTE)
    beta1 = f64(beta1_bits)
    beta2 = f64(beta2_bits)
    one_minus_beta1 = (1.0 - beta1).to(COMPUTE)
    one_minus_beta2 = (1.0 - beta2).to(COMPUTE)
    beta2 = beta2.to(COMPUTE)
    eps = f64(eps_bits).to(COMPUTE)
    words = rounding_words(table_ptr, row, RNG, NCOL, STOCHASTIC)
    correction_ptr = correction_pointer(table_ptr, row, CORRECTION, NCOL, ALIGNED, MASTER)

    if TELEMETRY:  # the work item is one telemetry row: elements [start·C, end·C)
        size = table_value(table_ptr, row, ROW_SIZE, NCOL)
        w2 = tl.zeros((BLOCK,), tl.float64)
        wd, d2, g2, n2, ns, wn, s2 = w2, w2, w2, w2, w2, w2, w2
        for block_start in range(start * size, end * size, BLOCK):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < end * size
            before, after, grad, n, s = _adamw_block(
                param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, scale_ptrs,
                offs, mask,
                grad_scale_ptr,
                decay, step_size, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                words, DTYPE, COMPUTE, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, STATISTICS, STOCHASTIC, MASTER,
                QUANTIZED, WRITE, BLOCK)
            w2, wd, d2, g2 = telemetry_add(w2, wd, d2, g2, before, after, grad, mask, grad_scale_ptr, HAS_GRAD_SCALE)
            if STATISTICS:
                n2, ns, wn, s2 = statistics_add(n2, ns, wn, s2, before, n, s, mask)
        store_row(table_ptr, row, TELEMETRY_COLUMN, NCOL, start, end > start, w2, wd, d2, g2, n2, ns, wn, s2, STATISTICS)
    else:
        full_end = full_blocks_end(start, end, BLOCK)
        for block_start in range(start, full_end, BLOCK):
            _adamw_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, scale_ptrs,
                         block_offsets(block_start, BLOCK), None, grad_scale_ptr,
                         decay, step_size, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                         words, DTYPE, COMPUTE, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, False, STOCHASTIC, MASTER,
                         QUANTIZED, WRITE, BLOCK)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _adamw_block(param_ptr, correction_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, scale_ptrs,
                         offs, offs < end, grad_scale_ptr,
                         decay, step_size, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                         words, DTYPE, COMPUTE, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, False, STOCHASTIC, MASTER,
                         QUANTIZED, WRITE, BLOCK)


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
    *, lr, beta1, beta2, eps, weight_decay, decay_lr_scale, amsgrad, maximize,
    grad_scale=None, found_inf=None, telemetry=(), rng=(), correction=(), scales=None, table=None,
):
    """AdamW on tensors of one device and dtype: two launches whatever their number. With
    ``telemetry`` (one float64 (K, 4) buffer per parameter) the element-wise kernel runs one program
    per telemetry row and fills the buffers as it updates the elements. With ``rng`` (one int64
    [key, count, index base] per parameter, read on the device) bf16/fp16 parameters and states are rounded
    stochastically (wdopt/reference/rounding.py; lanes: exp_avg 1, exp_avg_sq 2, max_exp_avg_sq 3).
    With ``correction`` (one int16 or int8 tensor per bf16 parameter) the parameters are compensated:
    the update, and telemetry, act on their 32- or 24-bit master weights (rounding.py). With
    ``scales`` ({lane: one float32 vector of block scales per parameter}, every state lane) the
    states are 8-bit codes (wdopt/reference/quantization.py), decoded, updated and encoded in the
    same pass; a monitored step then takes two element-wise launches (multi_tensor.elementwise_passes).

    ``table="prepare"`` (the step driver's fast path): make the bucket's own table and return,
    without launching, the launch with everything but lr, decay_lr_scale and GradScaler's tensors
    fixed (multi_tensor.PreparedLaunch), which the caller calls at each step."""
    if not params:
        return None
    device, dtype = params[0].device, params[0].dtype
    prepared = _AdamWLaunch(
        elementwise_passes(
            lambda: [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params),
                     steps],
            params, telemetry, device, table, rng, correction, scales,
            [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None]),
        dtype, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    if table == "prepare":
        return prepared
    prepared(lr, decay_lr_scale, grad_scale, found_inf)


class _AdamWLaunch(PreparedLaunch):
    """AdamW's two launches on one table (multi_tensor.PreparedLaunch)."""

    __slots__ = ("dtype", "amsgrad", "maximize", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, passes, dtype, beta1, beta2, eps, weight_decay, amsgrad, maximize):
        super().__init__(passes)
        self.dtype, self.amsgrad, self.maximize = dtype, amsgrad, maximize
        self.beta1, self.beta2, self.eps, self.weight_decay = map(f64_bits, (beta1, beta2, eps, weight_decay))

    def __call__(self, lr, decay_lr_scale, grad_scale, found_inf):
        table, device = self.table, self.device
        lr_on_device = isinstance(lr, torch.Tensor)
        coef = table.scratch("coefficients", (table.n_tensors, NCOEF.value), torch.float64)
        launch(
            _adamw_coefficients_kernel, (cdiv(table.n_tensors, ROWS_PER_PROGRAM),), device,
            table.table, coef, optional(found_inf, coef), optional(lr if lr_on_device else None, coef),
            table.n_tensors, 0 if lr_on_device else f64_bits(lr), self.beta1, self.beta2, self.weight_decay,
            f64_bits(decay_lr_scale),
            LR_ON_DEVICE=lr_on_device, HAS_FOUND_INF=found_inf is not None, ROWS=ROWS_PER_PROGRAM,
        )
        for table, shape in self.passes:  # the tables list the tensors in one order: coef's rows
            launch(
                _adamw_kernel, (table.programs,), device,
                table.table, table.work, coef, optional(grad_scale, coef), optional(found_inf, coef),
                self.beta1, self.beta2, self.eps,
                AMSGRAD=self.amsgrad, **gradient_constexprs(self.dtype, self.maximize, grad_scale, found_inf),
                **shape,
            )
