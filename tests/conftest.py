"""Test setup: which backends run where.

Without a CUDA device the Triton kernels run on CPU tensors under the Triton interpreter, so
TRITON_INTERPRET=1 is set here, before any wdopt kernel is imported. With a GPU the Triton
backend is tested natively on CUDA tensors instead. In CI (CI=true) a missing triton is a failure.
"""

import importlib.util
import os

import pytest
import torch

# One intra-op thread. On the 2-core machine, shared with other jobs, torch's thread pool made every
# CPU op over 32,768 elements wait for a descheduled second thread: the reference and torch.optim
# runs of tests/test_parity.py took 20–60x longer than with one thread (issue 12 §7). The C++
# backend's split of the work across threads is tested on purpose, with several thread counts, in
# tests/test_parity.py::test_cpu_kernels_split_across_threads_identically.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("CI", "").lower() == "true" and importlib.util.find_spec("triton") is None:
    raise pytest.UsageError("triton is not installed: CI must test the Triton backend")


def _patch_the_language_once_per_launch():
    """Speed up the Triton interpreter by about 2x, computing exactly what it computed before.

    The interpreter swaps triton.language's builtins for interpreted ones at every launch and
    again at every call of a @triton.jit function inside a kernel (wdopt's helpers, tl.sum, ...):
    each call scans the language modules with inspect.getmembers, ~1 ms, for every block of every
    program. Inside a launch the language it sees is already patched: by the launch itself, or,
    for triton.language.core (which tl.sum's module uses), by an earlier such call, whose patches
    the interpreter never undoes. A call that would patch nothing new is skipped here; launches
    still patch and restore as before. If triton's internals move, nothing is changed (the tests
    only run slower). tests/test_launches.py::test_interpreter_shortcut_changes_no_result checks
    that results are identical bit for bit with and without it."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, scope_class = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(patch_lang, "wdopt_shortcut", False):
        return
    active: list = []  # the language modules patched by the launch in progress
    kept: set = set()  # language modules patched inside a launch: never restored by the interpreter
    languages_of: dict = {}

    def languages(fn):
        if fn not in languages_of:
            languages_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return languages_of[fn]

    class LaunchScope(scope_class):
        def restore(self):
            super().restore()
            kept.difference_update(active.pop())  # what the launch patched is undone, as it was

    def patch_lang_once(fn):
        if active and languages(fn) <= active[-1] | kept:
            return scope_class()  # a call inside a launch: already patched
        scope = patch_lang(fn)
        if active:
            kept.update(languages(fn))
            return scope
        launch = LaunchScope()
        launch._changes = scope._changes
        active.append(languages(fn))
        return launch

    patch_lang_once.wdopt_shortcut = True
    patch_lang_once.original = patch_lang
    interpreter._patch_lang = patch_lang_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()

import wdopt  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_device_pairs():
    """Every (backend, device) that can run here; "reference" on every device."""
    return [(b, d) for d in DEVICES for b in wdopt.available_backends(d)]


def pytest_report_header(config):
    return [f"wdopt backends: {backend_device_pairs()}"]


# ------------------------------------------------------------------------------------ slow checks
#
# Checks marked ``slow`` compile every CUDA source with nvcc (about 110 s of the 2 cores' time, a
# sixth of the suite's): the README's test command skips them, so that a newcomer's run stays well
# under 10 minutes; CI's second run (.ci/run) and ``pytest --slow`` run them.


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the checks marked slow (nvcc's compile of every CUDA source)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow (nvcc compiles every CUDA source): run by CI's second run and pytest --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
