// Paging statistics: relaxed atomic counters declared once (an X-macro
// list), a lock-free latency histogram, and per-tensor counters.
// Thread-safety: every member may be updated from any thread (fault path).
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "faultline/paging.hpp"

namespace faultline::internal {

#define FAULTLINE_PAGING_COUNTERS(X) \
  X(faults)                          \
  X(fault_waits)                     \
  X(loads)                           \
  X(prefetched)                      \
  X(evictions)                       \
  X(errors)                          \
  X(bytes_read)                      \
  X(bytes_decompressed)              \
  X(huge_installs)                   \
  X(huge_recycled)                   \
  X(huge_split)

struct PagerCounters {
#define FL_DECLARE(name) std::atomic<uint64_t> name{0};
  FAULTLINE_PAGING_COUNTERS(FL_DECLARE)
#undef FL_DECLARE
};

struct TensorCounters {
  std::atomic<uint64_t> faults{0}, loads{0}, prefetched{0}, evictions{0};
};

// Latencies in buckets of a quarter power of two of nanoseconds.
class LatencyHistogram {
 public:
  static constexpr int kBuckets = 4 * 40;
  void Add(uint64_t ns) noexcept {  // fault path
    int b = ns < 2 ? 0 : static_cast<int>(4.0 * std::log2(static_cast<double>(ns)));
    if (b >= kBuckets) b = kBuckets - 1;
    buckets_[b].fetch_add(1, std::memory_order_relaxed);
    uint64_t m = max_.load(std::memory_order_relaxed);
    while (ns > m && !max_.compare_exchange_weak(m, ns, std::memory_order_relaxed)) {
    }
  }
  LatencySummary Summary() const {
    uint64_t counts[kBuckets], total = 0;
    for (int i = 0; i < kBuckets; i++) total += counts[i] = buckets_[i].load(std::memory_order_relaxed);
    LatencySummary s;
    if (total == 0) return s;
    auto at = [&](double q) {
      uint64_t want = static_cast<uint64_t>(std::ceil(q * static_cast<double>(total))), seen = 0;
      for (int i = 0; i < kBuckets; i++) {
        seen += counts[i];
        if (seen >= want) return std::exp2((i + 1) / 4.0) / 1000.0;  // bucket's upper bound, µs
      }
      return 0.0;
    };
    s.p50_us = at(0.50);
    s.p90_us = at(0.90);
    s.p99_us = at(0.99);
    s.max_us = static_cast<double>(max_.load(std::memory_order_relaxed)) / 1000.0;
    return s;
  }

 private:
  std::atomic<uint64_t> buckets_[kBuckets] = {};
  std::atomic<uint64_t> max_{0};
};

}  // namespace faultline::internal
