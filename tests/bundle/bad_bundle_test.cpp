// Malformed bundles: every defect gets an error that names it, never a
// crash, a hang, an unchecked allocation or silent garbage.
#include <doctest/doctest.h>

#include <unistd.h>

#include "bundle/bundle_util.h"

using namespace faultline;
using namespace faultline::test;

static const std::vector<std::byte> kOneByte(1), kFourBytes(4);  // outlive every Build
using nlohmann::json;

namespace {

// A small valid bundle: two tensors of three 4 KiB frames each.
std::string MakeGood(const TempDir& dir, const std::string& name = "good.apbundle") {
  TensorOptions o;
  o.page_size = 4096;
  std::string path = dir / name;
  auto r = BuildBundle(path, "m", {MakeSpec("a", DType::kF32, {3000}, o, 1),
                                   MakeSpec("b", DType::kU8, {9000}, o, 2)});
  if (!r.ok()) throw std::runtime_error(r.status().ToString());
  return path;
}

bool Contains(const std::string& haystack, const char* needle) {
  bool found = haystack.find(needle) != std::string::npos;
  if (!found) MESSAGE("error was: ", haystack);
  return found;
}

}  // namespace

TEST_CASE("a file with the wrong magic is not a bundle") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto f = ReadFileBytes(p);
  f[0] = std::byte{'X'};
  WriteFileBytes(p, f);
  CHECK(Contains(OpenError(p), "wrong magic"));
}

TEST_CASE("an unknown format version is refused by number") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteHeader(p, [](internal::Header& h) { h.version = 7; });
  CHECK(Contains(OpenError(p), "unsupported format version 7"));
}

TEST_CASE("a header whose checksum does not match is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto f = ReadFileBytes(p);
  f[100] ^= std::byte{1};  // inside the checksummed range
  WriteFileBytes(p, f);
  CHECK(Contains(OpenError(p), "header checksum"));
}

TEST_CASE("a file smaller than the header is truncated") {
  TempDir dir;
  std::string p = dir / "tiny.apbundle";
  WriteFileBytes(p, "APBUNDLE", 8);
  CHECK(Contains(OpenError(p), "truncated"));
  WriteFileBytes(p, "", 0);
  CHECK(Contains(OpenError(p), "truncated"));
}

TEST_CASE("a bundle truncated anywhere is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto f = ReadFileBytes(p);
  for (size_t cut : {size_t{4096}, size_t{5000}, f.size() / 2, f.size() - 4096, f.size() - 1}) {
    std::string q = dir / "cut.apbundle";
    WriteFileBytes(q, f.data(), cut);
    CHECK_MESSAGE(Contains(OpenError(q), "truncated"), cut);
  }
}

TEST_CASE("a bundle with bytes appended is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto f = ReadFileBytes(p);
  f.resize(f.size() + 10);
  WriteFileBytes(p, f);
  CHECK(Contains(OpenError(p), "extended"));
}

TEST_CASE("a manifest that is not valid JSON is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, nullptr, [](std::string& t) { t = "{\"format_version\": 1, oops"; });
  CHECK(Contains(OpenError(p), "manifest is not valid JSON"));
}

TEST_CASE("a manifest whose checksum does not match is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto f = ReadFileBytes(p);
  internal::Header h = ReadHeader(f);
  f[h.manifest_offset + 3] ^= std::byte{0x20};
  WriteFileBytes(p, f);
  CHECK(Contains(OpenError(p), "manifest checksum"));
}

TEST_CASE("a manifest field of the wrong type is named") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["size"] = "12000"; });
  CHECK(Contains(OpenError(p), "field 'size' must be number"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"] = json::object(); });
  CHECK(Contains(OpenError(p), "field 'models' must be array"));
  p = MakeGood(dir, "3.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["metadata"]["metrics"] = {{"acc", "high"}}; });
  CHECK(Contains(OpenError(p), "metric 'acc' is not a number"));
  p = MakeGood(dir, "4.apbundle");
  RewriteManifest(p, [](json& j) { j = json::array(); });
  CHECK(Contains(OpenError(p), "not a JSON object"));
}

TEST_CASE("a manifest missing a field is named") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][1].erase("dtype"); });
  CHECK(Contains(OpenError(p), "missing field 'dtype'"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j.erase("models"); });
  CHECK(Contains(OpenError(p), "missing field 'models'"));
}

TEST_CASE("a manifest nested absurdly deep is refused without recursion") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, nullptr, [](std::string& t) { t = std::string(1 << 20, '['); });
  CHECK(Contains(OpenError(p), "nested deeper"));
}

TEST_CASE("an unknown dtype or codec is named") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["dtype"] = "f128"; });
  CHECK(Contains(OpenError(p), "unknown dtype 'f128'"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["codec"] = "lz4"; });
  CHECK(Contains(OpenError(p), "unknown codec 'lz4'"));
}

TEST_CASE("dtype, shape and byte size that disagree are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["shape"] = {2999}; });
  CHECK(Contains(OpenError(p), "disagrees with dtype f32"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["dtype"] = "f64"; });
  CHECK(Contains(OpenError(p), "disagrees"));
  p = MakeGood(dir, "3.apbundle");
  RewriteManifest(p, [](json& j) {
    j["models"][0]["tensors"][0]["shape"] = {1ull << 40, 1ull << 40};
  });
  CHECK(Contains(OpenError(p), "absurdly large"));
}

TEST_CASE("frame counts and lengths that disagree with the size are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["frames"][1] = 2; });
  CHECK(Contains(OpenError(p), "frames, but size"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["page_size"] = 8192; });
  CHECK(Contains(OpenError(p), "needs"));
  p = MakeGood(dir, "3.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["page_size"] = 5000; });
  CHECK(Contains(OpenError(p), "page size 5000"));
  p = MakeGood(dir, "4.apbundle");
  RewriteFrame(p, 0, [](internal::FrameRecord& r) { r.raw_length = 100; });
  CHECK(Contains(OpenError(p), "frame 0 has length 100"));
}

TEST_CASE("frames referenced outside the frame table are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][1]["frames"][0] = 1ull << 60; });
  CHECK(Contains(OpenError(p), "outside the frame table"));
}

TEST_CASE("frame offsets or lengths outside the file are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteFrame(p, 1, [](internal::FrameRecord& r) { r.offset = 1ull << 40; });
  CHECK(Contains(OpenError(p), "outside the frame data"));
  p = MakeGood(dir, "2.apbundle");
  RewriteFrame(p, 1, [](internal::FrameRecord& r) { r.stored_length = 0xFFFFFFF0u; });
  CHECK(Contains(OpenError(p), "outside the frame data"));
  p = MakeGood(dir, "3.apbundle");
  RewriteFrame(p, 1, [](internal::FrameRecord& r) { r.offset += 1; });
  CHECK(Contains(OpenError(p), "unaligned"));
}

TEST_CASE("overlapping frames are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto first = FrameAt(p, 0);
  RewriteFrame(p, 1, [&](internal::FrameRecord& r) {
    r.offset = first.offset;
    r.checksum ^= 1;
  });
  CHECK(Contains(OpenError(p), "disagree"));
  p = MakeGood(dir, "2.apbundle");
  RewriteFrame(p, 0, [](internal::FrameRecord& r) { r.stored_length += 8192; });
  CHECK(Contains(OpenError(p), "overlap"));
}

TEST_CASE("header regions outside the file are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteHeader(p, [](internal::Header& h) { h.frame_count = 1ull << 50; });
  CHECK(Contains(OpenError(p), "frame table"));
  p = MakeGood(dir, "2.apbundle");
  RewriteHeader(p, [](internal::Header& h) { h.manifest_length = 1ull << 62; });
  CHECK(Contains(OpenError(p), "manifest"));
  p = MakeGood(dir, "3.apbundle");
  RewriteHeader(p, [](internal::Header& h) { h.data_length = 1ull << 62; });
  CHECK(Contains(OpenError(p), "outside the file"));
  p = MakeGood(dir, "4.apbundle");
  RewriteHeader(p, [](internal::Header& h) { h.flags = 4; });
  CHECK(Contains(OpenError(p), "unknown header flags"));
}

TEST_CASE("unknown frame flags are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteFrame(p, 0, [](internal::FrameRecord& r) { r.flags = 0x80; });
  CHECK(Contains(OpenError(p), "unknown flags"));
}

TEST_CASE("a frame whose checksum does not match names its tensor and frame") {
  TempDir dir;
  std::string p = MakeGood(dir);
  CorruptFrame(p, 4, std::byte{0x40});  // tensor b, frame 1
  auto r = BundleReader::Open(p);
  REQUIRE(r.ok());  // opening does not read frames
  const ModelInfo& m = (*r)->info().models[0];
  auto a = (*r)->ReadTensor(*m.FindTensor("a"));
  CHECK(a.ok());  // the other tensor is intact
  auto b = (*r)->ReadTensor(*m.FindTensor("b"));
  REQUIRE_FALSE(b.ok());
  CHECK(b.status().code() == EBADMSG);
  CHECK(Contains(b.status().message(), "tensor 'b' frame 1: checksum does not match"));
  Status v = (*r)->Verify();
  REQUIRE_FALSE(v.ok());
  CHECK(Contains(v.message(), "model 'm' tensor 'b' frame 1"));
  std::vector<std::byte> buf(4096);
  CHECK_FALSE((*r)->ReadFrame(*m.FindTensor("b"), 1, buf).ok());
  CHECK((*r)->ReadFrame(*m.FindTensor("b"), 0, buf).ok());
}

TEST_CASE("a frame with a matching checksum but bad zstd data is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto rec = FrameAt(p, 0);
  auto f = ReadFileBytes(p);
  REQUIRE(rec.flags == 0);  // compressed
  for (uint32_t i = 0; i < rec.stored_length; i++) f[rec.offset + i] = std::byte{0x55};
  WriteFileBytes(p, f);
  uint64_t sum = internal::Checksum64(f.data() + rec.offset, rec.stored_length);
  RewriteFrame(p, 0, [&](internal::FrameRecord& r) { r.checksum = sum; });
  auto r = BundleReader::Open(p);
  REQUIRE(r.ok());
  auto a = (*r)->ReadTensor((*r)->info().models[0].tensors[0]);
  REQUIRE_FALSE(a.ok());
  CHECK(Contains(a.status().message(), "zstd"));
}

TEST_CASE("model names that would escape a directory are refused on open") {
  TempDir dir;
  for (const char* bad : {"../evil", "a/b", "..", ".hidden"}) {
    std::string p = MakeGood(dir);
    RewriteManifest(p, [&](json& j) { j["models"][0]["name"] = bad; });
    std::string e = OpenError(p);
    CHECK_MESSAGE(e.find("model name") != std::string::npos, e);
  }
  std::string p = MakeGood(dir);
  RewriteManifest(p, [&](json& j) { j["models"][0]["name"] = std::string("a\0b", 3); });
  CHECK(Contains(OpenError(p), "NUL"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [&](json& j) { j["models"][0]["tensors"][0]["name"] = std::string("a\0b", 3); });
  CHECK(Contains(OpenError(p), "NUL"));
}

TEST_CASE("duplicate model or tensor names in a manifest are refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"].push_back(j["models"][0]); });
  CHECK(Contains(OpenError(p), "duplicate model name"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][1]["name"] = "a"; });
  CHECK(Contains(OpenError(p), "duplicate tensor name"));
}

TEST_CASE("a blob or tensor whose size overflows the frame count is refused") {
  TempDir dir;
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) {
    j["models"][0]["blobs"] = json::array({{{"name", "huge"}, {"kind", "config"}, {"size", UINT64_MAX},
                                            {"codec", "zstd"}, {"level", 3}, {"shuffle", false},
                                            {"page_size", 65536}, {"frames", {0, 0}}}});
  });
  CHECK(Contains(OpenError(p), "blob 'huge': 0 frames, but size 18446744073709551615"));
  p = MakeGood(dir, "2.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["size"] = 1.5; });
  CHECK(Contains(OpenError(p), "field 'size' must be an integer of 64 bits at most, not 1.5"));
  p = MakeGood(dir, "3.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["size"] = 424242; },
                  [](std::string& t) {
                    auto at = t.find("424242");
                    REQUIRE(at != std::string::npos);
                    t.replace(at, 6, "18446744073709551616");
                  });
  CHECK(Contains(OpenError(p), "must be an integer of 64 bits at most"));
}

TEST_CASE("a small bundle declaring far more than it holds is refused as a decompression bomb") {
  TempDir dir;
  std::string p = dir / "bomb.apbundle";
  MakeBomb(p, 256);  // 16 GiB declared in a file of a few KiB
  std::string e = OpenError(p);
  CHECK(Contains(e, "declares 16.00 GiB of tensors and blobs in a file of"));
  CHECK(Contains(e, "decompression bomb"));
  CHECK(Contains(e, "--max-expansion"));
  ReaderOptions off;
  off.max_expansion = 0;
  auto r = BundleReader::Open(p, off);
  REQUIRE(r.ok());  // the limit is the user's to lift
  CHECK((*r)->info().logical_bytes == (16ull << 30));
  ReaderOptions capped;
  capped.max_expansion = 0;
  capped.max_size = 1ull << 30;
  auto c = BundleReader::Open(p, capped);
  REQUIRE(!c.ok());
  CHECK(Contains(c.status().message(), "more than the limit of 1.00 GiB"));
  // The environment sets the defaults (the pager and Python open bundles too).
  setenv("FAULTLINE_MAX_EXPANSION", "0", 1);
  CHECK(BundleReader::Open(p).ok());
  setenv("FAULTLINE_MAX_SIZE", "8G", 1);
  CHECK(!BundleReader::Open(p).ok());
  unsetenv("FAULTLINE_MAX_EXPANSION");
  unsetenv("FAULTLINE_MAX_SIZE");
  // A real bundle of 1 GiB or less always opens, whatever it compresses to.
  std::string small = dir / "small.apbundle";
  MakeBomb(small, 16);
  CHECK(BundleReader::Open(small).ok());
}

TEST_CASE("names safetensors or unpack cannot write back are refused at pack and at open") {
  TempDir dir;
  BundleBuilder b;
  b.AddModel("m").AddTensor("__metadata__", DType::kU8, {4}, kFourBytes);
  auto r = b.Build(dir / "x.apbundle");
  REQUIRE(!r.ok());
  CHECK(Contains(r.status().message(), "'__metadata__' is reserved"));
  std::string p = MakeGood(dir);
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["name"] = "__metadata__"; });
  CHECK(Contains(OpenError(p), "'__metadata__' is reserved"));
  // Model names: unpack writes <name>.safetensors, a file name of 255 bytes at most.
  BundleBuilder ok;
  ok.AddModel(std::string(243, 'n')).AddTensor("t", DType::kU8, {1}, kOneByte);
  CHECK(ok.Build(dir / "243.apbundle").ok());
  for (size_t len : {244, 255}) {
    p = MakeGood(dir, "n" + std::to_string(len) + ".apbundle");
    RewriteManifest(p, [&](json& j) { j["models"][0]["name"] = std::string(len, 'n'); });
    CHECK(Contains(OpenError(p), "model name must be 1-243 bytes"));
  }
  // Control characters, C1 included (U+009B is a terminal's CSI).
  p = MakeGood(dir, "c1.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["name"] = "m\xc2\x9b" "2J"; });
  CHECK(Contains(OpenError(p), "C1 control character"));
  p = MakeGood(dir, "c1t.apbundle");
  RewriteManifest(p, [](json& j) { j["models"][0]["tensors"][0]["name"] = "t\x1b[2J"; });
  CHECK(Contains(OpenError(p), "control character"));
}

TEST_CASE("random corruption anywhere never crashes the reader") {
  TempDir dir;
  std::string p = MakeGood(dir);
  auto good = ReadFileBytes(p);
  auto ref = BundleReader::Open(p);
  REQUIRE(ref.ok());
  const ModelInfo& rm = (*ref)->info().models[0];
  auto ref_a = *(*ref)->ReadTensor(*rm.FindTensor("a"));
  auto ref_b = *(*ref)->ReadTensor(*rm.FindTensor("b"));
  uint64_t s = 12345;
  int refused = 0;
  for (int round = 0; round < 300; round++) {
    auto f = good;
    for (int k = 0; k < 4; k++) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      f[(s >> 17) % f.size()] ^= static_cast<std::byte>(1 + (s >> 57));
    }
    std::string q = dir / "fuzz.apbundle";
    WriteFileBytes(q, f);
    auto r = BundleReader::Open(q);
    if (!r.ok()) {
      refused++;
      continue;
    }
    Status v = (*r)->Verify();
    if (!v.ok()) {
      refused++;
      continue;
    }
    // Anything that opens and verifies reads back exactly what was written
    // (the corruption hit padding).
    const ModelInfo& m = (*r)->info().models[0];
    REQUIRE(m.FindTensor("a"));
    REQUIRE(m.FindTensor("b"));
    auto a = (*r)->ReadTensor(*m.FindTensor("a"));
    auto b = (*r)->ReadTensor(*m.FindTensor("b"));
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(*a == ref_a);
    CHECK(*b == ref_b);
  }
  CHECK(refused > 100);  // most flips land in checked bytes; the rest in padding
}
