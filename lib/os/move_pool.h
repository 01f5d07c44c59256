// Slots of anonymous memory that physical pages cycle through with
// UFFDIO_MOVE (the pager's frame and huge-unit pools, the allocator's unit
// recycle pool).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "os/uffd.h"

namespace faultline::internal {

// Slots that physical pages cycle through with UFFDIO_MOVE: a load decodes
// into a full slot and moves its pages into a region; an eviction moves
// pages back into a hole, so no page is freed, allocated or zeroed on the
// way. The slots are registered with the engine's userfaultfd (a move's
// destination must be) and never touched while holes. Lists guarded by the
// owner's lock.
class MovePool {
 public:
  MovePool() = default;
  MovePool(const MovePool&) = delete;
  MovePool& operator=(const MovePool&) = delete;
  ~MovePool();
  // Maps and registers `slots` slots of `size` bytes, each aligned to its
  // size (advised MADV_HUGEPAGE when `huge`); false, keeping nothing, where
  // that fails.
  bool Set(Uffd& uffd, uint64_t slots, uint64_t size, bool huge);
  bool on() const noexcept { return base_ != nullptr; }
  uint64_t slots() const noexcept { return slots_; }
  size_t full() const noexcept { return full_.size(); }
  bool has_hole() const noexcept { return !holes_.empty(); }
  std::byte* At(int32_t s) const noexcept { return base_ + static_cast<uint64_t>(s) * size_; }
  bool Contains(uintptr_t addr) const noexcept {
    const auto b = reinterpret_cast<uintptr_t>(base_);
    return base_ && addr >= b && addr - b < slots_ * size_;
  }
  // A slot holding pages, or -1.
  int32_t Take() noexcept;
  // A slot holding one whole huge page (asked of /proc/self/pagemap,
  // `pagemap_fd`), or -1. A slot that no longer does (its page went in
  // split, or the kernel split it since) is emptied into a hole instead:
  // its small pages would go on by copy, and registered memory that is
  // missing a page must never be written (nobody serves its faults).
  int32_t TakeHuge(int pagemap_fd) noexcept;
  // A slot back after `moved` bytes moved out of it: still full when none
  // did, a hole when any did (a part left behind is dropped, and so is the
  // whole slot when `split`: its pages left as small pages, whose empty page
  // table would split the next huge page moved in, or it held no huge page
  // to begin with).
  void Return(int32_t s, uint64_t moved, bool split = false) noexcept;
  // Moves `len` (at most a slot) bytes at `src` into a hole; the bytes moved
  // (short of `len`, the slot is emptied and stays a hole; the caller drops
  // what is left at `src`).
  uint64_t Stash(Uffd& uffd, std::byte* src, uint64_t len) noexcept;

 private:
  std::byte* base_ = nullptr;
  void* map_ = nullptr;
  uint64_t map_len_ = 0, size_ = 0, slots_ = 0;
  std::vector<int32_t> full_, holes_;
};

}  // namespace faultline::internal
