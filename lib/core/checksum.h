// Checksums and content hashes (XXH3). Frame checksums are XXH3-64 of the
// stored bytes; dedup keys are XXH3-128 of the uncompressed bytes.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace faultline::internal {

uint64_t Checksum64(const void* data, size_t len) noexcept;  // fault path

struct Hash128 {
  uint64_t lo = 0, hi = 0;
  bool operator==(const Hash128&) const = default;
};
Hash128 ContentHash128(const void* data, size_t len) noexcept;

}  // namespace faultline::internal
