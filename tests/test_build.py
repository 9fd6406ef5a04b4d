"""How the extension is built, without building it: the language standard, whether the CUDA
kernels are built and for which GPUs, the JIT cache entry's name, the build lock, the messages
around a compile, and what ``wdopt env`` says. Every test here runs in well under a second
(torch's builder is replaced where a build would start)."""

from __future__ import annotations

import inspect
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wdopt import env as wdopt_env
from wdopt.kernels import build, cpp

# ------------------------------------------------------------------------------ language standard


@pytest.mark.parametrize("config, expected", [
    ("PyTorch built with:\n  - GCC 13.3\n  - C++ Version: 202002\n", "c++20"),
    ("  - C++ Version: 201703\n", "c++17"),
    ("  - C++ Version: 202302\n", "c++23"),
    ("no such line", "c++17"),
])
def test_cxx_standard_is_read_from_torchs_build_configuration(config, expected):
    assert build.cxx_standard(config) == expected


def test_cxx_standard_of_this_torch_is_one_its_builder_passes():
    """The standard used outside torch's builder (tests/test_cuda_sources.py) is the one torch's
    builder itself passes, so the syntax check sees what a real build sees."""
    from torch.utils import cpp_extension

    try:
        source = inspect.getsource(cpp_extension)
    except OSError:
        pytest.skip("torch is installed without its Python sources")
    assert f"-std={build.cxx_standard()}" in source


def test_no_fixed_language_standard_in_the_build_flags():
    """A fixed -std=c++17 broke the build on torch 2.14, whose headers need C++20: torch's
    builder picks the standard when none is given."""
    for flags in (cpp.CXX_FLAGS, cpp.NATIVE_FLAGS, cpp.NVCC_FLAGS):
        assert not any(flag.startswith("-std") for flag in flags), flags
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "-std=" not in setup_py


# ------------------------------------------------------------------------------ CUDA: build or not

TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def decide(env=None, torch_cuda="13.0", nvcc="/usr/local/cuda/bin/nvcc", have_sources=True, gpus=(),
           torch_archs=TORCH_ARCHS):
    return build.decide_cuda(env=env or {}, torch_cuda=torch_cuda, nvcc=nvcc, have_sources=have_sources,
                             gpus=list(gpus), torch_archs=torch_archs)


def test_no_cuda_build_on_a_machine_without_a_gpu():
    """The regression: a CUDA torch and nvcc, no GPU. The build was attempted, printed warnings,
    left an empty folder with a lock, and torch's arch detection raised IndexError."""
    plan = decide()
    assert not plan.build and plan.arch_list is None
    assert "no GPU visible" in plan.why and "TORCH_CUDA_ARCH_LIST" in plan.why and "WDOPT_BUILD_CUDA=1" in plan.why


def test_cuda_build_for_the_visible_gpu_plus_ptx():
    assert decide(gpus=[(9, 0)]) == build.CudaPlan(True, "9.0+PTX", "for the visible GPU (9.0+PTX)")
    assert decide(gpus=[(8, 6), (8, 0), (8, 6)]).arch_list == "8.0;8.6+PTX"
    # a GPU newer than this torch knows: torch's newest architecture, whose PTX the GPU can run
    assert decide(gpus=[(13, 0)]).arch_list == "12.0+PTX"


def test_cuda_build_for_an_explicit_arch_list_without_a_gpu():
    plan = decide(env={"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"})
    assert plan == build.CudaPlan(True, "8.0;9.0+PTX", "for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX")
    assert decide(env={"TORCH_CUDA_ARCH_LIST": "8.0"}, gpus=[(9, 0)]).arch_list == "8.0"
    assert not decide(env={"TORCH_CUDA_ARCH_LIST": "native"}).build  # "native" needs a GPU


def test_forced_cuda_build_without_a_gpu_covers_torchs_architectures():
    plan = decide(env={"WDOPT_BUILD_CUDA": "1"})
    assert plan.build and plan.arch_list == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert plan.why == ("for this torch's architectures (7.5;8.0;8.6;9.0;10.0;12.0+PTX), "
                        "as WDOPT_BUILD_CUDA=1 asks without a GPU")
    with pytest.raises(build.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        decide(env={"WDOPT_BUILD_CUDA": "1"}, torch_archs=[])


@pytest.mark.parametrize("missing, message", [
    (dict(torch_cuda=None), "this torch has no CUDA support"),
    (dict(nvcc=None), "nvcc not found"),
    (dict(have_sources=False), "the CUDA sources are not installed"),
])
def test_cuda_prerequisites(missing, message):
    plan = decide(gpus=[(9, 0)], **missing)
    assert not plan.build and message in plan.why
    with pytest.raises(build.BuildError, match=f"WDOPT_BUILD_CUDA=1, but {message}"):
        decide(env={"WDOPT_BUILD_CUDA": "1"}, gpus=[(9, 0)], **missing)


def test_wdopt_build_cuda_0_and_bad_values():
    assert decide(env={"WDOPT_BUILD_CUDA": "0", "TORCH_CUDA_ARCH_LIST": "9.0"}, gpus=[(9, 0)]) == \
        build.CudaPlan(False, None, "WDOPT_BUILD_CUDA=0")
    with pytest.raises(build.BuildError, match="WDOPT_BUILD_CUDA must be 0 or 1"):
        decide(env={"WDOPT_BUILD_CUDA": "yes"})


def test_cuda_plan_reads_this_machine(monkeypatch):
    """cuda_plan gathers decide_cuda's inputs from torch: a CUDA torch without a GPU here."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(TORCH_ARCHS))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("WDOPT_BUILD_CUDA", raising=False)
    monkeypatch.setattr(build, "find_nvcc", lambda home: f"{home}/bin/nvcc")
    assert not build.cuda_plan("/usr/local/cuda", have_sources=True).build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    assert build.cuda_plan("/usr/local/cuda", have_sources=True).arch_list == "9.0+PTX"


def test_arch_list_is_set_only_while_building(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    with build.arch_list_env("9.0+PTX"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with build.arch_list_env("8.0"):
        pass
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_the_no_gpu_notice_of_torchs_builder_is_filtered():
    import logging

    keep = cpp._NoCudaRuntimeNotice().filter
    assert not keep(logging.makeLogRecord({"msg": "No CUDA runtime is found, using CUDA_HOME='%s'"}))
    assert keep(logging.makeLogRecord({"msg": "Emitting ninja build file"}))


# ------------------------------------------------------------------------------ cache entry name


def identity(**changes):
    base = dict(wdopt_version="0.1.0", sources="abc", with_cuda=False, cflags=["-O3"], cuda_flags=["--fmad=false"],
                ldflags=["-lgomp"], arch_list=None, compiler="/usr/bin/g++ 1 2", nvcc=None)
    return build.build_identity(**{**base, **changes})


def test_cache_name_is_stable_for_one_environment():
    assert build.cache_name(identity()) == build.cache_name(identity())
    assert build.cache_name(identity()).startswith("wdopt_C_")
    assert build.cache_name(identity(with_cuda=True, arch_list="9.0+PTX")).startswith("wdopt_C_cuda_")


@pytest.mark.parametrize("change", [
    dict(wdopt_version="0.2.0"), dict(sources="abd"), dict(with_cuda=True), dict(cflags=["-O2"]),
    dict(ldflags=["-l:libgomp.so.1"]), dict(compiler="/usr/bin/g++ 1 3"),
])
def test_cache_name_changes_with_what_changes_a_build(change):
    assert build.cache_name(identity(**change)) != build.cache_name(identity())


def test_cuda_only_settings_name_only_cuda_builds():
    cuda = dict(with_cuda=True, arch_list="9.0+PTX", nvcc="/usr/local/cuda/bin/nvcc 1 2")
    assert build.cache_name(identity(**{**cuda, "cuda_flags": ["-O2"]})) != build.cache_name(identity(**cuda))
    assert build.cache_name(identity(**{**cuda, "arch_list": "8.0+PTX"})) != build.cache_name(identity(**cuda))
    other_nvcc = {**cuda, "nvcc": "/opt/cuda/bin/nvcc 1 2"}
    assert build.cache_name(identity(**other_nvcc)) != build.cache_name(identity(**cuda))
    assert build.cache_name(identity(arch_list="8.0+PTX")) == build.cache_name(identity())


def test_two_venvs_with_the_same_torch_version_get_two_cache_entries(monkeypatch):
    """The regression: two venvs with one torch version shared a folder, and torch's builder,
    seeing the other venv's paths in the build commands, rebuilt it in every process."""
    here = build.cache_name(identity())
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/lib/python3.11/site-packages/torch/__init__.py")
    assert build.cache_name(identity()) != here


def test_python_and_torch_builds_name_the_entry(monkeypatch):
    here = build.cache_name(identity())
    monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    assert build.cache_name(identity()) != here
    monkeypatch.undo()
    monkeypatch.setattr(sys, "version", "3.99.0 (main)")
    assert build.cache_name(identity()) != here


def test_source_digest_covers_every_source_and_header(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "ops.cpp").write_text("a")
    (tmp_path / "cpu" / "k.h").write_text("b")
    (tmp_path / "README.md").write_text("c")
    before = build.source_digest(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    assert build.source_digest(tmp_path) == before
    (tmp_path / "cpu" / "k.h").write_text("changed")
    assert build.source_digest(tmp_path) != before


def test_jit_identity_of_this_checkout():
    folder = cpp.jit_build_dir(False, None)
    assert folder.name.startswith("wdopt_C_") and folder.name == cpp.jit_build_dir(False, None).name


# ------------------------------------------------------------------------------ the build lock

HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"process %d on testhost\n" % os.getpid())
print("holding", flush=True)
time.sleep(60)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / build.LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    """The regression: torch's builder waits forever on the `lock` file a killed build leaves."""
    (tmp_path / "lock").write_text("")
    said = []
    with build.build_lock(tmp_path, timeout=5, say=said.append):
        assert not (tmp_path / "lock").exists()
    assert len(said) == 1 and "left behind by a build that was killed" in said[0]
    assert str(tmp_path / "lock") in said[0]


def test_a_live_builder_is_waited_for_then_named_in_a_clear_error(tmp_path):
    holder = _hold_lock(tmp_path)
    said = []
    try:
        start = time.monotonic()
        with pytest.raises(build.BuildError) as error:
            with build.build_lock(tmp_path, timeout=0.5, say=said.append, poll=0.05):
                pytest.fail("entered a lock another process holds")
        assert time.monotonic() - start < 5
        message = str(error.value)
        assert f"process {holder.pid} on testhost" in message and "WDOPT_BUILD_LOCK_TIMEOUT" in message
        assert said and f"waiting for process {holder.pid} on testhost" in said[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_builder_killed_while_holding_the_lock_releases_it(tmp_path):
    holder = _hold_lock(tmp_path)
    (tmp_path / "lock").write_text("")  # what torch's builder leaves when killed mid-build
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    with build.build_lock(tmp_path, timeout=5, say=said.append, poll=0.05):
        assert f"process {os.getpid()} on" in (tmp_path / build.LOCK_NAME).read_text()
    assert any("killed" in line for line in said)


def test_bad_lock_timeout_setting(monkeypatch):
    monkeypatch.setenv("WDOPT_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(build.BuildError, match="WDOPT_BUILD_LOCK_TIMEOUT"):
        build.build_lock_timeout()


# ------------------------------------------------------------------------------ messages around a build


def test_a_compile_is_announced_once_and_a_cache_hit_is_silent(tmp_path, monkeypatch, capsys):
    """The regression: the first step sat silent for 20-45 s while the extension compiled."""
    from torch.utils import cpp_extension

    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        assert Path(kwargs["build_directory"]).name == kwargs["name"]
        assert (Path(kwargs["build_directory"]) / build.LOCK_NAME).exists()  # built under the lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp, "_build_dir", None)
    cpp._jit_build(with_cuda=False, arch_list=None, verbose=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("wdopt: compiling the C++ kernels once") and str(tmp_path) in err[0]
    assert err[1].startswith("wdopt: compiled in ")
    folder = Path(calls[0]["build_directory"])
    assert (folder / build.BUILT_MARKER).read_text().startswith("wdopt: ")
    assert cpp.built_in() == folder
    cpp._jit_build(with_cuda=False, arch_list=None, verbose=False)
    assert capsys.readouterr().err == ""  # cache hit: nothing to say
    assert len(calls) == 2 and calls[1]["build_directory"] == str(folder)


def test_a_failed_compile_is_not_marked_built(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("error: compiler crashed")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        cpp._jit_build(with_cuda=False, arch_list=None, verbose=False)
    assert not any(tmp_path.glob(f"*/{build.BUILT_MARKER}"))
    assert "compiling" in capsys.readouterr().err


# ------------------------------------------------------------------------------ wdopt env


def _status(monkeypatch, tmp_path, plan, built=False):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "prebuilt_available", lambda: False)
    monkeypatch.setattr(cpp, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpp, "built_in", lambda: None)
    monkeypatch.setattr(cpp, "cuda_plan", lambda: plan)
    monkeypatch.setattr(cpp, "jit_build_dir", lambda with_cuda, arch_list: tmp_path / f"wdopt_C_{with_cuda}")
    if built:
        (tmp_path / f"wdopt_C_{plan.build}").mkdir()
        (tmp_path / f"wdopt_C_{plan.build}" / build.BUILT_MARKER).write_text("")
    return wdopt_env._extension_status()


def test_env_says_no_cuda_kernels_without_a_gpu(monkeypatch, tmp_path):
    """The regression: `wdopt env` claimed "CUDA kernels included" on a machine without a GPU."""
    status = _status(monkeypatch, tmp_path, decide())
    assert "CUDA kernels included" not in status
    assert "CPU kernels only, no CUDA kernels: no GPU visible" in status
    assert "not compiled yet" in status and str(tmp_path / "wdopt_C_False") in status


def test_env_names_the_gpu_architectures_and_a_cached_build(monkeypatch, tmp_path):
    status = _status(monkeypatch, tmp_path, decide(gpus=[(9, 0)]), built=True)
    assert "compiled, cached in" in status and "CPU and CUDA kernels for the visible GPU (9.0+PTX)" in status


def test_env_reports_a_forced_build_that_cannot_happen(monkeypatch, tmp_path):
    def refuse():
        raise build.BuildError("WDOPT_BUILD_CUDA=1, but nvcc not found (set CUDA_HOME)")

    monkeypatch.setattr(cpp, "prebuilt_available", lambda: False)
    monkeypatch.setattr(cpp, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpp, "cuda_plan", refuse)
    assert wdopt_env._extension_status() == "not available: WDOPT_BUILD_CUDA=1, but nvcc not found (set CUDA_HOME)"


def test_auto_on_cuda_says_once_how_to_build_the_cuda_kernels(monkeypatch):
    """"auto" never starts a CUDA build on a first step: it takes Triton and says, once, how to build
    the faster C++/CUDA kernels."""
    import warnings

    from wdopt import backends
    from wdopt.kernels import cpp

    monkeypatch.setattr(backends, "available_backends", lambda device: ["cuda", "triton", "reference"])
    monkeypatch.setattr(cpp, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(cpp, "prebuilt_available", lambda: False)
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.auto_backend("cuda") == "triton"
        assert backends.auto_backend("cuda") == "triton"
    messages = [str(w.message) for w in caught if "C++/CUDA kernels are not built" in str(w.message)]
    assert len(messages) == 1 and "c.load()" in messages[0]
    assert backends.auto_backend("cuda", build=False) == "triton"  # reports (wdopt env) stay quiet


def test_auto_on_cuda_takes_a_finished_build_from_the_cache(monkeypatch):
    """A new process has loaded nothing, but a finished JIT build in the cache loads without
    compiling: "auto" takes the CUDA kernels then, and says nothing (on the H200, 2026-11-28,
    every process after the build fell back to Triton with the how-to-build warning)."""
    import warnings

    from wdopt import backends
    from wdopt.kernels import cpp

    loaded = []
    monkeypatch.setattr(backends, "available_backends", lambda device: ["cuda", "triton", "reference"])
    monkeypatch.setattr(cpp, "has_cuda_kernels", lambda: bool(loaded))
    monkeypatch.setattr(cpp, "prebuilt_available", lambda: False)
    monkeypatch.setattr(cpp, "load_if_built", lambda: loaded.append(True) or True)
    monkeypatch.setattr(cpp, "load", lambda verbose=False: None)
    monkeypatch.setattr(backends, "_warned", set())
    assert backends.auto_backend("cuda", build=False) == "triton"  # reports load nothing
    assert not loaded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.auto_backend("cuda") == "cuda"
    assert loaded and not [w for w in caught if "not built" in str(w.message)]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("g++") and shutil.which("objdump")),
                    reason="an x86 check of GCC's output")
def test_the_8_bit_codec_loops_are_vectorized(tmp_path):
    """quantized_blocks.cpp's loops vectorize only while every select in the codes' math is a
    single float select (a bool && in the encode once kept a loop scalar, 9x slower, which no
    result shows): compiled with the extension's flags, each codec function must hold packed
    products on vector registers, and packed shifts of the codes' bit patterns (left to decode,
    right to encode)."""
    source = Path(cpp.__file__).resolve().parents[2] / "csrc" / "cpu" / "quantized_blocks.cpp"
    if not source.exists():
        pytest.skip("no C++ sources in this install")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the check reads x86 vector instructions")
    obj = tmp_path / "quantized_blocks.o"
    subprocess.run(["g++", "-std=c++17", *cpp.CXX_FLAGS, *cpp.NATIVE_FLAGS, "-c", str(source), "-o", str(obj)], check=True)
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(obj)], check=True, capture_output=True,
                             text=True).stdout
    functions = {}
    for block in listing.split("\n\n"):
        head = block.strip().splitlines()[0] if block.strip() else ""
        for kind in ("encode_codes<", "encode_block<", "decode_block<"):
            if f"wdopt::cpu::{kind}" in head:
                functions[head[head.index(kind):head.index(">", head.index(kind)) + 1]] = block
    # encode_block<S> holds its to-nearest encode_codes inlined (or GCC emits that on its own).
    assert {"encode_block<true>", "encode_block<false>", "decode_block<true>", "decode_block<false>"} <= set(functions)

    def packed(body: str, op: str) -> bool:
        return re.search(rf"\s{op}\s+[^\n]*%[xyz]mm", body) is not None

    for name, body in functions.items():
        assert packed(body, "vmulps"), f"{name}: no packed product (the loop stayed scalar)"
        shift = "vpsrld" if name.startswith("encode") else "vpslld"
        assert packed(body, shift), f"{name}: no packed {shift} (the loop stayed scalar)"