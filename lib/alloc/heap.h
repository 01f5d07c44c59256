// The process-wide heap shared by faultline::Allocate, the C ABI and the
// LD_PRELOAD shim: one AllocEngine made on first use from the environment,
// or none where userfaultfd is not allowed (then everything goes to the
// system allocator).
// Thread-safety: any thread; creation is serialized.
#pragma once

#include <atomic>
#include <cstdint>

#include "alloc/engine.h"

namespace faultline::internal {

extern std::atomic<AllocEngine*> g_running_heap;
extern uint64_t g_heap_threshold;

// The heap, made on first call; nullptr when it cannot run here.
AllocEngine* TheHeap() noexcept;
// The heap if it is already running (never creates it): for free(). Inline:
// the shim's free() of a small block is a load and a compare.
inline AllocEngine* RunningHeap() noexcept { return g_running_heap.load(std::memory_order_acquire); }
// FAULTLINE_THRESHOLD, read by a constructor when the library loads
// (before that, every size counts as small: the loader's early calls go to
// the system allocator).
inline uint64_t HeapThreshold() noexcept { return g_heap_threshold; }

}  // namespace faultline::internal
