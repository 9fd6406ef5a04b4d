"""Rotational variants in Triton: the row engine (docs/theory.md section 3). The specification is
wdopt/reference/rotational.py; csrc/cpu/rotational_cpu.cpp is the same engine in C++.

The work unit is a row (a neuron: C contiguous elements; the whole tensor for a per-tensor
sphere), because the step needs the row's sums before any element can be written. A call makes
a fixed few launches, whatever the number of tensors:

* a coefficient kernel advances the step counts (unless GradScaler found an inf) and computes per
  tensor whether this is its first rotational step, 1 − norm_decay^k, and AdamW's bias corrections;
* one row kernel per row-length class. Rows that fit on chip (C ≤ ``ON_CHIP``) are grouped by
  BLOCK = the next power of two ≥ C; a program takes ROWS of them as a [ROWS, BLOCK] tile, reads
  p, g and the state once, keeps u and p in registers for the row reductions, and writes once.
  Longer rows take one program each and two passes: pass 1 computes the direction without writing
  and accumulates Σu, Σu², Σp, Σp², Σu·p; the closed forms of docs/theory.md section 3.3 then give ‖t‖²
  and the new row norm; pass 2 recomputes the direction (the same operations, so the same values),
  writes the state and the rotated row. At the first rotational step of a zero-mean row the
  frozen norm is the exact centred norm, one more read-only pass (p may not be centred yet).

The per-optimizer direction is the base kernels' own math (``adamw_direction``, ``lion_direction``,
``sgd_direction``). Reductions are in-program and in a fixed order: deterministic, no atomics.
Low precision goes through rounding.py as in the base kernels: p is read with ``load_param`` (a
compensated parameter's master weight) in every pass and written with ``store_param``, the states
with ``rounded`` in their lanes (1, 2), each element's bits taken at its offset in its tensor.

8-bit states (quantization.py: codes and a scale per 256-element block in memory order) take two
phases, as csrc/cpu/rotational_cpu.cpp: a block may straddle rows of different programs, and its
new scale is the max over all of its new values. The row kernels (QUANTIZED) read the old codes
decoded (read-only), compute the new states in fp32 and rotate with them unrounded, as the
reference does, and write the parameter but no state. Then one more launch, the block phase
(``_rotational_states_kernel``, chunks of whole blocks as the element-wise kernels' walk), decodes
the old codes again, recomputes the same new states from the gradient with the same function
(``_direction``: the same operations on the same inputs, the same bits) and encodes them with each
block's new scale (``store_state``: to nearest, or stochastically with the state lane's words).
It costs one more read of the gradient and the codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference.rounding import combine

from . import INTERPRETED
from .adamw import adamw_direction, power
from .lion import lion_direction
from .multi_tensor import (
    CHUNK, QBLOCK, QUANTIZED_ROUNDED_GPU_BLOCK, TRITON_DTYPES, block_size, cdiv, check_first_steps, compute_dtype, div,
    f64, f64_bits, first_step_flag, launch, master_bits, optional, quantized_states, sqrt, stochastic_rounding,
    table_value, telemetry_add, tensor_pointer, unscale, work_item, work_table,
)
from .quantization import load_state, scale_pointer, state_pointer, store_state
from .rounding import correction_pointer, load_param, rounding_words, store_param
from .sgd import sgd_direction

#: Rows up to this many elements are held on chip (one read, one write); longer rows take two
#: passes over memory. A module attribute, so that tests can lower it to exercise both paths.
#: On the GPU a tile lives in registers: at sm_90 a 4,096-element row spills at 16 warps (the cap
#: is then 128 registers a thread) and an 8,192-element one at 32, so rows over 2,048 elements
#: take the two-pass path (ptxas -v, tests/test_triton_cuda_codegen.py).
ON_CHIP = 8192 if INTERPRETED else 2048
#: Elements per program for short rows (ROWS = TILE / BLOCK rows of a tensor per program); the
#: interpreter runs a program in about the same time whatever its width, so it takes wide tiles.
TILE = 65536 if INTERPRETED else 2048
#: Elements per loop iteration of a long row (at most ON_CHIP); fp64 rows take half (at 2,048
#: AdamW's fp64 loop spilled 360 bytes at 16 warps).
LONG_BLOCK = 8192 if INTERPRETED else 2048
#: Warps of the long-row programs: at 8 the loop over 2,048 elements held 246 registers a thread
#: (no spill, low occupancy); at 16, 128.
LONG_WARPS = 16

ADAMW, LION, SGD = 0, 1, 2
OPTIMIZERS = {"adamw": ADAMW, "lion": LION, "sgd": SGD}

# Row table columns; the row count is the last column (NCOL - 1), so that ``work_item`` hands a
# program ROWS rows. TENSOR is the tensor's row in the coefficient buffer; RNG the address of its
# [key, count, index base] (stochastic rounding), CORRECTION that of a compensated one's correction,
# STATE1_SCALE and STATE2_SCALE those of 8-bit states' block scales. The block phase of 8-bit states
# takes a table of the same columns whose last one is the element count (work items: chunks).
(PARAM, GRAD, STATE1, STATE2, NORM, UPDATE_NORM_AVG, TELEMETRY_COLUMN, FIRST_STEP, TENSOR,
 ROW_SIZE, RNG, CORRECTION, STATE1_SCALE, STATE2_SCALE) = (tl.constexpr(i) for i in range(14))
NCOL = tl.constexpr(15)
# Coefficient table: the rotational step count and AdamW's step count, per tensor.
ROTATIONAL_STEP, STEP = tl.constexpr(0), tl.constexpr(1)
COEF_NCOL = tl.constexpr(3)
# Per-tensor coefficients (fp64): first rotational step (0/1), 1 − norm_decay^k, 1 − β1^t, sqrt(1 − β2^t).
FIRST, NORM_DECAY_BIAS_CORRECTION, BIAS_CORRECTION1, BIAS_CORRECTION2_SQRT = (tl.constexpr(i) for i in range(4))
NCOEF = tl.constexpr(4)
COEF_ROWS = 128


@triton.jit(do_not_specialize=["tensors", "beta1_bits", "beta2_bits", "norm_decay_bits"])
def _rotational_coefficients_kernel(
    table_ptr, coef_ptr, found_inf_ptr, rate_ptr, rate_out_ptr, tensors, beta1_bits, beta2_bits, norm_decay_bits,
    ADAMW_STEPS: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_RATE: tl.constexpr, PROJECTED: tl.constexpr,
    ROWS: tl.constexpr,
):
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = i < tensors
    advanced = tensors
    if HAS_FOUND_INF:
        advanced = tl.where(tl.load(found_inf_ptr) != 0, 0, tensors)
    advance = i < advanced
    k_ptr = tl.load(table_ptr + i * COEF_NCOL + ROTATIONAL_STEP, mask=in_range, other=0).to(
        tl.pointer_type(tl.float32))
    k = tl.load(k_ptr, mask=in_range, other=0.0)
    tl.store(k_ptr, k + 1.0, mask=advance)
    out = coef_ptr + i * NCOEF
    one = tl.full((ROWS,), 1.0, tl.float64)
    tl.store(out + FIRST, tl.where(k == 0.0, one, 0.0), mask=in_range)
    tl.store(out + NORM_DECAY_BIAS_CORRECTION, 1.0 - power(f64(norm_decay_bits), (k + 1.0).to(tl.int64)), mask=in_range)
    if ADAMW_STEPS:
        t_ptr = tl.load(table_ptr + i * COEF_NCOL + STEP, mask=in_range, other=0).to(tl.pointer_type(tl.float32))
        t = tl.load(t_ptr, mask=in_range, other=0.0) + 1.0
        tl.store(t_ptr, t, mask=advance)
        t = t.to(tl.int64)
        tl.store(out + BIAS_CORRECTION1, 1.0 - power(f64(beta1_bits), t), mask=in_range)
        tl.store(out + BIAS_CORRECTION2_SQRT, tl.sqrt(1.0 - power(f64(beta2_bits), t)), mask=in_range)
    else:
        tl.store(out + BIAS_CORRECTION1, one, mask=in_range)
        tl.store(out + BIAS_CORRECTION2_SQRT, one, mask=in_range)
    if HAS_RATE:  # capturable: lr (projected) or η_r², whose root is taken here (csrc/ops.cpp)
        rate = tl.load(rate_ptr)
        if not PROJECTED:
            rate = tl.sqrt(rate)  # fp64: correctly rounded
        tl.store(rate_out_ptr + i * 0, one * rate, mask=i == 0)


@triton.jit
def _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, offs, mask, grad_scale_ptr, sgd_first_step,
               inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
               momentum, words, OPTIMIZER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, STORE: tl.constexpr,
               DTYPE: tl.constexpr, COMPUTE: tl.constexpr, STOCHASTIC: tl.constexpr, QUANTIZED: tl.constexpr,
               BLOCK: tl.constexpr):
    """The base optimizer's direction u (0 on masked lanes) and the stored gradient, the one
    statement of the states' update for both phases. The states are read through quantization.py
    (QUANTIZED: decoded from their codes and block scales) and written only when STORE, in lanes
    1 and 2 of ``words`` (rounding_words): pass 1 of a long row computes u without writing; the row
    kernel never writes 8-bit states, which the block phase (``_rotational_states_kernel``, offs
    BLOCK elements from a block boundary) encodes with their blocks' new scales."""
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    g = unscale(grad.to(COMPUTE), grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, COMPUTE)
    if OPTIMIZER == 0:  # ADAMW
        m = load_state(state1_ptr, scale1_ptr, offs, mask, COMPUTE, QUANTIZED, True)
        v = load_state(state2_ptr, scale2_ptr, offs, mask, COMPUTE, QUANTIZED, False)
        u, m, v = adamw_direction(g, m, v, inv_bias_correction1, inv_bias_correction2_sqrt,
                                  one_minus_beta1, beta2, one_minus_beta2, eps, COMPUTE)
        if STORE:
            store_state(state1_ptr, scale1_ptr, offs, mask, m, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
            store_state(state2_ptr, scale2_ptr, offs, mask, v, DTYPE, words[2], STOCHASTIC, QUANTIZED, False, BLOCK)
    elif OPTIMIZER == 1:  # LION
        m = load_state(state1_ptr, scale1_ptr, offs, mask, COMPUTE, QUANTIZED, True)
        u, m = lion_direction(g, m, one_minus_beta1, one_minus_beta2)
        if STORE:
            store_state(state1_ptr, scale1_ptr, offs, mask, m, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
    else:  # SGD, fed with g only and without dampening
        b = g
        if HAS_MOMENTUM:
            b = load_state(state1_ptr, scale1_ptr, offs, mask, COMPUTE, QUANTIZED, True)
        u, b = sgd_direction(g, b, sgd_first_step, momentum, 1.0, HAS_MOMENTUM, NESTEROV)
        if STORE and HAS_MOMENTUM:
            store_state(state1_ptr, scale1_ptr, offs, mask, b, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
    return tl.where(mask, u, 0.0), grad


@triton.jit
def _direction_coefficients(coef, beta1_bits, beta2_bits, eps_bits, momentum_bits, COMPUTE: tl.constexpr):
    """The directions' scalars, rounded once to the math type (both phases take these)."""
    # 1/x from x rounded to the math type, as the reference's ``reciprocal``.
    inv_bias_correction1 = div(1.0, tl.load(coef + BIAS_CORRECTION1).to(COMPUTE), COMPUTE)
    inv_bias_correction2_sqrt = div(1.0, tl.load(coef + BIAS_CORRECTION2_SQRT).to(COMPUTE), COMPUTE)
    beta2_64 = f64(beta2_bits)
    one_minus_beta1 = (1.0 - f64(beta1_bits)).to(COMPUTE)
    one_minus_beta2 = (1.0 - beta2_64).to(COMPUTE)
    beta2 = beta2_64.to(COMPUTE)
    eps = f64(eps_bits).to(COMPUTE)
    momentum = f64(momentum_bits).to(COMPUTE)
    return inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, momentum


@triton.jit(do_not_specialize=["beta1_bits", "beta2_bits", "eps_bits", "momentum_bits"])
def _rotational_states_kernel(
    table_ptr, work_ptr, coef_ptr, grad_scale_ptr, found_inf_ptr, beta1_bits, beta2_bits, eps_bits, momentum_bits,
    OPTIMIZER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
    STOCHASTIC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """The block phase of 8-bit states, after every row kernel of the call: elements [start, end)
    of a tensor (a chunk of whole blocks of scale, BLOCK at a time), their old states decoded and
    their new ones computed again by ``_direction`` from the gradient (the same operations on the
    same inputs as the row kernel's: the same bits; its u is dropped), then encoded with each
    block's new scale, to nearest or with the state lane's words."""
    tensor, start, end = work_item(table_ptr, work_ptr, found_inf_ptr, NCOL, CHUNK, HAS_FOUND_INF)
    grad_ptr = tensor_pointer(table_ptr, tensor, GRAD, NCOL, DTYPE, False)
    state1_ptr = state_pointer(table_ptr, tensor, STATE1, NCOL, DTYPE, False, True, True)
    state2_ptr = state_pointer(table_ptr, tensor, STATE2, NCOL, DTYPE, False, True, False)
    scale1_ptr = scale_pointer(table_ptr, tensor, STATE1_SCALE, NCOL)
    scale2_ptr = scale_pointer(table_ptr, tensor, STATE2_SCALE, NCOL)
    sgd_first_step = first_step_flag(table_ptr, tensor, FIRST_STEP, NCOL)
    words = rounding_words(table_ptr, tensor, RNG, NCOL, STOCHASTIC)
    coef = coef_ptr + table_value(table_ptr, tensor, TENSOR, NCOL) * NCOEF
    inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, momentum = \
        _direction_coefficients(coef, beta1_bits, beta2_bits, eps_bits, momentum_bits, COMPUTE)
    for block_start in range(start, end, BLOCK):  # chunks start on block boundaries (CHUNK: whole blocks)
        offs = block_start + tl.arange(0, BLOCK)
        _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, offs, offs < end, grad_scale_ptr,
                   sgd_first_step, inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2,
                   one_minus_beta2, eps, momentum, words, OPTIMIZER, HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE,
                   True, DTYPE, COMPUTE, STOCHASTIC, True, BLOCK)


@triton.jit(do_not_specialize=["rate_bits", "beta1_bits", "beta2_bits", "eps_bits", "momentum_bits", "norm_decay_bits",
                               "rotational_eps_bits"])
def _rotational_kernel(
    table_ptr, work_ptr, coef_ptr, grad_scale_ptr, found_inf_ptr, rate_ptr,
    rate_bits, beta1_bits, beta2_bits, eps_bits, momentum_bits, norm_decay_bits, rotational_eps_bits,
    OPTIMIZER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ZERO_MEAN: tl.constexpr,
    PROJECTED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_RATE: tl.constexpr, TELEMETRY: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, LONG: tl.constexpr,
    STOCHASTIC: tl.constexpr, MASTER: tl.constexpr, QUANTIZED: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Rows [row_start, row_end) of ``tensor``; none when GradScaler found an inf. QUANTIZED: the
    # states are read decoded and never written (the block phase encodes them).
    tensor, row_start, row_end = work_item(table_ptr, work_ptr, found_inf_ptr, NCOL, ROWS, HAS_FOUND_INF)
    size = table_value(table_ptr, tensor, ROW_SIZE, NCOL)
    param_ptr = tensor_pointer(table_ptr, tensor, PARAM, NCOL, DTYPE, False)
    grad_ptr = tensor_pointer(table_ptr, tensor, GRAD, NCOL, DTYPE, False)
    state1_ptr = state_pointer(table_ptr, tensor, STATE1, NCOL, DTYPE, False, QUANTIZED, True)
    state2_ptr = state_pointer(table_ptr, tensor, STATE2, NCOL, DTYPE, False, QUANTIZED, False)
    scale1_ptr = scale_pointer(table_ptr, tensor, STATE1_SCALE, NCOL)
    scale2_ptr = scale_pointer(table_ptr, tensor, STATE2_SCALE, NCOL)
    norm_ptr = tensor_pointer(table_ptr, tensor, NORM, NCOL, COMPUTE, False)
    avg_ptr = tensor_pointer(table_ptr, tensor, UPDATE_NORM_AVG, NCOL, COMPUTE, False)
    telemetry_ptr = tensor_pointer(table_ptr, tensor, TELEMETRY_COLUMN, NCOL, tl.float64, False)
    sgd_first_step = first_step_flag(table_ptr, tensor, FIRST_STEP, NCOL)
    words = rounding_words(table_ptr, tensor, RNG, NCOL, STOCHASTIC)
    correction_ptr = correction_pointer(table_ptr, tensor, CORRECTION, NCOL, False, MASTER)
    coef = coef_ptr + table_value(table_ptr, tensor, TENSOR, NCOL) * NCOEF
    first = tl.load(coef + FIRST) != 0.0
    norm_decay_bias_correction = tl.load(coef + NORM_DECAY_BIAS_CORRECTION).to(COMPUTE)
    inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, momentum = \
        _direction_coefficients(coef, beta1_bits, beta2_bits, eps_bits, momentum_bits, COMPUTE)
    rate = f64(rate_bits).to(COMPUTE)  # lr (projected) or the angle η_r, a host float, unless HAS_RATE
    norm_decay64 = f64(norm_decay_bits)
    norm_decay = norm_decay64.to(COMPUTE)
    one_minus_norm_decay = (1.0 - norm_decay64).to(COMPUTE)
    rotational_eps = f64(rotational_eps_bits).to(COMPUTE)
    count = size.to(COMPUTE)

    if not LONG:
        rows = row_start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        cols = tl.arange(0, BLOCK)
        offs = rows[:, None] * size + cols[None, :]
        mask = row_ok[:, None] & (cols < size)[None, :]
        stored = tl.where(mask, load_param(param_ptr, correction_ptr, offs, mask, MASTER), 0.0)  # a master weight
        p = stored.to(COMPUTE)
        u, grad = _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, offs, mask, grad_scale_ptr,
                             sgd_first_step, inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1, beta2,
                             one_minus_beta2, eps, momentum, words, OPTIMIZER, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                             HAS_GRAD_SCALE, not QUANTIZED, DTYPE, COMPUTE, STOCHASTIC, QUANTIZED, BLOCK)
        if ZERO_MEAN:
            centred = tl.where(mask, p - div(tl.sum(p, axis=1), count, COMPUTE)[:, None], 0.0)
            fresh = sqrt(tl.sum(centred * centred, axis=1), COMPUTE)
            u = tl.where(mask, u - div(tl.sum(u, axis=1), count, COMPUTE)[:, None], 0.0)
        else:
            fresh = sqrt(tl.sum(p * p, axis=1), COMPUTE)
        n = tl.where(first, fresh, tl.load(norm_ptr + rows, mask=row_ok, other=0.0))
        radial = tl.where(n > 0, div(tl.sum(u * p, axis=1), tl.where(n > 0, n * n, 1.0), COMPUTE), 0.0)
        # The tangent t and ‖t‖² from t itself (see rotational_cpu.cpp: no moment formula on chip).
        t = u - p * radial[:, None]
        if HAS_RATE:  # capturable: from the coefficient kernel; loaded where it is used (at the top of
            rate = tl.load(rate_ptr).to(COMPUTE)  # the kernel it held a register through the tile: a spill)
        if PROJECTED:
            scale = tl.zeros((ROWS,), COMPUTE) + rate
        else:
            avg = tl.load(avg_ptr + rows, mask=row_ok, other=0.0) * norm_decay + one_minus_norm_decay * tl.sum(t * t, axis=1)
            tl.store(avg_ptr + rows, avg, mask=row_ok)
            u_bar = sqrt(div(avg, norm_decay_bias_correction, COMPUTE), COMPUTE)
            scale = div(rate * n, u_bar + rotational_eps, COMPUTE)
        q = p - scale[:, None] * t
        if ZERO_MEAN:  # re-centred against rounding drift, as the reference
            q = tl.where(mask, q - div(tl.sum(q, axis=1), count, COMPUTE)[:, None], 0.0)
        q_norm = sqrt(tl.sum(q * q, axis=1), COMPUTE)
        to_sphere = tl.where(q_norm > 0, div(n, tl.where(q_norm > 0, q_norm, 1.0), COMPUTE), 1.0)
        new = store_param(param_ptr, correction_ptr, offs, mask, q * to_sphere[:, None], DTYPE, words[0], STOCHASTIC,
                          MASTER)
        tl.store(norm_ptr + rows, n, mask=row_ok)
        if TELEMETRY:
            w2, wd, d2, g2 = telemetry_add(0.0, 0.0, 0.0, 0.0, stored, new, grad, mask, grad_scale_ptr,
                                           HAS_GRAD_SCALE)
            out = telemetry_ptr + rows * 4
            tl.store(out + 0, tl.sum(w2, axis=1), mask=row_ok)
            tl.store(out + 1, tl.sum(wd, axis=1), mask=row_ok)
            tl.store(out + 2, tl.sum(d2, axis=1), mask=row_ok)
            tl.store(out + 3, tl.sum(g2, axis=1), mask=row_ok)
    else:
        row = row_start
        active = row_end > row
        end = tl.where(active, size, 0)  # elements of the row this program updates
        base = row * size
        cols = tl.arange(0, BLOCK)
        # Sums of u − shift, shift the first block's mean: Σ(u − mean)² from moments then loses
        # nothing to a nearly constant u (Adam's first step on same-signed gradients).
        shift = tl.zeros((), COMPUTE)
        if ZERO_MEAN:
            u0, grad0 = _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, base + cols, cols < end,
                                   grad_scale_ptr, sgd_first_step, inv_bias_correction1, inv_bias_correction2_sqrt,
                                   one_minus_beta1, beta2, one_minus_beta2, eps, momentum, words, OPTIMIZER,
                                   HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE, False, DTYPE, COMPUTE, STOCHASTIC,
                                   QUANTIZED, BLOCK)
            shift = div(tl.sum(u0, axis=0), tl.maximum(tl.minimum(end, BLOCK), 1).to(COMPUTE), COMPUTE)
        acc_u = tl.zeros((BLOCK,), COMPUTE)
        acc_uu, acc_p, acc_pp, acc_up = acc_u, acc_u, acc_u, acc_u
        zero64 = tl.zeros((BLOCK,), tl.float64)
        w2, wd, d2, g2 = zero64, zero64, zero64, zero64
        for start in range(0, end, BLOCK):  # pass 1: read only
            offs = base + start + cols
            mask = start + cols < end
            stored = tl.where(mask, load_param(param_ptr, correction_ptr, offs, mask, MASTER), 0.0)
            p = stored.to(COMPUTE)
            u, grad = _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, offs, mask, grad_scale_ptr,
                                 sgd_first_step, inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1,
                                 beta2, one_minus_beta2, eps, momentum, words, OPTIMIZER, HAS_MOMENTUM, NESTEROV,
                                 MAXIMIZE, HAS_GRAD_SCALE, False, DTYPE, COMPUTE, STOCHASTIC, QUANTIZED, BLOCK)
            us = tl.where(mask, u - shift, 0.0)
            acc_u += us
            acc_uu += us * us
            acc_p += p
            acc_pp += p * p
            acc_up += us * p
            if TELEMETRY:  # Σω² and Σĝ² (Δω = 0 here: the cross terms come in pass 2)
                w2, unused_wd, unused_d2, g2 = telemetry_add(w2, wd, d2, g2, stored, stored, grad, mask,
                                                             grad_scale_ptr, HAS_GRAD_SCALE)
        sum_u = tl.sum(acc_u, axis=0)
        sum_uu = tl.sum(acc_uu, axis=0)
        sum_p = tl.sum(acc_p, axis=0)
        sum_pp = tl.sum(acc_pp, axis=0)
        sum_up = tl.sum(acc_up, axis=0)
        mean_p = div(sum_p, count, COMPUTE)
        if ZERO_MEAN:
            d = div(sum_u, count, COMPUTE)  # mean(u) − shift
            mean_u = shift + d
            uu = tl.maximum(sum_uu - d * sum_u, 0.0)  # Σu_c², u_c = u − mean(u)
            up = sum_up - d * sum_p  # Σu_c·p
            acc_cc = tl.zeros((BLOCK,), COMPUTE)
            for start in range(0, tl.where(first, end, 0), BLOCK):  # the exact centred norm, once
                mask = start + cols < end
                c = tl.where(mask, load_param(param_ptr, correction_ptr, base + start + cols, mask, MASTER).to(COMPUTE)
                             - mean_p, 0.0)
                acc_cc += c * c
            # ‖p − mean(p)‖²: after the first step p is centred and the moment form loses nothing.
            pp = tl.where(first, tl.sum(acc_cc, axis=0), tl.maximum(sum_pp - mean_p * sum_p, 0.0))
        else:
            mean_u = tl.zeros((), COMPUTE)
            uu = sum_uu
            up = sum_up
            pp = sum_pp
        n = tl.where(first, sqrt(pp, COMPUTE), tl.load(norm_ptr + row, mask=active, other=0.0))
        radial = tl.where(n > 0, div(up, tl.where(n > 0, n * n, 1.0), COMPUTE), 0.0)
        # t = u_c − r·p: ‖t‖² = Σu_c² − 2rΣu_c·p + r²Σp².
        tangent_sq = tl.maximum(uu - 2.0 * radial * up + radial * radial * sum_pp, 0.0)
        if HAS_RATE:
            rate = tl.load(rate_ptr).to(COMPUTE)
        if PROJECTED:
            scale = rate
        else:
            avg = tl.load(avg_ptr + row, mask=active, other=0.0) * norm_decay + one_minus_norm_decay * tangent_sq
            tl.store(avg_ptr + row, avg, mask=active)
            u_bar = sqrt(div(avg, norm_decay_bias_correction, COMPUTE), COMPUTE)
            scale = div(rate * n, u_bar + rotational_eps, COMPUTE)
        # q = p − scale·t; q − mean(q) = (p − mean(p)) − scale·(u_c − r·(p − mean(p))), whose norm
        # follows from the centred sums (all equal to the plain ones without zero_mean).
        q_sq = pp - 2.0 * scale * (up - radial * pp) + scale * scale * (uu - 2.0 * radial * up + radial * radial * pp)
        mean_q = tl.zeros((), COMPUTE)
        if ZERO_MEAN:
            mean_q = mean_p + scale * radial * mean_p
        to_sphere = tl.where(q_sq > 0, div(n, sqrt(tl.where(q_sq > 0, q_sq, 1.0), COMPUTE), COMPUTE), 1.0)
        for start in range(0, end, BLOCK):  # pass 2: the same direction, written, and the step
            offs = base + start + cols
            mask = start + cols < end
            stored = tl.where(mask, load_param(param_ptr, correction_ptr, offs, mask, MASTER), 0.0)
            p = stored.to(COMPUTE)
            u, grad = _direction(grad_ptr, state1_ptr, state2_ptr, scale1_ptr, scale2_ptr, offs, mask, grad_scale_ptr,
                                 sgd_first_step, inv_bias_correction1, inv_bias_correction2_sqrt, one_minus_beta1,
                                 beta2, one_minus_beta2, eps, momentum, words, OPTIMIZER, HAS_MOMENTUM, NESTEROV,
                                 MAXIMIZE, HAS_GRAD_SCALE, not QUANTIZED, DTYPE, COMPUTE, STOCHASTIC, QUANTIZED, BLOCK)
            t = u - mean_u - p * radial
            q = p - scale * t
            new = store_param(param_ptr, correction_ptr, offs, mask, (q - mean_q) * to_sphere, DTYPE, words[0],
                              STOCHASTIC, MASTER)
            if TELEMETRY:
                unused_w2, wd, d2, unused_g2 = telemetry_add(w2, wd, d2, g2, stored, new, grad, mask, grad_scale_ptr,
                                                             False)
        tl.store(norm_ptr + row, n, mask=active)
        if TELEMETRY:
            out = telemetry_ptr + row * 4
            tl.store(out + 0, tl.sum(w2, axis=0), mask=active)
            tl.store(out + 1, tl.sum(wd, axis=0), mask=active)
            tl.store(out + 2, tl.sum(d2, axis=0), mask=active)
            tl.store(out + 3, tl.sum(g2, axis=0), mask=active)


def _num_warps(rows: int, block: int) -> int:
    """Warps of a short-row tile of ``rows`` × ``block``: no tile up to TILE spills at sm_90 (ptxas
    -v): a 16 × 128 tile held 128 registers at 8 warps and spilled at 16 (Lion, SGD), a 1 × 2048
    row the other way round."""
    return 4 if rows * block <= 512 else 16 if block >= 2048 else 8


def rotational(
    optimizer, params, grads, state1, state2, steps, rotational_norms, update_norm_avgs, rotational_steps,
    first_steps, *, lr, beta1, beta2, eps, momentum, nesterov, angle, norm_decay, rotational_eps, zero_mean, projected,
    maximize, grad_scale=None, found_inf=None, telemetry=(), rate_tensor=None, rng=(), correction=(), scales=None,
) -> None:
    """One rotational step on tensors of one device and dtype (the contract of ``wdopt::rotational_``,
    csrc/ops.cpp): 1 + (number of row-length classes) launches, whatever the number of tensors.
    ``telemetry``: [] or one float64 (K, 4) buffer per parameter (wdopt/reference/telemetry.py);
    ``rate_tensor``: None, or a float64 0-d tensor read instead of lr/angle (csrc/ops.cpp); ``rng``
    and ``correction``: stochastic rounding and compensated bf16 parameters, as for ``adamw``;
    ``scales``: {lane: one float32 vector of block scales per parameter} for 8-bit states (lanes 1
    and 2 for AdamW, 1 for Lion and SGD with momentum; state1 int8 codes, state2 uint8), as for
    ``adamw``: the row kernels then read the states decoded and write none, and one more launch,
    the block phase (``_rotational_states_kernel``), encodes them."""
    if not params:
        return
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"wdopt rotational: unknown optimizer {optimizer!r}")
    kind = OPTIMIZERS[optimizer]
    count = len(params)
    device, dtype = params[0].device, params[0].dtype
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    has_momentum = kind == SGD and momentum != 0
    if has_momentum:
        check_first_steps(first_steps)
    with_state1 = kind != SGD or has_momentum
    quantized = bool(scales)
    if quantized and dtype == torch.float64:
        raise ValueError("wdopt rotational: 8-bit states are for float32, bfloat16 and float16 parameters")
    # 8-bit states: int8 codes (exp_avg, momentum_buffer) and uint8 (exp_avg_sq).
    dtype1, dtype2 = (torch.int8, torch.uint8) if quantized else (dtype, dtype)
    rows, sizes = [], []
    for i, p in enumerate(params):
        k = rotational_norms[i].numel()
        if not (p.device == device and p.dtype == dtype and p.is_contiguous()):
            raise ValueError(f"wdopt rotational: parameter {i} must be a contiguous tensor of the call's device "
                             "and dtype")
        if grads[i].shape != p.shape or grads[i].dtype != dtype or not grads[i].is_contiguous():
            raise ValueError(f"wdopt rotational: gradient {i} does not match its parameter")
        if with_state1 and (state1[i].shape != p.shape or state1[i].dtype != dtype1 or not state1[i].is_contiguous()):
            raise ValueError(f"wdopt rotational: state of parameter {i} does not match it")
        if kind == ADAMW and (state2[i].shape != p.shape or state2[i].dtype != dtype2
                              or not state2[i].is_contiguous() or steps[i].dtype != torch.float32):
            raise ValueError(f"wdopt rotational: AdamW state of parameter {i} does not match it")
        if (rotational_norms[i].dtype != math_dtype or update_norm_avgs[i].dtype != math_dtype
                or update_norm_avgs[i].numel() != k or rotational_steps[i].dtype != torch.float32):
            raise ValueError(f"wdopt rotational: rotational state {i} must have the math dtype and one value per row")
        if k == 0 or p.numel() % k:
            raise ValueError(f"wdopt rotational: parameter {i} has {p.numel()} elements, not a multiple of its "
                             f"{k} rows")
        rows.append(k)
        sizes.append(p.numel() // k)
    for i in range(count):
        if telemetry and (telemetry[i].dtype != torch.float64 or not telemetry[i].is_contiguous()
                          or tuple(telemetry[i].shape[1:]) != (4,) or params[i].numel() % telemetry[i].shape[0]):
            raise ValueError(f"wdopt rotational: telemetry buffer {i} must be a contiguous float64 (K, 4) tensor")
    # Validated (ValueError) before anything is written: the scales (one per state lane kept), the
    # streams (which round 8-bit states' codes of float32 parameters too) and the corrections.
    lanes = [state1 if with_state1 else None, state2 if kind == ADAMW else None]
    quantized = quantized and quantized_states(scales, lanes, params)
    stochastic = stochastic_rounding(rng, params, quantized)
    master = master_bits(correction, params)
    # Telemetry is gathered in the kernel when its rows are the rotation rows (per-neuron spheres);
    # otherwise (a per-tensor sphere monitored per neuron) from a snapshot, at the cost of a copy.
    in_kernel = [bool(telemetry) and telemetry[i].shape[0] == rows[i] for i in range(count)]
    def weight(i):  # what telemetry measures: a compensated parameter's master weight
        return params[i].clone() if master == 16 else combine(params[i], correction[i])

    snapshots = {i: weight(i) for i in range(count) if telemetry and not in_kernel[i]}

    coef = torch.empty((count, NCOEF.value), dtype=torch.float64, device=device)
    rate_out = torch.empty((1,), dtype=torch.float64, device=device) if rate_tensor is not None else coef
    none = [None] * count
    coef_table = work_table([rotational_steps, steps if kind == ADAMW else none], [1] * count, device, chunk=1)
    launch(
        _rotational_coefficients_kernel, (cdiv(count, COEF_ROWS),), device,
        coef_table.table, coef, optional(found_inf, coef), optional(rate_tensor, coef), rate_out, count,
        f64_bits(beta1), f64_bits(beta2), f64_bits(norm_decay),
        ADAMW_STEPS=kind == ADAMW, HAS_FOUND_INF=found_inf is not None, HAS_RATE=rate_tensor is not None,
        PROJECTED=bool(projected), ROWS=COEF_ROWS,
    )

    on_chip = ON_CHIP
    # fp64, and the stochastic or compensated loads and stores (60 bytes of spills at sm_90 over
    # 2,048 elements, tests/test_triton_cuda_codegen.py), take half the loop width; so do 8-bit
    # states' decoding loads (fp32 AdamW: 72 bytes of spills over 2,048 elements).
    narrow = dtype == torch.float64 or stochastic or master != 16 or quantized
    widest = LONG_BLOCK if not narrow or INTERPRETED else LONG_BLOCK // 2
    long_block = max(16, min(widest, 1 << (max(on_chip, 16).bit_length() - 1)))
    # Launch classes: (BLOCK, or 0 for long rows; whether the kernel gathers telemetry).
    classes: dict[tuple[int, bool], list[int]] = {}
    for i, size in enumerate(sizes):
        block = 0 if size > on_chip else max(2, triton.next_power_of_2(size))
        classes.setdefault((block, in_kernel[i]), []).append(i)
    def scale_columns(members):  # STATE1_SCALE, STATE2_SCALE
        return [[scales[lane][i] for i in members] if quantized and lane in scales else [None] * len(members)
                for lane in (1, 2)]

    for (block, monitored), members in sorted(classes.items()):
        long = block == 0
        if long:
            rows_per_program, block, warps = 1, long_block, LONG_WARPS
        else:
            rows_per_program = max(1, min(TILE // block, triton.next_power_of_2(max(rows[i] for i in members))))
            warps = _num_warps(rows_per_program, block)

        def column(values):
            return [values[i] for i in members]

        table = work_table(
            [column(params), column(grads), column(state1) if with_state1 else none[:len(members)],
             column(state2) if kind == ADAMW else none[:len(members)], column(rotational_norms),
             column(update_norm_avgs), [telemetry[i] if in_kernel[i] else None for i in members],
             [first_steps[i] if has_momentum else None for i in members], members, column(sizes),
             [rng[i].data_ptr() for i in members] if stochastic else [None] * len(members),
             column(correction) if master != 16 else [None] * len(members),
             *scale_columns(members)],
            column(rows), device, chunk=rows_per_program,
        )
        options = dict(num_warps=warps) if device.type == "cuda" else {}
        launch(
            _rotational_kernel, (table.programs,), device,
            table.table, table.work, coef, optional(grad_scale, coef), optional(found_inf, coef), rate_out,
            f64_bits(float(lr) if projected else float(angle)), f64_bits(beta1), f64_bits(beta2), f64_bits(eps), f64_bits(momentum), f64_bits(norm_decay),
            f64_bits(rotational_eps),
            OPTIMIZER=kind, HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), ZERO_MEAN=bool(zero_mean),
            PROJECTED=bool(projected), MAXIMIZE=bool(maximize), HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_RATE=rate_tensor is not None, TELEMETRY=monitored,
            DTYPE=TRITON_DTYPES[dtype], COMPUTE=compute_dtype(dtype), LONG=long, STOCHASTIC=stochastic, MASTER=master,
            QUANTIZED=quantized, ROWS=rows_per_program, BLOCK=block, **options,
        )

    if quantized:  # the block phase, after every row kernel has read the old codes
        members = list(range(count))
        table = work_table(
            [params, grads, state1, state2 if kind == ADAMW else none, none, none, none,
             [first_steps[i] if has_momentum else None for i in members], members, none,
             [r.data_ptr() for r in rng] if stochastic else none, none, *scale_columns(members)],
            [p.numel() for p in params], device, chunk=CHUNK,
        )
        # An iteration holds whole blocks of scale; on the GPU as the element-wise 8-bit kernels.
        block = max(block_size(table.max_numel), QBLOCK)
        if not INTERPRETED and stochastic:
            block = QUANTIZED_ROUNDED_GPU_BLOCK
        launch(
            _rotational_states_kernel, (table.programs,), device,
            table.table, table.work, coef, optional(grad_scale, coef), optional(found_inf, coef),
            f64_bits(beta1), f64_bits(beta2), f64_bits(eps), f64_bits(momentum),
            OPTIMIZER=kind, HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, DTYPE=TRITON_DTYPES[dtype],
            COMPUTE=compute_dtype(dtype), STOCHASTIC=stochastic, CHUNK=CHUNK, BLOCK=block,
        )

    if snapshots:
        from ...reference.telemetry import row_sums

        for i, before in snapshots.items():
            sums = row_sums(before, weight(i), grads[i], telemetry[i].shape[0], grad_scale)
            if found_inf is not None:  # a skipped step leaves the buffer as it was
                sums = torch.where(found_inf.to(device) != 0, telemetry[i], sums)
            telemetry[i].copy_(sums)
