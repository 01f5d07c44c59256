// Bundles written and read back: every dtype, codec and page size, odd
// sizes, frames read alone, metadata, blobs, streamed tensors, dedup, and
// the atomic write.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <cmath>

#include "bundle/bundle_util.h"

using namespace faultline;
using namespace faultline::test;

namespace {

void CheckRoundTrip(const std::string& path, const std::vector<Spec>& specs) {
  auto r = BundleReader::Open(path);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  const ModelInfo* m = (*r)->info().FindModel("m");
  REQUIRE(m != nullptr);
  REQUIRE(m->tensors.size() == specs.size());
  for (const auto& s : specs) {
    const TensorInfo* t = m->FindTensor(s.name);
    REQUIRE(t != nullptr);
    CHECK(t->dtype == s.dtype);
    CHECK(t->shape == s.shape);
    CHECK(t->size == s.data.size());
    auto data = (*r)->ReadTensor(*t);
    REQUIRE_MESSAGE(data.ok(), data.status().ToString());
    CHECK_MESSAGE(*data == s.data, s.name);
    // Each frame read alone equals its slice.
    std::vector<std::byte> frame(t->page_size);
    for (uint64_t f = 0; f < t->frame_count; f++) {
      REQUIRE((*r)->ReadFrame(*t, f, frame).ok());
      uint64_t off = f * t->page_size, len = std::min<uint64_t>(t->page_size, t->size - off);
      REQUIRE(memcmp(frame.data(), s.data.data() + off, len) == 0);
    }
  }
  CHECK((*r)->Verify().ok());
}

}  // namespace

TEST_CASE("every dtype round-trips with every codec") {
  TempDir dir;
  for (int codec = 0; codec < 3; codec++) {
    std::vector<Spec> specs;
    TensorOptions o;
    o.codec = codec == 0 ? Codec::kRaw : Codec::kZstd;
    o.shuffle = codec == 2;
    o.page_size = 4096;
    for (int d = 0; d < kDTypeCount; d++) {
      auto dt = static_cast<DType>(d);
      specs.push_back(MakeSpec(std::string("t_") + DTypeName(dt), dt, {3, 1777}, o, d + 1, d % 2 == 0));
    }
    std::string path = dir / ("codec" + std::to_string(codec) + ".apbundle");
    auto b = BuildBundle(path, "m", specs);
    REQUIRE_MESSAGE(b.ok(), b.status().ToString());
    CheckRoundTrip(path, specs);
  }
}

TEST_CASE("a model of 100,000 tensors packs and reads back (packing is linear in their number)") {
  // Quadratic before: 40,000 tensors took about a minute, 100,000 would
  // pass the test's time limit. Now about two seconds.
  TempDir dir;
  BundleBuilder b;
  ModelBuilder& m = b.AddModel("moe");
  const size_t n = 100000;
  std::vector<std::byte> values(251 * 8);  // AddTensor keeps a view: one per value, alive until Build
  for (size_t i = 0; i < values.size(); i++) values[i] = static_cast<std::byte>(i / 8);
  for (size_t i = 0; i < n; i++)
    m.AddTensor("layers." + std::to_string(i / 128) + ".experts." + std::to_string(i % 128), DType::kU8, {8},
                std::span<const std::byte>(values).subspan(i % 251 * 8, 8));
  auto r = b.Build(dir / "moe.apbundle");
  REQUIRE(r.ok());
  CHECK(r->unique_frames == 251);  // equal contents deduplicate
  auto rd = BundleReader::Open(dir / "moe.apbundle");
  REQUIRE(rd.ok());
  const ModelInfo& mi = (*rd)->info().models[0];
  REQUIRE(mi.tensors.size() == n);
  for (size_t i : {size_t(0), size_t(77777), n - 1}) {
    auto t = (*rd)->ReadTensor(mi.tensors[i]);
    REQUIRE(t.ok());
    CHECK((*t)[7] == static_cast<std::byte>(i % 251));
  }
}

TEST_CASE("every page size from 4 KiB to 1 MiB round-trips") {
  TempDir dir;
  for (uint32_t page : {4096u, 8192u, 65536u, 1u << 20}) {
    TensorOptions o;
    o.page_size = page;
    o.shuffle = true;
    std::vector<Spec> specs = {MakeSpec("a", DType::kF32, {3 * page / 4 + 5}, o, 1),
                               MakeSpec("b", DType::kBF16, {page / 2}, o, 2, false)};
    std::string path = dir / ("p" + std::to_string(page) + ".apbundle");
    REQUIRE(BuildBundle(path, "m", specs).ok());
    CheckRoundTrip(path, specs);
  }
}

TEST_CASE("odd sizes round-trip: empty tensor, one byte, one byte over a page") {
  TempDir dir;
  TensorOptions o;
  o.page_size = 4096;
  std::vector<Spec> specs = {
      MakeSpec("empty", DType::kF32, {0, 7}, o),
      MakeSpec("scalar", DType::kF64, {}, o),
      MakeSpec("one_byte", DType::kU8, {1}, o),
      MakeSpec("page", DType::kU8, {4096}, o),
      MakeSpec("page_plus_one", DType::kU8, {4097}, o),
      MakeSpec("page_minus_one", DType::kI8, {4095}, o),
  };
  std::string path = dir / "odd.apbundle";
  REQUIRE(BuildBundle(path, "m", specs).ok());
  CheckRoundTrip(path, specs);
  auto r = BundleReader::Open(path);
  const ModelInfo& m = (*r)->info().models[0];
  CHECK(m.FindTensor("empty")->frame_count == 0);
  CHECK(m.FindTensor("scalar")->size == 8);
  CHECK(m.FindTensor("page_plus_one")->frame_count == 2);
}

TEST_CASE("frames that do not shrink min_ratio times are stored verbatim") {
  TempDir dir;
  auto stored_for = [&](double min_ratio) {
    TensorOptions o;
    o.shuffle = true;
    o.min_ratio = min_ratio;
    std::vector<Spec> specs = {MakeSpec("w", DType::kF32, {200000}, o, 4, true)};
    std::string path = dir / "r.apbundle";
    auto b = BuildBundle(path, "m", specs);
    REQUIRE(b.ok());
    CheckRoundTrip(path, specs);
    auto r = BundleReader::Open(path);
    const TensorInfo& t = (*r)->info().models[0].tensors[0];
    uint64_t raw_frames = 0;
    for (uint64_t f = 0; f < t.frame_count; f++)
      raw_frames += FrameAt(path, t.first_frame + f).flags == internal::kFrameStoredRaw;
    return std::pair{t.stored_size, raw_frames};
  };
  auto [any, any_raw] = stored_for(1.0);
  CHECK(any < 800000);
  CHECK(any_raw == 0);
  double ratio = 800000.0 / static_cast<double>(any);
  auto [high, high_raw] = stored_for(ratio * 2);  // no frame compresses that well
  CHECK(high == 800000);
  CHECK(high_raw == 13);
  auto [low, low_raw] = stored_for(ratio / 2);
  CHECK(low == any);
  CHECK(low_raw == 0);
  for (double bad : {0.5, std::nan(""), 1e300}) {
    TensorOptions o;
    o.min_ratio = bad;
    auto r = BuildBundle(dir / "bad.apbundle", "m", {MakeSpec("w", DType::kF32, {10}, o)});
    REQUIRE_FALSE(r.ok());
    CHECK(std::string(r.status().message()).find("min_ratio") != std::string::npos);
    CHECK(std::string(r.status().message()).find("tensor 'w'") != std::string::npos);
  }
}

TEST_CASE("incompressible frames are stored verbatim and still read back") {
  TempDir dir;
  std::vector<Spec> specs = {MakeSpec("noise", DType::kU8, {300000}, {}, 9, false)};
  std::string path = dir / "noise.apbundle";
  auto b = BuildBundle(path, "m", specs);
  REQUIRE(b.ok());
  CHECK(FrameAt(path, 0).flags == internal::kFrameStoredRaw);
  CheckRoundTrip(path, specs);
}

TEST_CASE("a whole tensor reads the same on one thread and on many") {
  TempDir dir;
  std::vector<Spec> specs = {MakeSpec("w", DType::kF32, {1 << 20}, {}, 4)};
  std::string path = dir / "t.apbundle";
  REQUIRE(BuildBundle(path, "m", specs).ok());
  for (unsigned threads : {1u, 2u, 5u}) {
    ReaderOptions ro;
    ro.threads = threads;
    auto r = BundleReader::Open(path, ro);
    REQUIRE(r.ok());
    auto data = (*r)->ReadTensor((*r)->info().models[0].tensors[0]);
    REQUIRE(data.ok());
    CHECK(*data == specs[0].data);
  }
}

TEST_CASE("metadata, signature, dependencies and blobs round-trip") {
  TempDir dir;
  BundleBuilder b;
  ModelBuilder& m = b.AddModel("enc");
  ModelMetadata md;
  md.author = "A. Author";
  md.license = "MIT";
  md.description = "encoder";
  md.metrics = {{"accuracy", 0.91}, {"loss", 1.25}};
  md.extra = {{"framework", "torch"}, {"unicode", "gr\xc3\xbc\xc3\x9f"}};
  Signature sig;
  sig.inputs = {{"ids", DType::kI64, {{-1, "batch"}, {128, ""}}}};
  sig.outputs = {{"emb", DType::kF32, {{-1, ""}, {384, ""}}}};
  std::string config = "{\"hidden\": 384}";
  std::string big_blob(200000, 'z');
  m.SetVersion("2.1").SetMetadata(md).SetSignature(sig).AddDependency("tokenizer", ">=1.0");
  m.AddBlob("config.json", BlobKind::kArchitecture, "application/json", config);
  m.AddBlob("pre.json", BlobKind::kPreprocess, "application/json", big_blob);
  auto w = RandomBytes(4096, 1);
  m.AddTensor("w", DType::kU8, {4096}, w);
  ModelBuilder& m2 = b.AddModel("dec");
  m2.AddTensor("w", DType::kU8, {4096}, w);
  std::string path = dir / "meta.apbundle";
  REQUIRE(b.Build(path).ok());

  auto r = BundleReader::Open(path);
  REQUIRE(r.ok());
  const BundleInfo& info = (*r)->info();
  CHECK(info.format_version == 1);
  CHECK(info.producer.find("faultline") == 0);
  CHECK(info.created.size() == 20);
  REQUIRE(info.models.size() == 2);
  const ModelInfo* e = info.FindModel("enc");
  REQUIRE(e);
  CHECK(e->version == "2.1");
  CHECK(e->metadata.author == md.author);
  CHECK(e->metadata.license == md.license);
  CHECK(e->metadata.description == md.description);
  CHECK(e->metadata.metrics == md.metrics);
  CHECK(e->metadata.extra == md.extra);
  REQUIRE(e->signature.inputs.size() == 1);
  CHECK(e->signature.inputs[0].name == "ids");
  CHECK(e->signature.inputs[0].dtype == DType::kI64);
  CHECK(e->signature.inputs[0].shape[0].size == -1);
  CHECK(e->signature.inputs[0].shape[0].name == "batch");
  CHECK(e->signature.inputs[0].shape[1].size == 128);
  CHECK(e->signature.outputs[0].shape[0].name.empty());
  REQUIRE(e->dependencies.size() == 1);
  CHECK(e->dependencies[0].name == "tokenizer");
  CHECK(e->dependencies[0].version == ">=1.0");
  REQUIRE(e->blobs.size() == 2);
  CHECK(e->FindBlob("config.json")->kind == BlobKind::kArchitecture);
  CHECK(*(*r)->ReadBlob(*e->FindBlob("config.json")) == config);
  CHECK(*(*r)->ReadBlob(*e->FindBlob("pre.json")) == big_blob);
  CHECK(info.FindModel("dec")->tensors.size() == 1);
  CHECK(info.FindModel("nope") == nullptr);
}

TEST_CASE("a streamed tensor is read in bounded batches and round-trips") {
  TempDir dir;
  auto data = RandomBytes(5 * 65536 + 123, 3, true);
  uint64_t calls = 0, max_len = 0;
  BundleBuilder b;
  b.AddModel("m").AddTensorStream("s", DType::kU8, {data.size()},
                                  [&](uint64_t off, std::span<std::byte> out) {
                                    calls++;
                                    max_len = std::max<uint64_t>(max_len, out.size());
                                    memcpy(out.data(), data.data() + off, out.size());
                                    return Status::Ok();
                                  });
  std::string path = dir / "s.apbundle";
  REQUIRE(b.Build(path).ok());
  CHECK(calls >= 1);
  CHECK(max_len <= 256u << 20);
  CheckRoundTrip(path, {Spec{"s", DType::kU8, {data.size()}, {}, data}});
}

TEST_CASE("frames written in large chunks round-trip across chunk boundaries") {
  // The writer buffers frames and writes them in chunks of several MiB cut
  // on 2 MiB file boundaries: tensors of every codec, odd frame sizes and
  // deduplicated frames spread over several chunks must all read back.
  TempDir dir;
  TensorOptions raw, shuf, small;
  raw.codec = Codec::kRaw;
  shuf.shuffle = true;
  small.page_size = 4096;
  std::vector<Spec> specs = {MakeSpec("head", DType::kU8, {3000}, {}, 1),
                             MakeSpec("raw", DType::kBF16, {(5u << 20) + 77}, raw, 2),
                             MakeSpec("zstd", DType::kF32, {(3u << 20) + 5}, shuf, 3, true),
                             MakeSpec("noise", DType::kU8, {(9u << 20) + 4099}, {}, 4, false),
                             MakeSpec("small", DType::kU8, {(1u << 20) + 1}, small, 5)};
  specs.push_back(specs[1]);  // the same bytes again: deduplicated, nothing written
  specs.back().name = "raw_again";
  std::string path = dir / "chunks.apbundle";
  auto sum = BuildBundle(path, "m", specs);
  REQUIRE(sum.ok());
  CHECK(sum->dedup_saved_bytes >= (10u << 20));
  CheckRoundTrip(path, specs);
}

TEST_CASE("identical frames are stored once across tensors and models") {
  TempDir dir;
  auto shared = RandomBytes(8 * 65536, 5, false);
  auto other = RandomBytes(8 * 65536, 6, false);
  BundleBuilder b;
  b.AddModel("a").AddTensor("embed", DType::kU8, {shared.size()}, shared)
      .AddTensor("other", DType::kU8, {other.size()}, other);
  b.AddModel("b").AddTensor("lm_head", DType::kU8, {shared.size()}, shared);
  std::string path = dir / "dedup.apbundle";
  auto sum = b.Build(path);
  REQUIRE(sum.ok());
  CHECK(sum->frames == 24);
  CHECK(sum->unique_frames == 16);
  CHECK(sum->dedup_saved_bytes >= 8 * 65536);
  CHECK(sum->file_size < 20 * 65536);
  auto r = BundleReader::Open(path);
  REQUIRE(r.ok());
  CHECK((*r)->info().unique_frames == 16);
  CHECK((*r)->info().frame_refs == 24);
  CHECK(*(*r)->ReadTensor(*(*r)->info().FindModel("b")->FindTensor("lm_head")) == shared);
  CHECK((*r)->Verify().ok());
}

TEST_CASE("identical bytes under different codecs are not shared") {
  TempDir dir;
  auto data = RandomBytes(65536, 7, true);
  TensorOptions raw;
  raw.codec = Codec::kRaw;
  BundleBuilder b;
  b.AddModel("m").AddTensor("z", DType::kU8, {data.size()}, data)
      .AddTensor("r", DType::kU8, {data.size()}, data, raw);
  std::string path = dir / "c.apbundle";
  auto sum = b.Build(path);
  REQUIRE(sum.ok());
  CHECK(sum->unique_frames == 2);
  auto r = BundleReader::Open(path);
  CHECK(*(*r)->ReadTensor(*(*r)->info().models[0].FindTensor("r")) == data);
}

TEST_CASE("a failed build leaves nothing at the target and keeps an existing file") {
  TempDir dir;
  std::string path = dir / "out.apbundle";
  WriteFileBytes(path, "old", 3);
  BundleBuilder b;
  TensorOptions o;
  o.page_size = 4096;  // many batches, so the failure comes mid-way
  b.AddModel("m").AddTensorStream("s", DType::kU8, {4 << 20},
                                  [](uint64_t off, std::span<std::byte>) {
                                    return off > (1u << 20) ? Status::Error(EIO, "source broke")
                                                            : Status::Ok();
                                  }, o);
  auto r = b.Build(path);
  REQUIRE_FALSE(r.ok());
  CHECK(std::string(r.status().message()).find("source broke") != std::string::npos);
  auto after = ReadFileBytes(path);
  CHECK(after.size() == 3);
  CHECK(dir.List().size() == 1);  // no temporary left behind
}

TEST_CASE("a build that cannot write its frames fails with a clear error and leaves nothing") {
  // A file size limit makes a buffered chunk's write fail part way (EFBIG).
  TempDir dir;
  std::string path = dir / "big.apbundle";
  TensorOptions raw;
  raw.codec = Codec::kRaw;
  auto data = RandomBytes(12u << 20, 8, false);
  int status = RunInChild([&]() -> int {
    signal(SIGXFSZ, SIG_IGN);
    rlimit lim{3u << 20, 3u << 20};
    if (setrlimit(RLIMIT_FSIZE, &lim) != 0) return 3;
    BundleBuilder b;
    b.AddModel("m").AddTensor("w", DType::kU8, {data.size()}, data, raw);
    auto r = b.Build(path);
    if (r.ok()) return 4;
    if (std::string(r.status().message()).find("bundle frames") == std::string::npos) return 5;
    return r.status().code() == EFBIG ? 0 : 6;
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(dir.List().empty());
}

TEST_CASE("a build into a missing directory fails with a clear error") {
  TempDir dir;
  auto r = BuildBundle(dir / "no/such/dir/x.apbundle", "m", {MakeSpec("t", DType::kU8, {10})});
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == ENOENT);
}

TEST_CASE("builder errors name the model and tensor at fault") {
  TempDir dir;
  auto data = RandomBytes(100, 1);
  {
    BundleBuilder b;
    b.AddModel("m").AddTensor("t", DType::kF32, {10}, data);  // 40 bytes needed
    auto r = b.Build(dir / "a.apbundle");
    REQUIRE_FALSE(r.ok());
    CHECK(std::string(r.status().message()).find("'t'") != std::string::npos);
  }
  {
    BundleBuilder b;
    b.AddModel("m").AddTensor("t", DType::kU8, {100}, data).AddTensor("t", DType::kU8, {100}, data);
    CHECK(std::string(b.Build(dir / "b.apbundle").status().message()).find("duplicate") != std::string::npos);
  }
  {
    BundleBuilder b;
    TensorOptions o;
    o.page_size = 5000;
    b.AddModel("m").AddTensor("t", DType::kU8, {100}, data, o);
    CHECK(std::string(b.Build(dir / "c.apbundle").status().message()).find("page size") != std::string::npos);
  }
  for (const char* bad : {"a/b", "..", ".hidden", "", "x\\y"}) {
    BundleBuilder b;
    b.AddModel(bad).AddTensor("t", DType::kU8, {100}, data);
    CHECK_MESSAGE(!b.Build(dir / "d.apbundle").ok(), bad);
  }
  {
    BundleBuilder b;
    b.AddModel("m");
    b.AddModel("m");
    CHECK_FALSE(b.Build(dir / "e.apbundle").ok());
  }
  {
    BundleBuilder b;
    b.AddModel("m").AddTensor(std::string("a\0b", 3), DType::kU8, {100}, data);
    CHECK_FALSE(b.Build(dir / "f.apbundle").ok());
  }
  {
    BundleBuilder b;
    b.AddModel("m").AddTensor("t", DType::kU8, {100}, data);
    REQUIRE(b.Build(dir / "g.apbundle").ok());
    CHECK_FALSE(b.Build(dir / "h.apbundle").ok());  // callable once
  }
  CHECK(dir.List().size() == 1);
}

TEST_CASE("a frame is read alone with bounds checked") {
  TempDir dir;
  std::vector<Spec> specs = {MakeSpec("t", DType::kU8, {10000}, {}, 1)};
  std::string path = dir / "f.apbundle";
  REQUIRE(BuildBundle(path, "m", specs).ok());
  auto r = BundleReader::Open(path);
  const TensorInfo& t = (*r)->info().models[0].tensors[0];
  std::vector<std::byte> small(100), big(65536);
  CHECK((*r)->ReadFrame(t, 0, small).code() == ENOBUFS);
  CHECK((*r)->ReadFrame(t, 1, big).code() == ERANGE);
  CHECK((*r)->ReadFrame(t, 0, big).ok());
  std::vector<std::byte> wrong(5);
  CHECK_FALSE((*r)->ReadTensor(t, wrong).ok());
}
