// AdamW, the one C++ statement of its math (wdopt/reference/adamw.py is the specification).
// Used by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) alike.
#pragma once

#include "hd.h"

namespace wdopt {

// Group hyperparameters, exact (double), as the host receives them.
struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay, decay_lr_scale;
};

// Per-tensor scalars for one step, rounded once to the math type T.
// inv_bias_correction2_sqrt is 1/sqrt(1−β2^t) computed in T from the T-rounded root: dividing by
// a scalar is multiplying by its reciprocal, as torch.optim's kernels and the reference do.
template <typename T> struct AdamWCoefficients {
  T decay, step_size, inv_bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// ``step`` is this tensor's step count after the step (>= 1). Computed in double, as
// Python computes the reference's scalars, then rounded once.
template <typename T>
WDOPT_HD AdamWCoefficients<T> adamw_coefficients(const AdamWHyper& h, double lr, double step) {
  const double bias_correction1 = 1.0 - pow(h.beta1, step);
  const double bias_correction2 = 1.0 - pow(h.beta2, step);
  return AdamWCoefficients<T>{
      static_cast<T>(1.0 - lr * h.weight_decay * h.decay_lr_scale),
      static_cast<T>(lr / bias_correction1),
      T(1) / static_cast<T>(sqrt(bias_correction2)),
      static_cast<T>(1.0 - h.beta1),
      static_cast<T>(h.beta2),
      static_cast<T>(1.0 - h.beta2),
      static_cast<T>(h.eps)};
}

// The moments alone, m ← m + (1−β1)(g − m) and v ← β2·v + (1−β2)·g²: the state update of
// adamw_update and adamw_direction, and all of it where a kernel stores the states apart from the
// parameter (the rotational CPU kernel's 8-bit block phase recomputes them so, bit for bit).
template <typename T>
WDOPT_HD void adamw_moments(T g, T& m, T& v, const AdamWCoefficients<T>& c) {
  m = m + c.one_minus_beta1 * (g - m);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
}

// One element: p, m, v (and v_max with amsgrad) updated in place; g already unscaled/negated.
template <bool AMSGRAD, typename T>
WDOPT_HD void adamw_update(T& p, T g, T& m, T& v, T& v_max, const AdamWCoefficients<T>& c) {
  p = p * c.decay;
  adamw_moments(g, m, v, c);
  T second_moment = v;
  if (AMSGRAD) {
    v_max = max_nan(v_max, v);
    second_moment = v_max;
  }
  const T denom = sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

// Direction statistics: n = ĝ/(sqrt(v̂)+ε) and s = m/(sqrt(v̂)+ε), v̂ this step's, from the state
// before the step (adamw_update's v and denominator, recomputed: the update is left as it is).
template <bool AMSGRAD, typename T>
WDOPT_HD Direction<T> adamw_direction_statistics(T g, T m, T v, T v_max, const AdamWCoefficients<T>& c) {
  T second_moment = v * c.beta2 + c.one_minus_beta2 * g * g;
  if (AMSGRAD) second_moment = max_nan(v_max, second_moment);
  // One division (the Triton kernels' form too): statistics need not round as the update does.
  const T inv_denom = T(1) / (sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps);
  return {g * inv_denom, m * inv_denom};
}

}  // namespace wdopt

namespace wdopt {

// The rotational variant's direction: Adam's step without decay and without −lr,
// u = (m/(1−β1^t)) / (sqrt(v)/sqrt(1−β2^t) + ε), with m and v updated as adamw_update does.
// inv_bias_correction1 is 1/(1−β1^t) rounded as the reference rounds it.
template <typename T>
WDOPT_HD T adamw_direction(T g, T& m, T& v, T inv_bias_correction1, const AdamWCoefficients<T>& c) {
  adamw_moments(g, m, v, c);
  return (m * inv_bias_correction1) / (sqrt(v) * c.inv_bias_correction2_sqrt + c.eps);
}

}  // namespace wdopt
