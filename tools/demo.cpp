// The demo: generates a multi-layer model of a few hundred MiB as a
// safetensors file, packs it into a bundle (with a tied embedding that
// deduplicates), opens it, verifies every frame, reads every tensor back
// and checks it is bit-identical to the source; then runs a forward pass of
// matrix products through every layer twice: on the fully loaded weights,
// and on weights paged in on demand under a budget of a quarter of the
// model, handing the raw pointers to OpenBLAS. The two results must be
// identical. Public API only.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cblas.h>

#include "core/synthetic_weights.h"
#include "faultline/bundle.hpp"
#include "faultline/paging.hpp"
#include "faultline/safetensors.hpp"
#include "faultline/size.hpp"

using namespace faultline;
using Clock = std::chrono::steady_clock;

namespace {

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct DemoTensor {
  std::string name;
  DType dtype;
  std::vector<uint64_t> shape;
  std::vector<std::byte> bytes;
};

bool WriteSafetensors(const std::string& path, const std::vector<DemoTensor>& tensors) {
  std::string header = "{";
  uint64_t off = 0;
  for (size_t i = 0; i < tensors.size(); i++) {
    const auto& t = tensors[i];
    std::string shape;
    for (size_t d = 0; d < t.shape.size(); d++) shape += (d ? "," : "") + std::to_string(t.shape[d]);
    header += (i ? "," : "") + std::string("\"") + t.name + "\":{\"dtype\":\"" +
              DTypeSafetensorsName(t.dtype) + "\",\"shape\":[" + shape + "],\"data_offsets\":[" +
              std::to_string(off) + "," + std::to_string(off + t.bytes.size()) + "]}";
    off += t.bytes.size();
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  FILE* f = fopen(path.c_str(), "wb");
  if (!f) return false;
  uint64_t n = header.size();
  bool ok = fwrite(&n, 8, 1, f) == 1 && fwrite(header.data(), 1, n, f) == n;
  for (const auto& t : tensors) ok = ok && fwrite(t.bytes.data(), 1, t.bytes.size(), f) == t.bytes.size();
  return fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "demo-out";
  int layers = argc > 2 ? atoi(argv[2]) : 8;
  if (layers < 1 || layers > 256) {
    fprintf(stderr, "usage: faultline-demo [DIR] [LAYERS (1-256)]\n");
    return 2;
  }
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    fprintf(stderr, "faultline-demo: cannot create '%s': %s\n", dir.c_str(), strerror(errno));
    return 1;
  }
  const uint64_t d_model = 1024, d_ff = 4096, vocab = 2048;
  printf("faultline %s demo: %d layers, d_model %llu, d_ff %llu\n", Version(), layers,
         static_cast<unsigned long long>(d_model), static_cast<unsigned long long>(d_ff));

  // 1. Generate the model.
  auto t0 = Clock::now();
  std::vector<DemoTensor> tensors;
  auto add = [&](std::string name, DType dt, std::vector<uint64_t> shape, uint64_t seed) {
    DemoTensor t{std::move(name), dt, std::move(shape), {}};
    uint64_t n = DTypeSize(dt);
    for (auto d : t.shape) n *= d;
    t.bytes.resize(n);
    // Weights that look like trained ones: roughly Gaussian, small scale.
    internal::FillSyntheticWeights(t.bytes.data(), t.bytes.size(), dt, seed * 0x9E3779B97F4A7C15ull + 1);
    tensors.push_back(std::move(t));
  };
  add("embed.weight", DType::kBF16, {vocab, d_model}, 1);
  for (int l = 0; l < layers; l++) {
    std::string p = "layers." + std::to_string(l) + ".";
    add(p + "ffn.up.weight", DType::kF32, {d_ff, d_model}, 100 + l);
    add(p + "ffn.down.weight", DType::kF32, {d_model, d_ff}, 200 + l);
    add(p + "norm.weight", DType::kF32, {d_model}, 300 + l);
  }
  tensors.push_back({"lm_head.weight", DType::kBF16, {vocab, d_model}, tensors[0].bytes});  // tied
  uint64_t total = 0;
  for (const auto& t : tensors) total += t.bytes.size();
  std::string st_path = dir + "/demo.safetensors";
  if (!WriteSafetensors(st_path, tensors)) {
    fprintf(stderr, "faultline-demo: cannot write %s\n", st_path.c_str());
    return 1;
  }
  printf("generated   %zu tensors, %s -> %s (%.2f s)\n", tensors.size(), FormatSize(total).c_str(),
         st_path.c_str(), Since(t0));

  // 2. Pack.
  std::string bundle = dir + "/demo.apbundle";
  BundleBuilder builder;
  ModelBuilder& m = builder.AddModel("demo-lm");
  ModelMetadata md;
  md.author = "faultline demo";
  md.license = "Apache-2.0";
  md.description = "a synthetic multi-layer model";
  md.metrics["loss"] = 2.31;
  m.SetVersion("1.0.0").SetMetadata(md);
  m.SetSignature({{{"tokens", DType::kI64, {{-1, "batch"}, {-1, "seq"}}}},
                  {{"logits", DType::kF32, {{-1, "batch"}, {-1, "seq"}, {static_cast<int64_t>(vocab), ""}}}}});
  m.AddBlob("config.json", BlobKind::kConfig, "application/json",
            "{\"layers\": " + std::to_string(layers) + ", \"d_model\": 1024, \"d_ff\": 4096}");
  TensorOptions opts;
  opts.shuffle = true;
  Status s = ImportSafetensors({st_path}, m, opts);
  if (!s.ok()) {
    fprintf(stderr, "faultline-demo: %s\n", s.ToString().c_str());
    return 1;
  }
  auto built = builder.Build(bundle);
  if (!built.ok()) {
    fprintf(stderr, "faultline-demo: %s\n", built.status().ToString().c_str());
    return 1;
  }
  printf("packed      %s -> %s, ratio %.3fx, dedup saved %s, %.2f s (%.0f MB/s)\n",
         FormatSize(built->logical_bytes).c_str(), FormatSize(built->file_size).c_str(),
         static_cast<double>(built->logical_bytes) / static_cast<double>(built->file_size),
         FormatSize(built->dedup_saved_bytes).c_str(), built->seconds,
         static_cast<double>(built->logical_bytes) / built->seconds / 1e6);

  // 3. Open, inspect, verify.
  t0 = Clock::now();
  auto reader = BundleReader::Open(bundle);
  if (!reader.ok()) {
    fprintf(stderr, "faultline-demo: %s\n", reader.status().ToString().c_str());
    return 1;
  }
  const BundleInfo& info = (*reader)->info();
  printf("opened      %zu model(s), %zu tensors, %llu frames (%llu unique) in %.3f s\n",
         info.models.size(), info.models[0].tensors.size(),
         static_cast<unsigned long long>(info.frame_refs),
         static_cast<unsigned long long>(info.unique_frames), Since(t0));
  t0 = Clock::now();
  s = (*reader)->Verify();
  if (!s.ok()) {
    fprintf(stderr, "faultline-demo: verify: %s\n", s.ToString().c_str());
    return 1;
  }
  printf("verified    every frame in %.2f s\n", Since(t0));

  // 4. Full load, compared bit for bit.
  t0 = Clock::now();
  const ModelInfo& model = info.models[0];
  uint64_t loaded = 0;
  for (const auto& t : tensors) {
    const TensorInfo* ti = model.FindTensor(t.name);
    if (!ti) {
      fprintf(stderr, "faultline-demo: tensor %s missing\n", t.name.c_str());
      return 1;
    }
    auto data = (*reader)->ReadTensor(*ti);
    if (!data.ok() || *data != t.bytes) {
      fprintf(stderr, "faultline-demo: tensor %s differs after the round trip\n", t.name.c_str());
      return 1;
    }
    loaded += data->size();
  }
  double secs = Since(t0);
  printf("full load   %s in %.2f s (%.0f MB/s), every tensor bit-identical\n",
         FormatSize(loaded).c_str(), secs, static_cast<double>(loaded) / secs / 1e6);

  // 5. A forward pass through every layer, resident and paged.
  const int batch = 16;
  std::vector<float> x0(batch * d_model);
  for (size_t i = 0; i < x0.size(); i++) x0[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  auto forward = [&](auto&& weight) {
    std::vector<float> x = x0, h(batch * d_ff);
    for (int l = 0; l < layers; l++) {
      std::string p = "layers." + std::to_string(l) + ".";
      const float* up = weight(p + "ffn.up.weight");
      const float* down = weight(p + "ffn.down.weight");
      const float* norm = weight(p + "norm.weight");
      // h = relu(x W_up^T); x += h W_down^T; x = rmsnorm(x) * norm
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, batch, d_ff, d_model, 1.0f, x.data(),
                  d_model, up, d_model, 0.0f, h.data(), d_ff);
      for (auto& v : h) v = v > 0 ? v : 0;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, batch, d_model, d_ff, 1.0f, h.data(), d_ff,
                  down, d_ff, 1.0f, x.data(), d_model);
      for (int b = 0; b < batch; b++) {
        double ss = 0;
        for (uint64_t i = 0; i < d_model; i++) ss += double(x[b * d_model + i]) * x[b * d_model + i];
        float scale = static_cast<float>(1.0 / std::sqrt(ss / d_model + 1e-6));
        for (uint64_t i = 0; i < d_model; i++) x[b * d_model + i] *= scale * (1.0f + norm[i]);
      }
    }
    return x;
  };
  std::vector<std::vector<float>> resident_weights;
  std::vector<std::string> resident_names;
  uint64_t layer_bytes = 0;
  for (const auto& t : tensors)
    if (t.name.rfind("layers.", 0) == 0) {
      resident_names.push_back(t.name);
      resident_weights.emplace_back(t.bytes.size() / 4);
      memcpy(resident_weights.back().data(), t.bytes.data(), t.bytes.size());
      layer_bytes += t.bytes.size();
    }
  t0 = Clock::now();
  auto ref = forward([&](const std::string& name) {
    for (size_t i = 0; i < resident_names.size(); i++)
      if (resident_names[i] == name) return resident_weights[i].data();
    return static_cast<float*>(nullptr);
  });
  double resident_s = Since(t0);
  resident_weights.clear();

  PagingConfig pc = PagingConfig::FromEnvironment();
  pc.max_resident = layer_bytes / 4;
  pc.policy = EvictionPolicy::kPlan;
  auto paged = PagedBundle::Open(bundle, pc);
  if (!paged.ok()) {
    fprintf(stderr, "faultline-demo: %s\n", paged.status().ToString().c_str());
    return 1;
  }
  ModelView pm = (*paged)->model();
  std::vector<TensorView> plan;
  for (int l = 0; l < layers; l++) {
    auto layer = pm.layer("layers." + std::to_string(l) + ".");
    plan.insert(plan.end(), layer.begin(), layer.end());
  }
  (*paged)->SetPlan(plan);
  auto paged_weight = [&](const std::string& name) {
    auto t = pm.tensor(name);
    return t.ok() ? t->as<float>() : nullptr;
  };
  t0 = Clock::now();
  auto out = forward(paged_weight);
  double first_s = Since(t0);
  t0 = Clock::now();
  auto out2 = forward(paged_weight);
  double second_s = Since(t0);
  bool same = out == ref && out2 == ref;
  PagingStats st = (*paged)->stats();
  printf("forward     batch %d through %d layers: resident %.3f s; paged (%s mode, budget %s = 1/4 of %s) "
         "%.3f s first pass, %.3f s second pass\n",
         batch, layers, resident_s, PagingModeName((*paged)->mode()), FormatSize(st.budget_bytes).c_str(),
         FormatSize(layer_bytes).c_str(), first_s, second_s);
  printf("            %s: %llu faults, %llu loads (%llu prefetched), %llu evictions, peak resident %s, "
         "fault latency p50 %.0f us p99 %.0f us\n",
         same ? "results identical to the resident run" : "RESULTS DIFFER",
         static_cast<unsigned long long>(st.faults), static_cast<unsigned long long>(st.loads),
         static_cast<unsigned long long>(st.prefetched), static_cast<unsigned long long>(st.evictions),
         FormatSize(st.peak_resident_bytes).c_str(), st.fault_latency.p50_us, st.fault_latency.p99_us);
  if (!same) return 1;
  printf("demo OK\n");
  return 0;
}
