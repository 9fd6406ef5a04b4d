"""The C++ backends' torch.library operators: schemas, fake implementations and mutation
annotations pass torch.library.opcheck, and torch.compile runs a training step through them."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import assert_same_trajectory

CPP = [(b, d) for b, d in backend_device_pairs() if b in ("cpu", "cuda")]
pytestmark = pytest.mark.skipif(not CPP, reason="the C++ extension is not available")


def _tensors(device, n=3, sizes=(5, 33, 1)):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(s, generator=g).to(device) for s in sizes[:n]] for _ in range(5)]


@pytest.mark.parametrize("backend,device", CPP)
def test_opcheck(backend, device):
    from wdopt.kernels import cpp

    cpp.load()
    params, grads, m, v, vmax = _tensors(device)
    v = [t.abs() for t in v]
    vmax = [t.abs() for t in vmax]
    steps = [torch.zeros((), device=device) for _ in params]
    # A monitored step writes its telemetry buffers: that mutation is part of the schema too.
    telemetry = [torch.zeros(p.shape[0] if p.dim() > 1 else 1, 4, dtype=torch.float64, device=device) for p in params]
    # Stochastic rounding's [key, count, index base] per parameter: read, never written by the kernels.
    rng = [torch.tensor([7, i, 3 * i], device=device) for i in range(len(params))] \
        if device in cpp.STOCHASTIC_ROUNDING else []
    adamw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0,
                 amsgrad=True, maximize=False, rng=rng, correction=[], scales=[])
    torch.library.opcheck(torch.ops.wdopt.adamw_.default, (params, grads, m, v, vmax, steps, telemetry), adamw)
    sgd = dict(lr=1e-2, weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=True,
               decoupled_weight_decay=False, decay_lr_scale=1.0, maximize=False, rng=rng,
               correction=[], scales=[])
    # First-step flags: a fresh buffer's (nonzero), a cleared one, and None (a loaded buffer).
    flags = [torch.ones((), device=device), torch.zeros((), device=device), None]
    torch.library.opcheck(torch.ops.wdopt.sgd_.default, (params, grads, m, flags, []), sgd)
    lion = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_lr_scale=1.0, maximize=True, rng=rng,
                correction=[], scales=[])
    torch.library.opcheck(torch.ops.wdopt.lion_.default, (params, grads, m, telemetry), lion)
    if device in cpp.QUANTIZED_STATES:
        # 8-bit states: codes in the state lists, block scales written beside them.
        from wdopt.reference import quantization as Q

        lists, scales = [], []
        for states, code_dtype in ((m, torch.int8), (v, torch.uint8), (vmax, torch.uint8)):
            encoded = [Q.encode(t.float(), code_dtype, t) for t in states]
            lists.append([codes for codes, _ in encoded])
            scales += [block_scales for _, block_scales in encoded]
        torch.library.opcheck(torch.ops.wdopt.adamw_.default, (params, grads, *lists, steps, telemetry),
                              {**adamw, "scales": scales})


@pytest.mark.parametrize("backend,device", CPP[:1])
def test_torch_compile_training_step(backend, device):
    """A compiled training step through wdopt's operator against torch.optim.AdamW's eager one:
    the same parameters and state, to test_parity's tolerance (the compiled forward and backward
    may round differently from eager ones)."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).to(device)
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    expected = torch.optim.AdamW(models[0].parameters(), foreach=False, **hyper)
    ours = wdopt.FusedAdamW(models[1].parameters(), backend=backend, **hyper)
    x, y = torch.randn(32, 8, device=device), torch.randn(32, 1, device=device)
    initial = [p.detach().clone() for p in models[1].parameters()]

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step)
    for _ in range(3):
        train_step(models[0], expected)
        compiled(models[1], ours)
    theirs, mine = list(models[0].parameters()), list(models[1].parameters())
    assert all(not torch.equal(p, p0) for p, p0 in zip(mine, initial))  # the compiled step did step
    assert_same_trajectory(ours, mine, expected, theirs)
