"""compute-sanitizer racecheck and synccheck on one small step of each GPU engine.

    python benchmarks/sanitizer_check.py OUT.json          # on a CUDA machine (gpu_check.sh runs it)
    python benchmarks/sanitizer_check.py --step DEVICE BACKEND   # the steps alone (what is checked)

The CPU host emulation of the CUDA kernels (tests/test_cuda_sources.py) runs a block's threads one
after another, so it cannot see a missing or misplaced barrier or a race on shared memory; these
tools can. Each run starts a fresh process under ``compute-sanitizer --tool TOOL`` that makes one
step of every engine on small tensors, with one backend ("cuda", then "triton"):

  * the multi-tensor update (FusedAdamW with amsgrad, FusedSGD with Nesterov momentum, FusedLion),
  * the monitored update (a RotationMonitor recording the step: per-row telemetry sums, then with
    the direction statistics),
  * the rotational row engine, rows held on chip (3 × 96) and two-pass rows (3 × 65,536), for
    RotationalAdamW, RotationalSGD and RotationalLion.

For the CUDA backend only wdopt's kernels are instrumented (``--kernel-name kns=wdopt``: torch's
own kernels would only slow the run); Triton kernels carry no common name, so those runs check all.
A hazard or a synchronisation error makes the tool's exit status 99 (``--error-exitcode``).

OUT.json holds per (tool, backend) the exit status, seconds and the tool's summary lines, and is
rewritten after each run. Where the machine cannot run the tool — no compute-sanitizer binary, or
it refuses the device — that is recorded with its words and is not a failure. Exit status: 1 when a
run found an error, failed otherwise, timed out or was not reached (nothing checked is not a
pass), 0 else.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("racecheck", "synccheck")
#: Seconds per sanitized run, and for all of them (the step's cap in gpu_check.sh is above this).
RUN_S, TOTAL_S = 35, 75
# Words of a tool that could not check anything on this machine (not a finding about wdopt).
REFUSALS = ("not supported", "Unable to find injection library", "Target application terminated before first "
            "instrumented API call", "insufficient privilege", "ERR_NVGPUCTRPERM", "Device not supported")


def find_sanitizer() -> str | None:
    """compute-sanitizer from PATH, CUDA_HOME, /usr/local/cuda or the pip package of the toolkit."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = [os.path.join(os.environ.get(k, ""), "bin", "compute-sanitizer") for k in ("CUDA_HOME", "CUDA_PATH")]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))
    candidates += sorted(glob.glob("/usr/local/cuda*/compute-sanitizer/compute-sanitizer"))
    try:
        import nvidia  # the toolkit's pip wheels (nvidia-cuda-sanitizer-api-*)

        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*sanitizer*", "**", "compute-sanitizer"), recursive=True))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


# ------------------------------------------------------------------ the steps (run under the tool)


def run_steps(device: str, backend: str) -> str:
    """One step of every engine with ``backend`` on ``device``; returns what ran."""
    import torch

    import wdopt

    gen = torch.Generator().manual_seed(0)

    def tensors(shapes):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        return params

    done = []
    elementwise = [(33,), (5, 7), (1,), (3, 130)]
    for cls, kw in ((wdopt.FusedAdamW, dict(weight_decay=0.1, amsgrad=True)),
                    (wdopt.FusedSGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
                    (wdopt.FusedLion, dict(weight_decay=0.1))):
        params = tensors(elementwise)
        opt = cls(params, lr=1e-2, backend=backend, **kw)
        opt.step()  # the validation path
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()  # the fast path (its own table, the prepared launch), with new gradients
        done.append(cls.__name__ + ("" if opt.__dict__.get("_fast") is not None else " (no fast path)"))
    for statistics in (False, True):  # 4 sums, then 8 (the direction statistics' twin kernels)
        opt = wdopt.FusedAdamW(tensors(elementwise), lr=1e-2, weight_decay=0.1, backend=backend)
        monitor = wdopt.RotationMonitor(opt, every=1, statistics=statistics)
        opt.step()
        assert monitor.history, "the monitored step recorded nothing"
        done.append("FusedAdamW monitored" + (" with statistics" if statistics else ""))
    for cls, kw in ((wdopt.RotationalAdamW, dict(weight_decay=0.1)),
                    (wdopt.RotationalSGD, dict(momentum=0.9, weight_decay=0.1)),
                    (wdopt.RotationalLion, dict(weight_decay=0.1))):
        for cols in (96, 65536):  # on chip, and two-pass on every GPU (65,536 fp32 = 512 KB a row)
            opt = cls(tensors([(3, cols)]), lr=1e-2, backend=backend, **kw)
            opt.step()
            opt.step()  # the first step takes the rows' norms; the second rotates at the target rate
        done.append(cls.__name__)
    if device == "cuda":
        torch.cuda.synchronize()
    return ", ".join(done)


# ------------------------------------------------------------------ the driver


def summary_lines(output: str) -> list[str]:
    keep = ("SUMMARY", "ERROR", "Error", "Race", "Hazard", "hazard", "Barrier", "refus", "not supported")
    return [line.strip() for line in output.splitlines() if any(k in line for k in keep)][-12:]


def sanitize(sanitizer: str, tool: str, backend: str, deadline: float) -> dict:
    command = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20"]
    if backend == "cuda":
        command += ["--kernel-name", "kns=wdopt"]
    command += [sys.executable, os.path.abspath(__file__), "--step", "cuda", backend]
    limit = max(1.0, min(RUN_S, deadline - time.monotonic()))
    start = time.monotonic()
    # A session of its own: on a timeout the whole group goes, the application the tool started
    # included (it would otherwise keep the GPU busy during the next run).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit)
        rc = process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        rc = 124
    result = dict(tool=tool, backend=backend, rc=rc, seconds=round(time.monotonic() - start, 1),
                  summary=summary_lines(output), tail=output.strip().splitlines()[-5:])
    if rc == 0:
        result["status"] = "clean"
    elif rc == 124:
        result["status"] = f"timed out after {limit:.0f} s"
    elif rc == 99:
        result["status"] = "errors found"
    elif any(words in output for words in REFUSALS):
        result["status"] = "refused"
    else:
        result["status"] = "failed"
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--step", nargs=2, metavar=("DEVICE", "BACKEND"), help="run the steps (under the tool)")
    args = parser.parse_args(argv)
    if args.step:
        print("ran:", run_steps(*args.step), flush=True)
        return 0
    if args.out is None:
        parser.error("OUT.json is needed")
    report = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), runs=[])

    def write():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    import torch

    import wdopt

    sanitizer = find_sanitizer()
    report["sanitizer"] = sanitizer
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA device"
    elif sanitizer is None:
        report["skipped"] = "no compute-sanitizer binary (PATH, CUDA_HOME, /usr/local/cuda*, the nvidia pip packages)"
    if "skipped" in report:
        print("sanitizer: skipped:", report["skipped"])
        write()
        return 0
    report["version"] = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip()[-200:]
    backends = [b for b in ("cuda", "triton") if b in wdopt.available_backends("cuda")]
    deadline = time.monotonic() + TOTAL_S
    failed = False
    # Priority: the CUDA engines first (hand-written barriers), racecheck before synccheck.
    for backend in backends:
        for tool in TOOLS:
            if time.monotonic() > deadline - 5:
                report["runs"].append(dict(tool=tool, backend=backend, status="not run: out of time"))
                failed = True  # nothing checked is not a pass
                continue
            result = sanitize(sanitizer, tool, backend, deadline)
            report["runs"].append(result)
            failed |= result["status"] != "clean" and result["status"] != "refused"
            print(f"{tool:10s} {backend:7s} {result['status']} ({result['seconds']} s)")
            for line in result["summary"]:
                print("   ", line)
            write()
    write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
