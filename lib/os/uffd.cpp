// Uffd; see uffd.h. The ABI constants below are the kernel's (include/uapi/
// linux/userfaultfd.h) for the features newer than Debian 12's headers.
#include "os/uffd.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include "pager/options.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
  __u64 mode;
  __s64 move;
};
#define _UFFDIO_MOVE (0x05)
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
  struct uffdio_range range;
  __u64 mode;
  __s64 updated;
};
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

namespace faultline::internal {

namespace {

// A descriptor that serves faults from the kernel too where this process
// may have one (CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, or access to
// /dev/userfaultfd), and a user-mode-only one otherwise (allowed to every
// process since 5.11, but a system call touching a missing page then fails
// with EFAULT instead of waiting for it). -1 with errno where none.
int OpenDescriptor(int flags, bool* kernel_faults) {
  static const bool want_kernel = [] {
    bool on = true;
    OptionFlag(OptionId::kKernelFaults, &on);
    return on;
  }();
  int fd = want_kernel ? static_cast<int>(syscall(SYS_userfaultfd, flags)) : -1;
  if (fd < 0 && want_kernel) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
      fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
      close(dev);
    }
  }
  *kernel_faults = fd >= 0;
  if (fd < 0) fd = static_cast<int>(syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY));
  return fd;
}

}  // namespace

Result<Uffd> Uffd::Open() {
  int flags = O_CLOEXEC | O_NONBLOCK;
  bool kernel = false;
  int fd = OpenDescriptor(flags, &kernel);
  if (fd < 0) return Status::Error(errno ? errno : EPERM, "userfaultfd is not available");
  Uffd u;
  u.fd_.reset(fd);
  // Ask for the optional features one set at a time: the handshake fails
  // as a whole if any asked-for feature is unknown.
  const uint64_t wanted[] = {UFFD_FEATURE_MOVE | UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID,
                             UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID, UFFD_FEATURE_THREAD_ID, 0};
  for (uint64_t features : wanted) {
    uffdio_api api = {};
    api.api = UFFD_API;
    api.features = features;
    if (ioctl(fd, UFFDIO_API, &api) == 0) {
      u.features_.move = (api.features & UFFD_FEATURE_MOVE) != 0;
      u.features_.poison = (api.features & UFFD_FEATURE_POISON) != 0;
      u.features_.thread_id = (api.features & UFFD_FEATURE_THREAD_ID) != 0;
      u.features_.wp = (api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP) != 0;
      u.features_.kernel_faults = kernel;
      return u;
    }
    // A failed handshake leaves the fd unusable: open a fresh one.
    int nfd = OpenDescriptor(flags, &kernel);
    if (nfd < 0) return Status::Error(errno, "userfaultfd handshake failed");
    u.fd_.reset(nfd);
    fd = nfd;
  }
  return Status::Error(EINVAL, "userfaultfd API handshake failed");
}

Status Uffd::RegisterMissing(void* addr, size_t len) {
  uffdio_register reg = {};
  reg.range.start = reinterpret_cast<uintptr_t>(addr);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(fd(), UFFDIO_REGISTER, &reg) != 0)
    return Status::Error(errno, "cannot register %zu bytes with userfaultfd", len);
  return Status::Ok();
}

Status Uffd::RegisterMissingWp(void* addr, size_t len) {
  uffdio_register reg = {};
  reg.range.start = reinterpret_cast<uintptr_t>(addr);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
  if (ioctl(fd(), UFFDIO_REGISTER, &reg) != 0)
    return Status::Error(errno, "cannot register %zu bytes with userfaultfd (missing + write-protect)", len);
  return Status::Ok();
}

Status Uffd::Unregister(void* addr, size_t len) {
  uffdio_range r = {reinterpret_cast<uintptr_t>(addr), len};
  if (ioctl(fd(), UFFDIO_UNREGISTER, &r) != 0) return Status::Error(errno, "userfaultfd unregister");
  return Status::Ok();
}

namespace {
int CopyIoctl(int fd, void* dst, const void* src, size_t len, uint64_t mode) noexcept {
  uffdio_copy c = {};
  c.dst = reinterpret_cast<uintptr_t>(dst);
  c.src = reinterpret_cast<uintptr_t>(src);
  c.len = len;
  c.mode = mode;
  if (ioctl(fd, UFFDIO_COPY, &c) == 0) return 0;
  return -errno;
}
}  // namespace

int Uffd::Copy(void* dst, const void* src, size_t len, bool wake) noexcept {
  return CopyIoctl(fd(), dst, src, len, wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE);
}

int Uffd::CopyWp(void* dst, const void* src, size_t len) noexcept {
  return CopyIoctl(fd(), dst, src, len, UFFDIO_COPY_MODE_WP);
}

int Uffd::ZeroPage(void* addr, size_t len) noexcept {
  uffdio_zeropage z = {};
  z.range.start = reinterpret_cast<uintptr_t>(addr);
  z.range.len = len;
  if (ioctl(fd(), UFFDIO_ZEROPAGE, &z) == 0) return 0;
  return -errno;
}

int Uffd::WriteProtect(void* addr, size_t len, bool protect) noexcept {
  uffdio_writeprotect w = {};
  w.range.start = reinterpret_cast<uintptr_t>(addr);
  w.range.len = len;
  w.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  if (ioctl(fd(), UFFDIO_WRITEPROTECT, &w) == 0) return 0;
  return -errno;
}

int Uffd::Move(void* dst, void* src, size_t len, bool wake, uint64_t* moved) noexcept {
  uffdio_move m = {};
  m.dst = reinterpret_cast<uintptr_t>(dst);
  m.src = reinterpret_cast<uintptr_t>(src);
  m.len = len;
  m.mode = wake ? 0 : UFFDIO_MOVE_MODE_DONTWAKE;
  int rc = ioctl(fd(), UFFDIO_MOVE, &m) == 0 ? 0 : -errno;
  if (moved) *moved = rc == 0 ? len : m.move > 0 ? static_cast<uint64_t>(m.move) : 0;
  return rc;
}

int Uffd::Poison(void* addr, size_t len) noexcept {
  uffdio_poison p = {};
  p.range.start = reinterpret_cast<uintptr_t>(addr);
  p.range.len = len;
  if (ioctl(fd(), UFFDIO_POISON, &p) == 0) return 0;
  return -errno;
}

int Uffd::Wake(void* addr, size_t len) noexcept {
  uffdio_range r = {reinterpret_cast<uintptr_t>(addr), len};
  if (ioctl(fd(), UFFDIO_WAKE, &r) == 0) return 0;
  return -errno;
}

bool UffdAvailable() noexcept {
  static const bool available = Uffd::Open().ok();
  return available;
}

}  // namespace faultline::internal
