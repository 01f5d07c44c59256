// Header and frame-record encoding; field offsets are those of docs/FORMAT.md.
#include "bundle/format.h"

#include <cstring>

#include "core/checksum.h"
#include "faultline/bundle.hpp"

namespace faultline::internal {

void EncodeHeader(const Header& h, std::byte out[kHeaderSize]) noexcept {
  memset(out, 0, kHeaderSize);
  memcpy(out, kMagic, 8);
  StoreLE32(out + 8, h.version);
  StoreLE32(out + 12, h.header_size);
  StoreLE64(out + 16, h.flags);
  StoreLE64(out + 24, h.manifest_offset);
  StoreLE64(out + 32, h.manifest_length);
  StoreLE64(out + 40, h.manifest_checksum);
  StoreLE64(out + 48, h.frame_table_offset);
  StoreLE64(out + 56, h.frame_count);
  StoreLE64(out + 64, h.frame_table_checksum);
  StoreLE64(out + 72, h.file_size);
  StoreLE64(out + 80, h.data_offset);
  StoreLE64(out + 88, h.data_length);
  StoreLE64(out + kHeaderChecksummed, Checksum64(out, kHeaderChecksummed));
}

Status DecodeHeader(std::span<const std::byte> in, Header* h) noexcept {
  if (in.size() < kHeaderSize)
    return Status::Error(EINVAL, "truncated: %zu bytes is smaller than the %llu-byte header",
                         in.size(), static_cast<unsigned long long>(kHeaderSize));
  const std::byte* p = in.data();
  if (memcmp(p, kMagic, 8) != 0) return Status::Error(EINVAL, "not a bundle: wrong magic");
  h->version = LoadLE32(p + 8);
  if (h->version != kBundleFormatVersion)
    return Status::Error(ENOTSUP, "unsupported format version %u (this build reads version %u)",
                         h->version, kBundleFormatVersion);
  if (!ChecksumMatches(LoadLE64(p + kHeaderChecksummed), p, kHeaderChecksummed))
    return Status::Error(EBADMSG, "header checksum does not match");
  h->header_size = LoadLE32(p + 12);
  h->flags = LoadLE64(p + 16);
  h->manifest_offset = LoadLE64(p + 24);
  h->manifest_length = LoadLE64(p + 32);
  h->manifest_checksum = LoadLE64(p + 40);
  h->frame_table_offset = LoadLE64(p + 48);
  h->frame_count = LoadLE64(p + 56);
  h->frame_table_checksum = LoadLE64(p + 64);
  h->file_size = LoadLE64(p + 72);
  h->data_offset = LoadLE64(p + 80);
  h->data_length = LoadLE64(p + 88);
  if (h->header_size != kHeaderSize)
    return Status::Error(EINVAL, "header size %u is not %llu", h->header_size,
                         static_cast<unsigned long long>(kHeaderSize));
  if (h->flags != 0)
    return Status::Error(ENOTSUP, "unknown header flags 0x%llx",
                         static_cast<unsigned long long>(h->flags));
  return Status::Ok();
}

void EncodeFrameRecord(const FrameRecord& r, std::byte out[kFrameRecordSize]) noexcept {
  StoreLE64(out, r.offset);
  StoreLE32(out + 8, r.stored_length);
  StoreLE32(out + 12, r.raw_length);
  StoreLE64(out + 16, r.checksum);
  StoreLE32(out + 24, r.flags);
  StoreLE32(out + 28, r.reserved);
}

FrameRecord DecodeFrameRecord(const std::byte in[kFrameRecordSize]) noexcept {
  FrameRecord r;
  r.offset = LoadLE64(in);
  r.stored_length = LoadLE32(in + 8);
  r.raw_length = LoadLE32(in + 12);
  r.checksum = LoadLE64(in + 16);
  r.flags = LoadLE32(in + 24);
  r.reserved = LoadLE32(in + 28);
  return r;
}

}  // namespace faultline::internal
