// The managed-memory engine; see engine.h for the chunk states and locking.
#include "alloc/engine.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include "alloc/guard.h"
#include "core/checksum.h"
#include "core/status_macros.h"
#include "core/tsan.h"
#include "io/uring.h"
#include "os/meminfo.h"

namespace faultline::internal {

namespace {

constexpr size_t kChunk = kManagedChunk;
constexpr size_t kBlockAlign = 4096;  // spill extents are whole 4 KiB blocks
constexpr size_t kMaxQueued = 4096;   // chunks queued for reading back (256 MiB), at most
constexpr size_t kUnit = 2u << 20;    // whole-unit loads: the x86-64 huge page
constexpr size_t kUnitChunks = kUnit / kChunk;

size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Bytes a chunk stored in `stored` bytes takes in the spill file (a chunk
// that did not compress is stored whole: stored == kChunk).
uint32_t ExtentLen(uint32_t stored) { return static_cast<uint32_t>(RoundUp(stored, kBlockAlign)); }

// What a first touch by a write installs (read faults map the zero page).
alignas(4096) const unsigned char kZeroChunk[kChunk] = {};

// Every engine, for the fork handlers.
std::mutex g_engines_mu;
std::vector<AllocEngine*>& Engines() {
  static auto* v = new std::vector<AllocEngine*>();  // never destroyed: used at exit and in children
  return *v;
}

bool AllZero(const unsigned char* p, size_t n) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < n / 8; i++)
    if (w[i]) return false;
  return true;
}

// Per service thread: staging for one chunk and its compressed form, zstd
// contexts, and (made when the thread starts, where whole-unit loads are
// on) a huge-page slot that units are read into, with room for their
// compressed forms.
struct Scratch {
  std::unique_ptr<unsigned char[]> raw{new unsigned char[kChunk]};
  size_t cap = RoundUp(ZSTD_compressBound(kChunk), kBlockAlign);
  std::unique_ptr<unsigned char[]> packed{new unsigned char[cap]};
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  void* unit_map = nullptr;
  uint64_t unit_map_len = 0;
  unsigned char* unit = nullptr;
  std::unique_ptr<unsigned char[]> unit_packed;
  ~Scratch() {
    ZSTD_freeCCtx(cctx);
    ZSTD_freeDCtx(dctx);
    if (unit_map) munmap(unit_map, unit_map_len);
  }
  // Not registered with any userfaultfd: the kernel gives it a fresh huge
  // page on the first write after each move. nullptr when it cannot be had.
  unsigned char* UnitSlot() {
    if (!unit) {
      unit = reinterpret_cast<unsigned char*>(MapAligned(kUnit, kUnit, &unit_map, &unit_map_len));
      if (!unit) return nullptr;
      RawMadvise(unit, kUnit, MADV_HUGEPAGE);
      unit_packed.reset(new (std::nothrow) unsigned char[kUnitChunks * cap]);
    }
    return unit_packed ? unit : nullptr;
  }
};
Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace

// The engine's own madvise calls go straight to the kernel: under the shim,
// madvise() itself is overridden for managed ranges.
int RawMadvise(void* addr, size_t len, int advice) noexcept {
  return static_cast<int>(syscall(SYS_madvise, addr, len, advice));
}

void AtforkPrepare();
void AtforkParent();
void AtforkChild();

enum class CState : uint8_t { kUntouched, kZero, kDirty, kClean, kSpilled, kLoading, kEvicting, kError };

struct AllocEngine::Chunk {
  CState state = CState::kUntouched;
  bool waiters : 1 = false;  // a fault arrived while loading/evicting: wake after
  // A read-back request for it is queued and still wanted: cleared by any
  // load and by MADV_PAGEOUT, so an entry left in the queue for a chunk
  // that came back and went again meanwhile reads nothing.
  bool queued : 1 = false;
  uint16_t file = 0;
  // Its extent in the spill file (0 = none). Valid data while spilled or
  // clean; a dirty chunk keeps its stale extent to write into next time.
  uint32_t stored = 0;    // kChunk = stored uncompressed
  uint64_t offset = 0;
  uint64_t checksum = 0;
  uint32_t faults = 0;     // first touches and loads (RangeUsage)
  uint32_t evictions = 0;  // written out or dropped
  Chunk* prev = nullptr;
  Chunk* next = nullptr;
  Block* block = nullptr;
  size_t index = 0;
};

struct AllocEngine::Block {
  uintptr_t base = 0;
  size_t size = 0;     // asked for
  size_t mapped = 0;   // whole chunks
  size_t reserved = 0; // arena range from base (>= mapped after a shrink)
  std::unique_ptr<Chunk[]> chunks;
  size_t count = 0;
  uint8_t raw_run = 0;  // chunks in a row that did not compress (Evict)
  // Readahead (ReadAhead): the last chunk loaded on a fault, the window, and
  // the last chunk queued.
  size_t last_load = SIZE_MAX, ra = 0, ra_end = 0;
};

// ---- creation and the service threads ----

Result<std::unique_ptr<AllocEngine>> AllocEngine::Create(const AllocConfig& config) {
  ScopedInternal internal_calls;
  std::unique_ptr<AllocEngine> e(new AllocEngine());
  e->config_ = config;
  e->config_.budget = FitBudgetToCgroup(e->config_.budget, "managed memory");
  if (e->config_.budget < 2 * kChunk) e->config_.budget = 2 * kChunk;
  if (e->config_.workers == 0) e->config_.workers = 1;
  size_t arena = RoundUp(std::max<uint64_t>(config.arena, kChunk), kChunk);
  void* a = mmap(nullptr, arena, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a == MAP_FAILED) return Status::Error(ENOMEM, "cannot reserve %zu bytes of address space for managed memory", arena);
  // Chunk-align the arena (mmap gives page alignment).
  e->lo_ = RoundUp(reinterpret_cast<uintptr_t>(a), kChunk);
  e->hi_ = reinterpret_cast<uintptr_t>(a) + arena;
  e->arena_ = FreeList(e->lo_);
  e->st_.budget_bytes = e->config_.budget;
  e->prefetch_.resize(std::min<size_t>(std::max<size_t>(1, e->LowWater() / kChunk), kMaxQueued));
  FL_RETURN_IF_ERROR(e->NewSpillFile());
  FL_RETURN_IF_ERROR(e->Start());
  std::lock_guard g(g_engines_mu);
  static bool atfork = [] {
    pthread_atfork(AtforkPrepare, AtforkParent, AtforkChild);
    return true;
  }();
  (void)atfork;
  Engines().push_back(e.get());
  return e;
}

Status AllocEngine::Start() {
  auto u = Uffd::Open();
  if (!u.ok()) return u.status();
  if (!u->features().wp)
    return Status::Error(ENOTSUP, "userfaultfd has no write-protect faults for anonymous memory (kernel < 5.7)");
  uffd_ = std::make_unique<Uffd>(std::move(u).value());
  pagemap_.reset(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));  // this process's (again in a fork child)
  // Whole-unit loads need UFFDIO_MOVE, huge pages of 2 MiB, PAGEMAP_SCAN to
  // tell a staged unit is one, and headroom under the budget for a unit.
  // Decided before the threads start: each makes its unit slot then, not
  // on its first fault.
  const bool units = config_.huge_units && uffd_->features().move && TransparentHugePageSize() == kUnit &&
                     pagemap_.valid() && HugeMapped(pagemap_.get(), reinterpret_cast<void*>(lo_), 4096) >= 0 &&
                     HeadroomChunks() >= kUnitChunks;
  unit_ = units ? kUnit : 0;
  // A fork child's pool was not inherited (MADV_DONTFORK): the parent's
  // object is left alone (its munmap could hit a mapping made here later).
  (void)recycle_.release();
  if (unit_) SetUpRecycle();
  stop_fd_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_fd_.valid()) return Status::Error(errno, "eventfd");
  threads_.clear();
  stopping_ = false;
  try {
    for (unsigned i = 0; i < config_.workers; i++) threads_.push_back(new std::thread([this] { Serve(); }));
    threads_.push_back(new std::thread([this] { EvictorLoop(); }));
  } catch (const std::exception&) {
    return Status::Error(EAGAIN, "cannot start a managed-memory service thread");
  }
  return Status::Ok();
}

// Resident bytes above which the evictor works ahead of the faults: a
// little headroom under the budget, so that a fault rarely has to wait for
// a dirty chunk to be compressed and written.
uint64_t AllocEngine::LowWater() const {
  uint64_t headroom = std::max<uint64_t>(4 * kChunk, config_.budget / 32);
  return config_.budget > headroom + kChunk ? config_.budget - headroom : config_.budget;
}

void AllocEngine::KickEvictor() {
  if (st_.resident_bytes > LowWater()) evict_cv_.notify_one();
}

void AllocEngine::EvictorLoop() {
  ScopedInternal internal_calls;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  if (unit_) (void)ThreadScratch().UnitSlot();  // its allocations here, not under a load
  std::unique_lock lk(mu_);
  while (!stopping_) {
    if (st_.resident_bytes > LowWater() && lru_head_ && !spill_full_) {
      if (lru_head_->state == CState::kClean) DropCleanRun();
      else Evict(lk, lru_head_);
      continue;
    }
    if (prefetch_size_) {
      uintptr_t a = prefetch_[prefetch_head_];
      prefetch_head_ = (prefetch_head_ + 1) % prefetch_.size();
      prefetch_size_--;
      Block* b = Find(a);
      Chunk* c = b ? &b->chunks[(a - b->base) / kChunk] : nullptr;
      if (c && c->queued && c->state == CState::kSpilled) {
        // Both unlock: a fault on it meanwhile waits for this load.
        if (!LoadUnit(lk, c, /*prefetch=*/true, /*asked=*/true)) Load(lk, c, /*prefetch=*/true);
        if (!lk.owns_lock()) lk.lock();
      }
      continue;
    }
    evict_cv_.wait(lk);
  }
}

void AllocEngine::SetUpRecycle() {
  recycle_ = std::make_unique<MovePool>();
  if (!recycle_->Set(*uffd_, 2, kUnit, /*huge=*/true)) recycle_.reset();
}

AllocEngine::~AllocEngine() {
  {
    std::lock_guard g(g_engines_mu);
    auto& v = Engines();
    v.erase(std::remove(v.begin(), v.end(), this), v.end());
  }
  uint64_t one = 1;
  if (stop_fd_.valid()) (void)!write(stop_fd_.get(), &one, sizeof one);
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  evict_cv_.notify_all();
  for (std::thread* t : threads_) {
    t->join();
    delete t;
  }
  std::unique_lock lk(mu_);
  for (auto& [base, b] : blocks_) {
    if (uffd_) (void)uffd_->Unregister(reinterpret_cast<void*>(b->base), b->mapped);
  }
  blocks_.clear();
  lk.unlock();
  if (lo_) munmap(reinterpret_cast<void*>(lo_), hi_ - lo_);
}

void AllocEngine::Serve() {
  ScopedInternal internal_calls;  // this thread's own allocations go to the system allocator
  // The service threads must never take a fault they would have to serve.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  if (unit_) (void)ThreadScratch().UnitSlot();  // its allocations here, not on the fault path
  pollfd fds[2] = {{uffd_->fd(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
  uffd_msg msgs[16];
  for (;;) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents) return;
    ssize_t n = read(uffd_->fd(), msgs, sizeof msgs);
    if (n <= 0) continue;  // another thread took them
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t flags = msgs[i].arg.pagefault.flags;
      HandleFault(msgs[i].arg.pagefault.address, (flags & UFFD_PAGEFAULT_FLAG_WP) != 0,
                  (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0);
    }
  }
}

// ---- faults ----

AllocEngine::Block* AllocEngine::Find(uintptr_t addr) const {
  auto it = blocks_.upper_bound(addr);
  if (it == blocks_.begin()) return nullptr;
  --it;
  Block* b = it->second.get();
  return addr < b->base + b->mapped ? b : nullptr;
}

AllocEngine::Block* AllocEngine::FindFrom(uintptr_t addr) const {
  auto it = blocks_.upper_bound(addr);
  if (it != blocks_.begin() && addr < std::prev(it)->second->base + std::prev(it)->second->mapped) --it;
  return it == blocks_.end() ? nullptr : it->second.get();
}

template <typename Fn>
void AllocEngine::ForEachChunk(uintptr_t lo, uintptr_t hi, Fn&& fn) const {
  for (Block* b = FindFrom(lo); b && b->base < hi; b = FindFrom(b->base + b->mapped)) {
    uintptr_t from = std::max(lo, b->base), to = std::min(hi, b->base + b->mapped);
    for (size_t i = (from - b->base) / kChunk; b->base + i * kChunk < to; i++) fn(&b->chunks[i]);
  }
}

AllocEngine::Block* AllocEngine::BlockAt(const void* p, const char* call) {
  auto it = blocks_.find(reinterpret_cast<uintptr_t>(p));
  if (it == blocks_.end()) {
    fprintf(stderr, "faultline: %s(%p): not the start of a managed block\n", call, p);
    abort();
  }
  return it->second.get();
}

uintptr_t AllocEngine::ChunkAddr(const Chunk* c) const { return c->block->base + c->index * kChunk; }

namespace {
// Dirty and clean chunks are the resident ones, and exactly those are on
// the resident list (loading and evicting chunks count in the budget but
// are off the list, so nobody evicts them twice).
bool Listed(CState s) { return s == CState::kDirty || s == CState::kClean; }
}  // namespace

void AllocEngine::LinkResident(Chunk* c) {
  c->prev = lru_tail_;
  c->next = nullptr;
  if (lru_tail_) lru_tail_->next = c;
  else lru_head_ = c;
  lru_tail_ = c;
}

void AllocEngine::LinkOldest(Chunk* c) {
  c->prev = nullptr;
  c->next = lru_head_;
  if (lru_head_) lru_head_->prev = c;
  else lru_tail_ = c;
  lru_head_ = c;
}

void AllocEngine::UnlinkResident(Chunk* c) {
  if (c->prev) c->prev->next = c->next;
  else lru_head_ = c->next;
  if (c->next) c->next->prev = c->prev;
  else lru_tail_ = c->prev;
  c->prev = c->next = nullptr;
}

void AllocEngine::ReleaseChunk(Chunk* c) {
  if (Listed(c->state)) {
    UnlinkResident(c);
    st_.resident_bytes -= kChunk;
  }
  FreeExtent(c, true);
}

void AllocEngine::HandleFault(uintptr_t addr, bool wp, bool write) {
  std::unique_lock lk(mu_);
  Block* b = Find(addr);
  uintptr_t page = addr & ~uintptr_t(4095);
  if (!b) {
    // Not managed memory: a block freed meanwhile (the access faults again
    // and is the program's), or the unit recycle pool, which no access
    // should reach where it has no page; woken alone, that access would
    // fault again forever: a page of zeros goes there first.
    const bool pool = recycle_ && recycle_->Contains(page);
    lk.unlock();
    if (pool) (void)uffd_->ZeroPage(reinterpret_cast<void*>(page), 4096);
    uffd_->Wake(reinterpret_cast<void*>(page), 4096);
    return;
  }
  Chunk* c = &b->chunks[(addr - b->base) / kChunk];
  void* at = reinterpret_cast<void*>(ChunkAddr(c));
  switch (c->state) {
    case CState::kLoading:
    case CState::kEvicting:
      c->waiters = true;  // woken when that finishes
      return;
    case CState::kClean:
      if (wp) {
        // The first write since the chunk came back: its disk copy is stale
        // (kept, to be written over at its next eviction: this path neither
        // allocates nor calls into the file system).
        c->state = CState::kDirty;
        st_.write_faults++;
        UnlinkResident(c);
        LinkResident(c);
        // Unprotected under the lock: an eviction that takes the chunk
        // next protects it again only after this (unlocked, the eviction's
        // protection could be undone here and a write lost while it
        // compresses).
        uffd_->WriteProtect(at, kChunk, false);  // wakes the writer
        return;
      }
      lk.unlock();
      uffd_->Wake(at, kChunk);
      return;
    case CState::kDirty:
      if (wp) {
        uffd_->WriteProtect(at, kChunk, false);  // a stale protection; under the lock, as above
        return;
      }
      lk.unlock();
      uffd_->Wake(at, kChunk);
      return;
    case CState::kUntouched:
    case CState::kZero: {
      if (wp) {  // no page: the write will fault again as missing
        lk.unlock();
        uffd_->Wake(at, kChunk);
        return;
      }
      MakeRoom(lk, kChunk);
      if (c->state != CState::kUntouched && c->state != CState::kZero) {
        lk.unlock();
        uffd_->Wake(at, kChunk);
        return;
      }
      // Loading until its pages are in: an eviction (Evict, MADV_PAGEOUT)
      // must not take it while it has none (the install would make them
      // writable behind the eviction's write protection).
      c->state = CState::kLoading;
      st_.zero_fills++;
      c->faults++;
      st_.resident_bytes += kChunk;
      st_.peak_resident_bytes = std::max(st_.peak_resident_bytes, st_.resident_bytes);
      in_flight_++;
      lk.unlock();
      // A read maps the shared zero page (no memory until written); a
      // write gets real zeroed pages at once, instead of a copy-on-write
      // fault per 4 KiB page later.
      int rc = write ? uffd_->Copy(at, kZeroChunk, kChunk) : uffd_->ZeroPage(at, kChunk);
      lk.lock();
      in_flight_--;
      idle_cv_.notify_all();
      c->state = CState::kDirty;
      LinkResident(c);
      KickEvictor();
      bool w = c->waiters || rc != 0;  // EEXIST: some page raced in
      c->waiters = false;
      lk.unlock();
      if (w) uffd_->Wake(at, kChunk);
      return;
    }
    case CState::kSpilled:
      if (wp) {
        lk.unlock();
        uffd_->Wake(at, kChunk);
        return;
      }
      // A sequential fault reads its unit whole; so does a fault on a unit
      // queued whole that the background thread has not reached yet (the
      // next module's weights, asked for by offload's hooks).
      if (ReadAhead(b, c->index) ? LoadUnit(lk, c, /*prefetch=*/false, /*asked=*/false)
                                 : c->queued && LoadUnit(lk, c, /*prefetch=*/false, /*asked=*/true))
        return;
      Load(lk, c);  // c as LoadUnit left it: looked up again where it made room
      return;
    case CState::kError:
      lk.unlock();
      uffd_->Poison(at, kChunk);
      return;
  }
}

// Frees budget for `need` more bytes by evicting the oldest resident chunks
// (clean ones in runs).
void AllocEngine::MakeRoom(std::unique_lock<std::mutex>& lk, uint64_t need) {
  size_t guard = 0;
  while (st_.resident_bytes + need > config_.budget && lru_head_ && guard++ < 64 + need / kChunk) {
    Chunk* victim = lru_head_;
    if (victim->state == CState::kClean) {
      DropCleanRun();
      continue;
    }
    if (spill_full_) {
      // Only chunks that need no write can go.
      victim = nullptr;
      for (Chunk* c = lru_head_; c; c = c->next)
        if (c->state == CState::kClean) {
          victim = c;
          break;
        }
      if (!victim) return;
    }
    if (!Evict(lk, victim)) return;
  }
}

// Evicts one resident chunk. A clean chunk is dropped at once; a dirty one
// is write-protected, compressed and written with the lock released.
bool AllocEngine::Evict(std::unique_lock<std::mutex>& lk, Chunk* c) {
  if (c->state == CState::kClean) {
    DropClean(c, 1);
    return true;
  }
  void* at = reinterpret_cast<void*>(ChunkAddr(c));
  UnlinkResident(c);
  st_.resident_bytes -= kChunk;
  c->state = CState::kEvicting;
  in_flight_++;
  // After a run of chunks of this block that did not compress, only every
  // 16th is tried (incompressible data, such as f32 weights, then costs no
  // compression; data that starts compressing again is found within 16).
  Block* blk = c->block;
  bool try_zstd = config_.zstd_level > 0 && (blk->raw_run < 4 || c->index % 16 == 0);
  lk.unlock();
  // Writers now fault on the protection and wait; readers go on reading.
  uffd_->WriteProtect(at, kChunk, true);
  Scratch& s = ThreadScratch();
  const auto* data = static_cast<const unsigned char*>(at);
  // The program's writes to the chunk are ordered before these reads by
  // the write-protect ioctl (a writer now waits for us), which TSan cannot
  // see: its reads of the chunk are not races.
  FL_TSAN_IGNORE_READS_BEGIN();
  bool zero = AllZero(data, kChunk);
  if (zero) FL_TSAN_IGNORE_READS_END();  // (else after the checksum below)
  Status err;
  uint32_t stored = 0;
  uint64_t sum = 0;
  uint16_t file = 0;
  uint64_t off = 0;
  bool placed = false;
  if (!zero) {
    const unsigned char* src = data;
    stored = kChunk;
    if (try_zstd) {
      size_t z = ZSTD_compressCCtx(s.cctx, s.packed.get(), s.cap, data, kChunk, config_.zstd_level);
      // Kept compressed only when that saves an eighth or more: decoding
      // 64 KiB costs ~50 us of a core, more than reading the eighth saved
      // takes even from disk (and f32 weights shrink ~1.1x).
      if (!ZSTD_isError(z) && z <= kChunk - kChunk / 8) {
        src = s.packed.get();
        stored = static_cast<uint32_t>(z);
        memset(s.packed.get() + z, 0, ExtentLen(stored) - z);
      }
    }
    sum = Checksum64(src, stored);
    FL_TSAN_IGNORE_READS_END();
    lk.lock();
    if (try_zstd) blk->raw_run = stored == kChunk ? static_cast<uint8_t>(std::min(blk->raw_run + 1, 255)) : 0;
    placed = PlaceExtent(c, stored, &file, &off);
    int fd = placed ? files_[file].fd.get() : -1;
    lk.unlock();
    if (!placed) {
      err = Status::Error(ENOSPC, "no room in the spill file");
    } else {
      ReadOp op{fd, off, ExtentLen(stored), const_cast<unsigned char*>(src), true};
      err = ReadBatch({&op, 1}, "the spill file");
    }
  }
  lk.lock();
  in_flight_--;
  if (!err.ok()) {
    // Keep the data: the chunk stays resident (over budget) and writable.
    if (placed) FreeExtent(c, true);
    st_.errors++;
    spill_full_ = true;
    c->state = CState::kDirty;
    st_.resident_bytes += kChunk;
    LinkResident(c);
    c->waiters = false;
    idle_cv_.notify_all();
    uffd_->WriteProtect(at, kChunk, false);  // under the lock, as in HandleFault; wakes waiting writers
    uffd_->Wake(at, kChunk);
    return false;
  }
  RawMadvise(at, kChunk, MADV_DONTNEED);
  c->evictions++;
  if (zero) {
    FreeExtent(c, true);  // a stale extent from an earlier spill
    c->state = CState::kZero;
    st_.zero_drops++;
  } else {
    c->state = CState::kSpilled;
    c->checksum = sum;
    st_.spills++;
    st_.bytes_spilled += kChunk;
    st_.bytes_stored += stored;
  }
  bool w = c->waiters;
  c->waiters = false;
  idle_cv_.notify_all();
  if (w) {
    lk.unlock();
    uffd_->Wake(at, kChunk);  // they fault again, as missing, and the chunk comes back
    lk.lock();
  }
  return true;
}

// Reads a spilled chunk back and installs it write-protected (clean).
void AllocEngine::Load(std::unique_lock<std::mutex>& lk, Chunk* c, bool prefetch) {
  const uintptr_t addr = ChunkAddr(c);
  MakeRoom(lk, kChunk);
  // Making room may unlock: the block can have been freed meanwhile (a
  // prefetch of memory the program frees).
  Block* b = Find(addr);
  if (!b) return;
  c = &b->chunks[(addr - b->base) / kChunk];
  if (c->state != CState::kSpilled) {  // changed while making room
    void* at = reinterpret_cast<void*>(ChunkAddr(c));
    if (c->state == CState::kLoading || c->state == CState::kEvicting) c->waiters = true;
    else {
      lk.unlock();
      uffd_->Wake(at, kChunk);
    }
    return;
  }
  c->state = CState::kLoading;
  c->queued = false;
  // Counted now: the install wakes the faulting thread before the lock is
  // taken again.
  if (prefetch) st_.prefetched++;
  else c->faults++;
  st_.loads++;
  in_flight_++;
  st_.resident_bytes += kChunk;
  st_.peak_resident_bytes = std::max(st_.peak_resident_bytes, st_.resident_bytes);
  int fd = files_[c->file].fd.get();
  uint64_t off = c->offset;
  uint32_t stored = c->stored;
  bool raw = stored == kChunk;
  uint64_t sum = c->checksum;
  void* at = reinterpret_cast<void*>(ChunkAddr(c));
  lk.unlock();
  Scratch& s = ThreadScratch();
  ReadOp op{fd, off, ExtentLen(stored), raw ? s.raw.get() : s.packed.get()};
  Status err = ReadBatch({&op, 1}, "the spill file");
  if (err.ok() && !ChecksumMatches(sum, raw ? s.raw.get() : s.packed.get(), stored))
    err = Status::Error(EBADMSG, "a spilled chunk failed its checksum");
  if (err.ok() && !raw) {
    size_t z = ZSTD_decompressDCtx(s.dctx, s.raw.get(), kChunk, s.packed.get(), stored);
    if (ZSTD_isError(z) || z != kChunk) err = Status::Error(EBADMSG, "a spilled chunk does not decompress");
  }
  int rc = err.ok() ? uffd_->CopyWp(at, s.raw.get(), kChunk) : 0;
  lk.lock();
  in_flight_--;
  idle_cv_.notify_all();
  if (!err.ok()) {
    c->waiters = false;
    st_.errors++;
    st_.resident_bytes -= kChunk;
    c->state = CState::kError;
    lk.unlock();
    // Never wrong data: the faulting threads get SIGBUS.
    if (uffd_->Poison(at, kChunk) != 0) {
      fprintf(stderr, "faultline: %s; cannot deliver SIGBUS (no UFFDIO_POISON)\n", err.message());
      abort();
    }
    return;
  }
  (void)rc;  // EEXIST cannot happen: only this thread installs a loading chunk
  c->state = CState::kClean;
  LinkResident(c);
  KickEvictor();
  if (c->waiters) {
    // A write faulted on the fresh write protection before the chunk was
    // marked clean: it is woken to fault again and find it clean.
    c->waiters = false;
    lk.unlock();
    uffd_->Wake(at, kChunk);
  }
}

// ---- the spill file ----

Status AllocEngine::NewSpillFile() {
  std::string dir = config_.spill_dir;
  if (dir.empty()) {
    const char* t = getenv("TMPDIR");
    dir = t && *t ? t : "/var/tmp";
  }
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return Status::Error(errno, "cannot create a spill file in %s", dir.c_str());
  for (SpillFile& f : files_) {
    f.writable = false;
    if (f.live == 0 && f.fd.valid()) {
      st_.spill_file_bytes -= f.space.end();
      f.fd.reset();
    }
  }
  SpillFile f;
  f.fd.reset(fd);
  files_.push_back(std::move(f));
  return Status::Ok();
}

uint64_t FreeList::Take(uint64_t len, uint64_t align, uint64_t limit) {
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    uint64_t fs = it->first, fe = fs + it->second, start = RoundUp(fs, align);
    if (start < fs || start + len > fe || start + len < start) continue;  // (or the round-up overflowed)
    // The range's node is reused for what is left of it (no allocation in
    // the common case of one remainder).
    auto node = free_.extract(it);
    if (start > fs) {
      node.mapped() = start - fs;
      free_.insert(std::move(node));
    }
    if (start + len < fe) {
      if (node.empty()) {
        free_.emplace(start + len, fe - start - len);
      } else {
        node.key() = start + len;
        node.mapped() = fe - start - len;
        free_.insert(std::move(node));
      }
    }
    return start;
  }
  uint64_t start = RoundUp(end_, align);
  if (start + len > limit || start + len < start) return kNone;
  if (start > end_) free_.emplace(end_, start - end_);
  end_ = start + len;
  return start;
}

void FreeList::Give(uint64_t off, uint64_t len) {
  auto next = free_.lower_bound(off);
  if (next != free_.end() && off + len == next->first) {
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      off = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  if (off + len == end_) end_ = off;
  else free_.emplace(off, len);
}

// Where a chunk's `stored` bytes go: over its own stale extent when that is
// in the file being written and large enough (the rest of it goes back),
// else a new extent there.
bool AllocEngine::PlaceExtent(Chunk* c, uint32_t stored, uint16_t* file, uint64_t* off) {
  uint32_t len = ExtentLen(stored);
  if (c->stored && files_[c->file].writable && ExtentLen(c->stored) >= len) {
    if (ExtentLen(c->stored) > len) {
      SpillFile& f = files_[c->file];
      uint64_t before = f.space.end();
      f.space.Give(c->offset + len, ExtentLen(c->stored) - len);
      st_.spill_file_bytes -= before - f.space.end();
    }
    c->stored = stored;
    *file = c->file;
    *off = c->offset;
    return true;
  }
  FreeExtent(c, false);
  if (files_.size() > UINT16_MAX || !files_.back().writable || !files_.back().fd.valid()) return false;
  SpillFile& f = files_.back();
  uint64_t before = f.space.end();
  uint64_t at = f.space.Take(len, kBlockAlign, FreeList::kNone - 1);
  st_.spill_file_bytes += f.space.end() - before;
  f.live++;
  c->file = static_cast<uint16_t>(files_.size() - 1);
  c->offset = at;
  c->stored = stored;
  *file = c->file;
  *off = at;
  return true;
}

// Gives a chunk's extent back. `punch` returns the disk space at once (the
// memory is gone); an extent freed to be rewritten elsewhere is left as it is.
void AllocEngine::FreeExtent(Chunk* c, bool punch) {
  if (!c->stored) return;
  SpillFile& f = files_[c->file];
  uint64_t off = c->offset, len = ExtentLen(c->stored);
  c->stored = 0;
  f.live--;
  uint64_t before = f.space.end();
  if (!f.writable) {
    // Shared with a process forked earlier: never reused; closed when no
    // chunk of ours refers to it.
    if (f.live == 0 && f.fd.valid()) {
      st_.spill_file_bytes -= before;
      f.fd.reset();
    }
    return;
  }
  f.space.Give(off, len);
  spill_full_ = false;  // room again for a write that failed for want of it
  if (f.space.end() < before) {
    st_.spill_file_bytes -= before - f.space.end();
    (void)!ftruncate(f.fd.get(), static_cast<off_t>(f.space.end()));
  } else if (punch) {
    fallocate(f.fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), static_cast<off_t>(len));
  }
}

// Whether the spill directory can take what this allocation could push out
// (uncompressed, the worst case) on top of what is managed already.
bool AllocEngine::SpillRoomFor(uint64_t more) {
  uint64_t managed = st_.bytes_managed + more;
  if (managed <= config_.budget) return true;
  uint64_t need = managed - config_.budget;
  uint64_t have = 0;
  for (const SpillFile& f : files_)
    if (f.writable) have += f.space.end();  // its extents, used or free, serve chunks counted in `managed`
  struct statvfs sv;
  if (fstatvfs(files_.back().fd.get(), &sv) != 0) return true;  // cannot tell: let it run
  have += static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
  return have >= need;
}

// ---- blocks ----

void AllocEngine::ReleaseRange(uintptr_t base, size_t len) {
  // Back to reserved, inaccessible address space (memory and registration go).
  mmap(reinterpret_cast<void*>(base), len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  arena_.Give(base, len);
}

std::unique_ptr<AllocEngine::Block> AllocEngine::NewBlock(uintptr_t base, size_t size, size_t mapped) {
  auto b = std::unique_ptr<Block>(new (std::nothrow) Block());
  if (!b) return nullptr;
  b->base = base;
  b->reserved = mapped;
  b->size = size;
  b->mapped = mapped;
  b->count = mapped / kChunk;
  b->chunks.reset(new (std::nothrow) Chunk[b->count]);
  if (!b->chunks) return nullptr;
  for (size_t i = 0; i < b->count; i++) {
    b->chunks[i].block = b.get();
    b->chunks[i].index = i;
  }
  return b;
}

bool AllocEngine::MapFresh(uintptr_t base, size_t len) {
  return mmap(reinterpret_cast<void*>(base), len, PROT_READ | PROT_WRITE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) != MAP_FAILED;
}

bool AllocEngine::Register(void* p, size_t len) {
  RawMadvise(p, len, MADV_NOHUGEPAGE);  // chunks are the unit; a huge page would span 32
  return uffd_->RegisterMissingWp(p, len).ok();
}

void* AllocEngine::Allocate(size_t size, size_t alignment) noexcept {
  ScopedInternal internal_calls;
  if (size == 0) size = 1;
  if (size > hi_ - lo_ || alignment > hi_ - lo_ || alignment == 0 || (alignment & (alignment - 1))) {
    errno = ENOMEM;
    return nullptr;
  }
  size_t mapped = RoundUp(size, kChunk);
  size_t align = std::max(alignment, kChunk);
  std::unique_lock lk(mu_);
  if (!SpillRoomFor(mapped)) {
    errno = ENOMEM;
    return nullptr;
  }
  uint64_t base = FreeList::kNone;
  if (unit_ && mapped >= unit_) base = arena_.Take(mapped, std::max(align, unit_), hi_);  // whole units can be moved in
  if (base == FreeList::kNone) base = arena_.Take(mapped, align, hi_);
  if (base == FreeList::kNone) {
    errno = ENOMEM;
    return nullptr;
  }
  auto b = NewBlock(base, size, mapped);
  void* p = reinterpret_cast<void*>(base);
  if (!b || !MapFresh(base, mapped) || !Register(p, mapped)) {
    ReleaseRange(base, mapped);
    errno = ENOMEM;
    return nullptr;
  }
  blocks_.emplace(base, std::move(b));
  st_.allocations++;
  st_.bytes_managed += mapped;
  st_.peak_bytes_managed = std::max(st_.peak_bytes_managed, st_.bytes_managed);
  return p;
}

void AllocEngine::WaitIdle(std::unique_lock<std::mutex>& lk, Block* b) {
  for (;;) {
    bool busy = false;
    for (size_t i = 0; i < b->count && !busy; i++)
      busy = b->chunks[i].state == CState::kLoading || b->chunks[i].state == CState::kEvicting;
    if (!busy) return;
    idle_cv_.wait(lk);
  }
}

void AllocEngine::Free(void* p) noexcept {
  ScopedInternal internal_calls;
  std::unique_lock lk(mu_);
  Block* b = BlockAt(p, "free");
  WaitIdle(lk, b);
  for (size_t i = 0; i < b->count; i++) ReleaseChunk(&b->chunks[i]);
  (void)uffd_->Unregister(reinterpret_cast<void*>(b->base), b->mapped);
  st_.frees++;
  st_.bytes_managed -= b->mapped;
  uintptr_t base = b->base;
  size_t reserved = b->reserved;
  blocks_.erase(base);
  ReleaseRange(base, reserved);
}

// Drops the oldest chunk, clean, together with the clean chunks that
// follow it in both the eviction order and the address space (a sequential
// sweep reads them back in order): one madvise, so one TLB shootdown, for
// up to 1 MiB, and at most the headroom under the budget at once.
void AllocEngine::DropCleanRun() {
  size_t most = std::min<size_t>(16, HeadroomChunks());
  if (UnitCapable(lru_head_->block)) {
    // Up to the end of its unit: a unit loaded whole goes in one call, and
    // its huge page is not split.
    most = std::min<size_t>(kUnitChunks - lru_head_->index % kUnitChunks, HeadroomChunks());
  }
  size_t n = 1;
  for (Chunk* c = lru_head_; n < most && c->next && c->next->state == CState::kClean &&
                             c->next->block == c->block && c->next->index == c->index + 1;
       c = c->next)
    n++;
  DropClean(lru_head_, n);
}

// Drops `first` and the n - 1 chunks after it in the eviction order, all
// clean and next to each other in the address space: their copies are on
// disk, nothing is written.
void AllocEngine::DropClean(Chunk* first, size_t n) {
  auto* at = reinterpret_cast<std::byte*>(ChunkAddr(first));
  uint64_t kept = 0;  // moved into the recycle pool
  if (n == kUnitChunks && first->index % kUnitChunks == 0 && UnitCapable(first->block) && recycle_ &&
      recycle_->has_hole() && HugeMapped(pagemap_.get(), at, kUnit) == 1)
    kept = recycle_->Stash(*uffd_, at, kUnit);
  if (kept < n * kChunk) RawMadvise(at + kept, n * kChunk - kept, MADV_DONTNEED);
  Chunk* c = first;
  for (size_t i = 0; i < n; i++) {
    Chunk* next = c->next;
    UnlinkResident(c);
    c->state = CState::kSpilled;
    c->evictions++;
    c = next;
  }
  st_.resident_bytes -= n * kChunk;
  st_.clean_drops += n;
}

size_t AllocEngine::HeadroomChunks() const { return std::max<uint64_t>(1, (config_.budget - LowWater()) / kChunk); }

// Readahead on faults that load chunks of a block in address order: the
// window (chunks queued for the background thread past the faulting one)
// doubles from 2 to 16 while the loads stay sequential, and a fault inside
// or just past the window (its chunks came in without faulting) counts as
// sequential too. Never more than the headroom under the budget at once.
// In a block that takes whole units the window is the next unit (the
// background thread reads it whole while the faulting thread reads its own
// unit: with a wider window the background thread did all the reading, and
// a read sweep ran at 2.4-2.6 GB/s against 2.9-3.5 with one unit). Returns
// whether the fault was sequential.
bool AllocEngine::ReadAhead(Block* b, size_t index) {
  // A fault on the first chunk of a block that takes whole units counts as
  // sequential too: a tensor is read from its start (offloaded weights
  // every pass; before, each pass read a weight's first unit by chunks).
  bool start = index == 0 && UnitCapable(b);
  bool sequential = start || (b->last_load != SIZE_MAX && index > b->last_load && index <= b->ra_end + 1);
  if (start) b->ra_end = 0;  // a new stream: the window of the last one (at the block's end) is no guide
  b->ra = sequential ? std::min<size_t>(b->ra ? 2 * b->ra : 2, 16) : 0;
  b->last_load = index;
  if (!b->ra) {
    b->ra_end = index;
    return false;
  }
  size_t most = HeadroomChunks();
  size_t end = index + std::min(b->ra, most);
  if (UnitCapable(b)) end = (index / kUnitChunks + 2) * kUnitChunks - 1;
  end = std::min(end, b->count - 1);
  size_t from = std::max(index, b->ra_end) + 1;
  if (from <= end) QueuePrefetch(b->base + from * kChunk, b->base + (end + 1) * kChunk);
  b->ra_end = std::max(b->ra_end, end);
  return true;
}

bool AllocEngine::UnitCapable(const Block* b) const { return unit_ && b->base % unit_ == 0 && b->mapped >= unit_; }

// Whole-unit loads. Where the 2 MiB unit holding `c` lies in its block and
// every chunk of it is spilled (and, where `asked`, queued: a hint for one
// chunk does not read 32), its chunks are read in one batch into
// this thread's huge-page slot, checked, decompressed, and the slot's huge
// page is moved into place by one UFFDIO_MOVE (one page-table entry, one
// TLB flush, no page allocated or copied; 64 KiB installs by UFFDIO_COPY
// cost 3-4x more per byte, and moving 64 KiB of small pages costs a TLB
// flush per page: see docs/ARCHITECTURE.md). A move has no write-protect
// mode, so the unit is protected after it, and a write that landed in
// between is found by hashing every chunk again: that chunk comes back
// dirty. Where the slot did not get a huge page, or the move stops part
// way, the rest goes in by UFFDIO_COPY_MODE_WP. The slot is the huge page
// of a unit evicted whole where the recycle pool has one. A read or check
// that fails puts everything back as it was and returns false: the chunk
// is then loaded alone, which reports the error.
bool AllocEngine::LoadUnit(std::unique_lock<std::mutex>& lk, Chunk*& c, bool prefetch, bool asked) {
  Block* b = nullptr;
  size_t first = 0;
  // Whether the unit holding c can be read whole.
  auto whole = [&] {
    b = c->block;
    first = c->index / kUnitChunks * kUnitChunks;
    if (!UnitCapable(b) || first + kUnitChunks > b->count) return false;
    for (size_t i = first; i < first + kUnitChunks; i++) {
      const Chunk& k = b->chunks[i];
      if (k.state != CState::kSpilled || (asked && !k.queued)) return false;
    }
    return true;
  };
  if (!whole()) return false;
  Scratch& s = ThreadScratch();
  if (!s.UnitSlot()) return false;
  if (st_.resident_bytes + kUnit > config_.budget) {
    // Making room unlocks where the oldest chunks are dirty (a sweep that
    // wrote before it reads: they are written out), so the chunk is looked
    // up again (its block may be gone, the unit changed).
    const uintptr_t addr = ChunkAddr(c);
    MakeRoom(lk, kUnit);
    Block* nb = Find(addr);
    if (!nb) {
      c = nullptr;
      return true;  // nothing left to load
    }
    c = &nb->chunks[(addr - nb->base) / kChunk];
    if (st_.resident_bytes + kUnit > config_.budget || !whole()) return false;
  }
  const uintptr_t at = b->base + first * kChunk;
  struct Part {
    int fd;
    uint64_t offset;
    uint32_t stored;
    uint64_t sum;
  } parts[kUnitChunks];
  for (size_t i = 0; i < kUnitChunks; i++) {
    Chunk& k = b->chunks[first + i];
    k.state = CState::kLoading;
    k.queued = false;
    parts[i] = {files_[k.file].fd.get(), k.offset, k.stored, k.checksum};
  }
  // A recycled huge page where there is one, else this thread's slot (the
  // kernel zeroes a fresh huge page for it).
  const int32_t recycled = recycle_ ? recycle_->TakeHuge(pagemap_.get()) : -1;
  unsigned char* slot = recycled >= 0 ? reinterpret_cast<unsigned char*>(recycle_->At(recycled)) : s.unit;
  in_flight_++;
  st_.resident_bytes += kUnit;
  st_.peak_resident_bytes = std::max(st_.peak_resident_bytes, st_.resident_bytes);
  // Counted now, as in Load: a thread can read the unit once it is moved
  // in, before this one locks again (taken back if the read fails).
  const uint64_t ahead = prefetch ? kUnitChunks : kUnitChunks - 1;
  st_.loads += kUnitChunks;
  st_.unit_loads++;
  st_.prefetched += ahead;
  if (!prefetch) c->faults++;
  lk.unlock();

  ReadOp ops[kUnitChunks];
  for (size_t i = 0; i < kUnitChunks; i++) {
    bool raw = parts[i].stored == kChunk;
    ops[i] = {parts[i].fd, parts[i].offset, ExtentLen(parts[i].stored),
              raw ? slot + i * kChunk : s.unit_packed.get() + i * s.cap};
  }
  Status err = ReadBatch({ops, kUnitChunks}, "the spill file");
  uint64_t raw_sum[kUnitChunks];
  for (size_t i = 0; i < kUnitChunks && err.ok(); i++) {
    const auto* stored = static_cast<const unsigned char*>(ops[i].buf);
    if (!ChecksumMatches(parts[i].sum, stored, parts[i].stored)) {
      err = Status::Error(EBADMSG, "a spilled chunk failed its checksum");
    } else if (parts[i].stored == kChunk) {
      raw_sum[i] = parts[i].sum;
    } else {
      size_t z = ZSTD_decompressDCtx(s.dctx, slot + i * kChunk, kChunk, stored, parts[i].stored);
      if (ZSTD_isError(z) || z != kChunk) err = Status::Error(EBADMSG, "a spilled chunk does not decompress");
      else raw_sum[i] = Checksum64(slot + i * kChunk, kChunk);
    }
  }
  bool dirty[kUnitChunks] = {};
  uint64_t moved = 0;
  bool huge = false;  // went in as one huge page
  if (err.ok()) {
    auto* dst = reinterpret_cast<unsigned char*>(at);
    if (HugeMapped(pagemap_.get(), slot, kUnit) == 1) {
      // A page table left over from 64 KiB installs in the unit's range
      // (nothing is mapped there: every chunk is loading) would make the
      // kernel split the huge page and move 512 small ones; dropping the
      // empty range frees it. The slot, once any page left it, goes the
      // same way after the copy of the rest (a table left there by a split
      // or partial move would give its next fill small pages).
      RawMadvise(dst, kUnit, MADV_DONTNEED);
      (void)uffd_->Move(dst, slot, kUnit, /*wake=*/false, &moved);
      huge = moved == kUnit && HugeMapped(pagemap_.get(), dst, kUnit) == 1;
    }
    int rc = moved < kUnit ? uffd_->CopyWp(dst + moved, slot + moved, kUnit - moved) : 0;
    if (moved) RawMadvise(slot, kUnit, MADV_DONTNEED);
    if (rc != 0) {
      // No memory for the pages (nothing else can be there: every chunk is
      // loading). What did go in is dropped and the chunks load alone.
      RawMadvise(dst, kUnit, MADV_DONTNEED);
      err = Status::Error(-rc, "cannot install a unit read back");
    } else if (moved) {
      uffd_->WriteProtect(dst, moved, true);
      for (size_t i = 0; i * kChunk < moved; i++) dirty[i] = Checksum64(dst + i * kChunk, kChunk) != raw_sum[i];
    }
  }

  lk.lock();
  in_flight_--;
  idle_cv_.notify_all();
  if (recycled >= 0) recycle_->Return(recycled, moved);  // a hole once its page moved
  if (err.ok()) {
    st_.unit_moves += huge;
    st_.unit_recycled += recycled >= 0;
  }
  for (size_t i = 0; i < kUnitChunks; i++) {
    Chunk& k = b->chunks[first + i];
    k.waiters = false;  // the whole unit is woken below
    if (!err.ok()) {
      k.state = CState::kSpilled;
      continue;
    }
    if (dirty[i]) {
      k.state = CState::kDirty;
      st_.write_faults++;
      uffd_->WriteProtect(reinterpret_cast<void*>(at + i * kChunk), kChunk, false);  // under the lock, as in HandleFault
    } else {
      k.state = CState::kClean;
    }
    LinkResident(&k);
  }
  if (!err.ok()) {
    // Faults that waited fault again and load their chunks alone; the
    // block cannot have gone (Free waits for loading chunks).
    st_.resident_bytes -= kUnit;
    st_.loads -= kUnitChunks;
    st_.unit_loads--;
    st_.prefetched -= ahead;
    if (!prefetch) c->faults--;
    uffd_->Wake(reinterpret_cast<void*>(at), kUnit);
    return false;
  }
  KickEvictor();
  lk.unlock();
  uffd_->Wake(reinterpret_cast<void*>(at), kUnit);
  return true;
}

// Queues the spilled chunks of [lo, hi) for the background thread, newest
// requests last; a full queue forgets its oldest (readahead that the reader
// has overtaken is worth least).
void AllocEngine::QueuePrefetch(uintptr_t lo, uintptr_t hi) {
  bool any = false;
  ForEachChunk(lo, hi, [&](Chunk* c) {
    if (c->state != CState::kSpilled) return;
    if (prefetch_size_ == prefetch_.size()) {
      prefetch_head_ = (prefetch_head_ + 1) % prefetch_.size();
      prefetch_size_--;
    }
    prefetch_[(prefetch_head_ + prefetch_size_++) % prefetch_.size()] = ChunkAddr(c);
    c->queued = true;
    any = true;
  });
  if (any) evict_cv_.notify_one();
}

// Spills (dirty) or drops (clean) every resident chunk of [lo, hi) now.
bool AllocEngine::PageOut(std::unique_lock<std::mutex>& lk, uintptr_t lo, uintptr_t hi) {
  bool ok = true;
  // What was asked for earlier is not wanted now.
  ForEachChunk(lo, hi, [](Chunk* c) { c->queued = false; });
  // Evict unlocks: the blocks are looked up again for every chunk.
  for (uintptr_t a = lo; a < hi;) {
    Block* b = FindFrom(a);
    if (!b || b->base >= hi) break;
    a = std::max(a, b->base);
    Chunk* c = &b->chunks[(a - b->base) / kChunk];
    if (c->state == CState::kLoading || c->state == CState::kEvicting) {
      idle_cv_.wait(lk);  // then look again
      continue;
    }
    if (Listed(c->state) && !Evict(lk, c)) ok = false;
    a = (a & ~(kChunk - 1)) + kChunk;
  }
  return ok;
}

int AllocEngine::Advise(void* addr, size_t len, int advice) noexcept {
  ScopedInternal internal_calls;
  if (advice == MADV_HUGEPAGE || advice == MADV_NOHUGEPAGE) return 0;  // chunks are the unit
  uintptr_t lo = reinterpret_cast<uintptr_t>(addr);
  uintptr_t hi = len > UINTPTR_MAX - lo ? UINTPTR_MAX : lo + len;
  if (advice == MADV_WILLNEED) {
    std::lock_guard lk(mu_);
    QueuePrefetch(lo, hi);
    return 0;
  }
  if (advice == MADV_PAGEOUT) {
    std::unique_lock lk(mu_);
    if (PageOut(lk, lo, hi)) return 0;
    errno = ENOSPC;
    return -1;
  }
  if (advice == MADV_COLD) {
    std::lock_guard lk(mu_);
    ForEachChunk(lo, hi, [&](Chunk* c) {
      if (!Listed(c->state)) return;
      UnlinkResident(c);
      LinkOldest(c);
    });
    return 0;
  }
  if (advice != MADV_DONTNEED && advice != MADV_FREE) return RawMadvise(addr, len, advice);
  // The range's contents go: whole chunks become zero chunks (memory, disk
  // copy and budget freed); the ends of partly covered chunks are zeroed.
  uintptr_t a = reinterpret_cast<uintptr_t>(addr), end = a + len;
  std::unique_lock lk(mu_);
  while (a < end) {
    Block* b = Find(a);
    if (!b) {
      a = RoundUp(a + 1, kChunk);
      continue;
    }
    WaitIdle(lk, b);
    for (; a < end && a < b->base + b->mapped; a = RoundUp(a + 1, kChunk)) {
      Chunk* c = &b->chunks[(a - b->base) / kChunk];
      uintptr_t cs = ChunkAddr(c), ce = cs + kChunk;
      if (a == cs && end >= ce) {
        if (Listed(c->state)) RawMadvise(reinterpret_cast<void*>(cs), kChunk, MADV_DONTNEED);
        ReleaseChunk(c);
        c->state = CState::kZero;
      } else if (advice == MADV_DONTNEED) {
        uintptr_t ze = std::min(end, ce);
        lk.unlock();
        memset(reinterpret_cast<void*>(a), 0, ze - a);  // may fault the chunk in: served as usual
        lk.lock();
      }
    }
  }
  return 0;
}

size_t AllocEngine::UsableSize(const void* p) noexcept {
  std::lock_guard lk(mu_);
  auto it = blocks_.find(reinterpret_cast<uintptr_t>(p));
  return it == blocks_.end() ? 0 : it->second->mapped;
}

// Moves the pages of [from, +len) to `to`, whatever mappings the range
// spans: mremap moves one mapping at a time (EFAULT for a range over more
// than one; a hint on part of a block splits it). Halves until each piece
// is one mapping; on a failure after a piece moved, moves it back.
static bool MoveRange(uintptr_t from, size_t len, uintptr_t to) {
  if (mremap(reinterpret_cast<void*>(from), len, len, MREMAP_MAYMOVE | MREMAP_FIXED, reinterpret_cast<void*>(to)) !=
      MAP_FAILED)
    return true;
  if (errno != EFAULT || len <= 4096) return false;
  size_t half = len / 2 / 4096 * 4096;
  if (!MoveRange(from, half, to)) return false;
  if (MoveRange(from + half, len - half, to + half)) return true;
  int saved = errno;
  if (!MoveRange(to, half, from)) {
    fprintf(stderr, "faultline: realloc: cannot move a block back after a failed move\n");
    abort();  // its pages would be in two places
  }
  errno = saved;
  return false;
}

void* AllocEngine::Reallocate(void* p, size_t size) noexcept {
  ScopedInternal internal_calls;
  if (size == 0) size = 1;
  if (size > hi_ - lo_) {  // also keeps the round-up below from overflowing
    errno = ENOMEM;
    return nullptr;
  }
  size_t mapped = RoundUp(size, kChunk);
  std::unique_lock lk(mu_);
  Block* b = BlockAt(p, "realloc");
  WaitIdle(lk, b);
  if (mapped <= b->mapped) {
    // Shrink: the chunks past the new end go (memory, disk copies, budget).
    for (size_t i = mapped / kChunk; i < b->count; i++) {
      ReleaseChunk(&b->chunks[i]);
      b->chunks[i].state = CState::kUntouched;
    }
    if (mapped < b->mapped) {
      (void)uffd_->Unregister(reinterpret_cast<void*>(b->base + mapped), b->mapped - mapped);
      mmap(reinterpret_cast<void*>(b->base + mapped), b->mapped - mapped, PROT_NONE,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
      st_.bytes_managed -= b->mapped - mapped;
      b->mapped = mapped;
      b->count = mapped / kChunk;
    }
    b->size = size;
    return p;
  }
  if (!SpillRoomFor(mapped - b->mapped)) {
    errno = ENOMEM;
    return nullptr;
  }
  // Grow: a new range, the old pages moved there by the kernel (resident
  // ones keep their frames, spilled ones keep their disk copies), the tail
  // fresh. One mremap that also extends the mapping keeps the block one
  // mapping, so the next grow is one call too; a block split by a hint
  // moves piece by piece. mremap drops the userfaultfd registration, so it
  // is made again and clean chunks are write-protected again.
  uint64_t nbase = arena_.Take(mapped, kChunk, hi_);
  if (nbase == FreeList::kNone) {
    errno = ENOMEM;
    return nullptr;
  }
  auto nb = NewBlock(nbase, size, mapped);
  void* np = reinterpret_cast<void*>(nbase);
  bool extended = nb && mremap(reinterpret_cast<void*>(b->base), b->mapped, mapped, MREMAP_MAYMOVE | MREMAP_FIXED,
                               np) != MAP_FAILED;
  if (!extended && (!nb || !MoveRange(b->base, b->mapped, nbase))) {
    ReleaseRange(nbase, mapped);
    errno = ENOMEM;
    return nullptr;
  }
  if ((!extended && !MapFresh(nbase + b->mapped, mapped - b->mapped)) || !Register(np, mapped)) {
    fprintf(stderr, "faultline: realloc: cannot map or register the moved block\n");
    abort();  // the old block's pages are already at the new address
  }
  // Move the chunk records; the resident list keeps its order.
  for (size_t i = 0; i < b->count; i++) {
    Chunk* c = &nb->chunks[i];
    const Chunk* o = &b->chunks[i];
    c->state = o->state;
    c->file = o->file;
    c->stored = o->stored;
    c->offset = o->offset;
    c->checksum = o->checksum;
    if (Listed(o->state)) {  // take o's place in the list
      c->prev = o->prev;
      c->next = o->next;
      if (c->prev) c->prev->next = c;
      else lru_head_ = c;
      if (c->next) c->next->prev = c;
      else lru_tail_ = c;
    }
    if (c->state == CState::kClean) uffd_->WriteProtect(reinterpret_cast<void*>(nbase + i * kChunk), kChunk, true);
  }
  st_.bytes_managed += mapped - b->mapped;
  st_.peak_bytes_managed = std::max(st_.peak_bytes_managed, st_.bytes_managed);
  uintptr_t obase = b->base;
  size_t oreserved = b->reserved;
  blocks_.erase(obase);
  ReleaseRange(obase, oreserved);
  blocks_.emplace(nbase, std::move(nb));
  return np;
}

AllocStats AllocEngine::stats() const noexcept {
  std::lock_guard lk(mu_);
  return st_;
}

RangeUsage AllocEngine::Usage(const void* addr, size_t len) const noexcept {
  RangeUsage u;
  uintptr_t lo = reinterpret_cast<uintptr_t>(addr);
  uintptr_t hi = len > UINTPTR_MAX - lo ? UINTPTR_MAX : lo + len;
  std::lock_guard lk(mu_);
  ForEachChunk(lo, hi, [&](const Chunk* cp) {
    const Chunk& c = *cp;
    uintptr_t at = ChunkAddr(cp);
    uint64_t n = std::min<uintptr_t>(hi, at + kChunk) - std::max(lo, at);  // its bytes in the range
    switch (c.state) {
      case CState::kUntouched:
      case CState::kZero:
        u.zero_bytes += n;
        break;
      case CState::kSpilled:
      case CState::kError:
        u.spilled_bytes += n;
        u.stored_bytes += c.stored * n / kChunk;
        break;
      case CState::kEvicting:  // out of the budget already, on its way to disk
        u.spilled_bytes += n;
        break;
      case CState::kDirty:
      case CState::kClean:
      case CState::kLoading:  // in the budget from the fault on
        u.resident_bytes += n;
        break;
    }
    u.faults += c.faults;
    u.evictions += c.evictions;
  });
  return u;
}

bool AllocEngine::SpillLocation(const void* addr, int* fd, uint64_t* offset, uint32_t* length) noexcept {
  std::lock_guard lk(mu_);
  Block* b = Find(reinterpret_cast<uintptr_t>(addr));
  if (!b) return false;
  Chunk* c = &b->chunks[(reinterpret_cast<uintptr_t>(addr) - b->base) / kChunk];
  if (!c->stored) return false;
  *fd = files_[c->file].fd.get();
  *offset = c->offset;
  *length = c->stored;
  return true;
}

// ---- fork ----

void AllocEngine::ForkPrepare() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return in_flight_ == 0; });
  lk.release();  // held across fork; ForkParent/ForkChild unlock
}

void AllocEngine::ForkParent() {
  // A file with chunks in it is shared with the child now (it reads them
  // from there): write a new one. An empty one is the parent's alone (the
  // child always starts its own).
  // If no new file can be made, the old one is closed for writing anyway
  // and eviction is limited to clean chunks (PlaceExtent fails).
  if (files_.back().live > 0) (void)NewSpillFile();
  mu_.unlock();
}

void AllocEngine::ForkChild() {
  // Only this thread exists here. The service threads and the
  // userfaultfd registration did not come along: make them again.
  threads_.clear();  // they do not exist here; their objects are leaked, never joined
  // Condition variables the parent's threads were waiting on hold waiters
  // that do not exist here; signalling them would wait forever. Fresh ones
  // (the old are not destroyed: that would wait too).
  new (&evict_cv_) std::condition_variable();
  new (&idle_cv_) std::condition_variable();
  stop_fd_.reset();
  uffd_.reset();     // the parent's userfaultfd: this copy of the descriptor only
  (void)NewSpillFile();
  Status s = Start();
  if (!s.ok()) {
    fprintf(stderr, "faultline: managed memory cannot be served in a forked child: %s\n", s.message());
    abort();
  }
  for (auto& [base, b] : blocks_) {
    if (!Register(reinterpret_cast<void*>(b->base), b->mapped)) {
      fprintf(stderr, "faultline: managed memory cannot be registered in a forked child\n");
      abort();
    }
    for (size_t i = 0; i < b->count; i++)
      if (b->chunks[i].state == CState::kClean)
        uffd_->WriteProtect(reinterpret_cast<void*>(b->base + i * kChunk), kChunk, true);
  }
  mu_.unlock();
}

void AtforkPrepare() {
  g_engines_mu.lock();
  for (AllocEngine* e : Engines()) e->ForkPrepare();
}

void AtforkParent() {
  for (AllocEngine* e : Engines()) e->ForkParent();
  g_engines_mu.unlock();
}

void AtforkChild() {
  ScopedInternal internal_calls;
  for (AllocEngine* e : Engines()) e->ForkChild();
  g_engines_mu.unlock();
}

}  // namespace faultline::internal
