"""Shared test utilities: deterministic parameter/gradient streams and state comparison."""

from __future__ import annotations

import itertools

import pytest
import torch

#: Odd sizes: one element, a non-multiple of any vector width, a block boundary ±, several chunks.
ODD_SHAPES = [(1,), (7,), (1023,), (65537,), (5, 3, 3, 3), (33, 17)]
#: ODD_SHAPES for some Triton-interpreter cases. The interpreter runs every program of a bucket
#: BLOCK = next_power_of_2(largest tensor) lanes wide (up to its 65,536-element chunk): 65,537
#: elements make all six tensors cost 64x more. 1,024 in its place is one full, unmasked block
#: beside the masked tails of the others. The interpreter's multi-chunk tensor (65,537 = two
#: chunks) stays in the cases that use ODD_SHAPES.
SMALL_SHAPES = [(1,), (7,), (1023,), (1024,), (5, 3, 3, 3), (33, 17)]


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def grad_stream(shapes, steps, seed=1, top=2):
    """Per step, a list of fp64 gradients whose scales differ by orders of magnitude across tensors
    and steps (1e-4 … 10^top), so eps, bias correction and amsgrad's max all matter.

    SGD tests use top=0: SGD keeps gradients unnormalised, and a buffer of values ~1e2 carries
    rounding differences of ~1e-5, beyond assert_close's absolute fp32 tolerance."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = []
        for i, s in enumerate(shapes):
            scale = 10.0 ** ((i + step) % (5 + top) - 4)
            grads.append(torch.randn(s, generator=g, dtype=torch.float64) * scale)
        out.append(grads)
    return out


def clone_leaves(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_(True) for p in params]


def run(optimizer, params, grads_per_step, dtype=None):
    """Step ``optimizer`` on ``params`` with the given gradient stream (cast to the param dtype)."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.to(device=p.device, dtype=dtype or p.dtype)
        optimizer.step()


def assert_same_trajectory(opt_a, params_a, opt_b, params_b, **tol):
    """Parameters and every state tensor of ``opt_b`` (the expectation) agree with ``opt_a``."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), msg=lambda m: f"param {i}: {m}", **tol)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert set(state_b) <= set(state_a), (sorted(state_a), sorted(state_b))
        for key in state_b:
            va, vb = state_a[key], state_b[key]
            if key == "step":
                assert float(va) == float(vb), (i, float(va), float(vb))
                continue
            torch.testing.assert_close(va.cpu(), vb.cpu(), msg=lambda m: f"param {i} state {key}: {m}", **tol)


def interpreted(backend, device) -> bool:
    """Triton on CPU tensors: the Triton interpreter (tests/conftest.py), a second or more per
    parity case where a compiled backend takes milliseconds."""
    return backend == "triton" and str(device) == "cpu"


def _pairs(row: dict) -> set:
    return set(itertools.combinations(sorted(row.items(), key=lambda kv: kv[0]), 2))


def pairwise(rows: list[dict]) -> list[dict]:
    """A covering subset of ``rows`` (dicts with the same keys): every pair of values of two keys
    that occurs together in some row occurs together in a chosen row. The first and last rows
    (all options off, all on) come first, then rows greedily, most uncovered pairs first: a fixed
    choice. A kernel's options are independent branches (constexpr flags, scalar coefficients),
    so a bug from one option or from two interacting shows in these rows; the compiled backends
    still run every row."""
    uncovered = set().union(*map(_pairs, rows))
    chosen = []
    for row in [rows[0], rows[-1]]:
        if row not in chosen:
            chosen.append(row)
            uncovered -= _pairs(row)
    while uncovered:
        best = max(rows, key=lambda r: len(_pairs(r) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def option_cases(pairs, rows: list[dict], id_of) -> list:
    """pytest params (backend, device, row): every row for every backend, a ``pairwise`` cover of
    them for the Triton interpreter. Ordered row by row, so that the backends of one row run one
    after another and share its cached expectation."""
    cover = pairwise(rows)
    return [pytest.param(b, d, row, id=f"{id_of(row)}-{b}-{d}")
            for row in rows for b, d in pairs if row in cover or not interpreted(b, d)]
