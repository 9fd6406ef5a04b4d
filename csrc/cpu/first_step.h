// SGD's "first step" flags on the CPU: one optional 0-d float32 tensor per momentum buffer,
// nonzero while the buffer has no history (b <- g at the next step). The optimizer owns the flags
// and clears them after a step that GradScaler did not skip (wdopt/optim/sgd.py); the kernels only
// read them, on the device for CUDA (csrc/cuda/launchers.h, FirstStepFlag), here on the host.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace wdopt {
namespace cpu {

inline std::vector<char> first_step_flags(const c10::List<std::optional<at::Tensor>>& flags, const char* op) {
  std::vector<char> first(flags.size(), 0);
  for (size_t i = 0; i < flags.size(); ++i) {
    const std::optional<at::Tensor> flag = flags.get(i);
    if (!flag.has_value() || !flag->defined()) continue;  // a buffer with history
    TORCH_CHECK(flag->device().is_cpu() && flag->scalar_type() == at::kFloat && flag->numel() == 1, op,
                ": first_steps[", i, "] must be a one-element float32 CPU tensor, got ", flag->toString(), " on ",
                flag->device());
    first[i] = *flag->const_data_ptr<float>() != 0.0f;
  }
  return first;
}

}  // namespace cpu
}  // namespace wdopt
