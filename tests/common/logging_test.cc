#include "common/logging/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <string>

namespace meft::logging {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::Not;

TEST(LoggingTest, EveryLevelIsAccepted) {
  const std::pair<const char*, spdlog::level::level_enum> levels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"error", spdlog::level::err},   {"off", spdlog::level::off},
  };
  for (const auto& [name, level] : levels) {
    absl::Status status = Init(name, "test");
    EXPECT_TRUE(status.ok()) << name << ": " << status;
    EXPECT_EQ(spdlog::default_logger()->level(), level) << name;
  }
}

TEST(LoggingTest, UnknownLevelIsRejected) {
  ASSERT_TRUE(Init("warn", "test").ok());
  for (const char* bad : {"verbose", "INFO", "", "warning"}) {
    absl::Status status = Init(bad, "test");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(status.message()), HasSubstr(std::string("\"") + bad + "\""));
    EXPECT_THAT(std::string(status.message()), HasSubstr("trace|debug|info|warn|error|off"));
    EXPECT_EQ(spdlog::default_logger()->level(), spdlog::level::warn);  // unchanged
  }
}

TEST(LoggingTest, FormatAndLevelFilter) {
  ASSERT_TRUE(Init("info", "param_server%1").ok());
  ::testing::internal::CaptureStderr();
  spdlog::debug("hidden message");
  spdlog::info("hello {}", 42);
  spdlog::error("bad thing");
  std::string out = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(out, Not(HasSubstr("hidden message")));
  EXPECT_THAT(out,
              MatchesRegex("\\[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}\\] "
                           "\\[param_server%1\\] \\[info\\] hello 42\n"
                           "\\[[-0-9: .]+\\] \\[param_server%1\\] \\[error\\] bad thing\n"));
}

}  // namespace
}  // namespace meft::logging
