// The per-thread "inside the engine" flag; see guard.h. Initial-exec TLS: the
// shim reads it from malloc, possibly before the thread's dynamic TLS exists.
#include "alloc/guard.h"

namespace faultline::internal {

namespace {
__attribute__((tls_model("initial-exec"))) thread_local bool t_inside = false;
}

bool InsideEngine() noexcept { return t_inside; }
ScopedInternal::ScopedInternal() noexcept : prev_(t_inside) { t_inside = true; }
ScopedInternal::~ScopedInternal() { t_inside = prev_; }

}  // namespace faultline::internal
