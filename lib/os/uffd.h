// userfaultfd: opening (UFFD_USER_MODE_ONLY first, /dev/userfaultfd second),
// feature probing, registration and the resolving ioctls. Debian's kernel
// headers predate UFFDIO_MOVE and UFFDIO_POISON, so their ABI constants are
// defined here and the features are probed at run time.
// Thread-safety: the ioctls may be issued from any thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "faultline/status.hpp"
#include "io/file.h"

namespace faultline::internal {

struct UffdFeatures {
  bool move = false;       // UFFDIO_MOVE (kernel >= 6.8)
  bool poison = false;     // UFFDIO_POISON (kernel >= 6.6)
  bool thread_id = false;  // faulting thread id in messages
  bool wp = false;         // write-protect faults on anonymous memory (kernel >= 5.7)
  // Faults raised inside the kernel (read(2) into the range, copy_to_user
  // and copy_from_user of any system call) come to the handler too; false
  // for a UFFD_USER_MODE_ONLY descriptor, where they fail with EFAULT.
  bool kernel_faults = false;
};

class Uffd {
 public:
  // Opens a non-blocking, close-on-exec userfaultfd with the API handshake.
  // EPERM/ENOSYS when the system does not allow userfaultfd.
  static Result<Uffd> Open();
  Uffd(Uffd&&) noexcept = default;
  Uffd& operator=(Uffd&&) noexcept = default;

  int fd() const noexcept { return fd_.get(); }
  const UffdFeatures& features() const noexcept { return features_; }

  Status RegisterMissing(void* addr, size_t len);
  // Missing-page and write-protect faults (anonymous memory).
  Status RegisterMissingWp(void* addr, size_t len);
  Status Unregister(void* addr, size_t len);
  // Each returns 0, or -errno (EEXIST: already present; EAGAIN: retry). fault path
  int Copy(void* dst, const void* src, size_t len, bool wake = true) noexcept;
  // Installs write-protected pages (a write then raises a WP fault).
  int CopyWp(void* dst, const void* src, size_t len) noexcept;
  // Maps the zero page over missing pages (reads zeros; a write allocates).
  int ZeroPage(void* addr, size_t len) noexcept;
  // Sets or clears write protection on present pages; clearing wakes.
  int WriteProtect(void* addr, size_t len, bool protect) noexcept;
  // `moved` (optional) receives the bytes moved, also when it fails part way.
  int Move(void* dst, void* src, size_t len, bool wake = true, uint64_t* moved = nullptr) noexcept;
  int Poison(void* addr, size_t len) noexcept;
  int Wake(void* addr, size_t len) noexcept;

 private:
  Uffd() = default;
  UniqueFd fd_;
  UffdFeatures features_;
};

// Whether userfaultfd can be opened here (probed once).
bool UffdAvailable() noexcept;

}  // namespace faultline::internal
