// Small lookups of the public bundle API: codec and blob-kind names, finding
// models, tensors and blobs by name, the version string.
#include <cstring>

#include "faultline/bundle.hpp"

namespace faultline {

const char* Version() noexcept { return FAULTLINE_VERSION; }

const char* CodecName(Codec c) noexcept { return c == Codec::kZstd ? "zstd" : "raw"; }

bool ParseCodec(std::string_view name, Codec* out) noexcept {
  if (name == "zstd") *out = Codec::kZstd;
  else if (name == "raw") *out = Codec::kRaw;
  else return false;
  return true;
}

namespace {
constexpr const char* kBlobKinds[] = {"architecture", "config", "preprocess", "postprocess", "other"};
}

const char* BlobKindName(BlobKind k) noexcept {
  unsigned i = static_cast<unsigned>(k);
  return i < 5 ? kBlobKinds[i] : "other";
}

bool ParseBlobKind(std::string_view name, BlobKind* out) noexcept {
  for (unsigned i = 0; i < 5; i++)
    if (name == kBlobKinds[i]) {
      *out = static_cast<BlobKind>(i);
      return true;
    }
  return false;
}

const TensorInfo* ModelInfo::FindTensor(std::string_view n) const noexcept {
  for (const auto& t : tensors)
    if (t.name == n) return &t;
  return nullptr;
}

const BlobInfo* ModelInfo::FindBlob(std::string_view n) const noexcept {
  for (const auto& b : blobs)
    if (b.name == n) return &b;
  return nullptr;
}

const ModelInfo* BundleInfo::FindModel(std::string_view n) const noexcept {
  for (const auto& m : models)
    if (m.name == n) return &m;
  return nullptr;
}

}  // namespace faultline
