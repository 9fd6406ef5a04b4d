"""Every available backend against the reference and against torch.optim (for-loop), checking
parameters and every state tensor over several steps, across the options torch supports."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import wdopt
from conftest import backend_device_pairs
from helpers import (ODD_SHAPES, SMALL_SHAPES, assert_same_trajectory, clone_leaves, grad_stream, interpreted, make_params,
                     option_cases, pairwise, run)

STEPS = 12
PAIRS = backend_device_pairs()


def _lr(value, as_tensor, device, dtype=torch.float32):
    """A float, or a 0-d tensor of the parameters' dtype (torch computes lr·λ in the lr's dtype)."""
    return torch.tensor(value, device=device, dtype=dtype) if as_tensor else value


ADAMW_OPTIONS = [
    dict(amsgrad=a, maximize=m, weight_decay=w, tensor_lr=t)
    for a, m, w, t in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
]
ADAMW_ROWS = [dict(options, dtype=dtype) for options in ADAMW_OPTIONS for dtype in (torch.float32, torch.float64)]


def _options_id(row):
    return "-".join([f"{k}={v}" for k, v in row.items() if k != "dtype"] + ([str(row["dtype"])] if "dtype" in row else []))


class Expected:
    """The start, the gradient stream, and the trajectories every backend is compared with: the
    reference's and torch.optim's, computed once per case and device (``_expected``), then shared by
    the backends of the case. Only read, never stepped again."""

    def __init__(self, params, grads, reference, torch_optim):
        self.params, self.grads = params, grads
        self.reference, self.torch_optim = reference, torch_optim


def _trajectory(opt_factory, params, grads):
    leaves = clone_leaves(params)
    opt = opt_factory(leaves)
    run(opt, leaves, grads)
    return opt, leaves


@functools.lru_cache(maxsize=8)
def _expected(name, device, row):
    """``row``: the case's options as sorted (key, value) pairs. Cases run row by row (option_cases),
    so a small cache serves every backend of a row."""
    options = dict(row)
    dtype, tensor_lr = options.pop("dtype", torch.float32), options.pop("tensor_lr")
    params = make_params(ODD_SHAPES, dtype, device)
    if name == "adamw":
        hyper = dict(betas=(0.8, 0.99), eps=1e-6, **options)
        grads = grad_stream(ODD_SHAPES, STEPS)
        reference = _trajectory(lambda ps: wdopt.FusedAdamW(ps, lr=2e-2, backend="reference", **hyper), params, grads)
        torch_optim = _trajectory(lambda ps: torch.optim.AdamW(ps, lr=_lr(2e-2, tensor_lr, device, dtype), foreach=False,
                                                               **hyper), params, grads)
    else:
        grads = grad_stream(ODD_SHAPES, STEPS, top=0)
        reference = _trajectory(lambda ps: wdopt.FusedSGD(ps, lr=1e-2, backend="reference", **options), params, grads)
        torch_optim = _trajectory(lambda ps: torch.optim.SGD(ps, lr=_lr(1e-2, tensor_lr, device), foreach=False,
                                                             **options), params, grads)
    return Expected(params, grads, reference, torch_optim)


def _assert_matches_reference_and_torch(opt, ours, expected):
    assert_same_trajectory(opt, ours, *expected.reference)
    assert_same_trajectory(opt, ours, *expected.torch_optim)
    opt_torch, theirs = expected.torch_optim
    assert sorted(opt.state[ours[0]]) == sorted(opt_torch.state[theirs[0]])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_interpreter_cover_has_every_pair_of_options(name):
    """The Triton interpreter runs helpers.pairwise's rows of the option tables: every value of
    every option, and every pair of values of two options that the full table has, in fewer rows."""
    rows = ADAMW_ROWS if name == "adamw" else SGD_OPTIONS
    cover = pairwise(rows)
    for a, b in itertools.combinations(rows[0], 2):
        assert {(r[a], r[b]) for r in cover} == {(r[a], r[b]) for r in rows}, (a, b)
    assert rows[0] in cover and rows[-1] in cover and len(cover) < len(rows) / 4


@pytest.mark.parametrize("backend,device,row", option_cases(PAIRS, ADAMW_ROWS, _options_id))
def test_adamw_matches_torch_and_reference(backend, device, row):
    """Every option and dtype; under the Triton interpreter a pairwise cover of them (helpers.pairwise)."""
    expected = _expected("adamw", device, tuple(sorted(row.items(), key=lambda kv: kv[0])))
    options = dict(row)
    dtype, tensor_lr = options.pop("dtype"), options.pop("tensor_lr")
    hyper = dict(betas=(0.8, 0.99), eps=1e-6, **options)
    opt, ours = _trajectory(lambda ps: wdopt.FusedAdamW(ps, lr=_lr(2e-2, tensor_lr, device, dtype), backend=backend,
                                                        **hyper), expected.params, expected.grads)
    _assert_matches_reference_and_torch(opt, ours, expected)


SGD_OPTIONS = [
    dict(momentum=mo, dampening=da, nesterov=ne, weight_decay=wd, maximize=mx, tensor_lr=tl)
    for mo, da, ne, wd, mx, tl in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True], [False, True])
    if not (ne and (mo == 0 or da != 0)) and not (mo == 0 and da != 0)
]


@pytest.mark.parametrize("backend,device,options", option_cases(PAIRS, SGD_OPTIONS, _options_id))
def test_sgd_matches_torch_and_reference(backend, device, options):
    """Every valid option combination; under the Triton interpreter a pairwise cover of them."""
    expected = _expected("sgd", device, tuple(sorted(options.items(), key=lambda kv: kv[0])))
    options = dict(options)
    tensor_lr = options.pop("tensor_lr")
    opt, ours = _trajectory(lambda ps: wdopt.FusedSGD(ps, lr=_lr(1e-2, tensor_lr, device), backend=backend, **options),
                            expected.params, expected.grads)
    _assert_matches_reference_and_torch(opt, ours, expected)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_decoupled_sgd_is_torch_sgd_after_decay(backend, device, momentum, nesterov):
    """SGDW = p·(1 − lr·λ), then torch's SGD step without L2."""
    lr, wd = 1e-2, 0.3
    params = make_params(ODD_SHAPES, torch.float32, device)
    grads = grad_stream(ODD_SHAPES, STEPS, top=0)
    ours = clone_leaves(params)
    opt = wdopt.FusedSGD(ours, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                         decoupled_weight_decay=True, backend=backend)
    run(opt, ours, grads)

    theirs = clone_leaves(params)
    opt_torch = torch.optim.SGD(theirs, lr=lr, momentum=momentum, nesterov=nesterov, foreach=False)
    for step_grads in grads:
        with torch.no_grad():
            for p, g in zip(theirs, step_grads):
                p.mul_(1 - lr * wd)
                p.grad = g.to(p.dtype).to(p.device)
        opt_torch.step()
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("maximize,weight_decay,tensor_lr", [(False, 0.0, False), (True, 0.5, False), (False, 0.5, True)])
def test_lion_matches_reference(backend, device, dtype, maximize, weight_decay, tensor_lr):
    # The Triton interpreter: SMALL_SHAPES (Lion's multi-chunk tensor runs in the bit-for-bit test).
    shapes = SMALL_SHAPES if interpreted(backend, device) else ODD_SHAPES
    params = make_params(shapes, dtype, device)
    grads = grad_stream(shapes, STEPS)
    hyper = dict(betas=(0.9, 0.99), weight_decay=weight_decay, maximize=maximize)
    ours = clone_leaves(params)
    opt = wdopt.FusedLion(ours, lr=_lr(1e-3, tensor_lr, device, dtype), backend=backend, **hyper)
    run(opt, ours, grads)
    ref = clone_leaves(params)
    opt_ref = wdopt.FusedLion(ref, lr=1e-3, backend="reference", **hyper)
    run(opt_ref, ref, grads)
    assert_same_trajectory(opt, ours, opt_ref, ref)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_capturable_reads_lr_on_device(backend, device):
    """capturable=True with a tensor lr: changing the tensor in place changes the next step."""
    shapes = [(7,), (1023,)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, 6)
    lr = torch.tensor(1e-2, device=device)
    ours = clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=lr, capturable=True, backend=backend)
    theirs = clone_leaves(params)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for i, step_grads in enumerate(grads):
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.float().to(device), g.float().to(device)
        opt.step()
        opt_torch.step()
        lr.mul_(0.5)
        opt_torch.param_groups[0]["lr"] = 1e-2 * 0.5 ** (i + 1)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_per_group_settings(backend, device, name):
    """Groups with different hyperparameters, and one added later with add_param_group."""
    shapes = [(7,), (1023,), (33, 17), (5,)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, STEPS)
    if name == "adamw":
        ours_cls, torch_cls = wdopt.FusedAdamW, torch.optim.AdamW
        groups = [dict(lr=1e-2, weight_decay=0.0), dict(lr=3e-3, betas=(0.5, 0.9), amsgrad=True, weight_decay=0.2)]
        late = dict(lr=1e-3, maximize=True)
    else:
        ours_cls, torch_cls = wdopt.FusedSGD, torch.optim.SGD
        groups = [dict(lr=1e-2, momentum=0.9), dict(lr=3e-3, momentum=0.5, dampening=0.5, weight_decay=0.2)]
        late = dict(lr=1e-3, momentum=0.9, nesterov=True)

    def build(cls, leaves, **kw):
        opt = cls([dict(params=leaves[0:2], **groups[0]), dict(params=leaves[2:3], **groups[1])], **kw)
        opt.add_param_group(dict(params=leaves[3:], **late))
        return opt

    ours = clone_leaves(params)
    opt = build(ours_cls, ours, backend=backend)
    theirs = clone_leaves(params)
    opt_torch = build(torch_cls, theirs, foreach=False)
    run(opt, ours, grads)
    run(opt_torch, theirs, grads)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_hundreds_of_tensors(backend, device):
    # The Triton interpreter runs every tensor's program in Python: 130 tensors, still more than
    # the 128 rows one program of AdamW's coefficient kernel takes (adamw.ROWS_PER_PROGRAM).
    shapes = [((i * 37) % 301 + 1,) for i in range(130 if interpreted(backend, device) else 300)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, 4)
    ours = clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=1e-2, amsgrad=True, backend=backend)
    theirs = clone_leaves(params)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False)
    run(opt, ours, grads)
    run(opt_torch, theirs, grads)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_missing_grads_skip_params_and_steps(backend, device):
    """A parameter whose grad is None is not updated and its step count does not advance."""
    shapes = [(7,), (9,), (11,)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, STEPS)
    ours, theirs = clone_leaves(params), clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=1e-2, backend=backend)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step, step_grads in enumerate(grads):
        for i, (p, q, g) in enumerate(zip(ours, theirs, step_grads)):
            skip = (step + i) % 3 == 0
            p.grad = None if skip else g.float().to(device)
            q.grad = None if skip else g.float().to(device)
        opt.step()
        opt_torch.step()
    assert_same_trajectory(opt, ours, opt_torch, theirs)
    assert float(opt.state[ours[0]]["step"]) < STEPS


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cls_name", ["FusedAdamW", "FusedSGD"])
def test_complex_parameters(backend, device, cls_name):
    shapes = [(7,), (4, 5)]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.complex64).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.complex64) for s in shapes] for _ in range(6)]
    kw = dict(lr=1e-2, weight_decay=0.1) if cls_name == "FusedAdamW" else dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
    torch_cls = torch.optim.AdamW if cls_name == "FusedAdamW" else torch.optim.SGD
    ours, theirs = clone_leaves(params), clone_leaves(params)
    opt = getattr(wdopt, cls_name)(ours, backend=backend, **kw)
    opt_torch = torch_cls(theirs, foreach=False, **kw)
    run(opt, ours, grads)
    run(opt_torch, theirs, grads)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_channels_last_and_strided_parameters(backend, device):
    """Dense non-contiguous layouts work in place; a parameter with gaps is handled correctly,
    and the memory between its elements is never written."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 5, 5, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    base = torch.randn(12, 10, generator=g).to(device)
    transposed = torch.randn(6, 9, generator=g).to(device).t()  # dense, column-major
    params_src = [conv, transposed]
    shapes = [tuple(p.shape) for p in params_src] + [(12, 5)]
    grads = grad_stream(shapes, 6)

    ours = [p.clone(memory_format=torch.preserve_format).requires_grad_() for p in params_src]
    ours_base = base.clone()
    strided = ours_base[:, ::2]  # every other column: gaps in memory
    strided.requires_grad_()
    opt = wdopt.FusedAdamW(ours + [strided], lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = [p.detach().clone().requires_grad_() for p in params_src] + [base[:, ::2].clone().requires_grad_()]
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    run(opt, ours + [strided], grads)
    run(opt_torch, theirs, grads)

    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert opt.state[ours[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert_same_trajectory(opt, ours + [strided], opt_torch, theirs)
    torch.testing.assert_close(ours_base[:, 1::2], base[:, 1::2], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gradient_with_another_layout(backend, device):
    """A contiguous gradient for a channels_last parameter is read element for element."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, 3, 3, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 3, 3, generator=g).to(device)
    ours, theirs = p.clone().requires_grad_(), p.clone().requires_grad_()
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt = wdopt.FusedAdamW([ours], lr=1e-2, backend=backend)
    opt_torch = torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    opt.step()
    opt_torch.step()
    assert_same_trajectory(opt, [ours], opt_torch, [theirs])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_zero_element_parameters(backend, device):
    """Empty tensors are fine: nothing to update, but their step count advances as in torch."""
    shapes = [(0,), (3, 0), (5,)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, 3)
    ours, theirs = clone_leaves(params), clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=1e-2, backend=backend)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    run(opt, ours, grads)
    run(opt_torch, theirs, grads)
    assert_same_trajectory(opt, ours, opt_torch, theirs)


EXACT = [(b, d) for b, d in PAIRS if b != "reference"]


@pytest.mark.parametrize("backend,device", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls,kw", [
    (wdopt.FusedAdamW, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    (wdopt.FusedAdamW, dict(weight_decay=0.0)),
    (wdopt.FusedSGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.1)),
    (wdopt.FusedSGD, dict(momentum=0.9, nesterov=True, decoupled_weight_decay=True, weight_decay=0.1, maximize=True)),
    (wdopt.FusedLion, dict(weight_decay=0.3)),
], ids=lambda x: getattr(x, "__name__", None) or "-".join(f"{k}={v}" for k, v in x.items()))
def test_backend_equals_reference_bit_for_bit(backend, device, dtype, cls, kw):
    """The kernels share the reference's arithmetic (IEEE operations in the same order, no FMA
    contraction, correctly rounded sqrt, scalars computed in double and rounded once), so they
    agree with it exactly, in every dtype. The Triton interpreter runs the multi-chunk tensor in
    fp32 here and in fp64 in the option tests; SMALL_SHAPES in the other dtypes (where numpy's
    16-bit conversions made a case 3-4x slower; chunks are addressed in elements, whatever their
    size, and the compiled backends run ODD_SHAPES in every dtype)."""
    small = interpreted(backend, device) and dtype != torch.float32
    shapes = SMALL_SHAPES if small else ODD_SHAPES
    params = make_params(shapes, dtype, device)
    grads = grad_stream(shapes, STEPS, top=0)
    ours, ref = clone_leaves(params), clone_leaves(params)
    opt, opt_ref = cls(ours, lr=1e-2, backend=backend, **kw), cls(ref, lr=1e-2, backend="reference", **kw)
    run(opt, ours, grads)
    run(opt_ref, ref, grads)
    # Triton raises β to the step by repeated squaring (no libm on the device), the reference
    # with libm's pow: the bias corrections then differ in a double's last bits, which fp32
    # rounding hides but fp64 math shows.
    # (CUDA's double pow is within 2 ulp, not glibc's: the same holds for GPU backends.)
    few_ulps = (backend == "triton" or device == "cuda") and dtype == torch.float64 and cls is wdopt.FusedAdamW
    tol = dict(rtol=4e-15, atol=1e-15) if few_ulps else dict(rtol=0, atol=0)
    assert_same_trajectory(opt, ours, opt_ref, ref, **tol)


GRAPH_PAIRS = [(b, d) for b, d in PAIRS if d == "cuda" and b != "reference"]


@pytest.mark.skipif(not GRAPH_PAIRS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend,device", GRAPH_PAIRS)
@pytest.mark.parametrize("warmup", [1, 2], ids=lambda n: f"captured-after-{n}")
@pytest.mark.parametrize("cls,kw", [(wdopt.FusedAdamW, dict(amsgrad=True)), (wdopt.FusedSGD, dict(momentum=0.9)),
                                    (wdopt.FusedLion, {}), (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1)),
                                    (wdopt.RotationalAdamW, dict(weight_decay=0.1))],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_cuda_graph_capture_and_replay(backend, device, cls, kw, warmup):
    """capturable=True: a step captured in a CUDA graph (after 1 or 2 eager steps: SGD's
    first-step flag must be device state) replays with new gradients, lr changes made in place on
    the lr tensor, and the step counts advancing on the device. The rotational optimizers take a
    float lr (they read a tensor lr on the host: not capturable yet) and are compared with the same
    backend run eagerly, bit for bit."""
    rotational = issubclass(cls, (wdopt.RotationalAdamW, wdopt.RotationalSGD, wdopt.RotationalLion))
    shapes = [(7,), (1023,), (33, 17)]
    params = make_params(shapes, torch.float32, device)
    grads = grad_stream(shapes, 6, top=0)
    lrs = [1e-2 * (1.0 if rotational else 0.8**i) for i in range(len(grads))]
    lr = torch.tensor(lrs[0], device=device)
    ours = clone_leaves(params)
    static_grads = [torch.zeros_like(p) for p in ours]
    for p, g in zip(ours, static_grads):
        p.grad = g
    opt = cls(ours, lr=lrs[0] if rotational else lr, capturable=True, backend=backend, **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates state and tensor tables outside the capture
        for i in range(warmup):
            lr.fill_(lrs[i])
            for g, src in zip(static_grads, grads[i]):
                g.copy_(src)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i, step_grads in enumerate(grads[warmup:], start=warmup):
        lr.fill_(lrs[i])
        for g, src in zip(static_grads, step_grads):
            g.copy_(src)
        graph.replay()
    torch.cuda.synchronize()

    expected = clone_leaves(params)
    # Rotational: the same backend and options, eagerly (isolates the capture); else the reference.
    opt_expected = cls(expected, lr=lrs[0], backend=backend, capturable=True, **kw) if rotational else \
        cls(expected, lr=lrs[0], backend="reference", **kw)
    for i, step_grads in enumerate(grads):
        # the fp32 value the lr tensor holds; the rotational runs take the same float lr (rounding it
        # would change AdamW's fp64 step size and the angle by an ulp: seen on the H200, 2026-11-27)
        opt_expected.param_groups[0]["lr"] = lrs[i] if rotational else float(torch.tensor(lrs[i]))
        for p, g in zip(expected, step_grads):
            p.grad = g.float().to(device)
        opt_expected.step()
    assert_same_trajectory(opt, ours, opt_expected, expected, **(dict(rtol=0, atol=0) if rotational else {}))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_scalar_and_size_one_layouts(backend, device):
    """A 0-d parameter (a learnable temperature), and a gradient whose size-1 dimension has
    another stride than the parameter's (both contiguous: element k is element k)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.tensor(1.5, device=device), torch.randn(1, 5, generator=g).to(device)]
    grads = [[torch.tensor(0.3 * (i + 1)), torch.randn(5, 1, generator=g).t()] for i in range(4)]
    assert grads[0][1].stride() != params[1].stride() and grads[0][1].is_contiguous()
    ours, theirs = clone_leaves(params), clone_leaves(params)
    opt = wdopt.FusedAdamW(ours, lr=1e-2, backend=backend)
    opt_torch = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step_grads in grads:
        for p, q, gr in zip(ours, theirs, step_grads):
            p.grad, q.grad = gr.to(device), gr.to(device)
        opt.step()
        opt_torch.step()
    assert_same_trajectory(opt, ours, opt_torch, theirs)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_sgd_without_decay_adds_nothing(backend, device):
    """λ = 0 means no "+ λ·p" at all: an infinite weight stays infinite (0·inf would be NaN), and
    a maximized zero gradient leaves -0 in the momentum buffer, as in torch."""
    p = torch.tensor([float("inf"), 1.0, -2.0], device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = wdopt.FusedSGD([p], lr=0.1, momentum=0.9, maximize=True, backend=backend)
    opt_torch = torch.optim.SGD([q], lr=0.1, momentum=0.9, maximize=True, foreach=False)
    for _ in range(2):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
        opt.step()
        opt_torch.step()
    torch.testing.assert_close(p.detach(), q.detach())
    buffer, expected = opt.state[p]["momentum_buffer"], opt_torch.state[q]["momentum_buffer"]
    assert torch.equal(torch.signbit(buffer), torch.signbit(expected))


@pytest.mark.skipif("cpu" not in wdopt.available_backends("cpu"), reason="the C++ CPU kernels are unavailable")
def test_cpu_kernels_split_across_threads_identically():
    """The suite runs torch with one thread (tests/conftest.py), under which the C++ kernels do all
    the work in one part. Here they split it: 2 and 3 threads cut the 67,624 elements of these shapes
    (more than the 32,768 the kernels keep serial) inside tensors, at row boundaries for a monitored
    step, and between rows for the rotational engine. Every thread count gives the reference's
    result bit for bit, and the single thread's telemetry and rotational steps."""
    cases = [(wdopt.FusedAdamW, dict(amsgrad=True, weight_decay=0.1)), (wdopt.FusedSGD, dict(momentum=0.9)),
             (wdopt.FusedLion, dict(weight_decay=0.3)), (wdopt.RotationalAdamW, dict(weight_decay=0.1))]
    shapes = ODD_SHAPES + [(40, 9)]  # forty rotational rows
    params = make_params(shapes, torch.float32)
    grads = grad_stream(shapes, 4, top=0)

    def trajectory(cls, kw, backend, threads):
        torch.set_num_threads(threads)
        try:
            leaves = clone_leaves(params)
            opt = cls(leaves, lr=1e-2, backend=backend, **kw)
            monitor = wdopt.RotationMonitor(opt, every=2)  # steps 2 and 4 gather telemetry
            run(opt, leaves, grads)
            return opt, leaves, [record.sums for record in monitor.history]
        finally:
            torch.set_num_threads(1)

    for cls, kw in cases:
        single = trajectory(cls, kw, "cpu", 1)
        if cls is not wdopt.RotationalAdamW:  # the rotational kernel sums rows in its own order
            assert_same_trajectory(*single[:2], *trajectory(cls, kw, "reference", 1)[:2], rtol=0, atol=0)
        for threads in (2, 3):
            opt, leaves, sums = trajectory(cls, kw, "cpu", threads)
            assert_same_trajectory(opt, leaves, *single[:2], rtol=0, atol=0)
            for ours, theirs in zip(sums, single[2], strict=True):
                assert ours.keys() == theirs.keys()
                for key in theirs:
                    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
