// See move_pool.h.
#include "os/move_pool.h"

#include <sys/mman.h>

#include "os/meminfo.h"

namespace faultline::internal {

MovePool::~MovePool() {
  if (map_) munmap(map_, map_len_);
}

bool MovePool::Set(Uffd& uffd, uint64_t slots, uint64_t size, bool huge) {
  std::byte* p = MapAligned(slots * size, size, &map_, &map_len_);
  if (!p) return false;
  if (huge) madvise(p, slots * size, MADV_HUGEPAGE);
  if (!uffd.RegisterMissing(p, slots * size).ok()) {
    munmap(map_, map_len_);
    map_ = nullptr;
    return false;
  }
  base_ = p;
  size_ = size;
  slots_ = slots;
  full_.reserve(slots);
  holes_.reserve(slots);
  for (uint64_t s = 0; s < slots; s++) holes_.push_back(static_cast<int32_t>(s));
  return true;
}

int32_t MovePool::Take() noexcept {
  if (full_.empty()) return -1;
  int32_t s = full_.back();
  full_.pop_back();
  return s;
}

int32_t MovePool::TakeHuge(int pagemap_fd) noexcept {
  const int32_t s = Take();
  if (s < 0 || HugeMapped(pagemap_fd, At(s), size_) == 1) return s;
  Return(s, 0, /*split=*/true);
  return -1;
}

void MovePool::Return(int32_t s, uint64_t moved, bool split) noexcept {
  if (moved == 0 && !split) {
    full_.push_back(s);
    return;
  }
  if (moved < size_ || split) madvise(At(s), size_, MADV_DONTNEED);
  holes_.push_back(s);
}

uint64_t MovePool::Stash(Uffd& uffd, std::byte* src, uint64_t len) noexcept {
  if (holes_.empty()) return 0;
  const int32_t s = holes_.back();
  uint64_t moved = 0;
  uffd.Move(At(s), src, len, false, &moved);
  if (moved == len) {
    holes_.pop_back();
    full_.push_back(s);
  } else {
    // A part moved, or nothing (the source shared with a fork child, say,
    // or a page in the hole that no move should have left there): the
    // hole is emptied again and stays one.
    madvise(At(s), size_, MADV_DONTNEED);
  }
  return moved;
}

}  // namespace faultline::internal
