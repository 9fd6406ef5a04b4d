// CUDA implementations of the wdopt operators declared in csrc/ops.cpp: checks the call contract,
// turns the tensors into the plain pointer tables of launchers.h and launches on the current
// stream of the tensors' device. No kernel code here (csrc/cuda/*.cu), no torch there.
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which pulls in cuSPARSE and
// cuBLAS headers): the stream and the device guard are all this file needs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "launchers.h"

namespace {

namespace wc = wdopt::cuda;

wc::DType storage_dtype(const char* op, const at::Tensor& p) {
  switch (p.scalar_type()) {
    case at::kFloat: return wc::DType::Float32;
    case at::kDouble: return wc::DType::Float64;
    case at::kHalf: return wc::DType::Float16;
    case at::kBFloat16: return wc::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": the CUDA kernels take float32, float64, float16 or bfloat16 parameters, got ",
              p.scalar_type());
  return wc::DType::Float32;  // not reached
}

// All parameters on one CUDA device, of one supported dtype, dense (their elements fill one block
// of memory, which the kernels walk as a flat array).
void check_params(const char* op, at::TensorList params) {
  const at::Tensor& p0 = params[0];
  TORCH_CHECK(p0.defined() && p0.is_cuda(), op, ": the CUDA implementation needs CUDA tensors, params[0] is ",
              p0.defined() ? p0.device().str() : std::string("undefined"));
  storage_dtype(op, p0);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device() == p0.device(), op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
                p0.device(), "; one call takes the tensors of one device");
    TORCH_CHECK(p.scalar_type() == p0.scalar_type(), op, ": params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", p0.scalar_type(), "; one call takes the tensors of one dtype");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] (shape ", p.sizes(), ", strides ",
                p.strides(), ") is not dense; the kernels update dense tensors only");
  }
}

// Element k of ``t``'s memory is element k of ``p``'s: same shape, same strides where it matters.
bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  if (t.sizes() != p.sizes()) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) > 1 && t.stride(d) != p.stride(d)) return false;
  }
  return true;
}

// A tensor list that goes with the parameters: one tensor per parameter, same device, dtype,
// shape and layout; ``codes`` (8-bit states): of that dtype instead of the parameters'.
void check_like(const char* op, const char* name, at::TensorList list, at::TensorList params,
                std::optional<at::ScalarType> codes = std::nullopt) {
  TORCH_CHECK(list.size() == params.size(), op, ": expected ", params.size(), " ", name, " (one per parameter), got ",
              list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
                "] is on ", p.device());
    if (codes.has_value()) {
      TORCH_CHECK(t.scalar_type() == *codes, op, ": ", name, "[", i, "] is ", t.scalar_type(), "; with 8-bit states ",
                  "(scales given) it holds their ", *codes, " codes");
    } else {
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] is ", t.scalar_type(),
                  " but params[", i, "] is ", p.scalar_type(), "; parameters, gradients and state share one dtype");
    }
    TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
                "] has shape ", p.sizes());
    TORCH_CHECK(same_layout(t, p), op, ": ", name, "[", i, "] has strides ", t.strides(), " but params[", i,
                "] has strides ", p.strides(), "; the kernels need one memory layout per parameter");
  }
}

// An optional one-element float32/float64 tensor on ``device``, read by the kernels.
wc::DeviceScalar device_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                               const at::Device& device) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but the parameters are on ", device);
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t->scalar_type());
  return wc::DeviceScalar{t->const_data_ptr(), t->scalar_type() == at::kDouble};
}

wc::GradOptions grad_options(const char* op, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, bool maximize, const at::Device& device) {
  wc::GradOptions g;
  g.grad_scale = device_scalar(op, "grad_scale", grad_scale, device);
  g.found_inf = device_scalar(op, "found_inf", found_inf, device);
  g.maximize = maximize;
  return g;
}

std::vector<void*> mutable_pointers(at::TensorList list) {
  std::vector<void*> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) out.push_back(t.mutable_data_ptr());
  return out;
}

std::vector<const void*> const_pointers(at::TensorList list) {
  std::vector<const void*> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) out.push_back(t.const_data_ptr());
  return out;
}

// SGD's first-step flags (csrc/cuda/launchers.h, FirstStepFlag) as device pointers; a missing list
// (no momentum) or entry (a buffer with history) is null.
std::vector<wc::FirstStepFlag> first_step_flags(const char* op, const c10::List<std::optional<at::Tensor>>& flags,
                                               size_t n, const at::Device& device) {
  std::vector<wc::FirstStepFlag> out(n, nullptr);
  for (size_t i = 0; i < flags.size() && i < n; ++i) {
    const std::optional<at::Tensor> flag = flags.get(i);
    if (!flag.has_value() || !flag->defined()) continue;
    TORCH_CHECK(flag->device() == device && flag->scalar_type() == at::kFloat && flag->numel() == 1, op,
                ": first_steps[", i, "] must be a one-element float32 tensor on ", device);
    out[i] = flag->const_data_ptr<float>();
  }
  return out;
}

std::vector<int64_t> numels(at::TensorList params) {
  std::vector<int64_t> out;
  out.reserve(params.size());
  for (const at::Tensor& p : params) out.push_back(p.numel());
  return out;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Rotation telemetry (ops.cpp): [] or one contiguous float64 (K, 4) tensor per parameter on its
// device, K dividing the parameter's numel; the parameters must then be contiguous (rows are
// ranges of the contiguous tensor, the kernels walk memory). The element-wise optimizers also
// take (K, 8) tensors (all of a call alike): the sums and the direction statistics.
struct TelemetryTables {
  std::vector<double*> buffers;
  std::vector<int64_t> rows;
  int columns = 4;
  wc::Telemetry get() const {
    wc::Telemetry t;
    if (!buffers.empty()) {
      t.buffers = buffers.data();
      t.rows = rows.data();
      t.columns = columns;
    }
    return t;
  }
};

TelemetryTables telemetry_tables(const char* op, at::TensorList telemetry, at::TensorList params,
                                 bool statistics = true) {
  TelemetryTables out;
  if (telemetry.empty()) return out;
  out.columns = telemetry[0].defined() && telemetry[0].dim() == 2 ? static_cast<int>(telemetry[0].size(1)) : 4;
  TORCH_CHECK(out.columns == 4 || (statistics && out.columns == 8), op, ": telemetry buffers must have 4 columns",
              statistics ? " (8 with the direction statistics)" : "", ", got ", out.columns);
  TORCH_CHECK(telemetry.size() == params.size(), op, ": expected [] or ", params.size(),
              " telemetry buffers (one per parameter), got ", telemetry.size());
  for (size_t i = 0; i < telemetry.size(); ++i) {
    const at::Tensor& t = telemetry[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined() && t.device() == p.device() && t.scalar_type() == at::kDouble && t.dim() == 2 &&
                    t.size(1) == out.columns && t.size(0) >= 1 && t.is_contiguous(),
                op, ": telemetry[", i, "] must be a contiguous float64 (K, ", out.columns, ") tensor with K >= 1 on ",
                p.device(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    TORCH_CHECK(p.numel() % t.size(0) == 0, op, ": telemetry[", i, "] has ", t.size(0), " rows, which do not divide the ",
                p.numel(), " elements of params[", i, "]");
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous when monitored (telemetry rows are ",
                "ranges of the contiguous tensor)");
    out.buffers.push_back(t.mutable_data_ptr<double>());
    out.rows.push_back(t.size(0));
  }
  return out;
}

// Stochastic rounding (ops.cpp): [] (round to nearest) or one contiguous int64 [key, count, index
// base] tensor of 3 elements per parameter on its device, read by the kernels and never written (the
// driver advances count on the device after the call). Empty: no pointers (launchers.h: rng null).
std::vector<const int64_t*> rng_pointers(const char* op, at::TensorList rng, at::TensorList params) {
  std::vector<const int64_t*> out;
  if (rng.empty()) return out;
  TORCH_CHECK(rng.size() == params.size(), op, ": expected [] or ", params.size(),
              " rng tensors (one per parameter), got ", rng.size());
  out.reserve(rng.size());
  for (size_t i = 0; i < rng.size(); ++i) {
    const at::Tensor& r = rng[i];
    TORCH_CHECK(r.defined(), op, ": rng[", i, "] is undefined");
    TORCH_CHECK(r.scalar_type() == at::kLong && r.numel() == 3 && r.is_contiguous() && r.device() == params[i].device(),
                op, ": rng[", i, "] must be a contiguous int64 tensor of 3 elements ([key, count, index base]) on ",
                params[i].device(), ", got ", r.scalar_type(), " of shape ", r.sizes(), " on ", r.device(),
                r.is_contiguous() ? "" : " (not contiguous)");
    out.push_back(r.const_data_ptr<int64_t>());
  }
  return out;
}

// Compensated bf16 parameters (ops.cpp; the CPU's check_correction is the twin): [] or, for
// bfloat16 parameters, one int16 (32-bit master weights) or int8 (24-bit) tensor per parameter, all
// alike, on its device with its shape and layout (element k of its memory is the parameter's
// element k's: the kernels walk both as flat arrays).
struct Corrections {
  std::vector<void*> pointers;  // empty: none (launchers.h: corrections null)
  int master_bits = 32;
};

Corrections corrections(const char* op, at::TensorList correction, at::TensorList params) {
  Corrections out;
  if (correction.empty()) return out;
  TORCH_CHECK(correction.size() == params.size(), op, ": expected [] or ", params.size(),
              " correction tensors (one per parameter), got ", correction.size());
  TORCH_CHECK(params[0].scalar_type() == at::kBFloat16, op, ": corrections compensate bfloat16 parameters, not ",
              params[0].scalar_type());
  TORCH_CHECK(correction[0].defined(), op, ": correction[0] is undefined");
  const at::ScalarType type = correction[0].scalar_type();
  TORCH_CHECK(type == at::kShort || type == at::kChar, op, ": corrections are int16 or int8, not ", type);
  out.pointers.reserve(correction.size());
  for (size_t i = 0; i < correction.size(); ++i) {
    const at::Tensor& c = correction[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(c.defined(), op, ": correction[", i, "] is undefined");
    TORCH_CHECK(c.scalar_type() == type && c.device() == p.device() && same_layout(c, p), op, ": correction[", i,
                "] must be a ", type, " tensor on ", p.device(), " with the shape ", p.sizes(), " and strides ",
                p.strides(), " of params[", i, "], got ", c.scalar_type(), " of shape ", c.sizes(), " and strides ",
                c.strides(), " on ", c.device());
    out.pointers.push_back(c.mutable_data_ptr());
  }
  out.master_bits = type == at::kShort ? 32 : 24;
  return out;
}

// 8-bit states (ops.cpp; the CPU's check_scales is the twin): [] or, for each of the op's
// ``lists`` state lists in order, one contiguous float32 vector of ceil(numel / 256) block scales
// per parameter on its device, the lists concatenated; float32, float16 or bfloat16 parameters.
// Returns the scales' pointers in that order (launchers.h), empty for none.
std::vector<float*> scale_pointers(const char* op, at::TensorList scales, at::TensorList params, size_t lists,
                                   const char* names) {
  std::vector<float*> out;
  if (scales.empty()) return out;
  TORCH_CHECK(lists > 0, op, ": scales given, but this call has no state to hold in 8 bits (", names, ")");
  TORCH_CHECK(scales.size() == lists * params.size(), op, ": expected [] or ", lists * params.size(),
              " scales (one per parameter for each of ", names, "), got ", scales.size());
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, op, ": 8-bit states are for float32, bfloat16 and float16 ",
              "parameters, not float64");
  out.reserve(scales.size());
  for (size_t j = 0; j < scales.size(); ++j) {
    const at::Tensor& s = scales[j];
    const size_t i = j % params.size();
    const at::Tensor& p = params[i];
    const int64_t blocks = (p.numel() + 255) / 256;
    TORCH_CHECK(s.defined(), op, ": scales[", j, "] is undefined");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == p.device() && s.numel() == blocks && s.is_contiguous(),
                op, ": scales[", j, "] (state list ", j / params.size(), ", params[", i, "]) must be a contiguous ",
                "float32 tensor of ", blocks, " block scales (ceil(", p.numel(), " / 256)) on ", p.device(), ", got ",
                s.scalar_type(), " of ", s.numel(), " elements on ", s.device(),
                s.is_contiguous() ? "" : " (not contiguous)");
    out.push_back(s.mutable_data_ptr<float>());
  }
  return out;
}

// ------------------------------------------------------------------------------------ operators

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList telemetry, double lr,
                double beta1, double beta2,
                double eps, double weight_decay, double decay_lr_scale, bool amsgrad, bool maximize,
                const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, at::TensorList rng, at::TensorList correction,
                at::TensorList scales) {
  constexpr const char* op = "wdopt::adamw_";
  if (params.empty()) return;
  check_params(op, params);
  const std::vector<float*> quantized = scale_pointers(op, scales, params, amsgrad ? 3 : 2,
                                                       amsgrad ? "exp_avgs, exp_avg_sqs, max_exp_avg_sqs"
                                                               : "exp_avgs, exp_avg_sqs");
  const bool q = !quantized.empty();
  check_like(op, "grads", grads, params);
  check_like(op, "exp_avgs", exp_avgs, params, q ? std::optional(at::kChar) : std::nullopt);
  check_like(op, "exp_avg_sqs", exp_avg_sqs, params, q ? std::optional(at::kByte) : std::nullopt);
  if (amsgrad) {
    check_like(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, q ? std::optional(at::kByte) : std::nullopt);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad, got ",
                max_exp_avg_sqs.size(), " tensors");
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(steps.size() == params.size(), op, ": expected ", params.size(), " steps (one per parameter), got ",
              steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined(), op, ": steps[", i, "] is undefined");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == device, op, ": steps[", i,
                "] must be a one-element float32 tensor on ", device, " (the parameters' device), got ",
                s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
  }
  const TelemetryTables tel = telemetry_tables(op, telemetry, params);
  const std::vector<const int64_t*> rounding = rng_pointers(op, rng, params);
  const Corrections compensation = corrections(op, correction, params);

  const c10::cuda::CUDAGuard guard(device);
  const auto n = static_cast<int64_t>(params.size());
  const std::vector<int64_t> sizes = numels(params);
  const std::vector<void*> p = mutable_pointers(params), m = mutable_pointers(exp_avgs),
                           v = mutable_pointers(exp_avg_sqs), vmax = mutable_pointers(max_exp_avg_sqs);
  const std::vector<const void*> g = const_pointers(grads);
  std::vector<float*> step;
  step.reserve(steps.size());
  for (const at::Tensor& s : steps) step.push_back(s.mutable_data_ptr<float>());
  // Per-tensor coefficients of this step, written by the first kernel and read by the second; the
  // caching allocator recycles the block only after work queued on this stream (graph-safe too).
  const at::Tensor scratch = at::empty({static_cast<int64_t>(wc::adamw_scratch_bytes(n))},
                                       params[0].options().dtype(at::kByte));

  wc::AdamWArgs a;
  a.dtype = storage_dtype(op, params[0]);
  a.n_tensors = n;
  a.numels = sizes.data();
  a.params = p.data();
  a.grads = g.data();
  a.exp_avgs = m.data();
  a.exp_avg_sqs = v.data();
  a.max_exp_avg_sqs = amsgrad ? vmax.data() : nullptr;
  a.steps = step.data();
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decay_lr_scale = decay_lr_scale;
  a.amsgrad = amsgrad;
  a.lr_tensor = device_scalar(op, "lr_tensor", lr_tensor, device);
  a.grad = grad_options(op, grad_scale, found_inf, maximize, device);
  a.scratch = scratch.mutable_data_ptr();
  a.telemetry = tel.get();
  a.rng = rounding.empty() ? nullptr : rounding.data();
  a.corrections = compensation.pointers.empty() ? nullptr : compensation.pointers.data();
  a.master_bits = compensation.master_bits;
  a.scales = q ? quantized.data() : nullptr;
  check_launch(op, wc::adamw(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const c10::List<std::optional<at::Tensor>>& first_steps, at::TensorList telemetry, double lr,
              double weight_decay,
              double momentum, double dampening,
              bool nesterov, bool decoupled_weight_decay, double decay_lr_scale, bool maximize,
              const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList rng, at::TensorList correction,
                at::TensorList scales) {
  constexpr const char* op = "wdopt::sgd_";
  if (params.empty()) return;
  check_params(op, params);
  check_like(op, "grads", grads, params);
  const bool has_momentum = momentum != 0;
  const std::vector<float*> quantized =
      scale_pointers(op, scales, params, has_momentum ? 1 : 0, has_momentum ? "momentum_buffers" : "momentum 0");
  const bool q = !quantized.empty();
  if (has_momentum) {
    check_like(op, "momentum_buffers", momentum_buffers, params, q ? std::optional(at::kChar) : std::nullopt);
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty without momentum, got ",
                momentum_buffers.size(), " tensors");
  }
  TORCH_CHECK(first_steps.size() == params.size() || (!has_momentum && first_steps.empty()), op, ": expected ",
              params.size(), " first_steps (one per parameter), got ", first_steps.size());
  const at::Device device = params[0].device();
  const TelemetryTables tel = telemetry_tables(op, telemetry, params);
  const std::vector<const int64_t*> rounding = rng_pointers(op, rng, params);
  const Corrections compensation = corrections(op, correction, params);

  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> sizes = numels(params);
  const std::vector<void*> p = mutable_pointers(params), b = mutable_pointers(momentum_buffers);
  const std::vector<const void*> g = const_pointers(grads);
  const std::vector<wc::FirstStepFlag> first = first_step_flags(op, first_steps, params.size(), device);

  wc::SGDArgs a;
  a.dtype = storage_dtype(op, params[0]);
  a.n_tensors = static_cast<int64_t>(params.size());
  a.numels = sizes.data();
  a.params = p.data();
  a.grads = g.data();
  a.momentum_buffers = has_momentum ? b.data() : nullptr;
  a.first_steps = first.data();
  a.lr = lr;
  a.weight_decay = weight_decay;
  a.momentum = momentum;
  a.dampening = dampening;
  a.decay_lr_scale = decay_lr_scale;
  a.nesterov = nesterov;
  a.decoupled_weight_decay = decoupled_weight_decay;
  a.lr_tensor = device_scalar(op, "lr_tensor", lr_tensor, device);
  a.grad = grad_options(op, grad_scale, found_inf, maximize, device);
  a.telemetry = tel.get();
  a.rng = rounding.empty() ? nullptr : rounding.data();
  a.corrections = compensation.pointers.empty() ? nullptr : compensation.pointers.data();
  a.master_bits = compensation.master_bits;
  a.scales = q ? quantized.data() : nullptr;
  check_launch(op, wc::sgd(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}

void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList telemetry,
               double lr, double beta1, double beta2, double weight_decay, double decay_lr_scale, bool maximize,
               const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, at::TensorList rng, at::TensorList correction,
                at::TensorList scales) {
  constexpr const char* op = "wdopt::lion_";
  if (params.empty()) return;
  check_params(op, params);
  const std::vector<float*> quantized = scale_pointers(op, scales, params, 1, "exp_avgs");
  const bool q = !quantized.empty();
  check_like(op, "grads", grads, params);
  check_like(op, "exp_avgs", exp_avgs, params, q ? std::optional(at::kChar) : std::nullopt);
  const at::Device device = params[0].device();
  const TelemetryTables tel = telemetry_tables(op, telemetry, params);
  const std::vector<const int64_t*> rounding = rng_pointers(op, rng, params);
  const Corrections compensation = corrections(op, correction, params);

  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> sizes = numels(params);
  const std::vector<void*> p = mutable_pointers(params), m = mutable_pointers(exp_avgs);
  const std::vector<const void*> g = const_pointers(grads);

  wc::LionArgs a;
  a.dtype = storage_dtype(op, params[0]);
  a.n_tensors = static_cast<int64_t>(params.size());
  a.numels = sizes.data();
  a.params = p.data();
  a.grads = g.data();
  a.exp_avgs = m.data();
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.weight_decay = weight_decay;
  a.decay_lr_scale = decay_lr_scale;
  a.lr_tensor = device_scalar(op, "lr_tensor", lr_tensor, device);
  a.grad = grad_options(op, grad_scale, found_inf, maximize, device);
  a.telemetry = tel.get();
  a.rng = rounding.empty() ? nullptr : rounding.data();
  a.corrections = compensation.pointers.empty() ? nullptr : compensation.pointers.data();
  a.master_bits = compensation.master_bits;
  a.scales = q ? quantized.data() : nullptr;
  check_launch(op, wc::lion(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}


// The rotational variants (csrc/cpu/rotational_cpu.cpp is the CPU twin; its checks, plus device).
void rotational_cuda(const std::string& optimizer, at::TensorList params, at::TensorList grads, at::TensorList state1,
                     at::TensorList state2, at::TensorList steps, at::TensorList rotational_norms,
                     at::TensorList update_norm_avgs, at::TensorList rotational_steps,
                     const c10::List<std::optional<at::Tensor>>& first_steps, at::TensorList telemetry,
                     double lr, double beta1,
                     double beta2, double eps, double momentum, bool nesterov, double angle, double norm_decay,
                     double rotational_eps, bool zero_mean, bool projected, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& rate_tensor, at::TensorList rng, at::TensorList correction,
                     at::TensorList scales) {
  constexpr const char* op = "wdopt::rotational_";
  if (params.empty()) return;
  const bool adamw = optimizer == "adamw", sgd = optimizer == "sgd", lion = optimizer == "lion";
  TORCH_CHECK(adamw || sgd || lion, op, ": unknown optimizer ", optimizer);
  check_params(op, params);
  check_like(op, "grads", grads, params);
  const bool has_state1 = !sgd || momentum != 0;
  // 8-bit states (state1's scales, then state2's): checked with the rest, before anything is
  // written; state1 then holds int8 codes, state2 uint8 codes (rotational.cuh's two phases).
  const char* const state_names = adamw ? "state1, state2" : (has_state1 ? "state1" : "momentum 0");
  const std::vector<float*> quantized =
      scale_pointers(op, scales, params, adamw ? 2 : (has_state1 ? 1 : 0), state_names);
  const bool q = !quantized.empty();
  if (has_state1) check_like(op, "state1", state1, params, q ? std::optional(at::kChar) : std::nullopt);
  if (adamw) {
    check_like(op, "state2", state2, params, q ? std::optional(at::kByte) : std::nullopt);
    TORCH_CHECK(steps.size() == params.size(), op, ": expected ", params.size(), " steps, got ", steps.size());
  }
  if (sgd && momentum != 0) {
    TORCH_CHECK(first_steps.size() == params.size(), op, ": expected ", params.size(),
                " first_steps (one per parameter), got ", first_steps.size());
  }
  TORCH_CHECK(rotational_norms.size() == params.size() && update_norm_avgs.size() == params.size() &&
                  rotational_steps.size() == params.size(),
              op, ": expected one rotational_norms, update_norm_avgs and rotational_steps entry per parameter");
  const at::Device device = params[0].device();
  const auto opmath_type = params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> rows(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.is_contiguous(), op, ": parameter ", t, " must be a contiguous CUDA tensor of the call's dtype");
    TORCH_CHECK(grads[t].is_contiguous(), op, ": gradient ", t, " does not match its parameter");
    if (has_state1) TORCH_CHECK(state1[t].is_contiguous(), op, ": state of parameter ", t, " does not match it");
    if (adamw) {
      TORCH_CHECK(state2[t].is_contiguous() && steps[t].defined() && steps[t].scalar_type() == at::kFloat &&
                      steps[t].numel() == 1 && steps[t].device() == device,
                  op, ": AdamW state of parameter ", t, " does not match it");
    }
    const at::Tensor& n = rotational_norms[t];
    const at::Tensor& s = update_norm_avgs[t];
    const at::Tensor& k = rotational_steps[t];
    TORCH_CHECK(n.defined() && s.defined() && k.defined() && n.scalar_type() == opmath_type &&
                    s.scalar_type() == opmath_type && n.numel() == s.numel() && n.is_contiguous() &&
                    s.is_contiguous() && n.device() == device && s.device() == device &&
                    k.scalar_type() == at::kFloat && k.numel() == 1 && k.device() == device,
                op, ": rotational state ", t, " must have the math dtype and one value per row");
    rows[t] = n.numel();
    TORCH_CHECK(rows[t] > 0 && p.numel() % rows[t] == 0, op, ": parameter ", t, " has ", p.numel(),
                " elements, not a multiple of its ", rows[t], " rows");
  }
  TelemetryTables tel = telemetry_tables(op, telemetry, params, /*statistics=*/false);
  // Stochastic rounding and compensated bf16 parameters, checked as the element-wise ops check
  // theirs, before anything is written (the kernel reads master weights wherever it reads p).
  const std::vector<const int64_t*> rounding = rng_pointers(op, rng, params);
  const Corrections compensation = corrections(op, correction, params);
  // The kernel gathers telemetry rows inside rotation rows (K_tel a multiple of K_rot). Other
  // shapes (a per-neuron 1-D tensor has K_rot = numel, K_tel = 1) go through a finer buffer of
  // lcm(K_tel, K_rot) rows, summed into the caller's after the kernel (on the stream, graph-safe).
  std::vector<std::pair<size_t, at::Tensor>> finer;
  for (size_t t = 0; t < tel.rows.size(); ++t) {
    if (tel.rows[t] % rows[t] == 0) continue;
    const int64_t k = std::lcm(tel.rows[t], rows[t]);
    at::Tensor buffer = at::empty({k, 4}, telemetry[t].options());
    tel.buffers[t] = buffer.mutable_data_ptr<double>();
    tel.rows[t] = k;
    finer.emplace_back(t, std::move(buffer));
  }

  const c10::cuda::CUDAGuard guard(device);
  const auto n_tensors = static_cast<int64_t>(params.size());
  const std::vector<int64_t> sizes = numels(params);
  const std::vector<void*> p = mutable_pointers(params), s1 = mutable_pointers(state1), s2 = mutable_pointers(state2),
                           norms = mutable_pointers(rotational_norms), avgs = mutable_pointers(update_norm_avgs);
  const std::vector<const void*> g = const_pointers(grads);
  std::vector<float*> step, rot_step;
  for (const at::Tensor& x : steps) step.push_back(x.mutable_data_ptr<float>());
  for (const at::Tensor& x : rotational_steps) rot_step.push_back(x.mutable_data_ptr<float>());
  const std::vector<wc::FirstStepFlag> first = first_step_flags(op, first_steps, params.size(), device);
  // Per-tensor step scalars: written by the prologue kernel, read by the row kernel.
  const at::Tensor scratch = at::empty({static_cast<int64_t>(wc::rotational_scratch_bytes(n_tensors))},
                                       params[0].options().dtype(at::kByte));

  wc::RotationalArgs a;
  a.dtype = storage_dtype(op, params[0]);
  a.optimizer = adamw ? wc::RotationalOptimizer::AdamW : (lion ? wc::RotationalOptimizer::Lion : wc::RotationalOptimizer::SGD);
  a.n_tensors = n_tensors;
  a.numels = sizes.data();
  a.rows = rows.data();
  a.params = p.data();
  a.grads = g.data();
  a.state1 = has_state1 ? s1.data() : nullptr;
  a.state2 = adamw ? s2.data() : nullptr;
  a.steps = adamw ? step.data() : nullptr;
  a.rotational_norms = norms.data();
  a.update_norm_avgs = avgs.data();
  a.rotational_steps = rot_step.data();
  a.first_steps = first.data();
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.momentum = momentum;
  a.nesterov = nesterov;
  a.angle = angle;
  a.norm_decay = norm_decay;
  a.rotational_eps = rotational_eps;
  a.zero_mean = zero_mean;
  a.projected = projected;
  a.rate = device_scalar(op, "rate_tensor", rate_tensor, device);
  a.grad = grad_options(op, grad_scale, found_inf, maximize, device);
  a.telemetry = tel.get();
  a.rng = rounding.empty() ? nullptr : rounding.data();
  a.corrections = compensation.pointers.empty() ? nullptr : compensation.pointers.data();
  a.master_bits = compensation.master_bits;
  a.scales = q ? quantized.data() : nullptr;
  a.scratch = scratch.mutable_data_ptr();
  check_launch(op, wc::rotational(a, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  for (auto& [t, buffer] : finer) {
    const int64_t k = telemetry[t].size(0);
    at::Tensor summed = buffer.view({k, buffer.size(0) / k, 4}).sum(1);
    if (a.grad.found_inf.ptr != nullptr) {  // a skipped step leaves the buffer as it was
      summed = at::where(found_inf->ne(0).reshape({}), telemetry[t], summed);
    }
    telemetry[t].copy_(summed);
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(wdopt, CUDA, m) {
  m.impl("adamw_", &adamw_cuda);
  m.impl("sgd_", &sgd_cuda);
  m.impl("lion_", &lion_cuda);
  m.impl("rotational_", &rotational_cuda);
}
