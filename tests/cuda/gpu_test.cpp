// The GPU tier on a real device: layer stacks through a budget smaller than
// the model (cuBLAS and a deterministic kernel) equal to the resident run,
// device residency sampled during the run, a corrupt frame reported on the
// host, the memory monitor under real GPU and host pressure, the C ABI.
// Exits 77 (skipped) where there is no usable GPU.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "../bundle/bundle_util.h"
#include "../helpers.h"
#include "faultline/cuda.hpp"
#include "faultline/faultline.h"
#include "gpu_model.h"
#include "layer_runner.h"
#include "os/meminfo.h"

using namespace faultline;
using namespace faultline::cuda;
using namespace faultline::test;

namespace {

constexpr int kD = 1024;       // 4 MiB weights
constexpr int kBatch = 32;
constexpr int kLayers = 12;    // 48 MiB of weights
constexpr uint64_t kBudget = 16ull << 20;  // a third of the model

// The runner at this file's sizes.
struct Gpu : LayerRunner {
  Gpu() : LayerRunner(kD, kBatch) {}
};

// The fully resident run: every weight read from the bundle into cudaMalloc
// (layer `zero_layer`'s weight zeroed, when given).
std::vector<float> ResidentRun(const std::string& path, int layers, bool blas_path, int zero_layer = -1) {
  auto r = BundleReader::Open(path);
  REQUIRE(r.ok());
  std::vector<float*> dev;
  for (const TensorInfo& t : (*r)->info().models[0].tensors) {
    auto bytes = (*r)->ReadTensor(t);
    REQUIRE(bytes.ok());
    float* p;
    REQUIRE(cudaMalloc(&p, t.size) == cudaSuccess);
    cudaMemcpy(p, bytes->data(), t.size, cudaMemcpyHostToDevice);
    if (t.name == LayerPrefix(zero_layer) + "weight") cudaMemset(p, 0, t.size);
    dev.push_back(p);
  }
  Gpu g;
  g.Load(InputBatch(kD, kBatch));
  for (int l = 0; l < layers; l++) g.Layer(dev[2 * l], dev[2 * l + 1], blas_path);
  auto out = g.Result();
  for (float* p : dev) cudaFree(p);
  return out;
}

uint64_t DeviceUsed() {
  size_t f = 0, t = 0;
  cudaMemGetInfo(&f, &t);
  return t - f;
}

DeviceConfig Config(uint64_t budget) {
  DeviceConfig c;
  c.gpu_budget = budget;
  c.monitor.enabled = false;
  return c;
}

// Streams `passes` passes of the model through the tier; samples device
// residency on another thread while it runs.
struct PagedRun {
  std::vector<float> out;
  uint64_t max_sampled_resident = 0;
  DeviceStats stats;
};

PagedRun StreamRun(DeviceBundle& b, Gpu& g, int layers, bool blas_path, int passes) {
  PagedRun run;
  REQUIRE(b.SetPlan("mlp", LayerPrefixes(layers)).ok());
  std::vector<std::pair<const float*, const float*>> wb;
  for (int l = 0; l < layers; l++) {
    auto w = b.tensor("mlp", LayerPrefix(l) + "weight");
    auto bias = b.tensor("mlp", LayerPrefix(l) + "bias");
    REQUIRE(w.ok());
    REQUIRE(bias.ok());
    wb.emplace_back(static_cast<const float*>(w->data), static_cast<const float*>(bias->data));
  }
  std::atomic<bool> done{false};
  std::atomic<uint64_t> max_res{0};
  int device = b.config().device;
  std::thread sampler([&] {
    cudaSetDevice(device);
    while (!done.load()) {
      uint64_t r = b.stats().device_resident;
      if (r > max_res) max_res = r;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  for (int p = 0; p < passes; p++) {
    g.Load(InputBatch(kD, kBatch));
    for (int l = 0; l < layers; l++) {
      Status s = b.Begin(l, g.stream);
      REQUIRE_MESSAGE(s.ok(), s.message());
      g.Layer(wb[l].first, wb[l].second, blas_path);
      b.End(l, g.stream);
    }
    run.out = g.Result();
  }
  done = true;
  sampler.join();
  run.max_sampled_resident = max_res;
  run.stats = b.stats();
  return run;
}

}  // namespace

TEST_CASE("a layer stack three times the GPU budget gives the resident result; residency stays in budget") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  for (auto [memory, blas_path] : {std::pair{Memory::kManaged, false}, {Memory::kManaged, true},
                                    {Memory::kMapped, false}, {Memory::kMapped, true}}) {
    for (Eviction ev : {Eviction::kToHost, Eviction::kDiscard}) {
      for (bool read_mostly : {true, false}) {
        CAPTURE(static_cast<int>(memory));
        CAPTURE(blas_path);
        CAPTURE(static_cast<int>(ev));
        CAPTURE(read_mostly);
        auto want = ResidentRun(path, kLayers, blas_path);
        Gpu g;
        DeviceConfig c = Config(kBudget);
        c.memory = memory;
        c.eviction = ev;
        c.advice.read_mostly = read_mostly;
        auto b = DeviceBundle::Open(path, c);
        REQUIRE_MESSAGE(b.ok(), b.status().message());
        auto run = StreamRun(**b, g, kLayers, blas_path, 3);
        if (blas_path) {
          REQUIRE(run.out.size() == want.size());
          for (size_t i = 0; i < want.size(); i++)
            REQUIRE(std::fabs(run.out[i] - want[i]) <= 1e-4f * (1 + std::fabs(want[i])));
        } else {
          CHECK(memcmp(run.out.data(), want.data(), want.size() * 4) == 0);  // bit-identical
        }
        MESSAGE(run.stats.ToString());
        MESSAGE("sampled device residency max " << run.max_sampled_resident);
        CHECK(run.stats.peak_device_resident <= kBudget);
        CHECK(run.max_sampled_resident <= kBudget);
        CHECK(run.stats.to_device > 2 * kLayers);  // evicted layers came back in later passes
        if (ev == Eviction::kToHost) {
          CHECK(run.stats.to_host > 0);
          CHECK(run.stats.decodes == 2 * kLayers);  // decoded once, then kept on the host
        } else {
          CHECK(run.stats.discards > 0);
          CHECK(run.stats.decodes > 2 * kLayers);  // decoded again after a discard
        }
        CHECK(run.stats.errors == 0);
        if (memory == Memory::kMapped) {
          CHECK(run.stats.device_pages > 0);  // the weights (4 MiB) went in as mapped pages
          CHECK(run.stats.device_pages <= kBudget);
        } else {
          CHECK(run.stats.device_pages == 0);
        }
      }
    }
  }
}

TEST_CASE("a corrupt frame is an error on the host naming the tensor, never data on the device") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, 4, kD).ok());
  {
    auto r = BundleReader::Open(path);
    REQUIRE(r.ok());
    const TensorInfo* w2 = (*r)->info().models[0].FindTensor("layers.2.weight");
    REQUIRE(w2);
    CorruptFrame(path, w2->first_frame + 3, std::byte{0x40});
  }
  for (Memory memory : {Memory::kManaged, Memory::kMapped}) {
  CAPTURE(static_cast<int>(memory));
  DeviceConfig c = Config(kBudget);
  c.memory = memory;
  auto b = DeviceBundle::Open(path, c);
  REQUIRE(b.ok());
  REQUIRE((*b)->SetPlan("mlp", LayerPrefixes(4)).ok());
  Gpu g;
  CHECK((*b)->Begin(0, g.stream).ok());
  (*b)->End(0, g.stream);
  CHECK((*b)->Begin(1, g.stream).ok());
  (*b)->End(1, g.stream);
  Status s = (*b)->Begin(2, g.stream);
  CHECK_FALSE(s.ok());
  CHECK(std::string(s.message()).find("layers.2.weight") != std::string::npos);
  MESSAGE(std::string(s.message()));
  CHECK((*b)->stats().errors >= 1);
  CHECK((*b)->Begin(3, g.stream).ok());  // the others are still served
  (*b)->End(3, g.stream);
  CHECK_FALSE((*b)->Begin(2, g.stream).ok());  // and the bad one stays bad
  }
}

TEST_CASE("bad calls get errors that name the problem") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, 4, kD).ok());
  DeviceConfig c = Config(kBudget);
  c.device = 999;
  auto bad_dev = DeviceBundle::Open(path, c);
  CHECK(bad_dev.status().code() == ENODEV);
  auto not_bundle = DeviceBundle::Open(dir / "nothing.apbundle", Config(kBudget));
  CHECK_FALSE(not_bundle.ok());
  c = Config(kBudget);
  c.monitor.gpu.offload = 0.99;
  c.monitor.gpu.emergency = 0.5;
  CHECK(DeviceBundle::Open(path, c).status().code() == EINVAL);

  auto b = DeviceBundle::Open(path, Config(6ull << 20));  // a step is 4 MiB + 4 KiB
  REQUIRE(b.ok());
  CHECK((*b)->tensor("mlp", "nope").status().code() == ENOENT);
  CHECK((*b)->tensor("nope", "layers.0.weight").status().code() == ENOENT);
  CHECK((*b)->SetPlan("mlp", {"layers.0.", "nothing."}).code() == ENOENT);
  CHECK((*b)->Begin(0).code() == EINVAL);  // no plan yet
  // Two steps in use at once do not fit: ENOSPC instead of waiting forever.
  REQUIRE((*b)->SetPlan("mlp", LayerPrefixes(4)).ok());
  Gpu g;
  REQUIRE((*b)->Begin(0, g.stream).ok());
  Status s = (*b)->Begin(1, g.stream);
  CHECK(s.code() == ENOSPC);
  MESSAGE(std::string(s.message()));
  (*b)->End(0, g.stream);
  CHECK((*b)->Begin(1, g.stream).ok());
  (*b)->End(1, g.stream);
  // A step larger than the whole budget.
  auto w0 = (*b)->tensor("mlp", "layers.0.weight");
  auto w1 = (*b)->tensor("mlp", "layers.1.weight");
  REQUIRE((*b)->SetPlan({{*w0, *w1}}).ok());
  CHECK((*b)->Begin(0, g.stream).code() == ENOSPC);
}

TEST_CASE("advisories reach the driver") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, 2, kD).ok());
  auto b = DeviceBundle::Open(path, Config(kBudget));
  REQUIRE(b.ok());
  auto w = (*b)->tensor("mlp", "layers.0.weight");
  REQUIRE(w.ok());
  int rm = -1;
  cudaMemRangeGetAttribute(&rm, sizeof rm, cudaMemRangeAttributeReadMostly, w->data, w->size());
  CHECK(rm == 1);
  cudaMemLocationType type{};
  cudaMemRangeGetAttribute(&type, sizeof type, cudaMemRangeAttributePreferredLocationType, w->data, w->size());
  CHECK(type == cudaMemLocationTypeHost);
  Advice a;
  a.read_mostly = false;
  a.preferred = Location::kDevice;
  a.accessed_by_device = true;
  REQUIRE((*b)->Advise(*w, a).ok());
  cudaMemRangeGetAttribute(&rm, sizeof rm, cudaMemRangeAttributeReadMostly, w->data, w->size());
  CHECK(rm == 0);
  cudaMemRangeGetAttribute(&type, sizeof type, cudaMemRangeAttributePreferredLocationType, w->data, w->size());
  CHECK(type == cudaMemLocationTypeDevice);
}

TEST_CASE("the monitor offloads under GPU pressure, empties the GPU in an emergency and reloads after") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  size_t free_b, total_b;
  cudaMemGetInfo(&free_b, &total_b);
  double f0 = 1.0 - double(free_b) / double(total_b);
  for (Memory memory : {Memory::kManaged, Memory::kMapped}) {
  CAPTURE(static_cast<int>(memory));
  DeviceConfig c = Config(kBudget);
  c.memory = memory;
  c.monitor.enabled = true;
  c.monitor.interval_ms = 10;
  c.monitor.gpu = {f0 + 0.02, f0 + 0.05, f0 + 0.01};
  c.monitor.host = {1.0, 1.0, 1.0};  // host pressure is another case
  auto b = DeviceBundle::Open(path, c);
  REQUIRE(b.ok());
  Gpu g;
  auto run = StreamRun(**b, g, kLayers, false, 1);
  REQUIRE(run.stats.device_resident > 0);
  auto wait_for = [&](auto pred) {
    for (int i = 0; i < 1000 && !pred((*b)->stats()); i++) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return pred((*b)->stats());
  };
  // Another allocation takes 3% of the device: above offload, below emergency.
  void* hog1 = nullptr;
  REQUIRE(cudaMalloc(&hog1, static_cast<size_t>(0.03 * total_b)) == cudaSuccess);
  CHECK(wait_for([](const DeviceStats& s) { return s.offloads >= 1 && s.effective_gpu_budget < s.gpu_budget; }));
  // 4% more: an emergency; nothing is in use, so the GPU is emptied.
  void* hog2 = nullptr;
  REQUIRE(cudaMalloc(&hog2, static_cast<size_t>(0.04 * total_b)) == cudaSuccess);
  // Mapped memory gives its GPU pages back to the driver too.
  CHECK(wait_for([](const DeviceStats& s) { return s.emergencies >= 1 && s.device_resident == 0 && s.device_pages == 0; }));
  cudaFree(hog1);
  cudaFree(hog2);
  CHECK(wait_for([](const DeviceStats& s) { return s.reloads >= 1 && s.effective_gpu_budget == s.gpu_budget; }));
  MESSAGE((*b)->stats().ToString());
  // And the model still runs right afterwards.
  auto want = ResidentRun(path, kLayers, false);
  auto again = StreamRun(**b, g, kLayers, false, 1);
  CHECK(memcmp(again.out.data(), want.data(), want.size() * 4) == 0);
  }
}

TEST_CASE("the monitor drops host copies to the bundle under host pressure") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  internal::HostMemory hm;
  REQUIRE(internal::ReadHostMemory(&hm));
  double h0 = hm.Pressure();
  for (Memory memory : {Memory::kManaged, Memory::kMapped}) {
  CAPTURE(static_cast<int>(memory));
  DeviceConfig c = Config(kBudget);
  c.memory = memory;
  c.monitor.enabled = true;
  c.monitor.interval_ms = 10;
  c.monitor.gpu = {1.0, 1.0, 1.0};
  c.monitor.host = {h0 + 0.02, 1.0, h0 + 0.01};
  c.advice.read_mostly = false;  // managed tensors on the GPU then have no host copy
  auto b = DeviceBundle::Open(path, c);
  REQUIRE(b.ok());
  Gpu g;
  auto run = StreamRun(**b, g, kLayers, false, 1);
  uint64_t host_before = run.stats.host_resident;
  REQUIRE(host_before > 0);
  // Take 4% of the host's memory (touched, so it is really used).
  size_t hog_bytes = static_cast<size_t>(0.04 * double(hm.Basis()));
  std::vector<char> hog(hog_bytes, 1);
  bool dropped = false;
  for (int i = 0; i < 1000 && !dropped; i++) {
    auto s = (*b)->stats();
    dropped = s.host_drops >= 1 && s.host_resident < host_before;
    if (!dropped) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(dropped);
  hog.clear();
  hog.shrink_to_fit();
  MESSAGE((*b)->stats().ToString());
  auto want = ResidentRun(path, kLayers, false);
  auto again = StreamRun(**b, g, kLayers, false, 1);
  CHECK(memcmp(again.out.data(), want.data(), want.size() * 4) == 0);  // decoded again from the bundle
  }
}

TEST_CASE("a written tensor is spilled through the allocator when it leaves the host, and comes back") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  for (Memory memory : {Memory::kManaged, Memory::kMapped}) {
  CAPTURE(static_cast<int>(memory));
  DeviceConfig c = Config(kBudget);
  c.memory = memory;
  c.host_budget = 12ull << 20;  // host copies beyond this go to disk
  auto b = DeviceBundle::Open(path, c);
  REQUIRE(b.ok());
  Gpu g;
  auto first = StreamRun(**b, g, kLayers, false, 1);
  auto w0 = (*b)->tensor("mlp", "layers.0.weight");
  REQUIRE(w0.ok());
  // A kernel changes layer 0's weight: the bundle no longer has it.
  REQUIRE((*b)->Begin(0, g.stream).ok());
  cudaMemsetAsync(w0->data, 0, w0->size(), g.stream);
  (*b)->End(0, g.stream);
  REQUIRE((*b)->MarkWritten(*w0).ok());
  auto run = StreamRun(**b, g, kLayers, false, 3);
  auto want = ResidentRun(path, kLayers, false, 0);
  CHECK(memcmp(run.out.data(), want.data(), want.size() * 4) == 0);
  MESSAGE(run.stats.ToString());
  CHECK(run.stats.spilled_written >= 1);
  CHECK(run.stats.restored_written >= 1);
  CHECK(run.stats.peak_device_resident <= kBudget);
  }
}

TEST_CASE("mapped memory: weights at stable addresses that are always valid device memory, small tensors managed") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  DeviceConfig c = Config(kBudget);
  c.memory = Memory::kMapped;
  auto b = DeviceBundle::Open(path, c);
  REQUIRE_MESSAGE(b.ok(), b.status().message());
  auto w = (*b)->tensor("mlp", "layers.0.weight");
  auto bias = (*b)->tensor("mlp", "layers.0.bias");
  REQUIRE(w.ok());
  REQUIRE(bias.ok());
  // Before anything is staged, the weight's address is device memory (the
  // placeholder is mapped under it), which pointer queries such as torch's
  // accept; the bias (4 KiB) is managed memory.
  for (int pass = 0; pass < 2; pass++) {
    cudaPointerAttributes a{};
    REQUIRE(cudaPointerGetAttributes(&a, w->data) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeDevice);
    REQUIRE(cudaPointerGetAttributes(&a, bias->data) == cudaSuccess);
    CHECK(a.type == cudaMemoryTypeManaged);
    Gpu g;
    auto run = StreamRun(**b, g, kLayers, false, 1);  // afterwards: evicted weights, placeholder again
    CHECK((*b)->tensor("mlp", "layers.0.weight")->data == w->data);  // the address never changes
  }
  Advice a;
  Status s = (*b)->Advise(*w, a);
  CHECK(s.code() == EINVAL);
  CHECK(std::string(s.message()).find("layers.0.weight") != std::string::npos);
  CHECK((*b)->Advise(*bias, a).ok());
  c.direct_host = true;
  CHECK(DeviceBundle::Open(path, c).status().code() == EINVAL);
  // The C ABI: a struct from before `memory` existed still opens (managed).
  faultline_device_config cc;
  faultline_device_config_init(&cc);
  cc.gpu_budget = kBudget;
  cc.monitor = 0;
  cc.memory = FAULTLINE_GPU_MAPPED;
  faultline_device* d = nullptr;
  REQUIRE(faultline_device_open(path.c_str(), &cc, &d) == 0);
  faultline_device_close(d);
  cc.memory = 7;
  CHECK(faultline_device_open(path.c_str(), &cc, &d) == -EINVAL);
  cc.struct_size = offsetof(faultline_device_config, memory);
  REQUIRE(faultline_device_open(path.c_str(), &cc, &d) == 0);
  faultline_device_close(d);
}

TEST_CASE("direct host pointers need pageable memory access (HMM)") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  int pageable = 0;
  cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, 0);
  DeviceConfig c = Config(kBudget);
  c.direct_host = true;
  c.paging.max_resident = kBudget;
  auto b = DeviceBundle::Open(path, c);
  if (!pageable) {
    CHECK(b.status().code() == ENOTSUP);
    CHECK(std::string(b.status().message()).find("HMM") != std::string::npos);
    MESSAGE("this device has no pageable memory access: " << std::string(b.status().message()));
    return;
  }
  REQUIRE(b.ok());
  auto want = ResidentRun(path, kLayers, false);
  Gpu g;
  auto run = StreamRun(**b, g, kLayers, false, 2);
  CHECK(memcmp(run.out.data(), want.data(), want.size() * 4) == 0);
}

TEST_CASE("the C ABI streams the same model") {
  TempDir dir;
  std::string path = dir / "mlp.apbundle";
  REQUIRE(WriteLayerModel(path, kLayers, kD).ok());
  CHECK(faultline_has_cuda() == 1);
  faultline_device_config c;
  faultline_device_config_init(&c);
  c.gpu_budget = kBudget;
  c.monitor = 0;
  faultline_device* d = nullptr;
  REQUIRE(faultline_device_open(path.c_str(), &c, &d) == 0);
  std::vector<std::string> prefixes = LayerPrefixes(kLayers);
  std::vector<const char*> p;
  for (auto& s : prefixes) p.push_back(s.c_str());
  REQUIRE(faultline_device_set_plan(d, "mlp", p.data(), p.size()) == 0);
  Gpu g;
  g.Load(InputBatch(kD, kBatch));
  for (int l = 0; l < kLayers; l++) {
    REQUIRE(faultline_device_begin(d, l, g.stream) == 0);
    auto* w = static_cast<const float*>(faultline_device_tensor(d, "mlp", (LayerPrefix(l) + "weight").c_str(), nullptr));
    auto* bias = static_cast<const float*>(faultline_device_tensor(d, nullptr, (LayerPrefix(l) + "bias").c_str(), nullptr));
    REQUIRE(w);
    REQUIRE(bias);
    g.Layer(w, bias, false);
    faultline_device_end(d, l, g.stream);
  }
  auto out = g.Result();
  auto want = ResidentRun(path, kLayers, false);
  CHECK(memcmp(out.data(), want.data(), want.size() * 4) == 0);
  faultline_device_counters st{};
  st.struct_size = sizeof st;
  REQUIRE(faultline_device_stats(d, &st) == 0);
  CHECK(st.version == 1);
  CHECK(st.peak_device_resident <= kBudget);
  CHECK(faultline_device_tensor(d, "mlp", "nope", nullptr) == nullptr);
  CHECK(faultline_device_begin(d, 999, g.stream) == -EINVAL);
  faultline_device_close(d);
}

int main(int argc, char** argv) {
  if (!Available()) {
    fprintf(stderr, "skipped: %s\n", Describe().c_str());
    return 77;
  }
  fprintf(stderr, "%s\n", Describe().c_str());
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
