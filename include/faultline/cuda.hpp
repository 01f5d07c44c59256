// The GPU tier: a bundle's tensors in CUDA managed memory (cudaMallocManaged),
// streamed layer by layer through a GPU whose memory budget is smaller than
// the model. Host contents come from the bundle (decoded straight into the
// managed pages), move to the GPU on a side stream ahead of use
// (cudaMemPrefetchAsync, driven by the execution plan) and leave it when the
// budget needs the room (prefetched back to the host, or discarded and
// decoded again from the bundle later).
//
// No CUDA header is needed: streams are passed as void* (a cudaStream_t;
// nullptr = the legacy default stream). Built without CUDA, or on a machine
// without a usable GPU, Available() is false and Open fails with ENOTSUP.
//
// With Memory::kMapped, tensors of at least one VMM granule (2 MiB on
// current GPUs) live instead at addresses reserved for them, under which
// a GPU allocation of their size is mapped while they are staged (CUDA
// virtual memory management; reused from an evicted tensor of the same
// size) and a shared placeholder (up to 64 MiB, outside the budget) while
// they are not; their host copies are pinned, and a transfer is one
// cudaMemcpyAsync at the link's full rate. Smaller tensors stay in managed
// memory.
//
// Contract: a tensor's device pointer holds its data for work queued on a
// stream between Begin(step) and End(step) of a plan step that contains it.
// Outside those, its contents are whatever the tier left (valid after
// kToHost eviction with managed memory, indeterminate after a discard and
// for mapped tensors, whose range then reads a shared placeholder page).
// Mapped tensors are device memory: the host cannot dereference them.
// Thread-safety: every method may be called from any thread; one plan pass
// at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/bundle.hpp"
#include "faultline/paging.hpp"
#include "faultline/status.hpp"

namespace faultline::cuda {

// True when the tier is built in and at least one CUDA device is usable.
bool Available() noexcept;
// One line on the build and the device ("CUDA 13.0, NVIDIA H100 80GB HBM3,
// 79 GiB, managed memory, concurrent access"), or why the tier is unusable.
std::string Describe();

enum class Eviction : uint8_t {
  kToHost,   // prefetch back to host memory: the host copy stays valid
  kDiscard,  // drop every copy (cudaMemDiscardBatchAsync); decoded again from the bundle when needed
};
enum class Location : uint8_t { kNone, kDevice, kHost };
enum class Memory : uint8_t {
  kManaged,  // cudaMallocManaged, moved by prefetches and advisories
  kMapped,   // reserved addresses, GPU pages mapped while staged (tensors of a granule or more)
};

// CUDA memory advisories applied to a tensor's managed range.
// The defaults suit weights: read-mostly, so the host keeps its copy while
// the GPU reads a duplicate, and preferred on the host, so that evicting
// only drops the duplicate (no copy back; see docs/ARCHITECTURE.md).
struct Advice {
  bool read_mostly = true;                // cudaMemAdviseSetReadMostly
  Location preferred = Location::kHost;   // cudaMemAdviseSetPreferredLocation
  bool accessed_by_device = false;        // cudaMemAdviseSetAccessedBy the device
};

// Memory-pressure thresholds, fractions of a tier's memory in use.
struct Thresholds {
  double offload = 0.85;    // above: move the coldest tensors down one tier
  double emergency = 0.95;  // above: move everything not in use down, stop prefetching
  double reload = 0.70;     // below: restore the full budget and prefetch again
};

// The monitor: a libuv timer that reads the GPU (cudaMemGetInfo: the
// device's used/total, every process and allocation on it) and the host
// (1 - MemAvailable/MemTotal, or the cgroup's usage/limit when higher) and
// moves tensors GPU -> host -> disk under pressure.
struct MonitorConfig {
  bool enabled = true;
  unsigned interval_ms = 50;
  Thresholds gpu, host;
};

struct DeviceConfig {
  int device = 0;
  uint64_t gpu_budget = 0;   // bytes of tensors on the GPU; 0 = half the device's free memory at open
  uint64_t host_budget = 0;  // bytes of decoded host copies; 0 = no limit (the monitor still reacts to pressure)
  unsigned lookahead = 2;    // plan steps prefetched ahead of the current one
  Eviction eviction = Eviction::kToHost;
  Memory memory = Memory::kManaged;
  Advice advice;             // applied to every managed tensor at open; Advise() changes one
  MonitorConfig monitor;
  // Hand the pager's pointers (userfaultfd-backed host memory) to kernels
  // instead of managed memory; needs cudaDevAttrPageableMemoryAccess (HMM).
  bool direct_host = false;
  PagingConfig paging;       // the host pager, for direct_host

  // Defaults overridden by FAULTLINE_GPU_BUDGET, FAULTLINE_GPU_HOST_BUDGET,
  // FAULTLINE_GPU_LOOKAHEAD, FAULTLINE_GPU_EVICT, FAULTLINE_GPU_READ_MOSTLY,
  // FAULTLINE_GPU_MONITOR, FAULTLINE_GPU_OFFLOAD, FAULTLINE_GPU_EMERGENCY,
  // FAULTLINE_GPU_RELOAD, FAULTLINE_GPU_DIRECT, FAULTLINE_GPU_MEMORY
  // (README: runtime options).
  static DeviceConfig FromEnvironment();
};

// "host"/"discard" and "managed"/"mapped", as the options and the Python
// package spell them; false (and nothing set) for anything else.
bool ParseEviction(std::string_view s, Eviction* out) noexcept;
bool ParseMemory(std::string_view s, Memory* out) noexcept;

struct DeviceTensor {
  void* data = nullptr;  // device-usable pointer (managed memory, or a mapped range)
  const TensorInfo* info = nullptr;
  uint32_t id = 0;       // index across the bundle's tensors
  uint64_t size() const noexcept { return info ? info->size : 0; }
};

struct DeviceStats {
  uint64_t to_device = 0, bytes_to_device = 0;    // prefetches to the GPU
  uint64_t to_host = 0, bytes_to_host = 0;        // evictions back to the host
  uint64_t discards = 0, bytes_discarded = 0;     // copies dropped (back to the bundle on disk)
  uint64_t decodes = 0, bytes_decoded = 0;        // tensors decoded from the bundle into their host copies
  uint64_t errors = 0;                            // tensors that could not be decoded
  uint64_t spilled_written = 0, restored_written = 0;  // written tensors moved to / back from the allocator
  uint64_t begin_waits = 0;                       // Begin() found its step not yet issued
  uint64_t device_resident = 0, peak_device_resident = 0;
  uint64_t device_pages = 0;                      // memory = mapped: bytes of GPU memory held for mapped tensors (in use or free)
  uint64_t host_resident = 0, peak_host_resident = 0;
  uint64_t gpu_budget = 0, effective_gpu_budget = 0;  // the monitor lowers the effective one under pressure
  uint64_t monitor_ticks = 0, offloads = 0, emergencies = 0, reloads = 0, host_drops = 0;
  double gpu_pressure = 0, host_pressure = 0;     // last readings of the monitor
  std::string ToString() const;
};

class DeviceBundle {
 public:
  // Opens the bundle, allocates managed memory (or reserves addresses) for
  // every tensor and applies the advisories. Nothing is read until a step
  // needs it. Errors: ENOTSUP (no CUDA, no device, no concurrent managed
  // access, direct_host without HMM, mapped memory without virtual memory
  // management), ENODEV (bad device index), ENOMEM, and the reader's for a
  // bad file.
  static Result<std::unique_ptr<DeviceBundle>> Open(const std::string& path,
                                                    const DeviceConfig& config = DeviceConfig::FromEnvironment());
  // Waits for queued transfers, stops the stager and monitor, frees the
  // managed memory.
  ~DeviceBundle();

  const BundleInfo& info() const noexcept;
  const DeviceConfig& config() const noexcept;
  // Model "" = the first model.
  Result<DeviceTensor> tensor(std::string_view model, std::string_view name) const;
  // Every tensor of `model` whose name starts with `prefix`, in bundle order.
  std::vector<DeviceTensor> layer(std::string_view model, std::string_view prefix) const;
  // Managed tensors only: EINVAL for a mapped one.
  Status Advise(const DeviceTensor& t, const Advice& advice);
  // The tensor's contents were changed (by a kernel or the host), so the
  // bundle no longer has them: it is never discarded, and when the monitor
  // (or the host budget) moves it off the host it is spilled through the
  // allocator (faultline::Allocate: compressed, on disk under its budget)
  // and copied back when needed.
  Status MarkWritten(const DeviceTensor& t);

  // The execution plan: the steps of one pass, each the tensors it uses
  // (cyclic: after the last step comes the first).
  Status SetPlan(std::vector<std::vector<DeviceTensor>> steps);
  // One step per prefix ("layers.0.", "layers.1.", ...).
  Status SetPlan(std::string_view model, const std::vector<std::string>& prefixes);
  size_t plan_size() const noexcept;

  // Makes step `step`'s tensors usable by work queued on `stream` after
  // this returns (the stream waits for their transfer; the host does not),
  // and prefetches the next `lookahead` steps. Fails with the decoding error
  // of a bad frame (EIO/EBADMSG naming tensor and frame) or ENOSPC if the
  // step alone is larger than the budget.
  Status Begin(size_t step, void* stream = nullptr);
  // Work on `stream` that uses the step has been queued; its tensors may
  // leave the GPU once that work is done.
  void End(size_t step, void* stream = nullptr);
  // Waits until every transfer the tier queued has finished.
  Status Synchronize();

  DeviceStats stats() const;

  struct Impl;

 private:
  DeviceBundle() = default;
  std::unique_ptr<Impl> impl_;
};

}  // namespace faultline::cuda
