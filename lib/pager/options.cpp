// The option table; see options.h. The README lists the same table.
#include "pager/options.h"

#include <sys/auxv.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace faultline::internal {

namespace {

constexpr OptionSpec kOptions[] = {
    {"FAULTLINE_BUDGET", "size", "100MB", "resident bytes of paged tensors (K/M/G suffixes)"},
    {"FAULTLINE_POLICY", "lru|lfu|plan", "lru", "eviction policy"},
    {"FAULTLINE_MODE", "auto|uffd|guard|mmap", "auto", "how pages are faulted in"},
    {"FAULTLINE_PREFETCH", "integer", "32", "frames of readahead at most (0 = off)"},
    {"FAULTLINE_WORKERS", "integer", "cores", "fault-service threads"},
    {"FAULTLINE_SHOW_STATS", "flag", "0", "print paging statistics when a bundle is closed or at exit"},
    {"FAULTLINE_VERBOSE", "flag", "0", "say on stderr which mode and features are in use"},
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

void WarnBadOption(OptionId id, const char* value, const char* what) noexcept {
  if (g_warned[static_cast<int>(id)].exchange(true)) return;
  fprintf(stderr, "faultline: %s=%s is not %s; using the default (%s)\n", Option(id).name, value, what,
          Option(id).default_text);
}

bool OptionFlag(OptionId id) noexcept {
  const char* v = OptionValue(id);
  if (!v) return false;
  if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on")) return true;
  if (strcmp(v, "0") && strcasecmp(v, "false") && strcasecmp(v, "no") && strcasecmp(v, "off"))
    WarnBadOption(id, v, "a flag (1/0)");
  return false;
}

}  // namespace faultline::internal
