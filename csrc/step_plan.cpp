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
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace wdopt {
namespace {

// What a tensor looked like when the plan was made: a moved (.data =, set_, resize_) or reshaped
// tensor no longer matches. Contiguity is part of it: the kernels walk tensors as flat arrays.
struct Seen {
  const void* data;
  at::ScalarType dtype;
  at::Device device;
  std::vector<int64_t> sizes;

  explicit Seen(const at::Tensor& t)
      : data(t.const_data_ptr()), dtype(t.scalar_type()), device(t.device()), sizes(t.sizes().vec()) {}

  // Called for every tensor at every step: const_data_ptr (no copy-on-write check) and a plain
  // loop over the few sizes (a memcmp call costs more than the comparison).
  bool same(const at::Tensor& t) const {
    if (!t.defined() || t.const_data_ptr() != data || t.scalar_type() != dtype || t.device() != device ||
        !t.is_contiguous()) {
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

// One (device, dtype) bucket of the group: the tensor lists of one operator call.
struct Bucket {
  std::vector<int64_t> members;  // indices into the group's parameters
  std::vector<at::Tensor> params, grads;
  std::vector<std::vector<at::Tensor>> states;  // per state list of the operator, one tensor per member
  std::vector<at::Tensor> steps;                // AdamW's step counts
  c10::List<std::optional<at::Tensor>> first_steps;  // SGD's fresh-buffer flags
  std::vector<Seen> seen;                       // params, then every state tensor and step
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
  int64_t add_bucket(std::vector<int64_t> members, std::vector<std::vector<at::Tensor>> states,
                     std::vector<at::Tensor> steps, std::vector<at::Tensor> first_step_flags,
                     std::vector<int64_t> first_step_members) {
    Bucket b;
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
    b.grads.resize(b.members.size());
    buckets_.push_back(std::move(b));
    return static_cast<int64_t>(buckets_.size()) - 1;
  }

  // Whether the step can run as validated: gradients where they were (and nowhere else), each
  // plain; no tensor moved. Gathers the gradients for run(). Writes nothing the user can see.
  bool ready() {
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].unsafeGetTensorImpl()->grad();  // p.grad, without the non-leaf warning
      if (g.defined() != static_cast<bool>(with_grad_[i])) return false;
    }
    for (auto& b : buckets_) {
      size_t k = 0;
      for (size_t j = 0; j < b.members.size(); ++j) {
        const at::Tensor& p = b.params[j];
        if (!b.seen[k++].same(p)) return false;
        const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
        if (!plain_grad_of(g, p)) return false;
        b.grads[j] = g;
      }
      for (const auto& list : b.states) {
        for (const auto& t : list) {
          if (!b.seen[k++].same(t)) return false;
        }
      }
      for (const auto& t : b.steps) {
        if (!b.seen[k++].same(t)) return false;
      }
    }
    ready_ = true;
    return true;
  }

  int64_t n_buckets() const { return static_cast<int64_t>(buckets_.size()); }

  // After ready(): the addresses of one bucket's gradients, an int64 CPU tensor, for backends
  // that launch from Python with a table of addresses (Triton: only this column changes).
  at::Tensor grad_addresses(int64_t bucket) const {
    TORCH_CHECK(ready_, "GroupPlan.grad_addresses() before a successful ready()");
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets(), "GroupPlan: no bucket ", bucket);
    const Bucket& b = buckets_[bucket];
    at::Tensor out = at::empty({static_cast<int64_t>(b.grads.size())}, at::kLong);
    int64_t* addresses = out.data_ptr<int64_t>();
    for (size_t j = 0; j < b.grads.size(); ++j) {
      addresses[j] = reinterpret_cast<int64_t>(b.grads[j].const_data_ptr());
    }
    return out;
  }

  // After ready(): whether every gradient of one bucket that kernels access as vectors (not 0-d)
  // is 16-byte aligned, as torch's allocations are (a view at an odd offset may not be).
  bool grads_aligned(int64_t bucket) const {
    TORCH_CHECK(ready_ && bucket >= 0 && bucket < n_buckets(), "GroupPlan.grads_aligned(): no ready bucket ", bucket);
    for (const auto& g : buckets_[bucket].grads) {
      if (g.dim() > 0 && reinterpret_cast<uintptr_t>(g.const_data_ptr()) % 16 != 0) return false;
    }
    return true;
  }

  // One bucket's step, after ready(): ``lr`` or (capturable) ``lr_tensor`` on the bucket's device,
  // ``decay_lr_scale`` as the Python driver computes it, GradScaler's tensors on the device.
  void run(int64_t bucket, double lr, const std::optional<at::Tensor>& lr_tensor, double decay_lr_scale,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    TORCH_CHECK(ready_, "GroupPlan.run() before a successful ready()");
    TORCH_CHECK(bucket >= 0 && bucket < n_buckets(), "GroupPlan: no bucket ", bucket);
    Bucket& b = buckets_[bucket];
    // Straight to the CPU/CUDA kernel: no autograd or view bookkeeping applies to an optimizer
    // update under no_grad (torch's fused optimizers do not bump version counters either), and
    // the boxed autograd fallback would copy every list.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::vector<at::Tensor> none;
    if (optimizer_ == "adamw") {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::adamw_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
          at::TensorList, double, double, double, double, double, double, bool, bool,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
      const bool amsgrad = flags_[0];
      op.call(b.params, b.grads, b.states[0], b.states[1], amsgrad ? at::TensorList(b.states[2]) : at::TensorList(none),
              b.steps, none, lr, constants_[0], constants_[1], constants_[2], constants_[3], decay_lr_scale, amsgrad,
              flags_[1], lr_tensor, grad_scale, found_inf);
    } else if (optimizer_ == "sgd") {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::sgd_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&, at::TensorList,
          double, double, double, double, bool, bool, double, bool, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
      const bool has_momentum = constants_[1] != 0.0;
      op.call(b.params, b.grads, has_momentum ? at::TensorList(b.states[0]) : at::TensorList(none), b.first_steps, none,
              lr, constants_[0], constants_[1], constants_[2], flags_[0], flags_[1], decay_lr_scale, flags_[2],
              lr_tensor, grad_scale, found_inf);
    } else {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("wdopt::lion_", "").typed<void(
          at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double, double, double, double, bool,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
      op.call(b.params, b.grads, b.states[0], none, lr, constants_[0], constants_[1], constants_[2], decay_lr_scale,
              flags_[0], lr_tensor, grad_scale, found_inf);
    }
  }

  // After the step: the gradients are not held past it (zero_grad(set_to_none=True) frees them).
  void release() {
    for (auto& b : buckets_) {
      for (auto& g : b.grads) g = at::Tensor();
    }
    ready_ = false;
  }

 private:
  std::string optimizer_;
  std::vector<at::Tensor> params_;
  std::vector<int64_t> with_grad_;
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
      .def("grad_addresses", &GroupPlan::grad_addresses)
      .def("grads_aligned", &GroupPlan::grads_aligned)
      .def("run", &GroupPlan::run)
      .def("release", &GroupPlan::release);
}

}  // namespace wdopt
