// The option table; see options.h. The README lists the same table.
#include "pager/options.h"

#include <sys/auxv.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "faultline/size.hpp"

namespace faultline::internal {

namespace {

constexpr OptionSpec kOptions[] = {
    {"FAULTLINE_BUDGET", "size", "100MB", "resident bytes of paged tensors, or of managed memory (K/M/G suffixes)"},
    {"FAULTLINE_POLICY", "lru|lfu|plan", "lru", "eviction policy"},
    {"FAULTLINE_MODE", "auto|uffd|guard|mmap", "auto", "how pages are faulted in"},
    {"FAULTLINE_PREFETCH", "integer", "32", "frames of readahead at most (0 = off)"},
    {"FAULTLINE_WORKERS", "integer", "cores", "fault-service threads"},
    {"FAULTLINE_HUGE", "flag", "1", "load sequentially read tensors in whole huge pages, each installed by one UFFDIO_MOVE"},
    {"FAULTLINE_SHOW_STATS", "flag", "0", "print paging statistics when a bundle is closed or at exit"},
    {"FAULTLINE_VERBOSE", "flag", "0", "say on stderr which mode and features are in use"},
    {"FAULTLINE_GPU_BUDGET", "size", "half the free GPU memory", "bytes of tensors on the GPU"},
    {"FAULTLINE_GPU_HOST_BUDGET", "size", "no limit", "bytes of decoded host copies of GPU-tier tensors"},
    {"FAULTLINE_GPU_LOOKAHEAD", "integer", "2", "plan steps prefetched to the GPU ahead of the current one"},
    {"FAULTLINE_GPU_EVICT", "host|discard", "host", "where tensors leaving the GPU go"},
    {"FAULTLINE_GPU_READ_MOSTLY", "flag", "1", "advise read-mostly on every tensor"},
    {"FAULTLINE_GPU_MONITOR", "flag", "1", "watch GPU and host memory and move tensors between tiers"},
    {"FAULTLINE_GPU_OFFLOAD", "fraction", "0.85", "memory use above which the coldest tensors move down a tier"},
    {"FAULTLINE_GPU_EMERGENCY", "fraction", "0.95", "memory use above which all idle tensors move down a tier"},
    {"FAULTLINE_GPU_RELOAD", "fraction", "0.70", "memory use below which the full GPU budget is restored"},
    {"FAULTLINE_GPU_DIRECT", "flag", "0", "give kernels the pager's host pointers (needs HMM)"},
    {"FAULTLINE_GPU_MEMORY", "managed|mapped", "managed", "what backs GPU-tier tensors: CUDA managed memory, or GPU pages mapped under each tensor's address while it is staged"},
    {"FAULTLINE_THRESHOLD", "size", "1M", "allocations of at least this size go to managed memory"},
    {"FAULTLINE_SPILL_DIR", "path", "$TMPDIR or /var/tmp", "where the (unlinked) spill file lives"},
    {"FAULTLINE_SPILL_CODEC", "zstd[:level]|raw", "zstd:1", "how spilled chunks are stored"},
    {"FAULTLINE_MAX_EXPANSION", "integer", "4096", "a bundle may declare at most this many times its file size in tensors and blobs (at least 1 GiB; 0 = no limit)"},
    {"FAULTLINE_MAX_SIZE", "size", "no limit", "a bundle may declare at most this many bytes of tensors and blobs"},
    {"FAULTLINE_KERNEL_FAULTS", "flag", "1", "0: open userfaultfd for user-mode faults only, as an unprivileged process gets it"},
};
static_assert(sizeof(kOptions) / sizeof(kOptions[0]) == static_cast<int>(OptionId::kCount));

std::atomic<bool> g_warned[static_cast<int>(OptionId::kCount)];

}  // namespace

const OptionSpec& Option(OptionId id) noexcept { return kOptions[static_cast<int>(id)]; }

const char* OptionValue(OptionId id) noexcept {
  if (getauxval(AT_SECURE)) return nullptr;  // setuid/setgid: the environment is not trusted
  const char* v = getenv(Option(id).name);
  return v && *v ? v : nullptr;
}

void WarnBadOption(OptionId id, const char* value, const char* what, const char* used) noexcept {
  if (g_warned[static_cast<int>(id)].exchange(true)) return;
  if (used) fprintf(stderr, "faultline: %s=%s is not %s; using %s\n", Option(id).name, value, what, used);
  else fprintf(stderr, "faultline: %s=%s is not %s; using the default (%s)\n", Option(id).name, value, what,
               Option(id).default_text);
}

bool OptionFlag(OptionId id) noexcept {
  bool b = false;
  OptionFlag(id, &b);
  return b;
}

void OptionFlag(OptionId id, bool* out) noexcept {
  const char* v = OptionValue(id);
  if (!v) return;
  if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on")) *out = true;
  else if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off")) *out = false;
  else WarnBadOption(id, v, "a flag (1/0)");
}

void OptionUnsigned(OptionId id, unsigned max, unsigned* out) noexcept {
  const char* v = OptionValue(id);
  if (!v) return;
  char* end = nullptr;
  errno = 0;
  unsigned long n = strtoul(v, &end, 10);
  if (*v >= '0' && *v <= '9' && *end == '\0' && errno == 0 && n <= max) *out = static_cast<unsigned>(n);
  else WarnBadOption(id, v, "an integer in range");
}

void OptionSize(OptionId id, uint64_t* out) noexcept {
  const char* v = OptionValue(id);
  if (!v) return;
  uint64_t b;
  if (ParseSize(v, &b) && b > 0) {
    *out = b;
  } else if (*out) {
    // What is used: the default the caller computed (half the memory for
    // managed memory, 100 MiB for bundles), which the table's text may not be.
    char used[48];
    snprintf(used, sizeof(used), "%.1f MiB", static_cast<double>(*out) / (1 << 20));
    WarnBadOption(id, v, "a size such as 512M", used);
  } else {
    WarnBadOption(id, v, "a size such as 512M");
  }
}

void OptionFraction(OptionId id, double* out) noexcept {
  const char* v = OptionValue(id);
  if (!v) return;
  char* end = nullptr;
  double d = strtod(v, &end);
  if (end != v && *end == '\0' && d > 0 && d <= 1) *out = d;
  else WarnBadOption(id, v, "a fraction in (0, 1]");
}

}  // namespace faultline::internal
