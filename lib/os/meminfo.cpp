// Host memory readings; see meminfo.h.
#include "os/meminfo.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace faultline::internal {

namespace {

// Reads a small file into buf (NUL-terminated); false if it cannot.
bool Slurp(const char* path, char* buf, size_t cap) noexcept {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  size_t n = 0;
  while (n + 1 < cap) {
    ssize_t r = read(fd, buf + n, cap - 1 - n);
    if (r <= 0) break;
    n += static_cast<size_t>(r);
  }
  close(fd);
  buf[n] = '\0';
  return n > 0;
}

uint64_t MeminfoField(const char* text, const char* key) noexcept {
  const char* p = strstr(text, key);
  if (!p) return 0;
  return strtoull(p + strlen(key), nullptr, 10) * 1024;  // kB
}

// A number file ("max" or unreadable = 0).
uint64_t NumberFile(const char* path) noexcept {
  char buf[64];
  if (!Slurp(path, buf, sizeof buf) || !strncmp(buf, "max", 3)) return 0;
  return strtoull(buf, nullptr, 10);
}

void ReadCgroup(HostMemory* m) noexcept {
  char text[4096];
  if (!Slurp("/proc/self/cgroup", text, sizeof text)) return;
  char path[512];
  for (char* line = strtok(text, "\n"); line; line = strtok(nullptr, "\n")) {
    const char* rel = nullptr;
    bool v2 = false;
    if (!strncmp(line, "0::", 3)) {
      rel = line + 3;
      v2 = true;
    } else if (const char* c = strstr(line, ":memory:")) {
      rel = c + 8;
    }
    if (!rel) continue;
    uint64_t limit, usage;
    if (v2) {
      snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.max", rel);
      limit = NumberFile(path);
      snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.current", rel);
      usage = NumberFile(path);
    } else {
      snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.limit_in_bytes", rel);
      limit = NumberFile(path);
      snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.usage_in_bytes", rel);
      usage = NumberFile(path);
    }
    // v1 reports "no limit" as a huge number.
    if (limit > 0 && (m->total == 0 || limit < m->total)) {
      m->cgroup_limit = limit;
      m->cgroup_usage = usage;
      return;
    }
  }
}

}  // namespace

double HostMemory::Pressure() const noexcept {
  double p = 0;
  if (total) p = 1.0 - static_cast<double>(available) / static_cast<double>(total);
  if (cgroup_limit) {
    double c = static_cast<double>(cgroup_usage) / static_cast<double>(cgroup_limit);
    if (c > p) p = c;
  }
  return p < 0 ? 0 : (p > 1 ? 1 : p);
}

uint64_t HostMemory::Basis() const noexcept {
  if (cgroup_limit && total && static_cast<double>(cgroup_usage) / cgroup_limit >
                                   1.0 - static_cast<double>(available) / total)
    return cgroup_limit;
  return total;
}

bool ReadHostMemory(HostMemory* out) noexcept {
  *out = HostMemory{};
  char text[8192];
  if (!Slurp("/proc/meminfo", text, sizeof text)) return false;
  out->total = MeminfoField(text, "MemTotal:");
  out->available = MeminfoField(text, "MemAvailable:");
  if (!out->total) return false;
  ReadCgroup(out);
  return true;
}

uint64_t FitBudgetToCgroup(uint64_t budget, const char* what) noexcept {
  HostMemory m;
  if (!ReadHostMemory(&m) || m.cgroup_limit == 0) return budget;
  uint64_t room = m.cgroup_limit > m.cgroup_usage ? m.cgroup_limit - m.cgroup_usage : 0;
  uint64_t most = room / 4 * 3;
  if (budget <= most) return budget;
  static std::atomic<bool> said{false};
  if (!said.exchange(true))
    fprintf(stderr,
            "faultline: a %s budget of %.1f MiB does not fit in this process's memory cgroup (limit %.1f MiB, "
            "%.1f MiB in use): using %.1f MiB\n",
            what, budget / 1048576.0, m.cgroup_limit / 1048576.0, m.cgroup_usage / 1048576.0, most / 1048576.0);
  return most;
}

uint64_t TransparentHugePageSize() noexcept {
  static const uint64_t size = [] {
    char b[256];
    if (!Slurp("/sys/kernel/mm/transparent_hugepage/enabled", b, sizeof b)) return uint64_t{0};
    bool on = strstr(b, "[always]") || strstr(b, "[madvise]");
    if (!Slurp("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", b, sizeof b)) return uint64_t{0};
    uint64_t h = strtoull(b, nullptr, 10);
    if (h < (64u << 10) || h > (64u << 20) || (h & (h - 1))) return uint64_t{0};
    // Kernels with per-size controls may turn the PMD size off (or on) alone.
    char path[128];
    snprintf(path, sizeof path, "/sys/kernel/mm/transparent_hugepage/hugepages-%llukB/enabled",
             static_cast<unsigned long long>(h >> 10));
    if (Slurp(path, b, sizeof b) && !strstr(b, "[inherit]")) on = strstr(b, "[always]") || strstr(b, "[madvise]");
    // Without the huge zero page a read fault in a huge-page range allocates
    // and zeroes a huge page before userfaultfd sees it.
    if (!Slurp("/sys/kernel/mm/transparent_hugepage/use_zero_page", b, sizeof b) || b[0] != '1') on = false;
    return on ? h : uint64_t{0};
  }();
  return size;
}

// PAGEMAP_SCAN's ABI (linux/fs.h of 6.7; Debian's headers predate it).
namespace {
struct PageRegion {
  uint64_t start, end, categories;
};
struct PmScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
constexpr uint64_t kPageIsPresent = 1u << 3, kPageIsHuge = 1u << 6;
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
}  // namespace

int HugeMapped(int pagemap_fd, const void* addr, size_t len) noexcept {
  PageRegion r[2] = {};
  PmScanArg a = {};
  a.size = sizeof a;
  a.start = reinterpret_cast<uintptr_t>(addr);
  a.end = a.start + len;
  a.vec = reinterpret_cast<uintptr_t>(r);
  a.vec_len = 2;
  a.category_anyof_mask = a.return_mask = kPageIsPresent | kPageIsHuge;
  long n = ioctl(pagemap_fd, kPagemapScan, &a);
  if (n < 0) return -errno;
  // One region, the whole range, present and huge.
  return n == 1 && r[0].start == a.start && r[0].end == a.end &&
         r[0].categories == (kPageIsPresent | kPageIsHuge);
}

std::byte* MapAligned(uint64_t len, uint64_t align, void** map, uint64_t* map_len) noexcept {
  void* m = mmap(nullptr, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  *map = m;
  *map_len = len + align;
  auto* p = reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(m) + align - 1) & ~(align - 1));
  madvise(p, len, MADV_DONTFORK);
  return p;
}

}  // namespace faultline::internal
