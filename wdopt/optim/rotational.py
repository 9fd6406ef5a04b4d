"""Rotational variants (Kosson, Messmer & Jaggi, ICML 2024): RotationalAdamW, RotationalSGD and
RotationalLion hold every rotational neuron on a sphere of its initial radius and rotate it by
the base optimizer's equilibrium angle from the first step (docs/theory.md section 3; the math is
wdopt/reference/rotational.py).

A tensor is rotational when its group says so (``rotational=True/False``), else when its
weight decay is non-zero and it has dim > 1. Non-rotational tensors (biases, gains) take the base
optimizer's own step, on the group's backend. Rotational tensors are updated by the backend's
fused rotational kernel where it has one (``backend.rotational``: csrc/cpu/rotational_cpu.cpp,
csrc/cuda, wdopt/kernels/triton/rotational.py), else (strided or complex buckets, the reference
backend) by the reference implementation. State dicts, GradScaler and LR schedulers work as for
the base optimizers.

Low precision: ``stochastic_rounding`` and ``master_weight_bits`` on every backend's rotational
kernel (``ROTATIONAL_LOW_PRECISION``); ``state_bits=8`` on every backend too
(``ROTATIONAL_QUANTIZED_STATES``: the CPU, CUDA and Triton row kernels rotate their rows with the
new states, then encode them in a separate pass over memory-order blocks of 256); a backend
without it would refuse at the step.
"""

from __future__ import annotations

import torch

from .. import backends, theory
from ..reference import rotational as rv
from ..reference import telemetry as tm
from ..reference._common import step_skipped
from ..reference.rounding import Rounder
from . import _dtensor
from ._base import SPARSE
from .adamw import FusedAdamW
from .lion import FusedLion
from .sgd import FusedSGD

MODES = ("equilibrium", "projected")


class _Rotational:
    """What the three rotational classes share: options, construction checks and centring, and
    the split of each step into rotational and base updates."""

    _fast_kind = None  # every step through the validation path: the rotational driver is Python
    _statistics_in_buffers = False  # its kernels take (K, 4) buffers: statistics are read before the step

    def _init_rotational(self, options: dict) -> None:
        self._rotational_defaults = options
        self._constructed = False

    def _finish_init(self) -> None:
        self.defaults.update(self._rotational_defaults)
        if not any(self._is_rotational(p, g) for g in self.param_groups for p in g["params"]):
            raise ValueError(f"{type(self).__name__}: no parameter is rotational (rotational=None takes tensors "
                             "with dim > 1 and weight_decay != 0); with none it would be its base optimizer")
        # Every group was checked before any weight changes: now centre them.
        for group in self.param_groups:
            self._centre(group)
        self._constructed = True

    @staticmethod
    def _is_rotational(p: torch.Tensor, group: dict) -> bool:
        if p.numel() == 0:
            return False  # nothing to put on a sphere
        if group["rotational"] is not None:
            return bool(group["rotational"])
        return group["weight_decay"] != 0 and p.dim() > 1

    def _centre(self, group: dict) -> None:
        if group["zero_mean"]:
            for p in group["params"]:
                if self._is_rotational(p, group):
                    rv.centre_(_dtensor.local(p), group["per_neuron"])  # rows whole on each rank (checked)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every state tensor but "step" to its parameter's dtype; the rotational state
        # is kept in the math dtype (fp32 for bf16/fp16, fp64 for fp64): take it from the source.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("rotational_norm", "update_norm_avg"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=rv.compute_dtype(p)).clone()
            if "rotational_step" in saved:
                self.state[p]["rotational_step"] = torch.as_tensor(saved["rotational_step"]).to(
                    device=p.device, dtype=torch.float32).clone()

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._rotational_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_rotational_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise
        if self._constructed:  # a group added later; the constructor centres its groups at the end
            self._centre(group)

    #: Rotation needs dense rows: sparse gradients are refused (the base FusedSGD takes them).
    _sparse_grads = False

    def _check_group_at_step(self, group: dict, index: int) -> None:
        """A group edited after construction: the rotational options are checked again at the
        next step (base hyperparameters, e.g. betas, by ``_check_group``). The per-tensor checks
        (zero rows, sharding) are construction-time only: they read every parameter."""
        self._check_rotational_options(group)

    def _plan(self):
        """The base optimizer's checks, plus (before anything is written) that the backend of each
        bucket with rotational tensors takes their 8-bit states (``state_bits=8``)."""
        plan = super()._plan()
        for group, backend, params, _ in plan:
            if group["state_bits"] != 8 or backend is None or backend is SPARSE:  # meta, sparse: no kernel
                continue
            device = params[0].device
            if backends.quantizes_rotational(backend, device) or \
                    not any(self._is_rotational(p, group) for p in params):
                continue
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            name = "triton" if "triton" in backend.__name__ else device.type  # wdopt.kernels.cpp: cpu or cuda
            *others, last = (repr(b) for b in backends.ROTATIONAL_QUANTIZED_BACKENDS)
            supported = ", ".join(others) + " and " + last
            raise NotImplementedError(
                f"param group {index}: {type(self).__name__} has no 8-bit states (state_bits=8) for rotational "
                f"tensors on backend {name!r} ({device.type} tensors) yet: they run on backends {supported} "
                "('cpu' for CPU tensors, 'cuda' and 'triton' for CUDA tensors, 'reference' on any device); use one of "
                "those, or state_bits=None")
        return plan

    def _check_rotational_options(self, group: dict) -> None:
        self._check_variant_options(group)
        if group["mode"] not in MODES:
            raise ValueError(f"Invalid mode {group['mode']!r}; choose one of {MODES}")
        if not 0.0 <= group["update_norm_decay_factor"] < 1.0:
            raise ValueError(f"Invalid update_norm_decay_factor: {group['update_norm_decay_factor']}")
        if not group["rotational_eps"] > 0.0:
            raise ValueError(f"Invalid rotational_eps: {group['rotational_eps']} (must be > 0: a row with no "
                             "tangent update would divide 0 by 0)")
        target = group["target_rotation"]
        if target is not None and not target > 0:
            raise ValueError(f"Invalid target_rotation: {target}")

    def _check_variant_options(self, group: dict) -> None:
        """What one variant's constructor refuses (amsgrad, dampening), also in an edited group."""

    def _check_rotational_group(self, group: dict, index: int) -> None:
        self._check_rotational_options(group)
        target = group["target_rotation"]
        for i, p in enumerate(group["params"]):
            if not self._is_rotational(p, group):
                continue
            where = f"parameter {i} of param group {index} (shape {tuple(p.shape)})"
            if p.is_complex():
                raise ValueError(f"{where} is complex: rotational optimizers take real tensors (mark it "
                                 "rotational=False in its own group)")
            if group["mode"] == "equilibrium" and target is None and theory.decay_fraction(group) == 0:
                raise ValueError(f"{where} is rotational but its group has no weight decay: the equilibrium "
                                 "angle needs it (or pass target_rotation)")
            if group["per_neuron"] and p.dim() < 2:
                raise ValueError(f"{where}: per_neuron needs a tensor of dim >= 2 (its rows are the neurons)")
            split = _split_rows(p, group["per_neuron"])
            if split:
                raise ValueError(f"{where} is sharded with {split}; shard it along dim 0 only (per_neuron) or "
                                 "replicate it")
            r = rv.rows(_dtensor.local(p).detach(), group["per_neuron"]).double()  # a DTensor: its rows here
            if group["zero_mean"]:
                r = r - r.mean(dim=1, keepdim=True)
            zero = (r.norm(dim=1) == 0).nonzero()
            if zero.numel():
                kind = "centred norm" if group["zero_mean"] else "norm"
                shard = " of this rank's shard" if _dtensor.is_dtensor(p) else ""
                raise ValueError(f"{where}: row {zero[0].item()}{shard} has zero {kind} (a constant row, or one element "
                                 "with zero_mean) and cannot be put on a sphere")

    def _wrap_state(self, p, key, value, group):
        return _wrap_row_state(self, super()._wrap_state, p, key, value, group)

    def _check_other_state(self, p, state: dict, group_index: int, where: str) -> None:
        super()._check_other_state(p, state, group_index, where)
        rows = None
        if _dtensor.is_dtensor(p):
            rows = _dtensor.row_placements(p, self.param_groups[group_index]["per_neuron"])
        for key in ("rotational_norm", "update_norm_avg"):
            if key in state:
                _dtensor.check_state(p, key, state[key], where, rows)

    def _angle(self, group: dict) -> float:
        """η_r, the angle per step, on the host (a tensor lr is read there)."""
        if group["mode"] == "projected":
            return 0.0  # the projected step uses lr, not an angle
        if group["target_rotation"] is not None:
            return float(group["target_rotation"])
        d = theory.decay_fraction(group)
        # lr = 0 (a warm-up's start) or a NaN lr: no rotation.
        return theory.equilibrium_angle(d, self._rotation_factor(group)) if d > 0 else 0.0

    def _rate_tensor(self, group: dict, device: torch.device) -> torch.Tensor | None:
        """The step's rate computed on ``device`` from a capturable tensor lr, with no host read
        (CUDA graphs, sync-free steps): a float64 0-d tensor holding lr (projected mode) or η_r²
        (equilibrium mode), which the kernels read instead of their ``lr``/``angle`` argument.
        η_r² = d·factor is the host formula's product, op for op (d = lr·λ·scale, as
        ``theory.decay_fraction`` rounds it); the kernels take the root themselves because
        torch's CPU sqrt is not correctly rounded (about 1% of float64 inputs are an ulp off) and
        theirs is, so both paths give the kernels the same bits. None: the rate is a host float."""
        lr = group["lr"]
        if not (group["capturable"] and isinstance(lr, torch.Tensor)):
            return None
        if group["mode"] == "equilibrium" and group["target_rotation"] is not None:
            return None  # a fixed angle: a host float
        lr = lr.to(device=device, dtype=torch.float64).reshape(())
        if group["mode"] == "projected":
            return lr
        d = lr * float(group["weight_decay"]) * self._decay_lr_scale(group)
        return torch.where(d > 0, d * self._rotation_factor(group), 0.0)

    def _update(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry=()):
        # Before anything changes (they may raise); with a capturable tensor lr, on the device.
        rate = self._rate_tensor(group, params[0].device) if params else None
        angle = self._angle(group) if rate is None else None
        rotational = [self._is_rotational(self._global(p), group) for p in params]  # a shard may be empty
        base = [i for i, r in enumerate(rotational) if not r]
        if base:
            super()._update(group, backend, [params[i] for i in base], [grads[i] for i in base],
                            grad_scale, found_inf, kernel_ready, [telemetry[i] for i in base] if telemetry else ())
        chosen = [i for i, r in enumerate(rotational) if r]
        if not chosen:
            return
        params, grads = [params[i] for i in chosen], [grads[i] for i in chosen]
        telemetry = [telemetry[i] for i in chosen] if telemetry else []
        if kernel_ready and any(p.numel() == 0 for p in params):
            # A rank holding no rows of a Shard(0) DTensor: the fused kernels take no empty tensor;
            # the per-tensor path (kernel_ready=False) advances its counters and makes its empty
            # state as the other ranks' steps do. The other tensors keep the fused kernel.
            empty = [i for i, p in enumerate(params) if p.numel() == 0]
            self._update(group, backend, [params[i] for i in empty], [grads[i] for i in empty], grad_scale,
                         found_inf, False)
            keep = [i for i, p in enumerate(params) if p.numel() != 0]
            if not keep:
                return
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
            telemetry = [telemetry[i] for i in keep] if telemetry else []
        available = getattr(backend, "rotational_available", lambda device: callable(getattr(backend, "rotational", None)))
        fused = kernel_ready and available(params[0].device)
        if fused and (self._rngs(group, params) or group["master_weight_bits"] != 16):
            # Stochastic rounding or compensation: where the backend's rotational kernel has them.
            fused = params[0].device.type in getattr(backend, "ROTATIONAL_LOW_PRECISION", ())
        if fused and group["state_bits"] == 8:  # 8-bit states: likewise (others were refused by _plan)
            fused = params[0].device.type in getattr(backend, "ROTATIONAL_QUANTIZED_STATES", ())
        # The kernels gather telemetry per rotational row: per neuron, the rows the monitor asks for.
        if fused and (not telemetry or group["per_neuron"]):
            self._rotate_fused(group, backend, params, grads, angle, rate, grad_scale, found_inf, telemetry)
        elif telemetry:
            before = [self._weight(p).clone() for p in params]  # a compensated one: its master weight
            self._update(group, backend, params, grads, grad_scale, found_inf, kernel_ready)
            for b, p, p0, g in zip(telemetry, params, before, grads):
                sums = tm.row_sums(p0, self._weight(p), g, b.shape[0], grad_scale)
                if found_inf is not None:  # a skipped step leaves the buffer as it was (no host read)
                    sums = torch.where(found_inf.to(b.device) != 0, b, sums)
                b.copy_(sums)
        else:  # the reference's rotation (it reads scalars on the host)
            # The rotational state first, as the fused kernels take it before they read found_inf on
            # the device: a step GradScaler skips leaves the same state (its keys included) either way.
            self._init_rotational_state(group, params)
            if step_skipped(found_inf):
                return
            angle = self._angle(group)
            rngs = self._rngs(group, params)
            corrections = self._corrections(group, params)
            scales = self._scales(group, params, self._rotational_state_keys(group))
            for i, (p, g) in enumerate(zip(params, grads)):
                state = self.state[p]
                # One Rounder for the direction's states and the parameter: the same (key, count);
                # 8-bit states are decoded and encoded through it with their block scales.
                store = Rounder(rngs[i] if rngs else None, p, corrections[i] if corrections else None,
                                {lane: s[i] for lane, s in scales.items()})
                rv.rotate_(p, self._direction(p, g, state, group, grad_scale, store), state, angle=angle,
                           lr=_float(group["lr"]), norm_decay=group["update_norm_decay_factor"],
                           eps=group["rotational_eps"], zero_mean=group["zero_mean"],
                           per_neuron=group["per_neuron"], mode=group["mode"], store=store)
            self._advance_rng(rngs, None)

    def _init_rotational_state(self, group, params) -> None:
        """The rotational state (rv.init_state) of each of ``params`` that has none yet."""
        for p in params:
            state = self.state[p]
            if "rotational_norm" not in state:
                rv.init_state(p, state, group["per_neuron"])

    def _rotate_fused(self, group, backend, params, grads, angle, rate, grad_scale, found_inf, telemetry) -> None:
        """All rotational tensors of a bucket in one call of the backend's fused rotational kernel;
        ``rate``: None, or the device's rate (``_rate_tensor``), read by the kernel instead of
        ``angle`` or lr (which are then not read on the host)."""
        self._init_rotational_state(group, params)
        states = [self.state[p] for p in params]
        name, state1, state2, steps, first_steps, hyper = self._fused_arguments(group, params, states)
        projected = group["mode"] == "projected"
        rngs = self._rngs(group, params)
        low_precision = {}  # passed only when used: a backend without them is called as before
        if rngs:
            low_precision["rng"] = rngs
        if group["master_weight_bits"] != 16:
            low_precision["correction"] = self._corrections(group, params)
        scales = self._scales(group, params, self._rotational_state_keys(group))
        if scales:
            low_precision["scales"] = scales
        backend.rotational(
            name, params, grads, state1, state2, steps, [s["rotational_norm"] for s in states],
            [s["update_norm_avg"] for s in states], [s["rotational_step"] for s in states], first_steps,
            # lr is read by the projected step only (the directions are lr-free)
            lr=_float(group["lr"]) if projected and rate is None else 0.0, angle=0.0 if rate is not None else angle,
            rate_tensor=rate, norm_decay=group["update_norm_decay_factor"],
            rotational_eps=group["rotational_eps"], zero_mean=group["zero_mean"],
            projected=projected, maximize=group["maximize"], grad_scale=grad_scale,
            found_inf=found_inf, telemetry=telemetry, **low_precision, **hyper)
        self._advance_rng(rngs, found_inf)
        if first_steps:  # RotationalSGD with momentum: its buffers have history now (see FirstStepFlags)
            self._flags.clear(first_steps, found_inf)


def _float(lr) -> float:
    """A float lr, or a tensor one read on the host (torch's behaviour without capturable)."""
    return lr.item() if isinstance(lr, torch.Tensor) else float(lr)


def _split_rows(p: torch.Tensor, per_neuron: bool) -> str | None:
    """The placement of a DTensor that cuts its neurons (rows, or the whole-tensor sphere) across
    more than one rank, else None. Row-wise sharding (dim 0, per neuron) keeps each row whole."""
    placements = getattr(p, "placements", None)
    mesh = getattr(p, "device_mesh", None)
    if placements is None or mesh is None:
        return None
    for mesh_dim, placement in enumerate(placements):
        dim = getattr(placement, "dim", None)
        if type(placement).__name__ == "_StridedShard" and mesh.size(mesh_dim) > 1:
            # FSDP2 over tensor parallelism: rows stay whole, but are interleaved across ranks, which
            # a per-row state placed Shard(0) would not describe.
            return (f"_StridedShard(dim={dim}) over {mesh.size(mesh_dim)} ranks (FSDP2 over tensor parallelism), "
                    "which interleaves its rows across ranks: its per-row state would have no placement that "
                    "state dicts and checkpoints could reshard")
        if placement.is_shard() and mesh.size(mesh_dim) > 1 and (not per_neuron or dim != 0):
            return (f"Shard(dim={dim}) over {mesh.size(mesh_dim)} ranks, which splits its "
                    f"{'rows' if per_neuron else 'sphere'} across ranks: the row norms would need a cross-rank "
                    "reduction every step")
    return None


def _wrap_row_state(optimizer, base_wrap, p, key, value, group):
    """A DTensor parameter's per-row state made on its local rows: 1-D, placed along rows as the
    parameter (Shard(0) or Replicate; one replicated row for per_neuron=False)."""
    if key in ("rotational_norm", "update_norm_avg"):
        per_neuron = group["per_neuron"]
        return _dtensor.from_local(p, value, _dtensor.row_placements(p, per_neuron),
                                   (p.shape[0] if per_neuron else 1,))
    return base_wrap(p, key, value, group)


_NO_HYPER = dict(beta1=0.0, beta2=0.0, eps=0.0, momentum=0.0, nesterov=False)


def _options(update_norm_decay_factor, per_neuron, zero_mean, rotational_eps, rotational, target_rotation, mode):
    return dict(update_norm_decay_factor=update_norm_decay_factor, per_neuron=per_neuron, zero_mean=zero_mean,
                rotational_eps=rotational_eps, rotational=rotational, target_rotation=target_rotation, mode=mode)


class RotationalAdamW(_Rotational, FusedAdamW):
    """AdamW's rotational variant: angle per step sqrt(2d·(1−β1)/(1+β1)), d the decay fraction.

    Takes FusedAdamW's arguments (amsgrad excluded) plus ``update_norm_decay_factor=0.9``,
    ``per_neuron=True``, ``zero_mean=True``, ``rotational_eps=1e-8``, ``rotational=None``,
    ``target_rotation=None`` (a float: that angle per step) and ``mode="equilibrium"`` or
    ``"projected"``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 update_norm_decay_factor=0.9, per_neuron=True, zero_mean=True, rotational_eps=1e-8,
                 rotational=None, target_rotation=None, mode="equilibrium", **kwargs):
        if amsgrad:
            raise ValueError("RotationalAdamW does not support amsgrad")
        self._init_rotational(_options(update_norm_decay_factor, per_neuron, zero_mean, rotational_eps, rotational,
                                       target_rotation, mode))
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)
        self._finish_init()

    @staticmethod
    def _rotation_factor(group):
        return theory.adamw_rotation_factor(group["betas"])

    def _check_variant_options(self, group):
        if group["amsgrad"]:
            raise ValueError("RotationalAdamW does not support amsgrad")

    @staticmethod
    def _rotational_state_keys(group):
        return ("exp_avg", "exp_avg_sq")  # the kernel's state lists: lanes 1 and 2

    def _fused_arguments(self, group, params, states):
        beta1, beta2 = group["betas"]
        return ("adamw", [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], [], {**_NO_HYPER, "beta1": beta1, "beta2": beta2, "eps": group["eps"]})

    def _direction(self, p, g, state, group, grad_scale, store=None):
        state["step"] += 1
        beta1, beta2 = group["betas"]
        return rv.adamw_direction(g, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                                  beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"],
                                  grad_scale=grad_scale, store=store)


class RotationalSGD(_Rotational, FusedSGD):
    """SGD's rotational variant (momentum μ, no dampening): angle per step sqrt(2d/(1+μ)).

    Takes FusedSGD's arguments plus the rotational options of RotationalAdamW."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 update_norm_decay_factor=0.9, per_neuron=True, zero_mean=True, rotational_eps=1e-8,
                 rotational=None, target_rotation=None, mode="equilibrium", **kwargs):
        if dampening != 0:
            raise ValueError("RotationalSGD does not support dampening (its momentum is b <- mu*b + g)")
        self._init_rotational(_options(update_norm_decay_factor, per_neuron, zero_mean, rotational_eps, rotational,
                                       target_rotation, mode))
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **kwargs)
        self._finish_init()

    @staticmethod
    def _rotation_factor(group):
        return theory.sgd_rotation_factor(group["momentum"])

    def _check_variant_options(self, group):
        if group["dampening"] != 0:
            raise ValueError("RotationalSGD does not support dampening (its momentum is b <- mu*b + g)")

    @staticmethod
    def _rotational_state_keys(group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _fused_arguments(self, group, params, states):
        if group["momentum"] == 0:
            return "sgd", [], [], [], [], dict(_NO_HYPER)
        first = self._flags.lookup([s["momentum_buffer"] for s in states])
        return ("sgd", [s["momentum_buffer"] for s in states], [], [], first,
                {**_NO_HYPER, "momentum": group["momentum"], "nesterov": group["nesterov"]})

    def _direction(self, p, g, state, group, grad_scale, store=None):
        buffer = state.get("momentum_buffer")
        return rv.sgd_direction(g, buffer, self._flags.take(buffer), momentum=group["momentum"], nesterov=group["nesterov"],
                                maximize=group["maximize"], grad_scale=grad_scale, store=store)


class RotationalLion(_Rotational, FusedLion):
    """Lion's rotational variant: angle per step sqrt(π/2)·sqrt(2d)·σ, σ² = (1−β1)² + β1²(1−β2)/(1+β2).

    Takes FusedLion's arguments plus the rotational options of RotationalAdamW. A NaN direction
    (FusedLion's NaN rule) makes its whole row NaN."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 update_norm_decay_factor=0.9, per_neuron=True, zero_mean=True, rotational_eps=1e-8,
                 rotational=None, target_rotation=None, mode="equilibrium", **kwargs):
        self._init_rotational(_options(update_norm_decay_factor, per_neuron, zero_mean, rotational_eps, rotational,
                                       target_rotation, mode))
        super().__init__(params, lr, betas, weight_decay, **kwargs)
        self._finish_init()

    @staticmethod
    def _rotation_factor(group):
        return theory.lion_rotation_factor(group["betas"])

    @staticmethod
    def _rotational_state_keys(group):
        return ("exp_avg",)

    def _fused_arguments(self, group, params, states):
        beta1, beta2 = group["betas"]
        return "lion", [s["exp_avg"] for s in states], [], [], [], {**_NO_HYPER, "beta1": beta1, "beta2": beta2}

    def _direction(self, p, g, state, group, grad_scale, store=None):
        beta1, beta2 = group["betas"]
        return rv.lion_direction(g, state["exp_avg"], beta1=beta1, beta2=beta2, maximize=group["maximize"],
                                 grad_scale=grad_scale, store=store)
