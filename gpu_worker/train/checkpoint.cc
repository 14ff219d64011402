// Trainer::SaveCheckpoint and Resume, LoadAdapterCheckpoint: the worker's side of a
// checkpoint-<step>/ folder (adapter or server checkpoint paths, optimizer state,
// trainer_state.json; run_folder.h describes the folder).

#include <torch/torch.h>
#include <unistd.h>

#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/io/file_util.h"
#include "common/safetensors/safetensors.h"
#include "common/status.h"
#include "gpu_worker/adapters/peft_format.h"
#include "gpu_worker/client/sharded_param_client.h"
#include "gpu_worker/model/status_error.h"
#include "gpu_worker/train/run_folder.h"
#include "gpu_worker/train/train_log.h"
#include "gpu_worker/train/trainer.h"
#include "nlohmann/json.hpp"

namespace meft::worker {
namespace {

using nlohmann::json;
namespace st = ::meft::safetensors;

std::string CheckpointName(int64_t step) { return absl::StrCat("checkpoint-", step); }

// fp32 CPU copies of named tensors, for safetensors.
absl::StatusOr<uint64_t> WriteTensors(
    const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  std::vector<torch::Tensor> keep;
  std::vector<st::TensorToWrite> out;
  for (const auto& [name, t] : named) {
    keep.push_back(t.detach().to(torch::kCPU, torch::kFloat32).contiguous());
    const torch::Tensor& c = keep.back();
    out.push_back({name, st::DType::kF32, std::vector<int64_t>(c.sizes().begin(), c.sizes().end()),
                   std::span<const uint8_t>(static_cast<const uint8_t*>(c.data_ptr()),
                                            static_cast<size_t>(c.numel()) * sizeof(float))});
  }
  return st::Write(path, out);
}

absl::StatusOr<std::vector<std::pair<std::string, torch::Tensor>>> ReadTensors(
    const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(auto file, st::File::Open(path));
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const st::TensorInfo& info : file->tensors()) {
    if (info.dtype != st::DType::kF32) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor \"", info.name, "\" is not F32"));
    }
    MEFT_ASSIGN_OR_RETURN(auto data, file->Data(info.name));
    torch::Tensor t = torch::empty(info.shape, torch::kFloat32);
    std::memcpy(t.data_ptr(), data.data(), data.size());
    out.emplace_back(info.name, t);
  }
  return out;
}

// One parameter server: "server_checkpoint": PATH; several shards: "server_checkpoints":
// [PATH, ...] in meft.servers order. Paths under `run_dir` are recorded relative to it.
void RecordServerCheckpoints(const std::string& joined, const std::string& run_dir, json* out) {
  std::vector<std::string> paths = SplitShardCheckpoints(joined);
  for (std::string& path : paths) path = RecordPath(path, run_dir);
  if (paths.size() == 1) {
    (*out)["server_checkpoint"] = paths[0];
  } else {
    (*out)["server_checkpoints"] = paths;
  }
}

}  // namespace

absl::StatusOr<std::string> Trainer::SaveCheckpoint() {
  const std::string final_dir = absl::StrCat(options_.output_dir, "/", CheckpointName(step_));
  const std::string tmp_dir = absl::StrCat(final_dir, ".tmp-", ::getpid());
  MEFT_RETURN_IF_ERROR(io::RemoveAll(tmp_dir));
  MEFT_RETURN_IF_ERROR(io::CreateDirectories(tmp_dir));
  json state = {{"global_step", step_},
                {"epoch", loader_->position().epoch},
                {"batch_index", loader_->position().index},
                {"adapter", target_.adapter},
                {"max_steps", options_.max_steps},
                {"grad_accum", options_.grad_accum},
                {"lr", options_.lr},
                {"log_history", log_->history()},
                {"writer", "meft-worker"}};
  json config = {{"adapter", target_.adapter}};
  try {
    if (target_.adapter == "meft") {
      MEFT_RETURN_IF_ERROR(target_.meft->WaitForStep());
      // The adapter itself lives on the server: it writes its own checkpoint-<step>/.
      MEFT_ASSIGN_OR_RETURN(const std::string server_path, target_.server->SaveCheckpoint(""));
      RecordServerCheckpoints(server_path, options_.output_dir, &state);
      RecordServerCheckpoints(server_path, options_.output_dir, &config);
    } else {
      NamedTensors adapter = target_.local;
      if (target_.lora != nullptr) {
        // PEFT's layout; meft's own record of the run is trainer_state.json.
        MEFT_ASSIGN_OR_RETURN(adapter, ToPeftLoraTensors(target_.local));
        config = PeftLoraConfig(target_.lora->options(), model_->config().num_hidden_layers,
                                target_.base_model);
      }
      MEFT_RETURN_IF_ERROR(
          WriteTensors(absl::StrCat(tmp_dir, "/adapter_model.safetensors"), adapter).status());
      auto opt = adamw_->State();
      MEFT_RETURN_IF_ERROR(
          WriteTensors(absl::StrCat(tmp_dir, "/optimizer.safetensors"), opt).status());
      state["optimizer_step"] = adamw_->step();
    }
  } catch (...) {
    return StatusFromCurrentException("checkpoint");
  }
  MEFT_RETURN_IF_ERROR(
      io::WriteFileDurably(absl::StrCat(tmp_dir, "/trainer_state.json"), {state.dump(2) + "\n"}));
  MEFT_RETURN_IF_ERROR(
      io::WriteFileDurably(absl::StrCat(tmp_dir, "/adapter_config.json"), {config.dump(2) + "\n"}));
  MEFT_RETURN_IF_ERROR(io::FsyncDirectory(tmp_dir));
  MEFT_RETURN_IF_ERROR(io::ReplaceDirectoryAtomically(tmp_dir, final_dir));
  return final_dir;
}

absl::Status LoadAdapterCheckpoint(const std::string& dir, const TrainTarget& target) {
  const std::string state_path = absl::StrCat(dir, "/trainer_state.json");
  MEFT_ASSIGN_OR_RETURN(const std::string text, io::ReadFile(state_path));
  const json state = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (state.is_discarded() || !state.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(state_path, ": not a JSON object"));
  }
  if (!state.contains("adapter") || state["adapter"] != target.adapter) {
    return absl::FailedPreconditionError(absl::StrCat(
        state_path, ": field \"adapter\" is ", state.value("adapter", json("missing")).dump(),
        " but this run uses ", target.adapter));
  }
  if (target.adapter == "meft") {
    if (state.contains("server_checkpoints")) {
      const json& list = state["server_checkpoints"];
      std::vector<std::string> paths;
      for (const json& p : list.is_array() ? list : json::array()) {
        if (p.is_string()) paths.push_back(ResolveRecordedPath(p.get<std::string>(), dir));
      }
      if (!list.is_array() || paths.size() != list.size() || paths.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            state_path, ": field \"server_checkpoints\" is not a non-empty list of paths"));
      }
      return target.server->RestoreCheckpoint(JoinShardCheckpoints(paths));
    }
    if (!state.contains("server_checkpoint") || !state["server_checkpoint"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(state_path, ": field \"server_checkpoint\" is missing"));
    }
    return target.server->RestoreCheckpoint(
        ResolveRecordedPath(state["server_checkpoint"].get<std::string>(), dir));
  }
  const std::string model_path = absl::StrCat(dir, "/adapter_model.safetensors");
  MEFT_ASSIGN_OR_RETURN(auto params, ReadTensors(model_path));
  if (target.lora != nullptr) {
    const std::string config_path = absl::StrCat(dir, "/adapter_config.json");
    MEFT_ASSIGN_OR_RETURN(const std::string config, io::ReadFile(config_path));
    MEFT_ASSIGN_OR_RETURN(params, LoraTensorsFromCheckpoint(config, config_path, std::move(params),
                                                            model_path, target.lora->options()));
  }
  for (const auto& [n, t] : params) {
    if (std::none_of(target.local.begin(), target.local.end(),
                     [&n](const auto& p) { return p.first == n; })) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_path, ": tensor \"", n, "\" is not a parameter of this run's ",
                       target.adapter, " adapter (see adapter.layers and the adapter's settings)"));
    }
  }
  try {
    torch::NoGradGuard no_grad;
    for (const auto& [name, p] : target.local) {
      bool found = false;
      for (const auto& [n, t] : params) {
        if (n != name) continue;
        if (t.sizes() != p.sizes()) {
          return absl::InvalidArgumentError(
              absl::StrCat(model_path, ": tensor \"", name, "\" has the wrong shape"));
        }
        p.copy_(t);
        found = true;
      }
      if (!found) {
        return absl::InvalidArgumentError(
            absl::StrCat(model_path, ": tensor \"", name, "\" is missing"));
      }
    }
  } catch (...) {
    return StatusFromCurrentException(absl::StrCat("loading ", model_path));
  }
  return absl::OkStatus();
}

absl::Status Trainer::Resume(const std::string& dir) {
  const std::string state_path = absl::StrCat(dir, "/trainer_state.json");
  MEFT_ASSIGN_OR_RETURN(const std::string text, io::ReadFile(state_path));
  const json state = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (state.is_discarded() || !state.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(state_path, ": not a JSON object"));
  }
  for (const char* key : {"global_step", "epoch", "batch_index"}) {
    if (!state.contains(key) || !state[key].is_number_integer() || state[key].get<int64_t>() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(state_path, ": field \"", key, "\" is missing or not a count"));
    }
  }
  const int64_t step = state["global_step"].get<int64_t>();
  MEFT_ASSIGN_OR_RETURN(json log_history, ReadLogHistory(state, state_path, step));
  MEFT_RETURN_IF_ERROR(LoadAdapterCheckpoint(dir, target_));
  if (adamw_ != nullptr) {
    MEFT_ASSIGN_OR_RETURN(auto opt, ReadTensors(absl::StrCat(dir, "/optimizer.safetensors")));
    if (!adamw_->Restore(opt, state.value("optimizer_step", int64_t{0}))) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, "/optimizer.safetensors: state does not match the parameters"));
    }
  }
  MEFT_RETURN_IF_ERROR(
      loader_->Seek(state["epoch"].get<int64_t>(), state["batch_index"].get<int64_t>()));
  MEFT_RETURN_IF_ERROR(log_->Restart(std::move(log_history)));
  step_ = step;
  return absl::OkStatus();
}

}  // namespace meft::worker
