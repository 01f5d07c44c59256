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
void AnnotateNewMemory(const char* file, int line, uintptr_t mem, uintptr_t size);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
}
// Memory mapped by a path TSan does not intercept (liburing maps its rings
// with raw system calls): forget what earlier mappings at these addresses did.
#define FL_TSAN_NEW_MEMORY(p, n) AnnotateNewMemory(__FILE__, __LINE__, reinterpret_cast<uintptr_t>(p), (n))
// Reads ordered after other threads' writes by the kernel (a write-protect
// ioctl, a userfaultfd install), which TSan cannot see.
#define FL_TSAN_IGNORE_READS_BEGIN() AnnotateIgnoreReadsBegin(__FILE__, __LINE__)
#define FL_TSAN_IGNORE_READS_END() AnnotateIgnoreReadsEnd(__FILE__, __LINE__)
#else
#define FL_TSAN_NEW_MEMORY(p, n) ((void)(p), (void)(n))
#define FL_TSAN_IGNORE_READS_BEGIN() ((void)0)
#define FL_TSAN_IGNORE_READS_END() ((void)0)
#endif
