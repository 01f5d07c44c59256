// BundleReader: Open checks the header, the frame table and the manifest
// before anything is trusted; reads check each frame's checksum before
// decompressing it. All sizes taken from the file are bounded by the file's
// real size before anything is allocated from them.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "bundle/manifest.h"
#include "bundle/reader_impl.h"
#include "core/checksum.h"
#include "core/status_macros.h"
#include "faultline/size.hpp"
#include "io/uring.h"
#include "pager/options.h"

namespace faultline {

using namespace internal;

namespace {

constexpr unsigned kDefaultMaxExpansion = 4096;

Status CheckLayout(const Header& h, uint64_t real_size) {
  if (h.file_size != real_size)
    return Status::Error(EINVAL, "truncated or extended: header says %llu bytes, file has %llu",
                         static_cast<unsigned long long>(h.file_size),
                         static_cast<unsigned long long>(real_size));
  auto ull = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  if (h.data_offset != kHeaderSize || h.data_length > real_size - kHeaderSize)
    return Status::Error(EINVAL, "frame data [%llu, +%llu) lies outside the file", ull(h.data_offset),
                         ull(h.data_length));
  uint64_t data_end = h.data_offset + h.data_length;
  if (h.frame_table_offset < data_end || h.frame_table_offset > real_size ||
      h.frame_count > (real_size - h.frame_table_offset) / kFrameRecordSize)
    return Status::Error(EINVAL, "frame table (%llu records at %llu) lies outside the file",
                         ull(h.frame_count), ull(h.frame_table_offset));
  uint64_t table_end = h.frame_table_offset + h.frame_count * kFrameRecordSize;
  if (h.manifest_offset < table_end || h.manifest_offset > real_size ||
      h.manifest_length > real_size - h.manifest_offset)
    return Status::Error(EINVAL, "manifest [%llu, +%llu) lies outside the file or overlaps the frame table",
                         ull(h.manifest_offset), ull(h.manifest_length));
  if (h.manifest_length > kMaxManifestSize)
    return Status::Error(EFBIG, "manifest of %llu bytes is larger than the %llu-byte limit",
                         ull(h.manifest_length), ull(kMaxManifestSize));
  return Status::Ok();
}

// Every frame inside the data area, aligned, with known flags, and no two
// distinct frames overlapping (deduplicated references share one offset and
// must agree on length and checksum). Counts the distinct stored frames and
// their bytes on the way.
Status CheckFrames(const Header& h, const std::vector<FrameRecord>& frames, uint64_t* unique,
                   uint64_t* stored) {
  uint64_t data_end = h.data_offset + h.data_length;
  std::vector<uint64_t> order(frames.size());
  for (uint64_t i = 0; i < frames.size(); i++) {
    const FrameRecord& r = frames[i];
    order[i] = i;
    if (r.offset % kAlign != 0 || r.offset < h.data_offset || r.offset > data_end ||
        r.stored_length > data_end - r.offset)
      return Status::Error(EINVAL, "frame record %llu: [%llu, +%u) is outside the frame data or unaligned",
                           static_cast<unsigned long long>(i),
                           static_cast<unsigned long long>(r.offset), r.stored_length);
    if ((r.flags & ~kFrameStoredRaw) != 0 || r.reserved != 0)
      return Status::Error(EINVAL, "frame record %llu has unknown flags",
                           static_cast<unsigned long long>(i));
    if (r.raw_length > kMaxPageSize)
      return Status::Error(EINVAL, "frame record %llu: length %u is larger than any page size",
                           static_cast<unsigned long long>(i), r.raw_length);
  }
  std::sort(order.begin(), order.end(),
            [&](uint64_t a, uint64_t b) { return frames[a].offset < frames[b].offset; });
  *unique = order.empty() ? 0 : 1;
  *stored = order.empty() ? 0 : frames[order[0]].stored_length;
  for (size_t k = 1; k < order.size(); k++) {
    const FrameRecord& a = frames[order[k - 1]];
    const FrameRecord& b = frames[order[k]];
    if (a.offset == b.offset) {
      if (a.stored_length != b.stored_length || a.checksum != b.checksum || a.flags != b.flags ||
          a.raw_length != b.raw_length)
        return Status::Error(EINVAL, "frame records %llu and %llu share offset %llu but disagree",
                             static_cast<unsigned long long>(order[k - 1]),
                             static_cast<unsigned long long>(order[k]),
                             static_cast<unsigned long long>(a.offset));
    } else if (a.offset + a.stored_length > b.offset) {
      return Status::Error(EINVAL, "frame records %llu and %llu overlap",
                           static_cast<unsigned long long>(order[k - 1]),
                           static_cast<unsigned long long>(order[k]));
    } else {
      ++*unique;
      *stored += b.stored_length;
    }
  }
  return Status::Ok();
}

// Per-thread buffers for reads; grown, never shrunk.
struct Scratch {
  std::vector<std::byte> stored;
  std::vector<std::byte> shuffle;
  std::vector<std::byte> sink;
  std::vector<ReadOp> ops;
};
thread_local Scratch t_scratch;

void Grow(std::vector<std::byte>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

ThreadPool& BundleReader::Impl::Pool() const {
  std::call_once(pool_once, [&] { pool = std::make_unique<ThreadPool>(threads); });
  return *pool;
}

Status BundleReader::Impl::DecodeRange(const TensorInfo& obj, uint64_t first, uint64_t count,
                                       std::byte* out, const char* label) const {
  Scratch& s = t_scratch;
  if (out && obj.codec == Codec::kRaw) return ReadRawRange(obj, first, count, out, label);
  // Stored frames go back to back into s.stored, each at an aligned slot.
  uint64_t total = 0;
  s.ops.clear();
  std::vector<uint64_t> slot(count);
  for (uint64_t i = 0; i < count; i++) {
    const FrameRecord& r = frames[obj.first_frame + first + i];
    slot[i] = total;
    // Adjacent frames in the file become one read.
    if (i > 0) {
      const FrameRecord& p = frames[obj.first_frame + first + i - 1];
      if (p.offset + AlignUp(p.stored_length, kAlign) == r.offset &&
          s.ops.back().len + AlignUp(p.stored_length, kAlign) - p.stored_length < (1u << 30)) {
        uint64_t gap = AlignUp(p.stored_length, kAlign) - p.stored_length;
        s.ops.back().len += static_cast<uint32_t>(gap + r.stored_length);
        slot[i] = total + gap;
        total += gap + r.stored_length;
        continue;
      }
    }
    s.ops.push_back(ReadOp{fd.get(), r.offset, r.stored_length, nullptr});
    total += r.stored_length;
  }
  Grow(s.stored, total);
  uint64_t pos = 0;
  for (auto& op : s.ops) {
    op.buf = s.stored.data() + pos;
    pos += op.len;
  }
  Status rs = ReadBatch(s.ops, "bundle frames");
  if (!rs.ok()) return rs.WithPrefix("%s frames %llu-%llu", label,
                                     static_cast<unsigned long long>(first),
                                     static_cast<unsigned long long>(first + count - 1));
  FrameCodec codec = CodecOf(obj);
  for (uint64_t i = 0; i < count; i++) {
    const FrameRecord& r = frames[obj.first_frame + first + i];
    std::byte* dst;
    if (out) {
      dst = out + i * obj.page_size;
    } else {
      Grow(s.sink, r.raw_length);
      dst = s.sink.data();
    }
    if (codec.shuffle) Grow(s.shuffle, r.raw_length);
    Status ds = DecodeFrame(codec, r, {s.stored.data() + slot[i], r.stored_length},
                            {dst, r.raw_length}, s.shuffle.data());
    if (!ds.ok())
      return ds.WithPrefix("%s frame %llu", label, static_cast<unsigned long long>(first + i));
  }
  return Status::Ok();
}

// Raw frames are stored verbatim (stored length == length, checked on open):
// read them straight into place and check them there, saving a copy.
Status BundleReader::Impl::ReadRawRange(const TensorInfo& obj, uint64_t first, uint64_t count,
                                        std::byte* out, const char* label) const {
  Scratch& s = t_scratch;
  s.ops.clear();
  for (uint64_t i = 0; i < count; i++) {
    const FrameRecord& r = frames[obj.first_frame + first + i];
    std::byte* dst = out + i * obj.page_size;
    if (!s.ops.empty()) {
      ReadOp& prev = s.ops.back();
      if (prev.offset + prev.len == r.offset && static_cast<std::byte*>(prev.buf) + prev.len == dst &&
          prev.len < (1u << 30)) {
        prev.len += r.stored_length;
        continue;
      }
    }
    s.ops.push_back(ReadOp{fd.get(), r.offset, r.stored_length, dst});
  }
  Status rs = ReadBatch(s.ops, "bundle frames");
  if (!rs.ok()) return rs.WithPrefix("%s frames %llu-%llu", label,
                                     static_cast<unsigned long long>(first),
                                     static_cast<unsigned long long>(first + count - 1));
  for (uint64_t i = 0; i < count; i++) {
    const FrameRecord& r = frames[obj.first_frame + first + i];
    if (!ChecksumMatches(r.checksum, out + i * obj.page_size, r.raw_length))
      return Status::Error(EBADMSG, "%s frame %llu: checksum does not match", label,
                           static_cast<unsigned long long>(first + i));
  }
  return Status::Ok();
}

Status BundleReader::Impl::DecodeAll(const TensorInfo& obj, std::byte* out, const char* label,
                                     uint64_t range_first, uint64_t range_count) const {
  if (range_first >= obj.frame_count) return Status::Ok();
  range_count = std::min(range_count, obj.frame_count - range_first);
  // Chunks of about 4 MiB keep reads large and every thread busy.
  uint64_t per_chunk = std::max<uint64_t>(1, (4u << 20) / obj.page_size);
  uint64_t chunks = (range_count + per_chunk - 1) / per_chunk;
  std::mutex mu;
  Status first_error;
  uint64_t error_chunk = UINT64_MAX;
  Pool().ParallelFor(chunks, [&](size_t c) {
    uint64_t first = c * per_chunk;
    uint64_t count = std::min(per_chunk, range_count - first);
    Status s = DecodeRange(obj, range_first + first, count,
                           out ? out + first * obj.page_size : nullptr, label);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      if (c < error_chunk) {  // report the first failing frame, whatever the thread order
        error_chunk = c;
        first_error = s;
      }
    }
  });
  return first_error;
}

// The decompression-bomb limits of ReaderOptions.
static Status CheckDeclaredSize(const BundleInfo& info, const ReaderOptions& options) {
  uint64_t expansion = options.max_expansion, most = options.max_size;
  if (expansion == ReaderOptions::kFromEnvironment) {
    unsigned e = kDefaultMaxExpansion;
    OptionUnsigned(OptionId::kMaxExpansion, UINT_MAX, &e);
    expansion = e;
  }
  if (most == ReaderOptions::kFromEnvironment) {
    most = 0;
    OptionSize(OptionId::kMaxSize, &most);
  }
  uint64_t declared = info.logical_bytes;
  uint64_t allowed = 0;
  if (__builtin_mul_overflow(info.file_size, expansion, &allowed)) allowed = UINT64_MAX;
  allowed = std::max<uint64_t>(allowed, 1ull << 30);
  if (expansion && declared > allowed)
    return Status::Error(EFBIG,
                         "the bundle declares %s of tensors and blobs in a file of %s (%.0fx; the limit is %llux): "
                         "refused as a possible decompression bomb; raise the limit with --max-expansion or "
                         "FAULTLINE_MAX_EXPANSION (0: none) if the bundle is trusted",
                         FormatSize(declared).c_str(), FormatSize(info.file_size).c_str(),
                         static_cast<double>(declared) / static_cast<double>(std::max<uint64_t>(info.file_size, 1)),
                         static_cast<unsigned long long>(expansion));
  if (most && declared > most)
    return Status::Error(EFBIG, "the bundle declares %s of tensors and blobs, more than the limit of %s "
                         "(--max-size, FAULTLINE_MAX_SIZE)",
                         FormatSize(declared).c_str(), FormatSize(most).c_str());
  return Status::Ok();
}

BundleReader::BundleReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BundleReader::~BundleReader() = default;

const BundleInfo& BundleReader::info() const noexcept { return impl_->info; }

Result<std::unique_ptr<BundleReader>> BundleReader::Open(const std::string& path,
                                                         const ReaderOptions& options) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Error(errno, "cannot open '%s'", path.c_str());
  UniqueFd owned(fd);
  auto r = OpenFd(fd, options);
  if (!r.ok()) return r.status().WithPrefix("%s", path.c_str());
  return r;
}

Result<std::unique_ptr<BundleReader>> BundleReader::OpenFd(int fd, const ReaderOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->threads = options.threads;
  int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) return Status::Error(errno, "cannot duplicate the descriptor");
  impl->fd.reset(dup_fd);
  FL_ASSIGN_OR_RETURN(uint64_t size, FileSize(dup_fd));
  std::byte hdr[kHeaderSize];
  if (size < kHeaderSize)
    return Status::Error(EINVAL, "truncated: %llu bytes is smaller than the %llu-byte header",
                         static_cast<unsigned long long>(size),
                         static_cast<unsigned long long>(kHeaderSize));
  FL_RETURN_IF_ERROR(PreadFull(dup_fd, hdr, kHeaderSize, 0, "header"));
  Header& h = impl->header;
  FL_RETURN_IF_ERROR(DecodeHeader({hdr, kHeaderSize}, &h));
  FL_RETURN_IF_ERROR(CheckLayout(h, size));

  std::vector<std::byte> table(h.frame_count * kFrameRecordSize);
  FL_RETURN_IF_ERROR(PreadFull(dup_fd, table.data(), table.size(), h.frame_table_offset, "frame table"));
  if (!ChecksumMatches(h.frame_table_checksum, table.data(), table.size()))
    return Status::Error(EBADMSG, "frame table checksum does not match");
  impl->frames.resize(h.frame_count);
  for (uint64_t i = 0; i < h.frame_count; i++)
    impl->frames[i] = DecodeFrameRecord(table.data() + i * kFrameRecordSize);
  uint64_t unique_frames = 0, stored_bytes = 0;
  FL_RETURN_IF_ERROR(CheckFrames(h, impl->frames, &unique_frames, &stored_bytes));

  std::string manifest(h.manifest_length, '\0');
  FL_RETURN_IF_ERROR(PreadFull(dup_fd, manifest.data(), manifest.size(), h.manifest_offset, "manifest"));
  if (!ChecksumMatches(h.manifest_checksum, manifest.data(), manifest.size()))
    return Status::Error(EBADMSG, "manifest checksum does not match");
  BundleInfo& info = impl->info;
  FL_RETURN_IF_ERROR(ManifestFromJson(manifest, impl->frames, &info));
  info.file_size = size;
  info.unique_frames = unique_frames;
  info.stored_bytes = stored_bytes;
  FL_RETURN_IF_ERROR(CheckDeclaredSize(info, options));
  return std::unique_ptr<BundleReader>(new BundleReader(std::move(impl)));
}

Status BundleReader::ReadFrame(const TensorInfo& obj, uint64_t index, std::span<std::byte> out) const {
  if (index >= obj.frame_count)
    return Status::Error(ERANGE, "tensor '%.64s' has %llu frames; %llu asked", obj.name.c_str(),
                         static_cast<unsigned long long>(obj.frame_count),
                         static_cast<unsigned long long>(index));
  const FrameRecord& r = impl_->frames[obj.first_frame + index];
  if (out.size() < r.raw_length)
    return Status::Error(ENOBUFS, "buffer of %zu bytes for a frame of %u", out.size(), r.raw_length);
  char label[96];
  snprintf(label, sizeof(label), "tensor '%.64s'", obj.name.c_str());
  return impl_->DecodeRange(obj, index, 1, out.data(), label);
}

Status BundleReader::ReadTensor(const TensorInfo& obj, std::span<std::byte> out) const {
  if (out.size() != obj.size)
    return Status::Error(EINVAL, "buffer of %zu bytes for tensor '%.64s' of %llu", out.size(),
                         obj.name.c_str(), static_cast<unsigned long long>(obj.size));
  char label[96];
  snprintf(label, sizeof(label), "tensor '%.64s'", obj.name.c_str());
  return impl_->DecodeAll(obj, out.data(), label);
}

Result<std::vector<std::byte>> BundleReader::ReadTensor(const TensorInfo& obj) const {
  std::vector<std::byte> out;
  try {
    out.resize(obj.size);
  } catch (const std::exception&) {
    return Status::Error(ENOMEM, "tensor '%.64s' of %llu bytes does not fit in memory", obj.name.c_str(),
                         static_cast<unsigned long long>(obj.size));
  }
  FL_RETURN_IF_ERROR(ReadTensor(obj, out));
  return out;
}

Result<std::string> BundleReader::ReadBlob(const BlobInfo& blob) const {
  std::string out;
  try {
    out.resize(blob.data.size);
  } catch (const std::exception&) {
    return Status::Error(ENOMEM, "blob '%.64s' of %llu bytes does not fit in memory", blob.name.c_str(),
                         static_cast<unsigned long long>(blob.data.size));
  }
  char label[96];
  snprintf(label, sizeof(label), "blob '%.64s'", blob.name.c_str());
  FL_RETURN_IF_ERROR(impl_->DecodeAll(blob.data, reinterpret_cast<std::byte*>(out.data()), label));
  return out;
}

Status BundleReader::Verify(const std::function<void(uint64_t, uint64_t)>& progress) const {
  uint64_t total = 0, done = 0;
  for (const auto& m : impl_->info.models) {
    for (const auto& b : m.blobs) total += b.data.size;
    for (const auto& t : m.tensors) total += t.size;
  }
  char label[200];
  for (const auto& m : impl_->info.models) {
    for (const auto& b : m.blobs) {
      snprintf(label, sizeof(label), "model '%.64s' blob '%.64s'", m.name.c_str(), b.name.c_str());
      FL_RETURN_IF_ERROR(impl_->DecodeAll(b.data, nullptr, label));
      done += b.data.size;
      if (progress) progress(done, total);
    }
    for (const auto& t : m.tensors) {
      snprintf(label, sizeof(label), "model '%.64s' tensor '%.64s'", m.name.c_str(), t.name.c_str());
      FL_RETURN_IF_ERROR(impl_->DecodeAll(t, nullptr, label));
      done += t.size;
      if (progress) progress(done, total);
    }
  }
  return Status::Ok();
}

}  // namespace faultline
