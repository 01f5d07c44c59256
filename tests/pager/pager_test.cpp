// The pager: every tensor read through it is bit-identical to the full load
// for every budget, policy and mode; budgets hold under concurrent faults;
// bad frames give SIGBUS; hints, pins and plans behave; nothing leaks.
// The mode comes from FAULTLINE_TEST_MODE (uffd or guard); the suite is
// registered once per mode and exits 77 where the mode is unavailable.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <atomic>
#include <csetjmp>
#include <functional>
#include <cstring>
#include <fstream>
#include <thread>

#include "bundle/bundle_util.h"
#include "faultline/paging.hpp"
#include "os/meminfo.h"
#include "os/uffd.h"

using namespace faultline;
using namespace faultline::test;

namespace {

PagingMode g_mode = PagingMode::kUffd;

PagingConfig Config(uint64_t budget, EvictionPolicy policy = EvictionPolicy::kLru, unsigned workers = 2) {
  PagingConfig c;
  c.max_resident = budget;
  c.policy = policy;
  c.mode = g_mode;
  c.workers = workers;
  return c;
}

// A bundle with mixed codecs, dtypes and odd sizes; returns its reference data.
std::vector<Spec> MakeModel(const std::string& path, int layers = 4) {
  std::vector<Spec> specs;
  TensorOptions zstd, shuf, raw;
  shuf.shuffle = true;
  raw.codec = Codec::kRaw;
  for (int l = 0; l < layers; l++) {
    std::string p = "layers." + std::to_string(l) + ".";
    specs.push_back(MakeSpec(p + "w", DType::kF32, {256, 1024}, l % 2 ? shuf : zstd, 10 + l, true));
    specs.push_back(MakeSpec(p + "b", DType::kBF16, {70001}, l % 2 ? raw : zstd, 20 + l, l % 2 == 0));
  }
  specs.push_back(MakeSpec("tiny", DType::kU8, {3}, zstd, 99));
  specs.push_back(MakeSpec("empty", DType::kF32, {0}, zstd, 98));
  auto r = BuildBundle(path, "m", specs);
  if (!r.ok()) throw std::runtime_error(r.status().ToString());
  return specs;
}

uint64_t TotalBytes(const std::vector<Spec>& specs) {
  uint64_t n = 0;
  for (const auto& s : specs) n += s.data.size();
  return n;
}

void CheckAll(PagedBundle& b, const std::vector<Spec>& specs) {
  ModelView m = b.model();
  for (const auto& s : specs) {
    auto t = m.tensor(s.name);
    REQUIRE(t.ok());
    REQUIRE(t->size() == s.data.size());
    if (!s.data.empty()) REQUIRE_MESSAGE(memcmp(t->data(), s.data.data(), s.data.size()) == 0, s.name);
  }
}

// A field ("Rss", "AnonHugePages") of the mapping that contains `addr`,
// from /proc/self/smaps, in bytes.
uint64_t MappingField(const void* addr, const char* field) {
  std::ifstream in("/proc/self/smaps");
  std::string line;
  auto a = reinterpret_cast<uintptr_t>(addr);
  bool inside = false;
  uint64_t rss = 0;
  while (std::getline(in, line)) {
    unsigned long lo, hi;
    if (sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find(' ')) {
      inside = a >= lo && a < hi;
      continue;
    }
    unsigned long kb;
    if (inside && line.compare(0, strlen(field), field) == 0 && line[strlen(field)] == ':' &&
        sscanf(line.c_str() + strlen(field) + 1, "%lu kB", &kb) == 1)
      rss += kb * 1024;
  }
  return rss;
}

uint64_t MappingRss(const void* addr) { return MappingField(addr, "Rss"); }

// A counter from /proc/vmstat (0 where absent).
uint64_t VmStat(const char* name) {
  std::ifstream in("/proc/vmstat");
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value)
    if (key == name) return value;
  return 0;
}

// Waits until no load has landed for 50 ms.
void Settle(PagedBundle& b) {
  for (int i = 0; i < 200; i++) {
    uint64_t loads = b.stats().loads;
    usleep(50000);
    if (b.stats().loads == loads) return;
  }
}

// Large tensors, each covering whole huge pages (and one with a partial
// unit at its end), for the huge-unit paths; returns the reference data.
std::vector<Spec> MakeLarge(const std::string& path) {
  TensorOptions shuf, raw, small;
  shuf.shuffle = true;
  raw.codec = Codec::kRaw;
  small.page_size = 16384;
  std::vector<Spec> specs;
  specs.push_back(MakeSpec("big", DType::kF32, {2048, 2048}, shuf, 41, true));     // 16 MiB
  specs.push_back(MakeSpec("raw", DType::kBF16, {3 << 20}, raw, 42, true));        // 6 MiB
  specs.push_back(MakeSpec("odd", DType::kU8, {(5 << 20) + 12345}, {}, 43, true));  // 5 MiB + a tail
  specs.push_back(MakeSpec("pages16k", DType::kF32, {1 << 20}, small, 44, true));  // 4 MiB of 16 KiB frames
  auto r = BuildBundle(path, "m", specs);
  if (!r.ok()) throw std::runtime_error(r.status().ToString());
  return specs;
}

// Whether this machine gives the pager huge units (userfaultfd mode only).
bool HugeUnitsExpected() {
  return g_mode == PagingMode::kUffd && internal::TransparentHugePageSize() == (2u << 20) &&
         internal::UffdAvailable() && internal::Uffd::Open().ok() && internal::Uffd::Open()->features().move;
}

// Reads a tensor front to back in 64 KiB steps, comparing as it goes;
// samples the mapping's huge pages on the way (max into *huge).
bool ReadSequentially(const TensorView& t, const Spec& s, uint64_t* huge = nullptr) {
  const auto* p = static_cast<const std::byte*>(t.data());
  for (uint64_t off = 0; off < s.data.size(); off += 65536) {
    uint64_t n = std::min<uint64_t>(65536, s.data.size() - off);
    if (memcmp(p + off, s.data.data() + off, n) != 0) return false;
    if (huge && off % (4 << 20) == (2 << 20)) *huge = std::max(*huge, MappingField(p, "AnonHugePages"));
  }
  return true;
}

// Reads one byte of every 4 KiB page of a tensor.
void TouchPages(const TensorView& t) {
  const auto* p = t.as<uint8_t>();
  volatile uint64_t sum = 0;
  for (uint64_t i = 0; i < t.size(); i += 4096) sum = sum + p[i];
}

int CountDir(const char* path) {
  int n = 0;
  if (DIR* d = opendir(path)) {
    while (readdir(d)) n++;
    closedir(d);
  }
  return n;
}

}  // namespace

TEST_CASE("every tensor reads bit-identical for budgets from one page to the whole bundle") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  uint64_t total = TotalBytes(specs);
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kPlan}) {
    for (uint64_t budget : {uint64_t{4096}, uint64_t{3 * 65536}, total / 4, total * 2}) {
      CAPTURE(budget);
      CAPTURE(EvictionPolicyName(policy));
      auto b = PagedBundle::Open(path, Config(budget, policy));
      REQUIRE_MESSAGE(b.ok(), b.status().ToString());
      CHECK((*b)->mode() == g_mode);
      CheckAll(**b, specs);
      CheckAll(**b, specs);  // again, after evictions
      PagingStats s = (*b)->stats();
      CHECK(s.errors == 0);
      CHECK(s.loads > 0);
      CHECK(s.peak_resident_bytes <= s.budget_bytes + 2 * 8 * 65536);
      if (budget < total / 2) CHECK(s.evictions > 0);
    }
  }
}

TEST_CASE("many threads faulting the same and neighbouring pages get the right bytes within budget") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path, 6);
  const uint64_t budget = 8 * 65536;
  auto b = PagedBundle::Open(path, Config(budget, EvictionPolicy::kLru, 3));
  REQUIRE(b.ok());
  std::atomic<int> bad{0};
  std::atomic<uint64_t> max_rss{0};
  std::vector<std::thread> threads;
  const void* region = (*b)->model().tensor("layers.0.w")->data();
  for (int t = 0; t < 8; t++)
    threads.emplace_back([&, t] {
      uint64_t s = 777 + t;
      for (int round = 0; round < 400; round++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const Spec& spec = specs[(s >> 33) % (specs.size() - 1)];
        auto tv = (*b)->model().tensor(spec.name);
        uint64_t off = ((s >> 13) % spec.data.size()) & ~uint64_t{7};
        uint64_t len = std::min<uint64_t>(spec.data.size() - off, 1 + (s >> 50) % 9000);
        if (memcmp(static_cast<const std::byte*>(tv->data()) + off, spec.data.data() + off, len) != 0) bad++;
        if (round % 50 == 0) {
          uint64_t rss = MappingRss(region);
          uint64_t m = max_rss.load();
          while (rss > m && !max_rss.compare_exchange_weak(m, rss)) {
          }
        }
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad.load() == 0);
  PagingStats s = (*b)->stats();
  CHECK(s.resident_bytes <= s.budget_bytes);
  // Installed frames stay within the budget plus the frames in flight.
  CHECK(s.peak_resident_bytes <= s.budget_bytes + 3 * 8 * 65536);
  CHECK(max_rss.load() <= s.budget_bytes + 3 * 8 * 65536);
  CHECK(MappingRss(region) <= s.budget_bytes + 3 * 8 * 65536);
  CHECK(s.faults > 0);
}

TEST_CASE("a corrupted frame gives SIGBUS in the thread that touches it; other tensors stay right") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  CorruptFrame(path, 1, std::byte{0x10});  // frame 1 of layers.0.w

  std::atomic<int> callbacks{0};
  PagingConfig c = Config(4 << 20);
  c.on_error = [&](const Status& s) {
    if (std::string(s.message()).find("layers.0.w' frame 1") != std::string::npos) callbacks++;
  };
  auto b = PagedBundle::Open(path, c);
  REQUIRE(b.ok());
  auto w = (*b)->model().tensor("layers.0.w");
  int status = RunInChild([&]() -> int {
    signal(SIGBUS, SIG_DFL);  // sanitizers catch SIGBUS; the default action is under test
    // The child cannot use the parent's mapping (it is not inherited); it
    // re-opens the bundle and touches the bad frame.
    auto cb = PagedBundle::Open(path, Config(1 << 20));
    if (!cb.ok()) return 3;
    auto cw = (*cb)->model().tensor("layers.0.w");
    volatile const std::byte* p = static_cast<const std::byte*>(cw->data());
    (void)p[0];          // frame 0 is fine
    (void)p[65536 + 5];  // frame 1 is not
    return 0;
  });
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGBUS);
  // The parent's other tensors and frames are still right.
  auto good = (*b)->model().tensor("layers.1.w");
  CHECK(memcmp(good->data(), specs[2].data.data(), specs[2].data.size()) == 0);
  CHECK(memcmp(w->data(), specs[0].data.data(), 65536) == 0);
  // Pinning the tensor loads every frame without touching it: an error, not SIGBUS.
  Status pin = (*b)->Pin(*w);
  CHECK(pin.code() == EIO);
  CHECK(std::string(pin.message()).find("frame 1 cannot be read") != std::string::npos);
  CHECK((*b)->stats().errors == 1);
  CHECK(callbacks.load() == 1);
}

namespace {

sigjmp_buf g_recover;
void RecoverFromSigbus(int) { siglongjmp(g_recover, 1); }

// In a child (a hang ends in SIGALRM): opens the bundle, touches byte `at`
// of layers.0.w under a SIGBUS handler that recovers with siglongjmp, as
// programs that survive SIGBUS on a mapping do, twice, then closes it.
// Exit 0 when both touches were SIGBUS and the close returned.
int TouchRecoverAndClose(const std::string& path, uint64_t at, std::function<void()> before = {}) {
  alarm(30);
  auto b = PagedBundle::Open(path, Config(1 << 20));
  if (!b.ok()) return 3;
  auto w = (*b)->model().tensor("layers.0.w");
  if (before) before();
  struct sigaction sa = {};
  sa.sa_handler = RecoverFromSigbus;
  sigaction(SIGBUS, &sa, nullptr);
  static int recovered;  // static: kept across siglongjmp
  static int i;
  recovered = 0;
  for (i = 0; i < 2; i++) {
    if (sigsetjmp(g_recover, 1) == 0) {
      volatile const std::byte* p = static_cast<const std::byte*>(w->data());
      (void)p[at];
    } else {
      recovered++;
    }
  }
  if (recovered != 2) return 4;
  b->reset();  // hung here in guard mode: the handler's in-flight count was never dropped
  return 0;
}

}  // namespace

TEST_CASE("a SIGBUS handler that recovers with siglongjmp leaves the bundle closable") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  MakeModel(path);
  CorruptFrame(path, 1, std::byte{0x10});  // frame 1 of layers.0.w
  int status = RunInChild([&] { return TouchRecoverAndClose(path, 65536 + 5); });
  CHECK_MESSAGE(WIFEXITED(status), "signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  CHECK(WEXITSTATUS(status) == 0);
  // The same after the bundle is truncated under the open bundle.
  MakeModel(path);
  status = RunInChild([&] {
    return TouchRecoverAndClose(path, 200000, [&] { (void)!truncate(path.c_str(), 4096); });
  });
  CHECK_MESSAGE(WIFEXITED(status), "signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a thread that blocks SIGBUS and touches a bad frame is killed by SIGBUS, not spun") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  MakeModel(path);
  CorruptFrame(path, 1, std::byte{0x10});
  int status = RunInChild([&]() -> int {
    alarm(30);
    signal(SIGBUS, SIG_DFL);
    auto b = PagedBundle::Open(path, Config(1 << 20));
    if (!b.ok()) return 3;
    auto w = (*b)->model().tensor("layers.0.w");
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGBUS);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    volatile const std::byte* p = static_cast<const std::byte*>(w->data());
    (void)p[65536 + 5];
    return 0;
  });
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGBUS);  // SIGALRM: it spun
}

namespace {

uint64_t StatusKb(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.compare(0, strlen(field), field) == 0) return strtoull(line.c_str() + strlen(field) + 1, nullptr, 10);
  return 0;
}

uint64_t Fnv(const void* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 1099511628211ull;
  return h;
}

}  // namespace

TEST_CASE("large frames: memory outside the budget is bounded in bytes, and a budget that holds fewer than four is refused") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  std::vector<uint64_t> sums;
  {
    TensorOptions big;
    big.page_size = 8 << 20;
    std::vector<Spec> specs;
    for (int i = 0; i < 8; i++) specs.push_back(MakeSpec("t" + std::to_string(i), DType::kU8, {8 << 20}, big, 60 + i, false));
    REQUIRE(BuildBundle(path, "m", specs).ok());
    for (const auto& sp : specs) sums.push_back(Fnv(sp.data.data(), sp.data.size()));
  }
  auto small = PagedBundle::Open(path, Config(24 << 20));
  REQUIRE(!small.ok());
  CHECK(small.status().code() == EINVAL);
  CHECK(std::string(small.status().message()).find("'t0' has frames of 8 MiB") != std::string::npos);
  CHECK(std::string(small.status().message()).find("--page-size") != std::string::npos);
  // In a child, so that its peak resident set is this test's alone.
  int status = RunInChild([&]() -> int {
    uint64_t before = StatusKb("VmRSS:");
    {
      auto b = PagedBundle::Open(path, Config(32 << 20, EvictionPolicy::kLru, 4));
      if (!b.ok()) return 3;
      for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < 8; i++) {
          auto t = (*b)->model().tensor("t" + std::to_string(i));
          if (Fnv(t->data(), t->size()) != sums[i]) return 4;
        }
      if ((*b)->stats().peak_resident_bytes > (32u << 20)) return 5;
    }
    uint64_t grew = (StatusKb("VmHWM:") - before) << 10;
    // The budget, a worker's three frames, two pool frames and the reader's
    // own: 96 MiB at most (over 600 MiB before the bound was in bytes).
    fprintf(stderr, "grew %llu MiB\n", static_cast<unsigned long long>(grew >> 20));
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return 0;  // shadow memory and quarantines make the resident set no measure here
#else
    return grew <= (96u << 20) ? 0 : 6;
#endif
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a tiny tensor in a bundle of huge frames costs a small page, not a huge one") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  TensorOptions huge;
  huge.page_size = 64 << 20;
  std::vector<Spec> specs;
  for (int i = 0; i < 300; i++) specs.push_back(MakeSpec("t" + std::to_string(i), DType::kU8, {1}, huge, 100 + i));
  specs.push_back(MakeSpec("mid", DType::kF32, {300000}, huge, 7));  // 1.2 MiB: one frame of 2 MiB
  REQUIRE(BuildBundle(path, "m", specs).ok());
  auto r = BundleReader::Open(path);
  REQUIRE(r.ok());
  CHECK((*r)->info().models[0].tensors[0].page_size == 65536);
  CHECK((*r)->info().models[0].tensors[300].page_size == (2u << 20));
  auto b = PagedBundle::Open(path, Config(64 << 20));
  REQUIRE(b.ok());
  CheckAll(**b, specs);
  PagingStats st = (*b)->stats();
  CHECK(st.loads == 301);
  CHECK(st.peak_resident_bytes <= 300 * 65536 + (2u << 20));
}

TEST_CASE("a system call that reads a tensor not loaded yet (write to a file) gets its bytes in userfaultfd mode") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(1 << 20));
  REQUIRE(b.ok());
  auto w = (*b)->model().tensor("layers.1.w");  // 1 MiB, never touched
  int fd = open((dir / "out.bin").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  REQUIRE(fd >= 0);
  errno = 0;
  ssize_t n = write(fd, w->data(), w->size());
  if (g_mode == PagingMode::kGuard) {
    // Documented: a PROT_NONE page inside a system call is EFAULT (no
    // signal is raised); touch or Pin the tensor first.
    CHECK((n == -1 ? errno == EFAULT : n >= 0));
  } else {
    CHECK(n == static_cast<ssize_t>(w->size()));
    std::vector<std::byte> back(w->size());
    CHECK(pread(fd, back.data(), back.size(), 0) == static_cast<ssize_t>(back.size()));
    CHECK(back == specs[2].data);
  }
  close(fd);
}

TEST_CASE("prefetch installs a tensor before it is touched") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(64 << 20));
  REQUIRE(b.ok());
  auto t = (*b)->model().tensor("layers.2.w");
  (*b)->Prefetch(*t);
  uint64_t frames = t->info().frame_count;
  // A load is counted before its install (so that a faulting thread sees
  // its own load in the stats); resident bytes only after it.
  auto there = [&] {
    PagingStats st = (*b)->stats();
    return st.prefetched >= frames && st.resident_bytes >= t->size();
  };
  for (int i = 0; i < 10000 && !there(); i++) usleep(1000);
  PagingStats s = (*b)->stats();
  CHECK(s.prefetched == frames);
  CHECK(memcmp(t->data(), specs[4].data.data(), specs[4].data.size()) == 0);
  CHECK((*b)->stats().faults == s.faults);  // no fault: everything was there
}

TEST_CASE("sequential reads trigger readahead") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(64 << 20));
  REQUIRE(b.ok());
  auto t = (*b)->model().tensor("layers.0.w");
  const auto* p = t->as<uint8_t>();
  uint64_t sum = 0;
  for (uint64_t i = 0; i < t->size(); i += 4096) sum += p[i];
  CHECK(sum > 0);
  PagingStats s = (*b)->stats();
  CHECK(s.prefetched > 0);
  CHECK(s.loads - s.prefetched < t->info().frame_count);  // fewer frames loaded on demand
}

TEST_CASE("sequential reads of large tensors install whole huge pages within the budget") {
  TempDir dir;
  std::string path = dir / "l.apbundle";
  auto specs = MakeLarge(path);
  const uint64_t budget = 20 << 20;  // 5 huge pages per worker, under the 31 MiB of tensors
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kPlan}) {
    CAPTURE(EvictionPolicyName(policy));
    auto b = PagedBundle::Open(path, Config(budget, policy));
    REQUIRE(b.ok());
    CHECK((*b)->huge_units() == HugeUnitsExpected());
    uint64_t huge = 0;
    for (int pass = 0; pass < 2; pass++)
      for (const auto& s : specs) CHECK_MESSAGE(ReadSequentially(*(*b)->model().tensor(s.name), s, &huge), s.name);
    CheckAll(**b, specs);  // and once more in one go, after evictions
    PagingStats st = (*b)->stats();
    CHECK(st.errors == 0);
    CHECK(st.evictions > 0);
    // Budget plus what two workers can have in flight: a unit and a batch each.
    const uint64_t slack = 2 * ((2 << 20) + 8 * 65536);
    CHECK(st.peak_resident_bytes <= st.budget_bytes + slack);
    CHECK(MappingRss((*b)->model().tensor("big")->data()) <= st.budget_bytes + slack);
    if (HugeUnitsExpected()) {
      // Whole units of every large tensor, the 16 KiB-frame one included,
      // each installed as one huge page that the mapping really holds.
      CHECK(st.huge_installs >= 2 * (8 + 3 + 2 + 2) / 2);
      CHECK(st.huge_recycled > 0);  // evicted huge pages came back for later units
      CHECK(huge >= (2u << 20));
      CHECK(st.loads - st.prefetched < st.loads / 4);  // mostly read ahead
    } else {
      CHECK(st.huge_installs == 0);
    }
  }
}

TEST_CASE("a huge unit that had to go in as small pages does not make later units go in split") {
  if (!HugeUnitsExpected()) return;
  // A lone frame installed in unit 3 of "big" and moved back out leaves an
  // (empty) page table in that 2 MiB of the tensor; the next whole-unit
  // move there splits its huge page. The worker's slot must not keep the
  // small pages' page table, or every later unit decoded in it goes in
  // split as well (seen as a sweep that slowed down pass after pass).
  TempDir dir;
  std::string path = dir / "large.apbundle";
  auto specs = MakeLarge(path);
  auto b = PagedBundle::Open(path, Config(8u << 20, EvictionPolicy::kLru, 1));
  REQUIRE(b.ok());
  REQUIRE((*b)->huge_units());
  auto big = *(*b)->model().tensor("big");
  const auto* p = static_cast<const volatile std::byte*>(big.data());
  (void)p[(3u << 20) * 2 + 70000];  // unit 3, frame 1: no stream yet, a frame alone
  Settle(**b);
  (*b)->DontNeed(big);
  uint64_t split_before_last = 0, recycled_before_last = 0, fallbacks = 0;
  for (int pass = 0; pass < 4; pass++) {
    if (pass == 3) {
      split_before_last = (*b)->stats().huge_split;
      recycled_before_last = (*b)->stats().huge_recycled;
      fallbacks = VmStat("thp_fault_fallback");
    }
    REQUIRE(ReadSequentially(big, specs[0]));
  }
  PagingStats st = (*b)->stats();
  fallbacks = VmStat("thp_fault_fallback") - fallbacks;
  MESSAGE("huge installs ", st.huge_installs, ", split ", st.huge_split, ", recycled ", st.huge_recycled,
          "; huge page faults that got small pages meanwhile (any process): ", fallbacks);
  CHECK(st.huge_recycled > recycled_before_last);
  // At most unit 3's range can still split (where the kernel keeps the
  // empty page table); every other unit of the last pass goes in whole,
  // unless the kernel had no huge page to give a slot at the time.
  if (fallbacks == 0) CHECK(st.huge_split - split_before_last <= 1);
}

TEST_CASE("huge units can be turned off, and small budgets never use them") {
  TempDir dir;
  std::string path = dir / "l.apbundle";
  auto specs = MakeLarge(path);
  PagingConfig off = Config(20 << 20);
  off.huge_pages = false;
  setenv("FAULTLINE_HUGE", "0", 1);
  CHECK_FALSE(PagingConfig::FromEnvironment().huge_pages);
  unsetenv("FAULTLINE_HUGE");
  CHECK(PagingConfig::FromEnvironment().huge_pages);
  for (const PagingConfig& c : {off, Config(8 << 20)}) {
    auto b = PagedBundle::Open(path, c);
    REQUIRE(b.ok());
    CHECK_FALSE((*b)->huge_units());
    for (const auto& s : specs) CHECK(ReadSequentially(*(*b)->model().tensor(s.name), s));
    CHECK((*b)->stats().huge_installs == 0);
    CHECK((*b)->stats().errors == 0);
  }
}

TEST_CASE("threads streaming through large tensors at once get the right bytes") {
  TempDir dir;
  std::string path = dir / "l.apbundle";
  auto specs = MakeLarge(path);
  auto b = PagedBundle::Open(path, Config(24 << 20, EvictionPolicy::kLru, 3));
  REQUIRE(b.ok());
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; t++)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; round++) {
        const Spec& s = specs[(t + round) % specs.size()];
        if (!ReadSequentially(*(*b)->model().tensor(s.name), s)) bad++;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(bad.load() == 0);
  PagingStats st = (*b)->stats();
  CHECK(st.errors == 0);
  CHECK(st.peak_resident_bytes <= st.budget_bytes + 3 * ((2 << 20) + 8 * 65536));
  if (HugeUnitsExpected()) CHECK(st.huge_installs > 0);
}

TEST_CASE("a corrupted frame inside a huge unit fails alone") {
  TempDir dir;
  std::string path = dir / "l.apbundle";
  auto specs = MakeLarge(path);
  CorruptFrame(path, 37, std::byte{0x01});  // frame 37 of "big": the sixth of its second unit
  const Spec& big = specs[0];
  int status = RunInChild([&]() -> int {
    signal(SIGBUS, SIG_DFL);
    auto b = PagedBundle::Open(path, Config(20 << 20));
    if (!b.ok()) return 3;
    const auto* p = static_cast<const std::byte*>((*b)->model().tensor("big")->data());
    // Read up to the bad frame (the stream loads the unit around it), then
    // the rest of that unit and beyond: all right.
    for (uint64_t off = 0; off < big.data.size(); off += 4096) {
      if (off / 65536 == 37) continue;
      if (memcmp(p + off, big.data.data() + off, 4096) != 0) return 4;
    }
    if ((*b)->stats().errors != 1) return 5;
    (void)*static_cast<const volatile std::byte*>(p + 37 * 65536 + 100);  // SIGBUS
    return 0;
  });
  CHECK(WIFSIGNALED(status));
  if (WIFEXITED(status)) CHECK(WEXITSTATUS(status) == 0);  // shows which check failed
  CHECK(WTERMSIG(status) == SIGBUS);
  // Pinning the tensor reports the frame; the other tensors are right.
  auto b = PagedBundle::Open(path, Config(40 << 20));
  REQUIRE(b.ok());
  Status pin = (*b)->Pin(*(*b)->model().tensor("big"));
  CHECK(pin.code() == EIO);
  CHECK(std::string(pin.message()).find("frame 37 cannot be read") != std::string::npos);
  for (size_t i = 1; i < specs.size(); i++) CHECK(ReadSequentially(*(*b)->model().tensor(specs[i].name), specs[i]));
}

TEST_CASE("pins, hints and dont_need work on whole huge units") {
  TempDir dir;
  std::string path = dir / "l.apbundle";
  auto specs = MakeLarge(path);
  auto b = PagedBundle::Open(path, Config(40 << 20));
  REQUIRE(b.ok());
  auto big = *(*b)->model().tensor("big");
  // Pin: every frame loaded, none touched, counted in the budget.
  REQUIRE((*b)->Pin(big).ok());
  PagingStats st = (*b)->stats();
  CHECK(st.resident_bytes == big.size());
  if (HugeUnitsExpected()) CHECK(st.huge_installs == 8);
  for (const auto& s : specs) CHECK(ReadSequentially(*(*b)->model().tensor(s.name), s));
  CHECK((*b)->stats().resident_bytes >= big.size());
  (*b)->Unpin(big);
  // dont_need drops them all, whole huge pages included.
  (*b)->DontNeed(big);
  for (int i = 0; i < 100 && MappingField(big.data(), "AnonHugePages") >= (16u << 20); i++) usleep(1000);
  CHECK((*b)->stats().resident_bytes <= (40u << 20) - big.size() + (2u << 20));
  // A hint for one frame brings one frame; a hint for the tensor brings its
  // units (a fresh mapping: nothing else in flight).
  b = PagedBundle::Open(path, Config(40 << 20));
  REQUIRE(b.ok());
  big = *(*b)->model().tensor("big");
  auto raw = *(*b)->model().tensor("raw");
  // (Loads are counted just before they are installed: wait for residency.)
  (*b)->Prefetch(raw, 65536, 100);
  for (int i = 0; i < 5000 && (*b)->stats().resident_bytes == 0; i++) usleep(1000);
  usleep(20000);
  CHECK((*b)->stats().prefetched == 1);
  CHECK((*b)->stats().resident_bytes == 65536);
  (*b)->Prefetch(big);
  for (int i = 0; i < 5000 && (*b)->stats().resident_bytes < 65536 + big.size(); i++) usleep(1000);
  CHECK((*b)->stats().prefetched == 1 + big.info().frame_count);
  if (HugeUnitsExpected()) CHECK((*b)->stats().huge_installs == 8);
  uint64_t faults = (*b)->stats().faults;
  CHECK(ReadSequentially(big, specs[0]));
  CHECK((*b)->stats().faults == faults);  // all there before the touch
  // A forked child reads them through the same pointers.
  int status = RunInChild([&]() -> int {
    for (const auto& s : specs)
      if (!ReadSequentially(*(*b)->model().tensor(s.name), s)) return 2;
    return 0;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("dont_need drops a tensor's frames and they come back on touch") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(64 << 20));
  REQUIRE(b.ok());
  CheckAll(**b, specs);
  Settle(**b);  // readahead past the last read may still be landing
  uint64_t before = (*b)->stats().resident_bytes;
  auto t = (*b)->model().tensor("layers.1.w");
  (*b)->DontNeed(*t);
  CHECK((*b)->stats().resident_bytes == before - t->info().frame_count * t->info().page_size);
  CheckAll(**b, specs);
}

TEST_CASE("a pinned tensor is never evicted and counts in the budget") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path, 6);
  auto b = PagedBundle::Open(path, Config(24 * 65536, EvictionPolicy::kLru, 1));
  REQUIRE(b.ok());
  auto pinned = (*b)->model().tensor("layers.0.w");
  REQUIRE((*b)->Pin(*pinned).ok());
  for (int round = 0; round < 3; round++) CheckAll(**b, specs);
  PagingStats s = (*b)->stats();
  for (const auto& ts : s.tensors)
    if (ts.tensor == "layers.0.w") CHECK(ts.evictions == 0);
  CHECK(s.evictions > 0);
  (*b)->Unpin(*pinned);
  auto big = PagedBundle::Open(path, Config(4 * 65536, EvictionPolicy::kLru, 1));
  REQUIRE(big.ok());
  CHECK((*big)->Pin(*(*big)->model().tensor("layers.0.w")).code() == ENOSPC);
}

TEST_CASE("plan-aware eviction keeps more of a cyclic pass than LRU") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path, 6);
  const uint64_t weights = TotalBytes(specs);
  auto loads_for = [&](EvictionPolicy policy) {
    PagingConfig c = Config(weights / 2, policy, 1);
    c.prefetch_depth = 0;
    auto b = PagedBundle::Open(path, c);
    REQUIRE(b.ok());
    (*b)->SetPlan((*b)->model().tensors());
    for (int pass = 0; pass < 4; pass++) {
      for (const auto& t : (*b)->model().tensors()) TouchPages(t);
    }
    CheckAll(**b, specs);
    return (*b)->stats().loads;
  };
  uint64_t lru = loads_for(EvictionPolicy::kLru);
  uint64_t plan = loads_for(EvictionPolicy::kPlan);
  MESSAGE("loads: lru ", lru, ", plan ", plan);
  CHECK(plan < lru);
}

TEST_CASE("a plan in steps keeps a layer's tensors together while it runs") {
  // Each layer's bias is touched before its weight, and the weight is read
  // twice (as a GEMM revisits it). With one tensor per plan step, touching
  // the bias makes the weight look finished: it becomes the first victim
  // while the layer still reads it, and the pass loads more. With the layer
  // as one step, the second read of a weight loads nothing.
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path, 6);
  const uint64_t weights = TotalBytes(specs);
  // Returns {all loads, loads during second reads}.
  // plan: 0 one tensor per step, 1 a step per layer, 2 the same by name prefix.
  auto loads_for = [&](int plan) {
    PagingConfig c = Config(weights / 3, EvictionPolicy::kPlan, 1);
    c.prefetch_depth = 0;
    auto b = PagedBundle::Open(path, c);
    REQUIRE(b.ok());
    ModelView m = (*b)->model();
    std::vector<std::vector<TensorView>> layers;
    std::vector<std::string> prefixes;
    for (int l = 0; l < 6; l++) {
      const std::string& p = prefixes.emplace_back("layers." + std::to_string(l) + ".");
      layers.push_back({*m.tensor(p + "w"), *m.tensor(p + "b")});
    }
    if (plan == 2) {
      REQUIRE((*b)->SetPlan(m.info().name, prefixes).ok());
      auto bad = (*b)->SetPlan(m.info().name, {"layers.0.", "decoder."});
      CHECK(bad.code() == ENOENT);
      CHECK(std::string(bad.message()).find("starts with 'decoder.'") != std::string::npos);
      CHECK((*b)->SetPlan("no such model", prefixes).code() == ENOENT);
    } else if (plan == 1) {
      (*b)->SetPlan(layers);
    } else {
      std::vector<TensorView> order;
      for (auto& l : layers) order.insert(order.end(), l.begin(), l.end());
      (*b)->SetPlan(order);
    }
    auto loads_of = [&](const TensorView& t) {
      for (const auto& ts : (*b)->stats().tensors)
        if (ts.tensor == t.name()) return ts.loads;
      return uint64_t{0};
    };
    uint64_t again = 0;
    for (int pass = 0; pass < 3; pass++)
      for (auto& l : layers) {
        (*b)->Advance(l[0]);
        TouchPages(l[1]);
        TouchPages(l[0]);
        uint64_t before = loads_of(l[0]);
        TouchPages(l[0]);
        again += loads_of(l[0]) - before;
      }
    uint64_t total = (*b)->stats().loads;
    CheckAll(**b, specs);
    return std::pair{total, again};
  };
  auto [steps_loads, steps_again] = loads_for(1);
  auto [flat_loads, flat_again] = loads_for(0);
  auto [prefix_loads, prefix_again] = loads_for(2);
  CHECK(prefix_again == 0);
  CHECK(prefix_loads < flat_loads);
  MESSAGE("loads: steps ", steps_loads, " (", steps_again, " during second reads), one tensor per step ", flat_loads,
          " (", flat_again, ")");
  CHECK(steps_again == 0);
  CHECK(steps_loads < flat_loads);
}

TEST_CASE("a plan recorded from the first pass is installed") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(64 << 20, EvictionPolicy::kPlan));
  REQUIRE(b.ok());
  (*b)->StartRecordingPlan();
  CheckAll(**b, specs);
  (*b)->StopRecordingPlan();
  // A second pass after dropping everything: plan-driven prefetch loads
  // tensors before they are touched.
  for (const auto& t : (*b)->model().tensors()) (*b)->DontNeed(t);
  uint64_t prefetched = (*b)->stats().prefetched;
  CheckAll(**b, specs);
  CHECK((*b)->stats().prefetched > prefetched);
}

TEST_CASE("tensors are found by name and by layer prefix, with clear errors") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(1 << 20));
  REQUIRE(b.ok());
  auto m = (*b)->model("m");
  REQUIRE(m.ok());
  CHECK(m->layer("layers.1.").size() == 2);
  CHECK(m->tensors().size() == specs.size());
  auto missing = m->tensor("nope");
  CHECK(missing.status().code() == ENOENT);
  CHECK(std::string(missing.status().message()).find("'nope'") != std::string::npos);
  CHECK((*b)->model("other").status().code() == ENOENT);
  CHECK(m->tensor("layers.1.w")->dtype() == DType::kF32);
  CHECK(m->tensor("layers.1.w")->shape() == std::vector<uint64_t>{256, 1024});
}

TEST_CASE("a forked child reads the parent's tensors through the same pointers") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto b = PagedBundle::Open(path, Config(4 * 65536));
  REQUIRE(b.ok());
  std::vector<TensorView> views;
  for (const auto& sp : specs) views.push_back(*(*b)->model().tensor(sp.name));
  // Some resident, some not, at the fork.
  for (size_t i = 0; i < views.size(); i += 2)
    if (views[i].size()) (void)*static_cast<const volatile std::byte*>(views[i].data());
  int status = RunInChild([&]() -> int {
    for (int pass = 0; pass < 2; pass++)
      for (size_t i = 0; i < specs.size(); i++)
        if (!specs[i].data.empty() && memcmp(views[i].data(), specs[i].data.data(), specs[i].data.size()) != 0)
          return 2;
    return 0;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  for (size_t i = 0; i < specs.size(); i++)
    if (!specs[i].data.empty()) CHECK(memcmp(views[i].data(), specs[i].data.data(), specs[i].data.size()) == 0);
}

TEST_CASE("one bundle opened twice gives two independent mappings") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  auto a = PagedBundle::Open(path, Config(4 * 65536));
  auto b = PagedBundle::Open(path, Config(4 * 65536));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK((*a)->model().tensor("tiny")->data() != (*b)->model().tensor("tiny")->data());
  std::thread ta([&] { CheckAll(**a, specs); });
  std::thread tb([&] { CheckAll(**b, specs); });
  ta.join();
  tb.join();
}

// Whether any mapping in /proc/self/maps contains `addr`, or is named `name`.
bool Mapped(const void* addr, const char* name = nullptr) {
  std::ifstream in("/proc/self/maps");
  std::string line;
  auto a = reinterpret_cast<uintptr_t>(addr);
  while (std::getline(in, line)) {
    unsigned long lo, hi;
    if (sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && a >= lo && a < hi) return true;
    if (name && line.find(name) != std::string::npos) return true;
  }
  return false;
}

TEST_CASE("closing a bundle leaves no threads, descriptors or mappings behind") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  {  // warm up lazily created process-wide state (io_uring probe, thread-local rings)
    auto b = PagedBundle::Open(path, Config(1 << 20));
    CheckAll(**b, specs);
  }
  int fds = CountDir("/proc/self/fd"), tasks = CountDir("/proc/self/task");
  std::vector<const void*> regions;
  for (int i = 0; i < 5; i++) {
    auto b = PagedBundle::Open(path, Config(1 << 20));
    REQUIRE(b.ok());
    CheckAll(**b, specs);
    regions.push_back((*b)->model().tensor("layers.0.w")->data());
    CHECK(Mapped(regions.back()));
  }
  CHECK(CountDir("/proc/self/fd") == fds);
  CHECK(CountDir("/proc/self/task") == tasks);
  for (const void* r : regions) CHECK_FALSE(Mapped(r));
  CHECK_FALSE(Mapped(nullptr, "faultline-guard"));
}

TEST_CASE("closing a bundle right after hints never hangs") {
  // Workers busy with prefetch when the bundle closes: every one of them
  // must see the stop (a worker that read the only wake-up once left the
  // others asleep).
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  for (int round = 0; round < 300; round++) {
    auto b = PagedBundle::Open(path, Config(1 << 20, EvictionPolicy::kLru, 1 + round % 4));
    REQUIRE(b.ok());
    for (const auto& s : specs) (*b)->Prefetch(*(*b)->model().tensor(s.name));
    if (round % 3 == 0) (void)*static_cast<const volatile std::byte*>((*b)->model().tensor("layers.1.w")->data());
  }
}

TEST_CASE("running out of file descriptors fails the open with a clear error") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  MakeModel(path);
  int status = RunInChild([&]() -> int {
    // Leave exactly one free descriptor: the bundle file opens, nothing
    // after it can.
    int used = CountDir("/proc/self/fd") - 3;
    int highest = 0;
    if (DIR* d = opendir("/proc/self/fd")) {
      while (dirent* e = readdir(d)) highest = std::max(highest, atoi(e->d_name));
      closedir(d);
    }
    (void)used;
    rlimit lim = {static_cast<rlim_t>(highest + 2), static_cast<rlim_t>(highest + 2)};
    setrlimit(RLIMIT_NOFILE, &lim);
    int last = -1;
    for (int fd; (fd = open("/dev/null", O_RDONLY)) >= 0;) last = fd;
    close(last);  // exactly one descriptor left
    auto b = PagedBundle::Open(path, Config(1 << 20));
    if (b.ok()) return 2;
    if (b.status().code() != EMFILE) return 3;
    if (strlen(b.status().message()) == 0) return 4;
    return 0;
  });
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("closing a bundle while a thread reads it ends that thread's reads with SIGSEGV") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  int status = RunInChild([&]() -> int {
    signal(SIGSEGV, SIG_DFL);
    auto b = PagedBundle::Open(path, Config(4 * 65536));
    if (!b.ok()) return 3;
    std::vector<TensorView> views = (*b)->model().tensors();
    std::atomic<bool> started{false};
    std::thread reader([&] {
      for (;;)
        for (size_t i = 0; i < views.size(); i++) {
          const auto* p = views[i].as<uint8_t>();
          uint64_t sum = 0;
          for (uint64_t k = 0; k < views[i].size(); k += 512) sum += p[k];
          if (!specs[i].data.empty() && sum == 0 && p[0] != static_cast<uint8_t>(specs[i].data[0])) _exit(4);
          started = true;
        }
    });
    while (!started) usleep(100);
    b->reset();  // close under the reader's feet
    usleep(200 * 1000);
    _exit(5);  // the reader should have died by now (and is never joined)
  });
  CHECK(WIFSIGNALED(status));
  if (WIFSIGNALED(status)) CHECK(WTERMSIG(status) == SIGSEGV);
}

#if defined(__SANITIZE_ADDRESS__)
#define FL_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_UNDER_ASAN 1
#endif
#endif

TEST_CASE("running out of address space fails the open with ENOMEM") {
#ifndef FL_UNDER_ASAN  // the sanitizer reserves terabytes of shadow memory
  TempDir dir;
  std::string path = dir / "m.apbundle";
  MakeModel(path);
  int status = RunInChild([&]() -> int {
    // Allow the process what it has now plus 4 MiB: less than the tensors' range.
    std::ifstream in("/proc/self/status");
    std::string line;
    unsigned long vm_kb = 0;
    while (std::getline(in, line))
      if (sscanf(line.c_str(), "VmSize: %lu kB", &vm_kb) == 1) break;
    rlimit lim = {static_cast<rlim_t>(vm_kb * 1024 + (4 << 20)), static_cast<rlim_t>(vm_kb * 1024 + (4 << 20))};
    setrlimit(RLIMIT_AS, &lim);
    auto b = PagedBundle::Open(path, Config(1 << 20));
    if (b.ok()) return 2;
    if (b.status().code() != ENOMEM && b.status().code() != EAGAIN) return 3;
    return 0;
  });
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
#endif
}

TEST_CASE("where seccomp forbids userfaultfd, auto mode falls back to guard pages") {
  TempDir dir;
  std::string path = dir / "m.apbundle";
  auto specs = MakeModel(path);
  int status = RunInChild([&]() -> int {
    if (!DenyUserfaultfd())
      return 77;
    PagingConfig c = Config(4 * 65536);
    c.mode = PagingMode::kAuto;
    auto b = PagedBundle::Open(path, c);
    if (!b.ok()) return 2;
    if ((*b)->mode() != PagingMode::kGuard) return 3;
    for (const auto& s : specs) {
      auto t = (*b)->model().tensor(s.name);
      if (!s.data.empty() && memcmp(t->data(), s.data.data(), s.data.size()) != 0) return 4;
    }
    c.mode = PagingMode::kUffd;  // asked for explicitly: an error, not a fallback
    auto u = PagedBundle::Open(path, c);
    if (u.ok() || u.status().code() != EPERM) return 5;
    return 0;
  });
  REQUIRE(WIFEXITED(status));
  if (WEXITSTATUS(status) != 77) CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a bad bundle or option is refused with a clear error") {
  TempDir dir;
  WriteFileBytes(dir / "junk.apbundle", "junk", 4);
  auto b = PagedBundle::Open(dir / "junk.apbundle", Config(1 << 20));
  CHECK_FALSE(b.ok());
  CHECK(std::string(b.status().message()).find("junk.apbundle") != std::string::npos);
  std::string path = dir / "m.apbundle";
  MakeModel(path);
  PagingConfig c = Config(1 << 20);
  c.mode = PagingMode::kMmap;
  auto m = PagedBundle::Open(path, c);
  REQUIRE_FALSE(m.ok());
  CHECK(std::string(m.status().message()).find("needs a raw bundle") != std::string::npos);
}

TEST_CASE("mmap mode maps a raw bundle straight from the file") {
  TempDir dir;
  std::string path = dir / "raw.apbundle";
  TensorOptions raw;
  raw.codec = Codec::kRaw;
  std::vector<Spec> specs = {MakeSpec("a", DType::kF32, {100000}, raw, 1),
                             MakeSpec("b", DType::kU8, {5}, raw, 2)};
  REQUIRE(BuildBundle(path, "m", specs).ok());
  PagingConfig c = Config(1 << 20);
  c.mode = PagingMode::kMmap;
  auto b = PagedBundle::Open(path, c);
  REQUIRE_MESSAGE(b.ok(), b.status().ToString());
  CHECK((*b)->mode() == PagingMode::kMmap);
  CheckAll(**b, specs);
}

TEST_CASE("mmap mode maps large tensors in whole huge pages where the page cache has them") {
  // Whether this kernel and filesystem map a file's large folios by PMD:
  // a file written in one 8 MiB write, mapped at a 2 MiB-aligned address.
  TempDir dir;
  const uint64_t kHuge = 2u << 20;
  uint64_t reference = 0;
  {
    std::string ref = dir / "ref.bin";
    auto bytes = RandomBytes(8u << 20, 9, false);
    WriteFileBytes(ref, bytes);
    int fd = open(ref.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    void* r = mmap(nullptr, (8u << 20) + kHuge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    REQUIRE(r != MAP_FAILED);
    auto* at = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(r) + kHuge - 1) & ~(kHuge - 1));
    REQUIRE(mmap(at, 8u << 20, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) == at);
    volatile char sink = 0;
    for (uint64_t off = 0; off < (8u << 20); off += 4096) sink = sink + at[off];
    reference = MappingField(at, "FilePmdMapped");
    munmap(r, (8u << 20) + kHuge);
    close(fd);
  }
  std::string path = dir / "raw.apbundle";
  TensorOptions raw;
  raw.codec = Codec::kRaw;
  std::vector<Spec> specs = {MakeSpec("small", DType::kU8, {12345}, raw, 1),
                             MakeSpec("big", DType::kBF16, {4u << 20}, raw, 2, false),
                             MakeSpec("odd", DType::kU8, {(3u << 20) + 999}, raw, 3)};
  REQUIRE(BuildBundle(path, "m", specs).ok());
  PagingConfig c = Config(1 << 20);
  c.mode = PagingMode::kMmap;
  auto b = PagedBundle::Open(path, c);
  REQUIRE_MESSAGE(b.ok(), b.status().ToString());
  CheckAll(**b, specs);
  auto big = (*b)->model().tensor("big");
  REQUIRE(big.ok());
  CHECK(reinterpret_cast<uintptr_t>(big->data()) % 4096 == 0);
  if (reference == 0) {
    MESSAGE("this kernel or filesystem maps no file pages by PMD; only the data was checked");
  } else {
    // A fresh bundle's page cache holds large folios (the writer writes
    // 2 MiB-aligned chunks), and the tensor's addresses match its file
    // offsets modulo 2 MiB, so at least two of its 8 MiB map whole.
    CHECK(MappingField(big->data(), "FilePmdMapped") >= 2 * kHuge);
  }
}

TEST_CASE("environment options override the defaults and bad values keep them") {
  setenv("FAULTLINE_BUDGET", "256M", 1);
  setenv("FAULTLINE_POLICY", "plan", 1);
  setenv("FAULTLINE_MODE", "guard", 1);
  setenv("FAULTLINE_PREFETCH", "3", 1);
  PagingConfig c = PagingConfig::FromEnvironment();
  CHECK(c.max_resident == 256ull << 20);
  CHECK(c.policy == EvictionPolicy::kPlan);
  CHECK(c.mode == PagingMode::kGuard);
  CHECK(c.prefetch_depth == 3);
  setenv("FAULTLINE_BUDGET", "lots", 1);
  setenv("FAULTLINE_POLICY", "random", 1);
  setenv("FAULTLINE_WORKERS", "-2", 1);
  c = PagingConfig::FromEnvironment();
  CHECK(c.max_resident == kDefaultBudget);
  CHECK(c.policy == EvictionPolicy::kLru);
  CHECK(c.workers == 0);
  for (const char* v : {"FAULTLINE_BUDGET", "FAULTLINE_POLICY", "FAULTLINE_MODE", "FAULTLINE_PREFETCH",
                        "FAULTLINE_WORKERS"})
    unsetenv(v);
}

int main(int argc, char** argv) {
  const char* mode = getenv("FAULTLINE_TEST_MODE");
  if (mode && !strcmp(mode, "guard")) {
    g_mode = PagingMode::kGuard;
  } else {
    g_mode = PagingMode::kUffd;
    if (!faultline::internal::UffdAvailable()) {
      fprintf(stderr, "userfaultfd is not available here: skipping the uffd pager suite\n");
      return 77;
    }
  }
  doctest::Context context(argc, argv);
  return context.run();
}
