// The reader's state, shared with the layers above the bundle (the pager
// reads frames through it). Everything here is immutable after Open, so any
// number of threads may read frames at once.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "bundle/codec.h"
#include "bundle/format.h"
#include "core/thread_pool.h"
#include "faultline/bundle.hpp"
#include "io/file.h"

namespace faultline {

struct BundleReader::Impl {
  internal::UniqueFd fd;
  internal::Header header;
  std::vector<internal::FrameRecord> frames;
  BundleInfo info;
  unsigned threads = 0;

  mutable std::once_flag pool_once;
  mutable std::unique_ptr<internal::ThreadPool> pool;
  internal::ThreadPool& Pool() const;

  static internal::FrameCodec CodecOf(const TensorInfo& t) noexcept {
    return {t.codec, t.level, t.shuffle, DTypeSize(t.dtype)};
  }
  // Decodes frames [first, first + count) of `obj` into `out` (their
  // uncompressed bytes, back to back), or only checks them when `out` is
  // null. Reads with one batched io_uring submission. `label` names the
  // object in errors.
  Status DecodeRange(const TensorInfo& obj, uint64_t first, uint64_t count, std::byte* out,
                     const char* label) const;
  Status ReadRawRange(const TensorInfo& obj, uint64_t first, uint64_t count, std::byte* out,
                      const char* label) const;
  // Frames [first, first + count) (the whole object by default), in chunks
  // spread over the pool.
  Status DecodeAll(const TensorInfo& obj, std::byte* out, const char* label, uint64_t first = 0,
                   uint64_t count = UINT64_MAX) const;
};

}  // namespace faultline
