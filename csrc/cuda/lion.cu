// Lion's launcher and kernels: to nearest, stochastic, compensated and 8-bit, and their monitored
// twins.
#include "optimizers.cuh"

namespace wdopt {
namespace cuda {

cudaError_t lion(const LionArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX) return cudaErrorInvalidValue;
  const LionHyper hyper{a.lr, a.beta1, a.beta2, a.weight_decay, a.decay_lr_scale};
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = LionOp<opmath_t<T>>;
    const void* const* columns[] = {a.params, a.grads, a.exp_avgs};
    return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) {
      if (a.scales != nullptr) {
        return dispatch_quantized<T>(a.rng, [&](auto sr) {
          return quantized_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
              columns, a.n_tensors, a.numels, nullptr, a.rng, a.corrections, a.scales, a.telemetry,
              Op{hyper, a.lr_tensor}, a.grad, stream);
        });
      }
      return dispatch_rounding<T>(a.rng, [&](auto sr) {
        return update_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
            columns, a.n_tensors, a.numels, nullptr, a.rng, a.corrections, a.telemetry, Op{hyper, a.lr_tensor},
            a.grad, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace wdopt
