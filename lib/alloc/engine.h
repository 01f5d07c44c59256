// The managed-memory engine behind the heap, ManagedRegion and the
// LD_PRELOAD shim; see faultline/alloc.hpp and docs/ARCHITECTURE.md
// (transparent allocator).
//
// An engine reserves an arena of address space; each block (allocation) is
// an anonymous private mapping inside it, registered with one userfaultfd
// for missing-page and write-protect faults. Memory is managed in 64 KiB
// chunks:
//
//   untouched/zero --(first touch: zero pages)--> dirty
//   dirty --(evict: write-protect, compress, write, drop)--> spilled
//   spilled --(touch: read, check, decompress, install write-protected)--> clean
//     (sequentially read 2 MiB units whose chunks are all spilled come back
//     together: read into a huge page, moved in as one entry, protected,
//     then hashed again; a chunk written between the move and the
//     protection comes back dirty; see LoadUnit)
//   clean --(first write: WP fault, unprotect)--> dirty
//   clean --(evict: drop, nothing written)--> spilled
//   a dirty chunk that is all zeros at eviction --> zero (nothing written)
//
// A write that races with an eviction faults on the write protection and is
// only woken after the drop, so it re-faults, the chunk comes back from
// disk, and the write lands there.
//
// Thread-safety: one mutex guards the chunk states, the resident list and
// the spill allocator; I/O and compression run outside it, with the chunk
// in a loading/evicting state that other faults on it wait out.
// fork: handlers registered with pthread_atfork quiesce every engine, and
// the child re-creates its userfaultfd, service threads and spill file (the
// files from before the fork are shared and only read from then on).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "faultline/alloc.hpp"
#include "io/file.h"
#include "os/move_pool.h"
#include "os/uffd.h"

namespace faultline::internal {

// Free ranges of a space that grows at its end (the arena's address space,
// a spill file's bytes): first fit with alignment, neighbours coalesce, and
// a range given back at the end shrinks the space instead.
// Thread-safety: none (the engine's mutex).
class FreeList {
 public:
  static constexpr uint64_t kNone = UINT64_MAX;
  explicit FreeList(uint64_t start = 0) : end_(start) {}
  uint64_t end() const noexcept { return end_; }
  // The start of `len` bytes aligned to `align`, from a free range or from
  // the end (not past `limit`); kNone when they do not fit.
  uint64_t Take(uint64_t len, uint64_t align, uint64_t limit);
  // Gives [off, off + len) back.
  void Give(uint64_t off, uint64_t len);

 private:
  std::map<uint64_t, uint64_t> free_;  // offset -> length
  uint64_t end_;
};

// madvise(2) itself, never the shim's.
int RawMadvise(void* addr, size_t len, int advice) noexcept;

class AllocEngine {
 public:
  // Errors: the userfaultfd's (EPERM/ENOSYS), ENOTSUP without write-protect
  // faults, ENOMEM for the arena, and the spill file's.
  static Result<std::unique_ptr<AllocEngine>> Create(const AllocConfig& config);
  ~AllocEngine();

  // A zeroed block of `size` bytes aligned to `alignment` (a power of two);
  // nullptr with errno = ENOMEM (address space, or spill room for it).
  void* Allocate(size_t size, size_t alignment) noexcept;
  bool Owns(const void* p) const noexcept {
    auto a = reinterpret_cast<uintptr_t>(p);
    return a >= lo_ && a < hi_;
  }
  // p must be a block's start (from Allocate/Reallocate of this engine).
  void Free(void* p) noexcept;
  // Grows or shrinks a block; contents up to the smaller size are kept,
  // without copying them through memory (mremap). nullptr + ENOMEM on failure
  // (the old block is untouched).
  void* Reallocate(void* p, size_t size) noexcept;
  size_t UsableSize(const void* p) noexcept;
  // madvise on managed memory, by the chunks the range touches: huge-page
  // advice is ignored (chunks are the unit), MADV_DONTNEED/MADV_FREE zero
  // the range; MADV_WILLNEED queues its spilled chunks to be read back by
  // the background thread (at most the budget's worth or 256 MiB queued:
  // the oldest requests give way); MADV_PAGEOUT spills or drops its
  // resident chunks now (-1/ENOSPC when a spill write failed: that chunk
  // stays); MADV_COLD makes them the next to go. Anything else goes to the
  // kernel.
  int Advise(void* addr, size_t len, int advice) noexcept;
  // Whether system calls that touch spilled or untouched chunks wait for
  // them (userfaultfd without UFFD_USER_MODE_ONLY) or fail with EFAULT.
  bool KernelFaults() const noexcept { return uffd_->features().kernel_faults; }
  AllocStats stats() const noexcept;
  // Sums what the chunks of [addr, addr + len) hold; bytes outside every
  // block count nowhere.
  RangeUsage Usage(const void* addr, size_t len) const noexcept;
  const AllocConfig& config() const noexcept { return config_; }

  // For tests: where chunk `addr` lies on disk, its spill file's
  // descriptor included (false when it has no copy on disk).
  bool SpillLocation(const void* addr, int* fd, uint64_t* offset, uint32_t* length) noexcept;

  struct Chunk;
  struct Block;

 private:
  AllocEngine() = default;
  Status Start();                       // uffd + threads (also in a fork child)
  void Serve();                         // a service thread
  void HandleFault(uintptr_t addr, bool wp, bool write);
  void EvictorLoop();                   // evicts ahead of the faults, serves prefetches
  uint64_t LowWater() const;
  void KickEvictor();
  void MakeRoom(std::unique_lock<std::mutex>& lk, uint64_t need);
  bool Evict(std::unique_lock<std::mutex>& lk, Chunk* c);
  void DropCleanRun();  // the oldest chunk, clean, and its clean neighbours
  void Load(std::unique_lock<std::mutex>& lk, Chunk* c, bool prefetch = false);
  // The unit holding c, whole, when it applies: true when done (the unit
  // loaded, or c's block freed while room was made: c is then null);
  // false with the lock held: load c alone. Making room for the unit past
  // dirty chunks unlocks; c is then looked up again.
  // `asked`: only where every chunk of the unit is queued for reading back.
  bool LoadUnit(std::unique_lock<std::mutex>& lk, Chunk*& c, bool prefetch, bool asked);
  bool UnitCapable(const Block* b) const;
  Block* Find(uintptr_t addr) const;
  Block* FindFrom(uintptr_t addr) const;  // the block holding addr, or the first after it
  // fn(Chunk*) for every chunk of a block that [lo, hi) touches, in address
  // order; gaps between blocks are skipped. Under the lock, fn not unlocking.
  template <typename Fn>
  void ForEachChunk(uintptr_t lo, uintptr_t hi, Fn&& fn) const;  // (engine.cpp)
  Block* BlockAt(const void* p, const char* call);  // aborts on a wild pointer
  std::unique_ptr<Block> NewBlock(uintptr_t base, size_t size, size_t mapped);  // nullptr: no memory
  bool MapFresh(uintptr_t base, size_t len);  // private anonymous read-write pages there
  bool Register(void* p, size_t len);         // with the userfaultfd, huge pages off
  void ReleaseRange(uintptr_t base, size_t len);
  bool SpillRoomFor(uint64_t more);
  bool PlaceExtent(Chunk* c, uint32_t stored, uint16_t* file, uint64_t* off);
  void FreeExtent(Chunk* c, bool punch);
  void ReleaseChunk(Chunk* c);  // memory's gone: out of the budget, its extent freed
  Status NewSpillFile();
  void LinkResident(Chunk* c);
  void LinkOldest(Chunk* c);
  void QueuePrefetch(uintptr_t lo, uintptr_t hi);
  bool ReadAhead(Block* b, size_t index);  // on a fault that loads chunk `index` of b; whether sequential
  size_t HeadroomChunks() const;           // the budget above the low-water mark, in chunks (>= 1)
  void DropClean(Chunk* first, size_t n);  // n clean chunks, in eviction and address order
  bool PageOut(std::unique_lock<std::mutex>& lk, uintptr_t lo, uintptr_t hi);
  void UnlinkResident(Chunk* c);
  void WaitIdle(std::unique_lock<std::mutex>& lk, Block* b);
  uintptr_t ChunkAddr(const Chunk* c) const;
  void ForkPrepare();
  void ForkParent();
  void ForkChild();
  friend void AtforkPrepare();
  friend void AtforkParent();
  friend void AtforkChild();

  AllocConfig config_;
  uintptr_t lo_ = 0, hi_ = 0;  // the arena
  // The unit of whole-unit loads (the 2 MiB huge page size), 0 = off; and
  // /proc/self/pagemap, to tell whether a staged unit is one huge page.
  size_t unit_ = 0;
  UniqueFd pagemap_;
  // Huge pages of units evicted whole, moved out of place by one
  // UFFDIO_MOVE; the next unit load reads into one of them (no huge page
  // freed, allocated or zeroed). Two slots: 4 MiB outside the budget.
  std::unique_ptr<MovePool> recycle_;
  void SetUpRecycle();
  std::unique_ptr<Uffd> uffd_;
  UniqueFd stop_fd_;            // eventfd: service threads leave
  std::vector<std::thread*> threads_;

  mutable std::mutex mu_;
  std::condition_variable idle_cv_;  // a loading/evicting chunk finished
  std::condition_variable evict_cv_; // resident bytes passed the low-water mark, or a prefetch came
  // Chunk addresses to read back (MADV_WILLNEED, readahead): a ring sized
  // at creation, so the fault path never allocates; when it is full, the
  // oldest requests give way. An entry is served only while its chunk's
  // `queued` mark stands.
  std::vector<uintptr_t> prefetch_;
  size_t prefetch_head_ = 0, prefetch_size_ = 0;
  bool stopping_ = false;
  std::map<uintptr_t, std::unique_ptr<Block>> blocks_;
  FreeList arena_;             // address ranges of the arena
  Chunk* lru_head_ = nullptr;  // oldest resident chunk
  Chunk* lru_tail_ = nullptr;
  unsigned in_flight_ = 0;     // loads and evictions outside the lock
  bool spill_full_ = false;    // the last spill write failed: evict clean chunks only
  struct SpillFile {
    UniqueFd fd;
    bool writable = true;
    uint64_t live = 0;  // extents in use
    FreeList space;     // its size is space.end()
  };
  std::vector<SpillFile> files_;
  AllocStats st_;
};

}  // namespace faultline::internal
