// libFuzzer target over the safetensors header parser: the input is a whole
// safetensors file. The parser must refuse it or return tensors whose
// offsets lie inside the data and whose sizes match dtype and shape.
#include <cstdint>
#include <cstdlib>

#include "faultline/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = faultline::ParseSafetensorsHeader({reinterpret_cast<const std::byte*>(data), size}, size);
  if (!r.ok()) return 0;
  uint64_t data_size = size - r->data_offset;
  for (const auto& t : r->tensors)
    if (t.begin > t.end || t.end > data_size) abort();  // the parser's contract
  return 0;
}
