"""Environment report: ``python -m wdopt.env`` prints versions and, for each backend and device,
whether it can run here or why not."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from .backends import BACKENDS, CUDA_NOT_BUILT, auto_backend, unavailable_reason


def cpu_model() -> str:
    """The CPU's model name, written beside every CPU number (benchmarks, experiments): timings and
    bitwise reproducibility hold for one CPU model, not across them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_status() -> str:
    """What the C++ extension is, or exactly what the first step will do to get it."""
    from .kernels import build, cpp

    if cpp.prebuilt_available():
        return "prebuilt by pip install (wdopt._C)"
    reason = cpp.unavailable_reason()
    if reason is not None:
        return f"not available: {reason}"
    try:
        plan = cpp.cuda_plan()
    except build.BuildError as error:
        return f"not available: {error}"
    kernels = f"CPU and CUDA kernels {plan.why}" if plan.build else f"CPU kernels only, no CUDA kernels: {plan.why}"
    folder = cpp.jit_build_dir(plan.build, plan.arch_list)
    if cpp.built_in() is not None:
        return f"loaded from {cpp.built_in()}"
    if (folder / build.BUILT_MARKER).exists():
        return f"compiled, cached in {folder}: {kernels}"
    return (f"not compiled yet: the first step on a 'cpu'/'cuda' backend compiles it once, into {folder}, "
            f"and later runs reuse it: {kernels}")


def report() -> str:
    lines = [
        f"wdopt    {__version__}",
        f"python   {sys.version.split()[0]} ({platform.platform()})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {package_version('triton')}",
        f"numpy    {package_version('numpy')}",
    ]
    lines.append(f"C++ ext  {_extension_status()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"GPU      {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    else:
        lines.append("GPU      none visible to torch")
    for device in devices:
        lines.append("")
        lines.append(f"backends for {device} tensors (auto picks {auto_backend(device, build=False)!r}):")
        for backend in BACKENDS:
            reason = unavailable_reason(backend, device)
            lines.append(f"  {backend:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        if device == "cuda" and auto_backend(device, build=False) != "cuda" and unavailable_reason("cuda", device) is None:
            lines.append("  (" + CUDA_NOT_BUILT.removeprefix("wdopt: ") + ")")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
