// GPU tier benchmarks (a GPU is needed; without one the program exits 77).
//
// Layers: passes of a layer stack (cuBLAS sgemm + bias/ReLU per layer)
// whose weights are 2x, 4x and 8x the GPU budget, streamed by the tier
// (managed or mapped memory),
// beside the same passes with every weight resident in cudaMalloc memory,
// measured in the same run. Counters: layers_per_s, ratio_vs_resident, and
// the transfer rate the tier reached.
// Prefetch: cudaMemPrefetchAsync of managed memory to the GPU beside
// cudaMemcpyAsync from pinned memory (the limit of the link).
// Restage: what bringing managed memory back to the GPU costs once it was
// evicted, with no compute: 16 x 64 MiB through a budget of four, evicted
// the tier's way (read-mostly advice) or by discard + copy from pinned
// memory, beside copies into managed memory that never left the GPU and the
// pinned copy into a cudaMalloc ring (the link), same run.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "../tests/cuda/gpu_model.h"
#include "../tests/cuda/layer_runner.h"
#include "bench_util.h"
#include "faultline/cuda.hpp"

using namespace faultline;
using namespace faultline::bench;
using faultline::test::LayerPrefix;

namespace {

constexpr int kD = 4096;      // 64 MiB of f32 weights per layer
constexpr int kBatch = 256;
constexpr int kLayers = 16;   // 1 GiB model
constexpr uint64_t kModelBytes = uint64_t(kLayers) * kD * kD * 4;

const std::string& ModelPath() {
  static std::string path = [] {
    std::string p = TempPath("gpu-mlp.apbundle");
    Status s = test::WriteLayerModel(p, kLayers, kD);
    if (!s.ok()) {
      fprintf(stderr, "cannot write the model: %s\n", s.message());
      exit(1);
    }
    return p;
  }();
  return path;
}

struct Ctx : test::LayerRunner {
  Ctx() : LayerRunner(kD, kBatch) {}
};

// One pass of the plan through the tier with cuBLAS layers; false (and the
// benchmark skipped) on an error.
bool TierPass(benchmark::State& state, cuda::DeviceBundle& b, Ctx& ctx) {
  for (int l = 0; l < kLayers; l++) {
    Status s = b.Begin(l, ctx.stream);
    if (!s.ok()) {
      state.SkipWithError(s.message());
      return false;
    }
    ctx.Layer(static_cast<const float*>(b.tensor("mlp", LayerPrefix(l) + "weight")->data),
              static_cast<const float*>(b.tensor("mlp", LayerPrefix(l) + "bias")->data), true);
    b.End(l, ctx.stream);
  }
  cudaStreamSynchronize(ctx.stream);
  return true;
}

// Seconds per pass with every weight resident (median of 5), measured once
// per process and reused by every ratio.
double ResidentPassSeconds() {
  static double secs = [] {
    auto r = BundleReader::Open(ModelPath());
    std::vector<float*> dev;
    for (const TensorInfo& t : (*r)->info().models[0].tensors) {
      auto bytes = (*r)->ReadTensor(t);
      float* p;
      cudaMalloc(&p, t.size);
      cudaMemcpy(p, bytes->data(), t.size, cudaMemcpyHostToDevice);
      dev.push_back(p);
    }
    Ctx c;
    std::vector<double> v;
    for (int rep = 0; rep < 6; rep++) {
      auto t0 = Clock::now();
      for (int l = 0; l < kLayers; l++) c.Layer(dev[2 * l], dev[2 * l + 1], true);
      cudaStreamSynchronize(c.stream);
      if (rep) v.push_back(Seconds(t0, Clock::now()));
    }
    for (float* p : dev) cudaFree(p);
    return Quantile(v, 0.5);
  }();
  return secs;
}

// Host-to-device bytes per second of cudaMemcpyAsync from pinned memory
// (the link's limit), measured once per process.
double PinnedCopyBps() {
  static double bps = [] {
    const size_t bytes = 512ull << 20;
    char *h = nullptr, *d = nullptr;
    cudaMallocHost(&h, bytes);
    cudaMalloc(&d, bytes);
    memset(h, 1, bytes);
    std::vector<double> v;
    for (int rep = 0; rep < 6; rep++) {
      auto t0 = Clock::now();
      cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
      if (rep) v.push_back(Seconds(t0, Clock::now()));
    }
    cudaFree(d);
    cudaFreeHost(h);
    return bytes / Quantile(v, 0.5);
  }();
  return bps;
}

void BM_Resident(benchmark::State& state) {
  for (auto _ : state) state.SetIterationTime(ResidentPassSeconds());
  state.counters["layers_per_s"] = kLayers / ResidentPassSeconds();
}
BENCHMARK(BM_Resident)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

// range(0): oversubscription (model / budget); range(1): 1 = read-mostly,
// 0 = migrate; range(2): 0 = evict to host, 1 = discard; range(3): lookahead;
// range(4): 1 = the pager's userfaultfd-backed pointers handed to kernels
// directly (needs pageable memory access, HMM) instead of managed memory;
// range(5): 1 = mapped memory (the weights in GPU pages mapped while staged,
// copied from pinned host copies; read-mostly then applies to the biases).
void BM_Layers(benchmark::State& state) {
  cuda::DeviceConfig c;
  c.gpu_budget = kModelBytes / state.range(0);
  c.advice.read_mostly = state.range(1) != 0;
  c.eviction = state.range(2) ? cuda::Eviction::kDiscard : cuda::Eviction::kToHost;
  c.lookahead = static_cast<unsigned>(state.range(3));
  c.direct_host = state.range(4) != 0;
  c.memory = state.range(5) ? cuda::Memory::kMapped : cuda::Memory::kManaged;
  c.paging.max_resident = c.gpu_budget;
  c.monitor.enabled = false;
  auto b = cuda::DeviceBundle::Open(ModelPath(), c);
  if (!b.ok()) {
    state.SkipWithError(b.status().message());
    return;
  }
  (void)(*b)->SetPlan("mlp", test::LayerPrefixes(kLayers));
  Ctx ctx;
  auto pass = [&] { return TierPass(state, **b, ctx); };
  if (!pass()) return;  // the first pass decodes from the bundle; steady state follows
  auto before = (*b)->stats();
  double total = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    if (!pass()) return;
    double s = Seconds(t0, Clock::now());
    state.SetIterationTime(s);
    total += s;
  }
  auto after = (*b)->stats();
  double per_pass = total / state.iterations();
  state.counters["layers_per_s"] = kLayers / per_pass;
  state.counters["ratio_vs_resident"] = ResidentPassSeconds() / per_pass;
  double moved = static_cast<double>(after.bytes_to_device - before.bytes_to_device);
  state.counters["to_device_GBps"] = moved / total / 1e9;
  // The time the pass's transfers would take at the pinned-copy rate, over
  // the pass's time: 1.0 = the link is the only cost.
  state.counters["ratio_vs_link"] = moved / PinnedCopyBps() / total;
  state.counters["peak_device_MiB"] = static_cast<double>(after.peak_device_resident) / (1 << 20);
  state.counters["budget_MiB"] = static_cast<double>(c.gpu_budget) / (1 << 20);
}
BENCHMARK(BM_Layers)
    ->ArgNames({"oversub", "readmostly", "discard", "lookahead", "direct", "mapped"})
    ->Args({2, 1, 0, 2, 0, 0})->Args({4, 1, 0, 2, 0, 0})->Args({8, 1, 0, 2, 0, 0})
    ->Args({4, 0, 0, 2, 0, 0})
    ->Args({4, 1, 0, 1, 0, 0})->Args({4, 1, 0, 3, 0, 0})
    ->Args({4, 1, 1, 2, 0, 0})
    ->Args({4, 1, 0, 2, 1, 0})
    ->Args({2, 1, 0, 2, 0, 1})->Args({4, 1, 0, 2, 0, 1})->Args({8, 1, 0, 2, 0, 1})
    ->Args({4, 1, 0, 1, 0, 1})
    ->Args({4, 1, 1, 2, 0, 1})
    ->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

// Host-to-device bandwidth: managed memory prefetched (range(0) = 1:
// read-mostly) beside cudaMemcpyAsync from pinned memory, same bytes.
void BM_Prefetch(benchmark::State& state) {
  const size_t bytes = 1ull << 30;
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  char* pinned = nullptr;
  char* dev = nullptr;
  char* managed = nullptr;
  cudaMallocHost(&pinned, bytes);
  cudaMalloc(&dev, bytes);
  cudaMallocManaged(&managed, bytes);
  memset(pinned, 1, bytes);
  cudaMemLocation gpu{cudaMemLocationTypeDevice, 0}, host{cudaMemLocationTypeHost, 0};
  if (state.range(0)) cudaMemAdvise(managed, bytes, cudaMemAdviseSetReadMostly, gpu);
  memset(managed, 1, bytes);
  std::vector<double> copy_s;
  double total = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    cudaMemcpyAsync(dev, pinned, bytes, cudaMemcpyHostToDevice, s);
    cudaStreamSynchronize(s);
    copy_s.push_back(Seconds(t0, Clock::now()));
    t0 = Clock::now();
    cudaMemPrefetchAsync(managed, bytes, gpu, 0, s);
    cudaStreamSynchronize(s);
    double p = Seconds(t0, Clock::now());
    state.SetIterationTime(p);
    total += p;
    // Back to the host for the next iteration. A read-mostly range keeps its
    // GPU duplicate when prefetched to the host; it goes when the range
    // stops being read-mostly (as the tier evicts).
    if (state.range(0)) {
      cudaMemAdvise(managed, bytes, cudaMemAdviseSetPreferredLocation, host);
      cudaMemAdvise(managed, bytes, cudaMemAdviseUnsetReadMostly, gpu);
      cudaMemAdvise(managed, bytes, cudaMemAdviseSetReadMostly, gpu);
    } else {
      cudaMemPrefetchAsync(managed, bytes, host, 0, s);
    }
    cudaStreamSynchronize(s);
  }
  double copy = Quantile(copy_s, 0.5);
  state.counters["prefetch_GBps"] = bytes * state.iterations() / total / 1e9;
  state.counters["pinned_copy_GBps"] = bytes / copy / 1e9;
  state.counters["ratio_vs_pinned_copy"] = copy / (total / state.iterations());
  cudaFree(managed);
  cudaFree(dev);
  cudaFreeHost(pinned);
  cudaStreamDestroy(s);
}
BENCHMARK(BM_Prefetch)->ArgName("readmostly")->Arg(0)->Arg(1)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

// range(0): 0 = read-mostly prefetch, evicted by advice (as the tier);
// 1 = evicted by discard, brought back by discard-and-prefetch + a copy from
// pinned memory; 2 = copies from pinned memory into managed memory that
// stays on the GPU (no eviction: the bound for managed memory).
void BM_Restage(benchmark::State& state) {
  constexpr int kChunks = 16, kSlots = 4;
  constexpr size_t kChunk = 64ull << 20;
  const int way = static_cast<int>(state.range(0));
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaMemLocation gpu{cudaMemLocationTypeDevice, 0}, host{cudaMemLocationTypeHost, 0};
  std::vector<char*> pinned(kChunks), managed(kChunks), ring(kSlots);
  std::vector<cudaEvent_t> staged(kChunks);
  bool ok = true;
  for (int i = 0; i < kChunks; i++) {
    ok &= cudaMallocHost(&pinned[i], kChunk) == cudaSuccess && cudaMallocManaged(&managed[i], kChunk) == cudaSuccess &&
          cudaEventCreateWithFlags(&staged[i], cudaEventDisableTiming) == cudaSuccess;
    if (!ok) break;
    memset(pinned[i], i + 1, kChunk);
    if (way == 0) {
      cudaMemAdvise(managed[i], kChunk, cudaMemAdviseSetReadMostly, gpu);
      cudaMemAdvise(managed[i], kChunk, cudaMemAdviseSetPreferredLocation, host);
      memcpy(managed[i], pinned[i], kChunk);
    } else if (way == 2) {
      cudaMemPrefetchAsync(managed[i], kChunk, gpu, 0, s);
    }
  }
  for (int i = 0; i < kSlots && ok; i++) ok &= cudaMalloc(&ring[i], kChunk) == cudaSuccess;
  if (!ok) state.SkipWithError("cannot allocate 1 GiB pinned, managed and device memory");
#if CUDART_VERSION < 13000
  if (ok && way == 1) {
    state.SkipWithError("discard needs CUDA 13");
    ok = false;
  }
#endif
  auto pass = [&](bool first) {
    for (int i = 0; i < kChunks; i++) {
      int victim = (i + kChunks - kSlots) % kChunks;
      void* vp = managed[victim];
      void* ip = managed[i];
      size_t n = kChunk, zero = 0;
      if (way == 0) {
        if (!first || i >= kSlots) {  // advice is not stream-ordered: the victim's transfer must be done
          cudaEventSynchronize(staged[victim]);
          cudaMemAdvise(vp, n, cudaMemAdviseUnsetReadMostly, gpu);
          cudaMemAdvise(vp, n, cudaMemAdviseSetReadMostly, gpu);
        }
        cudaMemPrefetchAsync(ip, n, gpu, 0, s);
        cudaEventRecord(staged[i], s);
      } else {
#if CUDART_VERSION >= 13000
        if (way == 1) {
          if (!first || i >= kSlots) cudaMemDiscardBatchAsync(&vp, &n, 1, 0, s);
          cudaMemDiscardAndPrefetchBatchAsync(&ip, &n, 1, &gpu, &zero, 1, 0, s);
        }
#endif
        cudaMemcpyAsync(ip, pinned[i], n, cudaMemcpyHostToDevice, s);
      }
    }
    cudaStreamSynchronize(s);
  };
  if (ok) pass(true);
  std::vector<double> link_s;
  double total = 0;
  for (auto _ : state) {
    if (!ok) break;
    auto t0 = Clock::now();
    for (int i = 0; i < kChunks; i++) cudaMemcpyAsync(ring[i % kSlots], pinned[i], kChunk, cudaMemcpyHostToDevice, s);
    cudaStreamSynchronize(s);
    link_s.push_back(Seconds(t0, Clock::now()));
    t0 = Clock::now();
    pass(false);
    double t = Seconds(t0, Clock::now());
    state.SetIterationTime(t);
    total += t;
  }
  // The last chunks staged hold their bytes.
  char probe[4096];
  for (int i = kChunks - kSlots; i < kChunks && ok; i++) {
    cudaMemcpy(probe, managed[i] + kChunk / 2, sizeof probe, cudaMemcpyDefault);
    for (char c : probe)
      if (c != char(i + 1)) {
        state.SkipWithError("a restaged chunk does not hold its bytes");
        ok = false;
        break;
      }
  }
  if (ok && !link_s.empty()) {
    double link = Quantile(link_s, 0.5);
    double bytes = double(kChunks) * kChunk;
    state.counters["GBps"] = bytes * state.iterations() / total / 1e9;
    state.counters["link_GBps"] = bytes / link / 1e9;
    state.counters["ratio_vs_link"] = link / (total / state.iterations());
  }
  for (int i = 0; i < kChunks; i++) {
    cudaFreeHost(pinned[i]);
    cudaFree(managed[i]);
    cudaEventDestroy(staged[i]);
  }
  for (char* r : ring) cudaFree(r);
  cudaStreamDestroy(s);
}
BENCHMARK(BM_Restage)->ArgName("way")->Arg(0)->Arg(1)->Arg(2)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::Available()) {
    fprintf(stderr, "skipped: %s\n", cuda::Describe().c_str());
    return 77;
  }
  fprintf(stderr, "%s\n", cuda::Describe().c_str());
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  unlink(ModelPath().c_str());
  return 0;
}
