"""NaN and ±inf gradients (issue 12 §14): every optimizer on every backend that runs here writes the
same parameters and state as the reference, NaN positions and infinities included, and as
torch.optim where torch has the optimizer; a NaN gradient reaches the parameter, as in torch's
AdamW and SGD, instead of freezing the element.

The base optimizers are compared bit for bit. The rotational ones are compared bit for bit where a
value is NaN or infinite, and to the rounding of tests/test_rotational.py elsewhere: their fused
kernels sum a row in another order than torch's reductions do. Against torch.optim, NaN and
infinities must be at the same places and finite values agree as in tests/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs

NAN, INF = float("nan"), float("inf")
PAIRS = backend_device_pairs()
# The Triton interpreter computes with numpy, which warns about the NaNs these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
EXACT = dict(rtol=0, atol=0, equal_nan=True)
ROUNDING = dict(rtol=1e-4, atol=1e-5, equal_nan=True)  # test_rotational's fp32 tolerance
# torch.optim rounds some finite values differently (its lerp, its addcdiv): test_parity's tolerance,
# with NaN and infinities still required at the same places, of the same sign.
TORCH = dict(equal_nan=True)

# (class, hyperparameters, the torch.optim class with the same math or None). Options chosen to put
# a non-finite value through every branch that could treat it differently: amsgrad's max, L2 decay
# (g + λ·p with p non-finite), momentum, nesterov, maximize.
CASES = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1), torch.optim.AdamW),
    "adamw-amsgrad": (wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
                      torch.optim.AdamW),
    "sgd": (wdopt.FusedSGD, dict(lr=1e-2, weight_decay=0.1), torch.optim.SGD),
    "sgd-nesterov": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
                     torch.optim.SGD),
    "sgd-decoupled": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.1,
                                           decoupled_weight_decay=True), None),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=0.5), getattr(torch.optim, "Lion", None)),
    "lion-maximize": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=0.5, maximize=True), None),
    "rotational-adamw": (wdopt.RotationalAdamW, dict(lr=1e-2, weight_decay=0.1), None),
    "rotational-sgd": (wdopt.RotationalSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), None),
    "rotational-lion": (wdopt.RotationalLion, dict(lr=1e-3, weight_decay=1.0), None),
    "rotational-lion-projected": (wdopt.RotationalLion, dict(lr=1e-3, weight_decay=1.0, mode="projected"), None),
}
ROTATIONAL = (wdopt.RotationalAdamW, wdopt.RotationalSGD, wdopt.RotationalLion)


def _params():
    """A vector (never rotational: dim 1) and a 5×6 matrix (rotational in the rotational classes)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, generator=g), torch.randn(5, 6, generator=g)]


def _grads():
    """Three steps. Step 1: the vector gets issue 12's [nan, 1, -1]; rows 0-2 of the matrix a NaN, a
    +inf and a −inf. Step 2: finite (an infinite state meets a finite gradient: inf − inf). Step 3:
    ±inf in the vector's finite elements and +inf in row 3; row 4 stays finite throughout, so a
    non-finite value leaking across rows or tensors shows."""
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randn(3, generator=g), torch.randn(5, 6, generator=g)] for _ in range(3)]
    steps[0][0] = torch.tensor([NAN, 1.0, -1.0])
    steps[0][1][0, 1], steps[0][1][1, 2], steps[0][1][2, 3] = NAN, INF, -INF
    steps[2][0][1:] = torch.tensor([INF, -INF])
    steps[2][1][3, 0] = INF
    return steps


def _run(cls, hyper, device, **kw):
    params = [p.to(device).requires_grad_(True) for p in _params()]
    opt = cls(params, **hyper, **kw)
    for grads in _grads():
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
    return opt, params


def _assert_same(opt_a, params_a, opt_b, params_b, tol):
    """Parameters and every state tensor of ``opt_b`` (the expectation) in ``opt_a``."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), **tol, msg=lambda m: f"param {i}: {m}")
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert set(state_b) <= set(state_a), (sorted(state_a), sorted(state_b))
        for key, vb in state_b.items():
            va = state_a[key]
            if key == "step":
                assert float(va) == float(vb), (i, float(va), float(vb))
            elif isinstance(vb, torch.Tensor):
                torch.testing.assert_close(va.cpu(), vb.cpu(), **tol, msg=lambda m: f"param {i} state {key}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_gradients_match_the_reference_and_torch(backend, device, case):
    cls, hyper, torch_cls = CASES[case]
    opt, params = _run(cls, hyper, device, backend=backend)
    ref, ref_params = _run(cls, hyper, device, backend="reference")
    # The parameters did become non-finite: the comparison is about something.
    assert not torch.isfinite(params[0]).all() and not torch.isfinite(params[1]).all()
    _assert_same(opt, params, ref, ref_params, ROUNDING if cls in ROTATIONAL else EXACT)
    if torch_cls is not None:
        theirs, their_params = _run(torch_cls, hyper, device, foreach=False)
        _assert_same(opt, params, theirs, their_params, TORCH)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_a_nan_gradient_reaches_the_parameter(backend, device, case):
    """One step with the vector's gradient [nan, 1, -1]: the NaN element becomes NaN (it would stay
    finite, frozen, under torch.sign(nan) = 0), the others stay finite; a rotational row with a NaN
    direction becomes NaN, the other rows stay finite."""
    cls, hyper, _ = CASES[case]
    params = [p.to(device).requires_grad_(True) for p in _params()]
    opt = cls(params, **hyper, backend=backend)
    g = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    g[0, 1] = NAN
    params[0].grad, params[1].grad = torch.tensor([NAN, 1.0, -1.0], device=device), g.to(device)
    opt.step()
    vector, matrix = params[0].detach().cpu(), params[1].detach().cpu()
    assert vector[0].isnan() and vector[1:].isfinite().all(), vector
    if cls in ROTATIONAL:
        assert matrix[0].isnan().all() and matrix[1:].isfinite().all(), matrix
    else:
        assert matrix[0, 1].isnan() and matrix.isnan().sum() == 1, matrix
    for key in ("exp_avg", "momentum_buffer"):
        if opt.state[params[0]].get(key) is not None:
            assert opt.state[params[0]][key][0].isnan(), (key, opt.state[params[0]][key])
