"""Validation before a step (issue 12 §13, §15-§18): overlapping memory, meta parameters, state
of another optimizer, edited groups, torch's betas and sparse-gradient rules, the check cache."""

from __future__ import annotations

import pytest
import torch

import wdopt
from conftest import backend_device_pairs

CPU_BACKENDS = [b for b, d in backend_device_pairs() if d == "cpu"]


def _size(backend):
    # The C++ backend races only on tensors large enough to be split across threads; the Triton
    # interpreter is slow, and its programs run one after another anyway.
    return 1 << 20 if backend == "cpu" else 4096


def _views(buf, layout):
    n = buf.numel()
    if layout == "aliased":  # the same view through two Parameters
        return buf, buf
    if layout == "overlapping":
        return buf[: 3 * n // 4], buf[n // 4:]
    return buf[: n // 2], buf[n // 2:]  # disjoint views of one flat buffer


def _two_params(backend_size, layout, seed=1):
    buf = torch.randn(backend_size, generator=torch.Generator().manual_seed(seed))
    a, b = _views(buf, layout)
    return buf, torch.nn.Parameter(a), torch.nn.Parameter(b)


OPTIMIZERS = {
    "sgd": (wdopt.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (wdopt.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
}


# AdamW on the C++ backend (the racing one); SGD on every backend.
SHARING_CASES = [("sgd", b) for b in CPU_BACKENDS] + [("adamw", b) for b in CPU_BACKENDS if b == "cpu"]


@pytest.mark.parametrize("layout", ["aliased", "overlapping", "disjoint"])
@pytest.mark.parametrize("name,backend", SHARING_CASES)
def test_parameters_sharing_memory_match_torch(name, backend, layout):
    """§13: parameters over one storage are updated in torch's order (one after another), not
    raced by a multi-tensor kernel; disjoint views of one buffer stay in one bucket."""
    ours_cls, torch_cls, kw = OPTIMIZERS[name]
    n = _size(backend)
    buf, p1, p2 = _two_params(n, layout)
    ref_buf, q1, q2 = _two_params(n, layout)
    opt = ours_cls([p1, p2], backend=backend, **kw)
    ref = torch_cls([q1, q2], foreach=False, **kw)
    for g1, g2 in _grads_for(p1, p2, 4):
        p1.grad, p2.grad, q1.grad, q2.grad = g1, g2, g1.clone(), g2.clone()
        plan = opt._plan()
        one_at_a_time = [len(params) for _, _, params, _ in plan] == [1, 1]
        assert one_at_a_time == (layout != "disjoint"), [len(params) for _, _, params, _ in plan]
        opt.step()
        ref.step()
    torch.testing.assert_close(buf, ref_buf)
    for p, q in ((p1, q1), (p2, q2)):
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key].float(), value.float(), msg=key)


def _grads_for(p1, p2, steps):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(p1.shape, generator=g), torch.randn(p2.shape, generator=g)) for _ in range(steps)]


def test_overlap_is_checked_only_when_the_parameters_change(monkeypatch):
    from wdopt.optim import _base

    calls = []
    real = _base._any_overlap
    monkeypatch.setattr(_base, "_any_overlap", lambda tensors: calls.append(1) or real(tensors))
    buf = torch.zeros(64)
    p1, p2 = torch.nn.Parameter(buf[:32]), torch.nn.Parameter(buf[32:])
    opt = wdopt.FusedSGD([p1, p2], lr=0.1, backend="reference")
    for _ in range(3):
        p1.grad, p2.grad = torch.ones(32), torch.ones(32)
        opt.step()
    assert len(calls) == 1
    p2.data = buf[16:48]  # now overlapping p1
    p1.grad, p2.grad = torch.ones(32), torch.ones(32)
    assert [len(params) for _, _, params, _ in opt._plan()] == [1, 1]
    assert len(calls) == 2


# ---------------------------------------------------------------- §15: no half-done steps


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_meta_parameter_beside_a_cpu_one_steps_as_torch(name):
    """torch's optimizers step a model with some parameters on the meta device: the CPU ones are
    updated, meta ones get meta state. wdopt used to update the CPU one, then raise."""
    cls = {"adamw": wdopt.FusedAdamW, "sgd": wdopt.FusedSGD, "lion": wdopt.FusedLion}[name]
    kw = dict(lr=0.1, momentum=0.9) if name == "sgd" else dict(lr=0.01)
    cpu = torch.nn.Parameter(torch.randn(5))
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    opt = cls([cpu, meta], **kw)
    for step in range(2):
        cpu.grad, meta.grad = torch.full((5,), 0.5), torch.empty(4, device="meta")
        opt.step()
    state = {k: v for k, v in opt.state[meta].items() if k != "step"}
    assert state and all(v.device.type == "meta" for v in state.values())
    if name != "lion":
        torch_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        q = torch.nn.Parameter(torch.randn(5))
        q.data.copy_(cpu.data)  # compare the cpu parameter's trajectory below
        opt_torch = torch_cls([q], foreach=False, **kw)
        ours = torch.nn.Parameter(q.detach().clone())
        opt_ours = cls([ours, torch.nn.Parameter(torch.empty(4, device="meta"))], **kw)
        for _ in range(2):
            q.grad = torch.full((5,), 0.5)
            ours.grad = q.grad.clone()
            opt_torch.step()
            opt_ours.step()
        torch.testing.assert_close(ours.detach(), q.detach())


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if opt.state.get(p)}


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
    for p in params:
        now = opt.state.get(p) or {}
        assert set(now) == set(states.get(id(p), {}))
        for key, value in now.items():
            assert torch.equal(value.to_dense(), states[id(p)][key].to_dense()), key


def test_state_dict_of_sgd_loaded_into_adamw_is_refused_before_any_update():
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    opt = wdopt.FusedAdamW(params)
    opt.load_state_dict(sgd.state_dict())
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 has no 'step', 'exp_avg', 'exp_avg_sq'"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("how", ["deleted", "loaded"])
def test_group_missing_required_state_is_refused_before_the_first_group_updates(how):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = wdopt.FusedAdamW([{"params": [a]}, {"params": [b]}], backend="reference")
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    if how == "deleted":
        del opt.state[b]["exp_avg_sq"]
    else:
        sd = opt.state_dict()
        del sd["state"][1]["exp_avg_sq"]
        opt.load_state_dict(sd)
    snapshot = _snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 1 has no 'exp_avg_sq'"):
        opt.step()
    _assert_unchanged(opt, [a, b], snapshot)


# ---------------------------------------------------------------- §16: edited groups


def _rotational_setup():
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = wdopt.RotationalAdamW([w], lr=1e-2, weight_decay=0.1)
    w.grad = torch.randn(4, 6)
    opt.step()
    w.grad = torch.randn(4, 6)
    return w, opt


EDITS = [
    ("betas", (1.5, 0.999), "param group 0: Invalid beta parameter at index 0: 1.5"),
    ("betas", (0.9, torch.tensor(0.99)), "betas must be either both floats or both Tensors"),
    ("lr", -1.0, "Invalid learning rate"),
    ("eps", -1.0, "Invalid epsilon"),
    ("update_norm_decay_factor", 2.0, "Invalid update_norm_decay_factor"),
    ("mode", "sideways", "Invalid mode"),
    ("amsgrad", True, "does not support amsgrad"),
]


@pytest.mark.parametrize("key,value,message", EDITS, ids=[f"{k}-{v}" for k, v, _ in EDITS])
def test_group_edited_after_construction_is_checked_at_step(key, value, message):
    w, opt = _rotational_setup()
    opt.param_groups[0][key] = value
    snapshot = _snapshot(opt, [w])
    with pytest.raises(ValueError, match=message):
        opt.step()
    _assert_unchanged(opt, [w], snapshot)


def test_group_check_runs_only_when_a_value_changed(monkeypatch):
    p = torch.nn.Parameter(torch.randn(3))
    opt = wdopt.FusedAdamW([p], lr=torch.tensor(0.01), backend="reference")
    calls = []
    real = opt._check_group
    monkeypatch.setattr(opt, "_check_group", lambda group, constructing=True: calls.append(1) or real(group, constructing))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert len(calls) == 1
    opt.param_groups[0]["lr"].fill_(0.02)  # a tensor lr updated in place is not read (no sync)
    opt.param_groups[0]["weight_decay"] = 0.5
    p.grad = torch.ones(3)
    opt.step()
    assert len(calls) == 2


def test_schedule_decay_with_lr_scheduled_to_zero_still_steps():
    p = torch.nn.Parameter(torch.randn(3))
    opt = wdopt.FusedAdamW([p], lr=0.1, decay_scaling="schedule", backend="reference")
    opt.param_groups[0]["lr"] = 0.0  # a warm-up start
    p.grad = torch.ones(3)
    opt.step()


# ---------------------------------------------------------------- §17: torch's rules


@pytest.mark.parametrize("cls", [wdopt.FusedAdamW, wdopt.FusedLion])
@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.999)), (torch.tensor(0.9), 0.999)])
def test_betas_mixing_float_and_tensor_raise_as_torch(cls, betas):
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], betas=betas)
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        cls([torch.nn.Parameter(torch.randn(2))], betas=betas)


def _embedding_grads(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 10, (2, 6), generator=g)  # repeated rows: an uncoalesced gradient
        sparse = torch.sparse_coo_tensor(idx[:1], torch.randn(6, 3, generator=g), (10, 3))
        out.append((sparse, torch.randn(5, generator=g)))
    return out


SPARSE_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True),
    dict(lr=0.1, momentum=0.9, nesterov=True),
]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("kw", SPARSE_CONFIGS, ids=str)
def test_sgd_sparse_gradients_match_torch(backend, kw):
    """§17: FusedSGD takes sparse COO gradients (nn.Embedding(sparse=True)) beside dense ones,
    with torch.optim.SGD's numbers and state layout (a sparse momentum buffer)."""
    init = [torch.randn(10, 3), torch.randn(5)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = wdopt.FusedSGD(ours, backend=backend, **kw)
    ref = torch.optim.SGD(theirs, foreach=False, **kw)
    for sparse, dense in _embedding_grads(3):
        ours[0].grad, theirs[0].grad = sparse.clone(), sparse.clone()
        ours[1].grad, theirs[1].grad = dense.clone(), dense.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach())
        assert set(opt.state[p]) == set(ref.state[q])
        for key, value in ref.state[q].items():
            assert opt.state[p][key].layout == value.layout, key
            torch.testing.assert_close(opt.state[p][key].to_dense(), value.to_dense())


def test_sgd_sparse_gradient_with_weight_decay_raises_as_torch_before_any_update():
    emb, dense = torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(5))
    opt = wdopt.FusedSGD([{"params": [dense]}, {"params": [emb]}], lr=0.1, momentum=0.9, weight_decay=0.1)
    dense.grad = torch.ones(5)
    emb.grad = _embedding_grads(1)[0][0]
    snapshot = _snapshot(opt, [dense, emb])
    with pytest.raises(RuntimeError, match=r"weight_decay with a sparse gradient .*parameter 0 of param group 1"):
        opt.step()
    _assert_unchanged(opt, [dense, emb], snapshot)
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
        torch.optim.SGD([emb], lr=0.1, weight_decay=0.1).step()


def test_sgd_dense_gradient_after_a_sparse_momentum_buffer_is_refused_before_any_update():
    emb = torch.nn.Parameter(torch.randn(10, 3))
    opt = wdopt.FusedSGD([emb], lr=0.1, momentum=0.9)
    emb.grad = _embedding_grads(1)[0][0]
    opt.step()
    assert opt.state[emb]["momentum_buffer"].is_sparse
    emb.grad = torch.ones(10, 3)
    snapshot = _snapshot(opt, [emb])
    with pytest.raises(RuntimeError, match="sparse momentum buffer"):
        opt.step()
    _assert_unchanged(opt, [emb], snapshot)


def test_adamw_still_refuses_sparse_gradients():
    p = torch.nn.Parameter(torch.randn(10, 3))
    p.grad = _embedding_grads(1)[0][0]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        wdopt.FusedAdamW([p]).step()


def test_readme_lists_the_differences_from_torch():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    assert "## Differences from torch.optim" in text
    section = text.split("## Differences from torch.optim")[1].split("\n## ")[0]
    for topic in ("twice", "float64", "capturable", "differentiable", "foreach"):
        assert topic in section, topic


# ---------------------------------------------------------------- §18: the check cache


def test_check_cache_holds_only_current_parameters():
    keep = torch.nn.Parameter(torch.randn(3))
    opt = wdopt.FusedAdamW([keep], backend="reference")
    for _ in range(10):
        extra = [torch.nn.Parameter(torch.randn(2)) for _ in range(3)]
        opt.add_param_group({"params": extra})
        for p in [keep] + extra:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()  # state exists now: checked and cached
        opt.param_groups.pop()
        for p in extra:
            del opt.state[p]
    keep.grad = torch.ones(3)
    opt.step()
    assert set(opt._checked_state) == {id(keep)}
    assert set(opt._group_checks) == {0}
