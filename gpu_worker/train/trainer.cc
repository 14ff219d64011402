#include "gpu_worker/train/trainer.h"

#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "gpu_worker/model/status_error.h"
#include "gpu_worker/train/train_log.h"

namespace meft::worker {
namespace {

using Clock = std::chrono::steady_clock;

std::string FormatDuration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::max(0.0, seconds));
  return absl::StrFormat("%02d:%02d", s / 60, s % 60);
}

}  // namespace

std::pair<torch::Tensor, int64_t> CausalLmLoss(const torch::Tensor& logits,
                                               const torch::Tensor& labels) {
  const int64_t vocab = logits.size(-1);
  const torch::Tensor shifted_logits = logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, vocab});
  const torch::Tensor shifted_labels = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1});
  const int64_t count = shifted_labels.ne(kIgnoreIndex).sum().item<int64_t>();
  if (count == 0) return {torch::zeros({}, logits.options()), 0};
  namespace F = torch::nn::functional;
  const torch::Tensor loss = F::cross_entropy(
      shifted_logits.to(torch::kFloat32), shifted_labels,
      F::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex).reduction(torch::kMean));
  return {loss, count};
}

Trainer::Trainer(const LlamaModel* model, TrainTarget target, DataLoader* loader,
                 TrainerOptions options)
    : model_(model),
      target_(std::move(target)),
      loader_(loader),
      options_(std::move(options)),
      log_(std::make_unique<TrainLog>(
          options_.output_dir.empty() ? ""
                                      : absl::StrCat(options_.output_dir, "/", kTrainLogFile))) {}

Trainer::~Trainer() = default;

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const LlamaModel* model,
                                                         TrainTarget target, DataLoader* loader,
                                                         TrainerOptions options) {
  if (options.max_steps <= 0)
    return absl::InvalidArgumentError("train.max_steps: must be positive");
  if (options.grad_accum <= 0)
    return absl::InvalidArgumentError("train.grad_accum: must be positive");
  if (!(options.lr >= 0)) return absl::InvalidArgumentError("train.lr: must be >= 0");
  if (target.adapter == "meft") {
    if (target.meft == nullptr || target.server == nullptr) {
      return absl::InvalidArgumentError("adapter: meft needs a parameter server");
    }
  } else if (target.local.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter: ", target.adapter, " has no trainable parameters"));
  }
  auto trainer =
      std::unique_ptr<Trainer>(new Trainer(model, std::move(target), loader, std::move(options)));
  if (!trainer->target_.local.empty()) {
    trainer->adamw_ =
        std::make_unique<DeviceAdamW>(trainer->target_.local, trainer->options_.adamw);
  }
  return trainer;
}

absl::StatusOr<StepStats> Trainer::TrainStep() {
  absl::StatusOr<StepStats> stats = TrainStepOrError();
  if (!stats.ok() && target_.meft != nullptr) {
    // Settle the background server calls. A failed Step of the previous optimizer step is the
    // cause of whatever failed after it (its lookups time out), so it is reported instead.
    target_.meft->FinishBackward().IgnoreError();
    MEFT_RETURN_IF_ERROR(target_.meft->WaitForStep());
  }
  return stats;
}

absl::StatusOr<StepStats> Trainer::TrainStepOrError() {
  const auto start = Clock::now();
  StepStats stats;
  const int64_t warmup =
      static_cast<int64_t>(std::ceil(options_.warmup_ratio * options_.max_steps));
  stats.lr = LinearScheduleLr(options_.lr, step_, warmup, options_.max_steps);
  double loss_sum = 0.0;
  int64_t loss_batches = 0;
  try {
    for (int64_t m = 0; m < options_.grad_accum; ++m) {
      MEFT_ASSIGN_OR_RETURN(Batch batch, loader_->Next());
      const torch::Device device = model_->device();
      const torch::Tensor ids = batch.input_ids.to(device);
      const torch::Tensor mask = batch.attention_mask.to(device);
      const torch::Tensor labels = batch.labels.to(device);
      if (target_.meft != nullptr) {
        target_.meft->BeginMicroBatch(static_cast<uint64_t>(step_), static_cast<uint32_t>(m), true);
      }
      const torch::Tensor logits = model_->Forward(ids, mask, nullptr, target_.hooks);
      auto [loss, count] = CausalLmLoss(logits, labels);
      stats.tokens += batch.attention_mask.sum().item<int64_t>();
      if (count == 0) continue;
      (loss / static_cast<double>(options_.grad_accum)).backward();
      loss_sum += loss.item<double>();
      ++loss_batches;
    }
    // Global norm over every adapter gradient, then the optimizer step.
    double squared = adamw_ ? adamw_->SquaredGradNorm() : 0.0;
    if (target_.adapter == "meft") {
      MEFT_RETURN_IF_ERROR(target_.meft->FinishBackward());
      MEFT_ASSIGN_OR_RETURN(const double server_sq,
                            target_.meft->GradNorm(static_cast<uint64_t>(step_)));
      squared += server_sq;
    }
    stats.grad_norm = std::sqrt(squared);
    double clip = 1.0;
    if (options_.max_grad_norm > 0) {
      clip = std::min(1.0, options_.max_grad_norm / (stats.grad_norm + 1e-6));
    }
    if (!std::isfinite(stats.grad_norm)) {
      return absl::DataLossError(absl::StrCat("step ", step_, ": gradient norm is not finite"));
    }
    if (target_.adapter == "meft") {
      // With overlap this returns at once; the next step's GradNorm waits for the reply.
      MEFT_RETURN_IF_ERROR(target_.meft->Step(static_cast<uint64_t>(step_), stats.lr, clip));
    } else {
      adamw_->Step(stats.lr, clip);
    }
  } catch (...) {
    // Whatever a step can throw: LibTorch's errors, a hook's StatusError (which keeps the server
    // call's code, e.g. UNAVAILABLE for RecoverFromServerLoss), std::bad_alloc.
    return StatusFromCurrentException(absl::StrCat("step ", step_));
  }
  ++step_;
  stats.step = step_;
  stats.loss = loss_batches > 0 ? loss_sum / static_cast<double>(loss_batches) : 0.0;
  stats.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return stats;
}

absl::StatusOr<std::vector<StepStats>> Trainer::Run(
    const std::function<absl::Status(StepStats&)>& after_step) {
  if (target_.adapter == "meft") {
    MEFT_ASSIGN_OR_RETURN(const ServerInfo server, target_.server->Describe());
    if (static_cast<int64_t>(server.step) != step_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the parameter server is at optimizer step ", server.step, " but training is at step ",
          step_, ": start the server fresh, or resume from the matching checkpoint"));
    }
  }
  MEFT_RETURN_IF_ERROR(log_->Open());
  std::vector<StepStats> history;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const auto start = Clock::now();
  const int64_t first = step_;
  int64_t tokens = 0;
  double smoothed = 0.0;
  // Every failure while the server may be gone (a step, its Step finishing in the background,
  // evaluation, a checkpoint) goes to RecoverFromServerLoss. A second recovery to the same step
  // with no step done in between, or after failing at the same step again, fails: the server
  // keeps failing the same way.
  int64_t recovered_to = -1, failed_at = -1;
  bool progressed = false;
  const auto recover = [&](const absl::Status& failure) -> absl::Status {
    const int64_t failing_step = step_;
    MEFT_RETURN_IF_ERROR(RecoverFromServerLoss(failure, &history));
    if (step_ == recovered_to && (!progressed || failing_step == failed_at)) {
      return absl::Status(
          failure.code(),
          absl::StrCat("training failed again at step ", failing_step, " after recovering to step ",
                       step_, " with no progress: ", failure.message()));
    }
    recovered_to = step_;
    failed_at = failing_step;
    progressed = false;
    return absl::OkStatus();
  };
  while (true) {
    if (step_ >= options_.max_steps) {
      // The last Step may still run in the background.
      const absl::Status last =
          target_.meft != nullptr ? target_.meft->WaitForStep() : absl::OkStatus();
      if (last.ok()) break;
      MEFT_RETURN_IF_ERROR(recover(last));
      continue;
    }
    if (options_.stop_requested && options_.stop_requested()) {
      std::fprintf(stderr, "%sstop requested at step %lld\n", tty ? "\n" : "",
                   static_cast<long long>(step_));
      if (!options_.output_dir.empty()) {
        MEFT_ASSIGN_OR_RETURN(const std::string path, SaveCheckpoint());
        std::fprintf(stderr, "checkpoint %s (continue with --resume %s)\n", path.c_str(),
                     path.c_str());
      }
      if (target_.meft != nullptr) MEFT_RETURN_IF_ERROR(target_.meft->WaitForStep());
      break;
    }
    absl::StatusOr<StepStats> attempt = TrainStep();
    if (!attempt.ok()) {
      MEFT_RETURN_IF_ERROR(recover(attempt.status()));
      continue;
    }
    progressed = true;
    StepStats& stats = *attempt;
    history.push_back(stats);
    tokens += stats.tokens;
    smoothed = history.size() == 1 ? stats.loss : 0.9 * smoothed + 0.1 * stats.loss;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double per_step = elapsed / static_cast<double>(std::max<int64_t>(1, step_ - first));
    const double eta = per_step * static_cast<double>(options_.max_steps - step_);
    const bool log_now =
        step_ % std::max<int64_t>(1, options_.log_every) == 0 || step_ == options_.max_steps;
    if (options_.progress && (tty || log_now)) {
      const int width = 24;
      const int filled = static_cast<int>(width * step_ / options_.max_steps);
      std::fprintf(stderr, "%sstep %lld/%lld [%s%s] loss %.4f | lr %.2e | %.0f tok/s | ETA %s%s",
                   tty ? "\r" : "", static_cast<long long>(step_),
                   static_cast<long long>(options_.max_steps), std::string(filled, '=').c_str(),
                   std::string(width - filled, ' ').c_str(), smoothed, stats.lr,
                   static_cast<double>(tokens) / std::max(elapsed, 1e-9),
                   FormatDuration(eta).c_str(), tty && !(step_ == options_.max_steps) ? "" : "\n");
      std::fflush(stderr);
    }
    if (after_step) {
      // Evaluation waits for the Step without reporting it; a failed Step is the cause of a
      // failed evaluation, so it is the one reported (and recovered from).
      absl::Status after = after_step(stats);
      if (!after.ok()) {
        if (target_.meft != nullptr) {
          absl::Status step_status = target_.meft->WaitForStep();
          if (!step_status.ok()) after = std::move(step_status);
        }
        MEFT_RETURN_IF_ERROR(recover(after));
        continue;
      }
    }
    history.back().extra = stats.extra;
    const bool evaluated = std::any_of(stats.extra.begin(), stats.extra.end(),
                                       [](const auto& e) { return e.first.rfind("eval_", 0) == 0; });
    if (log_now || evaluated) {
      const DataPosition at = loader_->position();
      const double epoch = static_cast<double>(at.epoch) +
                           static_cast<double>(at.index) /
                               static_cast<double>(std::max<int64_t>(1, loader_->batches_per_epoch()));
      MEFT_RETURN_IF_ERROR(log_->Append(LogRecord(stats, epoch)));
    }
    const bool save_now = options_.save_every > 0 && step_ % options_.save_every == 0;
    if (!options_.output_dir.empty() && (save_now || step_ == options_.max_steps)) {
      absl::StatusOr<std::string> path = SaveCheckpoint();
      if (!path.ok()) {
        MEFT_RETURN_IF_ERROR(recover(path.status()));
        continue;
      }
      if (options_.progress) {
        std::fprintf(stderr, "%scheckpoint %s\n", tty ? "\n" : "", path->c_str());
      }
    }
  }
  return history;
}

}  // namespace meft::worker
