// Fused CPU kernel of the rotational variants (docs/theory.md section 3; the specification is
// wdopt/reference/rotational.py). Work unit: one neuron (a row of C elements). A row is read
// from memory once: the base direction u is computed into a per-thread row buffer (updating the
// optimizer's state), and the centring, tangent projection, step and renormalisation then work
// on the row in cache. Rows are spread over threads with one parallel region per step; the
// reductions have a fixed order (deterministic: no atomics, the same result on every run).
// Rotation telemetry (a monitored step) is summed in the last pass, while the row is written.
// Low precision (stochastic rounding, compensated bf16 parameters) enters through storage.h, as in
// fused_cpu.cpp: every read of p is its master weight, every store rounds in its lane.
//
// 8-bit states (state_bits=8, wdopt/reference/quantization.py) are blocks of 256 elements in the
// tensor's memory order, each with one scale: a block may straddle rows that different threads
// rotate, and its new scale is the max over all of its new values. So the step takes two phases.
// The row phase decodes each row's old codes into thread buffers (decoding is element-wise and
// reads only: any thread may decode any element), computes the new states in fp32 and uses them,
// unrounded as the reference does, for the direction and the rotation, and writes the parameter,
// but no state. Once every row is done, the block phase (walk.h's for_each_block, the element-wise
// kernels' own walk, parallel over whole blocks) decodes the old codes again, recomputes the same
// new states from the gradient (adamw_moments, lion_momentum, sgd_direction_momentum: the same
// operations on the same inputs, so the same bits) and encodes them with each block's new scale,
// to nearest or with the state's lane's words. That costs one more read of the gradient and the
// codes, against a bf16/fp32 state's read and write of 2 or 4 bytes per element per state.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../include/wdopt/adamw.h"
#include "../include/wdopt/lion.h"
#include "../include/wdopt/sgd.h"
#include "first_step.h"
#include "fused_cpu.h"
#include "quantized_blocks.h"
#include "scratch.h"
#include "storage.h"
#include "telemetry.h"
#include "walk.h"

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

// A thread's buffer of ``longest`` elements for a row: its scratch (``Use``) for rows up to
// kScratchRow elements (a row of 65,536 fp32 columns is 256 KB); a longer one (a whole-tensor
// sphere) gets a buffer of its own, ``own``, which the scratch would otherwise keep for the life
// of the process — its work dwarfs the page faults of a fresh allocation anyway.
template <typename T, int Use> T* row_buffer(int64_t longest, std::vector<T>& own) {
  if (longest <= kScratchRow) return scratch<T, Use>(longest);
  own.resize(longest);
  return own.data();
}

// Where a row's direction reads its optimizer states' old values (LANE 1: state1, 2: state2) and
// puts the new ones, at the row's element j. In the parameter's dtype, the state arrays, read and
// stored back (rounded in their lanes) as the row is walked ...
template <typename scalar_t, typename Storage> struct StoredStates {
  using opmath = opmath_t<scalar_t>;
  Storage st;
  scalar_t* s1;
  scalar_t* s2;
  int64_t offset;  // the row's first element in its tensor
  template <int LANE> WDOPT_INLINE opmath load(int64_t j) const {
    return static_cast<opmath>((LANE == 1 ? s1 : s2)[offset + j]);
  }
  template <int LANE> WDOPT_INLINE void store(int64_t j, opmath x) const {
    (LANE == 1 ? s1 : s2)[offset + j] = st.template store<LANE>(offset + j, x);
  }
};

// ... or, 8-bit, the row's old values decoded into the thread's buffers, the new ones dropped:
// the block phase computes them again and encodes them (see the top of this file).
struct DecodedStates {
  const float* s1;
  const float* s2;
  template <int LANE> WDOPT_INLINE float load(int64_t j) const { return (LANE == 1 ? s1 : s2)[j]; }
  template <int LANE> WDOPT_INLINE void store(int64_t, float) const {}
};

// Elements [first, first + n) of a tensor's 8-bit state (``codes``, its block ``scales``) into
// out[0, n), block by block.
template <bool SIGNED> void decode_run(const void* codes, const float* scales, int64_t first, int64_t n, float* out) {
  const auto* bytes = static_cast<const int8_t*>(codes);
  for (int64_t i = first, end = first + n; i < end;) {
    const int64_t block = i / kQuantBlock, stop = std::min(end, (block + 1) * kQuantBlock);
    decode_block<SIGNED>(bytes + i, scales[block], out + (i - first), stop - i);
    i = stop;
  }
}

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
                 const std::optional<at::Tensor>& rate_tensor, at::TensorList rng, at::TensorList correction,
                 at::TensorList scales) {
  if (params.empty()) return;
  check_rng(rng, params);
  const int master_bits = check_correction(correction, params);
  const bool adamw = optimizer == "adamw", sgd = optimizer == "sgd", lion = optimizer == "lion";
  const bool has_state1 = !sgd || momentum != 0;
  const bool has_rate = rate_tensor.has_value() && rate_tensor->defined();
  TORCH_CHECK(!has_rate || (rate_tensor->device().is_cpu() && rate_tensor->numel() == 1 &&
                            rate_tensor->scalar_type() == at::kDouble),
              "wdopt rotational: rate_tensor must be a one-element float64 CPU tensor");
  TORCH_CHECK(adamw || sgd || lion, "wdopt rotational: unknown optimizer ", optimizer);
  // 8-bit states: scales for each state list (AdamW's two, else one; none for SGD without
  // momentum), whose tensors then hold codes, int8 (exp_avg, momentum_buffer) and uint8 (exp_avg_sq).
  const bool quantized = check_scales(scales, params, adamw ? 2 : (has_state1 ? 1 : 0));
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
    if (has_state1) {
      TORCH_CHECK(state1[t].is_contiguous() && state1[t].sizes() == p.sizes() &&
                      state1[t].scalar_type() == (quantized ? at::kChar : p.scalar_type()),
                  "wdopt rotational: state of parameter ", t, " does not match it", quantized ? " (int8 codes)" : "");
    }
    if (adamw) {
      TORCH_CHECK(state2[t].is_contiguous() && state2[t].sizes() == p.sizes() &&
                      state2[t].scalar_type() == (quantized ? at::kByte : p.scalar_type()) &&
                      steps[t].scalar_type() == at::kFloat,
                  "wdopt rotational: AdamW state of parameter ", t, " does not match it",
                  quantized ? " (uint8 codes)" : "");
    }
  }
  TORCH_CHECK(telemetry.empty() || telemetry.size() == n_tensors, "wdopt rotational: one telemetry buffer per parameter");
  for (size_t t = 0; t < telemetry.size(); ++t) {
    TORCH_CHECK(telemetry[t].scalar_type() == at::kDouble && telemetry[t].is_contiguous() && telemetry[t].dim() == 2 &&
                    telemetry[t].size(0) == rotational_norms[t].numel() && telemetry[t].size(1) == 4,
                "wdopt rotational: telemetry[", t, "] must be a contiguous float64 (K, 4) tensor, one row per neuron");
  }
  // Each row is stored through one run of storage_for (storage.h): a shard's indices base + i may
  // not cross a multiple of 2^32, which the driver's shards never do (an unsharded tensor would
  // need 2^32 elements).
  const bool rounds = !rng.empty() && (params[0].scalar_type() == at::kBFloat16 || params[0].scalar_type() == at::kHalf);
  for (size_t t = 0; rounds && t < n_tensors; ++t) {
    const int64_t base = rng[t].const_data_ptr<int64_t>()[2];
    TORCH_CHECK(run_end(base, 0) >= params[t].numel(), "wdopt rotational: stochastic rounding of parameter ", t,
                " whose element indices ", base, " + i cross a multiple of 2^32: not supported");
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
  const std::vector<char> fresh = first_step_flags(first_steps, "wdopt::rotational_");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "wdopt_rotational", [&] {
    using opmath = opmath_t<scalar_t>;
    // The gradient as the optimizer sees it, as the element-wise kernels unscale it (walk.h): the
    // row and block phases compute the same states from it.
    const GradTransform<opmath> transform = grad_transform<opmath>(grad_scale, maximize);
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
    int64_t* const row_start = scratch<int64_t, 2>(n_rows + 1);  // 0 and 1: walk.h's (the block phase)
    row_start[0] = 0;
    for (size_t i = 0; i < n_rows; ++i) row_start[i + 1] = row_start[i] + rows[i].size;
    const int64_t total = row_start[n_rows];
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(n_rows)));
    auto first_row = [&](int64_t part) {
      return static_cast<int64_t>(std::lower_bound(row_start, row_start + n_rows, total * part / parts) - row_start);
    };
    // Each tensor's stochastic-rounding streams, once per step (one run: checked above).
    Streams* const streams = rng.empty() ? nullptr : scratch<Streams>(n_tensors);
    for (size_t t = 0; streams != nullptr && t < n_tensors; ++t) streams[t] = streams_of(rng[t].const_data_ptr<int64_t>());
    dispatch_storage<scalar_t>(!rng.empty(), master_bits, [&](auto SR, auto MASTER) {
      at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
        // This thread's copy of a row, and (8-bit states) its decoded old states.
        std::vector<opmath> own;
        std::vector<float> own1, own2;
        opmath* const buffer = row_buffer<opmath, 3>(longest, own);
        float* const old1 = quantized ? row_buffer<float, 4>(longest, own1) : nullptr;
        float* const old2 = quantized && adamw ? row_buffer<float, 5>(longest, own2) : nullptr;
        for (int64_t k = first_row(part_begin); k < first_row(part_end); ++k) {
          const Row& r = rows[k];
          const int64_t t = r.tensor, offset = r.row * r.size;
          // The tensor's storage (one run: its words and correction); the row reads them at offset + j.
          void* const low_bits = correction.empty() ? nullptr : correction[t].data_ptr();
          const auto st = storage_for<scalar_t, SR, MASTER>(streams == nullptr ? nullptr : streams + t, 0, low_bits);
          const RowOf<typename decltype(st)::Param> p{st.param(ptr<scalar_t>(params[t])), offset};
          const scalar_t* g = ptr<scalar_t>(grads[t]) + offset;
          opmath* norm = ptr<opmath>(rotational_norms[t]) + r.row;
          opmath* s_avg = ptr<opmath>(update_norm_avgs[t]) + r.row;
          // Captures by value (pointers, coefficients): the row loops then see plain local pointers and
          // vectorize with contiguous loads; through captured references they fell back to gathers.
          const auto grad_at = [=](int64_t j) { return transform(static_cast<opmath>(g[j])); };
          double* sums = telemetry.empty() ? nullptr : ptr<double>(telemetry[t]) + 4 * r.row;
          // The row with its direction, u_j from the element's states (``states``: StoredStates or
          // DecodedStates, which read the old values and keep the new ones, or not).
          const auto rotate = [&](const auto& states) {
            const auto with = [&](const auto& direction) {
              rotate_row(p, r.size, direction, buffer, norm, s_avg, norm_decay_bias_correction[t], first[t], options,
                         sums, grad_at);
            };
            if (adamw) {
              const auto c = adamw_c[t];
              const opmath inv_bias_correction1 = inv_bc1[t];
              with([=](int64_t j) {
                opmath mj = states.template load<1>(j), vj = states.template load<2>(j);
                const opmath u = adamw_direction(grad_at(j), mj, vj, inv_bias_correction1, c);
                states.template store<1>(j, mj);
                states.template store<2>(j, vj);
                return u;
              });
            } else if (lion) {
              with([=](int64_t j) {
                opmath mj = states.template load<1>(j);
                const opmath u = lion_direction(grad_at(j), mj, lion_c);
                states.template store<1>(j, mj);
                return u;
              });
            } else if (momentum != 0) {
              const bool first_step = fresh[t];
              with([=](int64_t j) {
                opmath bj = states.template load<1>(j);
                const opmath u = nesterov ? sgd_direction<true, true>(grad_at(j), bj, first_step, mu)
                                          : sgd_direction<true, false>(grad_at(j), bj, first_step, mu);
                states.template store<1>(j, bj);
                return u;
              });
            } else {
              with([=](int64_t j) { return grad_at(j); });
            }
          };
          if constexpr (!std::is_same_v<scalar_t, double>) {
            if (quantized) {
              decode_run<true>(state1[t].const_data_ptr(), ptr<float>(scales[t]), offset, r.size, old1);
              if (adamw) {
                decode_run<false>(state2[t].const_data_ptr(), ptr<float>(scales[n_tensors + t]), offset, r.size, old2);
              }
              rotate(DecodedStates{old1, old2});
              continue;
            }
          }
          rotate(StoredStates<scalar_t, std::remove_const_t<decltype(st)>>{
              st, has_state1 ? ptr<scalar_t>(state1[t]) : nullptr, adamw ? ptr<scalar_t>(state2[t]) : nullptr,
              offset});
        }
      });
    });
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (quantized) {
        // The block phase (see the top of this file), after every row's parameter is written. (Its
        // loops are written in opmath, float here, so that the discarded fp64 instance compiles.)
        TensorTable table;
        table.resize(n_tensors);
        for (size_t t = 0; t < n_tensors; ++t) {
          table.numel[t] = params[t].numel();
          table.param[t] = params[t].data_ptr();
          table.grad[t] = grads[t].const_data_ptr();
          table.state1[t] = state1[t].data_ptr();
          if (adamw) table.state2[t] = state2[t].data_ptr();
        }
        for (const auto& words : rng) table.rng.push_back(words.const_data_ptr<int64_t>());
        for (size_t j = 0; j < scales.size(); ++j) table.scales[j / n_tensors].push_back(ptr<float>(scales[j]));
        const auto gradient = [&](int64_t k) { return static_cast<const scalar_t*>(table.grad[k]); };
        // Each loop's scalars are local copies: the stores into the float buffers could alias them
        // through the captured references, and the loops would not vectorize.
        if (adamw) {
          for_each_block<true, false>(table, [&](int64_t k, int64_t begin, int64_t end, double*, auto states) {
            float* __restrict__ m = states[0];
            float* __restrict__ v = states[1];
            const scalar_t* __restrict__ g = gradient(k);
            const auto c = adamw_c[k];
            const auto un = transform;
            WDOPT_SIMD
            for (int64_t i = begin; i < end; ++i) {
              opmath mi = m[i], vi = v[i];
              adamw_moments(un(static_cast<opmath>(g[i])), mi, vi, c);
              m[i] = mi;
              v[i] = vi;
            }
          });
        } else if (lion) {
          for_each_block<true>(table, [&](int64_t k, int64_t begin, int64_t end, double*, auto states) {
            float* __restrict__ m = states[0];
            const scalar_t* __restrict__ g = gradient(k);
            const auto un = transform;
            const auto c = lion_c;
            WDOPT_SIMD
            for (int64_t i = begin; i < end; ++i) {
              opmath mi = m[i];
              lion_momentum(un(static_cast<opmath>(g[i])), mi, c);
              m[i] = mi;
            }
          });
        } else {
          for_each_block<true>(table, [&](int64_t k, int64_t begin, int64_t end, double*, auto states) {
            float* __restrict__ b = states[0];
            const scalar_t* __restrict__ g = gradient(k);
            const bool first_step = fresh[k];
            const auto un = transform;
            const opmath momentum_k = mu;
            WDOPT_SIMD
            for (int64_t i = begin; i < end; ++i) {
              opmath bi = b[i];
              sgd_direction_momentum(un(static_cast<opmath>(g[i])), bi, first_step, momentum_k);
              b[i] = bi;
            }
          });
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(wdopt, CPU, m) { m.impl("rotational_", &rotational_); }

}  // namespace wdopt::cpu
