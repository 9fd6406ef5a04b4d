// The AdamW, SGD and Lion kernels and every launcher of launchers.h: the one translation unit of the
// CUDA engines, which live in headers beside it: common.cuh (what they share), update.cuh (the
// element-wise update engine), rows.cuh and telemetry.cuh (monitored updates, row by row), and
// rotational.cuh (the rotational row engine). No torch headers: csrc/cuda/binding.cpp turns torch
// tensors into the plain tables of launchers.h.
//
// Design
// ------
// * Work unit: one thread block updates one (tensor, chunk) pair; a chunk is kChunkBytes of each
//   stream (param, grad, state...), so every block moves the same number of bytes whatever the
//   dtype. Blocks are numbered tensor after tensor; ``UpdateTable::block_begin`` is the prefix
//   sum of chunk counts and a block finds its tensor by binary search over it (uniform across the
//   block, so every lookup is a broadcast from the constant bank). One launch therefore covers
//   any number of chunks: the launch count depends only on how many tensors fit in one table.
// * Tables travel in the kernel arguments (up to 32 KB since CUDA 12.1 on sm_70+, a few hundred
//   tensors per launch), so a step performs no host-to-device copy: launches are asynchronous and
//   can be captured in a CUDA graph, which then replays with the same addresses and reads lr,
//   steps, grad_scale and found_inf from the device.
// * AdamW's step race: every block of a tensor needs the same step count t, but the step must be
//   advanced exactly once. A first tiny kernel reads each step, writes t = step + 1 back (one
//   thread per tensor, so no other thread reads it) and stores the per-tensor coefficients,
//   computed in double from the exact hyperparameters by ``adamw_coefficients``, into a scratch
//   buffer; the element-wise kernel, ordered after it on the stream, reads only the scratch.
//   SGD and Lion coefficients depend on lr alone: each block computes them itself.
// * Memory movement is shared: ``update_block`` loads Op::kDepth streams, converts to the math
//   type, unscales/negates the gradient (stream 1), calls the optimizer's element-wise function
//   from csrc/include/wdopt/*.h, rounds to the storage type and stores the streams the optimizer
//   writes. Full 16-byte vectors are used when every stream of the tensor is 16-byte aligned,
//   with a scalar tail; misaligned tensors (views) take the scalar path. Offsets are int64 across
//   chunks and int32 inside one.
// * Stochastic rounding (``rng`` given, bf16/fp16): the same engines built with SR = true, whose
//   tables carry each tensor's [key, count] pointer; a block hashes its tensor's lane words once
//   (Rounding) and each store hashes the element's offset in the tensor, so the bits are the
//   reference's whatever the chunking. The round-to-nearest kernels are built as before.
// * Compensated bf16 parameters (``corrections`` given): the bf16 engines built with MASTER = 32
//   or 24 (int16 or int8 corrections), whose tables carry each parameter's correction pointer;
//   stream 0 is loaded as the fp32 master weight (Compensation), updated as an fp32 parameter
//   value would be, and stored split. A parameter's 16-byte vector goes with one 16- or 8-byte
//   vector of its corrections; a misaligned correction takes the scalar path.
// * 8-bit states (``scales`` given): quantized.cuh's engine, the same Ops (their update and the
//   math of csrc/include/wdopt), a chunk's states decoded block by block with their old scales,
//   updated, and encoded with the new ones; monitored, TelemetryKernel measures first (QUANT).
// * Bit-for-bit agreement with the CPU backend needs IEEE division and square root (no fast
//   math) and no FMA contraction: build with --fmad=false. The reference (wdopt/reference) then
//   agrees bit for bit too: it takes correctly rounded square roots, as this code does.
//
// Host emulation: with WDOPT_HOST_EMULATION defined, no device code is built and every "launch"
// runs the same block bodies in host loops over blocks and threads, on host memory. Tests use it
// to check the engine's indexing, tails and step logic against the reference without a GPU
// (the update bodies use neither shared memory nor barriers, so their emulation is exact; the row
// engines' and the 8-bit engine's phases run one after another per block, so only a GPU run can
// show a missing barrier).

#include "launchers.h"
#include "quantized.cuh"
#include "telemetry.cuh"
#include "update.cuh"
#include "rotational.cuh"

namespace wdopt {
namespace cuda {
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

}  // namespace

// ------------------------------------------------------------------------------------ launchers

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

cudaError_t sgd(const SGDArgs& a, cudaStream_t stream) {
  if (a.n_tensors <= 0) return cudaSuccess;
  if (a.n_tensors > INT32_MAX) return cudaErrorInvalidValue;
  const SGDHyper hyper{a.lr, a.weight_decay, a.momentum, a.dampening, a.decay_lr_scale, a.nesterov,
                       a.decoupled_weight_decay};
  const bool has_momentum = a.momentum != 0;
  // Nesterov means nothing without momentum. L2 decay with weight_decay == 0 is the reference's
  // "no decay term"; the decoupled form then multiplies by exactly 1 (1 - lr·0), which keeps p
  // bit for bit (signed zeros, infinities), where g + 0·p would not.
  const bool nesterov = has_momentum && a.nesterov;
  const bool decoupled = a.decoupled_weight_decay || a.weight_decay == 0;
  if (a.scales != nullptr && !has_momentum) return cudaErrorInvalidValue;  // no state to quantize
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = opmath_t<T>;
    return dispatch_master<T>(a.corrections, a.master_bits, [&](auto master) {
      if (a.scales != nullptr) {
        return dispatch_quantized<T>(a.rng, [&](auto sr) {
          return dispatch_bool(decoupled, [&](auto dec) {
            using Op = SGDSelectOp<M, decltype(dec)::value>;
            const void* const* columns[] = {a.params, a.grads, a.momentum_buffers};
            return quantized_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
                columns, a.n_tensors, a.numels, a.first_steps, a.rng, a.corrections, a.scales, a.telemetry,
                Op{{hyper, a.lr_tensor}}, a.grad, stream);
          });
        });
      }
      return dispatch_rounding<T>(a.rng, [&](auto sr) {
        return dispatch_bool(has_momentum, [&](auto momentum) {
          return dispatch_bool(nesterov, [&](auto nest) {
            return dispatch_bool(decoupled, [&](auto dec) {
              constexpr bool kMomentum = decltype(momentum)::value;
              // (no momentum, nesterov) never runs; folding it into (no momentum, plain) saves a kernel.
              using Op = SGDOp<M, kMomentum, kMomentum && decltype(nest)::value, decltype(dec)::value>;
              const void* const* columns[] = {a.params, a.grads, a.momentum_buffers};
              return update_or_monitor<T, decltype(sr)::value, decltype(master)::value>(
                  columns, a.n_tensors, a.numels, a.first_steps, a.rng, a.corrections, a.telemetry,
                  Op{hyper, a.lr_tensor}, a.grad, stream);
            });
          });
        });
      });
    });
  });
}

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

int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

}  // namespace cuda
}  // namespace wdopt
