// safetensors import and export: bit-exact both ways, sharded checkpoints,
// and every malformed header refused with a named error.
#include <doctest/doctest.h>

#include <fstream>

#include "bundle/bundle_util.h"
#include "faultline/safetensors.hpp"

using namespace faultline;
using namespace faultline::test;

namespace {

struct StTensor {
  std::string name;
  std::string dtype;
  std::vector<uint64_t> shape;
  std::vector<std::byte> data;
};

// Writes a file in the reference implementation's layout.
std::vector<std::byte> MakeSafetensors(const std::vector<StTensor>& ts,
                                       const std::string& metadata_json = "") {
  std::string h = "{";
  bool first = true;
  if (!metadata_json.empty()) {
    h += "\"__metadata__\":" + metadata_json;
    first = false;
  }
  uint64_t off = 0;
  for (const auto& t : ts) {
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); i++) shape += (i ? "," : "") + std::to_string(t.shape[i]);
    h += std::string(first ? "" : ",") + "\"" + t.name + "\":{\"dtype\":\"" + t.dtype +
         "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(off) + "," +
         std::to_string(off + t.data.size()) + "]}";
    first = false;
    off += t.data.size();
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  uint64_t data = 0;
  for (const auto& t : ts) data += t.data.size();
  std::vector<std::byte> out(8 + h.size() + data);
  internal::StoreLE64(out.data(), h.size());
  memcpy(out.data() + 8, h.data(), h.size());
  uint64_t pos = 8 + h.size();
  for (const auto& t : ts) {
    if (!t.data.empty()) memcpy(out.data() + pos, t.data.data(), t.data.size());
    pos += t.data.size();
  }
  return out;
}

std::vector<std::byte> RawHeaderFile(const std::string& header, size_t data_bytes) {
  std::vector<std::byte> out(8 + header.size() + data_bytes);
  internal::StoreLE64(out.data(), header.size());
  memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

std::string ParseError(const std::vector<std::byte>& file) {
  auto r = ParseSafetensorsHeader(file, file.size());
  return r.ok() ? "(parsed)" : r.status().message();
}

}  // namespace

TEST_CASE("a safetensors file packs and unpacks bit-exactly") {
  TempDir dir;
  std::vector<StTensor> ts = {
      {"model.embed.weight", "BF16", {64, 32}, RandomBytes(64 * 32 * 2, 1)},
      {"model.layers.0.w", "F32", {32, 100}, RandomBytes(32 * 100 * 4, 2)},
      {"model.layers.0.b", "F16", {100}, RandomBytes(200, 3)},
      {"ids", "I64", {3}, RandomBytes(24, 4)},
      {"mask", "BOOL", {5}, RandomBytes(5, 5)},
      {"q", "F8_E4M3", {7}, RandomBytes(7, 6)},
      {"scalar", "F64", {}, RandomBytes(8, 7)},
      {"empty", "F32", {0}, {}},
  };
  auto file = MakeSafetensors(ts, "{\"format\":\"pt\"}");
  std::string in = dir / "in.safetensors";
  WriteFileBytes(in, file);
  for (bool shuffle : {false, true}) {
    BundleBuilder b;
    ModelBuilder& m = b.AddModel("net");
    TensorOptions o;
    o.shuffle = shuffle;
    o.page_size = 4096;
    REQUIRE(ImportSafetensors({in}, m, o).ok());
    std::string bundle = dir / "b.apbundle";
    REQUIRE(b.Build(bundle).ok());
    auto r = BundleReader::Open(bundle);
    REQUIRE(r.ok());
    const ModelInfo& mi = (*r)->info().models[0];
    CHECK(mi.metadata.extra.at("format") == "pt");
    CHECK(mi.FindTensor("model.layers.0.w")->dtype == DType::kF32);
    std::string out = dir / "out.safetensors";
    REQUIRE(ExportSafetensors(**r, mi, out).ok());
    CHECK(ReadFileBytes(out) == file);
  }
}

TEST_CASE("a sharded checkpoint imports into one model") {
  TempDir dir;
  auto a = MakeSafetensors({{"l0.w", "F32", {10}, RandomBytes(40, 1)}});
  auto b = MakeSafetensors({{"l1.w", "F32", {20}, RandomBytes(80, 2)}});
  WriteFileBytes(dir / "s1.safetensors", a);
  WriteFileBytes(dir / "s2.safetensors", b);
  BundleBuilder builder;
  REQUIRE(ImportSafetensors({dir / "s1.safetensors", dir / "s2.safetensors"}, builder.AddModel("m")).ok());
  REQUIRE(builder.Build(dir / "b.apbundle").ok());
  auto r = BundleReader::Open(dir / "b.apbundle");
  REQUIRE(r.ok());
  const ModelInfo& m = (*r)->info().models[0];
  REQUIRE(m.tensors.size() == 2);
  auto l1 = (*r)->ReadTensor(*m.FindTensor("l1.w"));
  CHECK(std::vector<std::byte>(b.end() - 80, b.end()) == *l1);
}

TEST_CASE("a tensor name repeated across shards is refused") {
  TempDir dir;
  auto a = MakeSafetensors({{"w", "F32", {10}, RandomBytes(40, 1)}});
  WriteFileBytes(dir / "s1.safetensors", a);
  WriteFileBytes(dir / "s2.safetensors", a);
  BundleBuilder builder;
  Status s = ImportSafetensors({dir / "s1.safetensors", dir / "s2.safetensors"}, builder.AddModel("m"));
  REQUIRE_FALSE(s.ok());
  CHECK(std::string(s.message()).find("also appears in an earlier file") != std::string::npos);
}

TEST_CASE("unpack never turns a tensor name into a path") {
  TempDir dir;
  auto a = MakeSafetensors({{"../../escape", "U8", {4}, RandomBytes(4, 1)}});
  WriteFileBytes(dir / "in.safetensors", a);
  BundleBuilder builder;
  REQUIRE(ImportSafetensors({dir / "in.safetensors"}, builder.AddModel("m")).ok());
  REQUIRE(builder.Build(dir / "b.apbundle").ok());
  auto r = BundleReader::Open(dir / "b.apbundle");
  REQUIRE(r.ok());
  REQUIRE(ExportSafetensors(**r, (*r)->info().models[0], dir / "m.safetensors").ok());
  CHECK(ReadFileBytes(dir / "m.safetensors") == a);
  CHECK(dir.List().size() == 3);
}

TEST_CASE("a safetensors file shorter than its length prefix is truncated") {
  CHECK(ParseError({}).find("truncated") != std::string::npos);
  std::vector<std::byte> f(5);
  CHECK(ParseError(f).find("truncated") != std::string::npos);
  auto g = RawHeaderFile("{}", 0);
  internal::StoreLE64(g.data(), 1000);
  CHECK(ParseError(g).find("truncated") != std::string::npos);
}

TEST_CASE("a safetensors header length over the limit is refused before allocating") {
  std::vector<std::byte> f(16);
  internal::StoreLE64(f.data(), 1ull << 60);
  CHECK(ParseError(f).find("exceeds the 100 MiB limit") != std::string::npos);
}

TEST_CASE("a safetensors header that is not JSON or not an object is refused") {
  CHECK(ParseError(RawHeaderFile("{\"a\":", 0)).find("not valid JSON") != std::string::npos);
  CHECK(ParseError(RawHeaderFile("[1,2]", 0)).find("not a JSON object") != std::string::npos);
  CHECK(ParseError(RawHeaderFile(std::string(5000, '['), 0)).find("not a JSON object") != std::string::npos);
  // Deep nesting inside a field the schema does not know is refused too,
  // without recursion (the header is parsed as a stream of events).
  CHECK(ParseError(RawHeaderFile("{\"t\":{\"x\":" + std::string(100000, '['), 0)).find("nested deeper") !=
        std::string::npos);
  // A tensor named twice, which a DOM would have kept the last of.
  std::string twice = R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})";
  CHECK(ParseError(RawHeaderFile(twice, 0)).find("'t' appears twice") != std::string::npos);
  // Metadata of millions of entries is refused (each would cost a map node).
  std::string meta = "{\"__metadata__\":{";
  for (int i = 0; i < 70000; i++) meta += "\"k" + std::to_string(i) + "\":\"v\",";
  meta += "\"last\":\"v\"}}";
  CHECK(ParseError(RawHeaderFile(meta, 0)).find("more than 65536 entries") != std::string::npos);
  // Unknown fields are skipped, whatever their shape.
  std::string extra = R"({"t":{"note":{"a":[1,{"b":null}]},"dtype":"U8","shape":[2],"data_offsets":[0,2]},"__metadata__":{"k":"v"}})";
  CHECK(ParseError(RawHeaderFile(extra, 2)) == "(parsed)");
}

TEST_CASE("a 100 MiB safetensors header is parsed in a small multiple of its size") {
  // About 1.5 million empty tensors: a DOM took about seven times the header.
  std::string header = "{";
  for (int i = 0; header.size() < (90u << 20); i++)
    header += "\"model.layers." + std::to_string(i) + ".w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},";
  header += "\"__metadata__\":{\"format\":\"pt\"}}";
  int status = RunInChild([&] {
    auto file = RawHeaderFile(header, 0);
    auto kb = [](const char* field) {
      std::ifstream in("/proc/self/status");
      std::string line;
      while (std::getline(in, line))
        if (line.rfind(field, 0) == 0) return strtoull(line.c_str() + strlen(field), nullptr, 10);
      return 0ull;
    };
    std::ofstream("/proc/self/clear_refs") << "5";  // the peak starts from here
    uint64_t before = kb("VmRSS:");
    auto r = ParseSafetensorsHeader(file, file.size());
    if (!r.ok() || r->tensors.size() < 1000000) return 1;
    uint64_t grew = (kb("VmHWM:") - before) << 10;
    fprintf(stderr, "parsing a %zu MiB header took %llu MiB\n", header.size() >> 20,
            static_cast<unsigned long long>(grew >> 20));
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return 0;  // shadow memory makes the resident set no measure here
#else
    return grew <= 4 * header.size() ? 0 : 2;  // the tensors take 2-3x the text (12x as a DOM)
#endif
  });
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("a safetensors tensor with an unknown dtype is named") {
  auto f = RawHeaderFile("{\"w\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16);
  CHECK(ParseError(f).find("tensor 'w': unknown dtype 'F128'") != std::string::npos);
}

TEST_CASE("safetensors data offsets outside the data are refused") {
  auto f = RawHeaderFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8);
  CHECK(ParseError(f).find("outside the 8-byte data") != std::string::npos);
  auto g = RawHeaderFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8);
  CHECK(ParseError(g).find("outside") != std::string::npos);
}

TEST_CASE("a safetensors tensor whose bytes disagree with dtype and shape is refused") {
  auto f = RawHeaderFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16);
  CHECK(ParseError(f).find("need 12") != std::string::npos);
  auto g = RawHeaderFile(
      "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,16]}}", 16);
  CHECK(ParseError(g).find("absurdly large") != std::string::npos);
}

TEST_CASE("overlapping safetensors tensors are refused") {
  auto f = RawHeaderFile(
      "{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
      16);
  CHECK(ParseError(f).find("overlap") != std::string::npos);
}

TEST_CASE("safetensors fields of the wrong type are named") {
  auto f = RawHeaderFile("{\"w\":{\"dtype\":\"U8\",\"shape\":\"8\",\"data_offsets\":[0,8]}}", 8);
  CHECK(ParseError(f).find("field 'shape' must be array") != std::string::npos);
  auto g = RawHeaderFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[-8],\"data_offsets\":[0,8]}}", 8);
  CHECK(ParseError(g).find("non-negative") != std::string::npos);
  auto h = RawHeaderFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0]}}", 8);
  CHECK(ParseError(h).find("[begin, end]") != std::string::npos);
  auto k = RawHeaderFile("{\"__metadata__\":{\"a\":1}}", 0);
  CHECK(ParseError(k).find("is not a string") != std::string::npos);
  auto m = RawHeaderFile("{\"w\":{\"shape\":[8],\"data_offsets\":[0,8]}}", 8);
  CHECK(ParseError(m).find("missing field 'dtype'") != std::string::npos);
}

TEST_CASE("importing a file that is missing or not safetensors fails with its name") {
  TempDir dir;
  BundleBuilder b;
  Status s = ImportSafetensors({dir / "missing.safetensors"}, b.AddModel("m"));
  CHECK(s.code() == ENOENT);
  WriteFileBytes(dir / "junk.safetensors", "hello world, not a tensor file", 30);
  s = ImportSafetensors({dir / "junk.safetensors"}, b.AddModel("n"));
  REQUIRE_FALSE(s.ok());
  CHECK(std::string(s.message()).find("junk.safetensors") != std::string::npos);
}
