// PagedBundle, its views and configuration: the public face of the engine.
#include <pthread.h>
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/plan_steps.h"
#include "core/status_macros.h"
#include "faultline/paging.hpp"
#include "faultline/size.hpp"
#include "pager/options.h"
#include "pager/pager.h"

namespace faultline {

using namespace internal;

const char* PagingModeName(PagingMode m) noexcept {
  switch (m) {
    case PagingMode::kUffd: return "uffd";
    case PagingMode::kGuard: return "guard";
    case PagingMode::kMmap: return "mmap";
    default: return "auto";
  }
}

const char* EvictionPolicyName(EvictionPolicy p) noexcept {
  switch (p) {
    case EvictionPolicy::kLfu: return "lfu";
    case EvictionPolicy::kPlan: return "plan";
    default: return "lru";
  }
}

PagingConfig PagingConfig::FromEnvironment() {
  PagingConfig c;
  OptionSize(OptionId::kBudget, &c.max_resident);
  if (const char* v = OptionValue(OptionId::kPolicy)) {
    if (!strcmp(v, "lru")) c.policy = EvictionPolicy::kLru;
    else if (!strcmp(v, "lfu")) c.policy = EvictionPolicy::kLfu;
    else if (!strcmp(v, "plan")) c.policy = EvictionPolicy::kPlan;
    else WarnBadOption(OptionId::kPolicy, v, "lru, lfu or plan");
  }
  if (const char* v = OptionValue(OptionId::kMode)) {
    if (!strcmp(v, "auto")) c.mode = PagingMode::kAuto;
    else if (!strcmp(v, "uffd")) c.mode = PagingMode::kUffd;
    else if (!strcmp(v, "guard")) c.mode = PagingMode::kGuard;
    else if (!strcmp(v, "mmap")) c.mode = PagingMode::kMmap;
    else WarnBadOption(OptionId::kMode, v, "auto, uffd, guard or mmap");
  }
  OptionUnsigned(OptionId::kPrefetch, 4096, &c.prefetch_depth);
  OptionUnsigned(OptionId::kWorkers, 64, &c.workers);
  OptionFlag(OptionId::kHuge, &c.huge_pages);
  return c;
}

std::string PagingStats::ToString() const {
  std::ostringstream o;
  o << "faultline paging stats:\n"
    << "  faults " << faults << " (waited on a load in flight: " << fault_waits << ")\n"
    << "  loads " << loads << " (prefetched before any touch: " << prefetched << "), evictions "
    << evictions << ", errors " << errors << "\n"
    << "  read " << FormatSize(bytes_read) << ", decompressed " << FormatSize(bytes_decompressed)
    << ", huge pages installed " << huge_installs << " (reused " << huge_recycled << ", split " << huge_split
    << ")\n"
    << "  resident " << FormatSize(resident_bytes) << ", peak " << FormatSize(peak_resident_bytes)
    << ", budget " << FormatSize(budget_bytes) << "\n";
  char buf[160];
  snprintf(buf, sizeof(buf), "  fault latency p50 %.0f us, p90 %.0f us, p99 %.0f us, max %.0f us\n",
           fault_latency.p50_us, fault_latency.p90_us, fault_latency.p99_us, fault_latency.max_us);
  o << buf;
  for (const auto& t : tensors)
    if (t.faults || t.loads)
      o << "  " << t.model << "/" << t.tensor << ": faults " << t.faults << ", loads " << t.loads
        << ", prefetched " << t.prefetched << ", evictions " << t.evictions << "\n";
  return o.str();
}

struct PagedBundle::Impl {
  std::unique_ptr<Engine> engine;
  std::string path;
};

namespace {

// FAULTLINE_SHOW_STATS: a bundle prints its statistics when it is closed;
// bundles still open when the process exits print theirs from atexit.
std::mutex g_open_mu;
std::vector<PagedBundle*>* g_open = nullptr;

void PrintStats(const std::string& path, const PagingStats& s) {
  fprintf(stderr, "%s: %s", path.c_str(), s.ToString().c_str());
}

void PrintOpenAtExit() {
  std::lock_guard<std::mutex> lock(g_open_mu);
  if (!g_open) return;
  for (PagedBundle* b : *g_open) PrintStats(b->impl().path, b->stats());
}

void TrackOpen(PagedBundle* b) {
  std::lock_guard<std::mutex> lock(g_open_mu);
  if (!g_open) {
    g_open = new std::vector<PagedBundle*>();
    atexit(PrintOpenAtExit);
  }
  g_open->push_back(b);
}

void UntrackOpen(PagedBundle* b) {
  std::lock_guard<std::mutex> lock(g_open_mu);
  if (g_open) g_open->erase(std::remove(g_open->begin(), g_open->end(), b), g_open->end());
}

// fork: every live bundle, so that a child can map its tensors again at the
// same addresses (the mappings are MADV_DONTFORK: a child without service
// threads must not see them). DataLoader workers and the like then read the
// same tensors through the same pointers, served by their own engine.
std::mutex g_live_mu;
std::vector<PagedBundle*>* g_live = nullptr;

void LiveAdd(PagedBundle* b) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  if (!g_live) {
    g_live = new std::vector<PagedBundle*>();
    pthread_atfork([] { g_live_mu.lock(); }, [] { g_live_mu.unlock(); },
                   [] {
                     for (PagedBundle* b : *g_live) ReopenInChild(b);
                     g_live_mu.unlock();
                   });
  }
  g_live->push_back(b);
}

void LiveRemove(PagedBundle* b) {
  std::lock_guard<std::mutex> lock(g_live_mu);
  if (g_live) g_live->erase(std::remove(g_live->begin(), g_live->end(), b), g_live->end());
}

}  // namespace

void ReopenInChild(PagedBundle* b) {
  PagedBundle::Impl& im = *b->impl_;
  // The parent's engine: its threads and descriptors did not come along, so
  // it is left as it is (never destroyed here; views keep pointing into its
  // manifest, which stays valid).
  Engine* old = im.engine.release();
  auto reader = BundleReader::Open(im.path);
  if (!reader.ok()) {
    fprintf(stderr, "faultline: %s cannot be mapped again in a forked child: %s\n", im.path.c_str(),
            reader.status().message());
    im.engine.reset(old);  // touching its tensors faults as on unmapped memory
    return;
  }
  PagingConfig c = old->config();
  c.mode = old->mode();
  auto e = std::make_unique<Engine>(std::move(reader).value(), c);
  e->TakeAddressesOf(*old);
  Status s = e->Start();
  if (!s.ok()) {
    fprintf(stderr, "faultline: %s cannot be mapped again in a forked child: %s\n", im.path.c_str(), s.message());
    im.engine.reset(old);
    return;
  }
  im.engine = std::move(e);
}

Result<std::unique_ptr<PagedBundle>> PagedBundle::Open(const std::string& path, const PagingConfig& config) {
  FL_ASSIGN_OR_RETURN(auto reader, BundleReader::Open(path));
  std::unique_ptr<PagedBundle> b(new PagedBundle());
  b->impl_ = std::make_unique<Impl>();
  b->impl_->engine = std::make_unique<Engine>(std::move(reader), config);
  Status s = b->impl_->engine->Start();
  if (!s.ok()) return s.WithPrefix("%s: %s mode", path.c_str(), PagingModeName(config.mode));
  b->impl_->path = path;
  LiveAdd(b.get());
  if (OptionFlag(OptionId::kShowStats)) TrackOpen(b.get());
  if (OptionFlag(OptionId::kVerbose))
    fprintf(stderr,
            "faultline: %s paged in %s mode, budget %s, huge units %s, system calls on unloaded pages %s\n",
            path.c_str(), PagingModeName(b->impl_->engine->mode()),
            FormatSize(b->impl_->engine->Stats().budget_bytes).c_str(), b->impl_->engine->HugeUnits() ? "on" : "off",
            b->impl_->engine->mode() == PagingMode::kMmap ? "served (page cache)"
            : b->impl_->engine->KernelFaults()            ? "served (kernel-mode faults)"
                                                          : "fail with EFAULT (user-mode faults only)");
  return b;
}

PagedBundle::~PagedBundle() {
  if (impl_) LiveRemove(this);
  if (impl_ && impl_->engine && OptionFlag(OptionId::kShowStats)) {
    UntrackOpen(this);
    PrintStats(impl_->path, impl_->engine->Stats());
  }
}

Result<std::unique_ptr<PagedBundle>> LoadPaged(const std::string& path, uint64_t max_resident) {
  PagingConfig c = PagingConfig::FromEnvironment();
  c.max_resident = max_resident;
  return PagedBundle::Open(path, c);
}

const BundleInfo& PagedBundle::info() const noexcept { return impl_->engine->info(); }
PagingMode PagedBundle::mode() const noexcept { return impl_->engine->mode(); }
bool PagedBundle::huge_units() const noexcept { return impl_->engine->HugeUnits(); }

Result<ModelView> PagedBundle::model(std::string_view name) const {
  const ModelInfo* m = info().FindModel(name);
  if (!m) return Status::Error(ENOENT, "no model '%.*s' in the bundle", static_cast<int>(std::min<size_t>(name.size(), 64)), name.data());
  ModelView v;
  v.bundle_ = this;
  v.info_ = m;
  v.first_id_ = impl_->engine->FirstTensorOf(m);
  return v;
}

ModelView PagedBundle::model() const {
  ModelView v;
  v.bundle_ = this;
  v.info_ = &info().models.at(0);
  v.first_id_ = 0;
  return v;
}

class TensorViewFactory {
 public:
  static TensorView Make(const Engine& e, const TensorInfo* t, uint32_t id) {
    TensorView v;
    v.data_ = e.TensorBase(id);
    v.info_ = t;
    v.id_ = id;
    return v;
  }
};

Result<TensorView> ModelView::tensor(std::string_view name) const {
  for (size_t i = 0; i < info_->tensors.size(); i++)
    if (info_->tensors[i].name == name)
      return TensorViewFactory::Make(*bundle_->impl_->engine, &info_->tensors[i], first_id_ + static_cast<uint32_t>(i));
  return Status::Error(ENOENT, "model '%.64s' has no tensor '%.*s'", info_->name.c_str(),
                       static_cast<int>(std::min<size_t>(name.size(), 64)), name.data());
}

std::vector<TensorView> ModelView::layer(std::string_view prefix) const {
  std::vector<TensorView> out;
  for (size_t i = 0; i < info_->tensors.size(); i++)
    if (std::string_view(info_->tensors[i].name).substr(0, prefix.size()) == prefix)
      out.push_back(TensorViewFactory::Make(*bundle_->impl_->engine, &info_->tensors[i], first_id_ + static_cast<uint32_t>(i)));
  return out;
}

std::vector<TensorView> ModelView::tensors() const { return layer(""); }

void PagedBundle::Prefetch(const TensorView& t, uint64_t offset, uint64_t length) {
  impl_->engine->Prefetch(t.id(), offset, length);
}
void PagedBundle::DontNeed(const TensorView& t) { impl_->engine->DontNeed(t.id()); }
Status PagedBundle::Pin(const TensorView& t) { return impl_->engine->Pin(t.id()); }
void PagedBundle::Unpin(const TensorView& t) { impl_->engine->Unpin(t.id()); }
void PagedBundle::SetPlan(const std::vector<TensorView>& order) {
  std::vector<std::vector<uint32_t>> steps;
  for (const auto& t : order) steps.push_back({t.id()});
  impl_->engine->SetPlan(steps);
}
void PagedBundle::SetPlan(const std::vector<std::vector<TensorView>>& steps) {
  std::vector<std::vector<uint32_t>> ids(steps.size());
  for (size_t k = 0; k < steps.size(); k++)
    for (const auto& t : steps[k]) ids[k].push_back(t.id());
  impl_->engine->SetPlan(ids);
}
Status PagedBundle::SetPlan(std::string_view model, const std::vector<std::string>& prefixes) {
  FL_ASSIGN_OR_RETURN(ModelView m, this->model(model));
  FL_ASSIGN_OR_RETURN(auto steps, internal::StepsByPrefix(m.info().name, prefixes,
                                                          [&](const std::string& p) { return m.layer(p); }));
  SetPlan(steps);
  return Status::Ok();
}
void PagedBundle::StartRecordingPlan() { impl_->engine->StartRecording(); }
void PagedBundle::StopRecordingPlan() { impl_->engine->StopRecording(); }
void PagedBundle::Advance(const TensorView& t) { impl_->engine->Advance(t.id()); }
PagingStats PagedBundle::stats() const { return impl_->engine->Stats(); }

}  // namespace faultline
