// The monitored update: the update engine's element functions walked row by row, with the
// rotation-telemetry sums reduced per row (wdopt/reference/telemetry.py is the specification).
// With 8-bit states (QUANT) the same kernel only measures (quantized.cuh).
#pragma once

#include "../include/wdopt/quantization.h"
#include "rows.cuh"
#include "update.cuh"

namespace wdopt {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------ telemetry

// Whether update stream d's 8-bit codes are signed (int8): the first state of every optimizer
// (exp_avg, momentum_buffer) is; the second moments' (exp_avg_sq, max_exp_avg_sq) are uint8.
WDOPT_HD constexpr bool signed_codes(int d) { return d == 2; }

// A state's code byte as its value at its block's scale ``s``: a signed state's (int8) or a second
// moment's (uint8) code (csrc/include/wdopt/quantization.h).
WDOPT_HD float decode_state(bool is_signed, uint8_t byte, float s) {
  return is_signed ? StateCode<true>::decode(static_cast<int8_t>(byte), s) : StateCode<false>::decode(byte, s);
}

// The tensors of one telemetry launch: the update kernels' columns plus each tensor's telemetry
// buffer and row count; blocks are numbered tensor after tensor, kThreads / G rows per block.
// QUANT (8-bit states, measuring only): the state columns hold codes, and each state's block
// scales come in ``scales`` (state k of tensor r: scales[k][r]).
template <int DEPTH, bool SR = false, int MASTER = 16, bool QUANT = false> struct TelemetryTable {
  static constexpr int kRowBytes =
      DEPTH * 8 + 8 + 8 + 8 + 8 + 4 + 1 + (SR ? 8 : 0) + (MASTER != 16 ? 8 : 0) + (QUANT ? (DEPTH - 2) * 8 : 0);
  static constexpr int kCapacity = static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);

  void* ptr[DEPTH][kCapacity];
  double* telemetry[kCapacity];
  int64_t numel[kCapacity];
  int64_t rows[kCapacity];
  int32_t block_begin[kCapacity + 1];
  int32_t n_tensors;
  int32_t first_tensor;
  FirstStepFlag flag[kCapacity];
  uint8_t group_log2[kCapacity];
  const int64_t* rng[SR ? kCapacity : 1];  // read with SR only (as UpdateTable's)
  void* correction[MASTER != 16 ? kCapacity : 1];  // read with MASTER 24 or 32 only
  const float* scales[QUANT ? DEPTH - 2 : 1][QUANT ? kCapacity : 1];  // read with QUANT only
  int32_t columns;  // 4 or 8: read with QUANT only (its kernels are built for 8 columns)
};

// The monitored update: the same element function as update_block (so parameters and state are
// bit-identical), walked row by row with the telemetry sums reduced per row; COLS 8 adds the
// direction statistics of Op::direction, taken before the update. SR and MASTER: loads and
// stores as update_block's; a compensated parameter's telemetry measures its master weight.
// QUANT: 8-bit states, measuring only. The states are decoded from their codes with their block
// scales, and the kernel computes what the update would store (the parameter rounded as SR and
// MASTER say) but writes nothing except telemetry: the 8-bit update kernel runs after it on the
// same inputs (quantized.cuh). Built with COLS 8, writing table.columns (4 or 8) columns: one
// kernel for both (monitored 8-bit steps are rare; half the instantiations).
template <typename T, class Op, int COLS, bool SR, int MASTER, bool QUANT = false> struct TelemetryKernel {
  using Table = TelemetryTable<Op::kDepth, SR, MASTER, QUANT>;
  using Master = Compensation<MASTER>;
  static_assert(Op::kWrites & 1u, "the telemetry measures the stored parameter (stream 0)");
  static_assert(!Master::kOn || std::is_same_v<T, __nv_bfloat16>, "a compensated parameter is a bf16 one");
  static_assert(!QUANT || (COLS == 8 && !std::is_same_v<T, double>), "measuring kernels: 8 columns, fp32 math");
  static constexpr int kMinBlocks = 1;  // __launch_bounds__ hint: resident blocks per SM
  WDOPT_BLOCK static void run_block(const Table& table, const Op& op, const GradOptions& grad, int64_t block,
                                    unsigned char* shared) {
    using M = opmath_t<T>;
    constexpr int D = Op::kDepth;
    if (step_skipped(grad.found_inf)) return;
    const int e = find_entry(table.block_begin, table.n_tensors, block);
    const int lg = table.group_log2[e];
    const int64_t rows = table.rows[e];
    const int64_t cols = table.numel[e] / rows;
    const int64_t first_row = (block - table.block_begin[e]) << (kLog2Threads - lg);
    const int columns = QUANT ? table.columns : COLS;
    const typename Op::Context ctx = op.context(table.first_tensor + e, table.flag[e]);
    // Measuring, only the parameter's store is rounded (the states' are the update kernel's).
    const Rounding<T, SR> rounding(SR ? table.rng[e] : nullptr, rounded_lanes(QUANT ? 1u : Op::kWrites, MASTER));
    [[maybe_unused]] typename Master::C* const correction =
        Master::kOn ? static_cast<typename Master::C*>(table.correction[e]) : nullptr;
    const bool unscale = grad.grad_scale.ptr != nullptr;
    const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);
    const double inv_scale_d = inverse_scale(grad);
    double* red = reinterpret_cast<double*>(shared);
    const Block blk{};
    blk.each([&](int t) {
      double acc[COLS] = {};
      const int64_t row = first_row + (t >> lg);
      if (row < rows) {
        const int64_t end = (row + 1) * cols;
        for (int64_t j = row * cols + (t & ((1 << lg) - 1)); j < end; j += int64_t{1} << lg) {
          M x[D];
          WDOPT_UNROLL
          for (int d = 0; d < D; ++d) {
            if constexpr (QUANT) {
              if (d >= 2) {
                x[d] = decode_state(signed_codes(d), static_cast<const uint8_t*>(table.ptr[d][e])[j],
                                    table.scales[d - 2][e][j / kQuantBlock]);
                continue;
              }
            }
            x[d] = to_math(static_cast<const T*>(table.ptr[d][e])[j]);
          }
          T& p = static_cast<T*>(table.ptr[0][e])[j];
          if constexpr (Master::kOn) x[0] = Master::load(p, correction[j]);
          const M old = x[0];
          const M g = to_math(static_cast<const T*>(table.ptr[1][e])[j]);
          if (unscale) x[1] = x[1] * inv_scale;
          if (grad.maximize) x[1] = -x[1];
          if constexpr (COLS == 8) {
            if (columns == 8) {
              const Direction<M> dir = op.direction(ctx, x);
              const double w = static_cast<double>(x[0]), n = static_cast<double>(dir.n),
                           s = static_cast<double>(dir.s);
              acc[4] += n * n;
              acc[5] += n * s;
              acc[6] += w * n;
              acc[7] += s * s;
            }
          }
          op.update(ctx, x);
          // j is the element's offset in its tensor: the index of its rounding bits.
          M now;
          if constexpr (QUANT) {  // the value the update kernel will store, written nowhere
            if constexpr (Master::kOn) {
              T stored;
              typename Master::C low;
              now = Master::store(rounding, j, x[0], stored, low);
            } else {
              now = to_math(rounding.store(0, j, x[0]));
            }
          } else if constexpr (Master::kOn) {
            now = Master::store(rounding, j, x[0], p, correction[j]);
          } else {
            const T stored = rounding.store(0, j, x[0]);
            p = stored;
            now = to_math(stored);
          }
          WDOPT_UNROLL
          for (int d = 1; d < D && !QUANT; ++d) {
            if ((Op::kWrites >> d) & 1u) static_cast<T*>(table.ptr[d][e])[j] = rounding.store(stream_lane(d), j, x[d]);
          }
          telemetry_add(reinterpret_cast<double(&)[4]>(acc), old, now, g, inv_scale_d);
        }
      }
      WDOPT_UNROLL
      for (int k = 0; k < COLS; ++k) red[k * kThreads + t] = acc[k];
    });
    group_reduce<COLS>(blk, red, lg);
    blk.each([&](int t) {
      const int64_t row = first_row + (t >> lg);
      if ((t & ((1 << lg) - 1)) != 0 || row >= rows) return;
      WDOPT_UNROLL
      for (int k = 0; k < COLS; ++k) {
        if (k < columns) table.telemetry[e][row * columns + k] = red[k * kThreads + t];
      }
    });
  }
};

// update_all's monitored twin: every tensor of a call through TelemetryKernel<T, Op, COLS, SR, MASTER>;
// QUANT: through the measuring kernels, the states' block scales in ``scales`` (launchers.h).
template <typename T, bool SR, int MASTER, class Op, bool QUANT = false>
cudaError_t telemetry_all(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                          const FirstStepFlag* flags, const int64_t* const* rng, void* const* corrections,
                          const Telemetry& telemetry, const Op& op, const GradOptions& grad, cudaStream_t stream,
                          float* const* scales = nullptr) {
  TelemetryTable<Op::kDepth, SR, MASTER, QUANT> table;  // deliberately not zeroed: rows past n_tensors are never read
  table.columns = telemetry.columns;
  auto valid = [&](int64_t i) {
    const int64_t rows = telemetry.rows[i];
    return numels[i] >= 0 && rows >= 1 && numels[i] % rows == 0 && telemetry.buffers[i] != nullptr;
  };
  return pack_tables(
      table, n_tensors,
      [&](int64_t i) {
        if (!valid(i)) return int64_t{-1};
        const int lg = group_log2(numels[i] / telemetry.rows[i]);
        return (telemetry.rows[i] + (kThreads >> lg) - 1) >> (kLog2Threads - lg);
      },
      [&](int r, int64_t i) {
        for (int d = 0; d < Op::kDepth; ++d) table.ptr[d][r] = const_cast<void*>(columns[d][i]);
        table.telemetry[r] = telemetry.buffers[i];
        table.numel[r] = numels[i];
        table.rows[r] = telemetry.rows[i];
        table.group_log2[r] = static_cast<uint8_t>(group_log2(numels[i] / telemetry.rows[i]));
        table.flag[r] = flags != nullptr ? flags[i] : nullptr;
        if constexpr (SR) table.rng[r] = rng[i];
        if constexpr (MASTER != 16) table.correction[r] = corrections[i];
        if constexpr (QUANT) {
          for (int k = 0; k < Op::kDepth - 2; ++k) table.scales[k][r] = scales[k * n_tensors + i];
        }
      },
      [&](int64_t blocks) {
        if constexpr (QUANT) {
          return launch_rows<TelemetryKernel<T, Op, 8, SR, MASTER, true>>(blocks, 8 * kThreads * sizeof(double),
                                                                          stream, table, op, grad);
        } else if (telemetry.columns == 8) {
          return launch_rows<TelemetryKernel<T, Op, 8, SR, MASTER>>(blocks, 8 * kThreads * sizeof(double), stream,
                                                                    table, op, grad);
        } else {
          return launch_rows<TelemetryKernel<T, Op, 4, SR, MASTER>>(blocks, 4 * kThreads * sizeof(double), stream,
                                                                    table, op, grad);
        }
      });
}

// Either engine, by whether the call is monitored; SR: stochastic rounding with ``rng``; MASTER 24
// or 32: compensated parameters with ``corrections``.
template <typename T, bool SR, int MASTER, class Op>
cudaError_t update_or_monitor(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                              const FirstStepFlag* flags, const int64_t* const* rng, void* const* corrections,
                              const Telemetry& telemetry, const Op& op, const GradOptions& grad, cudaStream_t stream) {
  if (telemetry.buffers != nullptr) {
    if (telemetry.rows == nullptr || (telemetry.columns != 4 && telemetry.columns != 8)) return cudaErrorInvalidValue;
    return telemetry_all<T, SR, MASTER>(columns, n_tensors, numels, flags, rng, corrections, telemetry, op, grad,
                                        stream);
  }
  return update_all<T, SR, MASTER>(columns, n_tensors, numels, flags, rng, corrections, op, grad, stream);
}


}  // namespace
}  // namespace cuda
}  // namespace wdopt
