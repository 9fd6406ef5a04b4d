"""The refined equilibrium predictor (wdopt.theory.refined, docs/theory.md section 2.4) and the
direction statistics it is made from (RotationMonitor(statistics=True)).

- The refined formulas reduce to the paper's for white unit-power noise.
- A simulated layer of scale-invariant neurons driven by *coloured*, heavy-tailed noise (which the
  paper's formulas get wrong by 20-60%) reaches the norm and RMS angle the refined predictor
  computes from statistics measured in an earlier window.
- The statistics equal what the optimizer's own state says they are: from the state read after
  the step (not re-derived), on the validation path and the fast path, with GradScaler.
"""

from __future__ import annotations

import math

import pytest
import torch

import wdopt
from wdopt import theory
from wdopt.reference import telemetry as tm


def test_refined_reduces_to_the_paper():
    for c in (9, 144):
        paper = theory.adamw_equilibrium(3e-3, 1.5e-3, c, (0.9, 0.999))
        ref = theory.adamw_refined(3e-3, 1.5e-3, float(c), 0.0, 0.0, (0.9, 0.999), c)
        assert math.isclose(ref.norm, paper.norm, rel_tol=1e-12)
        assert math.isclose(ref.angular_update, paper.angular_update, rel_tol=1e-12)
        assert math.isclose(ref.time_constant, paper.time_constant, rel_tol=1e-12) and ref.drive == 1.0
    paper = theory.sgd_equilibrium(0.1, 1e-4, 2.5, 0.9)
    ref = theory.sgd_refined(0.1, 1e-4, 2.5, 0.0, 0.0, 0.9)
    assert math.isclose(ref.norm, paper.norm, rel_tol=1e-12)
    assert math.isclose(ref.angular_update, paper.angular_update, rel_tol=1e-12)
    assert math.isclose(ref.time_constant, paper.time_constant, rel_tol=1e-12)
    # Lion's linear response for white unit noise: the paper's, plus the sign's residual (π/2 − 1)σ².
    betas, c = (0.9, 0.99), 144
    sigma_sq = theory.lion_sigma_squared(betas)
    lin = theory.lion_linear_response(1e-3, 1e-3, float(c), 0.0, c * sigma_sq, c, betas)
    paper = theory.lion_equilibrium(1e-3, 1e-3, c, betas)
    assert math.isclose(lin.norm / paper.norm, math.sqrt(1 + (math.pi / 2 - 1) * sigma_sq), rel_tol=1e-12)
    # A negative radial part (the update leans inward) slows relaxation and lowers the norm.
    inward = theory.adamw_refined(3e-3, 1.5e-3, 144.0, 0.0, -0.5, (0.9, 0.999), 144)
    outward = theory.adamw_refined(3e-3, 1.5e-3, 144.0, 0.0, 0.5, (0.9, 0.999), 144)
    assert inward.norm > outward.norm and inward.time_constant > outward.time_constant
    with pytest.raises(ValueError, match="diffusion"):
        theory.adamw_refined(3e-3, 1.5e-3, 1.0, -1.0, 0.0)
    with pytest.raises(ValueError, match="weight decay"):
        theory.sgd_refined(0.1, 0.0, 1.0, 0.0)


def _simulate(opt, w, steps, correlation, seed, every=5):
    """Scale-invariant neurons: g = (I − ω̂ω̂ᵀ)ξ/‖ω‖ with ξ an AR(1) process (lag-1 correlation
    ``correlation``) of Student-t innovations. Returns the monitor's history."""
    g = torch.Generator().manual_seed(seed)
    monitor = wdopt.RotationMonitor(opt, every=every, statistics=True)
    xi = torch.zeros_like(w)
    for _ in range(steps):
        z = torch.randn(w.shape, generator=g, dtype=w.dtype)
        z = z / torch.sqrt(torch.distributions.Chi2(4.0).sample(w.shape[:1]).to(w.dtype).unsqueeze(1) / 4)
        xi = correlation * xi + math.sqrt(1 - correlation**2) * z
        with torch.no_grad():
            norm = w.norm(dim=1, keepdim=True)
            u = w / norm
            w.grad = (xi - (xi * u).sum(1, keepdim=True) * u) / norm
        opt.step()
    return monitor.history


def _measured(history, start):
    rows = [r for r in history if r.step > start]
    norm = math.sqrt(sum(float(r.sums["group0.param0"][:, tm.W2].mean()) for r in rows) / len(rows))
    angle = math.sqrt(sum(float(r.neurons("group0.param0")["angular_update"].pow(2).mean()) for r in rows) / len(rows))
    return norm, angle


@pytest.mark.parametrize("name,correlation", [("adamw", -0.5), ("adamw", 0.5), ("sgd", -0.5), ("sgd", 0.4)])
def test_refined_predicts_coloured_noise(name, correlation):
    """The paper's formulas assume white noise; lag-correlated, heavy-tailed noise moves the
    equilibrium. The refined prediction from the statistics of steps 1000-1500 must give the
    norm and RMS angle of steps 1500-2000 within 3%, where the paper's is off by more than 10%."""
    torch.manual_seed(0)
    k, c = 64, 32
    w = torch.randn(k, c, dtype=torch.float64)
    if name == "adamw":
        lr, wd = 1e-2, 0.2  # d = 2e-3: τ = 250 steps
        w = (w / w.norm(dim=1, keepdim=True) * 0.1).requires_grad_()
        opt = wdopt.FusedAdamW([w], lr=lr, weight_decay=wd)
    else:
        lr, wd = 0.1, 1e-3  # d = 1e-4: τ = (1 − μ)/(4d) = 250 steps
        w = (w / w.norm(dim=1, keepdim=True) * 2.0).requires_grad_()
        opt = wdopt.FusedSGD([w], lr=lr, weight_decay=wd, momentum=0.9)
    history = _simulate(opt, w, 2000, correlation, seed=1)
    ref = theory.refined([r for r in history if 1000 < r.step <= 1500])["group0.param0"]
    norm, angle = _measured(history, 1500)
    if name == "adamw":
        paper = theory.adamw_equilibrium(lr, lr * wd, c)
    else:
        window = [r for r in history if r.step > 1500]
        unit = sum(r.tensor("group0.param0")["neuron_grad_norm_sq_unit_mean"] for r in window) / len(window)
        paper = theory.sgd_equilibrium(lr, lr * wd, unit, 0.9)
    assert abs(norm / ref.norm - 1) < 0.03, (norm, ref)
    assert abs(angle / ref.angular_update - 1) < 0.03, (angle, ref)
    paper_error = max(abs(norm / paper.norm - 1), abs(angle / paper.angular_update - 1))
    assert paper_error > 0.10, paper_error  # the test can tell the two apart


def _case(kind, **extra):
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(6, 11))
    if kind == "adamw":
        opt = wdopt.FusedAdamW([w], lr=1e-2, weight_decay=0.1, **extra)
    elif kind == "sgd":
        opt = wdopt.FusedSGD([w], lr=1e-2, weight_decay=0.1, momentum=0.9, **extra)
    else:
        opt = wdopt.FusedLion([w], lr=1e-2, weight_decay=0.1, **extra)
    return w, opt


@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("maximize", [False, True])
def test_statistics_from_the_state(kind, maximize):
    """Every step recorded (the first on the validation path, later ones on the fast path): the
    statistics equal those of n and s rebuilt from the state as the optimizer left it."""
    w, opt = _case(kind, maximize=maximize)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    key = {"adamw": "exp_avg", "sgd": "momentum_buffer", "lion": "exp_avg"}[kind]
    for step in range(1, 5):
        w.grad = torch.randn_like(w)
        before = w.detach().double().clone()
        state = opt.state[w]
        s = state[key].double().clone() if key in state else torch.zeros_like(before)
        opt.step()
        g = w.grad.double() * (-1 if maximize else 1)
        if kind == "adamw":
            denom = (opt.state[w]["exp_avg_sq"].double() / (1 - 0.999**step)).sqrt() + 1e-8
            n, s = g / denom, s / denom
        elif kind == "lion":
            n = 0.9 * s + 0.1 * g
            # Lion's update is the sign of n: the statistics are of the direction the step took.
            assert torch.equal(torch.sign(n), -torch.sign(w.detach().double() - before * (1 - 1e-3)))
        else:
            n = g
        expect = torch.stack([(n * n).sum(1), (n * s).sum(1), (before * n).sum(1), (s * s).sum(1)], 1)
        got = monitor.last.statistics["group0.param0"]
        assert got.shape == (6, tm.STATISTICS)
        # The kernels form the products and chunk sums in fp32 (the reference in float64, from
        # the fp32 state): a few fp32 ulps of Σ|term|, on sums that cancel (Σω·n).
        scale = torch.stack([n * n, (n * s).abs(), (before * n).abs(), s * s]).sum(-1).T
        assert (got - expect).abs().le(1e-5 * scale).all(), (got - expect) / scale


def test_statistics_with_grad_scaler_and_without_request():
    """Under GradScaler the statistics are of the unscaled gradient; a monitor without
    ``statistics=True`` records none (and costs nothing extra)."""
    w, opt = _case("sgd")
    plain = wdopt.RotationMonitor(opt, every=1)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    scale = torch.tensor(1024.0)
    for _ in range(2):
        g = torch.randn_like(w)
        w.grad = g * scale
        opt.grad_scale, opt.found_inf = scale, torch.zeros(())
        opt.step()
    assert plain.last.statistics == {}
    n2 = monitor.last.statistics["group0.param0"][:, tm.N2]
    torch.testing.assert_close(n2, g.double().pow(2).sum(1), rtol=1e-6, atol=0)


def test_refined_refuses_what_it_cannot_predict():
    """Records without statistics, an empty window and a window across an lr change get a
    clear error; a NaN gradient gives a NaN prediction, not a number."""
    w, opt = _case("adamw")
    plain = wdopt.RotationMonitor(opt, every=1)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["lr"] = 5e-3
        w.grad = torch.randn_like(w)
        opt.step()
    with pytest.raises(ValueError, match="statistics=True"):
        theory.refined(plain.history)
    with pytest.raises(ValueError, match="at least one record"):
        theory.refined([])
    with pytest.raises(ValueError, match="lr or the decay fraction changed"):
        theory.refined(monitor.history)
    assert theory.refined(monitor.history[2:])["group0.param0"].norm > 0
    assert theory.refined(monitor.history[2:], names="group0.param0").keys() == {"group0.param0"}
    with pytest.raises(TypeError, match="True or False"):
        wdopt.RotationMonitor(opt, statistics="no")
    with pytest.raises(ValueError, match="momentum"):
        theory.sgd_refined(0.1, 1e-4, 1.0, 0.0, momentum=1.0)
    # A tensor without a gradient at one recorded step is left out, not a KeyError.
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    opt2 = wdopt.FusedAdamW([a, b], lr=1e-2, weight_decay=0.1)
    mon2 = wdopt.RotationMonitor(opt2, every=1, statistics=True)
    for step in range(3):
        a.grad = torch.randn_like(a)
        b.grad = torch.randn_like(b) if step != 1 else None
        opt2.step()
    assert set(theory.refined(mon2.history)) == {"group0.param0"}
    w.grad = torch.full_like(w, float("nan"))
    opt.step()
    assert math.isnan(theory.refined(monitor.last)["group0.param0"].norm)
    opt.param_groups[0]["betas"] = (0.8, 0.999)
    w.grad = torch.randn_like(w)
    opt.step()
    with pytest.raises(ValueError, match="betas changed"):
        theory.refined(monitor.history[-2:])


def test_rotated_parameters_have_no_statistics():
    w = torch.nn.Parameter(torch.randn(4, 9))
    opt = wdopt.RotationalAdamW([w], lr=1e-2, weight_decay=0.1)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    w.grad = torch.randn_like(w)
    opt.step()
    assert monitor.last.statistics == {}
    assert theory.refined(monitor.last) == {}


# ---------------------------------------------------------------------- every backend

from conftest import backend_device_pairs  # noqa: E402

SHAPES = [(5, 2), (4, 3), (3, 129), (6, 3, 3, 3), (7,)]
CASES = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw_amsgrad": (wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    "sgd": (wdopt.FusedSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd_nesterov": (wdopt.FusedSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=0.5)),
}


def _expected(name, hyper, step, p0, g, state, scale):
    """[Σn², Σn·s, Σω·n, Σs²] per row in float64 from the state before the step, written out
    independently of wdopt.reference.telemetry."""
    rows = p0.shape[0] if p0.dim() >= 2 else 1
    w, g = p0.double().reshape(rows, -1), g.double().reshape(rows, -1) / scale
    if hyper.get("maximize"):
        g = -g

    def old(key):
        t = state.get(key)
        return torch.zeros_like(w) if t is None else t.double().reshape(rows, -1)

    if name.startswith("adamw"):
        v = old("exp_avg_sq") * 0.999 + 0.001 * g * g
        if hyper.get("amsgrad"):
            v = torch.maximum(old("max_exp_avg_sq"), v)
        denom = (v / (1 - 0.999**step)).sqrt() + 1e-8
        n, s = g / denom, old("exp_avg") / denom
    elif name.startswith("sgd"):
        n, s = g, old("momentum_buffer") if step > 1 else torch.zeros_like(w)
    else:
        s = old("exp_avg")
        n = 0.9 * s + 0.1 * g
    terms = [n * n, n * s, w * n, s * s]
    return torch.stack([t.sum(1) for t in terms], 1), torch.stack([t.abs().sum(1) for t in terms], 1)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_statistics_every_backend(backend, device, name, dtype):
    """The statistics every backend records (kernels in their pass, or snapshots) against the
    float64 formulas, over 4 steps (the validation path, then the fast one), odd rows, bf16 and
    GradScaler; a step measured with statistics leaves parameters and state bit-identical to an
    unmonitored one."""
    cls, hyper = CASES[name]
    gen = torch.Generator().manual_seed(5)
    make = lambda: [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)  # noqa: E731
                    .to(device=device, dtype=dtype).requires_grad_(True) for i, s in enumerate(SHAPES)]
    params, plain = make(), make()
    opt, opt_plain = cls(params, backend=backend, **hyper), cls(plain, backend=backend, **hyper)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    scale = torch.tensor(256.0, device=device)
    for step in range(1, 5):
        for p, q in zip(params, plain):
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 256).to(device=device, dtype=dtype)
            q.grad = p.grad.clone()
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
        for o in (opt, opt_plain):
            o.grad_scale, o.found_inf = scale, torch.zeros((), device=device)
            o.step()
        for i, (p, (p0, state)) in enumerate(zip(params, before)):
            got = monitor.last.statistics[f"group0.param{i}"].cpu()
            assert got.shape == (tm.telemetry_rows(p), tm.STATISTICS)
            expect, magnitude = _expected(name, hyper, step, p0.cpu(), p.grad.cpu(), {k: v.cpu() for k, v in state.items()},
                                          256.0)
            rtol = 1e-12 if dtype == torch.float64 else 1e-5
            assert ((got - expect).abs() <= rtol * magnitude + 1e-300).all(), (name, i, got, expect)
    for p, q in zip(params, plain):
        assert torch.equal(p, q)
        for key, value in opt_plain.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_statistics_of_complex_and_sparse_parameters():
    """Buckets measured from snapshots get statistics too: a complex AdamW tensor as its real
    pairs, SGD with a sparse gradient as its dense one."""
    torch.manual_seed(7)
    z = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.complex64))
    opt = wdopt.FusedAdamW([z], lr=1e-2, weight_decay=0.1)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    for step in range(1, 3):
        z.grad = torch.randn_like(z)
        p0 = torch.view_as_real(z.detach()).clone()
        state = {k: (torch.view_as_real(v) if v.is_complex() else v).clone() for k, v in opt.state[z].items()}
        opt.step()
        expect, magnitude = _expected("adamw", {}, step, p0, torch.view_as_real(z.grad), state, 1.0)
        got = monitor.last.statistics["group0.param0"]
        assert ((got - expect).abs() <= 1e-5 * magnitude).all(), (got, expect)

    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = wdopt.FusedSGD(emb.parameters(), lr=0.1, momentum=0.9)
    monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
    for step in range(1, 4):
        opt.zero_grad()
        emb(torch.tensor([1, 4, 4])).sum().backward()
        p0 = emb.weight.detach().clone()
        state = {k: v.to_dense().clone() for k, v in opt.state[emb.weight].items()}
        opt.step()
        expect, magnitude = _expected("sgd", {}, step, p0, emb.weight.grad.to_dense(), state, 1.0)
        got = monitor.last.statistics["weight"] if "weight" in monitor.last.statistics else \
            monitor.last.statistics["group0.param0"]
        assert ((got - expect).abs() <= 1e-6 * magnitude + 1e-12).all(), (step, got, expect)


def test_rotational_optimizer_measures_its_plain_groups_as_the_base_does():
    """A rotational optimizer's non-rotated parameters (a complex one included) get the same
    statistics as the base optimizer records for them (the rotational path reads them before the
    step, the base one in its kernels or snapshots)."""
    records = []
    for cls in (wdopt.RotationalAdamW, wdopt.FusedAdamW):
        torch.manual_seed(11)
        z = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
        w = torch.nn.Parameter(torch.randn(4, 5))  # the rotated one a rotational optimizer needs
        groups = [{"params": [z], "rotational": False}, {"params": [w]}] if cls is wdopt.RotationalAdamW \
            else [{"params": [z]}]
        opt = cls(groups, lr=1e-2, weight_decay=0.1)
        monitor = wdopt.RotationMonitor(opt, every=1, statistics=True)
        for _ in range(2):
            z.grad, w.grad = torch.randn_like(z), torch.randn_like(w)
            opt.step()
        records.append(monitor.last.statistics["group0.param0"])
    torch.testing.assert_close(records[0], records[1], rtol=1e-6, atol=1e-9)
