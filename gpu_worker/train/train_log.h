#pragma once

// The training history (DESIGN §5): one JSON object per logged optimizer step, kept in memory for
// trainer_state.json's "log_history" (as Hugging Face's Trainer writes it) and appended, one
// flushed line each, to output_dir/train_log.jsonl so that users can tail it.
//
// A record's keys (every value a number): "step", "epoch" (fractional: epochs of data consumed),
// "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second", "step_seconds", plus what
// the caller added to StepStats::extra (meft-worker adds "compute_seconds", "wait_seconds",
// "transfer_seconds", and "eval_<metric>" at evaluation steps).

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/train/trainer.h"
#include "nlohmann/json.hpp"

namespace meft::worker {

inline constexpr char kTrainLogFile[] = "train_log.jsonl";

// The record of one step. `epoch` is the fractional epoch after it.
nlohmann::json LogRecord(const StepStats& stats, double epoch);

// The "log_history" field of a trainer_state.json (`state`, read from `state_path`): an empty
// list when the field is absent (checkpoints written before it existed). INVALID_ARGUMENT,
// naming the file and field, unless it is a list of objects with integer "step"s, ascending and
// none past `step`.
absl::StatusOr<nlohmann::json> ReadLogHistory(const nlohmann::json& state,
                                              const std::string& state_path, int64_t step);

// Owns the history and its file. Not thread-safe (the training thread).
class TrainLog {
 public:
  // `path` "" keeps the history in memory only.
  explicit TrainLog(std::string path);
  ~TrainLog();
  TrainLog(const TrainLog&) = delete;
  TrainLog& operator=(const TrainLog&) = delete;

  // Starts over from `history` (a list of records, e.g. a resumed checkpoint's log_history):
  // rewrites the file (and its folder, if missing) to hold exactly these records, one line each,
  // and keeps it open for Append. Lines a previous run wrote past the last of them are dropped.
  absl::Status Restart(nlohmann::json history);

  // Restart(history()) unless the file is open already (or there is none).
  absl::Status Open();

  // Appends `record` to the history and, when there is a file, writes it as one line and flushes
  // it (after Open()).
  absl::Status Append(nlohmann::json record);

  // The records so far, oldest first (a JSON list).
  const nlohmann::json& history() const { return history_; }

 private:
  absl::Status WriteLine(const nlohmann::json& record);

  std::string path_;
  std::FILE* file_ = nullptr;  // open for appending once Restart or Append ran
  nlohmann::json history_ = nlohmann::json::array();
};

}  // namespace meft::worker
