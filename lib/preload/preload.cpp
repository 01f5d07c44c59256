// LD_PRELOAD=libfaultline-preload.so: the malloc family and C++ operator
// new/delete, overridden. Allocations of at least FAULTLINE_THRESHOLD (1 MiB)
// go to the managed heap (lib/alloc); smaller ones, the engine's own, and
// every one where userfaultfd is not allowed go to glibc's allocator
// (__libc_malloc and friends, so no dlsym is needed on the way: the dynamic
// loader's early calls are served before anything is set up).
// Thread-safety: as malloc.
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <string.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <new>

#include "alloc/guard.h"
#include "alloc/heap.h"

extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void __libc_free(void*);
void* __libc_memalign(size_t, size_t);
}

#define FL_EXPORT __attribute__((visibility("default")))

namespace {

using faultline::internal::AllocEngine;
using faultline::internal::InsideEngine;

// The heap for an allocation of `size` bytes, or nullptr for glibc.
inline AllocEngine* HeapFor(size_t size) noexcept {
  if (__builtin_expect(size < faultline::internal::HeapThreshold(), 1)) return nullptr;
  if (InsideEngine()) return nullptr;
  return faultline::internal::TheHeap();
}

// The heap that owns p, or nullptr.
inline AllocEngine* Owner(const void* p) noexcept {
  AllocEngine* h = faultline::internal::RunningHeap();
  return h && h->Owns(p) ? h : nullptr;
}

size_t PageSize() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// The next definition of a libc function (glibc's), found once.
template <typename Fn>
Fn Next(const char* name) noexcept {
  faultline::internal::ScopedInternal inside;  // dlsym may allocate
  return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
}

size_t LibcUsableSize(void* p) noexcept {
  static auto fn = Next<size_t (*)(void*)>("malloc_usable_size");
  return fn ? fn(p) : 0;
}

// glibc's memalign rules, so that a managed block is refused or aligned
// exactly as glibc would: an alignment at most the malloc alignment is
// plain malloc, one that is not a power of two is rounded up to the next,
// and one above SIZE_MAX / 2 + 1 is EINVAL. False for EINVAL.
bool GlibcAlignment(size_t* alignment) noexcept {
  size_t a = *alignment;
  if (a > SIZE_MAX / 2 + 1) return false;
  if (a <= alignof(max_align_t)) a = alignof(max_align_t);
  if (a & (a - 1)) a = size_t{1} << (64 - __builtin_clzll(a));
  *alignment = a;
  return true;
}

// memalign and friends: managed blocks for large sizes with glibc's
// argument rules, glibc itself for the rest (its own rules apply there).
void* AlignedAlloc(size_t alignment, size_t size) noexcept {
  if (AllocEngine* h = HeapFor(size)) {
    if (!GlibcAlignment(&alignment)) {
      errno = EINVAL;
      return nullptr;
    }
    return h->Allocate(size, alignment);
  }
  return __libc_memalign(alignment, size);
}

// aligned_alloc: glibc before 2.38 takes any alignment (it is memalign);
// from 2.38 on it refuses zero and non-powers of two with EINVAL. Which
// one is here is asked of glibc once, with an alignment only the latter
// refuses.
bool StrictAlignedAlloc() noexcept {
  static const bool strict = [] {
    auto real = Next<void* (*)(size_t, size_t)>("aligned_alloc");
    if (!real) return false;
    errno = 0;
    void* p = real(24, 1);
    bool refused = !p && errno == EINVAL;
    __libc_free(p);
    return refused;
  }();
  return strict;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* malloc(size_t size) {
  if (AllocEngine* h = HeapFor(size)) return h->Allocate(size, alignof(max_align_t));
  return __libc_malloc(size);
}

__attribute__((visibility("default"))) void free(void* p) {
  if (!p) return;
  if (AllocEngine* h = Owner(p)) h->Free(p);
  else __libc_free(p);
}

__attribute__((visibility("default"))) void* calloc(size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  // Managed blocks are fresh mappings: zeros until written, nothing touched.
  if (AllocEngine* h = HeapFor(total)) return h->Allocate(total, alignof(max_align_t));
  return __libc_calloc(n, size);
}

__attribute__((visibility("default"))) void* realloc(void* p, size_t size) {
  if (!p) return malloc(size);
  if (AllocEngine* h = Owner(p)) {
    if (size == 0) {
      h->Free(p);
      return nullptr;
    }
    return h->Reallocate(p, size);
  }
  if (size != 0) {
    if (AllocEngine* h = HeapFor(size)) {
      void* n = h->Allocate(size, alignof(max_align_t));
      if (!n) return nullptr;
      size_t old = LibcUsableSize(p);
      memcpy(n, p, old < size ? old : size);
      __libc_free(p);
      return n;
    }
  }
  return __libc_realloc(p, size);
}

__attribute__((visibility("default"))) void* reallocarray(void* p, size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, total);
}

// posix_memalign leaves errno as it was (POSIX: the error is returned).
__attribute__((visibility("default"))) int posix_memalign(void** out, size_t alignment, size_t size) {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1))) return EINVAL;
  int saved = errno;
  void* p = AlignedAlloc(alignment, size);
  int err = errno;
  errno = saved;
  if (!p) return err == EINVAL ? EINVAL : ENOMEM;
  *out = p;
  return 0;
}

__attribute__((visibility("default"))) void* aligned_alloc(size_t alignment, size_t size) {
  if ((alignment == 0 || (alignment & (alignment - 1))) && StrictAlignedAlloc()) {
    errno = EINVAL;
    return nullptr;
  }
  return AlignedAlloc(alignment, size);
}

__attribute__((visibility("default"))) void* memalign(size_t alignment, size_t size) {
  return AlignedAlloc(alignment, size);
}

__attribute__((visibility("default"))) void* valloc(size_t size) { return AlignedAlloc(PageSize(), size); }

__attribute__((visibility("default"))) void* pvalloc(size_t size) {
  size_t ps = PageSize();
  if (size > SIZE_MAX - ps) {
    errno = ENOMEM;
    return nullptr;
  }
  return AlignedAlloc(ps, size ? (size + ps - 1) / ps * ps : ps);
}

// NumPy and others advise huge pages (or drop pages) on large blocks; on
// managed memory the engine decides what that means.
__attribute__((visibility("default"))) int madvise(void* addr, size_t len, int advice) {
  return faultline::Advise(addr, len, advice);
}

__attribute__((visibility("default"))) size_t malloc_usable_size(void* p) {
  if (!p) return 0;
  if (AllocEngine* h = Owner(p)) return h->UsableSize(p);
  return LibcUsableSize(p);
}

}  // extern "C"

// C++: every form of operator new and delete.
namespace {

void* NewOrThrow(size_t size, size_t alignment) {
  for (;;) {
    void* p = alignment ? AlignedAlloc(alignment, size ? size : 1) : malloc(size ? size : 1);
    if (p) return p;
    std::new_handler h = std::get_new_handler();
    if (!h) throw std::bad_alloc();
    h();
  }
}

void* NewNoThrow(size_t size, size_t alignment) noexcept {
  try {
    return NewOrThrow(size, alignment);
  } catch (...) {
    return nullptr;
  }
}

}  // namespace

FL_EXPORT void* operator new(size_t n) { return NewOrThrow(n, 0); }
FL_EXPORT void* operator new[](size_t n) { return NewOrThrow(n, 0); }
FL_EXPORT void* operator new(size_t n, const std::nothrow_t&) noexcept { return NewNoThrow(n, 0); }
FL_EXPORT void* operator new[](size_t n, const std::nothrow_t&) noexcept { return NewNoThrow(n, 0); }
FL_EXPORT void* operator new(size_t n, std::align_val_t a) { return NewOrThrow(n, static_cast<size_t>(a)); }
FL_EXPORT void* operator new[](size_t n, std::align_val_t a) { return NewOrThrow(n, static_cast<size_t>(a)); }
FL_EXPORT void* operator new(size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return NewNoThrow(n, static_cast<size_t>(a));
}
FL_EXPORT void* operator new[](size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return NewNoThrow(n, static_cast<size_t>(a));
}
FL_EXPORT void operator delete(void* p) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p) noexcept { free(p); }
FL_EXPORT void operator delete(void* p, size_t) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p, size_t) noexcept { free(p); }
FL_EXPORT void operator delete(void* p, std::align_val_t) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p, std::align_val_t) noexcept { free(p); }
FL_EXPORT void operator delete(void* p, size_t, std::align_val_t) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p, size_t, std::align_val_t) noexcept { free(p); }
FL_EXPORT void operator delete(void* p, const std::nothrow_t&) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p, const std::nothrow_t&) noexcept { free(p); }
FL_EXPORT void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { free(p); }
FL_EXPORT void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { free(p); }

// ---- System calls on managed memory where faults raised inside the kernel
// are not served (a user-mode-only userfaultfd: an unprivileged process
// without CAP_SYS_PTRACE or /dev/userfaultfd). There the kernel's
// copy_to_user/copy_from_user on a spilled or untouched chunk fails with
// EFAULT. These wrappers touch the buffer from user space first (a write
// for what the kernel writes into, so that the chunk is resident and
// writable; a read for what it reads) in pieces the budget holds, and
// retry a piece that lost a chunk to eviction in between. Where kernel
// faults are served (FAULTLINE_VERBOSE says which) they only pass through.
// Raw syscall(2) and io_uring are not covered (README).
namespace {

constexpr size_t kPiece = 1 << 20;  // bytes touched and passed to the kernel at once
constexpr int kRetries = 16;

// The heap whose managed memory [p, +n) overlaps and cannot be faulted
// from the kernel, or nullptr (the common case: one load and a compare).
inline AllocEngine* NeedsTouch(const void* p, size_t n) noexcept {
  AllocEngine* h = faultline::internal::RunningHeap();
  if (!h || n == 0 || h->KernelFaults() || InsideEngine()) return nullptr;
  auto a = static_cast<const char*>(p);
  return h->Owns(a) || h->Owns(a + n - 1) ? h : nullptr;
}

void Touch(void* p, size_t n, bool for_kernel_write) noexcept {
  auto* c = static_cast<volatile char*>(p);
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t at = a; at < a + n; at = (at & ~uintptr_t{4095}) + 4096) {
    size_t i = at - a;
    if (for_kernel_write) c[i] = c[i];
    else (void)c[i];
  }
}

// Runs `call(piece, len, done)` over [p, +n) in touched pieces; returns
// the bytes moved, or -1 with errno when the first piece fails. Stops at a
// short transfer, as the caller's own loop would.
template <typename Call>
ssize_t InPieces(void* p, size_t n, bool into, Call call) noexcept {
  auto* b = static_cast<char*>(p);
  size_t done = 0;
  while (done < n) {
    size_t len = n - done < kPiece ? n - done : kPiece;
    ssize_t r = -1;
    for (int k = 0; k < kRetries; k++) {
      Touch(b + done, len, into);
      r = call(b + done, len, done);
      if (!(r < 0 && errno == EFAULT)) break;
    }
    if (r < 0) return done ? static_cast<ssize_t>(done) : -1;
    done += static_cast<size_t>(r);
    if (static_cast<size_t>(r) < len) break;
  }
  return static_cast<ssize_t>(done);
}

// Vector calls: every buffer touched, then one call (its atomicity kept),
// retried while a buffer lost a chunk in between.
template <typename Call>
ssize_t Vectored(const iovec* iov, int cnt, bool into, Call call) noexcept {
  ssize_t r = -1;
  for (int k = 0; k < kRetries; k++) {
    for (int i = 0; i < cnt; i++)
      if (NeedsTouch(iov[i].iov_base, iov[i].iov_len)) Touch(iov[i].iov_base, iov[i].iov_len, into);
    r = call();
    if (!(r < 0 && errno == EFAULT)) break;
  }
  return r;
}

bool AnyManaged(const iovec* iov, int cnt) noexcept {
  for (int i = 0; i < cnt && iov; i++)
    if (NeedsTouch(iov[i].iov_base, iov[i].iov_len)) return true;
  return false;
}

// Vector calls on files: buffer by buffer in touched pieces (a vector
// larger than the budget cannot be touched whole), stopping at a short one.
// `one` is glibc's single-buffer call: InPieces has touched the piece.
template <typename One>
ssize_t EachBuffer(const iovec* iov, int cnt, bool into, One one) noexcept {
  ssize_t total = 0;
  for (int i = 0; i < cnt; i++) {
    size_t len = iov[i].iov_len;
    ssize_t r = InPieces(iov[i].iov_base, len, into, [&](char* p, size_t l, size_t done) {
      return one(p, l, static_cast<size_t>(total) + done);
    });
    if (r < 0) return total ? total : -1;
    total += r;
    if (static_cast<size_t>(r) < len) break;
  }
  return total;
}

using ReadFn = size_t (*)(void*, size_t, size_t, FILE*);
using WriteFn = size_t (*)(const void*, size_t, size_t, FILE*);

// The next definitions (glibc's) of the wrapped calls, found when the
// library loads: dlsym is not async-signal-safe, and write(2) and read(2)
// are called from signal handlers (the self-pipe trick). A call that comes
// before the constructor (from another library's) finds its own.
#define FL_NEXT_FN(name, ...)                                                          \
  using NextT_##name = __VA_ARGS__;                                                    \
  std::atomic<NextT_##name> g_next_##name{nullptr};                                    \
  NextT_##name NextOf_##name() noexcept {                                              \
    auto f = g_next_##name.load(std::memory_order_acquire);                            \
    if (!f) g_next_##name.store(f = Next<NextT_##name>(#name), std::memory_order_release); \
    return f;                                                                          \
  }

FL_NEXT_FN(read, ssize_t (*)(int, void*, size_t))
FL_NEXT_FN(pread, ssize_t (*)(int, void*, size_t, off_t))
FL_NEXT_FN(write, ssize_t (*)(int, const void*, size_t))
FL_NEXT_FN(pwrite, ssize_t (*)(int, const void*, size_t, off_t))
FL_NEXT_FN(recv, ssize_t (*)(int, void*, size_t, int))
FL_NEXT_FN(recvfrom, ssize_t (*)(int, void*, size_t, int, sockaddr*, socklen_t*))
FL_NEXT_FN(send, ssize_t (*)(int, const void*, size_t, int))
FL_NEXT_FN(sendto, ssize_t (*)(int, const void*, size_t, int, const sockaddr*, socklen_t))
FL_NEXT_FN(readv, ssize_t (*)(int, const iovec*, int))
FL_NEXT_FN(writev, ssize_t (*)(int, const iovec*, int))
FL_NEXT_FN(preadv, ssize_t (*)(int, const iovec*, int, off_t))
FL_NEXT_FN(pwritev, ssize_t (*)(int, const iovec*, int, off_t))
FL_NEXT_FN(recvmsg, ssize_t (*)(int, msghdr*, int))
FL_NEXT_FN(sendmsg, ssize_t (*)(int, const msghdr*, int))
FL_NEXT_FN(fread, ReadFn)
FL_NEXT_FN(fread_unlocked, ReadFn)
FL_NEXT_FN(fwrite, WriteFn)
FL_NEXT_FN(fwrite_unlocked, WriteFn)
FL_NEXT_FN(__read_chk, ssize_t (*)(int, void*, size_t, size_t))
FL_NEXT_FN(__pread64_chk, ssize_t (*)(int, void*, size_t, off_t, size_t))
FL_NEXT_FN(__recv_chk, ssize_t (*)(int, void*, size_t, size_t, int))
FL_NEXT_FN(__fread_chk, size_t (*)(void*, size_t, size_t, size_t, FILE*))
FL_NEXT_FN(__fread_unlocked_chk, size_t (*)(void*, size_t, size_t, size_t, FILE*))

__attribute__((constructor(102))) void ResolveNext() {
  (void)NextOf_read();
  (void)NextOf_pread();
  (void)NextOf_write();
  (void)NextOf_pwrite();
  (void)NextOf_recv();
  (void)NextOf_recvfrom();
  (void)NextOf_send();
  (void)NextOf_sendto();
  (void)NextOf_readv();
  (void)NextOf_writev();
  (void)NextOf_preadv();
  (void)NextOf_pwritev();
  (void)NextOf_recvmsg();
  (void)NextOf_sendmsg();
  (void)NextOf_fread();
  (void)NextOf_fread_unlocked();
  (void)NextOf_fwrite();
  (void)NextOf_fwrite_unlocked();
  (void)NextOf___read_chk();
  (void)NextOf___pread64_chk();
  (void)NextOf___recv_chk();
  (void)NextOf___fread_chk();
  (void)NextOf___fread_unlocked_chk();
}


}  // namespace

extern "C" {

FL_EXPORT ssize_t read(int fd, void* buf, size_t n) {
  const auto next_read = NextOf_read();
  if (!NeedsTouch(buf, n)) return next_read(fd, buf, n);
  return InPieces(buf, n, true, [&](char* p, size_t len, size_t) { return next_read(fd, p, len); });
}

// meson builds with _FILE_OFFSET_BITS=64, where the headers rename pread
// to pread64 and so on: each symbol is defined by its own name here.
FL_EXPORT ssize_t FlPread(int fd, void* buf, size_t n, off_t off) __asm__("pread");
FL_EXPORT ssize_t FlPread64(int fd, void* buf, size_t n, off_t off) __asm__("pread64");
FL_EXPORT ssize_t FlPwrite(int fd, const void* buf, size_t n, off_t off) __asm__("pwrite");
FL_EXPORT ssize_t FlPwrite64(int fd, const void* buf, size_t n, off_t off) __asm__("pwrite64");
FL_EXPORT ssize_t FlPreadv(int fd, const iovec* iov, int cnt, off_t off) __asm__("preadv");
FL_EXPORT ssize_t FlPreadv64(int fd, const iovec* iov, int cnt, off_t off) __asm__("preadv64");
FL_EXPORT ssize_t FlPwritev(int fd, const iovec* iov, int cnt, off_t off) __asm__("pwritev");
FL_EXPORT ssize_t FlPwritev64(int fd, const iovec* iov, int cnt, off_t off) __asm__("pwritev64");

FL_EXPORT ssize_t FlPread(int fd, void* buf, size_t n, off_t off) {
  const auto next_pread = NextOf_pread();
  if (!NeedsTouch(buf, n)) return next_pread(fd, buf, n, off);
  return InPieces(buf, n, true, [&](char* p, size_t len, size_t done) {
    return next_pread(fd, p, len, off + static_cast<off_t>(done));
  });
}
FL_EXPORT ssize_t FlPread64(int fd, void* buf, size_t n, off_t off) { return FlPread(fd, buf, n, off); }

FL_EXPORT ssize_t write(int fd, const void* buf, size_t n) {
  const auto next_write = NextOf_write();
  if (!NeedsTouch(buf, n)) return next_write(fd, buf, n);
  return InPieces(const_cast<void*>(buf), n, false, [&](char* p, size_t len, size_t) { return next_write(fd, p, len); });
}

FL_EXPORT ssize_t FlPwrite(int fd, const void* buf, size_t n, off_t off) {
  const auto next_pwrite = NextOf_pwrite();
  if (!NeedsTouch(buf, n)) return next_pwrite(fd, buf, n, off);
  return InPieces(const_cast<void*>(buf), n, false, [&](char* p, size_t len, size_t done) {
    return next_pwrite(fd, p, len, off + static_cast<off_t>(done));
  });
}
FL_EXPORT ssize_t FlPwrite64(int fd, const void* buf, size_t n, off_t off) { return FlPwrite(fd, buf, n, off); }

FL_EXPORT ssize_t recv(int fd, void* buf, size_t n, int flags) {
  const auto next_recv = NextOf_recv();
  if (!NeedsTouch(buf, n)) return next_recv(fd, buf, n, flags);
  // One piece only: a socket that gave less than asked may have no more.
  size_t len = n < kPiece ? n : kPiece;
  return InPieces(buf, len, true, [&](char* p, size_t l, size_t) { return next_recv(fd, p, l, flags); });
}

FL_EXPORT ssize_t recvfrom(int fd, void* buf, size_t n, int flags, sockaddr* addr, socklen_t* alen) {
  const auto next_recvfrom = NextOf_recvfrom();
  if (!NeedsTouch(buf, n)) return next_recvfrom(fd, buf, n, flags, addr, alen);
  // Datagrams cannot be split: the whole buffer, touched, in one call.
  iovec v = {buf, n};
  return Vectored(&v, 1, true, [&] { return next_recvfrom(fd, buf, n, flags, addr, alen); });
}

FL_EXPORT ssize_t send(int fd, const void* buf, size_t n, int flags) {
  const auto next_send = NextOf_send();
  if (!NeedsTouch(buf, n)) return next_send(fd, buf, n, flags);
  return InPieces(const_cast<void*>(buf), n, false, [&](char* p, size_t len, size_t) { return next_send(fd, p, len, flags); });
}

FL_EXPORT ssize_t sendto(int fd, const void* buf, size_t n, int flags, const sockaddr* addr, socklen_t alen) {
  const auto next_sendto = NextOf_sendto();
  if (!NeedsTouch(buf, n)) return next_sendto(fd, buf, n, flags, addr, alen);
  iovec v = {const_cast<void*>(buf), n};
  return Vectored(&v, 1, false, [&] { return next_sendto(fd, buf, n, flags, addr, alen); });
}

FL_EXPORT ssize_t readv(int fd, const iovec* iov, int cnt) {
  const auto next_readv = NextOf_readv();
  if (!AnyManaged(iov, cnt)) return next_readv(fd, iov, cnt);
  return EachBuffer(iov, cnt, true, [&](char* p, size_t l, size_t) { return NextOf_read()(fd, p, l); });
}

FL_EXPORT ssize_t writev(int fd, const iovec* iov, int cnt) {
  const auto next_writev = NextOf_writev();
  if (!AnyManaged(iov, cnt)) return next_writev(fd, iov, cnt);
  return EachBuffer(iov, cnt, false, [&](char* p, size_t l, size_t) { return NextOf_write()(fd, p, l); });
}

FL_EXPORT ssize_t FlPreadv(int fd, const iovec* iov, int cnt, off_t off) {
  const auto next_preadv = NextOf_preadv();
  if (!AnyManaged(iov, cnt)) return next_preadv(fd, iov, cnt, off);
  return EachBuffer(iov, cnt, true, [&](char* p, size_t l, size_t done) {
    return NextOf_pread()(fd, p, l, off + static_cast<off_t>(done));
  });
}
FL_EXPORT ssize_t FlPreadv64(int fd, const iovec* iov, int cnt, off_t off) { return FlPreadv(fd, iov, cnt, off); }

FL_EXPORT ssize_t FlPwritev(int fd, const iovec* iov, int cnt, off_t off) {
  const auto next_pwritev = NextOf_pwritev();
  if (!AnyManaged(iov, cnt)) return next_pwritev(fd, iov, cnt, off);
  return EachBuffer(iov, cnt, false, [&](char* p, size_t l, size_t done) {
    return NextOf_pwrite()(fd, p, l, off + static_cast<off_t>(done));
  });
}
FL_EXPORT ssize_t FlPwritev64(int fd, const iovec* iov, int cnt, off_t off) { return FlPwritev(fd, iov, cnt, off); }

FL_EXPORT ssize_t recvmsg(int fd, msghdr* msg, int flags) {
  const auto next_recvmsg = NextOf_recvmsg();
  if (!msg || !AnyManaged(msg->msg_iov, static_cast<int>(msg->msg_iovlen))) return next_recvmsg(fd, msg, flags);
  return Vectored(msg->msg_iov, static_cast<int>(msg->msg_iovlen), true, [&] { return next_recvmsg(fd, msg, flags); });
}

FL_EXPORT ssize_t sendmsg(int fd, const msghdr* msg, int flags) {
  const auto next_sendmsg = NextOf_sendmsg();
  if (!msg || !AnyManaged(msg->msg_iov, static_cast<int>(msg->msg_iovlen))) return next_sendmsg(fd, msg, flags);
  return Vectored(msg->msg_iov, static_cast<int>(msg->msg_iovlen), false, [&] { return next_sendmsg(fd, msg, flags); });
}

}  // extern "C"

namespace {

// stdio moves large transfers straight between the buffer and the file
// with glibc's internal read/write, which the wrappers above do not see:
// whole elements per touched piece, so that the count returned is exact.
template <typename Fn, typename Buf>
size_t Stdio(Fn next, Buf buf, size_t size, size_t n, FILE* f, bool into) {
  size_t total;
  if (size == 0 || __builtin_mul_overflow(size, n, &total) || !NeedsTouch(buf, total)) return next(buf, size, n, f);
  size_t per = kPiece / size ? kPiece / size : 1, moved = 0;
  auto* b = static_cast<char*>(const_cast<void*>(static_cast<const void*>(buf)));
  while (moved < n) {
    size_t k = n - moved < per ? n - moved : per;
    Touch(b + moved * size, k * size, into);
    size_t r = next(b + moved * size, size, k, f);
    moved += r;
    if (r < k) break;
  }
  return moved;
}


}  // namespace

extern "C" {

FL_EXPORT size_t fread(void* buf, size_t size, size_t n, FILE* f) {
  const auto next_fread = NextOf_fread();
  return Stdio(next_fread, buf, size, n, f, true);
}
FL_EXPORT size_t fread_unlocked(void* buf, size_t size, size_t n, FILE* f) {
  const auto next_fread_unlocked = NextOf_fread_unlocked();
  return Stdio(next_fread_unlocked, buf, size, n, f, true);
}
FL_EXPORT size_t fwrite(const void* buf, size_t size, size_t n, FILE* f) {
  const auto next_fwrite = NextOf_fwrite();
  return Stdio(next_fwrite, buf, size, n, f, false);
}
FL_EXPORT size_t fwrite_unlocked(const void* buf, size_t size, size_t n, FILE* f) {
  const auto next_fwrite_unlocked = NextOf_fwrite_unlocked();
  return Stdio(next_fwrite_unlocked, buf, size, n, f, false);
}

// _FORTIFY_SOURCE builds (most distribution binaries) call these: glibc's
// check first (it aborts on an overflow), then the wrapper.
FL_EXPORT ssize_t __read_chk(int fd, void* buf, size_t n, size_t buflen) {
  const auto next___read_chk = NextOf___read_chk();
  return n > buflen ? next___read_chk(fd, buf, n, buflen) : read(fd, buf, n);
}
FL_EXPORT ssize_t __pread64_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) {
  const auto next___pread64_chk = NextOf___pread64_chk();
  return n > buflen ? next___pread64_chk(fd, buf, n, off, buflen) : FlPread(fd, buf, n, off);
}
FL_EXPORT ssize_t __recv_chk(int fd, void* buf, size_t n, size_t buflen, int flags) {
  const auto next___recv_chk = NextOf___recv_chk();
  return n > buflen ? next___recv_chk(fd, buf, n, buflen, flags) : recv(fd, buf, n, flags);
}
FL_EXPORT size_t __fread_chk(void* buf, size_t buflen, size_t size, size_t n, FILE* f) {
  const auto next___fread_chk = NextOf___fread_chk();
  size_t total;
  if (__builtin_mul_overflow(size, n, &total) || total > buflen) return next___fread_chk(buf, buflen, size, n, f);
  return fread(buf, size, n, f);
}
FL_EXPORT size_t __fread_unlocked_chk(void* buf, size_t buflen, size_t size, size_t n, FILE* f) {
  const auto next___fread_unlocked_chk = NextOf___fread_unlocked_chk();
  size_t total;
  if (__builtin_mul_overflow(size, n, &total) || total > buflen)
    return next___fread_unlocked_chk(buf, buflen, size, n, f);
  return fread_unlocked(buf, size, n, f);
}

}  // extern "C"
