// Shared helpers for the benchmarks: weight-like data, temporary paths,
// seconds between time points, and percentiles of a sample.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/synthetic_weights.h"
#include "faultline/dtype.hpp"

namespace faultline::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Weight-like data: f32 or bf16 values of a narrow Gaussian.
inline std::vector<std::byte> Weights(size_t bytes, DType dtype, uint64_t seed = 88172645463325252ull) {
  std::vector<std::byte> out(bytes);
  internal::FillSyntheticWeights(out.data(), bytes, dtype, seed);
  return out;
}

inline std::string TempPath(const char* name) {
  const char* t = getenv("TMPDIR");
  return std::string(t && *t ? t : "/tmp") + "/faultline-bench-" + std::to_string(getpid()) + "-" + name;
}

// The q-quantile (0..1) of `v` (sorted in place).
inline double Quantile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  return v[i];
}

}  // namespace faultline::bench
