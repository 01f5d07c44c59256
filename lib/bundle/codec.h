// Frame codecs: raw and zstd, with the optional byte-shuffle filter that
// groups byte j of every element together before compression. Encoding
// falls back to storing a frame verbatim (kFrameStoredRaw) when compression
// does not shrink it. Decoding checks the checksum before decompressing and
// the decompressed length after: a bad frame is an error, never garbage.
// Thread-safety: functions are reentrant; zstd contexts are per thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "bundle/format.h"
#include "faultline/bundle.hpp"

namespace faultline::internal {

struct FrameCodec {
  Codec codec = Codec::kRaw;
  int level = 3;
  bool shuffle = false;
  size_t elem_size = 1;  // shuffle granularity
  double min_ratio = 1.0;  // encoding: keep a compressed frame only at raw/compressed >= this
};

// Upper bound of a stored frame's length for raw length `raw_len`.
size_t MaxStoredLength(Codec codec, size_t raw_len) noexcept;

// Encodes `raw` into `out` (capacity >= MaxStoredLength); `scratch` holds
// raw.size() bytes for the shuffle. Returns the stored length and sets *flags.
Result<size_t> EncodeFrame(const FrameCodec& c, std::span<const std::byte> raw,
                           std::span<std::byte> out, std::byte* scratch, uint32_t* flags);

// Checks `stored` against the record's checksum, then decodes it into `out`
// (exactly rec.raw_length bytes). `scratch` holds raw_length bytes (needed
// only with shuffle). fault path
Status DecodeFrame(const FrameCodec& c, const FrameRecord& rec, std::span<const std::byte> stored,
                   std::span<std::byte> out, std::byte* scratch) noexcept;

// Byte-shuffle filter and its inverse over `len` bytes of `elem` -byte elements.
void Shuffle(const std::byte* in, std::byte* out, size_t len, size_t elem) noexcept;
void Unshuffle(const std::byte* in, std::byte* out, size_t len, size_t elem) noexcept;

}  // namespace faultline::internal
