// safetensors: header parsing (every size checked against the file), import
// by mapping the files and streaming their tensors into a ModelBuilder, and
// export in the reference implementation's layout.
#include "faultline/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <set>

#include "bundle/format.h"
#include "bundle/manifest.h"
#include "bundle/reader_impl.h"
#include "core/json_util.h"
#include "core/status_macros.h"
#include "io/file.h"

namespace faultline {

using namespace internal;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderSize = 100ull << 20;  // the reference implementation's limit

struct Mapping {
  void* addr = MAP_FAILED;
  size_t len = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) munmap(addr, len);
  }
};

}  // namespace

Result<SafetensorsHeader> ParseSafetensorsHeader(std::span<const std::byte> bytes,
                                                 uint64_t file_size) {
  if (file_size < 8 || bytes.size() < 8)
    return Status::Error(EINVAL, "truncated: smaller than the 8-byte header length");
  uint64_t n = LoadLE64(bytes.data());
  if (n > kMaxHeaderSize)
    return Status::Error(EINVAL, "header length %llu exceeds the 100 MiB limit",
                         static_cast<unsigned long long>(n));
  if (n > file_size - 8)
    return Status::Error(EINVAL, "truncated: header length %llu but the file has %llu bytes",
                         static_cast<unsigned long long>(n), static_cast<unsigned long long>(file_size));
  if (bytes.size() < 8 + n) return Status::Error(EINVAL, "header not fully provided");
  std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  FL_ASSIGN_OR_RETURN(json doc, ParseJsonChecked(text, "safetensors header"));
  if (!doc.is_object()) return Status::Error(EINVAL, "safetensors header is not a JSON object");
  SafetensorsHeader h;
  h.data_offset = 8 + n;
  const uint64_t data_size = file_size - h.data_offset;
  char ctx[128];
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return Status::Error(EINVAL, "__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          return Status::Error(EINVAL, "__metadata__ value '%.64s' is not a string", m.key().c_str());
        h.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    SafetensorsTensor t;
    t.name = it.key();
    snprintf(ctx, sizeof(ctx), "tensor '%.64s'", t.name.c_str());
    FL_RETURN_IF_ERROR(CheckObjectName(t.name, "tensor"));
    std::string dtype;
    FL_RETURN_IF_ERROR(GetString(*it, "dtype", &dtype, ctx));
    auto d = ParseSafetensorsDType(dtype);
    if (!d) return Status::Error(EINVAL, "%s: unknown dtype '%.32s'", ctx, dtype.c_str());
    t.dtype = *d;
    const json* shape;
    FL_RETURN_IF_ERROR(GetMember(*it, "shape", json::value_t::array, &shape, ctx));
    if (shape->size() > 32) return Status::Error(EINVAL, "%s: more than 32 dimensions", ctx);
    for (const auto& dim : *shape) {
      if (!dim.is_number_unsigned())
        return Status::Error(EINVAL, "%s: shape must hold non-negative integers", ctx);
      t.shape.push_back(dim.get<uint64_t>());
    }
    const json* offs;
    FL_RETURN_IF_ERROR(GetMember(*it, "data_offsets", json::value_t::array, &offs, ctx));
    if (offs->size() != 2 || !(*offs)[0].is_number_unsigned() || !(*offs)[1].is_number_unsigned())
      return Status::Error(EINVAL, "%s: data_offsets must be [begin, end]", ctx);
    t.begin = (*offs)[0].get<uint64_t>();
    t.end = (*offs)[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size)
      return Status::Error(EINVAL, "%s: data_offsets [%llu, %llu] lie outside the %llu-byte data",
                           ctx, static_cast<unsigned long long>(t.begin),
                           static_cast<unsigned long long>(t.end),
                           static_cast<unsigned long long>(data_size));
    uint64_t bytes = 0;
    FL_RETURN_IF_ERROR(ShapeBytes(t.dtype, t.shape, &bytes).WithPrefix("%s", ctx));
    if (bytes != t.end - t.begin)
      return Status::Error(EINVAL, "%s: %llu bytes of data, but dtype %s and its shape need %llu",
                           ctx, static_cast<unsigned long long>(t.end - t.begin), dtype.c_str(),
                           static_cast<unsigned long long>(bytes));
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < h.tensors.size(); i++)
    if (h.tensors[i].begin < h.tensors[i - 1].end)
      return Status::Error(EINVAL, "tensors '%.64s' and '%.64s' overlap",
                           h.tensors[i - 1].name.c_str(), h.tensors[i].name.c_str());
  return h;
}

Status ImportSafetensors(const std::vector<std::string>& paths, ModelBuilder& model,
                         const TensorOptions& options) {
  std::set<std::string> seen;
  for (const auto& path : paths) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::Error(errno, "cannot open '%s'", path.c_str());
    UniqueFd owned(fd);
    FL_ASSIGN_OR_RETURN(uint64_t size, FileSize(fd));
    if (size < 8) return Status::Error(EINVAL, "%s: truncated: smaller than the 8-byte header length", path.c_str());
    auto map = std::make_shared<Mapping>();
    map->addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map->addr == MAP_FAILED) return Status::Error(errno, "cannot map '%s'", path.c_str());
    map->len = size;
    madvise(map->addr, size, MADV_SEQUENTIAL);
    const auto* base = static_cast<const std::byte*>(map->addr);
    auto parsed = ParseSafetensorsHeader({base, size}, size);
    if (!parsed.ok()) return parsed.status().WithPrefix("%s", path.c_str());
    for (auto& t : parsed->tensors) {
      if (!seen.insert(t.name).second)
        return Status::Error(EEXIST, "%s: tensor '%.64s' also appears in an earlier file",
                             path.c_str(), t.name.c_str());
      model.AddTensor(t.name, t.dtype, t.shape, {base + parsed->data_offset + t.begin, t.end - t.begin},
                      options, map);
    }
    for (auto& [k, v] : parsed->metadata) model.SetMetadataValue(k, v);
  }
  return Status::Ok();
}

Status ExportSafetensors(const BundleReader& reader, const ModelInfo& model,
                         const std::string& path) {
  // Header: "__metadata__" first, then the tensors in bundle order, which
  // is their data order.
  std::string header = "{";
  bool first = true;
  if (!model.metadata.extra.empty()) {
    header += "\"__metadata__\":" + json(model.metadata.extra).dump(-1, ' ', false, json::error_handler_t::replace);
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& t : model.tensors) {
    if (!first) header += ",";
    first = false;
    json shape = t.shape;
    header += json(t.name).dump(-1, ' ', false, json::error_handler_t::replace) +
              ":{\"dtype\":\"" + DTypeSafetensorsName(t.dtype) + "\",\"shape\":" + shape.dump() +
              ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.size) +
              "]}";
    offset += t.size;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  FL_ASSIGN_OR_RETURN(AtomicFile file, AtomicFile::Create(path));
  std::byte len[8];
  StoreLE64(len, header.size());
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), len, 8, 0, path.c_str()));
  FL_RETURN_IF_ERROR(PwriteFull(file.fd(), header.data(), header.size(), 8, path.c_str()));
  uint64_t pos = 8 + header.size();
  std::vector<std::byte> buf;
  const auto& impl = reader.impl();
  char label[96];
  for (const auto& t : model.tensors) {
    snprintf(label, sizeof(label), "tensor '%.64s'", t.name.c_str());
    // Pieces of about 64 MiB bound memory whatever the tensor's size.
    uint64_t per = std::max<uint64_t>(1, (64ull << 20) / t.page_size);
    for (uint64_t f = 0; f < t.frame_count; f += per) {
      uint64_t n = std::min(per, t.frame_count - f);
      uint64_t bytes = std::min<uint64_t>(n * t.page_size, t.size - f * t.page_size);
      buf.resize(bytes);
      FL_RETURN_IF_ERROR(impl.DecodeAll(t, buf.data(), label, f, n));
      FL_RETURN_IF_ERROR(PwriteFull(file.fd(), buf.data(), bytes, pos, path.c_str()));
      pos += bytes;
    }
  }
  return file.Commit();
}

}  // namespace faultline
