// The faultline command-line tool: pack, inspect, verify, unpack. Uses the
// public API only. Exit status: 0 success, 1 failure, 2 usage error.
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "faultline/bundle.hpp"
#include "faultline/safetensors.hpp"
#include "faultline/size.hpp"

using namespace faultline;

namespace {

constexpr const char* kUsage =
    "usage: faultline <command> [options]\n"
    "\n"
    "commands:\n"
    "  pack IN.safetensors... -o OUT.apbundle   pack safetensors files into a bundle\n"
    "  inspect B.apbundle [--json]              show models, metadata, tensors, sizes\n"
    "  verify B.apbundle                        check every frame of a bundle\n"
    "  unpack B.apbundle -o DIR [--model NAME]  write models back as safetensors\n"
    "\n"
    "Run 'faultline <command> --help' for a command's options.\n";

constexpr const char* kPackHelp =
    "usage: faultline pack IN.safetensors... -o OUT.apbundle [options]\n"
    "\n"
    "Packs one or more safetensors files (e.g. the shards of one checkpoint)\n"
    "into one model of a new bundle. The bundle appears atomically.\n"
    "\n"
    "options:\n"
    "  -o, --output PATH     the bundle to write (required)\n"
    "  --model NAME          the model's name (default: the first input's file name)\n"
    "  --version V           the model's version string\n"
    "  --codec zstd|raw      frame codec (default zstd)\n"
    "  --level N             zstd level, -7..22 (default 3)\n"
    "  --page-size SIZE      frame size, a power of two from 4K to 64M (default 64K)\n"
    "  --shuffle             group the bytes of each element before compressing\n"
    "  --min-ratio R         store a frame compressed only if it shrinks R times or more,\n"
    "                        verbatim otherwise (faster to load; default 1: any saving)\n"
    "  --threads N           compression threads (default: all cores)\n"
    "  --config FILE         add FILE as the model's config blob (e.g. config.json)\n"
    "  -q, --quiet           no progress bar or summary\n";

constexpr const char* kInspectHelp =
    "usage: faultline inspect B.apbundle [--json]\n"
    "\n"
    "Shows the bundle's models, metadata, signatures, dependencies, blobs and\n"
    "tensors with their sizes and compression ratios.\n"
    "\n"
    "options:\n"
    "  --json    print one JSON document instead of text\n";

constexpr const char* kVerifyHelp =
    "usage: faultline verify B.apbundle\n"
    "\n"
    "Reads and checks every frame (checksum and decompression). On the first\n"
    "bad frame, prints the model, tensor and frame and exits with status 1.\n"
    "\n"
    "options:\n"
    "  -q, --quiet   no progress bar\n";

constexpr const char* kUnpackHelp =
    "usage: faultline unpack B.apbundle -o DIR [--model NAME]\n"
    "\n"
    "Writes each model (or only NAME) as DIR/<model>.safetensors, bit-exact.\n"
    "DIR is created if missing.\n"
    "\n"
    "options:\n"
    "  -o, --output DIR   output directory (required)\n"
    "  --model NAME       only this model\n";

constexpr const char* kLimitsHelp =
    "  --max-size SIZE      refuse a bundle that declares more than SIZE of tensors and\n"
    "                       blobs (default: no limit; FAULTLINE_MAX_SIZE)\n"
    "  --max-expansion N    refuse a bundle that declares more than N times its file\n"
    "                       size (1 GiB is always allowed; default 4096; 0: no limit;\n"
    "                       FAULTLINE_MAX_EXPANSION)\n";

int Usage(const char* msg, const char* help) {
  fprintf(stderr, "faultline: %s\n\n%s", msg, help);
  if (help != kUsage && help != kPackHelp) fputs(kLimitsHelp, stderr);
  return 2;
}

// A command's help and the reader limits it takes.
int Help(const char* help) {
  fputs(help, stdout);
  fputs(kLimitsHelp, stdout);
  return 0;
}

bool IsHelp(const std::string& a) { return a == "-h" || a == "--help"; }

constexpr int kNotCommon = -1, kTaken = -2;

// The options every reading command takes at args[i]: --help (returns 0)
// and the reader's limits (kTaken; a bad or missing value returns 2);
// kNotCommon for anything else.
int TakeCommon(const std::vector<std::string>& args, size_t& i, ReaderOptions* o, const char* help) {
  const std::string& a = args[i];
  if (IsHelp(a)) return Help(help);
  if (a != "--max-size" && a != "--max-expansion") return kNotCommon;
  bool ok = i + 1 < args.size();
  const std::string v = ok ? args[++i] : "";
  uint64_t n = 0;
  if (ok && a == "--max-size") {
    ok = ParseSize(v, &n);
    o->max_size = n;
  } else if (ok) {
    char* end = nullptr;
    errno = 0;
    n = strtoull(v.c_str(), &end, 10);
    ok = !v.empty() && v[0] >= '0' && v[0] <= '9' && *end == '\0' && errno == 0;
    o->max_expansion = n;
  }
  if (!ok) return Usage((a + " needs a size (--max-size) or an integer (--max-expansion)").c_str(), help);
  return kTaken;
}

// A string from a bundle, safe for a terminal: control characters (C0,
// DEL, C1) as \xNN, so that a manifest cannot move the cursor, clear the
// screen or set the window title, and an embedded NUL hides nothing.
std::string Shown(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); i++) {
    auto c = static_cast<unsigned char>(in[i]);
    bool c1 = c == 0xc2 && i + 1 < in.size() && static_cast<unsigned char>(in[i + 1]) >= 0x80 &&
              static_cast<unsigned char>(in[i + 1]) <= 0x9f;
    if (c < 0x20 || c == 0x7f || c1) {
      if (c1) c = static_cast<unsigned char>(in[++i]);
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}
#define SHOWN(s) Shown(s).c_str()

int Error(const Status& s) {
  fprintf(stderr, "faultline: error: %s\n", s.ToString().c_str());
  return 1;
}


// A progress bar on stderr when it is a terminal.
class Progress {
 public:
  explicit Progress(const char* label, bool quiet)
      : label_(label), enabled_(!quiet && isatty(2)), start_(Clock::now()) {}
  ~Progress() { Finish(); }
  void Update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    auto now = Clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    int width = 30, filled = static_cast<int>(frac * width);
    double secs = std::chrono::duration<double>(now - start_).count();
    double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
    fprintf(stderr, "\r%s [%.*s%*s] %3d%% %s/s   ", label_, filled,
            "##############################", width - filled, "", static_cast<int>(frac * 100),
            FormatSize(static_cast<uint64_t>(rate)).c_str());
    shown_ = true;
  }
  void Finish() {
    if (shown_) fprintf(stderr, "\n");
    shown_ = false;
  }

 private:
  using Clock = std::chrono::steady_clock;
  const char* label_;
  bool enabled_;
  bool shown_ = false;
  Clock::time_point start_, last_{};
};

// Takes the value of option `name` at args[i+1].
bool TakeValue(const std::vector<std::string>& args, size_t& i, std::string* out) {
  if (i + 1 >= args.size()) return false;
  *out = args[++i];
  return true;
}

std::string DefaultModelName(const std::string& path) {
  std::string base = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
  auto dot = base.find('.');
  if (dot != std::string::npos && dot > 0) base = base.substr(0, dot);
  if (base.empty() || base[0] == '.') base = "model";
  return base;
}

// A --config file: a regular file of at most 256 MiB (a directory or a
// device such as /dev/zero is refused, not read until memory runs out).
Result<std::string> ReadConfigFile(const std::string& path) {
  constexpr uint64_t kMaxConfig = 256ull << 20;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) return Status::Error(errno, "cannot open --config '%s'", path.c_str());
  struct stat st;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    fclose(f);
    return Status::Error(S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "--config '%s' is not a regular file",
                         path.c_str());
  }
  if (static_cast<uint64_t>(st.st_size) > kMaxConfig) {
    fclose(f);
    return Status::Error(EFBIG, "--config '%s' is %s; a config blob is at most 256 MiB", path.c_str(),
                         FormatSize(st.st_size).c_str());
  }
  std::string bytes;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0 && bytes.size() <= kMaxConfig) bytes.append(buf, n);
  bool bad = ferror(f);
  fclose(f);
  if (bad) return Status::Error(EIO, "cannot read --config '%s'", path.c_str());
  if (bytes.size() > kMaxConfig) return Status::Error(EFBIG, "--config '%s' grew past 256 MiB", path.c_str());
  return bytes;
}

int Pack(const std::vector<std::string>& args) {
  std::vector<std::string> inputs;
  std::string output, model, version, config, value;
  TensorOptions topts;
  BuildOptions bopts;
  bool quiet = false;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (IsHelp(a)) {
      fputs(kPackHelp, stdout);
      return 0;
    } else if (a == "-o" || a == "--output") {
      if (!TakeValue(args, i, &output)) return Usage("-o needs a path", kPackHelp);
    } else if (a == "--model") {
      if (!TakeValue(args, i, &model)) return Usage("--model needs a name", kPackHelp);
    } else if (a == "--version") {
      if (!TakeValue(args, i, &version)) return Usage("--version needs a value", kPackHelp);
    } else if (a == "--config") {
      if (!TakeValue(args, i, &config)) return Usage("--config needs a file", kPackHelp);
    } else if (a == "--codec") {
      if (!TakeValue(args, i, &value) || !ParseCodec(value, &topts.codec))
        return Usage("--codec must be zstd or raw", kPackHelp);
    } else if (a == "--level") {
      char* end = nullptr;
      if (!TakeValue(args, i, &value)) return Usage("--level needs a number", kPackHelp);
      long v = strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || v < -7 || v > 22)
        return Usage("--level must be an integer from -7 to 22", kPackHelp);
      topts.level = static_cast<int>(v);
    } else if (a == "--page-size") {
      uint64_t v = 0;
      if (!TakeValue(args, i, &value) || !ParseSize(value, &v) || v < kMinPageSize ||
          v > kMaxPageSize || (v & (v - 1)) != 0)
        return Usage("--page-size must be a power of two from 4K to 64M", kPackHelp);
      topts.page_size = static_cast<uint32_t>(v);
    } else if (a == "--shuffle") {
      topts.shuffle = true;
    } else if (a == "--min-ratio") {
      char* end = nullptr;
      if (!TakeValue(args, i, &value)) return Usage("--min-ratio needs a number", kPackHelp);
      double v = strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(v >= 1.0 && v <= 1e9))
        return Usage("--min-ratio must be a number of at least 1 (such as 1.1)", kPackHelp);
      topts.min_ratio = v;
    } else if (a == "--threads") {
      char* end = nullptr;
      if (!TakeValue(args, i, &value)) return Usage("--threads needs a number", kPackHelp);
      long v = strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || v < 1 || v > 1024)
        return Usage("--threads must be an integer from 1 to 1024", kPackHelp);
      bopts.threads = static_cast<unsigned>(v);
    } else if (a == "-q" || a == "--quiet") {
      quiet = true;
    } else if (!a.empty() && a[0] == '-') {
      return Usage(("unknown option " + a).c_str(), kPackHelp);
    } else {
      inputs.push_back(a);
    }
  }
  if (inputs.empty()) return Usage("no input files", kPackHelp);
  if (output.empty()) return Usage("-o OUT.apbundle is required", kPackHelp);
  if (model.empty()) model = DefaultModelName(inputs[0]);
  struct stat out_st;
  if (stat(output.c_str(), &out_st) == 0) {
    for (const std::string& in : inputs) {
      struct stat in_st;
      if (stat(in.c_str(), &in_st) == 0 && in_st.st_dev == out_st.st_dev && in_st.st_ino == out_st.st_ino)
        return Usage(("the output " + output + " is the input " + in + ": it would be replaced").c_str(), kPackHelp);
    }
    if (!config.empty()) {
      struct stat c_st;
      if (stat(config.c_str(), &c_st) == 0 && c_st.st_dev == out_st.st_dev && c_st.st_ino == out_st.st_ino)
        return Usage(("the output " + output + " is the --config file").c_str(), kPackHelp);
    }
  }

  BundleBuilder builder;
  ModelBuilder& m = builder.AddModel(model);
  if (!version.empty()) m.SetVersion(version);
  Status s = ImportSafetensors(inputs, m, topts);
  if (!s.ok()) return Error(s);
  if (!config.empty()) {
    auto bytes = ReadConfigFile(config);
    if (!bytes.ok()) return Error(bytes.status());
    m.AddBlob(DefaultModelName(config) + ".json", BlobKind::kConfig, "application/json", *bytes);
  }
  Progress progress("packing", quiet);
  bopts.progress = [&](uint64_t d, uint64_t t) { progress.Update(d, t); };
  auto r = builder.Build(output, bopts);
  progress.Finish();
  if (!r.ok()) return Error(r.status());
  if (!quiet) {
    const BuildSummary& sum = *r;
    printf("packed %s -> %s\n", model.c_str(), output.c_str());
    printf("  tensors:      %s in %llu frames (%llu stored after dedup)\n",
           FormatSize(sum.logical_bytes).c_str(), static_cast<unsigned long long>(sum.frames),
           static_cast<unsigned long long>(sum.unique_frames));
    printf("  bundle:       %s (ratio %.3fx)\n", FormatSize(sum.file_size).c_str(),
           sum.file_size ? static_cast<double>(sum.logical_bytes) / static_cast<double>(sum.file_size) : 0.0);
    printf("  dedup saved:  %s\n", FormatSize(sum.dedup_saved_bytes).c_str());
    printf("  time:         %.2f s (%s/s)\n", sum.seconds,
           FormatSize(static_cast<uint64_t>(static_cast<double>(sum.logical_bytes) / std::max(sum.seconds, 1e-9))).c_str());
  }
  return 0;
}

std::string ShapeString(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string SigDimString(const SigDim& d) {
  if (d.size >= 0) return std::to_string(d.size);
  return d.name.empty() ? "?" : d.name;
}

double Ratio(uint64_t logical, uint64_t stored) {
  return stored ? static_cast<double>(logical) / static_cast<double>(stored) : 1.0;
}

nlohmann::json SigJson(const std::vector<TensorSignature>& v) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& t : v) {
    nlohmann::json shape = nlohmann::json::array();
    for (const auto& d : t.shape) {
      if (d.size >= 0) shape.push_back(d.size);
      else if (!d.name.empty()) shape.push_back(d.name);
      else shape.push_back(-1);
    }
    a.push_back({{"name", t.name}, {"dtype", DTypeName(t.dtype)}, {"shape", shape}});
  }
  return a;
}

int Inspect(const std::vector<std::string>& args) {
  std::string path;
  bool as_json = false;
  ReaderOptions ro;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (int c = TakeCommon(args, i, &ro, kInspectHelp); c != kNotCommon) {
      if (c != kTaken) return c;
    } else if (a == "--json") {
      as_json = true;
    } else if (!a.empty() && a[0] == '-') {
      return Usage(("unknown option " + a).c_str(), kInspectHelp);
    } else if (path.empty()) {
      path = a;
    } else {
      return Usage("inspect takes one bundle", kInspectHelp);
    }
  }
  if (path.empty()) return Usage("no bundle given", kInspectHelp);
  auto r = BundleReader::Open(path, ro);
  if (!r.ok()) return Error(r.status());
  const BundleInfo& info = (*r)->info();
  if (as_json) {
    using nlohmann::json;
    json models = json::array();
    for (const auto& m : info.models) {
      json tensors = json::array(), blobs = json::array(), deps = json::array();
      for (const auto& t : m.tensors)
        tensors.push_back({{"name", t.name}, {"dtype", DTypeName(t.dtype)}, {"shape", t.shape},
                           {"size", t.size}, {"stored_size", t.stored_size},
                           {"ratio", Ratio(t.size, t.stored_size)}, {"codec", CodecName(t.codec)},
                           {"level", t.level}, {"shuffle", t.shuffle}, {"page_size", t.page_size},
                           {"frames", t.frame_count}});
      for (const auto& b : m.blobs)
        blobs.push_back({{"name", b.name}, {"kind", BlobKindName(b.kind)},
                         {"media_type", b.media_type}, {"size", b.data.size},
                         {"stored_size", b.data.stored_size}});
      for (const auto& d : m.dependencies) deps.push_back({{"name", d.name}, {"version", d.version}});
      models.push_back({{"name", m.name},
                        {"version", m.version},
                        {"metadata",
                         {{"author", m.metadata.author}, {"license", m.metadata.license},
                          {"description", m.metadata.description},
                          {"metrics", m.metadata.metrics}, {"extra", m.metadata.extra}}},
                        {"signature", {{"inputs", SigJson(m.signature.inputs)},
                                       {"outputs", SigJson(m.signature.outputs)}}},
                        {"dependencies", deps}, {"blobs", blobs}, {"tensors", tensors}});
    }
    json doc = {{"path", path}, {"format_version", info.format_version},
                {"producer", info.producer}, {"created", info.created},
                {"file_size", info.file_size}, {"logical_bytes", info.logical_bytes},
                {"stored_bytes", info.stored_bytes}, {"frame_refs", info.frame_refs},
                {"unique_frames", info.unique_frames},
                {"ratio", Ratio(info.logical_bytes, info.file_size)}, {"models", models}};
    printf("%s\n", doc.dump(2, ' ', false, json::error_handler_t::replace).c_str());
    return 0;
  }
  printf("%s: apbundle v%u, %zu model(s), produced by %s at %s\n", SHOWN(path),
         info.format_version, info.models.size(), SHOWN(info.producer), SHOWN(info.created));
  printf("  %s of data in %s (ratio %.3fx); %llu frames, %llu stored (dedup)\n",
         FormatSize(info.logical_bytes).c_str(), FormatSize(info.file_size).c_str(),
         Ratio(info.logical_bytes, info.file_size), static_cast<unsigned long long>(info.frame_refs),
         static_cast<unsigned long long>(info.unique_frames));
  for (const auto& m : info.models) {
    uint64_t logical = 0, stored = 0;
    for (const auto& t : m.tensors) {
      logical += t.size;
      stored += t.stored_size;
    }
    printf("\nmodel %s%s%s: %zu tensors, %s (stored %s, %.3fx)\n", SHOWN(m.name),
           m.version.empty() ? "" : " version ", SHOWN(m.version), m.tensors.size(),
           FormatSize(logical).c_str(), FormatSize(stored).c_str(), Ratio(logical, stored));
    if (!m.metadata.author.empty()) printf("  author:  %s\n", SHOWN(m.metadata.author));
    if (!m.metadata.license.empty()) printf("  license: %s\n", SHOWN(m.metadata.license));
    if (!m.metadata.description.empty()) printf("  description: %s\n", SHOWN(m.metadata.description));
    for (const auto& [k, v] : m.metadata.metrics) printf("  metric %s = %g\n", SHOWN(k), v);
    for (const auto& [k, v] : m.metadata.extra) printf("  %s = %s\n", SHOWN(k), SHOWN(v));
    for (const auto* side : {&m.signature.inputs, &m.signature.outputs}) {
      for (const auto& t : *side) {
        std::string shape;
        for (size_t i = 0; i < t.shape.size(); i++) shape += (i ? "," : "") + SigDimString(t.shape[i]);
        printf("  %s %s: %s[%s]\n", side == &m.signature.inputs ? "input " : "output",
               SHOWN(t.name), DTypeName(t.dtype), SHOWN(shape));
      }
    }
    for (const auto& d : m.dependencies) printf("  depends on %s %s\n", SHOWN(d.name), SHOWN(d.version));
    for (const auto& b : m.blobs)
      printf("  blob %s (%s, %s): %s\n", SHOWN(b.name), BlobKindName(b.kind), SHOWN(b.media_type),
             FormatSize(b.data.size).c_str());
    printf("  %-40s %-7s %-18s %12s %12s %7s %s\n", "tensor", "dtype", "shape", "size", "stored",
           "ratio", "codec/page");
    for (const auto& t : m.tensors)
      printf("  %-40s %-7s %-18s %12s %12s %6.3fx %s%s/%s\n", SHOWN(t.name), DTypeName(t.dtype),
             ShapeString(t.shape).c_str(), FormatSize(t.size).c_str(),
             FormatSize(t.stored_size).c_str(), Ratio(t.size, t.stored_size), CodecName(t.codec),
             t.shuffle ? "+shuffle" : "", FormatSize(t.page_size).c_str());
  }
  return 0;
}

int Verify(const std::vector<std::string>& args) {
  std::string path;
  bool quiet = false;
  ReaderOptions ro;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (int c = TakeCommon(args, i, &ro, kVerifyHelp); c != kNotCommon) {
      if (c != kTaken) return c;
    } else if (a == "-q" || a == "--quiet") {
      quiet = true;
    } else if (!a.empty() && a[0] == '-') {
      return Usage(("unknown option " + a).c_str(), kVerifyHelp);
    } else if (path.empty()) {
      path = a;
    } else {
      return Usage("verify takes one bundle", kVerifyHelp);
    }
  }
  if (path.empty()) return Usage("no bundle given", kVerifyHelp);
  auto t0 = std::chrono::steady_clock::now();
  auto r = BundleReader::Open(path, ro);
  if (!r.ok()) return Error(r.status());
  Progress progress("verifying", quiet);
  Status s = (*r)->Verify([&](uint64_t d, uint64_t t) { progress.Update(d, t); });
  progress.Finish();
  if (!s.ok()) {
    fprintf(stderr, "faultline: verify failed: %s: %s\n", path.c_str(), s.ToString().c_str());
    return 1;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const BundleInfo& info = (*r)->info();
  printf("%s: OK, %llu frames of %zu model(s) verified, %s in %.2f s\n", path.c_str(),
         static_cast<unsigned long long>(info.frame_refs), info.models.size(),
         FormatSize(info.logical_bytes).c_str(), secs);
  return 0;
}

int Unpack(const std::vector<std::string>& args) {
  std::string path, dir, model;
  ReaderOptions ro;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (int c = TakeCommon(args, i, &ro, kUnpackHelp); c != kNotCommon) {
      if (c != kTaken) return c;
    } else if (a == "-o" || a == "--output") {
      if (!TakeValue(args, i, &dir)) return Usage("-o needs a directory", kUnpackHelp);
    } else if (a == "--model") {
      if (!TakeValue(args, i, &model)) return Usage("--model needs a name", kUnpackHelp);
    } else if (!a.empty() && a[0] == '-') {
      return Usage(("unknown option " + a).c_str(), kUnpackHelp);
    } else if (path.empty()) {
      path = a;
    } else {
      return Usage("unpack takes one bundle", kUnpackHelp);
    }
  }
  if (path.empty()) return Usage("no bundle given", kUnpackHelp);
  if (dir.empty()) return Usage("-o DIR is required", kUnpackHelp);
  auto r = BundleReader::Open(path, ro);
  if (!r.ok()) return Error(r.status());
  const BundleInfo& info = (*r)->info();
  if (!model.empty() && !info.FindModel(model))
    return Error(Status::Error(ENOENT, "%s has no model '%s'", path.c_str(), SHOWN(model)));
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    int err = errno;
    struct stat st;
    std::string parent = dir.find('/') == std::string::npos ? "." : dir.substr(0, dir.rfind('/'));
    if (parent.empty()) parent = "/";
    if (err == ENOENT && stat(parent.c_str(), &st) == 0)  // procfs and the like say ENOENT
      return Error(Status::Error(err, "cannot create directory '%s' (its parent '%s' exists but takes no new "
                                 "directory)", dir.c_str(), parent.c_str()));
    return Error(Status::Error(err, "cannot create directory '%s'", dir.c_str()));
  }
  // Room first: a bundle's tensors can be far larger than the bundle.
  uint64_t need = 0;
  for (const auto& m : info.models)
    if (model.empty() || m.name == model)
      for (const auto& t : m.tensors) need += t.size;
  struct statvfs fs;
  if (statvfs(dir.c_str(), &fs) == 0 && static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize < need)
    return Error(Status::Error(ENOSPC, "unpacking %s needs %s in '%s', which has %s free", path.c_str(),
                               FormatSize(need).c_str(), dir.c_str(),
                               FormatSize(static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize).c_str()));
  for (const auto& m : info.models) {
    if (!model.empty() && m.name != model) continue;
    // Model names were checked on open: one path component, no leading '.'.
    std::string out = dir + "/" + m.name + ".safetensors";
    Status s = ExportSafetensors(**r, m, out);
    if (!s.ok()) return Error(s.WithPrefix("%s", path.c_str()));
    printf("%s\n", SHOWN(out));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    fputs(kUsage, stderr);
    return 2;
  }
  std::string cmd = args[0];
  args.erase(args.begin());
  try {
    if (cmd == "pack") return Pack(args);
    if (cmd == "inspect") return Inspect(args);
    if (cmd == "verify") return Verify(args);
    if (cmd == "unpack") return Unpack(args);
    if (IsHelp(cmd) || cmd == "help") {
      fputs(kUsage, stdout);
      return 0;
    }
    if (cmd == "--version") {
      printf("faultline %s\n", Version());
      return 0;
    }
  } catch (const std::exception& e) {
    fprintf(stderr, "faultline: error: %s\n", e.what());
    return 1;
  }
  fprintf(stderr, "faultline: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
  return 2;
}
