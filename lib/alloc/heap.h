// The process-wide heap shared by faultline::Allocate, the C ABI and the
// LD_PRELOAD shim: one AllocEngine made on first use from the environment,
// or none where userfaultfd is not allowed (then everything goes to the
// system allocator).
// Thread-safety: any thread; creation is serialized.
#pragma once

#include <cstdint>

#include "alloc/engine.h"

namespace faultline::internal {

// The heap, made on first call; nullptr when it cannot run here.
AllocEngine* TheHeap() noexcept;
// The heap if it is already running (never creates it): for free().
AllocEngine* RunningHeap() noexcept;
// FAULTLINE_THRESHOLD (read once).
uint64_t HeapThreshold() noexcept;

}  // namespace faultline::internal
