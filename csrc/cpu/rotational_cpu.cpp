// Fused CPU kernel of the rotational variants (docs/theory.md section 3; the specification is
// wdopt/reference/rotational.py). Work unit: one neuron (a row of C elements). A row is read
// from memory once: the base direction u is computed into a per-thread row buffer (updating the
// optimizer's state), and the centring, tangent projection, step and renormalisation then work
// on the row in cache. Rows are spread over threads with one parallel region per step; the
// reductions have a fixed order (deterministic: no atomics, the same result on every run).
// Rotation telemetry (a monitored step) is summed in the last pass, while the row is written.
// Low precision (stochastic rounding, compensated bf16 parameters) enters through storage.h, as in
// fused_cpu.cpp: every read of p is its master weight, every store rounds in its lane.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../include/wdopt/adamw.h"
#include "../include/wdopt/lion.h"
#include "../include/wdopt/sgd.h"
#include "first_step.h"
#include "fused_cpu.h"
#include "scratch.h"
#include "storage.h"
#include "telemetry.h"

// Vectorized loops (as _Pragma: they sit inside AT_DISPATCH's macro argument), with sums.
#define WDOPT_SIMD _Pragma("omp simd")
#define WDOPT_SIMD_PRAGMA(x) _Pragma(#x)
#define WDOPT_SIMD_SUM(...) WDOPT_SIMD_PRAGMA(omp simd reduction(+ : __VA_ARGS__))

namespace wdopt::cpu {
namespace {

struct Row {
  int64_t tensor, row, size;
};

struct RotationOptions {
  double angle, lr, norm_decay, eps;
  bool zero_mean, projected;
};

// A row of a parameter (Storage::Param) as rotate_row addresses it: the row's element j is the
// tensor's element offset + j, the index its random bits and its correction are taken at.
template <typename Param> struct RowOf {
  using opmath = typename Param::opmath;
  Param param;
  int64_t offset;
  WDOPT_INLINE opmath load(int64_t j) const { return param.load(offset + j); }
  WDOPT_INLINE opmath store(int64_t j, opmath x) const { return param.store(offset + j, x); }
};

// One row: ``direction(j)`` returns u_j (and updates that element's optimizer state). Three
// vectorized passes over the row, which stays in cache after the first: (1) u and the sums
// Σu, Σp, Σp², Σu·p; (2) the centred tangent t = u − mean(u) − p·⟨u − mean(u), p⟩/n² with ‖t‖²,
// Σt, Σp·t; (3) p = (q − mean(q))·n/‖q − mean(q)‖ with q = p − step·t. ‖t‖² is summed from t
// itself, never as a difference of moments: a nearly constant u would cancel catastrophically.
// ``sums`` (a monitored step): the row's telemetry [Σω², Σω·Δω, ΣΔω², Σĝ²], ĝ = grad_at(j).
template <typename Row, typename Direction, typename GradAt>
void rotate_row(const Row& p_arg, int64_t size, const Direction& direction_arg,
                typename Row::opmath* __restrict__ buffer, typename Row::opmath* norm, typename Row::opmath* s_avg,
                double norm_decay_bias_correction, bool first, const RotationOptions& o, double* sums,
                const GradAt& grad_at_arg) {
  using opmath = typename Row::opmath;
  const Row p = p_arg;  // local copies: their pointers stay in registers
  const Direction direction = direction_arg;
  const GradAt grad_at = grad_at_arg;
  opmath sum_u = 0, sum_p = 0, sum_pp = 0, sum_up = 0;
  WDOPT_SIMD_SUM(sum_u, sum_p, sum_pp, sum_up)
  for (int64_t j = 0; j < size; ++j) {
    const opmath u = direction(j);
    const opmath pj = p.load(j);
    buffer[j] = u;
    sum_u += u;
    sum_p += pj;
    sum_pp += pj * pj;
    sum_up += u * pj;
  }
  if (first) {  // freeze the row's norm, of the centred row with zero_mean (exactly: one more pass)
    const opmath mean_p = o.zero_mean ? sum_p / static_cast<opmath>(size) : opmath(0);
    opmath centred_sq = 0;
    WDOPT_SIMD_SUM(centred_sq)
    for (int64_t j = 0; j < size; ++j) {
      const opmath c = p.load(j) - mean_p;
      centred_sq += c * c;
    }
    *norm = std::sqrt(centred_sq);
  }
  const opmath n = *norm;
  const opmath mean_u = o.zero_mean ? sum_u / static_cast<opmath>(size) : opmath(0);
  const opmath radial = n > 0 ? (sum_up - mean_u * sum_p) / (n * n) : opmath(0);
  opmath tangent_sq = 0, sum_t = 0, sum_pt = 0;
  WDOPT_SIMD_SUM(tangent_sq, sum_t, sum_pt)
  for (int64_t j = 0; j < size; ++j) {
    const opmath pj = p.load(j);
    const opmath t = buffer[j] - mean_u - pj * radial;
    buffer[j] = t;
    tangent_sq += t * t;
    sum_t += t;
    sum_pt += pj * t;
  }
  double scale;  // the step is q = p − scale·t
  if (o.projected) {
    scale = o.lr;
  } else {
    const double s = o.norm_decay * static_cast<double>(*s_avg) + (1.0 - o.norm_decay) * static_cast<double>(tangent_sq);
    *s_avg = static_cast<opmath>(s);
    scale = o.angle * n / (std::sqrt(s / norm_decay_bias_correction) + o.eps);
  }
  const opmath step = static_cast<opmath>(scale);
  // Back onto the sphere of radius n, re-centred with zero_mean (see the reference). Σq and Σq²
  // follow from the sums in closed form (no pass over q): Σq = Σp − step·Σt, and
  // Σq² = Σp² − 2·step·Σp·t + step²·‖t‖², terms of one sign up to the rounding residue Σp·t. After
  // the first step p is centred and q's mean is a rounding residue, so ‖q − mean‖² = Σq² − C·mean²
  // loses nothing; at the first step p may not be centred yet (weights loaded after construction):
  // then the centred norm is summed exactly.
  const double d_step = static_cast<double>(step);
  const opmath mean_q = o.zero_mean ? static_cast<opmath>((static_cast<double>(sum_p) - d_step * sum_t) /
                                                          static_cast<double>(size))
                                    : opmath(0);
  const double sum_qq = static_cast<double>(sum_pp) - 2.0 * d_step * sum_pt + d_step * d_step * tangent_sq;
  opmath centred_qq = static_cast<opmath>(sum_qq - static_cast<double>(size) * mean_q * mean_q);
  if (first && o.zero_mean) {
    centred_qq = 0;
    WDOPT_SIMD_SUM(centred_qq)
    for (int64_t j = 0; j < size; ++j) {
      const opmath c = (p.load(j) - step * buffer[j]) - mean_q;
      centred_qq += c * c;
    }
  }
  const opmath to_sphere = centred_qq > 0 ? n / std::sqrt(centred_qq) : opmath(0);  // a zero row stays zero
  if (sums == nullptr) {
    WDOPT_SIMD
    for (int64_t j = 0; j < size; ++j) p.store(j, ((p.load(j) - step * buffer[j]) - mean_q) * to_sphere);
    return;
  }
  write_and_measure<opmath>(
      p, 0, size,
      [=](int64_t j, opmath w) { return ((w - step * buffer[j]) - mean_q) * to_sphere; }, grad_at, sums);
}

// The longest row whose copy lives in a thread's scratch memory (see the walk below).
constexpr int64_t kScratchRow = 1 << 20;

// Every row of the call, in order (scratch memory: a large model has 100,000 rows or more).
std::pair<const Row*, size_t> plan_rows(const at::TensorList& params, const at::TensorList& norms) {
  size_t n = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t k = norms[t].numel();
    TORCH_CHECK(k > 0 && params[t].numel() % k == 0, "wdopt rotational: parameter ", t, " has ", params[t].numel(),
                " elements, not a multiple of its ", k, " rows");
    n += static_cast<size_t>(k);
  }
  Row* rows = scratch<Row>(n);
  size_t i = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t k = norms[t].numel();
    for (int64_t r = 0; r < k; ++r) rows[i++] = Row{static_cast<int64_t>(t), r, params[t].numel() / k};
  }
  return {rows, n};
}

template <typename T> T* ptr(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

void rotational_(const std::string& optimizer, at::TensorList params, at::TensorList grads, at::TensorList state1,
                 at::TensorList state2, at::TensorList steps, at::TensorList rotational_norms,
                 at::TensorList update_norm_avgs, at::TensorList rotational_steps,
                 const c10::List<std::optional<at::Tensor>>& first_steps,
                 at::TensorList telemetry, double lr, double beta1, double beta2, double eps, double momentum, bool nesterov, double angle,
                 double norm_decay, double rotational_eps, bool zero_mean, bool projected, bool maximize,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& rate_tensor, at::TensorList rng, at::TensorList correction) {
  if (params.empty()) return;
  check_rng(rng, params);
  const int master_bits = check_correction(correction, params);
  const bool adamw = optimizer == "adamw", sgd = optimizer == "sgd", lion = optimizer == "lion";
  const bool has_rate = rate_tensor.has_value() && rate_tensor->defined();
  TORCH_CHECK(!has_rate || (rate_tensor->device().is_cpu() && rate_tensor->numel() == 1 &&
                            rate_tensor->scalar_type() == at::kDouble),
              "wdopt rotational: rate_tensor must be a one-element float64 CPU tensor");
  TORCH_CHECK(adamw || sgd || lion, "wdopt rotational: unknown optimizer ", optimizer);
  const size_t n_tensors = params.size();
  for (size_t t = 0; t < n_tensors; ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == params[0].scalar_type(),
                "wdopt rotational: parameter ", t, " must be a contiguous CPU tensor of the call's dtype");
    TORCH_CHECK(grads[t].is_contiguous() && grads[t].sizes() == p.sizes() && grads[t].scalar_type() == p.scalar_type(),
                "wdopt rotational: gradient ", t, " does not match its parameter");
    const auto opmath_type = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(rotational_norms[t].scalar_type() == opmath_type && update_norm_avgs[t].scalar_type() == opmath_type &&
                    rotational_norms[t].numel() == update_norm_avgs[t].numel() &&
                    rotational_steps[t].scalar_type() == at::kFloat,
                "wdopt rotational: rotational state ", t, " must have the math dtype and one value per row");
    if (!sgd || momentum != 0) {
      TORCH_CHECK(state1[t].is_contiguous() && state1[t].sizes() == p.sizes() &&
                      state1[t].scalar_type() == p.scalar_type(),
                  "wdopt rotational: state of parameter ", t, " does not match it");
    }
    if (adamw) {
      TORCH_CHECK(state2[t].is_contiguous() && state2[t].sizes() == p.sizes() &&
                      state2[t].scalar_type() == p.scalar_type() && steps[t].scalar_type() == at::kFloat,
                  "wdopt rotational: AdamW state of parameter ", t, " does not match it");
    }
  }
  TORCH_CHECK(telemetry.empty() || telemetry.size() == n_tensors, "wdopt rotational: one telemetry buffer per parameter");
  for (size_t t = 0; t < telemetry.size(); ++t) {
    TORCH_CHECK(telemetry[t].scalar_type() == at::kDouble && telemetry[t].is_contiguous() && telemetry[t].dim() == 2 &&
                    telemetry[t].size(0) == rotational_norms[t].numel() && telemetry[t].size(1) == 4,
                "wdopt rotational: telemetry[", t, "] must be a contiguous float64 (K, 4) tensor, one row per neuron");
  }
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;

  const auto [rows, n_rows] = plan_rows(params, rotational_norms);
  double* const norm_decay_bias_correction = scratch<double, 0>(n_tensors);  // 1 − norm_decay^k
  char* const first = scratch<char>(n_tensors);
  double* const step = scratch<double, 1>(n_tensors);
  for (size_t t = 0; t < n_tensors; ++t) {
    float* rot_step = ptr<float>(rotational_steps[t]);
    first[t] = *rot_step == 0.0f;
    *rot_step += 1.0f;
    norm_decay_bias_correction[t] = 1.0 - std::pow(norm_decay, static_cast<double>(*rot_step));
    if (adamw) {
      float* s = ptr<float>(steps[t]);
      *s += 1.0f;
      step[t] = *s;
    }
  }
  if (has_rate) {  // lr (projected) or η_r² (see csrc/ops.cpp): the root, correctly rounded, here
    const double rate = *rate_tensor->const_data_ptr<double>();
    if (projected) {
      lr = rate;
    } else {
      angle = std::sqrt(rate);
    }
  }
  const RotationOptions options{angle, lr, norm_decay, rotational_eps, zero_mean, projected};
  const double inv_scale = grad_scale.has_value() ? 1.0 / grad_scale->item<double>() : 1.0;
  const double sign = maximize ? -1.0 : 1.0;
  const std::vector<char> fresh = first_step_flags(first_steps, "wdopt::rotational_");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "wdopt_rotational", [&] {
    using opmath = opmath_t<scalar_t>;
    const opmath g_scale = static_cast<opmath>(inv_scale), g_sign = static_cast<opmath>(sign);
    // Per-tensor AdamW scalars, once per step (the reference's roundings).
    AdamWCoefficients<opmath>* const adamw_c = scratch<AdamWCoefficients<opmath>>(adamw ? n_tensors : 0);
    opmath* const inv_bc1 = scratch<opmath, 2>(adamw ? n_tensors : 0);
    for (size_t t = 0; adamw && t < n_tensors; ++t) {
      adamw_c[t] = adamw_coefficients<opmath>(AdamWHyper{lr, beta1, beta2, eps, 0.0, 1.0}, lr, step[t]);
      inv_bc1[t] = opmath(1) / static_cast<opmath>(1.0 - std::pow(beta1, step[t]));
    }
    const LionHyper lion_hyper{lr, beta1, beta2, 0.0, 1.0};
    const auto lion_c = lion_coefficients<opmath>(lion_hyper, lr);
    const opmath mu = static_cast<opmath>(momentum);
    int64_t longest = 0;
    for (size_t i = 0; i < n_rows; ++i) longest = std::max(longest, rows[i].size);
    // One contiguous run of rows per thread, of equal element counts (rows differ in length).
    int64_t* const row_start = scratch<int64_t, 2>(n_rows + 1);  // 0 and 1: fused_cpu.cpp's walk
    row_start[0] = 0;
    for (size_t i = 0; i < n_rows; ++i) row_start[i + 1] = row_start[i] + rows[i].size;
    const int64_t total = row_start[n_rows];
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(n_rows)));
    auto first_row = [&](int64_t part) {
      return static_cast<int64_t>(std::lower_bound(row_start, row_start + n_rows, total * part / parts) - row_start);
    };
    dispatch_storage<scalar_t>(!rng.empty(), master_bits, [&](auto SR, auto MASTER) {
      at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
        // This thread's copy of a row: the thread's scratch for rows up to kScratchRow elements (a
        // row of 65,536 fp32 columns is 256 KB); a longer one (a whole-tensor sphere) gets a buffer
        // of its own, which the scratch would otherwise keep for the life of the process — its work
        // dwarfs the page faults of a fresh allocation anyway.
        std::vector<opmath> own;
        opmath* const buffer = longest <= kScratchRow ? scratch<opmath, 3>(longest) : (own.resize(longest), own.data());
        for (int64_t k = first_row(part_begin); k < first_row(part_end); ++k) {
          const Row& r = rows[k];
          const int64_t t = r.tensor, offset = r.row * r.size;
          // The tensor's storage: its stream words and correction; the row reads them at offset + j.
          const int64_t* words = rng.empty() ? nullptr : rng[t].const_data_ptr<int64_t>();
          void* const low_bits = correction.empty() ? nullptr : correction[t].data_ptr();
          const auto st = storage_for<scalar_t, SR, MASTER>(words, low_bits);
          const RowOf<typename decltype(st)::Param> p{st.param(ptr<scalar_t>(params[t])), offset};
          const scalar_t* g = ptr<scalar_t>(grads[t]) + offset;
          opmath* norm = ptr<opmath>(rotational_norms[t]) + r.row;
          opmath* s_avg = ptr<opmath>(update_norm_avgs[t]) + r.row;
          // Captures by value (pointers, coefficients): the row loops then see plain local pointers and
          // vectorize with contiguous loads; through captured references they fell back to gathers.
          const auto grad_at = [=](int64_t j) { return (static_cast<opmath>(g[j]) * g_scale) * g_sign; };
          double* sums = telemetry.empty() ? nullptr : ptr<double>(telemetry[t]) + 4 * r.row;
          if (adamw) {
            scalar_t* m = ptr<scalar_t>(state1[t]);
            scalar_t* v = ptr<scalar_t>(state2[t]);
            const auto c = adamw_c[t];
            const opmath inv_bias_correction1 = inv_bc1[t];
            rotate_row(p, r.size, [=](int64_t j) {
              const int64_t i = offset + j;
              opmath mj = m[i], vj = v[i];
              const opmath u = adamw_direction(grad_at(j), mj, vj, inv_bias_correction1, c);
              m[i] = st.template store<1>(i, mj);
              v[i] = st.template store<2>(i, vj);
              return u;
            }, buffer, norm, s_avg, norm_decay_bias_correction[t], first[t], options, sums, grad_at);
          } else if (lion) {
            scalar_t* m = ptr<scalar_t>(state1[t]);
            rotate_row(p, r.size, [=](int64_t j) {
              const int64_t i = offset + j;
              opmath mj = m[i];
              const opmath u = lion_direction(grad_at(j), mj, lion_c);
              m[i] = st.template store<1>(i, mj);
              return u;
            }, buffer, norm, s_avg, norm_decay_bias_correction[t], first[t], options, sums, grad_at);
          } else if (momentum != 0) {
            scalar_t* b = ptr<scalar_t>(state1[t]);
            const bool first_step = fresh[t];
            rotate_row(p, r.size, [=](int64_t j) {
              const int64_t i = offset + j;
              opmath bj = b[i];
              const opmath u = nesterov ? sgd_direction<true, true>(grad_at(j), bj, first_step, mu)
                                        : sgd_direction<true, false>(grad_at(j), bj, first_step, mu);
              b[i] = st.template store<1>(i, bj);
              return u;
            }, buffer, norm, s_avg, norm_decay_bias_correction[t], first[t], options, sums, grad_at);
          } else {
            rotate_row(p, r.size, [=](int64_t j) { return grad_at(j); }, buffer, norm,
                       s_avg, norm_decay_bias_correction[t], first[t], options, sums, grad_at);
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(wdopt, CPU, m) { m.impl("rotational_", &rotational_); }

}  // namespace wdopt::cpu
