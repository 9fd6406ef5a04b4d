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

// The arithmetic type for a storage type: fp64 math for fp64, fp32 for everything else.
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

template <typename T> WDOPT_HD T max_nan(T a, T b) {
  // torch.maximum: NaN wins.
  return (a != a || a > b) ? a : b;
}

}  // namespace wdopt
