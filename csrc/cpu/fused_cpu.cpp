// Fused CPU kernels for the "cpu" backend: AdamW, SGD and Lion over a list of tensors in one pass
// over memory and one parallel region per step. The math is csrc/include/wdopt/*.h, shared with
// the CUDA kernels; this file only moves memory. The operators check their tensor lists and gather
// a TensorTable of data pointers (fused_cpu.h); the kernels run on that table, which the step
// plan (csrc/step_plan.cpp) gathers itself while validating a cached step.
//
// Parallel plan: the step's elements, concatenated across tensors, are cut into one contiguous
// range per thread (equal element counts, so a 38M-element embedding and a hundred 768-element
// norms balance alike); each thread walks its range tensor by tensor with a vectorizable loop.
// Many small tensors therefore cost one parallel region, not one per tensor.
//
// Rotation telemetry (a monitored step, wdopt/reference/telemetry.py): the cut points are moved
// to row boundaries, so each row is updated by one thread in one loop that also sums ω², ω·Δω,
// Δω² and ĝ² in double while the values are in registers: no extra pass over memory, and the
// sums come out the same on every run (fixed order, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../include/wdopt/adamw.h"
#include "../include/wdopt/lion.h"
#include "../include/wdopt/quantization.h"
#include "../include/wdopt/rounding.h"
#include "../include/wdopt/sgd.h"
#include "first_step.h"
#include "fused_cpu.h"
#include "scratch.h"
#include "storage.h"
#include "telemetry.h"
#include "walk.h"

// A loop the compiler must vectorize (as _Pragma: it sits inside AT_DISPATCH's macro argument).
#define WDOPT_SIMD _Pragma("omp simd")

namespace wdopt::cpu {
namespace {

template <typename F> void dispatch_bool(bool value, F&& f) {
  if (value) f(Bool<true>{}); else f(Bool<false>{});
}

// ------------------------------------------------------------------ checks

// Element k of ``t``'s memory is element k of ``p``'s: same shape, same strides where it matters
// (a size-1 dimension's stride is arbitrary: contiguous tensors may disagree there).
bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  if (t.sizes() != p.sizes()) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) > 1 && t.stride(d) != p.stride(d)) return false;
  }
  return true;
}

// ``list`` holds one tensor per parameter, laid out like it, of the parameter's dtype or ``dtype``
// (8-bit codes).
void check_list(const at::TensorList& list, const at::TensorList& params, const char* name,
                at::ScalarType dtype = at::ScalarType::Undefined) {
  TORCH_CHECK(list.size() == params.size(), "wdopt: ", name, " has ", list.size(), " tensors for ",
              params.size(), " parameters");
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    const auto& p = params[i];
    const at::ScalarType want = dtype == at::ScalarType::Undefined ? p.scalar_type() : dtype;
    TORCH_CHECK(t.device() == p.device() && t.scalar_type() == want, "wdopt: ", name, "[", i,
                "] is ", t.scalar_type(), " on ", t.device(), ", expected ", want, " on parameter ", i, "'s device ",
                p.device());
    TORCH_CHECK(same_layout(t, p), "wdopt: ", name, "[", i,
                "] does not have parameter ", i, "'s shape and layout");
  }
}

void check_params(const at::TensorList& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "wdopt cpu backend: parameter ", i, " is on ", p.device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "wdopt cpu backend: mixed dtypes in one call");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "wdopt cpu backend: parameter ", i,
                " is not dense; the Python driver passes dense work copies");
  }
}

void check_steps(const at::TensorList& steps, const at::TensorList& params) {
  TORCH_CHECK(steps.size() == params.size(), "wdopt: one step tensor per parameter is needed");
  for (const auto& s : steps) {
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                "wdopt: step counts must be float32 CPU scalars");
  }
}

// GradScaler skipped this step.
bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

double read_lr(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
}

// ------------------------------------------------------------------ the parallel walk (walk.h)

// Calls body(tensor_index, begin, end, sums, states) over every element of every tensor (see
// for_each_slice), ``states`` the tensor's state arrays (scalar_t*), each call within one run of
// storage_for. Without telemetry, ``sums`` is null. With it (one float64 (K, 4) or (K, 8) buffer
// per tensor), body is called once per row with that row's sums to fill.
template <typename scalar_t, typename Body>
void for_each_range(const TensorTable& table, const Body& body) {
  const bool monitored = !table.telemetry.empty();
  const int64_t n = static_cast<int64_t>(table.size());
  int64_t* const rows = monitored ? scratch<int64_t, 1>(n) : nullptr;
  for (int64_t k = 0; monitored && k < n; ++k) rows[k] = row_size(table, k);
  for_each_slice(table, rows, [&](int64_t k, int64_t begin, int64_t end) {
    const std::array<scalar_t*, 3> states{static_cast<scalar_t*>(table.state1[k]),
                                          static_cast<scalar_t*>(table.state2[k]),
                                          static_cast<scalar_t*>(table.state3[k])};
    const int64_t* rng = table.rng.empty() ? nullptr : table.rng[k];
    if (!monitored) {
      for_each_run(rng, begin, end, [&](int64_t first, int64_t last) { body(k, first, last, nullptr, states); });
      return;
    }
    for (int64_t row = begin; row < end; row += rows[k]) {
      double* const sums = table.telemetry[k] + row / rows[k] * table.columns;
      // A row that a run's end cuts (a tensor past 2^32 elements): its parts' sums, added.
      for_each_run(rng, row, row + rows[k], [&](int64_t first, int64_t last) {
        if (first == row && last == row + rows[k]) {
          body(k, first, last, sums, states);
          return;
        }
        double part[8];
        body(k, first, last, part, states);
        for (int64_t c = 0; c < table.columns; ++c) sums[c] = first == row ? part[c] : sums[c] + part[c];
      });
    }
  });
}

// The table of an operator call, after its checks: ``states`` are the optimizer's state lists
// in order (an empty list: that state is absent).
TensorTable gather(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
                   at::TensorList steps, at::TensorList telemetry, at::TensorList rng,
                   at::TensorList correction, at::TensorList scales) {
  TensorTable t;
  const size_t n = params.size();
  t.resize(n);
  std::vector<void*>* columns[] = {&t.state1, &t.state2, &t.state3};
  for (size_t i = 0; i < n; ++i) {
    t.numel[i] = params[i].numel();
    t.param[i] = params[i].data_ptr();
    t.grad[i] = grads[i].const_data_ptr();
    size_t k = 0;
    for (const auto& list : states) {
      if (!list.empty()) (*columns[k])[i] = list[i].data_ptr();
      ++k;
    }
    if (!steps.empty()) t.step[i] = steps[i].data_ptr<float>();
  }
  for (size_t i = 0; i < telemetry.size(); ++i) {
    t.telemetry.push_back(telemetry[i].data_ptr<double>());
    t.rows.push_back(telemetry[i].size(0));
  }
  if (!telemetry.empty()) t.columns = telemetry[0].size(1);
  for (const auto& r : rng) t.rng.push_back(r.const_data_ptr<int64_t>());
  for (const auto& c : correction) t.correction.push_back(c.data_ptr());
  t.master_bits = correction.empty() ? 16 : (correction[0].scalar_type() == at::kShort ? 32 : 24);
  for (size_t j = 0; j < scales.size(); ++j) t.scales[j / n].push_back(scales[j].data_ptr<float>());
  return t;
}

}  // namespace

void check_rng(const at::TensorList& rng, const at::TensorList& params) {
  if (rng.empty()) return;
  TORCH_CHECK(rng.size() == params.size(), "wdopt: one rng tensor per parameter is needed");
  for (size_t i = 0; i < rng.size(); ++i) {
    TORCH_CHECK(rng[i].scalar_type() == at::kLong && rng[i].numel() == 3 && rng[i].device().is_cpu() &&
                    rng[i].is_contiguous(),
                "wdopt: rng[", i, "] must be a contiguous int64 CPU tensor of 3 elements ([key, count, index base])");
  }
}

// Compensated bf16 parameters: one int16 or int8 correction per parameter, all alike, laid out
// like it. Returns the master weight's bits (16: none).
int check_correction(const at::TensorList& correction, const at::TensorList& params) {
  if (correction.empty()) return 16;
  TORCH_CHECK(correction.size() == params.size(), "wdopt: one correction tensor per parameter is needed");
  TORCH_CHECK(params[0].scalar_type() == at::kBFloat16, "wdopt: corrections compensate bfloat16 parameters, not ",
              params[0].scalar_type());
  const at::ScalarType type = correction[0].scalar_type();
  TORCH_CHECK(type == at::kShort || type == at::kChar, "wdopt: corrections are int16 or int8, not ", type);
  for (size_t i = 0; i < correction.size(); ++i) {
    TORCH_CHECK(correction[i].scalar_type() == type && correction[i].device().is_cpu() &&
                    same_layout(correction[i], params[i]),
                "wdopt: correction[", i, "] must be a ", type, " CPU tensor with parameter ", i, "'s shape and layout");
  }
  return type == at::kShort ? 32 : 24;
}

// 8-bit states: ``scales`` is [] or, for each of the ``lists`` state lists in order, one float32
// vector of ceil(numel/256) block scales per parameter (wdopt/reference/quantization.py); the
// state lists then hold codes: int8, uint8 for second moments. Returns whether they are 8-bit.
bool check_scales(const at::TensorList& scales, const at::TensorList& params, size_t lists) {
  if (scales.empty()) return false;
  TORCH_CHECK(scales.size() == lists * params.size(), "wdopt: scales has ", scales.size(), " tensors for ", lists,
              " state lists of ", params.size(), " parameters");
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, "wdopt: 8-bit states are for float32, bfloat16 and float16 "
              "parameters, not float64");
  for (size_t j = 0; j < scales.size(); ++j) {
    const auto& s = scales[j];
    const auto& p = params[j % params.size()];
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu() && s.is_contiguous() &&
                    s.numel() == (p.numel() + kQuantBlock - 1) / kQuantBlock,
                "wdopt: scales[", j, "] must be a contiguous float32 CPU tensor of ",
                (p.numel() + kQuantBlock - 1) / kQuantBlock, " block scales");
  }
  return true;
}

namespace {

void check_telemetry(const at::TensorList& telemetry, const at::TensorList& params) {
  if (telemetry.empty()) return;
  TORCH_CHECK(telemetry.size() == params.size(), "wdopt: one telemetry buffer per parameter is needed");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& b = telemetry[i];
    TORCH_CHECK(b.scalar_type() == at::kDouble && b.device().is_cpu() && b.is_contiguous() && b.dim() == 2 &&
                    (b.size(1) == 4 || b.size(1) == 8) && b.size(1) == telemetry[0].size(1) && b.size(0) > 0 &&
                    params[i].numel() % b.size(0) == 0 && params[i].is_contiguous(),
                "wdopt: telemetry[", i, "] must be a contiguous float64 (K, 4) or (K, 8) CPU tensor (all with the "
                "same columns), K dividing the contiguous parameter's ", params[i].numel(), " elements");
  }
}

// Each tensor's stochastic-rounding streams for this step (nullptr: to nearest), computed once
// before the walk: its bodies run once per 256-element block with 8-bit states.
const Streams* step_streams(const TensorTable& t) {
  if (t.rng.empty()) return nullptr;
  Streams* const out = scratch<Streams>(t.size());
  for (size_t k = 0; k < t.size(); ++k) out[k] = streams_of(t.rng[k]);
  return out;
}

// Tensor k's storage for the run of its elements from ``begin`` (the walks of for_each_state_range
// hand the bodies whole runs).
template <typename scalar_t, bool SR, int MASTER>
Storage<scalar_t, SR, MASTER> storage_of(const TensorTable& t, const Streams* streams, int64_t k, int64_t begin) {
  return storage_for<scalar_t, SR, MASTER>(streams == nullptr ? nullptr : streams + k, begin,
                                           t.correction.empty() ? nullptr : t.correction[k]);
}

// Walks a step's elements with body(k, begin, end, sums, states): states held in scalar_t
// (for_each_range) or 8-bit (for_each_block; SIGNED per state list).
template <typename scalar_t, bool... SIGNED, typename Body>
void for_each_state_range(const TensorTable& t, const Body& body) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (t.quantized()) {
      for_each_block<SIGNED...>(t, body);
      return;
    }
  }
  for_each_range<scalar_t>(t, body);
}

template <typename Array> using element_of = std::remove_pointer_t<typename Array::value_type>;

// One element loop: ω_i ← element(i, ω_i, ĝ[i]) over [begin, end) through the parameter accessor
// (Storage::Param: its loads and stores), the state updated inside element. With ``sums`` (a
// monitored row) the same loop also accumulates the row's telemetry, and with ``columns`` 8 the
// direction statistics of direction(i, ĝ[i]) (read before element runs).
template <typename scalar_t, typename opmath, typename Param, typename Element, typename Dir>
inline void update_elements(const Param& param_arg, const scalar_t* __restrict__ g, int64_t begin, int64_t end,
                            const GradTransform<opmath>& transform, double* sums, int64_t columns,
                            const Element& element_arg, const Dir& direction) {
  // Local copies (the functions capture their state pointers by value): the pointers then live
  // in registers and the loops vectorize with contiguous loads and stores.
  const Element element = element_arg;
  const Param param = param_arg;
  if (sums == nullptr) {
WDOPT_SIMD
    for (int64_t i = begin; i < end; ++i) {
      param.store(i, element(i, param.load(i), transform(static_cast<opmath>(g[i]))));
    }
    return;
  }
  const auto next = [=](int64_t i, opmath w) { return element(i, w, transform(static_cast<opmath>(g[i]))); };
  const auto grad = [=](int64_t i) { return transform(static_cast<opmath>(g[i])); };
  if (columns == 8) {
    write_and_measure_directions<opmath>(param, begin, end, next, grad, direction, sums);
  } else {
    write_and_measure<opmath>(param, begin, end, next, grad, sums);
  }
}

template <typename scalar_t> scalar_t* data(void* p) { return static_cast<scalar_t*>(p); }
template <typename scalar_t> const scalar_t* data(const void* p) { return static_cast<const scalar_t*>(p); }

}  // namespace

// ------------------------------------------------------------------ the kernels, on a table

void adamw_table(const TensorTable& t, at::ScalarType dtype, double lr, double beta1, double beta2, double eps,
                 double weight_decay, double decay_lr_scale, bool amsgrad, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  if (t.size() == 0 || skipped(found_inf)) return;
  const AdamWHyper hyper{read_lr(lr, lr_tensor), beta1, beta2, eps, weight_decay, decay_lr_scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "wdopt_adamw", [&] {
    using opmath = opmath_t<scalar_t>;
    // Per-tensor scalars, once per step; then the steps advance. Tensors of one model usually
    // share their step count: equal steps share the coefficients (two pow() calls each).
    AdamWCoefficients<opmath>* const coefficients = scratch<AdamWCoefficients<opmath>>(t.size());
    float last_step = -1.0f;
    for (size_t i = 0; i < t.size(); ++i) {
      if (i + kPrefetchAhead < t.size()) __builtin_prefetch(t.step[i + kPrefetchAhead], 1);
      float* step = t.step[i];
      *step += 1.0f;
      if (i > 0 && *step == last_step) {
        coefficients[i] = coefficients[i - 1];
      } else {
        coefficients[i] = adamw_coefficients<opmath>(hyper, hyper.lr, static_cast<double>(*step));
        last_step = *step;
      }
    }
    const auto transform = grad_transform<opmath>(grad_scale, maximize);
    dispatch_bool(amsgrad, [&](auto AMSGRAD) {
     const Streams* const streams = step_streams(t);
     dispatch_storage<scalar_t>(!t.rng.empty(), t.master_bits, [&](auto SR, auto MASTER) {
      const auto body = [&](int64_t k, int64_t begin, int64_t end, double* sums, auto states) {
        using S = element_of<decltype(states)>;
        S* __restrict__ m = states[0];
        S* __restrict__ v = states[1];
        S* __restrict__ v_max = AMSGRAD ? states[2] : nullptr;
        const auto c = coefficients[k];
        const auto r = storage_of<scalar_t, SR, MASTER>(t, streams, k, begin);
        update_elements(r.param(data<scalar_t>(t.param[k])), data<scalar_t>(t.grad[k]), begin, end, transform,
                        sums, t.columns, [=](int64_t i, opmath pi, opmath gi) {
          opmath mi = m[i], vi = v[i];
          opmath vmi = AMSGRAD ? static_cast<opmath>(v_max[i]) : opmath(0);
          adamw_update<AMSGRAD>(pi, gi, mi, vi, vmi, c);
          m[i] = r.template state<1, S>(i, mi);
          v[i] = r.template state<2, S>(i, vi);
          if (AMSGRAD) v_max[i] = r.template state<3, S>(i, vmi);
          return pi;
        }, [=](int64_t i, opmath gi) {
          return adamw_direction_statistics<AMSGRAD>(gi, static_cast<opmath>(m[i]), static_cast<opmath>(v[i]),
                                                     AMSGRAD ? static_cast<opmath>(v_max[i]) : opmath(0), c);
        });
      };
      if constexpr (AMSGRAD) {
        for_each_state_range<scalar_t, true, false, false>(t, body);
      } else {
        for_each_state_range<scalar_t, true, false>(t, body);
      }
     });
    });
  });
}

void sgd_table(const TensorTable& t, at::ScalarType dtype, double lr, double weight_decay, double momentum,
               double dampening, bool nesterov, bool decoupled_weight_decay, double decay_lr_scale, bool maximize,
               const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  if (t.size() == 0 || skipped(found_inf)) return;
  const bool has_momentum = momentum != 0.0;
  const SGDHyper hyper{read_lr(lr, lr_tensor), weight_decay, momentum, dampening, decay_lr_scale, nesterov,
                       decoupled_weight_decay};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "wdopt_sgd", [&] {
    using opmath = opmath_t<scalar_t>;
    const auto c = sgd_coefficients<opmath>(hyper, hyper.lr);
    const auto transform = grad_transform<opmath>(grad_scale, maximize);
    dispatch_bool(has_momentum, [&](auto HAS_MOMENTUM) {
      // L2 with λ = 0 adds nothing, as in the reference: not even 0·p (inf·0 would be NaN).
      dispatch_bool(decoupled_weight_decay || weight_decay == 0.0, [&](auto DECOUPLED) {
       const Streams* const streams = step_streams(t);
       dispatch_storage<scalar_t>(!t.rng.empty(), t.master_bits, [&](auto SR, auto MASTER) {
        const auto body = [&](int64_t k, int64_t begin, int64_t end, double* sums, auto states) {
          using S = element_of<decltype(states)>;
          S* __restrict__ b = HAS_MOMENTUM ? states[0] : nullptr;
          const bool first = HAS_MOMENTUM && t.first[k];
          const auto r = storage_of<scalar_t, SR, MASTER>(t, streams, k, begin);
          update_elements(r.param(data<scalar_t>(t.param[k])), data<scalar_t>(t.grad[k]), begin, end, transform,
                          sums, t.columns, [=](int64_t i, opmath pi, opmath gi) {
            opmath bi = HAS_MOMENTUM ? static_cast<opmath>(b[i]) : opmath(0);
            sgd_update<HAS_MOMENTUM, DECOUPLED>(pi, gi, bi, first, nesterov, c);
            if (HAS_MOMENTUM) b[i] = r.template state<1, S>(i, bi);
            return pi;
          }, [=](int64_t i, opmath gi) {
            return sgd_direction_statistics<HAS_MOMENTUM>(gi, HAS_MOMENTUM ? static_cast<opmath>(b[i]) : opmath(0),
                                                          first);
          });
        };
        if constexpr (HAS_MOMENTUM) {
          for_each_state_range<scalar_t, true>(t, body);
        } else {
          for_each_range<scalar_t>(t, body);  // no state to quantize
        }
       });
      });
    });
  });
}

void lion_table(const TensorTable& t, at::ScalarType dtype, double lr, double beta1, double beta2, double weight_decay,
                double decay_lr_scale, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (t.size() == 0 || skipped(found_inf)) return;
  const LionHyper hyper{read_lr(lr, lr_tensor), beta1, beta2, weight_decay, decay_lr_scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "wdopt_lion", [&] {
    using opmath = opmath_t<scalar_t>;
    const auto c = lion_coefficients<opmath>(hyper, hyper.lr);
    const auto transform = grad_transform<opmath>(grad_scale, maximize);
    const Streams* const streams = step_streams(t);
    dispatch_storage<scalar_t>(!t.rng.empty(), t.master_bits, [&](auto SR, auto MASTER) {
      const auto body = [&](int64_t k, int64_t begin, int64_t end, double* sums, auto states) {
        using S = element_of<decltype(states)>;
        S* __restrict__ m = states[0];
        const auto r = storage_of<scalar_t, SR, MASTER>(t, streams, k, begin);
        update_elements(r.param(data<scalar_t>(t.param[k])), data<scalar_t>(t.grad[k]), begin, end, transform,
                        sums, t.columns, [=](int64_t i, opmath pi, opmath gi) {
          opmath mi = m[i];
          lion_update(pi, gi, mi, c);
          m[i] = r.template state<1, S>(i, mi);
          return pi;
        }, [=](int64_t i, opmath gi) { return lion_direction_statistics(gi, static_cast<opmath>(m[i]), c); });
      };
      for_each_state_range<scalar_t, true>(t, body);
    });
  });
}

// ------------------------------------------------------------------ the operators: checks, then the table

namespace {

void adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList telemetry, double lr, double beta1,
            double beta2, double eps, double weight_decay, double decay_lr_scale, bool amsgrad, bool maximize,
            const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf, at::TensorList rng,
            at::TensorList correction, at::TensorList scales) {
  if (params.empty()) return;
  check_params(params);
  check_list(grads, params, "grads");
  const bool q = check_scales(scales, params, amsgrad ? 3 : 2);
  check_list(exp_avgs, params, "exp_avgs", q ? at::kChar : at::ScalarType::Undefined);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", q ? at::kByte : at::ScalarType::Undefined);
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", q ? at::kByte : at::ScalarType::Undefined);
  check_steps(steps, params);
  check_telemetry(telemetry, params);
  check_rng(rng, params);
  check_correction(correction, params);
  if (skipped(found_inf)) return;
  const TensorTable t = gather(params, grads, {exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()},
                               steps, telemetry, rng, correction, scales);
  adamw_table(t, params[0].scalar_type(), lr, beta1, beta2, eps, weight_decay, decay_lr_scale, amsgrad, maximize,
              lr_tensor, grad_scale, std::nullopt);
}

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          const c10::List<std::optional<at::Tensor>>& first_steps,
          at::TensorList telemetry, double lr, double weight_decay, double momentum, double dampening, bool nesterov,
          bool decoupled_weight_decay, double decay_lr_scale, bool maximize,
          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
          const std::optional<at::Tensor>& found_inf, at::TensorList rng,
          at::TensorList correction, at::TensorList scales) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_params(params);
  check_list(grads, params, "grads");
  const bool q = check_scales(scales, params, has_momentum ? 1 : 0);
  if (has_momentum) {
    check_list(momentum_buffers, params, "momentum_buffers", q ? at::kChar : at::ScalarType::Undefined);
    TORCH_CHECK(first_steps.size() == params.size(), "wdopt: one first_steps flag per parameter is needed");
  }
  check_telemetry(telemetry, params);
  check_rng(rng, params);
  check_correction(correction, params);
  if (skipped(found_inf)) return;
  TensorTable t = gather(params, grads, {has_momentum ? momentum_buffers : at::TensorList()}, {}, telemetry, rng, correction,
                         scales);
  t.first = first_step_flags(first_steps, "wdopt::sgd_");
  sgd_table(t, params[0].scalar_type(), lr, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay,
            decay_lr_scale, maximize, lr_tensor, grad_scale, std::nullopt);
}

void lion_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList telemetry, double lr,
           double beta1, double beta2, double weight_decay, double decay_lr_scale, bool maximize,
           const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, at::TensorList rng,
           at::TensorList correction, at::TensorList scales) {
  if (params.empty()) return;
  check_params(params);
  check_list(grads, params, "grads");
  const bool q = check_scales(scales, params, 1);
  check_list(exp_avgs, params, "exp_avgs", q ? at::kChar : at::ScalarType::Undefined);
  check_telemetry(telemetry, params);
  check_rng(rng, params);
  check_correction(correction, params);
  if (skipped(found_inf)) return;
  const TensorTable t = gather(params, grads, {exp_avgs}, {}, telemetry, rng, correction, scales);
  lion_table(t, params[0].scalar_type(), lr, beta1, beta2, weight_decay, decay_lr_scale, maximize, lr_tensor,
             grad_scale, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(wdopt, CPU, m) {
  m.impl("adamw_", &adamw_);
  m.impl("sgd_", &sgd_);
  m.impl("lion_", &lion_);
}

}  // namespace wdopt::cpu
