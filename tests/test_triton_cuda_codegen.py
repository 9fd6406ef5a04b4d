"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) on any machine: Triton's CUDA
backend compiles ahead of time without a GPU. The generated PTX is checked for what performance
and exactness depend on: 16-byte vector loads and stores on full blocks, and no approximate
division or square root (the rotational row kernels: exact math)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# Tests run with TRITON_INTERPRET=1, under which kernels are interpreted objects: compile in a
# child process with the interpreter off, once for every case, and inspect the PTX here.
COMPILER = textwrap.dedent("""
    import importlib, json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    POINTERS = {"table_ptr": "*i64", "work_ptr": "*i64", "coef_ptr": "*fp64", "lr_ptr": "*fp32",
                "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    DTYPES = {"fp32": (tl.float32, tl.float32), "bf16": (tl.bfloat16, tl.float32),
              "fp16": (tl.float16, tl.float32), "fp64": (tl.float64, tl.float64)}
    out = {}
    for case in json.loads(sys.argv[1]):
        fn = getattr(importlib.import_module("wdopt.kernels.triton." + case["module"]), case["kernel"])
        constexprs = dict(case["constexprs"])
        if "dtype" in case:
            constexprs["DTYPE"], constexprs["COMPUTE"] = DTYPES[case["dtype"]]
        signature = {a: "constexpr" if a in constexprs else POINTERS.get(a, "i64" if a.endswith("_bits") else "i32")
                     for a in fn.arg_names}
        try:
            target = GPUTarget("cuda", case["arch"], 32)
            out[case["id"]] = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                             target=target, options={"enable_fp_fusion": False}).asm["ptx"]
        except Exception as e:
            out[case["id"]] = "COMPILE ERROR: " + repr(e)
    print(json.dumps(out))
""")

DTYPES = ["fp32", "bf16", "fp16", "fp64"]
FLAGS = dict(MAXIMIZE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, ALIGNED=True, CHUNK=16384, BLOCK=1024)
ELEMENTWISE = {
    "adamw": ("adamw", "_adamw_kernel", dict(AMSGRAD=True)),
    "sgd": ("sgd", "_sgd_kernel", dict(HAS_MOMENTUM=True, NESTEROV=True, DECOUPLED=False, LR_ON_DEVICE=True)),
    "lion": ("lion", "_lion_kernel", dict(LR_ON_DEVICE=False)),
}
ROTATIONAL = {0: dict(HAS_MOMENTUM=False, NESTEROV=False), 1: dict(HAS_MOMENTUM=False, NESTEROV=False),
              2: dict(HAS_MOMENTUM=True, NESTEROV=True)}  # adamw, lion, sgd


def _cases():
    cases = []
    for name, (module, kernel, extra) in ELEMENTWISE.items():
        for dtype in DTYPES:
            for arch in ([80, 90] if dtype == "fp32" else [90]):
                cases.append(dict(id=f"{name}-{dtype}-sm{arch}", module=module, kernel=kernel, dtype=dtype,
                                  arch=arch, constexprs={**FLAGS, **extra}))
    cases.append(dict(id="adamw-unaligned", module="adamw", kernel="_adamw_kernel", dtype="fp32", arch=90,
                      constexprs={**FLAGS, **ELEMENTWISE["adamw"][2], "ALIGNED": False}))
    cases.append(dict(id="adamw-coefficients", module="adamw", kernel="_adamw_coefficients_kernel", arch=90,
                      constexprs=dict(LR_ON_DEVICE=True, HAS_FOUND_INF=True, ROWS=128)))
    # Monitored steps: one program per telemetry row (rows start anywhere: no vector accesses).
    for name, (module, kernel, extra) in ELEMENTWISE.items():
        cases.append(dict(id=f"{name}-telemetry", module=module, kernel=kernel, dtype="fp32", arch=90,
                          constexprs={**FLAGS, **extra, "CHUNK": 1, "BLOCK": 1024, "TELEMETRY": True}))
    # The rotational row engine: short rows as a [ROWS, BLOCK] tile, long rows in two passes.
    for optimizer, extra in ROTATIONAL.items():
        for long, dtypes in ((False, ["fp32"]), (True, ["fp32", "bf16", "fp64"] if optimizer == 0 else ["fp32"])):
            for dtype in dtypes:
                cases.append(dict(
                    id=f"rotational-{optimizer}-{'long' if long else 'tile'}-{dtype}", module="rotational",
                    kernel="_rotational_kernel", dtype=dtype, arch=90,
                    constexprs=dict(OPTIMIZER=optimizer, ZERO_MEAN=True, PROJECTED=False, MAXIMIZE=True,
                                    HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, TELEMETRY=True, LONG=long,
                                    ROWS=1 if long else 16, BLOCK=2048 if long else 128, **extra)))
    cases.append(dict(id="rotational-coefficients", module="rotational", kernel="_rotational_coefficients_kernel",
                      arch=90, constexprs=dict(ADAMW_STEPS=True, HAS_FOUND_INF=True, ROWS=128)))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILER, json.dumps(CASES)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0 and "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this triton cannot compile ahead of time")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compiled(ptx, case_id):
    code = ptx[case_id]
    assert not code.startswith("COMPILE ERROR"), code
    return code


def _exact(code):
    assert not re.search(r"div\.(full|approx)|sqrt\.approx|rcp\.approx", code), "approximate math in the kernel"
    assert not re.search(r"\bfma\.", code), "contracted multiply-adds round differently from the reference"


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["kernel"] != "_adamw_coefficients_kernel"
                                     and c["module"] != "rotational"])
def test_elementwise_kernels_compile_vectorized_and_exact(ptx, case_id):
    code = _compiled(ptx, case_id)
    if case_id != "adamw-unaligned" and not case_id.endswith("-telemetry"):
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.", code), "full blocks must use vector loads"
        assert re.search(r"st\.global(\.\w+)*\.v[24]\.", code), "full blocks must use vector stores"
    _exact(code)


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["module"] == "rotational"])
def test_rotational_kernels_compile_exact(ptx, case_id):
    _exact(_compiled(ptx, case_id))


def test_adamw_coefficient_kernel_compiles(ptx):
    code = _compiled(ptx, "adamw-coefficients")
    assert "sqrt.rn.f64" in code and ".approx" not in code
