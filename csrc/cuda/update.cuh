// The element-wise update engine: one block per (tensor, chunk), tables of tensors in the kernel
// arguments, 16-byte vectors with a scalar tail (common.cuh's design notes).
#pragma once

#include "common.cuh"

namespace wdopt {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------ tables

// The tensors of one launch: DEPTH address columns, sizes, chunk prefix sums, a per-tensor flag
// pointer (SGD's "first step", see FirstStepFlag), for the SR kernels a per-tensor pointer to its
// stochastic-rounding [key, count, index base] and, for the compensated ones (MASTER 24 or 32), to its
// parameter's correction. Passed by value as a kernel argument.
template <int DEPTH, bool SR = false, int MASTER = 16> struct UpdateTable {
  static constexpr int kRowBytes = DEPTH * 8 + 8 + 4 + 8 + (SR ? 8 : 0) + (MASTER != 16 ? 8 : 0);
  static constexpr int kCapacity =
      static_cast<int>((kParamBytes - kOtherParamBytes - 32) / kRowBytes);  // 32: counts, padding

  void* ptr[DEPTH][kCapacity];
  int64_t numel[kCapacity];
  int32_t block_begin[kCapacity + 1];  // block_begin[n_tensors]: chunks (blocks) in this launch
  int32_t n_tensors;
  int32_t first_tensor;  // index in the call of row 0 (AdamW's coefficients are per call)
  FirstStepFlag flag[kCapacity];
  const int64_t* rng[SR ? kCapacity : 1];  // read with SR only (C++ has no zero-length arrays)
  void* correction[MASTER != 16 ? kCapacity : 1];  // read with MASTER 24 or 32 only

  // The row owning chunk ``block``: the last row whose chunks start at or before it (empty
  // tensors own no chunk and are skipped, since the next row starts at the same chunk).
  WDOPT_HD int find_row(int64_t block) const { return find_entry(block_begin, n_tensors, block); }
};

// ------------------------------------------------------------------------------------ engine

// One block's work: chunk ``block`` of the table, element-wise through ``op``. Streams: 0 is the
// parameter, 1 the gradient (read only), then the optimizer's state; Op::kWrites says which are
// written back, rounded to nearest or, with SR, stochastically (Rounding). MASTER 24 or 32: the
// parameter is compensated, loaded with its correction as the master weight and stored split.
template <typename T, bool SR, int MASTER, class Op>
WDOPT_HD void update_block(const UpdateTable<Op::kDepth, SR, MASTER>& table, const Op& op, const GradOptions& grad,
                           int64_t block, int thread) {
  using M = opmath_t<T>;
  using Master = Compensation<MASTER>;
  using C = typename Master::C;
  constexpr int D = Op::kDepth;
  constexpr int V = kVec<T>;
  static_assert(!Master::kOn || (std::is_same_v<T, __nv_bfloat16> && (Op::kWrites & 1u)),
                "a compensated parameter is a stored bf16 one");
  if (step_skipped(grad.found_inf)) return;

  const int row = table.find_row(block);
  const int64_t first = (block - table.block_begin[row]) * int64_t{kChunk<T>};
  const int64_t left = table.numel[row] - first;
  const int n = left < kChunk<T> ? static_cast<int>(left) : kChunk<T>;
  T* ptr[D];
  bool aligned = true;
  WDOPT_UNROLL
  for (int d = 0; d < D; ++d) {
    ptr[d] = static_cast<T*>(table.ptr[d][row]) + first;
    aligned = aligned && aligned16(ptr[d]);
  }
  // The parameter's corrections from this chunk on, read from the table where they are used: a
  // pointer held in registers across the update (live across its division's slow-path call) made
  // ptxas spill in AdamW with amsgrad (sm_80).
  [[maybe_unused]] auto correction = [&] { return static_cast<C*>(table.correction[row]) + first; };
  // The corrections' vectors go with the parameter's: a misaligned correction takes the scalar path too.
  if constexpr (Master::kOn) aligned = aligned && Master::aligned(correction());
  const typename Op::Context ctx = op.context(table.first_tensor + row, table.flag[row]);
  const Rounding<T, SR> rounding(SR ? table.rng[row] : nullptr, rounded_lanes(Op::kWrites, MASTER));
  // GradScaler's unscale multiplies by the reciprocal of the scale rounded to M, as torch's
  // unscale and the reference do (not a division per element).
  const bool unscale = grad.grad_scale.ptr != nullptr;
  const M inv_scale = unscale ? M(1) / static_cast<M>(read_scalar(grad.grad_scale)) : M(1);

  // One element: x[d] holds stream d in the math type; updated in place.
  auto element = [&](M(&x)[D]) {
    if (unscale) x[1] = x[1] * inv_scale;
    if (grad.maximize) x[1] = -x[1];
    op.update(ctx, x);
  };

  int done = 0;
  if (aligned) {
    const int vectors = n / V;
    for (int i = thread; i < vectors; i += kThreads) {
      Pack<T> pack[D];
      WDOPT_UNROLL
      for (int d = 0; d < D; ++d) pack[d] = reinterpret_cast<const Pack<T>*>(ptr[d])[i];
      [[maybe_unused]] typename Master::Pack low;
      if constexpr (Master::kOn) low = reinterpret_cast<const typename Master::Pack*>(correction())[i];
      WDOPT_UNROLL
      for (int e = 0; e < V; ++e) {
        M x[D];
        WDOPT_UNROLL
        for (int d = 0; d < D; ++d) x[d] = to_math(pack[d].v[e]);
        if constexpr (Master::kOn) x[0] = Master::load(pack[0].v[e], low.v[e]);
        element(x);
        WDOPT_UNROLL
        for (int d = Master::kOn ? 1 : 0; d < D; ++d) {
          if ((Op::kWrites >> d) & 1u) pack[d].v[e] = rounding.store(stream_lane(d), first + i * V + e, x[d]);
        }
        if constexpr (Master::kOn) Master::store(rounding, first + i * V + e, x[0], pack[0].v[e], low.v[e]);
      }
      WDOPT_UNROLL
      for (int d = 0; d < D; ++d) {
        if ((Op::kWrites >> d) & 1u) reinterpret_cast<Pack<T>*>(ptr[d])[i] = pack[d];
      }
      if constexpr (Master::kOn) reinterpret_cast<typename Master::Pack*>(correction())[i] = low;
    }
    done = vectors * V;
  }
  for (int i = done + thread; i < n; i += kThreads) {
    M x[D];
    WDOPT_UNROLL
    for (int d = 0; d < D; ++d) x[d] = to_math(ptr[d][i]);
    if constexpr (Master::kOn) x[0] = Master::load(ptr[0][i], correction()[i]);
    element(x);
    WDOPT_UNROLL
    for (int d = Master::kOn ? 1 : 0; d < D; ++d) {
      if ((Op::kWrites >> d) & 1u) ptr[d][i] = rounding.store(stream_lane(d), first + i, x[d]);
    }
    if constexpr (Master::kOn) Master::store(rounding, first + i, x[0], ptr[0][i], correction()[i]);
  }
}

template <typename T, bool SR, int MASTER, class Op> struct UpdateKernel {
  using Table = UpdateTable<Op::kDepth, SR, MASTER>;
  WDOPT_HD static void run(const Table& table, const Op& op, const GradOptions& grad, int64_t block, int thread) {
    update_block<T, SR, MASTER>(table, op, grad, block, thread);
  }
};

// Every tensor of a call through UpdateKernel<T, SR, MASTER, Op>: rows are packed into tables of
// UpdateTable::kCapacity and each full table is launched (one launch for most models). ``rng``:
// per tensor its [key, count, index base], read with SR only; ``corrections``: per tensor its parameter's
// correction, read with MASTER 24 or 32 only.
template <typename T, bool SR, int MASTER, class Op>
cudaError_t update_all(const void* const* const* columns, int64_t n_tensors, const int64_t* numels,
                       const FirstStepFlag* flags, const int64_t* const* rng, void* const* corrections, const Op& op,
                       const GradOptions& grad, cudaStream_t stream) {
  UpdateTable<Op::kDepth, SR, MASTER> table;  // ~32 KB, deliberately not zeroed: rows past n_tensors are never read
  return pack_tables(
      table, n_tensors,
      [&](int64_t i) { return numels[i] < 0 ? int64_t{-1} : (numels[i] + kChunk<T> - 1) / kChunk<T>; },
      [&](int r, int64_t i) {
        for (int d = 0; d < Op::kDepth; ++d) table.ptr[d][r] = const_cast<void*>(columns[d][i]);
        table.numel[r] = numels[i];
        table.flag[r] = flags != nullptr ? flags[i] : nullptr;
        if constexpr (SR) table.rng[r] = rng[i];
        if constexpr (MASTER != 16) table.correction[r] = corrections[i];
      },
      [&](int64_t blocks) { return launch<UpdateKernel<T, SR, MASTER, Op>>(blocks, stream, table, op, grad); });
}


}  // namespace
}  // namespace cuda
}  // namespace wdopt
