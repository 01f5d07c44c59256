// Managed memory: anonymous, writable memory under a resident budget. Cold
// 64 KiB chunks are compressed with zstd and spilled to an unlinked file
// through io_uring, and come back on touch (userfaultfd missing-page faults);
// writes are tracked with userfaultfd write-protection, so a chunk that
// still has a copy on disk is dropped without writing. The same engine
// serves LD_PRELOAD=libfaultline-preload.so (README: the allocator).
//
// Three ways in:
//  - faultline::Allocate/Free/Reallocate (and faultline_alloc/free/realloc in
//    the C ABI): the process-wide heap configured from the environment;
//  - ManagedAllocator<T>: that heap for std containers;
//  - ManagedRegion: one buffer with a budget of its own.
// Thread-safety: everything may be called from any thread; managed memory
// may be touched by any number of threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

#include "faultline/status.hpp"

namespace faultline {

inline constexpr size_t kManagedChunk = 64 << 10;  // unit of residency, spill and dirty tracking

struct AllocConfig {
  uint64_t budget = 0;           // resident bytes; 0 = half the memory (MemTotal or the cgroup limit)
  uint64_t threshold = 1 << 20;  // the heap manages allocations of at least this size
  std::string spill_dir;         // "" = $TMPDIR, else /var/tmp
  int zstd_level = 1;            // 0 = store raw
  uint64_t arena = 1ull << 40;   // address space reserved for the heap's blocks
  unsigned workers = 2;          // fault-service threads
  // Sequential read-back in whole 2 MiB units (blocks of 2 MiB or more,
  // budgets of 64 MiB or more, UFFDIO_MOVE and transparent huge pages
  // available): a unit whose chunks are all on disk is read at once into a
  // huge page and moved in as one page-table entry.
  bool huge_units = true;

  // Defaults overridden by FAULTLINE_BUDGET, FAULTLINE_THRESHOLD,
  // FAULTLINE_SPILL_DIR, FAULTLINE_SPILL_CODEC, FAULTLINE_HUGE (ignored in setuid programs;
  // a bad value warns once and keeps the default).
  static AllocConfig FromEnvironment();
};

struct AllocStats {
  uint64_t allocations = 0, frees = 0;       // managed blocks
  uint64_t bytes_managed = 0, peak_bytes_managed = 0;
  uint64_t resident_bytes = 0, peak_resident_bytes = 0, budget_bytes = 0;
  uint64_t zero_fills = 0;        // chunks first touched (zero pages, nothing read)
  uint64_t spills = 0;            // dirty chunks compressed and written
  uint64_t clean_drops = 0;       // chunks dropped that still had their copy on disk
  uint64_t zero_drops = 0;        // chunks dropped that were all zeros (nothing written)
  uint64_t loads = 0;             // chunks read back from disk, on a fault or ahead of one (counted as the read starts)
  uint64_t prefetched = 0;        // of those, read back ahead of a fault (MADV_WILLNEED, Prefetch, readahead)
  uint64_t unit_loads = 0;        // 2 MiB units read back at once (AllocConfig::huge_units; their chunks count in loads)
  uint64_t unit_moves = 0;        // of those, installed as one huge page by one UFFDIO_MOVE (the rest by one copy)
  uint64_t unit_recycled = 0;     // of those, read into the huge page of a unit dropped whole (none allocated)
  uint64_t write_faults = 0;      // first writes to clean chunks
  uint64_t errors = 0;            // spill reads or writes that failed
  uint64_t bytes_spilled = 0, bytes_stored = 0;  // before and after compression
  uint64_t spill_file_bytes = 0;  // size of the spill file(s) now
  double compression_ratio() const noexcept {
    return bytes_stored ? static_cast<double>(bytes_spilled) / static_cast<double>(bytes_stored) : 0;
  }
  std::string ToString() const;
};

// What a byte range of managed memory holds now (ManagedRegion::Usage):
// resident + spilled + zero = the range's length. Chunks are counted by
// the bytes of them inside the range; faults and evictions by the chunks
// that overlap it.
struct RangeUsage {
  uint64_t resident_bytes = 0;  // in memory and in the budget (written, clean, or being read in)
  uint64_t spilled_bytes = 0;   // on disk only, or being written there (out of the budget)
  uint64_t stored_bytes = 0;    // what those take in the spill file (after compression)
  uint64_t zero_bytes = 0;      // never written, or dropped as all zeros: neither memory nor disk
  uint64_t faults = 0;          // first touches and loads back from disk on a fault (not prefetches)
  uint64_t evictions = 0;       // chunks written out or dropped
};

// The process-wide heap (created on first use from AllocConfig::
// FromEnvironment()). Sizes below the threshold, and every size where
// userfaultfd is not allowed, come from the system allocator. nullptr (and
// errno = ENOMEM) when the memory cannot be had, including when the spill
// directory has no room for what the budget could push out.
void* Allocate(size_t size, size_t alignment = alignof(std::max_align_t)) noexcept;
void Free(void* p) noexcept;
void* Reallocate(void* p, size_t size) noexcept;
// madvise(2) for heap memory (the shim routes madvise here): on managed
// blocks MADV_WILLNEED reads spilled chunks back in the background,
// MADV_PAGEOUT spills now, MADV_COLD puts chunks first in line to go,
// MADV_DONTNEED/MADV_FREE zero them, huge-page advice is ignored; anything
// else, and every other address, goes to the kernel. -1 and errno as
// madvise. (The kernel's own madvise on a managed block would take its
// pages behind the engine's back: use this.)
int Advise(void* p, size_t len, int advice) noexcept;
// Whether the heap is running (userfaultfd allowed), and its statistics.
bool HeapManaged() noexcept;
AllocStats HeapStats() noexcept;

template <typename T>
struct ManagedAllocator {
  using value_type = T;
  ManagedAllocator() noexcept = default;
  template <typename U>
  ManagedAllocator(const ManagedAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    void* p = Allocate(n * sizeof(T), alignof(T) > alignof(std::max_align_t) ? alignof(T) : alignof(std::max_align_t));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { Free(p); }
  template <typename U>
  bool operator==(const ManagedAllocator<U>&) const noexcept { return true; }
};

namespace internal {
class AllocEngine;
}

// One buffer of `size` bytes (zeros until written) with a budget of its own.
class ManagedRegion {
 public:
  // Errors: EPERM/ENOSYS where userfaultfd is not allowed, ENOTSUP without
  // write-protect support, ENOMEM, and the spill file's.
  static Result<std::unique_ptr<ManagedRegion>> Create(size_t size, const AllocConfig& config);
  ~ManagedRegion();
  void* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  AllocStats stats() const;
  // Where [offset, offset + len) of the region is now. EINVAL when the
  // range is not inside the region (also for Prefetch and Evict).
  Result<RangeUsage> Usage(size_t offset, size_t len) const;
  // Hints, by the 64 KiB chunks the range touches. Prefetch queues its
  // spilled chunks to be read back by a background thread and returns at
  // once (at most the budget's worth or 256 MiB is queued; older requests
  // give way);
  // a fault on a chunk being read waits for that read. Evict spills its
  // resident chunks now (a chunk with its copy on disk is just dropped);
  // ENOSPC when a spill write failed (that chunk stays resident). The same
  // as madvise(MADV_WILLNEED / MADV_PAGEOUT) on managed memory.
  Status Prefetch(size_t offset, size_t len);
  Status Evict(size_t offset, size_t len);
  internal::AllocEngine& engine() noexcept { return *engine_; }  // internal (tests)

 private:
  ManagedRegion() = default;
  std::unique_ptr<internal::AllocEngine> engine_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace faultline
