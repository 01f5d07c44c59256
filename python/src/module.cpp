// faultline._native: the Python binding (pybind11) over the C++ API. The
// Python package (python/faultline) builds the user-facing API on it:
// tensors as zero-copy NumPy/torch views of paged memory, managed regions
// for offloading live models, bundles written from torch tensors.
// Errors are OSError(errno, message) (FileNotFoundError, ... by errno) or
// ValueError for bad arguments.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <memory>
#include <type_traits>
#include <string>
#include <vector>

#include "bundle/manifest.h"
#include "faultline/alloc.hpp"
#include "faultline/bundle.hpp"
#include "faultline/cuda.hpp"
#include "faultline/paging.hpp"
#include "faultline/size.hpp"
#include "pager/stats.h"

namespace py = pybind11;
using namespace faultline;

namespace {

// The library's errors are OSError(errno, message): Python picks the
// subclass (FileNotFoundError for ENOENT, ...). Bad arguments to the binding
// itself are ValueError (raised where they are checked).
[[noreturn]] void Raise(const Status& s) {
  PyErr_SetObject(PyExc_OSError, py::make_tuple(s.code(), std::string(s.message())).ptr());
  throw py::error_already_set();
}

template <typename T>
T Take(Result<T> r) {
  if (!r.ok()) Raise(r.status());
  return std::move(r).value();
}

// Runs a library call that may block (I/O, waits for the GPU) without the
// GIL, then raises its error (a Status) or takes its value (a Result).
template <typename F>
auto WithoutGil(F&& f) {
  auto r = [&] {
    py::gil_scoped_release nogil;
    return f();
  }();
  if constexpr (std::is_same_v<decltype(r), Status>) {
    if (!r.ok()) Raise(r);
  } else {
    if (!r.ok()) Raise(r.status());
    return std::move(r).value();
  }
}

uint64_t SizeArg(const py::object& v, const char* what) {
  if (py::isinstance<py::int_>(v)) {
    long long n = v.cast<long long>();
    if (n <= 0) throw py::value_error(std::string(what) + " must be positive");
    return static_cast<uint64_t>(n);
  }
  std::string s = py::str(v);
  uint64_t out = 0;
  if (!ParseSize(s, &out) || out == 0)
    throw py::value_error(std::string(what) + " '" + s + "' is not a size (such as 512M or 2G)");
  return out;
}

// A read-only window on a paged tensor; keeps its bundle open.
struct PagedBuffer {
  std::shared_ptr<PagedBundle> owner;
  const void* data;
  size_t size;
};

// A writable window on managed memory; keeps its region alive.
struct RegionBuffer {
  std::shared_ptr<ManagedRegion> owner;
  void* data;
  size_t size;
};

class Bundle {
 public:
  Bundle(const std::string& path, const py::object& budget, const std::string& policy, const std::string& mode,
         int prefetch, int workers, int huge_pages) {
    PagingConfig c = PagingConfig::FromEnvironment();
    if (!budget.is_none()) c.max_resident = SizeArg(budget, "budget");
    if (!policy.empty()) {
      if (policy == "lru") c.policy = EvictionPolicy::kLru;
      else if (policy == "lfu") c.policy = EvictionPolicy::kLfu;
      else if (policy == "plan") c.policy = EvictionPolicy::kPlan;
      else throw py::value_error("policy '" + policy + "' is not lru, lfu or plan");
    }
    if (!mode.empty()) {
      if (mode == "auto") c.mode = PagingMode::kAuto;
      else if (mode == "uffd") c.mode = PagingMode::kUffd;
      else if (mode == "guard") c.mode = PagingMode::kGuard;
      else if (mode == "mmap") c.mode = PagingMode::kMmap;
      else throw py::value_error("mode '" + mode + "' is not auto, uffd, guard or mmap");
    }
    if (prefetch >= 0) c.prefetch_depth = static_cast<unsigned>(prefetch);
    if (workers >= 0) c.workers = static_cast<unsigned>(workers);
    if (huge_pages >= 0) c.huge_pages = huge_pages != 0;
    b_ = WithoutGil([&] { return PagedBundle::Open(path, c); });
    path_ = path;
  }

  PagedBundle& get() const {
    if (!b_) throw py::value_error("the bundle is closed");
    return *b_;
  }

  std::string manifest() const { return internal::ManifestToJson(get().info()); }
  std::string mode() const { return PagingModeName(get().mode()); }
  bool huge_units() const { return get().huge_units(); }

  TensorView view(const std::string& model, const std::string& name) const {
    auto m = model.empty() ? Result<ModelView>(get().model()) : get().model(model);
    if (!m.ok()) Raise(m.status());
    return Take(m->tensor(name));
  }

  PagedBuffer buffer(const std::string& model, const std::string& name) const {
    TensorView t = view(model, name);
    return PagedBuffer{b_, t.data(), static_cast<size_t>(t.size())};
  }

  py::bytes blob(const std::string& model, const std::string& name) const {
    // Blobs are small (configs): read them through a reader of the same file.
    const BundleInfo& info = get().info();
    const ModelInfo* m = model.empty() ? &info.models.at(0) : info.FindModel(model);
    if (!m) Raise(Status::Error(ENOENT, "no model '%s' in the bundle", model.c_str()));
    const BlobInfo* b = m->FindBlob(name);
    if (!b) Raise(Status::Error(ENOENT, "no blob '%s' in model '%s'", name.c_str(), m->name.c_str()));
    if (!blob_reader_) blob_reader_ = Take(BundleReader::Open(path_));
    return py::bytes(Take(blob_reader_->ReadBlob(*b)));
  }

  void prefetch(const std::string& model, const std::string& name) { get().Prefetch(view(model, name)); }
  void dont_need(const std::string& model, const std::string& name) { get().DontNeed(view(model, name)); }
  void pin(const std::string& model, const std::string& name) {
    TensorView t = view(model, name);
    PagedBundle& b = get();  // (raises: with the GIL)
    WithoutGil([&] { return b.Pin(t); });
  }
  void unpin(const std::string& model, const std::string& name) { get().Unpin(view(model, name)); }
  // steps: for each plan step, the (model, tensor) pairs used together.
  void set_plan(const std::vector<std::vector<std::pair<std::string, std::string>>>& steps) {
    std::vector<std::vector<TensorView>> v(steps.size());
    for (size_t k = 0; k < steps.size(); k++)
      for (auto& [m, n] : steps[k]) v[k].push_back(view(m, n));
    get().SetPlan(v);
  }
  void start_recording() { get().StartRecordingPlan(); }
  void stop_recording() { get().StopRecordingPlan(); }
  void advance(const std::string& model, const std::string& name) { get().Advance(view(model, name)); }

  py::dict stats() const {
    PagingStats s = get().stats();
    py::dict d;
#define FL_PUT(name) d[#name] = s.name;
    FAULTLINE_PAGING_COUNTERS(FL_PUT)
#undef FL_PUT
    d["resident_bytes"] = s.resident_bytes;
    d["peak_resident_bytes"] = s.peak_resident_bytes;
    d["budget_bytes"] = s.budget_bytes;
    d["latency_p50_us"] = s.fault_latency.p50_us;
    d["latency_p99_us"] = s.fault_latency.p99_us;
    py::list per;
    for (const TensorStats& t : s.tensors) {
      py::dict e;
      e["model"] = t.model;
      e["tensor"] = t.tensor;
      e["faults"] = t.faults;
      e["loads"] = t.loads;
      e["prefetched"] = t.prefetched;
      e["evictions"] = t.evictions;
      per.append(e);
    }
    d["tensors"] = per;
    return d;
  }

  void close() { b_.reset(); }

 private:
  std::shared_ptr<PagedBundle> b_;
  std::string path_;
  mutable std::unique_ptr<BundleReader> blob_reader_;  // blobs are read on demand, not paged
};

// A tensor of the GPU tier: a device-usable pointer into CUDA managed
// memory; keeps its DeviceBundle alive. Exposed to torch through
// __cuda_array_interface__ (built in the Python package).
struct DeviceBuffer {
  std::shared_ptr<cuda::DeviceBundle> owner;
  void* data;
  size_t size;
  int device;
};

// The GPU tier (faultline::cuda::DeviceBundle). Its tensors hold their data
// for work queued between begin(step) and end(step) of a plan step that
// contains them; the Python package drives that from module hooks.
class GpuBundle {
 public:
  GpuBundle(const std::string& path, int device, const py::object& gpu_budget, const py::object& host_budget,
            int lookahead, const std::string& eviction, int read_mostly, int monitor, const std::string& memory) {
    cuda::DeviceConfig c = cuda::DeviceConfig::FromEnvironment();
    if (device >= 0) c.device = device;
    if (!gpu_budget.is_none()) c.gpu_budget = SizeArg(gpu_budget, "gpu_budget");
    if (!host_budget.is_none()) c.host_budget = SizeArg(host_budget, "host_budget");
    if (lookahead >= 0) c.lookahead = static_cast<unsigned>(lookahead);
    if (!eviction.empty() && !cuda::ParseEviction(eviction, &c.eviction))
      throw py::value_error("eviction '" + eviction + "' is not host or discard");
    if (read_mostly >= 0) c.advice.read_mostly = read_mostly != 0;
    if (monitor >= 0) c.monitor.enabled = monitor != 0;
    if (!memory.empty() && !cuda::ParseMemory(memory, &c.memory))
      throw py::value_error("memory '" + memory + "' is not managed or mapped");
    b_ = WithoutGil([&] { return cuda::DeviceBundle::Open(path, c); });
  }

  cuda::DeviceBundle& get() const {
    if (!b_) throw py::value_error("the GPU bundle is closed");
    return *b_;
  }

  std::string manifest() const { return internal::ManifestToJson(get().info()); }
  int device() const { return get().config().device; }

  cuda::DeviceTensor tensor(const std::string& model, const std::string& name) const {
    return Take(get().tensor(model, name));
  }

  DeviceBuffer buffer(const std::string& model, const std::string& name) const {
    cuda::DeviceTensor t = tensor(model, name);
    return DeviceBuffer{b_, t.data, static_cast<size_t>(t.size()), device()};
  }

  // steps: for each step, the (model, tensor) pairs it uses.
  void set_plan(const std::vector<std::vector<std::pair<std::string, std::string>>>& steps) {
    std::vector<std::vector<cuda::DeviceTensor>> plan;
    for (const auto& step : steps) {
      plan.emplace_back();
      for (const auto& [m, n] : step) plan.back().push_back(tensor(m, n));
    }
    Status s = get().SetPlan(std::move(plan));
    if (!s.ok()) Raise(s);
  }
  size_t plan_size() const { return get().plan_size(); }

  // stream: a cudaStream_t as an integer (torch: stream.cuda_stream); 0 is
  // the legacy default stream.
  void begin(size_t step, uintptr_t stream) {
    cuda::DeviceBundle& b = get();
    WithoutGil([&] { return b.Begin(step, reinterpret_cast<void*>(stream)); });
  }
  void end(size_t step, uintptr_t stream) { get().End(step, reinterpret_cast<void*>(stream)); }
  void synchronize() {
    cuda::DeviceBundle& b = get();
    WithoutGil([&] { return b.Synchronize(); });
  }

  py::dict stats() const {
    cuda::DeviceStats s = get().stats();
    py::dict d;
    d["to_device"] = s.to_device;
    d["bytes_to_device"] = s.bytes_to_device;
    d["to_host"] = s.to_host;
    d["bytes_to_host"] = s.bytes_to_host;
    d["discards"] = s.discards;
    d["bytes_discarded"] = s.bytes_discarded;
    d["decodes"] = s.decodes;
    d["bytes_decoded"] = s.bytes_decoded;
    d["errors"] = s.errors;
    d["begin_waits"] = s.begin_waits;
    d["device_resident"] = s.device_resident;
    d["peak_device_resident"] = s.peak_device_resident;
    d["device_pages"] = s.device_pages;
    d["host_resident"] = s.host_resident;
    d["peak_host_resident"] = s.peak_host_resident;
    d["gpu_budget"] = s.gpu_budget;
    d["effective_gpu_budget"] = s.effective_gpu_budget;
    d["monitor_ticks"] = s.monitor_ticks;
    d["offloads"] = s.offloads;
    d["emergencies"] = s.emergencies;
    d["reloads"] = s.reloads;
    d["host_drops"] = s.host_drops;
    d["gpu_pressure"] = s.gpu_pressure;
    d["host_pressure"] = s.host_pressure;
    return d;
  }

  // Frees the managed memory once no tensor refers to it any more.
  void close() {
    if (b_) {
      py::gil_scoped_release nogil;
      (void)b_->Synchronize();
    }
    b_.reset();
  }

 private:
  std::shared_ptr<cuda::DeviceBundle> b_;
};

py::dict AllocStatsDict(const AllocStats& s) {
  py::dict d;
  d["allocations"] = s.allocations;
  d["bytes_managed"] = s.bytes_managed;
  d["resident_bytes"] = s.resident_bytes;
  d["peak_resident_bytes"] = s.peak_resident_bytes;
  d["budget_bytes"] = s.budget_bytes;
  d["zero_fills"] = s.zero_fills;
  d["spills"] = s.spills;
  d["clean_drops"] = s.clean_drops;
  d["unit_loads"] = s.unit_loads;
  d["unit_moves"] = s.unit_moves;
  d["unit_recycled"] = s.unit_recycled;
  d["zero_drops"] = s.zero_drops;
  d["loads"] = s.loads;
  d["prefetched"] = s.prefetched;
  d["write_faults"] = s.write_faults;
  d["errors"] = s.errors;
  d["bytes_spilled"] = s.bytes_spilled;
  d["bytes_stored"] = s.bytes_stored;
  d["spill_file_bytes"] = s.spill_file_bytes;
  d["compression_ratio"] = s.compression_ratio();
  return d;
}

class Region {
 public:
  Region(const py::object& size, const py::object& budget, const std::string& spill_dir, const std::string& codec) {
    AllocConfig c = AllocConfig::FromEnvironment();
    if (!budget.is_none()) c.budget = SizeArg(budget, "budget");
    if (!spill_dir.empty()) c.spill_dir = spill_dir;
    if (codec == "raw") c.zstd_level = 0;
    else if (!codec.empty() && codec != "zstd") throw py::value_error("codec '" + codec + "' is not zstd or raw");
    r_ = Take(ManagedRegion::Create(SizeArg(size, "size"), c));
  }
  RegionBuffer buffer() const { return RegionBuffer{r_, r_->data(), r_->size()}; }
  size_t size() const { return r_->size(); }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(r_->data()); }
  py::dict stats() const { return AllocStatsDict(r_->stats()); }
  void prefetch(size_t offset, size_t len) {
    Status s = r_->Prefetch(offset, len);
    if (!s.ok()) Raise(s);
  }
  void evict(size_t offset, size_t len) {
    WithoutGil([&] { return r_->Evict(offset, len); });  // compresses and writes
  }
  py::dict usage(size_t offset, size_t len) const {
    RangeUsage u = Take(r_->Usage(offset, len));
    py::dict d;
    d["resident_bytes"] = u.resident_bytes;
    d["spilled_bytes"] = u.spilled_bytes;
    d["stored_bytes"] = u.stored_bytes;
    d["zero_bytes"] = u.zero_bytes;
    d["faults"] = u.faults;
    d["evictions"] = u.evictions;
    return d;
  }

 private:
  std::shared_ptr<ManagedRegion> r_;
};

std::vector<SigDim> SigShape(const py::list& dims) {
  std::vector<SigDim> out;
  for (const py::handle& d : dims) {
    SigDim s;
    if (d.is_none()) s.size = -1;
    else if (py::isinstance<py::str>(d)) s.name = d.cast<std::string>();
    else s.size = d.cast<int64_t>();
    out.push_back(s);
  }
  return out;
}

std::vector<TensorSignature> SigList(const py::handle& items) {
  std::vector<TensorSignature> out;
  if (items.is_none()) return out;
  for (const py::handle& it : items) {
    py::dict d = py::reinterpret_borrow<py::dict>(it);
    TensorSignature t;
    t.name = d["name"].cast<std::string>();
    auto dt = ParseDType(d["dtype"].cast<std::string>());
    if (!dt) throw py::value_error("signature dtype '" + d["dtype"].cast<std::string>() + "' is unknown");
    t.dtype = *dt;
    t.shape = SigShape(py::reinterpret_borrow<py::list>(d["shape"]));
    out.push_back(t);
  }
  return out;
}

class Builder {
 public:
  int add_model(const std::string& name) {
    models_.push_back(&b_.AddModel(name));
    return static_cast<int>(models_.size() - 1);
  }
  ModelBuilder& model(int m) {
    if (m < 0 || static_cast<size_t>(m) >= models_.size()) throw py::value_error("no such model index");
    return *models_[m];
  }
  void add_tensor(int m, const std::string& name, const std::string& dtype, const std::vector<uint64_t>& shape,
                  const py::buffer& data, const std::string& codec, int level, bool shuffle, double min_ratio) {
    auto dt = ParseDType(dtype);
    if (!dt) throw py::value_error("dtype '" + dtype + "' is unknown");
    py::buffer_info info = data.request();
    TensorOptions o;
    if (!ParseCodec(codec, &o.codec)) throw py::value_error("codec '" + codec + "' is not zstd or raw");
    o.level = level;
    o.shuffle = shuffle;
    o.min_ratio = min_ratio;
    keep_.push_back(data);  // the bytes must live until build()
    size_t n = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    model(m).AddTensor(name, *dt, shape, {static_cast<const std::byte*>(info.ptr), n}, o);
  }
  void set_metadata(int m, const std::string& key, const std::string& value) { model(m).SetMetadataValue(key, value); }
  void set_info(int m, const std::string& author, const std::string& license, const std::string& description) {
    ModelMetadata md;
    md.author = author;
    md.license = license;
    md.description = description;
    model(m).SetMetadata(md);
  }
  void set_version(int m, const std::string& v) { model(m).SetVersion(v); }
  void set_signature(int m, const py::dict& sig) {
    Signature s;
    py::object in = sig.contains("inputs") ? py::object(sig["inputs"]) : py::object(py::none());
    py::object out = sig.contains("outputs") ? py::object(sig["outputs"]) : py::object(py::none());
    s.inputs = SigList(in);
    s.outputs = SigList(out);
    model(m).SetSignature(s);
  }
  void add_blob(int m, const std::string& name, const std::string& kind, const std::string& media_type,
                const py::bytes& bytes) {
    BlobKind k;
    if (!ParseBlobKind(kind, &k)) throw py::value_error("blob kind '" + kind + "' is unknown");
    model(m).AddBlob(name, k, media_type, std::string(bytes));
  }
  py::dict build(const std::string& path) {
    Result<BuildSummary> r = Status::Error(EINVAL, "not built");
    {
      py::gil_scoped_release nogil;
      r = b_.Build(path);
    }
    keep_.clear();
    BuildSummary s = Take(std::move(r));
    py::dict d;
    d["logical_bytes"] = s.logical_bytes;
    d["stored_bytes"] = s.stored_bytes;
    d["file_size"] = s.file_size;
    d["unique_frames"] = s.unique_frames;
    d["seconds"] = s.seconds;
    return d;
  }

 private:
  BundleBuilder b_;
  std::vector<ModelBuilder*> models_;
  std::vector<py::buffer> keep_;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "faultline native binding (use the faultline package)";
  m.def("version", [] { return std::string(Version()); });
  m.def("has_cuda", [] { return cuda::Available(); });
  m.def("parse_size", [](const py::object& v) { return SizeArg(v, "size"); });

  py::class_<PagedBuffer>(m, "PagedBuffer", py::buffer_protocol())
      .def_buffer([](PagedBuffer& b) {
        return py::buffer_info(const_cast<void*>(b.data), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size)}, {1}, /*readonly=*/true);
      })
      .def_property_readonly("address", [](const PagedBuffer& b) { return reinterpret_cast<uintptr_t>(b.data); })
      .def("__len__", [](const PagedBuffer& b) { return b.size; });

  py::class_<RegionBuffer>(m, "RegionBuffer", py::buffer_protocol())
      .def_buffer([](RegionBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size)}, {1}, /*readonly=*/false);
      })
      .def("__len__", [](const RegionBuffer& b) { return b.size; });

  py::class_<Bundle>(m, "Bundle")
      .def(py::init<const std::string&, const py::object&, const std::string&, const std::string&, int, int, int>(),
           py::arg("path"), py::arg("budget") = py::none(), py::arg("policy") = "", py::arg("mode") = "",
           py::arg("prefetch") = -1, py::arg("workers") = -1, py::arg("huge_pages") = -1)
      .def("manifest", &Bundle::manifest)
      .def("mode", &Bundle::mode)
      .def("huge_units", &Bundle::huge_units)
      .def("buffer", &Bundle::buffer)
      .def("blob", &Bundle::blob)
      .def("prefetch", &Bundle::prefetch)
      .def("dont_need", &Bundle::dont_need)
      .def("pin", &Bundle::pin)
      .def("unpin", &Bundle::unpin)
      .def("set_plan", &Bundle::set_plan)
      .def("start_recording", &Bundle::start_recording)
      .def("stop_recording", &Bundle::stop_recording)
      .def("advance", &Bundle::advance)
      .def("stats", &Bundle::stats)
      .def("close", &Bundle::close);

  m.def("cuda_describe", [] { return cuda::Describe(); });

  py::class_<DeviceBuffer>(m, "DeviceBuffer")
      .def_property_readonly("address", [](const DeviceBuffer& b) { return reinterpret_cast<uintptr_t>(b.data); })
      .def_property_readonly("device", [](const DeviceBuffer& b) { return b.device; })
      .def("__len__", [](const DeviceBuffer& b) { return b.size; });

  py::class_<GpuBundle>(m, "GpuBundle")
      .def(py::init<const std::string&, int, const py::object&, const py::object&, int, const std::string&, int, int,
                    const std::string&>(),
           py::arg("path"), py::arg("device") = -1, py::arg("gpu_budget") = py::none(),
           py::arg("host_budget") = py::none(), py::arg("lookahead") = -1, py::arg("eviction") = "",
           py::arg("read_mostly") = -1, py::arg("monitor") = -1, py::arg("memory") = "")
      .def("manifest", &GpuBundle::manifest)
      .def("device", &GpuBundle::device)
      .def("buffer", &GpuBundle::buffer)
      .def("set_plan", &GpuBundle::set_plan)
      .def("plan_size", &GpuBundle::plan_size)
      .def("begin", &GpuBundle::begin, py::arg("step"), py::arg("stream") = 0)
      .def("end", &GpuBundle::end, py::arg("step"), py::arg("stream") = 0)
      .def("synchronize", &GpuBundle::synchronize)
      .def("stats", &GpuBundle::stats)
      .def("close", &GpuBundle::close);

  py::class_<Region>(m, "Region")
      .def(py::init<const py::object&, const py::object&, const std::string&, const std::string&>(), py::arg("size"),
           py::arg("budget") = py::none(), py::arg("spill_dir") = "", py::arg("codec") = "")
      .def("buffer", &Region::buffer)
      .def_property_readonly("size", &Region::size)
      .def_property_readonly("address", &Region::address)
      .def("stats", &Region::stats)
      .def("usage", &Region::usage, py::arg("offset"), py::arg("length"))
      .def("prefetch", &Region::prefetch, py::arg("offset"), py::arg("length"))
      .def("evict", &Region::evict, py::arg("offset"), py::arg("length"));

  py::class_<Builder>(m, "Builder")
      .def(py::init<>())
      .def("add_model", &Builder::add_model)
      .def("add_tensor", &Builder::add_tensor, py::arg("model"), py::arg("name"), py::arg("dtype"), py::arg("shape"),
           py::arg("data"), py::arg("codec") = "zstd", py::arg("level") = 3, py::arg("shuffle") = false,
           py::arg("min_ratio") = 1.0)
      .def("set_metadata", &Builder::set_metadata)
      .def("set_info", &Builder::set_info)
      .def("set_version", &Builder::set_version)
      .def("set_signature", &Builder::set_signature)
      .def("add_blob", &Builder::add_blob)
      .def("build", &Builder::build);
}
