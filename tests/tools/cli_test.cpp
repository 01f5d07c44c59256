// The faultline CLI as a user runs it: pack, inspect, verify, unpack, help,
// and the exit status and message of every kind of mistake.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "bundle/bundle_util.h"

using namespace faultline;
using namespace faultline::test;

static const std::vector<std::byte> kOneByte(1), kFourBytes(4);  // outlive every Build

namespace {

std::string Cli() {
  const char* p = getenv("FAULTLINE_CLI");
  return p ? p : "faultline";
}

CommandResult F(const std::string& args) { return Run(Cli() + " " + args); }

std::string MakeSafetensorsFile(const TempDir& dir) {
  // Written through the library: pack a bundle, unpack it to safetensors.
  TensorOptions o;
  o.page_size = 4096;
  std::string b = dir / "src.apbundle";
  if (!BuildBundle(b, "src", {MakeSpec("layer.0.w", DType::kF32, {4000}, o, 1),
                              MakeSpec("layer.0.b", DType::kBF16, {300}, o, 2),
                              MakeSpec("tied", DType::kU8, {8192}, o, 3, false)})
           .ok())
    throw std::runtime_error("build failed");
  auto r = F("unpack " + b + " -o " + dir.path());
  if (r.status != 0) throw std::runtime_error(r.out);
  return dir / "src.safetensors";
}

}  // namespace

TEST_CASE("pack, inspect, verify and unpack round-trip a safetensors file") {
  TempDir dir;
  std::string st = MakeSafetensorsFile(dir);
  std::string b = dir / "m.apbundle";
  auto r = F("pack " + st + " -o " + b + " --model mymodel --level 5 --page-size 8K --shuffle");
  REQUIRE_MESSAGE(r.status == 0, r.out);
  CHECK(r.out.find("ratio") != std::string::npos);
  CHECK(r.out.find("dedup saved") != std::string::npos);

  r = F("inspect " + b);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("model mymodel") != std::string::npos);
  CHECK(r.out.find("layer.0.w") != std::string::npos);
  CHECK(r.out.find("zstd+shuffle") != std::string::npos);

  r = F("inspect --json " + b);
  REQUIRE(r.status == 0);
  auto j = nlohmann::json::parse(r.out);
  CHECK(j["models"][0]["name"] == "mymodel");
  CHECK(j["models"][0]["tensors"].size() == 3);
  CHECK(j["models"][0]["tensors"][0]["page_size"] == 8192);
  CHECK(j["models"][0]["tensors"][0]["level"] == 5);

  r = F("verify " + b);
  CHECK_MESSAGE(r.status == 0, r.out);
  CHECK(r.out.find("OK") != std::string::npos);

  // --min-ratio beyond what any frame reaches: every frame stored verbatim.
  std::string verbatim = dir / "v.apbundle";
  r = F("pack " + st + " -o " + verbatim + " --min-ratio 1000 -q");
  REQUIRE_MESSAGE(r.status == 0, r.out);
  r = F("inspect --json " + verbatim);
  REQUIRE(r.status == 0);
  auto jv = nlohmann::json::parse(r.out);
  for (const auto& t : jv["models"][0]["tensors"]) CHECK(t["stored_size"] == t["size"]);

  r = F("unpack " + b + " -o " + (dir / "out"));
  REQUIRE_MESSAGE(r.status == 0, r.out);
  CHECK(ReadFileBytes(dir / "out/mymodel.safetensors") == ReadFileBytes(st));

  r = F("unpack " + b + " -o " + (dir / "out2") + " --model nope");
  CHECK(r.status == 1);
  CHECK(r.out.find("no model 'nope'") != std::string::npos);
}

TEST_CASE("pack with the raw codec and a config blob") {
  TempDir dir;
  std::string st = MakeSafetensorsFile(dir);
  WriteFileBytes(dir / "config.json", "{\"a\":1}", 7);
  std::string b = dir / "raw.apbundle";
  auto r = F("pack -q " + st + " -o " + b + " --codec raw --config " + (dir / "config.json"));
  REQUIRE_MESSAGE(r.status == 0, r.out);
  CHECK(r.out.empty());
  r = F("inspect " + b);
  CHECK(r.out.find("blob config.json") != std::string::npos);
  CHECK(r.out.find(" raw/") != std::string::npos);
}

TEST_CASE("verify names the tensor and frame of a corrupt bundle and exits 1") {
  TempDir dir;
  TensorOptions o;
  o.page_size = 4096;
  std::string b = dir / "c.apbundle";
  REQUIRE(BuildBundle(b, "m", {MakeSpec("good", DType::kU8, {8192}, o, 1),
                               MakeSpec("bad", DType::kU8, {8192}, o, 2)}).ok());
  auto rec = FrameAt(b, 3);
  auto f = ReadFileBytes(b);
  f[rec.offset + 1] ^= std::byte{1};
  WriteFileBytes(b, f);
  auto r = F("verify " + b);
  CHECK(r.status == 1);
  CHECK_MESSAGE(r.out.find("model 'm' tensor 'bad' frame 1: checksum does not match") != std::string::npos, r.out);
}

TEST_CASE("every command has --help") {
  for (const char* cmd : {"pack", "inspect", "verify", "unpack"}) {
    auto r = F(std::string(cmd) + " --help");
    CHECK(r.status == 0);
    CHECK(r.out.find(std::string("usage: faultline ") + cmd) != std::string::npos);
  }
  auto r = F("--help");
  CHECK(r.status == 0);
  r = F("--version");
  CHECK(r.out.find("faultline 0.1.0") != std::string::npos);
}

TEST_CASE("usage mistakes exit 2 with a message on stderr") {
  TempDir dir;
  struct Case {
    std::string args;
    const char* expect;
  } cases[] = {
      {"", "usage"},
      {"frobnicate", "unknown command 'frobnicate'"},
      {"pack", "no input files"},
      {"pack a.safetensors", "-o OUT.apbundle is required"},
      {"pack a.safetensors -o x --codec lz4", "--codec must be zstd or raw"},
      {"pack a.safetensors -o x --level 99", "--level must be"},
      {"pack a.safetensors -o x --level abc", "--level must be"},
      {"pack a.safetensors -o x --page-size 3K", "--page-size must be"},
      {"pack a.safetensors -o x --page-size 128M", "--page-size must be"},
      {"pack a.safetensors -o x --threads 0", "--threads must be"},
      {"pack a.safetensors -o x --min-ratio 0.9", "--min-ratio must be"},
      {"pack a.safetensors -o x --min-ratio fast", "--min-ratio must be"},
      {"pack a.safetensors -o x --min-ratio", "--min-ratio needs a number"},
      {"pack a.safetensors -o", "-o needs a path"},
      {"pack a.safetensors -o x --bogus", "unknown option --bogus"},
      {"inspect", "no bundle given"},
      {"inspect a b", "one bundle"},
      {"verify", "no bundle given"},
      {"unpack x.apbundle", "-o DIR is required"},
  };
  for (const auto& c : cases) {
    auto r = Run("(" + Cli() + " " + c.args + " >/dev/null)");  // stderr only
    CHECK_MESSAGE(r.status == 2, c.args);
    CHECK_MESSAGE(r.out.find(c.expect) != std::string::npos, c.args, " -> ", r.out);
  }
}

TEST_CASE("runtime failures exit 1 with the file and the problem") {
  TempDir dir;
  auto r = F("inspect " + (dir / "missing.apbundle"));
  CHECK(r.status == 1);
  CHECK(r.out.find("missing.apbundle") != std::string::npos);
  WriteFileBytes(dir / "junk.safetensors", "0123456789abcdef", 16);
  r = F("pack " + (dir / "junk.safetensors") + " -o " + (dir / "j.apbundle"));
  CHECK(r.status == 1);
  CHECK(r.out.find("junk.safetensors") != std::string::npos);
  CHECK(dir.List().size() == 1);  // no bundle and no temporary left
  r = F("verify " + (dir / "junk.safetensors"));
  CHECK(r.status == 1);
}

TEST_CASE("limits: a decompression bomb is refused by inspect, verify and unpack, and unpack checks for room") {
  TempDir dir;
  std::string bomb = dir / "bomb.apbundle";
  MakeBomb(bomb, 16384);  // 1 TiB declared
  for (const char* cmd : {"inspect", "verify"}) {
    auto r = F(std::string(cmd) + " " + bomb);
    INFO(cmd << ": " << r.out);
    CHECK(r.status == 1);
    CHECK(r.out.find("bomb.apbundle") != std::string::npos);
    CHECK(r.out.find("decompression bomb") != std::string::npos);
  }
  auto r = F("inspect " + bomb + " --max-expansion 0");
  CHECK(r.status == 0);
  r = F("inspect " + bomb + " --max-expansion 0 --max-size 1G");
  CHECK(r.status == 1);
  CHECK(r.out.find("more than the limit of 1.00 GiB") != std::string::npos);
  r = F("inspect " + bomb + " --max-size lots");
  CHECK(r.status == 2);
  // Lifted, unpack still refuses to fill the disk: it checks for room first.
  r = F("unpack " + bomb + " --max-expansion 0 -o " + (dir / "out"));
  INFO(r.out);
  CHECK(r.status == 1);
  CHECK(r.out.find("needs 1.00 TiB") != std::string::npos);
  CHECK(TempDir::Count(dir / "out") == 0);
  auto h = F("unpack --help");
  CHECK(h.out.find("--max-expansion") != std::string::npos);
}

TEST_CASE("pack refuses a --config that is not a regular file and an output that is its input") {
  TempDir dir;
  std::string st = MakeSafetensorsFile(dir);
  auto r = F("pack " + st + " -o " + (dir / "a.apbundle") + " --config " + dir.path());
  CHECK(r.status == 1);
  CHECK(r.out.find("is not a regular file") != std::string::npos);
  r = F("pack " + st + " -o " + (dir / "a.apbundle") + " --config /dev/zero");
  CHECK(r.status == 1);
  CHECK(r.out.find("/dev/zero' is not a regular file") != std::string::npos);
  auto before = ReadFileBytes(st);
  r = F("pack " + st + " -o " + st);
  CHECK(r.status == 2);
  CHECK(r.out.find("it would be replaced") != std::string::npos);
  CHECK(ReadFileBytes(st) == before);
}

TEST_CASE("inspect shows control characters from a bundle escaped, never raw") {
  TempDir dir;
  std::string p = dir / "esc.apbundle";
  BundleBuilder b;
  ModelMetadata md;
  static const char kDescription[] = "title \x1b]0;owned\x07 clear \x1b[2J nul \0 after";
  md.description = std::string(kDescription, sizeof(kDescription) - 1);
  md.author = "c1 \xc2\x9b" "31m";
  b.AddModel("m").SetMetadata(md).AddTensor("t", DType::kU8, {1}, kOneByte);
  REQUIRE(b.Build(p).ok());
  auto r = F("inspect " + p);
  CHECK(r.status == 0);
  CHECK(r.out.find('\x1b') == std::string::npos);
  CHECK(r.out.find('\x07') == std::string::npos);
  CHECK(r.out.find("\xc2\x9b") == std::string::npos);
  CHECK(r.out.find("\\x1b]0;owned\\x07 clear \\x1b[2J nul \\x00 after") != std::string::npos);
  CHECK(r.out.find("c1 \\x9b31m") != std::string::npos);
}

TEST_CASE("unpack errors name the bundle, and an output directory that cannot be made says why") {
  TempDir dir;
  TensorOptions o;
  o.page_size = 4096;
  std::string p = dir / "c.apbundle";
  REQUIRE(BuildBundle(p, "m", {MakeSpec("w", DType::kF32, {4000}, o, 1)}).ok());
  CorruptFrame(p, 1, std::byte{0x40});
  auto r = F("unpack " + p + " -o " + (dir / "out"));
  CHECK(r.status == 1);
  CHECK(r.out.find("c.apbundle") != std::string::npos);
  CHECK(r.out.find("frame 1") != std::string::npos);
  r = F("unpack " + p + " -o /proc/faultline-test");
  CHECK(r.status == 1);
  CHECK(r.out.find("its parent '/proc' exists but takes no new directory") != std::string::npos);
}
