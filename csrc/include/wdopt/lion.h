// Lion, the one C++ statement of its math (wdopt/reference/lion.py is the specification).
// Shared by the CPU and CUDA kernels.
#pragma once

#include "hd.h"

namespace wdopt {

struct LionHyper {
  double lr, beta1, beta2, weight_decay, decay_lr_scale;
};

template <typename T> struct LionCoefficients {
  T lr, decay, one_minus_beta1, one_minus_beta2;
};

template <typename T>
WDOPT_HD LionCoefficients<T> lion_coefficients(const LionHyper& h, double lr) {
  return LionCoefficients<T>{static_cast<T>(lr), static_cast<T>(1.0 - lr * h.weight_decay * h.decay_lr_scale),
                             static_cast<T>(1.0 - h.beta1), static_cast<T>(1.0 - h.beta2)};
}

template <typename T>
WDOPT_HD void lion_update(T& p, T g, T& m, const LionCoefficients<T>& c) {
  const T interpolated = m + c.one_minus_beta1 * (g - m);
  // sign(), keeping NaN as torch.sign does; 0 stays 0.
  const T direction = interpolated > T(0) ? T(1) : (interpolated < T(0) ? T(-1) : interpolated);
  p = p * c.decay - c.lr * direction;
  m = m + c.one_minus_beta2 * (g - m);
}

}  // namespace wdopt

namespace wdopt {

// The rotational variant's direction: sign(m + (1−β1)(g − m)), with m updated as lion_update does.
template <typename T>
WDOPT_HD T lion_direction(T g, T& m, const LionCoefficients<T>& c) {
  const T interpolated = m + c.one_minus_beta1 * (g - m);
  m = m + c.one_minus_beta2 * (g - m);
  return interpolated > T(0) ? T(1) : (interpolated < T(0) ? T(-1) : interpolated);
}

}  // namespace wdopt
