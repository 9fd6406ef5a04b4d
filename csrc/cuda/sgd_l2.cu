// SGD's kernels with L2 weight decay (g + λ·p), apart from sgd.cu so that nvcc builds the two
// halves in parallel (optimizers.cuh).
#include "optimizers.cuh"

namespace wdopt {
namespace cuda {

cudaError_t sgd_l2(const SGDArgs& a, const SGDHyper& hyper, cudaStream_t stream) {
  return sgd_launch<false>(a, hyper, stream);
}

}  // namespace cuda
}  // namespace wdopt
