// Demand paging of bundle tensors: PagedBundle maps every tensor of a bundle
// into the address space so that it looks fully resident; pages arrive on
// first touch (a whole frame per fault: read, checked, decompressed,
// installed) and leave under a memory budget. data() is a plain pointer any
// code may read: a BLAS call, a loop, another thread.
// Thread-safety: every method may be called from any thread; pointers stay
// valid until the PagedBundle is destroyed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/bundle.hpp"
#include "faultline/status.hpp"

namespace faultline {

enum class PagingMode : uint8_t {
  kAuto,   // userfaultfd where allowed, guard pages otherwise
  kUffd,   // userfaultfd missing-page faults
  kGuard,  // PROT_NONE ranges and a SIGSEGV handler (systems that forbid userfaultfd)
  kMmap,   // zero-copy mapping of a raw bundle's file (page cache; no checksums on access)
};
enum class EvictionPolicy : uint8_t {
  kLru,   // least recently faulted/used frame first
  kLfu,   // least often used frame first
  kPlan,  // the frame whose next use in the execution plan is furthest away
};
const char* PagingModeName(PagingMode m) noexcept;
const char* EvictionPolicyName(EvictionPolicy p) noexcept;

inline constexpr uint64_t kDefaultBudget = 100ull * 1000 * 1000;  // 100 MB

struct PagingConfig {
  uint64_t max_resident = kDefaultBudget;  // bytes of installed frames (see README: budget)
  EvictionPolicy policy = EvictionPolicy::kLru;
  PagingMode mode = PagingMode::kAuto;
  unsigned prefetch_depth = 32;  // most frames read ahead of a sequential stream (0 = off)
  unsigned workers = 0;          // fault-service threads; 0 = cores
  // Load whole transparent huge pages of a tensor that is read sequentially
  // (or planned, pinned, hinted) and install each with one UFFDIO_MOVE
  // (userfaultfd mode, where THP is enabled and the budget holds at least
  // 4 huge pages per worker).
  bool huge_pages = true;
  // Called (from a service thread) when a frame cannot be produced; the
  // faulting thread gets SIGBUS.
  std::function<void(const Status&)> on_error;

  // The defaults overridden by FAULTLINE_BUDGET, FAULTLINE_POLICY,
  // FAULTLINE_MODE, FAULTLINE_PREFETCH, FAULTLINE_WORKERS, FAULTLINE_HUGE (ignored in setuid
  // programs; a bad value warns once on stderr and keeps the default).
  static PagingConfig FromEnvironment();
};

struct LatencySummary {
  double p50_us = 0, p90_us = 0, p99_us = 0, max_us = 0;
};

struct TensorStats {
  std::string model, tensor;
  uint64_t faults = 0, loads = 0, prefetched = 0, evictions = 0;
};

struct PagingStats {
  uint64_t faults = 0;          // fault events served (a thread touched an absent page)
  uint64_t fault_waits = 0;     // faults on a frame already being loaded
  uint64_t loads = 0;           // frames read, checked and installed
  uint64_t prefetched = 0;      // of those, installed before any thread touched them
  uint64_t evictions = 0;
  uint64_t errors = 0;          // frames that could not be produced (SIGBUS)
  uint64_t bytes_read = 0;      // stored bytes read from the bundle
  uint64_t bytes_decompressed = 0;
  uint64_t huge_installs = 0;   // huge units installed as one huge page (see README: huge units)
  uint64_t huge_recycled = 0;   // of those, moved back on eviction for the next unit to reuse
  uint64_t huge_split = 0;      // of those, mapped as small pages after all (a page table was in the way)
  uint64_t resident_bytes = 0;
  uint64_t peak_resident_bytes = 0;
  uint64_t budget_bytes = 0;    // effective budget (at least two frames per worker)
  LatencySummary fault_latency; // fault event to install
  std::vector<TensorStats> tensors;  // per-tensor counters
  std::string ToString() const;
};

class PagedBundle;
class TensorViewFactory;
void ReopenInChild(PagedBundle* b);  // internal: fork support

// A tensor as mapped: data() is valid until the PagedBundle is destroyed.
class TensorView {
 public:
  const void* data() const noexcept { return data_; }
  template <typename T>
  const T* as() const noexcept { return static_cast<const T*>(data_); }
  std::span<const std::byte> bytes() const noexcept { return {static_cast<const std::byte*>(data_), info_->size}; }
  const TensorInfo& info() const noexcept { return *info_; }
  const std::string& name() const noexcept { return info_->name; }
  DType dtype() const noexcept { return info_->dtype; }
  const std::vector<uint64_t>& shape() const noexcept { return info_->shape; }
  uint64_t size() const noexcept { return info_->size; }
  uint32_t id() const noexcept { return id_; }  // index across the bundle's tensors

 private:
  friend class TensorViewFactory;
  const void* data_ = nullptr;
  const TensorInfo* info_ = nullptr;
  uint32_t id_ = 0;
};

class ModelView {
 public:
  const ModelInfo& info() const noexcept { return *info_; }
  // The tensor named `name`; an error naming it when absent.
  Result<TensorView> tensor(std::string_view name) const;
  // Every tensor whose name starts with `prefix` ("layers.3."), in bundle order.
  std::vector<TensorView> layer(std::string_view prefix) const;
  std::vector<TensorView> tensors() const;

 private:
  friend class PagedBundle;
  const PagedBundle* bundle_ = nullptr;
  const ModelInfo* info_ = nullptr;
  uint32_t first_id_ = 0;
};

class PagedBundle {
 public:
  // Opens and maps a bundle. Errors: the reader's for a bad file; EPERM/ENOSYS
  // for an unavailable mode; EINVAL for kMmap on a compressed bundle.
  static Result<std::unique_ptr<PagedBundle>> Open(const std::string& path,
                                                   const PagingConfig& config = PagingConfig::FromEnvironment());
  // Stops the service threads, unmaps everything. Pointers become invalid;
  // a thread still touching them faults as on any unmapped memory.
  ~PagedBundle();

  const BundleInfo& info() const noexcept;
  PagingMode mode() const noexcept;  // the mode in use (kAuto resolved)
  // Whether whole huge pages of sequentially read tensors are installed at
  // once (PagingConfig::huge_pages, and the system allows it).
  bool huge_units() const noexcept;
  Result<ModelView> model(std::string_view name) const;
  // The first model (the usual single-model bundle).
  ModelView model() const;

  // Hints. Return at once; loading happens on the service threads.
  void Prefetch(const TensorView& t, uint64_t offset = 0, uint64_t length = UINT64_MAX);
  void WillNeed(const TensorView& t) { Prefetch(t); }
  // Drops the tensor's resident frames now (they come back on touch).
  void DontNeed(const TensorView& t);
  // Loads the tensor and keeps it resident (counted in the budget) until
  // Unpin. Blocks until loaded (by the service threads: the caller never
  // faults); fails with ENOSPC if pinning would leave less than two frames
  // of budget per worker for everything else, EIO if a frame is bad.
  Status Pin(const TensorView& t);
  void Unpin(const TensorView& t);
  // The execution plan: the order in which tensors are used in one pass
  // (cyclic). Drives plan-aware eviction and prefetch: while tensor k runs,
  // tensors k+1.. are loaded ahead as the budget allows.
  void SetPlan(const std::vector<TensorView>& order);
  // The same in steps: the tensors of a step are used together (one
  // operation's weight and bias, in whatever order its kernels touch
  // them), so none of them counts as finished while the step runs. With
  // one tensor per step, touching the bias makes the weight look finished,
  // and it is evicted first while the operation still reads it. Tensors
  // used one after another belong in separate steps, so that each can
  // leave once the next runs. A tensor counts in its first step only;
  // empty steps are dropped.
  void SetPlan(const std::vector<std::vector<TensorView>>& steps);
  // The same with one step per name prefix of a model's tensors (layer(p)
  // of each, as DeviceBundle::SetPlan takes them); ENOENT for a model that
  // does not exist or a prefix that matches no tensor (nothing is set).
  Status SetPlan(std::string_view model, const std::vector<std::string>& prefixes);
  // Records the plan from the order of first faults until StopRecording,
  // then installs it.
  void StartRecordingPlan();
  void StopRecordingPlan();
  // Tells the pager that the pass reached tensor `t` (advances the plan
  // cursor and prefetches what follows). Faults advance it too.
  void Advance(const TensorView& t);

  PagingStats stats() const;

  struct Impl;
  const Impl& impl() const noexcept { return *impl_; }  // internal

 private:
  PagedBundle() = default;
  friend class ModelView;
  friend void ReopenInChild(PagedBundle* b);
  std::unique_ptr<Impl> impl_;
};

// The short form: open with a budget and the environment's other options.
Result<std::unique_ptr<PagedBundle>> LoadPaged(const std::string& path, uint64_t max_resident);

}  // namespace faultline
