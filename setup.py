"""Build script: metadata lives in pyproject.toml; this file adds the C++/CUDA extension.

The extension (csrc/) is built here when torch is importable at build time, i.e. with
``pip install --no-build-isolation .`` in an environment that has torch: it must be built against
the torch it will run with, and a build must never download another torch. Otherwise the package
installs as pure Python and the first step on a "cpu"/"cuda" backend JIT-builds the same sources
with ninja (wdopt/kernels/cpp.py), cached in TORCH_EXTENSIONS_DIR.

Environment:
    WDOPT_BUILD_EXT=0|1    skip the extension, or require it (fail without torch/compiler)
    WDOPT_BUILD_CUDA=0|1   skip or require the CUDA kernels. Default: built when torch has CUDA,
                           nvcc exists and either a GPU is visible (built for its architecture
                           plus PTX) or TORCH_CUDA_ARCH_LIST names architectures; with =1 and no
                           GPU, for every architecture the installed torch supports
    TORCH_CUDA_ARCH_LIST   the GPU architectures to build for, e.g. "8.0;9.0+PTX"
    MAX_JOBS               parallel compile jobs (honoured by torch's BuildExtension)
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

# The sources travel inside the package too, so an install without a prebuilt extension can JIT-build.
# Each folder is named as a package of its own: setuptools warns, at length and on every install,
# about folders that hold package data without being listed.
CSRC_PACKAGE = {"wdopt._csrc": "csrc", "wdopt._csrc.cpu": "csrc/cpu", "wdopt._csrc.cuda": "csrc/cuda",
                "wdopt._csrc.include.wdopt": "csrc/include/wdopt"}
CSRC_DATA = {"wdopt._csrc": ["*.cpp", "*.md"], "wdopt._csrc.cpu": ["*.cpp", "*.h"],
             "wdopt._csrc.cuda": ["*.cu", "*.cuh", "*.cpp", "*.h"], "wdopt._csrc.include.wdopt": ["*.h"]}


def build_rules():
    """wdopt/kernels/build.py, loaded by its path: wdopt itself is not installed yet."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wdopt", "kernels", "build.py")
    spec = importlib.util.spec_from_file_location("_wdopt_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def extension():
    wanted = os.environ.get("WDOPT_BUILD_EXT", "auto")
    if wanted == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if wanted == "1":
            raise RuntimeError("WDOPT_BUILD_EXT=1 needs torch at build time: pip install --no-build-isolation .")
        return [], {}
    rules = build_rules()
    plan = rules.cuda_plan(CUDA_HOME, have_sources=bool(glob.glob("csrc/cuda/*.cu")))
    with_cuda = plan.build
    if with_cuda:
        # torch's BuildExtension reads the architectures from the environment only.
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    print(f"wdopt: building the C++ extension, {'with CUDA kernels ' if with_cuda else 'without CUDA kernels: '}"
          f"{plan.why}", file=sys.stderr)
    sources = ["csrc/ops.cpp", "csrc/step_plan.cpp", "csrc/fast_checks.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # Plain IEEE arithmetic (no FMA contraction) so every backend rounds as the reference does;
    # portable code generation: a wheel may run on another CPU than the one that built it.
    flags = {"cxx": ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]}
    kind = CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # No -std: BuildExtension adds the standard this torch's headers need. -compress-all: as
        # wdopt/kernels/cpp.py's NVCC_FLAGS says, else each architecture ships ~20 MB uncompressed.
        flags["nvcc"] = ["-O3", "--fmad=false", "-Xfatbin=-compress-all"]
        kind = CUDAExtension
    # at::parallel_for is inline OpenMP: link torch's own OpenMP runtime (one thread pool).
    bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    link = [f"-l:{os.path.basename(bundled[0])}"] if bundled else ["-lgomp"]
    ext = kind("wdopt._C", sources, include_dirs=[os.path.abspath("csrc/include")], extra_compile_args=flags,
               extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension()
setup(
    packages=find_packages(include=["wdopt", "wdopt.*"]) + list(CSRC_PACKAGE),
    package_dir=CSRC_PACKAGE,
    package_data=CSRC_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
