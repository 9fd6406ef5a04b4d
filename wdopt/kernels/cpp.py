"""The C++ backends, "cpu" and "cuda": one extension holding the torch.library operators
``wdopt::adamw_``, ``wdopt::sgd_``, ``wdopt::lion_`` and ``wdopt::rotational_`` (schemas in
csrc/ops.cpp) with CPU and, when built with nvcc against a CUDA torch, CUDA implementations. The
kernels gather rotation telemetry in the same pass when asked (``telemetry=``).

The extension comes from ``pip install`` (setup.py builds it when torch is importable at build
time) or is compiled here on first use with torch's JIT builder and ninja, then cached in
``TORCH_EXTENSIONS_DIR``. The CUDA kernels are built where a GPU is visible, or when asked for
with ``TORCH_CUDA_ARCH_LIST`` or ``WDOPT_BUILD_CUDA=1`` (``WDOPT_BUILD_CUDA=0`` skips them); the
rules and the cache's naming and locking are in build.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from . import build

_extension_loaded = False
_load_error: str | None = None
_build_dir: Path | None = None
_library: str | None = None  # the loaded extension's file

# Plain IEEE arithmetic, no FMA contraction: the backends agree with the reference bit for bit.
# -fno-math-errno lets sqrt vectorize (it changes no result, only drops errno for sqrt(<0)).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# JIT builds are for this machine only: its full vector width (x86: AVX-512 where present).
NATIVE_FLAGS = ["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
# No -std here: torch's builder adds the standard its own headers need (c++17 up to some torch
# versions, c++20 from torch 2.13's builder on, required by 2.14's headers); a fixed one breaks
# one of them (build.cxx_standard says which it is, for compiles outside torch's builder).
# -compress-all: fatbinary compresses a cubin only past a size that the kernels of one .cu file no
# longer reach since they were split across files (csrc/cuda/common.cuh); uncompressed, an sm_90
# build's library grew from 6 MB to 25 MB, and a wheel's grows with each architecture.
NVCC_FLAGS = ["-O3", "--fmad=false", "-Xfatbin=-compress-all"]


class _NoCudaRuntimeNotice(logging.Filter):
    """torch logs "No CUDA runtime is found, using CUDA_HOME=..." when its cpp_extension module is
    imported on a machine with nvcc and no GPU. wdopt has then already decided not to build the
    CUDA kernels (and ``wdopt env`` says why); to a newcomer the line reads like an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its no-GPU notice."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeNotice()
    logger.addFilter(quiet)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


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
    files = [root / "ops.cpp", root / "step_plan.cpp", root / "fast_checks.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += [*sorted((root / "cuda").glob("*.cu")), *sorted((root / "cuda").glob("*.cpp"))]
    return [str(f) for f in files]


def cuda_plan() -> build.CudaPlan:
    """Whether the JIT build includes the CUDA kernels, for which GPUs, and why (build.decide_cuda).
    Raises build.BuildError when WDOPT_BUILD_CUDA=1 asks for what cannot be built here."""
    if torch.version.cuda is None:
        cuda_home = None  # and no cpp_extension import just to learn that
    else:
        cuda_home = _cpp_extension().CUDA_HOME
    root = source_dir()
    have_sources = root is not None and any((root / "cuda").glob("*.cu"))
    return build.cuda_plan(cuda_home, have_sources)


def cuda_buildable() -> str | None:
    """None when the JIT build will include the CUDA kernels, else why not."""
    try:
        plan = cuda_plan()
    except build.BuildError as error:
        return str(error)
    return None if plan.build else plan.why


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
    if not _cpp_extension().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def loaded() -> bool:
    return _extension_loaded


def load_if_built() -> bool:
    """Load the extension if that compiles nothing (it is loaded, prebuilt, or in the JIT cache);
    whether it is loaded. For optional uses (the Triton backend's fast path), where a first-use
    compile would surprise."""
    if _extension_loaded:
        return True
    if _load_error is not None:
        return False
    try:
        if not prebuilt_available():
            plan = cuda_plan()
            if not jit_cached(plan.build, plan.arch_list if plan.build else None):
                return False
        load()
    except Exception:  # noqa: BLE001 — optional: the caller goes on without it
        return False
    return True


def has_cuda_kernels() -> bool:
    return _extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("wdopt::adamw_", "CUDA")


def load(verbose: bool = False) -> None:
    """Import the prebuilt extension or JIT-build it; raise RuntimeError saying why not."""
    global _extension_loaded, _load_error, _library
    if _extension_loaded:
        return
    if _load_error is not None:
        raise RuntimeError(_load_error)
    try:
        if prebuilt_available():
            _library = importlib.util.find_spec("wdopt._C").origin
            torch.ops.load_library(_library)
        else:
            reason = unavailable_reason()
            if reason is not None:
                raise RuntimeError(reason)
            plan = cuda_plan()
            if plan.build:
                try:
                    _jit_build(with_cuda=True, arch_list=plan.arch_list, verbose=verbose)
                except Exception as error:  # keep the CPU kernels when only the CUDA part fails
                    warnings.warn(f"wdopt: building the CUDA kernels failed ({_first_error_line(error)}); "
                                  "building the CPU kernels alone", RuntimeWarning, stacklevel=2)
                    _jit_build(with_cuda=False, arch_list=None, verbose=verbose)
            else:
                _jit_build(with_cuda=False, arch_list=None, verbose=verbose)
    except Exception as error:  # a compiler error, a missing tool: remember it, say it once
        _load_error = f"building the C++ extension failed: {_first_error_line(error)}"
        raise RuntimeError(_load_error) from error
    _register_fakes()
    _extension_loaded = True


def build_flags(with_cuda: bool) -> dict:
    """What the JIT build passes to torch's builder (and what names its cache entry)."""
    return dict(cflags=CXX_FLAGS + NATIVE_FLAGS, cuda_flags=NVCC_FLAGS if with_cuda else [],
                ldflags=openmp_link_flags())


def jit_identity(with_cuda: bool, arch_list: str | None) -> dict[str, str]:
    flags = build_flags(with_cuda)
    return build.build_identity(
        wdopt_version=__version__, sources=build.source_digest(source_dir()), with_cuda=with_cuda,
        cflags=flags["cflags"], cuda_flags=flags["cuda_flags"], ldflags=flags["ldflags"], arch_list=arch_list,
        compiler=build.tool_identity(os.environ.get("CXX", "c++")),
        nvcc=build.tool_identity(build.find_nvcc(_cpp_extension().CUDA_HOME)) if with_cuda else None)


def jit_build_dir(with_cuda: bool, arch_list: str | None) -> Path:
    """The cache folder of this environment's build: one per identity (build.build_identity)."""
    return build.extensions_root() / build.cache_name(jit_identity(with_cuda, arch_list))


def jit_cached(with_cuda: bool, arch_list: str | None) -> bool:
    return (jit_build_dir(with_cuda, arch_list) / build.BUILT_MARKER).exists()


def _jit_build(with_cuda: bool, arch_list: str | None, verbose: bool) -> None:
    global _build_dir, _library
    cpp_extension = _cpp_extension()
    flags = build_flags(with_cuda)
    identity = jit_identity(with_cuda, arch_list)
    build_dir = build.extensions_root() / build.cache_name(identity)
    with build.build_lock(build_dir):
        # The marker is written after a finished build, and the folder's name covers everything
        # that changes a build: without it, this process compiles (say so, or it looks frozen).
        compiling = not (build_dir / build.BUILT_MARKER).exists()
        if compiling:
            what = ("C++ and CUDA kernels once (several minutes)" if with_cuda
                    else "C++ kernels once (a minute or so on 2 cores)")
            build.notice(f"wdopt: compiling the {what}, into {build_dir} ...")
        start = time.monotonic()
        with build.arch_list_env(arch_list if with_cuda else None):
            loaded = cpp_extension.load(
                name=build_dir.name,
                sources=sources(with_cuda),
                extra_cflags=flags["cflags"],
                extra_ldflags=flags["ldflags"],
                extra_cuda_cflags=flags["cuda_flags"],
                extra_include_paths=[str(source_dir() / "include")],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        if compiling:
            (build_dir / build.BUILT_MARKER).write_text(build.describe_identity(identity))
            build.notice(f"wdopt: compiled in {time.monotonic() - start:.0f} s; later runs reuse it")
    _build_dir = build_dir
    # torch returns the library's path (older versions nothing): {name}.so in the build folder.
    _library = loaded if isinstance(loaded, str) else str(build_dir / f"{build_dir.name}.so")


class ObjectChecks:
    """The fast path's identity checks of Python objects (csrc/fast_checks.cpp), called through
    ctypes with the GIL held: each returns whether every object is the one expected."""

    def __init__(self, library: str):
        import ctypes

        lib = ctypes.PyDLL(library)  # PyDLL: the GIL stays held, a Python error set in C is raised

        def bind(name: str, nargs: int):
            function = getattr(lib, name)
            function.argtypes = [ctypes.py_object] * nargs
            function.restype = ctypes.c_int
            return function

        #: same_objects(list_or_tuple, list): the same objects in the same order.
        self.same_objects = bind("wdopt_same_objects", 2)
        #: same_items(dict, keys, values): exactly these keys mapped to these values, in order.
        self.same_items = bind("wdopt_same_items", 3)
        #: same_columns(dicts, keys, expected): expected[i * len(keys) + j] is dicts[i][keys[j]], and
        #: each dict holds only those keys.
        self.same_columns = bind("wdopt_same_columns", 3)


_object_checks: ObjectChecks | None = None


def object_checks() -> ObjectChecks:
    """The loaded extension's ObjectChecks (``load()`` first)."""
    global _object_checks
    if _object_checks is None:
        if not _extension_loaded or _library is None:
            raise RuntimeError("wdopt: the C++ extension is not loaded")
        _object_checks = ObjectChecks(_library)
    return _object_checks


def built_in() -> Path | None:
    """The JIT cache folder this process loaded the extension from (None: prebuilt or not loaded)."""
    return _build_dir


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
#: Device types whose kernels also gather the direction statistics there ((K, 8) buffers).
STATISTICS = ("cpu", "cuda")
#: Device types whose kernels round bf16/fp16 stores stochastically when handed ``rng``.
STOCHASTIC_ROUNDING = ("cpu", "cuda")
#: Device types whose kernels update compensated bf16 parameters when handed ``correction``.
COMPENSATION = ("cpu", "cuda")
#: Device types whose kernels update 8-bit states when handed their block ``scales``.
QUANTIZED_STATES = ("cpu", "cuda")
#: Device types whose rotational kernel takes ``rng`` and ``correction`` (elsewhere the driver
#: rotates such tensors with the reference).
ROTATIONAL_LOW_PRECISION = ("cpu", "cuda")
#: Device types whose rotational kernel takes 8-bit states (``scales``): the row phase rotates with
#: the new states and the block phase encodes them (csrc/cpu/rotational_cpu.cpp; on CUDA
#: csrc/cuda/rotational.cuh's QUANT row kernels, then quantized.cuh's kernel with a states-only Op).
ROTATIONAL_QUANTIZED_STATES = ("cpu", "cuda")


def _scale_list(scales) -> list:
    """{lane: one block-scale tensor per parameter} (8-bit states) as the operators take them:
    the lanes' lists concatenated in order."""
    return [t for lane in sorted(scales) for t in scales[lane]] if scales else []


def _lr_args(lr):
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
          decay_lr_scale, amsgrad, maximize, grad_scale=None, found_inf=None, telemetry=(), rng=(),
          correction=(), scales=None) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    torch.ops.wdopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps, list(telemetry),
        lr=lr_value, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay_lr_scale=decay_lr_scale,
        amsgrad=amsgrad, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        rng=list(rng), correction=list(correction), scales=_scale_list(scales))


def sgd(params, grads, momentum_buffers, first_steps, *, lr, weight_decay, momentum, dampening, nesterov,
        decoupled_weight_decay, decay_lr_scale, maximize, grad_scale=None, found_inf=None, telemetry=(),
        rng=(), correction=(), scales=None) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    has_momentum = momentum != 0
    torch.ops.wdopt.sgd_(
        params, grads, momentum_buffers if has_momentum else [], list(first_steps) if has_momentum else [],
        list(telemetry),
        lr=lr_value, weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        decoupled_weight_decay=decoupled_weight_decay, decay_lr_scale=decay_lr_scale, maximize=maximize,
        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, rng=list(rng), correction=list(correction),
        scales=_scale_list(scales))


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, decay_lr_scale, maximize,
         grad_scale=None, found_inf=None, telemetry=(), rng=(),
         correction=(), scales=None) -> None:
    lr_value, lr_tensor = _lr_args(lr)
    torch.ops.wdopt.lion_(
        params, grads, exp_avgs, list(telemetry), lr=lr_value, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        decay_lr_scale=decay_lr_scale, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
        found_inf=found_inf, rng=list(rng), correction=list(correction), scales=_scale_list(scales))


def rotational_available(device: torch.device) -> bool:
    """Whether the extension has a rotational kernel for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("wdopt::rotational_", key)


def rotational(optimizer, params, grads, state1, state2, steps, rotational_norms, update_norm_avgs, rotational_steps,
               first_steps, *, lr, beta1, beta2, eps, momentum, nesterov, angle, norm_decay, rotational_eps, zero_mean,
               projected, maximize, grad_scale=None, found_inf=None, telemetry=(), rate_tensor=None, rng=(),
               correction=(), scales=None) -> None:
    """The rotational step of ``optimizer`` ("adamw", "sgd", "lion") on contiguous tensors.
    ``rate_tensor``: None, or a float64 0-d tensor read instead of lr/angle (csrc/ops.cpp); ``rng``,
    ``correction``, ``scales``: stochastic rounding, compensated bf16 parameters and 8-bit states
    (``ROTATIONAL_QUANTIZED_STATES``), as for adamw."""
    torch.ops.wdopt.rotational_(
        optimizer, params, grads, state1, state2, steps, rotational_norms, update_norm_avgs, rotational_steps,
        list(first_steps), list(telemetry), lr=lr, beta1=beta1, beta2=beta2, eps=eps, momentum=momentum,
        nesterov=nesterov, angle=angle, norm_decay=norm_decay, rotational_eps=rotational_eps, zero_mean=zero_mean,
        projected=projected, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, rate_tensor=rate_tensor,
        rng=list(rng), correction=list(correction), scales=_scale_list(scales))
