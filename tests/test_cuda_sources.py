"""The CUDA backend's sources on any machine, GPU or not.

* csrc/cuda/kernels.cu compiles with nvcc for sm_80 and sm_90 with the flags the extension is
  built with, without a warning, spill or local-memory use; its PTX has the properties speed and
  exactness rest on (16-byte vector accesses, IEEE division/square root, no FMA contraction).
* csrc/cuda/binding.cpp passes the host compiler's syntax check against torch's headers.
* The engine's logic runs on the CPU: kernels.cu built with WDOPT_HOST_EMULATION executes every
  launch as host loops over blocks and threads, and must reproduce the reference bit for bit
  (chunking, tails, misaligned tensors, table batching, step counts, GradScaler, capturable lr).

Without nvcc the nvcc tests skip, except in CI (CI=true), where a missing nvcc is a failure.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from wdopt import reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS = CUDA_DIR / "kernels.cu"
BINDING = CUDA_DIR / "binding.cpp"
IN_CI = os.environ.get("CI", "").lower() == "true"

# What torch.utils.cpp_extension passes to nvcc, plus the flags wdopt's build adds.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
NVCC_FLAGS = ["-std=c++17", "--fmad=false", "-O3"]
ARCHS = (80, 90)


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


@pytest.fixture(scope="module")
def nvcc_build(tmp_path_factory):
    """One nvcc run for both architectures, keeping the PTX."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("nvcc")
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd = [nvcc, *NVCC_FLAGS, *TORCH_NVCC_FLAGS, *gencode, "--threads", "2", "-Xcompiler", "-Wall",
           "-Xptxas", "-warn-spills,-warn-lmem-usage,-v", "--keep", "--keep-dir", str(out),
           "-c", str(KERNELS), "-o", str(out / "kernels.o")]
    result = _run(cmd, cwd=out)
    return result, out


def test_kernels_compile_for_sm80_and_sm90_without_warnings(nvcc_build):
    result, out = nvcc_build
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed ({result.returncode}):\n{log[-6000:]}"
    assert (out / "kernels.o").stat().st_size > 0
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings[:20])
    # ptxas -v: no kernel may use a stack frame (the tensor table must stay in parameter space).
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    assert frames, log[-3000:]
    assert all(f == ("0", "0") for f in frames), sorted(set(frames))


def _ptx_entries(out: Path, arch: int) -> dict[str, str]:
    ptx = [p for p in out.glob("*.ptx") if f"sm_{arch}" in p.name or f"compute_{arch}" in p.name]
    assert len(ptx) == 1, [p.name for p in out.glob("*.ptx")]
    text = ptx[0].read_text()
    entries = {}
    for m in re.finditer(r"^(?:\.visible\s+)?\.entry\s+(\S+)\(", text, re.M):
        body = text[m.end(): text.index("\n}", m.end())]
        entries[m.group(1)] = body
    return entries


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_ptx_is_vectorized_and_exact(nvcc_build, arch):
    result, out = nvcc_build
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    entries = _ptx_entries(out, arch)
    updates = {k: v for k, v in entries.items() if "UpdateKernel" in k}
    # AdamW (4 dtypes x amsgrad), SGD (4 dtypes x 6 momentum/nesterov/decoupled cases), Lion (4 dtypes).
    assert len(updates) == 8 + 24 + 4, sorted(updates)
    assert sum("AdamWCoefficientKernel" in k for k in entries) == 2
    for name, body in updates.items():
        assert re.search(r"ld\.global(\.nc)?\.v(4|2)\.", body), f"{name}: no 16-byte vector load"
        assert re.search(r"st\.global\.v(4|2)\.", body), f"{name}: no 16-byte vector store"
        assert not re.search(r"\b(div|sqrt|rcp)\.approx", body), f"{name}: approximate division or sqrt"
        assert not re.search(r"\b(div|sqrt)\.full", body), f"{name}: approximate division"
        assert not re.search(r"\bfma\.rn\.f(32|64)\b", body), f"{name}: contracted FMA (build with --fmad=false)"
        assert ".local" not in body, f"{name}: local memory"


# ------------------------------------------------------------------------------------ binding


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
    cmd = [compiler, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for d in torch_includes + cuda_includes:
        cmd += ["-isystem", d]
    result = _run(cmd + [str(BINDING)], cwd=ROOT, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "warning" not in log.lower(), log[-6000:]


# ------------------------------------------------------------------------------------ host emulation

SHIM = r"""
#define WDOPT_HOST_EMULATION 1
#include "kernels.cu"

namespace wc = wdopt::cuda;
namespace {
wc::DeviceScalar scalar(const void* p, int is_double) {
  wc::DeviceScalar s;
  s.ptr = p;
  s.is_double = is_double != 0;
  return s;
}
wc::GradOptions grad(const void* gs, int gs_d, const void* fi, int fi_d, int maximize) {
  wc::GradOptions g;
  g.grad_scale = scalar(gs, gs_d);
  g.found_inf = scalar(fi, fi_d);
  g.maximize = maximize != 0;
  return g;
}
}  // namespace

extern "C" {
int emu_adamw(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** m, void** v,
              void** vmax, float** steps, const double* h, int amsgrad, int maximize, const void* lr_t, int lr_d,
              const void* gs, int gs_d, const void* fi, int fi_d, void* scratch) {
  wc::AdamWArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.exp_avgs = m; a.exp_avg_sqs = v;
  a.max_exp_avg_sqs = vmax; a.steps = steps;
  a.lr = h[0]; a.beta1 = h[1]; a.beta2 = h[2]; a.eps = h[3]; a.weight_decay = h[4]; a.decay_lr_scale = h[5];
  a.amsgrad = amsgrad != 0; a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  a.scratch = scratch;
  return static_cast<int>(wc::adamw(a, nullptr));
}
int emu_sgd(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** b, const uint8_t* first,
            const double* h, int nesterov, int decoupled, int maximize, const void* lr_t, int lr_d,
            const void* gs, int gs_d, const void* fi, int fi_d) {
  wc::SGDArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.momentum_buffers = b; a.first_steps = first;
  a.lr = h[0]; a.weight_decay = h[1]; a.momentum = h[2]; a.dampening = h[3]; a.decay_lr_scale = h[4];
  a.nesterov = nesterov != 0; a.decoupled_weight_decay = decoupled != 0;
  a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  return static_cast<int>(wc::sgd(a, nullptr));
}
int emu_lion(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** m, const double* h,
             int maximize, const void* lr_t, int lr_d, const void* gs, int gs_d, const void* fi, int fi_d) {
  wc::LionArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.exp_avgs = m;
  a.lr = h[0]; a.beta1 = h[1]; a.beta2 = h[2]; a.weight_decay = h[3]; a.decay_lr_scale = h[4];
  a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  return static_cast<int>(wc::lion(a, nullptr));
}
int64_t emu_scratch_bytes(int64_t n) { return static_cast<int64_t>(wc::adamw_scratch_bytes(n)); }
int64_t emu_launches() { return wc::launch_count(); }
int emu_table_capacity(int depth) {
  switch (depth) {
    case 2: return wc::TensorTable<2>::kCapacity;
    case 3: return wc::TensorTable<3>::kCapacity;
    case 4: return wc::TensorTable<4>::kCapacity;
    case 5: return wc::TensorTable<5>::kCapacity;
  }
  return -1;
}
int emu_step_capacity() { return wc::StepTable::kCapacity; }
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """kernels.cu in host-emulation mode, built by the host compiler into a shared library."""
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
    (out / "shim.cpp").write_text(SHIM)
    # No FMA contraction, as the device build (--fmad=false) and the reference.
    cmd = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra",
           f"-I{CUDA_DIR}", *[f"-isystem{d}" for d in includes], str(out / "shim.cpp"), "-o", str(out / "emu.so")]
    result = _run(cmd, cwd=out)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "warning" not in log.lower(), log[-6000:]
    lib = ctypes.CDLL(str(out / "emu.so"))
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    grad_args = [P, I, P, I, P, I]  # lr_tensor, grad_scale, found_inf: (pointer, is_double)
    lib.emu_adamw.argtypes = [I, I64, P, P, P, P, P, P, P, P, I, I] + grad_args + [P]
    lib.emu_sgd.argtypes = [I, I64, P, P, P, P, P, P, I, I, I] + grad_args
    lib.emu_lion.argtypes = [I, I64, P, P, P, P, P, I] + grad_args
    lib.emu_scratch_bytes.argtypes = [I64]
    lib.emu_table_capacity.argtypes = [I]
    for name in ("emu_scratch_bytes", "emu_launches"):
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
    err = emu.emu_sgd(DTYPE_CODES[dtype], n, _numels(params), _ptrs(params), _ptrs(grads), _ptrs(buffers),
                      (ctypes.c_uint8 * n)(*first), (ctypes.c_double * 5)(*hyper.values()), nesterov, decoupled,
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
