"""FusedSGD: torch.optim.SGD's interface and trajectory, plus decoupled decay, on fused kernels."""

from __future__ import annotations

import weakref

import torch

from ..reference._common import step_skipped
from ..reference.sgd import sgd_sparse_step
from . import _dtensor
from ._base import FusedOptimizer, _float, check_common, check_rounding


class FusedSGD(FusedOptimizer):
    r"""SGD with momentum, a drop-in replacement for ``torch.optim.SGD``.

    For each parameter with a gradient::

        g ← −g if maximize;   g ← g / grad_scale    (under torch.amp.GradScaler)
        g ← g + λ·p                                 (L2, torch's default)
        p ← p·(1 − d)                               (decoupled_weight_decay=True instead of L2;
                                                     d = lr·λ, or λ·lr/initial_lr with "schedule")
        b ← g on the first step, else b ← μ·b + (1 − dampening)·g      (μ ≠ 0)
        g ← g + μ·b if nesterov else b
        p ← p − lr·g

    State is torch's: ``momentum_buffer`` when μ ≠ 0, nothing otherwise. Math is fp32 for
    fp32/bf16/fp16 parameters (fp64 for fp64).

    A new momentum buffer is flagged "no history yet" by a 0-d device tensor that the kernels read
    on the device and the optimizer clears after the first step GradScaler did not skip (so a
    skipped first step still gives b = g next time, and a step captured in a CUDA graph at step 1
    or later replays correctly). The flag is not part of the state dict: a loaded buffer has history.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, a float or a 1-element tensor (read on device when ``capturable``).
        momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        decoupled_weight_decay: SGDW — decay the weights instead of adding λ·p to the gradient.
        capturable: read lr on the device, never syncing the host (CUDA graphs).
        decay_scaling: "lr" or "schedule" (see FusedAdamW); only with decoupled_weight_decay.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see ``wdopt.available_backends``).
        stochastic_rounding: store bf16/fp16 parameters and states rounded stochastically (unbiased)
            instead of to nearest, so updates and decay far below half an ulp still act on average;
            fp32/fp64 tensors are unaffected. Bits are a hash of (seed, parameter, step, element):
            every backend gives the same bits (wdopt/reference/rounding.py). Adds state ``rng``.
        rounding_seed: the integer the parameters' random streams derive from (saved in ``rng``).
        master_weight_bits: 16 (plain parameters), or 24/32 for bf16 parameters with a master
            weight of that precision: the bf16 parameter plus its low bits in state ``correction``
            (int8/int16), 1 or 2 bytes more per parameter (``master_weight``, ``set_master_weight``).
        state_bits: None (states in the parameter's dtype, as torch) or 8: each state one byte per
            element plus a float32 scale per 256 (wdopt/reference/quantization.py); a torch.optim
            state dict loads (quantized at the next step), ``to_torch_state_dict`` goes back.
        foreach, fused: accepted for compatibility with torch.optim calls; they have no effect.
        differentiable: must be False.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        capturable: bool = False,
        decay_scaling: str = "lr",
        backend: str = "auto",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        master_weight_bits: int = 16,
        state_bits: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
            decay_scaling=decay_scaling, backend=backend,
            stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed,
            master_weight_bits=master_weight_bits, state_bits=state_bits,
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group, constructing=True):
        check_common(group["lr"], group["weight_decay"], group["decay_scaling"], group["backend"],
                     group["differentiable"], constructing)
        check_rounding(group, type(self).__name__, self._stochastic_rounding_supported, self._state_bits_supported)
        if group["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if group["decay_scaling"] == "schedule" and not group["decoupled_weight_decay"]:
            raise ValueError("decay_scaling='schedule' applies to decoupled weight decay: "
                             "pass decoupled_weight_decay=True")

    _state_tensors = ("momentum_buffer",)  # none required: a missing one is made, as torch does

    _quantized_states = {"momentum_buffer": torch.int8}

    def _init_state(self, p, group):
        if group["momentum"] == 0:
            return  # torch keeps no state for SGD without momentum
        if p.grad.is_sparse:
            return  # torch's sparse path makes its buffer from the gradient (_update_sparse)
        state = self.state[p]
        if state.get("momentum_buffer") is None:  # torch ≤ 2.0 checkpoints store None
            # Zeros, flagged "no history yet": the kernel then stores b = g.
            buffer = self._zeros_state(p, group, "momentum_buffer")
            state["momentum_buffer"] = buffer
            self._flags.add(_dtensor.local(buffer))  # kernels see a DTensor's local buffer (_dtensor.py)

    _fast_kind = "sgd"
    _statistics_kind = "sgd"

    def _fast_constants(self, group):
        return [float(group["weight_decay"]), float(group["momentum"]), float(group["dampening"])], \
            [int(group["nesterov"]), int(group["decoupled_weight_decay"]), int(group["maximize"])]

    def _state_lists(self, group, params, states):
        if group["momentum"] == 0:
            return {}, [], [None] * len(params)
        buffers = [s["momentum_buffer"] for s in states]
        return {"momentum_buffer": buffers}, [], self._flags.lookup(buffers)

    def _fast_finish(self, flags, found_inf):
        self._flags.clear(flags, found_inf)

    def _update(self, group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry=()):
        first_steps = self._run_bucket(group, backend, params, grads, grad_scale, found_inf, kernel_ready, telemetry)
        self._flags.clear(first_steps, found_inf)

    def _launch(self, backend, group, params, grads, lists, steps, first_steps, lr, decay_lr_scale, grad_scale,
                found_inf, **extra):
        return backend.sgd(
            params, grads, lists["momentum_buffer"] if "momentum_buffer" in lists else [None] * len(params),
            first_steps, lr=lr,
            weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], decoupled_weight_decay=group["decoupled_weight_decay"],
            decay_lr_scale=decay_lr_scale, maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
            **extra)

    # ------------------------------------------------------------------ sparse gradients
    # torch.optim.SGD takes sparse COO gradients on dense parameters (nn.Embedding(sparse=True)).
    # Kernels are dense, so those parameters take torch's own single-tensor step instead
    # (wdopt.reference.sgd.sgd_sparse_step): the same ops, numbers and state layout (a momentum
    # buffer made from a sparse gradient is sparse). What would make torch's step raise halfway is
    # refused here, before any parameter changes.

    _sparse_grads = True

    def _check_sparse_grad(self, p, group, where):
        if group["stochastic_rounding"] and p.dtype in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"FusedSGD: stochastic_rounding with a sparse gradient ({where}) is not supported: "
                               "torch's sparse ops update the parameter, rounding to nearest")
        if group["master_weight_bits"] != 16 and p.dtype == torch.bfloat16:
            raise RuntimeError(f"FusedSGD: master_weight_bits with a sparse gradient ({where}) is not supported: "
                               "torch's sparse ops update the bf16 parameter and not its correction")
        if group["state_bits"] == 8 and group["momentum"] != 0:
            raise RuntimeError(f"FusedSGD: state_bits=8 with a sparse gradient ({where}) is not supported: "
                               "torch's sparse ops keep the momentum buffer as floats")
        if group["weight_decay"] != 0 and not group["decoupled_weight_decay"]:
            raise RuntimeError(f"FusedSGD: weight_decay with a sparse gradient ({where}): torch.optim.SGD refuses "
                               "it too (add(sparse, dense) is not supported); use weight_decay=0 or "
                               "decoupled_weight_decay=True")
        if group["momentum"] != 0 and group["nesterov"]:
            buffer = self.state.get(p, {}).get("momentum_buffer")
            if buffer is not None and buffer.layout == torch.strided and not self._flags.pending(buffer):
                raise RuntimeError(f"FusedSGD: nesterov with a sparse gradient and a dense momentum buffer ({where}): "
                                   "torch.optim.SGD cannot add them either (add(sparse, dense) is not supported)")

    def _check_sparse_state(self, p, key, t, group_index, param_index):
        if key != "momentum_buffer" or t.layout != torch.sparse_coo:
            super()._check_sparse_state(p, key, t, group_index, param_index)
        if not p.grad.is_sparse and self.param_groups[group_index]["momentum"] != 0:
            raise RuntimeError(
                f"FusedSGD: parameter {param_index} of param group {group_index} has a dense gradient but a sparse "
                "momentum buffer (made from a sparse gradient): torch.optim.SGD cannot add them either "
                "(add(sparse, dense) is not supported)")

    def _update_sparse(self, group, params, grad_scale, found_inf):
        if step_skipped(found_inf):
            return
        momentum = group["momentum"]
        for p in params:
            state = self.state[p]
            buffer = state.get("momentum_buffer") if momentum != 0 else None
            if buffer is not None and buffer.layout == torch.strided and self._flags.take(buffer):
                buffer = None  # made at a step GradScaler skipped: no history yet
            buffer = sgd_sparse_step(
                p, p.grad, buffer, lr=_float(group["lr"]), weight_decay=group["weight_decay"], momentum=momentum,
                dampening=group["dampening"], nesterov=group["nesterov"],
                decoupled_weight_decay=group["decoupled_weight_decay"], decay_lr_scale=self._decay_lr_scale(group),
                maximize=group["maximize"], grad_scale=grad_scale)
            if momentum != 0:
                state["momentum_buffer"] = buffer
            self._checked_state.pop(id(p), None)  # its state changed layout, maybe

    @property
    def _flags(self) -> "FirstStepFlags":
        """The momentum buffers' first-step flags (not saved: a loaded buffer has history)."""
        if "_first_step_flags" not in self.__dict__:
            self.__dict__["_first_step_flags"] = FirstStepFlags()
        return self.__dict__["_first_step_flags"]

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_first_step_flags", None)


class FirstStepFlags:
    """Per momentum buffer created by the optimizer, a 0-d float32 flag on its device, 1 until the
    buffer has history. Kernels read it on the device, so the tensor tables and the arguments of a
    step stay the same from the first step on (CUDA-graph capture at step 1 or 2 both replay right);
    the flags are cleared after a step, only where GradScaler did not skip it. Buffers are known by
    id, with a weak reference that tells a reused id apart."""

    def __init__(self):
        self._by_buffer: dict[int, tuple] = {}  # id(buffer) -> (weakref(buffer), flag)
        self._maybe_set: dict[int, torch.Tensor] = {}  # id(flag) -> flag, not yet known to be 0

    def __reduce__(self):
        # Copies and pickles start without flags (weak references do not travel): a buffer then
        # counts as having history, as one loaded from a state dict does.
        return (FirstStepFlags, ())

    def add(self, buffer: torch.Tensor) -> None:
        if len(self._by_buffer) >= 64 and len(self._by_buffer) % 64 == 0:  # forget buffers that died
            self._by_buffer = {k: e for k, e in self._by_buffer.items() if e[0]() is not None}
        flag = torch.ones((), dtype=torch.float32, device=buffer.device)
        self._by_buffer[id(buffer)] = (weakref.ref(buffer), flag)
        self._maybe_set[id(flag)] = flag

    def lookup(self, buffers) -> list:
        """Each buffer's flag, or None (a buffer with history: loaded, or made before pickling)."""
        out = []
        for b in buffers:
            entry = self._by_buffer.get(id(b)) if b is not None else None
            out.append(entry[1] if entry is not None and entry[0]() is b else None)
        return out

    def pending(self, buffer: torch.Tensor) -> bool:
        """Whether ``buffer`` may still have no history (its flag is not known to be clear)."""
        flag = self.lookup([buffer])[0]
        return flag is not None and id(flag) in self._maybe_set

    def take(self, buffer: torch.Tensor | None) -> bool:
        """For host-side paths (they sync): whether ``buffer`` has no history yet; from now on it has."""
        flag = self.lookup([buffer])[0]
        if flag is None or self._maybe_set.pop(id(flag), None) is None:
            return False
        first = bool(flag)
        flag.zero_()
        return first

    def clear(self, flags, found_inf: torch.Tensor | None) -> None:
        """After a step: flags ← 0, or flags ← flags·found_inf under GradScaler (kept where it
        skipped the step). Nothing runs once every flag is known to be clear."""
        if not self._maybe_set:
            return
        pending = [f for f in flags if f is not None and id(f) in self._maybe_set]
        if not pending:
            return
        # One small op per flag, only on the steps that may still find a flag set (the first ones):
        # no foreach op, which the reference backend's path must not use (tests/test_reference.py).
        kept = None if found_inf is None else found_inf.reshape(()).to(torch.float32)
        for flag in pending:
            if kept is None:
                flag.zero_()
            else:
                flag.mul_(kept)
        capturing = pending[0].is_cuda and torch.cuda.is_current_stream_capturing()
        if found_inf is None and not capturing:  # a captured clear has not run yet
            for f in pending:
                self._maybe_set.pop(id(f), None)
