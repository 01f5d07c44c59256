// The per-thread "inside the engine" flag; see guard.h.
#include "alloc/guard.h"

namespace faultline::internal {

__attribute__((tls_model("initial-exec"))) thread_local bool t_inside_engine = false;

ScopedInternal::ScopedInternal() noexcept : prev_(t_inside_engine) { t_inside_engine = true; }
ScopedInternal::~ScopedInternal() { t_inside_engine = prev_; }

}  // namespace faultline::internal
