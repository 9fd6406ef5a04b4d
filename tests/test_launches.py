"""The Triton backend launches a fixed number of kernels per (device, dtype) bucket and step,
whatever the number of tensors."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import clone_leaves, grad_stream, make_params, run

TRITON_DEVICES = [d for b, d in backend_device_pairs() if b == "triton"]
pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="the Triton backend is not available here")

# Launches per bucket and step: AdamW computes per-tensor coefficients, then updates.
EXPECTED = {"FusedAdamW": 2, "FusedSGD": 1, "FusedLion": 1}


def _launches(cls, n_tensors, device, dtypes=(torch.float32,), steps=1, **kw):
    from wdopt.kernels.triton import multi_tensor

    shapes = [((i * 13) % 50 + 1,) for i in range(n_tensors)]
    params = []
    for k, dtype in enumerate(dtypes):
        params += clone_leaves(make_params(shapes, dtype, device, seed=k))
    opt = cls(params, lr=1e-3, backend="triton", **kw)
    grads = [g + g for g in grad_stream(shapes, steps)]  # fresh tensors every step
    before = multi_tensor.launch_count
    for step in range(steps):
        for p, g in zip(params, grads[step] * len(dtypes)):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
    return (multi_tensor.launch_count - before) / steps


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("cls,kw", [(wdopt.FusedAdamW, dict(amsgrad=True)), (wdopt.FusedSGD, dict(momentum=0.9)),
                                    (wdopt.FusedLion, {})], ids=lambda x: getattr(x, "__name__", ""))
def test_launch_count_does_not_grow_with_tensor_count(device, cls, kw):
    few = _launches(cls, 3, device, **kw)
    many = _launches(cls, 300, device, **kw)
    assert few == many == EXPECTED[cls.__name__]
    two_dtypes = _launches(cls, 3, device, dtypes=(torch.float32, torch.bfloat16), steps=2, **kw)
    assert two_dtypes == 2 * EXPECTED[cls.__name__]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tensor_tables_are_reused_while_addresses_stay(device):
    from wdopt.kernels import tables

    shapes = [(7,), (9,)]
    params = clone_leaves(make_params(shapes, torch.float32, device))
    grads = [torch.zeros(s, device=device) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    opt = wdopt.FusedLion(params, lr=1e-3, backend="triton")
    opt.step()
    cached = len(tables._CACHE)
    buffers = list(tables._CACHE.values())
    opt.step()
    assert len(tables._CACHE) == cached
    assert all(a is b for a, b in zip(buffers, tables._CACHE.values()))
    run(opt, params, grad_stream(shapes, 1))  # new gradient tensors: a new table, results still right


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_interpreter_shortcut_changes_no_result(device, monkeypatch):
    """tests/conftest.py skips the Triton interpreter's re-patching of triton.language inside a
    launch (about half of every interpreted step). Every kind of kernel, with the shortcut and with
    the interpreter's own patching, gives the same bits: element-wise steps in fp32 and bf16 (bit
    operations), AdamW's coefficient kernel, telemetry rows (reductions) and the rotational row
    engine. On a GPU nothing is interpreted and there is nothing to compare."""
    from triton.runtime import interpreter

    if device != "cpu":
        assert not hasattr(interpreter._patch_lang, "original")
        return
    assert interpreter._patch_lang.wdopt_shortcut  # installed: triton's internals are where it expects
    shapes = [(7,), (5, 9), (2, 40)]
    cases = [(wdopt.FusedAdamW, torch.bfloat16, dict(amsgrad=True)), (wdopt.FusedSGD, torch.float32, dict(momentum=0.9)),
             (wdopt.FusedLion, torch.float32, {}), (wdopt.RotationalAdamW, torch.float32, dict(weight_decay=0.1))]

    def results():
        out = []
        for cls, dtype, kw in cases:
            params = clone_leaves(make_params(shapes, dtype, device))
            opt = cls(params, lr=1e-2, backend="triton", **kw)
            monitor = wdopt.RotationMonitor(opt, every=2)
            run(opt, params, grad_stream(shapes, 2))
            out += [p.detach() for p in params] + [v for p in params for v in opt.state[p].values()]
            out += list(monitor.last.sums.values())
        return out

    shortcut = results()
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.original)
    plain = results()
    assert len(shortcut) == len(plain) > 30
    for a, b in zip(shortcut, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
