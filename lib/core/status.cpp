// Status formatting: messages are written into the inline buffer with
// vsnprintf, so making an error never allocates.
#include "faultline/status.hpp"

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace faultline {

Status Status::Error(int code, const char* fmt, ...) noexcept {
  Status s;
  s.code_ = code > 0 ? code : EINVAL;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s.msg_, sizeof(s.msg_), fmt, ap);
  va_end(ap);
  return s;
}

Status Status::WithPrefix(const char* fmt, ...) const noexcept {
  if (ok()) return *this;
  Status s;
  s.code_ = code_;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(s.msg_, sizeof(s.msg_), fmt, ap);
  va_end(ap);
  if (n >= 0 && static_cast<size_t>(n) < sizeof(s.msg_)) {
    snprintf(s.msg_ + n, sizeof(s.msg_) - n, ": %s", msg_);
  }
  return s;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out = msg_;
  out += " (";
  out += strerror(code_);
  out += ")";
  return out;
}

}  // namespace faultline
