"""The Triton row engine of the rotational variants against the reference (rotate_ and the
*_direction functions), and rotation telemetry of the Triton base steps against row_sums.

Without a GPU the kernels run under the Triton interpreter: tensors are small and runs short. The
on-chip row limit is lowered so that one row in each run takes the two-pass (long-row) path."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import backend_device_pairs

pytest.importorskip("triton")

TRITON_DEVICES = [d for b, d in backend_device_pairs() if b == "triton"]
if not TRITON_DEVICES:
    pytest.skip("the triton backend is not available", allow_module_level=True)

from wdopt.kernels import triton as backend  # noqa: E402
from wdopt.kernels.triton import multi_tensor  # noqa: E402
from wdopt.reference import rotational as rv  # noqa: E402
from wdopt.reference.rounding import Rounder, combine  # noqa: E402
from wdopt.reference.telemetry import row_sums  # noqa: E402

# The module (the package's ``rotational`` attribute is the step function).
engine = importlib.import_module("wdopt.kernels.triton.rotational")

DEVICE = TRITON_DEVICES[-1]
#: Row sizes 2, 3, 17 and 129 on chip; 300 over the lowered limit (two passes, two blocks).
SHAPES = [(5, 2), (4, 3), (3, 17), (2, 129), (2, 300)]
ON_CHIP = 256
HYPER = dict(adamw=dict(beta1=0.9, beta2=0.999, eps=1e-8), lion=dict(beta1=0.9, beta2=0.99, eps=0.0),
             sgd=dict(beta1=0.0, beta2=0.0, eps=0.0))


@pytest.fixture(autouse=True)
def small_on_chip_limit(monkeypatch):
    monkeypatch.setattr(engine, "ON_CHIP", ON_CHIP)


def _state(name, dtype, shapes, momentum, per_neuron):
    """``per_neuron``: one flag for every tensor, or one per tensor."""
    math = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = lambda: [torch.zeros(s, dtype=dtype, device=DEVICE) for s in shapes]  # noqa: E731
    flags = per_neuron if isinstance(per_neuron, (list, tuple)) else [per_neuron] * len(shapes)
    rows = [s[0] if f else 1 for s, f in zip(shapes, flags)]
    return dict(
        state1=zeros() if name != "sgd" or momentum else [],
        state2=zeros() if name == "adamw" else [],
        steps=[torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in shapes] if name == "adamw" else [],
        norms=[torch.zeros(k, dtype=math, device=DEVICE) for k in rows],
        avgs=[torch.zeros(k, dtype=math, device=DEVICE) for k in rows],
        rsteps=[torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in shapes],
    )


def _reference_step(name, params, grads, st, ref_states, k, *, momentum, nesterov, angle, norm_decay, zero_mean,
                    per_neuron, projected, maximize, grad_scale, lr):
    h = HYPER[name]
    for i, (p, g) in enumerate(zip(params, grads)):
        if name == "adamw":
            st["steps"][i] += 1
            u = rv.adamw_direction(g, st["state1"][i], st["state2"][i], int(st["steps"][i]), beta1=h["beta1"],
                                   beta2=h["beta2"], eps=h["eps"], maximize=maximize, grad_scale=grad_scale)
        elif name == "lion":
            u = rv.lion_direction(g, st["state1"][i], beta1=h["beta1"], beta2=h["beta2"], maximize=maximize,
                                  grad_scale=grad_scale)
        else:
            u = rv.sgd_direction(g, st["state1"][i] if momentum else None, k == 0, momentum=momentum,
                                 nesterov=nesterov, maximize=maximize, grad_scale=grad_scale)
        rv.rotate_(p, u, ref_states[i], angle=angle, lr=lr, norm_decay=norm_decay, eps=1e-8, zero_mean=zero_mean,
                   per_neuron=per_neuron, mode="projected" if projected else "equilibrium")


def _first_steps(first: bool, n: int) -> list:
    """SGD's per-buffer first-step flags as the optimizer hands them over (FirstStepFlags): a 0-d
    float32 device tensor, nonzero while the buffer has no history; None for a buffer with history."""
    return [torch.ones((), device=DEVICE) if first else None for _ in range(n)]


def _compare(name, dtype, *, steps=10, momentum=0.0, nesterov=False, zero_mean=True, projected=False,
             per_neuron=True, maximize=False, scaled=False, shapes=SHAPES, telemetry=False, seed=0):
    """``steps`` Triton rotational steps against the reference on clones; returns the largest
    relative parameter difference and the largest relative deviation from the sphere."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype) for s in shapes]
    for p in params:
        rv.centre_(p, per_neuron)
    ref = [p.clone() for p in params]
    ours, theirs = _state(name, dtype, shapes, momentum, per_neuron), _state(name, dtype, shapes, momentum, per_neuron)
    ref_states = [{} for _ in shapes]
    grad_scale = torch.tensor(1024.0, device=DEVICE) if scaled else None
    angle, norm_decay, lr = 0.05, 0.9, 0.03
    worst = 0.0
    for k in range(steps):
        # Same-signed gradients make u nearly constant on the first Adam step (the centring pitfall).
        grads = [((torch.randn(s, generator=gen, dtype=torch.float64) + (1.0 if k == 0 else 0.2))
                  * 10.0 ** (i % 3 - 1) * (1024.0 if scaled else 1.0)).to(device=DEVICE, dtype=dtype)
                 for i, s in enumerate(shapes)]
        buffers = [torch.full((s[0], 4), float("nan"), dtype=torch.float64, device=DEVICE) for s in shapes] \
            if telemetry else []
        before = [p.clone() for p in params]
        backend.rotational(
            name, params, grads, ours["state1"], ours["state2"], ours["steps"], ours["norms"], ours["avgs"],
            ours["rsteps"], _first_steps(k == 0, len(shapes)), lr=lr, momentum=momentum, nesterov=nesterov, angle=angle,
            norm_decay=norm_decay, rotational_eps=1e-8, zero_mean=zero_mean, projected=projected, maximize=maximize,
            grad_scale=grad_scale, telemetry=buffers, **HYPER[name])
        _reference_step(name, ref, grads, theirs, ref_states, k, momentum=momentum, nesterov=nesterov, angle=angle,
                        norm_decay=norm_decay, zero_mean=zero_mean, per_neuron=per_neuron, projected=projected,
                        maximize=maximize, grad_scale=grad_scale, lr=lr)
        for i, b in enumerate(buffers):
            expected = row_sums(before[i], params[i], grads[i], shapes[i][0], grad_scale)
            torch.testing.assert_close(b.cpu(), expected.cpu(), rtol=1e-10, atol=1e-300)
        for i, (p, q) in enumerate(zip(params, ref)):
            worst = max(worst, ((p.double() - q.double()).abs().max() / q.double().abs().max()).item())
    exact = dict(rtol=0, atol=0)
    for i in range(len(shapes)):
        for key in ("state1", "state2"):
            if ours[key]:  # the moments and momentum do not depend on p: the same operations, bit for bit
                torch.testing.assert_close(ours[key][i], theirs[key][i], **exact)
        if name == "adamw":
            assert float(ours["steps"][i]) == float(theirs["steps"][i]) == steps
        assert float(ours["rsteps"][i]) == float(ref_states[i]["rotational_step"]) == steps
        tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
        torch.testing.assert_close(ours["norms"][i], ref_states[i]["rotational_norm"], **tol)
        # A centred row of two elements has no tangent: its s is rounding noise.
        if not projected and not (zero_mean and params[i].numel() == 2 * len(ours["avgs"][i])):
            tol = dict(rtol=1e-10, atol=0) if dtype == torch.float64 else dict(rtol=1e-4, atol=0)
            torch.testing.assert_close(ours["avgs"][i], ref_states[i]["update_norm_avg"], **tol)
    sphere = 0.0
    for p, n in zip(params, ours["norms"]):
        rows = rv.rows(p, per_neuron).double()
        sphere = max(sphere, ((rows.norm(dim=1) - n.double()).abs() / n.double()).max().item())
        if zero_mean:
            drift = 1e-2 if dtype == torch.bfloat16 else 1e-6  # storage rounding
            assert (rows.mean(dim=1).abs() <= drift * n.double()).all()
    return worst, sphere


@pytest.mark.parametrize("name,kw", [
    ("adamw", {}),
    ("adamw", dict(zero_mean=False, maximize=True)),
    ("adamw", dict(projected=True)),
    ("sgd", dict(momentum=0.9)),
    ("sgd", dict(momentum=0.9, nesterov=True, zero_mean=False)),
    ("sgd", dict(momentum=0.0)),
    ("lion", {}),
    ("lion", dict(per_neuron=False, shapes=[(3, 17), (1, 300), (2, 2)])),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items() if k != "shapes") or "default")
def test_rotational_fp32_matches_reference(name, kw):
    worst, sphere = _compare(name, torch.float32, **kw)
    assert worst < 1e-5, worst
    assert sphere < 1e-6, sphere


@pytest.mark.parametrize("name,kw", [("adamw", {}), ("sgd", dict(momentum=0.9, nesterov=True)),
                                     ("lion", dict(zero_mean=False, projected=True))], ids=lambda x: str(x))
def test_rotational_fp64_matches_reference(name, kw):
    worst, sphere = _compare(name, torch.float64, **kw)
    assert worst < 1e-12, worst
    assert sphere < 1e-14, sphere


def test_rotational_bf16_within_rounding():
    worst, sphere = _compare("adamw", torch.bfloat16, steps=6)
    assert worst < 2e-2, worst
    assert sphere < 1e-2, sphere


def test_rotational_grad_scale_and_telemetry():
    """GradScaler's scale is taken off the gradient; telemetry is the float64 row sums of the step
    (per-neuron spheres in the kernel; a per-tensor sphere monitored per neuron from a snapshot)."""
    worst, _ = _compare("adamw", torch.float32, steps=4, scaled=True, telemetry=True)
    assert worst < 1e-5, worst
    worst, _ = _compare("sgd", torch.float32, steps=3, momentum=0.9, per_neuron=False, telemetry=True,
                        shapes=[(3, 17), (1, 300)])
    assert worst < 1e-5, worst


def test_rotational_found_inf_writes_nothing():
    name, dtype = "adamw", torch.float32
    params = [torch.randn(s, dtype=dtype, device=DEVICE) for s in SHAPES]
    for p in params:
        rv.centre_(p, True)
    st = _state(name, dtype, SHAPES, 0.0, True)
    grads = [torch.randn(s, dtype=dtype, device=DEVICE) for s in SHAPES]
    buffers = [torch.full((s[0], 4), float("nan"), dtype=torch.float64, device=DEVICE) for s in SHAPES]
    every = lambda: [t.clone() for key in st for t in st[key]] + [p.clone() for p in params]  # noqa: E731
    before = every()
    for found in (1.0, float("inf")):
        backend.rotational(name, params, grads, st["state1"], st["state2"], st["steps"], st["norms"], st["avgs"],
                           st["rsteps"], _first_steps(True, len(SHAPES)), lr=0.01, momentum=0.0, nesterov=False, angle=0.05,
                           norm_decay=0.9, rotational_eps=1e-8, zero_mean=True, projected=False, maximize=False,
                           grad_scale=torch.tensor(2.0, device=DEVICE),
                           found_inf=torch.tensor(found, device=DEVICE), telemetry=buffers, **HYPER[name])
    for a, b in zip(before, every()):
        assert torch.equal(a, b)
    assert all(b.isnan().all() for b in buffers)


def test_rotational_launches_do_not_grow_with_tensor_count():
    """One coefficient launch and one per row-length class, whatever the number of tensors."""
    shapes = [(3, 5)] * 12 + [(2, 7)] * 5
    params = [torch.randn(s, device=DEVICE) for s in shapes]
    for p in params:
        rv.centre_(p, True)
    st = _state("lion", torch.float32, shapes, 0.0, True)
    before = multi_tensor.launch_count
    backend.rotational("lion", params, [torch.randn_like(p) for p in params], st["state1"], [], [], st["norms"],
                       st["avgs"], st["rsteps"], _first_steps(True, len(shapes)), lr=0.01, momentum=0.0, nesterov=False,
                       angle=0.05, norm_decay=0.9, rotational_eps=1e-8, zero_mean=True, projected=False, maximize=False,
                       **HYPER["lion"])
    assert multi_tensor.launch_count - before == 2


# ------------------------------------------------------- stochastic rounding and compensated bf16
#
# The engine sums rows in another order than torch (and long rows through closed forms), so its
# fp32 result before the store differs from rotate_'s by ulps: a compensated 32-bit master keeps
# that difference, and any stochastic store lands on the other neighbour now and then. So the
# rounding is checked bit for bit against the reference's Rounder applied to the engine's own
# fp32 result, the same step run on fp32 copies of the master weights and states (its stores are
# exact); that fp32 result is checked against rotate_'s to fp32 rounding, and the states, which
# do not depend on p, against the reference's direction functions bit for bit.

#: Two on-chip row sizes and one long row (two blocks of the lowered limit).
LOW_SHAPES = [(4, 3), (3, 17), (2, 300)]
#: case: (parameter dtype, stochastic rounding, correction dtype or None)
LOW_PRECISION = {
    "sr-bf16": (torch.bfloat16, True, None),
    "sr-fp16": (torch.float16, True, None),
    "master32": (torch.bfloat16, False, torch.int16),
    "master32-sr": (torch.bfloat16, True, torch.int16),
    "master24": (torch.bfloat16, False, torch.int8),
    "master24-sr": (torch.bfloat16, True, torch.int8),
}


#: Under the interpreter every sum is numpy's, whatever the dtypes. Compiled for a GPU, the fp32
#: launch and the bf16/fp16 one may lay a row out differently (vector widths follow the element
#: size) and so sum it in another order: their fp32 results then differ by ulps, a 32-bit master
#: keeps that, and a stochastic store rounds the other way in rare elements.
EXACT = torch.device(DEVICE).type == "cpu"


def _assert_stored(param, correction, expected, expected_correction, what):
    """The engine's stored parameter (and correction) against the reference's rounding of the
    engine's fp32 result: bit for bit, or (EXACT false) to the layouts' rounding."""
    if EXACT:
        assert torch.equal(param, expected), what + ("parameter",)
        if correction is not None:
            assert torch.equal(correction, expected_correction), what + ("correction",)
        return
    differ = param != expected
    assert differ.float().mean() <= 0.01, what + (f"parameter: {int(differ.sum())} of {param.numel()} differ",)
    ulp = torch.finfo(param.dtype).eps
    assert ((param.double() - expected.double()).abs() <= 2 * ulp * expected.double().abs() + 1e-30).all(), \
        what + ("parameter",)
    if correction is not None:
        rtol = 2.0**-15 if correction.dtype == torch.int8 else 1e-6
        torch.testing.assert_close(combine(param, correction), combine(expected, expected_correction),
                                   rtol=rtol, atol=1e-30)


class _Capture(Rounder):
    """The reference's Rounder, keeping the fp32 parameter rotate_ hands it to store."""

    def store_param(self, param, w):
        self.w = w.clone()
        super().store_param(param, w)


def _rotational_call(name, params, grads, st, first, *, projected, momentum, **extra):
    backend.rotational(name, params, grads, st["state1"], st["state2"], st["steps"], st["norms"], st["avgs"],
                       st["rsteps"], _first_steps(first, len(params)), lr=0.03, momentum=momentum, nesterov=False,
                       angle=0.05, norm_decay=0.9, rotational_eps=1e-8, zero_mean=True, projected=projected,
                       maximize=False, **extra, **HYPER[name])


def _low_precision_steps(name, case, *, projected, steps=3, per_neuron=(True, True, True), telemetry=False,
                         wrong_key=False, seed=0):
    """``steps`` engine steps of ``case`` (LOW_PRECISION), each checked against the reference from
    the same inputs (module comment above). ``wrong_key``: the reference draws with another key."""
    dtype, stochastic, correction_dtype = LOW_PRECISION[case]
    shapes, n = LOW_SHAPES, len(LOW_SHAPES)
    momentum = 0.9 if name == "sgd" else 0.0
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype) for s in shapes]
    for p, flag in zip(params, per_neuron):
        rv.centre_(p, flag)
    corrections = []
    if correction_dtype is not None:  # arbitrary low bits: a load that dropped them would show
        info = torch.iinfo(correction_dtype)
        corrections = [torch.randint(info.min, info.max + 1, s, generator=gen).to(DEVICE, correction_dtype)
                       for s in shapes]
    # [key, count, index base]; a nonzero base on one tensor (a shard's first element).
    rngs = [torch.tensor([int(torch.randint(0, 2**32, (), generator=gen)), 5 + i, 1000 if i == 1 else 0],
                         dtype=torch.int64, device=DEVICE) for i in range(n)] if stochastic else []
    low = dict(rng=rngs, correction=corrections)
    st = _state(name, dtype, shapes, momentum, list(per_neuron))
    h = HYPER[name]
    for k in range(steps):
        grads = [((torch.randn(s, generator=gen, dtype=torch.float64) + (1.0 if k == 0 else 0.2))
                  * 10.0 ** (i % 3 - 1)).to(device=DEVICE, dtype=dtype) for i, s in enumerate(shapes)]
        masters = [combine(p, corrections[i]) if corrections else p.float() for i, p in enumerate(params)]
        before = {key: [t.clone() for t in ts] for key, ts in st.items()}
        params_before, corrections_before = [p.clone() for p in params], [c.clone() for c in corrections]
        rngs_before = [r.clone() for r in rngs]
        # The engine's fp32 result: the same step on fp32 copies (exact stores).
        exact = {key: [t.float() if key in ("state1", "state2") else t.clone() for t in ts]
                 for key, ts in before.items()}
        w = [m.clone() for m in masters]
        _rotational_call(name, w, [g.float() for g in grads], exact, k == 0, projected=projected, momentum=momentum)
        buffers = [torch.full((s[0], 4), float("nan"), dtype=torch.float64, device=DEVICE) for s in shapes] \
            if telemetry else []
        _rotational_call(name, params, grads, st, k == 0, projected=projected, momentum=momentum,
                         telemetry=buffers, **low)
        for i in range(n):
            rng = rngs_before[i].clone() if stochastic else None
            if rng is not None and wrong_key:
                rng[0] ^= 1
            # The reference from the same inputs, its Rounder shared by the direction and rotate_.
            p_ref = params_before[i].clone()
            store = _Capture(rng, p_ref, corrections_before[i].clone() if corrections else None)
            s1, s2 = (before[key][i].clone() if before[key] else None for key in ("state1", "state2"))
            if name == "adamw":
                u = rv.adamw_direction(grads[i], s1, s2, int(before["steps"][i]) + 1, beta1=h["beta1"],
                                       beta2=h["beta2"], eps=h["eps"], maximize=False, grad_scale=None, store=store)
            elif name == "lion":
                u = rv.lion_direction(grads[i], s1, beta1=h["beta1"], beta2=h["beta2"], maximize=False,
                                      grad_scale=None, store=store)
            else:
                u = rv.sgd_direction(grads[i], s1, k == 0, momentum=momentum, nesterov=False, maximize=False,
                                     grad_scale=None, store=store)
            ref_state = dict(rotational_norm=before["norms"][i].clone(), update_norm_avg=before["avgs"][i].clone(),
                             rotational_step=before["rsteps"][i].clone())
            rv.rotate_(p_ref, u, ref_state, angle=0.05, lr=0.03, norm_decay=0.9, eps=1e-8, zero_mean=True,
                       per_neuron=per_neuron[i], mode="projected" if projected else "equilibrium", store=store)
            # Bit for bit: the engine's stores are the reference's rounding of its fp32 result.
            expected = params_before[i].clone()
            expected_correction = corrections_before[i].clone() if corrections else None
            Rounder(rng, expected, expected_correction).store_param(expected, w[i])
            what = (case, name, k, i)
            _assert_stored(params[i], corrections[i] if corrections else None, expected, expected_correction, what)
            for key, ref in (("state1", s1), ("state2", s2)):
                if ref is not None:  # element-wise: bit for bit on a GPU too
                    assert torch.equal(st[key][i], ref), what + (key,)
            for key in ("norms", "avgs"):
                if EXACT:
                    assert torch.equal(st[key][i], exact[key][i]), what + (key,)
                else:
                    torch.testing.assert_close(st[key][i], exact[key][i], rtol=2e-6, atol=0)
            assert float(st["rsteps"][i]) == float(ref_state["rotational_step"]) == k + 1
            if name == "adamw":
                assert float(st["steps"][i]) == k + 1
            if stochastic:  # read on the device, never advanced by the kernel
                assert torch.equal(rngs[i], rngs_before[i])
            # The engine's fp32 result is rotate_'s to fp32 rounding (the sums' order).
            ref_w = store.w.reshape(w[i].shape)
            assert ((w[i] - ref_w).abs().max() <= 1e-6 * ref_w.abs().max()).item(), what
            torch.testing.assert_close(st["norms"][i], ref_state["rotational_norm"], rtol=2e-6, atol=0)
            if not projected:
                torch.testing.assert_close(st["avgs"][i], ref_state["update_norm_avg"], rtol=1e-4, atol=0)
            if telemetry:  # of the master weights, in the kernel or (a per-tensor sphere) from a snapshot
                after = combine(params[i], corrections[i]) if corrections else params[i]
                torch.testing.assert_close(buffers[i], row_sums(masters[i], after, grads[i], shapes[i][0], None),
                                           rtol=1e-10, atol=1e-300)
        for r in rngs:  # the driver's advance after the step: [key, count + 1, base]
            r[1] += 1


@pytest.mark.parametrize("case", list(LOW_PRECISION))
def test_rotational_low_precision_matches_reference_bit_for_bit(case):
    """Stochastic rounding (bf16, fp16) and compensated bf16 (32- and 24-bit masters, with and
    without stochastic rounding) for each base optimizer, on- and off-chip rows. The mode only
    changes the step's scale, not a load or a store: each case takes both, each optimizer both
    in three cases (the whole product would double the interpreter's time)."""
    for j, name in enumerate(("adamw", "sgd", "lion")):
        _low_precision_steps(name, case, projected=(list(LOW_PRECISION).index(case) + j) % 2 == 1)


def test_rotational_low_precision_telemetry_measures_master_weights():
    """In-kernel telemetry (per-neuron rows, on chip and long) and a per-tensor sphere monitored
    per neuron (snapshot) both measure the master weights."""
    _low_precision_steps("adamw", "master24-sr", projected=False, steps=2, per_neuron=(False, True, True),
                         telemetry=True)


def test_rotational_low_precision_wrong_key_is_detected():
    """The comparison can fail: the reference drawing with another key disagrees."""
    with pytest.raises(AssertionError, match="parameter|state1"):
        _low_precision_steps("adamw", "sr-bf16", projected=False, steps=1, wrong_key=True)


def test_rotational_low_precision_arguments_validated_before_writing():
    """Malformed rng or correction lists are refused (ValueError) before a launch writes anything,
    the step counts included."""
    params = [torch.randn(s, device=DEVICE).to(torch.bfloat16) for s in LOW_SHAPES]
    half = [p.to(torch.float16) for p in params]
    st, half_st = (_state("lion", p[0].dtype, LOW_SHAPES, 0.0, True) for p in (params, half))
    grads = [torch.randn_like(p) for p in params]
    every = lambda: [t.clone() for s in (st, half_st) for key in s for t in s[key]] + \
        [p.clone() for p in params + half]  # noqa: E731
    before = every()
    rng = lambda: [torch.zeros(3, dtype=torch.int64, device=DEVICE) for _ in params]  # noqa: E731
    bad = [
        dict(rng=rng()[:2]),
        dict(rng=[r.to(torch.int32) for r in rng()]),
        dict(correction=[torch.zeros(p.shape, dtype=torch.int32, device=DEVICE) for p in params]),
        dict(correction=[torch.zeros(p.shape, dtype=torch.int16, device=DEVICE) for p in params[:2]]),
        dict(correction=[torch.zeros(p.shape, dtype=torch.int16 if i else torch.int8, device=DEVICE)
                         for i, p in enumerate(params)]),
        dict(correction=[torch.zeros(p.shape[::-1], dtype=torch.int16, device=DEVICE) for p in params]),
    ]
    for extra in bad:
        with pytest.raises(ValueError):
            _rotational_call("lion", params, grads, st, True, projected=False, momentum=0.0, **extra)
    corrections = [torch.zeros(p.shape, dtype=torch.int16, device=DEVICE) for p in half]
    with pytest.raises(ValueError):  # compensation is for bf16 parameters only
        _rotational_call("lion", half, [g.to(torch.float16) for g in grads], half_st, True, projected=False,
                         momentum=0.0, correction=corrections)
    for a, b in zip(before, every()):
        assert torch.equal(a, b)


def test_rotational_rng_leaves_fp32_rounded_to_nearest():
    """fp32 stores are exact: with rng the step is the one without, and the rng is left as it was."""
    runs = []
    for rng in ([], [torch.tensor([12345, 3, 0], dtype=torch.int64, device=DEVICE) for _ in LOW_SHAPES]):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(DEVICE) for s in LOW_SHAPES]
        for p in params:
            rv.centre_(p, True)
        st = _state("adamw", torch.float32, LOW_SHAPES, 0.0, True)
        _rotational_call("adamw", params, [torch.randn(s, generator=gen).to(DEVICE) for s in LOW_SHAPES], st, True,
                         projected=False, momentum=0.0, rng=rng)
        assert all(int(r[1]) == 3 for r in rng)
        runs.append(params + st["state1"] + st["state2"] + st["norms"] + st["avgs"])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------- telemetry of the base steps

TELEMETRY_SHAPES = [(7,), (5, 3, 3), (33, 17), (2, 70)]


def _base_call(name, params, grads, state, telemetry, grad_scale=None, found_inf=None):
    common = dict(maximize=False, grad_scale=grad_scale, found_inf=found_inf, telemetry=telemetry)
    if name == "adamw":
        backend.adamw(params, grads, state["m"], state["v"], state["vmax"], state["steps"], lr=1e-2, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0, amsgrad=True, **common)
    elif name == "sgd":
        backend.sgd(params, grads, state["m"], state["first"], lr=1e-2, weight_decay=0.1, momentum=0.9,
                    dampening=0.0, nesterov=True, decoupled_weight_decay=False, decay_lr_scale=1.0, **common)
        state["first"] = _first_steps(False, len(params))
    else:
        backend.lion(params, grads, state["m"], lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_lr_scale=1.0,
                     **common)


def _fresh(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
              for s in TELEMETRY_SHAPES]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    state = dict(m=zeros(), v=zeros(), vmax=zeros(), first=_first_steps(True, len(params)),
                 steps=[torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in params])
    return params, state


@pytest.mark.parametrize("name,dtype", [("adamw", torch.float32), ("sgd", torch.float32), ("lion", torch.float32),
                                        ("adamw", torch.bfloat16)], ids=str)
def test_base_telemetry_matches_row_sums_and_changes_nothing(name, dtype, monkeypatch):
    monkeypatch.setattr(multi_tensor, "TELEMETRY_MAX_BLOCK", 32)  # rows of 51 and 70 loop over blocks
    monitored, state = _fresh(dtype)
    plain, plain_state = _fresh(dtype)
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor(256.0, device=DEVICE)
    for _ in range(3):
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 256).to(device=DEVICE, dtype=dtype)
                 for p in monitored]
        rows = [p.shape[0] if p.dim() >= 2 else 1 for p in monitored]
        buffers = [torch.full((k, 4), float("nan"), dtype=torch.float64, device=DEVICE) for k in rows]
        before = [p.clone() for p in monitored]
        _base_call(name, monitored, grads, state, buffers, grad_scale=scale)
        _base_call(name, plain, grads, plain_state, [], grad_scale=scale)
        for i, b in enumerate(buffers):
            torch.testing.assert_close(b, row_sums(before[i], monitored[i], grads[i], rows[i], scale),
                                       rtol=1e-12, atol=1e-300)
        for a, b in zip(monitored + state["m"] + state["v"], plain + plain_state["m"] + plain_state["v"]):
            assert torch.equal(a, b)
    # A skipped step writes nothing, the buffers included.
    buffers = [torch.full((k, 4), float("nan"), dtype=torch.float64, device=DEVICE) for k in rows]
    kept = [p.clone() for p in monitored]
    _base_call(name, monitored, grads, state, buffers, grad_scale=scale, found_inf=torch.tensor(1.0, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(kept, monitored))
    assert all(b.isnan().all() for b in buffers)


def test_backend_advertises_rotational_and_telemetry():
    assert backend.TELEMETRY is True and callable(backend.rotational)


# ------------------------------------------------------------------------------- 8-bit states
#
# state_bits=8 through the optimizer classes on the Triton backend, in lock step with the reference
# (each step from the reference's weights and states): codes, block scales, rng streams and step
# counts bit for bit. The parameters are compared as above: fp32 ones to fp32 rounding of their
# row sums; a bf16 one with a stochastic 24-bit master bit for bit (EXACT) against the reference's
# Rounder applied to the engine's own fp32 result, an fp32 "oracle" run of the same step (fp32
# parameters = the master weights, the same 8-bit states and streams), itself checked against the
# reference's master weights to their 24-bit rounding.

QUANTIZED_CLASSES = {
    "adamw": ("RotationalAdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd": ("RotationalSGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "lion": ("RotationalLion", {"lr": 1e-3, "weight_decay": 1.0}),
}
QUANTIZED_STORAGES = {
    "fp32": (torch.float32, {}),
    "bf16-master24-sr": (torch.bfloat16, {"master_weight_bits": 24, "stochastic_rounding": True}),
    "oracle": (torch.float32, {"stochastic_rounding": True}),  # fp32 copies of the master weights
}
#: Rows of 301 (over the lowered on-chip limit: two passes), 21 and 40, none a multiple of 256, so
#: blocks straddle rows and tensors; a bias in a group of its own (the base optimizer's 8-bit step).
QUANTIZED_SHAPES = [(6, 301), (5, 3, 7), (9, 40), (11,)]


def _quantized_model(name, storage, backend, per_neuron):
    import wdopt

    cls, hyper = QUANTIZED_CLASSES[name]
    dtype, options = QUANTIZED_STORAGES[storage]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(DEVICE, dtype)) for s in QUANTIZED_SHAPES]
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]
    opt = getattr(wdopt, cls)(groups, backend=backend, per_neuron=per_neuron, state_bits=8, rounding_seed=99,
                              **hyper, **options)
    return opt, params


def _quantized_lock_step(name, storage, per_neuron, steps=3):
    ours, ps = _quantized_model(name, storage, "triton", per_neuron)
    ref, qs = _quantized_model(name, storage, "reference", per_neuron)
    compensated = storage != "fp32"
    oracle, ws = _quantized_model(name, "oracle", "triton", per_neuron) if compensated else (None, [])
    if compensated:
        with torch.no_grad():
            for w, q in zip(ws, qs):
                w.copy_(ref.master_weight(q))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        # A GradScaler scale of 3 at step 1 (not a power of two: all unscale by its float32 reciprocal).
        scale = 3.0 if step == 1 else 1.0
        grads = [(torch.randn(q.shape, generator=g) * scale).to(DEVICE, q.dtype) for q in qs]
        before = [(q.detach().clone(), {k: v.clone() for k, v in ref.state[q].items()}) for q in qs]
        for opt, params in ((ours, ps), (ref, qs), (oracle, ws)):
            if opt is None:
                continue
            for p, grad in zip(params, grads):
                p.grad = grad.to(p.dtype)
            if step == 1:
                opt.grad_scale = torch.tensor(scale, device=DEVICE)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
        for i, (p, q) in enumerate(zip(ps, qs)):
            sa, sb = ours.state[p], ref.state[q]
            what = (name, storage, step, i)
            assert sorted(sa) == sorted(sb), what + (sorted(sa), sorted(sb))
            assert sa["exp_avg" if name != "sgd" else "momentum_buffer"].dtype == torch.int8, what
            for key, value in sb.items():
                if key in ("rotational_norm", "update_norm_avg"):
                    torch.testing.assert_close(sa[key], value, rtol=1e-4, atol=1e-6)
                elif key != "correction":  # codes, scales, rng, step counts; the correction below
                    assert sa[key].dtype == value.dtype and torch.equal(sa[key], value), what + (key,)
            if not compensated:
                a, b = p.detach().double(), q.detach().double()
                rows = b.reshape(b.shape[0], -1) if per_neuron and b.dim() > 1 else b.reshape(1, -1)
                bound = 16 * torch.finfo(torch.float32).eps * rows.norm(dim=1, keepdim=True)
                assert ((a - b).reshape(rows.shape).abs() <= bound).all(), what + ((a - b).abs().max(),)
                continue
            w, so = ws[i], oracle.state[ws[i]]
            for key, value in sb.items():  # the oracle ran the same step on the same states
                if key not in ("rotational_norm", "update_norm_avg", "correction"):
                    assert torch.equal(so[key], value), what + ("oracle", key)
            q_before, s_before = before[i]
            expected = q_before.clone()
            # The correction starts at zero (the master weight is the bf16 parameter); the driver
            # advances the stream's count after the step.
            expected_correction = s_before.get("correction", torch.zeros_like(q_before, dtype=torch.int8)).clone()
            rng = sb["rng"].clone()
            rng[1] -= 1
            Rounder(rng, expected, expected_correction).store_param(expected, w.detach())
            _assert_stored(p.detach(), sa["correction"], expected, expected_correction, what)
            # The reference's stochastic 24-bit master of its own fp32 result: to that rounding.
            torch.testing.assert_close(w.detach().double(), ref.master_weight(q).double(), rtol=2.0**-15, atol=1e-6)
        with torch.no_grad():  # the next step from the same weights and states
            for opt, params in ((ours, ps), (oracle, ws)):
                if opt is None:
                    continue
                for p, q in zip(params, qs):
                    p.copy_(ref.master_weight(q) if p.dtype != q.dtype else q)
                    for key, value in ref.state[q].items():
                        if key in opt.state[p]:
                            opt.state[p][key].copy_(value)
    rng = ours.state[ps[0]].get("rng")
    assert (rng is not None and int(rng[1]) == steps) == compensated


@pytest.mark.parametrize("storage", ["fp32", "bf16-master24-sr"])
@pytest.mark.parametrize("name", list(QUANTIZED_CLASSES))
def test_rotational_8_bit_states_match_the_reference_in_lock_step(name, storage):
    """RotationalAdamW, RotationalSGD and RotationalLion with state_bits=8, fp32 and bf16 with a
    stochastic 24-bit master, per-neuron rows on chip and long (module comment above)."""
    _quantized_lock_step(name, storage, per_neuron=True)


def test_rotational_8_bit_states_whole_tensor_spheres():
    """Per-tensor spheres: one long row per tensor, its blocks inside it."""
    _quantized_lock_step("adamw", "bf16-master24-sr", per_neuron=False, steps=2)


def test_rotational_8_bit_skipped_step_and_bad_scales_write_nothing():
    """GradScaler's inf skip leaves parameters, codes, scales and streams as they were (the block
    phase skips too); scales or codes that do not fit are refused (ValueError) before a launch
    writes anything, the step counts included."""
    opt, ps = _quantized_model("adamw", "bf16-master24-sr", "triton", True)
    gen = torch.Generator().manual_seed(1)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype)
    opt.step()
    def every():
        return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]

    before = every()
    opt.grad_scale, opt.found_inf = torch.ones((), device=DEVICE), torch.ones((), device=DEVICE)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, every()))
    params = ps[:3]
    states = [opt.state[p] for p in params]
    st = {"state1": [s["exp_avg"] for s in states], "state2": [s["exp_avg_sq"] for s in states],
          "steps": [s["step"] for s in states], "norms": [s["rotational_norm"] for s in states],
          "avgs": [s["update_norm_avg"] for s in states], "rsteps": [s["rotational_step"] for s in states]}
    scales = {1: [s["exp_avg_block_scale"] for s in states], 2: [s["exp_avg_sq_block_scale"] for s in states]}
    low = {"rng": [s["rng"] for s in states], "correction": [s["correction"] for s in states]}
    for bad in ({1: scales[1]}, {1: scales[1], 2: [t[:-1] for t in scales[2]]}, {**scales, 2: scales[2][:2]}):
        with pytest.raises(ValueError, match="scale"):
            _rotational_call("adamw", params, [p.grad for p in params], st, False, projected=False, momentum=0.0,
                             scales=bad, **low)
    swapped = {**st, "state1": st["state2"], "state2": st["state1"]}  # uint8 exp_avg, int8 exp_avg_sq
    with pytest.raises(ValueError, match="state"):
        _rotational_call("adamw", params, [p.grad for p in params], swapped, False, projected=False, momentum=0.0,
                         scales=scales, **low)
    assert all(torch.equal(a, b) for a, b in zip(before, every()))
