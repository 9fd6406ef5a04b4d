"""SGD with momentum (L2 or decoupled decay) in Triton: one multi-tensor element-wise kernel.

The math is ``sgd_math``; see ``wdopt/reference/sgd.py`` for the specification.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    PreparedLaunch, block_offsets, check_first_steps, elementwise_passes, f64, f64_bits, first_step_flag, full_blocks_end,
    gradient_constexprs, launch, lr_value, optional, table_value, statistics_add, store_row, telemetry_add,
    tensor_pointer, unscale, work_item,
)
from .quantization import load_state, scale_pointer, state_pointer, store_state
from .rounding import correction_pointer, load_param, rounding_words, store_param

# Table columns; FIRST_STEP is the address of the buffer's first-step flag (``first_step_flag``),
# RNG that of the tensor's [key, count, index base] (stochastic rounding), CORRECTION that of a compensated
# parameter's correction, BUFFER_SCALE that of the buffer's block scales (8-bit states). The
# element count, or the row count of a monitored step, is the last column, NCOL - 1.
PARAM, GRAD, MOMENTUM_BUFFER, FIRST_STEP, RNG, CORRECTION, BUFFER_SCALE, TELEMETRY_COLUMN, ROW_SIZE = \
    (tl.constexpr(i) for i in range(9))
NCOL = tl.constexpr(10)


@triton.jit
def sgd_direction(g, b, first_step, momentum, one_minus_dampening, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr):
    """The momentum step: b ← g at the first step, else μ·b + (1 − dampening)·g; the direction
    g + μ·b (Nesterov) or b, and g itself without momentum."""
    if HAS_MOMENTUM:
        b = tl.where(first_step, g, b * momentum + one_minus_dampening * g)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    return g, b


@triton.jit
def sgd_math(p, g, b, first_step, lr, decay, weight_decay, momentum, one_minus_dampening,
             HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr):
    if DECOUPLED:
        p = p * decay
    else:
        g = g + weight_decay * p
    g, b = sgd_direction(g, b, first_step, momentum, one_minus_dampening, HAS_MOMENTUM, NESTEROV)
    p = p - lr * g
    return p, b


@triton.jit
def _sgd_block(param_ptr, correction_ptr, grad_ptr, buffer_ptr, buffer_scale_ptr, offs, mask, grad_scale_ptr,
               first_step,
               lr, decay, weight_decay, momentum, one_minus_dampening, words,
               DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
               STATISTICS: tl.constexpr, STOCHASTIC: tl.constexpr, MASTER: tl.constexpr, QUANTIZED: tl.constexpr,
               WRITE: tl.constexpr, BLOCK: tl.constexpr):
    stored = load_param(param_ptr, correction_ptr, offs, mask, MASTER)  # the master weight when compensated
    grad = tl.load(grad_ptr + offs, mask=mask)
    p = stored.to(COMPUTE)
    g = unscale(grad.to(COMPUTE), grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, COMPUTE)
    b = g
    if HAS_MOMENTUM:
        b = load_state(buffer_ptr, buffer_scale_ptr, offs, mask, COMPUTE, QUANTIZED, True)  # a fresh buffer: zeros
    # Direction statistics (wdopt/reference/telemetry.py): n = ĝ, s = the buffer before the step
    # (zero without history or momentum).
    s = tl.zeros_like(g)
    if HAS_MOMENTUM:
        s = tl.where(first_step, 0.0, b)
    p, b = sgd_math(p, g, b, first_step, lr, decay, weight_decay, momentum, one_minus_dampening,
                    HAS_MOMENTUM, NESTEROV, DECOUPLED)
    # Stored through the lanes of rounding.py's specification: the parameter 0, the buffer 1.
    new = store_param(param_ptr, correction_ptr, offs, mask, p, DTYPE, words[0], STOCHASTIC, MASTER, WRITE)
    if HAS_MOMENTUM and WRITE:
        store_state(buffer_ptr, buffer_scale_ptr, offs, mask, b, DTYPE, words[1], STOCHASTIC, QUANTIZED, True, BLOCK)
    return stored, new, grad, g, s  # for telemetry: Δω from the value stored


@triton.jit(do_not_specialize=["lr_bits", "weight_decay_bits", "decay_lr_scale_bits", "momentum_bits", "dampening_bits"])
def _sgd_kernel(
    table_ptr, work_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    lr_bits, weight_decay_bits, decay_lr_scale_bits, momentum_bits, dampening_bits,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, TELEMETRY: tl.constexpr = False, STATISTICS: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = False, MASTER: tl.constexpr = 16, QUANTIZED: tl.constexpr = False,
    WRITE: tl.constexpr = True,
):
    row, start, end = work_item(table_ptr, work_ptr, found_inf_ptr, NCOL, CHUNK, HAS_FOUND_INF)
    param_ptr = tensor_pointer(table_ptr, row, PARAM, NCOL, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(table_ptr, row, GRAD, NCOL, DTYPE, ALIGNED)
    buffer_ptr = state_pointer(table_ptr, row, MOMENTUM_BUFFER, NCOL, DTYPE, ALIGNED, QUANTIZED, True)
    buffer_scale_ptr = scale_pointer(table_ptr, row, BUFFER_SCALE, NCOL)
    first_step = first_step_flag(table_ptr, row, FIRST_STEP, NCOL)
    lr64 = lr_value(lr_bits, lr_ptr, LR_ON_DEVICE)
    weight_decay64 = f64(weight_decay_bits)
    decay = (1.0 - lr64 * weight_decay64 * f64(decay_lr_scale_bits)).to(COMPUTE)
    lr = lr64.to(COMPUTE)
    weight_decay = weight_decay64.to(COMPUTE)
    momentum = f64(momentum_bits).to(COMPUTE)
    one_minus_dampening = (1.0 - f64(dampening_bits)).to(COMPUTE)
    words = rounding_words(table_ptr, row, RNG, NCOL, STOCHASTIC)
    correction_ptr = correction_pointer(table_ptr, row, CORRECTION, NCOL, ALIGNED, MASTER)

    if TELEMETRY:  # the work item is one telemetry row: elements [start·C, end·C)
        size = table_value(table_ptr, row, ROW_SIZE, NCOL)
        w2 = tl.zeros((BLOCK,), tl.float64)
        wd, d2, g2, n2, ns, wn, s2 = w2, w2, w2, w2, w2, w2, w2
        for block_start in range(start * size, end * size, BLOCK):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < end * size
            before, after, grad, n, s = _sgd_block(
                param_ptr, correction_ptr, grad_ptr, buffer_ptr, buffer_scale_ptr, offs, mask, grad_scale_ptr,
                first_step, lr, decay, weight_decay, momentum, one_minus_dampening, words,
                DTYPE, COMPUTE, HAS_MOMENTUM, NESTEROV, DECOUPLED, MAXIMIZE, HAS_GRAD_SCALE, STATISTICS, STOCHASTIC,
                MASTER, QUANTIZED, WRITE, BLOCK)
            w2, wd, d2, g2 = telemetry_add(w2, wd, d2, g2, before, after, grad, mask, grad_scale_ptr, HAS_GRAD_SCALE)
            if STATISTICS:
                n2, ns, wn, s2 = statistics_add(n2, ns, wn, s2, before, n, s, mask)
        store_row(table_ptr, row, TELEMETRY_COLUMN, NCOL, start, end > start, w2, wd, d2, g2, n2, ns, wn, s2, STATISTICS)
    else:
        full_end = full_blocks_end(start, end, BLOCK)
        for block_start in range(start, full_end, BLOCK):
            _sgd_block(param_ptr, correction_ptr, grad_ptr, buffer_ptr, buffer_scale_ptr,
                       block_offsets(block_start, BLOCK), None,
                       grad_scale_ptr,
                       first_step, lr, decay, weight_decay, momentum, one_minus_dampening, words,
                       DTYPE, COMPUTE, HAS_MOMENTUM, NESTEROV, DECOUPLED, MAXIMIZE, HAS_GRAD_SCALE, False, STOCHASTIC,
                       MASTER, QUANTIZED, WRITE, BLOCK)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _sgd_block(param_ptr, correction_ptr, grad_ptr, buffer_ptr, buffer_scale_ptr, offs, offs < end,
                       grad_scale_ptr,
                       first_step, lr, decay, weight_decay, momentum, one_minus_dampening, words,
                       DTYPE, COMPUTE, HAS_MOMENTUM, NESTEROV, DECOUPLED, MAXIMIZE, HAS_GRAD_SCALE, False, STOCHASTIC,
                       MASTER, QUANTIZED, WRITE, BLOCK)


def sgd(
    params, grads, momentum_buffers, first_steps,
    *, lr, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay, decay_lr_scale,
    maximize, grad_scale=None, found_inf=None, telemetry=(), rng=(), correction=(), scales=None, table=None,
):
    """SGD on tensors of one device and dtype: one launch whatever their number (``telemetry``,
    ``rng``, ``correction`` and ``scales``: as in ``adamw``; the momentum buffer is lane 1).

    ``table="prepare"`` (the step driver's fast path): make the bucket's own table and return,
    without launching, the launch with everything but lr, decay_lr_scale and GradScaler's tensors
    fixed (multi_tensor.PreparedLaunch), which the caller calls at each step."""
    if not params:
        return None
    device, dtype = params[0].device, params[0].dtype
    has_momentum = momentum != 0

    def columns():
        if has_momentum:
            check_first_steps(first_steps)
        return [params, grads, momentum_buffers if has_momentum else [None] * len(params),
                list(first_steps) if has_momentum else [None] * len(params)]

    prepared = _SGDLaunch(params[0],
                          elementwise_passes(columns, params, telemetry, device, table, rng, correction, scales,
                                             [momentum_buffers if has_momentum else None]),
                          dtype, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay, maximize)
    if table == "prepare":
        return prepared
    prepared(lr, decay_lr_scale, grad_scale, found_inf)


class _SGDLaunch(PreparedLaunch):
    """SGD's launch on one table (multi_tensor.PreparedLaunch)."""

    __slots__ = ("dummy", "dtype", "maximize", "constants", "constexprs")

    def __init__(self, dummy, passes, dtype, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay,
                 maximize):
        super().__init__(passes)
        self.dummy = dummy  # any tensor of the parameters' dtype: a pointer argument the kernel does not read
        self.dtype, self.maximize = dtype, maximize
        self.constants = f64_bits(weight_decay), f64_bits(momentum), f64_bits(dampening)
        # L2 with λ = 0 adds nothing, as in the reference: not even 0·p (inf·0 would be NaN).
        self.constexprs = dict(HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov,
                               DECOUPLED=decoupled_weight_decay or weight_decay == 0)

    def __call__(self, lr, decay_lr_scale, grad_scale, found_inf):
        lr_on_device = isinstance(lr, torch.Tensor)
        dummy = self.dummy
        weight_decay, momentum, dampening = self.constants
        for table, shape in self.passes:
            launch(
                _sgd_kernel, (table.programs,), self.device,
                table.table, table.work, optional(lr if lr_on_device else None, dummy),
                optional(grad_scale, dummy), optional(found_inf, dummy),
                0 if lr_on_device else f64_bits(lr), weight_decay, f64_bits(decay_lr_scale), momentum, dampening,
                LR_ON_DEVICE=lr_on_device, **gradient_constexprs(self.dtype, self.maximize, grad_scale, found_inf),
                **self.constexprs, **shape,
            )
