#pragma once

// Process-wide logging setup. Binaries call Init once at the top of main(), before starting
// threads; domain code then logs with spdlog::info(...) and friends directly.

#include <string_view>

#include "absl/status/status.h"

namespace meft::logging {

// Replaces spdlog's default logger with one that writes every message to stderr (flushed per
// line) as `[2024-01-31 12:00:00.123] [<process_name>] [info] message`, and sets its level.
// `level` is one of trace, debug, info, warn, error, off; anything else is INVALID_ARGUMENT and
// leaves the current logger untouched. Not thread-safe with concurrent logging.
absl::Status Init(std::string_view level, std::string_view process_name);

}  // namespace meft::logging
