// Per-step arrays of the CPU kernels (one entry per tensor or per row) in memory that stays
// mapped from one step to the next.
//
// Allocated afresh at every step, 10,000 tensors' AdamW coefficients (280 KB) cost 1.4 ms a step on
// the 2-core CPU machine, four times the update itself: glibc hands a block that large back to the
// system when it is freed (and a multi-threaded process then pays for every thread's TLB), and each
// 4 KB page faults again on first touch. A scratch array is one per thread, element type and
// ``Use``, grown when needed and never shrunk. Arrays of one element type held at the same time
// (in any file: the template is one entity) take different ``Use`` numbers.
#pragma once

#include <cstddef>
#include <vector>

namespace wdopt::cpu {

template <typename T, int Use = 0>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace wdopt::cpu
