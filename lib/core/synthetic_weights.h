// Weight-like data for the demo and the benchmarks: f32 or bf16 values of a
// narrow Gaussian (a sum of four uniforms from xorshift64), deterministic
// in `state` (any nonzero value). bf16 values are the top halves of the
// f32 ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "faultline/dtype.hpp"

namespace faultline::internal {

inline void FillSyntheticWeights(std::byte* out, size_t bytes, DType dtype, uint64_t state) {
  uint64_t s = state;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  auto gauss = [&] {
    double u = 0;
    for (int i = 0; i < 4; i++) u += static_cast<double>(next() >> 11) * 0x1.0p-53;
    return static_cast<float>((u - 2.0) * 0.035);
  };
  if (dtype == DType::kF32) {
    auto* f = reinterpret_cast<float*>(out);
    for (size_t i = 0; i < bytes / 4; i++) f[i] = gauss();
  } else {
    auto* h = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < bytes / 2; i++) {
      float v = gauss();
      uint32_t b;
      memcpy(&b, &v, 4);
      h[i] = static_cast<uint16_t>(b >> 16);
    }
  }
}

}  // namespace faultline::internal
