"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, ``distribute_tensor``).

Element-wise math does not care how a tensor is split: each rank updates its local shard with the
same kernels, on the local tensors (``DTensor._local_tensor``), and no rank talks to another. So a
step on DTensor parameters is the plain step run on local tensors, with three additions:

* the validation phase checks what local kernels need: the gradient is a DTensor on the
  parameter's mesh with the parameter's placements (not ``Partial``: tensor parallelism before its
  reduction), with the same local shape; state on the same mesh and placement as its parameter;
* state shaped like the parameter is a DTensor of the parameter's placement (``zeros_like``), so
  ``state_dict()`` and ``torch.distributed.checkpoint`` save, load and reshard it as torch.optim's;
  the ``step`` counters stay plain 0-d tensors, as torch's; per-row state of the rotational
  optimizers is 1-D, placed along rows as the parameter is (``Shard(0)`` or ``Replicate``);
* ``LocalStates`` runs a bucket's update on local tensors: the optimizer's ``state`` is, for the
  update, a view keyed by the local parameters holding local state tensors (in-place updates reach
  the DTensors, which share their storage), and state the update creates (the rotational norms) is
  wrapped back into DTensors afterwards.

Low precision (wdopt/reference/rounding.py, quantization.py) on shards. A compensated parameter's
correction and 8-bit codes are state shaped like the parameter: DTensors of its placement. Stochastic
rounding draws each element's bits from its index in the *whole* tensor: the shard's ``rng`` state
holds a third word, the global index of its first element (``set_index_base``; saved state dicts
carry it too, and it is set again for this rank's shard after a load), so that a run on any number
of ranks rounds exactly as the unsharded run. That needs each rank's shard to be one contiguous run
of the global tensor: placements ``Shard(0)`` or ``Replicate`` (FSDP2, HSDP, DDP-like replication;
``check_low_precision`` refuses tensor-parallel shards). 8-bit states keep one scale per block of
256 elements of the global tensor, so a shard must begin on a block boundary and hold whole blocks
(but the last): its codes and scales then reshard on load as the global tensor's, the codes like
the parameter, the scales (``wrap_scales``) as a 1-D tensor of ceil(numel/256) placed as the
parameter's rows; torch's chunking puts the same blocks on each rank exactly when that holds.

GradScaler needs nothing here: torch's DTensor dispatch all-reduces ``found_inf`` of
``_amp_foreach_non_finite_check_and_unscale_`` across the mesh, so every rank skips together.

``torch.distributed.tensor`` is not imported here (it costs a second): a tensor can only be a
DTensor once that module has been imported by whoever made it.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


_DTENSOR = None  # the class, once its module is imported (this check runs several times per parameter)


def is_dtensor(t) -> bool:
    kind = type(t)
    if kind is torch.Tensor or kind is torch.nn.Parameter or t is None:
        return False
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = dtensor_class()
        if _DTENSOR is None:
            return False
    return kind is _DTENSOR or isinstance(t, _DTENSOR)


def local(t):
    """The local shard of a DTensor; anything else as it is."""
    return t._local_tensor if is_dtensor(t) else t


def describe(t) -> str:
    if not is_dtensor(t):
        return "a plain tensor"
    return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"


def check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    """Raise unless local kernels can update ``p`` (a DTensor, or a plain tensor) with ``g``."""
    p_dt, g_dt = is_dtensor(p), is_dtensor(g)
    if not p_dt and not g_dt:
        return
    if p_dt != g_dt:
        raise RuntimeError(f"the gradient of {where} is {describe(g)} but the parameter is {describe(p)}; "
                           "a DTensor parameter needs a DTensor gradient with its placements")
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError(f"{where} is a Partial DTensor ({tuple(p.placements)}): a parameter must hold "
                           "its values, not pending sums")
    if any(pl.is_partial() for pl in g.placements):
        raise RuntimeError(
            f"the gradient of {where} is a Partial DTensor ({tuple(g.placements)}): each rank holds a partial "
            "sum, not the gradient (tensor parallelism before its reduction). Reduce it first, e.g. "
            f"p.grad = p.grad.redistribute(placements={tuple(p.placements)}), or let the parallel engine do it")
    if g.device_mesh is not p.device_mesh and g.device_mesh != p.device_mesh:
        raise RuntimeError(f"the gradient of {where} is on {g.device_mesh}, the parameter on {p.device_mesh}")
    if tuple(g.placements) != tuple(p.placements):
        raise RuntimeError(f"the gradient of {where} has placements {tuple(g.placements)} but the parameter "
                           f"{tuple(p.placements)}: element-wise kernels pair local shards, which need the same "
                           "placements (redistribute the gradient)")
    lp, lg = p._local_tensor, g._local_tensor
    if lg.shape != lp.shape:
        raise RuntimeError(f"the gradient of {where} has local shape {tuple(lg.shape)} on this rank but the "
                           f"parameter {tuple(lp.shape)}")
    if lg.is_sparse or lp.is_sparse:
        raise RuntimeError(f"{where}: sparse DTensors are not supported")


def row_placements(p, per_neuron: bool) -> tuple:
    """Placements of a 1-D per-row state of ``p`` (rows = dim 0): the parameter's, whose
    placements keep rows whole (``Shard(0)``/``Replicate``, checked at construction); one row
    (``per_neuron=False``) is replicated."""
    from torch.distributed.tensor import Replicate

    if per_neuron:
        return tuple(p.placements)
    return tuple(Replicate() for _ in p.placements)


def check_state(p, key: str, t, where: str, row_state_placements=None) -> None:
    """State ``t`` of DTensor-or-plain ``p`` must be placed as the kernels pair it: a parameter-shaped
    state with the parameter's placements on its mesh; a per-row state with ``row_state_placements``;
    0-d counters plain. Raises naming both placements (a state dict saved from another sharding and
    loaded with ``load_state_dict``, which does not reshard)."""
    p_dt, t_dt = is_dtensor(p), is_dtensor(t)
    if not p_dt and not t_dt:
        return
    if t.dim() == 0 and not t_dt:
        return  # step counters: plain, as torch's
    expected = tuple(p.placements) if t.shape == p.shape or row_state_placements is None else row_state_placements
    if p_dt != t_dt or t.device_mesh != p.device_mesh or tuple(t.placements) != expected:
        raise RuntimeError(
            f"state {key!r} of {where} is {describe(t)}, but the parameter is {describe(p)}, so it needs "
            f"{'placements ' + str(expected) if p_dt else 'a plain tensor'}: load optimizer state with "
            "torch.distributed.checkpoint's set_optimizer_state_dict (which reshards), or into an optimizer "
            "whose parameters are placed as when it was saved")


class LocalStates:
    """For one bucket's update: ``optimizer.state`` maps each local parameter to a dict of local
    state tensors; state created or replaced during the update is wrapped back into DTensors."""

    def __init__(self, optimizer, params: list, wrap):
        self.optimizer, self.params, self.wrap = optimizer, params, wrap
        self.locals = [local(p) for p in params]

    def __enter__(self):
        real = self.optimizer.state
        view = defaultdict(dict)
        self.entries = []
        for p, lp in zip(self.params, self.locals):
            state = real.get(p)
            if not is_dtensor(p):
                if state is not None:
                    view[p] = state  # plain parameters of a mixed bucket: their own dicts
                continue
            unwrapped = {k: local(v) for k, v in (state or {}).items()}
            view[lp] = dict(unwrapped)
            self.entries.append((p, lp, unwrapped))
        self.real, self.optimizer.state = real, view
        self.optimizer.__dict__["_global_params"] = {id(lp): p for p, lp in zip(self.params, self.locals)}
        return self.locals

    def __exit__(self, *exc):
        view, self.optimizer.state = self.optimizer.state, self.real
        self.optimizer.__dict__.pop("_global_params", None)
        for p, lp, unwrapped in self.entries:
            now = view.get(lp)
            if not now:
                continue
            state = self.real[p]
            for key, value in now.items():
                if unwrapped.get(key, None) is not value:
                    state[key] = self.wrap(p, key, value)
        return False


def from_local(p, t: torch.Tensor, placements: tuple, shape, stride=None) -> torch.Tensor:
    """``t``, this rank's shard, as a DTensor on ``p``'s mesh of the given global shape (stride:
    contiguous unless given). No communication (run_check=False): every rank wraps its own shard."""
    from torch.distributed.tensor import DTensor

    if stride is None:
        stride, size = [], 1
        for n in reversed(tuple(shape)):
            stride.append(size)
            size *= max(n, 1)
        stride = tuple(reversed(stride))
    return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(stride))


# ---------------------------------------------------------------------------- low precision


def like(p, t: torch.Tensor) -> torch.Tensor:
    """``t``, computed from ``p``'s local shard and shaped like it, as ``p`` is: a DTensor of its
    placements, or ``t`` itself for a plain ``p``."""
    if not is_dtensor(p):
        return t
    return from_local(p, t, tuple(p.placements), p.shape, p.stride())


def index_base(p) -> int | None:
    """The global (row-major) index of the first element of DTensor ``p``'s local shard, where the
    shard is one contiguous run of the global tensor (every placement ``Shard(0)`` or ``Replicate``);
    else None (tensor-parallel shards: ``Shard(d > 0)``, ``_StridedShard``)."""
    for placement in p.placements:
        if type(placement).__name__ == "_StridedShard" or (placement.is_shard() and placement.dim != 0):
            return None
    if p.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * math.prod(p.shape[1:])


def scale_placements(p) -> tuple:
    """Placements of the 8-bit block scales of DTensor ``p`` (a 1-D tensor of ceil(numel/256)): the
    parameter's, whose ``Shard(0)`` then splits the blocks as it splits the rows (checked)."""
    return tuple(p.placements)


def wrap_scales(p, scales: torch.Tensor) -> torch.Tensor:
    """This rank's block scales of DTensor ``p`` as a DTensor over all its blocks (a plain ``p``'s
    as they are)."""
    from ..reference import quantization

    if not is_dtensor(p):
        return scales
    return from_local(p, scales, scale_placements(p), (quantization.blocks(p.numel()),))


def _shard_starts(length: int, mesh, placements) -> list[int]:
    """Where every rank's shard of a dim of ``length`` begins, split by the ``Shard(0)`` placements
    as DTensor splits it (torch.chunk over each mesh dim in turn): the same list on every rank, so
    that a check on it raises on all ranks or on none."""
    spans = [(0, length)]
    for dim, placement in enumerate(placements):
        if not placement.is_shard():
            continue
        n, split = mesh.size(dim), []
        for start, size in spans:
            chunk = -(-size // n) if size else 0
            split += [(start + min(k * chunk, size), max(0, min(chunk, size - k * chunk))) for k in range(n)]
        spans = split
    return sorted({start for start, size in spans if size})


def check_low_precision(p, stochastic: bool, quantized: bool, where: str) -> None:
    """Raise unless DTensor ``p``'s shards can take stochastic rounding with global indices and
    (``quantized``) 8-bit states whose blocks are the global tensor's (module docstring). Decided
    from the placements and shapes alone: every rank raises, or none."""
    if not (stochastic or quantized) or not is_dtensor(p):
        return
    if index_base(p) is None:
        what = "stochastic rounding draws each element's bits" if stochastic else \
            "8-bit states scale blocks of 256 elements"
        raise NotImplementedError(
            f"{where} is {describe(p)}: {what} by its index in the whole tensor, which needs each rank's shard to "
            "be one contiguous run of it (placements Shard(0) or Replicate, as FSDP2 and HSDP place parameters); "
            "put tensor-parallel parameters in a group without stochastic_rounding and state_bits")
    row = math.prod(p.shape[1:]) if p.dim() else 1
    starts = [s * row for s in _shard_starts(p.shape[0] if p.dim() else 1, p.device_mesh, p.placements)]
    ends = starts[1:] + [p.numel()]
    if stochastic and any(s // 2**32 != (e - 1) // 2**32 for s, e in zip(starts, ends)):
        # The GPU kernels fold the base into the tensor's words (kernels/triton/rounding.py), exact
        # while no global index of a shard carries out of its low 32 bits.
        raise NotImplementedError(
            f"{where} is {describe(p)} of {p.numel()} elements, some of whose shards cross a multiple of 2^32 "
            "elements: stochastic rounding of such a shard is not supported; shard it over more ranks")
    if not quantized:
        return
    from ..reference import quantization

    block = quantization.BLOCK
    blocks = _shard_starts(quantization.blocks(p.numel()), p.device_mesh, scale_placements(p))
    if any(s % block for s in starts) or blocks != [s // block for s in starts]:
        raise NotImplementedError(
            f"{where} is {describe(p)}, whose shards begin at elements {starts[:4]}{'...' if len(starts) > 4 else ''} "
            f"of {p.numel()}: with state_bits=8 every shard must begin on a {block}-element block of the whole tensor "
            "and the blocks must split over the ranks as the rows do, so that codes and scales reshard as the "
            "whole tensor's. Shard it over a number of ranks that splits its rows so, or keep its group's states "
            "unquantized")


#: {id(rng): (weak reference, index base)} of the live ``rng`` tensors whose base is set (once
#: per tensor: loaded state dicts bring new ones). Not a WeakKeyDictionary: it compares keys with
#: ``==``, which a tensor answers elementwise.
_BASES: dict = {}


def set_index_base(p, state: dict) -> None:
    """``state["rng"]`` of DTensor ``p`` as [key, count, index base] with this rank's base (a new
    shard's, or one loaded from a checkpoint saved by another rank or placement), on the device
    and without reading it on the host."""
    rng = state["rng"]
    known = _BASES.get(id(rng))
    if known is not None and known[0]() is rng:
        return
    base = index_base(p)
    if base is None:
        return  # refused at the step (check_low_precision)
    new = torch.empty(3, dtype=torch.int64, device=rng.device)
    new[:2].copy_(rng[:2])
    new[2] = base
    state["rng"] = new
    key = id(new)
    _BASES[key] = (weakref.ref(new, lambda _, key=key: _BASES.pop(key, None)), base)
