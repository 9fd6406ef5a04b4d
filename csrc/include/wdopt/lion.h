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

// The update's sign: +1 where c > 0, −1 where c < 0, and c itself otherwise, so ±0 stays ±0 and a
// NaN stays NaN. A NaN gradient thus reaches the parameter, as torch's AdamW and SGD let it: it must
// not freeze the element while exp_avg silently holds the NaN (which a sign(NaN) = 0, torch.sign's
// answer, would do). An infinite gradient moves p by ±lr and makes m infinite; the next step's
// m + (1−β1)(g − m) is inf − inf = NaN, and p becomes NaN then. Same rule as wdopt/reference/lion.py.
template <typename T>
WDOPT_HD T lion_sign(T c) {
  return c > T(0) ? T(1) : (c < T(0) ? T(-1) : c);
}

// The momentum alone, m ← m + (1−β2)(g − m): the state update of lion_update and lion_direction,
// and all of it where a kernel stores the state apart from the parameter (the rotational CPU
// kernel's 8-bit block phase).
template <typename T>
WDOPT_HD void lion_momentum(T g, T& m, const LionCoefficients<T>& c) {
  m = m + c.one_minus_beta2 * (g - m);
}

template <typename T>
WDOPT_HD void lion_update(T& p, T g, T& m, const LionCoefficients<T>& c) {
  const T direction = lion_sign(m + c.one_minus_beta1 * (g - m));
  p = p * c.decay - c.lr * direction;
  lion_momentum(g, m, c);
}

// Direction statistics: n = c = m + (1−β1)(ĝ − m), whose sign is the update, and s = m before the step.
template <typename T>
WDOPT_HD Direction<T> lion_direction_statistics(T g, T m, const LionCoefficients<T>& c) {
  return {m + c.one_minus_beta1 * (g - m), m};
}

}  // namespace wdopt

namespace wdopt {

// The rotational variant's direction: lion_sign(m + (1−β1)(g − m)) (NaN propagates into the row),
// with m updated as lion_update does.
template <typename T>
WDOPT_HD T lion_direction(T g, T& m, const LionCoefficients<T>& c) {
  const T direction = lion_sign(m + c.one_minus_beta1 * (g - m));
  lion_momentum(g, m, c);
  return direction;
}

}  // namespace wdopt
