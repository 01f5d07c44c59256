// Managed memory: ManagedRegion and the heap API under budgets far below
// what they hold; every byte checked against a reference, with threads,
// with fork, with writes racing evictions; clean and zero chunks never
// written; a bad spill read is SIGBUS. Exits 77 where userfaultfd (with
// write-protect faults) is not allowed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "alloc/engine.h"
#include "core/tsan.h"
#include "faultline/alloc.hpp"
#include "faultline/faultline.h"
#include "helpers.h"
#include "os/meminfo.h"
#include "os/uffd.h"

using namespace faultline;
using namespace faultline::test;

namespace {

AllocConfig Config(uint64_t budget) {
  AllocConfig c;
  c.budget = budget;
  c.zstd_level = 1;
  return c;
}

// A value for byte i after `round` rounds of writes: checkable anywhere.
inline uint8_t Expect(size_t i, uint32_t round) {
  return round == 0 ? 0 : static_cast<uint8_t>((i * 2654435761u >> 7) + round * 31);
}

// `threads` threads write random 4 KiB pages of their own stripe of the
// region and read back random ones, each against its own record of rounds.
void Hammer(uint8_t* base, size_t size, int threads, int ops, std::vector<uint32_t>& rounds, uint64_t seed) {
  size_t pages = size / 4096;
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      for (int k = 0; k < ops; k++) {
        size_t pg = (rng() % (pages / threads)) * threads + t;  // page pg belongs to thread pg % threads
        uint8_t* p = base + pg * 4096;
        if (rng() % 2) {
          uint32_t r = ++rounds[pg];
          for (size_t i = 0; i < 4096; i++) p[i] = Expect(pg * 4096 + i, r);
        } else {
          for (size_t i = 0; i < 4096; i += 97)
            if (p[i] != Expect(pg * 4096 + i, rounds[pg])) {
              bad++;
              break;
            }
        }
      }
    });
  }
  for (auto& th : ts) th.join();
  CHECK(bad.load() == 0);
}

// Every page against its record.
size_t CountBad(const uint8_t* base, size_t size, const std::vector<uint32_t>& rounds) {
  size_t bad = 0;
  for (size_t pg = 0; pg < size / 4096; pg++)
    for (size_t i = 0; i < 4096; i++)
      if (base[pg * 4096 + i] != Expect(pg * 4096 + i, rounds[pg])) {
        bad++;
        break;
      }
  return bad;
}

}  // namespace

TEST_CASE("random writes and reads from several threads over eight times the budget") {
  const size_t size = 64 << 20;
  auto r = ManagedRegion::Create(size, Config(8 << 20));
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  auto* base = static_cast<uint8_t*>((*r)->data());
  std::vector<uint32_t> rounds(size / 4096, 0);
  Hammer(base, size, 4, 20000, rounds, 1);
  // Touch everything once more in order, so most of it is spilled and back.
  CHECK(CountBad(base, size, rounds) == 0);
  CHECK(CountBad(base, size, rounds) == 0);
  AllocStats s = (*r)->stats();
  MESSAGE(s.ToString());
  CHECK(s.peak_resident_bytes <= (8u << 20));
  CHECK(s.spills > 0);
  CHECK(s.loads > 0);
  CHECK(s.errors == 0);
  CHECK(s.compression_ratio() > 1.0);
}

TEST_CASE("writes that race with eviction are never lost") {
  // Each thread increments its own counters spread over a region 16 times
  // the budget, so evictions constantly write-protect chunks being written.
  const size_t size = 32 << 20;
  auto r = ManagedRegion::Create(size, Config(2 << 20));
  REQUIRE(r.ok());
  auto* words = static_cast<uint64_t*>((*r)->data());
  const int threads = 4, per = 20000;
  const size_t stride = 4096 / 8 * 3;  // a counter every 3 pages
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++)
    ts.emplace_back([&, t] {
      for (int k = 0; k < per; k++) {
        size_t slot = (static_cast<size_t>(k) * threads + t) % (size / 8 / stride);
        words[slot * stride + t] += 1;
      }
    });
  for (auto& th : ts) th.join();
  std::vector<uint64_t> want(size / 8 / stride * threads, 0);
  for (int t = 0; t < threads; t++)
    for (int k = 0; k < per; k++) want[((static_cast<size_t>(k) * threads + t) % (size / 8 / stride)) * threads + t]++;
  size_t bad = 0;
  for (size_t slot = 0; slot < size / 8 / stride; slot++)
    for (int t = 0; t < threads; t++)
      if (words[slot * stride + t] != want[slot * threads + t]) bad++;
  CHECK(bad == 0);
  CHECK((*r)->stats().spills > 0);
}

TEST_CASE("a clean chunk is dropped without writing; zero chunks are never written") {
  const size_t size = 16 << 20;
  auto r = ManagedRegion::Create(size, Config(2 << 20));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  // Reading untouched memory: zeros, nothing spilled.
  size_t sum = 0;
  for (size_t i = 0; i < size; i += 4096) sum += p[i];
  CHECK(sum == 0);
  AllocStats s = (*r)->stats();
  CHECK(s.spills == 0);
  CHECK(s.bytes_stored == 0);
  // Write everything once, then only read: the second sweep's evictions
  // drop clean chunks and write nothing more. (Evict waits for writes
  // still in flight, which a busy machine can leave behind the sweep.)
  for (size_t i = 0; i < size; i += 512) p[i] = static_cast<uint8_t>(i >> 9);
  for (size_t i = 0; i < size; i += 4096) sum += p[i];
  REQUIRE((*r)->Evict(0, size).ok());
  uint64_t spills_after_write = (*r)->stats().spills;
  for (int pass = 0; pass < 2; pass++)
    for (size_t i = 0; i < size; i += 512) REQUIRE(p[i] == static_cast<uint8_t>(i >> 9));
  s = (*r)->stats();
  CHECK(s.spills == spills_after_write);
  CHECK(s.clean_drops > 0);
  CHECK(s.loads > 0);
  // A chunk written back to all zeros is dropped, not written.
  memset(p, 0, size);
  for (size_t i = 0; i < size; i += 4096) REQUIRE(p[i] == 0);
  CHECK((*r)->stats().zero_drops > 0);
}

TEST_CASE("fork: the child sees the parent's data, including spilled chunks, and writes its own copy") {
  const size_t size = 32 << 20;
  auto r = ManagedRegion::Create(size, Config(4 << 20));
  REQUIRE(r.ok());
  auto* base = static_cast<uint8_t*>((*r)->data());
  std::vector<uint32_t> rounds(size / 4096, 0);
  Hammer(base, size, 2, 8000, rounds, 7);
  REQUIRE((*r)->stats().spills > 0);
  int status = RunInChild([&]() -> int {
    if (CountBad(base, size, rounds) != 0) return 2;  // the parent's data, spilled chunks too
    std::vector<uint32_t> mine = rounds;
    std::mt19937_64 rng(99);
    for (int k = 0; k < 4000; k++) {
      size_t pg = rng() % (size / 4096);
      uint32_t rr = mine[pg] += 5;
      for (size_t i = 0; i < 4096; i++) base[pg * 4096 + i] = Expect(pg * 4096 + i, rr);
    }
    if (CountBad(base, size, mine) != 0) return 3;
    return 0;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // The parent's memory did not see the child's writes, and it goes on.
  CHECK(CountBad(base, size, rounds) == 0);
  Hammer(base, size, 2, 4000, rounds, 8);
  CHECK(CountBad(base, size, rounds) == 0);
  // fork + exec works as usual.
  CHECK(Run("true").status == 0);
}

TEST_CASE("a spilled chunk that cannot be read back is SIGBUS, never wrong data") {
  int status = RunInChild([]() -> int {
    signal(SIGBUS, SIG_DFL);
    auto r = ManagedRegion::Create(8 << 20, Config(1 << 20));
    if (!r.ok()) return 3;
    auto* p = static_cast<uint8_t*>((*r)->data());
    for (size_t i = 0; i < (8u << 20); i++) p[i] = static_cast<uint8_t>(i * 7 + 1);
    // Everything on disk now: chunk 0 went long ago, but its write may
    // still be in flight on a busy machine (and would cover the junk).
    if (!(*r)->Evict(0, 8 << 20).ok()) return 7;
    int fd;
    uint64_t off;
    uint32_t len;
    if (!(*r)->engine().SpillLocation(p, &fd, &off, &len)) return 4;
    uint8_t junk[64];
    memset(junk, 0xA5, sizeof junk);
    if (pwrite(fd, junk, sizeof junk, static_cast<off_t>(off)) != sizeof junk) return 5;
    volatile uint8_t v = p[100];  // SIGBUS here
    return v == static_cast<uint8_t>(100 * 7 + 1) ? 6 : 9;  // 9: wrong data
  });
  CHECK_MESSAGE(WIFSIGNALED(status), "the child exited with " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  CHECK(WTERMSIG(status) == SIGBUS);
}

TEST_CASE("the heap API: alloc, realloc without copying through the budget, free, containers") {
  void* small = faultline_alloc(100);
  REQUIRE(small);
  faultline_free(small);
  const size_t n = 8 << 20;
  auto* p = static_cast<uint8_t*>(faultline_alloc(n));
  REQUIRE(p);
  for (size_t i = 0; i < n; i++) p[i] = static_cast<uint8_t>(i * 13);
  auto* q = static_cast<uint8_t*>(faultline_realloc(p, 3 * n));
  REQUIRE(q);
  for (size_t i = 0; i < n; i++) REQUIRE(q[i] == static_cast<uint8_t>(i * 13));
  for (size_t i = n; i < 3 * n; i += 4096) REQUIRE(q[i] == 0);
  q = static_cast<uint8_t*>(faultline_realloc(q, n / 2));
  REQUIRE(q);
  for (size_t i = 0; i < n / 2; i++) REQUIRE(q[i] == static_cast<uint8_t>(i * 13));
  faultline_free(q);
  faultline_free(nullptr);
  CHECK(faultline_alloc(SIZE_MAX / 2) == nullptr);
  {
    std::vector<double, ManagedAllocator<double>> v(4 << 20, 1.5);  // 32 MiB
    double s = 0;
    for (double d : v) s += d;
    CHECK(s == 1.5 * (4 << 20));
  }
  if (HeapManaged()) {
    AllocStats s = HeapStats();
    CHECK(s.allocations >= 2);
    CHECK(s.frees >= 2);
  }
  // Hints on heap memory: the data stays (managed or not); a bad advice and
  // a range that is not mapped are the kernel's errors.
  p = static_cast<uint8_t*>(faultline_alloc(n));
  REQUIRE(p);
  for (size_t i = 0; i < n; i += 4096) p[i] = static_cast<uint8_t>(1 + i / 4096 % 200);
  uint64_t spills = HeapStats().spills;
  CHECK(faultline_advise(p, n, MADV_PAGEOUT) == 0);
  if (HeapManaged()) CHECK(HeapStats().spills > spills);
  CHECK(faultline_advise(p, n, MADV_WILLNEED) == 0);
  CHECK(faultline_advise(p, n, MADV_COLD) == 0);
  for (size_t i = 0; i < n; i += 4096) REQUIRE(p[i] == static_cast<uint8_t>(1 + i / 4096 % 200));
  CHECK(faultline_advise(p, n / 2, MADV_DONTNEED) == 0);
  CHECK(p[0] == 0);
  CHECK(p[n / 2] == static_cast<uint8_t>(1 + (n / 2) / 4096 % 200));
  faultline_free(p);
  CHECK(faultline_advise(reinterpret_cast<void*>(4096), 4096, MADV_WILLNEED) == -ENOMEM);
  alignas(4096) static char page[4096];
  CHECK(faultline_advise(page, 4096, 12345) == -EINVAL);
  CHECK(std::string(faultline_last_error()).size() > 0);
}

TEST_CASE("a managed block grows any number of times and keeps its data, and an absurd size leaves it untouched") {
  REQUIRE(HeapManaged());
  size_t n = 2 << 20;
  auto* p = static_cast<uint8_t*>(faultline_alloc(n));
  REQUIRE(p);
  for (size_t i = 0; i < n; i++) p[i] = static_cast<uint8_t>(i * 7 + 3);
  size_t filled = n;
  // Growth chains as Python lists and sqlite grow them; a hint on part of
  // the block in between makes it two mappings (the kernel splits them).
  for (int round = 0; round < 12; round++) {
    if (round == 3) CHECK(faultline_advise(p + (1 << 20), 1 << 20, MADV_RANDOM) == 0);
    size_t m = n + n / 2 + 4096 * round;
    auto* q = static_cast<uint8_t*>(faultline_realloc(p, m));
    REQUIRE_MESSAGE(q, "grow " << round << " to " << m << " failed: " << std::string(strerror(errno)));
    p = q;
    for (size_t i = 0; i < filled; i += 977) REQUIRE(p[i] == static_cast<uint8_t>(i * 7 + 3));
    for (size_t i = filled; i < m; i++) p[i] = static_cast<uint8_t>(i * 7 + 3);
    filled = n = m;
  }
  size_t bad = 0;
  for (size_t i = 0; i < n; i++) bad += p[i] != static_cast<uint8_t>(i * 7 + 3);
  CHECK(bad == 0);
  // Sizes whose round-up to whole chunks overflows, or past the address
  // space: NULL with ENOMEM, the block as it was (glibc's contract).
  for (size_t absurd : {SIZE_MAX, SIZE_MAX - 4095, SIZE_MAX / 2, size_t(1) << 62}) {
    errno = 0;
    CHECK(faultline_realloc(p, absurd) == nullptr);
    CHECK(errno == ENOMEM);
    CHECK(faultline_alloc(absurd) == nullptr);
  }
  for (size_t i = 0; i < n; i += 4096) REQUIRE(p[i] == static_cast<uint8_t>(i * 7 + 3));
  CHECK(p[n - 1] == static_cast<uint8_t>((n - 1) * 7 + 3));
  faultline_free(p);
}

TEST_CASE("memory whose spill could not fit in the spill directory is refused with ENOMEM") {
  TempDir dir;
  struct statvfs sv;
  REQUIRE(statvfs(dir.path().c_str(), &sv) == 0);
  uint64_t avail = static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
  uint64_t size = avail + (64ull << 30);  // more than the disk could take beyond the budget
  if (size > (64ull << 40)) return;       // a disk this large: the address space runs out first
  AllocConfig c = Config(1 << 20);
  c.spill_dir = dir.path();
  auto r = ManagedRegion::Create(size, c);
  CHECK(r.status().code() == ENOMEM);
  MESSAGE(std::string(r.status().message()));
  if (HeapManaged()) {
    errno = 0;
    CHECK(faultline_alloc(size) == nullptr);
    CHECK(errno == ENOMEM);
    bool threw = false;
    try {
      std::vector<char, ManagedAllocator<char>> v(size);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST_CASE("usage of a byte range: resident, spilled and zero bytes, faults and evictions of its chunks") {
  const size_t chunk = 64 << 10, size = 64 * chunk;
  auto r = ManagedRegion::Create(size, Config(8 * chunk));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  auto usage = [&](size_t off, size_t len) {
    auto u = (*r)->Usage(off, len);
    REQUIRE(u.ok());
    CHECK(u->resident_bytes + u->spilled_bytes + u->zero_bytes == len);
    return *u;
  };
  RangeUsage u = usage(0, size);
  CHECK(u.zero_bytes == size);
  CHECK(u.faults == 0);
  // Write the first half (32 chunks through a budget of 8): most of it
  // spills; the second half stays untouched.
  for (size_t i = 0; i < size / 2; i += 4096) memset(p + i, static_cast<int>(1 + i / chunk), 4096);
  RangeUsage first = usage(0, size / 2), second = usage(size / 2, size / 2);
  CHECK(second.zero_bytes == size / 2);
  CHECK(second.faults == 0);
  CHECK(first.faults == 32);
  CHECK(first.resident_bytes <= 8 * chunk);
  CHECK(first.spilled_bytes >= 20 * chunk);
  CHECK(first.evictions >= 20);
  CHECK(first.stored_bytes > 0);
  CHECK(first.stored_bytes < first.spilled_bytes);  // one byte value per chunk: compresses
  // Reading chunk 0 back brings it in: one more fault there, resident now.
  // (Its eviction may still be writing it out under load: wait for that.)
  for (int i = 0; i < 5000 && usage(0, chunk).evictions == 0; i++) usleep(1000);
  CHECK(p[100] == 1);
  RangeUsage c0 = usage(0, chunk);
  CHECK(c0.resident_bytes == chunk);
  CHECK(c0.faults == 2);
  CHECK(c0.evictions == 1);
  // Part of a chunk counts by its bytes; the whole region sums the same.
  CHECK(usage(100, 1000).resident_bytes == 1000);
  RangeUsage all = usage(0, size);
  CHECK(all.faults == first.faults + 1);
  CHECK(all.zero_bytes == size / 2);
  CHECK(usage(size, 0).zero_bytes == 0);
  // A range outside the region is named.
  auto bad = (*r)->Usage(size - 10, 11);
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == EINVAL);
  CHECK(std::string(bad.status().message()).find("not inside the managed region") != std::string::npos);
  CHECK((*r)->Usage(SIZE_MAX, 2).status().code() == EINVAL);
}

TEST_CASE("hints: Evict spills now, Prefetch reads back ahead of the faults, MADV_COLD goes first") {
  const size_t chunk = 64 << 10, size = 64 * chunk;
  auto r = ManagedRegion::Create(size, Config(16 * chunk));
  REQUIRE(r.ok());
  ManagedRegion& m = **r;
  auto* p = static_cast<uint8_t*>(m.data());
  auto fill = [&](size_t c) { memset(p + c * chunk, static_cast<int>(c + 1), chunk); };
  auto check = [&](size_t c) {
    for (size_t i = 0; i < chunk; i += 4096)
      if (p[c * chunk + i] != static_cast<uint8_t>(c + 1)) return false;
    return true;
  };
  for (size_t c = 0; c < 8; c++) fill(c);
  // Evict: the first four chunks leave at once, data kept.
  REQUIRE(m.Evict(0, 4 * chunk).ok());
  RangeUsage u = *m.Usage(0, 4 * chunk);
  CHECK(u.resident_bytes == 0);
  CHECK(u.spilled_bytes == 4 * chunk);
  CHECK(m.Usage(4 * chunk, 4 * chunk)->resident_bytes == 4 * chunk);
  uint64_t spills = m.stats().spills;
  CHECK(spills >= 4);
  // Prefetch: read back by the background thread, no fault of this thread's.
  REQUIRE(m.Prefetch(0, 4 * chunk).ok());
  for (int i = 0; i < 10000 && m.Usage(0, 4 * chunk)->resident_bytes < 4 * chunk; i++) usleep(1000);
  CHECK(m.Usage(0, 4 * chunk)->resident_bytes == 4 * chunk);
  AllocStats s = m.stats();
  CHECK(s.prefetched == 4);
  uint64_t loads = s.loads;
  for (size_t c = 0; c < 8; c++) CHECK(check(c));
  CHECK(m.stats().loads == loads);  // all there: reading faulted nothing in
  // Evicting clean chunks (their copy is on disk) writes nothing.
  REQUIRE(m.Evict(0, 4 * chunk).ok());
  CHECK(m.stats().spills == spills);
  CHECK(m.stats().clean_drops >= 4);
  // Prefetching what is resident or never written does nothing.
  REQUIRE(m.Prefetch(4 * chunk, size - 4 * chunk).ok());
  usleep(20000);
  CHECK(m.stats().prefetched == 4);
  // MADV_COLD: chunks 4..5 become the oldest, so filling the budget with
  // new chunks evicts them before 6..7 (written earlier than 8..).
  REQUIRE(m.engine().Advise(p + 4 * chunk, 2 * chunk, MADV_COLD) == 0);
  for (size_t c = 8; c < 8 + 10; c++) fill(c);  // 14 resident: the evictor takes two (low water 12)
  for (int i = 0; i < 10000 && m.Usage(4 * chunk, 2 * chunk)->resident_bytes > 0; i++) usleep(1000);
  CHECK(m.Usage(4 * chunk, 2 * chunk)->resident_bytes == 0);
  CHECK(m.Usage(6 * chunk, 2 * chunk)->resident_bytes == 2 * chunk);
  for (size_t c = 0; c < 8 + 10; c++) CHECK(check(c));
  // Evict after Prefetch: the queued reads of that range are dropped, so
  // nothing comes back by itself afterwards.
  REQUIRE(m.Evict(0, size).ok());
  REQUIRE(m.Prefetch(0, 8 * chunk).ok());
  REQUIRE(m.Evict(0, 8 * chunk).ok());
  usleep(50000);
  CHECK(m.Usage(0, 8 * chunk)->resident_bytes == 0);
  // Bad ranges are named.
  CHECK(m.Prefetch(size, 1).code() == EINVAL);
  CHECK(m.Evict(1, size).code() == EINVAL);
  CHECK(std::string(m.Evict(1, size).message()).find("not inside the managed region") != std::string::npos);
}

TEST_CASE("reading spilled memory in address order reads ahead; reading it out of order does not") {
  const size_t chunk = 64 << 10, size = 256 * chunk;
  auto r = ManagedRegion::Create(size, Config(64 * chunk));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  for (size_t i = 0; i < size; i += 4096) memset(p + i, static_cast<int>(1 + i / chunk % 250), 4096);  // no chunk all zeros
  REQUIRE((*r)->Evict(0, size).ok());
  // Forwards, one byte per page: chunks are read ahead of the reader. The
  // reader pauses after four chunks (up to 10 s) for the background thread
  // to read what those faults queued: on a busy machine it may otherwise
  // never get ahead of a reader that has the core.
  AllocStats before = (*r)->stats();
  for (size_t i = 0; i < size; i += 4096) {
    REQUIRE(p[i] == static_cast<uint8_t>(1 + i / chunk % 250));
    for (int wait = 0; i == 4 * chunk - 4096 && wait < 10000 && (*r)->stats().prefetched == before.prefetched; wait++)
      usleep(1000);
  }
  AllocStats after = (*r)->stats();
  uint64_t loaded = after.loads - before.loads, ahead = after.prefetched - before.prefetched;
  CHECK(loaded >= 256);  // every chunk came back once, at least
  CHECK(ahead > 0);      // some ahead of the reader (most, on an idle machine)
  // Backwards in strides: nothing looks sequential, nothing is read ahead.
  REQUIRE((*r)->Evict(0, size).ok());
  before = (*r)->stats();
  for (size_t c = 256; c-- > 0;) REQUIRE(p[c * chunk + 7] == static_cast<uint8_t>(1 + c % 250));
  after = (*r)->stats();
  CHECK(after.prefetched == before.prefetched);
  CHECK(after.loads - before.loads == 256);
}

TEST_CASE("incompressible chunks are stored raw, and compressible ones after them compressed again") {
  const size_t chunk = 64 << 10, size = 96 * chunk;
  auto r = ManagedRegion::Create(size, Config(8 * chunk));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  std::mt19937_64 rng(3);
  for (size_t i = 0; i < 40 * chunk; i += 8) {
    uint64_t v = rng();
    memcpy(p + i, &v, 8);
  }
  for (size_t i = 40 * chunk; i < size; i += 4096) memset(p + i, static_cast<int>(i / chunk), 4096);
  REQUIRE((*r)->Evict(0, size).ok());
  RangeUsage noise = *(*r)->Usage(0, 40 * chunk), flat = *(*r)->Usage(48 * chunk, 48 * chunk);
  CHECK(noise.spilled_bytes == 40 * chunk);
  CHECK(noise.stored_bytes == noise.spilled_bytes);  // nothing saved: stored as it is
  CHECK(flat.spilled_bytes == 48 * chunk);
  CHECK(flat.stored_bytes * 10 < flat.spilled_bytes);  // compressing again (tried at chunk 48 at the latest)
  // And it all reads back.
  std::mt19937_64 again(3);
  bool same = true;
  for (size_t i = 0; i < 40 * chunk && same; i += 8) {
    uint64_t v = again(), got;
    memcpy(&got, p + i, 8);
    same = v == got;
  }
  CHECK(same);
  for (size_t i = 40 * chunk; i < size; i += 4096) REQUIRE(p[i] == static_cast<uint8_t>(i / chunk));
}

TEST_CASE("hints and usage over a range of several blocks with gaps between them") {
  const size_t chunk = 64 << 10;
  auto e = internal::AllocEngine::Create(Config(32 * chunk));
  REQUIRE_MESSAGE(e.ok(), e.status().ToString());
  internal::AllocEngine& eng = **e;
  auto* a = static_cast<uint8_t*>(eng.Allocate(4 * chunk, chunk));
  auto* gap = static_cast<uint8_t*>(eng.Allocate(4 * chunk, chunk));
  auto* b = static_cast<uint8_t*>(eng.Allocate(4 * chunk, chunk));
  REQUIRE((a && gap && b));
  REQUIRE(a < gap);
  REQUIRE(gap < b);
  eng.Free(gap);
  memset(a, 1, 4 * chunk);
  memset(b, 2, 4 * chunk);
  size_t span = static_cast<size_t>(b + 4 * chunk - a);
  RangeUsage u = eng.Usage(a, span);
  CHECK(u.resident_bytes == 8 * chunk);  // the freed block's bytes count nowhere
  CHECK(u.faults == 8);
  REQUIRE(eng.Advise(a, span, MADV_PAGEOUT) == 0);
  u = eng.Usage(a, span);
  CHECK(u.resident_bytes == 0);
  CHECK(u.spilled_bytes == 8 * chunk);
  REQUIRE(eng.Advise(a, span, MADV_WILLNEED) == 0);
  for (int i = 0; i < 10000 && eng.Usage(a, span).resident_bytes < 8 * chunk; i++) usleep(1000);
  CHECK(eng.Usage(a, span).resident_bytes == 8 * chunk);
  CHECK(eng.stats().prefetched == 8);
  CHECK((a[0] == 1 && a[4 * chunk - 1] == 1 && b[0] == 2 && b[4 * chunk - 1] == 2));
  CHECK(eng.Usage(a, span).faults == 8);  // all came back ahead of the reads
  // A range past every block, and one over the whole address space.
  CHECK(eng.Usage(b + 4 * chunk, 1 << 20).resident_bytes == 0);
  CHECK(eng.Usage(nullptr, SIZE_MAX).resident_bytes == 8 * chunk);
  CHECK(eng.Advise(nullptr, SIZE_MAX, MADV_COLD) == 0);
  eng.Free(a);
  eng.Free(b);
}

TEST_CASE("a prefetch racing faults and evictions from several threads never loses data") {
  const size_t size = 32 << 20;
  auto r = ManagedRegion::Create(size, Config(4 << 20));
  REQUIRE(r.ok());
  auto* base = static_cast<uint8_t*>((*r)->data());
  std::vector<uint32_t> rounds(size / 4096, 0);
  std::atomic<bool> stop{false};
  std::thread hinter([&] {
    std::mt19937_64 rng(7);
    while (!stop) {
      size_t off = (rng() % (size / (1 << 20))) << 20;
      if (rng() % 3 == 0) (void)(*r)->Evict(off, 1 << 20);
      else (void)(*r)->Prefetch(off, 2 << 20 < size - off ? 2 << 20 : size - off);
    }
  });
  Hammer(base, size, 2, 20000, rounds, 11);
  stop = true;
  hinter.join();
  CHECK(CountBad(base, size, rounds) == 0);
  CHECK((*r)->stats().prefetched > 0);
}

// Whether whole-unit loads can happen here (UFFDIO_MOVE, 2 MiB THP).
bool UnitsAvailable() {
  auto u = internal::Uffd::Open();
  return u.ok() && u->features().move && internal::TransparentHugePageSize() == (2u << 20);
}

TEST_CASE("sequential reads bring whole 2 MiB units back; writes, racing readers and fork keep every byte") {
  // Three parts of 64 MiB, 128 MiB and 64 MiB: random bytes (stored raw),
  // pages written by the hammer (they compress), one byte value per page
  // (compresses well).
  const size_t size = 256 << 20, q = size / 4;
  auto r = ManagedRegion::Create(size, Config(64 << 20));
  REQUIRE(r.ok());
  auto* base = static_cast<uint8_t*>((*r)->data());
  uint8_t* mid = base + q;
  uint8_t* last = base + 3 * q;
  const std::vector<std::byte> noise = RandomBytes(q, 5);
  memcpy(base, noise.data(), q);
  std::vector<uint32_t> rounds(2 * q / 4096, 1);
  for (size_t i = 0; i < 2 * q; i++) mid[i] = Expect(i, 1);
  for (size_t pg = 0; pg < q / 4096; pg++) memset(last + pg * 4096, static_cast<int>(1 + pg % 251), 4096);
  auto others_bad = [&] {
    size_t bad = memcmp(base, noise.data(), q) != 0;
    for (size_t pg = 0; pg < q / 4096; pg++)
      for (size_t i = 0; i < 4096; i += 512) bad += last[pg * 4096 + i] != static_cast<uint8_t>(1 + pg % 251);
    return bad;
  };
  for (int pass = 0; pass < 2; pass++) {
    CHECK(others_bad() == 0);
    CHECK(CountBad(mid, 2 * q, rounds) == 0);
  }
  AllocStats s = (*r)->stats();
  MESSAGE(s.ToString());
  CHECK(s.errors == 0);
  CHECK(s.peak_resident_bytes <= (64u << 20));
  CHECK(s.compression_ratio() > 1.0);
  if (UnitsAvailable()) {
    CHECK(s.unit_loads > 0);
    // The region was written by 64 KiB installs first, whose page tables
    // stay behind: units still go in as huge pages, and the evictor's
    // whole-unit drops feed the next loads.
    CHECK(s.unit_moves > 0);
    CHECK(s.unit_recycled > 0);
  } else {
    CHECK(s.unit_loads == 0);
  }
  // Writers hammer random pages of the middle while a reader sweeps the
  // whole region in order (which loads units): no write is lost, also one
  // that lands between a unit's move and its write protection.
  std::atomic<bool> stop{false};
  std::thread sweeper([&] {
    uint64_t sum = 0;
    FL_TSAN_IGNORE_READS_BEGIN();  // racing the writers is the point: the values read do not matter
    while (!stop)
      for (size_t i = 0; i < size && !stop; i += 4096) sum += base[i];
    FL_TSAN_IGNORE_READS_END();
    CHECK(sum != 1);  // read for real
  });
  Hammer(mid, 2 * q, 2, 30000, rounds, 21);
  stop = true;
  sweeper.join();
  CHECK(CountBad(mid, 2 * q, rounds) == 0);
  CHECK(others_bad() == 0);
  // A forked child reads every unit back (moved in anew in its own memory)
  // and writes its own copy; the parent's memory stays as it was.
  int status = RunInChild([&]() -> int {
    for (int pass = 0; pass < 2; pass++)
      if (CountBad(mid, 2 * q, rounds) != 0 || others_bad() != 0) return 2;
    std::vector<uint32_t> mine = rounds;
    for (size_t pg = 0; pg < 2 * q / 4096; pg += 3) {
      uint32_t rr = mine[pg] += 2;
      for (size_t i = 0; i < 4096; i++) mid[pg * 4096 + i] = Expect(pg * 4096 + i, rr);
    }
    return CountBad(mid, 2 * q, mine) == 0 ? 0 : 3;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(CountBad(mid, 2 * q, rounds) == 0);
  CHECK(others_bad() == 0);
  CHECK((*r)->stats().errors == 0);
}

TEST_CASE("memory written past the budget and then read in order comes back in whole units") {
  // The oldest resident chunks are dirty when the reads start (the last
  // quarter written): room for a unit is made by writing them out, not by
  // falling back to chunks.
  const size_t size = 256 << 20;
  auto r = ManagedRegion::Create(size, Config(64 << 20));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  for (size_t i = 0; i < size; i++) p[i] = Expect(i, 3);
  AllocStats before = (*r)->stats();
  size_t bad = 0;
  for (size_t i = 0; i < size; i++) bad += p[i] != Expect(i, 3);
  CHECK(bad == 0);
  AllocStats after = (*r)->stats();
  MESSAGE(after.ToString());
  CHECK(after.errors == 0);
  const uint64_t loads = after.loads - before.loads, units = after.unit_loads - before.unit_loads;
  CHECK(loads > 0);
  if (UnitsAvailable()) CHECK(units * 32 * 10 >= loads * 9);  // all but stragglers
  else CHECK(units == 0);
}

TEST_CASE("a unit asked for whole comes back whole, whether the background thread or a fault reads it") {
  if (!UnitsAvailable()) return;
  const size_t size = 128 << 20, asked = 16 << 20;
  auto r = ManagedRegion::Create(size, Config(64 << 20));
  REQUIRE(r.ok());
  auto* p = static_cast<uint8_t*>((*r)->data());
  const std::vector<std::byte> noise = RandomBytes(asked, 9);
  memcpy(p, noise.data(), asked);
  for (size_t i = asked; i < size; i += 4096) p[i] = 1;
  REQUIRE((*r)->Evict(0, size).ok());
  AllocStats before = (*r)->stats();
  REQUIRE((*r)->Prefetch(0, asked).ok());
  // Read at once, racing the background thread from the other end.
  for (size_t off = asked; off > 0; off -= 64 << 10) CHECK(memcmp(p + off - (64 << 10), noise.data() + off - (64 << 10), 64 << 10) == 0);
  AllocStats after = (*r)->stats();
  CHECK(after.unit_loads - before.unit_loads == asked / (2 << 20));
  CHECK(after.loads - before.loads == asked / (64 << 10));
}

TEST_CASE("a bad chunk in a unit read whole: the chunks before it read right, it is SIGBUS") {
  if (!UnitsAvailable()) return;
  int status = RunInChild([]() -> int {
    signal(SIGBUS, SIG_DFL);
    const size_t size = 128 << 20, chunk = 64 << 10;
    auto r = ManagedRegion::Create(size, Config(64 << 20));
    if (!r.ok()) return 3;
    auto* p = static_cast<uint8_t*>((*r)->data());
    for (size_t i = 0; i < size; i++) p[i] = static_cast<uint8_t>(i * 7 + 1);
    if (!(*r)->Evict(0, size).ok()) return 4;
    int fd;
    uint64_t off;
    uint32_t len;
    if (!(*r)->engine().SpillLocation(p + 5 * chunk, &fd, &off, &len)) return 5;
    uint8_t junk[64];
    memset(junk, 0xA5, sizeof junk);
    if (pwrite(fd, junk, sizeof junk, static_cast<off_t>(off)) != sizeof junk) return 6;
    // Read from the block's start: its first unit is tried whole, fails its
    // check, and its chunks come back one by one.
    for (size_t i = 0; i < 5 * chunk; i++)
      if (p[i] != static_cast<uint8_t>(i * 7 + 1)) return 7;
    volatile uint8_t v = p[5 * chunk + 100];  // SIGBUS here
    (void)v;
    return 8;
  });
  CHECK_MESSAGE(WIFSIGNALED(status), "the child exited with " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  CHECK(WTERMSIG(status) == SIGBUS);
}

TEST_CASE("whole-unit loads can be turned off") {
  AllocConfig c = Config(64 << 20);
  c.huge_units = false;
  const size_t size = 128 << 20;
  auto r = ManagedRegion::Create(size, c);
  REQUIRE(r.ok());
  auto* base = static_cast<uint8_t*>((*r)->data());
  for (size_t i = 0; i < size; i += 4096) base[i] = static_cast<uint8_t>(i / 4096 + 1);
  for (int pass = 0; pass < 2; pass++)
    for (size_t i = 0; i < size; i += 4096) REQUIRE(base[i] == static_cast<uint8_t>(i / 4096 + 1));
  CHECK((*r)->stats().loads > 0);
  CHECK((*r)->stats().unit_loads == 0);
}

TEST_CASE("bad arguments get errors") {
  CHECK(ManagedRegion::Create(0, Config(1 << 20)).status().code() == EINVAL);
  for (size_t absurd : {SIZE_MAX, SIZE_MAX - 65535, SIZE_MAX / 2}) {
    auto big = ManagedRegion::Create(absurd, Config(1 << 20));
    CHECK(big.status().code() == ENOMEM);
    CHECK(std::string(big.status().message()).find("address space") != std::string::npos);
  }
  AllocConfig c = Config(1 << 20);
  c.spill_dir = "/nonexistent/dir";
  auto r = ManagedRegion::Create(1 << 20, c);
  CHECK(r.status().code() == ENOENT);
  CHECK(std::string(r.status().message()).find("/nonexistent/dir") != std::string::npos);
}

int main(int argc, char** argv) {
  auto probe = ManagedRegion::Create(1 << 20, Config(1 << 20));
  if (!probe.ok()) {
    fprintf(stderr, "skipped: %s\n", probe.status().message());
    return 77;
  }
  probe->reset();
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
