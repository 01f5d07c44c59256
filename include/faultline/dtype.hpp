// Element types a bundle tensor can hold, with their names and sizes.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace faultline {

enum class DType : uint8_t {
  kF64, kF32, kF16, kBF16, kF8E4M3, kF8E5M2,
  kI64, kI32, kI16, kI8,
  kU64, kU32, kU16, kU8,
  kBool,
};

inline constexpr int kDTypeCount = static_cast<int>(DType::kBool) + 1;

// Bytes per element (1, 2, 4 or 8).
size_t DTypeSize(DType t) noexcept;
// The manifest name: "f64", "f32", "f16", "bf16", "f8_e4m3", "f8_e5m2",
// "i64" ... "u8", "bool".
const char* DTypeName(DType t) noexcept;
// The inverse of DTypeName; nullopt for an unknown name.
std::optional<DType> ParseDType(std::string_view name) noexcept;
// The safetensors name ("F32", "BF16", "F8_E4M3", "BOOL", ...) and its inverse.
const char* DTypeSafetensorsName(DType t) noexcept;
std::optional<DType> ParseSafetensorsDType(std::string_view name) noexcept;

}  // namespace faultline
