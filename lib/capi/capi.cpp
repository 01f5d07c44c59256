// The C ABI over the C++ API: handles wrap the C++ objects, every entry
// point catches everything (no exception crosses extern "C") and turns a
// Status into -errno plus a thread-local message.
#include "faultline/faultline.h"

#include <cstddef>
#include <cstring>
#include <new>

#include "faultline/alloc.hpp"
#include "faultline/bundle.hpp"
#include "faultline/cuda.hpp"
#include "faultline/paging.hpp"
#include "pager/stats.h"

using namespace faultline;

struct faultline_reader {
  std::unique_ptr<BundleReader> reader;
};

struct faultline_paged {
  std::unique_ptr<PagedBundle> bundle;
};

struct faultline_device {
  std::unique_ptr<cuda::DeviceBundle> bundle;
};

struct faultline_builder {
  BundleBuilder builder;
  std::vector<ModelBuilder*> models;
  double min_ratio = 1.0;  // TensorOptions::min_ratio for tensors added from now on
};

namespace {

thread_local char t_last_error[256];

int Fail(const Status& s) {
  snprintf(t_last_error, sizeof(t_last_error), "%s", s.message());
  return -s.code();
}

int Fail(int code, const char* msg) {
  snprintf(t_last_error, sizeof(t_last_error), "%s", msg);
  return -code;
}

template <typename F>
auto Guard(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return Fail(ENOMEM, "out of memory");
  } catch (const std::exception& e) {
    return Fail(EIO, e.what());
  } catch (...) {
    return Fail(EIO, "unknown error");
  }
}

const TensorInfo* Tensor(const faultline_reader* r, int model, int tensor) {
  if (!r) return nullptr;
  const auto& models = r->reader->info().models;
  if (model < 0 || static_cast<size_t>(model) >= models.size()) return nullptr;
  const auto& tensors = models[model].tensors;
  if (tensor < 0 || static_cast<size_t>(tensor) >= tensors.size()) return nullptr;
  return &tensors[tensor];
}

}  // namespace

extern "C" {

const char* faultline_version(void) { return Version(); }
int faultline_has_cuda(void) { return cuda::Available() ? 1 : 0; }
const char* faultline_last_error(void) { return t_last_error; }

int faultline_reader_open(const char* path, faultline_reader** out) {
  if (!path || !out) return Fail(EINVAL, "path and out must not be NULL");
  return Guard([&] {
    auto r = BundleReader::Open(path);
    if (!r.ok()) return Fail(r.status());
    *out = new faultline_reader{std::move(r).value()};
    return 0;
  });
}

void faultline_reader_close(faultline_reader* reader) { delete reader; }

int faultline_reader_model_count(const faultline_reader* r) {
  if (!r) return Fail(EINVAL, "reader is NULL");
  return static_cast<int>(r->reader->info().models.size());
}

const char* faultline_reader_model_name(const faultline_reader* r, int model) {
  if (!r || model < 0 || static_cast<size_t>(model) >= r->reader->info().models.size()) {
    Fail(ERANGE, "no such model index");
    errno = ERANGE;
    return nullptr;
  }
  return r->reader->info().models[model].name.c_str();
}

int faultline_reader_tensor_count(const faultline_reader* r, int model) {
  if (!r || model < 0 || static_cast<size_t>(model) >= r->reader->info().models.size())
    return Fail(ERANGE, "no such model index");
  return static_cast<int>(r->reader->info().models[model].tensors.size());
}

int faultline_reader_tensor_info(const faultline_reader* r, int model, int tensor,
                                 faultline_tensor_info* out) {
  const TensorInfo* t = Tensor(r, model, tensor);
  if (!t) return Fail(ERANGE, "no such model or tensor index");
  if (!out || out->struct_size < sizeof(faultline_tensor_info))
    return Fail(EINVAL, "out is NULL or its struct_size is too small");
  out->name = t->name.c_str();
  out->dtype = static_cast<int>(t->dtype);
  out->codec = static_cast<int>(t->codec);
  out->ndim = static_cast<int>(t->shape.size());
  out->shape = t->shape.data();
  out->size = t->size;
  out->stored_size = t->stored_size;
  out->page_size = t->page_size;
  out->frame_count = t->frame_count;
  return 0;
}

int faultline_reader_find(const faultline_reader* r, const char* model, const char* tensor,
                          int* model_index, int* tensor_index) {
  if (!r || !model || !tensor) return Fail(EINVAL, "NULL argument");
  const auto& models = r->reader->info().models;
  for (size_t m = 0; m < models.size(); m++) {
    if (models[m].name != model) continue;
    for (size_t t = 0; t < models[m].tensors.size(); t++)
      if (models[m].tensors[t].name == tensor) {
        if (model_index) *model_index = static_cast<int>(m);
        if (tensor_index) *tensor_index = static_cast<int>(t);
        return 0;
      }
    return Fail(ENOENT, "no such tensor in that model");
  }
  return Fail(ENOENT, "no such model");
}

int faultline_reader_read_tensor(const faultline_reader* r, int model, int tensor, void* dst,
                                 size_t len) {
  const TensorInfo* t = Tensor(r, model, tensor);
  if (!t) return Fail(ERANGE, "no such model or tensor index");
  if (!dst && len > 0) return Fail(EINVAL, "dst is NULL");
  return Guard([&] {
    Status s = r->reader->ReadTensor(*t, {static_cast<std::byte*>(dst), len});
    return s.ok() ? 0 : Fail(s);
  });
}

int64_t faultline_reader_read_frame(const faultline_reader* r, int model, int tensor,
                                    uint64_t frame, void* dst, size_t len) {
  const TensorInfo* t = Tensor(r, model, tensor);
  if (!t) return Fail(ERANGE, "no such model or tensor index");
  if (!dst) return Fail(EINVAL, "dst is NULL");
  return Guard([&]() -> int64_t {
    Status s = r->reader->ReadFrame(*t, frame, {static_cast<std::byte*>(dst), len});
    if (!s.ok()) return Fail(s);
    return static_cast<int64_t>(std::min<uint64_t>(t->page_size, t->size - frame * t->page_size));
  });
}

int faultline_reader_verify(const faultline_reader* r) {
  if (!r) return Fail(EINVAL, "reader is NULL");
  return Guard([&] {
    Status s = r->reader->Verify();
    return s.ok() ? 0 : Fail(s);
  });
}

void faultline_tensor_options_init(faultline_tensor_options* o) {
  if (!o) return;
  TensorOptions d;
  o->codec = static_cast<int>(d.codec);
  o->level = d.level;
  o->shuffle = d.shuffle;
  o->page_size = d.page_size;
}

int faultline_builder_new(faultline_builder** out) {
  if (!out) return Fail(EINVAL, "out is NULL");
  return Guard([&] {
    *out = new faultline_builder();
    return 0;
  });
}

void faultline_builder_free(faultline_builder* b) { delete b; }

int faultline_builder_add_model(faultline_builder* b, const char* name) {
  if (!b || !name) return Fail(EINVAL, "NULL argument");
  return Guard([&] {
    b->models.push_back(&b->builder.AddModel(name));
    return static_cast<int>(b->models.size() - 1);
  });
}

int faultline_builder_set_metadata(faultline_builder* b, int model, const char* key,
                                   const char* value) {
  if (!b || !key || !value) return Fail(EINVAL, "NULL argument");
  if (model < 0 || static_cast<size_t>(model) >= b->models.size())
    return Fail(ERANGE, "no such model index");
  return Guard([&] {
    b->models[model]->SetMetadataValue(key, value);
    return 0;
  });
}

int faultline_builder_set_min_ratio(faultline_builder* b, double min_ratio) {
  if (!b) return Fail(EINVAL, "NULL argument");
  if (!(min_ratio >= 1.0 && min_ratio <= 1e9)) return Fail(EINVAL, "min_ratio must be a number of at least 1");
  b->min_ratio = min_ratio;
  return 0;
}

int faultline_builder_add_tensor(faultline_builder* b, int model, const char* name, int dtype,
                                 const uint64_t* shape, int ndim, const void* data, size_t len,
                                 const faultline_tensor_options* opts) {
  if (!b || !name || (ndim > 0 && !shape) || (len > 0 && !data))
    return Fail(EINVAL, "NULL argument");
  if (model < 0 || static_cast<size_t>(model) >= b->models.size())
    return Fail(ERANGE, "no such model index");
  if (dtype < 0 || dtype >= kDTypeCount) return Fail(EINVAL, "unknown dtype");
  if (ndim < 0 || ndim > 32) return Fail(EINVAL, "ndim must be 0-32");
  TensorOptions o;
  o.min_ratio = b->min_ratio;
  if (opts) {
    if (opts->codec != FAULTLINE_CODEC_RAW && opts->codec != FAULTLINE_CODEC_ZSTD)
      return Fail(EINVAL, "unknown codec");
    o.codec = static_cast<Codec>(opts->codec);
    o.level = opts->level;
    o.shuffle = opts->shuffle != 0;
    o.page_size = opts->page_size;
  }
  return Guard([&] {
    b->models[model]->AddTensor(name, static_cast<DType>(dtype),
                                std::vector<uint64_t>(shape, shape + ndim),
                                {static_cast<const std::byte*>(data), len}, o);
    return 0;
  });
}

int faultline_builder_build(faultline_builder* b, const char* path) {
  if (!b || !path) return Fail(EINVAL, "NULL argument");
  return Guard([&] {
    auto r = b->builder.Build(path);
    return r.ok() ? 0 : Fail(r.status());
  });
}

void faultline_paging_config_init(faultline_paging_config* c) {
  if (!c) return;
  PagingConfig d = PagingConfig::FromEnvironment();
  c->struct_size = sizeof(*c);
  c->max_resident = d.max_resident;
  c->policy = static_cast<int>(d.policy);
  c->mode = static_cast<int>(d.mode);
  c->prefetch_depth = d.prefetch_depth;
  c->workers = d.workers;
}

int faultline_paged_open(const char* path, const faultline_paging_config* c, faultline_paged** out) {
  if (!path || !out) return Fail(EINVAL, "path and out must not be NULL");
  PagingConfig cfg = PagingConfig::FromEnvironment();
  if (c) {
    if (c->struct_size < sizeof(faultline_paging_config)) return Fail(EINVAL, "config struct_size too small");
    if (c->policy < 0 || c->policy > FAULTLINE_POLICY_PLAN) return Fail(EINVAL, "unknown policy");
    if (c->mode < 0 || c->mode > FAULTLINE_MODE_MMAP) return Fail(EINVAL, "unknown mode");
    cfg.max_resident = c->max_resident;
    cfg.policy = static_cast<EvictionPolicy>(c->policy);
    cfg.mode = static_cast<PagingMode>(c->mode);
    cfg.prefetch_depth = c->prefetch_depth;
    cfg.workers = c->workers;
  }
  return Guard([&] {
    auto r = PagedBundle::Open(path, cfg);
    if (!r.ok()) return Fail(r.status());
    *out = new faultline_paged{std::move(r).value()};
    return 0;
  });
}

void faultline_paged_close(faultline_paged* p) { delete p; }

namespace {
Result<TensorView> FindView(faultline_paged* p, const char* model, const char* tensor) {
  if (!p || !tensor) return Status::Error(EINVAL, "NULL argument");
  if (model) {
    auto m = p->bundle->model(model);
    if (!m.ok()) return m.status();
    return m->tensor(tensor);
  }
  return p->bundle->model().tensor(tensor);
}
}  // namespace

const void* faultline_paged_tensor(faultline_paged* p, const char* model, const char* tensor,
                                   uint64_t* size) {
  auto v = FindView(p, model, tensor);
  if (!v.ok()) {
    Fail(v.status());
    errno = v.status().code();
    return nullptr;
  }
  if (size) *size = v->size();
  return v->data();
}

#define FL_PAGED_HINT(fn, call)                                           \
  int fn(faultline_paged* p, const char* model, const char* tensor) {     \
    auto v = FindView(p, model, tensor);                                  \
    if (!v.ok()) return Fail(v.status());                                 \
    call;                                                                 \
    return 0;                                                             \
  }
FL_PAGED_HINT(faultline_paged_prefetch, p->bundle->Prefetch(*v))
FL_PAGED_HINT(faultline_paged_dont_need, p->bundle->DontNeed(*v))
FL_PAGED_HINT(faultline_paged_unpin, p->bundle->Unpin(*v))
FL_PAGED_HINT(faultline_paged_advance, p->bundle->Advance(*v))
#undef FL_PAGED_HINT

int faultline_paged_set_plan(faultline_paged* p, const char* model, const char* const* prefixes, size_t count) {
  if (!p || (!prefixes && count)) return Fail(EINVAL, "NULL argument");
  return Guard([&] {
    auto m = model ? p->bundle->model(model) : Result<ModelView>(p->bundle->model());
    if (!m.ok()) return Fail(m.status());
    std::vector<std::string> names;
    for (size_t i = 0; i < count; i++) {
      if (!prefixes[i]) return Fail(EINVAL, "NULL prefix");
      names.emplace_back(prefixes[i]);
    }
    Status s = p->bundle->SetPlan(m->info().name, names);
    return s.ok() ? 0 : Fail(s);
  });
}

int faultline_paged_pin(faultline_paged* p, const char* model, const char* tensor) {
  auto v = FindView(p, model, tensor);
  if (!v.ok()) return Fail(v.status());
  Status s = p->bundle->Pin(*v);
  return s.ok() ? 0 : Fail(s);
}

int faultline_paged_stats(const faultline_paged* p, faultline_paging_stats* out) {
  if (!p || !out) return Fail(EINVAL, "NULL argument");
  if (out->struct_size < offsetof(faultline_paging_stats, faults))
    return Fail(EINVAL, "stats struct_size too small");
  PagingStats s = p->bundle->stats();
  faultline_paging_stats full = {};
  full.struct_size = out->struct_size;
  full.version = 3;
#define FL_COPY(name) full.name = s.name;
  FAULTLINE_PAGING_COUNTERS(FL_COPY)  // the C struct has a field of the same name for each
#undef FL_COPY
  full.resident_bytes = s.resident_bytes;
  full.peak_resident_bytes = s.peak_resident_bytes;
  full.budget_bytes = s.budget_bytes;
  full.latency_p50_us = s.fault_latency.p50_us;
  full.latency_p90_us = s.fault_latency.p90_us;
  full.latency_p99_us = s.fault_latency.p99_us;
  full.latency_max_us = s.fault_latency.max_us;
  memcpy(out, &full, std::min(out->struct_size, sizeof(full)));
  return 0;
}

/* ---- managed memory ---- */

void* faultline_alloc(size_t size) { return Allocate(size); }
void faultline_free(void* p) { Free(p); }
void* faultline_realloc(void* p, size_t size) { return Reallocate(p, size); }
int faultline_advise(void* p, size_t len, int advice) {
  if (Advise(p, len, advice) == 0) return 0;
  int e = errno;
  return Fail(e, e == ENOSPC ? "the spill file has no room: some chunks stay resident" : strerror(e));
}

/* ---- GPU tier ---- */

void faultline_device_config_init(faultline_device_config* c) {
  if (!c) return;
  cuda::DeviceConfig d = cuda::DeviceConfig::FromEnvironment();
  memset(c, 0, sizeof(*c));
  c->struct_size = sizeof(*c);
  c->device = d.device;
  c->gpu_budget = d.gpu_budget;
  c->host_budget = d.host_budget;
  c->lookahead = d.lookahead;
  c->eviction = d.eviction == cuda::Eviction::kDiscard ? FAULTLINE_EVICT_DISCARD : FAULTLINE_EVICT_TO_HOST;
  c->read_mostly = d.advice.read_mostly;
  c->monitor = d.monitor.enabled;
  c->offload = d.monitor.gpu.offload;
  c->emergency = d.monitor.gpu.emergency;
  c->reload = d.monitor.gpu.reload;
  c->direct_host = d.direct_host;
  c->memory = d.memory == cuda::Memory::kMapped ? FAULTLINE_GPU_MAPPED : FAULTLINE_GPU_MANAGED;
}

int faultline_device_open(const char* path, const faultline_device_config* c, faultline_device** out) {
  if (!path || !out) return Fail(EINVAL, "path and out must not be NULL");
  cuda::DeviceConfig cfg = cuda::DeviceConfig::FromEnvironment();
  if (c) {
    // A caller built before `memory` existed passes a struct that ends before it.
    if (c->struct_size < offsetof(faultline_device_config, memory)) return Fail(EINVAL, "config struct_size too small");
    bool has_memory = c->struct_size >= offsetof(faultline_device_config, memory) + sizeof(c->memory);
    if (has_memory && c->memory != FAULTLINE_GPU_MANAGED && c->memory != FAULTLINE_GPU_MAPPED)
      return Fail(EINVAL, "unknown GPU memory kind");
    if (c->eviction != FAULTLINE_EVICT_TO_HOST && c->eviction != FAULTLINE_EVICT_DISCARD)
      return Fail(EINVAL, "unknown eviction");
    cfg.device = c->device;
    cfg.gpu_budget = c->gpu_budget;
    cfg.host_budget = c->host_budget;
    cfg.lookahead = c->lookahead;
    cfg.eviction = c->eviction == FAULTLINE_EVICT_DISCARD ? cuda::Eviction::kDiscard : cuda::Eviction::kToHost;
    cfg.advice.read_mostly = c->read_mostly != 0;
    cfg.monitor.enabled = c->monitor != 0;
    for (cuda::Thresholds* t : {&cfg.monitor.gpu, &cfg.monitor.host}) {
      t->offload = c->offload;
      t->emergency = c->emergency;
      t->reload = c->reload;
    }
    cfg.direct_host = c->direct_host != 0;
    if (has_memory) cfg.memory = c->memory == FAULTLINE_GPU_MAPPED ? cuda::Memory::kMapped : cuda::Memory::kManaged;
  }
  return Guard([&] {
    auto r = cuda::DeviceBundle::Open(path, cfg);
    if (!r.ok()) return Fail(r.status());
    *out = new faultline_device{std::move(r).value()};
    return 0;
  });
}

void faultline_device_close(faultline_device* d) { delete d; }

void* faultline_device_tensor(faultline_device* d, const char* model, const char* tensor, uint64_t* size) {
  if (!d || !tensor) {
    Fail(EINVAL, "NULL argument");
    errno = EINVAL;
    return nullptr;
  }
  auto t = d->bundle->tensor(model ? model : "", tensor);
  if (!t.ok()) {
    Fail(t.status());
    errno = t.status().code();
    return nullptr;
  }
  if (size) *size = t->size();
  return t->data;
}

int faultline_device_set_plan(faultline_device* d, const char* model, const char* const* prefixes, size_t count) {
  if (!d || (!prefixes && count)) return Fail(EINVAL, "NULL argument");
  return Guard([&] {
    std::vector<std::string> p;
    for (size_t i = 0; i < count; i++) {
      if (!prefixes[i]) return Fail(EINVAL, "NULL prefix");
      p.emplace_back(prefixes[i]);
    }
    Status s = d->bundle->SetPlan(model ? model : "", p);
    return s.ok() ? 0 : Fail(s);
  });
}

int faultline_device_begin(faultline_device* d, size_t step, void* stream) {
  if (!d) return Fail(EINVAL, "NULL argument");
  Status s = d->bundle->Begin(step, stream);
  return s.ok() ? 0 : Fail(s);
}

int faultline_device_mark_written(faultline_device* d, const char* model, const char* tensor) {
  if (!d || !tensor) return Fail(EINVAL, "NULL argument");
  auto t = d->bundle->tensor(model ? model : "", tensor);
  if (!t.ok()) return Fail(t.status());
  Status s = d->bundle->MarkWritten(*t);
  return s.ok() ? 0 : Fail(s);
}

int faultline_device_end(faultline_device* d, size_t step, void* stream) {
  if (!d) return Fail(EINVAL, "NULL argument");
  d->bundle->End(step, stream);
  return 0;
}

int faultline_device_stats(const faultline_device* d, faultline_device_counters* out) {
  if (!d || !out) return Fail(EINVAL, "NULL argument");
  if (out->struct_size < offsetof(faultline_device_counters, to_device)) return Fail(EINVAL, "stats struct_size too small");
  cuda::DeviceStats s = d->bundle->stats();
  faultline_device_counters full = {};
  full.struct_size = out->struct_size;
  full.version = 1;
  full.to_device = s.to_device;
  full.bytes_to_device = s.bytes_to_device;
  full.to_host = s.to_host;
  full.bytes_to_host = s.bytes_to_host;
  full.discards = s.discards;
  full.bytes_discarded = s.bytes_discarded;
  full.decodes = s.decodes;
  full.bytes_decoded = s.bytes_decoded;
  full.errors = s.errors;
  full.device_resident = s.device_resident;
  full.peak_device_resident = s.peak_device_resident;
  full.host_resident = s.host_resident;
  full.gpu_budget = s.gpu_budget;
  full.offloads = s.offloads;
  full.emergencies = s.emergencies;
  full.reloads = s.reloads;
  full.host_drops = s.host_drops;
  memcpy(out, &full, std::min(out->struct_size, sizeof(full)));
  return 0;
}

}  // extern "C"
