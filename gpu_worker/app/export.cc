#include "gpu_worker/app/export.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <span>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/config/config.h"
#include "common/io/file_util.h"
#include "common/safetensors/safetensors.h"
#include "common/status.h"
#include "gpu_worker/app/worker_config.h"
#include "gpu_worker/train/run_folder.h"
#include "nlohmann/json.hpp"
#include "param_server/checkpoint/checkpoint.h"

namespace meft::worker {
namespace {

using nlohmann::json;
namespace st = ::meft::safetensors;

constexpr char kExportFormat[] = "meft-export";

absl::StatusOr<json> ReadJsonObject(const std::string& path) {
  MEFT_ASSIGN_OR_RETURN(const std::string text, io::ReadFile(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

// The server checkpoint folders a worker checkpoint records ("server_checkpoint" or
// "server_checkpoints").
absl::StatusOr<std::vector<std::string>> ServerCheckpoints(const std::string& checkpoint,
                                                           const std::string& state_path,
                                                           const json& state) {
  std::vector<std::string> paths;
  if (state.contains("server_checkpoints")) {
    const json& list = state["server_checkpoints"];
    for (const json& p : list.is_array() ? list : json::array()) {
      if (p.is_string()) paths.push_back(ResolveRecordedPath(p.get<std::string>(), checkpoint));
    }
    if (!list.is_array() || paths.size() != list.size() || paths.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          state_path, ": field \"server_checkpoints\" is not a non-empty list of paths"));
    }
    return paths;
  }
  if (!state.contains("server_checkpoint") || !state["server_checkpoint"].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(state_path,
                     ": field \"server_checkpoint\" is missing (a meft worker checkpoint records "
                     "the parameter server's checkpoint there)"));
  }
  return std::vector<std::string>{
      ResolveRecordedPath(state["server_checkpoint"].get<std::string>(), checkpoint)};
}

// One tensor of the export: name, shape and fp32 bytes (borrowed from a mapped file).
struct OutTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::span<const uint8_t> data;
};

std::string Name(uint32_t layer, const char* block) {
  return absl::StrCat("layers.", layer, ".", block);
}

// What ExportAdapter collects before writing.
struct Collected {
  json config;
  uint64_t step = 0;
  std::vector<uint32_t> layers;
  std::vector<OutTensor> tensors;
  std::vector<std::unique_ptr<st::File>> files;  // keep the mappings alive
};

// Merges the server checkpoint(s) `dirs` (disjoint layers, equal settings).
absl::Status CollectMeft(const std::vector<std::string>& dirs, const ExportOptions& options,
                         Collected* out) {
  std::optional<checkpoint::AdapterConfig> first;
  std::string first_dir;
  std::map<uint32_t, std::string> owner;
  for (const std::string& dir : dirs) {
    MEFT_ASSIGN_OR_RETURN(checkpoint::ParameterView view, checkpoint::OpenParameters(dir));
    const checkpoint::AdapterConfig& c = view.config;
    if (!first.has_value()) {
      first = c;
      first_dir = dir;
      out->step = view.step;
    } else {
      const checkpoint::AdapterConfig& f = *first;
      if (c.rows != f.rows || c.dim != f.dim || c.experts != f.experts || c.n_probe != f.n_probe ||
          c.top_k != f.top_k || c.max_rows != f.max_rows || c.mode != f.mode ||
          c.gated != f.gated || view.step != out->step) {
        return absl::InvalidArgumentError(absl::StrCat(
            dir, "/", checkpoint::kConfigFile, ": shard settings (rows, dim, experts, n_probe, ",
            "top_k, max_rows, mode, gated, step) differ from those of ", first_dir));
      }
    }
    for (const checkpoint::ParameterView::Layer& l : view.layers) {
      if (auto [it, inserted] = owner.emplace(l.layer, dir); !inserted) {
        return absl::InvalidArgumentError(absl::StrCat(dir, "/", checkpoint::kConfigFile,
                                                       ": layer ", l.layer, " is also held by ",
                                                       it->second));
      }
      if (!options.layers.empty() && std::find(options.layers.begin(), options.layers.end(),
                                               l.layer) == options.layers.end()) {
        continue;
      }
      out->layers.push_back(l.layer);
      out->tensors.push_back({Name(l.layer, "keys"), {c.rows, c.dim}, l.keys});
      out->tensors.push_back({Name(l.layer, "values"), {c.rows, c.dim}, l.values});
      out->tensors.push_back({Name(l.layer, "router"), {c.experts, c.dim}, l.router});
    }
    out->files.push_back(std::move(view.model));
  }
  for (uint32_t l : options.layers) {
    if (!owner.count(l)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter.layers: layer ", l, " is in no server checkpoint (",
                       absl::StrJoin(dirs, ", "), " hold ", owner.size(), " layers)"));
    }
  }
  const checkpoint::AdapterConfig& c = *first;
  out->config = {{"adapter", "meft"},
                 {"r", c.rows},
                 {"d", c.dim},
                 {"E", c.experts},
                 {"n_probe", c.n_probe},
                 {"top_k", c.top_k},
                 {"max_rows", c.max_rows},
                 {"mode", c.mode},
                 {"gating", c.gated ? "gated" : "ungated"},
                 {"prefetch_layers", options.prefetch_layers},
                 {"row_dtype", options.bf16_rows ? "bf16" : "fp32"}};
  return absl::OkStatus();
}

// The parallel adapter of a worker checkpoint: layers.<l>.{keys,values}, fp32 [r, d].
absl::Status CollectParallel(const std::string& checkpoint, Collected* out) {
  const std::string path = absl::StrCat(checkpoint, "/adapter_model.safetensors");
  MEFT_ASSIGN_OR_RETURN(std::unique_ptr<st::File> file, st::File::Open(path));
  std::set<uint32_t> layers;
  for (const st::TensorInfo& t : file->tensors()) {
    uint32_t l = 0;
    char block[16] = {};
    int consumed = 0;
    if (std::sscanf(t.name.c_str(), "layers.%u.%15[a-z]%n", &l, block, &consumed) != 2 ||
        static_cast<size_t>(consumed) != t.name.size() ||
        (std::string(block) != "keys" && std::string(block) != "values")) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor \"", t.name, "\" is not layers.<l>.keys or layers.<l>.values"));
    }
    layers.insert(l);
  }
  if (layers.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no tensors"));
  const st::TensorInfo* first = file->Find(Name(*layers.begin(), "keys"));
  if (first == nullptr || first->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": tensor \"", Name(*layers.begin(), "keys"), "\" is missing or not a matrix"));
  }
  const std::vector<int64_t> shape = first->shape;
  for (uint32_t l : layers) {
    for (const char* block : {"keys", "values"}) {
      const std::string name = Name(l, block);
      MEFT_RETURN_IF_ERROR(file->CheckTensor(name, st::DType::kF32, shape));
      MEFT_ASSIGN_OR_RETURN(auto data, file->Data(name));
      out->tensors.push_back({name, shape, data});
    }
    out->layers.push_back(l);
  }
  out->files.push_back(std::move(file));
  out->config = {{"adapter", "parallel"}, {"r", shape[0]}, {"d", shape[1]}};
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExportSummary> ExportAdapter(const ExportOptions& options) {
  if (options.checkpoint.empty()) return absl::InvalidArgumentError("--checkpoint: required");
  if (options.output.empty()) return absl::InvalidArgumentError("--output: required");
  if (options.prefetch_layers < 0) {
    return absl::InvalidArgumentError("meft.prefetch_layers: must be >= 0");
  }
  const std::string state_path = absl::StrCat(options.checkpoint, "/trainer_state.json");
  MEFT_ASSIGN_OR_RETURN(const json state, ReadJsonObject(state_path));
  const std::string writer = state.value("writer", "");
  Collected got;
  std::string adapter;
  if (writer == "meft-param-server") {
    adapter = "meft";
    MEFT_RETURN_IF_ERROR(CollectMeft({options.checkpoint}, options, &got));
  } else {
    if (!state.contains("adapter") || !state["adapter"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(state_path,
                       ": field \"adapter\" is missing (neither a meft-worker nor a "
                       "meft-param-server checkpoint)"));
    }
    adapter = state["adapter"].get<std::string>();
    if (adapter == "meft") {
      MEFT_ASSIGN_OR_RETURN(const std::vector<std::string> dirs,
                            ServerCheckpoints(options.checkpoint, state_path, state));
      MEFT_RETURN_IF_ERROR(CollectMeft(dirs, options, &got));
    } else if (adapter == "parallel") {
      MEFT_RETURN_IF_ERROR(CollectParallel(options.checkpoint, &got));
      if (!state.contains("global_step") || !state["global_step"].is_number_unsigned()) {
        return absl::InvalidArgumentError(
            absl::StrCat(state_path, ": field \"global_step\" is missing or not a count"));
      }
      got.step = state["global_step"].get<uint64_t>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          state_path, ": field \"adapter\" is \"", adapter,
          "\"; export writes meft and parallel adapters (LoRA has PEFT's own layout)"));
    }
  }

  ExportSummary summary;
  summary.adapter = adapter;
  summary.step = got.step;
  summary.layers = got.layers;
  std::vector<st::TensorToWrite> tensors;
  for (const OutTensor& t : got.tensors) {
    tensors.push_back({t.name, st::DType::kF32, t.shape, t.data});
    summary.parameters += static_cast<int64_t>(t.data.size() / sizeof(float));
  }
  json config = {{"format", kExportFormat}, {"format_version", 1},
                 {"step", got.step},        {"source", options.checkpoint},
                 {"layers", got.layers},    {"activation", "relu"},
                 {"dtype", "float32"}};
  config.update(got.config);

  // Written under a temporary name and renamed into place, as checkpoints are.
  const std::string tmp = absl::StrCat(options.output, ".tmp-", ::getpid());
  MEFT_RETURN_IF_ERROR(io::RemoveAll(tmp));
  MEFT_RETURN_IF_ERROR(io::CreateDirectories(tmp));
  const std::map<std::string, std::string> meta = {{"format", kExportFormat}, {"adapter", adapter}};
  MEFT_ASSIGN_OR_RETURN(summary.bytes,
                        st::Write(absl::StrCat(tmp, "/adapter_model.safetensors"), tensors, meta));
  MEFT_RETURN_IF_ERROR(
      io::WriteFileDurably(absl::StrCat(tmp, "/adapter_config.json"), {config.dump(2) + "\n"}));
  MEFT_RETURN_IF_ERROR(io::FsyncDirectory(tmp));
  MEFT_RETURN_IF_ERROR(io::ReplaceDirectoryAtomically(tmp, options.output));
  return summary;
}

int RunExportCommand(int argc, char** argv) {
  WorkerConfig config;
  config::FieldSet fields;
  RegisterWorkerFields(&config, &fields);
  CLI::App app{
      "meft-worker export: write a trained meft or parallel adapter as a self-contained folder "
      "(adapter_model.safetensors, adapter_config.json) for the python/ package. Settings come "
      "from defaults, then --config FILE (YAML), then flags; export uses adapter.layers, "
      "meft.prefetch_layers and meft.bf16_rows."};
  std::string config_path;
  ExportOptions o;
  app.add_option("--config", config_path, "YAML configuration file")->check(CLI::ExistingFile);
  app.add_option("--checkpoint", o.checkpoint,
                 "a worker checkpoint-<step> folder (meft or parallel), or a parameter server's")
      ->required();
  app.add_option("--output", o.output, "the folder to write")->required();
  fields.BindCli(app);
  app.footer("Every setting, with its YAML key, default and meaning:\n" + fields.HelpText());
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  absl::Status status = fields.registration_status();
  if (status.ok() && !config_path.empty()) status = fields.LoadYamlFile(config_path);
  if (status.ok()) status = fields.ApplyCli();
  absl::StatusOr<ExportSummary> summary;
  if (status.ok()) {
    o.layers = config.layers;
    o.prefetch_layers = config.prefetch_layers;
    o.bf16_rows = config.bf16_rows;
    summary = ExportAdapter(o);
    status = summary.status();
  }
  if (!status.ok()) {
    std::fprintf(stderr, "meft-worker: error: %s\n", std::string(status.message()).c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf("exported %s adapter of step %llu (layers %s; %lld parameters) to %s\n",
              summary->adapter.c_str(), static_cast<unsigned long long>(summary->step),
              absl::StrJoin(summary->layers, ",").c_str(),
              static_cast<long long>(summary->parameters), o.output.c_str());
  return 0;
}

}  // namespace meft::worker
