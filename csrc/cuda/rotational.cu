// The rotational launchers (launchers.h) over rotational.cuh's engine: a translation unit of its
// own, compiled in parallel with the optimizers' (common.cuh).
#include "rotational.cuh"

namespace wdopt {
namespace cuda {

size_t rotational_scratch_bytes(int64_t n_tensors) {
  static_assert(sizeof(RotationCoefficients<double>) <= 128 && sizeof(RotationCoefficients<float>) <= 128, "");
  return static_cast<size_t>(n_tensors > 0 ? n_tensors : 0) * sizeof(RotationCoefficients<double>);
}

cudaError_t rotational(const RotationalArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX || a.scratch == nullptr || a.rows == nullptr) return cudaErrorInvalidValue;
  if (a.telemetry.buffers != nullptr && a.telemetry.rows == nullptr) return cudaErrorInvalidValue;
  const bool adamw = a.optimizer == RotationalOptimizer::AdamW, lion = a.optimizer == RotationalOptimizer::Lion;
  const bool sgd = a.optimizer == RotationalOptimizer::SGD;
  if (!adamw && !lion && !sgd) return cudaErrorInvalidValue;
  // 8-bit states: of float32, float16 or bfloat16 tensors, and of a call that has states.
  const bool quantized = a.scales != nullptr;
  if (quantized && (a.dtype == DType::Float64 || (sgd && a.momentum == 0))) return cudaErrorInvalidValue;
  if ((adamw && (a.state1 == nullptr || a.state2 == nullptr || a.steps == nullptr)) ||
      (lion && a.state1 == nullptr) || (sgd && a.momentum != 0 && (a.state1 == nullptr || a.first_steps == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using M = opmath_t<T>;
    // Corrections of another dtype than bf16, or of another width than 24 or 32 bits, are invalid:
    // dispatch_master says so before the prologue advances any step count.
    return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) -> cudaError_t {
      constexpr int MASTER = decltype(master)::value;
      auto* coefficients = static_cast<RotationCoefficients<M>*>(a.scratch);
      // The prologue: step counts and this step's scalars, one thread per tensor (one kernel for
      // every storage of a math type: it reads no tensor but the counts).
      const RotationPrologueArgs<M> prologue{a.lr, a.beta1, a.beta2, a.eps, a.norm_decay, adamw ? 1 : 0, coefficients};
      RotationStepTable steps;
      for (int64_t first = 0; first < a.n_tensors; first += RotationStepTable::kCapacity) {
        const int64_t n = std::min<int64_t>(a.n_tensors - first, RotationStepTable::kCapacity);
        for (int64_t i = 0; i < n; ++i) {
          steps.rotational_step[i] = a.rotational_steps[first + i];
          steps.step[i] = adamw ? a.steps[first + i] : nullptr;
        }
        steps.n_tensors = static_cast<int32_t>(n);
        steps.first_tensor = static_cast<int32_t>(first);
        const cudaError_t err = launch<RotationPrologueKernel<M>>((n + kThreads - 1) / kThreads, stream, steps,
                                                                  prologue, a.grad.found_inf);
        if (err != cudaSuccess) return err;
      }
      // 8-bit states: the row and block phases (rotational_quantized.cu).
      if (quantized) return rotational_quantized(a, stream);
      const RotationArgs<M> args = rotation_args<M>(a);
      const int64_t bytes = row_buffer_bytes(a);
      return dispatch_rounding<T>(a.rng, [&](auto sr) -> cudaError_t {
        constexpr bool SR = decltype(sr)::value;
        if (adamw) return rotational_rows<T, kAdamW, SR, MASTER>(a, args, bytes, stream);
        if (lion) return rotational_rows<T, kLion, SR, MASTER>(a, args, bytes, stream);
        if (a.momentum == 0) return rotational_rows<T, kSGDPlain, SR, MASTER>(a, args, bytes, stream);
        if (a.nesterov) return rotational_rows<T, kSGDNesterov, SR, MASTER>(a, args, bytes, stream);
        return rotational_rows<T, kSGDMomentum, SR, MASTER>(a, args, bytes, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace wdopt
