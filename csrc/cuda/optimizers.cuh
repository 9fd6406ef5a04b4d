// The element-wise optimizers' Ops (what update.cuh's, telemetry.cuh's and quantized.cuh's
// engines call per element: the math of csrc/include/wdopt/*.h), AdamW's coefficient kernel, and
// SGD's kernels of one weight-decay form, which two files instantiate (common.cuh says why).
#pragma once

#include "quantized.cuh"

namespace wdopt {
namespace cuda {

// SGD's kernels, by the form of its weight decay: sgd.cu holds the decoupled ones (also those of
// weight_decay == 0) and the launcher, sgd_l2.cu the L2 ones. With its momentum, nesterov and
// decoupled cases SGD has more kernels than AdamW: in one file it would be the longest compile
// of the build. Called by sgd() once it has checked the arguments.
cudaError_t sgd_decoupled(const SGDArgs& a, const SGDHyper& hyper, cudaStream_t stream);
cudaError_t sgd_l2(const SGDArgs& a, const SGDHyper& hyper, cudaStream_t stream);

namespace {

// Step counts of one coefficient launch: one thread per tensor.
struct StepTable {
  static constexpr int kCapacity =
      static_cast<int>((kParamBytes - kOtherParamBytes - 16) / sizeof(float*));
  float* step[kCapacity];
  int32_t n_tensors;
  int32_t first_tensor;
};

// ------------------------------------------------------------------------------------ AdamW

template <typename M> struct AdamWCoefficientArgs {
  AdamWHyper hyper;
  DeviceScalar lr_tensor;
  AdamWCoefficients<M>* out;  // the scratch buffer, one entry per tensor of the call
};

// One thread per tensor: t = step + 1 (float32, as torch's step tensor), written back unless
// found_inf, and this step's coefficients into the scratch buffer.
template <typename M> struct AdamWCoefficientKernel {
  WDOPT_HD static void run(const StepTable& steps, const AdamWCoefficientArgs<M>& args, const DeviceScalar& found_inf,
                           int64_t block, int thread) {
    const int64_t i = block * kThreads + thread;
    if (i >= steps.n_tensors || step_skipped(found_inf)) return;
    const float t = *steps.step[i] + 1.0f;
    args.out[steps.first_tensor + i] =
        adamw_coefficients<M>(args.hyper, lr_value(args.hyper.lr, args.lr_tensor), static_cast<double>(t));
    *steps.step[i] = t;
  }
};

// Streams: param, grad, exp_avg, exp_avg_sq (, max_exp_avg_sq).
template <typename M, bool AMSGRAD> struct AdamWOp {
  static constexpr int kDepth = AMSGRAD ? 5 : 4;
  static constexpr unsigned kWrites = AMSGRAD ? 0b11101u : 0b1101u;
  using Context = AdamWCoefficients<M>;
  const AdamWCoefficients<M>* coefficients;

  WDOPT_HD Context context(int tensor, FirstStepFlag) const { return coefficients[tensor]; }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const {
    if constexpr (AMSGRAD) {
      adamw_update<true>(x[0], x[1], x[2], x[3], x[4], c);
    } else {
      M unused = M(0);
      adamw_update<false>(x[0], x[1], x[2], x[3], unused, c);
    }
  }
  // Direction statistics, from the values before update() (x[1] unscaled).
  WDOPT_HD Direction<M> direction(const Context& c, const M (&x)[kDepth]) const {
    if constexpr (AMSGRAD) {
      return adamw_direction_statistics<true>(x[1], x[2], x[3], x[4], c);
    } else {
      return adamw_direction_statistics<false>(x[1], x[2], x[3], M(0), c);
    }
  }
};

template <typename M> cudaError_t adamw_coefficients_all(const AdamWArgs& a, AdamWCoefficients<M>* out, cudaStream_t stream) {
  const AdamWCoefficientArgs<M> args{
      AdamWHyper{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decay_lr_scale}, a.lr_tensor, out};
  StepTable table;
  for (int64_t first = 0; first < a.n_tensors; first += StepTable::kCapacity) {
    const int64_t n = a.n_tensors - first < StepTable::kCapacity ? a.n_tensors - first : StepTable::kCapacity;
    for (int64_t i = 0; i < n; ++i) table.step[i] = a.steps[first + i];
    table.n_tensors = static_cast<int32_t>(n);
    table.first_tensor = static_cast<int32_t>(first);
    const cudaError_t err =
        launch<AdamWCoefficientKernel<M>>((n + kThreads - 1) / kThreads, stream, table, args, a.grad.found_inf);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------ SGD

template <typename M, bool HAS_MOMENTUM, bool NESTEROV, bool DECOUPLED> struct SGDOp {
  // Streams: param, grad (, momentum_buffer).
  static constexpr int kDepth = HAS_MOMENTUM ? 3 : 2;
  static constexpr unsigned kWrites = HAS_MOMENTUM ? 0b101u : 0b1u;
  struct Context {
    SGDCoefficients<M> c;
    bool first_step;
  };
  SGDHyper hyper;
  DeviceScalar lr_tensor;

  WDOPT_HD Context context(int, FirstStepFlag first_step) const {
    return Context{sgd_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)), is_first_step(first_step)};
  }
  WDOPT_HD void update(const Context& ctx, M (&x)[kDepth]) const {
    if constexpr (HAS_MOMENTUM) {
      sgd_update<true, NESTEROV, DECOUPLED>(x[0], x[1], x[2], ctx.first_step, ctx.c);
    } else {
      M unused = M(0);
      sgd_update<false, NESTEROV, DECOUPLED>(x[0], x[1], unused, false, ctx.c);
    }
  }
  WDOPT_HD Direction<M> direction(const Context& ctx, const M (&x)[kDepth]) const {
    if constexpr (HAS_MOMENTUM) {
      return sgd_direction_statistics<true>(x[1], x[2], ctx.first_step);
    } else {
      return sgd_direction_statistics<false>(x[1], M(0), false);
    }
  }
};

// SGD with momentum, nesterov read at run time (a select; sgd.h's run-time form): the 8-bit
// kernels' SGD, half the instantiations of a compile-time flag.
template <typename M, bool DECOUPLED> struct SGDSelectOp : SGDOp<M, true, false, DECOUPLED> {
  using Context = typename SGDOp<M, true, false, DECOUPLED>::Context;
  WDOPT_HD void update(const Context& ctx, M (&x)[3]) const {
    sgd_update<true, DECOUPLED>(x[0], x[1], x[2], ctx.first_step, this->hyper.nesterov, ctx.c);
  }
};

// ------------------------------------------------------------------------------------ Lion

template <typename M> struct LionOp {
  // Streams: param, grad, exp_avg.
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b101u;
  using Context = LionCoefficients<M>;
  LionHyper hyper;
  DeviceScalar lr_tensor;

  WDOPT_HD Context context(int, FirstStepFlag) const { return lion_coefficients<M>(hyper, lr_value(hyper.lr, lr_tensor)); }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const { lion_update(x[0], x[1], x[2], c); }
  WDOPT_HD Direction<M> direction(const Context& c, const M (&x)[kDepth]) const {
    return lion_direction_statistics(x[1], x[2], c);
  }
};

// sgd_decoupled's and sgd_l2's body: every kernel of one weight-decay form.
template <bool DECOUPLED> cudaError_t sgd_launch(const SGDArgs& a, const SGDHyper& hyper, cudaStream_t stream) {
  const bool has_momentum = a.momentum != 0;
  const bool nesterov = has_momentum && a.nesterov;  // nesterov means nothing without momentum
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    const void* const* columns[] = {a.params, a.grads, a.momentum_buffers};
    return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) {
      if (a.scales != nullptr) {
        return dispatch_quantized<T>(a.rng, [&](auto sr) {
          return quantized_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
              columns, a.n_tensors, a.numels, a.first_steps, a.rng, a.corrections, a.scales, a.telemetry,
              SGDSelectOp<M, DECOUPLED>{{hyper, a.lr_tensor}}, a.grad, stream);
        });
      }
      return dispatch_rounding<T>(a.rng, [&](auto sr) {
        return dispatch_bool(has_momentum, [&](auto momentum) {
          return dispatch_bool(nesterov, [&](auto nest) {
            constexpr bool kMomentum = decltype(momentum)::value;
            // (no momentum, nesterov) never runs; folding it into (no momentum, plain) saves a kernel.
            using Op = SGDOp<M, kMomentum, kMomentum && decltype(nest)::value, DECOUPLED>;
            return update_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
                columns, a.n_tensors, a.numels, a.first_steps, a.rng, a.corrections, a.telemetry,
                Op{hyper, a.lr_tensor}, a.grad, stream);
          });
        });
      });
    });
  });
}

}  // namespace
}  // namespace cuda
}  // namespace wdopt
