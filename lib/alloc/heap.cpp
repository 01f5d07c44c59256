// The process-wide heap, the public allocation API, ManagedRegion and the
// allocator's options and statistics text; see heap.h and faultline/alloc.hpp.
#include "alloc/heap.h"

#include <malloc.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#include "alloc/guard.h"
#include "core/status_macros.h"
#include "faultline/size.hpp"
#include "os/meminfo.h"
#include "pager/options.h"

namespace faultline {

using internal::OptionId;

AllocConfig AllocConfig::FromEnvironment() {
  internal::ScopedInternal inside;
  AllocConfig c;
  {
    // The default first, so that a bad FAULTLINE_BUDGET's warning names it.
    internal::HostMemory m;
    if (internal::ReadHostMemory(&m)) c.budget = (m.cgroup_limit ? m.cgroup_limit : m.total) / 2;
    if (c.budget == 0) c.budget = 1ull << 30;
  }
  internal::OptionSize(OptionId::kBudget, &c.budget);
  internal::OptionSize(OptionId::kThreshold, &c.threshold);
  if (const char* v = internal::OptionValue(OptionId::kSpillDir)) c.spill_dir = v;
  internal::OptionFlag(OptionId::kHuge, &c.huge_units);
  if (const char* v = internal::OptionValue(OptionId::kSpillCodec)) {
    int level = -1;
    if (!strcmp(v, "raw")) level = 0;
    else if (!strcmp(v, "zstd")) level = 1;
    else {
      const char* n = !strncmp(v, "zstd:", 5) ? v + 5 : v;
      char* end = nullptr;
      long l = strtol(n, &end, 10);
      if (end != n && *end == '\0' && l >= 1 && l <= 19) level = static_cast<int>(l);
    }
    if (level >= 0) c.zstd_level = level;
    else internal::WarnBadOption(OptionId::kSpillCodec, v, "raw, zstd or zstd:1..19");
  }
  return c;
}

std::string AllocStats::ToString() const {
  internal::ScopedInternal inside;
  std::ostringstream o;
  o << "faultline managed memory stats:\n"
    << "  allocations " << allocations << ", frees " << frees << ", managed " << FormatSize(bytes_managed)
    << " (peak " << FormatSize(peak_bytes_managed) << ")\n"
    << "  resident " << FormatSize(resident_bytes) << ", peak " << FormatSize(peak_resident_bytes) << ", budget "
    << FormatSize(budget_bytes) << "\n"
    << "  chunks zero-filled " << zero_fills << ", spilled " << spills << ", dropped clean " << clean_drops
    << ", dropped zero " << zero_drops << ", read back " << loads << " (" << prefetched << " ahead of a fault, "
    << unit_loads << " 2 MiB units, " << unit_moves << " moved in huge, " << unit_recycled << " recycled)"
    << ", first writes " << write_faults
    << ", errors " << errors << "\n"
    << "  spilled " << FormatSize(bytes_spilled) << " as " << FormatSize(bytes_stored) << " (ratio "
    << compression_ratio() << "), spill file " << FormatSize(spill_file_bytes) << "\n";
  return o.str();
}

namespace internal {

std::atomic<AllocEngine*> g_running_heap{nullptr};
uint64_t g_heap_threshold = UINT64_MAX;

namespace {

std::mutex g_heap_mu;
std::atomic<AllocEngine*>& g_heap = g_running_heap;
std::atomic<bool> g_heap_tried{false};

void PrintHeapStats() {
  if (AllocEngine* h = g_heap.load()) fputs(h->stats().ToString().c_str(), stderr);
}

__attribute__((constructor(101))) void ReadThreshold() {
  uint64_t v = 1 << 20;
  OptionSize(OptionId::kThreshold, &v);
  g_heap_threshold = v;
}

}  // namespace

AllocEngine* TheHeap() noexcept {
  if (AllocEngine* h = g_heap.load(std::memory_order_acquire)) return h;
  if (g_heap_tried.load(std::memory_order_acquire)) return nullptr;
  ScopedInternal inside;
  std::lock_guard lk(g_heap_mu);
  if (g_heap_tried.load()) return g_heap.load();
  AllocConfig c = AllocConfig::FromEnvironment();
  auto e = AllocEngine::Create(c);
  bool verbose = OptionFlag(OptionId::kVerbose);
  if (e.ok()) {
    g_heap.store(e->release(), std::memory_order_release);  // lives until exit
    if (verbose)
      fprintf(stderr,
              "faultline: managed memory on: budget %s, threshold %s, spill codec %s, system calls on spilled "
              "memory %s\n",
              FormatSize(c.budget).c_str(), FormatSize(c.threshold).c_str(), c.zstd_level ? "zstd" : "raw",
              g_heap.load()->KernelFaults()
                  ? "served (kernel-mode faults)"
                  : "served by the shim's wrappers (user-mode faults only; other calls get EFAULT)");
    if (OptionFlag(OptionId::kShowStats)) atexit(PrintHeapStats);
  } else {
    // Said once whether verbose or not: a program under the shim that gets
    // no managed memory should not find out by running out of memory.
    fprintf(stderr, "faultline: managed memory is off (%s); allocations go to the system allocator\n",
            e.status().message());
  }
  g_heap_tried.store(true, std::memory_order_release);
  return g_heap.load();
}

}  // namespace internal

void* Allocate(size_t size, size_t alignment) noexcept {
  if (alignment < alignof(std::max_align_t)) alignment = alignof(std::max_align_t);
  if (size >= internal::HeapThreshold())
    if (internal::AllocEngine* h = internal::TheHeap()) return h->Allocate(size, alignment);
  void* p = nullptr;
  int rc = posix_memalign(&p, alignment, size ? size : 1);
  if (rc) {
    errno = rc;
    return nullptr;
  }
  return p;
}

void Free(void* p) noexcept {
  if (!p) return;
  internal::AllocEngine* h = internal::RunningHeap();
  if (h && h->Owns(p)) h->Free(p);
  else free(p);
}

void* Reallocate(void* p, size_t size) noexcept {
  if (!p) return Allocate(size);
  internal::AllocEngine* h = internal::RunningHeap();
  if (h && h->Owns(p)) return h->Reallocate(p, size);
  if (size >= internal::HeapThreshold()) {
    if (internal::AllocEngine* heap = internal::TheHeap()) {
      // Into managed memory: the old block came from the system allocator.
      size_t old = malloc_usable_size(p);
      void* n = heap->Allocate(size, alignof(std::max_align_t));
      if (!n) return nullptr;
      memcpy(n, p, old < size ? old : size);
      free(p);
      return n;
    }
  }
  return realloc(p, size);
}

int Advise(void* p, size_t len, int advice) noexcept {
  internal::AllocEngine* h = internal::RunningHeap();
  if (h && len && (h->Owns(p) || h->Owns(static_cast<char*>(p) + len - 1))) return h->Advise(p, len, advice);
  return internal::RawMadvise(p, len, advice);
}

bool HeapManaged() noexcept { return internal::TheHeap() != nullptr; }

AllocStats HeapStats() noexcept {
  internal::AllocEngine* h = internal::RunningHeap();
  return h ? h->stats() : AllocStats{};
}

Result<std::unique_ptr<ManagedRegion>> ManagedRegion::Create(size_t size, const AllocConfig& config) {
  if (size == 0) return Status::Error(EINVAL, "a managed region needs a size");
  if (size > (uint64_t{1} << 56))  // 64 PiB: more than any x86-64 address space (and no overflow below)
    return Status::Error(ENOMEM, "a managed region of %zu bytes does not fit in the address space", size);
  AllocConfig c = config;
  // Its block, and address space to start it on a 2 MiB boundary (whole-unit loads).
  c.arena = (size + 2 * kManagedChunk - 1) / kManagedChunk * kManagedChunk + kManagedChunk + (2u << 20);
  if (c.budget == 0) c.budget = AllocConfig::FromEnvironment().budget;
  FL_ASSIGN_OR_RETURN(auto engine, internal::AllocEngine::Create(c));
  void* p = engine->Allocate(size, kManagedChunk);
  if (!p)
    return Status::Error(ENOMEM,
                         "cannot map a managed region of %zu bytes: the spill directory has no room for what "
                         "exceeds the budget, or the address space is exhausted",
                         size);
  std::unique_ptr<ManagedRegion> r(new ManagedRegion());
  r->engine_ = std::move(engine);
  r->data_ = p;
  r->size_ = size;
  return r;
}

ManagedRegion::~ManagedRegion() = default;

AllocStats ManagedRegion::stats() const { return engine_->stats(); }

static Status CheckRange(size_t offset, size_t len, size_t size) {
  if (offset > size || len > size - offset)
    return Status::Error(EINVAL, "bytes [%zu, +%zu) are not inside the managed region of %zu bytes", offset, len,
                         size);
  return Status::Ok();
}

Result<RangeUsage> ManagedRegion::Usage(size_t offset, size_t len) const {
  FL_RETURN_IF_ERROR(CheckRange(offset, len, size_));
  return engine_->Usage(static_cast<const char*>(data_) + offset, len);
}

Status ManagedRegion::Prefetch(size_t offset, size_t len) {
  FL_RETURN_IF_ERROR(CheckRange(offset, len, size_));
  engine_->Advise(static_cast<char*>(data_) + offset, len, MADV_WILLNEED);
  return Status::Ok();
}

Status ManagedRegion::Evict(size_t offset, size_t len) {
  FL_RETURN_IF_ERROR(CheckRange(offset, len, size_));
  if (engine_->Advise(static_cast<char*>(data_) + offset, len, MADV_PAGEOUT) != 0)
    return Status::Error(ENOSPC, "some of bytes [%zu, +%zu) could not be spilled (the spill file has no room): they stay resident",
                         offset, len);
  return Status::Ok();
}

}  // namespace faultline
