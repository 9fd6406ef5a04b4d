// The rotational row engine (docs/theory.md section 3; csrc/cpu/rotational_cpu.cpp is the CPU
// twin): a prologue kernel per call, then row blocks, on-chip rows read and written once, longer
// rows in two passes. Its launchers are rotational.cu's. Low precision (wdopt/reference/rotational.py)
// enters only where arrays are read and written, through common.cuh's Rounding and Compensation
// as in the update engines: the sums, norms and order of operations are those of a plain call.
#pragma once

#include "quantized.cuh"

namespace wdopt {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------ rotational

// This step's per-tensor scalars, written by the prologue and read by every block of the tensor.
template <typename M> struct RotationCoefficients {
  AdamWCoefficients<M> adamw;  // decay-free (weight_decay 0): only the direction's scalars are used
  M inv_bias_correction1;      // 1/(1 − β1^t), rounded as the reference rounds it
  double norm_decay_bias_correction; // 1 − norm_decay^k
  int32_t first;               // k was 0: this step freezes the row norms
};

// Step counts of one prologue launch: one thread per tensor.
struct RotationStepTable {
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 16) / (2 * sizeof(float*)));
  float* rotational_step[kCapacity];
  float* step[kCapacity];  // AdamW only
  int32_t n_tensors;
  int32_t first_tensor;
};

template <typename M> struct RotationPrologueArgs {
  double lr, beta1, beta2, eps, norm_decay;
  int32_t adamw;
  RotationCoefficients<M>* out;
};

// k = k + 1 (and AdamW's t = t + 1), written back unless found_inf, and the coefficients of the
// step, computed in double as the CPU kernel computes them.
template <typename M> struct RotationPrologueKernel {
  WDOPT_HD static void run(const RotationStepTable& steps, const RotationPrologueArgs<M>& a,
                           const DeviceScalar& found_inf, int64_t block, int thread) {
    const int64_t i = block * kThreads + thread;
    if (i >= steps.n_tensors || step_skipped(found_inf)) return;
    RotationCoefficients<M> c{};
    const float k_before = *steps.rotational_step[i];
    const float k = k_before + 1.0f;
    c.first = k_before == 0.0f ? 1 : 0;
    c.norm_decay_bias_correction = 1.0 - pow(a.norm_decay, static_cast<double>(k));
    if (a.adamw) {
      const float t = *steps.step[i] + 1.0f;
      c.adamw = adamw_coefficients<M>(AdamWHyper{a.lr, a.beta1, a.beta2, a.eps, 0.0, 1.0}, a.lr, static_cast<double>(t));
      c.inv_bias_correction1 = M(1) / static_cast<M>(1.0 - pow(a.beta1, static_cast<double>(t)));
      *steps.step[i] = t;
    } else {
      c.adamw = AdamWCoefficients<M>{};
      c.inv_bias_correction1 = M(1);
    }
    *steps.rotational_step[i] = k;
    a.out[steps.first_tensor + i] = c;
  }
};

// The rotational tensors of one row launch. ``tel_split``: telemetry rows per rotation row.
// QUANT (8-bit states): state1/state2 hold codes (int8, uint8), and scale1/scale2 their old block
// scales, which the row kernel reads only (the block phase writes the new ones).
template <bool QUANT = false> struct RotationTable {
  static constexpr int kRowBytes = 9 * 8 + 8 + 8 + 8 + 4 + 4 + 1 + (QUANT ? 16 : 0);
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);

  void* param[kCapacity];
  const void* grad[kCapacity];
  void* state1[kCapacity];
  void* state2[kCapacity];
  void* norm[kCapacity];
  void* s_avg[kCapacity];
  double* telemetry[kCapacity];
  const int64_t* rng[kCapacity];  // stochastic rounding's [key, count, index base] (SR kernels only)
  void* correction[kCapacity];    // a compensated parameter's int16/int8 low bits (MASTER 24 or 32 only)
  int64_t rows[kCapacity];
  int64_t cols[kCapacity];
  int32_t tel_split[kCapacity];
  int32_t block_begin[kCapacity + 1];
  FirstStepFlag flag[kCapacity];  // SGD: fresh momentum buffer
  const float* scale1[QUANT ? kCapacity : 1];
  const float* scale2[QUANT ? kCapacity : 1];
  int32_t n_tensors;
  int32_t first_tensor;
  uint8_t group_log2[kCapacity];
};

template <typename M> struct RotationArgs {
  double angle, lr, norm_decay, eps;
  DeviceScalar rate;  // capturable: lr (projected) or η_r², read on the device (RotationalArgs)
  const RotationCoefficients<M>* coefficients;
  LionCoefficients<M> lion;
  M momentum;
  int32_t on_chip;  // elements of the on-chip row buffers of a block (a multiple of kThreads)
  bool zero_mean, projected;
};

enum DirectionKind : int { kAdamW = 0, kLion = 1, kSGDPlain = 2, kSGDMomentum = 3, kSGDNesterov = 4 };

template <typename T> struct DirectionContext {
  AdamWCoefficients<opmath_t<T>> adamw;
  opmath_t<T> inv_bias_correction1;
  LionCoefficients<opmath_t<T>> lion;
  opmath_t<T> momentum;
  bool first_step;
  T* state1;
  T* state2;
  const float* scale1;  // QUANT: state1/state2 hold codes, decoded with these old block scales
  const float* scale2;
};

// State ``LANE``'s old value at element j: stored, or (QUANT) its code decoded with its block's
// old scale (quantized.cuh's decode, as the block phase decodes it).
template <int LANE, bool QUANT, typename T> WDOPT_HD opmath_t<T> old_state(const DirectionContext<T>& c, int64_t j) {
  if constexpr (QUANT) {
    const uint8_t* const codes = reinterpret_cast<const uint8_t*>(LANE == 1 ? c.state1 : c.state2);
    return decode_state(LANE == 1, codes[j], (LANE == 1 ? c.scale1 : c.scale2)[j / kQuantBlock]);
  } else {
    return to_math((LANE == 1 ? c.state1 : c.state2)[j]);
  }
}

// u_j from the unscaled gradient g_j (csrc/include/wdopt/*.h), the state written back if ``write``,
// stored through ``rounding`` (state1 in lane 1, state2 in lane 2; j: the element's tensor offset).
// QUANT (8-bit states): the old states decoded, the new ones used unrounded and never written (the
// block phase computes them again and encodes them).
template <typename T, int KIND, bool QUANT, class R>
WDOPT_HD opmath_t<T> direction(const DirectionContext<T>& c, const R& rounding, opmath_t<T> g, int64_t j,
                               bool write) {
  using M = opmath_t<T>;
  write = write && !QUANT;
  if constexpr (KIND == kAdamW) {
    M m = old_state<1, QUANT>(c, j), v = old_state<2, QUANT>(c, j);
    const M u = adamw_direction(g, m, v, c.inv_bias_correction1, c.adamw);
    if (write) {
      c.state1[j] = rounding.store(1, j, m);
      c.state2[j] = rounding.store(2, j, v);
    }
    return u;
  } else if constexpr (KIND == kLion) {
    M m = old_state<1, QUANT>(c, j);
    const M u = lion_direction(g, m, c.lion);
    if (write) c.state1[j] = rounding.store(1, j, m);
    return u;
  } else if constexpr (KIND == kSGDPlain) {
    (void)c, (void)rounding, (void)j, (void)write;
    return g;
  } else {
    M b = old_state<1, QUANT>(c, j);
    const M u = sgd_direction<true, KIND == kSGDNesterov>(g, b, c.first_step, c.momentum);
    if (write) c.state1[j] = rounding.store(1, j, b);
    return u;
  }
}

// Per-row scalars in shared memory (one per group).
template <typename M> struct RowScalars {
  // Sums. On chip Σu, Σp, Σp², Σu·p, summed in M as the CPU kernel sums them (held exactly here,
  // used as M). Two-pass Σa, Σb, Σa², Σb², Σa·b (a = u − ku, b = p − kp), summed in double: ‖t‖²
  // and the norm of q are differences of these moments, which cancel when u is mostly radial.
  double s[5];
  M ku, kp;  // two-pass pivots: u and p of the row's first element
  M n, mean_u, radial, step, mean_q, to_sphere, centred_qq;
};
static_assert(sizeof(RowScalars<double>) * kMaxGroups <= kGroupBytes, "raise kGroupBytes");

// What the on-chip buffer keeps of p: its stored value (T), or a compensated parameter's master
// weight (the fp32 combine of p and its correction, which every phase reads: loaded once).
template <typename T, int MASTER> using RowParam = std::conditional_t<MASTER != 16, opmath_t<T>, T>;

// Bytes of one element of the on-chip row buffers (u or its successors in M, p as RowParam).
template <typename T, int MASTER> constexpr size_t rotation_element_bytes() {
  return sizeof(opmath_t<T>) + sizeof(RowParam<T, MASTER>);
}

template <typename T, int MASTER> size_t rotation_shared_bytes(int64_t on_chip) {
  return kRowHeaderBytes + static_cast<size_t>(on_chip) * rotation_element_bytes<T, MASTER>();
}

// One block: kThreads / G rotation rows of one tensor (the CPU kernel's rotate_row, per group).
// On chip (the row fits the group's share of the row buffers): the row is read once (u into the
// buffer, p kept as stored, or as its master weight) and the phases of rotate_row run on the
// buffer, sums from the values themselves. Longer rows: pass 1 computes u without writing state
// and sums pivot-shifted moments in double (so a nearly constant u, an uncentred p or a mostly
// radial u loses nothing to cancellation); ‖t‖², the centred norm of q and its mean follow in
// closed form from these moments; pass 2 recomputes u, writes state and p.
// SR: bf16/fp16 stores rounded stochastically (common.cuh's Rounding: p in lane 0, state1 in lane
// 1, state2 in lane 2, each with its element's offset in the tensor, row·C + column, whatever the
// path or group size). MASTER 24 or 32: a compensated bf16 parameter; every read of p (sums, the
// frozen norm, the tangent projection, the update, telemetry's ω) is its master weight, and the
// new value is stored split (Compensation): the kernel rotates the master weights as a plain call
// rotates fp32 ones.
// QUANT: 8-bit states, read decoded and not written (the block phase below encodes them).
template <typename T, int KIND, bool SR, int MASTER, bool QUANT = false> struct RotationalRowKernel {
  using M = opmath_t<T>;
  using Table = RotationTable<QUANT>;
  using Master = Compensation<MASTER>;
  using P = RowParam<T, MASTER>;  // p as the on-chip buffer holds it
  static_assert(!Master::kOn || std::is_same_v<T, __nv_bfloat16>, "a compensated parameter is a bf16 one");
  // The lanes whose words Rounding hashes: those this KIND stores (the direction's states, none
  // with QUANT), less the parameter's where a 32-bit master is split exactly (common.cuh, rounded_lanes).
  static constexpr unsigned kLanes =
      (QUANT ? 0x1u : (KIND == kAdamW ? 0x7u : (KIND == kSGDPlain ? 0x1u : 0x3u))) & (MASTER == 32 ? ~1u : ~0u);
  static_assert(!QUANT || (kQuantizable<T> && KIND != kSGDPlain), "8-bit states of float32, float16 or bfloat16");
  // __launch_bounds__ hint: 3 resident blocks per SM caps registers at 80 per thread. Where ptxas
  // (CUDA 13, sm_80/sm_90) meets that without spilling, ask for it: 16-bit storage (64-77
  // registers unhinted) and fp32 Lion / plain SGD (90-96). fp32 AdamW and momentum SGD (96-108)
  // and fp64 (104-124) would spill 20-104 bytes (24-88 byte stack frames): left unhinted, at 2
  // blocks per SM (which is also what full-size row buffers allow: about 77 KB of shared memory
  // per block).
  // QUANT (decoding the states: a few registers more; sm_90, CUDA 13): 16-bit storage but AdamW
  // hinted (68-76 registers); 16-bit AdamW unhinted (86-92: at 80, bf16 with a 32-bit master spilled
  // 8 bytes) and fp32 unhinted (90-102: at 80, Lion spilled 28 bytes).
  static constexpr int kMinBlocks =
      QUANT ? (sizeof(T) == 2 && KIND != kAdamW ? 3 : 1)
            : ((sizeof(T) == 2 || (sizeof(T) == 4 && (KIND == kLion || KIND == kSGDPlain))) ? 3 : 1);
  WDOPT_BLOCK static void run_block(const Table& table, const RotationArgs<M>& args, const GradOptions& grad,
                                    int64_t block, unsigned char* shared) {
    if (step_skipped(grad.found_inf)) return;
    const int e = find_entry(table.block_begin, table.n_tensors, block);
    const int lg = table.group_log2[e];
    const int G = 1 << lg;
    const int64_t rows = table.rows[e], cols = table.cols[e];
    const int64_t first_row = (block - table.block_begin[e]) << (kLog2Threads - lg);
    const RotationCoefficients<M> rc = args.coefficients[table.first_tensor + e];
    const bool first = rc.first != 0;
    const DirectionContext<T> dc{rc.adamw, rc.inv_bias_correction1, args.lion, args.momentum, is_first_step(table.flag[e]),
                                 static_cast<T*>(table.state1[e]), static_cast<T*>(table.state2[e]),
                                 QUANT ? table.scale1[e] : nullptr, QUANT ? table.scale2[e] : nullptr};
    const Rounding<T, SR> rounding(SR ? table.rng[e] : nullptr, kLanes);
    T* const p = static_cast<T*>(table.param[e]);
    [[maybe_unused]] typename Master::C* const correction =
        Master::kOn ? static_cast<typename Master::C*>(table.correction[e]) : nullptr;
    // p_j as the rotation reads it, in every pass: the master weight of a compensated parameter.
    auto param_at = [&](int64_t j) -> P {
      if constexpr (Master::kOn) {
        return Master::load(p[j], correction[j]);
      } else {
        return p[j];
      }
    };
    const T* const g = static_cast<const T*>(table.grad[e]);
    M* const norm = static_cast<M*>(table.norm[e]);
    M* const s_avg = static_cast<M*>(table.s_avg[e]);
    const bool unscale = grad.grad_scale.ptr != nullptr;
    const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);
    const bool maximize = grad.maximize;
    auto grad_at = [&](int64_t j) {
      M x = to_math(g[j]);
      if (unscale) x = x * inv_scale;
      return maximize ? -x : x;
    };
    M* const red = reinterpret_cast<M*>(shared);
    RowScalars<M>* const rs = reinterpret_cast<RowScalars<M>*>(shared + kReductionBytes);
    const int64_t share = args.on_chip >> (kLog2Threads - lg);  // buffer elements per group
    M* const buf_u = reinterpret_cast<M*>(shared + kRowHeaderBytes);
    P* const buf_p = reinterpret_cast<P*>(shared + kRowHeaderBytes + static_cast<size_t>(args.on_chip) * sizeof(M));
    const bool zero_mean = args.zero_mean;
    const M size = static_cast<M>(cols);
    const Block blk{};
    // The row of thread t, or -1; its group's first thread ("leader") writes the row scalars.
    auto row_of = [&](int t) { const int64_t r = first_row + (t >> lg); return r < rows ? r : int64_t{-1}; };
    auto leader = [&](int t) { return (t & (G - 1)) == 0 && row_of(t) >= 0; };

    // The step (p − step·t) from ‖t‖², as rotate_row computes it; the leader of the row.
    auto step_from = [&](int64_t row, double tangent_sq, M n) {
      double scale;
      if (args.projected) {
        scale = lr_value(args.lr, args.rate);
      } else {
        const double angle = args.rate.ptr != nullptr ? sqrt(read_scalar(args.rate)) : args.angle;
        const double s = args.norm_decay * static_cast<double>(s_avg[row]) + (1.0 - args.norm_decay) * tangent_sq;
        s_avg[row] = static_cast<M>(s);
        scale = angle * static_cast<double>(n) / (sqrt(s / rc.norm_decay_bias_correction) + args.eps);
      }
      return static_cast<M>(scale);
    };
    // The exact (centred) norm of the row as stored, for its first step: one more sum.
    auto freeze_norm = [&](auto&& value_at) {
      blk.each([&](int t) {
        M c2 = 0;
        const int64_t row = row_of(t);
        if (row >= 0) {
          const M mean = zero_mean ? rs[t >> lg].mean_q : M(0);  // mean_q holds mean(p) here
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M c = value_at(t, row, j) - mean;
            c2 += c * c;
          }
        }
        red[t] = c2;
      });
      group_reduce<1>(blk, red, lg);
      blk.each([&](int t) {
        if (leader(t)) norm[row_of(t)] = sqrt(red[t]);
      });
      blk.sync();
    };

    if (cols <= share) {
      // ---- on chip: rotate_row's phases on the row buffers
      blk.each([&](int t) {
        M su = 0, sp = 0, spp = 0, sup = 0;
        const int64_t row = row_of(t);
        if (row >= 0) {
          M* const bu = buf_u + (t >> lg) * share;
          P* const bp = buf_p + (t >> lg) * share;
          const int64_t base = row * cols;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M u = direction<T, KIND, QUANT>(dc, rounding, grad_at(base + j), base + j, true);
            const P pt = param_at(base + j);
            const M pj = to_math(pt);
            bu[j] = u;
            bp[j] = pt;
            su += u;
            sp += pj;
            spp += pj * pj;
            sup += u * pj;
          }
        }
        red[t] = su;
        red[kThreads + t] = sp;
        red[2 * kThreads + t] = spp;
        red[3 * kThreads + t] = sup;
      });
      group_reduce<4>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        WDOPT_UNROLL
        for (int k = 0; k < 4; ++k) r.s[k] = red[k * kThreads + t];
        r.mean_q = static_cast<M>(r.s[1]) / size;
      });
      blk.sync();
      if (first) freeze_norm([&](int t, int64_t, int64_t j) { return to_math(buf_p[(t >> lg) * share + j]); });
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.n = norm[row_of(t)];
        r.mean_u = zero_mean ? static_cast<M>(r.s[0]) / size : M(0);
        r.radial = r.n > 0 ? (static_cast<M>(r.s[3]) - r.mean_u * static_cast<M>(r.s[1])) / (r.n * r.n) : M(0);
      });
      blk.sync();
      // t = u − mean(u) − p·radial and ‖t‖²
      blk.each([&](int t) {
        M ts = 0;
        if (row_of(t) >= 0) {
          const RowScalars<M>& r = rs[t >> lg];
          M* const bu = buf_u + (t >> lg) * share;
          const P* const bp = buf_p + (t >> lg) * share;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M tj = bu[j] - r.mean_u - to_math(bp[j]) * r.radial;
            bu[j] = tj;
            ts += tj * tj;
          }
        }
        red[t] = ts;
      });
      group_reduce<1>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.step = step_from(row_of(t), static_cast<double>(red[t]), r.n);
      });
      blk.sync();
      // q = p − step·t, Σq, Σq²
      blk.each([&](int t) {
        M sq = 0, sqq = 0;
        if (row_of(t) >= 0) {
          const M step = rs[t >> lg].step;
          M* const bu = buf_u + (t >> lg) * share;
          const P* const bp = buf_p + (t >> lg) * share;
          for (int64_t j = t & (G - 1); j < cols; j += G) {
            const M q = to_math(bp[j]) - step * bu[j];
            bu[j] = q;
            sq += q;
            sqq += q * q;
          }
        }
        red[t] = sq;
        red[kThreads + t] = sqq;
      });
      group_reduce<2>(blk, red, lg);
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.mean_q = zero_mean ? red[t] / size : M(0);
        r.centred_qq = red[kThreads + t] - size * r.mean_q * r.mean_q;
      });
      blk.sync();
      if (first && zero_mean) {  // p may not be centred yet: the centred norm of q, summed exactly
        blk.each([&](int t) {
          M c2 = 0;
          if (row_of(t) >= 0) {
            const M mean = rs[t >> lg].mean_q;
            const M* const bu = buf_u + (t >> lg) * share;
            for (int64_t j = t & (G - 1); j < cols; j += G) c2 += (bu[j] - mean) * (bu[j] - mean);
          }
          red[t] = c2;
        });
        group_reduce<1>(blk, red, lg);
        blk.each([&](int t) {
          if (leader(t)) rs[t >> lg].centred_qq = red[t];
        });
        blk.sync();
      }
      blk.each([&](int t) {
        if (!leader(t)) return;
        RowScalars<M>& r = rs[t >> lg];
        r.to_sphere = r.centred_qq > 0 ? r.n / sqrt(r.centred_qq) : M(0);  // a zero row stays zero
      });
      blk.sync();
      write_rows(blk, table, e, lg, first_row, shared, grad, rounding, [&](int t, int64_t, int64_t j, M& old) {
        const RowScalars<M>& r = rs[t >> lg];
        old = to_math(buf_p[(t >> lg) * share + j]);
        return (buf_u[(t >> lg) * share + j] - r.mean_q) * r.to_sphere;
      });
      return;
    }

    // ---- two passes over memory. Pass 1: pivot-shifted moments of u and p in double (the
    // reduction slots read as doubles), state unwritten.
    double* const red_d = reinterpret_cast<double*>(shared);
    blk.each([&](int t) {
      double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
      const int64_t row = row_of(t);
      if (row >= 0) {
        const int64_t base = row * cols;
        const M ku = direction<T, KIND, QUANT>(dc, rounding, grad_at(base), base, false);
        const M kp = to_math(param_at(base));
        for (int64_t j = base + (t & (G - 1)); j < base + cols; j += G) {
          const double a = static_cast<double>(direction<T, KIND, QUANT>(dc, rounding, grad_at(j), j, false)) -
                           static_cast<double>(ku);
          const double b = static_cast<double>(to_math(param_at(j))) - static_cast<double>(kp);
          sa += a;
          sb += b;
          saa += a * a;
          sbb += b * b;
          sab += a * b;
        }
        if ((t & (G - 1)) == 0) {
          rs[t >> lg].ku = ku;
          rs[t >> lg].kp = kp;
        }
      }
      red_d[t] = sa;
      red_d[kThreads + t] = sb;
      red_d[2 * kThreads + t] = saa;
      red_d[3 * kThreads + t] = sbb;
      red_d[4 * kThreads + t] = sab;
    });
    group_reduce<5>(blk, red_d, lg);
    blk.each([&](int t) {
      if (!leader(t)) return;
      RowScalars<M>& r = rs[t >> lg];
      WDOPT_UNROLL
      for (int k = 0; k < 5; ++k) r.s[k] = red_d[k * kThreads + t];
      r.mean_q = static_cast<M>(static_cast<double>(r.kp) + r.s[1] / static_cast<double>(cols));  // mean(p)
    });
    blk.sync();
    if (first) freeze_norm([&](int, int64_t row, int64_t j) { return to_math(param_at(row * cols + j)); });
    // Closed forms, in double from the sums (docs/theory.md section 3.3).
    blk.each([&](int t) {
      if (!leader(t)) return;
      RowScalars<M>& r = rs[t >> lg];
      const double C = static_cast<double>(cols), inv_C = 1.0 / C;
      const double sa = r.s[0], sb = r.s[1], saa = r.s[2], sbb = r.s[3], sab = r.s[4];
      const double ma = sa * inv_C, mb = sb * inv_C;
      const double mean_u = static_cast<double>(r.ku) + ma, mean_p = static_cast<double>(r.kp) + mb;
      double vu = saa - sa * ma, vp = sbb - sb * mb;  // Σ(u − mean u)², Σ(p − mean p)²
      vu = vu > 0 ? vu : 0.0;
      vp = vp > 0 ? vp : 0.0;
      const double cov = sab - sa * mb;               // Σ(u − mean u)(p − mean p)
      const double spp = vp + C * mean_p * mean_p;    // Σp²
      const M n = norm[row_of(t)];
      r.n = n;
      r.mean_u = zero_mean ? static_cast<M>(mean_u) : M(0);
      const double delta = mean_u - static_cast<double>(r.mean_u);  // mean of u − mean_u as applied
      const double cross = cov + delta * C * mean_p;                  // Σ(u − mean_u)·p
      r.radial = n > 0 ? static_cast<M>(cross / (static_cast<double>(n) * static_cast<double>(n))) : M(0);
      const double rad = r.radial;
      // t = (u − mean_u) − radial·p: ‖t‖² from the moments
      double tangent_sq = vu + C * delta * delta - 2.0 * rad * cross + rad * rad * spp;
      tangent_sq = tangent_sq > 0 ? tangent_sq : 0.0;
      r.step = step_from(row_of(t), tangent_sq, n);
      const double step = r.step;
      // q = p − step·t: centred parts q_c = p_c − step·(u_c − radial·p_c)
      const double cross_c = cov - rad * vp;                           // Σp_c·t_c
      const double vt = vu - 2.0 * rad * cov + rad * rad * vp;         // Σt_c²
      double qq_c = vp - 2.0 * step * cross_c + step * step * vt;
      qq_c = qq_c > 0 ? qq_c : 0.0;
      const double mean_q = mean_p - step * (delta - rad * mean_p);
      r.mean_q = zero_mean ? static_cast<M>(mean_q) : M(0);
      const double off = mean_q - static_cast<double>(r.mean_q);
      const double qq = qq_c + C * off * off;
      r.to_sphere = qq > 0 ? static_cast<M>(static_cast<double>(n) / sqrt(qq)) : M(0);
    });
    blk.sync();
    // Pass 2: u again (the state is unchanged), state and p written.
    write_rows(blk, table, e, lg, first_row, shared, grad, rounding, [&](int t, int64_t base, int64_t j, M& old) {
      const RowScalars<M>& r = rs[t >> lg];
      const M pj = to_math(param_at(base + j));
      old = pj;
      const M u = direction<T, KIND, QUANT>(dc, rounding, grad_at(base + j), base + j, true);
      const M q = pj - r.step * (u - r.mean_u - pj * r.radial);
      return (q - r.mean_q) * r.to_sphere;
    });
  }

  // The last phase: p ← value(t, base, j, old) for every element of the block's rows (``old``: p as
  // read before, in M: a compensated parameter's master weight), stored through ``rounding`` (lane
  // 0) or split into p and its correction; the telemetry sums per telemetry row (tel_split of them
  // per rotation row) measure ω and Δω as loaded and stored (master weights when compensated).
  template <class F>
  WDOPT_BLOCK static void write_rows(const Block& blk, const Table& table, int e, int lg, int64_t first_row,
                                     unsigned char* shared, const GradOptions& grad, const Rounding<T, SR>& rounding,
                                     F&& value) {
    const int G = 1 << lg;
    const int64_t rows = table.rows[e], cols = table.cols[e];
    T* const p = static_cast<T*>(table.param[e]);
    [[maybe_unused]] typename Master::C* const correction =
        Master::kOn ? static_cast<typename Master::C*>(table.correction[e]) : nullptr;
    const T* const g = static_cast<const T*>(table.grad[e]);
    double* const tel = table.telemetry[e];
    const int64_t segments = tel != nullptr ? table.tel_split[e] : 1;
    const int64_t seg_len = cols / segments;
    const double inv_scale = inverse_scale(grad);
    double* const red = reinterpret_cast<double*>(shared);
    for (int64_t s = 0; s < segments; ++s) {
      blk.each([&](int t) {
        double acc[4] = {0, 0, 0, 0};
        const int64_t row = first_row + (t >> lg);
        if (row < rows) {
          const int64_t base = row * cols;
          for (int64_t j = s * seg_len + (t & (G - 1)); j < (s + 1) * seg_len; j += G) {
            M old;
            const M w = value(t, base, j, old);
            M now;
            if constexpr (Master::kOn) {
              now = Master::store(rounding, base + j, w, p[base + j], correction[base + j]);
            } else {
              const T stored = rounding.store(0, base + j, w);
              p[base + j] = stored;
              now = to_math(stored);
            }
            if (tel != nullptr) telemetry_add(acc, old, now, to_math(g[base + j]), inv_scale);
          }
        }
        if (tel != nullptr) {
          WDOPT_UNROLL
          for (int k = 0; k < 4; ++k) red[k * kThreads + t] = acc[k];
        }
      });
      if (tel == nullptr) continue;
      group_reduce<4>(blk, red, lg);
      blk.each([&](int t) {
        const int64_t row = first_row + (t >> lg);
        if ((t & (G - 1)) != 0 || row >= rows) return;
        WDOPT_UNROLL
        for (int k = 0; k < 4; ++k) tel[(row * segments + s) * 4 + k] = red[k * kThreads + t];
      });
      blk.sync();
    }
  }
};

// ``buffer_bytes``: what a block's on-chip row buffers may take (rotational.cu), of which the rows'
// elements take rotation_element_bytes each (more with compensated parameters: p as its master).
template <typename T, int KIND, bool SR, int MASTER, bool QUANT = false>
cudaError_t rotational_rows(const RotationalArgs& a, const RotationArgs<opmath_t<T>>& base_args, int64_t buffer_bytes,
                            cudaStream_t stream) {
  // Elements of the row buffers per block: a multiple of kThreads (0: every row takes two passes).
  const int64_t limit =
      buffer_bytes / static_cast<int64_t>(rotation_element_bytes<T, MASTER>()) / kThreads * kThreads;
  RotationTable<QUANT> table;  // deliberately not zeroed: rows past n_tensors are never read
  int64_t on_chip = 0;   // elements of this launch's row buffers (the widest on-chip row group needs)
  // Telemetry rows per rotation row; 0: invalid arguments.
  auto split_of = [&](int64_t i, int64_t rows, int64_t cols) -> int64_t {
    if (a.telemetry.buffers == nullptr) return 1;
    const int64_t tel_rows = a.telemetry.rows[i];
    if (a.telemetry.buffers[i] == nullptr || tel_rows < rows || tel_rows % rows != 0 ||
        cols % (tel_rows / rows) != 0 || tel_rows / rows > INT32_MAX) {
      return 0;
    }
    return tel_rows / rows;
  };
  return pack_tables(
      table, a.n_tensors,
      [&](int64_t i) {
        const int64_t rows = a.rows[i];
        if (rows < 1 || a.numels[i] < 0 || a.numels[i] % rows != 0) return int64_t{-1};
        // Empty tensors (rows of 0 elements) take their blocks as any other: the rows then do what
        // the CPU kernel's rotate_row does with them (norm 0 frozen, s_avg decayed, zero telemetry
        // rows), and table slot e is call position first_tensor + e (the prologue's coefficient index).
        const int64_t cols = a.numels[i] / rows;
        if (split_of(i, rows, cols) == 0) return int64_t{-1};
        const int lg = group_log2(cols);
        return (rows + (kThreads >> lg) - 1) >> (kLog2Threads - lg);
      },
      [&](int r, int64_t i) {
        const int64_t rows = a.rows[i], cols = a.numels[i] / rows;
        const int lg = group_log2(cols);
        table.param[r] = a.params[i];
        table.grad[r] = a.grads[i];
        table.state1[r] = a.state1 != nullptr ? a.state1[i] : nullptr;
        table.state2[r] = a.state2 != nullptr ? a.state2[i] : nullptr;
        table.norm[r] = a.rotational_norms[i];
        table.s_avg[r] = a.update_norm_avgs[i];
        table.telemetry[r] = a.telemetry.buffers != nullptr ? a.telemetry.buffers[i] : nullptr;
        table.rng[r] = SR ? a.rng[i] : nullptr;
        table.correction[r] = MASTER != 16 ? a.corrections[i] : nullptr;
        table.rows[r] = rows;
        table.cols[r] = cols;
        table.tel_split[r] = static_cast<int32_t>(split_of(i, rows, cols));
        table.group_log2[r] = static_cast<uint8_t>(lg);
        table.flag[r] = a.first_steps != nullptr ? a.first_steps[i] : nullptr;
        if constexpr (QUANT) {  // launchers.h: state1's scales, then state2's (AdamW)
          table.scale1[r] = a.scales[i];
          table.scale2[r] = KIND == kAdamW ? a.scales[a.n_tensors + i] : nullptr;
        }
        // Row buffers: as much of the limit as this launch's on-chip rows need (cols per group).
        const int64_t need = cols << (kLog2Threads - lg);
        if (need <= limit && need > on_chip) on_chip = (need + kThreads - 1) / kThreads * kThreads;
      },
      [&](int64_t blocks) {
        RotationArgs<opmath_t<T>> args = base_args;
        args.on_chip = static_cast<int32_t>(on_chip);
        const cudaError_t err = launch_rows<RotationalRowKernel<T, KIND, SR, MASTER, QUANT>>(
            blocks, rotation_shared_bytes<T, MASTER>(on_chip), stream, table, args, a.grad);
        on_chip = 0;
        return err;
      });
}

// ------------------------------------------------------------------------------------ 8-bit states

// 8-bit states (launchers.h) are blocks of 256 elements in the tensor's memory order, each with
// one scale, and a block may straddle rows that different thread blocks rotate; its new scale is
// the max over all of its new values. So the step takes two phases (csrc/cpu/rotational_cpu.cpp
// and the Triton kernels do the same). The row phase (RotationalRowKernel with QUANT) decodes the
// old codes with the old scales, computes the new states in fp32 and uses them, unrounded as the
// reference does, for the direction and the rotation, and writes the parameter only. Once every
// row is done (the next launch on the stream), the block phase (quantized.cuh's QuantizedKernel
// with a states-only Op below: a warp per block, the block's max in shared memory) decodes the old
// codes again, recomputes the same new states from the gradient (adamw_moments, lion_momentum,
// sgd_direction_momentum: the operations the directions make, on the same inputs, so the same
// bits) and encodes them with each block's new scale, to nearest or with the state lane's words.

// The states-only Ops: streams param (never read), grad, state1 (, state2); the step's
// coefficients as the row phase reads them (the prologue's, or the call's Lion and momentum).
template <typename M> struct RotationAdamWStates {
  static constexpr int kDepth = 4;
  static constexpr unsigned kWrites = 0b1100u;
  static constexpr bool kStatesOnly = true;
  using Context = AdamWCoefficients<M>;
  const RotationCoefficients<M>* coefficients;

  WDOPT_HD Context context(int tensor, FirstStepFlag) const { return coefficients[tensor].adamw; }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const { adamw_moments(x[1], x[2], x[3], c); }
};

template <typename M> struct RotationLionStates {
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b100u;
  static constexpr bool kStatesOnly = true;
  using Context = LionCoefficients<M>;
  LionCoefficients<M> lion;

  WDOPT_HD Context context(int, FirstStepFlag) const { return lion; }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const { lion_momentum(x[1], x[2], c); }
};

template <typename M> struct RotationSGDStates {
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b100u;
  static constexpr bool kStatesOnly = true;
  struct Context {
    M momentum;
    bool first_step;
  };
  M momentum;

  WDOPT_HD Context context(int, FirstStepFlag first_step) const { return Context{momentum, is_first_step(first_step)}; }
  WDOPT_HD void update(const Context& c, M (&x)[kDepth]) const {
    sgd_direction_momentum(x[1], x[2], c.first_step, c.momentum);
  }
};

// The block phase of a call: every tensor's states, after its row launches.
template <typename T>
cudaError_t rotational_states(const RotationalArgs& a, const RotationArgs<opmath_t<T>>& args, cudaStream_t stream) {
  using M = opmath_t<T>;
  const void* const* columns[] = {a.params, a.grads, a.state1, a.state2};
  return dispatch_quantized<T>(a.rng, [&](auto sr) -> cudaError_t {
    constexpr bool SR = decltype(sr)::value;
    switch (a.optimizer) {
      case RotationalOptimizer::AdamW:
        return quantized_all<T, SR, 16>(columns, a.n_tensors, a.numels, nullptr, a.rng, nullptr, a.scales,
                                        RotationAdamWStates<M>{args.coefficients}, a.grad, stream);
      case RotationalOptimizer::Lion:
        return quantized_all<T, SR, 16>(columns, a.n_tensors, a.numels, nullptr, a.rng, nullptr, a.scales,
                                        RotationLionStates<M>{args.lion}, a.grad, stream);
      case RotationalOptimizer::SGD:
        return quantized_all<T, SR, 16>(columns, a.n_tensors, a.numels, a.first_steps, a.rng, nullptr, a.scales,
                                        RotationSGDStates<M>{args.momentum}, a.grad, stream);
    }
    return cudaErrorInvalidValue;
  });
}

// The row kernels' arguments of a call (``coefficients``: the prologue's, in a.scratch).
template <typename M> RotationArgs<M> rotation_args(const RotationalArgs& a) {
  RotationArgs<M> args{};
  args.angle = a.angle;
  args.lr = a.lr;
  args.rate = a.rate;
  args.norm_decay = a.norm_decay;
  args.eps = a.rotational_eps;
  args.coefficients = static_cast<const RotationCoefficients<M>*>(a.scratch);
  args.lion = lion_coefficients<M>(LionHyper{a.lr, a.beta1, a.beta2, 0.0, 1.0}, a.lr);
  args.momentum = static_cast<M>(a.momentum);
  args.on_chip = 0;
  args.zero_mean = a.zero_mean;
  args.projected = a.projected;
  return args;
}

// Bytes of the row buffers per block (rotational_rows turns them into elements, a multiple of
// kThreads; 0: every row takes two passes), within what this device lets a block opt in to (99 KB
// on sm_86/89, 227 KB on sm_90, 64 KB on sm_75): on a smaller device longer rows take the two-pass
// path instead of failing to launch.
inline int64_t row_buffer_bytes(const RotationalArgs& a) {
  const int64_t wanted = a.on_chip_bytes > 0 ? a.on_chip_bytes : kRowBufferBytes;
  return std::max<int64_t>(
      0, std::min<int64_t>(wanted, shared_memory_optin_bytes() - static_cast<int64_t>(kRowHeaderBytes)));
}

}  // namespace

// The row and block phases of a call with 8-bit states (rotational_quantized.cu: a translation
// unit of its own, built in parallel with rotational.cu), once the prologue has run; a.scales
// given, the dtype float32, float16 or bfloat16 (else an invalid value), corrections valid.
cudaError_t rotational_quantized(const RotationalArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace wdopt
