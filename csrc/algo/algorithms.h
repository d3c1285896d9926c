// Every algorithm the bucket step runs, and the one place that turns the ops' `algorithm`
// argument into its type (bucket_step_cpu.cpp, bucket_step_cuda.cu, bindings.cpp's checks).
#pragma once

#include <cstdint>

#include "lamb.h"
#include "lars.h"

namespace tvlars {

inline bool known_algorithm(int64_t algorithm) { return algorithm == ALGO_LARS || algorithm == ALGO_LAMB; }

// f(Algo{}) for the algorithm with this id (checked by check_bucket_args before any kernel runs)
template <typename F>
decltype(auto) with_algorithm(int64_t algorithm, F&& f) {
  if (algorithm == ALGO_LAMB) return f(Lamb{});
  return f(Lars{});
}

inline int64_t state_slots(int64_t algorithm) {
  return with_algorithm(algorithm, [](auto algo) -> int64_t { return decltype(algo)::SLOTS; });
}

}  // namespace tvlars
