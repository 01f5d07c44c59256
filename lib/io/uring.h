// io_uring reads: a Ring wraps one liburing queue; ReadBatch submits a batch
// of positional reads on the calling thread's ring and waits for all of them,
// resubmitting short reads. Where io_uring is unavailable (seccomp, old
// kernel) the same calls fall back to pread, decided once per thread.
// Thread-safety: a Ring is used by one thread; ReadBatch uses a thread_local ring.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "faultline/status.hpp"

struct io_uring;

namespace faultline::internal {

struct ReadOp {
  int fd = -1;
  uint64_t offset = 0;
  uint32_t len = 0;
  void* buf = nullptr;
  bool write = false;  // write buf to the file instead (the spill path)
};

class Ring {
 public:
  // A ring with `depth` submission entries; an error where io_uring cannot be set up.
  static Result<std::unique_ptr<Ring>> Create(unsigned depth);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  unsigned depth() const noexcept { return depth_; }
  // Reads (or writes) every op fully; keeps at most depth() in flight. A
  // read that hits end of file or an op that fails gives an error naming
  // `what` and the offset.
  Status ReadAll(std::span<ReadOp> ops, const char* what);

 private:
  Ring() = default;
  std::unique_ptr<io_uring> ring_;
  unsigned depth_ = 0;
};

// ReadAll on the calling thread's ring (created on first use, depth 64), or
// pread when io_uring is not available.
Status ReadBatch(std::span<ReadOp> ops, const char* what);

// Whether this process can use io_uring (probed once).
bool UringAvailable() noexcept;

}  // namespace faultline::internal
