// Host/device portability for the optimizer math shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WDOPT_HD __host__ __device__ __forceinline__
#else
#define WDOPT_HD inline __attribute__((always_inline))
#endif

#include <cmath>
#include <cstdint>

namespace wdopt {

// sqrt in the argument's own precision, whatever the includes: a host compiler that has seen only
// <cmath> resolves an unqualified sqrt(float) to ::sqrt(double), and AdamW's denominator is then
// computed in double and rounded once, one ulp away from the reference in ~1% of elements.
using std::sqrt;

// The arithmetic type for a storage type: fp64 math for fp64, fp32 for everything else.
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

template <typename T> WDOPT_HD T max_nan(T a, T b) {
  // torch.maximum: NaN wins.
  return ((a != a) | (a > b)) ? a : b;
}

// Direction statistics (wdopt/reference/telemetry.py): an optimizer's per-element direction n and
// its momentum s before the step, in n's units; a monitored step sums Σn², Σn·s, Σω·n and Σs².
template <typename T> struct Direction {
  T n, s;
};

}  // namespace wdopt
