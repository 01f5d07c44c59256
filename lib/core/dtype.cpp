// DType names and sizes, one table for the manifest and safetensors names.
#include "faultline/dtype.hpp"

namespace faultline {
namespace {

struct DTypeRow {
  DType type;
  size_t size;
  const char* name;
  const char* st_name;
};

constexpr DTypeRow kRows[kDTypeCount] = {
    {DType::kF64, 8, "f64", "F64"},         {DType::kF32, 4, "f32", "F32"},
    {DType::kF16, 2, "f16", "F16"},         {DType::kBF16, 2, "bf16", "BF16"},
    {DType::kF8E4M3, 1, "f8_e4m3", "F8_E4M3"}, {DType::kF8E5M2, 1, "f8_e5m2", "F8_E5M2"},
    {DType::kI64, 8, "i64", "I64"},         {DType::kI32, 4, "i32", "I32"},
    {DType::kI16, 2, "i16", "I16"},         {DType::kI8, 1, "i8", "I8"},
    {DType::kU64, 8, "u64", "U64"},         {DType::kU32, 4, "u32", "U32"},
    {DType::kU16, 2, "u16", "U16"},         {DType::kU8, 1, "u8", "U8"},
    {DType::kBool, 1, "bool", "BOOL"},
};

const DTypeRow& Row(DType t) noexcept {
  unsigned i = static_cast<unsigned>(t);
  return kRows[i < kDTypeCount ? i : static_cast<unsigned>(DType::kU8)];
}

}  // namespace

size_t DTypeSize(DType t) noexcept { return Row(t).size; }
const char* DTypeName(DType t) noexcept { return Row(t).name; }
const char* DTypeSafetensorsName(DType t) noexcept { return Row(t).st_name; }

std::optional<DType> ParseDType(std::string_view name) noexcept {
  for (const auto& r : kRows)
    if (name == r.name) return r.type;
  return std::nullopt;
}

std::optional<DType> ParseSafetensorsDType(std::string_view name) noexcept {
  for (const auto& r : kRows)
    if (name == r.st_name) return r.type;
  return std::nullopt;
}

}  // namespace faultline
