// Paging benchmarks; every one runs its baseline in the same process:
//   BM_Sweep        read a 1 GiB tensor sequentially with a 256 MiB budget, beside
//                   the same read from resident memory, the full load, and the
//                   limit (bare decompress loop, same frames, same threads);
//                   medians of 5 iterations, after an untimed first pass;
//                   a full load and a paged pass from disk (page cache
//                   dropped) are reported beside them;
//   BM_Random       4 KiB reads at random offsets, budget 25% of the tensor:
//                   median and p99 per access, beside a plain mmap of a raw
//                   file with its page cache dropped, same access sequence;
//   BM_Layers       a stack of matrix-vector (batch 1) and matrix-matrix
//                   (batch 16) products over weights four times the budget,
//                   beside the resident run and the decompression-bound minimum;
//   BM_FaultLatency one 4 KiB page / one 64 KiB frame per fault, beside a raw
//                   userfaultfd round trip whose handler does a memcpy.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/mman.h>

#include <random>
#include <thread>

#ifdef FAULTLINE_HAVE_BLAS
#include <cblas.h>
#endif

#include "bench_util.h"
#include "faultline/paging.hpp"
#include "limit_loop.h"
#include "os/uffd.h"

using namespace faultline;
using namespace faultline::bench;

namespace {

// Builds (once per process) a one-tensor bundle and returns its path.
std::string OneTensorBundle(const char* name, uint64_t bytes, Codec codec, uint32_t page, bool shuffle) {
  std::string path = TempPath(name);
  if (access(path.c_str(), R_OK) == 0) return path;
  auto data = Weights(bytes, DType::kBF16);
  TensorOptions o;
  o.codec = codec;
  o.page_size = page;
  o.shuffle = shuffle;
  BundleBuilder b;
  b.AddModel("m").AddTensor("w", DType::kBF16, {bytes / 2}, data, o);
  if (!b.Build(path).ok()) return "";
  return path;
}

struct Cleanup {
  std::vector<std::string> paths;
  ~Cleanup() {
    for (auto& p : paths) unlink(p.c_str());
  }
} g_cleanup;

uint64_t SumWords(const void* p, uint64_t bytes) {
  const auto* w = static_cast<const uint64_t*>(p);
  uint64_t s = 0;
  for (uint64_t i = 0; i < bytes / 8; i++) s += w[i];
  return s;
}

// Median and p99 of a measured and a baseline latency sample (µs), and their ratios.
void ReportLatencies(benchmark::State& state, const std::string& name, std::vector<double>& us,
                     const std::string& base, std::vector<double>& base_us) {
  double p50 = Quantile(us, 0.5), p99 = Quantile(us, 0.99);
  double b50 = Quantile(base_us, 0.5), b99 = Quantile(base_us, 0.99);
  state.counters[name + "_p50_us"] = p50;
  state.counters[name + "_p99_us"] = p99;
  state.counters[base + "_p50_us"] = b50;
  state.counters[base + "_p99_us"] = b99;
  state.counters["p50_ratio_vs_" + base] = b50 > 0 ? p50 / b50 : 0;
  state.counters["p99_ratio_vs_" + base] = b99 > 0 ? p99 / b99 : 0;
}

PagingConfig BenchConfig(uint64_t budget, EvictionPolicy policy = EvictionPolicy::kLru) {
  PagingConfig c = PagingConfig::FromEnvironment();
  c.max_resident = budget;
  c.policy = policy;
  return c;
}

// Args: 0 = zstd + shuffle, 1 = raw, 2 = raw in mmap mode (zero copy: no
// budget, no checksums on access); FAULTLINE_HUGE applies as anywhere.
void BM_Sweep(benchmark::State& state) {
  const uint64_t kSize = 1ull << 30, kBudget = 256ull << 20;
  const bool raw = state.range(0) >= 1;
  PagingConfig config = BenchConfig(kBudget);
  if (state.range(0) == 2) config.mode = PagingMode::kMmap;
  std::string path = OneTensorBundle(raw ? "sweep-raw.apbundle" : "sweep-zstd.apbundle", kSize,
                                     raw ? Codec::kRaw : Codec::kZstd, kDefaultPageSize, !raw);
  g_cleanup.paths.push_back(path);
  auto reader = BundleReader::Open(path);
  if (!reader.ok()) return state.SkipWithError("cannot build the bundle");
  const TensorInfo& ti = (*reader)->info().models[0].tensors[0];
  LimitLoop limit(**reader, ti);
  std::vector<std::byte> resident(kSize), full(kSize);
  if (!(*reader)->ReadTensor(ti, resident).ok()) return state.SkipWithError("read failed");
  uint64_t want = SumWords(resident.data(), kSize);
  // From disk: the full load and a paged pass, each after the bundle's page
  // cache was dropped (reported, not timed with the rest).
  {
    auto drop = [&] {
      int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      fdatasync(fd);
      posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
      close(fd);
    };
    drop();
    auto t0 = Clock::now();
    if (!(*reader)->ReadTensor(ti, full).ok()) return state.SkipWithError("full load failed");
    state.counters["cold_full_load_MBps"] = static_cast<double>(kSize) / Seconds(t0, Clock::now()) / 1e6;
    drop();
    auto b = PagedBundle::Open(path, config);
    if (!b.ok()) return state.SkipWithError(b.status().message());
    t0 = Clock::now();
    uint64_t got = SumWords((*b)->model().tensor("w")->data(), kSize);
    state.counters["cold_pass_MBps"] = static_cast<double>(kSize) / Seconds(t0, Clock::now()) / 1e6;
    if (got != want) return state.SkipWithError("paged data differs");
  }
  // The process's first pass also pays for memory it never touched before
  // (in a VM, the host backing it): reported, not timed with the rest.
  {
    auto b = PagedBundle::Open(path, config);
    if (!b.ok()) return state.SkipWithError(b.status().message());
    auto t0 = Clock::now();
    uint64_t got = SumWords((*b)->model().tensor("w")->data(), kSize);
    state.counters["first_pass_MBps"] = static_cast<double>(kSize) / Seconds(t0, Clock::now()) / 1e6;
    if (got != want) return state.SkipWithError("paged data differs");
    state.counters["huge_units"] = (*b)->huge_units();
  }
  // Medians of the iterations: a VM's noise comes in bursts.
  std::vector<double> paged_s, resident_s, full_s, limit_s;
  for (auto _ : state) {
    auto b = PagedBundle::Open(path, config);
    if (!b.ok()) return state.SkipWithError(b.status().message());
    auto t = (*b)->model().tensor("w");
    auto t0 = Clock::now();
    uint64_t got = SumWords(t->data(), kSize);
    auto t1 = Clock::now();
    if (got != want) return state.SkipWithError("paged data differs");
    benchmark::DoNotOptimize(SumWords(resident.data(), kSize));
    auto t2 = Clock::now();
    if (!(*reader)->ReadTensor(ti, full).ok()) return state.SkipWithError("full load failed");
    auto t3 = Clock::now();
    limit.Run();
    auto t4 = Clock::now();
    paged_s.push_back(Seconds(t0, t1));
    resident_s.push_back(Seconds(t1, t2));
    full_s.push_back(Seconds(t2, t3));
    limit_s.push_back(Seconds(t3, t4));
    state.SetIterationTime(Seconds(t0, t1));
    state.counters["peak_resident_MiB"] = static_cast<double>((*b)->stats().peak_resident_bytes) / (1 << 20);
  }
  const double n = static_cast<double>(kSize);
  const double paged = Quantile(paged_s, 0.5), full_t = Quantile(full_s, 0.5), lim = Quantile(limit_s, 0.5);
  state.SetBytesProcessed(static_cast<int64_t>(n * static_cast<double>(state.iterations())));
  state.counters["paged_MBps"] = n / paged / 1e6;
  state.counters["paged_best_MBps"] = n / Quantile(paged_s, 0) / 1e6;
  state.counters["paged_worst_MBps"] = n / Quantile(paged_s, 1) / 1e6;
  state.counters["resident_MBps"] = n / Quantile(resident_s, 0.5) / 1e6;
  state.counters["full_load_MBps"] = n / full_t / 1e6;
  state.counters["limit_MBps"] = n / lim / 1e6;
  state.counters["ratio_vs_limit"] = lim / paged;
  state.counters["ratio_vs_full_load"] = full_t / paged;
}
BENCHMARK(BM_Sweep)->Arg(0)->Arg(1)->Arg(2)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

// Args: page size (4 KiB or 64 KiB frames).
void BM_Random(benchmark::State& state) {
  const uint64_t kSize = 256ull << 20, kAccesses = 4000;
  const uint32_t page = static_cast<uint32_t>(state.range(0));
  std::string path = OneTensorBundle(page == 4096 ? "random4k.apbundle" : "random64k.apbundle", kSize,
                                     Codec::kZstd, page, true);
  g_cleanup.paths.push_back(path);
  // The baseline's raw file, holding the same bytes.
  std::string raw_path = TempPath("random.raw");
  g_cleanup.paths.push_back(raw_path);
  auto data = Weights(kSize, DType::kBF16);
  {
    int fd = open(raw_path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, data.data(), kSize) != static_cast<ssize_t>(kSize)) return state.SkipWithError("write");
    fsync(fd);
    close(fd);
  }
  std::mt19937_64 rng(42);
  std::vector<uint64_t> offsets(kAccesses);
  for (auto& o : offsets) o = (rng() % (kSize / 4096)) * 4096;
  std::vector<double> paged_us, mmap_us;
  char buf[4096];
  for (auto _ : state) {
    state.PauseTiming();
    int bfd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    posix_fadvise(bfd, 0, 0, POSIX_FADV_DONTNEED);
    close(bfd);
    PagingConfig c = BenchConfig(kSize / 4);
    c.prefetch_depth = 0;  // random access: readahead would only waste the budget
    auto b = PagedBundle::Open(path, c);
    if (!b.ok()) return state.SkipWithError(b.status().message());
    const auto* p = static_cast<const char*>((*b)->model().tensor("w")->data());
    state.ResumeTiming();
    for (uint64_t o : offsets) {
      auto t0 = Clock::now();
      memcpy(buf, p + o, sizeof(buf));
      paged_us.push_back(Seconds(t0, Clock::now()) * 1e6);
      if (memcmp(buf, data.data() + o, sizeof(buf)) != 0) return state.SkipWithError("paged data differs");
    }
    state.PauseTiming();
    int fd = open(raw_path.c_str(), O_RDONLY | O_CLOEXEC);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    const auto* m = static_cast<const char*>(mmap(nullptr, kSize, PROT_READ, MAP_PRIVATE, fd, 0));
    for (uint64_t o : offsets) {
      auto t0 = Clock::now();
      memcpy(buf, m + o, sizeof(buf));
      mmap_us.push_back(Seconds(t0, Clock::now()) * 1e6);
    }
    munmap(const_cast<char*>(m), kSize);
    close(fd);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kAccesses));
  ReportLatencies(state, "paged", paged_us, "mmap", mmap_us);
}
BENCHMARK(BM_Random)->Arg(4096)->Arg(65536)->Unit(benchmark::kMillisecond)->Iterations(1);

#ifdef FAULTLINE_HAVE_BLAS
// A stack of layers; Args: batch (1 = matrix-vector, 16 = matrix-matrix).
void BM_Layers(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int kLayers = 16, kRows = 2048, kCols = 2048;  // 16 MiB of f32 per layer
  const uint64_t layer_bytes = uint64_t{kRows} * kCols * 4, total = layer_bytes * kLayers;
  std::string path = TempPath("layers.apbundle");
  g_cleanup.paths.push_back(path);
  if (access(path.c_str(), R_OK) != 0) {
    BundleBuilder b;
    auto& m = b.AddModel("m");
    std::vector<std::vector<std::byte>> keep;
    TensorOptions o;
    o.shuffle = true;
    for (int l = 0; l < kLayers; l++) {
      keep.push_back(Weights(layer_bytes, DType::kF32, 1000 + l));
      m.AddTensor("layers." + std::to_string(l) + ".w", DType::kF32, {kRows, kCols}, keep.back(), o);
    }
    if (!b.Build(path).ok()) return state.SkipWithError("build failed");
  }
  auto reader = BundleReader::Open(path);
  std::vector<std::vector<float>> resident(kLayers);
  for (int l = 0; l < kLayers; l++) {
    resident[l].resize(layer_bytes / 4);
    (void)(*reader)->ReadTensor((*reader)->info().models[0].tensors[l],
                                {reinterpret_cast<std::byte*>(resident[l].data()), layer_bytes});
  }
  std::vector<float> x0(batch * kCols, 0.01f), x(batch * kCols), y(batch * kRows);
  auto pass = [&](auto&& weight) {
    x = x0;
    for (int l = 0; l < kLayers; l++) {
      const float* w = weight(l);
      if (batch == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, kRows, kCols, 1.0f, w, kCols, x.data(), 1, 0.0f, y.data(), 1);
      else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, batch, kRows, kCols, 1.0f, x.data(), kCols, w, kCols, 0.0f, y.data(), kRows);
      for (size_t i = 0; i < x.size(); i++) x[i] = y[i] > 0 ? y[i] * 0.05f : 0.0f;
    }
    return x;
  };
  // The decompression-bound minimum: every layer through the limit loop once.
  std::vector<std::unique_ptr<LimitLoop>> limits;
  for (int l = 0; l < kLayers; l++)
    limits.push_back(std::make_unique<LimitLoop>(**reader, (*reader)->info().models[0].tensors[l]));
  auto b = PagedBundle::Open(path, BenchConfig(total / 4, EvictionPolicy::kPlan));
  if (!b.ok()) return state.SkipWithError(b.status().message());
  ModelView m = (*b)->model();
  std::vector<TensorView> views = m.tensors();
  (*b)->SetPlan(views);
  auto paged_weight = [&](int l) {
    if (l + 1 < kLayers) (*b)->Advance(views[l]);
    return views[l].as<float>();
  };
  auto want = pass([&](int l) { return resident[l].data(); });
  if (pass(paged_weight) != want) return state.SkipWithError("paged result differs");  // warm-up pass
  double paged_s = 0, resident_s = 0, limit_s = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    auto got = pass(paged_weight);
    auto t1 = Clock::now();
    benchmark::DoNotOptimize(pass([&](int l) { return resident[l].data(); }));
    auto t2 = Clock::now();
    for (auto& lim : limits) lim->Run();
    auto t3 = Clock::now();
    if (got != want) return state.SkipWithError("paged result differs");
    paged_s += Seconds(t0, t1);
    resident_s += Seconds(t1, t2);
    limit_s += Seconds(t2, t3);
    state.SetIterationTime(Seconds(t0, t1));
  }
  double n = static_cast<double>(state.iterations());
  PagingStats st = (*b)->stats();
  state.counters["passes_per_s"] = n / paged_s;
  state.counters["resident_passes_per_s"] = n / resident_s;
  state.counters["slowdown_vs_resident"] = paged_s / resident_s;
  // Paged time over the decompression-bound minimum (max of compute and decompression).
  state.counters["ratio_vs_min"] = paged_s / std::max(limit_s, resident_s);
  state.counters["loads_per_pass"] = static_cast<double>(st.loads) / (n + 1);
  state.SetBytesProcessed(static_cast<int64_t>(n * static_cast<double>(total)));
}
BENCHMARK(BM_Layers)->Arg(1)->Arg(16)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
#endif

// A userfaultfd round trip with nothing but a memcpy in the handler.
std::vector<double> RawUffdLatencies(uint32_t unit, int faults) {
  std::vector<double> out;
  auto u = internal::Uffd::Open();
  if (!u.ok()) return out;
  size_t len = static_cast<size_t>(unit) * faults;
  auto* region = static_cast<char*>(mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  std::vector<char> src(unit, 7);
  if (!u->RegisterMissing(region, len).ok()) return out;
  std::atomic<bool> stop{false};
  std::thread handler([&] {
    pollfd pfd = {u->fd(), POLLIN, 0};
    std::vector<char> staging(unit);
    while (!stop) {
      if (poll(&pfd, 1, 100) <= 0) continue;
      uffd_msg msg;
      if (read(u->fd(), &msg, sizeof(msg)) != sizeof(msg)) continue;
      // The unit containing the address, relative to the region's start
      // (mmap aligns only to 4 KiB).
      uintptr_t base = reinterpret_cast<uintptr_t>(region);
      uintptr_t a = base + (msg.arg.pagefault.address - base) / unit * unit;
      memcpy(staging.data(), src.data(), unit);
      if (u->Copy(reinterpret_cast<void*>(a), staging.data(), unit) != 0)
        u->Copy(reinterpret_cast<void*>(msg.arg.pagefault.address & ~uintptr_t{4095}), staging.data(), 4096);
    }
  });
  for (int i = 0; i < faults; i++) {
    auto t0 = Clock::now();
    volatile char c = region[static_cast<size_t>(i) * unit];
    (void)c;
    out.push_back(Seconds(t0, Clock::now()) * 1e6);
  }
  stop = true;
  handler.join();
  munmap(region, len);
  return out;
}

// Args: frame size. Raw codec, so the figure is the engine's own overhead.
void BM_FaultLatency(benchmark::State& state) {
  const uint32_t unit = static_cast<uint32_t>(state.range(0));
  const int kFaults = 2000;
  std::string path = OneTensorBundle(unit == 4096 ? "lat4k.apbundle" : "lat64k.apbundle",
                                     static_cast<uint64_t>(unit) * kFaults, Codec::kRaw, unit, false);
  g_cleanup.paths.push_back(path);
  std::vector<double> engine_us, raw_us;
  for (auto _ : state) {
    PagingConfig c = BenchConfig(uint64_t{unit} * kFaults * 2);
    c.prefetch_depth = 0;
    c.workers = 1;
    auto b = PagedBundle::Open(path, c);
    if (!b.ok()) return state.SkipWithError(b.status().message());
    const auto* p = static_cast<const volatile char*>((*b)->model().tensor("w")->data());
    for (int i = 0; i < kFaults; i++) {
      auto t0 = Clock::now();
      (void)p[static_cast<size_t>(i) * unit];
      engine_us.push_back(Seconds(t0, Clock::now()) * 1e6);
    }
    auto r = RawUffdLatencies(unit, kFaults);
    raw_us.insert(raw_us.end(), r.begin(), r.end());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kFaults));
  ReportLatencies(state, "engine", engine_us, "raw_uffd", raw_us);
}
BENCHMARK(BM_FaultLatency)->Arg(4096)->Arg(65536)->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
