"""Stochastic rounding (wdopt/reference/rounding.py): the specification's arithmetic checked
exhaustively, every backend bit for bit against the reference, and what it is for — weight decay
and small updates that round-to-nearest bf16 loses act on average."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import SMALL_SHAPES, grad_stream, interpreted, make_params
from wdopt import backends
from wdopt.reference import rounding as R

PAIRS = backend_device_pairs()
LOW = [torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------- the specification


def test_mul32_and_fmix32_match_python_integers():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    words[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    for b in (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 1, 2**32 - 1):
        assert R.mul32(words, b).tolist() == [(w * b) % 2**32 for w in words.tolist()]
    assert R.fmix32(words).tolist() == [R.fmix32(w) for w in words.tolist()]
    # A bijection: distinct words stay distinct (MurmurHash3's finalizer is invertible).
    assert len(set(R.fmix32(torch.arange(1 << 16)).tolist())) == 1 << 16


def _neighbours(x: float, dtype):
    """x's representable neighbours toward and away from zero, by exhaustive search in float64."""
    info = torch.finfo(dtype)
    t = torch.tensor(x, dtype=torch.float32).to(dtype)
    bits = t.view(torch.int16).item() & 0x7FFF
    candidates = []
    for m in (bits - 1, bits, bits + 1):
        if 0 <= m < 0x7F80 if dtype == torch.bfloat16 else 0 <= m <= 0x7BFF:
            candidates.append(abs(torch.tensor(m, dtype=torch.int16).view(dtype).item()))
    below = max(c for c in candidates if c <= abs(x))
    above = min(c for c in candidates if c > abs(x)) if any(c > abs(x) for c in candidates) else info.max
    return below, above


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_up_probability_is_the_fraction_over_all_random_words(dtype):
    """For each x, over all 2^16 values of r: x rounds to one of its two neighbours, and up for
    exactly ⌊(|x| − a)/(b − a)·2^16⌋ of them (P(up) is the fraction, truncated to 16 bits)."""
    g = torch.Generator().manual_seed(1)
    xs = torch.cat([torch.randn(24, generator=g) * 10.0 ** torch.randint(-6, 4, (24,), generator=g),
                    torch.tensor([1.0 + 2.0**-10, -3.0e-7, 1.0e-8, 7.0e-6, 65500.0, -0.1, 2.0**-14 * 1.3])])
    r = torch.arange(65536, dtype=torch.int64)
    for x in xs.tolist():
        x = float(torch.tensor(x, dtype=torch.float32))
        if dtype == torch.float16 and abs(x) > 65504:
            continue
        out = R.stochastic_round(torch.full((65536,), x), dtype, r).double()
        a, b = _neighbours(x, dtype)
        assert set(out.abs().unique().tolist()) <= {a, b}, (x, a, b, out.abs().unique())
        assert bool((out.sign() * math.copysign(1, x) >= 0).all())
        ups = int((out.abs() == b).sum())
        expected = math.floor((abs(x) - a) / (b - a) * 65536)
        assert ups == expected, (x, ups, expected)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_special_values(dtype):
    v = torch.tensor([0.0, -0.0, 1.0, -2.0, float("inf"), -float("inf"), float("nan")])
    for bits in (torch.zeros(7, dtype=torch.int64), torch.full((7,), 0xFFFF, dtype=torch.int64)):
        out = R.stochastic_round(v, dtype, bits)
        assert torch.equal(out[:6], v[:6].to(dtype)) and torch.isnan(out[6])
        assert out[1].item() == 0 and math.copysign(1, out[1].item()) < 0  # -0 keeps its sign


def test_element_index_is_the_memory_offset():
    t = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    index = R.element_index(t)
    flat = torch.empty(t.numel(), dtype=torch.int64)
    flat[index.flatten()] = torch.arange(t.numel())
    assert sorted(index.flatten().tolist()) == list(range(t.numel()))
    assert torch.equal(index, torch.as_strided(torch.arange(t.numel()), t.shape, t.stride()))


# ---------------------------------------------------------------------------- every backend, bit for bit


CASES = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamw-amsgrad-maximize": (wdopt.FusedAdamW, dict(lr=3e-3, weight_decay=0.5, amsgrad=True, maximize=True)),
    "sgd-nesterov": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgdw": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.5, dampening=0.1, weight_decay=0.1, decoupled_weight_decay=True)),
    "sgd-plain": (wdopt.FusedSGD, dict(lr=1e-2)),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=1.0)),
}
SHAPES = SMALL_SHAPES + [(65537,)]  # a tensor the C++ CPU backend splits between threads


def _trajectory(cls, hyper, backend, device, dtype, shapes, steps=3, seed=5, **extra):
    params = [p.requires_grad_(True) for p in make_params(shapes, dtype, device)]
    opt = cls(params, backend=backend, stochastic_rounding=True, rounding_seed=seed, **hyper, **extra)
    for grads in grad_stream(shapes, steps, top=0):
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return params, opt


def _assert_identical(params_a, opt_a, params_b, opt_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a.detach().cpu().view(torch.int16 if a.element_size() == 2 else a.dtype),
                           b.detach().cpu().view(torch.int16 if b.element_size() == 2 else b.dtype)), f"param {i}"
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert sorted(state_a) == sorted(state_b)
        for key in state_b:
            va, vb = state_a[key].cpu(), state_b[key].cpu()
            if va.element_size() == 2:
                va, vb = va.view(torch.int16), vb.view(torch.int16)
            assert torch.equal(va, vb), f"param {i} state {key}"


_expected: dict = {}


def _cases():
    """Every (case, dtype) on every backend; under the Triton interpreter (about a second a case)
    one dtype a case, alternating, so both run on every optimizer but one."""
    out = []
    for n, case in enumerate(CASES):
        for dtype in LOW:
            for backend, device in PAIRS:
                if interpreted(backend, device) and dtype != LOW[n % 2]:
                    continue
                out.append(pytest.param(case, dtype, backend, device, id=f"{case}-{dtype}-{backend}-{device}"))
    return out


@pytest.mark.parametrize("case,dtype,backend,device", _cases())
def test_every_backend_equals_the_reference_bit_for_bit(case, dtype, backend, device):
    """Parameters and every state tensor, after 3 steps, on odd sizes: the same bits as the
    reference backend. A backend without stochastic rounding on this device says so clearly."""
    cls, hyper = CASES[case]
    shapes = SMALL_SHAPES if interpreted(backend, device) else SHAPES
    module = backends.load(backend)
    if not backends.rounds_stochastically(module, device):
        with pytest.raises(NotImplementedError, match="no stochastic rounding"):
            _trajectory(cls, hyper, backend, device, dtype, shapes)
        return
    key = (case, dtype, device, tuple(shapes))
    if key not in _expected:
        _expected[key] = _trajectory(cls, hyper, "reference", device, dtype, shapes)
    params, opt = _trajectory(cls, hyper, backend, device, dtype, shapes)
    _assert_identical(params, opt, *_expected[key])
    assert [opt.state[p]["rng"][1].item() for p in params] == [3] * len(params)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_a_shard_with_an_index_base_draws_the_whole_tensors_bits(backend, device):
    """rng = [key, count, base]: a tensor's second half updated on its own with base = its first
    element's index equals the whole tensor's update, bit for bit: parameter (bf16, 24-bit master,
    stochastically split) and 8-bit states (whose 256-element blocks the halves keep whole). This
    is how a DTensor shard rounds (wdopt/optim/_dtensor.py); base 0 draws other bits."""
    if backend == "triton" and device == "cpu":
        pytest.importorskip("triton")
    module = backends.load(backend)
    from wdopt.reference import quantization as Q

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(8, 64, generator=g)).to(device=device, dtype=torch.bfloat16)
    grad = torch.randn(8, 64, generator=g).to(device=device, dtype=torch.bfloat16)

    def run(rows, base):
        p = w[rows].clone()
        c = torch.zeros_like(p, dtype=torch.int8)
        codes = [torch.zeros_like(p, dtype=torch.int8), torch.zeros_like(p, dtype=torch.uint8)]
        scales = {lane: [torch.zeros(Q.blocks(p.numel()), device=device)] for lane in (1, 2)}
        step = torch.zeros((), device=device)
        rng = torch.tensor([R.parameter_key(9, 0), 5, base], dtype=torch.int64, device=device)
        module.adamw([p], [grad[rows].clone()], [codes[0]], [codes[1]], (), [step], lr=0.1, beta1=0.9, beta2=0.99,
                     eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0, amsgrad=False, maximize=False, rng=[rng],
                     correction=[c], scales=scales)
        return [p, c, *codes, scales[1][0], scales[2][0]]

    whole = run(slice(0, 8), 0)
    half = run(slice(4, 8), 256)
    for a, b in zip(whole[:4], half[:4]):
        assert torch.equal(a[4:], b)
    for a, b in zip(whole[4:], half[4:]):
        assert torch.equal(a[1:], b)
    other = run(slice(4, 8), 0)
    assert not torch.equal(whole[1][4:], other[1]) and not torch.equal(whole[2][4:], other[2])


@pytest.mark.parametrize("monitored", [False, True], ids=["plain", "monitored"])
def test_the_cpu_walk_draws_the_references_bits_across_2_to_the_32(monitored):
    """The CPU kernels hash 32-bit indices within runs whose indices base + i share their high word
    (csrc/cpu/storage.h): a tensor whose indices cross 2^32 (base 2^32 − 300: the cut falls inside
    row 2 of 8) or lie past it (base 3·2^32 + 7) is cut there and still draws the reference's bits:
    bf16 parameter and states bit for bit, and (monitored) the rows' telemetry, the cut row's
    added from its two parts."""
    cpu, ref = backends.load("cpu"), backends.load("reference")
    from wdopt.reference import telemetry as T

    for base in (2**32 - 300, 3 * 2**32 + 7):
        outs = []
        for module in (ref, cpu):
            g = torch.Generator().manual_seed(4)
            p = torch.randn(8, 128, generator=g).bfloat16()
            grad = torch.randn(8, 128, generator=g).bfloat16()
            m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
            rng = torch.tensor([R.parameter_key(9, 0), 5, base])
            extra = {"telemetry": [torch.zeros(8, 4, dtype=torch.float64)]} if monitored and module is cpu else {}
            for _ in range(2):
                before = p.clone()
                module.adamw([p], [grad], [m], [v], (), [step], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                             weight_decay=0.1, decay_lr_scale=1.0, amsgrad=False, maximize=False, rng=[rng], **extra)
            outs.append((p, m, v))
        for a, b in zip(*outs):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), base
        if monitored:
            torch.testing.assert_close(extra["telemetry"][0], T.row_sums(before, p, grad, 8), rtol=1e-5, atol=0)


def test_rounding_differs_from_nearest_and_by_seed():
    cls, hyper = CASES["adamw"]
    a, _ = _trajectory(cls, hyper, "reference", "cpu", torch.bfloat16, [(4096,)], seed=1)
    b, _ = _trajectory(cls, hyper, "reference", "cpu", torch.bfloat16, [(4096,)], seed=2)
    params = [p.requires_grad_(True) for p in make_params([(4096,)], torch.bfloat16)]
    nearest = cls(params, backend="reference", **hyper)
    for grads in grad_stream([(4096,)], 3, top=0):
        params[0].grad = grads[0].bfloat16()
        nearest.step()
    assert not torch.equal(a[0], b[0])
    assert not torch.equal(a[0], params[0])
    # ... yet close to round-to-nearest's trajectory: on average within a bf16 ulp (2^-7 relative).
    relative = (a[0].float() - params[0].float()).abs() / params[0].float().abs().clamp_min(1e-3)
    assert relative.mean() < 2**-7, relative.mean()


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "reference"])
def test_monitored_and_channels_last_steps_round_alike(backend):
    """A step that records rotation telemetry (the kernels' own store loop: the contiguous linear
    weight) and a channels_last parameter (element index = memory offset; its telemetry, on rows
    of a non-contiguous tensor, comes from snapshots) draw the same bits as the reference. Each in
    a group of its own: a bucket mixing layouts would not be the kernels' at all."""
    results = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        conv = torch.randn(6, 5, 3, 3).bfloat16().to(memory_format=torch.channels_last).requires_grad_(True)
        lin = torch.randn(8, 40).bfloat16().requires_grad_(True)
        opt = wdopt.FusedAdamW([{"params": [conv]}, {"params": [lin]}], lr=1e-2, weight_decay=0.1, backend=name,
                               stochastic_rounding=True)
        monitor = wdopt.RotationMonitor(opt, every=2)
        for step in range(4):
            conv.grad = torch.randn_like(conv)
            lin.grad = torch.randn_like(lin)
            opt.step()
        assert len(monitor.history) == 2
        results.append(([conv, lin], opt))
    _assert_identical(*results[0], *results[1])


# ---------------------------------------------------------------------------- what it is for


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "triton"])
def test_weight_decay_acts_on_bf16_parameters(backend):
    """Decay alone, lr·λ = 1e-4 per step (far below bf16's half ulp, 2^-9): rounded to nearest,
    bf16 parameters never move; stochastically rounded, they shrink as fp32 ones do, on average."""
    n, steps, d = 20000, 300, 1e-4
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    out = {}
    for sr in (False, True):
        p = p0.bfloat16().requires_grad_(True)
        opt = wdopt.FusedSGD([p], lr=1e-2, weight_decay=d / 1e-2, decoupled_weight_decay=True, backend=backend,
                             stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.zeros_like(p)
            opt.step()
        out[sr] = p.detach().float()
    start = p0.bfloat16().float()
    assert torch.equal(out[False], start)  # round to nearest: decay did nothing
    expected = start * (1 - d) ** steps      # fp32 decay: -3%
    ratio = (out[True] * start).sum() / (expected * start).sum()
    assert abs(ratio.item() - 1) < 2e-4, ratio  # per element ±2^-9 noise averaged over 20,000


@pytest.mark.parametrize("backend", [b for b, d in PAIRS if d == "cpu" and b != "triton"])
def test_exp_avg_sq_keeps_decaying_in_bf16(backend):
    """bf16 AdamW states: after the gradient scale drops 10×, exp_avg_sq must decay toward the new
    level (β2·v + (1−β2)g² rounds back to v with round-to-nearest once (1−β2)·v is below half an
    ulp of v). Stochastic rounding follows the fp32 run within 2%."""
    n = 4096
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=g) * (1.0 if t < 200 else 0.1) for t in range(1200)]
    finals = {}
    for name, dtype, sr in (("fp32", torch.float32, False), ("nearest", torch.bfloat16, False),
                            ("stochastic", torch.bfloat16, True)):
        p = torch.zeros(n, dtype=dtype, requires_grad=True)
        opt = wdopt.FusedAdamW([p], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0, backend=backend,
                               stochastic_rounding=sr)
        for grad in grads:
            p.grad = grad.to(dtype)
            opt.step()
        finals[name] = opt.state[p]["exp_avg_sq"].double().mean().item()
    assert abs(finals["stochastic"] / finals["fp32"] - 1) < 0.02, finals
    assert finals["nearest"] > 1.5 * finals["fp32"], finals  # frozen well above the fp32 run


# ---------------------------------------------------------------------------- state and edge cases


def test_state_dict_resumes_the_same_bits():
    """The stream lives in each parameter's ``rng`` state: a run saved and loaded into a new
    optimizer continues bit for bit as the uninterrupted run; torch.optim.AdamW loads it too."""
    cls, hyper = CASES["adamw"]
    shapes = [(33, 17), (7,)]
    full, full_opt = _trajectory(cls, hyper, "reference", "cpu", torch.bfloat16, shapes, steps=4)
    half, half_opt = _trajectory(cls, hyper, "reference", "cpu", torch.bfloat16, shapes, steps=2)
    saved = half_opt.state_dict()
    assert saved["state"][0]["rng"].tolist()[1] == 2 and saved["param_groups"][0]["stochastic_rounding"]
    resumed_params = [p.detach().clone().requires_grad_(True) for p in half]
    resumed = cls(resumed_params, backend="reference", **hyper)  # options come from the state dict
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["stochastic_rounding"] and resumed.param_groups[0]["rounding_seed"] == 5
    for grads in grad_stream(shapes, 4, top=0)[2:]:
        for p, g in zip(resumed_params, grads):
            p.grad = g.bfloat16()
        resumed.step()
    _assert_identical(resumed_params, resumed, full, full_opt)
    # torch.optim.AdamW loads it (and casts rng to bf16, as it casts all state): back in wdopt, such
    # a stream is made anew rather than refused.
    torch_params = [p.detach().clone().requires_grad_(True) for p in half]
    torch_opt = torch.optim.AdamW(torch_params, **hyper)
    torch_opt.load_state_dict(saved)
    back = cls(torch_params, backend="reference", stochastic_rounding=True, **hyper)
    back.load_state_dict(torch_opt.state_dict())
    assert "rng" not in back.state[torch_params[0]]
    for p in torch_params:
        p.grad = torch.ones_like(p)
    back.step()
    assert back.state[torch_params[0]]["rng"].tolist()[1] == 1


def test_skipped_step_leaves_the_count():
    cls, hyper = CASES["adamw"]
    params, opt = _trajectory(cls, hyper, "reference", "cpu", torch.bfloat16, [(5,)], steps=1)
    before = params[0].detach().clone()
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.ones(())
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.state[params[0]]["rng"].tolist()[1] == 1 and torch.equal(params[0], before)


def test_float32_parameters_are_untouched_by_the_option():
    cls, hyper = CASES["adamw"]
    shapes = [(33, 17)]
    a, opt_a = _trajectory(cls, hyper, "reference", "cpu", torch.float32, shapes)
    params = [p.requires_grad_(True) for p in make_params(shapes)]
    opt_b = cls(params, backend="reference", **hyper)
    for grads in grad_stream(shapes, 3, top=0):
        params[0].grad = grads[0].float()
        opt_b.step()
    assert torch.equal(a[0], params[0]) and "rng" not in opt_a.state[a[0]]


def test_bad_options_and_state_are_refused():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="stochastic_rounding must be True or False"):
        wdopt.FusedAdamW([p], stochastic_rounding="yes")
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="rounding_seed"):
            wdopt.FusedSGD([p], rounding_seed=seed)
    opt = wdopt.FusedLion([p], stochastic_rounding=True, backend="reference")
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["rng"] = torch.tensor([1.0, 2.0])
    opt.__setstate__(opt.__getstate__())  # checked again, as after a load
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="'rng'.*int64"):
        opt.step()
    assert torch.equal(p, before)


def test_an_old_two_word_rng_resumes_the_same_bits():
    """A state dict saved when rng was [key, count] (before the index base): upgraded to
    [key, count, 0] at the next step, which draws the bits an uninterrupted run draws."""
    import copy

    p = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(0)).bfloat16())
    q = torch.nn.Parameter(p.detach().clone())
    a, b = (wdopt.FusedAdamW([x], stochastic_rounding=True) for x in (p, q))
    g = torch.randn(300, generator=torch.Generator().manual_seed(1)).bfloat16()
    p.grad = g.clone()
    a.step()
    saved = copy.deepcopy(a.state_dict())
    saved["state"][0]["rng"] = saved["state"][0]["rng"][:2].clone()
    with torch.no_grad():
        q.copy_(p)
    b.load_state_dict(saved)
    for opt, x in ((a, p), (b, q)):
        x.grad = g.clone()
        opt.step()
    assert torch.equal(p, q) and b.state[q]["rng"].tolist() == a.state[p]["rng"].tolist()


@pytest.mark.parametrize("backend", [b for b, d in backend_device_pairs() if d == "cpu" and b not in ("reference", "triton")])
def test_non_finite_results_have_the_references_bits(backend):
    """NaN stored stochastically in bf16 is the canonical 0x7FC0 in the reference too (a torch
    conversion keeps the sign and payload on some platforms): bit for bit across backends."""
    out = []
    for b in ("reference", backend):
        p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
        opt = wdopt.FusedAdamW([p], backend=b, lr=1e-2, stochastic_rounding=True)
        p.grad = torch.tensor([float("nan"), float("-inf"), float("inf"), 1, -1, 0, 2, 3], dtype=torch.bfloat16)
        opt.step()
        out.append([t.view(torch.int16) for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])])
    for a, r in zip(*out):
        assert torch.equal(a, r)
    assert int(out[0][0][0]) == 0x7FC0


def test_an_edited_rounding_seed_takes_effect():
    """``rounding_seed`` edited after the streams exist: from the next step the group draws the
    new seed's streams (key of the new seed, count from 0), as an optimizer made with that seed
    would; left alone, or set to the same value, the streams go on."""
    torch.manual_seed(0)
    params = [torch.randn(37, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt = wdopt.FusedAdamW(params, lr=1e-3, stochastic_rounding=True, rounding_seed=1)
    for p in params:
        p.grad = torch.randn(37, dtype=torch.bfloat16)
    opt.step()
    opt.param_groups[0]["rounding_seed"] = 1
    opt.step()
    assert [opt.state[p]["rng"].tolist() for p in params] == [[R.parameter_key(1, i), 2, 0] for i in range(2)]
    twin = wdopt.FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3,
                            stochastic_rounding=True, rounding_seed=7)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.param_groups[0]["rounding_seed"] = 7  # the loaded group said 1
    for i, q in enumerate(twin.param_groups[0]["params"]):
        twin.state[q]["rng"][:2] = torch.tensor([R.parameter_key(7, i), 0])
    opt.param_groups[0]["rounding_seed"] = 7
    for q, p in zip(twin.param_groups[0]["params"], params):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert [opt.state[p]["rng"].tolist() for p in params] == [[R.parameter_key(7, i), 1, 0] for i in range(2)]
    for p, q in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "load_state_dict", "edited before a deepcopy",
                                 "edited before saving"])
def test_an_edited_rounding_seed_survives_copies_and_loads(how, backend):
    """An edit of ``rounding_seed`` takes effect at the next step whatever happened between: the
    optimizer deep-copied, pickled or loaded from its state dict, before or after the edit (the
    driver once kept the seed its streams were made from only by group object: the copy's or the
    loaded groups took the edited seed for it, and went on with the old streams)."""
    def run(interrupt):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in [(5, 3), (7,)]]
        opt = wdopt.FusedAdamW(params, lr=1e-2, backend=backend, stochastic_rounding=True, rounding_seed=3)
        for step in range(4):
            if step == 2:
                opt = interrupt(opt)
            grads = torch.Generator().manual_seed(100 + step)
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.randn(p.shape, generator=grads).to(p.dtype)
            opt.step()
        params = opt.param_groups[0]["params"]
        return [opt.state[p]["rng"].tolist() for p in params], [p.detach().clone() for p in params]

    def edit(opt):
        opt.param_groups[0]["rounding_seed"] = 7
        return opt

    def saved_and_loaded(opt):
        fresh = wdopt.FusedAdamW([torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]],
                                 lr=1e-2, backend=backend, stochastic_rounding=True, rounding_seed=3)
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
        return fresh

    interrupt = {
        "deepcopy": lambda opt: edit(copy.deepcopy(opt)),
        "pickle": lambda opt: edit(pickle.loads(pickle.dumps(opt))),
        "load_state_dict": lambda opt: edit(saved_and_loaded(opt)),
        "edited before a deepcopy": lambda opt: copy.deepcopy(edit(opt)),
        "edited before saving": lambda opt: saved_and_loaded(edit(opt)),
    }[how]
    want_rng, want = run(edit)
    assert [r[:2] for r in want_rng] == [[R.parameter_key(7, i), 2] for i in range(2)]
    got_rng, got = run(interrupt)
    assert got_rng == want_rng
    assert all(torch.equal(a, b) for a, b in zip(got, want))
