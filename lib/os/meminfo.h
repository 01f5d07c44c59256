// Host memory readings for pressure monitors: /proc/meminfo and the
// process's memory cgroup (v2 memory.max/memory.current, v1
// memory.limit_in_bytes/memory.usage_in_bytes); and whether transparent
// huge pages can be had.
// Thread-safety: reentrant; reads a few small files per call.
#pragma once

#include <cstddef>
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

// A budget that fits in this process's memory cgroup: at most three
// quarters of what the cgroup can still take (its limit less its usage,
// the rest left for memory outside the budget), and `budget` itself where
// it fits or there is no limit. A budget lowered is said once on stderr,
// naming `what`, the limit, the usage and the budget used.
uint64_t FitBudgetToCgroup(uint64_t budget, const char* what) noexcept;

// The transparent huge page size where this process can have anonymous
// huge pages through MADV_HUGEPAGE and reads of empty huge-page ranges map
// the huge zero page; else 0 (THP off, no zero page, an unexpected size).
// Probed once.
uint64_t TransparentHugePageSize() noexcept;

// Anonymous memory of `len` bytes (MAP_NORESERVE, MADV_DONTFORK) starting at
// a multiple of `align` (a power of two): *map and *map_len are what to
// munmap. nullptr when it cannot be had.
std::byte* MapAligned(uint64_t len, uint64_t align, void** map, uint64_t* map_len) noexcept;

// Whether [addr, addr + len) is mapped by huge page-table entries (PMD-mapped
// THP or hugetlb), asked of /proc/self/pagemap (`pagemap_fd`) with the
// PAGEMAP_SCAN ioctl (kernel >= 6.7); 1, 0, or -errno where it cannot tell.
int HugeMapped(int pagemap_fd, const void* addr, size_t len) noexcept;

}  // namespace faultline::internal
