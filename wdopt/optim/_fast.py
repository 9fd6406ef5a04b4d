"""The step driver's fast path: a validated step, re-used while nothing it depends on changed.

The validation path (``FusedOptimizer._plan``) checks every parameter, gradient and state tensor
in Python: microseconds per tensor, more than a GPU needs to update a small tensor. After it has
validated a step whose buckets all go to the C++ or Triton backends as they are (real, contiguous
tensors), the driver keeps a ``FastStep``: per param group a ``GroupPlan`` (csrc/step_plan.cpp)
holding the group's tensors once, plus snapshots of the Python objects users edit; a Triton bucket
also owns its tensor table, of which only the gradient column is rewritten, and only when the
gradients moved. A later step re-uses it when

* on Python objects (per group in Python; per parameter in C, csrc/fast_checks.cpp, a pointer
  compare per object): the same groups, each with the same parameter list and the same
  hyperparameters except a changed valid float ``lr`` (schedulers change it every step; it is
  passed per step); the same state dict holding the same per-parameter dicts holding the same
  state tensors;
* in C++ (``GroupPlan.ready``): each parameter has a gradient exactly where the validated step had
  one, of its dtype, shape and device, dense and contiguous; no parameter or state tensor moved
  (``.data =``, ``set_``, ``resize_``) or changed shape.

Low-precision storage counts as state: stochastic rounding's ``rng`` tensors, compensated
parameters' ``correction`` and 8-bit states' block scales are held by the plan
(``GroupPlan.set_low_precision``) and checked with the states, and the plan advances the rng
counts after its kernels as ``FusedOptimizer._advance_rng`` does (after a Triton bucket's launch,
the driver calls it: the prepared table holds the rng tensors' addresses, read on the device).

Gradients are keyed by what they are, not by which tensor they are: the default loop
(``zero_grad(set_to_none=True)``) makes new gradient tensors every step, which the plan reads
afresh. Anything else falls back to the validation path, which raises a clear error or builds a
new plan; since ``ready`` runs for every group before any kernel, a fallback has written nothing.
"""

from __future__ import annotations

import torch

from ..reference import quantization

#: Group values read at every step, fast or not (tensors allowed): the rest are plan constants.
_READ_PER_STEP = ("params", "lr", "initial_lr", "decay_initial_lr")


class _TritonBucket:
    """A Triton bucket of the fast path: its tensor lists, and its launch with the table it owns
    (wdopt/kernels/tables.py), whose gradient column is kept up to date, and the group's
    hyperparameters fixed (they are checked unchanged before each fast step)."""

    __slots__ = ("params", "lists", "steps", "first_steps", "launch", "addresses", "rngs")

    def __init__(self, params, lists, steps, first_steps, rngs):
        self.params, self.lists, self.steps, self.first_steps = params, lists, steps, first_steps
        self.rngs = rngs  # stochastic rounding's streams, whose counts the driver advances after a launch
        self.launch = None  # multi_tensor.PreparedLaunch: .table, called with (lr, scale, grad_scale, found_inf)
        self.addresses = None  # the plan's int64 tensor of the gradients' addresses (GroupPlan.addresses)


def _mode(cpp: bool, device: torch.device) -> int:
    """How a GroupPlan bucket runs (csrc/step_plan.cpp, Mode): the CUDA operator, the C++ CPU
    kernels on a pointer table, or a Triton launch from Python with the gradients' addresses."""
    if not cpp:
        return 2
    return 1 if device.type == "cpu" else 0


class _Group:
    """One param group of the fast path: what its checks compare, and its GroupPlan's methods
    (bound once: looking a method up on a TorchScript object costs microseconds)."""

    __slots__ = ("group", "params", "checks", "plan", "ready", "run", "runs", "bucket_params", "device_tables")

    def __init__(self, group, params, checks, plan, runs, bucket_params):
        self.group, self.params, self.checks, self.plan, self.runs = group, params, checks, plan, runs
        self.bucket_params = bucket_params  # per bucket, its parameters
        self.ready, self.run = plan.ready, plan.run
        #: A Triton bucket's table on a GPU: checked at every step (stream, capture), moved or not.
        self.device_tables = any(triton is not None and device.type != "cpu" for device, triton, _ in runs)


class FastStep:
    """The cached step of one optimizer (``FusedOptimizer._fast``)."""

    __slots__ = ("groups", "state", "state_keys", "state_dicts", "state_columns", "checks", "finish", "params",
                 "launches_from_python", "kernel_statistics", "telemetry_layout")

    @classmethod
    def build(cls, optimizer, plan: list) -> "FastStep | None":
        """A fast step for ``plan`` (what ``_plan`` returned for the step that just ran), or None
        when some bucket needs the validation path's handling at every step."""
        kind = optimizer._fast_kind
        if kind is None:
            return None
        from ..kernels import cpp
        from ._base import _GroupChecks

        # Hyperparameters the kernels take as constants must be plain values: a tensor (say a
        # weight_decay tensor a user fills in place) is read at every step by the validation path.
        for group in optimizer.param_groups:
            if any(isinstance(v, torch.Tensor) for k, v in group.items() if k not in _READ_PER_STEP):
                return None
        # A parameter listed in two groups (possible by editing group["params"]) is updated by
        # each; the validation path orders what happens between them (SGD's first-step flags).
        listed = [id(p) for group in optimizer.param_groups for p in group["params"]]
        if len(set(listed)) != len(listed):
            return None
        by_group: dict[int, list] = {}
        for group, backend, params, kernel_ready in plan:
            if not kernel_ready or getattr(backend, "__name__", None) not in ("wdopt.kernels.cpp", "wdopt.kernels.triton"):
                return None  # meta, sparse, the reference, or tensors copied into work tensors
            if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in params):
                return None  # tensor subclasses dispatch in Python
            by_group.setdefault(id(group), []).append((backend, params))
        if any(getattr(backend, "__name__", None) == "wdopt.kernels.triton" and params[0].is_cuda
               for _, backend, params, _ in plan) and torch.cuda.is_current_stream_capturing():
            return None  # a Triton bucket's own table is uploaded once, which a graph capture forbids
        # The gradient checks are C++ (GroupPlan), also for Triton buckets: used where the
        # extension is loaded or loads without compiling (a Triton user is not made to wait for
        # a build; their steps then stay on the validation path).
        if not cpp.load_if_built():
            return None
        self = cls()
        self.groups = []
        self.finish = []
        state = optimizer.state
        columns: dict[tuple, tuple[list, list]] = {}  # state keys -> (state dicts, their tensors in order)
        for group in optimizer.param_groups:
            params = list(group["params"])
            position = {id(p): i for i, p in enumerate(params)}
            buckets = by_group.get(id(group), [])
            with_grad = [0] * len(params)
            for _, bucket in buckets:
                for p in bucket:
                    with_grad[position[id(p)]] = 1
            constants, flags = optimizer._fast_constants(group)
            group_plan = torch.classes.wdopt.GroupPlan(kind, params, with_grad, constants, flags)
            runs = []  # per bucket: (device, None for the C++ backends or a _TritonBucket)
            for backend, bucket in buckets:
                dicts = [state[p] for p in bucket]
                lists, steps, first_steps = optimizer._state_lists(group, bucket, dicts)
                # Low-precision storage (stochastic rounding's streams, corrections, 8-bit states'
                # block scales): held by the plan as the states are, and checked as them.
                low = {}
                rngs, corrections = optimizer._rngs(group, bucket), optimizer._corrections(group, bucket)
                if rngs:
                    low["rng"] = rngs
                if corrections:
                    low["correction"] = corrections
                scales = optimizer._scales(group, bucket, lists)
                for lane in sorted(scales):
                    low[list(lists)[lane - 1] + quantization.SCALE_SUFFIX] = scales[lane]
                columned = {**lists, **low}
                keys = tuple(columned) + (("step",) if steps else ())
                # Every entry of each state dict is compared, and nothing may be added: an entry
                # the plan does not use (a stray ``correction`` in a 16-bit group, which the
                # validation path drops) is held by identity with the plan's own.
                rows = zip(*columned.values(), *([steps] if steps else [])) if keys else [()] * len(dicts)
                for d, values in zip(dicts, rows):
                    extra = tuple(k for k in d if k not in keys)
                    column = columns.setdefault(keys + extra, ([], []))
                    column[0].append(d)
                    column[1].extend((*values, *(d[k] for k in extra)))
                members = [i for i, flag in enumerate(first_steps) if flag is not None]
                index = group_plan.add_bucket([position[id(p)] for p in bucket], list(lists.values()), steps,
                                              [first_steps[i] for i in members], members,
                                              _mode(backend is cpp, bucket[0].device))
                if low:
                    group_plan.set_low_precision(index, rngs, corrections, [scales[lane] for lane in sorted(scales)])
                self.finish.extend(first_steps[i] for i in members)
                triton = None
                if backend is not cpp:
                    # The bucket's own table, made now (outside any graph capture: a step captured
                    # after this one uploads nothing), from this step's gradients.
                    triton = _TritonBucket(bucket, lists, steps, first_steps, rngs)
                    extra = {k: v for k, v in (("rng", rngs), ("correction", corrections), ("scales", scales)) if v}
                    triton.launch = optimizer._launch(backend, group, bucket, [p.grad for p in bucket], lists, steps,
                                                      first_steps, 0.0, 1.0, None, None, table="prepare", **extra)
                    triton.addresses = group_plan.addresses(index, triton.launch.table.aligned)
                runs.append((bucket[0].device, triton, backend))
            checks = _GroupChecks(group)
            checks.remember_hyper(group)
            self.groups.append(_Group(group, params, checks, group_plan, runs, [bucket for _, bucket in buckets]))
        #: Every parameter a step updates (a RotationMonitor's telemetry request covers them).
        self.params = [p for _, bucket in (entry for buckets in by_group.values() for entry in buckets) for p in bucket]
        #: Triton buckets: a monitored step (row-wise tables) takes the validation path.
        self.launches_from_python = any(triton is not None for g in self.groups for _, triton, _ in g.runs)
        #: Whether the C++ kernels of every device here gather direction statistics (else a step
        #: that a monitor wants them of takes the validation path).
        self.kernel_statistics = all(p.device.type in cpp.STATISTICS for p in self.params)
        # A monitored step's telemetry: one flat (N, 4) buffer per device, each parameter's rows at
        # a fixed offset its bucket's plan is told once; a step then makes no view per tensor
        # (10,000 views cost more than the step) and a record makes them when it is read.
        from ..reference.telemetry import telemetry_rows

        self.telemetry_layout = {}  # device -> (its parameters, their row counts)
        offsets, used = {}, {}  # id(param) -> its first row; device -> rows so far
        for p in self.params:
            params, rows = self.telemetry_layout.setdefault(p.device, ([], []))
            offsets[id(p)] = used.get(p.device, 0)
            params.append(p)
            rows.append(telemetry_rows(p))
            used[p.device] = offsets[id(p)] + rows[-1]
        for cached in self.groups:
            for index, ((_, triton, _), bucket) in enumerate(zip(cached.runs, cached.bucket_params)):
                if triton is None:
                    cached.plan.set_telemetry_layout(index, [offsets[id(p)] for p in bucket],
                                                     [telemetry_rows(p) for p in bucket])
        self.state = state
        self.state_keys = list(state)
        self.state_dicts = list(state.values())
        self.state_columns = [(keys, dicts, values) for keys, (dicts, values) in columns.items()]
        checks = cpp.object_checks()
        self.checks = checks.same_objects, checks.same_items, checks.same_columns
        return self

    def usable(self, optimizer) -> bool:
        """Whether nothing the validated step depended on changed (see the module docstring)."""
        groups = optimizer.param_groups
        if len(groups) != len(self.groups):
            return False
        same_objects, same_items, same_columns = self.checks
        for group, cached in zip(groups, self.groups):
            if group is not cached.group or not same_objects(group["params"], cached.params):
                return False
            if not cached.checks.hyper_unchanged(group):
                return False
            try:
                optimizer._check_step_group(group)
            except ValueError:
                return False  # the validation path raises it, with the group's number
        # The parameters with state and their state dicts, in order (a dict replaced, removed, or
        # moved to another parameter shows here), then the state tensors the dicts hold.
        state = optimizer.state
        if state is not self.state or not same_items(state, self.state_keys, self.state_dicts):
            return False
        if not all(same_columns(dicts, keys, values) for keys, dicts, values in self.state_columns):
            return False
        codes = [cached.ready() for cached in self.groups]  # 0: no; bit 1: Triton gradients moved
        if not all(codes):
            return False
        # Triton tables: the gradients' new addresses (kept by the plan) into their column, before
        # any kernel runs; a CUDA table is also checked at every step (its stream, graph capture).
        for cached, code in zip(self.groups, codes):
            if code & 2 or cached.device_tables:
                moved = bool(code & 2)  # ready() compared them with the last ones, already in the tables
                for _, triton, _ in cached.runs:
                    if triton is not None and not triton.launch.table.set_column(1, triton.addresses, True, moved):
                        return False
        return True

    def telemetry_request(self, columns: int = 4):
        """A monitored step's buffers: ({device: flat (N, columns) float64 buffer, NaN until
        written}, the request a RotationMonitor records, whose per-parameter views are made when read)."""
        from ..telemetry import FlatRequest

        flats = {device: torch.full((sum(rows), columns), float("nan"), dtype=torch.float64, device=device)
                 for device, (_, rows) in self.telemetry_layout.items()}
        return flats, FlatRequest([(flats[device], params, rows)
                                   for device, (params, rows) in self.telemetry_layout.items()])

    def run(self, optimizer, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
            monitored: dict | None = None) -> None:
        """The step, after ``usable`` said yes. ``monitored``: a monitored step's flat telemetry
        buffers ({device: buffer}, ``telemetry_request``), which the C++ kernels fill in the
        update pass."""
        from ._base import _on

        try:
            for cached in self.groups:
                group = cached.group
                scale = optimizer._decay_lr_scale(group)
                for index, (device, triton, backend) in enumerate(cached.runs):
                    lr = optimizer._lr(group, device)
                    scaler = _on(grad_scale, device), _on(found_inf, device)
                    if triton is None:
                        lr_value, lr_tensor = (0.0, lr) if isinstance(lr, torch.Tensor) else (lr, None)
                        flat = monitored.get(device) if monitored else None
                        cached.run(index, lr_value, lr_tensor, scale, *scaler, flat)  # then lets its grads go
                        continue
                    # The bucket's own table (its gradient column set by ``usable``) and constants.
                    triton.launch(lr, scale, *scaler)
                    optimizer._advance_rng(triton.rngs, scaler[1])
        except BaseException:
            for cached in self.groups:
                cached.plan.release()  # no gradient is held past a failed step
            raise
        if self.finish:
            optimizer._fast_finish(self.finish, found_inf)
