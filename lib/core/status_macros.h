// Early-return helpers for Status and Result<T>.
#pragma once

#include "faultline/status.hpp"

#define FL_CONCAT_INNER(a, b) a##b
#define FL_CONCAT(a, b) FL_CONCAT_INNER(a, b)

#define FL_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ::faultline::Status fl_status_ = (expr);  \
    if (!fl_status_.ok()) return fl_status_;  \
  } while (0)

#define FL_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()

#define FL_ASSIGN_OR_RETURN(lhs, expr) \
  FL_ASSIGN_OR_RETURN_IMPL(FL_CONCAT(fl_result_, __LINE__), lhs, expr)
