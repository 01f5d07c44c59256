// The GPU tier over CUDA managed memory; see faultline/cuda.hpp and
// docs/ARCHITECTURE.md (GPU tier).
//
// One stager thread owns every move: it decodes tensors from the bundle into
// their managed pages on the host (the reader's io_uring + zstd path, all
// cores), queues cudaMemPrefetchAsync to the device on a side stream, and
// queues evictions on the same stream after the events that End() recorded
// on the user's stream. Stream order therefore keeps the device under the
// budget: an eviction is queued before the prefetch that needs its room.
// Begin() only pins and waits until its step is queued; the GPU, not the
// host, waits for the transfer (cudaStreamWaitEvent).
//
// With memory = mapped, tensors of a VMM granule or more live in one address
// reservation instead: a shared placeholder is mapped under them while they
// are not staged, and a GPU allocation of their size while they are (reused
// from an evicted tensor of the same size; free ones are released when the
// monitor lowers the budget). Their host copies are pinned, so staging is
// unmap + map + one cudaMemcpyAsync at the link's rate, and eviction (after
// the work that used them) maps the placeholder back; managed memory
// instead pays for the driver giving the range GPU pages again on every
// return (docs/ARCHITECTURE.md).
//
// Per tensor: where its data is (disk = the bundle only, host, device), a
// pin count (steps between Begin and End), the event after its last
// side-stream operation (Begin waits on it; the host syncs on it before
// decoding into pages a discard may still be dropping).
#include <cuda.h>  // driver types for virtual memory management; the functions come from the runtime's entry points
#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "core/plan_steps.h"
#include "core/status_macros.h"
#include "faultline/alloc.hpp"
#include "faultline/cuda.hpp"
#include "faultline/size.hpp"
#include "os/meminfo.h"
#include "os/ticker.h"

namespace faultline::cuda {

namespace {

// Device residency is counted in these units per tensor: the driver moves
// managed memory in 64 KiB pages at least.
constexpr uint64_t kGranule = 64 << 10;
constexpr size_t kNoStep = SIZE_MAX;
// The placeholder under unstaged mapped tensors: one mapping per this many
// bytes of a tensor (GPU memory it takes outside the budget).
constexpr uint64_t kPlaceholderMax = 64ull << 20;

uint64_t RoundUp(uint64_t n, uint64_t unit) { return (n + unit - 1) / unit * unit; }

Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  int code = e == cudaErrorMemoryAllocation ? ENOMEM : e == cudaErrorInvalidDevice ? ENODEV : EIO;
  return Status::Error(code, "%s: %s", what, cudaGetErrorString(e));
}

cudaMemLocation DeviceLoc(int device) {
  cudaMemLocation l{};
  l.type = cudaMemLocationTypeDevice;
  l.id = device;
  return l;
}

cudaMemLocation HostLoc() {
  cudaMemLocation l{};
  l.type = cudaMemLocationTypeHost;
  l.id = 0;
  return l;
}

cudaError_t PrefetchTo(const void* p, size_t n, cudaMemLocation loc, cudaStream_t s) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(p, n, loc, 0, s);
#else
  return cudaMemPrefetchAsync_v2(p, n, loc, 0, s);
#endif
}

cudaError_t AdviseRange(const void* p, size_t n, cudaMemoryAdvise a, cudaMemLocation loc) {
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(p, n, a, loc);
#else
  return cudaMemAdvise_v2(p, n, a, loc);
#endif
}

enum class Where : uint8_t { kDisk, kHost, kDevice };

// The driver's virtual memory management, reached through the runtime's
// entry-point lookup (the library does not link libcuda).
struct Vmm {
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*attribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
  CUresult (*create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*free_range)(CUdeviceptr, size_t) = nullptr;
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*error_string)(CUresult, const char**) = nullptr;

  Status Load() {
#if CUDART_VERSION >= 12050
    struct {
      const char* name;
      void** fn;
    } fns[] = {
        {"cuDeviceGet", reinterpret_cast<void**>(&device_get)},
        {"cuDeviceGetAttribute", reinterpret_cast<void**>(&attribute)},
        {"cuMemGetAllocationGranularity", reinterpret_cast<void**>(&granularity)},
        {"cuMemCreate", reinterpret_cast<void**>(&create)},
        {"cuMemRelease", reinterpret_cast<void**>(&release)},
        {"cuMemAddressReserve", reinterpret_cast<void**>(&reserve)},
        {"cuMemAddressFree", reinterpret_cast<void**>(&free_range)},
        {"cuMemMap", reinterpret_cast<void**>(&map)},
        {"cuMemUnmap", reinterpret_cast<void**>(&unmap)},
        {"cuMemSetAccess", reinterpret_cast<void**>(&set_access)},
        {"cuGetErrorString", reinterpret_cast<void**>(&error_string)},
    };
    for (auto& f : fns) {
      cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
      cudaError_t e = cudaGetDriverEntryPointByVersion(f.name, f.fn, 12000, cudaEnableDefault, &q);
      if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !*f.fn)
        return Status::Error(ENOTSUP, "the CUDA driver offers no %s, which mapped memory needs", f.name);
    }
    return Status::Ok();
#else
    return Status::Error(ENOTSUP, "mapped memory needs a build with CUDA 12.5 or later");
#endif
  }

  Status Check(CUresult r, const char* what) const {
    if (r == CUDA_SUCCESS) return Status::Ok();
    const char* m = nullptr;
    if (error_string) error_string(r, &m);
    return Status::Error(r == CUDA_ERROR_OUT_OF_MEMORY ? ENOMEM : EIO, "%s: %s", what, m ? m : "CUDA driver error");
  }
};

struct Slot {
  const TensorInfo* info = nullptr;
  void* ptr = nullptr;        // managed memory, the pager's mapping (direct), or a mapped range
  bool mapped = false;        // memory = mapped: ptr is in the reservation, `phys` mapped under it while staged
  void* host = nullptr;       // mapped: the pinned host copy (null while on disk)
  CUmemGenericAllocationHandle phys = 0;  // mapped: its GPU memory (one allocation of `bytes`) while staged
  uint64_t bytes = 0;         // rounded size, as counted in the budgets
  Where where = Where::kDisk;
  bool read_mostly = false;   // the host keeps its copy while on the device
  Location preferred = Location::kNone;
  bool side_pending = false;  // an eviction/discard on the side stream may still touch the pages
  bool failed = false;
  bool written = false;       // MarkWritten: the bundle no longer has its contents
  void* saved = nullptr;      // a written tensor's contents while off the GPU and host (allocator memory)
  uint32_t in_use = 0;
  size_t last_done_step = kNoStep;
  std::vector<size_t> steps;  // plan steps that use it
  cudaEvent_t side_event = nullptr;
  TensorView view;            // direct mode
};

}  // namespace

struct DeviceBundle::Impl {
  DeviceConfig config;
  std::unique_ptr<BundleReader> reader;
  std::unique_ptr<PagedBundle> paged;  // direct mode
  std::vector<Slot> slots;
  std::vector<uint32_t> model_first;   // first slot of each model
  cudaStream_t side = nullptr;
  uint64_t device_total = 0;

  mutable std::mutex mu;
  std::condition_variable cv;       // the stager waits here
  std::condition_variable done_cv;  // Begin waits here
  std::vector<std::vector<uint32_t>> plan;
  std::vector<cudaEvent_t> done_events;  // per step, recorded by End
  std::vector<Status> step_error;
  size_t cursor = 0;
  size_t demanded = kNoStep;       // the step a Begin is waiting for
  bool stop = false;
  bool paused = false;             // emergency: only the demanded step is staged
  uint64_t effective_budget = 0;
  uint64_t host_drop_request = 0;  // bytes of host copies the monitor asks to drop
  DeviceStats st;
  std::thread stager;
  internal::Ticker ticker;

  // memory = mapped. Each staged tensor has one GPU allocation of its
  // rounded size, mapped with one call (per-granule mappings cost about
  // 20 us a call, more than the transfer); evicted tensors leave theirs
  // in a free list for the next tensor of the same size.
  Vmm vmm;
  size_t page = 0;                 // the VMM granule; mapped tensors' sizes round up to it
  CUdeviceptr reservation = 0;     // addresses of every mapped tensor
  size_t reservation_size = 0;
  CUmemAllocationProp prop{};
  CUmemAccessDesc access{};
  CUmemGenericAllocationHandle placeholder = 0;  // mapped under a mapped tensor while it is not staged
  uint64_t placeholder_size = 0;   // the largest mapped tensor's size, at most kPlaceholderMax
  std::vector<std::pair<uint64_t, CUmemGenericAllocationHandle>> free_phys;  // (size, allocation)
  uint64_t phys_held = 0;          // bytes of GPU memory allocated for mapped tensors, in use or free

  ~Impl();
  Status Init(const std::string& path);
  Status InitMapped();
  Status MapPlaceholder(const Slot& s);
  void UnmapPlaceholder(const Slot& s);
  Status Remap(Slot& s, bool stage);
  void ReleaseFree(uint64_t limit);
  // The host copy a tensor is decoded into and copied from.
  static void* HostCopy(const Slot& s) { return s.mapped ? s.host : s.ptr; }
  // The host copy stays valid while the tensor is on the device.
  static bool KeepsHostCopy(const Slot& s) { return s.read_mostly || s.mapped; }
  Status ApplyAdvice(Slot& s, const Advice& a);
  void StagerLoop();
  // Wakes the stager after a change it must look at; counted, so that a
  // change made while the stager had the lock released is not missed.
  void Poke() {
    pokes++;
    cv.notify_all();
  }
  uint64_t pokes = 0;
  bool Work(std::unique_lock<std::mutex>& lk);
  size_t Distance(const Slot& s) const;
  bool EvictDevice(std::unique_lock<std::mutex>& lk, uint64_t need, size_t protect_below, bool partial);
  bool DropHost(uint64_t need, bool all);
  void Stage(std::unique_lock<std::mutex>& lk, size_t step);
  void Tick();
  void AddHost(int64_t delta) {
    st.host_resident += delta;
    st.peak_host_resident = std::max(st.peak_host_resident, st.host_resident);
  }
  bool StepOnDevice(size_t step) const {
    for (uint32_t id : plan[step])
      if (slots[id].where != Where::kDevice) return false;
    return true;
  }
};

bool Available() noexcept {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::string Describe() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  char buf[512];
  if (e != cudaSuccess || n == 0) {
    snprintf(buf, sizeof buf, "CUDA runtime %d.%d built in; no usable device (%s)", rt / 1000, rt % 1000 / 10,
             e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    return buf;
  }
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  int concurrent = 0, pageable = 0;
  cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, 0);
  cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, 0);
  snprintf(buf, sizeof buf, "CUDA runtime %d.%d, driver %d.%d, %d device(s): %s, %s, %s managed access%s", rt / 1000,
           rt % 1000 / 10, drv / 1000, drv % 1000 / 10, n, p.name, FormatSize(p.totalGlobalMem).c_str(),
           concurrent ? "concurrent" : "no concurrent", pageable ? ", pageable memory access (HMM)" : "");
  return buf;
}

DeviceBundle::Impl::~Impl() {
  ticker.Stop();
  {
    std::lock_guard lk(mu);
    stop = true;
  }
  cv.notify_all();
  done_cv.notify_all();
  if (stager.joinable()) stager.join();
  if (side) cudaStreamSynchronize(side);
  for (Slot& s : slots) {
    if (s.side_event) cudaEventDestroy(s.side_event);
    if (s.mapped) {
      if (s.phys) {
        vmm.unmap(reinterpret_cast<CUdeviceptr>(s.ptr), s.bytes);
        vmm.release(s.phys);
      } else {
        UnmapPlaceholder(s);
      }
      if (s.host) cudaFreeHost(s.host);
    } else if (s.ptr && !paged) {
      cudaFree(s.ptr);
    }
    if (s.saved) faultline::Free(s.saved);
  }
  for (auto& f : free_phys) vmm.release(f.second);
  if (placeholder_size) vmm.release(placeholder);
  if (reservation) vmm.free_range(reservation, reservation_size);
  for (cudaEvent_t e : done_events) cudaEventDestroy(e);
  if (side) cudaStreamDestroy(side);
}

Status DeviceBundle::Impl::InitMapped() {
  FL_RETURN_IF_ERROR(vmm.Load());
  CUdevice dev = 0;
  FL_RETURN_IF_ERROR(vmm.Check(vmm.device_get(&dev, config.device), "cuDeviceGet"));
  int supported = 0;
  vmm.attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
  if (!supported)
    return Status::Error(ENOTSUP, "device %d has no virtual memory management, which mapped memory needs; "
                         "use managed memory", config.device);
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = config.device;  // an ordinal
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return vmm.Check(vmm.granularity(&page, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity");
}

Status DeviceBundle::Impl::MapPlaceholder(const Slot& s) {
  auto base = reinterpret_cast<CUdeviceptr>(s.ptr);
  Status err;
  for (uint64_t at = 0; at < s.bytes; at += placeholder_size) {
    CUresult r = vmm.map(base + at, std::min(placeholder_size, s.bytes - at), 0, placeholder, 0);
    if (r != CUDA_SUCCESS && err.ok()) err = vmm.Check(r, "cuMemMap (placeholder)");
  }
  return err;
}

void DeviceBundle::Impl::UnmapPlaceholder(const Slot& s) {
  auto base = reinterpret_cast<CUdeviceptr>(s.ptr);
  for (uint64_t at = 0; at < s.bytes; at += placeholder_size)
    vmm.unmap(base + at, std::min(placeholder_size, s.bytes - at));
}

// Maps a mapped tensor's own GPU memory under its range (stage: reused
// from an evicted tensor of the same size, or allocated) or the placeholder
// (its memory goes to the free list), then grants the device access to the
// range again (a new mapping starts with none).
Status DeviceBundle::Impl::Remap(Slot& s, bool stage) {
  auto base = reinterpret_cast<CUdeviceptr>(s.ptr);
  Status err;
  if (stage) {
    auto same = std::find_if(free_phys.begin(), free_phys.end(), [&](auto& f) { return f.first == s.bytes; });
    if (same != free_phys.end()) {
      s.phys = same->second;
      free_phys.erase(same);
    } else {
      // Free allocations of other sizes go first while they and this one
      // would hold more than the tensors on the device (which count it).
      ReleaseFree(std::max(effective_budget, st.device_resident) - s.bytes);
      FL_RETURN_IF_ERROR(vmm.Check(vmm.create(&s.phys, s.bytes, &prop, 0), "cuMemCreate"));
      phys_held += s.bytes;
    }
    UnmapPlaceholder(s);
    err = vmm.Check(vmm.map(base, s.bytes, 0, s.phys, 0), "cuMemMap");
    if (!err.ok()) {
      free_phys.emplace_back(s.bytes, s.phys);
      s.phys = 0;
      (void)MapPlaceholder(s);
    }
  } else if (s.phys) {
    vmm.unmap(base, s.bytes);
    free_phys.emplace_back(s.bytes, s.phys);
    s.phys = 0;
    err = MapPlaceholder(s);
  }
  Status a = vmm.Check(vmm.set_access(base, s.bytes, &access, 1), "cuMemSetAccess");
  if (err.ok()) err = a;
  ReleaseFree(effective_budget);
  return err;
}

// Free GPU memory of mapped tensors goes back to the driver while more than
// `limit` is held (the budget, possibly lowered by the monitor).
void DeviceBundle::Impl::ReleaseFree(uint64_t limit) {
  while (!free_phys.empty() && phys_held > limit) {
    vmm.release(free_phys.back().second);
    phys_held -= free_phys.back().first;
    free_phys.pop_back();
  }
  st.device_pages = phys_held;
}

Status DeviceBundle::Impl::ApplyAdvice(Slot& s, const Advice& a) {
  if (paged) return Status::Ok();  // pageable memory: the driver's defaults
  if (s.mapped)
    return Status::Error(EINVAL, "tensor '%s' is in mapped memory; advisories apply to managed memory only",
                         s.info->name.c_str());
  cudaMemLocation dev = DeviceLoc(config.device);
  size_t n = std::max<uint64_t>(s.info->size, 1);
  cudaError_t e = AdviseRange(s.ptr, n, a.read_mostly ? cudaMemAdviseSetReadMostly : cudaMemAdviseUnsetReadMostly, dev);
  if (e == cudaSuccess) {
    if (a.preferred == Location::kNone) e = AdviseRange(s.ptr, n, cudaMemAdviseUnsetPreferredLocation, dev);
    else
      e = AdviseRange(s.ptr, n, cudaMemAdviseSetPreferredLocation, a.preferred == Location::kDevice ? dev : HostLoc());
  }
  if (e == cudaSuccess)
    e = AdviseRange(s.ptr, n, a.accessed_by_device ? cudaMemAdviseSetAccessedBy : cudaMemAdviseUnsetAccessedBy, dev);
  if (e != cudaSuccess) return CudaStatus(e, "cudaMemAdvise");
  std::lock_guard lk(mu);
  if (s.read_mostly != a.read_mostly && s.where == Where::kDevice) AddHost(a.read_mostly ? int64_t(s.bytes) : -int64_t(s.bytes));
  s.read_mostly = a.read_mostly;
  s.preferred = a.preferred;
  return Status::Ok();
}

Status DeviceBundle::Impl::Init(const std::string& path) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    return Status::Error(ENOTSUP, "no usable CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
  if (config.device < 0 || config.device >= n)
    return Status::Error(ENODEV, "device %d does not exist (%d device(s))", config.device, n);
  FL_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(config.device), "cudaSetDevice"));
  int concurrent = 0, pageable = 0;
  cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, config.device);
  cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, config.device);
  if (config.direct_host && config.memory == Memory::kMapped)
    return Status::Error(EINVAL, "direct_host and mapped memory exclude each other: choose one");
  if (config.direct_host && !pageable)
    return Status::Error(ENOTSUP,
                         "device %d cannot access pageable host memory (cudaDevAttrPageableMemoryAccess = 0, no HMM); "
                         "use managed memory (direct_host = false)",
                         config.device);
  if (!config.direct_host && !concurrent)
    return Status::Error(ENOTSUP, "device %d has no concurrent managed access (cudaDevAttrConcurrentManagedAccess = 0)",
                         config.device);
#if CUDART_VERSION < 13000
  if (config.eviction == Eviction::kDiscard)
    return Status::Error(ENOTSUP, "eviction by discard needs CUDA 13 (cudaMemDiscardBatchAsync)");
#endif
  size_t free_b = 0, total_b = 0;
  FL_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
  device_total = total_b;
  if (config.gpu_budget == 0) config.gpu_budget = free_b / 2;
  if (config.monitor.gpu.reload > config.monitor.gpu.offload || config.monitor.gpu.offload > config.monitor.gpu.emergency ||
      config.monitor.host.reload > config.monitor.host.offload || config.monitor.host.offload > config.monitor.host.emergency)
    return Status::Error(EINVAL, "monitor thresholds must satisfy reload <= offload <= emergency");
  st.gpu_budget = effective_budget = config.gpu_budget;
  st.effective_gpu_budget = effective_budget;

  if (config.direct_host) {
    FL_ASSIGN_OR_RETURN(paged, PagedBundle::Open(path, config.paging));
  } else {
    FL_ASSIGN_OR_RETURN(reader, BundleReader::Open(path));
  }
  const BundleInfo& info = paged ? paged->info() : reader->info();
  bool mapped = !paged && config.memory == Memory::kMapped;
  if (mapped) {
    FL_RETURN_IF_ERROR(InitMapped());
    uint64_t largest = 0;
    for (const ModelInfo& m : info.models)
      for (const TensorInfo& t : m.tensors)
        if (t.size >= page) {
          reservation_size += RoundUp(t.size, page);
          largest = std::max(largest, RoundUp(t.size, page));
        }
    if (reservation_size) {
      uint64_t want = std::min(largest, std::max<uint64_t>(kPlaceholderMax / page, 1) * page);
      FL_RETURN_IF_ERROR(vmm.Check(vmm.create(&placeholder, want, &prop, 0), "cuMemCreate (placeholder)"));
      placeholder_size = want;
      FL_RETURN_IF_ERROR(vmm.Check(vmm.reserve(&reservation, reservation_size, page, 0, 0), "cuMemAddressReserve"));
    }
  }
  size_t reserved = 0;
  for (const ModelInfo& m : info.models) {
    model_first.push_back(static_cast<uint32_t>(slots.size()));
    ModelView mv;
    if (paged) mv = *paged->model(m.name);
    for (const TensorInfo& t : m.tensors) {
      Slot s;
      s.info = &t;
      s.bytes = RoundUp(std::max<uint64_t>(t.size, 1), kGranule);
      if (paged) {
        s.view = *mv.tensor(t.name);
        s.ptr = const_cast<void*>(s.view.data());
      } else if (mapped && t.size >= page) {
        s.mapped = true;
        s.bytes = RoundUp(t.size, page);
        s.ptr = reinterpret_cast<void*>(reservation + reserved);
        reserved += s.bytes;
        Status r = MapPlaceholder(s);
        if (!r.ok()) {
          slots.push_back(std::move(s));  // the destructor unmaps what was mapped
          return r;
        }
      } else {
        e = cudaMallocManaged(&s.ptr, std::max<uint64_t>(t.size, 1), cudaMemAttachGlobal);
        if (e != cudaSuccess) {
          slots.push_back(std::move(s));
          return CudaStatus(e, "cudaMallocManaged");
        }
      }
      e = cudaEventCreateWithFlags(&s.side_event, cudaEventDisableTiming);
      slots.push_back(std::move(s));
      if (e != cudaSuccess) return CudaStatus(e, "cudaEventCreate");
      if (!slots.back().mapped) FL_RETURN_IF_ERROR(ApplyAdvice(slots.back(), config.advice));
    }
  }
  if (reservation)
    FL_RETURN_IF_ERROR(vmm.Check(vmm.set_access(reservation, reservation_size, &access, 1), "cuMemSetAccess"));
  FL_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), "cudaStreamCreate"));
  if (!paged) {
    int device = config.device;
    stager = std::thread([this, device] {
      cudaSetDevice(device);
      StagerLoop();
    });
  }
  if (config.monitor.enabled) {
    int device = config.device;
    FL_RETURN_IF_ERROR(ticker.Start(config.monitor.interval_ms, [device] { cudaSetDevice(device); }, [this] { Tick(); }));
  }
  return Status::Ok();
}

// Plan steps from the cursor to the tensor's next use (0 = the current
// step); SIZE_MAX when no step uses it.
size_t DeviceBundle::Impl::Distance(const Slot& s) const {
  size_t best = kNoStep, n = plan.size();
  for (size_t step : s.steps) best = std::min(best, (step + n - cursor) % n);
  return best;
}

// Queues evictions of idle device tensors whose next use is at least
// `protect_below` steps away, furthest first, until `need` bytes are free.
// Queues nothing (false) when they would not free enough, unless `partial`.
bool DeviceBundle::Impl::EvictDevice(std::unique_lock<std::mutex>& lk, uint64_t need, size_t protect_below,
                                     bool partial) {
  std::vector<std::pair<size_t, uint32_t>> cand;
  uint64_t avail = 0;
  for (uint32_t i = 0; i < slots.size(); i++) {
    const Slot& s = slots[i];
    if (s.where != Where::kDevice || s.in_use) continue;
    size_t d = Distance(s);
    if (d != kNoStep && d < protect_below) continue;
    cand.emplace_back(d, i);
    avail += s.bytes;
  }
  if (cand.empty() || (avail < need && !partial)) return false;
  std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a.first > b.first; });
  // Read-mostly victims are evicted by advice, which is not stream-ordered:
  // the work that used them must be done first. Wait for it without the
  // lock, so that Begin and End on other threads go on meanwhile; the check
  // under the lock below then finds it done (or a newer use to wait for).
  if (config.eviction == Eviction::kToHost) {
    std::vector<cudaEvent_t> waits;
    uint64_t picked = 0;
    for (auto [d, i] : cand) {
      if (picked >= need) break;
      picked += slots[i].bytes;
      size_t step = slots[i].last_done_step;
      if ((slots[i].read_mostly || slots[i].mapped) && step != kNoStep &&
          std::find(waits.begin(), waits.end(), done_events[step]) == waits.end())
        waits.push_back(done_events[step]);
    }
    if (!waits.empty()) {
      lk.unlock();
      for (cudaEvent_t e : waits) cudaEventSynchronize(e);
      lk.lock();
      // A Begin may have taken a victim meanwhile.
      cand.erase(std::remove_if(cand.begin(), cand.end(),
                                [&](auto& c) { return slots[c.second].in_use || slots[c.second].where != Where::kDevice; }),
                 cand.end());
      uint64_t left = 0;
      for (auto& c : cand) left += slots[c.second].bytes;
      if (cand.empty() || (left < need && !partial)) return false;
    }
  }
  uint64_t freed = 0;
  std::vector<void*> ptrs;
  std::vector<size_t> sizes;
  size_t waited = kNoStep;
  for (auto [d, i] : cand) {
    if (freed >= need) break;
    Slot& s = slots[i];
    if (s.last_done_step != kNoStep && s.last_done_step != waited) {
      cudaStreamWaitEvent(side, done_events[s.last_done_step], 0);
      waited = s.last_done_step;
    }
    size_t n = std::max<uint64_t>(s.info->size, 1);
    if (s.mapped) {
      // Its pages may go once the work that used them (waited for above)
      // and its own transfer are done; a written tensor is copied back to
      // its host copy first.
      if (s.last_done_step != kNoStep) cudaEventSynchronize(done_events[s.last_done_step]);
      cudaEventSynchronize(s.side_event);
      if (s.written) {
        cudaMemcpyAsync(s.host, s.ptr, s.info->size, cudaMemcpyDeviceToHost, side);
        cudaEventRecord(s.side_event, side);
        cudaEventSynchronize(s.side_event);
      }
      if (!Remap(s, false).ok()) st.errors++;  // the range keeps no pages either way
      if (config.eviction == Eviction::kToHost || s.written) {
        s.where = Where::kHost;
        st.to_host++;
        st.bytes_to_host += s.info->size;
      } else {
        cudaFreeHost(s.host);
        s.host = nullptr;
        AddHost(-int64_t(s.bytes));
        s.where = Where::kDisk;
        st.discards++;
        st.bytes_discarded += s.info->size;
      }
      st.device_resident -= s.bytes;
      freed += s.bytes;
      continue;
    }
    if (config.eviction == Eviction::kToHost && s.read_mostly) {
      // A read-mostly range prefetched to the host keeps its read-only
      // duplicate on the GPU (the driver frees it only under its own
      // pressure), so the budget would not hold. The duplicate goes when
      // the range stops being read-mostly: the copies collapse into the one
      // at the preferred location, the host's, which is valid (0.1 ms per
      // 64 MiB measured on an H100, against about 7 ms to migrate it back).
      // Advice is not stream-ordered, so the work that used the tensor must
      // be done (waited for above without the lock; this finds it done).
      // Setting the preferred location costs about 1 ms each way, so a
      // tensor advised otherwise pays it here.
      if (s.last_done_step != kNoStep) cudaEventSynchronize(done_events[s.last_done_step]);
      cudaMemLocation dev = DeviceLoc(config.device);
      if (s.preferred != Location::kHost) AdviseRange(s.ptr, n, cudaMemAdviseSetPreferredLocation, HostLoc());
      AdviseRange(s.ptr, n, cudaMemAdviseUnsetReadMostly, dev);
      AdviseRange(s.ptr, n, cudaMemAdviseSetReadMostly, dev);
      if (s.preferred == Location::kNone) AdviseRange(s.ptr, n, cudaMemAdviseUnsetPreferredLocation, dev);
      else if (s.preferred == Location::kDevice) AdviseRange(s.ptr, n, cudaMemAdviseSetPreferredLocation, dev);
      s.where = Where::kHost;
      st.to_host++;
      st.bytes_to_host += s.info->size;
    } else if (config.eviction == Eviction::kToHost || s.written) {
      // (A written tensor is never discarded: its contents exist only here.)
      PrefetchTo(s.ptr, n, HostLoc(), side);
      if (!s.read_mostly) AddHost(s.bytes);
      s.where = Where::kHost;
      st.to_host++;
      st.bytes_to_host += s.info->size;
    } else {
      ptrs.push_back(s.ptr);
      sizes.push_back(n);
      if (s.read_mostly) AddHost(-int64_t(s.bytes));
      s.where = Where::kDisk;
      st.discards++;
      st.bytes_discarded += s.info->size;
    }
    s.side_pending = true;
    st.device_resident -= s.bytes;
    freed += s.bytes;
  }
#if CUDART_VERSION >= 13000
  if (!ptrs.empty()) cudaMemDiscardBatchAsync(ptrs.data(), sizes.data(), ptrs.size(), 0, side);
#endif
  for (auto [d, i] : cand)
    if (slots[i].side_pending) cudaEventRecord(slots[i].side_event, side);
  return true;
}

// Drops host copies of tensors that are not on the device (host -> disk),
// furthest next use first: `need` bytes, or every idle one when `all`.
// False when there was nothing it could drop.
bool DeviceBundle::Impl::DropHost(uint64_t need, bool all) {
  std::vector<std::pair<size_t, uint32_t>> cand;
  for (uint32_t i = 0; i < slots.size(); i++)
    if (slots[i].where == Where::kHost && !slots[i].in_use) cand.emplace_back(Distance(slots[i]), i);
  std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a.first > b.first; });
  std::vector<void*> ptrs;
  std::vector<size_t> sizes;
  uint64_t freed = 0;
  bool dropped = false;
  for (auto [d, i] : cand) {
    if (!all && freed >= need) break;
    Slot& s = slots[i];
    if (s.written) {
      // Its contents are not in the bundle: they go to the allocator's
      // managed memory (compressed and spilled to disk under its budget).
      void* save = s.info->size ? faultline::Allocate(s.info->size) : nullptr;
      if (s.info->size && !save) continue;  // no memory for it: it stays
      if (s.side_pending) cudaEventSynchronize(s.side_event);
      if (s.info->size) memcpy(save, HostCopy(s), s.info->size);
      s.saved = save;
      st.spilled_written++;
    }
    dropped = true;
    if (s.mapped) {
      cudaFreeHost(s.host);  // nothing on the side stream reads it: eviction waited for its transfer
      s.host = nullptr;
    } else {
      ptrs.push_back(s.ptr);
      sizes.push_back(std::max<uint64_t>(s.info->size, 1));
      s.side_pending = true;
    }
    s.where = Where::kDisk;
    AddHost(-int64_t(s.bytes));
    freed += s.bytes;
    st.discards++;
    st.bytes_discarded += s.info->size;
  }
  if (!dropped) return false;
#if CUDART_VERSION >= 13000
  if (!ptrs.empty()) cudaMemDiscardBatchAsync(ptrs.data(), sizes.data(), ptrs.size(), 0, side);
#endif
  for (auto [d, i] : cand)
    if (slots[i].where == Where::kDisk && slots[i].side_pending) cudaEventRecord(slots[i].side_event, side);
  st.host_drops++;
  return true;
}

void DeviceBundle::Impl::StagerLoop() {
  std::unique_lock lk(mu);
  while (!stop) {
    uint64_t seen = pokes;
    if (!Work(lk) && pokes == seen) cv.wait(lk);
  }
}

// One unit of work under the lock; false when there is nothing to do now.
bool DeviceBundle::Impl::Work(std::unique_lock<std::mutex>& lk) {
  // The monitor lowered the budget: make room now.
  if (st.device_resident > effective_budget && EvictDevice(lk, st.device_resident - effective_budget, 0, true)) return true;
#if CUDART_VERSION >= 13000
  uint64_t host_over = config.host_budget && st.host_resident > config.host_budget ? st.host_resident - config.host_budget : 0;
  if (host_drop_request || host_over) {
    bool dropped = DropHost(std::max(host_drop_request, host_over), host_drop_request == UINT64_MAX);
    host_drop_request = 0;
    // Only real progress loops again: copies on the GPU (read-mostly) or in
    // use cannot go, and spinning on them would hold the lock forever.
    if (dropped) return true;
  }
#endif
  if (plan.empty()) return false;
  size_t n = plan.size();
  size_t ahead = paused ? 0 : std::min<size_t>(config.lookahead, n - 1);
  for (size_t d = 0; d <= ahead; d++) {
    size_t step = (cursor + d) % n;
    if (paused && step != demanded) continue;  // an emergency: nothing ahead of need
    if (!step_error[step].ok() || StepOnDevice(step)) continue;
    uint64_t need = 0;
    for (uint32_t id : plan[step])
      if (slots[id].where != Where::kDevice) need += slots[id].bytes;
    // A step a Begin waits for may use the whole configured budget even
    // while the monitor has lowered the effective one; prefetches stay
    // inside the effective one.
    uint64_t budget = step == demanded ? config.gpu_budget : effective_budget;
    uint64_t step_total = 0;
    for (uint32_t id : plan[step]) step_total += slots[id].bytes;
    if (step_total > config.gpu_budget) {
      if (d == 0) {
        step_error[step] = Status::Error(ENOSPC, "plan step %zu needs %s on the GPU, more than the budget of %s", step,
                                         FormatSize(step_total).c_str(), FormatSize(config.gpu_budget).c_str());
        done_cv.notify_all();
      }
      continue;
    }
    if (d == 0) {
      // Steps between Begin and End hold their tensors: if they and this
      // step cannot fit together, waiting would never end.
      uint64_t pinned = 0;
      for (const Slot& s : slots)
        if (s.in_use && s.where == Where::kDevice &&
            std::find(plan[step].begin(), plan[step].end(), static_cast<uint32_t>(&s - slots.data())) == plan[step].end())
          pinned += s.bytes;
      if (pinned + step_total > config.gpu_budget) {
        step_error[step] = Status::Error(ENOSPC, "plan step %zu (%s) and the steps still between Begin and End (%s) "
                                         "do not fit the GPU budget of %s", step, FormatSize(step_total).c_str(),
                                         FormatSize(pinned).c_str(), FormatSize(config.gpu_budget).c_str());
        done_cv.notify_all();
        continue;
      }
    }
    if (st.device_resident + need > budget) {
      // Room is made (or not: wait for an End); the lock may have been
      // released meanwhile, so the next round looks at the plan afresh.
      return EvictDevice(lk, st.device_resident + need - budget, d + 1, false);
    }
    Stage(lk, step);
    return true;
  }
  return false;
}

// Decodes the step's tensors that live only in the bundle (lock released),
// then queues their prefetch to the device.
void DeviceBundle::Impl::Stage(std::unique_lock<std::mutex>& lk, size_t step) {
  std::vector<uint32_t> ids;
  uint64_t reserve = 0;
  for (uint32_t id : plan[step])
    if (slots[id].where != Where::kDevice && std::find(ids.begin(), ids.end(), id) == ids.end()) {
      ids.push_back(id);
      reserve += slots[id].bytes;
    }
  st.device_resident += reserve;  // reserved while decoding
  std::vector<uint32_t> decode;
  for (uint32_t id : ids)
    if (slots[id].where == Where::kDisk) decode.push_back(id);
  Status err;
  lk.unlock();
  uint64_t decoded = 0;
  std::vector<bool> from_saved(decode.size(), false);
  for (uint32_t id : decode) {
    Slot& s = slots[id];
    if (s.side_pending) cudaEventSynchronize(s.side_event);  // a discard must not drop what we write
    if (s.mapped && !s.host) {
      cudaError_t e = cudaMallocHost(&s.host, s.info->size);
      if (e != cudaSuccess) {
        s.host = nullptr;
        err = CudaStatus(e, "cudaMallocHost (a mapped tensor's host copy)");
        break;
      }
    }
    if (s.saved) {  // a written tensor comes back from the allocator, not the bundle
      memcpy(HostCopy(s), s.saved, s.info->size);
      faultline::Free(s.saved);
      s.saved = nullptr;
      from_saved[decoded++] = true;
      continue;
    }
    Status r = reader->ReadTensor(*s.info, {static_cast<std::byte*>(HostCopy(s)), s.info->size});
    if (!r.ok()) {
      err = r;
      break;
    }
    decoded++;
  }
  lk.lock();
  for (size_t k = 0; k < decoded; k++) {
    Slot& s = slots[decode[k]];
    s.where = Where::kHost;
    s.side_pending = false;
    AddHost(s.bytes);
    if (from_saved[k]) {
      st.restored_written++;
    } else {
      st.decodes++;
      st.bytes_decoded += s.info->size;
    }
  }
  if (!err.ok()) {
    st.device_resident -= reserve;
    st.errors++;
    step_error[step] = err;
    done_cv.notify_all();
    return;
  }
  cudaMemLocation dev = DeviceLoc(config.device);
  for (size_t k = 0; k < ids.size(); k++) {
    Slot& s = slots[ids[k]];
    if (s.mapped) {
      Status r = Remap(s, true);
      if (!r.ok()) {
        // The tensors already queued stay on the device; this one (Remap
        // put the placeholder back) and the rest stay on the host, and their
        // reservation is given back.
        for (size_t j = k; j < ids.size(); j++) st.device_resident -= slots[ids[j]].bytes;
        st.errors++;
        step_error[step] = r;
        done_cv.notify_all();
        return;
      }
      cudaMemcpyAsync(s.ptr, s.host, s.info->size, cudaMemcpyHostToDevice, side);
    } else {
      PrefetchTo(s.ptr, std::max<uint64_t>(s.info->size, 1), dev, side);
    }
    cudaEventRecord(s.side_event, side);
    s.side_pending = false;
    if (!KeepsHostCopy(s)) AddHost(-int64_t(s.bytes));
    s.where = Where::kDevice;
    st.to_device++;
    st.bytes_to_device += s.info->size;
  }
  st.peak_device_resident = std::max(st.peak_device_resident, st.device_resident);
  done_cv.notify_all();
}

void DeviceBundle::Impl::Tick() {
  size_t free_b = 0, total_b = 0;
  double gp = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && total_b) gp = 1.0 - double(free_b) / double(total_b);
  internal::HostMemory hm;
  double hp = internal::ReadHostMemory(&hm) ? hm.Pressure() : 0;
  std::lock_guard lk(mu);
  st.monitor_ticks++;
  st.gpu_pressure = gp;
  st.host_pressure = hp;
  const Thresholds& g = config.monitor.gpu;
  uint64_t in_use = 0;
  for (const Slot& s : slots)
    if (s.in_use && s.where == Where::kDevice) in_use += s.bytes;
  if (gp >= g.emergency) {
    if (!paused) st.emergencies++;
    paused = true;
    effective_budget = in_use;
  } else if (gp >= g.offload) {
    // Give back what the device is over the threshold, at least one granule.
    uint64_t excess = std::max<uint64_t>(static_cast<uint64_t>((gp - g.offload) * double(total_b)), kGranule);
    uint64_t target = st.device_resident > excess ? st.device_resident - excess : 0;
    target = std::max(target, in_use);
    if (target < effective_budget) {
      effective_budget = target;
      st.offloads++;
    }
  } else if (gp < g.reload && (paused || effective_budget < config.gpu_budget)) {
    paused = false;
    effective_budget = config.gpu_budget;
    st.reloads++;
  }
  st.effective_gpu_budget = effective_budget;
  if (page) ReleaseFree(effective_budget);  // free mapped allocations over a lowered budget
  const Thresholds& h = config.monitor.host;
  if (hp >= h.emergency) host_drop_request = UINT64_MAX;
  else if (hp >= h.offload)
    host_drop_request = std::max<uint64_t>(static_cast<uint64_t>((hp - h.offload) * double(hm.Basis())), kGranule);
  Poke();
}

Result<std::unique_ptr<DeviceBundle>> DeviceBundle::Open(const std::string& path, const DeviceConfig& config) {
  std::unique_ptr<DeviceBundle> b(new DeviceBundle());
  b->impl_ = std::make_unique<Impl>();
  b->impl_->config = config;
  FL_RETURN_IF_ERROR(b->impl_->Init(path));
  return b;
}

DeviceBundle::~DeviceBundle() = default;

const BundleInfo& DeviceBundle::info() const noexcept {
  return impl_->paged ? impl_->paged->info() : impl_->reader->info();
}
const DeviceConfig& DeviceBundle::config() const noexcept { return impl_->config; }

Result<DeviceTensor> DeviceBundle::tensor(std::string_view model, std::string_view name) const {
  const BundleInfo& bi = info();
  const ModelInfo* m = model.empty() ? (bi.models.empty() ? nullptr : &bi.models[0]) : bi.FindModel(model);
  if (!m)
    return Status::Error(ENOENT, "no model '%.*s' in the bundle", static_cast<int>(std::min<size_t>(model.size(), 64)),
                         model.data());
  uint32_t first = impl_->model_first[m - bi.models.data()];
  for (size_t i = 0; i < m->tensors.size(); i++)
    if (m->tensors[i].name == name) {
      const Slot& s = impl_->slots[first + i];
      return DeviceTensor{s.ptr, s.info, static_cast<uint32_t>(first + i)};
    }
  return Status::Error(ENOENT, "no tensor '%.*s' in model '%s'", static_cast<int>(std::min<size_t>(name.size(), 128)),
                       name.data(), m->name.c_str());
}

std::vector<DeviceTensor> DeviceBundle::layer(std::string_view model, std::string_view prefix) const {
  std::vector<DeviceTensor> out;
  const BundleInfo& bi = info();
  const ModelInfo* m = model.empty() ? (bi.models.empty() ? nullptr : &bi.models[0]) : bi.FindModel(model);
  if (!m) return out;
  uint32_t first = impl_->model_first[m - bi.models.data()];
  for (size_t i = 0; i < m->tensors.size(); i++)
    if (std::string_view(m->tensors[i].name).starts_with(prefix)) {
      const Slot& s = impl_->slots[first + i];
      out.push_back(DeviceTensor{s.ptr, s.info, static_cast<uint32_t>(first + i)});
    }
  return out;
}

Status DeviceBundle::Advise(const DeviceTensor& t, const Advice& advice) {
  if (t.id >= impl_->slots.size() || impl_->slots[t.id].ptr != t.data)
    return Status::Error(EINVAL, "not a tensor of this bundle");
  return impl_->ApplyAdvice(impl_->slots[t.id], advice);
}

Status DeviceBundle::MarkWritten(const DeviceTensor& t) {
  if (t.id >= impl_->slots.size() || impl_->slots[t.id].ptr != t.data)
    return Status::Error(EINVAL, "not a tensor of this bundle");
  Slot& s = impl_->slots[t.id];
  {
    std::lock_guard lk(impl_->mu);
    s.written = true;
  }
  // Read-mostly suits read-only data: a written tensor migrates instead
  // (its one valid copy moves with it; eviction copies it back). A mapped
  // one is copied back to its host copy when it leaves the GPU.
  if (s.read_mostly && !s.mapped) {
    Advice a;
    a.read_mostly = false;
    a.preferred = s.preferred;
    return impl_->ApplyAdvice(s, a);
  }
  return Status::Ok();
}

Status DeviceBundle::SetPlan(std::vector<std::vector<DeviceTensor>> steps) {
  Impl& im = *impl_;
  for (size_t k = 0; k < steps.size(); k++) {
    if (steps[k].empty()) return Status::Error(EINVAL, "plan step %zu has no tensors", k);
    for (const DeviceTensor& t : steps[k])
      if (t.id >= im.slots.size() || im.slots[t.id].ptr != t.data)
        return Status::Error(EINVAL, "plan step %zu names a tensor that is not of this bundle", k);
  }
  std::unique_lock lk(im.mu);
  for (const Slot& s : im.slots)
    if (s.in_use) return Status::Error(EBUSY, "a plan step is between Begin and End");
  for (Slot& s : im.slots) s.steps.clear();
  im.plan.assign(steps.size(), {});
  for (size_t k = 0; k < steps.size(); k++)
    for (const DeviceTensor& t : steps[k]) {
      im.plan[k].push_back(t.id);
      auto& v = im.slots[t.id].steps;
      if (v.empty() || v.back() != k) v.push_back(k);
    }
  for (Slot& s : im.slots) s.last_done_step = kNoStep;
  while (im.done_events.size() < steps.size()) {
    cudaEvent_t e;
    FL_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
    im.done_events.push_back(e);
  }
  // Events of steps beyond the new plan stay recorded; nothing refers to them.
  im.step_error.assign(steps.size(), Status::Ok());
  im.cursor = 0;
  im.Poke();
  return Status::Ok();
}

Status DeviceBundle::SetPlan(std::string_view model, const std::vector<std::string>& prefixes) {
  FL_ASSIGN_OR_RETURN(auto steps,
                      internal::StepsByPrefix(model, prefixes, [&](const std::string& p) { return layer(model, p); }));
  return SetPlan(std::move(steps));
}

size_t DeviceBundle::plan_size() const noexcept {
  std::lock_guard lk(impl_->mu);
  return impl_->plan.size();
}

Status DeviceBundle::Begin(size_t step, void* stream) {
  Impl& im = *impl_;
  auto s = static_cast<cudaStream_t>(stream);
  std::unique_lock lk(im.mu);
  if (step >= im.plan.size())
    return Status::Error(EINVAL, "plan step %zu out of range (plan has %zu steps)", step, im.plan.size());
  if (im.paged) {
    std::vector<uint32_t> ids = im.plan[step];
    im.cursor = step;
    lk.unlock();
    for (size_t k = 0; k < ids.size(); k++) {
      Status r = im.paged->Pin(im.slots[ids[k]].view);
      if (!r.ok()) {
        while (k--) im.paged->Unpin(im.slots[ids[k]].view);
        return r;
      }
    }
    size_t n = im.plan.size();
    for (unsigned d = 1; d <= im.config.lookahead && d < n; d++)
      for (uint32_t id : im.plan[(step + d) % n]) im.paged->Prefetch(im.slots[id].view);
    return Status::Ok();
  }
  im.cursor = step;
  im.step_error[step] = Status::Ok();  // a failed step is tried again
  for (uint32_t id : im.plan[step]) im.slots[id].in_use++;
  if (!im.StepOnDevice(step)) {
    im.st.begin_waits++;
    im.demanded = step;
    im.Poke();
    im.done_cv.wait(lk, [&] { return im.stop || im.StepOnDevice(step) || !im.step_error[step].ok(); });
    im.demanded = kNoStep;
  }
  if (!im.step_error[step].ok() || im.stop) {
    for (uint32_t id : im.plan[step]) im.slots[id].in_use--;
    im.Poke();
    return im.stop ? Status::Error(ECANCELED, "the bundle is closing") : im.step_error[step];
  }
  for (uint32_t id : im.plan[step]) {
    cudaError_t e = cudaStreamWaitEvent(s, im.slots[id].side_event, 0);
    if (e != cudaSuccess) {
      for (uint32_t j : im.plan[step]) im.slots[j].in_use--;
      return CudaStatus(e, "cudaStreamWaitEvent");
    }
  }
  im.Poke();  // the stager may prefetch what follows
  return Status::Ok();
}

namespace {
struct UnpinJob {
  PagedBundle* paged;
  std::vector<TensorView> views;
};
}  // namespace

void DeviceBundle::End(size_t step, void* stream) {
  Impl& im = *impl_;
  auto s = static_cast<cudaStream_t>(stream);
  std::lock_guard lk(im.mu);
  if (step >= im.plan.size()) return;
  size_t n = im.plan.size();
  if (im.paged) {
    // Unpin once the stream's work on the step is done.
    auto* job = new UnpinJob{im.paged.get(), {}};
    for (uint32_t id : im.plan[step]) job->views.push_back(im.slots[id].view);
    cudaError_t e = cudaLaunchHostFunc(
        s,
        [](void* p) {
          auto* j = static_cast<UnpinJob*>(p);
          for (const TensorView& v : j->views) j->paged->Unpin(v);
          delete j;
        },
        job);
    if (e != cudaSuccess) {
      cudaStreamSynchronize(s);
      for (const TensorView& v : job->views) im.paged->Unpin(v);
      delete job;
    }
    if (step == im.cursor) im.cursor = (step + 1) % n;
    return;
  }
  cudaEventRecord(im.done_events[step], s);
  for (uint32_t id : im.plan[step]) {
    Slot& sl = im.slots[id];
    if (sl.in_use) sl.in_use--;
    sl.last_done_step = step;
  }
  if (step == im.cursor) im.cursor = (step + 1) % n;
  im.Poke();
}

Status DeviceBundle::Synchronize() { return CudaStatus(cudaStreamSynchronize(impl_->side), "cudaStreamSynchronize"); }

DeviceStats DeviceBundle::stats() const {
  std::lock_guard lk(impl_->mu);
  return impl_->st;
}

}  // namespace faultline::cuda
