"""The public surface: exact signatures, lazy import, backend discovery, torch.optim behaviour."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import wdopt

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
SIGNATURES = {
    "FusedAdamW": [("params", P, inspect.Parameter.empty), ("lr", P, 1e-3), ("betas", P, (0.9, 0.999)),
                   ("eps", P, 1e-8), ("weight_decay", P, 1e-2), ("amsgrad", P, False), ("maximize", K, False),
                   ("capturable", K, False), ("decay_scaling", K, "lr"), ("backend", K, "auto")],
    "FusedSGD": [("params", P, inspect.Parameter.empty), ("lr", P, 1e-3), ("momentum", P, 0.0),
                 ("dampening", P, 0.0), ("weight_decay", P, 0.0), ("nesterov", P, False), ("maximize", K, False),
                 ("decoupled_weight_decay", K, False), ("capturable", K, False), ("decay_scaling", K, "lr"),
                 ("backend", K, "auto")],
    "FusedLion": [("params", P, inspect.Parameter.empty), ("lr", P, 1e-4), ("betas", P, (0.9, 0.99)),
                  ("weight_decay", P, 0.0), ("maximize", K, False), ("capturable", K, False),
                  ("decay_scaling", K, "lr"), ("backend", K, "auto")],
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signatures(name):
    params = list(inspect.signature(getattr(wdopt, name)).parameters.values())
    spec = SIGNATURES[name]
    assert [(p.name, p.kind, p.default) for p in params[: len(spec)]] == spec
    assert all(p.kind == K for p in params[len(spec):])  # more keyword-only options may follow
    assert issubclass(getattr(wdopt, name), torch.optim.Optimizer)


def test_import_is_light():
    code = "import sys, wdopt; print(sorted(m for m in sys.modules if m.startswith(('triton', 'wdopt.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_available_backends_and_auto():
    assert "reference" in wdopt.available_backends("cpu")
    from wdopt.backends import auto_backend

    # Tests run Triton on CPU under the interpreter, which "auto" must never pick.
    assert auto_backend("cpu") in ("cpu", "reference")
    assert auto_backend("cpu") == ("cpu" if "cpu" in wdopt.available_backends("cpu") else "reference")
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in wdopt.available_backends("cpu")
    opt = wdopt.FusedAdamW([torch.zeros(2, requires_grad=True)])
    assert opt.param_groups[0]["backend"] == "auto"


def test_env_report_names_every_backend():
    out = subprocess.run([sys.executable, "-m", "wdopt.env"], capture_output=True, text=True, check=True).stdout
    for backend in ("reference", "triton", "cpu", "cuda"):
        assert f"  {backend} " in out
    assert "torch" in out and "available" in out


def test_closure_zero_grad_and_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = wdopt.FusedAdamW(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(20):
        last = opt.step(closure)
    assert last < first and calls == ["post"] * 21
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_demo_command_runs():
    # One intra-op thread, as the suite's own process (tests/conftest.py): on a loaded 2-core
    # machine the demo's two threads waited on each other (9 s alone, 17 s in the suite).
    out = subprocess.run([sys.executable, "-m", "wdopt", "demo", "--steps", "30"],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, check=True).stdout
    assert "same trajectory" in out


@pytest.mark.parametrize("cls", [wdopt.FusedAdamW, wdopt.RotationalSGD, torch.optim.AdamW],
                         ids=["FusedAdamW", "RotationalSGD", "torch.AdamW"])
def test_step_hooks_and_profiler_range_as_torch(monkeypatch, cls):
    """Step hooks (per optimizer and global, pre hooks that replace the arguments) and the profiler's
    ``Optimizer.step#<class>.step`` range work as torch.optim's, although wdopt skips torch's
    wrapper (a profiler range costs ~25 µs) when there is no hook and no profiler."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn_like(p)
    calls = []

    def pre(o, args, kwargs):
        calls.append(("pre", o, args, dict(kwargs)))
        return args, {"closure": lambda: calls.append("closure") or 1.5}

    def post(o, args, kwargs):
        calls.append(("post", o, args, dict(kwargs)))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        assert opt.step() == 1.5  # the pre hook's closure ran: its arguments replaced step's
    finally:
        for h in handles:
            h.remove()
    assert calls == [("pre", opt, (opt,), {}), "closure", ("post", opt, (opt,), {"closure": calls[2][3]["closure"]}),
                     "global post"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert f"Optimizer.step#{cls.__name__}.step" in {e.name for e in prof.events()}
    if cls is not torch.optim.AdamW:  # no hook, no profiler: no profiler range is opened
        def refuse(*args, **kwargs):
            raise AssertionError("record_function entered")

        monkeypatch.setattr(torch.autograd.profiler, "record_function", refuse)
        before = p.detach().clone()
        opt.step()
        assert not torch.equal(p, before)


@pytest.mark.parametrize("cls", [wdopt.FusedAdamW, torch.optim.AdamW], ids=["FusedAdamW", "torch.AdamW"])
def test_step_hooks_with_compile_and_in_subclasses(cls):
    """Hooks registered after a compiled step's first call run at the next (the compiled step
    does not keep a "no hook" branch), and a subclass whose step calls super().step() runs each
    hook once per step (found by review of the hook-skipping wrapper; torch.optim does too unless
    the parent class was instantiated first, a torch quirk wdopt does not copy)."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([p], lr=1e-2, weight_decay=0.1)
    step = torch.compile(opt.step, backend="eager")
    p.grad = torch.randn_like(p)
    step()
    calls = []
    handle = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    p.grad = torch.randn_like(p)
    step()
    handle.remove()
    assert calls == ["pre"]
    if cls is torch.optim.AdamW:
        return  # torch runs a subclass's hooks twice when the parent class was instantiated before

    class Sub(cls):
        def step(self, closure=None):
            return super().step(closure)

    q = torch.nn.Parameter(torch.randn(4, 3))
    sub = Sub([q], lr=1e-2)
    counted = []
    sub.register_step_pre_hook(lambda o, a, k: counted.append(1))
    for _ in range(2):
        q.grad = torch.randn_like(q)
        sub.step()
    assert len(counted) == 2
