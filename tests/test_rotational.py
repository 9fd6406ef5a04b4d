"""Rotational optimizers (docs/theory.md section 3): invariants after every step, the exact angle with
norm_decay = 0, an independent per-row implementation, base steps for non-rotational tensors, state
dicts, GradScaler, and construction errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import clone_leaves

BACKENDS = ["reference"] + (["cpu"] if "cpu" in wdopt.available_backends("cpu") else [])

CLASSES = {
    "adamw": (wdopt.RotationalAdamW, wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd": (wdopt.RotationalSGD, wdopt.FusedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "lion": (wdopt.RotationalLion, wdopt.FusedLion, dict(lr=1e-3, weight_decay=1.0)),
}


def small_cnn():
    # Tanh, not ReLU, before the classifier: after non-negative features every gradient row of the
    # Linear has one sign, Adam's first direction is then constant per row, its centred tangent is
    # rounding noise, and two correct implementations rotate that noise differently.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))


def small_transformer_block():
    return torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True,
                                            norm_first=True, dropout=0.0)


def _loss(model, x):
    out = model(x)
    return out.pow(2).mean() + out.mean()


def _inputs(kind, g):
    return torch.randn(4, 3, 8, 8, generator=g) if kind == "cnn" else torch.randn(4, 5, 16, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_invariants_after_every_step(backend, name, kind, dtype):
    torch.manual_seed(0)
    model = (small_cnn() if kind == "cnn" else small_transformer_block()).to(dtype)
    cls, _, hyper = CLASSES[name]
    opt = cls(model.parameters(), backend=backend, **hyper)
    rotational = [p for g in opt.param_groups for p in g["params"] if opt._is_rotational(p, g)]
    assert rotational and len(rotational) < len(list(model.parameters()))
    norms = {p: p.detach().reshape(p.shape[0], -1).norm(dim=1).clone() for p in rotational}
    g = torch.Generator().manual_seed(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for _ in range(30):
        opt.zero_grad()
        _loss(model, _inputs(kind, g).to(dtype)).backward()
        before = {p: p.detach().clone() for p in rotational}
        opt.step()
        for p in rotational:
            r = p.detach().reshape(p.shape[0], -1)
            torch.testing.assert_close(r.norm(dim=1), norms[p], rtol=tol, atol=0)
            assert r.mean(dim=1).abs().max() <= tol * r.abs().max()
        # (A row whose centred direction is exactly 0 stays put: Lion's sign update on a row of
        # same-signed gradients, e.g. a Linear after ReLU features. Most rows move.)
        assert sum(not torch.equal(p.detach(), before[p]) for p in rotational) >= len(rotational) - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
def test_angle_with_no_averaging_is_atan_of_target(backend, name):
    """norm_decay = 0: the tangent step has length η_r·n, so the angle is atan(η_r) exactly."""
    cls, _, hyper = CLASSES[name]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    target = 0.02
    opt = cls([w], update_norm_decay_factor=0.0, target_rotation=target, backend=backend, **hyper)
    for _ in range(5):
        before = w.detach().clone()
        w.grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
        opt.step()
        a, b = before, w.detach()
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        sin = torch.linalg.vector_norm(b / b.norm(dim=1, keepdim=True) - cos[:, None] * a / a.norm(dim=1, keepdim=True), dim=1)
        angle = torch.atan2(sin, cos)
        assert (angle - math.atan(target)).abs().max() < 1e-6


def independent_rotational_adamw(w, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8, norm_decay=0.9, rot_eps=1e-8):
    """RotationalAdamW per row, written from docs/theory.md without the library (fp64)."""
    w = w.clone()
    w = (w - w.mean(1, keepdim=True)) * (w.norm(dim=1, keepdim=True) / (w - w.mean(1, keepdim=True)).norm(dim=1, keepdim=True))
    n = w.norm(dim=1)
    m, v, s = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(w.shape[0], dtype=w.dtype)
    angle = math.sqrt(2 * lr * wd * (1 - betas[0]) / (1 + betas[0]))
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        u = (m / (1 - betas[0] ** t)) / (torch.sqrt(v / (1 - betas[1] ** t)) + eps)
        for i in range(w.shape[0]):
            ui = u[i] - u[i].mean()
            ui = ui - w[i] * torch.dot(ui, w[i]) / n[i] ** 2
            s[i] = norm_decay * s[i] + (1 - norm_decay) * torch.dot(ui, ui)
            u_bar = math.sqrt(s[i] / (1 - norm_decay**t))
            wi = w[i] - angle * n[i] * ui / (u_bar + rot_eps)
            w[i] = wi * n[i] / wi.norm()
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotational_adamw_matches_an_independent_implementation(backend):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 12, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 12, generator=g, dtype=torch.float64) * 10 ** (k % 3 - 1) for k in range(30)]
    w = w0.clone().requires_grad_()
    opt = wdopt.RotationalAdamW([w], lr=1e-2, weight_decay=0.1, backend=backend)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), independent_rotational_adamw(w0, grads, 1e-2, 0.1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", CLASSES)
def test_non_rotational_tensors_take_the_base_step(name):
    cls, base, hyper = CLASSES[name]
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 6, requires_grad=True), torch.randn(4, requires_grad=True)
    bias_copy = bias.detach().clone().requires_grad_()
    opt, opt_base = cls([weight, bias], **hyper), base([bias_copy], **hyper)
    for _ in range(5):
        weight.grad, bias.grad = torch.randn(4, 6), torch.randn(4)
        bias_copy.grad = bias.grad.clone()
        opt.step()
        opt_base.step()
    torch.testing.assert_close(bias.detach(), bias_copy.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_resumes_identically(backend, name):
    cls, _, hyper = CLASSES[name]
    hyper = dict(hyper, backend=backend)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 6, generator=g)
    grads = [torch.randn(4, 6, generator=g) for _ in range(8)]
    straight = w0.clone().requires_grad_()
    opt = cls([straight], **hyper)
    for grad in grads:
        straight.grad = grad.clone()
        opt.step()
    resumed = w0.clone().requires_grad_()
    first = cls([resumed], **hyper)
    for grad in grads[:4]:
        resumed.grad = grad.clone()
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = cls([resumed], **hyper)  # construction centres again: a no-op on a centred tensor
    second.load_state_dict(torch.load(buf, weights_only=True))
    for grad in grads[4:]:
        resumed.grad = grad.clone()
        second.step()
    # Bit for bit: construction leaves already-centred rows alone.
    torch.testing.assert_close(resumed.detach(), straight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
def test_grad_scaler_inf_skips_everything(backend, name):
    cls, _, hyper = CLASSES[name]
    w = torch.randn(4, 6, requires_grad=True)
    opt = cls([w], backend=backend, **hyper)
    w.grad = torch.randn(4, 6)
    opt.step()
    before = w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    w.grad = torch.randn(4, 6)
    opt.step()
    assert torch.equal(w.detach(), before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in state.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_mode_keeps_the_norm_and_steps_along_the_tangent(backend):
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    opt = wdopt.RotationalSGD([w], lr=0.05, weight_decay=0.0, rotational=True, mode="projected", backend=backend)
    n = w.detach().norm(dim=1)
    before = w.detach().clone()
    w.grad = torch.randn(3, 8, dtype=torch.float64)
    opt.step()
    u = w.grad - w.grad.mean(1, keepdim=True)
    u = u - before * (u * before).sum(1, keepdim=True) / n[:, None] ** 2
    moved = before - 0.05 * u
    torch.testing.assert_close(w.detach(), moved * (n / moved.norm(dim=1))[:, None])


@pytest.mark.parametrize("make,message", [
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 3, requires_grad=True)], weight_decay=0.0), "no parameter is rotational"),
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 3, requires_grad=True)], weight_decay=0.0, rotational=True), "no weight decay"),
    (lambda: wdopt.RotationalAdamW([torch.ones(4, 3, requires_grad=True)]), "row 0 has zero centred norm"),
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 1, requires_grad=True)]), "zero centred norm"),
    (lambda: wdopt.RotationalAdamW([torch.randn(5, requires_grad=True)], rotational=True), "dim >= 2"),
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 3, requires_grad=True)], amsgrad=True), "amsgrad"),
    (lambda: wdopt.RotationalSGD([torch.randn(4, 3, requires_grad=True)], weight_decay=0.1, dampening=0.1), "dampening"),
    (lambda: wdopt.RotationalLion([torch.randn(4, 3, requires_grad=True)], weight_decay=0.1, mode="sphere"), "mode"),
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 3, requires_grad=True)], rotational_eps=0.0), "rotational_eps"),
    (lambda: wdopt.RotationalAdamW([torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)]), "complex"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_construction_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# Fused rotational kernels on a model: the C++ CPU kernel here; on a GPU machine the CUDA and
# Triton kernels too (Triton on CPU tensors runs under the interpreter: tests/test_triton_rotational.py).
FUSED = [(b, d) for b, d in backend_device_pairs() if b != "reference" and not (b == "triton" and d == "cpu")]


@pytest.mark.skipif(not FUSED, reason="no fused rotational kernel can run here")
@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fused_kernel_matches_the_reference(backend, device, name, kind, dtype):
    """30 steps, parameters and every state tensor. The fused kernel sums rows in another order
    than torch's reductions do, so agreement is to rounding: a few fp32 ulps of the weights, about
    1e-13 in fp64, and one bf16 ulp of drift."""
    cls, _, hyper = CLASSES[name]
    torch.manual_seed(0)
    models = [(small_cnn() if kind == "cnn" else small_transformer_block()).to(device=device, dtype=dtype)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [cls(models[0].parameters(), backend=backend, **hyper),
            cls(models[1].parameters(), backend="reference", **hyper)]
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        x = _inputs(kind, g).to(device=device, dtype=dtype)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            _loss(model, x).backward()
        # the same gradients for both, so only the optimizers differ
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        for key, value in opts[1].state[b].items():
            torch.testing.assert_close(opts[0].state[a][key], value, **tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLASSES)
def test_zero_decay_fraction_and_projected_without_decay(backend, name):
    """lr = 0 (a warm-up's first step) rotates by 0; projected mode needs no weight decay."""
    cls, _, hyper = CLASSES[name]
    w = torch.randn(4, 6, requires_grad=True)
    opt = cls([w], backend=backend, **hyper)
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    w.grad = torch.randn(4, 6)
    opt.step()
    torch.testing.assert_close(w.detach(), before)
    v = torch.randn(4, 6, requires_grad=True)
    projected = cls([v], **dict(hyper, weight_decay=0.0), rotational=True, mode="projected", backend=backend)
    v.grad = torch.randn(4, 6)
    projected.step()
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_loaded_after_construction_freeze_their_centred_norm(backend):
    w = torch.randn(4, 6, requires_grad=True)
    opt = wdopt.RotationalAdamW([w], weight_decay=0.1, backend=backend)
    with torch.no_grad():
        w.copy_(torch.randn(4, 6) + 3.0)  # e.g. a checkpoint loaded into the model afterwards
    expected = (w.detach() - w.detach().mean(1, keepdim=True)).norm(dim=1)
    w.grad = torch.randn(4, 6)
    opt.step()
    torch.testing.assert_close(opt.state[w]["rotational_norm"], expected)
    torch.testing.assert_close(w.detach().norm(dim=1), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_rotational_state_keeps_its_math_dtype(backend):
    w = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    opt = wdopt.RotationalAdamW([w], weight_decay=0.1, backend=backend)
    w.grad = torch.randn(4, 6, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    opt2 = wdopt.RotationalAdamW([w], weight_decay=0.1, backend=backend)
    opt2.load_state_dict(saved)
    state = opt2.state[w]
    assert state["rotational_norm"].dtype == torch.float32 and state["update_norm_avg"].dtype == torch.float32
    assert torch.equal(state["rotational_norm"], opt.state[w]["rotational_norm"])
    w.grad = torch.randn(4, 6, dtype=torch.bfloat16)
    opt2.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors_are_not_rotational(backend):
    """A 0×6 tensor in a rotational group has no sphere: it takes the base AdamW step (its state is
    AdamW's, with no rotational entries) while the 4×6 tensor beside it is rotated on its sphere."""
    w, empty = torch.randn(4, 6, requires_grad=True), torch.zeros(0, 6, requires_grad=True)
    opt = wdopt.RotationalAdamW([w, empty], weight_decay=0.1, backend=backend)
    w.grad, empty.grad = torch.randn(4, 6), torch.zeros(0, 6)
    before = w.detach().clone()
    opt.step()
    assert sorted(opt.state[empty]) == ["exp_avg", "exp_avg_sq", "step"], sorted(opt.state[empty])
    assert opt.state[empty]["exp_avg"].shape == (0, 6) and float(opt.state[empty]["step"]) == 1
    state = opt.state[w]
    assert float(state["rotational_step"]) == 1 and not torch.equal(w.detach(), before)
    torch.testing.assert_close(w.detach().norm(dim=1), state["rotational_norm"])
    torch.testing.assert_close(w.detach().mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)


_SHARDED = """
import torch, torch.distributed as dist, wdopt
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
mesh = init_device_mesh("cpu", (2,))
def param(placement):
    return torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [placement]))
for placement, per_neuron in [(Shard(1), True), (Shard(0), False)]:
    try:
        wdopt.RotationalAdamW([param(placement)], per_neuron=per_neuron)
    except ValueError as error:
        assert "sharded with Shard(dim=" in str(error) and "parameter 0 of param group 0" in str(error), error
    else:
        raise AssertionError(f"{placement} per_neuron={per_neuron} was accepted")
print("ok")
"""


def test_sharded_rows_are_refused():
    """A DTensor whose neurons are split across ranks cannot be normalised by a local kernel."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.skipif("cpu" not in wdopt.available_backends("cpu"), reason="the C++ CPU backend is not built")
def test_a_whole_tensor_sphere_longer_than_the_scratch_row():
    """per_neuron=False on a tensor of more than 2^20 elements: the CPU kernel copies the row into
    a buffer of its own instead of its thread's scratch (csrc/cpu/rotational_cpu.cpp, kScratchRow);
    three steps against the reference, to rounding (the row's sums are 1.1M terms long)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(1100, 1001))
    b = torch.nn.Parameter(a.detach().clone())
    opts = [wdopt.RotationalAdamW([p], lr=1e-2, weight_decay=0.1, per_neuron=False, backend=backend)
            for p, backend in ((a, "cpu"), (b, "reference"))]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(a.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
    assert a.detach().norm().item() == pytest.approx(opts[0].state[a]["rotational_norm"].item(), rel=1e-5)


# ------------------------------------------------------------------------------------ low precision
#
# Stochastic rounding and compensated bf16 parameters (wdopt/reference/rotational.py, rounding.py).
# The fused kernels sum rows in another order than torch's reductions, so a parameter agrees with
# the reference to rounding: its fp32 value before the store may differ by an ulp, and a stochastic
# store then lands on the other bf16 neighbour with probability ~2^-16 per element. The states do
# not depend on p: their stochastic stores are bit for bit.

LOW_PRECISION = {
    "sr-bf16": (torch.bfloat16, dict(stochastic_rounding=True)),
    "sr-fp16": (torch.float16, dict(stochastic_rounding=True)),
    "master32": (torch.bfloat16, dict(master_weight_bits=32)),
    "master24-sr": (torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True)),
}
LOW_FUSED = [(b, d) for b, d in FUSED] or [("reference", "cpu")]
#: Triton's rotational kernel under the interpreter (slow): two cases that cover its loads and stores.
LOW_TRITON = [("triton", "cpu", name, option) for name, option in (("adamw", "master24-sr"), ("sgd", "sr-fp16"))
              if ("triton", "cpu") in backend_device_pairs()]


def _low_precision_model(cls, hyper, dtype, options, backend, device, seed=0, **extra):
    torch.manual_seed(seed)
    # Odd rows, one row over the CPU kernel's vector width, a 3-d tensor; a bias takes the base step.
    shapes = [(6, 33), (4, 300), (3, 5, 7), (7,)]
    params = [torch.nn.Parameter((torch.randn(s) * 0.5).to(device=device, dtype=dtype)) for s in shapes]
    opt = cls([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}], backend=backend,
              rounding_seed=1234, **hyper, **options, **extra)
    return opt, params


def _low_precision_run(cls, hyper, dtype, options, backend, device, steps, seed=0, **extra):
    opt, params = _low_precision_model(cls, hyper, dtype, options, backend, device, seed, **extra)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend,device,name,option",
                         [(b, d, n, o) for b, d in LOW_FUSED for n in CLASSES for o in LOW_PRECISION] + LOW_TRITON)
def test_low_precision_fused_kernel_matches_the_reference(backend, device, name, option):
    """Four steps on the fused kernel and on the reference in lock step, each from the reference's
    weights (a one-ulp difference would otherwise spread through its row's norm): the states
    (moments, rng counts, rotational steps) bit for bit, the norms to fp32 rounding, compensated
    master weights to fp32 rounding, bf16/fp16 values to one ulp in rare elements."""
    cls, _, hyper = CLASSES[name]
    dtype, options = LOW_PRECISION[option]
    ours, ps = _low_precision_model(cls, hyper, dtype, options, backend, device)
    ref, qs = _low_precision_model(cls, hyper, dtype, options, "reference", device)
    ulp = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(ps, qs):
            q.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
            p.grad = q.grad.clone()
        ours.step()
        ref.step()
        for p, q in zip(ps, qs):
            if "correction" in ref.state[q]:  # a 24-bit master's stochastic split may flip its last bit
                a, b = ours.master_weight(p).double(), ref.master_weight(q).double()
                rtol = 2.0**-15 if options["master_weight_bits"] == 24 else 1e-5
                torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)
            differ = p.detach() != q.detach()
            assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {p.numel()} elements differ"
            assert ((p.double() - q.double()).abs() <= 2 * ulp * q.double().abs() + 1e-30).all()
            sa, sb = ours.state[p], ref.state[q]
            assert sorted(sa) == sorted(sb)
            for key, value in sb.items():
                if key in ("rotational_norm", "update_norm_avg"):
                    torch.testing.assert_close(sa[key], value, rtol=1e-4, atol=1e-6,
                                               msg=lambda m, key=key: f"{key}: {m}")
                elif key != "correction":  # the master weight's low bits: compared above
                    assert torch.equal(sa[key], value), key
            with torch.no_grad():  # the next step from the same weights
                p.copy_(q)
                for key, value in sb.items():
                    sa[key].copy_(value)
    rng = ours.state[ps[0]].get("rng")
    assert (rng is not None and int(rng[1]) == 4) == bool(options.get("stochastic_rounding"))


def test_low_precision_rotation_survives_updates_below_half_an_ulp():
    """RotationalSGD rotating by 1e-4 rad per step, far below bf16's half-ulp (2^-9), against a
    fixed gradient d: the progress is the fall of the linear loss ⟨w, d⟩. Rounding to nearest
    loses almost all of it (the weights barely move); stochastic rounding keeps it in expectation
    (a random walk of about 7% of it around it, here), a 24-bit master weight as fp32 does."""
    def progress(dtype, **options):
        torch.manual_seed(3)
        w = torch.nn.Parameter(torch.randn(8, 64).to(dtype))
        opt = wdopt.RotationalSGD([w], lr=0.1, weight_decay=1e-3, target_rotation=1e-4, backend=BACKENDS[-1],
                                  **options)
        d = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
        for step in range(51):
            w.grad = d.to(dtype)
            opt.step()
            if step == 0:  # the first step centres a bf16 row to fp32 rounding: measured after it
                start = (opt.master_weight(w).double() * d.double()).sum()
        return (start - (opt.master_weight(w).double() * d.double()).sum()).item()

    exact = progress(torch.float32)
    assert exact > 0.1
    assert abs(progress(torch.bfloat16)) < 0.3 * exact  # round to nearest: most of the rotation is lost
    assert abs(progress(torch.bfloat16, stochastic_rounding=True) - exact) < 0.25 * exact
    assert abs(progress(torch.bfloat16, master_weight_bits=24) - exact) < 0.02 * exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_state_dict_resumes_identically(backend):
    """Stochastic rounding's streams and the corrections travel in the state dict: a resumed run
    draws the same bits as an uninterrupted one."""
    cls, _, hyper = CLASSES["adamw"]
    options = dict(master_weight_bits=24, stochastic_rounding=True)
    whole, ps = _low_precision_run(cls, hyper, torch.bfloat16, options, backend, "cpu", 4)
    half, qs = _low_precision_run(cls, hyper, torch.bfloat16, options, backend, "cpu", 2)
    buffer = io.BytesIO()
    torch.save({"opt": half.state_dict(), "params": [q.detach().clone() for q in qs]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, params = _low_precision_model(cls, hyper, torch.bfloat16, options, backend, "cpu", seed=5)
    with torch.no_grad():
        for p, q in zip(params, saved["params"]):
            p.copy_(q)
    resumed.load_state_dict(saved["opt"])
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]
        if step < 2:
            continue  # the draws of the steps taken before the save
        for p, grad in zip(params, grads):
            p.grad = grad
        resumed.step()
    for p, q in zip(ps, params):
        assert torch.equal(p, q)
        for key, value in whole.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


@pytest.mark.parametrize("backend,device", LOW_FUSED)
def test_low_precision_telemetry_measures_the_master_weight(backend, device):
    """A monitored step of compensated, stochastically rounded parameters: the kernel's per-row
    sums are those of the master weights before and after (reference/telemetry.py)."""
    from wdopt.reference import telemetry as tm

    cls, _, hyper = CLASSES["adamw"]
    opt, params = _low_precision_model(cls, hyper, torch.bfloat16, LOW_PRECISION["master24-sr"][1], backend, device)
    monitor = wdopt.RotationMonitor(opt, every=1)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=torch.bfloat16)
        before = [opt.master_weight(p) for p in params]
        opt.step()
        for i, (p, w0) in enumerate(zip(params, before)):
            sums = monitor.last.sums[f"group{0 if i < 3 else 1}.param{i if i < 3 else 0}"]
            expected = tm.row_sums(w0, opt.master_weight(p), p.grad, sums.shape[0])
            torch.testing.assert_close(sums.cpu(), expected.cpu(), rtol=1e-4, atol=1e-7)
            assert expected[:, 2].sum() > 0  # the weights moved


@pytest.mark.parametrize("name", CLASSES)
def test_a_skipped_first_step_leaves_the_same_state_on_every_backend(name):
    # GradScaler skips the very first step: the fused kernels take their rotational state before
    # they read found_inf (on the device), so the host rotation makes it too, and a state dict
    # saved then has the same keys whatever the backend.
    cls, _, hyper = CLASSES[name]
    grads = [torch.randn(4, 6) for _ in range(4)]
    w0 = torch.randn(4, 6)
    runs = {}
    for backend in BACKENDS:
        w = w0.clone().requires_grad_()
        opt = cls([w], backend=backend, **hyper)
        start = w.detach().clone()  # construction centres the rows
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
        w.grad = grads[0].clone()
        opt.step()
        after_skip = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
        assert torch.equal(w.detach(), start)
        opt.found_inf = torch.tensor(0.0)
        for g in grads[1:]:
            w.grad = g.clone()
            opt.step()
        runs[backend] = after_skip, w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    skip, weight, state = runs["reference"]
    for backend, (other_skip, other_weight, other_state) in runs.items():
        assert sorted(other_skip) == sorted(skip), backend
        assert all(torch.equal(other_skip[k], skip[k]) for k in skip), backend
        # Then the steps agree as everywhere else (the backends sum the row norms in other orders).
        torch.testing.assert_close(other_weight, weight, rtol=1e-4, atol=1e-5)
        assert sorted(other_state) == sorted(state), backend
        for k in state:
            torch.testing.assert_close(other_state[k], state[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
