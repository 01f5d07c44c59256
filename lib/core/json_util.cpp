// Checked JSON parsing and typed getters; see json_util.h.
#include "core/json_util.h"

namespace faultline::internal {

using json = nlohmann::json;

namespace {

// Nesting depth of `text`, ignoring brackets inside strings.
int MaxDepth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escape = false;
  for (char c : text) {
    if (in_string) {
      if (escape) escape = false;
      else if (c == '\\') escape = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > max_depth) max_depth = depth;
      if (max_depth > kMaxJsonDepth) return max_depth;
    } else if (c == ']' || c == '}') depth--;
  }
  return max_depth;
}

const char* TypeName(const json& v) { return v.type_name(); }

}  // namespace

Result<json> ParseJsonChecked(std::string_view text, const char* what) {
  if (MaxDepth(text) > kMaxJsonDepth)
    return Status::Error(EINVAL, "%s: JSON nested deeper than %d levels", what, kMaxJsonDepth);
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return Status::Error(EINVAL, "%s is not valid JSON: %s", what, e.what());
  } catch (const std::exception& e) {
    return Status::Error(EINVAL, "%s: %s", what, e.what());
  }
}

Status GetMember(const json& obj, const char* key, json::value_t type, const json** out,
                 const char* ctx, bool optional) {
  *out = nullptr;
  if (!obj.is_object()) return Status::Error(EINVAL, "%s: not a JSON object", ctx);
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (optional) return Status::Ok();
    return Status::Error(EINVAL, "%s: missing field '%s'", ctx, key);
  }
  bool match = it->type() == type ||
               (type == json::value_t::number_unsigned && it->is_number_unsigned()) ||
               (type == json::value_t::number_integer && it->is_number_integer()) ||
               (type == json::value_t::number_float && it->is_number());
  if (!match && type == json::value_t::number_integer && it->is_number())
    return Status::Error(EINVAL, "%s: field '%s' must be an integer of 64 bits at most, not %s", ctx, key,
                         it->dump().substr(0, 32).c_str());
  if (!match) {
    json probe(type);
    return Status::Error(EINVAL, "%s: field '%s' must be %s, not %s", ctx, key, probe.type_name(),
                         TypeName(*it));
  }
  *out = &*it;
  return Status::Ok();
}

Status GetString(const json& obj, const char* key, std::string* out, const char* ctx) {
  const json* v;
  Status s = GetMember(obj, key, json::value_t::string, &v, ctx);
  if (!s.ok()) return s;
  *out = v->get<std::string>();
  return Status::Ok();
}

Status GetOptionalString(const json& obj, const char* key, std::string* out, const char* ctx) {
  const json* v;
  Status s = GetMember(obj, key, json::value_t::string, &v, ctx, true);
  if (!s.ok()) return s;
  if (v) *out = v->get<std::string>();
  return Status::Ok();
}

Status GetU64(const json& obj, const char* key, uint64_t* out, const char* ctx) {
  const json* v;
  Status s = GetMember(obj, key, json::value_t::number_integer, &v, ctx);
  if (!s.ok()) return s;
  if (v->is_number_integer() && !v->is_number_unsigned() && v->get<int64_t>() < 0)
    return Status::Error(EINVAL, "%s: field '%s' must not be negative", ctx, key);
  *out = v->get<uint64_t>();
  return Status::Ok();
}

Status GetI64(const json& obj, const char* key, int64_t* out, const char* ctx) {
  const json* v;
  Status s = GetMember(obj, key, json::value_t::number_integer, &v, ctx);
  if (!s.ok()) return s;
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    return Status::Error(EINVAL, "%s: field '%s' is out of range", ctx, key);
  *out = v->get<int64_t>();
  return Status::Ok();
}

Status GetBool(const json& obj, const char* key, bool* out, const char* ctx) {
  const json* v;
  Status s = GetMember(obj, key, json::value_t::boolean, &v, ctx);
  if (!s.ok()) return s;
  *out = v->get<bool>();
  return Status::Ok();
}

}  // namespace faultline::internal
