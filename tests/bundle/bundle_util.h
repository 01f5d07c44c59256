// Helpers for bundle tests: build small bundles, and rewrite parts of a
// bundle file (header, frame records, manifest) with valid checksums so
// that a test reaches the check it means to exercise.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bundle/format.h"
#include "core/checksum.h"
#include "faultline/bundle.hpp"
#include "helpers.h"

namespace faultline::test {

struct Spec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<uint64_t> shape;
  TensorOptions options;
  std::vector<std::byte> data;
};

inline Spec MakeSpec(std::string name, DType dtype, std::vector<uint64_t> shape,
                     TensorOptions options = {}, uint64_t seed = 1, bool compressible = true) {
  Spec s{std::move(name), dtype, std::move(shape), options, {}};
  uint64_t n = DTypeSize(dtype);
  for (auto d : s.shape) n *= d;
  s.data = RandomBytes(n, seed, compressible);
  return s;
}

inline Result<BuildSummary> BuildBundle(const std::string& path, const std::string& model,
                                        const std::vector<Spec>& specs) {
  BundleBuilder b;
  ModelBuilder& m = b.AddModel(model);
  for (const auto& s : specs) m.AddTensor(s.name, s.dtype, s.shape, s.data, s.options);
  return b.Build(path);
}

inline internal::Header ReadHeader(const std::vector<std::byte>& file) {
  internal::Header h;
  Status s = internal::DecodeHeader({file.data(), file.size()}, &h);
  if (!s.ok()) throw std::runtime_error(s.ToString());
  return h;
}

inline void PutHeader(std::vector<std::byte>& file, const internal::Header& h) {
  internal::EncodeHeader(h, file.data());
}

// Rewrites the manifest through `edit` (on its JSON, or on its raw text
// when `raw` is given), fixing the header's offsets, lengths and checksums.
inline void RewriteManifest(const std::string& path, const std::function<void(nlohmann::json&)>& edit,
                            const std::function<void(std::string&)>& raw = {}) {
  auto file = ReadFileBytes(path);
  internal::Header h = ReadHeader(file);
  std::string text(reinterpret_cast<const char*>(file.data()) + h.manifest_offset, h.manifest_length);
  if (edit) {
    auto j = nlohmann::json::parse(text);
    edit(j);
    text = j.dump();
  }
  if (raw) raw(text);
  file.resize(h.manifest_offset);
  file.insert(file.end(), reinterpret_cast<const std::byte*>(text.data()),
              reinterpret_cast<const std::byte*>(text.data()) + text.size());
  h.manifest_length = text.size();
  h.manifest_checksum = internal::Checksum64(text.data(), text.size());
  file.resize(internal::AlignUp(file.size(), internal::kAlign));
  h.file_size = file.size();
  PutHeader(file, h);
  WriteFileBytes(path, file);
}

// Rewrites frame record `index`, fixing the frame table checksum.
inline void RewriteFrame(const std::string& path, uint64_t index,
                         const std::function<void(internal::FrameRecord&)>& edit) {
  auto file = ReadFileBytes(path);
  internal::Header h = ReadHeader(file);
  std::byte* rec = file.data() + h.frame_table_offset + index * internal::kFrameRecordSize;
  internal::FrameRecord r = internal::DecodeFrameRecord(rec);
  edit(r);
  internal::EncodeFrameRecord(r, rec);
  h.frame_table_checksum = internal::Checksum64(file.data() + h.frame_table_offset,
                                                h.frame_count * internal::kFrameRecordSize);
  PutHeader(file, h);
  WriteFileBytes(path, file);
}

// Rewrites header fields, with a valid header checksum.
inline void RewriteHeader(const std::string& path, const std::function<void(internal::Header&)>& edit) {
  auto file = ReadFileBytes(path);
  internal::Header h = ReadHeader(file);
  edit(h);
  PutHeader(file, h);
  WriteFileBytes(path, file);
}

// A decompression bomb: a bundle of one tensor `copies` x 64 MiB of zeros,
// all its frames one stored frame of a few KiB (valid checksums).
inline void MakeBomb(const std::string& path, uint64_t copies) {
  TensorOptions o;
  o.page_size = 64u << 20;
  Spec z{"zeros", DType::kU8, {64u << 20}, o, std::vector<std::byte>(64u << 20)};
  BundleBuilder b;
  b.AddModel("m").AddTensor(z.name, z.dtype, z.shape, z.data, z.options);
  if (!b.Build(path).ok()) throw std::runtime_error("cannot build the bomb's seed");
  auto file = ReadFileBytes(path);
  internal::Header h = ReadHeader(file);
  std::vector<std::byte> rec(file.begin() + h.frame_table_offset,
                             file.begin() + h.frame_table_offset + internal::kFrameRecordSize);
  auto j = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(file.data()) + h.manifest_offset,
                                             h.manifest_length));
  auto& t = j["models"][0]["tensors"][0];
  t["shape"] = {copies << 26};
  t["size"] = copies << 26;
  t["frames"] = {0, copies};
  std::string text = j.dump();
  file.resize(h.frame_table_offset);
  for (uint64_t i = 0; i < copies; i++) file.insert(file.end(), rec.begin(), rec.end());
  h.frame_count = copies;
  h.frame_table_checksum = internal::Checksum64(file.data() + h.frame_table_offset, copies * rec.size());
  file.resize(internal::AlignUp(file.size(), internal::kAlign));
  h.manifest_offset = file.size();
  h.manifest_length = text.size();
  h.manifest_checksum = internal::Checksum64(text.data(), text.size());
  file.insert(file.end(), reinterpret_cast<const std::byte*>(text.data()),
              reinterpret_cast<const std::byte*>(text.data()) + text.size());
  file.resize(internal::AlignUp(file.size(), internal::kAlign));
  h.file_size = file.size();
  PutHeader(file, h);
  WriteFileBytes(path, file);
}

inline internal::FrameRecord FrameAt(const std::string& path, uint64_t index) {
  auto file = ReadFileBytes(path);
  internal::Header h = ReadHeader(file);
  return internal::DecodeFrameRecord(file.data() + h.frame_table_offset +
                                     index * internal::kFrameRecordSize);
}

// Flips bits of one byte in the middle of frame record `index`'s stored bytes.
inline void CorruptFrame(const std::string& path, uint64_t index, std::byte mask) {
  auto rec = FrameAt(path, index);
  auto file = ReadFileBytes(path);
  file[rec.offset + rec.stored_length / 2] ^= mask;
  WriteFileBytes(path, file);
}

inline std::string OpenError(const std::string& path) {
  auto r = BundleReader::Open(path);
  return r.ok() ? std::string("(opened)") : std::string(r.status().message());
}

}  // namespace faultline::test
