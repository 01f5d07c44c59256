// Bundle benchmarks. Each runs its baseline in the same iteration and
// reports the ratio (these machines are noisy; figures from different runs
// do not compare):
//   BM_Pack      builder throughput vs a bare zstd compress loop over the
//                same frames on the same number of threads;
//   BM_PackManyTensors  packing N tiny tensors against N/10 in the same
//                iteration: per-tensor cost ratio (1.0 = linear in N);
//   BM_FullLoad  ReadTensor (io_uring read + checksum + decompress) vs a bare
//                zstd decompress loop over the same frames already in memory.
#include <benchmark/benchmark.h>
#include <zstd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

#include "bench_util.h"
#include "bundle/codec.h"
#include "limit_loop.h"
#include "core/thread_pool.h"
#include "faultline/bundle.hpp"

using namespace faultline;

namespace {

using namespace faultline::bench;

constexpr size_t kBytes = 128ull << 20;

// Args: 0 = zstd, 1 = zstd + shuffle.
void BM_Pack(benchmark::State& state) {
  const bool shuffle = state.range(0) == 1;
  const DType dtype = DType::kBF16;
  static const auto data = Weights(kBytes, dtype);
  TensorOptions opts;
  opts.shuffle = shuffle;
  std::string path = TempPath("pack.apbundle");
  internal::ThreadPool pool;
  const size_t page = opts.page_size, frames = kBytes / page;
  const size_t bound = ZSTD_compressBound(page);
  std::vector<std::byte> out(frames * bound), scratch(shuffle ? kBytes : 0);
  internal::FrameCodec codec{Codec::kZstd, opts.level, shuffle, DTypeSize(dtype)};
  double pack_s = 0, limit_s = 0;
  uint64_t file_size = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    BundleBuilder b;
    b.AddModel("m").AddTensor("w", dtype, {kBytes / 2}, data, opts);
    auto r = b.Build(path);
    auto t1 = Clock::now();
    if (!r.ok()) state.SkipWithError(r.status().message());
    file_size = r.ok() ? r->file_size : 0;
    // The limit: the same frames through the same codec on the same threads.
    pool.ParallelFor(frames, [&](size_t i) {
      uint32_t flags;
      auto n = internal::EncodeFrame(codec, {data.data() + i * page, page},
                                     {out.data() + i * bound, bound},
                                     shuffle ? scratch.data() + i * page : nullptr, &flags);
      benchmark::DoNotOptimize(n);
    });
    auto t2 = Clock::now();
    pack_s += Seconds(t0, t1);
    limit_s += Seconds(t1, t2);
    state.SetIterationTime(Seconds(t0, t1));
  }
  unlink(path.c_str());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBytes));
  state.counters["limit_MBps"] = static_cast<double>(state.iterations() * kBytes) / limit_s / 1e6;
  state.counters["ratio_vs_limit"] = limit_s / pack_s;
  state.counters["compression"] = static_cast<double>(kBytes) / static_cast<double>(file_size);
  state.counters["threads"] = pool.size();
}
BENCHMARK(BM_Pack)->Arg(0)->Arg(1)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

// Real checkpoints have 10k+ tensors (large MoE models 100k+): packing must
// be linear in their number. Arg: N tiny tensors (equal contents, so the
// frames deduplicate and the per-tensor work is what is measured), against
// N/10 in the same iteration.
void BM_PackManyTensors(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::string path = TempPath("many.apbundle");
  const std::vector<std::byte> data(16, std::byte{7});
  auto pack = [&](size_t count) {
    auto t0 = Clock::now();
    BundleBuilder b;
    ModelBuilder& m = b.AddModel("m");
    for (size_t i = 0; i < count; i++)
      m.AddTensor("model.layers." + std::to_string(i / 64) + ".experts." + std::to_string(i % 64) + ".w",
                  DType::kU8, {16}, data);
    auto r = b.Build(path);
    if (!r.ok()) state.SkipWithError(r.status().message());
    return Seconds(t0, Clock::now());
  };
  double many_s = 0, few_s = 0;
  for (auto _ : state) {
    double s = pack(n);
    many_s += s;
    few_s += pack(n / 10);
    state.SetIterationTime(s);
  }
  unlink(path.c_str());
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.counters["per_tensor_cost_vs_tenth"] = (many_s / static_cast<double>(n)) / (few_s / static_cast<double>(n / 10));
}
BENCHMARK(BM_PackManyTensors)->Arg(10000)->Arg(100000)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(2);

// Args: codec (0 raw, 1 zstd, 2 zstd + shuffle).
void BM_FullLoad(benchmark::State& state) {
  const int mode = static_cast<int>(state.range(0));
  const DType dtype = DType::kBF16;
  static const auto data = Weights(kBytes, dtype);
  TensorOptions opts;
  opts.codec = mode == 0 ? Codec::kRaw : Codec::kZstd;
  opts.shuffle = mode == 2;
  std::string path = TempPath("load.apbundle");
  {
    BundleBuilder b;
    b.AddModel("m").AddTensor("w", dtype, {kBytes / 2}, data, opts);
    if (!b.Build(path).ok()) {
      state.SkipWithError("build failed");
      return;
    }
  }
  auto reader = BundleReader::Open(path);
  if (!reader.ok()) {
    state.SkipWithError(reader.status().message());
    return;
  }
  const TensorInfo& t = (*reader)->info().models[0].tensors[0];
  LimitLoop limit(**reader, t);
  std::vector<std::byte> out(kBytes);
  memset(out.data(), 1, out.size());
  double load_s = 0, limit_s = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    Status s = (*reader)->ReadTensor(t, out);
    auto t1 = Clock::now();
    if (!s.ok()) state.SkipWithError(s.message());
    limit.Run();
    auto t2 = Clock::now();
    load_s += Seconds(t0, t1);
    limit_s += Seconds(t1, t2);
    state.SetIterationTime(Seconds(t0, t1));
  }
  const auto& limit_out = limit.output();
  unsigned threads = limit.threads();
  if (out != data || limit_out != data) state.SkipWithError("data differs");
  unlink(path.c_str());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBytes));
  state.counters["limit_MBps"] = static_cast<double>(state.iterations() * kBytes) / limit_s / 1e6;
  state.counters["ratio_vs_limit"] = limit_s / load_s;
  state.counters["threads"] = threads;
}
BENCHMARK(BM_FullLoad)->Arg(0)->Arg(1)->Arg(2)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

}  // namespace

BENCHMARK_MAIN();
