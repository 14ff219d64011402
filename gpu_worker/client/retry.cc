#include "gpu_worker/client/retry.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"

namespace meft::worker {

absl::Status RetryWhileUnavailable(
    const std::function<absl::Status()>& attempt, const BackoffOptions& options,
    const std::function<void(const absl::Status&, double)>& on_retry) {
  double waited = 0.0;
  double delay = options.initial_seconds;
  while (true) {
    absl::Status status = attempt();
    if (!absl::IsUnavailable(status)) return status;
    const double next = std::min(delay, options.max_seconds);
    if (waited + next > options.timeout_seconds + 1e-9) {
      if (waited == 0.0) return status;
      return absl::UnavailableError(
          absl::StrCat(status.message(), " (gave up after ", waited, " s)"));
    }
    if (on_retry) on_retry(status, next);
    if (options.sleep) {
      options.sleep(next);
    } else {
      std::this_thread::sleep_for(std::chrono::duration<double>(next));
    }
    waited += next;
    delay = std::min(delay * 2, options.max_seconds);
  }
}

}  // namespace meft::worker
