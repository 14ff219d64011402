#include "gpu_worker/train/train_log.h"

#include <cerrno>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/status.h"

namespace meft::worker {

using nlohmann::json;

json LogRecord(const StepStats& stats, double epoch) {
  json record = {{"step", stats.step},
                 {"epoch", epoch},
                 {"loss", stats.loss},
                 {"learning_rate", stats.lr},
                 {"grad_norm", stats.grad_norm},
                 {"tokens", stats.tokens},
                 {"tokens_per_second",
                  stats.seconds > 0 ? static_cast<double>(stats.tokens) / stats.seconds : 0.0},
                 {"step_seconds", stats.seconds}};
  for (const auto& [key, value] : stats.extra) record[key] = value;
  return record;
}

absl::StatusOr<json> ReadLogHistory(const json& state, const std::string& state_path,
                                    int64_t step) {
  if (!state.contains("log_history")) return json::array();
  const json& history = state["log_history"];
  const auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat(state_path, ": field \"log_history\" ", why));
  };
  if (!history.is_array()) return bad("is not a list");
  int64_t previous = 0;
  for (size_t i = 0; i < history.size(); ++i) {
    const json& r = history[i];
    if (!r.is_object() || !r.contains("step") || !r["step"].is_number_integer()) {
      return bad(absl::StrCat("entry ", i, " is not an object with an integer \"step\""));
    }
    const int64_t s = r["step"].get<int64_t>();
    if (s <= previous || s > step) {
      return bad(absl::StrCat("entry ", i, " has step ", s, ": steps must ascend from 1 to ",
                              "global_step ", step));
    }
    previous = s;
  }
  return history;
}

TrainLog::TrainLog(std::string path) : path_(std::move(path)) {}

TrainLog::~TrainLog() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status TrainLog::Restart(json history) {
  history_ = std::move(history);
  if (path_.empty()) return absl::OkStatus();
  if (file_ != nullptr) std::fclose(file_);
  file_ = nullptr;
  const std::string parent = std::filesystem::path(path_).parent_path().string();
  if (!parent.empty()) MEFT_RETURN_IF_ERROR(io::CreateDirectories(parent));
  file_ = std::fopen(path_.c_str(), "w");
  if (file_ == nullptr) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path_, ": cannot write"));
  }
  for (const json& record : history_) MEFT_RETURN_IF_ERROR(WriteLine(record));
  return absl::OkStatus();
}

absl::Status TrainLog::Open() {
  return path_.empty() || file_ != nullptr ? absl::OkStatus() : Restart(history_);
}

absl::Status TrainLog::Append(json record) {
  MEFT_RETURN_IF_ERROR(Open());
  history_.push_back(record);
  return path_.empty() ? absl::OkStatus() : WriteLine(record);
}

absl::Status TrainLog::WriteLine(const json& record) {
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path_, ": write failed"));
  }
  return absl::OkStatus();
}

}  // namespace meft::worker
