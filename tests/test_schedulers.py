"""LR schedulers drive wdopt optimizers as they drive torch.optim; decay_scaling="schedule"
decays by λ·lr/initial_lr."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import assert_same_trajectory, clone_leaves, grad_stream, make_params

PAIRS = backend_device_pairs()
SHAPES = [(7,), (300,), (4, 5)]


@pytest.mark.parametrize("backend,device", PAIRS)
def test_schedulers_follow_torch(backend, device):
    params = make_params(SHAPES, torch.float32, device)
    grads = grad_stream(SHAPES, 10)

    def train(opt, leaves):
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
        ], milestones=[3])
        for step_grads in grads:
            for p, g in zip(leaves, step_grads):
                p.grad = g.float().to(device)
            opt.step()
            sched.step()

    ours, theirs = clone_leaves(params), clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    train(opt, ours)
    train(opt_torch, theirs)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("decay_scaling", ["lr", "schedule"])
def test_decay_scaling(backend, device, name, decay_scaling):
    """With zero gradients the step is pure decay: p ← p·(1 − d), d = lr·λ or λ·lr/initial_lr
    (AdamW's update is 0/(0 + ε), Lion's sign(0) = 0, SGD's momentum stays 0)."""
    lr0, wd = 0.5, 0.2
    p = torch.ones(37, device=device, dtype=torch.float64, requires_grad=True)
    kw = dict(lr=lr0, weight_decay=wd, decay_scaling=decay_scaling, backend=backend)
    if name == "adamw":
        opt = wdopt.FusedAdamW([p], **kw)
    elif name == "sgd":
        opt = wdopt.FusedSGD([p], momentum=0.9, decoupled_weight_decay=True, **kw)
    else:
        opt = wdopt.FusedLion([p], **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = 1.0
    for _ in range(4):
        lr = opt.param_groups[0]["lr"]
        expected *= 1 - (lr * wd if decay_scaling == "lr" else wd * lr / lr0)
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=1e-14, atol=0)


def test_schedule_without_scheduler_uses_constructor_lr():
    p = torch.ones(5, dtype=torch.float64, requires_grad=True)
    opt = wdopt.FusedAdamW([p], lr=0.4, weight_decay=0.5, decay_scaling="schedule")
    opt.param_groups[0]["lr"] = 0.1  # a hand-made schedule: decay fraction λ·0.1/0.4
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, 1 - 0.5 * 0.1 / 0.4), rtol=1e-15, atol=0)


def test_schedule_decay_needs_positive_initial_lr():
    with pytest.raises(ValueError, match="positive"):
        wdopt.FusedAdamW([torch.zeros(3, requires_grad=True)], lr=0.0, decay_scaling="schedule")
