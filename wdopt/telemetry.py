"""RotationMonitor: rotation telemetry of any wdopt optimizer, measured inside its kernels.

    monitor = wdopt.RotationMonitor(optimizer, every=10, names=dict(model.named_parameters()))
    ...  # train as usual
    monitor.last.as_dict()        # {"step": 120, "tensors": {"conv1.weight": {...}, ...}}
    monitor.last.neurons("conv1.weight")["angular_update"]   # one value per neuron (a tensor)

On every ``every``-th step the optimizer's kernels also sum, per row (neuron) of each parameter,
‖ω‖², ⟨ω,Δω⟩, ‖Δω‖² and ‖g‖² while they update it (wdopt/reference/telemetry.py, docs/theory.md
section 5), so a monitored step reads no extra memory; backends whose kernels cannot (the
reference, strided or complex buckets) measure from snapshots instead. The sums stay on the
device until read: on the kernels' path, recording never synchronises the host.

Any number of monitors can watch one optimizer; the buffers are made inside ``step()`` after its
closure ran, for the parameters that then have gradients, and a step that raises records nothing.

Per tensor and per neuron a record gives the weight norm, the angular update (the angle between
ω before and after the step, atan2 form), the relative update ‖Δω‖/‖ω‖ and ‖g‖·‖ω‖ (for a
scale-invariant tensor, the norm of its gradient at unit weight norm), next to the predicted
equilibrium norm and angular update of ``wdopt.theory`` (rotational optimizers: their frozen norm
and target angle). Rows are the first dimension of tensors with dim ≥ 2; other tensors are one row.
"""

from __future__ import annotations

import math
import torch

from . import theory
from .reference import telemetry as tm

__all__ = ["RotationMonitor", "Record"]


class Record:
    """The telemetry of one optimizer step: raw per-row sums per tensor (``sums``: name -> (K, 4)
    float64 on the parameter's device), and what the predictions need. Built lazily from the
    step's buffers, so that recording a step costs no per-tensor Python work."""

    def __init__(self, step: int, request: dict, layout: list, names, found_inf: torch.Tensor | None = None,
                 read_timeout: float = 300.0, monitor: int = 0, statistics: dict | None = None,
                 with_statistics: bool = False):
        self.step = step
        self.read_timeout = read_timeout  # seconds a read waits for the other ranks (DTensors)
        self.monitor = monitor  # its monitor's creation number in this process
        self.registered: set = set()  # store keys this rank added itself to (see _all_ranks_read)
        self.found_inf = found_inf  # GradScaler's flag: the step was skipped when non-zero
        self._request = request  # id(param) -> buffer
        self._statistics_request = statistics  # id(param) -> (K, 4) direction statistics, or None
        self._with_statistics = with_statistics  # its monitor asked for them
        self._statistics: dict | None = None
        self.optimizer_kind = None  # the optimizer's direction statistics kind ("adamw", "sgd", "lion")
        self._layout = layout  # per group: (its hyperparameters at this step, its parameters)
        self._names = names  # (param, group index, param index) -> name
        self._sums: dict | None = None
        self._predictions: dict | None = None

    def _build(self) -> None:
        sums, predictions, statistics = {}, {}, {}
        joined: set = set()  # meshes whose ranks are known to read this record
        for gi, (hyper, params) in enumerate(self._layout):
            for pi, p in enumerate(params):
                if id(p) in self._request and p.numel() > 0:  # an empty tensor has nothing to measure
                    name = self._names(p, gi, pi)
                    buffer = self._request[id(p)]
                    sums[name] = buffer[:, :tm.COLUMNS]
                    if buffer.shape[1] > tm.COLUMNS and self._with_statistics:
                        statistics[name] = buffer[:, tm.COLUMNS:]
                    elif self._statistics_request is not None and id(p) in self._statistics_request:
                        statistics[name] = self._statistics_request[id(p)]
                    if hasattr(p, "_local_tensor") and hasattr(p, "device_mesh"):
                        _all_ranks_read(p.device_mesh, self, joined)
                        sums[name] = _across_ranks(p, sums[name])
                    if p.dim() >= 2:
                        predictions[name] = (hyper, p)
        self._sums, self._predictions, self._statistics = sums, predictions, statistics

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        if self._sums is None:
            self._build()
        return self._sums

    @property
    def statistics(self) -> dict[str, torch.Tensor]:
        """name -> (K, 4) float64 direction statistics [Σn², Σn·s, Σω·n, Σs²] per row
        (wdopt/reference/telemetry.py), for a monitor made with ``statistics=True``; else empty."""
        if self._statistics is None:
            self._build()
        return self._statistics

    def hyperparameters(self, name: str) -> dict:
        """The hyperparameters of ``name``'s group at this step (a tensor lr read as a float)."""
        group = dict(self.predictions[name][0][1])
        for key in ("lr", "initial_lr", "decay_initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
        return group

    @property
    def predictions(self) -> dict[str, tuple]:
        """name -> (the optimizer and its group's hyperparameters at this step, the parameter)."""
        if self._predictions is None:
            self._build()
        return self._predictions

    @property
    def skipped(self) -> bool:
        return self.found_inf is not None and bool(self.found_inf.item() != 0)

    def _values(self, name: str) -> torch.Tensor:
        if self.skipped:
            raise ValueError(f"step {self.step} was skipped (GradScaler found an inf): it has no telemetry")
        return self.sums[name].cpu()

    def neurons(self, name: str) -> dict[str, torch.Tensor]:
        """Per-neuron weight norm, angular update, relative update and ‖g‖·‖ω‖ (CPU float64)."""
        return tm.derived(self._values(name))

    def tensor(self, name: str) -> dict[str, float]:
        """Whole-tensor values, plus the RMS of the neuron norms and the mean neuron angle."""
        sums = self._values(name)
        whole = {k: float(v) for k, v in tm.derived(sums.sum(0)).items()}
        per = tm.derived(sums)
        whole["rows"] = sums.shape[0]
        whole["neuron_norm_rms"] = float(per["weight_norm"].pow(2).mean().sqrt())
        whole["neuron_angular_update_mean"] = float(per["angular_update"].mean())
        whole["neuron_angular_update_rms"] = float(per["angular_update"].pow(2).mean().sqrt())
        # E‖g̃‖² over neurons: what the SGD equilibrium norm needs (for scale-invariant neurons).
        whole["neuron_grad_norm_sq_unit_mean"] = float(per["grad_norm_x_weight_norm"].pow(2).mean())
        pred = _predict(*self.predictions[name], whole["neuron_grad_norm_sq_unit_mean"]) \
            if name in self.predictions else {}
        whole["predicted_norm"] = pred.get("norm")
        whole["predicted_angular_update"] = pred.get("angular_update")
        return whole

    def as_dict(self) -> dict:
        if self.skipped:
            return {"step": self.step, "skipped": True, "tensors": {}}
        return {"step": self.step, "skipped": False, "tensors": {name: self.tensor(name) for name in self.sums}}


_MONITORS = 0  # RotationMonitors made in this process


class RotationMonitor:
    """Record rotation telemetry of ``optimizer`` (any wdopt optimizer) every ``every`` steps.

    Args:
        optimizer: a wdopt optimizer (FusedAdamW, FusedSGD, FusedLion or a rotational variant).
        every: record steps every, 2·every, … (counted from the monitor's creation).
        names: {name: parameter} (e.g. ``dict(model.named_parameters())``) for readable keys;
            other parameters are named "group{i}.param{j}".
        keep: how many records to keep in ``history`` (None: all).
        read_timeout: seconds a read of a record waits for the other ranks (sharded parameters).
        statistics: also record each row's direction statistics (``Record.statistics``), which
            ``wdopt.theory.refined`` predicts the equilibrium from. The kernels of every
            backend gather them in their update pass with the four sums; buckets measured from
            snapshots (the reference backend, strided, complex or sparse ones) and the
            rotational optimizers read the gradients and the state before the update. Not for
            rotated or sharded (DTensor) parameters.

    Sharded parameters (DTensors: FSDP2, tensor parallelism) are measured on each rank's shard at
    the step, without communication; their per-row sums are summed across the mesh when a record
    is first read (``sums``, ``neurons``, ``tensor``, ``as_dict``), so that the numbers are those
    of the whole tensor. Reading such a record is a collective: every rank must read the same
    records in the same order; a rank left waiting raises after ``read_timeout`` seconds (before
    any collective: the process group stays usable).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 10, names: dict | None = None,
                 keep: int | None = None, read_timeout: float = 300.0, statistics: bool = False):
        from .optim._base import FusedOptimizer

        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"RotationMonitor needs a wdopt optimizer, got {type(optimizer).__name__}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.optimizer, self.every, self.keep = optimizer, every, keep
        self.read_timeout = read_timeout
        if not isinstance(statistics, bool):
            raise TypeError(f"statistics must be True or False, got {statistics!r}")
        self.statistics = statistics
        global _MONITORS
        _MONITORS += 1
        self.number = _MONITORS  # identifies its records across ranks (monitors made in the same order)
        self._names = {id(p): n for n, p in (names or {}).items()}
        self.steps = 0
        self.history: list[Record] = []
        optimizer._monitors.append(self)

    @property
    def last(self) -> Record | None:
        return self.history[-1] if self.history else None

    def name(self, p: torch.Tensor, group_index: int, param_index: int) -> str:
        return self._names.get(id(p), f"group{group_index}.param{param_index}")

    def remove(self) -> None:
        """Detach from the optimizer: its later steps are not recorded (nor measured)."""
        if self in self.optimizer._monitors:
            self.optimizer._monitors.remove(self)

    # ------------------------------------------------------------------ called by the optimizer's step

    def _due(self) -> bool:
        """Counts a step; whether this one is recorded."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # A replayed graph would neither count steps nor record: refuse rather than go silent.
            raise RuntimeError("wdopt.RotationMonitor cannot watch a step captured in a CUDA graph (its "
                               "every-N counter and records live on the host): call monitor.remove() before "
                               "capturing, and monitor eager steps")
        self.steps += 1
        return self.steps % self.every == 0

    def _record(self, optimizer, request: dict, found_inf: torch.Tensor | None, statistics: dict | None = None) -> None:
        """Keep this step's buffers (filled by the kernels) with what its predictions need: the
        groups' hyperparameters as they are now, and their parameter lists."""
        layout = [(self._hyper(optimizer, group), list(group["params"])) for group in optimizer.param_groups]
        record = Record(self.steps, request, layout, self.name, None if found_inf is None else found_inf.clone(),
                        self.read_timeout, self.number, statistics if self.statistics else None, self.statistics)
        record.optimizer_kind = optimizer._statistics_kind
        self.history.append(record)
        if self.keep is not None and len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]

    @staticmethod
    def _hyper(optimizer, group) -> tuple:
        """The group's hyperparameters as they are at this step. A tensor lr is copied on its device
        now (schedulers change it in place) and read on the host only when a record is read: a
        monitored step never waits for the device."""
        values = {k: v for k, v in group.items() if k != "params"}
        for key in ("lr", "initial_lr", "decay_initial_lr"):
            if isinstance(values.get(key), torch.Tensor):
                values[key] = values[key].detach().clone()
        return optimizer, values


class FlatRequest:
    """A monitored step's buffers as the step driver's fast path makes them: one flat (N, 4)
    buffer per device for ``params`` of ``rows`` rows each, in order. Read like the dict of
    ``telemetry_request`` (id of a parameter -> its (K, 4) view), whose views are made on the
    first read: making 10,000 views in a step would cost more than the step."""

    def __init__(self, parts: list[tuple[torch.Tensor, list, list]]):
        self._parts = parts
        self._views: dict | None = None

    def _dict(self) -> dict[int, torch.Tensor]:
        if self._views is None:
            self._views = {}
            for flat, params, rows in self._parts:
                self._views.update(zip(map(id, params), flat.split(rows)))
            self._parts = None
        return self._views

    def __contains__(self, key) -> bool:
        return key in self._dict()

    def __getitem__(self, key) -> torch.Tensor:
        return self._dict()[key]

    def get(self, key, default=None):
        return self._dict().get(key, default)


def telemetry_request(params: list[torch.Tensor], columns: int = tm.COLUMNS) -> dict[int, torch.Tensor]:
    """The buffers one monitored step fills: a (K, columns) float64 view per parameter (4 sums,
    8 with the direction statistics), one allocation per device, NaN until a kernel writes it.
    DTensors' buffers have the 4 sums only. A DTensor gets a buffer for the rows of its local
    shard (zeros for an empty shard), summed across ranks when a record is read; one whose rows
    are interleaved across ranks (``_StridedShard``) is not measured, nor is the rest of its bucket."""
    from .optim import _dtensor

    by_device: dict[torch.device, list] = {}
    request = {}
    for p in params:
        if _dtensor.is_dtensor(p):
            if not any(type(pl).__name__ == "_StridedShard" for pl in p.placements):
                lp = p._local_tensor
                rows = lp.shape[0] if p.dim() >= 2 else 1
                request[id(p)] = torch.full((rows, tm.COLUMNS), float("nan") if lp.numel() else 0.0,
                                            dtype=torch.float64, device=lp.device)
        elif type(p) is torch.Tensor or type(p) is torch.nn.Parameter or not hasattr(p, "placements"):
            by_device.setdefault(p.device, []).append(p)
    for device, group in by_device.items():
        rows = [p.shape[0] if p.dim() >= 2 and p.shape[0] > 0 else 1 for p in group]  # tm.telemetry_rows
        flat = torch.full((sum(rows), columns), float("nan"), dtype=torch.float64, device=device)
        for p, view in zip(group, flat.split(rows)):
            request[id(p)] = view
    return request


def _all_ranks_read(mesh, record: "Record", joined: set) -> None:
    """Wait until every rank of ``mesh`` reads ``record`` too, through the process group's store
    (not a collective: a rank reading alone raises after the monitor's ``read_timeout`` and leaves
    the process group usable). A record is known across ranks by its monitor's creation number
    and its step (the same on every rank of an SPMD program); a rank registers once per record, so
    that reading it again after a timeout waits for the others instead of counting twice."""
    import time

    import torch.distributed as dist

    ranks = tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))
    if ranks in joined or len(ranks) == 1:
        return
    joined.add(ranks)
    key = f"wdopt/RotationMonitor/{record.monitor}/{record.step}/{','.join(map(str, ranks))}"
    store = dist.distributed_c10d._get_default_store()
    if key in record.registered:
        count = store.add(key, 0)
    else:
        count = store.add(key, 1)
        record.registered.add(key)
    deadline = time.monotonic() + record.read_timeout
    while count < len(ranks):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"RotationMonitor: a record of sharded parameters sums their rows across ranks {list(ranks)} when "
                f"read (a collective), and only {count} of them read it within {record.read_timeout:g} s: every "
                "rank must read the same records (as_dict, tensor, neurons, sums) in the same order")
        time.sleep(0.005)
        count = store.add(key, 0)


def _across_ranks(p, local: torch.Tensor) -> torch.Tensor:
    """The (K, 4) sums of DTensor ``p`` from each rank's sums of its local shard: rows placed at
    the shard's global row offset, then summed over every mesh dimension that shards ``p`` (sums
    are additive over columns; shards of rows are disjoint). A collective (``_all_ranks_read``
    first made sure that every rank takes part)."""
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, p.placements
    rows = p.shape[0] if p.dim() >= 2 and p.shape[0] > 0 else 1
    out = torch.zeros(rows, tm.COLUMNS, dtype=torch.float64, device=local.device)
    start = compute_local_shape_and_global_offset(p.shape, mesh, placements)[1][0] if p.dim() >= 2 else 0
    out[start:start + local.shape[0]] = local
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard() and mesh.size(mesh_dim) > 1:
            dist.all_reduce(out, group=mesh.get_group(mesh_dim))
    return out


def _predict(hyper: tuple, p: torch.Tensor, grad_norm_sq_unit: float) -> dict:
    """Predicted equilibrium norm (per neuron) and angular update of ``p``, if the theory has one.
    SGD's needs E‖g̃‖²: the mean over neurons of ‖g‖²·‖ω‖² at this step (exact for scale-invariant rows)."""
    from .optim import FusedAdamW, FusedLion, FusedSGD

    optimizer, group = hyper
    if getattr(optimizer, "_is_rotational", None) is not None and optimizer._is_rotational(p, group):
        n = optimizer.state[p].get("rotational_norm")
        if n is not None and hasattr(n, "full_tensor"):
            n = n.full_tensor()  # a DTensor's rows: gathered (a collective, as the record's read)
        norm = float(n.double().pow(2).mean().sqrt()) if n is not None else None
        return {"norm": norm, "angular_update": optimizer._angle(group) if group["mode"] == "equilibrium" else None}
    d = theory.decay_fraction(group)
    if d <= 0:
        return {}
    # C counts real elements (a complex element is two).
    lr, c = float(group["lr"]), p.numel() // p.shape[0] * (2 if p.is_complex() else 1)
    if isinstance(optimizer, FusedAdamW):
        if group.get("amsgrad"):
            return {}  # the formula is Adam's; amsgrad's max changes the update size
        return theory.adamw_equilibrium(lr, d, c, group["betas"]).as_dict()
    if isinstance(optimizer, FusedLion):
        return theory.lion_equilibrium(lr, d, c, group["betas"]).as_dict()
    if isinstance(optimizer, FusedSGD) and not (group["decoupled_weight_decay"] or group["nesterov"]
                                                 or group["dampening"]):
        if math.isfinite(grad_norm_sq_unit) and grad_norm_sq_unit > 0:
            return theory.sgd_equilibrium(lr, d, grad_norm_sq_unit, group["momentum"]).as_dict()
    return {}
