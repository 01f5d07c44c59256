// safetensors: header parsing (every size checked against the file), import
// by mapping the files and streaming their tensors into a ModelBuilder, and
// export in the reference implementation's layout.
#include "faultline/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <set>

#include "bundle/format.h"
#include "bundle/manifest.h"
#include "bundle/reader_impl.h"
#include "core/json_util.h"
#include "core/status_macros.h"
#include "io/file.h"

namespace faultline {

using namespace internal;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderSize = 100ull << 20;  // the reference implementation's limit
constexpr size_t kMaxMetadataEntries = 65536;

#define FL_RETURN_IF_ERROR_BOOL(expr)           \
  do {                                          \
    Status _s = (expr);                         \
    if (!_s.ok()) {                             \
      if (status_.ok()) status_ = std::move(_s); \
      return false;                             \
    }                                           \
  } while (0)

struct Mapping {
  void* addr = MAP_FAILED;
  size_t len = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) munmap(addr, len);
  }
};

}  // namespace

namespace {

// The header parsed as a stream of JSON events (nlohmann's SAX interface)
// straight into tensors and metadata: a DOM of a 100 MiB header took
// about seven times its size in memory. The schema is three levels deep:
// {name: {dtype, shape: [...], data_offsets: [b, e]}, "__metadata__": {k: v}}.
// Unknown fields of a tensor are skipped, as the reference reader does.
class HeaderParser : public nlohmann::json_sax<json> {
 public:
  HeaderParser(SafetensorsHeader* h, uint64_t data_size) : h_(h), data_size_(data_size) {}
  Status status() const { return status_; }

  bool null() override { return Scalar("null"); }
  bool boolean(bool) override { return Scalar("boolean"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return number_unsigned(static_cast<uint64_t>(v));
    return Scalar("number");
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (skip_) return true;
    if (where_ == kShape) {
      if (t_.shape.size() >= 32) return Fail("%s: more than 32 dimensions", ctx_);
      t_.shape.push_back(v);
      return true;
    }
    if (where_ == kOffsets) {
      if (offsets_ >= 2) return Fail("%s: data_offsets must be [begin, end]", ctx_);
      (offsets_++ == 0 ? t_.begin : t_.end) = v;
      return true;
    }
    return Scalar("number");
  }
  bool number_float(number_float_t, const string_t&) override { return Scalar("number"); }
  bool binary(binary_t&) override { return Scalar("binary"); }
  bool string(string_t& v) override {
    if (skip_) return true;
    if (where_ == kMetadata) {
      // Real metadata is a few entries ("format": "pt"); millions would
      // cost a map node each, many times the header's bytes.
      if (h_->metadata.size() >= kMaxMetadataEntries)
        return Fail("__metadata__ has more than %zu entries", kMaxMetadataEntries);
      h_->metadata[key_] = std::move(v);
      return true;
    }
    if (where_ == kTensor && key_ == "dtype") {
      auto d = ParseSafetensorsDType(v);
      if (!d) return Fail("%s: unknown dtype '%.32s'", ctx_, v.c_str());
      t_.dtype = *d;
      dtype_name_ = v;
      have_dtype_ = true;
      return true;
    }
    return Scalar("string");
  }
  bool start_object(std::size_t) override {
    if (skip_ || (where_ == kTensor && !Known())) return Enter();
    if (where_ == kTop && depth_ == 0) {
      depth_ = 1;
      return true;
    }
    if (where_ == kTop && key_ == "__metadata__") {
      where_ = kMetadata;
      return true;
    }
    if (where_ == kTop) {
      where_ = kTensor;
      t_ = SafetensorsTensor{};
      t_.name = key_;
      have_dtype_ = have_shape_ = false;
      offsets_ = -1;
      return true;
    }
    return Scalar("object");
  }
  bool end_object() override {
    if (skip_) return Leave();
    if (where_ == kMetadata) {
      where_ = kTop;
      return true;
    }
    if (where_ == kTensor) {
      where_ = kTop;
      return FinishTensor();
    }
    return true;  // the top level
  }
  bool start_array(std::size_t) override {
    if (skip_ || (where_ == kTensor && !Known())) return Enter();
    if (where_ == kTensor && key_ == "shape") {
      where_ = kShape;
      have_shape_ = true;
      return true;
    }
    if (where_ == kTensor && key_ == "data_offsets") {
      where_ = kOffsets;
      offsets_ = 0;
      return true;
    }
    return Scalar("array");
  }
  bool end_array() override {
    if (skip_) return Leave();
    if (where_ == kOffsets && offsets_ != 2) return Fail("%s: data_offsets must be [begin, end]", ctx_);
    where_ = kTensor;
    return true;
  }
  bool key(string_t& k) override {
    if (skip_) return true;
    if (where_ == kTop) {
      if (k == "__metadata__" && metadata_seen_++) return Fail("__metadata__ appears twice in the header");
      snprintf(ctx_, sizeof(ctx_), "tensor '%.64s'", k.c_str());
    }
    key_ = std::move(k);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    return Fail("safetensors header is not valid JSON: %s", e.what());
  }

 private:
  enum Where { kTop, kMetadata, kTensor, kShape, kOffsets };

  template <typename... A>
  bool Fail(const char* fmt, A... a) {
    if (status_.ok()) status_ = Status::Error(EINVAL, fmt, a...);
    return false;
  }
  bool Known() const { return key_ == "dtype" || key_ == "shape" || key_ == "data_offsets"; }
  // A value of an unknown field: skipped, however deep (within the limit).
  bool Enter() {
    if (++skip_ > kMaxJsonDepth) return Fail("safetensors header: JSON nested deeper than %d levels", kMaxJsonDepth);
    return true;
  }
  bool Leave() {
    skip_--;
    return true;
  }
  // A value where the schema wants another kind.
  bool Scalar(const char* type) {
    if (skip_ || (where_ == kTensor && !Known())) return true;
    switch (where_) {
      case kTop:
        if (depth_ == 0) return Fail("safetensors header is not a JSON object");
        if (key_ == "__metadata__") return Fail("__metadata__ is not an object");
        return Fail("%s: not a JSON object", ctx_);
      case kMetadata: return Fail("__metadata__ value '%.64s' is not a string", key_.c_str());
      case kShape: return Fail("%s: shape must hold non-negative integers", ctx_);
      case kOffsets: return Fail("%s: data_offsets must be [begin, end]", ctx_);
      case kTensor:
        return Fail("%s: field '%s' must be %s, not %s", ctx_, key_.c_str(), key_ == "dtype" ? "string" : "array",
                    type);
    }
    return false;
  }
  bool FinishTensor() {
    FL_RETURN_IF_ERROR_BOOL(CheckObjectName(t_.name, "tensor"));
    if (!have_dtype_) return Fail("%s: missing field 'dtype'", ctx_);
    if (!have_shape_) return Fail("%s: missing field 'shape'", ctx_);
    if (offsets_ < 0) return Fail("%s: missing field 'data_offsets'", ctx_);
    if (t_.begin > t_.end || t_.end > data_size_)
      return Fail("%s: data_offsets [%llu, %llu] lie outside the %llu-byte data", ctx_,
                  static_cast<unsigned long long>(t_.begin), static_cast<unsigned long long>(t_.end),
                  static_cast<unsigned long long>(data_size_));
    uint64_t bytes = 0;
    FL_RETURN_IF_ERROR_BOOL(ShapeBytes(t_.dtype, t_.shape, &bytes).WithPrefix("%s", ctx_));
    if (bytes != t_.end - t_.begin)
      return Fail("%s: %llu bytes of data, but dtype %s and its shape need %llu", ctx_,
                  static_cast<unsigned long long>(t_.end - t_.begin), dtype_name_.c_str(),
                  static_cast<unsigned long long>(bytes));
    h_->tensors.push_back(std::move(t_));
    return true;
  }

  SafetensorsHeader* h_;
  uint64_t data_size_;
  Status status_;
  Where where_ = kTop;
  int depth_ = 0;   // 1 once inside the top-level object
  int skip_ = 0;    // levels of an unknown field's value being skipped
  std::string key_;
  char ctx_[96] = "safetensors header";
  SafetensorsTensor t_;
  std::string dtype_name_;
  bool have_dtype_ = false, have_shape_ = false;
  int offsets_ = -1;  // data_offsets numbers seen; -1: no data_offsets yet
  int metadata_seen_ = 0;
};

}  // namespace

Result<SafetensorsHeader> ParseSafetensorsHeader(std::span<const std::byte> bytes,
                                                 uint64_t file_size) {
  if (file_size < 8 || bytes.size() < 8)
    return Status::Error(EINVAL, "truncated: smaller than the 8-byte header length");
  uint64_t n = LoadLE64(bytes.data());
  if (n > kMaxHeaderSize)
    return Status::Error(EINVAL, "header length %llu exceeds the 100 MiB limit",
                         static_cast<unsigned long long>(n));
  if (n > file_size - 8)
    return Status::Error(EINVAL, "truncated: header length %llu but the file has %llu bytes",
                         static_cast<unsigned long long>(n), static_cast<unsigned long long>(file_size));
  if (bytes.size() < 8 + n) return Status::Error(EINVAL, "header not fully provided");
  std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  SafetensorsHeader h;
  h.data_offset = 8 + n;
  HeaderParser parser(&h, file_size - h.data_offset);
  bool ok;
  try {
    ok = json::sax_parse(text.begin(), text.end(), &parser);
  } catch (const std::exception& e) {  // (allocation failures)
    return Status::Error(ENOMEM, "safetensors header: %s", e.what());
  }
  if (!ok) return parser.status().ok() ? Status::Error(EINVAL, "safetensors header is not valid JSON") : parser.status();
  // A name twice (a DOM would have kept the last): found by sorting names,
  // which costs less than a set of them while parsing.
  {
    std::vector<const std::string*> names(h.tensors.size());
    for (size_t i = 0; i < names.size(); i++) names[i] = &h.tensors[i].name;
    std::sort(names.begin(), names.end(), [](auto* a, auto* b) { return *a < *b; });
    for (size_t i = 1; i < names.size(); i++)
      if (*names[i] == *names[i - 1])
        return Status::Error(EINVAL, "tensor '%.64s' appears twice in the header", names[i]->c_str());
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < h.tensors.size(); i++)
    if (h.tensors[i].begin < h.tensors[i - 1].end)
      return Status::Error(EINVAL, "tensors '%.64s' and '%.64s' overlap",
                           h.tensors[i - 1].name.c_str(), h.tensors[i].name.c_str());
  return h;
}

Status ImportSafetensors(const std::vector<std::string>& paths, ModelBuilder& model,
                         const TensorOptions& options) {
  std::set<std::string> seen;
  for (const auto& path : paths) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::Error(errno, "cannot open '%s'", path.c_str());
    UniqueFd owned(fd);
    FL_ASSIGN_OR_RETURN(uint64_t size, FileSize(fd));
    if (size < 8) return Status::Error(EINVAL, "%s: truncated: smaller than the 8-byte header length", path.c_str());
    auto map = std::make_shared<Mapping>();
    map->addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map->addr == MAP_FAILED) return Status::Error(errno, "cannot map '%s'", path.c_str());
    map->len = size;
    madvise(map->addr, size, MADV_SEQUENTIAL);
    const auto* base = static_cast<const std::byte*>(map->addr);
    auto parsed = ParseSafetensorsHeader({base, size}, size);
    if (!parsed.ok()) return parsed.status().WithPrefix("%s", path.c_str());
    for (auto& t : parsed->tensors) {
      if (!seen.insert(t.name).second)
        return Status::Error(EEXIST, "%s: tensor '%.64s' also appears in an earlier file",
                             path.c_str(), t.name.c_str());
      model.AddTensor(t.name, t.dtype, t.shape, {base + parsed->data_offset + t.begin, t.end - t.begin},
                      options, map);
    }
    for (auto& [k, v] : parsed->metadata) model.SetMetadataValue(k, v);
  }
  return Status::Ok();
}

Status ExportSafetensors(const BundleReader& reader, const ModelInfo& model,
                         const std::string& path) {
  // Header: "__metadata__" first, then the tensors in bundle order, which
  // is their data order.
  std::string header = "{";
  bool first = true;
  if (!model.metadata.extra.empty()) {
    header += "\"__metadata__\":" + json(model.metadata.extra).dump(-1, ' ', false, json::error_handler_t::replace);
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& t : model.tensors) {
    if (!first) header += ",";
    first = false;
    json shape = t.shape;
    header += json(t.name).dump(-1, ' ', false, json::error_handler_t::replace) +
              ":{\"dtype\":\"" + DTypeSafetensorsName(t.dtype) + "\",\"shape\":" + shape.dump() +
              ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.size) +
              "]}";
    offset += t.size;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  FL_ASSIGN_OR_RETURN(AtomicFile file, AtomicFile::Create(path));
  std::byte len[8];
  StoreLE64(len, header.size());
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), len, 8, 0, path.c_str()));
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), header.data(), header.size(), 8, path.c_str()));
  uint64_t pos = 8 + header.size();
  std::vector<std::byte> buf;
  const auto& impl = reader.impl();
  char label[96];
  for (const auto& t : model.tensors) {
    snprintf(label, sizeof(label), "tensor '%.64s'", t.name.c_str());
    // Pieces of about 64 MiB bound memory whatever the tensor's size.
    uint64_t per = std::max<uint64_t>(1, (64ull << 20) / t.page_size);
    for (uint64_t f = 0; f < t.frame_count; f += per) {
      uint64_t n = std::min(per, t.frame_count - f);
      uint64_t bytes = std::min<uint64_t>(n * t.page_size, t.size - f * t.page_size);
      buf.resize(bytes);
      FL_RETURN_IF_ERROR(impl.DecodeAll(t, buf.data(), label, f, n));
      FL_RETURN_IF_ERROR(PwriteFull(file.fd(), buf.data(), bytes, pos, path.c_str()));
      pos += bytes;
    }
  }
  return file.Commit();
}

}  // namespace faultline
