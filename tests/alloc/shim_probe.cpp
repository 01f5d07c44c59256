// An ordinary program (it does not link faultline) that the shim test runs
// under LD_PRELOAD=libfaultline-preload.so. Modes:
//   contract           every allocation function's contract
//   work MIB THREADS   large blocks totalling MIB, random writes and reads
//                      from THREADS threads, small-allocation churn, a fork
//                      in the middle (the child checks and writes its own
//                      copy) and a fork + exec; every byte checked
//   denied             seccomp denies userfaultfd first: everything must
//                      still work (from the system allocator)
// Exit 0 when everything held; otherwise it names the first failure.
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "../helpers.h"

namespace {

int g_failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "shim_probe: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      g_failures++;                                                   \
    }                                                                 \
  } while (0)

bool Aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

bool AllZero(const void* p, size_t n) {
  auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; i += 1024)
    if (b[i]) return false;
  return b[n - 1] == 0;
}

void Contract() {
  const size_t big = 8 << 20, small = 100;
  for (size_t n : {small, big}) {
    void* p = malloc(n);
    EXPECT(p && Aligned(p, alignof(max_align_t)));
    EXPECT(malloc_usable_size(p) >= n);
    memset(p, 0x5A, n);
    free(p);
    void* c = calloc(n, 1);
    EXPECT(c && AllZero(c, n));
    free(c);
    for (size_t a : {size_t(16), size_t(64), size_t(4096), size_t(1) << 16, size_t(1) << 20}) {
      void* q = nullptr;
      EXPECT(posix_memalign(&q, a, n) == 0 && q && Aligned(q, a));
      free(q);
      q = aligned_alloc(a, n);
      EXPECT(q && Aligned(q, a));
      free(q);
      q = memalign(a, n);
      EXPECT(q && Aligned(q, a));
      free(q);
    }
    void* v = valloc(n);
    EXPECT(v && Aligned(v, 4096));
    free(v);
    v = pvalloc(n);
    EXPECT(v && Aligned(v, 4096) && malloc_usable_size(v) >= (n + 4095) / 4096 * 4096);
    free(v);
  }
  // realloc: grow and shrink, across the threshold both ways, contents kept.
  auto* r = static_cast<unsigned char*>(malloc(1000));
  for (int i = 0; i < 1000; i++) r[i] = static_cast<unsigned char>(i);
  r = static_cast<unsigned char*>(realloc(r, 16 << 20));  // small -> managed
  EXPECT(r != nullptr);
  for (int i = 0; i < 1000; i++) EXPECT(r[i] == static_cast<unsigned char>(i));
  memset(r + 1000, 7, (16 << 20) - 1000);
  r = static_cast<unsigned char*>(realloc(r, 48 << 20));  // managed grows
  EXPECT(r && r[5] == 5 && r[(16 << 20) - 1] == 7);  // realloc need not zero what it adds
  r = static_cast<unsigned char*>(realloc(r, 2 << 20));  // managed shrinks
  EXPECT(r && r[999] == static_cast<unsigned char>(999) && r[(2 << 20) - 1] == 7);
  r = static_cast<unsigned char*>(reallocarray(r, 4, 1 << 20));
  EXPECT(r && r[999] == static_cast<unsigned char>(999));
  free(r);
  EXPECT(realloc(nullptr, 10) != nullptr);  // leaks 10 bytes, as intended
  free(nullptr);
  // Huge and overflowing sizes fail cleanly.
  volatile size_t huge = SIZE_MAX / 2;  // volatile: the compiler must not see the overflow
  errno = 0;
  EXPECT(malloc(huge) == nullptr && errno == ENOMEM);
  errno = 0;
  EXPECT(calloc(huge, 4) == nullptr && errno == ENOMEM);
  errno = 0;
  EXPECT(reallocarray(nullptr, huge, 4) == nullptr && errno == ENOMEM);
  void* q = nullptr;
  EXPECT(posix_memalign(&q, 3, 64) == EINVAL);
  EXPECT(posix_memalign(&q, 64, SIZE_MAX / 2) == ENOMEM);
  EXPECT(malloc_usable_size(nullptr) == 0);
  // madvise on a large block: huge-page advice is accepted, dropping pages
  // gives zeros, as on any private anonymous memory.
  auto* m = static_cast<unsigned char*>(aligned_alloc(4096, 4 << 20));  // madvise wants page alignment
  memset(m, 9, 4 << 20);
  EXPECT(madvise(m, 4 << 20, MADV_HUGEPAGE) == 0);
  EXPECT(madvise(m + (1 << 20), 1 << 20, MADV_DONTNEED) == 0);
  EXPECT(m[0] == 9 && m[(1 << 20) - 1] == 9 && AllZero(m + (1 << 20), 1 << 20) && m[2 << 20] == 9);
  // Hints keep the data: MADV_PAGEOUT spills it now, MADV_WILLNEED reads it
  // back in the background, MADV_COLD puts it first in line to go.
  EXPECT(madvise(m, 1 << 20, MADV_PAGEOUT) == 0);
  EXPECT(madvise(m, 1 << 20, MADV_WILLNEED) == 0);
  EXPECT(madvise(m + (2 << 20), 2 << 20, MADV_COLD) == 0);
  EXPECT(m[0] == 9 && m[(1 << 20) - 1] == 9 && AllZero(m + (1 << 20), 1 << 20) && m[2 << 20] == 9 &&
         m[(4 << 20) - 1] == 9);
  free(m);
  // C++.
  auto* arr = new double[2 << 20];  // 16 MiB
  arr[0] = 1;
  arr[(2 << 20) - 1] = 2;
  delete[] arr;
  struct alignas(256) Wide {
    char b[256];
  };
  auto* w = new Wide[100000];
  EXPECT(Aligned(w, 256));
  delete[] w;
  auto* one = new (std::nothrow) int(3);
  EXPECT(one && *one == 3);
  delete one;
  EXPECT(new (std::nothrow) char[SIZE_MAX / 4] == nullptr);
  bool threw = false;
  try {
    volatile size_t huge = SIZE_MAX / 4;
    char* x = new char[huge];
    delete[] x;
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  EXPECT(threw);
}

uint8_t Value(size_t block, size_t i, uint32_t round) {
  return static_cast<uint8_t>((block * 131 + i * 2654435761u / 4096 + round * 17) | 1);
}

int Work(size_t mib, int threads) {
  const size_t block_size = 8 << 20;
  size_t blocks = mib * (1 << 20) / block_size;
  std::vector<uint8_t*> b(blocks);
  std::vector<uint32_t> rounds(blocks * (block_size / 4096), 0);
  for (size_t k = 0; k < blocks; k++) {
    b[k] = static_cast<uint8_t*>(k % 2 ? calloc(block_size, 1) : malloc(block_size));
    if (!b[k]) return 10;
    if (k % 2 == 0) memset(b[k], 0, block_size);
  }
  auto page_of = [&](size_t k, size_t pg) -> uint32_t& { return rounds[k * (block_size / 4096) + pg]; };
  auto check_all = [&](const std::vector<uint32_t>& r) {
    size_t bad = 0;
    for (size_t k = 0; k < blocks; k++)
      for (size_t pg = 0; pg < block_size / 4096; pg++) {
        uint32_t round = r[k * (block_size / 4096) + pg];
        for (size_t i = 0; i < 4096; i += 509)
          if (b[k][pg * 4096 + i] != (round ? Value(k, pg * 4096 + i, round) : 0)) {
            bad++;
            break;
          }
      }
    return bad;
  };
  auto hammer = [&](int ops, uint64_t seed) {
    std::vector<std::thread> ts;
    std::atomic<size_t> bad{0};
    for (int t = 0; t < threads; t++)
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(seed + t);
        std::vector<void*> smalls;
        for (int op = 0; op < ops; op++) {
          size_t k = rng() % blocks;
          size_t pg = (rng() % (block_size / 4096 / threads)) * threads + t;  // this thread's pages
          uint8_t* p = b[k] + pg * 4096;
          if (rng() % 2) {
            uint32_t r = ++page_of(k, pg);
            for (size_t i = 0; i < 4096; i++) p[i] = Value(k, pg * 4096 + i, r);
          } else {
            uint32_t r = page_of(k, pg);
            for (size_t i = 0; i < 4096; i += 331)
              if (p[i] != (r ? Value(k, pg * 4096 + i, r) : 0)) {
                bad++;
                break;
              }
          }
          // Small allocations keep going on the side.
          smalls.push_back(malloc(16 + rng() % 4000));
          if (smalls.size() > 64) {
            free(smalls.front());
            smalls.erase(smalls.begin());
          }
        }
        for (void* s : smalls) free(s);
      });
    for (auto& th : ts) th.join();
    return bad.load();
  };
  if (hammer(4000, 1) != 0) return 11;
  if (check_all(rounds) != 0) return 12;
  pid_t child = fork();
  if (child == 0) {
    // The parent's data, spilled chunks included, then our own writes.
    if (check_all(rounds) != 0) _exit(21);
    std::vector<uint32_t> mine = rounds;
    for (size_t k = 0; k < blocks; k += 3)
      for (size_t pg = 0; pg < block_size / 4096; pg += 5) {
        uint32_t r = mine[k * (block_size / 4096) + pg] += 9;
        for (size_t i = 0; i < 4096; i++) b[k][pg * 4096 + i] = Value(k, pg * 4096 + i, r);
      }
    _exit(check_all(mine) == 0 ? 0 : 22);
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 13;
  if (check_all(rounds) != 0) return 14;  // the child's writes stayed in the child
  if (hammer(2000, 2) != 0) return 15;
  if (check_all(rounds) != 0) return 16;
  if (system("exit 0") != 0) return 17;  // fork + exec
  for (uint8_t* p : b) free(p);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!strcmp(argv[1], "contract")) {
    Contract();
    return g_failures ? 1 : 0;
  }
  if (!strcmp(argv[1], "work") && argc >= 4) return Work(strtoull(argv[2], nullptr, 10), atoi(argv[3]));
  if (!strcmp(argv[1], "denied")) {
    if (!faultline::test::DenyUserfaultfd()) return 77;
    Contract();
    if (g_failures) return 1;
    return Work(64, 2);
  }
  return 2;
}
