// How the CPU kernels (fused_cpu.cpp, rotational_cpu.cpp) store results in a parameter's dtype:
// rounded to nearest, stochastically, or as a compensated bf16 parameter's master weight. The
// math of each is csrc/include/wdopt/rounding.h (shared with CUDA); this is its CPU face.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../include/wdopt/hd.h"
#include "../include/wdopt/rounding.h"

// What the element loops call: a call left in a loop keeps it scalar (GCC does not inline the
// stochastic-rounding stores of the larger instantiations on its own).
#define WDOPT_INLINE inline __attribute__((always_inline))

namespace wdopt::cpu {

template <bool B> using Bool = std::integral_constant<bool, B>;

// A tensor's stochastic-rounding streams for one step, from its [key, count, index base]: the
// stream of each lane (0: the parameter; 1-3: its state tensors in the operator's order) and the
// base (a shard's: the random bits of element i are those of element base + i of the whole tensor).
struct Streams {
  uint32_t lane[4];
  int64_t base;
};

inline Streams streams_of(const int64_t* rng) {
  Streams s;
  for (uint32_t lane = 0; lane < 4; ++lane) s.lane[lane] = rounding_stream(rng[0], rng[1], lane);
  s.base = rng[2];
  return s;
}

// How a kernel stores its results in scalar_t, over one run of a tensor's elements: rounded to
// nearest or, with SR (bf16 and fp16 storage only), stochastically with the bits of (tensor, step,
// LANE, element i) (wdopt/reference/rounding.py). MASTER 24 or 32 (bf16 only): a compensated
// parameter, loaded and stored as its master weight (the bf16 value and the correction's low
// bits). A run is what storage_for says: it ends by rounding.h's run_end, so each element's word
// is a 32-bit hash of the run's word and the element's index (rounding_bits_within).
template <typename scalar_t, bool SR_ARG, int MASTER_ARG> struct Storage {
  static constexpr bool kBF16 = std::is_same_v<scalar_t, c10::BFloat16>;
  static constexpr bool SR = SR_ARG && (kBF16 || std::is_same_v<scalar_t, c10::Half>);
  static constexpr int MASTER = kBF16 ? MASTER_ARG : 16;
  using Comp = Compensated<MASTER == 16 ? 32 : MASTER>;
  uint32_t word[4];  // per lane, the run's word (rounding.h's run_word)
  void* correction;

  template <int LANE> WDOPT_INLINE uint32_t bits(int64_t i) const {
    return rounding_bits_within(word[LANE], static_cast<uint32_t>(i));
  }

  template <int LANE, typename opmath> WDOPT_INLINE scalar_t store(int64_t i, opmath x) const {
    if constexpr (kBF16) {
      // Integer conversions (rounding.h): c10::BFloat16's own does not vectorize.
      const uint16_t b = SR ? bf16_bits_stochastic(x, bits<LANE>(i)) : bf16_bits_nearest(x);
      return c10::BFloat16(b, c10::BFloat16::from_bits());
    } else if constexpr (!SR) {
      return static_cast<scalar_t>(x);
    } else {
      return c10::Half(stochastic_round_fp16(x, c10::Half(x).x, bits<LANE>(i)), c10::Half::from_bits());
    }
  }

  // A state's new value as its array holds it: stored in scalar_t, or (S = float: an 8-bit
  // state's decoded block, encoded after the update) as computed.
  template <int LANE, typename S, typename opmath> WDOPT_INLINE S state(int64_t i, opmath x) const {
    if constexpr (std::is_same_v<S, scalar_t>) {
      return store<LANE>(i, x);
    } else {
      return x;
    }
  }

  // The parameter as update_elements and telemetry.h address it (PlainParam's interface).
  struct Param {
    using opmath = opmath_t<scalar_t>;
    scalar_t* __restrict__ p;
    Storage s;
    WDOPT_INLINE opmath load(int64_t i) const {
      if constexpr (MASTER == 16) {
        return static_cast<opmath>(p[i]);
      } else {
        return Comp::combine(p[i].x, static_cast<const typename Comp::correction_t*>(s.correction)[i]);
      }
    }
    WDOPT_INLINE opmath store(int64_t i, opmath x) const {
      if constexpr (MASTER == 16 && kBF16) {
        // Through the bits: a c10::BFloat16 temporary copied into p[i] is an aggregate copy the
        // vectorizer gives up on.
        const uint16_t bits = s.template store<0>(i, x).x;
        p[i].x = bits;
        return bits_float(static_cast<uint32_t>(bits) << 16);
      } else if constexpr (MASTER == 16) {
        const scalar_t stored = s.template store<0>(i, x);
        p[i] = stored;
        return static_cast<opmath>(stored);
      } else {
        auto* c = static_cast<typename Comp::correction_t*>(s.correction);
        // A 24-bit master rounds w at its 8th-lowest bit: stochastically with lane 0's word.
        const uint32_t add = MASTER == 24 ? (SR ? s.template bits<0>(i) : 0x80u) : 0u;
        uint16_t bits;
        typename Comp::correction_t low;
        Comp::split(x, add, bits, low);
        p[i] = c10::BFloat16(bits, c10::BFloat16::from_bits());
        c[i] = low;
        return Comp::combine(bits, low);
      }
    }
  };
  Param param(scalar_t* p) const { return Param{p, *this}; }
};

// Calls f(SR, MASTER) (integral constants) for a step's storage, instantiating only what exists
// for scalar_t: stochastic rounding (``has_rng``) for bf16/fp16, master weights (``master_bits``
// 24 or 32; 16: plain parameters) for bf16.
template <typename scalar_t, typename F> void dispatch_storage(bool has_rng, int master_bits, F&& f) {
  constexpr bool bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool low = bf16 || std::is_same_v<scalar_t, c10::Half>;
  const bool sr = low && has_rng;
  if constexpr (bf16) {
    if (master_bits != 16) {
      const auto go = [&](auto MASTER) {
        if (sr) f(Bool<true>{}, MASTER); else f(Bool<false>{}, MASTER);
      };
      if (master_bits == 32) go(std::integral_constant<int, 32>{}); else go(std::integral_constant<int, 24>{});
      return;
    }
  }
  if constexpr (low) {
    if (sr) {
      f(Bool<true>{}, std::integral_constant<int, 16>{});
      return;
    }
  }
  f(Bool<false>{}, std::integral_constant<int, 16>{});
}

// A tensor's storage for the run of its elements from ``i0`` to at most run_end(streams->base,
// i0) (the caller's to respect): its words from this step's ``streams`` (nullptr: to nearest) and
// its correction (nullptr: plain).
template <typename scalar_t, bool SR, int MASTER>
Storage<scalar_t, SR, MASTER> storage_for(const Streams* streams, int64_t i0, void* correction) {
  Storage<scalar_t, SR, MASTER> r{};
  if constexpr (Storage<scalar_t, SR, MASTER>::SR) {
    for (int lane = 0; lane < 4; ++lane) r.word[lane] = run_word(streams->lane[lane], streams->base, i0);
  }
  r.correction = correction;
  return r;
}

// Calls f(first, last) over [begin, end) of a tensor, cut where the runs of storage_for end (from
// the index base of its [key, count, index base] ``rng``; nullptr, to nearest: one call).
template <typename F> void for_each_run(const int64_t* rng, int64_t begin, int64_t end, const F& f) {
  if (rng == nullptr) {
    f(begin, end);
    return;
  }
  for (int64_t first = begin; first < end;) {
    const int64_t last = std::min(end, run_end(rng[2], first));
    f(first, last);
    first = last;
  }
}

}  // namespace wdopt::cpu
