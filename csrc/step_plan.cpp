// The cached fast path of the step driver (wdopt/optim/_base.py, FastStep) for the C++ backends.
//
// A step that re-checks every tensor in Python and hands the operator five lists of tensors costs
// microseconds per tensor: the Python loop, and the boxing of each list at the call. Once the
// Python driver has validated a step, it hands one param group's tensors to a GroupPlan, once.
// At each later step the plan, in C++, reads every parameter's gradient (as ``p.grad`` would),
// checks that it still is what the validated step saw (present where it was, absent where it
// was, same dtype, shape, device and a plain contiguous layout) and that no parameter or state
// tensor moved or changed shape, and then calls the same operators (csrc/ops.cpp), unboxed and on
// the kernels' dispatch key. Any difference makes ``ready()`` false before anything is written,
// and the Python driver takes its validation path, which raises or builds a new plan.
//
// What Python objects changed (groups edited, state dicts edited, parameters replaced in a group)
// is checked by the Python side; this file checks what only the tensors know.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/COW.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/SmallVector.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu/first_step.h"
#include "cpu/fused_cpu.h"

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace wdopt {
namespace {

// What a tensor looked like when the plan was made: a moved (.data =, set_, resize_) or reshaped
// tensor no longer matches. Contiguity is part of it: the kernels walk tensors as flat arrays.
struct Seen {
  const void* data;
  at::ScalarType dtype;
  at::Device device;
  // Inline (no heap block per tensor): ready() reads these for every tensor at every step.
  c10::SmallVector<int64_t, 6> sizes;

  explicit Seen(const at::Tensor& t)
      : data(t.data_ptr()), dtype(t.scalar_type()), device(t.device()), sizes(t.sizes().begin(), t.sizes().end()) {}

  // Called for every tensor at every step, which then writes through ``address`` (its data, as
  // data_ptr() gives it: a copy-on-write tensor is materialized, so it moved). A plain loop over
  // the few sizes: a memcmp call costs more than the comparison.
  bool same(const at::Tensor& t, void*& address) const {
    if (!t.defined()) return false;
    // A copy-on-write tensor (torch._lazy_clone) is materialized by data_ptr(), which torch refuses
    // inside a parallel region (ready() splits large buckets between threads): it has moved
    // anyway, and the validation path materializes it.
    const c10::Storage& storage = t.unsafeGetTensorImpl()->unsafe_storage();
    if (storage && c10::impl::cow::is_cow_data_ptr(storage.data_ptr())) return false;
    address = t.data_ptr();
    if (address != data || t.scalar_type() != dtype || t.device() != device || !t.is_contiguous()) {
      return false;
    }
    const at::IntArrayRef now = t.sizes();
    if (now.size() != sizes.size()) return false;
    for (size_t d = 0; d < sizes.size(); ++d) {
      if (now[d] != sizes[d]) return false;
    }
    return true;
  }
};

// A gradient the kernels take as it is: the parameter's dtype, shape and device, dense, contiguous,
// not a lazily negated or conjugated view (the validation path copies those into work tensors).
bool plain_grad_of(const at::Tensor& g, const at::Tensor& p) {
  if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
      !g.is_contiguous() || g.is_neg() || g.is_conj()) {
    return false;
  }
  const at::IntArrayRef gs = g.sizes(), ps = p.sizes();
  if (gs.size() != ps.size()) return false;
  for (size_t d = 0; d < gs.size(); ++d) {
    if (gs[d] != ps[d]) return false;
  }
  return true;
}

// ready() walks tens of thousands of small heap objects (TensorImpl, StorageImpl, autograd meta,
// the gradient's TensorImpl and StorageImpl) that are mostly out of cache: one pointer chase after
// another costs a memory latency each. These prefetch the objects of a tensor some iterations
// ahead, one level of the chain per stage, so that the loads of many tensors overlap.
constexpr size_t kAhead = 16;

inline void prefetch_lines(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) __builtin_prefetch(static_cast<const char*>(p) + 64 * i);
}

inline void prefetch_impl(const at::Tensor& t) { prefetch_lines(t.unsafeGetTensorImpl(), 4); }

// Needs the TensorImpl in cache (prefetched kAhead / 2 iterations before).
inline void prefetch_storage(const at::Tensor& t) {
  prefetch_lines(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 2);
}

// A parameter's gradient: its autograd meta, then the gradient's TensorImpl and StorageImpl.
inline void prefetch_autograd_meta(const at::Tensor& p) {
  if (const void* meta = p.unsafeGetTensorImpl()->autograd_meta()) prefetch_lines(meta, 2);
}

// Tensors [begin, end) of a list with the pipeline above: ``check(j)`` runs when tensor j's
// objects are in.
template <typename Check>
inline bool each_prefetched(const std::vector<at::Tensor>& list, size_t begin, size_t end, const Check& check) {
  for (size_t j = begin; j < end; ++j) {
    if (j + kAhead < end) prefetch_impl(list[j + kAhead]);
    if (j + kAhead / 2 < end) prefetch_storage(list[j + kAhead / 2]);
    if (!check(j)) return false;
  }
  return true;
}

// What ready() returns when the step can run (bits).
constexpr int64_t kReady = 1, kAddressesMoved = 2;

// From this many tensors in a bucket on, ready() splits them between threads: below it the
// parallel region's start costs more than it saves.
constexpr size_t kParallelMembers = 1024;

enum class Mode : int64_t {
  kOperator = 0,   // the operator through the dispatcher (CUDA): ready() keeps the gradients
  kCpuTable = 1,   // the C++ CPU kernels on a table of data pointers (fused_cpu.h)
  kAddresses = 2,  // launched from Python (Triton): ready() gathers the gradients' addresses
};

// One (device, dtype) bucket of the group: the tensor lists of one operator call.
struct Bucket {
  std::vector<int64_t> members;  // indices into the group's parameters
  std::vector<at::Tensor> params, grads;
  std::vector<std::vector<at::Tensor>> states;  // per state list of the operator, one tensor per member
  std::vector<at::Tensor> steps;                // AdamW's step counts
  c10::List<std::optional<at::Tensor>> first_steps;  // SGD's fresh-buffer flags
  std::vector<Seen> seen;                       // params, then every state tensor and step
  // How the bucket's step runs, which decides what ready() gathers in its pass over the tensors.
  Mode mode = Mode::kOperator;
  cpu::TensorTable table;  // kCpuTable: every pointer; kAddresses: the gradients' (table.grad)
  at::Tensor addresses;       // kAddresses: the gradients' addresses at the last ready()
  bool require_aligned = false;  // kAddresses: ready() refuses a gradient that is not 16-byte aligned
  // A monitored step's telemetry, per member: its first row in the device's flat (N, 4) buffer
  // and its row count (set_telemetry_layout).
  std::vector<int64_t> telemetry_offsets, telemetry_rows;
  // Low-precision storage (set_low_precision), each list empty or one tensor per member:
  // stochastic rounding's int64 [key, count, index base], compensated parameters' corrections,
  // and per state list the 8-bit states' block scales. Checked by ready() as the states are.
  std::vector<at::Tensor> rng, correction;
  std::vector<std::vector<at::Tensor>> scales;
  std::vector<Seen> seen_low;  // rng, correction, then every scale tensor
  at::Tensor increment;        // kOperator: [0, 1, 0] on the device, rng's count advance
};

struct GroupPlan : torch::CustomClassHolder {
  // ``optimizer``: "adamw", "sgd" or "lion". ``params``: the group's parameters, in order;
  // ``with_grad[i]``: whether parameter i had a gradient at the validated step. ``constants``
  // and ``flags``: the group's hyperparameters the operator takes, in the order of run_bucket.
  GroupPlan(std::string optimizer, std::vector<at::Tensor> params, std::vector<int64_t> with_grad,
            std::vector<double> constants, std::vector<int64_t> flags)
      : optimizer_(std::move(optimizer)),
        params_(std::move(params)),
        with_grad_(std::move(with_grad)),
        constants_(std::move(constants)),
        flags_(std::move(flags)) {
    TORCH_CHECK(params_.size() == with_grad_.size(), "GroupPlan: one with_grad entry per parameter");
    for (size_t i = 0; i < with_grad_.size(); ++i) {
      if (!with_grad_[i]) without_grad_.push_back(static_cast<int64_t>(i));
    }
    const size_t want_constants = optimizer_ == "adamw" ? 4 : 3;
    const size_t want_flags = optimizer_ == "adamw" ? 2 : optimizer_ == "sgd" ? 3 : 1;
    TORCH_CHECK(optimizer_ == "adamw" || optimizer_ == "sgd" || optimizer_ == "lion", "GroupPlan: unknown optimizer ",
                optimizer_);
    TORCH_CHECK(constants_.size() == want_constants && flags_.size() == want_flags, "GroupPlan: ", optimizer_,
                " takes ", want_constants, " constants and ", want_flags, " flags");
  }

  // A bucket: the indices of its parameters in the group, its state lists (each one tensor per
  // member), AdamW's steps ([] otherwise) and SGD's first-step flags, given as the defined flags
  // with the member positions they belong to. Returns the bucket's number for run().
  // ``mode``: how the bucket runs (Mode: 0 operator, 1 CPU table, 2 addresses for Python).
  int64_t add_bucket(std::vector<int64_t> members, std::vector<std::vector<at::Tensor>> states,
                     std::vector<at::Tensor> steps, std::vector<at::Tensor> first_step_flags,
                     std::vector<int64_t> first_step_members, int64_t mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "GroupPlan: unknown bucket mode ", mode);
    Bucket b;
    b.mode = static_cast<Mode>(mode);
    b.members = std::move(members);
    for (int64_t i : b.members) {
      TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params_.size()) && with_grad_[i], "GroupPlan: bad member ", i);
      b.params.push_back(params_[i]);
      b.seen.emplace_back(params_[i]);
    }
    for (auto& list : states) {
      TORCH_CHECK(list.size() == b.members.size(), "GroupPlan: a state list needs one tensor per member");
      for (const auto& t : list) b.seen.emplace_back(t);
    }
    b.states = std::move(states);
    TORCH_CHECK(steps.empty() || steps.size() == b.members.size(), "GroupPlan: one step per member");
    for (const auto& t : steps) b.seen.emplace_back(t);
    b.steps = std::move(steps);
    TORCH_CHECK(first_step_flags.size() == first_step_members.size(), "GroupPlan: one member per first-step flag");
    if (optimizer_ == "sgd" && constants_[1] != 0.0) {
      b.first_steps.resize(b.members.size());
      for (size_t k = 0; k < first_step_flags.size(); ++k) b.first_steps.set(first_step_members[k], first_step_flags[k]);
    }
    TORCH_CHECK(b.states.size() <= 3, "GroupPlan: at most three state lists");
    if (b.mode == Mode::kOperator) b.grads.resize(b.members.size());
    if (b.mode != Mode::kOperator) b.table.resize(b.members.size());
    if (b.mode == Mode::kAddresses) {
      // The gradients the bucket's table was made from (the validated step's, still set): a
      // first fast step with the same ones then writes nothing into the table.
      b.addresses = at::zeros({static_cast<int64_t>(b.members.size())}, at::kLong);
      int64_t* held = b.addresses.data_ptr<int64_t>();
      for (size_t j = 0; j < b.params.size(); ++j) {
        const at::Tensor& g = b.params[j].unsafeGetTensorImpl()->grad();
        if (g.defined()) held[j] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(g.const_data_ptr()));
      }
    }
    buckets_.push_back(std::move(b));
    return static_cast<int64_t>(buckets_.size()) - 1;
  }

  // Whether the step can run as validated: gradients where they were (and nowhere else), each
  // plain; no tensor moved. Gathers the gradients for run(). Writes nothing the user can see.
  // Returns 0 (no: the validation path), kReady, or kReady | kAddressesMoved when a bucket launched
  // from Python has gradients at other addresses than at the last ready() (its buffer, see
  // addresses(), then holds the new ones): one call tells Python all it needs.
  int64_t ready() {
    // Parameters that had no gradient still have none (those that had one are checked below).
    for (int64_t i : without_grad_) {
      if (params_[i].unsafeGetTensorImpl()->grad().defined()) return 0;
    }
    int64_t result = kReady;
    for (auto& b : buckets_) {
      const size_t n = b.members.size();
      bool aligned = true;
      if (n < kParallelMembers) {
        if (!ready_range(b, 0, n, aligned)) return 0;
      } else {
        // Thousands of tensors: a range per thread. The walk waits on memory (a few cache lines
        // per tensor, out of cache after the backward pass), and two cores wait in parallel.
        std::atomic<bool> ok{true}, all_aligned{true};
        at::parallel_for(0, static_cast<int64_t>(n), kParallelMembers / 2, [&](int64_t begin, int64_t end) {
          bool range_aligned = true;
          try {
            if (ok.load(std::memory_order_relaxed) && !ready_range(b, begin, end, range_aligned)) ok = false;
          } catch (...) {
            ok = false;  // whatever a tensor raised, the validation path raises it with its context
          }
          if (!range_aligned) all_aligned = false;
        });
        if (!ok) return 0;
        aligned = all_aligned;
      }
      if (b.mode == Mode::kAddresses) {
        // A table whose kernels were specialised for aligned gradients cannot take others.
        if (b.require_aligned && !aligned) return 0;
        int64_t* held = b.addresses.data_ptr<int64_t>();
        for (size_t j = 0; j < n; ++j) {
          const auto address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(b.table.grad[j]));
          if (held[j] != address) {
            held[j] = address;
            result |= kAddressesMoved;
          }
        }
      }
    }
    ready_ = true;
    return result;
  }

  // ready() for members [begin, end) of one bucket (one thread's range): checks each parameter,
  // its gradient and state tensors, and writes what run() needs at their indices only.
  static bool ready_range(Bucket& b, size_t begin, size_t end, bool& aligned) {
    cpu::TensorTable& t = b.table;
    const size_t n = b.members.size();
    const bool cpu_table = b.mode == Mode::kCpuTable;
    const std::vector<at::Tensor>& params = b.params;
    const Seen* seen = b.seen.data();
    // Parameters and gradients: the parameter's objects kAhead ahead, its autograd meta
    // kAhead/2 ahead, the gradient's TensorImpl kAhead/4 and its StorageImpl kAhead/8 ahead.
    const bool ok = each_prefetched(params, begin, end, [&](size_t j) {
      if (j + kAhead / 2 < end) prefetch_autograd_meta(params[j + kAhead / 2]);
      if (j + kAhead / 4 < end) prefetch_impl(params[j + kAhead / 4].unsafeGetTensorImpl()->grad());
      if (j + kAhead / 8 < end) {
        const at::Tensor& ahead = params[j + kAhead / 8].unsafeGetTensorImpl()->grad();
        if (ahead.defined()) prefetch_storage(ahead);
      }
      const at::Tensor& p = params[j];
      void* address;
      if (!seen[j].same(p, address)) return false;
      const at::Tensor& g = p.unsafeGetTensorImpl()->grad();  // p.grad, without the non-leaf warning
      if (!plain_grad_of(g, p)) return false;
      if (b.mode == Mode::kOperator) {
        b.grads[j] = g;
      } else {
        t.numel[j] = p.numel();
        t.param[j] = address;
        t.grad[j] = g.const_data_ptr();
        if (g.dim() > 0 && reinterpret_cast<uintptr_t>(t.grad[j]) % 16 != 0) aligned = false;
      }
      return true;
    });
    if (!ok) return false;
    // A list of tensors, one per member or none (no steps, no streams), seen at ``seen_at`` (seen_at[j] for
    // member j): each checked unmoved, and on a CPU table its address kept by keep(j, address).
    const auto column = [&](const std::vector<at::Tensor>& list, const Seen* seen_at, const auto& keep) {
      return list.empty() || each_prefetched(list, begin, end, [&](size_t j) {
        void* address;
        if (!seen_at[j].same(list[j], address)) return false;
        if (cpu_table) keep(j, address);
        return true;
      });
    };
    const Seen* seen_at = seen + n;
    std::vector<void*>* columns[] = {&t.state1, &t.state2, &t.state3};
    for (size_t s = 0; s < b.states.size(); ++s, seen_at += n) {
      if (!column(b.states[s], seen_at, [&](size_t j, void* a) { (*columns[s])[j] = a; })) return false;
    }
    if (!column(b.steps, seen_at, [&](size_t j, void* a) { t.step[j] = static_cast<float*>(a); })) return false;
    // Low-precision storage: the same checks, its addresses into the table.
    seen_at = b.seen_low.data();
    if (!column(b.rng, seen_at, [&](size_t j, void* a) { t.rng[j] = static_cast<const int64_t*>(a); })) return false;
    seen_at += b.rng.size();
    if (!column(b.correction, seen_at, [&](size_t j, void* a) { t.correction[j] = a; })) return false;
    seen_at += b.correction.size();
    for (size_t s = 0; s < b.scales.size(); ++s, seen_at += n) {
      if (!column(b.scales[s], seen_at, [&](size_t j, void* a) { t.scales[s][j] = static_cast<float*>(a); })) return false;
    }
    return true;
  }

  int64_t n_buckets() const { return static_cast<int64_t>(buckets_.size()); }

  // A bucket's low-precision storage (see Bucket), set once after add_bucket: ``rng`` and
  // ``correction`` [] or one tensor per member, ``scales`` [] or one list per state list, each one
  // tensor per member (the operators' checks ran on them at the validated step). run() passes
  // them to the kernels and then advances each rng's count, as the validation path does
  // (FusedOptimizer._advance_rng): not on a step GradScaler skips. A bucket launched from Python
  // (Triton) has them checked only: its table holds their addresses, its driver advances the counts.
  void set_low_precision(int64_t bucket, std::vector<at::Tensor> rng, std::vector<at::Tensor> correction,
                         std::vector<std::vector<at::Tensor>> scales) {
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets(), "GroupPlan: no bucket ", bucket);
    Bucket& b = buckets_[bucket];
    const size_t n = b.members.size();
    TORCH_CHECK(rng.empty() || rng.size() == n, "GroupPlan: one rng per member");
    TORCH_CHECK(correction.empty() || correction.size() == n, "GroupPlan: one correction per member");
    TORCH_CHECK(scales.empty() || scales.size() == b.states.size(), "GroupPlan: one scale list per state list");
    b.seen_low.clear();
    for (const auto& t : rng) {
      TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 3 && t.is_contiguous(), "GroupPlan: bad rng");
      b.seen_low.emplace_back(t);
    }
    for (const auto& t : correction) b.seen_low.emplace_back(t);
    for (const auto& list : scales) {
      TORCH_CHECK(list.size() == n, "GroupPlan: one scale tensor per member");
      for (const auto& t : list) b.seen_low.emplace_back(t);
    }
    if (b.mode == Mode::kCpuTable) {
      cpu::TensorTable& t = b.table;
      t.rng.assign(rng.empty() ? 0 : n, nullptr);
      t.correction.assign(correction.empty() ? 0 : n, nullptr);
      t.master_bits = correction.empty() ? 16 : (correction[0].scalar_type() == at::kShort ? 32 : 24);
      for (size_t s = 0; s < 3; ++s) t.scales[s].assign(s < scales.size() ? n : 0, nullptr);
    } else if (b.mode == Mode::kOperator && !rng.empty()) {
      b.increment = at::tensor(std::vector<int64_t>{0, 1, 0}, at::TensorOptions().dtype(at::kLong)).to(rng[0].device());
    }
    b.rng = std::move(rng);
    b.correction = std::move(correction);
    b.scales = std::move(scales);
  }

  // A bucket launched from Python (Mode::kAddresses): the int64 CPU tensor in which ready() keeps
  // its gradients' addresses (Triton's table column), the same tensor at every step (allocating
  // it afresh cost 2 ms a step at 10,000 tensors: glibc consolidates the freed gradients' small
  // blocks at the first larger request). ``require_aligned``: the bucket's kernels read every
  // gradient with 16-byte vectors, so ready() refuses one that is not (a view at an odd offset).
  at::Tensor addresses(int64_t bucket, bool require_aligned) {
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets() && buckets_[bucket].mode == Mode::kAddresses,
                "GroupPlan: bucket ", bucket, " is not launched from Python");
    Bucket& b = buckets_[bucket];
    b.require_aligned = require_aligned;
    return b.addresses;
  }

  // Where each member's telemetry rows lie in the flat buffer of its device that run() may be
  // handed (``telemetry_flat``): set once, so that a monitored step makes no per-tensor views.
  void set_telemetry_layout(int64_t bucket, std::vector<int64_t> offsets, std::vector<int64_t> rows) {
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets(), "GroupPlan: no bucket ", bucket);
    Bucket& b = buckets_[bucket];
    TORCH_CHECK(offsets.size() == b.members.size() && rows.size() == b.members.size(),
                "GroupPlan: one telemetry offset and row count per member");
    for (size_t j = 0; j < rows.size(); ++j) {
      const int64_t numel = b.params[j].numel();
      TORCH_CHECK(offsets[j] >= 0 && rows[j] > 0 && (numel == 0 || numel % rows[j] == 0),
                  "GroupPlan: bad telemetry layout of member ", j);
    }
    b.telemetry_offsets = std::move(offsets);
    b.telemetry_rows = std::move(rows);
  }

  // One bucket's step, after ready(): ``lr`` or (capturable) ``lr_tensor`` on the bucket's device,
  // ``decay_lr_scale`` as the Python driver computes it, GradScaler's tensors on the device.
  // ``telemetry_flat``: on a step a RotationMonitor records, the device's (N, 4) float64 buffer
  // ((N, 8) with the direction statistics)
  // laid out by set_telemetry_layout, which the kernels fill in their update pass (csrc/ops.cpp
  // states the contract): the CPU kernels get pointers into it, the operator views made here.
  void run(int64_t bucket, double lr, const std::optional<at::Tensor>& lr_tensor, double decay_lr_scale,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           const std::optional<at::Tensor>& telemetry_flat) {
    TORCH_CHECK(ready_, "GroupPlan.run() before a successful ready()");
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets(), "GroupPlan: no bucket ", bucket);
    Bucket& b = buckets_[bucket];
    TORCH_CHECK(b.mode != Mode::kAddresses, "GroupPlan.run(): bucket ", bucket, " is launched from Python");
    const bool monitored = telemetry_flat.has_value() && telemetry_flat->defined();
    if (monitored) {
      const at::Tensor& flat = *telemetry_flat;
      TORCH_CHECK(b.telemetry_rows.size() == b.members.size(), "GroupPlan: bucket ", bucket, " has no telemetry layout");
      TORCH_CHECK(flat.scalar_type() == at::kDouble && flat.is_contiguous() && flat.dim() == 2 &&
                      (flat.size(1) == 4 || flat.size(1) == 8) && flat.device() == b.params[0].device(),
                  "GroupPlan: telemetry_flat must be a contiguous float64 (N, 4) or (N, 8) tensor on the bucket's device");
      for (size_t j = 0; j < b.members.size(); ++j) {
        TORCH_CHECK(b.telemetry_offsets[j] + b.telemetry_rows[j] <= flat.size(0), "GroupPlan: telemetry_flat has ",
                    flat.size(0), " rows; member ", j, " needs rows up to ", b.telemetry_offsets[j] + b.telemetry_rows[j]);
      }
    }
    if (b.mode == Mode::kCpuTable) {
      cpu::TensorTable& t = b.table;
      struct Clear {  // the buffer belongs to this step only (also when something below throws)
        cpu::TensorTable& t;
        ~Clear() {
          t.telemetry.clear();
          t.rows.clear();
          t.columns = 4;
        }
      } clear{t};
      if (monitored) {  // pointers into the flat buffer: no view per member
        double* base = telemetry_flat->data_ptr<double>();
        t.columns = telemetry_flat->size(1);
        for (size_t j = 0; j < b.members.size(); ++j) {
          t.telemetry.push_back(base + t.columns * b.telemetry_offsets[j]);
          t.rows.push_back(b.telemetry_rows[j]);
        }
      }
      run_cpu(b, lr, lr_tensor, decay_lr_scale, grad_scale, found_inf);
      // The counts advance unless GradScaler skipped the step (the kernels wrote nothing).
      if (!t.rng.empty() && !(found_inf.has_value() && found_inf->item<double>() != 0.0)) {
        for (const int64_t* rng : t.rng) ++const_cast<int64_t*>(rng)[1];
      }
      return;
    }
    std::vector<at::Tensor> telemetry;  // the operator takes one (K, 4) or (K, 8) buffer per member
    if (monitored) {
      telemetry.reserve(b.members.size());
      for (size_t j = 0; j < b.members.size(); ++j) {
        telemetry.push_back(telemetry_flat->narrow(0, b.telemetry_offsets[j], b.telemetry_rows[j]));
      }
    }
    // The gradients are not held past the step (zero_grad(set_to_none=True) frees them).
    struct Release {
      std::vector<at::Tensor>& grads;
      ~Release() {
        for (auto& g : grads) g = at::Tensor();
      }
    } release{b.grads};
    // Straight to the CUDA kernel: no autograd or view bookkeeping applies to an optimizer
    // update under no_grad (torch's fused optimizers do not bump version counters either), and
    // the boxed autograd fallback would copy every list.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<at::Tensor> none;
    std::vector<at::Tensor> scales;  // the operators take the state lists' scales concatenated
    for (const auto& list : b.scales) scales.insert(scales.end(), list.begin(), list.end());
    if (optimizer_ == "adamw") {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::adamw_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
          at::TensorList, double, double, double, double, double, double, bool, bool,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
          at::TensorList, at::TensorList, at::TensorList)>();
      const bool amsgrad = flags_[0];
      op.call(b.params, b.grads, b.states[0], b.states[1], amsgrad ? at::TensorList(b.states[2]) : at::TensorList(none),
              b.steps, telemetry, lr, constants_[0], constants_[1], constants_[2], constants_[3], decay_lr_scale, amsgrad,
              flags_[1], lr_tensor, grad_scale, found_inf, b.rng, b.correction, scales);
    } else if (optimizer_ == "sgd") {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::sgd_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&, at::TensorList,
          double, double, double, double, bool, bool, double, bool, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::TensorList, at::TensorList, at::TensorList)>();
      const bool has_momentum = constants_[1] != 0.0;
      op.call(b.params, b.grads, has_momentum ? at::TensorList(b.states[0]) : at::TensorList(none), b.first_steps,
              telemetry, lr, constants_[0], constants_[1], constants_[2], flags_[0], flags_[1], decay_lr_scale, flags_[2],
              lr_tensor, grad_scale, found_inf, b.rng, b.correction, scales);
    } else {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::lion_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double, double, double, double, bool,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
          at::TensorList, at::TensorList, at::TensorList)>();
      op.call(b.params, b.grads, b.states[0], telemetry, lr, constants_[0], constants_[1], constants_[2], decay_lr_scale,
              flags_[0], lr_tensor, grad_scale, found_inf, b.rng, b.correction, scales);
    }
    // The counts advance on the device, by 0 where GradScaler skipped the step (no read of
    // found_inf: a CUDA graph's replay advances them too), as FusedOptimizer._advance_rng.
    if (!b.rng.empty()) {
      const at::Tensor one = found_inf.has_value() && found_inf->defined() ? b.increment * found_inf->eq(0) : b.increment;
      at::_foreach_add_(b.rng, std::vector<at::Tensor>(b.rng.size(), one));
    }
  }

  void run_cpu(Bucket& b, double lr, const std::optional<at::Tensor>& lr_tensor, double decay_lr_scale,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    const at::ScalarType dtype = b.params[0].scalar_type();
    if (optimizer_ == "adamw") {
      cpu::adamw_table(b.table, dtype, lr, constants_[0], constants_[1], constants_[2], constants_[3], decay_lr_scale,
                       flags_[0], flags_[1], lr_tensor, grad_scale, found_inf);
    } else if (optimizer_ == "sgd") {
      if (constants_[1] != 0.0) b.table.first = cpu::first_step_flags(b.first_steps, "wdopt::sgd_");
      cpu::sgd_table(b.table, dtype, lr, constants_[0], constants_[1], constants_[2], flags_[0], flags_[1],
                     decay_lr_scale, flags_[2], lr_tensor, grad_scale, found_inf);
    } else {
      cpu::lion_table(b.table, dtype, lr, constants_[0], constants_[1], constants_[2], decay_lr_scale, flags_[0],
                      lr_tensor, grad_scale, found_inf);
    }
  }

  // Where a step stopped between ready() and run() (run releases its own bucket's gradients).
  void release() {
    for (auto& b : buckets_) {
      for (auto& g : b.grads) g = at::Tensor();
    }
    ready_ = false;
  }

 private:
  std::string optimizer_;
  std::vector<at::Tensor> params_;
  std::vector<int64_t> with_grad_, without_grad_;
  std::vector<double> constants_;
  std::vector<int64_t> flags_;
  std::vector<Bucket> buckets_;
  bool ready_ = false;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(wdopt, m) {
  m.class_<GroupPlan>("GroupPlan")
      .def(torch::init<std::string, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>,
                       std::vector<int64_t>>())
      .def("add_bucket", &GroupPlan::add_bucket)
      .def("ready", &GroupPlan::ready)
      .def("n_buckets", &GroupPlan::n_buckets)
      .def("addresses", &GroupPlan::addresses)
      .def("set_telemetry_layout", &GroupPlan::set_telemetry_layout)
      .def("set_low_precision", &GroupPlan::set_low_precision)
      .def("run", &GroupPlan::run)
      .def("release", &GroupPlan::release);
}

}  // namespace wdopt
