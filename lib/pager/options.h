// The runtime option table: every FAULTLINE_* variable with its type,
// default and help, read from the environment without allocating, ignored
// in setuid programs (AT_SECURE), a bad value warned about once on stderr.
// Thread-safety: reads are reentrant; the warn-once flags are atomic.
#pragma once

#include <cstdint>

namespace faultline::internal {

enum class OptionId : int { kBudget, kPolicy, kMode, kPrefetch, kWorkers, kShowStats, kVerbose, kCount };

struct OptionSpec {
  const char* name;
  const char* type;
  const char* default_text;
  const char* help;
};

const OptionSpec& Option(OptionId id) noexcept;
// The raw value, or nullptr when unset or when the environment is ignored.
const char* OptionValue(OptionId id) noexcept;
// Warns once per option: "faultline: FAULTLINE_X=value is not <what>; using the default".
void WarnBadOption(OptionId id, const char* value, const char* what) noexcept;
// A flag option: "1", "true", "yes" or "on".
bool OptionFlag(OptionId id) noexcept;

}  // namespace faultline::internal
