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

GradScaler needs nothing here: torch's DTensor dispatch all-reduces ``found_inf`` of
``_amp_foreach_non_finite_check_and_unscale_`` across the mesh, so every rank skips together.

``torch.distributed.tensor`` is not imported here (it costs a second): a tensor can only be a
DTensor once that module has been imported by whoever made it.
"""

from __future__ import annotations

import sys
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
