#pragma once

// Waiting for a parameter server that is down or still loading its store (DESIGN §7: "the
// worker reconnects with backoff"): retries a call while it fails with UNAVAILABLE, sleeping
// with exponential backoff, for a bounded total time.

#include <functional>
#include <string>

#include "absl/status/status.h"

namespace meft::worker {

struct BackoffOptions {
  double initial_seconds = 0.5;  // first wait
  double max_seconds = 10.0;     // waits double up to this
  double timeout_seconds = 300;  // total time spent waiting; 0 = try once, never wait
  // Sleeps for the given seconds; empty = std::this_thread::sleep_for. Tests pass a fake.
  std::function<void(double)> sleep;
};

// Calls `attempt` until it returns anything but UNAVAILABLE, or until the next wait would take
// the total waited past timeout_seconds; then returns the last status, for UNAVAILABLE with
// " (gave up after N s)" appended. Before each wait calls `on_retry(status, seconds)` (may be
// empty), e.g. to log "server unavailable; retrying in 2 s".
absl::Status RetryWhileUnavailable(
    const std::function<absl::Status()>& attempt, const BackoffOptions& options,
    const std::function<void(const absl::Status&, double)>& on_retry = {});

}  // namespace meft::worker
