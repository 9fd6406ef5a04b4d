// The rotational kernels with 8-bit states (rotational.cuh's two phases: the row kernels with
// QUANT, then the states-only block phase): a translation unit of its own, built in parallel with
// rotational.cu, which calls it once the prologue has run.
#include "rotational.cuh"

namespace wdopt {
namespace cuda {

cudaError_t rotational_quantized(const RotationalArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using M = opmath_t<T>;
    if constexpr (!kQuantizable<T>) {
      return cudaErrorInvalidValue;
    } else {
      const RotationArgs<M> args = rotation_args<M>(a);
      const int64_t bytes = row_buffer_bytes(a);
      return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) -> cudaError_t {
        constexpr int MASTER = decltype(master)::value;
        // The row phase: parameters written (stochastically rounded in lane 0 where bf16/fp16 with
        // rng), states read only.
        const cudaError_t err = dispatch_rounding<T>(a.rng, [&](auto sr) -> cudaError_t {
          constexpr bool SR = decltype(sr)::value;
          switch (a.optimizer) {
            case RotationalOptimizer::AdamW: return rotational_rows<T, kAdamW, SR, MASTER, true>(a, args, bytes, stream);
            case RotationalOptimizer::Lion: return rotational_rows<T, kLion, SR, MASTER, true>(a, args, bytes, stream);
            case RotationalOptimizer::SGD:
              if (a.momentum == 0) return cudaErrorInvalidValue;  // no state (rotational() refuses it first)
              if (a.nesterov) return rotational_rows<T, kSGDNesterov, SR, MASTER, true>(a, args, bytes, stream);
              return rotational_rows<T, kSGDMomentum, SR, MASTER, true>(a, args, bytes, stream);
          }
          return cudaErrorInvalidValue;
        });
        if (err != cudaSuccess) return err;
        // The block phase: the states encoded (stochastically with rng, whatever the dtype).
        return rotational_states<T>(a, args, stream);
      });
    }
  });
}

}  // namespace cuda
}  // namespace wdopt
