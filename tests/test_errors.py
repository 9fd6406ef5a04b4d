"""Bad input gets a clear error, and a failed step changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import wdopt
from conftest import backend_device_pairs

PAIRS = backend_device_pairs()


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


INVALID = [
    (wdopt.FusedAdamW, dict(lr=-1.0), "Invalid learning rate"),
    (wdopt.FusedAdamW, dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
    (wdopt.FusedAdamW, dict(eps=-1e-8), "Invalid epsilon"),
    (wdopt.FusedAdamW, dict(betas=(1.0, 0.9)), "index 0"),
    (wdopt.FusedAdamW, dict(betas=(0.9, -0.1)), "index 1"),
    (wdopt.FusedAdamW, dict(betas=(0.9,)), "pair"),
    (wdopt.FusedAdamW, dict(weight_decay=-0.1), "Invalid weight_decay"),
    (wdopt.FusedAdamW, dict(decay_scaling="cosine"), "decay_scaling"),
    (wdopt.FusedAdamW, dict(backend="cutlass"), "Unknown backend"),
    (wdopt.FusedAdamW, dict(differentiable=True), "differentiable"),
    (wdopt.FusedSGD, dict(lr=-0.1), "Invalid learning rate"),
    (wdopt.FusedSGD, dict(momentum=-0.5), "Invalid momentum"),
    (wdopt.FusedSGD, dict(weight_decay=-1.0), "Invalid weight_decay"),
    (wdopt.FusedSGD, dict(nesterov=True), "Nesterov"),
    (wdopt.FusedSGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (wdopt.FusedSGD, dict(decay_scaling="schedule"), "decoupled_weight_decay=True"),
    (wdopt.FusedSGD, dict(differentiable=True), "differentiable"),
    (wdopt.FusedLion, dict(lr=-1.0), "Invalid learning rate"),
    (wdopt.FusedLion, dict(betas=(0.9, 1.5)), "index 1"),
    (wdopt.FusedLion, dict(weight_decay=-1.0), "Invalid weight_decay"),
]


@pytest.mark.parametrize("cls,kwargs,message", INVALID, ids=lambda x: getattr(x, "__name__", None) or str(x)[:30])
def test_invalid_hyperparameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([leaf(3)], **kwargs)


def test_invalid_group_is_not_added():
    opt = wdopt.FusedAdamW([leaf(3)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [leaf(4)], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [wdopt.FusedAdamW, wdopt.FusedSGD, wdopt.FusedLion])
def test_torch_implementation_flags_are_accepted(cls):
    for flags in (dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False)):
        cls([leaf(3)], **flags)


def test_integer_parameters_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        wdopt.FusedAdamW([torch.zeros(3, dtype=torch.int64)])


def test_backend_for_another_device_says_why():
    with pytest.raises(ValueError, match="runs on cuda tensors only"):
        wdopt.FusedAdamW([leaf(3)], backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why():
    code = ("import torch, wdopt\n"
            "try:\n"
            "    wdopt.FusedAdamW([torch.zeros(3, requires_grad=True)], backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1" in out or "triton is not installed" in out


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state})


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
    now = {id(p): {k: v for k, v in opt.state[p].items()} for p in params if p in opt.state and opt.state[p]}
    assert set(now) == {k for k, v in states.items() if v}
    for key, st in now.items():
        for name, v in st.items():
            assert torch.equal(v, states[key][name]), name


def _sparse_grad(p):
    p.grad = torch.zeros_like(p).to_sparse()


def _grad_of_wrong_shape(p):
    # torch refuses such an assignment; in-place storage changes still get through.
    with torch.no_grad():
        p.grad.set_(torch.zeros(p.numel() + 1, device=p.device))


def _grad_of_wrong_dtype(p):
    p.grad.data = torch.zeros_like(p, dtype=torch.float64)


BAD_GRADS = {
    "sparse": (_sparse_grad, RuntimeError, "sparse"),
    "shape": (_grad_of_wrong_shape, RuntimeError, "shape"),
    "dtype": (_grad_of_wrong_dtype, RuntimeError, "dtype"),
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("bad", BAD_GRADS)
@pytest.mark.parametrize("cls", [wdopt.FusedAdamW, wdopt.FusedSGD, wdopt.FusedLion])
def test_failed_step_leaves_params_and_state_untouched(backend, device, bad, cls):
    """Group 0 is fine, group 1 holds a bad gradient: the step raises before touching anything,
    including state that has not been created yet."""
    make_grad, error, message = BAD_GRADS[bad]
    good = [leaf(7).to(device).detach().requires_grad_() for _ in range(2)]
    other = leaf(5).to(device).detach().requires_grad_()
    kw = dict(momentum=0.9) if cls is wdopt.FusedSGD else {}
    opt = cls([{"params": good}, {"params": [other]}], lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    for p in good + [other]:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists for all three now
    new = leaf(3).to(device).detach().requires_grad_()
    opt.add_param_group({"params": [new]})
    new.grad = torch.randn_like(new)
    make_grad(other)
    params = good + [other, new]
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert not opt.state.get(new)


def test_overlapping_parameter_is_refused():
    base = torch.randn(1, 4)
    p = base.expand(3, 4)
    p.requires_grad_()
    p.grad = torch.ones(3, 4)
    opt = wdopt.FusedAdamW([p])
    with pytest.raises(RuntimeError, match="overlapping"):
        opt.step()
    assert not opt.state.get(p)


def test_duplicate_parameters_are_refused():
    p = leaf(3)
    with pytest.raises(ValueError, match="appears twice"):
        wdopt.FusedAdamW([p, p])


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_state_that_no_longer_matches_the_parameter_is_refused(backend, device, change):
    """A model moved with .to(bfloat16), or a parameter whose .data was replaced, after steps:
    the kernels would address the old state with the new layout."""
    p = leaf(8).to(device).detach().requires_grad_()
    opt = wdopt.FusedAdamW([p], backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    if change == "dtype":
        p.data = p.data.to(torch.bfloat16)
    else:
        p.data = torch.zeros(16, device=device)
    p.grad = torch.ones_like(p)
    state = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match="state 'exp_avg'"):
        opt.step()
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_failed_step_drops_grad_scaler_attributes():
    p = leaf(3)
    p.grad = torch.ones(3).to_sparse()
    opt = wdopt.FusedAdamW([p])
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", ["grad_scale", "found_inf"])
def test_a_grad_scale_that_is_not_a_tensor_is_refused(name):
    """GradScaler's attributes are tensors; a float set by hand (before or after the state is
    made, on the validation path or the fast one) is a clear TypeError that changes nothing."""
    p = leaf(3)
    p.grad = torch.ones(3)
    opt = wdopt.FusedAdamW([p])
    for _ in range(3):  # the state made, and the fast path built
        opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    setattr(opt, name, 2.0)
    with pytest.raises(TypeError, match=f"FusedAdamW.{name} must be a tensor"):
        opt.step()
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.step()  # and the next step runs


@pytest.mark.parametrize("backend,device", PAIRS)
def test_conjugated_complex_gradient(backend, device):
    p = torch.randn(5, dtype=torch.complex64, device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    g = torch.randn(5, dtype=torch.complex64, device=device)
    p.grad, q.grad = g.conj(), g.conj().resolve_conj()
    opt, opt_torch = wdopt.FusedAdamW([p], backend=backend), torch.optim.AdamW([q], foreach=False)
    opt.step()
    opt_torch.step()
    torch.testing.assert_close(p.detach(), q.detach())
