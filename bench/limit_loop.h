// The "limit" every paging benchmark compares against: the stored frames of
// a tensor held in memory and decompressed by a tight loop on a thread pool
// of the same size, with no I/O, checks or page installs.
#pragma once

#include <unistd.h>
#include <zstd.h>

#include <vector>

#include "bundle/codec.h"
#include "bundle/reader_impl.h"
#include "core/thread_pool.h"

namespace faultline::bench {

class LimitLoop {
 public:
  LimitLoop(const BundleReader& reader, const TensorInfo& t, unsigned threads = 0)
      : t_(t), impl_(reader.impl()), pool_(threads), out_(t.size), scratch_(t.size) {
    stored_.resize(t.frame_count);
    for (uint64_t i = 0; i < t.frame_count; i++) {
      const auto& r = impl_.frames[t.first_frame + i];
      stored_[i].resize(r.stored_length);
      if (pread(impl_.fd.get(), stored_[i].data(), r.stored_length, static_cast<off_t>(r.offset)) < 0)
        stored_[i].clear();
    }
    codec_ = BundleReader::Impl::CodecOf(t);
  }

  unsigned threads() const { return pool_.size(); }
  const std::vector<std::byte>& output() const { return out_; }

  // Decompresses every frame once.
  void Run() {
    pool_.ParallelFor(t_.frame_count, [&](size_t i) {
      const auto& r = impl_.frames[t_.first_frame + i];
      std::byte* dst = out_.data() + i * t_.page_size;
      if (codec_.codec == Codec::kRaw || (r.flags & internal::kFrameStoredRaw)) {
        memcpy(dst, stored_[i].data(), r.raw_length);
      } else if (codec_.shuffle) {
        std::byte* tmp = scratch_.data() + i * t_.page_size;
        ZSTD_decompress(tmp, r.raw_length, stored_[i].data(), r.stored_length);
        internal::Unshuffle(tmp, dst, r.raw_length, codec_.elem_size);
      } else {
        ZSTD_decompress(dst, r.raw_length, stored_[i].data(), r.stored_length);
      }
    });
  }

 private:
  const TensorInfo& t_;
  const BundleReader::Impl& impl_;
  internal::ThreadPool pool_;
  internal::FrameCodec codec_;
  std::vector<std::vector<std::byte>> stored_;
  std::vector<std::byte> out_, scratch_;
};

}  // namespace faultline::bench
