// BundleBuilder: collects models and objects, then Build streams every
// object through batches of frames: the batch is hashed and compressed on the
// pool, then written in order by the calling thread, which deduplicates
// frames by (content hash, length, codec, shuffle) so identical frames are
// stored once. Memory stays bounded by one batch whatever the bundle's size.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <ctime>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "bundle/codec.h"
#include "bundle/manifest.h"
#include "core/checksum.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"
#include "io/file.h"

namespace faultline {

using namespace internal;

namespace {

struct PendingObject {
  TensorInfo info;                 // name, dtype, shape, size, codec, level, shuffle, page_size
  bool is_blob = false;
  BlobKind kind = BlobKind::kOther;
  std::string media_type;
  std::string blob_bytes;          // owned bytes of a blob
  std::span<const std::byte> data; // in-memory tensor
  std::shared_ptr<const void> keepalive;
  TensorSource source;             // streamed tensor
  double min_ratio = 1.0;          // TensorOptions::min_ratio (not stored in the bundle)
};

struct DedupKey {
  Hash128 hash;
  uint32_t raw_length;
  uint32_t codec_key;  // codec, shuffle, stored verbatim, element size
  bool operator==(const DedupKey&) const = default;
};
struct DedupKeyHash {
  size_t operator()(const DedupKey& k) const noexcept { return k.hash.lo ^ (k.hash.hi * 31); }
};

std::string IsoTimeNow() {
  time_t now = time(nullptr);
  if (const char* sde = getenv("SOURCE_DATE_EPOCH")) now = static_cast<time_t>(strtoll(sde, nullptr, 10));
  struct tm tm;
  gmtime_r(&now, &tm);
  char buf[32];
  strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

struct ModelBuilder::Impl {
  ModelInfo info;  // name, version, metadata, signature, dependencies
  std::vector<PendingObject> objects;
  std::unordered_set<std::string> tensor_names, blob_names;  // (a scan of `objects` was quadratic)
  Status error;

  void Fail(Status s) {
    if (error.ok()) error = s;
  }
  PendingObject* NewObject(std::string name, DType dtype, std::vector<uint64_t> shape,
                           const TensorOptions& o, bool is_blob) {
    const char* what = is_blob ? "blob" : "tensor";
    Status s = CheckObjectName(name, what);
    if (s.ok()) s = CheckPageSize(o.page_size);
    if (s.ok() && (o.level < -131072 || o.level > 22))
      s = Status::Error(EINVAL, "zstd level %d out of range", o.level);
    if (s.ok() && !(o.min_ratio >= 1.0 && o.min_ratio <= 1e9))
      s = Status::Error(EINVAL, "min_ratio %g must be a number of at least 1", o.min_ratio);
    if (s.ok() && !(is_blob ? blob_names : tensor_names).insert(name).second)
      s = Status::Error(EEXIST, "duplicate %s name", what);
    uint64_t bytes = 0;
    if (s.ok()) s = ShapeBytes(dtype, shape, &bytes);
    if (!s.ok()) {
      Fail(s.WithPrefix("model '%.64s' %s '%.64s'", info.name.c_str(), what, name.c_str()));
      return nullptr;
    }
    PendingObject& p = objects.emplace_back();
    p.info.name = std::move(name);
    p.info.dtype = dtype;
    p.info.shape = std::move(shape);
    p.info.size = bytes;
    p.info.codec = o.codec;
    p.info.level = o.codec == Codec::kZstd ? o.level : 0;
    p.info.shuffle = o.codec == Codec::kZstd && o.shuffle && DTypeSize(dtype) > 1;
    p.info.page_size = PageFor(o.page_size, bytes);
    p.min_ratio = o.min_ratio;
    p.is_blob = is_blob;
    return &p;
  }
};

ModelBuilder& ModelBuilder::SetVersion(std::string v) {
  impl_->info.version = std::move(v);
  return *this;
}
ModelBuilder& ModelBuilder::SetMetadata(ModelMetadata m) {
  impl_->info.metadata = std::move(m);
  return *this;
}
ModelBuilder& ModelBuilder::SetMetadataValue(std::string key, std::string value) {
  impl_->info.metadata.extra[std::move(key)] = std::move(value);
  return *this;
}
ModelBuilder& ModelBuilder::SetSignature(Signature s) {
  impl_->info.signature = std::move(s);
  return *this;
}
ModelBuilder& ModelBuilder::AddDependency(std::string name, std::string version) {
  impl_->info.dependencies.push_back({std::move(name), std::move(version)});
  return *this;
}

ModelBuilder& ModelBuilder::AddBlob(std::string name, BlobKind kind, std::string media_type,
                                    std::string_view bytes) {
  TensorOptions o;  // zstd level 3, 64 KiB frames
  PendingObject* p = impl_->NewObject(std::move(name), DType::kU8, {bytes.size()}, o, true);
  if (!p) return *this;
  p->kind = kind;
  p->media_type = std::move(media_type);
  p->blob_bytes.assign(bytes);
  return *this;
}

ModelBuilder& ModelBuilder::AddTensor(std::string name, DType dtype, std::vector<uint64_t> shape,
                                      std::span<const std::byte> data, const TensorOptions& o,
                                      std::shared_ptr<const void> keepalive) {
  PendingObject* p = impl_->NewObject(std::move(name), dtype, std::move(shape), o, false);
  if (!p) return *this;
  if (data.size() != p->info.size) {
    impl_->Fail(Status::Error(EINVAL, "model '%.64s' tensor '%.64s': %zu bytes given, dtype and shape need %llu",
                              impl_->info.name.c_str(), p->info.name.c_str(), data.size(),
                              static_cast<unsigned long long>(p->info.size)));
    impl_->objects.pop_back();
    return *this;
  }
  p->data = data;
  p->keepalive = std::move(keepalive);
  return *this;
}

ModelBuilder& ModelBuilder::AddTensorStream(std::string name, DType dtype,
                                            std::vector<uint64_t> shape, TensorSource source,
                                            const TensorOptions& o) {
  PendingObject* p = impl_->NewObject(std::move(name), dtype, std::move(shape), o, false);
  if (!p) return *this;
  if (!source) {
    impl_->Fail(Status::Error(EINVAL, "tensor '%.64s': empty source", p->info.name.c_str()));
    impl_->objects.pop_back();
    return *this;
  }
  p->source = std::move(source);
  return *this;
}

struct BundleBuilder::Impl {
  std::vector<std::unique_ptr<ModelBuilder::Impl>> models;
  std::vector<std::unique_ptr<ModelBuilder>> handles;
  Status error;
  bool built = false;
};

BundleBuilder::BundleBuilder() : impl_(std::make_unique<Impl>()) {}
BundleBuilder::~BundleBuilder() = default;

ModelBuilder& BundleBuilder::AddModel(std::string name) {
  auto m = std::make_unique<ModelBuilder::Impl>();
  Status s = CheckModelName(name);
  for (const auto& other : impl_->models)
    if (s.ok() && other->info.name == name)
      s = Status::Error(EEXIST, "duplicate model name '%.64s'", name.c_str());
  if (!s.ok() && impl_->error.ok()) impl_->error = s;
  m->info.name = std::move(name);
  impl_->models.push_back(std::move(m));
  impl_->handles.push_back(std::unique_ptr<ModelBuilder>(new ModelBuilder(impl_->models.back().get())));
  return *impl_->handles.back();
}

namespace {

// One long-lived thread that runs one job at a time: the write stage of the
// pack pipeline (a thread per batch would cost more than a small batch).
class SerialWorker {
 public:
  SerialWorker() : thread_([this] { Loop(); }) {}
  ~SerialWorker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  // Starts `job`; the previous one must have been waited for.
  void Submit(std::function<Status()> job) {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
    busy_ = true;
    cv_.notify_all();
  }
  // Waits for the submitted job (if any) and returns its status.
  Status Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !busy_; });
    Status s = result_;
    result_ = Status::Ok();
    return s;
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || busy_; });
      if (busy_) {
        lock.unlock();
        Status s = job_();
        lock.lock();
        result_ = s;
        busy_ = false;
        cv_.notify_all();
      } else if (stop_) {
        return;
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::function<Status()> job_;
  Status result_;
  bool busy_ = false, stop_ = false;
  std::thread thread_;  // last: started once the state above exists
};

// The write half of Build: owns the file position, the frame table and the
// dedup index.
class FrameWriter {
 public:
  FrameWriter(int fd, ThreadPool& pool, const BuildOptions& opts, uint64_t total)
      : fd_(fd), pool_(pool), opts_(opts), total_(total) {}

  Status WriteObject(PendingObject& p, BuildSummary* sum);
  // Writes what is still buffered; call once every object is written.
  Status Finish() { return Flush(true); }
  std::vector<FrameRecord>& frames() { return frames_; }
  uint64_t position() const { return pos_; }

 private:
  // Frames reach the file in writes of several MiB that start on 2 MiB
  // boundaries (the first one aside): the page cache then holds the bundle
  // in large folios, which a mapping of the file (mmap mode) maps 2 MiB per
  // fault instead of 64 KiB, and writing costs a few syscalls per chunk
  // instead of one per frame.
  static constexpr uint64_t kWriteChunk = 8ull << 20, kWriteAlign = 2ull << 20;
  // Buffers `len` bytes at pos_ and moves pos_ past them (aligned).
  Status Append(const std::byte* p, size_t len);
  // Writes the buffer up to its last 2 MiB boundary in the file, or all of it.
  Status Flush(bool all);

  int fd_;
  ThreadPool& pool_;
  SerialWorker writer_;
  const BuildOptions& opts_;
  uint64_t total_, done_ = 0;
  uint64_t pos_ = kHeaderSize;
  std::vector<std::byte> wbuf_;       // file bytes from wstart_ on, not yet written
  uint64_t wstart_ = kHeaderSize;
  std::vector<FrameRecord> frames_;
  std::unordered_map<DedupKey, uint64_t, DedupKeyHash> dedup_;
};

Status FrameWriter::Append(const std::byte* p, size_t len) {
  if (wbuf_.capacity() == 0) wbuf_.reserve(kWriteChunk + kWriteAlign);
  wbuf_.resize(pos_ - wstart_);  // the padding before this frame is zeros
  wbuf_.insert(wbuf_.end(), p, p + len);
  pos_ = AlignUp(pos_ + len, kAlign);
  return wbuf_.size() >= kWriteChunk ? Flush(false) : Status::Ok();
}

Status FrameWriter::Flush(bool all) {
  uint64_t end = wstart_ + wbuf_.size();
  uint64_t cut = all ? end : end / kWriteAlign * kWriteAlign;
  if (cut <= wstart_) return Status::Ok();
  FL_RETURN_IF_ERROR(PwriteFull(fd_, wbuf_.data(), cut - wstart_, wstart_, "bundle frames"));
  wbuf_.erase(wbuf_.begin(), wbuf_.begin() + static_cast<ptrdiff_t>(cut - wstart_));
  wstart_ = cut;
  return Status::Ok();
}

Status FrameWriter::WriteObject(PendingObject& p, BuildSummary* sum) {
  TensorInfo& t = p.info;
  t.first_frame = frames_.size();
  t.frame_count = (t.size + t.page_size - 1) / t.page_size;
  t.stored_size = 0;
  const uint64_t page = t.page_size;
  FrameCodec codec{t.codec, t.level, t.shuffle, DTypeSize(t.dtype), p.min_ratio};
  uint32_t codec_key = static_cast<uint32_t>(t.codec) | (t.shuffle ? 2u : 0u) |
                       static_cast<uint32_t>(codec.elem_size << 8);
  // A batch: a few frames per thread, at most 128 MiB of input. Two batch
  // buffers form a pipeline: the pool compresses batch k+1 while a writer
  // thread deduplicates and writes batch k.
  uint64_t batch = std::max<uint64_t>(1, std::min<uint64_t>(pool_.size() * 8ull, (128ull << 20) / page));
  batch = std::min<uint64_t>(batch, std::max<uint64_t>(t.frame_count, 1));
  // Buffers for what this object needs: a tensor smaller than a page
  // (checkpoints have many) must not cost a full batch of allocations.
  const uint64_t span = std::min<uint64_t>(page, std::max<uint64_t>(t.size, 1));
  const size_t bound = MaxStoredLength(t.codec, span);
  struct Slot {
    size_t stored = 0;
    uint32_t flags = 0;
    Hash128 hash;
    Status status;
  };
  struct Batch {
    std::vector<std::byte> raw, out, shuffle;
    std::vector<Slot> slots;
    uint64_t first = 0, count = 0, len = 0;
  };
  Batch bufs[2];
  for (auto& b : bufs) {
    b.raw.resize(p.source ? batch * span : 0);
    b.out.resize(batch * bound);
    b.shuffle.resize(t.shuffle ? batch * span : 0);
    b.slots.resize(batch);
  }
  const std::byte* blob = reinterpret_cast<const std::byte*>(p.blob_bytes.data());

  // Runs on the writer thread; frames_, dedup_, pos_ and *sum are touched
  // only here while a write is pending.
  auto write_batch = [&](Batch& b) -> Status {
    for (uint64_t i = 0; i < b.count; i++) {
      Slot& s = b.slots[i];
      FL_RETURN_IF_ERROR(s.status.WithPrefix("tensor '%.64s' frame %llu", t.name.c_str(),
                                             static_cast<unsigned long long>(b.first + i)));
      uint32_t flen = static_cast<uint32_t>(std::min<uint64_t>(page, b.len - i * page));
      // A frame kept verbatim (min_ratio) is not shared with the same bytes
      // stored compressed, nor the other way round.
      DedupKey key{s.hash, flen, codec_key | ((s.flags & kFrameStoredRaw) ? 4u : 0u)};
      auto it = dedup_.find(key);
      sum->frames++;
      if (it != dedup_.end()) {
        frames_.push_back(frames_[it->second]);
        sum->dedup_saved_bytes += frames_.back().stored_length;
      } else {
        FrameRecord r;
        r.offset = pos_;
        r.stored_length = static_cast<uint32_t>(s.stored);
        r.raw_length = flen;
        r.flags = s.flags;
        const std::byte* stored = b.out.data() + i * bound;
        r.checksum = Checksum64(stored, s.stored);
        FL_RETURN_IF_ERROR(Append(stored, s.stored));
        dedup_.emplace(key, frames_.size());
        frames_.push_back(r);
        sum->unique_frames++;
        sum->stored_bytes += s.stored;
      }
      t.stored_size += frames_.back().stored_length;
    }
    return Status::Ok();
  };

  bool pending = false;
  Status status;
  for (uint64_t b0 = 0, k = 0; b0 < t.frame_count && status.ok(); b0 += batch, k++) {
    Batch& b = bufs[k % 2];
    b.first = b0;
    b.count = std::min(batch, t.frame_count - b0);
    uint64_t start = b0 * page;
    b.len = std::min<uint64_t>(b.count * page, t.size - start);
    const std::byte* raw;
    if (p.source) {
      status = p.source(start, {b.raw.data(), b.len}).WithPrefix("tensor '%.64s' source", t.name.c_str());
      if (!status.ok()) break;
      raw = b.raw.data();
    } else {
      raw = (p.is_blob ? blob : p.data.data()) + start;
    }
    auto encode = [&](size_t i) {
      uint64_t off = i * page;
      size_t flen = std::min<uint64_t>(page, b.len - off);
      Slot& s = b.slots[i];
      s.hash = ContentHash128(raw + off, flen);
      auto r = EncodeFrame(codec, {raw + off, flen}, {b.out.data() + i * bound, bound},
                           t.shuffle ? b.shuffle.data() + i * span : nullptr, &s.flags);
      s.status = r.ok() ? Status::Ok() : r.status();
      s.stored = r.ok() ? r.value() : 0;
    };
    if (t.frame_count <= 1) {
      // One frame (checkpoints hold thousands of small tensors): on this
      // thread, without two thread hand-offs per tensor. No write is
      // pending between objects.
      if (b.count) encode(0);
      status = write_batch(b);
    } else {
      pool_.ParallelFor(b.count, encode);
      if (pending) status = writer_.Wait();
      pending = false;
      if (!status.ok()) break;
      writer_.Submit([&write_batch, &b] { return write_batch(b); });
      pending = true;
    }
    done_ += b.len;
    if (opts_.progress) opts_.progress(done_, total_);
  }
  if (pending) {
    Status last = writer_.Wait();
    if (status.ok()) status = last;
  }
  return status;
}

}  // namespace

Result<BuildSummary> BundleBuilder::Build(const std::string& path, const BuildOptions& options) {
  auto t0 = std::chrono::steady_clock::now();
  if (impl_->built) return Status::Error(EINVAL, "Build was already called on this builder");
  impl_->built = true;
  FL_RETURN_IF_ERROR(impl_->error);
  for (const auto& m : impl_->models) FL_RETURN_IF_ERROR(m->error);

  BuildSummary sum;
  for (const auto& m : impl_->models)
    for (const auto& p : m->objects) sum.logical_bytes += p.info.size;

  FL_ASSIGN_OR_RETURN(AtomicFile file, AtomicFile::Create(path));
  ThreadPool pool(options.threads);
  FrameWriter writer(file.fd(), pool, options, sum.logical_bytes);

  BundleInfo info;
  info.format_version = kBundleFormatVersion;
  info.producer = options.producer.empty() ? std::string("faultline ") + Version() : options.producer;
  info.created = IsoTimeNow();
  for (auto& m : impl_->models) {
    ModelInfo mi = m->info;
    for (auto& p : m->objects) {
      FL_RETURN_IF_ERROR(writer.WriteObject(p, &sum).WithPrefix("model '%.64s'", mi.name.c_str()));
      if (p.is_blob) {
        BlobInfo b;
        b.name = p.info.name;
        b.kind = p.kind;
        b.media_type = p.media_type;
        b.data = p.info;
        mi.blobs.push_back(std::move(b));
      } else {
        mi.tensors.push_back(p.info);
      }
    }
    info.models.push_back(std::move(mi));
  }

  FL_RETURN_IF_ERROR(writer.Finish());
  Header h;
  h.version = kBundleFormatVersion;
  h.data_offset = kHeaderSize;
  h.data_length = writer.position() - kHeaderSize;
  const auto& frames = writer.frames();
  h.frame_table_offset = AlignUp(writer.position(), kAlign);
  h.frame_count = frames.size();
  std::vector<std::byte> table(frames.size() * kFrameRecordSize);
  for (size_t i = 0; i < frames.size(); i++)
    EncodeFrameRecord(frames[i], table.data() + i * kFrameRecordSize);
  h.frame_table_checksum = Checksum64(table.data(), table.size());
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), table.data(), table.size(), h.frame_table_offset, "frame table"));

  std::string manifest = ManifestToJson(info);
  if (manifest.size() > kMaxManifestSize)
    return Status::Error(EFBIG, "manifest of %zu bytes exceeds the format's limit", manifest.size());
  h.manifest_offset = AlignUp(h.frame_table_offset + table.size(), kAlign);
  h.manifest_length = manifest.size();
  h.manifest_checksum = Checksum64(manifest.data(), manifest.size());
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), manifest.data(), manifest.size(), h.manifest_offset, "manifest"));
  h.file_size = AlignUp(h.manifest_offset + manifest.size(), kAlign);
  if (ftruncate(file.fd(), static_cast<off_t>(h.file_size)) != 0)
    return Status::Error(errno, "cannot size '%s'", path.c_str());
  std::byte hdr[kHeaderSize];
  EncodeHeader(h, hdr);
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), hdr, kHeaderSize, 0, "header"));
  FL_RETURN_IF_ERROR(file.Commit());

  sum.file_size = h.file_size;
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sum;
}

}  // namespace faultline
