// The torch.library operators behind the "cpu" and "cuda" backends. Their schemas are defined
// once here; csrc/cpu/ and csrc/cuda/ register the implementations, wdopt/kernels/cpp.py the fake
// (meta) ones, so torch.compile sees each as an opaque in-place update of the listed tensors.
//
// Contract for every call (the Python driver, wdopt/optim/_base.py, guarantees it):
//   * all tensors of one call are on one device; params, grads and state share one real dtype
//     (float32, float64, float16 or bfloat16) and, tensor by tensor, one shape and dense layout;
//   * ``steps`` are float32 0-d tensors on the parameters' device; AdamW advances them;
//   * ``lr_tensor`` (capturable): when given, lr is read from it on the device instead of ``lr``;
//   * ``grad_scale``/``found_inf`` (GradScaler): gradients are divided by grad_scale; when
//     found_inf != 0 nothing at all is written (parameters, state and steps keep their values);
//   * empty optional lists (``max_exp_avg_sqs`` without amsgrad, ``momentum_buffers`` without
//     momentum) are passed as [];
//   * ``telemetry`` (rotation telemetry, wdopt/reference/telemetry.py is its specification): [] or
//     one contiguous float64 (K, 4) tensor per parameter on its device; the kernel overwrites row r
//     with [Σω², Σω·Δω, ΣΔω², Σĝ²] over elements [r·C, (r+1)·C) of the contiguous parameter
//     (C = numel/K; ω before the step, Δω the stored change, ĝ the unscaled gradient), gathered
//     while it updates them; a skipped step (found_inf) leaves it unwritten. adamw_, sgd_ and
//     lion_ also take (K, 8) tensors (all alike): columns 4-7 then get the direction statistics
//     [Σn², Σn·s, Σω·n, Σs²] of the optimizer's direction n and momentum s before the step.
//   * ``rng`` (stochastic rounding, wdopt/reference/rounding.py is its specification): [] (every
//     store rounds to nearest) or one int64 [key, count, index base] tensor of 3 elements per
//     parameter on its device, read by the kernel (not written: the driver advances count after the
//     call); stores to bf16/fp16 tensors then round stochastically with the bits of (key, count,
//     lane, index base + element): the base is 0 for a whole tensor, a shard's first global index.
//   * ``correction`` (compensated bf16 parameters, same specification): [] or, for bfloat16
//     parameters, one int16 (32-bit master weights) or int8 (24-bit) tensor per parameter, all
//     alike, shaped and laid out like it: the low bits of its master weight, which the kernel
//     loads with the parameter, updates, and stores back split into the two.
//   * ``scales`` (8-bit states, wdopt/reference/quantization.py): [] or, for each state list in
//     the schema's order, one float32 vector of ceil(numel/256) block scales per parameter
//     (concatenated: list 1's for every parameter, then list 2's ...); the state lists then hold
//     codes (int8; uint8 for exp_avg_sq and max_exp_avg_sq), which the kernel decodes, updates
//     and encodes with new scales block by block ("cpu" and "cuda" kernels alike).
#include <torch/library.h>

TORCH_LIBRARY(wdopt, m) {
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] telemetry, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float decay_lr_scale, bool amsgrad, bool maximize, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[] rng, Tensor(g!)[] correction, Tensor(h!)[] scales) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] first_steps, "
      "Tensor(c!)[] telemetry, *, "
      "float lr, float weight_decay, float momentum, float dampening, bool nesterov, "
      "bool decoupled_weight_decay, float decay_lr_scale, bool maximize, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[] rng, Tensor(d!)[] correction, Tensor(e!)[] scales) -> ()");
  // Rotational variants (docs/theory.md section 3) of "adamw", "sgd" or "lion": ``state1`` is exp_avg /
  // momentum_buffer / exp_avg, ``state2`` exp_avg_sq (AdamW, else []), ``steps`` AdamW's step
  // counts (else []), ``first_steps`` SGD's fresh-buffer flags (0-d float32 tensors, nonzero: no history; None: history; else []). Per tensor: K rows
  // (``rotational_norms[i]`` has K elements; K = 1 for a whole-tensor sphere); a tensor whose
  // ``rotational_steps`` is 0 takes its row norms as its frozen norms n. ``angle`` is η_r;
  // ``projected`` uses the plain projected step with lr instead. ``rate_tensor`` (capturable): a
  // float64 one-element tensor on the parameters' device read instead, in the kernel: lr when
  // projected, else η_r², whose correctly rounded root the kernel takes (torch's CPU sqrt is not
  // correctly rounded, so the driver hands over the square and every path gets the host's bits).
  // ``rng`` and ``correction`` as for adamw_: stochastic rounding of the parameter (lane 0) and of
  // state1/state2 (lanes 1, 2) when bf16/fp16, compensated bf16 parameters (their master weight is
  // what rotates, and what the row norms and telemetry see). ``scales`` as for adamw_ (state1's,
  // then state2's): 8-bit states, taken by the "cpu" and "cuda" kernels: they rotate the rows with
  // the new states, then encode them block by block.
  m.def(
      "rotational_(str optimizer, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
      "Tensor(c!)[] state2, Tensor(d!)[] steps, Tensor(e!)[] rotational_norms, Tensor(f!)[] update_norm_avgs, "
      "Tensor(g!)[] rotational_steps, Tensor?[] first_steps, Tensor(h!)[] telemetry, *, float lr, float beta1, float beta2, float eps, "
      "float momentum, bool nesterov, float angle, float norm_decay, float rotational_eps, bool zero_mean, "
      "bool projected, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? rate_tensor=None, Tensor[] rng, Tensor(i!)[] correction, Tensor(j!)[] scales) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] telemetry, *, float lr, float beta1, "
      "float beta2, float weight_decay, float decay_lr_scale, bool maximize, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[] rng, Tensor(d!)[] correction, Tensor(e!)[] scales) -> ()");
}
