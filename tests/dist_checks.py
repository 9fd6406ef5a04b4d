"""The checks of tests/test_distributed.py that need a real process group: run by each of 2 worker
processes (gloo, 127.0.0.1), started once for the whole module (starting a group costs seconds).

Every check runs on every rank, in the same order, and records "ok" or its traceback in
``$WDOPT_DIST_OUT/rank{r}.json`` as soon as it finishes, so that a check that hangs shows as the
one with no record when the parent's timeout kills the workers. Collectives time out after
``TIMEOUT`` seconds: a rank whose peer raised before a collective errors out instead of waiting.

Usage (what the test does): RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; ``python
tests/dist_checks.py [name ...]`` runs the named checks (all by default).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

# The test sets PYTHONPATH to the wdopt it imported; run by hand, the source tree is the fallback.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import wdopt  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

TIMEOUT = 60
CHECKS: dict = {}
BACKENDS = [b for b in ("cpu", "triton", "reference") if wdopt.available_backends("cpu").count(b)]
ELEMENTWISE = {
    "adamw": (wdopt.FusedAdamW, dict(lr=0.01, weight_decay=0.1)),
    "sgd": (wdopt.FusedSGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    "lion": (wdopt.FusedLion, dict(lr=0.01, weight_decay=0.1)),
}
ROTATIONAL = {
    "rotational_adamw": (wdopt.RotationalAdamW, dict(lr=0.01, weight_decay=0.1)),
    "rotational_sgd": (wdopt.RotationalSGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    "rotational_lion": (wdopt.RotationalLion, dict(lr=0.01, weight_decay=0.1)),
}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def full(t):
    if isinstance(t, DTensor) and t.dtype == torch.int16:
        t = t.to(torch.int32)  # gloo gathers no int16 (a 32-bit master's correction)
    return t.full_tensor() if isinstance(t, DTensor) else t


def rank() -> int:
    return dist.get_rank()


def seeded(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def assert_state_equal(opt_a, params_a, opt_b, params_b, exact: bool, **tol):
    """Parameters and state of ``opt_a`` (DTensors or plain) against ``opt_b``: bit for bit, or
    within ``tol``. Keys must match; ``step`` counters must be plain tensors."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        pairs = [("param", a.detach(), b.detach())]
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for key in sa:
            if key in ("step", "rotational_step"):
                assert not isinstance(sa[key], DTensor), (i, key, "a counter must stay a plain tensor")
            pairs.append((key, sa[key], sb[key]))
        for key, x, y in pairs:
            x, y = full(x).float(), full(y).float()
            if exact:
                assert torch.equal(x, y), (i, key, (x - y).abs().max().item())
            else:
                torch.testing.assert_close(x, y, msg=lambda m: f"param {i} {key}: {m}", **tol)


# ------------------------------------------------------------------ one step, bit for bit


SHAPES = [(5, 3), (7,), (1, 4), (3, 6)]  # uneven over 2 ranks; (1, 4): rank 1 holds no row


def _bitwise(cls, kw, backend, placements):
    mesh = init_device_mesh("cpu", (2,))
    start = [seeded(s, 10 + i) for i, s in enumerate(SHAPES)]
    chosen = [placements[i % len(placements)] for i in range(len(start))]
    chosen = [pl if not pl.is_shard() or pl.dim < t.dim() else Shard(0) for pl, t in zip(chosen, start)]
    dparams = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [pl])) for pl, t in zip(chosen, start)]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt_d, opt_p = cls(dparams, backend=backend, **kw), cls(plain, backend=backend, **kw)
    for step in range(3):
        grads = [seeded(s, 100 * step + i, scale=10.0 ** (i - 2)) for i, s in enumerate(SHAPES)]
        for p, q, g in zip(dparams, plain, grads):
            p.grad = distribute_tensor(g, mesh, p.placements)
            q.grad = g.clone()
        opt_d.step()
        opt_p.step()
    assert all(isinstance(p, DTensor) for p in dparams)
    assert all(isinstance(v, DTensor) for p in dparams for k, v in opt_d.state[p].items()
               if k not in ("step", "rotational_step")), "state shaped like the parameter must be DTensors"
    for p in dparams:
        for key, v in opt_d.state[p].items():
            if isinstance(v, DTensor) and v.shape == p.shape:
                assert v.placements == p.placements, (key, v.placements, p.placements)
    assert_state_equal(opt_d, dparams, opt_p, plain, exact=True)


def _add_bitwise_checks():
    for backend in BACKENDS:
        for name, (cls, kw) in ELEMENTWISE.items():
            def fn(cls=cls, kw=kw, backend=backend):
                _bitwise(cls, kw, backend, [Shard(0), Shard(1), Replicate()])
            fn.__name__ = f"step_bitwise_{name}_{backend}_shard0_shard1_replicate"
            check(fn)
        for name, (cls, kw) in ROTATIONAL.items():
            if backend == "triton" and name != "rotational_adamw":
                continue  # the interpreter is slow; the Triton rotational kernel is shared by all three
            def fn(cls=cls, kw=kw, backend=backend):
                _bitwise(cls, kw, backend, [Shard(0), Replicate()])
            fn.__name__ = f"step_bitwise_{name}_{backend}_shard0_replicate"
            check(fn)


_add_bitwise_checks()


# ------------------------------------------------------------------ FSDP2 end to end


def mlp(seed=0, sizes=(5, 7, 3, 1)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, **kw)
    return fully_shard(model, **kw)


def batch(step, r, n=4, inputs=5):
    g = torch.Generator().manual_seed(1000 * step + r)
    return torch.randn(n, inputs, generator=g), torch.randn(n, 1, generator=g)


def train(model, opt, steps, ranks, offset=0, scaler=None):
    """Mean squared error over the batches of ``ranks`` (the global batch for a one-process model;
    this rank's own for a data-parallel one)."""
    for step in range(offset, offset + steps):
        x = torch.cat([batch(step, r)[0] for r in ranks])
        y = torch.cat([batch(step, r)[1] for r in ranks])
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    return loss.detach()


def _expected(cls, kw, steps=10):
    """The same training on one process, on the whole batch: torch.optim for AdamW and SGD, the
    reference backend for the others."""
    model = mlp()
    if cls is wdopt.FusedAdamW:
        opt = torch.optim.AdamW(model.parameters(), **kw)
    elif cls is wdopt.FusedSGD:
        opt = torch.optim.SGD(model.parameters(), **kw)
    else:
        opt = cls(model.parameters(), backend="reference", **kw)
    train(model, opt, steps, ranks=range(dist.get_world_size()))
    return model, opt


def _fsdp_end_to_end(cls, kw, backend):
    model = shard(mlp())
    opt = cls(model.parameters(), backend=backend, **kw)
    train(model, opt, 10, ranks=[rank()])
    ref_model, ref_opt = _expected(cls, kw)
    params = list(model.parameters())
    assert any(p.to_local().numel() == 0 for p in params) == (rank() == 1), "rank 1 should hold empty shards"
    assert_state_equal(opt, params, ref_opt, list(ref_model.parameters()), exact=False, rtol=1e-4, atol=1e-5)


for _name, (_cls, _kw) in {**ELEMENTWISE, **ROTATIONAL}.items():
    for _backend in ["cpu"] + (["triton"] if _name == "adamw" and "triton" in BACKENDS else []) + \
            (["reference"] if _name in ("adamw", "rotational_adamw") else []):
        def _fn(cls=_cls, kw=_kw, backend=_backend):
            _fsdp_end_to_end(cls, kw, backend)
        _fn.__name__ = f"fsdp2_10_steps_{_name}_{_backend}_matches_one_process"
        check(_fn)


@check
def fsdp2_mixed_dtensor_and_plain_params():
    """One optimizer over an FSDP2 model's DTensors and a plain tensor: one step each, as torch."""
    model = shard(mlp())
    extra = torch.nn.Parameter(seeded((3, 2), 7))
    ref_model, ref_extra = mlp(), torch.nn.Parameter(seeded((3, 2), 7))
    opt = wdopt.FusedAdamW([*model.parameters(), extra], lr=0.01)
    ref_opt = torch.optim.AdamW([*ref_model.parameters(), ref_extra], lr=0.01)
    for step in range(3):
        for m, e, o in ((model, extra, opt), (ref_model, ref_extra, ref_opt)):
            x, y = batch(step, 0)
            (torch.nn.functional.mse_loss(m(x), y) + (e ** 2).sum()).backward()
            o.step()
            o.zero_grad()
    assert not isinstance(opt.state[extra]["exp_avg"], DTensor)
    assert_state_equal(opt, [*model.parameters(), extra], ref_opt, [*ref_model.parameters(), ref_extra],
                       exact=False, rtol=1e-5, atol=1e-6)


@check
def fsdp2_mixed_precision_bf16():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        model = shard(mlp(), mp_policy=policy)
        opt = make(model.parameters())
        train(model, opt, 5, ranks=[rank()])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the sharded master stays fp32"
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def fsdp2_cpu_offload():
    from torch.distributed.fsdp import CPUOffloadPolicy

    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        # pin_memory needs an accelerator; on a CPU-only machine the offload is CPU to CPU, which still
        # takes FSDP2's offload path (sharded parameters, gradients and state kept on the CPU).
        model = shard(mlp(), offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()))
        opt = make(model.parameters())
        train(model, opt, 5, ranks=[rank()])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def hsdp_2d_mesh():
    """HSDP: replicate over dim 0 of a (2, 1) mesh, shard over dim 1 (one rank: trivial shards,
    but the parameters are 2-D-mesh DTensors (Replicate, Shard(0)) and the gradients all-reduced)."""
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01),
                 lambda ps: wdopt.RotationalAdamW(ps, lr=0.01, weight_decay=0.1)):
        model = shard(mlp(), mesh=mesh)
        opt = make(model.parameters())
        train(model, opt, 5, ranks=[rank()])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt), (rot_model, rot_opt) = runs
    assert len(next(iter(model.parameters())).placements) == 2
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)
    w = rot_model[0].weight
    assert rot_opt.state[w]["rotational_norm"].placements == w.placements
    torch.testing.assert_close(full(w).norm(dim=1), full(rot_opt.state[w]["rotational_norm"]))


# ------------------------------------------------------------------ tensor parallelism


def _tp(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


@check
def tp_colwise_rowwise_10_steps_matches_torch():
    """A tensor-parallel MLP: weights Shard(0) then Shard(1), biases Shard(0) and Replicate (8
    hidden units: torch's RowwiseParallel takes its input's shards as even). FusedAdamW (C++) against torch.optim.AdamW on the same model."""
    mesh = init_device_mesh("cpu", (2,))
    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        model = _tp(mlp(sizes=(5, 8, 1)), mesh)
        opt = make(model.parameters())
        train(model, opt, 10, ranks=[0])  # tensor parallel: every rank sees the same batch
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    assert model[2].weight.placements == (Shard(1),) and model[0].weight.placements == (Shard(0),)
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def fsdp2_over_tp_2d_mesh_matches_torch():
    """FSDP2 over tensor parallelism on a (dp=1, tp=2) mesh (2 ranks: the FSDP dimension is
    trivial, but the parameters are 2-D-mesh DTensors made by fully_shard over a TP model, with the
    gradients' reductions of both): FusedAdamW against torch.optim.AdamW on the same model."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        model = _tp(mlp(sizes=(5, 8, 1)), mesh["tp"])
        shard(model, mesh=mesh["dp"])
        opt = make(model.parameters())
        train(model, opt, 10, ranks=[0])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    assert len(model[0].weight.placements) == 2, model[0].weight.placements
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def tp_rotational_colwise_ok_rowwise_refused():
    mesh = init_device_mesh("cpu", (2,))
    model = _tp(mlp(sizes=(5, 8, 1)), mesh)
    try:
        wdopt.RotationalAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    except ValueError as error:
        assert "Shard(dim=1)" in str(error) and "parameter 2 of param group 0" in str(error), error
        assert "shard it along dim 0 only" in str(error), error
    else:
        raise AssertionError("a Shard(1) rotational weight was accepted")
    opt = wdopt.RotationalAdamW([model[0].weight, model[0].bias], lr=0.01, weight_decay=0.1)
    ref = mlp(sizes=(5, 8, 1))
    # Against the same backend on the unsharded model: gradients differ by the matmuls' rounding
    # only. (Between backends, this small layer's first Adam step has rows of gradients near eps,
    # where the C++ and reference rotational steps already differ by ~2e-4 without any sharding.)
    ref_opt = wdopt.RotationalAdamW([ref[0].weight, ref[0].bias], lr=0.01, weight_decay=0.1, backend="cpu")
    for m, o in ((model, opt), (ref, ref_opt)):
        train(m, o, 10, ranks=[0])
    assert model[0].weight.placements == (Shard(0),)
    assert opt.state[model[0].weight]["rotational_norm"].placements == (Shard(0),)
    assert_state_equal(opt, [model[0].weight, model[0].bias], ref_opt, [ref[0].weight, ref[0].bias], exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def partial_gradient_refused_nothing_changed():
    """A Partial gradient (tensor parallelism before its reduction) is refused before any update,
    also of the parameters before it."""
    mesh = init_device_mesh("cpu", (2,))
    a = torch.nn.Parameter(distribute_tensor(seeded((4, 3), 1), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(seeded((4, 3), 2), mesh, [Replicate()]))
    opt = wdopt.FusedAdamW([a, b], lr=0.1)
    a.grad = distribute_tensor(seeded((4, 3), 3), mesh, [Shard(0)])
    b.grad = DTensor.from_local(seeded((4, 3), 4), mesh, [Partial()], run_check=False)
    before = [full(a).clone(), full(b).clone()]
    try:
        opt.step()
    except RuntimeError as error:
        assert "Partial" in str(error) and "parameter 1 of param group 0" in str(error), error
    else:
        raise AssertionError("a Partial gradient was accepted")
    assert torch.equal(full(a), before[0]) and torch.equal(full(b), before[1]) and not opt.state


# ------------------------------------------------------------------ GradScaler


def _grad_scaler(cls, kw):
    """An inf in rank 1's shard only: GradScaler (DTensor dispatch all-reduces found_inf) makes
    both ranks skip, then both step at the next, smaller scale."""
    model = shard(mlp())
    opt = cls(model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [full(p).clone() for p in model.parameters()]  # after construction (rotational: centred)
    x, y = batch(0, rank())
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    w = model[0].weight
    if rank() == 1:
        w.grad.to_local()[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert scaler.get_scale() == 512.0, scaler.get_scale()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(full(p), b), "a skipped step changed a parameter"
    for p in model.parameters():
        for key in ("step", "rotational_step"):
            if key in opt.state.get(p, {}):
                assert float(opt.state[p][key]) == 0, (key, float(opt.state[p][key]))
    train(model, opt, 1, ranks=[rank()], scaler=scaler)
    assert not torch.equal(full(model[0].weight), before[0]) and float(opt.state[w]["step"]) == 1


for _name, (_cls, _kw) in {"adamw": ELEMENTWISE["adamw"], "rotational_adamw": ROTATIONAL["rotational_adamw"]}.items():
    def _fn(cls=_cls, kw=_kw):
        _grad_scaler(cls, kw)
    _fn.__name__ = f"grad_scaler_{_name}_inf_on_one_rank_skips_every_rank"
    check(_fn)


# ------------------------------------------------------------------ DDP, ZeRO


def _ranks_identical(tensors):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks differ"


@check
def ddp_fused_adamw_matches_torch():
    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = []
    for make in (lambda ps: wdopt.FusedAdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)):
        model = DDP(mlp())
        opt = make(model.parameters())
        train(model, opt, 10, ranks=[rank()])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    _ranks_identical(list(model.parameters()))
    assert_state_equal(opt, list(model.parameters()), ref_opt, list(ref_model.parameters()), exact=False,
                       rtol=1e-5, atol=1e-6)


@check
def zero_redundancy_fused_adamw_matches_torch():
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = []
    for cls in (wdopt.FusedAdamW, torch.optim.AdamW):
        model = DDP(mlp())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=0.01)
        train(model, opt, 10, ranks=[rank()])
        runs.append((model, opt))
    (model, opt), (ref_model, ref_opt) = runs
    _ranks_identical(list(model.parameters()))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert isinstance(opt.optim, wdopt.FusedAdamW)
    assert_state_equal(opt.optim, [p for g in opt.optim.param_groups for p in g["params"]], ref_opt.optim,
                       [p for g in ref_opt.optim.param_groups for p in g["params"]], exact=False, rtol=1e-5,
                       atol=1e-6)


# ------------------------------------------------------------------ checkpoints


def _resume(cls, kw, directory, mesh, group, final, final_state, exact):
    """Resume from the checkpoint in ``directory`` on ``mesh``, train the 3 steps after it: the
    parameters and state must end where the uninterrupted run did (``final``, ``final_state``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = shard(mlp(seed=1), mesh=mesh)  # other weights: the checkpoint must overwrite them
    opt = cls(model.parameters(), **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory, process_group=group)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, 3, ranks=[0], offset=3)
    for i, p in enumerate(model.parameters()):
        assert sorted(opt.state[p]) == sorted(final_state[i]), (i, sorted(opt.state[p]), sorted(final_state[i]))
        pairs = [("param", full(p), final[i])] + [(k, full(v), final_state[i][k]) for k, v in opt.state[p].items()]
        for key, x, y in pairs:
            if exact:
                assert torch.equal(x, y), (i, key, (x - y).abs().max().item())
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{i} {key}: {m}")
        for key, v in opt.state[p].items():
            if key not in ("step", "rotational_step"):
                assert isinstance(v, DTensor) and v.device_mesh == p.device_mesh, key


def _checkpoint(cls, kw, directory):
    """Train 3 steps on 2 ranks, save with torch.distributed.checkpoint, train 3 more: the
    uninterrupted run. Resume on 2 ranks (same placement: bit for bit) and on 1 (rank 0 alone in
    a one-rank group: resharded) from the checkpoint; each must end where the uninterrupted run
    did. The uninterrupted run's end is saved for the 3-rank group (CHECKS3)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import DeviceMesh

    model = shard(mlp())
    opt = cls(model.parameters(), **kw)
    train(model, opt, 3, ranks=[0])  # the same batch on every rank: gradients do not depend on the world size
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    train(model, opt, 3, ranks=[0], offset=3)
    final = [full(p).clone() for p in model.parameters()]
    final_state = {i: {k: full(v).clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    if rank() == 0:
        torch.save((final, final_state), os.path.join(directory, "uninterrupted.pt"))
    one = dist.new_group([0])  # every rank takes part in making a group
    _resume(cls, kw, directory, init_device_mesh("cpu", (2,)), None, final, final_state, exact=True)
    if rank() == 0:
        _resume(cls, kw, directory, DeviceMesh.from_group(one, "cpu"), one, final, final_state, exact=False)
    dist.barrier()


CHECKPOINTED = {"adamw": ELEMENTWISE["adamw"], "sgd": ELEMENTWISE["sgd"], "rotational_adamw": ROTATIONAL["rotational_adamw"]}
#: Checks for a group of 3 ranks, run after the 2-rank group (tests/test_distributed.py).
CHECKS3: dict = {}


def _add_checkpoint_checks():
    for name, (cls, kw) in CHECKPOINTED.items():
        def fn(cls=cls, kw=kw):
            directory = os.path.join(os.environ["WDOPT_DIST_OUT"], f"ckpt_{cls.__name__}")
            _checkpoint(cls, kw, directory)
        fn.__name__ = f"checkpoint_{name}_save_2_ranks_resume_on_2_and_1"
        check(fn)

        def fn3(cls=cls, kw=kw, saved=fn.__name__):
            """Resharded onto 3 ranks (shards of 3, 3, 1 rows; 1, 0, 0): resume equals the run."""
            directory = os.path.join(os.environ["WDOPT_DIST_OUT"], f"ckpt_{cls.__name__}")
            assert os.path.exists(os.path.join(directory, "uninterrupted.pt")), f"{saved} saved nothing"
            final, final_state = torch.load(os.path.join(directory, "uninterrupted.pt"))
            _resume(cls, kw, directory, init_device_mesh("cpu", (3,)), None, final, final_state, exact=False)
        fn3.__name__ = f"checkpoint_{name}_save_2_ranks_resume_on_3"
        CHECKS3[fn3.__name__] = fn3


_add_checkpoint_checks()


@check
def loaded_state_of_another_placement_refused():
    """State loaded with load_state_dict from an optimizer whose parameter was placed otherwise
    (Replicate state for a Shard(0) parameter): the next step raises naming both, changing nothing."""
    mesh = init_device_mesh("cpu", (2,))
    w = torch.nn.Parameter(distribute_tensor(seeded((5, 3), 1), mesh, [Shard(0)]))
    opt = wdopt.FusedAdamW([w], lr=0.1)
    w.grad = distribute_tensor(seeded((5, 3), 2), mesh, [Shard(0)])
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].redistribute(placements=[Replicate()])
    opt.load_state_dict(saved)
    before, exp_avg_sq = full(w).clone(), full(opt.state[w]["exp_avg_sq"]).clone()
    try:
        opt.step()
    except RuntimeError as error:
        assert "state 'exp_avg'" in str(error) and "Replicate()" in str(error) and "Shard(dim=0)" in str(error), error
    else:
        raise AssertionError("state of another placement was accepted")
    assert torch.equal(full(w), before) and torch.equal(full(opt.state[w]["exp_avg_sq"]), exp_avg_sq)
    assert float(opt.state[w]["step"]) == 1


# ------------------------------------------------------------------ low precision on shards
#
# Stochastic rounding draws each element's bits from its index in the whole tensor, compensated
# corrections and 8-bit codes are placed as their parameter, 8-bit block scales as the global
# tensor's blocks (wdopt/optim/_dtensor.py): a sharded run equals the unsharded one bit for bit,
# and a checkpoint resumes bit for bit on another number of ranks.

#: (512, 3): 256 rows a rank, 3 whole 256-element blocks each; (6, 5) and (9,): shards that split
#: blocks (no 8-bit states there); (4, 4) replicated.
LOW_SHAPES = [(512, 3), (6, 5), (9,), (4, 4)]
LOW_OPTIONS = {
    "sr_bf16": (torch.bfloat16, dict(stochastic_rounding=True)),
    "master24_sr_bf16": (torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True)),
    "master32_bf16": (torch.bfloat16, dict(master_weight_bits=32)),
    "sr_8bit_fp32": (torch.float32, dict(state_bits=8, stochastic_rounding=True)),
    "master24_sr_8bit_bf16": (torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True, state_bits=8)),
}


def _low_groups(params, options, placements):
    """One group per parameter (so that 8-bit states go only where blocks fit the shards)."""
    groups = []
    for p, pl in zip(params, placements):
        extra = dict(options)
        if pl != Shard(0) or p.shape[0] != 512:
            extra.pop("state_bits", None)
        groups.append({"params": [p], **extra})
    return groups


def _assert_low_equal(opt_a, params_a, opt_b, params_b):
    """assert_state_equal bit for bit, rng compared on its key and count (the index base is each
    shard's own)."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(full(a.detach()), full(b.detach())), (i, "param")
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for key in sa:
            x, y = full(sa[key]), full(sb[key])
            if key == "rng":
                x, y = x[:2], y[:2]
            assert torch.equal(x, y), (i, key)


def _low_precision_bitwise(cls, kw, backend, name):
    dtype, options = LOW_OPTIONS[name]
    mesh = init_device_mesh("cpu", (2,))
    placements = [Shard(0), Shard(0), Shard(0), Replicate()]
    start = [seeded(s, 20 + i).to(dtype) for i, s in enumerate(LOW_SHAPES)]
    dparams = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [pl])) for pl, t in zip(placements, start)]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt_d = cls(_low_groups(dparams, options, placements), backend=backend, **kw)
    opt_p = cls(_low_groups(plain, options, placements), backend=backend, **kw)
    for step in range(3):
        grads = [seeded(s, 200 * step + i, scale=10.0 ** (i - 2)).to(dtype) for i, s in enumerate(LOW_SHAPES)]
        for p, q, g in zip(dparams, plain, grads):
            p.grad = distribute_tensor(g, mesh, p.placements)
            q.grad = g.clone()
        opt_d.step()
        opt_p.step()
    state = opt_d.state[dparams[0]]
    if options.get("master_weight_bits", 16) != 16:
        assert isinstance(state["correction"], DTensor) and state["correction"].placements == (Shard(0),)
    if options.get("state_bits"):
        assert isinstance(state["exp_avg_block_scale"], DTensor) and state["exp_avg_block_scale"].shape == (6,)
        assert state["exp_avg_block_scale"].to_local().shape == (3,)
    if options.get("stochastic_rounding") and dtype != torch.float32:
        assert state["rng"].tolist()[2] == 768 * rank(), state["rng"]  # this shard's first element
    _assert_low_equal(opt_d, dparams, opt_p, plain)


def _add_low_precision_checks():
    for backend in [b for b in BACKENDS if b != "triton"]:  # Triton's: one check (the interpreter is slow)
        for name in LOW_OPTIONS:
            for opt_name in ("adamw", "lion") if backend == "cpu" else ("adamw",):
                cls, kw = ELEMENTWISE[opt_name]

                def fn(cls=cls, kw=kw, backend=backend, name=name):
                    _low_precision_bitwise(cls, kw, backend, name)
                fn.__name__ = f"low_precision_{opt_name}_{name}_{backend}_sharded_equals_unsharded"
                check(fn)
    if "triton" in BACKENDS:
        def fn():
            _low_precision_bitwise(*ELEMENTWISE["adamw"], "triton", "master24_sr_8bit_bf16")
        fn.__name__ = "low_precision_adamw_master24_sr_8bit_bf16_triton_sharded_equals_unsharded"
        check(fn)
    cls, kw = ROTATIONAL["rotational_sgd"]

    def fn():
        _low_precision_bitwise(cls, kw, "cpu", "master24_sr_bf16")
    fn.__name__ = "low_precision_rotational_sgd_master24_sr_bf16_cpu_sharded_equals_unsharded"
    check(fn)
    # 8-bit states of rotational rows: (512, 3) has rows of 3 in 256-element blocks that straddle
    # them; each rank rotates its 256 rows, then encodes its 3 whole blocks (CPU kernel and reference).
    for backend in [b for b in ("cpu", "reference") if b in BACKENDS]:
        def fn(backend=backend):
            _low_precision_bitwise(*ROTATIONAL["rotational_adamw"], backend, "master24_sr_8bit_bf16")
        fn.__name__ = f"low_precision_rotational_adamw_master24_sr_8bit_bf16_{backend}_sharded_equals_unsharded"
        check(fn)


_add_low_precision_checks()


@check
def low_precision_refuses_tensor_parallel_and_split_blocks():
    """Stochastic rounding of a Shard(1) parameter (its shard is no contiguous run of the tensor)
    and 8-bit states whose blocks a shard boundary splits: clear errors, nothing written."""
    mesh = init_device_mesh("cpu", (2,))
    for shape, placement, options, message in [
            ((4, 6), Shard(1), dict(stochastic_rounding=True), "one contiguous run"),
            ((6, 5), Shard(0), dict(state_bits=8), "block"),
    ]:
        w = torch.nn.Parameter(distribute_tensor(seeded(shape, 1).to(torch.bfloat16), mesh, [placement]))
        opt = wdopt.FusedAdamW([w], lr=0.1, **options)
        w.grad = distribute_tensor(seeded(shape, 2).to(torch.bfloat16), mesh, [placement])
        before = full(w).clone()
        try:
            opt.step()
        except NotImplementedError as error:
            assert message in str(error), error
        else:
            raise AssertionError(f"{placement} with {options} was accepted")
        assert torch.equal(full(w), before) and not opt.state[w]


@check
def low_precision_checkpoint_resumes_bit_for_bit_on_1_rank():
    """bf16 + 24-bit master + stochastic rounding + 8-bit states: 2 steps on 2 ranks, saved with
    torch.distributed.checkpoint, 2 more; resumed on rank 0 alone (the whole tensors: resharded),
    the same 2 steps end bit for bit where the 2-rank run did (the bits follow global indices)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import DeviceMesh

    dtype, options = LOW_OPTIONS["master24_sr_8bit_bf16"]
    directory = os.path.join(os.environ["WDOPT_DIST_OUT"], "ckpt_low_precision")

    def make(mesh):
        model = torch.nn.Linear(3, 512, bias=False).to(dtype)  # weight (512, 3): whole blocks per shard
        with torch.no_grad():
            model.weight.copy_(seeded((512, 3), 5).to(dtype))
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
        return model, wdopt.FusedAdamW(model.parameters(), lr=0.01, weight_decay=0.1, **options)

    def steps(model, opt, first, n):
        for step in range(first, first + n):
            x = seeded((4, 3), 300 + step).to(dtype)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = make(init_device_mesh("cpu", (2,)))
    steps(model, opt, 0, 2)
    dcp.save({"model": {"weight": model.weight}, "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=directory)
    steps(model, opt, 2, 2)
    w = model.weight
    final = [full(w).clone()] + [full(v).clone() for k, v in sorted(opt.state[w].items()) if k != "rng"]
    one = dist.new_group([0])
    if rank() == 0:
        model1, opt1 = make(DeviceMesh.from_group(one, "cpu"))
        steps(model1, opt1, 0, 1)  # makes the state that the checkpoint then overwrites
        state = {"model": {"weight": model1.weight}, "optim": get_optimizer_state_dict(model1, opt1)}
        dcp.load(state, checkpoint_id=directory, process_group=one)
        set_optimizer_state_dict(model1, opt1, optim_state_dict=state["optim"])
        steps(model1, opt1, 2, 2)
        w1 = model1.weight
        got = [full(w1)] + [full(v) for k, v in sorted(opt1.state[w1].items()) if k != "rng"]
        assert len(got) == len(final)
        for i, (a, b) in enumerate(zip(got, final)):
            assert torch.equal(a, b), (i, sorted(opt1.state[w1]))
        assert opt1.state[w1]["rng"].tolist()[1:] == [4, 0]
    dist.barrier()


# ------------------------------------------------------------------ RotationMonitor


def _monitored(model, cls, kw, ranks, backend):
    opt = cls(model.parameters(), backend=backend, **kw)
    names = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters()}
    monitor = wdopt.RotationMonitor(opt, every=3, names=names)
    train(model, opt, 6, ranks=ranks)
    return monitor


def _add_monitor_checks():
    for name, (cls, kw) in {"adamw": ELEMENTWISE["adamw"], "rotational_adamw": ROTATIONAL["rotational_adamw"]}.items():
        def fn(cls=cls, kw=kw):
            """RotationMonitor on FSDP2 (uneven row shards, a rank with none; biases sharded as one
            row) reports the unsharded run's numbers, per tensor and per neuron."""
            sharded = _monitored(shard(mlp()), cls, kw, [rank()], "cpu")
            whole = _monitored(mlp(), cls, kw, range(dist.get_world_size()), "cpu")
            assert len(sharded.history) == len(whole.history) == 2
            for a, b in zip(sharded.history, whole.history):
                da, db = a.as_dict(), b.as_dict()
                assert sorted(da["tensors"]) == sorted(db["tensors"]) and len(da["tensors"]) == 6, sorted(da["tensors"])
                for tensor_name, values in db["tensors"].items():
                    for key, value in values.items():
                        got = da["tensors"][tensor_name][key]
                        if value is None:
                            assert got is None, (tensor_name, key, got)
                        else:
                            assert abs(got - value) <= 1e-4 * abs(value) + 1e-7, (tensor_name, key, got, value)
                for key, value in b.neurons("0.weight").items():
                    torch.testing.assert_close(a.neurons("0.weight")[key], value, rtol=1e-4, atol=1e-7)
        fn.__name__ = f"rotation_monitor_fsdp2_{name}_matches_one_process"
        check(fn)


_add_monitor_checks()


@check
def rotation_monitor_statistics_beside_sharded_parameters():
    """RotationMonitor(statistics=True) on a model whose first layer alone is sharded (a bucket
    of DTensors and plain tensors): the sums are those of a monitor without statistics, the plain
    parameters get their statistics, the sharded ones none."""
    from torch.distributed.fsdp import fully_shard

    def run(statistics):
        model = mlp()
        fully_shard(model[0])
        opt = wdopt.FusedAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        names = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters()}
        monitor = wdopt.RotationMonitor(opt, every=2, names=names, statistics=statistics)
        train(model, opt, 4, ranks=[rank()])
        return monitor

    with_statistics, plain = run(True), run(False)
    for a, b in zip(with_statistics.history, plain.history):
        da, db = a.as_dict(), b.as_dict()
        assert da == db, (da, db)
        assert set(a.statistics) == {"2.weight", "2.bias", "4.weight", "4.bias"}, sorted(a.statistics)
        assert all(bool(torch.isfinite(v).all()) for v in a.statistics.values())
        assert b.statistics == {}


@check
def rotation_monitor_read_on_one_rank_fails_clearly():
    """Reading a sharded record is a collective: a read on rank 0 alone raises after read_timeout
    with a message saying so, before any collective, so the group still works; reads on both
    ranks then succeed."""
    model = shard(mlp())
    opt = wdopt.FusedAdamW(model.parameters(), lr=0.01)
    monitor = wdopt.RotationMonitor(opt, every=1, read_timeout=2.0)
    train(model, opt, 2, ranks=[rank()])
    if rank() == 0:
        start = time.perf_counter()
        try:
            monitor.history[0].as_dict()
        except RuntimeError as error:
            assert "every rank must read" in str(error) and "only 1 of them" in str(error), error
        else:
            raise AssertionError("a read on one rank returned")
        assert time.perf_counter() - start < 30
    dist.barrier()
    assert monitor.history[1].as_dict()["tensors"]["group0.param0"]["weight_norm"] > 0


# ------------------------------------------------------------------ the example


def _add_example_checks():
    for optimizer in ("adamw", "rotational"):
        def fn(optimizer=optimizer):
            """examples/fsdp2_train.py, 30 steps in this group: the loss falls."""
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
            import fsdp2_train

            losses = fsdp2_train.main(["--steps", "30", "--optimizer", optimizer, "--batch", "4"])
            assert len(losses) == 2 and losses[-1] < 0.8 * losses[0], losses
        fn.__name__ = f"example_fsdp2_train_{optimizer}_loss_falls"
        check(fn)


_add_example_checks()


# ------------------------------------------------------------------ driver


def main(names):
    rank_ = int(os.environ["RANK"])
    out = os.environ["WDOPT_DIST_OUT"]
    checks = CHECKS3 if int(os.environ["WORLD_SIZE"]) == 3 else CHECKS
    if wdopt.backends.unavailable_reason("cpu") is None:
        wdopt.backends.load("cpu")  # before the group: a rank waiting for a build would time out a collective
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    results = {}
    path = os.path.join(out, f"world{os.environ['WORLD_SIZE']}_rank{rank_}.json")
    for name in names or list(checks):
        start = time.perf_counter()
        try:
            checks[name]()
            outcome = "ok"
        except BaseException:  # noqa: BLE001 - recorded for the parent test to report
            outcome = traceback.format_exc()
        results[name] = {"outcome": outcome, "seconds": round(time.perf_counter() - start, 2)}
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    if "--list" in sys.argv:
        print("\n".join(CHECKS))
    else:
        main(sys.argv[1:])
