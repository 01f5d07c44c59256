// A layered model for the GPU tier's tests and benchmarks: layers.N.weight
// (d x d f32, row-major) and layers.N.bias (d f32), written as a zstd bundle.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "faultline/bundle.hpp"

namespace faultline::test {

// Deterministic weights of layer `l` (values with few mantissa bits, as
// trained weights in low precision have, so frames compress).
inline std::vector<float> LayerWeights(int l, int d, bool bias) {
  size_t n = bias ? d : static_cast<size_t>(d) * d;
  std::vector<float> v(n);
  uint64_t s = 0x9E3779B97F4A7C15ull * (2 * l + (bias ? 1 : 0) + 1);
  float scale = 1.5f / std::sqrt(static_cast<float>(d));
  for (size_t i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    float u = static_cast<float>(s >> 40) / static_cast<float>(1ull << 24) * 2 - 1;  // [-1, 1)
    uint32_t bits;
    float f = u * scale;
    memcpy(&bits, &f, 4);
    bits &= 0xFFFF0000u;  // bf16-representable
    memcpy(&f, &bits, 4);
    v[i] = f;
  }
  return v;
}

inline std::string LayerPrefix(int l) { return "layers." + std::to_string(l) + "."; }

inline Status WriteLayerModel(const std::string& path, int layers, int d, Codec codec = Codec::kZstd) {
  BundleBuilder b;
  ModelBuilder& m = b.AddModel("mlp");
  TensorOptions o;
  o.codec = codec;
  std::vector<std::vector<float>> keep;
  for (int l = 0; l < layers; l++) {
    keep.push_back(LayerWeights(l, d, false));
    m.AddTensor(LayerPrefix(l) + "weight", DType::kF32, {uint64_t(d), uint64_t(d)},
                std::as_bytes(std::span(keep.back())), o);
    keep.push_back(LayerWeights(l, d, true));
    m.AddTensor(LayerPrefix(l) + "bias", DType::kF32, {uint64_t(d)}, std::as_bytes(std::span(keep.back())), o);
  }
  auto r = b.Build(path);
  return r.ok() ? Status::Ok() : r.status();
}

inline std::vector<std::string> LayerPrefixes(int layers) {
  std::vector<std::string> p;
  for (int l = 0; l < layers; l++) p.push_back(LayerPrefix(l));
  return p;
}

// Deterministic input batch.
inline std::vector<float> InputBatch(int d, int batch) {
  std::vector<float> x(static_cast<size_t>(d) * batch);
  for (size_t i = 0; i < x.size(); i++) x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  return x;
}

}  // namespace faultline::test
