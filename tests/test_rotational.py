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
