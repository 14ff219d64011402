#include "common/logging/logging.h"

#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <array>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"

namespace meft::logging {

namespace {

struct LevelName {
  absl::string_view name;
  spdlog::level::level_enum level;
};

constexpr std::array<LevelName, 6> kLevels = {{
    {"trace", spdlog::level::trace},
    {"debug", spdlog::level::debug},
    {"info", spdlog::level::info},
    {"warn", spdlog::level::warn},
    {"error", spdlog::level::err},
    {"off", spdlog::level::off},
}};

}  // namespace

absl::Status Init(std::string_view std_level, std::string_view std_process_name) {
  const absl::string_view level(std_level.data(), std_level.size());
  const absl::string_view process_name(std_process_name.data(), std_process_name.size());
  const LevelName* found = nullptr;
  for (const LevelName& candidate : kLevels) {
    if (candidate.name == level) found = &candidate;
  }
  if (found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown log level \"", level, "\"; expected one of ",
        absl::StrJoin(kLevels, "|",
                      [](std::string* out, const LevelName& l) { absl::StrAppend(out, l.name); })));
  }
  // '%' starts a spdlog pattern flag; a process name is text.
  std::string name = absl::StrReplaceAll(process_name, {{"%", "%%"}});
  auto logger = std::make_shared<spdlog::logger>(std::string(process_name),
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_pattern(absl::StrCat("[%Y-%m-%d %H:%M:%S.%e] [", name, "] [%l] %v"));
  logger->set_level(found->level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

}  // namespace meft::logging
