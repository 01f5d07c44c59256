// An ordinary program (it does not link faultline) that the shim test runs
// under LD_PRELOAD=libfaultline-preload.so. Modes:
//   contract           every allocation function's contract
//   work MIB THREADS   large blocks totalling MIB, random writes and reads
//                      from THREADS threads, small-allocation churn, a fork
//                      in the middle (the child checks and writes its own
//                      copy) and a fork + exec; every byte checked
//   denied             seccomp denies userfaultfd first: everything must
//                      still work (from the system allocator)
//   syscalls FILE      system calls that write into and read from managed
//                      memory never touched or spilled: read, pread, readv,
//                      recv from a socketpair, fread, write, send, writev
//   replay             a recorded sequence of allocation calls (growth
//                      chains, every alignment rule, absurd sizes), one
//                      line of results each; the same run with and without
//                      the shim must print the same lines
// Exit 0 when everything held; otherwise it names the first failure.
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
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



// ---- replay: results that do not depend on addresses ----

uint64_t Hash(const void* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

void Fill(void* p, size_t from, size_t to, unsigned seed) {
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = from; i < to; i++) b[i] = static_cast<unsigned char>((i * 131 + seed) >> 3);
}

// What a pointer result says: null and errno, or whether it is aligned to
// `align`, has n usable bytes, and holds zeros where asked.
void Say(const char* what, size_t a, size_t n, void* p, int err, size_t align = 16, bool zero = false) {
  if (!p) {
    printf("%s(%zu, %zu) = NULL errno %d\n", what, a, n, err);
    return;
  }
  printf("%s(%zu, %zu) = block aligned %d usable %d%s\n", what, a, n, Aligned(p, align),
         malloc_usable_size(p) >= n, zero ? (n == 0 || AllZero(p, n) ? " zeros" : " NOT ZERO") : "");
}

size_t NextPow2(size_t a) {
  size_t p = 1;
  while (p < a && p) p <<= 1;
  return p ? p : a;
}

// Sizes and calls the compiler cannot see through: it would warn about
// the absurd sizes and about using a block after a realloc that failed.
size_t Opaque(size_t v) {
  asm volatile("" : "+r"(v));
  return v;
}
void* (*volatile g_realloc)(void*, size_t) = realloc;
void* (*volatile g_reallocarray)(void*, size_t, size_t) = reallocarray;
void* (*volatile g_calloc)(size_t, size_t) = calloc;

void Replay() {
  const size_t kAbsurd[] = {SIZE_MAX, SIZE_MAX - 4095, SIZE_MAX / 2 + 1, size_t(PTRDIFF_MAX), size_t(1) << 62};
  const size_t kSizes[] = {0, 1, 100, 65535, 65536, 1 << 20, (3 << 20) + 17};
  for (size_t n : kSizes) {
    errno = 0;
    void* p = malloc(n);
    Say("malloc", 0, n, p, errno);
    if (p) Fill(p, 0, n, 1);
    free(p);
    void* c = calloc(n, 3);
    Say("calloc", n, 3, c, errno, 16, true);
    free(c);
  }
  for (size_t n : kAbsurd) {
    errno = 0;
    Say("malloc", 0, n, malloc(n), errno);
    errno = 0;
    Say("calloc", n, 1, calloc(n, 1), errno);
    errno = 0;
    Say("calloc", n, 3, calloc(n, 3), errno);
  }
  errno = 0;
  Say("calloc", size_t(1) << 33, size_t(1) << 33, g_calloc(Opaque(size_t(1) << 33), size_t(1) << 33), errno);
  // Growth chains (small to managed and back), each step checked to keep
  // the bytes it had, then absurd sizes that must leave the block as it is.
  for (unsigned chain = 0; chain < 2; chain++) {
    size_t steps[] = {100, 200000, 1 << 20, 2 << 20, 5 << 20, (5 << 20) + 1, 9 << 20, 33 << 20, 70000, 10,
                      4 << 20, 4 << 20, 40 << 20};
    size_t have = chain ? 3 << 20 : 50;
    unsigned char* p = static_cast<unsigned char*>(malloc(have));
    Fill(p, 0, have, chain);
    for (size_t n : steps) {
      size_t keep = n < have ? n : have;
      uint64_t before = Hash(p, keep);
      errno = 0;
      auto* q = static_cast<unsigned char*>(g_realloc(p, n));
      if (!q) {
        printf("realloc(%zu -> %zu) = NULL errno %d\n", have, n, errno);
        continue;
      }
      p = q;
      printf("realloc(%zu -> %zu) = kept %d usable %d\n", have, n, Hash(p, keep) == before,
             malloc_usable_size(p) >= n);
      Fill(p, keep, n, chain);
      have = n;
      for (size_t a : kAbsurd) {
        uint64_t all = Hash(p, have);
        errno = 0;
        void* r = g_realloc(p, a);
        printf("realloc(%zu -> %zu) = %s errno %d, block kept %d\n", have, a, r ? "BLOCK" : "NULL", errno,
               Hash(p, have) == all);
        errno = 0;
        r = g_reallocarray(p, a, 2);
        printf("reallocarray(%zu -> %zu x 2) = %s errno %d, block kept %d\n", have, a, r ? "BLOCK" : "NULL",
               errno, Hash(p, have) == all);
      }
    }
    printf("realloc(%zu -> 0) = %s\n", have, g_realloc(p, 0) ? "BLOCK" : "NULL");
  }
  void* fresh = realloc(nullptr, 2 << 20);
  Say("realloc-null", 0, 2 << 20, fresh, errno);
  free(fresh);
  // Every alignment rule: below the malloc alignment, not a power of two,
  // not a multiple of sizeof(void*), huge; small and managed sizes.
  const size_t kAligns[] = {0,    1,       3,       8,       16,           24,           48,
                            64,   4096,    65536,   1 << 21, SIZE_MAX / 2, SIZE_MAX / 2 + 1, SIZE_MAX / 2 + 2,
                            SIZE_MAX};
  for (size_t n : {size_t(100), size_t(3 << 20)}) {
    for (size_t a : kAligns) {
      size_t want = a > (SIZE_MAX / 2 + 1) ? 1 : NextPow2(a < 16 ? 16 : a);
      errno = 0;
      void* p = memalign(a, n);
      Say("memalign", a, n, p, errno, want);
      free(p);
      errno = 0;
      p = aligned_alloc(a, n);
      Say("aligned_alloc", a, n, p, errno, want);
      free(p);
      void* out = reinterpret_cast<void*>(1);
      int rc = posix_memalign(&out, a, n);
      printf("posix_memalign(%zu, %zu) = %d%s\n", a, n, rc,
             rc ? (out == reinterpret_cast<void*>(1) ? ", out untouched" : ", OUT CHANGED")
                : (Aligned(out, a) ? ", aligned" : ", NOT ALIGNED"));
      if (!rc) free(out);
    }
    for (size_t a : kAbsurd) {
      errno = 0;
      void* p = memalign(4096, a);
      Say("memalign", 4096, a, p, errno, 4096);
      free(p);
    }
  }
  for (size_t n : {size_t(0), size_t(1), size_t(3 << 20), SIZE_MAX, SIZE_MAX - 4095}) {
    errno = 0;
    void* p = valloc(n);
    Say("valloc", 0, n, p, errno, 4096);
    free(p);
    errno = 0;
    p = pvalloc(n);
    Say("pvalloc", 0, n, p, errno, 4096);
    free(p);
  }
  for (size_t n : {size_t(3 << 20), SIZE_MAX / 2}) {
    try {
      char* p = new char[n];
      printf("new[%zu] = block\n", n);
      delete[] p;
    } catch (const std::bad_alloc&) {
      printf("new[%zu] = bad_alloc\n", n);
    }
    printf("new(nothrow)[%zu] = %s\n", n, [&] {
      char* p = new (std::nothrow) char[n];
      delete[] p;
      return p ? "block" : "NULL";
    }());
  }
}

// ---- syscalls: the kernel touching managed memory ----

int Syscalls(const char* path) {
  // The source: 24 MiB of known bytes in a file.
  const size_t n = 24 << 20;
  {
    FILE* f = fopen(path, "wb");
    if (!f) return 3;
    for (size_t i = 0; i < n; i += 4096) {
      unsigned char page[4096];
      for (size_t k = 0; k < 4096; k++) page[k] = static_cast<unsigned char>((i + k) * 131 >> 5);
      fwrite(page, 1, 4096, f);
    }
    fclose(f);
  }
  auto good = [&](const unsigned char* p, size_t len, size_t at) {
    for (size_t k = 0; k < len; k += 509)
      if (p[k] != static_cast<unsigned char>((at + k) * 131 >> 5)) return false;
    return p[len - 1] == static_cast<unsigned char>((at + len - 1) * 131 >> 5);
  };
  int fd = open(path, O_RDONLY);
  if (fd < 0) return 3;
  // Fresh blocks, never touched: the kernel's copy_to_user takes the fault.
  auto* a = static_cast<unsigned char*>(malloc(n));
  ssize_t got = 0;
  for (size_t off = 0; off < n; off += got) {
    got = read(fd, a + off, std::min<size_t>(1 << 20, n - off));
    if (got <= 0) {
      fprintf(stderr, "shim_probe: read into managed memory: %s\n", strerror(errno));
      return 4;
    }
  }
  EXPECT(good(a, n, 0));
  auto* b = static_cast<unsigned char*>(malloc(n));
  EXPECT(pread(fd, b, n, 0) == static_cast<ssize_t>(n));
  EXPECT(good(b, n, 0));
  auto* c = static_cast<unsigned char*>(malloc(4 << 20));
  iovec iov[2] = {{c, 1 << 20}, {c + (2 << 20), 2 << 20}};
  EXPECT(preadv(fd, iov, 2, 4096) == (3 << 20));
  EXPECT(good(c, 1 << 20, 4096) && good(c + (2 << 20), 2 << 20, 4096 + (1 << 20)));
  FILE* f = fopen(path, "rb");
  auto* d = static_cast<unsigned char*>(malloc(8 << 20));
  EXPECT(f && fread(d, 1, 8 << 20, f) == (8u << 20));
  EXPECT(good(d, 8 << 20, 0));
  if (f) fclose(f);
  // By now a (24 MiB) is mostly spilled under an 8 MiB budget: the
  // kernel's copy_from_user reads it back for write, send and writev.
  char out[] = "/tmp/faultline-probe-XXXXXX";
  int wfd = mkstemp(out);
  EXPECT(wfd >= 0 && write(wfd, a, n) == static_cast<ssize_t>(n));
  iovec wv[1] = {{b, n}};
  EXPECT(pwritev(wfd, wv, 1, n) == static_cast<ssize_t>(n));
  auto* back = static_cast<unsigned char*>(malloc(2 * n));
  EXPECT(pread(wfd, back, 2 * n, 0) == static_cast<ssize_t>(2 * n));
  EXPECT(good(back, n, 0) && good(back + n, n, 0));
  close(wfd);
  unlink(out);
  int sv[2];
  EXPECT(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  auto* e = static_cast<unsigned char*>(malloc(4 << 20));
  std::thread sender([&] {
    for (size_t off = 0; off < (4u << 20);) {
      ssize_t k = send(sv[0], a + off, (4 << 20) - off, 0);
      if (k <= 0) break;
      off += k;
    }
  });
  size_t have = 0;
  while (have < (4u << 20)) {
    ssize_t k = recv(sv[1], e + have, (4 << 20) - have, 0);
    if (k <= 0) break;
    have += k;
  }
  sender.join();
  EXPECT(have == (4u << 20) && good(e, 4 << 20, 0));
  close(sv[0]);
  close(sv[1]);
  for (void* p : {static_cast<void*>(a), static_cast<void*>(b), static_cast<void*>(c), static_cast<void*>(d),
                  static_cast<void*>(e), static_cast<void*>(back)})
    free(p);
  close(fd);
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!strcmp(argv[1], "contract")) {
    Contract();
    return g_failures ? 1 : 0;
  }
  if (!strcmp(argv[1], "work") && argc >= 4) return Work(strtoull(argv[2], nullptr, 10), atoi(argv[3]));
  if (!strcmp(argv[1], "syscalls") && argc >= 3) return Syscalls(argv[2]);
  if (!strcmp(argv[1], "replay")) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    Replay();
    return 0;
  }
  if (!strcmp(argv[1], "denied")) {
    if (!faultline::test::DenyUserfaultfd()) return 77;
    Contract();
    if (g_failures) return 1;
    return Work(64, 2);
  }
  return 2;
}
