// Marks the calls that the allocator makes itself (and its service threads)
// so that the LD_PRELOAD shim sends their allocations to the system
// allocator instead of back into the engine.
// Thread-safety: the flag is per thread.
#pragma once

namespace faultline::internal {

// Initial-exec TLS: the shim reads it from malloc, possibly before the
// thread's dynamic TLS exists.
extern __attribute__((tls_model("initial-exec"))) thread_local bool t_inside_engine;

// True while this thread is inside the engine (or is a service thread).
inline bool InsideEngine() noexcept { return t_inside_engine; }

class ScopedInternal {
 public:
  ScopedInternal() noexcept;
  ~ScopedInternal();
  ScopedInternal(const ScopedInternal&) = delete;
  ScopedInternal& operator=(const ScopedInternal&) = delete;

 private:
  bool prev_;
};

}  // namespace faultline::internal
