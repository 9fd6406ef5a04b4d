"""Compensated bf16 parameters (``master_weight_bits=24|32``; wdopt/reference/rounding.py): the
encoding, every backend bit for bit against the reference, and the master weight's precision —
a 32-bit master follows an fp32 run exactly, a 24-bit one to its 16 significant bits."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import SMALL_SHAPES, grad_stream, interpreted, make_params
from wdopt import backends
from wdopt.reference import rounding as R

PAIRS = backend_device_pairs()


def test_split_and_combine():
    """32 bits: every fp32 word (of 200,000 spanning the range, and the special values) comes back
    exactly, with p the nearest bf16; 24 bits: within half of 2^-15 relative, p nearest to it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200000, generator=g) * 10.0 ** torch.randint(-35, 35, (200000,), generator=g).float()
    w = torch.cat([w, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, 1.5, 2.0**-133])])
    p, c = R.split(w, torch.int16)
    assert c.dtype == torch.int16
    assert torch.equal(R.combine(p, c).view(torch.int32), w.view(torch.int32))
    finite = torch.isfinite(p.float())
    assert ((p.float() - w).abs() <= (w.bfloat16().float() - w).abs())[finite].all()
    p8, c8 = R.split(w, torch.int8)
    w8 = R.combine(p8, c8)
    normal = torch.isfinite(w) & (w.abs() > 1e-37) & (w.abs() < 3e38)
    assert ((w8 - w).abs() <= w.abs() * 2.0**-16)[normal].all()
    assert torch.equal(R.combine(*R.split(w8, torch.int8)).view(torch.int32), w8.view(torch.int32))  # idempotent
    nan_p, nan_c = R.split(torch.tensor([float("nan")]), torch.int16)
    assert torch.isnan(nan_p).all() and nan_c.item() == 0


CASES = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamw-amsgrad": (wdopt.FusedAdamW, dict(lr=3e-3, weight_decay=0.5, amsgrad=True, maximize=True)),
    "sgd-nesterov": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgdw": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.5, weight_decay=0.1, decoupled_weight_decay=True)),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=1.0)),
}
SHAPES = SMALL_SHAPES + [(65537,)]


def _trajectory(cls, hyper, backend, device, shapes, bits, sr, steps=3, monitor=False):
    params = [p.requires_grad_(True) for p in make_params(shapes, torch.bfloat16, device)]
    opt = cls(params, backend=backend, master_weight_bits=bits, stochastic_rounding=sr, **hyper)
    opt.monitor = wdopt.RotationMonitor(opt, every=2) if monitor else None
    for grads in grad_stream(shapes, steps, top=0):
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=torch.bfloat16)
        opt.step()
    return params, opt


def _assert_identical(params_a, opt_a, params_b, opt_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a.detach().cpu().view(torch.int16), b.detach().cpu().view(torch.int16)), f"param {i}"
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert sorted(state_a) == sorted(state_b)
        for key in state_b:
            va, vb = state_a[key].cpu(), state_b[key].cpu()
            if va.dtype == torch.bfloat16:
                va, vb = va.view(torch.int16), vb.view(torch.int16)
            assert torch.equal(va, vb), f"param {i} state {key}"


_expected: dict = {}


def _cases():
    """Every (case, bits, stochastic rounding) on every backend; under the Triton interpreter (2-15 s
    a case) two of the four storages, one of each master width, stochastic rounding in one."""
    out = []
    for case in CASES:
        for bits, sr in ((32, False), (24, False), (24, True), (32, True)):
            for backend, device in PAIRS:
                if interpreted(backend, device) and (bits, sr) not in ((32, False), (24, True)):
                    continue
                out.append(pytest.param(case, bits, sr, backend, device, id=f"{case}-{bits}-{sr}-{backend}-{device}"))
    return out


@pytest.mark.parametrize("case,bits,sr,backend,device", _cases())
def test_every_backend_equals_the_reference_bit_for_bit(case, bits, sr, backend, device):
    """Parameters, corrections and every state tensor after 3 steps (a monitored one among them)
    on odd sizes: the reference's bits. A backend without compensation on this device says so."""
    cls, hyper = CASES[case]
    shapes = SMALL_SHAPES if interpreted(backend, device) else SHAPES
    if not backends.compensates(backends.load(backend), device):
        with pytest.raises(NotImplementedError, match="no compensated bf16"):
            _trajectory(cls, hyper, backend, device, shapes, bits, sr)
        return
    key = (case, bits, sr, device, tuple(shapes))
    if key not in _expected:
        _expected[key] = _trajectory(cls, hyper, "reference", device, shapes, bits, sr, monitor=True)
    params, opt = _trajectory(cls, hyper, backend, device, shapes, bits, sr, monitor=True)
    _assert_identical(params, opt, *_expected[key])
    assert opt.state[params[0]]["correction"].dtype == R.CORRECTION_DTYPES[bits]
    # Telemetry measures the master weights (the kernels' in-pass sums and the reference's
    # snapshots alike): sums of bf16 parameters would differ by far more than summation order.
    ours, theirs = opt.monitor.history[-1].sums, _expected[key][1].monitor.history[-1].sums
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name].cpu(), theirs[name].cpu(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "triton"])
def test_32_bit_master_follows_the_fp32_run_exactly(backend):
    """SGD without momentum keeps no state: with the same (bf16) gradients, the 32-bit master
    weights of bf16 parameters equal an fp32 run's parameters bit for bit, over 50 steps of
    updates and decay far below bf16's resolution; the bf16 parameters are their nearest values."""
    shapes = [(33, 17), (1023,)]
    hyper = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
    fp32 = [p.bfloat16().float().requires_grad_(True) for p in make_params(shapes)]
    comp = [p.detach().bfloat16().requires_grad_(True) for p in fp32]
    opt32 = wdopt.FusedSGD(fp32, backend=backend, **hyper)
    opt16 = wdopt.FusedSGD(comp, backend=backend, master_weight_bits=32, **hyper)
    for grads in grad_stream(shapes, 50, top=0):
        for a, b, g in zip(fp32, comp, grads):
            b.grad = (g * 1e-2).bfloat16()
            a.grad = b.grad.float()
        opt32.step()
        opt16.step()
    for a, b in zip(fp32, comp):
        master = opt16.master_weight(b)
        assert torch.equal(master.view(torch.int32), a.detach().view(torch.int32))
        assert torch.equal(b.detach(), R.split(master, torch.int16)[0])
        assert not torch.equal(b.detach().float(), master)  # the master holds what bf16 cannot


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "triton"])
def test_24_bit_master_keeps_decay_that_bf16_loses(backend):
    """Decay alone at d = 1e-4 per step: bf16 rounded to nearest does not move; a 24-bit master
    (half-ulp 2^-17 ≈ 7.6e-6 relative, below d) decays as fp32 does to its precision."""
    p0 = make_params([(4096,)])[0].bfloat16()
    out = {}
    for bits in (16, 24):
        p = p0.clone().requires_grad_(True)
        opt = wdopt.FusedSGD([p], lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True, backend=backend,
                             master_weight_bits=bits)
        for _ in range(100):
            p.grad = torch.zeros_like(p)
            opt.step()
        out[bits] = opt.master_weight(p)
    expected = p0.float() * (1 - 1e-4) ** 100  # -1%
    assert torch.equal(out[16], p0.float())
    # Each step rounds to 24 bits (at most 2^-16 relative): 100 of them bound the error, which
    # is far below the 1% the decay moved; averaged over elements it is 10x smaller still.
    assert ((out[24] - expected).abs() <= expected.abs() * 100 * 2.0**-16).all()
    assert abs((out[24] / expected).mean().item() - 1) < 1e-4


@pytest.mark.parametrize("cls,kw", [(wdopt.FusedAdamW, {}), (wdopt.FusedLion, {}), (wdopt.FusedSGD, dict(momentum=0.9))],
                         ids=["adamw", "lion", "sgd"])
def test_an_fp32_checkpoint_set_before_the_first_step_trains(cls, kw):
    """set_master_weight on a fresh optimizer (an fp32 checkpoint into a bf16 model), then steps:
    the same master weights and states as an optimizer whose parameters were bf16 with that fp32
    master all along (set after a first step with a zero learning rate)."""
    w32 = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    runs = []
    for warm in (False, True):
        p = torch.nn.Parameter(w32.bfloat16())
        opt = cls([p], lr=1e-2, weight_decay=0.1, master_weight_bits=32, backend="cpu", **kw)
        if warm:  # state made by a step that changes nothing, then the master set
            p.grad = torch.zeros_like(p)
            lr = opt.param_groups[0]["lr"]
            opt.param_groups[0]["lr"] = 0.0
            opt.step()
            opt.param_groups[0]["lr"] = lr
            for key, value in opt.state[p].items():  # forget the warm-up step's history
                if key in ("step", "exp_avg", "exp_avg_sq", "momentum_buffer"):
                    opt.state[p][key] = torch.zeros_like(value)
            opt.state[p].pop("momentum_buffer", None)
        opt.set_master_weight(p, w32)
        for step in range(3):
            p.grad = torch.randn(8, 300, generator=torch.Generator().manual_seed(step)).bfloat16()
            opt.step()
        runs.append((opt.master_weight(p), p.detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_rotational_optimizer_starts_from_a_master_set_before_its_first_step():
    """The rotational norm frozen at the first step is the fp32 master's, set before it."""
    w32 = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(w32.bfloat16())
    opt = wdopt.RotationalAdamW([p], lr=1e-2, weight_decay=0.1, master_weight_bits=32, backend="cpu", zero_mean=False)
    opt.set_master_weight(p, w32)
    p.grad = torch.randn(8, 300).bfloat16()
    opt.step()
    norms = opt.state[p]["rotational_norm"].reshape(-1)
    torch.testing.assert_close(norms, w32.norm(dim=1), rtol=1e-6, atol=0)
    assert not torch.allclose(norms, w32.bfloat16().float().norm(dim=1), rtol=1e-6, atol=0)  # not the bf16 rows


def test_sparse_gradients_refuse_what_torchs_sparse_ops_cannot_keep():
    """FusedSGD hands sparse gradients to torch's ops, which update a bf16 parameter without its
    correction and keep momentum as floats: refused before anything changes."""
    for options in (dict(master_weight_bits=32), dict(state_bits=8, momentum=0.9)):
        dense, sparse = torch.nn.Parameter(torch.randn(4, 8).bfloat16()), torch.nn.Parameter(torch.randn(4, 8).bfloat16())
        opt = wdopt.FusedSGD([dense, sparse], lr=0.1, backend="cpu", **options)
        dense.grad = torch.ones_like(dense)
        sparse.grad = torch.ones(4, 8).bfloat16().to_sparse()
        before = dense.detach().clone()
        with pytest.raises(RuntimeError, match="sparse gradient"):
            opt.step()
        assert torch.equal(dense.detach(), before)


def test_master_weight_export_and_import():
    """master_weight hands out the fp32 master; set_master_weight takes one (an fp32 checkpoint)
    and a torch.optim run started from the export continues from the same weights."""
    cls, hyper = CASES["adamw"]
    params, opt = _trajectory(cls, hyper, "reference", "cpu", [(33, 17)], 32, False)
    master = opt.master_weight(params[0])
    assert master.dtype == torch.float32 and not torch.equal(master, params[0].detach().float())
    fresh = torch.randn(33, 17)
    opt.set_master_weight(params[0], fresh)
    assert torch.equal(opt.master_weight(params[0]), fresh)
    assert torch.equal(params[0].detach(), fresh.bfloat16())
    torch_param = torch.nn.Parameter(opt.master_weight(params[0]))
    torch.optim.AdamW([torch_param], **hyper)  # an fp32 model from the export
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_master_weight(torch.zeros(2, requires_grad=True), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        opt.set_master_weight(params[0], torch.zeros(2))


def test_state_dict_resumes_and_precision_can_change():
    cls, hyper = CASES["sgdw"]
    shapes = [(33, 17)]
    full, full_opt = _trajectory(cls, hyper, "reference", "cpu", shapes, 24, True, steps=4)
    half, half_opt = _trajectory(cls, hyper, "reference", "cpu", shapes, 24, True, steps=2)
    saved = half_opt.state_dict()
    assert saved["state"][0]["correction"].dtype == torch.int8
    resumed_params = [p.detach().clone().requires_grad_(True) for p in half]
    resumed = cls(resumed_params, backend="reference", **hyper)
    resumed.load_state_dict(saved)
    for grads in grad_stream(shapes, 4, top=0)[2:]:
        resumed_params[0].grad = grads[0].bfloat16()
        resumed.step()
    _assert_identical(resumed_params, resumed, full, full_opt)
    # A 24-bit master widened to 32 bits keeps its value; set back to 16 bits, the correction goes.
    before = resumed.master_weight(resumed_params[0])
    resumed.param_groups[0]["master_weight_bits"] = 32
    resumed_params[0].grad = torch.zeros_like(resumed_params[0])
    resumed.param_groups[0]["lr"] = 0.0
    resumed.step()
    assert resumed.state[resumed_params[0]]["correction"].dtype == torch.int16
    assert torch.equal(resumed.master_weight(resumed_params[0]), before)
    resumed.param_groups[0]["master_weight_bits"] = 16
    resumed.step()
    assert "correction" not in resumed.state[resumed_params[0]]


def test_bad_combinations_are_refused():
    for dtype in (torch.float32, torch.float16, torch.float64):
        with pytest.raises(ValueError, match="compensates bfloat16 parameters"):
            wdopt.FusedAdamW([torch.zeros(3, dtype=dtype, requires_grad=True)], master_weight_bits=32)
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    for bits in (8, 20, "32", True):
        with pytest.raises(ValueError, match="master_weight_bits"):
            wdopt.FusedLion([p], master_weight_bits=bits)
    opt = wdopt.FusedSGD([p], master_weight_bits=32, backend="reference")
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["correction"] = torch.zeros(3, dtype=torch.int32)
    opt.__setstate__(opt.__getstate__())
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="'correction'.*int16 or int8"):
        opt.step()
    assert torch.equal(p, before)


def test_a_parameter_with_gaps_in_memory_keeps_its_master_weight():
    """A strided view (not dense) with a 24-bit master: its correction is row-major (the kernels
    work on a contiguous copy of such a parameter) and later steps accept it; cpu equals the
    reference bit for bit over three steps."""
    out = []
    for backend in ("reference", "cpu"):
        base = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)).bfloat16()
        p = base[:, ::2]
        opt = wdopt.FusedAdamW([p], lr=1e-2, weight_decay=0.1, master_weight_bits=24, stochastic_rounding=True,
                               backend=backend)
        for step in range(3):
            p.grad = torch.randn(6, 20, generator=torch.Generator().manual_seed(step)).bfloat16()
            opt.step()
        out.append((p.clone(), opt.state[p]["correction"].clone(), base.clone()))
    (p0, c0, b0), (p1, c1, b1) = out
    assert torch.equal(p0.view(torch.int16), p1.view(torch.int16)) and torch.equal(c0, c1)
    assert torch.equal(b0[:, 1::2], b1[:, 1::2])  # the gaps untouched


def test_a_changed_memory_format_is_refused_with_a_recipe_that_works():
    """A compensated parameter turned channels-last after its correction was made: the step is
    refused before anything changes, and the error's recipe keeps the master weight whole."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(torch.bfloat16))
    opt = wdopt.FusedAdamW([w], lr=1e-2, master_weight_bits=32)
    w.grad = torch.randn_like(w)
    opt.step()
    master = opt.master_weight(w)
    w.data = w.data.to(memory_format=torch.channels_last)
    w.grad = w.grad.to(memory_format=torch.channels_last)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="memory format changed") as error:
        opt.step()
    assert torch.equal(w, before)
    assert "opt.set_master_weight(p, w)" in str(error.value)
    p = w
    w_ = opt.master_weight(p)
    del opt.state[p]["correction"]
    opt.set_master_weight(p, w_)
    assert torch.equal(opt.master_weight(p), master)
    assert opt.state[p]["correction"].stride() == p.stride()
    opt.step()  # and it steps again
    assert not torch.equal(opt.master_weight(p), master)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_a_parameter_whose_dtype_changed_under_its_correction_is_refused(backend, dtype):
    """bf16 with a 24-bit master and 8-bit states (whose codes do not show the parameter's dtype),
    then p.data cast to fp16 or fp32: the next step refuses before anything changes (the
    reference combined fp16 bits with the correction as if they were bf16). With the group set
    back to master_weight_bits=16 the correction is dropped and the step runs."""
    if backend not in wdopt.available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    g = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(300, generator=g).bfloat16())
    opt = wdopt.FusedAdamW([p], lr=1e-3, backend=backend, master_weight_bits=24, state_bits=8)
    for _ in range(2):
        p.grad = torch.randn(300, generator=g).bfloat16()
        opt.step()
    p.data = p.data.to(dtype)
    p.grad = torch.randn(300, generator=g).to(dtype)
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match="its dtype changed after the state was made"):
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    opt.param_groups[0]["master_weight_bits"] = 16
    opt.step()
    assert "correction" not in opt.state[p] and torch.isfinite(p).all()
