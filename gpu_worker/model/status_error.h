#pragma once

// Errors that cross LibTorch code as exceptions and come out as the Status they started as.
//
// The decoder's hooks (adapter_hooks.h) run inside Forward and inside autograd's backward, where
// the only way out is an exception. A hook whose call failed (MEFT: a parameter-server call)
// throws StatusError, which carries the call's absl::Status; the entry point that ran Forward or
// backward turns whatever was thrown back into a Status with StatusFromCurrentException, so a
// caller still sees UNAVAILABLE for a lost server rather than a message in an INTERNAL error.
// LibTorch's autograd engine rethrows the original exception object, so the type survives
// backward.

#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace meft::worker {

// A c10::Error (so code that handles LibTorch errors handles it too) that keeps the Status.
// what_without_backtrace() is the Status's message.
class StatusError : public c10::Error {
 public:
  // Precondition: !status.ok().
  explicit StatusError(absl::Status status);

  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Throws StatusError(status) unless status is OK.
void ThrowIfError(const absl::Status& status);

// Only inside a catch handler: the Status of the exception being handled, its message prefixed by
// `context` and ": ". StatusError keeps its code; std::bad_alloc and LibTorch's out-of-memory error
// are RESOURCE_EXHAUSTED; any other exception (c10::Error, std::exception or anything else) is
// INTERNAL.
absl::Status StatusFromCurrentException(absl::string_view context);

}  // namespace meft::worker
