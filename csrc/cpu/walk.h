// The parallel walks of the CPU kernels over a step's TensorTable (fused_cpu.h), shared by the
// element-wise kernels (fused_cpu.cpp) and the rotational kernel's block phase (rotational_cpu.cpp,
// which stores 8-bit states after its rows are rotated): one place that decides how a step's
// elements are cut between threads and how 8-bit state blocks are decoded, handed to the
// optimizer's element loop and encoded, so every kernel moves memory the same way and rounds
// its 8-bit states with the same words.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <optional>

#include "../include/wdopt/quantization.h"
#include "../include/wdopt/rounding.h"
#include "fused_cpu.h"
#include "quantized_blocks.h"
#include "scratch.h"

namespace wdopt::cpu {

// The gradient as the optimizer sees it: unscaled (GradScaler; times the scale's reciprocal, as
// the reference does) and negated with maximize. Branch-free so the element loops vectorize;
// multiplying by 1 and by ±1 is exact.
template <typename opmath_t>
struct GradTransform {
  opmath_t inv_scale, sign;
  inline opmath_t operator()(opmath_t g) const { return (g * inv_scale) * sign; }
};

template <typename opmath_t>
GradTransform<opmath_t> grad_transform(const std::optional<at::Tensor>& grad_scale, bool maximize) {
  const opmath_t scale = grad_scale.has_value() ? static_cast<opmath_t>(grad_scale->item<double>()) : opmath_t(1);
  return {opmath_t(1) / scale, maximize ? opmath_t(-1) : opmath_t(1)};
}

// Below this much work a step runs on the calling thread: a parallel region costs more. Work is
// counted in elements, plus kTensorWork per tensor for what each costs whatever its size (its
// table entries, and the first cache line of each of its arrays, a memory latency apart from
// the last tensor's): 10,000 one-element tensors are worth two threads.
inline constexpr int64_t kSerialElements = 1 << 15;
inline constexpr int64_t kTensorWork = 16;

// Many small tensors: each one's data is a separate allocation, out of cache after the backward
// pass, and the loop below would wait for each tensor's first lines in turn. The first line of
// each of a tensor's arrays is requested this many tensors ahead instead.
inline constexpr int64_t kPrefetchAhead = 8;

inline void prefetch_tensor(const TensorTable& t, int64_t i) {
  __builtin_prefetch(t.param[i], 1);
  __builtin_prefetch(t.grad[i], 0);
  if (t.state1[i] != nullptr) __builtin_prefetch(t.state1[i], 1);
  if (t.state2[i] != nullptr) __builtin_prefetch(t.state2[i], 1);
  if (t.state3[i] != nullptr) __builtin_prefetch(t.state3[i], 1);
}

// Calls slice(tensor_index, begin, end) over every element of every tensor, split into one
// contiguous range of equal size per thread, each cut moved down to a multiple of its tensor's
// ``granule`` (null: none; telemetry rows, 8-bit state blocks): no row or block is split between
// threads.
template <typename Slice>
void for_each_slice(const TensorTable& table, const int64_t* granule, const Slice& slice) {
  const int64_t n = static_cast<int64_t>(table.size());
  int64_t* const offsets = scratch<int64_t, 0>(n + 1);  // prefix sums of element counts
  offsets[0] = 0;
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + table.numel[i];
  const int64_t total = offsets[n];
  if (total == 0) return;
  auto tensor_at = [&](int64_t pos) {
    return std::upper_bound(offsets, offsets + n + 1, pos) - offsets - 1;
  };
  auto cut = [&](int64_t part, int64_t parts) {
    const int64_t pos = total * part / parts;
    if (granule == nullptr || pos >= total) return pos;
    const int64_t t = tensor_at(pos), within = pos - offsets[t];
    return offsets[t] + within / granule[t] * granule[t];
  };
  const int64_t parts = total + kTensorWork * n < kSerialElements ? 1 : std::max<int64_t>(1, at::get_num_threads());
  auto run_part = [&](int64_t part) {
    const int64_t begin = cut(part, parts), end = cut(part + 1, parts);
    int64_t t = tensor_at(begin);
    for (int64_t pos = begin; pos < end; ++t) {
      if (t + kPrefetchAhead < n) prefetch_tensor(table, t + kPrefetchAhead);
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > pos) slice(t, pos - offsets[t], stop - offsets[t]);
      pos = stop;
    }
  };
  if (parts == 1) {
    run_part(0);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t part = first; part < last; ++part) run_part(part);
    });
  }
}

inline int64_t row_size(const TensorTable& t, int64_t k) { return std::max<int64_t>(1, t.numel[k] / t.rows[k]); }

// ------------------------------------------------------------------ 8-bit states

// for_each_range for 8-bit states (wdopt/reference/quantization.py): the cuts fall on block
// boundaries (monitored: on multiples of both the block and the row). Per block of 256, the
// states' codes are decoded into float buffers, body(k, begin, end, sums, states) updates the
// block with ``states`` pointing into them (once per row segment when monitored, each segment's
// sums added into its row's), and the new values are encoded with the block's new scale. A block
// lies within one run of storage_for (storage.h): 256-aligned, it crosses no multiple of 2^32 of an
// unsharded tensor, and a shard crosses none at all (wdopt/optim/_dtensor.py). SIGNED:
// per state list, whether its codes are signed (int8) or a second moment's (uint8).
template <bool... SIGNED, typename Body>
void for_each_block(const TensorTable& table, const Body& body) {
  constexpr int kLanes = sizeof...(SIGNED);
  const bool monitored = !table.telemetry.empty();
  const bool stochastic = !table.rng.empty();
  const int64_t n = static_cast<int64_t>(table.size());
  int64_t* const granule = scratch<int64_t, 1>(n);
  for (int64_t k = 0; k < n; ++k) granule[k] = monitored ? std::lcm(row_size(table, k), kQuantBlock) : kQuantBlock;
  void* const* codes[3] = {table.state1.data(), table.state2.data(), table.state3.data()};
  for_each_slice(table, granule, [&](int64_t k, int64_t begin, int64_t end) {
    alignas(64) float buffer[kLanes][kQuantBlock];
    std::array<float*, 3> states{};
    uint32_t stream[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      stream[lane] = stochastic ? rounding_stream(table.rng[k][0], table.rng[k][1], lane + 1) : 0u;
    }
    const int64_t base = stochastic ? table.rng[k][2] : 0;  // the index base (a shard's)
    const int64_t rows = monitored ? row_size(table, k) : 0;
    for (int64_t first = begin; first < end; first += kQuantBlock) {
      const int64_t last = std::min(end, first + kQuantBlock), block = first / kQuantBlock;
      int lane = 0;
      // The old states, decoded: ``states`` address them by element index.
      ([&] {
        decode_block<SIGNED>(static_cast<const int8_t*>(codes[lane][k]) + first, table.scales[lane][k][block],
                             buffer[lane], last - first);
        states[lane] = buffer[lane] - first;
        ++lane;
      }(), ...);
      if (!monitored) {
        body(k, first, last, nullptr, states);
      } else {
        for (int64_t segment = first; segment < last;) {
          const int64_t row = segment / rows, stop = std::min(last, (row + 1) * rows);
          double part[8];
          body(k, segment, stop, part, states);
          double* sums = table.telemetry[k] + row * table.columns;
          for (int64_t c = 0; c < table.columns; ++c) sums[c] = segment == row * rows ? part[c] : sums[c] + part[c];
          segment = stop;
        }
      }
      lane = 0;
      // The new states, encoded with the block's new scale.
      ([&] {
        table.scales[lane][k][block] = encode_block<SIGNED>(buffer[lane], static_cast<int8_t*>(codes[lane][k]) + first,
                                                            last - first, stochastic, stream[lane], base + first);
        ++lane;
      }(), ...);
    }
  });
}

}  // namespace wdopt::cpu
