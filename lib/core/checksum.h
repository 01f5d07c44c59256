// Checksums and content hashes (XXH3). Frame checksums are XXH3-64 of the
// stored bytes; dedup keys are XXH3-128 of the uncompressed bytes.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace faultline::internal {

uint64_t Checksum64(const void* data, size_t len) noexcept;  // fault path

// Whether a stored checksum matches. Fuzzing builds (-Dfuzz=enabled) accept
// every checksum so the fuzzer can reach the parsers behind them.
inline bool ChecksumMatches(uint64_t expected, const void* data, size_t len) noexcept {
#ifdef FAULTLINE_FUZZING_BUILD
  (void)expected, (void)data, (void)len;
  return true;
#else
  return Checksum64(data, len) == expected;
#endif
}

struct Hash128 {
  uint64_t lo = 0, hi = 0;
  bool operator==(const Hash128&) const = default;
};
Hash128 ContentHash128(const void* data, size_t len) noexcept;

}  // namespace faultline::internal
