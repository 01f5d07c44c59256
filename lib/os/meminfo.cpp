// Host memory readings; see meminfo.h.
#include "os/meminfo.h"

#include <fcntl.h>
#include <unistd.h>

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

}  // namespace faultline::internal
