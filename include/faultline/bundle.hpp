// The .apbundle format's public API: BundleBuilder writes a bundle,
// BundleReader opens one, lists its models and tensors and reads frames and
// whole tensors (checked). The on-disk layout is specified in docs/FORMAT.md.
// Thread-safety: a BundleBuilder is used from one thread; a BundleReader's
// const methods and reads may be called from any number of threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/dtype.hpp"
#include "faultline/status.hpp"

namespace faultline {

inline constexpr uint32_t kBundleFormatVersion = 1;
inline constexpr uint32_t kDefaultPageSize = 64 * 1024;
inline constexpr uint32_t kMinPageSize = 4 * 1024;
inline constexpr uint32_t kMaxPageSize = 64 * 1024 * 1024;

enum class Codec : uint8_t { kRaw = 0, kZstd = 1 };
// "raw" / "zstd", and the inverse (false for an unknown name).
const char* CodecName(Codec c) noexcept;
bool ParseCodec(std::string_view name, Codec* out) noexcept;

// How one tensor is cut and compressed.
struct TensorOptions {
  Codec codec = Codec::kZstd;        // per-tensor codec
  int level = 3;                     // zstd level (negative = fast levels, up to 22)
  bool shuffle = false;              // group the bytes of each element before zstd
  uint32_t page_size = kDefaultPageSize;  // frame size: a power of two in [4 KiB, 64 MiB]
  // A frame is stored compressed only when raw/compressed >= min_ratio, and
  // verbatim otherwise (1.0: whenever compression saves a byte). A stored-raw
  // frame loads with a copy instead of a decode (several times faster):
  // 1.1 keeps weights that compress less than 1.1x raw, trading their last
  // few percent of space for load speed. At least 1.
  double min_ratio = 1.0;
};

// One dimension of a signature shape: static when size >= 0, dynamic
// otherwise, optionally named ("batch").
struct SigDim {
  int64_t size = -1;
  std::string name;
};

struct TensorSignature {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<SigDim> shape;
};

// The inference signature of a model: its named inputs and outputs.
struct Signature {
  std::vector<TensorSignature> inputs;
  std::vector<TensorSignature> outputs;
};

struct Dependency {
  std::string name;
  std::string version;
};

struct ModelMetadata {
  std::string author;
  std::string license;
  std::string description;
  std::map<std::string, double> metrics;      // training metrics ("accuracy": 0.91)
  std::map<std::string, std::string> extra;   // free-form key/values
};

// What a blob holds; architecture/config and pre-/post-processing config.
enum class BlobKind : uint8_t { kArchitecture, kConfig, kPreprocess, kPostprocess, kOther };
const char* BlobKindName(BlobKind k) noexcept;
bool ParseBlobKind(std::string_view name, BlobKind* out) noexcept;

// A stored object's frames: entries [first_frame, first_frame + frame_count)
// of the bundle's frame table.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  uint64_t size = 0;          // bytes, uncompressed
  Codec codec = Codec::kRaw;
  int level = 0;
  bool shuffle = false;
  uint32_t page_size = kDefaultPageSize;
  uint64_t first_frame = 0;
  uint64_t frame_count = 0;
  uint64_t stored_size = 0;   // sum of the stored lengths of its frames
};

struct BlobInfo {
  std::string name;
  BlobKind kind = BlobKind::kOther;
  std::string media_type;     // e.g. "application/json"
  TensorInfo data;            // stored like a u8 tensor
};

struct ModelInfo {
  std::string name;
  std::string version;
  ModelMetadata metadata;
  Signature signature;
  std::vector<Dependency> dependencies;
  std::vector<BlobInfo> blobs;
  std::vector<TensorInfo> tensors;

  // nullptr when absent.
  const TensorInfo* FindTensor(std::string_view name) const noexcept;
  const BlobInfo* FindBlob(std::string_view name) const noexcept;
};

struct BundleInfo {
  uint32_t format_version = 0;
  std::string producer;
  std::string created;          // ISO 8601, UTC
  std::vector<ModelInfo> models;
  uint64_t file_size = 0;
  uint64_t logical_bytes = 0;   // sum of tensor and blob sizes
  uint64_t frame_refs = 0;      // frames referenced by objects
  uint64_t unique_frames = 0;   // frames stored (after deduplication)
  uint64_t stored_bytes = 0;    // sum of the stored lengths of the unique frames

  const ModelInfo* FindModel(std::string_view name) const noexcept;
};

// Source of a streamed tensor: fill `out` with the bytes at `offset`.
using TensorSource = std::function<Status(uint64_t offset, std::span<std::byte> out)>;

class BundleBuilder;

// Adds the parts of one model. Obtained from BundleBuilder::AddModel; valid
// while its builder lives. Errors (a bad name, a size that disagrees with the
// shape) are kept and returned by BundleBuilder::Build.
class ModelBuilder {
 public:
  ModelBuilder& SetVersion(std::string version);
  ModelBuilder& SetMetadata(ModelMetadata metadata);
  // Sets one free-form key/value of the metadata (metadata.extra[key]).
  ModelBuilder& SetMetadataValue(std::string key, std::string value);
  ModelBuilder& SetSignature(Signature signature);
  ModelBuilder& AddDependency(std::string name, std::string version);
  // A blob: architecture/config, pre/post-processing config, ... (copied).
  ModelBuilder& AddBlob(std::string name, BlobKind kind, std::string media_type,
                        std::string_view bytes);
  // A tensor from memory. `data` must stay valid until Build returns, or be
  // owned by `keepalive`.
  ModelBuilder& AddTensor(std::string name, DType dtype, std::vector<uint64_t> shape,
                          std::span<const std::byte> data, const TensorOptions& options = {},
                          std::shared_ptr<const void> keepalive = {});
  // A tensor streamed through `source` during Build, one batch of frames at
  // a time (memory stays bounded whatever the tensor's size).
  ModelBuilder& AddTensorStream(std::string name, DType dtype, std::vector<uint64_t> shape,
                                TensorSource source, const TensorOptions& options = {});

  struct Impl;

 private:
  friend class BundleBuilder;
  explicit ModelBuilder(Impl* impl) : impl_(impl) {}
  Impl* impl_;
};

struct BuildOptions {
  unsigned threads = 0;   // compression threads; 0 = all cores
  std::string producer;   // "" = "faultline <version>"
  // Called after each batch of frames with (bytes done, bytes total).
  std::function<void(uint64_t, uint64_t)> progress;
};

struct BuildSummary {
  uint64_t logical_bytes = 0;   // tensors + blobs, uncompressed
  uint64_t stored_bytes = 0;    // frames written
  uint64_t file_size = 0;
  uint64_t frames = 0;          // frames referenced
  uint64_t unique_frames = 0;   // frames written after deduplication
  uint64_t dedup_saved_bytes = 0;  // stored bytes not written thanks to dedup
  double seconds = 0;
};

class BundleBuilder {
 public:
  BundleBuilder();
  ~BundleBuilder();
  BundleBuilder(const BundleBuilder&) = delete;
  BundleBuilder& operator=(const BundleBuilder&) = delete;

  // Adds a model; names are unique and safe as file names (no '/', no NUL,
  // not "." or "..", no leading '.').
  ModelBuilder& AddModel(std::string name);

  // Writes the bundle atomically: a temporary file in the target directory,
  // fsync, rename. On error nothing is left at `path`. Callable once.
  Result<BuildSummary> Build(const std::string& path, const BuildOptions& options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct ReaderOptions {
  unsigned threads = 0;   // decompression threads for whole-tensor reads; 0 = all cores
  // Limits against decompression bombs (a small file that declares huge
  // tensors, through one frame referenced many times or frames that expand
  // far): Open refuses (EFBIG, naming the sizes and the way out) a bundle
  // whose tensors and blobs add up to more than max_expansion times its
  // file size (1 GiB is always allowed) or more than max_size bytes. 0
  // turns a limit off; kFromEnvironment takes FAULTLINE_MAX_EXPANSION
  // (default 4096) and FAULTLINE_MAX_SIZE (default no limit).
  static constexpr uint64_t kFromEnvironment = UINT64_MAX;
  uint64_t max_expansion = kFromEnvironment;
  uint64_t max_size = kFromEnvironment;
};

class BundleReader {
 public:
  // Opens a bundle and checks its header, frame table and manifest. Every
  // malformed file gets an error that names the problem.
  static Result<std::unique_ptr<BundleReader>> Open(const std::string& path,
                                                    const ReaderOptions& options = {});
  // The same over an open descriptor (duplicated; the caller keeps its own).
  static Result<std::unique_ptr<BundleReader>> OpenFd(int fd, const ReaderOptions& options = {});
  ~BundleReader();

  const BundleInfo& info() const noexcept;

  // Reads, checks and decompresses frame `index` of `object` into `out`
  // (at least the frame's uncompressed length: min(page_size, rest)).
  Status ReadFrame(const TensorInfo& object, uint64_t index, std::span<std::byte> out) const;
  // Reads a whole tensor ("full load") into `out` (exactly object.size bytes)
  // with decompression on the reader's threads.
  Status ReadTensor(const TensorInfo& object, std::span<std::byte> out) const;
  Result<std::vector<std::byte>> ReadTensor(const TensorInfo& object) const;
  Result<std::string> ReadBlob(const BlobInfo& blob) const;

  // Checks every frame of every object. On failure the Status names the
  // model, the tensor or blob, and the frame.
  Status Verify(const std::function<void(uint64_t, uint64_t)>& progress = {}) const;

  struct Impl;
  // For internal layers (the pager); not part of the stable API.
  const Impl& impl() const noexcept { return *impl_; }

 private:
  explicit BundleReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The library's version string ("0.1.0").
const char* Version() noexcept;

}  // namespace faultline
