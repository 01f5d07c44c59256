// Marks the calls that the allocator makes itself (and its service threads)
// so that the LD_PRELOAD shim sends their allocations to the system
// allocator instead of back into the engine.
// Thread-safety: the flag is per thread.
#pragma once

namespace faultline::internal {

// In the LD_PRELOAD shim the flag is initial-exec TLS: malloc reads it,
// possibly before the thread's dynamic TLS exists. Everywhere else (the
// library, a dlopen'ed Python extension) the default model: initial-exec
// TLS in a dlopen'ed object fails to load once the static TLS space is used.
#ifdef FAULTLINE_PRELOAD_BUILD
#define FAULTLINE_ENGINE_TLS __attribute__((tls_model("initial-exec")))
#else
#define FAULTLINE_ENGINE_TLS
#endif
extern FAULTLINE_ENGINE_TLS thread_local bool t_inside_engine;

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
