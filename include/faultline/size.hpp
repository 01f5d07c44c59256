// Byte sizes as users write them: "64K", "1.5G", "4096". The CLI, the
// environment options and the bindings all parse sizes with these.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace faultline {

// Accepts a non-negative integer or decimal with an optional K/M/G/T suffix
// (powers of 1024, case-insensitive, optional trailing "B" or "iB").
// Returns false for anything else or on overflow.
bool ParseSize(std::string_view text, uint64_t* out) noexcept;

// "1.50 GiB", "64.00 KiB", "512 B".
std::string FormatSize(uint64_t bytes);

}  // namespace faultline
