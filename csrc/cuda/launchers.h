// Host entry points of the CUDA kernels (csrc/cuda/*.cu), free of torch headers so that the
// kernels build with nvcc alone and the torch glue (csrc/cuda/binding.cpp) builds with the host
// compiler alone.
//
// Every launcher updates ``n_tensors`` tensors of one device and one storage dtype, in as few
// launches as the kernel-argument budget allows (one or two for a typical model), on ``stream``
// and without synchronizing it or copying anything from the host: a launch sequence is safe to
// capture in a CUDA graph, and replays read lr, steps, grad_scale and found_inf from the device.
//
// Pointer tables are host arrays of ``n_tensors`` device addresses; tensor i of every table is
// the same parameter, with ``numels[i]`` elements laid out identically (dense, same strides).
// The launchers return the first CUDA error met (launch errors only: kernels run asynchronously).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace wdopt {
namespace cuda {

// The storage dtype of every tensor of a call (parameters, gradients and state alike). Math is in
// fp32 for Float32, Float16 and BFloat16, in fp64 for Float64; results are rounded to the storage
// dtype to nearest even, or stochastically (``rng`` below).
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// A one-element float32 or float64 tensor read by the kernels on the device (never by the host).
struct DeviceScalar {
  const void* ptr = nullptr;  // nullptr: absent
  bool is_double = false;     // float64 if true, else float32
};

// What every optimizer call shares: GradScaler's unscale/skip and maximize.
struct GradOptions {
  DeviceScalar grad_scale;  // gradients are multiplied by its reciprocal (in the math dtype)
  DeviceScalar found_inf;   // when present and != 0, nothing at all is written
  bool maximize = false;    // gradients are negated (after unscaling)
};

// Rotation telemetry (wdopt/reference/telemetry.py): when ``buffers`` is not null, tensor i's
// update also overwrites ``buffers[i]``, a contiguous float64 (rows[i], 4) device array, with
// [Σω², Σω·Δω, ΣΔω², Σĝ²] over each row of numels[i] / rows[i] consecutive elements (ω as stored
// before the step, Δω = stored new value − ω in double, ĝ the unscaled gradient). The sums are
// gathered by the update kernel itself, in double, in a fixed order (deterministic); the update
// of parameters and state is bit-identical to the unmonitored kernels. found_inf: not written.
// With ``columns`` 8 (the element-wise optimizers) each row also gets the direction statistics
// [Σn², Σn·s, Σω·n, Σs²] of the optimizer's direction n and momentum s before the step (the
// optimizer's *_direction_statistics, csrc/include/wdopt).
struct Telemetry {
  double* const* buffers = nullptr;
  const int64_t* rows = nullptr;  // >= 1, dividing numels[i]
  int columns = 4;                // 4, or 8 with the direction statistics
};

// Stochastic rounding (wdopt/reference/rounding.py): when an optimizer's ``rng`` is not null and
// the dtype is Float16 or BFloat16, rng[i] is a device pointer to tensor i's int64 [key, count, index base],
// read (never written) by the kernels, and every store to tensor i and its state rounds
// stochastically with the bits of (key, count, lane, element offset in the tensor); lanes: 0 the
// parameter, then the state tensors in the order of the args (AdamW: exp_avgs 1, exp_avg_sqs 2,
// max_exp_avg_sqs 3; SGD: momentum_buffers 1; Lion: exp_avgs 1). Null, or Float32/Float64: to
// nearest.

// Compensated bf16 parameters (wdopt/reference/rounding.py, csrc/include/wdopt/rounding.h): when an
// optimizer's ``corrections`` is not null (BFloat16 only; another dtype is an invalid value),
// corrections[i] is a device array of numels[i] int16 (``master_bits`` 32) or int8 (24) values laid
// out as params[i]: the low bits of its fp32 master weight, which the kernels load with the
// parameter, update (as an fp32 parameter value), and store split back into the two; a 24-bit
// master is first rounded at its 8th-lowest bit, to nearest or, with ``rng``, with lane 0's bits.
// Telemetry then measures the master weight.

// 8-bit optimizer states (wdopt/reference/quantization.py, csrc/include/wdopt/quantization.h): when
// an optimizer's ``scales`` is not null (Float32, Float16 or BFloat16; Float64 is an invalid
// value), its state pointers hold one code byte per element instead of values: int8 for the
// signed states (exp_avgs, momentum_buffers), uint8 for the second moments (exp_avg_sqs,
// max_exp_avg_sqs), laid out as params[i]; scales[k * n_tensors + i] is a device array of
// ceil(numels[i] / 256) float32 block scales of tensor i's state k (k in the args' state order:
// AdamW exp_avgs 0, exp_avg_sqs 1, max_exp_avg_sqs 2; SGD momentum_buffers 0 (momentum != 0
// only); Lion exp_avgs 0). The kernels decode each block of 256 with its scale, update it, and
// encode it with the new scale (the block's largest new magnitude; NaN if any is not finite),
// to nearest or, with ``rng`` (any of the three dtypes), stochastically with the state's lane.
// found_inf: codes and scales are not written. Monitored, one launch more (telemetry.cuh).

struct AdamWArgs {
  DType dtype = DType::Float32;
  int64_t n_tensors = 0;
  const int64_t* numels = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* exp_avgs = nullptr;
  void* const* exp_avg_sqs = nullptr;
  void* const* max_exp_avg_sqs = nullptr;  // read only with amsgrad
  float* const* steps = nullptr;           // float32 scalars, advanced by one unless found_inf
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, decay_lr_scale = 1;
  bool amsgrad = false;
  DeviceScalar lr_tensor;  // capturable: when present, lr is read from it instead of ``lr``
  GradOptions grad;
  Telemetry telemetry;
  const int64_t* const* rng = nullptr;  // stochastic rounding (see above)
  void* const* corrections = nullptr;   // compensated bf16 parameters (see above)
  int master_bits = 32;                 // with corrections: 32 (int16) or 24 (int8)
  float* const* scales = nullptr;       // 8-bit states (see above)
  // Device memory of at least adamw_scratch_bytes(n_tensors) bytes, 16-byte aligned, usable on
  // ``stream`` (e.g. from the caching allocator): per-tensor coefficients of this step.
  void* scratch = nullptr;
};

// A 0-d float32 device tensor per SGD momentum buffer, nonzero while the buffer has no history
// (b <- g at the next step); null for a buffer with history. The optimizer owns and clears it.
using FirstStepFlag = const float*;

struct SGDArgs {
  DType dtype = DType::Float32;
  int64_t n_tensors = 0;
  const int64_t* numels = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* momentum_buffers = nullptr;  // read only when momentum != 0
  const FirstStepFlag* first_steps = nullptr;  // per tensor (read only with momentum)
  double lr = 0, weight_decay = 0, momentum = 0, dampening = 0, decay_lr_scale = 1;
  bool nesterov = false, decoupled_weight_decay = false;
  DeviceScalar lr_tensor;
  GradOptions grad;
  Telemetry telemetry;
  const int64_t* const* rng = nullptr;  // stochastic rounding (see above)
  void* const* corrections = nullptr;   // compensated bf16 parameters (see above)
  int master_bits = 32;                 // with corrections: 32 (int16) or 24 (int8)
  float* const* scales = nullptr;       // 8-bit states (see above)
};

struct LionArgs {
  DType dtype = DType::Float32;
  int64_t n_tensors = 0;
  const int64_t* numels = nullptr;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* exp_avgs = nullptr;
  double lr = 0, beta1 = 0, beta2 = 0, weight_decay = 0, decay_lr_scale = 1;
  DeviceScalar lr_tensor;
  GradOptions grad;
  Telemetry telemetry;
  const int64_t* const* rng = nullptr;  // stochastic rounding (see above)
  void* const* corrections = nullptr;   // compensated bf16 parameters (see above)
  int master_bits = 32;                 // with corrections: 32 (int16) or 24 (int8)
  float* const* scales = nullptr;       // 8-bit states (see above)
};

// Rotational variants (docs/theory.md section 3; csrc/cpu/rotational_cpu.cpp and
// wdopt/reference/rotational.py): tensor i is rows[i] rows of numels[i] / rows[i] elements, each
// projected on its sphere. Two launches: a per-tensor prologue (advances rotational_steps and
// AdamW's steps, writes this step's coefficients to ``scratch``), then the row kernel.
enum class RotationalOptimizer : int32_t { AdamW = 0, SGD = 1, Lion = 2 };

struct RotationalArgs {
  DType dtype = DType::Float32;
  RotationalOptimizer optimizer = RotationalOptimizer::AdamW;
  int64_t n_tensors = 0;
  const int64_t* numels = nullptr;
  const int64_t* rows = nullptr;           // rows per tensor (>= 1, dividing numels[i])
  void* const* params = nullptr;           // contiguous
  const void* const* grads = nullptr;
  void* const* state1 = nullptr;           // exp_avg / momentum_buffer / exp_avg (null: SGD without momentum)
  void* const* state2 = nullptr;           // exp_avg_sq (AdamW only)
  float* const* steps = nullptr;           // AdamW's float32 step counts, advanced by one
  void* const* rotational_norms = nullptr;  // rows[i] values of the math type: n, frozen at the first step
  void* const* update_norm_avgs = nullptr;  // rows[i] values of the math type: s
  float* const* rotational_steps = nullptr;  // float32 k, advanced by one; 0: first rotational step
  const FirstStepFlag* first_steps = nullptr;  // SGD with momentum, per tensor
  // Stochastic rounding (bf16/fp16): per tensor a device pointer to its int64 [key, count, index
  // base], as for adamw; the parameter is stored in lane 0, state1 in lane 1, state2 in lane 2.
  const int64_t* const* rng = nullptr;
  // Compensated bf16 parameters, as for adamw: per tensor its int16 (master_bits 32) or int8 (24)
  // correction, laid out like it. The rotation reads the master weights everywhere (sums, norms,
  // telemetry) and stores them split; bf16 only (another dtype with corrections is invalid).
  void* const* corrections = nullptr;
  int master_bits = 32;
  // 8-bit states, as for adamw (Float32, Float16 or BFloat16; Float64, or SGD without momentum, is
  // an invalid value): state1 holds int8 codes, state2 uint8 codes, laid out as params[i];
  // scales[i] is state1's ceil(numels[i] / 256) float32 block scales, scales[n_tensors + i]
  // state2's (AdamW). Two phases: the row kernel rotates with the decoded old states' successors
  // (unrounded) and writes the parameters only; then a block phase recomputes the new states and
  // encodes them with each block's new scale, to nearest or, with ``rng`` (any of the three dtypes),
  // stochastically with the state's lane. found_inf: nothing is written.
  float* const* scales = nullptr;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, momentum = 0;
  bool nesterov = false;
  double angle = 0, norm_decay = 0, rotational_eps = 0;
  bool zero_mean = true, projected = false;
  // capturable: when present, read instead of ``lr`` (projected) or ``angle`` (then it holds η_r²,
  // whose root the kernel takes; csrc/ops.cpp)
  DeviceScalar rate;
  GradOptions grad;
  Telemetry telemetry;  // rows: a multiple of rotation rows (the binding reduces other shapes)
  // Device memory of at least rotational_scratch_bytes(n_tensors) bytes, 16-byte aligned.
  void* scratch = nullptr;
  // Bytes of on-chip (shared memory) row buffers per block; 0: the default (64 KiB). Rows that
  // fit are read once and written once; longer rows take two passes over memory.
  int64_t on_chip_bytes = 0;
};

size_t rotational_scratch_bytes(int64_t n_tensors);
cudaError_t rotational(const RotationalArgs& args, cudaStream_t stream);

// Bytes of device scratch an AdamW call of ``n_tensors`` tensors needs.
size_t adamw_scratch_bytes(int64_t n_tensors);

cudaError_t adamw(const AdamWArgs& args, cudaStream_t stream);
cudaError_t sgd(const SGDArgs& args, cudaStream_t stream);
cudaError_t lion(const LionArgs& args, cudaStream_t stream);

// Kernel launches made by this process so far (all launchers); tests check launches per step.
int64_t launch_count();

}  // namespace cuda
}  // namespace wdopt
