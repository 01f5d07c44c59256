// Parsing untrusted JSON (manifests, safetensors headers) safely: a depth
// limit checked before parsing (the parser and the value destructor must not
// recurse without bound), no exceptions escaping, and typed field getters
// whose errors name the field.
// Thread-safety: pure functions.
#pragma once

#include <nlohmann/json.hpp>
#include <string_view>

#include "faultline/status.hpp"

namespace faultline::internal {

inline constexpr int kMaxJsonDepth = 64;

// Parses `text` as one JSON value. `what` names the document in errors
// ("manifest", "safetensors header").
Result<nlohmann::json> ParseJsonChecked(std::string_view text, const char* what);

// Typed getters. `ctx` names the enclosing object in errors. The Optional
// forms leave `out` untouched when the key is absent (but fail on a wrong type).
Status GetString(const nlohmann::json& obj, const char* key, std::string* out, const char* ctx);
Status GetOptionalString(const nlohmann::json& obj, const char* key, std::string* out,
                         const char* ctx);
Status GetU64(const nlohmann::json& obj, const char* key, uint64_t* out, const char* ctx);
Status GetI64(const nlohmann::json& obj, const char* key, int64_t* out, const char* ctx);
Status GetBool(const nlohmann::json& obj, const char* key, bool* out, const char* ctx);
// `out` points at the member, which must be of `type`.
Status GetMember(const nlohmann::json& obj, const char* key, nlohmann::json::value_t type,
                 const nlohmann::json** out, const char* ctx, bool optional = false);

}  // namespace faultline::internal
