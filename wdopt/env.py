"""Environment report: ``python -m wdopt.env`` prints versions and, for each backend and device,
whether it can run here or why not."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from . import __version__
from .backends import BACKENDS, auto_backend, unavailable_reason


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_status() -> str:
    from .kernels import cpp

    if cpp.prebuilt_available():
        return "prebuilt by pip install (wdopt._C)"
    reason = cpp.unavailable_reason()
    if reason is not None:
        return f"not available: {reason}"
    cuda = cpp.cuda_buildable()
    return ("JIT: compiled with ninja by the first step on a 'cpu'/'cuda' backend, then cached; "
            + ("CUDA kernels included" if cuda is None else f"CPU only ({cuda})"))


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
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
