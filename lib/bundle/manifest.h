// The manifest: BundleInfo <-> JSON, and the checks that tie the manifest to
// the frame table (every object's frames exist, have the lengths its size and
// page size imply, and fit its codec's bounds). Names are checked here too:
// model names become file names on unpack.
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <vector>

#include "bundle/format.h"
#include "faultline/bundle.hpp"

namespace faultline::internal {

// Model names: 1-255 bytes, no '/', '\\', NUL or control characters, not
// starting with '.'. Object (tensor, blob) names: 1-4096 bytes, no NUL or
// control characters. `what` names the thing in the error.
// Model names are file names in unpack's output: 255 bytes less ".safetensors".
inline constexpr size_t kMaxModelName = 255 - 12;
Status CheckModelName(std::string_view name);
Status CheckObjectName(std::string_view name, const char* what);
// Element count times element size, overflow-checked.
Status ShapeBytes(DType dtype, const std::vector<uint64_t>& shape, uint64_t* bytes);
Status CheckPageSize(uint64_t page_size);

std::string ManifestToJson(const BundleInfo& info);
// Parses and checks the manifest against `frames`; fills stored_size,
// logical_bytes and frame_refs. (file_size, unique_frames and stored_bytes
// are the reader's.)
Status ManifestFromJson(std::string_view text, const std::vector<FrameRecord>& frames,
                        BundleInfo* info);

}  // namespace faultline::internal
