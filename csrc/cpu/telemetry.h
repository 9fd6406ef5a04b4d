// Rotation telemetry in the CPU kernels (wdopt/reference/telemetry.py is the specification): the
// loop that writes a row's new values also sums Σω², Σω·Δω, ΣΔω² and Σĝ² while they are in
// registers — no extra pass over memory.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../include/wdopt/hd.h"

// Telemetry buffers have 4 columns (the sums), or 8 with the direction statistics
// (wdopt/reference/telemetry.py); TensorTable::columns says which.

namespace wdopt::cpu {

// Products and partial sums of a chunk of this many elements in the math dtype (64 per SIMD
// lane), the totals in double: double-width arithmetic in the update loop itself would halve its
// vector width (a monitored step then costs 1.2× an unmonitored one instead of 1.05×).
constexpr int64_t kTelemetryChunk = 1024;

// A parameter as the loops below address it: ω_i = load(i) in the math dtype, and store(i, x)
// writes the new value and returns it as stored, in the math dtype. The plain form; the fused
// kernels' own (csrc/cpu/fused_cpu.cpp) also round stochastically or keep a master weight.
template <typename scalar_t> struct PlainParam {
  using opmath = opmath_t<scalar_t>;
  scalar_t* __restrict__ p;
  inline opmath load(int64_t i) const { return static_cast<opmath>(p[i]); }
  inline opmath store(int64_t i, opmath x) const {
    const scalar_t stored = static_cast<scalar_t>(x);
    p[i] = stored;
    return static_cast<opmath>(stored);
  }
};

// param.store(i, next(i, ω_i)) over [begin, end), ω_i = param.load(i), and the range's sums
// [Σω², Σω·Δω, ΣΔω², Σĝ²] into sums[0..3], Δω = stored new value − ω, ĝ = grad(i).
// ``next`` and ``grad`` should capture by value: pointers captured by reference are reloaded
// through memory and the loop falls back to gathers.
template <typename opmath, typename Param, typename Next, typename Grad>
inline void write_and_measure(const Param& param_arg, int64_t begin, int64_t end, const Next& next_arg,
                              const Grad& grad_arg, double* sums) {
  const Param param = param_arg;  // local copies: their captured pointers stay in registers
  const Next next = next_arg;
  const Grad grad = grad_arg;
  double w2 = 0, wd = 0, d2 = 0, g2 = 0;
  for (int64_t chunk = begin; chunk < end; chunk += kTelemetryChunk) {
    const int64_t stop = std::min(end, chunk + kTelemetryChunk);
    opmath cw2 = 0, cwd = 0, cd2 = 0, cg2 = 0;
#pragma omp simd reduction(+ : cw2, cwd, cd2, cg2)
    for (int64_t i = chunk; i < stop; ++i) {
      const opmath w = param.load(i);
      const opmath d = param.store(i, next(i, w)) - w, g = grad(i);
      cw2 += w * w;
      cwd += w * d;
      cd2 += d * d;
      cg2 += g * g;
    }
    w2 += cw2;
    wd += cwd;
    d2 += cd2;
    g2 += cg2;
  }
  sums[0] = w2;
  sums[1] = wd;
  sums[2] = d2;
  sums[3] = g2;
}

// write_and_measure with direction statistics (a (K, 8) buffer): also Σn², Σn·s, Σω·n and Σs² into
// sums[4..7], with (n, s) = direction(i, ĝ) the optimizer's direction and momentum *before* the
// step, so it is called before ``next`` (which writes the state). Same chunking: the products and
// chunk sums in the math dtype, the totals in double.
template <typename opmath, typename Param, typename Next, typename Grad, typename Dir>
inline void write_and_measure_directions(const Param& param_arg, int64_t begin, int64_t end, const Next& next_arg,
                                         const Grad& grad_arg, const Dir& direction_arg, double* sums) {
  const Param param = param_arg;
  const Next next = next_arg;
  const Grad grad = grad_arg;
  const Dir direction = direction_arg;
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t chunk = begin; chunk < end; chunk += kTelemetryChunk) {
    const int64_t stop = std::min(end, chunk + kTelemetryChunk);
    opmath cw2 = 0, cwd = 0, cd2 = 0, cg2 = 0, cn2 = 0, cns = 0, cwn = 0, cs2 = 0;
#pragma omp simd reduction(+ : cw2, cwd, cd2, cg2, cn2, cns, cwn, cs2)
    for (int64_t i = chunk; i < stop; ++i) {
      const opmath w = param.load(i), g = grad(i);
      const auto dir = direction(i, g);
      const opmath d = param.store(i, next(i, w)) - w;
      cw2 += w * w;
      cwd += w * d;
      cd2 += d * d;
      cg2 += g * g;
      cn2 += dir.n * dir.n;
      cns += dir.n * dir.s;
      cwn += w * dir.n;
      cs2 += dir.s * dir.s;
    }
    const opmath chunk_sums[8] = {cw2, cwd, cd2, cg2, cn2, cns, cwn, cs2};
    for (int k = 0; k < 8; ++k) acc[k] += chunk_sums[k];
  }
  for (int k = 0; k < 8; ++k) sums[k] = acc[k];
}

}  // namespace wdopt::cpu
