// The paging engine; see pager.h for the design and locking rules.
#include "pager/pager.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "bundle/codec.h"
#include "core/status_macros.h"
#include "io/uring.h"
#include "os/meminfo.h"

namespace faultline::internal {

namespace {

constexpr unsigned kBatch = 8;          // frames one worker loads at once, at most
constexpr uint64_t kBatchBytes = 4 << 20;  // and bytes (one frame at least)
constexpr uint64_t kPoolBytes = 16 << 20;  // the staging pool's pages, at most
constexpr uint64_t kFileFolioAlign = 2ull << 20;  // mmap mode: the largest page-cache folio mapped whole

uint64_t NowNs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, long timeout_ns) {
  timespec ts = {0, timeout_ns};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

}  // namespace

struct Engine::Worker {
  ~Worker() {
    if (unit_map) munmap(unit_map, unit_map_len);
  }
  std::thread thread;
  std::vector<std::byte> stored;   // the batch's stored frames, back to back
  std::vector<std::byte> staging;  // a batch of decoded frames (COPY path)
  std::vector<std::byte> shuffle;  // one frame
  std::vector<ReadOp> ops;
  std::vector<Load> loads;
  unsigned singles = 0;            // frame loads of this batch staged in `staging`
  // Huge units: at most one per batch, decoded into `unit_slot` (a huge-page
  // aligned range advised MADV_HUGEPAGE, not registered with userfaultfd:
  // the kernel fills it with a fresh huge page after each move).
  void* unit_map = nullptr;
  uint64_t unit_map_len = 0;
  std::byte* unit_slot = nullptr;
  uint64_t unit_first = 0;         // global id of the unit's frame 0
  uint64_t unit_claimed = 0;       // frames of it this batch loads (0: no unit)
  int32_t unit_recycled = -1;      // the recycle slot it is decoded into, or -1: unit_slot
};

Engine::Engine(std::unique_ptr<BundleReader> reader, const PagingConfig& config)
    : reader_(std::move(reader)), bundle_(reader_->impl()), config_(config) {}

uint32_t Engine::FirstTensorOf(const ModelInfo* m) const {
  for (uint32_t i = 0; i < tensors_.size(); i++)
    if (tensors_[i].model == m) return i;
  return static_cast<uint32_t>(tensors_.size());
}

Status Engine::Start() {
  const BundleInfo& info = reader_->info();
  // Lay the tensors out, each at a multiple of its page size.
  size_t count = 0;
  for (const auto& m : info.models) count += m.tensors.size();
  tensors_ = std::vector<TensorSlot>(count);
  // A tensor that covers at least one whole huge page starts on a huge-page
  // boundary (address space only), so that its units can be huge pages.
  huge_ = TransparentHugePageSize();
  uint64_t view_align = kMinPageSize;
  uint64_t cur = 0;
  size_t i = 0;
  for (const auto& m : info.models)
    for (const auto& t : m.tensors) {
      TensorSlot& s = tensors_[i++];
      s.info = &t;
      s.model = &m;
      // One frame of a large page size takes what its tensor needs (bundles
      // written before the writer did the same).
      s.page = t.frame_count == 1 ? PageFor(t.page_size, t.size) : t.page_size;
      if (huge_ > s.page && t.frame_count >= huge_ / s.page) {
        s.unit_frames = static_cast<uint32_t>(huge_ / s.page);
        s.units = t.frame_count / s.unit_frames;
      }
      uint64_t align = s.units ? huge_ : s.page;
      view_align = std::max(view_align, align);
      s.offset = AlignUp(cur, align);
      if (config_.mode == PagingMode::kMmap && t.size >= kFileFolioAlign && t.codec == Codec::kRaw) {
        // The page cache keeps a file's large folios at file offsets aligned
        // to their size; a mapping whose addresses match the file offsets
        // modulo 2 MiB lets the kernel map a 2 MiB folio with one entry on
        // one fault (fault-around maps 64 KiB per fault otherwise).
        uint64_t want = bundle_.frames[t.first_frame].offset % kFileFolioAlign;
        s.offset = AlignUp(cur, kFileFolioAlign) + want;
        if (s.offset >= cur + kFileFolioAlign) s.offset -= kFileFolioAlign;
        view_align = std::max(view_align, kFileFolioAlign);
      }
      s.frames = t.frame_count;
      s.first_frame = frame_count_;
      frame_count_ += t.frame_count;
      cur = s.offset + t.frame_count * s.page;
      if (max_page_ != 0 && max_page_ != s.page && t.frame_count) uniform_pages_ = false;
      if (t.frame_count) max_page_ = std::max(max_page_, s.page);
    }
  if (max_page_ == 0) max_page_ = kMinPageSize;
  view_align = std::max<uint64_t>(view_align, max_page_);
  reserve_len_ = std::max<uint64_t>(AlignUp(cur, kAlign), kAlign);
  frames_ = std::make_unique<Frame[]>(frame_count_);
  resident_.reserve(frame_count_);  // no growth while serving faults
  for (uint32_t t = 0; t < tensors_.size(); t++)
    for (uint64_t k = 0; k < tensors_[t].frames; k++) {
      frames_[tensors_[t].first_frame + k].tensor = t;
      frames_[tensors_[t].first_frame + k].index = static_cast<uint32_t>(k);
    }

  // Memory outside the budget is bounded in bytes (README: budget): a
  // worker's batch holds at most kBatchBytes of frames (one frame at least),
  // and its buffers (stored and decoded batch, one shuffle frame) hold
  // about three frames where frames are large; workers are fewer where
  // their buffers would pass half the budget. Frames so large that the
  // budget does not hold four are refused: paging them would be reading
  // the whole bundle into memory outside the budget.
  // A budget the memory cgroup cannot hold would end in the OOM killer.
  if (config_.mode != PagingMode::kMmap) config_.max_resident = FitBudgetToCgroup(config_.max_resident, "paging");
  batch_ = static_cast<unsigned>(std::clamp<uint64_t>(kBatchBytes / max_page_, 1, kBatch));
  if (config_.mode != PagingMode::kMmap && max_page_ > kBatchBytes / kBatch &&
      config_.max_resident < 4ull * max_page_) {
    auto largest = std::find_if(tensors_.begin(), tensors_.end(),
                                [&](const TensorSlot& t) { return t.frames && t.page == max_page_; });
    return Status::Error(EINVAL,
                         "tensor '%.64s' has frames of %llu MiB; a budget of %llu MiB must hold at least four: "
                         "raise the budget or repack with a smaller --page-size",
                         largest->info->name.c_str(), static_cast<unsigned long long>(max_page_ >> 20),
                         static_cast<unsigned long long>(config_.max_resident >> 20));
  }
  unsigned workers = config_.workers ? config_.workers : ThreadPool::DefaultThreads();
  workers = std::min(workers, 64u);
  const uint64_t worker_bytes = batch_ * (MaxStoredLength(Codec::kZstd, max_page_) + max_page_) + max_page_;
  if (max_page_ > kBatchBytes / kBatch)
    workers = static_cast<unsigned>(
        std::clamp<uint64_t>(config_.max_resident / 2 / worker_bytes, 1, workers));
  worker_count_ = workers;
  // At least two frames per worker, so that loads in flight and a thread's
  // access that straddles two frames always fit.
  budget_ = std::max<uint64_t>(config_.max_resident, 2ull * max_page_ * workers);

  // Reserve the address range, aligned to the largest page (or huge page) size.
  reserve_map_len_ = reserve_len_ + view_align;
  void* hint = nullptr;
  int fixed = 0;
  if (fixed_reserve_ && fixed_reserve_len_ == reserve_map_len_) {
    // A fork child taking its parent's addresses: what is left there of the
    // parent's reservation (the parts not marked MADV_DONTFORK) goes first.
    munmap(fixed_reserve_, fixed_reserve_len_);
    hint = fixed_reserve_;
    fixed = MAP_FIXED_NOREPLACE;
  }
  void* r = mmap(hint, reserve_map_len_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | fixed, -1, 0);
  if (r == MAP_FAILED) return Status::Error(errno, "cannot reserve %llu bytes of address space",
                                            static_cast<unsigned long long>(reserve_map_len_));
  reserve_ = static_cast<std::byte*>(r);
  view_ = reinterpret_cast<std::byte*>(AlignUp(reinterpret_cast<uintptr_t>(reserve_), view_align));
  for (auto& t : tensors_) t.base = view_ + t.offset;

  mode_ = config_.mode;
  switch (mode_) {
    case PagingMode::kAuto: {
      // userfaultfd where this process may use it (seccomp, sysctls and
      // device permissions decide, and may differ from the parent's), guard
      // pages otherwise.
      mode_ = PagingMode::kUffd;
      if (SetUpUffd().ok()) break;
      uffd_.reset();
      mode_ = PagingMode::kGuard;
      FL_RETURN_IF_ERROR(SetUpGuard());
      break;
    }
    case PagingMode::kUffd: FL_RETURN_IF_ERROR(SetUpUffd()); break;
    case PagingMode::kGuard: FL_RETURN_IF_ERROR(SetUpGuard()); break;
    case PagingMode::kMmap: return SetUpMmap();
    default: return Status::Error(EINVAL, "unknown paging mode");
  }

  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return Status::Error(errno, "eventfd");
  wake_fd_.reset(efd);

  // Huge units: userfaultfd with UFFDIO_MOVE, and a budget that holds a
  // good number of huge pages for every worker.
  size_t unit_stored = 0;
  uint64_t unit_frames = 0;
  for (const auto& t : tensors_)
    if (t.units) {
      unit_stored = std::max(unit_stored, t.unit_frames * MaxStoredLength(Codec::kZstd, t.page));
      unit_frames = std::max<uint64_t>(unit_frames, t.unit_frames);
    }
  bool units = mode_ == PagingMode::kUffd && uffd_->features().move && config_.huge_pages && unit_frames &&
               budget_ >= 4ull * huge_ * workers;
  if (!units) unit_stored = unit_frames = 0;
  evict_one_.reserve(unit_frames + 1);
  for (unsigned k = 0; k < workers; k++) {
    auto w = std::make_unique<Worker>();
    size_t bound = MaxStoredLength(Codec::kZstd, max_page_);
    w->stored.resize(batch_ * bound + unit_stored);
    if (mode_ == PagingMode::kUffd) w->staging.resize(batch_ * static_cast<size_t>(max_page_));
    w->shuffle.resize(max_page_);
    w->loads.reserve(batch_ + unit_frames);
    w->ops.reserve(batch_ + unit_frames);
    if (units && !MapUnitSlot(w.get())) units = false;
    workers_.push_back(std::move(w));
  }
  // Faults on the region then take the huge-page path (the huge zero page
  // for reads, so nothing is allocated before the fault reaches us), which
  // leaves no page table behind: a later UFFDIO_MOVE of a huge page there
  // maps it whole instead of splitting it.
  if (units && madvise(view_, reserve_len_, MADV_HUGEPAGE) != 0) units = false;
  if (units) SetUpRecycle(workers);
  units_.store(units);
  for (auto& w : workers_) {
    Worker* wp = w.get();
    try {
      w->thread = std::thread([this, wp] { WorkerLoop(wp); });
    } catch (const std::system_error& e) {
      return Status::Error(EAGAIN, "cannot start a paging worker: %s", e.what());
    }
  }
  return Status::Ok();
}

Status Engine::SetUpUffd() {
  // The application's view: private anonymous memory, missing-page faults.
  void* m = mmap(view_, reserve_len_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (m == MAP_FAILED) return Status::Error(errno, "cannot map the tensor range");
  // A forked child has no service threads: give it no mapping rather than
  // zero-filled pages.
  madvise(view_, reserve_len_, MADV_DONTFORK);
  auto u = Uffd::Open();
  if (!u.ok()) return u.status();
  uffd_.emplace(std::move(u).value());
  FL_RETURN_IF_ERROR(uffd_->RegisterMissing(view_, reserve_len_));
  // UFFDIO_MOVE cycles physical pages between a small staging pool and the
  // regions; the pool must be registered with the same userfaultfd to take
  // evicted pages back. Only for bundles with one page size; at most
  // kPoolBytes (none where that is not two frames).
  uint64_t slots = std::min<uint64_t>(2ull * batch_ * worker_count_ + 8, kPoolBytes / max_page_);
  if (uffd_->features().move && uniform_pages_ && slots >= 2) (void)pool_.Set(*uffd_, slots, max_page_, false);
  return Status::Ok();
}

// The recycle pool: one slot per worker and one more; none where the
// kernel cannot say whether a unit is mapped by a huge entry (a unit mapped
// by small pages would move back one page at a time).
void Engine::SetUpRecycle(unsigned workers) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  pagemap_.reset(fd);
  if (HugeMapped(fd, view_, kMinPageSize) < 0) return;
  (void)recycle_.Set(*uffd_, workers + 1ull, huge_, true);
}

Status Engine::SetUpGuard() {
  int fd = memfd_create("faultline-guard", MFD_CLOEXEC);
  if (fd < 0) return Status::Error(errno, "memfd_create");
  memfd_.reset(fd);
  if (ftruncate(fd, static_cast<off_t>(reserve_len_)) != 0) return Status::Error(errno, "ftruncate memfd");
  void* v = mmap(view_, reserve_len_, PROT_NONE, MAP_SHARED | MAP_FIXED, fd, 0);
  if (v == MAP_FAILED) return Status::Error(errno, "cannot map the tensor range");
  madvise(view_, reserve_len_, MADV_DONTFORK);
  void* w = mmap(nullptr, reserve_len_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (w == MAP_FAILED) return Status::Error(errno, "cannot map the service alias");
  work_ = static_cast<std::byte*>(w);
  madvise(work_, reserve_len_, MADV_DONTFORK);
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return Status::Error(errno, "pipe2");
  req_read_.reset(p[0]);
  req_write_.reset(p[1]);
  return GuardRegister(this);
}

Status Engine::SetUpMmap() {
  for (const auto& t : tensors_)
    if (t.info->codec != Codec::kRaw)
      return Status::Error(EINVAL, "mmap mode needs a raw bundle; tensor '%.64s' is %s",
                           t.info->name.c_str(), CodecName(t.info->codec));
  for (const auto& t : tensors_) {
    uint64_t k = 0;
    while (k < t.frames) {
      // One mapping per run of frames that lie back to back in the file.
      const FrameRecord& first = bundle_.frames[t.info->first_frame + k];
      uint64_t n = 1;
      while (k + n < t.frames && bundle_.frames[t.info->first_frame + k + n].offset ==
                                     first.offset + n * static_cast<uint64_t>(t.page))
        n++;
      const FrameRecord& last = bundle_.frames[t.info->first_frame + k + n - 1];
      uint64_t len = (n - 1) * static_cast<uint64_t>(t.page) + AlignUp(last.stored_length, kAlign);
      void* m = mmap(t.base + k * t.page, len, PROT_READ, MAP_PRIVATE | MAP_FIXED, bundle_.fd.get(),
                     static_cast<off_t>(first.offset));
      if (m == MAP_FAILED) return Status::Error(errno, "cannot map tensor '%.64s'", t.info->name.c_str());
      k += n;
    }
  }
  return Status::Ok();
}

Engine::~Engine() {
  if (view_ && mode_ != PagingMode::kMmap) {
    // New touches now fault as on unmapped memory; threads already waiting
    // are served by the workers still running.
    mprotect(view_, reserve_len_, PROT_NONE);
  }
  const int guard_slot = mode_ == PagingMode::kGuard ? GuardUnregister(this) : -1;
  stopping_.store(true);
  if (wake_fd_.valid()) {
    uint64_t one = 1;
    (void)!write(wake_fd_.get(), &one, sizeof(one));
  }
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
  if (frames_)
    for (uint64_t f = 0; f < frame_count_; f++) {
      frames_[f].state.store(kClosed);
      if (mode_ == PagingMode::kGuard) FutexWakeAll(&frames_[f].state);
    }
  // Threads still in the SIGSEGV handler for this engine return once they
  // see their frame closed; nothing they read may be freed before.
  GuardDrain(guard_slot);
  if (uffd_ && view_) {
    (void)uffd_->Unregister(view_, reserve_len_);
  }
  if (reserve_) munmap(reserve_, reserve_map_len_);
  if (work_) munmap(work_, reserve_len_);
}

void Engine::Wake() {
  uint64_t one = 1;
  (void)!write(wake_fd_.get(), &one, sizeof(one));
}

// ---- service ----

void Engine::WorkerLoop(Worker* w) {
  pollfd fds[2] = {{mode_ == PagingMode::kUffd ? uffd_->fd() : req_read_.get(), POLLIN, 0},
                   {wake_fd_.get(), POLLIN, 0}};
  uffd_msg msgs[kBatch];
  uintptr_t reqs[kBatch];
  while (!stopping_.load(std::memory_order_acquire)) {
    if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
    if (stopping_.load(std::memory_order_acquire)) break;
    w->loads.clear();
    w->singles = 0;
    w->unit_claimed = 0;
    if (mode_ == PagingMode::kUffd) {
      ssize_t n = read(fds[0].fd, msgs, batch_ * sizeof(msgs[0]));
      for (ssize_t k = 0; n > 0 && k < n / static_cast<ssize_t>(sizeof(uffd_msg)); k++)
        if (msgs[k].event == UFFD_EVENT_PAGEFAULT)
          HandleFaultAddress(w, msgs[k].arg.pagefault.address, msgs[k].arg.pagefault.feat.ptid, w->loads);
    } else {
      ssize_t n = read(fds[0].fd, reqs, batch_ * sizeof(reqs[0]));
      for (ssize_t k = 0; n > 0 && k < n / static_cast<ssize_t>(sizeof(uintptr_t)); k++)
        HandleFaultAddress(w, reqs[k], 0, w->loads);
    }
    if (fds[1].revents & POLLIN) {
      uint64_t v;
      (void)!read(wake_fd_.get(), &v, sizeof(v));
    }
    if (w->loads.size() < batch_) {
      std::unique_lock<std::mutex> lock(mu_);
      // Loads that must happen (Pin): demand semantics, budget permitting or not.
      while (w->loads.size() < batch_ && !forced_q_.empty()) {
        uint64_t f = forced_q_.Pop();
        if (frames_[f].state.load(std::memory_order_acquire) != kAbsent) continue;
        if (ClaimUnitLocked(w, f, false, false, w->loads)) continue;
        ReserveLocked(f, FramePage(f), false);
        uint32_t expected = kAbsent;
        if (frames_[f].state.compare_exchange_strong(expected, kLoading)) {
          frames_[f].prefetch = false;
          ClaimReservedLocked(w, f, true, w->loads);  // counted as prefetched: no thread touched it
        } else {
          inflight_bytes_ -= FramePage(f);
        }
      }
      while (w->loads.size() < batch_ && !prefetch_q_.empty()) {
        uint64_t q = prefetch_q_.Pop();
        uint64_t f = q >> 1;
        // Reserve before claiming: a claimed frame is never given back, or a
        // thread that faulted on it meanwhile would wait for nobody.
        if (frames_[f].state.load(std::memory_order_acquire) != kAbsent) continue;
        if ((q & 1) && ClaimUnitLocked(w, f, false, true, w->loads)) continue;
        if (!ReserveLocked(f, FramePage(f), true)) continue;
        uint32_t expected = kAbsent;
        if (frames_[f].state.compare_exchange_strong(expected, kLoading)) {
          ClaimReservedLocked(w, f, true, w->loads);
        } else {
          inflight_bytes_ -= FramePage(f);  // a fault claimed it first
        }
      }
      if (!prefetch_q_.empty() || !forced_q_.empty()) Wake();  // let another worker share the queues
    }
    RunLoads(w, w->loads);
  }
  // Pass the stop on: reading the eventfd takes every wake-up at once, so a
  // worker that read the one the destructor wrote would leave the others
  // asleep in poll.
  Wake();
}

int64_t Engine::FrameAt(const void* addr) const noexcept {
  auto a = static_cast<const std::byte*>(addr);
  if (a < view_ || a >= view_ + reserve_len_) return -1;
  uint64_t off = static_cast<uint64_t>(a - view_);
  // The tensor holding `off`: the last one starting at or before it.
  auto it = std::upper_bound(tensors_.begin(), tensors_.end(), off,
                             [](uint64_t o, const TensorSlot& t) { return o < t.offset; });
  if (it == tensors_.begin()) return -1;
  const TensorSlot& t = *(it - 1);
  uint64_t k = (off - t.offset) / t.page;
  return k < t.frames ? static_cast<int64_t>(t.first_frame + k) : -1;
}

void Engine::HandleFaultAddress(Worker* w, uintptr_t addr, uint32_t ptid, std::vector<Load>& loads) {
  int64_t found = FrameAt(reinterpret_cast<const void*>(addr));
  if (found < 0) {
    // Padding between tensors or a staging-pool page: nothing to load. Give
    // the page zeros so that the (out-of-bounds) access does not hang.
    static const std::byte zeros[4096] = {};
    if (uffd_) uffd_->Copy(reinterpret_cast<void*>(addr & ~uintptr_t{4095}), zeros, sizeof(zeros));
    return;
  }
  const uint64_t f = static_cast<uint64_t>(found);
  TensorSlot& t = tensors_[frames_[f].tensor];
  counters_.faults.fetch_add(1, std::memory_order_relaxed);
  t.counters.faults.fetch_add(1, std::memory_order_relaxed);
  for (;;) {
    uint32_t st = frames_[f].state.load(std::memory_order_acquire);
    switch (st) {
      case kAbsent: {
        if (!frames_[f].state.compare_exchange_strong(st, kLoading)) continue;
        Claim(w, f, loads);
        return;
      }
      case kLoading: {
        counters_.fault_waits.fetch_add(1, std::memory_order_relaxed);
        // A sequential reader that caught up with the readahead: read further.
        std::lock_guard<std::mutex> lock(mu_);
        if (SequentialLocked(f, true)) QueueReadaheadLocked(f);
        return;  // the install wakes every thread waiting on the frame
      }
      case kResident:
        if (uffd_) uffd_->Wake(FrameAddr(f), t.page);
        else FutexWakeAll(&frames_[f].state);
        return;
      case kEvicting:
        sched_yield();
        continue;
      case kError:
        if (uffd_) {
          if (!uffd_->features().poison || uffd_->Poison(FrameAddr(f), t.page) != 0) {
            if (ptid) syscall(SYS_tgkill, getpid(), ptid, SIGBUS);
          }
        } else {
          FutexWakeAll(&frames_[f].state);
        }
        return;
      default:
        return;
    }
  }
}

// `f` is in kLoading, owned by the caller (a demand fault): reserve its
// budget (demand loads always proceed) and queue it, with the rest of its
// huge unit when the tensor is being read sequentially.
void Engine::Claim(Worker* w, uint64_t f, std::vector<Load>& loads) {
  std::lock_guard<std::mutex> lock(mu_);
  TouchLocked(f);
  bool sequential = SequentialLocked(f, false);
  if (!sequential || !ClaimUnitLocked(w, f, true, false, loads)) {
    ReserveLocked(f, FramePage(f), false);
    ClaimReservedLocked(w, f, false, loads);
  }
  if (sequential) QueueReadaheadLocked(f);
}

void Engine::ClaimReservedLocked(Worker* w, uint64_t f, bool prefetch, std::vector<Load>& loads) {
  Load l{f, prefetch, -1, nullptr, prefetch ? 0 : NowNs()};
  if (mode_ == PagingMode::kUffd) {
    l.slot = pool_.Take();
    if (l.slot >= 0) {
      l.staging = pool_.At(l.slot);
    } else {
      l.staging = w->staging.data() + w->singles++ * static_cast<size_t>(max_page_);
    }
  } else {
    l.staging = WorkAddr(f);
  }
  frames_[f].prefetch = prefetch;
  loads.push_back(l);
}

// Claims the absent frames of the huge unit holding `f` (`owned`: f is
// already claimed by the caller's fault) and reserves their budget; false,
// with nothing claimed, where the unit cannot be used: units off, the
// worker already has one in this batch, f in no whole unit, fewer than two
// frames to load, or (`optional`) no budget without evicting frames needed
// sooner.
bool Engine::ClaimUnitLocked(Worker* w, uint64_t f, bool owned, bool optional, std::vector<Load>& loads) {
  if (w->unit_claimed || !units_.load(std::memory_order_relaxed)) return false;
  TensorSlot& t = tensors_[frames_[f].tensor];
  if (t.unit_frames == 0) return false;
  const uint64_t u = frames_[f].index / t.unit_frames;
  if (u >= t.units) return false;
  const uint64_t first = t.first_frame + u * t.unit_frames, end = first + t.unit_frames;
  uint64_t want = owned ? 1 : 0;
  for (uint64_t g = first; g < end; g++)
    if (frames_[g].state.load(std::memory_order_relaxed) == kAbsent) want++;
  if (want < 2 || !ReserveLocked(f, want * t.page, optional)) return false;
  // Decode into a recycled huge page where there is one.
  w->unit_recycled = pagemap_.valid() ? recycle_.TakeHuge(pagemap_.get()) : recycle_.Take();
  std::byte* src = UnitSource(w);
  uint64_t claimed = 0;
  for (uint64_t g = first; g < end; g++) {
    const bool mine = owned && g == f;
    uint32_t expected = kAbsent;
    if (!mine && !frames_[g].state.compare_exchange_strong(expected, kLoading)) continue;
    Load l{g, !mine, -1, src + (g - first) * t.page, mine ? NowNs() : 0};
    l.unit = true;
    frames_[g].prefetch = !mine;
    loads.push_back(l);
    claimed++;
  }
  // The reservation counted the frames absent before it; eviction for it or
  // other faults may have changed that.
  inflight_bytes_ += claimed * t.page;
  inflight_bytes_ -= want * t.page;
  if (claimed == 0) {
    if (w->unit_recycled >= 0) recycle_.Return(w->unit_recycled, 0);
    return false;
  }
  w->unit_first = first;
  w->unit_claimed = claimed;
  t.ra_end = std::max<uint64_t>(t.ra_end, end - t.first_frame);
  return true;
}

bool Engine::ReserveLocked(uint64_t f, uint64_t p, bool optional) {
  if (resident_bytes_ + inflight_bytes_ + p > budget_) {
    // Evict a batch: down to a little under the budget, so the unmapping
    // (and its TLB shootdown across the process's threads) is paid once per
    // run of frames rather than once per frame.
    uint64_t slack = std::min<uint64_t>(budget_ / 8, 16ull * max_page_);
    uint64_t target = budget_ > slack + p ? budget_ - slack - p : 0;
    std::vector<uint64_t>& victims = evict_batch_;
    victims.clear();
    while (resident_bytes_ + inflight_bytes_ > target) {
      int64_t v = PickVictimLocked(f, optional);
      if (v < 0) break;
      RemoveVictimLocked(static_cast<uint64_t>(v), victims);
    }
    ReleaseLocked(victims);
    if (resident_bytes_ + inflight_bytes_ + p > budget_ && optional) return false;
    // Demand loads proceed regardless; the excess is bounded by the frames in flight.
  }
  inflight_bytes_ += p;
  return true;
}

uint64_t Engine::PlanDistanceLocked(uint64_t f) const {
  const uint64_t n = plan_.size();
  const Frame& fr = frames_[f];
  const TensorSlot& t = tensors_[fr.tensor];
  uint64_t d;
  if (t.plan_pos < 0) {
    d = 2 * n;  // not in the plan: evicted first
  } else {
    // The step in use is needed soonest (kernels such as GEMM revisit its
    // frames in any order, and touch its tensors in any order); the one
    // just finished is needed last.
    d = (static_cast<uint64_t>(t.plan_pos) + n - plan_cursor_) % n;
  }
  return (d << 32) | fr.index;
}

int64_t Engine::PickVictimLocked(uint64_t for_frame, bool prefetch) {
  const bool plan = config_.policy == EvictionPolicy::kPlan && !plan_.empty();
  const uint64_t need_dist = plan ? PlanDistanceLocked(for_frame) : 0;
  const uint64_t run_start = tensors_[frames_[for_frame].tensor].run_start;
  int64_t best = -1;
  uint64_t best_a = 0, best_b = 0;
  if (!plan && config_.policy == EvictionPolicy::kLru) {
    // The list is in last-use order: the first unpinned frame is the victim.
    for (int64_t v = lru_head_; v >= 0; v = frames_[v].lru_next) {
      const Frame& fr = frames_[v];
      if (prefetch && fr.last_use >= run_start) return -1;  // everything after is newer
      if (!fr.pins) return v;
    }
    return -1;
  }
  for (uint64_t v : resident_) {
    const Frame& fr = frames_[v];
    if (fr.pins) continue;
    uint64_t a, b;  // smaller (a, b) is evicted first
    if (plan) {
      uint64_t dist = PlanDistanceLocked(v);
      // Prefetch never evicts a frame needed before the one it brings.
      if (prefetch && dist <= need_dist) continue;
      a = ~dist;
      b = fr.last_use;
    } else {
      if (prefetch && fr.last_use >= run_start) continue;
      a = config_.policy == EvictionPolicy::kLfu ? fr.uses : fr.last_use;
      b = fr.last_use;
    }
    if (best < 0 || a < best_a || (a == best_a && b < best_b)) {
      best = static_cast<int64_t>(v);
      best_a = a;
      best_b = b;
    }
  }
  return best;
}

void Engine::EvictLocked(uint64_t f) {
  evict_one_.clear();
  RemoveVictimLocked(f, evict_one_);
  ReleaseLocked(evict_one_);
}

// Takes `f` out of the resident set for eviction; a frame of a huge unit
// takes its whole unit with it (a part would split the huge page).
void Engine::RemoveVictimLocked(uint64_t f, std::vector<uint64_t>& victims) {
  if (!frames_[f].huge) {
    RemoveResidentLocked(f);
    victims.push_back(f);
    return;
  }
  const TensorSlot& t = tensors_[frames_[f].tensor];
  const uint64_t first = t.first_frame + frames_[f].index / t.unit_frames * t.unit_frames;
  for (uint64_t g = first; g < first + t.unit_frames; g++)
    if (frames_[g].resident_pos >= 0) {
      RemoveResidentLocked(g);
      victims.push_back(g);
    }
}

// Takes `f` out of the resident set; its pages are released by ReleaseLocked.
void Engine::RemoveResidentLocked(uint64_t f) {
  Frame& fr = frames_[f];
  fr.state.store(kEvicting, std::memory_order_release);
  uint64_t last = resident_.back();
  resident_[fr.resident_pos] = last;
  frames_[last].resident_pos = fr.resident_pos;
  resident_.pop_back();
  fr.resident_pos = -1;
  LruUnlinkLocked(f);
  resident_bytes_ -= FramePage(f);
}

// Releases the pages of frames taken out of the resident set: runs of
// adjacent frames in one call each. A lone frame goes back to the staging
// pool with UFFDIO_MOVE when the pool has room, so a later load can move it
// in again without the kernel zeroing a page.
void Engine::ReleaseLocked(std::vector<uint64_t>& victims) {
  std::sort(victims.begin(), victims.end());
  for (size_t i = 0; i < victims.size();) {
    size_t j = i + 1;
    while (j < victims.size() && victims[j] == victims[j - 1] + 1 &&
           frames_[victims[j]].tensor == frames_[victims[i]].tensor)
      j++;
    const uint64_t f = victims[i];
    std::byte* addr = FrameAddr(f);
    uint64_t len = (j - i) * static_cast<uint64_t>(FramePage(f));
    if (mode_ == PagingMode::kUffd) {
      ReleaseRunLocked(victims.data() + i, j - i);
    } else {
      mprotect(addr, len, PROT_NONE);
      fallocate(memfd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                static_cast<off_t>(addr - view_), static_cast<off_t>(len));
    }
    for (size_t k = i; k < j; k++) {
      Frame& fr = frames_[victims[k]];
      fr.huge = fr.pmd = false;
      counters_.evictions.fetch_add(1, std::memory_order_relaxed);
      tensors_[fr.tensor].counters.evictions.fetch_add(1, std::memory_order_relaxed);
      fr.state.store(kAbsent, std::memory_order_release);
    }
    i = j;
  }
}

// Drops a run of adjacent victims (uffd mode). Pages go back into a pool
// where one takes them: a lone frame into the frame pool while it is less
// than half full (each move of small pages costs a TLB flush per page, so
// only one frame's worth), a huge unit that one huge entry maps into the
// recycle pool. The rest goes by MADV_DONTNEED, one call per stretch.
void Engine::ReleaseRunLocked(const uint64_t* run, size_t n) {
  const uint64_t page = FramePage(run[0]);
  if (n == 1 && pool_.on() && pool_.full() < pool_.slots() / 2 &&
      pool_.Stash(*uffd_, FrameAddr(run[0]), page) == page)
    return;
  size_t drop = 0;  // start of the stretch not yet released
  auto flush = [&](size_t end) {
    if (end > drop) madvise(FrameAddr(run[drop]), (end - drop) * page, MADV_DONTNEED);
  };
  for (size_t k = 0; k < n;) {
    const Frame& fr = frames_[run[k]];
    const uint32_t uf = tensors_[fr.tensor].unit_frames;
    if (!fr.pmd || fr.index % uf != 0 || k + uf > n || !recycle_.has_hole()) {
      k++;
      continue;
    }
    flush(k);
    if (recycle_.Stash(*uffd_, FrameAddr(run[k]), huge_) == huge_) {
      counters_.huge_recycled.fetch_add(1, std::memory_order_relaxed);
      drop = k + uf;
    } else {
      drop = k;  // the unit (what is left of it) goes with the stretch
    }
    k += uf;
  }
  flush(n);
}

void Engine::MarkResidentLocked(uint64_t f) {
  Frame& fr = frames_[f];
  fr.resident_pos = static_cast<int64_t>(resident_.size());
  resident_.push_back(f);
  resident_bytes_ += FramePage(f);
  peak_resident_ = std::max(peak_resident_, resident_bytes_);
  if (fr.prefetch) fr.last_use = ++tick_;
  LruAppendLocked(f);
  fr.state.store(kResident, std::memory_order_release);
}

void Engine::LruUnlinkLocked(uint64_t f) {
  Frame& fr = frames_[f];
  if (fr.lru_prev >= 0) frames_[fr.lru_prev].lru_next = fr.lru_next;
  else if (lru_head_ == static_cast<int64_t>(f)) lru_head_ = fr.lru_next;
  if (fr.lru_next >= 0) frames_[fr.lru_next].lru_prev = fr.lru_prev;
  else if (lru_tail_ == static_cast<int64_t>(f)) lru_tail_ = fr.lru_prev;
  fr.lru_prev = fr.lru_next = -1;
}

void Engine::LruAppendLocked(uint64_t f) {
  Frame& fr = frames_[f];
  fr.lru_prev = lru_tail_;
  fr.lru_next = -1;
  if (lru_tail_ >= 0) frames_[lru_tail_].lru_next = static_cast<int64_t>(f);
  else lru_head_ = static_cast<int64_t>(f);
  lru_tail_ = static_cast<int64_t>(f);
}

void Engine::TouchLocked(uint64_t f) {
  Frame& fr = frames_[f];
  fr.last_use = ++tick_;
  fr.uses++;
  if (fr.resident_pos >= 0) {  // keep the LRU list in last-use order
    LruUnlinkLocked(f);
    LruAppendLocked(f);
  }
  uint32_t t = fr.tensor;
  if (recording_ && !recorded_seen_[t]) {
    recorded_seen_[t] = true;
    recorded_.push_back(t);
  }
  int64_t pos = tensors_[t].plan_pos;
  if (!plan_.empty() && pos >= 0 && static_cast<uint64_t>(pos) != plan_cursor_) {
    plan_cursor_ = static_cast<uint64_t>(pos);
    // Plan-driven prefetch: the steps that follow, up to a quarter of the budget.
    uint64_t ahead = 0;
    for (uint64_t k = 1; k < plan_.size() && ahead < budget_ / 4; k++)
      for (uint32_t id : plan_[(plan_cursor_ + k) % plan_.size()]) {
        const TensorSlot& nt = tensors_[id];
        for (uint64_t i = 0; i < nt.frames && ahead < budget_ / 4; i++) {
          QueuePrefetchLocked(nt.first_frame + i);
          ahead += nt.page;
        }
      }
  }
}

// Readahead state for a fault (`wait`: on a frame already loading) at `f`:
// true when it continues a sequential stream of its tensor, whose window
// then grows. A fault elsewhere starts a new run with no readahead; a wait
// elsewhere changes nothing.
bool Engine::SequentialLocked(uint64_t f, bool wait) {
  if (config_.prefetch_depth == 0) return false;
  TensorSlot& t = tensors_[frames_[f].tensor];
  const int64_t i = frames_[f].index;
  // Sequential: past the previous fault and no further than what was read
  // ahead for it (those frames did not fault).
  const int64_t reach = std::max<int64_t>(t.last_fault + 1 + 2 * static_cast<int64_t>(t.window),
                                          static_cast<int64_t>(t.ra_end));
  if (t.last_fault >= 0 && i > t.last_fault && i <= reach) {
    t.window = std::min<uint32_t>(std::max<uint32_t>(1, t.window * 2), config_.prefetch_depth);
    t.last_fault = i;
    return true;
  }
  if (wait) return false;
  t.window = 0;
  t.ra_end = 0;
  t.run_start = tick_;
  t.last_fault = i;
  return false;
}

// Queues the frames of a sequential stream at `f` that are not yet read
// ahead: twice the window past f, so that the next fault of the stream
// comes when half of it is still ahead of the reader; at least two huge
// units where the tensor has them, so that every worker has one to load.
void Engine::QueueReadaheadLocked(uint64_t f) {
  TensorSlot& t = tensors_[frames_[f].tensor];
  const uint64_t i = frames_[f].index;
  uint64_t ahead = 2ull * t.window;
  if (t.units && units_.load(std::memory_order_relaxed)) ahead = std::max<uint64_t>(ahead, 2ull * t.unit_frames);
  const uint64_t to = std::min<uint64_t>(i + 1 + ahead, t.frames);
  for (uint64_t k = std::max<uint64_t>(i + 1, t.ra_end); k < to; k++) QueuePrefetchLocked(t.first_frame + k);
  t.ra_end = std::max(t.ra_end, to);
}

void Engine::QueuePrefetchLocked(uint64_t f, bool unit_ok) {
  if (frames_[f].state.load(std::memory_order_relaxed) != kAbsent) return;
  bool was_empty = prefetch_q_.empty();
  if (!prefetch_q_.Push(f << 1 | (unit_ok ? 1 : 0))) return;  // full: readahead is a hint
  if (was_empty) Wake();  // workers that take from the queue wake the next one
}

void Engine::RunLoads(Worker* w, std::vector<Load>& loads) {
  if (loads.empty()) return;
  w->ops.clear();
  size_t at = 0;  // stored frames back to back; each fits MaxStoredLength of its page
  for (size_t k = 0; k < loads.size(); k++) {
    const Frame& fr = frames_[loads[k].frame];
    const TensorInfo& ti = *tensors_[fr.tensor].info;
    const FrameRecord& rec = bundle_.frames[ti.first_frame + fr.index];
    // A frame stored verbatim is read where it will be installed from
    // (DecodeFrame then only checks it).
    void* buf = w->stored.data() + at;
    if (ti.codec == Codec::kRaw || (rec.flags & kFrameStoredRaw)) buf = loads[k].staging;
    else at += rec.stored_length;
    w->ops.push_back(ReadOp{bundle_.fd.get(), rec.offset, rec.stored_length, buf});
  }
  Status rs = ReadBatch(w->ops, "bundle frames");
  for (size_t k = 0; k < loads.size(); k++) {
    Load& l = loads[k];
    const Frame& fr = frames_[l.frame];
    TensorSlot& t = tensors_[fr.tensor];
    const FrameRecord& rec = bundle_.frames[t.info->first_frame + fr.index];
    Status s = rs;
    if (s.ok()) {
      s = DecodeFrame(BundleReader::Impl::CodecOf(*t.info), rec,
                      {static_cast<const std::byte*>(w->ops[k].buf), rec.stored_length},
                      {l.staging, rec.raw_length}, w->shuffle.data());
      if (rec.raw_length < t.page) memset(l.staging + rec.raw_length, 0, t.page - rec.raw_length);
    }
    if (!s.ok()) {
      InstallFailed(l.frame, s.WithPrefix("model '%.64s' tensor '%.64s' frame %u", t.model->name.c_str(),
                                          t.info->name.c_str(), fr.index));
      if (l.slot >= 0) {
        std::lock_guard<std::mutex> lock(mu_);
        pool_.Return(l.slot, 0);
      }
      l.unit = false;  // out of its unit's install, if it had one
      continue;
    }
    if (l.unit) continue;  // installed with its unit below
    CountLoad(l);
    std::byte* dst = FrameAddr(l.frame);
    uint64_t moved = 0;
    if (mode_ == PagingMode::kUffd) {
      if (l.slot >= 0) uffd_->Move(dst, l.staging, t.page, true, &moved);
      int rc = CopyRest(dst, l.staging, t.page, moved);
      if (rc != 0) {
        InstallFailed(l.frame, Status::Error(-rc, "installing tensor '%.64s' frame %u", t.info->name.c_str(), fr.index));
        continue;
      }
    } else {
      mprotect(dst, t.page, PROT_READ);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      inflight_bytes_ -= t.page;
      if (l.slot >= 0) pool_.Return(l.slot, moved);
      MarkResidentLocked(l.frame);
    }
    loaded_cv_.notify_all();
    if (mode_ == PagingMode::kGuard) FutexWakeAll(&frames_[l.frame].state);
  }
  if (w->unit_claimed) InstallUnit(w, loads);
}

// Counted before the install wakes the faulting threads, so that a thread
// reading the statistics after its access sees its own load.
void Engine::CountLoad(const Load& l) {
  const Frame& fr = frames_[l.frame];
  TensorSlot& t = tensors_[fr.tensor];
  const FrameRecord& rec = bundle_.frames[t.info->first_frame + fr.index];
  counters_.bytes_read.fetch_add(rec.stored_length, std::memory_order_relaxed);
  counters_.bytes_decompressed.fetch_add(rec.raw_length, std::memory_order_relaxed);
  counters_.loads.fetch_add(1, std::memory_order_relaxed);
  t.counters.loads.fetch_add(1, std::memory_order_relaxed);
  if (l.prefetch) {
    counters_.prefetched.fetch_add(1, std::memory_order_relaxed);
    t.counters.prefetched.fetch_add(1, std::memory_order_relaxed);
  } else {
    latency_.Add(NowNs() - l.start_ns);
  }
}

// Installs what a move left of [dst, dst + len) (`done` bytes of it moved)
// by UFFDIO_COPY from `src`, retried while the kernel asks; 0 or -errno.
int Engine::CopyRest(std::byte* dst, const std::byte* src, uint64_t len, uint64_t done) {
  int rc = done >= len ? 0 : -EAGAIN;
  for (int attempt = 0; rc != 0 && attempt < 100; attempt++) {
    rc = uffd_->Copy(dst + done, src + done, len - done);
    if (rc == -EEXIST) rc = 0;  // already present: nothing to install
    if (rc == -EAGAIN) sched_yield();
    else if (rc != 0) break;
  }
  return rc;
}

// Gives the worker a fresh unit slot (a mapping with no page table, whose
// first fill faults a huge page), replacing the one it had; false where no
// memory can be had (the old slot, if any, stays).
bool Engine::MapUnitSlot(Worker* w) {
  void* map = nullptr;
  uint64_t map_len = 0;
  std::byte* slot = MapAligned(huge_, huge_, &map, &map_len);
  if (!slot) return false;
  madvise(slot, huge_, MADV_HUGEPAGE);
  if (w->unit_map) munmap(w->unit_map, w->unit_map_len);
  w->unit_map = map;
  w->unit_map_len = map_len;
  w->unit_slot = slot;
  return true;
}

// Where the worker's unit is decoded: a recycled huge page, or its own slot.
std::byte* Engine::UnitSource(const Worker* w) const {
  return w->unit_recycled >= 0 ? recycle_.At(w->unit_recycled) : w->unit_slot;
}

// Installs the decoded frames of the worker's huge unit (those still marked
// `unit` in `loads`): a whole unit (every frame claimed and decoded) by one
// UFFDIO_MOVE of the huge page, the rest of it (a move that failed part way,
// or a partial unit) by UFFDIO_COPY from the slot.
void Engine::InstallUnit(Worker* w, std::vector<Load>& loads) {
  const TensorSlot& t = tensors_[frames_[w->unit_first].tensor];
  std::byte* base = FrameAddr(w->unit_first);
  uint64_t decoded = 0;
  for (const Load& l : loads)
    if (l.unit) {
      CountLoad(l);
      decoded++;
    }
  const bool whole = decoded == t.unit_frames;
  uint64_t moved = 0;
  bool pmd = false, split = false;
  if (whole) {
    int rc = uffd_->Move(base, UnitSource(w), huge_, true, &moved);
    if (rc == -EAGAIN && moved == 0) rc = uffd_->Move(base, UnitSource(w), huge_, true, &moved);
    if (rc == 0) counters_.huge_installs.fetch_add(1, std::memory_order_relaxed);
    // A mapping that cannot take moves at all (mlocked, say): stop trying.
    if (rc == -EINVAL && moved == 0) units_.store(false, std::memory_order_relaxed);
    const int mapped = rc == 0 && pagemap_.valid() ? HugeMapped(pagemap_.get(), base, huge_) : -1;
    pmd = mapped == 1 && recycle_.on();
    if (mapped == 0) counters_.huge_split.fetch_add(1, std::memory_order_relaxed);
    // Pages that left the slot as small pages (the huge page was split over
    // a page table at the destination, or the move stopped part way) leave
    // an empty page table in the slot; its next fill would fault small
    // pages, and every later unit would go in split. A fresh slot has none;
    // a recycle-pool hole is dropped by Return, which frees the table where
    // the kernel reclaims empty ones.
    split = moved > 0 && (rc != 0 || mapped == 0);
    if (split && w->unit_recycled < 0 && !MapUnitSlot(w)) madvise(w->unit_slot, huge_, MADV_DONTNEED);
  }
  for (Load& l : loads) {
    if (!l.unit) continue;
    const uint64_t off = static_cast<uint64_t>(FrameAddr(l.frame) - base);
    int rc = CopyRest(base + off, l.staging, t.page, moved > off ? moved - off : 0);
    if (rc != 0) {
      l.unit = false;
      InstallFailed(l.frame, Status::Error(-rc, "installing tensor '%.64s' frame %u", t.info->name.c_str(),
                                           frames_[l.frame].index));
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Load& l : loads) {
      if (!l.unit) continue;
      inflight_bytes_ -= t.page;
      frames_[l.frame].huge = whole;
      frames_[l.frame].pmd = pmd;
      MarkResidentLocked(l.frame);
    }
    // After the copies above, which may still read the slot.
    if (w->unit_recycled >= 0) recycle_.Return(w->unit_recycled, moved, split);
  }
  loaded_cv_.notify_all();
}

void Engine::InstallFailed(uint64_t f, const Status& s) {
  counters_.errors.fetch_add(1, std::memory_order_relaxed);
  // Reported before the failure is published, so whoever learns of it
  // (a Pin, a SIGBUS handler) finds the callback already run.
  if (config_.on_error) config_.on_error(s);
  {
    std::lock_guard<std::mutex> lock(mu_);
    inflight_bytes_ -= FramePage(f);
    frames_[f].state.store(kError, std::memory_order_release);
  }
  loaded_cv_.notify_all();
  if (mode_ == PagingMode::kUffd) {
    // Poisoned pages raise SIGBUS in every thread that touches them.
    if (!uffd_->features().poison || uffd_->Poison(FrameAddr(f), FramePage(f)) != 0)
      uffd_->Wake(FrameAddr(f), FramePage(f));  // woken threads re-fault and get SIGBUS
  } else {
    FutexWakeAll(&frames_[f].state);
  }
}

// ---- hints ----

void Engine::Prefetch(uint32_t t, uint64_t offset, uint64_t length) {
  TensorSlot& ts = tensors_[t];
  if (ts.frames == 0 || offset >= ts.info->size) return;
  uint64_t end = length > ts.info->size - offset ? ts.info->size : offset + length;
  if (mode_ == PagingMode::kMmap) {
    madvise(ts.base + (offset & ~(kAlign - 1)), end - (offset & ~(kAlign - 1)), MADV_WILLNEED);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t k = offset / ts.page; k * ts.page < end; k++) {
    // A frame may bring its whole huge unit when the range covers the unit.
    bool unit_ok = false;
    if (ts.unit_frames && k / ts.unit_frames < ts.units) {
      uint64_t u0 = k / ts.unit_frames * ts.unit_frames * ts.page, u1 = u0 + uint64_t{ts.unit_frames} * ts.page;
      unit_ok = offset <= u0 && end >= std::min<uint64_t>(u1, ts.info->size);
    }
    QueuePrefetchLocked(ts.first_frame + k, unit_ok);
  }
}

void Engine::DontNeed(uint32_t t) {
  TensorSlot& ts = tensors_[t];
  if (mode_ == PagingMode::kMmap) {
    madvise(ts.base, ts.frames * ts.page, MADV_DONTNEED);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t k = 0; k < ts.frames; k++) {
    uint64_t f = ts.first_frame + k;
    if (frames_[f].state.load() == kResident && frames_[f].pins == 0) EvictLocked(f);
  }
}

Status Engine::Pin(uint32_t t) {
  TensorSlot& ts = tensors_[t];
  if (mode_ == PagingMode::kMmap) {
    if (ts.frames && mlock(ts.base, ts.info->size) != 0) return Status::Error(errno, "mlock");
    return Status::Ok();
  }
  uint64_t bytes = ts.frames * ts.page;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (pinned_bytes_ + bytes + 2ull * max_page_ * workers_.size() > budget_)
      return Status::Error(ENOSPC, "pinning tensor '%.64s' (%llu bytes) leaves too little budget",
                           ts.info->name.c_str(), static_cast<unsigned long long>(bytes));
    pinned_bytes_ += bytes;
    for (uint64_t k = 0; k < ts.frames; k++) frames_[ts.first_frame + k].pins++;
  }
  // Have the workers load every frame as a demand load (never touched from
  // here: a bad frame must be an error, not SIGBUS in the caller), then wait
  // until each is resident or failed. Pinned frames are never evicted.
  std::unique_lock<std::mutex> lock(mu_);
  // Queues the absent frames (as many as the queue takes; the rest when it
  // has drained) and wakes the workers.
  auto queue_absent = [&] {
    for (uint64_t k = 0; k < ts.frames; k++)
      if (frames_[ts.first_frame + k].state.load() == kAbsent && !forced_q_.Push(ts.first_frame + k)) break;
    if (!forced_q_.empty()) Wake();
  };
  queue_absent();
  int64_t bad = -1;
  loaded_cv_.wait(lock, [&] {
    bool done = true;
    for (uint64_t k = 0; k < ts.frames; k++) {
      uint32_t st = frames_[ts.first_frame + k].state.load();
      if (st == kError) {
        bad = static_cast<int64_t>(k);
        return true;
      }
      done = done && st == kResident;
    }
    if (!done && forced_q_.empty()) queue_absent();
    return done;
  });
  lock.unlock();
  if (bad >= 0) {
    Unpin(t);
    return Status::Error(EIO, "tensor '%.64s' frame %lld cannot be read", ts.info->name.c_str(),
                         static_cast<long long>(bad));
  }
  return Status::Ok();
}

void Engine::Unpin(uint32_t t) {
  TensorSlot& ts = tensors_[t];
  if (mode_ == PagingMode::kMmap) {
    if (ts.frames) munlock(ts.base, ts.info->size);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (ts.frames == 0 || frames_[ts.first_frame].pins == 0) return;
  pinned_bytes_ -= ts.frames * ts.page;
  for (uint64_t k = 0; k < ts.frames; k++) frames_[ts.first_frame + k].pins--;
}

void Engine::SetPlan(const std::vector<std::vector<uint32_t>>& steps) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& t : tensors_) t.plan_pos = -1;
  plan_.clear();
  for (const auto& step : steps) {
    std::vector<uint32_t> ids;
    for (uint32_t t : step) {
      if (t >= tensors_.size() || tensors_[t].plan_pos >= 0) continue;
      tensors_[t].plan_pos = static_cast<int64_t>(plan_.size());
      ids.push_back(t);
    }
    if (!ids.empty()) plan_.push_back(std::move(ids));
  }
  plan_cursor_ = 0;
}

void Engine::StartRecording() {
  std::lock_guard<std::mutex> lock(mu_);
  recording_ = true;
  recorded_.clear();
  recorded_seen_.assign(tensors_.size(), false);
}

void Engine::StopRecording() {
  std::vector<std::vector<uint32_t>> steps;
  {
    std::lock_guard<std::mutex> lock(mu_);
    recording_ = false;
    for (uint32_t t : recorded_) steps.push_back({t});
    recorded_.clear();
  }
  SetPlan(steps);
}

void Engine::Advance(uint32_t t) {
  std::lock_guard<std::mutex> lock(mu_);
  if (tensors_[t].frames == 0) return;
  // As a touch of the tensor's first frame, without counting a use.
  uint64_t f = tensors_[t].first_frame;
  uint32_t uses = frames_[f].uses;
  TouchLocked(f);
  frames_[f].uses = uses;
  for (uint64_t k = 0; k < std::min<uint64_t>(tensors_[t].frames, config_.prefetch_depth); k++)
    QueuePrefetchLocked(f + k);
}

PagingStats Engine::Stats() const {
  PagingStats s;
#define FL_COPY(name) s.name = counters_.name.load(std::memory_order_relaxed);
  FAULTLINE_PAGING_COUNTERS(FL_COPY)
#undef FL_COPY
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.resident_bytes = resident_bytes_;
    s.peak_resident_bytes = peak_resident_;
  }
  s.budget_bytes = budget_;
  s.fault_latency = latency_.Summary();
  for (const auto& t : tensors_)
    s.tensors.push_back({t.model->name, t.info->name, t.counters.faults.load(), t.counters.loads.load(),
                         t.counters.prefetched.load(), t.counters.evictions.load()});
  return s;
}

// ---- guard mode: the signal handler's half ----

Engine::GuardResult Engine::GuardFault(const void* addr) noexcept {
  int64_t f = FrameAt(addr);
  if (f < 0) return GuardResult::kNotOurs;  // padding between tensors: an out-of-bounds access
  std::atomic<uint32_t>& state = frames_[f].state;
  uintptr_t req = reinterpret_cast<uintptr_t>(addr);
  for (;;) {
    uint32_t st = state.load(std::memory_order_acquire);
    if (st == kResident || st == kClosed) return GuardResult::kRetry;
    if (st == kError) return GuardResult::kSigbus;
    if (st == kAbsent) (void)!write(req_write_.get(), &req, sizeof(req));
    FutexWait(&state, st, 50 * 1000 * 1000);
  }
}

}  // namespace faultline::internal
