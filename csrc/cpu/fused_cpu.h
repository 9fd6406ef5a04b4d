// The CPU kernels of the "cpu" backend as the step plan (csrc/step_plan.cpp) calls them: on a
// table of data pointers its validation already gathered, with no second pass over the tensors.
// The torch.library operators (fused_cpu.cpp) check their arguments, gather the same table and
// call the same functions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace wdopt::cpu {

// The tensors of one call as the kernels address them: per tensor its element count and the data
// of its parameter, gradient and state tensors (nullptr where the optimizer has none).
struct TensorTable {
  std::vector<int64_t> numel;
  std::vector<void*> param, state1, state2, state3;
  std::vector<const void*> grad;
  std::vector<float*> step;        // AdamW's step counts
  std::vector<char> first;         // SGD: the momentum buffer has no history yet
  std::vector<double*> telemetry;  // empty, or one (K, columns) float64 buffer per tensor ...
  std::vector<int64_t> rows;       // ... of K rows
  int64_t columns = 4;             // 4 sums, or 8 with the direction statistics
  std::vector<const int64_t*> rng;  // empty (round to nearest), or per tensor its stochastic-rounding
                                    // [key, count, index base] (a shard's base: the global index of its element 0)
  std::vector<void*> correction;    // empty, or per tensor the low bits of its master weight ...
  int master_bits = 16;             // ... int16 (32-bit master) or int8 (24-bit); 16: plain parameters
  std::vector<float*> scales[3];    // 8-bit states: per state list, per tensor its block scales (state1-3
                                    // then hold codes: int8, or uint8 for second moments); else empty
  bool quantized() const { return !scales[0].empty(); }

  void resize(size_t n) {
    numel.assign(n, 0);
    param.assign(n, nullptr);
    state1.assign(n, nullptr);
    state2.assign(n, nullptr);
    state3.assign(n, nullptr);
    grad.assign(n, nullptr);
    step.assign(n, nullptr);
  }
  size_t size() const { return numel.size(); }
};

// The operators' checks of ``rng`` (one int64 [key, count, index base] CPU tensor per parameter,
// or none), ``correction`` (one int16 or int8 tensor laid out like each bf16 parameter, or none:
// returns the master weight's bits, 16 for plain parameters) and ``scales`` (8-bit states: none,
// or per state list in order one float32 vector of block scales per parameter; returns whether
// the states are 8-bit), shared by fused_cpu.cpp and rotational_cpu.cpp.
void check_rng(const at::TensorList& rng, const at::TensorList& params);
int check_correction(const at::TensorList& correction, const at::TensorList& params);
bool check_scales(const at::TensorList& scales, const at::TensorList& params, size_t lists);

// AdamW: state1 = exp_avg, state2 = exp_avg_sq, state3 = max_exp_avg_sq (amsgrad).
void adamw_table(const TensorTable& t, at::ScalarType dtype, double lr, double beta1, double beta2, double eps,
                 double weight_decay, double decay_lr_scale, bool amsgrad, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf);
// SGD: state1 = momentum_buffer (momentum != 0), ``first`` set per tensor.
void sgd_table(const TensorTable& t, at::ScalarType dtype, double lr, double weight_decay, double momentum,
               double dampening, bool nesterov, bool decoupled_weight_decay, double decay_lr_scale, bool maximize,
               const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf);
// Lion: state1 = exp_avg.
void lion_table(const TensorTable& t, at::ScalarType dtype, double lr, double beta1, double beta2, double weight_decay,
                double decay_lr_scale, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

}  // namespace wdopt::cpu
