// File descriptors and whole-buffer positional I/O: an owning fd, full
// pread/pwrite loops that retry on EINTR and short transfers, and the atomic
// "temporary file, fsync, rename" publication used for every file we write.
// Thread-safety: functions are reentrant; a UniqueFd is owned by one object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "faultline/status.hpp"

namespace faultline::internal {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

// Reads exactly `len` bytes at `offset`; EIO-style error naming `what` on a
// short file.
Status PreadFull(int fd, void* buf, size_t len, uint64_t offset, const char* what);
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t offset, const char* what);
Result<uint64_t> FileSize(int fd);

// A file being written that appears at `path` only when Commit succeeds:
// an unnamed O_TMPFILE in the target directory (a named temporary where the
// filesystem lacks O_TMPFILE), fsync'd, then renamed over `path`. Destroying
// an uncommitted AtomicFile leaves nothing behind.
class AtomicFile {
 public:
  static Result<AtomicFile> Create(const std::string& path);
  AtomicFile(AtomicFile&&) noexcept;
  AtomicFile& operator=(AtomicFile&&) = delete;
  ~AtomicFile();

  int fd() const noexcept { return fd_.get(); }
  Status Commit();

 private:
  AtomicFile() = default;
  std::string path_;
  std::string temp_path_;  // non-empty only for the named fallback
  UniqueFd fd_;
  bool committed_ = false;
};

}  // namespace faultline::internal
