// Trainer::RecoverFromServerLoss: continuing after the parameter server was killed and restarted
// from its last checkpoint (DESIGN §7).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"
#include "gpu_worker/client/retry.h"
#include "gpu_worker/train/run_folder.h"
#include "gpu_worker/train/trainer.h"

namespace meft::worker {

absl::Status Trainer::RecoverFromServerLoss(const absl::Status& failure,
                                            std::vector<StepStats>* history) {
  if (target_.adapter != "meft" || options_.reconnect_timeout_seconds <= 0) return failure;
  // A failure of the step's own (bad data, a server-side error) leaves the server up at this
  // step; a lost server is unreachable, or answers again from an earlier step.
  // A call past its deadline counts as unreachable too: a cut network shows as that (the
  // connection stays up while nothing crosses it), and which of the step's calls the server
  // applied is then unknown, so the run rolls back to a checkpoint like after a restart.
  const auto unreachable = [](const absl::Status& s) {
    return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
  };
  // The failure keeps the code of the server call that failed (StatusError through the hooks),
  // so an unreachable server needs no probe; any other failure is checked against the server's
  // step, since a server that restarted quickly answers again, with an error about the step.
  bool lost = unreachable(failure);
  if (!lost) {
    const absl::StatusOr<uint64_t> probe = target_.server->RestartStep();
    lost = unreachable(probe.status()) || (probe.ok() && static_cast<int64_t>(*probe) != step_);
  }
  if (!lost) return failure;
  std::fprintf(stderr, "\nparameter server lost at step %lld: %s\n", static_cast<long long>(step_),
               std::string(failure.message()).c_str());
  uint64_t server_step = 0;
  // A stop request (SIGTERM) ends the wait within a poll interval.
  bool stopped = false;
  const auto stop_requested = [&] {
    if (!stopped && options_.stop_requested) stopped = options_.stop_requested();
    return stopped;
  };
  BackoffOptions backoff;
  backoff.timeout_seconds = options_.reconnect_timeout_seconds;
  backoff.sleep = [&](double seconds) {
    constexpr double kPollSeconds = 0.1;
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!stop_requested() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(
          std::min(std::chrono::duration<double>(kPollSeconds),
                   std::chrono::duration<double>(until - std::chrono::steady_clock::now())));
    }
  };
  const absl::Status back = RetryWhileUnavailable(
      [&]() -> absl::Status {
        if (stop_requested()) return absl::CancelledError("stop requested");
        absl::StatusOr<uint64_t> answered = target_.server->RestartStep();
        if (absl::IsDeadlineExceeded(answered.status())) {
          return absl::UnavailableError(answered.status().message());  // retried like it
        }
        MEFT_RETURN_IF_ERROR(answered.status());
        server_step = *answered;
        return absl::OkStatus();
      },
      backoff,
      [](const absl::Status&, double seconds) {
        std::fprintf(stderr, "server unavailable; retrying in %g s\n", seconds);
      });
  if (stopped) {
    return absl::CancelledError(
        absl::StrCat("stop requested at step ", step_,
                     " while waiting for the parameter server to come back; no checkpoint was "
                     "written (resume from the last one)"));
  }
  if (!back.ok()) {
    return absl::Status(back.code(),
                        absl::StrCat("the parameter server did not come back within "
                                     "meft.reconnect_timeout_seconds = ",
                                     options_.reconnect_timeout_seconds, ": ", back.message()));
  }
  // Resume from the worker's newest checkpoint at or before the server's step: the one the
  // server restarted from, or, when the server never went away (a cut network, a call past its
  // deadline), the last one written; the servers restore the matching checkpoint of theirs.
  std::string dir;
  if (!options_.output_dir.empty()) {
    MEFT_ASSIGN_OR_RETURN(dir, NewestCheckpoint(options_.output_dir,
                                                static_cast<int64_t>(server_step)));
  }
  if (dir.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the parameter server came back at step ", server_step, " but training was at step ",
        step_, " and there is no worker checkpoint ",
        options_.output_dir.empty()
            ? "(output_dir is not set)"
            : absl::StrCat("at or before step ", server_step, " in ", options_.output_dir),
        " to resume from; restart the server from a checkpoint the worker also has"));
  }
  std::fprintf(stderr, "server back at step %llu; resuming from %s\n",
               static_cast<unsigned long long>(server_step), dir.c_str());
  MEFT_RETURN_IF_ERROR(Resume(dir));
  history->erase(std::remove_if(history->begin(), history->end(),
                                [&](const StepStats& s) { return s.step > step_; }),
                 history->end());
  return absl::OkStatus();
}

}  // namespace meft::worker
