// AdamW's launcher and kernels: the coefficient kernel, then the to-nearest, stochastic,
// compensated and 8-bit update kernels and their monitored twins.
#include "optimizers.cuh"

namespace wdopt {
namespace cuda {

size_t adamw_scratch_bytes(int64_t n_tensors) {
  static_assert(sizeof(AdamWCoefficients<double>) <= 64 && sizeof(AdamWCoefficients<float>) <= 64, "");
  return static_cast<size_t>(n_tensors > 0 ? n_tensors : 0) * sizeof(AdamWCoefficients<double>);
}

cudaError_t adamw(const AdamWArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX || a.scratch == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    auto* coefficients = static_cast<AdamWCoefficients<M>*>(a.scratch);
    // Corrections of a wrong dtype or width, and 8-bit states of float64, fail here, before the
    // first kernel advances the steps.
    return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) {
      if (a.scales != nullptr && !kQuantizable<T>) return cudaErrorInvalidValue;
      const cudaError_t err = adamw_coefficients_all<M>(a, coefficients, stream);
      if (err != cudaSuccess) return err;
      return dispatch_bool(a.amsgrad, [&](auto amsgrad) {
        using Op = AdamWOp<M, decltype(amsgrad)::value>;
        const void* const* columns[] = {a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs};
        if (a.scales != nullptr) {
          return dispatch_quantized<T>(a.rng, [&](auto sr) {
            return quantized_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
                columns, a.n_tensors, a.numels, nullptr, a.rng, a.corrections, a.scales, a.telemetry,
                Op{coefficients}, a.grad, stream);
          });
        }
        return dispatch_rounding<T>(a.rng, [&](auto sr) {
          return update_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
              columns, a.n_tensors, a.numels, nullptr, a.rng, a.corrections, a.telemetry, Op{coefficients}, a.grad,
              stream);
        });
      });
    });
  });
}

// Here rather than beside g_launches in common.cuh, which every file includes: launchers.h
// declares it once.
int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

}  // namespace cuda
}  // namespace wdopt
