"""torch.amp.GradScaler: gradients are unscaled inside the step, and a step whose gradients hold
an inf/nan is skipped entirely (parameters, state and step counts untouched), as torch's fused
optimizers do."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import assert_same_trajectory, clone_leaves, grad_stream, make_params

PAIRS = backend_device_pairs()
SHAPES = [(7,), (1023,), (4, 5)]
CASES = {
    "adamw": (wdopt.FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd": (wdopt.FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    "lion": (wdopt.FusedLion, None, dict(lr=1e-3, weight_decay=0.1)),
}


def _scaled_run(opt, params, grads_per_step, device, inf_at):
    """Drive ``opt`` through GradScaler with scaled gradients; inject an inf at step ``inf_at``."""
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    skipped = []
    for step, grads in enumerate(grads_per_step):
        scaler.scale(torch.ones((), device=device))  # as scaler.scale(loss) would, before backward
        for p, g in zip(params, grads):
            p.grad = g.to(p.device, p.dtype) * scaler.get_scale()
        if step == inf_at:
            params[1].grad[3] = float("inf")
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    return skipped


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("name", CASES)
def test_grad_scaler_unscales_and_skips_like_torch(backend, device, name):
    ours_cls, torch_cls, hyper = CASES[name]
    params = make_params(SHAPES, torch.float32, device)
    grads = grad_stream(SHAPES, 8, top=0)
    inf_at = 4

    ours = clone_leaves(params)
    opt = ours_cls(ours, backend=backend, **hyper)
    skipped = _scaled_run(opt, ours, grads, device, inf_at)
    assert skipped[inf_at] and sum(skipped) == 1

    # Expected: the same optimizer without scaling, on the gradient stream minus the skipped step.
    expected = clone_leaves(params)
    if torch_cls is not None:
        opt_expected = torch_cls(expected, foreach=False, **hyper)
    else:
        opt_expected = ours_cls(expected, backend="reference", **hyper)
    for step, step_grads in enumerate(grads):
        if step == inf_at:
            continue
        for p, g in zip(expected, step_grads):
            p.grad = g.to(p.device, p.dtype)
        opt_expected.step()
    assert_same_trajectory(opt, ours, opt_expected, expected)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("name", CASES)
def test_found_inf_leaves_everything_untouched(backend, device, name):
    ours_cls, _, hyper = CASES[name]
    params = clone_leaves(make_params(SHAPES, torch.float32, device))
    opt = ours_cls(params, backend=backend, **hyper)
    for p, g in zip(params, grad_stream(SHAPES, 1)[0]):
        p.grad = g.float().to(device)
    opt.step()
    snapshot = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.grad_scale = torch.tensor(1.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    for p, before in zip(params, snapshot):
        assert torch.equal(p.detach(), before)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
