"""Build script. Metadata lives in pyproject.toml; this file exists for native extensions.

The package is pure Python today: the Triton kernels compile at first use. The C++ CPU/CUDA
extensions (csrc/) are added here with torch.utils.cpp_extension when they land, built against
the torch already installed.
"""

from setuptools import setup

setup()
