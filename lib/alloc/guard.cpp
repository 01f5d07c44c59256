// The per-thread "inside the engine" flag; see guard.h.
#include "alloc/guard.h"

namespace faultline::internal {

FAULTLINE_ENGINE_TLS thread_local bool t_inside_engine = false;

ScopedInternal::ScopedInternal() noexcept : prev_(t_inside_engine) { t_inside_engine = true; }
ScopedInternal::~ScopedInternal() { t_inside_engine = prev_; }

}  // namespace faultline::internal
