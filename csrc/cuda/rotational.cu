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
      RotationArgs<M> args{};
      args.angle = a.angle;
      args.lr = a.lr;
      args.rate = a.rate;
      args.norm_decay = a.norm_decay;
      args.eps = a.rotational_eps;
      args.coefficients = coefficients;
      args.lion = lion_coefficients<M>(LionHyper{a.lr, a.beta1, a.beta2, 0.0, 1.0}, a.lr);
      args.momentum = static_cast<M>(a.momentum);
      args.on_chip = 0;
      args.zero_mean = a.zero_mean;
      args.projected = a.projected;
      // Bytes of the row buffers per block (rotational_rows turns them into elements, a multiple of
      // kThreads; 0: every row takes two passes), within what this device lets a block opt in to
      // (99 KB on sm_86/89, 227 KB on sm_90, 64 KB on sm_75): on a smaller device longer rows take
      // the two-pass path instead of failing to launch.
      const int64_t wanted = a.on_chip_bytes > 0 ? a.on_chip_bytes : kRowBufferBytes;
      const int64_t bytes = std::max<int64_t>(0, std::min<int64_t>(wanted, shared_memory_optin_bytes() -
                                                                               static_cast<int64_t>(kRowHeaderBytes)));
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
