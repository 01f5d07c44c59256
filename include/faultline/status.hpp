// Status and Result<T>: the error currency of the C++ API. A Status is an
// errno-style code plus a message held inline (no heap), so it can be made
// and copied anywhere, including paths that must not allocate.
// Thread-safety: plain values; copy freely.
#pragma once

#include <cassert>
#include <cerrno>
#include <optional>
#include <string>
#include <utility>

namespace faultline {

class [[nodiscard]] Status {
 public:
  // An OK status.
  Status() noexcept { msg_[0] = '\0'; }
  static Status Ok() noexcept { return Status(); }
  // An error: `code` is a positive errno value (EINVAL, EIO, ...); the
  // message is printf-formatted into an inline buffer and truncated to fit.
  static Status Error(int code, const char* fmt, ...) noexcept
      __attribute__((format(printf, 2, 3)));

  bool ok() const noexcept { return code_ == 0; }
  // The errno value; 0 when ok.
  int code() const noexcept { return code_; }
  // The message naming the problem; "" when ok. Valid while this Status lives.
  const char* message() const noexcept { return msg_; }
  // "message (strerror(code))", or "OK".
  std::string ToString() const;
  // A copy whose message is "prefix: message"; the code is kept.
  Status WithPrefix(const char* fmt, ...) const noexcept __attribute__((format(printf, 2, 3)));

 private:
  static constexpr size_t kMessageCapacity = 248;
  int code_ = 0;
  char msg_[kMessageCapacity];
};

// Either a value or an error Status. Accessing value() on an error is a bug
// (asserted in debug builds).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(status) {      // NOLINT: implicit by design
    assert(!status_.ok() && "Result built from an OK status without a value");
    if (status_.ok()) status_ = Status::Error(EINVAL, "Result built from an OK status");
  }

  bool ok() const noexcept { return status_.ok(); }
  const Status& status() const noexcept { return status_; }

  T& value() & { assert(ok()); return *value_; }
  const T& value() const& { assert(ok()); return *value_; }
  T&& value() && { assert(ok()); return std::move(*value_); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace faultline
