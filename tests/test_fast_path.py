"""The step driver's fast path (wdopt/optim/_fast.py, csrc/step_plan.cpp): a validated step is
re-used while nothing it depends on changed, and every kind of change sends the step back to the
validation path, which raises or gives the result a fresh optimizer would give.

Each "change" test runs the same edit on an optimizer that may use the fast path and on one that
never does (``slow``), and compares parameters and state bit for bit after the next steps."""

import copy

import pytest
import torch

import wdopt
from wdopt import telemetry
from wdopt.optim import _fast

pytestmark = pytest.mark.skipif("cpu" not in wdopt.available_backends("cpu"), reason="the C++ CPU backend is not built")

SHAPES = [(5, 3), (7,), (2, 3, 4), (1,)]
OPTIONS = {
    "adamw": (wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad-maximize": (wdopt.FusedAdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "sgd": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    "sgd-nesterov-decoupled": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1,
                                                    decoupled_weight_decay=True)),
    "sgd-plain": (wdopt.FusedSGD, dict(lr=1e-2)),
    "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=0.1)),
}
CLASSES = {name: (lambda cls, options: lambda ps, **kw: cls(ps, **{"backend": "cpu", **options, **kw}))(*entry)
           for name, entry in OPTIONS.items()}


def params(dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def set_grads(ps, step, seed=1):
    """New gradient tensors, as the default loop (zero_grad(set_to_none=True)) makes them."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


class Counted:
    """Counts the validation path's runs of one optimizer."""

    def __init__(self, opt):
        self.n = 0
        plan = opt._plan

        def counted():
            self.n += 1
            return plan()

        opt._plan = counted


def never_fast(opt):
    """Make ``opt`` take the validation path at every step."""
    opt._fast_kind = None
    return opt


def pair(kind="adamw", dtype=torch.float32, device="cpu", **kw):
    """Two optimizers on equal parameters, the second never on the fast path (tensor options
    are copied: each optimizer gets its own)."""
    a, b = params(dtype, device=device), params(dtype, device=device)
    copied = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return a, CLASSES[kind](a, **kw), b, never_fast(CLASSES[kind](b, **copied))


def assert_same(opt_a, ps_a, opt_b, ps_b):
    for p, q in zip(ps_a, ps_b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def scaled_steps(*runs, n_steps=5, skipped=2):
    """``n_steps`` steps of each (optimizer, params) run in turn with GradScaler's tensors as it
    sets them: scale 2, and an inf found at step ``skipped`` (which writes nothing)."""
    for step in range(n_steps):
        for opt, ps in runs:
            set_grads(ps, step)
            opt.grad_scale = torch.tensor(2.0)
            opt.found_inf = torch.tensor(float(step == skipped))
            opt.step()
            del opt.grad_scale, opt.found_inf


def steps(opt, ps, first, last, **kw):
    for step in range(first, last):
        set_grads(ps, step, **kw)
        opt.step()


def check_fast_equals_validated(kind, dtype=torch.float32, n_steps=6, **kw):
    """Several steps on the fast path give bit for bit what the validation path gives, and the
    validation path runs only for the first step (state is made there, the plan kept after it)."""
    a, opt_a, b, opt_b = pair(kind, dtype, **kw)
    counted = Counted(opt_a)
    steps(opt_a, a, 0, n_steps)
    steps(opt_b, b, 0, n_steps)
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)
    return opt_a


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_steps_equal_validated_steps(kind, dtype):
    check_fast_equals_validated(kind, dtype)


def test_fast_steps_match_torch():
    """And the fast path is still torch.optim.AdamW's trajectory (to fp32 rounding; the bitwise
    comparisons with the reference are in test_parity.py, which these steps do not repeat)."""
    a = params()
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = wdopt.FusedAdamW(a, lr=1e-2, weight_decay=0.1, backend="cpu")
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
    assert opt_a.__dict__.get("_fast") is not None
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a.state[p][key], opt_b.state[q][key])


def test_many_groups_and_dtypes_and_grad_scaler_found_inf():
    a32, a16 = params(), params(torch.bfloat16, seed=3)
    b32, b16 = params(), params(torch.bfloat16, seed=3)
    groups = lambda x, y: [{"params": x}, {"params": y[:2], "lr": 3e-3}, {"params": y[2:] + [], "weight_decay": 0.0}]
    opt_a = wdopt.FusedAdamW(groups(a32, a16), lr=1e-2, backend="cpu")
    opt_b = never_fast(wdopt.FusedAdamW(groups(b32, b16), lr=1e-2, backend="cpu"))
    for step in range(5):
        for opt, ps in ((opt_a, a32 + a16), (opt_b, b32 + b16)):
            set_grads(ps, step)
            opt.grad_scale = torch.tensor(4.0)
            opt.found_inf = torch.tensor(float(step == 3))  # GradScaler skips step 3
            opt.step()
            del opt.grad_scale, opt.found_inf
    assert opt_a.__dict__.get("_fast") is not None
    assert_same(opt_a, a32 + a16, opt_b, b32 + b16)


def test_capturable_tensor_lr_read_on_device_and_changed_in_place():
    a, opt_a, b, opt_b = pair("adamw", lr=torch.tensor(1e-2), capturable=True)
    for step in range(4):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            opt.step()
            opt.param_groups[0]["lr"].mul_(0.5)  # what a capturable scheduler does
    assert opt_a.__dict__.get("_fast") is not None
    assert_same(opt_a, a, opt_b, b)


# ---------------------------------------------------------------------------- changes are caught

def edit_lr(opt, ps):
    opt.param_groups[0]["lr"] = 3e-2  # a scheduler: stays on the fast path, with the new lr


def edit_hyper(opt, ps):
    group = opt.param_groups[0]
    group["weight_decay"] = 0.5
    if "betas" in group:
        group["betas"] = (0.5, 0.9)


def edit_state_tensor(opt, ps):
    key = next(k for k in ("exp_avg", "momentum_buffer") if k in opt.state[ps[0]])
    opt.state[ps[0]][key] = torch.full_like(ps[0], 0.25)


def edit_state_in_place(opt, ps):
    key = next(k for k in ("exp_avg", "momentum_buffer") if k in opt.state[ps[1]])
    opt.state[ps[1]][key].mul_(3.0)


def replace_state_dict(opt, ps):
    opt.state[ps[2]] = {k: (v.clone() * 2 if k != "step" else v.clone()) for k, v in opt.state[ps[2]].items()}


def reordered_state(opt, ps):
    opt.state[ps[0]] = opt.state.pop(ps[0])  # the same dicts, in another order


def params_as_tuple(opt, ps):
    opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])


def drop_grad(opt, ps):
    ps[1].grad = None


def strided_grad(opt, ps):
    ps[0].grad = ps[0].grad.t().contiguous().t()  # a (5, 3) gradient with transposed strides


def negated_grad(opt, ps):
    ps[0].grad = (-ps[0].grad)._neg_view()  # a lazily negated view: the same values, a flag to resolve


def moved_data(opt, ps):
    ps[3].data = ps[3].data.clone()  # new memory, same values


def replaced_param(opt, ps):
    group = opt.param_groups[0]
    q = ps[3].detach().clone().requires_grad_()
    q.grad = ps[3].grad
    group["params"][3] = q
    ps[3] = q


def loaded_state(opt, ps):
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        for k, v in s.items():
            if k != "step" and isinstance(v, torch.Tensor):
                v.mul_(0.5)
    opt.load_state_dict(sd)


def added_group(opt, ps):
    q = torch.ones(3, requires_grad=True)
    opt.add_param_group({"params": [q]})
    ps.append(q)


EDITS = [edit_lr, edit_hyper, edit_state_tensor, edit_state_in_place, replace_state_dict,
         reordered_state, params_as_tuple, drop_grad,
         strided_grad, negated_grad, moved_data, replaced_param, loaded_state, added_group]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_every_change_is_seen(kind, edit):
    """After 3 steps (fast from step 2), the same edit on both optimizers; then 3 more steps with
    the same gradients (set before the edit where the edit changes a gradient)."""
    a, opt_a, b, opt_b = pair(kind)
    steps(opt_a, a, 0, 3)
    steps(opt_b, b, 0, 3)
    assert opt_a.__dict__.get("_fast") is not None
    for step in range(3, 6):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            if step == 3:
                edit(opt, ps)
            for p in ps:
                if p.grad is None and p.dim() == 1 and p.numel() == 3:
                    p.grad = torch.full_like(p, 0.1)  # the added group's parameter
            opt.step()
    assert_same(opt_a, a, opt_b, b)


MANY_EDITS = {
    "none": None,
    # late in the second thread's range of ready(): each must send the step to the validation path
    "state moved": lambda opt, ps: setattr(opt.state[ps[-3]][next(iter(opt.state[ps[-3]]))], "data",
                                           opt.state[ps[-3]][next(iter(opt.state[ps[-3]]))].data.clone()),
    "grad dropped": lambda opt, ps: setattr(ps[-2], "grad", None),
    "param moved": lambda opt, ps: setattr(ps[-1], "data", ps[-1].data.clone()),
}


@pytest.mark.parametrize("kind, edit", [(kind, "none") for kind in ("adamw", "sgd", "lion")] +
                         [("adamw", edit) for edit in MANY_EDITS if edit != "none"])
def test_many_tensors_split_between_threads(kind, edit):
    """Many small tensors (odd sizes, 1-13 elements): ready() splits them between threads
    (from 1,024 on, csrc/step_plan.cpp) and so does the CPU walk (counting per-tensor work,
    csrc/cpu/fused_cpu.cpp). Bit for bit the validation path's result, on 2 threads, and a change
    in the second half of the tensors is still seen."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        sizes = [1 + (i * 5) % 13 for i in range(1500)]  # work 10,500 + 16 per tensor > 2^15: parallel
        a = [torch.randn(n, generator=g).requires_grad_() for n in sizes]
        b = [t.detach().clone().requires_grad_() for t in a]
        opt_a, opt_b = CLASSES[kind](a), never_fast(CLASSES[kind](b))
        counted = Counted(opt_a)
        for step in range(4):
            for opt, ps in ((opt_a, a), (opt_b, b)):
                set_grads(ps, step)
                if step == 2 and MANY_EDITS[edit] is not None:
                    MANY_EDITS[edit](opt, ps)
                opt.step()
        # validated at the first step and after the edit (and, for a dropped gradient, once more
        # when it is back)
        assert counted.n == {"none": 1, "grad dropped": 3}.get(edit, 2)
        assert_same(opt_a, a, opt_b, b)
    finally:
        torch.set_num_threads(threads)


def test_object_checks_compare_identity_only():
    """csrc/fast_checks.cpp: a pointer compare per object, never ==; bad arguments raise; a key
    whose __eq__ raises (a user's non-str key with the hash of a state key) raises through ctypes."""
    from wdopt.kernels import cpp

    cpp.load()
    checks = cpp.object_checks()
    t, u = torch.zeros(1), torch.zeros(1)  # equal values, different tensors
    assert checks.same_objects([t, u], [t, u]) == 1 and checks.same_objects((t, u), [t, u]) == 1
    assert checks.same_objects([t, t], [t, u]) == 0 and checks.same_objects([t], [t, u]) == 0
    assert checks.same_objects(iter([t]), [t]) == 0  # not a list or tuple: the validation path's
    d = {t: "a", u: "b"}
    assert checks.same_items(d, [t, u], ["a", "b"]) == 1
    assert checks.same_items(d, [u, t], ["b", "a"]) == 0  # order counts
    assert checks.same_items(d, [t], ["a"]) == 0 and checks.same_items([], [], []) == 0
    dicts = [{"x": t, "y": u}, {"x": u, "y": t}]
    assert checks.same_columns(dicts, ("x", "y"), [t, u, u, t]) == 1
    assert checks.same_columns(dicts, ("x", "y"), [t, u, u, u]) == 0
    assert checks.same_columns([{**dicts[0], "other": 1}, dicts[1]], ("x", "y"), [t, u, u, t]) == 0  # an added key
    assert checks.same_columns(dicts, ("x", "z"), [t, u, u, t]) == 0  # a missing key
    assert checks.same_columns([dicts[0], 5], ("x",), [t, u]) == 0  # not a dict
    with pytest.raises(TypeError, match="same_columns"):
        checks.same_columns(dicts, ("x",), [t])
    with pytest.raises(TypeError, match="same_items"):
        checks.same_items(d, (t,), ["a"])

    class Clash:  # hashes like "x", and cannot be compared
        def __hash__(self):
            return hash("x")

        def __eq__(self, other):
            raise RuntimeError("compared")

    with pytest.raises(RuntimeError, match="compared"):
        checks.same_columns([{Clash(): 1}], ("x",), [t])


@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_gaining_a_grad_is_seen(kind):
    a, opt_a, b, opt_b = pair(kind)
    for step in range(5):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            if step < 3:
                ps[2].grad = None  # no gradient for the first three steps, then one
            opt.step()
    assert_same(opt_a, a, opt_b, b)


ERRORS = {
    # torch refuses to assign such gradients; a gradient changed through .data is what remains
    "grad dtype": (lambda opt, ps: setattr(ps[0].grad, "data", ps[0].grad.double()), RuntimeError, "dtype"),
    "grad shape": (lambda opt, ps: setattr(ps[1].grad, "data", torch.zeros(8)), RuntimeError, "shape"),
    "negative lr": (lambda opt, ps: opt.param_groups[1].__setitem__("lr", -1.0), ValueError, "learning rate"),
    "nan lr": (lambda opt, ps: opt.param_groups[1].__setitem__("lr", float("nan")), ValueError, "learning rate"),
    "bad beta": (lambda opt, ps: opt.param_groups[1].__setitem__("betas", (1.5, 0.9)), ValueError, "beta"),
    "state key deleted": (lambda opt, ps: opt.state[ps[0]].pop("exp_avg_sq"), RuntimeError, "exp_avg_sq"),
    "state resized": (lambda opt, ps: opt.state[ps[0]]["exp_avg"].resize_(2), RuntimeError, "exp_avg"),
    "model moved": (lambda opt, ps: setattr(ps[0], "data", ps[0].data.double()), RuntimeError, "dtype"),
}


def assert_refused_unchanged(opt, other, ps, edit, error, words):
    """``edit`` made before the next step: the step raises ``error`` matching ``words``, and the
    first group (``other``, stepped first) and the parameters are as they were."""
    set_grads(ps + other, 3)
    edit(opt, ps)
    before = [t.detach().clone() for t in other + ps]
    state_before = {k: v.clone() for k, v in opt.state[other[0]].items()}
    with pytest.raises(error, match=words):
        opt.step()
    for t, t0 in zip(other + ps, before):
        if t.dtype == t0.dtype:
            torch.testing.assert_close(t.detach(), t0, rtol=0, atol=0)
    for k, v in state_before.items():
        torch.testing.assert_close(opt.state[other[0]][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("case", ERRORS)
def test_bad_changes_raise_and_change_nothing(case):
    """The edit is refused at the next step with the validation path's error, before any tensor
    is written: a second group, stepped first, is untouched too."""
    edit, error, words = ERRORS[case]
    ps = params()
    other = [torch.randn(4, requires_grad=True)]
    opt = wdopt.FusedAdamW([{"params": other}, {"params": ps}], lr=1e-2, backend="cpu")
    for step in range(3):
        set_grads(ps + other, step)
        opt.step()
    assert opt.__dict__.get("_fast") is not None
    assert_refused_unchanged(opt, other, ps, edit, error, words)



LOW_ERRORS = {
    # Edits of low-precision state the validation path's cache of checked states once missed: the
    # step then failed in the second group's kernel, after the first group was written.
    "scales resized": (lambda opt, ps: opt.state[ps[1]]["exp_avg_block_scale"].resize_(0), "exp_avg_block_scale"),
    "codes re-laid out": (lambda opt, ps: setattr(opt.state[ps[0]]["exp_avg"], "data",
                                                  opt.state[ps[0]]["exp_avg"].data.t().contiguous().t()), "exp_avg"),
    "codes replaced": (lambda opt, ps: opt.state[ps[1]].__setitem__("exp_avg_sq", opt.state[ps[1]]["exp_avg_sq"].to(
        torch.int8)), "exp_avg_sq"),
    "rng replaced": (lambda opt, ps: opt.state[ps[1]].__setitem__("rng", opt.state[ps[1]]["rng"].to(torch.int32)),
                     "rng"),
    "correction moved": (lambda opt, ps: setattr(opt.state[ps[0]]["correction"], "data",
                                                 opt.state[ps[0]]["correction"].data.t().contiguous().t()),
                         "correction"),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", [*ERRORS, *LOW_ERRORS])
def test_bad_changes_after_validated_steps_raise_and_change_nothing(case, backend):
    """As above, after steps that took the validation path once the state existed (a parameter
    without a gradient), which caches its checks of each parameter's state: an edited, replaced or
    moved state tensor is checked again and refused before the first group is written."""
    low = case in LOW_ERRORS
    edit, error, words = (*LOW_ERRORS[case][:1], RuntimeError, LOW_ERRORS[case][1]) if low else ERRORS[case]
    options = {"master_weight_bits": 24, "stochastic_rounding": True, "state_bits": 8} if low else {}
    dtype = torch.bfloat16 if low else torch.float32
    ps = params(dtype)
    other = [torch.randn(300, dtype=dtype, requires_grad=True)]
    opt = wdopt.FusedAdamW([{"params": other}, {"params": ps}], lr=1e-2, backend=backend, **options)
    for step in range(3):
        set_grads(ps + other, step)
        if step == 1:
            ps[2].grad = None  # the validation path, with every other parameter's state made
        opt.step()
    assert_refused_unchanged(opt, other, ps, edit, error, words)


def test_other_backends_and_classes_keep_the_validation_path():
    """Only the C++ backends' element-wise classes have a fast path; the others are unchanged."""
    ps = params()
    for opt in (wdopt.FusedAdamW(ps, backend="reference"), wdopt.RotationalAdamW(ps, backend="cpu")):
        for step in range(3):
            set_grads(ps, step)
            opt.step()
        assert opt.__dict__.get("_fast") is None


def test_copies_and_pickles_leave_the_plan_behind():
    a, opt_a, _, _ = pair("adamw")
    steps(opt_a, a, 0, 3)
    assert opt_a.__dict__.get("_fast") is not None
    twin = copy.deepcopy(opt_a)
    assert "_fast" not in twin.__dict__
    assert isinstance(opt_a._fast, _fast.FastStep)


def test_monitor_counts_fast_steps_and_records_its_steps():
    """Every step takes the fast path and is counted, the recorded ones too (their kernels gather
    the telemetry in the update pass): the same records as the validation path's."""
    a, opt_a, b, opt_b = pair("adamw")
    monitors = [wdopt.RotationMonitor(opt_a, every=3), wdopt.RotationMonitor(opt_b, every=3)]
    counted = Counted(opt_a)
    steps(opt_a, a, 0, 9)
    steps(opt_b, b, 0, 9)
    assert [r.step for r in monitors[0].history] == [r.step for r in monitors[1].history] == [3, 6, 9]
    assert counted.n == 1  # step 1 (state made)
    assert_same(opt_a, a, opt_b, b)
    for ra, rb in zip(monitors[0].history, monitors[1].history):
        for p, q in zip(a, b):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0)


def test_monitored_fast_step_makes_no_view_per_tensor(monkeypatch):
    """A recorded fast step hands the kernels one flat buffer (offsets known to the plan) and makes
    no per-tensor views: a record makes them when it is read, equal to the validation path's, over
    several groups and dtypes."""
    a32, a64 = params(), params(torch.float64, seed=3)
    b32, b64 = params(), params(torch.float64, seed=3)
    opt_a = wdopt.FusedAdamW([{"params": a32}, {"params": a64, "lr": 3e-3}], lr=1e-2, weight_decay=0.1)
    opt_b = never_fast(wdopt.FusedAdamW([{"params": b32}, {"params": b64, "lr": 3e-3}], lr=1e-2, weight_decay=0.1))
    monitors = [wdopt.RotationMonitor(opt_a, every=2), wdopt.RotationMonitor(opt_b, every=2)]
    for step in range(4):
        for opt, ps in ((opt_a, a32 + a64), (opt_b, b32 + b64)):
            set_grads(ps, step)
            if opt is opt_a and step == 3:
                with monkeypatch.context() as m:
                    m.setattr(torch.Tensor, "split", lambda *args, **kwargs: pytest.fail("a view per tensor"))
                    opt.step()
            else:
                opt.step()
    assert isinstance(monitors[0].last._request, telemetry.FlatRequest)
    assert_same(opt_a, a32 + a64, opt_b, b32 + b64)
    for ra, rb in zip(monitors[0].history, monitors[1].history):
        assert ra.as_dict() == rb.as_dict()
        for p, q in zip(a32 + a64, b32 + b64):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0)


# ---------------------------------------------------------------------------- the Triton backend

needs_triton = pytest.mark.skipif("triton" not in wdopt.available_backends("cpu"), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_triton_fast_steps_equal_validated_steps(kind):
    """The Triton backend's fast path (an owned table whose gradient column follows the new
    gradients of every step) gives bit for bit the validation path's steps."""
    opt_a = check_fast_equals_validated(kind, n_steps=4, backend="triton")
    assert opt_a._fast.groups[0].runs[0][1].launch.table is not None  # the bucket's own table was used


@needs_triton
def test_a_check_stopped_halfway_drops_the_fast_step():
    """An exception (Ctrl-C) after GroupPlan.ready took the new gradient addresses but before the
    Triton table did must not leave a fast step whose plan and table disagree: the next step with
    the same gradients would launch on the previous step's gradient memory. The step is dropped
    and rebuilt; results equal the validation path's, the old gradients poisoned."""
    a, opt_a, b, opt_b = pair("adamw", backend="triton")
    kept = []
    for step in range(3):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            kept.append([p.grad for p in ps])  # alive: the next gradients get other addresses
            opt.step()
    group = opt_a._fast.groups[0]
    ready = group.ready

    def ready_then_interrupted():
        ready()
        raise KeyboardInterrupt

    for ps in (a, b):
        set_grads(ps, 3)
    group.ready = ready_then_interrupted
    with pytest.raises(KeyboardInterrupt):
        opt_a.step()
    assert "_fast" not in opt_a.__dict__
    for g in kept[-2]:
        g.fill_(1e6)  # the previous step's gradients of opt_a
    opt_a.step()
    opt_b.step()
    assert_same(opt_a, a, opt_b, b)


def test_copy_on_write_tensors_in_a_parallel_ready():
    """A lazily cloned (copy-on-write) parameter in a bucket large enough for a parallel ready():
    torch forbids materializing it inside a parallel region; the step takes the validation path
    (which materializes it) instead of raising, and then the fast path again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(2)
        a = [torch.randn(3, generator=g).requires_grad_() for _ in range(1100)]
        b = [t.detach().clone().requires_grad_() for t in a]
        opt_a, opt_b = CLASSES["adamw"](a), never_fast(CLASSES["adamw"](b))
        counted = Counted(opt_a)
        for step in range(4):
            if step == 2:
                for ps in (a, b):
                    ps[-1].data = torch._lazy_clone(ps[-1].data)
            for opt, ps in ((opt_a, a), (opt_b, b)):
                set_grads(ps, step)
                opt.step()
        assert counted.n == 2
        assert_same(opt_a, a, opt_b, b)
    finally:
        torch.set_num_threads(threads)


@needs_triton
def test_triton_fast_path_refuses_a_misaligned_gradient():
    """A gradient at an odd offset breaks the alignment the kernel was specialised for: that step
    goes through the validation path (a table made for it), with the same result."""
    a, opt_a, b, opt_b = pair("adamw", backend="triton")
    steps(opt_a, a, 0, 3)
    steps(opt_b, b, 0, 3)
    counted = Counted(opt_a)
    for opt, ps in ((opt_a, a), (opt_b, b)):
        set_grads(ps, 3)
        buffer = torch.empty(ps[1].numel() + 1)
        buffer[1:] = ps[1].grad
        ps[1].grad = buffer[1:]  # 4 bytes past a 16-byte boundary
        opt.step()
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)


GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in wdopt.available_backends("cuda")]


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_fast_path_on_cuda(kind, backend):
    """On the GPU (benchmarks/gpu_check.sh runs the tests whose ids say cuda): fast steps equal
    validated ones, and a moved gradient (new tensors every step) is followed."""
    check_fast_equals_validated(kind, n_steps=5, device="cuda", backend=backend)


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_monitored_fast_path_on_cuda(backend):
    """On the GPU: monitored fast steps (the CUDA operator with views of the flat telemetry buffer
    made in C++; Triton steps the validation path) record what the validation path records."""
    a, opt_a, b, opt_b = pair("adamw", device="cuda", backend=backend)
    monitors = [wdopt.RotationMonitor(opt_a, every=2), wdopt.RotationMonitor(opt_b, every=2)]
    steps(opt_a, a, 0, 6)
    steps(opt_b, b, 0, 6)
    assert_same(opt_a, a, opt_b, b)
    assert [r.step for r in monitors[0].history] == [r.step for r in monitors[1].history] == [2, 4, 6]
    for ra, rb in zip(monitors[0].history, monitors[1].history):
        for p, q in zip(a, b):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0)


def test_a_dispatch_mode_sees_every_step():
    """A TorchDispatchMode (a FLOP counter, a tracer) sees the operator of every step: the fast
    path, which calls the CPU kernels from C++, steps aside while one is active."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    a, opt_a, _, _ = pair("adamw")
    steps(opt_a, a, 0, 3)
    assert opt_a.__dict__.get("_fast") is not None
    set_grads(a, 3)
    with Seen() as mode:
        opt_a.step()
    assert any("wdopt.adamw_" in op for op in mode.ops), mode.ops


def test_a_step_that_needs_the_validation_path_does_not_turn_the_fast_path_off():
    """One step with a gradient the kernels cannot take as it is (a transposed layout) runs on
    the validation path, the next one too (it makes a new plan), and the steps after it are fast."""
    a, opt_a, b, opt_b = pair("adamw")
    counted = Counted(opt_a)
    for step in range(6):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            if step == 2:
                strided_grad(opt, ps)
            opt.step()
    assert counted.n == 3  # step 1, the strided one, the one after it
    assert opt_a.__dict__.get("_fast") is not None
    assert_same(opt_a, a, opt_b, b)


@pytest.mark.parametrize("kind", ["adamw-amsgrad-maximize", "sgd", "sgd-plain", "lion"])
def test_operator_mode_on_cpu(monkeypatch, kind):
    """The CUDA backend's fast path calls the operator through the dispatcher with a typed
    signature (csrc/step_plan.cpp, Mode::kOperator). A signature that does not match the schema
    fails only at that call, so it is run here on CPU tensors, through the CPU implementation."""
    monkeypatch.setattr(_fast, "_mode", lambda cpp, device: 0 if cpp else 2)
    a, opt_a, b, opt_b = pair(kind)
    monitors = [wdopt.RotationMonitor(opt_a, every=2), wdopt.RotationMonitor(opt_b, every=2)]
    counted = Counted(opt_a)
    scaled_steps((opt_a, a), (opt_b, b))
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)
    assert len(monitors[0].history) == 2
    for ra, rb in zip(monitors[0].history, monitors[1].history):  # telemetry through the operator
        for p, q in zip(a, b):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0, equal_nan=True)


def test_operator_mode_with_a_device_lr(monkeypatch):
    """The same with a capturable tensor lr (the operator's lr_tensor argument)."""
    monkeypatch.setattr(_fast, "_mode", lambda cpp, device: 0 if cpp else 2)
    a, opt_a, b, opt_b = pair("adamw", lr=torch.tensor(1e-2), capturable=True)
    for step in range(4):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            opt.step()
            opt.param_groups[0]["lr"].mul_(0.5)
    assert opt_a.__dict__.get("_fast") is not None
    assert_same(opt_a, a, opt_b, b)


@needs_triton
def test_triton_owned_table_uploads_nothing_while_gradients_stay(monkeypatch):
    """Static gradients (zero_grad(set_to_none=False)): once a bucket's fast path owns its table,
    no step writes into it — a step captured in a CUDA graph must not (on a GPU the copy is
    refused during capture) — and new gradient tensors are written, once per step."""
    from wdopt.kernels import tables

    writes = []
    write = tables.DeviceTable._write
    monkeypatch.setattr(tables.DeviceTable, "_write", lambda self, *a: writes.append(1) or write(self, *a))
    a = params()
    for p in a:
        p.grad = torch.zeros_like(p)
    opt = CLASSES["adamw"](a, backend="triton")
    counts = []
    for step in range(4):
        for p in a:
            p.grad.copy_(torch.full_like(p, 0.01 * (step + 1)))
        before = len(writes)
        opt.step()
        counts.append(len(writes) - before)
    assert opt._fast is not None
    assert counts == [0, 0, 0, 0], counts
    kept = [p.grad for p in a]  # the old gradients stay alive: new ones get new addresses
    for p in a:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert len(writes) == 1 and kept


@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_a_training_loop_with_a_scheduler(kind):
    """The loop users write: backward makes the gradients, zero_grad(set_to_none=True) drops them,
    a torch LR scheduler changes lr every step. Every step after the first is fast and equals the
    validation path's."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [CLASSES[kind](list(models[0].parameters())), never_fast(CLASSES[kind](list(models[1].parameters())))]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)) for opt in opts]
    counted = Counted(opts[0])
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for _ in range(5):
        for model, opt, scheduler in zip(models, opts, schedulers):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler.step()
    assert counted.n == 1
    assert_same(opts[0], list(models[0].parameters()), opts[1], list(models[1].parameters()))


@needs_triton
def test_a_monitored_triton_step_takes_the_validation_path():
    """The Triton kernels gather telemetry per row with a table of their own: a recorded step goes
    through the validation path, the steps between records stay fast, the records agree."""
    a, opt_a, b, opt_b = pair("adamw", backend="triton")
    monitors = [wdopt.RotationMonitor(opt_a, every=2), wdopt.RotationMonitor(opt_b, every=2)]
    counted = Counted(opt_a)
    steps(opt_a, a, 0, 4)
    steps(opt_b, b, 0, 4)
    assert counted.n == 3  # step 1 and the recorded steps 2 and 4
    assert_same(opt_a, a, opt_b, b)
    for ra, rb in zip(monitors[0].history, monitors[1].history):
        for p, q in zip(a, b):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0)


# ---------------------------------------------------------------------------- found by review

def rekeyed_state(opt, ps):
    """Each parameter's state dict handed to another parameter, the dicts in the same order."""
    d0, d1 = opt.state[ps[0]], opt.state[ps[1]]
    rest = [(p, opt.state[p]) for p in ps[2:]]
    opt.state.clear()
    opt.state[ps[1]] = d0
    opt.state[ps[0]] = d1
    for p, d in rest:
        opt.state[p] = d


def test_state_handed_to_other_parameters_is_seen():
    ps_a = [torch.ones(5, 3, requires_grad=True), torch.ones(5, 3, requires_grad=True)]
    ps_b = [p.detach().clone().requires_grad_() for p in ps_a]
    opt_a, opt_b = CLASSES["adamw"](ps_a), never_fast(CLASSES["adamw"](ps_b))
    for step in range(4):
        for opt, ps in ((opt_a, ps_a), (opt_b, ps_b)):
            set_grads(ps, step)
            if step == 2:
                rekeyed_state(opt, ps)
            opt.step()
    assert_same(opt_a, ps_a, opt_b, ps_b)


@pytest.mark.parametrize("kind,key,value", [("adamw", "weight_decay", 5.0), ("sgd", "momentum", 0.1),
                                            ("lion", "weight_decay", 0.5), ("adamw", "eps", 1e-3)])
def test_a_tensor_hyperparameter_filled_in_place_is_seen(kind, key, value):
    """A hyperparameter given as a tensor (other than lr) is read at every step, as on the
    validation path: such a group keeps the validation path."""
    a, opt_a, b, opt_b = pair(kind)
    for opt in (opt_a, opt_b):
        opt.param_groups[0][key] = torch.tensor(float(opt.param_groups[0][key]))
    for step in range(4):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            if step == 2:
                opt.param_groups[0][key].fill_(value)
            opt.step()
    assert_same(opt_a, a, opt_b, b)


def test_a_parameter_listed_in_two_groups_keeps_the_validation_path():
    """Possible by editing group["params"]: with GradScaler skipping SGD's first step, the
    validation path clears the first-step flag between the two updates of that parameter."""
    results = []
    for fast in (True, False):
        ps = params()
        opt = CLASSES["sgd"]([{"params": ps[:2]}, {"params": ps[2:]}])
        if not fast:
            never_fast(opt)
        opt.param_groups[1]["params"].append(ps[0])
        for step in range(3):
            set_grads(ps, step)
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(float(step == 0))
            opt.step()
            del opt.grad_scale, opt.found_inf
        results.append([p.detach().clone() for p in ps])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_negative_zero_hyperparameter_is_an_edit():
    """weight_decay 0.0 → -0.0 (valid, and it can change the sign of a zero): a new plan."""
    a, opt_a, b, opt_b = pair("sgd-plain")
    steps(opt_a, a, 0, 2)
    steps(opt_b, b, 0, 2)
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["weight_decay"] = -0.0
    counted = Counted(opt_a)
    steps(opt_a, a, 2, 3)
    steps(opt_b, b, 2, 3)
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)


def test_a_failed_fast_step_drops_grad_scalers_tensors():
    """GradScaler removes grad_scale/found_inf only after a successful step: a step that raises
    on the fast branch drops them, as the validation path does."""
    a, opt_a, _, _ = pair("adamw")
    steps(opt_a, a, 0, 3)
    set_grads(a, 3)
    opt_a.grad_scale, opt_a.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    opt_a.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError):
        opt_a.step()
    assert not hasattr(opt_a, "grad_scale") and not hasattr(opt_a, "found_inf")


# ---------------------------------------------------------------------------- low-precision storage

LOW = {  # name: (parameter dtype, options)
    "sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "master24-sr": (torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True)),
    "master32": (torch.bfloat16, dict(master_weight_bits=32)),
    "states8": (torch.bfloat16, dict(state_bits=8)),
    "master24-sr-states8": (torch.bfloat16, dict(master_weight_bits=24, stochastic_rounding=True, state_bits=8)),
    "fp32-sr-states8": (torch.float32, dict(stochastic_rounding=True, state_bits=8)),
}


def rng_counts(opt):
    return [opt.state[p]["rng"][1].item() for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("kind", ["adamw", "adamw-amsgrad-maximize", "sgd", "lion"])
def test_low_precision_steps_take_the_fast_path(kind, low):
    """Stochastic rounding, compensated bf16 parameters and 8-bit states: after the first step
    every step is a fast one (the plan holds the streams, corrections and block scales as it holds
    the states, and advances the streams' counts), bit for bit the validation path's: parameters
    and every state tensor, counts included."""
    dtype, options = LOW[low]
    opt = check_fast_equals_validated(kind, dtype, **options)
    if options.get("stochastic_rounding"):
        assert rng_counts(opt) == [6] * len(SHAPES)


@pytest.mark.parametrize("operator", [False, True], ids=["cpu-table", "operator"])
@pytest.mark.parametrize("low", ["sr", "master24-sr-states8"])
def test_low_precision_fast_steps_with_grad_scaler(monkeypatch, low, operator):
    """GradScaler's scale and a skipped step (found_inf) on the fast path, on the CPU table and
    through the operator (the CUDA backend's call, csrc/step_plan.cpp Mode::kOperator, run here
    on CPU tensors): the skipped step writes nothing and leaves the counts, as the validation
    path does."""
    if operator:
        monkeypatch.setattr(_fast, "_mode", lambda cpp, device: 0 if cpp else 2)
    dtype, options = LOW[low]
    a, opt_a, b, opt_b = pair("adamw", dtype, **options)
    counted = Counted(opt_a)
    scaled_steps((opt_a, a), (opt_b, b))
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)
    assert rng_counts(opt_a) == [4] * len(SHAPES)


def edit_seed(opt, ps):
    opt.param_groups[0]["rounding_seed"] = 123  # new streams from the next step


def edit_bits(opt, ps):
    opt.param_groups[0]["master_weight_bits"] = 32  # the correction widened
    opt.param_groups[0]["state_bits"] = None  # the states decoded


def edit_rng(opt, ps):
    rng = opt.state[ps[1]]["rng"].clone()
    rng[1] += 5
    opt.state[ps[1]]["rng"] = rng


def edit_rng_in_place(opt, ps):
    opt.state[ps[2]]["rng"][1] += 7  # read by the kernels: no fallback needed


def moved_scales(opt, ps):
    scales = opt.state[ps[0]]["exp_avg_block_scale"]
    scales.data = scales.data.clone()


def edit_correction(opt, ps):
    opt.state[ps[0]]["correction"] = opt.state[ps[0]]["correction"].clone().fill_(3)


def loaded_low_state(opt, ps):
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        s["exp_avg_block_scale"].mul_(0.5)
        s["rng"][1] += 3
    opt.load_state_dict(sd)


LOW_EDITS = [edit_seed, edit_bits, edit_rng, edit_rng_in_place, moved_scales, edit_correction, loaded_low_state]


@pytest.mark.parametrize("edit", LOW_EDITS, ids=lambda f: f.__name__)
def test_every_low_precision_change_is_seen(edit):
    """The edits a low-precision step depends on, after 3 steps (fast from step 2): each gives
    what the validation path gives (which makes new streams for a new seed, converts corrections
    and states for new widths, and reads replaced tensors)."""
    dtype, options = LOW["master24-sr-states8"]
    a, opt_a, b, opt_b = pair("adamw", dtype, **options)
    counted = Counted(opt_a)
    steps(opt_a, a, 0, 3)
    steps(opt_b, b, 0, 3)
    assert counted.n == 1
    for step in range(3, 6):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            set_grads(ps, step)
            if step == 3:
                edit(opt, ps)
            opt.step()
    assert_same(opt_a, a, opt_b, b)
    assert counted.n == (1 if edit is edit_rng_in_place else 2)


@needs_triton
@pytest.mark.parametrize("low", ["sr", "master24-sr-states8", "fp32-sr-states8"])
def test_triton_low_precision_fast_steps(low):
    """The same on the Triton backend: its prepared table holds the streams', corrections' and
    scales' addresses, the driver advances the counts after each launch."""
    dtype, options = LOW[low]
    opt = check_fast_equals_validated("adamw", dtype, n_steps=4, backend="triton", **options)
    assert opt._fast.groups[0].runs[0][1].launch.table is not None
    assert rng_counts(opt) == [4] * len(SHAPES)


@pytest.mark.parametrize("statistics", [False, True], ids=["sums", "statistics"])
def test_monitored_low_precision_fast_steps_record_the_same(statistics):
    """A RotationMonitor on compensated bf16 with stochastic rounding and 8-bit states: every
    step fast and counted, the recorded ones filled by the kernels (of the master weights), the
    same records as the validation path's."""
    dtype, options = LOW["master24-sr-states8"]
    a, opt_a, b, opt_b = pair("adamw", dtype, **options)
    monitors = [wdopt.RotationMonitor(opt, every=2, statistics=statistics) for opt in (opt_a, opt_b)]
    counted = Counted(opt_a)
    steps(opt_a, a, 0, 6)
    steps(opt_b, b, 0, 6)
    assert counted.n == 1
    assert_same(opt_a, a, opt_b, b)
    assert [r.step for r in monitors[0].history] == [r.step for r in monitors[1].history] == [2, 4, 6]
    for ra, rb in zip(monitors[0].history, monitors[1].history):
        for p, q in zip(a, b):
            torch.testing.assert_close(ra._request[id(p)], rb._request[id(q)], rtol=0, atol=0)


@pytest.mark.parametrize("edit", ["none", "scales moved", "rng replaced"])
def test_many_low_precision_tensors_split_between_threads(edit):
    """ready() splits a bucket of 1,600 tensors between threads (csrc/step_plan.cpp): the streams, corrections
    and block scales are checked in each thread's range as the states are (a bf16 group with
    24-bit masters, an fp32 one whose streams round only the 8-bit codes); a change late in the
    second range still sends the step to the validation path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(6)
        sizes = [1 + (i * 5) % 13 for i in range(2400)]  # 1,600 bf16 tensors: one bucket split in two
        dtypes = [torch.bfloat16 if i % 3 else torch.float32 for i in range(2400)]
        a = [torch.randn(n, generator=g).to(dt).requires_grad_() for n, dt in zip(sizes, dtypes)]
        b = [t.detach().clone().requires_grad_() for t in a]
        def make(ps):  # the bf16 parameters compensated (24-bit masters), the fp32 ones not
            groups = [{"params": [p for p in ps if p.dtype == torch.bfloat16], "master_weight_bits": 24},
                      {"params": [p for p in ps if p.dtype == torch.float32]}]
            return wdopt.FusedAdamW(groups, lr=1e-2, backend="cpu", stochastic_rounding=True, state_bits=8)

        opt_a, opt_b = make(a), never_fast(make(b))
        counted = Counted(opt_a)
        for step in range(4):
            for opt, ps in ((opt_a, a), (opt_b, b)):
                set_grads(ps, step)
                if step == 2 and edit == "scales moved":
                    scales = opt.state[ps[-2]]["exp_avg_sq_block_scale"]
                    scales.data = scales.data.clone()
                elif step == 2 and edit == "rng replaced":
                    opt.state[ps[-1]]["rng"] = opt.state[ps[-1]]["rng"].clone()
                opt.step()
        assert counted.n == (1 if edit == "none" else 2)
        assert_same(opt_a, a, opt_b, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("extra", ["correction", "unused"])
def test_an_entry_added_to_a_state_dict_leaves_the_fast_path(extra):
    """A state entry the plan does not use, added by hand between fast steps, is seen: the step
    runs the validation path, which drops a stray ``correction`` from a group without master
    weights as the reference does (the fast path once kept it, and folded it into the weights
    when the group later took master_weight_bits=24)."""
    def run(backend):
        ps = params(torch.bfloat16)
        opt = wdopt.FusedAdamW(ps, lr=1e-2, backend=backend, stochastic_rounding=True)
        counted = Counted(opt)
        keys, runs = [], []
        for step in range(6):
            set_grads(ps, step)
            if step == 2:
                opt.state[ps[0]][extra] = torch.full(ps[0].shape, 100, dtype=torch.int8)
            if step == 4:
                opt.param_groups[0]["master_weight_bits"] = 24
            before = counted.n
            opt.step()
            runs.append(counted.n - before)
            keys.append(sorted(opt.state[ps[0]]))
        return opt, ps, keys, runs
    fast, a, keys_a, runs = run("cpu")
    ref, b, keys_b, _ = run("reference")
    assert keys_a == keys_b
    # Validated: the first step, the one after the edit, the one after the group's edit; fast in
    # between (an entry the validation path keeps is then held by the new plan).
    assert runs == [1, 0, 1, 0, 1, 0]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in ref.state[q].items():
            assert torch.equal(fast.state[p][k], v), k
