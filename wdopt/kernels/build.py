"""How the C++/CUDA extension is built: the language standard, whether the CUDA kernels are built
and for which GPUs, the JIT cache entry's name, and the lock that serializes builds.

Shared by setup.py and the JIT build (wdopt/kernels/cpp.py). setup.py loads this file by its
path, before wdopt is installed, so it imports nothing from wdopt: only the standard library and
(inside functions) torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import re
import shutil
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

# Written into a JIT build folder once its build has finished: its absence means the next load
# compiles (a new folder, or one whose build was killed).
BUILT_MARKER = "wdopt-build.txt"
# Our lock, beside torch's own "lock" file (torch.utils.file_baton), in every build folder.
LOCK_NAME = "wdopt.lock"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


class BuildError(RuntimeError):
    """The build was asked for (WDOPT_BUILD_CUDA=1, ...) and cannot be done here."""


def notice(message: str) -> None:
    """One line for the person at the terminal. stderr, not warnings: nothing is wrong, and a
    warning filter must not hide that a process is busy compiling."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ language standard


def cxx_standard(config: str | None = None) -> str:
    """The C++ standard torch was compiled with ("c++17", "c++20"), which its headers need and
    which torch's own cpp_extension passes when not told otherwise (torch 2.13: c++20 by default,
    headers fine with c++17; torch 2.14: headers need c++20). Read from ``torch.__config__.show()``
    ("C++ Version: 202002", the compiler's __cplusplus), so it follows the torch being built
    against instead of a number written here."""
    if config is None:
        import torch

        config = torch.__config__.show()
    match = re.search(r"C\+\+ Version:\s*(\d{4})(\d{2})", config)
    if match is None:
        # Every torch wdopt supports prints it; c++17 is what torch 2.x's headers need at least.
        return "c++17"
    year = int(match.group(1))
    # __cplusplus is the year and month of the standard: 201703 is C++17, 202002 C++20, 202302 C++23.
    return f"c++{year % 100:02d}"


# ------------------------------------------------------------------------------ CUDA: build or not


@dataclass(frozen=True)
class CudaPlan:
    """Whether the CUDA kernels are built, for which architectures (a TORCH_CUDA_ARCH_LIST value),
    and why, in words for ``wdopt env`` and the build's messages."""

    build: bool
    arch_list: str | None
    why: str


def _env_choice(env) -> str:
    wanted = env.get("WDOPT_BUILD_CUDA", "").strip().lower()
    if wanted in ("", "auto"):
        return "auto"
    if wanted in ("0", "1"):
        return wanted
    raise BuildError(f"WDOPT_BUILD_CUDA must be 0 or 1 (or unset), not {env.get('WDOPT_BUILD_CUDA')!r}")


def _sm(arch: str) -> tuple[int, int] | None:
    """"sm_90" -> (9, 0), "sm_100" -> (10, 0); None for compute_* entries and unknown forms."""
    match = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", arch)
    return (int(match.group(1)), int(match.group(2))) if match else None


def arch_list_for(capabilities: Sequence[tuple[int, int]], torch_archs: Sequence[str]) -> str:
    """A TORCH_CUDA_ARCH_LIST for these GPUs: each one's own architecture (SASS, the fastest
    start) plus PTX for the newest, which later GPUs JIT-compile. A GPU newer than this torch
    supports is built for torch's newest architecture, as torch's own default does."""
    supported = [sm for sm in map(_sm, torch_archs) if sm is not None]
    newest = max(supported) if supported else None
    chosen = sorted({min(cap, newest) if newest else tuple(cap) for cap in capabilities})
    if not chosen:
        return ""
    items = [f"{major}.{minor}" for major, minor in chosen]
    items[-1] += "+PTX"
    return ";".join(items)


def decide_cuda(*, env, torch_cuda: str | None, nvcc: str | None, have_sources: bool,
                gpus: Sequence[tuple[int, int]], torch_archs: Sequence[str]) -> CudaPlan:
    """The rule, as a pure function of what ``cuda_plan`` gathers (so tests can state every case):

    * never with WDOPT_BUILD_CUDA=0, a torch without CUDA, no nvcc or no CUDA sources (an error
      with WDOPT_BUILD_CUDA=1, which requires the kernels);
    * for TORCH_CUDA_ARCH_LIST when it names architectures (the standard way to ask for a build
      without a GPU, e.g. a wheel built for other machines);
    * else for the visible GPUs' architectures plus PTX;
    * else, without a GPU, only with WDOPT_BUILD_CUDA=1: for every architecture this torch was
      built for. Otherwise not: kernels nobody here can run would cost minutes of nvcc, and
      torch's builder cannot even choose an architecture without a GPU (IndexError).
    """
    wanted = _env_choice(env)
    if wanted == "0":
        return CudaPlan(False, None, "WDOPT_BUILD_CUDA=0")
    missing = None
    if torch_cuda is None:
        missing = "this torch has no CUDA support"
    elif nvcc is None:
        missing = "nvcc not found (set CUDA_HOME)"
    elif not have_sources:
        missing = "the CUDA sources are not installed"
    if missing is not None:
        if wanted == "1":
            raise BuildError(f"WDOPT_BUILD_CUDA=1, but {missing}")
        return CudaPlan(False, None, missing)
    requested = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested and requested != "native":
        return CudaPlan(True, requested, f"for TORCH_CUDA_ARCH_LIST={requested}")
    if gpus:
        arch_list = arch_list_for(gpus, torch_archs)
        return CudaPlan(True, arch_list, f"for the visible GPU{'s' if len(gpus) > 1 else ''} ({arch_list})")
    if wanted == "1":
        arch_list = arch_list_for([sm for sm in map(_sm, torch_archs) if sm is not None], torch_archs)
        if not arch_list:
            raise BuildError("WDOPT_BUILD_CUDA=1 without a GPU: set TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0+PTX\")")
        return CudaPlan(True, arch_list,
                        f"for this torch's architectures ({arch_list}), as WDOPT_BUILD_CUDA=1 asks without a GPU")
    return CudaPlan(False, None, "no GPU visible (set TORCH_CUDA_ARCH_LIST or WDOPT_BUILD_CUDA=1 to build them anyway)")


def find_nvcc(cuda_home: str | None) -> str | None:
    if cuda_home is None:
        return None
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else None


def cuda_plan(cuda_home: str | None, have_sources: bool, env=None) -> CudaPlan:
    """``decide_cuda`` for this machine and this torch. Counting GPUs creates no CUDA context."""
    import torch

    env = os.environ if env is None else env
    gpus: list[tuple[int, int]] = []
    torch_archs: list[str] = []
    if torch.version.cuda is not None and _env_choice(env) != "0":
        if torch.cuda.is_available():
            gpus = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
        torch_archs = list(torch.cuda.get_arch_list())
    return decide_cuda(env=env, torch_cuda=torch.version.cuda, nvcc=find_nvcc(cuda_home), have_sources=have_sources,
                       gpus=gpus, torch_archs=torch_archs)


@contextlib.contextmanager
def arch_list_env(arch_list: str | None) -> Iterator[None]:
    """TORCH_CUDA_ARCH_LIST set to ``arch_list`` while torch's builder runs (it reads only the
    environment), then restored."""
    if arch_list is None:
        yield
        return
    before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = before


# ------------------------------------------------------------------------------ JIT cache entry


def source_digest(root: Path) -> str:
    """Every C++/CUDA source and header under ``root``, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tool_identity(command: str | None) -> str:
    """A compiler by its resolved path, size and modification time: an upgrade changes it, and it
    costs no subprocess on every first step."""
    if not command:
        return "none"
    found = shutil.which(command)
    if found is None:
        return f"{command} (not found)"
    real = os.path.realpath(found)
    try:
        info = os.stat(real)
        return f"{real} {info.st_size} {int(info.st_mtime)}"
    except OSError:
        return real


def cpu_identity() -> str:
    """The CPU's feature flags: a -march=native build must not be loaded by another kind of CPU
    sharing the home directory."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_identity(*, wdopt_version: str, sources: str, with_cuda: bool, cflags: Sequence[str],
                   cuda_flags: Sequence[str], ldflags: Sequence[str], arch_list: str | None,
                   compiler: str, nvcc: str | None) -> dict[str, str]:
    """Everything that makes one build differ from another. Two environments that differ in any
    of these get different folders, so neither rebuilds the other's (torch's builder compares
    its command lines, which hold torch's and Python's paths, and rebuilds in place on any change)."""
    import torch

    return {
        "wdopt": wdopt_version,
        "sources": sources,
        "cuda": str(with_cuda),
        "torch": f"{torch.__version__} {torch.version.git_version} cuda={torch.version.cuda}",
        # Two venvs with the same torch version hold two copies of it, at two paths that end up in
        # the build commands.
        "torch path": os.path.realpath(os.path.dirname(torch.__file__)),
        "cxx11 abi": str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
        "python": f"{sys.version.split()[0]} {sysconfig.get_config_var('SOABI')} {sysconfig.get_paths()['include']}",
        "compiler": compiler,
        "nvcc": nvcc or "none",
        "cflags": " ".join(cflags),
        "cuda flags": " ".join(cuda_flags) if with_cuda else "",
        "arch list": (arch_list or "") if with_cuda else "",
        "ldflags": " ".join(ldflags),
        "machine": f"{platform.machine()} {cpu_identity()}",
    }


def cache_name(identity: dict[str, str]) -> str:
    text = "\n".join(f"{key}: {value}" for key, value in sorted(identity.items()))
    cuda = "_cuda" if identity.get("cuda") == "True" else ""
    return f"wdopt_C{cuda}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def extensions_root() -> Path:
    """Where torch's JIT builder puts its folders (TORCH_EXTENSIONS_DIR, else its default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def describe_identity(identity: dict[str, str]) -> str:
    return "".join(f"{key}: {value}\n" for key, value in identity.items())


# ------------------------------------------------------------------------------ the build lock


def build_lock_timeout() -> float:
    """Seconds to wait for another process's build (WDOPT_BUILD_LOCK_TIMEOUT, default 30 min:
    the CUDA kernels take minutes on a small machine)."""
    value = os.environ.get("WDOPT_BUILD_LOCK_TIMEOUT", "1800")
    try:
        return float(value)
    except ValueError:
        raise BuildError(f"WDOPT_BUILD_LOCK_TIMEOUT must be a number of seconds, not {value!r}") from None


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float | None = None, say: Callable[[str], None] = notice,
               poll: float = 0.2) -> Iterator[None]:
    """Hold the build folder while torch's builder runs in it.

    torch's builder guards a folder with a plain ``lock`` file that it waits on forever: a build
    killed in the middle leaves that file, and every later process hangs silently. Our lock is a
    ``flock`` on ``wdopt.lock``, which the kernel releases when its holder dies, however it dies.
    So a process that holds it knows no other wdopt build is running in the folder, and a
    ``lock`` file found then was left by a killed build: it is removed, and said so. A live
    builder is waited for (saying whom) up to ``timeout`` seconds, then a clear error says what to
    do. The holder writes its PID and host into ``wdopt.lock`` for those messages.
    """
    import fcntl

    timeout = build_lock_timeout() if timeout is None else timeout
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # A file system without flock: fall back to torch's own lock, with a timeout.
                    os.close(fd)
                    fd = -1
                    _wait_for_torch_lock(build_dir, timeout, say, poll)
                    yield
                    return
            holder = _read_holder(path)
            waited = time.monotonic() - start
            if waited >= timeout:
                raise BuildError(
                    f"wdopt: {holder} has been compiling the kernels in {build_dir} for over {timeout:.0f} s. "
                    f"If that process is stuck, stop it and run again; to wait longer set WDOPT_BUILD_LOCK_TIMEOUT.")
            if not said:
                say(f"wdopt: waiting for {holder}, which is compiling the kernels in {build_dir}")
                said = True
            time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        stale = build_dir / "lock"
        if stale.exists():
            say(f"wdopt: removing {stale}, left behind by a build that was killed; building again")
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the flock


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _wait_for_torch_lock(build_dir: Path, timeout: float, say: Callable[[str], None], poll: float) -> None:
    stale = build_dir / "lock"
    start = time.monotonic()
    said = False
    while stale.exists():
        if time.monotonic() - start >= timeout:
            raise BuildError(
                f"wdopt: {stale} has been there for over {timeout:.0f} s. If no process is compiling wdopt "
                f"(a build was killed), delete that file and run again.")
        if not said:
            say(f"wdopt: waiting for {stale}: another process is compiling the kernels there "
                f"(if none is, a build was killed: delete that file)")
            said = True
        time.sleep(poll)
