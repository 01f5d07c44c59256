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
#include <sys/syscall.h>
#include <unistd.h>

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

#define FL_EXPORT __attribute__((visibility("default")))
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
