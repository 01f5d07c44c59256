// Managed-memory benchmarks (userfaultfd needed; without it they are skipped).
//
// Sweep: write a region four times the budget in order, then read it back,
// beside the same sweep with a budget as large as the region (no spilling)
// and beside the limit: the same compress + write + read + decompress work
// per 64 KiB chunk in a loop, with no faults.
// ReadSweep: a region four times the budget written once, then read in
// order pass after pass (offloaded weights at inference), beside the limit
// (the same bytes read from the page cache in 64 KiB preads) and beside
// resident memory.
// InstallCycle: what bringing spilled data back and dropping it again costs
// per byte, by the way the engine does it and by two ways it might, with a
// thread of the process busy on the other CPU (as in an offloaded forward
// pass, where every TLB flush interrupts it); see docs/ARCHITECTURE.md.
// SmallAlloc: malloc/free of small sizes through the shim's malloc (the
// preload library, dlopen'ed so that both run in this process) beside
// glibc's allocator.
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/checksum.h"
#include "faultline/alloc.hpp"
#include "os/meminfo.h"
#include "os/uffd.h"

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
}

using namespace faultline;
using namespace faultline::bench;

namespace {

constexpr size_t kChunk = kManagedChunk;
constexpr size_t kUnitBytes = 2u << 20;  // AllocConfig::huge_units

// The share of the bytes read back that came back in whole 2 MiB units.
double UnitShare(const AllocStats& st) {
  return static_cast<double>(st.unit_loads * kUnitBytes) / static_cast<double>(std::max<uint64_t>(1, st.loads) * kChunk);
}

// The sum of every 8 bytes: a read of all of them.
uint64_t SumPass(const uint8_t* p, size_t size) {
  uint64_t sum = 0;
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < size / 8; i++) sum += w[i];
  return sum;
}

// 16 different 64 KiB chunks of weights, to fill regions with.
std::vector<std::vector<std::byte>> Chunks(DType dtype, uint64_t seed) {
  std::vector<std::vector<std::byte>> src(16);
  for (size_t i = 0; i < src.size(); i++) src[i] = Weights(kChunk, dtype, seed + i);
  return src;
}

// A managed region's config with a budget of a quarter of `size` and zstd-1.
AllocConfig QuarterBudget(size_t size) {
  AllocConfig c;
  c.budget = size / 4;
  c.zstd_level = 1;
  return c;
}

// A read-write file in the temporary directory, already unlinked.
int ScratchFile(const char* name) {
  std::string path = TempPath(name);
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  unlink(path.c_str());
  return fd;
}

// Sequential write of every chunk, then a read of every byte (summed).
double Sweep(uint8_t* p, size_t size, const std::vector<std::vector<std::byte>>& src) {
  auto t0 = Clock::now();
  for (size_t off = 0; off < size; off += kChunk) memcpy(p + off, src[(off / kChunk) % src.size()].data(), kChunk);
  benchmark::DoNotOptimize(SumPass(p, size));
  return Seconds(t0, Clock::now());
}

// range(0): region MiB; the budget is a quarter of it.
void BM_Sweep(benchmark::State& state) {
  const size_t size = static_cast<size_t>(state.range(0)) << 20;
  const auto src = Chunks(DType::kBF16, 1000);
  const AllocConfig c = QuarterBudget(size);
  AllocConfig roomy = c;
  roomy.budget = size + kChunk;
  double managed = 0, unbudgeted = 0, limit = 0;
  // The limit loop's file and buffers.
  int fd = ScratchFile("alloc-limit");
  std::vector<uint8_t> mem(size), packed(ZSTD_compressBound(kChunk)), back(kChunk);
  std::vector<uint32_t> lens(size / kChunk);
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  for (auto _ : state) {
    {
      auto r = ManagedRegion::Create(size, c);
      if (!r.ok()) return state.SkipWithError(r.status().message());
      double s = Sweep(static_cast<uint8_t*>((*r)->data()), size, src);
      managed += s;
      state.SetIterationTime(s);
      state.counters["spilled_MiB"] = static_cast<double>((*r)->stats().bytes_spilled) / (1 << 20);
      state.counters["compression"] = (*r)->stats().compression_ratio();
      const AllocStats st = (*r)->stats();
      state.counters["unit_loads"] = UnitShare(st);
    }
    {
      auto r = ManagedRegion::Create(size, roomy);
      if (!r.ok()) return state.SkipWithError(r.status().message());
      unbudgeted += Sweep(static_cast<uint8_t*>((*r)->data()), size, src);
    }
    // Limit: the sweep's memory traffic plus, per chunk, compress + write
    // then read + decompress, as the engine does for a region 4x its budget.
    auto t0 = Clock::now();
    for (size_t off = 0; off < size; off += kChunk) {
      memcpy(mem.data() + off, src[(off / kChunk) % src.size()].data(), kChunk);
      size_t z = ZSTD_compressCCtx(cctx, packed.data(), packed.size(), mem.data() + off, kChunk, 1);
      lens[off / kChunk] = static_cast<uint32_t>(z);
      if (pwrite(fd, packed.data(), (z + 4095) / 4096 * 4096, static_cast<off_t>(off)) < 0) return state.SkipWithError("pwrite");
    }
    uint64_t sum = 0;
    for (size_t off = 0; off < size; off += kChunk) {
      size_t z = lens[off / kChunk];
      if (pread(fd, packed.data(), (z + 4095) / 4096 * 4096, static_cast<off_t>(off)) < 0) return state.SkipWithError("pread");
      ZSTD_decompressDCtx(dctx, back.data(), kChunk, packed.data(), z);
      sum += SumPass(back.data(), kChunk);
    }
    benchmark::DoNotOptimize(sum);
    limit += Seconds(t0, Clock::now());
  }
  ZSTD_freeCCtx(cctx);
  ZSTD_freeDCtx(dctx);
  close(fd);
  double n = 2.0 * static_cast<double>(size) * static_cast<double>(state.iterations());  // written + read
  state.counters["managed_MBps"] = n / managed / 1e6;
  state.counters["no_budget_MBps"] = n / unbudgeted / 1e6;
  state.counters["limit_MBps"] = n / limit / 1e6;
  state.counters["ratio_vs_no_budget"] = unbudgeted / managed;
  state.counters["ratio_vs_limit"] = limit / managed;
}
BENCHMARK(BM_Sweep)->Arg(512)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

// range(0): region MiB, written once with f32 weights (they do not compress,
// so they spill raw), then read in order again and again under a budget of
// a quarter: the pattern of a model offloaded for inference. Two regions
// alike, one reading spilled data back in whole 2 MiB units where it can
// (AllocConfig::huge_units, the default) and one chunk by chunk; beside
// them the limit, the same bytes read back from a file in the page cache in
// 64 KiB preads and summed (what each pass has to do at least), and the
// same pass over resident memory.
void BM_ReadSweep(benchmark::State& state) {
  const size_t size = static_cast<size_t>(state.range(0)) << 20;
  const auto src = Chunks(DType::kF32, 2000);
  AllocConfig c = QuarterBudget(size);
  auto r = ManagedRegion::Create(size, c);
  c.huge_units = false;
  auto rc = ManagedRegion::Create(size, c);
  if (!r.ok()) return state.SkipWithError(r.status().message());
  if (!rc.ok()) return state.SkipWithError(rc.status().message());
  auto* p = static_cast<uint8_t*>((*r)->data());
  auto* pc = static_cast<uint8_t*>((*rc)->data());
  std::vector<uint8_t> resident(size);
  int fd = ScratchFile("alloc-read-limit");
  for (size_t off = 0; off < size; off += kChunk) {
    const auto* chunk = src[(off / kChunk) % src.size()].data();
    memcpy(p + off, chunk, kChunk);
    memcpy(pc + off, chunk, kChunk);
    memcpy(resident.data() + off, chunk, kChunk);
    if (pwrite(fd, chunk, kChunk, static_cast<off_t>(off)) != static_cast<ssize_t>(kChunk)) {
      close(fd);
      return state.SkipWithError("pwrite");
    }
  }
  uint64_t expect = SumPass(resident.data(), size);
  // The first passes, untimed: everything spilled is clean from here on.
  if (SumPass(p, size) != expect || SumPass(pc, size) != expect) {
    close(fd);
    return state.SkipWithError("managed memory read back wrong");
  }
  std::vector<uint8_t> buf(kChunk);
  double managed = 0, chunked = 0, limit = 0, res = 0;
  uint64_t loads0 = (*r)->stats().loads, ahead0 = (*r)->stats().prefetched;
  for (auto _ : state) {
    auto t0 = Clock::now();
    uint64_t sum = SumPass(p, size);
    double s = Seconds(t0, Clock::now());
    if (sum != expect) return state.SkipWithError("managed memory read back wrong");
    managed += s;
    state.SetIterationTime(s);
    t0 = Clock::now();
    sum = SumPass(pc, size);
    chunked += Seconds(t0, Clock::now());
    if (sum != expect) return state.SkipWithError("managed memory read back wrong (chunk by chunk)");
    t0 = Clock::now();
    sum = 0;
    for (size_t off = 0; off < size; off += kChunk) {
      if (pread(fd, buf.data(), kChunk, static_cast<off_t>(off)) != static_cast<ssize_t>(kChunk)) break;
      sum += SumPass(buf.data(), kChunk);
    }
    limit += Seconds(t0, Clock::now());
    t0 = Clock::now();
    sum += SumPass(resident.data(), size);
    res += Seconds(t0, Clock::now());
    benchmark::DoNotOptimize(sum);
  }
  close(fd);
  AllocStats st = (*r)->stats();
  double n = static_cast<double>(size) * static_cast<double>(state.iterations());
  state.counters["managed_GBps"] = n / managed / 1e9;
  state.counters["chunks_GBps"] = n / chunked / 1e9;
  state.counters["limit_GBps"] = n / limit / 1e9;
  state.counters["resident_GBps"] = n / res / 1e9;
  state.counters["ratio_vs_limit"] = limit / managed;
  state.counters["ratio_vs_chunks"] = chunked / managed;
  state.counters["ratio_vs_resident"] = res / managed;
  state.counters["read_ahead"] = static_cast<double>(st.prefetched - ahead0) / static_cast<double>(st.loads - loads0);
  state.counters["unit_loads"] = UnitShare(st);
  // Of the units, those that went in as one huge page and those read into
  // the page of a unit dropped whole.
  const double units = static_cast<double>(std::max<uint64_t>(1, st.unit_loads));
  state.counters["unit_moves"] = static_cast<double>(st.unit_moves) / units;
  state.counters["unit_recycled"] = static_cast<double>(st.unit_recycled) / units;
}
BENCHMARK(BM_ReadSweep)->Arg(512)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

// A thread of this process reading memory until destroyed.
class BusyThread {
 public:
  BusyThread()
      : t_([this] {
          std::vector<uint8_t> buf(1 << 20, 1);
          uint64_t s = 0;
          while (!stop_.load(std::memory_order_relaxed)) s += SumPass(buf.data(), buf.size());
          benchmark::DoNotOptimize(s);
        }) {}
  ~BusyThread() {
    stop_ = true;
    t_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread t_;
};

// `len` bytes of anonymous memory aligned to `align` (left mapped: the
// benchmark's process ends soon after).
uint8_t* MapAligned(size_t len, size_t align) {
  void* map;
  uint64_t map_len;
  return reinterpret_cast<uint8_t*>(internal::MapAligned(len, align, &map, &map_len));
}

// Each iteration brings 256 MiB back from a file in the page cache, 64 KiB
// read and checked (XXH3) at a time, and drops it again, three ways:
//   copy    the engine's way: UFFDIO_COPY_MODE_WP from a buffer, dropped
//           by MADV_DONTNEED in 1 MiB runs (the evictor's clean runs);
//   move64  read into a pooled 64 KiB slot, UFFDIO_MOVE in, write-protect,
//           UFFDIO_MOVE back into the slot (the pager's frame pool, plus
//           the protection dirty tracking needs);
//   huge    32 chunks read into a 2 MiB transparent huge page, moved in as
//           one entry, write-protected, hashed again (a write between the
//           move and the protection would otherwise go unseen), moved back
//           (where UFFDIO_MOVE and THP are available).
// Reported: GB/s of each and their ratios to copy, measured in one run.
void BM_InstallCycle(benchmark::State& state) {
  using internal::Uffd;
  auto u = Uffd::Open();
  if (!u.ok()) return state.SkipWithError(u.status().message());
  if (!u->features().wp || !u->features().move) return state.SkipWithError("no userfaultfd write-protect or UFFDIO_MOVE");
  const size_t size = 256u << 20, run = 16 * kChunk;
  const size_t huge = internal::TransparentHugePageSize();
  const auto src = Chunks(DType::kF32, 3000);
  int fd = ScratchFile("install-cycle");
  const size_t file_chunks = 64;  // 4 MiB, read over and over
  for (size_t i = 0; i < file_chunks; i++)
    if (pwrite(fd, src[i % src.size()].data(), kChunk, static_cast<off_t>(i * kChunk)) != static_cast<ssize_t>(kChunk)) {
      close(fd);
      return state.SkipWithError("pwrite");
    }
  auto read_chunk = [&](size_t i, void* to) {
    bool ok = pread(fd, to, kChunk, static_cast<off_t>((i % file_chunks) * kChunk)) == static_cast<ssize_t>(kChunk);
    benchmark::DoNotOptimize(internal::Checksum64(to, kChunk));
    return ok;
  };
  const size_t align = huge ? huge : run;
  uint8_t* small = MapAligned(size, align);
  uint8_t* big = huge ? MapAligned(size, huge) : nullptr;
  const size_t pool_slots = 64;
  uint8_t* pool = MapAligned(pool_slots * kChunk, kChunk);
  uint8_t* hpool = huge ? MapAligned(huge, huge) : nullptr;
  if (!small || !pool || (huge && (!big || !hpool))) {
    close(fd);
    return state.SkipWithError("mmap");
  }
  madvise(small, size, MADV_NOHUGEPAGE);
  madvise(pool, pool_slots * kChunk, MADV_NOHUGEPAGE);
  memset(pool, 1, pool_slots * kChunk);
  bool ok = u->RegisterMissingWp(small, size).ok() && u->RegisterMissing(pool, pool_slots * kChunk).ok();
  if (huge) {
    madvise(big, size, MADV_HUGEPAGE);
    madvise(hpool, huge, MADV_HUGEPAGE);
    memset(hpool, 1, huge);
    ok = ok && u->RegisterMissingWp(big, size).ok() && u->RegisterMissing(hpool, huge).ok();
  }
  if (!ok) {
    close(fd);
    return state.SkipWithError("userfaultfd register");
  }
  std::vector<uint8_t> buf(kChunk);
  BusyThread busy;
  double copy_s = 0, move_s = 0, huge_s = 0;
  bool failed = false;
  for (auto _ : state) {
    auto t0 = Clock::now();
    for (size_t off = 0; off < size && !failed; off += kChunk) {
      failed |= !read_chunk(off / kChunk, buf.data()) || u->CopyWp(small + off, buf.data(), kChunk) != 0;
      if ((off + kChunk) % run == 0) madvise(small + off + kChunk - run, run, MADV_DONTNEED);
    }
    double s = Seconds(t0, Clock::now());
    copy_s += s;
    state.SetIterationTime(s);
    t0 = Clock::now();
    for (size_t off = 0; off < size && !failed; off += kChunk) {
      uint8_t* slot = pool + (off / kChunk % pool_slots) * kChunk;
      failed |= !read_chunk(off / kChunk, slot) || u->Move(small + off, slot, kChunk, false) != 0 ||
                u->WriteProtect(small + off, kChunk, true) != 0 || u->Move(slot, small + off, kChunk, false) != 0;
    }
    move_s += Seconds(t0, Clock::now());
    if (!huge) continue;
    t0 = Clock::now();
    for (size_t off = 0; off < size && !failed; off += huge) {
      for (size_t k = 0; k < huge; k += kChunk) failed |= !read_chunk((off + k) / kChunk, hpool + k);
      failed |= u->Move(big + off, hpool, huge, false) != 0 || u->WriteProtect(big + off, huge, true) != 0;
      benchmark::DoNotOptimize(internal::Checksum64(big + off, huge));
      failed |= u->Move(hpool, big + off, huge, false) != 0;
    }
    huge_s += Seconds(t0, Clock::now());
  }
  close(fd);
  if (failed) return state.SkipWithError("a read, install or move failed");
  double n = static_cast<double>(size) * static_cast<double>(state.iterations());
  state.counters["copy_GBps"] = n / copy_s / 1e9;
  state.counters["move64_GBps"] = n / move_s / 1e9;
  state.counters["move64_vs_copy"] = copy_s / move_s;
  if (huge) {
    state.counters["huge_GBps"] = n / huge_s / 1e9;
    state.counters["huge_vs_copy"] = copy_s / huge_s;
  }
}
BENCHMARK(BM_InstallCycle)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);

// The shim's malloc and free, from the preload library loaded locally.
struct Shim {
  void* (*malloc_fn)(size_t) = nullptr;
  void (*free_fn)(void*) = nullptr;
  Shim() {
    const char* path = getenv("FAULTLINE_PRELOAD");
    void* h = dlopen(path && *path ? path : "libfaultline-preload.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    malloc_fn = reinterpret_cast<void* (*)(size_t)>(dlsym(h, "malloc"));
    free_fn = reinterpret_cast<void (*)(void*)>(dlsym(h, "free"));
  }
};

// One round: 64 live blocks of sizes 16..1024, replaced one at a time.
template <typename M, typename F>
double Churn(M m, F f, int ops) {
  std::mt19937 rng(7);
  void* live[64] = {};
  auto t0 = Clock::now();
  for (int i = 0; i < ops; i++) {
    int k = i & 63;
    if (live[k]) f(live[k]);
    live[k] = m(16 + (rng() & 1023));
    static_cast<char*>(live[k])[0] = 1;
  }
  for (void* p : live)
    if (p) f(p);
  return Seconds(t0, Clock::now());
}

void BM_SmallAlloc(benchmark::State& state) {
  static Shim shim;
  if (!shim.malloc_fn || !shim.free_fn) return state.SkipWithError("libfaultline-preload.so not found (set FAULTLINE_PRELOAD)");
  const int ops = 1 << 20;
  std::vector<double> libc_s, shim_s;
  for (auto _ : state) {
    // Alternate, so that drift in the machine hits both alike.
    libc_s.push_back(Churn(__libc_malloc, __libc_free, ops));
    double s = Churn(shim.malloc_fn, shim.free_fn, ops);
    shim_s.push_back(s);
    state.SetIterationTime(s);
  }
  double l = Quantile(libc_s, 0.5), s = Quantile(shim_s, 0.5);
  state.counters["shim_ns_per_op"] = s / ops * 1e9;
  state.counters["libc_ns_per_op"] = l / ops * 1e9;
  state.counters["ratio_vs_libc"] = s / l;
}
BENCHMARK(BM_SmallAlloc)->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
