"""The C++ backends, "cpu" and "cuda": one extension holding the torch.library operators
``wdopt::adamw_``, ``wdopt::sgd_``, ``wdopt::lion_`` and ``wdopt::rotational_`` (schemas in
csrc/ops.cpp) with CPU and, when built with nvcc against a CUDA torch, CUDA implementations. The
kernels gather rotation telemetry in the same pass when asked (``telemetry=``).

The extension comes from ``pip install`` (setup.py builds it when torch is importable at build
time) or is compiled here on first use with torch's JIT builder and ninja, then cached in
``TORCH_EXTENSIONS_DIR``. Set ``WDOPT_BUILD_CUDA=0``/``1`` to skip or force the CUDA sources.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

from .. import __version__

_extension_loaded = False
_load_error: str | None = None

# Plain IEEE arithmetic, no FMA contraction: the backends agree with the reference bit for bit.
# -fno-math-errno lets sqrt vectorize (it changes no result, only drops errno for sqrt(<0)).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# JIT builds are for this machine only: its full vector width (x86: AVX-512 where present).
NATIVE_FLAGS = ["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


def openmp_link_flags() -> list[str]:
    """at::parallel_for is inline OpenMP: the extension must be compiled with -fopenmp, and should
    share torch's OpenMP runtime (one thread pool) rather than bring a second one."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return [f"-l:{bundled[0].name}"] if bundled else ["-lgomp"]


def source_dir() -> Path | None:
    """csrc/ of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "_csrc", here.parents[2] / "csrc"):
        if (candidate / "ops.cpp").exists():
            return candidate
    return None


def sources(with_cuda: bool) -> list[str]:
    root = source_dir()
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += [*sorted((root / "cuda").glob("*.cu")), *sorted((root / "cuda").glob("*.cpp"))]
    return [str(f) for f in files]


def cuda_buildable() -> str | None:
    """None when the CUDA sources can be compiled here, else why not."""
    if os.environ.get("WDOPT_BUILD_CUDA") == "0":
        return "WDOPT_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return "this torch has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME)"
    if source_dir() is None or not any((source_dir() / "cuda").glob("*.cu")):
        return "the CUDA sources are not installed"
    return None


def prebuilt_available() -> bool:
    return importlib.util.find_spec("wdopt._C") is not None


def unavailable_reason() -> str | None:
    """Why the extension cannot be loaded or built here (cheap: builds nothing)."""
    if _extension_loaded:
        return None
    if _load_error is not None:
        return _load_error
    if prebuilt_available():
        return None
    if source_dir() is None:
        return "no prebuilt extension and no C++ sources to build one"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (install g++ or set CXX)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def loaded() -> bool:
    return _extension_loaded


def has_cuda_kernels() -> bool:
    return _extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("wdopt::adamw_", "CUDA")


def load(verbose: bool = False) -> None:
    """Import the prebuilt extension or JIT-build it; raise RuntimeError saying why not."""
    global _extension_loaded, _load_error
    if _extension_loaded:
        return
    if _load_error is not None:
        raise RuntimeError(_load_error)
    try:
        if prebuilt_available():
            torch.ops.load_library(importlib.util.find_spec("wdopt._C").origin)
        else:
            reason = unavailable_reason()
            if reason is not None:
                raise RuntimeError(reason)
            if cuda_buildable() is None:
                try:
                    _jit_build(with_cuda=True, verbose=verbose)
                except Exception as error:  # keep the CPU kernels when only the CUDA part fails
                    warnings.warn(f"wdopt: building the CUDA kernels failed ({_first_error_line(error)}); "
                                  "building the CPU kernels alone", RuntimeWarning, stacklevel=2)
                    _jit_build(with_cuda=False, verbose=verbose)
            else:
                _jit_build(with_cuda=False, verbose=verbose)
    except Exception as error:  # a compiler error, a missing tool: remember it, say it once
        _load_error = f"building the C++ extension failed: {_first_error_line(error)}"
        raise RuntimeError(_load_error) from error
    _register_fakes()
    _extension_loaded = True


def _jit_build(with_cuda: bool, verbose: bool) -> None:
    from torch.utils.cpp_extension import load as jit_load

    cflags = CXX_FLAGS + NATIVE_FLAGS
    # One cache entry per checkout, version, flag set and machine: two checkouts never overwrite
    # each other's build, and a home directory shared by different CPUs never loads a build made
    # with another CPU's instructions.
    identity = "|".join([str(source_dir()), __version__, torch.__version__, " ".join(cflags), str(with_cuda),
                         platform.machine(), _cpu_flags()])
    name = f"wdopt_C{'_cuda' if with_cuda else ''}_{hashlib.sha1(identity.encode()).hexdigest()[:12]}"
    jit_load(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=cflags,
        extra_ldflags=openmp_link_flags(),
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(source_dir() / "include")],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _first_error_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [repr(error)]
    for line in lines:
        if "error" in line.lower():
            return line.strip()[:500]
    return lines[-1].strip()[:500]


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace through a step: each op only
    mutates its arguments in place and returns nothing."""
    for name in ("adamw_", "sgd_", "lion_", "rotational_"):
        qualified = f"wdopt::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"):
            continue

        def fake(*args, **kwargs):
            return None

        torch.library.register_fake(qualified)(fake)


# ---------------------------------------------------------------- the backend interface

#: The kernels write rotation telemetry in the update pass (wdopt/reference/telemetry.py).
TELEMETRY = True


def _lr_args(lr):
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
          decay_lr_scale, amsgrad, maximize, grad_scale=None, found_inf=None, telemetry=()) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    torch.ops.wdopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps, list(telemetry),
        lr=lr_value, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay_lr_scale=decay_lr_scale,
        amsgrad=amsgrad, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


def sgd(params, grads, momentum_buffers, first_steps, *, lr, weight_decay, momentum, dampening, nesterov,
        decoupled_weight_decay, decay_lr_scale, maximize, grad_scale=None, found_inf=None, telemetry=()) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    has_momentum = momentum != 0
    torch.ops.wdopt.sgd_(
        params, grads, momentum_buffers if has_momentum else [], list(first_steps) if has_momentum else [],
        list(telemetry),
        lr=lr_value, weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        decoupled_weight_decay=decoupled_weight_decay, decay_lr_scale=decay_lr_scale, maximize=maximize,
        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, decay_lr_scale, maximize,
         grad_scale=None, found_inf=None, telemetry=()) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    torch.ops.wdopt.lion_(
        params, grads, exp_avgs, list(telemetry), lr=lr_value, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        decay_lr_scale=decay_lr_scale, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
        found_inf=found_inf)


def rotational_available(device: torch.device) -> bool:
    """Whether the extension has a rotational kernel for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("wdopt::rotational_", key)


def rotational(optimizer, params, grads, state1, state2, steps, rotational_norms, update_norm_avgs, rotational_steps,
               first_steps, *, lr, beta1, beta2, eps, momentum, nesterov, angle, undf, rotational_eps, zero_mean,
               projected, maximize, grad_scale=None, found_inf=None, telemetry=()) -> None:
    """The rotational step of ``optimizer`` ("adamw", "sgd", "lion") on contiguous tensors."""
    torch.ops.wdopt.rotational_(
        optimizer, params, grads, state1, state2, steps, rotational_norms, update_norm_avgs, rotational_steps,
        list(first_steps), list(telemetry), lr=lr, beta1=beta1, beta2=beta2, eps=eps, momentum=momentum,
        nesterov=nesterov, angle=angle, undf=undf, rotational_eps=rotational_eps, zero_mean=zero_mean,
        projected=projected, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
