"""Memory movement shared by every Triton optimizer kernel.

The host packs a ``DeviceTable`` (wdopt/kernels/tables.py) per (device, dtype) bucket; program
``i`` takes work item ``i``, a (tensor, chunk) pair; chunks are CHUNK elements, processed BLOCK at
a time. The launch count is therefore fixed, whatever the number of tensors. The device-side
helpers below read the table, and apply GradScaler's unscale and the rounding rules.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .. import tables
from . import INTERPRETED

#: Work per program. Interpreted programs cost about a millisecond each, so they take bigger chunks.
CHUNK = 65536 if INTERPRETED else 16384
#: Element-wise width of one loop iteration on the GPU, and the warps of the element-wise kernels:
#: 4 elements (one 16-byte vector of fp32) per thread. At 4 warps (8 per thread) AdamW held 168
#: registers a thread at sm_90; at 8, 92 (ptxas -v; tests/test_triton_cuda_codegen.py holds every
#: element-wise kernel to at most 128 and no spill).
GPU_BLOCK = 1024
GPU_WARPS = 8

#: Incremented by every kernel launch; tests read it to check the launch count per step.
launch_count = 0


_DOUBLE, _INT64 = struct.Struct("<d"), struct.Struct("<q")


def f64_bits(x: float) -> int:
    """The bit pattern of a double, so a kernel receives the exact value (Triton floats are fp32)."""
    return _INT64.unpack(_DOUBLE.pack(float(x)))[0]


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host (``triton.cdiv`` is a JIT function: a call costs microseconds)."""
    return -(-a // b)


def block_size(max_numel: int) -> int:
    if not INTERPRETED:
        return GPU_BLOCK
    # One interpreted iteration costs the same for 16 or 65536 lanes: cover small tensors in one.
    return max(16, min(CHUNK, triton.next_power_of_2(max(max_numel, 1))))


def work_table(columns, numels, device, chunk: int = CHUNK) -> tables.DeviceTable:
    """Work items of ``chunk`` elements; row kernels count rows instead (numels = rows, chunk = rows
    per program)."""
    return tables.DeviceTable(columns, numels, device, chunk)


def launch(kernel, grid: tuple, device: torch.device, *args, **kwargs) -> None:
    """Every launch goes through here: it sets the CUDA device and counts the launch."""
    global launch_count
    if grid[0] == 0:
        return
    launch_count += 1
    if device.type == "cuda":
        # No FMA contraction: the kernels then round exactly as the reference does.
        kwargs.setdefault("num_warps", GPU_WARPS)
        with torch.cuda.device(device):
            kernel[grid](*args, enable_fp_fusion=False, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def elementwise_table(columns, params, telemetry, device, table=None, rng=(), correction=(), scales=None,
                      states=(), write=True):
    """The table of one element-wise launch (AdamW, SGD, Lion) and its shape constexprs: the
    optimizer's columns (``columns()`` makes them), the rng and correction columns, a block-scale
    column per state lane, then the two telemetry columns; work items are chunks of CHUNK elements
    looped over BLOCK at a time, or on a monitored step (``telemetry``: a float64 (K, 4) buffer per
    parameter, (K, 8) with the direction statistics) one telemetry row each.

    ``rng``: one int64 [key, count, index base] tensor per parameter, or none. With them, bf16 and fp16 stores
    (and 8-bit states' codes) round stochastically (STOCHASTIC, wdopt/kernels/triton/rounding.py)
    and the rng column holds their addresses; otherwise it holds zeros, which nothing reads.

    ``correction``: one int16 or int8 tensor per bf16 parameter, or none: the parameters are
    compensated (MASTER 32 or 24, rounding.py's load_param/store_param) and the correction column
    holds their addresses; otherwise zeros, and MASTER 16.

    ``scales``: {lane: one float32 vector of block scales per parameter} for 8-bit states
    (QUANTIZED, wdopt/kernels/triton/quantization.py), every state lane of ``states`` (the
    optimizer's state lists in lane order, None for one it does not keep) quantized; or None.
    ``write`` False: a measuring pass that stores only telemetry (``elementwise_passes``).

    ``table``: None (a cached table, wdopt/kernels/tables.py) or "prepare", a new table owned by
    the caller (the step driver's fast path), whose gradient column the caller keeps up to date.
    ``columns`` is a function so that the launchers' signatures stay one per optimizer."""
    quantized = quantized_states(scales, states, params)
    stochastic = stochastic_rounding(rng, params, quantized)
    # Addresses as plain ints: the pair is read as two scalars, so its alignment must not count
    # against the 16-byte vector accesses of the whole table (DeviceTable checks tensors' addresses).
    master = master_bits(correction, params)
    columns = columns() + [[r.data_ptr() for r in rng] if stochastic else [None] * len(params),
                           list(correction) if master != 16 else [None] * len(params)]
    columns += [list(scales[lane]) if quantized and lane in scales else [None] * len(params)
                for lane in range(1, len(states) + 1)]
    owned = table == "prepare"
    if telemetry:
        assert not owned, "the fast path does not gather telemetry"
        buffers, row_sizes, rows = telemetry_columns(params, telemetry)
        table = work_table(columns + [buffers, row_sizes], rows, device, chunk=1)
        chunk, block = 1, telemetry_block_size(row_sizes, statistics=telemetry[0].shape[1] == 8,
                                               stochastic=stochastic, compensated=master != 16)
    else:
        assert write, "only a monitored step measures"
        table = tables.DeviceTable(columns + [[None] * len(params)] * 2, [p.numel() for p in params], device, CHUNK,
                                   owned=owned)
        chunk, block = CHUNK, block_size(table.max_numel)
        if quantized:  # an iteration holds whole blocks of scale (CHUNK is a multiple of QBLOCK)
            block = max(block, QBLOCK)
            if not INTERPRETED and (stochastic or master != 16):
                block = QUANTIZED_ROUNDED_GPU_BLOCK
    return table, dict(ALIGNED=table.aligned, CHUNK=chunk, BLOCK=block, TELEMETRY=bool(telemetry),
                       STATISTICS=bool(telemetry) and telemetry[0].shape[1] == 8, STOCHASTIC=stochastic,
                       MASTER=master, QUANTIZED=quantized, WRITE=write)


def elementwise_passes(columns, params, telemetry, device, table=None, rng=(), correction=(), scales=None,
                       states=()) -> list[tuple]:
    """The (table, constexprs) of each element-wise launch of a step: one, except on a monitored
    step with 8-bit states, whose telemetry rows cut the blocks of scale: then a measuring pass over
    the rows (nothing stored but telemetry), then the storing pass over chunks of whole blocks.
    Both compute the update from the same memory, so the telemetry is that of the update stored."""
    first = elementwise_table(columns, params, telemetry, device, table, rng, correction, scales, states,
                              write=not (telemetry and scales))
    if not (telemetry and first[1]["QUANTIZED"]):
        return [first]
    return [first, elementwise_table(columns, params, (), device, table, rng, correction, scales, states)]


#: Elements per block scale of 8-bit states (wdopt/reference/quantization.py BLOCK).
QBLOCK = 256
#: The GPU iteration of 8-bit states with stochastic rounding or compensated parameters: at
#: GPU_BLOCK, bf16 AdamW with a stochastic 24-bit master and 8-bit states held 128 registers and
#: spilled 96 bytes at sm_90; at 512, 118 and none, with 4-byte instead of 8-byte accesses
#: (tests/test_triton_cuda_codegen.py).
QUANTIZED_ROUNDED_GPU_BLOCK = 512
#: The code dtype of each kind of 8-bit state: signed (first moments, momentum) and second moments.
CODE_DTYPES = {True: torch.int8, False: torch.uint8}


def quantized_states(scales, states, params) -> bool:
    """Whether a launch's states are 8-bit: ``scales`` given, for every lane of ``states`` the
    optimizer keeps. The kernels read codes and scales through their addresses, so anything but
    int8/uint8 codes laid out as their parameters and contiguous float32 vectors of ⌈numel/256⌉
    scales on their device is refused here."""
    if not scales:
        return False
    kept = [lane for lane, s in enumerate(states, 1) if s is not None]
    if sorted(scales) != kept:
        raise ValueError(f"wdopt triton: 8-bit states need block scales for every state lane {kept}, "
                         f"got {sorted(scales)}")
    for lane in kept:
        codes, lane_scales = states[lane - 1], scales[lane]
        if len(lane_scales) != len(params) or len(codes) != len(params):
            raise ValueError(f"wdopt triton: one scale vector per parameter is needed, got {len(lane_scales)} for "
                             f"{len(params)} (lane {lane})")
        for i, (c, s, p) in enumerate(zip(codes, lane_scales, params)):
            if not isinstance(c, torch.Tensor) or c.dtype not in CODE_DTYPES.values() or c.shape != p.shape or \
                    c.stride() != p.stride() or c.device != p.device:
                raise ValueError(f"wdopt triton: 8-bit state {i} of lane {lane} must be int8/uint8 codes with the "
                                 "shape, strides and device of its parameter")
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.dim() != 1 or not s.is_contiguous() \
                    or s.numel() != cdiv(p.numel(), QBLOCK) or s.device != p.device:
                raise ValueError(f"wdopt triton: scales[{lane}][{i}] must be a contiguous float32 vector of "
                                 f"{cdiv(p.numel(), QBLOCK)} block scales on {p.device}")
    return True


#: The storage dtypes that stochastic rounding applies to; wider ones are stored as computed.
STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)


def stochastic_rounding(rng, params, quantized: bool = False) -> bool:
    """Whether a launch rounds stochastically: ``rng`` given and bf16/fp16 parameters or 8-bit
    states (``quantized``; float32 parameters are then stored exactly, rounding.rounded). The kernels
    read each triple through its address, so anything but one contiguous int64 [key, count, index base] on the
    parameters' device per parameter is refused here."""
    if not rng:
        return False
    if len(rng) != len(params):
        raise ValueError(f"wdopt triton: one rng tensor per parameter is needed, got {len(rng)} for {len(params)}")
    device = params[0].device
    for i, r in enumerate(rng):
        if not isinstance(r, torch.Tensor) or r.dtype != torch.int64 or r.numel() != 3 or not r.is_contiguous() or \
                r.device != device:
            raise ValueError(f"wdopt triton: rng[{i}] must be a contiguous int64 tensor of 3 elements ([key, count, "
                             f"index base]) on {device}")
    return params[0].dtype in STOCHASTIC_DTYPES or quantized


#: A correction tensor's dtype → the bits of the master weight it completes (wdopt/reference/rounding.py).
MASTER_BITS = {torch.int16: 32, torch.int8: 24}


def master_bits(correction, params) -> int:
    """MASTER of a launch: 16 without ``correction``, else 32 (int16) or 24 (int8). The kernels read
    element i of a correction at element i of its parameter's memory, so anything but one
    correction of the parameter's shape, strides and device per bf16 parameter, all of one dtype,
    is refused here."""
    if not correction:
        return 16
    if len(correction) != len(params):
        raise ValueError(f"wdopt triton: one correction tensor per parameter is needed, got {len(correction)} for "
                         f"{len(params)}")
    dtype = correction[0].dtype if isinstance(correction[0], torch.Tensor) else None
    for i, (c, p) in enumerate(zip(correction, params)):
        if p.dtype != torch.bfloat16 or not isinstance(c, torch.Tensor) or c.dtype not in MASTER_BITS or \
                c.dtype != dtype or c.shape != p.shape or c.stride() != p.stride() or c.device != p.device:
            raise ValueError(f"wdopt triton: correction[{i}] must be an int16 or int8 tensor (all alike) with the "
                             "shape, strides and device of its bfloat16 parameter")
    return MASTER_BITS[dtype]


class PreparedLaunch:
    """One bucket's launches with its tables and hyperparameters fixed: what an optimizer's entry
    point returns for ``table="prepare"``. The step driver's fast path keeps one per bucket and
    calls it at each step with what changes between steps; the entry point itself makes one and
    calls it once, so both run the same code. ``passes``: the (DeviceTable, constexprs) of each
    element-wise launch (``elementwise_passes``), ``table`` and ``shape`` the first's; subclasses
    define ``__call__(lr, decay_lr_scale, grad_scale, found_inf)``."""

    __slots__ = ("passes", "table", "shape", "device")

    def __init__(self, passes: list):
        self.passes = passes
        self.table, self.shape = passes[0]
        self.device = self.table.table.device


def gradient_constexprs(dtype: torch.dtype, maximize: bool, grad_scale, found_inf) -> dict:
    """The constexprs every element-wise kernel takes: storage and math dtypes, and how the gradient
    is read (``unscale``) and whether GradScaler may skip the step (``work_item``)."""
    return dict(DTYPE=TRITON_DTYPES[dtype], COMPUTE=compute_dtype(dtype), MAXIMIZE=maximize,
                HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None)


def check_first_steps(first_steps) -> None:
    """The table stores each flag's address: anything but a tensor or None would be read as one."""
    for f in first_steps:
        if f is not None and not isinstance(f, torch.Tensor):
            raise TypeError(f"wdopt triton: first_steps holds flag tensors or None, got {type(f).__name__}")


def optional(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Kernels take every pointer argument; an absent one is replaced by a harmless dummy."""
    return like if t is None else t


# ---------------------------------------------------------------- device-side helpers


@triton.jit
def f64(bits):
    """Undo ``f64_bits``: the exact double the host passed."""
    return tl.cast(bits.to(tl.int64), tl.float64, bitcast=True)


@triton.jit
def tensor_pointer(table_ptr, row, column, NCOL: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address in ``column`` of ``row``, as a pointer to DTYPE. ALIGNED: the host checked every
    address of the table is a multiple of 16 bytes, so full blocks use 16-byte vector accesses."""
    pointer = tl.load(table_ptr + row * NCOL + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def full_blocks_end(start, end, BLOCK: tl.constexpr):
    """Where this program's unmasked full blocks end; a masked tail block covers the rest."""
    return start + (end - start) // BLOCK * BLOCK


@triton.jit
def block_offsets(block_start, BLOCK: tl.constexpr):
    # Chunks start at multiples of CHUNK, itself a multiple of BLOCK.
    return tl.multiple_of(block_start, BLOCK) + tl.arange(0, BLOCK)


@triton.jit
def table_value(table_ptr, row, column, NCOL: tl.constexpr):
    return tl.load(table_ptr + row * NCOL + column)


@triton.jit
def work_item(table_ptr, work_ptr, found_inf_ptr, NCOL: tl.constexpr, CHUNK: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """This program's (row, first element, end) — an empty range when GradScaler found an inf."""
    item = tl.load(work_ptr + tl.program_id(0))
    row = item >> 32
    start = (item - (row << 32)) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(table_ptr + row * NCOL + NCOL - 1))
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) != 0, start, end)
    return row, start, end


@triton.jit
def first_step_flag(table_ptr, row, COLUMN: tl.constexpr, NCOL: tl.constexpr):
    """SGD's "the momentum buffer has no history yet", read on the device from the 0-d float32 flag
    the optimizer owns (wdopt/optim/sgd.py), so that a step captured in a CUDA graph before or after
    the first one replays correctly; address 0: the buffer has history."""
    address = table_value(table_ptr, row, COLUMN, NCOL)
    flag = tl.load(address.to(tl.pointer_type(tl.float32)), mask=address != 0, other=0.0)
    return flag != 0.0


@triton.jit
def unscale(g, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, COMPUTE: tl.constexpr):
    """The gradient as the optimizer sees it: unscaled (GradScaler) and negated (maximize)."""
    if HAS_GRAD_SCALE:  # times the scale's reciprocal, as the reference does
        g = g * div(1.0, tl.load(grad_scale_ptr).to(COMPUTE), COMPUTE)
    if MAXIMIZE:
        # Not ``-g``: some Triton versions lower it to 0 − g, which turns −0 into +0 (torch: −0).
        g = g * -1.0
    return g


@triton.jit
def lr_value(lr_bits, lr_ptr, LR_ON_DEVICE: tl.constexpr):
    """The learning rate as a double: from the host, or read from a device tensor (capturable)."""
    if LR_ON_DEVICE:
        return tl.load(lr_ptr).to(tl.float64)
    else:
        return f64(lr_bits)


@triton.jit
def div(a, b, COMPUTE: tl.constexpr):
    """Correctly rounded division (Triton's fp32 ``/`` is approximate)."""
    if COMPUTE == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sqrt(x, COMPUTE: tl.constexpr):
    """Correctly rounded square root (Triton's fp32 ``tl.sqrt`` is approximate)."""
    if COMPUTE == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def telemetry_add(w2, wd, d2, g2, before, after, grad, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """Add a block's rotation-telemetry terms (wdopt/reference/telemetry.py) to float64 accumulators:
    ω as stored before, Δω = stored after − ω (exact in float64), ĝ unscaled in float64 as
    ``row_sums`` does. Masked lanes add nothing."""
    w = tl.where(mask, before.to(tl.float64), 0.0)
    d = tl.where(mask, after.to(tl.float64) - w, 0.0)
    g = tl.where(mask, grad.to(tl.float64), 0.0)
    if HAS_GRAD_SCALE:
        g = g * (1.0 / tl.load(grad_scale_ptr).to(tl.float64))
    return w2 + w * w, wd + w * d, d2 + d * d, g2 + g * g


@triton.jit
def telemetry_store(table_ptr, tensor, COLUMN: tl.constexpr, NCOL: tl.constexpr, row, active, w2, wd, d2, g2,
                    STRIDE: tl.constexpr = 4, FIRST: tl.constexpr = 0):
    """Columns FIRST..FIRST+3 of row ``row`` of the tensor's (K, STRIDE) telemetry buffer ← the
    accumulators' sums (fixed-order in-program reductions: deterministic)."""
    out = tl.load(table_ptr + tensor * NCOL + COLUMN).to(tl.pointer_type(tl.float64)) + row * STRIDE + FIRST
    tl.store(out + 0, tl.sum(w2, axis=0), mask=active)
    tl.store(out + 1, tl.sum(wd, axis=0), mask=active)
    tl.store(out + 2, tl.sum(d2, axis=0), mask=active)
    tl.store(out + 3, tl.sum(g2, axis=0), mask=active)


@triton.jit
def store_row(table_ptr, tensor, COLUMN: tl.constexpr, NCOL: tl.constexpr, row, active, w2, wd, d2, g2,
              n2, ns, wn, s2, STATISTICS: tl.constexpr):
    """A monitored row's sums: the four telemetry sums, then (STATISTICS, an (K, 8) buffer) the
    direction statistics."""
    if STATISTICS:
        telemetry_store(table_ptr, tensor, COLUMN, NCOL, row, active, w2, wd, d2, g2, 8, 0)
        telemetry_store(table_ptr, tensor, COLUMN, NCOL, row, active, n2, ns, wn, s2, 8, 4)
    else:
        telemetry_store(table_ptr, tensor, COLUMN, NCOL, row, active, w2, wd, d2, g2)


@triton.jit
def statistics_add(n2, ns, wn, s2, before, n, s, mask):
    """Add a block's direction statistics (wdopt/reference/telemetry.py) to float64 accumulators:
    Σn², Σn·s, Σω·n, Σs² of the optimizer's direction n and momentum s before the step (formed in
    the math dtype), ω as stored before. Masked lanes add nothing."""
    w = tl.where(mask, before.to(tl.float64), 0.0)
    n = tl.where(mask, n.to(tl.float64), 0.0)
    s = tl.where(mask, s.to(tl.float64), 0.0)
    return n2 + n * n, ns + n * s, wn + w * n, s2 + s * s


def telemetry_columns(params, telemetry):
    """The two table columns of a monitored step, (buffers, row sizes), and the row counts that
    replace the element counts: one work item per telemetry row."""
    rows = [t.shape[0] for t in telemetry]
    columns = telemetry[0].shape[1] if telemetry[0].dim() == 2 else 0
    for p, t, k in zip(params, telemetry, rows):
        if t.dtype != torch.float64 or not t.is_contiguous() or t.dim() != 2 or t.shape[1] != columns or \
                columns not in (4, 8) or k == 0 or p.numel() % k:
            raise ValueError(f"wdopt triton: telemetry buffer of shape {tuple(t.shape)} ({t.dtype}) does not "
                             f"fit a parameter of {p.numel()} elements: a contiguous float64 (K, 4) is needed "
                             "((K, 8) with the direction statistics, all alike)")
    return list(telemetry), [p.numel() // k for p, k in zip(params, rows)], rows


#: Widest loop iteration of a monitored step's row programs (tests lower it to exercise the loop).
TELEMETRY_MAX_BLOCK = CHUNK if INTERPRETED else GPU_BLOCK


def telemetry_block_size(row_sizes, statistics: bool = False, stochastic: bool = False,
                         compensated: bool = False) -> int:
    """Monitored steps run one program per telemetry row, looping over it BLOCK elements at a time.
    With the direction statistics (eight float64 accumulators a lane, not four, and one more
    division) a quarter as many: at half, AdamW with amsgrad spilled 4 bytes at sm_90; at a
    quarter it uses 60 registers (tests/test_triton_cuda_codegen.py). With stochastic rounding
    (a hash per stored array) half as many: bf16 AdamW with amsgrad held 158 registers at the full
    block, 80 at half. So with compensated parameters (a correction loaded and split per element):
    bf16 AdamW with amsgrad held 128 registers at the full block with a 32-bit master, 168 with a
    stochastic 24-bit one; 64 and 80 at half (each with an 8-byte spill, ptxas trading a register
    for occupancy, tests/test_triton_cuda_codegen.py). Monitored steps are rare (a monitor's every-N), so
    their lower throughput costs little."""
    longest = triton.next_power_of_2(max(max(row_sizes, default=1), 1))
    return max(16, min(longest, TELEMETRY_MAX_BLOCK // (4 if statistics else 2 if stochastic or compensated else 1)))


def compute_dtype(dtype: torch.dtype):
    """fp64 math for fp64 tensors, fp32 math for fp32, bf16 and fp16."""
    return tl.float64 if dtype == torch.float64 else tl.float32


TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


#: The interpreter casts fp32 to bf16 by truncation; compiled Triton rounds to nearest even.
#: Under the interpreter, storage rounding is done with integer ops so both agree with torch.
_ROUND_BF16_WITH_BITS = tl.constexpr(INTERPRETED)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Round the fp32/fp64 result once to the storage dtype, to nearest even."""
    if DTYPE == tl.bfloat16 and _ROUND_BF16_WITH_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
