#pragma once

// Status helpers shared by every meft module. Domain functions return absl::Status or
// absl::StatusOr<T>; these macros keep call sites short.

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MEFT_STATUS_CONCAT_INNER_(a, b) a##b
#define MEFT_STATUS_CONCAT_(a, b) MEFT_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define MEFT_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status meft_status_ = (expr);        \
    if (!meft_status_.ok()) return meft_status_; \
  } while (false)

// `MEFT_ASSIGN_OR_RETURN(auto x, Foo())`: evaluates Foo() (an absl::StatusOr<T>), returns its
// status on error, otherwise moves the value into the declaration on the left.
#define MEFT_ASSIGN_OR_RETURN(lhs, expr) \
  MEFT_ASSIGN_OR_RETURN_IMPL_(MEFT_STATUS_CONCAT_(meft_statusor_, __LINE__), lhs, expr)

#define MEFT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(tmp).value()
