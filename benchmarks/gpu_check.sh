#!/usr/bin/env bash
# One-shot check on a machine with one CUDA GPU (torch with CUDA, triton, nvcc; no network):
#
#     benchmarks/gpu_check.sh OUTDIR
#
# Steps, in priority order, so that a run cut short still answers the most important questions:
# nvidia-smi, build (JIT-builds the C++/CUDA extension), env (versions and backends, after the
# build so the CUDA backend shows), acceptance (benchmarks/gpu_acceptance.py: rounding, unaligned
# views, side stream, no host syncs, long rotational rows, a 2^31 + 5 element tensor, host
# overhead, torch.compile with CUDA graphs last; OUTDIR/acceptance.json), tests (the suite's CUDA
# parametrizations: Triton natively, the CUDA backend, parity with torch, graph capture,
# GradScaler, rotational kernels, telemetry), sanitizer (benchmarks/sanitizer_check.py:
# compute-sanitizer racecheck and synccheck on one small step of each engine), fsdp2 (examples/fsdp2_train.py and
# benchmarks/dtensor_overhead.py on one GPU), equilibrium (the main experiment, quick size), lowprec
# (benchmarks/low_precision.py at GPT-2-small shapes: every low-precision configuration and the
# competitors installed there, against torch's fused fp32 AdamW), bench
# (last: fp32 AdamW against torch at the GPT-2, ResNet-50 and 10,000 × 256 shapes, with the
# copy-bandwidth ceiling). Each step runs under
# `timeout`, its output is streamed to OUTDIR/<step>.log, and its exit code and duration are
# appended to OUTDIR/summary.txt as soon as it finishes. A failing step never stops the later ones.
# A global deadline (GPU_CHECK_BUDGET_S, default 420 s) trims the last steps if earlier ones ran
# long. On the H200 (2026-11-28, git d9af514) the steps took: build 84 s (one nvcc translation unit
# then), acceptance 50 s, tests over 150 s (about 1,200 GPU tests), sanitizer 59 s, fsdp2 over 45 s,
# equilibrium 22 s, lowprec 35 s, bench over 59 s. Each cap can be overridden from the environment
# (e.g. GPU_CHECK_TESTS_S=300). Each step's failures (pytest's FAILED lines, FAIL/TIMEOUT lines) are
# copied into summary.txt, since the device tool returns at most 8 files: run it as
#
#     benchmarks/gpu_check.sh /tmp/gc; cat /tmp/gc/summary.txt; tar czf $OUT/gc.tgz -C /tmp gc
#
# Exit status: 0 when every step succeeded, 1 otherwise, 2 on a usage error.

set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# A build of its own: a build killed by its time cap leaves torch's lock file behind, on which
# every later step would wait; this one is removed below if the build step times out.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/wdopt-gpu-check-extensions}

BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
{
    echo "# gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "# git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "# step rc seconds (rc 124: timed out, 125: skipped, out of budget)"
} >"$SUMMARY"
FAILED=0

# step NAME CAP_SECONDS COMMAND...: run COMMAND under timeout (the cap, or what is left of the
# budget), stream its output to NAME.log, record its exit code.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    local log="$OUTDIR/$name.log"
    local t0 rc
    t0=$(date +%s)
    if [ "$left" -lt 5 ]; then
        echo "skipped: the ${BUDGET_S}s budget is spent" | tee "$log"
        rc=125
    else
        echo "== $name (limit ${limit}s): $*"
        { echo "\$ $*"; echo; } >"$log"
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 124 ] && echo "TIMEOUT after ${limit}s" | tee -a "$log"
    fi
    echo "$name $rc $(($(date +%s) - t0))" >>"$SUMMARY"
    grep -E '^(FAILED |FAIL |ERROR |TIMEOUT )' "$log" | head -20 | sed 's/^/    /' >>"$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
}

step nvidia-smi "${GPU_CHECK_SMI_S:-15}" \
    bash -c 'nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv && nvcc --version'
step build "${GPU_CHECK_BUILD_S:-150}" \
    python -c "import wdopt.kernels.cpp as c; c.load(verbose=True)"
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
step env "${GPU_CHECK_ENV_S:-20}" \
    python -m wdopt.env
step acceptance "${GPU_CHECK_ACCEPTANCE_S:-110}" \
    python benchmarks/gpu_acceptance.py "$OUTDIR/acceptance.json"
# The GPU parametrizations only (test ids name the device; the Triton rotational tests take the
# GPU when there is one): the CPU ones run in CI anyway, and test_cuda_sources is nvcc and a
# host emulation, not the GPU.
# One process: pytest-xdist was slower on the H200 (2026-11-27: 208 tests in 150 s with -n 8
# against 478 in 100 s without; every worker compiles the same Triton kernels). Not the sm_90
# codegen checks (test_triton_cuda_codegen: Triton compiles without a GPU, and CI runs them): on the
# H200 they are 228 of the tests, compile for minutes and were still running at the cap.
step tests "${GPU_CHECK_TESTS_S:-180}" \
    python -m pytest -q -p no:cacheprovider -rf --durations=15 tests \
    -k "((cuda and not cuda_sources) or triton_rotational or graph_safety) and not triton_cuda_codegen"
# compute-sanitizer racecheck and synccheck on one small step of each engine, CUDA then Triton
# (what the CPU host emulation cannot see: races on shared memory, misplaced barriers); a machine
# without the tool or refusing it is recorded in sanitizer.json, not a failure.
step sanitizer "${GPU_CHECK_SANITIZER_S:-85}" \
    python benchmarks/sanitizer_check.py "$OUTDIR/sanitizer.json"
# FSDP2 on one GPU (a mesh of size 1 still takes the DTensor path, with nccl): the example's
# training, then the host time of a step on DTensor parameters beside plain ones.
step fsdp2 "${GPU_CHECK_FSDP2_S:-75}" \
    bash -c 'torchrun --standalone --nproc-per-node 1 examples/fsdp2_train.py --steps 50 &&
             torchrun --standalone --nproc-per-node 1 benchmarks/dtensor_overhead.py'
# The main experiment, quick size, on the GPU backends (rotation telemetry in the kernels).
step equilibrium "${GPU_CHECK_EQUILIBRIUM_S:-40}" \
    python -m wdopt equilibrium --device cuda --quick --no-progress --out "$OUTDIR/equilibrium"
# Issue 11's GPU target: low-precision AdamW at GPT-2-small shapes against torch's fused fp32
# (stochastic rounding, compensated bf16, 8-bit states; torchao/bitsandbytes/optimi/FlashOptim
# where installed), resident bytes per parameter beside each.
step lowprec "${GPU_CHECK_LOWPREC_S:-60}" \
    python benchmarks/low_precision.py --device cuda --shapes gpt2 --iters 10

# Results are written per shape set as they finish (results.partial.csv): a cut run keeps them.
step bench "${GPU_CHECK_BENCH_S:-120}" \
    python -m wdopt.bench --device cuda --skip-slow --warmup 10 --iters 40 --out "$OUTDIR/bench"

echo "# total $(($(date +%s) - START)) s" >>"$SUMMARY"
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
