"""State dicts move between torch.optim and wdopt in both directions, and the run continues on
the same trajectory."""

from __future__ import annotations

import io

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import assert_same_trajectory, clone_leaves, grad_stream, make_params, run

PAIRS = backend_device_pairs()
SHAPES = [(7,), (1023,), (5, 3, 3, 3)]
CASES = {
    "adamw": (wdopt.FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "sgd": (wdopt.FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
}


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("direction", ["torch_to_wdopt", "wdopt_to_torch"])
def test_state_dict_interchange(backend, device, name, direction):
    ours_cls, torch_cls, hyper = CASES[name]
    make_first = (lambda ps: torch_cls(ps, foreach=False, **hyper)) if direction == "torch_to_wdopt" else \
        (lambda ps: ours_cls(ps, backend=backend, **hyper))
    make_second = (lambda ps: ours_cls(ps, backend=backend, **hyper)) if direction == "torch_to_wdopt" else \
        (lambda ps: torch_cls(ps, foreach=False, **hyper))
    params = make_params(SHAPES, torch.float32, device)
    first_half, second_half = grad_stream(SHAPES, 5), grad_stream(SHAPES, 5, seed=7)

    # One optimizer runs all ten steps ...
    straight = clone_leaves(params)
    opt_straight = make_first(straight)
    run(opt_straight, straight, first_half + second_half)

    # ... the other takes over its state after five.
    resumed = clone_leaves(params)
    opt_first = make_first(resumed)
    run(opt_first, resumed, first_half)
    opt_second = make_second(resumed)
    opt_second.load_state_dict(_roundtrip(opt_first.state_dict()))
    run(opt_second, resumed, second_half)

    assert_same_trajectory(opt_second, resumed, opt_straight, straight)
    for group in opt_second.param_groups:
        if isinstance(opt_second, wdopt.FusedAdamW) or isinstance(opt_second, wdopt.FusedSGD):
            assert group["backend"] == backend and group["decay_scaling"] == "lr"
    if isinstance(opt_second, wdopt.FusedAdamW):
        for p in resumed:
            step = opt_second.state[p]["step"]
            assert step.device == p.device and step.dtype == torch.float32 and float(step) == 10


@pytest.mark.parametrize("backend,device", PAIRS)
def test_lion_state_dict_roundtrip(backend, device):
    hyper = dict(lr=1e-3, weight_decay=0.5)
    params = make_params(SHAPES, torch.float32, device)
    first_half, second_half = grad_stream(SHAPES, 4), grad_stream(SHAPES, 4, seed=7)
    straight = clone_leaves(params)
    opt_straight = wdopt.FusedLion(straight, backend=backend, **hyper)
    run(opt_straight, straight, first_half + second_half)
    resumed = clone_leaves(params)
    opt = wdopt.FusedLion(resumed, backend=backend, **hyper)
    run(opt, resumed, first_half)
    opt2 = wdopt.FusedLion(resumed, backend=backend, **hyper)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    run(opt2, resumed, second_half)
    assert_same_trajectory(opt2, resumed, opt_straight, straight)


def test_old_checkpoint_with_number_steps_loads():
    """Checkpoints from old torch versions store ``step`` as a Python number."""
    params = clone_leaves(make_params(SHAPES))
    opt = wdopt.FusedAdamW(params, lr=1e-2)
    run(opt, params, grad_stream(SHAPES, 2))
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = int(s["step"].item())
    for g in sd["param_groups"]:
        del g["backend"], g["decay_scaling"]
    opt2 = wdopt.FusedAdamW(params, lr=1e-2)
    opt2.load_state_dict(sd)
    assert all(isinstance(opt2.state[p]["step"], torch.Tensor) and float(opt2.state[p]["step"]) == 2 for p in params)
    assert opt2.param_groups[0]["backend"] == "auto"
    run(opt2, params, grad_stream(SHAPES, 1))
    assert float(opt2.state[params[0]]["step"]) == 3


def test_pickled_optimizer_keeps_options():
    params = clone_leaves(make_params(SHAPES))
    opt = wdopt.FusedSGD(params, lr=1e-2, momentum=0.9, decoupled_weight_decay=True, weight_decay=0.1,
                         decay_scaling="schedule", backend="reference")
    run(opt, params, grad_stream(SHAPES, 2))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = wdopt.FusedSGD(params, lr=1e-2, momentum=0.9)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    group = opt2.param_groups[0]
    assert group["decay_scaling"] == "schedule" and group["decoupled_weight_decay"]
    assert group["backend"] == "auto"  # where to run is this process's choice, not the checkpoint's


def test_torch_checkpoint_with_none_momentum_buffer():
    """torch ≤ 2.0 saved SGD momentum buffers as None before the first step."""
    p, q = clone_leaves(make_params([(5,)])), clone_leaves(make_params([(5,)]))
    opt, opt_torch = wdopt.FusedSGD(p, lr=0.1, momentum=0.9), torch.optim.SGD(q, lr=0.1, momentum=0.9, foreach=False)
    opt.load_state_dict({"state": {0: {"momentum_buffer": None}}, "param_groups": opt.state_dict()["param_groups"]})
    opt_torch.load_state_dict({"state": {0: {"momentum_buffer": None}}, "param_groups": opt_torch.state_dict()["param_groups"]})
    run(opt, p, grad_stream([(5,)], 3))
    run(opt_torch, q, grad_stream([(5,)], 3))
    assert_same_trajectory(opt, p, opt_torch, q)


def test_loading_keeps_this_optimizers_backend():
    params = clone_leaves(make_params(SHAPES))
    saved = wdopt.FusedAdamW(params, backend="reference").state_dict()
    saved["param_groups"][0]["backend"] = "cuda"  # as saved on a GPU machine
    opt = wdopt.FusedAdamW(params, backend="reference")
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["backend"] == "reference"
    run(opt, params, grad_stream(SHAPES, 1))
