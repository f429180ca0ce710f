// The calling thread's limit on ATen's intra-op threads, so that a short CPU pass over a
// moderate N runs where it is called instead of waking ATen's OpenMP pool (whose workers
// then spin-wait for milliseconds, taking cores from data-loader threads).
//
// With ATen's OpenMP backend, at::get_num_threads() is omp_get_max_threads(), a per-thread
// OpenMP setting: changing it here changes nothing for other threads, nor the pool's size.
// Without OpenMP (another ATen backend, or an extension built without -fopenmp) this only
// reports the current value.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

namespace fastsel {

int64_t set_local_num_threads(int64_t n) {
  TORCH_CHECK(n >= 1, "fastsel._C.set_local_num_threads: n must be >= 1, got ", n);
  const int64_t previous = at::get_num_threads();  // also sets ATen up on this thread first
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(n));
#endif
  return previous;
}

}  // namespace fastsel
