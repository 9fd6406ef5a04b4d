"""The reference implementations are the specification: they use no torch.optim code and no
fused/foreach ops, and they agree with the formulas evaluated by hand in float64."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import wdopt
from helpers import clone_leaves, grad_stream, make_params, run


@pytest.fixture
def forbid_torch_optim_kernels(monkeypatch):
    """Make every torch._foreach_*/_fused_* op and torch.optim's functional API raise."""

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the reference called {name}")
        return fail

    for name in dir(torch):
        if name.startswith(("_foreach_", "_fused_")):
            monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    for module in map(importlib.import_module, ("torch.optim.adam", "torch.optim.adamw", "torch.optim.sgd")):
        for name in dir(module):
            if name in ("adam", "adamw", "sgd") or name.startswith(("_single_tensor_", "_multi_tensor_", "_fused_")):
                monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))


def test_forbidding_works(forbid_torch_optim_kernels):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(AssertionError, match="the reference called"):
        torch.optim.AdamW([p], foreach=False).step()
    with pytest.raises(AssertionError, match="the reference called"):
        torch._foreach_add_([p.detach()], 1.0)


@pytest.mark.parametrize("cls,kw", [
    (wdopt.FusedAdamW, dict(amsgrad=True, maximize=True)),
    (wdopt.FusedSGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    (wdopt.FusedSGD, dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True)),
    (wdopt.FusedLion, dict(weight_decay=0.1)),
])
def test_reference_uses_no_torch_optim_kernels(forbid_torch_optim_kernels, cls, kw):
    shapes = [(7,), (3, 5)]
    params = clone_leaves(make_params(shapes))
    before = [p.detach().clone() for p in params]
    run(cls(params, lr=1e-2, backend="reference", **kw), params, grad_stream(shapes, 3))
    assert all(not torch.equal(a, b) for a, b in zip(params, before))


# ---------------------------------------------------------------- float64 by hand


def _sign(x):
    return (x > 0) - (x < 0)


def lion_by_hand(p, grads, lr, beta1, beta2, wd):
    p, m = list(p), [0.0] * len(p)
    for g in grads:
        for i in range(len(p)):
            c = beta1 * m[i] + (1 - beta1) * g[i]
            p[i] = p[i] * (1 - lr * wd) - lr * _sign(c)
            m[i] = beta2 * m[i] + (1 - beta2) * g[i]
    return p, m


def adamw_by_hand(p, grads, lr, beta1, beta2, eps, wd):
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            p[i] *= 1 - lr * wd
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p, m, v


def _hand_inputs(steps=8, n=9):
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=g, dtype=torch.float64)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (k % 4 - 2) for k in range(steps)]
    return p0, grads


def test_lion_reference_matches_float64_by_hand():
    p0, grads = _hand_inputs()
    lr, beta1, beta2, wd = 3e-2, 0.9, 0.99, 0.5
    want_p, want_m = lion_by_hand(p0.tolist(), [g.tolist() for g in grads], lr, beta1, beta2, wd)
    p = p0.clone().requires_grad_()
    opt = wdopt.FusedLion([p], lr=lr, betas=(beta1, beta2), weight_decay=wd, backend="reference")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(want_p, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(want_m, dtype=torch.float64), rtol=1e-13, atol=1e-15)


def test_adamw_reference_matches_float64_by_hand():
    p0, grads = _hand_inputs()
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    want_p, want_m, want_v = adamw_by_hand(p0.tolist(), [g.tolist() for g in grads], lr, beta1, beta2, eps, wd)
    p = p0.clone().requires_grad_()
    opt = wdopt.FusedAdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, backend="reference")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(p.detach(), torch.tensor(want_p, **f64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(want_m, **f64), rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(want_v, **f64), rtol=1e-12, atol=1e-20)
