// The fixed binary parts of an .apbundle (docs/FORMAT.md): the 4 KiB header
// and the 32-byte frame records. Encoding is explicit little-endian so the
// structs' in-memory layout never matters.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "faultline/status.hpp"

namespace faultline::internal {

inline constexpr char kMagic[8] = {'A', 'P', 'B', 'U', 'N', 'D', 'L', 'E'};
inline constexpr uint64_t kAlign = 4096;       // frames, frame table and manifest start here
inline constexpr uint64_t kHeaderSize = 4096;
inline constexpr uint64_t kHeaderChecksummed = 120;  // bytes covered by header_checksum
inline constexpr uint64_t kFrameRecordSize = 32;
inline constexpr uint64_t kMaxManifestSize = 256ull << 20;

struct Header {
  uint32_t version = 0;
  uint32_t header_size = kHeaderSize;
  uint64_t flags = 0;
  uint64_t manifest_offset = 0;
  uint64_t manifest_length = 0;
  uint64_t manifest_checksum = 0;
  uint64_t frame_table_offset = 0;
  uint64_t frame_count = 0;
  uint64_t frame_table_checksum = 0;
  uint64_t file_size = 0;
  uint64_t data_offset = kHeaderSize;
  uint64_t data_length = 0;
};

// Frame flags.
inline constexpr uint32_t kFrameStoredRaw = 1u << 0;  // verbatim bytes despite the codec

struct FrameRecord {
  uint64_t offset = 0;
  uint32_t stored_length = 0;
  uint32_t raw_length = 0;
  uint64_t checksum = 0;  // XXH3-64 of the stored bytes
  uint32_t flags = 0;
  uint32_t reserved = 0;
};

void EncodeHeader(const Header& h, std::byte out[kHeaderSize]) noexcept;
// Checks magic, version and header checksum; names the problem on error.
Status DecodeHeader(std::span<const std::byte> in, Header* h) noexcept;

void EncodeFrameRecord(const FrameRecord& r, std::byte out[kFrameRecordSize]) noexcept;
FrameRecord DecodeFrameRecord(const std::byte in[kFrameRecordSize]) noexcept;

inline uint64_t AlignUp(uint64_t v, uint64_t a) noexcept { return (v + a - 1) / a * a; }

// The page a tensor of `bytes` takes with frames of `page_size`: no larger
// than the tensor needs (a one-byte tensor in a bundle of 64 MiB frames
// would cost 64 MiB to write, read and install), and never below 64 KiB,
// so that a bundle at the default page size keeps one page size.
inline uint32_t PageFor(uint32_t page_size, uint64_t bytes) noexcept {
  constexpr uint64_t kFloor = 64 * 1024;
  uint64_t need = kFloor;
  while (need < bytes && need < page_size) need <<= 1;
  return need < page_size ? static_cast<uint32_t>(need) : page_size;
}

inline void StoreLE64(std::byte* p, uint64_t v) noexcept {
  for (int i = 0; i < 8; i++) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void StoreLE32(std::byte* p, uint32_t v) noexcept {
  for (int i = 0; i < 4; i++) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline uint64_t LoadLE64(const std::byte* p) noexcept {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
inline uint32_t LoadLE32(const std::byte* p) noexcept {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

}  // namespace faultline::internal
