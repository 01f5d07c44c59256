// The paging engine behind PagedBundle. One reserved address range holds
// every tensor (each at a multiple of its page size); a frame is the unit of
// faulting, loading and eviction. Service workers take fault events
// (userfaultfd messages, or guard-mode requests from the SIGSEGV handler)
// and prefetch requests, read frames with io_uring, check and decompress
// them, and install them: UFFDIO_MOVE from a pool of staging slots that
// evicted pages return to, UFFDIO_COPY where MOVE is missing, or mprotect
// over a memfd alias in guard mode.
//
// Huge units: a tensor of at least one transparent huge page (2 MiB on
// x86-64) starts at a huge-page boundary, and every aligned huge page that
// its frames cover fully is a unit. A sequential stream, a plan step, a pin
// or a hint that covers a whole unit loads the unit's frames together,
// decoded into a per-worker huge-page slot and installed by one UFFDIO_MOVE
// of the whole huge page (one page-table entry, one TLB flush); such frames
// are marked `huge` and are evicted together: a unit mapped by one huge
// page-table entry (`pmd`, asked of /proc/self/pagemap) is moved back by one
// UFFDIO_MOVE into a small recycle pool, whose huge pages the next unit
// loads decode into (no page is freed, allocated or zeroed on the way);
// otherwise one MADV_DONTNEED drops it. Random faults stay frame-sized.
//
// Locking: mu_ guards policy state (resident list, plan, slot lists); only
// service workers and hint calls take it, never an application thread in a
// fault (uffd: the thread sleeps in the kernel; guard: the handler only
// writes a pipe and waits on the frame's futex). Frame::state is atomic and
// is the futex word.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "bundle/reader_impl.h"
#include "faultline/paging.hpp"
#include "io/file.h"
#include "os/move_pool.h"
#include "os/uffd.h"
#include "pager/stats.h"

namespace faultline::internal {

enum FrameState : uint32_t { kAbsent = 0, kLoading, kResident, kEvicting, kError, kClosed };

struct Frame {
  std::atomic<uint32_t> state{kAbsent};
  uint32_t tensor = 0;
  uint32_t index = 0;       // frame index within its tensor
  // Guarded by Engine::mu_.
  uint64_t last_use = 0;
  uint32_t uses = 0;
  uint32_t pins = 0;
  int64_t resident_pos = -1;  // position in Engine::resident_
  int64_t lru_prev = -1, lru_next = -1;  // Engine's LRU list of resident frames
  bool prefetch = false;      // being loaded by prefetch
  bool huge = false;          // resident as part of a whole huge unit: evicted with it
  bool pmd = false;           // and that unit is mapped by one huge page-table entry
};

struct TensorSlot {
  const TensorInfo* info = nullptr;
  const ModelInfo* model = nullptr;
  std::byte* base = nullptr;  // in the application's view
  uint64_t offset = 0;        // from the start of the reservation
  uint32_t page = 0;
  uint64_t first_frame = 0;   // global frame id of its frame 0
  uint64_t frames = 0;
  uint32_t unit_frames = 0;   // frames per huge unit (0: the tensor has no unit)
  uint64_t units = 0;         // whole units, from frame 0
  int64_t plan_pos = -1;     // its plan step, or -1
  // Readahead state, guarded by mu_.
  int64_t last_fault = -2;
  uint32_t window = 0;
  uint64_t ra_end = 0;        // frames before this were queued or claimed by readahead
  uint64_t run_start = 0;
  TensorCounters counters;
};

// A bounded FIFO of frame ids in a buffer allocated once, so that queueing
// readahead on the fault path never allocates. Guarded by Engine::mu_.
class FrameQueue {
 public:
  explicit FrameQueue(size_t capacity) : ring_(capacity) {}
  bool empty() const noexcept { return count_ == 0; }
  // False (and nothing queued) when full.
  bool Push(uint64_t f) noexcept {
    if (count_ == ring_.size()) return false;
    ring_[(head_ + count_++) % ring_.size()] = f;
    return true;
  }
  uint64_t Pop() noexcept {
    uint64_t f = ring_[head_];
    head_ = (head_ + 1) % ring_.size();
    count_--;
    return f;
  }

 private:
  std::vector<uint64_t> ring_;
  size_t head_ = 0, count_ = 0;
};

class Engine {
 public:
  Engine(std::unique_ptr<BundleReader> reader, const PagingConfig& config);
  ~Engine();
  Status Start();
  // In a forked child: maps the tensors at the addresses `parent` used (its
  // range was not inherited), so pointers taken before the fork work in the
  // child. Call before Start().
  void TakeAddressesOf(const Engine& parent) noexcept {
    fixed_reserve_ = parent.reserve_;
    fixed_reserve_len_ = parent.reserve_map_len_;
  }
  const PagingConfig& config() const { return config_; }

  const BundleInfo& info() const { return reader_->info(); }
  PagingMode mode() const { return mode_; }
  // Whether a system call that touches a missing page waits for it (true)
  // or fails with EFAULT: userfaultfd without UFFD_USER_MODE_ONLY; guard
  // mode and a user-mode-only descriptor cannot serve those faults.
  bool KernelFaults() const { return uffd_ && uffd_->features().kernel_faults; }
  // Whether whole huge pages are installed by UFFDIO_MOVE (see above).
  bool HugeUnits() const { return units_.load(std::memory_order_relaxed); }
  std::byte* TensorBase(uint32_t t) const { return tensors_[t].base; }
  uint32_t TensorCount() const { return static_cast<uint32_t>(tensors_.size()); }
  uint32_t FirstTensorOf(const ModelInfo* m) const;

  void Prefetch(uint32_t t, uint64_t offset, uint64_t length);
  void DontNeed(uint32_t t);
  Status Pin(uint32_t t);
  void Unpin(uint32_t t);
  // Steps of tensors used together (a layer's weight and bias), in the order
  // of one pass; a tensor counts in its first step only.
  void SetPlan(const std::vector<std::vector<uint32_t>>& steps);
  void StartRecording();
  void StopRecording();
  void Advance(uint32_t t);
  PagingStats Stats() const;

  // Guard mode: the SIGSEGV handler's view.
  // The global frame id holding `addr`, or -1 (outside every tensor). fault path
  int64_t FrameAt(const void* addr) const noexcept;
  bool Owns(const void* addr) const noexcept {
    auto a = reinterpret_cast<uintptr_t>(addr), b = reinterpret_cast<uintptr_t>(view_);
    return a >= b && a < b + reserve_len_;
  }
  // Serves a guard-mode fault: kRetry once the page can be touched again,
  // kSigbus when its frame cannot be read (the handler raises SIGBUS after
  // it stops counting itself in: the program's SIGBUS handler may never
  // return), kNotOurs when `addr` is in no tensor (any other SIGSEGV).
  // fault path, in a signal handler
  enum class GuardResult { kRetry, kSigbus, kNotOurs };
  GuardResult GuardFault(const void* addr) noexcept;

 private:
  struct Load {
    uint64_t frame;
    bool prefetch;
    int32_t slot;
    std::byte* staging;
    uint64_t start_ns;
    bool unit = false;        // one of the frames of the worker's huge unit
  };
  struct Worker;

  Status SetUpUffd();
  Status SetUpGuard();
  Status SetUpMmap();
  void SetUpRecycle(unsigned workers);
  void WorkerLoop(Worker* w);
  void HandleFaultAddress(Worker* w, uintptr_t addr, uint32_t ptid, std::vector<Load>& loads);
  void Claim(Worker* w, uint64_t f, std::vector<Load>& loads);
  void ClaimReservedLocked(Worker* w, uint64_t f, bool prefetch, std::vector<Load>& loads);
  bool ClaimUnitLocked(Worker* w, uint64_t f, bool owned, bool optional, std::vector<Load>& loads);
  void RunLoads(Worker* w, std::vector<Load>& loads);
  void InstallUnit(Worker* w, std::vector<Load>& loads);
  std::byte* UnitSource(const Worker* w) const;
  bool MapUnitSlot(Worker* w);
  void CountLoad(const Load& l);
  int CopyRest(std::byte* dst, const std::byte* src, uint64_t len, uint64_t done);
  bool ReserveLocked(uint64_t f, uint64_t bytes, bool optional);
  int64_t PickVictimLocked(uint64_t for_frame, bool prefetch);
  void EvictLocked(uint64_t f);
  void RemoveVictimLocked(uint64_t f, std::vector<uint64_t>& victims);
  void RemoveResidentLocked(uint64_t f);
  void ReleaseLocked(std::vector<uint64_t>& victims);
  void ReleaseRunLocked(const uint64_t* run, size_t n);
  void InstallFailed(uint64_t f, const Status& s);
  void MarkResidentLocked(uint64_t f);
  void TouchLocked(uint64_t f);
  void LruUnlinkLocked(uint64_t f);
  void LruAppendLocked(uint64_t f);
  bool SequentialLocked(uint64_t f, bool wait);
  void QueueReadaheadLocked(uint64_t f);
  // `unit_ok`: the request covers the frame's whole huge unit.
  void QueuePrefetchLocked(uint64_t f, bool unit_ok = true);
  uint64_t PlanDistanceLocked(uint64_t f) const;
  std::byte* FrameAddr(uint64_t f) const {
    const TensorSlot& t = tensors_[frames_[f].tensor];
    return t.base + static_cast<uint64_t>(frames_[f].index) * t.page;
  }
  std::byte* WorkAddr(uint64_t f) const {  // guard mode: the service's writable alias
    return work_ + (FrameAddr(f) - view_);
  }
  uint32_t FramePage(uint64_t f) const { return tensors_[frames_[f].tensor].page; }
  int32_t AcquireSlotLocked();
  void Wake();

  std::unique_ptr<BundleReader> reader_;
  const BundleReader::Impl& bundle_;
  PagingConfig config_;
  PagingMode mode_ = PagingMode::kAuto;
  std::vector<TensorSlot> tensors_;
  std::unique_ptr<Frame[]> frames_;
  uint64_t frame_count_ = 0;
  uint32_t max_page_ = 0;
  bool uniform_pages_ = true;
  unsigned batch_ = 1;         // frames a worker loads at once (bounded in bytes)
  unsigned worker_count_ = 1;  // workers to start

  // Address space.
  std::byte* reserve_ = nullptr;  // mmap result (view_ aligned within it)
  uint64_t reserve_map_len_ = 0;
  std::byte* fixed_reserve_ = nullptr;  // TakeAddressesOf
  uint64_t fixed_reserve_len_ = 0;
  std::byte* view_ = nullptr;
  uint64_t reserve_len_ = 0;
  uint64_t huge_ = 0;             // transparent huge page size, 0 where THP is off
  std::atomic<bool> units_{false};  // huge units in use
  UniqueFd pagemap_;              // asked whether a unit is mapped by one huge entry
  std::byte* work_ = nullptr;     // guard mode alias
  UniqueFd memfd_;
  std::optional<Uffd> uffd_;

  // uffd mode with UFFDIO_MOVE: frame-sized slots (bundles with one page
  // size), and huge-page slots for huge units (the recycle pool).
  MovePool pool_, recycle_;

  // Policy state, guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable loaded_cv_;
  std::vector<uint64_t> resident_;
  int64_t lru_head_ = -1, lru_tail_ = -1;  // least recently used first
  uint64_t resident_bytes_ = 0, inflight_bytes_ = 0, peak_resident_ = 0;
  uint64_t pinned_bytes_ = 0;
  uint64_t budget_ = 0;
  uint64_t tick_ = 0;
  std::vector<std::vector<uint32_t>> plan_;  // the steps' tensors
  uint64_t plan_cursor_ = 0;                  // the step in use
  bool recording_ = false;
  std::vector<uint32_t> recorded_;
  std::vector<bool> recorded_seen_;
  FrameQueue prefetch_q_{8192};
  FrameQueue forced_q_{8192};  // frames Pin needs loaded
  std::vector<uint64_t> evict_batch_, evict_one_;  // reused: no allocation per eviction

  // Service threads.
  UniqueFd wake_fd_;              // eventfd: prefetch queued or shutdown
  UniqueFd req_read_, req_write_; // guard mode request pipe
  std::atomic<bool> stopping_{false};
  std::vector<std::unique_ptr<Worker>> workers_;

  PagerCounters counters_;
  LatencyHistogram latency_;
};

// Guard mode: routes SIGSEGV in registered ranges to their engine.
Status GuardRegister(Engine* e);
// Takes `e` out of the registry (new faults in its ranges go to the
// previous handler); returns its slot for GuardDrain, or -1.
int GuardUnregister(Engine* e);
// Waits until no thread is inside the handler for `slot` (after the
// engine woke every frame's waiters), then frees the slot for reuse.
void GuardDrain(int slot);

}  // namespace faultline::internal
