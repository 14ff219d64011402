#include "gpu_worker/model/status_error.h"

#include <new>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace meft::worker {

StatusError::StatusError(absl::Status status)
    // The (SourceLocation, message) constructor is the one LibTorch 1.13 and 2.x share.
    : c10::Error(c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                 std::string(status.message())),
      status_(std::move(status)) {}

void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) throw StatusError(status);
}

absl::Status StatusFromCurrentException(absl::string_view context) {
  try {
    throw;
  } catch (const StatusError& e) {
    return absl::Status(e.status().code(), absl::StrCat(context, ": ", e.status().message()));
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of memory: ", e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(context, ": out of host memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what()));
  } catch (...) {
    return absl::InternalError(absl::StrCat(context, ": unknown exception"));
  }
}

}  // namespace meft::worker
