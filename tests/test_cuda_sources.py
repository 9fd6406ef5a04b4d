"""The CUDA backend's sources on any machine, GPU or not.

* Every csrc/cuda/*.cu compiles with nvcc for sm_90 (and sm_80 with WDOPT_TEST_CUDA_ARCHS="80 90")
  with the flags the extension is built with, one nvcc run per file as the extension's build runs
  them, without a warning, spill or local-memory use; their PTX has the properties speed and
  exactness rest on (16-byte vector accesses, IEEE division/square root, no FMA contraction), and
  every kernel is built by exactly one of them.
* csrc/cuda/binding.cpp passes the host compiler's syntax check against torch's headers.
* The engine's logic runs on the CPU: the .cu files built with WDOPT_HOST_EMULATION, each
  separately as in the extension's build, and linked together, execute every launch as host
  loops over blocks and threads, and must reproduce the reference bit for bit
  (chunking, tails, misaligned tensors, table batching, step counts, GradScaler, capturable lr,
  stochastic rounding's bits).

What the emulation cannot prove: it runs a block's phases one after another (each phase for
all its threads, one thread after another, then the next phase) and blocks one after another, so
a missing or misplaced __syncthreads (Block::sync), a race on shared memory between threads of a
block or on global memory between blocks, and anything about the launch itself (shared-memory
size, launch bounds, alignment faults, streams, CUDA graph capture) pass here whether right or
wrong. Only a GPU run proves those: benchmarks/gpu_check.sh (the suite's CUDA parametrizations,
which compare the CUDA kernels with the reference, and benchmarks/gpu_acceptance.py).

The nvcc and syntax checks are marked slow (about 110 s of CPU on the 2-core machine): the
README's test command skips them, CI's second run (.ci/run) and ``pytest --slow`` run them.
Without nvcc they skip, except in CI (CI=true), where a missing nvcc is a failure.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from wdopt import reference, theory
from wdopt.kernels.build import cxx_standard
from wdopt.reference import quantization
from wdopt.reference import rotational as rv
from wdopt.reference import rounding
from wdopt.reference import telemetry as reference_telemetry

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
# The translation units of the CUDA kernels (csrc/cuda/common.cuh says how they are split), as
# the extension's build (wdopt/kernels/cpp.py, setup.py) gathers them.
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
BINDING = CUDA_DIR / "binding.cpp"
IN_CI = os.environ.get("CI", "").lower() == "true"

# What torch.utils.cpp_extension passes to nvcc, plus the flags wdopt's build adds.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
# The language standard of the torch under test, as torch's builder passes it when it builds the
# extension (c++20 from torch 2.13's builder on; torch 2.14's headers need it).
CXX_STD = f"-std={cxx_standard()}"
NVCC_FLAGS = [CXX_STD, "--fmad=false", "-O3", "-Xfatbin=-compress-all"]
# The architectures compiled: sm_90 (H100/H200, the GPUs the project is checked on), and sm_80 on
# request. Each adds about 75 s of CPU to the suite since the 8-bit kernels (2026-11-28, AMD EPYC);
# nothing in the kernels is specific to either, but their register allocation differs, so a
# change to launch bounds or register use is worth the run with both.
ARCHS = tuple(int(a) for a in os.environ.get("WDOPT_TEST_CUDA_ARCHS", "90").split())


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
                nvcc = os.path.join(home, "bin", "nvcc")
                break
    if nvcc is None:
        message = "nvcc (the CUDA toolkit's compiler) was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
        if IN_CI:
            pytest.fail(message + ": CI must compile the CUDA sources (CI=true)")
        pytest.skip(message)
    return nvcc


def _run(cmd, cwd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _cuda_includes(nvcc: str) -> list[str]:
    """The CUDA header directories, as nvcc itself reports them (its INCLUDES variables)."""
    out = _run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], cwd=ROOT, timeout=60)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"\b(?:SYSTEM_)?INCLUDES=(.*)", line)
        if m:
            words = shlex.split(m.group(1))
            dirs += [w[2:] if w.startswith("-I") else w for w in words if w not in ("-isystem", "-I")]
    return [d for d in dirs if os.path.isdir(d)]


# ------------------------------------------------------------------------------------ nvcc build


# Compiles run two at a time when this process has the cores to itself (CI's machine has 2): the
# file's wall time then drops by a sixth, for a quarter more CPU (contention; 2026-11-28, AMD EPYC).
# Under pytest-xdist the other workers keep the cores busy: one at a time.
JOBS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)


def _in_parallel(function, items):
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        return list(pool.map(function, items))


@pytest.fixture(scope="module")
def nvcc_build(tmp_path_factory):
    """One nvcc run per .cu file for the architectures of ARCHS, keeping the PTX, each in its own
    folder: {stem: (result, folder)}."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("nvcc")
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]

    def compile_one(source: Path):
        folder = out / source.stem
        folder.mkdir()
        # Device code only (--fatbin: PTX and cubins, no host object): the host side of the files
        # is compiled with -Wall -Wextra by the emulation build below, which fails on any warning.
        cmd = [nvcc, *NVCC_FLAGS, *TORCH_NVCC_FLAGS, *gencode, "-Xcompiler", "-Wall",
               "-Xptxas", "-warn-spills,-warn-lmem-usage,-v", "--keep", "--keep-dir", str(folder),
               "--fatbin", str(source), "-o", str(folder / f"{source.stem}.fatbin")]
        # About 75 s of CPU an architecture for all the files together, no more than kernels.cu alone
        # took before the split, and 20 s for the longest (2026-11-28, AMD EPYC); the limit only
        # guards against a hang, with room for a busy machine.
        return source.stem, (_run(cmd, cwd=folder, timeout=600), folder)

    return dict(_in_parallel(compile_one, SOURCES))


@pytest.mark.slow
def test_kernels_compile_without_warnings(nvcc_build):
    for stem, (result, out) in nvcc_build.items():
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"nvcc failed on {stem}.cu ({result.returncode}):\n{log[-6000:]}"
        assert (out / f"{stem}.fatbin").stat().st_size > 0, stem
        # Rotational row kernels: ptxas has spilled a few bytes around the IEEE division's slow-path
        # call (fp32 AdamW before pass 1 summed in double; none with CUDA 13 now, min-blocks hints
        # included): tolerated up to 32 bytes there, nowhere else.
        rotational = "RotationalRowKernel"
        warnings = [line for line in log.splitlines() if "warning" in line.lower() and rotational not in line]
        assert not warnings, f"{stem}.cu:\n" + "\n".join(warnings[:20])
        # ptxas -v: no kernel may use a stack frame (the tensor table must stay in parameter space).
        frames = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores",
                            log)
        assert frames, f"{stem}.cu:\n{log[-3000:]}"
        assert all((f, s) == ("0", "0") for name, f, s in frames if rotational not in name), sorted(set(frames))
        assert all(int(f) <= 32 and int(s) <= 32 for name, f, s in frames), sorted(set(frames))


def _kernel_name(entry: str) -> str:
    """A PTX entry's mangled name without its translation unit: nvcc names the anonymous namespace
    after the file (``43_GLOBAL__N__4de237a3_10_kernels_cu_55ff2810``, the length first), so that
    the same kernel built by two files reads the same."""
    m = re.search(r"(\d+)_GLOBAL__N_", entry)
    if m is None:
        return entry
    end = m.end(1) + int(m.group(1))
    return entry[:m.start()] + "_GLOBAL__N_" + entry[end:]


def _ptx_entries(out: Path, arch: int) -> dict[str, str]:
    ptx = [p for p in out.glob("*.ptx") if f"sm_{arch}" in p.name or f"compute_{arch}" in p.name]
    if len(ARCHS) == 1:  # nvcc names the PTX of a single architecture after the source alone
        ptx = list(out.glob("*.ptx"))
    assert len(ptx) == 1, [p.name for p in out.glob("*.ptx")]
    text = ptx[0].read_text()
    entries = {}
    for m in re.finditer(r"^(?:\.visible\s+)?\.entry\s+(\S+)\(", text, re.M):
        body = text[m.end(): text.index("\n}", m.end())]
        entries[_kernel_name(m.group(1))] = body
    return entries


def _all_ptx_entries(nvcc_build, arch: int) -> dict[str, str]:
    """The kernels of every file's PTX, each built by exactly one file: a kernel instantiated by
    two would cost nvcc twice and ship twice (anonymous namespaces do not clash)."""
    entries, built_by = {}, {}
    for stem, (result, out) in sorted(nvcc_build.items()):
        assert result.returncode == 0, f"{stem}.cu: " + (result.stdout + result.stderr)[-3000:]
        for name, body in _ptx_entries(out, arch).items():
            assert name not in built_by, f"{name} is built by both {built_by[name]}.cu and {stem}.cu"
            built_by[name] = stem
            entries[name] = body
    return entries


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_ptx_is_vectorized_and_exact(nvcc_build, arch):
    entries = _all_ptx_entries(nvcc_build, arch)
    updates = {k: v for k, v in entries.items() if "UpdateKernel" in k}
    # AdamW (4 dtypes x amsgrad), SGD (4 dtypes x 6 momentum/nesterov/decoupled cases), Lion (4 dtypes),
    # each once more with stochastic rounding for bf16 and fp16 (half the count), and the bf16
    # ones (a quarter) four times more with compensated parameters: 24 and 32 bits, with and
    # without stochastic rounding.
    kernels = (8 + 24 + 4) * 3 // 2 + (8 + 24 + 4) // 4 * 4
    assert len(updates) == kernels, sorted(updates)
    # 8-bit states (QuantizedKernel): AdamW (amsgrad or not), SGD with momentum (L2 or decoupled;
    # nesterov a run-time select), Lion, for fp32, fp16 (each to nearest and stochastic) and bf16
    # (the same, times plain, 24- and 32-bit masters); their measuring twins (TelemetryKernel with
    # QUANT, one for 4 and 8 columns) only where the parameter's rounding differs (not fp32's).
    quantized = 5 * (2 + 2 + 6)
    measuring = 5 * (1 + 2 + 6)
    # the rotational block phase (states-only Ops: AdamW, SGD, Lion) for fp32, fp16 and bf16, each
    # to nearest and stochastic
    rotation_states = 3 * 3 * 2
    assert sum("QuantizedKernel" in k for k in entries) == quantized + rotation_states
    assert sum("QuantizedKernel" in k and "States" in k for k in entries) == rotation_states
    # the monitored twins (TelemetryKernel: 4 columns, 8 with the direction statistics) and the
    # rotational row kernels (4 dtypes x 5 directions, bf16/fp16 x 5 with stochastic rounding, and
    # bf16 x 5 compensated: 24- and 32-bit masters, each to nearest and stochastic), and their 8-bit
    # twins (QUANT: the 4 directions with a state, for fp32, fp16 and bf16 as above)
    assert sum("TelemetryKernel" in k for k in entries) == 2 * kernels + measuring
    assert sum("RotationalRowKernel" in k for k in entries) == 4 * 5 + 2 * 5 + 4 * 5 + 4 * (1 + 2 + 6)
    assert sum("RotationPrologueKernel" in k for k in entries) == 2
    for name, body in entries.items():
        if "RotationalRowKernel" in name or "TelemetryKernel" in name or "QuantizedKernel" in name:
            assert not re.search(r"\b(div|sqrt|rcp)\.approx", body), f"{name}: approximate division or sqrt"
            assert not re.search(r"\bfma\.rn\.f(32|64)\b", body), f"{name}: contracted FMA"
            assert not re.search(r"\b(atom|red)\.(global|shared)", body), f"{name}: atomics (not deterministic)"
    assert sum("AdamWCoefficientKernel" in k for k in entries) == 2
    # A compensated kernel loads and stores its corrections as one vector (16 bytes of int16, 8 of
    # int8) beside each of the parameter's: one vector access more than its plain twin each way.
    compensated = [k for k in updates if re.search(r"UpdateKernelI13__nv_bfloat16Lb[01]ELi(24|32)E", k)]
    assert len(compensated) == (8 + 24 + 4) // 4 * 4, compensated
    vector_load, vector_store = r"ld\.global(?:\.nc)?\.v[24]\.", r"st\.global\.v[24]\."
    for name in compensated:
        twin = updates[re.sub(r"Li(24|32)E", "Li16E", name)]
        for access in (vector_load, vector_store):
            assert len(re.findall(access, updates[name])) == len(re.findall(access, twin)) + 1, (name, access)
    # The 8-bit kernels move parameters and gradients as 16-byte vectors and a thread's 8 codes of
    # each state as one 8-byte access (the rotational block phase stores no parameter).
    for name, body in entries.items():
        if "QuantizedKernel" in name:
            assert re.search(r"ld\.global(\.nc)?\.v2\.[bu]64", body), f"{name}: no 16-byte vector load"
            if "States" not in name:
                assert re.search(r"st\.global(\.wb)?\.v2\.[bu]64", body), f"{name}: no 16-byte vector store"
            assert re.search(r"ld\.global(\.nc)?\.[bu]64", body), f"{name}: no 8-byte code load"
            assert re.search(r"st\.global\.[bu]64", body), f"{name}: no 8-byte code store"
            assert not re.search(r"\b(div|sqrt)\.full", body), f"{name}: approximate division"
            assert ".local" not in body, f"{name}: local memory"
    for name, body in updates.items():
        assert re.search(r"ld\.global(\.nc)?\.v(4|2)\.", body), f"{name}: no 16-byte vector load"
        assert re.search(r"st\.global\.v(4|2)\.", body), f"{name}: no 16-byte vector store"
        assert not re.search(r"\b(div|sqrt|rcp)\.approx", body), f"{name}: approximate division or sqrt"
        assert not re.search(r"\b(div|sqrt)\.full", body), f"{name}: approximate division"
        assert not re.search(r"\bfma\.rn\.f(32|64)\b", body), f"{name}: contracted FMA (build with --fmad=false)"
        assert ".local" not in body, f"{name}: local memory"


# ------------------------------------------------------------------------------------ binding


@pytest.mark.slow
def test_binding_passes_the_host_compilers_syntax_check():
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    if not os.path.exists(os.path.join(torch_includes[0], "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch has no c10/cuda headers")
    nvcc = shutil.which("nvcc")
    cuda_includes = _cuda_includes(nvcc) if nvcc else []
    cuda_includes += [d for d in ("/usr/local/cuda/include",) if os.path.isdir(d)]
    if not any(os.path.exists(os.path.join(d, "cuda_runtime.h")) for d in cuda_includes):
        if IN_CI:
            pytest.fail("cuda_runtime.h not found: CI must check csrc/cuda/binding.cpp")
        pytest.skip("cuda_runtime.h not found")
    # CPU wheels ship c10/cuda headers without their generated cuda_cmake_macros.h; the macro
    # below is torch's own switch for building without it.
    cmd = [compiler, "-fsyntax-only", CXX_STD, "-Wall", "-Wextra", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for d in torch_includes + cuda_includes:
        cmd += ["-isystem", d]
    result = _run(cmd + [str(BINDING)], cwd=ROOT, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "warning" not in log.lower(), log[-6000:]


# ------------------------------------------------------------------------------------ host emulation

# The C interface over the emulated engine (built by the host compiler in the ``emu`` fixture).
SHIM = Path(__file__).with_name("cuda_emulation.cpp")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The .cu files in host-emulation mode, built by the host compiler into a shared library."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    nvcc = shutil.which("nvcc")
    includes = (_cuda_includes(nvcc) if nvcc else []) + ["/usr/local/cuda/include"]
    includes = [d for d in includes if os.path.exists(os.path.join(d, "cuda_fp16.h"))]
    if not includes:
        if IN_CI:
            pytest.fail("CUDA headers (cuda_fp16.h) not found: CI must run the CUDA engine's host emulation")
        pytest.skip("CUDA headers (cuda_fp16.h) not found")
    out = tmp_path_factory.mktemp("emu")
    (out / "shim.cpp").write_text(SHIM.read_text())
    # No FMA contraction, as the device build (--fmad=false) and the reference. No strict aliasing:
    # the row kernels read the shared reduction slots as M or as double, phase by phase.
    # -O0: the emulated kernels run small tensors. Measured (2026-11-28, AMD EPYC, with the 8-bit
    # kernels): -O1 builds in 60 s of CPU and runs the emulated tests in 24 s, -O0 in 25 s and 34 s.
    flags = [CXX_STD, "-O0", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-Wall", "-Wextra",
             "-DWDOPT_HOST_EMULATION=1", f"-I{CUDA_DIR}", *[f"-isystem{d}" for d in includes]]
    # Each file its own object, linked together, as the extension's build does: a file that leans on
    # another's includes, or state of which each file would hold its own copy (the launch counter),
    # fails here.
    units = [*SOURCES, out / "shim.cpp"]

    def compile_one(source: Path):
        # About 35 s of CPU for all on an idle machine (27 s as one file, before the split; 2026-11-28,
        # AMD EPYC); as for nvcc, the limit only guards against a hang, with room for a busy machine.
        return _run([compiler, *flags, "-x", "c++", "-c", str(source), "-o", str(out / f"{source.stem}.o")], cwd=out,
                    timeout=600)

    results = _in_parallel(compile_one, units)
    results.append(_run([compiler, "-shared", *[str(out / f"{u.stem}.o") for u in units], "-o", str(out / "emu.so")],
                        cwd=out, timeout=120))
    for unit, result in zip([*units, Path("emu.so")], results):
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"{unit.name}:\n{log[-6000:]}"
        assert "warning" not in log.lower(), f"{unit.name}:\n{log[-6000:]}"
    lib = ctypes.CDLL(str(out / "emu.so"))
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    grad_args = [P, I, P, I, P, I]  # lr_tensor, grad_scale, found_inf: (pointer, is_double)
    lib.emu_adamw.argtypes = [I, I64, P, P, P, P, P, P, P, P, I, I] + grad_args + [P]
    lib.emu_sgd.argtypes = [I, I64, P, P, P, P, P, P, I, I, I] + grad_args
    lib.emu_lion.argtypes = [I, I64, P, P, P, P, P, I] + grad_args
    lib.emu_scratch_bytes.argtypes = [I64]
    lib.emu_set_telemetry.argtypes = [P, P]
    lib.emu_set_telemetry.restype = None
    lib.emu_set_telemetry_columns.argtypes = [I]
    lib.emu_set_telemetry_columns.restype = None
    lib.emu_rotational.argtypes = [I, I, I64, P, P, P, P, P, P, P, P, P, P, P, P, I, I, I, I] + grad_args[2:] + [P, I64]
    lib.emu_rotational_scratch_bytes.argtypes = [I64]
    lib.emu_set_rate.argtypes = [P, I]
    lib.emu_set_rate.restype = None
    lib.emu_table_capacity.argtypes = [I]
    lib.emu_rounding_table_capacity.argtypes = [I]
    lib.emu_set_rng.argtypes = [P]
    lib.emu_set_rng.restype = None
    lib.emu_set_corrections.argtypes = [P, I]
    lib.emu_set_corrections.restype = None
    lib.emu_compensated_table_capacity.argtypes = [I, I]
    lib.emu_set_scales.argtypes = [P]
    lib.emu_set_scales.restype = None
    lib.emu_quantized_table_capacity.argtypes = [I, I]
    for name in ("emu_scratch_bytes", "emu_launches", "emu_rotational_scratch_bytes"):
        getattr(lib, name).restype = I64
    return lib


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# Sizes around the vector width (16 bytes), the block's vector sweep (256 threads) and the chunk
# (64 KiB per stream: 16384 fp32 elements), plus an empty tensor.
SIZES = [0, 1, 3, 8, 17, 255, 1031, 16384, 16384 * 2 + 5, 70001]
MISALIGNED = {2, 6}  # these tensors are views 1 element into their storage: scalar path


def _tensors(dtype, seed, sizes=SIZES, misaligned=MISALIGNED, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        off = 1 if i in misaligned else 0
        t = torch.randn(n + off, generator=g, dtype=torch.float64) * scale
        if positive:
            t = t.abs()
        out.append(t.to(dtype)[off:])
    return out


def _ptrs(ts, ctype=ctypes.c_void_p):
    return (ctype * len(ts))(*[t.data_ptr() for t in ts]) if ts else None


def _first_step_flags(first):
    """SGD's first-step flags as the kernels take them (FirstStepFlag): a pointer per tensor to a
    float32 flag, 1 for a fresh buffer; a buffer with history gets a null pointer or a zero flag."""
    flags = [torch.ones(()) if f else (torch.zeros(()) if i % 4 == 1 else None) for i, f in enumerate(first)]
    return (ctypes.c_void_p * len(flags))(*[f.data_ptr() if f is not None else None for f in flags]), flags


def _numels(ts):
    return (ctypes.c_int64 * len(ts))(*[t.numel() for t in ts])


def _scalar(t):
    return (None, 0) if t is None else (t.data_ptr(), int(t.dtype == torch.float64))


def _assert_identical(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        same = torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
        if not same:
            diff = (a.double() - b.double()).abs()
            k = int(diff.nan_to_num(float("inf")).argmax())
            pytest.fail(f"{what}[{i}] (numel {a.numel()}) differs: {int((a != b).sum())} elements, "
                        f"first worst at {k}: {a[k].item()!r} vs {b[k].item()!r}")


def _clone(ts):
    return [t.clone() for t in ts]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad,maximize,scaled,lr_tensor", [
    (False, False, False, None), (True, True, True, torch.float32), (True, False, False, torch.float64)])
def test_emulated_adamw_matches_reference(emu, dtype, amsgrad, maximize, scaled, lr_tensor):
    n = len(SIZES)
    params = _tensors(dtype, 0)
    grads = _tensors(dtype, 1, scale=100.0 if scaled else 1.0)
    exp_avgs = _tensors(dtype, 2, scale=0.1)
    exp_avg_sqs = _tensors(dtype, 3, scale=0.01, positive=True)
    max_sqs = _tensors(dtype, 4, scale=0.01, positive=True) if amsgrad else []
    steps = [torch.tensor(float(i % 3), dtype=torch.float32) for i in range(n)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0)
    grad_scale = torch.tensor(768.0) if scaled else None  # not a power of two: x·(1/s) ≠ x/s
    found_inf = torch.tensor(0.0) if scaled else None
    lr_t = torch.tensor(hyper["lr"], dtype=lr_tensor) if lr_tensor is not None else None

    want = [_clone(x) for x in (params, exp_avgs, exp_avg_sqs, max_sqs, steps)]
    reference.adamw(want[0], grads, want[1], want[2], want[3] if amsgrad else [None] * n, want[4],
                    **{**hyper, "lr": lr_t if lr_t is not None else hyper["lr"]}, amsgrad=amsgrad,
                    maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)

    scratch = torch.empty(emu.emu_scratch_bytes(n), dtype=torch.uint8)
    before = emu.emu_launches()
    err = emu.emu_adamw(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs),
                        _ptrs(exp_avg_sqs), _ptrs(max_sqs), _ptrs(steps),
                        (ctypes.c_double * 6)(*hyper.values()), amsgrad, maximize, *_scalar(lr_t),
                        *_scalar(grad_scale), *_scalar(found_inf), scratch.data_ptr())
    assert err == 0
    assert emu.emu_launches() - before == 2  # coefficients, then one update launch
    for got, exp, what in zip((params, exp_avgs, exp_avg_sqs, max_sqs, steps), want,
                              ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")):
        _assert_identical(got, exp, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum,nesterov,decoupled,weight_decay", [
    (0.0, False, False, 0.0), (0.0, False, True, 0.1), (0.9, False, False, 0.1), (0.9, True, False, 0.0),
    (0.9, True, True, 0.1)])
def test_emulated_sgd_matches_reference(emu, dtype, momentum, nesterov, decoupled, weight_decay):
    n = len(SIZES)
    params = _tensors(dtype, 0)
    grads = _tensors(dtype, 1)
    buffers = _tensors(dtype, 2) if momentum else []
    first = [i % 2 == 0 for i in range(n)]
    hyper = dict(lr=0.05, weight_decay=weight_decay, momentum=momentum, dampening=0.0 if nesterov else 0.1,
                 decay_lr_scale=1.0)
    lr_t = torch.tensor(hyper["lr"]) if momentum else None
    want_p, want_b = _clone(params), _clone(buffers)
    reference.sgd(want_p, grads, want_b if momentum else [None] * n, first,
                  **{**hyper, "lr": lr_t if lr_t is not None else hyper["lr"]}, nesterov=nesterov,
                  decoupled_weight_decay=decoupled, maximize=not momentum)
    first_ptrs, _keep = _first_step_flags(first)
    err = emu.emu_sgd(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(buffers),
                      first_ptrs, (ctypes.c_double * 5)(*hyper.values()), nesterov, decoupled,
                      not momentum, *_scalar(lr_t), None, 0, None, 0)
    assert err == 0
    _assert_identical(params, want_p, "params")
    _assert_identical(buffers, want_b, "momentum_buffers")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_lion_matches_reference(emu, dtype):
    n = len(SIZES)
    params, grads, exp_avgs = _tensors(dtype, 0), _tensors(dtype, 1), _tensors(dtype, 2, scale=0.1)
    exp_avgs[3][0] = 0.0  # sign(0) = 0 with a zero gradient
    grads[3][0] = 0.0
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.5, decay_lr_scale=0.25)
    grad_scale = torch.tensor(3.0, dtype=torch.float64)
    want_p, want_m = _clone(params), _clone(exp_avgs)
    reference.lion(want_p, grads, want_m, **hyper, maximize=True, grad_scale=grad_scale)
    err = emu.emu_lion(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs),
                       (ctypes.c_double * 5)(*hyper.values()), True, None, 0, *_scalar(grad_scale), None, 0)
    assert err == 0
    _assert_identical(params, want_p, "params")
    _assert_identical(exp_avgs, want_m, "exp_avgs")


def test_emulated_found_inf_writes_nothing(emu):
    n = len(SIZES)
    params, grads = _tensors(torch.float32, 0), _tensors(torch.float32, 1)
    exp_avgs, exp_avg_sqs = _tensors(torch.float32, 2), _tensors(torch.float32, 3, positive=True)
    steps = [torch.tensor(5.0) for _ in range(n)]
    before = [_clone(x) for x in (params, exp_avgs, exp_avg_sqs, steps)]
    scratch = torch.empty(emu.emu_scratch_bytes(n), dtype=torch.uint8)
    found_inf, grad_scale = torch.tensor(1.0), torch.tensor(65536.0)
    err = emu.emu_adamw(0, n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
                        None, _ptrs(steps), (ctypes.c_double * 6)(1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0), False, False,
                        None, 0, *_scalar(grad_scale), *_scalar(found_inf), scratch.data_ptr())
    assert err == 0
    for got, exp, what in zip((params, exp_avgs, exp_avg_sqs, steps), before, ("params", "m", "v", "steps")):
        _assert_identical(got, exp, what)
    buffers = _tensors(torch.float32, 4)
    before = [_clone(x) for x in (params, buffers)]
    err = emu.emu_sgd(0, n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(buffers),
                      (ctypes.c_uint8 * n)(*[1] * n), (ctypes.c_double * 5)(0.1, 0.0, 0.9, 0.0, 1.0), False, False,
                      False, None, 0, *_scalar(grad_scale), *_scalar(found_inf))
    assert err == 0
    _assert_identical(params, before[0], "params")
    _assert_identical(buffers, before[1], "momentum_buffers")


def test_emulated_tables_split_into_several_launches(emu):
    """More tensors than one kernel-argument table holds: several update launches (and, past the
    step table's capacity, several coefficient launches), every tensor still updated once."""
    cap4, cap_steps = emu.emu_table_capacity(4), emu.emu_step_capacity()
    assert 300 < cap4 < cap_steps  # 32 KB kernel arguments (CUDA >= 12.1)
    n = cap_steps + 5
    sizes = [i % 7 for i in range(n)]  # includes empty tensors, which still advance their step
    params = _tensors(torch.float32, 0, sizes, set())
    grads = _tensors(torch.float32, 1, sizes, set())
    exp_avgs = _tensors(torch.float32, 2, sizes, set())
    exp_avg_sqs = _tensors(torch.float32, 3, sizes, set(), positive=True)
    steps = [torch.tensor(float(i % 4)) for i in range(n)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decay_lr_scale=1.0)
    want = [_clone(x) for x in (params, exp_avgs, exp_avg_sqs, steps)]
    reference.adamw(want[0], grads, want[1], want[2], [None] * n, want[3], **hyper, amsgrad=False, maximize=False)
    scratch = torch.empty(emu.emu_scratch_bytes(n), dtype=torch.uint8)
    before = emu.emu_launches()
    err = emu.emu_adamw(0, n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
                        None, _ptrs(steps), (ctypes.c_double * 6)(*hyper.values()), False, False, None, 0, None, 0,
                        None, 0, scratch.data_ptr())
    assert err == 0
    assert emu.emu_launches() - before == -(-n // cap_steps) + -(-n // cap4)
    for got, exp, what in zip((params, exp_avgs, exp_avg_sqs, steps), want, ("params", "m", "v", "steps")):
        _assert_identical(got, exp, what)


# ------------------------------------------------------------------------------------ telemetry


def _rows_of(n: int) -> int:
    """A row count dividing n: several rows of several elements where n allows."""
    for k in (64, 17, 7, 5, 4, 3):
        if n % k == 0 and n // k >= 1:
            return k
    return 1


def _telemetry(emu, params, rows, columns=4):
    bufs = [torch.full((k, columns), float("nan"), dtype=torch.float64) for k in rows]
    keep = (_ptrs(bufs), (ctypes.c_int64 * len(rows))(*rows))
    emu.emu_set_telemetry(*keep)
    emu.emu_set_telemetry_columns(columns)
    return bufs, keep


def _assert_telemetry(bufs, before, after, grads, rows, grad_scale=None):
    for i, (buf, b, a, g, k) in enumerate(zip(bufs, before, after, grads, rows)):
        want = reference_telemetry.row_sums(b, a, g, k, grad_scale)
        torch.testing.assert_close(buf[:, :4], want, rtol=1e-12, atol=1e-300, msg=lambda m: f"telemetry[{i}]: {m}")


def _assert_statistics(bufs, before, directions, rows):
    """Columns 4-7 against the specification's direction sums of (n, s) in float64; the kernels
    form n and s in the math dtype (fp32 for fp32/bf16/fp16), then sum in double."""
    for i, (buf, b, (n, s), k) in enumerate(zip(bufs, before, directions, rows)):
        want = reference_telemetry.direction_sums(b, n, s, k)
        w, n, s = b.double().reshape(k, -1), n.reshape(k, -1), s.reshape(k, -1)
        magnitude = torch.stack([(n * n).sum(1), (n * s).abs().sum(1), (w * n).abs().sum(1), (s * s).sum(1)], 1)
        rtol = 1e-12 if b.dtype == torch.float64 else 1e-5
        assert ((buf[:, 4:] - want).abs() <= rtol * magnitude + 1e-300).all(), (i, buf[:, 4:], want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("columns", [4, 8])
def test_emulated_telemetry_kernels_update_identically_and_sum_rows(emu, dtype, name, columns):
    """The monitored kernels: parameters and state bit-identical to the reference (as the plain
    kernels), and each telemetry row the row sums of the specification (8 columns: and the
    direction statistics); same launch count."""
    n = len(SIZES)
    params, grads = _tensors(dtype, 0), _tensors(dtype, 1, scale=50.0)
    rows = [_rows_of(t.numel()) for t in params]
    before = _clone(params)
    grad_scale = torch.tensor(768.0)
    launches = emu.emu_launches()
    bufs, keep = _telemetry(emu, params, rows, columns)
    unscaled = [g.double() / 768.0 for g in grads]
    try:
        if name == "adamw":
            m, v = _tensors(dtype, 2, scale=0.1), _tensors(dtype, 3, scale=0.01, positive=True)
            steps = [torch.tensor(float(i % 3)) for i in range(n)]
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0)
            directions = [tuple(t.clone() for t in reference_telemetry.direction(
                "adamw", {"betas": (0.9, 0.99), "eps": 1e-8, "maximize": True},
                g, {"step": st, "exp_avg": mi, "exp_avg_sq": vi}, grad_scale)) for g, st, mi, vi in zip(grads, steps, m, v)]
            want = [_clone(x) for x in (params, m, v, steps)]
            reference.adamw(want[0], grads, want[1], want[2], [None] * n, want[3], **hyper, amsgrad=False,
                            maximize=True, grad_scale=grad_scale)
            scratch = torch.empty(emu.emu_scratch_bytes(n), dtype=torch.uint8)
            err = emu.emu_adamw(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(m),
                                _ptrs(v), None, _ptrs(steps), (ctypes.c_double * 6)(*hyper.values()), False, True,
                                None, 0, *_scalar(grad_scale), None, 0, scratch.data_ptr())
            got, expected = (params, m, v, steps), want
            assert emu.emu_launches() - launches == 2
        elif name == "sgd":
            b = _tensors(dtype, 2)
            first = [i % 2 == 0 for i in range(n)]
            # A buffer without history (first) has no momentum: s = 0.
            directions = [(g, torch.zeros_like(g) if f else bi.double().clone()) for g, f, bi in zip(unscaled, first, b)]
            hyper = dict(lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.1, decay_lr_scale=1.0)
            want = [_clone(params), _clone(b)]
            reference.sgd(want[0], grads, want[1], first, **hyper, nesterov=False, decoupled_weight_decay=False,
                          maximize=False, grad_scale=grad_scale)
            first_ptrs, _keep = _first_step_flags(first)
            err = emu.emu_sgd(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(b),
                              first_ptrs, (ctypes.c_double * 5)(*hyper.values()), False, False,
                              False, None, 0, *_scalar(grad_scale), None, 0)
            got, expected = (params, b), want
            assert emu.emu_launches() - launches == 1
        else:
            m = _tensors(dtype, 2, scale=0.1)
            hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.5, decay_lr_scale=0.25)
            # (n, s) copied now: s is the fp64 state itself, which the kernel overwrites.
            directions = [tuple(t.clone() for t in reference_telemetry.direction(
                "lion", {"betas": (0.9, 0.99), "maximize": True}, g, {"exp_avg": mi}, grad_scale)) for g, mi in zip(grads, m)]
            want = [_clone(params), _clone(m)]
            reference.lion(want[0], grads, want[1], **hyper, maximize=True, grad_scale=grad_scale)
            err = emu.emu_lion(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(m),
                               (ctypes.c_double * 5)(*hyper.values()), True, None, 0, *_scalar(grad_scale), None, 0)
            got, expected = (params, m), want
            assert emu.emu_launches() - launches == 1
    finally:
        emu.emu_set_telemetry(None, None)
        emu.emu_set_telemetry_columns(4)
    assert err == 0
    for i, (a, b) in enumerate(zip(got, expected)):
        _assert_identical(a, b, f"{name} tensor list {i}")
    _assert_telemetry(bufs, before, params, grads, rows, grad_scale)
    if columns == 8:
        _assert_statistics(bufs, before, directions, rows)


def test_emulated_telemetry_not_written_when_found_inf(emu):
    n = len(SIZES)
    params, grads, m = _tensors(torch.float32, 0), _tensors(torch.float32, 1), _tensors(torch.float32, 2)
    rows = [_rows_of(t.numel()) for t in params]
    before = _clone(params)
    bufs, keep = _telemetry(emu, params, rows)
    try:
        err = emu.emu_lion(0, n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(m),
                           (ctypes.c_double * 5)(1e-3, 0.9, 0.99, 0.1, 1.0), False, None, 0, None, 0,
                           *_scalar(torch.tensor(1.0)), )
    finally:
        emu.emu_set_telemetry(None, None)
    assert err == 0
    _assert_identical(params, before, "params")
    assert all(bool(b.isnan().all()) for b in bufs)


# ------------------------------------------------------------------------------------ stochastic rounding

# bf16/fp16 chunks are 32768 elements: odd sizes, and tensors of two and three chunks, whose bits
# are those of the element's offset in the tensor (a chunk-relative index would repeat the first
# chunk's bits); 32773 is misaligned (the scalar path across chunks); monitored, 65535 is 17 rows
# of 3855 elements, 65537 (prime) one row.
SR_SIZES = [0, 1, 3, 17, 255, 1031, 32773, 65535, 65537]
SR_MISALIGNED = {2, 6}
SR_CHUNK = 32768
# Every launcher with its stored streams (AdamW: 3 lanes, 4 with amsgrad), GradScaler and maximize.
SR_CASES = {
    "adamw": dict(hyper=dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_lr_scale=1.0),
                  amsgrad=False, maximize=False, grad_scale=None),
    "adamw_amsgrad": dict(hyper=dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_lr_scale=0.5),
                          amsgrad=True, maximize=True, grad_scale=768.0),
    "sgd": dict(hyper=dict(lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.1, decay_lr_scale=1.0),
                nesterov=False, decoupled=False, maximize=False, grad_scale=768.0),
    "sgd_nesterov": dict(hyper=dict(lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.0, decay_lr_scale=1.0),
                         nesterov=True, decoupled=True, maximize=False, grad_scale=None),
    "sgd_no_momentum": dict(hyper=dict(lr=0.05, weight_decay=0.1, momentum=0.0, dampening=0.0, decay_lr_scale=1.0),
                            nesterov=False, decoupled=False, maximize=True, grad_scale=None),
    "lion": dict(hyper=dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.5, decay_lr_scale=0.25),
                 maximize=True, grad_scale=3.0),
}


def _rng_states(n, seed=7):
    """[key, count, index base] per tensor, as the optimizer keeps them: distinct keys and counts,
    one count past 2^32 (its high word enters the hash), and index bases (a shard's: every other
    tensor draws the bits of elements 1000 + i)."""
    return [torch.tensor([rounding.parameter_key(seed, i), 3 * i + (2**32 + 1 if i == 4 else 0), 1000 * (i % 2)],
                         dtype=torch.int64) for i in range(n)]


def _sr_problem(case, dtype, sizes=SR_SIZES, misaligned=SR_MISALIGNED):
    """Fresh tensors of one SR_CASES case: what the emulation and the reference both update."""
    n = len(sizes)
    st = {"params": _tensors(dtype, 0, sizes, misaligned)}
    if case.startswith("adamw"):
        st["m"] = _tensors(dtype, 2, sizes, misaligned, scale=0.1)
        st["v"] = _tensors(dtype, 3, sizes, misaligned, scale=0.01, positive=True)
        st["vmax"] = _tensors(dtype, 4, sizes, misaligned, scale=0.01, positive=True) if "amsgrad" in case else []
        st["steps"] = [torch.tensor(float(i % 3)) for i in range(n)]
    elif case.startswith("sgd"):
        st["b"] = _tensors(dtype, 2, sizes, misaligned) if SR_CASES[case]["hyper"]["momentum"] else []
        st["first"] = [i % 2 == 0 for i in range(n)]
    else:
        st["m"] = _tensors(dtype, 2, sizes, misaligned, scale=0.1)
    return st


def _sr_stored(case, st):
    """The tensor lists a step writes, in lane order (parameter first)."""
    if case.startswith("adamw"):
        return [st["params"], st["m"], st["v"], st["vmax"], st["steps"]]
    if case.startswith("sgd"):
        return [st["params"], st["b"]]
    return [st["params"], st["m"]]


def _sr_reference(case, st, grads, rng, correction=(), scales=None, found_inf=None):
    """``scales``: {lane: block scales per parameter} of 8-bit states (the state lists hold codes)."""
    c = SR_CASES[case]
    n = len(st["params"])
    gs = None if c["grad_scale"] is None else torch.tensor(c["grad_scale"])
    if case.startswith("adamw"):
        reference.adamw(st["params"], grads, st["m"], st["v"], st["vmax"] if c["amsgrad"] else [None] * n, st["steps"],
                        **c["hyper"], amsgrad=c["amsgrad"], maximize=c["maximize"], grad_scale=gs, rng=rng,
                        correction=correction, scales=scales, found_inf=found_inf)
    elif case.startswith("sgd"):
        momentum = c["hyper"]["momentum"]
        reference.sgd(st["params"], grads, st["b"] if momentum else [None] * n, st["first"], **c["hyper"],
                      nesterov=c["nesterov"], decoupled_weight_decay=c["decoupled"], maximize=c["maximize"],
                      grad_scale=gs, rng=rng, correction=correction, scales=scales, found_inf=found_inf)
        if found_inf is None or not found_inf.item():
            st["first"] = [False] * n
    else:
        reference.lion(st["params"], grads, st["m"], **c["hyper"], maximize=c["maximize"], grad_scale=gs, rng=rng,
                       correction=correction, scales=scales, found_inf=found_inf)


def _sr_emulated(emu, case, dtype, st, grads, rng, correction=None, master_bits=32, scales=None, found_inf=None):
    """One emulated call of ``case`` with stochastic rounding (``rng``; None: to nearest) and
    compensated parameters (``correction``: their int16 or int8 corrections; None: plain), 8-bit
    states (``scales``: as _sr_reference's) and GradScaler's ``found_inf``."""
    c = SR_CASES[case]
    n = len(st["params"])
    grad_scale = None if c["grad_scale"] is None else torch.tensor(c["grad_scale"])  # alive through the call
    gs = _scalar(grad_scale)
    fi = _scalar(found_inf)
    rng_ptrs = _ptrs(rng) if rng is not None else None
    correction_ptrs = _ptrs(correction) if correction is not None else None
    scale_ptrs = _ptrs([t for lane in sorted(scales) for t in scales[lane]]) if scales else None
    emu.emu_set_rng(rng_ptrs)
    emu.emu_set_corrections(correction_ptrs, master_bits)
    emu.emu_set_scales(scale_ptrs)
    try:
        if case.startswith("adamw"):
            scratch = torch.empty(emu.emu_scratch_bytes(n), dtype=torch.uint8)
            err = emu.emu_adamw(DTYPE_CODES[dtype], n, _numels(st["params"]), _ptrs(st["params"]), _ptrs(grads),
                                _ptrs(st["m"]), _ptrs(st["v"]), _ptrs(st["vmax"]), _ptrs(st["steps"]),
                                (ctypes.c_double * 6)(*c["hyper"].values()), c["amsgrad"], c["maximize"], None, 0,
                                *gs, *fi, scratch.data_ptr())
        elif case.startswith("sgd"):
            first_ptrs, _keep = _first_step_flags(st["first"])
            err = emu.emu_sgd(DTYPE_CODES[dtype], n, _numels(st["params"]), _ptrs(st["params"]), _ptrs(grads),
                              _ptrs(st["b"]), first_ptrs, (ctypes.c_double * 5)(*c["hyper"].values()), c["nesterov"],
                              c["decoupled"], c["maximize"], None, 0, *gs, *fi)
            if found_inf is None or not found_inf.item():
                st["first"] = [False] * n
        else:
            err = emu.emu_lion(DTYPE_CODES[dtype], n, _numels(st["params"]), _ptrs(st["params"]), _ptrs(grads),
                               _ptrs(st["m"]), (ctypes.c_double * 5)(*c["hyper"].values()), c["maximize"], None, 0,
                               *gs, *fi)
    finally:
        emu.emu_set_rng(None)
        emu.emu_set_corrections(None, 32)
        emu.emu_set_scales(None)
    assert err == 0


@pytest.mark.parametrize("columns", [0, 4, 8], ids=["plain", "monitored4", "monitored8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(SR_CASES))
def test_emulated_stochastic_rounding_matches_reference(emu, case, dtype, columns):
    """Every launcher with rng, plain and monitored (the row kernels, 4 and 8 columns): parameters
    and state bit for bit the reference's stochastic rounding, over two steps with the counts
    advanced in place between them (as the driver does, after the kernel: a kernel must read them
    on the device); monitored, the telemetry sums the stochastically rounded parameter."""
    n = len(SR_SIZES)
    got, want = _sr_problem(case, dtype), _sr_problem(case, dtype)
    rng = _rng_states(n)
    gen = torch.Generator().manual_seed(1)
    grad_scale = SR_CASES[case]["grad_scale"]
    for step in range(2):
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (grad_scale or 1.0)).to(dtype)
                 for p in want["params"]]
        _sr_reference(case, want, grads, rng)
        before = _clone(got["params"])
        rows = [_rows_of(p.numel()) for p in got["params"]]
        if columns:
            bufs, keep = _telemetry(emu, got["params"], rows, columns)
        launches = emu.emu_launches()
        try:
            _sr_emulated(emu, case, dtype, got, grads, rng)
        finally:
            emu.emu_set_telemetry(None, None)
            emu.emu_set_telemetry_columns(4)
        assert emu.emu_launches() - launches == (2 if case.startswith("adamw") else 1)
        for i, (a, b) in enumerate(zip(_sr_stored(case, got), _sr_stored(case, want))):
            _assert_identical(a, b, f"{case} step {step} lane {i}")
        if columns:
            _assert_telemetry(bufs, before, got["params"], grads, rows,
                              None if grad_scale is None else torch.tensor(grad_scale))
        for r in rng:
            r[1] += 1


def test_emulated_stochastic_rounding_check_catches_wrong_bits(emu, monkeypatch):
    """The comparison above can fail: a kernel that hashed a chunk-relative index, or stored a
    state tensor with another lane's bits, or rounded to nearest, would not have matched (the
    reference computed that way differs from the kernel's result)."""
    sizes = [65537]  # three chunks
    rng = _rng_states(1)
    grads = _tensors(torch.bfloat16, 1, sizes, set())
    got = _sr_problem("adamw", torch.bfloat16, sizes, set())
    _sr_emulated(emu, "adamw", torch.bfloat16, got, grads, rng)
    stored = _sr_stored("adamw", got)

    def reference_with(rng_arg=rng, **patches):
        with monkeypatch.context() as m:
            for name, f in patches.items():
                m.setattr(rounding, name, f)
            want = _sr_problem("adamw", torch.bfloat16, sizes, set())
            _sr_reference("adamw", want, grads, rng_arg)
        return _sr_stored("adamw", want)

    same = [torch.equal(a[0], b[0]) if a else True for a, b in zip(stored, reference_with())]
    assert all(same), same
    index, stream = rounding.element_index, rounding.stream
    chunk_relative = reference_with(element_index=lambda t: index(t) % SR_CHUNK)
    assert torch.equal(stored[0][0][:SR_CHUNK], chunk_relative[0][0][:SR_CHUNK])  # the first chunk agrees
    assert not torch.equal(stored[0][0][SR_CHUNK:], chunk_relative[0][0][SR_CHUNK:])
    swapped = reference_with(stream=lambda key, count, lane: stream(key, count, {1: 2, 2: 1}.get(lane, lane)))
    assert torch.equal(stored[0][0], swapped[0][0])
    assert not torch.equal(stored[1][0], swapped[1][0]) and not torch.equal(stored[2][0], swapped[2][0])
    nearest = reference_with(rng_arg=[])
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(stored[:3], nearest[:3]))


def test_emulated_stochastic_rounding_across_table_launches(emu):
    """More tensors than one stochastic-rounding table holds (its rng column costs capacity, the
    round-to-nearest tables keep theirs): several launches, each tensor with its own [key, count]."""
    cap_sr, cap = emu.emu_rounding_table_capacity(3), emu.emu_table_capacity(3)
    assert 300 < cap_sr < cap
    n = cap_sr + 5
    sizes = [1 + i % 7 for i in range(n)]
    got, want = _sr_problem("lion", torch.bfloat16, sizes, set()), _sr_problem("lion", torch.bfloat16, sizes, set())
    grads = _tensors(torch.bfloat16, 1, sizes, set())
    rng = _rng_states(n)
    _sr_reference("lion", want, grads, rng)
    launches = emu.emu_launches()
    _sr_emulated(emu, "lion", torch.bfloat16, got, grads, rng)
    assert emu.emu_launches() - launches == 2
    for i, (a, b) in enumerate(zip(_sr_stored("lion", got), _sr_stored("lion", want))):
        _assert_identical(a, b, f"lane {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_rng_leaves_float32_and_float64_rounded_to_nearest(emu, dtype):
    """rng with a float32/float64 call: to nearest, as the reference (and the CPU kernels) do."""
    n = len(SR_SIZES)
    got, want = _sr_problem("adamw_amsgrad", dtype), _sr_problem("adamw_amsgrad", dtype)
    grads = _tensors(dtype, 1, SR_SIZES, SR_MISALIGNED, scale=768.0)
    _sr_reference("adamw_amsgrad", want, grads, [])
    _sr_emulated(emu, "adamw_amsgrad", dtype, got, grads, _rng_states(n))
    for i, (a, b) in enumerate(zip(_sr_stored("adamw_amsgrad", got), _sr_stored("adamw_amsgrad", want))):
        _assert_identical(a, b, f"lane {i}")


# ------------------------------------------------------------------------------------ compensated bf16

# Compensated bf16 parameters (a correction per parameter: int16 for a 32-bit master weight, int8
# for a 24-bit one). Sizes: the empty tensor, tails, a tensor with special master weights, 65537
# (three chunks: a 24-bit master's rounding bits are those of the offset in the tensor), 32773 all
# misaligned (the scalar path across chunks), and two whose parameter is aligned but whose
# correction starts 4 elements in (misaligned for either width: the scalar path) or 8 (16 bytes of
# int16, 8 of int8: the vector path, on a correction that is not 16-byte aligned when int8).
CP_SIZES = [0, 1, 17, 1031, 4099, 8200, 32773, 65537]
CP_MISALIGNED = {6}  # parameter and state 1 element in (its correction too: CP_CORRECTION_OFFSET)
CP_CORRECTION_OFFSET = {4: 4, 5: 8, 6: 1}
CP_SPECIAL = 3  # master weights: ±inf, NaN, −0, a subnormal, fp32 values above bf16's largest finite
CORRECTION = {32: torch.int16, 24: torch.int8}


def _at_offset(t, offset):
    """A copy of ``t`` ``offset`` elements into its storage."""
    out = torch.empty(t.numel() + offset, dtype=t.dtype)[offset:]
    return out.copy_(t)


def _cp_problem(case, bits, sizes=CP_SIZES, misaligned=CP_MISALIGNED, offsets=CP_CORRECTION_OFFSET, special=None):
    """An SR_CASES problem in bf16 whose parameters are compensated: fp32 master weights split
    into the parameters (where _sr_problem lays them out) and their corrections (``offsets``)."""
    st = _sr_problem(case, torch.bfloat16, sizes, misaligned)
    gen = torch.Generator().manual_seed(3)
    st["c"] = []
    for i, n in enumerate(sizes):
        w = torch.randn(n, generator=gen)
        if i == special:
            w[:7] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40, 3.3961e38, -3.3962e38])
        p, c = rounding.split(w, CORRECTION[bits])
        st["params"][i].copy_(p)
        st["c"].append(_at_offset(c, offsets.get(i, 0)))
    return st


def _cp_stored(case, st):
    """Every tensor a compensated step writes: the parameters, their corrections, then the state."""
    return [st["params"], st["c"]] + _sr_stored(case, st)[1:]


def _masters(st):
    return [rounding.combine(p, c) for p, c in zip(st["params"], st["c"])]


def _cp_directions(case, st, grads):
    """The reference's (n, s) of every tensor before the step (the 8-column statistics)."""
    c = SR_CASES[case]
    gs = None if c["grad_scale"] is None else torch.tensor(c["grad_scale"])
    out = []
    for i, g in enumerate(grads):
        if case.startswith("adamw"):
            group = {"betas": (c["hyper"]["beta1"], c["hyper"]["beta2"]), "eps": c["hyper"]["eps"],
                     "maximize": c["maximize"], "amsgrad": c["amsgrad"]}
            state = {"step": st["steps"][i], "exp_avg": st["m"][i], "exp_avg_sq": st["v"][i]}
            if c["amsgrad"]:
                state["max_exp_avg_sq"] = st["vmax"][i]
            kind = "adamw"
        elif case.startswith("sgd"):
            group, kind = {"maximize": c["maximize"]}, "sgd"
            state = {} if not st["b"] or st["first"][i] else {"momentum_buffer": st["b"][i]}
        else:
            group, kind = {"betas": (c["hyper"]["beta1"], c["hyper"]["beta2"]), "maximize": c["maximize"]}, "lion"
            state = {"exp_avg": st["m"][i]}
        out.append(tuple(t.clone() for t in reference_telemetry.direction(kind, group, g, state, gs)))
    return out


@pytest.mark.parametrize("columns", [0, 4, 8], ids=["plain", "monitored4", "monitored8"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [32, 24])
@pytest.mark.parametrize("case", list(SR_CASES))
def test_emulated_compensated_parameters_match_reference(emu, case, bits, sr, columns):
    """Every launcher with corrections (int16 and int8), to nearest and with rng, plain and
    monitored (the row kernels, 4 and 8 columns): parameters, corrections and state bit for bit
    the reference's over two steps; monitored, the telemetry and the direction statistics measure
    the master weights (ω and Δω of combine(p, c) before and after)."""
    n = len(CP_SIZES)
    special = None if columns else CP_SPECIAL  # NaN and inf weights would make the sums NaN
    got, want = _cp_problem(case, bits, special=special), _cp_problem(case, bits, special=special)
    rng = _rng_states(n) if sr else None
    gen = torch.Generator().manual_seed(1)
    grad_scale = SR_CASES[case]["grad_scale"]
    for step in range(2):
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (grad_scale or 1.0)).to(torch.bfloat16)
                 for p in want["params"]]
        before = _masters(got)
        directions = _cp_directions(case, want, grads) if columns == 8 else None
        _sr_reference(case, want, grads, rng or [], correction=want["c"])
        rows = [_rows_of(p.numel()) for p in got["params"]]
        if columns:
            bufs, keep = _telemetry(emu, got["params"], rows, columns)
        launches = emu.emu_launches()
        try:
            _sr_emulated(emu, case, torch.bfloat16, got, grads, rng, correction=got["c"], master_bits=bits)
        finally:
            emu.emu_set_telemetry(None, None)
            emu.emu_set_telemetry_columns(4)
        assert emu.emu_launches() - launches == (2 if case.startswith("adamw") else 1)
        for i, (a, b) in enumerate(zip(_cp_stored(case, got), _cp_stored(case, want))):
            _assert_identical(a, b, f"{case} step {step} stored list {i}")
        if columns:
            _assert_telemetry(bufs, before, _masters(got), grads, rows,
                              None if grad_scale is None else torch.tensor(grad_scale))
        if columns == 8:
            _assert_statistics(bufs, before, directions, rows)
        for r in rng or []:
            r[1] += 1


def test_emulated_compensated_check_catches_wrong_masters(emu, monkeypatch):
    """The comparison above can fail: a kernel that updated the bf16 parameter alone, rounded a
    24-bit master to nearest under rng, or took its rounding bits from a chunk-relative index or
    another lane would not have matched (the reference computed that way differs)."""
    sizes = [65537]  # three chunks
    rng = _rng_states(1)
    grads = _tensors(torch.bfloat16, 1, sizes, set())
    got = _cp_problem("adamw", 24, sizes, set(), {})
    _sr_emulated(emu, "adamw", torch.bfloat16, got, grads, rng, correction=got["c"], master_bits=24)
    stored = _cp_stored("adamw", got)

    def reference_with(rng_arg=rng, compensated=True, **patches):
        with monkeypatch.context() as m:
            for name, f in patches.items():
                m.setattr(rounding, name, f)
            want = _cp_problem("adamw", 24, sizes, set(), {})
            _sr_reference("adamw", want, grads, rng_arg, correction=want["c"] if compensated else ())
        return _cp_stored("adamw", want)

    assert all(torch.equal(a[0], b[0]) for a, b in zip(stored, reference_with()) if a)
    assert not torch.equal(stored[0][0], reference_with(compensated=False)[0][0])
    # To nearest: the same master weights before the split (the update reads the state's values
    # before their stores round), then another rounding at their 8th-lowest bit.
    assert not torch.equal(stored[1][0], reference_with(rng_arg=[])[1][0])
    index = rounding.element_index
    chunk_relative = reference_with(element_index=lambda t: index(t) % SR_CHUNK)
    assert torch.equal(stored[1][0][:SR_CHUNK], chunk_relative[1][0][:SR_CHUNK])  # the first chunk agrees
    assert not torch.equal(stored[1][0][SR_CHUNK:], chunk_relative[1][0][SR_CHUNK:])
    stream = rounding.stream
    lane1 = reference_with(stream=lambda key, count, lane: stream(key, count, 1 if lane == 0 else lane))
    assert not torch.equal(stored[1][0], lane1[1][0])


def test_emulated_compensated_across_table_launches(emu):
    """More tensors than one compensated table holds (its correction column costs capacity, the
    other tables keep theirs): several launches, each tensor with its own correction."""
    cap, cap_sr = emu.emu_compensated_table_capacity(3, 0), emu.emu_compensated_table_capacity(3, 1)
    assert 300 < cap_sr < cap < emu.emu_table_capacity(3) and cap == emu.emu_rounding_table_capacity(3)
    n = cap_sr + 5
    sizes = [1 + i % 7 for i in range(n)]
    got, want = _cp_problem("lion", 24, sizes, set(), {}), _cp_problem("lion", 24, sizes, set(), {})
    grads = _tensors(torch.bfloat16, 1, sizes, set())
    rng = _rng_states(n)
    _sr_reference("lion", want, grads, rng, correction=want["c"])
    launches = emu.emu_launches()
    _sr_emulated(emu, "lion", torch.bfloat16, got, grads, rng, correction=got["c"], master_bits=24)
    assert emu.emu_launches() - launches == 2
    for i, (a, b) in enumerate(zip(_cp_stored("lion", got), _cp_stored("lion", want))):
        _assert_identical(a, b, f"list {i}")


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.float16, 24), (torch.bfloat16, 16)], ids=str)
def test_emulated_invalid_corrections_write_nothing(emu, dtype, bits):
    """Corrections of a dtype other than bf16, or of a width other than 24 or 32 bits: an invalid
    value before any launch (AdamW's steps not advanced)."""
    sizes = [5, 40]
    st = _sr_problem("adamw", dtype, sizes, set())
    corrections = [torch.zeros(n, dtype=torch.int16) for n in sizes]
    before = [_clone(x) for x in _sr_stored("adamw", st)]
    launches = emu.emu_launches()
    c = SR_CASES["adamw"]
    grads = _tensors(dtype, 1, sizes, set())
    scratch = torch.empty(emu.emu_scratch_bytes(2), dtype=torch.uint8)
    emu.emu_set_corrections(_ptrs(corrections), bits)
    try:
        err = emu.emu_adamw(DTYPE_CODES[dtype], 2, _numels(st["params"]), _ptrs(st["params"]), _ptrs(grads),
                            _ptrs(st["m"]), _ptrs(st["v"]), None,
                            _ptrs(st["steps"]), (ctypes.c_double * 6)(*c["hyper"].values()), False, False, None, 0,
                            None, 0, None, 0, scratch.data_ptr())
    finally:
        emu.emu_set_corrections(None, 32)
    assert err != 0 and emu.emu_launches() == launches
    for a, b in zip(_sr_stored("adamw", st), before):
        _assert_identical(a, b, "state")


# ------------------------------------------------------------------------------------ 8-bit states

# 8-bit states (a code byte per element, a float32 scale per block of 256; quantization.py).
# Sizes: one element, a partial block, one block, a block and one element, a partial last block
# misaligned (parameter, gradient and codes one element in: the scalar path), and 33,000 (three
# fp32 chunks, two bf16 ones, whole and partial sweeps). Monitored, 33,000 is 5 rows of 6600 and
# 1023 three of 341: rows that are not multiples of 256 (blocks span rows).
Q_SIZES = [1, 7, 256, 257, 1023, 33000]
Q_MISALIGNED = {4}
# Storages: (dtype, stochastic rounding, master weight bits).
Q_STORAGES = {"fp32": (torch.float32, False, 16), "fp32-sr": (torch.float32, True, 16),
              "fp16": (torch.float16, False, 16), "bf16-sr": (torch.bfloat16, True, 16),
              "bf16-master24-sr": (torch.bfloat16, True, 24), "bf16-master32": (torch.bfloat16, False, 32)}
# The 8-bit state lists of each SR_CASES case, by lane (int8 codes for lane 1, uint8 for the rest).
Q_STATES = {"adamw": {1: "m", 2: "v"}, "adamw_amsgrad": {1: "m", 2: "v", 3: "vmax"}, "sgd": {1: "b"},
            "sgd_nesterov": {1: "b"}, "lion": {1: "m"}}


def _q_problem(case, storage, sizes=Q_SIZES, misaligned=Q_MISALIGNED):
    """An SR_CASES problem whose states are 8-bit: _sr_problem's (or _cp_problem's, compensated)
    random states encoded to codes laid out like their parameters, and their block scales."""
    dtype, _, bits = Q_STORAGES[storage]
    if bits == 16:
        st = _sr_problem(case, dtype, sizes, misaligned)
    else:
        st = _cp_problem(case, bits, sizes, misaligned, {i: 1 for i in misaligned})
    st["scales"] = {}
    for lane, key in Q_STATES[case].items():
        codes, scales = [], []
        for i, t in enumerate(st[key]):
            c, sc = quantization.encode(t.float(), torch.int8 if lane == 1 else torch.uint8, t)
            codes.append(_at_offset(c, 1 if i in misaligned else 0))
            scales.append(sc)
        st[key], st["scales"][lane] = codes, scales
    return st


def _q_stored(case, st):
    """Every tensor a step writes: parameters (and corrections), codes, scales (and steps)."""
    out = _cp_stored(case, st) if "c" in st else _sr_stored(case, st)
    return out + [st["scales"][lane] for lane in sorted(st["scales"])]


def _q_directions(case, st, grads):
    """The reference's (n, s) of every tensor before the step, from the decoded states."""
    c = SR_CASES[case]
    gs = None if c["grad_scale"] is None else torch.tensor(c["grad_scale"])
    decoded = {key: [quantization.decode(q, sc) for q, sc in zip(st[key], st["scales"][lane])]
               for lane, key in Q_STATES[case].items()}
    out = []
    for i, g in enumerate(grads):
        if case.startswith("adamw"):
            group = {"betas": (c["hyper"]["beta1"], c["hyper"]["beta2"]), "eps": c["hyper"]["eps"],
                     "maximize": c["maximize"], "amsgrad": c["amsgrad"]}
            state = {"step": st["steps"][i], "exp_avg": decoded["m"][i], "exp_avg_sq": decoded["v"][i]}
            if c["amsgrad"]:
                state["max_exp_avg_sq"] = decoded["vmax"][i]
            kind = "adamw"
        elif case.startswith("sgd"):
            group, kind = {"maximize": c["maximize"]}, "sgd"
            state = {} if st["first"][i] else {"momentum_buffer": decoded["b"][i]}
        else:
            group, kind = {"betas": (c["hyper"]["beta1"], c["hyper"]["beta2"]), "maximize": c["maximize"]}, "lion"
            state = {"exp_avg": decoded["m"][i]}
        out.append(reference_telemetry.direction(kind, group, g, state, gs))
    return out


def _q_params(st):
    """The parameters as the telemetry measures them: master weights when compensated."""
    return _masters(st) if "c" in st else _clone(st["params"])


@pytest.mark.parametrize("case,storage", [
    *[(case, storage) for case in Q_STATES for storage in ("fp32", "bf16-sr")],
    ("adamw_amsgrad", "bf16-master24-sr"), ("sgd", "bf16-master32"), ("lion", "fp32-sr"), ("adamw", "fp16")])
def test_emulated_8_bit_states_match_reference(emu, case, storage):
    """Every launcher with 8-bit states (AdamW with and without amsgrad, SGD with L2 and decoupled
    decay, plain and nesterov momentum, Lion), to nearest and stochastically, with plain, rounded
    and compensated parameters: parameters, corrections, codes, block scales and steps bit for bit
    the reference's over four steps. Step 0 is monitored with 8 columns and step 1 with 4 (the
    measuring launch, then the update: telemetry as the specification's row sums of the stored
    values, direction statistics from the decoded states); step 2 has a NaN and an infinite
    gradient (their blocks' scales become NaN, codes zero), which step 3 decodes."""
    dtype, sr, bits = Q_STORAGES[storage]
    n = len(Q_SIZES)
    got, want = _q_problem(case, storage), _q_problem(case, storage)
    rng = _rng_states(n) if sr else None
    gen = torch.Generator().manual_seed(1)
    grad_scale = SR_CASES[case]["grad_scale"]
    compensated = {} if bits == 16 else dict(correction=got["c"], master_bits=bits)
    for step in range(4):
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (grad_scale or 1.0)).to(dtype)
                 for p in want["params"]]
        if step == 2:
            grads[5][300], grads[5][20000] = float("nan"), float("inf")
        columns = {0: 8, 1: 4}.get(step, 0)
        before = _q_params(got)
        directions = _q_directions(case, want, grads) if columns == 8 else None
        _sr_reference(case, want, grads, rng or [], correction=want.get("c", ()), scales=want["scales"])
        rows = [_rows_of(p.numel()) for p in got["params"]]
        if columns:
            bufs, keep = _telemetry(emu, got["params"], rows, columns)
        launches = emu.emu_launches()
        try:
            _sr_emulated(emu, case, dtype, got, grads, rng, scales=got["scales"], **compensated)
        finally:
            emu.emu_set_telemetry(None, None)
            emu.emu_set_telemetry_columns(4)
        assert emu.emu_launches() - launches == case.startswith("adamw") + 1 + bool(columns)
        for i, (a, b) in enumerate(zip(_q_stored(case, got), _q_stored(case, want))):
            _assert_identical(a, b, f"{case} step {step} stored list {i}")
        if columns:
            _assert_telemetry(bufs, before, _q_params(got), grads, rows,
                              None if grad_scale is None else torch.tensor(grad_scale))
        if columns == 8:
            _assert_statistics(bufs, before, directions, rows)
        for r in rng or []:
            r[1] += 1
    scales = got["scales"][1][5]
    assert scales[1].isnan() and scales[78].isnan() and scales[~torch.tensor(
        [i in (1, 78) for i in range(len(scales))])].isfinite().all()


def test_emulated_8_bit_states_found_inf_writes_nothing(emu):
    """GradScaler's skipped step, monitored: codes, scales, parameters, corrections, steps and
    telemetry buffers as they were (no launch writes anything)."""
    case = "adamw_amsgrad"
    st = _q_problem(case, "bf16-master24-sr")
    n = len(Q_SIZES)
    before = [_clone(x) for x in _q_stored(case, st)]
    grads = _tensors(torch.bfloat16, 1, Q_SIZES, Q_MISALIGNED)
    rows = [_rows_of(p.numel()) for p in st["params"]]
    bufs, keep = _telemetry(emu, st["params"], rows, 8)
    try:
        _sr_emulated(emu, case, torch.bfloat16, st, grads, _rng_states(n), correction=st["c"], master_bits=24,
                     scales=st["scales"], found_inf=torch.tensor(1.0))
    finally:
        emu.emu_set_telemetry(None, None)
        emu.emu_set_telemetry_columns(4)
    for i, (a, b) in enumerate(zip(_q_stored(case, st), before)):
        _assert_identical(a, b, f"stored list {i}")
    assert all(bool(b.isnan().all()) for b in bufs)


def test_emulated_8_bit_states_across_table_launches(emu):
    """More tensors than one 8-bit table holds (its scale columns cost capacity): several launches,
    each tensor with its own codes and scales (state k of tensor i: scales[k·n + i]), as when the
    same tensors are updated in two calls of one launch each (the reference's agreement is the
    test above's; random codes and scales here, to keep it fast)."""
    cap = emu.emu_quantized_table_capacity(4, 0)
    assert 300 < cap < emu.emu_quantized_table_capacity(3, 1) < emu.emu_rounding_table_capacity(3)
    n = cap + 3
    sizes = [1 + i % 7 for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    st = {"params": _tensors(torch.float32, 0, sizes, set()), "m": [torch.randint(-127, 128, (k,), generator=gen,
          dtype=torch.int8) for k in sizes], "v": [torch.randint(0, 256, (k,), generator=gen, dtype=torch.uint8)
          for k in sizes], "vmax": [], "steps": [torch.tensor(float(i % 3)) for i in range(n)],
          "scales": {lane: [torch.rand(1, generator=gen) for _ in sizes] for lane in (1, 2)}}
    grads = _tensors(torch.float32, 1, sizes, set())
    split = {key: _clone(st[key]) for key in ("params", "m", "v", "vmax", "steps")}
    split["scales"] = {lane: _clone(x) for lane, x in st["scales"].items()}
    launches = emu.emu_launches()
    _sr_emulated(emu, "adamw", torch.float32, st, grads, None, scales=st["scales"])
    assert emu.emu_launches() - launches == 3  # coefficients, two 8-bit launches
    for part in (slice(0, n // 2), slice(n // 2, n)):
        half = {key: split[key][part] for key in ("params", "m", "v", "vmax", "steps")}
        half["scales"] = {lane: x[part] for lane, x in split["scales"].items()}
        _sr_emulated(emu, "adamw", torch.float32, half, grads[part], None, scales=half["scales"])
    assert emu.emu_launches() - launches == 3 + 2 * 2
    for i, (a, b) in enumerate(zip(_q_stored("adamw", st), _q_stored("adamw", split))):
        _assert_identical(a, b, f"list {i}")


def test_emulated_8_bit_states_of_float64_or_without_momentum_are_invalid(emu):
    """Scales with float64 parameters, or with SGD without momentum (no state): an invalid value
    before any launch (AdamW's steps not advanced)."""
    st = _sr_problem("adamw", torch.float64, [5, 300], set())
    scales = {1: [torch.zeros(1), torch.zeros(2)], 2: [torch.zeros(1), torch.zeros(2)]}
    before = [_clone(x) for x in _sr_stored("adamw", st)]
    launches = emu.emu_launches()
    emu.emu_set_scales(_ptrs([t for lane in (1, 2) for t in scales[lane]]))
    try:
        err = emu.emu_adamw(1, 2, _numels(st["params"]), _ptrs(st["params"]), _ptrs(st["params"]), _ptrs(st["m"]),
                            _ptrs(st["v"]), None, _ptrs(st["steps"]),
                            (ctypes.c_double * 6)(1e-3, 0.9, 0.99, 1e-8, 0, 1), False, False, None, 0, None, 0, None,
                            0, torch.empty(emu.emu_scratch_bytes(2), dtype=torch.uint8).data_ptr())
        assert err != 0
        err = emu.emu_sgd(0, 2, _numels(st["params"]), _ptrs(st["params"]), _ptrs(st["params"]), None, None,
                          (ctypes.c_double * 5)(0.1, 0.0, 0.0, 0.0, 1.0), False, False, False, None, 0, None, 0, None,
                          0)
        assert err != 0
    finally:
        emu.emu_set_scales(None)
    assert emu.emu_launches() == launches
    for a, b in zip(_sr_stored("adamw", st), before):
        _assert_identical(a, b, "state")


# ------------------------------------------------------------------------------------ rotational


ROT_OPTIMIZERS = {"adamw": 0, "sgd": 1, "lion": 2}
# (K, C): short rows several to a block (G = 32, 64, 128), rows of a whole block, a whole-tensor
# sphere, rows longer than the default on-chip buffers (two passes), and the minimum (2 elements).
ROT_SHAPES = [(6, 5), (9, 40), (3, 300), (4, 700), (2, 1500), (1, 5000), (2, 9000), (5, 2)]


def _rot_reference_step(name, p, g, st, hyper, zero_mean, projected, maximize, grad_scale, k_rows, store=None):
    """``store``: the parameter's wdopt.reference.rounding.Rounder (then p must be K×C already)."""
    if name == "adamw":
        st["step"] += 1
        u = rv.adamw_direction(g, st["s1"], st["s2"], int(st["step"].item()), beta1=hyper["beta1"],
                               beta2=hyper["beta2"], eps=hyper["eps"], maximize=maximize, grad_scale=grad_scale,
                               store=store)
    elif name == "sgd":
        u = rv.sgd_direction(g, st["s1"], st["first"], momentum=hyper["momentum"], nesterov=hyper["nesterov"],
                             maximize=maximize, grad_scale=grad_scale, store=store)
    else:
        u = rv.lion_direction(g, st["s1"], beta1=hyper["beta1"], beta2=hyper["beta2"], maximize=maximize,
                              grad_scale=grad_scale, store=store)
    view = p.view(k_rows, -1)
    rv.rotate_(view, u.view(k_rows, -1), st, angle=hyper["angle"], lr=hyper["lr"], norm_decay=hyper["norm_decay"],
               eps=hyper["rot_eps"], zero_mean=zero_mean, per_neuron=True,
               mode="projected" if projected else "equilibrium", store=store)


@pytest.mark.parametrize("on_chip_bytes", [0, 1], ids=["on_chip", "two_pass"])
@pytest.mark.parametrize("name,dtype,zero_mean,projected,maximize,nesterov", [
    ("adamw", torch.float32, True, False, False, False),
    ("sgd", torch.float32, True, False, True, True),
    ("lion", torch.float32, True, False, False, False),
    ("adamw", torch.float64, False, False, True, False),
    ("sgd", torch.float32, False, True, False, False),
    ("adamw", torch.bfloat16, True, False, False, False),
])
def test_emulated_rotational_matches_reference(emu, on_chip_bytes, name, dtype, zero_mean, projected, maximize,
                                               nesterov):
    """Three steps of the rotational row kernel against wdopt.reference.rotational, on chip (the
    default buffers) and with every row on the two-pass path (buffers of 0 elements); the last step
    monitored (telemetry vs the specification's row sums). Agreement to rounding: the kernel sums
    rows in its own order, and the two-pass path takes ‖t‖² and the new norm in closed form."""
    torch.manual_seed(0)
    # Two-element centred rows have no tangent (t = 0 up to rounding, which the step then scales
    # up): on chip the kernel rounds as the reference does; the closed forms cannot, so skip them.
    shapes = ROT_SHAPES if not on_chip_bytes else [s for s in ROT_SHAPES if s[1] > 2] + [(5, 3)]
    n = len(shapes)
    gen = torch.Generator().manual_seed(3)
    p0 = []
    for k, c in shapes:
        w = torch.randn(k, c, generator=gen, dtype=torch.float64) + (0.0 if zero_mean else 0.3)
        p0.append(w.to(dtype))  # not centred: the first step freezes the centred norm
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.0 if projected else 0.9, nesterov=nesterov,
                 angle=0.05, norm_decay=0.9, rot_eps=1e-8)
    grad_scale = torch.tensor(256.0) if name == "adamw" else None
    mdt = torch.float64 if dtype == torch.float64 else torch.float32

    def fresh_states():
        out = []
        for w in p0:
            st = {"s1": torch.zeros_like(w), "s2": torch.zeros_like(w), "step": torch.tensor(0.0), "first": True,
                  "rotational_norm": torch.zeros(w.shape[0], dtype=mdt),
                  "update_norm_avg": torch.zeros(w.shape[0], dtype=mdt),
                  "rotational_step": torch.tensor(0.0)}
            out.append(st)
        return out

    ref_p, ref_st = [w.clone() for w in p0], fresh_states()
    emu_p, emu_st = [w.clone() for w in p0], fresh_states()
    scratch = torch.empty(emu.emu_rotational_scratch_bytes(n), dtype=torch.uint8)
    rows = [k for k, _ in shapes]
    steps = 3
    for step in range(steps):
        grads = [(torch.randn(w.shape, generator=gen, dtype=torch.float64) * (100.0 if grad_scale else 1.0)
                  + 0.2).to(dtype) for w in p0]
        for p, g, st, (k, _) in zip(ref_p, grads, ref_st, shapes):
            _rot_reference_step(name, p, g, st, hyper, zero_mean, projected, maximize, grad_scale, k)
        monitored = step == steps - 1
        before = _clone(emu_p)
        if monitored:
            # whole-tensor rows for the sphere of (1, 5000): telemetry rows finer than rotation rows
            tel_rows = [k * (10 if (k, c) == (1, 5000) else 1) for k, c in shapes]
            bufs, keep = _telemetry(emu, emu_p, tel_rows)
        sgd_momentum = name == "sgd" and hyper["momentum"] != 0
        first, _keep = _first_step_flags([st["first"] for st in emu_st])
        h = (ctypes.c_double * 8)(hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["momentum"],
                                  hyper["angle"], hyper["norm_decay"], hyper["rot_eps"])
        try:
            launches = emu.emu_launches()
            err = emu.emu_rotational(
                DTYPE_CODES[dtype], ROT_OPTIMIZERS[name], n, _numels(emu_p), (ctypes.c_int64 * n)(*rows),
                _ptrs(emu_p), _ptrs(grads),
                _ptrs([st["s1"] for st in emu_st]) if (name != "sgd" or sgd_momentum) else None,
                _ptrs([st["s2"] for st in emu_st]) if name == "adamw" else None,
                _ptrs([st["step"] for st in emu_st]) if name == "adamw" else None,
                _ptrs([st["rotational_norm"] for st in emu_st]), _ptrs([st["update_norm_avg"] for st in emu_st]),
                _ptrs([st["rotational_step"] for st in emu_st]), first if sgd_momentum else None, h,
                hyper["nesterov"], zero_mean, projected, maximize, *_scalar(grad_scale), None, 0,
                scratch.data_ptr(), on_chip_bytes)
        finally:
            emu.emu_set_telemetry(None, None)
        assert err == 0
        assert emu.emu_launches() - launches == 2  # prologue, rows
        for st in emu_st + ref_st:
            st["first"] = False
        if monitored:
            _assert_telemetry(bufs, before, emu_p, grads, tel_rows, grad_scale)
    tol = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-13),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for i in range(n):
        torch.testing.assert_close(emu_p[i], ref_p[i], **tol, msg=lambda m: f"param {shapes[i]}: {m}")
        for key in ("s1", "s2", "step", "rotational_norm", "update_norm_avg", "rotational_step"):
            torch.testing.assert_close(emu_st[i][key], ref_st[i][key], **tol,
                                       msg=lambda m: f"{key} {shapes[i]}: {m}")
        # on the sphere of its frozen norm, centred
        r = emu_p[i].to(mdt)
        if zero_mean:
            assert r.mean(1).abs().max() < (1e-2 if dtype == torch.bfloat16 else 1e-5)
        torch.testing.assert_close(r.norm(dim=1), emu_st[i]["rotational_norm"], **tol)


def _rot_state(w, mdt):
    return {"s1": torch.zeros_like(w), "s2": torch.zeros_like(w), "step": torch.tensor(0.0), "first": True,
            "rotational_norm": torch.zeros(w.shape[0], dtype=mdt),
            "update_norm_avg": torch.zeros(w.shape[0], dtype=mdt), "rotational_step": torch.tensor(0.0)}


def _emu_rotational(emu, name, dtype, params, grads, states, hyper, *, zero_mean=True, projected=False,
                    on_chip_bytes=0, found_inf=None):
    """One emulated rotational call (no GradScaler, not maximized); steps each state's "first"."""
    n = len(params)
    sgd_momentum = name == "sgd" and hyper["momentum"] != 0
    h = (ctypes.c_double * 8)(hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["momentum"],
                              hyper["angle"], hyper["norm_decay"], hyper["rot_eps"])
    scratch = torch.empty(emu.emu_rotational_scratch_bytes(n), dtype=torch.uint8)
    first, _keep = _first_step_flags([st["first"] for st in states])
    err = emu.emu_rotational(
        DTYPE_CODES[dtype], ROT_OPTIMIZERS[name], n, _numels(params),
        (ctypes.c_int64 * n)(*[st["rotational_norm"].numel() for st in states]), _ptrs(params), _ptrs(grads),
        _ptrs([st["s1"] for st in states]) if (name != "sgd" or sgd_momentum) else None,
        _ptrs([st["s2"] for st in states]) if name == "adamw" else None,
        _ptrs([st["step"] for st in states]) if name == "adamw" else None,
        _ptrs([st["rotational_norm"] for st in states]), _ptrs([st["update_norm_avg"] for st in states]),
        _ptrs([st["rotational_step"] for st in states]), first if sgd_momentum else None, h,
        hyper.get("nesterov", False), zero_mean, projected, False, None, 0, *_scalar(found_inf), scratch.data_ptr(),
        on_chip_bytes)
    assert err == 0
    if found_inf is not None and found_inf.item() != 0:
        return
    for st in states:
        st["first"] = False


@pytest.mark.parametrize("on_chip_bytes", [0, 1], ids=["on_chip", "two_pass"])
@pytest.mark.parametrize("projected", [False, True], ids=["equilibrium", "projected"])
def test_emulated_rotational_reads_the_rate_on_the_device(emu, projected, on_chip_bytes):
    """capturable (issue 9, bug 3): the rate read from device memory (lr when projected, else η_r²,
    whose root the kernel takes) gives the bits of the host arguments lr and angle = sqrt(η_r²),
    which hold NaN meanwhile: a kernel that still read them would show it."""
    angle_sq = 1e-3 * 0.1 * theory.adamw_rotation_factor((0.9, 0.99))
    hyper = dict(lr=0.0234, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.0, angle=math.sqrt(angle_sq), norm_decay=0.9,
                 rot_eps=1e-8)
    gen = torch.Generator().manual_seed(5)
    w = [torch.randn(4, 50, generator=gen) + 0.3, torch.randn(2, 3000, generator=gen)]
    host_p, dev_p = [x.clone() for x in w], [x.clone() for x in w]
    host_st, dev_st = [_rot_state(x, torch.float32) for x in w], [_rot_state(x, torch.float32) for x in w]
    rate = torch.tensor(hyper["lr"] if projected else angle_sq, dtype=torch.float64)
    for _ in range(2):
        g = [torch.randn(x.shape, generator=gen) for x in w]
        _emu_rotational(emu, "adamw", torch.float32, host_p, g, host_st, hyper, projected=projected,
                        on_chip_bytes=on_chip_bytes)
        emu.emu_set_rate(rate.data_ptr(), 1)
        try:
            _emu_rotational(emu, "adamw", torch.float32, dev_p, g, dev_st,
                            {**hyper, "lr": math.nan, "angle": math.nan}, projected=projected,
                            on_chip_bytes=on_chip_bytes)
        finally:
            emu.emu_set_rate(None, 0)
    assert not any(bool(p.isnan().any()) for p in dev_p)
    _assert_identical(dev_p, host_p, "param")
    for key in ("s1", "s2", "step", "rotational_norm", "update_norm_avg", "rotational_step"):
        _assert_identical([st[key] for st in dev_st], [st[key] for st in host_st], key)


@pytest.mark.parametrize("on_chip_bytes", [0, 1], ids=["on_chip", "two_pass"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_emulated_rotational_empty_tensor_keeps_coefficients_in_place(emu, on_chip_bytes, name):
    """An empty tensor before others: every tensor still reads its own step's coefficients (W1
    already stepped, W2 fresh: W2's norms are frozen at this step, W1's are not), and the empty
    tensor's rows do what the CPU kernel's do (norm 0 frozen, zero telemetry rows)."""
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.9, nesterov=False, angle=0.05, norm_decay=0.9,
                 rot_eps=1e-8)
    gen = torch.Generator().manual_seed(11)
    empty = torch.empty(3, 0)
    w1 = torch.randn(4, 50, generator=gen) + 0.3
    w2 = torch.randn(2, 3000, generator=gen) + 0.3  # not centred: its first step freezes the centred norm
    ref_w1, ref_st1 = w1.clone(), _rot_state(w1, torch.float32)
    emu_w1, emu_st1 = w1.clone(), _rot_state(w1, torch.float32)
    g0 = torch.randn(4, 50, generator=gen)
    _rot_reference_step(name, ref_w1, g0, ref_st1, hyper, True, False, False, None, 4)
    ref_st1["first"] = False
    _emu_rotational(emu, name, torch.float32, [emu_w1], [g0], [emu_st1], hyper, on_chip_bytes=on_chip_bytes)
    ref_w2, ref_st2 = w2.clone(), _rot_state(w2, torch.float32)
    emu_w2, emu_st2 = w2.clone(), _rot_state(w2, torch.float32)
    empty_st = _rot_state(empty, torch.float32)
    empty_st["update_norm_avg"].fill_(2.0)
    g1, g2 = torch.randn(4, 50, generator=gen), torch.randn(2, 3000, generator=gen)
    _rot_reference_step(name, ref_w1, g1, ref_st1, hyper, True, False, False, None, 4)
    _rot_reference_step(name, ref_w2, g2, ref_st2, hyper, True, False, False, None, 2)
    params = [empty, emu_w1, emu_w2]
    before = _clone(params)
    tel_rows = [6, 4, 2]
    bufs, keep = _telemetry(emu, params, tel_rows)
    try:
        _emu_rotational(emu, name, torch.float32, params, [torch.empty(3, 0), g1, g2], [empty_st, emu_st1, emu_st2],
                        hyper, on_chip_bytes=on_chip_bytes)
    finally:
        emu.emu_set_telemetry(None, None)
    for got_w, want_w, got, want, what in ((emu_w1, ref_w1, emu_st1, ref_st1, "W1"),
                                           (emu_w2, ref_w2, emu_st2, ref_st2, "W2")):
        torch.testing.assert_close(got_w, want_w, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")
        for key in ("s1", "s2", "step", "rotational_norm", "update_norm_avg", "rotational_step"):
            torch.testing.assert_close(got[key], want[key], rtol=2e-5, atol=2e-6, msg=lambda m: f"{what} {key}: {m}")
    # W2's norms frozen at this step: the centred norms of the weights it started from
    torch.testing.assert_close(emu_st2["rotational_norm"], (w2 - w2.mean(1, keepdim=True)).norm(dim=1))
    assert empty_st["rotational_step"].item() == 1.0
    assert empty_st["rotational_norm"].eq(0).all()
    torch.testing.assert_close(empty_st["update_norm_avg"], torch.full((3,), 2.0 * 0.9))  # s·norm_decay + (1 − norm_decay)·0
    assert bufs[0].eq(0).all(), bufs[0]  # zero rows, as the CPU kernel writes them
    _assert_telemetry(bufs[1:], before[1:], params[1:], [g1, g2], tel_rows[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("radial", [0.99, 0.9999])
def test_emulated_rotational_two_pass_mostly_radial_direction(emu, dtype, radial):
    """A long row (two passes) whose direction is almost all radial: ‖t‖² is a small difference of
    the pass-1 moments, which the kernel sums in double. update_norm_avg and the step agree with
    the reference evaluated in float64 on the same inputs to a few float32 ulps."""
    k, c = 2, 6000
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(k, c, generator=gen, dtype=torch.float64)
    p0 -= p0.mean(1, keepdim=True)
    noise = torch.randn(k, c, generator=gen, dtype=torch.float64)
    noise -= noise.mean(1, keepdim=True)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    g = (radial * unit(p0) + (1 - radial**2) ** 0.5 * unit(noise)) * c**0.5
    p0, g = p0.to(dtype), g.to(dtype)
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.0, angle=0.05, norm_decay=0.9, rot_eps=1e-8)

    def state(dt):
        st = _rot_state(p0, dt)
        st["rotational_norm"] = p0.to(torch.float64).norm(dim=1).to(mdt).to(dt)
        st["update_norm_avg"] = torch.ones(k, dtype=dt)
        st["rotational_step"] = torch.tensor(3.0)
        return st

    want_p, want = p0.to(torch.float64, copy=True), state(torch.float64)
    rv.rotate_(want_p, g.to(torch.float64), want, angle=hyper["angle"], lr=hyper["lr"], norm_decay=hyper["norm_decay"],
               eps=hyper["rot_eps"], zero_mean=True, per_neuron=True, mode="equilibrium")
    got_p, got = p0.clone(), state(mdt)
    _emu_rotational(emu, "sgd", dtype, [got_p], [g], [got], hyper, on_chip_bytes=1)
    # the new average is 0.9 + 0.1·‖t‖²: its error is the error of ‖t‖² (≈ (1 − radial²)·C)
    tol = {torch.float64: 1e-12, torch.float32: 2e-7, torch.bfloat16: 2e-7}[dtype]
    torch.testing.assert_close(got["update_norm_avg"].to(torch.float64), want["update_norm_avg"], rtol=tol, atol=0)
    p_tol = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6),
             torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(got_p.to(torch.float64), want_p, **p_tol)


def test_emulated_rotational_found_inf_writes_nothing(emu):
    shapes = [(3, 40), (1, 3000)]
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    steps, rsteps = [torch.tensor(0.0) for _ in shapes], [torch.tensor(0.0) for _ in shapes]
    norms, avgs = [torch.zeros(s[0]) for s in shapes], [torch.zeros(s[0]) for s in shapes]
    before = [_clone(x) for x in (p, m, v, steps, rsteps, norms, avgs)]
    bufs, keep = _telemetry(emu, p, [s[0] for s in shapes])
    scratch = torch.empty(emu.emu_rotational_scratch_bytes(2), dtype=torch.uint8)
    try:
        err = emu.emu_rotational(0, 0, 2, _numels(p), (ctypes.c_int64 * 2)(3, 1), _ptrs(p), _ptrs(g), _ptrs(m),
                                 _ptrs(v), _ptrs(steps), _ptrs(norms), _ptrs(avgs), _ptrs(rsteps), None,
                                 (ctypes.c_double * 8)(0.01, 0.9, 0.99, 1e-8, 0, 0.05, 0.9, 1e-8), False, True, False,
                                 False, None, 0, *_scalar(torch.tensor(1.0)), scratch.data_ptr(), 0)
    finally:
        emu.emu_set_telemetry(None, None)
    assert err == 0
    for got, want in zip((p, m, v, steps, rsteps, norms, avgs), before):
        _assert_identical(got, want, "state")
    assert all(bool(b.isnan().all()) for b in bufs)


# ------------------------------------------------------------------------------------ rotational, low precision

# Storages of the low-precision rotational tests: (dtype, stochastic rounding, correction dtype or
# None): bf16/fp16 stochastically rounded, and compensated bf16 with 32-bit (int16) and 24-bit
# (int8) master weights, to nearest and with rng.
ROT_LP_STORAGES = {
    "bf16-sr": (torch.bfloat16, True, None),
    "fp16-sr": (torch.float16, True, None),
    "bf16-master32": (torch.bfloat16, False, torch.int16),
    "bf16-master32-sr": (torch.bfloat16, True, torch.int16),
    "bf16-master24": (torch.bfloat16, False, torch.int8),
    "bf16-master24-sr": (torch.bfloat16, True, torch.int8),
}
# Odd row lengths, in one call: several rows to a block (G = 32), 64 threads a row, and a long row.
# With ROT_LP_ON_CHIP bytes of row buffers a block holds 1536 elements (6 bytes each: u in fp32, p
# in 16 bits) or 1280 (8 bytes: p as its fp32 master weight), so the 301-element rows (four to a
# block: 1204 elements) are rotated on chip and the 1601-element row takes the two-pass path
# (test_emulated_rotational_low_precision_check_can_fail checks both).
ROT_LP_SHAPES = [(6, 5), (3, 301), (2, 1601)]
ROT_LP_ON_CHIP = 10240
ROT_LP_HYPER = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, momentum=0.9, nesterov=False, angle=0.05,
                    norm_decay=0.9, rot_eps=1e-8)
ROT_LP_STATE = ("s1", "s2", "step", "first", "rotational_norm", "update_norm_avg", "rotational_step")


def _rot_lp_problem(storage, seed=5, storages=ROT_LP_STORAGES):
    """Weights (not centred: the first step freezes the centred norm of the master weights) split
    into parameters and corrections, and fresh rotational states."""
    dtype, _, correction = storages[storage]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, c in ROT_LP_SHAPES:
        w = torch.randn(k, c, generator=gen) + 0.1
        side = _rot_state(w.to(dtype), torch.float32)
        if correction is None:
            side["p"], side["c"] = w.to(dtype), None
        else:
            side["p"], side["c"] = rounding.split(w, correction)
        out.append(side)
    return out


def _rot_lp_grads(gen, dtype):
    """Gradients with both signs in every row: Adam's first direction and Lion's are ±1, which a
    row of one sign makes constant, its centred tangent then rounding noise that the step scales up
    to the row's norm (degenerate rows, in which no two summation orders agree)."""
    out = []
    for k, c in ROT_LP_SHAPES:
        g = torch.randn(k, c, generator=gen)
        g[:, 0], g[:, 1] = g[:, 0].abs(), -g[:, 1].abs()
        out.append(g.to(dtype))
    return out


def _rot_lp_copy(into, source):
    """``into`` takes ``source``'s values (lock step: each step starts from the reference's)."""
    for a, b in zip(into, source):
        for key in ("p", "c", *ROT_LP_STATE):
            if isinstance(b[key], torch.Tensor):
                a[key].copy_(b[key])
            else:
                a[key] = b[key]


def _rot_lp_reference(name, sides, grads, rng, projected, rounder=rounding.Rounder):
    """The specification's step with each tensor's Rounder (its rng, None: to nearest; parameter;
    correction, None: plain)."""
    for i, (side, g) in enumerate(zip(sides, grads)):
        store = rounder(rng[i] if rng is not None else None, side["p"], side["c"])
        _rot_reference_step(name, side["p"], g, side, ROT_LP_HYPER, True, projected, False, None, side["p"].shape[0],
                            store=store)
        side["first"] = False


def _rot_lp_emulated(emu, storage, name, sides, grads, rng, projected, on_chip_bytes=ROT_LP_ON_CHIP):
    dtype, sr, correction = ROT_LP_STORAGES[storage]
    keep = (_ptrs(rng) if sr else None, _ptrs([s["c"] for s in sides]) if correction is not None else None)
    emu.emu_set_rng(keep[0])
    emu.emu_set_corrections(keep[1], 32 if correction == torch.int16 else 24)
    try:
        _emu_rotational(emu, name, dtype, [s["p"] for s in sides], grads, sides, ROT_LP_HYPER, projected=projected,
                        on_chip_bytes=on_chip_bytes)
    finally:
        emu.emu_set_rng(None)
        emu.emu_set_corrections(None, 32)


def _rot_lp_weights(side):
    """The weights as the rotation sees them: the master weights when compensated."""
    return (side["p"] if side["c"] is None else rounding.combine(side["p"], side["c"])).to(torch.float32)


def _rot_lp_assert_matches(storage, name, got, want, first, spec=None):
    """The emulated step against the specification's. The states (lanes 1, 2) are functions of the
    gradient and their old values only: bit for bit. The weights are the rotation's, whose row sums
    the kernel takes in its own order and its own arrangement (closed forms on the two-pass path;
    test_emulated_rotational_matches_reference compares plain calls to rounding for that reason):
    the stored values round alike but where the two straddle a rounding boundary, so they are
    equal in all but a few elements, and within a few fp32 ulps of their row's largest weight (plus
    one unit of the stored precision where they differ). ``spec``: the storage's (dtype, stochastic
    rounding, correction dtype), if not one of ROT_LP_STORAGES'."""
    dtype, _, correction = spec or ROT_LP_STORAGES[storage]
    for i, (a, b) in enumerate(zip(got, want)):
        what = f"{storage} {name} {ROT_LP_SHAPES[i]}"
        for key in ("s1", "s2", "step") if name == "adamw" else ("s1",):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs in {int((a[key] != b[key]).sum())} elements"
        assert torch.equal(a["rotational_step"], b["rotational_step"]), what
        # the frozen norms: a row sum (bit for bit once frozen); s: the row's ‖t‖², summed in another order
        torch.testing.assert_close(a["rotational_norm"], b["rotational_norm"], rtol=0 if not first else 4e-6, atol=0,
                                   msg=lambda m, what=what: f"{what} rotational_norm: {m}")
        torch.testing.assert_close(a["update_norm_avg"], b["update_norm_avg"], rtol=2e-5, atol=0,
                                   msg=lambda m, what=what: f"{what} update_norm_avg: {m}")
        wa, wb = _rot_lp_weights(a), _rot_lp_weights(b)
        if correction is not None:
            assert a["c"].dtype == correction and a["c"].shape == a["p"].shape, what
            assert torch.equal(a["p"], rounding.split(wa, correction)[0]), f"{what}: p is not its master's bf16"
        # Within 8 fp32 ulps of the row's largest weight (3.5 seen), plus, where the stored values
        # differ, one unit of the stored precision: a bf16/fp16 ulp, 2^-15·|w| for a 24-bit master,
        # none for a 32-bit one (exact). A parameter read without its correction is 2^-9·|w| off.
        unit = {None: torch.finfo(dtype).eps, torch.int8: 2.0**-15, torch.int16: 0.0}[correction]
        bound = unit * wb.abs() + 8 * 2.0**-24 * wb.abs().amax(dim=1, keepdim=True)
        excess = (wa - wb).abs() - bound
        assert (excess <= 0).all(), f"{what}: weights apart by up to {float(excess.max())} beyond their bound"
        if correction != torch.int16 and dtype != torch.float32:
            # Rounded to 16 or 24 bits, the two values round alike but where they straddle a rounding
            # boundary (0.3-0.7% of a 24-bit master's, fewer for bf16/fp16; other bits: about half).
            # A 32-bit master (or an fp32 parameter) keeps every last bit of its sums (30-55% of them
            # differ): its bound only.
            differ = int((wa != wb).sum())
            assert differ <= 0.02 * wa.numel() + 2, f"{what}: {differ} of {wa.numel()} weights differ"


@pytest.mark.parametrize("projected", [False, True], ids=["equilibrium", "projected"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("storage", list(ROT_LP_STORAGES))
def test_emulated_rotational_low_precision_matches_reference(emu, storage, name, projected):
    """The rotational kernel with ``rng`` (stochastic rounding of p in lane 0, state1 in lane 1,
    state2 in lane 2) and ``correction`` (compensated bf16: every read of p is its master weight,
    the new one stored split, a 24-bit one rounded with lane 0's bits under rng), zero_mean, three
    steps in lock step with wdopt.reference.rotational through a Rounder (each step from the
    reference's weights and state, the counts advanced between steps as the driver does), on
    chip and on the two-pass path in one call; the last step monitored, its telemetry the
    specification's row sums of the weights the rotation sees (masters: ω and Δω as loaded and
    stored)."""
    rng = _rng_states(len(ROT_LP_SHAPES))
    want = _rot_lp_problem(storage)
    got = _rot_lp_problem(storage)
    dtype = ROT_LP_STORAGES[storage][0]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = _rot_lp_grads(gen, dtype)
        _rot_lp_copy(got, want)
        before = [_rot_lp_weights(s) for s in got]
        _rot_lp_reference(name, want, grads, rng if ROT_LP_STORAGES[storage][1] else None, projected)
        monitored = step == 2
        if monitored:
            tel_rows = [k for k, _ in ROT_LP_SHAPES]
            bufs, _keep = _telemetry(emu, [s["p"] for s in got], tel_rows)  # the C tables alive through the call
        try:
            _rot_lp_emulated(emu, storage, name, got, grads, rng, projected)
        finally:
            emu.emu_set_telemetry(None, None)
        _rot_lp_assert_matches(storage, name, got, want, first=step == 0)
        if monitored:
            _assert_telemetry(bufs, before, [_rot_lp_weights(s) for s in got], grads, tel_rows)
        for r in rng:
            r[1] += 1


def test_emulated_rotational_low_precision_check_can_fail(emu):
    """The comparison above can fail: against the specification with another key, with the
    parameter read without its correction, or with a 24-bit master split to nearest or with lane
    1's bits instead of lane 0's, it does; the state's stores in lanes 1-2 catch a wrong key even where the
    parameter's split takes no bits (32-bit masters). And ROT_LP_SHAPES take both paths: the long
    row's weights are those of a call with every row on the two-pass path, the others those of a
    call with every row on chip, and the two paths round the long row differently."""
    gen = torch.Generator().manual_seed(2)
    grads = _rot_lp_grads(gen, torch.bfloat16)

    def emulated(storage, rng, on_chip_bytes=ROT_LP_ON_CHIP):
        sides = _rot_lp_problem(storage)
        _rot_lp_emulated(emu, storage, "adamw", sides, grads, rng, False, on_chip_bytes)
        return sides

    def reference(storage, rng, compensated=True, master_lane=0):
        """``master_lane``: the lane whose bits split a 24-bit master (None: to nearest)."""
        class Rounder(rounding.Rounder):
            def bits(self, lane, device):
                if lane != 0:
                    return super().bits(lane, device)
                return None if master_lane is None else super().bits(master_lane, device)

        sides = _rot_lp_problem(storage)
        if not compensated:
            for side in sides:
                side["c"] = None
        _rot_lp_reference("adamw", sides, grads, rng, False, Rounder)
        return sides

    rng = _rng_states(len(ROT_LP_SHAPES))
    wrong_key = [r.clone() for r in rng]
    for r in wrong_key:
        r[0] += 1
    for storage in ("bf16-sr", "bf16-master24-sr", "bf16-master32-sr"):
        got = emulated(storage, rng)
        _rot_lp_assert_matches(storage, "adamw", got, reference(storage, rng), first=True)
        with pytest.raises(AssertionError):
            _rot_lp_assert_matches(storage, "adamw", got, reference(storage, wrong_key), first=True)
        if storage != "bf16-sr":  # (its frozen norms already differ)
            with pytest.raises(AssertionError):
                _rot_lp_assert_matches(storage, "adamw", got, reference(storage, rng, compensated=False), first=True)
    got = emulated("bf16-master24-sr", rng)
    for lane in (None, 1):  # the states' stores (lanes 1, 2) as before: only the masters can differ
        with pytest.raises(AssertionError, match="weights"):
            want = reference("bf16-master24-sr", rng, master_lane=lane)
            _rot_lp_assert_matches("bf16-master24-sr", "adamw", got, want, first=True)
    # the paths: the long row (two passes) and the others (on chip) of the mixed call
    mixed, two_pass = emulated("bf16-master32-sr", rng), emulated("bf16-master32-sr", rng, on_chip_bytes=1)
    on_chip = emulated("bf16-master32-sr", rng, on_chip_bytes=0)  # the default buffers: every row on chip
    for i, side in enumerate(mixed):
        same = two_pass[i] if i == len(mixed) - 1 else on_chip[i]
        assert torch.equal(side["p"], same["p"]) and torch.equal(side["c"], same["c"]), ROT_LP_SHAPES[i]
    assert not torch.equal(_rot_lp_weights(mixed[-1]), _rot_lp_weights(on_chip[-1]))
    assert not torch.equal(_rot_lp_weights(mixed[1]), _rot_lp_weights(two_pass[1]))


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 32), (torch.float16, 24), (torch.bfloat16, 16)], ids=str)
def test_emulated_rotational_invalid_corrections_write_nothing(emu, dtype, bits):
    """Corrections with a parameter dtype other than bf16, or of a width other than 24 or 32 bits:
    an invalid value before any launch (no step count advanced, nothing written). (The operator's
    checks of rng and correction lists are csrc/cuda/binding.cpp's, whose syntax the slow test
    above checks; they run before anything is written.)"""
    sides = _rot_lp_problem("bf16-sr")
    for side in sides:
        side["p"] = side["p"].to(dtype)
        side["s1"], side["s2"] = side["s1"].to(dtype), side["s2"].to(dtype)
    before = [{k: v.clone() for k, v in side.items() if isinstance(v, torch.Tensor)} for side in sides]
    corrections = [torch.zeros(side["p"].shape, dtype=torch.int16) for side in sides]
    grads = _rot_lp_grads(torch.Generator().manual_seed(0), dtype)
    launches = emu.emu_launches()
    emu.emu_set_corrections(_ptrs(corrections), bits)
    try:
        with pytest.raises(AssertionError):  # _emu_rotational asserts err == 0
            _emu_rotational(emu, "adamw", dtype, [s["p"] for s in sides], grads, sides, ROT_LP_HYPER)
    finally:
        emu.emu_set_corrections(None, 32)
    assert emu.emu_launches() == launches
    for side, old in zip(sides, before):
        for key, value in old.items():
            assert torch.equal(side[key], value), key


def test_emulated_rotational_rng_leaves_float32_rounded_to_nearest(emu):
    """rng with a float32 call: ignored (to nearest), as the reference and the CPU kernel do."""
    grads = [g.float() for g in _rot_lp_grads(torch.Generator().manual_seed(0), torch.float32)]
    results = []
    for rng in (None, _rng_states(len(ROT_LP_SHAPES))):
        sides = _rot_lp_problem("bf16-sr")
        for side in sides:
            side["p"], side["s1"], side["s2"] = side["p"].float(), side["s1"].float(), side["s2"].float()
        emu.emu_set_rng(_ptrs(rng) if rng else None)
        try:
            _emu_rotational(emu, "lion", torch.float32, [s["p"] for s in sides], grads, sides, ROT_LP_HYPER,
                            on_chip_bytes=ROT_LP_ON_CHIP)
        finally:
            emu.emu_set_rng(None)
        results.append(sides)
    for a, b in zip(*results):
        for key in ("p", "s1", "rotational_norm", "update_norm_avg"):
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ rotational, 8-bit states

# Storages of the 8-bit rotational tests: (dtype, stochastic rounding, correction dtype or None):
# fp32 parameters with codes to nearest, or stochastic (rng: the parameter still to nearest, as the
# reference's Rounder), and bf16 with a 24-bit master, stochastic rounding of the parameter (lane 0)
# and stochastic codes (lanes 1, 2). ROT_LP_SHAPES: 30, 903 and 3202 elements, so 256-element
# blocks straddle rows (rotated on chip and on the two-pass path) and end short.
ROT_Q_STORAGES = {
    "fp32": (torch.float32, False, None),
    "fp32-sr": (torch.float32, True, None),
    "bf16-master24-sr": (torch.bfloat16, True, torch.int8),
}


def _rot_q_problem(storage, name, seed=5):
    """_rot_lp_problem's weights with 8-bit states: s1 int8 codes, s2 uint8 codes (AdamW), and
    their block scales k1, k2, all zero (a fresh state)."""
    out = _rot_lp_problem(storage, seed, ROT_Q_STORAGES)
    for side in out:
        k, c = side["p"].shape
        side["s1"], side["s2"] = torch.zeros(k, c, dtype=torch.int8), torch.zeros(k, c, dtype=torch.uint8)
        side["k1"], side["k2"] = (torch.zeros(quantization.blocks(k * c)) for _ in range(2))
    return out


def _rot_q_reference(name, sides, grads, rng, projected, rounder=rounding.Rounder):
    """The specification's step, each tensor's Rounder holding its block scales (lane 1: s1's,
    lane 2: s2's; encoded stochastically with its rng where given)."""
    for i, (side, g) in enumerate(zip(sides, grads)):
        scales = {1: side["k1"], 2: side["k2"]} if name == "adamw" else {1: side["k1"]}
        store = rounder(rng[i] if rng is not None else None, side["p"], side["c"], scales)
        _rot_reference_step(name, side["p"], g, side, ROT_LP_HYPER, True, projected, False, None, side["p"].shape[0],
                            store=store)
        side["first"] = False


def _rot_q_emulated(emu, storage, name, sides, grads, rng, projected, found_inf=None, dtype=None, hyper=ROT_LP_HYPER):
    _, sr, correction = ROT_Q_STORAGES[storage]
    scales = [s["k1"] for s in sides] + ([s["k2"] for s in sides] if name == "adamw" else [])
    keep = (_ptrs(rng) if sr else None, _ptrs([s["c"] for s in sides]) if correction is not None else None,
            _ptrs(scales, ctypes.c_void_p))
    emu.emu_set_rng(keep[0])
    emu.emu_set_corrections(keep[1], 32 if correction == torch.int16 else 24)
    emu.emu_set_scales(keep[2])
    try:
        _emu_rotational(emu, name, dtype or ROT_Q_STORAGES[storage][0], [s["p"] for s in sides], grads, sides,
                        hyper, projected=projected, on_chip_bytes=ROT_LP_ON_CHIP, found_inf=found_inf)
    finally:
        emu.emu_set_rng(None)
        emu.emu_set_corrections(None, 32)
        emu.emu_set_scales(None)


def _rot_q_copy(into, source):
    _rot_lp_copy(into, source)
    for a, b in zip(into, source):
        a["k1"].copy_(b["k1"])
        a["k2"].copy_(b["k2"])


def _rot_q_assert_matches(storage, name, got, want, first):
    """Codes (s1, s2) and block scales bit for bit, the rest as _rot_lp_assert_matches compares it."""
    for i, (a, b) in enumerate(zip(got, want)):
        for key in ("k1", "k2") if name == "adamw" else ("k1",):
            assert torch.equal(a[key], b[key]), f"{storage} {name} {ROT_LP_SHAPES[i]}: scales {key} differ"
    _rot_lp_assert_matches(storage, name, got, want, first, spec=ROT_Q_STORAGES[storage])


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("storage", list(ROT_Q_STORAGES))
def test_emulated_rotational_8_bit_states_match_reference(emu, storage, name):
    """The rotational kernel with 8-bit states (scales given): its row phase decodes the old codes
    with the old scales and rotates with the new fp32 states, its block phase (QuantizedKernel,
    states only) recomputes them and encodes them with each 256-element block's new scale. Three
    steps in lock step with wdopt.reference.rotational through a Rounder holding the scales (each
    step from the reference's weights, codes and scales; the rng's count advanced between steps):
    codes, scales and step counts bit for bit, the weights as the low-precision test compares
    them; on chip and on the two-pass path in one call, the middle step monitored."""
    sr = ROT_Q_STORAGES[storage][1]
    dtype = ROT_Q_STORAGES[storage][0]
    rng = _rng_states(len(ROT_LP_SHAPES))
    want, got = _rot_q_problem(storage, name), _rot_q_problem(storage, name)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = _rot_lp_grads(gen, dtype)
        _rot_q_copy(got, want)
        before = [_rot_lp_weights(s).clone() for s in got]  # (an fp32 parameter's is itself)
        _rot_q_reference(name, want, grads, rng if sr else None, False)
        monitored = step == 1
        if monitored:
            tel_rows = [k for k, _ in ROT_LP_SHAPES]
            bufs, _keep = _telemetry(emu, [s["p"] for s in got], tel_rows)
        try:
            _rot_q_emulated(emu, storage, name, got, grads, rng, False)
        finally:
            emu.emu_set_telemetry(None, None)
        _rot_q_assert_matches(storage, name, got, want, first=step == 0)
        assert all(s["k1"].gt(0).all() for s in got), "every block's state is nonzero"
        if monitored:
            _assert_telemetry(bufs, before, [_rot_lp_weights(s) for s in got], grads, tel_rows)
        for r in rng:
            r[1] += 1


def test_emulated_rotational_8_bit_states_check_can_fail(emu):
    """The comparison above fails against the specification with another key (stochastic codes
    and parameter), or with the states encoded to nearest, and the emulated codes are not those of
    a to-nearest encoding."""
    storage = "bf16-master24-sr"
    grads = _rot_lp_grads(torch.Generator().manual_seed(2), torch.bfloat16)
    rng = _rng_states(len(ROT_LP_SHAPES))
    got = _rot_q_problem(storage, "adamw")
    _rot_q_emulated(emu, storage, "adamw", got, grads, rng, False)
    want = _rot_q_problem(storage, "adamw")
    _rot_q_reference("adamw", want, grads, rng, False)
    _rot_q_assert_matches(storage, "adamw", got, want, first=True)
    wrong_key = [r.clone() for r in rng]
    for r in wrong_key:
        r[0] += 1

    class ToNearestStates(rounding.Rounder):
        def bits(self, lane, device):
            return super().bits(lane, device) if lane == 0 else None

    for key, rounder in ((wrong_key, rounding.Rounder), (rng, ToNearestStates)):
        want = _rot_q_problem(storage, "adamw")
        _rot_q_reference("adamw", want, grads, key, False, rounder)
        with pytest.raises(AssertionError):
            _rot_q_assert_matches(storage, "adamw", got, want, first=True)


def test_emulated_rotational_8_bit_states_found_inf_and_invalid_write_nothing(emu):
    """A skipped step (found_inf) writes nothing: no parameter, code, scale or count. Scales with
    float64, or with SGD without momentum (no state): an invalid value before any launch."""
    storage = "fp32"
    grads = _rot_lp_grads(torch.Generator().manual_seed(3), torch.float32)
    sides = _rot_q_problem(storage, "adamw")
    _rot_q_emulated(emu, storage, "adamw", sides, grads, None, False)  # nonzero codes and scales
    before = [{k: v.clone() for k, v in side.items() if isinstance(v, torch.Tensor)} for side in sides]
    _rot_q_emulated(emu, storage, "adamw", sides, grads, None, False, found_inf=torch.tensor(1.0))
    launches = emu.emu_launches()
    for name, dtype, hyper in (("adamw", torch.float64, ROT_LP_HYPER),
                               ("sgd", torch.float32, dict(ROT_LP_HYPER, momentum=0.0))):
        with pytest.raises(AssertionError):  # _emu_rotational asserts err == 0
            _rot_q_emulated(emu, storage, name, sides, grads, None, False, dtype=dtype, hyper=hyper)
    assert emu.emu_launches() == launches
    for side, old in zip(sides, before):
        for key, value in old.items():
            assert torch.equal(side[key], value), key
