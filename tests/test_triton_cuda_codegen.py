"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) on any machine: Triton's CUDA
backend compiles ahead of time without a GPU. The generated PTX is checked for what performance
and exactness depend on: 16-byte vector loads and stores on full blocks, and no approximate
division or square root (the rotational row kernels: exact math). Every kernel is also assembled
for sm_90 with the ptxas that Triton ships, at the warps it is launched with, and held to no
spill, and the element-wise kernels to at most 128 registers a thread (occupancy)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
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
                "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "rate_ptr": "*fp64",
                "rate_out_ptr": "*fp64"}
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
            options = {"enable_fp_fusion": False, "num_warps": case.get("num_warps", 4)}
            out[case["id"]] = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                             target=target, options=options).asm["ptx"]
        except Exception as e:
            out[case["id"]] = "COMPILE ERROR: " + repr(e)
    print(json.dumps(out))
""")

DTYPES = ["fp32", "bf16", "fp16", "fp64"]
# The warps the kernels are launched with on a GPU (wdopt/kernels/triton): element-wise kernels
# GPU_WARPS, rotational tiles by their element count, long rotational rows LONG_WARPS.
ELEMENTWISE_WARPS = 8
LONG_WARPS = 16


def _tile_warps(rows, block):
    return 4 if rows * block <= 512 else 16 if block >= 2048 else 8
FLAGS = dict(MAXIMIZE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, ALIGNED=True, CHUNK=16384, BLOCK=1024,
             TELEMETRY=False, STATISTICS=False, STOCHASTIC=False, MASTER=16, QUANTIZED=False, WRITE=True)
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
                                  arch=arch, constexprs={**FLAGS, **extra}, num_warps=ELEMENTWISE_WARPS))
    cases.append(dict(id="adamw-unaligned", module="adamw", kernel="_adamw_kernel", dtype="fp32", arch=90,
                      constexprs={**FLAGS, **ELEMENTWISE["adamw"][2], "ALIGNED": False}, num_warps=ELEMENTWISE_WARPS))
    cases.append(dict(id="adamw-coefficients", module="adamw", kernel="_adamw_coefficients_kernel", arch=90,
                      constexprs=dict(LR_ON_DEVICE=True, HAS_FOUND_INF=True, ROWS=128), num_warps=ELEMENTWISE_WARPS))
    # Monitored steps: one program per telemetry row (rows start anywhere: no vector accesses).
    for name, (module, kernel, extra) in ELEMENTWISE.items():
        cases.append(dict(id=f"{name}-telemetry", module=module, kernel=kernel, dtype="fp32", arch=90,
                          constexprs={**FLAGS, **extra, "CHUNK": 1, "BLOCK": 1024, "TELEMETRY": True},
                          num_warps=ELEMENTWISE_WARPS))
        # ... and with the direction statistics (eight row sums: a quarter of the block, telemetry_block_size).
        cases.append(dict(id=f"{name}-statistics", module=module, kernel=kernel, dtype="fp32", arch=90,
                          constexprs={**FLAGS, **extra, "CHUNK": 1, "BLOCK": 256, "TELEMETRY": True,
                                      "STATISTICS": True},
                          num_warps=ELEMENTWISE_WARPS))
    # Stochastic rounding (bf16/fp16 stores, wdopt/kernels/triton/rounding.py): the update, and the
    # monitored steps at their blocks (telemetry_block_size: half the block, a quarter with statistics).
    for name, (module, kernel, extra) in ELEMENTWISE.items():
        for dtype in ("bf16", "fp16"):
            stochastic = {**FLAGS, **extra, "STOCHASTIC": True}
            cases.append(dict(id=f"{name}-{dtype}-stochastic", module=module, kernel=kernel, dtype=dtype, arch=90,
                              constexprs=stochastic, num_warps=ELEMENTWISE_WARPS))
            cases.append(dict(id=f"{name}-stochastic-{dtype}-telemetry", module=module, kernel=kernel, dtype=dtype,
                              arch=90, constexprs={**stochastic, "CHUNK": 1, "BLOCK": 512, "TELEMETRY": True},
                              num_warps=ELEMENTWISE_WARPS))
            cases.append(dict(id=f"{name}-stochastic-{dtype}-statistics", module=module, kernel=kernel, dtype=dtype,
                              arch=90, constexprs={**stochastic, "CHUNK": 1, "BLOCK": 256, "TELEMETRY": True,
                                                   "STATISTICS": True},
                              num_warps=ELEMENTWISE_WARPS))
    # Compensated bf16 parameters (MASTER 32: int16 corrections, 24: int8; rounding.py's load_param
    # and store_param): the update with either rounding, and the monitored steps at their blocks
    # (telemetry_block_size: half the block, a quarter with statistics).
    for name, (module, kernel, extra) in ELEMENTWISE.items():
        for bits in (32, 24):
            for stochastic in (False, True):
                master = {**FLAGS, **extra, "MASTER": bits, "STOCHASTIC": stochastic}
                suffix = "-stochastic" if stochastic else ""
                cases.append(dict(id=f"{name}-master{bits}{suffix}", module=module, kernel=kernel, dtype="bf16",
                                  arch=90, constexprs=master, num_warps=ELEMENTWISE_WARPS))
                if stochastic == (bits == 24):  # the monitored steps of the 32-bit master and the stochastic 24-bit one
                    cases.append(dict(id=f"{name}-master{bits}{suffix}-telemetry", module=module, kernel=kernel,
                                      dtype="bf16", arch=90,
                                      constexprs={**master, "CHUNK": 1, "BLOCK": 512, "TELEMETRY": True},
                                      num_warps=ELEMENTWISE_WARPS))
            cases.append(dict(id=f"{name}-master{bits}-stochastic-statistics", module=module, kernel=kernel,
                              dtype="bf16", arch=90,
                              constexprs={**FLAGS, **extra, "MASTER": bits, "STOCHASTIC": True, "CHUNK": 1,
                                          "BLOCK": 256, "TELEMETRY": True, "STATISTICS": True},
                              num_warps=ELEMENTWISE_WARPS))
    # 8-bit states (wdopt/kernels/triton/quantization.py): fp32 parameters to nearest, and the
    # 5-byte configuration (bf16 + 24-bit master, stochastic); a monitored step's measuring pass.
    # AdamW only (three states: the most registers; SGD's and Lion's 8-bit kernels held 64 and
    # 62-106 registers, 8 bytes of spill at most): each 8-bit case is seconds of compile time.
    for name, (module, kernel, extra) in [("adamw", ELEMENTWISE["adamw"])]:
        states8 = {**FLAGS, **extra, "QUANTIZED": True}
        cases.append(dict(id=f"{name}-states8", module=module, kernel=kernel, dtype="fp32", arch=90,
                          constexprs=states8, num_warps=ELEMENTWISE_WARPS))
        cases.append(dict(id=f"{name}-master24-stochastic-states8", module=module, kernel=kernel, dtype="bf16",
                          arch=90, constexprs={**states8, "MASTER": 24, "STOCHASTIC": True, "BLOCK": 512},
                          num_warps=ELEMENTWISE_WARPS))
        cases.append(dict(id=f"{name}-states8-telemetry", module=module, kernel=kernel, dtype="fp32", arch=90,
                          constexprs={**states8, "CHUNK": 1, "TELEMETRY": True, "WRITE": False},
                          num_warps=ELEMENTWISE_WARPS))
    # The rotational row engine: short rows as a [ROWS, BLOCK] tile, long rows in two passes.
    for optimizer, extra in ROTATIONAL.items():
        # Tiles: 16 rows of 128 (2,048 elements), and one row of 2,048 (the largest on chip).
        shapes = [(False, 16, 128, "fp32"), (False, 1, 2048, "fp32")]
        shapes += [(True, 1, 1024 if d == "fp64" else 2048, d)
                   for d in (["fp32", "bf16", "fp64"] if optimizer == 0 else ["fp32"])]
        # AdamW (the most registers) with the capturable device rate, the others with a host rate:
        # both variants compiled (the device rate, loaded at the top, once spilled 16 bytes).
        extra = dict(extra, HAS_RATE=optimizer == 0)
        # Low precision (AdamW, bf16): stochastic rounding and a 24-bit master weight, both paths.
        low = [(False, 16, 128, "bf16", True, 24), (True, 1, 1024, "bf16", True, 24)] if optimizer == 0 else []
        for long, rows, block, dtype, stochastic, master in [s + (False, 16) for s in shapes] + low:
            suffix = f"-sr-master{master}" if stochastic else ""
            cases.append(dict(
                id=f"rotational-{optimizer}-{'long' if long else f'tile{rows}x{block}'}-{dtype}{suffix}",
                module="rotational", kernel="_rotational_kernel", dtype=dtype, arch=90,
                num_warps=LONG_WARPS if long else _tile_warps(rows, block),
                constexprs=dict(OPTIMIZER=optimizer, ZERO_MEAN=True, PROJECTED=False, MAXIMIZE=True,
                                HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, TELEMETRY=True, LONG=long,
                                STOCHASTIC=stochastic, MASTER=master, QUANTIZED=False, ROWS=rows, BLOCK=block,
                                **extra)))
    # 8-bit states (AdamW, the most registers): the row kernels reading them decoded, on chip and
    # long, fp32 and the bf16 + stochastic 24-bit master; the block phase that encodes them, for
    # each optimizer (to nearest at the element-wise block, stochastically at 512).
    for long, rows, block, dtype, stochastic, master in [(False, 16, 128, "fp32", False, 16),
                                                         (True, 1, 1024, "fp32", False, 16),
                                                         (True, 1, 1024, "bf16", True, 24)]:
        suffix = "-sr-master24" if stochastic else ""
        cases.append(dict(
            id=f"rotational-0-{'long' if long else f'tile{rows}x{block}'}-{dtype}{suffix}-states8",
            module="rotational", kernel="_rotational_kernel", dtype=dtype, arch=90,
            num_warps=LONG_WARPS if long else _tile_warps(rows, block),
            constexprs=dict(OPTIMIZER=0, HAS_MOMENTUM=False, NESTEROV=False, HAS_RATE=True, ZERO_MEAN=True,
                            PROJECTED=False, MAXIMIZE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, TELEMETRY=True,
                            LONG=long, STOCHASTIC=stochastic, MASTER=master, QUANTIZED=True, ROWS=rows,
                            BLOCK=block)))
    for optimizer, extra in ROTATIONAL.items():
        for dtype, stochastic, block in [("fp32", False, 1024)] + ([("bf16", True, 512)] if optimizer == 0 else []):
            cases.append(dict(
                id=f"rotational-{optimizer}-blocks-{dtype}{'-sr' if stochastic else ''}-states8", module="rotational",
                kernel="_rotational_states_kernel", dtype=dtype, arch=90, num_warps=ELEMENTWISE_WARPS,
                constexprs=dict(OPTIMIZER=optimizer, MAXIMIZE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                                STOCHASTIC=stochastic, CHUNK=16384, BLOCK=block, **extra)))
    cases.append(dict(id="rotational-coefficients", module="rotational", kernel="_rotational_coefficients_kernel",
                      arch=90, constexprs=dict(ADAMW_STEPS=True, HAS_FOUND_INF=True, HAS_RATE=True, PROJECTED=False,
                                               ROWS=128)))
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
    # Monitored steps' rows start anywhere; 8-bit states with a stochastic master run 2 elements a
    # thread (multi_tensor.QUANTIZED_ROUNDED_GPU_BLOCK): 4-byte bf16 pairs, not vectors.
    if case_id != "adamw-unaligned" and not case_id.endswith(("-telemetry", "-statistics", "stochastic-states8")):
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.", code), "full blocks must use vector loads"
        assert re.search(r"st\.global(\.\w+)*\.v[24]\.", code), "full blocks must use vector stores"
    _exact(code)


# fmix32's first multiplier 0x85EBCA6B as PTX writes the immediate of a 32-bit multiply.
_HASH = re.compile(r"mul\.lo\.s32\s+%r\d+, %r\d+, -2048144789;")


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["module"] in ELEMENTWISE])
def test_stochastic_rounding_only_in_its_variants(ptx, case_id):
    """The random bits are drawn in the STOCHASTIC variants, and nothing of them is left in the
    others (round to nearest compiles as it did before stochastic rounding)."""
    assert bool(_HASH.search(_compiled(ptx, case_id))) == ("stochastic" in case_id)


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["module"] == "rotational"])
def test_rotational_kernels_compile_exact(ptx, case_id):
    _exact(_compiled(ptx, case_id))


def test_adamw_coefficient_kernel_compiles(ptx):
    code = _compiled(ptx, "adamw-coefficients")
    assert "sqrt.rn.f64" in code and ".approx" not in code


def _ptxas(code: str, arch: str) -> str | None:
    """``ptxas -v`` output for ``code``, from the first ptxas that Triton ships which accepts its
    PTX version (a newer Triton emits PTX newer than its plain ptxas reads); None if none does."""
    import triton

    bins = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(code)
        for tool in sorted(bins.glob("ptxas*"), reverse=True):
            out = subprocess.run([str(tool), "-v", "--gpu-name", arch, str(source), "-o", os.devnull],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return out.stderr
    return None


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["arch"] == 90])
def test_kernels_fit_in_registers_at_sm90(ptx, case_id):
    code = _compiled(ptx, case_id)
    report = _ptxas(code, "sm_90a" if ".target sm_90a" in code else "sm_90")
    assert report is not None, "no ptxas shipped with Triton assembles this PTX"
    registers = max(int(r) for r in re.findall(r"Used (\d+) registers", report))
    spilled = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    # The statistics twins run on a monitor's recorded steps only. Their 4-byte spill is ptxas
    # trading one register for occupancy (triton 3.8 at sm_90: 48 registers, for any block up to
    # 256; none at 3.9), not pressure: allowed there, up to 16 bytes. So for the monitored steps of
    # compensated parameters: bf16 AdamW with a 32-bit master spills 8 bytes at 64 registers (block
    # 512) and at 48 (block 256), where the 24-bit one holds 70 and none (triton 3.9).
    # The 8-bit SGD kernel likewise: 8 bytes at 64 registers with triton 3.8, none with 3.9.
    allowed = 16 if case_id.endswith(("-statistics", "states8")) or \
        ("master" in case_id and case_id.endswith("-telemetry")) else 0
    assert spilled <= allowed, f"{case_id}: {spilled} bytes of spill stores and loads ({registers} registers)"
    if not case_id.startswith("rotational"):
        assert registers <= 128, f"{case_id}: {registers} registers a thread (at most 128 keeps occupancy)"


# ---------------------------------------------------------------------------- monitored steps, run
# (Here rather than in tests/test_stochastic_rounding.py, whose bit-for-bit test runs the Triton
# update path: this one runs the row kernels of monitored steps, interpreted without a GPU.)


@pytest.mark.parametrize("name,dtype", [("adamw", "bfloat16"), ("sgd", "float16"), ("lion", "bfloat16")])
def test_monitored_stochastic_steps_store_the_reference_bits(name, dtype, monkeypatch):
    """Monitored steps with stochastic rounding (one program per telemetry row, rows looping over
    blocks, with the direction statistics) store the bits of the reference backend, and the sums
    measure the stored values. A channels_last parameter (a bucket of its own, its telemetry
    measured from snapshots) draws its bits by memory offset."""
    import torch

    import wdopt
    from wdopt.kernels.triton import multi_tensor

    monkeypatch.setattr(multi_tensor, "TELEMETRY_MAX_BLOCK", 32)  # rows of 45 and 129 loop over blocks
    launches = []
    # Every launch's table is made by multi_tensor.elementwise_table (through elementwise_passes).
    monkeypatch.setattr(multi_tensor, "elementwise_table", _recording(multi_tensor.elementwise_table, launches))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype)
    cls, hyper = {"adamw": (wdopt.FusedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
                  "sgd": (wdopt.FusedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
                  "lion": (wdopt.FusedLion, dict(lr=1e-3, weight_decay=1.0))}[name]
    runs = []
    for backend in ("reference", "triton"):
        g = torch.Generator().manual_seed(0)
        conv = torch.randn(6, 5, 3, 3, generator=g).to(device=device, dtype=dtype)
        params = [conv.clone().requires_grad_(True),
                  torch.randn(4, 129, generator=g).to(device=device, dtype=dtype).requires_grad_(True),
                  torch.randn(7, generator=g).to(device=device, dtype=dtype).requires_grad_(True),
                  conv.to(memory_format=torch.channels_last).requires_grad_(True)]
        # Only contiguous buckets have their telemetry gathered by the kernels: the channels_last
        # parameter in a group of its own leaves the first group's to them.
        opt = cls([{"params": params[:3]}, {"params": params[3:]}], backend=backend, stochastic_rounding=True,
                  rounding_seed=3, **hyper)
        monitor = wdopt.RotationMonitor(opt, every=2, statistics=True)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
            opt.step()
        assert len(monitor.history) == 2
        runs.append((params, opt, monitor))
    # The kernels' monitored steps, with statistics (columns 4-7), rounded stochastically.
    assert sum(shape["TELEMETRY"] and shape["STATISTICS"] and shape["STOCHASTIC"] for shape in launches) == 2
    (ref, ref_opt, ref_monitor), (out, opt, monitor) = runs
    for i, (a, b) in enumerate(zip(out, ref)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"param {i}"
        for key, value in ref_opt.state[b].items():
            got = opt.state[a][key]
            if value.dtype == dtype:
                got, value = got.view(torch.int16), value.view(torch.int16)
            assert torch.equal(got, value), f"param {i} state {key}"
    for record, expected in zip(monitor.history, ref_monitor.history):
        for key, sums in expected.sums.items():
            torch.testing.assert_close(record.sums[key].cpu(), sums.cpu(), rtol=1e-5, atol=1e-12)


def _recording(elementwise_table, launches):
    """``elementwise_table`` that also keeps the shape constexprs of each launch in ``launches``."""
    def recorded(*args, **kwargs):
        table, shape = elementwise_table(*args, **kwargs)
        launches.append(shape)
        return table, shape
    return recorded
