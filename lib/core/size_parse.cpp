// ParseSize / FormatSize; see faultline/size.hpp.
#include "faultline/size.hpp"

#include <cmath>
#include <cstdio>

namespace faultline {

bool ParseSize(std::string_view s, uint64_t* out) noexcept {
  size_t i = 0;
  uint64_t whole = 0;
  bool digits = false;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
    if (whole > (UINT64_MAX - 9) / 10) return false;
    whole = whole * 10 + static_cast<uint64_t>(s[i] - '0');
    digits = true;
    i++;
  }
  double frac = 0, scale = 0.1;
  if (i < s.size() && s[i] == '.') {
    i++;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
      frac += (s[i] - '0') * scale;
      scale /= 10;
      digits = true;
      i++;
    }
  }
  if (!digits) return false;
  uint64_t mult = 1;
  if (i < s.size()) {
    switch (s[i] | 0x20) {
      case 'k': mult = 1ull << 10; break;
      case 'm': mult = 1ull << 20; break;
      case 'g': mult = 1ull << 30; break;
      case 't': mult = 1ull << 40; break;
      case 'b': mult = 1; break;
      default: return false;
    }
    bool was_b = (s[i] | 0x20) == 'b';
    i++;
    if (!was_b) {
      if (i < s.size() && (s[i] | 0x20) == 'i') i++;
      if (i < s.size() && (s[i] | 0x20) == 'b') i++;
    }
  }
  if (i != s.size()) return false;
  if (whole != 0 && mult > UINT64_MAX / whole) return false;
  uint64_t v = whole * mult;
  uint64_t f = static_cast<uint64_t>(std::llround(frac * static_cast<double>(mult)));
  if (v > UINT64_MAX - f) return false;
  *out = v + f;
  return true;
}

std::string FormatSize(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    u++;
  }
  char buf[32];
  if (u == 0) snprintf(buf, sizeof(buf), "%llu B", static_cast<unsigned long long>(bytes));
  else snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

}  // namespace faultline
