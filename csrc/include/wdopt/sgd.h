// SGD with momentum (L2 or decoupled decay), the one C++ statement of its math
// (wdopt/reference/sgd.py is the specification). Shared by the CPU and CUDA kernels.
#pragma once

#include "hd.h"

namespace wdopt {

struct SGDHyper {
  double lr, weight_decay, momentum, dampening, decay_lr_scale;
  bool nesterov, decoupled;
};

template <typename T> struct SGDCoefficients {
  T lr, decay, weight_decay, momentum, one_minus_dampening;
};

template <typename T>
WDOPT_HD SGDCoefficients<T> sgd_coefficients(const SGDHyper& h, double lr) {
  return SGDCoefficients<T>{static_cast<T>(lr), static_cast<T>(1.0 - lr * h.weight_decay * h.decay_lr_scale),
                            static_cast<T>(h.weight_decay), static_cast<T>(h.momentum),
                            static_cast<T>(1.0 - h.dampening)};
}

// One element. ``first_step``: the momentum buffer holds no history yet (b <- g). ``nesterov``
// at run time (the CPU kernels: a select, half the instantiations) ...
template <bool HAS_MOMENTUM, bool DECOUPLED, typename T>
WDOPT_HD void sgd_update(T& p, T g, T& b, bool first_step, bool nesterov, const SGDCoefficients<T>& c) {
  if (DECOUPLED) {
    p = p * c.decay;
  } else {
    g = g + c.weight_decay * p;
  }
  if (HAS_MOMENTUM) {
    b = first_step ? g : b * c.momentum + c.one_minus_dampening * g;
    g = nesterov ? g + c.momentum * b : b;
  }
  p = p - c.lr * g;
}

// ... or at compile time (the CUDA kernels).
template <bool HAS_MOMENTUM, bool NESTEROV, bool DECOUPLED, typename T>
WDOPT_HD void sgd_update(T& p, T g, T& b, bool first_step, const SGDCoefficients<T>& c) {
  sgd_update<HAS_MOMENTUM, DECOUPLED>(p, g, b, first_step, NESTEROV, c);
}

// Direction statistics: n = ĝ (the loss's gradient, without the L2 term) and s = the momentum
// buffer before the step (zero on its first step and without momentum).
template <bool HAS_MOMENTUM, typename T>
WDOPT_HD Direction<T> sgd_direction_statistics(T g, T b, bool first_step) {
  return {g, HAS_MOMENTUM && !first_step ? b : T(0)};
}

}  // namespace wdopt

namespace wdopt {

// The rotational variant's momentum, fed with g only (no L2, no dampening): b <- g on the first
// step, else mu*b + g. The state update of sgd_direction, and all of it where a kernel stores the
// state apart from the direction (the rotational CPU kernel's 8-bit block phase).
template <typename T>
WDOPT_HD void sgd_direction_momentum(T g, T& b, bool first_step, T momentum) {
  b = first_step ? g : b * momentum + g;
}

// The rotational variant's direction: u = g + mu*b with nesterov, else b (g without momentum),
// with b updated by sgd_direction_momentum.
template <bool HAS_MOMENTUM, bool NESTEROV, typename T>
WDOPT_HD T sgd_direction(T g, T& b, bool first_step, T momentum) {
  if (!HAS_MOMENTUM) return g;
  sgd_direction_momentum(g, b, first_step, momentum);
  return NESTEROV ? g + momentum * b : b;
}

}  // namespace wdopt
