// XXH3 wrappers; the only file that includes xxhash.h.
#include "core/checksum.h"

#include <xxhash.h>

namespace faultline::internal {

uint64_t Checksum64(const void* data, size_t len) noexcept { return XXH3_64bits(data, len); }

Hash128 ContentHash128(const void* data, size_t len) noexcept {
  XXH128_hash_t h = XXH3_128bits(data, len);
  return Hash128{h.low64, h.high64};
}

}  // namespace faultline::internal
