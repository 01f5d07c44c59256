// ThreadSanitizer annotations for what TSan cannot see; nothing in other
// builds. Each use says why at the call site. Thread-safety: as TSan's.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__SANITIZE_THREAD__)
#define FL_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FL_TSAN 1
#endif
#endif

#ifdef FL_TSAN
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
}
// Memory that a path TSan does not intercept unmaps and maps again at the
// same address (liburing maps its rings with raw system calls): the kernel
// orders the old mapping's last use before the new one's first, which
// TSan learns from a release when one goes and an acquire when the next
// comes (AnnotateNewMemory did not clear the old accesses here).
#define FL_TSAN_MAPPING_GONE(p) __tsan_release(const_cast<void*>(static_cast<const volatile void*>(p)))
#define FL_TSAN_MAPPING_NEW(p) __tsan_acquire(const_cast<void*>(static_cast<const volatile void*>(p)))
// Reads ordered after other threads' writes by the kernel (a write-protect
// ioctl, a userfaultfd install), which TSan cannot see.
#define FL_TSAN_IGNORE_READS_BEGIN() AnnotateIgnoreReadsBegin(__FILE__, __LINE__)
#define FL_TSAN_IGNORE_READS_END() AnnotateIgnoreReadsEnd(__FILE__, __LINE__)
#else
#define FL_TSAN_MAPPING_GONE(p) ((void)(p))
#define FL_TSAN_MAPPING_NEW(p) ((void)(p))
#define FL_TSAN_IGNORE_READS_BEGIN() ((void)0)
#define FL_TSAN_IGNORE_READS_END() ((void)0)
#endif
