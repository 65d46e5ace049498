// The probe each CPU kernel registers as splitspec::<kernel>_threads.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace splitspec_kernels {

// The threads at::parallel_for runs a kernel's loops on with torch's current setting: 1 where the
// build lacked OpenMP (at::parallel_for is inline, and its loop then runs on the calling thread).
inline int64_t parallel_threads() {
  std::atomic<int64_t> most{1};
  at::parallel_for(0, 4 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t used = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (used > seen && !most.compare_exchange_weak(seen, used)) {
    }
  });
  return most.load();
}

}  // namespace splitspec_kernels
