"""bf16/fp16: error against a float64 run must be within 2× the error of torch's own fused
optimizer at the same dtype (for Lion, which torch lacks: a per-op torch implementation)."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import ODD_SHAPES, SMALL_SHAPES, clone_leaves, grad_stream, interpreted, make_params

STEPS = 20
PAIRS = backend_device_pairs()
LOW = [torch.bfloat16, torch.float16]


def _shapes(backend, device):
    """The Triton interpreter: SMALL_SHAPES (every block of a bucket runs as wide as its largest
    tensor; 16-bit conversions of 65,536 lanes were most of these cases' time). Rounding error is
    a per-element property, compared with torch's on the same elements; the interpreter's multi-chunk
    tensor runs in tests/test_parity.py, and the compiled backends run ODD_SHAPES here."""
    return SMALL_SHAPES if interpreted(backend, device) else ODD_SHAPES


def naive_lion_step(p, m, g, lr, beta1, beta2, wd):
    """Lion as commonly written with torch ops at the tensors' own precision."""
    with torch.no_grad():
        update = (m * beta1 + g * (1 - beta1)).sign_()
        p.mul_(1 - lr * wd).add_(update, alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def _errors(params, states, truth_params, truth_states):
    """Max abs error of parameters and of each state key, over all tensors."""
    out = {"param": max((p.detach().double().cpu() - t.detach()).abs().max().item() for p, t in zip(params, truth_params))}
    for key in truth_states[0]:
        out[key] = max((s[key].double().cpu() - t[key].double()).abs().max().item() for s, t in zip(states, truth_states))
    return out


def _run_torch_like(make_opt, params, grads, dtype):
    opt = make_opt(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=p.device, dtype=dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_low_precision_error_within_2x_of_torch_fused(backend, device, dtype, name):
    if name == "adamw":
        hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=False)
        ours_cls, torch_cls = wdopt.FusedAdamW, torch.optim.AdamW
        state_keys = ("exp_avg", "exp_avg_sq")
    else:
        hyper = dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
        ours_cls, torch_cls = wdopt.FusedSGD, torch.optim.SGD
        state_keys = ("momentum_buffer",)
    shapes = _shapes(backend, device)
    start = make_params(shapes, dtype, device)  # the low-precision start is the common truth
    grads = [[g.to(dtype).double() for g in step] for step in grad_stream(shapes, STEPS, top=0)]

    truth = clone_leaves([p.cpu() for p in start], torch.float64)
    opt_truth = _run_torch_like(lambda ps: torch_cls(ps, foreach=False, **hyper), truth, grads, torch.float64)
    truth_states = [{k: opt_truth.state[p][k] for k in state_keys} for p in truth]

    theirs = clone_leaves(start)
    opt_torch = _run_torch_like(lambda ps: torch_cls(ps, fused=True, **hyper), theirs, grads, dtype)
    ours = clone_leaves(start)
    opt = _run_torch_like(lambda ps: ours_cls(ps, backend=backend, **hyper), ours, grads, dtype)

    err_torch = _errors(theirs, [opt_torch.state[p] for p in theirs], truth, truth_states)
    err_ours = _errors(ours, [opt.state[p] for p in ours], truth, truth_states)
    for key, baseline in err_torch.items():
        assert err_ours[key] <= 2 * baseline, (key, err_ours[key], baseline)
    assert err_ours["param"] > 0  # the comparison is not vacuous: low precision does lose bits


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_lion_low_precision_error_within_2x_of_per_op_torch(backend, device, dtype):
    lr, beta1, beta2, wd = 1e-3, 0.9, 0.99, 0.5
    shapes = _shapes(backend, device)
    start = make_params(shapes, dtype, device)
    grads = [[g.to(dtype).double() for g in step] for step in grad_stream(shapes, STEPS, top=0)]

    def naive(dt):
        ps = [p.detach().clone().to(dt) for p in start]
        ms = [torch.zeros_like(p) for p in ps]
        for step_grads in grads:
            for p, m, g in zip(ps, ms, step_grads):
                naive_lion_step(p, m, g.to(device=p.device, dtype=dt), lr, beta1, beta2, wd)
        return ps, [{"exp_avg": m} for m in ms]

    truth, truth_states = naive(torch.float64)
    truth = [t.cpu() for t in truth]
    truth_states = [{"exp_avg": s["exp_avg"].cpu()} for s in truth_states]
    base_params, base_states = naive(dtype)
    ours = clone_leaves(start)
    opt = _run_torch_like(
        lambda ps: wdopt.FusedLion(ps, lr=lr, betas=(beta1, beta2), weight_decay=wd, backend=backend), ours, grads, dtype)
    err_base = _errors(base_params, base_states, truth, truth_states)
    err_ours = _errors(ours, [opt.state[p] for p in ours], truth, truth_states)
    for key, baseline in err_base.items():
        assert err_ours[key] <= 2 * baseline, (key, err_ours[key], baseline)
