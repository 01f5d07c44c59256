// The runtime option table: every FAULTLINE_* variable with its type,
// default and help, read from the environment without allocating, ignored
// in setuid programs (AT_SECURE), a bad value warned about once on stderr.
// Thread-safety: reads are reentrant; the warn-once flags are atomic.
#pragma once

#include <cstdint>

namespace faultline::internal {

enum class OptionId : int {
  kBudget, kPolicy, kMode, kPrefetch, kWorkers, kHuge, kShowStats, kVerbose,
  // The GPU tier (include/faultline/cuda.hpp).
  kGpuBudget, kGpuHostBudget, kGpuLookahead, kGpuEvict, kGpuReadMostly, kGpuMonitor,
  kGpuOffload, kGpuEmergency, kGpuReload, kGpuDirect, kGpuMemory,
  // The allocator (include/faultline/alloc.hpp, the LD_PRELOAD shim).
  kThreshold, kSpillDir, kSpillCodec,
  // Reading bundles (include/faultline/bundle.hpp: ReaderOptions).
  kMaxExpansion, kMaxSize,
  // userfaultfd (lib/os/uffd.cpp).
  kKernelFaults,
  kCount
};

struct OptionSpec {
  const char* name;
  const char* type;
  const char* default_text;
  const char* help;
};

const OptionSpec& Option(OptionId id) noexcept;
// The raw value, or nullptr when unset or when the environment is ignored.
const char* OptionValue(OptionId id) noexcept;
// Warns once per option: "faultline: FAULTLINE_X=value is not <what>; using
// <used>" (the option's default text where `used` is nullptr).
void WarnBadOption(OptionId id, const char* value, const char* what, const char* used = nullptr) noexcept;
// A flag option: "1", "true", "yes" or "on" (false when unset or bad).
bool OptionFlag(OptionId id) noexcept;
// Typed readers: leave *out alone when unset; warn and leave it when bad.
void OptionFlag(OptionId id, bool* out) noexcept;
void OptionUnsigned(OptionId id, unsigned max, unsigned* out) noexcept;
void OptionSize(OptionId id, uint64_t* out) noexcept;  // > 0, K/M/G suffixes; a warning names *out
void OptionFraction(OptionId id, double* out) noexcept;  // in (0, 1]

}  // namespace faultline::internal
