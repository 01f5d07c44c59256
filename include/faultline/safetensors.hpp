// safetensors import and export. Import reads one or several files (a
// sharded checkpoint) into one model of a bundle; export writes a model back
// as one safetensors file. Both are bit-exact for the tensor bytes, and export
// lays the file out as the reference implementation does (tensors in offset
// order, header padded with spaces to 8 bytes).
// Thread-safety: independent calls may run concurrently.
#pragma once

#include <string>
#include <vector>

#include "faultline/bundle.hpp"

namespace faultline {

struct SafetensorsTensor {
  std::string name;
  DType dtype;
  std::vector<uint64_t> shape;
  uint64_t begin;   // byte offsets in the data section
  uint64_t end;
};

// A parsed safetensors header. `data_offset` is where the data section starts.
struct SafetensorsHeader {
  std::vector<SafetensorsTensor> tensors;   // sorted by begin offset
  std::map<std::string, std::string> metadata;  // "__metadata__"
  uint64_t data_offset = 0;
};

// Parses and checks a safetensors header held in `bytes` (the whole file, or
// at least its header); `file_size` is the whole file's size.
Result<SafetensorsHeader> ParseSafetensorsHeader(std::span<const std::byte> bytes,
                                                 uint64_t file_size);

// Adds every tensor of the given files to `model` (mapped, streamed during
// Build), and their "__metadata__" to the model's extra metadata. Names that
// occur in two files are an error.
Status ImportSafetensors(const std::vector<std::string>& paths, ModelBuilder& model,
                         const TensorOptions& options = {});

// Writes `model` of `reader` to `path` as safetensors (atomically).
Status ExportSafetensors(const BundleReader& reader, const ModelInfo& model,
                         const std::string& path);

}  // namespace faultline
