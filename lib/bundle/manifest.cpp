// Manifest JSON writing and strict parsing; see manifest.h and docs/FORMAT.md.
#include "bundle/manifest.h"

#include <cstring>
#include <set>

#include "bundle/codec.h"
#include "core/json_util.h"
#include "core/status_macros.h"

namespace faultline::internal {

using json = nlohmann::json;
using vt = json::value_t;

namespace {

// The first control character in `name`: C0, DEL, or C1 (U+0080..U+009F,
// UTF-8 0xC2 0x80..0x9F), which terminals act on; nullptr where none.
const char* ControlCharacter(std::string_view name) {
  for (size_t i = 0; i < name.size(); i++) {
    auto c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7f) return "NUL or a control character";
    if (c == 0xc2 && i + 1 < name.size() && static_cast<unsigned char>(name[i + 1]) >= 0x80 &&
        static_cast<unsigned char>(name[i + 1]) <= 0x9f)
      return "a C1 control character";
  }
  return nullptr;
}

}  // namespace

Status CheckModelName(std::string_view name) {
  // unpack writes "<model>.safetensors": a file name (255 bytes at most).
  if (name.empty() || name.size() > kMaxModelName)
    return Status::Error(EINVAL, "model name must be 1-%zu bytes (unpack writes it as <name>.safetensors)",
                         kMaxModelName);
  if (name[0] == '.') return Status::Error(EINVAL, "model name '%.*s' starts with '.'",
                                           static_cast<int>(std::min<size_t>(name.size(), 64)), name.data());
  for (char c : name) {
    if (c == '/' || c == '\\')
      return Status::Error(EINVAL, "model name '%.*s' contains a path separator",
                           static_cast<int>(std::min<size_t>(name.size(), 64)), name.data());
  }
  if (const char* what = ControlCharacter(name)) return Status::Error(EINVAL, "model name contains %s", what);
  return Status::Ok();
}

Status CheckObjectName(std::string_view name, const char* what) {
  if (name.empty() || name.size() > 4096)
    return Status::Error(EINVAL, "%s name must be 1-4096 bytes", what);
  if (const char* c = ControlCharacter(name)) return Status::Error(EINVAL, "%s name contains %s", what, c);
  // safetensors keeps its metadata under this key: a tensor of that name
  // cannot be written back (unpack) or read by any safetensors reader.
  if (name == "__metadata__" && !strcmp(what, "tensor"))
    return Status::Error(EINVAL, "tensor name '__metadata__' is reserved by safetensors for its metadata");
  return Status::Ok();
}

Status ShapeBytes(DType dtype, const std::vector<uint64_t>& shape, uint64_t* bytes) {
  uint64_t n = DTypeSize(dtype);
  bool zero = false;
  for (uint64_t d : shape) zero |= d == 0;
  for (uint64_t d : shape) {
    // A zero dimension makes the tensor empty, whatever the others say.
    if (!zero && (__builtin_mul_overflow(n, d, &n) || n > (1ull << 62)))
      return Status::Error(EOVERFLOW, "shape is absurdly large");
  }
  *bytes = zero ? 0 : n;
  return Status::Ok();
}

Status CheckPageSize(uint64_t p) {
  if (p < kMinPageSize || p > kMaxPageSize || (p & (p - 1)) != 0)
    return Status::Error(EINVAL, "page size %llu is not a power of two in [4 KiB, 64 MiB]",
                         static_cast<unsigned long long>(p));
  return Status::Ok();
}

// ---- writing ----

namespace {

json SigToJson(const std::vector<TensorSignature>& v) {
  json arr = json::array();
  for (const auto& t : v) {
    json shape = json::array();
    for (const auto& d : t.shape) {
      if (d.size >= 0) shape.push_back(d.size);
      else if (!d.name.empty()) shape.push_back(d.name);
      else shape.push_back(-1);
    }
    arr.push_back({{"name", t.name}, {"dtype", DTypeName(t.dtype)}, {"shape", shape}});
  }
  return arr;
}

json ObjectToJson(const TensorInfo& t) {
  return {{"size", t.size},
          {"codec", CodecName(t.codec)},
          {"level", t.level},
          {"shuffle", t.shuffle},
          {"page_size", t.page_size},
          {"frames", {t.first_frame, t.frame_count}}};
}

}  // namespace

std::string ManifestToJson(const BundleInfo& info) {
  json models = json::array();
  for (const auto& m : info.models) {
    json md = {{"author", m.metadata.author},
               {"license", m.metadata.license},
               {"description", m.metadata.description},
               {"metrics", m.metadata.metrics},
               {"extra", m.metadata.extra}};
    json deps = json::array();
    for (const auto& d : m.dependencies) deps.push_back({{"name", d.name}, {"version", d.version}});
    json blobs = json::array();
    for (const auto& b : m.blobs) {
      json o = ObjectToJson(b.data);
      o["name"] = b.name;
      o["kind"] = BlobKindName(b.kind);
      o["media_type"] = b.media_type;
      blobs.push_back(std::move(o));
    }
    json tensors = json::array();
    for (const auto& t : m.tensors) {
      json o = ObjectToJson(t);
      o["name"] = t.name;
      o["dtype"] = DTypeName(t.dtype);
      o["shape"] = t.shape;
      tensors.push_back(std::move(o));
    }
    models.push_back({{"name", m.name},
                      {"version", m.version},
                      {"metadata", md},
                      {"signature",
                       {{"inputs", SigToJson(m.signature.inputs)},
                        {"outputs", SigToJson(m.signature.outputs)}}},
                      {"dependencies", deps},
                      {"blobs", blobs},
                      {"tensors", tensors}});
  }
  json doc = {{"format_version", info.format_version},
              {"producer", info.producer},
              {"created", info.created},
              {"models", models}};
  return doc.dump(1, ' ', false, json::error_handler_t::replace);
}

// ---- parsing ----

namespace {

Status ParseDTypeField(const json& obj, DType* out, const char* ctx) {
  std::string name;
  FL_RETURN_IF_ERROR(GetString(obj, "dtype", &name, ctx));
  auto d = ParseDType(name);
  if (!d) return Status::Error(EINVAL, "%s: unknown dtype '%.32s'", ctx, name.c_str());
  *out = *d;
  return Status::Ok();
}

Status ParseSig(const json& sig, const char* key, std::vector<TensorSignature>* out,
                const char* ctx) {
  const json* arr;
  FL_RETURN_IF_ERROR(GetMember(sig, key, vt::array, &arr, ctx, true));
  if (!arr) return Status::Ok();
  for (const auto& e : *arr) {
    TensorSignature t;
    FL_RETURN_IF_ERROR(GetString(e, "name", &t.name, ctx));
    FL_RETURN_IF_ERROR(ParseDTypeField(e, &t.dtype, ctx));
    const json* shape;
    FL_RETURN_IF_ERROR(GetMember(e, "shape", vt::array, &shape, ctx));
    for (const auto& d : *shape) {
      SigDim dim;
      if (d.is_string()) dim.name = d.get<std::string>();
      else if (d.is_number_integer() && d.get<int64_t>() >= -1) dim.size = d.get<int64_t>();
      else return Status::Error(EINVAL, "%s: signature '%s' has a dimension that is neither "
                                "an integer >= -1 nor a name", ctx, t.name.c_str());
      t.shape.push_back(std::move(dim));
    }
    out->push_back(std::move(t));
  }
  return Status::Ok();
}

// The fields every stored object has, checked against the frame table.
Status ParseObject(const json& o, const std::vector<FrameRecord>& frames, TensorInfo* t,
                   const char* ctx) {
  FL_RETURN_IF_ERROR(GetU64(o, "size", &t->size, ctx));
  std::string codec;
  FL_RETURN_IF_ERROR(GetString(o, "codec", &codec, ctx));
  if (!ParseCodec(codec, &t->codec))
    return Status::Error(EINVAL, "%s: unknown codec '%.32s'", ctx, codec.c_str());
  int64_t level = 0;
  FL_RETURN_IF_ERROR(GetI64(o, "level", &level, ctx));
  if (level < -131072 || level > 22)
    return Status::Error(EINVAL, "%s: zstd level %lld out of range", ctx, static_cast<long long>(level));
  t->level = static_cast<int>(level);
  FL_RETURN_IF_ERROR(GetBool(o, "shuffle", &t->shuffle, ctx));
  uint64_t page = 0;
  FL_RETURN_IF_ERROR(GetU64(o, "page_size", &page, ctx));
  FL_RETURN_IF_ERROR(CheckPageSize(page).WithPrefix("%s", ctx));
  t->page_size = static_cast<uint32_t>(page);
  const json* fr;
  FL_RETURN_IF_ERROR(GetMember(o, "frames", vt::array, &fr, ctx));
  if (fr->size() != 2 || !(*fr)[0].is_number_unsigned() || !(*fr)[1].is_number_unsigned())
    return Status::Error(EINVAL, "%s: 'frames' must be [first, count]", ctx);
  t->first_frame = (*fr)[0].get<uint64_t>();
  t->frame_count = (*fr)[1].get<uint64_t>();
  uint64_t expected = t->size / page + (t->size % page != 0);  // (size + page - 1 may overflow)
  if (t->frame_count != expected)
    return Status::Error(EINVAL, "%s: %llu frames, but size %llu at page size %llu needs %llu", ctx,
                         static_cast<unsigned long long>(t->frame_count),
                         static_cast<unsigned long long>(t->size),
                         static_cast<unsigned long long>(page),
                         static_cast<unsigned long long>(expected));
  if (t->first_frame > frames.size() || t->frame_count > frames.size() - t->first_frame)
    return Status::Error(EINVAL, "%s: frames [%llu, +%llu) lie outside the frame table (%zu)", ctx,
                         static_cast<unsigned long long>(t->first_frame),
                         static_cast<unsigned long long>(t->frame_count), frames.size());
  t->stored_size = 0;
  for (uint64_t i = 0; i < t->frame_count; i++) {
    const FrameRecord& r = frames[t->first_frame + i];
    uint64_t raw = std::min<uint64_t>(page, t->size - i * page);
    if (r.raw_length != raw)
      return Status::Error(EINVAL, "%s: frame %llu has length %u, expected %llu", ctx,
                           static_cast<unsigned long long>(i), r.raw_length,
                           static_cast<unsigned long long>(raw));
    bool verbatim = t->codec == Codec::kRaw || (r.flags & kFrameStoredRaw);
    if (verbatim ? r.stored_length != raw : r.stored_length > MaxStoredLength(t->codec, raw))
      return Status::Error(EINVAL, "%s: frame %llu has an impossible stored length %u", ctx,
                           static_cast<unsigned long long>(i), r.stored_length);
    t->stored_size += r.stored_length;
  }
  return Status::Ok();
}

}  // namespace

Status ManifestFromJson(std::string_view text, const std::vector<FrameRecord>& frames,
                        BundleInfo* info) {
  FL_ASSIGN_OR_RETURN(json doc, ParseJsonChecked(text, "manifest"));
  const char* ctx = "manifest";
  uint64_t version = 0;
  FL_RETURN_IF_ERROR(GetU64(doc, "format_version", &version, ctx));
  if (version != kBundleFormatVersion)
    return Status::Error(ENOTSUP, "manifest format_version %llu is not %u",
                         static_cast<unsigned long long>(version), kBundleFormatVersion);
  info->format_version = static_cast<uint32_t>(version);
  FL_RETURN_IF_ERROR(GetString(doc, "producer", &info->producer, ctx));
  FL_RETURN_IF_ERROR(GetString(doc, "created", &info->created, ctx));
  const json* models;
  FL_RETURN_IF_ERROR(GetMember(doc, "models", vt::array, &models, ctx));
  std::set<std::string> model_names;
  info->models.clear();
  info->logical_bytes = info->frame_refs = 0;
  char mctx[160];
  for (size_t mi = 0; mi < models->size(); mi++) {
    const json& mj = (*models)[mi];
    ModelInfo m;
    snprintf(mctx, sizeof(mctx), "manifest: model %zu", mi);
    FL_RETURN_IF_ERROR(GetString(mj, "name", &m.name, mctx));
    FL_RETURN_IF_ERROR(CheckModelName(m.name).WithPrefix("%s", mctx));
    if (!model_names.insert(m.name).second)
      return Status::Error(EINVAL, "%s: duplicate model name '%.64s'", mctx, m.name.c_str());
    snprintf(mctx, sizeof(mctx), "manifest: model '%.64s'", m.name.c_str());
    FL_RETURN_IF_ERROR(GetOptionalString(mj, "version", &m.version, mctx));

    const json* md;
    FL_RETURN_IF_ERROR(GetMember(mj, "metadata", vt::object, &md, mctx, true));
    if (md) {
      FL_RETURN_IF_ERROR(GetOptionalString(*md, "author", &m.metadata.author, mctx));
      FL_RETURN_IF_ERROR(GetOptionalString(*md, "license", &m.metadata.license, mctx));
      FL_RETURN_IF_ERROR(GetOptionalString(*md, "description", &m.metadata.description, mctx));
      const json* metrics;
      FL_RETURN_IF_ERROR(GetMember(*md, "metrics", vt::object, &metrics, mctx, true));
      if (metrics)
        for (auto it = metrics->begin(); it != metrics->end(); ++it) {
          if (!it->is_number())
            return Status::Error(EINVAL, "%s: metric '%.64s' is not a number", mctx, it.key().c_str());
          m.metadata.metrics[it.key()] = it->get<double>();
        }
      const json* extra;
      FL_RETURN_IF_ERROR(GetMember(*md, "extra", vt::object, &extra, mctx, true));
      if (extra)
        for (auto it = extra->begin(); it != extra->end(); ++it) {
          if (!it->is_string())
            return Status::Error(EINVAL, "%s: metadata '%.64s' is not a string", mctx, it.key().c_str());
          m.metadata.extra[it.key()] = it->get<std::string>();
        }
    }
    const json* sig;
    FL_RETURN_IF_ERROR(GetMember(mj, "signature", vt::object, &sig, mctx, true));
    if (sig) {
      FL_RETURN_IF_ERROR(ParseSig(*sig, "inputs", &m.signature.inputs, mctx));
      FL_RETURN_IF_ERROR(ParseSig(*sig, "outputs", &m.signature.outputs, mctx));
    }
    const json* deps;
    FL_RETURN_IF_ERROR(GetMember(mj, "dependencies", vt::array, &deps, mctx, true));
    if (deps)
      for (const auto& d : *deps) {
        Dependency dep;
        FL_RETURN_IF_ERROR(GetString(d, "name", &dep.name, mctx));
        FL_RETURN_IF_ERROR(GetOptionalString(d, "version", &dep.version, mctx));
        m.dependencies.push_back(std::move(dep));
      }

    std::set<std::string> names;
    char octx[256];
    const json* blobs;
    FL_RETURN_IF_ERROR(GetMember(mj, "blobs", vt::array, &blobs, mctx, true));
    if (blobs)
      for (size_t bi = 0; bi < blobs->size(); bi++) {
        const json& bj = (*blobs)[bi];
        BlobInfo b;
        snprintf(octx, sizeof(octx), "%s: blob %zu", mctx, bi);
        FL_RETURN_IF_ERROR(GetString(bj, "name", &b.name, octx));
        FL_RETURN_IF_ERROR(CheckObjectName(b.name, "blob").WithPrefix("%s", octx));
        if (!names.insert("blob:" + b.name).second)
          return Status::Error(EINVAL, "%s: duplicate blob name", octx);
        snprintf(octx, sizeof(octx), "%s: blob '%.64s'", mctx, b.name.c_str());
        std::string kind;
        FL_RETURN_IF_ERROR(GetString(bj, "kind", &kind, octx));
        if (!ParseBlobKind(kind, &b.kind))
          return Status::Error(EINVAL, "%s: unknown blob kind '%.32s'", octx, kind.c_str());
        FL_RETURN_IF_ERROR(GetOptionalString(bj, "media_type", &b.media_type, octx));
        b.data.name = b.name;
        b.data.dtype = DType::kU8;
        FL_RETURN_IF_ERROR(ParseObject(bj, frames, &b.data, octx));
        b.data.shape = {b.data.size};
        if (__builtin_add_overflow(info->logical_bytes, b.data.size, &info->logical_bytes))
          return Status::Error(EOVERFLOW, "%s: the bundle declares more than 2^64 bytes", octx);
        info->frame_refs += b.data.frame_count;
        m.blobs.push_back(std::move(b));
      }

    const json* tensors;
    FL_RETURN_IF_ERROR(GetMember(mj, "tensors", vt::array, &tensors, mctx));
    for (size_t ti = 0; ti < tensors->size(); ti++) {
      const json& tj = (*tensors)[ti];
      TensorInfo t;
      snprintf(octx, sizeof(octx), "%s: tensor %zu", mctx, ti);
      FL_RETURN_IF_ERROR(GetString(tj, "name", &t.name, octx));
      FL_RETURN_IF_ERROR(CheckObjectName(t.name, "tensor").WithPrefix("%s", octx));
      if (!names.insert("tensor:" + t.name).second)
        return Status::Error(EINVAL, "%s: duplicate tensor name '%.64s'", octx, t.name.c_str());
      snprintf(octx, sizeof(octx), "%s: tensor '%.64s'", mctx, t.name.c_str());
      FL_RETURN_IF_ERROR(ParseDTypeField(tj, &t.dtype, octx));
      const json* shape;
      FL_RETURN_IF_ERROR(GetMember(tj, "shape", vt::array, &shape, octx));
      if (shape->size() > 32) return Status::Error(EINVAL, "%s: more than 32 dimensions", octx);
      for (const auto& d : *shape) {
        if (!d.is_number_unsigned())
          return Status::Error(EINVAL, "%s: shape must hold non-negative integers", octx);
        t.shape.push_back(d.get<uint64_t>());
      }
      FL_RETURN_IF_ERROR(ParseObject(tj, frames, &t, octx));
      uint64_t bytes = 0;
      FL_RETURN_IF_ERROR(ShapeBytes(t.dtype, t.shape, &bytes).WithPrefix("%s", octx));
      if (bytes != t.size)
        return Status::Error(EINVAL, "%s: size %llu disagrees with dtype %s and shape (%llu bytes)",
                             octx, static_cast<unsigned long long>(t.size), DTypeName(t.dtype),
                             static_cast<unsigned long long>(bytes));
      if (t.codec == Codec::kRaw && t.shuffle)
        return Status::Error(EINVAL, "%s: shuffle is only valid with the zstd codec", octx);
      if (__builtin_add_overflow(info->logical_bytes, t.size, &info->logical_bytes))
        return Status::Error(EOVERFLOW, "%s: the bundle declares more than 2^64 bytes", octx);
      info->frame_refs += t.frame_count;
      m.tensors.push_back(std::move(t));
    }
    info->models.push_back(std::move(m));
  }
  return Status::Ok();
}

}  // namespace faultline::internal
