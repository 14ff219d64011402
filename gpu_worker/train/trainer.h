#pragma once

// The training loop (DESIGN §3): micro-batches with gradient accumulation, a linear warmup and
// decay schedule, global-norm clipping over every adapter gradient (for MEFT through the
// server's squared-norm query), the optimizer step (the server's lazy Adam for MEFT, DeviceAdamW
// for the baselines), progress output, and checkpoints that resume bit-identically.

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/adapters/baselines.h"
#include "gpu_worker/adapters/meft_adapter.h"
#include "gpu_worker/data/dataset.h"
#include "gpu_worker/model/llama.h"
#include "gpu_worker/train/adamw.h"

namespace meft::worker {

// What is trained. For "meft", `meft` and `server` are set and the parameters live on the
// server; for "parallel" and "lora", `local` holds the device parameters. For "lora", `lora` is
// set too: checkpoints are in PEFT's layout (gpu_worker/adapters/peft_format.h).
struct TrainTarget {
  std::string adapter;            // "meft" | "parallel" | "lora"
  AdapterHooks* hooks = nullptr;  // passed to the model's Forward
  MeftAdapter* meft = nullptr;
  ParamClient* server = nullptr;
  std::vector<std::pair<std::string, torch::Tensor>> local;
  const LoraAdapter* lora = nullptr;
  // The model folder, written as PEFT's base_model_name_or_path ("" = null).
  std::string base_model;
};

struct TrainerOptions {
  int64_t max_steps = 100;     // optimizer steps
  int64_t grad_accum = 1;      // micro-batches per optimizer step
  double lr = 1e-3;            // peak learning rate
  double warmup_ratio = 0.02;  // warmup steps = ceil(ratio * max_steps)
  double max_grad_norm = 1.0;  // global-norm clipping; 0 disables
  AdamWOptions adamw;          // baselines only (MEFT's Adam runs on the server)
  int64_t log_every = 10;      // steps between log lines (and progress updates off a TTY)
  int64_t save_every = 0;      // steps between checkpoints; 0 = only at the end
  // checkpoint-<step>/ folders and train_log.jsonl go here ("" = neither)
  std::string output_dir;
  bool progress = true;        // progress bar on stderr
  // meft: when the parameter server goes away mid-training, how long to wait for it (exponential
  // backoff) before resuming from output_dir/checkpoint-<the step it restarted at>/; 0 = fail.
  double reconnect_timeout_seconds = 0;
  // Polled before every optimizer step (may be empty); true = write a checkpoint (when
  // output_dir is set) and return, e.g. after SIGTERM. Also polled (every 0.1 s) while waiting
  // for a lost parameter server: Run then returns CANCELLED. Called from Run's thread only.
  std::function<bool()> stop_requested;
};

struct StepStats {
  int64_t step = 0;  // optimizer steps done after this one
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  int64_t tokens = 0;
  double seconds = 0.0;
  // More figures for this step's record in the training history (train_log.h), added by Run's
  // `after_step`; keys starting with "eval_" are evaluation results.
  std::map<std::string, double> extra;
};

class TrainLog;

class Trainer {
 public:
  // `model`, the target's objects and `loader` must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const LlamaModel* model,
                                                         TrainTarget target, DataLoader* loader,
                                                         TrainerOptions options);

  ~Trainer();

  // Continues from a checkpoint-<step>/ folder written by SaveCheckpoint: the step, the data
  // position, the baselines' parameters and AdamW state, and the training history; for MEFT the
  // server is told to restore the server checkpoint recorded there. With output_dir set,
  // output_dir/train_log.jsonl is rewritten to the checkpoint's log_history: lines of steps after
  // it (a run that died after its last checkpoint) are dropped, and Run appends from there.
  absl::Status Resume(const std::string& checkpoint_dir);

  // Trains from step() to max_steps. `after_step` (may be empty) runs after every optimizer step
  // (evaluation hooks) and may add figures to the step's `extra`; an error from it stops training.
  // Then the step is recorded in the training history (train_log.h) when it is a log_every-th
  // step, the last one, or after_step added an "eval_" figure; with output_dir set, its line is
  // appended to output_dir/train_log.jsonl (a run from step 0 starts that file afresh). Checkpoints every save_every steps and
  // at the end when output_dir is set. Returns the per-step statistics of this run. With
  // reconnect_timeout_seconds, a parameter server lost during a step, its background Step,
  // after_step or a checkpoint is waited for and training resumes (RecoverFromServerLoss); a
  // second recovery to the same step without progress fails instead.
  absl::StatusOr<std::vector<StepStats>> Run(
      const std::function<absl::Status(StepStats&)>& after_step = {});

  // Writes output_dir/checkpoint-<step()>/ atomically, its trainer_state.json carrying the
  // training history so far as "log_history"; returns its path.
  absl::StatusOr<std::string> SaveCheckpoint();

  int64_t step() const { return step_; }

 private:
  Trainer(const LlamaModel* model, TrainTarget target, DataLoader* loader, TrainerOptions options);
  // One optimizer step; on failure settles the MEFT adapter's background server calls.
  absl::StatusOr<StepStats> TrainStep();
  // After a failed step: when the parameter server is gone (or came back at another step),
  // waits for it, resumes from the worker checkpoint matching the step it restarted at and drops
  // the statistics of the steps after it from `history`. Otherwise returns `failure`.
  // Defined in recovery.cc.
  absl::Status RecoverFromServerLoss(const absl::Status& failure, std::vector<StepStats>* history);
  absl::StatusOr<StepStats> TrainStepOrError();

  const LlamaModel* model_;
  TrainTarget target_;
  DataLoader* loader_;
  TrainerOptions options_;
  std::unique_ptr<DeviceAdamW> adamw_;
  std::unique_ptr<TrainLog> log_;
  int64_t step_ = 0;
};

// Loads the adapter of a checkpoint-<step>/ folder written by Trainer::SaveCheckpoint into
// `target`: the baselines' parameters are copied in (a LoRA in PEFT's layout, checked against
// target.lora's options, or in meft's older one); for MEFT the server restores the server
// checkpoint recorded there (a relative path is relative to the checkpoint's run folder, see
// run_folder.h). Errors name the file and the field or tensor.
absl::Status LoadAdapterCheckpoint(const std::string& checkpoint_dir, const TrainTarget& target);

// Mean cross-entropy of next-token prediction over labelled positions (labels != -100); the
// logits at position t predict the label at t + 1. Returns the mean and the number of labels.
std::pair<torch::Tensor, int64_t> CausalLmLoss(const torch::Tensor& logits,
                                               const torch::Tensor& labels);

}  // namespace meft::worker
