// Frame encode/decode; see codec.h. zstd contexts are thread_local and
// reused: creating one per frame would cost more than a small frame's work.
#include "bundle/codec.h"

#include <zstd.h>

#include <cstring>

#include "core/checksum.h"

namespace faultline::internal {
namespace {

struct ZstdContexts {
  ZSTD_CCtx* c = nullptr;
  ZSTD_DCtx* d = nullptr;
  ~ZstdContexts() {
    ZSTD_freeCCtx(c);
    ZSTD_freeDCtx(d);
  }
};
thread_local ZstdContexts t_zstd;

template <size_t K>
void ShuffleK(const std::byte* in, std::byte* out, size_t n) noexcept {
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < K; j++) out[j * n + i] = in[i * K + j];
}
template <size_t K>
void UnshuffleK(const std::byte* in, std::byte* out, size_t n) noexcept {
  for (size_t i = 0; i < n; i++)
    for (size_t j = 0; j < K; j++) out[i * K + j] = in[j * n + i];
}

}  // namespace

void Shuffle(const std::byte* in, std::byte* out, size_t len, size_t elem) noexcept {
  size_t n = len / elem;
  switch (elem) {
    case 2: ShuffleK<2>(in, out, n); break;
    case 4: ShuffleK<4>(in, out, n); break;
    case 8: ShuffleK<8>(in, out, n); break;
    default: memcpy(out, in, len); return;
  }
  memcpy(out + n * elem, in + n * elem, len - n * elem);  // a tail that is not an element
}

void Unshuffle(const std::byte* in, std::byte* out, size_t len, size_t elem) noexcept {
  size_t n = len / elem;
  switch (elem) {
    case 2: UnshuffleK<2>(in, out, n); break;
    case 4: UnshuffleK<4>(in, out, n); break;
    case 8: UnshuffleK<8>(in, out, n); break;
    default: memcpy(out, in, len); return;
  }
  memcpy(out + n * elem, in + n * elem, len - n * elem);
}

size_t MaxStoredLength(Codec codec, size_t raw_len) noexcept {
  return codec == Codec::kZstd ? ZSTD_compressBound(raw_len) : raw_len;
}

Result<size_t> EncodeFrame(const FrameCodec& c, std::span<const std::byte> raw,
                           std::span<std::byte> out, std::byte* scratch, uint32_t* flags) {
  *flags = 0;
  if (c.codec == Codec::kZstd && !raw.empty()) {
    const std::byte* src = raw.data();
    if (c.shuffle && c.elem_size > 1) {
      Shuffle(raw.data(), scratch, raw.size(), c.elem_size);
      src = scratch;
    }
    if (!t_zstd.c) t_zstd.c = ZSTD_createCCtx();
    if (!t_zstd.c) return Status::Error(ENOMEM, "cannot create a zstd compression context");
    size_t n = ZSTD_compressCCtx(t_zstd.c, out.data(), out.size(), src, raw.size(), c.level);
    if (ZSTD_isError(n)) return Status::Error(EIO, "zstd: %s", ZSTD_getErrorName(n));
    if (n < raw.size() && static_cast<double>(raw.size()) >= c.min_ratio * static_cast<double>(n)) return n;
  }
  // Raw codec, or compression did not help (enough): store the frame verbatim.
  if (out.size() < raw.size()) return Status::Error(ENOBUFS, "frame buffer too small");
  memcpy(out.data(), raw.data(), raw.size());
  if (c.codec != Codec::kRaw) *flags = kFrameStoredRaw;
  return raw.size();
}

Status DecodeFrame(const FrameCodec& c, const FrameRecord& rec, std::span<const std::byte> stored,
                   std::span<std::byte> out, std::byte* scratch) noexcept {
  if (stored.size() != rec.stored_length || out.size() != rec.raw_length)
    return Status::Error(EINVAL, "frame buffer sizes do not match the frame record");
  if (!ChecksumMatches(rec.checksum, stored.data(), stored.size()))
    return Status::Error(EBADMSG, "checksum does not match");
  if (c.codec == Codec::kRaw || (rec.flags & kFrameStoredRaw)) {
    if (rec.stored_length != rec.raw_length)
      return Status::Error(EBADMSG, "raw frame's stored length %u is not its length %u",
                           rec.stored_length, rec.raw_length);
    if (stored.data() != out.data()) memcpy(out.data(), stored.data(), stored.size());
    return Status::Ok();
  }
  if (!t_zstd.d) t_zstd.d = ZSTD_createDCtx();
  if (!t_zstd.d) return Status::Error(ENOMEM, "cannot create a zstd decompression context");
  bool shuffled = c.shuffle && c.elem_size > 1;
  std::byte* dst = shuffled ? scratch : out.data();
  size_t n = ZSTD_decompressDCtx(t_zstd.d, dst, out.size(), stored.data(), stored.size());
  if (ZSTD_isError(n)) return Status::Error(EBADMSG, "zstd: %s", ZSTD_getErrorName(n));
  if (n != out.size())
    return Status::Error(EBADMSG, "decompressed to %zu bytes, expected %zu", n, out.size());
  if (shuffled) Unshuffle(scratch, out.data(), out.size(), c.elem_size);
  return Status::Ok();
}

}  // namespace faultline::internal
