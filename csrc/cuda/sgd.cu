// SGD's launcher and its kernels with decoupled weight decay (or none); the L2 ones are
// sgd_l2.cu's (optimizers.cuh says why).
#include "optimizers.cuh"

namespace wdopt {
namespace cuda {

cudaError_t sgd(const SGDArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX) return cudaErrorInvalidValue;
  const SGDHyper hyper{a.lr, a.weight_decay, a.momentum, a.dampening, a.decay_lr_scale, a.nesterov,
                       a.decoupled_weight_decay};
  if (a.scales != nullptr && a.momentum == 0) return cudaErrorInvalidValue;  // no state to quantize
  // L2 decay with weight_decay == 0 is the reference's "no decay term"; the decoupled form then
  // multiplies by exactly 1 (1 - lr·0), which keeps p bit for bit (signed zeros, infinities),
  // where g + 0·p would not.
  const bool decoupled = a.decoupled_weight_decay || a.weight_decay == 0;
  return decoupled ? sgd_decoupled(a, hyper, stream) : sgd_l2(a, hyper, stream);
}

cudaError_t sgd_decoupled(const SGDArgs& a, const SGDHyper& hyper, cudaStream_t stream) {
  return sgd_launch<true>(a, hyper, stream);
}

}  // namespace cuda
}  // namespace wdopt
