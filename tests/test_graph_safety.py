"""What makes a step safe to capture in a CUDA graph, checked where it can be without a GPU: the
step's device tables stay the same from the first step on (a graph replays the tables it was
captured with), SGD's "no history yet" flag lives on the device and survives a step GradScaler
skipped, and maximize keeps torch's signed zeros. The captures themselves run in
tests/test_parity.py::test_cuda_graph_capture_and_replay on a GPU (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import math

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import clone_leaves, grad_stream, make_params

PAIRS = backend_device_pairs()
TRITON_DEVICES = [d for b, d in PAIRS if b == "triton"]

CLASSES = [
    (wdopt.FusedAdamW, dict(amsgrad=True)),
    (wdopt.FusedSGD, dict(momentum=0.9)),
    (wdopt.FusedSGD, dict(momentum=0.9, dampening=0.5)),
    (wdopt.FusedLion, {}),
    (wdopt.RotationalAdamW, dict(weight_decay=0.1)),
    (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1)),
    (wdopt.RotationalLion, dict(weight_decay=0.1)),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in CLASSES]


@pytest.mark.skipif(not TRITON_DEVICES, reason="the Triton backend is not available here")
@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_triton_tables_are_uploaded_once(monkeypatch, cls, kw):
    """Static gradients (zero_grad(set_to_none=False)): table uploads per step are 1, 0, 0, …
    for every class — a table that changed at step 2 (SGD's first-step flag used to) could not be
    captured after one warm-up step, and would be replayed stale if captured at step 1."""
    from wdopt.kernels import tables

    uploads = []
    upload = tables.DeviceTable._upload
    monkeypatch.setattr(tables.DeviceTable, "_upload", staticmethod(lambda *a: uploads.append(1) or upload(*a)))
    device = TRITON_DEVICES[0]
    shapes = [(6, 5), (3, 7), (4,)]
    params = clone_leaves(make_params(shapes, torch.float32, device))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = cls(params, lr=1e-2, backend="triton", **kw)
    counts = []
    for step_grads in grad_stream(shapes, 4, top=0):
        for p, g in zip(params, step_grads):
            p.grad.copy_(g)
        before = len(uploads)
        opt.step()
        counts.append(len(uploads) - before)
        opt.zero_grad(set_to_none=False)
    assert counts[0] >= 1 and counts[1:] == [0, 0, 0], counts


def _step_with_found_inf(opt, found_inf: float, device):
    """A step as GradScaler runs it on an optimizer that unscales in its kernels."""
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.tensor([found_inf], device=device)
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sgd_first_step_survives_a_skipped_step(backend, device):
    """GradScaler skips the very first step (inf gradients): the buffer still has no history, so
    the next step stores b = g as torch's SGD does (which never saw the skipped step); with
    dampening ≠ 0, b = μ·0 + (1 − dampening)·g would differ."""
    shapes = [(7,), (3, 5)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, 3, top=0)
    ours = clone_leaves(params)
    theirs = clone_leaves(params)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt = wdopt.FusedSGD(ours, backend=backend, **kw)
    opt_torch = torch.optim.SGD(theirs, foreach=False, **kw)
    for p in ours:
        p.grad = torch.full_like(p, float("inf"))
    _step_with_found_inf(opt, 1.0, device)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.float().to(device), g.float().to(device)
        _step_with_found_inf(opt, 0.0, device)
        opt_torch.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt_torch.state[q]["momentum_buffer"])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sgd_first_step_flag_is_device_state(backend, device):
    """The flag is a device tensor the kernels read, cleared after the step — not a host argument
    that a captured graph would freeze — and is not part of the state dict (torch interchange)."""
    p = torch.nn.Parameter(torch.randn(5, device=device))
    opt = wdopt.FusedSGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.randn(5, device=device)
    opt.step()
    buffer = opt.state[p]["momentum_buffer"]
    (flag,) = opt._flags.lookup([buffer])
    assert flag is not None and flag.device == p.device and float(flag) == 0.0
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}
    loaded = wdopt.FusedSGD([p], lr=0.1, momentum=0.9, backend=backend)
    loaded.load_state_dict(opt.state_dict())
    assert loaded._flags.lookup([loaded.state[p]["momentum_buffer"]]) == [None]  # history


@pytest.mark.parametrize("backend,device", PAIRS)
def test_maximize_keeps_the_sign_of_zero(backend, device):
    """maximize negates g exactly: −(+0) is −0 as in torch (Triton's ``-x`` lowered to 0 − x on
    some versions, which gives +0, seen on the first GPU run)."""
    p = torch.tensor([1.0, -2.0, 3.0], device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = wdopt.FusedSGD([p], lr=0.1, momentum=0.9, maximize=True, backend=backend)
    opt_torch = torch.optim.SGD([q], lr=0.1, momentum=0.9, maximize=True, foreach=False)
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    opt.step()
    opt_torch.step()
    assert torch.equal(torch.signbit(opt.state[p]["momentum_buffer"]), torch.signbit(opt_torch.state[q]["momentum_buffer"]))


@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in wdopt.available_backends("cuda"),
                    reason="needs a CUDA device and the Triton backend")
@pytest.mark.parametrize("cls,kw", CLASSES[:4], ids=IDS[:4])
def test_captured_tables_outlive_the_cache(cls, kw):
    """A graph replays the table addresses it captured: dropping every cached table (as replacing
    or evicting a bucket's entry does) and reusing the freed memory must not change the replay."""
    import gc

    from wdopt.kernels import tables

    shapes = [(7,), (1023,), (33, 17)]
    params = make_params(shapes, torch.float32, "cuda")
    grads = grad_stream(shapes, 4, top=0)
    ours = clone_leaves(params)
    static = [torch.zeros_like(p) for p in ours]
    for p, g in zip(ours, static):
        p.grad = g
    opt = cls(ours, lr=torch.tensor(1e-2, device="cuda"), capturable=True, backend="triton", **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, src in zip(static, grads[0]):
            g.copy_(src)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    tables._CACHE.clear()
    gc.collect()
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 12,), -1, dtype=torch.int64, device="cuda") for _ in range(256)]  # reuse freed blocks
    for step_grads in grads[1:]:
        for g, src in zip(static, step_grads):
            g.copy_(src)
        graph.replay()
    torch.cuda.synchronize()
    del junk
    expected = clone_leaves(params)
    opt_expected = cls(expected, lr=float(torch.tensor(1e-2)), backend="reference", **kw)
    for step_grads in grads:
        for p, g in zip(expected, step_grads):
            p.grad = g.float().cuda()
        opt_expected.step()
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p, q)


SYNCING = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero")


ROTATIONAL_OPTIONS = [
    (wdopt.RotationalAdamW, dict(weight_decay=0.1, decay_scaling="schedule")),
    (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1, mode="projected")),
    (wdopt.RotationalLion, dict(weight_decay=0.1, per_neuron=False)),  # monitored: telemetry from a snapshot
    (wdopt.RotationalAdamW, dict(weight_decay=0.1, target_rotation=0.01)),
]
ROTATIONAL_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for cls, kw in ROTATIONAL_OPTIONS]


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in PAIRS if b != "reference"])
@pytest.mark.parametrize("cls,kw", CLASSES + [
    (wdopt.FusedAdamW, dict(weight_decay=0.1, decay_scaling="schedule")),
    (wdopt.FusedSGD, dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True, decay_scaling="schedule"))]
    + ROTATIONAL_OPTIONS, ids=IDS + ["FusedAdamW-schedule", "FusedSGD-schedule"] + ROTATIONAL_IDS)
@pytest.mark.parametrize("monitored", [False, True], ids=["plain", "monitored"])
def test_capturable_step_reads_nothing_on_the_host(monkeypatch, backend, device, cls, kw, monitored):
    """capturable=True with a tensor lr: after the first step (which creates state), a step reads no
    tensor value on the host — on a GPU each such read is a device sync, and inside a graph capture an
    error. Checked here by making every Python-level read raise (gpu_acceptance.py's sync_free check
    does it on the GPU with torch.cuda.set_sync_debug_mode). The rotational optimizers compute their
    rate on the device (``_Rotational._rate_tensor``) and their kernels read it there."""
    params = clone_leaves(make_params([(6, 5), (4,)], torch.float32, device))
    opt = cls(params, lr=torch.tensor(1e-2, device=device), capturable=True, backend=backend, **kw)
    # A scheduler sets initial_lr (a tensor copy of a tensor lr) and changes lr in place.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    monitor = wdopt.RotationMonitor(opt, every=1) if monitored else None
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()

    def refuse(self, *args, **kwargs):
        raise AssertionError("a host read of a tensor during a capturable step")

    scheduler.step()
    with monkeypatch.context() as m:
        for name in SYNCING:
            m.setattr(torch.Tensor, name, refuse)
        opt.step()
    if monitor is not None:  # records are read afterwards, on the host, as they may be
        assert monitor.last.as_dict()


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in PAIRS if b != "reference"])
@pytest.mark.parametrize("cls,kw", [
    (wdopt.RotationalAdamW, dict(weight_decay=0.1)),
    (wdopt.RotationalAdamW, dict(weight_decay=0.1, decay_scaling="schedule")),
    (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1)),
    (wdopt.RotationalLion, dict(weight_decay=0.3)),
    (wdopt.RotationalAdamW, dict(weight_decay=0.1, mode="projected")),
], ids=["adamw", "adamw-schedule", "sgd", "lion", "adamw-projected"])
def test_capturable_rotation_rate_has_the_host_bits(backend, device, cls, kw):
    """The rate a capturable rotational step computes on the device (η_r² or lr, root in the kernel)
    moves the weights exactly as the host's float rate does: same parameters and state, bit for bit,
    over steps whose lr changes (to 0 as well: no rotation) — so a CUDA graph replays the eager step."""
    shapes = [(6, 5), (3, 130), (4,)]
    lrs = [float(torch.tensor(v, dtype=torch.float32)) for v in (0.01, 0.0037, 0.0, 0.02)]
    host_params = clone_leaves(make_params(shapes, torch.float32, device))
    device_params = clone_leaves(host_params)
    host = cls(host_params, lr=lrs[0], backend=backend, **kw)
    on_device = cls(device_params, lr=torch.tensor(lrs[0], device=device), capturable=True, backend=backend, **kw)
    for step, lr in enumerate(lrs):
        host.param_groups[0]["lr"] = lr
        on_device.param_groups[0]["lr"].fill_(lr)
        for a, b, g in zip(host_params, device_params, grad_stream(shapes, 1, seed=step, top=0)[0]):
            a.grad = g.to(device=device, dtype=torch.float32)
            b.grad = a.grad.clone()
        host.step()
        on_device.step()
        for a, b in zip(host_params, device_params):
            assert torch.equal(a, b), f"step {step}: parameters differ"
    for a, b in zip(host_params, device_params):
        for key, value in host.state[a].items():
            assert torch.equal(value, on_device.state[b][key]), key


@pytest.mark.parametrize("cls,kw", [
    (wdopt.RotationalAdamW, dict(betas=(0.9, 0.999))), (wdopt.RotationalSGD, dict(momentum=0.9)),
    (wdopt.RotationalLion, dict(betas=(0.95, 0.98)))], ids=["adamw", "sgd", "lion"])
@pytest.mark.parametrize("scaling", ["lr", "schedule"])
def test_device_rate_is_the_host_angle_squared(cls, kw, scaling):
    """η_r² computed on the device for random lr, λ and initial lr: its correctly rounded root is
    the host's η_r exactly (the kernels take that root), and lr ≤ 0 or NaN gives no rotation."""
    gen = torch.Generator().manual_seed(0)
    if scaling == "schedule" and cls is wdopt.RotationalSGD:
        kw = dict(kw, decoupled_weight_decay=True)
    opt = cls([torch.randn(4, 3, generator=gen)], lr=torch.tensor(0.01), capturable=True, weight_decay=0.1,
              decay_scaling=scaling, **kw)
    group = opt.param_groups[0]
    for _ in range(300):
        u = torch.rand(3, generator=gen, dtype=torch.float64)
        group["lr"] = torch.tensor(float(10 ** (-5 * u[0])), dtype=torch.float32)
        group["weight_decay"] = float(10 ** (-3 * u[1]))
        group["decay_initial_lr"] = float(10 ** (-4 * u[2]))
        rate = opt._rate_tensor(group, torch.device("cpu"))
        assert rate.dtype == torch.float64 and rate.dim() == 0
        assert math.sqrt(rate.item()) == opt._angle(group)
    for lr in (0.0, -1e-3, math.nan):
        group["lr"] = torch.tensor(lr)
        assert opt._rate_tensor(group, torch.device("cpu")).item() == 0.0 == opt._angle(group)
