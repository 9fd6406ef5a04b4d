// The CUDA engine's host emulation: csrc/cuda/*.cu compiled by the host compiler with
// WDOPT_HOST_EMULATION, each file separately, and linked with this C interface, which
// tests/test_cuda_sources.py calls through ctypes to run every launcher on CPU memory against the
// reference. Built by that test, never shipped. The headers below only give the tables' capacities.
#ifndef WDOPT_HOST_EMULATION
#error "build with -DWDOPT_HOST_EMULATION=1, as the .cu files it links with (tests/test_cuda_sources.py)"
#endif
#include "optimizers.cuh"
#include "quantized.cuh"

namespace wc = wdopt::cuda;
namespace {
wc::Telemetry g_telemetry;  // applied to the next adamw/sgd/lion calls (emu_set_telemetry)
const int64_t* const* g_rng = nullptr;  // stochastic rounding of the next adamw/sgd/lion/rotational calls (emu_set_rng)
void* const* g_corrections = nullptr;   // compensated parameters of the next calls (emu_set_corrections)
int g_master_bits = 32;
float* const* g_scales = nullptr;       // 8-bit states of the next calls, rotational too (emu_set_scales)
wc::DeviceScalar scalar(const void* p, int is_double) {
  wc::DeviceScalar s;
  s.ptr = p;
  s.is_double = is_double != 0;
  return s;
}
wc::GradOptions grad(const void* gs, int gs_d, const void* fi, int fi_d, int maximize) {
  wc::GradOptions g;
  g.grad_scale = scalar(gs, gs_d);
  g.found_inf = scalar(fi, fi_d);
  g.maximize = maximize != 0;
  return g;
}
}  // namespace

extern "C" {
int emu_adamw(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** m, void** v,
              void** vmax, float** steps, const double* h, int amsgrad, int maximize, const void* lr_t, int lr_d,
              const void* gs, int gs_d, const void* fi, int fi_d, void* scratch) {
  wc::AdamWArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.exp_avgs = m; a.exp_avg_sqs = v;
  a.max_exp_avg_sqs = vmax; a.steps = steps;
  a.lr = h[0]; a.beta1 = h[1]; a.beta2 = h[2]; a.eps = h[3]; a.weight_decay = h[4]; a.decay_lr_scale = h[5];
  a.amsgrad = amsgrad != 0; a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  a.scratch = scratch;
  a.telemetry = g_telemetry;
  a.rng = g_rng;
  a.corrections = g_corrections;
  a.master_bits = g_master_bits;
  a.scales = g_scales;
  return static_cast<int>(wc::adamw(a, nullptr));
}
int emu_sgd(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** b, const float* const* first,
            const double* h, int nesterov, int decoupled, int maximize, const void* lr_t, int lr_d,
            const void* gs, int gs_d, const void* fi, int fi_d) {
  wc::SGDArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.momentum_buffers = b; a.first_steps = first;
  a.lr = h[0]; a.weight_decay = h[1]; a.momentum = h[2]; a.dampening = h[3]; a.decay_lr_scale = h[4];
  a.nesterov = nesterov != 0; a.decoupled_weight_decay = decoupled != 0;
  a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  a.telemetry = g_telemetry;
  a.rng = g_rng;
  a.corrections = g_corrections;
  a.master_bits = g_master_bits;
  a.scales = g_scales;
  return static_cast<int>(wc::sgd(a, nullptr));
}
int emu_lion(int dtype, int64_t n, const int64_t* numels, void** p, const void** g, void** m, const double* h,
             int maximize, const void* lr_t, int lr_d, const void* gs, int gs_d, const void* fi, int fi_d) {
  wc::LionArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.n_tensors = n; a.numels = numels; a.params = p; a.grads = g; a.exp_avgs = m;
  a.lr = h[0]; a.beta1 = h[1]; a.beta2 = h[2]; a.weight_decay = h[3]; a.decay_lr_scale = h[4];
  a.lr_tensor = scalar(lr_t, lr_d); a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  a.telemetry = g_telemetry;
  a.rng = g_rng;
  a.corrections = g_corrections;
  a.master_bits = g_master_bits;
  a.scales = g_scales;
  return static_cast<int>(wc::lion(a, nullptr));
}
void emu_set_telemetry(double** buffers, const int64_t* rows) {
  g_telemetry.buffers = buffers;
  g_telemetry.rows = rows;
}
void emu_set_telemetry_columns(int columns) { g_telemetry.columns = columns; }
void emu_set_rng(const int64_t* const* rng) { g_rng = rng; }
void emu_set_scales(float* const* scales) { g_scales = scales; }
int emu_quantized_table_capacity(int depth, int sr) {  // the 8-bit kernels' tables (uncompensated)
  switch (depth * 2 + (sr != 0)) {
    case 6: return wc::QuantTable<3, false, 16>::kCapacity;
    case 7: return wc::QuantTable<3, true, 16>::kCapacity;
    case 8: return wc::QuantTable<4, false, 16>::kCapacity;
    case 9: return wc::QuantTable<4, true, 16>::kCapacity;
  }
  return -1;
}
void emu_set_corrections(void* const* corrections, int master_bits) {
  g_corrections = corrections;
  g_master_bits = master_bits;
}
wc::DeviceScalar g_rate;  // applied to the next rotational calls (emu_set_rate)
void emu_set_rate(const void* rate, int is_double) { g_rate = scalar(rate, is_double); }
int emu_rotational(int dtype, int optimizer, int64_t n, const int64_t* numels, const int64_t* rows, void** p,
                   const void** g, void** s1, void** s2, float** steps, void** norms, void** avgs, float** rsteps,
                   const float* const* first, const double* h, int nesterov, int zero_mean, int projected, int maximize,
                   const void* gs, int gs_d, const void* fi, int fi_d, void* scratch, int64_t on_chip_bytes) {
  wc::RotationalArgs a;
  a.dtype = static_cast<wc::DType>(dtype);
  a.optimizer = static_cast<wc::RotationalOptimizer>(optimizer);
  a.n_tensors = n; a.numels = numels; a.rows = rows; a.params = p; a.grads = g; a.state1 = s1; a.state2 = s2;
  a.steps = steps; a.rotational_norms = norms; a.update_norm_avgs = avgs; a.rotational_steps = rsteps;
  a.first_steps = first;
  a.lr = h[0]; a.beta1 = h[1]; a.beta2 = h[2]; a.eps = h[3]; a.momentum = h[4]; a.angle = h[5]; a.norm_decay = h[6];
  a.rotational_eps = h[7];
  a.nesterov = nesterov != 0; a.zero_mean = zero_mean != 0; a.projected = projected != 0;
  a.rate = g_rate;
  a.rng = g_rng;
  a.corrections = g_corrections;
  a.master_bits = g_master_bits;
  a.scales = g_scales;
  a.grad = grad(gs, gs_d, fi, fi_d, maximize);
  a.telemetry = g_telemetry;
  a.scratch = scratch;
  a.on_chip_bytes = on_chip_bytes;
  return static_cast<int>(wc::rotational(a, nullptr));
}
int64_t emu_rotational_scratch_bytes(int64_t n) { return static_cast<int64_t>(wc::rotational_scratch_bytes(n)); }
int64_t emu_scratch_bytes(int64_t n) { return static_cast<int64_t>(wc::adamw_scratch_bytes(n)); }
int64_t emu_launches() { return wc::launch_count(); }
int emu_table_capacity(int depth) {
  switch (depth) {
    case 2: return wc::UpdateTable<2>::kCapacity;
    case 3: return wc::UpdateTable<3>::kCapacity;
    case 4: return wc::UpdateTable<4>::kCapacity;
    case 5: return wc::UpdateTable<5>::kCapacity;
  }
  return -1;
}
int emu_rounding_table_capacity(int depth) {  // the stochastic-rounding kernels' tables
  switch (depth) {
    case 2: return wc::UpdateTable<2, true>::kCapacity;
    case 3: return wc::UpdateTable<3, true>::kCapacity;
    case 4: return wc::UpdateTable<4, true>::kCapacity;
    case 5: return wc::UpdateTable<5, true>::kCapacity;
  }
  return -1;
}
int emu_compensated_table_capacity(int depth, int sr) {  // the compensated kernels' tables (24 or 32 alike)
  switch (depth * 2 + (sr != 0)) {
    case 6: return wc::UpdateTable<3, false, 32>::kCapacity;
    case 7: return wc::UpdateTable<3, true, 32>::kCapacity;
    case 8: return wc::UpdateTable<4, false, 32>::kCapacity;
    case 9: return wc::UpdateTable<4, true, 32>::kCapacity;
  }
  return -1;
}
int emu_step_capacity() { return wc::StepTable::kCapacity; }
}
