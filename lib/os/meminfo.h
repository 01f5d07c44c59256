// Host memory readings for pressure monitors: /proc/meminfo and the
// process's memory cgroup (v2 memory.max/memory.current, v1
// memory.limit_in_bytes/memory.usage_in_bytes).
// Thread-safety: reentrant; reads a few small files per call.
#pragma once

#include <cstdint>

namespace faultline::internal {

struct HostMemory {
  uint64_t total = 0;         // MemTotal
  uint64_t available = 0;     // MemAvailable
  uint64_t cgroup_limit = 0;  // 0 = none (or unreadable)
  uint64_t cgroup_usage = 0;
  // The higher of 1 - available/total and usage/limit, in [0, 1].
  double Pressure() const noexcept;
  // The memory the pressure is a fraction of (the cgroup limit when that
  // is the tighter one, else MemTotal).
  uint64_t Basis() const noexcept;
};

// False when /proc/meminfo cannot be read.
bool ReadHostMemory(HostMemory* out) noexcept;

}  // namespace faultline::internal
