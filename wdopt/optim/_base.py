"""What every wdopt optimizer shares: torch.optim's surface, input checks, and the step driver.

A step runs in two phases so that a failed step changes nothing: first every group is checked
(gradients, backends, hyperparameters) without touching parameters or state; then state is
created lazily and each (device, dtype) bucket of each group is handed to its backend. The
optimizer subclasses hold only their hyperparameters, their state layout and one ``_update``.

That validation path costs microseconds per tensor. Once it has run, a step whose inputs are
what it validated takes the fast path instead (``_fast.py``), which checks the same things with
a few C-level passes and C++ and runs the same kernels.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends
from ..reference import quantization, rounding
from ..reference import telemetry as tm
from ..reference._common import step_skipped
from . import _dtensor
from ._fast import FastStep

DECAY_SCALINGS = ("lr", "schedule")


def check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_betas(betas) -> tuple[float, float]:
    """Betas as two floats in [0, 1). One-element tensors are read once, at construction."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair, got {betas!r}")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")  # torch.optim's words
    values = []
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            b = b.item()
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        values.append(float(b))
    return values[0], values[1]


def check_common(lr, weight_decay, decay_scaling, backend, differentiable, constructing: bool = True) -> None:
    """The checks every optimizer shares. ``constructing=False`` at step time, where a scheduler
    may have taken lr to 0 (a warm-up start): "schedule" needs a positive *initial* lr, checked by
    ``_check_step_group``, not a positive current one."""
    check_lr(lr)
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if decay_scaling not in DECAY_SCALINGS:
        raise ValueError(f"Invalid decay_scaling {decay_scaling!r}; choose 'lr' (torch) or 'schedule'")
    if constructing and decay_scaling == "schedule" and not _float(lr) > 0:
        raise ValueError("decay_scaling='schedule' needs a positive initial learning rate")
    if backend not in backends.BACKEND_CHOICES:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {backends.BACKEND_CHOICES}")
    if differentiable:
        raise ValueError("wdopt optimizers do not support differentiable=True; use torch.optim for that")


def check_rounding(group: dict[str, Any], cls_name: str, supported: bool = True,
                   state_bits_supported: bool = True) -> None:
    """``stochastic_rounding`` must be a bool, ``rounding_seed`` an integer in [0, 2^64) and
    ``master_weight_bits`` 16, 24 or 32, above 16 only for bf16 parameters."""
    bits = group.get("master_weight_bits", 16)
    if isinstance(bits, bool) or bits not in (16, 24, 32):
        raise ValueError(f"master_weight_bits must be 16 (plain parameters), 24 or 32 (compensated bf16), got {bits!r}")
    if bits != 16:
        if not supported:
            raise ValueError(f"{cls_name} does not support master_weight_bits yet; FusedAdamW, FusedSGD and "
                             "FusedLion do")
        for i, p in enumerate(group.get("params", [])):
            if p.dtype != torch.bfloat16:
                raise ValueError(f"master_weight_bits={bits} compensates bfloat16 parameters, but parameter {i} of "
                                 f"the group is {p.dtype}: put the other parameters in a group of their own")
    state_bits = group.get("state_bits")
    if state_bits not in (None, 8) or isinstance(state_bits, bool):
        raise ValueError(f"state_bits must be None (states in the parameter's dtype) or 8, got {state_bits!r}")
    if state_bits == 8:
        if not (supported and state_bits_supported):
            raise ValueError(f"{cls_name} does not support state_bits yet; FusedAdamW, FusedSGD and FusedLion do")
        for i, p in enumerate(group.get("params", [])):
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"state_bits=8 quantizes the states of float32, bfloat16 and float16 parameters; "
                                 f"parameter {i} of the group is {p.dtype}")
    on = group.get("stochastic_rounding", False)
    seed = group.get("rounding_seed", 0)
    if not isinstance(on, bool):
        raise ValueError(f"stochastic_rounding must be True or False, got {on!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"rounding_seed must be an integer in [0, 2**64), got {seed!r}")
    if on and not supported:
        raise ValueError(f"{cls_name} does not support stochastic_rounding yet; FusedAdamW, FusedSGD and "
                         "FusedLion do")


def _kernel_statistics(backend, device: torch.device) -> bool:
    """Whether ``backend``'s kernels on ``device`` gather the direction statistics in their
    update pass (telemetry buffers of 8 columns; ``STATISTICS``: the device types that do)."""
    return device.type in getattr(backend, "STATISTICS", ())


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one block of memory in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class KernelTensors:
    """One bucket's tensors as kernels see them: real (complex viewed as pairs), with the parameter's
    dense layout shared by gradient and state, so that element i of each is the same element.

    A dense non-contiguous parameter (channels_last) is used as is. A parameter with gaps, or state
    whose layout differs, is copied into a dense work tensor and written back by ``write_back``.
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: dict[str, list],
                 kernel_ready: bool = False):
        """``kernel_ready``: the caller checked that every tensor is real, contiguous and not a lazy
        negation, so they are used as they are (the common case, with no per-tensor work)."""
        self._write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.params, self.grads, self.states = params, grads, states
        if not kernel_ready:
            self._adapt(params, grads, states)

    def _adapt(self, params, grads, states) -> None:
        self.params, self.grads = [], []
        self.states = {key: [] for key in states}
        for i, p in enumerate(params):
            p = _real(p)
            if not _is_dense(p):
                work = p.contiguous()
                self._write_back.append((p, work))
                p = work
            self.params.append(p)
            self.grads.append(self._like(grads[i], p, writes=False))
            for key, values in states.items():
                t = values[i]
                self.states[key].append(self._like(t, p, writes=True) if t is not None else None)

    def _like(self, t: torch.Tensor, p: torch.Tensor, writes: bool) -> torch.Tensor:
        if not writes:
            t = t.resolve_conj().resolve_neg()  # lazily conjugated/negated gradients: materialize
        t = _real(t)
        if t.stride() == p.stride():
            return t
        work = torch.empty_like(p, dtype=t.dtype)  # p is dense: empty_like keeps its strides
        work.copy_(t)
        if writes:
            self._write_back.append((t, work))
        return work

    def write_back(self) -> None:
        for original, work in self._write_back:
            original.copy_(work)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class FusedOptimizer(Optimizer):
    """Base class: torch.optim.Optimizer plus wdopt's checked, bucketed, backend-dispatched step."""

    #: GradScaler then hands over ``grad_scale``/``found_inf`` and kernels unscale in place.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        self._fresh_caches()
        super().__init__(params, defaults)

    def _fresh_caches(self) -> None:
        """The step driver's caches, made here rather than on first use: torch.compile (dynamo, torch
        2.11 on the H200, 2026-11-28) refuses a ``__dict__`` write inside a traced step."""
        self.__dict__["_checked"] = {}
        self.__dict__["_group_checks"] = {}
        self.__dict__.setdefault("_monitors", [])
        self.__dict__.setdefault("_rng_increments", {})

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            for p in group["params"]:
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(f"{type(self).__name__} needs floating-point or complex parameters, got {p.dtype}")
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError(f"{type(self).__name__}: a parameter appears twice in one group; "
                                 "fused kernels update each parameter once per step")
            for device in {p.device for p in group["params"]}:
                if device.type != "meta":  # meta tensors hold no values: no kernel runs on them
                    backends.resolve(group["backend"], device)
        except Exception:
            self.param_groups.pop()
            raise
        group.setdefault("decay_initial_lr", _float(group["lr"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # ``backend`` says where this process runs, not how the checkpoint was made: a state dict
        # saved on a GPU machine ("triton") must load on a CPU one. Keep this optimizer's choice.
        chosen = [group["backend"] for group in self.param_groups]
        # torch casts every state tensor of a floating-point parameter to its dtype: stochastic
        # rounding's int64 [key, count, index base], a compensated parameter's int16/int8 correction
        # and 8-bit states' codes would become floats, their float32 block scales bf16. Keep every
        # integer tensor and the scales as saved. Of a state dict
        # that went through torch.optim, 8-bit codes (small integers, exact as floats) are taken
        # back; an rng or a correction is dropped and made anew (a correction as zero: the master
        # weight is then the bf16 parameter).
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        state_dict = self._upgrade_legacy_codes(state_dict, params)
        integer_state = {}
        for i, p in params.items():
            saved = state_dict.get("state", {}).get(i, {})
            for key, value in saved.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if not value.is_floating_point() and not value.is_complex():
                    integer_state[(p, key)] = value
                elif key.endswith(_SCALE) and key[:-len(_SCALE)] in self._quantized_states:
                    # float32 block scales of a bf16 parameter: not rounded to bf16 (scales that went
                    # through torch.optim already were: taken back as float32, the rounding kept)
                    integer_state[(p, key)] = value.to(torch.float32)
                elif key in _INTEGER_STATE:
                    integer_state[(p, key)] = None
                elif key in self._quantized_states and key + _SCALE in saved and value.shape == p.shape:
                    integer_state[(p, key)] = value.round().to(self._quantized_states[key])
        self._check_saved_values(integer_state)
        super().load_state_dict(state_dict)
        self.__dict__.pop("_stream_seeds", None)  # the loaded streams are the saved groups' seeds'
        for group, backend in zip(self.param_groups, chosen):
            group["backend"] = backend
        for (p, key), value in integer_state.items():
            if value is None:
                self.state[p].pop(key, None)
            else:
                self.state[p][key] = value.to(device=p.device, copy=True)

    def _check_saved_values(self, integer_state: dict) -> None:
        """Values no step writes, refused before anything loads (a corrupted or hand-edited state
        dict; metadata is checked at the next step): a block scale that is negative, infinite or
        below 2^-126 (a scale is a block's largest magnitude, 0, or NaN for a poisoned block:
        quantization.py), an int8 code -128 (codes reach ±127), an rng count or index base below 0.
        One read of each such tensor, at load only."""
        for (p, key), value in integer_state.items():
            if not isinstance(value, torch.Tensor) or value.numel() == 0:
                continue
            v = _dtensor.local(value)
            where = f"state {key!r} of the parameter of shape {tuple(p.shape)}"
            if key.endswith(_SCALE) and v.dtype == torch.float32:
                bad = ~(torch.isnan(v) | (v == 0) | ((v >= 2.0**-126) & (v <= torch.finfo(torch.float32).max)))
                if bool(bad.any()):
                    block = int(bad.nonzero()[0, 0])
                    raise RuntimeError(f"{where}: block {block}'s scale is {v[block].item()!r}; block scales are 0, NaN "
                                       f"or in [2^-126, 3.4e38] (a corrupted or edited state dict?)")
            elif key in self._quantized_states and v.dtype == torch.int8 and bool((v == -128).any()):
                raise RuntimeError(f"{where} holds the int8 code -128; codes reach ±127 (a corrupted or edited state "
                                   f"dict?)")
            elif key == "rng" and v.dtype == torch.int64 and v.dim() == 1 and v.numel() in (2, 3) \
                    and bool((v[1:] < 0).any()):
                raise RuntimeError(f"{where} is {v.tolist()}: its count and index base are never negative (a "
                                   f"corrupted or edited state dict?)")

    def _upgrade_legacy_codes(self, state_dict: dict[str, Any], params: dict) -> dict[str, Any]:
        """A state dict whose 8-bit states have wdopt's first code (block scales in ``key +
        "_scale"``, quantization.decode_legacy) with those states re-encoded in this code, to
        nearest, scales in ``key + "_block_scale"`` (a copy; the caller's dict is not changed):
        they then load as any 8-bit state does, never held as floats of the parameter's dtype
        (an fp16 parameter's would overflow or flush exp_avg_sq). ``params``: saved id ->
        parameter. A key with both scales keeps the new one."""
        legacy = quantization.LEGACY_SCALE_SUFFIX
        states = state_dict.get("state", {})
        if not any(key in self._quantized_states and key + legacy in saved
                   for saved in states.values() for key in saved):
            return state_dict
        upgraded = {}
        for index, saved in states.items():
            saved = dict(saved)
            p = params.get(index)
            for key, code_dtype in self._quantized_states.items():
                codes, scales = saved.get(key), saved.pop(key + legacy, None)
                if key + _SCALE in saved or not isinstance(scales, torch.Tensor):
                    continue
                where = f"state {key!r} of saved parameter {index}"
                if p is None or not isinstance(codes, torch.Tensor) or codes.shape != p.shape:
                    raise RuntimeError(f"{where} has first-code block scales ({key + legacy!r}) but no codes "
                                       f"shaped like its parameter")
                local, lp = _dtensor.local(codes), _dtensor.local(p).detach()
                # torch.optim casts codes to its parameter's dtype: small integers, exact as floats
                local = local.round().to(code_dtype) if local.is_floating_point() else local
                local_scales = _dtensor.local(scales)
                if local.dtype != code_dtype or local_scales.numel() != quantization.blocks(local.numel()):
                    raise RuntimeError(
                        f"{where} is {local.dtype} codes with {local_scales.numel()} block scales; "
                        f"{type(self).__name__} codes it as {code_dtype} with {quantization.blocks(local.numel())} "
                        f"(an edited or foreign state dict?)")
                decoded = quantization.decode_legacy(local, local_scales).to(lp.device)
                new_codes, new_scales = quantization.encode(decoded, code_dtype, lp)
                saved[key], saved[key + _SCALE] = _dtensor.like(p, new_codes), _dtensor.wrap_scales(p, new_scales)
            upgraded[index] = saved
        return {**state_dict, "state": upgraded}

    def __getstate__(self) -> dict[str, Any]:
        # A deepcopy or a pickle carries, per group, the seed its streams were made from
        # (_reseed_if_edited): an edit not yet stepped then takes effect in the copy too.
        state = super().__getstate__()
        seeds = self.__dict__.get("_stream_seeds", {})
        made = [seeds.get(id(group)) for group in self.param_groups]
        state[_MADE_SEEDS] = [m[1] if m is not None and m[0] is group else None
                              for m, group in zip(made, self.param_groups)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict comes here too, without the seeds: its groups are new to the record, and
        # their streams' keys are read at the next step.
        made = state.pop(_MADE_SEEDS, None)
        super().__setstate__(state)
        self.__dict__.pop("_stream_seeds", None)
        if made is not None:
            self._stream_seeds = {id(group): (group, seed) for group, seed in zip(self.param_groups, made)
                                  if seed is not None}
        # Loaded state is checked again at the next step (required keys, layout, overlaps).
        self._fresh_caches()
        self.__dict__.pop("_fast", None)
        # Groups saved by torch.optim or older wdopt versions lack wdopt's options.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("decay_initial_lr", _float(group["lr"]))
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    p_state["step"] = _step_tensor(p_state["step"], p.device)

    def _check_group(self, group: dict[str, Any], constructing: bool = True) -> None:
        """Raise ValueError for invalid hyperparameters of one group (``constructing=False``: the
        same checks at step time, after the group was edited; see ``check_common``)."""
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Create any missing state of ``p`` (lazily, at its first step), with torch's names."""
        raise NotImplementedError

    def _update(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready) -> None:
        """Run one step of ``backend`` on a bucket of one device and dtype (``kernel_ready``: see _plan)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        fast = self.__dict__.get("_fast")
        try:
            for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
                if value is not None and not isinstance(value, torch.Tensor):
                    raise TypeError(f"{type(self).__name__}.{name} must be a tensor, as torch.amp.GradScaler "
                                    f"sets it (a float32 scalar tensor), got {type(value).__name__}")
            if fast is not None:
                # A TorchDispatchMode (a FLOP counter, a tracer) would not see the fast path's CPU
                # kernels, called from C++ below the dispatcher: the validation path's operators it sees.
                if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or \
                        (fast.launches_from_python and self._monitor_due_next()) or \
                        (not fast.kernel_statistics and self._monitor_due_next(statistics=True)):
                    pass  # a step the validation path must run; the fast one is kept for the next
                elif self._capture_health_check() and self._fast_usable(fast):
                    # Monitors count the step (refusing graph capture); those that record it get
                    # their buffers filled by the kernels, as on the validation path.
                    due = [monitor for monitor in self._monitors if monitor._due()]
                    flats = request = None
                    if due:
                        flats, request = fast.telemetry_request(self._telemetry_columns(due))
                    statistics = self._direction_statistics(due)
                    fast.run(self, grad_scale, found_inf, flats)
                    for monitor in due:
                        monitor._record(self, request, found_inf, statistics)
                    return loss
                else:
                    del self.__dict__["_fast"]  # something changed: validated again below, then rebuilt
            plan = self._plan()
        except Exception:
            # GradScaler only removes these after a successful step; stale ones would rescale the next.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

        # Phase 2: create all missing state, then update bucket by bucket.
        for group, _, params, _ in plan:
            for p in params:
                self._init_state(p, group)
            self._init_rng(group, params)
            self._init_correction(group, params)
            self._convert_states(group, params)
        # Rotation telemetry (wdopt.RotationMonitor): {id(param): (K, 4) buffer} for this step,
        # (K, 8) with the direction statistics (RotationMonitor(statistics=True)).
        due = [monitor for monitor in self._monitors if monitor._due()]
        monitored = None
        if due:
            from ..telemetry import telemetry_request

            monitored = telemetry_request([p for _, backend, params, _ in plan if backend is not None for p in params],
                                          self._telemetry_columns(due))
        statistics = self._direction_statistics(due)
        for group, backend, params, kernel_ready in plan:
            if backend is None:
                continue  # meta tensors: state was made above (as meta tensors, as torch's); no values to compute
            device = params[0].device
            if backend is SPARSE:
                self._update_sparse_measured(group, params, _on(grad_scale, device), _on(found_inf, device), monitored)
                continue
            args = (group, backend, params, [p.grad for p in params], _on(grad_scale, device),
                    _on(found_inf, device), kernel_ready)
            if any(map(_dtensor.is_dtensor, params)):
                # DTensors (with any plain parameters of their bucket): the same kernels on the
                # local shards, with the optimizer's state seen as local tensors (_dtensor.py).
                buffers = [monitored.get(id(p)) for p in params] if monitored else []
                with _dtensor.LocalStates(self, params, lambda p, k, v, g=group: self._wrap_state(p, k, v, g)) \
                        as local_params:
                    local_args = (group, backend, local_params, [_dtensor.local(g) for g in args[3]], *args[4:])
                    if buffers and all(b is not None for b in buffers):
                        self._update_measured_local(local_args, buffers)
                    else:
                        self._update(*local_args)
                continue
            buffers = [monitored.get(id(p)) for p in params] if monitored else []
            if not buffers or any(b is None for b in buffers):
                self._update(*args)
            elif self._kernel_telemetry(backend, kernel_ready) and \
                    (buffers[0].shape[1] == tm.COLUMNS or _kernel_statistics(backend, device)):
                self._update(*args, telemetry=buffers)  # gathered by the kernels in their update pass
            else:
                self._update_measured(args, buffers)
        for monitor in due:
            monitor._record(self, monitored, found_inf, statistics)
        # A fast step for the next steps, unless one is kept (this step was compiled, under a
        # dispatch mode or a recorded Triton step: it still is checked in full before it is used).
        if self._fast_kind is not None and "_fast" not in self.__dict__ and not torch.compiler.is_compiling():
            fast = FastStep.build(self, plan)  # None: this step's buckets need the validation path
            if fast is not None:
                self.__dict__["_fast"] = fast
        return loss

    # ------------------------------------------------------------------ stochastic rounding

    #: Whether this class's kernels round bf16/fp16 stores stochastically (``stochastic_rounding``)
    #: and compensate bf16 parameters (``master_weight_bits``); whether they take 8-bit states.
    _stochastic_rounding_supported = True
    _state_bits_supported = True

    def _init_rng(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """State ``rng`` = int64 [key, count, index base] of each bf16/fp16 parameter of a group with
        stochastic rounding (wdopt/reference/rounding.py): the key from the group's ``rounding_seed``
        and the parameter's position in the optimizer (as in its state dict), the count 0, the index
        base 0 (a DTensor shard: the global index of its first element, _dtensor.py)."""
        if not group["stochastic_rounding"]:
            return
        self._reseed_if_edited(group)
        missing = []
        for p in params:
            state = self.state[p]
            rng = state.get("rng")
            if rng is None:
                if self._wants_rng(group, p.dtype):
                    missing.append(p)
            elif _dtensor.is_dtensor(p):  # a shard's, maybe loaded from another rank: this rank's base
                _dtensor.set_index_base(p, state)
            elif rng.numel() == 2:  # saved as [key, count] (wdopt < 0.2): a whole tensor's base, 0
                state["rng"] = torch.cat([rng, rng.new_zeros(1)])
        if not missing:
            return
        position = self._positions()
        for p in missing:
            key = rounding.parameter_key(group["rounding_seed"], position[id(p)])
            self.state[p]["rng"] = torch.tensor([key, 0, 0], dtype=torch.int64, device=p.device)
            if _dtensor.is_dtensor(p):
                _dtensor.set_index_base(p, self.state[p])

    def _positions(self) -> dict[int, int]:
        """id(parameter) -> its position in the optimizer (as in its state dict): with the group's
        ``rounding_seed``, what a parameter's stream key is drawn from."""
        return {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}

    def _reseed_if_edited(self, group: dict[str, Any]) -> None:
        """A group whose ``rounding_seed`` was edited since its streams were made draws the new
        seed's streams from here on: each stream of the group gets the key of the new seed and
        count 0 (its index base kept), as if the optimizer had been made with it.

        The seed each group's streams were made from is kept here, by group, on the host, so a step
        reads nothing from the device. A group this record does not know (the first step of this
        optimizer object: after ``load_state_dict``, a deepcopy or unpickling as after construction)
        has its existing streams' keys read once and compared with the seed's: a seed edited after
        loading or copying, before the next step, takes effect as it would have without them."""
        seeds = self.__dict__.setdefault("_stream_seeds", {})
        seed = group["rounding_seed"]
        made = seeds.get(id(group))
        seeds[id(group)] = (group, seed)
        known = made is not None and made[0] is group
        if known and made[1] == seed:
            return
        position = self._positions()
        streams = [(p, rng) for p in group["params"]
                   if isinstance(rng := self.state.get(p, {}).get("rng"), torch.Tensor) and rng.numel() == 3]
        if not known:  # which streams another seed made (one host read per stream, once)
            if any(rng.is_cuda for _, rng in streams) and torch.cuda.is_current_stream_capturing():
                return  # no host read while a graph is captured: the streams go on as they are
            streams = [(p, rng) for p, rng in streams
                       if int(rng[0]) != rounding.parameter_key(seed, position[id(p)])]
        for p, rng in streams:
            fresh = torch.tensor([rounding.parameter_key(seed, position[id(p)]), 0], dtype=torch.int64)
            rng[:2].copy_(fresh.to(rng.device, non_blocking=True))

    def _init_correction(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """State ``correction`` of each parameter of a group with ``master_weight_bits`` 24 or 32:
        the low bits of its master weight (wdopt/reference/rounding.py), zero at first (the master
        weight is the bf16 parameter). A group set back to 16 bits drops them."""
        bits = group["master_weight_bits"]
        for p in params:
            state = self.state[p]
            old = state.get("correction")
            if bits == 16:
                state.pop("correction", None)
            elif old is None:
                state["correction"] = torch.zeros_like(p, dtype=rounding.CORRECTION_DTYPES[bits],
                                                       memory_format=torch.preserve_format)
            elif old.dtype != rounding.CORRECTION_DTYPES[bits]:  # the group's precision was changed
                with torch.no_grad():
                    lp = _dtensor.local(p)
                    bf16, low = rounding.split(rounding.combine(lp.detach(), _dtensor.local(old)),
                                               rounding.CORRECTION_DTYPES[bits])
                    lp.copy_(bf16)
                state["correction"] = _dtensor.like(p, low)

    def _corrections(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The bucket's ``correction`` tensors for its kernels, or [] (plain parameters)."""
        if group["master_weight_bits"] == 16 or not params:
            return []
        return [self.state[p]["correction"] for p in params]

    def master_weight(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s master weight as a new float32 tensor: the bf16 parameter and its correction
        (``master_weight_bits`` 24 or 32), or ``p`` itself in float32. To hand a compensated
        model to torch.optim or evaluate it in fp32."""
        correction = self.state.get(p, {}).get("correction")
        if correction is None:
            return p.detach().float().clone()
        return _dtensor.like(p, rounding.combine(_dtensor.local(p).detach(), _dtensor.local(correction)))

    @torch.no_grad()
    def set_master_weight(self, p: torch.Tensor, weight: torch.Tensor) -> None:
        """Set ``p`` from a float32 master weight (an fp32 checkpoint): the bf16 parameter and its
        correction, which keeps 32 bits of it (24 with ``master_weight_bits=24``, rounded to nearest)."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("set_master_weight: the tensor is not a parameter of this optimizer")
        if weight.shape != p.shape:
            raise ValueError(f"set_master_weight: weight of shape {tuple(weight.shape)} for a parameter of shape "
                             f"{tuple(p.shape)}")
        self._init_correction(group, [p])
        correction = self.state[p].get("correction")
        if correction is None:
            p.copy_(weight)
            return
        if _dtensor.is_dtensor(p) and not (_dtensor.is_dtensor(weight) and weight.device_mesh == p.device_mesh
                                           and tuple(weight.placements) == tuple(p.placements)):
            raise ValueError(f"set_master_weight: a DTensor parameter takes a DTensor weight placed as it "
                             f"({tuple(p.placements)}), got {_dtensor.describe(weight)}")
        weight = _dtensor.local(weight).detach().to(device=p.device, dtype=torch.float32).contiguous()
        bf16, low = rounding.split(weight, correction.dtype)
        _dtensor.local(p).copy_(bf16)
        _dtensor.local(correction).copy_(low)

    def _weight(self, p: torch.Tensor) -> torch.Tensor:
        """What telemetry measures of ``p``: its master weight when compensated, else ``p``."""
        correction = self.state.get(p, {}).get("correction")
        if correction is None:
            return p.detach()
        return _dtensor.like(p, rounding.combine(_dtensor.local(p).detach(), _dtensor.local(correction)))

    def _rngs(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The bucket's ``rng`` tensors for its kernels, or [] (rounding to nearest)."""
        if not (params and self._wants_rng(group, params[0].dtype)):
            return []
        return [self.state[p]["rng"] for p in params]

    @staticmethod
    def _wants_rng(group: dict[str, Any], dtype: torch.dtype) -> bool:
        """Stochastic rounding has something to round: bf16/fp16 stores, or 8-bit states' codes."""
        return group["stochastic_rounding"] and (_rounded(dtype) or group["state_bits"] == 8)

    #: {state key: its 8-bit code dtype} of the states ``state_bits=8`` quantizes (subclasses),
    #: int8 for signed states, uint8 for second moments (wdopt/reference/quantization.py).
    _quantized_states: dict = {}

    def _zeros_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        """A new state tensor ``key`` of ``p``: zeros in p's dtype, or (``state_bits=8``) zero codes,
        with their block scales in state ``key + "_block_scale"``."""
        if group["state_bits"] == 8 and key in self._quantized_states:
            if _dtensor.is_dtensor(p):  # this rank's blocks, placed along the global tensor's
                scales = torch.zeros(quantization.blocks(_dtensor.local(p).numel()), dtype=torch.float32,
                                     device=p.device)
                self.state[p][key + _SCALE] = _dtensor.wrap_scales(p, scales)
            else:
                self.state[p][key + _SCALE] = torch.zeros(quantization.blocks(p.numel()), dtype=torch.float32,
                                                            device=p.device)
            return torch.zeros_like(p, dtype=self._quantized_states[key], memory_format=torch.preserve_format)
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _convert_states(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """States in the form the group asks for: float states (loaded from torch.optim's layout,
        or state_bits switched on) encoded to 8 bits, to nearest; 8-bit ones decoded back to the
        parameter's dtype when state_bits is switched off."""
        quantize = group["state_bits"] == 8
        for p in params:
            state = self.state[p]
            for key, code_dtype in self._quantized_states.items():
                t = state.get(key)
                if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                    continue
                if not (t.is_floating_point() if quantize else t.dtype in quantization.CODE_DTYPES):
                    continue  # already as asked, as on most steps: nothing made (every DTensor step runs this)
                # A DTensor's shard is encoded and decoded on its own: its blocks are the global
                # tensor's (checked by _dtensor.check_low_precision).
                lp, lt = _dtensor.local(p).detach(), _dtensor.local(t).detach()
                if quantize:
                    codes, scales = quantization.encode(lt.float(), code_dtype, lp)
                    state[key], state[key + _SCALE] = _dtensor.like(p, codes), _dtensor.wrap_scales(p, scales)
                else:
                    decoded = quantization.decode(lt, _dtensor.local(state.pop(key + _SCALE)))
                    kept = torch.empty_like(lp, memory_format=torch.preserve_format).copy_(decoded)
                    state[key] = _dtensor.like(p, kept)

    def _scales(self, group: dict[str, Any], params: list[torch.Tensor], keys) -> dict:
        """{lane: the bucket's block scales} of its 8-bit states (lanes count the kernel's state
        lists from 1), or {}."""
        if group["state_bits"] != 8 or not params:
            return {}
        return {lane: [self.state[p][key + _SCALE] for p in params]
                for lane, key in enumerate(keys, 1) if key in self._quantized_states}

    def to_torch_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` in torch.optim's layout, for torch.optim (or a wdopt optimizer without
        these options) to load: 8-bit states decoded to float32, and the stochastic-rounding
        streams, compensated parameters' corrections and block scales left out (a compensated
        parameter's master weight is then its bf16 value: see ``master_weight``)."""
        out = self.state_dict()
        out["state"] = {index: dict(state) for index, state in out["state"].items()}  # not the live dicts
        for index, state in out["state"].items():
            for key in list(state):
                value = state[key]
                if isinstance(value, torch.Tensor) and value.dtype in quantization.CODE_DTYPES and \
                        key + _SCALE in state:
                    decoded = quantization.decode(_dtensor.local(value), _dtensor.local(state[key + _SCALE]))
                    state[key] = _dtensor.like(value, decoded)
            for key in [k for k in state if k.endswith(_SCALE) or k in _INTEGER_STATE]:
                del state[key]
        # The groups without the options, or loading it would bring them back (torch restores the
        # saved groups' options).
        out["param_groups"] = [{**group, "stochastic_rounding": False, "master_weight_bits": 16, "state_bits": None}
                               if "state_bits" in group else group for group in out["param_groups"]]
        return out

    def _advance_rng(self, rngs: list[torch.Tensor], found_inf: torch.Tensor | None) -> None:
        """count += 1 after the kernels drew this step's bits, on the device (a CUDA graph's replay
        advances it too); not when GradScaler skipped the step (nothing was written)."""
        if not rngs:
            return
        device = rngs[0].device
        increments = self._rng_increments
        one = increments.get(device)
        if one is None:
            one = increments[device] = torch.tensor([0, 1, 0], dtype=torch.int64, device=device)
        if found_inf is not None:
            one = one * (found_inf == 0)
        torch._foreach_add_(rngs, [one] * len(rngs))

    def _run_bucket(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry=()) -> list:
        """One bucket through its backend: state lists, dense work tensors, the launch, stochastic
        rounding's counts. Returns the bucket's first-step flags (FusedSGD clears them)."""
        lists, steps, first_steps = self._state_lists(group, params, [self.state[p] for p in params])
        tensors = KernelTensors(params, grads, lists, kernel_ready)
        rngs = self._rngs(group, params)
        corrections = self._corrections(group, params)
        scales = self._scales(group, params, lists)
        extra = {}
        if telemetry:
            extra["telemetry"] = telemetry
        if rngs:
            extra["rng"] = rngs
        if corrections:
            extra["correction"] = corrections
        if scales:
            extra["scales"] = scales
        self._launch(backend, group, tensors.params, tensors.grads, tensors.states, steps, first_steps,
                     self._lr(group, params[0].device), self._decay_lr_scale(group), grad_scale, found_inf, **extra)
        tensors.write_back()
        self._advance_rng(rngs, found_inf)
        return first_steps

    def _fast_usable(self, fast) -> bool:
        """``fast.usable``; a check stopped halfway (an interrupt, an error) drops the fast step:
        the plan may have taken the new gradient addresses that a Triton table has not (_fast.py)."""
        try:
            return fast.usable(self)
        except BaseException:
            self.__dict__.pop("_fast", None)
            raise

    #: The kind of direction statistics (wdopt/reference/telemetry.py) this optimizer's update has.
    _statistics_kind: str | None = None
    #: Whether the statistics are gathered with the four sums (columns 4-7 of the telemetry
    #: buffers; by the kernels in their update pass where they can) rather than read before the
    #: step by ``_direction_statistics`` (the rotational optimizers).
    _statistics_in_buffers = True

    def _telemetry_columns(self, due: list) -> int:
        """Columns of this step's telemetry buffers: the four sums, and the direction statistics
        when a monitor in ``due`` asked for them and the buffers carry them."""
        wanted = self._statistics_kind is not None and self._statistics_in_buffers and \
            any(monitor.statistics for monitor in due)
        return tm.COLUMNS + tm.STATISTICS if wanted else tm.COLUMNS

    def _direction_statistics(self, due: list) -> dict | None:
        """{id(param): (K, 4) float64} direction statistics for the monitors in ``due`` that asked
        for them (``RotationMonitor(statistics=True)``), for optimizers whose telemetry buffers do
        not carry them (``_statistics_in_buffers``): read from the gradients and the state *before*
        the step, an extra read of both on recorded steps. Not measured: rotated and sharded
        (DTensor) parameters, and parameters without a gradient."""
        if self._statistics_kind is None or self._statistics_in_buffers or \
                not any(monitor.statistics for monitor in due):
            return None
        grad_scale = getattr(self, "grad_scale", None)
        rotational = getattr(self, "_is_rotational", None)
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None or p.numel() == 0 or _dtensor.is_dtensor(p) or (rotational is not None and rotational(p, group)):
                    continue
                out[id(p)] = self._statistics_before(group, p, g, tm.telemetry_rows(p), _on(grad_scale, p.device))
        return out

    def _monitor_due_next(self, statistics: bool = False) -> bool:
        """Whether a RotationMonitor records the coming step (its kernels then gather telemetry,
        which the validation path arranges); ``statistics``: one that wants direction statistics."""
        return any((monitor.steps + 1) % monitor.every == 0 and (monitor.statistics or not statistics)
                   for monitor in self._monitors)

    def _capture_health_check(self) -> bool:
        """torch's check that a step being captured in a CUDA graph is capturable (raises if not)."""
        if any(group["capturable"] is False for group in self.param_groups):
            check = getattr(self, "_accelerator_graph_capture_health_check", None) or \
                getattr(self, "_cuda_graph_capture_health_check", None)
            if check is not None:
                check()  # raises during CUDA-graph capture: capture needs capturable=True
        return True

    # ------------------------------------------------------------------ the fast path (_fast.py)

    #: The C++ operator a validated step of this class re-runs through a GroupPlan ("adamw",
    #: "sgd", "lion"); None: every step takes the validation path.
    _fast_kind: str | None = None

    def _fast_constants(self, group: dict[str, Any]) -> tuple[list[float], list[int]]:
        """The group's hyperparameters a GroupPlan passes to the operator (csrc/step_plan.cpp)."""
        raise NotImplementedError

    def _state_lists(self, group, params, states) -> tuple[dict[str, list], list, list]:
        """A bucket's state tensors as the kernels take them: per state key (in the operator's
        order) one list, the step tensors ([] if none), and one first-step flag or None per
        parameter. ``states``: the parameters' state dicts."""
        raise NotImplementedError

    def _launch(self, backend, group, params, grads, lists, steps, first_steps, lr, decay_lr_scale, grad_scale,
                found_inf, **extra):
        """The backend call of one bucket (``extra``: telemetry, or the Triton fast path's table)."""
        raise NotImplementedError

    def _fast_finish(self, flags: list, found_inf) -> None:
        """After a fast step: what the class does after its kernel (FusedSGD clears its flags)."""

    @property
    def _monitors(self) -> list:
        """The RotationMonitors watching this optimizer (not saved with it)."""
        if "_monitors" not in self.__dict__:
            self.__dict__["_monitors"] = []
        return self.__dict__["_monitors"]

    @staticmethod
    def _kernel_telemetry(backend, kernel_ready: bool) -> bool:
        """Whether ``backend``'s kernels can fill telemetry buffers for this bucket: they address
        rows of contiguous tensors."""
        return kernel_ready and getattr(backend, "TELEMETRY", False)

    def _update_sparse(self, group, params, grad_scale, found_inf) -> None:
        """Parameters with sparse gradients, for optimizers that take them (``_sparse_grads``)."""
        raise NotImplementedError

    def _snapshot_statistics(self, group, p, g, buffer, grad_scale) -> torch.Tensor | None:
        """The direction statistics of ``p`` for a buffer with their columns (the snapshot paths;
        the kernels gather them in their pass), else None."""
        return self._statistics_before(group, p, g, buffer.shape[0], grad_scale) if buffer.shape[1] > tm.COLUMNS \
            else None

    def _statistics_before(self, group, p, g, rows: int, grad_scale) -> torch.Tensor:
        """The (rows, 4) direction statistics of ``p`` from its gradient and its state before the
        update: a sparse gradient made dense, a complex tensor as its real pairs (as its sums)."""
        if g.is_sparse:
            g = g.to_dense()
        # torch's sparse SGD keeps a sparse momentum buffer: made dense too.
        state = {k: v.to_dense() if isinstance(v, torch.Tensor) and v.is_sparse else v for k, v in self.state[p].items()}
        for key in self._quantized_states:  # 8-bit states: their values
            if isinstance(state.get(key), torch.Tensor) and state[key].dtype in quantization.CODE_DTYPES:
                state[key] = quantization.decode(state[key], state[key + _SCALE])
        p = self._weight(p)  # a compensated parameter's master weight
        if p.is_complex():
            p, g = torch.view_as_real(p), torch.view_as_real(g)
            state = {k: torch.view_as_real(v) if isinstance(v, torch.Tensor) and v.is_complex() else v
                     for k, v in state.items()}
        return tm.direction_sums(p, *tm.direction(self._statistics_kind, group, g, state, grad_scale), rows)

    def _update_sparse_measured(self, group, params, grad_scale, found_inf, monitored) -> None:
        buffers = [monitored.get(id(p)) for p in params] if monitored else []
        before = [self._weight(p).clone() for p in params] if buffers and all(b is not None for b in buffers) else None
        statistics = [self._snapshot_statistics(group, p, p.grad, b, grad_scale) for b, p in zip(buffers, params)] \
            if before is not None else []
        self._update_sparse(group, params, grad_scale, found_inf)
        if before is not None and not step_skipped(found_inf):
            for b, p, p0, stat in zip(buffers, params, before, statistics):
                b[:, :tm.COLUMNS].copy_(tm.row_sums(p0, p, p.grad.to_dense(), b.shape[0], grad_scale))
                if stat is not None:
                    b[:, tm.COLUMNS:].copy_(stat)

    def _update_measured_local(self, args, buffers) -> None:
        """A bucket with DTensors, monitored: per-row sums of each local shard from snapshots (a
        shard may be empty, or hold part of each row), summed across ranks when a record is read
        (wdopt/telemetry.py). Costs a copy of the local shards, on monitored steps only."""
        group, backend, params, grads, grad_scale, found_inf, kernel_ready = args
        before = [p.detach().clone() for p in params]
        # Plain parameters beside the DTensors have buffers with the statistics columns (the
        # DTensors' have none): from the state before the update, as on the snapshot path.
        statistics = [self._snapshot_statistics(group, p, g, b, grad_scale) for b, p, g in zip(buffers, params, grads)]
        self._update(*args)
        if not step_skipped(found_inf):
            for b, p, p0, g, stat in zip(buffers, params, before, grads, statistics):
                if p.numel():  # an empty shard's buffer is zeros: it adds nothing to the sums
                    b[:, :tm.COLUMNS].copy_(tm.row_sums(p0, p, g, b.shape[0], grad_scale))
                    if stat is not None:
                        b[:, tm.COLUMNS:].copy_(stat)

    def _update_measured(self, args, buffers) -> None:
        """Telemetry from snapshots, for backends whose kernels do not gather it (the reference,
        and strided or complex buckets): costs a copy of the parameters and a pass over them;
        the direction statistics (buffers of 8 columns) from the gradients and the state before
        the update."""
        group, backend, params, grads, grad_scale, found_inf, kernel_ready = args
        before = [self._weight(p).clone() for p in params]
        statistics = [self._snapshot_statistics(group, p, g, b, grad_scale) for b, p, g in zip(buffers, params, grads)]
        self._update(*args)
        if not step_skipped(found_inf):
            for b, p, p0, g, stat in zip(buffers, params, before, grads, statistics):
                b[:, :tm.COLUMNS].copy_(tm.row_sums(p0, self._weight(p), g, b.shape[0], grad_scale))
                if stat is not None:
                    b[:, tm.COLUMNS:].copy_(stat)

    def _plan(self) -> list[tuple[dict[str, Any], Any, list[torch.Tensor], bool]]:
        """Phase 1: check everything and change nothing. Returns (group, backend, params, kernel_ready)
        per (device, dtype) bucket of each group; kernel_ready: every tensor of the bucket is real,
        contiguous and eager, so kernels take them as they are. backend is a module, None for meta
        tensors (nothing to compute) or SPARSE (sparse gradients, see ``_sparse_grads``).

        What runs at every step costs a few attribute reads per parameter; what is expensive to
        check (state against parameter, overlapping memory, a group's hyperparameters) is checked
        again only when what it depends on changed (``_checked_state``, ``_GroupChecks``)."""
        self._capture_health_check()
        plan = []
        state_of = self.state
        checked = self._checked_state
        group_checks = self._group_checks
        n_params = 0
        for group_index, group in enumerate(self.param_groups):
            checks = group_checks.get(group_index)
            if checks is None or checks.group is not group:
                checks = group_checks[group_index] = _GroupChecks(group)
            self._check_group_edits(group, group_index, checks)
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            not_kernel_ready = set()
            sparse = []
            addresses = []  # what the overlap check depends on, gathered here at little cost
            n_params += len(group["params"])
            for param_index, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                signature = (p.dtype, p.shape, p.device)
                if type(p) not in _PLAIN or type(g) not in _PLAIN:  # e.g. DTensors (FSDP2, tensor parallel)
                    _dtensor.check_low_precision(p, self._wants_rng(group, p.dtype), group["state_bits"] == 8,
                                                 f"parameter {param_index} of param group {group_index}")
                    _dtensor.check_grad(p, g, f"parameter {param_index} of param group {group_index} "
                                              f"(shape {tuple(p.shape)})")
                    # Kernels see local shards: their layout and addresses are what matters.
                    lp, lg = _dtensor.local(p), _dtensor.local(g)
                else:
                    lp, lg = p, g
                contiguous = lp.is_contiguous()
                if g.is_sparse or (g.dtype, g.shape, g.device) != signature or not contiguous:
                    # Raises, accepts a strided layout, or (True) takes a sparse gradient.
                    if self._check_grad(p, group, group_index, param_index):
                        state = state_of.get(p)
                        if state:
                            self._check_state(p, state, group_index, param_index)
                        sparse.append(p)
                        addresses.append((p.data_ptr(), signature, p.stride()))
                        continue
                state = state_of.get(p)
                seen = checked.get(id(p))
                # A cached check holds while the parameter, its layout, its state dict and the
                # tensors it holds are the same (_state_identity).
                state_id = _state_identity(state) if state is not None else None
                if seen is not None and seen[1] == signature and seen[0]() is p and seen[3] == state_id:
                    plain_state = seen[2]
                else:
                    # Existing state is checked against the parameter when either is new or changed.
                    plain_state = True  # state made at this step copies the parameter's layout
                    if state:
                        plain_state = self._check_state(p, state, group_index, param_index)
                        if plain_state is not None:  # None: sparse state, checked at every step
                            checked[id(p)] = (weakref.ref(p), signature, plain_state, state_id)
                addresses.append((lp.data_ptr(), signature, None if contiguous else lp.stride()))
                key = (signature[0], signature[2])
                buckets[key].append(p)
                if not (contiguous and plain_state and lg.is_contiguous() and not lg.is_neg()):
                    not_kernel_ready.add(key)
            entries = []
            for key, params in buckets.items():
                dtype, device = key
                if device.type == "meta":
                    entries.append((group, None, params, False))
                    continue
                backend = backends.resolve(group["backend"], device)
                real_dtype = _real_dtype(dtype)
                if real_dtype not in backends.SUPPORTED_DTYPES[backend]:
                    raise ValueError(f"backend {backend!r} does not support {dtype} parameters")
                kernel_ready = key not in not_kernel_ready and not dtype.is_complex
                module = backends.load(backend)  # may build the C++ extension
                if group["stochastic_rounding"] and _rounded(dtype) and not backends.rounds_stochastically(module, device):
                    raise NotImplementedError(
                        f"param group {group_index}: backend {backend!r} has no stochastic rounding for {dtype} "
                        f"parameters on {device.type} yet; use backend='reference' or stochastic_rounding=False")
                if group["master_weight_bits"] != 16 and not backends.compensates(module, device):
                    raise NotImplementedError(
                        f"param group {group_index}: backend {backend!r} has no compensated bf16 parameters on "
                        f"{device.type} yet; use backend='reference' or master_weight_bits=16")
                if group["state_bits"] == 8 and not backends.quantizes(module, device):
                    raise NotImplementedError(
                        f"param group {group_index}: backend {backend!r} has no 8-bit states on {device.type} yet; "
                        "use backend='reference' or state_bits=None")
                entries.append((group, module, params, kernel_ready))
            if sparse:
                entries.append((group, SPARSE, sparse, False))
            if self._overlapping(entries, tuple(addresses), checks):
                entries = _one_at_a_time(group, entries)
            plan.extend(entries)
            self._check_step_group(group)
        # Forget parameters no longer in any group (dropped groups, replaced parameters): the
        # cache is rebuilt from the current groups only when it holds more entries than they do.
        if len(checked) > n_params:
            current = {id(p) for group in self.param_groups for p in group["params"]}
            for key in [k for k in checked if k not in current]:
                del checked[key]
        if len(group_checks) > len(self.param_groups):
            for key in [k for k in group_checks if k >= len(self.param_groups)]:
                del group_checks[key]
        return plan

    def _check_group_edits(self, group: dict[str, Any], group_index: int, checks: "_GroupChecks") -> None:
        """A group's hyperparameters, edited after construction (group["betas"] = ...), are
        checked with the constructor's checks at the next step; only when one changed, which a
        snapshot of the values tells cheaply (tensors by identity: reading one would sync)."""
        if checks.hyper_unchanged(group):
            return
        try:
            self._check_group(group, constructing=False)
            self._check_group_at_step(group, group_index)
        except ValueError as error:
            raise ValueError(f"param group {group_index}: {error}") from error
        checks.remember_hyper(group)  # after the check, which may normalise values (tensor betas)

    def _check_group_at_step(self, group: dict[str, Any], group_index: int) -> None:
        """Subclasses' further step-time checks of an edited group."""

    def _overlapping(self, entries: list, key: tuple, checks: "_GroupChecks") -> bool:
        """Whether tensors this step writes in one group share memory. Multi-tensor kernels update
        a bucket's tensors in parallel (the C++ CPU backend on several threads), so two parameters
        over one storage would race; torch updates them one after another, which
        ``_one_at_a_time`` reproduces. Disjoint views of one buffer (DDP bucket views, flat
        parameter buffers) do not overlap and stay on the fast path. Groups run one after another,
        so only tensors within a group can race.

        Checked again only when the group's updated parameters changed (``key``: address, dtype,
        shape, device and strides of each). State made at a step is fresh memory, and loaded state clears the
        cache. Gradients are left out: kernels only read them."""
        if len(key) < 2:
            return False
        if checks.overlap_key != key:
            params = [p for _, backend, ps, _ in entries if backend is not None for p in ps]  # meta: no memory
            tensors = list(params)
            for p in params:
                state = self.state.get(p)
                if state:
                    tensors.extend(t for t in (state.get(k) for k in self._state_tensors)
                                   if isinstance(t, torch.Tensor) and t.layout == torch.strided)
            # DTensors own no memory: their local shards do.
            checks.overlap_key, checks.overlap = key, _any_overlap([_dtensor.local(t) for t in tensors])
        return checks.overlap

    @property
    def _checked_state(self) -> dict:
        """id(parameter) -> (weak reference, (dtype, shape, device) its state was checked against,
        whether that state is contiguous, ``_state_identity`` of its state dict). Holds only
        parameters of the current groups (pruned in ``_plan``)."""
        if "_checked" not in self.__dict__:
            self.__dict__["_checked"] = {}
        return self.__dict__["_checked"]

    @property
    def _group_checks(self) -> dict:
        """group index -> _GroupChecks (not saved: rebuilt at the next step)."""
        if "_group_checks" not in self.__dict__:
            self.__dict__["_group_checks"] = {}
        return self.__dict__["_group_checks"]

    #: State tensors shaped like the parameter (subclasses list theirs).
    _state_tensors: tuple[str, ...] = ()
    #: Keys a parameter's state must hold once it has any (its first step makes them all); a
    #: state dict of another optimizer lacks them.
    _required_state: tuple[str, ...] = ()
    #: Whether sparse COO gradients are taken (FusedSGD, through torch's own sparse ops).
    _sparse_grads = False

    def _check_state(self, p: torch.Tensor, state: dict[str, Any], group_index: int, param_index: int) -> bool:
        """Kernels address state through the parameter's shape, dtype and device: refuse state that
        no longer matches (a model moved with .to() after its first step, a mismatched checkpoint).
        Returns whether every state tensor is contiguous; None when one is sparse (FusedSGD's
        momentum buffer after a sparse gradient, as torch's), which is checked at every step."""
        # A state with no history yet (set_master_weight's correction only) is made whole at this step.
        missing = [] if _fresh(state) else [key for key in self._required_state if key not in state]
        if missing:
            raise RuntimeError(
                f"state of parameter {param_index} of param group {group_index} has no "
                f"{', '.join(repr(k) for k in missing)}, which {type(self).__name__} needs (it has "
                f"{sorted(state)}): a state dict of another optimizer, or an edited one?")
        contiguous = True
        for key in self._state_tensors:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise RuntimeError(f"state {key!r} of parameter {param_index} of param group {group_index} "
                                   f"is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                self._check_sparse_state(p, key, t, group_index, param_index)
                contiguous = None
            elif contiguous is not None:
                contiguous = contiguous and t.is_contiguous()
            if t.dtype in quantization.CODE_DTYPES and t.shape == p.shape and t.device == p.device:
                where = f"state {key!r} of parameter {param_index} of param group {group_index}"
                if t.dtype != self._quantized_states.get(key):
                    raise RuntimeError(f"{where} is {t.dtype} codes; {type(self).__name__} codes it as "
                                       f"{self._quantized_states.get(key)} (an edited or foreign state dict?)")
                scale = state.get(key + _SCALE)
                if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.device == p.device
                        and scale.dim() == 1 and scale.numel() == quantization.blocks(p.numel())
                        and _dtensor.local(scale).is_contiguous()):
                    raise RuntimeError(
                        f"{where} is 8-bit codes, but {key + _SCALE!r} is not a contiguous float32 vector of "
                        f"{quantization.blocks(p.numel())} block scales on {p.device}")
                # Blocks are runs of the codes' memory: codes laid out otherwise than the parameter
                # (its memory format changed after the state was made) would be decoded with other
                # blocks' scales.
                lt, lp = _dtensor.local(t), _dtensor.local(p)
                if not _laid_out_as_made(lt, lp):
                    raise RuntimeError(
                        f"{where} is 8-bit codes laid out with strides {lt.stride()}, the parameter with "
                        f"{lp.stride()}: its memory format changed after the state was made. Change it back, or "
                        f"convert the state: opt.load_state_dict(opt.to_torch_state_dict()), then set the group's "
                        f"state_bits=8 again (the states are encoded anew at the next step)")
                if _dtensor.is_dtensor(p) or _dtensor.is_dtensor(t):
                    where = f"parameter {param_index} of param group {group_index}"
                    _dtensor.check_state(p, key, t, where)
                    _dtensor.check_state(p, key + _SCALE, scale, where, _dtensor.scale_placements(p))
                continue
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise RuntimeError(
                    f"state {key!r} of parameter {param_index} of param group {group_index} is "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}, but the parameter is {p.dtype} "
                    f"{tuple(p.shape)} on {p.device}; load the state dict again after moving the model")
            _dtensor.check_state(p, key, t, f"parameter {param_index} of param group {group_index}")
            if _dtensor.is_dtensor(t):
                contiguous = contiguous and t._local_tensor.is_contiguous()
        self._check_other_state(p, state, group_index, f"parameter {param_index} of param group {group_index}")
        correction = state.get("correction")
        lp = p
        if correction is not None and _dtensor.is_dtensor(p) and isinstance(correction, torch.Tensor):
            where = f"parameter {param_index} of param group {group_index}"
            _dtensor.check_state(p, "correction", correction, where)  # placed as the parameter
            lp, correction = _dtensor.local(p), _dtensor.local(correction)  # then laid out as it
        if isinstance(correction, torch.Tensor) and lp.dtype != torch.bfloat16 and \
                self.param_groups[group_index].get("master_weight_bits", 16) != 16:
            # Only a bf16 parameter's bits combine with it (8-bit states, not in the parameter's
            # dtype, would not show a dtype change otherwise). A group set back to 16 bits drops it.
            raise RuntimeError(
                f"state 'correction' of parameter {param_index} of param group {group_index} holds the low bits of "
                f"a bfloat16 parameter's master weight, but the parameter is {lp.dtype}: its dtype changed after "
                f"the state was made. Change it back, or move the master weight first (w = opt.master_weight(p) "
                f"while p is bfloat16), or drop it (del opt.state[p]['correction']) and set the group's "
                f"master_weight_bits=16")
        fits = isinstance(correction, torch.Tensor) and type(correction) in _PLAIN and correction.shape == lp.shape \
            and correction.dtype in (torch.int8, torch.int16) and correction.device == lp.device
        if correction is not None and not (fits and _laid_out_as_made(correction, lp)):
            where = f"state 'correction' of parameter {param_index} of param group {group_index}"
            if fits:
                # The parameter's memory format changed after the state was made: the master
                # weight is still whole element by element, and can be set again.
                raise RuntimeError(
                    f"{where} is laid out with strides {correction.stride()}, the parameter with {lp.stride()}: its "
                    f"memory format changed after the state was made. Change it back, or keep the master weight: "
                    f"w = opt.master_weight(p); del opt.state[p]['correction']; opt.set_master_weight(p, w)")
            raise RuntimeError(f"{where} must be an int16 or int8 tensor shaped and laid out like the parameter "
                               f"({tuple(p.shape)} on {p.device}), got {correction!r:.200}")
        rng = state.get("rng")
        if rng is not None and not (isinstance(rng, torch.Tensor) and type(rng) in _PLAIN and rng.dtype == torch.int64
                                    and rng.shape in ((2,), (3,)) and rng.device == p.device and rng.is_contiguous()):
            raise RuntimeError(f"state 'rng' of parameter {param_index} of param group {group_index} must be a "
                               f"contiguous int64 tensor of 2 elements (stochastic rounding's key and count; 3 for a "
                               f"shard: and its index base) on {p.device}, got {rng!r:.200}")
        step = state.get("step")
        if isinstance(step, torch.Tensor) and _dtensor.is_dtensor(step):
            raise RuntimeError(f"state 'step' of parameter {param_index} of param group {group_index} is a "
                               "DTensor; steps are plain 0-d tensors, as torch's")
        if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32
                                               or step.numel() != 1):
            raise RuntimeError(f"state 'step' of parameter {param_index} of param group {group_index} must be a "
                               f"float32 scalar on {p.device}, got {step.dtype} {tuple(step.shape)} on {step.device}")
        return contiguous

    def _global(self, p):
        """During an update on local shards (``_dtensor.LocalStates``), the DTensor parameter whose
        local shard ``p`` is; else ``p``."""
        return self.__dict__.get("_global_params", {}).get(id(p), p)

    def _check_other_state(self, p, state: dict, group_index: int, where: str) -> None:
        """Checks of state other than ``_state_tensors`` and ``step`` (the rotational per-row state)."""

    def _wrap_state(self, p, key: str, value, group: dict):
        """State that an update on the local shards of DTensor ``p`` created (``_dtensor.LocalStates``),
        as it is kept: 0-d counters plain (as torch's ``step``), tensors shaped like the local
        parameter as DTensors of its placement."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        if key in self._state_tensors and value.shape == p._local_tensor.shape:
            return _dtensor.from_local(p, value, tuple(p.placements), p.shape, p.stride())
        raise RuntimeError(f"{type(self).__name__}: no placement known for state {key!r} of a DTensor parameter")

    def _check_sparse_state(self, p, key, t, group_index, param_index) -> None:
        """A sparse state tensor: refused, except where a subclass keeps torch's sparse state."""
        raise RuntimeError(f"state {key!r} of parameter {param_index} of param group {group_index} is "
                           f"{t.layout}; {type(self).__name__} keeps dense state")

    def _check_step_group(self, group: dict[str, Any]) -> None:
        """Step-time checks of a group that construction cannot make (e.g. a scheduler's lr)."""
        if group["decay_scaling"] == "schedule" and not _settled_float(self._initial_lr(group)) > 0:
            raise ValueError("decay_scaling='schedule' needs a positive initial learning rate")

    def _check_grad(self, p: torch.Tensor, group: dict[str, Any], group_index: int, param_index: int) -> bool:
        """Raises for a gradient kernels cannot take; True for a sparse one this optimizer takes
        (through ``_update_sparse``), False for a dense one."""
        g = p.grad
        where = f"parameter {param_index} of param group {group_index} (shape {tuple(p.shape)})"
        if g.is_sparse:
            if not self._sparse_grads:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients: {where}")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or p.layout != torch.strided:
                raise RuntimeError(f"sparse gradient {g.dtype} {tuple(g.shape)} on {g.device} does not match "
                                   f"{p.dtype} {where} on {p.device}")
            self._check_sparse_grad(p, group, where)
            return True
        if g.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match {where}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"gradient dtype {g.dtype} does not match {p.dtype} of {where}")
        if g.device != p.device:
            raise RuntimeError(f"gradient on {g.device} but {where} is on {p.device}")
        if not p.is_contiguous() and any(size > 1 and stride == 0 for size, stride in zip(p.shape, p.stride())):
            raise RuntimeError(f"{where} has overlapping memory (an expanded view); it cannot be updated in place")
        return False

    def _check_sparse_grad(self, p: torch.Tensor, group: dict[str, Any], where: str) -> None:
        """Raise before any update what torch would raise during the sparse step (subclasses)."""

    # ------------------------------------------------------------------ helpers for subclasses

    @staticmethod
    def _initial_lr(group: dict[str, Any]):
        return group.get("initial_lr", group["decay_initial_lr"])

    def _decay_lr_scale(self, group: dict[str, Any]) -> float:
        """d = lr·λ·scale: 1 for torch's decay, 1/initial_lr when decay follows the schedule."""
        if group["decay_scaling"] == "schedule":
            return 1.0 / _settled_float(self._initial_lr(group))
        return 1.0

    @staticmethod
    def _lr(group: dict[str, Any], device: torch.device):
        """The lr handed to kernels: a float, or (capturable) a device tensor read by the kernel."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if group["capturable"]:
                return lr.to(device=device, dtype=torch.float64 if lr.dtype == torch.float64 else torch.float32).reshape(())
            return lr.item()
        return float(lr)


def _hooked_only_when_needed(step):
    """``step`` with torch.optim's step hooks and profiler range, run only when they do something.

    torch.optim.Optimizer wraps each subclass's ``step`` in ``profile_hook_step``: a
    ``record_function`` range and the pre/post step hooks, about 25 µs a call with no profiler and
    no hook on the 2-core CPU machine (two dispatcher calls and a context manager) — as much as the
    fast path's checks of 150 tensors. Here torch's own wrapper runs whenever a hook is registered
    (per optimizer or global) or the profiler is on, so hooks and traces are exactly torch's;
    otherwise the step is called directly. Marked ``hooked`` so torch does not wrap it again.

    Also torch's wrapper, always: while torch.compile traces the step (a compiled step would keep
    the branch it was traced with, and miss hooks registered later; torch's wrapper is traced with
    its hook loops), and inside a user subclass's own ``step`` (torch wraps that one: hooks run once).
    A standalone ExecutionTraceObserver (without the profiler) does not see the step's range."""
    from torch.autograd import profiler
    from torch.optim import optimizer as torch_optimizer

    wrapped = Optimizer.profile_hook_step(step)

    def hooked(self, *args, **kwargs):
        if type(self).step is not hooked:
            return step(self, *args, **kwargs)  # called by a subclass's step, which torch wrapped
        if getattr(profiler, "_is_profiler_enabled", True) or self._optimizer_step_pre_hooks or \
                self._optimizer_step_post_hooks or torch_optimizer._global_optimizer_pre_hooks or \
                torch_optimizer._global_optimizer_post_hooks or torch.compiler.is_compiling():
            return wrapped(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    hooked.__wrapped__ = step
    hooked.__name__, hooked.__qualname__, hooked.__doc__ = step.__name__, step.__qualname__, step.__doc__
    hooked.hooked = True
    return hooked


FusedOptimizer.step = _hooked_only_when_needed(FusedOptimizer.step)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel
#: State kept in integer dtypes, which torch.optim's load_state_dict would cast to the parameter's.
_INTEGER_STATE = ("rng", "correction")
_SCALE = quantization.SCALE_SUFFIX  # state key + this: an 8-bit state's block scales
#: __getstate__'s key for the seeds each group's streams were made from (not a torch.optim key).
_MADE_SEEDS = "_wdopt_stream_seeds"


def _float(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _state_identity(state: dict) -> tuple:
    """What a parameter's cached state check (``_plan``) depends on: the state dict, the objects it
    holds (a key added or deleted, a tensor replaced) and where each tensor's data lies
    and how much of it there is (``.data =``, a move to another device, ``resize_``). A change checks the
    state again before anything is written; without it the kernels' own checks refused such a
    state only when their turn came, after earlier groups were updated, and the reference used it.
    In-place edits that keep the storage and the size (``t_()``, ``as_strided_``) are not seen
    here: the C++ and CUDA kernels still refuse them. About 0.2 µs a tensor (2026-11-28, AMD EPYC)."""
    values = list(state.values())
    try:
        return (id(state), *map(id, values), *map(_DATA_PTR, values), *map(_NUMEL, values))
    except (TypeError, RuntimeError):  # a value without strided storage (sparse, DTensor, a number)
        return (id(state), *map(id, values))


# id(tensor) -> (weak reference, version, value). Not a WeakKeyDictionary: its lookups compare
# tensors with ==, an element-wise op whose truth value would itself be read on the host.
_SETTLED: dict[int, tuple] = {}


def _settled_float(x) -> float:
    """The value of a float or of a tensor that rarely changes (a scheduler's ``initial_lr``), read
    on the host only when the tensor is new or was written since (its version counter moved): a
    capturable step after the first then never waits for the device."""
    if not isinstance(x, torch.Tensor):
        return float(x)
    cached = _SETTLED.get(id(x))
    if cached is None or cached[0]() is not x or cached[1] != x._version:
        if len(_SETTLED) > 1024:  # forget tensors that died
            for key in [k for k, v in _SETTLED.items() if v[0]() is None]:
                del _SETTLED[key]
        cached = (weakref.ref(x), x._version, x.item())
        _SETTLED[id(x)] = cached
    return cached[2]


def _rounded(dtype: torch.dtype) -> bool:
    """Stored in bf16 or fp16 (complex32 as fp16 pairs): what stochastic rounding applies to."""
    return dtype in (torch.bfloat16, torch.float16, torch.complex32)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}.get(dtype, dtype)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


# What a parameter's state may hold before its first step: set_master_weight's correction (an fp32
# checkpoint loaded into a fresh bf16 model) and the rounding stream.
_BEFORE_FIRST_STEP = frozenset({"correction", "rng"})


def _laid_out_as_made(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``t`` (codes, a correction) is laid out as the optimizer makes it for ``p``: as p
    where p is dense, row-major where it has gaps (its kernels then work on a contiguous copy).
    A size-1 dimension's stride is arbitrary."""
    made = torch.empty_like(p, dtype=t.dtype, device="meta")
    return all(n == 1 or a == b for n, a, b in zip(t.shape, t.stride(), made.stride()))


def _fresh(state: dict) -> bool:
    """Whether ``state`` has no optimizer history yet: _init_state makes all of it."""
    return not (state.keys() - _BEFORE_FIRST_STEP)


def _step_tensor(step, device: torch.device) -> torch.Tensor:
    """Steps live beside the parameter as float32 0-d tensors, as in torch's fused optimizers."""
    if isinstance(step, torch.Tensor) and step.device == device and step.dtype == torch.float32:
        return step
    return torch.tensor(_float(step), dtype=torch.float32, device=device)



#: The plan's backend for parameters with sparse gradients (``FusedOptimizer._update_sparse``).
SPARSE = object()


class _GroupChecks:
    """What was last checked about one param group: its hyperparameters and whether its tensors'
    memory overlaps, so that each is checked again only when it changed."""

    __slots__ = ("group", "keys", "values", "overlap_key", "overlap")

    def __init__(self, group: dict[str, Any]):
        self.group = group
        self.keys = self.values = self.overlap_key = None
        self.overlap = False

    def hyper_unchanged(self, group: dict[str, Any]) -> bool:
        """Whether every value but ``params`` is the one last checked: tensors by identity (an lr
        tensor updated in place by a capturable scheduler is not read), the rest by value."""
        if self.keys is None or len(group) != len(self.keys) + 1:
            return False
        for key, old in zip(self.keys, self.values):
            new = group.get(key, _MISSING)
            if new is old:
                continue
            if key == "lr" and type(new) in (float, int) and type(old) in (float, int) and new >= 0:
                continue  # a scheduler's new lr: valid (check_lr's rule), and read at every step anyway
            if not _same_value(new, old):
                return False
        return True

    def remember_hyper(self, group: dict[str, Any]) -> None:
        self.keys = tuple(k for k in group if k != "params")
        self.values = tuple(group[k] for k in self.keys)


_MISSING = object()


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(x is y or _same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a == 0.0 == b:
        return math.copysign(1.0, a) == math.copysign(1.0, b)  # -0.0 can change the sign of a zero
    return a == b


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of the memory ``t`` addresses (strides are >= 0)."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 1)
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _any_overlap(tensors: list[torch.Tensor]) -> bool:
    """Whether the extents of any two tensors intersect: a sweep over them sorted by start. For
    dense tensors (elements fill their extent) that is overlap; strided views whose extents
    interleave without sharing an element (x[:, 0] and x[:, 1]) count too: they are then updated
    one at a time, which is slower but right."""
    spans = sorted(_extent(t) for t in tensors if t.numel() > 0)
    reach = -1
    for start, end in spans:
        if start < reach:
            return True
        reach = max(reach, end)
    return False


def _one_at_a_time(group: dict[str, Any], entries: list) -> list:
    """A group's entries split into one parameter each, in the group's order: the order torch's
    for-loop updates them in, each seeing the updates before it."""
    where = {id(p): (backend, kernel_ready) for _, backend, params, kernel_ready in entries for p in params}
    out = []
    for p in group["params"]:
        entry = where.get(id(p))
        if entry is not None:
            out.append((group, entry[0], [p], entry[1]))
    return out
