"""8-bit optimizer states (``state_bits=8``; wdopt/reference/quantization.py): the codes and
their rounding, the states' accuracy against fp32 training, the second moment's decay after the
gradient scale drops, and the conversions to and from torch.optim's layout."""

from __future__ import annotations

import copy

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import grad_stream, make_params
from wdopt import backends
from wdopt.reference import quantization as Q
from wdopt.reference import rounding as R

PAIRS = backend_device_pairs()


def _values(n, signed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** (-4 * torch.rand(n, generator=g))  # 4 decades per block
    return x if signed else x * x


@pytest.mark.parametrize("code", [torch.int8, torch.uint8], ids=str)
def test_codes_bracket_and_round(code):
    """Each value is encoded to one of the two codes whose decoded values bracket it: the nearer
    one to nearest; with random words, up with the probability that keeps it unbiased. The block's
    largest magnitude is exact, and zero stays zero."""
    signed = code == torch.int8
    x = _values(1000, signed)
    x[3] = 0.0
    like = torch.empty(1000)
    codes, scales = Q.encode(x, code, like)
    assert codes.dtype == code and scales.shape == (4,)
    y = Q.decode(codes, scales)
    s = scales.repeat_interleave(Q.BLOCK)[:1000]
    top = Q.SIGNED_MAX if signed else Q.UNSIGNED_MAX
    q = codes.to(torch.int64).abs()
    lo = Q._decode_flat(torch.clamp(q - 1, min=0), s, signed).abs()
    hi = Q._decode_flat(torch.clamp(q + 1, max=top), s, signed).abs()
    # exp_avg_sq's floor: a nonzero value below the smallest code's takes that code, never 0
    floor = (x != 0) & (x.abs() < Q._decode_flat(torch.ones_like(q), s, signed).abs()) if not signed \
        else torch.zeros(1000, dtype=torch.bool)
    assert torch.equal(q[floor], torch.ones_like(q[floor]))
    assert signed or floor.any()  # the case is exercised
    # nearest elsewhere: no neighbouring code's value is closer
    rest = ~floor
    assert ((y - x).abs() <= (lo - x.abs()).abs() + 1e-30)[rest].all()
    assert ((y - x).abs() <= (hi - x.abs()).abs() + 1e-30)[rest].all()
    assert y[3] == 0 and torch.equal((y.sign() * x.sign() >= 0), torch.ones(1000, dtype=torch.bool))
    for b in range(4):
        block = slice(b * Q.BLOCK, min(1000, (b + 1) * Q.BLOCK))
        k = x[block].abs().argmax()
        assert y[block][k].abs() == scales[b] == x[block].abs().max()
    acc = torch.zeros(1000, dtype=torch.float64)
    draws = 400
    for count in range(draws):
        bits = R.element_bits(R.stream(9, count, 2), torch.arange(1000))
        c2, s2 = Q.encode(x, code, like, bits)
        acc += Q.decode(c2, s2).double()
    spread = (hi - lo).double() / draws**0.5  # a draw's error is below one code step
    assert ((acc / draws - x.double()).abs() <= 3 * spread + 1e-12)[rest].all()


def test_non_finite_values_poison_their_block_only():
    x = _values(600, True)
    x[5], x[300] = float("nan"), float("inf")
    codes, scales = Q.encode(x, torch.int8, torch.empty(600))
    y = Q.decode(codes, scales)
    assert torch.isnan(y[:512]).all() and torch.isfinite(y[512:]).all()


CASES = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamw-amsgrad": (wdopt.FusedAdamW, dict(lr=3e-3, weight_decay=0.5, amsgrad=True)),
    "sgd": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=1.0)),
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("case", list(CASES))
def test_backends_without_8_bit_states_say_so(case, backend, device):
    cls, hyper = CASES[case]
    p = torch.zeros(5, device=device, requires_grad=True)
    opt = cls([p], backend=backend, state_bits=8, **hyper)
    p.grad = torch.ones_like(p)
    if backends.quantizes(backends.load(backend), device):
        opt.step()
        assert opt.state[p][next(iter(opt._quantized_states))].dtype in Q.CODE_DTYPES
    else:
        with pytest.raises(NotImplementedError, match="no 8-bit states"):
            opt.step()


# Storages of the bit-for-bit test: (dtype, stochastic rounding, master_weight_bits).
STORAGES = {"fp32": (torch.float32, False, 16), "fp32-sr": (torch.float32, True, 16),
            "bf16-sr": (torch.bfloat16, True, 16), "fp16": (torch.float16, False, 16),
            "bf16-master24-sr": (torch.bfloat16, True, 24), "bf16-master32": (torch.bfloat16, False, 32)}
# Odd sizes: partial last blocks, a tensor of one block and one element, 65,537 elements (blocks
# split between threads), a channels_last tensor (blocks in memory order).
BLOCK_SHAPES = [(33, 17), (1023,), (7,), (256,), (1,), (65537,), (3, 5, 7, 11)]


def _quantized_run(cls, hyper, backend, storage, steps=4, device="cpu"):
    dtype, sr, bits = STORAGES[storage]
    params = [p.to(dtype).requires_grad_(True) for p in make_params(BLOCK_SHAPES, device=device)]
    params[-1] = params[-1].detach().to(memory_format=torch.channels_last).requires_grad_(True)
    opt = cls(params, backend=backend, state_bits=8, stochastic_rounding=sr, master_weight_bits=bits, **hyper)
    monitor = wdopt.RotationMonitor(opt, every=2, statistics=True)
    for grads in grad_stream(BLOCK_SHAPES, steps, top=0):
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=dtype)
            if p.dim() == 4:
                p.grad = p.grad.to(memory_format=torch.channels_last)
        opt.step()
    return params, opt, monitor


_reference_runs: dict = {}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


# The interpreted Triton kernels cost ~2.5 s a run: a cover of every storage, optimizer, lane
# (amsgrad's third, stochastically) and the 5-byte configuration, instead of every pair.
TRITON_COVER = {("adamw", "bf16-master24-sr"), ("adamw-amsgrad", "fp32-sr"), ("adamw-amsgrad", "fp16"),
                ("sgd", "bf16-sr"), ("sgd", "bf16-master32"), ("lion", "fp32")}


@pytest.mark.parametrize("backend,device,case,storage",
                         [(b, d, c, s) for b, d in PAIRS if b != "reference" for c in CASES
                          for s in STORAGES if (b, d) != ("triton", "cpu") or (c, s) in TRITON_COVER])
def test_kernels_equal_the_reference_bit_for_bit(backend, device, case, storage):
    """Parameters, corrections, codes, block scales and step counts after 4 steps (two of them
    monitored with direction statistics) on odd sizes: the reference's bits; telemetry to
    summation order."""
    cls, hyper = CASES[case]
    if (case, storage) not in _reference_runs:
        _reference_runs[case, storage] = _quantized_run(cls, hyper, "reference", storage)
    params, opt, monitor = _quantized_run(cls, hyper, backend, storage, device=device)
    ref_params, ref_opt, ref_monitor = _reference_runs[case, storage]  # on the CPU: the same bits everywhere
    for i, (a, b) in enumerate(zip(params, ref_params)):
        assert torch.equal(_bits(a.detach().cpu()), _bits(b.detach())), f"param {i}"
        assert sorted(opt.state[a]) == sorted(ref_opt.state[b])
        for key, value in ref_opt.state[b].items():
            ours = opt.state[a][key]
            assert ours.dtype == value.dtype and ours.stride() == value.stride(), key
            assert torch.equal(_bits(ours.cpu()), _bits(value)), f"param {i} {key}"
    assert len(monitor.history) == len(ref_monitor.history) == 2
    ours, theirs = monitor.history[-1].sums, ref_monitor.history[-1].sums
    for name in theirs:
        torch.testing.assert_close(ours[name].cpu(), theirs[name], rtol=1e-5, atol=1e-12)


def _edge_gradients(scale: float, signed: bool) -> torch.Tensor:
    """Gradients whose first AdamW moments (betas (0, 0): m = g, v = g² rounded) sit on and next
    to every code's decoded value at block scale ``scale``, on the ties halfway between codes
    (exact ties in the ratio at scale 1), and below the first code, where it rounds linearly to 0
    or 1. Each run of 256 is a block with ``scale`` as its largest magnitude."""
    top = Q.SIGNED_MAX if signed else Q.UNSIGNED_MAX
    q = torch.arange(top + 1, dtype=torch.int64)
    edges = Q._decode_flat(q, torch.full((top + 1,), scale), signed).abs()
    # the midpoints: g(q) with bit 19 set, times the scale
    ties = R._floats(((Q.ONE - top + q[1:]) << Q.SHIFT) + (1 << (Q.SHIFT - 1))) * scale
    first = Q.first_code(signed) * scale
    linear = torch.cat([torch.tensor([0.25, 0.5, 0.75, 0.99]) * first, torch.tensor([1e-40, 1.4e-45])])  # + subnormals
    values = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, torch.full((), 2 * scale)),
                        ties, torch.nextafter(ties, torch.zeros(())), linear, torch.nextafter(linear, torch.zeros(()))])
    values = values[values <= scale]
    g = values if signed else values.sqrt()  # v = fl(g²): on or within a few ulps of the edges
    g = torch.where(torch.arange(g.numel()) % 2 == 0, g, -g) if signed else g
    blocks = list(g.split(Q.BLOCK - 1))
    peak = torch.tensor([scale if signed else scale**0.5])
    return torch.cat([torch.cat([b, peak]) for b in blocks])


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in PAIRS if b != "reference"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_codes_at_every_bracket_edge_equal_the_reference(backend, device, stochastic):
    """Every code's value, the ties between codes, the linear range below the first code and
    subnormal values, with their neighbouring floats, at scales from 1.5·2^126 (a subnormal
    reciprocal) to below fp32's smallest normal (a block stored as zeros), through a kernel: the
    same codes and scales as the reference's."""
    # 1.5·2^126: the reciprocal is subnormal; 2^-126: the smallest scale kept; 2e-39: stored as zeros
    grads = [_edge_gradients(scale, signed) for scale in (1.0, 3.7e-3, 1e-30, 1.5 * 2.0**126, 2.0**-126, 2e-39)
             for signed in (True, False)]
    grads = [g for g in grads if torch.isfinite(g).all()]
    runs = []
    for b in ("reference", backend):
        params = [torch.zeros(g.numel(), device=device if b == backend else "cpu", requires_grad=True) for g in grads]
        opt = wdopt.FusedAdamW(params, lr=1e-3, betas=(0.0, 0.0), weight_decay=0.0, backend=b, state_bits=8,
                               stochastic_rounding=stochastic)
        for p, g in zip(params, grads):
            p.grad = g.to(p.device)
        opt.step()
        runs.append((params, opt))
    (ref_params, ref_opt), (params, opt) = runs
    for i, (a, r) in enumerate(zip(params, ref_params)):
        assert torch.equal(a.detach().cpu(), r.detach()), f"param {i}"
        for key, value in ref_opt.state[r].items():
            assert torch.equal(_bits(opt.state[a][key].cpu()), _bits(value)), f"param {i} {key}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_follows_fp32_states(case, dtype):
    """30 steps on odd sizes: parameters with 8-bit states stay close to the same run with
    states in the parameter's dtype (relative to how far the parameters moved)."""
    cls, hyper = CASES[case]
    shapes = [(33, 17), (1023,), (7,), (600,)]
    runs = []
    for bits in (None, 8):
        params = [p.requires_grad_(True) for p in make_params(shapes, dtype)]
        opt = cls(params, backend="reference", state_bits=bits, stochastic_rounding=True, **hyper)
        for grads in grad_stream(shapes, 30, top=0):
            for p, g in zip(params, grads):
                p.grad = g.to(dtype)
            opt.step()
        runs.append(params)
    start = make_params(shapes, dtype)
    for a, b, p0 in zip(*runs, start):
        moved = (a.detach().double() - p0.double()).norm()
        assert (a.detach().double() - b.detach().double()).norm() <= 0.1 * moved + 1e-3


def test_exp_avg_sq_decays_after_the_gradient_scale_drops():
    """After a 10x drop in gradient scale, the 8-bit exp_avg_sq decays as the fp32 one does.
    Measured (β2 = 0.99, 4 time constants after the drop): stochastic rounding stays within 1% of
    the fp32 run's mean at every checkpoint (measured: +0.74%, +0.33%, +0.86%); to nearest, a decay
    of 1% per step is below the codes' spacing (6% and more), so the codes stick and follow their
    block's largest element, whose own average they then track (measured: +3.5%, +2.7%, -0.5%;
    bound 6%)."""
    n = 1024
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=g) * (1.0 if t < 100 else 0.1) for t in range(500)]
    checkpoints = (150, 300, 499)
    means = {}
    for name, bits, sr in (("fp32", None, False), ("8-bit", 8, False), ("8-bit stochastic", 8, True)):
        p = torch.zeros(n, requires_grad=True)
        opt = wdopt.FusedAdamW([p], lr=0.0, betas=(0.9, 0.99), weight_decay=0.0, backend="reference",
                               state_bits=bits, stochastic_rounding=sr)
        means[name] = []
        for t, grad in enumerate(grads):
            p.grad = grad
            opt.step()
            if t in checkpoints:
                state = opt.state[p]
                v = state["exp_avg_sq"] if bits is None else Q.decode(state["exp_avg_sq"], state["exp_avg_sq_block_scale"])
                means[name].append(v.double().mean().item())
    assert means["fp32"][-1] < 0.1 * means["fp32"][0]  # it did decay: the test can tell
    for name, tolerance in (("8-bit", 0.06), ("8-bit stochastic", 0.01)):
        for got, want in zip(means[name], means["fp32"]):
            assert abs(got / want - 1) < tolerance, (name, means)


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "triton"])
def test_heavy_tailed_gradients_take_bounded_steps(backend):
    """Per-element gradient scales spread over e^±9 within a block (g = randn·exp(3·randn), fixed
    per element): fp32 AdamW's steps stay near lr. Before exp_avg_sq's floor (a nonzero v never
    encodes to 0), an element 10^-5 below its block's largest kept v = 0 while its m rounded to a
    nonzero code, and stepped by m/ε: 3.6e6 × lr here. The first, sqrt-spaced code still left steps
    of tens of lr on a few elements in 10^4 (its lowest codes a factor 4 (m) and 16 (v) apart);
    this one's steps of 1/16–1/8 down to 2^-16 (m) and 2^-32 (v) of the block's largest keep every
    step within 1.2 × lr (measured; bound 5 × lr)."""
    g = torch.Generator().manual_seed(0)
    n, lr = 256 * 64, 1e-3
    scale = torch.exp(3.0 * torch.randn(n, generator=g))
    p = torch.zeros(n, requires_grad=True)
    opt = wdopt.FusedAdamW([p], lr=lr, weight_decay=0.0, backend=backend, state_bits=8, stochastic_rounding=True)
    worst, share = 0.0, 0.0
    for step in range(150):
        p.grad = torch.randn(n, generator=g) * scale
        before = p.detach().clone()
        opt.step()
        if step >= 50:
            u = (p.detach() - before).abs() / lr
            worst, share = max(worst, u.max().item()), max(share, (u > 10).float().mean().item())
    assert worst < 5 and share == 0, (worst, share)


def test_a_changed_memory_format_is_refused_then_converted():
    """Blocks are runs of the codes' memory: codes laid out otherwise than their parameter (its
    memory format changed after the first step) are refused before anything changes, and the
    message's recipe (through torch's layout) carries the states over to the new layout."""
    w = torch.nn.Parameter(torch.randn(4, 9, 3, 3))
    opt = wdopt.FusedAdamW([w], lr=1e-2, state_bits=8, backend="cpu")
    w.grad = torch.randn_like(w)
    opt.step()
    values = opt.to_torch_state_dict()["state"][0]["exp_avg"]
    w.data = w.data.to(memory_format=torch.channels_last)
    w.grad = torch.randn_like(w)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="memory format changed"):
        opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], before["state"][0]["exp_avg"])
    opt.load_state_dict(opt.to_torch_state_dict())
    opt.param_groups[0]["state_bits"] = 8
    assert torch.equal(opt.state[w]["exp_avg"], values)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.int8
    assert opt.state[w]["exp_avg"].stride() == w.stride()


@pytest.mark.parametrize("edit", ["swapped codes", "strided scales"])
def test_foreign_codes_and_scales_are_refused_before_any_group_changes(edit):
    a, b = torch.nn.Parameter(torch.ones(300)), torch.nn.Parameter(torch.ones(300))
    opt = wdopt.FusedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, state_bits=8, backend="cpu")
    a.grad, b.grad = torch.ones(300), torch.ones(300)
    opt.step()
    state = opt.state[b]
    if edit == "swapped codes":
        state["exp_avg_sq"] = state["exp_avg_sq"].view(torch.int8)
    else:
        state["exp_avg_block_scale"] = torch.stack([state["exp_avg_block_scale"]] * 2, dim=1)[:, 0]
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="codes"):
        opt.step()
    assert torch.equal(a.detach(), before)


def test_torch_state_dict_groups_drop_the_options():
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    opt = wdopt.FusedAdamW([p], lr=0.1, state_bits=8, master_weight_bits=24, stochastic_rounding=True, backend="cpu")
    p.grad = torch.ones_like(p)
    opt.step()
    group = opt.to_torch_state_dict()["param_groups"][0]
    assert (group["state_bits"], group["master_weight_bits"], group["stochastic_rounding"]) == (None, 16, False)
    plain = wdopt.FusedAdamW([p], lr=0.1, backend="cpu")
    plain.load_state_dict(opt.to_torch_state_dict())
    plain.step()
    assert sorted(plain.state[p]) == ["exp_avg", "exp_avg_sq", "step"]


def test_bf16_state_dict_keeps_float32_block_scales():
    """torch's load_state_dict casts a bf16 parameter's floating state to bf16: the block scales
    stay float32 (as saved) and the resumed run equals the uninterrupted one bit for bit."""
    params = [p.requires_grad_(True) for p in make_params([(300,)], torch.bfloat16)]
    opt = wdopt.FusedAdamW(params, state_bits=8, stochastic_rounding=True, backend="reference")
    params[0].grad = torch.randn(300, generator=torch.Generator().manual_seed(1)).bfloat16()
    opt.step()
    copy_ = params[0].detach().clone().requires_grad_(True)
    resumed = wdopt.FusedAdamW([copy_], state_bits=8, stochastic_rounding=True, backend="reference")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.state[copy_]["exp_avg_block_scale"].dtype == torch.float32
    for o, p in ((opt, params[0]), (resumed, copy_)):
        p.grad = torch.ones_like(p)
        o.step()
    assert torch.equal(params[0], copy_)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, resumed.state[copy_][key]), key


def test_state_dicts_move_to_and_from_torch_layout():
    """A torch.optim.AdamW state dict loads into an 8-bit FusedAdamW (quantized at its next
    step); ``to_torch_state_dict`` hands torch.optim float states back; an 8-bit state dict
    resumes bit for bit; switching state_bits off decodes the states."""
    shapes = [(33, 17), (300,)]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    params = [p.requires_grad_(True) for p in make_params(shapes)]
    torch_opt = torch.optim.AdamW(params, **hyper)
    for grads in grad_stream(shapes, 3, top=0):
        for p, g in zip(params, grads):
            p.grad = g.float()
        torch_opt.step()
    ours = wdopt.FusedAdamW(params, backend="reference", state_bits=8, **hyper)
    ours.load_state_dict(torch_opt.state_dict())
    ours.step()
    state = ours.state[params[0]]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg_block_scale"].shape == (Q.blocks(33 * 17),)
    exported = ours.to_torch_state_dict()
    assert sorted(exported["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert exported["state"][0]["exp_avg"].dtype == torch.float32
    back = torch.optim.AdamW([p.detach().clone().requires_grad_(True) for p in params], **hyper)
    back.load_state_dict(exported)
    torch.testing.assert_close(back.state_dict()["state"][0]["exp_avg"],
                               Q.decode(state["exp_avg"], state["exp_avg_block_scale"]))
    saved = copy.deepcopy(ours.state_dict())  # as torch.save/torch.load would (no tensor shared)
    resumed = wdopt.FusedAdamW([p.detach().clone().requires_grad_(True) for p in params], backend="reference",
                               **hyper)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.int8  # not cast by torch
    for opt in (ours, resumed):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
    for a, b in zip(ours.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_block_scale", "exp_avg_sq_block_scale"):
            assert torch.equal(ours.state[a][key], resumed.state[b][key])
    ours.param_groups[0]["state_bits"] = None
    ours.step()
    assert ours.state[params[0]]["exp_avg"].dtype == torch.float32 and "exp_avg_block_scale" not in ours.state[params[0]]


def test_bad_combinations_are_refused():
    for dtype in (torch.float64, torch.complex64):
        with pytest.raises(ValueError, match="state_bits=8 quantizes"):
            wdopt.FusedAdamW([torch.zeros(3, dtype=dtype, requires_grad=True)], state_bits=8)
    p = torch.zeros(3, requires_grad=True)
    for bits in (4, 16, "8", True):
        with pytest.raises(ValueError, match="state_bits"):
            wdopt.FusedSGD([p], state_bits=bits)
    with pytest.raises(ValueError, match="state_bits=8 quantizes"):  # rotational too (tests/test_rotational_quantized.py)
        wdopt.RotationalAdamW([torch.randn(4, 3, dtype=torch.float64, requires_grad=True)], state_bits=8)
    opt = wdopt.FusedLion([p], state_bits=8, backend="reference")
    p.grad = torch.ones_like(p)
    opt.step()
    del opt.state[p]["exp_avg_block_scale"]
    opt.__setstate__(opt.__getstate__())
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="block scales"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu"])
def test_a_skipped_step_changes_nothing(backend):
    """GradScaler found an inf: parameters, corrections, 8-bit codes and scales and the rounding
    streams keep their values (every low-precision option on, where the backend has it)."""
    module = backends.load(backend)
    options = dict(stochastic_rounding=True, master_weight_bits=24 if backends.compensates(module, "cpu") else 16,
                   state_bits=8 if backends.quantizes(module, "cpu") else None)
    params = [p.requires_grad_(True) for p in make_params([(33, 17), (300,)], torch.bfloat16)]
    opt = wdopt.FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = copy.deepcopy((params, opt.state_dict()))
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    opt.step()
    after = opt.state_dict()
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key


def test_a_bf16_8_bit_state_dict_that_went_through_torch_optim_resumes():
    """torch.optim casts a bf16 parameter's float32 block scales (and codes) to bf16: taken back,
    the codes as codes and the scales as float32 (their rounding kept), and the step runs."""
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = wdopt.FusedAdamW([p], lr=1e-2, state_bits=8, backend="cpu")
    p.grad = torch.randn(300).bfloat16()
    opt.step()
    codes = opt.state[p]["exp_avg"].clone()
    q = torch.nn.Parameter(p.detach().clone())
    relay = torch.optim.AdamW([q], lr=1e-2)
    relay.load_state_dict(opt.state_dict())
    assert relay.state[q]["exp_avg_block_scale"].dtype == torch.bfloat16  # what torch did to them
    back = wdopt.FusedAdamW([p], lr=1e-2, state_bits=8, backend="cpu")
    back.load_state_dict(relay.state_dict())
    assert torch.equal(back.state[p]["exp_avg"], codes)
    assert back.state[p]["exp_avg_block_scale"].dtype == torch.float32
    back.step()
    assert back.state[p]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_state_dict_of_the_first_code_loads_re_encoded(dtype):
    """wdopt's first 8-bit code kept its block scales in ``key + "_scale"`` (sqrt-spaced codes):
    such a state dict loads with its states decoded by that code (quantization.decode_legacy) and
    encoded in this one at once, to nearest, never held in the parameter's dtype (an fp16
    parameter would make exp_avg_sq's 1e6 inf); the next step runs from them as the reference
    does; the caller's dict is left as it was."""
    torch.manual_seed(0)
    p = torch.randn(300, dtype=dtype, requires_grad=True)
    opt = wdopt.FusedAdamW([p], lr=1e-3, state_bits=8)
    p.grad = torch.randn(300, dtype=dtype)
    opt.step()
    saved = opt.state_dict()
    state = saved["state"][0]
    legacy = {"exp_avg": torch.randint(-127, 128, (300,), dtype=torch.int8),
              "exp_avg_sq": torch.randint(0, 256, (300,), dtype=torch.uint8)}
    for key, codes in legacy.items():
        state[key] = codes
        del state[key + "_block_scale"]
        state[key + "_scale"] = torch.tensor([0.5, 3e-3] if key == "exp_avg" else [1e6, 3e-9], dtype=torch.float32)
    # the first code's values, by hand: q = ±127 is ±s, q = 64 is s·fl(4096/16129), v's q = 255 is s
    assert Q.decode_legacy(torch.tensor([127, -127, 64, 0], dtype=torch.int8), torch.tensor([0.5])).tolist() == \
        [0.5, -0.5, 0.5 * float(torch.tensor(4096.0) / 16129.0), 0.0]
    assert Q.decode_legacy(torch.tensor([255, 1], dtype=torch.uint8), torch.tensor([2.0]))[0] == 2.0
    expected = {key: Q.encode(Q.decode_legacy(state[key], state[key + "_scale"]), code.dtype, p.detach())
                for key, code in legacy.items()}
    q = torch.nn.Parameter(p.detach().clone())
    resumed = wdopt.FusedAdamW([q], lr=1e-3, state_bits=8)
    resumed.load_state_dict(saved)
    assert "exp_avg_scale" in saved["state"][0] and "exp_avg_block_scale" not in saved["state"][0]
    for key, (codes, scales) in expected.items():
        assert key + "_scale" not in resumed.state[q]
        assert torch.equal(resumed.state[q][key], codes)
        assert torch.equal(resumed.state[q][key + "_block_scale"], scales)
    assert torch.isfinite(Q.decode(*expected["exp_avg_sq"])).all() and expected["exp_avg_sq"][1][0] == 1e6
    reference = wdopt.FusedAdamW([torch.nn.Parameter(q.detach().clone())], lr=1e-3, state_bits=8, backend="reference")
    r = reference.param_groups[0]["params"][0]
    reference.load_state_dict(copy.deepcopy(saved))  # torch shares the dict's tensors (the step count)
    q.grad = torch.randn(300, dtype=dtype)
    r.grad = q.grad.clone()
    resumed.step()
    reference.step()
    assert torch.equal(q, r) and torch.isfinite(q).all()
    for key in legacy:
        assert torch.equal(resumed.state[q][key], reference.state[r][key])
        assert torch.equal(resumed.state[q][key + "_block_scale"], reference.state[r][key + "_block_scale"])


def test_a_first_code_state_dict_that_does_not_fit_is_refused():
    """First-code codes of the wrong kind (unsigned under a signed state) or with too few or too
    many block scales: a clear error, and the optimizer's state unchanged; a state with both
    kinds of scales keeps the new one."""
    p = torch.nn.Parameter(torch.randn(300))
    opt = wdopt.FusedAdamW([p], lr=1e-3, state_bits=8)
    p.grad = torch.randn(300)
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state[p])
    bad = copy.deepcopy(saved)
    bad["state"][0]["exp_avg"] = torch.zeros(300, dtype=torch.uint8)
    bad["state"][0]["exp_avg_scale"] = bad["state"][0].pop("exp_avg_block_scale")
    with pytest.raises(RuntimeError, match="torch.uint8 codes"):
        opt.load_state_dict(bad)
    for scales in (torch.ones(1), torch.ones(3)):
        bad = copy.deepcopy(saved)
        bad["state"][0]["exp_avg_scale"] = scales
        del bad["state"][0]["exp_avg_block_scale"]
        with pytest.raises(RuntimeError, match="block scales"):
            opt.load_state_dict(bad)
    assert all(torch.equal(before[k], opt.state[p][k]) for k in before)
    both = copy.deepcopy(saved)
    both["state"][0]["exp_avg_scale"] = torch.ones(2)
    opt.load_state_dict(both)
    assert "exp_avg_scale" not in opt.state[p] and torch.equal(opt.state[p]["exp_avg_block_scale"],
                                                               saved["state"][0]["exp_avg_block_scale"])


def test_values_no_step_writes_are_refused_at_load():
    """A state dict whose values no step could have written (a corrupted or hand-edited one): a
    negative, infinite or subnormal block scale, the int8 code -128, a negative rng count or index
    base. Each is refused at load with an error naming it, and the optimizer keeps its state;
    a NaN scale (a poisoned block) and a zero one (an all-zero block) load."""
    p = torch.nn.Parameter(torch.randn(600).bfloat16())
    opt = wdopt.FusedAdamW([p], lr=1e-3, state_bits=8, stochastic_rounding=True)
    p.grad = torch.randn(600).bfloat16()
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state[p])
    edits = [("exp_avg_sq_block_scale", 1, -1.0, "scale is -1.0"), ("exp_avg_block_scale", 2, float("inf"), "inf"),
             ("exp_avg_block_scale", 0, 1e-40, "block 0.s scale is 9.99"), ("exp_avg", 5, -128, "code -128"),
             ("rng", 1, -1, "never negative"), ("rng", 2, -256, "never negative")]
    for key, index, value, message in edits:
        bad = copy.deepcopy(saved)
        bad["state"][0][key][index] = value
        with pytest.raises(RuntimeError, match=message):
            opt.load_state_dict(bad)
        assert sorted(before) == sorted(opt.state[p])
        assert all(torch.equal(before[k], opt.state[p][k]) for k in before if isinstance(before[k], torch.Tensor))
    for value in (float("nan"), 0.0):
        fine = copy.deepcopy(saved)
        fine["state"][0]["exp_avg_block_scale"][1] = value
        opt.load_state_dict(fine)
        assert torch.equal(opt.state[p]["exp_avg_block_scale"], fine["state"][0]["exp_avg_block_scale"]) == (value == 0)
        assert opt.state[p]["exp_avg_block_scale"][1].item() == value or value != value
